# Copyright: openclb developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action openclb.lb.validate_model: check the whole model on the controller
before any host is touched, and list every error at once."""

from __future__ import annotations

from ansible.plugins.action import ActionBase
from ansible_collections.openclb.lb.plugins.module_utils import model as lb

_PARTS = {"cluster": "openclb_cluster", "server_groups": "openclb_server_groups", "listeners": "openclb_listeners"}


def missing_controller_dirs(model, task_vars):
    """Controller directories the model needs and the inventory must name:
    no default under the playbook directory, which differs per playbook."""
    https = [lst for lst in model.get("l7_listeners", []) if lst.get("protocol") == "https"]
    needed = []
    if https:
        needed.append(("openclb_tls_material_dir", "certificates and keys of the HTTPS listeners"))
    if any(cert.get("key_store") == "keyserver" for lst in https for cert in lst.get("certificates", [])):
        needed.append(("openclb_pki_dir", "the cluster CA and the key-server tunnel certificates"))
    return [f"{var}: not set in the inventory (the controller directory for {why})"
            for var, why in needed if not task_vars.get(var)]


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False
    _VALID_ARGS = frozenset((*_PARTS, "publish"))

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        task_vars = task_vars or {}
        # Each part: the task argument if given, else the inventory variable.
        raw = {}
        for part, var in _PARTS.items():
            value = self._task.args.get(part)
            if value is None:
                value = task_vars.get(var)
            raw[part] = self._templar.template(value) if value is not None else None
        raw = {k: v for k, v in raw.items() if v is not None}
        nodes = lb.nodes_from_inventory(task_vars.get("groups", {}), task_vars.get("hostvars", {}))

        result["changed"] = False
        try:
            model = lb.normalize(raw, nodes)
        except lb.ModelError as exc:
            result["failed"] = True
            result["errors"] = exc.errors
            result["msg"] = f"{len(exc.errors)} error(s) in the openclb model:\n" + "\n".join(exc.errors)
            return result
        errors = missing_controller_dirs(model, task_vars)
        if errors:
            result["failed"] = True
            result["errors"] = errors
            result["msg"] = "\n".join(errors)
            return result
        if self._task.args.get("publish"):
            # With run_once the fact reaches every host of the play: the
            # tiers render from it without recomputing it per host.
            result["ansible_facts"] = {"openclb_model": model}
            # the model is large: -v shows the summary of the check, not this
            result["_ansible_verbose_override"] = True
            result["msg"] = "openclb_model published"
            return result
        summary = lb.summary(model)
        result["summary"] = summary
        listeners = ", ".join(f"{n} {p}" for p, n in summary["listeners"].items() if n)
        result["msg"] = (
            f"model {summary['cluster']} is valid: {listeners or 'no listeners'}; "
            f"{summary['ipvs_services']} IPVS services, {summary['real_servers']} real servers, "
            f"{len(summary['vips'])} VIPs"
        )
        return result
