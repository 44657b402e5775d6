"""The same files reached by two paths (a symlinked folder inside the root,
as in `latest -> flux-v2`): one copy in memory and one read from storage,
whichever path comes first, and whether the second arrives while the first
loads or after."""
import shutil

from harness import SLOW, read_line
from reference import component_tensors


def hashes(out):
    return {n: t["xxh3_128"] for n, t in out["tensors"].items()}


def files_of(model):
    return sorted(model.glob("*.safetensors"))


def test_symlinked_folder_shares_the_resident_copy(start_daemon, tmp_root, testdata):
    real = tmp_root / "v2"
    shutil.copytree(testdata / "models" / "sharded", real)
    (tmp_root / "latest").symlink_to("v2")
    expected = {n: t["xxh3_128"] for n, t in component_tensors(files_of(real)).items()}
    size = sum(p.stat().st_size for p in files_of(real))

    d = start_daemon(roots=[tmp_root])
    assert hashes(d.hash(tmp_root / "latest")) == expected
    read = d.status()["storage_read_bytes"]
    assert read >= size
    # By the other path: served from memory, nothing read, one entry.
    assert hashes(d.hash(real)) == expected
    assert d.status()["storage_read_bytes"] == read
    entries = d.ls()
    assert len(entries) == 1 and entries[0]["model"] == str(tmp_root / "latest")
    assert d.status()["host_used_bytes"] == size


def test_symlinked_folder_joins_the_running_load(start_daemon, make_model, tmp_root):
    model = make_model("256M", 2)
    real = tmp_root / "v2"
    shutil.copytree(model, real)
    (tmp_root / "latest").symlink_to("v2")
    size = sum(p.stat().st_size for p in files_of(real))

    d = start_daemon(roots=[tmp_root], **SLOW)
    first = d.spawn_client("hold", tmp_root / "latest")
    second = d.spawn_client("hold", real)
    assert read_line(first, 60) == "ready\n"
    assert read_line(second, 60) == "ready\n"
    st = d.status()
    assert st["leases"] == 2
    assert size <= st["storage_read_bytes"] <= size * 1.01, "storage was read more than once"
    assert st["host_used_bytes"] == size
