"""safetensors-shaped entry points served by weightd.

safe_open(path) is the part of safetensors.safe_open that model loaders
use: keys() (sorted, as safetensors gives them), get_tensor(), get_slice()
and metadata().  The file is a model for the daemon (a single .safetensors
file beneath one of its model roots); tensors are zero-copy views of the
daemon's memory instead of copies out of a page-cache mapping.

weights_iterator(files) yields (name, tensor) as FastVideo's
safetensors_weights_iterator(files, to_cpu) does: files in the given
order, names in safe_open(file).keys() order, torch tensors; on the host
with to_cpu=True, else on the device (torch's current CUDA device unless
device names one), served from the daemon's GPU tier.

Fallback.  fallback=True reads the file with the safetensors library when
no daemon answers (connect() raises Unavailable).  fallback="always" also
does when the daemon answers but refuses the file (for example a file
outside every model root: PermissionDenied).  By default every failure is
raised, naming the socket and the daemon's message.

Connections.  Every safe_open() of a process shares one Client per socket
(weights_iterator() uses one of its own), so holding the handles or the
tensors of a checkpoint of many files takes one connection, not one per
file: the daemon limits connections per uid.  The shared client stays open
for the process's life; a forked child gets its own.
"""
import os
import threading

from . import errors
from .client import Client, default_socket

_FALLBACK_MODES = (False, True, "always")

# socket path -> the Client every safe_open() of this process uses there
_shared = {}
_shared_lock = threading.Lock()


def _shared_key(socket):
    return default_socket() if socket is None else os.path.abspath(os.fspath(socket))


def _shared_client(socket):
    """The process's Client for socket, connecting the first time (raises as
    connect() does)."""
    key = _shared_key(socket)
    with _shared_lock:
        client = _shared.get(key)
        if client is None:
            client = _shared[key] = Client(key)
        return client


def _forget_shared(client):
    """Stop handing out client (its connection broke): the next safe_open()
    connects again.  Its leases keep it open while they live."""
    with _shared_lock:
        if _shared.get(client.socket) is client:
            del _shared[client.socket]


def _after_fork_in_child():
    # The inherited clients are the parent's connections; the lock may have
    # been held by a parent's thread.
    global _shared_lock
    _shared_lock = threading.Lock()
    _shared.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _connect_or_fallback(socket, fallback, connect=Client):
    """A Client, or None when the caller should fall back."""
    try:
        return connect(socket)
    except errors.Unavailable as e:
        if fallback:
            return None
        raise errors.Unavailable(f"{e.message} (no weightd daemon answers; safe_open(..., fallback=True) "
                                 "reads the file with the safetensors library instead)") from None


class _Slice:
    """get_slice(): shape and dtype without reading, then basic indexing."""

    def __init__(self, handle, name):
        self._handle = handle
        self._name = name

    def get_shape(self):
        return self._handle._lease.shape(self._name)

    def get_dtype(self):
        return self._handle._lease.dtype(self._name)

    def __getitem__(self, index):
        # A slice of dimension 0 is a contiguous, zero-copy view; other
        # indexing is the framework's own on that view.
        return self._handle.get_tensor(self._name)[index]


class safe_open:
    """safe_open(path, framework="np"|"pt", device="cpu") served by weightd.

    device: "cpu", or a CUDA device ("cuda:N", "cuda:GPU-<uuid>", "cuda",
    an int, a torch.device) with framework="pt": tensors in the daemon's
    GPU tier, mapped into this process.  Use as a context manager, as with
    safetensors; closing it releases the lease (tensors already returned
    stay valid)."""

    def __init__(self, filename, framework="np", device="cpu", *, socket=None, fallback=False):
        if fallback not in _FALLBACK_MODES:
            raise errors.InvalidArgument(f"fallback={fallback!r}: expected False, True or \"always\"")
        self._lease = None
        self._fallback = None
        path = os.path.abspath(os.fspath(filename))
        # The process's shared client; one whose connection broke (a daemon
        # restart) is replaced once.
        for attempt in (1, 2):
            client = _connect_or_fallback(socket, fallback, _shared_client)
            if client is None:
                break
            try:
                self._lease = client.load(path, None, device=device, framework=framework)
            except errors.Unavailable:
                _forget_shared(client)
                if attempt == 1:
                    continue
                if fallback != "always":
                    raise
            except errors.Error:
                if fallback != "always":
                    raise
            break
        if self._lease is None:
            self._fallback = _safetensors_open(path, framework, device)
            return
        self._keys = sorted(self._lease.keys())

    @property
    def served_by_weightd(self):
        """True when weightd serves the tensors; False for the fallback."""
        return self._fallback is None

    def keys(self):
        if self._fallback is not None:
            return self._fallback.keys()
        return list(self._keys)

    def offset_keys(self):
        """Names in the file's order (by data offset)."""
        if self._fallback is not None:
            return self._fallback.offset_keys()
        return self._lease.keys()

    def metadata(self):
        if self._fallback is not None:
            return self._fallback.metadata()
        return self._lease.metadata()

    def get_tensor(self, name):
        if self._fallback is not None:
            return self._fallback.get_tensor(name)
        return self._lease.get_tensor(name)

    def get_slice(self, name):
        if self._fallback is not None:
            return self._fallback.get_slice(name)
        self._lease.info(name)  # KeyError now, not at indexing
        return _Slice(self, name)

    def close(self):
        if self._lease is not None:
            self._lease.release()
        if self._fallback is not None:
            self._fallback.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _safetensors_open(path, framework, device):
    from safetensors import safe_open as st_safe_open

    f = st_safe_open(path, framework=framework, device=device)
    return f.__enter__()


def weights_iterator(files, to_cpu=True, device=None, *, socket=None, fallback=False):
    """Yield (name, torch tensor) for every tensor of files, in the order
    FastVideo's safetensors_weights_iterator(files, to_cpu) does.

    device: None for "cpu" with to_cpu=True, else torch's current CUDA
    device (as FastVideo's local device); or any device load() takes.
    One connection serves all files; each file's lease ends once its
    tensors are gone."""
    if device is None:
        device = "cpu" if to_cpu else "cuda"
    if fallback not in _FALLBACK_MODES:
        raise errors.InvalidArgument(f"fallback={fallback!r}: expected False, True or \"always\"")
    client = _connect_or_fallback(socket, fallback)
    try:
        for f in files:
            path = os.path.abspath(os.fspath(f))
            if client is None:
                yield from _fallback_file(path, device)
                continue
            try:
                lease = client.load(path, None, device=device, framework="pt")
            except errors.Error:
                if fallback != "always":
                    raise
                yield from _fallback_file(path, device)
                continue
            with lease:
                for name in sorted(lease.keys()):
                    yield name, lease.get_tensor(name)
    finally:
        if client is not None:
            client.close()


def _fallback_file(path, device):
    from safetensors import safe_open as st_safe_open

    with st_safe_open(path, framework="pt", device=device) as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


safetensors_weights_iterator = weights_iterator
