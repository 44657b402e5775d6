/* The host load (store/host-load.c) over the real loop, completion queue,
 * worker, reader, cache and slabs, with files generated here and recording
 * waiters in place of requests:
 *
 * - a cold load ends DONE, after progress reached the waiters, with the
 *   entry resident, sealed, and its bytes those of a plain read();
 * - a file rewritten in place during the read fails the verification: the
 *   outcome is FAILED (WD_E_CHANGED) naming the file, and nothing is left in
 *   the cache (the host half of the review's finding 3);
 * - the last waiter leaving cancels the read: a slow read (queue depth 1,
 *   4 KiB chunks) stops well before the file's end;
 * - a waiter that joins after the cancel moves to a restarted load and
 *   hears DONE with the right bytes, not -ECANCELED;
 * - a feed can subscribe only while the job is RUNNING; once the read ended
 *   (SEALING) it gets -EBUSY, and a feed still subscribed holds off the
 *   seal and the outcome (finding 2 made unrepresentable). */
#include "test-job-util.h"

static const TSpec two_tensors[] = {
        { "embed.weight", DTYPE_BF16, 2, { 300, 512 } },
        { "norm.bias", DTYPE_F32, 1, { 777 } },
};

static void assert_entry_is_file(Fx *f, CacheEntry *e, const char *name) {
        _cleanup_free_ uint8_t *ref = NULL;
        size_t n = 0;

        ref = fx_read(f, name, &n);
        assert_non_null(e);
        assert_int_equal(e->state, CACHE_ENTRY_RESIDENT);
        assert_int_equal(e->n_slabs, 1);
        assert_true(e->slabs[0]->sealed);
        assert_int_equal(e->slabs[0]->size, n);
        if (memcmp(e->slabs[0]->data, ref, n) != 0)
                fail_msg("%s: the slab's bytes differ from the file's", name);
}

static void test_cold_load(void **state) {
        _cleanup_(component_freep) Component *c = NULL;
        Fx *f = *state;
        WdError err = WD_ERROR_NULL;
        Job *j = NULL;
        Rec a, b;

        fx_write_model(f, "m.safetensors", two_tensors, ELEMENTSOF(two_tensors), 1);
        c = fx_resolve(f, "m.safetensors");
        if (host_load_start(&f->store, f->root_fd, c, 0, &j, &err) != 0)
                fail_msg("%s", err.message);
        assert_true(job_is_host_load(j));
        assert_int_equal(j->state, JOB_RUNNING);
        assert_ptr_equal(job_find(&f->store.jobs, j->entry), j);
        assert_int_equal(j->entry->state, CACHE_ENTRY_LOADING);
        rec_init(&a, 1);
        rec_init(&b, 2);
        a.watch = j;
        rec_join(&a, j);
        rec_join(&b, j);
        RUN_UNTIL(f, b.n_done > 0);

        assert_int_equal(a.r, 0);
        assert_int_equal(b.r, 0);
        assert_int_equal(a.watch_state, JOB_DONE);
        assert_int_equal(j->state, JOB_DONE);
        assert_int_equal(n_done_order, 2);
        assert_int_equal(done_order[0], 1);
        assert_int_equal(done_order[1], 2);
        /* Progress came before the outcome, and ended at the whole file. */
        assert_true(a.n_progress >= 1);
        assert_false(a.progress_after_done);
        assert_int_equal(a.total, c->total_bytes);
        assert_int_equal(a.done, c->total_bytes);
        assert_ptr_equal(a.entry, b.entry);
        assert_entry_is_file(f, a.entry, "m.safetensors");
        assert_null(job_find(&f->store.jobs, a.entry));
        assert_int_equal(f->store.jobs.n, 0);
        assert_int_equal(f->store.n_reading, 0);
        /* Once done, no feed can subscribe. */
        HostLoadFeed feed = { 0 };
        assert_int_equal(host_load_feed(j, &feed, NULL), -EBUSY);
        job_unref(j);
        rec_release(&a);
        rec_release(&b);
}

/* ---- a file rewritten during the read ----------------------------------- */

static bool rewritten;
static Fx *rewrite_fx;

static void rewrite_on_progress(Rec *r) {
        if (rewritten || r->done == 0)
                return;
        /* Halfway: the job is RUNNING, the read goes on. */
        assert_true(r->done < r->total);
        assert_int_equal(r->watch->state, JOB_RUNNING);
        fx_rewrite(rewrite_fx, "big.safetensors", r->total - 10);
        rewritten = true;
}

static void test_rewritten_during_read(void **state) {
        _cleanup_(component_freep) Component *c = NULL;
        Fx *f = *state;
        WdError err = WD_ERROR_NULL;
        CacheStats st;
        Job *j = NULL;
        Rec a;

        fx_write_big(f, "big.safetensors", 4u << 20, 2);
        c = fx_resolve(f, "big.safetensors");
        rewritten = false;
        rewrite_fx = f;
        atomic_store(&slow_read_usec, 200);
        if (host_load_start(&f->store, f->root_fd, c, 0, &j, &err) != 0)
                fail_msg("%s", err.message);
        rec_init(&a, 1);
        a.watch = j;
        a.on_progress = rewrite_on_progress;
        rec_join(&a, j);
        RUN_UNTIL(f, a.n_done > 0);

        assert_true(rewritten);
        assert_int_equal(a.n_done, 1);
        assert_int_equal(a.r, WD_E_CHANGED);
        assert_int_equal(a.watch_state, JOB_FAILED);
        assert_null(a.entry);
        assert_non_null(strstr(a.msg, "big.safetensors"));
        assert_non_null(strstr(a.msg, "changed"));
        cache_get_stats(f->store.cache, &st);
        assert_int_equal(st.n_entries, 0);
        assert_int_equal(st.used, 0);
        job_unref(j);
}

/* ---- cancel ------------------------------------------------------------- */

static void test_cancel_stops_read(void **state) {
        _cleanup_(component_freep) Component *c = NULL;
        const uint64_t size = 16u << 20;
        Fx *f = *state;
        WdError err = WD_ERROR_NULL;
        uint64_t before = reader_bytes_read(f->store.reader);
        CacheStats st;
        Job *j = NULL;
        Rec a;

        fx_write_big(f, "big.safetensors", size, 3);
        c = fx_resolve(f, "big.safetensors");
        atomic_store(&slow_read_usec, 500);
        if (host_load_start(&f->store, f->root_fd, c, 0, &j, &err) != 0)
                fail_msg("%s", err.message);
        rec_init(&a, 1);
        rec_join(&a, j);
        RUN_UNTIL(f, a.n_progress > 0 && a.done > 0);
        job_remove_waiter(&a.w);
        assert_true(j->cancelled);
        RUN_UNTIL(f, j->state == JOB_FAILED || j->state == JOB_DONE);
        assert_int_equal(j->state, JOB_FAILED);
        assert_int_equal(a.n_done, 0);
        /* The read stopped: far less than the file came from storage. */
        assert_true(reader_bytes_read(f->store.reader) - before < size / 2);
        cache_get_stats(f->store.cache, &st);
        assert_int_equal(st.n_entries, 0);
        assert_int_equal(st.used, 0);
        job_unref(j);
}

/* A request that joins the cancelled load moves to a restarted one. */
static void test_restart_after_cancel(void **state) {
        _cleanup_(component_freep) Component *c = NULL;
        Fx *f = *state;
        WdError err = WD_ERROR_NULL;
        Job *j = NULL;
        Rec a, b;

        fx_write_big(f, "big.safetensors", 1u << 20, 4);
        c = fx_resolve(f, "big.safetensors");
        atomic_store(&slow_read_usec, 200);
        if (host_load_start(&f->store, f->root_fd, c, 0, &j, &err) != 0)
                fail_msg("%s", err.message);
        rec_init(&a, 1);
        rec_init(&b, 2);
        rec_join(&a, j);
        job_remove_waiter(&a.w);
        assert_true(j->cancelled);
        /* It is still the job filling the entry: a request finds and joins it. */
        assert_ptr_equal(job_find(&f->store.jobs, j->entry), j);
        rec_join(&b, j);
        atomic_store(&slow_read_usec, 0);
        RUN_UNTIL(f, b.n_done > 0);
        assert_int_equal(j->state, JOB_FAILED);
        assert_int_equal(b.n_done, 1);
        if (b.r != 0)
                fail_msg("the restarted load: %d %s", b.r, b.msg);
        assert_entry_is_file(f, b.entry, "big.safetensors");
        assert_int_equal(a.n_done, 0);
        job_unref(j);
        rec_release(&b);
}

/* ---- feeds -------------------------------------------------------------- */

typedef struct TFeed {
        HostLoadFeed feed;
        _Atomic uint64_t filled;
        atomic_uint advances;
        unsigned read_ended;
        int error;
        JobState state_at_end;
        int second_feed_r;
} TFeed;

static TFeed late;

static void tfeed_advance(HostLoadFeed *hf, size_t file, uint64_t filled) {
        TFeed *t = container_of(hf, TFeed, feed);

        assert_int_equal(file, 0);
        atomic_store(&t->filled, filled);
        atomic_fetch_add(&t->advances, 1);
}

static const HostLoadFeedOps tfeed_ops;

static void tfeed_read_ended(HostLoadFeed *hf, int error) {
        TFeed *t = container_of(hf, TFeed, feed);

        t->read_ended++;
        t->error = error;
        t->state_at_end = hf->job->state;
        /* Too late for another feed now. */
        memset(&late, 0, sizeof(late));
        t->second_feed_r = host_load_feed(hf->job, &late.feed, &tfeed_ops);
}

static const HostLoadFeedOps tfeed_ops = {
        .advance = tfeed_advance,
        .read_ended = tfeed_read_ended,
};

static void test_feed_only_while_running(void **state) {
        _cleanup_(component_freep) Component *c = NULL;
        Fx *f = *state;
        WdError err = WD_ERROR_NULL;
        TFeed t = { 0 };
        Job *j = NULL;
        Rec a;

        fx_write_model(f, "m.safetensors", two_tensors, ELEMENTSOF(two_tensors), 5);
        c = fx_resolve(f, "m.safetensors");
        if (host_load_start(&f->store, f->root_fd, c, 0, &j, &err) != 0)
                fail_msg("%s", err.message);
        rec_init(&a, 1);
        rec_join(&a, j);
        assert_int_equal(host_load_feed(j, &t.feed, &tfeed_ops), 0);
        assert_ptr_equal(t.feed.job, j);
        assert_true(atomic_load(&t.advances) >= 1); /* told what is there already */
        assert_non_null(host_load_slabs(j));
        RUN_UNTIL(f, t.read_ended > 0);
        assert_int_equal(t.error, 0);
        assert_int_equal(t.state_at_end, JOB_SEALING);
        assert_int_equal(t.second_feed_r, -EBUSY);
        assert_null(late.feed.job);
        assert_int_equal(atomic_load(&t.filled), c->total_bytes);
        /* While the feed still reads the writable slabs, nothing is sealed
         * and nobody hears an outcome. */
        fx_run_for(f, 100000);
        assert_int_equal(j->state, JOB_SEALING);
        assert_int_equal(a.n_done, 0);
        assert_ptr_equal(job_find(&f->store.jobs, j->entry), j);
        host_load_unfeed(&t.feed);
        assert_null(t.feed.job);
        RUN_UNTIL(f, a.n_done > 0);
        assert_int_equal(a.r, 0);
        assert_entry_is_file(f, a.entry, "m.safetensors");
        rec_release(&a);
        job_unref(j);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_cold_load, fx_setup, fx_teardown),
                cmocka_unit_test_setup_teardown(test_rewritten_during_read, fx_setup_slow, fx_teardown),
                cmocka_unit_test_setup_teardown(test_cancel_stops_read, fx_setup_slow, fx_teardown),
                cmocka_unit_test_setup_teardown(test_restart_after_cancel, fx_setup_slow, fx_teardown),
                cmocka_unit_test_setup_teardown(test_feed_only_while_running, fx_setup, fx_teardown),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
