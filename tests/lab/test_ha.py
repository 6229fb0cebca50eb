"""High availability of the L4 tier on the lab (docs/ha.md).

Needs the lab converged with playbooks/backends.yml and playbooks/lvs.yml
(lvs1, lvs2, be1, be2 are enough; tests/lab/run.sh runs it after site.yml).
Skips only when those guests are not running; a running lab whose LVS nodes
are not one MASTER + one BACKUP fails:

    export OPENCLB_LAB_NAME=ha
    openclb-lab up lvs1 lvs2 be1 be2
    ansible-playbook playbooks/backends.yml playbooks/lvs.yml -e backend_test_services=true
    pytest -m lab tests/lab/test_ha.py -s

Each scenario holds 50 keep-alive connections through the NAT listener
(tcp-web, 203.0.113.10:80) and 50 through the DR listener (dr-web,
203.0.113.30:8080) from client1, each sending a request every 100 ms, and
opens a new connection to the NAT VIP every 50 ms. Once every connection
has carried at least 3 requests (so IPVS sync has sent it: sync_threshold
3), the VRRP MASTER fails (frozen / keepalived stopped / powered off), and
comes back later. Every held connection must survive on the new MASTER with
no reset; the longest gap between two successful new connections is
printed; the returning node must come back as BACKUP and never take the
VIPs (nopreempt, asserted from the transitions the notify script records),
with no second interruption (held connections alive to the end; no new
connection failed after its return, and while the traffic still runs the
node that is BACKUP comes to hold 90 % of the MASTER's entries, warm for the
next switch, when the node returned within the traffic run). A frozen
MASTER that thaws never left MASTER in its own view: it yields because the
node that replaced it advertises one more than it (the takeover bonus,
docs/ha.md). Bounded: each scenario is one traffic run of fixed length.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import Lab, lab_cli, require_hosts

pytestmark = pytest.mark.lab

HERE = Path(__file__).resolve().parent
# conftest's Lab: the topology read once, every call with a timeout (the
# session fixture `lab` skips when the CLI is missing; this is the same object
# for module-level helpers that test_rolling_upgrade also uses)
LAB = Lab(lab_cli())
LVS = ("lvs1", "lvs2")
NAT = "203.0.113.10:80"
DR = "203.0.113.30:8080"
HELD = 50
HOSTS = [*LVS, "be1", "be2", "client1"]
# Longest gap between two successful new connections once the failed node is
# back: no second switch may show. Probes time out at 2 s; on this shared
# 2-core host gaps up to about 1 s occur without any failure.
RETURN_GAP_MAX = 1.6
STATUS = "/usr/local/sbin/openclb-ha-notify status"


def cli(verb, host, timeout=180):
    """openclb-lab freeze/thaw/halt/boot HOST."""
    LAB.control(verb, host, timeout=timeout)


def on(host, command, check=True, timeout=60):
    return LAB.sh(host, command, check=check, timeout=timeout)


def vrrp_state(host):
    """The node's VRRP state now (roles/lvs openclb-ha-notify status: who holds
    the VRRP addresses). Not the notify record: keepalived notifies only
    transitions, so a node converged before the notify line existed and
    reloaded since has none (why this test once skipped in the integrated lab)."""
    try:
        out = LAB.run(host, STATUS, check=False, timeout=20)
    except subprocess.TimeoutExpired:
        return None
    return out.stdout.split()[0] if out.returncode == 0 and out.stdout.strip() else None


def transitions(host):
    out = on(host, "cat /run/openclb/vrrp-transitions 2>/dev/null || true", check=False)
    return [line.split() for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cluster(lab):
    """Skip when the guests are down; fail when they run in a wrong VRRP state."""
    require_hosts(lab, HOSTS)
    try:
        settled_master(timeout=30)
    except AssertionError:
        states = {h: vrrp_state(h) for h in LVS}
        detail = {h: lab.sh(h, "systemctl is-active keepalived; cat /run/openclb/vrrp-state; "
                               "ip -br addr show dev front", check=False) for h in LVS}
        pytest.fail(f"LVS nodes not one MASTER + one BACKUP: {states}; {detail}")
    return {h: vrrp_state(h) for h in LVS}


def wait_for(what, predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def settled_master(timeout=120):
    """The single MASTER once both nodes agree (one MASTER, one BACKUP)."""

    def check():
        states = {h: vrrp_state(h) for h in LVS}
        masters = [h for h, s in states.items() if s == "MASTER"]
        return masters[0] if len(masters) == 1 and sorted(states.values(), key=str) == ["BACKUP", "MASTER"] else None

    return wait_for("one MASTER and one BACKUP", check, timeout)


def run_scenario(fail, recover, duration, recover_after=8.0):
    """Traffic for `duration` s; fail the MASTER once all connections are warm,
    recover it `recover_after` s later. Returns (report, master, peer, t_fail)."""
    master = settled_master()
    peer = next(h for h in LVS if h != master)
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        mark = Path(tmp) / "warm"
        driver = subprocess.Popen(
            LAB.argv("client1", [
                "python3",
                str(HERE / "ha_traffic.py"),
                "--hold",
                f"nat={NAT}:{HELD}",
                "--hold",
                f"dr={DR}:{HELD}",
                "--probe",
                NAT,
                "--duration",
                str(duration),
                "--mark",
                str(mark),
            ]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for("every held connection to carry 3 requests", mark.exists, 60)
            time.sleep(1.0)  # the sync messages of the last ones are on the wire
            t_fail = float(mark.read_text()) + 1.0
            t_failed = time.time()
            fail(master)
            time.sleep(recover_after)
            t_recover = time.time()
            recover(master)
            # While the held connections still run: the node that is BACKUP
            # now must come to know them (the sync daemon resends each one
            # every 50 packets), as the rolling upgrade's warm-up requires.
            warm, warm_after = wait_warm_backup(t_recover, t_start + duration - 3)
            out, err = driver.communicate(timeout=duration + 120)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    assert driver.returncode == 0, err
    report = json.loads(out)
    # transitions since the run started (by time stamp: a rebooted node's log starts afresh)
    report["flaps_after"] = {h: [t for t in transitions(h) if float(t[0]) >= t_start] for h in LVS}
    ok_at = report["probe"]["ok_at"]
    t_fail = t_failed - report["started"]
    t_recover = t_recover - report["started"]
    # failover: the longest gap between failure and recovery (a failure
    # command returns before or after it takes effect, so not "the gap at t")
    report["failover_gap"] = longest_gap(ok_at, t_fail, t_recover)
    # the returning node: the longest gap from its recovery to the end of the run
    report["recovery_gap"] = longest_gap(ok_at, t_recover, report["duration"])
    report["t_fail"], report["t_recover"] = round(t_fail, 3), round(t_recover, 3)
    report["warm"], report["warm_after"] = warm, warm_after
    report["failed_after_return"] = [t for t in report["probe"]["failed_at"] if t >= t_recover]
    return report, master, peer, t_fail


def wait_warm_backup(since, deadline, ratio=0.9):
    """Poll until the BACKUP holds `ratio` of the MASTER's ESTABLISHED held
    entries, or until the deadline (epoch s). Returns (last sample by node
    and state, seconds after `since` it got warm or None)."""
    sample = {}
    while time.time() < deadline:
        states = {h: vrrp_state(h) for h in LVS}
        sample = {h: (states[h], established(h)) for h in LVS}
        counts = {state: n for state, n in sample.values()}
        if set(states.values()) == {"MASTER", "BACKUP"} and 0 < counts["MASTER"] * ratio <= counts["BACKUP"]:
            return sample, round(time.time() - since, 1)
        time.sleep(1.0)
    return sample, None


def established(host):
    """ESTABLISHED entries of the held connections' services in host's IPVS table."""
    out = on(host, "ipvsadm -Lnc", check=False, timeout=30)
    return sum(1 for line in out.splitlines() if " ESTABLISHED " in line and (f" {NAT} " in line or f" {DR} " in line))


def longest_gap(ok_at, start, end):
    """Longest time without a successful new connection that overlaps [start, end]."""
    gaps = [b - a for a, b in zip(ok_at, ok_at[1:], strict=False) if b >= start and a <= end]
    return round(max(gaps, default=0.0), 3)


def check_report(name, report, master, peer):
    print(f"\n[{name}] MASTER {master} failed, {peer} took over")
    for group, g in report["groups"].items():
        print(
            f"  {group}: {g['eligible_alive']}/{g['eligible']} warm connections survived "
            f"({g['alive']}/{g['count']} in all), longest stall {g['max_stall']} s, failed: {g['failed'][:5]}"
        )
    p = report["probe"]
    print(
        f"  new connections: failover gap {report['failover_gap']} s (failure at t={report['t_fail']} s); "
        f"after the failed node's return (t={report['t_recover']} s) longest gap {report['recovery_gap']} s; "
        f"three longest gaps [start, length] {p['top_gaps']}; {p['ok']} ok, {p['failed']} failed"
    )
    for host, lines in report["flaps_after"].items():
        print(
            f"  VRRP transitions on {host}: "
            f"{[(line[1], round(float(line[0]) - report['started'], 1)) for line in lines]}"
        )
    print(f"  new connections failed after the return: {report['failed_after_return']}; "
          f"ESTABLISHED held entries (state, entries): {report['warm']}, BACKUP warm "
          f"{report['warm_after']} s after the return")
    for group, g in report["groups"].items():
        assert g["eligible"] == g["count"] == HELD, f"{group}: not every connection got warm: {g}"
        assert g["eligible_alive"] == g["eligible"], f"{group}: connections lost in failover: {g['failed']}"


def assert_clean_return(report):
    """The node that is BACKUP now holds the held connections (synced) while
    they still run, so the next switch keeps them; and no new connection
    failed once the failed node was back (no second interruption)."""
    if report["warm"]:
        assert report["warm_after"] is not None, f"the BACKUP never held 90 % of the MASTER's entries: {report['warm']}"
    else:
        # never sampled: the node came back after the traffic run had ended
        # (a halt and boot took that long in one CI run of 2026-11-27)
        print("  BACKUP warm-up not sampled: the failed node returned after the traffic run")
    assert not report["failed_after_return"], f"new connections failed after the return: {report['failed_after_return']}"


def print_bonus(host):
    """The takeover bonus the new MASTER advertises with (docs/ha.md)."""
    print(f"  {host}'s takeover bonus: {on(host, 'cat /run/openclb/vrrp-takeover', check=False).strip()}, "
          f"last peer priority heard: {on(host, 'cat /run/openclb/vrrp-peer-priority', check=False).strip()}")


def assert_no_flap(report, master, peer):
    """The node that failed came back as BACKUP, never took the VIPs, and
    stayed BACKUP; the peer became MASTER once and stayed MASTER. Read after
    a settle time: a thawed node acts within a few adverts of its return,
    which may come at the very end of the traffic run."""
    time.sleep(3)
    assert settled_master(timeout=30) == peer, f"the VIPs left {peer}, which took over"
    states = {h: [t[1] for t in transitions(h) if float(t[0]) >= report["started"]] for h in LVS}
    assert states[peer] == ["MASTER"], f"{peer} transitions: {states[peer]}"
    assert "MASTER" not in states[master], f"the returning node {master} took the VIPs: {states[master]}"
    assert_clean_return(report)


def boot(host):
    cli("boot", host, timeout=300)
    # Interface sysctls (<internal>.accept_local, needed for DR replies via
    # the director) are not re-applied at boot in the lab: the early network
    # script renames the NICs after systemd-sysctl ran. Re-apply until the
    # L4 role persists them in a way that survives that (reported).
    on(host, "/lib/systemd/systemd-sysctl")


def test_graceful_keepalived_stop(cluster):
    report, master, peer, _ = run_scenario(
        fail=lambda h: on(h, "systemctl stop keepalived"),
        recover=lambda h: on(h, "systemctl start keepalived"),
        duration=30,
    )
    check_report("keepalived stop", report, master, peer)
    assert_no_flap(report, master, peer)


def test_frozen_master(cluster):
    report, master, peer, _ = run_scenario(
        fail=lambda h: cli("freeze", h),
        recover=lambda h: cli("thaw", h),
        duration=35,
    )
    check_report("freeze", report, master, peer)
    # A frozen MASTER never left MASTER in its own view: after the thaw it
    # still advertises its old priority, the peer advertises one more (the
    # takeover bonus), and the thawed node yields: no second switch.
    print_bonus(peer)
    assert_no_flap(report, master, peer)


def test_halted_master(cluster):
    report, master, peer, _ = run_scenario(
        fail=lambda h: cli("halt", h),
        recover=boot,
        duration=120,
    )
    check_report("halt + boot", report, master, peer)
    assert_no_flap(report, master, peer)


def set_advert(value):
    """advert_int on both nodes for a run (keepalived.conf edited in place and
    reloaded; the role's next run restores the model's value). While the two
    disagree the faster one may take over: callers wait for a settled pair."""
    for host in LVS:
        on(host, f"sed -i -E 's/^( *advert_int ).*/\\1{value}/' /etc/keepalived/keepalived.conf"
                 " && systemctl reload keepalived")


def test_frozen_master_subsecond_advert(cluster):
    """The sub-second option (cluster.vrrp.advert_int 0.1, VRRPv3): a hard
    failure costs new connections less than 1 s."""
    original = on("lvs1", "grep -m1 -E '^ *advert_int' /etc/keepalived/keepalived.conf").split()[1]
    try:
        set_advert("0.1")
        time.sleep(3)
        settled_master()
        report, master, peer, _ = run_scenario(
            fail=lambda h: cli("freeze", h),
            recover=lambda h: cli("thaw", h),
            duration=30,
        )
    finally:
        set_advert(original)
        time.sleep(3)
    check_report("freeze, advert_int 0.1", report, master, peer)
    print_bonus(peer)
    assert report["failover_gap"] < 1.0, f"failover gap {report['failover_gap']} s with advert_int 0.1"
    assert_no_flap(report, master, peer)
