"""weightd.load_file() side by side with safetensors.torch.load_file on
files the safetensors library wrote: the same names in the same order,
equal tensors, the signature, failures, a module's load_state_dict; the
tensors are views of the daemon's memory and keep its lease.  Also
weights_iterator() taking FastVideo's async_broadcast."""
import gc
import inspect

import pytest
import safetensors.torch
import torch

from oracle import pt_bytes


def _tensors():
    g = torch.Generator().manual_seed(20261207)
    t = {f"w.{str(d)[6:]}": torch.randn(6, 5, generator=g).to(d)
         for d in (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn)}
    t["ids"] = torch.randint(0, 100, (7,), generator=g)
    t["mask"] = torch.randint(0, 2, (3, 3), generator=g).bool()
    t["scalar"] = torch.tensor(2.5)
    t["empty"] = torch.zeros(0, 4)
    return t


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 3)
        self.b = torch.nn.Linear(3, 2)


@pytest.fixture
def paths(tmp_root):
    paths = {"tensors": tmp_root / "tensors.safetensors", "net": tmp_root / "net.safetensors",
             "missing": tmp_root / "missing.safetensors"}
    safetensors.torch.save_file(_tensors(), paths["tensors"], metadata={"format": "pt"})
    torch.manual_seed(3)
    safetensors.torch.save_file(_Net().state_dict(), paths["net"])
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture
def files(start_daemon, tmp_root, paths):
    return start_daemon(roots=[tmp_root]), paths


def _same(got, ref):
    assert list(got) == list(ref)
    for name, r in ref.items():
        g = got[name]
        assert g.dtype == r.dtype and g.shape == r.shape and g.device == r.device, name
        assert pt_bytes(g) == pt_bytes(r), name


def test_load_file_is_safetensors_load_file(files, wd):
    daemon, p = files
    ref = safetensors.torch.load_file(p["tensors"])
    got = wd.load_file(p["tensors"], socket=daemon.socket)
    _same(got, ref)
    _same(wd.load_file(p["tensors"], "cpu", backend="pread", socket=daemon.socket), ref)


def test_load_file_tensors_are_the_daemons_and_keep_the_lease(files, wd):
    daemon, p = files
    got = wd.load_file(p["tensors"], socket=daemon.socket)
    assert daemon.status()["leases"] == 1  # the handle is closed; the tensors hold the lease
    w = got["w.float32"]
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(None, 5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= w.data_ptr() < end:
                assert fields[1].startswith("r-") and fields[5].strip().startswith("/memfd:weightd:tensors"), line
                break
        else:
            pytest.fail("the tensor is in no mapping")
    del got, w
    gc.collect()
    assert daemon.status()["leases"] == 0


def test_load_state_dict_from_load_file(files, wd):
    daemon, p = files
    ref, net = _Net(), _Net()
    ref.load_state_dict(safetensors.torch.load_file(p["net"]))
    net.load_state_dict(wd.load_file(p["net"], socket=daemon.socket))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(net.b(net.a(x)), ref.b(ref.a(x)))


def test_load_file_signature(wd):
    want = inspect.signature(safetensors.torch.load_file).parameters
    got = inspect.signature(wd.load_file).parameters
    for name, param in want.items():
        assert name in got and got[name].kind == param.kind and got[name].default == param.default, name
    extra = [n for n in got if n not in want]
    assert extra == ["socket", "fallback"] and all(got[n].kind == inspect.Parameter.KEYWORD_ONLY for n in extra)


def test_load_file_failures(files, wd):
    daemon, p = files
    with pytest.raises(FileNotFoundError):
        safetensors.torch.load_file(p["missing"])
    with pytest.raises(FileNotFoundError):
        wd.load_file(p["missing"], socket=daemon.socket)
    with pytest.raises(safetensors.SafetensorError):
        safetensors.torch.load_file(p["tensors"], backend="nope")
    with pytest.raises(safetensors.SafetensorError):
        wd.load_file(p["tensors"], backend="nope", socket=daemon.socket)


def test_load_file_falls_back_without_a_daemon(paths, wd, tmp_root):
    p = paths
    sock = str(tmp_root / "nobody.sock")
    with pytest.raises(wd.Unavailable):
        wd.load_file(p["tensors"], socket=sock)
    _same(wd.load_file(p["tensors"], socket=sock, fallback=True), safetensors.torch.load_file(p["tensors"]))


def test_weights_iterator_takes_fastvideos_async_broadcast(files, wd):
    daemon, p = files
    ref = safetensors.torch.load_file(p["tensors"])
    got = dict(wd.weights_iterator([p["tensors"]], to_cpu=True, async_broadcast=True, socket=daemon.socket))
    assert sorted(got) == list(got) == sorted(ref)
    for name, r in ref.items():
        assert pt_bytes(got[name]) == pt_bytes(r), name
