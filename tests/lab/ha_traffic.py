#!/usr/bin/env python3
"""Long-lived TCP connections and a new-connection probe through the VIPs.

Runs inside a lab client namespace (`openclb-lab exec client1 -- python3
tests/lab/ha_traffic.py ...`), standard library only, bounded by --duration.

    --hold NAME=VIP:PORT:COUNT   COUNT keep-alive HTTP connections, each sends
                                 GET / every --interval s (after the previous
                                 answer came back) for the whole run
    --probe VIP:PORT             a new connection every --probe-interval s
                                 (GET, Connection: close); the longest gap
                                 between two successful probes is the
                                 failover time for new connections; one
                                 without a whole answer after
                                 --probe-timeout s (2) has failed
    --stop FILE                  end early once FILE exists (--duration
                                 stays the bound)

Prints one JSON document: per hold group the connections that were still
answering at the end, the ones that failed (reset / closed / stalled) with
the number of answers they had before, and the longest stall; for the probe
the longest gap between successes and when it happened.
"""

import argparse
import errno
import json
import os
import selectors
import socket
import time

REQUEST = b"GET / HTTP/1.1\r\nHost: ha\r\n\r\n"
PROBE = b"GET / HTTP/1.1\r\nHost: ha\r\nConnection: close\r\n\r\n"


def parse_response(buf):
    """Return (complete, rest) for a buffer holding HTTP/1.1 responses."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return False, buf
    length = 0
    for line in buf[:head_end].split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v.strip())
    end = head_end + 4 + length
    if len(buf) < end:
        return False, buf
    return True, buf[end:]


class Held:
    def __init__(self, group, addr):
        self.group, self.addr = group, addr
        self.sock = socket.socket()
        self.sock.setblocking(False)
        self.sock.connect_ex(addr)
        self.buf = b""
        self.waiting = False
        self.sent_at = 0.0
        self.answers = 0
        self.last_answer = None
        self.max_stall = 0.0
        self.error = None
        self.connected = False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hold", action="append", default=[])
    ap.add_argument("--probe")
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--probe-interval", type=float, default=0.05)
    ap.add_argument("--probe-timeout", type=float, default=2.0)
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--mark", help="file: a line with the run's clock offset is written when all connections are up")
    ap.add_argument("--stop", help="file: the run ends early once it exists")
    args = ap.parse_args()
    duration = min(args.duration, 600.0)  # bounded, whatever the caller asks

    sel = selectors.DefaultSelector()
    held = []
    for spec in args.hold:
        name, _, rest = spec.partition("=")
        vip, port, count = rest.rsplit(":", 2)
        for _ in range(int(count)):
            h = Held(name, (vip, int(port)))
            held.append(h)
            sel.register(h.sock, selectors.EVENT_WRITE, h)
            time.sleep(0.005)  # spread SYNs a little

    probes = {}
    probe_ok = []
    probe_fail = []  # [start (s from the run's start), s until it failed, why, bytes received]
    slowest = [0.0, 0.0]  # [start, s to a whole answer] of the slowest successful probe
    next_probe = time.monotonic()
    t0 = time.monotonic()
    wall0 = time.time()
    end = t0 + duration

    def probe_done(s):
        sel.unregister(s)
        s.close()
        del probes[s]

    def probe_failed(s, st, why):
        probe_fail.append([round(st[0] - t0, 3), round(time.monotonic() - st[0], 3), why, len(st[1])])
        probe_done(s)

    def fail(h, why):
        if h.error is None:
            h.error = why
        try:
            sel.unregister(h.sock)
        except (KeyError, ValueError):
            pass
        h.sock.close()

    while True:
        now = time.monotonic()
        if now >= end or (args.stop and os.path.exists(args.stop)):
            break
        # held connections: send when due
        for h in held:
            if h.error or not h.connected:
                continue
            if not h.waiting and now - h.sent_at >= args.interval:
                try:
                    h.sock.send(REQUEST)
                except OSError as exc:
                    fail(h, errno.errorcode.get(exc.errno, str(exc)))
                    continue
                h.waiting, h.sent_at = True, now
            if h.last_answer is not None:
                h.max_stall = max(h.max_stall, now - h.last_answer)
        # probes
        if args.probe and now >= next_probe and len(probes) < 40:
            next_probe = now + args.probe_interval
            vip, port = args.probe.rsplit(":", 1)
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((vip, int(port)))
            probes[s] = [now, b"", False]
            sel.register(s, selectors.EVENT_WRITE, None)
        for s, st in list(probes.items()):
            if now - st[0] > args.probe_timeout:
                probe_failed(s, st, "timeout, " + ("no connection" if not st[2] else "request sent"))
        for key, events in sel.select(timeout=0.01):
            h = key.data
            if h is None:  # a probe
                s = key.fileobj
                st = probes.get(s)
                if st is None:
                    continue
                try:
                    if events & selectors.EVENT_WRITE and not st[2]:
                        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            raise OSError(err, "connect: " + errno.errorcode.get(err, str(err)))
                        s.send(PROBE)
                        st[2] = True
                        sel.modify(s, selectors.EVENT_READ, None)
                        continue
                    data = s.recv(4096)
                    st[1] += data
                    done, _ = parse_response(st[1])
                    if done:
                        now = time.monotonic()
                        probe_ok.append(now - t0)
                        if now - st[0] > slowest[1]:
                            slowest[:] = [round(st[0] - t0, 3), round(now - st[0], 3)]
                        probe_done(s)
                    elif not data:
                        probe_failed(s, st, "closed before a whole answer")
                except OSError as exc:
                    probe_failed(s, st, exc.strerror if exc.strerror else errno.errorcode.get(exc.errno, str(exc)))
                continue
            if events & selectors.EVENT_WRITE and not h.connected:
                err = h.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    fail(h, "connect: " + errno.errorcode.get(err, str(err)))
                    continue
                h.connected = True
                sel.modify(h.sock, selectors.EVENT_READ, h)
                continue
            try:
                data = h.sock.recv(65536)
            except OSError as exc:
                fail(h, errno.errorcode.get(exc.errno, str(exc)))
                continue
            if not data:
                fail(h, "closed by peer")
                continue
            h.buf += data
            done, h.buf = parse_response(h.buf)
            if done:
                t = time.monotonic()
                h.answers += 1
                h.waiting = False
                h.last_answer = t
        if args.mark and all(h.answers >= 3 or h.error for h in held):
            with open(args.mark, "w") as f:
                f.write(f"{time.time() - wall0:.3f}\n")
            args.mark = None

    now = time.monotonic()
    out = {"duration": round(now - t0, 3), "started": wall0, "groups": {}}
    for h in held:
        g = out["groups"].setdefault(
            h.group, {"count": 0, "alive": 0, "failed": [], "max_stall": 0.0, "eligible": 0, "eligible_alive": 0}
        )
        g["count"] += 1
        # alive: no error and an answer in the last second of the run
        alive = h.error is None and h.last_answer is not None and now - h.last_answer < 1.5
        g["alive"] += alive
        if h.answers >= 3:
            g["eligible"] += 1
            g["eligible_alive"] += alive
        if not alive:
            g["failed"].append({"error": h.error or "stalled", "answers": h.answers})
        g["max_stall"] = round(max(g["max_stall"], h.max_stall), 3)
    if args.probe:
        gaps = [b - a for a, b in zip(probe_ok, probe_ok[1:], strict=False)]
        worst = max(range(len(gaps)), key=gaps.__getitem__) if gaps else None
        top = sorted(range(len(gaps)), key=gaps.__getitem__, reverse=True)[:3]
        out["probe"] = {
            "ok": len(probe_ok),
            "failed": len(probe_fail),
            "failed_at": [f[0] for f in probe_fail],
            # [start, s until it failed, why, bytes received] of each failure
            "failures": probe_fail,
            "max_gap": round(gaps[worst], 3) if gaps else None,
            "max_gap_at": round(probe_ok[worst], 3) if gaps else None,
            # the three longest gaps: [start (s from the run's start), length]
            "top_gaps": [[round(probe_ok[i], 3), round(gaps[i], 3)] for i in top],
            "ok_at": [round(t, 3) for t in probe_ok],
            "slowest": slowest,
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
