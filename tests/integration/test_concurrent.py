"""Eight clients load the same cold model at once: storage is read once.

The model (64 MiB of tensor data in two shards, from tests/bench/make-model)
is hashed by the test first, which leaves its headers in the page cache.
The daemon reads the data with O_DIRECT (direct_io = on), which
/proc/PID/io counts in read_bytes whatever the page cache holds, so the
daemon's read_bytes and its own storage_read_bytes must both come to the
model's size within 1% -- and not eight times that.
"""
import json
import subprocess

from harness import wait_until
from reference import component_tensors


def proc_read_bytes(pid):
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise AssertionError("no read_bytes in /proc/PID/io")


def test_eight_cold_clients_share_one_read(start_daemon, make_model):
    model = make_model("64M", 2)
    files = sorted(model.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in files)
    expected = component_tensors(files)

    # A small queue and small chunks: the load lasts long enough for every
    # client to join it.
    d = start_daemon(roots=[model.parent], direct_io="on", queue_depth=2, chunk_size="256K")
    before = proc_read_bytes(d.pid)
    assert d.status()["storage_read_bytes"] == 0

    procs = [d.spawn_client("hash", model) for _ in range(8)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        outs.append(json.loads(out))

    read = proc_read_bytes(d.pid) - before
    st = d.status()
    assert abs(st["storage_read_bytes"] - size) <= size // 100, (st["storage_read_bytes"], size)
    assert abs(read - size) <= size // 100, f"/proc/{d.pid}/io read_bytes grew by {read}, the model is {size}"

    # One load job, whatever the number of clients.
    log = d.log()
    assert log.count(f"loading {model}") == 1, log
    assert log.count(f"loaded {model}") == 1, log

    first = outs[0]["tensors"]
    for out in outs:
        assert out["tensors"] == first
    assert len({out["lease"] for out in outs}) == 8
    assert sorted(first) == sorted(expected)
    for name, t in expected.items():
        assert first[name]["xxh3_128"] == t["xxh3_128"], name
        assert (first[name]["dtype"], first[name]["shape"]) == (t["dtype"], t["shape"]), name

    # Every lease ended with its client.
    wait_until(lambda: d.status()["leases"] == 0, what="leases back to 0")
    (entry,) = d.ls()
    assert (entry["state"], entry["leases"], entry["bytes"], entry["files"]) == ("resident", 0, size, 2)


def test_load_many_reuses_the_resident_copy(start_daemon, make_model):
    """Repeated loads of a resident model read nothing more from storage."""
    model = make_model("64M", 2)
    d = start_daemon(roots=[model.parent])
    d.hash(model)
    read = d.status()["storage_read_bytes"]
    r = subprocess.run([str(d.bins.client), "load-many", d.socket, str(model), "", "200"],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    out = json.loads(r.stdout)
    assert out["loads"] == 200 and out["tensors"] > 900
    assert d.status()["storage_read_bytes"] == read
