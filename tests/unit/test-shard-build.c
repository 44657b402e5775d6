/* The shard build (store/shard-build.c) over the real loop, worker, reader,
 * cache and slabs, with recording waiters in place of requests:
 *
 * - started while the host load runs, it waits on it as a waiter (the
 *   only one: no request waits for the whole component), hears its
 *   progress, and ends DONE with a derived entry whose bytes are the
 *   rank's slices computed here from a plain read() of the file with plain
 *   loops (a dim-0 slice, a dim-1 slice, a whole tensor);
 *   started from the resident entry, another rank's slab is right too;
 * - when its last waiter goes while it waits, it is cancelled, and so is
 *   the host load nobody else waits for: the read stops early and nothing
 *   stays in the cache. */
#include "test-job-util.h"
#include "store/shard-build.h"

/* a: 8 rows of 48 bytes; b: 6 rows of 20 bytes; c: 5 bytes. */
static const TSpec tensors[] = {
        { "a", DTYPE_F32, 2, { 8, 12 } },
        { "b", DTYPE_BF16, 2, { 6, 10 } },
        { "c", DTYPE_U8, 1, { 5 } },
};

#define ALIGN 64u

static ShardRule rules[] = { { (char *) "a", 0 }, { (char *) "b", 1 } };

/* The rank's buffer for world 2, by hand: a's rows [4 rank, 4 rank + 4),
 * b's columns [5 rank, 5 rank + 5) of every row, c whole, each tensor at a
 * multiple of ALIGN.  Returns its size; mask marks the tensors' bytes. */
static size_t expected(const uint8_t *file, unsigned rank, uint8_t *out, uint8_t *mask) {
        uint64_t hlen = 0;
        const uint8_t *data;
        size_t o = 0;

        for (int i = 0; i < 8; i++)
                hlen |= (uint64_t) file[i] << (8 * i);
        data = file + 8 + hlen;
        /* a at [0, 384) of the data: 8 rows of 12 F32 */
        for (unsigned row = 4 * rank; row < 4 * rank + 4; row++)
                for (unsigned k = 0; k < 48; k++) {
                        out[o] = data[0 + row * 48 + k];
                        mask[o++] = 1;
                }
        /* b at [384, 504): 6 rows of 10 BF16 */
        o = ALIGN_UP(o, ALIGN);
        for (unsigned row = 0; row < 6; row++)
                for (unsigned k = 0; k < 10; k++) {
                        out[o] = data[384 + row * 20 + 10 * rank + k];
                        mask[o++] = 1;
                }
        /* c at [504, 509) */
        o = ALIGN_UP(o, ALIGN);
        for (unsigned k = 0; k < 5; k++) {
                out[o] = data[504 + k];
                mask[o++] = 1;
        }
        return o;
}

static void assert_shard(Fx *f, CacheEntry *e, const char *variant, unsigned rank) {
        _cleanup_free_ uint8_t *file = NULL;
        uint8_t want[1024] = { 0 }, mask[1024] = { 0 };
        size_t n = 0, size;

        file = fx_read(f, "m.safetensors", &n);
        size = expected(file, rank, want, mask);
        assert_non_null(e);
        assert_int_equal(e->state, CACHE_ENTRY_RESIDENT);
        assert_string_equal(e->variant, variant);
        assert_int_equal(e->n_slabs, 1);
        assert_true(e->slabs[0]->sealed);
        assert_int_equal(e->slabs[0]->size, size);
        for (size_t i = 0; i < size; i++)
                if (mask[i] && e->slabs[0]->data[i] != want[i])
                        fail_msg("rank %u: byte %zu is 0x%02x, want 0x%02x", rank, i, e->slabs[0]->data[i], want[i]);
}

static int start_shard(Fx *f, const Component *c, unsigned rank, CacheEntry *whole, Job *whole_job, char **ret_variant,
                       Job **ret) {
        ShardSpec spec = { .rank = rank, .world = 2, .n_rules = ELEMENTSOF(rules), .rules = rules };
        WdError err = WD_ERROR_NULL;
        ShardPlan *plan = NULL;
        char *variant = shard_spec_key(&spec);
        int r;

        assert_non_null(variant);
        if (shard_plan(c, &spec, ALIGN, &plan, &err) != 0)
                fail_msg("%s", err.message);
        r = shard_build_start(&f->store, c, plan, &spec, variant, whole, whole_job, ret, &err);
        if (r != 0)
                fail_msg("%s", err.message);
        *ret_variant = variant;
        return r;
}

static void test_build(void **state) {
        _cleanup_(component_freep) Component *c = NULL;
        _cleanup_free_ char *v1 = NULL, *v0 = NULL;
        Fx *f = *state;
        WdError err = WD_ERROR_NULL;
        Job *hj = NULL, *sb = NULL, *sb0 = NULL;
        Rec a, b;

        fx_write_model(f, "m.safetensors", tensors, ELEMENTSOF(tensors), 7);
        c = fx_resolve(f, "m.safetensors");
        if (host_load_start(&f->store, f->root_fd, c, 0, &hj, &err) != 0)
                fail_msg("%s", err.message);
        start_shard(f, c, 1, NULL, hj, &v1, &sb);
        /* It waits on the host load, as its only waiter. */
        assert_int_equal(hj->n_waiters, 1);
        assert_int_equal(sb->state, JOB_RUNNING);
        assert_ptr_equal(job_find(&f->store.jobs, sb->entry), sb);
        rec_init(&a, 1);
        a.watch = sb;
        rec_join(&a, sb);
        RUN_UNTIL(f, a.n_done > 0);
        if (a.r != 0)
                fail_msg("%s", a.msg);
        assert_int_equal(a.watch_state, JOB_DONE);
        assert_true(a.had_plan);
        assert_true(a.n_progress > 0); /* the host read's, passed on */
        assert_false(a.progress_after_done);
        assert_int_equal(hj->state, JOB_DONE);
        assert_int_equal(hj->n_waiters, 0);
        assert_shard(f, a.entry, v1, 1);

        /* The whole component is resident now: another rank from it. */
        CacheEntry *whole = cache_lookup(f->store.cache, c->model, c->name, "", &c->files[0].id, 1);
        assert_non_null(whole);
        assert_int_equal(whole->state, CACHE_ENTRY_RESIDENT);
        start_shard(f, c, 0, whole, NULL, &v0, &sb0);
        rec_init(&b, 2);
        rec_join(&b, sb0);
        RUN_UNTIL(f, b.n_done > 0);
        if (b.r != 0)
                fail_msg("%s", b.msg);
        assert_shard(f, b.entry, v0, 0);
        assert_true(strcmp(v0, v1) != 0);

        rec_release(&a);
        rec_release(&b);
        job_unref(hj);
        job_unref(sb);
        job_unref(sb0);
}

static void test_cancel(void **state) {
        _cleanup_(component_freep) Component *c = NULL;
        _cleanup_free_ char *v = NULL;
        const uint64_t size = 16u << 20;
        TSpec big = { "a", DTYPE_U8, 2, { 4096, 4096 } };
        Fx *f = *state;
        WdError err = WD_ERROR_NULL;
        uint64_t before = reader_bytes_read(f->store.reader);
        CacheStats st;
        Job *hj = NULL, *sb = NULL;
        Rec a;

        fx_write_model(f, "m.safetensors", &big, 1, 8);
        c = fx_resolve(f, "m.safetensors");
        atomic_store(&slow_read_usec, 500);
        if (host_load_start(&f->store, f->root_fd, c, 0, &hj, &err) != 0)
                fail_msg("%s", err.message);
        start_shard(f, c, 1, NULL, hj, &v, &sb);
        rec_init(&a, 1);
        rec_join(&a, sb);
        RUN_UNTIL(f, a.n_progress > 0 && a.done > 0);
        assert_int_equal(hj->state, JOB_RUNNING);
        job_remove_waiter(&a.w);
        /* Cancelled while it waits: it ends at once, and stops waiting. */
        assert_int_equal(sb->state, JOB_FAILED);
        assert_int_equal(hj->n_waiters, 0);
        assert_true(hj->cancelled);
        RUN_UNTIL(f, hj->state == JOB_FAILED || hj->state == JOB_DONE);
        assert_int_equal(hj->state, JOB_FAILED);
        assert_int_equal(a.n_done, 0);
        assert_true(reader_bytes_read(f->store.reader) - before < size / 2);
        cache_get_stats(f->store.cache, &st);
        assert_int_equal(st.n_entries, 0);
        assert_int_equal(st.used, 0);
        job_unref(hj);
        job_unref(sb);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_build, fx_setup, fx_teardown),
                cmocka_unit_test_setup_teardown(test_cancel, fx_setup_slow, fx_teardown),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
