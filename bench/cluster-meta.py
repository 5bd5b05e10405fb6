#!/usr/bin/env python3
"""Cluster formation and metadata propagation times of a three-node Warren.

    python3 bench/cluster-meta.py [--rounds 3] [--changes 200] [--bin target/release/warren]

Each round starts three fresh nodes as local processes (loopback, ports
5781-5783 / 15781-15783 / 25781-25783, data under target/cluster-meta/) and
measures:

- formation: from spawning the nodes to every node answering its management
  API with the defaults ('/' and guest's permissions, which the metadata
  group commits once it formed) and listing every node as running;
- a metadata change: `PUT /api/vhosts/mv-<k>` on node 1 (answered once the
  Raft group committed it), then how long until nodes 2 and 3 list it
  (each polled from its own thread; the resolution is about a millisecond,
  what one HTTP round trip from Python takes), timed from the PUT.

Prints each round's figures and the medians over all of them. Only the
Python standard library is used; the broker binary must exist
(`cargo build --release -p warren`).
"""

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUTH = "Basic " + base64.b64encode(b"guest:guest").decode()


def request(method, url, body=None, timeout=5.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", AUTH)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, b""


def percentile(values, p):
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100.0 * (len(ordered) - 1)))))
    return ordered[k]


class Cluster:
    def __init__(self, binary):
        self.binary = binary
        self.procs = []
        self.dir = os.path.join(ROOT, "target", "cluster-meta")

    def api(self, i):
        return f"http://127.0.0.1:{15781 + i}"

    def start(self):
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        secret = os.path.join(self.dir, "secret")
        with open(secret, "w") as f:
            f.write(base64.b64encode(os.urandom(32)).decode())
        os.chmod(secret, 0o600)
        peers = []
        for i in range(3):
            peers += ["--peer", f"127.0.0.1:{25781 + i}"]
        for i in range(3):
            log = open(os.path.join(self.dir, f"node-{i + 1}.log"), "w")
            self.procs.append(
                subprocess.Popen(
                    [
                        self.binary,
                        "--data-dir", os.path.join(self.dir, f"node-{i + 1}"),
                        "--bind", "127.0.0.1",
                        "--node-name", f"meta-{i + 1}@127.0.0.1",
                        "--port", str(5781 + i),
                        "--management-port", str(15781 + i),
                        "--prometheus-port", str(15791 + i),
                        "--cluster-port", str(25781 + i),
                        "--cluster-secret-file", secret,
                    ]
                    + peers,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )

    def formed(self, i):
        status, body = request("GET", self.api(i) + "/api/permissions", timeout=1.0)
        if status != 200 or b'"guest"' not in body:
            return False
        status, body = request("GET", self.api(i) + "/api/nodes", timeout=1.0)
        if status != 200:
            return False
        nodes = json.loads(body)
        return len(nodes) == 3 and all(n.get("running") for n in nodes)

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []


def watch(api, name, seen, index):
    """Polls `api` until vhost `name` is listed; records when in seen[index]."""
    url = f"{api}/api/vhosts/{name}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, _ = request("GET", url, timeout=1.0)
        if status == 200:
            seen[index] = time.monotonic()
            return
        time.sleep(0.0002)


def round_once(binary, changes):
    cluster = Cluster(binary)
    began = time.monotonic()
    cluster.start()
    try:
        deadline = began + 120
        pending = {0, 1, 2}
        while pending:
            if time.monotonic() > deadline:
                raise SystemExit("the cluster did not form within 120 s; see target/cluster-meta/*.log")
            pending = {i for i in pending if not cluster.formed(i)}
            if pending:
                time.sleep(0.02)
        formation = time.monotonic() - began
        commits, visible = [], []
        for k in range(changes):
            name = f"mv-{k}"
            seen = [None, None]
            watchers = [
                threading.Thread(target=watch, args=(cluster.api(i), name, seen, i - 1))
                for i in (1, 2)
            ]
            sent = time.monotonic()
            for w in watchers:
                w.start()
            status, body = request("PUT", cluster.api(0) + f"/api/vhosts/{name}", {})
            answered = time.monotonic()
            if status != 201:
                raise SystemExit(f"PUT /api/vhosts/{name}: {status} {body!r}")
            for w in watchers:
                w.join()
            if None in seen:
                raise SystemExit(f"vhost {name} not visible on every node within 30 s")
            commits.append(answered - sent)
            visible.append(max(max(seen), answered) - sent)
        return formation, commits, visible
    finally:
        cluster.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "warren"))
    args = parser.parse_args()
    if not os.access(args.bin, os.X_OK):
        raise SystemExit(f"{args.bin} is missing: cargo build --release -p warren")
    formations, commits, visible = [], [], []
    for r in range(args.rounds):
        f, c, v = round_once(args.bin, args.changes)
        formations.append(f)
        commits += c
        visible += v
        print(
            f"round {r + 1}: formation {f:.2f} s; commit p50 {percentile(c, 50) * 1e3:.2f} ms "
            f"p99 {percentile(c, 99) * 1e3:.2f} ms; visible on all nodes p50 "
            f"{percentile(v, 50) * 1e3:.2f} ms p99 {percentile(v, 99) * 1e3:.2f} ms",
            flush=True,
        )
    print(
        f"median formation {statistics.median(formations):.2f} s "
        f"({', '.join(f'{f:.2f}' for f in formations)}); over {len(commits)} changes: "
        f"commit p50 {percentile(commits, 50) * 1e3:.2f} ms p99 {percentile(commits, 99) * 1e3:.2f} ms, "
        f"visible on all nodes p50 {percentile(visible, 50) * 1e3:.2f} ms "
        f"p99 {percentile(visible, 99) * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    sys.exit(main())
