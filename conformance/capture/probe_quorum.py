#!/usr/bin/env python3
"""Record how a real RabbitMQ 3.10 node treats quorum queues' declare
arguments, names and consumers (observed behaviour only).

Output (relative to the repository root):
    crates/queue-store/tests/data/rabbitmq_3_10_quorum.md

Usage (node from README.md running on port 5673):
    python3 probe_quorum.py [--port 5673] [--out PATH]
Run against Warren with --port and --out elsewhere, and diff: the texts
must match. Only the standard library is needed.
"""
import argparse
import datetime
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import probe_queues  # noqa: E402
from amqp_raw import T, bits, shortstr, table  # noqa: E402
from probe_queues import (  # noqa: E402
    Client, ServerClose, Timeout, declare_once, describe_ev, fmt_arg_value, fmt_args,
)

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "..", "crates", "queue-store", "tests", "data",
                   "rabbitmq_3_10_quorum.md")
QQ = ("x-queue-type", "quorum")

# One argument at a time, on a durable quorum queue.
ARG_CASES = [
    ("x-message-ttl", [T("I", 1000)]),
    ("x-expires", [T("I", 60000)]),
    ("x-max-length", [T("I", 5)]),
    ("x-max-length-bytes", [T("I", 100)]),
    ("x-overflow", ["drop-head", "reject-publish", "reject-publish-dlx"]),
    ("x-dead-letter-exchange", ["dlx"]),
    ("x-max-priority", [T("I", 5)]),
    ("x-delivery-limit", [T("I", 5), T("I", -1)]),
    ("x-single-active-consumer", [T("t", True)]),
    ("x-queue-mode", ["lazy"]),
    ("x-queue-master-locator", ["min-masters"]),
    ("x-queue-leader-locator", ["client-local", "balanced", "bogus"]),
    ("x-quorum-initial-group-size", [T("I", 1), T("I", 0), T("I", -1), "3"]),
    ("x-dead-letter-strategy", ["at-most-once", "at-least-once", "bogus"]),
    ("x-max-in-memory-length", [T("I", 10)]),
    ("x-max-in-memory-bytes", [T("I", 100)]),
]


def consume_case(qname, qos_global=None, consume_args=None, no_ack=False):
    """Declare a durable quorum queue, optionally set basic.qos, consume."""
    c = Client()
    try:
        c.declare_queue(qname, durable=True, arguments=[QQ])
        try:
            if qos_global is not None:
                c.rpc(60, 10, struct.pack(">IHB", 0, 10, 1 if qos_global else 0), (60, 11))
            ev = c.rpc(60, 20, struct.pack(">H", 0) + shortstr(qname) + shortstr("ctag")
                       + bits(False, no_ack, False, False) + table(consume_args or {}),
                       (60, 21))
            return describe_ev(ev)
        except ServerClose as e:
            return e.describe()
    finally:
        c.close()
        cleanup(qname)


def cleanup(qname):
    c = Client()
    try:
        c.delete_queue(qname)
    except (ServerClose, Timeout):
        pass
    finally:
        c.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=probe_queues.PORT)
    ap.add_argument("--out", default=OUT)
    a = ap.parse_args()
    probe_queues.PORT = a.port
    out = []
    w = out.append
    w("# RabbitMQ 3.10.8: quorum queues' arguments, names and consumers (observed)")
    w("")
    w("Captured %s by `conformance/capture/probe_quorum.py` against a local single"
      % datetime.date.today().isoformat())
    w("RabbitMQ 3.10.8 node (Debian package), raw AMQP 0-9-1 frames. Every case:")
    w("fresh connection and channel 1; a durable queue with `x-queue-type: S \"quorum\"`")
    w("and the argument shown. Same notation as `rabbitmq_3_10_queue_args.md`.")
    w("")
    w("## 1. Arguments")
    w("")
    w("| argument | value | reply |")
    w("|---|---|---|")
    n = 0
    for key, values in ARG_CASES:
        for v in values:
            n += 1
            res = declare_once("qq-%d" % n, {"durable": True}, [QQ, (key, v)])
            w("| `%s` | `%s` | %s |" % (key, fmt_arg_value(v), res))
    w("")
    w("## 2. Names and properties")
    w("")
    w("| case | reply |")
    w("|---|---|")
    n += 1
    w("| server-named (empty name), durable | %s |"
      % declare_once("", {"durable": True}, [QQ]).replace("amq.gen-", "amq.gen-…"))
    n += 1
    w("| x-dead-letter-routing-key without x-dead-letter-exchange | %s |"
      % declare_once("qq-%d" % n, {"durable": True}, [QQ, ("x-dead-letter-routing-key", "k")]))
    # Redeclares of an existing quorum queue.
    n += 1
    name = "qq-%d" % n
    keep = Client()
    keep.declare_queue(name, durable=True, arguments=[QQ])
    for label, args in [("as classic (`x-queue-type: S \"classic\"`)", [("x-queue-type", "classic")]),
                        ("without x-queue-type", []),
                        ("identical", [QQ])]:
        w("| redeclare `%s` %s | %s |" % (name, label, declare_once(name, {"durable": True}, args)))
    keep.close()
    cleanup(name)
    w("")
    w("## 3. Consumers")
    w("")
    w("| case | reply |")
    w("|---|---|")
    cases = [
        ("basic.consume", {}),
        ("basic.consume after basic.qos global=false", {"qos_global": False}),
        ("basic.consume after basic.qos global=true", {"qos_global": True}),
        ("basic.consume with `x-priority: I 5`", {"consume_args": {"x-priority": T("I", 5)}}),
        ("basic.consume with `x-cancel-on-ha-failover: t true`",
         {"consume_args": {"x-cancel-on-ha-failover": T("t", True)}}),
        ("basic.consume no-ack", {"no_ack": True}),
    ]
    for label, kw in cases:
        n += 1
        w("| %s | %s |" % (label, consume_case("qq-%d" % n, **kw)))
    with open(a.out, "w") as f:
        f.write("\n".join(out) + "\n")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
