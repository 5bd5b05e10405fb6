#!/usr/bin/env python3
"""Warren conformance scenarios driven through pika (BlockingConnection).

Usage: pika_scenarios.py --port N [--host H] [--product Warren]
                         [--alarm-port N] [--timeout-port N]
                         [--tls-port N --tls-dir DIR] [--only a,b]

Every scenario opens its own connection, uses its own uniquely named entities
and prints exactly one line: `PASS pika.<name>` or `FAIL pika.<name>: reason`
(`SKIP pika.<name>: reason` for connection_blocked / consumer_timeout / tls_* when
the broker they need, --alarm-port / --timeout-port / --tls-port with --tls-dir,
is not given).
The expected behaviour is RabbitMQ 3.10's; a mismatch is a failure, never
something to be tolerated here.  Exit status: 0 if all passed, 1 otherwise.
"""

import argparse
import datetime
import os
import signal
import ssl
import sys
import threading
import time
import traceback

import pika
from pika.exceptions import ChannelClosedByBroker, UnroutableError
from scenario_common import Failure, check, eq, install_timeout, namer

SCENARIO_TIMEOUT = 30  # seconds; a hung scenario fails instead of hanging the run


name = namer("pika")


def wait_until(conn, pred, timeout, what):
    """Drive the connection's I/O until pred() holds, for at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while not pred():
        left = deadline - time.monotonic()
        if left <= 0:
            raise Failure(f"timed out after {timeout}s waiting for {what}")
        conn.process_data_events(time_limit=min(left, 0.05))


def collector(ch, queue, auto_ack=False, arguments=None):
    """Start a consumer that appends (method, properties, body) to a list."""
    got = []

    def on_message(_ch, method, props, body):
        got.append((method, props, body))

    tag = ch.basic_consume(queue, on_message, auto_ack=auto_ack, arguments=arguments)
    return got, tag


def bodies(got):
    return [b for _, _, b in got]


def expect_channel_close(fn, code, text, what):
    try:
        fn()
    except ChannelClosedByBroker as e:
        eq(e.reply_code, code, f"{what}: reply code")
        eq(e.reply_text, text, f"{what}: reply text")
        return
    raise Failure(f"{what}: channel was not closed by the broker")


# --------------------------------------------------------------------------
# scenarios; each takes a connect() factory


def s01_handshake(connect):
    conn = connect()
    try:
        props = conn._impl.server_properties
        check(props is not None, "no server properties")
        product = props.get("product")
        if isinstance(product, bytes):
            product = product.decode()
        eq(product, ARGS.product, "server_properties.product")
        caps = props.get("capabilities")
        check(isinstance(caps, dict), f"capabilities is not a table: {caps!r}")
        eq(caps.get("publisher_confirms"), True, "capabilities.publisher_confirms")
        eq(caps.get("basic.nack"), True, "capabilities.basic.nack")
        ch = conn.channel()
        check(ch.is_open, "channel did not open")
        ch.close()
    finally:
        conn.close()


def s02_declare_get_properties(connect):
    conn = connect()
    try:
        ch = conn.channel()
        ok = ch.queue_declare("", exclusive=True)
        anon = ok.method.queue
        check(anon.startswith("amq.gen-"), f"server-named queue {anon!r} does not start with amq.gen-")
        eq((ok.method.message_count, ok.method.consumer_count), (0, 0), "counts of new queue")
        named = name("props")
        ok = ch.queue_declare(named)
        eq(ok.method.queue, named, "declare-ok queue name")

        props = pika.BasicProperties(
            content_type="application/json",
            headers={"s": "str", "i": 42, "b": True},
            correlation_id="corr-1",
            delivery_mode=2,
        )
        for q in (anon, named):
            ch.basic_publish("", q, b'{"k": 1}', props)
            ch.basic_publish("", q, b"second")
        for q in (anon, named):
            method, p, body = ch.basic_get(q, auto_ack=True)
            check(method is not None, f"basic.get on {q} returned empty")
            eq(body, b'{"k": 1}', "body")
            eq(method.routing_key, q, "get-ok routing key")
            eq(method.exchange, "", "get-ok exchange")
            eq(method.redelivered, False, "get-ok redelivered")
            eq(method.message_count, 1, "get-ok message_count")
            eq(p.content_type, "application/json", "content_type")
            eq(p.headers, {"s": "str", "i": 42, "b": True}, "headers")
            eq(p.correlation_id, "corr-1", "correlation_id")
            eq(p.delivery_mode, 2, "delivery_mode")
            method, p, body = ch.basic_get(q, auto_ack=True)
            eq(body, b"second", "second body")
            eq((p.content_type, p.headers, p.delivery_mode), (None, None, None), "properties of a bare message")
            method, _, _ = ch.basic_get(q)
            eq(method, None, "basic.get on an empty queue")
        ch.queue_delete(named)

        # the exclusive queue belongs to this connection only ...
        locked = (f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{anon}' in vhost '/'. "
                  "It could be originally declared on another connection or the exclusive property value "
                  "does not match that of the original declaration.")
        other = connect()
        try:
            och = other.channel()
            expect_channel_close(lambda: och.queue_declare(anon, passive=True), 405, locked,
                                 "passive declare of another connection's exclusive queue")
            och = other.channel()
            expect_channel_close(lambda: och.basic_get(anon), 405, locked,
                                 "basic.get from another connection's exclusive queue")
            # ... and is deleted when that connection closes
            conn.close()
            och = other.channel()
            expect_channel_close(lambda: och.queue_declare(anon, passive=True), 404,
                                 f"NOT_FOUND - no queue '{anon}' in vhost '/'",
                                 "exclusive queue after its connection closed")
        finally:
            other.close()
    finally:
        if conn.is_open:
            conn.close()


def s03_consume_prefetch_ack(connect):
    conn = connect()
    try:
        ch = conn.channel()
        q = name("consume")
        ch.queue_declare(q)
        n = 1000
        for i in range(n):
            ch.basic_publish("", q, f"m{i}".encode())
        ch.basic_qos(prefetch_count=10)
        got, tag = collector(ch, q)
        wait_until(conn, lambda: len(got) >= 10, 5, "the first 10 deliveries")
        # prefetch 10: nothing more may arrive while 10 are unacknowledged
        conn.process_data_events(time_limit=0.3)
        eq(len(got), 10, "deliveries outstanding with prefetch 10 and no acks")
        acked = 0
        deadline = time.monotonic() + 20
        while acked < n:
            check(time.monotonic() < deadline, f"only {len(got)} of {n} delivered")
            # ack every 10th delivery with multiple=True
            while acked + 10 <= len(got) or (len(got) == n and acked < n):
                last = min(acked + 10, len(got)) - 1
                ch.basic_ack(got[last][0].delivery_tag, multiple=True)
                acked = last + 1
            if acked < n:
                conn.process_data_events(time_limit=0.05)
        bodies = [b for _, _, b in got]
        eq(len(bodies), n, "number delivered")
        check(bodies == [f"m{i}".encode() for i in range(n)], "messages not delivered in publish order")
        tags = [m.delivery_tag for m, _, _ in got]
        check(tags == list(range(1, n + 1)), "delivery tags are not 1..1000")
        check(not any(m.redelivered for m, _, _ in got), "a first delivery has redelivered=true")
        ch.basic_cancel(tag)
        ok = ch.queue_declare(q, passive=True)
        eq(ok.method.message_count, 0, "message_count after acking everything")
        ch.queue_delete(q)
    finally:
        conn.close()


def s04_publisher_confirms(connect):
    conn = connect()
    try:
        ch = conn.channel()
        q = name("confirms")
        ch.queue_declare(q, durable=True)
        ch.confirm_delivery()
        props = pika.BasicProperties(delivery_mode=2)
        for i in range(500):
            # blocks until basic.ack; raises NackError/UnroutableError otherwise
            ch.basic_publish("", q, f"c{i}".encode(), props, mandatory=True)
        ok = ch.queue_declare(q, durable=True, passive=True)
        eq(ok.method.message_count, 500, "message_count after 500 confirmed publishes")
        ch.queue_delete(q)
    finally:
        conn.close()


def s05_mandatory_return(connect):
    conn = connect()
    try:
        ch = conn.channel()
        returned = []
        ch.add_on_return_callback(lambda _c, m, p, b: returned.append((m, p, b)))
        key = name("nowhere")
        ch.basic_publish("", key, b"lost", pika.BasicProperties(correlation_id="r1"), mandatory=True)
        wait_until(conn, lambda: returned, 5, "basic.return")
        m, p, b = returned[0]
        eq(m.reply_code, 312, "basic.return reply_code")
        eq(m.reply_text, "NO_ROUTE", "basic.return reply_text")
        eq(m.exchange, "", "basic.return exchange")
        eq(m.routing_key, key, "basic.return routing_key")
        eq(b, b"lost", "returned body")
        eq(p.correlation_id, "r1", "returned correlation_id")
        # non-mandatory unroutable: silently dropped, no return
        ch.basic_publish("", key, b"dropped")
        conn.process_data_events(time_limit=0.2)
        eq(len(returned), 1, "returns after a non-mandatory unroutable publish")
        # in confirm mode pika turns return-then-ack into UnroutableError
        ch2 = conn.channel()
        ch2.confirm_delivery()
        try:
            ch2.basic_publish("amq.direct", key, b"lost2", mandatory=True)
            raise Failure("confirm-mode mandatory publish was not returned")
        except UnroutableError as e:
            eq(len(e.messages), 1, "returned messages in confirm mode")
            eq(e.messages[0].method.reply_code, 312, "confirm-mode return reply_code")
            eq(e.messages[0].method.exchange, "amq.direct", "confirm-mode return exchange")
    finally:
        conn.close()


def s06_topic_routing(connect):
    conn = connect()
    try:
        ch = conn.channel()
        ex = name("topic")
        qa, qb = name("topic-a"), name("topic-b")
        ch.exchange_declare(ex, exchange_type="topic")
        ch.queue_declare(qa)
        ch.queue_declare(qb)
        ch.queue_bind(qa, ex, "a.*.c")
        ch.queue_bind(qb, ex, "a.#")
        for key in ("a.b.c", "a.x", "z"):
            ch.basic_publish(ex, key, key.encode())

        def drain(q):
            out = []
            while True:
                m, _, b = ch.basic_get(q, auto_ack=True)
                if m is None:
                    return out
                eq(m.exchange, ex, "get-ok exchange")
                eq(m.routing_key, b.decode(), "get-ok routing key")
                out.append(b.decode())

        eq(drain(qa), ["a.b.c"], "messages in queue bound with a.*.c")
        eq(drain(qb), ["a.b.c", "a.x"], "messages in queue bound with a.#")
        ch.queue_delete(qa)
        ch.queue_delete(qb)
        ch.exchange_delete(ex)
    finally:
        conn.close()


def s07_nack_reject_dlx(connect):
    conn = connect()
    try:
        ch = conn.channel()
        dlx, dlq, q = name("dlx"), name("dlq"), name("work")
        ch.exchange_declare(dlx, exchange_type="fanout")
        ch.queue_declare(dlq)
        ch.queue_bind(dlq, dlx)
        ch.queue_declare(q, arguments={"x-dead-letter-exchange": dlx})
        ch.basic_publish("", q, b"n1", pika.BasicProperties(headers={"orig": "yes"}))
        got, tag = collector(ch, q)
        wait_until(conn, lambda: len(got) >= 1, 5, "first delivery")
        eq(got[0][0].redelivered, False, "first delivery redelivered flag")
        ch.basic_nack(got[0][0].delivery_tag, requeue=True)
        wait_until(conn, lambda: len(got) >= 2, 5, "redelivery after nack requeue=true")
        m2, _, b2 = got[1]
        eq(b2, b"n1", "redelivered body")
        eq(m2.redelivered, True, "redelivered flag after nack requeue=true")
        ch.basic_reject(m2.delivery_tag, requeue=False)
        dead, dtag = collector(ch, dlq)
        wait_until(conn, lambda: dead, 5, "dead-lettered message in the DLX queue")
        conn.process_data_events(time_limit=0.1)
        eq(len(got), 2, "deliveries from the work queue (reject requeue=false must not requeue)")
        dm, dp, db = dead[0]
        eq(db, b"n1", "dead-lettered body")
        eq(dm.exchange, dlx, "dead-lettered message exchange")
        eq(dm.routing_key, q, "dead-lettered message routing key")
        h = dp.headers or {}
        eq(h.get("orig"), "yes", "original header kept")
        xd = h.get("x-death")
        check(isinstance(xd, list) and len(xd) == 1, f"x-death should be a one-entry array, got {xd!r}")
        e = xd[0]
        eq(e.get("reason"), "rejected", "x-death reason")
        eq(e.get("queue"), q, "x-death queue")
        eq(e.get("count"), 1, "x-death count")
        eq(e.get("exchange"), "", "x-death exchange")
        eq(e.get("routing-keys"), [q], "x-death routing-keys")
        check(isinstance(e.get("time"), datetime.datetime), f"x-death time is not a timestamp: {e.get('time')!r}")
        eq(h.get("x-first-death-reason"), "rejected", "x-first-death-reason")
        eq(h.get("x-first-death-queue"), q, "x-first-death-queue")
        eq(h.get("x-first-death-exchange"), "", "x-first-death-exchange")
        ch.basic_ack(dm.delivery_tag)
        ch.basic_cancel(tag)
        ch.basic_cancel(dtag)
        eq(ch.queue_declare(q, passive=True).method.message_count, 0, "work queue left empty")
        for x in (q, dlq):
            ch.queue_delete(x)
        ch.exchange_delete(dlx)
    finally:
        conn.close()


def s08_transactions(connect):
    conn = connect()
    try:
        ch = conn.channel()
        q = name("tx")
        ch.queue_declare(q)
        ch.tx_select()
        ch.basic_publish("", q, b"t1")
        eq(ch.queue_declare(q, passive=True).method.message_count, 0, "message_count before commit")
        ch.tx_rollback()
        eq(ch.queue_declare(q, passive=True).method.message_count, 0, "message_count after rollback")
        ch.basic_publish("", q, b"t2")
        ch.tx_commit()
        eq(ch.queue_declare(q, passive=True).method.message_count, 1, "message_count after commit")
        m, _, b = ch.basic_get(q, auto_ack=True)
        eq(b, b"t2", "committed body")
        m, _, _ = ch.basic_get(q, auto_ack=True)
        eq(m, None, "a second message after rollback+commit")
        ch.tx_commit()
        ch.queue_delete(q)
    finally:
        conn.close()


def s09_errors(connect):
    conn = connect()
    try:
        missing = name("missing")
        ch = conn.channel()
        expect_channel_close(
            lambda: ch.queue_declare(missing, passive=True),
            404, f"NOT_FOUND - no queue '{missing}' in vhost '/'", "passive declare of a missing queue")
        check(not ch.is_open, "channel still open after 404")
        check(conn.is_open, "connection closed after a channel error")

        ch = conn.channel()
        ch.basic_publish("nope", "rk", b"x")
        # the close is asynchronous; the next synchronous call observes it
        expect_channel_close(
            lambda: ch.queue_declare(name("after-publish")),
            404, "NOT_FOUND - no exchange 'nope' in vhost '/'", "publish to missing exchange")

        ch = conn.channel()
        q = name("durable-diff")
        ch.queue_declare(q, durable=False)
        expect_channel_close(
            lambda: ch.queue_declare(q, durable=True),
            406,
            f"PRECONDITION_FAILED - inequivalent arg 'durable' for queue '{q}' in vhost '/': "
            "received 'true' but current is 'false'",
            "redeclare with different durable")

        ch = conn.channel()
        eq(ch.queue_declare(q, passive=True).method.queue, q, "connection usable after channel errors")
        ch.queue_delete(q)
    finally:
        if conn.is_open:
            conn.close()


def s10_ttl_dead_letter(connect):
    conn = connect()
    try:
        ch = conn.channel()
        q, dlq = name("ttl"), name("ttl-dlq")
        ch.queue_declare(dlq)
        ch.queue_declare(q, arguments={
            "x-message-ttl": 100,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": dlq,
        })
        t0 = time.monotonic()
        ch.basic_publish("", q, b"ephemeral")
        dead, tag = collector(ch, dlq)
        wait_until(conn, lambda: dead, 5, "expired message in the dead-letter queue")
        elapsed = time.monotonic() - t0
        check(elapsed >= 0.09, f"dead-lettered after {elapsed:.3f}s, before the 100 ms TTL")
        dm, dp, db = dead[0]
        eq(db, b"ephemeral", "expired body")
        eq(dm.routing_key, dlq, "dead-letter routing key")
        xd = (dp.headers or {}).get("x-death")
        check(isinstance(xd, list) and len(xd) == 1, f"x-death should be a one-entry array, got {xd!r}")
        eq(xd[0].get("reason"), "expired", "x-death reason")
        eq(xd[0].get("queue"), q, "x-death queue")
        eq(xd[0].get("routing-keys"), [q], "x-death routing-keys")
        eq(xd[0].get("exchange"), "", "x-death exchange")
        eq(xd[0].get("count"), 1, "x-death count")
        eq(dp.headers.get("x-first-death-reason"), "expired", "x-first-death-reason")
        ch.basic_ack(dm.delivery_tag)
        ch.basic_cancel(tag)
        eq(ch.queue_declare(q, passive=True).method.message_count, 0, "TTL queue left empty")
        ch.queue_delete(q)
        ch.queue_delete(dlq)
    finally:
        conn.close()


def s11_consumer_priorities(connect):
    conn = connect()
    try:
        ch = conn.channel()
        q = name("priorities")
        ch.queue_declare(q)
        # the low-priority consumer registers first, so plain round-robin would
        # hand it the first message
        low_ch, high_ch = conn.channel(), conn.channel()
        low, low_tag = collector(low_ch, q, arguments={"x-priority": 1})
        high_ch.basic_qos(prefetch_count=2)  # global=false: per consumer
        high, high_tag = collector(high_ch, q, arguments={"x-priority": 10})
        for i in range(5):
            ch.basic_publish("", q, f"p{i}".encode())
        wait_until(conn, lambda: len(high) + len(low) >= 5, 5, "5 deliveries")
        conn.process_data_events(time_limit=0.2)  # nothing more may arrive
        eq(bodies(high), [b"p0", b"p1"], "messages to the x-priority 10 consumer (prefetch 2, unacked)")
        eq(bodies(low), [b"p2", b"p3", b"p4"], "messages to the x-priority 1 consumer")
        low_ch.basic_ack(low[-1][0].delivery_tag, multiple=True)
        high_ch.basic_ack(high[-1][0].delivery_tag, multiple=True)
        low_ch.basic_cancel(low_tag)
        high_ch.basic_cancel(high_tag)
        eq(ch.queue_declare(q, passive=True).method.message_count, 0, "queue left empty")
        ch.queue_delete(q)
    finally:
        conn.close()


def s12_single_active_consumer(connect):
    conn = connect()
    try:
        ch = conn.channel()
        q = name("sac")
        ch.queue_declare(q, arguments={"x-single-active-consumer": True})
        ch1, ch2 = conn.channel(), conn.channel()
        first, _ = collector(ch1, q)
        second, tag2 = collector(ch2, q)
        for i in range(4):
            ch.basic_publish("", q, f"s{i}".encode())
        wait_until(conn, lambda: len(first) + len(second) >= 4, 5, "4 deliveries")
        conn.process_data_events(time_limit=0.2)
        eq(bodies(first), [b"s0", b"s1", b"s2", b"s3"], "messages to the active consumer")
        eq(len(second), 0, "deliveries to the second consumer while the first is active")
        check(not any(m.redelivered for m, _, _ in first), "a first delivery has redelivered=true")
        ch1.basic_ack(first[0][0].delivery_tag)
        ch1.close()  # s1..s3 unacked: requeued, and the second consumer becomes active
        wait_until(conn, lambda: len(second) >= 3, 5, "3 deliveries to the second consumer after the first's channel closed")
        conn.process_data_events(time_limit=0.2)
        eq(bodies(second), [b"s1", b"s2", b"s3"], "messages to the second consumer (the unacked ones, in order)")
        eq([m.redelivered for m, _, _ in second], [True] * 3, "redelivered flags of the handed-over messages")
        ch2.basic_ack(second[-1][0].delivery_tag, multiple=True)
        ch2.basic_cancel(tag2)
        eq(ch.queue_declare(q, passive=True).method.message_count, 0, "queue left empty")
        ch.queue_delete(q)
    finally:
        conn.close()


REPLY_TO = "amq.rabbitmq.reply-to"


def s13_direct_reply_to(connect):
    client = connect()
    server = None
    try:
        ch = client.channel()
        q = name("rpc")
        ch.queue_declare(q)
        replies, rtag = collector(ch, REPLY_TO, auto_ack=True)
        ch.confirm_delivery()  # the confirm tells when the request is in the queue
        ch.basic_publish("", q, b"request", pika.BasicProperties(reply_to=REPLY_TO, correlation_id="rpc-1"))

        server = connect()
        sch = server.channel()
        m, p, body = sch.basic_get(q, auto_ack=True)
        check(m is not None, "basic.get of the request returned empty")
        eq(body, b"request", "request body")
        eq(p.correlation_id, "rpc-1", "request correlation_id")
        reply_to = p.reply_to
        check(isinstance(reply_to, str) and reply_to.startswith(REPLY_TO + ".") and len(reply_to) > len(REPLY_TO) + 1,
              f"reply_to was not rewritten to {REPLY_TO}.<token>: {reply_to!r}")
        sch.basic_publish("", reply_to, b"reply", pika.BasicProperties(correlation_id="rpc-1"))
        wait_until(client, lambda: replies, 5, "the reply on the direct reply-to consumer")
        rm, rp, rb = replies[0]
        eq(rb, b"reply", "reply body")
        eq(rp.correlation_id, "rpc-1", "reply correlation_id")
        eq(rm.consumer_tag, rtag, "reply consumer tag")
        eq(rm.exchange, "", "reply exchange")
        eq(rm.routing_key, reply_to, "reply routing key")
        eq(rm.redelivered, False, "reply redelivered flag")
        ch.queue_delete(q)

        # the pseudo-queue only supports no-ack consumers
        ch2 = client.channel()
        expect_channel_close(lambda: ch2.basic_consume(REPLY_TO, lambda *a: None, auto_ack=False),
                             406, "PRECONDITION_FAILED - reply consumer cannot acknowledge",
                             "manual-ack consumer on amq.rabbitmq.reply-to")
        check(client.is_open, "connection closed after the channel error")
    finally:
        for c in (client, server):
            if c is not None and c.is_open:
                c.close()


def s14_delivery_count(connect):
    conn = connect()
    try:
        ch = conn.channel()
        q = name("delivery-count")
        # RabbitMQ 3.10 sets x-delivery-count on quorum queues (not classic ones)
        ch.queue_declare(q, durable=True, arguments={"x-queue-type": "quorum"})
        ch.basic_publish("", q, b"d1", pika.BasicProperties(headers={"orig": "yes"}))
        got, tag = collector(ch, q)
        wait_until(conn, lambda: got, 5, "first delivery")
        m1, p1, _ = got[0]
        eq(m1.redelivered, False, "first delivery redelivered flag")
        eq(p1.headers, {"orig": "yes"}, "headers of the first delivery (no x-delivery-count)")
        ch.basic_nack(m1.delivery_tag, requeue=True)
        wait_until(conn, lambda: len(got) >= 2, 5, "redelivery after nack requeue=true")
        m2, p2, b2 = got[1]
        eq(b2, b"d1", "redelivered body")
        eq(m2.redelivered, True, "redelivered flag after nack requeue=true")
        h = p2.headers or {}
        dc = h.get("x-delivery-count")
        check(isinstance(dc, int) and not isinstance(dc, bool), f"x-delivery-count is not an integer: {dc!r} (headers {h!r})")
        eq(dc, 1, "x-delivery-count of the redelivery")
        eq(h.get("orig"), "yes", "original header kept")
        ch.basic_ack(m2.delivery_tag)
        ch.basic_cancel(tag)
        eq(ch.queue_declare(q, durable=True, passive=True, arguments={"x-queue-type": "quorum"}).method.message_count,
           0, "queue left empty")
        ch.queue_delete(q)
    finally:
        conn.close()


BLOCKED_N = 2000          # messages published in connection_blocked
BLOCKED_SIZE = 1024       # body size; the alarm broker's watermark is 256 KiB


def blocked_body(i):
    return f"{i:06d}".encode().ljust(BLOCKED_SIZE, b".")


class AsyncPublisher(threading.Thread):
    """Publishes BLOCKED_N messages with confirms on a SelectConnection in its
    own thread (a BlockingConnection would sit inside basic_publish while the
    broker is not reading, and dispatches connection.blocked only later).
    Finishes once every publish is confirmed and the connection is unblocked,
    or fails after `timeout` s."""

    def __init__(self, params, queue, timeout):
        super().__init__(daemon=True, name="pika-publisher")
        self.params, self.queue, self.timeout = params, queue, timeout
        self.outstanding = set(range(1, BLOCKED_N + 1))
        self.duplicate_acks = []
        self.nacked = []
        self.events = []  # ("blocked", reason, confirmed) | ("unblocked", None, confirmed)
        self.is_blocked = False
        self.blocked = threading.Event()
        self.error = None
        self.closing = False
        self.conn = None

    def confirmed(self):
        return BLOCKED_N - len(self.outstanding)

    def run(self):
        try:
            self.conn = pika.SelectConnection(
                self.params, on_open_callback=self._on_open,
                on_open_error_callback=lambda _c, e: self._fail(f"publisher connection failed: {e!r}"),
                on_close_callback=self._on_close)
            self.conn.add_on_connection_blocked_callback(self._on_blocked)
            self.conn.add_on_connection_unblocked_callback(self._on_unblocked)
            self.conn.ioloop.call_later(self.timeout, self._on_deadline)
            self.conn.ioloop.start()
        except BaseException as e:  # noqa: BLE001
            self.error = self.error or f"publisher crashed: {e!r}"

    def _fail(self, msg):
        if self.error is None:
            self.error = msg
        self.conn.ioloop.stop()

    def _on_open(self, conn):
        conn.channel(on_open_callback=self._on_channel)

    def _on_channel(self, ch):
        self.ch = ch
        ch.add_on_close_callback(lambda _c, r: self.closing or self._fail(f"publisher channel closed: {r!r}"))
        ch.confirm_delivery(self._on_confirm, callback=lambda _f: self._publish_all())

    def _publish_all(self):
        for i in range(BLOCKED_N):
            self.ch.basic_publish("", self.queue, blocked_body(i))

    def _on_confirm(self, frame):
        m = frame.method
        if m.multiple:
            tags = {t for t in self.outstanding if t <= m.delivery_tag}
        else:
            tags = {m.delivery_tag} & self.outstanding
        if not tags:
            self.duplicate_acks.append(m.delivery_tag)
        if isinstance(m, pika.spec.Basic.Nack):
            self.nacked.extend(sorted(tags))
        self.outstanding -= tags
        self._maybe_finish()

    def _on_blocked(self, _conn, frame):
        self.is_blocked = True
        self.events.append(("blocked", frame.method.reason, self.confirmed()))
        self.blocked.set()

    def _on_unblocked(self, _conn, _frame):
        self.is_blocked = False
        self.events.append(("unblocked", None, self.confirmed()))
        self._maybe_finish()

    def _maybe_finish(self):
        if not self.outstanding and not self.is_blocked and not self.closing:
            self.closing = True
            self.conn.close()

    def _on_close(self, conn, reason):
        if not self.closing:
            self.error = self.error or f"publisher connection closed: {reason!r}"
        conn.ioloop.stop()

    def _on_deadline(self):
        self._fail(f"publisher not done after {self.timeout}s: {self.confirmed()} of {BLOCKED_N} confirmed, "
                   f"blocked={self.is_blocked}, events {[e[:2] for e in self.events]}")


def s15_connection_blocked(connect):
    q = name("blocked")
    conn = connect()
    pub = None
    done = False
    try:
        ch = conn.channel()
        ch.queue_declare(q)
        pub = AsyncPublisher(connect.params, q, timeout=20)
        pub.start()
        # nobody consumes yet: the broker must block the publishing connection
        check(pub.blocked.wait(10) and pub.error is None,
              pub.error or f"no connection.blocked within 10s ({pub.confirmed()} of {BLOCKED_N} confirmed)")
        confirmed_at_block = pub.events[0][2]
        # drain from another connection until every message has arrived
        got, tag = collector(ch, q, auto_ack=True)
        try:
            wait_until(conn, lambda: len(got) >= BLOCKED_N or pub.error is not None, 20,
                       f"{BLOCKED_N} drained messages")
        except Failure as e:
            raise Failure(f"{e}: {len(got)} drained, {pub.confirmed()} confirmed, "
                          f"notifications {[ev[0] for ev in pub.events]}") from None
        pub.join(10)
        check(not pub.is_alive(), "publisher still running 10s after the queue was drained")
        if pub.error:
            raise Failure(pub.error)
        conn.process_data_events(time_limit=0.1)
        eq(pub.nacked, [], "nacked publishes")
        eq(pub.duplicate_acks, [], "confirms for already-confirmed tags")
        eq(pub.confirmed(), BLOCKED_N, "confirmed publishes")
        kinds = [e[0] for e in pub.events]
        check(kinds[0] == "blocked" and kinds[-1] == "unblocked"
              and all(a != b for a, b in zip(kinds, kinds[1:])),
              f"blocked/unblocked notifications do not alternate from blocked to unblocked: {kinds}")
        eq({e[1] for e in pub.events if e[0] == "blocked"}, {"low on memory"}, "connection.blocked reason")
        check(confirmed_at_block < BLOCKED_N, "the connection was blocked only after every publish was confirmed")
        eq(len(got), BLOCKED_N, "messages drained (no loss, no duplicates)")
        check(bodies(got) == [blocked_body(i) for i in range(BLOCKED_N)], "drained messages not in publish order")
        ch.basic_cancel(tag)
        eq(ch.queue_declare(q, passive=True).method.message_count, 0, "queue left empty")
        ch.queue_delete(q)
        done = True
    finally:
        if conn.is_open:
            conn.close()
        if not done:
            # free the broker's memory so later scenarios are not blocked
            try:
                c = connect()
                c.channel().queue_delete(q)
                c.close()
            except Exception:  # noqa: BLE001
                pass


CONSUMER_TIMEOUT_MS = 300  # the timeout broker's --consumer-timeout


def s16_consumer_timeout(connect):
    conn = connect()
    try:
        ch = conn.channel()
        q = name("consumer-timeout")
        ch.queue_declare(q)
        ch.basic_publish("", q, b"slow")
        closes = []
        ch._impl.add_on_close_callback(lambda _c, reason: closes.append((time.monotonic(), reason)))
        t0 = time.monotonic()
        got, _ = collector(ch, q)
        wait_until(conn, lambda: got, 5, "the delivery")
        eq(got[0][2], b"slow", "delivered body")
        wait_until(conn, lambda: closes, 5, "the channel close for the unacknowledged delivery")
        elapsed = closes[0][0] - t0
        reason = closes[0][1]
        check(isinstance(reason, ChannelClosedByBroker), f"channel closed by {reason!r}, not by the broker")
        eq(reason.reply_code, 406, "consumer timeout reply code")
        eq(reason.reply_text,
           f"PRECONDITION_FAILED - delivery acknowledgement on channel {ch.channel_number} timed out. "
           f"Timeout value used: {CONSUMER_TIMEOUT_MS} ms. This timeout value can be configured, "
           "see consumers doc guide to learn more",
           "consumer timeout reply text")
        check(elapsed >= CONSUMER_TIMEOUT_MS / 1000 - 0.01,
              f"channel closed {elapsed:.3f}s after basic.consume, before the {CONSUMER_TIMEOUT_MS} ms timeout")
        check(conn.is_open, "connection closed after the channel error")
        # the unacknowledged message goes back to the queue
        ch2 = conn.channel()
        deadline = time.monotonic() + 5
        while True:
            count = ch2.queue_declare(q, passive=True).method.message_count
            if count == 1 or time.monotonic() > deadline:
                break
            conn.process_data_events(time_limit=0.05)
        eq(count, 1, "messages in the queue after the consumer timeout")
        m, _, b = ch2.basic_get(q, auto_ack=True)
        eq(b, b"slow", "requeued body")
        eq(m.redelivered, True, "requeued message redelivered flag")
        ch2.queue_delete(q)
    finally:
        if conn.is_open:
            conn.close()


# --------------------------------------------------------------------------
# TLS (the tls broker: --tls-port, PKI from make_pki.sh in --tls-dir)

EXTERNAL_REFUSED = ("ACCESS_REFUSED - Login was refused using authentication mechanism EXTERNAL. "
                    "For details see the broker logfile.")


class Recording:
    """Mixin for pika credentials: remembers the mechanisms connection.start offered.

    pika deep-copies the credentials into each connection; returning self from
    __deepcopy__ keeps the record reachable from the scenario."""

    offered = None

    def response_for(self, start):
        mechs = start.mechanisms
        self.offered = (mechs.decode() if isinstance(mechs, bytes) else mechs).split()
        return super().response_for(start)

    def __deepcopy__(self, _memo):
        return self


class RecordingPlain(Recording, pika.PlainCredentials):
    pass


class RecordingExternal(Recording, pika.credentials.ExternalCredentials):
    pass


def tls_socket(conn):
    sock = conn._impl._transport._sock  # pika internals: the transport's socket
    check(isinstance(sock, ssl.SSLSocket), f"connection is not over TLS: {sock!r}")
    return sock


def tls_roundtrip(conn, what):
    """Declare a queue, publish a small and a multi-frame (300 KiB) message and get both back."""
    ch = conn.channel()
    q = name(what)
    ok = ch.queue_declare(q)
    eq(ok.method.queue, q, f"{what}: declare-ok queue name")
    big = bytes(range(256)) * 1200  # 307200 octets: 3 body frames at frame_max 131072, many TLS records
    ch.basic_publish("", q, b"over tls", pika.BasicProperties(correlation_id="tls-1"))
    ch.basic_publish("", q, big)
    method, props, body = ch.basic_get(q, auto_ack=True)
    check(method is not None, f"{what}: basic.get returned empty")
    eq(body, b"over tls", f"{what}: first body")
    eq(props.correlation_id, "tls-1", f"{what}: correlation_id")
    eq(method.message_count, 1, f"{what}: message_count after the first get")
    method, _, body = ch.basic_get(q, auto_ack=True)
    check(method is not None, f"{what}: second basic.get returned empty")
    check(body == big, f"{what}: 300 KiB body differs ({len(body)} octets back)")
    eq(ch.basic_get(q, auto_ack=True)[0], None, f"{what}: get on the emptied queue")
    ch.queue_delete(q)


def expect_login_refused(connect, what, **kw):
    """The connection attempt must fail like RabbitMQ's refused login: connection.close
    403 ACCESS_REFUSED (pika reports ProbableAuthenticationError) with the exact text."""
    try:
        conn = connect(**kw)
    except pika.exceptions.ProbableAuthenticationError as e:
        expected = repr(pika.exceptions.ConnectionClosedByBroker(403, EXTERNAL_REFUSED))
        eq(e.args[0] if e.args else None, expected, f"{what}: refusal")
        return
    except pika.exceptions.AuthenticationError as e:
        creds = kw.get("credentials")
        raise Failure(f"{what}: pika gave up before sending start-ok ({e!r}): the broker offered "
                      f"mechanisms {getattr(creds, 'offered', None)}, expected EXTERNAL among them "
                      f"and a 403 ACCESS_REFUSED connection.close after start-ok") from None
    conn.close()
    raise Failure(f"{what}: login succeeded")


def s17_tls_plain_login(connect):
    # TLS 1.3 (the default context's choice) and TLS 1.2; no client certificate,
    # the server certificate verified against the test CA and for "localhost"
    for version in (None, ssl.TLSVersion.TLSv1_2):
        creds = RecordingPlain("guest", "guest")
        conn = connect(credentials=creds, server_hostname="localhost", tls_max=version)
        try:
            sock = tls_socket(conn)
            label = sock.version()
            if version is not None:
                eq(label, "TLSv1.2", "negotiated protocol with maximum_version TLSv1.2")
            check(label in ("TLSv1.2", "TLSv1.3"), f"negotiated protocol {label}")
            check("PLAIN" in creds.offered, f"{label}: PLAIN not offered: {creds.offered}")
            eq(sock.getpeercert()["subject"], ((("commonName", "localhost"),),), f"{label}: server certificate subject")
            product = conn._impl.server_properties.get("product")
            if isinstance(product, bytes):
                product = product.decode()
            eq(product, ARGS.product, f"{label}: server_properties.product")
            tls_roundtrip(conn, f"tls-plain-{label}")
        finally:
            if conn.is_open:
                conn.close()


def s18_tls_external_login(connect):
    # client certificate CN=guest; the server certificate verified for IP 127.0.0.1
    creds = RecordingExternal()
    conn = connect(credentials=creds, client="client-guest", server_hostname="127.0.0.1")
    try:
        tls_socket(conn)
        check("EXTERNAL" in creds.offered, f"EXTERNAL not offered with a client certificate: {creds.offered}")
        check("PLAIN" in creds.offered, f"PLAIN not offered with a client certificate: {creds.offered}")
        tls_roundtrip(conn, "tls-external")
    finally:
        if conn.is_open:
            conn.close()
    # PLAIN still works when a client certificate is presented
    conn = connect(credentials=pika.PlainCredentials("guest", "guest"), client="client-guest")
    try:
        check(conn.channel().is_open, "PLAIN with a client certificate: channel did not open")
    finally:
        conn.close()


def s19_tls_external_unknown_user_refused(connect):
    # a valid certificate whose CN (tlsuser) is no user
    creds = RecordingExternal()
    expect_login_refused(connect, "EXTERNAL as CN=tlsuser", credentials=creds, client="client-tlsuser")


def s20_tls_no_client_cert_external_refused(connect):
    # RabbitMQ (rabbitmq_auth_mechanism_ssl) offers EXTERNAL on every TLS connection,
    # with or without a client certificate, and refuses it after start-ok
    creds = RecordingExternal()
    expect_login_refused(connect, "EXTERNAL without a client certificate", credentials=creds)
    # PLAIN over the same listener, still without a certificate
    creds = RecordingPlain("guest", "guest")
    conn = connect(credentials=creds)
    try:
        tls_socket(conn)
        check("EXTERNAL" in creds.offered,
              f"EXTERNAL not offered on a TLS connection without a client certificate: {creds.offered}")
        tls_roundtrip(conn, "tls-nocert-plain")
    finally:
        if conn.is_open:
            conn.close()


SCENARIOS = [
    ("handshake", s01_handshake),
    ("declare_get_properties", s02_declare_get_properties),
    ("consume_prefetch_ack", s03_consume_prefetch_ack),
    ("publisher_confirms", s04_publisher_confirms),
    ("mandatory_return", s05_mandatory_return),
    ("topic_routing", s06_topic_routing),
    ("nack_reject_dlx", s07_nack_reject_dlx),
    ("transactions", s08_transactions),
    ("errors", s09_errors),
    ("ttl_dead_letter", s10_ttl_dead_letter),
    ("consumer_priorities", s11_consumer_priorities),
    ("single_active_consumer", s12_single_active_consumer),
    ("direct_reply_to", s13_direct_reply_to),
    ("delivery_count", s14_delivery_count),
    ("connection_blocked", s15_connection_blocked, "alarm"),
    ("consumer_timeout", s16_consumer_timeout, "timeout"),
    ("tls_plain_login", s17_tls_plain_login, "tls"),
    ("tls_external_login", s18_tls_external_login, "tls"),
    ("tls_external_unknown_user_refused", s19_tls_external_unknown_user_refused, "tls"),
    ("tls_no_client_cert_external_refused", s20_tls_no_client_cert_external_refused, "tls"),
]


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--product", default=os.environ.get("CONFORMANCE_PRODUCT", "Warren"))
    ap.add_argument("--alarm-port", type=int,
                    help="broker with a 256 KiB memory high watermark (connection_blocked)")
    ap.add_argument("--timeout-port", type=int,
                    help=f"broker with a {CONSUMER_TIMEOUT_MS} ms consumer timeout (consumer_timeout)")
    ap.add_argument("--tls-port", type=int,
                    help="AMQPS port of a broker using the --tls-dir PKI with client-certificate "
                         "verification (tls_* scenarios)")
    ap.add_argument("--tls-dir", help="directory written by make_pki.sh (ca.pem, client-*.pem/.key)")
    ap.add_argument("--only", help="comma-separated scenario names")
    ARGS = ap.parse_args()
    only = set(ARGS.only.split(",")) if ARGS.only else None
    ports = {"main": ARGS.port, "alarm": ARGS.alarm_port, "timeout": ARGS.timeout_port,
             "tls": ARGS.tls_port if ARGS.tls_dir else None}

    def connector(port):
        params = pika.ConnectionParameters(
            host=ARGS.host, port=port, virtual_host="/",
            credentials=pika.PlainCredentials("guest", "guest"),
            connection_attempts=1, socket_timeout=5, blocked_connection_timeout=10)

        def connect():
            return pika.BlockingConnection(params)

        connect.params = params
        return connect

    def tls_connector(port):
        def connect(credentials=None, client=None, server_hostname="localhost", tls_max=None):
            """A TLS connection trusting the test CA (hostname checked), with the client
            certificate `client` (make_pki.sh name) if given."""
            ctx = ssl.create_default_context(cafile=os.path.join(ARGS.tls_dir, "ca.pem"))
            if tls_max is not None:
                ctx.maximum_version = tls_max
            if client:
                ctx.load_cert_chain(os.path.join(ARGS.tls_dir, f"{client}.pem"),
                                    os.path.join(ARGS.tls_dir, f"{client}.key"))
            params = pika.ConnectionParameters(
                host=ARGS.host, port=port, virtual_host="/",
                credentials=credentials or pika.PlainCredentials("guest", "guest"),
                ssl_options=pika.SSLOptions(ctx, server_hostname),
                connection_attempts=1, socket_timeout=5, stack_timeout=10,
                blocked_connection_timeout=10)
            return pika.BlockingConnection(params)

        return connect

    install_timeout(SCENARIO_TIMEOUT)
    failed = 0
    for sname, fn, *broker in SCENARIOS:
        if only and sname not in only:
            continue
        full = f"pika.{sname}"
        broker = broker[0] if broker else "main"
        if ports[broker] is None:
            given = "--tls-port/--tls-dir" if broker == "tls" else f"--{broker}-port"
            print(f"SKIP {full}: no {given} broker given", flush=True)
            continue
        connect = (tls_connector if broker == "tls" else connector)(ports[broker])
        t0 = time.monotonic()
        signal.alarm(SCENARIO_TIMEOUT)
        try:
            fn(connect)
            signal.alarm(0)
            print(f"PASS {full} ({time.monotonic() - t0:.2f}s)", flush=True)
        except Failure as e:
            signal.alarm(0)
            failed += 1
            print(f"FAIL {full}: {e}", flush=True)
        except BaseException as e:  # noqa: BLE001 - any client error is a failure
            signal.alarm(0)
            failed += 1
            detail = "".join(traceback.format_exception_only(type(e), e)).strip()
            print(f"FAIL {full}: {detail}", flush=True)
            if os.environ.get("CONFORMANCE_VERBOSE"):
                traceback.print_exc()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
