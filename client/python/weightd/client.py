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

fork().  A connection belongs to the process that opened it (it records
the pid).  In a forked child (multiprocessing's "fork", DataLoader workers)
every inherited connection is foreign: os.register_at_fork gives it a fresh
lock (a parent's thread may have held it), its calls raise
weightd.Unavailable, and a finalizer of an inherited Lease only unmaps the
child's copy, so the parent's lease in the daemon stays.  A child that
needs the daemon connects again.
"""
import collections.abc
import ctypes
import dataclasses
import functools
import gc
import os
import threading
import weakref

from . import _dlpack, _dtypes, errors
from ._lib import (PROGRESS_FN, WdClusterInfo, WdClusterOptions, WdClusterPart, WdClusterPrefetchResult, WdError, WdLoadOptions,
                   WdPrefetchResult, WdShardRule, WdTensor, check, lib, text)

_FRAMEWORKS = {"np": "np", "numpy": "np", "pt": "pt", "torch": "pt"}


def _framework(framework):
    fw = _FRAMEWORKS.get(framework)
    if fw is None:
        raise errors.InvalidArgument(f'framework {framework!r}: expected "np" or "pt"')
    return fw


_HOST = ("cpu", "host", "")


def _device(device):
    """The device a load targets, as libweightd-client names it: None for
    host memory ("cpu", "host", None), else "cuda:N" or "cuda:GPU-<uuid>".
    Takes strings, torch.device objects and CUDA ordinals (ints, as
    safetensors does); "cuda" alone is torch's current device.  Anything
    else goes to the library, which refuses it with INVALID_ARGUMENT."""
    if device is None:
        return None
    if isinstance(device, bool):
        raise errors.InvalidArgument(f"device {device!r}: expected \"cpu\", \"cuda:N\" or \"cuda:GPU-<uuid>\"")
    if isinstance(device, int):
        if device < 0:
            raise errors.InvalidArgument(f"device {device}: a CUDA ordinal is not negative")
        return f"cuda:{device}"
    d = str(device)
    if d in _HOST or d.startswith("cpu:"):
        return None
    if d == "cuda":
        return f"cuda:{_torch_current_device()}"
    return d


def _torch_current_device():
    """torch's current CUDA ordinal, 0 where torch cannot tell (no torch, no
    CUDA): the library then says why the device cannot be served."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.current_device()
    except Exception:  # noqa: BLE001 (any failure of torch's CUDA means "ask the library")
        pass
    return 0


def _torch_cuda_init():
    """Initialise torch's CUDA before a device load, so that the slab is
    mapped where torch's context sees it; failures are left to the load
    (whose error names the real reason) and to _torch_cuda_check()."""
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.init()
            torch.cuda.current_device()
    except Exception:  # noqa: BLE001
        pass


def _torch_cuda_check(device):
    import torch
    if not torch.cuda.is_available():
        raise errors.Unsupported(f"device {device!r}: this torch ({torch.__version__}) cannot use CUDA, "
                                 "so it cannot hold the lease's device memory")
    torch.cuda.init()


@dataclasses.dataclass
class Shard:
    """This rank's part of a sharded load: tensors whose name matches a
    rule's pattern (a glob as fnmatch(3) without flags: "*" also matches
    ".") are split along the rule's dim (0 or 1) into world parts, and this
    rank gets part rank; the first matching rule wins, other tensors come
    whole.  A dimension world does not divide is an error unless uneven is
    set (then the first size % world ranks get one more index).  tensors:
    only the tensors whose name matches one of these globs (a pipeline
    stage; Shard(tensors=[...]) alone takes them whole); none: all."""

    rank: int = 0
    world: int = None  # required, but with tensors alone (then 1)
    rules: list = dataclasses.field(default_factory=list)
    uneven: bool = False
    tensors: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.world is None:
            if not self.tensors or self.rules:
                raise errors.InvalidArgument("shard: world is required (only tensors alone imply world 1)")
            self.world = 1
        for what in ("rank", "world"):
            v = getattr(self, what)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise errors.InvalidArgument(f"shard {what} {v!r}: expected an integer >= 0")
        rules = self.rules
        if isinstance(rules, collections.abc.Mapping):
            rules = list(rules.items())
        elif isinstance(rules, (str, bytes)) or not isinstance(rules, collections.abc.Iterable):
            raise errors.InvalidArgument(f"shard rules {rules!r}: expected [(pattern, dim), ...]")
        out = []
        for rule in rules:
            try:
                pattern, dim = rule
            except (TypeError, ValueError):
                raise errors.InvalidArgument(f"shard rule {rule!r}: expected (pattern, dim)") from None
            if not isinstance(pattern, str):
                raise errors.InvalidArgument(f"shard rule {rule!r}: the pattern must be a str")
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
                raise errors.InvalidArgument(f"shard rule {rule!r}: dim must be an integer >= 0")
            out.append((pattern, dim))
        self.rules = out
        self.uneven = bool(self.uneven)
        tensors = self.tensors
        if isinstance(tensors, (str, bytes)) or not isinstance(tensors, collections.abc.Iterable):
            raise errors.InvalidArgument(f"shard tensors {tensors!r}: expected a list of patterns")
        tensors = list(tensors)
        for t in tensors:
            if not isinstance(t, str):
                raise errors.InvalidArgument(f"shard tensors {tensors!r}: each pattern must be a str")
        self.tensors = tensors


def _shard(shard):
    if shard is None or isinstance(shard, Shard):
        return shard
    if isinstance(shard, collections.abc.Mapping):
        unknown = set(shard) - {f.name for f in dataclasses.fields(Shard)}
        if unknown:
            raise errors.InvalidArgument(f"shard: unknown keys {sorted(unknown)} (rank, world, rules, uneven, "
                                         "tensors)")
        try:
            return Shard(**shard)
        except TypeError as e:
            raise errors.InvalidArgument(f"shard {dict(shard)!r}: {e}") from None
    raise errors.InvalidArgument(f"shard {shard!r}: expected a weightd.Shard, a dict or None")


def _options(device, shard, progress=None, names=None):
    """wd_load_options for a device (None: host), a Shard and tensor names;
    the ctypes objects it points at stay referenced by the struct (ctypes
    keeps them in its _objects) for as long as it lives."""
    o = WdLoadOptions()
    if device is not None:
        o.device = device.encode()
    if shard is not None:
        _shard_fields(o, shard)
    if names:
        o.names = (ctypes.c_char_p * len(names))(*names)
        o.n_names = len(names)
    o.progress = progress if progress is not None else PROGRESS_FN()
    return o


def _names(tensors):
    """load()'s tensors: None, or a list of exact names, encoded."""
    if tensors is None:
        return None
    if isinstance(tensors, (str, bytes)) or not isinstance(tensors, collections.abc.Iterable):
        raise errors.InvalidArgument(f"tensors {tensors!r}: expected a list of tensor names")
    out = []
    for t in tensors:
        if not isinstance(t, str) or not t:
            raise errors.InvalidArgument(f"tensors: {t!r} is not a tensor name (a non-empty str)")
        out.append(t.encode("utf-8", "surrogateescape"))
    if not out:
        raise errors.InvalidArgument("tensors: an empty list names no tensor (None leases every one)")
    return out


def _shard_fields(o, shard):
    """Set rank, world, rules, uneven and tensors of o (wd_load_options or
    wd_cluster_part) from a Shard."""
    o.rank, o.world, o.uneven = shard.rank, shard.world, int(shard.uneven)
    if shard.rules:
        rules = (WdShardRule * len(shard.rules))()
        for i, (pattern, dim) in enumerate(shard.rules):
            rules[i].pattern = pattern.encode("utf-8", "surrogateescape")
            rules[i].dim = dim
        o.rules = rules
        o.n_rules = len(shard.rules)
    if shard.tensors:
        o.tensors = (ctypes.c_char_p * len(shard.tensors))(*(t.encode("utf-8", "surrogateescape")
                                                             for t in shard.tensors))
        o.n_tensors = len(shard.tensors)


def _model(model):
    return os.path.abspath(os.fspath(model)).encode()


def _component(component):
    return (component or "").encode()


def _cluster_device(device):
    """A cluster prefetch's device: None (host memory), or b"cuda:N", N the
    daemons' index (not this process's ordinal: each node has its own)."""
    if device is None or device == "cpu" or device == "host":
        return None
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        return f"cuda:{device}".encode()
    if isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit():
        return device.encode()
    raise errors.InvalidArgument(f"device {device!r}: a cluster prefetch takes \"cuda:N\" (the daemons' index) "
                                 "or \"cpu\"")


def _parts(names, node_shards, node_devices=None):
    """The wd_cluster_part array of a part plan: the nodes of names (whole
    unless node_shards has them), then node_shards' and node_devices' other
    nodes; None without either."""
    if node_shards is None and node_devices is None:
        return None
    for what, m in (("node_shards", node_shards), ("node_devices", node_devices)):
        if m is not None and not isinstance(m, collections.abc.Mapping):
            raise errors.InvalidArgument(f"{what} {m!r}: expected {{node: ...}}")
    shards = {}
    for node, sh in (node_shards or {}).items():
        shards[_nodes(node)[0]] = _shard(sh)
    devices = {}
    for node, dev in (node_devices or {}).items():
        devices[_nodes(node)[0]] = b"host" if dev in ("cpu", "host") else _cluster_device(dev)
    order = list(names) + [n for n in shards if n not in names]
    order += [n for n in devices if n not in order]
    if not order:
        raise errors.InvalidArgument("node_shards: no node named")
    arr = (WdClusterPart * len(order))()
    for i, n in enumerate(order):
        arr[i].node = n
        if shards.get(n) is not None:
            _shard_fields(arr[i], shards[n])
        if n in devices:
            arr[i].device = devices[n]
    return arr


def _nodes(nodes):
    """The node names of a cluster prefetch: None (every node), a name, or
    an iterable of names; their validity is the daemon's to judge."""
    if nodes is None:
        return []
    if isinstance(nodes, (str, bytes)):
        nodes = [nodes]
    out = []
    for n in nodes:
        if isinstance(n, bytes):
            out.append(n)
        elif isinstance(n, str):
            out.append(n.encode("utf-8", "surrogateescape"))
        else:
            raise errors.InvalidArgument(f"nodes: {n!r} is not a node name")
    return out


def _cluster_dict(ci):
    """A wd_cluster_info as a dict; the same keys whether the daemon has a
    cluster (enabled) or not."""
    return {
        "enabled": bool(ci.enabled),
        "node": text(ci.node),
        "generation": ci.generation,
        "nodes": [{"name": text(x.name), "address": text(x.address), "state": text(x.state),
                   "generation": x.generation, "rtt_us": x.rtt_us, "sent_bytes": x.sent_bytes,
                   "received_bytes": x.received_bytes, "last_error": text(x.last_error), "since_ms": x.since_ms}
                  for x in (ci.nodes[i] for i in range(ci.n_nodes))],
        "peer_sent_bytes": ci.peer_sent_bytes,
        "peer_received_bytes": ci.peer_received_bytes,
        "storage_saved_bytes": ci.storage_saved_bytes,
        "gpu_lane": text(ci.gpu_lane),
        "lane_sent_bytes": ci.lane_sent_bytes,
        "lane_received_bytes": ci.lane_received_bytes,
    }


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
        self.pid = os.getpid()  # the process that connected
        _conns.add(self)

    @property
    def foreign(self):
        """This process was forked from the one that connected."""
        return self.pid != os.getpid()

    def call(self, fn, *args):
        """fn(ptr, *args, &err); raises the error's exception."""
        err = WdError()
        if self.foreign:
            # libweightd-client refuses it too, without its lock; this says
            # so before ours, which a parent's thread may have held.
            raise errors.Unavailable(f"this weightd client was connected by process {self.pid}, not by this "
                                     f"one ({os.getpid()}): a process forked from it must connect again")
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
        if self.foreign:
            # An inherited lease: wd_release() in a child only unmaps this
            # process's copy and never sends on the parent's socket.
            lib.wd_release(lease_ptr, None)
            return
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

    def _after_fork_in_child(self):
        # The parent's lock may have been held by a thread the child does
        # not have.  Releases the parent had queued become the child's
        # unmapping of its copies (wd_release() sends nothing in a child).
        self.lock = threading.Lock()
        self.owner = None
        deferred, self.deferred = self.deferred, []
        for lease_ptr in deferred:
            lib.wd_release(lease_ptr, None)

    def disconnect(self):
        with self.lock:
            ptr, self.ptr = self.ptr, None
        if ptr is not None:
            lib.wd_disconnect(ptr)


# Every live connection, to mark it foreign in a forked child.
_conns = weakref.WeakSet()


def _after_fork_in_child():
    for conn in list(_conns):
        conn._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


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


# get_tensor() calls served one tensor at a time before a lease builds every
# array at once: a few cost microseconds each, all of them one bulk pass.
_BULK_AFTER = 64


@functools.cache
def _tensor_dtype():
    """wd_tensor's fields that _Table reads, as a numpy structured dtype."""
    import numpy as np
    fields = {"ndim": "u4", "nbytes": "u8", "file": "u4", "offset": "u8", "data": "u8", "full_shape": "u8",
              "device": "i4", "device_ptr": "u8"}
    return np.dtype({"names": list(fields), "formats": list(fields.values()),
                     "offsets": [getattr(WdTensor, f).offset for f in fields], "itemsize": ctypes.sizeof(WdTensor)})


def _records(m, n, copy=True):
    """The manifest's wd_tensor array as a numpy structured array (a view of
    the manifest's own memory where copy is false)."""
    import numpy as np

    if not n:
        return np.zeros(0, _tensor_dtype())
    raw = (ctypes.c_char * (n * ctypes.sizeof(WdTensor))).from_address(lib.wd_manifest_tensors(m))
    rec = np.frombuffer(raw, _tensor_dtype())
    return rec.copy() if copy else rec


def _addresses(rec):
    """(on_device, address) per record: a GPU tensor's device pointer, else
    its host address (0 where it has none)."""
    import numpy as np

    on_device = (rec["device"] >= 0) & (rec["device_ptr"] != 0)
    return on_device, np.where(on_device, rec["device_ptr"], rec["data"])


class _Table:
    """Every tensor of a lease's manifest, read in four calls
    (wd_manifest_tensors(), wd_manifest_names(), wd_manifest_dtype_codes(),
    wd_manifest_shapes()) into numpy arrays indexed as wd_manifest_tensor(),
    plus the names as a list; each dtype is a code into the distinct
    spellings (kinds).  The name index and TensorInfo tuples are made on
    demand."""

    def __init__(self, m, n):
        import numpy as np

        self.n = n
        size = lib.wd_manifest_names_size(m)
        buf = ctypes.create_string_buffer(size + 1)
        r = lib.wd_manifest_names(m, buf, size)
        check(r, WdError(code=r, message=b"the manifest's names changed size"))
        self.names = buf.raw[:size].decode("utf-8", "surrogateescape").split("\0")[:n]
        codes = np.zeros(n, np.uint8)
        kinds = (ctypes.c_char_p * 256)()
        n_kinds = ctypes.c_size_t()
        r = lib.wd_manifest_dtype_codes(m, codes.ctypes.data, n, kinds, 256, ctypes.byref(n_kinds))
        if r == errors.ResourceExhausted.code:  # more than 256 distinct dtypes: read each
            dtypes = [lib.wd_manifest_tensor(m, i).contents.dtype.decode("utf-8", "surrogateescape")
                      for i in range(n)]
            self.kinds = sorted(set(dtypes))
            code = {d: k for k, d in enumerate(self.kinds)}
            self.dcodes = np.fromiter(map(code.__getitem__, dtypes), np.intp, n)
        else:
            check(r, WdError(code=r, message=b"the manifest's dtypes could not be read"))
            self.kinds = [kinds[k].decode("utf-8", "surrogateescape") for k in range(n_kinds.value)]
            self.dcodes = codes.astype(np.intp)
        self._index = None

        rec = _records(m, n, copy=False)  # each field kept is copied out below
        ndim = rec["ndim"].astype(np.intp)
        n_dims = int(ndim.sum())
        dims = np.zeros(n_dims, np.uint64)
        r = lib.wd_manifest_shapes(m, dims.ctypes.data, n_dims)
        check(r, WdError(code=r, message=b"the manifest's shapes changed size"))
        # A tensor's shape is dims[starts[i]:starts[i] + ndims[i]].
        self.dims, self.ndims, self.starts = dims.astype(np.int64), ndim, np.cumsum(ndim) - ndim
        offset, nbytes = rec["offset"], rec["nbytes"]
        self.files, self.offsets, self.nbytes = rec["file"].copy(), offset.astype(np.int64), nbytes.astype(np.int64)

        on_device, addr = _addresses(rec)
        self.addrs = addr
        has = addr != 0
        starts = (addr - offset)[has]
        if len(starts) and (starts == starts[0]).all():  # one region: no sort
            bases, inverse = starts[:1], np.zeros(len(starts), np.intp)
        else:
            bases, inverse = np.unique(starts, return_inverse=True)
        ends = np.zeros(len(bases), np.uint64)
        np.maximum.at(ends, inverse, (offset + nbytes)[has])
        first = np.zeros(len(bases), np.intp)
        first[inverse[::-1]] = np.flatnonzero(has)[::-1]
        devices = np.where(on_device, rec["device"], -1)[first].tolist()
        self.region_keys = list(zip(devices, bases.tolist()))
        self.regions = {key: [key[1], end] for key, end in zip(self.region_keys, ends.tolist())}
        self.rids = np.full(n, -1, np.intp)
        self.rids[has] = inverse

        self.shards = {}  # name -> (dim, start, full_shape) for split tensors
        for i in np.flatnonzero(rec["full_shape"]).tolist():
            t = lib.wd_manifest_tensor(m, i).contents
            self.shards[self.names[i]] = (t.shard_dim, t.shard_start, tuple(t.full_shape[:t.ndim]))

    @property
    def index(self):
        """name -> position, built on first use."""
        if self._index is None:
            self._index = dict(zip(self.names, range(self.n)))
        return self._index

    def info(self, i):
        start = int(self.starts[i])
        shape = tuple(self.dims[start:start + int(self.ndims[i])].tolist())
        return TensorInfo((self.names[i], self.kinds[self.dcodes[i]], shape, int(self.files[i]), int(self.offsets[i]),
                           int(self.nbytes[i])))


class Lease(collections.abc.Mapping):
    """A leased component: a read-only mapping from tensor name to array,
    in the files' order (files in the manifest's order, tensors by offset).

    Arrays are views of the daemon's sealed memory: numpy arrays are
    read-only; torch tensors cannot be marked so, and writing into one
    faults (SIGSEGV), because the pages are mapped read-only.  A device
    lease's tensors are torch CUDA tensors over the daemon's device memory,
    shared by every worker and mapped read-only where the driver allows it:
    never write into it."""

    def __init__(self, conn, lease_ptr, framework, device):
        self._framework = framework
        self._device = device
        self._cuda = None  # the CUDA ordinal of a device lease
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
        # A region is one mapped slab, keyed by (CUDA ordinal or -1 for host
        # memory, the slab's base address): a file's own mapping for an
        # ordinary load, or the one derived slab of a sharded or device
        # load, where the tensors of every file lie at offsets in the same
        # slab while TensorInfo.file still names each one's real file.
        # Arrays are views of one byte array per region, so they share its
        # storage.  Nothing is read per tensor here: one tensor asked for by
        # name is read with wd_manifest_find(); keys, iteration and the
        # _BULK_AFTER-th get_tensor() read every tensor at once (_Table),
        # and from then on every array is built in one pass and kept.
        self._m = m
        self._n = lib.wd_manifest_n_tensors(m)
        self._table = None
        self._arrays = None  # name -> array, once built in bulk
        self._singles = 0  # get_tensor() calls served one tensor at a time
        self._bases = {}  # region key -> numpy or torch byte array over it
        self._spans = {}  # region key -> [base address, end offset]
        if self._n:
            t = lib.wd_manifest_tensor(m, 0).contents
            if t.device >= 0 and t.device_ptr:
                self._cuda = t.device

    def _tab(self):
        if self._table is None:
            self._table = _Table(self._m, self._n)
        return self._table

    def _entry(self, name):
        """(TensorInfo, address or 0, region key or None)."""
        if self._table is not None:
            tab = self._table
            if self._m is not None:
                # The library's hash index: no dict of every name needed.
                t = (lib.wd_manifest_find(self._m, name.encode("utf-8", "surrogateescape"))
                     if isinstance(name, str) else None)
                if not t:
                    raise KeyError(f"{self._model}: no tensor {name!r}")
                i = (ctypes.addressof(t.contents) - lib.wd_manifest_tensors(self._m)) // ctypes.sizeof(WdTensor)
            else:
                try:
                    i = tab.index[name]
                except (KeyError, TypeError):
                    raise KeyError(f"{self._model}: no tensor {name!r}") from None
            rid = int(tab.rids[i])
            return tab.info(i), int(tab.addrs[i]), (tab.region_keys[rid] if rid >= 0 else None)
        t = lib.wd_manifest_find(self._m, name.encode("utf-8", "surrogateescape")) if isinstance(name, str) else None
        if not t:
            raise KeyError(f"{self._model}: no tensor {name!r}")
        t = t.contents
        ndim = t.ndim
        shape = tuple(t.shape[:ndim]) if ndim else ()
        info = TensorInfo((name, t.dtype.decode(), shape, t.file, t.offset, t.nbytes))
        dev = t.device if t.device >= 0 and t.device_ptr else -1
        addr = t.device_ptr if dev >= 0 else (t.data or 0)
        return info, addr, ((dev, addr - t.offset) if addr else None)

    def _span(self, region):
        """[base address, end offset] of a region: its tensors' furthest end."""
        span = self._spans.get(region)
        if span is None:
            if self._table is not None:
                span = self._table.regions[region]
            else:
                rec = _records(self._m, self._n, copy=False)
                _, addr = _addresses(rec)
                mine = (addr != 0) & (addr - rec["offset"] == region[1])
                span = [region[1], int((rec["offset"] + rec["nbytes"])[mine].max())]
            self._spans[region] = span
        return span

    # ---- the mapping ----

    def _live(self):
        if self._mapping is None:
            raise errors.InvalidArgument(f"lease {self._id} of {self._model} was released")

    def __getitem__(self, name):
        # Once every array is built (and until release), one dict lookup.
        try:
            return self._arrays[name]
        except (KeyError, TypeError):  # not built (None), or no such name
            return self.get_tensor(name)

    def __iter__(self):
        return iter(self._tab().names)

    def __len__(self):
        return self._n

    def __contains__(self, name):
        if self._arrays is not None:
            return name in self._arrays
        if self._table is None and self._mapping is not None:
            return isinstance(name, str) and bool(
                lib.wd_manifest_find(self._m, name.encode("utf-8", "surrogateescape")))
        return name in self._tab().index

    def keys(self):
        """Tensor names in the files' order."""
        return list(self._tab().names)

    def info(self, name):
        """The tensor's TensorInfo (name, dtype, shape, file, offset, nbytes)."""
        return self._entry(name)[0]

    def dtype(self, name):
        """The tensor's dtype as safetensors spells it ("BF16", "F8_E4M3")."""
        return self.info(name).dtype

    def shape(self, name):
        return list(self.info(name).shape)

    def shard_info(self, name):
        """None for a tensor delivered whole; for one a sharded load split,
        (dim, start, full_shape): this part starts at index start along dim
        of the file's tensor, whose shape is full_shape (shape() is the
        part's)."""
        self.info(name)
        return self._tab().shards.get(name)

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

    @property
    def device(self):
        """"cpu", or "cuda:N" (this process's ordinal) for a device lease."""
        return self._device if self._cuda is None else f"cuda:{self._cuda}"

    def get_tensor(self, name):
        """The tensor as a zero-copy view: a read-only numpy array, or a
        torch tensor (framework "pt")."""
        self._live()
        arrays = self._arrays
        if arrays is None:
            self._singles += 1
            if self._singles <= _BULK_AFTER:
                return _ARRAY[self._framework](self, *self._entry(name))
            arrays = self._arrays = _ALL[self._framework](self, self._tab())
        try:
            return arrays[name]
        except (KeyError, TypeError):
            raise KeyError(f"{self._model}: no tensor {name!r}") from None

    # ---- ending it ----

    def release(self):
        """End the lease for good: the memory is unmapped and the daemon's
        lease ends as soon as no array from it is alive (at once if none
        is).  Later get_tensor() calls raise."""
        if self._mapping is not None:
            self._tab()  # the manifest goes with the mapping; names and infos stay
        self._mapping = None
        self._m = None
        self._arrays = None
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

    def _base(self, region):
        base = self._bases.get(region)
        if base is None:
            addr, end = self._span(region)
            if self._framework == "pt":
                base = _dlpack.byte_tensor(addr, end, self._mapping, *_dl_device(region[0]))
            else:
                import numpy as np
                base = np.asarray(_Bytes(addr, end, self._mapping))
            self._bases[region] = base
        return base


def _dl_device(ordinal):
    """(DLPack device type, id) of a region's memory."""
    return (_dlpack.KDL_CPU, 0) if ordinal < 0 else (_dlpack.KDL_CUDA, ordinal)


def _numpy_array(lease, info, addr, region):
    import numpy as np

    dt, _real = _dtypes.numpy_type(info.dtype)
    shape = info.shape
    if dt is None:
        dt, shape = np.dtype(np.uint8), _dtypes.packed_shape(info.dtype, shape, info.nbytes)
    if info.nbytes == 0 or not addr:
        a = np.empty(shape, dt)  # nothing to share: no bytes
        a.flags.writeable = False
        return a
    # Host memory only: Client.load() refuses a device with numpy.
    if region is None:
        return np.ndarray(shape, dt, buffer=np.asarray(_Bytes(addr, info.nbytes, lease._mapping)))
    return np.ndarray(shape, dt, buffer=lease._base(region), offset=info.offset)


def _torch_tensor(lease, info, addr, region):
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
    if info.nbytes == 0 or not addr:
        device = "cpu" if lease._cuda is None else f"cuda:{lease._cuda}"
        return torch.empty(shape, dtype=dt, device=device)
    size = dt.itemsize
    if region is not None and info.offset % size == 0:
        b = lease._base(region)[info.offset:info.offset + info.nbytes]
    else:
        # torch views a byte tensor as a wider type only at a storage offset
        # that the width divides: give this tensor a storage of its own.
        ordinal = region[0] if region is not None else -1 if lease._cuda is None else lease._cuda
        b = _dlpack.byte_tensor(addr, info.nbytes, lease._mapping, *_dl_device(ordinal))
    if size != 1 or dt != torch.uint8:
        b = b.view(dt)
    return b.view(shape)


_ARRAY = {"np": _numpy_array, "pt": _torch_tensor}

def _all_arrays(lease, tab, framework):
    """name -> array for every tensor, in one pass with the garbage
    collector paused (100,000 new arrays would set off dozens of its
    passes over them, for nothing: views hold no cycles)."""
    was = gc.isenabled()
    gc.disable()
    try:
        return _build_arrays(lease, tab, framework)
    finally:
        if was:
            gc.enable()


def _build_arrays(lease, tab, framework):
    """Tensors grouped with numpy by region, dtype and shape; each region's
    bytes viewed once per dtype (numpy or torch), so that every array of a
    region shares that one byte array (numpy's base, torch's storage).
    numpy: per shape S, one view of shape (positions, *S) whose first
    stride is one element, so that row a is the tensor of shape S starting
    at element a: each tensor is one row of it, taken in C by map() (about
    0.1 us).  torch: one split_with_sizes() per group of tensors alike but
    for their first dimension (_torch_split), and one as_strided() of the
    typed view for each 0-d tensor.  What this cannot hold (packed dtypes,
    empty or unaligned tensors, no memory) goes through the one-tensor
    path."""
    import numpy as np

    n = tab.n
    if not n:
        return {}
    numpy = framework == "np"
    one = _ARRAY[framework]
    made_all = np.empty(n, object)  # in the manifest's order, filled group by group
    kinds, dcode = tab.kinds, tab.dcodes
    key = tab.rids * len(kinds) + dcode
    order = np.argsort(key, kind="stable")
    cuts = np.flatnonzero(np.diff(key[order])) + 1
    rest = []  # positions for one()
    for idx in np.split(order, cuts):
        rid = int(tab.rids[idx[0]])
        dtype = kinds[dcode[idx[0]]]
        v = None
        if rid >= 0:
            v = (_numpy_typed if numpy else _torch_typed)(lease._base(tab.region_keys[rid]), dtype)
        if v is None:
            rest.append(idx)
            continue
        typed, size = v
        off, nb = tab.offsets[idx], tab.nbytes[idx]
        ok = (nb > 0) & (off % size == 0)
        if not ok.all():
            rest.append(idx[~ok])
            idx, off = idx[ok], off[ok]
        first = off // size
        nd = tab.ndims[idx]
        for k in np.flatnonzero(np.bincount(nd)).tolist():
            sel = nd == k
            pos, a = idx[sel], first[sel]
            if not numpy and k:
                _torch_split(typed, tab, pos, a, k, made_all)
                continue
            if k:
                shapes, inverse = _unique_rows(tab.dims[tab.starts[pos][:, None] + np.arange(k)])
            else:
                shapes, inverse = np.zeros((1, 0), np.int64), np.zeros(len(pos), np.intp)
            for j, shape in enumerate(shapes.tolist()):
                mine = inverse == j if len(shapes) > 1 else slice(None)
                starts = a[mine].tolist()
                shape = tuple(shape)
                strides = _contiguous_strides(shape)
                if numpy:
                    # Rows overlap (a stride of one element): a view over
                    # the typed array, read-only as it is.
                    rows = np.ndarray((len(typed) - _dtypes.numel(shape) + 1,) + shape, typed.dtype, typed, 0,
                                      (size,) + tuple(x * size for x in strides))
                    rows.flags.writeable = False
                    if not shape:  # rows[a, ...] is a 0-d array; rows[a] would be a numpy scalar
                        starts = [(x, Ellipsis) for x in starts]
                    made = map(rows.__getitem__, starts)
                else:
                    made = map(functools.partial(typed.as_strided, shape, strides), starts)
                # fromiter(object): a 1-D array of the arrays, never read as
                # a nested sequence.
                made_all[pos[mine]] = np.fromiter(made, object, len(starts))
    out = dict(zip(tab.names, made_all.tolist()))
    for idx in rest:
        for i in idx.tolist():
            rid = int(tab.rids[i])
            out[tab.names[i]] = one(lease, tab.info(i), int(tab.addrs[i]),
                                    tab.region_keys[rid] if rid >= 0 else None)
    return out


def _torch_split(typed, tab, pos, a, k, made_all):
    """torch tensors of k >= 1 dimensions, at elements a of typed, for the
    manifest positions pos, into made_all: grouped by their shape but the
    first dimension, T, and by their start modulo T's size, t; in a view of
    typed as rows of shape T starting at that remainder, each tensor is
    the rows [start / t, start / t + shape[0]), and one split_with_sizes()
    cuts a whole group (the tensors, and the gaps between them that are not
    empty) in C++: about 0.35 us a piece, against about 1 us for an
    as_strided() call from Python per tensor.
    Overlapping tensors (none in a valid file) go through as_strided()."""
    import numpy as np

    starts = tab.starts[pos]
    lead = tab.dims[starts]
    tail = tab.dims[starts[:, None] + np.arange(1, k)] if k > 1 else np.zeros((len(pos), 0), np.int64)
    inner = tail.prod(axis=1) if k > 1 else np.ones(len(pos), np.int64)
    rem = a % inner
    shapes, inverse = _unique_rows(np.column_stack((tail, rem)))
    n_typed = len(typed)
    for j, row in enumerate(shapes.tolist()):
        mine = np.flatnonzero(inverse == j) if len(shapes) > 1 else np.arange(len(pos))
        tshape, r = tuple(row[:-1]), row[-1]
        t = _dtypes.numel(tshape)
        q = (a[mine] - r) // t
        order = np.argsort(q, kind="stable")
        mine, q = mine[order], q[order]
        ln = lead[mine]
        end = q + ln
        if len(q) > 1 and (q[1:] < end[:-1]).any():
            for i in mine.tolist():
                shape = (int(lead[i]),) + tshape
                made_all[pos[i]] = typed.as_strided(shape, _contiguous_strides(shape), int(a[i]))
            continue
        rows = (n_typed - r) // t
        view = typed.as_strided((rows,) + tshape, (t,) + _contiguous_strides(tshape), r)
        # Pieces: each tensor, and each gap that is not empty before it
        # and at the end.
        gaps = np.empty(len(q) + 1, np.int64)
        gaps[0] = q[0]
        gaps[1:-1] = q[1:] - end[:-1]
        gaps[-1] = rows - end[-1]
        sizes = np.empty(2 * len(q) + 1, np.int64)
        sizes[0::2] = gaps
        sizes[1::2] = ln
        keep = np.ones(len(sizes), bool)
        keep[0::2] = gaps > 0
        sizes = sizes[keep]
        which = np.cumsum(keep)[1::2] - 1  # each tensor's piece
        pieces = view.split_with_sizes(sizes.tolist())
        made_all[pos[mine]] = np.fromiter(map(pieces.__getitem__, which.tolist()), object, len(q))


def _unique_rows(cols):
    """(the distinct rows of a 2-D array, each row's number among them);
    np.unique() without return_inverse imports numpy.ma (20 ms and more)
    in numpy 2.3."""
    import numpy as np

    order = np.lexsort(cols.T[::-1])
    ranked = cols[order]
    new = np.ones(len(cols), bool)
    new[1:] = (ranked[1:] != ranked[:-1]).any(axis=1)
    inverse = np.empty(len(cols), np.intp)
    inverse[order] = np.cumsum(new) - 1
    return ranked[new], inverse


def _contiguous_strides(shape):
    out, step = [], 1
    for d in reversed(shape):
        out.append(step)
        step *= max(d, 1)
    return tuple(reversed(out))


def _numpy_typed(base, dtype):
    dt, _real = _dtypes.numpy_type(dtype)
    if dt is None:
        return None
    size = dt.itemsize
    return base[:len(base) - len(base) % size].view(dt), size


def _torch_typed(base, dtype):
    import torch

    dt = _dtypes.torch_type(dtype)
    if dt is None or dt is getattr(torch, "float4_e2m1fn_x2", None):
        return None
    size = dt.itemsize
    return base[:len(base) - len(base) % size].view(dt), size


_ALL = {"np": lambda lease, tab: _all_arrays(lease, tab, "np"),
        "pt": lambda lease, tab: _all_arrays(lease, tab, "pt")}



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

    def load(self, model, component=None, device="cpu", framework="np", shard=None, tensors=None):
        """Lease a component (reading it if it is not resident): a Lease,
        a read-only mapping from tensor name to array.

        device: "cpu" (host memory, the default), or "cuda:N" (this
        process's ordinal: CUDA_VISIBLE_DEVICES applies), "cuda:GPU-<uuid>",
        "cuda" (torch's current device), an int N or a torch.device: the
        component in the daemon's GPU tier, mapped into this process;
        only framework="pt" can hold device memory.  shard: None, or a
        weightd.Shard (or a dict of its fields): this rank's parts of the
        tensors its rules match.

        tensors: None (every tensor), or a list of exact tensor names: the
        lease holds only those (in the component's order), while the
        daemon keeps the whole component (or shard) resident and the lease
        maps the same memory.  It costs what those tensors do, not what the
        component's other tensors would: one tensor of a component of
        100,000 is a lease of one.  A name the component lacks raises
        weightd.NotFound naming it."""
        fw = _framework(framework)
        dev = _device(device)
        if dev is not None and fw != "pt":
            raise errors.InvalidArgument(f'device {dev!r}: numpy arrays live in host memory; '
                                         'framework="pt" holds device memory')
        names = _names(tensors)
        opts = _options(dev, _shard(shard), names=names)
        if dev is not None:
            _torch_cuda_init()
        lease = ctypes.c_void_p()
        self._conn.call(lib.wd_load_ex, _model(model), _component(component), ctypes.byref(opts),
                        ctypes.byref(lease))
        out = Lease(self._conn, lease, fw, dev or "cpu")
        if names is not None and len(out) != len(set(names)):
            # A daemon or library older than LoadRequest.names leases the
            # whole component instead.
            n = len(out)
            out.release()
            raise errors.Unsupported(f"{model}: asked for {len(set(names))} tensors by name, the lease holds {n}: "
                                     "the daemon or libweightd-client predates leases of named tensors")
        if out._cuda is not None:
            try:
                _torch_cuda_check(dev)
            except BaseException:
                out.release()
                raise
        return out

    def prefetch(self, model, components=None, progress=None, shard=None, device="cpu", cluster=False,
                 nodes=None, node_shards=None, node_devices=None):
        """Make components resident without leasing them.  components: None
        (the model's only component, or "" ), a name, or a list of names.
        progress(component, done, total) is called as bytes arrive; a true
        return value cancels (weightd.Cancelled).  shard and device as for
        load(): the sharded entry, or the device tier, is made resident
        (a later load() with the same ones finds it).  Returns
        {component: {"bytes": n, "was_resident": bool}}.

        cluster=True: make each component resident in the host memory of
        the cluster's nodes named in nodes (a name or a list of names; None:
        every node), reading each byte from storage once across them;
        progress then counts the cluster's bytes.  No shard (see
        node_shards); device="cuda:N": on GPU N of every node too (the
        daemons' index; the bytes move between nodes through host memory).  Each result also has "nodes":
        one {"node", "state", "storage_read_bytes", "peer_received_bytes",
        "peer_sent_bytes", "message"} per node, in the cluster's order; a
        node that could not take part says so in its state ("failed",
        "down"), which raises nothing.  weightd.Unsupported where the
        daemon has no [cluster].

        node_shards={node: Shard or None} (with cluster=True): each node
        serves its own part, a Shard (a rank's slices, a stage's tensors)
        or None (the whole component); nodes named in nodes but not here
        serve it whole.  Every byte any node serves is read once across
        them, and each node reads or receives only the bytes it serves; a
        load() on that node with the same Shard finds it resident.
        node_devices={node: "cuda:N" or "cpu"} (with cluster=True): that
        node's device instead of device's (the daemons' index)."""
        if components is None or isinstance(components, str):
            components = [components or ""]
        dev = _device(device)
        sh = _shard(shard)
        if not cluster and nodes is not None:
            raise errors.InvalidArgument("nodes: only a cluster prefetch (cluster=True) takes nodes")
        if (node_shards is not None or node_devices is not None) and not cluster:
            raise errors.InvalidArgument("node_shards, node_devices: only a cluster prefetch (cluster=True) takes "
                                         "them")
        if cluster and sh is not None:
            raise errors.InvalidArgument("cluster=True takes no shard: name each node's in node_shards "
                                         f"(got shard={shard!r})")
        cluster_device = _cluster_device(device) if cluster else None
        names = _nodes(nodes)
        parts = _parts(names, node_shards, node_devices)
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
            try:
                if cluster:
                    out[comp] = self._prefetch_cluster(model, comp, names, cb, parts, cluster_device)
                    continue
                opts = _options(dev, sh, cb)
                res = WdPrefetchResult()
                self._conn.call(lib.wd_prefetch_ex, _model(model), _component(comp), ctypes.byref(opts),
                                ctypes.byref(res))
            except errors.Cancelled:
                if failure:
                    raise failure[0] from None
                raise
            out[comp] = {"bytes": res.bytes, "was_resident": bool(res.was_resident)}
        return out

    def _prefetch_cluster(self, model, comp, names, cb, parts=None, device=None):
        res = ctypes.POINTER(WdClusterPrefetchResult)()
        o = WdClusterOptions(progress=cb, device=device)
        if parts is not None:
            o.parts, o.n_parts = parts, len(parts)
        elif names:
            o.nodes, o.n_nodes = (ctypes.c_char_p * len(names))(*names), len(names)
        self._conn.call(lib.wd_prefetch_cluster_ex, _model(model), _component(comp), ctypes.byref(o),
                        ctypes.byref(res))
        try:
            v = res.contents
            return {"bytes": v.bytes, "was_resident": bool(v.was_resident),
                    "nodes": [{"node": text(x.node), "state": text(x.state),
                               "storage_read_bytes": x.storage_read_bytes,
                               "peer_received_bytes": x.peer_received_bytes, "peer_sent_bytes": x.peer_sent_bytes,
                               "message": text(x.message)}
                              for x in (v.nodes[i] for i in range(v.n_nodes))]}
        finally:
            lib.wd_cluster_prefetch_result_free(res)

    def cluster(self):
        """The cluster as the daemon sees it: {"enabled", "node", "generation",
        "nodes": [{"name", "address", "state", "generation", "rtt_us",
        "sent_bytes", "received_bytes", "last_error", "since_ms"}],
        "peer_sent_bytes", "peer_received_bytes", "storage_saved_bytes",
        "gpu_lane", "lane_sent_bytes", "lane_received_bytes"} (the GPU lanes'
        backend, or why there is none, and the bytes that went over them).
        A daemon without [cluster] gives enabled False, node None and no
        nodes."""
        ci = ctypes.POINTER(WdClusterInfo)()
        self._conn.call(lib.wd_cluster, ctypes.byref(ci))
        try:
            return _cluster_dict(ci.contents)
        finally:
            lib.wd_cluster_free(ci)

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
            out["devices"] = [{k: (text(x) if isinstance(x, bytes) else x)
                               for k in ("index", "uuid", "name", "pci_bus_id", "total_bytes", "budget_bytes",
                                         "used_bytes", "evictable_bytes") for x in [getattr(v.devices[i], k)]}
                              for i in range(v.n_devices)]
            out["cluster"] = _cluster_dict(v.cluster.contents) if v.cluster else None
            return out
        finally:
            lib.wd_status_free(s)


def connect(socket=None):
    """Connect to weightd at socket (default: $WEIGHTD_SOCKET, then the
    daemon's default path)."""
    return Client(socket)
