/* Device copies, whatever the backend: see copy-engine.h.
 *
 * A worker thread moves new copies from its incoming list to its active
 * list, and for each active copy runs rounds: the first creates the device
 * slab and page-locks the host slabs, each then issues what the files'
 * watermarks allow as one batch and retires the batches that ended.  It
 * sleeps on its condition variable when no copy has news and nothing is in
 * flight, and blocks on a batch only when nothing else moved in that round.
 * Owners hear of progress and of the end through the copy's callback.
 *
 * The end is published with one release store of c->finished, the worker's
 * last touch of the copy: the callback's pointers are read and the copy is
 * unlinked from the worker's lists before it, and the last callback runs
 * from those copies, so that the owner may free the copy the moment it sees
 * the store.  The backend is reached only through its GpuBackendOps. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/copy-engine.h"
#include "util/thread-util.h"

static void *worker_thread(void *arg);

int gpu_worker_start(GpuWorker *w, WdError *err) {
        int r;

        if (!w->gpu || !gpu_ops(w->gpu))
                return wd_error_set(err, -EINVAL, "cuda:%u: no backend for its copy thread", w->ordinal);

        r = pthread_mutex_init(&w->lock, NULL);
        if (r != 0)
                return wd_error_set(err, -r, "cannot create a lock");
        r = pthread_cond_init(&w->cond, NULL);
        if (r != 0) {
                pthread_mutex_destroy(&w->lock);
                return wd_error_set(err, -r, "cannot create a condition variable");
        }
        r = thread_create_nosignals(&w->thread, worker_thread, w);
        if (r != 0) {
                pthread_cond_destroy(&w->cond);
                pthread_mutex_destroy(&w->lock);
                return wd_error_set(err, -r, "cuda:%u: cannot start its copy thread: %s", w->ordinal, strerror(r));
        }
        w->thread_started = true;
        return 0;
}

void gpu_worker_stop(GpuWorker *w) {
        if (!w->thread_started)
                return;
        pthread_mutex_lock(&w->lock);
        w->stopping = true;
        pthread_cond_signal(&w->cond);
        pthread_mutex_unlock(&w->lock);
        pthread_join(w->thread, NULL);
        pthread_cond_destroy(&w->cond);
        pthread_mutex_destroy(&w->lock);
        w->thread_started = false;
}

static void worker_kick(GpuWorker *w) {
        pthread_mutex_lock(&w->lock);
        w->kick = true;
        pthread_cond_signal(&w->cond);
        pthread_mutex_unlock(&w->lock);
}

int gpu_copy_new(Gpu *g, size_t dev, const ShardPlan *plan, Slab *const *files, size_t n_files, bool read_only,
                 gpu_copy_fn wake, void *userdata, GpuCopy **ret) {
        _cleanup_(gpu_copy_freep) GpuCopy *c = NULL;
        GpuWorker *w = g ? gpu_ops(g)->worker(g, dev) : NULL;

        if (!w)
                return -ENODEV;
        c = calloc(1, sizeof(GpuCopy));
        if (!c)
                return -ENOMEM;
        *c = (GpuCopy){ .worker = w, .plan = plan, .n_files = n_files, .read_only = read_only, .wake = wake,
                        .userdata = userdata };
        c->files = calloc(MAX(n_files, 1u), sizeof(Slab *));
        c->filled = calloc(MAX(n_files, 1u), sizeof(*c->filled));
        c->snapshot = calloc(MAX(n_files, 1u), sizeof(uint64_t));
        if (!c->files || !c->filled || !c->snapshot || copy_sched_init(&c->sched, plan, n_files, w->piece_min) < 0)
                return -ENOMEM;
        memcpy(c->files, files, n_files * sizeof(Slab *));
        c->total = copy_sched_total(&c->sched);

        pthread_mutex_lock(&w->lock);
        c->next = w->incoming;
        w->incoming = c;
        w->kick = true;
        pthread_cond_signal(&w->cond);
        pthread_mutex_unlock(&w->lock);
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
                        worker_kick(c->worker);
                        break;
                }
}

void gpu_copy_advance_all(GpuCopy *c) {
        for (size_t f = 0; f < c->n_files; f++)
                atomic_store(&c->filled[f], UINT64_MAX);
        worker_kick(c->worker);
}

void gpu_copy_cancel(GpuCopy *c) {
        atomic_store(&c->cancelled, true);
        worker_kick(c->worker);
}

uint64_t gpu_copy_copied(const GpuCopy *c) {
        return atomic_load(&((GpuCopy *) c)->copied);
}

uint64_t gpu_copy_total(const GpuCopy *c) {
        return c->total;
}

bool gpu_copy_finished(GpuCopy *c, int *ret_error, WdError *err) {
        /* Pairs with the worker's release store: error and err are in. */
        if (!atomic_load_explicit(&c->finished, memory_order_acquire))
                return false;
        *ret_error = c->error;
        if (c->error != 0 && err)
                *err = c->err;
        return true;
}

GpuSlab *gpu_copy_take_slab(GpuCopy *c) {
        if (!atomic_load_explicit(&c->finished, memory_order_acquire) || c->error != 0)
                return NULL;
        return TAKE_PTR(c->slab);
}

GpuCopy *gpu_copy_free(GpuCopy *c) {
        const GpuBackendOps *ops;

        if (!c)
                return NULL;
        ops = gpu_ops(c->worker->gpu);
        ops->pending_free(c);
        ops->slab_free(c->slab);
        copy_sched_deinit(&c->sched);
        free(c->snapshot);
        free(c->files);
        free((void *) c->filled);
        free(c);
        return NULL;
}

static void copy_fail(GpuCopy *c, int r) {
        if (c->error == 0)
                c->error = r;
}

/* Issue what the watermarks allow as one batch.  Returns whether anything
 * was issued. */
static bool copy_issue(GpuCopy *c) {
        const GpuBackendOps *ops = gpu_ops(c->worker->gpu);
        uint64_t batch = 0;
        CopyStep step;
        int r;

        for (size_t f = 0; f < c->n_files; f++)
                c->snapshot[f] = atomic_load(&c->filled[f]);
        while (c->error == 0 && copy_sched_next(&c->sched, c->snapshot, &step)) {
                r = ops->issue(c, &step);
                if (r < 0)
                        copy_fail(c, r);
                else
                        batch += step.copy.width * step.copy.height;
        }
        if (batch == 0)
                return false;
        ops->batch_end(c, batch);
        return true;
}

/* One round of a copy.  Returns whether it moved; *ret_finished says
 * whether it ended (c->error tells how). */
static bool copy_step(GpuCopy *c, bool wait, bool *ret_finished) {
        GpuWorker *w = c->worker;
        const GpuBackendOps *ops = gpu_ops(w->gpu);
        bool moved = false;
        int r;

        if (!c->started) {
                c->started = true;
                moved = true;
                r = ops->slab_new(w->gpu, w->dev, c->plan->bytes, &c->slab, &c->err);
                if (r < 0)
                        copy_fail(c, r);
                for (size_t f = 0; f < c->n_files && c->error == 0; f++) {
                        r = ops->host_register(w->gpu, c->files[f]->data, c->files[f]->capacity, c->read_only,
                                               &c->err);
                        if (r < 0)
                                copy_fail(c, r);
                }
        }
        if (c->error == 0 && !atomic_load(&c->cancelled))
                moved |= copy_issue(c);
        if (ops->poll(c, wait && !moved))
                moved = true;
        if (!c->pending && (c->error != 0 || atomic_load(&c->cancelled) || copy_sched_done(&c->sched))) {
                if (c->error == 0 && !copy_sched_done(&c->sched))
                        c->error = wd_error_set(&c->err, -ECANCELED, "copy to cuda:%u cancelled", w->ordinal);
                *ret_finished = true;
        }
        return moved;
}

static void *worker_thread(void *arg) {
        GpuWorker *w = arg;
        const GpuBackendOps *ops = gpu_ops(w->gpu);

        if (ops->thread_init)
                ops->thread_init(w);
        for (;;) {
                bool moved = false, pending = false;

                pthread_mutex_lock(&w->lock);
                for (GpuCopy *c = w->active; c; c = c->next)
                        pending = pending || c->pending;
                while (!w->stopping && !w->kick && !w->incoming && !pending)
                        pthread_cond_wait(&w->cond, &w->lock);
                if (w->stopping) {
                        pthread_mutex_unlock(&w->lock);
                        break;
                }
                w->kick = false;
                while (w->incoming) {
                        GpuCopy *c = w->incoming;

                        w->incoming = c->next;
                        c->next = w->active;
                        w->active = c;
                }
                pthread_mutex_unlock(&w->lock);

                for (GpuCopy **pp = &w->active; *pp;) {
                        GpuCopy *c = *pp;
                        gpu_copy_fn wake = c->wake;
                        void *userdata = c->userdata;
                        bool finished = false, m;

                        /* Block on a batch only when nothing else moved this round. */
                        m = copy_step(c, !c->next && !moved, &finished);
                        moved = moved || m;
                        if (!finished) {
                                pp = &c->next;
                                if (m)
                                        wake(c, userdata);
                                continue;
                        }
                        /* The owner may free c (and it alone) as soon as
                         * the store below is visible: unlink it first, and
                         * make the store the last touch.  wake and userdata
                         * were read before; userdata outlives the copy, and
                         * the callback must not dereference c. */
                        *pp = c->next;
                        atomic_store_explicit(&c->finished, true, memory_order_release);
                        if (gpu_copy_test_after_finish)
                                gpu_copy_test_after_finish();
                        wake(c, userdata);
                }
        }
        return NULL;
}
