#!/usr/bin/python
# Copyright: openclb developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ipvs_sync_daemon
short_description: Start or stop the IPVS connection synchronisation daemons over netlink
version_added: "0.1.0"
description:
  - Starts or stops the kernel's IPVS connection sync daemon in master role, backup role, or both, with
    generic netlink C(IPVS_CMD_NEW_DAEMON), C(IPVS_CMD_DEL_DAEMON) and C(IPVS_CMD_GET_DAEMON). Never runs
    C(ipvsadm).
  - A running daemon whose parameters match is left alone. The kernel cannot change a running
    daemon, so a changed parameter stops and starts that daemon (connections already synchronised on the
    peer stay there; sync messages pause for the restart).
  - Parameters left unset accept whatever the kernel runs with (its defaults are multicast group
    224.0.0.81, port 8848, TTL 1 and a message size from the interface MTU).
  - Loads C(ip_vs) with C(modprobe) when the IPVS generic netlink family is missing (not in check mode).
author:
  - openclb developers (@openclb)
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details: Before and after of the affected daemons, keyed by role.
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - openclb.lb.ipvs
options:
  role:
    description:
      - Which daemon(s). Both may run on one node (keepalived's C(lvs_sync_daemon) runs both on every node
        so either can be promoted).
    type: list
    elements: str
    required: true
    choices: [master, backup]
  state:
    description: V(present) runs the daemon(s) with these parameters, V(absent) stops them.
    type: str
    default: present
    choices: [present, absent]
  interface:
    description: Interface the sync multicast is sent/received on. Required with O(state=present).
    type: str
  syncid:
    description:
      - Sync ID (0-255). A backup with a non-zero ID only accepts messages with that ID; V(0) accepts all.
    type: int
    default: 0
  mcast_group:
    description: Multicast group, IPv4 or IPv6 (kernel default 224.0.0.81).
    type: str
  port:
    description: UDP port (kernel default 8848).
    type: int
  ttl:
    description: Multicast TTL, 1-255 (kernel default 1).
    type: int
  maxlen:
    description:
      - Maximum sync message (UDP payload) size. The kernel clamps a backup below 1024, so smaller values are
        refused here rather than never converging.
    type: int
notes:
  - Needs Linux 4.3 or newer for O(mcast_group), O(port), O(ttl) and O(maxlen).
seealso:
  - module: openclb.lb.ipvs_info
"""

EXAMPLES = r"""
- name: Run master and backup sync daemons on the LVS front interface
  openclb.lb.ipvs_sync_daemon:
    role: [master, backup]
    interface: eth1
    syncid: 1
    mcast_group: 224.0.0.81
    port: 8848
    ttl: 1

- name: Stop the backup daemon
  openclb.lb.ipvs_sync_daemon:
    role: [backup]
    state: absent
"""

RETURN = r"""
actions:
  description: Daemon stops and starts sent (or that would be sent in check mode).
  returned: always
  type: list
  elements: str
  sample: ["stop master (ttl 1 -> 2)", "start master on eth1 syncid 1"]
sync_daemons:
  description: All sync daemons as the kernel reports them after the run (before, in check mode).
  returned: always
  type: list
  elements: dict
  sample:
    - {role: master, interface: eth1, syncid: 1, maxlen: 1472, mcast_group: 224.0.0.81, port: 8848, ttl: 1}
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.openclb.lb.plugins.module_utils.ipvs import (  # noqa: E402
    IPVSError,
    apply_daemons,
    daemon_plan,
    normalize_daemon,
    open_kernel,
    read_daemons,
    require_pyroute2,
)


def build_module():
    return AnsibleModule(
        argument_spec=dict(
            role=dict(type="list", elements="str", required=True, choices=["master", "backup"]),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            interface=dict(type="str"),
            syncid=dict(type="int", default=0),
            mcast_group=dict(type="str"),
            port=dict(type="int"),
            ttl=dict(type="int"),
            maxlen=dict(type="int"),
        ),
        required_if=[("state", "present", ["interface"])],
        supports_check_mode=True,
    )


def _describe(action):
    text = f"{action['op']} {action['role']}"
    if action["op"] == "start":
        d = action["daemon"]
        text += f" on {d['interface']} syncid {d['syncid']}"
    if action.get("changes"):
        text += " ({})".format(", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in sorted(action["changes"].items())))
    return text


def main():
    module = build_module()
    require_pyroute2(module)
    p = module.params
    try:
        wanted = {role: normalize_daemon(role, p) if p["state"] == "present" else None for role in p["role"]}
    except IPVSError as exc:
        module.fail_json(msg=str(exc))
    kernel = open_kernel(module, load_module=not module.check_mode)
    try:
        before = read_daemons(kernel)
        actions = daemon_plan(before, wanted)
        after = before
        if actions and not module.check_mode:
            apply_daemons(kernel, actions)
            after = read_daemons(kernel)
    except IPVSError as exc:
        module.fail_json(msg=str(exc))
    finally:
        kernel.close()
    roles = set(p["role"])
    diff_after = {d["role"]: d for d in after if d["role"] in roles}
    if module.check_mode:  # show what would run, unset parameters as the kernel would choose them
        diff_after = {r: w for r, w in wanted.items() if w is not None}
    module.exit_json(
        changed=bool(actions),
        actions=[_describe(a) for a in actions],
        sync_daemons=after,
        diff={"before": {d["role"]: d for d in before if d["role"] in roles}, "after": diff_after},
    )


if __name__ == "__main__":
    main()
