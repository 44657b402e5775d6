"""Every checkpoint layout of the test data, served by the real daemon.

Each loadable model (and each component of the diffusers pipelines) is
loaded by wd-test-client through libweightd-client: every tensor's XXH3-128
over the mapped bytes must equal the hash of the file's bytes at the header's
offsets, and dtype and shape must equal the header.  `weightctl tensors
--json` must list exactly the file headers' tensors (name, dtype, shape,
nbytes, file and absolute offset), and `weightctl cat` must write the file's
bytes.  Layouts that cannot be served are refused with their code.
"""
import pytest

from harness import Daemon
from reference import component_tensors, tensor_bytes

# (model relative to the test data, component, files relative to the model)
LAYOUTS = [
    ("models/single.safetensors", "", [""]),
    ("models/plain", "", ["model.safetensors"]),
    ("models/sharded", "", [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]),
    ("models/diffusers", "transformer", [f"transformer/diffusion_pytorch_model-0000{i}-of-00002.safetensors"
                                         for i in (1, 2)]),
    ("models/diffusers", "vae", ["vae/diffusion_pytorch_model.safetensors"]),
    ("models/diffusers", "text_encoder", ["text_encoder/model.safetensors"]),
    ("models/diffusers", "controlnet", ["controlnet/a-part.safetensors", "controlnet/b-part.safetensors"]),
    ("models/diffusers-pickle", "vae", ["vae/diffusion_pytorch_model.safetensors"]),
    ("models/diffusers-missing-folder", "vae", ["vae/diffusion_pytorch_model.safetensors"]),
]

# Every valid corner-case file, served as a single-file model.
GOOD = ["all-dtypes", "scalars", "zero-size", "empty", "empty-meta", "unpadded", "unicode-names",
        "unicode-escaped", "key-order", "pretty-json", "many", "large-tensor"]
LAYOUTS += [(f"good/{g}.safetensors", "", [""]) for g in GOOD]

# Layouts the daemon must refuse: (model, component, code, text in the message).
REFUSED = [
    ("models/pickle-only", "", "UNSUPPORTED", "safetensors files only"),
    ("models/diffusers-pickle", "unet", "UNSUPPORTED", "pytorch_model.bin"),
    ("models/no-weights", "", "NOT_FOUND", "no safetensors weights"),
    ("models/diffusers", "", "INVALID_ARGUMENT", "name a component"),
    ("models/diffusers", "scheduler", "NOT_FOUND", "no safetensors weights"),
    ("models/diffusers", "text_encoder_2", "NOT_FOUND", "absent"),
    ("models/diffusers-missing-folder", "transformer", "NOT_FOUND", "has no folder"),
    ("models/index-missing-shard", "", "NOT_FOUND", "does not exist"),
    ("models/index-wrong-shard", "", "FORMAT_ERROR", "which does not hold it"),
    ("models/index-bad-shard", "", "FORMAT_ERROR", "runs past the end of the file"),
    ("models/index-escape", "", "FORMAT_ERROR", "is not a file name in the index's folder"),
    ("models/does-not-exist", "", "NOT_FOUND", "no such file"),
]


def _id(layout):
    return f"{layout[0]}:{layout[1]}" if layout[1] else layout[0]


def _files(testdata, model, files):
    base = testdata / model
    return [base / f if f else base for f in files]


@pytest.fixture(scope="module")
def shared_daemon(bins, workdir, testdata):
    """One daemon for the whole module: the layouts do not disturb each other."""
    d = Daemon(bins, workdir, [testdata / "models", testdata / "good"], {}).start()
    yield d
    d.finish()


@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
def test_layout_loads_with_the_files_bytes(shared_daemon, testdata, layout):
    model, component, files = layout
    expected = component_tensors(_files(testdata, model, files))
    out = shared_daemon.hash(testdata / model, component)

    assert out["files"] == len(files)
    assert sorted(out["tensors"]) == sorted(expected)
    for name, t in expected.items():
        got = out["tensors"][name]
        assert (got["dtype"], got["shape"], got["nbytes"]) == (t["dtype"], t["shape"], t["nbytes"]), name
        assert got["xxh3_128"] == t["xxh3_128"], f"{name}: the mapped bytes differ from the file"
    assert out["bytes"] == sum(p.stat().st_size for p in _files(testdata, model, files))


@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
def test_weightctl_tensors_lists_the_headers(shared_daemon, testdata, layout):
    model, component, files = layout
    expected = component_tensors(_files(testdata, model, files), with_bytes=False, library_check=False)
    args = ["tensors", str(testdata / model)] + (["--component", component] if component else [])
    listed = shared_daemon.ctl_json(*args)

    assert sorted(t["name"] for t in listed) == sorted(expected)
    assert len(listed) == len(expected)
    for t in listed:
        e = expected[t["name"]]
        assert (t["dtype"], t["shape"], t["nbytes"]) == (e["dtype"], e["shape"], e["nbytes"]), t["name"]
        assert t["file"] == e["file"], t["name"]
        assert t["offset"] == e["offset"], t["name"]
    # File order, and within a file data order.
    files_seen = [t["file"] for t in listed]
    assert files_seen == sorted(files_seen, key=[str(p) for p in _files(testdata, model, files)].index)
    for f in set(files_seen):
        offsets = [t["offset"] for t in listed if t["file"] == f]
        assert offsets == sorted(offsets)


@pytest.mark.parametrize("layout", [l for l in LAYOUTS if not l[0].startswith("good/empty")], ids=_id)
def test_weightctl_cat_writes_the_files_bytes(shared_daemon, testdata, layout):
    model, component, files = layout
    expected = component_tensors(_files(testdata, model, files), with_bytes=False, library_check=False)
    by_size = sorted(expected, key=lambda n: (expected[n]["nbytes"], n))
    # The smallest, the largest, and one from the middle.
    for name in dict.fromkeys([by_size[0], by_size[-1], by_size[len(by_size) // 2]]):
        args = ["cat", str(testdata / model), "--tensor", name] + (["--component", component] if component else [])
        r = shared_daemon.ctl(*args)
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout == tensor_bytes(expected[name]["file"], name), name


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: f"{c[0]}:{c[1]}")
def test_unservable_layout_is_refused(shared_daemon, testdata, case):
    model, component, code, text = case
    args = ["tensors", str(testdata / model)] + (["--component", component] if component else [])
    r = shared_daemon.ctl(*args)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert f"{code}:" in err and text in err, err

    r = shared_daemon.client("hash", str(testdata / model), component)
    assert r.returncode == 1
    assert f"{code}:" in r.stderr.decode() and text in r.stderr.decode()
