"""diffusers pipelines whose torch modules are weightd's memory.

    import weightd.diffusers
    from diffusers import WanPipeline
    pipe = weightd.diffusers.load_pipeline(WanPipeline, "/srv/models/wan")

load_pipeline() leases every torch component of a model_index.json
pipeline (transformer, VAE, text encoders) from the daemon and leaves the
rest (scheduler, tokenizers, feature extractors) to diffusers'
from_pretrained, which it calls with the leased modules as components.
load_component() builds one module.

A module is built with from_config under accelerate's init_empty_weights()
(parameters on the meta device, buffers real), then load_state_dict(lease,
assign=True): every parameter and persistent buffer *is* a tensor over
the daemon's read-only memory, in the checkpoint's dtype, not a copy.
Non-persistent buffers the module computes itself (rotary tables,
position ids) stay its own.  transformers models get tie_weights().  Any
parameter or buffer still without a tensor is an error naming it.

The weights are read-only: the modules are in eval mode with
requires_grad False, and writing into a parameter kills the process
(SIGSEGV).  Each module keeps its lease in module.weightd_leases (and the
pipeline all of them in pipe.weightd_leases); the daemon's lease ends when
the module and every tensor from it are gone.

device="cuda:N" leases the component in the daemon's GPU tier and the
module's own buffers are moved there; nothing else differs.  (Not yet run
on a GPU.)
"""
import importlib
import json
import os
import re

from . import errors
from .client import Client

# from_pretrained options that would make diffusers read or convert the
# torch components' weights itself; the daemon serves them as stored.
_REFUSED = ("torch_dtype", "dtype", "device_map", "max_memory", "offload_folder", "offload_state_dict",
            "low_cpu_mem_usage", "variant", "use_safetensors", "quantization_config", "use_flashpack",
            "disable_mmap")


def _torch():
    import torch
    return torch


def _empty_weights():
    try:
        from accelerate import init_empty_weights
    except ImportError:
        raise ImportError("weightd.diffusers needs accelerate (pip install accelerate) to build modules "
                          "without allocating their weights") from None
    return init_empty_weights(include_buffers=False)


def _read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise errors.NotFound(f"{path}: no such file ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise errors.FormatError(f"{path}: not JSON ({what}): {e}") from None


def _is_diffusers_model(cls):
    try:
        from diffusers import ModelMixin
    except ImportError:
        return False
    return isinstance(cls, type) and issubclass(cls, ModelMixin)


def _is_transformers_model(cls):
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(cls, type) and issubclass(cls, PreTrainedModel)


def _build(cls, folder, where):
    """cls built from folder's config.json under empty weights."""
    raw = _read_json(os.path.join(folder, "config.json"), f"the configuration of {where}")
    stored = raw.get("_class_name") if isinstance(raw, dict) else None
    if _is_diffusers_model(cls):
        if stored != cls.__name__ and (stored or "model_type" in raw):
            other = stored or ", ".join(raw.get("architectures") or []) or raw.get("model_type")
            raise errors.InvalidArgument(f"{where}: config.json is for {other}, not {cls.__name__}")
        with _empty_weights():
            model = cls.from_config(cls.load_config(folder))
        model.register_to_config(_name_or_path=folder)
        return model
    if _is_transformers_model(cls):
        want = getattr(cls.config_class, "model_type", None)
        if want and raw.get("model_type") != want:
            archs = ", ".join(raw.get("architectures") or []) or stored or raw.get("model_type") or "another model"
            raise errors.InvalidArgument(f"{where}: config.json is for {archs}, not {cls.__name__}")
        config = cls.config_class.from_pretrained(folder)
        with _empty_weights():
            model = cls._from_config(config)
        model.config.name_or_path = folder
        return model
    raise errors.InvalidArgument(f"{where}: {getattr(cls, '__name__', cls)!r} is neither a diffusers ModelMixin "
                                 "nor a transformers PreTrainedModel")


def _ignored(cls, attr):
    return [re.compile(p) for p in (getattr(cls, attr, None) or [])]


def _named(names, limit=8):
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_component(client, model, component, cls, device="cpu", *, strict=True):
    """The module cls of one component of model (a diffusers pipeline's
    folder; component None or "" for a model that is not one), its
    parameters and persistent buffers the daemon's memory.

    client: a weightd.Client, or None to connect to the default socket for
    this call (the module's tensors keep their lease after it closes).
    device: "cpu", or a CUDA device as Client.load() takes it.  strict:
    checkpoint tensors the module has no place for are an error (False:
    ignored).  A parameter or buffer the checkpoint does not provide is
    always an error."""
    model = os.path.abspath(os.fspath(model))
    folder = os.path.join(model, component) if component else model
    where = f"{model}: component {component!r}" if component else model
    if not os.path.isdir(folder):
        raise errors.NotFound(f"{where}: no folder {folder}")
    module = _build(cls, folder, where)

    own = None
    if client is None:
        client = own = Client()
    try:
        lease = client.load(model, component or None, device=device, framework="pt")
    finally:
        if own is not None:
            own.close()
    state = {name: lease[name] for name in lease.keys()}

    try:
        result = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # a shape that does not match the module's
        raise errors.FormatError(f"{where}: {cls.__name__}: {e}") from None
    unexpected = [k for k in result.unexpected_keys
                  if not any(p.search(k) for p in _ignored(cls, "_keys_to_ignore_on_load_unexpected"))]
    if strict and unexpected:
        raise errors.FormatError(f"{where}: {len(unexpected)} checkpoint tensors that {cls.__name__} has no "
                                 f"place for: {_named(unexpected)}")
    if hasattr(module, "tie_weights") and _is_transformers_model(cls):
        module.tie_weights()

    leased = {t.untyped_storage().data_ptr() for t in state.values() if t.numel()}
    ignore_missing = _ignored(cls, "_keys_to_ignore_on_load_missing")
    bad = [name for name, t in module.named_parameters(remove_duplicate=False) if t.is_meta]
    bad += [name for name, t in module.named_buffers(remove_duplicate=False) if t.is_meta]
    params = dict(module.named_parameters(remove_duplicate=False))
    buffers = dict(module.named_buffers(remove_duplicate=False))
    for name in result.missing_keys:
        t = params.get(name, buffers.get(name))
        if t is None:
            continue
        if t.is_meta or (t.numel() and t.untyped_storage().data_ptr() not in leased):
            if not any(p.search(name) for p in ignore_missing):
                bad.append(name)
    if bad:
        raise errors.FormatError(f"{where}: the checkpoint has no tensor for {len(set(bad))} of "
                                 f"{cls.__name__}'s parameters and buffers: {_named(set(bad))}")

    if lease.device != "cpu":
        module.to(lease.device)  # the module's own buffers; the leased tensors are there already
    module.eval()
    module.requires_grad_(False)
    module.weightd_leases = (lease,)
    return module


def _component_class(library, class_name, where):
    from diffusers import pipelines

    if hasattr(pipelines, library):
        mod = getattr(pipelines, library)
    else:
        try:
            mod = importlib.import_module(library)
        except ImportError as e:
            raise errors.InvalidArgument(f"{where}: library {library!r} cannot be imported: {e}") from None
    cls = getattr(mod, class_name, None)
    if cls is None:
        raise errors.InvalidArgument(f"{where}: {library} has no class {class_name!r}")
    return cls


def load_pipeline(pipeline_cls, model, client=None, device="cpu", **overrides):
    """pipeline_cls.from_pretrained(model, **overrides) with every torch
    component the model_index.json lists taken from the daemon
    (load_component()); diffusers loads the others (schedulers,
    tokenizers, feature extractors) itself.  A component given in overrides
    is used as given (None leaves it out, as in from_pretrained).

    client: a weightd.Client, or None to connect to the default socket
    for this call.  device: where the leased components live ("cpu", or a
    CUDA device).  Options that would make diffusers load or convert the
    weights itself (torch_dtype, variant, device_map, ...) are refused: the
    daemon serves the weights as stored.  The pipeline keeps every lease
    (pipe.weightd_leases) for its lifetime."""
    from diffusers import DiffusionPipeline

    refused = sorted(k for k in overrides if k in _REFUSED)
    if refused:
        raise TypeError(f"load_pipeline(): {', '.join(refused)} not supported: the daemon serves the torch "
                        "components' weights as stored (no conversion, no copy)")
    model = os.path.abspath(os.fspath(model))
    index = _read_json(os.path.join(model, "model_index.json"), "a diffusers pipeline's model_index.json")
    real_cls = pipeline_cls
    if pipeline_cls is DiffusionPipeline:
        real_cls = _component_class("diffusers", index.get("_class_name", ""), f"{model}: model_index.json")
    expected, optional = DiffusionPipeline._get_signature_keys(real_cls)
    accepted = set(expected) | set(optional)  # WanPipeline's transformer is an optional parameter

    torch = _torch()
    own = None
    if client is None:
        client = own = Client()
    components, leases = {}, []
    try:
        for name, value in index.items():
            if name.startswith("_") or name in overrides or name not in accepted:
                continue
            if not (isinstance(value, (list, tuple)) and len(value) == 2) or value[0] is None or value[1] is None:
                continue
            cls = _component_class(value[0], value[1], f"{model}: component {name!r}")
            if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
                continue  # diffusers loads it
            module = load_component(client, model, name, cls, device=device)
            components[name] = module
            leases.extend(module.weightd_leases)
    finally:
        if own is not None:
            own.close()
    pipe = pipeline_cls.from_pretrained(model, **components, **overrides)
    pipe.weightd_leases = tuple(leases)
    return pipe


__all__ = ["load_component", "load_pipeline"]
