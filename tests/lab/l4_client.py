"""Traffic generator for the L4 lab tests; runs INSIDE a client namespace.

    openclb-lab exec client1 -- python3 tests/lab/l4_client.py http --host 203.0.113.10 --port 80 --count 600
    ... udp  --host 203.0.113.10 --port 53 --count 30
    ... hold --host 203.0.113.10 --port 80 --connections 6 --duration 60 --interval 1

Prints one JSON object. Every loop is bounded by a count and a deadline; every
socket has a timeout. The lab's test servers answer with their host name.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import time


def http_get(conn):
    conn.request("GET", "/")
    resp = conn.getresponse()
    body = resp.read().decode().strip()
    return resp.getheader("X-Backend") or body


def cmd_http(a):
    counts, errors, deadline = {}, [], time.monotonic() + a.deadline
    for _ in range(a.count):
        if time.monotonic() > deadline:
            errors.append("deadline")
            break
        conn = http.client.HTTPConnection(a.host, a.port, timeout=a.timeout,
                                          source_address=(a.source, 0) if a.source else None)
        try:
            backend = http_get(conn)
            counts[backend] = counts.get(backend, 0) + 1
        except OSError as exc:
            errors.append(type(exc).__name__ + ": " + str(exc))
        finally:
            conn.close()
    return {"counts": counts, "errors": errors}


def cmd_udp(a):
    counts, errors, deadline = {}, [], time.monotonic() + a.deadline
    family = socket.AF_INET6 if ":" in a.host else socket.AF_INET
    for i in range(a.count):
        if time.monotonic() > deadline:
            errors.append("deadline")
            break
        with socket.socket(family, socket.SOCK_DGRAM) as s:  # a new source port: a new IPVS connection
            s.settimeout(a.timeout)
            if a.source:
                s.bind((a.source, 0))
            payload = f"ping-{i}"
            try:
                s.sendto(payload.encode(), (a.host, a.port))
                reply = s.recv(2048).decode().split()
                if reply[0] != payload:
                    errors.append(f"bad reply {reply}")
                else:
                    counts[reply[1]] = counts.get(reply[1], 0) + 1
            except OSError as exc:
                errors.append(type(exc).__name__)
    return {"counts": counts, "errors": errors}


def cmd_hold(a):
    """Keep N keep-alive connections open and send a request on each every interval.

    Reports per connection the backend of every answer (an error is recorded
    as "error:..." and the connection is not reopened: the point is whether
    the established connection survives).
    """
    conns, log = [], []
    for _ in range(a.connections):
        c = http.client.HTTPConnection(a.host, a.port, timeout=a.timeout,
                                       source_address=(a.source, 0) if a.source else None)
        conns.append(c)
        log.append([])
    start = time.monotonic()
    while time.monotonic() - start < a.duration:
        for i, c in enumerate(conns):
            if log[i] and log[i][-1].startswith("error"):
                continue
            try:
                log[i].append(http_get(c))
            except (OSError, http.client.HTTPException) as exc:
                log[i].append(f"error:{type(exc).__name__}")
        print(json.dumps({"t": round(time.monotonic() - start, 1), "last": [entry[-1] for entry in log]}),
              file=sys.stderr, flush=True)
        time.sleep(a.interval)
    for c in conns:
        c.close()
    return {"connections": log}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["http", "udp", "hold"])
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--source")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--deadline", type=float, default=120.0)
    p.add_argument("--connections", type=int, default=6)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--interval", type=float, default=1.0)
    a = p.parse_args()
    a.count = min(a.count, 5000)
    a.duration = min(a.duration, 600)
    result = {"http": cmd_http, "udp": cmd_udp, "hold": cmd_hold}[a.mode](a)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
