"""The L7 tier through the whole lab chain, with real clients.

    client1 (namespace) -> VIP 203.0.113.20 on the LVS tier (IPVS, DR)
        -> nginx on l7-1 / l7-2 -> backends be1 be2 be3 (internal network)

Runs against a converged lab (tests/lab/run.sh; or boot lvs1 l7-1 l7-2 ks1
ks2 be1 be2 be3 client1 and run site.yml). Listeners used (lab model,
inventories/lab/group_vars/all/openclb.yml): http-web :80 (domain and path
rules, cookie insert, HTTP check every 1 s, thresholds 2), http-rewrite
:8088 (cookie rewrite), https-web :443 (1_2_strict_with_1_3, RSA + ECDSA,
keys on the key servers), https-strict :8443 (1_2_strict), http-redirect
:8080.

For the duration of this module every backend's port 8080 is served by the
L7 test backend (tests/host/l7_support/backend.py: /health answers what
/run/openclb-l7test/<name>.health says, ?setcookie=NAME sets a cookie,
WebSocket echo), instead of the lab's plain test service, which does none of
that; the lab's service is put back afterwards. Skips only when lab hosts
are not running; a running lab that is wrong fails.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time

import pytest
from conftest import REPO, lab_model, playbook, recap_changed, require_hosts, write_vars

pytestmark = pytest.mark.lab

HOSTS = ["lvs1", "l7-1", "l7-2", "be1", "be2", "be3", "client1"]
L7_NODES = ["l7-1", "l7-2"]
BACKENDS = ["be1", "be2", "be3"]
VIP = "203.0.113.20"
CLIENT = "client1"
CLIENT_ADDR = "203.0.113.101"  # client1's first address: its source towards the VIP
STATE = "/run/openclb-l7test"
UNIT = "openclb-l7test-backend"
BACKEND_PY = REPO / "tests/host/l7_support/backend.py"
STREAM = REPO / "tests/host/l7_support/stream.py"
TLS_DIR = REPO / ".cache/tls/lab"  # playbooks/certificates.yml (lab: self-signed, each its own CA)
# http-web's health_check in the lab model
INTERVAL, UNHEALTHY, HEALTHY = 1, 2, 2


# --------------------------------------------------------------- helpers
def start_backend(lab, be):
    lab.run(be, f"systemd-run --quiet --collect --unit={UNIT} python3 {STATE}/backend.py {be} 0.0.0.0 8080 {STATE}")
    for _try in range(50):
        if lab.run(be, "curl -sf -m 1 -o /dev/null http://127.0.0.1:8080/health", check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"{be}: the test backend did not start: {lab.sh(be, f'journalctl -u {UNIT} -n 20', check=False)}")


def wait_state(lab, backend, state, limit, listener="http-web"):
    """Wait until openclb-healthd on every L7 node reports state; {node: last_change} (epoch s).

    Each node polls its own status endpoint (one ssh call per node, in parallel).
    """
    poll = (f"end=$(($(date +%s) + {int(limit)})); while [ $(date +%s) -le $end ]; do "
            "curl -sf -m 2 http://127.0.0.1:9146/status | "
            f"python3 -c {shlex.quote(STATE_OF)} {listener} {backend} {state} 2>/dev/null && exit 0; "
            "sleep 0.2; done; exit 1")
    procs = {node: lab.popen(node, poll) for node in L7_NODES}
    seen = {}
    for node, proc in procs.items():
        out, _err = proc.communicate(timeout=limit + 60)
        if proc.returncode == 0:
            last = out.split()[-1]
            seen[node] = None if last == "None" else float(last)
    if len(seen) != len(L7_NODES):
        raise AssertionError(f"{backend} not {state} on every L7 node after {limit} s: {seen}")
    return seen


# prints last_change and exits 0 when the backend has the state
STATE_OF = """
import json, sys
listener, backend, state = sys.argv[1:]
for b in json.load(sys.stdin)["backends"]:
    if b["listener"] == listener and b["backend"] == backend and b["state"] == state:
        print(b["last_change"])
        sys.exit(0)
sys.exit(1)
"""


def requests(lab, url, count, *curl_args):
    """count sequential curl requests from the client: [(status, backend)]."""
    one = shlex.join(["curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code} %header{x-backend}\\n",
                      *curl_args, url])
    out = lab.sh(CLIENT, f"for i in $(seq {count}); do {one}; done", timeout=30 + 6 * count)
    return [tuple((line.split() + ["-"])[:2]) for line in out.splitlines()]


def curl(lab, *args, timeout=30):
    return lab.run(CLIENT, ["curl", "-sS", "-m", "10", *args], timeout=timeout, check=False)


def headers_and_body(out):
    """`curl -D -` output (text mode: CRLF already LF) -> (header block, body)."""
    head, _sep, body = out.partition("\n\n")
    return head, body


def set_cookies(head):
    return dict(re.findall(r"(?im)^set-cookie: ([^=]+)=([^;\r\n]*)", head))


def nginx_pid(lab, node):
    return lab.sh(node, "systemctl show -P MainPID nginx").strip()


@pytest.fixture(scope="module")
def l7(lab):
    require_hosts(lab, HOSTS)
    for node in L7_NODES:  # nginx may be "reloading" (openclb-healthd): a bounded wait
        for _try in range(30):
            active = lab.sh(node, "systemctl is-active nginx openclb-healthd", check=False).split()
            if active == ["active", "active"]:
                break
            time.sleep(1)
        assert active == ["active", "active"], f"{node}: nginx, openclb-healthd: {active} (site.yml converged?)"
    code = BACKEND_PY.read_text()
    for be in BACKENDS:
        lab.run(be, f"mkdir -p {STATE} && cat > {STATE}/backend.py", stdin=code)
        lab.run(be, f"systemctl stop openclb-test-http@8080.service; systemctl stop {UNIT} 2>/dev/null; true")
        start_backend(lab, be)
    try:
        for be in BACKENDS:
            wait_state(lab, be, "up", 20)
        yield lab
    finally:
        for be in BACKENDS:
            lab.run(be, f"systemctl stop {UNIT}; rm -rf {STATE}; systemctl start openclb-test-http@8080.service",
                    check=False)


@pytest.fixture()
def cafile(tmp_path):
    """Both lab certificates (RSA and ECDSA; nginx picks by the client's signature algorithms)."""
    bundle = tmp_path / "lab-ca.pem"
    bundle.write_text("".join((TLS_DIR / f"{name}.crt").read_text() for name in ("lab-rsa", "lab-ecdsa")))
    return str(bundle)


# --------------------------------------------------------------- the nodes
def test_l7_nodes_run_the_listeners(l7):
    for node, addr in (("l7-1", "10.99.0.21"), ("l7-2", "10.99.0.22")):
        assert l7.sh(node, "systemctl is-enabled openclb-l7-vips").strip() == "enabled"
        assert f" {VIP}/32 " in l7.sh(node, "ip -o addr show dev lo")
        assert l7.sh(node, "sysctl -n net.ipv4.conf.all.arp_ignore net.ipv4.conf.all.arp_announce").split() == [
            "1", "2"]
        listening = l7.sh(node, "ss -Htln")
        for port in (80, 443, 8080, 8088, 8443):
            assert f"{VIP}:{port} " in listening, (node, port)
            assert f"{addr}:{port} " in listening, (node, port)  # the LVS tier's TCP check
        # one nginx master: a binary upgrade (the key-client watchdog's) that left the old
        # master running would keep serving its old configuration next to the new one
        masters = l7.sh(node, "pgrep -a -f '^nginx: master'", check=False).splitlines()
        if len(masters) != 1:
            # Seen once (CI run, 2026-11-27): keep what tells why for the next reader.
            ps = l7.sh(node, "ps -eo pid,ppid,stat,etimes,cmd | grep '[n]ginx'", check=False)
            journal = l7.sh(node, "journalctl -u openclb-keyclient-watchdog -n 20 --no-pager", check=False)
            pytest.fail(f"{node}: nginx masters {masters}\n{ps}\nwatchdog:\n{journal}")
        assert l7.sh(node, "readlink /etc/openclb/nginx/current").strip() in ("/etc/openclb/nginx/a",
                                                                              "/etc/openclb/nginx/b")
        # the lab's HTTPS keys live on the key servers only
        assert l7.run(node, "ls /etc/openclb/tls/private/lab-rsa.key", check=False).returncode != 0
        metrics = l7.sh(node, "curl -sf http://127.0.0.1:9146/metrics")
        assert re.search(r'openclb_backend_up\{listener="http-web",server_group="web",backend="be1",'
                         r'address="10.99.0.41:8080"\} 1', metrics), metrics[:600]
        assert "Active connections" in l7.sh(node, "curl -sf http://127.0.0.1:8081/nginx_status")


def test_lvs_tier_sends_the_vip_to_both_l7_nodes(l7):
    table = l7.sh("lvs1", f"ipvsadm -Ln -t {VIP}:80", check=False) + l7.sh("lvs2", f"ipvsadm -Ln -t {VIP}:80",
                                                                          check=False)
    assert "10.99.0.21:80" in table and "10.99.0.22:80" in table, table
    # mh maps flows by source port too: new connections reach both nodes
    before = {n: int(l7.sh(n, "wc -l < /var/log/nginx/openclb-http-web.access.log")) for n in L7_NODES}
    answers = requests(l7, f"http://{VIP}/", 20)
    assert all(code == "200" for code, _be in answers), answers
    grew = [n for n in L7_NODES if int(l7.sh(n, "wc -l < /var/log/nginx/openclb-http-web.access.log")) > before[n]]
    assert grew == L7_NODES, f"20 connections all went to {grew}"


# --------------------------------------------------------------- routing
@pytest.mark.parametrize(
    "host,path,group",
    [
        ("api.lab.example", "/", {"be3"}),  # exact domain
        ("api.lab.example", "/static/a.css", {"be3"}),  # exact beats *.lab.example's /static
        ("www.lab.example", "/static/a.css", {"be1", "be2"}),  # wildcard domain + path
        ("a.b.lab.example", "/static", {"be1", "be2"}),  # wildcard, deeper name
        ("www.lab.example", "/api/x", {"be1", "be2", "be3"}),  # a domain's rules only: listener default
        ("other.example", "/api/x", {"be3"}),  # domain-less path rule
        ("other.example", "/api/v2/x", {"be1", "be2"}),  # longest prefix: /api/v2 before /api
        ("other.example", "/", {"be1", "be2", "be3"}),  # listener default (web, weights 1:2:3)
    ],
)
def test_domain_and_path_rules_pick_the_server_group(l7, host, path, group):
    answers = requests(l7, f"http://{VIP}{path}", 12, "-H", f"Host: {host}")
    assert all(code == "200" for code, _be in answers), answers
    seen = {be for _code, be in answers}
    assert seen <= group, (host, path, answers)
    if len(group) > 1:
        assert len(seen) >= 2, f"{host}{path}: 12 requests all on {seen}"


def test_backends_see_the_client_address(l7):
    out = curl(l7, "-H", "Host: www.lab.example", "-H", "X-Forwarded-For: 192.0.2.7",
               "--interface", "203.0.113.102", f"http://{VIP}/echo").stdout
    h = json.loads(out)["headers"]
    assert h["X-Forwarded-For"] == "192.0.2.7, 203.0.113.102"  # DR: nginx sees the client itself
    assert h["X-Real-IP"] == "203.0.113.102"
    assert h["X-Forwarded-Proto"] == "http"
    assert h["X-Openclb-Listener"] == "http-web" and h["X-Forwarded-Port"] == "80"
    assert h["X-Openclb-Lb-Id"] == "lb-lab-0001"
    log = "\n".join(l7.sh(n, "tail -n 50 /var/log/nginx/openclb-http-web.access.log") for n in L7_NODES)
    assert any(json.loads(line).get("client") == "203.0.113.102" for line in log.splitlines() if line), log[-800:]


# --------------------------------------------------------------- cookies
@pytest.mark.parametrize("port,kind", [(80, "insert"), (8088, "rewrite")])
def test_cookie_keeps_a_client_on_one_backend_and_fails_over(l7, tmp_path, port, kind):
    url = f"http://{VIP}:{port}/echo?setcookie=APPSESSION"  # rewrite: the backend sets APPSESSION
    jar = str(tmp_path / "jar")  # the client keeps its cookies like a browser
    if kind == "rewrite":
        head, _body = headers_and_body(curl(l7, "-D", "-", f"http://{VIP}:{port}/echo").stdout)
        assert "APPSESSION" not in head, "no backend cookie, so no companion cookie"
    head, body = headers_and_body(curl(l7, "-D", "-", "-c", jar, url).stdout)
    owner = json.loads(body)["backend"]
    cookies = set_cookies(head)
    if kind == "insert":
        assert re.search(r"(?im)^set-cookie: OPENCLB_SRV=[0-9a-f]{12}; Max-Age=600; Path=/; HttpOnly", head), head
    else:
        assert cookies["APPSESSION"] == f"session-of-{owner}"  # the backend's cookie, untouched
        assert re.fullmatch(r"[0-9a-f]{12}", cookies["APPSESSION_openclb"]), head
    answers = requests(l7, url, 10, "-b", jar, "-c", jar)
    assert answers == [("200", owner)] * 10, f"cookie {kind}: not sticky to {owner}: {answers}"

    l7.sh(owner, f"systemctl stop {UNIT}")
    try:
        early = requests(l7, url, 4, "-b", jar, "-c", jar)  # passive checks cover the detection window
        wait_state(l7, owner, "down", 10, listener="http-web" if port == 80 else "http-rewrite")
        after = requests(l7, url, 10, "-b", jar, "-c", jar)
    finally:
        start_backend(l7, owner)
    print(f"\ncookie {kind}: sticky on {owner}; {owner} stopped: before the check noticed {early}, after {after}")
    assert all(code == "200" and be != owner for code, be in early + after), early + after
    moved = {be for _code, be in after}
    assert len(moved) == 1, f"after the failover the session should stick to one backend: {after}"
    wait_state(l7, owner, "up", 10)


# --------------------------------------------------------------- health checks
def test_failed_http_check_takes_the_backend_out_in_time_and_back(l7, tmp_path):
    """be2's /health answers 503: out within interval x unhealthy (+1 interval), no client sees an error."""
    bound_out = INTERVAL * UNHEALTHY + INTERVAL
    bound_in = INTERVAL * HEALTHY + INTERVAL
    stop = tmp_path / "stop"
    load = l7.popen(CLIENT, [sys.executable, str(STREAM), f"http://{VIP}/", "--count", "100000", "--seconds", "90",
                             "--workers", "2", "--stop-file", str(stop)])
    try:
        time.sleep(1)
        failed_at = float(l7.sh("be2", f"date +%s.%N; echo 503 > {STATE}/be2.health").split()[0])
        out = wait_state(l7, "be2", "down", 10)
        took_out = max(out.values()) - failed_at
        # healthd then reloads nginx (debounce 1 s; a reload takes seconds on a loaded
        # 2-core machine): wait until no answer comes from be2
        # Three clean batches in a row: one batch of 12 can miss be2 by chance
        # while the second L7 node has not reloaded yet (seen once, 2026-11-27).
        deadline, clean = time.monotonic() + 30, 0
        while clean < 3:
            clean = 0 if "be2" in {be for _c, be in requests(l7, f"http://{VIP}/", 12)} else clean + 1
            assert time.monotonic() < deadline, "be2 still answers 30 s after healthd took it out"
        gone_at = time.time()
        answers = requests(l7, f"http://{VIP}/", 30)
        fixed_at = float(l7.sh("be2", f"date +%s.%N; rm -f {STATE}/be2.health").split()[0])
        back = wait_state(l7, "be2", "up", 10)
        took_in = max(back.values()) - fixed_at
        deadline = time.monotonic() + 30
        while "be2" not in {be for _c, be in requests(l7, f"http://{VIP}/", 12)}:
            assert time.monotonic() < deadline, "be2 does not answer 30 s after healthd put it back"
    finally:
        l7.run("be2", f"rm -f {STATE}/be2.health", check=False)
        stop.touch()
        result = json.loads(load.communicate(timeout=120)[0])
    print(f"\nbe2 failing its HTTP check: down on both L7 nodes after {took_out:.2f} s "
          f"(bound {bound_out} s = interval {INTERVAL} x unhealthy {UNHEALTHY} + 1 interval), "
          f"out of nginx after {gone_at - failed_at:.2f} s (+ debounce and reload); "
          f"passing again: up after {took_in:.2f} s (bound {bound_in} s)\nstream throughout: {result}")
    assert took_out <= bound_out + 0.5, took_out
    assert took_in <= bound_in + 0.5, took_in
    assert all(code == "200" and be != "be2" for code, be in answers), answers
    assert result["failed"] == 0 and result["ok"] > 100, result


# --------------------------------------------------------------- TLS, h2, redirect, WebSocket
def s_client(l7, port, *args):
    cmd = shlex.join(["openssl", "s_client", "-connect", f"{VIP}:{port}", "-servername", "lab.example", *args])
    return l7.run(CLIENT, f"{cmd} </dev/null", check=False, timeout=30)


@pytest.mark.parametrize(
    "port,accepted,refused",
    [
        (443, ["-tls1_2", "-tls1_3"], ["-tls1", "-tls1_1"]),  # tls_cipher_policy_1_2_strict_with_1_3
        (8443, ["-tls1_2"], ["-tls1", "-tls1_1", "-tls1_3"]),  # tls_cipher_policy_1_2_strict
    ],
)
def test_tls_policy_offers_exactly_its_versions(l7, cafile, port, accepted, refused):
    require_hosts(l7, ["ks1"])
    for flag in accepted:
        r = s_client(l7, port, flag, "-CAfile", cafile, "-verify_return_error")
        assert r.returncode == 0, (port, flag, r.stdout[-600:], r.stderr[-600:])
        assert "Verify return code: 0 (ok)" in r.stdout
    for flag in refused:  # the client allows everything (security level 0): the server refuses
        r = s_client(l7, port, flag, "-cipher", "DEFAULT:@SECLEVEL=0")
        assert r.returncode != 0, (port, flag, r.stdout[-600:])
    if port == 8443:  # strict: forward-secret AEAD suites only
        assert s_client(l7, port, "-tls1_2", "-cipher", "AES128-GCM-SHA256").returncode != 0
        assert s_client(l7, port, "-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA256").returncode != 0
        assert s_client(l7, port, "-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256").returncode == 0


def test_https_http2_via_alpn_and_client_address(l7):
    require_hosts(l7, ["ks1"])
    # -k: the chain is verified by the s_client tests; the lab certificates carry no names (see below)
    r = curl(l7, "-k", "--http2", "--resolve", f"www.lab.example:443:{VIP}", "-w", "\n%{http_version}",
             "https://www.lab.example/echo")
    body, version = r.stdout.rsplit("\n", 1)
    assert r.returncode == 0 and version == "2", r.stderr  # h2 negotiated with ALPN
    h = json.loads(body)["headers"]
    assert h["X-Forwarded-Proto"] == "https" and h["X-Forwarded-For"] == CLIENT_ADDR
    assert h["X-Openclb-Listener"] == "https-web"


def test_https_certificate_names_verify(l7, cafile):
    require_hosts(l7, ["ks1"])
    r = curl(l7, "--cacert", cafile, "--resolve", f"www.lab.example:443:{VIP}", "-o", "/dev/null",
             "https://www.lab.example/")
    assert r.returncode == 0, r.stderr


def test_http_redirects_to_https(l7):
    require_hosts(l7, ["ks1"])
    r = curl(l7, "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", "-H", "Host: lab.example",
             f"http://{VIP}:8080/x?y=1")
    assert r.stdout == "301 https://lab.example/x?y=1", r.stdout
    r = curl(l7, "-L", "-k", "--resolve", f"lab.example:8080:{VIP}", "--resolve",
             f"lab.example:443:{VIP}", "-w", "\n%{http_code} %{num_redirects}", "http://lab.example:8080/echo")
    body, tail = r.stdout.rsplit("\n", 1)
    assert tail == "200 1", (tail, r.stderr)
    assert json.loads(body)["headers"]["X-Forwarded-Proto"] == "https"


WS_CLIENT = r"""
import base64, os, socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=5)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(("GET /ws HTTP/1.1\r\nHost: www.lab.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: " + key + "\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(1)
print(head.split(b"\r\n")[0].decode())
for msg in (b"hello through lvs and nginx", b"second frame"):
    mask = os.urandom(4)
    s.sendall(bytes([0x81, 0x80 | len(msg)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(msg)))
    frame = s.recv(2)
    print(s.recv(frame[1]).decode())
"""


def test_websocket_echo_through_the_chain(l7):
    r = l7.run(CLIENT, ["python3", "-c", WS_CLIENT, VIP], check=False, timeout=30)
    lines = r.stdout.splitlines()
    assert lines and lines[0].startswith("HTTP/1.1 101"), r.stdout + r.stderr
    assert re.fullmatch(r"be[123]: hello through lvs and nginx", lines[1]), lines
    assert lines[2] == lines[1].split(":")[0] + ": second frame", lines


# --------------------------------------------------------------- config change
@pytest.mark.slow
def test_config_change_under_load_loses_no_request(l7, tmp_path):
    """A rule added and removed again with playbooks/l7.yml, under two bounded request streams."""
    model = lab_model()
    web = next(li for li in model["openclb_listeners"] if li["name"] == "http-web")
    web["rules"].append({"path": "/new", "server_group": "api"})
    extra = write_vars(tmp_path, model)
    assert {be for _c, be in requests(l7, f"http://{VIP}/new", 12)} != {"be3"}
    pids = {n: nginx_pid(l7, n) for n in L7_NODES}
    stop = tmp_path / "stop"
    # one stream opens a connection per request, one reuses keep-alive connections;
    # they stop at the stop file, 1800 s at the latest (two l7.yml runs under
    # this load took 548 + 562 s on 2026-11-27: a 900 s bound ended them early)
    loads = [l7.popen(CLIENT, [sys.executable, str(STREAM), f"http://{VIP}/", "--count", "10000000", "--seconds",
                               "1800", "--workers", "1", "--stop-file", str(stop), *extra_args])
             for extra_args in ([], ["--keepalive"])]
    try:
        t0 = time.monotonic()
        rc, out = playbook("playbooks/l7.yml", "-e", extra)
        assert rc == 0, out[-3000:]
        changed = recap_changed(out)
        assert all(changed.get(n, 0) > 0 for n in L7_NODES), changed
        assert {be for _c, be in requests(l7, f"http://{VIP}/new", 12)} == {"be3"}
        applied = time.monotonic() - t0
        rc, out = playbook("playbooks/l7.yml")  # the lab model again
        assert rc == 0, out[-3000:]
        assert {be for _c, be in requests(l7, f"http://{VIP}/new", 12)} != {"be3"}
    finally:
        stop.touch()
        results = [json.loads(p.communicate(timeout=120)[0]) for p in loads]
    print(f"\nrule added ({applied:.0f} s) and removed again ({time.monotonic() - t0:.0f} s in all) under load: "
          f"new connections {results[0]}, keep-alive {results[1]}")
    for result in results:
        assert result["failed"] == 0 and result["ok"] > 50, result
    assert {n: nginx_pid(l7, n) for n in L7_NODES} == pids, "nginx was restarted, not reloaded"


def test_rejected_config_fails_the_play_and_keeps_the_old_one(l7, tmp_path):
    """An https listener whose key is not its certificate's: the play fails before any host changes.

    An EC key next to an RSA certificate: nginx -t passes it (OpenSSL files
    a key of another type in a slot of its own; found 2026-11-27) and only
    handshakes would fail, so the role compares public keys on the
    controller. nginx -t's own refusal is tested on the host
    (tests/host/test_l7_node.py)."""
    model = lab_model()
    model["openclb_listeners"].append({
        "name": "https-broken", "protocol": "https", "vip": VIP, "port": 9443, "server_group": "web-even",
        "certificates": [{"name": "broken", "domains": ["broken.lab.example"], "key_store": "local"}]})
    material = tmp_path / "tls"
    material.mkdir()
    for f in TLS_DIR.iterdir():
        if f.suffix == ".crt" or f.name == "session-ticket.key":
            (material / f.name).write_bytes(f.read_bytes())
    (material / "broken.crt").write_bytes((TLS_DIR / "lab-rsa.crt").read_bytes())
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-out", str(material / "broken.key")], check=True, capture_output=True, timeout=30)
    extra = tmp_path / "model.json"
    extra.write_text(json.dumps({"openclb_server_groups": model["openclb_server_groups"],
                                 "openclb_listeners": model["openclb_listeners"],
                                 "openclb_tls_material_dir": str(material)}))
    live = {n: l7.sh(n, "readlink /etc/openclb/nginx/current").strip() for n in L7_NODES}
    pids = {n: nginx_pid(l7, n) for n in L7_NODES}
    rc, out = playbook("playbooks/l7.yml", "-e", f"@{extra}")
    assert rc != 0, out[-3000:]
    changed = recap_changed(out)
    assert changed and not any(changed.values()), out[-3000:]  # the recap: no host changed
    assert "broken.key: the private key (EC secp256r1) is not the certificate's (RSA 2048)" in out, out[-3000:]
    for n in L7_NODES:  # refused before any host changed: not even the certificate was copied
        assert l7.run(n, "test -e /etc/openclb/tls/broken.crt", check=False).returncode != 0
    assert {n: l7.sh(n, "readlink /etc/openclb/nginx/current").strip() for n in L7_NODES} == live
    assert {n: nginx_pid(l7, n) for n in L7_NODES} == pids
    assert "9443" not in l7.sh("l7-1", "ss -Htln")
    answers = requests(l7, f"http://{VIP}/", 6)
    assert all(code == "200" for code, _be in answers), answers
