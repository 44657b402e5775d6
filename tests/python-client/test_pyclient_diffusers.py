"""weightd.diffusers with the real diffusers and transformers on CPU: a tiny
Wan text-to-video pipeline (transformer, VAE, UMT5 text encoder with tied
embeddings, flow-matching scheduler, a tokenizer built here) is built and
saved by diffusers itself, whole and with every component sharded
(max_shard_size); load_pipeline() must generate frames bit-identical to
WanPipeline.from_pretrained() with the same seed, and every parameter must
lie in a read-only mapping of one of the daemon's memory files (read from
/proc/self/maps, not from weightd).  A tiny Stable Diffusion pipeline
(UNet, AutoencoderKL, CLIP text encoder, a CLIP tokenizer written here,
null safety checker) must give bit-identical images.  No hub access:
HF_HUB_OFFLINE=1."""
import gc
import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from diffusers import (AutoencoderKLWan, DiffusionPipeline, StableDiffusionPipeline, WanPipeline,  # noqa: E402
                       WanTransformer3DModel)
from transformers import UMT5EncoderModel  # noqa: E402

from tiny_diffusers import WAN_CALL, sd_pipeline, wan_pipeline  # noqa: E402

TORCH_COMPONENTS = ("text_encoder", "transformer", "vae")


@pytest.fixture(scope="module")
def saved(workdir):
    """The pipelines as diffusers saves them: {"root", "plain", "sharded", "bf16", "sd"}."""
    root = workdir / "diffusers-models"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir()
    pipe = wan_pipeline()
    pipe.save_pretrained(root / "wan")
    pipe.save_pretrained(root / "wan-sharded", max_shard_size="20KB")
    # bf16 as from_pretrained(dtype=bfloat16) makes it: a few of the
    # transformer's modules stay float32.
    WanPipeline.from_pretrained(root / "wan", dtype=torch.bfloat16).save_pretrained(root / "wan-bf16")
    scratch = workdir / "diffusers-scratch"
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir()
    sd_pipeline(scratch).save_pretrained(root / "sd")
    return {"root": root, "plain": root / "wan", "sharded": root / "wan-sharded", "bf16": root / "wan-bf16",
            "sd": root / "sd"}


@pytest.fixture
def served(start_daemon, saved, client_lib):
    return start_daemon(roots=[saved["root"]])


def _frames(pipe):
    return pipe(**WAN_CALL, generator=torch.Generator().manual_seed(7)).frames


def _maps():
    """[(start, end, perms, path)] of this process's mappings."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(None, 5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end, fields[1], fields[5].strip() if len(fields) > 5 else ""))
    return out


def _daemon_mapping(maps, t):
    """The read-only shared mapping of a weightd memory file that holds all
    of t's bytes, or None."""
    lo = t.data_ptr()
    hi = lo + t.numel() * t.element_size()
    for start, end, perms, path in maps:
        if start <= lo < end:
            if hi <= end and perms.startswith("r-") and perms[3] == "s" and path.startswith("/memfd:weightd:"):
                return path
            return None
    return None


def _check_in_daemon_memory(module, files):
    """Every parameter and persistent buffer of module lies in a read-only
    mapping of the daemon's memory file of one of files (their base
    names); returns the number checked."""
    maps = _maps()
    persistent = set(module.state_dict().keys())
    checked = 0
    for name, t in list(module.named_parameters()) + [(n, b) for n, b in module.named_buffers() if n in persistent]:
        if not t.numel():
            continue
        path = _daemon_mapping(maps, t)
        assert path is not None, f"{name}: not in a read-only mapping of a weightd memory file"
        assert path.split(":", 2)[2].split(" ")[0] in files, f"{name}: in {path}, not one of {files}"
        checked += 1
    return checked


@pytest.mark.parametrize("layout", ["plain", "sharded"])
def test_frames_bit_identical_to_from_pretrained(served, saved, layout):
    import weightd
    import weightd.diffusers as wdd

    path = saved[layout]
    want = _frames(WanPipeline.from_pretrained(path))
    with weightd.connect(served.socket) as client:
        pipe = wdd.load_pipeline(WanPipeline, path, client=client)
    assert type(pipe) is WanPipeline
    got = _frames(pipe)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want), f"max difference {(got - want).abs().max()}"

    # The non-torch components are what diffusers made of the folders.
    ref = WanPipeline.from_pretrained(path)
    assert type(pipe.scheduler) is type(ref.scheduler) and dict(pipe.scheduler.config) == dict(ref.scheduler.config)
    assert type(pipe.tokenizer) is type(ref.tokenizer)
    assert pipe.transformer_2 is None

    for name in TORCH_COMPONENTS:
        module = getattr(pipe, name)
        (lease,) = module.weightd_leases
        assert lease.component == name
        files = {os.path.basename(f) for f in lease.files()}
        if layout == "sharded":
            assert len(files) > 1, f"{name}: {files}"
        assert _check_in_daemon_memory(module, files) > 0
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
        # Every tensor equals what diffusers loaded from the files.
        ref_state = getattr(ref, name).state_dict()
        state = module.state_dict()
        assert state.keys() == ref_state.keys()
        for k, v in state.items():
            assert v.dtype == ref_state[k].dtype and torch.equal(v, ref_state[k]), f"{name}: {k}"
    assert len(pipe.weightd_leases) == len(TORCH_COMPONENTS)


def test_tied_weights_and_own_buffers(served, saved):
    import weightd
    import weightd.diffusers as wdd

    with weightd.connect(served.socket) as client:
        te = wdd.load_component(client, saved["plain"], "text_encoder", UMT5EncoderModel)
        tr = wdd.load_component(client, saved["plain"], "transformer", WanTransformer3DModel)
    # The checkpoint has only shared.weight; tie_weights() makes the
    # encoder's embedding that same daemon tensor.
    assert te.encoder.embed_tokens.weight is te.shared.weight
    maps = _maps()
    assert _daemon_mapping(maps, te.encoder.embed_tokens.weight) is not None
    # The rotary tables are non-persistent buffers the module computed: its
    # own memory, equal to diffusers' own.
    ref = WanTransformer3DModel.from_pretrained(saved["plain"] / "transformer")
    own = {n: b for n, b in tr.named_buffers() if n not in tr.state_dict()}
    assert own, "the Wan transformer has non-persistent buffers"
    for n, b in own.items():
        assert _daemon_mapping(maps, b) is None, n
        assert not b.is_meta and torch.equal(b, dict(ref.named_buffers())[n]), n


def test_default_client_and_lease_lifetime(served, saved, monkeypatch):
    import weightd
    import weightd.diffusers as wdd

    monkeypatch.setenv("WEIGHTD_SOCKET", served.socket)
    pipe = wdd.load_pipeline(WanPipeline, saved["plain"])  # connects to $WEIGHTD_SOCKET itself

    def leases():
        with weightd.connect(served.socket) as c:
            return {e["component"]: e["leases"] for e in c.list() if e["model"] == str(saved["plain"])}

    assert leases() == {name: 1 for name in TORCH_COMPONENTS}
    frames = _frames(pipe)
    del pipe
    gc.collect()
    assert leases() == {name: 0 for name in TORCH_COMPONENTS}
    assert frames.abs().sum() > 0


def test_overrides(served, saved):
    import weightd
    import weightd.diffusers as wdd

    ref = WanPipeline.from_pretrained(saved["plain"])
    with weightd.connect(served.socket) as client:
        pipe = wdd.load_pipeline(WanPipeline, saved["plain"], client=client, vae=ref.vae)
        assert pipe.vae is ref.vae
        assert {lease.component for lease in pipe.weightd_leases} == {"text_encoder", "transformer"}
        with pytest.raises(TypeError, match="torch_dtype"):
            wdd.load_pipeline(WanPipeline, saved["plain"], client=client, torch_dtype=torch.bfloat16)


def test_errors(served, saved, tmp_path):
    import weightd
    import weightd.diffusers as wdd

    with weightd.connect(served.socket) as client:
        # A component the pipeline does not have.
        with pytest.raises(weightd.NotFound, match="'unet'"):
            wdd.load_component(client, saved["plain"], "unet", WanTransformer3DModel)
        # The wrong class for a component: named, with the config's.
        with pytest.raises(weightd.InvalidArgument, match="AutoencoderKLWan, not WanTransformer3DModel"):
            wdd.load_component(client, saved["plain"], "vae", WanTransformer3DModel)
        with pytest.raises(weightd.InvalidArgument, match="not UMT5EncoderModel"):
            wdd.load_component(client, saved["plain"], "vae", UMT5EncoderModel)
        with pytest.raises(weightd.InvalidArgument, match="UMT5EncoderModel, not WanTransformer3DModel"):
            wdd.load_component(client, saved["plain"], "text_encoder", WanTransformer3DModel)

        class Deeper(WanTransformer3DModel):
            pass

        with pytest.raises(weightd.InvalidArgument, match="config.json is for WanTransformer3DModel, not Deeper"):
            wdd.load_component(client, saved["plain"], "transformer", Deeper)

    # A pipeline folder that lost a component's weights.
    broken = saved["root"] / "wan-broken"
    if broken.exists():
        shutil.rmtree(broken)
    shutil.copytree(saved["plain"], broken)
    os.unlink(broken / "vae" / "diffusion_pytorch_model.safetensors")
    with weightd.connect(served.socket) as client:
        with pytest.raises(weightd.NotFound, match="vae: no safetensors weights"):
            wdd.load_pipeline(WanPipeline, broken, client=client)
    # A component with only a pickle checkpoint: the daemon's refusal says
    # so; diffusers loads that one, passed as an override.
    pickled = saved["root"] / "wan-pickle"
    if pickled.exists():
        shutil.rmtree(pickled)
    shutil.copytree(saved["plain"], pickled)
    vae_file = pickled / "vae" / "diffusion_pytorch_model.safetensors"
    import safetensors.torch
    torch.save(safetensors.torch.load_file(vae_file), pickled / "vae" / "diffusion_pytorch_model.bin")
    os.unlink(vae_file)
    with weightd.connect(served.socket) as client:
        with pytest.raises(weightd.Unsupported, match="only pickle checkpoints"):
            wdd.load_pipeline(WanPipeline, pickled, client=client)
        vae = AutoencoderKLWan.from_pretrained(pickled / "vae")
        pipe = wdd.load_pipeline(WanPipeline, pickled, client=client, vae=vae)
        assert pipe.vae is vae and {lease.component for lease in pipe.weightd_leases} == {"text_encoder",
                                                                                           "transformer"}
    # A checkpoint with fewer layers than its config says: every missing
    # parameter is named.
    cfg = broken / "transformer" / "config.json"
    text = cfg.read_text().replace('"num_layers": 2', '"num_layers": 3')
    assert text != cfg.read_text()
    cfg.write_text(text)
    with weightd.connect(served.socket) as client:
        with pytest.raises(weightd.FormatError, match=r"blocks\.2\."):
            wdd.load_component(client, broken, "transformer", WanTransformer3DModel)
    # strict: a tensor the module has no place for.
    text = text.replace('"num_layers": 3', '"num_layers": 1')
    cfg.write_text(text)
    with weightd.connect(served.socket) as client:
        with pytest.raises(weightd.FormatError, match=r"no place for: blocks\.1\."):
            wdd.load_component(client, broken, "transformer", WanTransformer3DModel)
        m = wdd.load_component(client, broken, "transformer", WanTransformer3DModel, strict=False)
        assert len(m.blocks) == 1


def test_stable_diffusion_images_bit_identical(served, saved):
    import weightd
    import weightd.diffusers as wdd

    def images(pipe):
        return pipe("a red cat", num_inference_steps=2, height=16, width=16, output_type="pt",
                    generator=torch.Generator().manual_seed(7)).images

    want = images(StableDiffusionPipeline.from_pretrained(saved["sd"]))
    with weightd.connect(served.socket) as client:
        # DiffusionPipeline: the class model_index.json names.
        pipe = wdd.load_pipeline(DiffusionPipeline, saved["sd"], client=client)
    assert type(pipe) is StableDiffusionPipeline
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    got = images(pipe)
    assert torch.equal(got, want), f"max difference {(got - want).abs().max()}"
    assert {lease.component for lease in pipe.weightd_leases} == {"text_encoder", "unet", "vae"}
    for name in ("text_encoder", "unet", "vae"):
        module = getattr(pipe, name)
        files = {os.path.basename(f) for f in module.weightd_leases[0].files()}
        assert _check_in_daemon_memory(module, files) > 0
    # CLIP's position ids are a non-persistent buffer: the module's own.
    (name, ids), = [(n, b) for n, b in pipe.text_encoder.named_buffers() if n.endswith("position_ids")]
    assert name not in pipe.text_encoder.state_dict()
    assert _daemon_mapping(_maps(), ids) is None and torch.equal(ids, torch.arange(16).unsqueeze(0))


def test_bf16_as_from_pretrained_with_dtype(served, saved):
    """The daemon serves the files' dtypes; stored as from_pretrained(dtype=
    bfloat16) gives them, the pipeline is that one, to the bit."""
    import weightd
    import weightd.diffusers as wdd

    ref = WanPipeline.from_pretrained(saved["bf16"], dtype=torch.bfloat16)
    with weightd.connect(served.socket) as client:
        pipe = wdd.load_pipeline(WanPipeline, saved["bf16"], client=client)
    for name in TORCH_COMPONENTS:
        got = {n: p.dtype for n, p in getattr(pipe, name).named_parameters()}
        assert got == {n: p.dtype for n, p in getattr(ref, name).named_parameters()}, name
    assert pipe.transformer.scale_shift_table.dtype == torch.float32
    assert pipe.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    want, got = _frames(ref), _frames(pipe)
    assert torch.equal(got, want), f"max difference {(got - want).abs().max()}"


def test_the_gpu_script_on_the_host_tier(client_lib):
    """tests/gpu/gpu-diffusers.py runs in the GPU suite; --host runs its
    checks on the host tier, so that it is checked where there is no GPU."""
    import pathlib
    import subprocess
    import sys

    from harness import BUILD

    script = pathlib.Path(__file__).resolve().parents[2] / "tests" / "gpu" / "gpu-diffusers.py"
    r = subprocess.run([sys.executable, str(script), str(BUILD), "--host"], capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "all passed" in r.stdout
