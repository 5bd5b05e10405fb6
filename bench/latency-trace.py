#!/usr/bin/env python3
"""One replicated-queue entry's way through a cluster, step by step.

The cluster's hot path has `tracing` events at TRACE level under the target
`latency` (a proposal made and served, `client_write`, the Raft WAL's append,
fsync and flush, AppendEntries sent, received and answered, apply, hand-out,
delivery). Start a cluster with them on, put a little load through it, and
print what every node did in the few milliseconds after one proposal:

    scripts/cluster.sh clean
    WARREN_LOG=info,latency=trace scripts/cluster.sh start
    target/release/warren-perf --uri amqp://guest:guest@127.0.0.1:5672 \
        --declare-uri amqp://guest:guest@127.0.0.1:5673 \
        --consumer-uri amqp://guest:guest@127.0.0.1:5674 --queue-type quorum \
        --persistent --confirm 256 --prefetch 256 --rate 1000 --durable \
        --queue lat --duration 5
    python3 bench/latency-trace.py [--node 1] [--pick 2500] [--span-us 1600]

Times are microseconds after the picked proposal (one machine, one clock).
Heartbeats (AppendEntries of no entries) are left out.
"""
import argparse
import datetime
import pathlib
import re

ap = argparse.ArgumentParser()
ap.add_argument("--dir", default=str(pathlib.Path(__file__).resolve().parent.parent / "target/cluster"))
ap.add_argument("--node", type=int, default=1, help="the node whose proposal is followed")
ap.add_argument("--pick", type=int, help="which of its proposals (default: the middle one)")
ap.add_argument("--span-us", type=float, default=2000)
a = ap.parse_args()

events = []
for log in sorted(pathlib.Path(a.dir).glob("node-*/log")):
    node = int(log.parent.name.split("-")[1])
    for line in log.open(errors="replace"):
        m = re.match(r"(\S+)Z\s+TRACE latency: (.*)", line)
        if m:
            events.append((datetime.datetime.fromisoformat(m.group(1)), node, m.group(2)))
events.sort()
proposals = [k for k, e in enumerate(events) if e[1] == a.node and e[2] == "propose"]
if not proposals:
    raise SystemExit(f"no proposal traced on node {a.node}: was WARREN_LOG=info,latency=trace set?")
k = proposals[a.pick if a.pick is not None else len(proposals) // 2]
t0 = events[k][0]
for t, node, what in events[k:]:
    us = (t - t0).total_seconds() * 1e6
    if us > a.span_us:
        break
    if not what.endswith(" n=0"):
        print(f"{us:7.0f}  node {node}  {what}")
