"""Fixtures of the integration tests; the harness itself is in harness.py."""
import os
import pathlib
import shutil
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from harness import BUILD, TESTDATA_SRC, Bins, Daemon, make_dir, run  # noqa: E402


# WD_IT_KEEP=1 keeps every daemon's folder (config, log) for a post-mortem.
KEEP = bool(os.environ.get("WD_IT_KEEP"))

@pytest.fixture(scope="session")
def bins():
    b = Bins(BUILD)
    missing = [str(p) for p in (b.weightd, b.weightctl, b.client) if not p.exists()]
    if missing:
        pytest.fail(f"not built: {', '.join(missing)} (build {BUILD} first, or set WD_BUILD)", pytrace=False)
    return b


@pytest.fixture(scope="session")
def workdir():
    d = make_dir("/tmp", "wd-it-")
    yield d
    if not KEEP:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def testdata(workdir):
    src = TESTDATA_SRC
    if not (src / "bad" / "expected.json").exists():
        pytest.fail(f"no generated test data in {src}", pytrace=False)
    dst = workdir / "data"
    for sub in ("models", "good", "bad"):
        shutil.copytree(src / sub, dst / sub, symlinks=True)
    return dst


@pytest.fixture(scope="session")
def make_model(workdir, bins):
    """make_model(size, shards): a synthetic model from tests/bench/make-model,
    made once per session, in its own folder (usable as a model root)."""
    made = {}

    def make(size, shards=2):
        key = (size, shards)
        if key not in made:
            root = make_dir(workdir, f"mm-{size}-")
            out = root / "model"
            r = run([sys.executable, bins.make_model, "--size", size, "--shards", str(shards), out], timeout=120)
            assert r.returncode == 0, r.stderr.decode()
            made[key] = out
        return made[key]

    return make


@pytest.fixture
def tmp_root(workdir):
    """An empty model root for one test."""
    d = make_dir(workdir, "root-")
    yield d
    if not KEEP:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start_daemon(bins, workdir, testdata):
    """start_daemon(roots=None, env=None, **config) -> a running Daemon.
    Default roots: the test data's models/ and good/; env: variables added to
    weightd's environment."""
    started = []

    def start(roots=None, env=None, **config):
        if roots is None:
            roots = [testdata / "models", testdata / "good"]
        d = Daemon(bins, workdir, roots, config, env)
        started.append(d)
        return d.start()

    yield start
    errors = []
    for d in started:
        try:
            d.finish()
        except AssertionError as e:
            errors.append(str(e))
        if not KEEP:
            shutil.rmtree(d.dir, ignore_errors=True)
    assert not errors, "\n".join(errors)


@pytest.fixture
def daemon(start_daemon):
    return start_daemon()
