"""L7 throughput, side by side (root; nginx on the host; a few minutes).

Builds the host lab of tests/host/test_l7_node.py (network namespaces, the
real play, nginx, openclb-healthd, Python backends), then runs the same
bounded request stream:

  direct      L7 namespace -> backend (no nginx)
  nginx       client -> VIP -> nginx -> backends
  nginx+flap  the same while openclb-healthd flips a backend out and in
              (one graceful nginx reload per change)

with and without keep-alive, and prints requests/s and the ratio to the
direct run. The backends are single-process Python servers, so absolute
numbers say little; compare the ratios of one run.

    sudo .venv/bin/python benchmarks/l7_throughput.py [--seconds 5]
"""

import argparse
import json
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "host", "l7_support"))

import lab as l7lab  # noqa: E402

STREAM = os.path.join(HERE, "..", "tests", "host", "l7_support", "stream.py")


def run(lab, ns, url, seconds, keepalive):
    argv = [sys.executable, STREAM, url, "--count", "10000000", "--seconds", str(seconds), "--workers", "4"]
    if keepalive:
        argv.append("--keepalive")
    r = l7lab.sh(*argv, ns=ns, timeout=seconds + 60)
    return json.loads(r.stdout)


def flapper(lab, stop, period):
    flips = 0
    while not stop.is_set() and flips < 1000:
        lab.set_health("be2", 503 if flips % 2 == 0 else None)
        flips += 1
        stop.wait(period)
    lab.set_health("be2", None)
    return flips


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=5)
    a = p.parse_args()
    lab = l7lab.L7Lab()
    rows = []
    try:
        lab.setup()
        changed, failed = lab.recap(lab.converge())
        assert failed == 0
        lab.start_nginx()
        lab.start_healthd()
        vip = f"http://{l7lab.model_fixture.VIP}/"
        for keepalive in (False, True):
            kind = "keep-alive" if keepalive else "new conn"
            direct = run(lab, lab.lb, "http://10.99.0.21:8080/", a.seconds, keepalive)
            nginx = run(lab, lab.cl, vip, a.seconds, keepalive)
            stop = threading.Event()
            t = threading.Thread(target=flapper, args=(lab, stop, 2.5))
            before = (lab.healthd_status() or {}).get("reloads", {}).get("ok", 0)
            t.start()
            flap = run(lab, lab.cl, vip, a.seconds * 2, keepalive)
            stop.set()
            t.join()
            reloads = (lab.healthd_status() or {}).get("reloads", {}).get("ok", 0) - before
            for name, r in (("direct", direct), ("nginx", nginx), ("nginx+flap", flap)):
                rows.append(
                    (
                        kind,
                        name,
                        r,
                        r["rps"] / direct["rps"] if direct["rps"] else 0,
                        reloads if name == "nginx+flap" else "-",
                    )
                )
            time.sleep(1)
    finally:
        lab.teardown()
    print(f"{'mode':<11} {'path':<11} {'req/s':>8} {'ratio':>6} {'failed':>6} {'retried':>7} {'reloads':>7}")
    for kind, name, r, ratio, reloads in rows:
        print(
            f"{kind:<11} {name:<11} {r['rps']:>8.0f} {ratio:>6.2f} {r['failed']:>6} {r.get('retried', 0):>7} "
            f"{reloads!s:>7}"
        )


if __name__ == "__main__":
    main()
