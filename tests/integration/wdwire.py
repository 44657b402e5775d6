"""A second, independent implementation of weightd's wire format.

Frames are a u32 little-endian length and one protobuf weightd.v1.Envelope.
Only what the tests need is here: varints and length-delimited fields to
encode requests, a generic decoder that returns {field number: [values]},
and views of the replies the tests read.  Field numbers come from
proto/weightd.proto; nothing is shared with the C code.
"""
import os
import socket
import struct

# Envelope fields.
ID, HELLO, LOAD, RELEASE, PREFETCH, EVICT, PIN, UNPIN, LIST, TENSORS, STATUS, CANCEL = (
    1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20)
REPLY, PROGRESS = 40, 41

CODES = ["OK", "INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED", "FORMAT_ERROR", "IO_ERROR",
         "RESOURCE_EXHAUSTED", "UNAVAILABLE", "CANCELLED", "INTERNAL", "UNSUPPORTED", "BUSY"]


# ---- encoding ----------------------------------------------------------------

def varint(n):
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def f_varint(num, value):
    return varint(num << 3) + varint(int(value))


def f_bytes(num, value):
    if isinstance(value, str):
        value = value.encode()
    return varint((num << 3) | 2) + varint(len(value)) + value


def frame(payload):
    return struct.pack("<I", len(payload)) + payload


def envelope(req_id, field, body=b""):
    return f_varint(ID, req_id) + f_bytes(field, body)


def hello_body(min_version=1, max_version=1, client="integration test"):
    return f_varint(1, min_version) + f_varint(2, max_version) + f_bytes(3, client)


def shard_body(rank, world, rules=(), uneven=False):
    """A Shard: rules is [(pattern, dim)]."""
    b = f_varint(1, rank) + f_varint(2, world)
    for pattern, dim in rules:
        b += f_bytes(3, f_bytes(1, pattern) + f_varint(2, dim))
    if uneven:
        b += f_varint(4, 1)
    return b


def load_body(model, component="", target="", progress=False, shard=None, keep_host=0, names=(), compact=False):
    """A LoadRequest; names: LoadRequest.names (the tensors to lease);
    compact: LoadRequest.compact_tensors (the reply's tensors as a table)."""
    b = f_bytes(1, model) + f_bytes(2, component) + b"".join(f_bytes(11, name) for name in names)
    if compact:
        b += f_varint(12, 1)
    if target:
        b += f_bytes(3, target)
    if progress:
        b += f_varint(4, 1)
    if shard is not None:
        b += f_bytes(5, shard)
    if keep_host:
        b += f_varint(6, keep_host)
    return b


def ref_body(model, component=""):
    return f_bytes(1, model) + f_bytes(2, component)


# ---- decoding ----------------------------------------------------------------

def read_varint(buf, pos):
    n = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, pos


def decode(buf):
    """{field number: [int or bytes, ...]} for one message."""
    fields = {}
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, pos = read_varint(buf, pos)
        elif wt == 2:
            n, pos = read_varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("length-delimited field past the end")
            val, pos = bytes(buf[pos:pos + n]), pos + n
        elif wt == 1:
            val, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wt == 5:
            val, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise ValueError(f"wire type {wt}")
        fields.setdefault(num, []).append(val)
    return fields


class Msg:
    """Typed access to a decoded message."""

    def __init__(self, raw):
        self.raw = raw
        self.f = decode(raw)

    def int(self, num, default=0):
        return self.f.get(num, [default])[-1]

    def str(self, num):
        return self.f.get(num, [b""])[-1].decode("utf-8", "replace")

    def msg(self, num):
        return Msg(self.f[num][-1]) if num in self.f else None

    def msgs(self, num):
        return [Msg(v) for v in self.f.get(num, [])]

    def strs(self, num):
        return [v.decode("utf-8", "replace") for v in self.f.get(num, [])]

    def packed(self, num):
        out = []
        for v in self.f.get(num, []):
            if isinstance(v, int):
                out.append(v)
                continue
            pos = 0
            while pos < len(v):
                n, pos = read_varint(v, pos)
                out.append(n)
        return out

    def has(self, num):
        return num in self.f


class Envelope(Msg):
    @property
    def id(self):
        return self.int(ID)

    @property
    def reply(self):
        return self.msg(REPLY)

    @property
    def progress(self):
        return self.msg(PROGRESS)

    @property
    def code(self):
        return CODES[self.reply.int(1)]

    @property
    def message(self):
        return self.reply.str(2)


STATUS_FIELDS = {1: "version", 2: "pid", 3: "uptime_ms", 4: "host_budget_bytes", 5: "host_used_bytes",
                 6: "host_evictable_bytes", 7: "storage_read_bytes", 8: "leases", 9: "connections",
                 10: "entries", 11: "loading", 12: "evictions", 14: "socket", 17: "gpu"}


def status_dict(reply):
    st = reply.msg(14)
    out = {}
    for num, name in STATUS_FIELDS.items():
        out[name] = st.str(num) if name in ("version", "socket", "gpu") else st.int(num)
    out["devices"] = [{"index": d.int(1), "uuid": d.str(2), "name": d.str(3), "total_bytes": d.int(5),
                       "budget_bytes": d.int(6), "used_bytes": d.int(7)} for d in st.msgs(16)]
    return out


def tensors_of(result, num=5):
    """[(name, dtype, shape, slab, offset, nbytes)] of a LoadReply (its field 5)
    or a TensorsReply (num=4)."""
    return [(t.str(1), t.str(2), t.packed(3), t.int(4), t.int(5), t.int(6)) for t in result.msgs(num)]


def _fixed(msg, num, fmt):
    """A packed repeated fixed32 ("I") or fixed64 ("Q") field."""
    out = []
    for v in msg.f.get(num, []):
        if isinstance(v, int):  # sent unpacked: one value per field
            out.append(v)
        else:
            out.extend(struct.unpack(f"<{len(v) // struct.calcsize(fmt)}{fmt}", v))
    return out


def table_of(load):
    """[(name, dtype, shape, slab, offset, nbytes, file or None)] of a
    LoadReply's TensorTable (its field 11), decoded from the columns alone;
    None when the reply has no table."""
    t = load.msg(11)
    if t is None:
        return None
    count = t.int(1)
    names = t.f.get(2, [b""])[-1]
    dtypes = t.strs(3)
    dtype = t.f.get(4, [b""])[-1]
    ndim = t.f.get(5, [b""])[-1]
    dims = _fixed(t, 6, "Q")
    offset, nbytes = _fixed(t, 7, "Q"), _fixed(t, 8, "Q")
    slab, file = _fixed(t, 9, "I"), _fixed(t, 10, "I")
    assert names.endswith(b"\0") or count == 0, "names must end with a NUL"
    split = names[:-1].split(b"\0") if count else []
    assert len(split) == count == len(dtype) == len(ndim) == len(offset) == len(nbytes) == len(slab)
    assert len(file) in (0, count)
    assert sum(ndim) == len(dims)
    out, d = [], 0
    for i in range(count):
        out.append((split[i].decode(), dtypes[dtype[i]], dims[d:d + ndim[i]], slab[i], offset[i], nbytes[i],
                    file[i] if file else None))
        d += ndim[i]
    return out


# ---- a connection ------------------------------------------------------------

class Closed(Exception):
    """The daemon closed the connection."""


class Conn:
    def __init__(self, path, timeout=10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.fds = []
        self.next_id = 1

    def close(self):
        for fd in self.fds:
            _close_quietly(fd)
        self.fds = []
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send_raw(self, data, fds=()):
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def _chunk(self):
        data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 20, 253)
        self.fds.extend(fds)
        if not data:
            raise Closed()
        return data

    def _fill(self):
        self.buf += self._chunk()

    def recv(self):
        """The next Envelope; raises Closed at end of stream."""
        while len(self.buf) < 4:
            self._fill()
        (n,) = struct.unpack_from("<I", self.buf)
        if len(self.buf) < 4 + n:
            # Joined once: appending each read to a large frame is quadratic.
            # Kept whatever happens (a timeout may be retried).
            parts, have = [self.buf], len(self.buf)
            try:
                while have < 4 + n:
                    parts.append(self._chunk())
                    have += len(parts[-1])
            finally:
                self.buf = b"".join(parts)
        payload, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
        return Envelope(payload)

    def take_fds(self, n):
        out, self.fds = self.fds[:n], self.fds[n:]
        return out

    def request(self, field, body=b""):
        """Send a request and return its Reply envelope (skipping Progress)."""
        rid = self.send(field, body)
        return self.wait(rid)

    def send(self, field, body=b""):
        rid = self.next_id
        self.next_id += 1
        self.send_raw(frame(envelope(rid, field, body)))
        return rid

    def wait(self, rid):
        while True:
            env = self.recv()
            if env.id == rid and env.has(REPLY):
                return env

    def hello(self):
        env = self.request(HELLO, hello_body())
        assert env.code == "OK", env.message
        return env

    def status(self):
        env = self.request(STATUS)
        assert env.code == "OK", env.message
        return status_dict(env.reply)


def connect(path, timeout=10.0):
    c = Conn(path, timeout)
    c.hello()
    return c


def _close_quietly(fd):
    try:
        os.close(fd)
    except OSError:
        pass


__all__ = ["Conn", "Closed", "connect", "frame", "envelope", "f_varint", "f_bytes", "varint", "decode",
           "hello_body", "load_body", "ref_body", "status_dict", "table_of", "tensors_of"]
