"""Device loads through the Python package where there is no GPU: the
request carries the device, and the answer is weightd.Unsupported with the
reason of whichever side cannot serve it (libweightd-client without a CUDA
driver for "cuda:N", which it must translate into the device's UUID; the
daemon without a GPU tier for "cuda:GPU-<uuid>", which reaches it as is).
Nothing is read or leased for such a request.  numpy never holds device
memory.  On a machine with a GPU these tests are skipped: tests/gpu
(gpu-python.py) loads to the device there."""
import ctypes

import pytest
import torch

from harness import wait_until

ZERO_UUID = "cuda:GPU-00000000-0000-0000-0000-000000000000"


def _has_cuda_driver():
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


@pytest.fixture
def nogpu(daemon, client_lib):
    import weightd
    c = weightd.connect(daemon.socket)
    wait_until(lambda: not c.status()["gpu"].startswith("starting"), what="the daemon's device search")
    reason = c.status()["gpu"]
    if reason == "ok":
        c.close()
        pytest.skip("this machine has a GPU tier: tests/gpu covers device loads")
    yield daemon, c, reason
    c.close()


def nothing_happened(c):
    st = c.status()
    assert (st["entries"], st["leases"], st["storage_read_bytes"]) == (0, 0, 0), st


@pytest.mark.skipif(_has_cuda_driver(), reason="a CUDA driver is present: the library reaches it")
@pytest.mark.parametrize("device", ["cuda:0", "cuda:1", 0, torch.device("cuda:0"), "cuda"],
                         ids=["cuda:0", "cuda:1", "int", "torch.device", "cuda"])
def test_without_a_cuda_driver_the_library_says_so(nogpu, testdata, device):
    import weightd
    _, c, _ = nogpu
    model = testdata / "models" / "single.safetensors"
    with pytest.raises(weightd.Unsupported) as e:
        c.load(model, device=device, framework="pt")
    assert e.value.message.startswith("no CUDA driver"), e.value.message
    with pytest.raises(weightd.Unsupported, match="^UNSUPPORTED: no CUDA driver"):
        c.prefetch(model, device=device)
    with pytest.raises(weightd.Unsupported, match="no CUDA driver"):
        c.load(model, device=device, framework="pt", shard=weightd.Shard(0, 2, [("*", 0)], uneven=True))
    nothing_happened(c)


@pytest.mark.parametrize("shard", [None, {"rank": 1, "world": 2, "rules": [("*", 0)], "uneven": True}])
def test_a_device_by_uuid_reaches_the_daemon_which_has_no_gpu_tier(nogpu, testdata, shard):
    import weightd
    _, c, reason = nogpu
    model = testdata / "models" / "single.safetensors"
    for call in (lambda: c.load(model, device=ZERO_UUID, framework="pt", shard=shard),
                 lambda: c.load(model, device=ZERO_UUID, framework="torch", shard=shard),
                 lambda: c.prefetch(model, device=ZERO_UUID, shard=shard)):
        with pytest.raises(weightd.Unsupported) as e:
            call()
        msg = e.value.message
        assert "no GPU tier" in msg and reason in msg and ZERO_UUID in msg, msg
    nothing_happened(c)
    # The host tier serves as before.
    with c.load(model, framework="pt") as lease:
        assert lease.device == "cpu" and all(lease[n].device.type == "cpu" for n in lease)


def test_safe_open_and_weights_iterator_pass_the_device(nogpu, testdata):
    import weightd
    d, c, reason = nogpu
    model = testdata / "models" / "single.safetensors"
    with pytest.raises(weightd.Unsupported, match="no GPU tier"):
        weightd.safe_open(model, framework="pt", device=ZERO_UUID, socket=d.socket)
    with pytest.raises(weightd.Unsupported, match="no GPU tier"):
        list(weightd.weights_iterator([model], device=ZERO_UUID, socket=d.socket))
    if not _has_cuda_driver():
        # to_cpu=False without a device: torch's current device, which the
        # library cannot reach here.
        with pytest.raises(weightd.Unsupported, match="no CUDA driver"):
            list(weightd.weights_iterator([model], to_cpu=False, socket=d.socket))
        with pytest.raises(weightd.Unsupported, match="no CUDA driver"):
            weightd.safe_open(model, framework="pt", device="cuda:0", socket=d.socket)
    nothing_happened(c)


@pytest.mark.parametrize("device", ["cuda:0", ZERO_UUID, 0, "cuda"])
def test_numpy_cannot_hold_device_memory(nogpu, testdata, device):
    import weightd
    d, c, _ = nogpu
    model = testdata / "models" / "single.safetensors"
    with pytest.raises(weightd.InvalidArgument, match='numpy arrays live in host memory; framework="pt"'):
        c.load(model, device=device)
    with pytest.raises(weightd.InvalidArgument, match="numpy"):
        weightd.safe_open(model, framework="np", device=device, socket=d.socket)
    nothing_happened(c)


@pytest.mark.parametrize("device,text", [("gpu:0", 'not "host"'), ("cuda:x", "cuda:N"), ("CUDA:0", "cuda:N"),
                                         (-1, "not negative"), (True, "expected")])
def test_malformed_devices_are_invalid(nogpu, testdata, device, text):
    import weightd
    _, c, _ = nogpu
    with pytest.raises(weightd.InvalidArgument, match=text):
        c.load(testdata / "models" / "single.safetensors", device=device, framework="pt")
    nothing_happened(c)


@pytest.mark.parametrize("device", [None, "cpu", "host", torch.device("cpu"), "cpu:0"])
def test_host_spellings(nogpu, testdata, device):
    _, c, _ = nogpu
    with c.load(testdata / "models" / "single.safetensors", device=device, framework="pt") as lease:
        assert lease.device == "cpu"
        assert all(lease[n].device.type == "cpu" for n in lease)
