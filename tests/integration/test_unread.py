"""Peers that ask and never read: the replies the daemon queues for them are
capped per connection (64 MiB) and over all connections of a uid (256 MiB);
the peer that goes over is disconnected and logged, and everyone else is
still served."""
import struct

import pytest

import wdwire
from harness import Daemon
from wdwire import envelope, frame

MIB = 1 << 20


@pytest.fixture(scope="module")
def d(bins, workdir, testdata):
    d = Daemon(bins, workdir, [testdata / "good"], {"log_level": "info"}).start()
    yield d
    d.finish()


def tensors_frames(model, n, first_id=100):
    """n Tensors requests in one buffer: each answered with the whole
    manifest of a 1001-tensor file."""
    body = wdwire.ref_body(model)
    return b"".join(frame(envelope(first_id + i, wdwire.TENSORS, body)) for i in range(n))


def reply_size(d, model):
    """Bytes of one Tensors reply frame for model."""
    with d.raw() as c:
        rid = c.send(wdwire.TENSORS, wdwire.ref_body(model))
        while len(c.buf) < 4:
            c._fill()
        (n,) = struct.unpack_from("<I", c.buf)
        env = c.wait(rid)
        assert env.code == "OK", env.message
        return 4 + n


def closed_by_daemon(c, timeout=30):
    """Read and drop everything until the daemon closes; True if it did."""
    c.sock.settimeout(timeout)
    try:
        while c.sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        pass
    return True


def test_one_connection_over_64_mib(d, testdata):
    model = str(testdata / "good" / "many.safetensors")
    mark = len(d.log())
    n = (72 * MIB) // reply_size(d, model)
    c = d.raw()
    c.send_raw(tensors_frames(model, n))
    d.wait_log("replies not read, disconnecting", timeout=30, start=mark)
    assert closed_by_daemon(c)
    c.close()
    assert "disconnecting" in d.log()[mark:]
    with d.raw() as good:
        env = good.request(wdwire.TENSORS, wdwire.ref_body(model))
        assert env.code == "OK", env.message
        assert good.status()["connections"] == 1


def test_connections_of_one_uid_over_256_mib(d, testdata):
    model = str(testdata / "good" / "many.safetensors")
    mark = len(d.log())
    n = (60 * MIB) // reply_size(d, model)
    conns = [d.raw() for _ in range(6)]
    try:
        # Under 64 MiB of replies a connection, 360 MiB in all.
        for c in conns:
            c.send_raw(tensors_frames(model, n))
        log = d.wait_log("replies not read over the connections of uid 0", timeout=60, start=mark)
        assert "replies not read, disconnecting" not in log[mark:]
        # Everyone under the caps is still served; the cap is per uid, so the
        # queued bytes that remain stay under it.
        with d.raw() as good:
            env = good.request(wdwire.TENSORS, wdwire.ref_body(model))
            assert env.code == "OK", env.message
    finally:
        for c in conns:
            c.close()
    with d.raw() as good:
        assert good.status()["connections"] == 1
