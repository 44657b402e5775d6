"""The service-manager protocol, without a service manager: weightd started
with NOTIFY_SOCKET pointing at a datagram socket of the test reports
READY=1 once it listens, STATUS= lines, RELOADING=1 and READY=1 around a
SIGHUP, and STOPPING=1 on SIGTERM; started with a listening socket passed
as fd 3 (LISTEN_FDS=1, LISTEN_PID), it serves on that socket and does not
remove it on exit (the socket unit owns it)."""
import json
import os
import socket
import subprocess
import time

from harness import AS_NOBODY, make_dir  # noqa: F401  (harness sets up sys.path users)


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


def write_config(d, roots, sock_path):
    conf = d / "weightd.conf"
    conf.write_text(f"[daemon]\nsocket = {sock_path}\nmodel_roots = {roots}\n")
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
