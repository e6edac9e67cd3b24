#!/usr/bin/env python3
"""A device application in Python, on the devtables agent's local API (standard library only).

It raises a Fault (which the agent replicates to the cloud), reads it back, lists the device's
faults a page at a time, follows the change stream until its own fault shows up in it, then
answers the commands the cloud sends to the device: `reboot` succeeds, anything else fails.

    python3 examples/python/device_app.py --socket data/gw-1.sock
    python3 examples/python/device_app.py --socket data/gw-1.sock --commands 1   # then exit

The socket is the agent's `local_api.socket` (default: its database file with `.sock`).
"""

import argparse
import http.client
import json
import socket
import sys
import urllib.parse


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket: only `connect` differs."""

    def __init__(self, path, timeout=90):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


class LocalApi:
    def __init__(self, path):
        self.path = path

    def call(self, method, path, body=None, query=None):
        """One request; returns (status, decoded JSON body or None)."""
        if query:
            path += "?" + urllib.parse.urlencode(query)
        conn = UnixHTTPConnection(self.path)
        try:
            headers = {}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw else None)
        finally:
            conn.close()

    def ok(self, method, path, body=None, query=None):
        """A request that must succeed: its JSON body (errors are {"error", "kind"})."""
        status, answer = self.call(method, path, body, query)
        if status >= 300:
            raise RuntimeError(f"{method} {path}: {status} {answer}")
        return answer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="the agent's local API socket")
    parser.add_argument("--commands", type=int, default=0,
                        help="exit after answering this many commands (0: run until stopped)")
    args = parser.parse_args()
    api = LocalApi(args.socket)

    status = api.ok("GET", "/v1/status")
    device = status["device"].split("/")[1]
    cursor = status["local_api"]["changes"]["latest"]
    print(f"agent {status['device']}: ready={status['ready']} pending={status['pending']}", flush=True)

    # Write: the fault is durable on the device when this returns, and goes to the cloud.
    fault = api.ok("POST", "/v1/items/Fault", {
        "deviceId": device, "severity": "warn", "message": "raised by the python example",
    })["item"]
    print(f"raised fault {fault['id']}", flush=True)

    # Read it back by its key fields.
    key = json.dumps({"deviceId": device, "id": fault["id"]})
    got = api.ok("GET", "/v1/items/Fault/one", query={"where": key})["item"]
    assert got["message"] == fault["message"], got

    # Find, two at a time: pass `next` back until it is null.
    pages, total, token = 0, 0, None
    while True:
        query = {"where": json.dumps({"deviceId": device}), "limit": 2}
        if token:
            query["next"] = token
        page = api.ok("GET", "/v1/items/Fault", query=query)
        pages, total, token = pages + 1, total + len(page["items"]), page["next"]
        if not token:
            break
    print(f"{total} faults in {pages} pages", flush=True)

    # Follow the changes after the cursor read at the start (long-poll: wait up to 30 s per
    # call; `next` is where to continue). Our own fault is there.
    seen = False
    while not seen:
        page = api.ok("GET", "/v1/changes",
                      query={"from": cursor, "model": "Fault", "wait": 30})
        for change in page["changes"]:
            print(f"change {change['seq']}: {change['op']} {change['model']} "
                  f"from {change['origin']}", flush=True)
            seen = seen or change["item"].get("id") == fault["id"]
        cursor = page["next"]

    # Commands: take one (long-poll), do it, answer. Unanswered, it is offered again after its
    # lease; answered, the result replicates to the cloud.
    answered = 0
    while args.commands == 0 or answered < args.commands:
        status, command = api.call("GET", "/v1/commands/next", query={"wait": 30})
        if status == 204:
            continue
        if status != 200:
            raise RuntimeError(f"commands/next: {status} {command}")
        print(f"command {command['command']} args={json.dumps(command['args'])}", flush=True)
        if command["command"] == "reboot":
            answer = {"result": {"rebooted": True, "by": "python"}}
        else:
            answer = {"error": f"this app does not know {command['command']}"}
        api.ok("POST", f"/v1/commands/{command['id']}/result", answer)
        answered += 1
    print("done", flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
