"""A component of more files than one reply can carry descriptors for
(SCM_MAX_FD, 253): a Load is refused before anything is read, with the
reason; a Prefetch of it works."""
import json
import struct

from harness import wait_until


def write_file(path, name, value):
    header = json.dumps({name: {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes([value]))


def test_more_files_than_one_reply_carries(start_daemon, tmp_root):
    model = tmp_root / "many"
    model.mkdir()
    for i in range(254):
        write_file(model / f"part-{i:03d}.safetensors", f"t{i:03d}", i % 256)
    d = start_daemon(roots=[tmp_root])

    r = d.client("hash", str(model))
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "RESOURCE_EXHAUSTED" in err and "254 files, more than the 253 descriptors" in err, err
    st = d.status()
    assert (st["storage_read_bytes"], st["entries"], st["loading"]) == (0, 0, 0)

    r = d.ctl("prefetch", str(model))
    assert r.returncode == 0, r.stderr.decode()
    wait_until(lambda: d.status()["entries"] == 1, what="the prefetched entry")
    tensors = d.ctl_json("tensors", str(model))
    assert [t["name"] for t in tensors] == [f"t{i:03d}" for i in range(254)]
