"""The configuration file as the daemon meets it: `weightd --check-config`,
and SIGHUP with a broken file (the old configuration stays) and with a valid
changed one (it applies).  The parser's unit test covers every key; these
are representative cases through the real binary."""
import subprocess

import pytest

from harness import make_dir, wait_until

GOOD = {
    "minimal": "[daemon]\nmodel_roots = /srv/models\n",
    "every-section": ("[daemon]\nsocket = /run/x/weightd.sock\nmodel_roots = /a:/b\nallow_uids = 0, nobody\n"
                      "max_connections_per_uid = 8\nlog_level = warning\n"
                      "[memory]\nhost_budget = 10%\nhost_pages = small\n"
                      "[io]\nqueue_depth = 7\nchunk_size = 1M\ndirect_io = off\n"),
    "comments-and-blank-lines": "# weightd\n\n; also a comment\n[memory]\nhost_budget = 64M\n",
    "list-continued": "[daemon]\nmodel_roots = /a\n  /b\n",
    "gpu": "[gpu]\nbudget = 80%\ndevice_budgets = 0:40G\n  1:50%\nkeep_host = no\ndevices = 0, 1\n",
}

# (text, line of the error, text in the message)
BAD = {
    "unknown-key": ("[daemon]\nmodel_roots = /m\nbogus = 1\n", 3, "bogus"),
    "unknown-section": ("[daemon]\nmodel_roots = /m\n[nonsense]\n", 3, "nonsense"),
    "cluster-duplicate-node": ("[cluster]\nnode = a\nnodes = a=10.0.0.1:7470, a=10.0.0.2:7470\n", 3, "nodes"),
    "cluster-bad-deadline": ("[cluster]\n\ndeadline = 10\n", 3, "deadline"),
    "bad-gpu-budget": ("[gpu]\nbudget = 120%\n", 2, "budget"),
    "bad-device-budget": ("[gpu]\ndevice_budgets = 0:40G, x:1G\n", 2, "device_budgets"),
    "bad-keep-host": ("[gpu]\nkeep_host = sometimes\n", 2, "keep_host"),
    "bad-devices": ("[gpu]\ndevices = 0, 99\n", 2, "devices"),
    "queue-depth-zero": ("[io]\nqueue_depth = 0\n", 2, "queue_depth"),
    "chunk-not-page-multiple": ("[io]\n\nchunk_size = 70000\n", 3, "chunk_size"),
    "relative-root": ("[daemon]\nmodel_roots = models\n", 2, "model_roots"),
    "dotdot-root": ("[daemon]\nmodel_roots = /srv/../etc\n", 2, "model_roots"),
    "bad-budget": ("[daemon]\n[memory]\nhost_budget = lots\n", 3, "host_budget"),
    "unknown-user": ("[daemon]\nallow_uids = no-such-user-here\n", 2, "allow_uids"),
    "key-outside-section": ("queue_depth = 4\n", 1, ""),
    "bad-direct-io": ("[io]\ndirect_io = sometimes\n", 2, "direct_io"),
}


@pytest.fixture
def confdir(workdir):
    return make_dir(workdir, "conf-")


def check(bins, path):
    return subprocess.run([str(bins.weightd), "--check-config", "--config", str(path)], capture_output=True,
                          timeout=30)


@pytest.mark.parametrize("name", sorted(GOOD))
def test_check_config_accepts(bins, confdir, name):
    path = confdir / "weightd.conf"
    path.write_text(GOOD[name])
    r = check(bins, path)
    assert r.returncode == 0, r.stderr.decode()
    assert "configuration is valid" in r.stderr.decode()
    assert b"[daemon]" in r.stdout and b"queue_depth = " in r.stdout
    # What it prints loads back.
    again = confdir / "dumped.conf"
    again.write_bytes(r.stdout)
    r2 = check(bins, again)
    assert r2.returncode == 0, r2.stderr.decode()
    assert r2.stdout.split(b"\n", 1)[1] == r.stdout.split(b"\n", 1)[1]


def test_check_config_shows_the_values(bins, confdir):
    path = confdir / "weightd.conf"
    path.write_text(GOOD["every-section"])
    out = check(bins, path).stdout.decode()
    for line in ("model_roots = /a:/b", "allow_uids = 0, 65534", "queue_depth = 7", "chunk_size = 1M",
                 "direct_io = off", "host_pages = small", "log_level = warning", "max_connections_per_uid = 8"):
        assert line in out, out


@pytest.mark.parametrize("name", sorted(BAD))
def test_check_config_refuses_with_file_and_line(bins, confdir, name):
    text, line, what = BAD[name]
    path = confdir / "weightd.conf"
    path.write_text(text)
    r = check(bins, path)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert f"{path}:{line}:" in err and what in err, err
    assert r.stdout == b""


def test_check_config_cluster(bins, confdir):
    """[cluster] is printed with its secret_file but not the secret, loads back,
    and a secret file that others may read is refused."""
    key = confdir / "cluster.key"
    key.write_text("a shared secret of 32 bytes.....\n")
    key.chmod(0o600)
    path = confdir / "weightd.conf"
    path.write_text(f"[cluster]\nnode = b\nnodes = a=10.0.0.1:7470\n  b=[fd00::2]:7470\nsecret_file = {key}\n"
                    "deadline = 500ms\n")
    r = check(bins, path)
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode()
    assert (f"\n[cluster]\nnode = b\nnodes = a=10.0.0.1:7470, b=[fd00::2]:7470\nsecret_file = {key}\n"
            "deadline = 500ms\npeer_fetch = yes\n") in out, out
    assert "shared secret" not in out + r.stderr.decode()
    again = confdir / "dumped.conf"
    again.write_bytes(r.stdout)
    r2 = check(bins, again)
    assert r2.returncode == 0, r2.stderr.decode()
    assert r2.stdout.split(b"\n", 1)[1] == r.stdout.split(b"\n", 1)[1]

    key.chmod(0o640)
    r = check(bins, path)
    assert r.returncode == 1 and r.stdout == b""
    err = r.stderr.decode()
    assert f"{path}:5: [cluster] secret_file:" in err and "mode 0640" in err and "chmod 600" in err, err
    assert "shared secret" not in err

    # Without any [cluster] key the section is a comment.
    path.write_text("[cluster]\n")
    r = check(bins, path)
    assert r.returncode == 0 and "\n[cluster]\n# not configured" in r.stdout.decode()


def test_check_config_names_the_drop_in(bins, confdir):
    path = confdir / "weightd.conf"
    path.write_text("[io]\nqueue_depth = 4\n")
    (confdir / "weightd.conf.d").mkdir()
    (confdir / "weightd.conf.d" / "10-ok.conf").write_text("[io]\nqueue_depth = 8\n")
    r = check(bins, path)
    assert r.returncode == 0 and "queue_depth = 8" in r.stdout.decode()
    (confdir / "weightd.conf.d" / "20-bad.conf").write_text("[io]\n\nqueue_depth = 99999\n")
    r = check(bins, path)
    assert r.returncode == 1
    assert f"{confdir}/weightd.conf.d/20-bad.conf:3:" in r.stderr.decode(), r.stderr.decode()


def test_check_config_missing_file(bins, confdir):
    r = check(bins, confdir / "absent.conf")
    assert r.returncode == 1
    assert "absent.conf" in r.stderr.decode()


def test_sighup_with_a_broken_file_keeps_the_running_configuration(start_daemon, testdata):
    d = start_daemon(roots=[testdata / "models"], host_budget="64M")
    before = d.status()
    assert before["host_budget_bytes"] == 64 << 20

    good_text = d.config_text()
    d.config_path.write_text(good_text.replace("host_budget = 64M", "host_budget = 128M") + "[io]\nqueue_depth = 0\n")
    start = len(d.log())
    d.hup()
    log = d.wait_log("keeping the running configuration", start=start)
    assert f"{d.config_path}:" in log[start:]
    after = d.status()
    for key in ("host_budget_bytes", "model_roots", "socket", "pid"):
        assert after[key] == before[key], key
    d.hash(testdata / "models" / "plain")  # still serving

    # A valid change applies: a new budget and one more model root.
    extra = testdata / "good"
    d.write_config(host_budget="128M", model_roots=f"{testdata / 'models'}:{extra}")
    start = len(d.log())
    r = d.ctl("tensors", str(extra / "scalars.safetensors"))
    assert r.returncode == 1 and "PERMISSION_DENIED:" in r.stderr.decode()
    d.hup()
    d.wait_log("Reloaded the configuration", start=start)
    st = wait_until(lambda: (s := d.status())["host_budget_bytes"] == 128 << 20 and s, what="the new budget")
    assert st["model_roots"] == [str(testdata / "models"), str(extra)]
    assert st["pid"] == before["pid"]
    d.hash(extra / "scalars.safetensors")
    d.hash(testdata / "models" / "plain")


def test_sighup_keeps_leases_and_entries(start_daemon, testdata):
    d = start_daemon()
    model = str(testdata / "models" / "sharded")
    holder = d.hold(model)
    d.write_config(queue_depth=3, chunk_size="128K", host_budget="1G")
    start = len(d.log())
    d.hup()
    d.wait_log("Reloaded the configuration", start=start)
    st = d.status()
    assert (st["leases"], st["entries"], st["host_budget_bytes"]) == (1, 1, 1 << 30)
    assert holder.poll() is None
    # New io settings serve new loads.
    d.hash(testdata / "models" / "plain")
