"""safetensors-shaped entry points served by weightd.

safe_open(path) stands in for safetensors.safe_open (0.8's signature and
methods: keys() sorted, offset_keys(), metadata(), get_tensor(),
get_tensors(), get_slice()), so safetensors.torch.load_file, load_model and
safetensors.numpy.load_file work when pointed at it.  The file is a model
for the daemon (a single .safetensors file beneath one of its model
roots); tensors are zero-copy views of the daemon's memory instead of
copies out of a page-cache mapping (numpy arrays are read-only).

As safetensors 0.8 does:
- every method of a handle whose with-block ended raises SafetensorError
  "File is closed" (a slice taken before stays usable);
- get_tensor()/get_slice() of a name not in the file, a malformed file
  (FormatError), and a refused framework, device or backend
  (InvalidArgument) raise exceptions that are also
  safetensors.SafetensorError (when safetensors is importable; the name
  not in the file is a KeyError too); a missing file is NotFound, a
  FileNotFoundError;
- get_slice(name)[index] with framework="np" takes what safetensors takes
  (ints, slices with a positive step, one Ellipsis, a tuple of those, or
  []) and refuses, with the same exception types, what it refuses: an
  index or a slice bound past the end (no clipping), negative slice
  bounds (OverflowError), None, non-empty lists.  Where safetensors
  fails with SystemError (a slice whose stop is before its start) weightd
  raises SafetensorError.  The result is a view when it is contiguous, else
  a contiguous copy.  With framework="pt" safetensors indexes a torch
  tensor with torch's own rules, and so does weightd.
- framework accepts "pt", "torch", "pytorch", "np", "numpy" (safetensors'
  "tf", "flax", "jax", "mlx", "paddle" are refused); backend ("mmap" or
  "pread", anything else is refused as safetensors does) is passed on to
  the safetensors library when falling back and otherwise ignored: the
  daemon serves the bytes.

load_file(filename, device) is safetensors.torch.load_file served so.

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
import operator
import os
import threading

from . import errors
from .client import Client, default_socket

_FALLBACK_MODES = (False, True, "always")
_BACKENDS = ("mmap", "pread")
_FRAMEWORKS = {"pt": "pt", "torch": "pt", "pytorch": "pt", "np": "np", "numpy": "np"}

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


def _safetensor_error():
    """safetensors.SafetensorError, or None where safetensors is not installed."""
    try:
        from safetensors import SafetensorError
    except ImportError:
        return None
    return SafetensorError


_as_safetensors_classes = {}


def _as_safetensors(err):
    """err as an instance of a subclass of its class and of
    safetensors.SafetensorError (err itself without safetensors).  The
    subclasses are module attributes, so the errors pickle."""
    base = _safetensor_error()
    if base is None or isinstance(err, base):
        return err
    cls = type(err)
    with _shared_lock:
        sub = _as_safetensors_classes.get(cls)
        if sub is None:
            name = f"{cls.__name__}SafetensorError"
            sub = type(name, (cls, base), {"__module__": __name__, "__qualname__": name,
                                           "__doc__": f"{cls.__name__}, also safetensors.SafetensorError."})
            globals()[name] = _as_safetensors_classes[cls] = sub
    if isinstance(err, errors.Error):
        new = sub(err.message, err.code, err.code_name)
    else:
        new = sub(*err.args)
    new.__traceback__ = err.__traceback__
    return new


class MissingTensor(KeyError):
    """get_tensor()/get_slice() of a name the file does not hold (raised
    as a safetensors.SafetensorError too where safetensors is installed)."""


def _missing(name, where):
    return _as_safetensors(MissingTensor(f"{where}: file does not contain tensor {name!r}"))


def _slicing_error(message):
    return _as_safetensors(errors.InvalidArgument(message))


_U64_END = 1 << 64
_I32 = range(-(1 << 31), 1 << 31)
_I64 = range(-(1 << 63), 1 << 63)


def _bound(value):
    """A slice's start or stop as safetensors reads it (an unsigned 64-bit
    integer or None)."""
    if value is None:
        return None
    value = operator.index(value)  # TypeError for a float, as safetensors
    if value < 0:
        raise OverflowError("can't convert negative int to unsigned")
    if value >= _U64_END:
        raise OverflowError("int too big to convert")
    return value


def _step(value):
    if value is None:
        return 1
    value = operator.index(value)
    if value not in _I64:
        raise OverflowError("Python int too large to convert to C long")
    if value <= 0:
        raise _slicing_error(f"Slice step must be a positive integer, got {value}")
    return value


def _select(item):
    """An int index (anything with __index__ in the range of a 32-bit int),
    or None."""
    if isinstance(item, (float, complex, str, bytes)):
        return None
    try:
        value = operator.index(item)
    except TypeError:
        return None
    return value if value in _I32 else None


def _np_index(index, shape):
    """The numpy basic index for safetensors' get_slice(name)[index] of a
    tensor of shape (a tuple of ints and slices, one per leading
    dimension), raising what safetensors 0.8 raises for it.

    Each entry is ("select", i) or ("narrow", start, stop, step), start and
    stop None when not given."""
    if isinstance(index, tuple):
        items = list(index)
    elif isinstance(index, list):
        if index:
            raise _slicing_error("Non empty lists are not implemented")
        items = [slice(0, 0)]
    else:
        items = [index]
    if sum(1 for it in items if it is Ellipsis) > 1:
        raise _slicing_error("Only one ellipsis (...) is allowed in slice index")
    n_expansion = max(len(shape) - sum(1 for it in items if it is not Ellipsis), 0)

    indexers = []
    for it in items:
        if it is Ellipsis:
            indexers += [("narrow", None, None, 1)] * n_expansion
        elif isinstance(it, slice):
            indexers.append(("narrow", _bound(it.start), _bound(it.stop), _step(it.step)))
        else:
            value = _select(it)
            dim = len(indexers)
            if value is None:
                raise _slicing_error(f"Unsupported slice index at position {dim}: expected slice, int, or ellipsis")
            if value < 0:
                size = shape[dim] if dim < len(shape) else 0
                if value + size < 0:
                    raise _slicing_error(f"Invalid index {value} for dimension {dim} of size {size}")
                value += size
            indexers.append(("select", value))

    def fail(why):
        shown = []
        for ix in indexers:
            if ix[0] == "select":
                shown.append(str(ix[1]))
            else:
                _, a, b, step = ix
                shown.append(f"{'' if a is None else a}:{'' if b is None else b}" + (f":{step}" if step != 1 else ""))
        raise _slicing_error(f"Error during slicing [{', '.join(shown)}] with shape {list(shape)}: {why}")

    if len(indexers) > len(shape):
        fail("more slicing indexes than dimensions in tensor")
    result = []
    for dim in reversed(range(len(indexers))):  # safetensors reports the last bad dimension
        ix, size = indexers[dim], shape[dim]
        if ix[0] == "select":
            if ix[1] >= size:
                fail(f"index {ix[1]} out of bounds for tensor dimension #{dim} of size {size}")
            result.append(ix[1])
            continue
        _, a, b, step = ix
        a = 0 if a is None else a
        b = size if b is None else b
        if a >= size:
            fail(f"index {a} out of bounds for tensor dimension #{dim} of size {size}")
        if b > size:
            fail(f"index {b - 1} out of bounds for tensor dimension #{dim} of size {size}")
        if b < a:
            fail(f"stop {b} is before start {a} in dimension #{dim}")
        result.append(slice(a, b, step))
    return tuple(reversed(result))


class _Slice:
    """get_slice(): shape and dtype without reading, then indexing as
    safetensors' does (see the module's docstring).  It keeps the tensor,
    so it outlives its handle's with-block as a safetensors slice does."""

    def __init__(self, lease, name):
        self._shape = lease.shape(name)
        self._dtype = lease.dtype(name)
        self._tensor = lease.get_tensor(name)
        self._framework = lease.framework

    def get_shape(self):
        return list(self._shape)

    def get_dtype(self):
        return self._dtype

    def __getitem__(self, index):
        t = self._tensor
        if self._framework == "pt":
            return t[index]
        import numpy as np

        # The trailing Ellipsis keeps a full selection a 0-d array, not a scalar.
        view = t[_np_index(index, list(t.shape)) + (Ellipsis,)]
        return view if view.flags.c_contiguous else np.ascontiguousarray(view)


class safe_open:
    """safe_open(filename, framework="np", device="cpu", *, backend="mmap")
    served by weightd, as safetensors.safe_open.

    framework: "pt" (torch, pytorch) or "np" (numpy).  device: "cpu", or a
    CUDA device ("cuda:N", "cuda:GPU-<uuid>", "cuda", an int, a
    torch.device) with framework="pt": tensors in the daemon's GPU tier,
    mapped into this process.  backend: checked as safetensors does, used
    only by the fallback.  Use as a context manager, as with safetensors;
    closing it releases the lease (tensors already returned stay valid) and
    every later call raises SafetensorError "File is closed"."""

    def __init__(self, filename, framework="np", device="cpu", *, backend="mmap", socket=None, fallback=False):
        self._lease = None
        self._fallback = None
        self._closed = False
        try:
            self._open(filename, framework, device, backend, socket, fallback)
        except (errors.FormatError, errors.InvalidArgument) as e:
            raise _as_safetensors(e) from None

    def _open(self, filename, framework, device, backend, socket, fallback):
        if fallback not in _FALLBACK_MODES:
            raise errors.InvalidArgument(f"fallback={fallback!r}: expected False, True or \"always\"")
        if backend not in _BACKENDS:
            raise errors.InvalidArgument(f"backend {backend!r} is invalid (expected one of: \"mmap\", \"pread\")")
        if isinstance(framework, str):
            framework = _FRAMEWORKS.get(framework, framework)
        path = os.path.abspath(os.fspath(filename))
        self._path = path
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
            self._fallback = _safetensors_open(path, framework, device, backend)
            return
        self._keys = sorted(self._lease.keys())

    def _check_open(self):
        if self._closed:
            raise _as_safetensors(errors.InvalidArgument("File is closed"))

    @property
    def served_by_weightd(self):
        """True when weightd serves the tensors; False for the fallback."""
        return self._fallback is None

    def keys(self):
        """Tensor names, sorted."""
        self._check_open()
        if self._fallback is not None:
            return self._fallback.keys()
        return list(self._keys)

    def offset_keys(self):
        """Names in the file's order (by data offset)."""
        self._check_open()
        if self._fallback is not None:
            return self._fallback.offset_keys()
        return self._lease.keys()

    def metadata(self):
        """The file's __metadata__, or None."""
        self._check_open()
        if self._fallback is not None:
            return self._fallback.metadata()
        return self._lease.metadata()

    def get_tensor(self, name):
        self._check_open()
        if self._fallback is not None:
            return self._fallback.get_tensor(name)
        if name not in self._lease:
            raise _missing(name, self._path)
        return self._lease.get_tensor(name)

    def get_tensors(self):
        """Every tensor, {name: tensor} in offset_keys() order (what
        safetensors 0.8's load_file returns)."""
        self._check_open()
        if self._fallback is not None:
            return self._fallback.get_tensors()
        return {name: self._lease.get_tensor(name) for name in self._lease.keys()}

    def get_slice(self, name):
        self._check_open()
        if self._fallback is not None:
            return self._fallback.get_slice(name)
        if name not in self._lease:
            raise _missing(name, self._path)
        return _Slice(self._lease, name)

    def close(self):
        """What leaving the with-block does."""
        if self._closed:
            return
        self._closed = True
        if self._lease is not None:
            self._lease.release()
        if self._fallback is not None:
            self._fallback.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _safetensors_open(path, framework, device, backend="mmap"):
    from safetensors import safe_open as st_safe_open

    f = st_safe_open(path, framework=framework, device=device, backend=backend)
    return f.__enter__()


def weights_iterator(files, to_cpu=True, device=None, *, async_broadcast=False, socket=None, fallback=False):
    """Yield (name, torch tensor) for every tensor of files, in the order
    FastVideo's safetensors_weights_iterator(files, to_cpu) does.

    device: None for "cpu" with to_cpu=True, else torch's current CUDA
    device (as FastVideo's local device); or any device load() takes.
    async_broadcast: FastVideo's option to read on local rank 0 and
    broadcast to the others; accepted and ignored, since every rank maps
    the daemon's one copy.  One connection serves all files; each file's
    lease ends once its tensors are gone."""
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


def load_file(filename, device="cpu", *, backend="mmap", socket=None, fallback=False):
    """safetensors.torch.load_file(filename, device, backend=) served by
    weightd: {name: torch tensor} in the file's order, each a zero-copy
    view of the daemon's memory (on a CUDA device from its GPU tier).  The
    tensors keep the file's lease; it ends when the last one is gone.
    socket and fallback as for safe_open()."""
    with safe_open(filename, framework="pt", device=device, backend=backend, socket=socket,
                   fallback=fallback) as f:
        return f.get_tensors()


def _fallback_file(path, device):
    from safetensors import safe_open as st_safe_open

    with st_safe_open(path, framework="pt", device=device) as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


safetensors_weights_iterator = weights_iterator
