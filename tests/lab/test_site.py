"""site.yml on the converged lab: a second run changes nothing.

tests/lab/run.sh converges site.yml once before this runs. Check mode with
--diff after a real model change is tests/lab/test_l4.py's (it must show the
diff and change nothing); the L7 role's check mode is tests/host's.
"""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin"
pytestmark = pytest.mark.lab


def lab_is_up() -> bool:
    res = subprocess.run([str(BIN / "openclb-lab"), "status", "--json"], capture_output=True, text=True, check=False)
    try:
        return any(r["state"] == "running" for r in json.loads(res.stdout))
    except ValueError:
        return False


@pytest.fixture(scope="module", autouse=True)
def lab():
    if not lab_is_up():
        pytest.skip(f"lab {os.environ.get('OPENCLB_LAB_NAME', 'openclb')} is not up: run tests/lab/run.sh")


def converge(*extra: str) -> tuple[str, dict[str, int]]:
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_FORCE_COLOR="0",
               PATH=f"{BIN}:{os.environ['PATH']}")
    res = subprocess.run([str(BIN / "ansible-playbook"), "-i", "inventories/lab", "site.yml", *extra],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=1800, check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    changed = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", res.stdout, re.M)}
    assert changed, "no PLAY RECAP in the output"
    return res.stdout, changed


def changed_tasks(output: str) -> list[str]:
    """Names of the tasks that reported a change, for a useful failure message."""
    tasks, current = [], None
    for line in output.splitlines():
        if line.startswith("TASK ["):
            current = line
        elif line.startswith("changed:") and current:
            tasks.append(f"{current} {line}")
    return tasks


def test_second_converge_changes_nothing():
    output, changed = converge()
    assert sum(changed.values()) == 0, changed_tasks(output)
