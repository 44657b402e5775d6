"""Client.load(model, tensors=[...]): a lease of named tensors.  It holds
exactly those tensors, in the component's order, and each one's name,
dtype, shape, offset and bytes are what the safetensors library reads from
the same file; the component stays resident whole; a name the component
lacks raises NotFound naming it and the daemon goes on serving; leases
end (none left in the daemon, no descriptor or mapping left here)."""
import json
import os

import pytest
import safetensors.torch
import torch
from safetensors import safe_open as st_open
from test_pyclient_bulk import _bytes

N = 200


def _tensors(prefix, seed):
    g = torch.Generator().manual_seed(seed)
    kinds = [(torch.float32, (3, 5)), (torch.bfloat16, (7,)), (torch.float16, (2, 2, 3)), (torch.int8, (5,)),
             (torch.float32, ()), (torch.float16, (0, 4)), (torch.uint8, (3, 1, 1, 2))]
    return {f"{prefix}.{i}.t": (torch.randn(kinds[i % 7][1], generator=g) * 10).to(kinds[i % 7][0])
            for i in range(N)}


@pytest.fixture
def served(start_daemon, tmp_root):
    """A checkpoint of two files and its index."""
    model = tmp_root / "two"
    model.mkdir()
    weight_map = {}
    for k, prefix in enumerate(("a", "b")):
        name = f"model-0000{k + 1}-of-00002.safetensors"
        t = _tensors(prefix, 20261207 + k)
        safetensors.torch.save_file(t, model / name)
        weight_map.update(dict.fromkeys(t, name))
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return start_daemon(roots=[tmp_root], host_budget="64M"), model


def _reference(model):
    ref = {}
    for k, path in enumerate(sorted(model.glob("*.safetensors"))):
        with st_open(path, framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                t = f.get_tensor(name)
                ref[name] = (k, sl.get_dtype(), tuple(sl.get_shape()),
                             t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return ref


@pytest.mark.parametrize("framework", ["np", "pt"])
def test_named_lease_matches_safetensors(wd, served, framework):
    daemon, model = served
    ref = _reference(model)
    want = ["b.199.t", "a.0.t", "b.5.t", "a.4.t", "a.5.t", "a.117.t", "b.5.t"]  # one twice, out of order
    with wd.connect(daemon.socket) as c:
        with c.load(model) as whole:
            order = list(whole)
            offsets = {n: whole.info(n).offset for n in order}
        with c.load(model, framework=framework, tensors=want) as lease:
            assert len(lease) == len(set(want))
            # The component's order, as the whole lease lists it.
            assert list(lease) == [n for n in order if n in set(want)]
            assert lease.files() == whole.files()
            for name in want:
                k, dtype, shape, data = ref[name]
                info = lease.info(name)
                assert (info.dtype, info.shape, info.file, info.offset) == (dtype, shape, k, offsets[name])
                assert _bytes(lease[name]) == data, name
                assert name in lease
            for name, a in lease.items():
                assert _bytes(a) == ref[name][3]
            assert "a.1.t" not in lease
            with pytest.raises(KeyError):
                lease["a.1.t"]
            entries = c.list()
            assert len(entries) == 1 and entries[0]["leases"] == 1
            assert entries[0]["bytes"] == sum(p.stat().st_size for p in model.glob("*.safetensors"))
        del a  # the lease ends with its last array
        assert c.status()["leases"] == 0


def test_unknown_name_raises_not_found_and_the_daemon_serves_on(wd, served):
    daemon, model = served
    with wd.connect(daemon.socket) as c:
        with pytest.raises(wd.NotFound) as e:
            c.load(model, tensors=["a.1.t", "no.such.tensor"])
        assert str(model) in str(e.value) and '"no.such.tensor"' in str(e.value)
        assert c.status()["leases"] == 0
        with c.load(model, tensors=["a.1.t"]) as lease:
            assert list(lease) == ["a.1.t"]
    with wd.connect(daemon.socket) as c:
        with c.load(model, tensors=["b.0.t"]) as lease:
            assert _bytes(lease["b.0.t"]) == _reference(model)["b.0.t"][3]


@pytest.mark.parametrize("tensors", ["a.1.t", [], [""], [1], b"a.1.t"])
def test_bad_tensors_argument(wd, served, tensors):
    daemon, model = served
    with wd.connect(daemon.socket) as c:
        with pytest.raises(wd.InvalidArgument):
            c.load(model, tensors=tensors)
        assert c.status()["leases"] == 0


def _fds():
    return len(os.listdir("/proc/self/fd"))


def _maps():
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "memfd:" in line)


def test_named_leases_end(wd, served):
    daemon, model = served
    with wd.connect(daemon.socket) as c:
        c.prefetch(model)
        fds, maps = _fds(), _maps()
        for i in range(100):
            lease = c.load(model, framework="pt" if i % 2 else "np", tensors=[f"a.{i}.t", f"b.{199 - i}.t"])
            assert len(lease) == 2
            _ = lease[f"a.{i}.t"]
            lease.release()
        del _
        assert c.status()["leases"] == 0
        assert (_fds(), _maps()) == (fds, maps)
