/* The half of the GPU tier's copies that does not depend on how bytes reach
 * a device: a worker thread per device, the copies it drives, their
 * watermarks, cancellation and end, in the order copy-sched.c gives.
 * copy-engine.c implements the gpu_copy_*() functions of gpu.h with it; a
 * backend (gpu-cuda.c, or gpu-emulated.c for tests) supplies the device
 * slabs, the page-locking and the steps through a GpuBackendOps table, so
 * the emulated devices exercise this very code.
 *
 * Calls run one way: a backend calls the engine by name (gpu_worker_*()),
 * the engine reaches the backend only through the table that the backend's
 * struct Gpu starts with (GpuBase).
 *
 * Private to daemon/gpu/. */
#pragma once

#include <pthread.h>
#include <stdatomic.h>

#include "gpu/copy-sched.h"
#include "gpu/gpu.h"

/* The backend's batches in flight (gpu-cuda.c: one CUDA event each). */
typedef struct GpuPending GpuPending;
typedef struct GpuWorker GpuWorker;

/* What a backend provides, as a table of its own functions. */
typedef struct GpuBackendOps {
        /* The worker of device dev, NULL when there is none. */
        GpuWorker *(*worker)(Gpu *g, size_t dev);
        /* gpu.h's gpu_slab_new(), gpu_slab_free() and gpu_host_register() of
         * this backend. */
        int (*slab_new)(Gpu *g, size_t dev, uint64_t bytes, GpuSlab **ret, WdError *err);
        GpuSlab *(*slab_free)(GpuSlab *s);
        int (*host_register)(Gpu *g, void *p, uint64_t size, bool read_only, WdError *err);
        /* On the worker's thread, before anything else (CUDA: select the
         * device).  May be NULL. */
        void (*thread_init)(GpuWorker *w);
        /* Issue one step of c into c->slab.  Returns 0, or -errno with c->err
         * set. */
        int (*issue)(GpuCopy *c, const CopyStep *step);
        /* The steps issued since the last call, bytes in all, form a batch:
         * track its end (or count it copied, where issuing copied it). */
        void (*batch_end)(GpuCopy *c, uint64_t bytes);
        /* Retire the batches that ended, adding their bytes to c->copied;
         * with wait, block for the oldest first.  Returns whether any
         * ended. */
        bool (*poll)(GpuCopy *c, bool wait);
        /* Drop what is still tracked (c is being freed). */
        void (*pending_free)(GpuCopy *c);
} GpuBackendOps;

/* The first member of a backend's struct Gpu: how the engine finds the
 * backend's functions behind an opaque Gpu. */
typedef struct GpuBase {
        const GpuBackendOps *ops;
} GpuBase;

static inline const GpuBackendOps *gpu_ops(const Gpu *g) {
        return ((const GpuBase *) (const void *) g)->ops;
}

/* One device's copy thread.  A backend embeds it in its device and sets
 * gpu (whose GpuBase carries the backend's table), dev, ordinal and
 * piece_min before gpu_worker_start(). */
struct GpuWorker {
        Gpu *gpu;
        size_t dev;          /* the device's index in gpu */
        unsigned ordinal;    /* cuda:N, for messages */
        uint64_t piece_min;  /* smallest piece of a one-row copy that does not end its tensor */
        pthread_t thread;
        bool thread_started;
        pthread_mutex_t lock;
        pthread_cond_t cond;
        bool stopping;       /* under lock */
        bool kick;           /* under lock: a copy has news */
        GpuCopy *incoming;   /* under lock */
        GpuCopy *active;     /* worker thread only */
};

struct GpuCopy {
        GpuWorker *worker;
        const ShardPlan *plan;
        Slab **files;
        size_t n_files;
        bool read_only;
        gpu_copy_fn wake;
        void *userdata;
        GpuCopy *next; /* in the worker's lists */

        _Atomic uint64_t *filled; /* per file */
        atomic_bool cancelled;
        atomic_bool finished;
        _Atomic uint64_t copied;
        uint64_t total;

        /* Worker thread only, until finished. */
        CopySched sched;
        uint64_t *snapshot; /* per file: filled, as read for one round */
        bool started;
        GpuPending *pending, *pending_tail; /* the backend's queue; pending is NULL when nothing is in flight */
        GpuSlab *slab;
        int error;
        WdError err;
};

/* Start and stop the thread (its lock and condition variable too).
 * gpu_worker_stop() accepts a worker that never started. */
int gpu_worker_start(GpuWorker *w, WdError *err);
void gpu_worker_stop(GpuWorker *w);

/* Tests only: when a test program defines this function, the worker calls
 * it right after it published a copy's end (gpu_copy_finished() turns
 * true), to widen the window in which the owner frees the copy.  Not
 * defined in the daemon (a weak reference, NULL there). */
void gpu_copy_test_after_finish(void) __attribute__((weak));
