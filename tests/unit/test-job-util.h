/* Helpers shared by the job tests (test-job.c and the kinds' tests): a
 * real libuv loop with the real completion queue, background worker,
 * reader and host cache (a Store as the server fills it in, without the
 * server), safetensors files generated into a scratch directory and
 * resolved with the real catalog, and a recording waiter standing in for
 * requests: it records the progress and the outcome it hears, in which
 * order, and whether it was off the job by then.
 *
 * The reader's test hook (io/reader.h) is defined here: with slow_read_usec
 * set, the reader thread sleeps before each submission, so that a read of
 * many small chunks at queue depth 1 is slow enough to be cancelled or to
 * have its file rewritten halfway. */
#pragma once

#include <errno.h>
#include <liburing.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <uv.h>

#include "format/catalog.h"
#include "store/host-load.h"
#include "store/job.h"
#include "store/store.h"
#include "test-components.h"
#include "test-util.h"
#include "util/time-util.h"

/* ---- the reader's test hook -------------------------------------------- */

static atomic_uint slow_read_usec;

int reader_test_submit_and_wait(struct io_uring *ring, unsigned wait_nr);
int reader_test_submit_and_wait(struct io_uring *ring, unsigned wait_nr) {
        unsigned d = atomic_load(&slow_read_usec);

        if (d > 0 && io_uring_sq_ready(ring) > 0)
                usleep(d);
        return io_uring_submit_and_wait(ring, wait_nr);
}

/* ---- the recording waiter ---------------------------------------------- */

typedef struct Rec Rec;
struct Rec {
        JobWaiter w;
        unsigned id;
        unsigned n_progress, n_done;
        uint64_t done, total, copied; /* the last progress */
        bool progress_after_done;
        int r;
        char msg[WD_ERROR_MESSAGE_MAX];
        CacheEntry *entry; /* referenced, from a DONE outcome */
        bool had_plan;
        bool off_at_done; /* w.job was NULL in the callback */
        Job *watch;       /* if set (and kept alive by the test): its state at the outcome */
        JobState watch_state;
        void (*on_progress)(Rec *r);
        void (*on_done)(Rec *r); /* may free r */
        void *data;
};

/* The order in which waiters heard outcomes (their ids). */
static unsigned done_order[64];
static unsigned n_done_order;

static void rec_progress(JobWaiter *w, uint64_t done, uint64_t total, uint64_t copied) {
        Rec *r = container_of(w, Rec, w);

        if (r->n_done > 0)
                r->progress_after_done = true;
        r->n_progress++;
        r->done = done;
        r->total = total;
        r->copied = copied;
        if (r->on_progress)
                r->on_progress(r);
}

static void rec_done(JobWaiter *w, const JobOutcome *o) {
        Rec *r = container_of(w, Rec, w);

        r->n_done++;
        r->r = o->r;
        r->off_at_done = w->job == NULL;
        snprintf(r->msg, sizeof(r->msg), "%s", o->err ? o->err->message : "");
        if (o->r == 0 && o->entry && !r->entry)
                r->entry = cache_entry_ref(o->entry);
        r->had_plan = o->plan != NULL;
        if (r->watch)
                r->watch_state = r->watch->state;
        if (n_done_order < ELEMENTSOF(done_order))
                done_order[n_done_order++] = r->id;
        if (r->on_done)
                r->on_done(r); /* last: it may free r */
}

static const JobWaiterOps rec_ops = {
        .progress = rec_progress,
        .done = rec_done,
};

static inline void rec_init(Rec *r, unsigned id) {
        *r = (Rec){ .id = id, .r = INT_MIN };
}

static inline void rec_join(Rec *r, Job *j) {
        job_add_waiter(j, &r->w, &rec_ops);
}

static inline void rec_release(Rec *r) {
        cache_entry_unref(TAKE_PTR(r->entry));
}

/* ---- the fixture: loop, queue, worker, reader, host cache --------------- */

typedef struct Fx {
        uv_loop_t loop;
        uv_timer_t tick; /* so that UV_RUN_ONCE comes back to check */
        CompletionQueue queue;
        Worker worker;
        Store store;
        char *dir;
        int root_fd;
        Catalog *catalog;
} Fx;

static void tick_cb(uv_timer_t *t) {
}

static inline Fx *fx_new(const ReaderParams *rp, uint64_t host_budget) {
        ReaderParams def = READER_PARAMS_DEFAULT;
        Fx *f = calloc(1, sizeof(Fx));

        assert_non_null(f);
        atomic_store(&slow_read_usec, 0);
        n_done_order = 0;
        assert_int_equal(uv_loop_init(&f->loop), 0);
        assert_int_equal(uv_timer_init(&f->loop, &f->tick), 0);
        assert_int_equal(uv_timer_start(&f->tick, tick_cb, 5, 5), 0);
        assert_int_equal(completion_queue_init(&f->queue, &f->loop), 0);
        assert_int_equal(worker_start(&f->worker, &f->queue), 0);
        assert_int_equal(cache_new(&f->store.cache, "host", host_budget), 0);
        assert_int_equal(reader_new(&f->store.reader, rp ? rp : &def), 0);
        f->store.load_opts = (LoadOptions){ .direct = DIRECT_AUTO, .pages = SLAB_PAGES_SMALL };
        f->store.queue = &f->queue;
        f->store.worker = &f->worker;
        assert_int_equal(completion_queue_add_hook(&f->queue, (completion_hook_fn) job_list_poll, &f->store.jobs), 0);
        f->dir = make_temp_dir(NULL);
        f->root_fd = open(f->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        assert_true(f->root_fd >= 0);
        assert_int_equal(catalog_new(&f->catalog, f->root_fd, f->dir), 0);
        return f;
}

/* Every job must have ended, and the test must have dropped its entries. */
static inline void fx_free(Fx *f) {
        atomic_store(&slow_read_usec, 0);
        assert_int_equal(f->store.jobs.n, 0);
        worker_stop(&f->worker);
        completion_queue_drain(&f->queue);
        reader_free(f->store.reader);
        cache_free(f->store.cache);
        catalog_free(f->catalog);
        close(f->root_fd);
        completion_queue_close(&f->queue);
        uv_close((uv_handle_t *) &f->tick, NULL);
        assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
        assert_int_equal(uv_loop_close(&f->loop), 0);
        remove_tree(f->dir);
        free(f->dir);
        free(f);
}

/* A slow reader (one 4 KiB read in flight), for tests that act while a file
 * is being read. */
static const ReaderParams fx_slow_params = { .queue_depth = 1, .chunk_size = 4096 };

/* cmocka fixtures: an Fx with a 256 MiB host budget, the default reader or
 * the slow one. */
static inline int fx_setup(void **state) {
        *state = fx_new(NULL, 256u << 20);
        return 0;
}

static inline int fx_setup_slow(void **state) {
        *state = fx_new(&fx_slow_params, 256u << 20);
        return 0;
}

static inline int fx_teardown(void **state) {
        fx_free(*state);
        return 0;
}

/* Turn the loop until cond holds (a minute at most). */
#define RUN_UNTIL(f, cond)                                                                      \
        do {                                                                                    \
                uint64_t _deadline = now_usec() + 60ull * 1000000ull;                           \
                while (!(cond)) {                                                               \
                        if (now_usec() > _deadline)                                             \
                                fail_msg("timed out waiting for %s", #cond);                    \
                        uv_run(&(f)->loop, UV_RUN_ONCE);                                        \
                }                                                                               \
        } while (0)

/* Turn the loop for usec, whatever happens. */
static inline void fx_run_for(Fx *f, uint64_t usec) {
        uint64_t end = now_usec() + usec;

        while (now_usec() < end)
                uv_run(&f->loop, UV_RUN_ONCE);
}

/* Write a safetensors file of the given tensors into the scratch directory,
 * its mtime set back a day, so that a rewrite in place is seen even within
 * one tick of the file system's clock. */
static inline void fx_write_model(Fx *f, const char *name, const TSpec *ts, size_t n, uint32_t seed) {
        _cleanup_free_ char *path = NULL;
        struct timespec times[2];
        TFile tf = make_file(ts, n, seed);
        FILE *out;

        assert_true(asprintf(&path, "%s/%s", f->dir, name) > 0);
        out = fopen(path, "we");
        assert_non_null(out);
        assert_int_equal(fwrite(tf.buf, 1, tf.size, out), tf.size);
        assert_int_equal(fclose(out), 0);
        free(tf.buf);
        assert_int_equal(clock_gettime(CLOCK_REALTIME, &times[0]), 0);
        times[0].tv_sec -= 86400;
        times[1] = times[0];
        assert_int_equal(utimensat(AT_FDCWD, path, times, 0), 0);
}

static inline char *fx_path(Fx *f, const char *name) {
        char *p = NULL;

        assert_true(asprintf(&p, "%s/%s", f->dir, name) > 0);
        return p;
}

static inline Component *fx_resolve(Fx *f, const char *name) {
        WdError err = WD_ERROR_NULL;
        Component *c = NULL;

        if (catalog_resolve(f->catalog, name, NULL, &c, &err) != 0)
                fail_msg("%s: %s", name, err.message);
        return c;
}

/* The file's bytes, by plain read(). */
static inline uint8_t *fx_read(Fx *f, const char *name, size_t *ret_size) {
        _cleanup_free_ char *path = fx_path(f, name);
        uint8_t *b = read_file(path, ret_size);

        assert_non_null(b);
        return b;
}

/* Rewrite one byte of the data section in place (same size, same inode,
 * a new mtime): what the verification after the read must catch. */
static inline void fx_rewrite(Fx *f, const char *name, uint64_t offset) {
        _cleanup_free_ char *path = fx_path(f, name);
        _cleanup_close_ int fd = open(path, O_RDWR | O_CLOEXEC);
        uint8_t b;

        assert_true(fd >= 0);
        assert_int_equal(pread(fd, &b, 1, (off_t) offset), 1);
        b ^= 0xff;
        assert_int_equal(pwrite(fd, &b, 1, (off_t) offset), 1);
}

/* One big tensor: a file of about size bytes. */
static inline void fx_write_big(Fx *f, const char *name, uint64_t size, uint32_t seed) {
        TSpec t = { "w", DTYPE_U8, 1, { size } };

        fx_write_model(f, name, &t, 1, seed);
}

/* The job of the store's list that fills e (the host load a device load
 * started, say), referenced; NULL if none. */
static inline Job *fx_find(JobList *l, const CacheEntry *e) {
        Job *j = job_find(l, e);

        return j ? job_ref(j) : NULL;
}
