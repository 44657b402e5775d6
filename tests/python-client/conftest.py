"""Fixtures of the Python package's tests: the integration harness's real
daemon (tests/integration/conftest.py, reused as is), the package from the
source tree (client/python), and libweightd-client from $WD_BUILD."""
import importlib.util
import os
import pathlib
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))
sys.path.insert(0, str(REPO / "client" / "python"))  # the package under test

_spec = importlib.util.spec_from_file_location("wd_integration_fixtures", REPO / "tests" / "integration" / "conftest.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)
bins, workdir, testdata, make_model, tmp_root, start_daemon, daemon = (  # noqa: F401 (fixtures)
    _fixtures.bins, _fixtures.workdir, _fixtures.testdata, _fixtures.make_model, _fixtures.tmp_root,
    _fixtures.start_daemon, _fixtures.daemon)

from harness import BUILD  # noqa: E402

CLIENT_LIB = BUILD / "client" / "lib" / "libweightd-client.so.0"
PACKAGE = REPO / "client" / "python"
os.environ["WEIGHTD_CLIENT_LIB"] = str(CLIENT_LIB)
# Worker processes the tests start import the package from the source tree too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE), os.environ.get("PYTHONPATH")]))
# No test may reach a daemon it did not start.
os.environ["WEIGHTD_SOCKET"] = "/nonexistent/weightd-tests.sock"


@pytest.fixture(scope="session")
def client_lib():
    if not CLIENT_LIB.exists():
        pytest.fail(f"not built: {CLIENT_LIB}", pytrace=False)
    return CLIENT_LIB


@pytest.fixture
def wd(client_lib):
    import weightd
    return weightd
