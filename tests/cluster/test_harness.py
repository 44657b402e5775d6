"""The harness itself: namespaces, addresses, links, daemons inside them,
per-node overlays, cleanup and the skip path.  These need no cluster support
in the daemon (configs without [cluster])."""
import os
import pathlib
import shutil
import subprocess
import sys
import time

import netns
from cluster import copy_with_one_byte_changed, proc_read_bytes

HERE = pathlib.Path(__file__).parent

# A TCP server in one namespace: accepts once, reads until EOF, prints the count.
SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7471)); s.listen(1); print("listening", flush=True)
c, _ = s.accept(); n = 0
while True:
    b = c.recv(1 << 16)
    if not b: break
    n += len(b)
print(n, flush=True)
"""

CLIENT = """
import socket, sys, time
t0 = time.monotonic()
c = socket.create_connection((sys.argv[1], 7471), timeout=float(sys.argv[3]))
c.sendall(b"x" * int(sys.argv[2])); c.close()
print(time.monotonic() - t0)
"""


def in_ns(net, name, code, *args, timeout=20):
    return subprocess.run([*net.exec_argv(name), sys.executable, "-c", code, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def serve(net, name):
    p = subprocess.Popen([*net.exec_argv(name), sys.executable, "-c", SERVER, net.address(name)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "listening\n", p.stderr.read()
    return p


def send(net, src, dst, nbytes, timeout=5):
    return in_ns(net, src, CLIENT, net.address(dst), nbytes, timeout, timeout=timeout + 20)


def ns_inode(path):
    return os.stat(path).st_ino


def test_namespaces_addresses_and_links(net):
    for i, n in enumerate("abc", 1):
        assert net.add(n, i) == f"10.77.0.{i}"
    for i, n in enumerate("abc", 1):
        out = netns.ip("-n", net.namespace(n), "-o", "addr", "show", "dev", "eth0").stdout
        assert f"inet 10.77.0.{i}/24" in out, out
        out = netns.ip("-n", net.namespace(n), "-o", "link", "show", "lo").stdout
        assert "UP" in out, out
    # None of it in the root namespace.
    assert "h-a" not in netns.ip("-o", "link").stdout

    # Every node reaches every other through the hub.
    for src, dst in (("a", "b"), ("b", "c"), ("c", "a")):
        srv = serve(net, dst)
        r = send(net, src, dst, 1 << 20)
        assert r.returncode == 0, r.stderr
        assert srv.communicate(timeout=10)[0].split() == [str(1 << 20)]

    # A partition is silent: no RST, a connect just times out; heal undoes it.
    srv = serve(net, "b")
    net.partition("b")
    t0 = time.monotonic()
    r = send(net, "a", "b", 1000, timeout=1.5)
    assert r.returncode != 0 and "timed out" in r.stderr, r.stderr
    assert time.monotonic() - t0 >= 1.4, "the partitioned node answered (refused) instead of staying silent"
    net.heal("b")
    r = send(net, "a", "b", 1000, timeout=10)
    assert r.returncode == 0, r.stderr
    assert srv.communicate(timeout=10)[0].split() == ["1000"]


def test_throttle_slows_the_link(net):
    net.add("a", 1)
    net.add("b", 2)
    net.throttle("a", "40mbit")
    srv = serve(net, "b")
    r = send(net, "a", "b", 5 << 20, timeout=30)
    assert r.returncode == 0, r.stderr
    srv.communicate(timeout=10)
    # 5 MiB at 40 Mbit/s: about a second, less what the socket buffers take
    # in before sendall() returns; unthrottled, milliseconds.
    assert float(r.stdout) >= 0.5, f"5 MiB took {r.stdout.strip()} s through a 40 Mbit/s bucket"
    net.unthrottle("a")


def test_cleanup_leaves_nothing(netns_ok):
    n = netns.Network(tag=f"{netns.PREFIX}{os.getpid()}x")
    n.add("a", 1)
    n.add("b", 2)
    sleeper = subprocess.Popen([*n.exec_argv("a"), "sleep", "60"])
    assert len(n.leftovers()) == 3
    sleeper.kill()
    sleeper.wait()
    n.destroy()
    assert n.leftovers() == []
    assert not [ns for ns in netns.namespaces() if ns.startswith(n.tag)]
    assert "h-a" not in netns.ip("-o", "link").stdout


def test_stale_namespaces_are_swept(netns_ok):
    # A pid that is not running: the largest one the kernel could give, plus one.
    dead = int(open("/proc/sys/kernel/pid_max").read()) + 1
    name = f"{netns.PREFIX}{dead}-a"
    netns.ip("netns", "add", name)
    netns.sweep_stale()
    assert name not in netns.namespaces()


def test_skip_reasons(netns_ok):
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import netns; print(netns.unavailable())"
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                        sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "need root" in r.stdout, r.stdout
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "PATH": "/nonexistent"})
    assert "no ip command" in r.stdout, r.stdout


def test_daemons_in_namespaces(cluster, model):
    """Three daemons without [cluster], each in its namespace: reachable on
    their sockets from here, reading with O_DIRECT so that /proc/PID/io and
    Status agree on what each read."""
    for n in "abc":
        cluster.add(n, with_cluster=False)
    cluster.start(wait=False)
    for n in "abc":
        node = cluster[n]
        assert "[cluster]" not in node.config_path.read_text()
        assert open(f"/proc/{node.pid}/comm").read().strip() == "weightd"
        assert os.stat(f"/proc/{node.pid}/ns/net").st_ino == ns_inode(f"/run/netns/{cluster.net.namespace(n)}")
        assert node.status()["storage_read_bytes"] == 0

    a = cluster["a"]
    before = proc_read_bytes(a.pid)
    model.check(a)
    read = proc_read_bytes(a.pid) - before
    st = a.status()["storage_read_bytes"]
    assert abs(st - model.size) <= model.size // 100, (st, model.size)
    assert abs(read - model.size) <= model.size // 100, f"/proc/PID/io read_bytes grew by {read}, the model is {model.size}"
    assert cluster["b"].status()["storage_read_bytes"] == 0


def test_overlay_is_seen_by_one_node_only(cluster, model, diskdir):
    """A node started with an overlay sees another file at the model's path
    (the setup of the mismatch test), the others the shared one."""
    from reference import component_tensors

    copy, _ = copy_with_one_byte_changed(model, diskdir, "overlay", 0xFF)
    try:
        for n in "ab":
            cluster.add(n, with_cluster=False)
        cluster.add("c", with_cluster=False, overlays={copy: model.path})
        cluster.start(wait=False)
        model.check(cluster["a"])
        changed = component_tensors(sorted(copy.glob("*.safetensors")))
        assert changed != model.expected
        model.check(cluster["c"], expected=changed)
        model.check(cluster["b"])
    finally:
        for n in "abc":
            cluster[n].stop()
        shutil.rmtree(copy, ignore_errors=True)
