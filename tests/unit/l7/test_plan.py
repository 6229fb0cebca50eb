"""openclb_l7_plan: the routing decisions the nginx templates render."""

import copy

import model_fixture
import pytest


def plan(plan_mod, policies, model=None, **settings):
    return plan_mod.openclb_l7_plan(model or model_fixture.normalised(), policies, settings)


def listener(p, name):
    return next(li for li in p["listeners"] if li["name"] == name)


def server(li, name):
    return next(s for s in li["servers"] if name in s["server_names"])


def test_domain_matching_ranks(plan_mod):
    m = plan_mod.domain_matches
    assert m("www.example.com", "www.example.com") > m("*.example.com", "www.example.com")
    assert m("*.b.example.com", "a.b.example.com") > m("*.example.com", "a.b.example.com")
    assert m("*.example.com", "example.com") is None
    assert m("*.example.com", "www.example.org") is None


def test_one_upstream_per_listener_and_group(plan_mod, policies):
    p = plan(plan_mod, policies)
    web = [u for u in p["upstreams"] if u["listener"] == "web"]
    assert sorted(u["group"] for u in web) == ["api", "static", "web"]
    assert len({u["name"] for u in p["upstreams"]}) == len(p["upstreams"])


def test_rules_exact_domain_before_wildcard_and_longest_path(plan_mod, policies):
    li = listener(plan(plan_mod, policies), "web")
    default = server(li, "_")
    assert default["default"]
    assert [(loc["path"], loc["server_group"]) for loc in default["locations"]] == [
        ("/static", "static"), ("/", "web")]
    www = server(li, "www.example.com")
    assert [(loc["path"], loc["server_group"]) for loc in www["locations"]] == [
        ("/api", "api"), ("/", "web")]
    wild = server(li, "*.example.com")
    assert [(loc["path"], loc["server_group"]) for loc in wild["locations"]] == [("/", "static")]


def test_longest_prefix_order(plan_mod, policies):
    model = model_fixture.normalised()
    model["l7_listeners"][0]["rules"] = [
        {"domain": None, "path": "/a", "server_group": "api"},
        {"domain": None, "path": "/a/b/c", "server_group": "static"},
        {"domain": None, "path": "/a/b", "server_group": "web"},
    ]
    li = listener(plan(plan_mod, policies, model), "web")
    assert [loc["path"] for loc in server(li, "_")["locations"]] == ["/a/b/c", "/a/b", "/a", "/"]


def test_sni_certificate_choice(plan_mod, policies):
    model = model_fixture.normalised()
    secure = model["l7_listeners"][3]
    secure["certificates"].append({"name": "wild", "domains": ["*.example.net"], "key_store": "local"})
    secure["rules"] = [{"domain": "shop.example.net", "path": None, "server_group": "api"}]
    li = listener(plan(plan_mod, policies, model), "secure")
    assert server(li, "_")["certificate"] == "www"           # first is the default
    assert server(li, "api.example.net")["certificate"] == "api"  # exact beats wildcard
    assert server(li, "shop.example.net")["certificate"] == "wild"
    assert server(li, "shop.example.net")["locations"][0]["server_group"] == "api"
    # a certificate-only name routes like the default server
    assert server(li, "www.example.com")["locations"] == server(li, "_")["locations"]


def test_tls_policy_and_key_paths(plan_mod, policies):
    p = plan(plan_mod, policies, tls_dir="/etc/openclb/tls")
    tls = listener(p, "secure")["tls"]
    assert tls["protocols"] == ["TLSv1.2"]
    assert all(c.startswith("ECDHE-") for c in tls["ciphers"].split(":"))
    assert tls["certificates"][0]["key"] == "/etc/openclb/tls/private/www.key"
    assert tls["certificates"][0]["certificate"] == "/etc/openclb/tls/www.crt"
    assert listener(p, "legacy")["tls"]["protocols"] == ["TLSv1", "TLSv1.1", "TLSv1.2"]
    assert not p["keyserver"]
    assert [c["name"] for c in p["certificates"]] == ["api", "www"]


def test_keyserver_key_is_a_pkcs11_uri(plan_mod, policies):
    model = model_fixture.normalised()
    model["l7_listeners"][3]["certificates"][0]["key_store"] = "keyserver"
    p = plan(plan_mod, policies, model)
    key = listener(p, "secure")["tls"]["certificates"][0]["key"]
    assert key == '"engine:pkcs11:pkcs11:token=openclb-lab;object=www;type=private"'
    assert p["keyserver"]


def test_cookie_insert_and_rewrite(plan_mod, policies):
    p = plan(plan_mod, policies, cookie_insert_name="SRV")
    sticky = listener(p, "sticky")
    assert sticky["cookie"] == {"type": "insert", "name": "SRV", "route_cookie": "SRV", "timeout": 3600}
    sc = sticky["setcookies"][0]
    assert sc["members"][0]["value"] == "SRV=%s; Max-Age=3600; Path=/; HttpOnly" % sc["members"][0]["id"]
    assert sc["members"][0]["addr_regex"] == r"10\.99\.0\.21:8080"
    rewrite = listener(p, "rewrite")
    assert rewrite["cookie"]["route_cookie"] == "APPSESSION_openclb"
    assert "Max-Age" not in rewrite["setcookies"][0]["members"][0]["value"]
    assert all(u["sticky"] for u in p["upstreams"] if u["listener"] in ("sticky", "rewrite"))
    assert not any(u["sticky"] for u in p["upstreams"] if u["listener"] == "web")


def test_member_ids_are_stable_and_opaque(plan_mod):
    a = plan_mod.member_id("10.99.0.21", 8080)
    assert a == plan_mod.member_id("10.99.0.21", 8080) != plan_mod.member_id("10.99.0.21", 8081)
    assert "10" not in a[:0] and len(a) == 12
    assert plan_mod.hostport("2001:db8::1", 80) == "[2001:db8::1]:80"


def test_ipv6_vip_listen(plan_mod, policies):
    model = model_fixture.normalised()
    model["l7_listeners"][0]["vip"] = "2001:db8::10"
    p = plan(plan_mod, policies, model)
    assert listener(p, "web")["listen"] == "[2001:db8::10]:80"
    assert {"address": "2001:db8::10", "family": 6} in p["vips"]


def test_headers(plan_mod, policies):
    li = listener(plan(plan_mod, policies), "web")
    headers = dict(li["headers"])
    assert headers["X-Forwarded-For"] == "$proxy_add_x_forwarded_for"
    assert headers["X-Openclb-Lb-Id"] == "lb-lab-0001"
    assert headers["X-Openclb-Listener"] == "web"
    assert headers["X-Debug"] == '""'
    model = model_fixture.normalised()
    model["l7_listeners"][0]["forwarded_headers"].update(proto=False, lb_id=False, xff=False)
    headers = dict(listener(plan(plan_mod, policies, model), "web")["headers"])
    assert "X-Forwarded-Proto" not in headers and "X-Openclb-Lb-Id" not in headers
    assert headers["X-Forwarded-For"] == "$remote_addr"


def test_redirect(plan_mod, policies):
    p = plan(plan_mod, policies)
    assert listener(p, "redirect")["redirect"] == "https://$host$request_uri"
    model = model_fixture.normalised()
    model["l7_listeners"][5]["redirect_to_https"] = 8443
    assert listener(plan(plan_mod, policies, model), "redirect")["redirect"] == "https://$host:8443$request_uri"


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda m: m["l7_listeners"][2]["cookie"].update(name="bad-name"), "listeners[rewrite].cookie.name"),
        (lambda m: m["l7_listeners"][3].update(tls_policy="tls_nope"), "listeners[secure].tls_policy"),
        (lambda m: m["l7_listeners"][3].update(certificates=[]), "listeners[secure].certificates"),
        (lambda m: m["l7_listeners"][0].update(server_group="nope"), "listeners[web]"),
        (lambda m: m["l7_listeners"][0]["health_check"].update(type="udp"), "listeners[web].health_check.type"),
        (lambda m: m["l7_listeners"][0]["forwarded_headers"].update(remove=["a b"]),
         "listeners[web].forwarded_headers.remove"),
    ],
)
def test_bad_input_names_the_field(plan_mod, policies, mutate, field):
    model = copy.deepcopy(model_fixture.normalised())
    mutate(model)
    with pytest.raises(plan_mod.PlanError, match=field.replace("[", r"\[").replace("]", r"\]")):
        plan(plan_mod, policies, model)


def test_schedulers(plan_mod, policies):
    model = model_fixture.normalised()
    for sched, balance in (("wlc", "least_conn"), ("sch", "hash $remote_addr consistent"), ("wrr", None)):
        model["l7_listeners"][0]["scheduler"] = sched
        up = next(u for u in plan(plan_mod, policies, model)["upstreams"] if u["listener"] == "web")
        assert up["balance"] == balance
    model["l7_listeners"][0]["scheduler"] = "rr"
    up = next(u for u in plan(plan_mod, policies, model)["upstreams"] if u["listener"] == "web")
    assert {m["weight"] for m in up["members"]} == {1}
