"""A Load of named tensors (LoadRequest.names), over the raw wire: the reply
lists exactly the tensors named, in the component's order, with the
offsets and bytes the files' own headers give (read here with json and
struct, not with the daemon's parser); the lease holds the whole resident
entry's slabs (one descriptor per file, the same memory a whole Load maps);
a name the component lacks is NOT_FOUND naming the model, the component
and the tensor, and the daemon goes on serving; names with a Prefetch,
empty, too long or too many are INVALID_ARGUMENT; every lease ends."""
import json
import mmap
import os

import pytest

import wdwire
from harness import BUILD, emulated_build, wait_until
from reference import read_header, write_safetensors
from wdwire import LOAD, PREFETCH, RELEASE, f_varint, load_body


def _tensors(prefix, n, seed):
    out = []
    for i in range(n):
        k = 1 + (i * 7 + seed) % 5
        data = bytes(((i * 31 + j + seed) & 0xFF) for j in range(4 * k))
        out.append((f"{prefix}.{i}.w", "F32", [k], data))
    return out


def _header(path):
    """name -> (absolute offset in the file, nbytes), in data order."""
    start, header, _ = read_header(path)
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return {k: (start + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in items}


@pytest.fixture
def sharded(start_daemon, tmp_root):
    """A model of two files, and a diffusers pipeline with a "unet"."""
    model = tmp_root / "two"
    model.mkdir()
    files = {"model-00001-of-00002.safetensors": _tensors("a", 40, 1),
             "model-00002-of-00002.safetensors": _tensors("b", 30, 2)}
    weight_map = {}
    for fname, tensors in files.items():
        write_safetensors(model / fname, tensors)
        weight_map.update({t[0]: fname for t in tensors})
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    pipe = tmp_root / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "X", "unet": ["diffusers", "U"]}))
    write_safetensors(pipe / "unet" / "diffusion_pytorch_model.safetensors", _tensors("u", 10, 3))
    # A request limit that holds 65537 names (the "many" case).
    return start_daemon(roots=[tmp_root], max_request_size="8M", host_budget="64M"), model, pipe


def _load(conn, model, names, component=""):
    env = conn.request(LOAD, load_body(str(model), component, names=names))
    return env


def test_named_load_lists_only_those_and_maps_the_whole_slabs(sharded):
    d, model, _pipe = sharded
    files = sorted(model.glob("*.safetensors"))
    headers = [_header(f) for f in files]
    want = ["b.29.w", "a.0.w", "b.3.w", "a.17.w", "a.0.w"]  # out of order, one twice
    with wdwire.connect(d.socket) as c:
        env = _load(c, model, want)
        assert env.code == "OK", env.message
        load = env.reply.msg(11)
        slabs = load.msgs(4)
        tensors = wdwire.tensors_of(load)
        # The component's order (files in order, each by offset), each once.
        assert [t[0] for t in tensors] == ["a.0.w", "a.17.w", "b.3.w", "b.29.w"]
        assert len(slabs) == 2 and len(c.fds) == 2  # every file's slab, as a whole Load
        fds = c.take_fds(2)
        try:
            maps = []
            for s in slabs:
                assert s.int(2) == os.path.getsize(files[len(maps)])
                maps.append(mmap.mmap(fds[s.int(1)], s.int(3), mmap.MAP_SHARED, mmap.PROT_READ))
            for name, dtype, shape, slab, offset, nbytes in tensors:
                f = 0 if name.startswith("a.") else 1
                assert slab == f
                assert (offset, nbytes) == headers[f][name]
                with open(files[f], "rb") as fh:
                    fh.seek(offset)
                    assert maps[slab][offset:offset + nbytes] == fh.read(nbytes), name
                assert dtype == "F32" and shape == [nbytes // 4]
            for m in maps:
                m.close()
        finally:
            for fd in fds:
                os.close(fd)
        lease = load.int(1)
        assert lease
        assert c.status()["leases"] == 1
        # One entry, the whole component: the names picked nothing out of it.
        env = c.request(RELEASE, f_varint(1, lease))
        assert env.code == "OK", env.message
        assert c.status()["leases"] == 0
        env = _load(c, model, [])
        assert env.code == "OK" and len(wdwire.tensors_of(env.reply.msg(11))) == 70
        c.take_fds(2)


def test_unknown_names_are_refused_and_the_daemon_serves_on(sharded):
    d, model, pipe = sharded
    with wdwire.connect(d.socket) as c:
        env = _load(c, model, ["a.1.w", "no.such\ttensor"])
        assert env.code == "NOT_FOUND"
        assert str(model) in env.message and 'no tensor "no.such\\x09tensor"' in env.message, env.message
        env = _load(c, pipe, ["u.1.w", "missing.w"], component="unet")
        assert env.code == "NOT_FOUND"
        assert str(pipe) in env.message and 'component "unet"' in env.message and '"missing.w"' in env.message, \
            env.message
        assert not c.fds and c.status()["leases"] == 0
        # Same connection, then a new one: served.
        env = _load(c, pipe, ["u.9.w"], component="unet")
        assert env.code == "OK" and [t[0] for t in wdwire.tensors_of(env.reply.msg(11))] == ["u.9.w"]
    with wdwire.connect(d.socket) as c:
        assert c.status()["leases"] == 0
        env = _load(c, model, ["a.39.w"])
        assert env.code == "OK", env.message


@pytest.mark.parametrize("case", ["prefetch", "empty", "long", "many"])
def test_bad_names_are_invalid(sharded, case):
    d, model, _pipe = sharded
    with wdwire.connect(d.socket) as c:
        if case == "prefetch":
            env = c.request(PREFETCH, load_body(str(model), names=["a.0.w"]))
            want = "names: only a Load"
        elif case == "empty":
            env = _load(c, model, ["a.0.w", ""])
            want = "names: name 1"
        elif case == "long":
            env = _load(c, model, ["x" * 1025])
            want = "names: name 0"
        else:
            # 6.7 MB on the wire, under the fixture's request limit; names
            # this long also keep the decode within its heap budget (2
            # bytes a byte: a short string costs protobuf-c over 80).
            env = _load(c, model, [f"layers.{i:08}.mlp.experts.".ljust(100, "w") for i in range(65537)])
            want = "at most 65536"
        assert env.code == "INVALID_ARGUMENT", (env.code, env.message)
        assert want in env.message, env.message
        assert not c.fds and c.status()["leases"] == 0


@pytest.mark.skipif(not emulated_build(), reason=f"{BUILD} is not built with -Dgpu_emulation=true")
def test_named_device_load_lists_those_of_the_device_slab(start_daemon, tmp_root):
    """A device Load with names: the same device entry and slab as without,
    and each tensor named where the whole device Load puts it."""
    model = tmp_root / "m.safetensors"
    write_safetensors(model, _tensors("d", 30, 4))
    d = start_daemon(roots=[tmp_root], env={"WEIGHTD_EMULATED_GPUS": "1:64M"})
    with d.raw() as c:
        wait_until(lambda: not c.status()["gpu"].startswith("starting"), what="the device search")
        if c.status()["gpu"] != "ok":
            pytest.fail(f"no GPU tier on an emulated build: {c.status()['gpu']}")
        whole = c.request(LOAD, load_body(str(model), target="cuda:0"))
        assert whole.code == "OK", whole.message
        c.take_fds(1)
        placed = {t[0]: t for t in wdwire.tensors_of(whole.reply.msg(11))}
        env = c.request(LOAD, load_body(str(model), target="cuda:0", names=["d.29.w", "d.3.w"]))
        assert env.code == "OK", env.message
        assert len(c.take_fds(1)) == 1
        got = wdwire.tensors_of(env.reply.msg(11))
        assert [t[0] for t in got] == ["d.3.w", "d.29.w"]
        assert got == [placed["d.3.w"], placed["d.29.w"]]
        env = c.request(LOAD, load_body(str(model), target="cuda:0", names=["d.3.w", "d.30.w"]))
        assert env.code == "NOT_FOUND" and '"d.30.w"' in env.message, env.message
        assert len([e for e in d.ls() if e["tier"] == "cuda:0"]) == 1


def test_weightctl_cat_leases_the_tensor_it_prints(sharded):
    """weightctl cat: the bytes of the file's tensor, through a lease of that
    tensor only; an unknown name is the daemon's NOT_FOUND naming it."""
    d, model, _pipe = sharded
    files = sorted(model.glob("*.safetensors"))
    offset, nbytes = _header(files[1])["b.7.w"]
    with open(files[1], "rb") as f:
        f.seek(offset)
        want = f.read(nbytes)
    r = d.ctl("cat", str(model), "--tensor", "b.7.w")
    assert r.returncode == 0 and r.stdout == want, r.stderr.decode()
    r = d.ctl("cat", str(model), "--tensor", "b.70.w")
    err = r.stderr.decode()
    assert r.returncode == 1 and r.stdout == b"" and "NOT_FOUND:" in err and '"b.70.w"' in err, err
    assert d.status()["leases"] == 0
