"""Unit-test plumbing: import path for the collection, role scripts as
modules, ansible-playbook runs, and a fake IPVS kernel.

Plain `pytest tests/unit` from a checkout: the repository root is the
collection openclb.lb, so link it as ansible_collections/openclb/lb in a
temporary directory on sys.path (ansible-test units already provides it).
The `ansible_playbook` fixture runs the venv's ansible-playbook with that
directory as the collections path.

The fake replaces the generic netlink socket itself, the modules' only system
boundary (module_utils GenlSocket.new_socket). Requests arrive as the
netlink bytes module_utils sends and are decoded with pyroute2 before the
fake "kernel" acts on them; answers go back as kernel datagrams (dump parts,
NLMSG_DONE, NLMSG_ERROR), so the framing, sequence matching and attribute
layout (netmask encoding, flags, daemon NLAs) are exercised, not only the
call sequence.
"""

from __future__ import annotations

import atexit
import errno
import importlib.machinery
import importlib.util
import os
import shutil
import struct
import subprocess
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
from pyroute2.netlink import ctrlmsg  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402
from pyroute2.netlink.generic import ipvs as genl_ipvs  # noqa: E402

# The directory holding ansible_collections/openclb/lb (the link above, or
# ansible-test's tree).
COLLECTIONS_PATH = os.path.dirname(os.path.dirname(os.path.dirname(
    list(importlib.util.find_spec("ansible_collections.openclb.lb").submodule_search_locations)[0])))
PLAYBOOK = os.path.join(os.path.dirname(sys.executable), "ansible-playbook")


@pytest.fixture(scope="session")
def load_script():
    """load(path): a Python script a role installs (no .py ending) imported as
    a module, so that tests call its functions."""

    def load(path):
        loader = importlib.machinery.SourceFileLoader(os.path.basename(path).replace("-", "_"), path)
        spec = importlib.util.spec_from_loader(loader.name, loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        return module

    return load


@pytest.fixture
def ansible_playbook():
    """run(inventory, playbook, *args): ansible-playbook from the repository
    root with this collection, plain JSON results, no colour."""
    env = dict(
        os.environ,
        ANSIBLE_COLLECTIONS_PATH=COLLECTIONS_PATH,
        ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_CALLBACK_RESULT_FORMAT="json",
        ANSIBLE_LOCALHOST_WARNING="0",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="0",
    )

    def run(inventory, playbook, *args):
        return subprocess.run(
            [PLAYBOOK, "-i", inventory, playbook, *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    return run


GENL_ID = 0x20  # any id: the fake registers the message class under it


def _attrs(nla):
    return dict(nla["attrs"])


class FakeKernelTable:
    """What a kernel's IPVS table holds, keyed like the kernel looks things up."""

    def __init__(self):
        self.services = {}  # key -> {"attrs": {...}, "dests": {(addr, port): {...}}}
        self.daemons = {}  # state -> attrs
        self.calls = []  # (verb, kind, service key, dest key or None, attrs)
        self.loaded = True
        self.opened = 0  # successful family lookups
        self.sockets = []
        self.silent = False  # IPVS requests get no answer (a hung kernel or library)
        self.late_answer = False  # each answer comes after a stray one for the previous sequence
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


class FakeNetlinkSocket:
    """Stands in for the generic netlink socket under module_utils' GenlSocket.

    It takes the request bytes, decodes them with pyroute2 (the family lookup
    and every IPVS command), acts on the table and answers with the datagrams
    a kernel sends: dump parts flagged NLM_F_MULTI then NLMSG_DONE, or an
    NLMSG_ERROR carrying 0 (the acknowledgement) or the errno.
    """

    table = None  # set by the fixture

    def __init__(self, *_args):
        self.answers = []
        self.timeout = None
        self.closed = False
        self.table.sockets.append(self)

    def bind(self, _addr):
        pass

    def settimeout(self, seconds):
        self.timeout = seconds

    def close(self):
        self.closed = True

    def recv(self, _bufsize):
        if not self.answers:
            raise TimeoutError("timed out")  # what a silent kernel looks like
        return self.answers.pop(0)

    def sendto(self, data, _addr):
        _length, mtype, flags, seq, _port = ipvs_mu.NLMSG_HDR.unpack_from(data)
        t = self.table
        if t.late_answer:  # an earlier request's answer arriving late: skipped by sequence
            self.answers.append(self._error(seq - 1, 0))
        try:
            if mtype == ipvs_mu.GENL_ID_CTRL:
                replies = self._family(data)
            elif t.silent:
                return
            else:
                replies = self._ipvs(data)
        except NetlinkError as exc:
            self.answers.append(self._error(seq, exc.code))
            return
        parts = []
        for msg in replies:
            msg["header"]["type"] = GENL_ID if mtype != ipvs_mu.GENL_ID_CTRL else mtype
            msg["header"]["flags"] = ipvs_mu.NLM_F_MULTI if flags & ipvs_mu.NLM_F_DUMP else 0
            msg["header"]["sequence_number"] = seq
            msg.encode()
            parts.append(msg.data)
        if flags & ipvs_mu.NLM_F_DUMP:
            # two datagrams when there is more than one part, as long dumps are
            half = max(len(parts) // 2, 1)
            if parts:
                self.answers.append(b"".join(parts[:half]))
            self.answers.append(b"".join(parts[half:]) + self._done(seq))
        else:
            self.answers.append(b"".join(parts) + self._error(seq, 0))

    @staticmethod
    def _done(seq):
        return ipvs_mu.NLMSG_HDR.pack(20, ipvs_mu.NLMSG_DONE, ipvs_mu.NLM_F_MULTI, seq, 0) + struct.pack("i", 0)

    @staticmethod
    def _error(seq, code):
        request = ipvs_mu.NLMSG_HDR.pack(16, GENL_ID, 0, seq, 0)
        return ipvs_mu.NLMSG_HDR.pack(36, ipvs_mu.NLMSG_ERROR, 0, seq, 0) + struct.pack("i", -code) + request

    def _family(self, data):
        msg = ctrlmsg(data)
        msg.decode()
        if not self.table.loaded or msg.get_attr("CTRL_ATTR_FAMILY_NAME") != "IPVS":
            raise NetlinkError(errno.ENOENT)
        self.table.opened += 1
        reply = ctrlmsg()
        reply["cmd"] = 1  # CTRL_CMD_NEWFAMILY
        reply["version"] = 2
        reply["attrs"] = [("CTRL_ATTR_FAMILY_ID", GENL_ID), ("CTRL_ATTR_FAMILY_NAME", "IPVS")]
        return [reply]

    def _ipvs(self, data):
        msg = ipvs_mu.ipvs_msg(data)
        msg.decode()
        cmd = msg["cmd"]
        for kind, handler in (("SERVICE", self._service), ("DEST", self._dest), ("DAEMON", self._daemon)):
            for verb in ("NEW", "SET", "DEL", "GET"):
                if cmd == getattr(genl_ipvs, f"IPVS_CMD_{verb}_{kind}", None):
                    return handler(VERBS[verb], msg)
        raise AssertionError(f"unexpected IPVS command {cmd}")

    def _service(self, verb, msg):
        t = self.table
        if verb == "dump":
            t.calls.append(("dump", "service", None, None, None))
            return [self._svc_msg(s) for s in t.services.values()]
        a = _attrs(msg.get_attr("IPVS_CMD_ATTR_SERVICE"))
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
        else:
            if key not in t.services:
                raise NetlinkError(errno.ESRCH)
            del t.services[key]
        return []

    def _dest(self, verb, msg):
        t = self.table
        skey = t.svc_key(_attrs(msg.get_attr("IPVS_CMD_ATTR_SERVICE")))
        svc = t.services.get(skey)
        if verb == "dump":
            t.calls.append(("dump", "dest", skey, None, None))
            if svc is None:
                raise NetlinkError(errno.ESRCH)
            return [self._dest_msg(d) for d in svc["dests"].values()]
        a = _attrs(msg.get_attr("IPVS_CMD_ATTR_DEST"))
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
        else:
            if dkey not in svc["dests"]:
                raise NetlinkError(errno.ENOENT)
            del svc["dests"][dkey]
        return []

    def _daemon(self, verb, msg):
        t = self.table
        if verb == "dump":
            t.calls.append(("dump", "daemon", None, None, None))
            out = []
            for a in t.daemons.values():
                m = ipvs_mu.ipvs_msg()
                m["cmd"] = genl_ipvs.IPVS_CMD_NEW_DAEMON
                m["version"] = 1
                m["attrs"] = [("IPVS_CMD_ATTR_DAEMON", {"attrs": list(a.items())})]
                out.append(m)
            return out
        a = _attrs(msg.get_attr("IPVS_CMD_ATTR_DAEMON"))
        state = a["IPVS_DAEMON_ATTR_STATE"]
        t.record("new" if verb == "add" else verb, "daemon", state, None, a)
        if verb == "add":
            if state in t.daemons:
                raise NetlinkError(errno.EEXIST)
            full = {"IPVS_DAEMON_ATTR_SYNC_MAXLEN": 1472, "IPVS_DAEMON_ATTR_MCAST_PORT": 8848,
                    "IPVS_DAEMON_ATTR_MCAST_TTL": 1, "IPVS_DAEMON_ATTR_MCAST_GROUP": "224.0.0.81"}
            if "IPVS_DAEMON_ATTR_MCAST_GROUP6" in a:
                full.pop("IPVS_DAEMON_ATTR_MCAST_GROUP")
            full.update(a)  # the kernel fills defaults, reports everything
            t.daemons[state] = full
        elif verb == "del":
            if state not in t.daemons:
                raise NetlinkError(errno.ESRCH)
            del t.daemons[state]
        else:
            raise AssertionError(f"unexpected daemon verb {verb}")
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
        msg["cmd"] = genl_ipvs.IPVS_CMD_NEW_SERVICE
        msg["version"] = 1
        msg["attrs"] = [("IPVS_CMD_ATTR_SERVICE", {"attrs": list(a.items())})]
        return msg

    def _dest_msg(self, d):
        a = dict(d)
        a["IPVS_DEST_ATTR_ACTIVE_CONNS"] = 2
        a["IPVS_DEST_ATTR_INACT_CONNS"] = 1
        a["IPVS_DEST_ATTR_PERSIST_CONNS"] = 0
        a["IPVS_DEST_ATTR_STATS64"] = self._stats(3)
        msg = ipvs_mu.ipvs_msg()
        msg["cmd"] = genl_ipvs.IPVS_CMD_NEW_DEST
        msg["version"] = 1
        msg["attrs"] = [("IPVS_CMD_ATTR_DEST", {"attrs": list(a.items())})]
        return msg


VERBS = {"NEW": "add", "SET": "set", "DEL": "del", "GET": "dump"}


@pytest.fixture
def kernel_table(monkeypatch):
    """A fresh fake IPVS table behind a fake netlink socket (FakeNetlinkSocket)."""
    table = FakeKernelTable()
    fake = type("FakeNetlinkSocketBound", (FakeNetlinkSocket,), {"table": table})
    monkeypatch.setattr(ipvs_mu.GenlSocket, "new_socket", fake)
    return table
