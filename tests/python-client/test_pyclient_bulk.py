"""A lease read in bulk (keys, iteration, and every get_tensor() past the
first few) gives exactly what the safetensors library reads from the same
file: each tensor's name, dtype, shape and bytes, and its offset and size
in the file as the file's own header gives them; the tensors read one at
a time (before the bulk pass) agree with the same reference."""
import json
import struct

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import safe_open as st_open

N = 300  # more than the lease serves one at a time before its bulk pass


def _tensors():
    g = torch.Generator().manual_seed(20261207)
    kinds = [(torch.float32, (3, 5)), (torch.bfloat16, (7,)), (torch.float16, (2, 2, 3)), (torch.int8, (5,)),
             (torch.int64, (1, 3)), (torch.float32, ()), (torch.float16, (0, 4)), (torch.uint8, (3, 1, 1, 2)),
             (torch.float8_e4m3fn, (4, 2)), (torch.bool, (6,))]
    out = {}
    for i in range(N):
        dtype, shape = kinds[i % len(kinds)]
        out[f"block.{i // 7}.t{i % 7}"] = (torch.randn(shape, generator=g) * 10).to(dtype)
    return out


def _header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


@pytest.fixture
def served(start_daemon, tmp_root):
    path = tmp_root / "bulk.safetensors"
    safetensors.torch.save_file(_tensors(), path)
    return start_daemon(roots=[tmp_root]), str(path)


def _reference(path):
    data_start, header = _header(path)
    ref = {}
    with st_open(path, framework="pt") as f:
        for name in f.keys():
            sl = f.get_slice(name)
            begin, end = header[name]["data_offsets"]
            t = f.get_tensor(name)
            ref[name] = (sl.get_dtype(), tuple(sl.get_shape()), data_start + begin, end - begin,
                         t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return ref


def _bytes(a):
    if isinstance(a, torch.Tensor):
        return a.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if a.numel() else b""
    return np.ascontiguousarray(a).tobytes()


@pytest.mark.parametrize("framework", ["np", "pt"])
def test_bulk_matches_safetensors(wd, served, framework):
    daemon, path = served
    ref = _reference(path)
    assert len(ref) == N
    with wd.connect(daemon.socket) as c:
        # One at a time first (before any bulk read), then everything.
        with c.load(path, framework=framework) as lease:
            some = sorted(ref)[:5]
            for name in some:
                dtype, shape, offset, nbytes, data = ref[name]
                assert tuple(lease.info(name)) == (name, dtype, shape, 0, offset, nbytes)
                assert _bytes(lease.get_tensor(name)) == data
            assert len(lease) == N
            assert sorted(lease.keys()) == sorted(ref)
            # The files' order: by offset (empty tensors may share one).
            offsets = [ref[n][2] for n in lease.keys()]
            assert offsets == sorted(offsets)
            got = dict(lease.items())
            assert len(got) == N
            for name, a in got.items():
                dtype, shape, offset, nbytes, data = ref[name]
                info = lease.info(name)
                assert tuple(info) == (name, dtype, shape, 0, offset, nbytes), name
                assert (info.name, info.dtype, info.shape, info.file, info.offset, info.nbytes) == tuple(info)
                assert _bytes(a) == data, name
            with pytest.raises(KeyError):
                lease.get_tensor("no.such.tensor")
        # Keys first (the bulk table), then the arrays.
        with c.load(path, framework=framework) as lease:
            names = list(lease)
            assert [lease.info(n).offset for n in names] == sorted(r[2] for r in ref.values())
            for name in names:
                assert _bytes(lease[name]) == ref[name][4], name
            infos = {n: tuple(lease.info(n)) for n in names}
        # After release the infos stay.
        assert {n: tuple(lease.info(n)) for n in lease.keys()} == infos


def _ragged():
    """Tensors alike but for their first dimension, at every start modulo
    the rest's size, touching and with gaps between them, in three dtypes,
    with 0-d and 1-d ones between: what a whole-component torch lease cuts
    in groups (one split_with_sizes() a group)."""
    g = torch.Generator().manual_seed(20261208)
    out = {}
    tails = [(3,), (2, 5), (4, 1, 2), ()]
    for i in range(400):
        tail = tails[i % len(tails)]
        lead = 1 + (i * 7) % 5
        dtype = (torch.float32, torch.float16, torch.int32)[(i // 4) % 3]
        shape = (lead,) + tail if tail or i % 8 else ()
        out[f"r.{i:03d}"] = (torch.randn(shape, generator=g) * 100).to(dtype)
        if i % 3 == 0:  # one element of a wider type: moves the next start by one
            out[f"r.{i:03d}.pad"] = torch.tensor([i % 100], dtype=torch.int8 if i % 2 else torch.int16)
    return out


def test_bulk_torch_groups_match_safetensors(wd, start_daemon, tmp_root):
    path = tmp_root / "ragged.safetensors"
    safetensors.torch.save_file(_ragged(), path)
    ref = _reference(str(path))
    daemon = start_daemon(roots=[tmp_root])
    with wd.connect(daemon.socket) as c, c.load(str(path), framework="pt") as lease:
        got = dict(lease.items())
        assert sorted(got) == sorted(ref)
        storages = set()
        for name, t in got.items():
            dtype, shape, _offset, _nbytes, data = ref[name]
            assert tuple(t.shape) == shape, name
            assert t.is_contiguous(), name
            assert _bytes(t) == data, name
            if t.numel():
                storages.add(t.untyped_storage().data_ptr())
        # Every tensor is a view of the one mapping of the file.
        assert len(storages) == 1


def test_bulk_without_dtype_codes(wd, served, monkeypatch):
    """A manifest whose dtypes the library cannot number (more than 256
    distinct spellings) is read one dtype at a time: the same tensors."""
    import weightd.client

    daemon, path = served
    ref = _reference(path)
    monkeypatch.setattr(weightd.client.lib, "wd_manifest_dtype_codes",
                        lambda *args: wd.errors.ResourceExhausted.code)
    with wd.connect(daemon.socket) as c, c.load(path, framework="np") as lease:
        got = dict(lease.items())
        assert sorted(got) == sorted(ref)
        for name, a in got.items():
            dtype, shape, offset, nbytes, data = ref[name]
            assert tuple(lease.info(name)) == (name, dtype, shape, 0, offset, nbytes), name
            assert _bytes(a) == data, name
