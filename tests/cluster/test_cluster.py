"""The cluster tier: weightd nodes in their own network namespaces share
reads of one model root.

Every test compares the bytes each node serves (a Load through its socket,
every tensor hashed) with the files read by tests/integration/reference.py,
never with what a daemon says.  Storage reads are checked both in each
node's Status (storage_read_bytes, its own reads) and in /proc/PID/io
read_bytes: the nodes read with O_DIRECT, which the kernel counts there
whatever the page cache holds.

The faults (kill -9, a link down) must land while bytes are moving between
nodes.  Every link then gets a token bucket of THROTTLE (tc tbf on both ends
of each veth): with the 192 MiB model a node receives about 128 MiB from
its peers, some 3 s at 40 MB/s, whatever the disk; the test waits until a
tenth of the model has crossed, then strikes.  A throttle of the network
rather than of storage (cgroup io.max) works the same under cgroup v1 and
v2 and on any disk.
"""
import shutil
import time

import pytest

from cluster import (DEADLINE, copy_with_one_byte_changed, per_node, prefetch_results, proc_read_bytes, wait_transfer,
                     write_secret)
from reference import component_tensors

THROTTLE = "320mbit"
THROTTLE_BYTES_PER_S = 320e6 / 8
# Time to read the model from storage again, on a slow CI disk, with room.
REREAD_S = 10.0


def snapshot(cluster, names=None):
    """{node: (storage_read_bytes from Status, /proc/PID/io read_bytes,
    peer_received_bytes)}."""
    out = {}
    for n in names or [node.name for node in cluster if node.running()]:
        node = cluster[n]
        st, received, _sent = node.counters()
        out[n] = (st, proc_read_bytes(node.pid), received)
    return out


def deltas(before, after):
    return {n: tuple(a - b for a, b in zip(after[n], before[n])) for n in before}


def near(value, target, rel):
    return abs(value - target) <= rel * target


def assert_read_once(size, d, names):
    """The nodes of names read size bytes of storage between them, each
    within 10% of an equal share; both by Status and by /proc/PID/io."""
    for i, what in ((0, "Status storage_read_bytes"), (1, "/proc/PID/io read_bytes")):
        shares = {n: d[n][i] for n in names}
        total = sum(shares.values())
        assert near(total, size, 0.02), f"{what}: the nodes read {total} bytes for a model of {size}: {shares}"
        for n, v in shares.items():
            assert near(v, size / len(names), 0.10), \
                f"{what}: node {n} read {v} bytes, not about 1/{len(names)} of {size}: {shares}"


def ok_prefetch(cluster, via, model, *args):
    r = cluster.prefetch(via, model.path, *args)
    assert r.returncode == 0, f"weightctl prefetch --cluster on {via}: {r.stdout.decode()} {r.stderr.decode()}"
    return per_node(prefetch_results(r.stdout, r.stderr, r.returncode))


# ---- sharing ----------------------------------------------------------------

def test_cluster_prefetch_reads_each_byte_once(cluster, model):
    cluster.start()
    before = snapshot(cluster)
    lines = ok_prefetch(cluster, "a", model)
    assert sorted(lines) == ["a", "b", "c"], lines
    for n, line in lines.items():
        assert line["state"] == "ok", (n, line)
    after = snapshot(cluster)
    d = deltas(before, after)
    assert_read_once(model.size, d, "abc")
    # The reply's own accounting agrees with the nodes' Status.
    assert sum(line["storage_read_bytes"] for line in lines.values()) == sum(d[n][0] for n in "abc")
    for n in "abc":
        assert near(d[n][2], model.size - d[n][0], 0.02), \
            f"node {n} read {d[n][0]} and received {d[n][2]} bytes of a {model.size}-byte model"

    for node in cluster:
        model.check(node)
    # Served from the host tier: nothing more was read.
    assert [s[0] for s in snapshot(cluster).values()] == [s[0] for s in after.values()]


def test_plain_load_fetches_from_the_peer_that_holds_it(cluster, model):
    cluster.start()
    r = cluster["a"].ctl("prefetch", str(model.path))
    assert r.returncode == 0, r.stderr.decode()
    a_read = cluster["a"].status()["storage_read_bytes"]
    assert near(a_read, model.size, 0.02), (a_read, model.size)

    before = snapshot(cluster, "b")
    model.check(cluster["b"])
    d = deltas(before, snapshot(cluster, "b"))["b"]
    assert d[0] == 0, f"node b read {d[0]} bytes from storage for a model node a holds"
    assert d[1] <= model.size // 100, f"/proc/PID/io: node b read {d[1]} bytes"
    assert near(d[2], model.size, 0.02), f"node b received {d[2]} bytes from peers for {model.size}"
    assert cluster["a"].status()["storage_read_bytes"] == a_read


def test_two_nodes_asking_at_once_make_one_plan(cluster, model):
    cluster.start()
    before = snapshot(cluster)
    procs = [cluster.spawn_prefetch(n, model.path) for n in ("a", "b")]
    for n, p in zip(("a", "b"), procs):
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, f"prefetch --cluster on {n}: {out.decode()} {err.decode()}"
        for node, line in per_node(prefetch_results(out, err, p.returncode)).items():
            assert line["state"] in ("ok", "resident"), (n, node, line)
    assert_read_once(model.size, deltas(before, snapshot(cluster)), "abc")
    for node in cluster:
        model.check(node)


# ---- faults in the middle of a transfer --------------------------------------

def fault_mid_transfer(cluster, model, strike):
    """A cluster prefetch from a; strike(c) once a tenth of the model has
    crossed between nodes; a and b must end OK, with the files' bytes, within
    the deadline plus a re-read plus the throttled transfer."""
    cluster.start()
    cluster.throttle(THROTTLE)
    p = cluster.spawn_prefetch("a", model.path)
    wait_transfer(cluster, "abc", model.size // 10, p)
    t0 = time.monotonic()
    strike("c")
    allowed = DEADLINE + REREAD_S + model.size / THROTTLE_BYTES_PER_S
    try:
        out, err = p.communicate(timeout=allowed + 30)
    except Exception:
        p.kill()
        raise
    elapsed = time.monotonic() - t0
    lines = per_node(prefetch_results(out, err, p.returncode))
    for n in "ab":
        assert lines[n]["state"] == "ok", f"node {n} after the fault: {lines[n]}"
    assert lines["c"]["state"] != "ok", f"node c: {lines['c']}"
    assert elapsed <= allowed, f"the prefetch ended {elapsed:.1f} s after the fault, more than {allowed:.1f} s"
    for n in "ab":
        model.check(cluster[n])
    for n in "ab":
        cluster.wait_states(n, {"c": "down"}, timeout=DEADLINE + 5)


def test_kill9_mid_transfer(cluster, model):
    fault_mid_transfer(cluster, model, cluster.kill9)
    # It comes back as a new process, and is served correctly.
    gen = {x["name"]: x.get("generation") for x in cluster["a"].cluster_view()["nodes"]}["c"]
    cluster.restart("c")
    after = {x["name"]: x.get("generation") for x in cluster["a"].cluster_view()["nodes"]}["c"]
    assert after != gen, "node c came back with its old generation"
    model.check(cluster["c"])


def test_link_down_mid_transfer(cluster, model):
    try:
        fault_mid_transfer(cluster, model, cluster.partition)
    finally:
        cluster.heal("c")
    cluster.wait_up()


# ---- nodes that must not share ---------------------------------------------

def test_wrong_secret_is_unauthenticated(cluster, model):
    cluster.add("c", secret_file=write_secret(cluster.base / "other.key"))
    cluster.start(wait=False)
    for n in "ab":
        cluster.wait_states(n, {"ab".replace(n, ""): "up", "c": "unauthenticated"})

    before = snapshot(cluster)
    r = cluster.prefetch("a", model.path)
    lines = per_node(prefetch_results(r.stdout, r.stderr, r.returncode))
    for n in "ab":
        assert lines[n]["state"] == "ok", (n, lines[n])
    assert lines.get("c", {}).get("state") != "ok", lines.get("c")
    d = deltas(before, snapshot(cluster))
    assert_read_once(model.size, d, "ab")
    assert d["c"][0] == 0 and d["c"][2] == 0, f"node c (wrong secret) read or received bytes: {d['c']}"
    assert cluster["c"].status()["entries"] == 0
    for n in "ab":
        model.check(cluster[n])

    # Alone, it still loads: from storage, nothing from its peers.
    model.check(cluster["c"])
    d = deltas(before, snapshot(cluster))["c"]
    assert near(d[0], model.size, 0.02) and d[2] == 0, d
    assert cluster["a"].states()["c"] == "unauthenticated"


def test_node_with_a_different_file_reads_alone(cluster, model, diskdir):
    copy, victim = copy_with_one_byte_changed(model, diskdir, "mismatch", 0x5A)
    try:
        changed = component_tensors(sorted(copy.glob("*.safetensors")))
        assert changed != model.expected

        cluster.add("c", overlays={copy: model.path})
        cluster.start()
        before = snapshot(cluster)
        r = cluster.prefetch("a", model.path)
        lines = per_node(prefetch_results(r.stdout, r.stderr, r.returncode))
        for n in "ab":
            assert lines[n]["state"] == "ok", (n, lines[n])
        assert lines["c"]["state"] == "mismatch", lines["c"]
        assert victim.name in lines["c"]["message"], f"the mismatch does not say which file: {lines['c']}"
        d = deltas(before, snapshot(cluster))
        assert_read_once(model.size, d, "ab")
        assert near(d["c"][0], model.size, 0.02) and d["c"][2] == 0, f"node c: {d['c']}"
        for n in "ab":
            model.check(cluster[n])
        model.check(cluster["c"], expected=changed)
    finally:
        for node in cluster:
            node.stop()
        shutil.rmtree(copy, ignore_errors=True)


# ---- bytes damaged in flight -------------------------------------------------

def test_corrupted_chunks_are_detected_and_reread(cluster, model):
    # Test builds of weightd flip a byte in every Nth chunk they send.
    for n in "abc":
        cluster.add(n, env={"WEIGHTD_TEST_CORRUPT_CHUNKS": "3"})
    cluster.start()
    before = snapshot(cluster)
    r = cluster.prefetch("a", model.path)
    lines = per_node(prefetch_results(r.stdout, r.stderr, r.returncode))
    for n in "abc":
        assert lines[n]["state"] == "ok", (n, lines[n])
    d = deltas(before, snapshot(cluster))
    total = sum(d[n][0] for n in "abc")
    assert total > model.size, \
        f"storage reads {total} for {model.size}: no chunk was re-read (is WEIGHTD_TEST_CORRUPT_CHUNKS honoured?)"
    assert sum(d[n][2] for n in "abc") > 0, "nothing crossed between nodes"
    for node in cluster:
        model.check(node)


# ---- membership ------------------------------------------------------------

def test_sighup_adds_a_fourth_node(cluster, model):
    cluster.start()
    cluster.add("d")
    cluster["d"].start()
    for n in "abc":
        cluster.sighup(n, "abcd")
    cluster.wait_up()
    before = snapshot(cluster)
    lines = ok_prefetch(cluster, "a", model)
    assert sorted(lines) == ["a", "b", "c", "d"], lines
    for n, line in lines.items():
        assert line["state"] == "ok", (n, line)
    assert_read_once(model.size, deltas(before, snapshot(cluster)), "abcd")
    for node in cluster:
        model.check(node)


@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_secret_file_must_be_private(cluster, mode):
    """A secret readable by others is refused at start, saying which file."""
    key = write_secret(cluster.base / "loose.key")
    key.chmod(mode)
    node = cluster.add("a", secret_file=key)
    with pytest.raises(AssertionError, match="exited"):
        node.start()
    node.killed = True  # nothing to stop
    assert str(key) in node.log(), node.log()
