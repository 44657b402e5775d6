/* The GPU tier with CUDA: the runtime (linked statically) for devices,
 * streams, events, copies and page-locking; the driver's VMM calls through
 * entry points that cudaGetDriverEntryPointByVersion hands out at run time,
 * so nothing links libcuda and a machine without a driver only turns the
 * tier off.
 *
 * Threads: one per device.  It owns the device's copy streams; copies reach
 * it through a locked list and a condition variable, and it issues each
 * planned tensor's cudaMemcpyAsync / cudaMemcpy2DAsync once the owner said
 * its source bytes are in the host slab, records an event after each batch
 * and polls the events (cudaEventQuery), blocking in cudaEventSynchronize
 * only when it has nothing else to do.  Large single-row tensors are copied
 * in pieces as their bytes arrive, so reading and copying overlap even for
 * a component made of a few huge tensors.
 *
 * Page-locking: a sealed slab is mapped read-only, which cudaHostRegister
 * takes only with cudaHostRegisterReadOnly, and only on devices that say
 * cudaDevAttrHostRegisterReadOnlySupported (probed at start, in
 * GpuDeviceInfo); elsewhere a sealed slab is registered without the flag.
 * Registrations are kept by (address, size, read-only); one that overlaps a
 * new range without matching it belongs to a mapping that is gone and is
 * dropped.
 *
 * The copy engine (copy-engine.c) reaches this file only through cuda_ops;
 * this file calls the engine's gpu_worker_*() by name.
 *
 * Every CUDA and driver result passes through gpu_check() or cu_check(),
 * which turn it into -errno with the error's name in the message. */
#include <cuda.h>
#include <cuda_runtime_api.h>
#include <cudaTypedefs.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "gpu/copy-engine.h"

#define GPU_STREAMS 2u
#define GPU_PIECE_MIN (8ull << 20) /* a partial copy of one large tensor */
/* The driver API version whose signatures the PFN_ types below describe. */
#define GPU_DRIVER_ABI 12000

typedef struct Driver {
        PFN_cuGetErrorName_v6000 GetErrorName;
        PFN_cuDeviceGetAttribute_v2000 DeviceGetAttribute;
        PFN_cuMemCreate_v10020 MemCreate;
        PFN_cuMemRelease_v10020 MemRelease;
        PFN_cuMemAddressReserve_v10020 MemAddressReserve;
        PFN_cuMemAddressFree_v10020 MemAddressFree;
        PFN_cuMemMap_v10020 MemMap;
        PFN_cuMemUnmap_v10020 MemUnmap;
        PFN_cuMemSetAccess_v10020 MemSetAccess;
        PFN_cuMemExportToShareableHandle_v10020 MemExportToShareableHandle;
        PFN_cuMemGetAllocationGranularity_v10020 MemGetAllocationGranularity;
} Driver;

typedef struct HostReg {
        void *p;
        uint64_t size;
        bool read_only; /* asked for as read-only (a sealed slab's mapping) */
        struct HostReg *next;
} HostReg;

/* A batch of copies in flight, and the event recorded after it. */
struct GpuPending {
        cudaEvent_t event;
        uint64_t bytes;
        GpuPending *next;
};

typedef struct GpuDev GpuDev;

struct Gpu {
        GpuBase base; /* first: the engine's way to cuda_ops */
        Driver cu;
        GpuDev *devs;
        size_t n_devs;
        pthread_mutex_t reg_lock; /* host registrations */
        HostReg *regs;
};

struct GpuDev {
        GpuWorker worker; /* first: a copy's worker is its device */
        GpuDeviceInfo info;
        cudaStream_t streams[GPU_STREAMS];
        unsigned next_stream; /* worker thread only */
};

struct GpuSlab {
        Gpu *gpu;
        size_t dev;
        CUmemGenericAllocationHandle handle;
        bool have_handle;
        CUdeviceptr base;
        bool reserved, mapped;
        uint64_t size, map_size;
        int fd;
};

/* ---- the one boundary for CUDA's and the driver's results --------------- */

static int gpu_errno(cudaError_t e) {
        switch (e) {
        case cudaErrorMemoryAllocation:
                return -ENOMEM;
        case cudaErrorInsufficientDriver:
        case cudaErrorNoDevice:
        case cudaErrorInvalidDevice:
        case cudaErrorDevicesUnavailable:
        case cudaErrorSystemDriverMismatch:
        case cudaErrorCompatNotSupportedOnDevice:
        case cudaErrorInitializationError:
        case cudaErrorStubLibrary:
                return -ENODEV;
        case cudaErrorNotSupported:
                return -EOPNOTSUPP;
        default:
                return -EIO;
        }
}

/* 0 for cudaSuccess; else -errno, and err says what failed and CUDA's reason. */
_printf_(3, 4) static int gpu_check(cudaError_t e, WdError *err, const char *fmt, ...) {
        char what[512];
        va_list ap;

        if (e == cudaSuccess)
                return 0;
        va_start(ap, fmt);
        vsnprintf(what, sizeof(what), fmt, ap);
        va_end(ap);
        return wd_error_set(err, gpu_errno(e), "%s: %s (%s)", what, cudaGetErrorName(e), cudaGetErrorString(e));
}

/* The same for a driver result. */
_printf_(4, 5) static int cu_check(const Gpu *g, CUresult e, WdError *err, const char *fmt, ...) {
        const char *name = NULL;
        char what[512];
        va_list ap;
        int r;

        if (e == CUDA_SUCCESS)
                return 0;
        switch (e) {
        case CUDA_ERROR_OUT_OF_MEMORY:
                r = -ENOMEM;
                break;
        case CUDA_ERROR_NO_DEVICE:
        case CUDA_ERROR_INVALID_DEVICE:
        case CUDA_ERROR_NOT_INITIALIZED:
                r = -ENODEV;
                break;
        case CUDA_ERROR_NOT_SUPPORTED:
                r = -EOPNOTSUPP;
                break;
        default:
                r = -EIO;
        }
        if (!g->cu.GetErrorName || g->cu.GetErrorName(e, &name) != CUDA_SUCCESS || !name)
                name = "CUDA_ERROR_UNKNOWN";
        va_start(ap, fmt);
        vsnprintf(what, sizeof(what), fmt, ap);
        va_end(ap);
        return wd_error_set(err, r, "%s: %s (driver error %d)", what, name, (int) e);
}

/* ---- discovery ---------------------------------------------------------- */

static const GpuBackendOps cuda_ops;

bool gpu_built(void) {
        return true;
}

bool gpu_emulated(void) {
        return false;
}

static int driver_load(Driver *d, WdError *err) {
        static const struct {
                const char *name;
                size_t offset;
        } table[] = {
                { "cuGetErrorName", offsetof(Driver, GetErrorName) },
                { "cuDeviceGetAttribute", offsetof(Driver, DeviceGetAttribute) },
                { "cuMemCreate", offsetof(Driver, MemCreate) },
                { "cuMemRelease", offsetof(Driver, MemRelease) },
                { "cuMemAddressReserve", offsetof(Driver, MemAddressReserve) },
                { "cuMemAddressFree", offsetof(Driver, MemAddressFree) },
                { "cuMemMap", offsetof(Driver, MemMap) },
                { "cuMemUnmap", offsetof(Driver, MemUnmap) },
                { "cuMemSetAccess", offsetof(Driver, MemSetAccess) },
                { "cuMemExportToShareableHandle", offsetof(Driver, MemExportToShareableHandle) },
                { "cuMemGetAllocationGranularity", offsetof(Driver, MemGetAllocationGranularity) },
        };

        for (size_t i = 0; i < ELEMENTSOF(table); i++) {
                enum cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
                void *fn = NULL;
                int r;

                r = gpu_check(cudaGetDriverEntryPointByVersion(table[i].name, &fn, GPU_DRIVER_ABI, cudaEnableDefault,
                                                               &q),
                              err, "no CUDA driver entry point %s", table[i].name);
                if (r < 0)
                        return r;
                if (q != cudaDriverEntryPointSuccess || !fn)
                        return wd_error_set(err, -ENODEV, "the CUDA driver lacks %s (%s)", table[i].name,
                                            q == cudaDriverEntryPointVersionNotSufficent ? "driver too old"
                                                                                         : "symbol not found");
                memcpy((uint8_t *) d + table[i].offset, &fn, sizeof(fn));
        }
        return 0;
}

static void uuid_format(char *buf, const unsigned char b[16]) {
        snprintf(buf, GPU_UUID_MAX, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
                 b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
}

static CUmemAllocationProp slab_prop(int ordinal) {
        CUmemAllocationProp prop;

        memset(&prop, 0, sizeof(prop));
        prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
        prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        prop.location.id = ordinal;
        return prop;
}

static int device_probe(Gpu *g, int ordinal, GpuDeviceInfo *info, WdError *err) {
        struct cudaDeviceProp prop;
        CUmemAllocationProp ap = slab_prop(ordinal);
        int vmm = 0, posix = 0, ro = 0, r;
        size_t gran = 0;

        memset(&prop, 0, sizeof(prop));
        r = gpu_check(cudaGetDeviceProperties(&prop, ordinal), err, "cuda:%d: cannot read its properties", ordinal);
        if (r < 0)
                return r;
        *info = (GpuDeviceInfo){ .index = (unsigned) ordinal, .total_bytes = prop.totalGlobalMem };
        snprintf(info->name, sizeof(info->name), "%s", prop.name);
        uuid_format(info->uuid, (const unsigned char *) prop.uuid.bytes);
        r = gpu_check(cudaDeviceGetPCIBusId(info->pci_bus_id, (int) sizeof(info->pci_bus_id), ordinal), err,
                      "cuda:%d: cannot read its PCI bus id", ordinal);
        if (r < 0)
                return r;
        r = cu_check(g, g->cu.DeviceGetAttribute(&vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, ordinal),
                     err, "cuda:%d: cannot ask for virtual memory management", ordinal);
        if (r < 0)
                return r;
        r = cu_check(g,
                     g->cu.DeviceGetAttribute(&posix, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED,
                                              ordinal),
                     err, "cuda:%d: cannot ask for POSIX file descriptor handles", ordinal);
        if (r < 0)
                return r;
        if (!vmm || !posix)
                return wd_error_set(err, -EOPNOTSUPP, "cuda:%d (%s): no %s", ordinal, info->name,
                                    !vmm ? "virtual memory management" : "POSIX file descriptor handles");
        r = cu_check(g, g->cu.MemGetAllocationGranularity(&gran, &ap, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED), err,
                     "cuda:%d: cannot read the allocation granularity", ordinal);
        if (r < 0)
                return r;
        info->granularity = gran > 0 ? gran : 2u << 20;
        r = gpu_check(cudaDeviceGetAttribute(&ro, cudaDevAttrHostRegisterReadOnlySupported, ordinal), err,
                      "cuda:%d: cannot ask for read-only host registration", ordinal);
        if (r < 0)
                return r;
        info->host_register_read_only = ro != 0;
        return 0;
}

static int device_start(Gpu *g, GpuDev *d, size_t index, WdError *err) {
        int ordinal = (int) d->info.index, r;

        /* The primary context: created here, off the loop (it takes a while). */
        r = gpu_check(cudaSetDevice(ordinal), err, "cuda:%d: cannot select it", ordinal);
        if (r < 0)
                return r;
        r = gpu_check(cudaFree(NULL), err, "cuda:%d: cannot create its context", ordinal);
        if (r < 0)
                return r;
        for (unsigned i = 0; i < GPU_STREAMS; i++) {
                r = gpu_check(cudaStreamCreateWithFlags(&d->streams[i], cudaStreamNonBlocking), err,
                              "cuda:%d: cannot create a copy stream", ordinal);
                if (r < 0)
                        return r;
        }
        d->worker = (GpuWorker){ .gpu = g, .dev = index, .ordinal = d->info.index, .piece_min = GPU_PIECE_MIN };
        return gpu_worker_start(&d->worker, err);
}

static void device_stop(GpuDev *d) {
        gpu_worker_stop(&d->worker);
        for (unsigned i = 0; i < GPU_STREAMS; i++)
                if (d->streams[i]) {
                        (void) cudaSetDevice((int) d->info.index);
                        (void) cudaStreamDestroy(d->streams[i]);
                        d->streams[i] = NULL;
                }
}

/* Undo a registration, piece by piece, and free it. */
static void host_reg_drop(HostReg *h) {
        for (uint64_t off = 0; off < h->size; off += GPU_REGISTER_PIECE)
                (void) cudaHostUnregister((uint8_t *) h->p + off);
        free(h);
}

static bool in_list(const unsigned *only, size_t n_only, int ordinal) {
        if (n_only == 0)
                return true;
        for (size_t i = 0; i < n_only; i++)
                if (only[i] == (unsigned) ordinal)
                        return true;
        return false;
}

int gpu_new(Gpu **ret, const unsigned *only, size_t n_only, WdError *err) {
        _cleanup_(gpu_freep) Gpu *g = NULL;
        int count = 0, driver = 0, r;

        g = calloc(1, sizeof(Gpu));
        if (!g)
                return wd_error_set(err, -ENOMEM, "out of memory");
        g->base.ops = &cuda_ops;
        r = pthread_mutex_init(&g->reg_lock, NULL);
        if (r != 0) {
                free(TAKE_PTR(g));
                return wd_error_set(err, -r, "cannot create a lock");
        }

        r = gpu_check(cudaDriverGetVersion(&driver), err, "cannot ask for the CUDA driver's version");
        if (r < 0)
                return r;
        if (driver == 0)
                return wd_error_set(err, -ENODEV, "no CUDA driver (libcuda.so.1 is not installed or not loadable)");
        r = gpu_check(cudaGetDeviceCount(&count), err, "no usable CUDA driver (driver %d.%d, runtime %d.%d)",
                      driver / 1000, driver % 1000 / 10, CUDART_VERSION / 1000, CUDART_VERSION % 1000 / 10);
        if (r < 0)
                return r;
        if (count <= 0)
                return wd_error_set(err, -ENODEV, "no CUDA device");
        r = driver_load(&g->cu, err);
        if (r < 0)
                return r;

        g->devs = calloc((size_t) count, sizeof(GpuDev));
        if (!g->devs)
                return wd_error_set(err, -ENOMEM, "out of memory");
        for (int i = 0; i < count && i < (int) GPU_MAX_DEVICES; i++) {
                GpuDev *d = &g->devs[g->n_devs];

                if (!in_list(only, n_only, i))
                        continue;
                r = device_probe(g, i, &d->info, err);
                if (r < 0)
                        return r;
                r = device_start(g, d, g->n_devs, err);
                if (r < 0) {
                        device_stop(d);
                        return r;
                }
                g->n_devs++;
        }
        if (g->n_devs == 0)
                return wd_error_set(err, -ENODEV, "none of the configured devices exists (%d found)", count);
        *ret = TAKE_PTR(g);
        return 0;
}

Gpu *gpu_free(Gpu *g) {
        if (!g)
                return NULL;
        for (size_t i = 0; i < g->n_devs; i++)
                device_stop(&g->devs[i]);
        while (g->regs) {
                HostReg *h = g->regs;

                g->regs = h->next;
                host_reg_drop(h);
        }
        pthread_mutex_destroy(&g->reg_lock);
        free(g->devs);
        free(g);
        return NULL;
}

size_t gpu_n_devices(const Gpu *g) {
        return g ? g->n_devs : 0;
}

const GpuDeviceInfo *gpu_device(const Gpu *g, size_t i) {
        return g && i < g->n_devs ? &g->devs[i].info : NULL;
}

uint64_t gpu_device_free_bytes(Gpu *g, size_t i) {
        size_t free_b = 0, total = 0;

        if (!g || i >= g->n_devs || cudaSetDevice((int) g->devs[i].info.index) != cudaSuccess ||
            cudaMemGetInfo(&free_b, &total) != cudaSuccess)
                return 0;
        return free_b;
}

/* ---- device slabs ------------------------------------------------------- */

int gpu_slab_new(Gpu *g, size_t i, uint64_t bytes, GpuSlab **ret, WdError *err) {
        _cleanup_(gpu_slab_freep) GpuSlab *s = NULL;
        const GpuDeviceInfo *info;
        CUmemAllocationProp prop;
        CUmemAccessDesc access;
        int ordinal, fd = -1, r;

        if (!g || i >= g->n_devs)
                return wd_error_set(err, -ENODEV, "no such device");
        info = &g->devs[i].info;
        ordinal = (int) info->index;
        s = calloc(1, sizeof(GpuSlab));
        if (!s)
                return wd_error_set(err, -ENOMEM, "out of memory");
        s->gpu = g;
        s->dev = i;
        s->fd = -1;
        s->size = bytes;
        s->map_size = ALIGN_UP(MAX(bytes, 1u), info->granularity);

        prop = slab_prop(ordinal);
        r = cu_check(g, g->cu.MemCreate(&s->handle, s->map_size, &prop, 0), err,
                     "cuda:%d: cannot allocate %llu bytes of device memory", ordinal, (unsigned long long) s->map_size);
        if (r < 0)
                return r;
        s->have_handle = true;
        r = cu_check(g, g->cu.MemAddressReserve(&s->base, s->map_size, 0, 0, 0), err,
                     "cuda:%d: cannot reserve %llu bytes of address space", ordinal, (unsigned long long) s->map_size);
        if (r < 0)
                return r;
        s->reserved = true;
        r = cu_check(g, g->cu.MemMap(s->base, s->map_size, 0, s->handle, 0), err, "cuda:%d: cannot map a device slab",
                     ordinal);
        if (r < 0)
                return r;
        s->mapped = true;
        memset(&access, 0, sizeof(access));
        access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        access.location.id = ordinal;
        access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
        r = cu_check(g, g->cu.MemSetAccess(s->base, s->map_size, &access, 1), err,
                     "cuda:%d: cannot make a device slab accessible", ordinal);
        if (r < 0)
                return r;
        r = cu_check(g, g->cu.MemExportToShareableHandle(&fd, s->handle, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
                     err, "cuda:%d: cannot export a device slab", ordinal);
        if (r < 0)
                return r;
        s->fd = fd;
        if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)
                return wd_error_set(err, -errno, "cannot make the device slab's descriptor close-on-exec: %s",
                                    strerror(errno));
        *ret = TAKE_PTR(s);
        return 0;
}

GpuSlab *gpu_slab_free(GpuSlab *s) {
        if (!s)
                return NULL;
        if (s->mapped)
                (void) s->gpu->cu.MemUnmap(s->base, s->map_size);
        if (s->reserved)
                (void) s->gpu->cu.MemAddressFree(s->base, s->map_size);
        if (s->have_handle)
                (void) s->gpu->cu.MemRelease(s->handle);
        safe_close(s->fd);
        free(s);
        return NULL;
}

int gpu_slab_fd(const GpuSlab *s) {
        return s->fd;
}

uint64_t gpu_slab_size(const GpuSlab *s) {
        return s->size;
}

uint64_t gpu_slab_map_size(const GpuSlab *s) {
        return s->map_size;
}

size_t gpu_slab_device(const GpuSlab *s) {
        return s->dev;
}

void *gpu_slab_address(const GpuSlab *s) {
        return (void *) (uintptr_t) s->base;
}

/* ---- page-locked host slabs --------------------------------------------- */

/* Whether the calling thread's current device takes cudaHostRegisterReadOnly
 * (the flag is checked against the current context).  A device that is not
 * ours (a thread that never selected one) takes it only if all of ours do. */
static bool host_read_only_supported(const Gpu *g) {
        bool all = true;
        int cur = -1;

        if (cudaGetDevice(&cur) != cudaSuccess)
                cur = -1;
        for (size_t i = 0; i < g->n_devs; i++) {
                if ((int) g->devs[i].info.index == cur)
                        return g->devs[i].info.host_register_read_only;
                all = all && g->devs[i].info.host_register_read_only;
        }
        return all;
}

static bool ranges_overlap(const void *a, uint64_t a_size, const void *b, uint64_t b_size) {
        uintptr_t x = (uintptr_t) a, y = (uintptr_t) b;

        return x < y + b_size && y < x + a_size;
}

int gpu_host_register(Gpu *g, void *p, uint64_t size, bool read_only, WdError *err) {
        bool ro_flag;
        unsigned flags;
        HostReg *h, *stale = NULL;
        uint64_t off;
        int r = 0;

        if (!g || size == 0)
                return 0;
        ro_flag = read_only && host_read_only_supported(g);
        flags = cudaHostRegisterPortable | (ro_flag ? cudaHostRegisterReadOnly : 0);
        /* Held while registering: a second device asking for the same slab
         * waits for the first instead of registering it twice. */
        pthread_mutex_lock(&g->reg_lock);
        for (HostReg **pp = &g->regs; *pp;) {
                h = *pp;
                if (h->p == p && h->size == size && h->read_only == read_only)
                        goto out; /* registered already */
                if (ranges_overlap(h->p, h->size, p, size)) {
                        /* [p, p + size) is mapped now, so what overlaps it
                         * otherwise (another start, size, or protection)
                         * was registered for a mapping that is gone. */
                        *pp = h->next;
                        h->next = stale;
                        stale = h;
                        continue;
                }
                pp = &h->next;
        }
        while (stale) {
                h = stale;
                stale = h->next;
                host_reg_drop(h);
        }
        h = calloc(1, sizeof(HostReg));
        if (!h) {
                r = wd_error_set(err, -ENOMEM, "out of memory");
                goto out;
        }
        for (off = 0; off < size; off += GPU_REGISTER_PIECE) {
                r = gpu_check(cudaHostRegister((uint8_t *) p + off, MIN(GPU_REGISTER_PIECE, size - off), flags), err,
                              "cannot page-lock %llu bytes of a %shost slab%s", (unsigned long long) size,
                              read_only ? "read-only " : "",
                              read_only && !ro_flag ? " (the device does not support read-only registration)"
                                                    : "");
                if (r < 0)
                        break;
        }
        if (r < 0) {
                for (uint64_t k = 0; k < off; k += GPU_REGISTER_PIECE)
                        (void) cudaHostUnregister((uint8_t *) p + k);
                free(h);
                goto out;
        }
        *h = (HostReg){ .p = p, .size = size, .read_only = read_only, .next = g->regs };
        g->regs = h;
out:
        pthread_mutex_unlock(&g->reg_lock);
        return r;
}

/* Every registration at p (there is at most one). */
void gpu_host_unregister(Gpu *g, void *p) {
        HostReg *gone = NULL;

        if (!g || !p)
                return;
        pthread_mutex_lock(&g->reg_lock);
        for (HostReg **pp = &g->regs; *pp;) {
                HostReg *h = *pp;

                if (h->p != p) {
                        pp = &h->next;
                        continue;
                }
                *pp = h->next;
                h->next = gone;
                gone = h;
        }
        pthread_mutex_unlock(&g->reg_lock);
        while (gone) {
                HostReg *h = gone;

                gone = h->next;
                host_reg_drop(h);
        }
}

/* ---- copies ------------------------------------------------------------- */

static GpuWorker *cuda_worker(Gpu *g, size_t dev) {
        return dev < g->n_devs ? &g->devs[dev].worker : NULL;
}

static GpuDev *copy_dev(const GpuCopy *c) {
        return (GpuDev *) c->worker;
}

static void cuda_thread_init(GpuWorker *w) {
        (void) cudaSetDevice((int) w->ordinal);
}

/* Every step of a batch goes on the same stream; the next batch on the next. */
static int cuda_issue(GpuCopy *c, const CopyStep *step) {
        GpuDev *d = copy_dev(c);
        cudaStream_t stream = d->streams[d->next_stream % GPU_STREAMS];
        uint8_t *base = (uint8_t *) (uintptr_t) c->slab->base;
        const uint8_t *src = c->files[step->file]->data;
        const ShardCopy *k = &step->copy;
        const char *name = c->plan->tensors[step->tensor].source->name;

        if (k->height == 1)
                return gpu_check(cudaMemcpyAsync(base + k->dst, src + k->src, k->width, cudaMemcpyHostToDevice, stream),
                                 &c->err, "cuda:%u: copying tensor \"%s\"", d->info.index, name);
        return gpu_check(cudaMemcpy2DAsync(base + k->dst, k->dst_pitch, src + k->src, k->src_pitch, k->width,
                                           k->height, cudaMemcpyHostToDevice, stream),
                         &c->err, "cuda:%u: copying tensor \"%s\"", d->info.index, name);
}

static void copy_fail(GpuCopy *c, int r) {
        if (c->error == 0)
                c->error = r;
}

/* Record an event after the batch on its stream. */
static void cuda_batch_end(GpuCopy *c, uint64_t bytes) {
        GpuDev *d = copy_dev(c);
        cudaStream_t stream = d->streams[d->next_stream++ % GPU_STREAMS];
        GpuPending *p = calloc(1, sizeof(GpuPending));
        int r;

        if (!p) {
                copy_fail(c, wd_error_set(&c->err, -ENOMEM, "out of memory"));
                (void) cudaStreamSynchronize(stream);
                return;
        }
        p->bytes = bytes;
        r = gpu_check(cudaEventCreateWithFlags(&p->event, cudaEventDisableTiming), &c->err,
                      "cuda:%u: cannot create an event", d->info.index);
        if (r == 0)
                r = gpu_check(cudaEventRecord(p->event, stream), &c->err, "cuda:%u: cannot record an event",
                              d->info.index);
        if (r < 0) {
                if (p->event)
                        (void) cudaEventDestroy(p->event);
                free(p);
                copy_fail(c, r);
                (void) cudaStreamSynchronize(stream);
                return;
        }
        if (c->pending_tail)
                c->pending_tail->next = p;
        else
                c->pending = p;
        c->pending_tail = p;
}

static bool cuda_poll(GpuCopy *c, bool wait) {
        bool any = false;

        while (c->pending) {
                GpuPending *p = c->pending;
                cudaError_t e = wait && !any ? cudaEventSynchronize(p->event) : cudaEventQuery(p->event);

                if (e == cudaErrorNotReady)
                        break;
                if (e != cudaSuccess)
                        copy_fail(c, gpu_check(e, &c->err, "cuda:%u: a copy to the device failed",
                                               copy_dev(c)->info.index));
                else
                        atomic_fetch_add(&c->copied, p->bytes);
                (void) cudaEventDestroy(p->event);
                c->pending = p->next;
                if (!c->pending)
                        c->pending_tail = NULL;
                free(p);
                any = true;
        }
        return any;
}

static void cuda_pending_free(GpuCopy *c) {
        while (c->pending) {
                GpuPending *p = c->pending;

                c->pending = p->next;
                (void) cudaEventDestroy(p->event);
                free(p);
        }
        c->pending_tail = NULL;
}

static const GpuBackendOps cuda_ops = {
        .worker = cuda_worker,
        .slab_new = gpu_slab_new,
        .slab_free = gpu_slab_free,
        .host_register = gpu_host_register,
        .thread_init = cuda_thread_init,
        .issue = cuda_issue,
        .batch_end = cuda_batch_end,
        .poll = cuda_poll,
        .pending_free = cuda_pending_free,
};
