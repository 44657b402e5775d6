"""The service-manager protocol, without a service manager: weightd started
with NOTIFY_SOCKET pointing at a datagram socket of the test reports
READY=1 once it listens, STATUS= lines, RELOADING=1 and READY=1 around a
SIGHUP, and STOPPING=1 on SIGTERM; started with a listening socket passed
as fd 3 (LISTEN_FDS=1, LISTEN_PID), it serves on that socket and does not
remove it on exit (the socket unit owns it).  Started with a low soft limit on
open files it raises it to the hard limit, and the unit sets LimitNOFILE=."""
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import time

import pytest

from harness import AS_NOBODY, BUILD, REPO, make_dir  # noqa: F401  (harness sets up sys.path users)


def notify_messages(sock, timeout):
    """Datagrams received until timeout, as decoded strings."""
    out = []
    sock.settimeout(0.1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            out.append(sock.recv(4096).decode())
        except socket.timeout:
            pass
    return out


def wait_for(sock, text, timeout=10.0):
    seen = []
    deadline = time.monotonic() + timeout
    sock.settimeout(0.1)
    while time.monotonic() < deadline:
        try:
            m = sock.recv(4096).decode()
        except socket.timeout:
            continue
        seen.append(m)
        if text in m:
            return seen
    raise AssertionError(f"no {text!r} from weightd; got {seen}")


def write_config(d, roots, sock_path, memory=""):
    """As root the daemon adds its host budget's worth of hugetlb pages
    at start: 64 MiB here, not half the machine."""
    conf = d / "weightd.conf"
    conf.write_text(f"[daemon]\nsocket = {sock_path}\nmodel_roots = {roots}\n"
                    f"[memory]\nhost_budget = 64M\n{memory}")
    return conf


def test_notify_ready_status_reload_stopping(bins, workdir, testdata):
    d = make_dir(workdir, "notify-")
    ns_path = str(d / "notify.sock")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(ns_path)
    sock_path = str(d / "weightd.sock")
    conf = write_config(d, testdata / "models", sock_path)
    env = dict(os.environ, NOTIFY_SOCKET=ns_path)
    p = subprocess.Popen([str(bins.weightd), "--config", str(conf)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        seen = wait_for(ns, "READY=1")
        # READY=1 comes once the socket accepts.
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(sock_path)
        seen += wait_for(ns, "STATUS=")
        assert any("components" in m and "connections" in m for m in seen), seen

        # A reload is announced, then readiness again.
        p.send_signal(1)  # SIGHUP
        seen = wait_for(ns, "RELOADING=1")
        assert any("MONOTONIC_USEC=" in m for m in seen), seen
        wait_for(ns, "READY=1")

        p.terminate()
        wait_for(ns, "STOPPING=1")
        assert p.wait(15) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        ns.close()


NR_HUGEPAGES = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(NR_HUGEPAGES),
                    reason="needs root and a 2 MiB hugetlb pool: the daemon adds pages to it")
@pytest.mark.parametrize("wait", [True, False])
def test_ready_waits_for_the_hugetlb_touch(bins, workdir, testdata, wait):
    """[memory] ready_after_touch (default yes): READY=1 comes once the pool
    the daemon added at start is touched, so that the first load after
    `systemctl start` returns lands on touched pages; STATUS= says what it
    waits for, and the socket serves meanwhile.  With no, READY=1 comes at
    once, as without a pool."""
    d = make_dir(workdir, "touch-")
    ns_path = str(d / "notify.sock")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(ns_path)
    sock_path = str(d / "weightd.sock")
    conf = write_config(d, testdata / "models", sock_path,
                        "hugetlb_reserve = auto\n" + ("" if wait else "ready_after_touch = no\n"))
    env = dict(os.environ, NOTIFY_SOCKET=ns_path)
    p = subprocess.Popen([str(bins.weightd), "--config", str(conf)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        seen = wait_for(ns, "READY=1", timeout=60)
        r = subprocess.run([str(bins.weightctl), "--socket", sock_path, "status", "--json"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        pool = json.loads(r.stdout)["hugetlb_pool"]
        if not pool["reserved_bytes"]:
            pytest.skip(f"the kernel added no 2 MiB pages for the daemon: {pool['state']}")
        waited = [m for m in seen if m.startswith("STATUS=not ready: touching the hugetlb pool")]
        if wait:
            assert waited, seen
            assert pool["state"] == "ready", pool
        else:
            assert not waited, seen
        p.terminate()
        assert p.wait(15) == 0
        log = p.stderr.read().decode()
        assert ("Ready, " in log and "the hugetlb pool is touched" in log) == wait, log
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        ns.close()


def test_socket_activation(bins, workdir, testdata):
    d = make_dir(workdir, "activation-")
    sock_path = str(d / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(16)
    # The config names another path: an activated daemon must not bind it.
    conf = write_config(d, testdata / "models", str(d / "configured.sock"))
    # LISTEN_PID must be weightd's pid: the shell execs it, keeping its own
    # (bash: dash takes no descriptor numbers above 9).
    cmd = ("exec 3<&%d; LISTEN_FDS=1 LISTEN_PID=$$ exec %s --config %s"
           % (listener.fileno(), bins.weightd, conf))
    p = subprocess.Popen(["bash", "-c", cmd], pass_fds=[listener.fileno()],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    listener.close()
    try:
        deadline = time.monotonic() + 10
        while True:
            r = subprocess.run([str(bins.weightctl), "--socket", sock_path, "status", "--json"],
                               capture_output=True, text=True)
            if r.returncode == 0:
                break
            if time.monotonic() > deadline or p.poll() is not None:
                p.kill()
                raise AssertionError(f"{r.stderr}\nweightd: {p.stderr.read().decode()}")
            time.sleep(0.05)
        status = json.loads(r.stdout)
        assert status["socket"] == sock_path
        assert not os.path.exists(d / "configured.sock")

        # It serves: tensors of a plain model through the passed socket.
        r = subprocess.run([str(bins.weightctl), "--socket", sock_path, "tensors", "--json",
                            str(testdata / "models" / "plain")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert len(json.loads(r.stdout)) > 0

        p.terminate()
        assert p.wait(15) == 0, p.stderr.read().decode()
        # The socket unit owns the path: it stays.
        assert os.path.exists(sock_path)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def nofile_limits(pid):
    """(soft, hard) of "Max open files" in /proc/PID/limits, as the kernel
    reports them."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError(f"no \"Max open files\" in /proc/{pid}/limits")


def wait_serving(bins, p, sock_path, log_path):
    """Until weightd answers a Status: its socket listens before its event
    loop (and its SIGTERM handler) runs."""
    deadline = time.monotonic() + 10
    while True:
        if p.poll() is not None:
            raise AssertionError(f"weightd exited with {p.returncode}:\n{log_path.read_text()}")
        r = subprocess.run([str(bins.weightctl), "--socket", sock_path, "status", "--json"], capture_output=True)
        if r.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"weightd does not answer on {sock_path}:\n{log_path.read_text()}")
        time.sleep(0.05)


@pytest.mark.parametrize("soft,hard", [(1024, 8192), (1024, 1024)])
def test_raises_the_soft_limit_on_open_files(bins, workdir, testdata, soft, hard):
    """Under prlimit --nofile=SOFT:HARD the daemon runs with the soft limit
    raised to HARD (review finding 10), and says so in its debug log."""
    if not shutil.which("prlimit"):
        pytest.skip("prlimit (util-linux) is not installed")
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < hard and os.geteuid() != 0:
        pytest.skip(f"the hard limit on open files here is below {hard} and cannot be raised without root")
    d = make_dir(workdir, "nofile-")
    sock_path = str(d / "weightd.sock")
    conf = d / "weightd.conf"
    conf.write_text(f"[daemon]\nsocket = {sock_path}\nmodel_roots = {testdata / 'models'}\nlog_level = debug\n")
    log_path = d / "weightd.log"
    with open(log_path, "wb") as log:
        # prlimit sets the limits on itself and execs: the pid is weightd's.
        p = subprocess.Popen(["prlimit", f"--nofile={soft}:{hard}", str(bins.weightd), "--config", str(conf)],
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        wait_serving(bins, p, sock_path, log_path)
        assert os.readlink(f"/proc/{p.pid}/exe") == str(bins.weightd.resolve())
        assert nofile_limits(p.pid) == (hard, hard)
        if soft != hard:
            assert f"from {soft} to {hard}" in log_path.read_text()
        p.terminate()
        assert p.wait(15) == 0, log_path.read_text()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def unit_settings(path):
    """{(section, key): [values]} of a unit file, comments and blank lines
    skipped (no continuation lines are used in ours)."""
    out, section = {}, None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        m = re.fullmatch(r"\[(\w+)\]", line)
        if m:
            section = m.group(1)
            continue
        key, _, value = line.partition("=")
        out.setdefault((section, key.strip()), []).append(value.strip())
    return out


def test_unit_sets_the_limit_on_open_files():
    """weightd.service sets LimitNOFILE= once, in [Service]: a soft limit of
    at least the 65536 leases one uid may hold (PROTOCOL.md; every lease is
    descriptors in the daemon), and a hard one the kernel allows
    (fs.nr_open), or the service would fail to start."""
    units = [REPO / "systemd" / "weightd.service.in"]
    if (BUILD / "systemd" / "weightd.service").exists():
        units.append(BUILD / "systemd" / "weightd.service")
    with open("/proc/sys/fs/nr_open") as f:
        nr_open = int(f.read())
    for unit in units:
        settings = unit_settings(unit)
        assert [k for k in settings if k[1] == "LimitNOFILE"] == [("Service", "LimitNOFILE")], unit
        values = settings[("Service", "LimitNOFILE")]
        assert len(values) == 1, (unit, values)
        m = re.fullmatch(r"(\d+)(?::(\d+))?", values[0])
        assert m, (unit, values[0])
        soft, hard = int(m.group(1)), int(m.group(2) or m.group(1))
        assert 65536 <= soft <= hard <= nr_open, (unit, values[0], nr_open)
