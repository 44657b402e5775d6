"""The format layer against independent sources.

Every valid file of the generated test data is read by weightd's parser
(through wd-inspect) and by the reference safetensors library; names, dtypes,
shapes and metadata must agree, offsets must agree with the header decoded by
Python's own json module, and each tensor's bytes at those offsets must equal
what the library returns.  Every malformed file must be refused with the
error the corpus names; the reference library must refuse it too, except for
the rules where weightd is deliberately stricter.
"""
import json
import os
import pathlib
import struct
import subprocess

import numpy as np
import pytest
from safetensors import safe_open

DATA = pathlib.Path(os.environ.get("WD_BUILD", "build")) / "tests" / "testdata"

# Files the reference library accepts although they break a rule weightd
# enforces (duplicate keys: the library keeps the last; extra fields are
# ignored; serde_json allows a newline as padding and a leading space).
STRICTER_THAN_REFERENCE = {
    "duplicate-tensor.safetensors",
    "duplicate-metadata-key.safetensors",
    "extra-field.safetensors",
    "json-nul-escape.safetensors",
    "padding-newline.safetensors",
    "start-space.safetensors",
}

# Layout defects, not parser cases: the one deliberately broken shard.
BROKEN_SHARDS = {"index-bad-shard/model-00002-of-00002.safetensors"}


def _valid_files():
    files = sorted((DATA / "good").glob("*.safetensors"))
    for p in sorted((DATA / "models").rglob("*.safetensors")):
        if str(p.relative_to(DATA / "models")) not in BROKEN_SHARDS:
            files.append(p)
    return files


def _bad_files():
    expected = json.loads((DATA / "bad" / "expected.json").read_text())
    return sorted(expected.items())


def _inspect(wd_inspect, *args):
    return subprocess.run([str(wd_inspect), *args], capture_output=True, text=True)


def _raw_header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw, 8 + n, json.loads(raw[8 : 8 + n])


@pytest.mark.parametrize("path", _valid_files(), ids=lambda p: str(p.relative_to(DATA)))
def test_header_matches_reference(wd_inspect, path):
    res = _inspect(wd_inspect, "header", str(path))
    assert res.returncode == 0, res.stderr
    ours = json.loads(res.stdout)
    raw, data_start, header = _raw_header(path)

    with safe_open(str(path), framework="numpy") as f:
        assert sorted(t["name"] for t in ours["tensors"]) == sorted(f.keys())
        assert ours["metadata"] == (f.metadata() or {})
        for t in ours["tensors"]:
            sl = f.get_slice(t["name"])
            assert t["dtype"] == sl.get_dtype()
            assert t["shape"] == list(sl.get_shape())
            assert t["data_offsets"] == header[t["name"]]["data_offsets"]

    # Our order is the data order: sorted by offset, contiguous.
    begins = [t["data_offsets"][0] for t in ours["tensors"]]
    assert begins == sorted(begins)
    assert ours["file_size"] == len(raw)
    assert 8 + ours["header_len"] == data_start


NUMPY_DTYPES = {"BOOL", "U8", "I8", "I16", "U16", "F16", "I32", "U32", "F32", "I64", "U64", "F64", "C64"}


@pytest.mark.parametrize("path", _valid_files(), ids=lambda p: str(p.relative_to(DATA)))
def test_tensor_bytes_match_reference(wd_inspect, path):
    ours = json.loads(_inspect(wd_inspect, "header", str(path)).stdout)
    raw, data_start, _ = _raw_header(path)
    checked = 0
    with safe_open(str(path), framework="numpy") as f:
        for t in ours["tensors"]:
            if t["dtype"] not in NUMPY_DTYPES:
                continue  # numpy has no such dtype; names and shapes were checked above
            begin, end = t["data_offsets"]
            ref = np.ascontiguousarray(f.get_tensor(t["name"]))
            assert ref.tobytes() == raw[data_start + begin : data_start + end], t["name"]
            checked += 1
    if any(t["dtype"] in NUMPY_DTYPES for t in ours["tensors"]):
        assert checked > 0


@pytest.mark.parametrize("name,substring", _bad_files(), ids=[n for n, _ in _bad_files()])
def test_malformed_refused(wd_inspect, name, substring):
    path = DATA / "bad" / name
    res = _inspect(wd_inspect, "header", str(path))
    assert res.returncode == 1
    assert res.stderr.startswith("FORMAT_ERROR: ")
    assert substring in res.stderr
    assert name in res.stderr

    try:
        with safe_open(str(path), framework="numpy") as f:
            for k in f.keys():
                f.get_slice(k)
        reference_accepts = True
    except Exception:
        reference_accepts = False
    assert reference_accepts == (name in STRICTER_THAN_REFERENCE)


@pytest.mark.parametrize(
    "model,component,index",
    [
        ("sharded", None, "sharded/model.safetensors.index.json"),
        ("diffusers", "transformer", "diffusers/transformer/diffusion_pytorch_model.safetensors.index.json"),
    ],
)
def test_sharded_resolution_matches_index(wd_inspect, model, component, index):
    args = ["resolve", str(DATA / "models" / model)] + ([component] if component else [])
    res = _inspect(wd_inspect, *args)
    assert res.returncode == 0, res.stderr
    ours = json.loads(res.stdout)
    weight_map = json.loads((DATA / "models" / index).read_text())["weight_map"]
    served = {}
    for f in ours["files"]:
        for t in f["header"]["tensors"]:
            served[t["name"]] = pathlib.Path(f["path"]).name
    assert served == weight_map


@pytest.mark.parametrize(
    "model",
    ["single.safetensors", "plain", "sharded", "diffusers"],
)
@pytest.mark.parametrize("direct", ["auto", "off"])
def test_load_verifies_against_files(wd_load, model, direct):
    res = subprocess.run(
        [str(wd_load), "--json", "--verify", "--direct", direct, "--chunk-size", "64K", str(DATA / "models" / model)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["verified"] is True
    total = sum(p.stat().st_size for p in (DATA / "models" / model).rglob("*.safetensors")) if (
        DATA / "models" / model
    ).is_dir() else (DATA / "models" / model).stat().st_size
    assert out["bytes"] == total
