"""Cluster prefetches to a device, on emulated GPUs (a build with
-Dgpu_emulation=true; every node gets one emulated device, cuda:0).

Each node holds its part (the whole component or its shard) in host memory
through the plan, then copies it to its device; the test then loads it from
that device through the node's socket (the raw wire: the device slab's
descriptor, mapped) and compares every tensor with the files, read here
with json and plain reads (tests/integration's device checks), without a
byte more read from storage.  The bytes move between nodes host to host:
NCCL is not used (it cannot run without a GPU).
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from cluster import Cluster, per_node, prefetch_results
from harness import BUILD, emulated_build, make_dir, wait_until
from reference import component_tensors
from test_device_emulated import check_slab, load_ok
from test_parts import NAMES, RULES, expected_bytes, make_tp_model, node_counters
import wdwire


pytestmark = pytest.mark.skipif(not emulated_build(),
                                reason=f"{BUILD} is not built with -Dgpu_emulation=true (no emulated GPUs); a "
                                       "real GPU cluster cannot run here")


@pytest.fixture
def gpu_cluster(bins, workdir, models, net):
    base = make_dir(workdir, "parts-dev-")
    c = Cluster(bins, base, models, net, names=NAMES)
    for n in NAMES:
        c.add(n, env={"WEIGHTD_EMULATED_GPUS": "1:512M"})
    yield c
    errors = c.finish()
    assert not errors, "\n".join(errors)


@pytest.fixture(scope="module")
def dev_model(models):
    return make_tp_model(models)


def wait_gpus(cluster):
    for n in NAMES:
        wait_until(lambda n=n: cluster[n].status()["gpu"] == "ok", timeout=20, what=f"node {n}'s GPU tier")


def test_part_plan_to_devices(gpu_cluster, dev_model):
    cluster = gpu_cluster
    model, files = dev_model
    cluster.start()
    wait_gpus(cluster)
    shards = {n: (i, 4) for i, n in enumerate(NAMES)}
    storage, links, _ = expected_bytes(files, shards, RULES)
    before = node_counters(cluster)
    args = ["--nodes", ",".join(NAMES), "--device", "cuda:0"]
    args += [f"--node-shard={n}={r}/{w}" for n, (r, w) in shards.items()]
    args += [f"--rule={p}:{d}" for p, d in RULES]
    r = cluster.prefetch("a", model, *args)
    assert r.returncode == 0, f"{r.stdout.decode()} {r.stderr.decode()}"
    lines = per_node(prefetch_results(r.stdout, r.stderr, r.returncode))
    assert [lines[n]["state"] for n in NAMES] == ["ok"] * 4, lines
    after = node_counters(cluster)
    assert sum(after[n][0] - before[n][0] for n in NAMES) == storage
    assert sum(after[n][1] - before[n][1] for n in NAMES) == links

    for n, (rank, world) in shards.items():
        with cluster[n].raw() as c:
            load, fd = load_ok(c, model, target="cuda:0", shard=wdwire.shard_body(rank, world, RULES))
            assert load.int(7) == 1, f"node {n}: its shard was not resident on cuda:0"
            m, _ = check_slab(load, fd, files, 0, shard={"rank": rank, "world": world, "rules": RULES})
            m.close()
    assert {n: c[0] for n, c in node_counters(cluster).items()} == {n: after[n][0] for n in NAMES}


def test_whole_plan_to_devices_and_a_node_without_the_device(gpu_cluster, dev_model):
    """Every node the whole component on cuda:0; a node whose daemon has no
    device of that index says so and the others end OK."""
    cluster = gpu_cluster
    model, files = dev_model
    cluster.add("d")  # no emulated device: no GPU tier
    cluster.start()
    for n in "abc":
        wait_until(lambda n=n: cluster[n].status()["gpu"] == "ok", timeout=20, what=f"node {n}'s GPU tier")
    r = cluster.prefetch("b", model, "--device", "cuda:0")
    lines = per_node(prefetch_results(r.stdout, r.stderr, r.returncode))
    for n in "abc":
        assert lines[n]["state"] == "ok", (n, lines[n])
    assert lines["d"]["state"] == "failed" and "GPU" in lines["d"]["message"], lines["d"]
    for n in "abc":
        with cluster[n].raw() as c:
            load, fd = load_ok(c, model, target="cuda:0")
            assert load.int(7) == 1, f"node {n}: not resident on cuda:0"
            m, _ = check_slab(load, fd, files, 0)
            m.close()


def test_python_package_to_devices(gpu_cluster, dev_model):
    """The Python package: prefetch(cluster=True, device="cuda:0",
    node_shards=...), then each node's shard on its device."""
    cluster = gpu_cluster
    model, files = dev_model
    cluster.start()
    wait_gpus(cluster)
    root = pathlib.Path(__file__).resolve().parents[2]
    lib = root / "build" / "client" / "lib" / "libweightd-client.so.0"
    if not lib.exists():
        pytest.skip(f"{lib} is not built (tests/run builds it first)")
    script = (
        "import json, sys, weightd\n"
        "rules = [('*.q.weight', 0), ('*.o.weight', 1), ('embed', 0)]\n"
        "with weightd.connect(sys.argv[1]) as c:\n"
        "    print(json.dumps(c.prefetch(sys.argv[2], cluster=True, device='cuda:0',\n"
        "                                node_shards={'b': weightd.Shard(0, 2, rules), 'c': weightd.Shard(1, 2, rules)},\n"
        "                                node_devices={'d': 'cpu'})))\n")
    env = {**os.environ, "PYTHONPATH": str(root / "client" / "python"), "WEIGHTD_CLIENT_LIB": str(lib)}
    r = subprocess.run([sys.executable, "-c", script, cluster["a"].socket, str(model)], env=env,
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    res = json.loads(r.stdout)[""]
    assert [(x["node"], x["state"]) for x in res["nodes"]] == [("b", "ok"), ("c", "ok"), ("d", "ok")], res
    tiers = {e["tier"] for e in cluster["d"].ls() if e["model"] == str(model)}
    assert tiers == {"host"}, f"node d (node_devices cpu) holds it in {tiers}"
    for n, rank in (("b", 0), ("c", 1)):
        with cluster[n].raw() as c:
            load, fd = load_ok(c, model, target="cuda:0", shard=wdwire.shard_body(rank, 2, RULES))
            assert load.int(7) == 1, f"node {n}: its shard was not resident on cuda:0"
            m, _ = check_slab(load, fd, files, 0, shard={"rank": rank, "world": 2, "rules": RULES})
            m.close()


def test_per_node_devices(gpu_cluster, dev_model):
    """--node-device: node b copies to its cuda:1, node c stays in host
    memory, the others use --device's cuda:0."""
    cluster = gpu_cluster
    model, files = dev_model
    cluster.add("b", env={"WEIGHTD_EMULATED_GPUS": "2:512M"})
    cluster.start()
    wait_gpus(cluster)
    r = cluster.prefetch("a", model, "--nodes", "a,b,c", "--device", "cuda:0", "--node-device", "b=cuda:1",
                         "--node-device", "c=host")
    assert r.returncode == 0, f"{r.stdout.decode()} {r.stderr.decode()}"
    lines = per_node(prefetch_results(r.stdout, r.stderr, r.returncode))
    assert [lines[n]["state"] for n in "abc"] == ["ok"] * 3, lines
    for n, dev in (("a", 0), ("b", 1)):
        with cluster[n].raw() as c:
            load, fd = load_ok(c, model, target=f"cuda:{dev}")
            assert load.int(7) == 1, f"node {n}: not resident on cuda:{dev}"
            m, _ = check_slab(load, fd, files, dev)
            m.close()
    tiers = {e["tier"] for e in cluster["c"].ls() if e["model"] == str(model)}
    assert tiers == {"host"}, f"node c holds it in {tiers}, not host memory only"
    tiers = {e["tier"] for e in cluster["b"].ls() if e["model"] == str(model)}
    assert "cuda:0" not in tiers, f"node b copied to cuda:0 too: {tiers}"
    model_check = cluster["c"].hash(model)["tensors"]
    expected = component_tensors(files)
    assert {k: v["xxh3_128"] for k, v in model_check.items()} == {k: v["xxh3_128"] for k, v in expected.items()}
