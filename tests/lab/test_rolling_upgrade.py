"""Zero-downtime rolling upgrade of the LVS and L7 tiers under traffic (docs/ha.md).

Needs the whole lab converged with site.yml (tests/lab/run.sh runs this
after test_ha.py):

    pytest -m lab tests/lab/test_rolling_upgrade.py -s

While `playbooks/rolling_upgrade.yml` restarts every service on every LVS
node (conntrackd, keepalived; the MASTER demoted first) and every L7 node
(drained on the LVS tier first; key-server tunnel, nginx, openclb-healthd,
the key-client watchdog held meanwhile), client1 runs, from
tests/lab/ha_traffic.py:

* a bounded stream of HTTP requests through the http-web listener (LVS ->
  nginx -> backends), a new connection every 50 ms;
* 50 keep-alive connections through the NAT listener and 50 through the DR
  listener, a request every 100 ms each, for the whole rollout.

Asserted: the playbook succeeds, 0 failed requests, 0 reset or stalled held
connections, every service on every node was restarted, the VIPs moved
exactly once (the MASTER's demotion; the BACKUPs go first and no node takes
them back). The playbook runs without the role converge
(rolling_converge=false) and with a 10 s drain bound
(the probe's connections last milliseconds; a new MASTER's synced copies of
connections closed on the old one stay "active" until they time out).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import test_ha as ha
from conftest import PLAYBOOK, REPO, require_hosts

# In make test again (2026-11-28): with the old 2 s bound requests failed in 2
# runs (each "timeout, request sent": guest starvation on a loaded host); with
# REQUEST_TIMEOUT it passed 4 of 4, two of them under two added busy loops and
# one inside a full make test (docs/ha.md, Known gaps).
pytestmark = pytest.mark.lab

HERE = Path(__file__).resolve().parent
LVS = ha.LVS
L7 = ("l7-1", "l7-2")
HOSTS = [*LVS, *L7, "be1", "be2", "be3", "ks1", "ks2", "client1"]
HTTP = "203.0.113.20:80"
SERVICES = {
    "lvs": ["keepalived", "conntrackd"],
    "l7": ["openclb-keyclient-tunnel", "nginx", "openclb-healthd", "openclb-keyclient-watchdog"],
}
# s: the rollout's time limit, the traffic's too. The playbook took 4-6 min
# on a quiet lab, 12+ min at load 20 (docs/ha.md); a hang must not eat the
# CI budget.
BOUND = 600
# s: a request without a whole answer by then has failed. Not test_ha's 2 s
# (a failover gap probe): a lab guest starved by its loaded host can stall
# for seconds (held connections stalled 4.7 s in a run whose 24 failed
# requests all timed out at 2 s after being sent, none logged by nginx:
# docs/ha.md). 10 s like the other lab clients; the slowest answer is printed.
REQUEST_TIMEOUT = 10


def units(lab, host):
    """The node's tier services: (ActiveState, last activation in monotonic µs; it changes iff restarted)."""
    names = [f"{u}.service" for u in SERVICES["lvs" if host in LVS else "l7"]]
    out = lab.sh(host, ["systemctl", "show", "-p", "Id,ActiveState,ActiveEnterTimestampMonotonic", *names])
    ids = re.findall(r"^Id=(.*)$", out, re.M)
    states = re.findall(r"^ActiveState=(.*)$", out, re.M)
    stamps = re.findall(r"^ActiveEnterTimestampMonotonic=(\d+)$", out, re.M)
    return {i: (state, stamp) for i, state, stamp in zip(ids, states, stamps, strict=True)}


def test_rolling_upgrade_under_traffic(lab, tmp_path):
    require_hosts(lab, HOSTS)
    master = ha.settled_master(timeout=30)
    before = {h: units(lab, h) for h in (*LVS, *L7)}
    down = {h: [u for u, (state, _t) in us.items() if state != "active"] for h, us in before.items()}
    assert not any(down.values()), (f"not running before the rollout: {down} (a rollout stopped half-way "
                                    "leaves them so; converge the lab again)")
    mark, stop = tmp_path / "warm", tmp_path / "stop"
    t_start = time.time()
    driver = subprocess.Popen(
        ha.LAB.argv("client1", [
            "python3", str(HERE / "ha_traffic.py"),
            "--hold", f"nat={ha.NAT}:{ha.HELD}", "--hold", f"dr={ha.DR}:{ha.HELD}",
            "--probe", HTTP, "--probe-timeout", str(REQUEST_TIMEOUT),
            "--duration", str(BOUND + 60), "--mark", str(mark), "--stop", str(stop)]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        ha.wait_for("every held connection to carry 3 requests", mark.exists, 60)
        time.sleep(1.0)
        t0 = time.monotonic()
        log = tmp_path / "rolling_upgrade.log"
        with log.open("w") as sink:
            play = subprocess.Popen(
                [PLAYBOOK, "-i", str(REPO / "inventories/lab"), str(REPO / "playbooks/rolling_upgrade.yml"),
                 "-e", "rolling_converge=false", "-e", "ha_drain_timeout=10"],
                stdout=sink, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                env=dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
                         ANSIBLE_CALLBACKS_ENABLED="ansible.posix.profile_tasks"),
            )
            try:
                play.wait(timeout=BOUND)
            except subprocess.TimeoutExpired:
                # still judge and print the traffic; the time limit fails below
                play.kill()
                play.wait()
        play.stdout = log.read_text()
        took = time.monotonic() - t0
        time.sleep(3)  # traffic after the last node is back
    finally:
        stop.touch()
        out, err = driver.communicate(timeout=120)
    assert driver.returncode == 0, err
    report = json.loads(out)
    tail = play.stdout[-6000:]
    warmups = re.findall(r"holds \d+ connection entries \(MASTER: [^)]*\)", play.stdout)
    after = {h: units(lab, h) for h in (*LVS, *L7)}
    moves = {h: [(t[1], round(float(t[0]) - t_start, 1)) for t in ha.transitions(h) if float(t[0]) >= t_start]
             for h in LVS}
    p = report["probe"]
    print(f"\nrolling_upgrade.yml over {', '.join((*LVS, *L7))}: {took:.0f} s, exit {play.returncode}")
    # the probes' times count from here: to line them up with the play's task times (profile_tasks)
    print(f"  traffic started {time.strftime('%H:%M:%S', time.gmtime(report['started']))} UTC")
    print(f"  HTTP through {HTTP} (LVS -> nginx -> backends): {p['ok']} ok, {p['failed']} failed "
          f"{p['failures'][:10]}; longest gap {p['max_gap']} s; slowest answer [start, s] {p['slowest']}")
    for group, g in report["groups"].items():
        print(f"  held {group}: {g['alive']}/{g['count']} alive, failed {g['failed'][:5]}, "
              f"longest stall {g['max_stall']} s")
    print(f"  sync warm-up before the next node: {warmups}")
    print(f"  VRRP transitions since the start: {moves}")

    assert took < BOUND, f"rolling_upgrade.yml still running after {BOUND} s (log {log}):\n{tail[-4000:]}"
    assert play.returncode == 0, tail
    assert p["ok"] > 0 and p["failed"] == 0, f"failed requests [start s, after s, why, bytes]: {p['failures']}"
    for group, g in report["groups"].items():
        assert g["count"] == g["alive"] == ha.HELD, f"held {group} connections lost: {g['failed']}"
    not_restarted = {h: [u for u, (_s, t) in after[h].items() if t == before[h][u][1] or t == "0"] for h in after}
    assert not any(not_restarted.values()), f"services not restarted: {not_restarted}"
    # One switch: the peer (restarted first, as BACKUP: STOP, BACKUP) took the
    # VIPs once, when the old MASTER was demoted, and kept them; the old
    # MASTER never took them back.
    peer = next(h for h in LVS if h != master)
    assert [s for s, _ in moves[peer] if s == "MASTER"] == ["MASTER"] and moves[peer][-1][0] == "MASTER", moves
    assert "MASTER" not in [s for s, _ in moves[master]], moves
    assert ha.settled_master(timeout=30) == peer
