# Copyright: openclb developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The openclb load-balancer model, validated and normalised in one place.

Users describe the balancer in three inventory variables (``openclb_cluster``,
``openclb_server_groups``, ``openclb_listeners``); every tier renders from the
*normalised* form returned by :func:`normalize`. docs/model.md is the contract.

Validation and normalisation are one walk over the raw model (:func:`_build`):
each field is checked and its default filled in the same place, so the two
can never disagree. :func:`validate` returns the errors of that walk,
:func:`normalize` its result (or raises :class:`ModelError` with every error).

Pure Python on purpose: the filter and action plugins on the controller import
it, and so can unit tests, without Ansible.
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import json
import re

__all__ = [
    "ModelError",
    "nodes_from_inventory",
    "normalize",
    "summary",
    "validate",
]

# Limits of the managed service this project reproduces (clb-reference.md).
MAX_LISTENERS = 50
MAX_BACKENDS = 200
MAX_RULES = 40
MAX_ACL_ENTRIES = 1000
MAX_SNI_GROUPS = 10  # extra-domain certificate groups besides the default one
MAX_CERTIFICATES = 20  # an RSA and an ECDSA certificate per group fit in this

PROTOCOLS = ("tcp", "udp", "http", "https")
L4 = ("tcp", "udp")
L7 = ("http", "https")
NODE_GROUPS = ("lvs_nodes", "l7_nodes", "key_servers", "backends")

# Every scheduler of mainline IPVS; `sch`/`tch` are the managed service's
# names for its consistent-hash schedulers (source IP / 4-tuple).
IPVS_SCHEDULERS = ("dh", "fo", "lblc", "lblcr", "lc", "mh", "nq", "ovf", "rr", "sed", "sh", "twos", "wlc", "wrr")
SCHEDULER_ALIASES = {"sch": "sh", "tch": "mh"}
# L7 listeners balance in nginx: the schedulers nginx has an equivalent for.
L7_BALANCE = {
    "rr": None,
    "wrr": None,
    "lc": "least_conn",
    "wlc": "least_conn",
    "sh": "hash $remote_addr consistent",
    "mh": "hash $remote_addr$remote_port consistent",
}
# LVS -> L7 nodes: Maglev hashing gives every LVS node the same choice for a
# flow, so a connection that was not yet synced still reaches the same L7
# node after a failover (DR: the L7 node holds the TCP state). mh-port spreads
# one client address over all L7 nodes; mh-fallback skips a node at weight 0.
L7_IPVS_SCHEDULER = "mh"
L7_IPVS_SCHEDULER_FLAGS = ["mh-fallback", "mh-port"]

# The managed service's fixed TLS policies. OpenSSL 3 refuses TLS 1.0/1.1 at
# its default security level, hence @SECLEVEL=0 for the legacy policies.
_STRICT_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
_TLS12_CIPHERS = (
    _STRICT_CIPHERS + ":ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256:"
    "AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-SHA256:AES256-SHA256"
)
_LEGACY_CIPHERS = (
    _TLS12_CIPHERS + ":ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:"
    "ECDHE-ECDSA-AES256-SHA:ECDHE-RSA-AES256-SHA:AES128-SHA:AES256-SHA:DES-CBC3-SHA:@SECLEVEL=0"
)
TLS_POLICIES = {
    "tls_cipher_policy_1_0": {"protocols": ["TLSv1", "TLSv1.1", "TLSv1.2"], "ciphers": _LEGACY_CIPHERS},
    "tls_cipher_policy_1_1": {"protocols": ["TLSv1.1", "TLSv1.2"], "ciphers": _LEGACY_CIPHERS},
    "tls_cipher_policy_1_2": {"protocols": ["TLSv1.2"], "ciphers": _TLS12_CIPHERS},
    "tls_cipher_policy_1_2_strict": {"protocols": ["TLSv1.2"], "ciphers": _STRICT_CIPHERS},
    "tls_cipher_policy_1_2_strict_with_1_3": {"protocols": ["TLSv1.2", "TLSv1.3"], "ciphers": _STRICT_CIPHERS},
}
DEFAULT_TLS_POLICY = "tls_cipher_policy_1_2_strict_with_1_3"

HTTP_STATUS_CLASSES = {"http_2xx": "200-299", "http_3xx": "300-399", "http_4xx": "400-499", "http_5xx": "500-599"}

_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_GROUP_RE = re.compile(r"[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# URL path prefixes end up inside nginx `location` lines: no quoting needed.
_PATH_RE = re.compile(r"/[A-Za-z0-9._~%!$&'()*+,=:@/-]*")
_COOKIE_RE = re.compile(r"[A-Za-z0-9_]{1,64}")
_HOST_RE = re.compile(r"[A-Za-z0-9_.-]+")
_TOKEN_RE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # RFC 9110 token
_MISSING = object()


class ModelError(ValueError):
    """The model is invalid; ``errors`` lists every problem found."""

    def __init__(self, errors):
        self.errors = list(errors)
        super().__init__("invalid openclb model:\n" + "\n".join("  - " + e for e in self.errors))


class _Errors(list):
    def __init__(self):
        super().__init__()
        # server groups with a reported error: listeners using them get no
        # follow-up errors (one mistake, one message)
        self.broken_groups = set()

    def add(self, path, msg):
        self.append(f"{path}: {msg}")


# --------------------------------------------------------------------------
# Field types. Each checks one value, records errors under its path and
# returns the normalised value (None when invalid).


class _Field:
    def __init__(self, default=_MISSING, nullable=False, only=None, na=None):
        self.default = default  # _MISSING = required; a callable gets the walk context
        self.nullable = nullable
        self.only = only  # listener protocols the field applies to
        self.na = na  # normalised value where the field does not apply

    def default_for(self, ctx):
        if self.default in (list, dict):
            return self.default()
        d = self.default(ctx) if callable(self.default) else self.default
        return copy.deepcopy(d)

    def check(self, errs, path, value, ctx=None):
        if value is None:
            if self.nullable:
                return None
            errs.add(path, "must not be null")
            return None
        return self._check(errs, path, value, ctx)

    def _check(self, errs, path, value, ctx):
        return value


def _as_int(value):
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    # -e key=value and some lookups give strings
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
        return int(value)
    return None


class _Int(_Field):
    def __init__(self, lo, hi, **kw):
        super().__init__(**kw)
        self.lo, self.hi = lo, hi

    def _check(self, errs, path, value, ctx):
        v = _as_int(value)
        if v is None:
            errs.add(path, f"{value!r} is not an integer")
            return None
        if not self.lo <= v <= self.hi:
            errs.add(path, f"{v} is out of range {self.lo}-{self.hi}")
            return None
        return v


class _Num(_Field):
    def __init__(self, lo, hi, **kw):
        super().__init__(**kw)
        self.lo, self.hi = lo, hi

    def _check(self, errs, path, value, ctx):
        v = value
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                v = None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            errs.add(path, f"{value!r} is not a number")
            return None
        if not self.lo <= v <= self.hi:
            errs.add(path, f"{v} is out of range {self.lo}-{self.hi}")
            return None
        return int(v) if float(v).is_integer() else float(v)


class _Bool(_Field):
    def _check(self, errs, path, value, ctx):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "false", "no", "off"):
            return value.lower() in ("true", "yes", "on")
        errs.add(path, f"{value!r} is not a boolean")
        return None


class _Enum(_Field):
    def __init__(self, choices, aliases=None, **kw):
        super().__init__(**kw)
        self.choices = tuple(choices)
        self.aliases = aliases or {}

    def _check(self, errs, path, value, ctx):
        if isinstance(value, str):
            v = value.strip().lower()
            v = self.aliases.get(v, v)
            if v in self.choices:
                return v
        if isinstance(value, int) and not isinstance(value, bool) and value in self.choices:
            return value
        names = list(self.choices) + sorted(self.aliases)
        errs.add(path, f"{value!r} is not one of {', '.join(str(c) for c in names)}")
        return None


class _Str(_Field):
    def __init__(self, regex=None, what=None, lower=False, **kw):
        super().__init__(**kw)
        self.regex, self.what, self.lower = regex, what, lower

    def _check(self, errs, path, value, ctx):
        if not isinstance(value, str):
            errs.add(path, f"{value!r} is not a string")
            return None
        v = value.lower() if self.lower else value
        if self.regex is not None and not self.regex.fullmatch(v):
            errs.add(path, f"{value!r} is not {self.what}")
            return None
        return v


class _Func(_Field):
    """A field checked by a function(errs, path, value, ctx) -> normalised."""

    def __init__(self, func, **kw):
        super().__init__(**kw)
        self.func = func

    def _check(self, errs, path, value, ctx):
        return self.func(errs, path, value, ctx)


class _List(_Field):
    def __init__(self, item, max_len=None, min_len=0, **kw):
        super().__init__(**kw)
        self.item, self.max_len, self.min_len = item, max_len, min_len

    def _check(self, errs, path, value, ctx):
        if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
            errs.add(path, f"{value!r} is not a list")
            return None
        value = list(value)
        if self.max_len is not None and len(value) > self.max_len:
            errs.add(path, f"{len(value)} entries, at most {self.max_len} allowed")
        if len(value) < self.min_len:
            errs.add(path, f"needs at least {self.min_len} entr{'y' if self.min_len == 1 else 'ies'}")
        return [self.item.check(errs, f"{path}[{i}]", v, ctx) for i, v in enumerate(value)]


class _Dict(_Field):
    def __init__(self, schema, **kw):
        kw.setdefault("default", dict)
        super().__init__(**kw)
        self.schema = schema

    def _check(self, errs, path, value, ctx):
        return _walk(errs, path, value, self.schema, ctx)


def _walk(errs, path, raw, schema, ctx=None):
    """Check a mapping against a schema: unknown keys, required keys, each
    field; fill every default. Returns the normalised mapping or None."""
    if not isinstance(raw, dict):
        errs.add(path, f"{raw!r} is not a mapping")
        return None
    out = {}
    for key in raw:
        if key not in schema:
            hint = difflib.get_close_matches(str(key), list(schema), n=1)
            errs.add(f"{path}.{key}", "unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    for key, field in schema.items():
        sub = f"{path}.{key}"
        if field.only is not None and ctx is not None and ctx.get("protocol") not in field.only:
            proto = ctx.get("protocol")
            if key in raw and proto is not None:  # an unknown protocol is reported on its own
                errs.add(sub, f"only valid on {'/'.join(field.only)} listeners, not {proto}")
            out[key] = copy.deepcopy(field.na)
            continue
        if key in raw:
            out[key] = field.check(errs, sub, raw[key], ctx)
        elif field.default is _MISSING:
            errs.add(sub, "is required")
            out[key] = None
        else:
            d = field.default_for(ctx)
            # Defaults of nested mappings still go through the schema (fills
            # their own defaults).
            out[key] = field.check(errs, sub, d, ctx) if isinstance(d, dict) else d
    return out


# --------------------------------------------------------------------------
# Value checkers


def _ip(errs, path, value, ctx=None):
    if not isinstance(value, str):
        errs.add(path, f"{value!r} is not an IP address")
        return None
    try:
        addr = ipaddress.ip_address(value.strip())
    except ValueError:
        errs.add(path, f"{value!r} is not an IPv4 or IPv6 address")
        return None
    return addr


def _vip(errs, path, value, ctx):
    addr = _ip(errs, path, value)
    if addr is None:
        return None
    if addr.is_multicast or addr.is_unspecified or addr.is_loopback or addr.is_link_local:
        errs.add(path, f"{value!r} cannot be a VIP (multicast, unspecified, loopback or link-local)")
        return None
    return str(addr)


def _mcast(errs, path, value, ctx):
    addr = _ip(errs, path, value)
    if addr is not None and not addr.is_multicast:
        errs.add(path, f"{value!r} is not a multicast address")
        return None
    return None if addr is None else str(addr)


def _cidr(errs, path, value, ctx):
    if not isinstance(value, str):
        errs.add(path, f"{value!r} is not a CIDR")
        return None
    try:
        net = ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        errs.add(path, f"{value!r} is not a CIDR ({exc})")
        return None
    vip_family = ctx.get("family")
    if vip_family and net.version != vip_family:
        errs.add(path, f"{value!r} is IPv{net.version} but the VIP is IPv{vip_family}")
        return None
    return net


def _domain_check(value, wildcard_ok=True):
    """Return (normalised domain, kind) or raise ValueError with the reason."""
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a domain name")
    d = value.strip().lower().rstrip(".")
    kind = "exact"
    labels = d.split(".")
    if "*" in d:
        if not wildcard_ok:
            raise ValueError(f"{value!r}: wildcards are not allowed here")
        if labels[0] != "*" or "*" in ".".join(labels[1:]):
            raise ValueError(f"{value!r}: a wildcard must be the whole leftmost label ('*.example.com')")
        if len(labels) < 3:
            raise ValueError(f"{value!r}: a wildcard needs at least two labels after '*.'")
        kind = "wildcard"
        labels = labels[1:]
    if len(d) > 253 or not labels or not all(_LABEL_RE.fullmatch(lbl) for lbl in labels):
        raise ValueError(f"{value!r} is not a valid domain name")
    return d, kind


def _domain(errs, path, value, ctx):
    try:
        return _domain_check(value)[0]
    except (TypeError, ValueError) as exc:
        errs.add(path, str(exc))
        return None


def _hostname(errs, path, value, ctx):
    try:
        return _domain_check(value, wildcard_ok=False)[0]
    except (TypeError, ValueError) as exc:
        errs.add(path, str(exc))
        return None


def _path(errs, path, value, ctx):
    if not isinstance(value, str) or not value.startswith("/"):
        errs.add(path, f"{value!r} must start with /")
        return None
    if not _PATH_RE.fullmatch(value):
        errs.add(path, f"{value!r} has characters not allowed in a URL path")
        return None
    return value


def _gateway(errs, path, value, ctx):
    """address/prefix of the floating default gateway of the backends (NAT)."""
    try:
        iface = ipaddress.ip_interface(value.strip()) if isinstance(value, str) and "/" in value else None
    except ValueError:
        iface = None
    if iface is None:
        errs.add(path, f"{value!r} is not an address with a prefix length (10.99.0.1/24)")
        return None
    net = iface.network
    if net.num_addresses > 2 and iface.ip in (net.network_address, net.broadcast_address):
        errs.add(path, f"{value!r} is the network or broadcast address of {net}")
        return None
    return {"address": str(iface.ip), "prefix": net.prefixlen, "family": iface.version, "network": str(net)}


def _threshold(errs, path, value, ctx):
    if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)) or len(value) != 2:
        errs.add(path, f"{value!r} is not a pair [threshold, period]")
        return None
    t, p = (_as_int(x) for x in value)
    if t is None or p is None or t < 0 or p < 0:
        errs.add(path, f"{value!r}: both values must be non-negative integers")
        return None
    # the kernel rejects threshold >= period unless period is 0
    if p and t >= p:
        errs.add(path, f"{value!r}: threshold {t} must be below period {p}")
        return None
    return [t, p]


# --------------------------------------------------------------------------
# Schemas

_VRRP = {
    "version": _Enum((2, 3), default=3),
    "advert_int": _Num(0.01, 255, default=1),
    "virtual_router_id": _Int(1, 254, default=51),
    # Failover behaviour (docs/ha.md). preempt false = keepalived nopreempt:
    # a node that comes back stays BACKUP, so a failure costs one switch, not two.
    "preempt": _Bool(default=False),
    # With preempt: seconds a returning node waits before it takes the VIPs
    # back, so its IPVS/conntrack sync state has warmed up first.
    "preempt_delay": _Int(0, 1000, default=60),
    # Gratuitous ARP / unsolicited NA: a first burst at the transition, a
    # second burst garp_master_delay s later, a refresh while MASTER, and a
    # burst when a MASTER sees a lower-priority advert (a frozen MASTER that
    # came back: it never left MASTER, so it sent no GARP otherwise).
    "garp_master_delay": _Int(0, 255, default=1),
    "garp_master_repeat": _Int(1, 255, default=3),
    "garp_master_refresh": _Int(0, 86400, default=60),
    "garp_lower_prio_repeat": _Int(0, 255, default=3),
}
_SYNC = {
    "enabled": _Bool(default=True),
    "syncid": _Int(0, 255, default=1),
    "mcast_group": _Func(_mcast, default="224.0.0.81"),
    "port": _Int(1, 65535, default=8848),
    "ttl": _Int(1, 255, default=1),
    "threshold": _Func(_threshold, default=lambda ctx: [3, 50]),
    "refresh_period": _Int(0, 2**31 - 1, default=0),
    # net.ipv4.vs.sync_retries: resends of a refresh-mode message (refresh_period > 0)
    "retries": _Int(0, 3, default=0),
    # net.ipv4.vs.sync_version: 1 carries IPv6, timeouts and persistence templates
    "version": _Int(0, 1, default=1),
    # net.ipv4.vs.sync_persist_mode: 1 syncs only the templates of persistent services
    "persist_mode": _Int(0, 1, default=0),
}
# conntrackd FTFW between the LVS nodes: the netfilter state of NAT flows
# (IPVS sync carries only the IPVS entries).
_CONNTRACK_SYNC = {
    "enabled": _Bool(default=True),
    "mcast_group": _Func(_mcast, default="225.0.0.50"),
    "port": _Int(1, 65535, default=3780),
}
_CLUSTER = {
    "name": _Str(_NAME_RE, "a name ([a-z0-9-], at most 63)"),
    "id": _Str(_ID_RE, "an id ([A-Za-z0-9._-], at most 64)", default=None, nullable=True),
    "nat_gateway": _Func(_gateway, default=None, nullable=True),
    "vrrp": _Dict(_VRRP),
    "sync": _Dict(_SYNC),
    "conntrack_sync": _Dict(_CONNTRACK_SYNC),
}
_MEMBER = {
    "host": _Str(_HOST_RE, "an inventory host name", default=None, nullable=True),
    "address": _Func(lambda e, p, v, c: _ip(e, p, v), default=None, nullable=True),
    "port": _Int(1, 65535),
    "weight": _Int(0, 100, default=100),
}
_SERVER_GROUP = {
    "members": _List(_Dict(_MEMBER), max_len=MAX_BACKENDS, default=list),
}
_HTTP_CHECK = {
    "method": _Enum(("HEAD", "GET"), aliases={"head": "HEAD", "get": "GET"}, default="HEAD"),
    "uri": _Func(_path, default="/"),
    "host": _Func(_hostname, default=None, nullable=True),
    "status": _List(_Enum(tuple(HTTP_STATUS_CLASSES)), min_len=1, default=lambda ctx: ["http_2xx", "http_3xx"]),
}
_UDP_CHECK = {
    "request": _Str(default=None, nullable=True),
    "response": _Str(default=None, nullable=True),
}


def _hc_type_default(ctx):
    return {"tcp": "tcp", "udp": "udp"}.get(ctx["protocol"], "http")


_HEALTH_CHECK = {
    "type": _Enum(("tcp", "http", "udp", "none"), default=_hc_type_default),
    "port": _Int(1, 65535, default=None, nullable=True),
    "interval": _Int(1, 50, default=2),
    "timeout": _Int(1, 300, default=5),
    "healthy_threshold": _Int(2, 10, default=3),
    "unhealthy_threshold": _Int(2, 10, default=3),
    "http": _Dict(_HTTP_CHECK, default=None, nullable=True),
    "udp": _Dict(_UDP_CHECK, default=None, nullable=True),
}
_ACL = {
    "type": _Enum(("whitelist", "blacklist")),
    "entries": _List(_Func(_cidr), max_len=MAX_ACL_ENTRIES, default=list),
}
_RULE = {
    "name": _Str(_NAME_RE, "a name ([a-z0-9-])", default=None, nullable=True),
    "domain": _Func(_domain, default=None, nullable=True),
    "path": _Func(_path, default=None, nullable=True),
    "server_group": _Str(_GROUP_RE, "a server group name"),
}
_COOKIE = {
    "type": _Enum(("insert", "rewrite")),
    "timeout": _Int(1, 86400, default=None, nullable=True),
    # nginx reads cookies as $cookie_<name>: letters, digits and _ only
    "name": _Str(_COOKIE_RE, "a cookie name ([A-Za-z0-9_], at most 64)", default=None, nullable=True),
}
_REDIRECT = {
    "port": _Int(1, 65535),
    "code": _Enum((301, 302, 307, 308), default=301),
}


def _redirect(errs, path, value, ctx):
    if _as_int(value) is not None:
        value = {"port": value}
    return _walk(errs, path, value, _REDIRECT, ctx)


_FORWARDED = {
    "xff": _Bool(default=True),  # X-Forwarded-For
    "proto": _Bool(default=True),  # X-Forwarded-Proto
    "real_ip": _Bool(default=True),  # X-Real-IP
    "lb_id": _Bool(default=True),  # X-Openclb-Lb-Id: cluster.id
    "listener": _Bool(default=True),  # X-Openclb-Listener: name, X-Forwarded-Port
    "client_port": _Bool(default=False),  # X-Client-Port
    "remove": _List(_Str(_TOKEN_RE, "a header name"), default=list),
}
_CERTIFICATE = {
    "name": _Str(_NAME_RE, "a certificate name ([a-z0-9-])"),
    "domains": _List(_Func(_domain), default=list),
    "key_store": _Enum(("keyserver", "local"), default="keyserver"),
}

_LISTENER = {
    "name": _Str(_NAME_RE, "a name ([a-z0-9-], at most 63)"),
    "protocol": _Enum(PROTOCOLS),
    "vip": _Func(_vip),
    "port": _Int(1, 65535),
    "server_group": _Str(_GROUP_RE, "a server group name", default=None, nullable=True),
    "scheduler": _Enum(IPVS_SCHEDULERS, aliases=SCHEDULER_ALIASES, default="wrr"),
    "forwarding": _Enum(("nat", "dr", "tun"), default=lambda ctx: "nat" if ctx["protocol"] in L4 else "dr"),
    "persistence": _Int(0, 3600, default=0, only=L4, na=0),
    "idle_timeout": _Int(10, 900, default=900, only=("tcp",)),
    "drain_timeout": _Int(10, 900, default=300),
    "health_check": _Dict(_HEALTH_CHECK),
    "acl": _Dict(_ACL, default=None, nullable=True),
    # L7 only
    "rules": _List(_Dict(_RULE), max_len=MAX_RULES, default=list, only=L7, na=[]),
    "cookie": _Dict(_COOKIE, default=None, nullable=True, only=L7),
    "redirect_to_https": _Func(_redirect, default=None, nullable=True, only=("http",)),
    "request_timeout": _Int(1, 180, default=60, only=L7),
    "keepalive_timeout": _Int(1, 60, default=15, only=L7),
    "gzip": _Bool(default=True, only=L7),
    "http2": _Bool(default=True, only=("https",)),
    "forwarded_headers": _Dict(_FORWARDED, only=L7),
    "tls_policy": _Enum(tuple(TLS_POLICIES), default=DEFAULT_TLS_POLICY, only=("https",)),
    "certificates": _List(_Dict(_CERTIFICATE), max_len=MAX_CERTIFICATES, min_len=1, only=("https",), na=[]),
}


# --------------------------------------------------------------------------
# Inventory -> nodes


def nodes_from_inventory(groups, hostvars):
    """Build the ``nodes`` argument from Ansible's ``groups`` and ``hostvars``.

    The one place that knows which host variables describe a node; used by
    the filter and the action plugin alike. Values are read through
    ``hostvars`` so that templated host variables are resolved.
    """
    nodes = {}
    for group in NODE_GROUPS:
        nodes[group] = {}
        for host in sorted((groups or {}).get(group) or []):
            hv = hostvars.get(host) or {}
            nodes[group][host] = {
                "front_address": _hv(hv, "openclb_front_address"),
                "internal_address": _hv(hv, "openclb_internal_address"),
                "internal_address6": _hv(hv, "openclb_internal_address6"),
                "front_interface": _hv(hv, "openclb_front_interface"),
                "internal_interface": _hv(hv, "openclb_internal_interface"),
            }
    return nodes


def _hv(hv, key):
    try:
        value = hv.get(key)
    except Exception:  # noqa: BLE001 - an undefined template in hostvars counts as unset
        return None
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return str(value).strip()


def _build_nodes(errs, nodes, need_l7):
    out = {}
    for group in NODE_GROUPS:
        out[group] = []
        for host, spec in sorted(((nodes or {}).get(group) or {}).items()):
            spec = spec or {}
            entry = {"name": host}
            for key in ("front_address", "internal_address"):
                value = spec.get(key)
                required = (group == "lvs_nodes") or (key == "internal_address" and group != "key_servers")
                if value in (None, ""):
                    if required and (group != "l7_nodes" or need_l7):
                        errs.add(f"nodes[{host}].openclb_{key}", f"is required for a host in {group}")
                    entry[key] = None
                    continue
                addr = _ip(errs, f"nodes[{host}].openclb_{key}", value)
                entry[key] = None if addr is None else str(addr)
            # dual stack: a second internal address, for IPv6 VIPs (L7 nodes)
            value = spec.get("internal_address6")
            entry["internal_address6"] = None
            if value not in (None, ""):
                addr = _ip(errs, f"nodes[{host}].openclb_internal_address6", value)
                if addr is not None and addr.version != 6:
                    errs.add(f"nodes[{host}].openclb_internal_address6", f"{value!r} is not an IPv6 address")
                elif addr is not None:
                    entry["internal_address6"] = str(addr)
            for key in ("front_interface", "internal_interface"):
                entry[key] = spec.get(key)
            out[group].append(entry)
    return out


# --------------------------------------------------------------------------
# The walk


def _ip_key(address):
    a = ipaddress.ip_address(address)
    return (a.version, a.packed)


def _listener_path(raw, index):
    name = raw.get("name") if isinstance(raw, dict) else None
    if isinstance(name, str) and _NAME_RE.fullmatch(name):
        return f"listeners[{name}]"
    return f"listeners[{index}]"


def _build(raw, nodes):
    errs = _Errors()
    raw = raw or {}
    for key in raw:
        if key not in ("cluster", "server_groups", "listeners"):
            errs.add(str(key), "unknown part of the model (cluster, server_groups, listeners)")

    cluster = _walk(errs, "cluster", raw.get("cluster", {}), _CLUSTER) or {}
    if cluster.get("name") and not cluster.get("id"):
        cluster["id"] = f"lb-{cluster['name']}"
    vrrp = cluster.get("vrrp") or {}
    adv = vrrp.get("advert_int")
    if adv is not None and vrrp.get("version") == 2 and (adv < 1 or not float(adv).is_integer()):
        errs.add("cluster.vrrp.advert_int", f"{adv}: sub-second or fractional adverts need vrrp.version 3")
    if adv is not None and vrrp.get("version") == 3:
        if adv > 40.95:
            errs.add("cluster.vrrp.advert_int", f"{adv} is out of range 0.01-40.95 for VRRPv3")
        elif abs(adv * 100 - round(adv * 100)) > 1e-6:
            errs.add("cluster.vrrp.advert_int", f"{adv}: VRRPv3 adverts are in steps of 0.01 s")

    raw_listeners = raw.get("listeners")
    if raw_listeners is None:
        raw_listeners = []
    if not isinstance(raw_listeners, list):
        errs.add("listeners", "must be a list")
        raw_listeners = []
    need_l7 = any(isinstance(lst, dict) and lst.get("protocol") in L7 for lst in raw_listeners)
    node_out = _build_nodes(errs, nodes, need_l7)
    backends = {n["name"]: n for n in node_out["backends"]}

    server_groups = _build_server_groups(errs, raw.get("server_groups"), backends)

    if len(raw_listeners) > MAX_LISTENERS:
        errs.add("listeners", f"{len(raw_listeners)} listeners, at most {MAX_LISTENERS} allowed")
    listeners = []
    for index, lraw in enumerate(raw_listeners):
        path = _listener_path(lraw, index)
        lst = _build_listener(errs, path, lraw, server_groups)
        if lst is not None:
            listeners.append((path, lst))
    _cross_listener_checks(errs, listeners, node_out)
    listeners = [lst for _index, lst in listeners]
    listeners.sort(key=lambda lst: lst["name"] or "")

    if errs:
        return None, errs

    for lst in listeners:
        if lst["tier"] == "l7":
            _l7_extras(lst, server_groups)
        else:
            lst.update(upstreams=[], vhosts=[], sni_groups=[], tls=None)
    ipvs_services = _ipvs_services(listeners, server_groups, node_out)
    vips = {}
    for lst in listeners:
        vips.setdefault(lst["vip"], {"address": lst["vip"], "family": lst["family"], "listeners": []})
        vips[lst["vip"]]["listeners"].append(lst["name"])
    vips = [vips[a] for a in sorted(vips, key=_ip_key)]
    # Plain JSON-able data without shared references: roles may template it
    # freely and two runs compare equal.
    model = {
        "cluster": cluster,
        "nodes": node_out,
        "server_groups": server_groups,
        "listeners": listeners,
        "ipvs_services": ipvs_services,
        "ipvs_timeouts": _ipvs_timeouts(listeners),
        "vips": vips,
        "vrrp_instances": _vrrp_instances(cluster, vips),
        "node_vips": _node_vips(ipvs_services, node_out),
        "certificates": _certificates(listeners),
        "l7_listeners": [lst for lst in listeners if lst["tier"] == "l7"],
    }
    return json.loads(json.dumps(model)), errs


def _build_server_groups(errs, raw_groups, backends):
    out = {}
    if raw_groups is None:
        raw_groups = {}
    if not isinstance(raw_groups, dict):
        errs.add("server_groups", "must be a mapping of group name to group")
        return out
    distinct = set()
    for gname in sorted(raw_groups, key=str):
        path = f"server_groups[{gname}]"
        if not isinstance(gname, str) or not _GROUP_RE.fullmatch(gname):
            errs.add(path, f"{gname!r} is not a server group name ([a-z0-9_-])")
            errs.broken_groups.add(gname)
            continue
        before = len(errs)
        group = _walk(errs, path, raw_groups[gname] if raw_groups[gname] is not None else {}, _SERVER_GROUP)
        if group is None:
            errs.broken_groups.add(gname)
            continue
        members, seen = [], {}
        for i, m in enumerate(group["members"] or []):
            mpath = f"{path}.members[{i}]"
            if m is None:
                continue
            given = raw_groups[gname]["members"][i]
            if (given.get("host") is None) == (given.get("address") is None):
                errs.add(mpath, "needs exactly one of host (an inventory host in backends) or address")
                continue
            if m["host"] is None and m["address"] is None:
                continue  # reported by the field
            if m["host"] is not None:
                node = backends.get(m["host"])
                if node is None:
                    errs.add(f"{mpath}.host", f"{m['host']!r} is not a host in the backends group")
                    continue
                if node["internal_address"] is None:
                    continue  # reported on the node
                name, address = m["host"], node["internal_address"]
            else:
                address = str(m["address"])
                name = next((b["name"] for b in backends.values() if b["internal_address"] == address), address)
            if m["port"] is None or m["weight"] is None:
                continue
            key = (address, m["port"])
            if key in seen:
                errs.add(mpath, f"duplicate member {_hostport(address, m['port'])} (also members[{seen[key]}])")
                continue
            seen[key] = i
            distinct.add(address)
            members.append({"name": name, "address": address, "port": m["port"], "weight": m["weight"]})
        members.sort(key=lambda m: (_ip_key(m["address"]), m["port"]))
        out[gname] = {"name": gname, "members": members}
        if len(errs) > before:  # already reported: no follow-up errors on listeners using it
            errs.broken_groups.add(gname)
    if len(distinct) > MAX_BACKENDS:
        errs.add("server_groups", f"{len(distinct)} distinct backend addresses, at most {MAX_BACKENDS} allowed")
    return out


def _node_address(node, family):
    """The node's internal address of one family, or None."""
    for key in ("internal_address", "internal_address6"):
        a = node.get(key)
        if a and ipaddress.ip_address(a).version == family:
            return a
    return None


def _hostport(address, port):
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _build_listener(errs, path, raw, server_groups):
    if not isinstance(raw, dict):
        errs.add(path, f"{raw!r} is not a mapping")
        return None
    # The protocol decides which fields apply: read it first, on its own.
    proto_errs = _Errors()
    protocol = _LISTENER["protocol"].check(proto_errs, "", raw.get("protocol"), None) if "protocol" in raw else None
    vip_errs = _Errors()
    vip = _vip(vip_errs, "", raw.get("vip"), None) if isinstance(raw.get("vip"), str) else None
    ctx = {"protocol": protocol, "family": ipaddress.ip_address(vip).version if vip else None}
    lst = _walk(errs, path, raw, _LISTENER, ctx)
    if protocol is None:
        return None  # nothing more can be said reliably; the walk reported it
    lst["tier"] = "l4" if protocol in L4 else "l7"
    lst["family"] = ctx["family"]
    lst["transport"] = "udp" if protocol == "udp" else "tcp"

    # server groups
    sg = lst["server_group"]
    if sg is None:
        if lst.get("redirect_to_https") is None and not any(e.startswith(f"{path}.server_group:") for e in errs):
            errs.add(f"{path}.server_group", "is required" + (" (or redirect_to_https)" if protocol == "http" else ""))
    else:
        _check_group_ref(errs, f"{path}.server_group", sg, server_groups)

    _check_scheduler(errs, path, lst)
    _check_health_check(errs, path, lst)
    _check_forwarding(errs, path, lst, server_groups)
    if lst["acl"] is not None and lst["acl"]["entries"] is not None:
        entries = [e for e in lst["acl"]["entries"] if e is not None]
        # canonical and sorted; duplicates collapse
        lst["acl"]["entries"] = [
            str(n) for n in sorted(set(entries), key=lambda n: (n.version, n.network_address.packed, n.prefixlen))
        ]
    if lst["tier"] == "l7":
        _check_l7(errs, path, lst, raw, server_groups)
    return lst


def _check_group_ref(errs, path, name, server_groups):
    if name in errs.broken_groups:
        return
    if name not in server_groups:
        errs.add(path, f"unknown server group {name!r}")
    elif not server_groups[name]["members"]:
        errs.add(path, f"server group {name!r} has no members")


def _check_scheduler(errs, path, lst):
    if lst["tier"] == "l7" and lst["scheduler"] is not None and lst["scheduler"] not in L7_BALANCE:
        errs.add(
            f"{path}.scheduler",
            f"{lst['scheduler']!r} has no nginx equivalent on {lst['protocol']} listeners "
            f"(use one of {', '.join(sorted(L7_BALANCE))}, sch, tch)",
        )


def _check_health_check(errs, path, lst):
    hc = lst["health_check"]
    if hc is None:
        return
    hpath = f"{path}.health_check"
    t = hc["type"]
    if t == "http" and lst["protocol"] == "udp":
        errs.add(f"{hpath}.type", "http checks are not possible on a udp listener (use udp or none)")
    if t == "udp" and lst["protocol"] != "udp":
        errs.add(f"{hpath}.type", f"udp checks are only possible on udp listeners, not {lst['protocol']}")
    for sub in ("http", "udp"):
        if hc[sub] is not None and t != sub:
            errs.add(f"{hpath}.{sub}", f"only valid when health_check.type is {sub} (it is {t})")
    # fill the sub-mapping of the chosen type, drop the other
    for sub in ("http", "udp"):
        if t == sub and hc[sub] is None:
            hc[sub] = _walk(errs, f"{hpath}.{sub}", {}, _HTTP_CHECK if sub == "http" else _UDP_CHECK)
        elif t != sub:
            hc[sub] = None
    if hc["http"] is not None and hc["http"]["status"] is not None:
        classes = sorted({s for s in hc["http"]["status"] if s})
        hc["http"]["status"] = classes
        hc["http"]["status_codes"] = [HTTP_STATUS_CLASSES[c] for c in classes]
    if hc["udp"] is not None and hc["udp"]["response"] is not None and hc["udp"]["request"] is None:
        errs.add(f"{hpath}.udp.response", "needs udp.request (a response can only answer a request)")


def _check_forwarding(errs, path, lst, server_groups):
    fwd = lst["forwarding"]
    if lst["tier"] != "l4" or fwd is None or lst["server_group"] not in server_groups or lst["port"] is None:
        return
    if lst["server_group"] in errs.broken_groups:
        return
    # Only IP-in-IP carries a packet to a real server of the other family.
    if fwd != "tun" and lst["family"]:
        for m in server_groups[lst["server_group"]]["members"]:
            if ipaddress.ip_address(m["address"]).version != lst["family"]:
                errs.add(
                    f"{path}.forwarding",
                    f"{fwd} needs members of the VIP's family (IPv{lst['family']}): {m['name']} is {m['address']}",
                )
    if fwd == "nat":
        return
    # DR and TUN cannot translate ports: the backend must listen on the VIP port.
    for m in server_groups[lst["server_group"]]["members"]:
        if m["port"] != lst["port"]:
            errs.add(
                f"{path}.forwarding",
                f"{fwd} cannot change the port: member {m['name']} of "
                f"server group {lst['server_group']!r} uses port {m['port']}, the listener port is {lst['port']}",
            )


def _check_l7(errs, path, lst, raw, server_groups):
    if lst["redirect_to_https"] is not None and lst["rules"]:
        errs.add(f"{path}.rules", "a listener with redirect_to_https redirects every request: rules never apply")
    seen = {}
    for i, rule in enumerate(lst["rules"] or []):
        if rule is None:
            continue
        rpath = f"{path}.rules[{i}]"
        if rule["domain"] is None and rule["path"] is None:
            if "domain" not in raw["rules"][i] and "path" not in raw["rules"][i]:
                errs.add(rpath, "needs a domain, a path or both")
            continue
        if rule["server_group"] is not None:
            _check_group_ref(errs, f"{rpath}.server_group", rule["server_group"], server_groups)
        key = (rule["domain"], rule["path"])
        if key in seen:
            errs.add(rpath, f"same domain and path as rules[{seen[key]}]")
        seen[key] = i
    # cookie
    ck = lst["cookie"]
    if ck is not None and ck["type"] is not None:
        if ck["type"] == "rewrite":
            if ck["name"] is None and (raw.get("cookie") or {}).get("name") is None:
                errs.add(f"{path}.cookie.name", "is required for cookie type rewrite (the cookie the backend sets)")
            if ck["timeout"] is not None:
                errs.add(f"{path}.cookie.timeout", "only valid for cookie type insert")
        else:
            if ck["timeout"] is None:
                ck["timeout"] = 3600
            if ck["name"] is None:
                ck["name"] = "OPENCLB_SRV"
    # certificates
    if lst["protocol"] == "https":
        names = [c["name"] for c in lst["certificates"] or [] if c]
        for n in sorted({x for x in names if x and names.count(x) > 1}):
            errs.add(f"{path}.certificates", f"certificate {n!r} is listed twice")
        _sni_groups(errs, path, lst)


def _sni_groups(errs, path, lst):
    """Group certificates by domain set: certificates sharing one set (say an
    RSA and an ECDSA one) are served together; the first certificate's group
    is the default. A domain in two different groups is ambiguous for SNI."""
    groups, owner = [], {}
    for i, cert in enumerate(lst["certificates"] or []):
        if not cert or cert["domains"] is None or None in cert["domains"]:
            continue
        domains = sorted(set(cert["domains"]))
        cert["domains"] = domains
        group = next((g for g in groups if g["domains"] == domains), None)
        if group is None:
            group = {"domains": domains, "certificates": [], "default": not groups}
            groups.append(group)
            for d in domains:
                if d in owner:
                    errs.add(
                        f"{path}.certificates[{i}].domains",
                        f"{d!r} is also served by certificate "
                        f"{owner[d]!r} with a different domain list (ambiguous for SNI)",
                    )
                owner.setdefault(d, cert["name"])
        group["certificates"].append(cert["name"])
    if groups and not groups[0]["default"]:
        groups[0]["default"] = True
    for i, cert in enumerate(lst["certificates"] or []):
        if i > 0 and cert and not cert["domains"]:
            errs.add(f"{path}.certificates[{i}].domains", "is required for every certificate but the first (SNI)")
    if len(groups) - 1 > MAX_SNI_GROUPS:
        errs.add(f"{path}.certificates", f"{len(groups) - 1} extra-domain certificate groups, at most {MAX_SNI_GROUPS}")
    lst["sni_groups"] = groups


def _cross_listener_checks(errs, listeners, nodes):
    names, bind = {}, {}
    for index, (path, lst) in enumerate(listeners):
        if lst["name"]:
            if lst["name"] in names:
                errs.add(f"{path}.name", "duplicate listener name")
            names.setdefault(lst["name"], index)
        if lst["vip"] and lst["port"] and lst["transport"]:
            key = (lst["vip"], lst["port"], lst["transport"])
            if key in bind:
                errs.add(
                    f"{path}.port",
                    f"{_hostport(lst['vip'], lst['port'])}/{lst['transport']} is already used by {bind[key]}",
                )
            bind.setdefault(key, path)
    by_key = {(lst["vip"], lst["port"]): lst for _index, lst in listeners if lst["protocol"] == "https"}
    # NAT to the L7 nodes rewrites the VIP to the node's own address: nginx
    # can no longer tell two L7 listeners on one port apart.
    l7_ports = {}
    for path, lst in listeners:
        if lst["tier"] == "l7" and lst["port"]:
            l7_ports.setdefault(lst["port"], []).append((path, lst))
    for port, entries in sorted(l7_ports.items()):
        if len(entries) > 1:
            for path, lst in entries:
                if lst["forwarding"] == "nat":
                    others = ", ".join(p for p, other in entries if other is not lst)
                    errs.add(
                        f"{path}.forwarding",
                        f"nat hides the VIP from the L7 nodes, and {others} also uses port {port}: use dr or tun",
                    )
    certs = {}
    for path, lst in listeners:
        for i, cert in enumerate(lst.get("certificates") or []):
            if not cert or not cert["name"] or cert["domains"] is None:
                continue
            seen = certs.setdefault(cert["name"], (path, cert))
            if seen[1] is cert or seen[0] == path:  # twice in one listener: reported there
                continue
            for key in ("key_store", "domains"):
                if seen[1][key] != cert[key] and seen[1][key] is not None and cert[key] is not None:
                    errs.add(
                        f"{path}.certificates[{i}].{key}",
                        f"certificate {cert['name']!r} has "
                        f"{key} {seen[1][key]!r} in {seen[0]}: one certificate, one definition",
                    )
    for path, lst in listeners:
        r = lst.get("redirect_to_https")
        if r and r.get("port") and lst["vip"]:
            target = by_key.get((lst["vip"], r["port"]))
            if target is None:
                errs.add(f"{path}.redirect_to_https", f"no https listener on {_hostport(lst['vip'], r['port'])}")
        if lst["tier"] == "l7" and not nodes["l7_nodes"]:
            errs.add(f"{path}.protocol", f"{lst['protocol']} listeners need hosts in the l7_nodes group (it is empty)")
        if lst["tier"] == "l7" and lst["family"] and lst["forwarding"] not in (None, "tun"):
            for n in nodes["l7_nodes"]:
                a = n["internal_address"]
                if a and _node_address(n, lst["family"]) is None:
                    errs.add(
                        f"{path}.forwarding",
                        f"{lst['forwarding']} needs L7 nodes with an address of the VIP's family "
                        f"(IPv{lst['family']}): {n['name']} has {a}"
                        + (" (set openclb_internal_address6)" if lst["family"] == 6 else ""),
                    )


# --------------------------------------------------------------------------
# Derived structures (only computed on a valid model)

_ANY, _WILD, _EXACT = 2, 1, 0


def _path_order(path):
    # longest prefix first; the catch-all `/` last
    return (-len(path), path)


def _upstream_name(listener, group):
    return f"{listener}__{group}"


def _l7_extras(lst, server_groups):
    """Precompute what nginx needs so templates hold no logic: upstreams,
    one vhost per domain (exact before wildcard, then the default vhost),
    locations ordered longest prefix first, the TLS policy's protocols and
    ciphers, and each vhost's certificates."""
    name = lst["name"]
    lst.setdefault("sni_groups", [])
    used = sorted({r["server_group"] for r in lst["rules"]} | ({lst["server_group"]} if lst["server_group"] else set()))
    balance = L7_BALANCE[lst["scheduler"]]
    lst["upstreams"] = [
        {
            "name": _upstream_name(name, g),
            "server_group": g,
            "balance": balance,
            # nginx has no weight 0: such members are `down` (no new requests)
            "members": [
                {**m, "weight": 1 if lst["scheduler"] == "rr" else max(m["weight"], 1), "down": m["weight"] == 0}
                for m in server_groups[g]["members"]
            ],
        }
        for g in used
    ]
    for rule in lst["rules"]:
        rule["domain_type"] = (
            "any" if rule["domain"] is None else ("wildcard" if rule["domain"].startswith("*.") else "exact")
        )
        rule["upstream"] = _upstream_name(name, rule["server_group"])
    lst["rules"].sort(
        key=lambda r: (
            {"exact": _EXACT, "wildcard": _WILD, "any": _ANY}[r["domain_type"]],
            -len(r["domain"] or ""),
            r["domain"] or "",
            _path_order(r["path"] or "/"),
        )
    )

    if lst["redirect_to_https"]:
        port = lst["redirect_to_https"]["port"]
        lst["redirect_to_https"]["url"] = "https://$host" + ("" if port == 443 else f":{port}") + "$request_uri"

    default_upstream = _upstream_name(name, lst["server_group"]) if lst["server_group"] else None

    # Domain first, then path: once a request's Host matches a rule domain,
    # only that domain's rules apply (their catch-all is the listener's
    # server group); domain-less rules apply to every other Host.
    def locations(domain):
        locs = {}
        for r in lst["rules"]:
            if r["domain"] == domain:
                locs.setdefault(r["path"] or "/", r["upstream"])
        if default_upstream:
            locs.setdefault("/", default_upstream)
        return [{"path": p, "upstream": locs[p]} for p in sorted(locs, key=_path_order)]

    rule_domains = {r["domain"] for r in lst["rules"] if r["domain"]}
    domains = set(rule_domains)
    groups = lst.get("sni_groups") or []
    for g in groups[1:]:
        domains.update(g["domains"])

    def certs_for(domain):
        if not groups:
            return []
        for g in groups:
            if domain in g["domains"]:
                return list(g["certificates"])
        if not domain.startswith("*."):
            parent = "*." + domain.split(".", 1)[1]
            for g in groups:
                if parent in g["domains"]:
                    return list(g["certificates"])
        return list(groups[0]["certificates"])

    def dkey(d):
        return (d.startswith("*."), d)

    lst["vhosts"] = [
        {
            "server_names": [d],
            "default": False,
            "locations": locations(d if d in rule_domains else None),
            "certificates": certs_for(d),
        }
        for d in sorted(domains, key=dkey)
    ] + [
        {
            "server_names": [],
            "default": True,
            "locations": locations(None),
            "certificates": list(groups[0]["certificates"]) if groups else [],
        },
    ]
    if lst["protocol"] == "https":
        policy = TLS_POLICIES[lst["tls_policy"]]
        lst["tls"] = {"policy": lst["tls_policy"], "protocols": list(policy["protocols"]), "ciphers": policy["ciphers"]}
    else:
        lst["tls"] = None


def _ipvs_services(listeners, server_groups, nodes):
    services = []
    for lst in listeners:
        hc = lst["health_check"]
        if lst["tier"] == "l4":
            rs = [
                {**m, "forwarding": lst["forwarding"], "check_port": hc["port"] or m["port"]}
                for m in server_groups[lst["server_group"]]["members"]
            ]
            scheduler, flags, persistence = lst["scheduler"], [], lst["persistence"]
        else:
            # The L4 tier spreads L7 traffic over the L7 nodes, checked with a
            # TCP connect on the listener port (nginx listens on the VIP there).
            rs = [
                {
                    "name": n["name"],
                    "address": _node_address(n, lst["family"]) or n["internal_address"],  # tun: any family
                    "port": lst["port"],
                    "weight": 1,
                    "forwarding": lst["forwarding"],
                    "check_port": lst["port"],
                }
                for n in nodes["l7_nodes"]
            ]
            rs.sort(key=lambda r: (_ip_key(r["address"]), r["port"]))
            scheduler, flags, persistence = L7_IPVS_SCHEDULER, list(L7_IPVS_SCHEDULER_FLAGS), 0
            hc = {
                "type": "tcp",
                "port": None,
                "interval": 2,
                "timeout": 5,
                "healthy_threshold": 3,
                "unhealthy_threshold": 3,
                "http": None,
                "udp": None,
            }
        services.append(
            {
                "listener": lst["name"],
                "tier": lst["tier"],
                "protocol": lst["transport"],
                "vip": lst["vip"],
                "family": lst["family"],
                "port": lst["port"],
                "scheduler": scheduler,
                "flags": flags,
                "persistence": persistence,
                "forwarding": lst["forwarding"],
                "drain_timeout": lst["drain_timeout"],
                "acl": copy.deepcopy(lst["acl"]),
                "real_servers": rs,
                "health_check": copy.deepcopy(hc),
                # exactly the options of openclb.lb.ipvs_services / ipvs_virtual_server
                "kernel": {
                    "protocol": lst["transport"],
                    "address": lst["vip"],
                    "port": lst["port"],
                    "scheduler": scheduler,
                    "persistence": persistence,
                    "flags": list(flags),
                    "real_servers": [
                        {
                            "address": r["address"],
                            "port": r["port"],
                            "forwarding": r["forwarding"],
                            "weight": r["weight"],
                        }
                        for r in rs
                    ],
                },
            }
        )
    services.sort(key=lambda s: (_ip_key(s["vip"]), s["protocol"], s["port"]))
    return services


def _vrrp_instances(cluster, vips):
    # One instance per address family (keepalived keeps families apart), with
    # fixed router ids (first id: IPv4, next: IPv6) so adding the other family
    # later does not renumber a running instance. The NAT gateway moves with
    # the VIPs of its family: NAT replies must leave through the director.
    out = []
    gw = cluster.get("nat_gateway")
    for offset, family in enumerate((4, 6)):
        addresses = [v["address"] for v in vips if v["family"] == family]
        gateway = gw if gw and gw["family"] == family else None
        if addresses or gateway:
            out.append(
                {
                    "name": f"{cluster['name']}_v{family}",
                    "family": family,
                    "virtual_router_id": cluster["vrrp"]["virtual_router_id"] + offset,
                    "vips": addresses,
                    "gateway": gateway,
                }
            )
    return out


def _node_vips(services, nodes):
    """VIPs each inventory host must accept as local: DR real servers hold
    them on a loopback (with arp_ignore/arp_announce), TUN real servers on
    their IP-in-IP tunnel device. Members given by address only and not in
    the inventory are left to their owner."""
    known = {n["name"] for group in ("l7_nodes", "backends") for n in nodes[group]}
    out = {}
    for svc in services:
        if svc["forwarding"] == "nat":
            continue
        for rs in svc["real_servers"]:
            if rs["name"] in known:
                entry = out.setdefault(rs["name"], {"dr": set(), "tun": set()})
                entry[svc["forwarding"]].add(svc["vip"])
    return {host: {kind: sorted(v, key=_ip_key) for kind, v in entry.items()} for host, entry in sorted(out.items())}


def _certificates(listeners):
    """Every certificate once, with the listeners that serve it: what the key
    servers and the L7 nodes must hold."""
    certs = {}
    for lst in listeners:
        for cert in lst["certificates"]:
            entry = certs.setdefault(cert["name"], {**cert, "listeners": []})
            entry["listeners"].append(lst["name"])
    return [certs[n] for n in sorted(certs)]


def _ipvs_timeouts(listeners):
    # IPVS has one TCP idle timeout per node, not per service: the longest
    # idle_timeout of the TCP listeners wins (UDP: the managed service's 90 s).
    tcp = [lst["idle_timeout"] for lst in listeners if lst["protocol"] == "tcp"]
    return {"tcp": max(tcp) if tcp else 900, "tcpfin": 120, "udp": 90}


# --------------------------------------------------------------------------
# Public API


def validate(raw, nodes):
    """Return the list of every error in the model (empty when valid)."""
    return list(_build(raw, nodes)[1])


def normalize(raw, nodes):
    """Return the normalised model; raise :class:`ModelError` when invalid."""
    model, errs = _build(raw, nodes)
    if errs:
        raise ModelError(errs)
    return model


def summary(model):
    """Counts for a human: listeners per protocol, services, VIPs, groups."""
    per_proto = {p: 0 for p in PROTOCOLS}
    for lst in model["listeners"]:
        per_proto[lst["protocol"]] += 1
    return {
        "cluster": model["cluster"]["name"],
        "listeners": per_proto,
        "ipvs_services": len(model["ipvs_services"]),
        "real_servers": sum(len(s["real_servers"]) for s in model["ipvs_services"]),
        "vips": [v["address"] for v in model["vips"]],
        "server_groups": len(model["server_groups"]),
    }
