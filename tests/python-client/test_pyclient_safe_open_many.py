"""weightd.safe_open() on a checkpoint of more files than the daemon allows
connections per uid (review finding 13, repro r18): every handle and one
tensor of each file stay alive, as a loader keeping zero-copy tensors
does.  All handles share one connection, and every tensor equals what the
safetensors library loads from the file."""
import gc

from safetensors import safe_open as st_open

from harness import wait_until
from oracle import pt_bytes

SHARDS = 70  # over max_connections_per_uid (64 by default)


def test_safe_open_of_70_files_keeps_every_handle(start_daemon, make_model, wd):
    model = make_model("70M", SHARDS)
    files = sorted(model.glob("*.safetensors"))
    assert len(files) == SHARDS
    daemon = start_daemon(roots=[model])
    before = daemon.status()  # weightctl's own connection
    handles, kept = [], []
    for i, f in enumerate(files, 1):
        try:
            h = wd.safe_open(f, framework="pt", socket=daemon.socket)
        except wd.Error as e:
            raise AssertionError(f"file {i} of {SHARDS}: {type(e).__name__}: {e}") from None
        name = h.keys()[-1]
        handles.append(h)
        kept.append((f, name, h.get_tensor(name)))

    status = daemon.status()
    assert status["leases"] == SHARDS
    # weightctl's own connection, and one for every handle of this process.
    assert status["connections"] == before["connections"] + 1, status

    for f, name, got in kept:
        with st_open(str(f), framework="pt", device="cpu") as st:
            ref = st.get_tensor(name)
        assert got.dtype == ref.dtype and got.shape == ref.shape, (f.name, name, got.dtype, got.shape)
        assert pt_bytes(got) == pt_bytes(ref), f"{f.name}: {name}"

    # Closing the handles ends no lease while its tensor lives; dropping the
    # tensors ends them all.
    for h in handles:
        h.close()
    gc.collect()
    assert daemon.status()["leases"] == SHARDS
    del handles, kept, got, h
    gc.collect()
    wait_until(lambda: daemon.status()["leases"] == 0, timeout=10, what="every lease to end")


def test_safe_open_after_a_daemon_restart(start_daemon, testdata, wd):
    """The shared connection of a daemon that restarted is replaced: the next
    safe_open() connects again instead of failing."""
    path = testdata / "good" / "many.safetensors"
    daemon = start_daemon()
    with wd.safe_open(path, framework="pt", socket=daemon.socket) as h:
        name = h.keys()[0]
        assert h.served_by_weightd
    assert daemon.stop() == 0
    daemon.start()
    with wd.safe_open(path, framework="pt", socket=daemon.socket) as h, \
            st_open(str(path), framework="pt", device="cpu") as st:
        assert h.keys() == sorted(st.keys())
        got, ref = h.get_tensor(name), st.get_tensor(name)
        assert got.dtype == ref.dtype and got.shape == ref.shape and pt_bytes(got) == pt_bytes(ref)
    del got
    gc.collect()
    wait_until(lambda: daemon.status()["leases"] == 0, timeout=10, what="the lease to end")
