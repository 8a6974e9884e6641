#!/usr/bin/env python3
"""A stand-in exchange API for the demo: HTTPS on loopback with a certificate from a CA the
demo generates. It accepts only requests that carry the real API key, which only the
enforcer's gateway holds, and counts what reached it.

usage: exchange.py PORT CERT KEY API_KEY STATS_FILE
"""
import json
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, CERT, KEY, API_KEY, STATS = sys.argv[1:6]
LOCK = threading.Lock()
SEEN = {"requests": 0, "orders": 0, "withdrawals": 0, "unauthenticated": 0}


def record(kind):
    with LOCK:
        SEEN[kind] = SEEN.get(kind, 0) + 1
        SEEN["requests"] += 1
        with open(STATS, "w") as f:
            json.dump(SEEN, f)


class Exchange(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def authenticated(self):
        if self.headers.get("X-Api-Key") != API_KEY:
            record("unauthenticated")
            self.reply(401, {"error": "invalid API key"})
            return False
        return True

    def do_GET(self):
        if not self.authenticated():
            return
        record("reads")
        if self.path.startswith("/api/v3/account/balances"):
            self.reply(200, {"BTC": 1.5, "USD": 20000})
        else:
            self.reply(200, {"path": self.path})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        if not self.authenticated():
            return
        if self.path.startswith("/api/v3/withdraw"):
            record("withdrawals")
            self.reply(200, {"withdrawn": body})
            return
        record("orders")
        # Exchanges echo request headers in debug fields; the gateway must scrub the key.
        self.reply(200, {"order": body, "debug": {"api_key": self.headers.get("X-Api-Key")}})


server = ThreadingHTTPServer(("127.0.0.1", int(PORT)), Exchange)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(CERT, KEY)
server.socket = context.wrap_socket(server.socket, server_side=True)
print("ready", flush=True)
server.serve_forever()
