"""Fixtures of the cluster tests; the harness is in cluster.py and netns.py.

The whole suite is skipped, with the reason, where network namespaces cannot
be made (not root, no iproute2).
"""
import os
import pathlib
import shutil
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import netns  # noqa: E402
from cluster import BUILD, Cluster, storage_dir  # noqa: E402
from harness import Bins, make_dir, run  # noqa: E402
from reference import component_tensors  # noqa: E402

# WD_IT_KEEP=1 keeps every node's folder (config, log) for a post-mortem.
KEEP = bool(os.environ.get("WD_IT_KEEP"))

# The model of most tests: 4 shards of 48 MiB of tensor data, a few hundred
# tensors each (tests/bench/make-model, fixed seed).
MODEL_SIZE, MODEL_SHARDS = "192M", 4


@pytest.fixture(scope="session")
def netns_ok():
    why = netns.unavailable()
    if why:
        pytest.skip(why)
    netns.sweep_stale()


@pytest.fixture(scope="session")
def bins(netns_ok):
    b = Bins(BUILD)
    missing = [str(p) for p in (b.weightd, b.weightctl, b.client) if not p.exists()]
    if missing:
        pytest.fail(f"not built: {', '.join(missing)} (build {BUILD} first, or set WD_BUILD)", pytrace=False)
    return b


@pytest.fixture(scope="session")
def workdir(netns_ok):
    """Sockets, configs and logs (any file system)."""
    d = make_dir("/tmp", "wd-cl-")
    yield d
    if not KEEP:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def diskdir(netns_ok):
    """Models, on a real disk."""
    d = make_dir(storage_dir(), "wd-cl-models-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Model:
    """A model made by make-model and its reference reading."""

    def __init__(self, path):
        self.path = path
        self.files = sorted(path.glob("*.safetensors"))
        self.size = sum(p.stat().st_size for p in self.files)
        self.expected = component_tensors(self.files)

    def check(self, node, expected=None):
        """Load the model through node's socket; every tensor's bytes must
        be the reference's."""
        expected = self.expected if expected is None else expected
        got = node.hash(self.path)["tensors"]
        assert sorted(got) == sorted(expected), f"node {node.name} serves other tensor names"
        bad = [n for n, t in expected.items() if got[n]["xxh3_128"] != t["xxh3_128"]]
        assert not bad, f"node {node.name}: {len(bad)} tensors differ from the files, e.g. {bad[:3]}"


@pytest.fixture(scope="session")
def models(diskdir):
    """The shared model root."""
    d = diskdir / "models"
    d.mkdir(mode=0o755)
    return d


@pytest.fixture(scope="session")
def model(models, bins):
    out = models / "m192"
    r = run([sys.executable, bins.make_model, "--quiet", "--size", MODEL_SIZE, "--shards", MODEL_SHARDS, out],
            timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    return Model(out)


@pytest.fixture
def net(netns_ok):
    n = netns.Network()
    yield n
    n.destroy()
    assert not n.leftovers(), f"namespaces left behind: {n.leftovers()}"


@pytest.fixture
def cluster(bins, workdir, models, net, request):
    """Three nodes a, b, c (not started: a test may change one first; call
    cluster.start()).  Teardown kills the daemons, then the namespaces."""
    base = make_dir(workdir, "cluster-")
    c = Cluster(bins, base, models, net)
    yield c
    errors = c.finish()
    if not KEEP:
        shutil.rmtree(base, ignore_errors=True)
    assert not errors, "\n".join(errors)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report carries every node's log."""
    outcome = yield
    rep = outcome.get_result()
    args = item.funcargs if hasattr(item, "funcargs") else {}
    c = next((v for v in args.values() if isinstance(v, Cluster)), None)
    if rep.failed and c is not None:
        for node in c:
            rep.sections.append((f"weightd log, node {node.name}", node.log()[-8000:]))
