"""Every malformed file of the generated corpus, served as a model, is
refused with FORMAT_ERROR and the rule bad/expected.json names, through
weightctl and through a raw Load; the daemon stays up and reads nothing."""
import json

import pytest

import wdwire
from harness import Daemon, TESTDATA_SRC

EXPECTED = sorted(json.loads((TESTDATA_SRC / "bad" / "expected.json").read_text()).items()) \
    if (TESTDATA_SRC / "bad" / "expected.json").exists() else []


@pytest.fixture(scope="module")
def corpus_daemon(bins, workdir, testdata):
    d = Daemon(bins, workdir, [testdata / "bad"], {}).start()
    yield d
    d.finish()


def test_corpus_is_not_empty():
    assert len(EXPECTED) > 50


@pytest.mark.parametrize("name,rule", EXPECTED, ids=[n for n, _ in EXPECTED])
def test_malformed_file_is_refused(corpus_daemon, testdata, name, rule):
    d = corpus_daemon
    path = str(testdata / "bad" / name)

    r = d.ctl("tensors", path)
    assert r.returncode == 1 and r.stdout == b""
    err = r.stderr.decode()
    assert "FORMAT_ERROR:" in err and rule in err and name in err, err

    with d.raw() as c:
        reply = c.request(wdwire.LOAD, wdwire.load_body(path))
        assert reply.code == "FORMAT_ERROR" and rule in reply.message, reply.message
        assert not c.fds
        st = c.status()
    assert (st["entries"], st["leases"], st["storage_read_bytes"], st["host_used_bytes"]) == (0, 0, 0, 0)
    assert d.running()
