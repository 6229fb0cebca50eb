"""L7 chain throughput in the lab, side by side in one run (wrk from client1).

Every row ends on the same backend, be3:8080 (the lab's test service), so the
ratios show what each tier costs:

  direct       client1 -> be3:8080, routed by lvs1 (no IPVS, no nginx)
  lvs          client1 -> 203.0.113.10:8083 (tcp-single: IPVS NAT) -> be3
  lvs+nginx    client1 -> 203.0.113.20:80/api (IPVS DR) -> nginx on l7-1/l7-2
               -> be3 (http-web's /api rule: server group api = be3)

and, for scale, the same paths over the three backends:

  lvs x3       203.0.113.30:8080 (dr-web: IPVS DR, be1..be3)
  lvs+nginx x3 203.0.113.20:80/ (http-web's default group web, be1..be3)

"direct": client namespaces sit on the front network only, so the script adds
a host route 10.99.0.43/32 via lvs1's front address (203.0.113.11) inside
client1's namespace for the run and removes it afterwards. lvs1 forwards (the
LVS nodes route: NAT listeners need it) and be3 answers through its default
gateway, the VRRP address on the LVS nodes, so this path crosses the same
routers as the LVS rows, without IPVS. It is the honest "one backend
directly" a front client can have in this topology.

Each row runs `wrk -t2 -c16 --latency` for --seconds, with keep-alive, then
with `Connection: close` (a new TCP connection, and a new IPVS connection,
per request). All numbers come from one 2-core machine running the UML guests
and wrk together: compare the ratios of one run, not absolute values.

    OPENCLB_LAB_NAME=... python3 benchmarks/l7_chain.py [--seconds 10]
    (lab: lvs1 l7-1 l7-2 be1 be2 be3 client1 up, site.yml converged)
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROWS = [
    ("direct", "http://10.99.0.43:8080/"),
    ("lvs", "http://203.0.113.10:8083/"),
    ("lvs+nginx", "http://203.0.113.20/api"),
    ("lvs x3", "http://203.0.113.30:8080/"),
    ("lvs+nginx x3", "http://203.0.113.20/"),
]
CLIENT = "client1"
ROUTE = ["10.99.0.43/32", "via", "203.0.113.11"]


def lab_cli():
    for candidate in (shutil.which("openclb-lab"), str(Path(sys.executable).with_name("openclb-lab"))):
        if candidate and Path(candidate).exists():
            return candidate
    raise SystemExit("openclb-lab not found (make venv)")


def on_client(*argv, timeout=120, check=True):
    p = subprocess.run([lab_cli(), "exec", CLIENT, "--", *argv], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: {p.stdout}{p.stderr}")
    return p.stdout


def to_ms(value):
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", value)
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)] if m else float("nan")


def wrk(url, seconds, close):
    argv = ["wrk", "-t2", "-c16", f"-d{seconds}s", "--timeout", "5s", "--latency", url]
    if close:
        argv[1:1] = ["-H", "Connection: close"]
    out = on_client(*argv, timeout=seconds + 60)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    pct = {p: to_ms(v) for p, v in re.findall(r"^\s+(50|99)(?:\.000)?%\s+(\S+)", out, re.M)}
    # wrk counts a "read" error whenever the server closes a connection after its
    # answer without a `Connection: close` header (the lab's Python test service
    # does, under `Connection: close`): shown apart as "eof", not as failures.
    errors = sum(int(n) for n in re.findall(r"(?:connect|write|timeout) (\d+)", out))
    eof = re.search(r"read (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50": pct.get("50"), "p99": pct.get("99"), "eof": int(eof.group(1)) if eof else 0,
            "errors": errors + (int(non2xx.group(1)) if non2xx else 0)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=10)
    a = p.parse_args()
    on_client("ip", "route", "replace", *ROUTE)
    try:
        for name, url in ROWS:  # every path answers before anything is measured
            got = on_client("curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code} %header{x-backend}", url,
                            check=False).split()
            if got[:1] != ["200"] or (" x3" not in name and got[1:] != ["be3"]):
                raise SystemExit(f"{name}: {url} answered {got}, expected 200 from be3 (lab converged?)")
        results = {}
        for close in (False, True):
            for name, url in ROWS:
                results[(close, name)] = r = wrk(url, a.seconds, close)
                print(f"  {'close' if close else 'keep-alive':<10} {name:<13} {r['rps']:>8.0f} req/s", file=sys.stderr)
    finally:
        on_client("ip", "route", "del", *ROUTE, check=False)
    head = (f"{'connections':<11} {'path':<13} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
            f"{'eof':>5} {'vs direct':>9} {'vs lvs':>7}")
    print(head)
    print("-" * len(head))
    for close in (False, True):
        direct, lvs = results[(close, "direct")]["rps"], results[(close, "lvs")]["rps"]
        for name, _url in ROWS:
            r = results[(close, name)]
            print(f"{'close' if close else 'keep-alive':<11} {name:<13} {r['rps']:>8.0f} {r['p50']:>7.2f} "
                  f"{r['p99']:>7.2f} {r['errors']:>6} {r['eof']:>5} {r['rps'] / direct:>9.2f} {r['rps'] / lvs:>7.2f}")


if __name__ == "__main__":
    main()
