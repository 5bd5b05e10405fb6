"""rabbitmqadmin (RabbitMQ 3.10.8's, from Debian's rabbitmq-server package)
against Warren's management API, unchanged: it is run as a user would run
it, and its output is checked.

Covers `list`, `show`, `declare`, `delete`, `purge`, `publish`, `get`,
`close`, `export` and `import` (also per vhost with -V), sorting with -S
(and -R), and every output format (-f). Run by harness.py (see run.sh).
"""

import csv
import io
import json
import os
import subprocess
import sys
import tempfile

import pika


class Admin:
    def __init__(self, script, port):
        self.base = [sys.executable, script, "-H", "127.0.0.1", "-P", str(port),
                     "-u", "guest", "-p", "guest"]
        self.failures = []
        self.ran = 0

    def __call__(self, *args, ok=True):
        """Runs rabbitmqadmin with `args`; returns its output. A failure is
        recorded unless it exits as `ok` says (True: status 0)."""
        self.ran += 1
        p = subprocess.run(self.base + list(args), capture_output=True, text=True, timeout=60)
        if (p.returncode == 0) != ok:
            self.failures.append(
                f"rabbitmqadmin {' '.join(args)}: exit {p.returncode}: {p.stdout}{p.stderr}".strip())
        return p.stdout

    def expect(self, what, cond):
        if not cond:
            self.failures.append(what)

    def json(self, *args):
        out = self("-f", "raw_json", *args)
        try:
            return json.loads(out)
        except ValueError:
            self.failures.append(f"rabbitmqadmin -f raw_json {' '.join(args)}: not JSON: {out!r}")
            return []


def names(rows):
    return [r.get("name") for r in rows]


def check(script, port, amqp_port):
    a = Admin(script, port)
    vh = "tools-vh"
    a("declare", "vhost", f"name={vh}")
    a.expect("list vhosts shows the new vhost", vh in names(a.json("list", "vhosts")))
    a("declare", "user", "name=ops", "password=s3cret", "tags=monitoring")
    a("declare", "permission", f"vhost={vh}", "user=ops", "configure=.*", "write=.*", "read=.*")
    perms = a.json("list", "permissions")
    a.expect("list permissions shows ops on the vhost",
             any(p["user"] == "ops" and p["vhost"] == vh for p in perms))
    users = {u["name"]: u for u in a.json("list", "users")}
    a.expect("list users shows ops with its tag", "monitoring" in str(users.get("ops", {}).get("tags")))

    # Objects in the vhost (-V).
    a("-V", vh, "declare", "exchange", "name=tools-x", "type=topic")
    for q in ["tools-b", "tools-c", "tools-a"]:
        a("-V", vh, "declare", "queue", f"name={q}", "durable=true")
    a("-V", vh, "declare", "queue", "name=tools-args", "durable=true",
      'arguments={"x-max-length": 10}')
    a("-V", vh, "declare", "binding", "source=tools-x", "destination=tools-a",
      "routing_key=a.#")
    a("-V", vh, "declare", "binding", "source=tools-x", "destination=tools-b",
      "destination_type=queue", "routing_key=b.*")
    bindings = a.json("-V", vh, "list", "bindings")
    a.expect("list bindings shows the two bindings",
             {(b["source"], b["destination"], b["routing_key"]) for b in bindings}
             >= {("tools-x", "tools-a", "a.#"), ("tools-x", "tools-b", "b.*")})
    out = a("-V", vh, "publish", "exchange=tools-x", "routing_key=a.1", "payload=hello-a")
    a.expect(f"publish says it routed: {out!r}", out.strip() == "Message published")
    for i in range(3):
        a("-V", vh, "publish", "exchange=tools-x", "routing_key=b.x", f"payload=b{i}")
    out = a("-V", vh, "publish", "exchange=tools-x", "routing_key=zzz", "payload=lost")
    a.expect(f"publish says an unroutable message was not routed: {out!r}",
             out.strip() == "Message published but NOT routed")

    queues = {q["name"]: q for q in a.json("-V", vh, "list", "queues")}
    a.expect("list queues shows the four queues",
             set(queues) == {"tools-a", "tools-b", "tools-c", "tools-args"})
    a.expect("list queues counts messages",
             queues.get("tools-b", {}).get("messages") == 3
             and queues.get("tools-a", {}).get("messages") == 1)
    a.expect("list queues shows arguments",
             queues.get("tools-args", {}).get("arguments") == {"x-max-length": 10})

    # Sorting (-S, -R) and column choice, in tsv.
    tsv = a("-V", vh, "-f", "tsv", "-S", "name", "list", "queues", "name", "messages")
    rows = list(csv.reader(io.StringIO(tsv), delimiter="\t"))[1:]
    a.expect(f"-S name sorts by name: {rows}",
             [r[0] for r in rows] == ["tools-a", "tools-args", "tools-b", "tools-c"])
    tsv = a("-V", vh, "-f", "tsv", "-S", "messages", "-R", "list", "queues", "name", "messages")
    rows = list(csv.reader(io.StringIO(tsv), delimiter="\t"))[1:]
    a.expect(f"-S messages -R sorts by messages, most first: {rows}",
             rows[:2] == [["tools-b", "3"], ["tools-a", "1"]])

    # Every output format.
    for fmt, test in [
        ("table", lambda o: o.splitlines()[1].split() == ["|", "name", "|"]
                            and "| tools-a    |" in o),
        ("long", lambda o: "name: tools-a" in o),
        ("pretty_json", lambda o: isinstance(json.loads(o), list)),
        ("raw_json", lambda o: isinstance(json.loads(o), list)),
        ("kvp", lambda o: 'name="tools-a"' in o),
        ("tsv", lambda o: "tools-a" in o),
        ("bash", lambda o: "tools-a" in o.split()),
    ]:
        out = a("-V", vh, "-f", fmt, "list", "queues", "name")
        try:
            good = test(out)
        except ValueError:
            good = False
        a.expect(f"-f {fmt} list queues: {out!r}", good)

    # get: requeue, then take.
    out = a("-V", vh, "-f", "raw_json", "get", "queue=tools-b", "ackmode=ack_requeue_true", "count=2")
    got = json.loads(out or "[]")
    a.expect(f"get two messages: {got}", [m["payload"] for m in got] == ["b0", "b1"])
    got = a.json("-V", vh, "get", "queue=tools-b", "ackmode=ack_requeue_false")
    a.expect(f"get requeued message again, redelivered: {got}",
             len(got) == 1 and got[0]["payload"] == "b0" and got[0]["redelivered"] is True)
    a("-V", vh, "purge", "queue", "name=tools-b")
    q = {q["name"]: q for q in a.json("-V", vh, "list", "queues")}.get("tools-b", {})
    a.expect(f"purge empties the queue: {q.get('messages')}", q.get("messages") == 0)

    # show overview, nodes, connections, channels, consumers, close.
    overview = a.json("show", "overview")
    a.expect(f"show overview: {overview}",
             len(overview) == 1 and "rabbitmq_version" in overview[0])
    a.expect("list nodes shows the node", len(a.json("list", "nodes")) == 1)
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", amqp_port, client_properties={"connection_name": "tools-conn"}))
    ch = conn.channel()
    ch.basic_consume("amq.rabbitmq.reply-to", lambda *_: None, auto_ack=True)
    ch.queue_declare("tools-consumed")
    ch.basic_consume("tools-consumed", lambda *_: None)
    conns = a.json("list", "connections")
    a.expect(f"list connections shows the client: {conns}", len(conns) == 1)
    a.expect("list channels shows its channel", len(a.json("list", "channels")) == 1)
    consumers = a.json("list", "consumers")
    a.expect(f"list consumers shows its consumer: {consumers}",
             any(c.get("queue", {}).get("name") == "tools-consumed" for c in consumers))
    if conns:
        a("close", "connection", f"name={conns[0]['name']}")
    closed = False
    try:
        conn.process_data_events(time_limit=5)
    except pika.exceptions.AMQPConnectionError:
        closed = True
    a.expect("close connection closes the client's connection", closed)

    # Policies.
    a("-V", vh, "declare", "policy", "name=tools-limit", "pattern=^tools-c$",
      'definition={"max-length": 5}', "apply-to=queues")
    pols = a.json("-V", vh, "list", "policies")
    a.expect(f"list policies shows the policy: {pols}", names(pols) == ["tools-limit"])
    # An operator policy caps the queue below the policy's limit.
    a("-V", vh, "declare", "operator_policy", "name=tools-cap", "pattern=^tools-c$",
      'definition={"max-length": 2}', "apply-to=queues")
    ops = a.json("-V", vh, "list", "operator_policies")
    a.expect(f"list operator_policies shows it: {ops}", names(ops) == ["tools-cap"])
    capped = [q for q in a.json("-V", vh, "list", "queues") if q.get("name") == "tools-c"]
    a.expect(f"the queue shows the operator policy and the lower cap: {capped}",
             len(capped) == 1 and capped[0].get("operator_policy") == "tools-cap"
             and capped[0].get("effective_policy_definition", {}).get("max-length") == 2)
    a("-V", vh, "delete", "operator_policy", "name=tools-cap")
    a.expect("delete operator_policy removes it",
             a.json("-V", vh, "list", "operator_policies") == [])

    # export / import, whole broker and per vhost.
    work = tempfile.mkdtemp(prefix="rabbitmqadmin.")
    whole = os.path.join(work, "all.json")
    out = a("export", whole)
    a.expect(f"export writes the definitions: {out!r}", os.path.exists(whole))
    defs = json.load(open(whole)) if os.path.exists(whole) else {}
    a.expect("export holds the vhost's queues",
             {"tools-a", "tools-b", "tools-c"} <= {q["name"] for q in defs.get("queues", [])})
    one = os.path.join(work, "vh.json")
    a("-V", vh, "export", one)
    a("declare", "vhost", "name=tools-copy")
    a("declare", "permission", "vhost=tools-copy", "user=guest", "configure=.*", "write=.*", "read=.*")
    a("-V", "tools-copy", "import", one)
    copied = {q["name"] for q in a.json("-V", "tools-copy", "list", "queues")}
    a.expect(f"import into another vhost (-V) copies its queues: {copied}",
             {"tools-a", "tools-b", "tools-c", "tools-args"} <= copied)
    copied = a.json("-V", "tools-copy", "list", "bindings")
    a.expect("import copies bindings", any(b["destination"] == "tools-a" for b in copied))
    a("delete", "vhost", "name=tools-copy")
    a("import", whole)

    # delete.
    a("-V", vh, "delete", "binding", "source=tools-x", "destination=tools-a",
      "destination_type=queue", "properties_key=a.%23")
    a.expect("delete binding removes it",
             not any(b["destination"] == "tools-a" and b["source"] == "tools-x"
                     for b in a.json("-V", vh, "list", "bindings")))
    a("-V", vh, "delete", "queue", "name=tools-a")
    a("-V", vh, "delete", "exchange", "name=tools-x")
    a("-V", vh, "delete", "policy", "name=tools-limit")
    a.expect("delete queue removes it",
             "tools-a" not in names(a.json("-V", vh, "list", "queues")))
    a("-V", vh, "delete", "queue", "name=no-such-queue", ok=False)
    a("delete", "user", "name=ops")
    a("delete", "vhost", f"name={vh}")
    a.expect("delete vhost removes it", vh not in names(a.json("list", "vhosts")))
    print(f"rabbitmqadmin: {a.ran} commands run, {len(a.failures)} failures")
    return a.failures
