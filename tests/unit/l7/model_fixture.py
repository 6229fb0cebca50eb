"""A normalised model (docs/model.md, "Normalised form") for the L7 tests.

Written by hand until plugins/module_utils/model.py lands; `normalised()`
then becomes a thin call of model.normalize() on the raw form.
"""

import copy

BACKENDS = {
    "be1": "10.99.0.21",
    "be2": "10.99.0.22",
    "be3": "10.99.0.23",
    "be4": "10.99.0.24",
}
VIP = "203.0.113.10"
VIP2 = "203.0.113.11"


def _hc(**over):
    hc = {
        "type": "http",
        "port": None,
        "interval": 1,
        "timeout": 1,
        "healthy_threshold": 2,
        "unhealthy_threshold": 2,
        "http": {"method": "GET", "uri": "/health", "host": None, "status": ["http_2xx", "http_3xx"]},
        "udp": None,
    }
    hc.update(over)
    return hc


def _listener(name, protocol, port, group, vip=VIP, **over):
    li = {
        "name": name,
        "protocol": protocol,
        "tier": "l7",
        "vip": vip,
        "family": 6 if ":" in vip else 4,
        "port": port,
        "server_group": group,
        "scheduler": "wrr",
        "forwarding": "dr",
        "persistence": 0,
        "idle_timeout": 900,
        "drain_timeout": 300,
        "health_check": _hc(),
        "acl": None,
        "rules": [],
        "cookie": None,
        "redirect_to_https": None,
        "request_timeout": 60,
        "keepalive_timeout": 15,
        "gzip": True,
        "http2": protocol == "https",
        "forwarded_headers": {
            "xff": True, "proto": True, "real_ip": True, "lb_id": True, "listener": True, "remove": [],
        },
        "tls_policy": "tls_cipher_policy_1_2" if protocol == "https" else None,
        "certificates": [],
    }
    li.update(over)
    return li


def _member(name, port=8080, weight=1):
    return {"name": name, "address": BACKENDS[name], "port": port, "weight": weight}


def normalised(port=8080):
    groups = {
        "web": {"name": "web", "members": [_member("be1", port), _member("be2", port)]},
        "api": {"name": "api", "members": [_member("be3", port)]},
        "static": {"name": "static", "members": [_member("be4", port)]},
    }
    listeners = [
        _listener(
            "web", "http", 80, "web",
            rules=[
                {"domain": "www.example.com", "path": "/api", "server_group": "api"},
                {"domain": "*.example.com", "path": None, "server_group": "static"},
                {"domain": None, "path": "/static", "server_group": "static"},
            ],
            request_timeout=2,
            forwarded_headers={
                "xff": True, "proto": True, "real_ip": True, "lb_id": True, "listener": True,
                "remove": ["X-Debug"],
            },
        ),
        _listener("sticky", "http", 8080, "web", cookie={"type": "insert", "timeout": 3600, "name": None}),
        _listener("rewrite", "http", 8081, "web", cookie={"type": "rewrite", "timeout": None, "name": "APPSESSION"}),
        _listener(
            "secure", "https", 443, "web",
            tls_policy="tls_cipher_policy_1_2_strict",
            certificates=[
                {"name": "www", "domains": ["www.example.com"], "key_store": "local"},
                {"name": "api", "domains": ["api.example.net"], "key_store": "local"},
            ],
        ),
        _listener(
            "legacy", "https", 8443, "web",
            tls_policy="tls_cipher_policy_1_0", http2=False,
            certificates=[{"name": "www", "domains": ["www.example.com"], "key_store": "local"}],
        ),
        _listener("redirect", "http", 80, "web", vip=VIP2, redirect_to_https=443),
    ]
    lvs = [{"name": "l7a", "address": "10.99.0.11"}]
    ipvs = [
        {
            "listener": li["name"], "protocol": "tcp", "vip": li["vip"], "family": li["family"],
            "port": li["port"], "scheduler": li["scheduler"], "persistence": 0,
            "real_servers": [dict(n, port=li["port"], weight=1, forwarding="dr") for n in lvs],
            "health_check": li["health_check"],
        }
        for li in listeners
    ]
    return {
        "cluster": {"name": "lab", "id": "lb-lab-0001", "vrrp": {}, "sync": {}},
        "server_groups": groups,
        "listeners": copy.deepcopy(listeners),
        "ipvs_services": ipvs,
        "vips": [{"address": VIP, "family": 4}, {"address": VIP2, "family": 4}],
        "l7_listeners": listeners,
    }
