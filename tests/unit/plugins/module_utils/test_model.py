"""Unit tests of the load-balancer model (plugins/module_utils/model.py).

The model is pure Python: it is imported through the collection path when
that exists, else straight from its file.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import random

import pytest

try:
    from ansible_collections.openclb.lb.plugins.module_utils import model
except ImportError:  # plain checkout without the collection link
    _path = os.path.join(os.path.dirname(__file__), *[".."] * 4, "plugins", "module_utils", "model.py")
    _spec = importlib.util.spec_from_file_location("openclb_model", os.path.abspath(_path))
    model = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(model)


NODES = {
    "lvs_nodes": {
        "lvs1": {
            "front_address": "203.0.113.11",
            "internal_address": "10.99.0.11",
            "front_interface": "front",
            "internal_interface": "internal",
        },
        "lvs2": {
            "front_address": "203.0.113.12",
            "internal_address": "10.99.0.12",
            "front_interface": "front",
            "internal_interface": "internal",
        },
    },
    "l7_nodes": {
        "l7-2": {"internal_address": "10.99.0.22"},
        "l7-1": {"internal_address": "10.99.0.21"},
    },
    "key_servers": {"ks1": {"internal_address": "10.99.0.31"}},
    "backends": {
        "be1": {"internal_address": "10.99.0.41"},
        "be2": {"internal_address": "10.99.0.42"},
    },
}

RAW = {
    "cluster": {"name": "test"},
    "server_groups": {
        "web": {"members": [{"host": "be2", "port": 8080, "weight": 2}, {"host": "be1", "port": 8080}]},
        "api": {"members": [{"address": "10.99.0.50", "port": 9090, "weight": 0}]},
        "dns6": {"members": [{"address": "2001:db8:99::41", "port": 53}]},
    },
    "listeners": [
        {
            "name": "web-tcp",
            "protocol": "tcp",
            "vip": "203.0.113.10",
            "port": 80,
            "server_group": "web",
            "scheduler": "sch",
            "acl": {"type": "whitelist", "entries": ["198.51.100.0/24", "192.0.2.7"]},
        },
        {
            "name": "dns6",
            "protocol": "udp",
            "vip": "2001:DB8::10",
            "port": 53,
            "server_group": "dns6",
            "forwarding": "dr",
        },
        {
            "name": "site",
            "protocol": "https",
            "vip": "203.0.113.20",
            "port": 443,
            "server_group": "web",
            "scheduler": "wlc",
            "rules": [
                {"path": "/api", "server_group": "api"},
                {"domain": "*.example.com", "server_group": "api"},
                {"domain": "www.example.com", "path": "/v1", "server_group": "api"},
            ],
            "certificates": [
                {"name": "main", "domains": ["example.com"]},
                {"name": "wild", "domains": ["*.example.com"], "key_store": "local"},
            ],
        },
        {"name": "site-http", "protocol": "http", "vip": "203.0.113.20", "port": 80, "redirect_to_https": 443},
    ],
}

# ---------------------------------------------------------------------------
# Golden values: the complete normalised form of RAW, written by hand.

HC_TCP = {
    "type": "tcp",
    "port": None,
    "interval": 2,
    "timeout": 5,
    "healthy_threshold": 3,
    "unhealthy_threshold": 3,
    "http": None,
    "udp": None,
}
HC_UDP = dict(HC_TCP, type="udp", udp={"request": None, "response": None})
HC_HTTP = dict(
    HC_TCP,
    type="http",
    http={
        "method": "HEAD",
        "uri": "/",
        "host": None,
        "status": ["http_2xx", "http_3xx"],
        "status_codes": ["200-299", "300-399"],
    },
)
FORWARDED = {
    "xff": True,
    "proto": True,
    "real_ip": True,
    "lb_id": True,
    "listener": True,
    "client_port": False,
    "remove": [],
}
L7_ONLY_NA = {
    "rules": [],
    "cookie": None,
    "redirect_to_https": None,
    "request_timeout": None,
    "keepalive_timeout": None,
    "gzip": None,
    "http2": None,
    "forwarded_headers": None,
    "tls_policy": None,
    "certificates": [],
    "upstreams": [],
    "vhosts": [],
    "sni_groups": [],
    "tls": None,
}
BE1 = {"name": "be1", "address": "10.99.0.41", "port": 8080, "weight": 100}
BE2 = {"name": "be2", "address": "10.99.0.42", "port": 8080, "weight": 2}
API = {"name": "10.99.0.50", "address": "10.99.0.50", "port": 9090, "weight": 0}
DNS6 = {"name": "2001:db8:99::41", "address": "2001:db8:99::41", "port": 53, "weight": 100}


def node(name, internal, front=None, fif=None, iif=None):
    return {
        "name": name,
        "front_address": front,
        "internal_address": internal,
        "internal_address6": None,
        "front_interface": fif,
        "internal_interface": iif,
    }


L_WEB_TCP = dict(
    L7_ONLY_NA,
    name="web-tcp",
    protocol="tcp",
    vip="203.0.113.10",
    port=80,
    server_group="web",
    scheduler="sh",
    forwarding="nat",
    persistence=0,
    idle_timeout=900,
    drain_timeout=300,
    health_check=HC_TCP,
    acl={"type": "whitelist", "entries": ["192.0.2.7/32", "198.51.100.0/24"]},
    tier="l4",
    family=4,
    transport="tcp",
)
L_DNS6 = dict(
    L7_ONLY_NA,
    name="dns6",
    protocol="udp",
    vip="2001:db8::10",
    port=53,
    server_group="dns6",
    scheduler="wrr",
    forwarding="dr",
    persistence=0,
    idle_timeout=None,
    drain_timeout=300,
    health_check=HC_UDP,
    acl=None,
    tier="l4",
    family=6,
    transport="udp",
)
L_SITE = {
    "name": "site",
    "protocol": "https",
    "vip": "203.0.113.20",
    "port": 443,
    "server_group": "web",
    "scheduler": "wlc",
    "forwarding": "dr",
    "persistence": 0,
    "idle_timeout": None,
    "drain_timeout": 300,
    "health_check": HC_HTTP,
    "acl": None,
    "rules": [  # exact domains, then wildcards, then domain-less
        {
            "name": None,
            "domain": "www.example.com",
            "path": "/v1",
            "server_group": "api",
            "domain_type": "exact",
            "upstream": "site__api",
        },
        {
            "name": None,
            "domain": "*.example.com",
            "path": None,
            "server_group": "api",
            "domain_type": "wildcard",
            "upstream": "site__api",
        },
        {
            "name": None,
            "domain": None,
            "path": "/api",
            "server_group": "api",
            "domain_type": "any",
            "upstream": "site__api",
        },
    ],
    "cookie": None,
    "redirect_to_https": None,
    "request_timeout": 60,
    "keepalive_timeout": 15,
    "gzip": True,
    "http2": True,
    "forwarded_headers": FORWARDED,
    "tls_policy": "tls_cipher_policy_1_2_strict_with_1_3",
    "certificates": [
        {"name": "main", "domains": ["example.com"], "key_store": "keyserver"},
        {"name": "wild", "domains": ["*.example.com"], "key_store": "local"},
    ],
    "tier": "l7",
    "family": 4,
    "transport": "tcp",
    "sni_groups": [
        {"domains": ["example.com"], "certificates": ["main"], "default": True},
        {"domains": ["*.example.com"], "certificates": ["wild"], "default": False},
    ],
    "upstreams": [
        {
            "name": "site__api",
            "server_group": "api",
            "balance": "least_conn",
            "members": [dict(API, weight=1, down=True)],
        },  # nginx has no weight 0: down
        {
            "name": "site__web",
            "server_group": "web",
            "balance": "least_conn",
            "members": [dict(BE1, down=False), dict(BE2, down=False)],
        },
    ],
    "vhosts": [
        # only www's own rules, its catch-all is the listener's group; the
        # certificate comes from the wildcard SNI group
        {
            "server_names": ["www.example.com"],
            "default": False,
            "certificates": ["wild"],
            "locations": [{"path": "/v1", "upstream": "site__api"}, {"path": "/", "upstream": "site__web"}],
        },
        {
            "server_names": ["*.example.com"],
            "default": False,
            "certificates": ["wild"],
            "locations": [{"path": "/", "upstream": "site__api"}],
        },
        {
            "server_names": [],
            "default": True,
            "certificates": ["main"],
            "locations": [{"path": "/api", "upstream": "site__api"}, {"path": "/", "upstream": "site__web"}],
        },
    ],
    "tls": {
        "policy": "tls_cipher_policy_1_2_strict_with_1_3",
        "protocols": ["TLSv1.2", "TLSv1.3"],
        "ciphers": "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
        "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305",
    },
}
L_SITE_HTTP = {
    "name": "site-http",
    "protocol": "http",
    "vip": "203.0.113.20",
    "port": 80,
    "server_group": None,
    "scheduler": "wrr",
    "forwarding": "dr",
    "persistence": 0,
    "idle_timeout": None,
    "drain_timeout": 300,
    "health_check": HC_HTTP,
    "acl": None,
    "rules": [],
    "cookie": None,
    "redirect_to_https": {"port": 443, "code": 301, "url": "https://$host$request_uri"},
    "request_timeout": 60,
    "keepalive_timeout": 15,
    "gzip": True,
    "http2": None,
    "forwarded_headers": FORWARDED,
    "tls_policy": None,
    "certificates": [],
    "tier": "l7",
    "family": 4,
    "transport": "tcp",
    "sni_groups": [],
    "upstreams": [],
    "vhosts": [{"server_names": [], "default": True, "locations": [], "certificates": []}],
    "tls": None,
}


def kernel(svc):
    """The module-ready projection of a service (openclb.lb.ipvs_services options)."""
    return {
        "protocol": svc["protocol"],
        "address": svc["vip"],
        "port": svc["port"],
        "scheduler": svc["scheduler"],
        "persistence": svc["persistence"],
        "flags": svc["flags"],
        "real_servers": [
            {"address": r["address"], "port": r["port"], "forwarding": r["forwarding"], "weight": r["weight"]}
            for r in svc["real_servers"]
        ],
    }


def l7_service(listener, port):
    return {
        "listener": listener,
        "tier": "l7",
        "protocol": "tcp",
        "vip": "203.0.113.20",
        "family": 4,
        "port": port,
        "scheduler": "mh",
        "flags": ["mh-fallback", "mh-port"],
        "persistence": 0,
        "forwarding": "dr",
        "drain_timeout": 300,
        "acl": None,
        "health_check": HC_TCP,
        "real_servers": [
            {
                "name": "l7-1",
                "address": "10.99.0.21",
                "port": port,
                "weight": 1,
                "forwarding": "dr",
                "check_port": port,
            },
            {
                "name": "l7-2",
                "address": "10.99.0.22",
                "port": port,
                "weight": 1,
                "forwarding": "dr",
                "check_port": port,
            },
        ],
    }


EXPECTED = {
    "cluster": {
        "name": "test",
        "id": "lb-test",
        "nat_gateway": None,
        "vrrp": {
            "version": 3,
            "advert_int": 1,
            "virtual_router_id": 51,
            "preempt": False,
            "preempt_delay": 60,
            "garp_master_delay": 1,
            "garp_master_repeat": 3,
            "garp_master_refresh": 60,
            "garp_lower_prio_repeat": 3,
        },
        "sync": {
            "enabled": True,
            "syncid": 1,
            "mcast_group": "224.0.0.81",
            "port": 8848,
            "ttl": 1,
            "threshold": [3, 50],
            "refresh_period": 0,
            "retries": 0,
            "version": 1,
            "persist_mode": 0,
        },
        "conntrack_sync": {"enabled": True, "mcast_group": "225.0.0.50", "port": 3780},
    },
    "nodes": {
        "lvs_nodes": [
            node("lvs1", "10.99.0.11", "203.0.113.11", "front", "internal"),
            node("lvs2", "10.99.0.12", "203.0.113.12", "front", "internal"),
        ],
        "l7_nodes": [node("l7-1", "10.99.0.21"), node("l7-2", "10.99.0.22")],
        "key_servers": [node("ks1", "10.99.0.31")],
        "backends": [node("be1", "10.99.0.41"), node("be2", "10.99.0.42")],
    },
    "server_groups": {
        "api": {"name": "api", "members": [API]},
        "dns6": {"name": "dns6", "members": [DNS6]},
        "web": {"name": "web", "members": [BE1, BE2]},
    },
    "listeners": [L_DNS6, L_SITE, L_SITE_HTTP, L_WEB_TCP],
    "ipvs_services": [
        {
            "listener": "web-tcp",
            "tier": "l4",
            "protocol": "tcp",
            "vip": "203.0.113.10",
            "family": 4,
            "port": 80,
            "scheduler": "sh",
            "flags": [],
            "persistence": 0,
            "forwarding": "nat",
            "drain_timeout": 300,
            "acl": {"type": "whitelist", "entries": ["192.0.2.7/32", "198.51.100.0/24"]},
            "health_check": HC_TCP,
            "real_servers": [
                dict(BE1, forwarding="nat", check_port=8080),
                dict(BE2, forwarding="nat", check_port=8080),
            ],
        },
        l7_service("site-http", 80),
        l7_service("site", 443),
        {
            "listener": "dns6",
            "tier": "l4",
            "protocol": "udp",
            "vip": "2001:db8::10",
            "family": 6,
            "port": 53,
            "scheduler": "wrr",
            "flags": [],
            "persistence": 0,
            "forwarding": "dr",
            "drain_timeout": 300,
            "acl": None,
            "health_check": HC_UDP,
            "real_servers": [dict(DNS6, forwarding="dr", check_port=53)],
        },
    ],
    "ipvs_timeouts": {"tcp": 900, "tcpfin": 120, "udp": 90},
    "vips": [
        {"address": "203.0.113.10", "family": 4, "listeners": ["web-tcp"]},
        {"address": "203.0.113.20", "family": 4, "listeners": ["site", "site-http"]},
        {"address": "2001:db8::10", "family": 6, "listeners": ["dns6"]},
    ],
    "vrrp_instances": [
        {
            "name": "test_v4",
            "family": 4,
            "virtual_router_id": 51,
            "vips": ["203.0.113.10", "203.0.113.20"],
            "gateway": None,
        },
        {"name": "test_v6", "family": 6, "virtual_router_id": 52, "vips": ["2001:db8::10"], "gateway": None},
    ],
    # dns6 is DR too, but its member is not an inventory host
    "node_vips": {"l7-1": {"dr": ["203.0.113.20"], "tun": []}, "l7-2": {"dr": ["203.0.113.20"], "tun": []}},
    "certificates": [
        {"name": "main", "domains": ["example.com"], "key_store": "keyserver", "listeners": ["site"]},
        {"name": "wild", "domains": ["*.example.com"], "key_store": "local", "listeners": ["site"]},
    ],
    "l7_listeners": [L_SITE, L_SITE_HTTP],
}


for _svc in EXPECTED["ipvs_services"]:
    _svc["kernel"] = kernel(_svc)


def test_kernel_projection_is_what_the_ipvs_modules_take():
    services = {s["listener"]: s["kernel"] for s in model.normalize(RAW, NODES)["ipvs_services"]}
    assert services["web-tcp"] == {
        "protocol": "tcp",
        "address": "203.0.113.10",
        "port": 80,
        "scheduler": "sh",
        "persistence": 0,
        "flags": [],
        "real_servers": [
            {"address": "10.99.0.41", "port": 8080, "forwarding": "nat", "weight": 100},
            {"address": "10.99.0.42", "port": 8080, "forwarding": "nat", "weight": 2},
        ],
    }
    assert services["site"] == {
        "protocol": "tcp",
        "address": "203.0.113.20",
        "port": 443,
        "scheduler": "mh",
        "persistence": 0,
        "flags": ["mh-fallback", "mh-port"],
        "real_servers": [
            {"address": "10.99.0.21", "port": 443, "forwarding": "dr", "weight": 1},
            {"address": "10.99.0.22", "port": 443, "forwarding": "dr", "weight": 1},
        ],
    }


def test_golden_normalised_form():
    got = model.normalize(copy.deepcopy(RAW), copy.deepcopy(NODES))
    for key in EXPECTED:  # per key first: a readable diff when one part breaks
        assert got[key] == EXPECTED[key], key
    assert got == EXPECTED


def test_normalize_does_not_mutate_its_input():
    raw, nodes = copy.deepcopy(RAW), copy.deepcopy(NODES)
    model.normalize(raw, nodes)
    assert raw == RAW
    assert nodes == NODES


def test_output_is_plain_json_without_shared_references():
    got = model.normalize(RAW, NODES)
    assert json.loads(json.dumps(got)) == got
    got["listeners"][1]["rules"].clear()  # l7_listeners must not alias listeners
    assert got["l7_listeners"][0]["rules"]


def test_order_of_input_does_not_change_the_output():
    # Templates render from this: any input order must give the same bytes.
    want = json.dumps(model.normalize(RAW, NODES), sort_keys=True)
    rng = random.Random(4242)
    for _attempt in range(20):
        raw = copy.deepcopy(RAW)
        rng.shuffle(raw["listeners"])
        for group in raw["server_groups"].values():
            rng.shuffle(group["members"])
        for lst in raw["listeners"]:
            if "rules" in lst:
                rng.shuffle(lst["rules"])
        raw["server_groups"] = dict(rng.sample(list(raw["server_groups"].items()), len(raw["server_groups"])))
        nodes = {g: dict(rng.sample(list(h.items()), len(h))) for g, h in NODES.items()}
        assert json.dumps(model.normalize(raw, nodes), sort_keys=True) == want


def test_normalize_twice_is_identical():
    assert model.normalize(RAW, NODES) == model.normalize(RAW, NODES)


def test_summary():
    assert model.summary(model.normalize(RAW, NODES)) == {
        "cluster": "test",
        "listeners": {"tcp": 1, "udp": 1, "http": 1, "https": 1},
        "ipvs_services": 4,
        "real_servers": 7,
        "vips": ["203.0.113.10", "203.0.113.20", "2001:db8::10"],
        "server_groups": 3,
    }


def test_normalize_raises_with_every_error():
    raw = copy.deepcopy(RAW)
    raw["listeners"][0]["health_check"] = {"interval": 0}
    raw["listeners"][1]["port"] = 70000
    with pytest.raises(model.ModelError) as exc:
        model.normalize(raw, NODES)
    assert exc.value.errors == [
        "listeners[web-tcp].health_check.interval: 0 is out of range 1-50",
        "listeners[dns6].port: 70000 is out of range 1-65535",
    ]
    assert "listeners[dns6].port" in str(exc.value)


# ---------------------------------------------------------------------------
# One test per validation rule: the exact error text, naming listener + field.


def listener(raw, name):
    return next(lst for lst in raw["listeners"] if lst["name"] == name)


def errors_after(mutate, nodes=None):
    raw = copy.deepcopy(RAW)
    nodes = copy.deepcopy(NODES if nodes is None else nodes)
    mutate(raw, nodes)
    return model.validate(raw, nodes)


def set_in(name, **fields):
    def mutate(raw, nodes):
        listener(raw, name).update(fields)

    return mutate


def test_the_base_model_is_valid():
    assert model.validate(RAW, NODES) == []


CASES = {
    # ranges
    "hc interval range": (
        set_in("web-tcp", health_check={"interval": 0}),
        ["listeners[web-tcp].health_check.interval: 0 is out of range 1-50"],
    ),
    "hc timeout range": (
        set_in("web-tcp", health_check={"timeout": 301}),
        ["listeners[web-tcp].health_check.timeout: 301 is out of range 1-300"],
    ),
    "hc threshold range": (
        set_in("web-tcp", health_check={"healthy_threshold": 1, "unhealthy_threshold": 11}),
        [
            "listeners[web-tcp].health_check.healthy_threshold: 1 is out of range 2-10",
            "listeners[web-tcp].health_check.unhealthy_threshold: 11 is out of range 2-10",
        ],
    ),
    "persistence range": (
        set_in("web-tcp", persistence=3601),
        ["listeners[web-tcp].persistence: 3601 is out of range 0-3600"],
    ),
    "idle timeout range": (
        set_in("web-tcp", idle_timeout=5),
        ["listeners[web-tcp].idle_timeout: 5 is out of range 10-900"],
    ),
    "drain timeout range": (
        set_in("web-tcp", drain_timeout=901),
        ["listeners[web-tcp].drain_timeout: 901 is out of range 10-900"],
    ),
    "request timeout range": (
        set_in("site", request_timeout=181),
        ["listeners[site].request_timeout: 181 is out of range 1-180"],
    ),
    "keepalive timeout range": (
        set_in("site", keepalive_timeout=0),
        ["listeners[site].keepalive_timeout: 0 is out of range 1-60"],
    ),
    "cookie timeout range": (
        set_in("site", cookie={"type": "insert", "timeout": 86401}),
        ["listeners[site].cookie.timeout: 86401 is out of range 1-86400"],
    ),
    "port range": (set_in("web-tcp", port=0), ["listeners[web-tcp].port: 0 is out of range 1-65535"]),
    # types, unknown and missing keys
    "typo in a key": (
        set_in("web-tcp", schedular="wrr"),
        ["listeners[web-tcp].schedular: unknown key (did you mean 'scheduler'?)"],
    ),
    "typo in a nested key": (
        set_in("web-tcp", health_check={"intervall": 3}),
        ["listeners[web-tcp].health_check.intervall: unknown key (did you mean 'interval'?)"],
    ),
    "unknown key without a close match": (set_in("web-tcp", colour="blue"), ["listeners[web-tcp].colour: unknown key"]),
    "missing port": (lambda raw, nodes: listener(raw, "web-tcp").pop("port"), ["listeners[web-tcp].port: is required"]),
    "not an integer": (set_in("web-tcp", port="eighty"), ["listeners[web-tcp].port: 'eighty' is not an integer"]),
    "a bool is not an integer": (
        set_in("web-tcp", persistence=True),
        ["listeners[web-tcp].persistence: True is not an integer"],
    ),
    "not a boolean": (set_in("site", gzip="maybe"), ["listeners[site].gzip: 'maybe' is not a boolean"]),
    "bad protocol": (
        set_in("web-tcp", protocol="sctp"),
        ["listeners[web-tcp].protocol: 'sctp' is not one of tcp, udp, http, https"],
    ),
    "bad listener name uses the index": (
        lambda raw, nodes: raw["listeners"][0].update(name="Web_TCP"),
        ["listeners[0].name: 'Web_TCP' is not a name ([a-z0-9-], at most 63)"],
    ),
    "listener not a mapping": (
        lambda raw, nodes: raw["listeners"].append("tcp-80"),
        ["listeners[4]: 'tcp-80' is not a mapping"],
    ),
    "unknown top-level key": (
        lambda raw, nodes: raw.update(listner=[]),
        ["listner: unknown part of the model (cluster, server_groups, listeners)"],
    ),
    "missing cluster name": (lambda raw, nodes: raw.update(cluster={}), ["cluster.name: is required"]),
    # duplicates
    "duplicate listener name": (
        lambda raw, nodes: raw["listeners"].append(dict(listener(raw, "web-tcp"), port=81)),
        ["listeners[web-tcp].name: duplicate listener name"],
    ),
    "duplicate vip/port/transport across protocols": (
        lambda raw, nodes: raw["listeners"].append(
            {"name": "dup", "protocol": "http", "vip": "203.0.113.10", "port": 80, "server_group": "web"}
        ),
        ["listeners[dup].port: 203.0.113.10:80/tcp is already used by listeners[web-tcp]"],
    ),
    "same port on udp and tcp is fine": (
        lambda raw, nodes: raw["listeners"].append(
            {"name": "udp80", "protocol": "udp", "vip": "203.0.113.10", "port": 80, "server_group": "web"}
        ),
        [],
    ),
    "duplicate vip written differently": (
        lambda raw, nodes: raw["listeners"].append(
            {
                "name": "dup6",
                "protocol": "udp",
                "vip": "2001:db8:0::10",
                "port": 53,
                "server_group": "dns6",
                "forwarding": "dr",
            }
        ),
        ["listeners[dup6].port: [2001:db8::10]:53/udp is already used by listeners[dns6]"],
    ),
    "duplicate member": (
        lambda raw, nodes: raw["server_groups"]["web"]["members"].append({"address": "10.99.0.42", "port": 8080}),
        ["server_groups[web].members[2]: duplicate member 10.99.0.42:8080 (also members[0])"],
    ),
    "duplicate rule": (
        lambda raw, nodes: listener(raw, "site")["rules"].append({"path": "/api", "server_group": "web"}),
        ["listeners[site].rules[3]: same domain and path as rules[0]"],
    ),
    "duplicate certificate": (
        lambda raw, nodes: listener(raw, "site")["certificates"].append({"name": "main", "domains": ["a.example"]}),
        ["listeners[site].certificates: certificate 'main' is listed twice"],
    ),
    # server groups and members
    "unknown server group": (
        set_in("web-tcp", server_group="nope"),
        ["listeners[web-tcp].server_group: unknown server group 'nope'"],
    ),
    "unknown server group in a rule": (
        lambda raw, nodes: listener(raw, "site")["rules"][0].update(server_group="nope"),
        ["listeners[site].rules[0].server_group: unknown server group 'nope'"],
    ),
    "empty server group": (
        lambda raw, nodes: (
            raw["server_groups"].update(empty={"members": []}) or listener(raw, "web-tcp").update(server_group="empty")
        ),
        ["listeners[web-tcp].server_group: server group 'empty' has no members"],
    ),
    "listener without server group": (
        lambda raw, nodes: listener(raw, "web-tcp").pop("server_group"),
        ["listeners[web-tcp].server_group: is required"],
    ),
    "member host not in backends": (
        lambda raw, nodes: raw["server_groups"]["web"]["members"][0].update(host="ks1"),
        ["server_groups[web].members[0].host: 'ks1' is not a host in the backends group"],
    ),
    "member with host and address": (
        lambda raw, nodes: raw["server_groups"]["web"]["members"][0].update(address="10.99.0.9"),
        ["server_groups[web].members[0]: needs exactly one of host (an inventory host in backends) or address"],
    ),
    "member weight above 100": (
        lambda raw, nodes: raw["server_groups"]["web"]["members"][0].update(weight=101),
        ["server_groups[web].members[0].weight: 101 is out of range 0-100"],
    ),
    "member weight negative": (
        lambda raw, nodes: raw["server_groups"]["web"]["members"][0].update(weight=-1),
        ["server_groups[web].members[0].weight: -1 is out of range 0-100"],
    ),
    "member without port": (
        lambda raw, nodes: raw["server_groups"]["web"]["members"][0].pop("port"),
        ["server_groups[web].members[0].port: is required"],
    ),
    "bad member address": (
        lambda raw, nodes: raw["server_groups"]["api"]["members"][0].update(address="10.99.0.500"),
        ["server_groups[api].members[0].address: '10.99.0.500' is not an IPv4 or IPv6 address"],
    ),
    "bad group name": (
        lambda raw, nodes: raw["server_groups"].update({"Web Servers": {"members": []}}),
        ["server_groups[Web Servers]: 'Web Servers' is not a server group name ([a-z0-9_-])"],
    ),
    "backend host without address": (
        lambda raw, nodes: nodes["backends"]["be1"].update(internal_address=None),
        ["nodes[be1].openclb_internal_address: is required for a host in backends"],
    ),
    "lvs node without front address": (
        lambda raw, nodes: nodes["lvs_nodes"]["lvs1"].pop("front_address"),
        ["nodes[lvs1].openclb_front_address: is required for a host in lvs_nodes"],
    ),
    "node address is not an address": (
        lambda raw, nodes: nodes["l7_nodes"]["l7-1"].update(internal_address="10.99.0.21/24"),
        ["nodes[l7-1].openclb_internal_address: '10.99.0.21/24' is not an IPv4 or IPv6 address"],
    ),
    # forwarding
    "dr port mismatch": (
        set_in("web-tcp", forwarding="dr"),
        [
            "listeners[web-tcp].forwarding: dr cannot change the port: member be1 of server group 'web' uses port "
            "8080, the listener port is 80",
            "listeners[web-tcp].forwarding: dr cannot change the port: member be2 of server group 'web' uses port "
            "8080, the listener port is 80",
        ],
    ),
    "tun port mismatch": (
        lambda raw, nodes: listener(raw, "dns6").update(forwarding="tun", port=5353),
        [
            "listeners[dns6].forwarding: tun cannot change the port: member 2001:db8:99::41 of server group 'dns6' "
            "uses port 53, the listener port is 5353"
        ],
    ),
    "nat across families": (
        set_in("dns6", forwarding="nat", vip="203.0.113.53"),
        [
            "listeners[dns6].forwarding: nat needs members of the VIP's family (IPv4): 2001:db8:99::41 is "
            "2001:db8:99::41"
        ],
    ),
    "tun across families is fine": (set_in("dns6", forwarding="tun", vip="203.0.113.53"), []),
    "l7 dr across families": (
        set_in("site", vip="2001:db8::20"),
        [
            "listeners[site].forwarding: dr needs L7 nodes with an address of the VIP's family (IPv6): l7-1 has "
            "10.99.0.21 (set openclb_internal_address6)",
            "listeners[site].forwarding: dr needs L7 nodes with an address of the VIP's family (IPv6): l7-2 has "
            "10.99.0.22 (set openclb_internal_address6)",
            "listeners[site-http].redirect_to_https: no https listener on 203.0.113.20:443",
        ],
    ),
    "bad forwarding": (
        set_in("web-tcp", forwarding="fullnat"),
        ["listeners[web-tcp].forwarding: 'fullnat' is not one of nat, dr, tun"],
    ),
    # schedulers
    "bad scheduler": (
        set_in("web-tcp", scheduler="qch"),
        [
            "listeners[web-tcp].scheduler: 'qch' is not one of dh, fo, lblc, lblcr, lc, mh, nq, ovf, rr, sed, sh, "
            "twos, wlc, wrr, sch, tch"
        ],
    ),
    "scheduler without an nginx equivalent on l7": (
        set_in("site", scheduler="dh"),
        [
            "listeners[site].scheduler: 'dh' has no nginx equivalent on https listeners (use one of lc, mh, rr, sh, "
            "wlc, wrr, sch, tch)"
        ],
    ),
    # health checks
    "udp listener with http check": (
        set_in("dns6", health_check={"type": "http"}),
        ["listeners[dns6].health_check.type: http checks are not possible on a udp listener (use udp or none)"],
    ),
    "tcp listener with udp check": (
        set_in("web-tcp", health_check={"type": "udp"}),
        ["listeners[web-tcp].health_check.type: udp checks are only possible on udp listeners, not tcp"],
    ),
    "http settings on a tcp check": (
        set_in("web-tcp", health_check={"type": "tcp", "http": {"uri": "/health"}}),
        ["listeners[web-tcp].health_check.http: only valid when health_check.type is http (it is tcp)"],
    ),
    "check uri must start with /": (
        set_in("web-tcp", health_check={"type": "http", "http": {"uri": "health"}}),
        ["listeners[web-tcp].health_check.http.uri: 'health' must start with /"],
    ),
    "check status class": (
        set_in("web-tcp", health_check={"type": "http", "http": {"status": ["http_200"]}}),
        [
            "listeners[web-tcp].health_check.http.status[0]: 'http_200' is not one of http_2xx, http_3xx, "
            "http_4xx, http_5xx"
        ],
    ),
    "check host is a host name": (
        set_in("web-tcp", health_check={"type": "http", "http": {"host": "*.example.com"}}),
        ["listeners[web-tcp].health_check.http.host: '*.example.com': wildcards are not allowed here"],
    ),
    "udp response without request": (
        set_in("dns6", health_check={"udp": {"response": "pong"}}),
        ["listeners[dns6].health_check.udp.response: needs udp.request (a response can only answer a request)"],
    ),
    # ACLs
    "acl entry with host bits": (
        set_in("web-tcp", acl={"type": "whitelist", "entries": ["198.51.100.1/24"]}),
        ["listeners[web-tcp].acl.entries[0]: '198.51.100.1/24' is not a CIDR (198.51.100.1/24 has host bits set)"],
    ),
    "acl entry of the other family": (
        set_in("web-tcp", acl={"type": "blacklist", "entries": ["2001:db8::/32"]}),
        ["listeners[web-tcp].acl.entries[0]: '2001:db8::/32' is IPv6 but the VIP is IPv4"],
    ),
    "acl entry garbage": (
        set_in("web-tcp", acl={"type": "blacklist", "entries": ["everyone"]}),
        [
            "listeners[web-tcp].acl.entries[0]: 'everyone' is not a CIDR ('everyone' does not appear to be an IPv4 "
            "or IPv6 network)"
        ],
    ),
    "acl type": (
        set_in("web-tcp", acl={"type": "greylist", "entries": []}),
        ["listeners[web-tcp].acl.type: 'greylist' is not one of whitelist, blacklist"],
    ),
    "acl too long": (
        set_in("web-tcp", acl={"type": "blacklist", "entries": [f"10.{i // 256}.{i % 256}.0/24" for i in range(1001)]}),
        ["listeners[web-tcp].acl.entries: 1001 entries, at most 1000 allowed"],
    ),
    # addresses
    "bad vip": (
        set_in("web-tcp", vip="203.0.113.300"),
        ["listeners[web-tcp].vip: '203.0.113.300' is not an IPv4 or IPv6 address"],
    ),
    "multicast vip": (
        set_in("web-tcp", vip="224.0.0.18"),
        ["listeners[web-tcp].vip: '224.0.0.18' cannot be a VIP (multicast, unspecified, loopback or link-local)"],
    ),
    "sync group must be multicast": (
        lambda raw, nodes: raw["cluster"].update(sync={"mcast_group": "10.0.0.1"}),
        ["cluster.sync.mcast_group: '10.0.0.1' is not a multicast address"],
    ),
    "sync threshold below period": (
        lambda raw, nodes: raw["cluster"].update(sync={"threshold": [50, 50]}),
        ["cluster.sync.threshold: [50, 50]: threshold 50 must be below period 50"],
    ),
    # L4 / L7 scope
    "l7 option on an l4 listener": (
        set_in("web-tcp", cookie={"type": "insert"}, gzip=False),
        [
            "listeners[web-tcp].cookie: only valid on http/https listeners, not tcp",
            "listeners[web-tcp].gzip: only valid on http/https listeners, not tcp",
        ],
    ),
    "rules on an l4 listener": (
        set_in("web-tcp", rules=[{"path": "/", "server_group": "web"}]),
        ["listeners[web-tcp].rules: only valid on http/https listeners, not tcp"],
    ),
    "l4 option on an l7 listener": (
        set_in("site", persistence=60),
        ["listeners[site].persistence: only valid on tcp/udp listeners, not https"],
    ),
    "idle timeout on udp": (
        set_in("dns6", idle_timeout=60),
        ["listeners[dns6].idle_timeout: only valid on tcp listeners, not udp"],
    ),
    "http2 on http": (
        set_in("site-http", http2=True),
        ["listeners[site-http].http2: only valid on https listeners, not http"],
    ),
    "redirect on https": (
        set_in("site", redirect_to_https=8443),
        ["listeners[site].redirect_to_https: only valid on http listeners, not https"],
    ),
    # TLS
    "https without certificates": (
        lambda raw, nodes: listener(raw, "site").pop("certificates"),
        ["listeners[site].certificates: is required"],
    ),
    "https with an empty certificate list": (
        set_in("site", certificates=[]),
        ["listeners[site].certificates: needs at least 1 entry"],
    ),
    "extra certificate without domains": (
        lambda raw, nodes: listener(raw, "site")["certificates"].append({"name": "third"}),
        ["listeners[site].certificates[2].domains: is required for every certificate but the first (SNI)"],
    ),
    "ambiguous sni": (
        lambda raw, nodes: listener(raw, "site")["certificates"].append(
            {"name": "other", "domains": ["example.com", "x.example.org"]}
        ),
        [
            "listeners[site].certificates[2].domains: 'example.com' is also served by certificate 'main' with a "
            "different domain list (ambiguous for SNI)"
        ],
    ),
    "bad tls policy": (
        set_in("site", tls_policy="tls_cipher_policy_1_3"),
        [
            "listeners[site].tls_policy: 'tls_cipher_policy_1_3' is not one of tls_cipher_policy_1_0, "
            "tls_cipher_policy_1_1, tls_cipher_policy_1_2, tls_cipher_policy_1_2_strict, "
            "tls_cipher_policy_1_2_strict_with_1_3"
        ],
    ),
    "bad key store": (
        lambda raw, nodes: listener(raw, "site")["certificates"][0].update(key_store="vault"),
        ["listeners[site].certificates[0].key_store: 'vault' is not one of keyserver, local"],
    ),
    # rules
    "wildcard in the middle": (
        lambda raw, nodes: listener(raw, "site")["rules"][1].update(domain="www.*.example.com"),
        [
            "listeners[site].rules[1].domain: 'www.*.example.com': a wildcard must be the whole leftmost label "
            "('*.example.com')"
        ],
    ),
    "partial wildcard label": (
        lambda raw, nodes: listener(raw, "site")["rules"][1].update(domain="w*.example.com"),
        [
            "listeners[site].rules[1].domain: 'w*.example.com': a wildcard must be the whole leftmost label "
            "('*.example.com')"
        ],
    ),
    "wildcard on a tld": (
        lambda raw, nodes: listener(raw, "site")["rules"][1].update(domain="*.com"),
        ["listeners[site].rules[1].domain: '*.com': a wildcard needs at least two labels after '*.'"],
    ),
    "bad domain": (
        lambda raw, nodes: listener(raw, "site")["rules"][1].update(domain="-bad-.example.com"),
        ["listeners[site].rules[1].domain: '-bad-.example.com' is not a valid domain name"],
    ),
    "path must start with /": (
        lambda raw, nodes: listener(raw, "site")["rules"][0].update(path="api"),
        ["listeners[site].rules[0].path: 'api' must start with /"],
    ),
    "path with characters nginx would need quoted": (
        lambda raw, nodes: listener(raw, "site")["rules"][0].update(path="/a b;"),
        ["listeners[site].rules[0].path: '/a b;' has characters not allowed in a URL path"],
    ),
    "rule without domain or path": (
        lambda raw, nodes: listener(raw, "site")["rules"].append({"server_group": "web"}),
        ["listeners[site].rules[3]: needs a domain, a path or both"],
    ),
    "too many rules": (
        set_in("site", rules=[{"path": f"/p{i}", "server_group": "web"} for i in range(41)]),
        ["listeners[site].rules: 41 entries, at most 40 allowed"],
    ),
    "rules on a redirecting listener": (
        set_in("site-http", rules=[{"path": "/x", "server_group": "web"}]),
        ["listeners[site-http].rules: a listener with redirect_to_https redirects every request: rules never apply"],
    ),
    # cookies and redirects
    "cookie rewrite without name": (
        set_in("site", cookie={"type": "rewrite"}),
        ["listeners[site].cookie.name: is required for cookie type rewrite (the cookie the backend sets)"],
    ),
    "cookie name nginx cannot read": (
        set_in("site", cookie={"type": "rewrite", "name": "my-session"}),
        ["listeners[site].cookie.name: 'my-session' is not a cookie name ([A-Za-z0-9_], at most 64)"],
    ),
    "cookie rewrite with timeout": (
        set_in("site", cookie={"type": "rewrite", "name": "SESSION", "timeout": 60}),
        ["listeners[site].cookie.timeout: only valid for cookie type insert"],
    ),
    "redirect to a missing https listener": (
        set_in("site-http", redirect_to_https=8443),
        ["listeners[site-http].redirect_to_https: no https listener on 203.0.113.20:8443"],
    ),
    "redirect code": (
        set_in("site-http", redirect_to_https={"port": 443, "code": 303}),
        ["listeners[site-http].redirect_to_https.code: 303 is not one of 301, 302, 307, 308"],
    ),
    "one certificate, two definitions": (
        lambda raw, nodes: raw["listeners"].append(
            {
                "name": "site2",
                "protocol": "https",
                "vip": "203.0.113.21",
                "port": 443,
                "server_group": "web",
                "certificates": [{"name": "main", "domains": ["www.example.com"], "key_store": "local"}],
            }
        ),
        [
            "listeners[site2].certificates[0].key_store: certificate 'main' has key_store 'keyserver' in "
            "listeners[site]: one certificate, one definition",
            "listeners[site2].certificates[0].domains: certificate 'main' has domains ['example.com'] in "
            "listeners[site]: one certificate, one definition",
        ],
    ),
    "nat to l7 nodes with a shared port": (
        lambda raw, nodes: raw["listeners"].append(
            {
                "name": "other",
                "protocol": "http",
                "vip": "203.0.113.30",
                "port": 80,
                "server_group": "web",
                "forwarding": "nat",
            }
        ),
        [
            "listeners[other].forwarding: nat hides the VIP from the L7 nodes, and listeners[site-http] also uses "
            "port 80: use dr or tun"
        ],
    ),
    # cluster
    "nat gateway needs a prefix": (
        lambda raw, nodes: raw["cluster"].update(nat_gateway="10.99.0.1"),
        ["cluster.nat_gateway: '10.99.0.1' is not an address with a prefix length (10.99.0.1/24)"],
    ),
    "nat gateway is not the network address": (
        lambda raw, nodes: raw["cluster"].update(nat_gateway="10.99.0.0/24"),
        ["cluster.nat_gateway: '10.99.0.0/24' is the network or broadcast address of 10.99.0.0/24"],
    ),
    "vrrp sub-second adverts need v3": (
        lambda raw, nodes: raw["cluster"].update(vrrp={"version": 2, "advert_int": 0.5}),
        ["cluster.vrrp.advert_int: 0.5: sub-second or fractional adverts need vrrp.version 3"],
    ),
    "vrrp v3 advert steps": (
        lambda raw, nodes: raw["cluster"].update(vrrp={"advert_int": 0.125}),
        ["cluster.vrrp.advert_int: 0.125: VRRPv3 adverts are in steps of 0.01 s"],
    ),
    "vrrp preempt_delay range": (
        lambda raw, nodes: raw["cluster"].update(vrrp={"preempt": True, "preempt_delay": 1001}),
        ["cluster.vrrp.preempt_delay: 1001 is out of range 0-1000"],
    ),
    "vrrp preempt is a boolean": (
        lambda raw, nodes: raw["cluster"].update(vrrp={"preempt": "sometimes"}),
        ["cluster.vrrp.preempt: 'sometimes' is not a boolean"],
    ),
    "sync version": (
        lambda raw, nodes: raw["cluster"].update(sync={"version": 2}),
        ["cluster.sync.version: 2 is out of range 0-1"],
    ),
    "conntrack sync group must be multicast": (
        lambda raw, nodes: raw["cluster"].update(conntrack_sync={"mcast_group": "10.0.0.1"}),
        ["cluster.conntrack_sync.mcast_group: '10.0.0.1' is not a multicast address"],
    ),
    "vrrp version": (
        lambda raw, nodes: raw["cluster"].update(vrrp={"version": 4}),
        ["cluster.vrrp.version: 4 is not one of 2, 3"],
    ),
    "vrid range": (
        lambda raw, nodes: raw["cluster"].update(vrrp={"virtual_router_id": 255}),
        ["cluster.vrrp.virtual_router_id: 255 is out of range 1-254"],
    ),
    "cluster name syntax": (
        lambda raw, nodes: raw["cluster"].update(name="Lab_1"),
        ["cluster.name: 'Lab_1' is not a name ([a-z0-9-], at most 63)"],
    ),
    # tiers and limits
    "l7 listener without l7 nodes": (
        lambda raw, nodes: nodes.update(l7_nodes={}),
        [
            "listeners[site-http].protocol: http listeners need hosts in the l7_nodes group (it is empty)",
            "listeners[site].protocol: https listeners need hosts in the l7_nodes group (it is empty)",
        ],
    ),
    "too many listeners": (
        lambda raw, nodes: raw.update(
            listeners=[
                {"name": f"l{i}", "protocol": "tcp", "vip": "203.0.113.10", "port": 1000 + i, "server_group": "web"}
                for i in range(51)
            ]
        ),
        ["listeners: 51 listeners, at most 50 allowed"],
    ),
    "too many backends": (
        lambda raw, nodes: raw["server_groups"].update(
            big={"members": [{"address": f"10.98.{i // 250}.{i % 250 + 1}", "port": 80} for i in range(200)]}
        ),
        ["server_groups: 204 distinct backend addresses, at most 200 allowed"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validation_rule(case):
    mutate, expected = CASES[case]
    assert sorted(errors_after(mutate)) == sorted(expected)


def test_every_error_is_collected_at_once():
    def mutate(raw, nodes):
        listener(raw, "web-tcp").update(scheduler="fast", port=0)
        listener(raw, "site")["rules"][0].update(path="api")
        raw["server_groups"]["web"]["members"][0].update(weight=500)
        raw["cluster"].update(vrrp={"version": 9})

    assert errors_after(mutate) == [
        "cluster.vrrp.version: 9 is not one of 2, 3",
        "server_groups[web].members[0].weight: 500 is out of range 0-100",
        "listeners[web-tcp].port: 0 is out of range 1-65535",
        "listeners[web-tcp].scheduler: 'fast' is not one of dh, fo, lblc, lblcr, lc, mh, nq, ovf, rr, sed, sh, "
        "twos, wlc, wrr, sch, tch",
        "listeners[site].rules[0].path: 'api' must start with /",
    ]


# ---------------------------------------------------------------------------
# Defaults and normalisation details


def normalized_listener(mutate, name):
    raw = copy.deepcopy(RAW)
    mutate(raw, None)
    return next(lst for lst in model.normalize(raw, NODES)["listeners"] if lst["name"] == name)


def test_scheduler_aliases():
    assert normalized_listener(set_in("web-tcp", scheduler="tch"), "web-tcp")["scheduler"] == "mh"
    assert normalized_listener(set_in("web-tcp", scheduler="SCH"), "web-tcp")["scheduler"] == "sh"


def test_values_given_as_strings_are_accepted():
    # -e key=value and some lookups give strings
    lst = normalized_listener(set_in("web-tcp", port="8080", persistence="30"), "web-tcp")
    assert (lst["port"], lst["persistence"]) == (8080, 30)


def test_cookie_insert_defaults():
    lst = normalized_listener(set_in("site", cookie={"type": "insert"}), "site")
    assert lst["cookie"] == {"type": "insert", "timeout": 3600, "name": "OPENCLB_SRV"}


def test_cookie_rewrite_keeps_the_backend_cookie():
    lst = normalized_listener(set_in("site", cookie={"type": "rewrite", "name": "JSESSIONID"}), "site")
    assert lst["cookie"] == {"type": "rewrite", "timeout": None, "name": "JSESSIONID"}


def test_redirect_to_a_non_default_port_keeps_the_port():
    def mutate(raw, nodes):
        listener(raw, "site")["port"] = 8443
        listener(raw, "site-http")["redirect_to_https"] = {"port": 8443, "code": 308}

    lst = normalized_listener(mutate, "site-http")
    assert lst["redirect_to_https"] == {"port": 8443, "code": 308, "url": "https://$host:8443$request_uri"}


def test_legacy_tls_policy_lowers_the_openssl_security_level():
    lst = normalized_listener(set_in("site", tls_policy="tls_cipher_policy_1_0"), "site")
    assert lst["tls"]["protocols"] == ["TLSv1", "TLSv1.1", "TLSv1.2"]
    assert lst["tls"]["ciphers"].endswith(":@SECLEVEL=0")


def test_dual_certificates_share_one_sni_group_and_vhost():
    certs = [
        {"name": "rsa", "domains": ["a.example", "*.a.example"]},
        {"name": "ecdsa", "domains": ["*.a.example", "a.example"]},
    ]
    lst = normalized_listener(set_in("site", certificates=certs, rules=[]), "site")
    assert lst["sni_groups"] == [
        {"domains": ["*.a.example", "a.example"], "certificates": ["rsa", "ecdsa"], "default": True}
    ]
    assert lst["vhosts"] == [
        {
            "server_names": [],
            "default": True,
            "certificates": ["rsa", "ecdsa"],
            "locations": [{"path": "/", "upstream": "site__web"}],
        }
    ]


def test_longest_path_first_and_domain_catch_all():
    rules = [
        {"domain": "a.example.com", "path": "/", "server_group": "api"},
        {"domain": "a.example.com", "path": "/x", "server_group": "web"},
        {"domain": "a.example.com", "path": "/x/long", "server_group": "api"},
    ]
    lst = normalized_listener(set_in("site", rules=rules), "site")
    assert lst["vhosts"][0]["server_names"] == ["a.example.com"]
    assert lst["vhosts"][0]["locations"] == [
        {"path": "/x/long", "upstream": "site__api"},
        {"path": "/x", "upstream": "site__web"},
        {"path": "/", "upstream": "site__api"},  # the rule's own `/` beats the listener's group
    ]


def test_weight_zero_member_is_quiesced_not_removed():
    svc = next(
        s
        for s in model.normalize(
            dict(
                RAW,
                listeners=RAW["listeners"]
                + [{"name": "api-tcp", "protocol": "tcp", "vip": "203.0.113.10", "port": 9090, "server_group": "api"}],
            ),
            NODES,
        )["ipvs_services"]
        if s["listener"] == "api-tcp"
    )
    assert svc["real_servers"] == [dict(API, forwarding="nat", check_port=9090)]


def test_ipvs_tcp_timeout_is_the_longest_idle_timeout():
    raw = copy.deepcopy(RAW)
    listener(raw, "web-tcp")["idle_timeout"] = 60
    raw["listeners"].append(
        {
            "name": "long",
            "protocol": "tcp",
            "vip": "203.0.113.10",
            "port": 81,
            "server_group": "web",
            "idle_timeout": 600,
        }
    )
    assert model.normalize(raw, NODES)["ipvs_timeouts"] == {"tcp": 600, "tcpfin": 120, "udp": 90}


def test_health_check_port_overrides_the_member_port():
    lst = set_in("web-tcp", health_check={"port": 8081})
    raw = copy.deepcopy(RAW)
    lst(raw, None)
    svc = model.normalize(raw, NODES)["ipvs_services"][0]
    assert [rs["check_port"] for rs in svc["real_servers"]] == [8081, 8081]


# ---------------------------------------------------------------------------
# nodes_from_inventory: the one reader of host variables


class LazyHostvars(dict):
    """Stands in for Ansible's HostVars: a mapping of mappings whose values
    may fail to resolve (an undefined template raises on access)."""


class Exploding(dict):
    def get(self, key, default=None):
        if key == "openclb_front_address":
            raise RuntimeError("undefined variable")
        return super().get(key, default)


def test_nodes_from_inventory():
    groups = {"all": ["lvs1", "be1", "c1"], "lvs_nodes": ["lvs1"], "backends": ["be1"], "clients": ["c1"]}
    hostvars = LazyHostvars(
        lvs1={
            "openclb_front_address": "203.0.113.11",
            "openclb_internal_address": " 10.99.0.11 ",
            "openclb_front_interface": "front",
            "openclb_internal_interface": "internal",
        },
        be1=Exploding(openclb_internal_address="10.99.0.41", openclb_front_address=""),
    )
    assert model.nodes_from_inventory(groups, hostvars) == {
        "lvs_nodes": {
            "lvs1": {
                "front_address": "203.0.113.11",
                "internal_address": "10.99.0.11",
                "internal_address6": None,
                "front_interface": "front",
                "internal_interface": "internal",
            }
        },
        "l7_nodes": {},
        "key_servers": {},
        "backends": {
            "be1": {
                "front_address": None,
                "internal_address": "10.99.0.41",
                "internal_address6": None,
                "front_interface": None,
                "internal_interface": None,
            }
        },
    }


def test_nat_gateway_joins_the_vrrp_instance_of_its_family_and_tun_vips():
    raw = copy.deepcopy(RAW)
    raw["cluster"]["nat_gateway"] = "10.99.0.1/24"
    raw["listeners"] = [dict(listener(raw, "web-tcp"), port=8080, forwarding="tun")]
    got = model.normalize(raw, NODES)
    assert got["vrrp_instances"] == [
        {
            "name": "test_v4",
            "family": 4,
            "virtual_router_id": 51,
            "vips": ["203.0.113.10"],
            "gateway": {"address": "10.99.0.1", "prefix": 24, "family": 4, "network": "10.99.0.0/24"},
        },
    ]
    assert got["node_vips"] == {"be1": {"dr": [], "tun": ["203.0.113.10"]}, "be2": {"dr": [], "tun": ["203.0.113.10"]}}


def test_ipv6_only_model_numbers_its_instance_after_the_ipv4_slot():
    raw = copy.deepcopy(RAW)
    raw["listeners"] = [listener(raw, "dns6")]
    assert [(i["name"], i["virtual_router_id"]) for i in model.normalize(raw, NODES)["vrrp_instances"]] == [
        ("test_v6", 52)
    ]


def test_dual_stack_l7_nodes_serve_ipv6_vips_from_their_second_address():
    nodes = copy.deepcopy(NODES)
    nodes["l7_nodes"]["l7-1"]["internal_address6"] = "2001:db8:99::21"
    nodes["l7_nodes"]["l7-2"]["internal_address6"] = "2001:DB8:99::22"
    raw = copy.deepcopy(RAW)
    listener(raw, "site")["vip"] = "2001:db8::20"
    listener(raw, "site-http")["vip"] = "2001:db8::20"
    got = model.normalize(raw, nodes)
    svc = next(s for s in got["ipvs_services"] if s["listener"] == "site")
    assert [(rs["name"], rs["address"]) for rs in svc["real_servers"]] == [
        ("l7-1", "2001:db8:99::21"),
        ("l7-2", "2001:db8:99::22"),
    ]
    assert got["node_vips"]["l7-1"] == {"dr": ["2001:db8::20"], "tun": []}


def test_internal_address6_must_be_ipv6():
    def mutate(raw, nodes):
        nodes["l7_nodes"]["l7-1"]["internal_address6"] = "10.99.0.121"

    assert errors_after(mutate) == ["nodes[l7-1].openclb_internal_address6: '10.99.0.121' is not an IPv6 address"]


def example_inventory():
    """(raw model, nodes, other group_vars) of inventories/example. Its addresses
    are literal, so hosts.yml is read here without Ansible."""
    yaml = pytest.importorskip("yaml")
    root = os.path.join(os.path.dirname(__file__), *[".."] * 4, "inventories", "example")
    with open(os.path.join(root, "hosts.yml")) as f:
        inventory = yaml.safe_load(f)
    with open(os.path.join(root, "group_vars", "all", "openclb.yml")) as f:
        gv = yaml.safe_load(f)
    keys = {"front_address", "internal_address", "internal_address6"}
    nodes = {
        group: {
            host: {k: hv.get(f"openclb_{k}") for k in keys}
            for host, hv in inventory["all"]["children"][group]["hosts"].items()
        }
        for group in model.NODE_GROUPS
    }
    raw = {
        "cluster": gv["openclb_cluster"],
        "server_groups": gv["openclb_server_groups"],
        "listeners": gv["openclb_listeners"],
    }
    with open(os.path.join(root, "group_vars", "all", "main.yml")) as f:
        main = yaml.safe_load(f)
    return raw, nodes, main


def test_example_inventory_model_is_valid():
    # inventories/example is the model users copy: it must stay valid.
    raw, nodes = example_inventory()[:2]
    assert model.validate(raw, nodes) == []
    got = model.normalize(raw, nodes)
    assert model.summary(got)["listeners"] == {"tcp": 1, "udp": 1, "http": 2, "https": 2}
    assert [i["virtual_router_id"] for i in got["vrrp_instances"]] == [61, 62]


def test_controller_directories_are_required_by_name():
    from ansible_collections.openclb.lb.plugins.action.validate_model import missing_controller_dirs

    raw, nodes, main = example_inventory()
    got = model.normalize(raw, nodes)
    assert missing_controller_dirs(got, main) == []
    errors = missing_controller_dirs(got, {})
    assert [e.split(":")[0] for e in errors] == ["openclb_tls_material_dir", "openclb_pki_dir"]
    # Local keys only: no key-server tunnel, so no PKI directory either.
    for lst in raw["listeners"]:
        for cert in lst.get("certificates", []):
            cert["key_store"] = "local"
    local = model.normalize(raw, nodes)
    assert [e.split(":")[0] for e in missing_controller_dirs(local, {})] == ["openclb_tls_material_dir"]
