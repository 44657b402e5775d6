#!/usr/bin/env python3
"""The GPU suite: the real weightd with its GPU tier on device 0.

Exits 77 (skipped) with the reason where this machine has no usable CUDA
device or the daemon found none.  Otherwise, on a generated model:
  - a device Load to cuda:0 succeeds; its slab is imported in this process
    through the driver (ctypes over libcuda.so.1: cuMemImportFromShareableHandle,
    cuMemAddressReserve, cuMemMap, cuMemSetAccess) and every tensor's bytes
    equal safetensors.torch.load_file(file, device="cuda:0");
  - a second connection attaches to the resident component (was_resident)
    and reads the same bytes;
  - SIGKILL of a worker holding a device lease ends that lease;
  - a worker keeps valid memory after the daemon is killed and restarted;
  - a device budget smaller than the component refuses with RESOURCE_EXHAUSTED;
  - the Python package's device loads, whole and sharded (gpu-python.py);
  - weightd.diffusers pipelines on the GPU tier (gpu-diffusers.py).
Usage: gpu-suite.py BUILD_DIR
"""
import ctypes
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "integration"))
import wdwire  # noqa: E402

SKIP = 77


def skip(reason):
    print(f"SKIP: {reason}")
    sys.exit(SKIP)


class Cuda:
    """The few driver calls the checks need, through ctypes."""

    def __init__(self):
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            skip(f"no CUDA driver: {e}")
        self.check(self.lib.cuInit(0), "cuInit")
        n = ctypes.c_int()
        self.check(self.lib.cuDeviceGetCount(ctypes.byref(n)), "cuDeviceGetCount")
        if n.value == 0:
            skip("no CUDA device")
        self.ctx = ctypes.c_void_p()
        self.check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), 0), "cuDevicePrimaryCtxRetain")
        self.check(self.lib.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")

    def check(self, r, what):
        if r != 0:
            raise RuntimeError(f"{what}: CUresult {r}")

    def import_slab(self, fd, size):
        handle = ctypes.c_ulonglong()
        self.check(self.lib.cuMemImportFromShareableHandle(ctypes.byref(handle), ctypes.c_void_p(fd), 1),
                   "cuMemImportFromShareableHandle")
        ptr = ctypes.c_ulonglong()
        self.check(self.lib.cuMemAddressReserve(ctypes.byref(ptr), ctypes.c_size_t(size), ctypes.c_size_t(0),
                                                ctypes.c_ulonglong(0), ctypes.c_ulonglong(0)), "cuMemAddressReserve")
        self.check(self.lib.cuMemMap(ptr, ctypes.c_size_t(size), ctypes.c_size_t(0), handle, ctypes.c_ulonglong(0)),
                   "cuMemMap")
        # CUmemAccessDesc: {location {type=1 device, id=0}, flags=3 read/write}
        desc = (ctypes.c_int * 3)(1, 0, 3)
        self.check(self.lib.cuMemSetAccess(ptr, ctypes.c_size_t(size), desc, ctypes.c_size_t(1)), "cuMemSetAccess")
        self.lib.cuMemRelease(handle)
        return ptr.value

    def read(self, ptr, n):
        buf = ctypes.create_string_buffer(n)
        self.check(self.lib.cuMemcpyDtoH_v2(buf, ctypes.c_ulonglong(ptr), ctypes.c_size_t(n)), "cuMemcpyDtoH")
        return buf.raw


def start(build, root, sock, extra=""):
    conf = pathlib.Path(root).parent / "weightd.conf"
    conf.write_text(f"[daemon]\nsocket = {sock}\nmodel_roots = {root}\nlog_level = debug\n"
                    f"[memory]\nhost_budget = 50%\n[gpu]\n{extra}")
    log = open(pathlib.Path(root).parent / "weightd.log", "ab")
    p = subprocess.Popen([str(build / "daemon" / "weightd"), "--config", str(conf)], stdout=log, stderr=log)
    for _ in range(300):
        if os.path.exists(sock):
            try:
                c = wdwire.connect(sock)
                for _ in range(600):
                    st = c.status()
                    if not st["gpu"].startswith("starting"):
                        return p, c, st
                    time.sleep(0.05)
            except OSError:
                pass
        time.sleep(0.05)
    raise RuntimeError("weightd did not start")


def load(c, model, target="cuda:0"):
    env = c.request(wdwire.LOAD, wdwire.load_body(model, target=target))
    return env


def main():
    build = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "build").resolve()
    cuda = Cuda()
    try:
        import torch
        from safetensors.torch import load_file
    except ImportError as e:
        skip(f"PyTorch or safetensors missing: {e}")
    if not torch.cuda.is_available():
        skip("torch sees no CUDA device")

    work = pathlib.Path(tempfile.mkdtemp(prefix="wd-gpu-"))
    root = work / "models"
    root.mkdir()
    model = root / "m.safetensors"
    tensors = {f"layer.{i}.weight": torch.randn(257, 129 + i, dtype=torch.bfloat16) for i in range(16)}
    tensors["scalar"] = torch.tensor(3.0)
    from safetensors.torch import save_file
    save_file(tensors, str(model), {"format": "pt"})
    sock = str(work / "weightd.sock")
    failures = []

    p, c, st = start(build, root, sock)
    if st["gpu"] != "ok":
        p.terminate()
        skip(f"the daemon has no GPU tier: {st['gpu']}")

    def check(name, cond, detail=""):
        print(("ok " if cond else "FAIL ") + name + (f": {detail}" if detail and not cond else ""))
        if not cond:
            failures.append(name)

    ref = load_file(str(model), device="cuda:0")

    def compare(env, conn, label):
        lr = env.reply.msg(11)
        slab = lr.msgs(4)[0]
        fd = conn.fds.pop(0)
        ptr = cuda.import_slab(fd, slab.int(3))
        os.close(fd)
        ok = True
        for t in lr.msgs(5):
            name, off, n = t.str(1), t.int(5), t.int(6)
            want = ref[name].contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes() if n else b""
            got = cuda.read(ptr + off, n) if n else b""
            ok = ok and got == want and off % 256 == 0
        check(f"{label}: every tensor equals safetensors.torch.load_file(device='cuda:0')", ok)
        return ptr

    env = load(c, str(model))
    check("device Load to cuda:0", env.code == "OK", env.message)
    if env.code == "OK":
        compare(env, c, "first load")
        c2 = wdwire.connect(sock)
        t0 = time.perf_counter()
        env2 = load(c2, str(model))
        dt = (time.perf_counter() - t0) * 1000
        check("second process attaches to the resident component", env2.code == "OK" and env2.reply.msg(11).int(7) == 1,
              env2.message)
        print(f"attach: {dt:.2f} ms")
        if env2.code == "OK":
            compare(env2, c2, "attached")
        used = c.status()["devices"][0]["used_bytes"]
        check("Status counts the device slab", used > 0)
        ls = c.request(wdwire.LIST)
        tiers = [e.str(3) for e in ls.reply.msg(12).msgs(1)]
        check("List shows the cuda:0 tier", "cuda:0" in tiers, str(tiers))

    # SIGKILL of a worker ends its lease.
    code = (f"import sys; sys.path.insert(0, {str(HERE.parent / 'integration')!r}); import wdwire, time\n"
            f"c = wdwire.connect({sock!r}); e = c.request(wdwire.LOAD, wdwire.load_body({str(model)!r}, target='cuda:0'))\n"
            "print(e.code, flush=True); time.sleep(60)\n")
    w = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    line = w.stdout.readline().decode().strip()
    before = c.status()["leases"]
    w.send_signal(signal.SIGKILL)
    w.wait()
    time.sleep(0.5)
    after = c.status()["leases"]
    check("SIGKILL of a worker ends its device lease", line == "OK" and after == before - 1, f"{line} {before} {after}")

    # A worker keeps valid memory after the daemon is killed and restarted.
    env = load(c, str(model))
    if env.code == "OK":
        lr = env.reply.msg(11)
        fd = c.fds.pop(0)
        ptr = cuda.import_slab(fd, lr.msgs(4)[0].int(3))
        os.close(fd)
        t = lr.msgs(5)[0]
        p.kill()
        p.wait()
        p, c, st = start(build, root, sock)
        want = ref[t.str(1)].contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()
        check("memory stays valid after the daemon is killed and restarted", cuda.read(ptr + t.int(5), t.int(6)) == want)
    p.terminate()
    p.wait()

    # The device budget refuses what cannot fit.
    os.unlink(sock) if os.path.exists(sock) else None
    p, c, st = start(build, root, sock, "budget = 4K\n")
    env = load(c, str(model))
    check("a device budget too small refuses with RESOURCE_EXHAUSTED", env.code == "RESOURCE_EXHAUSTED", env.message)
    p.terminate()
    p.wait()

    # The Python package's device loads (gpu-python.py, with a daemon of its own).
    r = subprocess.run([sys.executable, str(HERE / "gpu-python.py"), str(build)], timeout=240)
    check("the Python package's device loads (gpu-python.py)", r.returncode in (0, SKIP), f"exit {r.returncode}")
    # weightd.diffusers with device="cuda:0" (gpu-diffusers.py; skips without diffusers).
    r = subprocess.run([sys.executable, str(HERE / "gpu-diffusers.py"), str(build)], timeout=240)
    check("weightd.diffusers on the GPU tier (gpu-diffusers.py)", r.returncode in (0, SKIP), f"exit {r.returncode}")

    print(f"{len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
