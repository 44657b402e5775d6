#!/usr/bin/env python3
"""weightd.diffusers on the GPU tier: a tiny Wan pipeline (tests/python-client/
tiny_diffusers.py) loaded with load_pipeline(..., device="cuda:0") against
WanPipeline.from_pretrained(...).to("cuda:0") (gpu-suite.py runs this; it
can also run alone).

Exits 77 (skipped) with the reason where torch, diffusers, transformers or
accelerate is missing, torch sees no CUDA device, or the daemon has no GPU
tier.  Otherwise:
  - every parameter and persistent buffer of every torch component is a
    cuda:0 tensor at the address of the lease's tensor of that name (no
    copy), and its bytes equal from_pretrained's;
  - the module's own buffers (the rotary tables) are on cuda:0;
  - the frames (latents drawn on the host from one seed) are
    bit-identical to from_pretrained's on cuda:0;
  - the daemon's leases end when the pipeline is gone.
--host runs the same checks on the host tier (device "cpu"): a check of
this script where there is no GPU.
Usage: gpu-diffusers.py BUILD_DIR [--host]
"""
import gc
import importlib.util
import os
import pathlib
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _gpu_python():
    """gpu-python.py's set-up and helpers (its main() runs only as a script)."""
    spec = importlib.util.spec_from_file_location("wd_gpu_python", HERE / "gpu-python.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


common = _gpu_python()
skip, load_suite = common.skip, common.load_suite


def main():
    build, host = common.setup(sys.argv[1:])
    os.environ["HF_HUB_OFFLINE"] = "1"
    sys.path.insert(0, str(REPO / "tests" / "python-client"))
    try:
        import accelerate  # noqa: F401
        import torch
        from diffusers import WanPipeline
        from tiny_diffusers import WAN_CALL, wan_pipeline
    except ImportError as e:
        skip(f"PyTorch, diffusers, transformers or accelerate missing: {e}")
    if not host and not torch.cuda.is_available():
        skip("torch sees no CUDA device")
    suite = load_suite()
    import weightd
    import weightd.diffusers

    dev = "cpu" if host else "cuda:0"
    work = pathlib.Path(tempfile.mkdtemp(prefix="wd-gpu-diffusers-"))
    root = work / "models"
    root.mkdir()
    model = root / "wan"
    wan_pipeline().save_pretrained(model)
    ref = WanPipeline.from_pretrained(model).to(dev)

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

    def frames(pipe):
        # Latents from a host generator: the same on both sides.
        return pipe(**WAN_CALL, generator=torch.Generator().manual_seed(7)).frames

    try:
        with weightd.connect(sock) as client:
            pipe = weightd.diffusers.load_pipeline(WanPipeline, model, client=client, device=dev)
        for name in ("text_encoder", "transformer", "vae"):
            module, want = getattr(pipe, name), getattr(ref, name).state_dict()
            (lease,) = module.weightd_leases
            check(f"{name}: the lease is on {dev}", lease.device == dev, lease.device)
            state = module.state_dict()
            bad = [k for k, t in state.items()
                   if k in lease and (str(t.device) != dev or t.data_ptr() != lease[k].data_ptr())]
            check(f"{name}: every leased tensor is the lease's, on {dev}", not bad, ", ".join(bad[:5]))
            unequal = [k for k, t in state.items() if not torch.equal(t, want[k])]
            check(f"{name}: every tensor equals from_pretrained's", not unequal, ", ".join(unequal[:5]))
            own = [n for n, b in module.named_buffers() if n not in state and str(b.device) != dev]
            check(f"{name}: its own buffers are on {dev}", not own, ", ".join(own))
        got, exp = frames(pipe), frames(ref)
        check("frames bit-identical to from_pretrained's", torch.equal(got, exp),
              f"max difference {(got.float() - exp.float()).abs().max()}")
        del pipe, got, module, state, lease  # the last component's tensors too
        gc.collect()
        with weightd.connect(sock) as client:
            held = {e["component"]: e["leases"] for e in client.list() if e["model"] == str(model)}
        check("the leases end with the pipeline", held and not any(held.values()), str(held))
    finally:
        p.terminate()
        p.wait()
    if failures:
        print(f"{len(failures)} failed: {', '.join(failures)}")
        sys.exit(1)
    print("all passed")


if __name__ == "__main__":
    main()
