"""site.yml on the converged lab: a second run changes nothing.

tests/lab/run.sh converges site.yml once before this runs. Check mode with
--diff after a real model change is tests/lab/test_l4.py's (it must show the
diff and change nothing); the L7 role's check mode is tests/host's.
"""

import pytest
from conftest import playbook, recap_changed, require_hosts

pytestmark = pytest.mark.lab


def changed_tasks(output: str) -> list[str]:
    """Names of the tasks that reported a change, for a useful failure message."""
    tasks, current = [], None
    for line in output.splitlines():
        if line.startswith("TASK ["):
            current = line
        elif line.startswith("changed:") and current:
            tasks.append(f"{current} {line}")
    return tasks


def test_second_converge_changes_nothing(lab):
    require_hosts(lab, ["lvs1", "lvs2", "l7-1", "l7-2", "ks1", "ks2", "be1", "be2", "be3"])
    # Batches as in run.sh's first converge: one by one only slows an idempotence check down.
    rc, output = playbook("site.yml", "-e", '{"keyserver_serial": "100%", "keyclient_serial": "100%", '
                          '"l7_serial": "100%"}', timeout=1800)
    assert rc == 0, output[-4000:]
    changed = recap_changed(output)
    assert changed, "no PLAY RECAP in the output"
    assert sum(changed.values()) == 0, changed_tasks(output)
