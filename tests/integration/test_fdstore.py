"""The host tier across a restart, through the service manager's file
descriptor store, with the real sd_notify protocol and a stand-in for
systemd's side of it (FakeSystemd below): weightd hands its slabs and an
index of them to the store as it exits (FDSTORE=1, one FDNAME= per
descriptor), the next weightd gets them back as LISTEN_FDS/LISTEN_FDNAMES
(after the socket unit's socket, as systemd passes them), adopts the
components whose files did not change, serves them without reading storage,
drops the rest, and removes everything it took from the store
(FDSTOREREMOVE=1).  A broken index is refused and everything closed."""
import array
import fcntl
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

import harness
from harness import REPO, Daemon, emulated_build, make_dir
from reference import component_tensors, write_safetensors

TICK = 0.05  # see test_stale.py: file times move with the kernel's coarse clock

# Arranges the descriptors from the store at 3, 4, ... and execs weightd with
# LISTEN_PID set to its own pid, which weightd keeps.
LAUNCH = r"""
import fcntl, json, os, sys
spec = json.loads(sys.argv[1])
fds, names = spec["fds"], spec["names"]
base = max(fds + [2]) + len(fds) + 3
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i, inheritable=True)
env = dict(os.environ)
if fds:
    env.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=":".join(names), LISTEN_PID=str(os.getpid()))
os.execve(sys.argv[2], sys.argv[2:], env)
"""


class FakeSystemd:
    """systemd's side of sd_notify and of the file descriptor store: a
    datagram socket read all the time (by a thread: a sender blocks when
    the queue is full); FDSTORE=1 keeps the attached descriptors under
    FDNAME= ("stored" without one), one copy of each open file;
    FDSTOREREMOVE=1 closes those of a name; the next start gets the store in
    LISTEN_FDS."""

    def __init__(self, d):
        self.path = str(d / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.store = []  # [(name, fd)], in the order received
        self.messages = []
        self.lock = threading.Lock()
        self.done = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.done:
            fds = array.array("i")
            try:
                msg, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(253 * fds.itemsize))
            except (socket.timeout, OSError):
                continue
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            with self.lock:
                self.handle(msg.decode(), list(fds))

    def settle(self, quiet=0.3):
        """Wait until no message came for quiet seconds."""
        n = -1
        while True:
            with self.lock:
                if len(self.messages) == n:
                    return
                n = len(self.messages)
            time.sleep(quiet)

    def handle(self, text, fds):
        self.messages.append(text)
        fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        name = fields.get("FDNAME", "stored")
        if fields.get("FDSTORE") == "1":
            for fd in fds:
                st = os.fstat(fd)
                if any((os.fstat(k).st_dev, os.fstat(k).st_ino) == (st.st_dev, st.st_ino) for _, k in self.store):
                    os.close(fd)  # the same file: kept once
                else:
                    self.store.append((name, fd))
            return
        for fd in fds:
            os.close(fd)
        if fields.get("FDSTOREREMOVE") == "1":
            for n, fd in [x for x in self.store if x[0] == name]:
                os.close(fd)
                self.store.remove((n, fd))

    def names(self):
        with self.lock:
            return sorted(n for n, _ in self.store)

    def replace(self, name, fd):
        with self.lock:
            for n, k in list(self.store):
                if n == name:
                    os.close(k)
                    self.store.remove((n, k))
            if fd is not None:
                self.store.append((name, fd))

    def close(self):
        self.done = True
        self.thread.join()
        for _, fd in self.store:
            os.close(fd)
        self.store = []
        self.sock.close()


class ManagedDaemon(Daemon):
    """A Daemon started by FakeSystemd: NOTIFY_SOCKET set, and the store's
    descriptors (after a socket unit's listening socket, if any) passed."""

    def __init__(self, bins, base, roots, systemd, listener=None, env=None, **config):
        super().__init__(bins, base, roots, config, {"NOTIFY_SOCKET": systemd.path, **(env or {})})
        self.systemd = systemd
        self.listener = listener

    def start(self):
        with self.systemd.lock:
            pairs = ([("weightd.socket", self.listener.fileno())] if self.listener else []) + self.systemd.store
            self.systemd.messages = []
        spec = json.dumps({"fds": [fd for _, fd in pairs], "names": [n for n, _ in pairs]})
        if self.listener:
            self.socket = self.listener.getsockname()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCH, spec, str(self.bins.weightd), "--config",
                                      str(self.config_path)],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     env={**os.environ, **self.env}, pass_fds=[fd for _, fd in pairs])
        log.close()
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"weightd exited with {self.proc.returncode} at start:\n{self.log()}")
            with self.systemd.lock:
                if any("READY=1" in m for m in self.systemd.messages):
                    break
            time.sleep(0.01)
            if time.monotonic() > deadline:
                raise AssertionError(f"no READY=1 from weightd:\n{self.log()}")
        return self

    def stop(self, timeout=30):
        rc = super().stop(timeout)
        self.systemd.settle()  # what it sent before it exited
        return rc


@pytest.fixture
def systemd(workdir):
    s = FakeSystemd(make_dir(workdir, "fdstore-"))
    yield s
    s.close()


@pytest.fixture
def managed(bins, workdir, systemd):
    started = []

    def start(roots, listener=None, env=None, **config):
        d = ManagedDaemon(bins, workdir, roots, systemd, listener, env, **config)
        started.append(d)
        return d.start()

    yield start
    errors = []
    for d in started:
        try:
            if d.listener and d.running():
                # The socket unit's path stays after the stop: not weightd's to remove.
                assert d.stop() == 0, d.log()[-4000:]
                os.unlink(d.socket)
            d.finish()
        except AssertionError as e:
            errors.append(str(e))
    assert not errors, "\n".join(errors)


def hashes(out):
    return {n: t["xxh3_128"] for n, t in out["tensors"].items()}


def expected(files):
    return {n: t["xxh3_128"] for n, t in component_tensors(files).items()}


def make_single(path, seed, n=3 << 20):
    rng = random.Random(seed)
    write_safetensors(path, [("w", "U8", [n], rng.randbytes(n)), ("b", "F16", [8], rng.randbytes(16))],
                      {"format": "pt"})


def fd_targets(pid):
    """What weightd's descriptors point to, but the memfds its hugetlb pool
    touches pages with (they come and go with the touch)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            t = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if "hugetlb-touch" not in t:
            out.append(t)
    return out


def memfds(pid):
    """Those of weightd's descriptors that are memfds: slabs, an index."""
    return [t for t in fd_targets(pid) if t.startswith("/memfd:")]


def n_fds(pid):
    """How many descriptors weightd holds once the last client's connection
    is closed on its side too (a moment after the client exits)."""
    last = None
    for _ in range(50):
        n = len(fd_targets(pid))
        if n == last:
            return n
        last = n
        time.sleep(0.2)
    return last


def rchar(pid):
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError("no rchar in /proc/PID/io")


@pytest.fixture
def models(tmp_root, make_model):
    """A sharded model (two files) and a single-file one in one root."""
    big = tmp_root / "big"
    big.mkdir()
    src = make_model("16M", 2)
    for p in sorted(src.glob("*.safetensors*")):
        shutil.copyfile(p, big / p.name)
    single = tmp_root / "single.safetensors"
    make_single(single, "before")
    return big, single


def files_of(model):
    return sorted(model.glob("*.safetensors")) if model.is_dir() else [model]


def size_of(model):
    return sum(p.stat().st_size for p in files_of(model))


NR_HUGEPAGES = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
harness.SECTIONS.setdefault("hugetlb_reserve", "memory")


def page_sizes(pid, name):
    """The KernelPageSize of weightd's mappings of memfds named name."""
    out, current = set(), False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0]:
                current = f"/memfd:weightd:{name}" in line
            elif current and line.startswith("KernelPageSize:"):
                out.add(line.split()[1] + " kB")
    return out


@pytest.mark.parametrize("pages", ["small", "hugetlb"])
def test_restart_adopts_unchanged_and_drops_changed(managed, systemd, tmp_root, models, workdir, pages):
    big, single = models
    config = {"host_pages": "small"}
    if pages == "hugetlb":
        if not os.access(NR_HUGEPAGES, os.W_OK):
            pytest.skip(f"cannot make a hugetlb pool here ({NR_HUGEPAGES} is not writable)")
        # The daemon's own pool, the budget's 32 pages: slabs on huge pages
        # or the load fails.
        config = {"host_pages": "hugetlb", "hugetlb_reserve": "auto", "host_budget": "64M"}
    d1 = managed([tmp_root], **config)
    want_big, want_single = expected(files_of(big)), expected(files_of(single))
    assert hashes(d1.hash(big)) == want_big
    assert hashes(d1.hash(single)) == want_single
    assert d1.ctl("pin", str(big)).returncode == 0
    fds_loaded = n_fds(d1.pid)
    assert d1.stop() == 0
    assert "Handed 2 host entries (3 slabs" in d1.log()
    # The index and a slab per file, each under its own name.
    assert systemd.names() == ["weightd-index", "weightd-slab-0", "weightd-slab-1", "weightd-slab-2"]

    # One file changes while no daemon runs: same inode and size, other bytes.
    time.sleep(TICK)
    with open(single, "r+b") as f:
        f.seek(single.stat().st_size - 4096)
        f.write(random.Random("after").randbytes(4096))
    want_single_new = expected(files_of(single))
    assert want_single_new != want_single

    # Started as systemd starts a socket-activated service: the socket
    # unit's socket first, then the store's descriptors.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(workdir / f"activated-{os.getpid()}.sock"))
    listener.listen(16)
    d2 = managed([tmp_root], listener=listener, **config)
    listener.close()
    log = d2.log()
    assert "Adopted 1 of 2 host entries" in log, log
    assert f"Not adopting {single} from the service manager's store: {single} changed" in log, log
    if pages == "hugetlb":
        # The adopted slabs hold their huge pages: the pool adds the rest of
        # the budget only.
        held = sum(-(-p.stat().st_size // (2 << 20)) for p in files_of(big))
        assert f"hugetlb pool: reserved {32 - held} pages of 2 MiB" in log, log
    # Everything taken was removed from the store again.
    systemd.settle()
    assert systemd.names() == []
    assert sum("FDSTOREREMOVE=1" in m for m in systemd.messages) == 4

    st = d2.status()
    assert st["socket"] == d2.socket
    assert st["host_used_bytes"] == size_of(big)
    assert st["storage_read_bytes"] == 0
    [e] = d2.ls()
    assert (e["model"], e["state"], e["pinned"]) == (str(big), "resident", True)
    # Two descriptors per slab (the daemon's and the read-only one clients
    # get), the index closed.
    assert len(memfds(d2.pid)) == 4 and not any("weightd-index" in m for m in memfds(d2.pid))

    # Served from the adopted memory: the same bytes, nothing read.
    before = rchar(d2.pid)
    assert hashes(d2.hash(big)) == want_big
    assert d2.status()["storage_read_bytes"] == 0
    assert rchar(d2.pid) - before < size_of(big) // 8, "the adopted component was read again"
    # The changed file: read again, the new bytes.
    assert hashes(d2.hash(single)) == want_single_new
    assert d2.status()["storage_read_bytes"] >= single.stat().st_size
    assert n_fds(d2.pid) == fds_loaded
    assert page_sizes(d2.pid, "model-00001-of-00002.safetensors") == {"2048 kB" if pages == "hugetlb" else "4 kB"}

    # And once more: what was adopted goes back to the store with the rest.
    assert d2.stop() == 0
    os.unlink(d2.socket)
    assert "Handed 2 host entries (3 slabs" in d2.log()
    d3 = managed([tmp_root], **config)
    assert "Adopted 2 of 2 host entries" in d3.log(), d3.log()
    assert hashes(d3.hash(single)) == want_single_new
    assert hashes(d3.hash(big)) == want_big
    assert d3.status()["storage_read_bytes"] == 0


def sealed_memfd(data, seal=True):
    fd = os.memfd_create("weightd-index", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
    return fd


def index_bytes(systemd):
    with systemd.lock:
        [fd] = [fd for n, fd in systemd.store if n == "weightd-index"]
    return os.pread(fd, 1 << 20, 0)


@pytest.mark.parametrize("damage", ["checksum", "truncated", "version", "unsealed", "missing", "two"])
def test_broken_index_is_refused(managed, systemd, tmp_root, models, damage):
    big, single = models
    d1 = managed([tmp_root])
    want_big = expected(files_of(big))
    assert hashes(d1.hash(big)) == want_big
    assert hashes(d1.hash(single)) == expected(files_of(single))
    fds_loaded = n_fds(d1.pid)
    assert d1.stop() == 0
    data = bytearray(index_bytes(systemd))
    if damage == "checksum":
        data[-3] ^= 0x40
        systemd.replace("weightd-index", sealed_memfd(bytes(data)))
        reason = "the checksum does not match"
    elif damage == "truncated":
        systemd.replace("weightd-index", sealed_memfd(bytes(data[:len(data) - 17])))
        reason = "bytes of entries"
    elif damage == "version":
        data[8] = 9
        systemd.replace("weightd-index", sealed_memfd(bytes(data)))
        reason = "version 9"
    elif damage == "unsealed":
        systemd.replace("weightd-index", sealed_memfd(bytes(data), seal=False))
        reason = "not a sealed memfd"
    elif damage == "missing":
        systemd.replace("weightd-index", None)
        reason = "holds 3 slabs and 0 indexes"
    else:
        with systemd.lock:
            systemd.store.append(("weightd-index", sealed_memfd(bytes(data))))
        reason = "holds 3 slabs and 2 indexes"

    d2 = managed([tmp_root])
    log = d2.log()
    assert reason in log, log
    assert "Adopted" not in log
    systemd.settle()
    assert systemd.names() == []
    st = d2.status()
    assert (st["host_used_bytes"], len(d2.ls())) == (0, 0)
    assert memfds(d2.pid) == []
    # It serves as after a cold start: read from storage, the files' bytes.
    assert hashes(d2.hash(big)) == want_big
    assert d2.status()["storage_read_bytes"] >= size_of(big)
    assert hashes(d2.hash(single)) == expected(files_of(single))
    assert n_fds(d2.pid) == fds_loaded


def test_stray_descriptor_is_closed(managed, systemd, tmp_root, models):
    """A descriptor in the store that is not weightd's (no FDNAME=, so
    "stored") is closed and removed with a warning; the rest is adopted."""
    big, _ = models
    d1 = managed([tmp_root])
    d1.hash(big)
    assert d1.stop() == 0
    r, w = os.pipe()
    os.close(w)
    with systemd.lock:
        systemd.store.insert(0, ("stored", r))
    d2 = managed([tmp_root])
    log = d2.log()
    assert 'named "stored" that is neither a listening Unix stream socket nor weightd\'s' in log, log
    assert "Adopted 1 of 1 host entries" in log, log
    systemd.settle()
    assert systemd.names() == []
    assert d2.status()["storage_read_bytes"] == 0 and hashes(d2.hash(big)) == expected(files_of(big))


def test_store_limit_drops_the_least_recently_used(managed, systemd, tmp_root, models):
    """Where systemd says its limit ($FDSTORE, systemd 254 and later), only
    whole components that fit are handed over, most recently used first."""
    big, single = models
    d1 = managed([tmp_root], env={"FDSTORE": "3"})
    assert hashes(d1.hash(single)) == expected(files_of(single))
    assert hashes(d1.hash(big)) == expected(files_of(big))  # the most recent: two slabs, with the index three
    assert d1.stop() == 0
    assert systemd.names() == ["weightd-index", "weightd-slab-0", "weightd-slab-1"]
    d2 = managed([tmp_root])
    assert "Adopted 1 of 1 host entries" in d2.log()
    assert [e["model"] for e in d2.ls()] == [str(big)]


def test_slab_missing_from_the_store(managed, systemd, tmp_root, models):
    """A slab systemd refused (past FileDescriptorStoreMax=) drops its
    component only."""
    big, single = models
    d1 = managed([tmp_root])
    d1.hash(big)
    d1.hash(single)  # the most recent: slab 0
    assert d1.stop() == 0
    systemd.replace("weightd-slab-2", None)  # one of big's two
    d2 = managed([tmp_root])
    log = d2.log()
    assert "Adopted 1 of 2 host entries" in log, log
    assert f"Not adopting {big} from the service manager's store: 1 of its 2 slabs are not in the store" in log
    assert [e["model"] for e in d2.ls()] == [str(single)]
    assert hashes(d2.hash(big)) == expected(files_of(big))


def test_no_store_without_a_service_manager(start_daemon, tmp_root, models):
    """Without NOTIFY_SOCKET the daemon exits as before: nothing handed over."""
    big, _ = models
    d = start_daemon(roots=[tmp_root])
    d.hash(big)
    assert d.stop() == 0
    assert "service manager's store" not in d.log()


def test_unit_keeps_a_store():
    text = (REPO / "systemd" / "weightd.service.in").read_text()
    values = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("FileDescriptorStoreMax=")]
    assert values and int(values[-1]) >= 4096


@pytest.mark.skipif(not emulated_build(), reason="not a -Dgpu_emulation=true build (no emulated GPUs)")
def test_device_slab_of_a_worker_across_the_restart(managed, systemd, tmp_root, models):
    """A worker's device slab keeps its bytes across the restart (the worker
    holds it); the host copy comes back from the store, so loading the
    device again reads nothing from storage."""
    import test_device_emulated as emu
    big, _ = models
    env = {"WEIGHTD_EMULATED_GPUS": emu.EMU}
    d1 = emu.wait_gpu(managed([tmp_root], env=env, keep_host="yes"))
    files = files_of(big)
    with d1.raw() as c:
        load, fd = emu.load_ok(c, big)
        kept = os.dup(fd)
        m, _ = emu.check_slab(load, fd, files, 0)
        m.close()
    assert d1.stop() == 0
    assert "Handed 1 host entry (2 slabs" in d1.log()

    d2 = emu.wait_gpu(managed([tmp_root], env=env, keep_host="yes"))
    assert "Adopted 1 of 1 host entries" in d2.log(), d2.log()
    # The old daemon is gone; the worker's device memory is not.
    m, _ = emu.check_slab(load, kept, files, 0)
    m.close()
    with d2.raw() as c:
        load2, fd2 = emu.load_ok(c, big)
        m, _ = emu.check_slab(load2, fd2, files, 0)
        m.close()
    assert d2.status()["storage_read_bytes"] == 0
