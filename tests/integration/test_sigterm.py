"""SIGTERM while a load runs: every waiting client is told UNAVAILABLE and
the daemon exits 0, removing its socket."""
import os

import wdwire
from harness import SLOW, wait_until


def test_sigterm_during_a_load(start_daemon, make_model):
    model = make_model("256M", 2)
    d = start_daemon(roots=[model.parent], **SLOW)

    # A C client starts the load, a raw one joins it.
    c_client = d.spawn_client("hash", model)
    wait_until(lambda: d.status()["loading"] == 1, timeout=20, what="the load to start")
    raw = d.raw()
    rid = raw.send(wdwire.LOAD, wdwire.load_body(str(model), progress=True))
    ev = raw.recv()
    assert ev.id == rid and ev.progress is not None and ev.progress.int(1) < ev.progress.int(2)

    rc = d.stop()
    assert rc == 0, d.log()
    assert not os.path.exists(d.socket)

    reply = raw.wait(rid)
    assert reply.code == "UNAVAILABLE", reply.message
    assert "stopping" in reply.message
    try:
        while True:
            raw.recv()
    except (wdwire.Closed, ConnectionResetError):
        pass
    raw.close()

    out, err = c_client.communicate(timeout=30)
    assert c_client.returncode == 1
    assert "UNAVAILABLE:" in err.decode(), err.decode()

    log = d.log()
    assert "Stopping:" in log and "1 loads running" in log, log
    assert f"loaded {model}" not in log, "the load finished before SIGTERM: make it slower"


def test_sigterm_as_soon_as_the_socket_answers(bins, workdir, testdata):
    """SIGTERM the moment the socket accepts, while the daemon still starts
    (the pool, the GPU tier, the metrics endpoint come after the socket):
    every time, the daemon stops the way it stops later, exit 0 and its
    socket removed, not killed by the signal with its socket (and, as root,
    the hugetlb pages it added) left behind."""
    import signal
    import socket as socketlib
    import subprocess
    import time

    from harness import Daemon

    pool = "/proc/sys/vm/nr_hugepages"
    as_root = os.geteuid() == 0 and os.access(pool, os.W_OK)
    before = open(pool).read().strip() if as_root else None
    outcomes = []
    for i in range(12):
        # As root, a small pool of its own, so that a death by the signal
        # shows in the node's pool too.
        d = Daemon(bins, workdir, [testdata / "models"], {"hugetlb_reserve": "16M" if as_root else "off"})
        log = open(d.log_path, "ab")
        p = subprocess.Popen([str(bins.weightd), "--config", str(d.config_path)], stdin=subprocess.DEVNULL,
                             stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and p.poll() is None:
            try:
                with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as s:
                    s.connect(d.socket)
                break
            except OSError:
                time.sleep(0.0005)
        p.send_signal(signal.SIGTERM)
        rc = p.wait(15)
        outcomes.append((rc, os.path.exists(d.socket)))
        if rc != 0:
            break
    assert all(rc == 0 and not left for rc, left in outcomes), \
        f"(exit status, socket left) per start: {outcomes}\n{d.log()}"
    if as_root:
        assert open(pool).read().strip() == before, "the hugetlb pages a daemon added stayed in the pool"
