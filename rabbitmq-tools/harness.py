"""Starts Warren and Prometheus on free loopback ports, runs the dashboard
and rabbitmqadmin checks against them (dashboard.py, rabbitmqadmin.py), and
the rabbitmq.conf check (rabbitmq_conf.py, its own broker), and stops them
whatever happens. Run by run.sh, which fetches the programs."""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import dashboard
import rabbitmq_conf
import rabbitmqadmin

NODE = "warren@localhost"


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
