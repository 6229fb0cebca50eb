"""The L7 role on lab guests (systemd, real units), and the path through LVS.

Needs a lab with the L7 nodes up (`openclb-lab up`, or at least
`openclb-lab up l7-1 be1`); OPENCLB_LAB_NAME selects the lab. The module
converges playbooks/validate.yml + playbooks/l7.yml on l7_nodes itself (with
test certificates made here) and starts a small HTTP server on be1:8080 if
nothing answers there. Checks through the LVS tier run only when the LVS
nodes are up.
"""

import json
import os
import shutil
import subprocess
import tempfile

import pytest

pytestmark = pytest.mark.lab

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
VENV = os.environ.get("OPENCLB_VENV", os.path.join(REPO, ".venv"))
if not os.path.exists(VENV):
    VENV = "/work/main/.venv"
LAB = os.path.join(VENV, "bin", "openclb-lab")
VIP = "203.0.113.20"

BACKEND = r"""
import http.server, json, socket
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = json.dumps({"backend": socket.gethostname(), "headers": dict(self.headers)}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Backend", socket.gethostname()); self.end_headers(); self.wfile.write(body)
    do_HEAD = do_GET
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""


def lab(*args, check=True, timeout=120):
    return subprocess.run([LAB, *args], capture_output=True, text=True, check=check, timeout=timeout)


def on(host, *cmd, check=False, timeout=60):
    return lab("exec", host, "--", *cmd, check=check, timeout=timeout)


def status():
    try:
        return {h["host"]: h for h in json.loads(lab("status", "--json").stdout)}
    except (OSError, subprocess.CalledProcessError, ValueError, KeyError, TypeError):
        return {}


def up(hosts, name):
    return hosts.get(name, {}).get("state") in ("running", "up")


def make_material(tmp):
    material = {}
    for name, algo in (
        ("lab-rsa", ["-newkey", "rsa:2048"]),
        ("lab-ecdsa", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]),
    ):
        key, crt = os.path.join(tmp, name + ".key"), os.path.join(tmp, name + ".crt")
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                *algo,
                "-nodes",
                "-keyout",
                key,
                "-out",
                crt,
                "-days",
                "2",
                "-subj",
                "/CN=lab.example",
                "-addext",
                "subjectAltName=DNS:lab.example,DNS:*.lab.example",
            ],
            check=True,
            capture_output=True,
        )
        with open(crt) as c, open(key) as k:
            material[name] = {"certificate": c.read(), "key": k.read()}
    return material


def converge(vars_file, *extra):
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(REPO, "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    return subprocess.run(
        [
            os.path.join(VENV, "bin", "ansible-playbook"),
            "playbooks/validate.yml",
            "playbooks/l7.yml",
            "--limit",
            "l7_nodes",
            "-e",
            "@" + vars_file,
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        check=False,
        timeout=1200,
    )


def recap(result, host):
    for line in result.stdout.splitlines():
        if line.startswith(host + " ") and "changed=" in line:
            return {k: int(v) for k, v in (f.split("=") for f in line.split()[2:])}
    raise AssertionError(result.stdout[-3000:] + result.stderr[-2000:])


@pytest.fixture(scope="module")
def hosts():
    hosts = status()
    if not up(hosts, "l7-1"):
        pytest.skip("lab not up (openclb-lab up l7-1 be1)")
    if up(hosts, "be1") and on("be1", "curl", "-s", "-o", "/dev/null", "http://127.0.0.1:8080/").returncode:
        on("be1", "sh", "-c", "nohup python3 -c '{}' >/dev/null 2>&1 &".format(BACKEND.replace("'", "'\"'\"'")))
    tmp = tempfile.mkdtemp(prefix="openclb-l7-lab-")
    vars_file = os.path.join(tmp, "vars.json")
    with open(vars_file, "w") as fh:
        json.dump({"openclb_tls_material": make_material(tmp)}, fh)
    try:
        result = converge(vars_file)
        assert recap(result, "l7-1")["failed"] == 0, result.stdout[-4000:]
        hosts["_vars"] = vars_file
        yield hosts
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # test keys


def test_second_run_and_check_mode_change_nothing(hosts):
    assert recap(converge(hosts["_vars"]), "l7-1")["changed"] == 0
    assert recap(converge(hosts["_vars"], "--check", "--diff"), "l7-1")["changed"] == 0


def test_services_and_direct_routing_setup(hosts):
    assert on("l7-1", "systemctl", "is-active", "nginx", "openclb-healthd").stdout.split() == ["active", "active"]
    assert on("l7-1", "systemctl", "is-enabled", "openclb-l7-vips").stdout.strip() == "enabled"
    assert VIP + "/32" in on("l7-1", "ip", "-o", "addr", "show", "dev", "lo").stdout
    assert on("l7-1", "sysctl", "-n", "net.ipv4.conf.all.arp_ignore").stdout.strip() == "1"
    assert on("l7-1", "sysctl", "-n", "net.ipv4.conf.all.arp_announce").stdout.strip() == "2"
    listening = on("l7-1", "ss", "-Htln").stdout
    for addr in (VIP + ":80", VIP + ":443", VIP + ":8080", "10.99.0.21:80", "10.99.0.21:443"):
        assert addr in listening, addr
    assert on("l7-1", "readlink", "/etc/openclb/nginx/current").stdout.strip() in (
        "/etc/openclb/nginx/a",
        "/etc/openclb/nginx/b",
    )
    key = on("l7-1", "stat", "-c", "%a %U", "/etc/openclb/tls/private/lab-rsa.key").stdout.split()
    assert key == ["600", "root"]


def test_healthd_reports_the_backends(hosts):
    body = json.loads(on("l7-1", "curl", "-s", "http://127.0.0.1:9146/status").stdout)
    names = {(b["listener"], b["backend"]) for b in body["backends"]}
    assert ("http-web", "be1") in names and ("https-web", "be3") in names
    if up(hosts, "be1"):
        states = {b["state"] for b in body["backends"] if b["backend"] == "be1"}
        assert states == {"up"}
    metrics = on("l7-1", "curl", "-s", "http://127.0.0.1:9146/metrics").stdout
    assert "openclb_backend_up{" in metrics
    assert "Active connections" in on("l7-1", "curl", "-s", "http://127.0.0.1:8081/nginx_status").stdout


def test_node_address_serves_the_listeners(hosts):
    """What the LVS tier's TCP check and NAT listeners reach."""
    if not up(hosts, "be1"):
        pytest.skip("be1 not up")
    r = on("be1", "curl", "-s", "-H", "Host: www.lab.example", "http://10.99.0.21/")
    assert json.loads(r.stdout)["backend"] == "be1"
    r = on(
        "be1",
        "curl",
        "-s",
        "-k",
        "--http2",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version}",
        "--resolve",
        "lab.example:443:10.99.0.21",
        "https://lab.example/",
    )
    assert r.stdout == "2"


def test_through_the_lvs_tier(hosts):
    if not (up(hosts, "lvs1") and up(hosts, "client1") and up(hosts, "be1")):
        pytest.skip("needs lvs1, client1 and be1 up, and site.yml converged")
    body = json.loads(on("client1", "curl", "-s", "--max-time", "5", f"http://{VIP}/").stdout)
    assert body["headers"]["X-Forwarded-For"] == "203.0.113.101"  # DR: nginx sees the client
    r = on("client1", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://{VIP}:8080/x")
    assert r.stdout == "301"
