"""The model the L7 tests use, normalised by the real model code.

`raw()` is what a user would write; `normalised()` runs it through
plugins/module_utils/model.py (the contract in docs/model.md), so these
tests break when the contract moves.
"""

import copy
import importlib.util
import os

_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "plugins", "module_utils", "model.py"
)
_spec = importlib.util.spec_from_file_location("openclb_model_for_l7", os.path.abspath(_PATH))
model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(model)

BACKENDS = {
    "be1": "10.99.0.21",
    "be2": "10.99.0.22",
    "be3": "10.99.0.23",
    "be4": "10.99.0.24",
}
L7_NODE = "l7a"
L7_ADDRESS = "10.99.0.1"
VIP = "203.0.113.10"

NODES = {
    "lvs_nodes": {"lvs1": {"front_address": "203.0.113.2", "internal_address": "10.99.0.2"}},
    "l7_nodes": {L7_NODE: {"internal_address": L7_ADDRESS}},
    "key_servers": {},
    "backends": {name: {"internal_address": addr} for name, addr in BACKENDS.items()},
}

HC = {
    "type": "http",
    "interval": 1,
    "timeout": 1,
    "healthy_threshold": 2,
    "unhealthy_threshold": 2,
    "http": {"method": "GET", "uri": "/health"},
}


def raw():
    def http(name, port, **over):
        li = {
            "name": name,
            "protocol": "http",
            "vip": VIP,
            "port": port,
            "server_group": "web",
            "health_check": copy.deepcopy(HC),
        }
        li.update(over)
        return li

    def https(name, port, policy, certs, **over):
        return http(name, port, protocol="https", tls_policy=policy, certificates=certs, **over)

    www = {"name": "www", "domains": ["www.example.com"], "key_store": "local"}
    api = {"name": "api", "domains": ["api.example.net"], "key_store": "local"}
    return {
        "cluster": {"name": "lab", "id": "lb-lab-0001"},
        "server_groups": {
            "web": {"members": [{"host": "be1", "port": 8080}, {"host": "be2", "port": 8080}]},
            "api": {"members": [{"host": "be3", "port": 8080}]},
            "static": {"members": [{"host": "be4", "port": 8080}]},
        },
        "listeners": [
            http(
                "web",
                80,
                rules=[
                    {"domain": "www.example.com", "path": "/api", "server_group": "api"},
                    {"domain": "*.example.com", "server_group": "static"},
                    {"path": "/static", "server_group": "static"},
                ],
                request_timeout=2,
                forwarded_headers={"client_port": True, "remove": ["X-Debug"]},
            ),
            http("sticky", 8080, cookie={"type": "insert", "timeout": 3600}),
            http("rewrite", 8081, cookie={"type": "rewrite", "name": "APPSESSION"}),
            https("secure", 443, "tls_cipher_policy_1_2_strict", [www, api]),
            https("legacy", 8443, "tls_cipher_policy_1_0", [www], http2=False),
            {"name": "redirect", "protocol": "http", "vip": VIP, "port": 8000, "redirect_to_https": 443},
            http("denied", 8090, acl={"type": "blacklist", "entries": ["198.51.100.10/32"]}),
        ],
    }


def normalised(raw_model=None):
    return model.normalize(copy.deepcopy(raw_model or raw()), copy.deepcopy(NODES))
