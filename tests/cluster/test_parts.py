"""Part plans: each node of a cluster prefetch serves its own shard, and
moves only the bytes it serves.

The expectations are computed here from the files' headers (json and
arithmetic, not weightd's code): for every node, the byte ranges of the
slices its shard takes, rounded out to 4 KiB blocks (O_DIRECT's unit); a
block that one node needs must be read by that node and cross no link; a
block that k nodes need must be read once and cross k - 1 links.  The
bytes each node then serves (a sharded Load through its socket, dumped)
are compared with numpy slicing of the files (tests/integration's shard
check), and the Load must read nothing more from storage.
"""
import json
import os
import pathlib
import random
import subprocess
import sys

import pytest

from cluster import Cluster, per_node, prefetch_results, wait_transfer
from harness import make_dir, wait_until
from reference import component_tensors, read_header, write_safetensors
from test_shard import check_rank, rule_for, split, takes

BLOCK = 4096
RULES = [("*.q.weight", 0), ("*.o.weight", 1), ("embed", 0)]
NAMES = ("a", "b", "c", "d")


def make_tp_model(root):
    """Two files: per layer a dim-0 and a dim-1 split (rows of 16 KiB, so
    a rank's slices are separate reads) and a small tensor no rule splits."""
    rng = random.Random("cluster/parts")
    model = root / "tp"
    model.mkdir()
    for f in range(2):
        tensors = []
        for i in range(4 * f, 4 * f + 4):
            tensors.append((f"layers.{i}.q.weight", "F16", [512, 2048], rng.randbytes(512 * 2048 * 2)))
            tensors.append((f"layers.{i}.o.weight", "F16", [256, 8192], rng.randbytes(256 * 8192 * 2)))
            tensors.append((f"layers.{i}.norm.weight", "F32", [2048], rng.randbytes(2048 * 4)))
        if f == 1:
            tensors.append(("embed", "F16", [4096, 1024], rng.randbytes(4096 * 1024 * 2)))
        write_safetensors(model / f"model-0000{f + 1}-of-00002.safetensors", tensors, {"format": "pt"})
    return model, sorted(model.glob("*.safetensors"))


def node_blocks(path, rank, world, rules, tensors=None):
    """The 4 KiB blocks of path that a node serving rank/world (of the
    tensors the patterns match: all when None) needs."""
    start, header, _ = read_header(path)
    size = path.stat().st_size
    blocks = set()

    def add(begin, end):
        if end > begin:
            blocks.update(range(begin // BLOCK, (end + BLOCK - 1) // BLOCK))

    for name, e in header.items():
        if not takes(name, tensors):
            continue
        b, end = e["data_offsets"]
        b += start
        end += start
        shape = e["shape"]
        dim = rule_for(name, rules) if world > 1 else None
        if dim is None:
            add(b, end)
            continue
        row = (end - b) // shape[0]  # bytes per index of dim 0
        first, part = split(shape[dim], rank, world)
        if dim == 0:
            add(b + first * row, b + (first + part) * row)
        else:
            per = row // shape[1]
            for r in range(shape[0]):
                add(b + r * row + first * per, b + r * row + (first + part) * per)
    return {k for k in blocks if k * BLOCK < size}


def expected_bytes(files, shards, rules):
    """(storage bytes, link bytes, {node: bytes it needs}) for shards
    {node: (rank, world)} or {node: (rank, world, tensors patterns)}."""
    storage = links = 0
    need = {n: 0 for n in shards}
    for path in files:
        size = path.stat().st_size
        per = {n: node_blocks(path, sh[0], sh[1], rules, sh[2] if len(sh) > 2 else None) for n, sh in shards.items()}
        for k in set().union(*per.values()):
            length = min(BLOCK, size - k * BLOCK)
            users = [n for n in per if k in per[n]]
            storage += length
            links += (len(users) - 1) * length
            for n in users:
                need[n] += length
    return storage, links, need


@pytest.fixture
def cluster4(bins, workdir, models, net):
    base = make_dir(workdir, "parts-")
    c = Cluster(bins, base, models, net, names=NAMES)
    yield c
    errors = c.finish()
    assert not errors, "\n".join(errors)


@pytest.fixture(scope="module")
def tp_model(models):
    return make_tp_model(models)


def node_counters(cluster):
    return {n.name: n.counters() for n in cluster}


def test_tensor_parallel_split_reads_the_union_once(cluster4, tp_model, tmp_path):
    cluster = cluster4
    model, files = tp_model
    cluster.start()
    shards = {n: (i, 4) for i, n in enumerate(NAMES)}
    storage, links, need = expected_bytes(files, shards, RULES)
    total = sum(p.stat().st_size for p in files)
    # Every byte is some rank's (the header's blocks hold tensor data too).
    # Dim-0 slices are one node's; a dim-1 slice's edge blocks are shared
    # with the next rank's: links carry less than one copy of the model,
    # where sending every byte to every node would carry three.
    assert storage == total and links < total, (storage, links, total)

    before = node_counters(cluster)
    args = ["--nodes", ",".join(NAMES)] + [f"--node-shard={n}={r}/{w}" for n, (r, w) in shards.items()]
    args += [f"--rule={p}:{d}" for p, d in RULES]
    r = cluster.prefetch("a", model, *args)
    assert r.returncode == 0, f"{r.stdout.decode()} {r.stderr.decode()}"
    lines = per_node(prefetch_results(r.stdout, r.stderr, r.returncode))
    assert sorted(lines) == list(NAMES), lines
    for n, line in lines.items():
        assert line["state"] == "ok", (n, line)
    after = node_counters(cluster)
    read = {n: after[n][0] - before[n][0] for n in NAMES}
    received = {n: after[n][1] - before[n][1] for n in NAMES}
    sent = {n: after[n][2] - before[n][2] for n in NAMES}

    # Storage: the union of the shards' blocks, once; links: only blocks
    # more than one node needs, once to each other node that needs them.
    assert sum(read.values()) == storage, (read, storage)
    assert sum(received.values()) == links, (received, links)
    assert sum(sent.values()) == links, (sent, links)
    for n in NAMES:
        assert read[n] + received[n] == need[n], f"node {n}: read {read[n]} + received {received[n]}, needs {need[n]}"
    # The reply's accounting agrees with the nodes' Status.
    assert sum(line["storage_read_bytes"] for line in lines.values()) == storage

    # Each node serves its shard, equal to numpy slicing of the files,
    # without reading anything more.
    for i, n in enumerate(NAMES):
        node = cluster[n]
        out = tmp_path / f"{n}.dump"
        args = [f"{i}/4"] + [f"{p}:{d}" for p, d in RULES]
        r = node.client("shard", str(model), "", str(out), *args)
        assert r.returncode == 0, r.stderr.decode()
        check_rank(json.loads(r.stdout), out.read_bytes(), files, i, 4, RULES)
    assert {n: c[0] for n, c in node_counters(cluster).items()} == {n: after[n][0] for n in NAMES}

    # Nothing but the shard stays: the staging memory went.
    def only_shards():
        for i, n in enumerate(NAMES):
            entries = [e for e in cluster[n].ls() if e["model"] == str(model)]
            if [e["shard"] for e in entries] != [f"rank {i}/4 " + " ".join(f"{p}:{d}" for p, d in RULES)]:
                return False
        return True
    wait_until(only_shards, timeout=10, what="each node to hold its shard only")


def test_mixed_plan_whole_and_shards(cluster4, tp_model, tmp_path):
    """One node serves the whole component, two serve halves, one nothing:
    the whole node reads or receives everything; the half nodes only theirs."""
    cluster = cluster4
    model, files = tp_model
    cluster.start()
    shards = {"b": (0, 2), "c": (1, 2)}
    storage, links, need = expected_bytes(files, {**shards, "a": (0, 1)}, RULES)
    total = sum(p.stat().st_size for p in files)
    assert storage == total

    before = node_counters(cluster)
    args = ["--nodes", "a,b,c"] + [f"--node-shard={n}={r}/{w}" for n, (r, w) in shards.items()]
    args += [f"--rule={p}:{d}" for p, d in RULES]
    r = cluster.prefetch("d", model, *args)
    assert r.returncode == 0, f"{r.stdout.decode()} {r.stderr.decode()}"
    lines = per_node(prefetch_results(r.stdout, r.stderr, r.returncode))
    assert sorted(lines) == ["a", "b", "c"], lines
    after = node_counters(cluster)
    read = {n: after[n][0] - before[n][0] for n in NAMES}
    received = {n: after[n][1] - before[n][1] for n in NAMES}
    assert read["d"] == 0 and received["d"] == 0
    assert sum(read.values()) == total
    assert sum(received.values()) == links
    for n in "abc":
        assert read[n] + received[n] == need[n], (n, read[n], received[n], need[n])

    model_check = cluster["a"].hash(model)["tensors"]
    expected = component_tensors(files)
    assert {k: v["xxh3_128"] for k, v in model_check.items()} == {k: v["xxh3_128"] for k, v in expected.items()}
    for n, (rank, world) in shards.items():
        out = tmp_path / f"{n}.dump"
        r = cluster[n].client("shard", str(model), "", str(out), f"{rank}/{world}", *[f"{p}:{d}" for p, d in RULES])
        assert r.returncode == 0, r.stderr.decode()
        check_rank(json.loads(r.stdout), out.read_bytes(), files, rank, world, RULES)


def test_bad_part_is_refused_naming_the_tensor(cluster4, tp_model):
    """A rule the tensors do not fit: every node refuses before reading, the
    message names the file, the tensor and the rule, and the cluster serves
    the next plan."""
    cluster = cluster4
    model, files = tp_model
    cluster.start()
    before = node_counters(cluster)
    r = cluster.prefetch("a", model, "--nodes", "a,b", "--node-shard=a=0/3", "--node-shard=b=1/3",
                         "--rule=*.norm.weight:1")
    out = r.stdout.decode() + r.stderr.decode()
    assert "norm.weight" in out and "dim 1" in out, out
    assert {n: c[0] for n, c in node_counters(cluster).items()} == {n: before[n][0] for n in NAMES}
    r = cluster.prefetch("a", model, "--nodes", "a,b", "--node-shard=a=0/2", "--node-shard=b=1/2",
                         *[f"--rule={p}:{d}" for p, d in RULES])
    assert r.returncode == 0, f"{r.stdout.decode()} {r.stderr.decode()}"


STAGES = {"a": ["layers.[0-3].*"], "b": ["layers.[4-7].*", "embed"]}


def test_pipeline_stages_cross_no_link(cluster4, tp_model, tmp_path):
    """Two stages on two nodes each split in two: (a, b) serve stage 0's
    ranks 0 and 1, (c, d) stage 1's.  The stages meet at a file boundary, so
    no byte crosses between them; within a stage only the dim-1 slices'
    shared blocks do."""
    cluster = cluster4
    model, files = tp_model
    cluster.start()
    shards = {"a": (0, 2, STAGES["a"]), "b": (1, 2, STAGES["a"]), "c": (0, 2, STAGES["b"]),
              "d": (1, 2, STAGES["b"])}
    storage, links, need = expected_bytes(files, shards, RULES)
    pairs_only, _, _ = expected_bytes(files, {"a": (0, 1, STAGES["a"]), "c": (0, 1, STAGES["b"])}, RULES)
    assert storage == pairs_only  # the two stages' tensors, every block once

    before = node_counters(cluster)
    args = ["--nodes", "a,b,c,d"]
    for n, (rank, world, tensors) in shards.items():
        args += [f"--node-shard={n}={rank}/{world}", f"--node-tensors={n}={','.join(tensors)}"]
    args += [f"--rule={p}:{d}" for p, d in RULES]
    r = cluster.prefetch("b", model, *args)
    assert r.returncode == 0, f"{r.stdout.decode()} {r.stderr.decode()}"
    after = node_counters(cluster)
    read = {n: after[n][0] - before[n][0] for n in NAMES}
    received = {n: after[n][1] - before[n][1] for n in NAMES}
    assert sum(read.values()) == storage, (read, storage)
    assert sum(received.values()) == links, (received, links)
    for n in NAMES:
        assert read[n] + received[n] == need[n], (n, read[n], received[n], need[n])

    for n, (rank, world, tensors) in shards.items():
        out = tmp_path / f"{n}.dump"
        r = cluster[n].client("shard", str(model), "", str(out), f"{rank}/{world}",
                              *[f"tensors={p}" for p in tensors], *[f"{p}:{d}" for p, d in RULES])
        assert r.returncode == 0, r.stderr.decode()
        check_rank(json.loads(r.stdout), out.read_bytes(), files, rank, world, RULES, tensors)


def test_pipeline_stages_whole_layers(cluster4, tp_model, tmp_path):
    """Stages alone (no tensor parallelism): nothing crosses a link at all."""
    cluster = cluster4
    model, files = tp_model
    cluster.start()
    before = node_counters(cluster)
    r = cluster.prefetch("c", model, "--nodes", "a,b", f"--node-tensors=a={','.join(STAGES['a'])}",
                         f"--node-tensors=b={','.join(STAGES['b'])}")
    assert r.returncode == 0, f"{r.stdout.decode()} {r.stderr.decode()}"
    after = node_counters(cluster)
    storage, links, need = expected_bytes(files, {"a": (0, 1, STAGES["a"]), "b": (0, 1, STAGES["b"])}, RULES)
    assert links == 0
    for n in "ab":
        assert after[n][0] - before[n][0] == need[n]
        assert after[n][1] - before[n][1] == 0
    for n in "ab":
        out = tmp_path / f"{n}.dump"
        r = cluster[n].client("shard", str(model), "", str(out), "0/0", *[f"tensors={p}" for p in STAGES[n]])
        assert r.returncode == 0, r.stderr.decode()
        check_rank(json.loads(r.stdout), out.read_bytes(), files, 0, 1, RULES, STAGES[n])


def coordinator(model, names):
    """The coordinator of model's plans among names, computed as the nodes
    do (cluster/plan.c): the highest XXH3-64 of key, a NUL and the name."""
    import xxhash
    key = f"{model}\n".encode()
    return max(sorted(names), key=lambda n: xxhash.xxh3_64_intdigest(key + b"\0" + n.encode()))


@pytest.mark.parametrize("victim", ["source", "coordinator"])
def test_kill9_mid_part_plan(cluster4, tp_model, tmp_path, victim):
    """A node killed while pieces move: the pieces it was to read for the
    others are read by a live node that needs them, and every other node
    ends with its shard, right.  When the killed node coordinated the plan,
    the asker asks the next coordinator, whose plan must follow the
    transfers under way on the live nodes (not start them again: the second
    cut of a shard would find the first one resident)."""
    cluster = cluster4
    model, files = tp_model
    cluster.start()
    shards = {n: (i, 4) for i, n in enumerate(NAMES)}
    _, links, _ = expected_bytes(files, shards, RULES)
    coord = coordinator(model, NAMES)
    dead = coord if victim == "coordinator" else next(n for n in "cdb" if n != coord)
    asker = next(n for n in NAMES if n not in (dead, coord))
    # Slow links (3 MB/s a node) so that the kill lands mid-transfer.
    cluster.throttle("24mbit")
    args = ["--nodes", ",".join(NAMES)] + [f"--node-shard={n}={r}/{w}" for n, (r, w) in shards.items()]
    args += [f"--rule={p}:{d}" for p, d in RULES]
    p = cluster.spawn_prefetch(asker, model, *args)
    wait_transfer(cluster, NAMES, links // 10, p)
    cluster.kill9(dead)
    out, err = p.communicate(timeout=60)
    lines = per_node(prefetch_results(out, err, p.returncode))
    live = [n for n in NAMES if n != dead]
    for n in live:
        assert lines[n]["state"] == "ok", f"node {n} after the kill of {dead} ({victim}): {lines[n]}"
    assert lines[dead]["state"] != "ok", lines[dead]
    for n in live:
        rank = shards[n][0]
        dump = tmp_path / f"{n}.dump"
        r = cluster[n].client("shard", str(model), "", str(dump), f"{rank}/4", *[f"{q}:{d}" for q, d in RULES])
        assert r.returncode == 0, r.stderr.decode()
        check_rank(json.loads(r.stdout), dump.read_bytes(), files, rank, 4, RULES)


PY_PREFETCH = """
import json, sys, weightd
sock, model = sys.argv[1], sys.argv[2]
rules = [("*.q.weight", 0), ("*.o.weight", 1), ("embed", 0)]
with weightd.connect(sock) as c:
    res = c.prefetch(model, cluster=True, nodes=["a"], node_shards={
        "b": weightd.Shard(0, 2, rules, tensors=["layers.[0-3].*"]),
        "c": weightd.Shard(1, 2, rules, tensors=["layers.[0-3].*"]),
        "d": weightd.Shard(tensors=["layers.[4-7].*", "embed"])})
    print(json.dumps(res))
"""


def test_python_package_node_shards(cluster4, tp_model, tmp_path):
    """The same plan through weightd (the Python package): node a whole, b and
    c halves of stage 0, d stage 1 whole; each node's part is what a load
    with the same Shard serves, equal to the files' bytes."""
    cluster = cluster4
    model, files = tp_model
    cluster.start()
    root = pathlib.Path(__file__).resolve().parents[2]
    # The release build's library: a sanitizer build's cannot load into a
    # plain Python (its runtime must come first); the wire is the same.
    lib = root / "build" / "client" / "lib" / "libweightd-client.so.0"
    if not lib.exists():
        pytest.skip(f"{lib} is not built (tests/run builds it first)")
    env = {**os.environ, "PYTHONPATH": str(root / "client" / "python"), "WEIGHTD_CLIENT_LIB": str(lib)}
    before = node_counters(cluster)
    r = subprocess.run([sys.executable, "-c", PY_PREFETCH, cluster["a"].socket, str(model)], env=env,
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    res = json.loads(r.stdout)[""]
    assert [(x["node"], x["state"]) for x in res["nodes"]] == [(n, "ok") for n in NAMES], res
    shards = {"a": (0, 1), "b": (0, 2, ["layers.[0-3].*"]), "c": (1, 2, ["layers.[0-3].*"]),
              "d": (0, 1, ["layers.[4-7].*", "embed"])}
    storage, links, need = expected_bytes(files, shards, RULES)
    after = node_counters(cluster)
    assert sum(after[n][0] - before[n][0] for n in NAMES) == storage
    assert sum(after[n][1] - before[n][1] for n in NAMES) == links
    for n in NAMES:
        assert after[n][0] - before[n][0] + after[n][1] - before[n][1] == need[n], n
    for n, sh in shards.items():
        if n == "a":
            continue
        out = tmp_path / f"{n}.dump"
        r = cluster[n].client("shard", str(model), "", str(out), f"{sh[0]}/{sh[1]}",
                              *[f"tensors={p}" for p in sh[2]], *[f"{p}:{d}" for p, d in RULES])
        assert r.returncode == 0, r.stderr.decode()
        check_rank(json.loads(r.stdout), out.read_bytes(), files, sh[0], sh[1], RULES, sh[2])
