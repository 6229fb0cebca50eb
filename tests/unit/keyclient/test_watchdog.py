"""openclb-keyclient-watchdog: reading the tunnel's connections, judging key servers in use."""

import os
import signal
import subprocess
import sys
import time

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                      "roles", "keyclient", "files", "openclb-keyclient-watchdog")

# /proc/net/tcp rows as the kernel writes them (header, then one row per socket)
TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0B00620A:A1C2 1F00620A:0967 01 00000000:00000000 02:000004D2 00000000   998        0 2 1 0000000000000000 20 4 30 10 -1
   2: 0B00620A:A1C4 2000620A:0967 06 00000000:00000000 03:00000E50 00000000     0        0 0 3 0000000000000000
"""
TCP6 = (
    "  sl  local_address                         remote_address                        st tx_queue rx_queue\n"
    "   0: 0000000000000000FFFF00000B00620A:B000 0000000000000000FFFF00002000620A:0967 01 00000000:00000000\n"
    "   1: 00000000000000000000000001000000:1F90 B80D0120000000000000000001000000:C350 01 00000000:00000000\n"
)


@pytest.fixture(scope="module")
def wd(load_script):
    return load_script(SCRIPT)


def test_established_reads_ipv4_and_ipv6_tables(wd, tmp_path):
    (tmp_path / "tcp").write_text(TCP)
    (tmp_path / "tcp6").write_text(TCP6)
    found = wd.established((str(tmp_path / "tcp"), str(tmp_path / "tcp6"), str(tmp_path / "missing")))
    # the listening socket (0A) and the TIME_WAIT one (06) are not connections in use
    assert found == {
        ("10.98.0.11", 41410): ("10.98.0.31", 2407),
        ("::ffff:10.98.0.11", 45056): ("10.98.0.32", 2407),  # v4-mapped peer, as the tunnel sees it
        ("::1", 8080): ("2001:db8::1", 50000),
    }


@pytest.fixture
def dog(wd, tmp_path, monkeypatch):
    conf = tmp_path / "stunnel.conf"
    conf.write_text("[openclb-keyclient]\nclient = yes\nconnect = 10.98.0.31:2407\nconnect = 10.98.0.32:2407\n")
    (tmp_path / "error.log").write_text("")
    answers = {}  # endpoint -> does it accept connections
    checked = []

    def reachable(endpoint, timeout):
        checked.append(endpoint)
        return answers.get(endpoint, True)

    monkeypatch.setattr(wd, "reachable", reachable)
    cfg = dict(wd.DEFAULTS, tunnel_config=str(conf), error_log=str(tmp_path / "error.log"), key_server_misses=2)
    dog = wd.Watchdog(cfg)
    dog.answers, dog.checked = answers, checked
    return dog


KS1, KS2 = ("10.98.0.31", 2407), ("10.98.0.32", 2407)


def test_a_key_server_in_use_that_stops_answering_is_lost_after_the_misses(dog):
    conns = {("10.98.0.21", 40001): KS1, ("10.98.0.21", 40002): KS1}
    assert dog.dead_key_server(conns) == (None, [], False)
    dog.answers[KS1] = False
    assert dog.dead_key_server(conns) == (None, [], True)  # one miss: look again before the probes
    reason, lost, pending = dog.dead_key_server(conns)
    assert "10.98.0.31:2407" in reason and sorted(lost) == sorted(conns) and not pending


def test_one_slow_answer_is_not_a_loss(dog):
    conns = {("10.98.0.21", 40001): KS1}
    dog.answers[KS1] = False
    assert dog.dead_key_server(conns)[2] is True
    dog.answers[KS1] = True
    assert dog.dead_key_server(conns) == (None, [], False)
    dog.answers[KS1] = False
    assert dog.dead_key_server(conns) == (None, [], True)  # the count started again


def test_key_servers_not_in_use_are_not_checked(dog):
    dog.answers[KS2] = False
    conns = {("10.98.0.21", 40001): KS1, ("10.98.0.21", 9000): ("203.0.113.10", 443)}
    for attempt in range(3):
        assert dog.dead_key_server(conns) == (None, [], False), attempt
    assert set(dog.checked) == {KS1}


def test_connections_an_upgrade_left_behind_do_not_count_again(dog):
    old = {("10.98.0.21", 40001): KS1}
    dog.answers[KS1] = False
    dog.dead_key_server(old)
    dog.blamed.update(dog.dead_key_server(old)[1])  # what step() does once the upgrade succeeded
    # the old workers' connections hang on; the new ones went to ks2
    now = {**old, ("10.98.0.21", 40005): KS2}
    for attempt in range(3):
        assert dog.dead_key_server(now) == (None, [], False), attempt
    # a new connection to ks1 (say it came back, then froze again) counts
    again = {**now, ("10.98.0.21", 40009): KS1}
    dog.dead_key_server(again)
    assert dog.dead_key_server(again)[0]
    # and once the old connections are gone they are forgotten
    dog.dead_key_server({})
    assert not dog.blamed


DEADLOCK = "import threading; lock = threading.Lock(); lock.acquire(); print('held', flush=True); lock.acquire()"


def test_a_worker_in_a_lock_wait_is_killed_after_the_delay_and_others_are_left_alone(wd, dog):
    # Real processes on the real kernel: one waits on a lock it holds itself (what a
    # frozen worker does), one sleeps, one waits for input.
    frozen = subprocess.Popen([sys.executable, "-c", DEADLOCK], stdout=subprocess.PIPE, text=True)
    sleeping = subprocess.Popen(["sleep", "30"])
    reading = subprocess.Popen(["cat"], stdin=subprocess.PIPE)
    try:
        assert frozen.stdout.readline() == "held\n"
        dog.cfg["frozen_worker_after"] = 0.3
        workers = [frozen.pid, sleeping.pid, reading.pid]
        deadline = time.monotonic() + 10
        while frozen.poll() is None and time.monotonic() < deadline:
            dog.kill_frozen_workers(workers)
            time.sleep(0.1)
        assert frozen.wait(5) == -signal.SIGKILL
        assert sleeping.poll() is None and reading.poll() is None
        assert not wd.in_lock_wait(sleeping.pid) and not wd.in_lock_wait(reading.pid)
    finally:
        for p in (frozen, sleeping, reading):
            p.kill()
            p.wait()


def test_a_lock_wait_must_last_at_every_look(wd, dog, monkeypatch):
    clock, waiting, killed = [0.0], set(), []
    monkeypatch.setattr(wd.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(wd, "in_lock_wait", lambda pid: pid in waiting)
    monkeypatch.setattr(wd.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    dog.cfg["frozen_worker_after"] = 2.0

    def look(at, *pids):
        clock[0] = at
        waiting.clear()
        waiting.update(pids)
        dog.kill_frozen_workers([101, 102])

    look(0.0, 101, 102)
    look(1.5, 101)  # 102 got the lock: a short wait, contention
    look(2.0, 101, 102)  # 102 waits again: its count starts again
    assert killed == [(101, signal.SIGKILL)]
    look(3.9, 102)
    assert killed == [(101, signal.SIGKILL)]
    look(4.0, 102)
    assert killed == [(101, signal.SIGKILL), (102, signal.SIGKILL)]


@pytest.mark.parametrize(("results", "expected", "pauses"), [
    ([False, False, True], True, [2.0, 4.0]),   # a failed key load, tried again after a doubling pause
    ([False, False, False], False, [2.0, 4.0]),  # three failures: the play fails, no pause after the last
    ([True], True, []),
])
def test_an_asked_upgrade_is_tried_again_after_a_failed_key_load(dog, tmp_path, results, expected, pauses):
    pid_file = tmp_path / "nginx.pid"
    pid_file.write_text(f"{os.getpid()}\n")  # read_pid wants a live process
    dog.cfg.update(pid_file=str(pid_file), min_restart_interval=2.0, max_backoff=8.0, upgrade_attempts=3)
    tried, slept = [], []

    def upgrade(master):
        tried.append(master)
        return results[len(tried) - 1]

    dog.upgrade = upgrade
    assert dog.upgrade_once_asked(sleep=slept.append) is expected
    assert tried == [os.getpid()] * len(results)
    assert slept == pauses


def test_an_asked_upgrade_without_nginx_fails_at_once(dog, tmp_path):
    dog.cfg["pid_file"] = str(tmp_path / "missing.pid")
    dog.upgrade = lambda master: pytest.fail("no master to upgrade")
    assert dog.upgrade_once_asked(sleep=lambda s: pytest.fail("no pause")) is False
