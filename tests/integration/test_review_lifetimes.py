"""Regression tests for the lifetime findings of the December 2026 server
review (shared/reviews/2026-12-server-review.md) that need no GPU tier.

Finding 1: completing a job answered its waiters in a loop and, after each
reply, parsed that peer's buffered frames right there; a pipelined Evict
freed the entry the next waiter's reply was built from (r1: a whole host
load; r9: a shard build).  Each test drives the real weightd over the raw
wire (wdwire.py): peer B's Load joins the job first, then peer A writes
64 Prefetch frames (max_pending_requests) and an Evict in one write, so the
Evict sits in A's input buffer until one of A's Prefetches is answered.
The daemon must stay up, every request must be answered, and B's bytes,
read through the descriptors the reply sent, must be the file's.  On a
sanitizer build the harness fails the test on any report in the log.
"""

import pytest
import xxhash

import wdwire
from harness import SLOW, mapped_hashes, wait_until
from reference import read_header
from test_shard import numpy_part, split
from wdwire import EVICT, LOAD, PREFETCH, PROGRESS, envelope, frame, load_body, ref_body, shard_body

MAX_PENDING = 64  # the daemon's default max_pending_requests, set explicitly below


def model_files(model):
    return sorted(model.glob("*.safetensors"))


def expected_hashes(files, shard=None):
    """{name: xxh3_128} of each tensor's bytes, read from the files (for a
    shard {"rank", "world"} with every tensor split on dim 0)."""
    out = {}
    for path in files:
        start, header, _ = read_header(path)
        with open(path, "rb") as f:
            for name, e in header.items():
                b, end = e["data_offsets"]
                f.seek(start + b)
                raw = f.read(end - b)
                if shard is not None and e["shape"]:
                    first, part = split(e["shape"][0], shard["rank"], shard["world"])
                    raw = numpy_part(raw, e["shape"], 0, first, part)
                out[name] = xxhash.xxh3_128_hexdigest(raw)
    return out


def died(d):
    """How the daemon is, after a connection ended: give a dying one a moment."""
    try:
        d.proc.wait(2)
    except Exception:
        pass
    return "runs" if d.running() else f"exited with {d.proc.returncode}"


def alive(d, what):
    assert d.running(), f"weightd died ({what}): exit status {d.proc.poll()}\n{d.log()[-6000:]}"


def wait_reply(d, conn, rid, what):
    try:
        return conn.wait(rid)
    except (wdwire.Closed, ConnectionResetError) as e:
        raise AssertionError(f"{what}: the connection ended ({type(e).__name__}); weightd {died(d)}\n"
                             f"{d.log()[-6000:]}") from None


def pipelined_prefetches_and_evict(a, model, shard=None):
    """A's 64 Prefetch frames and one Evict, in one write; returns their ids."""
    ids = list(range(100, 100 + MAX_PENDING))
    body = load_body(str(model), shard=shard)
    a.send_raw(b"".join(frame(envelope(i, PREFETCH, body)) for i in ids) +
               frame(envelope(999, EVICT, ref_body(str(model)))))
    return ids


def collect(d, a, ids, what):
    """A's replies: {id: envelope} for the Prefetches and the Evict."""
    want = set(ids) | {999}
    got = {}
    while want - set(got):
        try:
            env = a.recv()
        except (wdwire.Closed, ConnectionResetError) as e:
            raise AssertionError(f"{what}: A's connection ended ({type(e).__name__}) with "
                                 f"{len(want - set(got))} replies missing; weightd {died(d)}\n"
                                 f"{d.log()[-6000:]}") from None
        if env.has(wdwire.REPLY):
            got[env.id] = env
    return got


def test_pipelined_evict_while_a_load_completes(start_daemon, make_model):
    """Finding 1, r1: a whole host load's completion."""
    model = make_model("256M", 1)
    files = model_files(model)
    d = start_daemon(roots=[model.parent], max_pending_requests=MAX_PENDING, **SLOW)
    want = expected_hashes(files)
    with d.raw(timeout=120) as b, d.raw(timeout=120) as a:
        bid = b.send(LOAD, load_body(str(model), progress=True))
        env = b.recv()
        assert env.id == bid and env.has(PROGRESS), "no Progress: B's Load did not join a running read"
        assert env.progress.int(1) < env.progress.int(2), "the read ended before A's frames were sent"
        ids = pipelined_prefetches_and_evict(a, model)
        got_b = wait_reply(d, b, bid, "B's Load")
        got_a = collect(d, a, ids, "A's Prefetches and Evict")
        alive(d, "after the job completed")
        assert got_b.code == "OK", f"B's Load: {got_b.code}: {got_b.message}"
        assert mapped_hashes(b, got_b.reply.msg(11)) == want, "B's Load serves other bytes than the file's"
        for i in ids:
            assert got_a[i].code == "OK", f"A's Prefetch {i}: {got_a[i].code}: {got_a[i].message}"
        # B holds a lease on the entry, so the Evict is refused while it lives.
        assert got_a[999].code in ("OK", "BUSY"), f"Evict: {got_a[999].code}: {got_a[999].message}"
        st = b.status()
        assert st["leases"] == 1
    wait_until(lambda: d.status()["leases"] == 0, what="B's lease to end")
    # The daemon serves the model again, from whatever is left.
    with d.raw(timeout=120) as c:
        env = c.request(LOAD, load_body(str(model)))
        assert env.code == "OK", f"{env.code}: {env.message}"
        assert mapped_hashes(c, env.reply.msg(11)) == want


SHARD = {"rank": 0, "world": 2}


@pytest.mark.parametrize("attempts", [6])
def test_pipelined_evict_while_a_shard_build_completes(start_daemon, make_model, attempts):
    """Finding 1, r9: a shard build's completion.  The build runs on the
    thread pool while the whole component is resident; B's sharded Load
    starts it, A's sharded Prefetches join it.  Whether they joined (rather
    than found the shard resident) shows in their was_resident; the scenario
    is repeated, evicting in between, until some did."""
    model = make_model("256M", 1)
    files = model_files(model)
    d = start_daemon(roots=[model.parent], max_pending_requests=MAX_PENDING)
    want = expected_hashes(files, SHARD)
    spec = shard_body(SHARD["rank"], SHARD["world"], [("*", 0)], uneven=True)
    joined = 0
    for attempt in range(attempts):
        with d.raw(timeout=120) as b, d.raw(timeout=120) as a:
            env = b.request(PREFETCH, load_body(str(model)))
            assert env.code == "OK", f"host Prefetch: {env.code}: {env.message}"
            bid = b.send(LOAD, load_body(str(model), shard=spec))
            ids = pipelined_prefetches_and_evict(a, model, shard=spec)
            got_b = wait_reply(d, b, bid, f"attempt {attempt}: B's sharded Load")
            got_a = collect(d, a, ids, f"attempt {attempt}: A's sharded Prefetches and Evict")
            alive(d, f"attempt {attempt}, after the shard build completed")
            assert got_b.code == "OK", f"B's sharded Load: {got_b.code}: {got_b.message}"
            assert mapped_hashes(b, got_b.reply.msg(11)) == want, "B's shard holds other bytes than the file's"
            for i in ids:
                assert got_a[i].code == "OK", f"A's Prefetch {i}: {got_a[i].code}: {got_a[i].message}"
            assert got_a[999].code in ("OK", "BUSY"), f"Evict: {got_a[999].code}: {got_a[999].message}"
            joined += sum(1 for i in ids if not got_a[i].reply.msg(11).int(7))
        wait_until(lambda: d.status()["leases"] == 0, what="B's lease to end")
        with d.raw() as c:
            env = c.request(EVICT, ref_body(str(model)))
        assert env.code in ("OK", "NOT_FOUND"), f"Evict: {env.code}: {env.message}"
        if joined:
            break
    assert joined, f"in {attempts} attempts no Prefetch joined a running shard build"
