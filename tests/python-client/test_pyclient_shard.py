"""Sharded delivery through the Python package (Client.load(shard=...),
Client.prefetch(shard=...), Lease.shard_info()): every tensor of every rank
equals slicing of the tensor the safetensors library returns (numpy slicing
of its numpy tensor; for BF16, F8 and F4, which only its torch loader reads,
the same bytes sliced through torch; F6, which it cannot read, the file's
bytes), in numpy and torch; the tensors of both files, which lie in the
load's one derived slab, share one mapping while naming their own files;
errors name the tensor before anything is read; a prefetched shard is
found by the load without reading storage again.

(Named test_pyclient_shard.py, like its neighbours, so that it does not
shadow tests/integration/test_shard.py, whose helpers it loads.)
"""
import gc
import importlib.util
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import REPO
from harness import Daemon, make_dir, wait_until
from oracle import ML_DTYPES, ST_NUMPY, ST_TORCH

_spec = importlib.util.spec_from_file_location("wd_integration_shard", REPO / "tests" / "integration" / "test_shard.py")
shard_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shard_helpers)
RULES = shard_helpers.RULES  # *.rows:0 *.cols:1 *.mat:1 *.vec:0
split, rule_for, numpy_part, file_tensors = (shard_helpers.split, shard_helpers.rule_for, shard_helpers.numpy_part,
                                             shard_helpers.file_tensors)

# Same-width unsigned views torch has for viewing any dtype's bytes.
_TORCH_RAW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class Reference:
    """One file as the safetensors library returns it (numpy where it can,
    torch for the rest) and as raw bytes (for F6, which it cannot read)."""

    def __init__(self, path):
        self.path = path
        self.raw = file_tensors(path)  # name -> (dtype, shape, bytes)
        self.np, self.pt = {}, {}
        with safe_open(str(path), framework="np") as f:
            for name in f.keys():
                if self.raw[name][0] in ST_NUMPY:
                    self.np[name] = f.get_tensor(name)
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if self.raw[name][0] in ST_TORCH:
                    self.pt[name] = f.get_tensor(name)

    def part(self, name, dim, start, part):
        """(numpy array or None, torch tensor or None, bytes) of the part:
        the library's tensor sliced along dim; the bytes from that slice."""
        dtype, shape, raw = self.raw[name]
        idx = () if dim is None else (slice(None),) * dim + (slice(start, start + part),)
        a = t = None
        if name in self.np:
            a = self.np[name][idx]
            data = np.ascontiguousarray(a).tobytes()
        elif name in self.pt:
            t = self.pt[name]
            # Slice a same-width integer view (torch cannot copy every float8
            # or float4 kind), keeping the library's dtype and shape aside.
            raw_view = t.view(_TORCH_RAW[t.dtype.itemsize])[idx]
            data = raw_view.contiguous().numpy().tobytes() if raw_view.numel() else b""
            t = (t.dtype, tuple(raw_view.shape))
        else:  # F6: the file's bytes, sliced with numpy
            data = raw if dim is None else numpy_part(raw, shape, dim, start, part)
        return a, t, data


def np_bytes(a):
    return np.ascontiguousarray(a).view(np.uint8).tobytes() if a.size else b""


def pt_bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def check_lease(lease, refs, rank, world, rules, framework):
    """Every tensor of one rank's lease against the library's tensors."""
    assert lease.files() == [str(r.path) for r in refs]
    seen = set()
    for fi, ref in enumerate(refs):
        with safe_open(str(ref.path), framework="np") as f:
            assert lease.metadata(fi) == f.metadata()
        for name, (dtype, shape, _raw) in ref.raw.items():
            seen.add(name)
            assert lease.dtype(name) == dtype and lease.info(name).file == fi, name
            dim = rule_for(name, rules) if world > 1 else None
            if dim is None:
                start = part = None
                assert lease.shard_info(name) is None, name
                assert lease.shape(name) == shape, name
            else:
                start, part = split(shape[dim], rank, world)
                want_shape = list(shape)
                want_shape[dim] = part
                assert lease.shape(name) == want_shape, name
                assert lease.shard_info(name) == (dim, start, tuple(shape)), name
            a, t, data = ref.part(name, dim, start, part)
            got = lease.get_tensor(name)
            what = f"{name} ({dtype}) rank {rank}/{world}"
            if framework == "np":
                assert isinstance(got, np.ndarray) and not got.flags.writeable, what
                if a is not None:
                    assert got.dtype == a.dtype and got.shape == a.shape, (what, got.dtype, got.shape, a.shape)
                elif dtype in ML_DTYPES:
                    assert got.dtype.name == ML_DTYPES[dtype] and got.shape == t[1], (what, got.dtype, got.shape)
                else:  # packed sub-byte kinds: the packed bytes
                    assert got.dtype == np.uint8, what
                assert np_bytes(got) == data, f"{what}: bytes differ"
            else:
                assert isinstance(got, torch.Tensor) and got.device.type == "cpu", what
                if a is not None:
                    assert got.dtype == torch.from_numpy(np.empty(0, a.dtype)).dtype and tuple(got.shape) == a.shape, \
                        (what, got.dtype, got.shape, a.shape)
                elif t is not None:
                    assert (got.dtype, tuple(got.shape)) == t, (what, got.dtype, got.shape, t)
                else:
                    assert got.dtype == torch.uint8, what
                assert pt_bytes(got) == data, f"{what}: bytes differ"
    assert seen == set(lease.keys())


@pytest.fixture(scope="module")
def every(workdir):
    """The integration tests' two-file model with every dtype, and its
    reference; one daemon serves it for the module."""
    root = make_dir(workdir, "pyshard-")
    model, files = shard_helpers.make_every_dtype(root)
    return root, model, [Reference(p) for p in files]


@pytest.fixture(scope="module")
def every_daemon(bins, workdir, every):
    d = Daemon(bins, workdir, [every[0]], {}).start()
    yield d
    d.finish()


@pytest.fixture(scope="module")
def client(every_daemon, client_lib):
    import weightd
    with weightd.connect(every_daemon.socket) as c:
        yield c


@pytest.mark.parametrize("framework", ["np", "pt"])
@pytest.mark.parametrize("world,uneven", [(2, False), (3, True)])
def test_every_dtype_every_rank(client, every, world, uneven, framework):
    import weightd
    _, model, refs = every
    for rank in range(world):
        shard = weightd.Shard(rank, world, RULES, uneven=uneven)
        with client.load(model, shard=shard, framework=framework) as lease:
            assert lease.device == "cpu"
            check_lease(lease, refs, rank, world, RULES, framework)


def test_shard_as_a_dict_and_rules_as_a_mapping(client, every):
    _, model, refs = every
    with client.load(model, framework="np", shard={"rank": 1, "world": 2, "rules": dict(RULES)}) as lease:
        check_lease(lease, refs, 1, 2, RULES, "np")


def test_files_share_the_derived_slab(client, every):
    """The tensors of both files lie in one derived slab: one mapping, one
    byte array under every array, while info().file names the real file."""
    import weightd
    _, model, refs = every
    names = [(fi, n) for fi, r in enumerate(refs) for n, (_d, shape, _r) in r.raw.items() if math.prod(shape) > 0]
    assert {fi for fi, _ in names} == {0, 1}
    with client.load(model, shard=weightd.Shard(0, 2, RULES), framework="np") as lease:
        arrays = {n: lease[n] for _, n in names}
        assert {lease.info(n).file for _, n in names} == {0, 1}
        assert len({id(a.base) for a in arrays.values()}) == 1
        # Each tensor lies at its own aligned place in the one slab.
        spans = sorted((lease.info(n).offset, lease.info(n).offset + lease.info(n).nbytes) for _, n in names)
        assert all(b <= c for (_, b), (c, _) in zip(spans, spans[1:]))
        assert all(off % 256 == 0 for off, _ in spans)
    with client.load(model, shard=weightd.Shard(0, 2, RULES), framework="pt") as lease:
        ptrs = {lease[n].untyped_storage().data_ptr() for _, n in names}
        assert len(ptrs) == 1


def test_world_one_and_no_rules_are_whole_tensors(client, every):
    import weightd
    _, model, refs = every
    for shard in (weightd.Shard(0, 1, RULES), weightd.Shard(1, 2)):
        with client.load(model, shard=shard, framework="pt") as lease:
            check_lease(lease, refs, 0, 1, RULES, "pt")


def test_generated_model_world_3_against_torch_slicing(start_daemon, make_model, client_lib):
    """A generated model: each rank's part is the library's torch tensor
    sliced, and the parts put together are the tensor."""
    import weightd
    model = make_model("8M", 2)
    files = sorted(model.glob("*.safetensors"))
    rules = [("*embed_tokens.weight", 1), ("*", 0)]
    d = start_daemon(roots=[model.parent])
    refs = {}
    for p in files:
        with safe_open(str(p), framework="pt") as f:
            refs.update({n: f.get_tensor(n) for n in f.keys()})
    parts = {n: [] for n in refs}
    with weightd.connect(d.socket) as c:
        for rank in range(3):
            with c.load(model, shard=weightd.Shard(rank, 3, rules, uneven=True), framework="pt") as lease:
                assert sorted(lease.keys()) == sorted(refs)
                for name, ref in refs.items():
                    got = lease[name]
                    dim = rule_for(name, rules)
                    if ref.dim() <= dim:  # a scalar or vector the rule cannot split: an error, not here
                        raise AssertionError(f"{name}: rule dim {dim} of {ref.shape}")
                    start, part = split(ref.shape[dim], rank, 3)
                    want = ref.narrow(dim, start, part)
                    assert got.dtype == want.dtype and got.shape == want.shape, name
                    assert torch.equal(got.view(_TORCH_RAW[got.dtype.itemsize]),
                                       want.view(_TORCH_RAW[want.dtype.itemsize])), name
                    assert lease.shard_info(name) == (dim, start, tuple(ref.shape)), name
                    parts[name].append(got.clone())
        for name, ref in refs.items():
            whole = torch.cat(parts[name], dim=rule_for(name, rules))
            assert pt_bytes(whole) == pt_bytes(ref), name
    # One read of the files for every rank.
    assert d.status()["storage_read_bytes"] == sum(p.stat().st_size for p in files)


def test_not_divisible_raises_invalid_argument_naming_the_tensor(start_daemon, every, client_lib):
    import weightd
    root, model, _ = every
    d = start_daemon(roots=[root])
    with weightd.connect(d.socket) as c:
        for framework in ("np", "pt"):
            with pytest.raises(weightd.InvalidArgument) as e:
                c.load(model, shard=weightd.Shard(1, 4, RULES), framework=framework)
            assert 'tensor "' in e.value.message and '.mat"' in e.value.message, e.value.message
            assert "world 4 does not divide" in e.value.message, e.value.message
        with pytest.raises(weightd.InvalidArgument, match=r'tensor "[A-Z0-9_]+\.mat"'):
            c.prefetch(model, shard={"rank": 0, "world": 4, "rules": RULES})
        # A rule's dim beyond a tensor's, and a spec the daemon refuses.
        with pytest.raises(weightd.InvalidArgument, match=r'rule "\*\.vec:1": dim 1 is beyond'):
            c.load(model, shard=weightd.Shard(0, 2, [("*.vec", 1)]))
        with pytest.raises(weightd.InvalidArgument, match="only dimensions 0 and 1"):
            c.load(model, shard=weightd.Shard(0, 2, [("*", 2)]))
        with pytest.raises(weightd.InvalidArgument, match="rank 2 is not below world 2"):
            c.load(model, shard=weightd.Shard(2, 2, RULES))
        st = c.status()
        assert (st["storage_read_bytes"], st["entries"], st["leases"]) == (0, 0, 0)


@pytest.mark.parametrize("bad,text", [
    ({"rank": 0}, "world"),
    ({"rank": 0, "world": 2, "rules": [("*", 0)], "extra": 1}, "unknown keys"),
    ({"rank": -1, "world": 2}, "rank -1"),
    ({"rank": 0, "world": 2, "rules": [("*", -1)]}, "dim must be"),
    ({"rank": 0, "world": 2, "rules": [(b"*", 0)]}, "pattern must be a str"),
    ({"rank": 0, "world": 2, "rules": ["*"]}, "expected \\(pattern, dim\\)"),
    ({"rank": 0, "world": 2, "rules": "*:0"}, "expected \\[\\(pattern, dim\\)"),
    ((0, 2), "expected a weightd.Shard"),
])
def test_malformed_shards_are_invalid_before_any_request(client, every, bad, text):
    import weightd
    _, model, _ = every
    with pytest.raises(weightd.InvalidArgument, match=text):
        client.load(model, shard=bad)


def test_prefetch_then_load_reads_nothing_again(start_daemon, every, client_lib):
    import weightd
    root, model, refs = every
    total = sum(r.path.stat().st_size for r in refs)
    shard = weightd.Shard(1, 2, RULES)
    d = start_daemon(roots=[root])
    with weightd.connect(d.socket) as c:
        seen = []
        out = c.prefetch(model, shard=shard, progress=lambda comp, done, n: seen.append((done, n)))
        assert out == {"": {"bytes": total, "was_resident": False}}
        # (A model this small is read before the daemon reports progress.)
        assert all(done <= n for done, n in seen)
        assert c.status()["storage_read_bytes"] == total
        derived = [e for e in c.list() if e["shard"]]
        assert [e["shard"] for e in derived] == ["rank 1/2 *.rows:0 *.cols:1 *.mat:1 *.vec:0"]
        assert c.prefetch(model, shard=shard)[""]["was_resident"] is True
        with c.load(model, shard=shard, framework="pt") as lease:
            assert c.status()["storage_read_bytes"] == total
            assert [e["leases"] for e in c.list() if e["shard"]] == [1]
            check_lease(lease, refs, 1, 2, RULES, "pt")
        # The other rank is cut from the resident whole entry: no read either.
        with c.load(model, shard=weightd.Shard(0, 2, RULES)) as lease:
            check_lease(lease, refs, 0, 2, RULES, "np")
        assert c.status()["storage_read_bytes"] == total
        assert len(c.list()) == 3


@pytest.mark.parametrize("framework", ["np", "pt"])
def test_sharded_arrays_outlive_their_lease(start_daemon, every, client_lib, framework):
    import weightd
    root, model, refs = every
    d = start_daemon(roots=[root])
    with weightd.connect(d.socket) as c:
        lease = c.load(model, shard=weightd.Shard(0, 2, RULES), framework=framework)
        a = lease["F32.rows"]
        want = refs[[i for i, r in enumerate(refs) if "F32.rows" in r.raw][0]].part("F32.rows", 0, 0, 6)[2]
        lease.release()
        del lease
        gc.collect()
        assert d.status()["leases"] == 1
        got = np_bytes(a) if framework == "np" else pt_bytes(a)
        assert got == want
        del a
        gc.collect()
        wait_until(lambda: d.status()["leases"] == 0, timeout=10, what="the lease to end")
