# Copyright: openclb developers
# Apache-2.0
"""Turn the normalised load-balancer model into an nginx plan for one L7 node.

The plan is plain data: the role's templates loop over it and
openclb-healthd renders the `upstream` blocks from its `upstreams` part, so
routing decisions (which name gets which certificate and which rules) are made
here once, in Python, where they are unit-tested, not in Jinja.
"""

import hashlib
import re

DOCUMENTATION = r"""
name: openclb_l7_plan
short_description: nginx plan for the L7 tier from the normalised openclb model
description:
  - Returns listeners (server blocks, locations, headers, TLS), upstreams (for
    openclb-healthd) and VIPs for the L7 nodes.
"""

_COOKIE_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")


class PlanError(ValueError):
    """A model value nginx cannot express; the message names the field."""


def _ident(*parts):
    """nginx variable-safe identifier, unique per input (hash suffix)."""
    raw = "__".join(str(p) for p in parts)
    slug = re.sub(r"[^a-z0-9]+", "_", raw.lower()).strip("_")[:40]
    return "%s_%s" % (slug, hashlib.sha1(raw.encode()).hexdigest()[:6])


def hostport(address, port):
    """address:port the way nginx writes it (also in $upstream_addr)."""
    if ":" in address:
        return "[%s]:%d" % (address, port)
    return "%s:%d" % (address, port)


def member_id(address, port):
    """Opaque backend id carried in persistence cookies (no addresses leak)."""
    return hashlib.sha1(hostport(address, port).encode()).hexdigest()[:12]


def domain_matches(pattern, name):
    """Does a rule/certificate domain (exact or `*.suffix`) cover name?

    Returns a rank (higher is more specific) or None. Exact beats wildcard,
    a longer wildcard suffix beats a shorter one (nginx's own order).
    """
    if pattern == name:
        return 100000
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.com"
        if name.endswith(suffix) and len(name) > len(suffix):
            return len(suffix)
    return None


def _best(patterns, name):
    best, rank = None, None
    for pattern in patterns:
        r = domain_matches(pattern, name)
        if r is not None and (rank is None or r > rank):
            best, rank = pattern, r
    return best


def _status_classes(statuses):
    out = []
    for s in statuses or ["http_2xx", "http_3xx"]:
        m = re.match(r"^http_([1-5])xx$", s)
        if not m:
            raise PlanError("health_check.http.status: %r is not http_Nxx" % s)
        out.append(int(m.group(1)))
    return sorted(set(out))


def _check(listener):
    hc = dict(listener.get("health_check") or {})
    http = dict(hc.get("http") or {})
    kind = hc.get("type", "tcp")
    if kind not in ("tcp", "http", "none"):
        raise PlanError(
            "listeners[%s].health_check.type: %r is not supported on an L7 listener"
            % (listener["name"], kind)
        )
    return {
        "type": kind,
        "port": hc.get("port"),
        "interval": hc.get("interval", 2),
        "timeout": hc.get("timeout", 5),
        "healthy_threshold": hc.get("healthy_threshold", 3),
        "unhealthy_threshold": hc.get("unhealthy_threshold", 3),
        "http": {
            "method": http.get("method") or "HEAD",
            "uri": http.get("uri") or "/",
            "host": http.get("host"),
            "status": _status_classes(http.get("status")),
        },
    }


# L4 scheduler names -> the nginx balancing directive. Weighted round robin
# is nginx's default; least-connection variants map to least_conn (weighted);
# source hashing maps to consistent hashing of the client address.
_SCHEDULERS = {
    "rr": None,
    "wrr": None,
    "lc": "least_conn",
    "wlc": "least_conn",
    "sh": "hash $remote_addr consistent",
    "sch": "hash $remote_addr consistent",
    "mh": "hash $remote_addr consistent",
    "tch": "hash $remote_addr$remote_port consistent",
}


def _upstream(listener, group_name, model, settings):
    group = model["server_groups"].get(group_name)
    if group is None:
        raise PlanError(
            "listeners[%s]: server group %r is not defined" % (listener["name"], group_name)
        )
    scheduler = listener.get("scheduler", "wrr")
    sticky = bool(listener.get("cookie"))
    members = []
    for m in group["members"]:
        members.append(
            {
                "name": m.get("name") or hostport(m["address"], m["port"]),
                "address": m["address"],
                "port": m["port"],
                "weight": 1 if scheduler == "rr" else m.get("weight", 1),
                "id": member_id(m["address"], m["port"]),
                "addr": hostport(m["address"], m["port"]),
            }
        )
    return {
        "name": "openclb_" + _ident(listener["name"], group_name),
        "listener": listener["name"],
        "group": group_name,
        "balance": _SCHEDULERS.get(scheduler),
        # cookie persistence adds one upstream per backend (that backend, the
        # others as `backup`); those never carry a hash directive, which
        # nginx forbids together with `backup`.
        "sticky": sticky,
        "members": members,
        "check": _check(listener),
        "max_fails": settings.get("max_fails", 1),
        "fail_timeout": settings.get("fail_timeout", 10),
        "keepalive": settings.get("upstream_keepalive", 32),
    }


def _cookie(listener, settings):
    cookie = listener.get("cookie")
    if not cookie:
        return None
    kind = cookie.get("type", "insert")
    if kind == "insert":
        name = cookie.get("name") or settings.get("cookie_insert_name", "SERVERID")
        field = "cookie_insert_name"
    elif kind == "rewrite":
        name = cookie.get("name")
        field = "listeners[%s].cookie.name" % listener["name"]
    else:
        raise PlanError("listeners[%s].cookie.type: %r" % (listener["name"], kind))
    if not name or not _COOKIE_NAME.match(name):
        # nginx can only read cookies through $cookie_<name> variables.
        raise PlanError("%s: %r must match [A-Za-z0-9_]{1,64}" % (field, name))
    route = name if kind == "insert" else name + "_openclb"
    return {
        "type": kind,
        "name": name,
        "route_cookie": route,
        "timeout": cookie.get("timeout") if kind == "insert" else None,
    }


def _set_cookie_value(cookie, backend_id, secure):
    parts = ["%s=%s" % (cookie["route_cookie"], backend_id), "Path=/", "HttpOnly"]
    if cookie["timeout"]:
        parts.insert(1, "Max-Age=%d" % cookie["timeout"])
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def _listen(listener):
    vip = listener["vip"]
    return ("[%s]" % vip if ":" in vip else vip) + ":%d" % listener["port"]


def _tls(listener, policies, settings, cluster_name, tls_dir):
    policy_name = listener.get("tls_policy") or "tls_cipher_policy_1_2"
    policy = policies.get(policy_name)
    if policy is None:
        raise PlanError(
            "listeners[%s].tls_policy: unknown policy %r" % (listener["name"], policy_name)
        )
    certs = []
    for cert in listener.get("certificates") or []:
        store = cert.get("key_store", "local")
        if store == "keyserver":
            key = '"engine:pkcs11:pkcs11:token=openclb-%s;object=%s;type=private"' % (
                cluster_name,
                cert["name"],
            )
        elif store == "local":
            key = "%s/private/%s.key" % (tls_dir, cert["name"])
        else:
            raise PlanError(
                "listeners[%s].certificates[%s].key_store: %r"
                % (listener["name"], cert["name"], store)
            )
        certs.append(
            {
                "name": cert["name"],
                "domains": list(cert.get("domains") or []),
                "key_store": store,
                "certificate": "%s/%s.crt" % (tls_dir, cert["name"]),
                "key": key,
            }
        )
    if not certs:
        raise PlanError("listeners[%s].certificates: https needs one" % listener["name"])
    return {"protocols": policy["protocols"], "ciphers": policy["ciphers"], "certificates": certs}


def _servers(listener, upstreams, cookie, tls):
    """One server block per name nginx must tell apart, plus the default.

    Names are the rule domains and the SNI certificate domains. Each name gets
    the best certificate for it (exact > longest wildcard > the listener's
    first) and the rules of the best rule domain for it; requests matching no
    rule domain use the domain-less rules, then the listener's default group.
    """
    rules = listener.get("rules") or []
    rule_domains = []
    for r in rules:
        if r.get("domain") and r["domain"] not in rule_domains:
            rule_domains.append(r["domain"])
    names = list(rule_domains)
    for c in (tls or {}).get("certificates", []):
        for d in c["domains"]:
            if d not in names:
                names.append(d)

    def locations(domain):
        if not upstreams:
            return []  # redirect only
        seen = {}
        for r in rules:
            if (r.get("domain") or None) == domain:
                path = r.get("path") or "/"
                seen.setdefault(path, r["server_group"])
        seen.setdefault("/", listener["server_group"])
        out = []
        for path in sorted(seen, key=lambda p: (-len(p), p)):
            up = upstreams[seen[path]]
            out.append(
                {
                    "path": path,
                    "server_group": seen[path],
                    "upstream": up["name"],
                    "route_var": "$openclb_route_" + up["name"][8:] if up["sticky"] else None,
                    "setcookie_var": "$openclb_setcookie_" + up["name"][8:] if cookie else None,
                }
            )
        return out

    def cert_for(name):
        if not tls:
            return None
        certs = tls["certificates"]
        best, rank = certs[0], None
        for c in certs:
            for d in c["domains"]:
                r = domain_matches(d, name)
                if r is not None and (rank is None or r > rank):
                    best, rank = c, r
        return best["name"]

    servers = [
        {
            "server_names": ["_"],
            "default": True,
            "certificate": tls["certificates"][0]["name"] if tls else None,
            "locations": locations(None),
        }
    ]
    for name in names:
        servers.append(
            {
                "server_names": [name],
                "default": False,
                "certificate": cert_for(name),
                "locations": locations(_best(rule_domains, name)),
            }
        )
    return servers


def _headers(listener, cluster_id):
    fh = {
        "xff": True,
        "proto": True,
        "real_ip": True,
        "lb_id": True,
        "listener": True,
        "remove": [],
    }
    fh.update(listener.get("forwarded_headers") or {})
    headers = [["Host", "$http_host"]]
    # X-Forwarded-For is always sent (as in the managed service); the flag
    # only decides whether an incoming XFF chain is kept or replaced.
    headers.append(
        ["X-Forwarded-For", "$proxy_add_x_forwarded_for" if fh["xff"] else "$remote_addr"]
    )
    if fh["proto"]:
        headers.append(["X-Forwarded-Proto", "$scheme"])
    if fh["real_ip"]:
        headers.append(["X-Real-IP", "$remote_addr"])
    if fh["lb_id"]:
        headers.append(["X-Openclb-Lb-Id", cluster_id])
    if fh["listener"]:
        headers.append(["X-Openclb-Listener", "%s" % listener["name"]])
        headers.append(["X-Openclb-Listener-Port", str(listener["port"])])
        headers.append(["X-Openclb-Client-Port", "$remote_port"])
    for name in fh.get("remove") or []:
        if not re.match(r"^[A-Za-z0-9-]+$", name):
            raise PlanError(
                "listeners[%s].forwarded_headers.remove: %r is not a header name"
                % (listener["name"], name)
            )
        headers.append([name, '""'])  # nginx drops a header set to ""
    return headers


def openclb_l7_plan(model, policies, settings=None):
    """Return the L7 plan (see module docstring)."""
    settings = dict(settings or {})
    cluster = model["cluster"]
    tls_dir = settings.get("tls_dir", "/etc/openclb/tls")
    listeners = model.get("l7_listeners")
    if listeners is None:
        listeners = [li for li in model.get("listeners", []) if li.get("tier") == "l7"]
    plan_listeners, upstreams, vips = [], [], []
    keyserver = False
    for li in listeners:
        name = li["name"]
        https = li["protocol"] == "https"
        groups = [li["server_group"]] + [
            r["server_group"] for r in (li.get("rules") or []) if r["server_group"] != li["server_group"]
        ]
        redirect = li.get("redirect_to_https") if not https else None
        ups = {}
        for g in [] if redirect else groups:  # a redirecting listener proxies nothing
            if g not in ups:
                ups[g] = _upstream(li, g, model, settings)
                upstreams.append(ups[g])
        cookie = _cookie(li, settings)
        tls = _tls(li, policies, settings, cluster["name"], tls_dir) if https else None
        if tls and any(c["key_store"] == "keyserver" for c in tls["certificates"]):
            keyserver = True
        setcookies = []
        if cookie:
            for up in ups.values():
                setcookies.append(
                    {
                        "var": "$openclb_setcookie_" + up["name"][8:],
                        "route_var": "$openclb_route_" + up["name"][8:] if up["sticky"] else None,
                        "upstream": up["name"],
                        "members": [
                            {
                                "id": m["id"],
                                "addr_regex": re.escape(m["addr"]),
                                "value": _set_cookie_value(cookie, m["id"], https),
                            }
                            for m in up["members"]
                        ],
                    }
                )
        plan_listeners.append(
            {
                "name": name,
                "protocol": li["protocol"],
                "listen": _listen(li),
                "https": https,
                "http2": bool(li.get("http2", True)) and https,
                "redirect": (
                    "https://$host%s$request_uri" % ("" if redirect == 443 else ":%d" % redirect)
                    if redirect
                    else None
                ),
                "servers": _servers(li, ups, cookie, tls),
                "tls": tls,
                "cookie": cookie,
                "setcookies": setcookies,
                "headers": _headers(li, cluster["id"]),
                "acl": li.get("acl"),
                "gzip": bool(li.get("gzip", True)),
                "request_timeout": li.get("request_timeout", 60),
                "keepalive_timeout": li.get("keepalive_timeout", 15),
            }
        )
        if li["vip"] not in [v["address"] for v in vips]:
            vips.append({"address": li["vip"], "family": 6 if ":" in li["vip"] else 4})
    return {
        "listeners": plan_listeners,
        "upstreams": upstreams,
        "vips": vips,
        "keyserver": keyserver,
        "certificates": sorted(
            {
                c["name"]: c
                for li in plan_listeners
                if li["tls"]
                for c in li["tls"]["certificates"]
            }.values(),
            key=lambda c: c["name"],
        ),
    }


class FilterModule:
    def filters(self):
        return {"openclb_l7_plan": openclb_l7_plan}
