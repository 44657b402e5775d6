"""Zero-copy torch tensors over mapped memory, through DLPack.

torch.from_dlpack() takes a PyCapsule named "dltensor" around a
DLManagedTensor (dlpack.h, the unversioned ABI every torch release reads).
We build that struct with ctypes: a 1-D uint8 tensor over [addr, addr+n),
whose manager context keeps `owner` (the object that keeps the mapping
alive) referenced until torch calls the deleter, when the last tensor that
shares the storage is gone.  Typed tensors are views of that byte tensor
(`.view(dtype)`), which shares its storage: no copy, and the same bytes.

Device leases pass device_type kDLCUDA and the CUDA ordinal: the same
byte tensor, over device memory, and the same views (torch's CUDA must be
initialised first: Client.load() does that).
"""
import ctypes

KDL_CPU = 1
KDL_CUDA = 2
_KDL_UINT = 1


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    pass


_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _DELETER)]

_CAPSULE_DESTRUCTOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_NAME = b"dltensor"  # must outlive every capsule: a module constant

_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, _CAPSULE_DESTRUCTOR]
_PyCapsule_IsValid = ctypes.pythonapi.PyCapsule_IsValid
_PyCapsule_IsValid.restype = ctypes.c_int
_PyCapsule_IsValid.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_PyCapsule_GetPointer = ctypes.pythonapi.PyCapsule_GetPointer
_PyCapsule_GetPointer.restype = ctypes.c_void_p
_PyCapsule_GetPointer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]

# address of a DLManagedTensor -> (the struct, its shape array, owner).
# No lock: the deleter runs wherever torch frees a storage, which includes a
# cyclic GC started by an allocation on a thread inside this module (a
# non-reentrant lock held there deadlocked it).  A dict's single setitem and
# pop need none: each is atomic under the GIL, and thread-safe on its own
# in free-threaded builds.
_live = {}


def _drop(addr):
    _live.pop(addr, None)


@_DELETER
def _deleter(managed):
    _drop(ctypes.cast(managed, ctypes.c_void_p).value)


@_CAPSULE_DESTRUCTOR
def _capsule_destructor(capsule):
    # A capsule torch consumed is renamed "used_dltensor": torch calls the
    # deleter then.  One never consumed still owns its tensor.
    if _PyCapsule_IsValid(capsule, _NAME):
        _drop(_PyCapsule_GetPointer(capsule, _NAME))


def byte_tensor(addr, nbytes, owner, device_type=KDL_CPU, device_id=0):
    """A torch.uint8 tensor of nbytes at addr that keeps owner alive."""
    import torch

    shape = (ctypes.c_int64 * 1)(nbytes)
    m = _DLManagedTensor()
    m.dl_tensor.data = addr
    m.dl_tensor.device = _DLDevice(device_type, device_id)
    m.dl_tensor.ndim = 1
    m.dl_tensor.dtype = _DLDataType(_KDL_UINT, 8, 1)
    m.dl_tensor.shape = shape
    m.dl_tensor.strides = None
    m.dl_tensor.byte_offset = 0
    m.deleter = _deleter
    key = ctypes.addressof(m)
    _live[key] = (m, shape, owner)
    capsule = _PyCapsule_New(key, _NAME, _capsule_destructor)
    return torch.from_dlpack(capsule)


def n_live():
    """How many exported byte tensors torch still holds (for tests)."""
    return len(_live)
