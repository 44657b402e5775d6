#!/usr/bin/env python3
"""Deterministic test-data generator for weightd.

Usage: python3 tests/tools/gen-testdata.py OUTDIR [--seed 1234]

Writes three trees under OUTDIR (each is deleted and rebuilt on every run;
nothing else in OUTDIR is touched):

  good/    valid safetensors files that exercise the corners of the format:
           every dtype, scalars, zero-size tensors, empty headers, unpadded
           and pretty-printed headers, non-ASCII and escaped names, header
           keys out of data order, 1000 tensors, one ~5 MB tensor.
  models/  checkpoint layouts as they appear on disk: a single file, a
           plain folder, a sharded folder with an index, diffusers pipelines
           (sharded, multi-file, absent and weightless components),
           pickle-only models, and broken indexes with one defect each.
  bad/     malformed safetensors files, one broken rule per file, plus
           bad/expected.json mapping each file name to the substring that
           weightd's parser error message must contain.

Only the Python standard library is used.  All tensor bytes come from
random.Random seeded with the --seed value and the file's name, so every run
with the same seed produces byte-identical output.
"""

import argparse
import json
import math
import pickle
import random
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

HEADER_LIMIT = 100_000_000
U64_MAX = 2**64 - 1

DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}

OWNED_DIRS = ("good", "models", "bad")


# --------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------

@dataclass
class Tensor:
    name: str
    dtype: str
    shape: list
    data: bytes


def nbytes(dtype, shape):
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8:
        raise ValueError(f"{dtype}{shape} is not a whole number of bytes")
    return bits // 8


def rng_for(seed, name):
    """A generator private to one output file, so files do not depend on
    the order in which they are written."""
    return random.Random(f"{seed}/{name}")


def make_tensor(rng, name, dtype, shape):
    data = rng.randbytes(nbytes(dtype, shape))
    if dtype == "BOOL":
        data = bytes(b & 1 for b in data)
    return Tensor(name, dtype, list(shape), data)


def make_tensors(rng, specs):
    """specs: iterable of (name, dtype, shape)."""
    return [make_tensor(rng, *spec) for spec in specs]


def frame(header, data, *, align=8, tail=b"", length=None):
    """Assemble a file: u64 length, header, padding, data.

    header  JSON text (str is UTF-8 encoded; bytes are used verbatim)
    align   pad the header with spaces to a multiple of this (1: no padding)
    tail    bytes placed right after the JSON, before the space padding
    length  the u64 header length to write: None for the true length, an
            int, or a function of the true (padded) length
    """
    if isinstance(header, str):
        header = header.encode("utf-8")
    header += tail
    header += b" " * (-len(header) % align)
    if length is None:
        length = len(header)
    elif callable(length):
        length = length(len(header))
    return struct.pack("<Q", length) + header + data


def serialize(tensors, metadata=None, *, align=8, reverse_keys=False,
              ensure_ascii=False, indent=None):
    """A valid safetensors file: data laid out in list order from offset 0.

    Header keys follow data order, __metadata__ first, unless reverse_keys
    lists everything backwards (so key order disagrees with data order)."""
    members = []
    if metadata is not None:
        members.append(("__metadata__", metadata))
    offset = 0
    for t in tensors:
        members.append((t.name, {"dtype": t.dtype, "shape": t.shape,
                                 "data_offsets": [offset, offset + len(t.data)]}))
        offset += len(t.data)
    if reverse_keys:
        members.reverse()
    separators = (", ", ": ") if indent else (",", ":")
    text = json.dumps(dict(members), ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators)
    return frame(text, b"".join(t.data for t in tensors), align=align)


class Output:
    """Writes files under OUTDIR.  Paths are relative to OUTDIR; they also
    key each file's random generator, so output does not depend on OUTDIR."""

    def __init__(self, root, seed):
        self.root = root
        self.seed = seed

    def path(self, rel):
        return self.root / rel

    def bytes(self, rel, content):
        path = self.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return path

    def json(self, rel, obj):
        text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
        return self.bytes(rel, text.encode("utf-8"))

    def rng(self, rel):
        return rng_for(self.seed, rel)

    def safetensors(self, rel, specs, metadata=None, **kw):
        """Write a valid file; returns the tensors written."""
        tensors = make_tensors(self.rng(rel), specs)
        self.bytes(rel, serialize(tensors, metadata, **kw))
        return tensors


# --------------------------------------------------------------------------
# good/
# --------------------------------------------------------------------------

ALL_DTYPE_SHAPES = {
    "BOOL": [7], "U8": [3, 5], "I8": [2, 3, 4], "F8_E4M3": [4, 4],
    "F8_E5M2": [2, 2, 2, 2], "F8_E8M0": [9], "F8_E4M3FNUZ": [3, 1, 2],
    "F8_E5M2FNUZ": [5], "I16": [4, 3], "U16": [6], "F16": [2, 8],
    "BF16": [3, 3, 3], "I32": [1, 2, 3, 1], "U32": [10], "F32": [4, 5],
    "I64": [3], "U64": [2, 2], "F64": [2, 3], "C64": [2, 1, 2],
    "F4": [2, 3, 4], "F6_E2M3": [4, 8], "F6_E3M2": [2, 2, 3],
}

UNICODE_NAMES = [
    "ве́с.weight",           # Cyrillic with a combining accent
    "层.0",
    "🦀.bias",
    "名前/レイヤー.0/重み",
    "model/encoder.layers.0/attn.q_proj.weight",
    "a.b.c.d",
    "café.norm",             # precomposed é
    'quote"and\\backslash',
    "tab\there",
]


def gen_good(out):
    def put(name, specs, metadata=None, **kw):
        out.safetensors("good/" + name, specs, metadata, **kw)
        return out.path("good/" + name)

    put("all-dtypes.safetensors",
        [(f"t.{d.lower()}", d, s) for d, s in ALL_DTYPE_SHAPES.items()],
        {"format": "pt", "generator": "weightd gen-testdata",
         "note": "one tensor per dtype"})

    put("scalars.safetensors",
        [(f"scalar.{d.lower()}", d, [])
         for d in ("F32", "F16", "BF16", "F64", "I64", "I8", "U8", "BOOL",
                   "F8_E4M3")],
        {"format": "pt"})

    put("zero-size.safetensors", [
        ("a", "F32", [2, 2]),
        ("empty.1d", "F32", [0]),
        ("empty.3x0", "F16", [3, 0]),
        ("b", "I32", [3]),
        ("empty.f4", "F4", [0, 7]),
        ("empty.0x5", "U8", [0, 5]),     # last tensor: ends exactly at EOF
    ])

    put("empty.safetensors", [])
    put("empty-meta.safetensors", [], {"format": "pt", "empty": "yes"})

    path = put("unpadded.safetensors", [("w", "F32", [3]), ("b", "BF16", [2])],
               {"format": "pt", "k": "v"}, align=1)
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert header_len % 8 != 0, "unpadded.safetensors came out aligned"

    specs = [(n, "F16", [i + 1]) for i, n in enumerate(UNICODE_NAMES)]
    meta = {"format": "pt", "язык": "русский"}
    put("unicode-names.safetensors", specs, meta)
    put("unicode-escaped.safetensors", specs, meta, ensure_ascii=True)

    put("key-order.safetensors",
        [("first", "F32", [4]), ("second", "I8", [3]), ("third", "BF16", [5]),
         ("fourth", "U8", [1])],
        {"format": "pt"}, reverse_keys=True)

    put("pretty-json.safetensors",
        [("w", "F32", [2, 2]), ("b", "F32", [2])], {"format": "pt"}, indent=2)

    dtypes = ["F32", "F16", "BF16", "I8", "U8", "I64"]
    put("many.safetensors",
        [(f"layers.{i}.mlp.weight", dtypes[i % len(dtypes)], [1 + i % 4, 3])
         for i in range(1000)],
        {"format": "pt"})

    path = put("large-tensor.safetensors", [
        ("embed.weight", "F16", [1280, 2048]),     # 5 MiB
        ("norm.weight", "F32", [7]),
        ("norm.bias", "BF16", [3]),
        ("scale", "F64", []),
    ], {"format": "pt"})
    assert path.stat().st_size % 4096 != 0


# --------------------------------------------------------------------------
# models/
# --------------------------------------------------------------------------

PT = {"format": "pt"}

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 16,
    "torch_dtype": "bfloat16",
}

VAE_SPECS = [("encoder.conv_in.weight", "F32", [4, 3, 3, 3]),
             ("encoder.conv_in.bias", "F32", [4]),
             ("decoder.conv_out.weight", "F16", [3, 4, 3, 3])]


def llama_specs(layers, dtype="BF16"):
    specs = [("model.embed_tokens.weight", dtype, [16, 8])]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", dtype, [8, 8]),
            (p + "self_attn.k_proj.weight", dtype, [4, 8]),
            (p + "self_attn.v_proj.weight", dtype, [4, 8]),
            (p + "self_attn.o_proj.weight", dtype, [8, 8]),
            (p + "mlp.gate_proj.weight", "F8_E4M3", [16, 8]),
            (p + "mlp.up_proj.weight", "F8_E4M3", [16, 8]),
            (p + "mlp.down_proj.weight", "F8_E4M3", [8, 16]),
            (p + "mlp.down_proj.weight_scale", "F32", []),
            (p + "input_layernorm.weight", "F32", [8]),
            (p + "post_attention_layernorm.weight", "F32", [8]),
        ]
    specs += [("model.norm.weight", "F32", [8]),
              ("lm_head.weight", dtype, [16, 8])]
    return specs


def small(prefix, n):
    """n two-element F32 tensors named prefix0, prefix1, ..."""
    return [(f"{prefix}{i}", "F32", [2]) for i in range(n)]


def split(specs, parts):
    size = math.ceil(len(specs) / parts)
    return [specs[i:i + size] for i in range(0, len(specs), size)]


def shard_name(i, n, stem="model"):
    return f"{stem}-{i:05d}-of-{n:05d}.safetensors"


def write_sharded(out, folder, shards, *, stem="model", weight_map=None):
    """Write shards (a list of spec lists) and STEM.safetensors.index.json.

    The index maps every stored tensor to its shard, unless weight_map is
    given.  total_size is the sum of the stored tensors' byte sizes."""
    total = 0
    stored = {}
    for i, specs in enumerate(shards, 1):
        name = shard_name(i, len(shards), stem)
        for t in out.safetensors(f"{folder}/{name}", specs, PT):
            stored[t.name] = name
            total += len(t.data)
    out.json(f"{folder}/{stem}.safetensors.index.json", {
        "metadata": {"total_size": total},
        "weight_map": dict(sorted((weight_map or stored).items())),
    })


def write_vae(out, folder):
    out.safetensors(f"{folder}/vae/diffusion_pytorch_model.safetensors",
                    VAE_SPECS, PT)
    out.json(f"{folder}/vae/config.json", {"_class_name": "AutoencoderKL"})


def fake_pickle():
    """Bytes of a pickle checkpoint; weightd must never unpickle it."""
    return pickle.dumps({"weight": [0.5, -0.5, 1.0, 2.0]}, protocol=2)


def gen_plain_models(out):
    out.safetensors("models/single.safetensors",
                    [("weight", "F32", [4, 4]), ("bias", "F32", [4])], PT)

    out.safetensors("models/plain/model.safetensors", llama_specs(1), PT)
    out.json("models/plain/config.json", LLAMA_CONFIG)

    specs = llama_specs(3) + [(f"extra.{d.lower()}", d, [4]) for d in
                              ("F16", "I64", "U8", "I32", "F64", "F4", "BOOL")]
    write_sharded(out, "models/sharded", split(specs, 3))
    out.json("models/sharded/config.json", dict(LLAMA_CONFIG, num_hidden_layers=3))

    out.json("models/no-weights/config.json", LLAMA_CONFIG)


def gen_diffusers(out):
    d = "models/diffusers"
    out.json(f"{d}/model_index.json", {
        "_class_name": "FluxPipeline",
        "_diffusers_version": "0.30.0",
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "controlnet": ["diffusers", "Multi"],
    })

    transformer = [(f"transformer_blocks.{i}.attn.to_{p}.weight", "BF16", [8, 8])
                   for i in range(3) for p in "qkv"]
    transformer += [("proj_out.weight", "BF16", [4, 8]),
                    ("proj_out.bias", "F32", [4])]
    write_sharded(out, f"{d}/transformer", split(transformer, 2),
                  stem="diffusion_pytorch_model")
    out.json(f"{d}/transformer/config.json",
             {"_class_name": "FluxTransformer2DModel", "num_layers": 3})

    write_vae(out, d)

    out.safetensors(f"{d}/text_encoder/model.safetensors", [
        ("text_model.embeddings.token_embedding.weight", "F16", [16, 8]),
        ("text_model.final_layer_norm.weight", "F32", [8]),
    ], PT)
    out.json(f"{d}/text_encoder/config.json",
             {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model"})

    # text_encoder_2 is [null, null]: no folder.  No weights for these two:
    out.json(f"{d}/scheduler/scheduler_config.json",
             {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    out.json(f"{d}/tokenizer/vocab.json", {"<|startoftext|>": 0, "a": 1})

    # Non-standard names, resolved as all *.safetensors in sorted order.
    out.safetensors(f"{d}/controlnet/b-part.safetensors",
                    [("controlnet.1.weight", "BF16", [4, 4])], PT)
    out.safetensors(f"{d}/controlnet/a-part.safetensors",
                    [("controlnet.0.weight", "BF16", [4, 4])], PT)
    out.json(f"{d}/controlnet/config.json",
             {"_class_name": "FluxMultiControlNetModel"})


def gen_odd_models(out):
    out.bytes("models/pickle-only/pytorch_model.bin", fake_pickle())
    out.json("models/pickle-only/config.json", LLAMA_CONFIG)

    d = "models/diffusers-pickle"
    out.json(f"{d}/model_index.json", {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    out.bytes(f"{d}/unet/diffusion_pytorch_model.bin", fake_pickle())
    out.json(f"{d}/unet/config.json", {"_class_name": "UNet2DConditionModel"})
    write_vae(out, d)

    d = "models/diffusers-missing-folder"
    out.json(f"{d}/model_index.json", {
        "_class_name": "FluxPipeline", "_diffusers_version": "0.30.0",
        "transformer": ["diffusers", "X"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    write_vae(out, d)

    d = "models/diffusers-bad-index"
    out.json(f"{d}/model_index.json", [["vae", "diffusers", "AutoencoderKL"]])
    write_vae(out, d)


def gen_broken_indexes(out):
    """One directory per defect; everything else in it is valid."""
    s1, s2 = shard_name(1, 2), shard_name(2, 2)
    index = "model.safetensors.index.json"

    d = "models/index-missing-shard"        # s2 is listed but not on disk
    out.safetensors(f"{d}/{s1}", small("a", 2), PT)
    out.json(f"{d}/{index}", {"metadata": {"total_size": 24},
                              "weight_map": {"a0": s1, "a1": s1, "b0": s2}})

    write_sharded(out, "models/index-wrong-shard",   # "a" is stored in s2
                  [small("b", 2), [("a", "F32", [2])]],
                  weight_map={"a": s1, "b0": s1, "b1": s1})

    write_sharded(out, "models/index-extra-tensor",  # "extra" is not listed
                  [small("a", 2), [("b", "F32", [2]), ("extra", "F32", [2])]],
                  weight_map={"a0": s1, "a1": s1, "b": s2})

    write_sharded(out, "models/index-duplicate-tensor",  # "dup" in both
                  [[("a", "F32", [2]), ("dup", "F32", [2])],
                   [("b", "F32", [2]), ("dup", "F32", [2])]],
                  weight_map={"a": s1, "b": s2, "dup": s1})

    d = "models/index-bad-json"
    write_sharded(out, d, [small("a", 2), small("b", 2)])
    out.bytes(f"{d}/{index}",
              b'{"metadata": {"total_size": 32}, "weight_map": {"a0": "model-00001')

    d = "models/index-no-weight-map"
    write_sharded(out, d, [small("a", 2), small("b", 2)])
    out.json(f"{d}/{index}", {"metadata": {"total_size": 32}})

    only = shard_name(1, 1)                 # one entry points at a real file
    write_sharded(out, "models/index-escape", [small("a", 2)],  # outside
                  weight_map={"a0": only, "a1": only,
                              "model.norm.weight": "../plain/model.safetensors"})

    d = "models/index-bad-shard"            # s2's header length > file size
    write_sharded(out, d, [small("a", 2), small("b", 2)])
    content = out.path(f"{d}/{s2}").read_bytes()
    out.bytes(f"{d}/{s2}", struct.pack("<Q", len(content)) + content[8:])


def gen_models(out):
    gen_plain_models(out)
    gen_diffusers(out)
    gen_odd_models(out)
    gen_broken_indexes(out)


# --------------------------------------------------------------------------
# bad/
# --------------------------------------------------------------------------

def body(dtype='"F32"', shape="[2]", offsets="[0,8]", extra=""):
    """JSON text of one tensor entry; arguments are JSON text too."""
    return f'{{"dtype":{dtype},"shape":{shape},"data_offsets":{offsets}{extra}}}'


def member(name, value):
    """'"name":value' with name written into the JSON verbatim."""
    return f'"{name}":{value}'


def obj(*members):
    return "{" + ",".join(members) + "}"


X = member("x", body())                 # F32 [2] at [0,8]: 8 data bytes


def raw_name(name: bytes):
    """A header whose only tensor has a name given as raw bytes."""
    return b'{"' + name + b'":' + body().encode() + b"}"


@dataclass
class Bad:
    header: Union[str, bytes, None] = None
    data: int = 8                        # length of the data section
    tail: bytes = b""                    # bytes right after the JSON
    length: Union[int, Callable, None] = None   # see frame()
    raw: Optional[bytes] = None          # the whole file, verbatim


SHORT = "too short for the 8-byte header length"
LIMIT = f"exceeds the limit of {HEADER_LIMIT} bytes"
PAST_EOF = "runs past the end of the file"
START = "does not start with '{'"
UTF8 = "not valid UTF-8"
JSON = "not valid JSON"
PAD = "padding must be spaces"
DUP = "duplicate key"
RANGE = "integer out of range"
OVERFLOW = "overflows 64 bits"
OFFSETS = "data_offsets is not an array of two non-negative integers"
NOT_UINT = "is not a non-negative integer"
GAP = "leave a gap"
SIZE = "but the data section is"
META = "__metadata__ is not an object"
NOT_STR = "value is not a string"

# (file stem, expected error substring, how to build the file)
BAD_CASES = [
    # -- the 8-byte length prefix
    ("short-empty", SHORT, Bad(raw=b"")),
    ("short-5-bytes", SHORT, Bad(raw=b"\x10\x00\x00\x00\x00")),
    ("short-7-bytes", SHORT, Bad(raw=b"\x02\x00\x00\x00\x00\x00\x00")),
    ("header-len-over-limit", LIMIT, Bad(obj(X), length=HEADER_LIMIT + 1)),
    ("header-len-2pow63", LIMIT, Bad(obj(X), length=2**63)),
    ("header-len-u64-max", LIMIT, Bad(obj(X), length=U64_MAX)),
    ("header-len-past-eof", PAST_EOF, Bad(obj(X), length=1000)),
    ("header-len-past-eof-by-one", PAST_EOF, Bad(obj(X), length=lambda n: n + 8 + 1)),
    ("header-len-at-limit-past-eof", PAST_EOF, Bad(obj(X), length=HEADER_LIMIT)),
    # -- header start and encoding
    ("start-space", START, Bad(" " + obj(X))),
    ("start-array", START, Bad("[" + body() + "]")),
    ("start-utf8-bom", START, Bad(b"\xef\xbb\xbf" + obj(X).encode())),
    ("utf8-invalid-byte", UTF8, Bad(raw_name(b"x\xffy"))),
    ("utf8-overlong", UTF8, Bad(raw_name(b"x\xc0\xafy"))),
    ("utf8-surrogate", UTF8, Bad(raw_name(b"x\xed\xa0\x80y"))),
    ("utf8-truncated-sequence", UTF8, Bad(raw_name(b"x\xe4\xb8"))),
    # -- JSON syntax
    ("json-missing-brace", JSON, Bad("{" + X)),
    ("json-trailing-comma", JSON, Bad(obj(X)[:-1] + ",}")),
    ("json-single-quotes", JSON, Bad(obj(X).replace('"', "'"))),
    ("json-nan", JSON, Bad(obj(member("x", body(shape="[NaN]"))))),
    ("json-nul-escape", JSON, Bad(obj(member("a\\u0000b", body())))),
    ("json-raw-control-char", JSON, Bad(obj(member("a\tb", body())))),
    ("json-deep-nesting", "nests deeper than",
     Bad(obj(member("__metadata__", obj(member("k", "[" * 3000 + "]" * 3000))), X))),
    ("padding-newline", PAD, Bad(obj(X), tail=b"\n")),
    ("padding-nul", PAD, Bad(obj(X), tail=b"\0")),
    ("padding-letter", PAD, Bad(obj(X), tail=b"x")),
    ("duplicate-tensor", DUP, Bad(obj(X, X))),
    ("duplicate-field-dtype", DUP,
     Bad(obj(member("x", body(extra=',"dtype":"F32"'))))),
    ("duplicate-metadata-key", DUP,
     Bad(obj(member("__metadata__", '{"k":"1","k":"2"}'), X))),
    ("int-out-of-range-shape", RANGE,
     Bad(obj(member("x", body(shape="[99999999999999999999]"))))),
    ("int-out-of-range-offsets", RANGE,
     Bad(obj(member("x", body(offsets="[0,99999999999999999999]"))))),
    # -- tensor entries
    ("entry-not-object", "entry is not an object", Bad(obj(member("x", "[1,2]")))),
    ("missing-dtype", 'missing field "dtype"',
     Bad(obj(member("x", '{"shape":[2],"data_offsets":[0,8]}')))),
    ("missing-shape", 'missing field "shape"',
     Bad(obj(member("x", '{"dtype":"U8","data_offsets":[0,8]}')))),
    ("missing-data-offsets", 'missing field "data_offsets"',
     Bad(obj(member("x", '{"dtype":"F32","shape":[2]}')), data=0)),
    ("extra-field", 'unexpected field "foo"',
     Bad(obj(member("x", body(extra=',"foo":1'))))),
    ("dtype-not-string", "dtype is not a string", Bad(obj(member("x", body(dtype="7"))))),
    ("dtype-unknown", "unknown dtype", Bad(obj(member("x", body(dtype='"F128"'))))),
    ("dtype-lowercase", "unknown dtype", Bad(obj(member("x", body(dtype='"f32"'))))),
    ("shape-not-array", "shape is not an array", Bad(obj(member("x", body(shape='"3"'))))),
    ("shape-negative", NOT_UINT,
     Bad(obj(member("x", body(shape="[2,-1]", offsets="[0,0]"))), data=0)),
    ("shape-float", NOT_UINT, Bad(obj(member("x", body(shape="[2.0]"))))),
    ("shape-string", NOT_UINT, Bad(obj(member("x", body(shape='["2"]'))))),
    # -- size arithmetic
    ("shape-overflow-wrap-zero", OVERFLOW,
     Bad(obj(member("x", body(shape=f"[{2**32},{2**32},2]", offsets="[0,0]"))), data=0)),
    ("shape-overflow-wrap-2pow32", OVERFLOW,
     Bad(obj(member("x", body(dtype='"U8"', shape=f"[{2**32},{2**32 + 1}]",
                              offsets=f"[0,{2**32}]"))))),
    # 16777232 * 1099510579201 = 2**64 + 16: wraps to 16 one-byte elements.
    ("shape-overflow-wrap-small", OVERFLOW,
     Bad(obj(member("x", body(dtype='"U8"', shape="[16777232,1099510579201]",
                              offsets="[0,16]"))), data=16)),
    ("shape-bytes-overflow", OVERFLOW,
     Bad(obj(member("x", body(shape=f"[{2**62}]", offsets="[0,0]"))), data=0)),
    ("subbyte-f4-12-bits", "not a whole number of bytes",
     Bad(obj(member("x", body(dtype='"F4"', shape="[3]", offsets="[0,2]"))), data=2)),
    ("subbyte-f6-30-bits", "not a whole number of bytes",
     Bad(obj(member("x", body(dtype='"F6_E2M3"', shape="[5]", offsets="[0,4]"))), data=4)),
    # -- data_offsets
    ("offsets-not-array", OFFSETS, Bad(obj(member("x", body(offsets='"0-8"'))))),
    ("offsets-three", OFFSETS, Bad(obj(member("x", body(offsets="[0,8,8]"))))),
    ("offsets-negative", OFFSETS, Bad(obj(member("x", body(offsets="[-8,0]"))))),
    ("offsets-string", OFFSETS, Bad(obj(member("x", body(offsets='[0,"8"]'))))),
    ("offsets-begin-after-end", "begin after end",
     Bad(obj(member("x", body(offsets="[8,0]"))))),
    ("offsets-size-mismatch", "do not match shape",
     Bad(obj(member("x", body(offsets="[0,12]"))), data=12)),
    ("gap-at-start", GAP, Bad(obj(member("x", body(offsets="[8,16]"))), data=16)),
    ("gap-between", GAP, Bad(obj(member("a", body(offsets="[0,8]")),
                                 member("b", body(offsets="[12,20]"))), data=20)),
    ("overlap", "overlap", Bad(obj(member("a", body(offsets="[0,8]")),
                                   member("b", body(offsets="[4,12]"))), data=12)),
    ("data-trailing-bytes", SIZE, Bad(obj(X), data=11)),
    ("data-truncated", SIZE,
     Bad(obj(member("a", body()), member("b", body(shape="[4]", offsets="[8,24]"))),
         data=21)),
    # -- __metadata__
    ("metadata-array", META, Bad(obj(member("__metadata__", '["format","pt"]'), X))),
    ("metadata-string", META, Bad(obj(member("__metadata__", '"pt"'), X))),
    ("metadata-value-number", NOT_STR,
     Bad(obj(member("__metadata__", '{"format":"pt","n":1}'), X))),
    ("metadata-value-object", NOT_STR,
     Bad(obj(member("__metadata__", '{"format":{"a":"b"}}'), X))),
]


def render_bad(bad, rng):
    if bad.raw is not None:
        return bad.raw
    return frame(bad.header, rng.randbytes(bad.data), tail=bad.tail,
                 length=bad.length)


def gen_bad(out):
    expected = {}
    for stem, message, bad in BAD_CASES:
        rel = f"bad/{stem}.safetensors"
        assert rel not in expected, f"duplicate case {stem}"
        out.bytes(rel, render_bad(bad, out.rng(rel)))
        expected[f"{stem}.safetensors"] = message
    out.json("bad/expected.json", expected)


# --------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)

    args.outdir.mkdir(parents=True, exist_ok=True)
    for sub in OWNED_DIRS:
        shutil.rmtree(args.outdir / sub, ignore_errors=True)
    out = Output(args.outdir, args.seed)
    gen_good(out)
    gen_models(out)
    gen_bad(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
