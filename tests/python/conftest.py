"""Shared fixtures: where the built tools and the generated test data are."""
import os
import pathlib

import pytest


def _env_path(name):
    value = os.environ.get(name)
    if not value:
        pytest.exit(f"{name} is not set: run the Python tests through tests/run", returncode=2)
    return pathlib.Path(value)


@pytest.fixture(scope="session")
def build_dir():
    return _env_path("WD_BUILD")


@pytest.fixture(scope="session")
def testdata(build_dir):
    return build_dir / "tests" / "testdata"


@pytest.fixture(scope="session")
def wd_inspect(build_dir):
    return build_dir / "daemon" / "tools" / "wd-inspect"


@pytest.fixture(scope="session")
def wd_load(build_dir):
    return build_dir / "daemon" / "tools" / "wd-load"
