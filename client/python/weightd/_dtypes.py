"""The safetensors dtypes and what each becomes in numpy and in torch.

Every dtype maps to the framework's own type where one exists.  Where none
does, the array is a view of the same bytes as an unsigned integer of the
same width (numpy without ml_dtypes: BF16 as uint16, the F8 kinds as
uint8) and Lease.dtype() still names the real dtype.  Nothing is widened
or converted.

Packed sub-byte dtypes (F4: two values per byte; F6_*: four values in three
bytes) have no unpacked equivalent that keeps the bytes: they come as uint8
arrays of the packed bytes, the last dimension scaled to bytes (as
safetensors does for F4 in torch, whose float4_e2m1fn_x2 holds two values
per element), or one flat dimension when it does not divide.
"""
import math

# safetensors dtype -> size of one element in bits
BITS = {
    "BOOL": 8, "U8": 8, "I8": 8,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}

# numpy: dtypes numpy has itself.
_NUMPY_NATIVE = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
    "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64", "U64": "uint64",
    "F64": "float64", "C64": "complex64",
}
# numpy: dtypes that ml_dtypes provides (attribute names in ml_dtypes).
_ML_DTYPES = {
    "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
}
# torch: attribute names in torch.
_TORCH = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64",
    "U64": "uint64", "F64": "float64", "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F4": "float4_e2m1fn_x2",
}
_UNSIGNED = {8: "uint8", 16: "uint16", 32: "uint32", 64: "uint64"}


def packed_shape(dtype, shape, nbytes):
    """The shape of the uint8 view of a packed sub-byte tensor."""
    bits = BITS.get(dtype)
    if bits is not None and shape and (shape[-1] * bits) % 8 == 0:
        return tuple(shape[:-1]) + (shape[-1] * bits // 8,)
    return (nbytes,)


def numpy_type(dtype):
    """(numpy dtype, is the real type) for a safetensors dtype, or (None,
    False) for a packed sub-byte or unknown dtype (served as uint8 bytes)."""
    import numpy as np

    name = _NUMPY_NATIVE.get(dtype)
    if name:
        return np.dtype(name), True
    name = _ML_DTYPES.get(dtype)
    if name:
        try:
            import ml_dtypes
            return np.dtype(getattr(ml_dtypes, name)), True
        except (ImportError, AttributeError):
            return np.dtype(_UNSIGNED[BITS[dtype]]), False
    return None, False


def torch_type(dtype):
    """(torch dtype, element bytes) for a safetensors dtype, or (None, 1) for
    one torch lacks (served as uint8 bytes, or the same-width unsigned type)."""
    import torch

    name = _TORCH.get(dtype)
    t = getattr(torch, name, None) if name else None
    if t is not None:
        return t
    bits = BITS.get(dtype)
    if bits in (8, 16, 32, 64):
        return getattr(torch, _UNSIGNED[bits])
    return None


def numel(shape):
    return math.prod(shape)
