"""Time from killing a replicated queue's leader to the first delivery from
its successor, over TRIES tries (bench/failover.sh runs it).

A three-node cluster (scripts/cluster.sh) holds quorum queue `failover`.
Each try: a consumer on one follower, a publisher on the other sending a
persistent, confirmed message every 5 ms (its body the send time); the
leader is killed with SIGKILL; the time counted runs from the kill to the
first delivery of a message published after it (so a message the old
leader had already committed does not count). The killed node is then
started again and the next try waits until the queue has all three members
online.

    python3 bench/failover.py TRIES OUT.md
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import pika

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUEUE = "failover"
CLUSTER = os.path.join(ROOT, "target", "cluster")


def api(node, path):
    req = urllib.request.Request(f"http://127.0.0.1:{15671 + node}{path}")
    req.add_header("Authorization", "Basic Z3Vlc3Q6Z3Vlc3Q=")  # guest:guest
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)


def queue_state(live):
    for n in live:
        try:
            for q in api(n, "/api/queues"):
                if q["name"] == QUEUE:
                    return q
        except OSError:
            continue
    return None


def wait_healthy(deadline_s=60):
    end = time.time() + deadline_s
    while time.time() < end:
        q = queue_state([1, 2, 3])
        if q and q.get("leader") and len(q.get("online", [])) == 3:
            return int(q["leader"].split("@")[0].split("-")[1])
        time.sleep(0.2)
    raise SystemExit("the queue did not get three members online and a leader")


def connect(node):
    return pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5671 + node))


def one_try():
    leader = wait_healthy()
    consumer_node, publisher_node = [n for n in (1, 2, 3) if n != leader]
    killed_at = [None]
    first = [None]
    stop = threading.Event()
    got_first = threading.Event()

    def consume():
        conn = connect(consumer_node)
        ch = conn.channel()
        ch.basic_qos(prefetch_count=100)

        def on_message(ch, method, props, body):
            now = time.time()
            ch.basic_ack(method.delivery_tag)
            sent = float(body.decode())
            if killed_at[0] is not None and sent >= killed_at[0] and first[0] is None:
                first[0] = now - killed_at[0]
                got_first.set()

        ch.basic_consume(QUEUE, on_message)
        while not stop.is_set():
            conn.process_data_events(time_limit=0.05)
        conn.close()

    def publish():
        while not stop.is_set():
            try:
                conn = connect(publisher_node)
                ch = conn.channel()
                ch.confirm_delivery()
                while not stop.is_set():
                    body = repr(time.time()).encode()
                    try:
                        ch.basic_publish("", QUEUE, body, pika.BasicProperties(delivery_mode=2))
                    except pika.exceptions.NackError:
                        pass
                    time.sleep(0.005)
                conn.close()
            except pika.exceptions.AMQPError:
                time.sleep(0.05)

    threads = [threading.Thread(target=consume), threading.Thread(target=publish)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    pid = int(open(os.path.join(CLUSTER, f"node-{leader}", "pid")).read())
    killed_at[0] = time.time()
    os.kill(pid, signal.SIGKILL)
    ok = got_first.wait(30)
    stop.set()
    for t in threads:
        t.join()
    subprocess.run([os.path.join(ROOT, "scripts", "cluster.sh"), "start"], check=True,
                   stdout=subprocess.DEVNULL)
    if not ok:
        raise SystemExit("no delivery within 30 s of killing the leader")
    return first[0]


def main():
    tries, out = int(sys.argv[1]), sys.argv[2]
    conn = connect(1)
    conn.channel().queue_declare(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    conn.close()
    times = []
    for i in range(tries):
        t = one_try()
        times.append(t)
        print(f"failover: try {i + 1}: {t * 1000:.0f} ms", file=sys.stderr)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    ms = sorted(round(t * 1000) for t in times)
    with open(out, "w") as f:
        f.write("# Replicated queue: from killing its leader to the first delivery from its successor\n\n")
        f.write(f"Commit {commit}; {tries} tries on a three-node cluster on one machine "
                "(`bash bench/failover.sh`).\n\n")
        f.write("| p50 | min | max |\n|---|---|---|\n")
        f.write(f"| {statistics.median(ms):,.0f} ms | {ms[0]:,} ms | {ms[-1]:,} ms |\n\n")
        f.write("Every try (ms, sorted): " + ", ".join(str(m) for m in ms) + "\n\n")
        f.write("Counted from the SIGKILL to the first delivery of a message published after "
                "it: the election (timeout 600-1,200 ms), the new leader's first commit, and the "
                "delivery to a consumer on a surviving node. A publisher sends a persistent, "
                "confirmed message every 5 ms throughout.\n")


if __name__ == "__main__":
    main()
