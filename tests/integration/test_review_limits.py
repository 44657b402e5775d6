"""Regression tests for the limits the 2026-12 server review found missing
(findings 6, 7, 8, 10, 12 and 14, and two of its smaller notes), each on
the real weightd over the raw wire (wdwire.py), as the review's repro
scripts drove it.

Every test here works with the daemon's defaults where it can, so that it
runs against a daemon built before the fix too (and fails there).  The one
that needs a larger request limit asks for it only when the daemon knows
the key (an older daemon's single frame limit was 16 MiB anyway).

Time limits are generous for the ASan and TSan builds on two cores, and
still well apart from what the old daemon did (noted at each test).
"""
import errno
import fcntl
import json
import mmap
import os
import select
import shutil
import socket
import struct
import subprocess
import threading
import time

import pytest

import wdwire
from harness import BUILD, NOBODY, Daemon, make_dir, wait_until
from reference import write_safetensors
from wdwire import EVICT, LOAD, PREFETCH, RELEASE, TENSORS, envelope, f_bytes, f_varint, frame, load_body, ref_body

MIB = 1 << 20


def _thread_sanitizer():
    try:
        with open(BUILD / "meson-info" / "intro-buildoptions.json") as f:
            opts = {o["name"]: o["value"] for o in json.load(f)}
    except OSError:
        return False
    return "thread" in str(opts.get("b_sanitize", ""))


# ThreadSanitizer keeps shadow memory for every byte the daemon touches
# (several times the byte), which its RSS shows: bounds on the daemon's RSS
# growth are scaled by this in a TSan build.
RSS_SCALE = 4 if _thread_sanitizer() else 1


def proc_kib(pid, key):
    """A "Key: N kB" line of /proc/PID/status (VmRSS, VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def meminfo(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def nofile_limits(pid):
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no 'Max open files' line")


def knows_key(bins, workdir, section, key, value):
    """Whether this weightd accepts a config key (older ones refuse unknown keys)."""
    d = make_dir(workdir, "check-")
    try:
        conf = d / "c.conf"
        conf.write_text(f"[{section}]\n{key} = {value}\n")
        r = subprocess.run([str(bins.weightd), "--check-config", "--config", str(conf)], capture_output=True)
        return r.returncode == 0
    finally:
        shutil.rmtree(d, ignore_errors=True)


def closed_by_daemon(c, timeout):
    """Read and drop everything until the daemon closes c; False if it kept it open."""
    c.sock.settimeout(timeout)
    try:
        while c.sock.recv(1 << 20):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except socket.timeout:
        return False
    return True


def reply_size(d, field, body):
    """Bytes of the reply frame to one request (read whole, then dropped)."""
    with d.raw(timeout=60) as c:
        rid = c.send(field, body)
        while len(c.buf) < 4:
            c._fill()
        (n,) = struct.unpack_from("<I", c.buf)
        env = c.wait(rid)
        assert env.code == "OK", env.message
        return 4 + n


def in_child(fn, *args):
    """Run fn(*args) in a forked child (which may change its credentials);
    return what it returned (JSON-able), or raise what it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.close(r)
            try:
                out = {"ok": fn(*args)}
            except BaseException as e:  # noqa: BLE001
                out = {"error": f"{type(e).__name__}: {e}"}
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    out = json.loads(data or b'{"error": "the child said nothing"}')
    if "error" in out:
        raise AssertionError(f"in the child: {out['error']}")
    return out["ok"]


# ---- finding 6: the host budget bounds host memory -----------------------------

def test_kept_descriptors_do_not_hold_memory_beyond_the_budget(start_daemon, make_model):
    """Review finding 6, repro r5: a peer keeps every memfd it is sent,
    releases its lease and evicts the model, eight times over, under a 100 MiB
    budget.  Once no lease holds a slab the daemon truncates it, so the kept
    descriptors hold nothing and Shmem grows by no more than the budget.
    The old daemon: 16 kept descriptors holding 512 MiB, Shmem +513 MiB,
    host_used 0."""
    model = make_model("64M", 2)
    budget = 100 * MIB
    d = start_daemon(roots=[model.parent], host_budget="100M")
    kept = []

    def held():
        return sum(os.fstat(fd).st_blocks * 512 for fd in kept)

    shmem_before = meminfo("Shmem")
    try:
        with d.raw(timeout=120) as c:
            for i in range(8):
                env = c.request(LOAD, load_body(str(model)))
                assert env.code == "OK", env.message
                lr = env.reply.msg(11)
                fds = c.take_fds(len(lr.msgs(4)))
                assert len(fds) == 2
                kept += fds
                env = c.request(RELEASE, f_varint(1, lr.int(1)))
                assert env.code == "OK", env.message
                env = c.request(EVICT, ref_body(str(model)))
                assert env.code == "OK", (i, env.message)
            st = c.status()
            assert (st["host_used_bytes"], st["leases"], st["entries"]) == (0, 0, 0), st
        try:
            wait_until(lambda: held() == 0, timeout=10, what="the evicted slabs to be truncated")
        except AssertionError:
            raise AssertionError(f"{len(kept)} descriptors kept by the client still hold {held() // MIB} MiB "
                                 f"after Release and Evict (budget {budget // MIB} MiB)") from None
        for fd in kept:
            assert os.fstat(fd).st_size == 0
        grew = meminfo("Shmem") - shmem_before
        # Other processes on the machine use shmem too: allow for some noise.
        assert grew <= budget + 32 * MIB, f"Shmem grew by {grew // MIB} MiB with a {budget // MIB} MiB budget"
    finally:
        for fd in kept:
            os.close(fd)


def _check_slab_descriptors(sock_path, model):
    """In a child as nobody: load, then try to change what was sent."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    out = []
    with wdwire.connect(sock_path, 30) as c:
        env = c.request(LOAD, load_body(model))
        assert env.code == "OK", env.message
        slabs = env.reply.msg(11).msgs(4)
        fds = c.take_fds(len(slabs))
        assert len(fds) == len(slabs) > 0
        for s in slabs:
            fd = fds[s.int(1)]
            size = os.fstat(fd).st_size
            res = {"size": s.int(2), "accmode": fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE,
                   "mode": os.fstat(fd).st_mode & 0o7777}

            def errno_of(fn):
                try:
                    fn()
                    return 0
                except OSError as e:
                    return e.errno

            def reopen():
                rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
                # Opened: can it write through it or resize it?
                res["rw_write"] = errno_of(lambda: os.pwrite(rw, b"x", 0))
                res["rw_shrink"] = errno_of(lambda: os.ftruncate(rw, 0))
                os.close(rw)

            res["reopen_rw"] = errno_of(reopen)
            res["shrink"] = errno_of(lambda: os.ftruncate(fd, 0))
            res["grow"] = errno_of(lambda: os.ftruncate(fd, size + (64 << 20)))
            res["write"] = errno_of(lambda: os.pwrite(fd, b"x", 0))
            res["map_write"] = errno_of(lambda: mmap.mmap(fd, s.int(3), mmap.MAP_SHARED,
                                                          mmap.PROT_READ | mmap.PROT_WRITE).close())
            res["chmod"] = errno_of(lambda: os.fchmod(fd, 0o666))
            res["size_after"] = os.fstat(fd).st_size
            res["size_before"] = size
            out.append(res)
        for fd in fds:
            os.close(fd)
    return out


def test_a_client_cannot_write_grow_or_shrink_a_slab(start_daemon, testdata):
    """Review finding 6, the other half: slabs are no longer sealed against
    shrinking (the daemon truncates them), so a client must not be able to:
    the descriptor is O_RDONLY of a 0444 memfd; another uid gets EACCES
    reopening it read-write through /proc/self/fd, EINVAL (not writable) or
    EPERM (sealed) from ftruncate() either way, and no write or writable
    mapping.  The old daemon sent an O_RDWR descriptor of a 0777 memfd that
    nobody could reopen read-write (the seals still refused the writes)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become another uid")
    d = start_daemon(allow_uids=NOBODY)
    model = str(testdata / "models" / "sharded")
    for res in in_child(_check_slab_descriptors, d.socket, model):
        why = json.dumps(res)
        assert res["accmode"] == os.O_RDONLY, why
        assert res["mode"] == 0o444, why
        assert res["reopen_rw"] == errno.EACCES, why
        assert res["shrink"] in (errno.EINVAL, errno.EPERM), why
        assert res["grow"] in (errno.EINVAL, errno.EPERM), why
        assert res["write"] in (errno.EBADF, errno.EPERM), why
        assert res["map_write"] in (errno.EACCES, errno.EPERM), why
        assert res["chmod"] == errno.EPERM, why
        assert res["size_after"] == res["size_before"] >= res["size"], why


# ---- finding 7: decoding is bounded by the request's size ----------------------

def test_a_load_of_millions_of_empty_shard_rules(daemon, testdata):
    """Review finding 7, repro r14: one Load of a 16 MiB frame holding
    8,388,508 empty ShardRules (2 bytes each on the wire).  It is refused
    at once (by the request size limit, or by the decoding budget) without
    the daemon's peak RSS growing, and a Status on another connection is
    answered meanwhile.  The old daemon (release build): answered
    INVALID_ARGUMENT after 2.3 s, a Status waited 2.25 s, VmHWM 723 MiB."""
    d = daemon
    model = str(testdata / "models" / "plain")
    shard = f_varint(1, 0) + f_varint(2, 2) + f_bytes(3, b"") * (((16 << 20) - 200) // 2)
    payload = frame(envelope(5, LOAD, load_body(model, shard=shard)))
    assert len(payload) <= (16 << 20) + 4  # the old daemon's frame limit: it decodes this
    hwm_before = proc_kib(d.pid, "VmHWM")

    watcher = d.raw(timeout=120)
    latencies = []
    stop = threading.Event()

    def poll_status():
        while not stop.is_set():
            t = time.monotonic()
            watcher.status()
            latencies.append(time.monotonic() - t)
            time.sleep(0.005)

    th = threading.Thread(target=poll_status)
    th.start()
    try:
        a = d.raw(timeout=120)
        t0 = time.monotonic()
        try:
            a.send_raw(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # disconnected at the length prefix
        try:
            env = a.recv()
            outcome = f"{env.code} {env.message[:80]}"
            assert env.code != "OK", outcome
        except (wdwire.Closed, ConnectionResetError):
            outcome = "disconnected"
        refused_after = time.monotonic() - t0
        a.close()
        time.sleep(0.5)
    finally:
        stop.set()
        th.join()
        watcher.close()
    grew = proc_kib(d.pid, "VmHWM") - hwm_before
    seen = (f"refused ({outcome}) after {refused_after:.2f} s, the daemon's peak RSS grew by {grew // MIB} MiB, "
            f"a Status on another connection waited up to {max(latencies, default=float('inf')):.2f} s")
    assert grew < 64 * MIB * RSS_SCALE, seen
    assert refused_after < 2.0, seen
    assert latencies and max(latencies) < 1.0, seen
    assert d.running()


# ---- finding 8: input buffers have a deadline and a per-uid charge ------------

PARTIAL = struct.pack("<I", 16 << 20) + b"\0" * ((16 << 20) - 1)  # one byte short of a 16 MiB frame


def send_partial_frames(d, n):
    """n connections, each Hello then all but the last byte of a 16 MiB frame;
    returns them and how many the daemon closed while they sent."""
    conns, cut = [], 0
    for _ in range(n):
        c = d.raw(timeout=60)
        conns.append(c)
        try:
            c.send_raw(PARTIAL)
        except (BrokenPipeError, ConnectionResetError):
            cut += 1
    return conns, cut


def test_partial_frames_over_the_request_limit(daemon, testdata):
    """Review finding 8, repro r8, default configuration: 32 connections
    each send Hello and then 16 MiB - 1 bytes of a 16 MiB frame.  The length
    prefix is over max_request_size, so each is disconnected at once and the
    daemon's RSS stays where it was; a frame under the limit that stops in
    the middle is closed after frame_timeout (10 s by default).  The old
    daemon: all 32 held, RSS +512 MiB, 33 connections, for as long as the
    peers like."""
    d = daemon
    small = d.raw(timeout=60)
    small.send_raw(struct.pack("<I", 1000) + b"\0" * 10)  # a frame under the limit, never finished
    t_small = time.monotonic()
    rss_before = proc_kib(d.pid, "VmRSS")
    conns, _cut = send_partial_frames(d, 32)
    try:
        time.sleep(0.5)
        grew = proc_kib(d.pid, "VmRSS") - rss_before
        with d.raw() as c:
            st = c.status()
        assert grew < 64 * MIB * RSS_SCALE, f"32 partial 16 MiB frames: the daemon's RSS grew by {grew // MIB} MiB"
        assert st["connections"] <= 2, f"{st['connections']} connections after 32 partial 16 MiB frames"
        assert all(closed_by_daemon(c, 10) for c in conns)
        # The small one: closed by the frame deadline.
        assert closed_by_daemon(small, 25), "a frame left unfinished for 25 s is still waited for"
        waited = time.monotonic() - t_small
        assert 5 < waited < 25, f"the unfinished frame was closed after {waited:.1f} s"
        log = d.wait_log("a frame did not complete within 10 s, disconnecting", timeout=5)
        assert log.count(f"frame longer than the limit of {64 << 10} bytes, disconnecting") == 32
    finally:
        small.close()
        for c in conns:
            c.close()


def test_partial_frames_charged_to_the_uid_and_timed(bins, workdir, start_daemon):
    """Review finding 8 again, with a 16 MiB request limit (max_request_size
    = 16M where the daemon knows the key; the old daemon's one frame limit
    was 16 MiB): the input buffers of one uid's connections are charged to
    it and capped (64 MiB), so of 32 partial 16 MiB frames only a few are
    held, and those are closed by the frame deadline (10 s by default).
    The old daemon: all 32 held, RSS +516 MiB after 12 s."""
    cfg = {}
    if knows_key(bins, workdir, "daemon", "max_request_size", "16M"):
        cfg["max_request_size"] = "16M"
    d = start_daemon(**cfg)
    rss_before = proc_kib(d.pid, "VmRSS")
    t0 = time.monotonic()
    conns, cut = send_partial_frames(d, 32)
    try:
        time.sleep(0.5)
        grew = proc_kib(d.pid, "VmRSS") - rss_before
        with d.raw() as c:
            held = c.status()["connections"] - 1
        assert grew < 128 * MIB * RSS_SCALE, f"32 partial 16 MiB frames: the daemon's RSS grew by {grew // MIB} MiB"
        assert held <= 5, f"{held} connections with a partial 16 MiB frame held ({cut} cut while sending)"
        assert "buffer more than 67108864 bytes of requests" in d.log()
        # The ones held are closed by the frame deadline.
        for c in conns:
            assert closed_by_daemon(c, max(1.0, t0 + 25 - time.monotonic())), \
                "a partial frame is still held 25 s after it started"
        assert d.log().count("a frame did not complete within 10 s, disconnecting") == held
        with d.raw() as c:
            assert c.status()["connections"] == 1
    finally:
        for c in conns:
            c.close()


# ---- finding 10 and a smaller note: descriptors and queued replies -------------

@pytest.mark.parametrize("nofile", ["1024:1024", "1024:4096"])
def test_unread_loads_under_a_low_descriptor_limit(bins, workdir, testdata, nofile):
    """Review finding 10, repro r16: weightd under prlimit --nofile=SOFT:HARD
    runs with its soft limit raised to the hard one (/proc/PID/limits); 12
    connections pipeline 150 Loads each of a one-file model and never read.
    Queued replies hold a reference, not a duplicated descriptor each, so
    every Load is answered and another peer still connects and loads.  The
    old daemon: "cannot duplicate a slab descriptor: Too many open files",
    then accept4() failing ("pausing for 100 ms"), so new peers were not
    served."""
    if not shutil.which("prlimit"):
        pytest.skip("prlimit (util-linux) is not installed")
    d = Daemon(bins, workdir, [testdata / "good", testdata / "models"], {"log_level": "info"})
    d.wrap = ["prlimit", f"--nofile={nofile}"]
    d.start()
    conns = []
    try:
        hard = int(nofile.split(":")[1])
        assert nofile_limits(d.pid) == (hard, hard)
        many = str(testdata / "good" / "many.safetensors")
        frames = b"".join(frame(envelope(100 + i, LOAD, load_body(many))) for i in range(150))
        for _ in range(12):
            c = d.raw(timeout=60)
            c.send_raw(frames)
            conns.append(c)
        with d.raw(timeout=60) as w:
            try:
                wait_until(lambda: w.status()["leases"] == 12 * 150, timeout=30, interval=0.2,
                           what="1800 leases")
            except AssertionError:
                pass
            leases = w.status()["leases"]
        # Another peer: connects, says Hello, loads another model.
        with wdwire.Conn(d.socket, timeout=15) as c:
            c.hello()
            env = c.request(LOAD, load_body(str(testdata / "models" / "sharded")))
            assert env.code == "OK", env.message
            assert len(c.fds) == len(env.reply.msg(11).msgs(4)) > 0
        log = d.log()
        assert "Too many open files" not in log, log[-3000:]
        assert leases == 12 * 150
    finally:
        for c in conns:
            c.close()
        d.finish()


def metadata_model(root, name, meta_bytes):
    path = root / f"{name}.safetensors"
    write_safetensors(path, [("w", "U8", [8], bytes(range(8)))], {"k": "x" * meta_bytes})
    return str(path)


def test_the_uid_output_limit_closes_the_peer_that_does_not_read(start_daemon, tmp_root):
    """The review's smaller note on the per-uid output limit (256 MiB): six
    connections of uid 0 queue 251 MiB of replies in all and never read;
    a seventh, which reads, asks for a 12 MiB reply, which takes the uid over
    the limit.  The daemon disconnects a connection that does not read, and
    the healthy one gets its reply.  The old daemon disconnected the one
    whose reply went over: the healthy sibling."""
    m1 = metadata_model(tmp_root, "meta1", MIB)
    m12 = metadata_model(tmp_root, "meta12", 12 * MIB)
    d = start_daemon(roots=[tmp_root], log_level="info")
    r1 = reply_size(d, TENSORS, ref_body(m1))
    r12 = reply_size(d, TENSORS, ref_body(m12))
    assert r12 > 12 * MIB
    # About 251 MiB of replies over six connections, 42 MiB each.
    n = int(251.5 * MIB) // r1
    counts = [n // 6 + (i < n % 6) for i in range(6)]
    total = n * r1
    assert total < 255 * MIB and total + r12 > 260 * MIB and max(counts) * r1 < 60 * MIB
    stalled = []
    try:
        rss_before = proc_kib(d.pid, "VmRSS")
        for k in counts:
            c = d.raw(timeout=60)
            c.send_raw(b"".join(frame(envelope(100 + i, TENSORS, ref_body(m1))) for i in range(k)))
            stalled.append(c)
        # Wait until the replies are queued: the daemon's RSS holds them.
        wait_until(lambda: proc_kib(d.pid, "VmRSS") - rss_before > total * 0.9, timeout=60, interval=0.1,
                   what="the stalled connections' replies to be queued")
        assert "replies not read" not in d.log()
        mark = len(d.log())
        # The RSS only hints that every reply is queued (under ThreadSanitizer
        # its shadow memory passes the mark long before): the reading
        # connection asks again until its reply is the one that takes the uid
        # over the cap.  It must get every reply, and a connection that does
        # not read must be the one that goes.
        deadline = time.monotonic() + 90
        with d.raw(timeout=60) as healthy:
            while "replies not read over the connections of uid 0" not in d.log()[mark:]:
                assert time.monotonic() < deadline, "90 s of 12 MiB replies never took the uid over its output cap"
                try:
                    env = healthy.request(TENSORS, ref_body(m12))
                except (wdwire.Closed, ConnectionResetError):
                    raise AssertionError("the connection that reads was disconnected:\n" + d.log()[mark:]) from None
                assert env.code == "OK", env.message
                time.sleep(0.2)
            assert healthy.status()["connections"] >= 2
        assert sum(closed_by_daemon(c, 0.5) for c in stalled) >= 1
    finally:
        for c in stalled:
            c.close()


# ---- finding 12: a slow resolve does not hold up the others --------------------

def big_header_file(path, n):
    """A valid safetensors file of n empty tensors: a header of 60 n bytes."""
    body = ",".join(f'"t{i:07d}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(n))
    header = ("{" + body + "}").encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
    return str(path)


def test_a_resident_prefetch_while_another_header_is_parsed(start_daemon, make_model, tmp_root):
    """Review finding 12, repro r12: while one peer's Tensors makes the
    daemon parse an 84 MB header (1,400,000 tensors), another peer's
    Prefetch of a resident model is answered at once.  The old daemon
    (release build) held one lock around every resolve: the Prefetch took
    9.2 s."""
    model = make_model("64M", 2)
    big = big_header_file(tmp_root / "big.safetensors", 1_400_000)
    d = start_daemon(roots=[model.parent, tmp_root])
    with d.raw(timeout=120) as p, d.raw(timeout=600) as x:
        env = p.request(PREFETCH, load_body(str(model)))
        assert env.code == "OK", env.message
        t = time.monotonic()
        env = p.request(PREFETCH, load_body(str(model)))
        alone = time.monotonic() - t
        assert env.code == "OK" and env.reply.msg(11).int(7) == 1, env.message

        rid = x.send(TENSORS, ref_body(big))
        time.sleep(0.5)  # the parse is under way
        t = time.monotonic()
        env = p.request(PREFETCH, load_body(str(model)))
        during = time.monotonic() - t
        assert env.code == "OK", env.message
        parsing = not select.select([x.sock], [], [], 0)[0]
        assert during < 2.0, f"a resident Prefetch took {during:.2f} s (alone {alone:.3f} s) during another parse"
        assert parsing, "the header was parsed before the Prefetch was answered: the test proves nothing"
        env = x.wait(rid)
        assert env.code == "OK", env.message
        assert len(env.reply.msg(13).f.get(4, [])) == 1_400_000


# ---- finding 14: a large reply is delivered ------------------------------------

def test_a_reply_over_64_mib_is_delivered(start_daemon, tmp_root):
    """Review finding 14, repro r11: a valid file whose __metadata__ holds a
    70 MiB string.  Tensors and Load answer it OK, metadata whole (the
    frame being sent is not counted against the 64 MiB of unread replies
    queued behind it), and the connection stays.  The old daemon
    disconnected the client: "more than 67108864 bytes of replies not read,
    disconnecting"."""
    path = metadata_model(tmp_root, "meta70", 70 * MIB)
    d = start_daemon(roots=[tmp_root])
    with d.raw(timeout=120) as c:
        for field in (TENSORS, LOAD):
            try:
                env = c.request(field, ref_body(path) if field == TENSORS else load_body(path))
            except (wdwire.Closed, ConnectionResetError):
                raise AssertionError(f"request {field}: disconnected:\n{d.log()[-2000:]}") from None
            assert env.code == "OK", env.message
            result = env.reply.msg(13 if field == TENSORS else 11)
            files = result.msgs(3 if field == TENSORS else 4)
            assert len(files) == 1
            meta = {e.str(1): e.str(2) for e in files[0].msgs(5)}
            assert meta == {"k": "x" * (70 * MIB)}
        assert c.status()["connections"] == 1


# ---- a smaller note: peers with many supplementary groups ----------------------

def _hello_with_groups(sock_path, groups, uid):
    os.setgroups(groups)
    os.setgid(uid)
    os.setuid(uid)
    c = wdwire.Conn(sock_path, timeout=10)
    try:
        c.send(wdwire.HELLO, wdwire.hello_body())
        env = c.recv()  # the Hello's reply, or the refusal (id 0)
        return [env.id, env.code, env.message]
    except (wdwire.Closed, ConnectionResetError, BrokenPipeError) as e:
        return [None, "closed", type(e).__name__]
    finally:
        c.close()


def test_an_allowed_group_beyond_the_256th(start_daemon):
    """The review's smaller note: peer_allowed() read at most 256
    supplementary groups (SO_PEERGROUPS answers ERANGE for more), so a peer
    with 300 groups was refused even when an allowed one was among them.
    A peer of an unlisted uid whose 300th group is in allow_gids is served;
    one with 299 other groups is refused.  The old daemon refused both."""
    if os.geteuid() != 0:
        pytest.skip("needs root to set supplementary groups")
    base, uid = 100000, 23456
    d = start_daemon(allow_gids=base + 299)
    rid, code, msg = in_child(_hello_with_groups, d.socket, list(range(base, base + 300)), uid)
    assert (rid, code) == (1, "OK"), (rid, code, msg)
    rid, code, msg = in_child(_hello_with_groups, d.socket, list(range(base, base + 299)), uid)
    assert (rid, code) in ((0, "PERMISSION_DENIED"), (None, "closed")), (rid, code, msg)
