"""The RabbitMQ-Overview Grafana dashboard's queries against a real Prometheus.

RabbitMQ ships a Grafana dashboard, "RabbitMQ-Overview" (in the
rabbitmq-server repository, deps/rabbitmq_prometheus/docker/grafana/
dashboards/), whose every panel joins a RabbitMQ metric to
`rabbitmq_identity_info` on `instance` and filters on the dashboard's
`rabbitmq_cluster` and `namespace` variables. This script builds the same
41 panel queries (the metric expressions below, each wrapped in that join by
`joined`), lets a real Prometheus server scrape Warren, drives traffic that
moves every counter, and asserts that every panel returns data, that the
counters the traffic moved went up, and that the gauges show what is open.

Run by harness.py (see run.sh).
"""

import json
import time
import urllib.parse
import urllib.request

import pika

# The dashboard's variables: Warren sets no `namespace` label (Grafana then
# matches the empty value, as for a RabbitMQ outside Kubernetes).
IDENTITY = 'rabbitmq_identity_info{{rabbitmq_cluster="{cluster}", namespace=""}}'


def joined(expr, node=False):
    """`expr` joined to the node's identity as every panel does (copying
    the cluster's name, and the node's for per-node panels)."""
    labels = "rabbitmq_cluster, rabbitmq_node" if node else "rabbitmq_cluster"
    return f"{expr} * on(instance) group_left({labels}) {IDENTITY}"


def rate(metric):
    return f"rate({metric}[60s])"


def cluster_sum(expr):
    return f"sum({joined(expr)})"


def per_node(expr):
    return f"sum({joined(expr, node=True)}) by(rabbitmq_node)"


def difference(a, b):
    return f"({joined(a, node=True)}) - ({joined(b, node=True)})"


# (panel title, query template): the dashboard's 41 panels in its order.
PANELS = [
    ("Ready messages", cluster_sum("rabbitmq_queue_messages_ready")),
    ("Incoming messages / s", cluster_sum(rate("rabbitmq_channel_messages_published_total"))),
    ("Publishers", cluster_sum("rabbitmq_channels") + " - " + cluster_sum("rabbitmq_channel_consumers")),
    ("Connections", cluster_sum("rabbitmq_connections")),
    ("Queues", cluster_sum("rabbitmq_queues")),
    ("Unacknowledged messages", cluster_sum("rabbitmq_queue_messages_unacked")),
    ("Outgoing messages / s", " +\n".join(cluster_sum(rate(m)) for m in [
        "rabbitmq_channel_messages_redelivered_total",
        "rabbitmq_channel_messages_delivered_total",
        "rabbitmq_channel_messages_delivered_ack_total",
        "rabbitmq_channel_get_total",
        "rabbitmq_channel_get_ack_total",
    ])),
    ("Consumers", cluster_sum("rabbitmq_channel_consumers")),
    ("Channels", cluster_sum("rabbitmq_channels")),
    ("Nodes", cluster_sum("rabbitmq_build_info")),
    ("Nodes (table)", joined("rabbitmq_build_info", node=True)),
    ("Memory available before publishers blocked",
     difference("rabbitmq_resident_memory_limit_bytes", "rabbitmq_process_resident_memory_bytes")),
    ("Disk space available before publishers blocked",
     joined("rabbitmq_disk_space_available_bytes", node=True)),
    ("File descriptors available", difference("rabbitmq_process_max_fds", "rabbitmq_process_open_fds")),
    ("TCP sockets available",
     difference("rabbitmq_process_max_tcp_sockets", "rabbitmq_process_open_tcp_sockets")),
    ("Messages ready to be delivered to consumers", per_node("rabbitmq_queue_messages_ready")),
    ("Messages pending consumer acknowledgement", per_node("rabbitmq_queue_messages_unacked")),
    ("Messages published / s", per_node(rate("rabbitmq_channel_messages_published_total"))),
    ("Messages confirmed to publishers / s", per_node(rate("rabbitmq_channel_messages_confirmed_total"))),
    ("Messages routed to queues / s", per_node(rate("rabbitmq_queue_messages_published_total"))),
    ("Messages unconfirmed to publishers / s", per_node(rate("rabbitmq_channel_messages_unconfirmed"))),
    ("Unroutable messages dropped / s",
     per_node(rate("rabbitmq_channel_messages_unroutable_dropped_total"))),
    ("Unroutable messages returned to publishers / s",
     per_node(rate("rabbitmq_channel_messages_unroutable_returned_total"))),
    ("Messages delivered / s",
     "sum(\n  (" + joined(rate("rabbitmq_channel_messages_delivered_total"), node=True) + ") +\n  ("
     + joined(rate("rabbitmq_channel_messages_delivered_ack_total"), node=True) + ")\n) by(rabbitmq_node)"),
    ("Messages redelivered / s", per_node(rate("rabbitmq_channel_messages_redelivered_total"))),
    ("Messages delivered with manual ack / s", per_node(rate("rabbitmq_channel_messages_delivered_ack_total"))),
    ("Messages delivered auto ack / s", per_node(rate("rabbitmq_channel_messages_delivered_total"))),
    ("Messages acknowledged / s", per_node(rate("rabbitmq_channel_messages_acked_total"))),
    ("Polling operations with auto ack / s", per_node(rate("rabbitmq_channel_get_total"))),
    ("Polling operations that yield no result / s", per_node(rate("rabbitmq_channel_get_empty_total"))),
    ("Polling operations with manual ack / s", per_node(rate("rabbitmq_channel_get_ack_total"))),
    ("Total queues", joined("rabbitmq_queues", node=True)),
    ("Queues declared / s", per_node(rate("rabbitmq_queues_declared_total"))),
    ("Queues created / s", per_node(rate("rabbitmq_queues_created_total"))),
    ("Queues deleted / s", per_node(rate("rabbitmq_queues_deleted_total"))),
    ("Total channels", joined("rabbitmq_channels", node=True)),
    ("Channels opened / s", per_node(rate("rabbitmq_channels_opened_total"))),
    ("Channels closed / s", per_node(rate("rabbitmq_channels_closed_total"))),
    ("Total connections", joined("rabbitmq_connections", node=True)),
    ("Connections opened / s", per_node(rate("rabbitmq_connections_opened_total"))),
    ("Connections closed / s", per_node(rate("rabbitmq_connections_closed_total"))),
]

# Counters the traffic below moves: each must have grown since the first
# scrape (`increase` over the run, as Prometheus computes it).
MOVED = [
    "rabbitmq_channel_messages_published_total",
    "rabbitmq_channel_messages_confirmed_total",
    "rabbitmq_queue_messages_published_total",
    "rabbitmq_channel_messages_unroutable_dropped_total",
    "rabbitmq_channel_messages_unroutable_returned_total",
    "rabbitmq_channel_messages_delivered_total",
    "rabbitmq_channel_messages_delivered_ack_total",
    "rabbitmq_channel_messages_redelivered_total",
    "rabbitmq_channel_messages_acked_total",
    "rabbitmq_channel_get_total",
    "rabbitmq_channel_get_ack_total",
    "rabbitmq_channel_get_empty_total",
    "rabbitmq_queues_declared_total",
    "rabbitmq_queues_created_total",
    "rabbitmq_queues_deleted_total",
    "rabbitmq_channels_opened_total",
    "rabbitmq_channels_closed_total",
    "rabbitmq_connections_opened_total",
    "rabbitmq_connections_closed_total",
    "rabbitmq_global_messages_received_confirm_total",
]


def query(url, expr):
    """An instant query's result vector (raises on a query error)."""
    q = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=10) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def value(url, expr):
    """The one value of a query that returns one series (None if none)."""
    result = query(url, expr)
    if len(result) != 1:
        return None
    return float(result[0]["value"][1])


def scrapes(url):
    """How many times Prometheus has scraped Warren successfully."""
    v = value(url, "count_over_time(up[10m])")
    return 0 if v is None else int(v)


def wait_for_scrapes(url, more_than, deadline):
    while scrapes(url) <= more_than:
        if time.monotonic() > deadline:
            raise RuntimeError(f"Prometheus scraped Warren only {scrapes(url)} times")
        time.sleep(0.2)


def traffic(port):
    """Moves every counter in MOVED; returns the connection it leaves open,
    with 3 channels (a publisher's, a getter's and a consumer's holding 2
    unacknowledged messages), and 4 queues holding 4 ready messages."""
    params = pika.ConnectionParameters("127.0.0.1", port)
    # A connection and a channel that come and go.
    c = pika.BlockingConnection(params)
    c.channel().close()
    c.close()

    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare("dash-temp")
    ch.queue_delete("dash-temp")
    ch.queue_declare("dash-ready")
    ch.queue_declare("dash-work")
    ch.queue_declare("dash-auto")
    ch.basic_publish("", "dash-auto", b"auto")
    for _ in range(3):
        ch.basic_publish("", "dash-ready", b"ready")
    for _ in range(6):
        ch.basic_publish("", "dash-work", b"work")
    ch.basic_publish("amq.direct", "nowhere", b"dropped")
    try:
        ch.basic_publish("amq.direct", "nowhere", b"returned", mandatory=True)
    except pika.exceptions.UnroutableError:
        pass
    # basic.get with automatic and manual acknowledgement, and empty.
    get = conn.channel()
    get.basic_get("dash-work", auto_ack=True)
    method, _, _ = get.basic_get("dash-work", auto_ack=False)
    get.basic_ack(method.delivery_tag)
    get.queue_declare("dash-empty")
    assert get.basic_get("dash-empty", auto_ack=True) == (None, None, None)
    # Consumers: one with automatic acknowledgement takes one message; one
    # with manual acknowledgement rejects one (redelivered), acks it, and
    # keeps two unacknowledged.
    auto = conn.channel()
    taken = []
    auto.basic_consume("dash-auto", lambda c, m, p, b: taken.append(b), auto_ack=True)
    while not taken:
        conn.process_data_events(time_limit=0.1)
    auto.close()
    manual = conn.channel()
    manual.basic_qos(prefetch_count=2)
    seen = []
    manual.basic_consume("dash-work", lambda c, m, p, b: seen.append((m.delivery_tag, m.redelivered)))
    while not seen:
        conn.process_data_events(time_limit=0.1)
    manual.basic_reject(seen[0][0], requeue=True)
    while not any(r for _, r in seen):
        conn.process_data_events(time_limit=0.1)
    tag = next(t for t, r in seen if r)
    manual.basic_ack(tag)
    while len(seen) < 4:
        conn.process_data_events(time_limit=0.1)
    return conn


def check(amqp_port, url, cluster):
    """Runs the checks; returns what failed."""
    deadline = time.monotonic() + 60
    # A scrape before the traffic, so that `increase` sees it all.
    wait_for_scrapes(url, 0, deadline)
    conn = traffic(amqp_port)
    before = scrapes(url)
    wait_for_scrapes(url, before + 1, deadline)

    failures = []
    for title, template in PANELS:
        expr = template.format(cluster=cluster)
        if not query(url, expr):
            failures.append(f"panel '{title}' shows no data: {expr}")
    answered = len(PANELS) - len(failures)
    print(f"dashboard: {answered} of {len(PANELS)} panel queries return data")

    moved = 0
    for metric in MOVED:
        v = value(url, f"sum(increase({metric}[10m]))")
        if not v or v <= 0:
            failures.append(f"{metric} did not increase ({v})")
        else:
            moved += 1
    print(f"dashboard: {moved} of {len(MOVED)} counters moved with the traffic")
    expected = {
        # What the traffic left open (a single node: the cluster's sums).
        "Connections": 1,
        "Queues": 4,
        "Ready messages": 4,
        "Unacknowledged messages": 2,
        "Consumers": 1,
        "Channels": 3,
        # The dashboard's publishers: channels without a consumer.
        "Publishers": 2,
        "Nodes": 1,
    }
    panels = dict(PANELS)
    right = 0
    for title, want in expected.items():
        got = value(url, panels[title].format(cluster=cluster))
        if got != want:
            failures.append(f"panel '{title}' shows {got}, expected {want}")
        else:
            right += 1
    for title in ["Memory available before publishers blocked",
                  "Disk space available before publishers blocked",
                  "File descriptors available", "TCP sockets available"]:
        got = value(url, panels[title].format(cluster=cluster))
        if got is None or got <= 0:
            failures.append(f"panel '{title}' shows {got}, expected a positive figure")
        else:
            right += 1
    print(f"dashboard: {right} of {len(expected) + 4} panels show the expected figures")
    conn.close()
    return failures
