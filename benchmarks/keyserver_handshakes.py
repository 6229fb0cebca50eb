#!/usr/bin/env python3
"""Full TLS handshakes per second through the key server vs with a local key.

Builds the real chain in private network namespaces (tests/host/kschain.py:
SoftHSM2 + p11-kit server + stunnel on two key servers, stunnel client +
nginx with the libp11 engine on an L7 namespace), then runs the same bounded
handshake load against four listeners and prints one table:

    sudo .venv/bin/python benchmarks/keyserver_handshakes.py [--seconds 5] [--concurrency 4] [--tls 1.3]

Absolute numbers depend on the machine (client, nginx and key server share its
cores); compare the ratio, measured in one run.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "host"))
import kschain  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="load per listener (bounded)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--tls", choices=["1.2", "1.3"], default="1.3")
    ap.add_argument("--workers", type=int, default=2, help="nginx worker processes")
    a = ap.parse_args()
    missing = kschain.missing_prerequisites()
    if missing:
        sys.exit("cannot build the key-server chain: " + "; ".join(missing))
    chain = kschain.Chain(tempfile.mkdtemp(prefix="openclb-ks-bench-"), workers=a.workers)
    results = {}
    try:
        chain.setup()
        for name in ("rsa-ks", "rsa-local", "ec-ks", "ec-local"):
            chain.load(name, 1.0, tls=a.tls, concurrency=a.concurrency)  # warm-up
            results[name] = chain.load(name, a.seconds, tls=a.tls, concurrency=a.concurrency)
        resumed = chain.load("rsa-ks", a.seconds, tls=a.tls, concurrency=a.concurrency, resume=True)
    finally:
        chain.teardown()

    print(f"\nfull TLS {a.tls} handshakes (+ one HTTP request each), {a.concurrency} clients, "
          f"{a.workers} nginx workers, {a.seconds:.0f} s per row, one run\n")
    print(f"{'listener':<11} {'key':<10} {'hs/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7}")
    for name, r in results.items():
        alg, store = name.split("-")
        print(f"{alg:<11} {('key server' if store == 'ks' else 'local'):<10} {r['rate']:>8.1f} "
              f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['failed']:>7}")
    print()
    for alg in ("rsa", "ec"):
        ks, local = results[f"{alg}-ks"], results[f"{alg}-local"]
        ratio = ks["rate"] / local["rate"] if local["rate"] else float("nan")
        print(f"{'RSA-2048' if alg == 'rsa' else 'ECDSA P-256':<12} key server / local = {ratio:.2f}x rate, "
              f"+{ks['p50_ms'] - local['p50_ms']:.2f} ms p50")
    print(f"resumed handshakes via the key-server listener: {resumed['rate']:.1f}/s "
          f"({resumed['resumed']} of {resumed['ok']} resumed: no key-server round trip)")


if __name__ == "__main__":
    main()
