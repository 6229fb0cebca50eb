"""openclb_l7_plan: what the nginx templates and openclb-healthd get."""

import copy

import model_fixture
import pytest


def plan(plan_mod, raw=None, node="l7a", **settings):
    return plan_mod.openclb_l7_plan(model_fixture.normalised(raw), node, settings)


def listener(p, name):
    return next(li for li in p["listeners"] if li["name"] == name)


def server(li, name):
    return next(s for s in li["servers"] if name in s["server_names"])


def raw_with(name, **fields):
    raw = model_fixture.raw()
    next(li for li in raw["listeners"] if li["name"] == name).update(fields)
    return raw


def test_listens_on_the_vip_and_once_per_port_on_the_node_address(plan_mod):
    raw = model_fixture.raw()
    raw["listeners"].append(dict(copy.deepcopy(raw["listeners"][1]), name="other", vip="203.0.113.30"))
    p = plan(plan_mod, raw)
    assert listener(p, "web")["listen"] == ["203.0.113.10:80", "10.99.0.1:80"]
    # two listeners on port 8080: one of them owns 10.99.0.1:8080
    owners = [li["name"] for li in p["listeners"] if "10.99.0.1:8080" in li["listen"]]
    assert owners == ["other"]
    assert listener(p, "sticky")["listen"] == ["203.0.113.10:8080"]
    # without a node name (ad-hoc use) only the VIPs
    assert listener(plan(plan_mod, node=None), "web")["listen"] == ["203.0.113.10:80"]


def test_vips_are_the_nodes_dr_vips(plan_mod):
    assert plan(plan_mod)["vips"] == ["203.0.113.10"]
    assert plan(plan_mod, node="elsewhere")["vips"] == []


def test_servers_follow_the_model_vhosts(plan_mod):
    web = listener(plan(plan_mod), "web")
    assert [s["server_names"] for s in web["servers"]] == [["www.example.com"], ["*.example.com"], ["_"]]
    assert [s["default"] for s in web["servers"]] == [False, False, True]
    www = server(web, "www.example.com")
    assert [(loc["path"], loc["upstream"], loc["server_group"]) for loc in www["locations"]] == [
        ("/api", "web__api", "api"),
        ("/", "web__web", "web"),
    ]
    assert www["locations"][0]["route_var"] is None  # no cookie on this listener


def test_certificates_keys_and_policy(plan_mod):
    p = plan(plan_mod, tls_dir="/etc/openclb/tls")
    secure = listener(p, "secure")
    assert secure["tls"]["protocols"] == ["TLSv1.2"]
    assert all(c.startswith("ECDHE-") for c in secure["tls"]["ciphers"].split(":"))
    assert server(secure, "api.example.net")["certificates"][0]["certificate"] == "/etc/openclb/tls/api.crt"
    default = server(secure, "_")["certificates"][0]
    assert default["key"] == "/etc/openclb/tls/private/www.key" and default["key_store"] == "local"
    assert listener(p, "legacy")["tls"]["protocols"] == ["TLSv1", "TLSv1.1", "TLSv1.2"]
    assert not p["keyserver"]
    assert [c["name"] for c in p["certificates"]] == ["api", "www"]
    assert listener(p, "secure")["http2"] and not listener(p, "legacy")["http2"]


def test_keyserver_key_is_a_pkcs11_uri(plan_mod):
    raw = model_fixture.raw()
    for li in raw["listeners"]:
        for c in li.get("certificates", []):
            if c["name"] == "www":
                c["key_store"] = "keyserver"
    p = plan(plan_mod, raw)
    key = server(listener(p, "secure"), "_")["certificates"][0]["key"]
    assert key == '"engine:pkcs11:pkcs11:token=openclb-lab;object=www;type=private"'
    assert p["keyserver"]


def test_cookie_insert(plan_mod):
    sticky = listener(plan(plan_mod), "sticky")
    assert sticky["cookie"] == {"type": "insert", "name": "OPENCLB_SRV", "route_cookie": "OPENCLB_SRV", "timeout": 3600}
    sc = sticky["setcookies"][0]
    first = sc["members"][0]
    assert first["value"] == "OPENCLB_SRV=" + first["id"] + "; Max-Age=3600; Path=/; HttpOnly"
    assert first["addr_regex"] == r"10\.99\.0\.21:8080"
    loc = sticky["servers"][0]["locations"][0]
    assert loc["route_var"] == sc["route_var"] and loc["setcookie_var"] == sc["var"]


def test_cookie_rewrite_uses_a_companion_cookie(plan_mod):
    rewrite = listener(plan(plan_mod), "rewrite")
    assert rewrite["cookie"]["route_cookie"] == "APPSESSION_openclb"
    assert "Max-Age" not in rewrite["setcookies"][0]["members"][0]["value"]


def test_secure_flag_on_https_cookies(plan_mod):
    p = plan(plan_mod, raw_with("secure", cookie={"type": "insert", "timeout": 60}))
    assert listener(p, "secure")["setcookies"][0]["members"][0]["value"].endswith("; Secure")


def test_upstreams_for_healthd(plan_mod):
    p = plan(plan_mod, max_fails=2, fail_timeout=5)
    ups = {u["name"]: u for u in p["upstreams"]}
    assert set(ups) == {
        "web__api",
        "web__static",
        "web__web",
        "sticky__web",
        "rewrite__web",
        "secure__web",
        "legacy__web",
        "denied__web",
    }  # the redirect listener proxies nothing
    web = ups["web__web"]
    assert web["check"] == {
        "type": "http",
        "port": None,
        "interval": 1,
        "timeout": 1,
        "healthy_threshold": 2,
        "unhealthy_threshold": 2,
        "http": {"method": "GET", "uri": "/health", "host": None, "status": [2, 3]},
    }
    assert (web["max_fails"], web["fail_timeout"], web["sticky"]) == (2, 5, False)
    assert ups["sticky__web"]["sticky"]
    assert web["members"][0]["addr"] == "10.99.0.21:8080" and len(web["members"][0]["id"]) == 12


def test_member_ids(plan_mod):
    assert plan_mod.member_id("10.99.0.21", 8080) != plan_mod.member_id("10.99.0.21", 8081)
    assert plan_mod.hostport("2001:db8::1", 80) == "[2001:db8::1]:80"
    assert plan_mod.ident("web__a-b") != plan_mod.ident("web__a_b")


def test_headers(plan_mod):
    headers = dict(listener(plan(plan_mod), "web")["headers"])
    assert headers["X-Forwarded-For"] == "$proxy_add_x_forwarded_for"
    assert headers["X-Openclb-Lb-Id"] == '"lb-lab-0001"'
    assert headers["X-Openclb-Listener"] == '"web"' and headers["X-Forwarded-Port"] == '"80"'
    assert headers["X-Client-Port"] == "$remote_port"
    assert headers["X-Debug"] == '""'
    raw = raw_with("web", forwarded_headers={"xff": False, "proto": False, "lb_id": False})
    headers = dict(listener(plan(plan_mod, raw), "web")["headers"])
    assert "X-Forwarded-Proto" not in headers and "X-Openclb-Lb-Id" not in headers
    assert "X-Client-Port" not in headers
    assert headers["X-Forwarded-For"] == "$remote_addr"


def test_redirect(plan_mod):
    assert listener(plan(plan_mod), "redirect")["redirect"] == {"url": "https://$host$request_uri", "code": 301}
    assert listener(plan(plan_mod), "redirect")["servers"][0]["locations"] == []


def test_tcp_check_and_no_check(plan_mod):
    p = plan(plan_mod, raw_with("web", health_check={"type": "tcp", "port": 9000}))
    up = next(u for u in p["upstreams"] if u["name"] == "web__web")
    assert up["check"]["type"] == "tcp" and up["check"]["port"] == 9000
    p = plan(plan_mod, raw_with("web", health_check={"type": "none"}))
    assert next(u for u in p["upstreams"] if u["name"] == "web__web")["check"]["type"] == "none"


def test_bad_input_names_the_field(plan_mod):
    model = model_fixture.normalised()
    model["l7_listeners"][0]["health_check"]["type"] = "udp"
    with pytest.raises(plan_mod.PlanError, match=r"listeners\[denied\]\.health_check\.type"):
        plan_mod.openclb_l7_plan(model, "l7a", {})
