"""weightd as a vLLM load format: `--load-format weightd`.

The package declares register() as a `vllm.general_plugins` entry point, so
vLLM calls it in every process it starts (the front end, the engine core,
each worker) once `pip install ./client/python` has put the package where
vLLM runs.  register() adds the load format "weightd"
(weightd._vllm_loader.WeightdModelLoader) with vLLM's
register_model_loader(); calling it again does nothing.  Importing weightd
does not import vLLM: only register() does.

    vllm serve /srv/models/llama --load-format weightd
    LLM(model="/srv/models/llama", load_format="weightd",
        model_loader_extra_config={"socket": "/run/weightd.sock", "fallback": True})

The options (model_loader_extra_config) are described in
weightd._vllm_loader and in the package README ("vLLM").
"""
import threading

LOAD_FORMAT = "weightd"

_lock = threading.Lock()
_registered = False


def register():
    """Register the load format "weightd" with vLLM (idempotent)."""
    global _registered
    with _lock:
        if _registered:
            return
        from vllm.model_executor.model_loader import register_model_loader

        from ._vllm_loader import WeightdModelLoader
        register_model_loader(LOAD_FORMAT)(WeightdModelLoader)
        _registered = True


def __getattr__(name):
    # weightd.vllm.WeightdModelLoader, imported (with vLLM) on first use.
    if name == "WeightdModelLoader":
        from ._vllm_loader import WeightdModelLoader
        return WeightdModelLoader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
