"""What the daemon should serve, worked out without weightd's code.

Headers are decoded with Python's json module from the file's own bytes and
tensor bytes are sliced from the file at the header's data_offsets; the
safetensors library reads the same files as a second opinion (names, dtypes,
shapes, and the bytes of every dtype numpy can hold).
"""
import json
import os
import struct

import xxhash
from safetensors import safe_open

# Dtypes whose tensors the safetensors library can hand to numpy.
NUMPY_DTYPES = {"BOOL", "U8", "I8", "I16", "U16", "F16", "I32", "U32", "F32", "I64", "U64", "F64"}


def read_header(path):
    """(data_start, {name: entry}, metadata) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    metadata = header.pop("__metadata__", {})
    return 8 + n, header, metadata


def file_tensors(path, *, with_bytes=True, library_check=True):
    """{name: {"dtype", "shape", "nbytes", "offset", "xxh3_128", "file"}} for one file,
    cross-checked against the safetensors library."""
    start, header, _meta = read_header(path)
    out = {}
    with open(path, "rb") as f:
        for name, e in header.items():
            begin, end = e["data_offsets"]
            t = {"dtype": e["dtype"], "shape": list(e["shape"]), "nbytes": end - begin,
                 "offset": start + begin, "file": str(path)}
            if with_bytes:
                f.seek(start + begin)
                data = f.read(end - begin)
                assert len(data) == end - begin, f"{path}: {name} is cut short"
                t["xxh3_128"] = xxhash.xxh3_128_hexdigest(data)
                t["bytes"] = data if end - begin <= (1 << 20) else None
            out[name] = t

    if library_check:
        with safe_open(str(path), framework="numpy") as st:
            assert sorted(st.keys()) == sorted(out), f"{path}: the library lists other tensors"
            for name, t in out.items():
                sl = st.get_slice(name)
                assert sl.get_dtype() == t["dtype"], name
                assert list(sl.get_shape()) == t["shape"], name
                if with_bytes and t["dtype"] in NUMPY_DTYPES and t.get("bytes") is not None:
                    assert st.get_tensor(name).tobytes() == t["bytes"], f"{path}: {name}: raw read disagrees"
    return out


def component_tensors(files, **kw):
    """The union of file_tensors() over a component's files; names are unique."""
    out = {}
    for p in files:
        for name, t in file_tensors(p, **kw).items():
            assert name not in out, f"{name} in two files"
            out[name] = t
    return out


def tensor_bytes(path, name):
    start, header, _ = read_header(path)
    begin, end = header[name]["data_offsets"]
    with open(path, "rb") as f:
        f.seek(start + begin)
        return f.read(end - begin)


def write_safetensors(path, tensors, metadata=None):
    """Write a valid file: tensors is [(name, dtype, shape, data bytes)]."""
    members = {}
    if metadata is not None:
        members["__metadata__"] = metadata
    off = 0
    for name, dtype, shape, data in tensors:
        members[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(data)]}
        off += len(data)
    text = json.dumps(members, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = str(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for t in tensors:
            f.write(t[3])
    os.rename(tmp, path)
