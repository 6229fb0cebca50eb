"""The L7 role against real nginx and real backends in network namespaces.

Run as root on a host with nginx, curl and openssl installed:
    .venv/bin/pytest -v tests/host/test_l7_node.py
The namespaces, processes and the temporary tree are removed afterwards
(OPENCLB_KEEP=1 keeps the tree for inspection).
"""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "l7_support"))

import lab as l7lab  # noqa: E402

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("nginx") or not shutil.which("curl"),
        reason="needs root, nginx and curl",
    ),
]

VIP = "203.0.113.10"
STREAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "l7_support", "stream.py")


@pytest.fixture(scope="module")
def lab():
    lab = l7lab.L7Lab()
    try:
        lab.setup()
        result = lab.converge()
        changed, failed = lab.recap(result)
        assert failed == 0, result.stdout[-4000:]
        lab.start_nginx()
        lab.start_healthd()
        yield lab
    finally:
        lab.teardown()


def backend_of(lab, url, *args):
    return lab.get_json(url, *args)["backend"]


def wait_state(lab, listener, backend, state, limit):
    """Seconds until healthd reports state for backend (or None after limit)."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        status = lab.healthd_status() or {"backends": []}
        for b in status["backends"]:
            if b["listener"] == listener and b["backend"] == backend and b["state"] == state:
                return time.monotonic() - start
        time.sleep(0.05)
    return None


def wait_routed(lab, url, backend, present, limit, *args):
    """Wait until nginx (after healthd's reload) does/doesn't pick backend."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        seen = {backend_of(lab, url, *args) for _try in range(6)}
        if (backend in seen) == present:
            return time.monotonic() - start
        time.sleep(0.1)
    return None


def stream(lab, url, *args):
    r = lab.client(sys.executable, STREAM, url, *args, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# ------------------------------------------------------------ idempotence


def test_second_run_and_check_mode_change_nothing(lab):
    changed, failed = lab.recap(lab.converge())
    assert (changed, failed) == (0, 0)
    changed, failed = lab.recap(lab.converge(check=True))
    assert (changed, failed) == (0, 0)


def test_check_mode_shows_the_diff_and_changes_nothing(lab):
    raw = l7lab.model_fixture.raw()
    raw["listeners"][0]["keepalive_timeout"] = 7
    model = l7lab.model_fixture.normalised(raw)
    live = os.path.realpath(lab.tmp + "/etc/nginx/current")
    result = lab.converge(model=model, check=True)
    changed, failed = lab.recap(result)
    assert failed == 0 and changed >= 1
    assert "keepalive_timeout 7s;" in result.stdout
    assert os.path.realpath(lab.tmp + "/etc/nginx/current") == live
    with open(live + "/listeners/web.conf", encoding="utf-8") as fh:
        assert "keepalive_timeout 15s;" in fh.read()


def nginx_workers(lab):
    master = lab.nginx_master_pid()
    with open(f"/proc/{master}/task/{master}/children", encoding="utf-8") as fh:
        return set(fh.read().split())


def test_a_reload_an_earlier_run_lost_is_made_up(lab):
    """A run that stopped after switching the tree (its reload or the reload's
    check failed) leaves the reload record behind: the next run reloads
    instead of reporting nothing to do while nginx runs the old tree."""
    record = lab.tmp + "/state/nginx-loaded"
    with open(record, encoding="utf-8") as fh:
        wanted = fh.read()
    assert re.fullmatch(r"\S+/[ab] [0-9a-f]{40}\n", wanted), wanted
    with open(record, "w", encoding="utf-8") as fh:
        fh.write(wanted.replace("/a ", "/b ") if "/a " in wanted else wanted.replace("/b ", "/a "))
    workers = nginx_workers(lab)
    result = lab.converge()
    changed, failed = lab.recap(result)
    assert failed == 0 and changed >= 1, result.stdout[-3000:]
    assert "does not run the live configuration" in result.stdout
    with open(record, encoding="utf-8") as fh:
        assert fh.read() == wanted
    for _attempt in range(50):  # the reload replaces the workers
        if not workers & nginx_workers(lab):
            break
        time.sleep(0.1)
    assert not workers & nginx_workers(lab), "nginx was not reloaded"
    assert lab.recap(lab.converge()) == (0, 0)


# ---------------------------------------------------------------- routing


@pytest.mark.parametrize(
    "host,path,group",
    [
        ("www.example.com", "/api/v1", {"be3"}),  # exact domain + path
        ("www.example.com", "/other", {"be1", "be2"}),  # exact domain, no path: default
        ("img.example.com", "/api", {"be4"}),  # wildcard domain
        ("a.b.example.com", "/", {"be4"}),  # wildcard, deeper name
        ("other.org", "/static/x.css", {"be4"}),  # path rule, any domain
        ("other.org", "/", {"be1", "be2"}),  # listener default
    ],
)
def test_domain_and_path_rules(lab, host, path, group):
    seen = {backend_of(lab, f"http://{VIP}{path}", "-H", "Host: " + host) for _try in range(6)}
    assert seen <= group
    if len(group) == 2:
        assert seen == group  # round robin reaches both


def test_headers_to_backends(lab):
    body = lab.get_json(f"http://{VIP}/", "-H", "X-Debug: secret", "-H", "X-Forwarded-For: 192.0.2.7")
    h = body["headers"]
    assert h["X-Forwarded-For"] == "192.0.2.7, " + l7lab.CLIENT_ADDR
    assert h["X-Real-IP"] == l7lab.CLIENT_ADDR
    assert h["X-Forwarded-Proto"] == "http"
    assert h["X-Openclb-Lb-Id"] == "lb-lab-0001"
    assert h["X-Openclb-Listener"] == "web"
    assert h["X-Forwarded-Port"] == "80"
    assert h["X-Client-Port"].isdigit()
    assert "X-Debug" not in h


def test_gzip_on_by_default(lab):
    r = lab.curl(f"http://{VIP}/big", "-H", "Accept-Encoding: gzip", "-o", "/dev/null", "-D", "-")
    assert re.search(r"(?im)^content-encoding: gzip", r.stdout), r.stdout


def test_request_timeout_gives_504(lab):
    start = time.monotonic()
    r = lab.curl(f"http://{VIP}/sleep?s=4", "-o", "/dev/null", "-w", "%{http_code}")
    took = time.monotonic() - start
    assert r.stdout == "504"
    assert took < 3.5  # request_timeout is 2 s on this listener


def test_redirect_to_https(lab):
    r = lab.curl(
        f"http://{VIP}:8000/x?y=1",
        "-H",
        "Host: www.example.com",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
    )
    assert r.stdout == "301 https://www.example.com/x?y=1"


def test_acl(lab):
    r = lab.curl(f"http://{VIP}:8090/", "-o", "/dev/null", "-w", "%{http_code}")
    assert r.stdout == "403"  # the client is on this listener's blacklist


def test_websocket_echo(lab):
    client = r"""
import base64, os, socket, sys
s = socket.create_connection(("203.0.113.10", 80), timeout=5)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(("GET /ws HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % key).encode())
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(1)
print(head.split(b"\r\n")[0].decode())
mask = os.urandom(4)
msg = b"hello over nginx"
s.sendall(bytes([0x81, 0x80 | len(msg)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(msg)))
frame = s.recv(2)
print(s.recv(frame[1]).decode())
"""
    r = lab.client(sys.executable, "-c", client, timeout=20)
    lines = r.stdout.splitlines()
    assert lines[0].startswith("HTTP/1.1 101"), r.stdout + r.stderr
    assert re.match(r"^be[12]: hello over nginx$", lines[1])


# -------------------------------------------------------------------- TLS


def s_client(lab, port, *args):
    return lab.client("openssl", "s_client", "-connect", f"{VIP}:{port}", *args, input="", timeout=20)


def test_tls_1_2_strict_offers_exactly_tls_1_2(lab):
    assert s_client(lab, 443, "-tls1_2").returncode == 0
    for flag in ("-tls1_1", "-tls1", "-tls1_3"):
        r = s_client(lab, 443, flag, "-cipher", "DEFAULT:@SECLEVEL=0")
        assert r.returncode != 0, flag
    # no non-forward-secret suite
    r = s_client(lab, 443, "-tls1_2", "-cipher", "AES128-GCM-SHA256")
    assert r.returncode != 0


def test_tls_1_0_policy_offers_1_0_to_1_2(lab):
    for flag in ("-tls1", "-tls1_1", "-tls1_2"):
        r = s_client(lab, 8443, flag, "-cipher", "DEFAULT:@SECLEVEL=0")
        assert r.returncode == 0, (flag, r.stdout[-500:], r.stderr[-500:])
    assert s_client(lab, 8443, "-tls1_3").returncode != 0


def test_sni_selects_the_certificate(lab):
    for name, cn in (
        ("www.example.com", "www.example.com"),
        ("api.example.net", "api.example.net"),
        ("unknown.example.org", "www.example.com"),
    ):
        r = s_client(lab, 443, "-servername", name)
        assert re.search(rf"subject=CN\s*=\s*{re.escape(cn)}", r.stdout), (name, r.stdout[:400])


def test_https_http2_via_alpn_and_proto_header(lab):
    r = lab.curl(
        "https://www.example.com/",
        "--http2",
        "--cacert",
        lab.certs + "/www.crt",
        "--resolve",
        "www.example.com:443:" + VIP,
        "-w",
        "\n%{http_version}",
    )
    body, version = r.stdout.rsplit("\n", 1)
    assert version == "2", r.stderr
    assert json.loads(body)["headers"]["X-Forwarded-Proto"] == "https"


def test_access_log_fields(lab):
    lab.curl("https://www.example.com/logged", "-k", "--resolve", "www.example.com:443:" + VIP)
    time.sleep(0.3)
    with open(lab.tmp + "/log/openclb-secure.access.log", encoding="utf-8") as fh:
        entries = [json.loads(line) for line in fh if "/logged" in line]
    e = entries[-1]
    assert e["client"] == l7lab.CLIENT_ADDR and e["status"] == 200
    assert e["tls_protocol"] == "TLSv1.2" and e["tls_cipher"].startswith("ECDHE-")
    assert e["listener"] == "secure" and float(e["upstream_response_time"]) >= 0
    assert e["request_time"] >= 0


def test_metrics_endpoints(lab):
    r = l7lab.sh("curl", "-s", "http://127.0.0.1:8081/nginx_status", ns=lab.lb)
    assert "Active connections:" in r.stdout
    r = l7lab.sh("curl", "-s", "http://127.0.0.1:9146/metrics", ns=lab.lb)
    assert re.search(
        r'openclb_backend_up\{listener="web",server_group="web",backend="be1",'
        r'address="10.99.0.21:8080"\} 1',
        r.stdout,
    ), r.stdout[:500]
    # not reachable from the client side
    assert lab.curl("http://198.51.100.1:8081/nginx_status", timeout=2).returncode != 0


# ------------------------------------------------------- cookie persistence


def body_of(result):
    """JSON body of a `curl -D -` answer (text mode turned CRLF into LF)."""
    return json.loads(re.split(r"\r?\n\r?\n", result.stdout, maxsplit=1)[1])


def cookies_of(response_headers):
    return dict(re.findall(r"(?im)^set-cookie: ([^=]+)=([^;\r\n]*)", response_headers))


def test_cookie_insert_sticks_and_fails_over(lab):
    url = f"http://{VIP}:8080/"
    r = lab.curl(url, "-D", "-")
    sid = cookies_of(r.stdout)["OPENCLB_SRV"]
    first = body_of(r)["backend"]
    assert "Max-Age=3600" in r.stdout
    seen = {backend_of(lab, url, "-b", "OPENCLB_SRV=" + sid) for _try in range(8)}
    assert seen == {first}
    other = ({"be1", "be2"} - {first}).pop()
    lab.set_health(first, 500)
    try:
        assert wait_state(lab, "sticky", first, "down", 6) is not None
        assert wait_routed(lab, url, first, False, 5, "-b", "OPENCLB_SRV=" + sid) is not None
        r = lab.curl(url, "-D", "-", "-b", "OPENCLB_SRV=" + sid)
        assert body_of(r)["backend"] == other
        moved = cookies_of(r.stdout)["OPENCLB_SRV"]
        assert moved != sid  # the cookie now names the backend that answered
    finally:
        lab.set_health(first, None)
    assert wait_state(lab, "sticky", first, "up", 6) is not None
    assert wait_routed(lab, url, first, True, 5, "-b", "OPENCLB_SRV=" + sid) is not None


def test_cookie_rewrite_follows_the_backend_cookie(lab):
    url = f"http://{VIP}:8081/"
    r = lab.curl(url, "-D", "-")
    assert "APPSESSION_openclb" not in r.stdout  # backend set no cookie: nothing added
    r = lab.curl(url + "?setcookie=APPSESSION", "-D", "-")
    cookies = cookies_of(r.stdout)
    owner = body_of(r)["backend"]
    assert cookies["APPSESSION"] == "session-of-" + owner  # the backend's own cookie is untouched
    route = "APPSESSION={}; APPSESSION_openclb={}".format(cookies["APPSESSION"], cookies["APPSESSION_openclb"])
    assert {backend_of(lab, url, "-b", route) for _try in range(8)} == {owner}


# ---------------------------------------------------------- active checks


def test_failed_http_check_takes_backend_out_in_time_and_back(lab):
    url = f"http://{VIP}/"
    # interval 1 s, unhealthy_threshold 2 -> out within 2 s (+1 interval)
    lab.set_health("be2", 503)
    try:
        took = wait_state(lab, "web", "be2", "down", 8)
        print(f"be2 failing its check: out after {took:.2f} s (limit 3 s)")
        assert took is not None and took <= 3.0, took
        assert wait_routed(lab, url, "be2", False, 3) is not None
        result = stream(lab, url, "--count", "200", "--seconds", "20")
        assert result["failed"] == 0 and set(result["backends"]) == {"be1"}, result
    finally:
        lab.set_health("be2", None)
    took = wait_state(lab, "web", "be2", "up", 8)
    print(f"be2 passing again: back after {took:.2f} s (limit 3 s)")
    assert took is not None and took <= 3.0, took
    assert wait_routed(lab, url, "be2", True, 3) is not None


def test_dead_backend_loses_no_request(lab):
    """Passive checks cover the detection window, active checks then keep it out."""
    url = f"http://{VIP}/"
    proc = lab.procs.pop("be-be1")
    os.killpg(proc.pid, 15)
    proc.wait(5)
    try:
        result = stream(lab, url, "--count", "600", "--seconds", "8", "--workers", "4")
        print("be1 killed, stream:", result)
        assert result["failed"] == 0, result
        assert wait_state(lab, "web", "be1", "down", 5) is not None
        assert set(stream(lab, url, "--count", "100")["backends"]) == {"be2"}
    finally:
        lab.start_backend("be1", l7lab.model_fixture.BACKENDS["be1"])
    assert wait_state(lab, "web", "be1", "up", 8) is not None


# ---------------------------------------------------------- config changes


def test_config_change_under_load_loses_no_request(lab):
    raw = l7lab.model_fixture.raw()
    raw["listeners"][0]["rules"].append({"path": "/new", "server_group": "api"})
    model = l7lab.model_fixture.normalised(raw)
    master = lab.nginx_master_pid()
    # one stream opens a connection per request, one reuses keep-alive ones
    loads = [
        subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                lab.cl,
                sys.executable,
                STREAM,
                f"http://{VIP}/",
                "--count",
                "100000",
                "--seconds",
                "45",
                "--workers",
                "2",
            ]
            + extra,
            stdout=subprocess.PIPE,
            text=True,
        )
        for extra in ([], ["--keepalive"])
    ]
    try:
        time.sleep(1)
        changed, failed = lab.recap(lab.converge(model=model))
        assert failed == 0 and changed > 0
        assert backend_of(lab, f"http://{VIP}/new") == "be3"
        changed, failed = lab.recap(lab.converge())  # and back
        assert failed == 0 and changed > 0
    finally:
        results = [json.loads(load.communicate(timeout=120)[0]) for load in loads]
    print("config change under load:", results)
    for result in results:
        assert result["ok"] > 100 and result["failed"] == 0, result
    assert lab.nginx_master_pid() == master  # reloaded, never restarted
    assert backend_of(lab, f"http://{VIP}/new") in {"be1", "be2"}


def test_rejected_config_keeps_the_old_one_running(lab):
    raw = l7lab.model_fixture.raw()
    broken = copy.deepcopy(next(li for li in raw["listeners"] if li["name"] == "secure"))
    broken.update(
        name="broken", port=9443, certificates=[{"name": "broken", "domains": ["b.example.com"], "key_store": "local"}]
    )
    raw["listeners"].append(broken)
    model = l7lab.model_fixture.normalised(raw)
    tls = dict(
        lab.tls,
        broken={
            "certificate": "-----BEGIN CERTIFICATE-----\nnot a cert\n-----END CERTIFICATE-----",
            "key": lab.tls["www"]["key"],
        },
    )
    live = os.readlink(lab.tmp + "/etc/nginx/current")
    master = lab.nginx_master_pid()
    result = lab.converge(model=model, tls=tls)
    changed, failed = lab.recap(result)
    assert failed == 1
    assert "nginx rejected the new configuration" in result.stdout
    assert "cannot load certificate" in result.stdout  # nginx's own words
    assert os.readlink(lab.tmp + "/etc/nginx/current") == live
    assert lab.nginx_master_pid() == master
    assert backend_of(lab, f"http://{VIP}/") in {"be1", "be2"}
    assert lab.curl(f"https://{VIP}:9443/", "-k", timeout=3).returncode != 0
