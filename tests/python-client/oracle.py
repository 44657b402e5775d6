"""What the package must return, worked out without its code: the
safetensors library (numpy and torch), and for dtypes it cannot read, the
file's bytes at the header's offsets, read with plain Python."""
import numpy as np
import torch
from safetensors import safe_open

from reference import read_header

# Dtypes safetensors' numpy loader reads (numpy has them).
ST_NUMPY = {"BOOL", "U8", "I8", "I16", "U16", "F16", "I32", "U32", "F32", "I64", "U64", "F64", "C64"}
# Dtypes safetensors' torch loader reads.
ST_TORCH = ST_NUMPY | {"BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F4"}
# numpy dtype names with ml_dtypes, and without it (same width, unsigned).
ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
             "F8_E8M0": "float8_e8m0fnu", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz"}
RAW = {"BF16": "uint16", "F8_E4M3": "uint8", "F8_E5M2": "uint8", "F8_E8M0": "uint8",
       "F8_E4M3FNUZ": "uint8", "F8_E5M2FNUZ": "uint8"}


def file_bytes(path):
    """{name: (dtype, shape, bytes)} from the file itself."""
    start, header, _ = read_header(path)
    data = open(path, "rb").read()
    return {n: (e["dtype"], e["shape"], data[start + e["data_offsets"][0]:start + e["data_offsets"][1]])
            for n, e in header.items()}


def file_order(path):
    """Names in the file's data order."""
    _, header, _ = read_header(path)
    return [n for n, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"])]


def assert_file_order(names, paths):
    """names are the files' tensors, files in order, each file's by data
    offset (zero-size tensors at one offset may come in any order)."""
    want = []
    for i, p in enumerate(paths):
        _, header, _ = read_header(p)
        want += [(i, tuple(e["data_offsets"]), n) for n, e in header.items()]
    where = {n: (i, off) for i, off, n in want}
    assert sorted(names) == sorted(n for _, _, n in want)
    assert [where[n] for n in names] == sorted(where[n] for _, _, n in want)


def np_bytes(a):
    return np.ascontiguousarray(a).view(np.uint8).tobytes() if a.size else b""


def pt_bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_np_equal(got, path, name, dtype, raw=False):
    """got (from weightd, numpy) against safetensors and the file."""
    st_dtype, shape, data = file_bytes(path)[name]
    assert st_dtype == dtype
    assert isinstance(got, np.ndarray) and not got.flags.writeable, name
    if dtype in ST_NUMPY:
        with safe_open(str(path), framework="np") as f:
            ref = f.get_tensor(name)
        assert got.dtype == ref.dtype and got.shape == ref.shape, (name, got.dtype, got.shape, ref.dtype, ref.shape)
        assert np_bytes(got) == np_bytes(ref), name
    elif dtype in ML_DTYPES:
        with safe_open(str(path), framework="pt") as f:
            ref = f.get_tensor(name)
        want = RAW[dtype] if raw else ML_DTYPES[dtype]
        assert got.dtype.name == want and list(got.shape) == list(ref.shape), (name, got.dtype, got.shape)
        assert np_bytes(got) == pt_bytes(ref), name
    else:  # packed sub-byte kinds: the packed bytes
        assert got.dtype == np.uint8, (name, got.dtype)
        assert np_bytes(got) == data, name
    assert np_bytes(got) == data, f"{name}: differs from the file's bytes"


def assert_pt_equal(got, path, name, dtype):
    st_dtype, shape, data = file_bytes(path)[name]
    assert st_dtype == dtype
    assert isinstance(got, torch.Tensor) and got.device.type == "cpu", name
    ref = None
    if dtype in ST_TORCH:
        with safe_open(str(path), framework="pt") as f:
            try:
                ref = f.get_tensor(name)
            except Exception as e:  # F4 with an odd last dimension
                assert dtype == "F4" and "divisible by 2" in str(e), e
    if ref is not None:
        assert got.dtype == ref.dtype and got.shape == ref.shape, (name, got.dtype, got.shape, ref.dtype, ref.shape)
        assert pt_bytes(got) == pt_bytes(ref), name
    else:
        assert got.dtype == torch.uint8, (name, got.dtype)
    assert pt_bytes(got) == data, f"{name}: differs from the file's bytes"
