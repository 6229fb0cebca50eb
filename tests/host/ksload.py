#!/usr/bin/env python3
"""Bounded TLS handshake load: N workers doing full (or resumed) handshakes.

Prints one JSON report: counts, error kinds, latency percentiles and a
timeline of (seconds since start, ok) per handshake. Stops by itself after
--duration seconds or --count handshakes.
"""
import argparse
import json
import os
import socket
import ssl
import threading
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--tls", choices=["1.2", "1.3"], default="1.3")
    ap.add_argument("--resume", action="store_true", help="reuse one session (tickets) for every handshake")
    ap.add_argument("--pause", type=float, default=0.0, help="sleep between handshakes per worker")
    ap.add_argument("--ciphers", help="TLS 1.2 cipher list, e.g. ECDHE-RSA-AES128-GCM-SHA256 for the RSA certificate")
    ap.add_argument("--stop-file", help="also stop (and report) as soon as this file exists")
    a = ap.parse_args()

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ver = ssl.TLSVersion.TLSv1_2 if a.tls == "1.2" else ssl.TLSVersion.TLSv1_3
    ctx.minimum_version = ctx.maximum_version = ver
    if a.ciphers:
        ctx.set_ciphers(a.ciphers)

    lock = threading.Lock()
    events = []  # (t, ok, latency, error, resumed)
    session = [None]
    start = time.monotonic()
    start_epoch = time.time()
    stop = start + a.duration if a.duration > 0 else float("inf")
    budget = [a.count or float("inf")]

    def one():
        t0 = time.monotonic()
        err, resumed, ok = None, False, False
        try:
            with socket.create_connection((a.host, a.port), timeout=a.timeout) as raw:
                with ctx.wrap_socket(raw, session=session[0] if a.resume else None) as s:
                    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    data = b""
                    while True:
                        chunk = s.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    ok = data.startswith(b"HTTP/1.1 200")
                    resumed = s.session_reused
                    if a.resume and s.session is not None and session[0] is None:
                        session[0] = s.session
                    if not ok:
                        err = "bad response"
        except ssl.SSLError as exc:
            err = "tls: " + (exc.reason or str(exc))
        except TimeoutError:
            err = "timeout"
        except OSError as exc:
            err = "os: " + (exc.strerror or str(exc))
        t1 = time.monotonic()
        with lock:
            events.append((round(t0 - start, 4), ok, round(t1 - t0, 5), err, resumed))

    def worker():
        while time.monotonic() < stop and not (a.stop_file and os.path.exists(a.stop_file)):
            with lock:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            one()
            if a.pause:
                time.sleep(a.pause)

    if a.resume:
        budget[0] -= 1
        one()  # prime the session
    threads = [threading.Thread(target=worker) for _ in range(a.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    events.sort()
    lat = sorted(e[2] for e in events if e[1])
    errors = {}
    for e in events:
        if e[3]:
            errors[e[3]] = errors.get(e[3], 0) + 1

    def pct(p):
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else None

    print(json.dumps({
        "start_epoch": start_epoch,
        "ok": sum(1 for e in events if e[1]), "failed": sum(1 for e in events if not e[1]),
        "resumed": sum(1 for e in events if e[4]), "errors": errors, "elapsed": round(elapsed, 3),
        "rate": round(sum(1 for e in events if e[1]) / elapsed, 1) if elapsed else 0,
        "p50_ms": pct(0.5), "p99_ms": pct(0.99),
        "timeline": [[e[0], e[1], e[2], e[3]] for e in events],
    }))


def recovery(report, event_epoch):
    """Seconds from an event (wall clock) until the last failed handshake
    started: every handshake started later succeeded. 0 when none failed
    after it; failures up to 0.5 s before count (clocks of two processes)."""
    event_at = event_epoch - report["start_epoch"]
    starts = [t for t, ok, _, _ in report["timeline"] if not ok and t >= event_at - 0.5]
    return max(0.0, max(starts) - event_at) if starts else 0.0


if __name__ == "__main__":
    main()
