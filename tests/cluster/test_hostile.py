"""A node that holds the cluster's secret and misbehaves must not crash a
daemon, make it hold resources without bound, or make it serve wrong bytes.

Nodes a and b are real weightd processes; x, in a namespace of its own, is
tests/cluster/wd-hostile-node: the daemon's own mesh and data plane (it
authenticates like any node) driven by a scenario instead of the daemon's
rules.  After each scenario the real nodes must still be alive and answer,
a cluster prefetch among them must succeed with the bytes of the files (the
independent reader of tests/integration/reference.py), and once the model
is evicted each daemon must be back near its starting fds and anonymous
memory with no entry left.
"""
import os
import shutil
import subprocess
import time

import pytest

from cluster import BUILD, DEADLINE, NODE_ENV, Cluster, per_node, prefetch_results
from harness import make_dir, read_line, wait_until

HOSTILE = BUILD / "tests" / "cluster" / "wd-hostile-node"
KEEP = bool(os.environ.get("WD_IT_KEEP"))
# Growth allowed once the model is evicted: allocator caches, UCX's pools.
RSS_SLACK = 64 << 20
FD_SLACK = 4


@pytest.fixture
def hostile(bins, workdir, models, net):
    """Nodes a and b (not started), configured with a third node x that is
    the hostile program's."""
    if not HOSTILE.exists():
        pytest.fail(f"not built: {HOSTILE}", pytrace=False)
    base = make_dir(workdir, "hostile-")
    c = Cluster(bins, base, models, net, names=("a", "b"))
    c.add_namespace("x")
    for n in "ab":
        c.add(n)
    yield c
    errors = c.finish()
    if not KEEP:
        shutil.rmtree(base, ignore_errors=True)
    assert not errors, "\n".join(errors)


def resources(node):
    """(open fds, RssAnon bytes) of node's daemon."""
    fds = len(os.listdir(f"/proc/{node.pid}/fd"))
    with open(f"/proc/{node.pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
    return fds, rss


def spawn(c, scenario, model=None, linger=0, count=None):
    argv = [*c.net.exec_argv("x"), str(HOSTILE), "--node", "x", "--nodes", c.nodes_line(),
            "--secret-file", str(c.secret), "--targets", "a,b", "--scenario", scenario,
            "--deadline-ms", str(int(DEADLINE * 1000)), "--linger", str(int(linger))]
    if model is not None:
        argv += ["--root", str(c.models), "--model", str(model.path)]
    if count is not None:
        argv += ["--count", str(count)]
    # The program is a test tool: its own leaks (UCX's) are not the daemon's.
    env = {**os.environ, **NODE_ENV, "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1"}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def wait_ready(p, timeout):
    """Lines of p's stdout up to "ready"."""
    lines = []
    while True:
        line = read_line(p, timeout)
        if line is None:
            p.kill()
            out, err = p.communicate()
            raise AssertionError(f"the hostile node did not get ready: {lines} {out!r} {err.decode()[-2000:]}")
        lines.append(line)
        if line == "ready\n":
            return lines


def finish(p, timeout=60, stop=True):
    """Stop a lingering hostile node (stop), or wait for it to end; it must
    exit 0."""
    if stop and p.poll() is None:
        p.terminate()
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"wd-hostile-node exited {p.returncode}: {out.decode()} {err.decode()[-3000:]}"
    return out.decode()


def alive(c):
    for n in "ab":
        assert c[n].running(), f"node {n} died:\n{c[n].log()[-6000:]}"


def healthy(c, model, before):
    """After x left: both daemons up and serving the right bytes, then, with
    the model evicted, back near where they started."""
    alive(c)
    for n in "ab":
        c.wait_states(n, {"ab".replace(n, ""): "up", "x": "down"}, timeout=DEADLINE * 3 + 5)
    r = c.prefetch("a", model.path, "--nodes", "a,b", timeout=120)
    assert r.returncode == 0, f"prefetch --cluster after the scenario: {r.stdout.decode()} {r.stderr.decode()}"
    lines = per_node(prefetch_results(r.stdout, r.stderr, r.returncode))
    for n in "ab":
        assert lines[n]["state"] in ("ok", "resident"), (n, lines[n])
    for n in "ab":
        model.check(c[n])
    evict(c, model)
    for n in "ab":
        node = c[n]

        def settled():
            st = node.status()
            return st["entries"] == 0 and st["loading"] == 0 and st["host_used_bytes"] == 0 and st
        try:
            wait_until(settled, DEADLINE * 3, what=f"node {n} to hold nothing")
        except AssertionError:
            raise AssertionError(f"node {n} still holds something: {node.status()} {node.ls()}") from None
        fds0, rss0 = before[n]
        # The data plane closes x's endpoint in the background; a worker
        # that UCX still holds a receive on goes when UCX ends it, which on
        # a loaded machine took longer than three deadlines once.
        try:
            wait_until(lambda: resources(node)[0] <= fds0 + FD_SLACK, 20.0, interval=0.2,
                       what=f"node {n} to close what it opened for x")
        except AssertionError:
            pass
        fds, rss = resources(node)
        assert fds <= fds0 + FD_SLACK, f"node {n}: {fds} fds open, {fds0} at the start: {fd_targets(node)}"
        assert rss <= rss0 + RSS_SLACK, f"node {n}: RssAnon {rss >> 20} MiB, {rss0 >> 20} MiB at the start"


def fd_targets(node):
    out = []
    for fd in sorted(os.listdir(f"/proc/{node.pid}/fd"), key=int):
        try:
            out.append(f"{fd}:{os.readlink(f'/proc/{node.pid}/fd/{fd}')}")
        except OSError:
            pass
    return out


def evict(c, model):
    for n in "ab":
        r = c[n].ctl("evict", str(model.path))
        assert r.returncode == 0, f"evict on {n}: {r.stderr.decode()}"


def started(c, model):
    """Start a and b; a cluster prefetch among them, then an evict, open what
    a daemon keeps open (the catalog's files, the data plane's links): the
    resources measured then are the baseline."""
    c.start(wait=False)
    c.wait_up(["a", "b"])
    r = c.prefetch("a", model.path, "--nodes", "a,b", timeout=120)
    assert r.returncode == 0, f"prefetch --cluster: {r.stdout.decode()} {r.stderr.decode()}"
    evict(c, model)
    for n in "ab":
        wait_until(lambda: c[n].status()["entries"] == 0, 10, what=f"node {n} to evict")
    return {n: resources(c[n]) for n in "ab"}


# ---- scenarios --------------------------------------------------------------

def test_garbage(hostile, model):
    c = hostile
    before = started(c, model)
    p = spawn(c, "garbage", model, linger=DEADLINE * 2)
    lines = wait_ready(p, 60)
    alive(c)
    for n in "ab":
        c[n].cluster_view()
    out = "".join(lines) + finish(p)
    # Each plan started the wrong way was dropped: the next Propose of the
    # model found it free (READY), not held by a transfer that waits forever.
    for n in "ab":
        replies = [line.split()[-1] for line in out.splitlines() if line.startswith(f"{n}: propose reply")]
        assert replies == ["0"] * 5, f"node {n} answered the plans of x: {replies}\n{out}"
    assert "done:" in out, out
    healthy(c, model, before)


def test_garbage_parts(hostile, model):
    """Part plans with hostile parts (unknown or repeated nodes, 65 nodes,
    the target left out, specs out of every limit, a spec the files do not
    fit, a device nobody has), as Proposes and as PlanRequests: each
    Propose refused saying why, nothing read or reserved, both nodes
    unharmed."""
    c = hostile
    before = started(c, model)
    p = spawn(c, "garbage-parts", model, linger=DEADLINE * 4)
    lines = wait_ready(p, 60)
    deadline = time.monotonic() + 20
    while sum(" part reply " in line for line in lines) < 28 and time.monotonic() < deadline:
        line = read_line(p, max(0.1, deadline - time.monotonic()))
        if line is None:
            break
        lines.append(line)
    alive(c)
    out = "".join(lines) + finish(p)
    for n in "ab":
        parts = [line.split(" ", 4)[3:] for line in out.splitlines() if line.startswith(f"{n}: part reply")]
        assert len(parts) == 14 and all(status == "3" for status, _ in parts), f"node {n}: {parts}\n{out}"
        why = " ".join(msg for _, msg in parts)
        for words in ("not a node of the cluster", "named twice", "at most 64", "leaves this node out",
                      f"{n}: shard: world 0 is not in 1..65536", "is not below world 2",
                      "65 rules, more than the limit", "65 tensors patterns, more than the limit", "1 to 256 bytes",
                      "'*' in the pattern", "only dimensions 0 and 1", "tensors pattern", "does not divide",
                      "GPU tier"):
            assert words in why, f"node {n}: no refusal says {words!r}: {parts}"
    healthy(c, model, before)


def test_garbage_lanes(hostile, model):
    """Starts that offer hostile GPU lanes (an id of the wrong size, ranks
    that are no nodes, repeated or too many, a lane of a host plan, a
    device out of range), and LaneDowns for plans that do not exist with
    control characters in them: each plan goes on without a lane (the
    target reads the model itself), the lanes a target cannot join are
    refused back to x with the reason, and both nodes are unharmed."""
    import threading

    c = hostile
    before = started(c, model)
    p = spawn(c, "garbage-lane", model, linger=DEADLINE * 2)
    stop = threading.Event()

    def evict_often():
        # Each variant needs the model not resident on the targets.
        while not stop.is_set():
            for n in "ab":
                c[n].ctl("evict", str(model.path))
            stop.wait(0.1)
    t = threading.Thread(target=evict_often)
    t.start()
    try:
        lines = wait_ready(p, 120)
    finally:
        stop.set()
        t.join()
    alive(c)
    out = "".join(lines) + finish(p)
    assert f"lane start {5} sent" in out and "lane downs sent" in out, out
    for n in "ab":
        downs = [line for line in out.splitlines() if line.startswith(f"{n}: lane down")]
        # The wrong-sized id, the host plan's lane and the device out of
        # range are refused back; ranks that do not parse are no lane.
        assert len(downs) == 3, f"node {n}: {downs}\n{out}"
        assert any("a lane id of the wrong size" in d for d in downs), downs
        assert sum("not on the lane's device" in d for d in downs) == 2, downs
        assert "\x1b[2J" not in c[n].log(), "a peer's words reached the log unescaped"
    healthy(c, model, before)


def test_plans_left_unstarted_are_dropped(hostile, model):
    """x proposes a plan of the model, both say READY, and x never starts
    it: within a few deadlines the nodes give the reservation back (x still
    up) and a local load of the model is not stuck behind it."""
    c = hostile
    before = started(c, model)
    p = spawn(c, "unstarted", model, linger=60)
    lines = wait_ready(p, 60)
    for n in "ab":
        assert f"{n}: propose reply 0 \n" in lines, lines

    def released():
        return all(c[n].status()["loading"] == 0 for n in "ab")
    try:
        wait_until(released, DEADLINE * 4, interval=0.2, what="the proposed plans to be dropped")
    except AssertionError:
        raise AssertionError(f"with x still up: {[c[n].status() for n in 'ab']} {[c[n].ls() for n in 'ab']}") \
            from None
    finish(p)
    healthy(c, model, before)


def test_flood(hostile, model):
    c = hostile
    before = started(c, model)
    p = spawn(c, "flood", model, linger=DEADLINE * 3, count=2000)
    wait_ready(p, 120)
    alive(c)
    finish(p, timeout=120)
    healthy(c, model, before)


@pytest.mark.parametrize("scenario", ["lie-bytes", "lie-sums", "lie-index", "lie-sender", "lie-generation",
                                      "stall"])
def test_lying_source(hostile, model, scenario):
    """x coordinates a plan of the model on a and b and is one of its
    sources; the receivers must end with the files' bytes, reading what x
    owed them themselves."""
    c = hostile
    before = started(c, model)
    t0 = time.monotonic()
    p = spawn(c, scenario, model)
    out = finish(p, timeout=180, stop=False)
    elapsed = time.monotonic() - t0
    assert "started plan" in out, out
    for n in "ab":
        assert f"{n}: propose reply 0" in out, f"node {n} did not say READY: {out}"
        assert f"{n}: done 0" in out, f"node {n} did not end its part of the plan OK: {out}"
    assert elapsed < 60, f"the plan took {elapsed:.0f} s"
    alive(c)
    # What x's plan left resident must be the files' bytes.
    for n in "ab":
        model.check(c[n])
    healthy(c, model, before)


def test_participant_that_never_finishes(hostile, model):
    """x says READY to every plan and then nothing: a cluster prefetch among
    all three must still end, a and b OK and x failed, within a few deadlines
    (a coordinator fails a target it hears nothing from for twice the
    deadline; an asker whose coordinator goes silent asks another)."""
    c = hostile
    before = started(c, model)
    p = spawn(c, "participate", linger=600)
    wait_ready(p, 60)
    t0 = time.monotonic()
    r = c.prefetch("a", model.path, timeout=30 + DEADLINE * 5)
    elapsed = time.monotonic() - t0
    finish(p)
    lines = per_node(prefetch_results(r.stdout, r.stderr, r.returncode))
    for n in "ab":
        assert lines[n]["state"] == "ok", (n, lines[n])
    assert lines["x"]["state"] != "ok", lines["x"]
    assert elapsed < 30 + DEADLINE * 4, f"the prefetch took {elapsed:.1f} s"
    healthy(c, model, before)
