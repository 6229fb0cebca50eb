"""The IPVS module code against a REAL kernel: a UML guest of the lab.

Copies plugins/module_utils/ipvs.py and a small driver into the guest, runs
the driver with the guest's Python (the LVS venv /opt/openclb/venv when it
has pyroute2 >= 0.9.7, else the guest's python3 with this checkout's
pyroute2 copied next to the driver), and cross-checks every result with the
kernel's own views: `ipvsadm -Ln` and /proc/net/ip_vs.

    openclb-lab up lvs1            # or OPENCLB_LAB_NAME=... for a private lab
    pytest -m lab tests/lab/test_ipvs_kernel.py

Environment: OPENCLB_IPVS_HOST (default lvs1), OPENCLB_LAB_NAME (lab name).
The tests flush the guest's IPVS table and sync daemons: point them at a
guest no other test is using at the same time.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
HOST = os.environ.get("OPENCLB_IPVS_HOST", "lvs1")
GUEST_DIR = "/tmp/openclb-ipvs-test"
VENV_PY = "/opt/openclb/venv/bin/python"
ALL_SCHEDULERS = ("rr", "wrr", "lc", "wlc", "sh", "dh", "mh", "sed", "nq", "fo", "ovf", "lblc", "lblcr", "twos")

DRIVER = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import ipvs_mu as m

def _run(argv):
    import subprocess
    p = subprocess.run(argv, capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr

def main():
    req = json.load(sys.stdin)
    out = {}
    k = m.Kernel(run_command=_run)
    try:
        op = req["op"]
        if op == "services":
            wanted = m.normalize_services(req["services"])
            changed, actions, before, after = m.run_services(k, wanted, req.get("purge", False),
                                                             req.get("check", False))
            out = {"changed": changed, "actions": actions, "before": before, "after": after}
        elif op == "read":
            out = {"services": m.read_services(k, with_stats=True), "daemons": m.read_daemons(k)}
        elif op == "daemons":
            wanted = {r: (m.normalize_daemon(r, p) if p is not None else None) for r, p in req["daemons"].items()}
            actions = m.daemon_plan(m.read_daemons(k), wanted)
            m.apply_daemons(k, actions)
            out = {"changed": bool(actions), "actions": [[a["op"], a["role"]] for a in actions],
                   "daemons": m.read_daemons(k)}
        else:
            raise SystemExit("unknown op " + op)
    except m.IPVSError as exc:
        out = {"error": str(exc)}
    finally:
        k.close()
    json.dump(out, sys.stdout)

main()
'''


def lab_cli():
    for candidate in (shutil.which("openclb-lab"), str(Path(sys.executable).with_name("openclb-lab"))):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def lab_exec(cmd, stdin=None, check=True, timeout=120):
    p = subprocess.run([lab_cli(), "exec", HOST, "--", *cmd], input=stdin, capture_output=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} on {HOST} failed ({p.returncode}): {p.stderr.decode(errors='replace')}")
    return p


def sh(script, **kw):
    return lab_exec(["sh", "-c", script], **kw).stdout.decode()


@pytest.fixture(scope="session")
def guest():
    """Push the code into the guest; skip with a reason when the lab is not up."""
    cli = lab_cli()
    if cli is None:
        pytest.skip("openclb-lab CLI not installed (make venv on a checkout with lab/)")
    try:
        status = json.loads(subprocess.run([cli, "status", "--json"], capture_output=True, text=True,
                                           timeout=60).stdout or "[]")
    except (subprocess.SubprocessError, ValueError) as exc:
        pytest.skip(f"openclb-lab status failed: {exc}")
    row = next((r for r in status if r.get("host") == HOST), None)
    if row is None or row.get("state") != "running":
        pytest.skip(f"lab guest {HOST} is not running (openclb-lab up {HOST}; "
                    f"lab {os.environ.get('OPENCLB_LAB_NAME', 'openclb')})")

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(REPO / "plugins/module_utils/ipvs.py", arcname="ipvs_mu.py")
        data = DRIVER.encode()
        info = tarfile.TarInfo("driver.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        import pyroute2  # this checkout's pinned version, for guests without the LVS venv

        tar.add(Path(pyroute2.__file__).parent, arcname="vendor/pyroute2",
                filter=lambda ti: None if "__pycache__" in ti.name else ti)
    lab_exec(["sh", "-c", f"rm -rf {GUEST_DIR} && mkdir -p {GUEST_DIR} && tar -xf - -C {GUEST_DIR}"],
             stdin=buf.getvalue())
    probe = "import pyroute2, sys; from pyroute2 import IPVS; print(pyroute2.__version__)"
    venv = lab_exec([VENV_PY, "-c", probe], check=False)
    if venv.returncode == 0:
        python, path = VENV_PY, GUEST_DIR
    else:
        python, path = "python3", f"{GUEST_DIR}:{GUEST_DIR}/vendor"
    return {"python": python, "path": path}


def drive(guest, request):
    # The driver puts its own dir on sys.path; PYTHONPATH adds the vendored pyroute2 if used.
    p = lab_exec(["env", f"PYTHONPATH={guest['path']}", guest["python"], f"{GUEST_DIR}/driver.py", GUEST_DIR],
                 stdin=json.dumps(request).encode())
    return json.loads(p.stdout)


@pytest.fixture
def clean(guest):
    sh("modprobe ip_vs; ipvsadm -C; ipvsadm --stop-daemon master 2>/dev/null; "
       "ipvsadm --stop-daemon backup 2>/dev/null; true")
    yield guest
    sh("ipvsadm -C; ipvsadm --stop-daemon master 2>/dev/null; ipvsadm --stop-daemon backup 2>/dev/null; true")


def ipvsadm_table():
    """`ipvsadm -Ln` (with thresholds) as {service line: [dest lines]}; whitespace collapsed."""
    table = {}
    current = None
    for line in sh("ipvsadm -Ln").splitlines()[3:]:
        if line.startswith("  ->"):
            table[current].append(" ".join(line.split()[1:4]))
        else:
            current = " ".join(line.split())
            table[current] = []
    return table


def thresholds():
    out = {}
    for line in sh("ipvsadm -Ln --thresholds").splitlines()[3:]:
        if line.startswith("  ->"):
            f = line.split()
            out[f[1]] = (int(f[2]), int(f[3]))
    return out


def available_schedulers():
    mods = sh("ls /lib/modules/$(uname -r)/kernel/net/netfilter/ipvs/")
    have = set(re.findall(r"ip_vs_(\w+)\.ko", mods))
    return [s for s in ALL_SCHEDULERS if s in have]


WEB = {"address": "203.0.113.10", "port": 80, "scheduler": "wrr",
       "real_servers": [{"address": "10.99.0.41", "port": 8080, "weight": 1},
                        {"address": "10.99.0.42", "port": 8080, "weight": 3}]}


# --------------------------------------------------------------------------
def test_every_scheduler_the_kernel_has(clean):
    scheds = available_schedulers()
    assert {"rr", "wrr", "wlc", "sh", "mh"} <= set(scheds), scheds
    services = [{"address": "203.0.113.10", "port": 1000 + i, "scheduler": s,
                 "real_servers": [{"address": "10.99.0.41", "port": 8080}]} for i, s in enumerate(scheds)]
    r = drive(clean, {"op": "services", "services": services})
    assert "error" not in r, r
    table = ipvsadm_table()
    for i, s in enumerate(scheds):
        assert f"TCP 203.0.113.10:{1000 + i} {s}" in table, (s, table)
    again = drive(clean, {"op": "services", "services": services})
    assert again["changed"] is False and again["actions"] == []


def test_nat_dr_tun_weights_thresholds_and_idempotence(clean):
    services = [
        dict(WEB),
        {"address": "203.0.113.10", "port": 443, "scheduler": "wlc",
         "real_servers": [{"address": "10.99.0.41", "forwarding": "dr", "weight": 5,
                           "upper_threshold": 100, "lower_threshold": 50},
                          {"address": "10.99.0.43", "forwarding": "tun", "weight": 0}]},
    ]
    r = drive(clean, {"op": "services", "services": services})
    assert r["changed"] and len(r["actions"]) == 6
    table = ipvsadm_table()
    assert table["TCP 203.0.113.10:80 wrr"] == ["10.99.0.41:8080 Masq 1", "10.99.0.42:8080 Masq 3"]
    assert table["TCP 203.0.113.10:443 wlc"] == ["10.99.0.41:443 Route 5", "10.99.0.43:443 Tunnel 0"]
    assert thresholds()["10.99.0.41:443"] == (100, 50)
    assert drive(clean, {"op": "services", "services": services})["changed"] is False

    # weight change: a set, not a delete + add (the kernel keeps the dest's counters)
    services[0]["real_servers"][1]["weight"] = 7
    services[1]["real_servers"][1]["forwarding"] = "dr"
    r = drive(clean, {"op": "services", "services": services})
    assert r["actions"] == [
        "set real server tcp 203.0.113.10:80 -> 10.99.0.42:8080 (weight 3 -> 7)",
        "set real server tcp 203.0.113.10:443 -> 10.99.0.43:443 (forwarding tun -> dr)",
    ]
    table = ipvsadm_table()
    assert table["TCP 203.0.113.10:80 wrr"][1] == "10.99.0.42:8080 Masq 7"
    assert table["TCP 203.0.113.10:443 wlc"][1] == "10.99.0.43:443 Route 0"


def test_weight_set_keeps_existing_connections(clean):
    """A weight change is a SET_DEST: the destination and its connection entries stay.

    client1 (a lab client namespace on the front network) opens a connection to
    the VIP held on the guest's front interface; the NAT backend does not answer,
    so IPVS keeps a SYN_RECV entry bound to the destination. A delete + add would
    show up as a destination whose InActConn dropped to 0.
    """
    vip = "203.0.113.10"
    sh(f"ip addr add {vip}/32 dev front")
    try:
        drive(clean, {"op": "services", "services": [dict(WEB, real_servers=WEB["real_servers"][:1])]})
        subprocess.run([lab_cli(), "exec", "client1", "--", sys.executable, "-c",
                        f"import socket; s = socket.socket(); s.settimeout(1); s.connect_ex(('{vip}', 80))"],
                       capture_output=True, timeout=60)
        conns = sh("ipvsadm -Lnc")
        if f"{vip}:80" not in conns:
            pytest.skip(f"no connection entry was created from client1 (lab clients missing, or another guest "
                        f"also holds {vip}?): {conns}")
        before = ipvsadm_table()["TCP 203.0.113.10:80 wrr"]
        r = drive(clean, {"op": "services", "services": [
            dict(WEB, real_servers=[dict(WEB["real_servers"][0], weight=9)])]})
        assert r["actions"] == ["set real server tcp 203.0.113.10:80 -> 10.99.0.41:8080 (weight 1 -> 9)"]
        line = [x for x in sh("ipvsadm -Ln").splitlines() if "10.99.0.41:8080" in x][0].split()
        assert line[2:4] == ["Masq", "9"] and int(line[4]) + int(line[5]) >= 1, (before, line)
        assert f"{vip}:80" in sh("ipvsadm -Lnc")
    finally:
        sh(f"ip addr del {vip}/32 dev front; true")


def test_persistence_flags_and_removal(clean):
    svc = {"address": "203.0.113.10", "port": 80, "scheduler": "sh", "flags": ["sh-fallback", "sh-port"],
           "persistence": 300, "persistence_netmask": "255.255.255.0",
           "real_servers": [{"address": "10.99.0.41", "forwarding": "dr", "weight": 3}]}
    udp = {"protocol": "udp", "address": "203.0.113.10", "port": 53, "scheduler": "rr", "flags": ["one-packet"],
           "real_servers": [{"address": "10.99.0.41", "port": 5353}]}
    r = drive(clean, {"op": "services", "services": [svc, udp]})
    assert "error" not in r, r
    table = ipvsadm_table()
    assert "TCP 203.0.113.10:80 sh (sh-fallback,sh-port) persistent 300 mask 255.255.255.0" in table
    assert "UDP 203.0.113.10:53 rr ops" in table
    assert drive(clean, {"op": "services", "services": [svc, udp]})["changed"] is False

    svc2 = dict(svc, persistence=0, flags=["sh-port"])
    r = drive(clean, {"op": "services", "services": [svc2]})
    assert r["actions"] == ["set service tcp 203.0.113.10:80 (flags ['sh-fallback', 'sh-port'] -> ['sh-port'], "
                            "persistence 300 -> 0)"]
    assert "TCP 203.0.113.10:80 sh (sh-port)" in ipvsadm_table()
    assert drive(clean, {"op": "services", "services": [svc2]})["changed"] is False

    # real server removal, then service removal
    r = drive(clean, {"op": "services", "services": [dict(svc2, real_servers=[])]})
    assert r["actions"] == ["del real server tcp 203.0.113.10:80 -> 10.99.0.41:80"]
    assert ipvsadm_table()["TCP 203.0.113.10:80 sh (sh-port)"] == []
    r = drive(clean, {"op": "services", "services": [dict(svc2, state="absent"), dict(udp, state="absent")]})
    assert sorted(r["actions"]) == ["del service tcp 203.0.113.10:80", "del service udp 203.0.113.10:53"]
    assert ipvsadm_table() == {}


def test_ipv6_and_fwmark(clean):
    v6 = {"address": "2001:db8::10", "port": 443, "scheduler": "mh", "flags": ["mh-port"], "persistence": 60,
          "persistence_netmask": 64,
          "real_servers": [{"address": "2001:db8:1::41", "forwarding": "dr"},
                           {"address": "2001:db8:1::42", "port": 8443}]}
    fwm = {"fwmark": 7, "family": "ipv6", "scheduler": "rr",
           "real_servers": [{"address": "2001:db8:1::41", "forwarding": "tun"}]}
    fwm4 = {"fwmark": 7, "scheduler": "lc", "persistence": 30,
            "real_servers": [{"address": "10.99.0.41", "forwarding": "dr", "weight": 2}]}
    r = drive(clean, {"op": "services", "services": [v6, fwm, fwm4]})
    assert "error" not in r, r
    table = ipvsadm_table()
    assert table["TCP [2001:db8::10]:443 mh (mh-port) persistent 60 mask 64"] == [
        "[2001:db8:1::41]:443 Route 1", "[2001:db8:1::42]:8443 Masq 1"]
    assert table["FWM 7 IPv6 rr"] == ["[2001:db8:1::41]:0 Tunnel 1"]
    assert table["FWM 7 lc persistent 30"] == ["10.99.0.41:0 Route 2"]
    proc = sh("cat /proc/net/ip_vs")
    # /proc prints ntohl(netmask): the IPv6 /64 must read as ipvsadm -M 64 writes it (host-order 64)
    assert "FWM  00000007 rr" in proc
    assert re.search(r":01BB mh persistent \d+ 40000000", proc), proc  # timeout is in jiffies
    r = drive(clean, {"op": "services", "services": [v6, fwm, fwm4]})
    assert r["changed"] is False, r["actions"]
    read = drive(clean, {"op": "read"})["services"]
    assert {(s["fwmark"], s["family"]) for s in read if s["fwmark"]} == {(7, 4), (7, 6)}


def test_purge_and_check_mode(clean):
    sh("ipvsadm -A -t 203.0.113.99:25 -s rr && ipvsadm -a -t 203.0.113.99:25 -r 10.99.0.41 -m")
    r = drive(clean, {"op": "services", "services": [WEB], "purge": True, "check": True})
    assert r["changed"] and "del service tcp 203.0.113.99:25" in r["actions"]
    assert set(ipvsadm_table()) == {"TCP 203.0.113.99:25 rr"}  # check mode changed nothing
    r = drive(clean, {"op": "services", "services": [WEB], "purge": True})
    assert set(ipvsadm_table()) == {"TCP 203.0.113.10:80 wrr"}
    assert drive(clean, {"op": "services", "services": [WEB], "purge": True})["changed"] is False


def test_kernel_refusal_is_reported(clean):
    r = drive(clean, {"op": "services", "services": [dict(WEB, scheduler="nosuch")]})
    assert "add service tcp 203.0.113.10:80 scheduler nosuch failed" in r["error"]


def test_stats_and_connection_counts_read(clean):
    drive(clean, {"op": "services", "services": [WEB]})
    (svc,) = drive(clean, {"op": "read"})["services"]
    assert set(svc["stats"]) >= {"conns", "inpkts", "outbytes", "cps"}
    assert {"active_conns", "inactive_conns", "persist_conns"} <= set(svc["real_servers"][0])


def test_sync_daemons_start_change_stop(clean):
    both = {"master": {"interface": "internal", "syncid": 3},
            "backup": {"interface": "internal", "syncid": 3}}
    r = drive(clean, {"op": "daemons", "daemons": both})
    assert r["actions"] == [["start", "master"], ["start", "backup"]], r
    out = sh("ipvsadm -Ln --daemon")
    assert "master sync daemon (mcast=internal, syncid=3" in out
    assert "backup sync daemon (mcast=internal, syncid=3" in out
    assert drive(clean, {"op": "daemons", "daemons": both})["changed"] is False

    changed = {"master": {"interface": "internal", "syncid": 3, "mcast_group": "224.0.0.82", "port": 8850,
                          "ttl": 2, "maxlen": 1200}}
    r = drive(clean, {"op": "daemons", "daemons": changed})
    assert r["actions"] == [["stop", "master"], ["start", "master"]]
    out = sh("ipvsadm -Ln --daemon")
    assert "master sync daemon (mcast=internal, syncid=3, maxlen=1200, group=224.0.0.82, port=8850, ttl=2)" in out
    assert drive(clean, {"op": "daemons", "daemons": changed})["changed"] is False

    v6 = {"backup": {"interface": "internal", "syncid": 4, "mcast_group": "ff02::81"}}
    r = drive(clean, {"op": "daemons", "daemons": v6})
    assert r["actions"] == [["stop", "backup"], ["start", "backup"]]
    assert "group=ff02::81" in sh("ipvsadm -Ln --daemon")

    r = drive(clean, {"op": "daemons", "daemons": {"master": None, "backup": None}})
    assert r["actions"] == [["stop", "master"], ["stop", "backup"]]
    assert sh("ipvsadm -Ln --daemon").strip() == ""


def test_missing_ip_vs_is_loaded(guest):
    sh("ipvsadm -C; ipvsadm --stop-daemon master 2>/dev/null; ipvsadm --stop-daemon backup 2>/dev/null; "
       "for m in $(lsmod | awk '/^ip_vs/ {print $1}' | sort -r); do rmmod $m 2>/dev/null; done; "
       "rmmod ip_vs 2>/dev/null; true")
    if "ip_vs " in sh("lsmod"):
        pytest.skip("ip_vs could not be unloaded in the guest (in use)")
    r = drive(guest, {"op": "services", "services": [WEB]})
    assert r["changed"] and "ip_vs " in sh("lsmod")
    sh("ipvsadm -C")


PLAYBOOK = """
- name: The ipvs modules through Ansible on a lab guest
  hosts: "{{ target }}"
  gather_facts: false
  environment:
    PYTHONPATH: "{{ pythonpath }}"
  vars:
    ansible_python_interpreter: "{{ python }}"
    web:
      address: 203.0.113.10
      port: 80
      scheduler: wrr
      real_servers:
        - {address: 10.99.0.41, port: 8080, weight: 1}
        - {address: 10.99.0.42, port: 8080, weight: 3}
  tasks:
    - {name: Add in check mode, openclb.lb.ipvs_virtual_server: "{{ web }}", check_mode: true, register: r_check}
    - {name: Add, openclb.lb.ipvs_virtual_server: "{{ web }}", register: r_add}
    - {name: Add again, openclb.lb.ipvs_virtual_server: "{{ web }}", register: r_again}
    - name: Many services with purge
      openclb.lb.ipvs_services:
        purge: true
        services:
          - "{{ web | combine({'real_servers': [web.real_servers[0], web.real_servers[1] | combine({'weight': 5})]}) }}"
          - {protocol: udp, address: "2001:db8::53", port: 53, scheduler: rr, flags: [one-packet],
             real_servers: [{address: "2001:db8:1::41", port: 5353}]}
      register: r_many
    - {name: Info, openclb.lb.ipvs_info: {}, register: r_info}
    - name: Sync daemons
      openclb.lb.ipvs_sync_daemon: {role: [master, backup], interface: internal, syncid: 7}
      register: r_sync
    - name: Sync daemons again
      openclb.lb.ipvs_sync_daemon: {role: [master, backup], interface: internal, syncid: 7}
      register: r_sync2
    - name: Stop sync daemons
      openclb.lb.ipvs_sync_daemon: {role: [master, backup], state: absent}
      register: r_stop
    - name: Bad input fails before any change
      openclb.lb.ipvs_services:
        services:
          - {address: 203.0.113.10, port: 80, real_servers: [{address: 10.99.0.41, port: 81, forwarding: dr}]}
      register: r_bad
      ignore_errors: true
    - name: Report
      ansible.builtin.copy:
        dest: "{{ report }}"
        mode: "0644"
        content: "{{ {'check': r_check, 'add': r_add, 'again': r_again, 'many': r_many, 'info': r_info,
                      'sync': r_sync, 'sync2': r_sync2, 'stop': r_stop, 'bad': r_bad} | to_json }}"
      delegate_to: localhost
      vars:
        ansible_python_interpreter: "{{ ansible_playbook_python }}"
"""


def test_modules_through_ansible(clean, tmp_path):
    """The real modules (argument specs, check mode, results) via ansible-playbook over the lab's ssh."""
    playbook = Path(sys.executable).with_name("ansible-playbook")
    if not playbook.exists():
        pytest.skip("ansible-playbook not next to this Python")
    coll = tmp_path / "collections" / "ansible_collections" / "openclb"
    coll.mkdir(parents=True)
    (coll / "lb").symlink_to(REPO)
    (tmp_path / "play.yml").write_text(PLAYBOOK)
    report = tmp_path / "report.json"
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(tmp_path / "collections"),
               ANSIBLE_CONFIG=str(REPO / "ansible.cfg"))
    extra = {"target": HOST, "python": clean["python"], "pythonpath": clean["path"], "report": str(report)}
    p = subprocess.run([str(playbook), "-i", str(REPO / "inventories/lab"), "-l", HOST, str(tmp_path / "play.yml"),
                        "-e", json.dumps(extra)], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    r = json.loads(report.read_text())
    assert r["check"]["changed"] and r["add"]["changed"] and len(r["add"]["actions"]) == 3
    assert not r["again"]["changed"]
    assert r["many"]["actions"] == [
        "set real server tcp 203.0.113.10:80 -> 10.99.0.42:8080 (weight 3 -> 5)",
        "add service udp [2001:db8::53]:53 scheduler rr",
        "add real server udp [2001:db8::53]:53 -> [2001:db8:1::41]:5353 nat weight 1",
    ]
    assert r["info"]["loaded"] and len(r["info"]["services"]) == 2
    assert r["sync"]["changed"] and len(r["sync"]["sync_daemons"]) == 2 and not r["sync2"]["changed"]
    assert r["stop"]["sync_daemons"] == []
    assert r["bad"]["failed"] and "real_servers[0].port: 81 differs" in r["bad"]["msg"]
    assert set(ipvsadm_table()) == {"TCP 203.0.113.10:80 wrr", "UDP [2001:db8::53]:53 rr ops"}
