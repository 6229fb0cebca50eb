"""module_utils/ipvs: validation, diff, apply, wire layout (fake kernel at the pyroute2 boundary)."""

from __future__ import annotations

import errno
import socket

import pytest
from ansible_collections.openclb.lb.plugins.module_utils import ipvs
from pyroute2.netlink.exceptions import NetlinkError

V4 = "203.0.113.10"


def svc(**kw):
    raw = {"address": V4, "port": 80, "scheduler": "wrr",
           "real_servers": [{"address": "10.99.0.21", "port": 8080},
                            {"address": "10.99.0.22", "port": 8080, "weight": 3}]}
    raw.update(kw)
    return raw


def converge(raws, purge=False, check_mode=False):
    kernel = ipvs.Kernel()
    try:
        return ipvs.run_services(kernel, ipvs.normalize_services(raws), purge, check_mode)
    finally:
        kernel.close()


def writes(table):
    return [(c[0], c[1]) for c in table.writes()]


# ---- validation --------------------------------------------------------
@pytest.mark.parametrize("raw, message", [
    ({"port": 80}, "services[0].address: required (or fwmark)"),
    ({"address": "10.0.0.300", "port": 80}, "services[0].address: '10.0.0.300' is not an IP address"),
    ({"address": V4}, "services[0].port: required"),
    ({"address": V4, "port": 70000}, "services[0].port: 70000 is out of range 0-65535"),
    ({"address": V4, "port": 80, "protocol": "icmp"}, "services[0].protocol: 'icmp' is not one of"),
    ({"fwmark": 5, "port": 80}, "services[0].port: not allowed with fwmark"),
    ({"address": V4, "port": 80, "scheduler": "rr;rm"}, "services[0].scheduler: 'rr;rm' is not a scheduler"),
    ({"address": V4, "port": 80, "flags": ["sh-port"]}, "services[0].flags: 'sh-port' needs scheduler sh"),
    ({"address": V4, "port": 80, "persistence": 60, "persistence_netmask": "255.0.255.0"},
     "services[0].persistence_netmask: '255.0.255.0' is not a contiguous netmask"),
    ({"address": V4, "port": 80, "real_servers": [{"address": "10.0.0.1", "port": 81, "forwarding": "dr"}]},
     "services[0].real_servers[0].port: 81 differs from the service port 80, impossible with dr forwarding"),
    ({"address": V4, "port": 80, "real_servers": [{"address": "2001:db8::1", "port": 80}]},
     "services[0].real_servers[0].address: IPv6 real server in an IPv4 service needs tun forwarding"),
    ({"address": V4, "port": 80, "real_servers": [{"address": "10.0.0.1", "forwarding": "fast"}]},
     "services[0].real_servers[0].forwarding: 'fast' is not one of nat, dr, tun"),
    ({"address": V4, "port": 80, "real_servers": [{"address": "10.0.0.1", "weight": -1}]},
     "services[0].real_servers[0].weight: -1 is out of range"),
    ({"address": V4, "port": 80, "real_servers": [{"address": "10.0.0.1", "upper_threshold": 5,
                                                  "lower_threshold": 9}]},
     "services[0].real_servers[0].lower_threshold: 9 is above upper_threshold 5"),
    ({"address": V4, "port": 80, "real_servers": [{"address": "10.0.0.1"}, {"address": "10.0.0.1", "port": 80}]},
     "services[0].real_servers[1]: duplicate of real_servers[0] (10.0.0.1:80)"),
])
def test_validation_names_the_field(raw, message):
    with pytest.raises(ipvs.IPVSError) as exc:
        ipvs.normalize_services([raw])
    assert message in str(exc.value)


def test_duplicate_services_refused():
    with pytest.raises(ipvs.IPVSError, match=r"services\[1\]: duplicate of services\[0\] \(tcp 203.0.113.10:80\)"):
        ipvs.normalize_services([svc(), svc(address="203.0.113.010".replace("010", "10"))])


def test_validation_happens_before_any_change(kernel_table):
    with pytest.raises(ipvs.IPVSError):
        converge([svc(), {"address": V4, "port": "http"}])
    assert kernel_table.calls == []


def test_normalisation_defaults_and_aliases():
    (s, state, purge_rs), = ipvs.normalize_services([{
        "address": "2001:DB8::0:1", "port": 443, "persistence": 60, "persistence_netmask": "64",
        "real_servers": [{"address": "2001:db8:1::5", "forwarding": "route"}]}])
    assert s["address"] == "2001:db8::1" and s["family"] == 6 and s["protocol"] == "tcp"
    assert s["scheduler"] == "wlc" and s["persistence_netmask"] == 64
    assert s["real_servers"] == [{"address": "2001:db8:1::5", "port": 443, "forwarding": "dr", "weight": 1,
                                  "upper_threshold": 0, "lower_threshold": 0}]
    assert (state, purge_rs) == ("present", True)


# ---- wire layout -------------------------------------------------------
def test_ipv6_netmask_is_a_host_order_prefix_length():
    # libipvs sends NLA_PUT_U32(netmask=128) for IPv6; the kernel reads it back unswapped.
    raw = socket.inet_aton(ipvs.netmask_to_wire(6, 128))
    assert int.from_bytes(raw, "little" if socket.htons(1) != 1 else "big") == 128
    assert ipvs.netmask_from_wire(6, ipvs.netmask_to_wire(6, 64)) == 64
    assert ipvs.netmask_to_wire(4, 24) == "255.255.255.0"
    assert ipvs.netmask_from_wire(4, "255.255.255.0") == 24


def test_persistent_flag_follows_persistence(kernel_table):
    converge([svc(persistence=300, persistence_netmask="255.255.255.0", scheduler="sh",
                  flags=["sh-fallback", "sh-port"])])
    a = kernel_table.calls[1][4]
    assert a["IPVS_SVC_ATTR_TIMEOUT"] == 300
    assert a["IPVS_SVC_ATTR_NETMASK"] == "255.255.255.0"
    assert a["IPVS_SVC_ATTR_FLAGS"]["flags"] == ipvs.F_PERSISTENT | ipvs.F_SCHED1 | ipvs.F_SCHED2
    (read,) = ipvs.read_services(ipvs.Kernel())
    assert read["persistence"] == 300 and read["persistence_netmask"] == 24
    assert read["flags"] == ["sh-fallback", "sh-port"]  # HASHED from the kernel is not a user flag


# ---- diff and apply ----------------------------------------------------
def test_add_then_no_change(kernel_table):
    changed, actions, before, after = converge([svc()])
    assert changed
    assert writes(kernel_table) == [("add", "service"), ("add", "dest"), ("add", "dest")]
    assert actions == [
        "add service tcp 203.0.113.10:80 scheduler wrr",
        "add real server tcp 203.0.113.10:80 -> 10.99.0.21:8080 nat weight 1",
        "add real server tcp 203.0.113.10:80 -> 10.99.0.22:8080 nat weight 3",
    ]
    dest = kernel_table.calls[-1][4]
    assert dest["IPVS_DEST_ATTR_WEIGHT"] == 3 and dest["IPVS_DEST_ATTR_FWD_METHOD"] == 0
    assert before == {}
    assert after["tcp 203.0.113.10:80"]["real_servers"]["10.99.0.22:8080"]["weight"] == 3

    kernel_table.calls.clear()
    changed, actions, before, after = converge([svc()])
    assert not changed and actions == [] and before == after
    assert kernel_table.writes() == []


def test_weight_change_uses_set_and_touches_nothing_else(kernel_table):
    converge([svc()])
    kernel_table.calls.clear()
    raw = svc()
    raw["real_servers"][0]["weight"] = 5
    changed, actions, _b, _a = converge([raw])
    assert changed
    assert [(c[0], c[1], c[3]) for c in kernel_table.writes()] == [("set", "dest", ("10.99.0.21", 8080))]
    assert kernel_table.writes()[0][4]["IPVS_DEST_ATTR_WEIGHT"] == 5
    assert actions == ["set real server tcp 203.0.113.10:80 -> 10.99.0.21:8080 (weight 1 -> 5)"]


def test_scheduler_change_uses_set_service(kernel_table):
    converge([svc()])
    kernel_table.calls.clear()
    converge([svc(scheduler="lc")])
    assert writes(kernel_table) == [("set", "service")]
    assert kernel_table.writes()[0][4]["IPVS_SVC_ATTR_SCHED_NAME"] == "lc"


def test_unlisted_dest_removed_unless_purge_real_servers_false(kernel_table):
    converge([svc()])
    kernel_table.calls.clear()
    raw = svc()
    raw["real_servers"] = raw["real_servers"][:1]
    keep = dict(raw, purge_real_servers=False)
    changed, _a, _b, after = converge([keep])
    assert not changed and "10.99.0.22:8080" in after["tcp 203.0.113.10:80"]["real_servers"]
    changed, actions, _b, after = converge([raw])
    assert [(c[0], c[1], c[3]) for c in kernel_table.writes()] == [("del", "dest", ("10.99.0.22", 8080))]
    assert list(after["tcp 203.0.113.10:80"]["real_servers"]) == ["10.99.0.21:8080"]


def test_explicit_absent_real_server_removed(kernel_table):
    converge([svc()])
    kernel_table.calls.clear()
    raw = dict(svc(), purge_real_servers=False)
    raw["real_servers"] = [{"address": "10.99.0.22", "port": 8080, "state": "absent"}]
    converge([raw])
    assert [(c[0], c[1], c[3]) for c in kernel_table.writes()] == [("del", "dest", ("10.99.0.22", 8080))]


def test_service_removal(kernel_table):
    converge([svc()])
    kernel_table.calls.clear()
    changed, actions, before, after = converge([svc(state="absent")])
    assert changed and writes(kernel_table) == [("del", "service")]
    assert actions == ["del service tcp 203.0.113.10:80"]
    assert "tcp 203.0.113.10:80" in before and after == {}
    assert kernel_table.services == {}
    kernel_table.calls.clear()
    assert converge([svc(state="absent")])[0] is False


def test_purge_removes_unlisted_services_only(kernel_table):
    converge([svc(), svc(port=81), svc(protocol="udp", port=53)])
    kernel_table.calls.clear()
    changed, actions, before, after = converge([svc()], purge=True)
    assert sorted(actions) == ["del service tcp 203.0.113.10:81", "del service udp 203.0.113.10:53"]
    assert set(before) == {"tcp 203.0.113.10:80", "tcp 203.0.113.10:81", "udp 203.0.113.10:53"}
    assert set(after) == {"tcp 203.0.113.10:80"}
    assert list(kernel_table.services) == [(6, V4, 80)]


def test_no_purge_leaves_other_services(kernel_table):
    converge([svc(), svc(port=81)])
    kernel_table.calls.clear()
    assert converge([svc()])[0] is False
    assert len(kernel_table.services) == 2


def test_check_mode_makes_no_write_calls(kernel_table):
    converge([svc()])
    kernel_table.calls.clear()
    raw = svc(scheduler="rr")
    raw["real_servers"] = [{"address": "10.99.0.23", "port": 8080}]
    changed, actions, before, after = converge([raw, svc(port=443)], purge=True, check_mode=True)
    assert changed and len(actions) == 7  # set svc, del 2 + add 1 dest, add svc + 2 dests
    assert kernel_table.writes() == []
    assert before["tcp 203.0.113.10:80"]["scheduler"] == "wrr"
    assert after["tcp 203.0.113.10:80"]["scheduler"] == "rr"
    assert list(after["tcp 203.0.113.10:80"]["real_servers"]) == ["10.99.0.23:8080"]


def test_ipv6_service_and_dests(kernel_table):
    raw = {"address": "2001:db8::10", "port": 443, "scheduler": "mh", "flags": ["mh-port"],
           "persistence": 60, "persistence_netmask": 48,
           "real_servers": [{"address": "2001:db8:1::21", "forwarding": "dr"},
                            {"address": "10.99.0.21", "forwarding": "tun"}]}
    converge([raw])
    add = kernel_table.calls[1][4]
    assert add["IPVS_SVC_ATTR_AF"] == socket.AF_INET6 and add["IPVS_SVC_ATTR_ADDR"] == "2001:db8::10"
    assert ipvs.netmask_from_wire(6, add["IPVS_SVC_ATTR_NETMASK"]) == 48
    dests = {c[3]: c[4] for c in kernel_table.calls if c[1] == "dest"}
    assert dests[("2001:db8:1::21", 443)]["IPVS_DEST_ATTR_FWD_METHOD"] == 3
    assert dests[("10.99.0.21", 443)]["IPVS_DEST_ATTR_ADDR_FAMILY"] == socket.AF_INET
    assert dests[("10.99.0.21", 443)]["IPVS_DEST_ATTR_FWD_METHOD"] == 2
    kernel_table.calls.clear()
    assert converge([raw])[0] is False  # reads back identically (prefix, flags, families)


def test_fwmark_service(kernel_table):
    raw = {"fwmark": 7, "family": "ipv6", "scheduler": "rr",
           "real_servers": [{"address": "2001:db8:1::21", "forwarding": "dr"}]}
    changed, actions, _b, after = converge([raw])
    assert actions[0] == "add service fwmark 7 ipv6 scheduler rr"
    add = kernel_table.calls[1][4]
    assert add["IPVS_SVC_ATTR_FWMARK"] == 7 and "IPVS_SVC_ATTR_ADDR" not in add
    assert ipvs.netmask_from_wire(6, add["IPVS_SVC_ATTR_NETMASK"]) == 128
    assert after["fwmark 7 ipv6"]["real_servers"] == {
        "[2001:db8:1::21]:0": {"forwarding": "dr", "weight": 1, "upper_threshold": 0, "lower_threshold": 0}}
    kernel_table.calls.clear()
    assert converge([raw])[0] is False
    # an IPv4 service with the same mark is a different service
    converge([dict(raw, family="ipv4", real_servers=[])])
    assert len(kernel_table.services) == 2


def test_kernel_refusal_names_the_action(kernel_table):
    kernel_table.fail[("add", "service")] = errno.ENOENT
    with pytest.raises(ipvs.IPVSError, match=r"add service tcp 203.0.113.10:80 scheduler nosuch failed: .*ip_vs_nosuch"):
        converge([svc(scheduler="nosuch")])


def test_missing_family_loads_ip_vs_once(kernel_table):
    kernel_table.loaded = False
    ran = []

    def run_command(argv):
        ran.append(argv)
        kernel_table.loaded = True
        return 0, "", ""

    k = ipvs.Kernel(run_command=run_command)
    assert ran == [["modprobe", "ip_vs"]] and k.available


def test_missing_family_in_check_mode_reads_empty(kernel_table):
    kernel_table.loaded = False
    k = ipvs.Kernel(run_command=lambda argv: pytest.fail("must not modprobe"), load_module=False)
    assert not k.available and ipvs.read_services(k) == [] and ipvs.read_daemons(k) == []


def test_modprobe_failure_is_reported(kernel_table):
    kernel_table.loaded = False
    with pytest.raises(ipvs.IPVSError, match="modprobe ip_vs failed: FATAL: Module ip_vs not found"):
        ipvs.Kernel(run_command=lambda argv: (1, "", "FATAL: Module ip_vs not found\n"))


def test_a_request_the_kernel_never_answers_fails_the_task(kernel_table):
    """No answer within NETLINK_TIMEOUT: a clear error (the lab once saw a request hang), not a hung rollout."""
    k = ipvs.Kernel()
    kernel_table.silent = True
    with pytest.raises(ipvs.IPVSError, match=r"IPVS netlink service dump: no complete answer from the kernel "
                                             rf"within {ipvs.NETLINK_TIMEOUT} s"):
        ipvs.read_services(k)
    (sock,) = kernel_table.sockets
    assert 0 < sock.timeout <= ipvs.NETLINK_TIMEOUT
    k.close()
    assert sock.closed


def test_answers_to_an_earlier_request_are_skipped(kernel_table):
    """Only the answer with this request's sequence number counts (a late one follows a timeout)."""
    kernel_table.late_answer = True
    converge([svc(), svc(port=443)])
    (a, b) = ipvs.read_services(ipvs.Kernel())
    assert (a["port"], b["port"]) == (80, 443) and len(a["real_servers"]) == 2


def test_a_kernel_refusal_carries_its_errno(kernel_table):
    converge([svc()])
    k = ipvs.Kernel()
    with pytest.raises(NetlinkError) as exc:
        k.service("add", ipvs.normalize_services([svc()])[0][0])
    assert exc.value.code == errno.EEXIST


def test_read_with_stats(kernel_table):
    converge([svc()])
    (s,) = ipvs.read_services(ipvs.Kernel(), with_stats=True)
    assert s["stats"]["conns"] == 7 and set(s["stats"]) == set(ipvs.STAT_KEYS)
    rs = s["real_servers"][0]
    assert (rs["active_conns"], rs["inactive_conns"], rs["persist_conns"]) == (2, 1, 0)
    assert rs["stats"]["inbytes"] == 3


# ---- sync daemons -------------------------------------------------------
def daemon(role, **kw):
    params = {"interface": "eth1", "syncid": 1, "mcast_group": None, "port": None, "ttl": None, "maxlen": None}
    params.update(kw)
    return ipvs.normalize_daemon(role, params)


def test_daemon_start_then_idempotent(kernel_table):
    k = ipvs.Kernel()
    actions = ipvs.daemon_plan(ipvs.read_daemons(k), {"master": daemon("master"), "backup": daemon("backup")})
    assert [(a["op"], a["role"]) for a in actions] == [("start", "master"), ("start", "backup")]
    ipvs.apply_daemons(k, actions)
    new = [c for c in kernel_table.calls if c[0] == "new"]
    assert new[0][4] == {"IPVS_DAEMON_ATTR_STATE": 1, "IPVS_DAEMON_ATTR_MCAST_IFN": "eth1",
                         "IPVS_DAEMON_ATTR_SYNC_ID": 1}
    current = ipvs.read_daemons(k)
    assert current[0] == {"role": "backup", "interface": "eth1", "syncid": 1, "maxlen": 1472,
                          "mcast_group": "224.0.0.81", "port": 8848, "ttl": 1}
    # unset parameters accept kernel defaults; explicit equal ones too
    assert ipvs.daemon_plan(current, {"master": daemon("master", port=8848, ttl=1)}) == []


def test_daemon_param_change_is_stop_then_start(kernel_table):
    k = ipvs.Kernel()
    ipvs.apply_daemons(k, ipvs.daemon_plan([], {"master": daemon("master")}))
    kernel_table.calls.clear()
    want = daemon("master", ttl=2, mcast_group="ff02::81", port=9000, maxlen=1400)
    actions = ipvs.daemon_plan(ipvs.read_daemons(k), {"master": want})
    assert [a["op"] for a in actions] == ["stop", "start"]
    assert actions[0]["changes"]["ttl"] == (1, 2)
    ipvs.apply_daemons(k, actions)
    assert [(c[0], c[2]) for c in kernel_table.writes()] == [("del", 1), ("new", 1)]
    sent = kernel_table.writes()[1][4]
    assert sent["IPVS_DAEMON_ATTR_MCAST_GROUP6"] == "ff02::81"
    assert (sent["IPVS_DAEMON_ATTR_MCAST_PORT"], sent["IPVS_DAEMON_ATTR_MCAST_TTL"],
            sent["IPVS_DAEMON_ATTR_SYNC_MAXLEN"]) == (9000, 2, 1400)
    (m,) = ipvs.read_daemons(k)
    assert m["mcast_group"] == "ff02::81" and m["ttl"] == 2


def test_daemon_stop(kernel_table):
    k = ipvs.Kernel()
    ipvs.apply_daemons(k, ipvs.daemon_plan([], {"backup": daemon("backup")}))
    actions = ipvs.daemon_plan(ipvs.read_daemons(k), {"backup": None, "master": None})
    assert [(a["op"], a["role"]) for a in actions] == [("stop", "backup")]
    ipvs.apply_daemons(k, actions)
    assert ipvs.read_daemons(k) == []


@pytest.mark.parametrize("role, kw, message", [
    ("master", {"interface": "a-very-long-interface-name"}, "interface: 'a-very-long-interface-name'"),
    ("master", {"mcast_group": "10.0.0.1"}, "mcast_group: 10.0.0.1 is not a multicast address"),
    ("backup", {"maxlen": 600}, "maxlen: 600 is out of range 1024-65507"),
    ("master", {"syncid": 300}, "syncid: 300 is out of range 0-255"),
])
def test_daemon_validation(role, kw, message):
    with pytest.raises(ipvs.IPVSError, match=message):
        daemon(role, **kw)
