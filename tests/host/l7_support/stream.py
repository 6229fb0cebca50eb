"""Bounded request stream for the L7 host tests and the benchmark (stdlib).

    stream.py URL [--host H] [--count N] [--seconds S] [--workers W] [--keepalive] [--stop-file F]

Stops after N requests or S seconds, whichever comes first (or as soon as
file F exists: a caller ends a stream whose length it cannot know). Prints JSON:
{"ok", "failed", "errors": {...}, "backends": {...}, "seconds", "rps"}.
A request fails on any exception or a status >= 500. With --keepalive, a
request on a reused connection that the server closed before answering is
retried once on a new connection, as RFC 9112 9.3.1 lets clients do for
idempotent requests (and browsers and curl do): an nginx reload closes idle
keep-alive connections of the old workers, and that race is the client's to
absorb. Those retries are counted in "retried".
"""

import argparse
import collections
import http.client
import json
import os
import threading
import time
from urllib.parse import urlsplit


def main():
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--host")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--keepalive", action="store_true")
    p.add_argument("--stop-file")
    a = p.parse_args()
    url = urlsplit(a.url)
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    lock = threading.Lock()
    state = {"sent": 0, "ok": 0, "failed": 0, "retried": 0}
    errors, backends = collections.Counter(), collections.Counter()
    deadline = time.monotonic() + a.seconds
    headers = {"Host": a.host} if a.host else {}

    def worker():
        conn = None
        while True:
            with lock:
                if state["sent"] >= a.count or time.monotonic() > deadline:
                    break
                if a.stop_file and os.path.exists(a.stop_file):
                    break
                state["sent"] += 1
            try:
                reused = conn is not None
                if conn is None:
                    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=10)
                try:
                    conn.request("GET", path, headers=headers)
                    resp = conn.getresponse()
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                    if not reused:
                        raise
                    with lock:
                        state["retried"] += 1
                    conn.close()
                    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=10)
                    conn.request("GET", path, headers=headers)
                    resp = conn.getresponse()
                resp.read()
                be = resp.getheader("X-Backend") or "-"
                if resp.status >= 500:
                    raise RuntimeError(f"status {resp.status}")
                with lock:
                    state["ok"] += 1
                    backends[be] += 1
                if not a.keepalive or resp.will_close:
                    conn.close()
                    conn = None
            except Exception as exc:  # noqa: BLE001 - every failure counts
                with lock:
                    state["failed"] += 1
                    errors[str(exc)[:80] or exc.__class__.__name__] += 1
                if conn is not None:
                    conn.close()
                conn = None

    start = time.monotonic()
    threads = [threading.Thread(target=worker) for _worker in range(a.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - start
    print(
        json.dumps(
            {
                "ok": state["ok"],
                "failed": state["failed"],
                "retried": state["retried"],
                "errors": dict(errors),
                "backends": dict(backends),
                "seconds": round(took, 3),
                "rps": round(state["ok"] / took, 1) if took else 0,
            }
        )
    )


if __name__ == "__main__":
    main()
