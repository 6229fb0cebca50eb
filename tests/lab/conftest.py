"""Helpers for the lab tests: run commands on lab hosts, skip cleanly when the lab is down.

The lab is the one named by OPENCLB_LAB_NAME (default "openclb"); guests are
reached with `openclb-lab exec HOST -- CMD`, clients run CMD inside their
network namespace (on this host's file system, so tests/lab/*.py scripts can
be run there with the host's python3).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = os.environ.get("OPENCLB_ANSIBLE_PLAYBOOK", str(Path(sys.executable).with_name("ansible-playbook")))


def playbook(*args, timeout=900):
    """Run ansible-playbook against the lab inventory; returns (rc, output)."""
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0")
    p = subprocess.run([PLAYBOOK, "-i", str(REPO / "inventories/lab"), *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def recap_changed(output):
    """{host: changed count} from the PLAY RECAP."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", output, re.M)}


def lab_model():
    return yaml.safe_load((REPO / "inventories/lab/group_vars/all/openclb.yml").read_text())


def write_vars(tmp_path, model):
    """A changed model as extra vars (`-e @file`): server groups and listeners."""
    path = tmp_path / "model.json"
    path.write_text(json.dumps({k: model[k] for k in ("openclb_server_groups", "openclb_listeners")}))
    return f"@{path}"


def lab_cli():
    for candidate in (shutil.which("openclb-lab"), str(Path(sys.executable).with_name("openclb-lab"))):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class Lab:
    """What `openclb-lab exec` runs, with a timeout on every call.

    `openclb-lab exec` reads the inventory (ansible-inventory) on every call,
    1-8 s on a loaded 2-core machine; the tests make hundreds of calls, so the
    topology is read once here and openclb_lab's own Lab builds each argv (the
    same ssh options and client namespaces).
    """

    def __init__(self, cli):
        self.cli = cli
        self.name = os.environ.get("OPENCLB_LAB_NAME", "openclb")
        self._lab = None

    def argv(self, host, cmd):
        if self._lab is None:
            from openclb_lab import topology
            from openclb_lab.lab import Lab as LabCLI

            self._lab = LabCLI(topology.load(REPO / "inventories/lab"))
        return self._lab.exec_argv(host, ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd))

    def run(self, host, cmd, timeout=60, check=True, stdin=None):
        p = subprocess.run(self.argv(host, cmd), capture_output=True, text=True, timeout=timeout, input=stdin,
                           stdin=subprocess.DEVNULL if stdin is None else None)
        if check and p.returncode != 0:
            raise AssertionError(f"{host}: {cmd!r} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
        return p

    def sh(self, host, cmd, **kw):
        return self.run(host, cmd, **kw).stdout

    def popen(self, host, argv):
        return subprocess.Popen(self.argv(host, argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def control(self, *args, timeout=120):
        """openclb-lab itself: freeze/thaw/halt/boot/cut/restore HOST."""
        p = subprocess.run([self.cli, *args], capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        if p.returncode:
            raise AssertionError(f"openclb-lab {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")

    def status(self):
        out = subprocess.run([self.cli, "status", "--json"], capture_output=True, text=True, timeout=60).stdout
        return {row["host"]: row for row in json.loads(out or "[]")}


def require_hosts(lab, hosts):
    """Skip (with the reason) unless every host is running/up."""
    try:
        status = lab.status()
    except (subprocess.SubprocessError, ValueError) as exc:
        pytest.skip(f"openclb-lab status failed: {exc}")
    missing = [h for h in hosts if status.get(h, {}).get("state") not in ("running", "up")]
    if missing:
        pytest.skip(f"lab {lab.name}: {', '.join(missing)} not running "
                    f"(openclb-lab up {' '.join(hosts)}; then run playbooks/backends.yml and playbooks/lvs.yml)")


@pytest.fixture(scope="session")
def lab():
    cli = lab_cli()
    if cli is None:
        pytest.skip("openclb-lab CLI not installed (make venv)")
    return Lab(cli)
