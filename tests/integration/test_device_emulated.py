"""The GPU tier's server side on emulated devices (a build with
-Dgpu_emulation=true, devices from $WEIGHTD_EMULATED_GPUS).

A device slab of that build is a memfd: the tests map the descriptor a
device Load sends (raw wire, wdwire.py) and compare every tensor's bytes
with the file's bytes, read here with json and plain file reads (the
safetensors library as a second opinion for the dtypes numpy holds), and
sharded device loads with numpy slicing of those bytes.  Covered: Status and
Hello, every layout and dtype, cold loads pipelined with the read (storage
read once, Progress with copied_bytes), fan-out to two devices, sharded
device entries, keep_host, device budgets (shortfall, LRU, leases, the
device's own memory running out), leases that outlive evictions and the
daemon, errors, and weightctl.

Other builds skip this module (tests/run does not pass it to them).
"""
import math
import mmap
import os
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors import safe_open

import wdwire
from harness import BUILD, REPO, Daemon, emulated_build, wait_until
from reference import NUMPY_DTYPES, read_header, write_safetensors
from test_layouts import LAYOUTS, _files, _id
from test_shard import RULES, file_tensors, make_every_dtype, numpy_part, rule_for, split


pytestmark = pytest.mark.skipif(not emulated_build(),
                                reason=f"{BUILD} is not built with -Dgpu_emulation=true (no emulated GPUs)")

EMU = "2:256M"
MiB = 1 << 20
GRANULARITY = 2 * MiB
KEEP_HOST_YES, KEEP_HOST_NO = 1, 2


def uuid_of(i):
    return f"GPU-00000000-0000-4000-8000-{i:012x}"


def align_up(n, a):
    return (n + a - 1) // a * a


def wait_gpu(d):
    """Wait for the device search; the tier must be up."""
    with d.raw() as c:
        st = wait_until(lambda: (lambda s: s if not s["gpu"].startswith("starting") else None)(c.status()),
                        what="the device search")
    assert st["gpu"] == "ok", f"no GPU tier on an emulated build: {st['gpu']}\n{d.log()[-2000:]}"
    return d


@pytest.fixture
def emu(start_daemon):
    """emu(gpus=EMU, roots=None, **config) -> a daemon with emulated devices."""
    def start(gpus=EMU, roots=None, **config):
        return wait_gpu(start_daemon(roots=roots, env={"WEIGHTD_EMULATED_GPUS": gpus}, **config))
    return start


@pytest.fixture(scope="module")
def shared(bins, workdir, testdata):
    """One daemon for the layout tests: they do not disturb each other."""
    d = Daemon(bins, workdir, [testdata / "models", testdata / "good"], {},
               env={"WEIGHTD_EMULATED_GPUS": EMU}).start()
    wait_gpu(d)
    yield d
    d.finish()


# ---- the wire --------------------------------------------------------------

def device_load(c, model, component="", target="cuda:0", field=wdwire.LOAD, **kw):
    """(envelope, LoadReply or None, fd or None); Progress events are in
    the returned envelope's .events."""
    rid = c.send(field, wdwire.load_body(str(model), component, target=target, **kw))
    events = []
    while True:
        env = c.recv()
        if env.id != rid:
            continue
        if env.has(wdwire.PROGRESS):
            p = env.progress
            events.append((p.int(1), p.int(2), p.int(5)))
            continue
        break
    env.events = events
    if env.code != "OK":
        return env, None, None
    load = env.reply.msg(11)
    fd = None
    if load.msgs(4):
        fds = c.take_fds(1)
        assert len(fds) == 1, "a device Load came without its descriptor"
        fd = fds[0]
    return env, load, fd


def load_ok(c, model, component="", target="cuda:0", **kw):
    env, load, fd = device_load(c, model, component, target, **kw)
    assert env.code == "OK", f"{env.code}: {env.message}"
    return load, fd


def release(c, lease):
    env = c.request(wdwire.RELEASE, wdwire.f_varint(1, lease))
    assert env.code == "OK", env.message


class Mapped:
    """A read-only shared mapping of a device slab's descriptor."""

    def __init__(self, fd, size):
        self.fd, self.size = fd, size
        self.m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)

    def __getitem__(self, sl):
        return self.m[sl]

    def close(self):
        self.m.close()
        os.close(self.fd)


def expected_tensors(files):
    """{name: (file index, dtype, shape, bytes)}, in file order."""
    out = {}
    for fi, path in enumerate(files):
        for name, (dtype, shape, raw) in file_tensors(path).items():
            out[name] = (fi, dtype, shape, raw)
    return out


def check_slab(load, fd, files, dev, shard=None):
    """Check a device LoadReply and its slab against the files; returns the
    mapping (the caller closes it) and the copied bytes."""
    target = f"cuda:{dev}"
    assert load.str(8) == target
    assert load.int(6) == sum(os.path.getsize(p) for p in files)
    slabs = load.msgs(4)
    assert len(slabs) == 1
    s = slabs[0]
    assert (s.int(1), s.str(4), s.str(6), s.str(7)) == (0, "", uuid_of(dev), target)
    size, map_size = s.int(2), s.int(3)
    assert map_size % GRANULARITY == 0 and map_size == align_up(max(size, 1), GRANULARITY), (size, map_size)

    listed = load.msgs(9)
    assert [f.str(4) for f in listed] == [str(p) for p in files]
    for f, path in zip(listed, files):
        meta = {m.str(1): m.str(2) for m in f.msgs(5)}
        assert meta == read_header(path)[2], path
        assert not f.has(1) and not f.has(3), "files carry no descriptors"

    want = expected_tensors(files)
    m = Mapped(fd, map_size)
    spans, order, copied = [], [], 0
    got = {}
    for t in load.msgs(5):
        name, dtype, shape, slab, off, n, fi = (t.str(1), t.str(2), t.packed(3), t.int(4), t.int(5), t.int(6),
                                                t.int(10))
        got[name] = t
        wfi, wdtype, wshape, raw = want[name]
        assert (slab, fi, dtype) == (0, wfi, wdtype), name
        assert off % 256 == 0, f"{name}: offset {off} is not 256-aligned"
        dim = rule_for(name, shard["rules"]) if shard else None
        if dim is None:
            assert shape == wshape and t.packed(7) == [], name
            data = raw
        else:
            start, part = split(wshape[dim], shard["rank"], shard["world"])
            want_shape = list(wshape)
            want_shape[dim] = part
            assert (shape, t.packed(7), t.int(8), t.int(9)) == (want_shape, wshape, dim, start), name
            data = numpy_part(raw, wshape, dim, start, part)
        assert n == len(data), name
        assert m[off:off + n] == data, f"{name} ({dtype}) on {target}: the device bytes differ from the file's"
        if dim is None and dtype in NUMPY_DTYPES and n:
            with safe_open(str(files[fi]), framework="numpy") as st:
                assert st.get_tensor(name).tobytes() == data, f"{name}: the library reads other bytes"
        if n:
            spans.append((off, off + n, name))
        order.append(fi)
        copied += n
    assert set(got) == set(want) and len(load.msgs(5)) == len(want), "the reply lists other tensors than the files"
    assert order == sorted(order), "tensors are not in file order"
    spans.sort()
    for a, b in zip(spans, spans[1:]):
        assert a[1] <= b[0], f"{a[2]} and {b[2]} overlap"
    end = spans[-1][1] if spans else 0
    assert end <= size <= map_size
    return m, copied


def ls_by_tier(d):
    return {(e["tier"], e["shard"]): e for e in d.ls()}


def device_status(d):
    return {x["index"]: x for x in d.status()["devices"]}


def model_file(root, name, mib, seed=1):
    """A one-tensor model of mib MiB (U8)."""
    path = root / f"{name}.safetensors"
    data = (np.arange(mib * MiB, dtype=np.uint64) * 2654435761 + seed).astype(np.uint8).tobytes()
    write_safetensors(path, [("w", "U8", [mib * 1024, 1024], data)], {"name": name})
    return path


# ---- 1. Status and Hello ----------------------------------------------------

def test_status_and_hello_list_the_devices(emu):
    d = emu("2:256M", budget="50%", device_budgets="1:100M")
    st = d.status()
    assert st["gpu"] == "ok"
    assert [(x["index"], x["uuid"], x["name"], x["pci_bus_id"], x["total_bytes"], x["budget_bytes"],
             x["used_bytes"], x["evictable_bytes"]) for x in st["devices"]] == [
        (0, uuid_of(0), "Emulated GPU", "0000:00:00.0", 256 * MiB, 128 * MiB, 0, 0),
        (1, uuid_of(1), "Emulated GPU", "0000:01:00.0", 256 * MiB, 100 * MiB, 0, 0)]
    with d.raw() as c:
        raw = c.status()
        assert raw["gpu"] == "ok"
        assert [(x["index"], x["uuid"], x["budget_bytes"]) for x in raw["devices"]] == [
            (0, uuid_of(0), 128 * MiB), (1, uuid_of(1), 100 * MiB)]
    c = wdwire.Conn(d.socket)
    try:
        env = c.request(wdwire.HELLO, wdwire.hello_body())
        assert env.code == "OK"
        assert env.reply.msg(10).strs(3) == ["host", "cuda"]
    finally:
        c.close()
    text = d.ctl("status").stdout.decode()
    assert re.search(rf"cuda:0: +{uuid_of(0)} Emulated GPU, 0 B of 128\.0 MiB budget", text), text
    assert re.search(rf"cuda:1: +{uuid_of(1)} Emulated GPU, 0 B of 100\.0 MiB budget", text), text


def test_sighup_applies_new_device_budgets(emu):
    d = emu("2:256M", budget="50%")
    d.write_config(budget="25%", device_budgets="1:10M")
    start = len(d.log())
    d.hup()
    d.wait_log("Reloaded the configuration", start=start)
    assert [(x["index"], x["budget_bytes"]) for x in d.status()["devices"]] == [(0, 64 * MiB), (1, 10 * MiB)]
    # The device list itself needs a restart.
    d.write_config(budget="25%", devices="0")
    start = len(d.log())
    d.hup()
    d.wait_log("Reloaded the configuration", start=start)
    assert "[gpu] devices changed: that needs a restart" in d.log()[start:]
    assert [x["index"] for x in d.status()["devices"]] == [0, 1]


def test_devices_option_serves_only_those(emu, testdata):
    d = emu("3:64M", devices="1")
    assert [(x["index"], x["uuid"]) for x in d.status()["devices"]] == [(1, uuid_of(1))]
    model = testdata / "models" / "sharded"
    files = _files(testdata, "models/sharded", LAYOUTS[2][2])
    with d.raw() as c:
        for target in ("cuda:0", "cuda:2", f"cuda:{uuid_of(0)}"):
            env, _, _ = device_load(c, model, target=target)
            assert env.code == "INVALID_ARGUMENT" and target in env.message, env.message
        for target in ("cuda:1", f"cuda:{uuid_of(1)}"):
            load, fd = load_ok(c, model, target=target)
            m, _ = check_slab(load, fd, files, 1)
            m.close()
    assert {e["tier"] for e in d.ls()} == {"host", "cuda:1"}


# ---- 2. every layout and dtype ------------------------------------------------

@pytest.mark.parametrize("target", ["cuda:0", f"cuda:{uuid_of(1)}"], ids=["ordinal", "uuid"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
def test_layout_on_device(shared, testdata, layout, target):
    model, component, files = layout
    files = _files(testdata, model, files)
    dev = 0 if target == "cuda:0" else 1
    with shared.raw() as c:
        for _ in range(2):  # a cold (or host-resident) load, then from the device entry
            load, fd = load_ok(c, testdata / model, component, target)
            assert (load.str(2), load.str(3)) == (str(testdata / model), component)
            assert load.int(1) != 0, "a Load takes a lease"
            m, _ = check_slab(load, fd, files, dev)
            m.close()
        assert load.int(7) == 1, "the second load is served from the device entry"
    entries = [e for e in shared.ls() if e["model"] == str(testdata / model) and e["component"] == component
               and e["tier"] == f"cuda:{dev}"]
    assert len(entries) == 1 and entries[0]["state"] == "resident" and entries[0]["files"] == len(files)
    assert entries[0]["bytes"] % GRANULARITY == 0


def test_every_dtype_whole_and_sharded(emu, tmp_root):
    model, files = make_every_dtype(tmp_root)
    d = emu(roots=[tmp_root])
    with d.raw() as c:
        load, fd = load_ok(c, model)
        m, _ = check_slab(load, fd, files, 0)
        m.close()
        for world, uneven in ((2, False), (3, True)):
            for rank in range(world):
                spec = {"rank": rank, "world": world, "rules": RULES}
                load, fd = load_ok(c, model, target=f"cuda:{rank % 2}",
                                   shard=wdwire.shard_body(rank, world, RULES, uneven))
                m, _ = check_slab(load, fd, files, rank % 2, shard=spec)
                m.close()
    total = sum(p.stat().st_size for p in files)
    assert d.status()["storage_read_bytes"] == total


def test_compact_device_load_has_the_file_column(emu, tmp_root):
    """A device Load with compact_tensors gets LoadReply.table, with the
    file column: its rows are the Tensor messages of the same Load without
    the flag, and each row's bytes in the slab are the file's."""
    model, files = make_every_dtype(tmp_root)
    d = emu(roots=[tmp_root])
    want = expected_tensors(files)
    with d.raw() as c:
        plain, fd = load_ok(c, model)
        os.close(fd)
        load, fd = load_ok(c, model, compact=True)
        assert not load.has(5), "a table was asked for: no Tensor messages"
        rows = wdwire.table_of(load)
        assert rows == [(t.str(1), t.str(2), t.packed(3), t.int(4), t.int(5), t.int(6), t.int(10))
                        for t in plain.msgs(5)]
        m = Mapped(fd, load.msgs(4)[0].int(3))
        for name, dtype, shape, slab, off, n, fi in rows:
            wfi, wdtype, wshape, raw = want[name]
            assert (slab, fi, dtype, shape, n) == (0, wfi, wdtype, wshape, len(raw)), name
            assert m[off:off + n] == raw, name
        m.close()
        assert len(rows) == len(want)


# ---- 3. cold loads pipelined with the read ------------------------------------

def test_cold_device_load_reads_once_with_progress(emu, make_model):
    model = make_model("128M", 2)
    files = sorted(model.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in files)
    d = emu("2:512M", roots=[model.parent], direct_io="on", queue_depth=1, chunk_size="64K")
    with d.raw(timeout=60) as c:
        env, load, fd = device_load(c, model, progress=True)
        assert env.code == "OK", env.message
        assert load.int(7) == 0, "nothing was resident"
        m, copied = check_slab(load, fd, files, 0)
        m.close()
        ev = env.events
        assert ev, "no Progress event during a slow cold load"
        assert all(t == total for _, t, _ in ev)
        assert [x[0] for x in ev] == sorted(x[0] for x in ev) and all(x[0] <= total for x in ev)
        assert [x[2] for x in ev] == sorted(x[2] for x in ev) and all(x[2] <= copied for x in ev)
        # Pipelined: once the read is seen under way (events are coalesced to
        # one per 100 ms, and a sanitizer build may report only the end), some
        # bytes are on the device before it ends.  copy-sched's unit test
        # checks the overlap itself, without timing.
        during = [x for x in ev if x[0] < total]
        if len(during) >= 2:
            assert any(x[2] > 0 for x in during), f"no copy overlapped the read: {ev}"
        st = c.status()
        assert st["storage_read_bytes"] == total
        # Again from the device entry: no read, no events.
        env, load, fd = device_load(c, model, progress=True)
        assert env.code == "OK" and load.int(7) == 1 and env.events == []
        os.close(fd)
        assert c.status()["storage_read_bytes"] == total


# ---- 4. fan-out -------------------------------------------------------------

@pytest.mark.parametrize("keep", [0, KEEP_HOST_NO], ids=["keep-host", "drop-host"])
def test_fan_out_to_two_devices_reads_once(emu, make_model, keep):
    model = make_model("64M", 2)
    files = sorted(model.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in files)
    d = emu("2:256M", roots=[model.parent], direct_io="on", queue_depth=1, chunk_size="64K")
    with d.raw(timeout=60) as a, d.raw(timeout=60) as b:
        ra = a.send(wdwire.LOAD, wdwire.load_body(str(model), target="cuda:0", keep_host=keep))
        rb = b.send(wdwire.LOAD, wdwire.load_body(str(model), target=f"cuda:{uuid_of(1)}", keep_host=keep))
        for c, rid, dev in ((a, ra, 0), (b, rb, 1)):
            env = c.wait(rid)
            assert env.code == "OK", env.message
            load = env.reply.msg(11)
            m, _ = check_slab(load, c.take_fds(1)[0], files, dev)
            m.close()
        assert a.status()["storage_read_bytes"] == total
        assert d.log().count(f"loading {model} : 2 files") == 1, "the component was read twice"
    want = {"cuda:0", "cuda:1"} | ({"host"} if keep == 0 else set())
    wait_until(lambda: {e["tier"] for e in d.ls()} == want, what=f"the tiers {want}")


# ---- 5. sharded device loads --------------------------------------------------

def test_sharded_device_load_is_its_own_entry(emu, make_model):
    model = make_model("8M", 2)
    files = sorted(model.glob("*.safetensors"))
    rules = [("*embed_tokens.weight", 1), ("*", 0)]
    d = emu(roots=[model.parent])
    with d.raw() as c:
        per_rank = []
        for rank in range(3):
            spec = {"rank": rank, "world": 3, "rules": rules}
            load, fd = load_ok(c, model, target="cuda:1", shard=wdwire.shard_body(rank, 3, rules, uneven=True))
            m, copied = check_slab(load, fd, files, 1, shard=spec)
            per_rank.append({t.str(1): m[t.int(5):t.int(5) + t.int(6)] for t in load.msgs(5)})
            m.close()
        load, fd = load_ok(c, model, target="cuda:1")
        m, _ = check_slab(load, fd, files, 1)
        m.close()
    # The ranks' parts put together are the tensors.
    for path in files:
        for name, (dtype, shape, raw) in file_tensors(path).items():
            dim = rule_for(name, rules)
            row = len(raw) // math.prod(shape[:dim + 1])
            parts = [np.frombuffer(p[name], np.uint8).reshape(tuple(shape[:dim]) + (-1, row)) for p in per_rank]
            assert np.concatenate(parts, axis=dim).tobytes() == raw, name
    entries = ls_by_tier(d)
    want = {("host", "")} | {("cuda:1", f"rank {r}/3 uneven *embed_tokens.weight:1 *:0") for r in range(3)} | \
        {("cuda:1", "")}
    assert set(entries) == want, entries.keys()
    assert all(e["state"] == "resident" and e["leases"] == 0 for e in entries.values())
    assert all(e["files"] == 2 for e in entries.values())
    assert d.status()["storage_read_bytes"] == sum(p.stat().st_size for p in files)


# ---- 6. keep_host -------------------------------------------------------------

@pytest.mark.parametrize("config,request_keep,kept", [
    (None, 0, True), (None, KEEP_HOST_YES, True), (None, KEEP_HOST_NO, False),
    ("no", 0, False), ("no", KEEP_HOST_YES, True), ("yes", KEEP_HOST_NO, False)])
def test_keep_host(emu, testdata, config, request_keep, kept):
    d = emu(keep_host=config)
    model = testdata / "models" / "plain"
    files = _files(testdata, "models/plain", ["model.safetensors"])
    with d.raw() as c:
        load, fd = load_ok(c, model, keep_host=request_keep)
        m, _ = check_slab(load, fd, files, 0)
        m.close()
        tiers = wait_until(lambda: (lambda t: t if ("host" in t) == kept else None)(
            {e["tier"] for e in d.ls()}), what=f"the host entry {'kept' if kept else 'dropped'}")
        assert tiers == ({"host", "cuda:0"} if kept else {"cuda:0"})
        if not kept:
            assert d.status()["host_used_bytes"] == 0


def test_keep_host_no_spares_a_leased_host_entry(emu, testdata):
    d = emu()
    model = testdata / "models" / "plain"
    with d.raw() as c:
        env = c.request(wdwire.LOAD, wdwire.load_body(str(model)))  # a host lease
        assert env.code == "OK", env.message
        c.take_fds(1)
        load, fd = load_ok(c, model, keep_host=KEEP_HOST_NO)
        os.close(fd)
        assert {e["tier"] for e in d.ls()} == {"host", "cuda:0"}


# ---- 7. device budgets --------------------------------------------------------

def test_budget_shortfall_names_the_device(emu, tmp_root):
    path = model_file(tmp_root, "three", 3)  # 3 MiB of tensors: 4 MiB reserved (2 MiB granularity)
    d = emu(roots=[tmp_root], device_budgets="1:1M")
    with d.raw() as c:
        env, _, _ = device_load(c, path, target="cuda:1")
        assert env.code == "RESOURCE_EXHAUSTED", env.message
        assert "cuda:1" in env.message and f"short by {4 * MiB - MiB} bytes" in env.message, env.message
        st = c.status()
        assert (st["storage_read_bytes"], st["entries"]) == (0, 0), "nothing is read for a load that cannot fit"
        assert [x["used_bytes"] for x in st["devices"]] == [0, 0]
        # The other device has room; the connection carries on.
        load, fd = load_ok(c, path, target="cuda:0")
        m, _ = check_slab(load, fd, [path], 0)
        m.close()


def test_lru_eviction_and_leases(emu, tmp_root):
    a, b = model_file(tmp_root, "a", 3, 1), model_file(tmp_root, "b", 3, 2)
    d = emu(roots=[tmp_root], device_budgets="0:6M")
    dev0 = lambda: {(e["model"], e["leases"]) for e in d.ls() if e["tier"] == "cuda:0"}  # noqa: E731
    with d.raw() as c:
        assert c.request(wdwire.PREFETCH, wdwire.load_body(str(a), target="cuda:0")).code == "OK"
        assert dev0() == {(str(a), 0)}
        # B needs A's room: A is unleased, so it goes (least recently used).
        assert c.request(wdwire.PREFETCH, wdwire.load_body(str(b), target="cuda:0")).code == "OK"
        assert dev0() == {(str(b), 0)}
        assert device_status(d)[0]["used_bytes"] == 4 * MiB
        # A leased entry stays: the next load fails until the lease ends.
        load, fd = load_ok(c, a)
        m, _ = check_slab(load, fd, [a], 0)
        t = load.msgs(5)[0]
        want = file_tensors(a)["w"][2]
        assert dev0() == {(str(a), 1)}
        env, _, _ = device_load(c, b)
        assert env.code == "RESOURCE_EXHAUSTED" and "cuda:0" in env.message, env.message
        assert f"short by {2 * MiB} bytes" in env.message, env.message
        assert dev0() == {(str(a), 1)}
        release(c, load.int(1))
        load, fd = load_ok(c, b)
        mb, _ = check_slab(load, fd, [b], 0)
        mb.close()
        assert dev0() == {(str(b), 1)}
        # A's memory stays readable in this process's mapping after its eviction.
        assert m[t.int(5):t.int(5) + t.int(6)] == want
        m.close()
    # Closing the connection ended the lease on B: A fits again.
    wait_until(lambda: d.status()["leases"] == 0, what="the leases to end")
    with d.raw() as c:
        load, fd = load_ok(c, a)
        m, _ = check_slab(load, fd, [a], 0)
        m.close()
    assert dev0() == {(str(a), 0)}


def test_device_memory_smaller_than_the_budget(emu, tmp_root):
    path = model_file(tmp_root, "six", 6)  # 6 MiB, on a device of 4 MiB
    d = emu("1:4M", roots=[tmp_root], device_budgets="0:64M")
    assert device_status(d)[0]["budget_bytes"] == 64 * MiB
    with d.raw() as c:
        for _ in range(2):
            env, _, _ = device_load(c, path)
            assert env.code == "RESOURCE_EXHAUSTED", env.message
            assert "cuda:0" in env.message and "cannot allocate" in env.message, env.message
            st = c.status()
            assert [x["used_bytes"] for x in st["devices"]] == [0], "a failed allocation stays charged"
            assert st["leases"] == 0
            assert [e["tier"] for e in d.ls()] == ["host"]
    # A component that fits still loads.
    small = model_file(tmp_root, "one", 1)
    with d.raw() as c:
        load, fd = load_ok(c, small)
        m, _ = check_slab(load, fd, [small], 0)
        m.close()


# ---- 8. leases ----------------------------------------------------------------

def test_lease_outlives_evict_attempts_and_the_daemon(emu, testdata):
    d = emu(keep_host="no")
    model = testdata / "models" / "sharded"
    files = _files(testdata, "models/sharded", LAYOUTS[2][2])
    with d.raw() as c:
        load, fd = load_ok(c, model)
        dup = os.dup(fd)
        m, _ = check_slab(load, fd, files, 0)
        assert [e["tier"] for e in d.ls()] == ["cuda:0"]
        env = c.request(wdwire.EVICT, wdwire.ref_body(str(model)))
        assert env.code == "BUSY", f"{env.code}: {env.message}"
        assert env.message.startswith("cuda:0: ") and "1 lease" in env.message, env.message
        assert [(e["tier"], e["leases"]) for e in d.ls()] == [("cuda:0", 1)]
        m2, _ = check_slab(load, os.dup(dup), files, 0)
        m2.close()
        d.kill()
        # The memory lives while this process maps it or holds the descriptor.
        m3, _ = check_slab(load, dup, files, 0)
        m3.close()
        m.close()


def test_unleased_device_entry_can_be_evicted(emu, testdata):
    d = emu(keep_host="no")
    model = testdata / "models" / "sharded"
    with d.raw() as c:
        assert c.request(wdwire.PREFETCH, wdwire.load_body(str(model), target="cuda:0")).code == "OK"
        assert [e["tier"] for e in d.ls()] == ["cuda:0"]
        # Pin and Unpin reach the device entry too.
        assert c.request(wdwire.PIN, wdwire.ref_body(str(model))).code == "OK"
        assert [e["pinned"] for e in d.ls()] == [True]
        env = c.request(wdwire.EVICT, wdwire.ref_body(str(model)))
        assert env.code == "BUSY" and env.message.startswith("cuda:0: ") and "pinned" in env.message, env.message
        assert c.request(wdwire.UNPIN, wdwire.ref_body(str(model))).code == "OK"
        env = c.request(wdwire.EVICT, wdwire.ref_body(str(model)))
        assert env.code == "OK", f"{env.code}: {env.message}"
        assert d.ls() == []
        assert [x["used_bytes"] for x in c.status()["devices"]] == [0, 0]


HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    import wdwire
    c = wdwire.connect(sys.argv[2])
    env = c.request(wdwire.LOAD, wdwire.load_body(sys.argv[3], target=sys.argv[4]))
    assert env.code == "OK", env.message
    assert len(c.take_fds(1)) == 1
    print("ready", flush=True)
    time.sleep(600)
""")


def test_sigkill_of_a_client_ends_its_device_lease(emu, testdata):
    d = emu()
    model = testdata / "models" / "plain"
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(REPO / "tests" / "integration"), d.socket, str(model),
                          "cuda:1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    d.children.append(p)
    line = p.stdout.readline()
    assert line == b"ready\n", p.stderr.read().decode() if p.poll() is not None else line
    assert d.status()["leases"] == 1
    assert [(e["tier"], e["leases"]) for e in d.ls() if e["tier"] == "cuda:1"] == [("cuda:1", 1)]
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    wait_until(lambda: d.status()["leases"] == 0, what="the lease to end with its client")
    assert [(e["tier"], e["leases"]) for e in d.ls() if e["tier"] == "cuda:1"] == [("cuda:1", 0)]


# ---- 9. errors ------------------------------------------------------------------

@pytest.mark.parametrize("field", [wdwire.LOAD, wdwire.PREFETCH], ids=["load", "prefetch"])
def test_unknown_devices_and_garbage_targets(emu, testdata, field):
    d = emu()
    model = testdata / "models" / "single.safetensors"
    cases = [("cuda:7", "the daemon serves no such device (2 devices)"),
             ("cuda:63", "the daemon serves no such device"),
             (f"cuda:{uuid_of(2)}", "the daemon serves no such device"),
             ("cuda:GPU-12345678-1234-1234-1234-123456789abc", "the daemon serves no such device"),
             ("cuda:64", "not \"host\", \"cuda:N\" or \"cuda:GPU-<uuid>\""),
             ("gpu:0", "not \"host\""), ("cuda:", "cuda:N"), ("cuda:GPU-xyz", "cuda:N"), ("CUDA:0", "cuda:N")]
    with d.raw() as c:
        for target, text in cases:
            env, _, _ = device_load(c, model, target=target, field=field)
            assert env.code == "INVALID_ARGUMENT", (target, env.code, env.message)
            assert f'target "{target}"' in env.message and text in env.message, env.message
        env, _, _ = device_load(c, model, target="cuda:0", keep_host=7, field=field)
        assert env.code == "INVALID_ARGUMENT" and "keep_host" in env.message, env.message
        st = c.status()
        assert (st["entries"], st["storage_read_bytes"]) == (0, 0)
        # The connection carries on.
        env, load, fd = device_load(c, model, target="cuda:0", field=field)
        assert env.code == "OK", env.message
        if fd is not None:
            m, _ = check_slab(load, fd, [model], 0)
            m.close()


# ---- 10. weightctl ----------------------------------------------------------------

def test_weightctl_prefetch_device_ls_and_status(emu, testdata):
    d = emu()
    model = testdata / "models" / "sharded"
    r = d.ctl("prefetch", str(model), "--device", f"cuda:{uuid_of(1)}")
    assert r.returncode == 0, r.stderr.decode()
    assert {(e["tier"], e["state"]) for e in d.ls()} == {("host", "resident"), ("cuda:1", "resident")}
    text = d.ctl("ls").stdout.decode()
    assert re.search(r"\bcuda:1 +resident +2\.0 MiB", text), text
    # --keep-host no drops the host copy once on the device (nothing holds it).
    r = d.ctl("prefetch", str(model), "--device", f"cuda:{uuid_of(0)}", "--keep-host", "no")
    assert r.returncode == 0, r.stderr.decode()
    assert {e["tier"] for e in d.ls()} == {"cuda:0", "cuda:1"}
    st = d.status()
    assert [x["used_bytes"] for x in st["devices"]] == [2 * MiB, 2 * MiB]
    # A client without CUDA names devices by UUID; the daemon has no device 5.
    r = d.ctl("prefetch", str(model), "--device", f"cuda:{uuid_of(5)}")
    assert r.returncode != 0, r.stdout.decode()
    err = r.stderr.decode()
    assert "INVALID_ARGUMENT" in err and uuid_of(5) in err and "no such device" in err, err


# ---- 11. metrics --------------------------------------------------------------

def test_metrics_per_device(emu, testdata):
    """/metrics has a tier per device, equal to Status's devices; device loads
    count as misses, then hits, and as cuda:N samples of the histogram."""
    from test_metrics import metrics_port, scrape_when
    d = emu(listen="127.0.0.1:0")
    port = metrics_port(d)
    model = testdata / "models" / "sharded"
    with d.raw() as c:
        load, fd = load_ok(c, model, target="cuda:1")
        os.close(fd)
        load, fd = load_ok(c, model, target="cuda:1")
        os.close(fd)
        s = scrape_when(port, lambda s: s.get('weightd_cache_hits_total{tier="cuda:1"}') == 1,
                        what="the device hit in the metrics")
        st = d.status()
    for x in st["devices"]:
        t = f'tier="cuda:{x["index"]}"'
        assert s[f"weightd_memory_budget_bytes{{{t}}}"] == x.get("budget_bytes", 0)
        assert s[f"weightd_memory_used_bytes{{{t}}}"] == x.get("used_bytes", 0)
        assert s[f"weightd_memory_evictable_bytes{{{t}}}"] == x.get("evictable_bytes", 0)
        assert s[f"weightd_device_memory_bytes{{{t}}}"] == x.get("total_bytes", 0)
        assert s[f'weightd_device_info{{{t},uuid="{x["uuid"]}",name="{x.get("name", "")}",'
                 f'pci_bus_id="{x.get("pci_bus_id", "")}"}}'] == 1
    assert s['weightd_cache_misses_total{tier="cuda:1"}'] == 1
    assert s['weightd_load_duration_seconds_count{tier="cuda:1",outcome="ok"}'] == 1
    assert s['weightd_load_duration_seconds_count{tier="cuda:0",outcome="ok"}'] == 0
    assert s['weightd_cache_entries{tier="cuda:1",state="resident"}'] == 1
    # The device load's host load: a host tier sample of its own.
    assert s['weightd_load_duration_seconds_count{tier="host",outcome="ok"}'] == 1
