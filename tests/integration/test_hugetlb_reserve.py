"""[memory] hugetlb_reserve: the daemon's own hugetlb pool.

As root, a daemon with hugetlb_reserve = auto adds its host budget's worth
of 2 MiB pages to the kernel's pool at start, touches them in the
background, says so in its log and in Status, puts its slabs there, gives
pages back when SIGHUP shrinks the budget and every page at exit.  When
other processes took the pool's pages, loads still work on small pages and
say so.  Every load's bytes are compared with the files'.

The pool is the machine's: other processes may change vm.nr_hugepages
while these tests run, so the tests check the daemon's own accounting (its
log of vm.nr_hugepages before and after each change) rather than absolute
values, and check the value at the end only when nobody else moved it.
"""
import mmap
import os
import re

import pytest

from harness import wait_until
from reference import component_tensors

NR = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
FREE = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages"
RESV = "/sys/kernel/mm/hugepages/hugepages-2048kB/resv_hugepages"
SURPLUS = "/sys/kernel/mm/hugepages/hugepages-2048kB/surplus_hugepages"
MIB = 1 << 20
PAGE = 2 * MIB

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the daemon writes vm.nr_hugepages"),
    pytest.mark.skipif(not os.path.exists(NR), reason="no 2 MiB hugetlb pool on this kernel"),
]


def read_int(path):
    with open(path) as f:
        return int(f.read())


def check_bytes(d, model):
    files = sorted(model.glob("*.safetensors"))
    expected = component_tensors(files)
    out = d.hash(model)
    assert sorted(out["tensors"]) == sorted(expected)
    for name, t in expected.items():
        assert out["tensors"][name]["xxh3_128"] == t["xxh3_128"], f"{name}: the mapped bytes differ from the file"
    assert out["bytes"] == sum(p.stat().st_size for p in files)


def pool_changes(log):
    """[(before, after)] of every vm.nr_hugepages change the daemon logged."""
    return [(int(a), int(b)) for a, b in re.findall(r"vm\.nr_hugepages (\d+) -> (\d+)", log)]


def wait_ready(d):
    wait_until(lambda: d.status()["hugetlb_pool"]["state"] != "touching", timeout=60, what="the pool touched")
    return d.status()["hugetlb_pool"]


def test_reserved_visible_bounded_given_back(start_daemon, make_model):
    model = make_model("16M", 2)
    nr0 = read_int(NR)
    d = start_daemon(roots=[model.parent], host_budget="64M", hugetlb_reserve="auto")
    d.wait_log("hugetlb pool: reserved 32 pages of 2 MiB")
    changes = pool_changes(d.log())
    assert len(changes) == 1 and changes[0][1] - changes[0][0] == 32, d.log()
    pool = wait_ready(d)
    assert pool["state"] == "ready", pool
    assert pool["reserved_bytes"] == 64 * MIB  # the host budget
    assert pool["touched_bytes"] <= pool["reserved_bytes"]
    d.wait_log("hugetlb pool: touched")
    txt = d.ctl("status").stdout.decode()
    assert "hugetlb pool:   ready: 64.0 MiB reserved" in txt, txt

    # Slabs on the pool, the files' bytes.
    check_bytes(d, model)
    st = d.status()
    assert st["hugetlb_pool"]["shmem_fallback_slabs"] == 0, st
    assert "on small pages" not in d.log()

    # A size above the budget is bounded by it: nothing changes.
    d.write_config(hugetlb_reserve="256M")
    d.hup()
    wait_until(lambda: d.log().count("Reloaded the configuration") == 1, what="the reload")
    assert d.status()["hugetlb_pool"]["reserved_bytes"] == 64 * MIB

    # The budget shrinks: pages go back.
    d.write_config(host_budget="32M")
    d.hup()
    wait_until(lambda: d.log().count("Reloaded the configuration") == 2, what="the second reload")
    assert "SIGHUP: hugetlb pool: gave back 16 pages (0.03 GiB), 16 left" in d.log(), d.log()
    assert d.status()["hugetlb_pool"]["reserved_bytes"] == 32 * MIB
    before, after = pool_changes(d.log())[-1]
    assert before - after == 16

    # off: the free pages go back at once; those the model's slabs hold
    # (each file rounded up to whole pages) go back once the slabs do.
    held = sum(-(-f.stat().st_size // PAGE) for f in model.glob("*.safetensors")) if model.is_dir() else \
        -(-model.stat().st_size // PAGE)
    d.write_config(hugetlb_reserve="off")
    d.hup()
    wait_until(lambda: d.log().count("Reloaded the configuration") == 3, what="the third reload")
    pool = d.status()["hugetlb_pool"]
    assert pool["state"] == "off (hugetlb_reserve = off)", pool
    assert pool["reserved_bytes"] in (0, held * PAGE), (held, pool)  # 0 where the kernel made them surplus
    check_bytes(d, model)
    r = d.ctl("evict", str(model))
    assert r.returncode == 0, r.stderr.decode()
    wait_until(lambda: d.status()["hugetlb_pool"]["reserved_bytes"] == 0, timeout=5, what="the held pages back")

    # On again, then the exit gives everything back.
    d.write_config(hugetlb_reserve="auto")
    d.hup()
    wait_until(lambda: d.log().count("Reloaded the configuration") == 4, what="the fourth reload")
    assert d.status()["hugetlb_pool"]["reserved_bytes"] == 32 * MIB
    rc = d.stop()
    assert rc == 0
    log = d.log()
    assert "hugetlb pool: gave back its 16 pages (0.03 GiB) at exit" in log, log
    # Every page the daemon added went back: its logged changes add up to 0.
    changes = pool_changes(log)
    gave_later = sum(int(n) for n in re.findall(r"gave back (\d+) more pages that slabs held", log))
    assert sum(b - a for a, b in changes) - gave_later == 0, (changes, gave_later)
    assert [b - a for a, b in changes][:2] == [32, -16], changes
    others = changes[0][0] != nr0 or any(changes[i][0] != changes[i - 1][1] for i in range(1, len(changes)))
    if not others and read_int(NR) != nr0:
        print(f"note: vm.nr_hugepages {nr0} before the test, {read_int(NR)} after: another process changed it")


def take_free_pages(keep):
    """Map and touch all but `keep` free 2 MiB pages, as another program
    would; returns (mapping, fd, pages) to release, or None."""
    n = read_int(FREE) - read_int(RESV) - keep
    if n <= 0:
        return None
    fd = os.memfd_create("test-taker", os.MFD_CLOEXEC | os.MFD_HUGETLB)
    os.ftruncate(fd, n * PAGE)
    m = mmap.mmap(fd, n * PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    for i in range(n):
        m[i * PAGE] = 1
    return m, fd, n


def test_pool_taken_by_others_falls_back(start_daemon, make_model):
    model = make_model("16M", 2)
    d = start_daemon(roots=[model.parent], host_budget="64M", hugetlb_reserve="auto")
    assert wait_ready(d)["state"] == "ready"
    # Another program takes the pool's free pages but 2: each 8 MiB slab needs 4.
    taken = take_free_pages(keep=2)
    assert taken, "no free pages to take"
    try:
        check_bytes(d, model)
    finally:
        taken[0].close()
        os.close(taken[1])
    st = d.status()["hugetlb_pool"]
    assert st["shmem_fallback_slabs"] == 2, st
    assert st["shmem_fallback_bytes"] == sum(p.stat().st_size for p in model.glob("*.safetensors"))
    assert "2 of 2 files on small pages (the hugetlb pool was short)" in d.log(), d.log()
    txt = d.ctl("status").stdout.decode()
    assert "small pages:    2 slabs" in txt, txt

    # The pages are back: the next load lands on the pool again.
    r = d.ctl("evict", str(model))
    assert r.returncode == 0, r.stderr.decode()
    check_bytes(d, model)
    assert d.status()["hugetlb_pool"]["shmem_fallback_slabs"] == 2


def test_shrink_with_every_page_in_use(start_daemon, make_model):
    """The budget shrinks while the model's slabs hold pages and no page
    of the pool is free (another program holds the rest): the kernel keeps
    the pages in use as surplus pages and frees them once they are free,
    so the daemon's share is given back at once and counted so (it was
    counted as still held for ever, and nr_hugepages, which counts surplus
    pages too, was read as if the daemon still owed them)."""
    model = make_model("16M", 2)
    d = start_daemon(roots=[model.parent], host_budget="64M", hugetlb_reserve="auto")
    assert wait_ready(d)["state"] == "ready"
    check_bytes(d, model)
    persistent0 = read_int(NR) - read_int(SURPLUS)
    taken = take_free_pages(keep=0)
    try:
        d.write_config(hugetlb_reserve="off")
        d.hup()
        wait_until(lambda: d.log().count("Reloaded the configuration") == 1, what="the reload")
        assert d.status()["hugetlb_pool"]["reserved_bytes"] == 0, d.log()
        assert "vm.nr_hugepages %d -> %d" % (persistent0, persistent0 - 32) in d.log(), d.log()
        check_bytes(d, model)  # the slabs keep their pages
    finally:
        if taken:
            taken[0].close()
            os.close(taken[1])
    r = d.ctl("evict", str(model))
    assert r.returncode == 0, r.stderr.decode()
    # Nothing is owed: no page is given back later, and none stays surplus.
    wait_until(lambda: read_int(SURPLUS) == 0, timeout=5, what="the surplus pages freed")
    assert d.status()["hugetlb_pool"]["reserved_bytes"] == 0
    d.write_config(hugetlb_reserve="auto")
    d.hup()
    wait_until(lambda: d.log().count("Reloaded the configuration") == 2, what="the second reload")
    assert d.status()["hugetlb_pool"]["reserved_bytes"] == 64 * MIB
    assert d.stop() == 0
    log = d.log()
    assert "more pages that slabs held" not in log, log
    changes = pool_changes(log)
    assert [b - a for a, b in changes] == [32, -32, 32, -32], changes
