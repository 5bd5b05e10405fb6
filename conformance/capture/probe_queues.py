#!/usr/bin/env python3
"""Record how a real RabbitMQ 3.10 node treats queue.declare arguments,
queue-level error cases and dead-lettering (observed behaviour only).

Outputs (relative to the repository root):
    crates/queue-store/tests/data/rabbitmq_3_10_queue_args.md
    crates/queue-store/tests/data/rabbitmq_3_10_dead_letter.md

Usage (node from README.md running on port 5673):
    /tmp/warren-capture-venv/bin/python probe_queues.py [--port 5673]
Only the standard library is needed; amqp_raw.py sits next to this file.
"""
import argparse
import datetime
import os
import re
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from amqp_raw import (  # noqa: E402
    FRAME_HEARTBEAT, FRAME_METHOD, Decoder, RawConn, T, basic_publish, bits,
    body_frame, exchange_declare, exchange_delete, frame, header_frame,
    method_frame, method_name, parse_close, queue_bind, queue_declare,
    shortstr, table, FRAME_HEADER,
)

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "crates", "queue-store", "tests", "data")
PORT = 5673

# ------------------------------------------------------------ properties
PROPS = [("content-type", "s"), ("content-encoding", "s"), ("headers", "F"),
         ("delivery-mode", "o"), ("priority", "o"), ("correlation-id", "s"),
         ("reply-to", "s"), ("expiration", "s"), ("message-id", "s"),
         ("timestamp", "T"), ("type", "s"), ("user-id", "s"), ("app-id", "s"),
         ("cluster-id", "s")]


def encode_props(props):
    flags = 0
    out = b""
    for i, (name, kind) in enumerate(PROPS):
        if name not in props:
            continue
        v = props[name]
        flags |= 1 << (15 - i)
        if kind == "s":
            out += shortstr(v)
        elif kind == "F":
            out += table(v)
        elif kind == "o":
            out += struct.pack(">B", v)
        elif kind == "T":
            out += struct.pack(">Q", v)
    return flags, out


def decode_props(hf):
    """hf: complete content-header frame.  Returns (ordered list of (name, value), body_size)."""
    size = struct.unpack_from(">I", hf, 3)[0]
    payload = hf[7:7 + size]
    d = Decoder(payload, 0)
    d.u16()
    d.u16()
    body_size = d.u64()
    flags = d.u16()
    out = []
    for i, (name, kind) in enumerate(PROPS):
        if not flags & (1 << (15 - i)):
            continue
        if kind == "s":
            out.append((name, d.shortstr()))
        elif kind == "F":
            out.append((name, d.table()))
        elif kind == "o":
            out.append((name, d.u8()))
        elif kind == "T":
            out.append((name, d.u64()))
    return out, body_size


def fmt_scalar(v):
    k, x = v.kind, v.value
    if k in ("S", "x"):
        try:
            return '%s "%s"' % (k, x.decode("utf-8"))
        except (UnicodeDecodeError, AttributeError):
            return "%s %r" % (k, x)
    if k == "T":
        return "T %d (%s)" % (x, datetime.datetime.utcfromtimestamp(x).strftime("%Y-%m-%dT%H:%M:%SZ"))
    return "%s %r" % (k, x)


def fmt_table(pairs, indent=0):
    """Render an ordered field table (list of (key, T)) as indented lines."""
    lines = []
    pad = "  " * indent
    for key, v in pairs:
        lines += fmt_named(pad, key, v, indent)
    return lines


def fmt_named(pad, key, v, indent):
    if v.kind == "F":
        return ["%s%s: F (%d fields)" % (pad, key, len(v.value))] + fmt_table(v.value, indent + 1)
    if v.kind == "A":
        lines = ["%s%s: A (%d items)" % (pad, key, len(v.value))]
        for j, item in enumerate(v.value):
            lines += fmt_named(pad + "  ", "[%d]" % j, item, indent + 1)
        return lines
    return ["%s%s: %s" % (pad, key, fmt_scalar(v))]


def fmt_props(props):
    lines = []
    for name, v in props:
        if name == "headers":
            lines.append("headers: F (%d fields)" % len(v))
            lines += fmt_table(v, 1)
        else:
            lines.append("%s: %r" % (name, v))
    return lines


def props_to_publishable(props):
    return {name: v for name, v in props}


# ------------------------------------------------------------ raw client
class ServerClose(Exception):
    def __init__(self, close):
        Exception.__init__(self, close)
        self.close = close

    def describe(self):
        c = self.close
        text = c["text"] if isinstance(c["text"], str) else repr(c["text"])
        text = text.replace("\n", "\\n").replace("|", "\\|")
        return "%s %d `%s` (class %d, method %d = %s)" % (
            c["kind"], c["code"], text, c["class_id"], c["method_id"],
            method_name(c["class_id"], c["method_id"]))


class Timeout(Exception):
    pass


def decode_method_fields(ev):
    d = Decoder(ev["args"], 0)
    cm = (ev["cls"], ev["mth"])
    if cm == (60, 60):
        ev.update(consumer_tag=d.shortstr(), delivery_tag=d.u64(), redelivered=bool(d.u8() & 1),
                  exchange=d.shortstr(), routing_key=d.shortstr())
    elif cm == (60, 71):
        ev.update(delivery_tag=d.u64(), redelivered=bool(d.u8() & 1), exchange=d.shortstr(),
                  routing_key=d.shortstr(), message_count=d.u32())
    elif cm == (60, 50):
        ev.update(reply_code=d.u16(), reply_text=d.shortstr(), exchange=d.shortstr(),
                  routing_key=d.shortstr())
    elif cm in ((60, 80), (60, 120)):
        tag = d.u64()
        b = d.u8()
        ev.update(delivery_tag=tag, multiple=bool(b & 1), requeue=bool(b & 2), flag_byte=b)
    elif cm == (50, 11):
        ev.update(queue=d.shortstr(), message_count=d.u32(), consumer_count=d.u32())
    elif cm in ((50, 31), (50, 41)):
        ev.update(message_count=d.u32())
    elif cm in ((60, 21), (60, 31)):
        ev.update(consumer_tag=d.shortstr())


class Client:
    def __init__(self, port=None):
        self.c = RawConn(port=port or PORT)
        self.c.handshake()
        self.ch = 1
        self.c.open_channel(self.ch)
        self.stash = []

    # -- framing
    def send(self, cls, mth, args=b""):
        self.c.send(method_frame(self.ch, cls, mth, args))

    def _frame(self, timeout):
        while True:
            fr = self.c.recv_frame(timeout)
            if fr is None or fr[0] != FRAME_HEARTBEAT:
                return fr

    def _read(self, timeout):
        fr = self._frame(timeout)
        if fr is None:
            return None
        size = struct.unpack_from(">I", fr, 3)[0]
        payload = fr[7:7 + size]
        ch = struct.unpack_from(">H", fr, 1)[0]
        if fr[0] != FRAME_METHOD:
            return {"name": "unexpected-frame-%d" % fr[0], "cls": 0, "mth": 0, "ch": ch}
        cls, mth = struct.unpack_from(">HH", payload, 0)
        ev = {"name": method_name(cls, mth), "cls": cls, "mth": mth, "args": payload[4:], "ch": ch}
        decode_method_fields(ev)
        if (cls, mth) in ((60, 60), (60, 71), (60, 50)):
            hf = self._frame(timeout)
            props, bsize = decode_props(hf)
            body = b""
            while len(body) < bsize:
                bf = self._frame(timeout)
                body += bf[7:-1]
            ev.update(header_frame=hf, props=props, body=body)
        cl = parse_close(fr)
        if cl:
            ev["close"] = cl
            try:
                if cl["kind"] == "connection.close":
                    self.c.send(method_frame(0, 10, 51))
                else:
                    self.c.send(method_frame(cl["channel"], 20, 41))
            except OSError:
                pass
        return ev

    def rpc(self, cls, mth, args, reply, timeout=5.0):
        self.send(cls, mth, args)
        return self.wait(reply, timeout)

    def wait(self, reply, timeout=5.0):
        deadline = time.time() + timeout
        while True:
            ev = self._read(max(0.01, deadline - time.time()))
            if ev is None:
                raise Timeout("waiting for %s" % method_name(*reply))
            if "close" in ev:
                raise ServerClose(ev["close"])
            if (ev["cls"], ev["mth"]) == tuple(reply):
                return ev
            self.stash.append(ev)

    def next_event(self, names, timeout=3.0):
        for i, ev in enumerate(self.stash):
            if ev["name"] in names:
                return self.stash.pop(i)
        deadline = time.time() + timeout
        while True:
            rem = deadline - time.time()
            if rem <= 0:
                return None
            ev = self._read(rem)
            if ev is None:
                return None
            if "close" in ev:
                raise ServerClose(ev["close"])
            if ev["name"] in names:
                return ev
            self.stash.append(ev)

    def drain(self, names, timeout=1.0):
        got = []
        while True:
            ev = self.next_event(names, timeout)
            if ev is None:
                return got
            got.append(ev)

    def reopen(self):
        self.ch += 1
        self.c.open_channel(self.ch)

    def close(self):
        try:
            self.c.send(method_frame(0, 10, 50, struct.pack(">H", 200) + shortstr("bye")
                                     + struct.pack(">HH", 0, 0)))
            self.c.recv_frame(2)
        except OSError:
            pass
        self.c.close()

    # -- methods
    def declare_queue(self, name, passive=False, durable=False, exclusive=False,
                      auto_delete=False, arguments=None):
        return self.rpc(50, 10, queue_declare(name, passive, durable, exclusive, auto_delete,
                                              False, arguments), (50, 11))

    def declare_exchange(self, name, etype, arguments=None):
        return self.rpc(40, 10, exchange_declare(name, etype, arguments=arguments), (40, 11))

    def bind(self, queue, exchange, rk=""):
        return self.rpc(50, 20, queue_bind(queue, exchange, rk), (50, 21))

    def delete_queue(self, name, if_unused=False, if_empty=False):
        return self.rpc(50, 40, struct.pack(">H", 0) + shortstr(name)
                        + bits(if_unused, if_empty, False), (50, 41))

    def delete_exchange(self, name):
        return self.rpc(40, 20, exchange_delete(name), (40, 21))

    def purge(self, name):
        return self.rpc(50, 30, struct.pack(">H", 0) + shortstr(name) + bits(False), (50, 31))

    def publish(self, exchange, rk, body=b"", props=None, mandatory=False):
        flags, pbytes = encode_props(props or {})
        body = body.encode() if isinstance(body, str) else body
        data = (method_frame(self.ch, 60, 40, basic_publish(exchange, rk, mandatory))
                + header_frame(self.ch, len(body), flags=flags, props=pbytes))
        if body:
            data += body_frame(self.ch, body)
        self.c.send(data)

    def get(self, queue, no_ack=False):
        self.send(60, 70, struct.pack(">H", 0) + shortstr(queue) + bits(no_ack))
        while True:
            ev = self._read(5.0)
            if ev is None:
                raise Timeout("basic.get")
            if "close" in ev:
                raise ServerClose(ev["close"])
            if ev["name"] in ("basic.get-ok", "basic.get-empty"):
                return ev if ev["name"] == "basic.get-ok" else None
            self.stash.append(ev)

    def consume(self, queue, tag="", no_ack=False, exclusive=False, arguments=None):
        return self.rpc(60, 20, struct.pack(">H", 0) + shortstr(queue) + shortstr(tag)
                        + bits(False, no_ack, exclusive, False) + table(arguments or {}),
                        (60, 21))

    def cancel(self, tag):
        return self.rpc(60, 30, shortstr(tag) + bits(False), (60, 31))

    def qos(self, count):
        return self.rpc(60, 10, struct.pack(">IHB", 0, count, 0), (60, 11))

    def ack(self, tag, multiple=False):
        self.send(60, 80, struct.pack(">Q", tag) + bits(multiple))

    def reject(self, tag, requeue):
        self.send(60, 90, struct.pack(">Q", tag) + bits(requeue))

    def nack(self, tag, requeue, multiple=False):
        self.send(60, 120, struct.pack(">Q", tag) + bits(multiple, requeue))

    def confirm_select(self):
        return self.rpc(85, 10, bits(False), (85, 11))

    def sync(self):
        """Round-trip (basic.qos prefetch 0) to make sure earlier async methods were processed."""
        return self.rpc(60, 10, struct.pack(">IHB", 0, 0, 0), (60, 11))

    def qcount(self, name):
        return self.declare_queue(name, passive=True)["message_count"]


# ------------------------------------------------------------ formatting
def fmt_arg_value(v):
    if isinstance(v, T):
        if v.kind in ("S", "x") and isinstance(v.value, str):
            return '%s "%s"' % (v.kind, v.value)
        return "%s %r" % (v.kind, v.value)
    if isinstance(v, bool):
        return "t %r" % v
    if isinstance(v, int):
        return ("I %d" if -2**31 <= v < 2**31 else "l %d") % v
    if isinstance(v, float):
        return "d %r" % v
    if isinstance(v, str):
        return 'S "%s"' % v
    return repr(v)


def fmt_args(args):
    if not args:
        return "{}"
    items = args.items() if isinstance(args, dict) else args
    return "{" + ", ".join("%s: %s" % (k, fmt_arg_value(v)) for k, v in items) + "}"


def describe_ev(ev):
    if ev is None:
        return "nothing"
    if ev["name"] == "queue.declare-ok":
        return "declare-ok (queue=%s, messages=%d, consumers=%d)" % (
            ev["queue"], ev["message_count"], ev["consumer_count"])
    if "message_count" in ev and ev["name"] in ("queue.delete-ok", "queue.purge-ok"):
        return "%s (message-count=%d)" % (ev["name"], ev["message_count"])
    return ev["name"]


def attempt(fn):
    """Run fn() -> event/str; return a one-line description of the server reply."""
    try:
        r = fn()
        return r if isinstance(r, str) else describe_ev(r)
    except ServerClose as e:
        return e.describe()
    except Timeout as e:
        return "timeout (%s)" % e


def cleanup(queues=(), exchanges=()):
    c = Client()
    for q in queues:
        try:
            c.delete_queue(q)
        except ServerClose:
            c.reopen()
    for x in exchanges:
        try:
            c.delete_exchange(x)
        except ServerClose:
            c.reopen()
    c.close()


# ------------------------------------------------------------ part 1: arguments
ARG_CASES = [
    ("x-message-ttl", [T("I", -1), T("I", 0), T("I", 1000), "1000", T("d", 1.5), T("f", 1.5),
                       T("l", 1000), T("B", 100), T("b", 100), T("s", 1000), T("u", 1000),
                       T("i", 1000), T("l", 2**32 - 1), T("l", 2**32), T("l", 315360000000),
                       T("l", 315360000001), T("l", 2**40), T("t", True)]),
    ("x-expires", [T("I", 0), T("I", -5), T("I", 1000), "1000", T("l", 1000), T("B", 1),
                   T("l", 315360000000), T("l", 315360000001)]),
    ("x-max-length", [T("I", -1), T("I", 0), T("I", 10), "10", T("l", 10), T("B", 10),
                      T("l", 2**62)]),
    ("x-max-length-bytes", [T("I", -1), T("I", 0), T("I", 100), "100"]),
    ("x-overflow", ["drop-head", "reject-publish", "reject-publish-dlx", "bogus", T("I", 1),
                    T("x", "drop-head"), ""]),
    ("x-dead-letter-exchange", ["dlx-does-not-exist", "", T("I", 1), T("x", "dlx")]),
    ("x-max-priority", [T("I", 0), T("I", 1), T("I", 10), T("I", 255), T("I", 256), T("I", -1),
                        "5", T("B", 5), T("l", 5), T("l", 2**40)]),
    ("x-delivery-limit", [T("I", 5), "5"]),
    ("x-single-active-consumer", [T("t", True), T("t", False), "yes", T("I", 1)]),
    ("x-queue-mode", ["lazy", "default", "bogus", T("I", 1)]),
    ("x-queue-type", ["classic", "quorum", "stream", "bogus", T("I", 1)]),
    ("x-foo", ["bar", T("I", 1)]),
    ("foo", ["bar"]),
    ("x-queue-master-locator", ["min-masters", "bogus"]),
]

# cases with several arguments / flags: (label, flags dict, args list-of-pairs)
MULTI_CASES = [
    ("x-dead-letter-routing-key without x-dead-letter-exchange", {},
     [("x-dead-letter-routing-key", "k")]),
    ("x-dead-letter-routing-key int (with DLX)", {},
     [("x-dead-letter-exchange", "dlx"), ("x-dead-letter-routing-key", T("I", 1))]),
    ("x-dead-letter-routing-key S (with DLX)", {},
     [("x-dead-letter-exchange", "dlx"), ("x-dead-letter-routing-key", "k")]),
    ("x-queue-type quorum, durable", {"durable": True}, [("x-queue-type", "quorum")]),
    ("x-queue-type quorum, durable, exclusive", {"durable": True, "exclusive": True},
     [("x-queue-type", "quorum")]),
    ("x-queue-type quorum, durable, auto_delete", {"durable": True, "auto_delete": True},
     [("x-queue-type", "quorum")]),
    ("x-queue-type quorum, durable, x-delivery-limit 5", {"durable": True},
     [("x-queue-type", "quorum"), ("x-delivery-limit", T("I", 5))]),
    ("x-queue-type quorum, durable, x-max-priority 5", {"durable": True},
     [("x-queue-type", "quorum"), ("x-max-priority", T("I", 5))]),
    ("x-queue-type quorum, durable, x-overflow drop-head", {"durable": True},
     [("x-queue-type", "quorum"), ("x-overflow", "drop-head")]),
    ("x-queue-type quorum, durable, x-overflow reject-publish-dlx", {"durable": True},
     [("x-queue-type", "quorum"), ("x-overflow", "reject-publish-dlx")]),
    ("x-queue-type stream, durable", {"durable": True}, [("x-queue-type", "stream")]),
    ("two invalid args (x-message-ttl -1, x-max-length -1)", {},
     [("x-message-ttl", T("I", -1)), ("x-max-length", T("I", -1))]),
    ("two invalid args reversed (x-max-length -1, x-message-ttl -1)", {},
     [("x-max-length", T("I", -1)), ("x-message-ttl", T("I", -1))]),
    ("durable classic with x-queue-type classic", {"durable": True},
     [("x-queue-type", "classic")]),
]


def declare_once(qname, flags, args):
    c = Client()
    try:
        try:
            ev = c.declare_queue(qname, arguments=args, **flags)
            desc = describe_ev(ev).replace("queue=%s, " % qname, "")
            try:
                c.delete_queue(qname)
            except ServerClose:
                pass
            return desc
        except ServerClose as e:
            return e.describe()
    finally:
        c.close()


def part1():
    out = []
    w = out.append
    w("# RabbitMQ 3.10.8: queue.declare arguments and queue-level errors (observed)")
    w("")
    w("Captured %s by `conformance/capture/probe_queues.py` against a local"
      % datetime.date.today().isoformat())
    w("RabbitMQ 3.10.8 node (Debian package, Erlang/OTP 25), raw AMQP 0-9-1 frames.")
    w("Every case: fresh connection + channel 1, classic queue, non-durable,")
    w("non-exclusive, non-auto-delete unless stated.  Argument values are shown")
    w("with their field-table type letter (`I` signed 32, `l` signed 64, `B` unsigned")
    w("8, `b` signed 8, `s` signed 16, `u` unsigned 16, `i` unsigned 32, `d` double,")
    w("`f` float, `S` long string, `x` byte array, `t` boolean).  Error replies are")
    w("`kind code \\`reply-text\\` (class, method)`.  A newline inside a reply-text is shown as `\\n`.")
    w("Queue names `qargs-N` are per-case names chosen by the script (they appear in the texts).")
    w("")
    w("Notes: the `x-queue-master-locator: S \"bogus\"` case is the only one where the server's")
    w("channel crashed (its log shows an internal error), giving connection.close 541 instead of a")
    w("channel.close.")
    w("Of two invalid arguments, the reported one does not follow table order (section 2).")
    w("")
    w("## 1. Single arguments")
    w("")
    w("| argument | value | reply |")
    w("|---|---|---|")
    n = 0
    for key, values in ARG_CASES:
        for v in values:
            n += 1
            flags = {}
            if key == "x-queue-type" and v in ("quorum", "stream"):
                flags = {}  # deliberately non-durable
            res = declare_once("qargs-%d" % n, flags, [(key, v)])
            w("| `%s` | `%s` | %s |" % (key, fmt_arg_value(v), res))
    w("")
    w("## 2. Argument combinations / flags")
    w("")
    w("| case | flags | arguments | reply |")
    w("|---|---|---|---|")
    for label, flags, args in MULTI_CASES:
        n += 1
        res = declare_once("qargs-%d" % n, flags, args)
        w("| %s | %s | `%s` | %s |" % (label, ", ".join("%s=%s" % kv for kv in flags.items())
                                        or "-", fmt_args(args), res))
    # redeclare
    w("")
    w("## 3. Redeclaring an existing queue")
    w("")
    base_args = [("x-message-ttl", T("I", 1000)), ("x-max-length", T("I", 10))]
    w("Existing queue `redecl` declared (and kept alive) on another connection with")
    w("durable=false, exclusive=false, auto_delete=false, arguments `%s`." % fmt_args(base_args))
    w("Each redeclare below is on a fresh connection.")
    w("")
    w("| redeclare with | reply |")
    w("|---|---|")
    owner = Client()
    cleanup(queues=["redecl"])
    owner.declare_queue("redecl", arguments=base_args)
    redecl_cases = [
        ("identical", {}, base_args),
        ("durable=true", {"durable": True}, base_args),
        ("exclusive=true", {"exclusive": True}, base_args),
        ("auto_delete=true", {"auto_delete": True}, base_args),
        ("x-message-ttl 2000", {}, [("x-message-ttl", T("I", 2000)), ("x-max-length", T("I", 10))]),
        ("x-message-ttl 1000 as `l` (same value, other type)", {},
         [("x-message-ttl", T("l", 1000)), ("x-max-length", T("I", 10))]),
        ("x-message-ttl 1000 as `S \"1000\"`", {},
         [("x-message-ttl", "1000"), ("x-max-length", T("I", 10))]),
        ("x-max-length 20", {}, [("x-message-ttl", T("I", 1000)), ("x-max-length", T("I", 20))]),
        ("extra x-expires 5000", {}, base_args + [("x-expires", T("I", 5000))]),
        ("extra x-dead-letter-exchange \"dlx\"", {}, base_args + [("x-dead-letter-exchange", "dlx")]),
        ("extra x-overflow \"drop-head\" (the default)", {}, base_args + [("x-overflow", "drop-head")]),
        ("extra x-foo \"bar\" (unknown)", {}, base_args + [("x-foo", "bar")]),
        ("extra foo \"bar\" (non-x)", {}, base_args + [("foo", "bar")]),
        ("only x-message-ttl (x-max-length omitted)", {}, [("x-message-ttl", T("I", 1000))]),
        ("no arguments at all", {}, []),
        ("same args, reversed order", {}, list(reversed(base_args))),
        ("passive, durable=true + other args", {"passive": True, "durable": True},
         [("x-message-ttl", T("I", 5))]),
    ]
    for label, flags, args in redecl_cases:
        c = Client()
        res = attempt(lambda: c.declare_queue("redecl", arguments=args, **flags))
        c.close()
        w("| %s: `%s` | %s |" % (label, fmt_args(args), res))
    owner.delete_queue("redecl")
    owner.close()
    # redeclare of a queue declared with x-queue-mode lazy / without
    cleanup(queues=["redecl2"])
    owner = Client()
    owner.declare_queue("redecl2", durable=True, arguments=[("x-queue-mode", "lazy")])
    for label, flags, args in [
            ("(queue durable, `{x-queue-mode: S \"lazy\"}`) redeclare with durable=false",
             {}, [("x-queue-mode", "lazy")]),
            ("(queue durable, `{x-queue-mode: S \"lazy\"}`) redeclare durable, without x-queue-mode",
             {"durable": True}, []),
            ("(queue durable, `{x-queue-mode: S \"lazy\"}`) redeclare durable, x-queue-mode \"default\"",
             {"durable": True}, [("x-queue-mode", "default")])]:
        c = Client()
        res = attempt(lambda: c.declare_queue("redecl2", arguments=args, **flags))
        c.close()
        w("| %s | %s |" % (label, res))
    owner.delete_queue("redecl2")
    owner.close()

    # misc errors
    w("")
    w("## 4. Other queue / consumer / ack errors")
    w("")
    w("| case | reply |")
    w("|---|---|")
    cleanup(queues=["missing-q", "amq.foo", "xq", "cq", "cq2", "dq", "dq2", "ackq"])

    def row(label, res):
        w("| %s | %s |" % (label, res))

    def fresh(fn):
        c = Client()
        r = attempt(lambda: fn(c))
        c.close()
        return r

    row("passive declare of missing queue `missing-q`",
        fresh(lambda c: c.declare_queue("missing-q", passive=True)))
    row("declare queue `amq.foo`", fresh(lambda c: c.declare_queue("amq.foo")))
    row("passive declare queue `amq.foo` (missing)",
        fresh(lambda c: c.declare_queue("amq.foo", passive=True)))
    row("declare queue `amq.gen-x`", fresh(lambda c: c.declare_queue("amq.gen-x")))
    row("declare queue `` (server-named)",
        re.sub(r"amq\.gen-[A-Za-z0-9_-]+", "amq.gen-<22 random chars>",
               fresh(lambda c: c.declare_queue(""))))
    row("passive declare of queue `` (no queue on channel)",
        fresh(lambda c: c.declare_queue("", passive=True)))

    # exclusive queue owned by another connection
    a = Client()
    a.declare_queue("xq", exclusive=True)
    row("declare (exclusive=true) of exclusive queue `xq` owned by another connection",
        fresh(lambda c: c.declare_queue("xq", exclusive=True)))
    row("declare (exclusive=false) of exclusive queue `xq` owned by another connection",
        fresh(lambda c: c.declare_queue("xq")))
    row("passive declare of `xq` from another connection",
        fresh(lambda c: c.declare_queue("xq", passive=True)))
    row("basic.consume on `xq` from another connection", fresh(lambda c: c.consume("xq")))
    row("basic.get on `xq` from another connection", fresh(lambda c: c.get("xq")))
    row("queue.purge of `xq` from another connection", fresh(lambda c: c.purge("xq")))
    row("queue.delete of `xq` from another connection", fresh(lambda c: c.delete_queue("xq")))
    row("queue.bind of `xq` to amq.direct from another connection",
        fresh(lambda c: c.bind("xq", "amq.direct", "k")))
    row("owner redeclares `xq` with exclusive=false (same connection)",
        attempt(lambda: a.declare_queue("xq")))
    a.close()
    time.sleep(0.3)
    row("passive declare of `xq` after its owner connection closed",
        fresh(lambda c: c.declare_queue("xq", passive=True)))

    # exclusive consumers
    a = Client()
    a.declare_queue("cq")
    a.consume("cq", tag="first")
    row("basic.consume exclusive=true on `cq` while another connection has a normal consumer",
        fresh(lambda c: c.consume("cq", exclusive=True)))
    row("same, from the same channel as the existing consumer",
        attempt(lambda: a.consume("cq", tag="second", exclusive=True)))
    a.close()
    a = Client()
    a.declare_queue("cq2")
    a.consume("cq2", tag="excl", exclusive=True)
    row("basic.consume (non-exclusive) on `cq2` which has an exclusive consumer (other connection)",
        fresh(lambda c: c.consume("cq2")))
    row("basic.consume exclusive=true on `cq2` which has an exclusive consumer (other connection)",
        fresh(lambda c: c.consume("cq2", exclusive=True)))
    row("basic.consume on `cq2` from the same channel as the exclusive consumer",
        attempt(lambda: a.consume("cq2", tag="again")))
    row("basic.get on `cq2` (has exclusive consumer) from another connection",
        fresh(lambda c: c.get("cq2") or "basic.get-empty"))
    a.close()
    a = Client()
    a.declare_queue("cq3", auto_delete=False)
    a.consume("cq3", tag="dup")
    row("basic.consume with a consumer tag already used on the channel",
        attempt(lambda: a.consume("cq3", tag="dup")))
    a.close()
    cleanup(queues=["cq", "cq2", "cq3"])

    # delete if-unused / if-empty
    a = Client()
    a.declare_queue("dq")
    a.consume("dq", tag="c1")
    row("queue.delete if-unused=true on `dq` with 1 consumer (other connection)",
        fresh(lambda c: c.delete_queue("dq", if_unused=True)))
    row("queue.delete if-unused=true on `dq` with 1 consumer (same channel as consumer)",
        attempt(lambda: a.delete_queue("dq", if_unused=True)))
    a.close()
    a = Client()
    a.declare_queue("dq2")
    a.publish("", "dq2", "m1")
    a.publish("", "dq2", "m2")
    a.sync()
    time.sleep(0.1)
    row("queue.delete if-empty=true on `dq2` with 2 messages",
        fresh(lambda c: c.delete_queue("dq2", if_empty=True)))
    row("queue.delete if-unused=true if-empty=true on `dq2` with 2 messages, 0 consumers",
        fresh(lambda c: c.delete_queue("dq2", if_unused=True, if_empty=True)))
    row("queue.delete (no flags) on `dq2` with 2 messages",
        fresh(lambda c: c.delete_queue("dq2")))
    a.close()
    row("queue.delete of missing queue", fresh(lambda c: c.delete_queue("missing-q")))
    row("queue.delete if-unused if-empty of missing queue",
        fresh(lambda c: c.delete_queue("missing-q", if_unused=True, if_empty=True)))
    row("queue.purge of missing queue", fresh(lambda c: c.purge("missing-q")))
    row("basic.get on missing queue", fresh(lambda c: c.get("missing-q")))
    row("basic.consume on missing queue", fresh(lambda c: c.consume("missing-q")))
    row("queue.bind of missing queue to amq.direct",
        fresh(lambda c: c.bind("missing-q", "amq.direct", "k")))
    row("queue.bind of existing queue to missing exchange",
        fresh(lambda c: (c.declare_queue("ackq"), c.bind("ackq", "no-such-x", "k"))[1]))

    # acks
    def ack_case(c, action):
        c.declare_queue("ackq")
        c.purge("ackq")
        c.publish("", "ackq", "a")
        c.sync()
        time.sleep(0.05)
        g = c.get("ackq")
        action(c, g["delivery_tag"])
        c.sync()
        return "no error (round-trip basic.qos answered)"

    row("basic.ack delivery-tag 99 (only tag 1 outstanding)",
        fresh(lambda c: ack_case(c, lambda c, t: c.ack(99))))
    row("basic.ack of tag 1 twice",
        fresh(lambda c: ack_case(c, lambda c, t: (c.ack(t), c.ack(t)))))
    row("basic.ack delivery-tag 0 multiple=false",
        fresh(lambda c: ack_case(c, lambda c, t: c.ack(0))))
    row("basic.ack delivery-tag 0 multiple=true (acks all outstanding)",
        fresh(lambda c: ack_case(c, lambda c, t: c.ack(0, multiple=True))))
    row("basic.ack delivery-tag 99 multiple=true",
        fresh(lambda c: ack_case(c, lambda c, t: c.ack(99, multiple=True))))
    row("basic.reject delivery-tag 99 requeue=true",
        fresh(lambda c: ack_case(c, lambda c, t: c.reject(99, True))))
    row("basic.reject delivery-tag 99 requeue=false",
        fresh(lambda c: ack_case(c, lambda c, t: c.reject(99, False))))
    row("basic.nack delivery-tag 99",
        fresh(lambda c: ack_case(c, lambda c, t: c.nack(99, True))))
    row("basic.reject of tag 1 after basic.ack of tag 1",
        fresh(lambda c: ack_case(c, lambda c, t: (c.ack(t), c.reject(t, False)))))
    row("basic.ack of a tag received with no_ack basic.get",
        fresh(lambda c: (c.declare_queue("ackq"), c.publish("", "ackq", "a"), c.sync(),
                         time.sleep(0.05), c.ack(c.get("ackq", no_ack=True)["delivery_tag"]),
                         c.sync(), "no error")[-1]))
    def pub_exp(c, exp):
        c.declare_queue("ackq")
        c.publish("", "ackq", "e", {"expiration": exp})
        c.sync()
        return "accepted (no error after round-trip)"

    for exp in ("abc", "-1", "1.5", "", " 100", "0", "315360000000", "315360000001",
                "18446744073709551616"):
        row("basic.publish with expiration property `%r`" % exp,
            fresh(lambda c: pub_exp(c, exp)))
    cleanup(queues=["ackq", "dq", "dq2"])
    return out


# ------------------------------------------------------------ part 2: dead letters
SUMMARY = [
    "- Dead-lettering adds `x-death` (A of F), `x-first-death-exchange`, `x-first-death-queue`,",
    "  `x-first-death-reason` (all S) to `headers`; the whole top-level headers table comes out",
    "  sorted by key (byte order, so `CC` < `aa-first` < `x-death` < `zz-last`).",
    "- An x-death entry has `count` (l), `reason` (S: rejected / expired / maxlen), `queue` (S),",
    "  `time` (T, seconds), `exchange` (S, the exchange the message was last published to, `\"\"`",
    "  for the default exchange), `routing-keys` (A of S: routing key followed by the CC values;",
    "  never BCC) and, only if the message had an `expiration` property, `original-expiration` (S).",
    "  The dead-lettered message no longer has the `expiration` property.",
    "- Key order inside an entry: the very first entry (message had no x-death yet) is",
    "  count, reason, queue, time, exchange, routing-keys[, original-expiration]; every entry",
    "  added to an existing x-death, and every updated entry, is sorted by key:",
    "  count, exchange[, original-expiration], queue, reason, routing-keys, time.",
    "- Entries are keyed by {queue, reason}: a repeat increments `count`, keeps the original",
    "  `time`/`exchange`/`routing-keys`, and moves the entry to the front (most recent first);",
    "  an update does not add `original-expiration`.  x-first-death-* never change.",
    "- Routing of the dead-lettered message: without x-dead-letter-routing-key it is",
    "  re-published with its original routing key plus the CC and BCC keys (the BCC header",
    "  itself was already stripped at publish time); with x-dead-letter-routing-key it goes",
    "  only to that key, and the CC header is removed from the message.",
    "- Cycles: a message is dropped (for that queue) when it would re-enter a queue through a",
    "  cycle containing only expiries; a cycle containing a rejection is allowed (see f1, f4).",
    "- Queue `reject-publish[-dlx]`: publisher gets basic.nack for refused messages; only",
    "  `reject-publish-dlx` dead-letters them (reason `maxlen`).",
]


def dump_msg(ev, title, hexdump=False):
    lines = ["**%s**" % title, "", "```"]
    lines.append("method: %s" % ev["name"])
    lines.append("exchange: %r" % ev["exchange"])
    lines.append("routing-key: %r" % ev["routing_key"])
    lines.append("redelivered: %r" % ev["redelivered"])
    lines.append("body: %r" % ev["body"])
    names = [n for n, _ in ev["props"]]
    lines.append("properties present: %s" % ", ".join(names))
    lines += fmt_props(ev["props"])
    lines.append("```")
    if hexdump:
        hf = ev["header_frame"]
        lines += ["", "Raw content-header frame (hex, 32 bytes per line):", "", "```"]
        h = hf.hex()
        lines += [h[i:i + 64] for i in range(0, len(h), 64)]
        lines.append("```")
    lines.append("")
    return lines


def deliveries(c, n, timeout=3.0):
    got = []
    for _ in range(n):
        ev = c.next_event(("basic.deliver",), timeout)
        if ev is None:
            break
        got.append(ev)
    return got


def part2():
    out = []
    w = out.append
    w("# RabbitMQ 3.10.8: dead-lettering and related queue behaviour (observed)")
    w("")
    w("Captured %s by `conformance/capture/probe_queues.py` against a local" %
      datetime.date.today().isoformat())
    w("RabbitMQ 3.10.8 node, raw AMQP 0-9-1 frames; classic non-durable queues.")
    w("Header tables are printed in wire order with the field type letter of every")
    w("value (`l` = signed 64-bit, `T` = timestamp (seconds), `S` = long string,")
    w("`A` = array, `F` = table).  Timestamps are those of the capture run.")
    w("")
    w("Summary of what the sections below show:")
    w("")
    for line in SUMMARY:
        w(line)
    w("")

    # ---------------- a
    qs = ["q1", "q1cc", "dlq", "q1b", "dlq_b", "dlq_b2", "q2", "dlq2", "dlq2_old", "q2b", "dlq2b",
          "q3", "dlq3", "q4", "dlq4", "q5", "dlq5", "q_a", "q_b", "f.tap", "f2.c", "f2.d",
          "f2.tap", "f3.self", "q_p", "q_h", "q_h2", "q_i", "q_i2", "dlq_i2", "q1bcc"]
    xs = ["src", "dlx", "dlx_b", "dlx_b2", "dlx2", "dlx3", "dlx4", "dlx5", "ex_to_a", "ex_to_b",
          "ex_to_c", "ex_to_d", "dlx_i2"]
    cleanup(qs, xs)

    w("## a. Rejected message (basic.reject requeue=false)")
    w("")
    c = Client()
    c.declare_exchange("src", "direct")
    c.declare_exchange("dlx", "fanout")
    c.declare_queue("q1", arguments=[("x-dead-letter-exchange", "dlx")])
    c.declare_queue("q1cc")
    c.declare_queue("dlq")
    c.bind("q1", "src", "rk")
    c.bind("q1cc", "src", "cc1")
    c.bind("dlq", "dlx", "")
    pub_props = {"content-type": "text/plain", "delivery-mode": 2, "message-id": "m-a",
                 "expiration": "60000",
                 "headers": [("CC", T("A", [T("S", "cc1")])), ("custom", T("S", "v"))]}
    w("Setup: exchange `src` (direct), exchange `dlx` (fanout); queue `q1` with")
    w("`{x-dead-letter-exchange: S \"dlx\"}` bound to `src` with `rk`; queue `q1cc` bound")
    w("to `src` with `cc1`; queue `dlq` bound to `dlx`.  Published to `src` with routing")
    w("key `rk`, properties: content-type `text/plain`, delivery-mode 2, message-id `m-a`,")
    w("expiration `\"60000\"`, headers `{CC: A[S \"cc1\"], custom: S \"v\"}`.")
    w("Then basic.get (no_ack=false) from `q1` and basic.reject requeue=false.")
    w("")
    c.publish("src", "rk", "body-a", pub_props)
    c.sync()
    time.sleep(0.1)
    w("- message count `q1`=%d, `q1cc`=%d after publish" % (c.qcount("q1"), c.qcount("q1cc")))
    g = c.get("q1")
    w("- basic.get-ok from q1: routing-key %r, headers as stored: %s" % (
        g["routing_key"], "; ".join(l.strip() for l in fmt_props(g["props"]) if True)))
    c.reject(g["delivery_tag"], False)
    c.consume("dlq", tag="dl-a", no_ack=True)
    d = deliveries(c, 1)
    w("")
    if d:
        out.extend(dump_msg(d[0], "Delivered from dlq (consumer on dlq)", hexdump=True))
    else:
        w("NOTHING delivered to dlq")
    c.close()

    # a2: BCC header and CC with 2 entries
    c = Client()
    c.declare_queue("q1bcc")
    c.bind("q1bcc", "src", "bcc1")
    c.purge("dlq")
    c.publish("src", "rk", "body-a2", {"headers": [("zz-last", T("S", "z")),
                                                   ("CC", T("A", [T("S", "cc1"), T("S", "cc2")])),
                                                   ("BCC", T("A", [T("S", "bcc1")])),
                                                   ("aa-first", T("S", "a"))]})
    c.sync()
    time.sleep(0.1)
    w("### a2. Same path, headers (wire order) `{zz-last: S \"z\", CC: A[S \"cc1\", S \"cc2\"], BCC: A[S \"bcc1\"], aa-first: S \"a\"}`, no expiration")
    w("")
    w("(queue `q1bcc` bound to `src` with `bcc1`; counts after publish: q1=%d q1cc=%d q1bcc=%d)"
      % (c.qcount("q1"), c.qcount("q1cc"), c.qcount("q1bcc")))
    w("")
    g = c.get("q1")
    out.extend(dump_msg(g, "basic.get-ok from q1 (before rejection)"))
    c.reject(g["delivery_tag"], False)
    c.consume("dlq", tag="dl-a2", no_ack=True)
    d = deliveries(c, 1)
    if d:
        out.extend(dump_msg(d[0], "Delivered from dlq"))
    c.close()
    cleanup(["q1cc", "q1bcc"])

    # a3: are CC routing keys used again when dead-lettering (no x-dead-letter-routing-key)?
    w("### a3. Are the CC keys used for routing the dead-lettered message?")
    w("")
    w("`q1c` `{x-dead-letter-exchange: S \"dlx_a3\"}` (dlx_a3 is *direct*); `dlq_a3_rk` bound to dlx_a3 with")
    w("`q1c`, `dlq_a3_cc` bound with `cc1`, `dlq_a3_bcc` bound with `bcc1`.  Published to default exchange")
    w("rk `q1c` with headers `{CC: A[S \"cc1\"], BCC: A[S \"bcc1\"]}`; basic.get + reject(requeue=false).")
    w("")
    cleanup(["q1c", "dlq_a3_rk", "dlq_a3_cc", "dlq_a3_bcc"], ["dlx_a3"])
    c = Client()
    c.declare_exchange("dlx_a3", "direct")
    c.declare_queue("q1c", arguments=[("x-dead-letter-exchange", "dlx_a3")])
    for qn, k in (("dlq_a3_rk", "q1c"), ("dlq_a3_cc", "cc1"), ("dlq_a3_bcc", "bcc1")):
        c.declare_queue(qn)
        c.bind(qn, "dlx_a3", k)
    c.publish("", "q1c", "body-a3", {"headers": [("CC", T("A", [T("S", "cc1")])),
                                                 ("BCC", T("A", [T("S", "bcc1")]))]})
    c.sync()
    time.sleep(0.1)
    g = c.get("q1c")
    c.reject(g["delivery_tag"], False)
    c.sync()
    time.sleep(0.3)
    w("Counts after rejection: dlq_a3_rk=%d dlq_a3_cc=%d dlq_a3_bcc=%d" % (
        c.qcount("dlq_a3_rk"), c.qcount("dlq_a3_cc"), c.qcount("dlq_a3_bcc")))
    w("")
    g = c.get("dlq_a3_cc", no_ack=True)
    if g:
        out.extend(dump_msg(g, "copy in dlq_a3_cc"))
    g = c.get("dlq_a3_bcc", no_ack=True)
    if g:
        out.extend(dump_msg(g, "copy in dlq_a3_bcc"))
    c.close()
    cleanup(["q1c", "dlq_a3_rk", "dlq_a3_cc", "dlq_a3_bcc"], ["dlx_a3"])

    # ---------------- b
    w("## b. Dead-lettered repeatedly: x-death ordering and count")
    w("")
    w("Setup: `q1b` `{x-dead-letter-exchange: S \"dlx_b\"}`; `dlx_b` (fanout) -> `dlq_b`")
    w("`{x-dead-letter-exchange: S \"dlx_b2\"}`; `dlx_b2` (fanout) -> `dlq_b2` (no DLX).")
    w("Steps (1.1 s apart so `time` can differ):")
    w("1. publish to default exchange rk `q1b` (headers `{h: S \"1\"}`), basic.get + reject(requeue=false) -> arrives in `dlq_b`;")
    w("2. basic.get from `dlq_b` + reject(requeue=false) -> arrives in `dlq_b2`;")
    w("3. basic.get from `dlq_b2` (no_ack), republish it *unchanged* (all properties incl. headers/x-death)")
    w("   to default exchange rk `q1b`, basic.get + reject -> arrives in `dlq_b` again;")
    w("4. repeat step 3 starting from `dlq_b` (reject from q1b a third time);")
    w("5. and 6. see below (republish with an `expiration` to see where `original-expiration` lands).")
    w("")
    c = Client()
    c.declare_exchange("dlx_b", "fanout")
    c.declare_exchange("dlx_b2", "fanout")
    c.declare_queue("q1b", arguments=[("x-dead-letter-exchange", "dlx_b")])
    c.declare_queue("dlq_b", arguments=[("x-dead-letter-exchange", "dlx_b2")])
    c.declare_queue("dlq_b2")
    c.bind("dlq_b", "dlx_b")
    c.bind("dlq_b2", "dlx_b2")

    def wait_get(q, tries=30):
        for _ in range(tries):
            g = c.get(q)
            if g:
                return g
            time.sleep(0.05)
        return None

    c.publish("", "q1b", "body-b", {"headers": [("h", T("S", "1"))]})
    c.sync()
    g = wait_get("q1b")
    c.reject(g["delivery_tag"], False)
    g = wait_get("dlq_b")
    out.extend(dump_msg(g, "Step 1: in dlq_b after 1st rejection from q1b (basic.get-ok)"))
    time.sleep(1.1)
    c.reject(g["delivery_tag"], False)
    g = wait_get("dlq_b2")
    out.extend(dump_msg(g, "Step 2: in dlq_b2 after rejection from dlq_b"))
    c.ack(g["delivery_tag"])
    time.sleep(1.1)
    c.publish("", "q1b", g["body"], props_to_publishable(g["props"]))
    c.sync()
    g = wait_get("q1b")
    c.reject(g["delivery_tag"], False)
    g = wait_get("dlq_b")
    out.extend(dump_msg(g, "Step 3: in dlq_b after republish to q1b and 2nd rejection from q1b"))
    c.ack(g["delivery_tag"])
    time.sleep(1.1)
    c.publish("", "q1b", g["body"], props_to_publishable(g["props"]))
    c.sync()
    g = wait_get("q1b")
    c.reject(g["delivery_tag"], False)
    g = wait_get("dlq_b")
    out.extend(dump_msg(g, "Step 4: in dlq_b after republish to q1b and 3rd rejection from q1b"))
    c.ack(g["delivery_tag"])
    # step 5: republish with an expiration straight to dlq_b, reject -> dlq_b2 (updates dlq_b entry)
    p5 = props_to_publishable(g["props"])
    p5["expiration"] = "60000"
    c.publish("", "dlq_b", g["body"], p5)
    c.sync()
    g = wait_get("dlq_b")
    c.reject(g["delivery_tag"], False)
    g = wait_get("dlq_b2")
    out.extend(dump_msg(g, "Step 5: step-4 message republished with expiration \"60000\" to default exchange"
                           " rk `dlq_b`, rejected from dlq_b, in dlq_b2"))
    c.ack(g["delivery_tag"])
    # step 6: republish with expiration to a queue not yet in x-death
    c.declare_queue("q1b_new", arguments=[("x-dead-letter-exchange", "dlx_b")])
    p6 = props_to_publishable(g["props"])
    p6["expiration"] = "70000"
    c.publish("", "q1b_new", g["body"], p6)
    c.sync()
    g = wait_get("q1b_new")
    c.reject(g["delivery_tag"], False)
    g = wait_get("dlq_b")
    out.extend(dump_msg(g, "Step 6: step-5 message republished with expiration \"70000\" to new queue"
                           " `q1b_new` `{x-dead-letter-exchange: S \"dlx_b\"}`, rejected, in dlq_b",
                        hexdump=True))
    c.ack(g["delivery_tag"])
    c.delete_queue("q1b_new")
    c.close()

    # ---------------- c
    w("## c. Expired by queue TTL, with x-dead-letter-routing-key")
    w("")
    w("Setup: `q2` `{x-message-ttl: I 100, x-dead-letter-exchange: S \"dlx2\", x-dead-letter-routing-key: S \"newrk\"}`")
    w("bound to `src` with `rk2`; `dlx2` (direct); `dlq2` bound to `dlx2` with `newrk`; `dlq2_old`")
    w("bound to `dlx2` with `rk2` and `cc2`.  Published to `src` rk `rk2` with headers `{CC: A[S \"cc2\"]}`")
    w("(the CC copy has nowhere to go in `src`).  Waited 400 ms.")
    w("")
    c = Client()
    c.declare_exchange("dlx2", "direct")
    c.declare_queue("q2", arguments=[("x-message-ttl", T("I", 100)),
                                     ("x-dead-letter-exchange", "dlx2"),
                                     ("x-dead-letter-routing-key", "newrk")])
    c.bind("q2", "src", "rk2")
    c.declare_queue("dlq2")
    c.declare_queue("dlq2_old")
    c.bind("dlq2", "dlx2", "newrk")
    c.bind("dlq2_old", "dlx2", "rk2")
    c.bind("dlq2_old", "dlx2", "cc2")
    c.publish("src", "rk2", "body-c", {"headers": [("CC", T("A", [T("S", "cc2")]))]})
    c.sync()
    time.sleep(0.4)
    w("Counts after 400 ms: q2=%d dlq2=%d dlq2_old=%d" % (c.qcount("q2"), c.qcount("dlq2"),
                                                          c.qcount("dlq2_old")))
    w("")
    g = c.get("dlq2", no_ack=True)
    if g:
        out.extend(dump_msg(g, "basic.get-ok from dlq2"))
    c.close()

    w("### c2. Expired by per-message expiration (no queue TTL, no routing-key override)")
    w("")
    w("`q2b` `{x-dead-letter-exchange: S \"dlx2\"}`; `dlq2b` bound to `dlx2` with `q2b`.  Published to")
    w("default exchange rk `q2b` with expiration `\"50\"`, waited 400 ms.")
    w("")
    c = Client()
    c.declare_queue("q2b", arguments=[("x-dead-letter-exchange", "dlx2")])
    c.declare_queue("dlq2b")
    c.bind("dlq2b", "dlx2", "q2b")
    c.publish("", "q2b", "body-c2", {"expiration": "50", "headers": [("h", T("S", "c2"))]})
    c.sync()
    time.sleep(0.4)
    w("Counts after 400 ms: q2b=%d dlq2b=%d" % (c.qcount("q2b"), c.qcount("dlq2b")))
    w("")
    g = c.get("dlq2b", no_ack=True)
    if g:
        out.extend(dump_msg(g, "basic.get-ok from dlq2b"))
    c.close()

    # ---------------- d
    w("## d. x-max-length 1, overflow drop-head")
    w("")
    w("`q3` `{x-max-length: I 1, x-dead-letter-exchange: S \"dlx3\"}` (x-overflow default); `dlx3` fanout ->")
    w("`dlq3`.  Published m1 then m2 to default exchange rk `q3`.")
    w("")
    c = Client()
    c.declare_exchange("dlx3", "fanout")
    c.declare_queue("q3", arguments=[("x-max-length", T("I", 1)), ("x-dead-letter-exchange", "dlx3")])
    c.declare_queue("dlq3")
    c.bind("dlq3", "dlx3")
    c.publish("", "q3", "m1", {"headers": [("n", T("I", 1))]})
    c.publish("", "q3", "m2", {"headers": [("n", T("I", 2))]})
    c.sync()
    time.sleep(0.3)
    w("Counts: q3=%d dlq3=%d; q3 holds %r" % (c.qcount("q3"), c.qcount("dlq3"),
                                               (c.get("q3", no_ack=True) or {}).get("body")))
    w("")
    g = c.get("dlq3", no_ack=True)
    if g:
        out.extend(dump_msg(g, "basic.get-ok from dlq3"))
    c.close()

    # ---------------- e
    w("## e. reject-publish / reject-publish-dlx with publisher confirms")
    w("")
    w("How acks/nacks are grouped (one nack with multiple=true covering tags 2-3, or one per tag) varied")
    w("between runs; stable across runs: tag 1 acked, the refused publishes nacked, every server nack had")
    w("both the multiple and the requeue bit set (octet 0x03), no basic.return.")
    w("")
    for qn, dlxn, dlqn, mode in (("q4", "dlx4", "dlq4", "reject-publish"),
                                 ("q5", "dlx5", "dlq5", "reject-publish-dlx")):
        c = Client()
        c.declare_exchange(dlxn, "fanout")
        c.declare_queue(qn, arguments=[("x-max-length", T("I", 1)), ("x-overflow", mode),
                                       ("x-dead-letter-exchange", dlxn)])
        c.declare_queue(dlqn)
        c.bind(dlqn, dlxn)
        c.confirm_select()
        for i in range(1, 4):
            c.publish("", qn, "m%d" % i, {"headers": [("n", T("I", i))]})
        time.sleep(0.5)
        evs = c.drain(("basic.ack", "basic.nack", "basic.return"), 1.0)
        w("### `%s`: `{x-max-length: I 1, x-overflow: S \"%s\", x-dead-letter-exchange: S \"%s\"}`"
          % (qn, mode, dlxn))
        w("")
        w("confirm.select, then m1, m2, m3 published to default exchange rk `%s` (mandatory=false)." % qn)
        w("Publisher received (in order):")
        w("")
        for ev in evs:
            w("- %s delivery-tag=%d multiple=%r%s (raw bit octet 0x%02x)" % (
                ev["name"], ev.get("delivery_tag", -1), ev.get("multiple"),
                " requeue=%r" % ev["requeue"] if ev["name"] == "basic.nack" else "",
                ev["flag_byte"]))
        w("")
        w("Counts: %s=%d, %s=%d" % (qn, c.qcount(qn), dlqn, c.qcount(dlqn)))
        w("")
        g = c.get(qn, no_ack=True)
        w("%s still holds %r" % (qn, g and g["body"]))
        w("")
        g = c.get(dlqn, no_ack=True)
        if g:
            out.extend(dump_msg(g, "first message in %s" % dlqn))
        # without confirms
        c.reopen()
        before = c.qcount(dlqn)
        c.publish("", qn, "x1")
        c.publish("", qn, "x2")
        c.sync()
        time.sleep(0.2)
        evs = c.drain(("basic.ack", "basic.nack", "basic.return"), 0.5)
        w("Without confirms on a new channel (%s empty, %s=%d before): published x1, x2 -> events %s;"
          " counts after: %s=%d %s=%d"
          % (qn, dlqn, before, [e["name"] for e in evs], qn, c.qcount(qn), dlqn, c.qcount(dlqn)))
        w("")
        # mandatory
        c.reopen()
        c.purge(qn)
        c.confirm_select()
        c.publish("", qn, "y1", mandatory=True)
        c.publish("", qn, "y2", mandatory=True)
        time.sleep(0.5)
        evs = c.drain(("basic.ack", "basic.nack", "basic.return"), 1.0)
        w("Confirms + mandatory=true (queue empty): published y1, y2 -> %s"
          % ["%s%s" % (e["name"], " tag=%d multiple=%r" % (e["delivery_tag"], e["multiple"])
                       if "delivery_tag" in e else
                       " %d %s" % (e["reply_code"], e["reply_text"])) for e in evs])
        w("")
        c.close()

    # ---------------- f
    w("## f. Dead-letter cycles")
    w("")
    w("### f1. reject from q_a, TTL on q_b only")
    w("")
    w("`q_a` `{x-dead-letter-exchange: S \"ex_to_b\"}`; `q_b` `{x-message-ttl: I 50, x-dead-letter-exchange: S \"ex_to_a\"}`;")
    w("`ex_to_b` (fanout) -> q_b and `f.tap`; `ex_to_a` (fanout) -> q_a and `f.tap`.  Published to default exchange")
    w("rk `q_a`; basic.get + reject(requeue=false) from q_a; waited 1 s; observed counts and the tap copies.")
    w("Then rejected the message (now back in q_a) a second time and observed again.")
    w("")
    c = Client()
    c.declare_exchange("ex_to_a", "fanout")
    c.declare_exchange("ex_to_b", "fanout")
    c.declare_queue("q_a", arguments=[("x-dead-letter-exchange", "ex_to_b")])
    c.declare_queue("q_b", arguments=[("x-message-ttl", T("I", 50)),
                                      ("x-dead-letter-exchange", "ex_to_a")])
    c.declare_queue("f.tap")
    c.bind("q_b", "ex_to_b")
    c.bind("q_a", "ex_to_a")
    c.bind("f.tap", "ex_to_b")
    c.bind("f.tap", "ex_to_a")
    c.publish("", "q_a", "body-f1")
    c.sync()
    for rnd in (1, 2):
        g = wait_get("q_a")
        if g is None:
            w("round %d: q_a empty, nothing to reject" % rnd)
            break
        c.reject(g["delivery_tag"], False)
        time.sleep(1.0)
        w("After rejection #%d + 1 s: q_a=%d q_b=%d f.tap=%d" % (rnd, c.qcount("q_a"),
                                                                 c.qcount("q_b"), c.qcount("f.tap")))
        w("")
        k = 0
        while True:
            t = c.get("f.tap", no_ack=True)
            if not t:
                break
            k += 1
            out.extend(dump_msg(t, "rejection #%d, tap copy %d (via exchange %s)" % (
                rnd, k, t["exchange"])))
    g = c.get("q_a", no_ack=True)
    if g:
        out.extend(dump_msg(g, "Final message left in q_a"))
    c.close()

    w("### f2. TTL on both queues (no rejection)")
    w("")
    w("`f2.c` `{x-message-ttl: I 50, x-dead-letter-exchange: S \"ex_to_d\"}`, `f2.d` `{x-message-ttl: I 50,")
    w("x-dead-letter-exchange: S \"ex_to_c\"}`; `ex_to_d` (fanout) -> f2.d and f2.tap; `ex_to_c` (fanout) -> f2.c")
    w("and f2.tap.  Published to default exchange rk `f2.c`, waited 1.5 s.")
    w("")
    c = Client()
    c.declare_exchange("ex_to_c", "fanout")
    c.declare_exchange("ex_to_d", "fanout")
    c.declare_queue("f2.c", arguments=[("x-message-ttl", T("I", 50)),
                                       ("x-dead-letter-exchange", "ex_to_d")])
    c.declare_queue("f2.d", arguments=[("x-message-ttl", T("I", 50)),
                                       ("x-dead-letter-exchange", "ex_to_c")])
    c.declare_queue("f2.tap")
    c.bind("f2.d", "ex_to_d")
    c.bind("f2.c", "ex_to_c")
    c.bind("f2.tap", "ex_to_d")
    c.bind("f2.tap", "ex_to_c")
    c.publish("", "f2.c", "body-f2")
    c.sync()
    time.sleep(1.5)
    w("Counts: f2.c=%d f2.d=%d f2.tap=%d" % (c.qcount("f2.c"), c.qcount("f2.d"), c.qcount("f2.tap")))
    w("")
    k = 0
    while True:
        t = c.get("f2.tap", no_ack=True)
        if not t:
            break
        k += 1
        out.extend(dump_msg(t, "tap copy %d (via exchange %s)" % (k, t["exchange"])))
    c.close()

    w("### f3. Queue dead-lettering to itself on expiry")
    w("")
    w("`f3.self` `{x-message-ttl: I 50, x-dead-letter-exchange: S \"\"}` (default exchange, original routing")
    w("key `f3.self`).  Published to default exchange rk `f3.self`; waited 1 s.")
    w("")
    c = Client()
    c.declare_queue("f3.self", arguments=[("x-message-ttl", T("I", 50)),
                                          ("x-dead-letter-exchange", "")])
    c.publish("", "f3.self", "body-f3")
    c.sync()
    time.sleep(1.0)
    w("Count f3.self after 1 s: %d" % c.qcount("f3.self"))
    w("")
    c.close()

    w("### f4. Queue dead-lettering to itself on rejection")
    w("")
    w("`f4.self` `{x-dead-letter-exchange: S \"\"}`; publish to default exchange rk `f4.self`; basic.get + reject")
    w("(requeue=false) three times in a row.")
    w("")
    c = Client()
    cleanup(["f4.self"])
    c.declare_queue("f4.self", arguments=[("x-dead-letter-exchange", "")])
    c.publish("", "f4.self", "body-f4")
    c.sync()
    for rnd in (1, 2, 3):
        g = wait_get("f4.self")
        if not g:
            w("round %d: queue empty" % rnd)
            break
        c.reject(g["delivery_tag"], False)
        time.sleep(0.2)
    g = wait_get("f4.self", tries=10)
    if g:
        out.extend(dump_msg(g, "f4.self after 3 rejections"))
    c.close()

    # ---------------- g
    w("## g. Priorities (x-max-priority 5)")
    w("")
    w("`q_p` `{x-max-priority: I 5}`; published (in this order) bodies p0, p3, p5, p9, none with priority")
    w("property 0, 3, 5, 9 and absent; then basic.get (no_ack) until empty:")
    w("")
    c = Client()
    c.declare_queue("q_p", arguments=[("x-max-priority", T("I", 5))])
    for pr in (0, 3, 5, 9, None):
        props = {} if pr is None else {"priority": pr}
        c.publish("", "q_p", "p%s" % ("none" if pr is None else pr), props)
    c.sync()
    time.sleep(0.2)
    w("| # | body | priority property received | message-count in get-ok |")
    w("|---|---|---|---|")
    i = 0
    while True:
        g = c.get("q_p", no_ack=True)
        if not g:
            break
        i += 1
        w("| %d | %s | %s | %d |" % (i, g["body"].decode(), dict(g["props"]).get("priority", "absent"),
                                   g["message_count"]))
    w("")
    # a second run publishing in reverse order
    for body, pr in (("none", None), ("p9", 9), ("p5", 5), ("p3", 3), ("p0", 0), ("p5b", 5), ("p7", 7)):
        props = {} if pr is None else {"priority": pr}
        c.publish("", "q_p", body, props)
    c.sync()
    time.sleep(0.2)
    order = []
    while True:
        g = c.get("q_p", no_ack=True)
        if not g:
            break
        order.append(g["body"].decode())
    w("Second run, published none, p9, p5, p3, p0, p5b(5), p7(7): basic.get order = %s" % ", ".join(order))
    w("")
    c.close()

    # ---------------- h
    w("## h. Requeue ordering")
    w("")
    for variant in ("h1", "h2", "h3", "h4"):
        c = Client()
        c.declare_queue("q_h")
        c.purge("q_h")
        for i in range(1, 6):
            c.publish("", "q_h", "m%d" % i)
        c.sync()
        time.sleep(0.1)
        c.qos(3 if variant == "h4" else 10)
        c.consume("q_h", tag="hc")
        ds = deliveries(c, 3 if variant == "h4" else 5)
        tags = {d["body"].decode(): d["delivery_tag"] for d in ds}
        if variant == "h1":
            w("### h1. Consumer cancelled before the nacks")
            w("")
            w("m1..m5 published to `q_h`; basic.qos 10; basic.consume (manual ack) got %s (tags %s);"
              % ([d["body"].decode() for d in ds], [d["delivery_tag"] for d in ds]))
            w("basic.cancel; basic.nack(m2, requeue=true); basic.nack(m4, requeue=true); then basic.get")
            w("(no_ack=false) until empty:")
            c.cancel("hc")
            c.nack(tags["m2"], True)
            c.nack(tags["m4"], True)
        elif variant == "h4":
            w("### h4. Requeue among never-delivered messages")
            w("")
            w("m1..m5 published; basic.qos **3**; consumer got %s; basic.cancel; basic.nack(m3, requeue=true);"
              % [d["body"].decode() for d in ds])
            w("basic.nack(m1, requeue=true); then basic.get (no_ack=false) until empty:")
            c.cancel("hc")
            c.nack(tags["m3"], True)
            c.nack(tags["m1"], True)
        elif variant == "h2":
            w("### h2. Same as h1 but nack order m4 then m2")
            w("")
            c.cancel("hc")
            c.nack(tags["m4"], True)
            c.nack(tags["m2"], True)
        else:
            w("### h3. Same setup, consumer still active: nack(m2, requeue) then nack(m4, requeue)")
            w("")
            c.nack(tags["m2"], True)
            c.nack(tags["m4"], True)
            rd = deliveries(c, 5, timeout=1.0)
            w("Redeliveries to the same consumer: %s" % ", ".join(
                "%s (tag %d, redelivered=%r)" % (d["body"].decode(), d["delivery_tag"], d["redelivered"])
                for d in rd))
            w("")
            c.cancel("hc")
        c.sync()
        time.sleep(0.1)
        seq = []
        while True:
            g = c.get("q_h")
            if not g:
                break
            seq.append("%s (redelivered=%r)" % (g["body"].decode(), g["redelivered"]))
        w("")
        w("basic.get sequence: %s" % (", ".join(seq) or "empty"))
        w("")
        c.close()  # everything still unacked is requeued
        time.sleep(0.2)
        c = Client()
        seq = []
        while True:
            g = c.get("q_h", no_ack=True)
            if not g:
                break
            seq.append("%s (redelivered=%r)" % (g["body"].decode(), g["redelivered"]))
        w("After closing that connection (all unacked requeued), basic.get on a new connection: %s"
          % ", ".join(seq))
        w("")
        c.close()

    # ---------------- i
    w("## i. Per-message TTL behind a longer-lived message")
    w("")
    for qn, dl in (("q_i", False), ("q_i2", True)):
        c = Client()
        if dl:
            c.declare_exchange("dlx_i2", "fanout")
            c.declare_queue(qn, arguments=[("x-dead-letter-exchange", "dlx_i2")])
            c.declare_queue("dlq_i2")
            c.bind("dlq_i2", "dlx_i2")
            w("### i2. Same with `{x-dead-letter-exchange: S \"dlx_i2\"}` (dlx_i2 fanout -> dlq_i2)")
        else:
            c.declare_queue(qn)
            w("### i1. `q_i` (no arguments)")
        w("")
        c.publish("", qn, "A", {"expiration": "10000"})
        c.publish("", qn, "B", {"expiration": "10"})
        c.sync()
        time.sleep(0.2)
        w("Published A (expiration \"10000\") then B (expiration \"10\"), waited 200 ms.")
        w("")
        w("- passive queue.declare message-count: %d%s" % (
            c.qcount(qn), (", dlq_i2=%d" % c.qcount("dlq_i2")) if dl else ""))
        g = c.get(qn)
        w("- basic.get #1: %s" % (g and "%s (get-ok message-count=%d)" % (g["body"].decode(),
                                                                          g["message_count"])))
        w("- passive message-count right after: %d%s" % (
            c.qcount(qn), (", dlq_i2=%d" % c.qcount("dlq_i2")) if dl else ""))
        g2 = c.get(qn)
        w("- basic.get #2: %s" % (g2 and "%s (get-ok message-count=%d)" % (g2["body"].decode(),
                                                                           g2["message_count"])
                                  or "basic.get-empty"))
        time.sleep(0.2)
        w("- passive message-count after get #2 + 200 ms: %d%s" % (
            c.qcount(qn), (", dlq_i2=%d" % c.qcount("dlq_i2")) if dl else ""))
        if dl:
            g3 = c.get("dlq_i2", no_ack=True)
            if g3:
                w("")
                out.extend(dump_msg(g3, "dead-lettered copy of B in dlq_i2"))
        w("")
        # i3: the same but with a consumer-free wait of 11s? skip; just ack A
        c.close()
    cleanup(qs + ["f4.self"], xs)
    return out


def main():
    global PORT
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=PORT)
    ap.add_argument("--only", choices=["args", "dl"], default=None)
    a = ap.parse_args()
    PORT = a.port
    os.makedirs(DATA, exist_ok=True)
    if a.only in (None, "args"):
        p1 = part1()
        with open(os.path.join(DATA, "rabbitmq_3_10_queue_args.md"), "w") as f:
            f.write("\n".join(p1) + "\n")
    if a.only in (None, "dl"):
        p2 = part2()
        with open(os.path.join(DATA, "rabbitmq_3_10_dead_letter.md"), "w") as f:
            f.write("\n".join(p2) + "\n")


if __name__ == "__main__":
    main()
