"""Files that change after they were cached are noticed: the next load
serves the new bytes, or fails with an error naming the file, never the old
bytes.

The daemon tells files apart by device, inode, size, mtime and ctime.  File
timestamps come from the kernel's coarse clock, so a rewrite in place is only
visible once that clock has moved on: the tests wait 50 ms before changing a
file, more than one tick at any HZ.
"""
import os
import random
import time

from harness import wait_until
from reference import component_tensors, write_safetensors

TICK = 0.05


def make(path, seed, n=64 << 10):
    rng = random.Random(seed)
    write_safetensors(path, [("x", "U8", [n], rng.randbytes(n)), ("y", "F16", [8], rng.randbytes(16))],
                      {"format": "pt"})


def hashes(out):
    return {n: t["xxh3_128"] for n, t in out["tensors"].items()}


def file_hashes(path):
    return {n: t["xxh3_128"] for n, t in component_tensors([path]).items()}


def test_replaced_file_is_served_new(start_daemon, tmp_root):
    path = tmp_root / "m.safetensors"
    make(path, "old")
    old = file_hashes(path)
    old_size = path.stat().st_size
    d = start_daemon(roots=[tmp_root])
    assert hashes(d.hash(path)) == old
    holder = d.hold(path)

    time.sleep(TICK)
    ino = path.stat().st_ino
    make(path, "new")  # a new file renamed over the old one
    assert path.stat().st_ino != ino
    new = file_hashes(path)
    assert new != old

    assert hashes(d.hash(path)) == new
    # The old copy lives on while its lease does, charged to the budget and
    # listed after the entries that can be served.
    assert [(e["state"], e["leases"]) for e in d.ls()] == [("resident", 0), ("detached", 1)]
    st = d.status()
    assert (st["leases"], st["host_used_bytes"]) == (1, old_size + path.stat().st_size)
    holder.kill()
    holder.wait()
    wait_until(lambda: d.status()["host_used_bytes"] == path.stat().st_size, what="the old copy to go")
    assert [e["state"] for e in d.ls()] == ["resident"]
    assert hashes(d.hash(path)) == new


def test_rewritten_in_place_is_served_new(start_daemon, tmp_root):
    path = tmp_root / "m.safetensors"
    make(path, "before")
    d = start_daemon(roots=[tmp_root])
    old = file_hashes(path)
    assert hashes(d.hash(path)) == old

    time.sleep(TICK)
    ino = path.stat().st_ino
    size = path.stat().st_size
    with open(path, "r+b") as f:  # same inode, same size, other data bytes
        f.seek(size - 1000)
        f.write(random.Random("after").randbytes(1000))
    assert (path.stat().st_ino, path.stat().st_size) == (ino, size)

    new = file_hashes(path)
    assert new["x"] != old["x"]
    assert hashes(d.hash(path)) == new
    assert [e["state"] for e in d.ls()] == ["resident"]


def test_truncated_file_is_refused_then_rewritten_served(start_daemon, tmp_root):
    path = tmp_root / "m.safetensors"
    make(path, "whole")
    d = start_daemon(roots=[tmp_root])
    d.hash(path)

    time.sleep(TICK)
    os.truncate(path, path.stat().st_size // 2)
    r = d.client("hash", str(path))
    assert r.returncode == 1, "served a truncated file"
    err = r.stderr.decode()
    assert "FORMAT_ERROR:" in err and str(path) in err and "but the data section is" in err, err
    r = d.ctl("cat", str(path), "--tensor", "y")
    assert r.returncode == 1 and r.stdout == b""

    # Written again in place (same inode), larger than before.
    time.sleep(TICK)
    ino = path.stat().st_ino
    rng = random.Random("regrown")
    data = rng.randbytes(100 << 10)
    with open(path, "r+b") as f:
        tmp = tmp_root / "staging.safetensors"
        write_safetensors(tmp, [("x", "U8", [len(data)], data), ("y", "F16", [8], rng.randbytes(16))])
        f.write(tmp.read_bytes())
        tmp.unlink()
    assert path.stat().st_ino == ino
    assert hashes(d.hash(path)) == file_hashes(path)
    (entry,) = d.ls()
    assert (entry["model"], entry["bytes"]) == (str(path), path.stat().st_size)
