#!/usr/bin/env python3
"""Warren conformance scenarios driven through kombu (on py-amqp) and Celery.

Usage: kombu_scenarios.py --port N [--host H] [--only a,b] [other run.sh flags]

kombu is what Celery speaks AMQP through, and it uses py-amqp, a client
library of its own (neither pika nor the Java client). The last scenario runs
a real Celery worker process against the broker and calls a task through it
with the `rpc://` result backend.

Every scenario opens its own connection, uses its own uniquely named entities
and prints exactly one line: `PASS kombu.<name>` or `FAIL kombu.<name>: reason`.
The expected behaviour is RabbitMQ 3.10's. Exit status: 0 if all passed, 1
otherwise. Flags run.sh passes for other clients (--alarm-port, --tls-port, ...)
are accepted and ignored.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback

import amqp.exceptions
from kombu import Connection, Consumer, Exchange, Producer, Queue
from scenario_common import RUN, Failure, check, eq, install_timeout, namer

SCENARIO_TIMEOUT = 60  # seconds; the Celery scenario starts a worker process


name = namer("kombu")


def take(conn, queue, n, accept=("json",)):
    """The next `n` messages of `queue` (unacknowledged), within 10 s."""
    got = []
    with Consumer(conn, queues=[queue], callbacks=[lambda _b, m: got.append(m)], accept=list(accept)):
        deadline = time.monotonic() + 10
        while len(got) < n:
            left = deadline - time.monotonic()
            check(left > 0, f"{len(got)} of {n} messages arrived within 10 s")
            try:
                conn.drain_events(timeout=left)
            except TimeoutError:
                pass
    return got


def k01_handshake(url):
    with Connection(url) as conn:
        conn.connect()
        props = conn.connection.server_properties
        eq(props.get("product"), os.environ.get("CONFORMANCE_PRODUCT", "Warren"), "product")
        caps = props.get("capabilities", {})
        for cap in ("publisher_confirms", "basic.nack", "consumer_cancel_notify"):
            check(caps.get(cap) is True, f"capability {cap} missing: {caps}")


def k02_durable_round_trip(url):
    exchange = Exchange(name("orders"), type="direct", durable=True)
    queue = Queue(
        name("paid"),
        exchange=exchange,
        routing_key="paid",
        durable=True,
        queue_arguments={"x-message-ttl": 60000},
    )
    with Connection(url) as conn:
        producer = Producer(conn, exchange=exchange, serializer="json")
        producer.publish(
            {"order": 17, "total": "9.50"},
            routing_key="paid",
            declare=[queue],
            delivery_mode=2,
            headers={"source": "kombu"},
            priority=0,
        )
        [msg] = take(conn, queue, 1)
        eq(msg.payload, {"order": 17, "total": "9.50"}, "payload")
        eq(msg.headers.get("source"), "kombu", "header")
        eq(msg.properties.get("delivery_mode"), 2, "delivery_mode")
        eq(msg.content_type, "application/json", "content_type")
        eq(msg.delivery_info.get("redelivered"), False, "redelivered")
        msg.ack()
    # Had the ack been lost, closing the connection would have requeued it.
    with Connection(url) as conn:
        _, count, _ = queue(conn.default_channel).queue_declare(passive=True)
        eq(count, 0, "messages left after the ack and a reconnect")
        queue(conn.default_channel).delete()
        exchange(conn.default_channel).delete()


def k03_requeue_then_reject_to_dlx(url):
    dlx = Exchange(name("dlx"), type="fanout", durable=False, auto_delete=False)
    dead = Queue(name("dead"), exchange=dlx, durable=False)
    work = Queue(
        name("work"),
        durable=False,
        queue_arguments={"x-dead-letter-exchange": dlx.name},
    )
    with Connection(url) as conn:
        ch = conn.default_channel
        dead(ch).declare()
        work(ch).declare()
        Producer(conn, serializer="json").publish({"job": 1}, routing_key=work.name)
        [first] = take(conn, work, 1)
        first.requeue()
        [again] = take(conn, work, 1)
        eq(again.delivery_info.get("redelivered"), True, "redelivered after requeue")
        again.reject()
        [dead_msg] = take(conn, dead, 1)
        deaths = dead_msg.headers.get("x-death")
        check(isinstance(deaths, list) and len(deaths) == 1, f"x-death: {deaths!r}")
        eq(deaths[0].get("reason"), "rejected", "x-death reason")
        eq(deaths[0].get("queue"), work.name, "x-death queue")
        eq(deaths[0].get("count"), 1, "x-death count")
        dead_msg.ack()
        work(ch).delete()
        dead(ch).delete()
        dlx(ch).delete()


def k04_confirms_and_errors(url):
    queue = Queue(name("confirmed"), durable=True)
    with Connection(url, transport_options={"confirm_publish": True}) as conn:
        ch = conn.default_channel
        queue(ch).declare()
        producer = Producer(ch, serializer="json")
        for i in range(50):
            producer.publish({"n": i}, routing_key=queue.name, delivery_mode=2)
        _, count, _ = queue(ch).queue_declare(passive=True)
        eq(count, 50, "messages after 50 confirmed publishes")
        try:
            producer.publish({"n": -1}, exchange=name("missing"), routing_key="x")
            raise Failure("publishing to a missing exchange was confirmed")
        except amqp.exceptions.NotFound as e:
            eq(e.reply_code, 404, "reply code")
            check(
                f"no exchange '{name('missing')}' in vhost '/'" in str(e.reply_text),
                f"reply text: {e.reply_text!r}",
            )
    with Connection(url) as conn:
        ch = conn.default_channel
        try:
            Queue(queue.name, durable=True, queue_arguments={"x-max-length": 5})(ch).declare()
            raise Failure("an inequivalent redeclare was accepted")
        except amqp.exceptions.PreconditionFailed as e:
            eq(e.reply_code, 406, "reply code")
            check("inequivalent arg 'x-max-length'" in str(e.reply_text), f"reply text: {e.reply_text!r}")
    with Connection(url) as conn:
        queue(conn.default_channel).delete()


CELERY_APP = """
from celery import Celery

app = Celery("warren_conformance", broker={broker!r}, backend="rpc://")
app.conf.task_default_queue = {queue!r}
app.conf.broker_connection_retry_on_startup = True
app.conf.worker_hijack_root_logger = False


@app.task
def add(x, y):
    return x + y
"""


def k05_celery_task_round_trip(url):
    queue = name("celery")
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "warren_tasks.py"), "w") as f:
            f.write(textwrap.dedent(CELERY_APP.format(broker=url, queue=queue)))
        env = dict(os.environ, PYTHONPATH=tmp)
        log = open(os.path.join(tmp, "worker.log"), "w+")
        worker = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "warren_tasks", "worker",
                "--pool=solo", "--without-gossip", "--without-mingle", "--without-heartbeat",
                "--loglevel=WARNING", "-n", f"conformance-{RUN}@localhost",
            ],
            cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            sys.path.insert(0, tmp)
            import warren_tasks  # noqa: E402 (written above)

            result = warren_tasks.add.delay(2, 3)
            try:
                value = result.get(timeout=30)
            except Exception as e:
                log.seek(0)
                raise Failure(f"no result ({type(e).__name__}: {e}); worker log:\n{log.read()[-2000:]}")
            eq(value, 5, "add(2, 3) through a Celery worker")
            eq(result.state, "SUCCESS", "task state")
        finally:
            # The scenario's alarm must not cut the cleanup short and leave
            # the worker running.
            signal.alarm(0)
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            log.close()
            sys.path.remove(tmp)
    with Connection(url) as conn:
        Queue(queue)(conn.default_channel).delete()


SCENARIOS = [
    k01_handshake,
    k02_durable_round_trip,
    k03_requeue_then_reject_to_dlx,
    k04_confirms_and_errors,
    k05_celery_task_round_trip,
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--only", default="")
    # passed by run.sh for the other clients' scenarios; unused here
    for flag in ("--alarm-port", "--timeout-port", "--tls-port", "--tls-dir"):
        p.add_argument(flag)
    args = p.parse_args()
    url = f"amqp://guest:guest@{args.host}:{args.port}//"
    only = {s for s in args.only.split(",") if s}
    install_timeout(SCENARIO_TIMEOUT)
    failed = 0
    for scenario in SCENARIOS:
        short = scenario.__name__.split("_", 1)[1]
        if only and short not in only and scenario.__name__ not in only:
            continue
        signal.alarm(SCENARIO_TIMEOUT)
        try:
            scenario(url)
            print(f"PASS kombu.{short}", flush=True)
        except Exception as e:  # a scenario's failure, whatever it raised
            failed += 1
            print(f"FAIL kombu.{short}: {type(e).__name__}: {e}", flush=True)
            if os.environ.get("CONFORMANCE_VERBOSE"):
                traceback.print_exc()
        finally:
            signal.alarm(0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
