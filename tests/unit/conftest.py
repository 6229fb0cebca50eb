"""Unit-test plumbing: import path for the collection, and a fake IPVS kernel.

Plain `pytest tests/unit` from a checkout: the repository root is the
collection openclb.lb, so link it as ansible_collections/openclb/lb in a
temporary directory on sys.path (ansible-test units already provides it).

The fake replaces pyroute2's `IPVS` socket class, the modules' only system
boundary. Requests are really encoded to netlink bytes with pyroute2's
marshal and decoded again before the fake "kernel" acts on them, and dump
replies are real decoded messages, so the attribute layout (netmask
encoding, flags, daemon NLAs) is exercised, not only the call sequence.
"""

from __future__ import annotations

import atexit
import errno
import importlib.util
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if importlib.util.find_spec("ansible_collections") is None or \
        importlib.util.find_spec("ansible_collections.openclb") is None:
    _tmp = tempfile.mkdtemp(prefix="openclb-units-")
    atexit.register(shutil.rmtree, _tmp, True)
    os.makedirs(os.path.join(_tmp, "ansible_collections", "openclb"))
    os.symlink(ROOT, os.path.join(_tmp, "ansible_collections", "openclb", "lb"))
    sys.path.insert(0, _tmp)

from ansible_collections.openclb.lb.plugins.module_utils import ipvs as ipvs_mu  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402

GENL_ID = 0x20  # any id: the fake registers the message class under it


def _roundtrip(msg):
    """Encode to wire bytes and decode, as the kernel would see it."""
    msg["header"]["type"] = GENL_ID
    msg.encode()
    out = ipvs_mu.ipvs_msg(msg.data)
    out.decode()
    return out


def _attrs(nla):
    return {name: value for name, value in nla["attrs"]}


class FakeKernelTable:
    """What a kernel's IPVS table holds, keyed like the kernel looks things up."""

    def __init__(self):
        self.services = {}  # key -> {"attrs": {...}, "dests": {(addr, port): {...}}}
        self.daemons = {}  # state -> attrs
        self.calls = []  # (verb, kind, service key, dest key or None, attrs)
        self.loaded = True
        self.opened = 0
        self.fail = {}  # (verb, kind) -> errno, to simulate kernel refusals

    @staticmethod
    def svc_key(a):
        if a.get("IPVS_SVC_ATTR_FWMARK"):
            return ("fwmark", a["IPVS_SVC_ATTR_AF"], a["IPVS_SVC_ATTR_FWMARK"])
        return (a["IPVS_SVC_ATTR_PROTOCOL"], a["IPVS_SVC_ATTR_ADDR"], a["IPVS_SVC_ATTR_PORT"])

    @staticmethod
    def dest_key(a):
        return (a["IPVS_DEST_ATTR_ADDR"], a["IPVS_DEST_ATTR_PORT"])

    def record(self, verb, kind, skey, dkey, attrs):
        self.calls.append((verb, kind, skey, dkey, attrs))
        code = self.fail.get((verb, kind))
        if code:
            raise NetlinkError(code)

    # helpers for tests -------------------------------------------------
    def writes(self):
        return [c for c in self.calls if c[0] not in ("dump",)]


class FakeIPVS:
    """Stands in for pyroute2.IPVS (service/dest verbs, genl daemon requests)."""

    table = None  # set by the fixture
    prid = GENL_ID

    def __init__(self):
        if not self.table.loaded:
            raise NetlinkError(errno.ENOENT)
        self.table.opened += 1

        class _Marshal:
            msg_map = {}

        class _Async:
            marshal = _Marshal()

            async def _do_request(self, msg, msg_flags=0):
                raise AssertionError("only reached through _run_with_cleanup")

        self.asyncore = _Async()
        self.closed = False

    def close(self):
        self.closed = True

    # pyroute2 IPVS API -------------------------------------------------
    def service(self, verb, service=None):
        t = self.table
        if verb == "dump":
            t.calls.append(("dump", "service", None, None, None))
            return [self._svc_msg(s) for s in t.services.values()]
        msg = ipvs_mu.ipvs_msg()
        msg["cmd"] = 1
        msg["version"] = 1
        msg["attrs"] = [("IPVS_CMD_ATTR_SERVICE", service.dump_nla())]
        a = _attrs(_roundtrip(msg).get_attr("IPVS_CMD_ATTR_SERVICE"))
        key = t.svc_key(a)
        t.record(verb, "service", key, None, a)
        if verb == "add":
            if key in t.services:
                raise NetlinkError(errno.EEXIST)
            self._check_full(a)
            t.services[key] = {"attrs": a, "dests": {}}
        elif verb == "set":
            if key not in t.services:
                raise NetlinkError(errno.ESRCH)
            self._check_full(a)
            t.services[key]["attrs"] = a
        elif verb == "del":
            if key not in t.services:
                raise NetlinkError(errno.ESRCH)
            del t.services[key]
        else:
            raise AssertionError(f"unexpected service verb {verb}")
        return []

    def dest(self, verb, service, dest=None):
        t = self.table
        msg = ipvs_mu.ipvs_msg()
        msg["cmd"] = 5
        msg["version"] = 1
        msg["attrs"] = [("IPVS_CMD_ATTR_SERVICE", service.dump_key())]
        if dest is not None:
            msg["attrs"].append(("IPVS_CMD_ATTR_DEST", dest.dump_nla()))
        decoded = _roundtrip(msg)
        skey = t.svc_key(_attrs(decoded.get_attr("IPVS_CMD_ATTR_SERVICE")))
        svc = t.services.get(skey)
        if verb == "dump":
            t.calls.append(("dump", "dest", skey, None, None))
            if svc is None:
                raise NetlinkError(errno.ESRCH)
            return [self._dest_msg(d) for d in svc["dests"].values()]
        a = _attrs(decoded.get_attr("IPVS_CMD_ATTR_DEST"))
        dkey = t.dest_key(a)
        t.record(verb, "dest", skey, dkey, a)
        if svc is None:
            raise NetlinkError(errno.ESRCH)
        if verb == "add":
            if dkey in svc["dests"]:
                raise NetlinkError(errno.EEXIST)
            svc["dests"][dkey] = a
        elif verb == "set":
            if dkey not in svc["dests"]:
                raise NetlinkError(errno.ENOENT)
            svc["dests"][dkey] = a
        elif verb == "del":
            if dkey not in svc["dests"]:
                raise NetlinkError(errno.ENOENT)
            del svc["dests"][dkey]
        else:
            raise AssertionError(f"unexpected dest verb {verb}")
        return []

    @staticmethod
    def _check_full(a):
        # ip_vs_genl_parse_service: a full entry needs all of these.
        for name in ("IPVS_SVC_ATTR_SCHED_NAME", "IPVS_SVC_ATTR_FLAGS",
                     "IPVS_SVC_ATTR_TIMEOUT", "IPVS_SVC_ATTR_NETMASK"):
            if name not in a:
                raise NetlinkError(errno.EINVAL)

    @staticmethod
    def _stats(n):
        return {"attrs": [(f"IPVS_STATS_ATTR_{k.upper()}", n) for k in ipvs_mu.STAT_KEYS]}

    def _svc_msg(self, svc):
        a = dict(svc["attrs"])
        flags = a["IPVS_SVC_ATTR_FLAGS"]
        a["IPVS_SVC_ATTR_FLAGS"] = {"flags": flags["flags"] | ipvs_mu.F_HASHED, "mask": 0xFFFFFFFF}
        a["IPVS_SVC_ATTR_STATS64"] = self._stats(7)
        msg = ipvs_mu.ipvs_msg()
        msg["cmd"] = 1
        msg["version"] = 1
        msg["attrs"] = [("IPVS_CMD_ATTR_SERVICE", {"attrs": list(a.items())})]
        return _roundtrip(msg)

    def _dest_msg(self, d):
        a = dict(d)
        a["IPVS_DEST_ATTR_ACTIVE_CONNS"] = 2
        a["IPVS_DEST_ATTR_INACT_CONNS"] = 1
        a["IPVS_DEST_ATTR_PERSIST_CONNS"] = 0
        a["IPVS_DEST_ATTR_STATS64"] = self._stats(3)
        msg = ipvs_mu.ipvs_msg()
        msg["cmd"] = 5
        msg["version"] = 1
        msg["attrs"] = [("IPVS_CMD_ATTR_DEST", {"attrs": list(a.items())})]
        return _roundtrip(msg)

    # raw generic netlink (sync daemons) ---------------------------------
    def _run_with_cleanup(self, func, msg, msg_flags=0):
        assert func.__name__ == "_do_request"
        t = self.table
        decoded = _roundtrip(msg)
        cmd = decoded["cmd"]
        if cmd == ipvs_mu.IPVS_CMD_GET_DAEMON:
            t.calls.append(("dump", "daemon", None, None, None))
            out = []
            for a in t.daemons.values():
                m = ipvs_mu.ipvs_msg()
                m["cmd"] = cmd
                m["version"] = 1
                m["attrs"] = [("IPVS_CMD_ATTR_DAEMON", {"attrs": list(a.items())})]
                out.append(_roundtrip(m))
            return out
        a = _attrs(decoded.get_attr("IPVS_CMD_ATTR_DAEMON"))
        state = a["IPVS_DAEMON_ATTR_STATE"]
        if cmd == ipvs_mu.IPVS_CMD_NEW_DAEMON:
            t.record("new", "daemon", state, None, a)
            if state in t.daemons:
                raise NetlinkError(errno.EEXIST)
            full = {"IPVS_DAEMON_ATTR_SYNC_MAXLEN": 1472, "IPVS_DAEMON_ATTR_MCAST_PORT": 8848,
                    "IPVS_DAEMON_ATTR_MCAST_TTL": 1, "IPVS_DAEMON_ATTR_MCAST_GROUP": "224.0.0.81"}
            if "IPVS_DAEMON_ATTR_MCAST_GROUP6" in a:
                full.pop("IPVS_DAEMON_ATTR_MCAST_GROUP")
            full.update(a)  # the kernel fills defaults, reports everything
            t.daemons[state] = full
        elif cmd == ipvs_mu.IPVS_CMD_DEL_DAEMON:
            t.record("del", "daemon", state, None, a)
            if state not in t.daemons:
                raise NetlinkError(errno.ESRCH)
            del t.daemons[state]
        else:
            raise AssertionError(f"unexpected daemon command {cmd}")
        return []


@pytest.fixture
def kernel_table(monkeypatch):
    """A fresh fake IPVS table; pyroute2's IPVS is replaced by FakeIPVS."""
    table = FakeKernelTable()
    fake = type("FakeIPVSBound", (FakeIPVS,), {"table": table})
    monkeypatch.setattr(ipvs_mu, "IPVS", fake)
    return table
