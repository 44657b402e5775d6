"""Where weightd binds its socket: it creates missing folders, replaces a
stale socket, and refuses (exit 1, with the reason) to replace a symlink, a
file or a socket another daemon listens on, or to bind in a folder that
another user owns or may write to."""
import json
import os
import socket
import subprocess
import time

import pytest

from harness import NOBODY, make_dir


def start(bins, d, sock_path, roots, wait=True):
    conf = d / "weightd.conf"
    conf.write_text(f"[daemon]\nsocket = {sock_path}\nmodel_roots = {roots}\n")
    return subprocess.Popen([str(bins.weightd), "--config", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def refused(p):
    """The daemon's exit status and stderr, when it stops by itself."""
    _, err = p.communicate(timeout=10)
    return p.returncode, err


def serving(bins, sock_path):
    r = subprocess.run([str(bins.weightctl), "--socket", str(sock_path), "status", "--json"],
                       capture_output=True, text=True)
    return r.returncode == 0


def wait_serving(bins, p, sock_path):
    for _ in range(500):
        if serving(bins, sock_path):
            return
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.01)
    raise AssertionError("weightd does not answer")


def stop(p):
    p.terminate()
    _, err = p.communicate(timeout=15)
    assert p.returncode == 0, err
    return err


def test_creates_missing_folders(bins, workdir, testdata):
    d = make_dir(workdir, "sock-")
    path = d / "a" / "b" / "weightd.sock"
    p = start(bins, d, path, testdata / "models")
    wait_serving(bins, p, path)
    assert oct((d / "a" / "b").stat().st_mode & 0o777) == "0o755"
    stop(p)
    assert not path.exists()


def test_replaces_a_stale_socket(bins, workdir, testdata):
    d = make_dir(workdir, "sock-")
    path = d / "weightd.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # bound, nobody listening: stale
    p = start(bins, d, path, testdata / "models")
    wait_serving(bins, p, path)
    assert "Removed the stale socket" in stop(p)


def test_refuses_a_live_socket(bins, workdir, testdata):
    d = make_dir(workdir, "sock-")
    path = d / "weightd.sock"
    first = start(bins, d, path, testdata / "models")
    wait_serving(bins, first, path)
    second = start(bins, d, path, testdata / "models")
    rc, err = refused(second)
    assert rc == 1 and "Another daemon is listening on" in err
    assert serving(bins, path)
    stop(first)


@pytest.mark.parametrize("kind", ["symlink", "file"])
def test_refuses_a_symlink_or_a_file(bins, workdir, testdata, kind):
    d = make_dir(workdir, "sock-")
    path = d / "weightd.sock"
    target = d / "target"
    target.write_text("keep me\n")
    if kind == "symlink":
        path.symlink_to(target)
    else:
        path.write_text("keep me\n")
    rc, err = refused(start(bins, d, path, testdata / "models"))
    assert rc == 1
    assert ("is a symbolic link" if kind == "symlink" else "exists and is not a socket") in err
    assert target.read_text() == "keep me\n"
    assert path.is_symlink() if kind == "symlink" else path.read_text() == "keep me\n"


@pytest.mark.parametrize("how", ["writable-by-others", "owned-by-another-user"])
def test_refuses_a_folder_others_control(bins, workdir, testdata, how):
    d = make_dir(workdir, "sock-")
    folder = d / "run"
    folder.mkdir()
    if how == "writable-by-others":
        folder.chmod(0o777)
    else:
        os.chown(folder, NOBODY, NOBODY)
    path = folder / "weightd.sock"
    rc, err = refused(start(bins, d, path, testdata / "models"))
    assert rc == 1
    assert ("is writable by others" if how == "writable-by-others" else f"belongs to uid {NOBODY}") in err
    assert not path.exists()


def test_built_in_defaults_as_another_user(bins, workdir):
    """No --config, not root: the socket goes under $XDG_RUNTIME_DIR, where
    the client library looks for it by default too."""
    runtime = make_dir(workdir, "xdg-")
    os.chown(runtime, NOBODY, NOBODY)  # 0755: other users reach the socket, and the allow list decides
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime))
    env.pop("WEIGHTD_SOCKET", None)
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    p = subprocess.Popen(as_nobody + [str(bins.weightd)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    path = runtime / "weightd" / "weightd.sock"
    try:
        for _ in range(500):
            r = subprocess.run(as_nobody + [str(bins.weightctl), "status", "--json"], env=env,
                               capture_output=True, text=True)
            if r.returncode == 0:
                break
            assert p.poll() is None, p.stderr.read()
            time.sleep(0.01)
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        assert status["socket"] == str(path)
        assert status["model_roots"] == ["/srv/models"]
        assert (path.parent.stat().st_mode & 0o777, path.parent.stat().st_uid) == (0o755, NOBODY)
        # Root is always let in; any other user only when a list names it.
        r = subprocess.run([str(bins.weightctl), "--socket", str(path), "status", "--json"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        r = subprocess.run(["setpriv", "--reuid=12345", "--regid=12345", "--clear-groups", "--",
                            str(bins.weightctl), "--socket", str(path), "status"], capture_output=True, text=True)
        assert r.returncode == 1
        assert "PERMISSION_DENIED" in r.stderr and "uid 12345 is not allowed" in r.stderr
    finally:
        err = stop(p)
    assert "Listening on " + str(path) in err
    assert not path.exists()
