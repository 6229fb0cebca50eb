"""The ipvs_* modules end to end: argument spec, check mode, diff, results (fake kernel at pyroute2)."""

from __future__ import annotations

import json

import pytest
from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args
from ansible_collections.openclb.lb.plugins.module_utils import ipvs as ipvs_mu
from ansible_collections.openclb.lb.plugins.modules import (
    ipvs_info,
    ipvs_services,
    ipvs_sync_daemon,
    ipvs_virtual_server,
)


class Exit(Exception):
    pass


class Fail(Exception):
    pass


@pytest.fixture(autouse=True)
def exits(monkeypatch):
    def exit_json(self, **kw):
        raise Exit(kw)

    def fail_json(self, **kw):
        raise Fail(kw)

    monkeypatch.setattr(basic.AnsibleModule, "exit_json", exit_json)
    monkeypatch.setattr(basic.AnsibleModule, "fail_json", fail_json)


def run(module, args, check=False):
    args = dict(args)
    if check:
        args["_ansible_check_mode"] = True
    args["_ansible_diff"] = True
    with patch_module_args(args), pytest.raises((Exit, Fail)) as exc:
        module.main()
    result = exc.value.args[0]
    json.dumps(result)  # results must be JSON-serialisable
    if exc.type is Fail:
        result["failed"] = True
    return result


WEB = {"address": "203.0.113.10", "port": 80, "scheduler": "wrr",
       "real_servers": [{"address": "10.99.0.21", "port": 8080},
                        {"address": "10.99.0.22", "port": 8080, "weight": 3}]}


def test_virtual_server_add_idempotent_and_diff(kernel_table):
    r = run(ipvs_virtual_server, WEB)
    assert r["changed"] and len(r["actions"]) == 3
    assert r["diff"]["before"] == {}
    assert r["diff"]["after"]["real_servers"]["10.99.0.22:8080"]["weight"] == 3
    assert r["service"]["scheduler"] == "wrr" and r["service"]["protocol"] == "tcp"
    r = run(ipvs_virtual_server, WEB)
    assert not r["changed"] and r["actions"] == [] and r["diff"]["before"] == r["diff"]["after"]


def test_virtual_server_check_mode(kernel_table):
    r = run(ipvs_virtual_server, WEB, check=True)
    assert r["changed"] and kernel_table.writes() == [] and kernel_table.services == {}
    assert r["diff"]["after"]["scheduler"] == "wrr"


def test_virtual_server_check_mode_does_not_modprobe(kernel_table, monkeypatch):
    kernel_table.loaded = False
    monkeypatch.setattr(basic.AnsibleModule, "run_command",
                        lambda self, *a, **k: pytest.fail("check mode must not run modprobe"))
    r = run(ipvs_virtual_server, WEB, check=True)
    assert r["changed"] and len(r["actions"]) == 3


def test_virtual_server_weight_change_diff(kernel_table):
    run(ipvs_virtual_server, WEB)
    kernel_table.calls.clear()
    args = json.loads(json.dumps(WEB))
    args["real_servers"][1]["weight"] = 0
    r = run(ipvs_virtual_server, args)
    assert r["actions"] == ["set real server tcp 203.0.113.10:80 -> 10.99.0.22:8080 (weight 3 -> 0)"]
    assert [(c[0], c[1]) for c in kernel_table.writes()] == [("set", "dest")]
    assert r["diff"]["before"]["real_servers"]["10.99.0.22:8080"]["weight"] == 3
    assert r["diff"]["after"]["real_servers"]["10.99.0.22:8080"]["weight"] == 0


def test_virtual_server_absent(kernel_table):
    run(ipvs_virtual_server, WEB)
    r = run(ipvs_virtual_server, {"address": "203.0.113.10", "port": 80, "state": "absent"})
    assert r["changed"] and r["service"] == {} and r["diff"]["after"] == {}
    assert kernel_table.services == {}


def test_virtual_server_argspec_errors(kernel_table):
    r = run(ipvs_virtual_server, {"fwmark": 3, "address": "203.0.113.10", "port": 80})
    assert r["failed"] and "mutually exclusive" in r["msg"]
    r = run(ipvs_virtual_server, {"address": "203.0.113.10"})
    assert r["failed"] and "port" in r["msg"]
    r = run(ipvs_virtual_server, {"address": "203.0.113.10", "port": 80,
                                  "real_servers": [{"address": "10.0.0.1", "port": 81, "forwarding": "dr"}]})
    assert r["failed"] and r["msg"].startswith("real_servers[0].port: 81 differs from the service port 80")
    assert kernel_table.writes() == []


def test_virtual_server_fwmark_ipv6(kernel_table):
    args = {"fwmark": 9, "family": "ipv6", "scheduler": "sh", "flags": ["sh-fallback"], "persistence": 30,
            "real_servers": [{"address": "2001:db8:1::21", "forwarding": "dr"}]}
    r = run(ipvs_virtual_server, args)
    assert r["changed"] and r["service"]["fwmark"] == 9 and r["service"]["family"] == 6
    assert not run(ipvs_virtual_server, args)["changed"]


def test_services_purge_and_check_mode(kernel_table):
    other = {"protocol": "udp", "address": "203.0.113.10", "port": 53, "scheduler": "rr", "flags": ["one-packet"],
             "real_servers": [{"address": "10.99.0.21", "port": 5353}]}
    r = run(ipvs_services, {"services": [WEB, other]})
    assert r["changed"] and set(r["services"]) == {"tcp 203.0.113.10:80", "udp 203.0.113.10:53"}
    assert not run(ipvs_services, {"services": [WEB, other]})["changed"]

    kernel_table.calls.clear()
    r = run(ipvs_services, {"services": [WEB], "purge": True}, check=True)
    assert r["actions"] == ["del service udp 203.0.113.10:53"] and kernel_table.writes() == []
    assert set(r["diff"]["before"]) == {"tcp 203.0.113.10:80", "udp 203.0.113.10:53"}
    assert set(r["diff"]["after"]) == {"tcp 203.0.113.10:80"}

    r = run(ipvs_services, {"services": [WEB], "purge": True})
    assert r["changed"] and len(kernel_table.services) == 1


def test_services_error_names_entry(kernel_table):
    r = run(ipvs_services, {"services": [WEB, {"address": "203.0.113.10", "port": 80}]})
    assert r["failed"] and r["msg"] == "services[1]: duplicate of services[0] (tcp 203.0.113.10:80)"
    assert kernel_table.calls == []


def test_info(kernel_table):
    run(ipvs_virtual_server, WEB)
    r = run(ipvs_info, {})
    assert r["loaded"] and not r["changed"] and r["sync_daemons"] == []
    (s,) = r["services"]
    assert s["stats"]["conns"] == 7 and s["real_servers"][0]["active_conns"] == 2
    r = run(ipvs_info, {"stats": False})
    assert "stats" not in r["services"][0] and "stats" not in r["services"][0]["real_servers"][0]
    assert r["services"][0]["real_servers"][0]["inactive_conns"] == 1


def test_info_without_ip_vs(kernel_table):
    kernel_table.loaded = False
    r = run(ipvs_info, {})
    assert r == {"changed": False, "loaded": False, "services": [], "sync_daemons": []}


def test_sync_daemon_start_change_stop(kernel_table):
    args = {"role": ["master", "backup"], "interface": "eth1", "syncid": 1}
    r = run(ipvs_sync_daemon, args, check=True)
    assert r["changed"] and kernel_table.writes() == [] and set(r["diff"]["after"]) == {"master", "backup"}
    r = run(ipvs_sync_daemon, args)
    assert r["actions"] == ["start master on eth1 syncid 1", "start backup on eth1 syncid 1"]
    assert len(r["sync_daemons"]) == 2
    assert not run(ipvs_sync_daemon, args)["changed"]

    kernel_table.calls.clear()
    r = run(ipvs_sync_daemon, dict(args, role=["master"], ttl=3))
    assert r["actions"] == ["stop master (ttl 1 -> 3)", "start master on eth1 syncid 1 (ttl 1 -> 3)"]
    assert [(c[0], c[2]) for c in kernel_table.writes()] == [("del", 1), ("new", 1)]
    assert r["diff"]["before"]["master"]["ttl"] == 1 and r["diff"]["after"]["master"]["ttl"] == 3

    r = run(ipvs_sync_daemon, {"role": ["backup"], "state": "absent"})
    assert r["actions"] == ["stop backup"] and [d["role"] for d in r["sync_daemons"]] == ["master"]


def test_sync_daemon_needs_interface(kernel_table):
    r = run(ipvs_sync_daemon, {"role": ["master"]})
    assert r["failed"] and "interface" in r["msg"]


def test_missing_pyroute2_is_reported(kernel_table, monkeypatch):
    monkeypatch.setattr(ipvs_mu, "PYROUTE2_IMPORT_ERROR", "Traceback: No module named 'pyroute2'")
    for module, args in ((ipvs_virtual_server, WEB), (ipvs_info, {}),
                         (ipvs_sync_daemon, {"role": ["master"], "interface": "eth0"})):
        r = run(module, args)
        assert r["failed"] and "pyroute2 >= 0.9.7" in r["msg"]
