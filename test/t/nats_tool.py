#!/usr/bin/env python3
"""nats_tool.py: a tiny NATS JetStream client for the relay's TAP tests
(test/t/011_relay.pl), speaking the NATS text protocol over a socket, since
no Python NATS library is installed.

  nats_tool.py --url nats://127.0.0.1:PORT create-stream NAME SUBJECT DUP_WINDOW_S
  nats_tool.py --url nats://127.0.0.1:PORT count NAME
  nats_tool.py --url nats://127.0.0.1:PORT check NAME

check prints one JSON object: messages (count in the stream), distinct
(distinct Nats-Msg-Id values), missing_id (messages without one), subjects
(count per subject), first (the first message: subject, headers, data) and
order_violations (messages whose payload "n" is lower than that of an
earlier message of the same Eventbox-Aggregate-Id).
"""
import argparse
import base64
import json
import socket
import sys
from urllib.parse import urlparse


class Nats:
    def __init__(self, url):
        u = urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port or 4222), timeout=30)
        self.buf = b""
        self.inbox = "_INBOX.evtool"
        self._line()  # INFO
        self.sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,'
                          b'"no_responders":true,"protocol":1}\r\nPING\r\n')
        while self._line() != b"PONG":
            pass
        self.sock.sendall(("SUB %s.* 1\r\n" % self.inbox).encode())

    def _fill(self):
        data = self.sock.recv(1 << 20)
        if not data:
            raise RuntimeError("connection closed")
        self.buf += data

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _bytes(self, n):
        while len(self.buf) < n + 2:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def read_msg(self):
        """Next MSG/HMSG as (subject, headers bytes, data bytes)."""
        while True:
            line = self._line()
            parts = line.split(b" ")
            if parts[0] == b"PING":
                self.sock.sendall(b"PONG\r\n")
            elif parts[0] == b"MSG":
                return parts[1].decode(), b"", self._bytes(int(parts[-1]))
            elif parts[0] == b"HMSG":
                hl, tl = int(parts[-2]), int(parts[-1])
                body = self._bytes(tl)
                return parts[1].decode(), body[:hl], body[hl:]
            elif parts[0] == b"-ERR":
                raise RuntimeError(line.decode())

    def requests(self, items):
        """Send (subject, json) requests pipelined; return replies in order."""
        out = {}
        msgs = []
        for i, (subj, body) in enumerate(items):
            data = json.dumps(body).encode()
            msgs.append(b"PUB %s %s.%d %d\r\n%s\r\n" % (subj.encode(), self.inbox.encode(), i,
                                                         len(data), data))
        self.sock.sendall(b"".join(msgs))
        while len(out) < len(items):
            subj, _, data = self.read_msg()
            out[int(subj.rsplit(".", 1)[1])] = json.loads(data) if data else {}
        return [out[i] for i in range(len(items))]


def headers(raw):
    h = {}
    for line in raw.decode().split("\r\n")[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            h[k.strip()] = v.strip()
    return h


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("cmd")
    ap.add_argument("args", nargs="*")
    a = ap.parse_args()
    nc = Nats(a.url)
    if a.cmd == "create-stream":
        name, subject, window = a.args
        r = nc.requests([("$JS.API.STREAM.CREATE." + name,
                          {"name": name, "subjects": [subject], "storage": "file",
                           "duplicate_window": int(float(window) * 1e9)})])[0]
        if "error" in r:
            sys.exit("create-stream: %s" % r["error"])
        print(json.dumps({"created": name}))
    elif a.cmd == "count":
        info = nc.requests([("$JS.API.STREAM.INFO." + a.args[0], {})])[0]
        if "error" in info:
            sys.exit("count: %s" % info["error"])
        print(info["state"]["messages"])
    elif a.cmd == "check":
        name = a.args[0]
        info = nc.requests([("$JS.API.STREAM.INFO." + name, {})])[0]
        if "error" in info:
            sys.exit("check: %s" % info["error"])
        st = info["state"]
        seqs = list(range(st["first_seq"], st["last_seq"] + 1)) if st["messages"] else []
        ids, missing, subjects, first = set(), 0, {}, None
        last_n, order_violations = {}, 0
        for i in range(0, len(seqs), 500):
            for r in nc.requests([("$JS.API.STREAM.MSG.GET." + name, {"seq": s})
                                  for s in seqs[i:i + 500]]):
                m = r.get("message")
                if m is None:
                    continue
                h = headers(base64.b64decode(m["hdrs"])) if m.get("hdrs") else {}
                subjects[m["subject"]] = subjects.get(m["subject"], 0) + 1
                if "Nats-Msg-Id" in h:
                    ids.add(h["Nats-Msg-Id"])
                else:
                    missing += 1
                if first is None:
                    first = {"subject": m["subject"], "headers": h,
                             "data": base64.b64decode(m.get("data", "")).decode()}
                # per-aggregate order: payload "n" must grow along the stream
                agg = h.get("Eventbox-Aggregate-Id")
                try:
                    n = json.loads(base64.b64decode(m.get("data", "")).decode()).get("n")
                except (ValueError, AttributeError):
                    n = None
                if agg is not None and isinstance(n, int):
                    if agg in last_n and n < last_n[agg]:
                        order_violations += 1
                    last_n[agg] = n
        print(json.dumps({"messages": st["messages"], "distinct": len(ids),
                          "missing_id": missing, "subjects": subjects, "first": first,
                          "order_violations": order_violations}))
    else:
        sys.exit("unknown command " + a.cmd)


if __name__ == "__main__":
    main()
