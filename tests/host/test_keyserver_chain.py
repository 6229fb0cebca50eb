"""The whole key-server chain, for real, in network namespaces (see kschain.py).

Failure tests restore the chain (both key servers up) before they end, so they
can run in any order within the module.
"""
import json
import os
import re
import subprocess
import time

import kschain
import pytest
from ksload import recovery


def both_up(chain):
    for ks in ("ks1", "ks2"):
        if ks + "-stunnel" not in chain.procs:
            chain.start_keyserver(ks)
    # The watchdog recovers the workers once a key server answers again.
    for _ in range(40):
        if all(chain.handshake(n)["ok"] == 1 for n in ("rsa-ks", "ec-ks")):
            return
        time.sleep(0.25)
    raise AssertionError("chain did not recover after the key servers came back")


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
@pytest.mark.parametrize("listener", ["rsa-ks", "ec-ks", "rsa-local", "ec-local"])
def test_handshake(chain, listener, tls):
    report = chain.handshake(listener, tls=tls)
    assert report["ok"] == 1, report["errors"]


def test_served_key_is_the_token_key(chain):
    # The certificate nginx presents matches the key held on the token.
    out = chain.nsexec("cl", "openssl", "s_client", "-connect", f"{chain.addr('cl', 'l7')}:8443",
                       input="", timeout=10).stdout
    pem = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", out, re.DOTALL).group(0)
    spki = subprocess.run(["openssl", "x509", "-pubkey", "-noout"], input=pem.encode(), capture_output=True,
                          check=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=spki, capture_output=True,
                         check=True).stdout
    import hashlib
    objects = chain.keystore("ks1", "list", {"pin": kschain.PIN})["objects"]
    assert hashlib.sha256(der).hexdigest() in {o["fingerprint"] for o in objects}


def test_keys_are_sensitive_and_not_extractable(chain):
    for ks in ("ks1", "ks2"):
        objects = chain.keystore(ks, "list", {"pin": kschain.PIN})["objects"]
        assert {o["name"] for o in objects} == {"www-rsa", "www-ec"}
        for o in objects:
            assert o["sensitive"] and not o["extractable"], o
    # The same keys on both servers (what failover relies on).
    fps = [{o["name"]: o["fingerprint"] for o in chain.keystore(ks, "list", {"pin": kschain.PIN})["objects"]}
           for ks in ("ks1", "ks2")]
    assert fps[0] == fps[1]
    # No PEM copy of an HTTPS key on the key server outside the token (node.key is its own TLS key).
    for root, _, files in os.walk(os.path.join(chain.dir, "ks1")):
        for f in files:
            path = os.path.join(root, f)
            if f == "node.key" or not os.path.isfile(path):
                continue
            with open(path, "rb") as fh:
                assert b"PRIVATE KEY-----" not in fh.read(), f


def test_keystore_is_idempotent_and_refuses_a_different_key(chain):
    again = chain.import_key("ks1", "www-rsa", chain.pki.path("www-rsa.key"))
    assert again["changed"] is False
    clash = chain.keystore("ks1", "ensure-key", {"pin": kschain.PIN, "name": "www-rsa",
                                                 "private_key": open(chain.pki.path("www-ec.key")).read()},
                           check=False)
    assert clash.get("failed") and "rotate" in clash["msg"]


def tunnel_client_lists_token(chain, cert):
    """Start a second tunnel client with `cert` (None: no client cert) and ask for the token list."""
    d = os.path.join(chain.dir, "probe-" + (cert or "none"))
    os.makedirs(d, exist_ok=True)
    sock = os.path.join(d, "p11.sock")
    lines = ["foreground = yes", "pid =", "[probe]", "client = yes", "accept = " + sock,
             f"connect = {chain.addr('ks1', 'peer')}:{kschain.PORT}", "CAfile = " + chain.pki.path("cluster-ca.crt"),
             "verifyChain = yes", "sslVersionMin = TLSv1.3"]
    if cert:
        lines += ["cert = " + chain.pki.path(cert + ".crt"), "key = " + chain.pki.path(cert + ".key")]
    with open(os.path.join(d, "stunnel.conf"), "w") as f:
        f.write("\n".join(lines) + "\n")
    key = "probe-" + (cert or "none")
    chain.spawn(key, "l7", ["stunnel4", os.path.join(d, "stunnel.conf")])
    try:
        chain.wait_for("probe socket", lambda: os.path.exists(sock))
        out = chain.nsexec("l7", "pkcs11-tool", "--module", kschain.P11KIT_CLIENT, "-L", check=False, timeout=20,
                           env=dict(os.environ, P11_KIT_SERVER_ADDRESS="unix:path=" + sock))
        return kschain.TOKEN in out.stdout
    finally:
        chain.stop(key)


@pytest.mark.parametrize("cert,allowed", [("l7-1", True), ("l7-foreign", False), (None, False),
                                          ("l7-revoked", False)])
def test_tunnel_requires_a_valid_cluster_client_certificate(chain, cert, allowed):
    assert tunnel_client_lists_token(chain, cert) is allowed


def test_firewall_admits_only_l7_nodes(chain):
    # From the key server's own address (not an L7 node) the port is dropped.
    assert not chain.port_open("ks1", chain.addr("ks1", "peer"), kschain.PORT)
    assert chain.port_open("l7", chain.addr("ks1", "peer"), kschain.PORT)


def test_one_key_server_stopped_under_load(chain):
    try:
        load = chain.load_async("rsa-ks", 8, concurrency=2)
        time.sleep(2.0)
        event = time.time()
        chain.stop_keyserver("ks1")  # the preferred one: every connection is on it
        report = json.loads(load.communicate(timeout=60)[0])
        rec = recovery(report, event)
        print(f"\n[stop ks1] handshakes ok={report['ok']} failed={report['failed']}, recovered {rec:.2f} s"
              " after the stop (watchdog, no manual restart)")
        assert rec < 5.0
        tail = [e for e in report["timeline"] if e[0] > event - report["start_epoch"] + rec]
        assert tail and all(e[1] for e in tail)
    finally:
        both_up(chain)


def test_blackholed_key_server_does_not_freeze_workers(chain):
    victim = None
    try:
        load = chain.load_async("ec-ks", 14, concurrency=2, timeout=3.0)
        time.sleep(2.0)
        active = chain.active_keyservers()
        assert len(active) == 1, active
        victim = active[0]
        event = time.time()
        chain.blackhole(victim)
        report = json.loads(load.communicate(timeout=60)[0])
        rec = recovery(report, event)
        print(f"\n[blackhole {victim}] handshakes ok={report['ok']} failed={report['failed']}"
              f" errors={report['errors']}, handshakes started {rec:.2f} s after the blackhole or later all succeeded")
        assert rec < 6.0
        stuck = [p for p in chain.nsexec("l7", "ps", "-eo", "pid,cmd").stdout.splitlines() if "shutting down" in p]
        print(f"[blackhole] old workers still present after the load: {len(stuck)}")
        assert not stuck, "old workers blocked on the dead key server were not killed"
    finally:
        if victim:
            chain.blackhole(victim, on=False)
        both_up(chain)


def test_both_key_servers_down(chain):
    try:
        # Clients wait up to 10 s, as in the lab: a hang shows as a slow failure.
        full = chain.load_async("ec-ks", 10, concurrency=2, timeout=10.0)
        resumed = chain.load_async("rsa-ks", 10, concurrency=1, resume=True, timeout=10.0)
        time.sleep(1.5)
        down = time.time()
        chain.stop_keyserver("ks1")
        chain.stop_keyserver("ks2")
        time.sleep(4.0)
        back = time.time()
        chain.start_keyserver("ks2")
        f = json.loads(full.communicate(timeout=60)[0])
        r = json.loads(resumed.communicate(timeout=60)[0])

        def while_down(report):
            """Handshakes started once both were gone and before ks2 was started again.
            One already waiting on a key operation when its key server was killed may
            fail either way."""
            down_at, back_at = down - report["start_epoch"], back - report["start_epoch"]
            return [e for e in report["timeline"] if down_at + 0.5 <= e[0] < back_at]

        new = while_down(f)
        new_failed = [e for e in new if not e[1]]
        rec_full, rec_resumed = recovery(f, back), recovery(r, back)
        with open(chain.log_path("watchdog")) as log:
            frozen = [line.strip() for line in log if "frozen" in line]
        print(f"\n[both down] full handshakes ok={f['ok']} failed={f['failed']} errors={f['errors']};"
              f" while down: {len(new_failed)} of {len(new)} failed, slowest failure"
              f" {max((e[2] for e in new_failed), default=0):.3f} s;"
              f" resumed ok={r['ok']} failed={r['failed']} errors={r['errors']}")
        print(f"[both down] after ks2 came back: every handshake started {rec_full:.2f} s (full) /"
              f" {rec_resumed:.2f} s (resumed) later or more succeeded; frozen workers killed: {frozen}")
        # While both are down, every new full handshake gets a TLS alert, promptly:
        # no hang until the client's timeout.
        assert new_failed and all(e[3].startswith("tls:") for e in new_failed), f["errors"]
        assert len(new_failed) == len(new), "a full handshake succeeded with no key server"
        assert max(e[2] for e in new_failed) < 1.0
        # Resumed sessions never need the key server (the same in-flight allowance:
        # a worker busy with a key operation at the kill serves its queue late).
        assert not [e for e in while_down(r) if not e[1]], r["errors"]
        assert r["resumed"] >= r["ok"] - 1
        # Recovery once ks2 is back, without a manual restart. A new worker that froze
        # on its first key operation (libp11, see the watchdog) costs the connections
        # it had accepted; the watchdog kills it within frozen_worker_after.
        assert rec_full < 5.0 and rec_resumed < 5.0
        assert f["timeline"][-1][1] and r["timeline"][-1][1], "still failing at the end"
    finally:
        both_up(chain)


def test_rotation_under_load(chain):
    """New key as a new token object, nginx switched by reload, old object removed: 0 failures."""
    chain.pki.https("www-rsa-2", "rsa")
    load = chain.load_async("rsa-ks", 8, concurrency=2)
    time.sleep(1.0)
    for ks in ("ks1", "ks2"):
        assert chain.import_key(ks, "www-rsa-2", chain.pki.path("www-rsa-2.key"))["changed"]
    certs = {n: c for n, (_, c, _) in kschain.LISTENERS.items()}
    certs["rsa-ks"] = "www-rsa-2"
    chain.write_nginx_conf(certs)
    chain.nginx("-t")
    chain.nginx("-s", "reload")
    # Remove the old object only after the old workers have finished.
    chain.wait_for("old workers to exit", lambda: "shutting down" not in chain.nsexec("l7", "ps", "-eo", "cmd").stdout,
                   timeout=20)
    time.sleep(1.0)
    for ks in ("ks1", "ks2"):
        # www-rsa is still used by the rsa-local listener's file, never by the token again.
        chain.keystore(ks, "remove", {"pin": kschain.PIN, "name": "www-rsa"})
    report = json.loads(load.communicate(timeout=60)[0])
    print(f"\n[rotation] handshakes during rotation ok={report['ok']} failed={report['failed']}")
    assert report["failed"] == 0, report["errors"]
    assert chain.handshake("rsa-ks")["ok"] == 1
    names = {o["name"] for o in chain.keystore("ks1", "list", {"pin": kschain.PIN})["objects"]}
    assert names == {"www-rsa-2", "www-ec"}


def test_drained_key_server_stops_without_a_failed_handshake(chain):
    """Planned maintenance: drain (tunnel reload + binary upgrade), then stop: 0 failures."""
    both_up(chain)
    victim = "ks1"  # the preferred one (failover prio): new connections go there
    try:
        # Clients wait up to 10 s, as in the lab tests: the binary upgrade
        # holds new connections in the backlog while the new master loads
        # its keys (a delay, not a failure; the slowest is printed). At 3 s
        # one handshake in 4,210 timed out on a quiet CI host.
        load = chain.load_async("rsa-ks", 8, concurrency=2, timeout=10.0)
        time.sleep(1.0)
        # What `keyclient_drain: [victim]` makes the keyclient role do.
        chain.render_l7(drain=[victim])
        chain.reload_tunnel()
        chain.upgrade_nginx()
        chain.wait_for("old master to exit", lambda: chain.active_keyservers() == ["ks2"])
        chain.stop_keyserver(victim)
        report = json.loads(load.communicate(timeout=60)[0])
        slowest = max((e[2] for e in report["timeline"] if e[1]), default=0.0)
        print(f"\n[drain {victim}, then stop it] handshakes ok={report['ok']} failed={report['failed']}, "
              f"p99 {report['p99_ms']:.0f} ms, slowest {slowest:.2f} s")
        assert report["failed"] == 0, report["errors"]
    finally:
        chain.render_l7()
        chain.reload_tunnel()
        both_up(chain)
