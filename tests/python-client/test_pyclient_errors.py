"""Each daemon error arrives as its exception type, with the daemon's code
and message (checked against what weightctl prints for the same request),
and the control calls (prefetch with progress, list, status, evict, pin,
unpin) agree with weightctl."""
import shutil

import pytest

from test_layouts import REFUSED

CLASSES = {"INVALID_ARGUMENT": "InvalidArgument", "NOT_FOUND": "NotFound", "PERMISSION_DENIED": "PermissionDenied",
           "FORMAT_ERROR": "FormatError", "IO_ERROR": "IoError", "RESOURCE_EXHAUSTED": "ResourceExhausted",
           "UNAVAILABLE": "Unavailable", "CANCELLED": "Cancelled", "INTERNAL": "Internal",
           "UNSUPPORTED": "Unsupported", "BUSY": "Busy", "PROTOCOL_ERROR": "ProtocolError"}


def test_every_code_has_its_class(wd):
    for number, (name, cls) in enumerate(CLASSES.items(), 1):
        c = getattr(wd, cls)
        assert issubclass(c, wd.Error) and c.code == number and c.code_name == name


def _expect(daemon, wd, fn, code, model, component=""):
    """fn raises the class of code, with weightctl's message for the same request."""
    with pytest.raises(getattr(wd, CLASSES[code])) as e:
        fn()
    err = e.value
    assert isinstance(err, wd.Error) and err.code_name == code and err.code == getattr(wd, CLASSES[code]).code
    r = daemon.ctl("tensors", model, *(["--component", component] if component else []))
    assert r.returncode == 1
    assert r.stderr.decode().strip().endswith(f"{code}: {err.message}"), (r.stderr, err.message)
    return err


@pytest.mark.parametrize("refused", REFUSED, ids=lambda r: f"{r[0]}:{r[1]}:{r[2]}")
def test_refused_layouts_raise_their_class(daemon, testdata, wd, refused):
    model, component, code, text = refused
    with wd.connect(daemon.socket) as c:
        err = _expect(daemon, wd, lambda: c.load(testdata / model, component or None), code, testdata / model,
                      component)
    assert text in err.message


def test_outside_every_root_is_permission_denied(daemon, testdata, wd, tmp_root):
    outside = tmp_root / "model.safetensors"
    shutil.copy(testdata / "good" / "many.safetensors", outside)
    with wd.connect(daemon.socket) as c:
        _expect(daemon, wd, lambda: c.load(outside), "PERMISSION_DENIED", outside)


def test_malformed_file_is_format_error(start_daemon, testdata, wd, tmp_root):
    shutil.copy(testdata / "bad" / "overlap.safetensors", tmp_root / "bad.safetensors")
    d = start_daemon(roots=[tmp_root])
    with wd.connect(d.socket) as c:
        _expect(d, wd, lambda: c.load(tmp_root / "bad.safetensors"), "FORMAT_ERROR", tmp_root / "bad.safetensors")


def test_over_budget_is_resource_exhausted(start_daemon, testdata, wd, tmp_root):
    shutil.copy(testdata / "good" / "large-tensor.safetensors", tmp_root / "big.safetensors")
    d = start_daemon(roots=[tmp_root], host_budget=1 << 20, host_pages="small")
    with wd.connect(d.socket) as c:
        with pytest.raises(wd.ResourceExhausted, match="short by"):
            c.load(tmp_root / "big.safetensors")


def test_no_daemon_is_unavailable(wd, tmp_root):
    with pytest.raises(wd.Unavailable, match=str(tmp_root / "none.sock")):
        wd.connect(tmp_root / "none.sock")
    with pytest.raises(wd.Unavailable, match="/nonexistent/weightd-tests.sock"):
        wd.connect()  # $WEIGHTD_SOCKET


def test_device_with_numpy_and_unknown_framework_are_invalid(daemon, testdata, wd):
    # Device loads themselves: test_device.py.
    with wd.connect(daemon.socket) as c:
        with pytest.raises(wd.InvalidArgument, match=r"cuda:0.*framework=\"pt\""):
            c.load(testdata / "models" / "plain", device="cuda:0")
        with pytest.raises(wd.InvalidArgument, match="framework"):
            c.load(testdata / "models" / "plain", framework="jax")
    assert daemon.status()["leases"] == 0


def test_control_calls_agree_with_weightctl(daemon, testdata, wd):
    model = testdata / "models" / "diffusers"
    seen = []
    with wd.connect(daemon.socket) as c:
        out = c.prefetch(model, ["vae", "text_encoder"], progress=lambda comp, done, total: seen.append((comp, done, total)))
        ls = {e["component"]: e for e in daemon.ls()}
        for comp in ("vae", "text_encoder"):
            assert out[comp] == {"bytes": ls[comp]["bytes"], "was_resident": False}
        assert all(done <= total for _, done, total in seen)
        assert c.prefetch(model, "vae")["vae"]["was_resident"] is True

        mine = {(e["model"], e["component"]): e for e in c.list()}
        for e in daemon.ls():
            got = mine[(e["model"], e["component"])]
            for k in ("tier", "state", "bytes", "leases", "pinned", "files"):
                assert got[k] == e[k], k

        c.pin(model, "vae")
        assert {e["component"]: e["pinned"] for e in daemon.ls()}["vae"] is True
        with pytest.raises(wd.Busy, match="pinned"):
            c.evict(model, "vae")
        c.unpin(model, "vae")
        with c.load(model, "vae") as lease:
            t = lease["encoder.conv_in.bias"]
            with pytest.raises(wd.Busy, match="lease"):
                c.evict(model, "vae")
        del t
        c.evict(model, "vae")
        assert "vae" not in {e["component"] for e in daemon.ls()}
        with pytest.raises(wd.NotFound):
            c.evict(model, "vae")

        st, ref = c.status(), daemon.status()
        for k in ("pid", "host_budget_bytes", "leases", "entries", "model_roots", "socket", "version"):
            assert st[k] == ref[k], k


def test_progress_callback_can_cancel(start_daemon, make_model, wd):
    from harness import SLOW
    model = make_model("64M", 2)
    d = start_daemon(roots=[model.parent], **SLOW)
    calls = []
    with wd.connect(d.socket) as c:
        with pytest.raises(wd.Cancelled):
            c.prefetch(model, progress=lambda comp, done, total: calls.append(done) or True)
        assert calls, "no progress arrived"

        class Stop(Exception):
            pass

        def boom(comp, done, total):
            raise Stop()
        with pytest.raises(Stop):
            c.prefetch(model, progress=boom)
