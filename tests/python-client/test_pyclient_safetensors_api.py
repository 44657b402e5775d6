"""weightd.safe_open() and weightd.weights_iterator() against the
safetensors library: the same names in the same order, equal tensors,
slices of dimension 0, metadata; fallback when no daemon answers; and the
package installs with pip from the source tree."""
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open as st_open

from oracle import pt_bytes

FILES = ["models/sharded/model-00001-of-00003.safetensors", "models/sharded/model-00002-of-00003.safetensors",
         "models/sharded/model-00003-of-00003.safetensors", "good/all-dtypes.safetensors",
         "good/unicode-names.safetensors", "good/unpadded.safetensors", "good/many.safetensors"]


def _same(got, ref):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if isinstance(ref, torch.Tensor):
        assert pt_bytes(got) == pt_bytes(ref)
    else:
        assert got.tobytes() == ref.tobytes()


def _reference(files):
    """FastVideo's safetensors_weights_iterator(files, to_cpu=True), spelled out."""
    for f in files:
        with st_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


def test_weights_iterator_matches_safetensors(daemon, testdata, wd):
    files = [testdata / f for f in FILES if "all-dtypes" not in f]  # F6 is beyond safetensors
    got = list(wd.weights_iterator(files, socket=daemon.socket))
    ref = list(_reference(files))
    assert [n for n, _ in got] == [n for n, _ in ref]
    for (name, g), (_, r) in zip(got, ref):
        _same(g, r)
    del got, g, r  # the last tensors: now no array refers to a lease
    import gc
    gc.collect()
    assert daemon.status()["leases"] == 0


def test_weights_iterator_every_dtype(daemon, testdata, wd):
    path = testdata / "good" / "all-dtypes.safetensors"
    got = dict(wd.weights_iterator([path], socket=daemon.socket))
    with st_open(str(path), framework="pt") as st:
        assert list(got) == st.keys()
        for name in st.keys():
            try:
                ref = st.get_tensor(name)
            except Exception:
                continue  # F6: checked against the file's bytes in test_pyclient_oracle
            _same(got[name], ref)


@pytest.mark.parametrize("framework", ["np", "pt"])
@pytest.mark.parametrize("rel", ["good/large-tensor.safetensors", "good/key-order.safetensors",
                                 "models/single.safetensors", "good/empty.safetensors"])
def test_safe_open_matches_safetensors(daemon, testdata, wd, framework, rel):
    path = str(testdata / rel)
    with wd.safe_open(path, framework=framework, socket=daemon.socket) as f, st_open(path, framework=framework) as ref:
        assert f.served_by_weightd
        assert f.keys() == ref.keys()
        assert f.offset_keys() == ref.offset_keys()
        assert f.metadata() == ref.metadata()
        for name in ref.keys():
            _same(f.get_tensor(name), ref.get_tensor(name))
            s, rs = f.get_slice(name), ref.get_slice(name)
            assert s.get_shape() == rs.get_shape() and s.get_dtype() == rs.get_dtype()
            if rs.get_shape():
                n = rs.get_shape()[0]
                for sl in [slice(0, n // 2), slice(n // 2, n)] + ([slice(1, None)] if n > 1 else []):
                    _same(s[sl], rs[sl])
        with pytest.raises(KeyError):
            f.get_tensor("no-such-tensor")


def test_safe_open_without_daemon_says_so_and_falls_back(testdata, wd, tmp_root):
    path = str(testdata / "good" / "large-tensor.safetensors")
    sock = tmp_root / "none.sock"
    with pytest.raises(wd.Unavailable, match="fallback=True"):
        wd.safe_open(path, socket=sock)
    with wd.safe_open(path, framework="pt", socket=sock, fallback=True) as f, st_open(path, framework="pt") as ref:
        assert not f.served_by_weightd
        assert f.keys() == ref.keys()
        _same(f.get_tensor("embed.weight"), ref.get_tensor("embed.weight"))
    got = list(wd.weights_iterator([path], socket=sock, fallback=True))
    assert [n for n, _ in got] == [n for n, _ in _reference([path])]


def test_safe_open_outside_the_roots(daemon, testdata, wd, tmp_root):
    import shutil
    path = tmp_root / "m.safetensors"
    shutil.copy(testdata / "good" / "many.safetensors", path)
    with pytest.raises(wd.PermissionDenied):
        wd.safe_open(path, socket=daemon.socket)
    with pytest.raises(wd.PermissionDenied):
        wd.safe_open(path, socket=daemon.socket, fallback=True)  # a daemon answered
    with wd.safe_open(path, socket=daemon.socket, fallback="always") as f, st_open(str(path), framework="np") as ref:
        assert not f.served_by_weightd and f.keys() == ref.keys()


def test_pip_installs_the_package(daemon, testdata, tmp_root):
    from conftest import PACKAGE
    import shutil
    target = tmp_root / "site"
    src = tmp_root / "src"  # a copy: building leaves weightd.egg-info next to pyproject.toml
    shutil.copytree(PACKAGE, src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(target), str(src)], capture_output=True, timeout=300,
                       cwd=tmp_root)
    assert r.returncode == 0, r.stderr.decode()
    script = ("import sys, weightd; assert weightd.__file__.startswith(sys.argv[1]), weightd.__file__;"
              "c = weightd.connect(sys.argv[2]); l = c.load(sys.argv[3]);"
              "print(weightd.__version__, sorted(l.keys()))")
    import os
    env = dict(os.environ, PYTHONPATH=str(target))
    r = subprocess.run([sys.executable, "-c", script, str(target), daemon.socket,
                        str(testdata / "models" / "single.safetensors")], capture_output=True, timeout=60,
                       env=env, cwd=tmp_root)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == "0.2.0 ['bias', 'weight']\n"
