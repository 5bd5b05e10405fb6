"""Starts Warren and Prometheus on free loopback ports, runs the dashboard
and rabbitmqadmin checks against them (dashboard.py, rabbitmqadmin.py), the
rabbitmq.conf check (rabbitmq_conf.py, its own broker), and the Raft
dashboard's check against a three-node Warren cluster and a Prometheus
scraping its nodes (raft_dashboard.py), and stops them whatever happens. Run
by run.sh, which fetches the programs."""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import json
import urllib.request

import dashboard
import rabbitmq_conf
import rabbitmqadmin
import raft_dashboard

NODE = "warren@localhost"
CLUSTER = "warren-raft-dash"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proc, name, log, deadline):
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            pass
        if proc.poll() is not None:
            sys.stderr.write(open(log).read()[-3000:])
            sys.exit(f"{name} exited before listening on {port}")
        if time.monotonic() > deadline:
            sys.exit(f"{name} is not listening on {port} after 30 s")
        time.sleep(0.1)


def start_prometheus(binary, work, name, targets, procs):
    """A Prometheus scraping `targets` (ports on 127.0.0.1) every second;
    its web port and log."""
    web = free_port()
    config = os.path.join(work, f"{name}.yml")
    with open(config, "w") as f:
        f.write("global:\n  scrape_interval: 1s\n"
                f"scrape_configs:\n  - job_name: {name}\n    static_configs:\n"
                f"      - targets: [{', '.join(repr(f'127.0.0.1:{t}') for t in targets)}]\n")
    log = os.path.join(work, f"{name}.log")
    proc = subprocess.Popen(
        [binary, f"--config.file={config}",
         f"--storage.tsdb.path={os.path.join(work, name + '-tsdb')}",
         f"--web.listen-address=127.0.0.1:{web}"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT)
    procs.append(proc)
    return web, proc, log


def running_nodes(mgmt):
    """How many nodes node `mgmt`'s API lists as running."""
    req = urllib.request.Request(f"http://127.0.0.1:{mgmt}/api/nodes")
    req.add_header("Authorization", "Basic Z3Vlc3Q6Z3Vlc3Q=")  # guest:guest
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return sum(1 for n in json.load(r) if n.get("running"))
    except OSError:
        return 0


def raft_dashboard_check(a, work, env, procs):
    """Three Warren nodes as one cluster, a Prometheus scraping them, and the
    Raft dashboard's checks; what failed."""
    secret = os.path.join(work, "cluster-secret")
    with open(secret, "w") as f:
        f.write("a-secret-for-the-raft-dashboard-check")
    os.chmod(secret, 0o600)
    ports = [{k: free_port() for k in ("amqp", "mgmt", "prom", "cluster")} for _ in range(3)]
    peers = [arg for p in ports for arg in ("--peer", f"127.0.0.1:{p['cluster']}")]
    nodes, logs, node_procs = [], [], []
    for i, p in enumerate(ports, 1):
        name = f"warren-{i}@127.0.0.1"
        log = os.path.join(work, f"cluster-node-{i}.log")
        node_procs.append(subprocess.Popen(
            [a.warren, "--data-dir", os.path.join(work, f"cluster-node-{i}"),
             "--bind", "127.0.0.1", "--node-name", name, "--cluster-name", CLUSTER,
             "--port", str(p["amqp"]), "--management-port", str(p["mgmt"]),
             "--prometheus-port", str(p["prom"]), "--cluster-port", str(p["cluster"]),
             "--cluster-secret-file", secret, *peers],
            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT))
        procs.append(node_procs[-1])
        nodes.append(name)
        logs.append(log)
    web, prometheus, prom_log = start_prometheus(
        a.prometheus, work, "warren-cluster", [p["prom"] for p in ports], procs)
    deadline = time.monotonic() + 60
    for p, proc, log in zip(ports, node_procs, logs):
        wait_listening(p["mgmt"], proc, "warren cluster node", log, deadline)
    wait_listening(web, prometheus, "prometheus", prom_log, deadline)
    while running_nodes(ports[0]["mgmt"]) < 3:
        if time.monotonic() > deadline:
            return [f"the three nodes did not form a cluster in 60 s (logs: {', '.join(logs)})"]
        time.sleep(0.2)

    def wait_scrapes(count, more_than):
        while count() <= more_than:
            if time.monotonic() > deadline + 120:
                raise RuntimeError(f"Prometheus scraped the cluster only {count()} times")
            time.sleep(0.2)

    failures = raft_dashboard.check(ports[0]["amqp"], f"http://127.0.0.1:{web}", CLUSTER,
                                    nodes, wait_scrapes)
    if failures:
        failures.append(f"(cluster logs: {', '.join(logs)}, {prom_log})")
    return failures


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--warren", required=True)
    ap.add_argument("--prometheus", required=True)
    ap.add_argument("--rabbitmqadmin", required=True)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="warren-rabbitmq-tools.")
    procs = []
    try:
        amqp, mgmt, prom_port, prom_web = (free_port() for _ in range(4))
        env = {k: v for k, v in os.environ.items() if not k.startswith("WARREN_")}
        env["NO_COLOR"] = "1"
        warren_log = os.path.join(work, "warren.log")
        warren = subprocess.Popen(
            [a.warren, "--data-dir", os.path.join(work, "data"), "--bind", "127.0.0.1",
             "--port", str(amqp), "--management-port", str(mgmt),
             "--prometheus-port", str(prom_port), "--node-name", NODE],
            env=env, stdout=open(warren_log, "w"), stderr=subprocess.STDOUT)
        procs.append(warren)
        config = os.path.join(work, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n"
                    "scrape_configs:\n  - job_name: warren\n    static_configs:\n"
                    f"      - targets: ['127.0.0.1:{prom_port}']\n")
        prom_log = os.path.join(work, "prometheus.log")
        prometheus = subprocess.Popen(
            [a.prometheus, f"--config.file={config}",
             f"--storage.tsdb.path={os.path.join(work, 'tsdb')}",
             f"--web.listen-address=127.0.0.1:{prom_web}"],
            stdout=open(prom_log, "w"), stderr=subprocess.STDOUT)
        procs.append(prometheus)
        deadline = time.monotonic() + 30
        wait_listening(amqp, warren, "warren", warren_log, deadline)
        wait_listening(mgmt, warren, "warren", warren_log, deadline)
        wait_listening(prom_web, prometheus, "prometheus", prom_log, deadline)

        failures = dashboard.check(amqp, f"http://127.0.0.1:{prom_web}", NODE)
        failures += rabbitmqadmin.check(a.rabbitmqadmin, mgmt, amqp)
        failures += rabbitmq_conf.check(a.warren, free_port, wait_listening)
        if warren.poll() is not None:
            failures.append(f"warren exited ({warren.returncode})")
        failures += raft_dashboard_check(a, work, env, procs)
        if failures:
            for f in failures:
                print("FAIL:", f)
            print(f"(logs: {warren_log}, {prom_log})")
            work = None  # kept for reading
            sys.exit(1)
        print("rabbitmq-tools: all checks passed")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
