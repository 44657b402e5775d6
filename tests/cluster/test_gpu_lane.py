"""The GPU lane: a whole plan to a device moves its chunks GPU to GPU
through a collectives communicator among the nodes' cuda:0 (on emulated
GPUs, a build with -Dgpu_emulation=true).

NCCL cannot initialise on a machine without a GPU, so the lane's backend
here is the host one (cluster/coll-host.c): the same broadcasts, over the
nodes' host links, into and out of the emulated devices' memory.  What runs
is everything around it: the communicator's id over the mesh, the ring of
staging buffers on the device, the chunks in the same order on every rank,
the checksums checked on the host copy, the fall back to the data plane
when a rank cannot join or goes away, and the reuse of a communicator.

Every node's device copy is compared with the files (read here with json
and plain reads), and the bytes over the lane with what the files' sizes
say a broadcast to every other node moves.
"""
import pytest

from cluster import Cluster, per_node, prefetch_results, wait_transfer
from harness import BUILD, emulated_build, make_dir, wait_until
from test_device_emulated import check_slab, load_ok
from test_parts import NAMES, coordinator, make_tp_model

pytestmark = pytest.mark.skipif(not emulated_build(),
                                reason=f"{BUILD} is not built with -Dgpu_emulation=true (no emulated GPUs); NCCL "
                                       "cannot initialise without a GPU")


@pytest.fixture
def lane_cluster(bins, workdir, models, net):
    base = make_dir(workdir, "lane-")
    c = Cluster(bins, base, models, net, names=NAMES)
    for n in NAMES:
        c.add(n, env={"WEIGHTD_EMULATED_GPUS": "1:512M"}, config={"chunk_size": "4M"})
    yield c
    errors = c.finish()
    assert not errors, "\n".join(errors)


@pytest.fixture(scope="module")
def lane_model(models):
    # test_parts*.py may have written it into the same models folder.
    model = models / "tp"
    if model.exists():
        return model, sorted(model.glob("*.safetensors"))
    return make_tp_model(models)


def lane_counters(cluster, names=NAMES):
    """{node: (storage read, lane sent, lane received, gpu_lane)}."""
    out = {}
    for n in names:
        st = cluster[n].status()
        view = cluster[n].cluster_view()
        out[n] = (st["storage_read_bytes"], view["lane_sent_bytes"], view["lane_received_bytes"], view["gpu_lane"])
    return out


def start(cluster, names=NAMES):
    cluster.start()
    for n in names:
        wait_until(lambda n=n: cluster[n].status()["gpu"] == "ok", timeout=20, what=f"node {n}'s GPU tier")


def check_devices(cluster, model, files, names):
    for n in names:
        with cluster[n].raw() as c:
            load, fd = load_ok(c, model, target="cuda:0")
            assert load.int(7) == 1, f"node {n}: not resident on cuda:0"
            m, _ = check_slab(load, fd, files, 0)
            m.close()


def prefetch_ok(cluster, via, model, names=NAMES):
    r = cluster.prefetch(via, model, "--device", "cuda:0")
    lines = per_node(prefetch_results(r.stdout, r.stderr, r.returncode))
    assert [lines[n]["state"] for n in names] == ["ok"] * len(names), lines
    return lines


def test_whole_plan_goes_gpu_to_gpu(lane_cluster, lane_model):
    cluster = lane_cluster
    model, files = lane_model
    total = sum(p.stat().st_size for p in files)
    start(cluster)
    before = lane_counters(cluster)
    assert {v[3] for v in before.values()} == {"host links (emulated GPUs)"}, before
    prefetch_ok(cluster, "a", model)
    after = lane_counters(cluster)
    d = {n: tuple(after[n][i] - before[n][i] for i in range(3)) for n in NAMES}
    # Storage serves each byte once; every byte is broadcast from its
    # reader to the three other nodes, and each node gets every byte it did
    # not read through the lane.
    assert sum(v[0] for v in d.values()) == total, d
    assert sum(v[1] for v in d.values()) == 3 * total, d
    for n in NAMES:
        assert d[n][2] == total - d[n][0], (n, d)
    check_devices(cluster, model, files, NAMES)


def test_second_plan_takes_the_lane_again(lane_cluster, lane_model, models):
    """A second model to the same devices: the lane of the first plan (the
    same ranks, the same device) carries it too, with the same bytes."""
    cluster = lane_cluster
    model, files = lane_model
    start(cluster)
    prefetch_ok(cluster, "b", model)
    first = lane_counters(cluster)
    # The same bytes under another folder: another component.
    other = models / "tp-again"
    other.mkdir(exist_ok=True)
    for f in files:
        (other / f.name).write_bytes(f.read_bytes())
    copies = sorted(other.glob("*.safetensors"))
    prefetch_ok(cluster, "b", other)
    second = lane_counters(cluster)
    total = sum(p.stat().st_size for p in copies)
    assert sum(second[n][1] - first[n][1] for n in NAMES) == 3 * total, (first, second)
    check_devices(cluster, other, copies, NAMES)
    for n in NAMES:
        assert "the GPU lane ended" not in cluster[n].log(), cluster[n].log()[-2000:]


def test_host_transport_moves_the_same_bytes(lane_cluster, lane_model):
    """[cluster] gpu_transport = host everywhere: no lane, the bytes go
    host to host and each node copies to its device; the same result."""
    cluster = lane_cluster
    model, files = lane_model
    total = sum(p.stat().st_size for p in files)
    for n in NAMES:
        cluster[n].cluster_settings["gpu_transport"] = "host"
        cluster[n].write_config()
    start(cluster)
    before = lane_counters(cluster)
    assert all(v[3].startswith("off ([cluster] gpu_transport = host)") for v in before.values()), before
    prefetch_ok(cluster, "c", model)
    after = lane_counters(cluster)
    assert sum(after[n][0] - before[n][0] for n in NAMES) == total
    assert all(after[n][1] == before[n][1] and after[n][2] == before[n][2] for n in NAMES), (before, after)
    check_devices(cluster, model, files, NAMES)


def test_a_rank_that_cannot_join(lane_cluster, lane_model):
    """A node without lanes (gpu_transport = host; not the plan's
    coordinator, which would offer none): it says so to the other ranks,
    which abort theirs, and the plan goes over the data plane; every node
    ends with every byte right, storage still read once."""
    cluster = lane_cluster
    model, files = lane_model
    total = sum(p.stat().st_size for p in files)
    coord = coordinator(model, NAMES)
    off = next(n for n in reversed(NAMES) if n != coord)
    cluster[off].cluster_settings["gpu_transport"] = "host"
    cluster[off].write_config()
    start(cluster)
    before = lane_counters(cluster)
    prefetch_ok(cluster, "a", model)
    after = lane_counters(cluster)
    assert sum(after[n][0] - before[n][0] for n in NAMES) == total
    assert after[off][2] == before[off][2], f"node {off} got bytes over a lane it could not join"
    assert "cannot join its GPU lane" in cluster[off].log(), cluster[off].log()[-2000:]
    for n in NAMES:
        if n != off:
            assert f"{off}: no GPU lane here" in cluster[n].log(), cluster[n].log()[-2000:]
    check_devices(cluster, model, files, NAMES)


def test_kill9_of_a_rank_mid_lane(lane_cluster, lane_model):
    """A rank killed while chunks move on the lane: the lane is aborted on
    the others, and what it did not deliver comes over the data plane (or
    from storage, for what the dead node was to read)."""
    cluster = lane_cluster
    model, files = lane_model
    start(cluster)
    cluster.throttle("48mbit")
    p = cluster.spawn_prefetch("a", model, "--device", "cuda:0")
    total = sum(f.stat().st_size for f in files)
    wait_transfer(cluster, NAMES, total // 8, p)
    cluster.kill9("c")
    out, err = p.communicate(timeout=90)
    lines = per_node(prefetch_results(out, err, p.returncode))
    live = [n for n in NAMES if n != "c"]
    for n in live:
        assert lines[n]["state"] == "ok", (n, lines)
        assert "the GPU lane ended" in cluster[n].log(), f"node {n}: the kill did not land while the lane ran"
    check_devices(cluster, model, files, live)
