#!/usr/bin/env python3
"""The GPU lane on a real GPU: two daemons, two NCCL ranks on one device.

Two weightd nodes on this machine (127.0.0.1, two ports, distinct
NCCL_HOSTID, NCCL_MULTI_RANK_GPU_ENABLE=1) prefetch a generated model to
cuda:0 with `weightctl prefetch --cluster --device cuda:0`: once with
[cluster] gpu_transport = nccl (each node reads half, the halves cross
GPU to GPU through ncclBroadcast) and once with host (host to host, then
each node copies to the GPU), on copies of the same files.  Prints NCCL's
version, the bytes over the lane, the times, the bus bandwidth the
nccl-tests way (broadcast: busbw = algbw = bytes / time), and whether every
tensor on both daemons' devices equals safetensors.torch.load_file(...,
device="cuda:0").

Exits 77 (skipped) with the reason without a GPU, or where the NCCL the
daemon loads is older than 2.30 (two ranks on one GPU need it).
Usage: gpu-lane.py BUILD_DIR
"""
import ctypes
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("gpu_suite", HERE / "gpu-suite.py")
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)
wdwire = suite.wdwire


def nccl_version():
    lib = os.environ.get("WEIGHTD_NCCL_LIBRARY") or "libnccl.so.2"
    try:
        nccl = ctypes.CDLL(lib)
    except OSError as e:
        suite.skip(f"no NCCL ({lib}): {e}")
    v = ctypes.c_int()
    nccl.ncclGetVersion(ctypes.byref(v))
    return v.value


def node_conf(work, name, port, other, root, transport):
    d = work / name
    d.mkdir(exist_ok=True)
    sock = d / "weightd.sock"
    (d / "weightd.conf").write_text(
        f"[daemon]\nsocket = {sock}\nmodel_roots = {root}\nlog_level = debug\n"
        "[memory]\nhost_budget = 40%\n[io]\nchunk_size = 64M\n"
        f"[cluster]\nnode = {name}\nnodes = {name}=127.0.0.1:{port}, {other}\n"
        f"secret_file = {work / 'secret'}\ngpu_transport = {transport}\ndeadline = 20s\n")
    return d, sock


def ctl(build, sock, *args):
    r = subprocess.run([str(build / "client" / "weightctl" / "weightctl"), "--socket", str(sock), *args],
                       capture_output=True, text=True, timeout=300)
    return r


def main():
    build = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "build").resolve()
    cuda = suite.Cuda()
    try:
        import torch
        from safetensors.torch import load_file, save_file
    except ImportError as e:
        suite.skip(f"PyTorch or safetensors missing: {e}")
    version = nccl_version()
    print(f"NCCL {version // 10000}.{version // 100 % 100}.{version % 100}")
    if version < 23000:
        suite.skip("two NCCL ranks on one GPU need NCCL 2.30 or later (NCCL_MULTI_RANK_GPU_ENABLE)")

    work = pathlib.Path(tempfile.mkdtemp(prefix="wd-lane-"))
    (work / "secret").write_text("a secret of the two nodes of this check\n")
    os.chmod(work / "secret", 0o600)
    root = work / "models"
    for tag in ("nccl", "host"):
        (root / tag).mkdir(parents=True)
    g = torch.Generator().manual_seed(7)
    for f in range(4):
        t = {f"f{f}.layer.{i}": torch.randn(4096, 8192, generator=g, dtype=torch.float32).to(torch.bfloat16)
             for i in range(4)}
        save_file(t, str(root / "nccl" / f"model-{f}.safetensors"), {"format": "pt"})
        shutil.copy(root / "nccl" / f"model-{f}.safetensors", root / "host" / f"model-{f}.safetensors")
    total = sum(p.stat().st_size for p in (root / "nccl").glob("*.safetensors"))
    failures, times = [], {}
    for transport in ("nccl", "host"):
        ports = (7471, 7472) if transport == "nccl" else (7473, 7474)
        (work / transport).mkdir()
        da, sa = node_conf(work / transport, "a", ports[0], f"b=127.0.0.1:{ports[1]}", root, transport)
        db, sb = node_conf(work / transport, "b", ports[1], f"a=127.0.0.1:{ports[0]}", root, transport)
        procs = []
        for d, host_id in ((da, "weightd-a"), (db, "weightd-b")):
            env = {**os.environ, "NCCL_HOSTID": host_id, "NCCL_MULTI_RANK_GPU_ENABLE": "1"}
            log = open(d / "weightd.log", "ab")
            procs.append(subprocess.Popen([str(build / "daemon" / "weightd"), "--config", str(d / "weightd.conf")],
                                          stdout=log, stderr=log, env=env))
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                r = ctl(build, sa, "cluster", "--json")
                if r.returncode == 0 and all(n["state"] in ("self", "up") for n in json.loads(r.stdout)["nodes"]):
                    break
                time.sleep(0.2)
            t0 = time.perf_counter()
            r = ctl(build, sa, "prefetch", str(root / transport), "--cluster", "--device", "cuda:0", "--json")
            times[transport] = time.perf_counter() - t0
            print(f"{transport}: prefetch exit {r.returncode} in {times[transport]:.2f} s: {r.stdout.strip()[:400]}")
            if r.returncode != 0:
                failures.append(f"{transport}: prefetch: {r.stderr.strip()}")
            views = {n: json.loads(ctl(build, s, "cluster", "--json").stdout) for n, s in (("a", sa), ("b", sb))}
            for n, v in views.items():
                print(f"{transport}: node {n}: lane {v['gpu_lane']!r}, {v['lane_sent_bytes']} B sent and "
                      f"{v['lane_received_bytes']} B received over it")
            lane = sum(v["lane_received_bytes"] for v in views.values())
            if transport == "nccl":
                if lane != total:
                    failures.append(f"nccl: {lane} bytes over the lane, not the {total} of the files")
                algbw = lane / times[transport] / 1e9
                print(f"nccl: {lane} B broadcast in {times[transport]:.2f} s (the whole prefetch, reads included): "
                      f"algbw = busbw = {algbw:.2f} GB/s")
            ref = {}
            for f in sorted((root / transport).glob("*.safetensors")):
                ref.update(load_file(str(f), device="cuda:0"))
            for n, s in (("a", sa), ("b", sb)):
                c = wdwire.connect(str(s))
                env = suite.load(c, str(root / transport))
                ok = env.code == "OK" and env.reply.msg(11).int(7) == 1  # resident: the plan's copy
                if ok:
                    lr = env.reply.msg(11)
                    fd = c.fds.pop(0)
                    ptr = cuda.import_slab(fd, lr.msgs(4)[0].int(3))
                    os.close(fd)
                    names = [t.str(1) for t in lr.msgs(5)]
                    ok = sorted(names) == sorted(ref)
                    for t in lr.msgs(5):
                        want = ref[t.str(1)].contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()
                        ok = ok and cuda.read(ptr + t.int(5), t.int(6)) == want
                print(f"{transport}: node {n}: device bytes match safetensors: {'yes' if ok else 'NO'}")
                if not ok:
                    failures.append(f"{transport}: node {n}: device bytes differ")
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=30)
    if "nccl" in times and "host" in times:
        print(f"nccl / host time: {times['nccl'] / times['host']:.2f}")
    if failures:
        print("FAILED: " + "; ".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
