#!/usr/bin/env python3
"""Capture golden AMQP 0-9-1 frames exchanged between pika and a real
RabbitMQ node, through a small recording TCP proxy.

Usage:
    /tmp/warren-capture-venv/bin/python capture_golden.py \
        [--port 5673] [--out ../../crates/amqp-codec/tests/golden/pika_rabbitmq_3_10.txt]

The proxy listens on an ephemeral local port, forwards to the broker and
records every byte in both directions with a global sequence number.  After
the scenario the two byte streams are split into frames and written one
frame per line:

    <dir> <type> <channel> <hex of whole frame>  # <description>

dir is C (client->server) or S (server->client); type is the frame type
octet in decimal (1 method, 2 header, 3 body, 8 heartbeat); the first line
is the 8-byte protocol header `C proto 0 414d515000000901`.
Frames are ordered by the sequence number of the socket read that
completed them (so request/response order is preserved).
"""
import argparse
import datetime
import decimal
import hashlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import amqp_raw  # noqa: E402

import pika  # noqa: E402
import pika.data  # noqa: E402
import pika.exceptions  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "..", "..", "crates", "amqp-codec", "tests",
                           "golden", "pika_rabbitmq_3_10.txt")

BIG_BODY_LEN = 300000
# Body frames bigger than this are written in full only the first time one is
# seen (the first client->server body frame of the big message); others are
# replaced by a comment line giving size and sha256.
BIG_FRAME_LIMIT = 4096


def big_body():
    return bytes(i % 251 for i in range(BIG_BODY_LEN))


# --------------------------------------------------------- pika encoder patch
# pika's table encoder picks a type by Python type and cannot encode float or
# the small integer types.  Route amqp_raw.T values and floats through our own
# encoder so the scenario can put every field type RabbitMQ accepts on the wire.
_orig_encode_value = pika.data.encode_value


def _patched_encode_value(pieces, value):
    if isinstance(value, amqp_raw.T) or isinstance(value, float):
        b = amqp_raw.field_value(value)
        pieces.append(b)
        return len(b)
    return _orig_encode_value(pieces, value)


pika.data.encode_value = _patched_encode_value


# --------------------------------------------------------- recording proxy
class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.seq = 0
        self.chunks = []  # (seq, dir, bytes)

    def add(self, d, data):
        with self.lock:
            self.seq += 1
            self.chunks.append((self.seq, d, data))


class Proxy:
    def __init__(self, upstream_port, recorder):
        self.upstream_port = upstream_port
        self.rec = recorder
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(1)
        self.port = self.lsock.getsockname()[1]
        self.threads = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.accept_thread = t

    def _accept(self):
        client, _ = self.lsock.accept()  # exactly one connection is recorded
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        for src, dst, d in ((client, upstream, "C"), (upstream, client, "S")):
            t = threading.Thread(target=self._pump, args=(src, dst, d), daemon=True)
            t.start()
            self.threads.append(t)

    def _pump(self, src, dst, d):
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            self.rec.add(d, data)
            try:
                dst.sendall(data)
            except OSError:
                return

    def wait(self, timeout=10):
        self.accept_thread.join(timeout)
        for t in self.threads:
            t.join(timeout)
        self.lsock.close()


# --------------------------------------------------------- scenario
def full_properties():
    utc = datetime.timezone.utc
    headers = {
        "str": "hello",
        "unicode": "h\u00e9llo \u2603",
        "int": 42,
        "neg": -7,
        "big": 2 ** 40,
        "float": 3.25,
        "bool": True,
        "false": False,
        "nested": {"a": 1, "b": "x", "deeper": {"c": [1, 2]}},
        "list": [1, "two", True, None, {"k": "v"}],
        "void": None,
        "dec": decimal.Decimal("3.14"),
        "ts": datetime.datetime(2023, 11, 14, 22, 13, 20, tzinfo=utc),
        "bytes": b"\x00\x01\xfe\xff",
        "i8": amqp_raw.T("b", -5),
        "u8": amqp_raw.T("B", 200),
        "i16": amqp_raw.T("s", -300),
        "u16": amqp_raw.T("u", 60000),
        "u32": amqp_raw.T("i", 4000000000),
        "f32": amqp_raw.T("f", 1.5),
        "empty_table": {},
        "empty_list": [],
        "empty_str": "",
    }
    return pika.BasicProperties(
        content_type="application/json",
        content_encoding="utf-8",
        headers=headers,
        delivery_mode=2,
        priority=5,
        correlation_id="corr-1",
        reply_to="warren.reply",
        expiration="60000",
        message_id="msg-0001",
        timestamp=1700000000,
        type="warren.test",
        user_id="guest",
        app_id="warren-capture",
        cluster_id="warren-cluster",  # deprecated; RabbitMQ 3.10 accepts it
    )


def run_scenario(port, log):
    params = pika.ConnectionParameters(
        host="127.0.0.1", port=port,
        credentials=pika.PlainCredentials("guest", "guest"),
        heartbeat=2,  # small, so heartbeat frames show up during conn.sleep()
        client_properties={"product": "warren-capture (pika)"},
    )
    conn = pika.BlockingConnection(params)
    ch1 = conn.channel()
    log("exchange.declare x3")
    ch1.exchange_declare("warren.ae", "fanout", durable=True)
    ch1.exchange_declare("warren.topic", "topic", durable=True,
                         arguments={"alternate-exchange": "warren.ae"})
    ch1.exchange_declare("warren.direct2", "direct")
    ch1.exchange_declare("warren.topic", "topic", passive=True)
    log("exchange.bind/unbind")
    ch1.exchange_bind(destination="warren.direct2", source="warren.topic",
                      routing_key="route.#", arguments={"note": "e2e"})
    ch1.exchange_unbind(destination="warren.direct2", source="warren.topic",
                        routing_key="route.#", arguments={"note": "e2e"})
    log("queue.declare")
    q1 = "warren.q1"
    ch1.queue_declare(q1, durable=False, arguments={
        "x-message-ttl": 60000,
        "x-max-length": 1000,
        "x-dead-letter-exchange": "warren.ae",
        "x-max-priority": 10,
    })
    anon = ch1.queue_declare("", exclusive=True).method.queue
    ch1.queue_declare(q1, passive=True)
    log("queue.bind")
    bind_args = {"x-match": "all", "h1": "v1", "h2": 42, "h3": None}
    ch1.queue_bind(q1, "warren.topic", routing_key="a.*.c", arguments=bind_args)
    ch1.queue_bind(anon, "warren.topic", routing_key="#")
    ch1.basic_qos(prefetch_size=0, prefetch_count=10, global_qos=False)

    log("confirm channel")
    ch2 = conn.channel()
    ch2.confirm_delivery()
    ch2.basic_publish("warren.topic", "a.b.c", b'{"hello":"world"}',
                      properties=full_properties(), mandatory=True)
    try:
        ch2.basic_publish("warren.direct2", "nowhere", b"unroutable",
                          properties=pika.BasicProperties(content_type="text/plain"),
                          mandatory=True)
        log("WARNING: unroutable publish was not returned")
    except pika.exceptions.UnroutableError:
        log("got basic.return")
    ch2.basic_publish("", q1, big_body(),
                      properties=pika.BasicProperties(delivery_mode=1))
    ch2.basic_publish("", q1, b"", properties=pika.BasicProperties())

    log("basic.get / ack / nack")
    m, p, body = ch1.basic_get(q1)  # the full-properties message
    assert body == b'{"hello":"world"}', body
    ch1.basic_ack(m.delivery_tag)
    m, p, body = ch1.basic_get(q1)  # the big message
    assert len(body) == BIG_BODY_LEN
    ch1.basic_nack(m.delivery_tag, multiple=False, requeue=True)

    log("basic.consume")
    got = []

    def on_msg(ch, method, props, body):
        got.append((method, props, body))

    ctag = ch1.basic_consume(q1, on_msg, auto_ack=False, consumer_tag="warren.ctag")
    deadline = time.time() + 5
    while len(got) < 2 and time.time() < deadline:
        conn.process_data_events(time_limit=0.2)
    assert len(got) == 2, got
    big = [g for g in got if len(g[2]) == BIG_BODY_LEN][0]
    empty = [g for g in got if len(g[2]) == 0][0]
    ch1.basic_ack(big[0].delivery_tag)
    got.clear()
    ch1.basic_reject(empty[0].delivery_tag, requeue=True)
    deadline = time.time() + 5
    while not got and time.time() < deadline:
        conn.process_data_events(time_limit=0.2)
    assert got
    got.clear()
    log("basic.recover")
    ch1.basic_recover(requeue=True)
    deadline = time.time() + 5
    while not got and time.time() < deadline:
        conn.process_data_events(time_limit=0.2)
    assert got
    ch1.basic_nack(got[-1][0].delivery_tag, multiple=True, requeue=False)
    ch1.basic_cancel(ctag)
    m, p, body = ch1.basic_get(q1)
    assert m is None  # basic.get-empty

    log("purge")
    ch1.basic_publish("", q1, b"to-be-purged-1")
    ch1.basic_publish("", q1, b"to-be-purged-2")
    conn.process_data_events(time_limit=0.3)
    ch1.queue_purge(q1)

    log("tx channel")
    ch3 = conn.channel()
    ch3.tx_select()
    ch3.basic_publish("", anon, b"tx-committed")
    ch3.tx_commit()
    ch3.basic_publish("", anon, b"tx-rolled-back")
    ch3.tx_rollback()

    log("server-initiated basic.cancel (consumed queue deleted)")
    cancelled = []
    ch1.add_on_cancel_callback(lambda frame: cancelled.append(frame))
    ch1.basic_consume(anon, on_msg, auto_ack=True, consumer_tag="warren.ctag2")
    conn.process_data_events(time_limit=0.3)
    ch3.queue_delete(anon)
    deadline = time.time() + 3
    while not cancelled and time.time() < deadline:
        conn.process_data_events(time_limit=0.2)

    log("server-initiated channel.close (passive declare of missing queue)")
    ch4 = conn.channel()
    try:
        ch4.queue_declare("warren.does-not-exist", passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        log("channel closed by broker: %r" % (e,))

    log("unbind / delete")
    ch1.queue_unbind(q1, "warren.topic", routing_key="a.*.c", arguments=bind_args)
    ch1.queue_delete(q1, if_unused=False, if_empty=False)
    ch1.exchange_delete("warren.direct2", if_unused=False)
    ch1.exchange_delete("warren.topic")
    ch1.exchange_delete("warren.ae")

    log("heartbeats")
    conn.sleep(5)
    ch3.close()
    ch2.close()
    ch1.close()
    conn.close()


# --------------------------------------------------------- frame splitting
def split_stream(chunks, d):
    """Return list of (seq, kind, bytes) for direction d."""
    buf = b""
    out = []
    header_done = d == "S"
    for seq, dd, data in chunks:
        if dd != d:
            continue
        buf += data
        if not header_done:
            if len(buf) < 8:
                continue
            out.append((seq, "proto", buf[:8]))
            buf = buf[8:]
            header_done = True
        frames, buf = amqp_raw.split_frames(buf)
        for fr in frames:
            out.append((seq, "frame", fr))
    if buf:
        out.append((10 ** 9, "trailing", buf))
    return out


def describe(fr):
    ftype, ch, size = struct.unpack_from(">BHI", fr, 0)
    if fr[-1] != amqp_raw.FRAME_END:
        return "BAD FRAME END"
    if ftype == 2:
        cls, _w, bsize = struct.unpack_from(">HHQ", fr, 7)
        return "header class=%d body_size=%d" % (cls, bsize)
    if ftype == 3:
        return "body %d bytes" % size
    if ftype == 1:
        cls, mth = struct.unpack_from(">HH", fr, 7)
        return amqp_raw.method_name(cls, mth)
    return amqp_raw.describe(fr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=int(os.environ.get("RABBITMQ_NODE_PORT", 5673)))
    ap.add_argument("--node", default="warrencap@localhost")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()

    rec = Recorder()
    proxy = Proxy(args.port, rec)
    run_scenario(proxy.port, lambda s: print("[scenario]", s, file=sys.stderr))
    proxy.wait()

    try:
        rmq = subprocess.run(["rabbitmqctl", "-n", args.node, "version"],
                             capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception:  # noqa: BLE001
        rmq = "unknown"

    lines = [
        "# Golden AMQP 0-9-1 frames: pika <-> RabbitMQ, recorded by a TCP proxy.",
        "# Produced by conformance/capture/capture_golden.py (observed wire bytes only).",
        "# RabbitMQ server: %s (Debian package rabbitmq-server), Erlang/OTP 25" % rmq,
        "# Client: pika %s (Python %s), BlockingConnection, heartbeat=2, default frame_max 131072"
        % (pika.__version__, sys.version.split()[0]),
        "# Captured: %s" % datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "# Format: <dir> <type> <channel> <hex of whole frame incl. 7-byte header and 0xCE>  # <what>",
        "#   dir: C = client->server, S = server->client; type: 1 method, 2 header, 3 body, 8 heartbeat.",
        "#   Frames are in the order the proxy read them (per-direction order is exact).",
        "# The publish header table uses pika's encoder plus explicit 'b','B','s','u','i','f','d' values",
        "#   (pika cannot encode those itself; the script patches pika.data.encode_value).",
        "# Big message: body = bytes(i %% 251 for i in range(%d)), frame_max 131072 -> body frames of"
        % BIG_BODY_LEN,
        "#   131064 + 131064 + 37872 bytes. Only the FIRST body frame of it (client->server) is kept in",
        "#   full; the other big body frames are replaced by '# omitted ...' comment lines (size, sha256).",
    ]
    kept_big = False
    out = list(lines)
    tagged = [(s, "C", k, b) for s, k, b in split_stream(rec.chunks, "C")] + \
             [(s, "S", k, b) for s, k, b in split_stream(rec.chunks, "S")]
    tagged.sort(key=lambda x: (x[0], x[1]))
    for seq, d, kind, data in tagged:
        if kind == "proto":
            out.append("%s proto 0 %s  # protocol header" % (d, data.hex()))
            continue
        if kind == "trailing":
            out.append("# %s trailing incomplete bytes: %s" % (d, data.hex()))
            continue
        ftype, ch, size = struct.unpack_from(">BHI", data, 0)
        desc = describe(data)
        if ftype == 3 and size > BIG_FRAME_LIMIT:
            if not kept_big and d == "C":
                kept_big = True
                desc += " (first body frame of the %d-byte message)" % BIG_BODY_LEN
            else:
                out.append("# omitted: %s %d %d body frame, payload %d bytes, sha256 %s"
                           % (d, ftype, ch, size, hashlib.sha256(data[7:-1]).hexdigest()))
                continue
        out.append("%s %d %d %s  # %s" % (d, ftype, ch, data.hex(), desc))

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(out) + "\n")
    print("wrote %s (%d lines, %d bytes)" % (args.out, len(out), os.path.getsize(args.out)),
          file=sys.stderr)


if __name__ == "__main__":
    main()
