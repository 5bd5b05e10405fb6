#!/usr/bin/env python3
"""The README's quick start runs, exactly as written, so it cannot rot.

Takes the code blocks of README.md's "Quick start" section in order:
the first shell block must be `cargo run --release`; it is started in the
background (its data in a fresh temporary directory through WARREN_DATA_DIR,
a setting every user has) and waited for until AMQP and the management API
answer. Every later block then runs against it: ```sh blocks with bash
(-e, -u, pipefail), ```python blocks with a Python that has pika (a venv
under target/ made on first use). Any failure fails the check. Then the
broker is stopped with SIGTERM and must exit 0 (a graceful shutdown).

    python3 scripts/check-quickstart.py

Needs the default ports (5672, 15672, 15692) free. Run by `.ci/run` after
the release build, so `cargo run --release` compiles nothing.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORTS = (5672, 15672, 15692)
START_TIMEOUT_S = 900  # the first `cargo run --release` on a fresh machine compiles
BLOCK_TIMEOUT_S = 300


def say(msg):
    print(f"== quick start: {msg}", flush=True)


def fail(msg):
    print(f"quick start check failed: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def quick_start_blocks():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"^## Quick start\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    if not m:
        fail("README.md has no '## Quick start' section")
    blocks = re.findall(r"^```(\w+)\n(.*?)^```\s*$", m.group(1), re.M | re.S)
    return [(lang, body) for lang, body in blocks if lang in ("sh", "python")]


def port_open(port):
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def python_with_pika():
    for candidate in ("target/conformance-venv", "target/quickstart-venv"):
        py = os.path.join(ROOT, candidate, "bin", "python")
        if os.path.exists(py) and subprocess.run([py, "-c", "import pika"], capture_output=True).returncode == 0:
            return py
    venv = os.path.join(ROOT, "target", "quickstart-venv")
    say(f"making a venv with pika in {os.path.relpath(venv, ROOT)}")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "pika"], check=True)
    return os.path.join(venv, "bin", "python")


def main():
    blocks = quick_start_blocks()
    if not blocks or blocks[0] != ("sh", "cargo run --release\n"):
        fail("the quick start's first block must be exactly `cargo run --release`")
    if len(blocks) < 2:
        fail("the quick start has nothing to run against the broker")
    busy = [p for p in PORTS if port_open(p)]
    if busy:
        fail(f"ports {busy} are in use: the quick start needs the default ports")

    data_dir = tempfile.mkdtemp(prefix="warren-quickstart-")
    log_path = os.path.join(data_dir, "broker.log")
    env = dict(os.environ, WARREN_DATA_DIR=os.path.join(data_dir, "data"))
    say("cargo run --release (in the background)")
    log = open(log_path, "w")
    broker = subprocess.Popen(
        ["bash", "-c", "exec cargo run --release"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (port_open(5672) and port_open(15672)):
            if broker.poll() is not None:
                fail(f"the broker exited with {broker.returncode}:\n{open(log_path).read()[-4000:]}")
            if time.monotonic() > deadline:
                fail(f"the broker did not listen within {START_TIMEOUT_S} s")
            time.sleep(0.2)
        python = None
        for n, (lang, body) in enumerate(blocks[1:], 2):
            say(f"block {n} ({lang}):\n{body.rstrip()}")
            if lang == "sh":
                argv = ["bash", "-euo", "pipefail", "-c", body]
            else:
                python = python or python_with_pika()
                argv = [python, "-c", body]
            try:
                done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                                      timeout=BLOCK_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                fail(f"block {n} did not finish within {BLOCK_TIMEOUT_S} s")
            print(done.stdout, end="", flush=True)
            if done.returncode != 0:
                fail(f"block {n} exited with {done.returncode}:\n{done.stderr}")
        say("stopping the broker (SIGTERM)")
        os.killpg(broker.pid, signal.SIGTERM)
        try:
            code = broker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            fail("the broker did not stop within 60 s of SIGTERM")
        if code != 0:
            fail(f"the broker exited with {code} after SIGTERM:\n{open(log_path).read()[-4000:]}")
        say(f"{len(blocks)} blocks ran; the broker stopped cleanly")
    finally:
        if broker.poll() is None:
            os.killpg(broker.pid, signal.SIGKILL)
            broker.wait()
        log.close()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
