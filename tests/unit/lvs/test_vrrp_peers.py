"""openclb-vrrp-peers (roles/lvs/files): VRRP advert parsing, the state file's
write policy and the takeover arithmetic; and what the role renders around it
for the lab (keepalived.conf's track file, the notify script, the listener's
configuration), with nopreempt and with preempt."""

import json
import os
import re
import socket
import struct
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
SCRIPT = os.path.join(ROOT, "roles", "lvs", "files", "openclb-vrrp-peers")
LAB = os.path.join(ROOT, "inventories", "lab")

PEERS = {"203.0.113.12", "10.99.0.12", "2001:db8::12"}
VRIDS = {51, 52}


@pytest.fixture(scope="module")
def vp(load_script):
    return load_script(SCRIPT)


def vrrp(version=3, kind=1, vrid=51, priority=150):
    """A VRRP packet as keepalived sends it: header, then one IPv4 address."""
    first = version << 4 | kind
    return struct.pack("!BBBBHH", first, vrid, priority, 1, 100, 0) + socket.inet_aton("203.0.113.10")


def ipv4(payload, source="203.0.113.12", options=b""):
    """An IPv4 packet as an AF_INET raw socket reads it (header, options, payload)."""
    ihl = 5 + len(options) // 4
    header = struct.pack("!BBHHHBBH4s4s", 4 << 4 | ihl, 0xC0, 4 * ihl + len(payload), 0, 0, 255, 112, 0,
                         socket.inet_aton(source), socket.inet_aton("224.0.0.18"))
    return header + options + payload


# --- parsing ------------------------------------------------------------------


def test_ipv4_header_without_options(vp):
    assert vp.ipv4_packet(ipv4(vrrp())) == ("203.0.113.12", vrrp())


def test_ipv4_header_with_options_is_skipped_by_ihl(vp):
    router_alert = b"\x94\x04\x00\x00"  # IHL 6
    source, payload = vp.ipv4_packet(ipv4(vrrp(priority=100), options=router_alert))
    assert (source, payload) == ("203.0.113.12", vrrp(priority=100))
    assert vp.parse_advert(payload) == (3, 51, 100)


@pytest.mark.parametrize("packet", [
    b"",
    ipv4(vrrp())[:19],  # shorter than an IPv4 header
    b"\x65" + ipv4(vrrp())[1:],  # version 6 in an IPv4 socket's header
    b"\x44" + ipv4(vrrp())[1:],  # IHL 4: below the minimum
    b"\x4f" + ipv4(vrrp())[1:32],  # IHL 15 (60 bytes) in a 32-byte packet
])
def test_malformed_ipv4_packets(vp, packet):
    assert vp.ipv4_packet(packet) is None


@pytest.mark.parametrize("payload, expected", [
    (vrrp(version=3, vrid=51, priority=150), (3, 51, 150)),
    (vrrp(version=2, vrid=52, priority=100), (2, 52, 100)),
    (vrrp(version=2, vrid=51, priority=0), (2, 51, 0)),
    (vrrp(kind=2), None),  # not an advertisement
    (vrrp(version=1), None),
    (vrrp()[:7], None),  # shorter than a VRRP header
])
def test_parse_advert(vp, payload, expected):
    assert vp.parse_advert(payload) == expected


def test_peer_advert_keeps_only_peers_vrids_and_real_priorities(vp):
    assert vp.peer_advert("203.0.113.12", vrrp(), PEERS, VRIDS) == (150, 51, "203.0.113.12")
    assert vp.peer_advert("10.99.0.12", vrrp(version=2, vrid=52, priority=151), PEERS, VRIDS) == (
        151, 52, "10.99.0.12")
    # IPv6 sources as recvfrom gives them (any spelling, a scope suffix)
    assert vp.peer_advert("2001:0db8::0012%front", vrrp(), PEERS, VRIDS) == (150, 51, "2001:db8::12")
    assert vp.peer_advert("203.0.113.11", vrrp(), PEERS, VRIDS) is None  # not a peer (this node)
    assert vp.peer_advert("203.0.113.12", vrrp(vrid=61), PEERS, VRIDS) is None  # another cluster
    assert vp.peer_advert("203.0.113.12", vrrp(priority=0), PEERS, VRIDS) is None  # "I am leaving"
    assert vp.peer_advert("203.0.113.12", vrrp(kind=2), PEERS, VRIDS) is None


def test_load_config_normalises_addresses(vp, tmp_path):
    conf = tmp_path / "peers.json"
    conf.write_text(json.dumps({"_comment": "x", "peers": ["10.99.0.12", "2001:DB8:0::12"], "vrids": [51],
                                "ipv6": True}))
    assert vp.load_config(str(conf)) == {"peers": {"10.99.0.12", "2001:db8::12"}, "vrids": {51}, "ipv6": True}


# --- the state file -----------------------------------------------------------


class Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def test_recorder_writes_a_change_at_once_and_an_unchanged_priority_once_a_second(vp, tmp_path):
    path = tmp_path / "vrrp-peer-priority"
    clock = Clock(1000.0)
    rec = vp.Recorder(str(path), clock=clock)
    assert rec.seen(150, 51, "203.0.113.12")
    assert path.read_text() == "150 51 203.0.113.12 1000\n"
    clock.now = 1000.9  # same priority (the other instance of the group): not rewritten
    assert not rec.seen(150, 52, "10.99.0.12")
    assert path.read_text() == "150 51 203.0.113.12 1000\n"
    clock.now = 1001.0  # a second later: rewritten, so the file's age shows adverts still arrive
    assert rec.seen(150, 52, "10.99.0.12")
    assert path.read_text() == "150 52 10.99.0.12 1001\n"
    clock.now = 1001.2  # a change: written at once
    assert rec.seen(151, 51, "203.0.113.12")
    assert path.read_text() == "151 51 203.0.113.12 1001\n"
    clock.now = 1001.5
    assert not rec.seen(151, 51, "203.0.113.12")
    assert os.listdir(tmp_path) == ["vrrp-peer-priority"]  # no temporary file left behind


@pytest.mark.parametrize("content, expected", [
    ("151 51 203.0.113.12 1001\n", 151),
    ("", 0),
    ("garbage\n", 0),
    ("0 51 203.0.113.12 1001\n", 0),
    (None, 0),  # missing
])
def test_read_peer_priority(vp, tmp_path, content, expected):
    path = tmp_path / "vrrp-peer-priority"
    if content is not None:
        path.write_text(content)
    assert vp.read_peer_priority(str(path)) == expected


# --- the takeover arithmetic ----------------------------------------------------


@pytest.mark.parametrize("peer, own, expected", [
    (150, 100, 51),  # lvs2 replaces a frozen lvs1: advertises 151
    (151, 150, 2),  # lvs1 replaces lvs2 in turn: 152
    (0, 150, 0),  # nothing heard: no bonus
    (100, 150, 0),  # already higher: never negative
    (253, 100, 154),  # capped at 254
    (254, 100, 154),
    (254, 254, 0),
])
def test_takeover_value(vp, peer, own, expected):
    assert vp.takeover_value(peer, own) == expected


def test_takeover_value_command(tmp_path):
    path = tmp_path / "vrrp-peer-priority"
    path.write_text("150 51 203.0.113.11 1000\n")

    def value(*args):
        res = subprocess.run([sys.executable, SCRIPT, "takeover-value", *args], capture_output=True, text=True,
                             check=True)
        return res.stdout

    assert value("--own", "100", "--state-file", str(path)) == "51\n"
    assert value("--own", "100", "--state-file", str(tmp_path / "missing")) == "0\n"


# --- what the role renders --------------------------------------------------------

RENDER = """
- name: Validate the model
  ansible.builtin.import_playbook: {root}/playbooks/validate.yml

- name: Render the LVS role's HA files
  hosts: lvs_nodes
  gather_facts: false
  vars_files:
    - {root}/roles/lvs/defaults/main.yml
    - {root}/roles/lvs/vars/main.yml
    - {root}/roles/lvs/vars/ha.yml
  tasks:
    - name: Render
      ansible.builtin.template:
        src: "{root}/roles/lvs/templates/{{{{ item }}}}"
        dest: "{out}/{{{{ inventory_hostname }}}}/{{{{ item | regex_replace('.j2$', '') }}}}"
        mode: "0644"
      loop: [keepalived.conf.j2, openclb-ha-notify.j2, vrrp-peers.json.j2]
      delegate_to: localhost
"""


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """render(preempt) -> {host: {file: text}} for the lab's LVS nodes."""
    cache = {}

    def render(ansible_playbook, preempt):
        if preempt in cache:
            return cache[preempt]
        base = tmp_path_factory.mktemp(f"preempt-{preempt}")
        inventory = LAB
        if preempt:
            inventory = str(base / "inventory")
            subprocess.run(["cp", "-r", LAB, inventory], check=True)
            path = os.path.join(inventory, "group_vars", "all", "openclb.yml")
            with open(path) as f:
                data = yaml.safe_load(f)
            data["openclb_cluster"]["vrrp"]["preempt"] = True
            with open(path, "w") as f:
                yaml.safe_dump(data, f)
        out = base / "out"
        for host in ("lvs1", "lvs2"):
            (out / host).mkdir(parents=True)
        play = base / "render.yml"
        play.write_text(RENDER.format(root=ROOT, out=out))
        res = ansible_playbook(inventory, str(play))
        assert res.returncode == 0, res.stdout + res.stderr
        cache[preempt] = {host: {f.name: f.read_text() for f in (out / host).iterdir()} for host in ("lvs1", "lvs2")}
        return cache[preempt]

    return render


def blocks(conf):
    """Top-level blocks of a keepalived.conf: (header, body) in order."""
    out, depth, header, body = [], 0, None, []
    for line in conf.splitlines():
        code = line.split("#", 1)[0]
        if depth == 0 and code.strip().endswith("{"):
            header, body = code.strip()[:-1].strip(), []
        elif depth > 0:
            body.append(line)
        depth += code.count("{") - code.count("}")
        if depth == 0 and header is not None:
            out.append((header, "\n".join(body[:-1])))
            header = None
    return out


def test_nopreempt_tracks_the_takeover_file_on_the_group(ansible_playbook, rendered):
    files = rendered(ansible_playbook, preempt=False)
    conf = files["lvs2"]["keepalived.conf"]
    found = dict(blocks(conf))
    track = found["track_file openclb_takeover"].split()
    assert track == ["file", "/run/openclb/vrrp-takeover", "weight", "1", "init_file", "0", "overwrite"]
    groups = [body for h, body in found.items() if h.startswith("vrrp_sync_group")]
    instances = [body for h, body in found.items() if h.startswith("vrrp_instance")]
    assert len(groups) == 1 and len(instances) >= 2  # the lab: VIPs and the NAT gateway move together
    # keepalived 2.2 ignores tracking weights on sync group members: the group tracks the file
    assert re.search(r"track_file \{\s+openclb_takeover weight 1\s+\}", groups[0])
    for body in instances:
        assert "nopreempt" in body and "track_file" not in body
        # a thawed node's own GARPs may land after the MASTER's answer: a second set 1 s later
        assert re.search(r"^\s+garp_lower_prio_delay 1$", body, re.M), body


def test_nopreempt_notify_and_listener_configuration(ansible_playbook, rendered):
    files = rendered(ansible_playbook, preempt=False)
    for host, own in (("lvs1", 150), ("lvs2", 100)):
        notify = files[host]["openclb-ha-notify"]
        assert f"bonus=$(/usr/local/sbin/openclb-vrrp-peers takeover-value --own {own}) || bonus=0" in notify
        assert "mv /run/openclb/vrrp-takeover.tmp /run/openclb/vrrp-takeover" in notify
    assert json.loads(files["lvs1"]["vrrp-peers.json"])["peers"] == ["203.0.113.12", "10.99.0.12"]
    conf = json.loads(files["lvs2"]["vrrp-peers.json"])
    assert (conf["peers"], conf["vrids"], conf["ipv6"]) == (["203.0.113.11", "10.99.0.11"], [51], False)


def test_preempt_leaves_the_takeover_out(ansible_playbook, rendered):
    files = rendered(ansible_playbook, preempt=True)
    conf = files["lvs2"]["keepalived.conf"]
    assert "track_file" not in conf and "openclb_takeover" not in conf
    assert "preempt_delay 60" in conf and "nopreempt" not in conf
    notify = files["lvs2"]["openclb-ha-notify"]
    assert "takeover-value" not in notify and "vrrp-takeover.tmp" not in notify
    assert "vrrp-state" in notify  # the rest of the notify script is there
