"""Send a bounded burst of real requests to one listener and count the answers.

Runs inside a client namespace (`ip netns exec LAB-client1 python -m
openclb_lab.probe ...`); prints one JSON object. The lab's backends answer with
their host name (HTTP body, UDP reply), so the spread over backends is read
from the answers themselves.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import ssl
import sys
import time
from collections import Counter


def _who(text: str, names: list[str]) -> str:
    """The backend named in an answer (longest match first: be1 vs be10)."""
    for name in sorted(names, key=len, reverse=True):
        if name in text:
            return name
    return "?"


def tcp_once(vip: str, port: int, timeout: float) -> str:
    with socket.create_connection((vip, port), timeout=timeout) as s:
        s.sendall(f"GET / HTTP/1.0\r\nHost: {vip}\r\n\r\n".encode())
        chunks = []
        while True:
            data = s.recv(4096)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def udp_once(vip: str, port: int, timeout: float) -> str:
    family = socket.AF_INET6 if ":" in vip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(b"openclb-probe", (vip, port))
        data = s.recvfrom(4096)[0]
    return data.decode(errors="replace")


def http_once(vip: str, port: int, timeout: float, host: str | None, tls: bool, path: str = "/") -> str:
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the probe measures reachability; TLS is verified by the L7 tests
        conn = http.client.HTTPSConnection(vip, port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(vip, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host or vip, "Connection": "close"})
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
        if 300 <= resp.status < 400:
            return f"redirect:{resp.status}:{resp.getheader('Location')}"
        if resp.status >= 400:
            raise OSError(f"HTTP {resp.status}")
        return body
    finally:
        conn.close()


def probe(protocol: str, vip: str, port: int, count: int, names: list[str], host: str | None = None,
          timeout: float = 3.0, warmup: float = 30.0) -> dict:
    def once() -> str:
        if protocol == "udp":
            return udp_once(vip, port, timeout)
        if protocol == "tcp":
            return tcp_once(vip, port, timeout)
        return http_once(vip, port, timeout, host, tls=(protocol == "https"))

    # Warm-up: after a deploy, health checkers may still be bringing members in.
    deadline = time.monotonic() + warmup
    while True:
        try:
            once()
            break
        except OSError:
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
    spread: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    t0 = time.monotonic()
    for _request in range(count):
        try:
            answer = once()
            spread["redirect" if answer.startswith("redirect:") else _who(answer, names)] += 1
        except OSError as e:
            errors[type(e).__name__ + (f": {e}" if str(e).startswith("HTTP") else "")] += 1
    return {"sent": count, "ok": sum(spread.values()), "spread": dict(sorted(spread.items())),
            "errors": dict(errors), "seconds": round(time.monotonic() - t0, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("protocol", choices=["tcp", "udp", "http", "https"])
    p.add_argument("vip")
    p.add_argument("port", type=int)
    p.add_argument("--count", type=int, default=60)
    p.add_argument("--names", default="", help="comma-separated backend host names")
    p.add_argument("--host", help="HTTP Host header")
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=30.0)
    a = p.parse_args()
    print(json.dumps(probe(a.protocol, a.vip, a.port, min(a.count, 10000), [n for n in a.names.split(",") if n],
                           a.host, timeout=a.timeout, warmup=a.warmup)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
