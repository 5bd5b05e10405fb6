"""Minimal hand-written AMQP 0-9-1 frame encoder/decoder used by the Warren
capture scripts (probe_errors.py, probe_routing.py, capture_golden.py).

Written from the AMQP 0-9-1 specification (frame layout, field table type
letters as used by RabbitMQ / the 0-9-1 errata).  It is deliberately small
and permissive so that it can also produce *malformed* frames on purpose.
"""
import socket
import struct
import time

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
FRAME_END = 0xCE

# (class_id, method_id) -> dotted name, from the AMQP 0-9-1 spec.
METHOD_NAMES = {
    (10, 10): "connection.start", (10, 11): "connection.start-ok",
    (10, 20): "connection.secure", (10, 21): "connection.secure-ok",
    (10, 30): "connection.tune", (10, 31): "connection.tune-ok",
    (10, 40): "connection.open", (10, 41): "connection.open-ok",
    (10, 50): "connection.close", (10, 51): "connection.close-ok",
    (10, 60): "connection.blocked", (10, 61): "connection.unblocked",
    (10, 70): "connection.update-secret", (10, 71): "connection.update-secret-ok",
    (20, 10): "channel.open", (20, 11): "channel.open-ok",
    (20, 20): "channel.flow", (20, 21): "channel.flow-ok",
    (20, 40): "channel.close", (20, 41): "channel.close-ok",
    (30, 10): "access.request", (30, 11): "access.request-ok",
    (40, 10): "exchange.declare", (40, 11): "exchange.declare-ok",
    (40, 20): "exchange.delete", (40, 21): "exchange.delete-ok",
    (40, 30): "exchange.bind", (40, 31): "exchange.bind-ok",
    (40, 40): "exchange.unbind", (40, 51): "exchange.unbind-ok",
    (50, 10): "queue.declare", (50, 11): "queue.declare-ok",
    (50, 20): "queue.bind", (50, 21): "queue.bind-ok",
    (50, 30): "queue.purge", (50, 31): "queue.purge-ok",
    (50, 40): "queue.delete", (50, 41): "queue.delete-ok",
    (50, 50): "queue.unbind", (50, 51): "queue.unbind-ok",
    (60, 10): "basic.qos", (60, 11): "basic.qos-ok",
    (60, 20): "basic.consume", (60, 21): "basic.consume-ok",
    (60, 30): "basic.cancel", (60, 31): "basic.cancel-ok",
    (60, 40): "basic.publish", (60, 50): "basic.return",
    (60, 60): "basic.deliver", (60, 70): "basic.get",
    (60, 71): "basic.get-ok", (60, 72): "basic.get-empty",
    (60, 80): "basic.ack", (60, 90): "basic.reject",
    (60, 100): "basic.recover-async", (60, 110): "basic.recover",
    (60, 111): "basic.recover-ok", (60, 120): "basic.nack",
    (85, 10): "confirm.select", (85, 11): "confirm.select-ok",
    (90, 10): "tx.select", (90, 11): "tx.select-ok",
    (90, 20): "tx.commit", (90, 21): "tx.commit-ok",
    (90, 30): "tx.rollback", (90, 31): "tx.rollback-ok",
}


def method_name(cls, mth):
    return METHOD_NAMES.get((cls, mth), "unknown(%d,%d)" % (cls, mth))


# ---------------------------------------------------------------- encoding
class T:
    """An explicitly typed AMQP field value: T('b', -1), T('l', 1), T('S', 'x')."""

    def __init__(self, kind, value):
        self.kind = kind
        self.value = value

    def __repr__(self):
        return "T(%r, %r)" % (self.kind, self.value)


def shortstr(s):
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    assert len(b) <= 255
    return struct.pack(">B", len(b)) + b


def longstr(s):
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack(">I", len(b)) + b


def field_value(v):
    """Encode one field value (type letter + data)."""
    if isinstance(v, T):
        k, x = v.kind, v.value
        if k == "t":
            return b"t" + struct.pack(">B", 1 if x else 0)
        if k == "b":
            return b"b" + struct.pack(">b", x)
        if k == "B":
            return b"B" + struct.pack(">B", x)
        if k == "s":
            return b"s" + struct.pack(">h", x)
        if k == "u":
            return b"u" + struct.pack(">H", x)
        if k == "I":
            return b"I" + struct.pack(">i", x)
        if k == "i":
            return b"i" + struct.pack(">I", x)
        if k in ("l", "L"):
            return k.encode() + struct.pack(">q", x)
        if k == "f":
            return b"f" + struct.pack(">f", x)
        if k == "d":
            return b"d" + struct.pack(">d", x)
        if k == "D":
            scale, unscaled = x
            return b"D" + struct.pack(">Bi", scale, unscaled)
        if k == "S":
            return b"S" + longstr(x)
        if k == "x":
            return b"x" + longstr(x)
        if k == "T":
            return b"T" + struct.pack(">Q", x)
        if k == "F":
            return b"F" + table(x)
        if k == "A":
            return b"A" + array(x)
        if k == "V":
            return b"V"
        if k == "raw":  # arbitrary bytes, type letter included
            return bytes(x)
        raise ValueError(k)
    if isinstance(v, bool):
        return b"t" + struct.pack(">B", 1 if v else 0)
    if isinstance(v, int):
        if -2**31 <= v < 2**31:
            return b"I" + struct.pack(">i", v)
        return b"l" + struct.pack(">q", v)
    if isinstance(v, float):
        return b"d" + struct.pack(">d", v)
    if isinstance(v, str):
        return b"S" + longstr(v)
    if isinstance(v, (bytes, bytearray)):
        return b"x" + longstr(v)
    if isinstance(v, dict):
        return b"F" + table(v)
    if isinstance(v, list):
        return b"A" + array(v)
    if v is None:
        return b"V"
    raise TypeError(type(v))


def table(d):
    """Encode a field table. d is a dict or a list of (key, value) pairs."""
    items = d.items() if isinstance(d, dict) else d
    body = b"".join(shortstr(k) + field_value(v) for k, v in items)
    return struct.pack(">I", len(body)) + body


def array(lst):
    body = b"".join(field_value(v) for v in lst)
    return struct.pack(">I", len(body)) + body


def frame(ftype, channel, payload, end=FRAME_END, size=None):
    if size is None:
        size = len(payload)
    return struct.pack(">BHI", ftype, channel, size) + payload + bytes([end])


def method_frame(channel, cls, mth, args=b""):
    return frame(FRAME_METHOD, channel, struct.pack(">HH", cls, mth) + args)


def header_frame(channel, body_size, cls=60, flags=0, props=b"", weight=0):
    return frame(FRAME_HEADER, channel,
                 struct.pack(">HHQH", cls, weight, body_size, flags) + props)


def body_frame(channel, data):
    return frame(FRAME_BODY, channel, data)


def bits(*flags):
    v = 0
    for i, f in enumerate(flags):
        if f:
            v |= 1 << i
    return struct.pack(">B", v)


# Common method argument builders -----------------------------------------
def start_ok(user="guest", password="guest"):
    props = table({"product": "warren-capture-raw",
                   "capabilities": {"basic.nack": True,
                                    "publisher_confirms": True,
                                    "consumer_cancel_notify": True,
                                    "exchange_exchange_bindings": True}})
    resp = b"\x00" + user.encode() + b"\x00" + password.encode()
    return props + shortstr("PLAIN") + longstr(resp) + shortstr("en_US")


def tune_ok(channel_max=2047, frame_max=131072, heartbeat=0):
    return struct.pack(">HIH", channel_max, frame_max, heartbeat)


def connection_open(vhost="/"):
    return shortstr(vhost) + shortstr("") + bits(False)


def channel_open():
    return shortstr("")


def exchange_declare(name, etype, passive=False, durable=False, auto_delete=False,
                     internal=False, nowait=False, arguments=None):
    return (struct.pack(">H", 0) + shortstr(name) + shortstr(etype)
            + bits(passive, durable, auto_delete, internal, nowait)
            + table(arguments or {}))


def exchange_delete(name, if_unused=False, nowait=False):
    return struct.pack(">H", 0) + shortstr(name) + bits(if_unused, nowait)


def exchange_bind(destination, source, routing_key="", nowait=False, arguments=None):
    return (struct.pack(">H", 0) + shortstr(destination) + shortstr(source)
            + shortstr(routing_key) + bits(nowait) + table(arguments or {}))


exchange_unbind = exchange_bind


def queue_declare(name, passive=False, durable=False, exclusive=False,
                  auto_delete=False, nowait=False, arguments=None, raw_name=None):
    n = raw_name if raw_name is not None else shortstr(name)
    return (struct.pack(">H", 0) + n
            + bits(passive, durable, exclusive, auto_delete, nowait)
            + table(arguments or {}))


def queue_bind(queue, exchange, routing_key="", nowait=False, arguments=None):
    return (struct.pack(">H", 0) + shortstr(queue) + shortstr(exchange)
            + shortstr(routing_key) + bits(nowait) + table(arguments or {}))


def queue_unbind(queue, exchange, routing_key="", arguments=None):
    return (struct.pack(">H", 0) + shortstr(queue) + shortstr(exchange)
            + shortstr(routing_key) + table(arguments or {}))


def basic_publish(exchange, routing_key, mandatory=False, immediate=False):
    return (struct.pack(">H", 0) + shortstr(exchange) + shortstr(routing_key)
            + bits(mandatory, immediate))


def basic_get(queue, no_ack=True):
    return struct.pack(">H", 0) + shortstr(queue) + bits(no_ack)


def basic_properties(headers=None):
    """Content header property list with only the headers property set."""
    if headers is None:
        return 0, b""
    return 0x2000, table(headers)


# ---------------------------------------------------------------- decoding
class Decoder:
    def __init__(self, data, off=0):
        self.d = data
        self.o = off

    def take(self, n):
        if self.o + n > len(self.d):
            raise ValueError("truncated")
        b = self.d[self.o:self.o + n]
        self.o += n
        return b

    def u8(self):
        return self.take(1)[0]

    def u16(self):
        return struct.unpack(">H", self.take(2))[0]

    def u32(self):
        return struct.unpack(">I", self.take(4))[0]

    def u64(self):
        return struct.unpack(">Q", self.take(8))[0]

    def shortstr(self):
        n = self.u8()
        b = self.take(n)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return b

    def longstr(self):
        n = self.u32()
        return self.take(n)

    def table(self):
        n = self.u32()
        end = self.o + n
        out = []
        while self.o < end:
            k = self.shortstr()
            out.append((k, self.value()))
        return out

    def value(self):
        k = chr(self.u8())
        if k == "t":
            return T(k, bool(self.u8()))
        if k == "b":
            return T(k, struct.unpack(">b", self.take(1))[0])
        if k == "B":
            return T(k, self.u8())
        if k == "s":
            return T(k, struct.unpack(">h", self.take(2))[0])
        if k == "u":
            return T(k, self.u16())
        if k == "I":
            return T(k, struct.unpack(">i", self.take(4))[0])
        if k == "i":
            return T(k, self.u32())
        if k in "lL":
            return T(k, struct.unpack(">q", self.take(8))[0])
        if k == "f":
            return T(k, struct.unpack(">f", self.take(4))[0])
        if k == "d":
            return T(k, struct.unpack(">d", self.take(8))[0])
        if k == "D":
            return T(k, (self.u8(), struct.unpack(">i", self.take(4))[0]))
        if k == "S":
            return T(k, self.longstr())
        if k == "x":
            return T(k, self.longstr())
        if k == "T":
            return T(k, self.u64())
        if k == "F":
            return T(k, self.table())
        if k == "A":
            n = self.u32()
            end = self.o + n
            vals = []
            while self.o < end:
                vals.append(self.value())
            return T(k, vals)
        if k == "V":
            return T(k, None)
        raise ValueError("unknown field type %r" % k)


def split_frames(data):
    """Split a byte stream into complete frames. Returns (frames, rest)."""
    frames = []
    o = 0
    while len(data) - o >= 7:
        ftype, ch, size = struct.unpack_from(">BHI", data, o)
        if len(data) - o < 7 + size + 1:
            break
        frames.append(data[o:o + 8 + size])
        o += 8 + size
    return frames, data[o:]


def describe(fr):
    """Short human description of one complete frame (bytes)."""
    ftype, ch, size = struct.unpack_from(">BHI", fr, 0)
    payload = fr[7:7 + size]
    if ftype == FRAME_METHOD and size >= 4:
        cls, mth = struct.unpack_from(">HH", payload, 0)
        name = method_name(cls, mth)
        if (cls, mth) == (60, 50):
            d = Decoder(payload, 4)
            try:
                code = d.u16()
                text = d.shortstr()
                name += " code=%d text=%r exchange=%r routing_key=%r" % (
                    code, text, d.shortstr(), d.shortstr())
            except ValueError:
                pass
        if (cls, mth) in ((10, 50), (20, 40)):
            d = Decoder(payload, 4)
            try:
                code = d.u16()
                text = d.shortstr()
                c, m = d.u16(), d.u16()
                name += " code=%d text=%r class=%d method=%d" % (code, text, c, m)
            except ValueError:
                pass
        return name
    if ftype == FRAME_HEADER:
        return "header"
    if ftype == FRAME_BODY:
        return "body"
    if ftype == FRAME_HEARTBEAT:
        return "heartbeat"
    return "frame-type-%d" % ftype


def parse_close(fr):
    """Return dict for a connection.close / channel.close frame, else None."""
    ftype, ch, size = struct.unpack_from(">BHI", fr, 0)
    if ftype != FRAME_METHOD:
        return None
    payload = fr[7:7 + size]
    cls, mth = struct.unpack_from(">HH", payload, 0)
    if (cls, mth) not in ((10, 50), (20, 40)):
        return None
    d = Decoder(payload, 4)
    code = d.u16()
    text = d.shortstr()
    return {"kind": method_name(cls, mth), "channel": ch, "code": code,
            "text": text, "class_id": d.u16(), "method_id": d.u16()}


# ---------------------------------------------------------------- client
class RawConn:
    def __init__(self, host="127.0.0.1", port=5673, timeout=5.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.closed = False

    def send(self, data):
        self.sock.sendall(data)

    def recv_frame(self, timeout=5.0):
        """Return next frame bytes, or None on EOF/timeout (sets self.closed on EOF)."""
        deadline = time.time() + timeout
        while True:
            frames, rest = split_frames(self.buf)
            if frames:
                fr = frames[0]
                self.buf = self.buf[len(fr):]
                return fr
            remaining = deadline - time.time()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return None
            except (ConnectionResetError, BrokenPipeError):
                self.closed = True
                return None
            if not chunk:
                self.closed = True
                return None
            self.buf += chunk

    def expect(self, cls, mth, channel=None, timeout=5.0):
        while True:
            fr = self.recv_frame(timeout)
            if fr is None:
                raise RuntimeError("expected %s, got EOF/timeout" % method_name(cls, mth))
            if fr[0] == FRAME_HEARTBEAT:
                continue
            if fr[0] == FRAME_METHOD and fr[7:11] == struct.pack(">HH", cls, mth):
                return fr
            raise RuntimeError("expected %s, got %s" % (method_name(cls, mth), describe(fr)))

    def handshake(self, frame_max=131072, heartbeat=0, vhost="/"):
        self.send(PROTOCOL_HEADER)
        self.expect(10, 10)
        self.send(method_frame(0, 10, 11, start_ok()))
        self.expect(10, 30)
        self.send(method_frame(0, 10, 31, tune_ok(frame_max=frame_max, heartbeat=heartbeat)))
        self.send(method_frame(0, 10, 40, connection_open(vhost)))
        self.expect(10, 41)
        return self

    def open_channel(self, ch=1):
        self.send(method_frame(ch, 20, 10, channel_open()))
        self.expect(20, 11, ch)

    def call(self, ch, cls, mth, args, reply=None):
        """Send a method and return the next non-heartbeat frame (or None)."""
        self.send(method_frame(ch, cls, mth, args))
        while True:
            fr = self.recv_frame()
            if fr is None or fr[0] != FRAME_HEARTBEAT:
                return fr

    def collect(self, timeout=3.0, reply_close_ok=True):
        """Read frames until EOF or quiet for `timeout`. Answers server
        connection.close / channel.close with close-ok so that the server's
        own teardown behaviour is observed.  Returns (frames, eof)."""
        got = []
        while True:
            fr = self.recv_frame(timeout)
            if fr is None:
                return got, self.closed
            got.append(fr)
            c = parse_close(fr)
            if c and reply_close_ok:
                try:
                    if c["kind"] == "connection.close":
                        self.send(method_frame(0, 10, 51))
                    else:
                        self.send(method_frame(c["channel"], 20, 41))
                except OSError:
                    pass

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
