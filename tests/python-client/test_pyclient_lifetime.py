"""Lifetime of leases and arrays, counted by the daemon (weightctl status):
arrays outlive the Lease object and its release(); the daemon's lease ends
when the last array dies; a worker killed with SIGKILL leaves no lease."""
import gc
import signal
import subprocess
import sys

import pytest

from harness import read_line, wait_until
from oracle import assert_np_equal, assert_pt_equal, file_bytes

MODEL = "large-tensor.safetensors"


def leases(daemon):
    return daemon.status()["leases"]


def no_leases(daemon):
    gc.collect()
    wait_until(lambda: leases(daemon) == 0, timeout=10, what="the daemon's lease count to return to 0")


@pytest.fixture
def setup(daemon, testdata, client_lib):
    import weightd
    client = weightd.connect(daemon.socket)
    yield daemon, client, testdata / "good" / MODEL
    client.close()


CHECK = {"np": assert_np_equal, "pt": assert_pt_equal}


@pytest.mark.parametrize("framework", ["np", "pt"])
def test_arrays_outlive_the_lease_object(setup, framework):
    daemon, client, path = setup
    lease = client.load(path, framework=framework)
    arrays = {n: lease[n] for n in lease}
    del lease
    gc.collect()
    assert leases(daemon) == 1
    for name, (dtype, _, _) in file_bytes(path).items():
        CHECK[framework](arrays[name], path, name, dtype)
    arrays.popitem()
    gc.collect()
    assert leases(daemon) == 1, "the lease ended while arrays still live"
    del arrays
    no_leases(daemon)


@pytest.mark.parametrize("framework", ["np", "pt"])
def test_release_while_arrays_live_keeps_them_valid(setup, framework):
    daemon, client, path = setup
    lease = client.load(path, framework=framework)
    w = lease["embed.weight"]
    lease.release()
    import weightd
    with pytest.raises(weightd.Error, match="released"):
        lease.get_tensor("norm.weight")
    gc.collect()
    assert leases(daemon) == 1
    CHECK[framework](w, path, "embed.weight", "F16")
    rows = file_bytes(path)["embed.weight"][2][3 * 4096:5 * 4096]  # rows 3 and 4: 2048 F16 each
    view = w[3:5]  # a view of a view keeps the mapping too
    del w
    gc.collect()
    assert leases(daemon) == 1
    assert bytes(memoryview(view.numpy() if framework == "pt" else view).cast("B")) == rows
    del view
    no_leases(daemon)


def test_context_manager_without_arrays_ends_the_lease_at_once(setup):
    daemon, client, path = setup
    with client.load(path) as lease:
        assert len(lease) == 4
        assert leases(daemon) == 1
    assert leases(daemon) == 0


def test_closed_client_keeps_its_leases_working(setup):
    daemon, client, path = setup
    lease = client.load(path, framework="pt")
    t = lease["embed.weight"]
    client.close()
    del lease
    gc.collect()
    assert leases(daemon) == 1
    assert_pt_equal(t, path, "embed.weight", "F16")
    del t
    no_leases(daemon)


WORKER = r"""
import sys, time, weightd
c = weightd.connect(sys.argv[1])
lease = c.load(sys.argv[2], framework="pt")
arrays = [lease[n] for n in lease]
print("ready", flush=True)
time.sleep(600)
"""


def test_sigkill_worker_leaves_no_lease(daemon, testdata, client_lib):
    p = subprocess.Popen([sys.executable, "-c", WORKER, daemon.socket, str(testdata / "good" / MODEL)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    daemon.children.append(p)
    assert read_line(p, 60) == "ready\n", p.stderr.read1().decode() if p.poll() is not None else ""
    assert leases(daemon) == 1
    p.send_signal(signal.SIGKILL)
    assert p.wait(10) == -signal.SIGKILL
    no_leases(daemon)
