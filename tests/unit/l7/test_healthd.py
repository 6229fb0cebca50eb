"""openclb-healthd: thresholds, probes, upstream rendering, applying, metrics."""

import asyncio
import json
import os

import model_fixture
import pytest


@pytest.fixture
def cfg(plan_mod, tmp_path):
    p = plan_mod.openclb_l7_plan(model_fixture.normalised(), "l7a", {})
    return {
        "upstreams": p["upstreams"],
        "upstreams_file": str(tmp_path / "upstreams.conf"),
        "state_file": str(tmp_path / "state.json"),
        "listen": "127.0.0.1:0",
        "debounce": 0,
        "fail_open": True,
        "nginx_test": ["true"],
        "nginx_reload": ["true"],
    }


def check(**over):
    c = {
        "type": "http",
        "port": None,
        "interval": 1,
        "timeout": 1,
        "healthy_threshold": 2,
        "unhealthy_threshold": 3,
        "http": {"method": "GET", "uri": "/h", "host": None, "status": [2, 3]},
    }
    c.update(over)
    return c


def test_thresholds(healthd):
    h = healthd.Health(check())
    assert not h.record(False) and not h.record(False)
    assert h.record(False) and h.state == "down"  # 3rd failure
    assert not h.record(True) and h.state == "down"
    assert not h.record(False)  # resets the run
    assert not h.record(True) and h.record(True) and h.state == "up"
    assert h.checks == {"ok": 3, "fail": 4}


def test_probe_keys_dedupe_identical_checks(healthd, cfg):
    probes = healthd.probes_from_config(cfg)
    # be1 serves six proxying listeners with the same check: one probe
    be1 = [p for p in probes.values() if p["address"] == "10.99.0.21"]
    assert len(be1) == 1 and len(be1[0]["users"]) == 6
    m = {"address": "10.0.0.1", "port": 80}
    assert healthd.probe_key(m, check()) != healthd.probe_key(m, check(port=81))


def test_render_marks_down_and_fails_open(healthd, cfg):
    web = next(u for u in cfg["upstreams"] if u["listener"] == "web" and u["group"] == "web")
    k1, k2 = (healthd.probe_key(m, web["check"]) for m in web["members"])
    text = healthd.render_upstreams(cfg, {k1: "down"})
    block = text.split("upstream {} {{".format(web["name"]))[1].split("}")[0]
    assert "server 10.99.0.21:8080 weight=100 max_fails=1 fail_timeout=10s down;" in block
    assert "server 10.99.0.22:8080 weight=100 max_fails=1 fail_timeout=10s;" in block
    text = healthd.render_upstreams(cfg, {k1: "down", k2: "down"})
    block = text.split("upstream {} {{".format(web["name"]))[1].split("}")[0]
    assert " down;" not in block  # all failed: fail open


def test_render_sticky_per_backend_upstreams(healthd, cfg):
    sticky = next(u for u in cfg["upstreams"] if u["listener"] == "sticky")
    be1, be2 = sticky["members"]
    text = healthd.render_upstreams(cfg, {healthd.probe_key(be1, sticky["check"]): "down"})
    block = text.split("upstream {}__{} {{".format(sticky["name"], be1["id"]))[1].split("}")[0]
    lines = [ln.strip() for ln in block.strip().splitlines()]
    assert lines[0].startswith("server 10.99.0.21:8080") and lines[0].endswith("down;  # be1")
    assert lines[1].startswith("server 10.99.0.22:8080") and "backup;" in lines[1]


def test_weight_zero_is_down(healthd, cfg):
    up = next(u for u in cfg["upstreams"] if u["name"] == "web__web")
    up["members"][0].update(weight=1, down=True)  # the model's form of weight 0
    text = healthd.render_upstreams(cfg, {})
    assert "server 10.99.0.21:8080 weight=1 max_fails=1 fail_timeout=10s down;  # be1" in text


class FakeServer:
    """A loopback server answering each connection with a fixed status line."""

    def __init__(self, status_line=None, delay=0):
        self.status_line, self.delay, self.requests = status_line, delay, []

    async def handle(self, reader, writer):
        self.requests.append(await reader.readuntil(b"\r\n\r\n"))
        await asyncio.sleep(self.delay)
        if self.status_line:
            writer.write(self.status_line)
            await writer.drain()
        writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()


def run(coro):
    async def main():
        result = await coro
        await asyncio.sleep(0.05)  # subprocess transports close inside the loop, not at a later GC
        return result

    return asyncio.run(main())


@pytest.mark.parametrize(
    "line,ok",
    [
        (b"HTTP/1.1 200 OK\r\n\r\n", True),
        (b"HTTP/1.1 302 Found\r\n\r\n", True),
        (b"HTTP/1.1 404 Not Found\r\n\r\n", False),
        (b"HTTP/1.0 503 x\r\n\r\n", False),
        (b"garbage\r\n", False),
        (None, False),
    ],
)
def test_http_probe_status_classes(healthd, line, ok):
    async def go():
        async with FakeServer(line) as srv:
            probe = {"address": "127.0.0.1", "port": srv.port, "check": check(timeout=2)}
            result = await healthd.run_probe(probe)
            return result, srv.requests

    (passed, error, _took), requests = run(go())
    assert passed is ok, error
    assert requests[0].startswith(b"GET /h HTTP/1.1\r\nHost: 127.0.0.1\r\n")


def test_http_probe_host_header_and_timeout(healthd):
    async def go():
        async with FakeServer(b"HTTP/1.1 200 OK\r\n\r\n", delay=1.5) as srv:
            c = check(timeout=1)
            c["http"]["host"] = "health.example.com"
            c["http"]["method"] = "HEAD"
            return await healthd.run_probe({"address": "127.0.0.1", "port": srv.port, "check": c}), srv

    (passed, error, _took), srv = run(go())
    assert not passed and "timeout" in error
    assert srv.requests[0].startswith(b"HEAD /h HTTP/1.1\r\nHost: health.example.com\r\n")


def test_tcp_probe(healthd):
    async def go():
        async with FakeServer() as srv:
            up = await healthd.run_probe({"address": "127.0.0.1", "port": srv.port, "check": check(type="tcp")})
            port = srv.port
        down = await healthd.run_probe({"address": "127.0.0.1", "port": port, "check": check(type="tcp")})
        return up, down

    up, down = run(go())
    assert up[0] and not down[0]


def daemon(healthd, cfg_path):
    """A Daemon with its configuration and health table, no probe task running."""
    d = healthd.Daemon(str(cfg_path))
    d.cfg = healthd.load_config(str(cfg_path))
    d.probes = healthd.probes_from_config(d.cfg)
    d.health = {k: healthd.Health(p["check"]) for k, p in d.probes.items()}
    return d


def test_apply_writes_validates_reloads(healthd, cfg, tmp_path):
    marker = tmp_path / "reloaded"
    cfg["nginx_reload"] = ["touch", str(marker)]
    cfg_path = tmp_path / "healthd.json"
    cfg_path.write_text(json.dumps(cfg))

    async def go():
        d = daemon(healthd, cfg_path)
        await d.apply()
        first = (marker.exists(), d.reloads["ok"])
        marker.unlink()
        await d.apply()  # nothing changed: no reload
        second = marker.exists()
        key = next(iter(d.health))
        d.health[key].state = "down"
        await d.apply()
        return d, first, second, key

    d, first, second, key = run(go())
    assert first == (True, 1) and not second and marker.exists()
    assert " down;" in (tmp_path / "upstreams.conf").read_text()
    assert json.loads((tmp_path / "state.json").read_text())[key] == "down"


def test_apply_restores_file_when_nginx_rejects(healthd, cfg, tmp_path):
    cfg["nginx_test"] = ["false"]
    cfg_path = tmp_path / "healthd.json"
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "upstreams.conf").write_text("# old\n")

    async def go():
        d = daemon(healthd, cfg_path)
        await d.apply()
        return d

    d = run(go())
    assert (tmp_path / "upstreams.conf").read_text() == "# old\n"
    assert d.reloads == {"ok": 0, "failed": 1}
    assert d._retry_delay == 2.0 and d._apply_handle is not None  # retried later


def test_failed_apply_is_retried_until_nginx_accepts(healthd, cfg, tmp_path):
    # nginx -t fails twice (a key server that cannot answer), then passes
    count = tmp_path / "tests"
    cfg["nginx_test"] = ["sh", "-c", f'echo x >> {count}; [ "$(wc -l < {count})" -gt 2 ]']
    cfg["nginx_reload"] = ["sh", "-c", f"touch {tmp_path / 'reloaded'}"]
    cfg["retry_min"], cfg["retry_max"] = 0.05, 0.1
    cfg_path = tmp_path / "healthd.json"
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "upstreams.conf").write_text("# old\n")

    async def go():
        d = daemon(healthd, cfg_path)
        delays = []
        await d.apply()
        for _attempt in range(100):
            if d.reloads["ok"]:
                break
            if d._retry_delay not in delays[-1:]:
                delays.append(d._retry_delay)
            await asyncio.sleep(0.02)
        return d, delays

    d, delays = run(go())
    assert d.reloads == {"ok": 1, "failed": 2} and (tmp_path / "reloaded").exists()
    assert delays == [0.05, 0.1]  # doubled, capped at retry_max
    assert d._retry_delay is None
    assert "server 10.99.0.21:8080" in (tmp_path / "upstreams.conf").read_text()


def test_render_command_and_saved_state(healthd, cfg, tmp_path, capsys):
    cfg_path = tmp_path / "healthd.json"
    cfg_path.write_text(json.dumps(cfg))
    up = cfg["upstreams"][0]
    key = healthd.probe_key(up["members"][0], up["check"])
    (tmp_path / "state.json").write_text(json.dumps({key: "down"}))
    out = tmp_path / "out.conf"
    assert healthd.main(["render", "--config", str(cfg_path), "--output", str(out)]) == 0
    assert "changed" in capsys.readouterr().out
    assert "server 10.99.0.21:8080 weight=100 max_fails=1 fail_timeout=10s down;" in out.read_text()
    healthd.main(["render", "--config", str(cfg_path), "--output", str(out)])
    assert capsys.readouterr().out == ""  # unchanged


def test_metrics_format(healthd):
    status = {
        "backends": [
            {
                "listener": "web",
                "server_group": "web",
                "backend": 'b"1',
                "address": "1.2.3.4:80",
                "state": "up",
                "checks_ok": 5,
                "checks_failed": 1,
            }
        ],
        "reloads": {"ok": 2, "failed": 0},
    }
    text = healthd.format_metrics(status)
    assert 'openclb_backend_up{listener="web",server_group="web",backend="b\\"1",address="1.2.3.4:80"} 1' in text
    assert 'result="fail"} 1' in text
    assert 'openclb_healthd_nginx_reloads_total{result="ok"} 2' in text


def test_status_endpoint(healthd, cfg, tmp_path):
    cfg["upstreams"] = cfg["upstreams"][:1]
    for m in cfg["upstreams"][0]["members"]:
        m["address"], m["port"] = "127.0.0.1", 9  # discard port: refused, nothing listens
    cfg_path = tmp_path / "healthd.json"
    cfg_path.write_text(json.dumps(cfg))

    async def go():
        d = healthd.Daemon(str(cfg_path))
        d.configure()
        server = await asyncio.start_server(d.serve_http, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /status HTTP/1.0\r\n\r\n")
        data = await reader.read()
        server.close()
        for t in d.tasks.values():
            t.cancel()
        return data

    data = run(go())
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert {b["backend"] for b in body["backends"]} == {"be1", "be2"}
    assert os.path.exists(cfg["upstreams_file"])


def test_vips_helper(vips_mod, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(vips_mod, "on_lo", lambda: {"127.0.0.1", "203.0.113.5", "203.0.113.9"})
    monkeypatch.setattr(vips_mod.subprocess, "run", lambda argv, **kw: calls.append(argv))
    wanted = tmp_path / "vips.json"
    wanted.write_text(json.dumps(["203.0.113.10", "2001:db8::10", "203.0.113.5"]))
    state = tmp_path / "applied"
    state.write_text(json.dumps(["203.0.113.9", "203.0.113.5"]))
    vips_mod.main(["--vips", str(wanted), "--state", str(state), "--check"])
    out = json.loads(capsys.readouterr().out)
    assert out == {"changed": True, "added": ["203.0.113.10", "2001:db8::10"], "removed": ["203.0.113.9"]}
    assert calls == []
    vips_mod.main(["--vips", str(wanted), "--state", str(state)])
    assert ["ip", "addr", "add", "2001:db8::10/128", "dev", "lo"] in calls
    assert ["ip", "addr", "del", "203.0.113.9/32", "dev", "lo"] in calls
    assert "127.0.0.1" not in str(calls)  # never touches what it did not add
