"""Every tensor of every generated layout, through the Python package, equals
what the safetensors library returns for the same file (numpy and torch,
every dtype), in the files' order, with the files' metadata; and without
ml_dtypes, numpy gets same-width unsigned views with the real dtype named."""
import json
import subprocess
import sys

import pytest
from safetensors import safe_open

from harness import Daemon
from oracle import ML_DTYPES, RAW, assert_np_equal, assert_pt_equal, assert_file_order, file_bytes
from test_layouts import LAYOUTS


def _id(layout):
    return f"{layout[0]}:{layout[1]}" if layout[1] else layout[0]


@pytest.fixture(scope="module")
def shared_daemon(bins, workdir, testdata):
    d = Daemon(bins, workdir, [testdata / "models", testdata / "good"], {}).start()
    yield d
    d.finish()


@pytest.fixture(scope="module")
def client(shared_daemon, client_lib):
    import weightd
    with weightd.connect(shared_daemon.socket) as c:
        yield c


@pytest.mark.parametrize("framework", ["np", "pt"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
def test_every_tensor_equals_safetensors(client, testdata, layout, framework):
    model, component, files = layout
    paths = [testdata / model / f if f else testdata / model for f in files]
    check = assert_np_equal if framework == "np" else assert_pt_equal
    with client.load(testdata / model, component or None, framework=framework) as lease:
        assert lease.files() == [str(p) for p in paths]
        assert_file_order(lease.keys(), paths)
        assert list(lease) == lease.keys() and len(lease) == len(lease.keys())
        for i, p in enumerate(paths):
            with safe_open(str(p), framework="np") as f:
                assert lease.metadata(i) == f.metadata()
            for name, (dtype, shape, _data) in file_bytes(p).items():
                assert lease.dtype(name) == dtype and lease.shape(name) == shape
                check(lease.get_tensor(name), p, name, dtype)
                assert lease.info(name).file == i


NO_ML_DTYPES = r"""
import json, sys
sys.modules["ml_dtypes"] = None      # as if it were not installed: import fails
import weightd
out = {}
with weightd.connect(sys.argv[1]) as c, c.load(sys.argv[2]) as lease:
    for name in lease:
        a = lease[name]
        out[name] = [lease.dtype(name), a.dtype.name, list(a.shape), a.tobytes().hex(), a.flags.writeable]
print(json.dumps(out))
"""


def test_numpy_without_ml_dtypes_gets_raw_unsigned_views(shared_daemon, testdata, client_lib):
    path = testdata / "good" / "all-dtypes.safetensors"
    r = subprocess.run([sys.executable, "-c", NO_ML_DTYPES, shared_daemon.socket, str(path)],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    got = json.loads(r.stdout)
    want = file_bytes(path)
    assert sorted(got) == sorted(want)
    with safe_open(str(path), framework="np") as f:
        np_ok = set()
        for name in f.keys():
            try:
                f.get_tensor(name)
                np_ok.add(name)
            except Exception:
                pass
    for name, (dtype, np_name, shape, hexdata, writeable) in got.items():
        st_dtype, st_shape, data = want[name]
        assert dtype == st_dtype and bytes.fromhex(hexdata) == data and not writeable, name
        if st_dtype in ML_DTYPES:
            assert np_name == RAW[st_dtype] and shape == st_shape, (name, np_name)
        elif name in np_ok:
            with safe_open(str(path), framework="np") as f:
                ref = f.get_tensor(name)
            assert np_name == ref.dtype.name and shape == list(ref.shape), name
        else:
            assert np_name == "uint8", name
