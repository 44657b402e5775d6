/* Emulated devices in host memory, for testing the GPU tier's server side
 * (device loads, their budgets, fan-out, keep_host, sharded device slabs,
 * leases of device memory) on machines without a GPU.  Built instead of
 * gpu-cuda.c with -Dgpu_emulation=true, never in a release build.
 *
 * $WEIGHTD_EMULATED_GPUS = "N:SIZE" makes N devices of SIZE bytes ("2:256M")
 * named "Emulated GPU" with fixed UUIDs.  A device slab is a memfd of its
 * map size, filled through the daemon's own mapping and exported as that
 * memfd, so a test maps the descriptor a Load sends and compares bytes.  A
 * copy runs on the device's thread exactly as the CUDA one does, in the
 * order copy-sched.c gives, with memcpy instead of cudaMemcpy2DAsync; the
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

#include "gpu/copy-sched.h"
#include "gpu/gpu.h"
#include "util/parse-util.h"
#include "util/thread-util.h"

#define EMU_GRANULARITY (2u << 20)
#define EMU_PIECE_MIN (1u << 20)

typedef struct EmuDev EmuDev;

struct Gpu {
        EmuDev *devs;
        size_t n_devs;
};

struct EmuDev {
        Gpu *gpu;
        GpuDeviceInfo info;
        pthread_t thread;
        bool thread_started;
        pthread_mutex_t lock;
        pthread_cond_t cond;
        bool stopping;     /* under lock */
        bool kick;         /* under lock */
        GpuCopy *incoming; /* under lock */
        GpuCopy *active;   /* device thread only */
        _Atomic uint64_t used; /* bytes of live slabs */
};

struct GpuSlab {
        EmuDev *dev;
        size_t index;
        uint8_t *base;
        uint64_t size, map_size;
        int fd;
};

struct GpuCopy {
        EmuDev *dev;
        size_t dev_index;
        const ShardPlan *plan;
        Slab **files;
        size_t n_files;
        gpu_copy_fn wake;
        void *userdata;
        GpuCopy *next;

        _Atomic uint64_t *filled;
        atomic_bool cancelled;
        atomic_bool finished;
        _Atomic uint64_t copied;
        uint64_t total;

        CopySched sched; /* device thread only */
        uint64_t *snapshot;
        bool started;
        GpuSlab *slab;
        int error;
        WdError err;
};

bool gpu_built(void) {
        return true;
}

static void *device_thread(void *arg);

static void device_stop(EmuDev *d) {
        if (!d->thread_started)
                return;
        pthread_mutex_lock(&d->lock);
        d->stopping = true;
        pthread_cond_signal(&d->cond);
        pthread_mutex_unlock(&d->lock);
        pthread_join(d->thread, NULL);
        pthread_cond_destroy(&d->cond);
        pthread_mutex_destroy(&d->lock);
        d->thread_started = false;
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
        if (!g || !(g->devs = calloc(count, sizeof(EmuDev))))
                return wd_error_set(err, -ENOMEM, "out of memory");
        for (unsigned i = 0; i < count; i++) {
                EmuDev *d = &g->devs[g->n_devs];
                bool wanted = n_only == 0;
                int r;

                for (size_t k = 0; k < n_only; k++)
                        wanted = wanted || only[k] == i;
                if (!wanted)
                        continue;
                d->gpu = g;
                d->info = (GpuDeviceInfo){ .index = i, .total_bytes = size, .granularity = EMU_GRANULARITY };
                snprintf(d->info.name, sizeof(d->info.name), "Emulated GPU");
                snprintf(d->info.uuid, sizeof(d->info.uuid), "GPU-00000000-0000-4000-8000-%012x", i);
                snprintf(d->info.pci_bus_id, sizeof(d->info.pci_bus_id), "0000:%02x:00.0", i);
                r = pthread_mutex_init(&d->lock, NULL);
                if (r == 0) {
                        r = pthread_cond_init(&d->cond, NULL);
                        if (r != 0)
                                pthread_mutex_destroy(&d->lock);
                }
                if (r == 0) {
                        r = thread_create_nosignals(&d->thread, device_thread, d);
                        if (r != 0) {
                                pthread_cond_destroy(&d->cond);
                                pthread_mutex_destroy(&d->lock);
                        }
                }
                if (r != 0)
                        return wd_error_set(err, -r, "cannot start an emulated device's thread: %s", strerror(r));
                d->thread_started = true;
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
                device_stop(&g->devs[i]);
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

/* Host memory needs no page-locking here. */
int gpu_host_register(Gpu *g, void *p, uint64_t size, bool read_only, WdError *err) {
        return 0;
}

void gpu_host_unregister(Gpu *g, void *p) {
}

static void device_kick(EmuDev *d) {
        pthread_mutex_lock(&d->lock);
        d->kick = true;
        pthread_cond_signal(&d->cond);
        pthread_mutex_unlock(&d->lock);
}

int gpu_copy_new(Gpu *g, size_t dev, const ShardPlan *plan, Slab *const *files, size_t n_files, bool read_only,
                 gpu_copy_fn wake, void *userdata, GpuCopy **ret) {
        _cleanup_(gpu_copy_freep) GpuCopy *c = NULL;
        EmuDev *d;

        if (!g || dev >= g->n_devs)
                return -ENODEV;
        d = &g->devs[dev];
        c = calloc(1, sizeof(GpuCopy));
        if (!c)
                return -ENOMEM;
        *c = (GpuCopy){ .dev = d, .dev_index = dev, .plan = plan, .n_files = n_files, .wake = wake,
                        .userdata = userdata };
        c->files = calloc(MAX(n_files, 1u), sizeof(Slab *));
        c->filled = calloc(MAX(n_files, 1u), sizeof(*c->filled));
        c->snapshot = calloc(MAX(n_files, 1u), sizeof(uint64_t));
        if (!c->files || !c->filled || !c->snapshot || copy_sched_init(&c->sched, plan, n_files, EMU_PIECE_MIN) < 0)
                return -ENOMEM;
        memcpy(c->files, files, n_files * sizeof(Slab *));
        c->total = copy_sched_total(&c->sched);

        pthread_mutex_lock(&d->lock);
        c->next = d->incoming;
        d->incoming = c;
        d->kick = true;
        pthread_cond_signal(&d->cond);
        pthread_mutex_unlock(&d->lock);
        *ret = TAKE_PTR(c);
        return 0;
}

void gpu_copy_advance(GpuCopy *c, size_t file, uint64_t filled) {
        uint64_t old;

        if (file >= c->n_files)
                return;
        old = atomic_load(&c->filled[file]);
        while (filled > old)
                if (atomic_compare_exchange_weak(&c->filled[file], &old, filled)) {
                        device_kick(c->dev);
                        break;
                }
}

void gpu_copy_advance_all(GpuCopy *c) {
        for (size_t f = 0; f < c->n_files; f++)
                atomic_store(&c->filled[f], UINT64_MAX);
        device_kick(c->dev);
}

void gpu_copy_cancel(GpuCopy *c) {
        atomic_store(&c->cancelled, true);
        device_kick(c->dev);
}

uint64_t gpu_copy_copied(const GpuCopy *c) {
        return atomic_load(&((GpuCopy *) c)->copied);
}

uint64_t gpu_copy_total(const GpuCopy *c) {
        return c->total;
}

bool gpu_copy_finished(GpuCopy *c, int *ret_error, WdError *err) {
        if (!atomic_load(&c->finished))
                return false;
        *ret_error = c->error;
        if (c->error != 0 && err)
                *err = c->err;
        return true;
}

GpuSlab *gpu_copy_take_slab(GpuCopy *c) {
        if (!atomic_load(&c->finished) || c->error != 0)
                return NULL;
        return TAKE_PTR(c->slab);
}

GpuCopy *gpu_copy_free(GpuCopy *c) {
        if (!c)
                return NULL;
        gpu_slab_free(c->slab);
        copy_sched_deinit(&c->sched);
        free(c->snapshot);
        free(c->files);
        free((void *) c->filled);
        free(c);
        return NULL;
}

/* One round: create the slab first, then copy what the watermarks allow.
 * Returns whether it moved; *ret_finished when it ended. */
static bool copy_step(GpuCopy *c, bool *ret_finished) {
        bool moved = false;
        CopyStep step;

        if (!c->started) {
                c->started = true;
                moved = true;
                c->error = gpu_slab_new(c->dev->gpu, c->dev_index, c->plan->bytes, &c->slab, &c->err);
        }
        for (size_t f = 0; f < c->n_files; f++)
                c->snapshot[f] = atomic_load(&c->filled[f]);
        while (c->error == 0 && !atomic_load(&c->cancelled) && copy_sched_next(&c->sched, c->snapshot, &step)) {
                const ShardCopy *k = &step.copy;
                const uint8_t *src = c->files[step.file]->data + k->src;
                uint8_t *dst = c->slab->base + k->dst;

                for (uint64_t row = 0; row < k->height; row++)
                        memcpy(dst + row * k->dst_pitch, src + row * k->src_pitch, k->width);
                atomic_fetch_add(&c->copied, k->width * k->height);
                moved = true;
        }
        if (c->error != 0 || atomic_load(&c->cancelled) || copy_sched_done(&c->sched)) {
                if (c->error == 0 && !copy_sched_done(&c->sched))
                        c->error = wd_error_set(&c->err, -ECANCELED, "copy to cuda:%u cancelled", c->dev->info.index);
                *ret_finished = true;
        }
        return moved;
}

static void *device_thread(void *arg) {
        EmuDev *d = arg;

        for (;;) {
                pthread_mutex_lock(&d->lock);
                while (!d->stopping && !d->kick && !d->incoming)
                        pthread_cond_wait(&d->cond, &d->lock);
                if (d->stopping) {
                        pthread_mutex_unlock(&d->lock);
                        break;
                }
                d->kick = false;
                while (d->incoming) {
                        GpuCopy *c = d->incoming;

                        d->incoming = c->next;
                        c->next = d->active;
                        d->active = c;
                }
                pthread_mutex_unlock(&d->lock);

                /* The owner may free a copy once it is marked finished: unlink
                 * it first and use nothing of it after but the callback. */
                for (GpuCopy **pp = &d->active; *pp;) {
                        GpuCopy *c = *pp;
                        gpu_copy_fn wake = c->wake;
                        void *userdata = c->userdata;
                        bool finished = false, moved;

                        moved = copy_step(c, &finished);
                        if (finished) {
                                *pp = c->next;
                                atomic_store(&c->finished, true);
                        } else
                                pp = &c->next;
                        if (moved || finished)
                                wake(c, userdata);
                }
        }
        return NULL;
}
