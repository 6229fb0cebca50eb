# Copyright: openclb developers
# Apache-2.0
"""Project the normalised load-balancer model onto nginx for one L7 node.

Routing is decided by the model (plugins/module_utils/model.py: `vhosts`,
`locations`, `upstreams`, `tls`); this filter only adds what is specific to
nginx on this node: the listen addresses, the certificate and key paths,
cookie-persistence maps, the proxy headers, and the upstream/check
description openclb-healthd renders the `upstream` blocks from. The
templates then loop over plain data.
"""

import hashlib
import re

DOCUMENTATION = r"""
name: openclb_l7_plan
short_description: nginx plan for one L7 node from the normalised openclb model
description:
  - Input is the normalised model (openclb.lb.lb_model), the node's inventory
    name and a few role settings; output is listeners (server blocks), the
    upstreams with their checks (for openclb-healthd), the VIPs for lo and the
    certificates to install.
"""


class PlanError(ValueError):
    """A model value nginx cannot express; the message names the field."""


def ident(name):
    """nginx variable-safe identifier for an upstream name, unique per name."""
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:40]
    return f"{slug}_{hashlib.sha1(name.encode()).hexdigest()[:6]}"


def hostport(address, port):
    """address:port the way nginx writes it (also in $upstream_addr)."""
    return ("[%s]:%d" if ":" in address else "%s:%d") % (address, port)


def member_id(address, port):
    """Opaque backend id carried in persistence cookies (no address leaks)."""
    return hashlib.sha1(hostport(address, port).encode()).hexdigest()[:12]


def _check(listener):
    hc = listener["health_check"]
    kind = hc["type"]
    if kind not in ("tcp", "http", "none"):
        raise PlanError(
            "listeners[{}].health_check.type: {!r} is not possible on an L7 listener".format(listener["name"], kind)
        )
    http = hc.get("http") or {}
    return {
        "type": kind,
        "port": hc.get("port"),
        "interval": hc["interval"],
        "timeout": hc["timeout"],
        "healthy_threshold": hc["healthy_threshold"],
        "unhealthy_threshold": hc["unhealthy_threshold"],
        "http": {
            "method": http.get("method") or "HEAD",
            "uri": http.get("uri") or "/",
            "host": http.get("host"),
            # http_2xx -> 2: healthd compares status // 100
            "status": sorted(int(s[5]) for s in http.get("status") or ["http_2xx", "http_3xx"]),
        },
    }


def _upstream(listener, up, settings):
    members = [
        dict(m, id=member_id(m["address"], m["port"]), addr=hostport(m["address"], m["port"])) for m in up["members"]
    ]
    return {
        "name": up["name"],
        "listener": listener["name"],
        "group": up["server_group"],
        "balance": up.get("balance"),
        # cookie persistence adds one upstream per backend (that backend, the
        # others as backup); those never carry `hash`, which nginx forbids
        # together with `backup`
        "sticky": bool(listener.get("cookie")),
        "members": members,
        "check": _check(listener),
        "max_fails": settings.get("max_fails", 1),
        "fail_timeout": settings.get("fail_timeout", 10),
        "keepalive": settings.get("upstream_keepalive", 32),
    }


def _cookie(listener):
    cookie = listener.get("cookie")
    if not cookie:
        return None
    name = cookie["name"]
    if not re.match(r"^[A-Za-z0-9_]{1,64}$", name or ""):
        raise PlanError(
            "listeners[{}].cookie.name: {!r} must match [A-Za-z0-9_]{{1,64}}".format(listener["name"], name)
        )
    return {
        "type": cookie["type"],
        "name": name,
        # insert: the balancer's own cookie routes; rewrite: a companion
        # cookie next to the backend's (stock nginx cannot edit the value of
        # a Set-Cookie header it proxies)
        "route_cookie": name if cookie["type"] == "insert" else name + "_openclb",
        "timeout": cookie.get("timeout") if cookie["type"] == "insert" else None,
    }


def _set_cookie(cookie, backend_id, secure):
    parts = ["{}={}".format(cookie["route_cookie"], backend_id), "Path=/", "HttpOnly"]
    if cookie["timeout"]:
        parts.insert(1, f"Max-Age={cookie['timeout']}")
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def _headers(listener, cluster_id):
    fh = listener["forwarded_headers"]
    # X-Forwarded-For is always sent (as by the managed service); `xff`
    # decides whether an incoming chain is kept and appended to
    headers = [
        ["Host", "$http_host"],
        ["X-Forwarded-For", "$proxy_add_x_forwarded_for" if fh["xff"] else "$remote_addr"],
    ]
    if fh["proto"]:
        headers.append(["X-Forwarded-Proto", "$scheme"])
    if fh["real_ip"]:
        headers.append(["X-Real-IP", "$remote_addr"])
    if fh["lb_id"]:
        headers.append(["X-Openclb-Lb-Id", f'"{cluster_id}"'])
    if fh["listener"]:
        headers.append(["X-Openclb-Listener", '"{}"'.format(listener["name"])])
        headers.append(["X-Forwarded-Port", f'"{listener["port"]}"'])
    if fh.get("client_port"):
        headers.append(["X-Client-Port", "$remote_port"])
    for name in fh.get("remove") or []:
        if not re.match(r"^[A-Za-z0-9-]+$", name):
            raise PlanError(
                "listeners[{}].forwarded_headers.remove: {!r} is not a header name".format(listener["name"], name)
            )
        headers.append([name, '""'])  # nginx does not send a header set to ""
    return headers


def _listen_address(address, port):
    return hostport(address, port)


def openclb_l7_plan(model, node=None, settings=None):
    """The nginx plan for L7 node `node` (inventory name) of the model."""
    settings = dict(settings or {})
    tls_dir = settings.get("tls_dir", "/etc/openclb/tls")
    cluster = model["cluster"]
    me = next((n for n in model.get("nodes", {}).get("l7_nodes", []) if n["name"] == node), None)
    certs = {}
    for c in model.get("certificates", []):
        if c["key_store"] == "keyserver":
            key = '"engine:pkcs11:pkcs11:token=openclb-{};object={};type=private"'.format(cluster["name"], c["name"])
        else:
            key = "{}/private/{}.key".format(tls_dir, c["name"])
        certs[c["name"]] = {
            "name": c["name"],
            "key_store": c["key_store"],
            "certificate": "{}/{}.crt".format(tls_dir, c["name"]),
            "key": key,
        }

    listeners, upstreams, internal_ports = [], [], set()
    used_certs = set()
    for li in model["l7_listeners"]:
        https = li["protocol"] == "https"
        cookie = _cookie(li)
        ups = {u["name"]: _upstream(li, u, settings) for u in li["upstreams"]}
        upstreams.extend(ups.values())

        listen = [_listen_address(li["vip"], li["port"])]
        # The LVS tier checks an L7 node with a TCP connect to its internal
        # address on the listener port (and NAT listeners arrive there): one
        # listener per port owns that socket.
        internal = me and (me.get("internal_address6") if li["family"] == 6 else me.get("internal_address"))
        if internal and (li["family"], li["port"]) not in internal_ports:
            internal_ports.add((li["family"], li["port"]))
            listen.append(_listen_address(internal, li["port"]))

        setcookies = []
        if cookie:
            for up in ups.values():
                setcookies.append(
                    {
                        "var": "$openclb_setcookie_" + ident(up["name"]),
                        "route_var": "$openclb_route_" + ident(up["name"]),
                        "upstream": up["name"],
                        "members": [
                            {
                                "id": m["id"],
                                "addr_regex": re.escape(m["addr"]),
                                "value": _set_cookie(cookie, m["id"], https),
                            }
                            for m in up["members"]
                        ],
                    }
                )

        servers = []
        for vh in li["vhosts"]:
            for name in vh["certificates"]:
                used_certs.add(name)
            servers.append(
                {
                    "server_names": vh["server_names"] or ["_"],
                    "default": vh["default"],
                    "certificates": [certs[n] for n in vh["certificates"]],
                    "locations": [
                        {
                            "path": loc["path"],
                            "upstream": loc["upstream"],
                            "server_group": ups[loc["upstream"]]["group"],
                            "route_var": ("$openclb_route_" + ident(loc["upstream"])) if cookie else None,
                            "setcookie_var": ("$openclb_setcookie_" + ident(loc["upstream"])) if cookie else None,
                        }
                        for loc in vh["locations"]
                    ],
                }
            )
        redirect = li.get("redirect_to_https")
        listeners.append(
            {
                "name": li["name"],
                "protocol": li["protocol"],
                "port": li["port"],
                "listen": listen,
                "https": https,
                "http2": bool(li.get("http2")) and https,
                "redirect": {"url": redirect["url"], "code": redirect["code"]} if redirect else None,
                "servers": servers,
                "tls": {"protocols": li["tls"]["protocols"], "ciphers": li["tls"]["ciphers"]} if https else None,
                "cookie": cookie,
                "setcookies": setcookies,
                "headers": _headers(li, cluster["id"]),
                "acl": li.get("acl"),
                "gzip": bool(li.get("gzip")),
                "request_timeout": li["request_timeout"],
                "keepalive_timeout": li["keepalive_timeout"],
            }
        )

    if node is not None and "node_vips" in model:
        vips = list(model["node_vips"].get(node, {}).get("dr", []))
    else:
        vips = sorted({li["vip"] for li in model["l7_listeners"]})
    used = [certs[n] for n in sorted(used_certs)]
    return {
        "listeners": listeners,
        "upstreams": upstreams,
        "vips": vips,
        "keyserver": any(c["key_store"] == "keyserver" for c in used),
        "certificates": used,
    }


class FilterModule:
    def filters(self):
        return {"openclb_l7_plan": openclb_l7_plan}
