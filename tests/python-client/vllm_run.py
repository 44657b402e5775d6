"""Run the real vLLM (CPU build) on a model and print what it generated.

    python vllm_run.py RUNS_JSON

RUNS_JSON is a list of runs, done one after the other in this process:
{"model": path, "load_format": "auto"|"weightd", "extra": {...},
"dtype": "float32", "tp": 1, "prompts": [...], "max_tokens": 8}.  Prints
one line per run: "RESULT " + JSON {"ok": true, "token_ids": [[...], ...],
"daemon_mappings": N} or {"ok": false, "error": "Type: message"}.
The environment (VLLM_ENABLE_V1_MULTIPROCESSING, ...) is the caller's.
"""
import gc
import json
import sys
import traceback


def daemon_mappings():
    """How many of this process's mappings are the daemon's memory (its
    slabs are memfds named "weightd:FILE"): with the engine in this
    process, after a load through weightd, 0 means no parameter refers
    to the daemon's memory and the lease is gone."""
    with open("/proc/self/maps") as f:
        return sum("memfd:weightd:" in line for line in f)


def run_one(run):
    from vllm import LLM, SamplingParams

    kwargs = dict(model=run["model"], load_format=run["load_format"], dtype=run.get("dtype", "float32"),
                  enforce_eager=True, max_model_len=run.get("max_model_len", 128), seed=0,
                  tensor_parallel_size=run.get("tp", 1), max_num_seqs=4)
    if run.get("extra") is not None:
        kwargs["model_loader_extra_config"] = run["extra"]
    if run.get("distributed_executor_backend"):
        kwargs["distributed_executor_backend"] = run["distributed_executor_backend"]
    llm = LLM(**kwargs)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=run.get("max_tokens", 8), ignore_eos=True)
        outs = llm.generate(run["prompts"], params, use_tqdm=False)
        return {"ok": True, "token_ids": [list(o.outputs[0].token_ids) for o in outs],
                "daemon_mappings": daemon_mappings()}
    finally:
        del llm
        try:
            from vllm.distributed import cleanup_dist_env_and_memory
            cleanup_dist_env_and_memory()
        except Exception:  # noqa: BLE001 (best effort between runs)
            pass
        gc.collect()


def main():
    runs = json.loads(sys.argv[1])
    for run in runs:
        try:
            result = run_one(run)
        except Exception as e:  # noqa: BLE001 (reported to the test)
            traceback.print_exc()
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
