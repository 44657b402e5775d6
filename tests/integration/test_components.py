"""The components of a model: `weightctl components` against what the test
reads itself (model_index.json with the json module, and the folders'
listings), and `weightctl prefetch MODEL`, which prefetches the components
the daemon lists with weights and says why it skips the others.
"""
import json
import pathlib

import pytest

import wdwire
from harness import Daemon

COMPONENTS = 21  # Envelope.components
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SKIP_REASONS = {"no-weights": "no weights", "absent": "absent", "missing": "missing folder",
                "pickle-only": "pickle checkpoints only, not served"}

MODELS = ["models/diffusers", "models/diffusers-pickle", "models/diffusers-missing-folder", "models/plain",
          "models/sharded", "models/single.safetensors", "models/pickle-only", "models/no-weights"]


def folder_kind(path):
    """What a folder holds, by its file names."""
    if not path.is_dir():
        return "missing"
    names = [p.name for p in path.iterdir() if p.is_file()]
    if any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        return "weights"
    if any(n.endswith(PICKLE_SUFFIXES) for n in names):
        return "pickle-only"
    return "no-weights"


def expected_components(model):
    """[{name, kind, library, class}] from the files themselves."""
    model = pathlib.Path(model)
    if model.is_file():
        kind = "pickle-only" if model.name.endswith(PICKLE_SUFFIXES) else "weights"
        return [{"name": "", "kind": kind, "library": "", "class": ""}]
    index = model / "model_index.json"
    if not index.exists():
        return [{"name": "", "kind": folder_kind(model), "library": "", "class": ""}]
    out = []
    for key, value in json.loads(index.read_text()).items():  # the file's order
        if key.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        if not all(v is None or isinstance(v, str) for v in value):
            continue
        library, cls = value
        kind = "absent" if library is None else folder_kind(model / key)
        out.append({"name": key, "kind": kind, "library": library or "", "class": cls or ""})
    return out


def assert_refused(d, args, code, text):
    """weightctl ARGS fails with exit 1, nothing on stdout, and CODE and text
    on stderr."""
    r = d.ctl(*args)
    assert r.returncode == 1 and r.stdout == b""
    err = r.stderr.decode()
    assert f"weightctl: {code}:" in err and text in err, err


@pytest.fixture(scope="module")
def shared_daemon(bins, workdir, testdata):
    """One daemon for the module's read-only cases."""
    d = Daemon(bins, workdir, [testdata / "models"], {}).start()
    yield d
    d.finish()


@pytest.mark.parametrize("model", MODELS)
def test_components_json_matches_the_files(shared_daemon, testdata, model):
    expected = expected_components(testdata / model)
    assert shared_daemon.ctl_json("components", testdata / model) == expected


@pytest.mark.parametrize("model", MODELS)
def test_components_table_matches_the_files(shared_daemon, testdata, model):
    r = shared_daemon.ctl("components", testdata / model)
    assert r.returncode == 0, r.stderr.decode()
    lines = r.stdout.decode().splitlines()
    assert lines[0].split() == ["NAME", "KIND", "LIBRARY", "CLASS"]
    rows = [line.split() for line in lines[1:]]
    assert rows == [[c["name"] or "-", c["kind"], c["library"] or "-", c["class"] or "-"]
                    for c in expected_components(testdata / model)]


def test_the_test_data_has_every_kind(testdata):
    """The cases above cover every kind and both shapes of a model."""
    kinds = {c["kind"] for m in MODELS for c in expected_components(testdata / m)}
    assert kinds == {"weights", "absent", "missing", "no-weights", "pickle-only"}


@pytest.mark.parametrize("model, code, text", [
    ("models/does-not-exist", "NOT_FOUND", "no such file"),
    ("models/diffusers-bad-index", "FORMAT_ERROR", "not a JSON object"),
    ("good", "PERMISSION_DENIED", ""),  # outside the daemon's one root
])
def test_components_refused(shared_daemon, testdata, model, code, text):
    assert_refused(shared_daemon, ["components", testdata / model], code, text)


def test_components_takes_no_component(shared_daemon, testdata):
    r = shared_daemon.ctl("components", testdata / "models/diffusers", "--component", "vae")
    assert r.returncode == 2 and "takes no --component" in r.stderr.decode(), r.stderr.decode()
    # On the wire, a component is INVALID_ARGUMENT.
    with shared_daemon.raw() as conn:
        env = conn.request(COMPONENTS, wdwire.ref_body(str(testdata / "models/diffusers"), "vae"))
        assert env.code == "INVALID_ARGUMENT", env.message
        assert not env.reply.has(15)


def test_request_id_0_is_refused(shared_daemon):
    with shared_daemon.raw() as conn:
        conn.send_raw(wdwire.frame(wdwire.envelope(0, wdwire.STATUS)))
        env = conn.recv()
        assert (env.id, env.code) == (0, "INVALID_ARGUMENT")
        assert env.message == "request id 0 is reserved for the daemon's own messages"
        # The connection carries on.
        assert conn.status()["version"]


# ---- prefetch MODEL: the components with weights ----

@pytest.mark.parametrize("model", ["models/diffusers", "models/diffusers-pickle", "models/diffusers-missing-folder"])
def test_prefetch_pipeline_takes_the_components_with_weights(start_daemon, testdata, model):
    d = start_daemon(roots=[testdata / "models"])
    path = testdata / model
    listed = expected_components(path)
    wanted = [c["name"] for c in listed if c["kind"] == "weights"]

    r = d.ctl("prefetch", path)
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode().splitlines()
    assert [line.split(":")[0] for line in out] == wanted
    assert all("resident in" in line for line in out), out
    assert r.stderr.decode().splitlines() == [f"weightctl: skipping {c['name']}: {SKIP_REASONS[c['kind']]}"
                                              for c in listed if c["kind"] != "weights"]
    resident = {e["component"] for e in d.ls() if e["model"] == str(path)}
    assert resident == set(wanted)

    # Again, as JSON: the same components in the same order, all resident
    # already, and nothing on stderr.
    r = d.ctl("prefetch", path, "--json")
    assert r.returncode == 0 and r.stderr == b"", r.stderr.decode()
    results = json.loads(r.stdout)
    assert [x["component"] for x in results] == wanted
    assert all(x["was_resident"] and x["model"] == str(path) for x in results)


@pytest.mark.parametrize("model, code, text", [
    ("models/pickle-only", "UNSUPPORTED", "safetensors files only"),
    ("models/no-weights", "NOT_FOUND", "no safetensors weights"),
    ("models/does-not-exist", "NOT_FOUND", "no such file"),
])
def test_prefetch_plain_model_without_weights_says_why(shared_daemon, testdata, model, code, text):
    assert_refused(shared_daemon, ["prefetch", testdata / model], code, text)


def test_prefetch_plain_model(shared_daemon, testdata):
    path = testdata / "models/plain"
    results = shared_daemon.ctl_json("prefetch", path)
    assert [(x["model"], x["component"]) for x in results] == [(str(path), "")]
    assert results[0]["bytes"] == (path / "model.safetensors").stat().st_size
