#!/usr/bin/env python3
"""Probe how a real RabbitMQ node reacts to malformed / out-of-order AMQP
0-9-1 input.  Every case runs on a fresh raw-socket connection: normal
handshake (PLAIN guest/guest, frame_max 131072, heartbeat 0), usually
channel 1 opened, then the bad input.  Whatever the server sends back is
recorded (server connection.close / channel.close are answered with
close-ok, as a well-behaved client would), plus whether and when the
socket was closed by the server.

Usage:
    /tmp/warren-capture-venv/bin/python probe_errors.py [--port 5673] [--out FILE]
(only the standard library is needed; amqp_raw.py sits next to this file)
"""
import argparse
import datetime
import os
import socket
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from amqp_raw import (  # noqa: E402
    PROTOCOL_HEADER, RawConn, basic_publish, bits, body_frame, channel_open, describe,
    frame, header_frame, method_frame, parse_close, queue_declare, shortstr, split_frames,
    table, T,
)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "..", "..", "crates", "amqp-codec", "tests", "golden",
                           "rabbitmq_3_10_errors.md")
PORT = 5673


def raw_header_probe(data, wait=5):
    """Send `data` instead of a protocol header; return (bytes received, eof, secs)."""
    s = socket.create_connection(("127.0.0.1", PORT), timeout=5)
    t0 = time.time()
    s.sendall(data)
    got = b""
    eof = False
    s.settimeout(wait)
    try:
        while True:
            c = s.recv(4096)
            if not c:
                eof = True
                break
            got += c
    except socket.timeout:
        pass
    except ConnectionResetError:
        eof = True
    s.close()
    return got, eof, time.time() - t0


def run_case(setup_channel, payload_fn, quiet=5.0):
    """Fresh connection, handshake, optionally open channel 1, send payload.
    Returns dict with frames received and socket state."""
    c = RawConn(port=PORT)
    c.handshake()
    if setup_channel:
        c.open_channel(1)
    t0 = time.time()
    try:
        payload_fn(c)
        send_err = None
    except OSError as e:
        send_err = repr(e)
    frames, eof = c.collect(timeout=quiet)
    # if only a channel error happened, check the connection is still usable
    alive = None
    if not eof:
        try:
            c.send(method_frame(0, 10, 50, struct.pack(">H", 200) + shortstr("bye")
                                + struct.pack(">HH", 0, 0)))
            fr = c.recv_frame(3)
            alive = fr is not None and describe(fr) == "connection.close-ok"
        except OSError:
            alive = False
    c.close()
    return {"frames": frames, "eof": eof, "secs": time.time() - t0,
            "send_err": send_err, "alive_after": alive}


def summarize(res):
    parts = []
    for fr in res["frames"]:
        cl = parse_close(fr)
        if cl:
            parts.append("%s (ch %d): %d `%s` class=%d method=%d" % (
                cl["kind"], cl["channel"], cl["code"], cl["text"], cl["class_id"],
                cl["method_id"]))
        elif fr[0] == 3:
            parts.append("body %r (ch %d)" % (fr[7:-1][:40], struct.unpack_from(">H", fr, 1)[0]))
        elif fr[0] == 2:
            parts.append("header body_size=%d (ch %d)" % (struct.unpack_from(">Q", fr, 11)[0],
                                                          struct.unpack_from(">H", fr, 1)[0]))
        else:
            parts.append(describe(fr) + " (ch %d)" % struct.unpack_from(">H", fr, 1)[0])
    if not parts:
        parts.append("nothing")
    if res["eof"]:
        parts.append("then socket closed by server (%.1fs after the input)" % res["secs"])
    elif res["alive_after"]:
        parts.append("connection stays open (connection.close by client answered normally)")
    elif res["alive_after"] is False:
        parts.append("connection unusable afterwards (no close-ok to client close)")
    if res["send_err"]:
        parts.append("send error: " + res["send_err"])
    return "; ".join(parts)


# ------------------------------------------------------------------ cases
def publish_method(ch=1, rk="q"):
    return method_frame(ch, 60, 40, basic_publish("", rk))


CASES = []

# Observations written by hand after the 3.10.8 run (server log lines quoted are
# what the node logged for that connection; re-check if re-run on another version).
NOTES = """## Notes (from the 3.10.8 run)

- Connection-level errors are always sent on channel 0 as connection.close; the server
  then waits for connection.close-ok and closes the socket right after it.
- Framing errors (bad frame-end 0xCD, frame larger than frame_max): the server sends
  connection.close 501 with class/method 0/0, then **ignores all further input**
  (our connection.close-ok gets no reaction) and closes the socket about 3 s later
  (log: `fatal_frame_error`).  The size check happens on the 7-byte frame header:
  `{frame_too_large,200000,131064}` i.e. the limit quoted is frame_max - 8 (payload limit).
- Method payloads that do not decode (truncated, trailing bytes, table length past the
  end) all give 501 `FRAME_ERROR - cannot decode <<payload after class/method ids>>` with
  class/method of the offending method.  Trailing bytes after the last argument are an error.
- Unknown class or method id (2a, 2a', 2b) and an unknown field-table type 'Z' (14): no
  AMQP reply at all, the socket is just closed (the node logs a crash of the connection
  process: `{unknown_method_id,{99,10}}` / `function_clause` in the table parser).
- reply-text is cut to 255 bytes (case 6': shortstr length octet 0xff).
- Frame-type problems on any channel -> 505 UNEXPECTED_FRAME (heartbeat on channel != 0,
  header/body on channel 0, header with no method pending, body when header expected,
  header/body on an idle channel), class/method 0/0 unless a content method is pending,
  in which case class/method are those of the pending method (60/40).
  A heartbeat frame with a non-empty payload is 501 FRAME_ERROR ... unknown_frame.
- A body frame that overshoots the declared body size (13, 13') is NOT detected: no reply,
  the message is never delivered and the channel keeps waiting for body; the next method
  on that channel gets 505 `expected content body` (13g, 13g').
- A zero-length body (body_size 0) takes no body frame: an empty body frame after it is
  505 `expected method frame` (29).
- Channel errors (unknown delivery tag 406, missing exchange 404) close only the channel.
- Method on a never-opened channel: 504 CHANNEL_ERROR `expected 'channel.open'` (connection
  level); second channel.open: 504 `second 'channel.open' seen`; a non-connection method
  on channel 0: 504 `unexpected method in connection state running`;
  channel.close-ok without channel.close: 503 COMMAND_INVALID `unimplemented method`.
- Not enforced by 3.10.8: channel number above the negotiated channel_max (20), invalid
  UTF-8 in basic.publish routing key (16'), header body_size 2^40 (23, at least not at
  header time), property-flags continuation bit (24).  Invalid UTF-8 in the queue name of
  queue.declare IS rejected: 501 `Malformed UTF-8 in shortstr` class/method 0/0.
- Protocol header: any bad header gets `AMQP 0 0 9 1` back and the socket is closed
  immediately, except `AMQP 1 1 8 0` (AMQP 0-8, which 3.10 still speaks: a 0-8
  connection.start comes back) and an incomplete header (socket closed after the 10 s
  handshake timeout with nothing sent).  AMQP 1.0 headers (`AMQP 0 1 0 0`, `AMQP 3 1 0 0`)
  also get the 0-9-1 header since the AMQP 1.0 plugin is not enabled.
"""


def case(name, sent, setup_channel=True):
    def deco(fn):
        CASES.append((name, sent, setup_channel, fn))
        return fn
    return deco


@case("2a", "method class 99 method 10 on channel 1")
def _(c):
    c.send(method_frame(1, 99, 10, b""))


@case("2a'", "method class 99 method 10 on channel 0")
def _(c):
    c.send(method_frame(0, 99, 10, b""))


@case("2b", "method class 60 (basic) method 99 on channel 1")
def _(c):
    c.send(method_frame(1, 60, 99, b""))


@case("3", "basic.publish, routing-key shortstr length 20 but only 3 bytes follow")
def _(c):
    args = struct.pack(">H", 0) + shortstr("") + b"\x14abc"
    c.send(method_frame(1, 60, 40, args))


@case("3'", "queue.declare with arguments table length 100 but table ends after 5 bytes")
def _(c):
    args = struct.pack(">H", 0) + shortstr("q") + bits() + struct.pack(">I", 100) + b"\x01a" + b"t\x01"
    c.send(method_frame(1, 50, 10, args))


@case("4", "channel.open on channel 2 with 5 extra trailing bytes in the payload")
def _(c):
    c.send(method_frame(2, 20, 10, channel_open() + b"\x01\x02\x03\x04\x05"))


@case("4'", "queue.declare with 5 extra trailing bytes after the arguments table")
def _(c):
    c.send(method_frame(1, 50, 10, queue_declare("", exclusive=True) + b"\x01\x02\x03\x04\x05"))


@case("5", "channel.open frame on channel 2 with frame-end 0xCD instead of 0xCE")
def _(c):
    c.send(frame(1, 2, struct.pack(">HH", 20, 10) + channel_open(), end=0xCD))


@case("6", "method frame header declaring size 200000 (frame_max 131072), full payload sent")
def _(c):
    payload = struct.pack(">HH", 60, 40) + b"\x00" * (200000 - 4)
    c.send(frame(1, 1, payload))


@case("6'", "method frame header declaring size 131065 (= frame_max - 7, i.e. whole frame 1 byte too big)")
def _(c):
    payload = struct.pack(">HH", 60, 40) + b"\x00" * (131065 - 4)
    c.send(frame(1, 1, payload))


@case("6''", "method frame with size exactly frame_max - 8 = 131064 (largest legal), junk basic.publish")
def _(c):
    payload = struct.pack(">HH", 60, 40) + basic_publish("", "q") + b"\x00" * (131064 - 4 - 5)
    c.send(frame(1, 1, payload))


@case("7", "content header (class 60, body 5) on open channel 1 with no publish pending")
def _(c):
    c.send(header_frame(1, 5))


@case("8", "basic.publish then a body frame where the content header is expected")
def _(c):
    c.send(publish_method() + body_frame(1, b"hello"))


@case("9", "basic.publish then content header with class id 50")
def _(c):
    c.send(publish_method() + header_frame(1, 5, cls=50))


@case("10", "basic.publish + header (body 10) then channel.flow before any body frame")
def _(c):
    c.send(publish_method() + header_frame(1, 10) + method_frame(1, 20, 20, bits(True)))


@case("10'", "basic.publish + header (body 10) + 4-byte body, then channel.flow")
def _(c):
    c.send(publish_method() + header_frame(1, 10) + body_frame(1, b"abcd")
           + method_frame(1, 20, 20, bits(True)))


@case("11", "heartbeat frame (type 8) on channel 1")
def _(c):
    c.send(frame(8, 1, b""))


@case("11'", "heartbeat frame on channel 0 with 3-byte payload")
def _(c):
    c.send(frame(8, 0, b"abc"))


@case("12", "frame type 9 on channel 0, 4-byte payload")
def _(c):
    c.send(frame(9, 0, b"\x00\x00\x00\x00"))


@case("12'", "frame type 9 on channel 1, 4-byte payload")
def _(c):
    c.send(frame(9, 1, b"\x00\x00\x00\x00"))


@case("13", "basic.publish + header (body 5) + one 10-byte body frame")
def _(c):
    c.send(publish_method() + header_frame(1, 5) + body_frame(1, b"0123456789"))


@case("13'", "basic.publish + header (body 5) + body frames of 3 and 3 bytes")
def _(c):
    c.send(publish_method() + header_frame(1, 5) + body_frame(1, b"012") + body_frame(1, b"345"))


@case("13g", "queue.declare 'p13' (exclusive) on ch 1; publish to it: header body 5 + one 10-byte body frame; then basic.get no-ack")
def _(c):
    c.send(method_frame(1, 50, 10, queue_declare("p13", exclusive=True)))
    c.expect(50, 11)
    c.send(method_frame(1, 60, 40, basic_publish("", "p13")) + header_frame(1, 5)
           + body_frame(1, b"0123456789"))
    time.sleep(0.3)
    c.send(method_frame(1, 60, 70, struct.pack(">H", 0) + shortstr("p13") + bits(True)))


@case("13g'", "as 13g but body frames of 3 and 3 bytes for a declared body of 5, then basic.get")
def _(c):
    c.send(method_frame(1, 50, 10, queue_declare("p13", exclusive=True)))
    c.expect(50, 11)
    c.send(method_frame(1, 60, 40, basic_publish("", "p13")) + header_frame(1, 5)
           + body_frame(1, b"012") + body_frame(1, b"345"))
    time.sleep(0.3)
    c.send(method_frame(1, 60, 70, struct.pack(">H", 0) + shortstr("p13") + bits(True)))


@case("14", "queue.declare arguments table with a value of unknown field type 'Z'")
def _(c):
    args = (struct.pack(">H", 0) + shortstr("") + bits(False, False, True)
            + table([("x-foo", T("raw", b"Z\x00\x00\x00\x01"))]))
    c.send(method_frame(1, 50, 10, args))


@case("15", "queue.declare on channel 5 which was never opened")
def _(c):
    c.send(method_frame(5, 50, 10, queue_declare("", exclusive=True)))


@case("15'", "content header on channel 5 which was never opened")
def _(c):
    c.send(header_frame(5, 5))


@case("16", "queue.declare with queue name shortstr = bytes ff fe fd (invalid UTF-8)")
def _(c):
    c.send(method_frame(1, 50, 10, queue_declare(None, raw_name=b"\x03\xff\xfe\xfd")))


@case("16'", "basic.publish with routing key ff fe (invalid UTF-8) to default exchange")
def _(c):
    args = struct.pack(">H", 0) + shortstr("") + b"\x02\xff\xfe" + bits()
    c.send(method_frame(1, 60, 40, args) + header_frame(1, 0))


@case("17", "basic.qos on channel 0")
def _(c):
    c.send(method_frame(0, 60, 10, struct.pack(">IHB", 0, 10, 0)))


@case("17'", "content header on channel 0")
def _(c):
    c.send(header_frame(0, 5))


@case("17''", "body frame on channel 0")
def _(c):
    c.send(body_frame(0, b"hello"))


@case("18", "channel.open on channel 1 which is already open")
def _(c):
    c.send(method_frame(1, 20, 10, channel_open()))


@case("19", "basic.ack with unknown delivery tag 99")
def _(c):
    c.send(method_frame(1, 60, 80, struct.pack(">Q", 99) + bits()))


@case("20", "channel.open on channel 3000 (> negotiated channel_max 2047)")
def _(c):
    c.send(method_frame(3000, 20, 10, channel_open()))


@case("21", "method frame with 2-byte payload (class id only)")
def _(c):
    c.send(frame(1, 1, struct.pack(">H", 60)))


@case("22", "method frame with empty payload (size 0)")
def _(c):
    c.send(frame(1, 1, b""))


@case("23", "basic.publish + content header declaring body size 2^40")
def _(c):
    c.send(publish_method() + header_frame(1, 1 << 40))


@case("24", "content header with property flags bit 0 set (continuation flag)")
def _(c):
    c.send(publish_method() + header_frame(1, 0, flags=0x0001))


@case("25", "connection.tune-ok sent again after open (channel 0)")
def _(c):
    c.send(method_frame(0, 10, 31, struct.pack(">HIH", 2047, 131072, 0)))


@case("26", "channel.close-ok on channel 1 without a preceding channel.close")
def _(c):
    c.send(method_frame(1, 20, 41, b""))


@case("27", "basic.publish to missing exchange 'nope' (channel-level error, for contrast)")
def _(c):
    c.send(method_frame(1, 60, 40, basic_publish("nope", "k")) + header_frame(1, 0))


@case("28", "method after channel.close sent by client, before close-ok (basic.qos)")
def _(c):
    c.send(method_frame(1, 20, 40, struct.pack(">H", 200) + shortstr("bye") + struct.pack(">HH", 0, 0))
           + method_frame(1, 60, 10, struct.pack(">IHB", 0, 10, 0)))


@case("29", "basic.publish (body 0 declared) followed by an empty body frame")
def _(c):
    c.send(publish_method() + header_frame(1, 0) + body_frame(1, b""))


@case("30", "basic.publish with header on channel 1 but body frame on channel 2 (channel 2 open)")
def _(c):
    c.open_channel(2)
    c.send(publish_method() + header_frame(1, 5) + body_frame(2, b"hello"))


def main():
    global PORT
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=int(os.environ.get("RABBITMQ_NODE_PORT", 5673)))
    ap.add_argument("--node", default="warrencap@localhost")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    PORT = args.port

    rows = []
    details = []

    for name, data in (("1a", b"AMQP\x00\x00\x09\x02"),
                       ("1b", b"HTTP/1.1 200 OK\r\n\r\n"),
                       ("1c", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
                       ("1d", b"AMQP\x01\x01\x08\x00"),
                       ("1e", b"AMQP\x00\x01\x00\x00"),
                       ("1f", b"AMQP\x03\x01\x00\x00"),
                       ("1g", b"AMQP\x00\x00\x08\x00"),
                       ("1h", b"AMQP")):
        wait = 15 if name == "1h" else 5
        got, eof, secs = raw_header_probe(data, wait=wait)
        if len(got) > 16:
            frs, _ = split_frames(got)
            desc = "%d bytes: %s frame(s) %s" % (len(got), len(frs), ", ".join(
                describe(f) + " ch %d" % struct.unpack_from(">H", f, 1)[0] for f in frs))
            if frs and describe(frs[0]) == "connection.start":
                desc += " with version-major %d version-minor %d" % (frs[0][11], frs[0][12])
            details.append((name, [got.hex()]))
        else:
            desc = "`%s`" % (got.hex() or "nothing")
            if got:
                desc += " (%r)" % got
        desc += "; socket closed by server after %.1fs" % secs if eof else "; socket left open (%ds timeout)" % wait
        rows.append((name, "protocol header bytes %r" % data, desc))
        print(name, rows[-1][2], file=sys.stderr)

    for name, sent, setup, fn in CASES:
        try:
            res = run_case(setup, lambda c: fn(c))
            s = summarize(res)
            details.append((name, [fr.hex() if len(fr) < 1000 else fr[:1000].hex() + "..."
                                   for fr in res["frames"]]))
        except Exception as e:  # noqa: BLE001
            s = "probe failed: %r" % (e,)
        rows.append((name, sent, s))
        print(name, s, file=sys.stderr)

    try:
        rmq = subprocess.run(["rabbitmqctl", "-n", args.node, "version"],
                             capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception:  # noqa: BLE001
        rmq = "unknown"

    out = []
    out.append("# RabbitMQ %s: replies to malformed / out-of-order AMQP 0-9-1 input" % rmq)
    out.append("")
    out.append("Observed behaviour only, recorded by `conformance/capture/probe_errors.py` "
               "(raw sockets, hand-written frames) on %s UTC against a private RabbitMQ %s node "
               "(Debian package, Erlang/OTP 25, default configuration)." % (
                   datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M"), rmq))
    out.append("")
    out.append("Each case uses a fresh connection: protocol header, start-ok (PLAIN guest/guest), "
               "tune-ok (channel_max 2047, frame_max 131072, heartbeat 0), connection.open '/', "
               "channel.open on channel 1; then the input in column 2. Server connection.close / "
               "channel.close frames were answered with close-ok. 'connection stays open' means "
               "that after the reply a client-sent connection.close still got connection.close-ok. "
               "Cases 1x send the bytes instead of the protocol header. Cases with a prime (') are "
               "extra variants beyond the requested list.")
    out.append("")
    out.append("| case | sent | reply (code, text, class-id, method-id) |")
    out.append("|---|---|---|")
    for name, sent, s in rows:
        out.append("| %s | %s | %s |" % (name, sent.replace("|", "\\|"), s.replace("|", "\\|")))
    out.append("")
    out.append(NOTES)
    out.append("")
    out.append("## Raw server frames (hex, whole frame)")
    out.append("")
    for name, frs in details:
        out.append("- %s: %s" % (name, ", ".join("`%s`" % h for h in frs) if frs else "(none)"))
    out.append("")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(out))
    print("wrote", args.out, file=sys.stderr)


if __name__ == "__main__":
    main()
