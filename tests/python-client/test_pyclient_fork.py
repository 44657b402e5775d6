"""fork() with a live client (review finding 9): a forked child shares the
parent's socket, and the leases on it are the parent's.  Dropping an
inherited lease in the child must leave the parent's lease alone (the
daemon's Status still counts it, and Evict of the model is refused BUSY),
and every call on the parent's client in the child fails with UNAVAILABLE
instead of sending on the shared socket.  Checked twice: on the C API
directly (ctypes over libweightd-client, no package code) and through the
Python package (the review's repro r4).  The daemon's view comes from
weightctl, the tensors' bytes from the file."""
import ctypes
import gc
import os
import signal

import pytest

from harness import wait_until
from oracle import assert_np_equal, file_bytes

MODEL = "large-tensor.safetensors"
WD_OK, WD_UNAVAILABLE, WD_BUSY = 0, 7, 11


def in_child(fn):
    """Run fn() in a forked child, which never returns into pytest.  Returns
    (exit status, what it reported): fn's string on success, else the
    exception.  A child that hangs (a lock held at fork) dies of SIGALRM."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            signal.alarm(20)
            report = fn() or ""
            code = 0
        except BaseException as e:  # noqa: BLE001 (everything is reported to the parent)
            report = f"{type(e).__name__}: {e}"
        finally:
            try:
                os.write(w, report.encode(errors="replace"))
            finally:
                os._exit(code)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return status, b"".join(chunks).decode()


def assert_child_ok(status, report):
    assert os.WIFEXITED(status), (f"the child was killed by signal {os.WTERMSIG(status)} "
                                  f"(a call that blocked on the parent's lock?): {report}")
    assert os.WEXITSTATUS(status) == 0, f"the child failed: {report}"


def assert_parent_lease_held(daemon, path):
    assert daemon.status()["leases"] == 1, "the child's release ended the parent's lease"
    r = daemon.ctl("evict", str(path))
    assert r.returncode == 1 and "BUSY:" in r.stderr.decode() and "lease" in r.stderr.decode(), \
        f"evict of the parent's leased model: rc {r.returncode}, {r.stderr.decode()!r}"


# ---- the C API ----

class Err(ctypes.Structure):
    _fields_ = [("code", ctypes.c_int), ("message", ctypes.c_char * 1024)]


class Tensor(ctypes.Structure):
    # The head of wd_tensor (weightd/client.h), as far as this test reads it.
    _fields_ = [("name", ctypes.c_char_p), ("dtype", ctypes.c_char_p), ("ndim", ctypes.c_uint),
                ("shape", ctypes.POINTER(ctypes.c_uint64)), ("nbytes", ctypes.c_uint64), ("file", ctypes.c_uint),
                ("offset", ctypes.c_uint64), ("data", ctypes.c_void_p)]


@pytest.fixture
def capi(client_lib):
    lib = ctypes.CDLL(str(client_lib))
    P, S, E = ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(Err)
    for name, restype, argtypes in [
            ("wd_connect", ctypes.c_int, [S, ctypes.POINTER(P), E]),
            ("wd_disconnect", None, [P]),
            ("wd_load", ctypes.c_int, [P, S, S, ctypes.POINTER(P), E]),
            ("wd_release", ctypes.c_int, [P, E]),
            ("wd_evict", ctypes.c_int, [P, S, S, E]),
            ("wd_status_get", ctypes.c_int, [P, ctypes.POINTER(P), E]),
            ("wd_status_free", None, [P]),
            ("wd_lease_manifest", P, [P]),
            ("wd_manifest_find", ctypes.POINTER(Tensor), [P, S])]:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def test_c_child_release_keeps_the_parents_lease(daemon, testdata, capi):
    path = testdata / "good" / MODEL
    want = file_bytes(path)
    err = Err()
    c, lease = ctypes.c_void_p(), ctypes.c_void_p()
    assert capi.wd_connect(daemon.socket.encode(), ctypes.byref(c), ctypes.byref(err)) == WD_OK, err.message
    assert capi.wd_load(c, str(path).encode(), None, ctypes.byref(lease), ctypes.byref(err)) == WD_OK, err.message
    assert daemon.status()["leases"] == 1
    parent = os.getpid()

    def child():
        e = Err()
        s = ctypes.c_void_p()
        # The child's copy of the mapping holds the file's bytes until it
        # drops it; dropping it sends nothing.
        m = capi.wd_lease_manifest(lease)
        for name, (_, _, data) in want.items():
            t = capi.wd_manifest_find(m, name.encode()).contents
            assert ctypes.string_at(t.data, t.nbytes) == data, name
        assert capi.wd_release(lease, ctypes.byref(e)) == WD_OK, e.message
        r = capi.wd_status_get(c, ctypes.byref(s), ctypes.byref(e))
        assert r == WD_UNAVAILABLE and e.code == WD_UNAVAILABLE and not s, (r, e.message)
        msg = e.message.decode()
        assert f"connected by process {parent}" in msg and "must connect again" in msg, msg
        r = capi.wd_evict(c, str(path).encode(), b"", ctypes.byref(e))
        assert r == WD_UNAVAILABLE, (r, e.message)
        capi.wd_disconnect(c)

    result = in_child(child)
    assert_parent_lease_held(daemon, path)
    assert_child_ok(*result)
    # The parent's client still works, and so does its mapping.
    r = capi.wd_evict(c, str(path).encode(), b"", ctypes.byref(err))
    assert r == WD_BUSY and "lease" in err.message.decode(), (r, err.message)
    m = capi.wd_lease_manifest(lease)
    for name, (_, _, data) in want.items():
        t = capi.wd_manifest_find(m, name.encode()).contents
        assert ctypes.string_at(t.data, t.nbytes) == data, name
    assert capi.wd_release(lease, ctypes.byref(err)) == WD_OK, err.message
    assert daemon.status()["leases"] == 0
    assert capi.wd_evict(c, str(path).encode(), b"", ctypes.byref(err)) == WD_OK, err.message
    capi.wd_disconnect(c)


# ---- the Python package (repro r4) ----

@pytest.mark.parametrize("lock_held", [False, True], ids=["idle", "lock-held-at-fork"])
def test_child_gc_of_an_inherited_lease_keeps_the_parents(daemon, testdata, wd, lock_held):
    path = testdata / "good" / MODEL
    client = wd.connect(daemon.socket)
    held = {"lease": client.load(path)}
    arrays = {n: held["lease"][n] for n in held["lease"]}
    assert daemon.status()["leases"] == 1
    socket = daemon.socket

    def child():
        # Everything the child has of the lease goes, as when a worker
        # forked from a loader exits.
        held.clear()
        arrays.clear()
        gc.collect()
        # A connection of the child's own works, and sees the parent's lease.
        with wd.connect(socket) as own:
            leases = own.status()["leases"]
        assert leases == 1, f"the daemon counts {leases} leases after the child's gc"
        with pytest.raises(wd.Unavailable, match="forked from it must connect again"):
            client.status()
        return "ok"

    if lock_held:
        # As if another thread of the parent were inside a call at fork().
        client._conn.lock.acquire()
    try:
        result = in_child(child)
    finally:
        if lock_held:
            client._conn.lock.release()
    assert_parent_lease_held(daemon, path)
    assert_child_ok(*result)
    for name, (dtype, _, _) in file_bytes(path).items():
        assert_np_equal(arrays[name], path, name, dtype)
    assert client.status()["leases"] == 1
    held.clear()
    arrays.clear()
    gc.collect()
    wait_until(lambda: daemon.status()["leases"] == 0, timeout=10, what="the parent's lease to end")
    client.close()


def test_safe_open_in_a_child_connects_anew(daemon, testdata, wd):
    """safe_open()'s process-wide client is not inherited: a child's
    safe_open() gets a connection of its own, and its lease ends with it."""
    path = testdata / "good" / MODEL
    held = {"h": wd.safe_open(path, socket=daemon.socket)}
    name = held["h"].keys()[0]
    want = file_bytes(path)[name]

    def child():
        held.clear()
        gc.collect()
        with wd.safe_open(path, socket=daemon.socket) as h:
            assert_np_equal(h.get_tensor(name), path, name, want[0])
            with wd.connect(daemon.socket) as own:
                leases = own.status()["leases"]
        assert leases == 2, f"the daemon counts {leases} leases: the parent's and the child's expected"

    result = in_child(child)
    assert_child_ok(*result)
    wait_until(lambda: daemon.status()["leases"] == 1, timeout=10, what="the child's lease to end")
    assert_np_equal(held["h"].get_tensor(name), path, name, want[0])
    held.clear()
    gc.collect()
    wait_until(lambda: daemon.status()["leases"] == 0, timeout=10, what="the parent's lease to end")
