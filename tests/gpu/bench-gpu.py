#!/usr/bin/env python3
"""Device-check benchmarks (tests/gpu/device-check runs this): cold disk to
GPU for weightd, safetensors.torch.load_file(device="cuda:0") and fio on the
same files; host tier to GPU against a pinned cudaMemcpy of the same size;
attach time of a second process to the resident component.  Prints a
Markdown table and the ratios against the targets.
Usage: bench-gpu.py BUILD MODEL_DIR"""
import glob
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "integration"))
import wdwire  # noqa: E402
import importlib.util  # noqa: E402

spec = importlib.util.spec_from_file_location("gpu_suite", HERE / "gpu-suite.py")
gs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gs)

build = pathlib.Path(sys.argv[1]).resolve()
model = pathlib.Path(sys.argv[2]).resolve()
files = sorted(glob.glob(str(model / "*.safetensors")))
total = sum(os.path.getsize(f) for f in files)
rows = []


def drop_caches():
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as e:
        print(f"cannot drop the page cache: {e} (cold numbers are warm)")
        return False


def gbps(nbytes, secs):
    return nbytes / secs / 1e9 if secs > 0 else 0.0


import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

# fio
fio = shutil.which("fio")
fio_gbps = None
if fio:
    drop_caches()
    t0 = time.perf_counter()
    r = subprocess.run([fio, "--name=cold", "--rw=read", "--bs=16M", "--direct=1", "--ioengine=io_uring",
                        "--iodepth=32", "--numjobs=1", "--group_reporting", "--filename=" + ":".join(files)],
                       capture_output=True)
    secs = time.perf_counter() - t0
    fio_gbps = gbps(total, secs) if r.returncode == 0 else None
    rows.append(("fio (O_DIRECT, io_uring, qd 32)", secs, fio_gbps))
else:
    print("fio: not installed on this machine, no fio row")

# safetensors cold
drop_caches()
torch.cuda.synchronize()
t0 = time.perf_counter()
for f in files:
    d = load_file(f, device="cuda:0")
    del d
torch.cuda.synchronize()
secs = time.perf_counter() - t0
st_gbps = gbps(total, secs)
rows.append(("safetensors.torch.load_file(device='cuda:0')", secs, st_gbps))
torch.cuda.empty_cache()

# pinned ceiling
n = min(total, 16 << 30)
host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
dev = torch.empty(n, dtype=torch.uint8, device="cuda:0")
dev.copy_(host, non_blocking=True)  # warm-up
torch.cuda.synchronize()
t0 = time.perf_counter()
dev.copy_(host, non_blocking=True)
torch.cuda.synchronize()
secs = time.perf_counter() - t0
ceiling = gbps(n, secs)
rows.append((f"pinned cudaMemcpy H2D, {n >> 20} MiB (ceiling)", secs, ceiling))
del host, dev
torch.cuda.empty_cache()

# weightd cold to cuda:0, then host tier to GPU, then attach
work = pathlib.Path(tempfile.mkdtemp(prefix="wd-bench-"))
sock = str(work / "weightd.sock")
drop_caches()
p, c, st = gs.start(build, model.parent, sock, "keep_host = yes\n")
wd_cold = host_gbps = attach_ms = None
if st["gpu"] != "ok":
    print(f"weightd has no GPU tier: {st['gpu']}")
else:
    t0 = time.perf_counter()
    env = c.request(wdwire.PREFETCH, wdwire.load_body(str(model), target="cuda:0"))
    secs = time.perf_counter() - t0
    print("weightd cold:", env.code, env.message)
    if env.code == "OK":
        wd_cold = gbps(total, secs)
        rows.append(("weightd cold disk -> cuda:0", secs, wd_cold))
    cuda = gs.Cuda()
    t0 = time.perf_counter()
    c2 = wdwire.connect(sock)
    env = c2.request(wdwire.LOAD, wdwire.load_body(str(model), target="cuda:0"))
    if env.code == "OK":
        lr = env.reply.msg(11)
        fd = c2.fds.pop(0)
        cuda.import_slab(fd, lr.msgs(4)[0].int(3))
        attach_ms = (time.perf_counter() - t0) * 1000
        os.close(fd)
        rows.append((f"attach of a second process ({total >> 20} MiB resident)", attach_ms / 1000, None))
    p.terminate()
    p.wait()
    # Host tier to GPU: a fresh daemon, the host tier filled first.
    os.unlink(sock) if os.path.exists(sock) else None
    p, c, st = gs.start(build, model.parent, sock, "keep_host = yes\n")
    env = c.request(wdwire.PREFETCH, wdwire.load_body(str(model)))
    t0 = time.perf_counter()
    env = c.request(wdwire.PREFETCH, wdwire.load_body(str(model), target="cuda:0"))
    secs = time.perf_counter() - t0
    print("weightd host tier -> cuda:0:", env.code, env.message)
    if env.code == "OK":
        host_gbps = gbps(total, secs)
        rows.append(("weightd host tier -> cuda:0 (includes page-locking the host slabs)", secs, host_gbps))
    p.terminate()
    p.wait()

print()
print(f"model: {len(files)} files, {total / 2**30:.2f} GiB")
print()
print("| what | seconds | GB/s |")
print("|---|---|---|")
for what, secs, rate in rows:
    print(f"| {what} | {secs:.3f} | {'' if rate is None else f'{rate:.2f}'} |")
print()
bound = min(x for x in (fio_gbps, ceiling) if x) if (fio_gbps or ceiling) else None
if host_gbps:
    print(f"host tier to GPU: {host_gbps / ceiling:.2f} of the pinned ceiling (target 0.90)")
if wd_cold and bound:
    print(f"cold: {wd_cold / bound:.2f} of min(fio, ceiling) (target 0.90), {wd_cold / st_gbps:.2f}x safetensors (target 2x)")
if attach_ms is not None:
    print(f"attach: {attach_ms:.2f} ms (target < 10 ms)")
