"""The arrays are read-only: numpy refuses writes, the pages are mapped
read-only (mprotect to writable fails), the sealed memory file cannot be
opened for writing or mapped writable again, and a write through a torch
tensor (which cannot be marked read-only) faults."""
import ctypes
import errno
import mmap
import os
import signal
import subprocess
import sys

import numpy as np
import pytest


@pytest.fixture
def lease(daemon, testdata, client_lib):
    import weightd
    with weightd.connect(daemon.socket) as c, c.load(testdata / "good" / "large-tensor.safetensors") as lease:
        yield lease


def test_numpy_arrays_refuse_writes(lease):
    a = lease["embed.weight"]
    with pytest.raises(ValueError, match="read-only"):
        a[0, 0] = 1
    with pytest.raises(ValueError):
        a.flags.writeable = True
    with pytest.raises(ValueError):
        np.copyto(a, 0)


def _mapping_of(addr):
    """(start, end, path) of the mapping in /proc/self/maps that holds addr."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(None, 5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= addr < end:
                return start, end, fields[1], fields[5].strip() if len(fields) > 5 else ""
    raise AssertionError(f"no mapping holds {addr:#x}")


def test_the_memory_cannot_be_written_through_a_new_mapping(lease):
    a = lease["embed.weight"]
    addr = a.__array_interface__["data"][0]
    start, end, perms, path = _mapping_of(addr)
    assert perms.startswith("r-") and perms[3] == "s", f"mapping {perms} {path}"
    assert path.startswith("/memfd:") or "hugepages" in path or path.startswith("/dev/shm"), path

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(start, end - start, mmap.PROT_READ | mmap.PROT_WRITE) == -1
    assert ctypes.get_errno() == errno.EACCES

    mf = f"/proc/self/map_files/{start:x}-{end:x}"
    try:
        fd = os.open(mf, os.O_RDWR)
    except PermissionError:
        return  # the file cannot even be opened for writing
    try:
        with pytest.raises(PermissionError):
            mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # write(2): EPERM from the seal; hugetlbfs (slabs on huge pages)
        # has no write(2) at all and says EINVAL.
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x", 0)
        assert e.value.errno in (errno.EPERM, errno.EINVAL)
    finally:
        os.close(fd)


WRITER = r"""
import sys, weightd
c = weightd.connect(sys.argv[1])
lease = c.load(sys.argv[2], framework="pt")
t = lease["embed.weight"]
print("writing", flush=True)
t[0, 0] = 1.0
print("wrote", flush=True)
"""


def test_writing_into_a_torch_tensor_faults(daemon, testdata, client_lib):
    r = subprocess.run([sys.executable, "-c", WRITER, daemon.socket, str(testdata / "good" / "large-tensor.safetensors")],
                       capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGSEGV, (r.returncode, r.stderr.decode()[-2000:])
    assert r.stdout == b"writing\n"
