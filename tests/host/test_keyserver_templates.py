"""The keyserver/keyclient templates rendered by Ansible itself (its filters, hostvars, model).

Runs ansible-playbook on localhost only: templates go to a temp dir; nothing
on the host changes. Needs the controller venv (ansible-core) only.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLAYBOOK = shutil.which("ansible-playbook", path=os.path.dirname(sys.executable)) or shutil.which("ansible-playbook")

INVENTORY = textwrap.dedent("""\
    all:
      vars:
        openclb_cluster: {name: lab}
        openclb_keyserver_token_pin: "1234"
        openclb_keyserver_token_so_pin: "5678"
        openclb_model:
          l7_listeners:
            - {name: web-https, protocol: https, vip: 203.0.113.10, port: 443,
               certificates: [{name: www, domains: [www.example.com], key_store: keyserver},
                              {name: api, domains: ["*.api.example.com"], key_store: local}]}
            - {name: shop, protocol: https, vip: "2001:db8::10", port: 8443,
               certificates: [{name: shop, domains: [shop.example.com], key_store: keyserver}]}
            - {name: plain, protocol: http, vip: 203.0.113.10, port: 80, certificates: []}
      children:
        key_servers:
          hosts:
            ks1: {openclb_internal_address: 10.99.0.31}
            ks2: {openclb_internal_address: 10.99.0.32}
        l7_nodes:
          hosts:
            l7-1: {openclb_internal_address: 10.99.0.21}
            l7-2: {openclb_internal_address: 10.99.0.22}
    """)

TEMPLATES = {
    "ks1": ("keyserver", ["softhsm2.conf", "stunnel-keyserver.conf", "iptables.rules",
                          "openclb-keyserver-p11kit.service", "openclb-keyserver-tunnel.service",
                          "openclb-keyserver-firewall.service"]),
    "l7-1": ("keyclient", ["stunnel-keyclient.conf", "openssl.cnf", "nginx-keyclient.conf", "nginx.env", "watchdog.json",
                           "openclb-keyclient-tunnel.service", "openclb-keyclient-watchdog.service"]),
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    if not PLAYBOOK:
        pytest.skip("ansible-playbook not found (use the project venv)")
    tmp = tmp_path_factory.mktemp("tpl")
    (tmp / "hosts.yml").write_text(INVENTORY)
    plays = []
    for host, (role, names) in TEMPLATES.items():
        plays.append({
            "name": f"render {role}", "hosts": host, "gather_facts": False, "connection": "local",
            "vars": {"ansible_python_interpreter": sys.executable},
            "tasks": [
                {"name": "role defaults", "ansible.builtin.include_vars": f"{REPO}/roles/{role}/defaults/main.yml"},
                {"name": "render", "ansible.builtin.template": {
                    "src": f"{REPO}/roles/{role}/templates/{{{{ item }}}}.j2",
                    "dest": f"{tmp}/{host}-{{{{ item }}}}", "mode": "0644"},
                 "loop": names, "delegate_to": "localhost"},
            ],
        })
    (tmp / "play.yml").write_text(json.dumps(plays))
    (tmp / "ansible.cfg").write_text("[defaults]\n")
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=os.path.join(REPO, ".collections"),
               ANSIBLE_CONFIG=str(tmp / "ansible.cfg"))
    proc = subprocess.run([PLAYBOOK, "-i", str(tmp / "hosts.yml"), str(tmp / "play.yml")], capture_output=True,
                          text=True, env=env, cwd=str(tmp), check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return tmp


def read(tmp, name):
    return (tmp / name).read_text()


def test_every_template_starts_with_the_managed_marker(rendered):
    for host, (_, names) in TEMPLATES.items():
        for name in names:
            text = read(rendered, f"{host}-{name}")
            marker = json.loads(text)["_comment"] if name.endswith(".json") else "\n".join(text.splitlines()[:3])
            assert "Ansible managed" in marker, name


def test_keyserver_tunnel_requires_cluster_client_certificates(rendered):
    conf = read(rendered, "ks1-stunnel-keyserver.conf")
    for line in ("accept = 10.99.0.31:2407", "requireCert = yes", "verifyChain = yes", "sslVersionMin = TLSv1.3",
                 "CRLfile = /etc/openclb/keyserver/tls/crl.pem", "connect = /run/openclb-keyserver/p11-kit.sock"):
        assert line in conf.splitlines(), line


def test_firewall_admits_exactly_the_l7_nodes(rendered):
    rules = read(rendered, "ks1-iptables.rules")
    accepts = [line for line in rules.splitlines() if line.endswith("-j ACCEPT")]
    assert [a.split()[3] for a in accepts] == ["10.99.0.21/32", "10.99.0.22/32"]
    assert rules.splitlines()[-2].endswith("--dport 2407 -j DROP")
    if shutil.which("iptables-restore") and os.geteuid() == 0:
        subprocess.run(["iptables-restore", "--test", "--noflush", str(rendered / "ks1-iptables.rules")], check=True)


def test_keyclient_tunnel_lists_key_servers_in_order_with_host_checks(rendered):
    lines = read(rendered, "l7-1-stunnel-keyclient.conf").splitlines()
    assert [ln for ln in lines if ln.startswith("connect =")] == ["connect = 10.99.0.31:2407", "connect = 10.99.0.32:2407"]
    assert [ln for ln in lines if ln.startswith("checkHost")] == ["checkHost = ks1", "checkHost = ks2"]
    assert "accept = /run/openclb-keyclient/p11-kit.sock" in lines


def test_nginx_drop_in_sets_the_engine_environment_and_ordering(rendered):
    text = read(rendered, "l7-1-nginx-keyclient.conf")
    assert "EnvironmentFile=/etc/openclb/nginx.env" in text
    assert "After=openclb-keyclient-tunnel.service" in text
    # the same file roles/l7 sources for `nginx -t`
    env = read(rendered, "l7-1-nginx.env")
    assert "OPENSSL_CONF=/etc/openclb/keyclient/openssl.cnf" in env.splitlines()
    assert "P11_KIT_SERVER_ADDRESS=unix:path=/run/openclb-keyclient/p11-kit.sock" in env.splitlines()
    cnf = read(rendered, "l7-1-openssl.cnf")
    assert "MODULE_PATH = /usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so" in cnf


def test_watchdog_probes_every_keyserver_certificate_listener(rendered):
    cfg = json.loads(read(rendered, "l7-1-watchdog.json"))
    assert cfg["probes"] == [{"host": "203.0.113.10", "port": 443, "sni": "www.example.com"},
                             {"host": "2001:db8::10", "port": 8443, "sni": "shop.example.com"}]
