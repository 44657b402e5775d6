/* Emulated devices in host memory, for testing the GPU tier's server side
 * (device loads, their budgets, fan-out, keep_host, sharded device slabs,
 * leases of device memory) on machines without a GPU.  Built instead of
 * gpu-cuda.c with -Dgpu_emulation=true, never in a release build.
 *
 * $WEIGHTD_EMULATED_GPUS = "N:SIZE" makes N devices of SIZE bytes ("2:256M")
 * named "Emulated GPU" with fixed UUIDs.  A device slab is a memfd of its
 * map size, filled through the daemon's own mapping and exported as that
 * memfd, so a test maps the descriptor a Load sends and compares bytes.
 * Copies run on the same worker threads as the CUDA ones (copy-engine.c),
 * with memcpy instead of cudaMemcpy2DAsync, each step done when issued; the
 * device's memory is accounted, so allocations beyond SIZE fail as
 * cuMemCreate would with -ENOMEM. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "gpu/copy-engine.h"
#include "util/parse-util.h"

#define EMU_GRANULARITY (2u << 20)
#define EMU_PIECE_MIN (1u << 20)

typedef struct EmuDev EmuDev;

struct Gpu {
        GpuBase base; /* first: the engine's way to emu_ops */
        EmuDev *devs;
        size_t n_devs;
};

struct EmuDev {
        GpuWorker worker; /* first: a copy's worker is its device */
        GpuDeviceInfo info;
        _Atomic uint64_t used; /* bytes of live slabs */
};

struct GpuSlab {
        EmuDev *dev;
        size_t index;
        uint8_t *base;
        uint64_t size, map_size;
        int fd;
};

static const GpuBackendOps emu_ops;

bool gpu_built(void) {
        return true;
}

bool gpu_emulated(void) {
        return true;
}

int gpu_new(Gpu **ret, const unsigned *only, size_t n_only, WdError *err) {
        _cleanup_(gpu_freep) Gpu *g = NULL;
        const char *spec = getenv("WEIGHTD_EMULATED_GPUS"), *colon;
        _cleanup_free_ char *count_s = NULL;
        uint64_t count, size;

        if (!spec || !*spec)
                return wd_error_set(err, -ENODEV, "no emulated CUDA device ($WEIGHTD_EMULATED_GPUS is not set)");
        colon = strchr(spec, ':');
        count_s = colon ? strndup(spec, (size_t) (colon - spec)) : NULL;
        if (!colon || !count_s || parse_u64(count_s, 1, GPU_MAX_DEVICES, &count) < 0 || parse_size(colon + 1, &size) < 0 ||
            size == 0)
                return wd_error_set(err, -EINVAL, "$WEIGHTD_EMULATED_GPUS=\"%s\": expected N:SIZE such as 2:256M", spec);

        g = calloc(1, sizeof(Gpu));
        if (!g)
                return wd_error_set(err, -ENOMEM, "out of memory");
        g->base.ops = &emu_ops;
        g->devs = calloc(count, sizeof(EmuDev));
        if (!g->devs)
                return wd_error_set(err, -ENOMEM, "out of memory");
        for (unsigned i = 0; i < count; i++) {
                EmuDev *d = &g->devs[g->n_devs];
                bool wanted = n_only == 0;
                int r;

                for (size_t k = 0; k < n_only; k++)
                        wanted = wanted || only[k] == i;
                if (!wanted)
                        continue;
                /* Nothing is page-locked here, read-only or not. */
                d->info = (GpuDeviceInfo){ .index = i, .total_bytes = size, .granularity = EMU_GRANULARITY,
                                           .host_register_read_only = true };
                snprintf(d->info.name, sizeof(d->info.name), "Emulated GPU");
                snprintf(d->info.uuid, sizeof(d->info.uuid), "GPU-00000000-0000-4000-8000-%012x", i);
                snprintf(d->info.pci_bus_id, sizeof(d->info.pci_bus_id), "0000:%02x:00.0", i);
                d->worker = (GpuWorker){ .gpu = g, .dev = g->n_devs, .ordinal = i, .piece_min = EMU_PIECE_MIN };
                r = gpu_worker_start(&d->worker, err);
                if (r < 0)
                        return r;
                g->n_devs++;
        }
        if (g->n_devs == 0)
                return wd_error_set(err, -ENODEV, "none of the configured devices exists (%u emulated)",
                                    (unsigned) count);
        *ret = TAKE_PTR(g);
        return 0;
}

Gpu *gpu_free(Gpu *g) {
        if (!g)
                return NULL;
        for (size_t i = 0; i < g->n_devs; i++)
                gpu_worker_stop(&g->devs[i].worker);
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
        if (!g || i >= g->n_devs)
                return 0;
        return g->devs[i].info.total_bytes - atomic_load(&g->devs[i].used);
}

int gpu_slab_new(Gpu *g, size_t i, uint64_t bytes, GpuSlab **ret, WdError *err) {
        _cleanup_(gpu_slab_freep) GpuSlab *s = NULL;
        uint64_t used, map_size = ALIGN_UP(MAX(bytes, 1u), EMU_GRANULARITY);
        EmuDev *d;
        void *p;

        if (!g || i >= g->n_devs)
                return wd_error_set(err, -ENODEV, "no such device");
        d = &g->devs[i];
        s = calloc(1, sizeof(GpuSlab));
        if (!s)
                return wd_error_set(err, -ENOMEM, "out of memory");
        *s = (GpuSlab){ .dev = d, .index = i, .size = bytes, .fd = -1 };

        /* Device memory is finite: take it like an allocator would.  Only
         * what was taken goes into s->map_size, which gpu_slab_free() gives
         * back. */
        used = atomic_load(&d->used);
        do
                if (map_size > d->info.total_bytes - used)
                        return wd_error_set(err, -ENOMEM,
                                            "cuda:%u: cannot allocate %llu bytes of device memory: "
                                            "CUDA_ERROR_OUT_OF_MEMORY (emulated, %llu of %llu in use)",
                                            d->info.index, (unsigned long long) map_size,
                                            (unsigned long long) used, (unsigned long long) d->info.total_bytes);
        while (!atomic_compare_exchange_weak(&d->used, &used, used + map_size));
        s->map_size = map_size;

        s->fd = memfd_create("weightd-emulated-device-slab", MFD_CLOEXEC);
        if (s->fd < 0 || ftruncate(s->fd, (off_t) s->map_size) < 0) {
                int r = -errno;

                atomic_fetch_sub(&d->used, s->map_size);
                s->map_size = 0;
                return wd_error_set(err, r, "cannot create an emulated device slab: %s", strerror(-r));
        }
        p = mmap(NULL, s->map_size, PROT_READ | PROT_WRITE, MAP_SHARED, s->fd, 0);
        if (p == MAP_FAILED) {
                int r = -errno;

                atomic_fetch_sub(&d->used, s->map_size);
                s->map_size = 0;
                return wd_error_set(err, r, "cannot map an emulated device slab: %s", strerror(-r));
        }
        s->base = p;
        *ret = TAKE_PTR(s);
        return 0;
}

GpuSlab *gpu_slab_free(GpuSlab *s) {
        if (!s)
                return NULL;
        if (s->base)
                munmap(s->base, s->map_size);
        if (s->map_size > 0)
                atomic_fetch_sub(&s->dev->used, s->map_size);
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
        return s->index;
}

void *gpu_slab_address(const GpuSlab *s) {
        return s->base;
}

/* Host memory needs no page-locking here. */
int gpu_host_register(Gpu *g, void *p, uint64_t size, bool read_only, WdError *err) {
        return 0;
}

void gpu_host_unregister(Gpu *g, void *p) {
}

/* ---- what the copy engine calls (through emu_ops) ---------------------- */

static GpuWorker *emu_worker(Gpu *g, size_t dev) {
        return dev < g->n_devs ? &g->devs[dev].worker : NULL;
}

/* A step is done when issued: memcpy, row by row. */
static int emu_issue(GpuCopy *c, const CopyStep *step) {
        const ShardCopy *k = &step->copy;
        const uint8_t *src = c->files[step->file]->data + k->src;
        uint8_t *dst = c->slab->base + k->dst;

        for (uint64_t row = 0; row < k->height; row++)
                memcpy(dst + row * k->dst_pitch, src + row * k->src_pitch, k->width);
        return 0;
}

static void emu_batch_end(GpuCopy *c, uint64_t bytes) {
        atomic_fetch_add(&c->copied, bytes);
}

static bool emu_poll(GpuCopy *c, bool wait) {
        return false;
}

static void emu_pending_free(GpuCopy *c) {
}

static const GpuBackendOps emu_ops = {
        .worker = emu_worker,
        .slab_new = gpu_slab_new,
        .slab_free = gpu_slab_free,
        .host_register = gpu_host_register,
        .issue = emu_issue,
        .batch_end = emu_batch_end,
        .poll = emu_poll,
        .pending_free = emu_pending_free,
};
