# Copyright: openclb developers
# Apache-2.0
"""openclb-healthd: active health checks for the nginx upstreams of an L7 node.

Stock nginx has passive checks only. This daemon probes every backend (HTTP
or TCP, with the listener's interval, timeout and thresholds), and when a
backend changes state it rewrites the file holding every `upstream` block
(servers that failed are marked `down`), validates with `nginx -t` and
reloads nginx gracefully: old workers finish their in-flight requests, new
ones no longer pick the failed server. Changes are debounced so a flapping
set of backends costs one reload, not one per backend.

State is served as JSON (`/status`) and Prometheus text (`/metrics`) on a
local address. Python 3 standard library only.

    openclb-healthd run    --config healthd.json
    openclb-healthd render --config healthd.json [--state state.json] --output upstreams.conf
"""

import argparse
import asyncio
import hashlib
import json
import logging
import os
import signal
import sys
import tempfile
import time

LOG = logging.getLogger("openclb-healthd")
UP, DOWN = "up", "down"


# ---------------------------------------------------------------- config ---


def load_config(path):
    with open(path, encoding="utf-8") as fh:
        cfg = json.load(fh)
    for key in ("upstreams", "upstreams_file", "state_file"):
        if key not in cfg:
            raise ValueError(f"{path}: missing key {key!r}")
    cfg.setdefault("listen", "127.0.0.1:9146")
    cfg.setdefault("debounce", 1.0)
    cfg.setdefault("fail_open", True)
    cfg.setdefault("nginx_test", ["nginx", "-t", "-q"])
    cfg.setdefault("nginx_reload", ["nginx", "-s", "reload"])
    # A failed apply is retried after retry_min s, doubling up to retry_max:
    # nginx -t also fails while a key server is briefly unable to answer
    # (docs/keyservers.md, Known gaps), and a state change must not wait
    # for the next one to reach nginx.
    cfg.setdefault("retry_min", 2.0)
    cfg.setdefault("retry_max", 60.0)
    return cfg


def probe_key(member, check):
    """Backends probed identically share one probe (and one state)."""
    port = check.get("port") or member["port"]
    spec = {"address": member["address"], "port": port, "check": check}
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def probes_from_config(cfg):
    """probe key -> probe spec, and the (upstream, member) pairs using it."""
    probes = {}
    for up in cfg["upstreams"]:
        check = up["check"]
        for m in up["members"]:
            key = probe_key(m, check)
            p = probes.setdefault(
                key,
                {
                    "key": key,
                    "address": m["address"],
                    "port": check.get("port") or m["port"],
                    "check": check,
                    "users": [],
                },
            )
            p["users"].append(
                {
                    "upstream": up["name"],
                    "listener": up["listener"],
                    "group": up["group"],
                    "backend": m["name"],
                    "addr": m["addr"],
                }
            )
    return probes


# ----------------------------------------------------------- transitions ---


class Health:
    """Threshold logic for one probe: consecutive results flip the state."""

    def __init__(self, check, state=UP):
        self.rise = check.get("healthy_threshold", 3)
        self.fall = check.get("unhealthy_threshold", 3)
        self.state = state
        self.ok_run = 0
        self.fail_run = 0
        self.checks = {"ok": 0, "fail": 0}
        self.last_error = None
        self.last_change = None
        self.last_duration = 0.0

    def record(self, ok, error=None, now=None):
        """Count a result; return True when the state changed."""
        self.checks["ok" if ok else "fail"] += 1
        self.last_error = None if ok else error
        if ok:
            self.ok_run += 1
            self.fail_run = 0
            if self.state == DOWN and self.ok_run >= self.rise:
                return self._flip(UP, now)
        else:
            self.fail_run += 1
            self.ok_run = 0
            if self.state == UP and self.fail_run >= self.fall:
                return self._flip(DOWN, now)
        return False

    def _flip(self, state, now):
        self.state = state
        self.last_change = now if now is not None else time.time()
        return True


# ---------------------------------------------------------------- probes ---


async def probe_tcp(address, port, timeout):
    reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass


async def probe_http(address, port, http, timeout):
    """Send one request; raise unless the status class is accepted."""

    async def exchange():
        reader, writer = await asyncio.open_connection(address, port)
        try:
            host = http.get("host") or ((f"[{address}]") if ":" in address else address)
            req = (
                "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: openclb-healthd\r\n"
                "Accept: */*\r\nConnection: close\r\n\r\n".format(http["method"], http["uri"], host)
            )
            writer.write(req.encode("latin-1"))
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
        parts = line.decode("latin-1").split()
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise ValueError(f"bad status line {line[:80]!r}")
        status = int(parts[1])
        if status // 100 not in http["status"]:
            raise ValueError(f"status {status} not in {[f'http_{c}xx' for c in http['status']]}")
        return status

    return await asyncio.wait_for(exchange(), timeout)


async def run_probe(probe):
    """One check; returns (ok, error text, seconds)."""
    check = probe["check"]
    start = time.monotonic()
    try:
        if check["type"] == "http":
            await probe_http(probe["address"], probe["port"], check["http"], check["timeout"])
        else:
            await probe_tcp(probe["address"], probe["port"], check["timeout"])
        return True, None, time.monotonic() - start
    except TimeoutError:
        return False, "timeout after {}s".format(check["timeout"]), time.monotonic() - start
    except (OSError, ValueError) as exc:
        return False, str(exc) or exc.__class__.__name__, time.monotonic() - start


# ------------------------------------------------------------- rendering ---


def _server_line(m, up, down, backup=False):
    addr = f"[{m['address']}]:{m['port']}" if ":" in m["address"] else f"{m['address']}:{m['port']}"
    parts = ["server", addr, f"weight={max(1, m.get('weight', 1))}"]
    parts.append(f"max_fails={up.get('max_fails', 1)}")
    parts.append(f"fail_timeout={up.get('fail_timeout', 10)}s")
    if backup:
        parts.append("backup")
    # weight 0 (the model's `down`: drain) and failed backends take no new requests
    if down or m.get("down"):
        parts.append("down")
    return "    {};  # {}".format(" ".join(parts), m["name"])


def render_upstreams(cfg, states):
    """All upstream blocks, with failed backends marked down.

    states maps probe key -> UP/DOWN; unknown keys count as up. When every
    backend of an upstream is down, all are rendered up (fail open): the
    passive checks then still find any that answer, where a fully `down`
    upstream would answer 502 to everything.
    """
    out = ["# Written by openclb-healthd; do not edit (rewritten on every health change)."]
    for up in cfg["upstreams"]:
        check = up["check"]
        down = {}
        for m in up["members"]:
            key = probe_key(m, check)
            down[m["id"]] = check["type"] != "none" and states.get(key, UP) == DOWN
        usable = [m for m in up["members"] if not m.get("down")]
        if cfg.get("fail_open", True) and usable and all(down[m["id"]] for m in usable):
            down = dict.fromkeys(down, False)
        out.append("")
        out.append("upstream {} {{".format(up["name"]))
        if up.get("balance"):
            out.append("    {};".format(up["balance"]))
        for m in up["members"]:
            out.append(_server_line(m, up, down[m["id"]]))
        if up.get("keepalive"):
            out.append(f"    keepalive {up['keepalive']};")
        out.append("}")
        if up.get("sticky"):
            # Cookie persistence: one upstream per backend, that backend first
            # and the others as backup, so a cookie naming a failed backend
            # falls over to the rest of the group.
            for m in up["members"]:
                out.append("upstream {}__{} {{".format(up["name"], m["id"]))
                out.append(_server_line(m, up, down[m["id"]]))
                for other in up["members"]:
                    if other is not m:
                        out.append(_server_line(other, up, down[other["id"]], backup=True))
                if up.get("keepalive"):
                    out.append(f"    keepalive {up['keepalive']};")
                out.append("}")
    return "\n".join(out) + "\n"


def write_atomic(path, text, mode=0o644):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".openclb-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_text(path):
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def load_states(path):
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return {k: v for k, v in data.items() if v in (UP, DOWN)}
    except (FileNotFoundError, ValueError):
        return {}


# ---------------------------------------------------------------- daemon ---


class Daemon:
    def __init__(self, config_path):
        self.config_path = config_path
        self.cfg = None
        self.probes = {}
        self.health = {}
        self.tasks = {}
        self.reloads = {"ok": 0, "failed": 0}
        self.last_reload_error = None
        self._apply_handle = None
        self._apply_lock = asyncio.Lock()
        self._retry_delay = None  # s before the next retry of a failed apply
        self.started = time.time()

    # configuration -------------------------------------------------------
    def configure(self):
        cfg = load_config(self.config_path)
        saved = load_states(cfg["state_file"])
        probes = probes_from_config(cfg)
        health = {}
        for key, p in probes.items():
            old = self.health.get(key)
            health[key] = old if old else Health(p["check"], saved.get(key, UP))
        for key in list(self.tasks):
            if key not in probes:
                self.tasks.pop(key).cancel()
        self.cfg, self.probes, self.health = cfg, probes, health
        for key in probes:
            # running loops read self.probes[key] each round: no restart needed
            if key not in self.tasks:
                self.tasks[key] = asyncio.ensure_future(self.probe_loop(key))
        LOG.info("configured: %d upstreams, %d probes", len(cfg["upstreams"]), len(probes))
        self.schedule_apply(0)

    # probing -------------------------------------------------------------
    async def probe_loop(self, key):
        while key in self.probes:
            probe = self.probes[key]
            check = probe["check"]
            if check["type"] == "none":
                return
            ok, error, took = await run_probe(probe)
            if key not in self.probes:
                return
            health = self.health[key]
            health.last_duration = took
            if health.record(ok, error):
                LOG.warning(
                    "backend %s:%s is %s (%s) [%s]",
                    probe["address"],
                    probe["port"],
                    health.state.upper(),
                    error or "ok",
                    ", ".join(sorted({u["upstream"] for u in probe["users"]})),
                )
                self.schedule_apply(self.cfg["debounce"])
            await asyncio.sleep(max(0.0, check["interval"] - took))

    # applying --------------------------------------------------------------
    def schedule_apply(self, delay):
        if self._apply_handle is not None:
            return  # an apply is already pending; it will see this change too
        loop = asyncio.get_running_loop()
        self._apply_handle = loop.call_later(delay, lambda: asyncio.ensure_future(self.apply()))

    def states(self):
        return {k: h.state for k, h in self.health.items()}

    async def apply(self):
        self._apply_handle = None
        async with self._apply_lock:
            states = self.states()
            try:
                write_atomic(self.cfg["state_file"], json.dumps(states, sort_keys=True, indent=1) + "\n")
            except OSError as exc:
                LOG.error("cannot save state: %s", exc)
            path = self.cfg["upstreams_file"]
            text = render_upstreams(self.cfg, states)
            old = read_text(path)
            if text == old:
                return
            write_atomic(path, text)
            ok, msg = await self.run(self.cfg["nginx_test"])
            if ok:
                ok, msg = await self.run(self.cfg["nginx_reload"])
                what = "nginx reload failed"
            else:
                what = "nginx rejected the upstreams; kept the old ones"
            if ok:
                self.reloads["ok"] += 1
                self._retry_delay = None
                LOG.info("nginx reloaded with new upstream states")
                return
            # keep the file what nginx runs, so the retry sees the change again
            if old is not None:
                write_atomic(path, old)
            self.reloads["failed"] += 1
            self.last_reload_error = msg
            self._retry_delay = min(
                self.cfg["retry_max"], 2 * self._retry_delay if self._retry_delay else self.cfg["retry_min"]
            )
            LOG.error("%s (retry in %.0f s): %s", what, self._retry_delay, msg)
            self.schedule_apply(self._retry_delay)

    async def run(self, argv):
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _err = await proc.communicate()
        return proc.returncode == 0, out.decode(errors="replace").strip()

    # reporting -----------------------------------------------------------
    def status(self):
        backends = []
        for key, p in sorted(self.probes.items(), key=lambda kv: (kv[1]["address"], kv[1]["port"])):
            h = self.health[key]
            for u in p["users"]:
                backends.append(
                    {
                        "listener": u["listener"],
                        "server_group": u["group"],
                        "upstream": u["upstream"],
                        "backend": u["backend"],
                        "address": u["addr"],
                        "check": p["check"]["type"],
                        "check_port": p["port"],
                        "state": h.state,
                        "consecutive_ok": h.ok_run,
                        "consecutive_fail": h.fail_run,
                        "checks_ok": h.checks["ok"],
                        "checks_failed": h.checks["fail"],
                        "last_error": h.last_error,
                        "last_change": h.last_change,
                    }
                )
        return {
            "backends": backends,
            "reloads": dict(self.reloads),
            "last_reload_error": self.last_reload_error,
            "uptime": round(time.time() - self.started, 3),
        }

    def metrics(self):
        return format_metrics(self.status())

    async def serve_http(self, reader, writer):
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while True:  # drain headers
                h = await asyncio.wait_for(reader.readline(), 5)
                if h in (b"\r\n", b"\n", b""):
                    break
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) > 1 else "/"
            if path in ("/status", "/status.json", "/"):
                body, ctype, code = json.dumps(self.status(), indent=1) + "\n", "application/json", "200 OK"
            elif path == "/metrics":
                body, ctype, code = self.metrics(), "text/plain; version=0.0.4", "200 OK"
            else:
                body, ctype, code = "not found\n", "text/plain", "404 Not Found"
            data = body.encode()
            writer.write(
                (
                    f"HTTP/1.0 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
                    "Connection: close\r\n\r\n"
                ).encode()
                + data
            )
            await writer.drain()
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()

    async def main(self, stop):
        self.configure()
        host, _sep, port = self.cfg["listen"].rpartition(":")
        server = await asyncio.start_server(self.serve_http, host.strip("[]"), int(port))
        LOG.info("serving state on http://%s/status and /metrics", self.cfg["listen"])
        async with server:
            await stop.wait()
        for t in self.tasks.values():
            t.cancel()


def _label(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_metrics(status):
    lines = [
        "# HELP openclb_backend_up 1 if the backend passes its active health check.",
        "# TYPE openclb_backend_up gauge",
    ]
    checks = [
        "# HELP openclb_backend_checks_total Active health checks by result.",
        "# TYPE openclb_backend_checks_total counter",
    ]
    for b in status["backends"]:
        labels = 'listener="{}",server_group="{}",backend="{}",address="{}"'.format(
            _label(b["listener"]), _label(b["server_group"]), _label(b["backend"]), _label(b["address"])
        )
        lines.append(f"openclb_backend_up{{{labels}}} {1 if b['state'] == UP else 0}")
        checks.append(f'openclb_backend_checks_total{{{labels},result="ok"}} {b["checks_ok"]}')
        checks.append(f'openclb_backend_checks_total{{{labels},result="fail"}} {b["checks_failed"]}')
    lines += checks
    lines += [
        "# HELP openclb_healthd_nginx_reloads_total nginx reloads caused by health changes.",
        "# TYPE openclb_healthd_nginx_reloads_total counter",
        f'openclb_healthd_nginx_reloads_total{{result="ok"}} {status["reloads"]["ok"]}',
        f'openclb_healthd_nginx_reloads_total{{result="failed"}} {status["reloads"]["failed"]}',
    ]
    return "\n".join(lines) + "\n"


def cmd_run(args):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)

    async def runner():
        daemon = Daemon(args.config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, daemon.configure)
        await daemon.main(stop)

    asyncio.run(runner())
    return 0


def cmd_render(args):
    cfg = load_config(args.config)
    states = load_states(args.state or cfg["state_file"])
    text = render_upstreams(cfg, states)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        if read_text(args.output) == text:
            return 0
        write_atomic(args.output, text)
        print("changed")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="openclb-healthd", description=__doc__.split("\n\n", maxsplit=1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="probe backends and keep nginx upstreams current")
    run.add_argument("--config", required=True)
    run.set_defaults(func=cmd_run)
    render = sub.add_parser("render", help="write the upstreams file once and exit")
    render.add_argument("--config", required=True)
    render.add_argument("--state", help="state file (default: the config's state_file)")
    render.add_argument("--output", required=True, help="file to write, - for stdout")
    render.set_defaults(func=cmd_render)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
