#!/usr/bin/env python3
"""AWS for weft's tests, run inside a test's own network namespace.

- moto (a real implementation of the AWS APIs) on 127.0.0.1:MOTO_PORT;
- a front on 0.0.0.0:API_PORT that passes every request to moto, except that
  the test can make the next requests fail (throttling, 5xx) to see how
  discovery copes: POST /_weft/faults {"faults": [{"status": 503, "code": ...}]};
- an IMDSv2 stand-in on 0.0.0.0:IMDS_PORT (moto's own is a static fake the SDK
  rejects): PUT /latest/api/token needs and echoes the TTL header; GET needs the
  token. Which instance a client is depends on its source address:
  POST /_weft/imds {"192.168.0.2": {"id": "i-...", "ip": "10.0.0.5"}}.

Usage: fake_aws.py MOTO_PORT API_PORT IMDS_PORT REGION
"""

import http.client
import http.server
import json
import logging
import secrets
import sys
import threading

from moto.server import ThreadedMotoServer

MOTO_PORT, API_PORT, IMDS_PORT = (int(a) for a in sys.argv[1:4])
REGION = sys.argv[4]

lock = threading.Lock()
faults = []  # next responses to fake, oldest first
served = {"api": 0, "faults": 0}
instances = {}  # client address -> {"id", "ip"}
tokens = set()


class Quiet(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def reply(self, status, body=b"", headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Front(Quiet):
    def do_POST(self):
        self.handle_any("POST")

    def do_GET(self):
        self.handle_any("GET")

    def handle_any(self, method):
        body = self.body()
        if self.path == "/_weft/faults":
            with lock:
                faults.extend(json.loads(body)["faults"])
            return self.reply(200, b"{}")
        if self.path == "/_weft/stats":
            with lock:
                return self.reply(200, json.dumps(served).encode())
        with lock:
            served["api"] += 1
            fault = faults.pop(0) if faults else None
            if fault:
                served["faults"] += 1
        if fault:
            code = fault.get("code", "ServiceUnavailable")
            xml = (
                f"<Response><Errors><Error><Code>{code}</Code><Message>injected by the test</Message>"
                f"</Error></Errors><RequestID>fake</RequestID></Response>"
            ).encode()
            return self.reply(fault["status"], xml, [("Content-Type", "text/xml")])
        conn = http.client.HTTPConnection("127.0.0.1", MOTO_PORT, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("content-length", "connection")}
        conn.request(method, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        out = [(k, v) for k, v in resp.getheaders() if k.lower() not in ("content-length", "transfer-encoding", "connection")]
        self.reply(resp.status, data, out)


class Imds(Quiet):
    def do_POST(self):
        if self.path == "/_weft/imds":
            with lock:
                instances.update(json.loads(self.body()))
            return self.reply(200, b"{}")
        self.reply(404)

    def do_PUT(self):
        self.body()
        ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
        if self.path != "/latest/api/token" or not ttl:
            return self.reply(400)
        token = secrets.token_urlsafe(24)
        with lock:
            tokens.add(token)
        self.reply(200, token.encode(), [("X-aws-ec2-metadata-token-ttl-seconds", ttl), ("Content-Type", "text/plain")])

    def do_GET(self):
        with lock:
            ok = self.headers.get("X-aws-ec2-metadata-token") in tokens
            me = instances.get(self.client_address[0])
        if not ok:
            return self.reply(401)
        if not me:
            return self.reply(404)
        doc = json.dumps({"instanceId": me["id"], "privateIp": me["ip"], "region": REGION,
                          "availabilityZone": REGION + "a", "accountId": "123456789012"})
        answers = {
            "/latest/meta-data/instance-id": me["id"],
            "/latest/meta-data/local-ipv4": me["ip"],
            "/latest/meta-data/placement/region": REGION,
            "/latest/meta-data/placement/availability-zone": REGION + "a",
            "/latest/dynamic/instance-identity/document": doc,
        }
        answer = answers.get(self.path)
        if answer is None:
            return self.reply(404)
        self.reply(200, answer.encode(), [("Content-Type", "text/plain")])


def main():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=MOTO_PORT, verbose=False)
    moto.start()
    # moto advances an ECS task's state on every describe, so a task that ran
    # stops on its own; real tasks keep running until stopped.
    from moto.moto_api import state_manager
    state_manager.set_transition(model_name="ecs::task", transition={"progression": "manual", "times": 10**9})
    servers = [
        http.server.ThreadingHTTPServer(("0.0.0.0", API_PORT), Front),
        http.server.ThreadingHTTPServer(("0.0.0.0", IMDS_PORT), Imds),
    ]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
