"""ctypes bindings of libweightd-client, the C API every weightd client uses.

The protocol exists once, in C: this module only declares the library's
public functions and structs (weightd/client.h) and finds the library:
$WEIGHTD_CLIENT_LIB, else a copy next to this package (a packaged wheel),
else the system's libweightd-client.so.0 (ctypes.util.find_library, then
the soname itself).
"""
import ctypes
import ctypes.util
import os
import pathlib

from . import errors

ERROR_MESSAGE_MAX = 1024


class WdError(ctypes.Structure):
    _fields_ = [("code", ctypes.c_int), ("message", ctypes.c_char * ERROR_MESSAGE_MAX)]


class WdTensor(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("dtype", ctypes.c_char_p),
        ("ndim", ctypes.c_uint),
        ("shape", ctypes.POINTER(ctypes.c_uint64)),
        ("nbytes", ctypes.c_uint64),
        ("file", ctypes.c_uint),
        ("offset", ctypes.c_uint64),
        ("data", ctypes.c_void_p),
        ("full_shape", ctypes.POINTER(ctypes.c_uint64)),
        ("shard_dim", ctypes.c_uint),
        ("shard_start", ctypes.c_uint64),
        ("device", ctypes.c_int),
        ("device_ptr", ctypes.c_uint64),
    ]


class WdPrefetchResult(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_uint64), ("was_resident", ctypes.c_int)]


PROGRESS_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p)


class WdShardRule(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("dim", ctypes.c_uint)]


KEEP_HOST_DEFAULT, KEEP_HOST_YES, KEEP_HOST_NO = 0, 1, 2


class WdLoadOptions(ctypes.Structure):
    _fields_ = [
        ("device", ctypes.c_char_p),
        ("rank", ctypes.c_uint),
        ("world", ctypes.c_uint),
        ("rules", ctypes.POINTER(WdShardRule)),
        ("n_rules", ctypes.c_size_t),
        ("uneven", ctypes.c_int),
        ("keep_host", ctypes.c_int),
        ("progress", PROGRESS_FN),
        ("userdata", ctypes.c_void_p),
        ("tensors", ctypes.POINTER(ctypes.c_char_p)),
        ("n_tensors", ctypes.c_size_t),
        ("names", ctypes.POINTER(ctypes.c_char_p)),
        ("n_names", ctypes.c_size_t),
    ]


class WdClusterPart(ctypes.Structure):
    _fields_ = [
        ("node", ctypes.c_char_p),
        ("rank", ctypes.c_uint),
        ("world", ctypes.c_uint),
        ("rules", ctypes.POINTER(WdShardRule)),
        ("n_rules", ctypes.c_size_t),
        ("uneven", ctypes.c_int),
        ("tensors", ctypes.POINTER(ctypes.c_char_p)),
        ("n_tensors", ctypes.c_size_t),
        ("device", ctypes.c_char_p),
    ]


class WdClusterOptions(ctypes.Structure):
    _fields_ = [
        ("nodes", ctypes.POINTER(ctypes.c_char_p)),
        ("n_nodes", ctypes.c_size_t),
        ("parts", ctypes.POINTER(WdClusterPart)),
        ("n_parts", ctypes.c_size_t),
        ("device", ctypes.c_char_p),
        ("progress", PROGRESS_FN),
        ("userdata", ctypes.c_void_p),
    ]


class WdEntry(ctypes.Structure):
    _fields_ = [
        ("model", ctypes.c_char_p),
        ("component", ctypes.c_char_p),
        ("tier", ctypes.c_char_p),
        ("state", ctypes.c_char_p),
        ("bytes", ctypes.c_uint64),
        ("leases", ctypes.c_uint32),
        ("pinned", ctypes.c_int),
        ("files", ctypes.c_uint32),
        ("idle_ms", ctypes.c_uint64),
        ("shard", ctypes.c_char_p),
    ]


class WdDevice(ctypes.Structure):
    _fields_ = [
        ("index", ctypes.c_uint32),
        ("uuid", ctypes.c_char_p),
        ("name", ctypes.c_char_p),
        ("pci_bus_id", ctypes.c_char_p),
        ("total_bytes", ctypes.c_uint64),
        ("budget_bytes", ctypes.c_uint64),
        ("used_bytes", ctypes.c_uint64),
        ("evictable_bytes", ctypes.c_uint64),
    ]


class WdClusterNodeLoad(ctypes.Structure):
    _fields_ = [
        ("node", ctypes.c_char_p),
        ("state", ctypes.c_char_p),
        ("storage_read_bytes", ctypes.c_uint64),
        ("peer_received_bytes", ctypes.c_uint64),
        ("peer_sent_bytes", ctypes.c_uint64),
        ("message", ctypes.c_char_p),
    ]


class WdClusterPrefetchResult(ctypes.Structure):
    _fields_ = [
        ("bytes", ctypes.c_uint64),
        ("was_resident", ctypes.c_int),
        ("n_nodes", ctypes.c_size_t),
        ("nodes", ctypes.POINTER(WdClusterNodeLoad)),
    ]


class WdClusterNode(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("address", ctypes.c_char_p),
        ("state", ctypes.c_char_p),
        ("generation", ctypes.c_uint64),
        ("rtt_us", ctypes.c_uint64),
        ("sent_bytes", ctypes.c_uint64),
        ("received_bytes", ctypes.c_uint64),
        ("last_error", ctypes.c_char_p),
        ("since_ms", ctypes.c_uint64),
    ]


class WdClusterInfo(ctypes.Structure):
    _fields_ = [
        ("enabled", ctypes.c_int),
        ("node", ctypes.c_char_p),
        ("generation", ctypes.c_uint64),
        ("n_nodes", ctypes.c_size_t),
        ("nodes", ctypes.POINTER(WdClusterNode)),
        ("peer_sent_bytes", ctypes.c_uint64),
        ("peer_received_bytes", ctypes.c_uint64),
        ("storage_saved_bytes", ctypes.c_uint64),
        ("gpu_lane", ctypes.c_char_p),
        ("lane_sent_bytes", ctypes.c_uint64),
        ("lane_received_bytes", ctypes.c_uint64),
    ]


class WdStatus(ctypes.Structure):
    _fields_ = [
        ("version", ctypes.c_char_p),
        ("pid", ctypes.c_uint32),
        ("uptime_ms", ctypes.c_uint64),
        ("host_budget_bytes", ctypes.c_uint64),
        ("host_used_bytes", ctypes.c_uint64),
        ("host_evictable_bytes", ctypes.c_uint64),
        ("storage_read_bytes", ctypes.c_uint64),
        ("leases", ctypes.c_uint32),
        ("connections", ctypes.c_uint32),
        ("entries", ctypes.c_uint32),
        ("loading", ctypes.c_uint32),
        ("evictions", ctypes.c_uint64),
        ("n_model_roots", ctypes.c_size_t),
        ("model_roots", ctypes.POINTER(ctypes.c_char_p)),
        ("socket", ctypes.c_char_p),
        ("hugetlb", ctypes.c_int),
        ("gpu", ctypes.c_char_p),
        ("n_devices", ctypes.c_size_t),
        ("devices", ctypes.POINTER(WdDevice)),
        ("cluster", ctypes.POINTER(WdClusterInfo)),
    ]


_P = ctypes.c_void_p
_S = ctypes.c_char_p
_ERR = ctypes.POINTER(WdError)

# name: (restype, argtypes)
_SIGNATURES = {
    "wd_code_name": (_S, [ctypes.c_int]),
    "wd_version": (_S, []),
    "wd_default_socket": (ctypes.c_int, [ctypes.c_char_p, ctypes.c_size_t]),
    "wd_connect": (ctypes.c_int, [_S, ctypes.POINTER(_P), _ERR]),
    "wd_disconnect": (None, [_P]),
    "wd_load": (ctypes.c_int, [_P, _S, _S, ctypes.POINTER(_P), _ERR]),
    "wd_lease_manifest": (_P, [_P]),
    "wd_lease_id": (ctypes.c_uint64, [_P]),
    "wd_release": (ctypes.c_int, [_P, _ERR]),
    "wd_manifest_n_tensors": (ctypes.c_size_t, [_P]),
    "wd_manifest_tensor": (ctypes.POINTER(WdTensor), [_P, ctypes.c_size_t]),
    "wd_manifest_find": (ctypes.POINTER(WdTensor), [_P, ctypes.c_char_p]),
    "wd_manifest_tensors": (ctypes.c_void_p, [_P]),
    "wd_manifest_names_size": (ctypes.c_size_t, [_P]),
    "wd_manifest_names": (ctypes.c_int, [_P, ctypes.c_void_p, ctypes.c_size_t]),
    "wd_manifest_dtype_codes": (ctypes.c_int, [_P, ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_char_p),
                                               ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]),
    "wd_manifest_n_dims": (ctypes.c_size_t, [_P]),
    "wd_manifest_shapes": (ctypes.c_int, [_P, ctypes.c_void_p, ctypes.c_size_t]),
    "wd_manifest_n_files": (ctypes.c_size_t, [_P]),
    "wd_manifest_file": (_S, [_P, ctypes.c_size_t]),
    "wd_manifest_n_metadata": (ctypes.c_size_t, [_P, ctypes.c_size_t]),
    "wd_manifest_metadata": (ctypes.c_int, [_P, ctypes.c_size_t, ctypes.c_size_t,
                                            ctypes.POINTER(_S), ctypes.POINTER(_S)]),
    "wd_manifest_model": (_S, [_P]),
    "wd_manifest_component": (_S, [_P]),
    "wd_manifest_bytes": (ctypes.c_uint64, [_P]),
    "wd_prefetch": (ctypes.c_int, [_P, _S, _S, PROGRESS_FN, _P, ctypes.POINTER(WdPrefetchResult), _ERR]),
    "wd_load_ex": (ctypes.c_int, [_P, _S, _S, ctypes.POINTER(WdLoadOptions), ctypes.POINTER(_P), _ERR]),
    "wd_prefetch_ex": (ctypes.c_int, [_P, _S, _S, ctypes.POINTER(WdLoadOptions),
                                      ctypes.POINTER(WdPrefetchResult), _ERR]),
    "wd_evict": (ctypes.c_int, [_P, _S, _S, _ERR]),
    "wd_pin": (ctypes.c_int, [_P, _S, _S, _ERR]),
    "wd_unpin": (ctypes.c_int, [_P, _S, _S, _ERR]),
    "wd_list": (ctypes.c_int, [_P, ctypes.POINTER(ctypes.POINTER(WdEntry)), ctypes.POINTER(ctypes.c_size_t), _ERR]),
    "wd_entries_free": (None, [ctypes.POINTER(WdEntry), ctypes.c_size_t]),
    "wd_status_get": (ctypes.c_int, [_P, ctypes.POINTER(ctypes.POINTER(WdStatus)), _ERR]),
    "wd_status_free": (None, [ctypes.POINTER(WdStatus)]),
    "wd_prefetch_cluster": (ctypes.c_int, [_P, _S, _S, ctypes.POINTER(_S), ctypes.c_size_t, PROGRESS_FN, _P,
                                           ctypes.POINTER(ctypes.POINTER(WdClusterPrefetchResult)), _ERR]),
    "wd_prefetch_cluster_ex": (ctypes.c_int, [_P, _S, _S, ctypes.POINTER(WdClusterOptions),
                                              ctypes.POINTER(ctypes.POINTER(WdClusterPrefetchResult)), _ERR]),
    "wd_cluster_prefetch_result_free": (None, [ctypes.POINTER(WdClusterPrefetchResult)]),
    "wd_cluster": (ctypes.c_int, [_P, ctypes.POINTER(ctypes.POINTER(WdClusterInfo)), _ERR]),
    "wd_cluster_free": (None, [ctypes.POINTER(WdClusterInfo)]),
}

SONAME = "libweightd-client.so.0"


def _candidates():
    env = os.environ.get("WEIGHTD_CLIENT_LIB")
    if env:
        return [env]
    here = pathlib.Path(__file__).resolve().parent
    out = [str(p) for p in (here / SONAME, here / "lib" / SONAME) if p.exists()]
    found = ctypes.util.find_library("weightd-client")
    if found:
        out.append(found)
    out.append(SONAME)
    return out


def _open():
    tried = []
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            tried.append(f"{path}: {e}")
            continue
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
        return lib
    raise ImportError("weightd: cannot load libweightd-client (set WEIGHTD_CLIENT_LIB to its path): "
                      + "; ".join(tried))


lib = _open()


def code_name(code):
    return lib.wd_code_name(code).decode()


def check(code, err):
    """Raise the exception of a failed call (code != 0) with its message."""
    if code != 0:
        raise errors.from_code(code, code_name(code), err.message.decode(errors="replace"))


def text(b):
    return None if b is None else b.decode("utf-8", errors="surrogateescape")
