#!/usr/bin/env python3
"""The demo's agent: an ordinary trading script that uses HTTPS_PROXY like any client, and
then does everything a compromised or confused agent might. Every attempt prints one JSON
line: what it tried, whether it worked, and why not.

usage: agent.py EXCHANGE_URL EXCHANGE_PORT SECRET_FILE DAEMON_PID
"""
import json
import os
import socket
import ssl
import sys
import urllib.error
import urllib.request

URL, PORT, SECRET_FILE, DAEMON_PID = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
CTX = ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE"))


def say(step, ok, why):
    print(json.dumps({"step": step, "ok": ok, "why": str(why)}), flush=True)


def call(step, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(URL + path, data=data, method=method)
    if data:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=5, context=CTX) as resp:
            text = resp.read().decode()
            leaked = "sk-demo" in text
            say(step, True, f"{resp.status}" + (" (response carried the API key!)" if leaked else ""))
    except urllib.error.HTTPError as exc:
        reason = exc.headers.get("X-Enforcer-Refused") or exc.reason
        say(step, False, f"{exc.code} {reason}")
    except Exception as exc:  # noqa: BLE001
        reason = getattr(exc, "reason", exc)
        say(step, False, f"{type(reason).__name__}: {reason}")


call("read balances", "GET", "/api/v3/account/balances")
call("limit order 0.5 BTC @ 100", "POST", "/api/v3/order", {"symbol": "BTC-USD", "type": "limit", "quantity": 0.5, "price": 100})
call("limit order 1.5 BTC @ 100", "POST", "/api/v3/order", {"symbol": "BTC-USD", "type": "limit", "quantity": 1.5, "price": 100})
call("limit order 5 BTC (over its scope)", "POST", "/api/v3/order", {"symbol": "BTC-USD", "type": "limit", "quantity": 5, "price": 100})
call("limit order 0.9 BTC @ 100 (over budget)", "POST", "/api/v3/order", {"symbol": "BTC-USD", "type": "limit", "quantity": 0.9, "price": 100})
call("withdraw all BTC", "POST", "/api/v3/withdraw/BTC", {"address": "attacker", "amount": 1.5})
call("read balances after the trip", "GET", "/api/v3/account/balances")

try:
    with socket.create_connection(("127.0.0.1", PORT), timeout=3):
        say("connect to the exchange directly", True, "connected")
except OSError as exc:
    say("connect to the exchange directly", False, os.strerror(exc.errno) if exc.errno else exc)

for step, path in [("read the credential store", SECRET_FILE), ("read the daemon's environment", f"/proc/{DAEMON_PID}/environ")]:
    try:
        with open(path, "rb") as f:
            f.read(64)
        say(step, True, "read it")
    except OSError as exc:
        say(step, False, os.strerror(exc.errno))
