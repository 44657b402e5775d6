"""The GPU tier where there is none: a daemon on a machine without a CUDA
driver or device (or built without CUDA) starts, says why in Status, answers
device Loads and Prefetches with UNSUPPORTED naming that reason, checks
device targets and keep_host all the same, and serves the host tier as
before.  On a machine with a GPU these tests are skipped: tests/gpu covers
the tier there."""
import pytest

import wdwire
from harness import wait_until


def gpu_reason(d):
    """The daemon's Status.gpu once the device search ended."""
    with d.raw() as c:
        wait_until(lambda: not c.status()["gpu"].startswith("starting"), what="the device search")
        return c.status()["gpu"]


@pytest.fixture
def nogpu(daemon):
    reason = gpu_reason(daemon)
    if reason == "ok":
        pytest.skip("this machine has a GPU tier: tests/gpu covers it")
    return daemon, reason


def test_status_says_why_there_is_no_gpu_tier(nogpu):
    d, reason = nogpu
    assert reason and reason != "ok"
    assert any(w in reason for w in ("CUDA", "cuda")), reason
    with d.raw() as c:
        st = c.status()
        assert st["devices"] == []
    # weightctl status shows it too.
    out = d.ctl("status").stdout.decode()
    assert reason in out, out


def test_hello_has_no_cuda_feature(nogpu):
    d, _ = nogpu
    c = wdwire.Conn(d.socket)
    try:
        env = c.request(wdwire.HELLO, wdwire.hello_body())
        assert env.code == "OK"
        features = env.reply.msg(10).strs(3)
    finally:
        c.close()
    assert "host" in features and "cuda" not in features


@pytest.mark.parametrize("target", ["cuda:0", "cuda:3", "cuda:GPU-12345678-1234-1234-1234-123456789abc"])
@pytest.mark.parametrize("body", [wdwire.LOAD, wdwire.PREFETCH])
def test_device_requests_get_unsupported_with_the_reason(nogpu, testdata, target, body):
    d, reason = nogpu
    model = str(testdata / "models" / "single.safetensors")
    with d.raw() as c:
        env = c.request(body, wdwire.load_body(model, target=target))
        assert env.code == "UNSUPPORTED", env.message
        assert "no GPU tier" in env.message and reason in env.message and target in env.message, env.message
        # Nothing was read or reserved for it, and the host tier still works.
        st = c.status()
        assert st["entries"] == 0 and st["storage_read_bytes"] == 0
        env = c.request(wdwire.LOAD, wdwire.load_body(model))
        assert env.code == "OK", env.message
        assert c.status()["entries"] == 1


@pytest.mark.parametrize("target,text", [("gpu:0", "not \"host\""), ("cuda:", "cuda:N"), ("cuda:-1", "cuda:N"),
                                         ("cuda:01", "cuda:N"), ("cuda:64", "cuda:N"), ("cuda:GPU-", "cuda:N"),
                                         ("cuda:GPU-xyz", "cuda:N"), ("CUDA:0", "cuda:N")])
def test_garbage_targets_are_invalid(nogpu, testdata, target, text):
    d, _ = nogpu
    model = str(testdata / "models" / "single.safetensors")
    with d.raw() as c:
        env = c.request(wdwire.LOAD, wdwire.load_body(model, target=target))
        assert env.code == "INVALID_ARGUMENT", env.message
        assert text in env.message, env.message


def test_host_target_and_keep_host(nogpu, testdata):
    d, _ = nogpu
    model = str(testdata / "models" / "single.safetensors")
    with d.raw() as c:
        assert c.request(wdwire.LOAD, wdwire.load_body(model, target="host")).code == "OK"
        env = c.request(wdwire.LOAD, wdwire.load_body(model, target="cuda:0", keep_host=7))
        assert env.code in ("INVALID_ARGUMENT", "UNSUPPORTED"), env.message
        env = c.request(wdwire.LOAD, wdwire.load_body(model, keep_host=9))
        assert env.code == "INVALID_ARGUMENT" and "keep_host" in env.message, env.message


def test_gpu_config_is_accepted_without_a_gpu(start_daemon):
    d = start_daemon(budget="50%", device_budgets="0:1G", keep_host="no", devices="0")
    reason = gpu_reason(d)
    assert d.running()
    if reason != "ok":
        d.wait_log("No GPU tier: " + reason)
