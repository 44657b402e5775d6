#!/usr/bin/env python3
"""Write the seed programs of fuzz-peer (tests/fuzz/corpus/peer).

A program is a byte string of operations; fuzz-peer.c defines them.  An
operation byte is OP | slot << 4 | variant << 6, followed by its operands.
Run from anywhere: tests/fuzz/gen-peer-corpus.py [OUTDIR]
"""
import os
import sys

(CONNECT, HELLO, LOAD, CANCEL, RELEASE, ENTRY, QUERY, CLOSE, DRAIN, RUN, SLEEP,
 RAW, PIPELINE, CUT, AUDIT, LOAD_ALL) = range(16)

# Models (the low 3 bits of a model operand; bits 3-5 pick a component).
TINY, BIG, MULTI, PIPE, BAD, MISSING, ALIAS, OUTSIDE = range(8)
UNET, VAE, SCHEDULER, TEXT, NOPE = (PIPE | c << 3 for c in range(5))

# Load flags.
PREFETCH, PROGRESS, SHARD, REUSE = 1, 2, 4, 32
COMPACT = 64  # in the model byte: LoadRequest.compact_tensors
TARGET_HOST, TARGET_CUDA, TARGET_BOGUS = 1 << 3, 2 << 3, 3 << 3


def op(code, slot=0, variant=0, *args):
    return bytes([code | slot << 4 | variant << 6, *args])


def shard(world, rank, rules, uneven=False):
    return (world - 1) | rank << 2 | int(uneven) << 4 | rules << 5


def load(slot, model, flags=0, shard_byte=None):
    b = op(LOAD, slot, 0, model, flags)
    if flags & (SHARD | REUSE):
        b += bytes([shard_byte or 0])
    return b


def run(turns=32, drain=True):
    return op(RUN, 0, int(drain), turns - 1)


def settle(times=4):
    return (run() + op(SLEEP, 0, 1)) * times + run()


def hello(slot, variant=0):
    return op(CONNECT, slot) + op(HELLO, slot, variant)


SEEDS = {
    "hello-load-release": hello(0) + load(0, BIG) + settle() + op(RELEASE, 0, 0, 0x10) + run() + op(AUDIT),
    "pipeline-loads": hello(0) + op(PIPELINE, 0, 0, 3)
    + bytes([LOAD, TINY, 0, LOAD, MULTI, PREFETCH | PROGRESS, LOAD, VAE, PROGRESS, QUERY | 1 << 6, 0])
    + run(4) + op(CANCEL, 0, 0, 0x11) + settle(),
    "sharded": hello(0) + load(0, BIG, SHARD, shard(2, 1, 0)) + load(0, MULTI, SHARD, shard(3, 2, 4, True))
    + load(0, UNET, SHARD | TARGET_HOST, shard(4, 0, 5)) + settle() + op(QUERY, 0, 0, 0) + op(DRAIN),
    "compact": hello(0) + load(0, TINY | COMPACT) + load(0, MULTI | COMPACT, SHARD, shard(2, 1, 5))
    + load(0, MULTI | COMPACT, SHARD, shard(2, 0, 0)) + load(0, UNET | COMPACT, PREFETCH) + settle()
    + op(RELEASE, 0, 0, 0x10) + settle(1),
    "sharded-refused": hello(0) + load(0, BIG, SHARD, shard(3, 0, 0)) + load(0, TINY, SHARD, shard(2, 0, 3))
    + load(0, BIG, SHARD, shard(2, 3, 1)) + load(0, BIG, SHARD, shard(2, 1, 7)) + settle(2),
    "disconnect-mid-load": hello(0) + hello(1) + load(0, UNET, PROGRESS) + run(2, False) + op(CLOSE, 0)
    + load(1, UNET) + settle() + op(AUDIT),
    "cancel-reload": hello(0) + load(0, BIG, PROGRESS) + run(1) + op(CANCEL, 0, 0, 0x10) + load(0, BIG)
    + run(2) + op(CANCEL, 0, 0, 0x03) + settle(),
    "pin-evict": hello(0) + load(0, TINY) + settle(1) + op(ENTRY, 0, 1, TINY) + op(ENTRY, 0, 0, TINY)
    + op(ENTRY, 0, 2, TINY) + op(RELEASE, 0, 0, 0x10) + op(ENTRY, 0, 0, TINY) + op(ENTRY, 0, 1, MISSING)
    + settle(1),
    "garbage": op(CONNECT, 0) + op(RAW, 0, 0, 8) + b"\xff\xff\xff\x7f\x00\x01\x02\x03" + run(4)
    + hello(1) + op(CUT, 1, 0, 3) + bytes([QUERY | 1 << 6, 0]) + run(2) + op(RAW, 1, 0, 6)
    + b"\x02\x00\x00\x00\xc2\x02" + settle(1),
    "no-hello": op(CONNECT, 0) + load(0, BIG) + run(4) + op(CONNECT, 1) + op(HELLO, 1, 2) + load(1, TINY)
    + run(4) + op(CONNECT, 2) + op(HELLO, 2, 3) + op(HELLO, 2, 0) + op(HELLO, 2, 0) + settle(1),
    "load-all": hello(0) + op(CONNECT, 1, 1) + op(HELLO, 1) + op(LOAD_ALL, 0, 0, PROGRESS)
    + op(LOAD_ALL, 1, 0, PREFETCH) + run(8, False) + op(CLOSE, 0, 2) + settle(),
    "over-budget": hello(0) + load(0, BIG) + load(0, MULTI) + load(0, UNET) + settle() + load(0, ALIAS)
    + op(ENTRY, 0, 3, MULTI) + settle(1) + op(AUDIT),
    "queries": hello(0) + op(PIPELINE, 0, 0, 5)
    + bytes([QUERY, 0, QUERY | 1 << 6, 0, QUERY | 2 << 6, UNET, QUERY | 3 << 6, PIPE,
             QUERY | 3 << 6, UNET, QUERY | 2 << 6, BAD])
    + load(0, OUTSIDE) + load(0, PIPE | 1 << 3 | 2 << 3) + load(0, TINY, TARGET_CUDA)
    + load(0, TINY, TARGET_BOGUS) + load(0, BAD) + load(0, SCHEDULER) + settle(1),
    "half-close": hello(0) + load(0, MULTI) + load(0, TINY, REUSE, 0) + op(CLOSE, 0, 1) + settle()
    + hello(1) + load(1, VAE) + op(CLOSE, 1, 3) + settle(1),
    "many-peers": b"".join(hello(s, s & 1) + load(s, [BIG, UNET, MULTI, BIG][s], PROGRESS) for s in range(4))
    + run(3, False) + op(CLOSE, 1) + op(CLOSE, 3) + run(2) + op(RELEASE, 0, 0, 0x90) + settle()
    + op(RELEASE, 0, 0, 0x10) + op(RELEASE, 0, 0, 0x10) + op(CONNECT, 1) + settle(1),
}


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                             "corpus", "peer")
    os.makedirs(out, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
