#!/usr/bin/env python3
"""The Python package's device loads, on the real weightd with its GPU tier
on device 0 (gpu-suite.py runs this; it can also run alone).

Exits 77 (skipped) with the reason where torch sees no CUDA device or the
daemon has no GPU tier, as gpu-suite.py does.  Otherwise, on a generated
two-file model (BF16, F16, F32, F8_E4M3, I64, a scalar, an empty tensor):
  - Client.load(model, device="cuda:0", framework="pt"): every tensor is a
    cuda:0 tensor whose dtype, shape and bytes equal
    safetensors.torch.load_file(file, device="cuda:0"), kernels read it,
    and torch.device("cuda:0") and "cuda:GPU-<uuid>" name the same device;
  - sharded device loads (world 2, and 3 uneven; dims 0 and 1): every
    tensor of every rank equals the library's tensor narrowed (torch
    slicing), and the ranks' parts put together are the tensor;
  - prefetch(device=...) then load finds the entry resident;
  - tensors outlive their lease (the daemon's lease count);
  - safe_open(file, device="cuda:0") and weights_iterator(files,
    to_cpu=False) serve cuda:0 tensors equal to the library's;
  - numpy with a device is INVALID_ARGUMENT.
--host runs the same checks on the host tier (device "cpu"): a check of
this script where there is no GPU.
Usage: gpu-python.py BUILD_DIR [--host]
"""
import fnmatch
import gc
import importlib.util
import json
import os
import pathlib
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
SKIP = 77


def skip(reason):
    print(f"SKIP: {reason}")
    sys.exit(SKIP)


def load_suite():
    """gpu-suite.py's daemon start (its main() runs only as a script)."""
    spec = importlib.util.spec_from_file_location("wd_gpu_suite", HERE / "gpu-suite.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def setup(argv):
    """(build dir, host) from BUILD_DIR [--host]; the Python package found
    in the tree, on that build's library, talking to no daemon but the one
    the script starts.  Shared with gpu-diffusers.py."""
    args = [a for a in argv if a != "--host"]
    host = "--host" in argv
    build = pathlib.Path(args[0] if args else "build").resolve()
    lib = build / "client" / "lib" / "libweightd-client.so.0"
    if not lib.exists():
        skip(f"not built: {lib}")
    os.environ["WEIGHTD_CLIENT_LIB"] = str(lib)
    os.environ["WEIGHTD_SOCKET"] = "/nonexistent/weightd-gpu-tests.sock"  # only the daemon started here
    sys.path.insert(0, str(REPO / "client" / "python"))
    return build, host


def main():
    build, host = setup(sys.argv[1:])
    try:
        import torch
        from safetensors.torch import load_file, save_file
    except ImportError as e:
        skip(f"PyTorch or safetensors missing: {e}")
    if not host and not torch.cuda.is_available():
        skip("torch sees no CUDA device")
    suite = load_suite()
    import weightd

    dev = "cpu" if host else "cuda:0"
    raw_type = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

    def raw(t):
        return t.view(raw_type[t.dtype.itemsize])

    work = pathlib.Path(tempfile.mkdtemp(prefix="wd-gpu-py-"))
    root = work / "models"
    root.mkdir()
    model = root / "m"
    model.mkdir()
    g = torch.Generator().manual_seed(7)
    files = {
        "model-00001-of-00002.safetensors": {
            "layer.0.weight": torch.randn(96, 33, generator=g).to(torch.bfloat16),
            "layer.0.proj": torch.randn(7, 64, generator=g).to(torch.float16),
            "layer.0.bias": torch.randn(96, generator=g),
            "scalar": torch.tensor(3.0),
        },
        "model-00002-of-00002.safetensors": {
            "layer.1.weight": torch.randn(90, 5, 3, generator=g),
            "layer.1.proj": (torch.randn(6, 48, generator=g) * 8).to(torch.float8_e4m3fn),
            "layer.1.ids": torch.randint(-1 << 40, 1 << 40, (33,), generator=g, dtype=torch.int64),
            "empty.weight": torch.zeros(0, 4, dtype=torch.float16),
        },
    }
    weight_map = {}
    for fname, tensors in files.items():
        save_file(tensors, str(model / fname), {"format": "pt"})
        weight_map.update({n: fname for n in tensors})
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    paths = [model / f for f in files]
    refs = {}
    for p in paths:
        refs.update(load_file(str(p), device=dev))

    sock = str(work / "weightd.sock")
    p, _conn, st = suite.start(build, root, sock)
    if not host and st["gpu"] != "ok":
        p.terminate()
        p.wait()
        skip(f"the daemon has no GPU tier: {st['gpu']}")
    failures = []

    def check(name, cond, detail=""):
        print(("ok " if cond else "FAIL ") + name + (f": {detail}" if detail and not cond else ""))
        if not cond:
            failures.append(name)

    def same(got, want):
        """(equal?, why not): device, dtype, shape and bytes."""
        if got.device != want.device:
            return False, f"device {got.device} != {want.device}"
        if got.dtype != want.dtype or got.shape != want.shape:
            return False, f"{got.dtype} {tuple(got.shape)} != {want.dtype} {tuple(want.shape)}"
        if not torch.equal(raw(got), raw(want)):
            return False, "bytes differ"
        return True, ""

    def compare_all(get, label, shard=None):
        """Every tensor from get(name) against the library's (narrowed for a
        shard: (rank, world, rules, uneven))."""
        bad = []
        for name, ref in refs.items():
            want = ref
            if shard is not None:
                rank, world, rules, _uneven = shard
                dim = next((d for pat, d in rules if fnmatch.fnmatchcase(name, pat)), None)
                if dim is not None:
                    base, extra = divmod(ref.shape[dim], world)
                    start, part = rank * base + min(rank, extra), base + (1 if rank < extra else 0)
                    want = ref.narrow(dim, start, part)
            ok, why = same(get(name), want)
            if not ok:
                bad.append(f"{name}: {why}")
        check(label, not bad, "; ".join(bad))

    def leases():
        return client.status()["leases"]

    client = weightd.connect(sock)
    try:
        # Whole tensors, to the device.
        with client.load(model, device=dev, framework="pt") as lease:
            check("the lease is on the device", lease.device == dev, lease.device)
            compare_all(lambda n: lease[n], f"load(device={dev!r}): every tensor equals load_file(device={dev!r})")
            t = lease["layer.1.weight"]
            check("a kernel reads the leased memory",
                  torch.allclose((t * 2).sum().cpu(), (refs["layer.1.weight"] * 2).sum().cpu()))
            del t
        if not host:
            with client.load(model, device=torch.device("cuda:0"), framework="pt") as lease:
                compare_all(lambda n: lease[n], "load(device=torch.device('cuda:0'))")
            devices = client.status()["devices"]
            check("the daemon lists its device", bool(devices), str(devices))
            for d in devices:
                target = f"cuda:{d['uuid']}"
                with client.load(model, device=target, framework="pt") as lease:
                    bad = [n for n, ref in refs.items()
                           if lease[n].device.type != "cuda" or not torch.equal(raw(lease[n]).cpu(), raw(ref).cpu())]
                    check(f"load(device={target!r}) on {lease.device}", not bad, str(bad))

        # Sharded loads to the device.
        rules = [("*.weight", 0), ("*.proj", 1)]
        for world, uneven in ((2, False), (3, True)):
            parts = {n: [] for n in refs}
            for rank in range(world):
                shard = weightd.Shard(rank, world, rules, uneven=uneven)
                try:
                    with client.load(model, device=dev, framework="pt", shard=shard) as lease:
                        compare_all(lambda n: lease[n], f"sharded {rank}/{world} on {dev}: every tensor equals "
                                    "the library's narrowed", (rank, world, rules, uneven))
                        for n in refs:
                            parts[n].append(lease[n].clone())
                        ptrs = {lease[n].untyped_storage().data_ptr() for n in refs if lease[n].numel()}
                        check(f"sharded {rank}/{world}: the files' tensors share the derived slab's mapping",
                              len(ptrs) == 1, str(ptrs))
                        info = lease.shard_info("layer.0.proj")
                        check(f"shard_info {rank}/{world}", info is not None and info[0] == 1
                              and info[2] == (7, 64), str(info))
                except weightd.Error as e:
                    check(f"sharded {rank}/{world} on {dev}", False, str(e))
            bad = []
            for n, ref in refs.items():
                dim = next((d for pat, d in rules if fnmatch.fnmatchcase(n, pat)), None)
                if dim is None or not parts[n] or ref.numel() == 0:
                    continue
                whole = torch.cat([raw(x) for x in parts[n]], dim=dim)
                if not torch.equal(whole, raw(ref)):
                    bad.append(n)
            check(f"world {world}: the ranks' parts make the tensors", not bad, str(bad))

        # Prefetch to the device, then the load finds it.
        shard = weightd.Shard(1, 2, rules)
        out = client.prefetch(model, device=dev, shard=shard)
        again = client.prefetch(model, device=dev, shard=shard)
        check("prefetch(device, shard) again is was_resident", again[""]["was_resident"] is True, str((out, again)))
        read = client.status()["storage_read_bytes"]
        with client.load(model, device=dev, framework="pt", shard=shard) as lease:
            compare_all(lambda n: lease[n], "load after prefetch", (1, 2, rules, False))
        check("load after prefetch reads nothing", client.status()["storage_read_bytes"] == read)

        # Tensors outlive their lease.
        gc.collect()
        before = leases()
        lease = client.load(model, device=dev, framework="pt")
        t = lease["layer.0.weight"]
        lease.release()
        del lease
        gc.collect()
        held = leases()
        ok, why = same(t, refs["layer.0.weight"])
        check("a tensor outlives its released lease", held == before + 1 and ok, f"{before} {held} {why}")
        del t
        gc.collect()
        deadline = time.monotonic() + 10
        while leases() != before and time.monotonic() < deadline:
            time.sleep(0.05)
        check("the lease ends with its last tensor", leases() == before)

        # safe_open and weights_iterator.
        bad = []
        for path in paths:
            with weightd.safe_open(path, framework="pt", device=dev, socket=sock) as f:
                want = load_file(str(path), device=dev)
                if f.keys() != sorted(want):
                    bad.append(f"{path.name}: keys")
                for n in f.keys():
                    ok, why = same(f.get_tensor(n), want[n])
                    if not ok:
                        bad.append(f"{n}: {why}")
        check(f"safe_open(device={dev!r}) equals load_file", not bad, "; ".join(bad))
        if not host:
            torch.cuda.set_device(0)
        got = dict(weightd.weights_iterator(paths, to_cpu=host, socket=sock))
        bad = [n for n in refs if n not in got or not same(got[n], refs[n])[0]]
        check("weights_iterator(to_cpu=False) serves the device's tensors" if not host else "weights_iterator",
              not bad and len(got) == len(refs), str(bad))
        del got

        if not host:
            try:
                client.load(model, device=dev)
                check("numpy with a device is INVALID_ARGUMENT", False, "it loaded")
            except weightd.InvalidArgument:
                check("numpy with a device is INVALID_ARGUMENT", True)
    finally:
        client.close()
        p.terminate()
        p.wait()

    print(f"{len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
