"""LoadReply.table (LoadRequest.compact_tensors), over the raw wire: a Load
that asks for it gets the tensors as columns and no Tensor messages, and
the columns, decoded here with struct alone, give the names, dtypes,
shapes, offsets and byte counts that the file's own header gives (read
with json); a Load that does not ask gets Tensor messages as before, with
the same values; a named Load gets only the tensors named; a sharded load
whose rules split a tensor falls back to Tensor messages (a table has no
full_shape), one that splits nothing gets a table with the file column; a
Prefetch gets neither."""
import struct

import pytest

import wdwire
from reference import read_header, write_safetensors
from wdwire import LOAD, PREFETCH, RELEASE, f_bytes, f_varint, load_body


def _tensors():
    """Every shape the table must carry: 0 to 4 dimensions, an empty
    tensor, a sub-byte dtype, names of many lengths (one not ASCII)."""
    out = []
    specs = [("F32", [4, 8], 4), ("BF16", [16], 2), ("I64", [], 8), ("F16", [0, 5], 2), ("U8", [2, 3, 4, 5], 1),
             ("F4", [6], None), ("F64", [1, 1, 1], 8), ("I8", [3], 1)]
    for i in range(64):
        dtype, shape, size = specs[i % len(specs)]
        n = 1
        for s in shape:
            n *= s
        nbytes = n * size if size else n // 2
        name = f"layer.{i}." + "w" * (i % 13) + ("\u00e9" if i == 7 else "")
        out.append((name, dtype, shape, bytes(((i * 31 + j) & 0xFF) for j in range(nbytes))))
    return out


def _expected(path, slab=0):
    """[(name, dtype, shape, slab, offset, nbytes)] from the file's header, in data order."""
    start, header, _ = read_header(path)
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return [(k, v["dtype"], list(v["shape"]), slab, start + v["data_offsets"][0],
             v["data_offsets"][1] - v["data_offsets"][0]) for k, v in items]


@pytest.fixture
def model(start_daemon, tmp_root):
    path = tmp_root / "m.safetensors"
    write_safetensors(path, _tensors())
    return start_daemon(roots=[tmp_root]), path


def _load(c, body):
    env = c.request(LOAD, body)
    assert env.code == "OK", env.message
    load = env.reply.msg(11)
    c.take_fds(len(load.msgs(4)))
    return load


def _release(c, load):
    env = c.request(RELEASE, f_varint(1, load.int(1)))
    assert env.code == "OK", env.message


def test_compact_load_sends_the_header_as_columns(model):
    d, path = model
    want = _expected(path)
    with wdwire.connect(d.socket) as c:
        load = _load(c, load_body(str(path), compact=True))
        assert not load.has(5), "a table was asked for: no Tensor messages"
        rows = wdwire.table_of(load)
        assert rows is not None
        assert [r[:6] for r in rows] == want
        assert all(r[6] is None for r in rows)  # one slab per file: no file column
        dtypes = load.msg(11).strs(3)
        assert len(dtypes) == len(set(dtypes)) == len({t[1] for t in want})
        _release(c, load)


def test_without_the_flag_the_reply_is_tensor_messages(model):
    d, path = model
    want = _expected(path)
    with wdwire.connect(d.socket) as c:
        load = _load(c, load_body(str(path)))
        assert not load.has(11), "no table was asked for"
        assert [list(t) for t in wdwire.tensors_of(load)] == [list(t) for t in want]
        _release(c, load)


def test_named_compact_load_lists_only_those(model):
    d, path = model
    want = _expected(path)
    names = [want[40][0], want[3][0], want[63][0], want[3][0]]
    with wdwire.connect(d.socket) as c:
        load = _load(c, load_body(str(path), names=names, compact=True))
        assert not load.has(5)
        assert [r[:6] for r in wdwire.table_of(load)] == [want[3], want[40], want[63]]
        _release(c, load)


def _shard(rank, world, rules=(), tensors=()):
    b = f_varint(1, rank) + f_varint(2, world)
    for pattern, dim in rules:
        b += f_bytes(3, f_bytes(1, pattern) + f_varint(2, dim))
    return b + b"".join(f_bytes(5, t) for t in tensors)


def test_a_split_tensor_falls_back_to_messages(model):
    d, path = model
    with wdwire.connect(d.socket) as c:
        # layer.0.* is F32 [4, 8]: split along dim 0 into [2, 8].
        load = _load(c, load_body(str(path), shard=_shard(1, 2, [("layer.0.*", 0)]), compact=True))
        assert not load.has(11), "a table cannot carry full_shape"
        tensors = load.msgs(5)
        split = [t for t in tensors if t.str(1) == "layer.0."]
        assert len(split) == 1 and split[0].packed(3) == [2, 8] and split[0].packed(7) == [4, 8]
        assert split[0].int(9) == 2  # shard_start
        _release(c, load)


def test_a_shard_that_splits_nothing_has_the_file_column(model):
    d, path = model
    want = {t[0]: t for t in _expected(path)}
    with wdwire.connect(d.socket) as c:
        load = _load(c, load_body(str(path), shard=_shard(0, 1, tensors=["layer.1*"]), compact=True))
        assert not load.has(5)
        rows = wdwire.table_of(load)
        picked = [n for n in want if n.startswith("layer.1")]
        assert sorted(r[0] for r in rows) == sorted(picked) and len(picked) > 5
        files = load.msgs(9)
        assert len(files) == 1 and files[0].str(4).endswith("m.safetensors")
        for name, dtype, shape, slab, offset, nbytes, file in rows:
            assert (dtype, shape, nbytes) == tuple(want[name][1:3]) + (want[name][5],)
            assert slab == 0 and file == 0 and offset % 256 == 0
        _release(c, load)


def test_prefetch_has_neither(model):
    d, path = model
    with wdwire.connect(d.socket) as c:
        env = c.request(PREFETCH, load_body(str(path), compact=True))
        assert env.code == "OK", env.message
        load = env.reply.msg(11)
        assert not load.has(5) and not load.has(11)


def test_fixed_columns_are_little_endian(model):
    """The packed fixed64 columns are 8 little-endian bytes per value, as the
    protobuf encoding says: the first offset is the header's size."""
    d, path = model
    start, _, _ = read_header(path)
    with wdwire.connect(d.socket) as c:
        load = _load(c, load_body(str(path), compact=True))
        raw = wdwire.decode(load.f[11][0])[7][0]
        assert isinstance(raw, bytes) and len(raw) % 8 == 0
        assert struct.unpack_from("<Q", raw, 0)[0] == start
        _release(c, load)
