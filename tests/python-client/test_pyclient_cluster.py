"""The client side of the cluster tier, against a scripted daemon: the
Python package (Client.prefetch(cluster=True), Client.cluster(), status())
and weightctl (prefetch --cluster, cluster, status) through the real
libweightd-client.  The fake speaks the wire format with wdwire (an
implementation that shares nothing with the C code) and checks what the
client sent; the real daemon's cluster is tested under tests/cluster."""
import json
import socket
import struct
import subprocess
import threading

import pytest

import wdwire
from harness import BUILD

WEIGHTCTL = BUILD / "client" / "weightctl" / "weightctl"
CLUSTER = 22  # Envelope.cluster, Reply.result cluster is 16
GEN = 0xFEDCBA9876543210  # past 2^63: must survive every layer whole


def f_fixed64(num, value):
    return wdwire.varint((num << 3) | 1) + struct.pack("<Q", value)


def reply(req_id, code=0, message="", result=None):
    """An Envelope answering req_id; result is (Reply field, body)."""
    body = wdwire.f_varint(1, code) + wdwire.f_bytes(2, message)
    if result is not None:
        body += wdwire.f_bytes(result[0], result[1])
    return wdwire.f_varint(wdwire.ID, req_id) + wdwire.f_bytes(wdwire.REPLY, body)


def progress(req_id, done, total):
    return wdwire.f_varint(wdwire.ID, req_id) + wdwire.f_bytes(
        wdwire.PROGRESS, wdwire.f_varint(1, done) + wdwire.f_varint(2, total))


def node_load(node, state, read=0, received=0, sent=0, message=""):
    return (wdwire.f_bytes(1, node) + wdwire.f_bytes(2, state) + wdwire.f_varint(3, read)
            + wdwire.f_varint(4, received) + wdwire.f_varint(5, sent) + wdwire.f_bytes(6, message))


def load_reply(nbytes, nodes, was_resident=False):
    body = wdwire.f_bytes(2, "/models/m") + wdwire.f_varint(6, nbytes) + wdwire.f_varint(7, was_resident)
    body += wdwire.f_bytes(8, "host")
    for n in nodes:
        body += wdwire.f_bytes(10, n)
    return (11, body)


NODES = [
    # name, address, state, generation, rtt_us, sent, received, last_error, since_ms
    ("a", "10.0.0.1:7411", "self", GEN, 0, 0, 0, "", 60000),
    ("b", "10.0.0.2:7411", "up", 7, 250, 1 << 33, 12345, "", 5000),
    ("c", "10.0.0.3:7411", "down", 0, 0, 0, 0, "connect: connection refused", 1200),
]


def cluster_body(enabled=True):
    if not enabled:
        return b""
    body = wdwire.f_varint(1, 1) + wdwire.f_bytes(2, "a") + f_fixed64(3, GEN)
    for name, addr, state, gen, rtt, sent, received, err, since in NODES:
        body += wdwire.f_bytes(4, wdwire.f_bytes(1, name) + wdwire.f_bytes(2, addr) + wdwire.f_bytes(3, state)
                               + f_fixed64(4, gen) + wdwire.f_varint(5, rtt) + wdwire.f_varint(6, sent)
                               + wdwire.f_varint(7, received) + wdwire.f_bytes(8, err)
                               + wdwire.f_varint(9, since))
    return body + wdwire.f_varint(5, 1 << 33) + wdwire.f_varint(6, 12345) + wdwire.f_varint(7, 12000) \
        + wdwire.f_bytes(8, "nccl 2.28.9") + wdwire.f_varint(9, 1 << 32) + wdwire.f_varint(10, 4096)


def status_body(cluster):
    body = wdwire.f_bytes(1, "0.2.0") + wdwire.f_varint(2, 4321) + wdwire.f_bytes(13, "/models")
    body += wdwire.f_bytes(14, "/run/weightd/weightd.sock") + wdwire.f_bytes(17, "ok")
    if cluster is not None:
        body += wdwire.f_bytes(18, cluster)
    return body


class FakeDaemon:
    """A socket that answers Hello, then each request with script's next
    entry: a function of the request's Envelope that returns the frames to
    send.  requests keeps every request after Hello."""

    def __init__(self, path, script):
        self.path = str(path)
        self.script = list(script)
        self.requests = []
        self.error = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(4)
        self.sock.settimeout(10)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            while self.script:  # weightctl connects once a run
                s, _ = self.sock.accept()
                s.settimeout(10)
                conn = wdwire.Conn.__new__(wdwire.Conn)
                conn.sock, conn.buf, conn.fds, conn.next_id = s, b"", [], 1
                with conn:
                    self._serve_one(conn)
        except Exception as e:  # noqa: BLE001 (reported by finish())
            self.error = e

    def _serve_one(self, conn):
        hello = conn.recv()
        assert hello.has(wdwire.HELLO)
        hr = (wdwire.f_varint(1, 1) + wdwire.f_bytes(2, "0.2.0-fake") + wdwire.f_bytes(3, "host")
              + wdwire.f_varint(4, 1 << 16) + wdwire.f_varint(5, 64))
        conn.send_raw(wdwire.frame(reply(hello.id, result=(10, hr))))
        while True:
            try:
                env = conn.recv()
            except wdwire.Closed:  # the client hung up
                return
            assert self.script, f"an unexpected request: fields {sorted(env.f)}"
            self.requests.append(env)
            for f in self.script.pop(0)(env):
                conn.send_raw(wdwire.frame(f))

    def finish(self):
        self.thread.join(10)
        self.sock.close()
        assert not self.thread.is_alive(), "the fake daemon is still waiting"
        assert self.error is None, f"fake daemon: {self.error!r}"
        assert not self.script, f"{len(self.script)} requests were not made"


@pytest.fixture
def fake(tmp_path):
    made = []

    def start(*script):
        d = FakeDaemon(tmp_path / f"fake-{len(made)}.sock", script)
        made.append(d)
        return d
    yield start
    for d in made:
        d.sock.close()


def weightctl(d, *args):
    return subprocess.run([str(WEIGHTCTL), "--socket", d.path, *args], capture_output=True, timeout=30)


def the_request(env, field):
    """The body of env's request, which must be of this kind."""
    assert env.has(field), f"expected request field {field}, got {sorted(env.f)}"
    return env.msg(field)


THREE = [node_load("a", "ok", read=1000, received=2000),
         node_load("b", "resident", sent=1500),
         node_load("c", "failed", received=500, message="c: reading from b: connection reset")]


# ---- Python ------------------------------------------------------------------

def test_python_prefetch_cluster(fake, wd):
    d = fake(lambda e: [progress(e.id, 1000, 3000), progress(e.id, 3000, 3000),
                        reply(e.id, result=load_reply(3000, THREE))],
             lambda e: [reply(e.id, result=load_reply(3000, THREE[:1], was_resident=True))])
    seen = []
    with wd.connect(d.path) as c:
        out = c.prefetch("/models/m", "unet", progress=lambda *a: seen.append(a), cluster=True, nodes=["a", "b", "c"])
        assert seen == [("unet", 1000, 3000), ("unet", 3000, 3000)]
        assert out == {"unet": {"bytes": 3000, "was_resident": False, "nodes": [
            {"node": "a", "state": "ok", "storage_read_bytes": 1000, "peer_received_bytes": 2000,
             "peer_sent_bytes": 0, "message": ""},
            {"node": "b", "state": "resident", "storage_read_bytes": 0, "peer_received_bytes": 0,
             "peer_sent_bytes": 1500, "message": ""},
            {"node": "c", "state": "failed", "storage_read_bytes": 0, "peer_received_bytes": 500,
             "peer_sent_bytes": 0, "message": "c: reading from b: connection reset"}]}}
        # One name is a list of one; None is every node.
        out = c.prefetch("/models/m", cluster=True)
        assert out[""]["was_resident"] is True
    d.finish()

    lr = the_request(d.requests[0], wdwire.PREFETCH)
    assert (lr.str(1), lr.str(2), lr.str(3)) == ("/models/m", "unet", "")
    assert lr.int(4) == 1 and lr.int(7) == 1 and not lr.has(5) and lr.int(6) == 0
    assert lr.strs(8) == ["a", "b", "c"]
    lr = the_request(d.requests[1], wdwire.PREFETCH)
    assert lr.int(7) == 1 and lr.strs(8) == [] and lr.int(4) == 0


def test_python_prefetch_cluster_refused(fake, wd):
    d = fake(lambda e: [reply(e.id, 10, "cluster prefetch: this daemon has no [cluster]")],
             lambda e: [reply(e.id, result=load_reply(3000, []))])  # a daemon older than the tier
    with wd.connect(d.path) as c:
        with pytest.raises(wd.InvalidArgument, match="only a cluster prefetch"):
            c.prefetch("/models/m", nodes=["a"])
        with pytest.raises(wd.InvalidArgument, match="no shard"):
            c.prefetch("/models/m", cluster=True, shard=wd.Shard(0, 2))
        with pytest.raises(wd.InvalidArgument, match="the daemons' index"):
            c.prefetch("/models/m", cluster=True, device="cuda:GPU-0123")
        with pytest.raises(wd.InvalidArgument, match="not a node name"):
            c.prefetch("/models/m", cluster=True, nodes=["a", 3])
        with pytest.raises(wd.Unsupported, match=r"no \[cluster\]"):
            c.prefetch("/models/m", cluster=True, nodes="a")
        with pytest.raises(wd.Unsupported, match="older than the cluster tier"):
            c.prefetch("/models/m", cluster=True)
    d.finish()
    assert the_request(d.requests[0], wdwire.PREFETCH).strs(8) == ["a"]


def test_python_cluster_and_status(fake, wd):
    d = fake(lambda e: [reply(e.id, result=(16, cluster_body()))],
             lambda e: [reply(e.id, result=(16, cluster_body(enabled=False)))],
             lambda e: [reply(e.id, result=(14, status_body(cluster_body())))],
             lambda e: [reply(e.id, result=(14, status_body(None)))])
    want = {"enabled": True, "node": "a", "generation": GEN, "peer_sent_bytes": 1 << 33,
            "peer_received_bytes": 12345, "storage_saved_bytes": 12000,
            "gpu_lane": "nccl 2.28.9", "lane_sent_bytes": 1 << 32, "lane_received_bytes": 4096,
            "nodes": [{"name": n, "address": a, "state": s, "generation": g, "rtt_us": r, "sent_bytes": st,
                       "received_bytes": rc, "last_error": le, "since_ms": si}
                      for n, a, s, g, r, st, rc, le, si in NODES]}
    with wd.connect(d.path) as c:
        assert c.cluster() == want
        assert c.cluster() == {"enabled": False, "node": None, "generation": 0, "nodes": [], "peer_sent_bytes": 0,
                               "peer_received_bytes": 0, "storage_saved_bytes": 0, "gpu_lane": None,
                               "lane_sent_bytes": 0, "lane_received_bytes": 0}
        s = c.status()
        assert s["cluster"] == want and s["pid"] == 4321 and s["model_roots"] == ["/models"]
        assert c.status()["cluster"] is None
    d.finish()
    assert d.requests[0].has(CLUSTER) and d.requests[1].has(CLUSTER)


# ---- weightctl ---------------------------------------------------------------

def test_weightctl_prefetch_cluster(fake):
    d = fake(lambda e: [reply(e.id, result=load_reply(3000, THREE))],
             lambda e: [reply(e.id, result=load_reply(3000, THREE))],
             lambda e: [reply(e.id, result=load_reply(3000, [node_load("a", "resident"),
                                                                node_load("b", "resident")]))])
    r = weightctl(d, "prefetch", "/models/m", "-c", "unet", "--cluster", "--nodes", "a,b,c")
    assert r.returncode == 1, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0].startswith("unet: 2.9 KiB to 3 nodes in ") and lines[0].endswith(", 1000 B read from storage")
    assert lines[1].split() == ["NODE", "STATE", "READ", "RECEIVED", "SENT", "MESSAGE"]
    assert lines[2].split() == ["a", "ok", "1000", "B", "2.0", "KiB", "0", "B", "-"]
    assert lines[3].split() == ["b", "resident", "0", "B", "0", "B", "1.5", "KiB", "-"]
    assert lines[4].split()[:8] == ["c", "failed", "0", "B", "500", "B", "0", "B"]
    assert lines[4].endswith("c: reading from b: connection reset")
    err = r.stderr.decode()
    assert "weightctl: unet: node c: failed: c: reading from b: connection reset" in err
    assert "weightctl: 1 node did not make the component resident" in err

    r = weightctl(d, "prefetch", "/models/m", "-c", "unet", "--cluster", "--json")
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    assert [x["component"] for x in doc] == ["unet"]
    assert doc[0]["bytes"] == 3000 and doc[0]["was_resident"] is False
    assert doc[0]["nodes"][0] == {"node": "a", "state": "ok", "storage_read_bytes": 1000,
                                  "peer_received_bytes": 2000, "peer_sent_bytes": 0, "message": ""}
    assert [x["state"] for x in doc[0]["nodes"]] == ["ok", "resident", "failed"]

    r = weightctl(d, "prefetch", "/models/m", "-c", "vae", "--cluster")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines()[0] == "vae: 2.9 KiB already resident on 2 nodes"
    d.finish()

    lr = the_request(d.requests[0], wdwire.PREFETCH)
    assert lr.int(7) == 1 and lr.strs(8) == ["a", "b", "c"] and lr.str(2) == "unet"
    assert the_request(d.requests[1], wdwire.PREFETCH).strs(8) == []


def test_weightctl_cluster(fake):
    d = fake(lambda e: [reply(e.id, result=(16, cluster_body()))],
             lambda e: [reply(e.id, result=(16, cluster_body()))],
             lambda e: [reply(e.id, result=(16, cluster_body(enabled=False)))],
             lambda e: [reply(e.id, result=(16, cluster_body(enabled=False)))])
    r = weightctl(d, "cluster")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0].split() == ["NAME", "ADDRESS", "STATE", "GENERATION", "RTT", "SENT", "RECEIVED", "LAST-ERROR"]
    assert lines[1].split() == ["a", "10.0.0.1:7411", "self", "fedcba9876543210", "-", "-", "-", "-"]
    assert lines[2].split() == ["b", "10.0.0.2:7411", "up", "0000000000000007", "250us", "8.0", "GiB", "12.1",
                                "KiB", "-"]
    assert lines[3].split()[:8] == ["c", "10.0.0.3:7411", "down", "-", "-", "0", "B", "0"]
    assert lines[3].endswith("connect: connection refused")
    assert lines[4].startswith("node a, generation fedcba9876543210: 8.0 GiB sent to peers")
    assert lines[5] == "GPU lanes: nccl 2.28.9; 4.0 GiB sent and 4.0 KiB received over them"

    r = weightctl(d, "cluster", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["enabled"] is True and doc["node"] == "a" and doc["generation"] == f"{GEN:016x}"
    assert (doc["peer_sent_bytes"], doc["peer_received_bytes"], doc["storage_saved_bytes"]) == (1 << 33, 12345, 12000)
    assert (doc["gpu_lane"], doc["lane_sent_bytes"], doc["lane_received_bytes"]) == ("nccl 2.28.9", 1 << 32, 4096)
    assert doc["nodes"] == [{"name": n, "address": a, "state": s, "generation": f"{g:016x}", "rtt_us": rt,
                             "sent_bytes": st, "received_bytes": rc, "last_error": le, "since_ms": si}
                            for n, a, s, g, rt, st, rc, le, si in NODES]

    r = weightctl(d, "cluster")
    assert r.returncode == 0 and "no cluster" in r.stdout.decode()
    r = weightctl(d, "cluster", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"enabled": False}
    d.finish()


def test_weightctl_status_cluster(fake):
    d = fake(lambda e: [reply(e.id, result=(14, status_body(cluster_body())))],
             lambda e: [reply(e.id, result=(14, status_body(cluster_body())))],
             lambda e: [reply(e.id, result=(14, status_body(None)))],
             lambda e: [reply(e.id, result=(14, status_body(cluster_body(enabled=False))))])
    r = weightctl(d, "status", "--json")
    assert r.returncode == 0, r.stderr
    cl = json.loads(r.stdout)["cluster"]
    assert cl == {"node": "a", "peer_sent_bytes": 1 << 33, "peer_received_bytes": 12345,
                  "nodes": [{"name": n, "state": s, "generation": f"{g:016x}", "rtt_us": rt, "sent_bytes": st,
                             "received_bytes": rc, "last_error": le}
                            for n, _a, s, g, rt, st, rc, le, _si in NODES]}
    r = weightctl(d, "status")
    assert r.returncode == 0, r.stderr
    line = [x for x in r.stdout.decode().splitlines() if x.startswith("cluster:")]
    assert len(line) == 1 and line[0].split(None, 1)[1] == \
        "node a, 2 of 3 nodes up, 8.0 GiB sent to peers, 12.1 KiB received"
    for _ in range(2):  # no cluster part without a cluster
        r = weightctl(d, "status", "--json")
        assert r.returncode == 0 and "cluster" not in json.loads(r.stdout)
    d.finish()
