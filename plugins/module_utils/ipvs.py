# Copyright: openclb developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""IPVS state over generic netlink (pyroute2), shared by the ipvs_* modules.

One home for: reading the kernel table (services, real servers, sync daemons),
normalising it to plain dicts, validating wanted state, computing the
difference and applying only that difference. Nothing here shells out to
ipvsadm; the only external command is `modprobe ip_vs` when the generic
netlink family is missing.

Plain dict forms (what modules take and return):

service: {protocol: tcp|udp|sctp|None, fwmark: int|None, family: 4|6,
          address: str|None, port: int|None, scheduler: str,
          persistence: int (seconds, 0 = off), persistence_netmask: int (prefix),
          flags: [one-packet, sh-fallback, sh-port, mh-fallback, mh-port, ...],
          real_servers: [real_server, ...]}
real_server: {address, port, forwarding: nat|dr|tun, weight,
              upper_threshold, lower_threshold}
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import time
import traceback

PYROUTE2_IMPORT_ERROR = None
try:
    from pyroute2.netlink import ctrlmsg, nla
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.generic import ipvs as genl_ipvs
except ImportError:  # absent, or too old (0.7.x has no IPVS classes)
    PYROUTE2_IMPORT_ERROR = traceback.format_exc()

    class NetlinkError(Exception):  # keeps `except NetlinkError` valid
        code = 0

PYROUTE2_REQUIREMENT = "pyroute2 >= 0.9.7"

PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP, "sctp": 132}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}

# include/uapi/linux/ip_vs.h IP_VS_CONN_F_*; aliases are ipvsadm's words.
FORWARDING = {"nat": 0, "tun": 2, "dr": 3}
FORWARDING_ALIASES = {"masq": "nat", "masquerading": "nat", "route": "dr",
                      "droute": "dr", "gatewaying": "dr", "ipip": "tun",
                      "tunnel": "tun"}
FORWARDING_NAMES = {v: k for k, v in FORWARDING.items()}
FORWARDING_NAMES[1] = "local"
FORWARDING_NAMES[4] = "bypass"

# IP_VS_SVC_F_*
F_PERSISTENT = 0x1
F_HASHED = 0x2
F_ONEPACKET = 0x4
F_SCHED1 = 0x8
F_SCHED2 = 0x10
F_SCHED3 = 0x20
# Flag names users write. sh/mh give SCHED1/2 their meaning (ipvsadm -b).
FLAG_BITS = {
    "one-packet": F_ONEPACKET,
    "sh-fallback": F_SCHED1, "sh-port": F_SCHED2,
    "mh-fallback": F_SCHED1, "mh-port": F_SCHED2,
    "sched1": F_SCHED1, "sched2": F_SCHED2, "sched3": F_SCHED3,
}
SCHED_FLAG_PREFIX = ("sh", "mh")

STATE_MASTER = 1
STATE_BACKUP = 2
DAEMON_STATES = {"master": STATE_MASTER, "backup": STATE_BACKUP}
DAEMON_NAMES = {v: k for k, v in DAEMON_STATES.items()}

STAT_KEYS = ("conns", "inpkts", "outpkts", "inbytes", "outbytes",
             "cps", "inpps", "outpps", "inbps", "outbps")

# Kernel limits (ip_vs.h / ip_vs_ctl.c): scheduler name IP_VS_SCHEDNAME_MAXLEN
# 16 incl. NUL, interface name IP_VS_IFNAME_MAXLEN 16 incl. NUL.
SCHEDNAME_MAXLEN = 15
IFNAME_MAXLEN = 15


class IPVSError(Exception):
    """Bad input or a kernel refusal; the message names what failed."""


# --------------------------------------------------------------------------
# Raw generic netlink for the sync daemon: pyroute2 declares
# IPVS_CMD_ATTR_DAEMON as "hex", so give it a real nested layout.
# --------------------------------------------------------------------------
if PYROUTE2_IMPORT_ERROR is None:

    class ipvs_daemon(nla):
        prefix = "IPVS_DAEMON_ATTR_"
        nla_map = (
            ("IPVS_DAEMON_ATTR_UNSPEC", "none"),
            ("IPVS_DAEMON_ATTR_STATE", "uint32"),
            ("IPVS_DAEMON_ATTR_MCAST_IFN", "asciiz"),
            ("IPVS_DAEMON_ATTR_SYNC_ID", "uint32"),
            ("IPVS_DAEMON_ATTR_SYNC_MAXLEN", "uint16"),
            ("IPVS_DAEMON_ATTR_MCAST_GROUP", "ip4addr"),
            ("IPVS_DAEMON_ATTR_MCAST_GROUP6", "ip6addr"),
            ("IPVS_DAEMON_ATTR_MCAST_PORT", "uint16"),
            ("IPVS_DAEMON_ATTR_MCAST_TTL", "uint8"),
        )

    class ipvs_msg(genl_ipvs.ipvsmsg):
        """ipvsmsg plus a decodable IPVS_CMD_ATTR_DAEMON."""

        # pyroute2 caches the compiled NLA table in a name-mangled class
        # attribute that a subclass would inherit: force our own table.
        _nlmsg_base__compiled_nla = False
        nla_map = tuple(
            (name, "daemon") if name == "IPVS_CMD_ATTR_DAEMON" else (name, kind)
            for name, kind in genl_ipvs.ipvsmsg.nla_map
        )
        daemon = ipvs_daemon


# --------------------------------------------------------------------------
# Kernel access: a blocking generic netlink socket
# --------------------------------------------------------------------------
# pyroute2 encodes and decodes the messages; the request itself is sent and
# answered here, on a plain blocking socket with a timeout. pyroute2 0.9's own
# request path runs every request through an asyncio event loop; in the lab
# one weight change on a MASTER holding about 2,000 connections was seen
# spinning there at 100 % CPU for over 10 minutes, and a SIGALRM bound cannot
# be relied on inside it (asyncio catches exceptions raised in its callbacks).
# A socket timeout cannot be swallowed, and one request needs no event loop.
# include/uapi/linux/netlink.h, genetlink.h
NETLINK_GENERIC = 16
NLMSG_HDR = struct.Struct("IHHII")  # length, type, flags, sequence, port id
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
RECV_BUFFER = 1 << 20  # one datagram; the kernel's dump chunks are at most 32 KiB

# s: the longest one request may wait for its answer. A request normally
# returns in milliseconds; past this the module fails with a message, and
# the playbooks' weight tasks send it again (setting a weight is idempotent).
NETLINK_TIMEOUT = 30

# Change verbs: command and netlink flags (as ipvsadm/libipvs send them).
SERVICE_VERBS = {"add": ("IPVS_CMD_NEW_SERVICE", NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL),
                 "set": ("IPVS_CMD_SET_SERVICE", NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE),
                 "del": ("IPVS_CMD_DEL_SERVICE", NLM_F_REQUEST | NLM_F_ACK)}
DEST_VERBS = {verb: (cmd.replace("SERVICE", "DEST"), flags) for verb, (cmd, flags) in SERVICE_VERBS.items()}


class GenlSocket:
    """One generic netlink family over a blocking socket: a request, then its answer.

    `request` returns the decoded reply messages (a dump's parts; none for an
    acknowledged change) or raises NetlinkError with the kernel's errno, or
    IPVSError when no complete answer came within `timeout` seconds. Every
    request is a dump (NLM_F_DUMP) or asks for an acknowledgement
    (NLM_F_ACK), so its answer always ends in NLMSG_DONE or NLMSG_ERROR.
    """

    new_socket = staticmethod(socket.socket)  # the unit tests' fake kernel replaces this

    def __init__(self, family, msg_class, timeout):
        self.timeout = timeout
        self.seq = 0
        self.sock = self.new_socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        try:
            self.sock.bind((0, 0))
            msg = ctrlmsg()
            msg["cmd"] = CTRL_CMD_GETFAMILY
            msg["version"] = 1
            msg["attrs"] = [("CTRL_ATTR_FAMILY_NAME", family)]
            (reply,) = self._request(GENL_ID_CTRL, ctrlmsg, msg, NLM_F_REQUEST | NLM_F_ACK, "family lookup")
        except BaseException:
            self.sock.close()
            raise
        self.family_id = reply.get_attr("CTRL_ATTR_FAMILY_ID")
        self.msg_class = msg_class

    def close(self):
        self.sock.close()

    def request(self, msg, flags, what):
        return self._request(self.family_id, self.msg_class, msg, flags, what)

    def _request(self, msg_type, msg_class, msg, flags, what):
        self.seq += 1
        msg["header"]["type"] = msg_type
        msg["header"]["flags"] = flags
        msg["header"]["sequence_number"] = self.seq
        msg.encode()
        deadline = time.monotonic() + self.timeout
        self.sock.sendto(msg.data, (0, 0))
        replies = []
        while True:
            try:
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                data = self.sock.recv(RECV_BUFFER)
            except TimeoutError:
                raise IPVSError(f"IPVS netlink {what}: no complete answer from the kernel within "
                                f"{self.timeout} s; nothing else was changed after it (run the task again)") from None
            for mtype, offset, length in self._messages(data):
                if mtype == NLMSG_ERROR:
                    (code,) = struct.unpack_from("i", data, offset + NLMSG_HDR.size)
                    if code:
                        raise NetlinkError(-code)
                    return replies  # the acknowledgement
                if mtype == NLMSG_DONE:
                    return replies
                reply = msg_class(data[offset:offset + length])
                reply.decode()
                replies.append(reply)

    def _messages(self, data):
        """(type, offset, length) of each message of this request in one datagram."""
        offset = 0
        while offset + NLMSG_HDR.size <= len(data):
            length, mtype, _flags, seq, _port = NLMSG_HDR.unpack_from(data, offset)
            if length < NLMSG_HDR.size:
                return
            if seq == self.seq:  # an earlier request's late answer is skipped
                yield mtype, offset, length
            offset += (length + 3) & ~3


class Kernel:
    """The IPVS generic netlink family: the modules' only system boundary.

    `run_command` (AnsibleModule.run_command) is used for `modprobe ip_vs`.
    With load_module=False a missing family reads as an empty table (check
    mode must not load kernel modules).
    """

    def __init__(self, run_command=None, load_module=True):
        self.sock = None
        self.available = True
        try:
            self.sock = self._open()
        except NetlinkError as exc:
            if not _family_missing(exc):
                raise IPVSError(f"cannot open the IPVS netlink family: {exc}") from exc
            if not load_module:
                self.available = False
                return
            if run_command is None:
                raise IPVSError("the IPVS netlink family is missing (is ip_vs loaded?)") from exc
            rc, _out, err = run_command(["modprobe", "ip_vs"])
            if rc != 0:
                raise IPVSError(f"modprobe ip_vs failed: {err.strip()}") from exc
            try:
                self.sock = self._open()
            except NetlinkError as exc2:
                raise IPVSError(f"IPVS netlink family still missing after modprobe ip_vs: {exc2}") from exc2

    @staticmethod
    def _open():
        return GenlSocket("IPVS", ipvs_msg, NETLINK_TIMEOUT)

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _request(self, cmd, attrs, flags, what):
        msg = ipvs_msg()
        msg["cmd"] = getattr(genl_ipvs, cmd)
        msg["version"] = genl_ipvs.GENL_VERSION
        msg["attrs"] = attrs
        return self.sock.request(msg, flags, what)

    # services and dests -------------------------------------------------
    def services(self):
        if not self.available:
            return []
        return self._request("IPVS_CMD_GET_SERVICE", [], NLM_F_REQUEST | NLM_F_DUMP, "service dump")

    def dests(self, svc):
        if not self.available:
            return []
        return self._request("IPVS_CMD_GET_DEST", [("IPVS_CMD_ATTR_SERVICE", service_request(svc).dump_key())],
                             NLM_F_REQUEST | NLM_F_DUMP, "real-server dump")

    def service(self, verb, svc):
        cmd, flags = SERVICE_VERBS[verb]
        self._request(cmd, [("IPVS_CMD_ATTR_SERVICE", service_request(svc).dump_nla())], flags, f"service {verb}")

    def dest(self, verb, svc, rs):
        cmd, flags = DEST_VERBS[verb]
        self._request(cmd, [("IPVS_CMD_ATTR_SERVICE", service_request(svc).dump_key()),
                            ("IPVS_CMD_ATTR_DEST", dest_request(rs).dump_nla())], flags, f"real-server {verb}")

    # sync daemons -------------------------------------------------------
    def daemons(self):
        if not self.available:
            return []
        return self._request("IPVS_CMD_GET_DAEMON", [], NLM_F_REQUEST | NLM_F_DUMP, "sync-daemon dump")

    def start_daemon(self, daemon):
        self._request("IPVS_CMD_NEW_DAEMON", [("IPVS_CMD_ATTR_DAEMON", {"attrs": daemon_attrs(daemon)})],
                      NLM_F_REQUEST | NLM_F_ACK, "sync-daemon start")

    def stop_daemon(self, role):
        self._request("IPVS_CMD_DEL_DAEMON",
                      [("IPVS_CMD_ATTR_DAEMON", {"attrs": [("IPVS_DAEMON_ATTR_STATE", DAEMON_STATES[role])]})],
                      NLM_F_REQUEST | NLM_F_ACK, "sync-daemon stop")


def _family_missing(exc):
    return getattr(exc, "code", None) == errno.ENOENT or \
        getattr(exc, "extra_code", None) == errno.ENOTSUP


# --------------------------------------------------------------------------
# Netmask encoding. IPv4: the mask itself, network order. IPv6: the prefix
# length as a host-order u32 (libipvs NLA_PUT_U32; the kernel casts the
# __be32 back). pyroute2 types the attribute ip4addr, so encode via bytes.
# --------------------------------------------------------------------------
def netmask_to_wire(family, prefix):
    if family == 4:
        return str(ipaddress.IPv4Network(f"0.0.0.0/{prefix}").netmask)
    return socket.inet_ntoa(struct.pack("=I", prefix))


def netmask_from_wire(family, value):
    if value is None:
        return 32 if family == 4 else 128
    if family == 4:
        return ipaddress.IPv4Network(f"0.0.0.0/{value}").prefixlen
    return struct.unpack("=I", socket.inet_aton(value))[0]


# --------------------------------------------------------------------------
# Request attributes from plain dicts
# --------------------------------------------------------------------------
def _af(family):
    return socket.AF_INET if family == 4 else socket.AF_INET6


class NlaRequest:
    """The nested IPVS_CMD_ATTR_SERVICE / _DEST attribute of one request.

    Built directly rather than with pyroute2's IPVSService/IPVSDest: those
    pass every field through generic request filters, which cost more than
    the netlink encoding itself (measured: about 40% of the per-request CPU
    in a 10,000-entry run). dump_nla() is the full entry, dump_key() only
    the attributes that identify it; pyroute2's marshal encodes both.
    """

    __slots__ = ("attrs", "nkey")

    def __init__(self, attrs, nkey):
        self.attrs = attrs
        self.nkey = nkey  # the leading attributes that identify the entry

    def dump_nla(self):
        return {"attrs": list(self.attrs)}

    def dump_key(self):
        return {"attrs": self.attrs[:self.nkey]}

    def __getitem__(self, name):  # convenient in tests: request["IPVS_SVC_ATTR_PORT"]
        return dict(self.attrs)[name]


def service_request(svc):
    attrs = [("IPVS_SVC_ATTR_AF", _af(svc["family"]))]
    if svc.get("fwmark"):
        attrs.append(("IPVS_SVC_ATTR_FWMARK", svc["fwmark"]))
    else:
        attrs += [("IPVS_SVC_ATTR_PROTOCOL", PROTOCOLS[svc["protocol"]]),
                  ("IPVS_SVC_ATTR_ADDR", svc["address"]),
                  ("IPVS_SVC_ATTR_PORT", svc["port"])]
    nkey = len(attrs)
    flags = flag_bits(svc["flags"])
    if svc["persistence"]:
        flags |= F_PERSISTENT
    # ip_vs_genl_parse_service: a full entry needs all four of these.
    attrs += [("IPVS_SVC_ATTR_SCHED_NAME", svc["scheduler"]),
              ("IPVS_SVC_ATTR_FLAGS", {"flags": flags, "mask": 0xFFFF}),
              ("IPVS_SVC_ATTR_TIMEOUT", svc["persistence"]),
              ("IPVS_SVC_ATTR_NETMASK", netmask_to_wire(svc["family"], svc["persistence_netmask"]))]
    return NlaRequest(attrs, nkey)


def dest_request(rs):
    attrs = [("IPVS_DEST_ATTR_ADDR", rs["address"]),
             ("IPVS_DEST_ATTR_PORT", rs["port"]),
             ("IPVS_DEST_ATTR_ADDR_FAMILY", _af(ip_family(rs["address"]))),
             # ip_vs_genl_parse_dest: a full entry needs these four.
             ("IPVS_DEST_ATTR_FWD_METHOD", FORWARDING[rs["forwarding"]]),
             ("IPVS_DEST_ATTR_WEIGHT", rs["weight"]),
             ("IPVS_DEST_ATTR_U_THRESH", rs["upper_threshold"]),
             ("IPVS_DEST_ATTR_L_THRESH", rs["lower_threshold"])]
    return NlaRequest(attrs, 3)


def daemon_attrs(d):
    attrs = [
        ("IPVS_DAEMON_ATTR_STATE", DAEMON_STATES[d["role"]]),
        ("IPVS_DAEMON_ATTR_MCAST_IFN", d["interface"]),
        ("IPVS_DAEMON_ATTR_SYNC_ID", d["syncid"]),
    ]
    if d.get("maxlen"):
        attrs.append(("IPVS_DAEMON_ATTR_SYNC_MAXLEN", d["maxlen"]))
    if d.get("mcast_group"):
        if ip_family(d["mcast_group"]) == 4:
            attrs.append(("IPVS_DAEMON_ATTR_MCAST_GROUP", d["mcast_group"]))
        else:
            attrs.append(("IPVS_DAEMON_ATTR_MCAST_GROUP6", d["mcast_group"]))
    if d.get("port"):
        attrs.append(("IPVS_DAEMON_ATTR_MCAST_PORT", d["port"]))
    if d.get("ttl"):
        attrs.append(("IPVS_DAEMON_ATTR_MCAST_TTL", d["ttl"]))
    return attrs


# --------------------------------------------------------------------------
# Kernel messages -> plain dicts
# --------------------------------------------------------------------------
def _stats(attr):
    if attr is None:
        return None
    return {k: attr.get_attr("IPVS_STATS_ATTR_" + k.upper()) or 0 for k in STAT_KEYS}


def flag_names(bits, scheduler):
    names = []
    if bits & F_ONEPACKET:
        names.append("one-packet")
    prefix = scheduler if scheduler in SCHED_FLAG_PREFIX else None
    for bit, suffix, generic in ((F_SCHED1, "fallback", "sched1"),
                                 (F_SCHED2, "port", "sched2"),
                                 (F_SCHED3, None, "sched3")):
        if bits & bit:
            names.append(f"{prefix}-{suffix}" if prefix and suffix else generic)
    return sorted(names)


def flag_bits(names):
    bits = 0
    for name in names:
        bits |= FLAG_BITS[name]
    return bits


def parse_service(msg, with_stats=False):
    a = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
    family = 4 if a.get_attr("IPVS_SVC_ATTR_AF") == socket.AF_INET else 6
    fwmark = a.get_attr("IPVS_SVC_ATTR_FWMARK") or None
    scheduler = a.get_attr("IPVS_SVC_ATTR_SCHED_NAME")
    flags = a.get_attr("IPVS_SVC_ATTR_FLAGS")
    bits = flags["flags"] if flags is not None else 0
    persistent = bool(bits & F_PERSISTENT)
    svc = {
        "protocol": None if fwmark else PROTOCOL_NAMES.get(a.get_attr("IPVS_SVC_ATTR_PROTOCOL")),
        "fwmark": fwmark,
        "family": family,
        "address": None if fwmark else _norm_addr(a.get_attr("IPVS_SVC_ATTR_ADDR")),
        "port": None if fwmark else a.get_attr("IPVS_SVC_ATTR_PORT"),
        "scheduler": scheduler,
        "persistence": a.get_attr("IPVS_SVC_ATTR_TIMEOUT") if persistent else 0,
        "persistence_netmask": netmask_from_wire(family, a.get_attr("IPVS_SVC_ATTR_NETMASK")),
        "flags": flag_names(bits, scheduler),
    }
    pe_name = a.get_attr("IPVS_SVC_ATTR_PE_NAME")
    if pe_name:
        svc["pe_name"] = pe_name
    if with_stats:
        svc["stats"] = _stats(a.get_attr("IPVS_SVC_ATTR_STATS64") or a.get_attr("IPVS_SVC_ATTR_STATS"))
    return svc


def parse_dest(msg, with_stats=False):
    a = msg.get_attr("IPVS_CMD_ATTR_DEST")
    fwd = a.get_attr("IPVS_DEST_ATTR_FWD_METHOD") & 0x7
    rs = {
        "address": _norm_addr(a.get_attr("IPVS_DEST_ATTR_ADDR")),
        "port": a.get_attr("IPVS_DEST_ATTR_PORT"),
        "forwarding": FORWARDING_NAMES.get(fwd, str(fwd)),
        "weight": a.get_attr("IPVS_DEST_ATTR_WEIGHT"),
        "upper_threshold": a.get_attr("IPVS_DEST_ATTR_U_THRESH") or 0,
        "lower_threshold": a.get_attr("IPVS_DEST_ATTR_L_THRESH") or 0,
    }
    if with_stats:
        rs["active_conns"] = a.get_attr("IPVS_DEST_ATTR_ACTIVE_CONNS") or 0
        rs["inactive_conns"] = a.get_attr("IPVS_DEST_ATTR_INACT_CONNS") or 0
        rs["persist_conns"] = a.get_attr("IPVS_DEST_ATTR_PERSIST_CONNS") or 0
        rs["stats"] = _stats(a.get_attr("IPVS_DEST_ATTR_STATS64") or a.get_attr("IPVS_DEST_ATTR_STATS"))
    return rs


def parse_daemon(msg):
    a = msg.get_attr("IPVS_CMD_ATTR_DAEMON")
    group = a.get_attr("IPVS_DAEMON_ATTR_MCAST_GROUP6") or a.get_attr("IPVS_DAEMON_ATTR_MCAST_GROUP")
    return {
        "role": DAEMON_NAMES.get(a.get_attr("IPVS_DAEMON_ATTR_STATE"), "unknown"),
        "interface": a.get_attr("IPVS_DAEMON_ATTR_MCAST_IFN"),
        "syncid": a.get_attr("IPVS_DAEMON_ATTR_SYNC_ID"),
        "maxlen": a.get_attr("IPVS_DAEMON_ATTR_SYNC_MAXLEN"),
        "mcast_group": _norm_addr(group) if group else None,
        "port": a.get_attr("IPVS_DAEMON_ATTR_MCAST_PORT"),
        "ttl": a.get_attr("IPVS_DAEMON_ATTR_MCAST_TTL"),
    }


def read_services(kernel, with_stats=False):
    """The whole kernel table as a list of service dicts with real_servers."""
    out = []
    for msg in kernel.services():
        svc = parse_service(msg, with_stats)
        svc["real_servers"] = sorted(
            (parse_dest(d, with_stats) for d in kernel.dests(svc)), key=dest_sort_key)
        out.append(svc)
    return sorted(out, key=service_sort_key)


def read_daemons(kernel):
    return sorted((parse_daemon(m) for m in kernel.daemons()), key=lambda d: d["role"])


# --------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------
def _norm_addr(addr):
    return ipaddress.ip_address(addr).compressed


def ip_family(addr):
    return ipaddress.ip_address(addr).version


def service_key(svc):
    if svc.get("fwmark"):
        return ("fwmark", svc["family"], svc["fwmark"])
    return (svc["protocol"], svc["address"], svc["port"])


def service_id(svc):
    """Human/stable name: `tcp 192.0.2.1:80`, `udp [2001:db8::1]:53`, `fwmark 7 ipv6`."""
    if svc.get("fwmark"):
        return f"fwmark {svc['fwmark']} ipv{svc['family']}"
    return "{} {}".format(svc["protocol"], hostport(svc["address"], svc["port"]))


def hostport(address, port):
    return ("[%s]:%d" if ":" in address else "%s:%d") % (address, port)


def dest_key(rs):
    return (rs["address"], rs["port"])


def service_sort_key(svc):
    k = service_key(svc)
    if k[0] == "fwmark":
        return (1, "", k[1], k[2])
    return (0, k[0], ipaddress.ip_address(k[1]).packed.rjust(16, b"\0"), k[2])


def dest_sort_key(rs):
    return (ipaddress.ip_address(rs["address"]).packed.rjust(16, b"\0"), rs["port"])


# --------------------------------------------------------------------------
# Validation / normalisation of wanted state (before anything changes)
# --------------------------------------------------------------------------
def _need_int(where, name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(value)
        except (TypeError, ValueError):
            raise IPVSError(f"{where}{name}: {value!r} is not an integer") from None
    if not lo <= value <= hi:
        raise IPVSError(f"{where}{name}: {value} is out of range {lo}-{hi}")
    return value


def _addr(where, name, value):
    try:
        return _norm_addr(str(value))
    except ValueError:
        raise IPVSError(f"{where}{name}: {value!r} is not an IP address") from None


def _prefix(where, family, value):
    """persistence_netmask: prefix length, or (IPv4) a dotted mask."""
    maxlen = 32 if family == 4 else 128
    if value is None:
        return maxlen
    text = str(value)
    if family == 4 and "." in text:
        try:
            return ipaddress.IPv4Network(f"0.0.0.0/{text}").prefixlen
        except ValueError:
            raise IPVSError(f"{where}persistence_netmask: {value!r} is not a contiguous netmask") from None
    return _need_int(where, "persistence_netmask", text, 1, maxlen)


def normalize_real_server(where, raw, svc):
    known = {"address", "port", "forwarding", "weight", "upper_threshold", "lower_threshold", "state"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise IPVSError("{}: unknown option(s) {}".format(where.rstrip(".") or "options", ", ".join(unknown)))
    if raw.get("address") in (None, ""):
        raise IPVSError(f"{where}address: required")
    address = _addr(where, "address", raw["address"])
    fwd = str(raw.get("forwarding") or "nat").lower()
    fwd = FORWARDING_ALIASES.get(fwd, fwd)
    if fwd not in FORWARDING:
        raise IPVSError("{}forwarding: {!r} is not one of nat, dr, tun".format(where, raw.get("forwarding")))
    svc_port = svc["port"] or 0
    port = raw.get("port")
    port = svc_port if port is None else _need_int(where, "port", port, 0, 65535)
    if fwd in ("dr", "tun") and not svc.get("fwmark") and port != svc_port:
        # DR/TUN rewrite only the MAC/outer header: the backend sees the VIP port.
        raise IPVSError(f"{where}port: {port} differs from the service port {svc_port}, "
                        f"impossible with {fwd} forwarding")
    if fwd == "nat" and not svc.get("fwmark") and port == 0:
        raise IPVSError(f"{where}port: required for nat forwarding")
    if ip_family(address) != svc["family"] and fwd != "tun":
        raise IPVSError(f"{where}address: IPv{ip_family(address)} real server in an "
                        f"IPv{svc['family']} service needs tun forwarding")
    weight = raw.get("weight")
    rs = {
        "address": address,
        "port": port,
        "forwarding": fwd,
        "weight": 1 if weight is None else _need_int(where, "weight", weight, 0, 2147483647),
        "upper_threshold": _need_int(where, "upper_threshold", raw.get("upper_threshold") or 0, 0, 2 ** 32 - 1),
        "lower_threshold": _need_int(where, "lower_threshold", raw.get("lower_threshold") or 0, 0, 2 ** 32 - 1),
    }
    if rs["upper_threshold"] and rs["lower_threshold"] > rs["upper_threshold"]:
        raise IPVSError(f"{where}lower_threshold: {rs['lower_threshold']} is above "
                        f"upper_threshold {rs['upper_threshold']}")
    return rs


SERVICE_OPTIONS = {"protocol", "fwmark", "family", "address", "port", "scheduler", "persistence",
                   "persistence_netmask", "flags", "real_servers", "state", "purge_real_servers"}


def normalize_service(where, raw):
    """Validate one wanted service; returns (service dict, state, purge_real_servers).

    `where` prefixes error messages ("services[3]." or "" for top-level).
    """
    unknown = sorted(k for k in set(raw) - SERVICE_OPTIONS if raw.get(k) is not None)
    if unknown:
        raise IPVSError("{}: unknown option(s) {}".format(where.rstrip(".") or "options", ", ".join(unknown)))
    fwmark = raw.get("fwmark")
    svc = {}
    if fwmark:
        fwmark = _need_int(where, "fwmark", fwmark, 1, 2 ** 32 - 1)
        for name in ("address", "port", "protocol"):
            if raw.get(name) not in (None, ""):
                raise IPVSError(f"{where}{name}: not allowed with fwmark")
        family = raw.get("family") or 4
        family = int(str(family).lower().replace("ipv", ""))
        if family not in (4, 6):
            raise IPVSError("{}family: {!r} is not 4 or 6".format(where, raw.get("family")))
        svc.update(protocol=None, fwmark=fwmark, family=family, address=None, port=None)
    else:
        if raw.get("address") in (None, ""):
            raise IPVSError(f"{where}address: required (or fwmark)")
        address = _addr(where, "address", raw["address"])
        family = ip_family(address)
        if raw.get("family") and int(str(raw["family"]).lower().replace("ipv", "")) != family:
            raise IPVSError("{}family: {} does not match address {}".format(where, raw["family"], address))
        protocol = str(raw.get("protocol") or "tcp").lower()
        if protocol not in PROTOCOLS:
            raise IPVSError("{}protocol: {!r} is not one of tcp, udp, sctp".format(where, raw.get("protocol")))
        if raw.get("port") is None:
            raise IPVSError(f"{where}port: required (or fwmark)")
        port = _need_int(where, "port", raw["port"], 0, 65535)
        svc.update(protocol=protocol, fwmark=None, family=family, address=address, port=port)
    scheduler = str(raw.get("scheduler") or "wlc")
    if not scheduler.isalnum() or len(scheduler) > SCHEDNAME_MAXLEN:
        raise IPVSError(f"{where}scheduler: {scheduler!r} is not a scheduler name")
    svc["scheduler"] = scheduler
    # The kernel keeps timeout * HZ in an int: stay below overflow at HZ=1000.
    svc["persistence"] = _need_int(where, "persistence", raw.get("persistence") or 0, 0, 2 ** 31 // 1000)
    svc["persistence_netmask"] = _prefix(where, svc["family"], raw.get("persistence_netmask"))
    flags = []
    for name in raw.get("flags") or []:
        if name not in FLAG_BITS:
            raise IPVSError("{}flags: {!r} is not one of {}".format(where, name, ", ".join(sorted(FLAG_BITS))))
        if name.split("-")[0] in SCHED_FLAG_PREFIX and name.split("-")[0] != scheduler:
            raise IPVSError("{}flags: {!r} needs scheduler {}".format(where, name, name.split("-")[0]))
        flags.append(name)
    # Store them as the kernel will report them back.
    svc["flags"] = flag_names(flag_bits(flags), scheduler)
    seen = {}
    servers = []
    absent = []
    for i, rs_raw in enumerate(raw.get("real_servers") or []):
        rwhere = f"{where}real_servers[{i}]."
        if not isinstance(rs_raw, dict):
            raise IPVSError("{}: must be a dictionary".format(rwhere.rstrip(".")))
        rs = normalize_real_server(rwhere, rs_raw, svc)
        if (rs_raw.get("state") or "present") == "absent":
            absent.append(dest_key(rs))
            continue
        if dest_key(rs) in seen:
            raise IPVSError(f"{rwhere.rstrip('.')}: duplicate of real_servers[{seen[dest_key(rs)]}] "
                            f"({hostport(*dest_key(rs))})")
        seen[dest_key(rs)] = i
        servers.append(rs)
    svc["real_servers"] = sorted(servers, key=dest_sort_key)
    # Private: servers listed with state=absent (removed even without purge).
    svc["_absent"] = absent
    state = raw.get("state") or "present"
    if state not in ("present", "absent"):
        raise IPVSError(f"{where}state: {state!r} is not present or absent")
    purge_rs = raw.get("purge_real_servers")
    return svc, state, True if purge_rs is None else bool(purge_rs)


def normalize_services(raws, where="services"):
    """Validate a list; every error is raised before any change."""
    out = []
    seen = {}
    for i, raw in enumerate(raws):
        swhere = f"{where}[{i}]."
        if not isinstance(raw, dict):
            raise IPVSError("{}: must be a dictionary".format(swhere.rstrip(".")))
        item = normalize_service(swhere, raw)
        key = service_key(item[0])
        if key in seen:
            raise IPVSError(f"{swhere.rstrip('.')}: duplicate of {where}[{seen[key]}] ({service_id(item[0])})")
        seen[key] = i
        out.append(item)
    return out


# --------------------------------------------------------------------------
# Diff and apply
# --------------------------------------------------------------------------
SERVICE_ATTRS = ("scheduler", "persistence", "persistence_netmask", "flags")
DEST_ATTRS = ("forwarding", "weight", "upper_threshold", "lower_threshold")


def _service_changes(cur, want):
    changes = {}
    for k in SERVICE_ATTRS:
        # The netmask only means something with persistence on.
        if k == "persistence_netmask" and not want["persistence"] and not cur["persistence"]:
            continue
        if cur[k] != want[k]:
            changes[k] = (cur[k], want[k])
    return changes


def plan(current, wanted, purge=False):
    """Actions turning `current` (kernel services) into `wanted`.

    wanted: list of (service, state, purge_real_servers).
    Returns a list of action dicts; `op` is one of add/set/del with `kind`
    service or dest, in apply order (deletes of dests first within a service,
    so a removed server frees its slot before others change).
    """
    by_key = {service_key(s): s for s in current}
    wanted_keys = set()
    actions = []
    for want, state, purge_rs in wanted:
        key = service_key(want)
        wanted_keys.add(key)
        cur = by_key.get(key)
        if state == "absent":
            if cur is not None:
                actions.append({"op": "del", "kind": "service", "service": cur})
            continue
        if cur is None:
            actions.append({"op": "add", "kind": "service", "service": want})
            for rs in want["real_servers"]:
                actions.append({"op": "add", "kind": "dest", "service": want, "dest": rs})
            continue
        changes = _service_changes(cur, want)
        if changes:
            actions.append({"op": "set", "kind": "service", "service": want, "changes": changes})
        cur_rs = {dest_key(r): r for r in cur["real_servers"]}
        want_rs = {dest_key(r): r for r in want["real_servers"]}
        for k, r in cur_rs.items():
            if k not in want_rs and (purge_rs or k in want.get("_absent", ())):
                actions.append({"op": "del", "kind": "dest", "service": want, "dest": r})
        for k, r in want_rs.items():
            if k not in cur_rs:
                actions.append({"op": "add", "kind": "dest", "service": want, "dest": r})
                continue
            diff = {a: (cur_rs[k][a], r[a]) for a in DEST_ATTRS if cur_rs[k][a] != r[a]}
            if diff:
                actions.append({"op": "set", "kind": "dest", "service": want, "dest": r, "changes": diff})
    if purge:
        for key, cur in by_key.items():
            if key not in wanted_keys:
                actions.insert(0, {"op": "del", "kind": "service", "service": cur})
    return actions


def describe(action):
    """One line per action, for the module's `actions` return value."""
    svc = service_id(action["service"])
    if action["kind"] == "service":
        text = "{} service {}".format(action["op"], svc)
        if action["op"] == "add":
            text += " scheduler {}".format(action["service"]["scheduler"])
    else:
        rs = action["dest"]
        text = "{} real server {} -> {}".format(action["op"], svc, hostport(rs["address"], rs["port"]))
        if action["op"] == "add":
            text += f" {rs['forwarding']} weight {rs['weight']}"
    if action.get("changes"):
        text += " ({})".format(", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in sorted(action["changes"].items())))
    return text


def apply(kernel, actions):
    """Send each action; a kernel refusal names the action that failed."""
    for action in actions:
        try:
            if action["kind"] == "service":
                kernel.service(action["op"], action["service"])
            else:
                kernel.dest(action["op"], action["service"], action["dest"])
        except NetlinkError as exc:
            hint = ""
            if action["kind"] == "service" and exc.code == errno.ENOENT and action["op"] == "add":
                hint = " (is the scheduler {!r} available as module ip_vs_{}?)".format(
                    action["service"]["scheduler"], action["service"]["scheduler"])
            raise IPVSError(f"{describe(action)} failed: {exc}{hint}") from exc


def service_view(svc):
    """A service as shown in diffs and results (real servers keyed by host:port)."""
    if svc is None:
        return {}
    view = {k: v for k, v in svc.items() if k != "real_servers" and not k.startswith("_") and v is not None}
    view["real_servers"] = {hostport(*dest_key(r)): {k: r[k] for k in DEST_ATTRS}
                            for r in svc.get("real_servers", [])}
    return view


def run_services(kernel, wanted, purge, check_mode):
    """Shared body of ipvs_virtual_server and ipvs_services.

    Returns (changed, actions, before, after) where before/after map service
    ids to service views, covering only the services this call manages
    (listed ones, plus purged ones).
    """
    current = read_services(kernel)
    actions = plan(current, wanted, purge)
    by_key = {service_key(s): s for s in current}
    touched = {service_key(w) for w, _s, _p in wanted}
    if purge:
        touched |= set(by_key)
    before = {service_id(by_key[k]): service_view(by_key[k]) for k in touched if k in by_key}
    if actions and not check_mode:
        apply(kernel, actions)
    after = {}
    want_by_key = {service_key(w): (w, s, p) for w, s, p in wanted}
    for key in touched:
        if key in want_by_key:
            w, state, purge_rs = want_by_key[key]
            if state == "absent":
                continue
            view = service_view(w)
            if not purge_rs and key in by_key:  # kept unlisted servers stay
                for r in by_key[key]["real_servers"]:
                    if dest_key(r) not in w["_absent"]:
                        view["real_servers"].setdefault(hostport(*dest_key(r)), {k: r[k] for k in DEST_ATTRS})
            after[service_id(w)] = view
    return bool(actions), [describe(a) for a in actions], before, after


# --------------------------------------------------------------------------
# Sync daemons
# --------------------------------------------------------------------------
DAEMON_PARAMS = ("interface", "syncid", "maxlen", "mcast_group", "port", "ttl")


def daemon_plan(current, wanted):
    """current: list from read_daemons; wanted: {role: daemon dict or None (absent)}.

    A wanted parameter left None accepts whatever the kernel runs with (its
    defaults). A changed parameter means stop + start: the kernel has no
    "set" for a running daemon.
    """
    cur = {d["role"]: d for d in current}
    actions = []
    for role in ("master", "backup"):
        if role not in wanted:
            continue
        want = wanted[role]
        have = cur.get(role)
        if want is None:
            if have is not None:
                actions.append({"op": "stop", "role": role, "daemon": have})
            continue
        if have is None:
            actions.append({"op": "start", "role": role, "daemon": want})
            continue
        changes = {k: (have.get(k), want[k]) for k in DAEMON_PARAMS
                   if want.get(k) is not None and have.get(k) != want[k]}
        if changes:
            actions.append({"op": "stop", "role": role, "daemon": have, "changes": changes})
            actions.append({"op": "start", "role": role, "daemon": want, "changes": changes})
    return actions


def normalize_daemon(role, params):
    where = ""  # daemon options are top-level module options
    iface = params.get("interface")
    if not iface or len(iface) > IFNAME_MAXLEN or "/" in iface or " " in iface:
        raise IPVSError(f"interface: {iface!r} is not an interface name (1-{IFNAME_MAXLEN} characters)")
    d = {"role": role, "interface": iface,
         "syncid": _need_int(where, "syncid", params.get("syncid") or 0, 0, 255)}
    group = params.get("mcast_group")
    if group:
        group = _addr(where, "mcast_group", group)
        if not ipaddress.ip_address(group).is_multicast:
            raise IPVSError(f"mcast_group: {group} is not a multicast address")
    d["mcast_group"] = group or None
    d["port"] = None if params.get("port") is None else _need_int(where, "port", params["port"], 1, 65535)
    d["ttl"] = None if params.get("ttl") is None else _need_int(where, "ttl", params["ttl"], 1, 255)
    # ip_vs_sync.c clamps sync_maxlen to [1024 (backup) or 1, 65535 - IP/UDP
    # headers]; refuse what it would clamp, or a re-run would never converge.
    hlen = 48 if group and ip_family(group) == 6 else 28
    lo = 1024 if role == "backup" else 1
    d["maxlen"] = None if params.get("maxlen") is None else _need_int(
        where, "maxlen", params["maxlen"], lo, 65535 - hlen)
    return d


def apply_daemons(kernel, actions):
    for a in actions:
        try:
            if a["op"] == "stop":
                kernel.stop_daemon(a["role"])
            else:
                kernel.start_daemon(a["daemon"])
        except NetlinkError as exc:
            raise IPVSError(f"{a['op']} {a['role']} sync daemon failed: {exc}") from exc


# --------------------------------------------------------------------------
# Ansible glue shared by the modules (argument specs, open/report)
# --------------------------------------------------------------------------
REAL_SERVER_SPEC = dict(
    address=dict(type="str", required=True),
    port=dict(type="int"),
    forwarding=dict(type="str", default="nat",
                    choices=["nat", "dr", "tun", "masq", "route", "ipip"]),
    weight=dict(type="int", default=1),
    upper_threshold=dict(type="int", default=0),
    lower_threshold=dict(type="int", default=0),
    state=dict(type="str", default="present", choices=["present", "absent"]),
)


def service_spec():
    """Options of one service (ipvs_virtual_server top level, ipvs_services items)."""
    return dict(
        protocol=dict(type="str", choices=["tcp", "udp", "sctp"]),
        address=dict(type="str"),
        port=dict(type="int"),
        fwmark=dict(type="int"),
        family=dict(type="str", choices=["ipv4", "ipv6"]),
        scheduler=dict(type="str", default="wlc"),
        persistence=dict(type="int", default=0),
        persistence_netmask=dict(type="str"),
        flags=dict(type="list", elements="str", default=[],
                   choices=sorted(FLAG_BITS)),
        real_servers=dict(type="list", elements="dict", default=[], options=REAL_SERVER_SPEC),
        purge_real_servers=dict(type="bool", default=True),
        state=dict(type="str", default="present", choices=["present", "absent"]),
    )


SERVICE_MUTUALLY_EXCLUSIVE = [["fwmark", "address"], ["fwmark", "port"], ["fwmark", "protocol"]]
SERVICE_REQUIRED_ONE_OF = [["address", "fwmark"]]


def require_pyroute2(module):
    if PYROUTE2_IMPORT_ERROR is not None:
        from ansible.module_utils.basic import missing_required_lib
        module.fail_json(msg=missing_required_lib(PYROUTE2_REQUIREMENT),
                         exception=PYROUTE2_IMPORT_ERROR)


def open_kernel(module, load_module=True):
    require_pyroute2(module)
    try:
        return Kernel(run_command=module.run_command, load_module=load_module)
    except IPVSError as exc:
        module.fail_json(msg=str(exc))


def run_services_module(module, raw_services, purge, single=False):
    """Validate, diff, apply, exit: ipvs_virtual_server and ipvs_services."""
    require_pyroute2(module)
    try:
        if single:  # ipvs_virtual_server: options are top-level, no prefix
            wanted = [normalize_service("", raw_services[0])]
        else:
            wanted = normalize_services(raw_services)
    except IPVSError as exc:
        module.fail_json(msg=str(exc))
    # Check mode must not load ip_vs: a missing family reads as empty.
    kernel = open_kernel(module, load_module=not module.check_mode)
    try:
        changed, actions, before, after = run_services(kernel, wanted, purge, module.check_mode)
    except IPVSError as exc:
        module.fail_json(msg=str(exc))
    finally:
        kernel.close()
    result = {"changed": changed, "actions": actions}
    if single:
        sid = service_id(wanted[0][0])
        result["service"] = after.get(sid, {})
        result["diff"] = {"before": before.get(sid, {}), "after": after.get(sid, {})}
    else:
        result["services"] = after
        result["diff"] = {"before": before, "after": after}
    module.exit_json(**result)
