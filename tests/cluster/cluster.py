"""The harness of the cluster tests: several real weightd processes, each in
its own network namespace (netns.py), sharing one models directory.

A node is the integration harness's Daemon (tests/integration/harness.py)
with a [cluster] section in its config and its command run through
`ip netns exec`: its Unix socket is in the filesystem, so this process talks
to every node's daemon directly, and only the nodes' TCP traffic goes
through the namespaces.  The binaries come from $WD_BUILD as in the
integration tests, so the sanitizer builds run this suite too.

The nodes read with O_DIRECT (direct_io = on): /proc/PID/io counts such reads
in read_bytes whatever the page cache holds, so a node's storage reads can
be checked from outside the daemon as well as in its Status.  The models
directory must therefore be on a real disk, not tmpfs (which has no
O_DIRECT); storage_dir() picks one.

UCX would carry data between processes of one host through shared memory,
round the namespaces; the nodes get UCX_TLS=tcp so that every byte between
nodes crosses the links the tests cut.
"""
import json
import os
import pathlib
import secrets
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "integration"))
from harness import BUILD, Daemon, wait_until  # noqa: E402

PORT = 7470
DEADLINE = 2.0  # seconds: the [cluster] deadline of every node

# Every node's environment: peers talk TCP through the namespaces.
NODE_ENV = {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "eth0"}

# Bind-mounts SRC over DST for each "SRC DST" pair before "--", then execs the
# rest; run inside `ip netns exec`, whose mount namespace is the node's own.
OVERLAY_SH = ('while [ "$1" != -- ]; do mount --bind "$1" "$2" || exit 1; shift 2; done; '
              'shift; exec "$@"')


def storage_dir():
    """A folder on a real disk for models: the system's temporary folder
    unless it is tmpfs, else the build folder."""
    for parent in ("/tmp", str(BUILD)):
        r = subprocess.run(["stat", "-f", "-c", "%T", parent], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip() not in ("tmpfs", "ramfs"):
            return pathlib.Path(parent)
    raise AssertionError(f"neither /tmp nor {BUILD} is on a disk (O_DIRECT reads and /proc/PID/io need one)")


def proc_read_bytes(pid):
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise AssertionError(f"no read_bytes in /proc/{pid}/io")


def copy_with_one_byte_changed(model, diskdir, tag, xor):
    """A copy of model's folder under diskdir in which one byte of tensor
    data of the second file differs (same size; the mtime differs too);
    returns (the copy, the changed file)."""
    import shutil
    copy = diskdir / f"{tag}-{os.getpid()}"
    shutil.copytree(model.path, copy)
    victim = copy / model.files[1].name
    with open(victim, "r+b") as f:
        f.seek(victim.stat().st_size - 4096)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ xor]))
    return copy, victim


def write_secret(path, data=None):
    """A cluster secret file of mode 0600."""
    path = pathlib.Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data if data is not None else secrets.token_hex(32) + "\n")
    os.chmod(path, 0o600)
    return path


class Node(Daemon):
    """One weightd of the cluster."""

    def __init__(self, cluster, name, *, config, env, secret_file, nodes, overlays, with_cluster=True):
        self.name = name
        self.cluster = cluster
        self.cluster_settings = {} if not with_cluster else {"node": name, "nodes": cluster.nodes_line(nodes),
                                 "secret_file": str(secret_file),
                                 "deadline": f"{DEADLINE:g}s", "peer_fetch": "yes"}
        settings = {"direct_io": "on", **config}
        super().__init__(cluster.bins, cluster.base, [cluster.models], settings, {**NODE_ENV, **(env or {})})
        self.wrap = cluster.net.exec_argv(name)
        if overlays:
            self.wrap += ["sh", "-c", OVERLAY_SH, "sh"]
            for src, dst in overlays.items():
                self.wrap += [str(src), str(dst)]
            self.wrap += ["--"]

    def config_text(self, settings=None):
        text = super().config_text(settings)
        if self.cluster_settings:
            text += "[cluster]\n" + "".join(f"{k} = {v}\n" for k, v in self.cluster_settings.items())
        return text

    @property
    def address(self):
        return self.cluster.net.address(self.name)

    def read_bytes(self):
        """/proc/PID/io read_bytes of the daemon."""
        return proc_read_bytes(self.pid)

    def cluster_view(self):
        """`weightctl cluster --json`: {"node", "nodes": [{"name", "state", ...}], ...}."""
        return self.ctl_json("cluster")

    def states(self):
        """{name: state} of every node as this one sees it."""
        return {n["name"]: n["state"] for n in self.cluster_view()["nodes"]}

    def counters(self):
        """(storage_read_bytes, peer_received_bytes, peer_sent_bytes) from Status."""
        st = self.status()
        c = st.get("cluster") or {}
        return st["storage_read_bytes"], c.get("peer_received_bytes", 0), c.get("peer_sent_bytes", 0)


class Cluster:
    """Nodes in namespaces of one Network, all reading the models folder.

    add(name) makes the node's namespace (10.77.0.N in the order added) and
    its Node; start() starts the nodes not running and waits until each sees
    the others up.  Teardown (finish()) stops the daemons, then the caller
    destroys the network."""

    def __init__(self, bins, base, models, net, names=("a", "b", "c")):
        self.bins = bins
        self.base = base
        self.models = models
        self.net = net
        self.nodes = {}
        self.secret = write_secret(base / "cluster.key")
        self.index = {}
        for n in names:
            self.add_namespace(n)
        for n in names:
            self.add(n)

    # ---- building ----

    def nodes_line(self, names=None):
        names = list(self.index) if names is None else list(names)
        return ", ".join(f"{n}={self.net.address(n)}:{PORT}" for n in names)

    def add_namespace(self, name):
        if name not in self.index:
            self.index[name] = len(self.index) + 1
            self.net.add(name, self.index[name])

    def add(self, name, *, config=None, env=None, secret_file=None, nodes=None, overlays=None, with_cluster=True):
        """A node (not started); for a name already added, a node of other
        settings in its place (the old one must not run).  nodes: the names
        its config lists (default: every node added so far, itself
        included); overlays: {src: dst} bind mounts seen by this node only;
        with_cluster=False: a config without [cluster]."""
        self.add_namespace(name)
        node = Node(self, name, config=config or {}, env=env, secret_file=secret_file or self.secret,
                    nodes=nodes if nodes is not None else list(self.index), overlays=overlays,
                    with_cluster=with_cluster)
        old = self.nodes.get(name)
        if old is not None and old.running():
            raise AssertionError(f"node {name} is running")
        self.nodes[name] = node
        return node

    def __getitem__(self, name):
        return self.nodes[name]

    def __iter__(self):
        return iter(self.nodes.values())

    def start(self, wait=True, timeout=20.0):
        for node in self:
            if not node.running():
                try:
                    node.start()
                except AssertionError:
                    node.killed = True  # reported here, not again at teardown
                    raise
        if wait:
            self.wait_up(timeout=timeout)
        return self

    # ---- waiting ----

    def wait_states(self, viewer, expected, timeout=20.0):
        """Wait until node viewer sees each node of expected ({name: state})
        in that state; returns its view."""
        node = self[viewer]
        seen = {}

        def ok():
            nonlocal seen
            r = node.ctl("cluster", "--json")
            if r.returncode != 0:
                err = r.stderr.decode()
                if not node.running():
                    raise AssertionError(f"node {viewer} exited:\n{node.log()[-4000:]}")
                raise AssertionError(f"weightctl cluster on node {viewer}: {err}")
            view = json.loads(r.stdout)
            seen = {n["name"]: n["state"] for n in view.get("nodes", [])}
            return all(seen.get(k) == v for k, v in expected.items()) and view

        try:
            return wait_until(ok, timeout, interval=0.1, what=f"node {viewer} to see {expected}")
        except AssertionError as e:
            raise AssertionError(f"{e}; it sees {seen}\n{self.logs(tail=3000)}") from None

    def wait_up(self, names=None, timeout=20.0):
        """Wait until each running node of names sees every other of them up."""
        names = [n for n in (names or self.nodes) if self[n].running()]
        for n in names:
            self.wait_states(n, {m: "up" for m in names if m != n}, timeout)

    # ---- faults ----

    def kill9(self, name):
        self[name].kill()

    def restart(self, name, wait=True):
        """Stop (SIGTERM) or reap node name and start it again, same config."""
        node = self[name]
        if node.running():
            node.stop()
        node.killed = False
        node.start()
        if wait:
            self.wait_up()
        return node

    def sighup(self, name, new_nodes):
        """Rewrite node name's [cluster] nodes to new_nodes and send SIGHUP."""
        node = self[name]
        node.cluster_settings["nodes"] = self.nodes_line(new_nodes)
        node.write_config()
        node.hup()

    def partition(self, name):
        self.net.partition(name)

    def heal(self, name):
        self.net.heal(name)

    def throttle(self, rate="320mbit"):
        for n in self.index:
            self.net.throttle(n, rate)

    # ---- clients ----

    def prefetch(self, via, model, *args, timeout=120):
        """`weightctl prefetch MODEL --cluster ARGS --json` on node via."""
        r = self[via].ctl("prefetch", str(model), "--cluster", *args, "--json", timeout=timeout)
        return r

    def spawn_prefetch(self, via, model, *args, cluster=True):
        argv = [str(self.bins.weightctl), "--socket", self[via].socket, "prefetch", str(model)]
        argv += (["--cluster"] if cluster else []) + [*map(str, args), "--json"]
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self[via].children.append(p)
        return p

    # ---- teardown and reports ----

    def logs(self, tail=8000):
        return "\n".join(f"---- node {n.name} ({n.log_path}) ----\n{n.log()[-tail:]}" for n in self)

    def finish(self):
        """Stop every daemon; returns the errors of those that did not stop
        cleanly (exit 0 on SIGTERM, socket removed, no sanitizer report)."""
        errors = []
        for node in self:
            try:
                node.finish()
            except AssertionError as e:
                errors.append(f"node {node.name}: {e}")
            except Exception as e:  # a timeout: make sure it is gone
                errors.append(f"node {node.name}: {e!r}")
                if node.running():
                    node.proc.kill()
                    node.proc.wait(10)
        return errors


def prefetch_results(stdout, stderr=b"", returncode=0):
    """The JSON that `weightctl prefetch --json` printed, or an
    AssertionError with what it said instead."""
    try:
        return json.loads(stdout)
    except ValueError:
        raise AssertionError(f"weightctl prefetch exited {returncode} without JSON: "
                             f"{stdout.decode()!r} {stderr.decode()!r}") from None


def per_node(results):
    """{node: {"state", "storage_read_bytes", "peer_received_bytes", ...}}
    summed over the components of a cluster prefetch's results (the last
    state wins)."""
    out = {}
    for res in results:
        lines = res.get("nodes")
        if lines is None:
            lines = res.get("cluster_nodes")
        assert lines is not None, f"no per-node lines in a cluster prefetch's result: {res}"
        for line in lines:
            name = line.get("node", line.get("name"))
            o = out.setdefault(name, {"storage_read_bytes": 0, "peer_received_bytes": 0, "peer_sent_bytes": 0})
            for k in ("storage_read_bytes", "peer_received_bytes", "peer_sent_bytes"):
                o[k] += line.get(k, 0)
            o["state"] = line.get("state")
            o["message"] = line.get("message", "")
    return out


def wait_transfer(cluster, names, at_least, proc, timeout=30.0):
    """Wait until the nodes of names have received at least at_least bytes
    from peers between them while proc (the prefetch) still runs."""
    def ok():
        if proc.poll() is not None:
            raise AssertionError("the prefetch ended before the fault could be injected (a faster disk or "
                                 f"link than the throttle assumes): {proc.stdout.read().decode()!r}")
        return sum(cluster[n].counters()[1] for n in names) >= at_least
    return wait_until(ok, timeout, interval=0.02, what=f"{at_least} bytes received from peers")


def timed_wait(proc, timeout):
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=timeout)
    return time.monotonic() - t0, out, err
