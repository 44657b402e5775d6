"""Who may read what: paths that leave the model roots, peers that are not on
the allow list, and clients that try to write through their mappings."""
import errno
import fcntl
import json
import mmap
import os
import random
import shutil

import pytest

import wdwire
from harness import NOBODY, make_dir
from reference import component_tensors, write_safetensors


# F_SEAL_SEAL | F_SEAL_GROW | F_SEAL_FUTURE_WRITE (<linux/fcntl.h>); not
# F_SEAL_SHRINK: the daemon truncates a slab nobody leases any more.
SEALS = 0x0001 | 0x0004 | 0x0010


@pytest.fixture
def escape_setup(workdir, tmp_root):
    """A root with one model and links out of it, and a model outside."""
    outside = make_dir(workdir, "outside-")
    rng = random.Random("escape")
    write_safetensors(outside / "secret.safetensors", [("secret", "U8", [64], rng.randbytes(64))])
    write_safetensors(tmp_root / "m.safetensors", [("w", "F32", [4], rng.randbytes(16))])
    (tmp_root / "abs-link.safetensors").symlink_to(outside / "secret.safetensors")
    (tmp_root / "rel-link.safetensors").symlink_to(f"../{outside.name}/secret.safetensors")
    (tmp_root / "dir-link").symlink_to(outside)
    (tmp_root / "sub").mkdir()
    # A sibling whose name starts with the root's: not beneath it.
    sibling = tmp_root.parent / (tmp_root.name + "-sibling")
    sibling.mkdir()
    write_safetensors(sibling / "secret.safetensors", [("secret", "U8", [64], rng.randbytes(64))])
    yield tmp_root, outside
    shutil.rmtree(sibling)
    shutil.rmtree(outside)


ESCAPES = {
    "dotdot": lambda root, out: f"{root}/../{out.name}/secret.safetensors",
    "dotdot-deep": lambda root, out: f"{root}/sub/../../{out.name}/secret.safetensors",
    "absolute-symlink": lambda root, out: f"{root}/abs-link.safetensors",
    "relative-symlink": lambda root, out: f"{root}/rel-link.safetensors",
    "directory-symlink": lambda root, out: f"{root}/dir-link/secret.safetensors",
    "outside-every-root": lambda root, out: f"{out}/secret.safetensors",
    "root-name-prefix": lambda root, out: f"{root}-sibling/secret.safetensors",
    "system-file": lambda root, out: "/etc/passwd",
}


@pytest.mark.parametrize("how", sorted(ESCAPES))
def test_path_escapes_are_refused(start_daemon, escape_setup, how):
    root, outside = escape_setup
    d = start_daemon(roots=[root])
    model = ESCAPES[how](root, outside)

    for args in (["tensors", model], ["cat", model, "--tensor", "secret"], ["prefetch", model]):
        r = d.ctl(*args)
        assert r.returncode == 1, (args, r.stdout)
        assert "PERMISSION_DENIED:" in r.stderr.decode(), r.stderr.decode()
        assert r.stdout == b""
    r = d.client("hash", model)
    assert r.returncode == 1 and "PERMISSION_DENIED:" in r.stderr.decode(), r.stderr.decode()
    assert "refused" in d.log()
    assert d.status()["storage_read_bytes"] == 0
    # The model inside the root is still served.
    d.hash(root / "m.safetensors")


def test_uid_not_on_the_allow_list_is_refused(start_daemon, testdata):
    d = start_daemon()
    model = testdata / "models" / "plain"
    r = d.client("hash", str(model), user="nobody")
    assert r.returncode == 1
    assert "PERMISSION_DENIED:" in r.stderr.decode() and f"uid {NOBODY}" in r.stderr.decode(), r.stderr.decode()
    r = d.ctl("status", user="nobody")
    assert r.returncode == 1 and "PERMISSION_DENIED:" in r.stderr.decode(), r.stderr.decode()
    assert f"uid {NOBODY} gid {NOBODY}: not on the allow list, refused" in d.log()
    assert d.status()["connections"] == 1


def test_allowed_uid_is_served(start_daemon, testdata):
    d = start_daemon(allow_uids=NOBODY)
    model = testdata / "models" / "sharded"
    out = d.hash(model, user="nobody")
    expected = component_tensors(sorted(model.glob("*.safetensors")))
    assert {n: t["xxh3_128"] for n, t in out["tensors"].items()} == {n: t["xxh3_128"] for n, t in expected.items()}
    assert d.status(user="nobody")["leases"] == 0


def test_write_probe_cannot_unprotect_the_mapping(daemon, testdata):
    r = daemon.client("write-probe", str(testdata / "models" / "plain"))
    assert r.returncode == 0, r.stderr.decode()
    e = json.loads(r.stdout)["mprotect_errno"]
    assert e in (errno.EACCES, errno.EPERM), f"mprotect(PROT_WRITE) on a tensor's page gave errno {e}"


HUGE_PAGE = 2 << 20


def test_raw_client_cannot_write_through_its_memfd(daemon, testdata):
    path = testdata / "good" / "large-tensor.safetensors"
    content = path.read_bytes()
    with daemon.raw() as c:
        reply = c.request(wdwire.LOAD, wdwire.load_body(str(path)))
        assert reply.code == "OK", reply.message
        load = reply.reply.msg(11)
        (slab,) = load.msgs(4)
        (fd,) = c.take_fds(1)
        try:
            assert slab.int(2) == len(content)
            assert os.fstat(fd).st_size == slab.int(3) >= len(content)

            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            assert seals & SEALS == SEALS, f"seals {seals:#x}"

            # Read-only, the mapping holds the file.
            with mmap.mmap(fd, slab.int(3), mmap.MAP_SHARED, mmap.PROT_READ) as m:
                assert m[:len(content)] == content

            with pytest.raises(PermissionError):
                mmap.mmap(fd, slab.int(3), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            # A read-only descriptor: no write(2), no resizing.
            assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
            assert os.fstat(fd).st_mode & 0o7777 == 0o444
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"x", 0)
            assert e.value.errno == errno.EBADF
            for size in (0, slab.int(3) * 2):
                with pytest.raises(OSError) as e:
                    os.ftruncate(fd, size)
                assert e.value.errno in (errno.EINVAL, errno.EBADF)
            # Nor a new writable descriptor of the same memfd, for another
            # uid: the file is 0444 (the daemon's own uid and root can do
            # anything to the daemon anyway).
            child = os.fork()
            if child == 0:
                try:
                    os.setgid(NOBODY)
                    os.setuid(NOBODY)
                    os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
                    os._exit(1)
                except PermissionError:
                    os._exit(0)
                except BaseException:
                    os._exit(2)
            _, status = os.waitpid(child, 0)
            assert os.waitstatus_to_exitcode(status) == 0, "another uid reopened the slab read-write"
            # A private mapping may be written: the copy is the client's own.
            with mmap.mmap(fd, slab.int(3), mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE) as m:
                m[0:1] = b"\xff"
        finally:
            os.close(fd)

    # Nothing changed for the next client.
    expected = component_tensors([path])
    out = daemon.hash(path)
    assert {n: t["xxh3_128"] for n, t in out["tensors"].items()} == {n: t["xxh3_128"] for n, t in expected.items()}
