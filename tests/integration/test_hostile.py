"""Peers that break the protocol, each on its own raw socket, while
well-behaved clients keep being served: a connection opened before them all
(root), a lease held throughout (nobody), and fresh weightctl and
wd-test-client runs (nobody) after every case.

Each bad peer must get its error reply or be disconnected, and the daemon's
log must name what happened and who did it (pid and uid from SO_PEERCRED).
Frames are built by wdwire.py, the tests' own protobuf encoder.
"""
import os
import resource
import selectors
import socket
import struct

import pytest

import wdwire
from harness import NOBODY, Daemon, read_line, wait_until
from wdwire import f_bytes, f_varint, frame

ME = f"pid {os.getpid()} uid {os.getuid()}"


class Hostile:
    def __init__(self, d, good, holder, model):
        self.d = d
        self.good = good
        self.holder = holder
        self.model = model

    def mark(self):
        return len(self.d.log())

    def served(self):
        """Every well-behaved client is still served."""
        assert self.d.running(), self.d.log()
        st = self.good.status()
        assert st["leases"] == 1
        reply = self.good.request(wdwire.TENSORS, wdwire.ref_body(self.model))
        assert reply.code == "OK", reply.message
        assert self.d.status(user="nobody")["leases"] == 1
        out = self.d.hash(self.model, user="nobody")
        assert len(out["tensors"]) == 13
        assert self.holder.poll() is None


@pytest.fixture(scope="module")
def h(bins, workdir, testdata):
    d = Daemon(bins, workdir, [testdata / "models"],
               {"max_connections_per_uid": 64, "allow_uids": NOBODY,
                # Idle connections are the point of some cases here.
                "hello_timeout": 3600}).start()
    model = str(testdata / "models" / "plain")
    good = d.raw()
    holder = d.spawn_client("hold", model, user="nobody")
    assert read_line(holder, 30) == "ready\n"
    yield Hostile(d, good, holder, model)
    assert holder.poll() is None
    assert good.status()["leases"] == 1
    good.close()
    d.finish()


def raw_conn(d, hello=True):
    c = wdwire.Conn(d.socket, timeout=10)
    if hello:
        c.hello()
    return c


def outcome(c):
    """What the daemon sent before it closed the connection; a socket
    timeout (the daemon kept it open) fails the test."""
    got = []
    try:
        while True:
            got.append(c.recv())
    except (wdwire.Closed, ConnectionResetError):
        c.close()
        return got


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


# Requests have their own limit, max_request_size (64 KiB by default), far
# below max_frame_size, which bounds the replies clients read.
@pytest.mark.parametrize("length", [0xFFFFFFFF, (16 << 20) + 1, (64 << 10) + 1],
                         ids=["u32-max", "frame-limit-plus-one", "request-limit-plus-one"])
def test_oversized_length_prefix(h, length):
    start = h.mark()
    c = raw_conn(h.d)
    c.send_raw(struct.pack("<I", length) + b"\0" * 64)
    assert outcome(c) == []
    h.d.wait_log(f"{ME}: frame longer than the limit of {64 << 10} bytes, disconnecting", start=start)
    h.served()


GARBAGE = {
    "overlong-varint": b"\xff" * 32,
    "truncated-varint": b"\x08",
    "wire-type-7": b"\x0f",
    "submessage-past-end": f_varint(1, 1) + b"\x5a\x05\x08",
    "truncated-in-submessage": f_varint(1, 1) + b"\x5a\x02\x08\xff",
    "string-length-past-end": f_varint(1, 1) + b"\x5a\x04\x0a\x7f/tm",
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_protobuf(h, name):
    start = h.mark()
    c = raw_conn(h.d)
    payload = GARBAGE[name]
    c.send_raw(frame(payload))
    assert outcome(c) == []
    h.d.wait_log(f"{ME}: undecodable frame of {len(payload)} bytes, disconnecting", start=start)
    h.served()


def test_frame_cut_in_the_middle(h):
    start = h.mark()
    c = raw_conn(h.d)
    whole = frame(wdwire.envelope(7, wdwire.STATUS))
    c.send_raw(whole[:len(whole) - 1])
    c.sock.shutdown(socket.SHUT_WR)
    assert outcome(c) == []
    h.d.wait_log(f"{ME}: connection closed in the middle of a frame", start=start)
    h.served()


@pytest.mark.parametrize("when", ["before-hello", "after-hello"])
def test_descriptors_sent_to_the_daemon(h, when):
    start = h.mark()
    before = open_fds(h.d.pid)
    c = raw_conn(h.d, hello=when == "after-hello")
    fds = [os.open("/dev/null", os.O_RDONLY), os.open("/", os.O_RDONLY | os.O_DIRECTORY)]
    try:
        c.send_raw(frame(wdwire.envelope(9, wdwire.STATUS)), fds)
    finally:
        for fd in fds:
            os.close(fd)
    assert outcome(c) == []
    h.d.wait_log(f"{ME}: sent file descriptors, which the daemon never accepts; disconnecting", start=start)
    # The descriptors it received went with the connection.
    wait_until(lambda: open_fds(h.d.pid) == before, what="the daemon to close what it was sent")
    h.served()


@pytest.mark.parametrize("field", [wdwire.REPLY, wdwire.PROGRESS], ids=["reply", "progress"])
def test_reply_or_event_from_a_client(h, field):
    start = h.mark()
    c = raw_conn(h.d)
    body = f_varint(1, 0) + f_bytes(2, "hi") if field == wdwire.REPLY else f_varint(1, 5) + f_varint(2, 10)
    c.send_raw(frame(wdwire.envelope(3, field, body)))
    assert outcome(c) == []
    h.d.wait_log(f"{ME}: sent a reply or an event to the daemon, disconnecting", start=start)
    h.served()


@pytest.mark.parametrize("field", [wdwire.STATUS, wdwire.LOAD, wdwire.LIST], ids=["status", "load", "list"])
def test_request_before_hello(h, field):
    c = raw_conn(h.d, hello=False)
    body = wdwire.load_body(h.model) if field == wdwire.LOAD else b""
    c.send_raw(frame(wdwire.envelope(11, field, body)))
    got = outcome(c)
    assert [(e.id, e.code) for e in got] == [(11, "INVALID_ARGUMENT")]
    assert "the first request must be Hello" in got[0].message
    h.served()


def test_unsupported_protocol_version(h):
    c = raw_conn(h.d, hello=False)
    c.send_raw(frame(wdwire.envelope(1, wdwire.HELLO, wdwire.hello_body(2, 9))))
    got = outcome(c)
    assert [e.code for e in got] == ["UNSUPPORTED"]
    assert "speaks protocol version 1, the client 2..9" in got[0].message
    h.served()


@pytest.mark.parametrize("field", [wdwire.HELLO, wdwire.STATUS], ids=["hello", "status"])
def test_request_id_zero_is_reserved(h, field):
    with raw_conn(h.d, hello=field == wdwire.STATUS) as c:
        body = wdwire.hello_body() if field == wdwire.HELLO else b""
        c.send_raw(frame(wdwire.envelope(0, field, body)))
        env = c.recv()
        assert (env.id, env.code) == (0, "INVALID_ARGUMENT") and "reserved" in env.message, env.message
        # Not carried out, and the connection stays.
        if field == wdwire.HELLO:
            c.hello()
        assert c.status()["connections"] >= 2
    h.served()


def test_empty_frame(h):
    """A length of 0 is a valid frame: an Envelope with nothing set (id 0)."""
    with raw_conn(h.d) as c:
        c.send_raw(frame(b""))
        env = c.recv()
        assert (env.id, env.code) == (0, "INVALID_ARGUMENT"), env.message
        assert c.status()["connections"] >= 2
    h.served()


def test_bad_requests_get_errors_and_the_connection_stays(h):
    """Requests that are well-formed frames but wrong: an error reply each."""
    with raw_conn(h.d) as c:
        cases = [
            (wdwire.HELLO, wdwire.hello_body(), "INVALID_ARGUMENT", "already done"),
            (30, b"", "INVALID_ARGUMENT", "unknown request"),
            (wdwire.LOAD, wdwire.load_body(""), "INVALID_ARGUMENT", "absolute path"),
            (wdwire.LOAD, wdwire.load_body("relative/path"), "INVALID_ARGUMENT", "not an absolute path"),
            (wdwire.LOAD, wdwire.load_body("/" + "a" * 5000), "INVALID_ARGUMENT", ""),
            (wdwire.LOAD, wdwire.load_body(h.model, "../plain"), "INVALID_ARGUMENT", "not a plain name"),
            (wdwire.LOAD, wdwire.load_body(h.model, "c" * 300), "INVALID_ARGUMENT", "not a plain name"),
            (wdwire.LOAD, wdwire.load_body(h.model, target="cuda:0"), "UNSUPPORTED", "no GPU tier"),
            (wdwire.LOAD, wdwire.load_body(h.model, target="gpu:0"), "INVALID_ARGUMENT", "not \"host\""),
            (wdwire.LOAD, wdwire.load_body(h.model, target="cuda:GPU-zz"), "INVALID_ARGUMENT", "cuda:N"),
            (wdwire.LOAD, wdwire.load_body(h.model, target="t" * 100), "INVALID_ARGUMENT", "too long"),
            (wdwire.LOAD, f_bytes(1, b"/\xff\xfe\x00x"), None, ""),
            (wdwire.RELEASE, f_varint(1, 12345), "NOT_FOUND", "not held by this connection"),
            (wdwire.CANCEL, f_varint(1, 999), "NOT_FOUND", "nothing to cancel"),
            (wdwire.EVICT, wdwire.ref_body("/nonexistent/model"), "PERMISSION_DENIED", "outside every model root"),
            (wdwire.PIN, wdwire.ref_body(h.model + "-nope"), "NOT_FOUND", "not resident"),
        ]
        for field, body, code, text in cases:
            reply = c.request(field, body)
            if code is None:
                assert reply.code != "OK"
            else:
                assert (reply.code, text in reply.message) == (code, True), (field, reply.code, reply.message)
        # The same connection still works.
        assert c.status()["connections"] >= 2
    h.served()


def test_thousand_idle_connections(h):
    """max_connections_per_uid = 64: root's connections beyond it are refused
    with a RESOURCE_EXHAUSTED frame; nobody (another allowed uid) is still
    served; closing them all brings `connections` back down."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    start = h.mark()
    base = h.d.status(user="nobody")["connections"]  # good (root), holder (nobody), the asking one
    root_open = 1  # the module's good connection
    socks = []
    sel = selectors.DefaultSelector()
    try:
        for _ in range(1000):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(h.d.socket)
            s.setblocking(False)
            socks.append(s)
            sel.register(s, selectors.EVENT_READ)

        expect = 1000 - (64 - root_open)
        received, closed = {}, set()

        def drain():
            for key, _ in sel.select(timeout=0.2):
                s = key.fileobj
                try:
                    chunk = s.recv(4096)
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    received[s] = received.get(s, b"") + chunk
                else:
                    closed.add(s)
                    sel.unregister(s)
            return len(closed) >= expect

        wait_until(drain, timeout=30, interval=0, what="the refusals")
        st = h.d.status(user="nobody")
        assert st["connections"] == base + 64 - root_open, st
        assert len(closed) == expect
        for s in closed:
            data = received.get(s, b"")
            assert len(data) >= 4, "closed without a reply"
            (n,) = struct.unpack_from("<I", data)
            assert len(data) == 4 + n
            env = wdwire.Envelope(data[4:])
            assert (env.id, env.code) == (0, "RESOURCE_EXHAUSTED"), env.message
            assert "uid 0 has 64 connections, the limit (max_connections_per_uid)" in env.message
        # The accepted ones are open and quiet: nothing to read.
        for s in socks:
            if s not in closed:
                with pytest.raises(BlockingIOError):
                    s.recv(1)
        assert "connections from this uid, the limit; refused" in h.d.log()[start:]
        h.served()
    finally:
        sel.close()
        for s in socks:
            s.close()
    wait_until(lambda: h.d.status(user="nobody")["connections"] == base, what="connections to go back down")
    # Root can connect again.
    with raw_conn(h.d) as c:
        assert c.status()["connections"] == base
    h.served()



def test_silent_connections_are_closed_after_hello_timeout(bins, workdir, testdata):
    """A connection that never says Hello is closed once hello_timeout
    passes, freeing its slot; one that said Hello stays open."""
    d = Daemon(bins, workdir, [testdata / "models"], {"hello_timeout": 1}).start()
    try:
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(d.socket)
        with raw_conn(d) as talker:
            silent.settimeout(10)
            assert silent.recv(1) == b"", "the daemon should close the silent connection"
            wait_until(lambda: "no Hello within 1 s, disconnecting" in d.log(), what="the log line")
            # Well past the deadline, the one that said Hello is served.
            assert talker.status()["connections"] == 1
        silent.close()
    finally:
        d.finish()
