"""Client and Lease: weightd's components as numpy arrays and torch tensors.

A Client is one connection to the daemon (a wd_client).  Client.load()
leases a component: libweightd-client maps its sealed slabs read-only, and
the Lease hands out arrays that are views of that memory, never copies.

Lifetime.  wd_release() ends the lease in the daemon and unmaps at once, so
it may run only when nothing points into the mapping.  Every array's base
chain ends at one _Mapping object per lease, and the Lease object holds it
too; the mapping is released by a finalizer when the last of them is gone
(Lease.release() and the context manager drop the Lease's reference).
Finalizers never block: a release that finds the client busy (another
thread's call, or a progress callback on this thread) is queued and done
when that call returns.  The C client refcounts its connection under
leases, so a Client closed or collected before its leases is safe.
"""
import collections.abc
import ctypes
import os
import threading
import weakref

from . import _dlpack, _dtypes, errors
from ._lib import PROGRESS_FN, WdError, WdPrefetchResult, check, lib, text

_FRAMEWORKS = {"np": "np", "numpy": "np", "pt": "pt", "torch": "pt"}


def _framework(framework):
    fw = _FRAMEWORKS.get(framework)
    if fw is None:
        raise errors.InvalidArgument(f'framework {framework!r}: expected "np" or "pt"')
    return fw


def _device(device):
    """The device a load targets.  Only host memory is served for now; a
    device load comes with wd_load_ex() in libweightd-client."""
    d = "cpu" if device is None else str(device)
    if d != "cpu":
        raise errors.Unsupported(f'device {d!r}: this weightd package serves "cpu" only so far')
    return d


def _model(model):
    return os.path.abspath(os.fspath(model)).encode()


def _component(component):
    return (component or "").encode()


def default_socket():
    """The socket connect() uses without one: $WEIGHTD_SOCKET, else the
    daemon's default path for this user (as libweightd-client computes it)."""
    buf = ctypes.create_string_buffer(4096)
    check(lib.wd_default_socket(buf, len(buf)), WdError(code=1, message=b"socket path too long"))
    return buf.value.decode()


class _Conn:
    """A wd_client pointer and the lock that serializes calls on it."""

    def __init__(self, ptr):
        self.ptr = ptr
        self.lock = threading.Lock()
        self.owner = None  # the thread inside a call
        self.deferred = []

    def call(self, fn, *args):
        """fn(ptr, *args, &err); raises the error's exception."""
        err = WdError()
        if self.owner == threading.get_ident():
            raise errors.InvalidArgument("a progress callback must not call its own client")
        with self.lock:
            if self.ptr is None:
                raise errors.InvalidArgument("the client is closed")
            self.owner = threading.get_ident()
            try:
                r = fn(self.ptr, *args, ctypes.byref(err))
            finally:
                self.owner = None
        self.drain()
        check(r, err)

    def release_later(self, lease_ptr):
        self.deferred.append(lease_ptr)
        self.drain()

    def drain(self):
        while self.deferred:
            if not self.lock.acquire(blocking=False):
                return  # the holder drains when its call returns
            try:
                while self.deferred:
                    lib.wd_release(self.deferred.pop(), None)
            finally:
                self.lock.release()

    def disconnect(self):
        with self.lock:
            ptr, self.ptr = self.ptr, None
        if ptr is not None:
            lib.wd_disconnect(ptr)


class _Mapping:
    """One lease's mapped memory; wd_release() runs when this object dies."""

    __slots__ = ("__weakref__", "_finalizer")

    def __init__(self, conn, lease_ptr):
        self._finalizer = weakref.finalize(self, conn.release_later, lease_ptr)
        # At interpreter exit, leave it: the process's end closes the
        # connection, which ends the lease, and no array is unmapped early.
        self._finalizer.atexit = False


class _Bytes:
    """A read-only buffer of a mapped file, as numpy's array interface."""

    __slots__ = ("__array_interface__", "_owner")

    def __init__(self, addr, nbytes, owner):
        self.__array_interface__ = {"version": 3, "shape": (nbytes,), "typestr": "|u1",
                                    "data": (addr, True)}
        self._owner = owner


class TensorInfo(tuple):
    """(name, dtype, shape, file, offset, nbytes) of one tensor."""

    __slots__ = ()
    _fields = ("name", "dtype", "shape", "file", "offset", "nbytes")

    name = property(lambda s: s[0])
    dtype = property(lambda s: s[1])
    shape = property(lambda s: s[2])
    file = property(lambda s: s[3])
    offset = property(lambda s: s[4])
    nbytes = property(lambda s: s[5])


class Lease(collections.abc.Mapping):
    """A leased component: a read-only mapping from tensor name to array,
    in the files' order (files in the manifest's order, tensors by offset).

    Arrays are views of the daemon's sealed memory: numpy arrays are
    read-only; torch tensors cannot be marked so, and writing into one
    faults (SIGSEGV), because the pages are mapped read-only."""

    def __init__(self, conn, lease_ptr, framework, device):
        self._framework = framework
        self._device = device
        self._mapping = _Mapping(conn, lease_ptr)
        self._id = lib.wd_lease_id(lease_ptr)
        m = lib.wd_lease_manifest(lease_ptr)
        self._model = text(lib.wd_manifest_model(m))
        self._component = text(lib.wd_manifest_component(m))
        n_files = lib.wd_manifest_n_files(m)
        self._files = [text(lib.wd_manifest_file(m, i)) for i in range(n_files)]
        self._metadata = []
        for f in range(n_files):
            k, v = ctypes.c_char_p(), ctypes.c_char_p()
            md = {}
            for i in range(lib.wd_manifest_n_metadata(m, f)):
                if lib.wd_manifest_metadata(m, f, i, ctypes.byref(k), ctypes.byref(v)) == 0:
                    md[text(k.value)] = text(v.value)
            self._metadata.append(md)
        self._tensors = {}  # name -> (TensorInfo, data address)
        spans = {}  # file -> [base address, end offset]
        get = lib.wd_manifest_tensor
        for i in range(lib.wd_manifest_n_tensors(m)):
            t = get(m, i).contents
            ndim = t.ndim
            shape = tuple(t.shape[:ndim]) if ndim else ()
            name = t.name.decode("utf-8", "surrogateescape")
            info = TensorInfo((name, t.dtype.decode(), shape, t.file, t.offset, t.nbytes))
            data = t.data or 0
            self._tensors[name] = (info, data)
            if data:
                span = spans.get(t.file)
                end = t.offset + t.nbytes
                if span is None:
                    spans[t.file] = [data - t.offset, end]
                elif end > span[1]:
                    span[1] = end
        self._spans = spans
        self._bases = {}  # file -> numpy or torch byte array over its mapping

    # ---- the mapping ----

    def _live(self):
        if self._mapping is None:
            raise errors.InvalidArgument(f"lease {self._id} of {self._model} was released")

    def __getitem__(self, name):
        return self.get_tensor(name)

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self):
        return len(self._tensors)

    def __contains__(self, name):
        return name in self._tensors

    def keys(self):
        """Tensor names in the files' order."""
        return list(self._tensors)

    def info(self, name):
        """The tensor's TensorInfo (name, dtype, shape, file, offset, nbytes)."""
        try:
            return self._tensors[name][0]
        except KeyError:
            raise KeyError(f"{self._model}: no tensor {name!r}") from None

    def dtype(self, name):
        """The tensor's dtype as safetensors spells it ("BF16", "F8_E4M3")."""
        return self.info(name).dtype

    def shape(self, name):
        return list(self.info(name).shape)

    def metadata(self, file=0):
        """The file's __metadata__ (the first file's by default; shards of
        one checkpoint carry the same), or None when it has none."""
        if not self._files:
            return None
        return dict(self._metadata[file]) or None

    def files(self):
        return list(self._files)

    @property
    def model(self):
        return self._model

    @property
    def component(self):
        return self._component

    @property
    def id(self):
        return self._id

    @property
    def framework(self):
        return self._framework

    def get_tensor(self, name):
        """The tensor as a zero-copy view: a read-only numpy array, or a
        torch tensor (framework "pt")."""
        self._live()
        try:
            info, data = self._tensors[name]
        except KeyError:
            raise KeyError(f"{self._model}: no tensor {name!r}") from None
        return _ARRAY[self._framework](self, info, data)

    # ---- ending it ----

    def release(self):
        """End the lease for good: the memory is unmapped and the daemon's
        lease ends as soon as no array from it is alive (at once if none
        is).  Later get_tensor() calls raise."""
        self._mapping = None
        self._bases.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __repr__(self):
        state = "released" if self._mapping is None else f"{len(self)} tensors"
        comp = f" {self._component}" if self._component else ""
        return f"<weightd.Lease {self._id} {self._model}{comp}: {state}>"

    # ---- arrays ----

    def _base(self, info):
        base = self._bases.get(info.file)
        if base is None:
            addr, end = self._spans[info.file]
            if self._framework == "pt":
                base = _dlpack.byte_tensor(addr, end, self._mapping)
            else:
                import numpy as np
                base = np.asarray(_Bytes(addr, end, self._mapping))
            self._bases[info.file] = base
        return base


def _numpy_array(lease, info, data):
    import numpy as np

    dt, _real = _dtypes.numpy_type(info.dtype)
    shape = info.shape
    if dt is None:
        dt, shape = np.dtype(np.uint8), _dtypes.packed_shape(info.dtype, shape, info.nbytes)
    if info.nbytes == 0 or not data:
        a = np.empty(shape, dt)  # nothing to share: no bytes
        a.flags.writeable = False
        return a
    return np.ndarray(shape, dt, buffer=lease._base(info), offset=info.offset)


def _torch_tensor(lease, info, data):
    import torch

    dt = _dtypes.torch_type(info.dtype)
    shape = info.shape
    if dt is None or dt is getattr(torch, "float4_e2m1fn_x2", None):
        # Packed sub-byte values: bytes.  F4 in pairs along the last
        # dimension is float4_e2m1fn_x2 (as safetensors gives it), an odd
        # last dimension plain bytes.
        shape = _dtypes.packed_shape(info.dtype, shape, info.nbytes)
        if dt is None or not info.shape or shape[-1] * 2 != info.shape[-1]:
            dt = torch.uint8
    if info.nbytes == 0 or not data:
        return torch.empty(shape, dtype=dt)
    size = dt.itemsize
    if info.offset % size == 0:
        b = lease._base(info)[info.offset:info.offset + info.nbytes]
    else:
        # torch views a byte tensor as a wider type only at a storage offset
        # that the width divides: give this tensor a storage of its own.
        b = _dlpack.byte_tensor(data, info.nbytes, lease._mapping)
    if size != 1 or dt != torch.uint8:
        b = b.view(dt)
    return b.view(shape)


_ARRAY = {"np": _numpy_array, "pt": _torch_tensor}


class Client:
    """One connection to weightd.  Thread-safe; calls are serialized."""

    def __init__(self, socket=None):
        ptr = ctypes.c_void_p()
        err = WdError()
        path = None if socket is None else os.fspath(socket).encode()
        check(lib.wd_connect(path, ctypes.byref(ptr), ctypes.byref(err)), err)
        self._conn = _Conn(ptr)
        self._finalizer = weakref.finalize(self, self._conn.disconnect)
        self.socket = os.fspath(socket) if socket is not None else default_socket()

    def close(self):
        """Drop this connection; leases still alive keep it open until they end."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def load(self, model, component=None, device="cpu", framework="np"):
        """Lease a component (reading it if it is not resident): a Lease,
        a read-only mapping from tensor name to array."""
        fw = _framework(framework)
        dev = _device(device)
        lease = ctypes.c_void_p()
        self._conn.call(lib.wd_load, _model(model), _component(component), ctypes.byref(lease))
        return Lease(self._conn, lease, fw, dev)

    def prefetch(self, model, components=None, progress=None):
        """Make components resident without leasing them.  components: None
        (the model's only component, or "" ), a name, or a list of names.
        progress(component, done, total) is called as bytes arrive; a true
        return value cancels (weightd.Cancelled).  Returns {component:
        {"bytes": n, "was_resident": bool}}."""
        if components is None or isinstance(components, str):
            components = [components or ""]
        out = {}
        for comp in components:
            cb = PROGRESS_FN()
            failure = []
            if progress is not None:
                def fn(done, total, _ud, comp=comp):
                    try:
                        return 1 if progress(comp, done, total) else 0
                    except BaseException as e:  # an exception cancels, then is raised
                        failure.append(e)
                        return 1
                cb = PROGRESS_FN(fn)
            res = WdPrefetchResult()
            try:
                self._conn.call(lib.wd_prefetch, _model(model), _component(comp), cb, None, ctypes.byref(res))
            except errors.Cancelled:
                if failure:
                    raise failure[0] from None
                raise
            out[comp] = {"bytes": res.bytes, "was_resident": bool(res.was_resident)}
        return out

    def evict(self, model, component=None):
        self._conn.call(lib.wd_evict, _model(model), _component(component))

    def pin(self, model, component=None):
        self._conn.call(lib.wd_pin, _model(model), _component(component))

    def unpin(self, model, component=None):
        self._conn.call(lib.wd_unpin, _model(model), _component(component))

    def list(self):
        """The daemon's entries, most recently used first, as dicts."""
        from ._lib import WdEntry

        entries = ctypes.POINTER(WdEntry)()
        n = ctypes.c_size_t()
        self._conn.call(lib.wd_list, ctypes.byref(entries), ctypes.byref(n))
        try:
            out = []
            for i in range(n.value):
                e = entries[i]
                out.append({"model": text(e.model), "component": text(e.component), "tier": text(e.tier),
                            "state": text(e.state), "bytes": e.bytes, "leases": e.leases,
                            "pinned": bool(e.pinned), "files": e.files, "idle_ms": e.idle_ms,
                            "shard": text(e.shard) or ""})
            return out
        finally:
            lib.wd_entries_free(entries, n)

    def status(self):
        """The daemon's counters as a dict."""
        from ._lib import WdStatus

        s = ctypes.POINTER(WdStatus)()
        self._conn.call(lib.wd_status_get, ctypes.byref(s))
        try:
            v = s.contents
            out = {k: getattr(v, k) for k in ("pid", "uptime_ms", "host_budget_bytes", "host_used_bytes",
                                              "host_evictable_bytes", "storage_read_bytes", "leases",
                                              "connections", "entries", "loading", "evictions")}
            out["version"] = text(v.version)
            out["socket"] = text(v.socket)
            out["hugetlb"] = bool(v.hugetlb)
            out["model_roots"] = [text(v.model_roots[i]) for i in range(v.n_model_roots)]
            out["gpu"] = text(v.gpu)
            return out
        finally:
            lib.wd_status_free(s)


def connect(socket=None):
    """Connect to weightd at socket (default: $WEIGHTD_SOCKET, then the
    daemon's default path)."""
    return Client(socket)
