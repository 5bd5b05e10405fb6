"""The RabbitMQ-Quorum-Queues-Raft Grafana dashboard's queries against a real
Prometheus scraping a three-node Warren cluster.

RabbitMQ ships a second dashboard beside RabbitMQ-Overview,
"RabbitMQ-Quorum-Queues-Raft" (same directory of the rabbitmq-server
repository), whose five panels follow the Raft members of quorum queues
through the `rabbitmq_raft_*` families, each joined to
`rabbitmq_identity_info` on `instance` as the Overview's panels are. This
script builds the same five queries, drives traffic into a replicated queue
(a quorum queue on three nodes, every enqueue confirmed before the next, so
each is a log entry of its own), and asserts that every panel shows a series
per node and that the figures follow the traffic.

Run by harness.py (see run.sh), which starts the cluster and Prometheus.
"""

import pika

from dashboard import IDENTITY, query, value

# How many confirmed enqueues, one entry each: past the 5,000 entries since
# the last snapshot that the last panel shows (no snapshot is taken this
# early: bodies are small).
ENTRIES = 5200


def joined(expr):
    """`expr` joined to each node's identity, as every panel of this
    dashboard does (the cluster's and the node's names copied)."""
    return f"{expr} * on(instance) group_left(rabbitmq_cluster, rabbitmq_node) {IDENTITY}"


# (panel title, query template): the dashboard's five panels in its order.
PANELS = [
    ("Log entries committed / s",
     f"sum(rate(rabbitmq_raft_log_commit_index[60s]) * on(instance) "
     f"group_left(rabbitmq_cluster, rabbitmq_node) {IDENTITY}) by(rabbitmq_node)"),
    ("Log entry commit latency", joined("rabbitmq_raft_entry_commit_latency_seconds")),
    ("Uncommitted log entries",
     f"sum(\n  ({joined('rabbitmq_raft_log_last_written_index')}) -\n"
     f"  ({joined('rabbitmq_raft_log_commit_index')})\n) by(rabbitmq_node)"),
    ("Leader elections / s",
     f"sum(rate(rabbitmq_raft_term_total[60s]) * on(instance) "
     f"group_left(rabbitmq_cluster, rabbitmq_node) {IDENTITY}) by(rabbitmq_node)"),
    ("Raft members with >5k entries in the log",
     f"sum(\n  ({joined('rabbitmq_raft_log_last_written_index')}) - \n"
     f"  ({joined('rabbitmq_raft_log_snapshot_index')})\n) by(queue, rabbitmq_node) > 5000"),
]


def traffic(port):
    """A quorum queue on the three nodes and ENTRIES confirmed enqueues,
    one at a time."""
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
    ch = conn.channel()
    ch.queue_declare("raft-dash", durable=True, arguments={"x-queue-type": "quorum"})
    ch.confirm_delivery()
    for _ in range(ENTRIES):
        ch.basic_publish("", "raft-dash", b"r", properties=pika.BasicProperties(delivery_mode=2))
    # A second queue last: its members' first terms begin within the
    # minute the elections panel's rate looks at, however long the
    # enqueues took.
    ch.queue_declare("raft-dash-2", durable=True, arguments={"x-queue-type": "quorum"})
    conn.close()


def scrapes(url):
    """The fewest successful scrapes of any of the cluster's nodes."""
    v = value(url, "min(count_over_time(up[10m]))")
    return 0 if v is None else int(v)


def check(amqp_port, url, cluster, nodes, wait_scrapes):
    """Runs the checks against the cluster's Prometheus at `url`; returns
    what failed."""
    wait_scrapes(lambda: scrapes(url), 0)
    traffic(amqp_port)
    # Two scrapes after the traffic: its last figures are in, and a rate
    # has two samples since the queue came.
    wait_scrapes(lambda: scrapes(url), scrapes(url) + 2)

    failures = []
    shown = 0
    for title, template in PANELS:
        expr = template.format(cluster=cluster)
        series = query(url, expr)
        per_node = {s["metric"].get("rabbitmq_node") for s in series}
        if per_node != set(nodes):
            failures.append(f"raft panel '{title}' shows nodes {sorted(per_node, key=str)}, "
                            f"expected {sorted(nodes)}: {expr}")
            continue
        values = [float(s["value"][1]) for s in series]
        # What the traffic must show: entries committed, terms begun (each
        # member's went from none to its first), more than 5,000 entries
        # since a snapshot; a latency and a backlog that are figures.
        if title in ("Log entries committed / s", "Leader elections / s") and min(values) <= 0:
            failures.append(f"raft panel '{title}' shows {values}, expected a rate above 0 on every node")
            continue
        if title == "Raft members with >5k entries in the log" and min(values) < ENTRIES:
            failures.append(f"raft panel '{title}' shows {values}, expected at least {ENTRIES}")
            continue
        if min(values) < 0:
            failures.append(f"raft panel '{title}' shows {values}, expected no negative figure")
            continue
        shown += 1
    print(f"raft dashboard: {shown} of {len(PANELS)} panels show every node's expected figures")
    return failures
