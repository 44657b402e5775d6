"""Clients that die: SIGKILL ends their leases and their waits.

A slow configuration (direct reads of 64 KiB, one at a time) makes a 256 MiB
load last long enough to kill a client in the middle of it; the daemon's
debug log proves the load was still running when its last waiter went away.
"""
import signal
import socket
import subprocess

import pytest

import wdwire
from harness import SLOW, entries_by_key, mapped_hashes, wait_until
from reference import component_tensors

def test_sigkill_of_a_holder_ends_its_lease(daemon, testdata):
    model = str(testdata / "models" / "plain")
    p = daemon.hold(model)
    assert entries_by_key(daemon.ls())[(model, "")]["leases"] == 1
    assert daemon.status()["leases"] == 1
    r = daemon.ctl("evict", model)
    assert r.returncode == 1 and "BUSY:" in r.stderr.decode() and "lease" in r.stderr.decode()

    p.send_signal(signal.SIGKILL)
    p.wait()
    wait_until(lambda: daemon.status()["leases"] == 0, what="the lease to end")
    e = entries_by_key(daemon.ls())[(model, "")]
    assert (e["leases"], e["state"]) == (0, "resident")

    r = daemon.ctl("evict", model)
    assert r.returncode == 0, r.stderr.decode()
    assert (model, "") not in entries_by_key(daemon.ls())


def _start_loader(d, how, model):
    if how == "client":
        return d.spawn_client("hash", model)
    p = subprocess.Popen([str(d.bins.weightctl), "--socket", d.socket, "prefetch", str(model)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    d.children.append(p)
    return p


@pytest.mark.parametrize("how", ["client", "weightctl-prefetch"])
def test_sigkill_in_the_middle_of_a_load(start_daemon, make_model, how):
    model = make_model("256M", 2)
    d = start_daemon(roots=[model.parent], **SLOW)

    with d.raw() as watcher:
        p = _start_loader(d, how, model)
        wait_until(lambda: watcher.status()["loading"] == 1, timeout=20, what="the load to start")
        p.send_signal(signal.SIGKILL)
        p.wait()
        st = wait_until(lambda: (s := watcher.status())["loading"] == 0 and s, timeout=20,
                        what="the load to stop")
        assert st["leases"] == 0

    # It stopped because nobody waited any more, not because it was done.
    log = d.wait_log("nobody waits for")
    assert f"loaded {model}" not in log, "the load finished before the client was killed: make it slower"

    entries = entries_by_key(d.ls())
    e = entries.get((str(model), ""))
    if e is not None:
        assert e["leases"] == 0 and e["state"] != "loading"
        r = d.ctl("evict", str(model))
        assert r.returncode == 0, r.stderr.decode()

    # The daemon carries on: a later load reads the whole model and serves its bytes.
    expected = component_tensors(sorted(model.glob("*.safetensors")), library_check=False)
    out = d.hash(model)
    assert {n: t["xxh3_128"] for n, t in out["tensors"].items()} == {n: t["xxh3_128"] for n, t in expected.items()}


def test_a_killed_waiter_does_not_stop_the_others(start_daemon, make_model):
    model = make_model("256M", 2)
    d = start_daemon(roots=[model.parent], **SLOW)

    with d.raw() as survivor:
        doomed = d.spawn_client("hold", model)
        wait_until(lambda: d.status()["loading"] == 1, timeout=20, what="the load to start")
        # A Progress event proves the survivor waits on the same job.
        rid = survivor.send(wdwire.LOAD, wdwire.load_body(str(model), progress=True))
        ev = survivor.recv()
        assert ev.id == rid and ev.progress is not None, "expected a Progress event first"
        assert ev.progress.int(1) < ev.progress.int(2)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        reply = survivor.wait(rid)
        assert reply.code == "OK", reply.message
        got = mapped_hashes(survivor, reply.reply.msg(11))

    assert "nobody waits for" not in d.log()
    assert d.log().count(f"loading {model}") == 1
    expected = component_tensors(sorted(model.glob("*.safetensors")), library_check=False)
    assert got == {n: t["xxh3_128"] for n, t in expected.items()}


def test_a_load_right_after_its_last_waiter_died(start_daemon, make_model):
    """A Load that arrives while a read is being stopped (its last waiter
    gone) does not share the CANCELLED: it gets the component."""
    model = make_model("256M", 2)
    d = start_daemon(roots=[model.parent], **SLOW)
    expected = component_tensors(sorted(model.glob("*.safetensors")), library_check=False)

    first = d.raw()
    first.send(wdwire.LOAD, wdwire.load_body(str(model), progress=True))
    assert first.recv().progress is not None
    with d.raw() as late:
        first.close()
        lid = late.send(wdwire.LOAD, wdwire.load_body(str(model)))
        reply = late.wait(lid)
        assert reply.code == "OK", reply.message
        assert mapped_hashes(late, reply.reply.msg(11)) == {n: t["xxh3_128"] for n, t in expected.items()}


def test_a_waiter_that_stops_reading_during_a_load(start_daemon, make_model):
    """A client that asked for progress and then shut its receiving side:
    the daemon's next Progress send fails (EPIPE) and drops that connection
    while it walks the job's waiters.  The load stops (nobody else waits),
    and the daemon carries on."""
    model = make_model("256M", 2)
    d = start_daemon(roots=[model.parent], **SLOW)

    with d.raw() as watcher, d.raw() as c:
        rid = c.send(wdwire.LOAD, wdwire.load_body(str(model), progress=True))
        ev = c.recv()
        assert ev.id == rid and ev.progress is not None
        c.sock.shutdown(socket.SHUT_RD)
        wait_until(lambda: watcher.status()["loading"] == 0, timeout=20, what="the load to stop")
        log = d.wait_log("nobody waits for")
        assert "send failed, disconnecting" in log or "Broken pipe" in log, log
        assert f"loaded {model}" not in log
        st = watcher.status()
        assert (st["leases"], st["connections"]) == (0, 1)
    assert d.running()
    d.hash(model)
