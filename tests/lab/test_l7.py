"""The L7 role on lab guests (systemd, real units), and the path through LVS.

Runs against the lab converged by tests/lab/run.sh (site.yml, with the lab's
generated certificates); OPENCLB_LAB_NAME selects the lab. Idempotence of the
whole site (this role included) is tests/lab/test_site.py's.
"""

import json
import os
import subprocess

import pytest

pytestmark = pytest.mark.lab

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
VENV = os.environ.get("OPENCLB_VENV", os.path.join(REPO, ".venv"))
if not os.path.exists(VENV):
    VENV = "/work/main/.venv"
LAB = os.path.join(VENV, "bin", "openclb-lab")
VIP = "203.0.113.20"

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


@pytest.fixture(scope="module")
def hosts():
    hosts = status()
    if not up(hosts, "l7-1"):
        pytest.skip("lab not up: tests/lab/run.sh boots and converges it")
    return hosts


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
    # the lab's HTTPS keys live on the key servers: no private key of a listener here
    assert on("l7-1", "ls", "/etc/openclb/tls/private/lab-rsa.key").returncode != 0


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
    r = on("be1", "curl", "-s", "-H", "Host: www.lab.example", "http://10.99.0.21/echo")
    assert json.loads(r.stdout)["backend"] in ("be1", "be2", "be3")
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
    body = json.loads(on("client1", "curl", "-s", "--max-time", "5", f"http://{VIP}/echo").stdout)
    assert body["headers"]["X-Forwarded-For"] == "203.0.113.101"  # DR: nginx sees the client
    r = on("client1", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://{VIP}:8080/x")
    assert r.stdout == "301"
