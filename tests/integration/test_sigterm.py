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
