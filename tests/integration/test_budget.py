"""The host budget: least recently used entries without a lease or a pin make
room for new loads; pinned and leased ones never do; a load that cannot fit
fails with RESOURCE_EXHAUSTED and the shortfall in bytes.

The budget counts the bytes of a component's files, so with models of S
bytes each and a budget of 3.5 S, three fit.
"""
import random
import signal

from harness import wait_until
from reference import component_tensors, write_safetensors

MIB = 1 << 20


def make_models(root, names, mib=1):
    out = {}
    for name in names:
        rng = random.Random(f"budget/{name}")
        path = root / f"{name}.safetensors"
        write_safetensors(path, [("w", "U8", [mib * MIB - 8], rng.randbytes(mib * MIB - 8)),
                                 ("b", "F32", [2], rng.randbytes(8))], {"format": "pt"})
        out[name] = str(path)
    return out


def test_lru_eviction_pins_leases_and_shortfall(start_daemon, tmp_root):
    m = make_models(tmp_root, "ABCDE")
    big = make_models(tmp_root, ["F"], mib=4)["F"]
    size = (tmp_root / "A.safetensors").stat().st_size
    budget = 3 * size + size // 2
    d = start_daemon(roots=[tmp_root], host_budget=budget, host_pages="small")
    assert d.status()["host_budget_bytes"] == budget

    def order():
        """Resident models, most recently used first, with their leases and pins."""
        return [(e["model"].rsplit("/", 1)[1][0], e["leases"], e["pinned"]) for e in d.ls()
                if e["state"] == "resident"]

    def load(name):
        out = d.hash(m[name])
        assert out["tensors"]["w"]["xxh3_128"] == expected[name], name

    expected = {n: component_tensors([p], library_check=False)["w"]["xxh3_128"] for n, p in m.items()}

    load("A")
    assert order() == [("A", 0, False)]
    load("B")
    assert order() == [("B", 0, False), ("A", 0, False)]
    load("C")
    assert order() == [("C", 0, False), ("B", 0, False), ("A", 0, False)]
    assert d.status()["evictions"] == 0

    load("A")  # A is the most recently used now; B the least
    assert [x[0] for x in order()] == ["A", "C", "B"]
    load("D")
    assert [x[0] for x in order()] == ["D", "A", "C"]
    st = d.status()
    assert (st["evictions"], st["host_used_bytes"]) == (1, 3 * size)

    # Pin C (the least recently used) and hold a lease on A.
    r = d.ctl("pin", m["C"])
    assert r.returncode == 0, r.stderr.decode()
    holder = d.hold(m["A"])
    assert order() == [("A", 1, False), ("D", 0, False), ("C", 0, True)]
    assert d.status()["host_evictable_bytes"] == size

    load("E")  # only D may go
    assert order() == [("E", 0, False), ("A", 1, False), ("C", 0, True)]
    load("B")  # only E may go
    assert order() == [("B", 0, False), ("A", 1, False), ("C", 0, True)]
    assert d.status()["evictions"] == 3

    # Larger than the budget: nothing is evicted for it.
    st = d.status()
    fsize = (tmp_root / "F.safetensors").stat().st_size
    short = fsize - (st["host_budget_bytes"] - st["host_used_bytes"]) - st["host_evictable_bytes"]
    r = d.client("hash", big)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "RESOURCE_EXHAUSTED:" in err and f"needs {fsize} bytes" in err and f"short by {short} bytes" in err, err
    r = d.ctl("prefetch", big)
    assert r.returncode == 1 and f"short by {short} bytes" in r.stderr.decode()

    # Two models' worth: B alone cannot make room, A and C may not.
    g2 = make_models(tmp_root, ["G"], mib=2)["G"]
    gsize = (tmp_root / "G.safetensors").stat().st_size
    r = d.client("hash", g2)
    assert r.returncode == 1
    assert f"short by {gsize - (budget - 3 * size) - size} bytes" in r.stderr.decode(), r.stderr.decode()
    assert order() == [("B", 0, False), ("A", 1, False), ("C", 0, True)]
    assert d.status()["evictions"] == 3

    # The lease ends: A may go now, and G fits after A and B (C stays pinned).
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    wait_until(lambda: d.status()["leases"] == 0, what="the lease to end")
    out = d.hash(g2)
    assert out["tensors"]["w"]["xxh3_128"] == component_tensors([g2], library_check=False)["w"]["xxh3_128"]
    assert order() == [("G", 0, False), ("C", 0, True)]
    st = d.status()
    assert (st["evictions"], st["host_used_bytes"]) == (5, size + gsize)

    # Unpinned, C goes first for the next load.
    r = d.ctl("unpin", m["C"])
    assert r.returncode == 0, r.stderr.decode()
    load("A")
    assert [x[0] for x in order()] == ["A", "G"]
