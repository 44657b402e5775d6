"""The harness of the integration tests: the real weightd on a private socket.

Nothing is built here.  The binaries come from the build directory in
$WD_BUILD (default: the repository's build/): daemon/weightd,
client/weightctl/weightctl and tests/integration/wd-test-client.  Test data
is a private copy of $WD_BUILD/tests/testdata, so tests may change files and
the model roots hold no symlinks the tests did not put there.

Each daemon gets a fresh directory under a session directory in /tmp (mode
0755, so processes run as nobody can reach its socket), a config file written
by the test, and its stderr in a log file.  On teardown it is sent SIGTERM
and must exit 0 and remove its socket.
"""
import json
import os
import pathlib
import select
import signal
import socket
import subprocess
import tempfile
import time

import wdwire

REPO = pathlib.Path(__file__).resolve().parents[2]
BUILD = pathlib.Path(os.environ.get("WD_BUILD") or REPO / "build").resolve()
TESTDATA_SRC = BUILD / "tests" / "testdata"

NOBODY = 65534
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]

def emulated_build():
    """Whether BUILD was configured with -Dgpu_emulation=true (emulated GPUs)."""
    try:
        with open(BUILD / "meson-info" / "intro-buildoptions.json") as f:
            opts = {o["name"]: o["value"] for o in json.load(f)}
    except (OSError, ValueError):
        return False
    return opts.get("gpu_emulation") is True


# Which section each config key lives in.
SECTIONS = {
    "socket": "daemon", "model_roots": "daemon", "allow_uids": "daemon", "allow_gids": "daemon",
    "max_connections": "daemon", "max_connections_per_uid": "daemon", "max_pending_requests": "daemon", "hello_timeout": "daemon",
    "max_frame_size": "daemon", "max_request_size": "daemon", "frame_timeout": "daemon", "log_level": "daemon",
    "host_budget": "memory", "host_pages": "memory", "hugetlb_reserve": "memory", "ready_after_touch": "memory",
    "queue_depth": "io", "chunk_size": "io", "direct_io": "io",
    "budget": "gpu", "device_budgets": "gpu", "keep_host": "gpu", "devices": "gpu",
    "listen": "metrics",
}

# Direct reads of 64 KiB, one at a time: a 256 MiB load lasts most of a
# second, long enough to act in the middle of it.
SLOW = {"direct_io": "on", "queue_depth": 1, "chunk_size": "64K"}

# Lines in a daemon's log that mean a sanitizer caught something (when
# $WD_BUILD is a sanitizer build).
SANITIZER_MARKS = ("AddressSanitizer", "LeakSanitizer", "ThreadSanitizer", "runtime error:")


class Bins:
    def __init__(self, build):
        self.weightd = build / "daemon" / "weightd"
        self.weightctl = build / "client" / "weightctl" / "weightctl"
        self.client = build / "tests" / "integration" / "wd-test-client"
        self.make_model = REPO / "tests" / "bench" / "make-model"


def make_dir(parent, prefix):
    d = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    d.chmod(0o755)
    return d


def run(cmd, *, user=None, timeout=60, **kw):
    if user == "nobody":
        cmd = AS_NOBODY + [str(c) for c in cmd]
    return subprocess.run([str(c) for c in cmd], capture_output=True, timeout=timeout, **kw)


def read_line(proc, timeout):
    """One line of a child's stdout, or None if none came in time."""
    deadline = time.monotonic() + timeout
    buf = b""
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        c = os.read(fd, 1)
        if not c:
            break
        buf += c
        if c == b"\n":
            return buf.decode()
    return None


def wait_until(cond, timeout=10.0, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Daemon:
    def __init__(self, bins, base, roots, config, env=None):
        self.bins = bins
        self.env = env  # extra environment variables for weightd
        self.dir = make_dir(base, "daemon-")
        self.socket = str(self.dir / "weightd.sock")
        self.config_path = self.dir / "weightd.conf"
        self.log_path = self.dir / "weightd.log"
        # hugetlb_reserve off: a test daemon (as root) would otherwise add
        # its budget's worth of pages to the node's hugetlb pool at start;
        # the tests of that pass hugetlb_reserve themselves.
        self.settings = {"socket": self.socket, "model_roots": ":".join(str(r) for r in roots),
                         "log_level": "debug", "host_budget": "2G", "hugetlb_reserve": "off"}
        self.settings.update(config)
        # No metrics endpoint unless a test asks for one: daemons side by
        # side would contend for one port.
        self.settings.setdefault("listen", "")
        self.write_config()
        self.proc = None
        self.returncode = None
        self.killed = False
        self.children = []
        # Arguments put before weightd's own, for a program that execs it
        # (["prlimit", "--nofile=1024:1024"]): the pid stays weightd's.
        self.wrap = []

    # ---- configuration and lifecycle ----

    def config_text(self, settings=None):
        settings = self.settings if settings is None else settings
        out = []
        for section in ("daemon", "memory", "io", "gpu", "metrics"):
            keys = [k for k in settings if SECTIONS[k] == section and settings[k] is not None]
            if keys:
                out.append(f"[{section}]")
                out += [f"{k} = {settings[k]}" for k in keys]
        return "\n".join(out) + "\n"

    def write_config(self, **changes):
        self.settings.update(changes)
        self.config_path.write_text(self.config_text())

    def start(self):
        log = open(self.log_path, "ab")
        env = {**os.environ, **self.env} if self.env else None
        self.proc = subprocess.Popen([*map(str, self.wrap), str(self.bins.weightd), "--config", str(self.config_path)],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        log.close()
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"weightd exited with {self.proc.returncode} at start:\n{self.log()}")
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(self.socket)
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"weightd does not accept on {self.socket}:\n{self.log()}")
                time.sleep(0.01)

    @property
    def pid(self):
        return self.proc.pid

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=15):
        """SIGTERM; returns the exit status."""
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
            self.returncode = self.proc.wait(timeout)
        elif self.proc is not None:
            self.returncode = self.proc.returncode
        return self.returncode

    def kill(self):
        self.killed = True
        self.proc.kill()
        self.proc.wait(10)

    def hup(self):
        self.proc.send_signal(signal.SIGHUP)

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text, timeout=5.0, start=0):
        """Wait until the log (from byte start) contains text; returns the log."""
        return wait_until(lambda: text in self.log()[start:] and self.log(), timeout, what=f"log line {text!r}")

    def finish(self):
        for p in self.children:
            if p.poll() is None:
                p.kill()
                p.wait()
        if self.killed or self.proc is None:
            return
        rc = self.stop()
        log = self.log()
        assert rc == 0, f"weightd exited with {rc} on SIGTERM:\n{log[-4000:]}"
        assert not os.path.exists(self.socket), "weightd left its socket behind"
        for mark in SANITIZER_MARKS:
            assert mark not in log, f"sanitizer report in the daemon's log:\n{log[-4000:]}"

    # ---- clients ----

    def ctl(self, *args, user=None, timeout=60):
        return run([self.bins.weightctl, "--socket", self.socket, *args], user=user, timeout=timeout)

    def ctl_json(self, *args, user=None):
        r = self.ctl(*args, "--json", user=user)
        assert r.returncode == 0, f"weightctl {' '.join(map(str, args))}: {r.stderr.decode()}"
        return json.loads(r.stdout)

    def status(self, user=None):
        return self.ctl_json("status", user=user)

    def ls(self):
        return self.ctl_json("ls")

    def client(self, cmd, model, *args, user=None, timeout=120):
        return run([self.bins.client, cmd, self.socket, model, *args], user=user, timeout=timeout)

    def spawn_client(self, cmd, model, *args, user=None):
        argv = [str(self.bins.client), cmd, self.socket, str(model), *map(str, args)]
        if user == "nobody":
            argv = AS_NOBODY + argv
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.children.append(p)
        return p

    def hold(self, model, component=""):
        """A client that loads and keeps its lease; returns its Popen once loaded."""
        p = self.spawn_client("hold", model, component)
        line = read_line(p, 30)
        assert line == "ready\n", f"hold client: {line!r} {p.stderr.read1().decode() if p.poll() is not None else ''}"
        return p

    def hash(self, model, component="", user=None):
        r = self.client("hash", str(model), component, user=user)
        assert r.returncode == 0, f"wd-test-client hash {model} {component}: {r.stderr.decode()}"
        return json.loads(r.stdout)

    def raw(self, timeout=10.0):
        return wdwire.connect(self.socket, timeout)


def entries_by_key(ls):
    return {(e["model"], e["component"]): e for e in ls}


def mapped_hashes(conn, load_reply):
    """{name: xxh3_128} of a LoadReply's tensors, read through read-only
    mappings of the memfds that came with it (which conn then closes)."""
    import mmap

    import xxhash

    slabs = load_reply.msgs(4)
    fds = conn.take_fds(len(slabs))
    assert len(fds) == len(slabs), "fewer descriptors than slabs"
    maps = []
    try:
        for s in slabs:
            maps.append(mmap.mmap(fds[s.int(1)], s.int(3), mmap.MAP_SHARED, mmap.PROT_READ))
        return {name: xxhash.xxh3_128_hexdigest(maps[slab][off:off + n])
                for name, _dt, _shape, slab, off, n in wdwire.tensors_of(load_reply)}
    finally:
        for m in maps:
            m.close()
        for fd in fds:
            os.close(fd)
