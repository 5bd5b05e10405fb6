"""What the Python scenario runners share: unique names, assertions that
raise `Failure`, and a per-scenario timeout through SIGALRM."""

import signal
import uuid

RUN = uuid.uuid4().hex[:8]  # keeps names unique when pointed at a long-lived broker


def namer(client):
    """`name(base)` for one client's entities: `<client>.<base>.<run>`."""
    return lambda base: f"{client}.{base}.{RUN}"


class Failure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failure(msg)


def eq(actual, expected, what):
    if actual != expected:
        raise Failure(f"{what}: expected {expected!r}, got {actual!r}")


class Timeout(Exception):
    pass


def install_timeout(seconds):
    """Makes `signal.alarm(seconds)` fail the running scenario with `Timeout`."""

    def on_alarm(_sig, _frame):
        raise Timeout(f"scenario did not finish within {seconds}s")

    signal.signal(signal.SIGALRM, on_alarm)
