"""Network namespaces for the cluster tests: one hub, one namespace per node.

The hub namespace holds a bridge (br0); each node's namespace has eth0, one
end of a veth pair whose other end (h-NODE) is a port of the hub's bridge,
with the address 10.77.0.N/24 and lo up.  Nothing is made in the root
namespace, so two runs at once cannot collide on interface names, and the
namespaces' names carry the test process's pid (wdcPID-hub, wdcPID-a, ...).
Deleting a node's namespace deletes its veth pair with it.

partition(node) takes the hub side of the node's link down: the node's
packets go nowhere and nothing answers, no RST, no ICMP (a silent partition);
heal(node) brings it back.  throttle(node, rate) puts a token bucket on both
directions of the link, to make a transfer last long enough to act in the
middle of it.

Only iproute2 (ip, tc) is used.  Needs root.
"""
import os
import re
import shutil
import subprocess

PREFIX = "wdc"
SUBNET = "10.77.0"


def ip(*args, check=True):
    r = subprocess.run(["ip", *map(str, args)], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(map(str, args))}: {r.stderr.strip()}")
    return r


def tc(*args, check=True):
    r = subprocess.run(["tc", *map(str, args)], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"tc {' '.join(map(str, args))}: {r.stderr.strip()}")
    return r


def namespaces():
    """The names of every named network namespace."""
    r = ip("netns", "list", check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def unavailable():
    """Why this process cannot make network namespaces, or None if it can
    (it makes and deletes one to find out)."""
    if os.geteuid() != 0:
        return "the cluster tests need root (network namespaces, veth pairs)"
    for tool in ("ip", "tc"):
        if not shutil.which(tool):
            return f"no {tool} command (install iproute2)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        ip("netns", "add", probe)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        return f"cannot make a network namespace: {e}"
    try:
        ip("-n", probe, "link", "add", "br0", "type", "bridge")
        ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    except RuntimeError as e:
        return f"cannot make a bridge or a veth pair in a network namespace: {e}"
    finally:
        ip("netns", "del", probe, check=False)
    return None


def sweep_stale():
    """Delete the namespaces of earlier runs whose process is gone (a run
    killed before its finalizers)."""
    for ns in namespaces():
        m = re.fullmatch(rf"{PREFIX}(\d+)-.+", ns)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            ip("netns", "del", ns, check=False)


class Network:
    """A hub and its nodes' namespaces; destroy() removes them all."""

    def __init__(self, tag=None):
        self.tag = tag or f"{PREFIX}{os.getpid()}"
        self.hub = f"{self.tag}-hub"
        self.nodes = {}  # name -> (namespace, address)
        ip("netns", "add", self.hub)
        try:
            ip("-n", self.hub, "link", "set", "lo", "up")
            ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            ip("-n", self.hub, "link", "set", "br0", "up")
        except RuntimeError:
            self.destroy()
            raise

    def add(self, name, index):
        """Node name's namespace with address 10.77.0.index; returns the address."""
        assert re.fullmatch(r"[a-z0-9]{1,8}", name), name
        ns = f"{self.tag}-{name}"
        addr = f"{SUBNET}.{index}"
        ip("netns", "add", ns)
        self.nodes[name] = (ns, addr)
        ip("link", "add", f"h-{name}", "netns", self.hub, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("-n", self.hub, "link", "set", f"h-{name}", "master", "br0", "up")
        ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
        return addr

    def namespace(self, name):
        return self.nodes[name][0]

    def address(self, name):
        return self.nodes[name][1]

    def exec_argv(self, name):
        """The argv prefix that runs a program in name's namespace (ip netns
        exec execs it: the pid stays the program's).  It also gives the
        program a mount namespace of its own, slave to the root's."""
        return ["ip", "netns", "exec", self.namespace(name)]

    def partition(self, name):
        ip("-n", self.hub, "link", "set", f"h-{name}", "down")

    def heal(self, name):
        ip("-n", self.hub, "link", "set", f"h-{name}", "up")

    def throttle(self, name, rate="320mbit"):
        """A token bucket of rate on both directions of name's link."""
        ns = self.namespace(name)
        tbf = ["root", "tbf", "rate", rate, "burst", "256k", "latency", "400ms"]
        tc("-n", self.hub, "qdisc", "replace", "dev", f"h-{name}", *tbf)
        tc("-n", ns, "qdisc", "replace", "dev", "eth0", *tbf)

    def unthrottle(self, name):
        tc("-n", self.hub, "qdisc", "del", "dev", f"h-{name}", "root", check=False)
        tc("-n", self.namespace(name), "qdisc", "del", "dev", "eth0", "root", check=False)

    def destroy(self):
        """Delete every namespace of this network (kill what runs in them
        first: a namespace outlives its name while a process is inside)."""
        for ns, _ in list(self.nodes.values()):
            ip("netns", "del", ns, check=False)
        self.nodes.clear()
        ip("netns", "del", self.hub, check=False)

    def leftovers(self):
        """Names of this network's namespaces that still exist."""
        return [ns for ns in namespaces() if ns.startswith(self.tag + "-")]
