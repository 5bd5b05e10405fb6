"""A RabbitMQ `rabbitmq.conf` drives the release binary (`--config
rabbitmq.conf`): its listeners, default user, tuning and management and
Prometheus ports take effect, seen by pika and over HTTP; an unknown key
stops the broker with an error naming it. Run by harness.py (see run.sh)."""

import base64
import json
import os
import subprocess
import tempfile
import time
import urllib.request

import pika


def http_get(url, user, password):
    req = urllib.request.Request(url)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    req.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.read()


def check(warren, free_port, wait_listening):
    failures = []
    work = tempfile.mkdtemp(prefix="warren-rabbitmq-conf.")
    amqp, mgmt, prom = free_port(), free_port(), free_port()
    conf = os.path.join(work, "rabbitmq.conf")
    with open(conf, "w") as f:
        f.write(f"""# as an operator's RabbitMQ 3.10 node has it
listeners.tcp.default = 127.0.0.1:{amqp}
management.tcp.port = {mgmt}
management.tcp.ip = 127.0.0.1
prometheus.tcp.port = {prom}
prometheus.tcp.ip = 127.0.0.1
default_user = ops
default_pass = conf-secret
loopback_users.guest = false
heartbeat = 17
channel_max = 32
frame_max = 65536
max_message_size = 1048576
consumer_timeout = 600000
vm_memory_high_watermark.relative = 0.5
disk_free_limit.absolute = 1MB
log.console = true
log.console.level = warning
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARREN_")}
    env["NO_COLOR"] = "1"
    log = os.path.join(work, "warren.log")
    proc = subprocess.Popen(
        [warren, "--config", conf, "--data-dir", os.path.join(work, "data")],
        env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        wait_listening(amqp, proc, "warren (rabbitmq.conf)", log, deadline)
        wait_listening(mgmt, proc, "warren (rabbitmq.conf)", log, deadline)
        wait_listening(prom, proc, "warren (rabbitmq.conf)", log, deadline)
        conn = pika.BlockingConnection(pika.ConnectionParameters(
            "127.0.0.1", amqp, credentials=pika.PlainCredentials("ops", "conf-secret"),
            channel_max=2047, frame_max=131072))
        params = conn._impl.params
        got = (params.heartbeat, params.channel_max, params.frame_max)
        if got != (17, 32, 65536):
            failures.append(f"rabbitmq.conf: negotiated heartbeat, channel_max, frame_max {got}, expected (17, 32, 65536)")
        ch = conn.channel()
        ch.queue_declare("conf-q")
        try:
            ch.basic_publish("", "conf-q", b"x" * (1048576 + 1))
            # A round trip: the broker answers the publish first.
            ch.queue_declare("conf-q", passive=True)
            failures.append("rabbitmq.conf: a message over max_message_size was accepted")
        except (pika.exceptions.ChannelClosedByBroker, pika.exceptions.ChannelWrongStateError) as e:
            # (If pika read the close before the round trip, it reports the
            # channel closed and keeps the broker's reason.)
            reason = e if isinstance(e, pika.exceptions.ChannelClosedByBroker) \
                else getattr(ch, "_closing_reason", None)
            code = getattr(reason, "reply_code", None)
            if code != 406:
                failures.append(f"rabbitmq.conf: oversized message closed the channel with {code} ({reason!r})")
        conn.close()
        status, body = http_get(f"http://127.0.0.1:{mgmt}/api/whoami", "ops", "conf-secret")
        who = json.loads(body)
        if status != 200 or who.get("name") != "ops":
            failures.append(f"rabbitmq.conf: management API on its port answered {status} {who}")
        status, body = http_get(f"http://127.0.0.1:{prom}/metrics", "", "")
        if status != 200 or b"rabbitmq_identity_info" not in body:
            failures.append("rabbitmq.conf: no metrics on the Prometheus port")
        text = open(log).read()
        if " INFO " in text:
            failures.append("rabbitmq.conf: log.console.level = warning still logs INFO lines")
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    # An unknown key: the broker refuses to start and names it.
    with open(conf, "a") as f:
        f.write("queue_master_locator = min-masters\n")
    out = subprocess.run([warren, "--config", conf, "--data-dir", os.path.join(work, "data2")],
                         env=env, capture_output=True, text=True, timeout=30)
    if out.returncode == 0 or "queue_master_locator" not in out.stderr:
        failures.append(f"rabbitmq.conf: an unknown key gave {out.returncode}: {out.stderr!r}")
    print(f"rabbitmq.conf: {len(failures)} failures")
    subprocess.run(["rm", "-rf", work])
    return failures
