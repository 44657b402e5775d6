"""The vLLM model loader of the load format "weightd" (registered by
weightd.vllm.register(); this module imports vLLM).

load_weights() leases the model's checkpoint from the weightd daemon (host
memory, read once per node and shared by every engine and every rank that
asks for it) and feeds the lease's tensors, zero-copy views of the daemon's
memory, to model.load_weights().  vLLM's weight loaders copy each tensor into
the model's own parameters (narrowing it to the rank's part under tensor
parallelism), so no parameter refers to the daemon's memory afterwards and
the lease is released as soon as model.load_weights() returns: the daemon's
copy stays resident (cached) for the next engine, not pinned by this one.
Should a model's loader keep a tensor instead of copying it, that tensor
keeps its mapping alive by itself (see the package README, "Memory and
lifetime"); it is read-only memory, so writing into it faults.

Then, as vLLM's DefaultModelLoader does, every parameter must have been
loaded (unless enable_weights_track says otherwise): a checkpoint that lacks
one is an error naming it, not a model with uninitialized weights.

Options (model_loader_extra_config):
  socket     the daemon's socket (default: $WEIGHTD_SOCKET, else the
             daemon's default path).
  model      the model's path as the daemon is to load it (default: vLLM's
             model when it is a local folder; for a hub id, its snapshot in
             the Hugging Face cache, downloaded by download_model() as the
             default loader does, which must then lie beneath one of the
             daemon's model roots).
  component  the component to load (a sub-folder of a model_index.json
             layout); default: the model folder's own checkpoint.
  fallback   False (default): a failure to reach the daemon is an error.
             True: when no daemon answers, load with vLLM's default loader
             (the files, read by this process).  "always": also when the
             daemon answers and refuses the model (outside its roots,
             malformed, too large).
  enable_weights_track
             as for the default loader: check that every parameter was
             loaded (default: when the model reports the names it loaded
             and is not quantized, as the default loader does).
Any other key is an error that names it.
"""
import dataclasses
import itertools
import os
import time

from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

from . import errors
from .client import Client, default_socket

# Under vLLM's logger, so its handler, format and VLLM_LOGGING_LEVEL apply.
logger = init_logger("vllm.model_executor.model_loader.weightd")

_OPTIONS = ("socket", "model", "component", "fallback", "enable_weights_track")
_FALLBACK_MODES = (False, True, "always")


def _options(load_config):
    extra = load_config.model_loader_extra_config
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise ValueError(f"model_loader_extra_config must be a dict for load format "
                         f"{load_config.load_format}, got {type(extra).__name__}")
    unknown = sorted(set(extra) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"Unexpected extra config keys for load format {load_config.load_format}: "
                         f"{', '.join(map(repr, unknown))} (known: {', '.join(_OPTIONS)})")
    for key in ("socket", "model", "component"):
        value = extra.get(key)
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"model_loader_extra_config[{key!r}] must be a path (a string), got {value!r}")
    fallback = extra.get("fallback", False)
    if not isinstance(fallback, (bool, str)) or fallback not in _FALLBACK_MODES:
        raise ValueError(f"model_loader_extra_config['fallback'] must be false, true or \"always\", "
                         f"got {fallback!r}")
    track = extra.get("enable_weights_track")
    if track is not None and not isinstance(track, bool):
        raise ValueError(f"model_loader_extra_config['enable_weights_track'] must be a bool, got {track!r}")
    return {
        "socket": None if extra.get("socket") is None else os.fspath(extra["socket"]),
        "model": None if extra.get("model") is None else os.fspath(extra["model"]),
        "component": None if extra.get("component") is None else os.fspath(extra["component"]),
        "fallback": fallback,
        "enable_weights_track": track,
    }


class WeightdModelLoader(BaseModelLoader):
    """Load format "weightd": the weights from the weightd daemon."""

    def __init__(self, load_config: LoadConfig):
        super().__init__(load_config)
        self.options = _options(load_config)
        self.counter_before_loading_weights = 0.0
        self.counter_after_loading_weights = 0.0

    def _default_loader(self):
        """vLLM's own loader for the same model (the fallback, the hub
        download, and the secondary weights some models declare)."""
        config = dataclasses.replace(self.load_config, load_format="auto", model_loader_extra_config={})
        return DefaultModelLoader(config)

    def _model_path(self, model_config):
        if self.options["model"] is not None:
            return os.path.abspath(self.options["model"])
        if os.path.isdir(model_config.model):
            return os.path.abspath(model_config.model)
        folder, _, _, _ = self._default_loader()._prepare_weights(
            model_config.model, None, model_config.revision, False, ["*.safetensors"])
        return os.path.abspath(folder)

    def download_model(self, model_config: ModelConfig) -> None:
        if self.options["model"] is None and not os.path.isdir(model_config.model):
            self._default_loader().download_model(model_config)

    def _lease(self, model_config):
        """(the lease, the path), or None to fall back."""
        fallback = self.options["fallback"]
        socket = self.options["socket"] or default_socket()
        path = self._model_path(model_config)
        try:
            client = Client(socket)
        except errors.Unavailable as e:
            if fallback:
                logger.warning("weightd: no daemon answers on %s (%s); loading %s with vLLM's default loader "
                               "(fallback)", socket, e.message, model_config.model)
                return None
            raise errors.Unavailable(f"{e.message} (load format weightd: no daemon answers on {socket}; "
                                     "model_loader_extra_config={\"fallback\": true} loads the files with "
                                     "vLLM's default loader instead)", e.code, e.code_name) from None
        try:
            return client.load(path, self.options["component"], framework="pt"), path
        except errors.Error as e:
            if fallback == "always" or (fallback and isinstance(e, errors.Unavailable)):
                logger.warning("weightd: the daemon on %s did not load %s (%s: %s); loading it with vLLM's "
                               "default loader (fallback=%r)", socket, path, e.code_name, e.message, fallback)
                return None
            raise
        finally:
            client.close()  # the lease keeps the connection while it lives

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        self.counter_before_loading_weights = time.perf_counter()
        leased = self._lease(model_config)
        if leased is None:
            self._default_loader().load_weights(model, model_config)
            return
        lease, path = leased
        try:
            logger.info("weightd: leased %s%s (%d tensors) from the daemon", path,
                        f" component {lease.component}" if lease.component else "", len(lease))
            weights = ((name, lease[name]) for name in lease.keys())
            secondary = tuple(getattr(model, "secondary_weights", ()))
            if secondary:
                # Sources a model adds besides its checkpoint (another repo,
                # a sub-folder): read by vLLM's default loader.
                default = self._default_loader()
                weights = itertools.chain(weights, *(default._get_weights_iterator(s) for s in secondary))
            loaded = model.load_weights(weights)
        finally:
            # vLLM's weight loaders copied every tensor into the model's
            # parameters: the lease is no longer needed.
            lease.release()
        self.counter_after_loading_weights = time.perf_counter()
        logger.info_once("Loading weights took %.2f seconds",
                         self.counter_after_loading_weights - self.counter_before_loading_weights)
        track = self.options["enable_weights_track"]
        if track is None:
            track = model_config.quantization is None and loaded is not None
        if track:
            if loaded is None:
                raise ValueError(f"load format weightd: enable_weights_track is set but "
                                 f"{type(model).__name__}.load_weights() does not report what it loaded")
            # vLLM's own check (it raises naming the parameters not loaded).
            DefaultModelLoader.track_weights_loading(self, model, set(loaded),
                                                     quantized=model_config.quantization is not None)
