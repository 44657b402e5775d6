"""Sharded delivery to the host: every tensor of every rank equals numpy
slicing of the file's tensor, read here without weightd's code (the header
with json, the bytes as unsigned views, so F8, BF16, F4 and F6 compare as
raw bytes; the safetensors library's slicing as a second opinion for the
dtypes numpy holds); the ranks' parts put together give the whole tensor;
errors name the file, the tensor and the rule before anything is read;
invalid specs from the raw wire; the derived entry is cached, listed,
budgeted, pinned and evicted with its component.
"""
import json
import math
import random
import re
import subprocess

import numpy as np
import pytest
from safetensors import safe_open

import wdwire
from harness import wait_until
from reference import NUMPY_DTYPES, read_header, write_safetensors

BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
        "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
        "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}

RULES = [("*.rows", 0), ("*.cols", 1), ("*.mat", 1), ("*.vec", 0)]


def nbytes(dtype, shape):
    n = BITS[dtype] * math.prod(shape)
    assert n % 8 == 0
    return n // 8


def rule_for(name, rules):
    """The first rule whose glob matches (fnmatch without flags: '*' matches '.')."""
    import fnmatch
    for pattern, dim in rules:
        if fnmatch.fnmatchcase(name, pattern):
            return dim
    return None


def split(size, rank, world):
    base, extra = divmod(size, world)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


def rows_view(raw, shape, dim):
    """The tensor's bytes as uint8 with shape[:dim+1] + (bytes per index of dim,)."""
    a = np.frombuffer(raw, np.uint8)
    return a.reshape(tuple(shape[:dim + 1]) + (-1,)) if a.size else a.reshape(tuple(shape[:dim + 1]) + (0,))


def numpy_part(raw, shape, dim, start, part):
    if math.prod(shape) == 0:
        return b""
    idx = (slice(None),) * dim + (slice(start, start + part),)
    return rows_view(raw, shape, dim)[idx].tobytes()


def file_tensors(path):
    """{name: (dtype, shape, raw bytes)} read with json and plain file reads."""
    start, header, _ = read_header(path)
    out = {}
    with open(path, "rb") as f:
        for name, e in header.items():
            b, end = e["data_offsets"]
            f.seek(start + b)
            out[name] = (e["dtype"], list(e["shape"]), f.read(end - b))
    return out


def make_every_dtype(root):
    """A two-file model (an index names the shards) with every dtype, split
    along dim 0 and 1, plus tensors no rule matches, a scalar and empty ones."""
    rng = random.Random("shard/every-dtype")
    files = ([], [])
    for i, dt in enumerate(BITS):
        out = files[i % 2]
        sub = BITS[dt] < 8
        specs = [(f"{dt}.rows", [12, 6, 4]), (f"{dt}.cols", [3, 8, 4])]
        if sub:
            specs.append((f"{dt}.flat", [16]))  # rows of one element: not split
        else:
            specs += [(f"{dt}.mat", [6, 10]), (f"{dt}.vec", [12]), (f"{dt}.other", [5, 3])]
        for name, shape in specs:
            out.append((name, dt, shape, rng.randbytes(nbytes(dt, shape))))
    files[0].append(("scalar", "F32", [], rng.randbytes(4)))
    files[1].append(("empty.rows", "F16", [0, 4], b""))
    files[1].append(("empty.cols", "BF16", [4, 0], b""))
    model = root / "every"
    model.mkdir()
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for fname, tensors, meta in zip(names, files, ({"format": "pt", "part": "one"}, {"format": "pt"})):
        write_safetensors(model / fname, tensors, meta)
        weight_map.update({t[0]: fname for t in tensors})
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model, [model / n for n in names]


def shard_load(d, model, out, rank, world, rules, uneven=False, component=""):
    args = [f"{rank}/{world}"] + (["uneven"] if uneven else []) + [f"{p}:{dim}" for p, dim in rules]
    return d.client("shard", str(model), component, str(out), *args)


def shard_ok(d, model, out, rank, world, rules, uneven=False):
    r = shard_load(d, model, out, rank, world, rules, uneven)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout), out.read_bytes()


def takes(name, tensors):
    """Whether a load with these tensors patterns delivers name (none: all)."""
    import fnmatch
    return not tensors or any(fnmatch.fnmatchcase(name, p) for p in tensors)


def check_rank(got, dump, files, rank, world, rules, tensors=None):
    """Every tensor of one rank's load against numpy slicing of the files
    (with tensors patterns: the tensors they match, and no other); returns
    {name: part bytes} for the concatenation check."""
    paths = [str(p) for p in files]
    assert [f["path"] for f in got["files"]] == paths
    parts = {}
    seen = set()
    for fi, path in enumerate(files):
        _, _, meta = read_header(path)
        assert got["files"][fi]["metadata"] == meta
        for name, (dtype, shape, raw) in file_tensors(path).items():
            if not takes(name, tensors):
                assert name not in got["tensors"], f"{name}: delivered, but no tensors pattern matches it"
                continue
            t = got["tensors"][name]
            seen.add(name)
            assert t["dtype"] == dtype and t["file"] == fi, name
            # World 1 splits nothing: an ordinary load, at the files' offsets
            # (unless tensors are picked: a slab of their own).
            if world > 1 or tensors:
                assert t["slab_offset"] % 256 == 0, name
            data = dump[t["dump_offset"]:t["dump_offset"] + t["nbytes"]]
            dim = rule_for(name, rules) if world > 1 else None
            if dim is None:
                assert t["full_shape"] is None and t["shape"] == shape, name
                assert data == raw, name
                parts[name] = data
                continue
            start, part = split(shape[dim], rank, world)
            want_shape = list(shape)
            want_shape[dim] = part
            assert (t["shape"], t["full_shape"], t["shard_dim"], t["shard_start"]) == \
                (want_shape, shape, dim, start), name
            want = numpy_part(raw, shape, dim, start, part)
            assert t["nbytes"] == len(want), name
            assert data == want, f"{name} ({dtype}) rank {rank}/{world} dim {dim}: bytes differ"
            if dtype in NUMPY_DTYPES and math.prod(shape) > 0 and part > 0:
                with safe_open(str(path), framework="numpy") as st:
                    sl = st.get_slice(name)
                    lib = sl[start:start + part] if dim == 0 else sl[:, start:start + part]
                    assert np.ascontiguousarray(lib).tobytes() == data, f"{name}: the library's slice differs"
            parts[name] = data
    assert seen == set(got["tensors"])
    return parts


def check_concatenation(files, per_rank, rules):
    """The ranks' parts, put together along the split dimension, are the tensor."""
    for path in files:
        for name, (dtype, shape, raw) in file_tensors(path).items():
            dim = rule_for(name, rules)
            if dim is None or math.prod(shape) == 0:
                continue
            row = len(raw) // math.prod(shape[:dim + 1])
            views = [np.frombuffer(p[name], np.uint8).reshape(tuple(shape[:dim]) + (-1, row)) for p in per_rank]
            whole = np.concatenate(views, axis=dim)
            assert whole.tobytes() == raw, f"{name}: the ranks' parts do not make the tensor"


@pytest.fixture
def every(tmp_root):
    return make_every_dtype(tmp_root)


@pytest.mark.parametrize("world,uneven", [(1, False), (2, False), (3, True), (4, True), (5, True)])
def test_every_dtype_every_rank(start_daemon, tmp_root, every, world, uneven):
    model, files = every
    d = start_daemon(roots=[tmp_root])
    per_rank = []
    for rank in range(world):
        got, dump = shard_ok(d, model, tmp_root / f"dump-{rank}", rank, world, RULES, uneven)
        per_rank.append(check_rank(got, dump, files, rank, world, RULES))
    if world > 1:
        check_concatenation(files, per_rank, RULES)
    # One read of the files for all ranks.
    total = sum(p.stat().st_size for p in files)
    assert d.status()["storage_read_bytes"] == total


def test_generated_model(start_daemon, make_model):
    model = make_model("8M", 2)
    files = sorted(model.glob("*.safetensors"))
    rules = [("*embed_tokens.weight", 1), ("*", 0)]
    d = start_daemon(roots=[model.parent])
    per_rank = []
    for rank in range(3):
        out = model.parent / f"dump-{rank}"
        got, dump = shard_ok(d, model, out, rank, 3, rules, uneven=True)
        per_rank.append(check_rank(got, dump, files, rank, 3, rules))
        out.unlink()
    check_concatenation(files, per_rank, rules)


@pytest.mark.parametrize("world", [1, 2])
def test_tensors_patterns_deliver_those_tensors_only(start_daemon, tmp_root, every, world):
    """A pipeline stage: only the tensors a pattern matches, split or whole,
    each equal to the files' bytes; a pattern that matches nothing is an
    error that names it."""
    model, files = every
    d = start_daemon(roots=[tmp_root])
    tensors = ["F16.*", "BF16.rows", "scalar"]
    for rank in range(world):
        out = tmp_root / f"stage-{rank}"
        r = d.client("shard", str(model), "", str(out), f"{rank}/{world}", *[f"tensors={p}" for p in tensors],
                     *[f"{p}:{dim}" for p, dim in RULES])
        assert r.returncode == 0, r.stderr.decode()
        got = json.loads(r.stdout)
        assert sorted(got["tensors"]) == sorted(n for p in files for n in file_tensors(p) if takes(n, tensors))
        check_rank(got, out.read_bytes(), files, rank, world, RULES, tensors)
    r = d.client("shard", str(model), "", str(tmp_root / "none"), "0/0", "tensors=no.such.*")
    assert r.returncode != 0
    assert "no.such.*" in r.stderr.decode() and "no tensor matches" in r.stderr.decode(), r.stderr.decode()


def test_not_divisible_names_tensor_and_nothing_is_read(start_daemon, tmp_root, every):
    model, files = every
    d = start_daemon(roots=[tmp_root])
    r = shard_load(d, model, tmp_root / "dump", 1, 4, RULES)
    assert r.returncode == 1
    err = json.loads(r.stdout)
    assert err["error"] == "INVALID_ARGUMENT"
    # The first tensor in file order that 4 does not divide: F8_E4M3.rows? No:
    # rows (12) and cols (8) divide; the first mat (10) does not.
    assert re.search(r'model-0000[12]-of-00002\.safetensors: tensor "[A-Z0-9_]+\.mat": rule "\*\.mat:1": '
                     r'dimension 1 of shape \[6, 10\] is 10, which world 4 does not divide', err["message"]), \
        err["message"]
    r = shard_load(d, model, tmp_root / "dump", 0, 2, [("*.vec", 1)])
    assert json.loads(r.stdout)["error"] == "INVALID_ARGUMENT"
    assert 'rule "*.vec:1": dim 1 is beyond the tensor\'s 1 dimensions' in json.loads(r.stdout)["message"]
    r = shard_load(d, model, tmp_root / "dump", 0, 2, [("scalar", 0)])
    assert "tensor \"scalar\"" in json.loads(r.stdout)["message"]
    r = shard_load(d, model, tmp_root / "dump", 0, 2, [("F4.flat", 0)])
    assert "not whole bytes" in json.loads(r.stdout)["message"]
    st = d.status()
    assert (st["storage_read_bytes"], st["entries"]) == (0, 0)


SPEC_ERRORS = [
    (wdwire.shard_body(0, 0), "world 0 is not in 1..65536"),
    (wdwire.shard_body(0, 65537), "world 65537 is not in 1..65536"),
    (wdwire.shard_body(2, 2), "rank 2 is not below world 2"),
    (wdwire.shard_body(0, 2, [("x", 2)]), "dim 2, only dimensions 0 and 1"),
    (wdwire.shard_body(0, 2, [("", 0)]), "the pattern must have 1 to 256 bytes"),
    (wdwire.shard_body(0, 2, [("p" * 257, 0)]), "the pattern must have 1 to 256 bytes"),
    (wdwire.shard_body(0, 2, [("a\x01b", 0)]), "control byte"),
    (wdwire.shard_body(0, 2, [("*a*b*c*d*", 0)]), "5 '*' in the pattern"),
    (wdwire.shard_body(0, 2, [("x", 0)] * 65), "65 rules, more than the limit of 64"),
]


@pytest.mark.parametrize("field", [wdwire.LOAD, wdwire.PREFETCH], ids=["load", "prefetch"])
def test_invalid_specs_from_the_wire(start_daemon, tmp_root, every, field):
    model, _ = every
    d = start_daemon(roots=[tmp_root])
    with d.raw() as c:
        for shard, needle in SPEC_ERRORS:
            env = c.request(field, wdwire.load_body(str(model), shard=shard))
            assert env.code == "INVALID_ARGUMENT", (needle, env.message)
            assert needle in env.message, env.message
        # The connection lives, and nothing was read.
        assert c.status()["storage_read_bytes"] == 0
        # World 1 without rules shards nothing: an ordinary load.
        env = c.request(wdwire.LOAD, wdwire.load_body(str(model), shard=wdwire.shard_body(0, 1)))
        assert env.code == "OK", env.message
        load = env.reply.msg(11)
        assert len(load.msgs(4)) == 2 and not load.msgs(9)
        c.take_fds(2)


def test_cached_listed_and_whole_resident_first(start_daemon, tmp_root, every):
    model, files = every
    total = sum(p.stat().st_size for p in files)
    d = start_daemon(roots=[tmp_root])
    shard = wdwire.shard_body(1, 2, RULES)
    with d.raw() as c:
        env = c.request(wdwire.PREFETCH, wdwire.load_body(str(model), shard=shard, progress=True))
        assert env.code == "OK", env.message
        first = env.reply.msg(11)
        assert (first.int(6), first.int(7), first.int(1)) == (total, 0, 0)
        assert c.status()["storage_read_bytes"] == total
        ls = d.ls()
        assert sorted(e["shard"] for e in ls) == ["", "rank 1/2 *.rows:0 *.cols:1 *.mat:1 *.vec:0"]
        derived = [e for e in ls if e["shard"]][0]
        assert derived["state"] == "resident" and derived["files"] == 2 and derived["leases"] == 0
        # Again, and as a Load: from memory, nothing read.
        env = c.request(wdwire.PREFETCH, wdwire.load_body(str(model), shard=shard))
        assert env.code == "OK" and env.reply.msg(11).int(7) == 1
        env = c.request(wdwire.LOAD, wdwire.load_body(str(model), shard=shard))
        assert env.code == "OK", env.message
        load = env.reply.msg(11)
        assert load.int(7) == 1 and load.str(8) == "host"
        slabs, listed = load.msgs(4), load.msgs(9)
        assert len(slabs) == 1 and slabs[0].int(2) == derived["bytes"]
        assert [f.str(4) for f in listed] == [str(p) for p in files]
        assert all(not f.has(1) and not f.has(3) for f in listed)
        assert len(c.take_fds(1)) == 1
        assert c.status()["storage_read_bytes"] == total
        held = [e for e in d.ls() if e["shard"]][0]
        assert held["leases"] == 1
    # The other rank cuts its slices from the resident whole entry: no read.
    got, _ = shard_ok(d, model, tmp_root / "dump", 0, 2, RULES)
    assert d.status()["storage_read_bytes"] == total
    assert len(d.ls()) == 3


def test_concurrent_requests_share_one_build(start_daemon, make_model):
    model = make_model("8M", 2)
    d = start_daemon(roots=[model.parent])
    procs = [subprocess.Popen([str(d.bins.client), "shard", d.socket, str(model), "", str(model.parent / f"c{i}"),
                               "1/2", "uneven", "*:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    dumps = [(model.parent / f"c{i}").read_bytes() for i in range(4)]
    assert all(x == dumps[0] for x in dumps)
    wait_until(lambda: "sharded " in d.log(), what="the build's log line")
    assert d.log().count("sharded ") == 1, d.log()
    assert len(d.ls()) == 2


def test_budget_shortfall_for_the_derived_entry(start_daemon, tmp_root):
    rng = random.Random("shard/budget")
    path = tmp_root / "m.safetensors"
    write_safetensors(path, [("w", "U8", [2048, 1024], rng.randbytes(2 << 20))])
    size = path.stat().st_size
    d = start_daemon(roots=[tmp_root], host_budget=size + (256 << 10), host_pages="small")
    with d.raw() as c:
        env = c.request(wdwire.PREFETCH, wdwire.load_body(str(path), shard=wdwire.shard_body(0, 2, [("w", 0)])))
        assert env.code == "RESOURCE_EXHAUSTED", env.message
        m = re.search(r"short by (\d+) bytes", env.message)
        assert m and int(m.group(1)) == (1 << 20) - (256 << 10), env.message
        assert "rank 0/2" not in env.message or True
    # The whole entry stays, resident (once its read, which the derived entry's
    # reservation does not wait for, ended) and unleased; no shard entry is left.
    wait_until(lambda: all(e["state"] == "resident" for e in d.ls()), what="the whole entry resident")
    ls = d.ls()
    assert [(e["shard"], e["state"], e["leases"]) for e in ls] == [("", "resident", 0)]


def test_pin_and_evict_act_on_every_entry(start_daemon, tmp_root, every):
    model, _ = every
    d = start_daemon(roots=[tmp_root])
    r = d.ctl("prefetch", str(model), "--shard", "0/2", "--rule", "*.rows:0", "--json")
    assert r.returncode == 0, r.stderr.decode()
    r = d.ctl("pin", str(model))
    assert r.returncode == 0, r.stderr.decode()
    assert [e["pinned"] for e in d.ls()] == [True, True]
    r = d.ctl("evict", str(model))
    assert r.returncode == 1 and "BUSY" in r.stderr.decode() and "pinned" in r.stderr.decode()
    assert len(d.ls()) == 2
    assert d.ctl("unpin", str(model)).returncode == 0
    r = d.ctl("evict", str(model))
    assert r.returncode == 0, r.stderr.decode()
    assert d.ls() == []


def test_weightctl_shard_commands(start_daemon, tmp_root, every):
    model, files = every
    d = start_daemon(roots=[tmp_root])
    rules = ["--rule", "*.rows:0", "--rule", "*.cols:1"]
    r = d.ctl("cat", str(model), "--tensor", "F4.cols", "--shard", "1/2", *rules)
    assert r.returncode == 0, r.stderr.decode()
    dtype, shape, raw = file_tensors(files[[i for i, p in enumerate(files) if "F4.cols" in file_tensors(p)][0]])[
        "F4.cols"]
    assert r.stdout == numpy_part(raw, shape, 1, 4, 4)
    t = {x["name"]: x for x in d.ctl_json("tensors", str(model), "--shard", "2/3", "--uneven", *rules)}
    assert (t["BF16.rows"]["shape"], t["BF16.rows"]["full_shape"], t["BF16.rows"]["shard_start"]) == \
        ([4, 6, 4], [12, 6, 4], 8)
    assert (t["BF16.cols"]["shape"], t["BF16.cols"]["shard_start"]) == ([3, 2, 4], 6)
    assert t["scalar"]["full_shape"] is None
    text = d.ctl("ls").stdout.decode()
    assert "rank 2/3 uneven *.rows:0 *.cols:1" in text and "SHARD" in text
