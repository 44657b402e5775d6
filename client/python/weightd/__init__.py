"""weightd: model weights from the weightd daemon as numpy arrays and torch
tensors, without copies.

    import weightd
    with weightd.connect() as client, client.load("/srv/models/flux", "vae", framework="pt") as vae:
        w = vae["decoder.conv_in.weight"]          # a torch tensor over the daemon's memory

Also safe_open() and load_file() (drop-ins for safetensors.safe_open and
safetensors.torch.load_file), weights_iterator()
(FastVideo's safetensors_weights_iterator, served by weightd).  Everything
goes through libweightd-client (ctypes): the protocol exists once, in C.
"""
from ._lib import lib as _lib
from .client import Client, Lease, Shard, TensorInfo, connect, default_socket
from .errors import (Busy, Cancelled, Error, FormatError, Internal, InvalidArgument, IoError, NotFound,
                     PermissionDenied, ProtocolError, ResourceExhausted, Unavailable, Unsupported)
from .safetensors_compat import load_file, safe_open, safetensors_weights_iterator, weights_iterator

__version__ = "0.2.0"


def library_version():
    """The version of the libweightd-client this package uses."""
    return _lib.wd_version().decode()


__all__ = [
    "Client", "Lease", "Shard", "TensorInfo", "connect", "default_socket", "safe_open", "load_file",
    "weights_iterator", "safetensors_weights_iterator", "library_version",
    "Error", "InvalidArgument", "NotFound", "PermissionDenied", "FormatError", "IoError",
    "ResourceExhausted", "Unavailable", "Cancelled", "Internal", "Unsupported", "Busy", "ProtocolError",
]
