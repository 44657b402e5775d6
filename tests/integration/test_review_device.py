"""Regression tests for the device-tier findings of the December 2026 server
review (shared/reviews/2026-12-server-review.md), on emulated GPUs (a build
with -Dgpu_emulation=true; other builds skip this module, and tests/run
passes it only to the emulated builds).

Each test starts the real weightd on a private socket and drives it over
the raw wire (wdwire.py); device slabs are memfds the tests map and compare
with the files' bytes.  On a sanitizer build any report in the daemon's log
fails the test (the harness's teardown).

  finding 2   a device load that resolves while its host load seals joined
              it as a feed (use after free in feed_detach): r2, made
              deterministic with one pool thread, and r2b, two devices
              asking a moment apart, repeated
  finding 3   a device copy fed by a host read was published before the
              read was verified: a file rewritten during the load was
              served torn (r13)
  finding 4   dev_job_finish() read the host entry its unlease had freed
              (r3)
  finding 11  cancelling (or leaving) a cold device load left its host read
              running to the end, and SIGTERM waited for it (r10, r10b)
  PROTOCOL    a device Load that joins a load whose last waiter cancelled
              it gets the bytes, not CANCELLED
"""
import mmap
import os
import select
import signal
import struct
import time

import pytest
import xxhash

import wdwire
from harness import SLOW, emulated_build, wait_until
from reference import read_header
from test_device_emulated import KEEP_HOST_NO, check_slab, device_load, wait_gpu
from test_review_lifetimes import died, expected_hashes
from wdwire import CANCEL, EVICT, LOAD, PREFETCH, PROGRESS, TENSORS, f_varint, load_body, ref_body

pytestmark = pytest.mark.skipif(not emulated_build(), reason="not built with -Dgpu_emulation=true (no emulated GPUs)")

MiB = 1 << 20


@pytest.fixture
def emu(start_daemon):
    """emu(gpus, roots, env=None, **config) -> a daemon with emulated devices."""
    def start(gpus, roots, env=None, **config):
        return wait_gpu(start_daemon(roots=roots, env={"WEIGHTD_EMULATED_GPUS": gpus, **(env or {})}, **config))
    return start


def files_of(model):
    return sorted(model.glob("*.safetensors"))


def slab_hashes(load, fd):
    """{name: xxh3_128} of a device LoadReply's tensors in its slab (fd closed)."""
    (s,) = load.msgs(4)
    m = mmap.mmap(fd, s.int(3), mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        return {t.str(1): xxhash.xxh3_128_hexdigest(m[t.int(5):t.int(5) + t.int(6)]) for t in load.msgs(5)}
    finally:
        m.close()
        os.close(fd)


def wait_reply(d, c, rid, what):
    """The reply to rid (Progress skipped); a connection the daemon ended
    fails the test with the log."""
    try:
        return c.wait(rid)
    except (wdwire.Closed, ConnectionResetError) as e:
        raise AssertionError(f"{what}: the connection ended ({type(e).__name__}); weightd {died(d)}\n"
                             f"{d.log()[-6000:]}") from None


def first_progress(d, c, rid, what):
    """Wait for rid's first Progress event; returns (done, total)."""
    while True:
        try:
            env = c.recv()
        except (wdwire.Closed, ConnectionResetError) as e:
            raise AssertionError(f"{what}: the connection ended ({type(e).__name__}); weightd {died(d)}\n"
                                 f"{d.log()[-6000:]}") from None
        if env.id != rid:
            continue
        assert not env.has(wdwire.REPLY), f"{what}: answered {env.code} ({env.message}) before any Progress"
        if env.has(PROGRESS):
            return env.progress.int(1), env.progress.int(2)


def load_and_check(d, c, model, dev, what, **kw):
    """A device Load whose slab must hold the files' bytes."""
    env, load, fd = device_load(c, model, target=f"cuda:{dev}", **kw)
    assert d.running(), f"{what}: weightd {died(d)}\n{d.log()[-6000:]}"
    assert env.code == "OK", f"{what}: {env.code}: {env.message}"
    m, _ = check_slab(load, fd, files_of(model), dev)
    m.close()
    return load


def cancel(c, rid):
    """Cancel rid; returns (rid's reply, the Cancel's reply)."""
    cid = c.send(CANCEL, f_varint(1, rid))
    got = {}
    while len(got) < 2:
        env = c.recv()
        if env.id in (rid, cid) and env.has(wdwire.REPLY):
            got[env.id] = env
    return got[rid], got[cid]


def evict(c, model):
    env = c.request(EVICT, ref_body(str(model)))
    assert env.code == "OK", f"Evict: {env.code}: {env.message}"


def host_loads_logged(d, model):
    """How many host loads of model ran to the end (the daemon's info line)."""
    return d.log().count(f"loaded {model}: ")


# ---- finding 2 ----------------------------------------------------------------

def empty_tensors_file(path, n):
    """A valid safetensors file of n empty tensors: a large header whose
    first parse keeps one pool thread busy for seconds."""
    text = ("{" + ",".join('"t%07d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i for i in range(n))
            + "}").encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text)


def test_device_load_resolved_while_its_host_load_seals(emu, make_model, tmp_root):
    """Finding 2, r2: with one pool thread, a long header parse holds the
    pool; a device Prefetch's resolve queues behind it and the host load's
    seal behind that, so the device load starts on a host load that has
    read everything and is about to seal."""
    model = make_model("256M", 1)
    big = tmp_root / "big.safetensors"
    empty_tensors_file(big, 400_000)
    d = emu("1:1G", [model.parent, tmp_root], env={"UV_THREADPOOL_SIZE": "1"}, **SLOW)
    with d.raw(timeout=120) as h, d.raw(timeout=120) as x, d.raw(timeout=120) as dv:
        hid = h.send(LOAD, load_body(str(model), progress=True))
        done, total = first_progress(d, h, hid, "the host Load")
        assert done < total
        xid = x.send(TENSORS, ref_body(str(big)))
        time.sleep(0.05)
        did = dv.send(PREFETCH, load_body(str(model), target="cuda:0"))
        env = wait_reply(d, dv, did, "the device Prefetch")
        assert env.code == "OK", f"device Prefetch: {env.code}: {env.message}"
        env = wait_reply(d, h, hid, "the host Load")
        assert env.code == "OK", f"host Load: {env.code}: {env.message}"
        env = wait_reply(d, x, xid, "Tensors of the large header")
        assert env.code == "OK", f"Tensors: {env.code}: {env.message}"
        # The device entry holds the file's bytes; the model was read once.
        load = load_and_check(d, dv, model, 0, "a device Load after")
        assert load.int(7) == 1, "the device entry is not resident"
        assert dv.status()["storage_read_bytes"] == sum(p.stat().st_size for p in files_of(model))


def test_two_devices_a_moment_apart(emu, make_model):
    """Finding 2, r2b: Prefetch to cuda:0, and the moment its reply comes,
    to cuda:1; default configuration.  The old daemon crashed in about one
    run in four; repeated, evicting in between."""
    model = make_model("256M", 1)
    d = emu("2:1G", [model.parent])
    deadline = time.monotonic() + 15
    rounds = 0
    with d.raw(timeout=120) as a, d.raw(timeout=120) as b:
        while rounds < 40 and (rounds < 8 or time.monotonic() < deadline):
            env = wait_reply(d, a, a.send(PREFETCH, load_body(str(model), target="cuda:0")), "Prefetch to cuda:0")
            assert env.code == "OK", f"round {rounds}: cuda:0: {env.code}: {env.message}"
            env = wait_reply(d, b, b.send(PREFETCH, load_body(str(model), target="cuda:1")), "Prefetch to cuda:1")
            assert env.code == "OK", f"round {rounds}: cuda:1: {env.code}: {env.message}"
            rounds += 1
            wait_until(lambda: all(e["state"] == "resident" for e in d.ls()), what="every entry resident")
            evict(a, model)
        for dev in (0, 1):
            load_and_check(d, a, model, dev, f"a Load to cuda:{dev} after {rounds} rounds")


# ---- finding 3 ----------------------------------------------------------------

def test_file_rewritten_during_a_cold_device_load(emu, make_model, tmp_root):
    """Finding 3, r13: the file is rewritten in place (a MiB at the start
    of its data, which the read has passed, and its last MiB, which it has
    not) while a cold device Load reads it.  The Load must be refused, or
    serve the bytes of one version of the file, never a mix."""
    src = files_of(make_model("256M", 1))[0]
    model = tmp_root / "m"
    model.mkdir()
    path = model / src.name
    path.write_bytes(src.read_bytes())
    old = expected_hashes([path])
    data_start, _, _ = read_header(path)
    d = emu("1:1G", [tmp_root], **SLOW)
    with d.raw(timeout=120) as c:
        rid = c.send(LOAD, load_body(str(model), target="cuda:0", progress=True))
        done, total = first_progress(d, c, rid, "the device Load")
        assert MiB <= done < total - MiB, f"the first Progress came at {done} of {total} bytes"
        with open(path, "r+b") as f:
            f.seek(data_start)
            f.write(b"\xab" * MiB)
            f.seek(-MiB, os.SEEK_END)
            f.write(b"\xab" * MiB)
            f.flush()
            os.fsync(f.fileno())
        new = expected_hashes([path])
        env = wait_reply(d, c, rid, "the device Load")
        assert d.running(), f"weightd {died(d)}"
        if env.code == "OK":
            got = slab_hashes(env.reply.msg(11), c.take_fds(1)[0])
            only_old = sorted(n for n in got if got[n] == old[n] != new[n])
            only_new = sorted(n for n in got if got[n] == new[n] != old[n])
            neither = sorted(n for n in got if got[n] not in (old[n], new[n]))
            assert got == old or got == new, (
                f"the device Load was served OK with torn bytes: of {len(got)} tensors, {only_old} hold the old "
                f"bytes, {only_new} the new ones, {len(neither)} neither")
        else:
            assert "changed" in env.message, f"{env.code}: {env.message}"
            assert not [e for e in d.ls() if e["tier"] == "cuda:0" and e["state"] == "resident"], d.ls()
        # A Load now serves the file as it is.
        load_and_check(d, c, model, 0, "a Load after the rewrite")


# ---- finding 4 ----------------------------------------------------------------

def listed(d, model, tier):
    return [e for e in d.ls() if e["model"] == str(model) and e["tier"] == tier]


def test_host_entry_detached_during_a_device_copy(emu, make_model):
    """Finding 4, r3: a device Prefetch with keep_host=no holds its host
    entry while it waits behind another copy; the host entry's files change
    and a host Prefetch retires it.  When the copy ends, the daemon must not
    touch the entry after giving it up.  Repeated (evicting in between)
    until the host Prefetch was answered while the device copy still ran."""
    big, small = make_model("256M", 1), make_model("64M", 2)
    d = emu("1:1G", [big.parent, small.parent])
    hit = 0
    for attempt in range(4):
        with d.raw(timeout=120) as c0, d.raw(timeout=120) as c1, d.raw(timeout=120) as c2, \
                d.raw(timeout=120) as c3:
            for m in (big, small):
                env = c0.request(PREFETCH, load_body(str(m)))
                assert env.code == "OK", f"host Prefetch: {env.code}: {env.message}"
            r1 = c1.send(PREFETCH, load_body(str(big), target="cuda:0"))
            r2 = c2.send(PREFETCH, load_body(str(small), target="cuda:0", keep_host=KEEP_HOST_NO))
            wait_until(lambda: listed(d, small, "cuda:0"), interval=0.002, what="the device load of the small model")
            stamp = time.time() + attempt + 1
            for p in files_of(small):
                os.utime(p, (stamp, stamp))
            env = wait_reply(d, c3, c3.send(PREFETCH, load_body(str(small))), "the host Prefetch after the change")
            assert env.code == "OK", f"host Prefetch after the change: {env.code}: {env.message}"
            pending = not select.select([c2.sock], [], [], 0)[0] and not c2.buf
            for c, rid, what in ((c1, r1, "big"), (c2, r2, "small")):
                env = wait_reply(d, c, rid, f"attempt {attempt}: device Prefetch of the {what} model")
                assert env.code == "OK", f"{what}: {env.code}: {env.message}"
            assert d.running(), f"weightd {died(d)}"
            hit += pending
            # Both models serve the files' bytes from the device.
            load_and_check(d, c0, big, 0, "a Load of the big model")
            load_and_check(d, c0, small, 0, "a Load of the small model")
        wait_until(lambda: d.status()["leases"] == 0, what="the leases to end")
        if hit:
            break
        with d.raw() as c:
            evict(c, big)
            evict(c, small)
    assert hit, "the device copy always ended before the host entry was retired"


# ---- finding 11 ---------------------------------------------------------------

def test_cancelled_device_load_stops_its_host_read(emu, make_model):
    """Finding 11, r10: Cancel a cold device Load after its first
    Progress: the host read it started (nobody else wants it) stops."""
    model = make_model("256M", 1)
    total = sum(p.stat().st_size for p in files_of(model))
    d = emu("1:1G", [model.parent], **SLOW)
    with d.raw(timeout=120) as c:
        rid = c.send(LOAD, load_body(str(model), target="cuda:0", progress=True))
        done, _ = first_progress(d, c, rid, "the device Load")
        assert done < total
        got, reply = cancel(c, rid)
        assert (got.code, reply.code) == ("CANCELLED", "OK"), (got.code, got.message, reply.code, reply.message)
        t0 = time.monotonic()
        samples = []

        def stopped():
            st = c.status()
            samples.append((round(time.monotonic() - t0, 2), st["loading"], st["storage_read_bytes"] // MiB))
            return st["loading"] == 0 and st

        st = wait_until(stopped, timeout=10, interval=0.05, what="the loads to end")
        assert st["storage_read_bytes"] < total, (
            f"the host read went on to the end after the cancel: (s, loading, MiB read) {samples}")
        time.sleep(0.3)
        assert c.status()["storage_read_bytes"] == st["storage_read_bytes"], "storage reads went on"
        assert host_loads_logged(d, model) == 0
        # And the model loads afterwards.
        load_and_check(d, c, model, 0, "a Load after the cancel")


def test_sigterm_after_leaving_a_cold_device_load(emu, make_model):
    """Finding 11, r10b: the client of a cold device Load goes away and
    weightd gets SIGTERM at once: it stops without reading on."""
    model = make_model("256M", 1)
    d = emu("1:1G", [model.parent], **SLOW)
    c = d.raw(timeout=120)
    rid = c.send(LOAD, load_body(str(model), target="cuda:0", progress=True))
    first_progress(d, c, rid, "the device Load")
    c.close()
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    rc = d.proc.wait(20)
    took = time.monotonic() - t0
    log = d.log()
    assert rc == 0, f"exit status {rc}\n{log[-4000:]}"
    assert host_loads_logged(d, model) == 0, (
        f"SIGTERM waited {took:.2f} s for a host read nobody wanted:\n{log[-3000:]}")


# ---- joining a cancelled load (PROTOCOL.md, "Progress and cancellation") ------

def test_device_load_joining_a_cancelled_one_gets_the_bytes(emu, make_model):
    """A's cold device Load is cancelled (its only waiter); B's Load of the
    same component to the same device arrives while that load stops.  B
    did not cancel: it must get the bytes, not CANCELLED (or be told to
    retry).  The copy thread is held by a large copy to the same device, so
    the cancelled load cannot end before B joins it.  A's model is large
    enough that its read (O_DIRECT, 64 KiB at a time) outlasts the first
    Progress interval on a fast disk too."""
    model, blocker = make_model("256M", 2), make_model("256M", 1)
    d = emu("2:1G", [model.parent, blocker.parent], **SLOW)
    with d.raw(timeout=30) as a, d.raw(timeout=30) as b, d.raw(timeout=30) as x:
        env = x.request(PREFETCH, load_body(str(blocker)))
        assert env.code == "OK", f"host Prefetch: {env.code}: {env.message}"
        rid = a.send(LOAD, load_body(str(model), target="cuda:1", progress=True))
        first_progress(d, a, rid, "A's device Load")
        xid = x.send(PREFETCH, load_body(str(blocker), target="cuda:1"))
        time.sleep(0.03)
        got, reply = cancel(a, rid)
        assert (got.code, reply.code) == ("CANCELLED", "OK"), (got.code, got.message, reply.code, reply.message)
        load_and_check(d, b, model, 1, "B's device Load, which nobody cancelled")
        env = wait_reply(d, x, xid, "the blocker's device Prefetch")
        assert env.code == "OK", f"{env.code}: {env.message}"
