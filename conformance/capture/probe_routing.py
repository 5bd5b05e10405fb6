#!/usr/bin/env python3
"""Record RabbitMQ's topic and headers exchange matching, and the reply codes
of exchange-related errors, as ground-truth data for Warren's exchange crate.

Usage:
    /tmp/warren-capture-venv/bin/python probe_routing.py [--port 5673] [--outdir DIR]

Writes (default DIR = crates/exchange/tests/data):
    topic_rabbitmq_3_10.tsv            pattern, key, matches   (JSON-encoded strings)
    headers_rabbitmq_3_10.tsv          binding_args, message_headers, matches
    rabbitmq_3_10_exchange_errors.md   reply code/text for exchange error cases

Topic cases go through pika (confirm channel, mandatory publish: a basic.return
means "no match"; cross-checked with basic.get).  Headers cases and error
probes use hand-written frames (amqp_raw.py) so the AMQP field types on the
wire are exactly the ones written in the TSV.
"""
import argparse
import datetime
import json
import os
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import amqp_raw as A  # noqa: E402
from amqp_raw import T  # noqa: E402

import pika  # noqa: E402
import pika.exceptions  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUTDIR = os.path.join(HERE, "..", "..", "crates", "exchange", "tests", "data")
PORT = 5673

# ------------------------------------------------------------------ topic
LONG_WORDS = ".".join(["a"] * 127)  # 253 bytes
LONG_KEY = "k" * 255               # longest possible shortstr

TOPIC_CASES = [
    # empty routing key
    ("#", ""), ("*", ""), ("", ""), ("#.#", ""), ("*.#", ""), ("#.*", ""),
    ("#.#.#", ""), (".", ""), ("a", ""), ("*.*", ""), ("#.*.#", ""),
    # empty pattern
    ("", "a"), ("", "."), ("", " "),
    # empty words / leading / trailing dots
    ("a..b", "a..b"), ("a..b", "a.b"), ("a.*.b", "a..b"), ("a.#.b", "a..b"),
    ("#", "a..b"), ("a.b", "a..b"),
    (".a", ".a"), (".a", "a"), ("*.a", ".a"), ("#.a", ".a"), ("#.a", "a"),
    ("a.", "a."), ("a.", "a"), ("a.*", "a."), ("a.#", "a."), ("a.*", "a"),
    (".", "."), ("*", "."), ("*.*", "."), ("#", "."), ("#.#", "."), ("..", ".."),
    ("*.*.*", ".."), ("*.*", ".."), (".", "a"),
    # hash / star semantics
    ("a.#", "a"), ("a.#", "a.b"), ("a.#", "a.b.c"), ("a.#", "b.a"),
    ("#.a", "b.a"), ("#.a", "a.b"),
    ("a.#.b", "a.b"), ("a.#.b", "a.x.b"), ("a.#.b", "a.x.y.b"), ("a.#.b", "a.x.y.c"),
    ("a.#.#.b", "a.b"), ("a.#.#.b", "a.x.y.b"),
    ("*.*", "a"), ("*.*", "a.b"), ("*.*", "a.b.c"),
    ("*", "a"), ("*", "a.b"),
    ("a.*.#", "a"), ("a.*.#", "a.b"), ("a.*.#", "a.b.c"),
    ("#.#.#", "a"), ("#.#.#", "a.b.c"), ("#.#", "a.b"),
    ("*.#", "a"), ("#.*", "a"), ("*.#.*", "a"), ("*.#.*", "a.b"), ("*.#.*", "a.b.c"),
    ("#.*.#", "a"), ("#.*.#", "a.b.c"),
    ("a.#.*", "a"), ("a.#.*", "a.b"), ("#.#.b", "b"), ("*.*.#", "a"), ("*.*.#", "a.b"),
    ("#.b.#", "a.b.c"), ("#.b.#", "b"), ("#.b.#", "a.c"),
    ("*.b.*", "a.b.c"), ("*.b.*", "b.c"),
    ("a.b.#", "a.b"), ("#.#.#.#.#.#.#.#.#.#", "a"), ("#.#.#.#.#.#.#.#.#.#", ""),
    ("a.*.*.#.b", "a.x.b"), ("a.*.*.#.b", "a.x.y.b"), ("a.*.*.#.b", "a.x.y.z.b"),
    ("#.a.#.a.#", "a.a"), ("#.a.#.a.#", "a"), ("#.a.#.a.#", "b.a.c.a.d"),
    # '#' / '*' inside a word are literal characters
    ("a*", "a*"), ("a*", "ab"), ("a*", "a"), ("a#b", "a#b"), ("a#b", "ab"),
    ("a#b", "a.b"), ("*a", "*a"), ("*a", "xa"), ("#a", "#a"), ("#a", "a"),
    ("a#", "a#"), ("a#", "a"), ("a#", "a.b"), ("#", "#"), ("*", "*"), ("a.*", "a.*"),
    ("**", "a"), ("**", "**"), ("##", "a"), ("##", "##"), ("a.**", "a.b"),
    # normal cases
    ("a.b.c", "a.b.c"), ("a.b.c", "a.b"), ("a.b", "a.b.c"), ("a.b", "a.c"),
    ("a.*.c", "a.b.c"), ("a.*.c", "a.b.b.c"), ("#.c", "a.b.c"), ("a", "a.b"),
    ("stock.usd.*", "stock.usd.nyse"), ("stock.*.nyse", "stock.eur.nyse"),
    ("*.orange.*", "quick.orange.rabbit"), ("*.*.rabbit", "lazy.orange.elephant"),
    ("lazy.#", "lazy.orange.male.rabbit"), ("*.orange.*", "quick.orange.male.rabbit"),
    # case / whitespace sensitivity
    ("A.b", "a.b"), ("a.b", "a.b "), (" a", "a"), ("a b", "a b"),
    # unicode
    ("caf\u00e9.*", "caf\u00e9.x"), ("caf\u00e9.*", "cafe.x"), ("*", "\u65e5\u672c\u8a9e"),
    ("\u65e5\u672c.#", "\u65e5\u672c.\u8a9e.x"), ("\u00e9", "e"), ("*.\u2603", "x.\u2603"),
    # long keys
    ("#", LONG_KEY), ("*", LONG_KEY), (LONG_KEY, LONG_KEY), ("k" * 254, LONG_KEY),
    ("#", LONG_WORDS), ("*.#", LONG_WORDS), ("a.#.a", LONG_WORDS), (LONG_WORDS, LONG_WORDS),
    ("#.a.#", LONG_WORDS), (".".join(["*"] * 127), LONG_WORDS),
    (".".join(["*"] * 126), LONG_WORDS), ("#." + ".".join(["*"] * 127), LONG_WORDS),
]


def run_topic(log):
    params = pika.ConnectionParameters(host="127.0.0.1", port=PORT,
                                       credentials=pika.PlainCredentials("guest", "guest"))
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.confirm_delivery()
    rows = []
    seen = set()
    for i, (pattern, key) in enumerate(TOPIC_CASES):
        if (pattern, key) in seen:
            continue
        seen.add((pattern, key))
        ex = "warren.topic.probe.%d" % i
        ch.exchange_declare(ex, "topic", auto_delete=False)
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(q, ex, routing_key=pattern)
        returned = False
        try:
            ch.basic_publish(ex, key, b"x", mandatory=True)
        except pika.exceptions.UnroutableError:
            returned = True
        m, _p, _b = ch.basic_get(q, auto_ack=True)
        got = m is not None
        if got == returned:
            raise RuntimeError("inconsistent result for %r %r" % (pattern, key))
        rows.append((pattern, key, got))
        ch.queue_delete(q)
        ch.exchange_delete(ex)
    conn.close()
    log("topic: %d cases" % len(rows))
    return rows


# ------------------------------------------------------------------ headers
def S(v):
    return T("S", v)


def I(v):  # noqa: E743
    return T("I", v)


V = T("V", None)

# (binding args as list of (key, T), message headers as list of (key, T) or None
#  for "no headers property", comment)
HEADERS_CASES = [
    # x-match all / any basics
    ([("x-match", S("all")), ("a", S("1"))], [("a", S("1"))], "all, single key"),
    ([("x-match", S("all")), ("a", S("1")), ("b", S("2"))], [("a", S("1"))], "all, one key missing"),
    ([("x-match", S("all")), ("a", S("1")), ("b", S("2"))], [("a", S("1")), ("b", S("2"))], "all, both"),
    ([("x-match", S("all")), ("a", S("1")), ("b", S("2"))], [("a", S("1")), ("b", S("3"))], "all, one differs"),
    ([("x-match", S("all")), ("a", S("1"))], [("a", S("1")), ("z", S("9"))], "all, extra header"),
    ([("x-match", S("any")), ("a", S("1")), ("b", S("2"))], [("a", S("1"))], "any, one of two"),
    ([("x-match", S("any")), ("a", S("1")), ("b", S("2"))], [("c", S("1"))], "any, none"),
    ([("x-match", S("any")), ("a", S("1")), ("b", S("2"))], [("a", S("2")), ("b", S("1"))], "any, values swapped"),
    ([("a", S("1")), ("b", S("2"))], [("a", S("1"))], "no x-match (default), one missing"),
    ([("a", S("1")), ("b", S("2"))], [("a", S("1")), ("b", S("2"))], "no x-match (default), all present"),
    # x- keys
    ([("x-match", S("all")), ("x-foo", S("bar")), ("a", S("1"))], [("a", S("1"))], "all ignores x- binding keys"),
    ([("x-match", S("all")), ("x-foo", S("bar"))], [], "all with only x- binding keys, empty headers"),
    ([("x-match", S("any")), ("x-foo", S("bar"))], [("x-foo", S("bar"))], "any ignores x- keys (only x- key)"),
    ([("x-match", S("any")), ("x-foo", S("bar")), ("a", S("1"))], [("x-foo", S("bar"))], "any ignores x- keys"),
    ([("x-match", S("all-with-x")), ("x-foo", S("bar")), ("a", S("1"))], [("a", S("1"))], "all-with-x, x- header missing"),
    ([("x-match", S("all-with-x")), ("x-foo", S("bar")), ("a", S("1"))], [("a", S("1")), ("x-foo", S("bar"))], "all-with-x, all present"),
    ([("x-match", S("all-with-x")), ("x-foo", S("bar"))], [("x-foo", S("baz"))], "all-with-x, x- value differs"),
    ([("x-match", S("any-with-x")), ("x-foo", S("bar"))], [("x-foo", S("bar"))], "any-with-x, x- key matches"),
    ([("x-match", S("any-with-x")), ("x-foo", S("bar")), ("a", S("1"))], [("x-foo", S("nope"))], "any-with-x, none"),
    ([("x-match", S("all-with-x")), ("x-match2", S("q"))], [("x-match2", S("q"))], "all-with-x, key starting x-match"),
    ([("x-match", S("all-with-x"))], [], "all-with-x, no other keys"),
    ([("x-match", S("any-with-x"))], [("x-match", S("any-with-x"))], "any-with-x, no other keys; header has x-match"),
    ([("x-match", S("all-with-x")), ("a", S("1"))], [("a", S("1")), ("x-match", S("all-with-x"))], "all-with-x, header also carries x-match"),
    # x-match in the message is just a header
    ([("x-match", S("any")), ("a", S("1"))], [("x-match", S("all")), ("a", S("1"))], "x-match header in message"),
    # void / presence
    ([("x-match", S("all")), ("a", V)], [("a", S("anything"))], "void binding value = presence (string)"),
    ([("x-match", S("all")), ("a", V)], [("a", I(5))], "void binding value = presence (int)"),
    ([("x-match", S("all")), ("a", V)], [("a", V)], "void binding value, void header"),
    ([("x-match", S("all")), ("a", V)], [("b", S("x"))], "void binding value, key absent"),
    ([("x-match", S("all")), ("a", S("1"))], [("a", V)], "string binding, void header"),
    ([("x-match", S("any")), ("a", V), ("b", S("2"))], [("a", S("q"))], "any with void"),
    ([("x-match", S("any")), ("a", V)], [], "any with void, empty headers"),
    # type sensitivity, binding a = I 1
    ([("x-match", S("all")), ("a", I(1))], [("a", I(1))], "I1 vs I1"),
    ([("x-match", S("all")), ("a", I(1))], [("a", T("l", 1))], "I1 vs l1"),
    ([("x-match", S("all")), ("a", I(1))], [("a", T("L", 1))], "I1 vs L1"),
    ([("x-match", S("all")), ("a", I(1))], [("a", S("1"))], "I1 vs S'1'"),
    ([("x-match", S("all")), ("a", I(1))], [("a", T("B", 1))], "I1 vs B1"),
    ([("x-match", S("all")), ("a", I(1))], [("a", T("b", 1))], "I1 vs b1"),
    ([("x-match", S("all")), ("a", I(1))], [("a", T("s", 1))], "I1 vs s1"),
    ([("x-match", S("all")), ("a", I(1))], [("a", T("u", 1))], "I1 vs u1"),
    ([("x-match", S("all")), ("a", I(1))], [("a", T("i", 1))], "I1 vs i1 (unsigned 32)"),
    ([("x-match", S("all")), ("a", I(1))], [("a", T("t", True))], "I1 vs t true"),
    ([("x-match", S("all")), ("a", I(1))], [("a", T("d", 1.0))], "I1 vs d 1.0"),
    ([("x-match", S("all")), ("a", I(1))], [("a", T("f", 1.0))], "I1 vs f 1.0"),
    ([("x-match", S("all")), ("a", I(1))], [("a", T("D", (0, 1)))], "I1 vs D 1"),
    ([("x-match", S("all")), ("a", I(1))], [("a", T("T", 1))], "I1 vs T 1"),
    ([("x-match", S("all")), ("a", I(1))], [("a", I(2))], "I1 vs I2"),
    ([("x-match", S("all")), ("a", I(-1))], [("a", T("i", 4294967295))], "I-1 vs i 4294967295"),
    ([("x-match", S("all")), ("a", T("b", -1))], [("a", T("B", 255))], "b-1 vs B255"),
    ([("x-match", S("all")), ("a", T("d", 1.5))], [("a", T("f", 1.5))], "d1.5 vs f1.5"),
    ([("x-match", S("all")), ("a", T("d", 0.1))], [("a", T("f", 0.1))], "d0.1 vs f0.1 (float32 rounding)"),
    ([("x-match", S("all")), ("a", T("l", 2 ** 40))], [("a", T("d", float(2 ** 40)))], "l 2^40 vs d 2^40"),
    ([("x-match", S("all")), ("a", S(""))], [("a", V)], "S'' vs void"),
    ([("x-match", S("all")), ("a", T("F", []))], [("a", T("A", []))], "empty table vs empty array"),
    ([("x-match", S("all")), ("a", T("l", 1))], [("a", T("l", 1))], "l1 vs l1"),
    ([("x-match", S("all")), ("a", T("l", 1))], [("a", I(1))], "l1 vs I1"),
    ([("x-match", S("all")), ("a", T("l", 1))], [("a", T("L", 1))], "l1 vs L1"),
    ([("x-match", S("all")), ("a", T("b", 1))], [("a", T("B", 1))], "b1 vs B1"),
    ([("x-match", S("all")), ("a", T("s", 1))], [("a", T("u", 1))], "s1 vs u1"),
    ([("x-match", S("all")), ("a", T("d", 1.0))], [("a", T("f", 1.0))], "d1.0 vs f1.0"),
    ([("x-match", S("all")), ("a", T("d", 1.0))], [("a", T("d", 1.0))], "d1.0 vs d1.0"),
    ([("x-match", S("all")), ("a", T("t", True))], [("a", T("t", True))], "t vs t"),
    ([("x-match", S("all")), ("a", T("t", True))], [("a", I(1))], "t true vs I1"),
    ([("x-match", S("all")), ("a", T("t", True))], [("a", T("t", False))], "t true vs t false"),
    ([("x-match", S("all")), ("a", S("1"))], [("a", S("1"))], "S'1' vs S'1'"),
    ([("x-match", S("all")), ("a", S("1"))], [("a", T("x", b"1"))], "S'1' vs x'1' (byte array)"),
    ([("x-match", S("all")), ("a", T("x", b"1"))], [("a", T("x", b"1"))], "x'1' vs x'1'"),
    ([("x-match", S("all")), ("a", S("abc"))], [("a", S("ABC"))], "string case sensitivity"),
    ([("x-match", S("all")), ("a", T("D", (2, 100)))], [("a", T("D", (0, 1)))], "D 1.00 vs D 1"),
    ([("x-match", S("all")), ("a", T("T", 1700000000))], [("a", T("T", 1700000000))], "T vs T"),
    ([("x-match", S("all")), ("a", T("T", 1700000000))], [("a", T("l", 1700000000))], "T vs l same number"),
    # nested values
    ([("x-match", S("all")), ("a", T("F", [("b", I(1))]))], [("a", T("F", [("b", I(1))]))], "nested table equal"),
    ([("x-match", S("all")), ("a", T("F", [("b", I(1))]))], [("a", T("F", [("b", T("l", 1))]))], "nested table, inner type differs"),
    ([("x-match", S("all")), ("a", T("A", [I(1), S("x")]))], [("a", T("A", [I(1), S("x")]))], "array equal"),
    ([("x-match", S("all")), ("a", T("A", [I(1), S("x")]))], [("a", T("A", [S("x"), I(1)]))], "array order differs"),
    # key case
    ([("x-match", S("all")), ("A", S("1"))], [("a", S("1"))], "key case sensitivity"),
    # empty binding args
    ([("x-match", S("all"))], [("a", S("1"))], "all, no keys"),
    ([("x-match", S("any"))], [("a", S("1"))], "any, no keys"),
    ([], [("a", S("1"))], "empty binding table"),
    ([], [], "empty binding table, empty headers"),
    # missing headers property
    ([], None, "empty binding, no headers property"),
    ([("x-match", S("all"))], None, "all no keys, no headers property"),
    ([("x-match", S("any"))], None, "any no keys, no headers property"),
    ([("x-match", S("all")), ("a", S("1"))], None, "all a=1, no headers property"),
    ([("x-match", S("any")), ("a", V)], None, "any a=void, no headers property"),
    ([("x-match", S("all-with-x"))], None, "all-with-x no keys, no headers property"),
    # x-match value encoding
    ([("x-match", T("x", b"any")), ("a", S("1")), ("b", S("2"))], [("a", S("1"))], "x-match given as byte array 'any'"),
    # duplicate keys in message headers (first or last wins?)
    ([("x-match", S("all")), ("a", S("1"))], [("a", S("2")), ("a", S("1"))], "duplicate header key: 2 then 1"),
    ([("x-match", S("all")), ("a", S("1"))], [("a", S("1")), ("a", S("2"))], "duplicate header key: 1 then 2"),
]


def tv_json(v):
    """AMQP typed value -> JSON-able dict."""
    k, x = v.kind, v.value
    if k == "V":
        return {"type": "V", "value": None}
    if k in ("S",):
        return {"type": k, "value": x.decode("utf-8") if isinstance(x, bytes) else x}
    if k == "x":
        return {"type": "x", "hex": bytes(x).hex()}
    if k == "D":
        return {"type": "D", "scale": x[0], "value": x[1]}
    if k == "F":
        return {"type": "F", "value": table_json(x)}
    if k == "A":
        return {"type": "A", "value": [tv_json(e) for e in x]}
    return {"type": k, "value": x}


def table_json(items):
    # a JSON array of [key, value] pairs would be needed to keep duplicates; use an
    # object unless keys repeat
    keys = [k for k, _ in items]
    if len(set(keys)) != len(keys):
        return {"__pairs__": [[k, tv_json(v)] for k, v in items]}
    return {k: tv_json(v) for k, v in items}


def recv_reply(c):
    while True:
        fr = c.recv_frame(5)
        if fr is None:
            return None
        if fr[0] != A.FRAME_HEARTBEAT:
            return fr


def expect_ok(c, cls, mth):
    fr = recv_reply(c)
    if fr is None or fr[0] != 1 or fr[7:11] != struct.pack(">HH", cls, mth):
        raise RuntimeError("expected %s got %s" % (A.method_name(cls, mth),
                                                   fr and A.describe(fr)))


BIND_ERRORS = []


def run_headers(log):
    rows = []
    c = A.RawConn(port=PORT).handshake()
    c.open_channel(1)
    for i, (bargs, hdrs, comment) in enumerate(HEADERS_CASES):
        ex = "warren.headers.probe.%d" % i
        q = "warren.headers.q.%d" % i
        c.send(A.method_frame(1, 40, 10, A.exchange_declare(ex, "headers")))
        expect_ok(c, 40, 11)
        c.send(A.method_frame(1, 50, 10, A.queue_declare(q, exclusive=True)))
        expect_ok(c, 50, 11)
        c.send(A.method_frame(1, 50, 20, A.queue_bind(q, ex, "", arguments=bargs)))
        fr = recv_reply(c)
        cl = fr and A.parse_close(fr)
        if cl:
            # binding refused: record it, reopen the channel, clean up, next case
            c.send(A.method_frame(1, 20, 41))
            c.open_channel(1)
            c.send(A.method_frame(1, 40, 20, A.exchange_delete(ex)))
            expect_ok(c, 40, 21)
            BIND_ERRORS.append((table_json(bargs), comment, "%s %d `%s` (class-id %d, method-id %d)" % (
                cl["kind"], cl["code"], cl["text"], cl["class_id"], cl["method_id"])))
            log("headers bind error: %s" % (BIND_ERRORS[-1],))
            continue
        if fr is None or A.describe(fr) != "queue.bind-ok":
            raise RuntimeError("unexpected %s" % (fr and A.describe(fr)))
        if hdrs is None:
            flags, props = 0, b""
        else:
            flags, props = 0x2000, A.table(hdrs)
        c.send(A.method_frame(1, 60, 40, A.basic_publish(ex, "")) +
               A.header_frame(1, 1, flags=flags, props=props) + A.body_frame(1, b"x"))
        time.sleep(0.02)
        c.send(A.method_frame(1, 60, 70, A.basic_get(q, no_ack=True)))
        fr = recv_reply(c)
        name = A.describe(fr)
        if name == "basic.get-ok":
            recv_reply(c)  # header
            recv_reply(c)  # body
            matched = True
        elif name == "basic.get-empty":
            matched = False
        else:
            raise RuntimeError("case %d: %s" % (i, name))
        c.send(A.method_frame(1, 50, 40, struct.pack(">H", 0) + A.shortstr(q) + A.bits()))
        expect_ok(c, 50, 41)
        c.send(A.method_frame(1, 40, 20, A.exchange_delete(ex)))
        expect_ok(c, 40, 21)
        rows.append((table_json(bargs), None if hdrs is None else table_json(hdrs), matched, comment))
    c.close()
    log("headers: %d cases" % len(rows))
    return rows


# ------------------------------------------------------------------ errors
def probe(desc, steps, setup=None):
    """steps(c) sends the probe; returns the first reply frame described."""
    c = A.RawConn(port=PORT).handshake()
    c.open_channel(1)
    if setup:
        setup(c)
    steps(c)
    frames, eof = c.collect(timeout=1.5)
    c.close()
    parts = []
    for fr in frames:
        cl = A.parse_close(fr)
        if cl:
            parts.append("%s %d `%s` (class-id %d, method-id %d)" % (
                cl["kind"], cl["code"], cl["text"], cl["class_id"], cl["method_id"]))
        else:
            parts.append(A.describe(fr))
    if eof:
        parts.append("socket closed")
    return "; ".join(parts) or "no reply"


def ok_call(c, cls, mth, args, rcls, rmth):
    c.send(A.method_frame(1, cls, mth, args))
    expect_ok(c, rcls, rmth)


def run_errors(log):
    rows = []

    def add(desc, steps, setup=None):
        r = probe(desc, steps, setup)
        rows.append((desc, r))
        log("%s -> %s" % (desc, r))

    def send(cls, mth, args):
        return lambda c: c.send(A.method_frame(1, cls, mth, args))

    def publish(ex, rk, mandatory=False):
        return lambda c: c.send(A.method_frame(1, 60, 40, A.basic_publish(ex, rk, mandatory))
                                + A.header_frame(1, 1) + A.body_frame(1, b"x"))

    def mk_ex(name, etype="direct", internal=False):
        return lambda c: ok_call(c, 40, 10, A.exchange_declare(name, etype, internal=internal), 40, 11)

    def cleanup_ex(*names):
        # best-effort deletion on a fresh connection
        c = A.RawConn(port=PORT).handshake()
        c.open_channel(1)
        for n in names:
            c.send(A.method_frame(1, 40, 20, A.exchange_delete(n)))
            recv_reply(c)
        c.close()

    add("exchange.declare 'amq.foo' type direct", send(40, 10, A.exchange_declare("amq.foo", "direct")))
    add("exchange.declare 'amq.foo' passive", send(40, 10, A.exchange_declare("amq.foo", "direct", passive=True)))
    add("exchange.declare 'amq.direct' type direct (same as existing)", send(40, 10, A.exchange_declare("amq.direct", "direct", durable=True)))
    add("exchange.declare 'amq.direct' type topic (differs from existing)", send(40, 10, A.exchange_declare("amq.direct", "topic", durable=True)))
    add("exchange.declare 'amq.direct' type direct non-durable (differs from existing)", send(40, 10, A.exchange_declare("amq.direct", "direct")))
    add("exchange.declare 'amq.direct' passive", send(40, 10, A.exchange_declare("amq.direct", "", passive=True)))
    add("exchange.declare '' (default exchange) type direct", send(40, 10, A.exchange_declare("", "direct", durable=True)))
    add("exchange.declare '' passive", send(40, 10, A.exchange_declare("", "direct", passive=True)))
    add("exchange.declare 'amq.default' passive", send(40, 10, A.exchange_declare("amq.default", "direct", passive=True)))
    add("exchange.delete 'amq.direct'", send(40, 20, A.exchange_delete("amq.direct")))
    add("exchange.delete '' (default exchange)", send(40, 20, A.exchange_delete("")))
    add("exchange.delete of a missing exchange 'warren.nope'", send(40, 20, A.exchange_delete("warren.nope")))
    add("exchange.delete if-unused of a missing exchange", send(40, 20, A.exchange_delete("warren.nope", if_unused=True)))

    def qdecl(c):
        ok_call(c, 50, 10, A.queue_declare("warren.err.q", exclusive=True), 50, 11)
    add("queue.bind queue to default exchange '' (routing key = queue name)",
        send(50, 20, A.queue_bind("warren.err.q", "", "warren.err.q")), setup=qdecl)
    add("queue.unbind queue from default exchange ''",
        send(50, 50, A.queue_unbind("warren.err.q", "", "warren.err.q")), setup=qdecl)
    add("queue.bind to missing exchange 'warren.nope'",
        send(50, 20, A.queue_bind("warren.err.q", "warren.nope", "k")), setup=qdecl)
    add("queue.bind of missing queue to amq.direct",
        send(50, 20, A.queue_bind("warren.no-queue", "amq.direct", "k")))
    add("queue.unbind of a binding that does not exist (queue and exchange exist)",
        send(50, 50, A.queue_unbind("warren.err.q", "amq.direct", "never-bound")), setup=qdecl)
    add("queue.unbind from missing exchange",
        send(50, 50, A.queue_unbind("warren.err.q", "warren.nope", "k")), setup=qdecl)
    add("queue.unbind of missing queue",
        send(50, 50, A.queue_unbind("warren.no-queue", "amq.direct", "k")))

    add("basic.publish to internal exchange 'warren.internal'", publish("warren.internal", "k"),
        setup=mk_ex("warren.internal", "direct", internal=True))
    cleanup_ex("warren.internal")
    add("basic.publish to missing exchange 'warren.nope'", publish("warren.nope", "k"))
    add("basic.publish mandatory to '' with routing key of a missing queue", publish("", "warren.no-queue", True))
    add("exchange.declare with unknown type 'x-foo'", send(40, 10, A.exchange_declare("warren.xfoo", "x-foo")))
    add("exchange.declare with type '' (empty)", send(40, 10, A.exchange_declare("warren.xempty", "")))
    add("exchange.declare passive with unknown type on missing exchange",
        send(40, 10, A.exchange_declare("warren.nope", "x-foo", passive=True)))
    add("exchange.declare passive of missing exchange", send(40, 10, A.exchange_declare("warren.nope", "direct", passive=True)))
    add("redeclare exchange 'warren.redecl' (direct) as topic",
        send(40, 10, A.exchange_declare("warren.redecl", "topic")), setup=mk_ex("warren.redecl", "direct"))
    add("redeclare exchange 'warren.redecl' (direct, non-durable) as durable",
        send(40, 10, A.exchange_declare("warren.redecl", "direct", durable=True)), setup=mk_ex("warren.redecl", "direct"))
    add("redeclare exchange 'warren.redecl' (direct) with auto-delete",
        send(40, 10, A.exchange_declare("warren.redecl", "direct", auto_delete=True)), setup=mk_ex("warren.redecl", "direct"))
    add("redeclare exchange 'warren.redecl' (direct) as internal",
        send(40, 10, A.exchange_declare("warren.redecl", "direct", internal=True)), setup=mk_ex("warren.redecl", "direct"))
    add("redeclare exchange 'warren.redecl' (direct) with arguments {alternate-exchange: 'x'}",
        send(40, 10, A.exchange_declare("warren.redecl", "direct", arguments={"alternate-exchange": "x"})),
        setup=mk_ex("warren.redecl", "direct"))
    add("redeclare exchange 'warren.redecl' passive with different type (topic)",
        send(40, 10, A.exchange_declare("warren.redecl", "topic", passive=True)), setup=mk_ex("warren.redecl", "direct"))
    cleanup_ex("warren.redecl")

    def bound(c):
        ok_call(c, 40, 10, A.exchange_declare("warren.used", "direct"), 40, 11)
        ok_call(c, 50, 10, A.queue_declare("warren.err.q", exclusive=True), 50, 11)
        ok_call(c, 50, 20, A.queue_bind("warren.err.q", "warren.used", "k"), 50, 21)
    add("exchange.delete if-unused on exchange with a queue binding",
        send(40, 20, A.exchange_delete("warren.used", if_unused=True)), setup=bound)
    cleanup_ex("warren.used")

    def e2e_src(c):
        ok_call(c, 40, 10, A.exchange_declare("warren.src", "direct"), 40, 11)
        ok_call(c, 40, 10, A.exchange_declare("warren.dst", "fanout"), 40, 11)
        ok_call(c, 40, 30, A.exchange_bind("warren.dst", "warren.src", "k"), 40, 31)
    add("exchange.delete if-unused on exchange that is only the SOURCE of an e2e binding",
        send(40, 20, A.exchange_delete("warren.src", if_unused=True)), setup=e2e_src)
    cleanup_ex("warren.src", "warren.dst")
    add("exchange.delete if-unused on exchange that is only the DESTINATION of an e2e binding",
        send(40, 20, A.exchange_delete("warren.dst", if_unused=True)), setup=e2e_src)
    cleanup_ex("warren.src", "warren.dst")
    add("exchange.bind where destination 'warren.nope' is missing (source amq.direct)",
        send(40, 30, A.exchange_bind("warren.nope", "amq.direct", "k")))
    add("exchange.bind where source 'warren.nope' is missing (destination amq.fanout)",
        send(40, 30, A.exchange_bind("amq.fanout", "warren.nope", "k")))
    add("exchange.bind with source '' (default exchange)",
        send(40, 30, A.exchange_bind("amq.fanout", "", "k")))
    add("exchange.bind with destination '' (default exchange)",
        send(40, 30, A.exchange_bind("", "amq.direct", "k")))
    add("exchange.unbind of an e2e binding that does not exist (both exchanges exist)",
        send(40, 40, A.exchange_unbind("amq.fanout", "amq.direct", "never-bound")))
    add("exchange.unbind where destination is missing",
        send(40, 40, A.exchange_unbind("warren.nope", "amq.direct", "k")))
    add("exchange.unbind where source is missing",
        send(40, 40, A.exchange_unbind("amq.fanout", "warren.nope", "k")))

    def hx(c):
        ok_call(c, 40, 10, A.exchange_declare("warren.hx", "headers"), 40, 11)
        ok_call(c, 50, 10, A.queue_declare("warren.err.q", exclusive=True), 50, 11)
    add("queue.bind to headers exchange with x-match 'foo'",
        send(50, 20, A.queue_bind("warren.err.q", "warren.hx", "", arguments={"x-match": "foo"})), setup=hx)
    add("queue.bind to headers exchange with x-match 'ALL' (upper case)",
        send(50, 20, A.queue_bind("warren.err.q", "warren.hx", "", arguments={"x-match": "ALL"})), setup=hx)
    add("queue.bind to headers exchange with x-match as signed int 1",
        send(50, 20, A.queue_bind("warren.err.q", "warren.hx", "", arguments={"x-match": 1})), setup=hx)
    add("queue.bind to headers exchange with x-match '' (empty string)",
        send(50, 20, A.queue_bind("warren.err.q", "warren.hx", "", arguments={"x-match": ""})), setup=hx)
    cleanup_ex("warren.hx")
    add("exchange.declare with alternate-exchange argument as int 5 (wrong type)",
        send(40, 10, A.exchange_declare("warren.aeint", "direct", arguments={"alternate-exchange": 5})))
    cleanup_ex("warren.aeint")
    add("exchange.declare name 'amq.' (just the reserved prefix)",
        send(40, 10, A.exchange_declare("amq.", "direct")))
    add("exchange.declare name 'AMQ.foo' (upper-case prefix)",
        send(40, 10, A.exchange_declare("AMQ.foo", "direct")))
    cleanup_ex("AMQ.foo")
    return rows


# ------------------------------------------------------------------ main
def main():
    global PORT
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=int(os.environ.get("RABBITMQ_NODE_PORT", 5673)))
    ap.add_argument("--node", default="warrencap@localhost")
    ap.add_argument("--outdir", default=DEFAULT_OUTDIR)
    ap.add_argument("--only", choices=["topic", "headers", "errors"], default=None)
    args = ap.parse_args()
    PORT = args.port
    os.makedirs(args.outdir, exist_ok=True)

    def log(s):
        print(s, file=sys.stderr)

    try:
        rmq = subprocess.run(["rabbitmqctl", "-n", args.node, "version"],
                             capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception:  # noqa: BLE001
        rmq = "unknown"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    common = ["# Recorded from RabbitMQ %s (Debian package, Erlang/OTP 25) on %s" % (rmq, when),
              "# by conformance/capture/probe_routing.py (observed behaviour only)."]

    if args.only in (None, "topic"):
        rows = run_topic(log)
        path = os.path.join(args.outdir, "topic_rabbitmq_3_10.tsv")
        with open(path, "w") as f:
            f.write("\n".join(common) + "\n")
            f.write("# Lines starting with '#' are comments. Columns are JSON-encoded strings\n"
                    "# (UTF-8, ensure_ascii=false); matches is true/false. Method: fresh topic exchange +\n"
                    "# exclusive queue bound with `pattern`, confirm-mode mandatory publish with `key`;\n"
                    "# matches=false <=> basic.return, cross-checked with basic.get.\n")
            f.write("pattern\tkey\tmatches\n")
            for p, k, m in rows:
                f.write("%s\t%s\t%s\n" % (json.dumps(p, ensure_ascii=False),
                                          json.dumps(k, ensure_ascii=False),
                                          "true" if m else "false"))
        log("wrote " + path)

    if args.only in (None, "headers"):
        rows = run_headers(log)
        path = os.path.join(args.outdir, "headers_rabbitmq_3_10.tsv")
        with open(path, "w") as f:
            f.write("\n".join(common) + "\n")
            f.write(
                "# Lines starting with '#' are comments. Method: fresh headers exchange + exclusive queue,\n"
                "# queue.bind with arguments = binding_args, basic.publish (routing key '') whose content\n"
                "# header carries message_headers as the `headers` property, then basic.get.\n"
                "# Frames are hand-written (amqp_raw.py), so the AMQP field type letters below are exactly\n"
                "# the ones sent on the wire (RabbitMQ/0-9-1-errata letters):\n"
                "#   t bool, b int8, B uint8, s int16, u uint16, I int32, i uint32, l int64, L int64 (sent\n"
                "#   as type byte 'L'), f float32, d float64, D decimal {scale,value}, S longstr (UTF-8),\n"
                "#   x byte array {hex}, T timestamp (u64 seconds), F table, A array, V void.\n"
                "# binding_args / message_headers: JSON object key -> {\"type\": letter, \"value\": ...},\n"
                "#   encoded in that key order. {\"__pairs__\": [[k, v], ...]} is used when a key repeats.\n"
                "# message_headers = null: the content header had NO headers property (flag bit clear).\n"
                "# Column 4 (comment) is free text describing the case.\n")
            for b, comment, err in BIND_ERRORS:
                f.write("# queue.bind REFUSED (no row): %s -- %s -> %s\n"
                        % (json.dumps(b, ensure_ascii=False), comment, err))
            f.write("binding_args\tmessage_headers\tmatches\tcomment\n")
            for b, h, m, comment in rows:
                f.write("%s\t%s\t%s\t%s\n" % (json.dumps(b, ensure_ascii=False),
                                              json.dumps(h, ensure_ascii=False),
                                              "true" if m else "false", comment))
        log("wrote " + path)

    if args.only in (None, "errors"):
        rows = run_errors(log)
        path = os.path.join(args.outdir, "rabbitmq_3_10_exchange_errors.md")
        with open(path, "w") as f:
            f.write("# RabbitMQ %s: exchange-related error replies\n\n" % rmq)
            f.write("Observed on %s with `conformance/capture/probe_routing.py` (hand-written frames, "
                    "fresh connection + channel 1 per row; objects needed by a row are created first "
                    "on the same channel). 'no reply' = nothing within 1.5 s (basic.publish has no "
                    "reply on success).\n\n" % when)
            f.write("| case | reply |\n|---|---|\n")
            for d, r in rows:
                f.write("| %s | %s |\n" % (d.replace("|", "\\|"), r.replace("|", "\\|")))
        log("wrote " + path)


if __name__ == "__main__":
    main()
