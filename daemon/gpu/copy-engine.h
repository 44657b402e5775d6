/* The half of the GPU tier's copies that does not depend on how bytes reach
 * a device: a worker thread per device, the copies it drives, their
 * watermarks, cancellation and end, in the order copy-sched.c gives.
 * copy-engine.c implements the gpu_copy_*() functions of gpu.h with it; a
 * backend (gpu-cuda.c, or gpu-emulated.c for tests) supplies the device
 * slabs, the page-locking and the gpu_backend_*() calls below, so the
 * emulated devices exercise this very code.
 *
 * Private to daemon/gpu/. */
#pragma once

#include <pthread.h>
#include <stdatomic.h>

#include "gpu/copy-sched.h"
#include "gpu/gpu.h"

/* The backend's batches in flight (gpu-cuda.c: one CUDA event each). */
typedef struct GpuPending GpuPending;

/* One device's copy thread.  A backend embeds it in its device and sets
 * gpu, dev, ordinal and piece_min before gpu_worker_start(). */
typedef struct GpuWorker {
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
} GpuWorker;

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

/* ---- what a backend provides -------------------------------------------- */

/* The worker of device dev, NULL when there is none. */
GpuWorker *gpu_backend_worker(Gpu *g, size_t dev);
/* On the worker's thread, before anything else (CUDA: select the device). */
void gpu_backend_thread_init(GpuWorker *w);
/* Issue one step of c into c->slab.  Returns 0, or -errno with c->err set. */
int gpu_backend_issue(GpuCopy *c, const CopyStep *step);
/* The steps issued since the last call, bytes in all, form a batch: track
 * its end (or count it copied, where issuing copied it). */
void gpu_backend_batch_end(GpuCopy *c, uint64_t bytes);
/* Retire the batches that ended, adding their bytes to c->copied; with
 * wait, block for the oldest first.  Returns whether any ended. */
bool gpu_backend_poll(GpuCopy *c, bool wait);
/* Drop what is still tracked (c is being freed). */
void gpu_backend_pending_free(GpuCopy *c);
