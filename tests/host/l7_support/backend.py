"""Test backend for the L7 host tests (stdlib only).

    backend.py NAME ADDRESS PORT STATEDIR

GET/HEAD /...        200, JSON {backend, method, path, headers}
/health              status from STATEDIR/NAME.health (default 200)
?setcookie=NAME      also sets cookie NAME=session-of-<backend>
/sleep?s=SECONDS     answers after SECONDS
/big                 64 KiB of text (gzip test)
Upgrade: websocket   RFC 6455 handshake, then echoes text frames
"""

import base64
import hashlib
import json
import os
import struct
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

NAME, ADDRESS, PORT, STATEDIR = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # one segment per response, no Nagle: otherwise keep-alive clients
    # (nginx's upstream keepalive included) wait for delayed ACKs
    wbufsize = -1
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def _health_status(self):
        try:
            with open(os.path.join(STATEDIR, NAME + ".health"), encoding="utf-8") as fh:
                return int(fh.read().strip() or 200)
        except FileNotFoundError:
            return 200

    def _reply(self, status, body, ctype="application/json", extra=()):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Backend", NAME)
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_HEAD(self):
        self.do_GET()

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.do_GET()

    def do_GET(self):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if self.headers.get("Upgrade", "").lower() == "websocket":
            return self._websocket()
        if url.path == "/health":
            status = self._health_status()
            return self._reply(status, json.dumps({"backend": NAME, "health": status}))
        if url.path == "/sleep":
            time.sleep(float(query.get("s", ["1"])[0]))
        if url.path == "/big":
            return self._reply(200, (f"{NAME} says hello\n") * 4096, "text/plain")
        extra = []
        if "setcookie" in query:
            extra.append(("Set-Cookie", "{}=session-of-{}; Path=/".format(query["setcookie"][0], NAME)))
        body = {
            "backend": NAME,
            "method": self.command,
            "path": self.path,
            "headers": dict(self.headers.items()),
        }
        return self._reply(200, json.dumps(body), extra=extra)

    def _websocket(self):
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                length = struct.unpack(">H", self.rfile.read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            if opcode == 8:
                self.wfile.write(b"\x88\x00")
                return
            reply = (f"{NAME}: ").encode() + data
            self.wfile.write(bytes([0x81, len(reply)]) + reply)  # short frames only
            self.wfile.flush()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    address_family = __import__("socket").AF_INET6 if ":" in ADDRESS else __import__("socket").AF_INET


if __name__ == "__main__":
    Server((ADDRESS, PORT), Handler).serve_forever()
