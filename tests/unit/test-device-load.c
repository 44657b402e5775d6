/* The device load (gpu/device-load.c) on the emulated GPUs of a
 * -Dgpu_emulation=true build (or a real one), over the real loop, worker,
 * reader, host cache and copy engine, with recording waiters in place of
 * requests:
 *
 * - a cold load starts a host load and waits on it as its only waiter; it
 *   ends DONE, and the device slab (a memfd on emulated devices, mapped
 *   here as a client would) holds each tensor's bytes, as a plain read() of
 *   the file gives them, at its 256-byte aligned offset;
 * - a file rewritten during the read fails the device load too: FAILED
 *   (WD_E_CHANGED) naming the file, never DONE, nothing left in either
 *   cache, although its copy may have ended first (review finding 3);
 * - cancelling its last waiter cancels the host read that nobody else
 *   waits for: the read stops early (finding 11);
 * - a device load that finds its host load SEALING waits as an ordinary
 *   waiter (no feed), hears nothing while the host side is sealing, and
 *   then copies from the resident entry (finding 2).
 *
 * Skipped (a TAP plan of 1..0) where there is no device: a build without
 * emulation or CUDA, or a CUDA build on a machine without a GPU. */
#include "gpu/device-load.h"
#include "test-job-util.h"

static Gpu *gpu;
static bool emulated; /* device slabs are memfds: the test maps them */

typedef struct State {
        Fx *f;
        DeviceTier tier;
} State;

static void free_slab(void *memory, void *userdata) {
        gpu_slab_free(memory);
}

static int memory_fd(const void *memory, uint64_t *ret_map_size) {
        *ret_map_size = gpu_slab_map_size(memory);
        return gpu_slab_fd(memory);
}

static void before_seal(Slab *const *slabs, size_t n, void *userdata) {
        for (size_t i = 0; slabs && i < n; i++)
                gpu_host_unregister(gpu, slabs[i]->data);
}

static State *state_new(const ReaderParams *rp) {
        State *s = calloc(1, sizeof(State));
        size_t n = gpu_n_devices(gpu);

        assert_non_null(s);
        s->f = fx_new(rp, 256u << 20);
        s->f->store.before_seal = before_seal;
        s->tier.gpu = gpu;
        s->tier.store = &s->f->store;
        s->tier.caches = calloc(n, sizeof(Cache *));
        assert_non_null(s->tier.caches);
        for (size_t i = 0; i < n; i++) {
                assert_int_equal(cache_new(&s->tier.caches[i], "cuda", 128u << 20), 0);
                cache_set_memory_free(s->tier.caches[i], free_slab, NULL);
                cache_set_memory_fd(s->tier.caches[i], memory_fd);
        }
        assert_int_equal(completion_queue_add_hook(&s->f->queue, device_tier_poll, &s->tier), 0);
        return s;
}

static int setup(void **state) {
        *state = state_new(NULL);
        return 0;
}

static int setup_slow(void **state) {
        *state = state_new(&fx_slow_params);
        return 0;
}

static int teardown(void **state) {
        State *s = *state;

        assert_int_equal(s->tier.jobs.n, 0);
        for (size_t i = 0; i < gpu_n_devices(gpu); i++)
                cache_free(s->tier.caches[i]);
        free(s->tier.caches);
        fx_free(s->f);
        free(s);
        return 0;
}

static const TSpec two_tensors[] = {
        { "embed.weight", DTYPE_BF16, 2, { 300, 511 } },
        { "norm.bias", DTYPE_F32, 1, { 777 } },
};

/* The device slab holds each tensor at its aligned offset, as read(). */
static void assert_device_bytes(State *s, CacheEntry *e, const char *name) {
        _cleanup_free_ uint8_t *file = NULL;
        uint64_t hlen = 0, map_size = 0, begin = 0, off = 0;
        size_t n = 0;
        uint8_t *got;
        int fd;

        assert_non_null(e);
        assert_int_equal(e->state, CACHE_ENTRY_RESIDENT);
        assert_non_null(e->memory);
        if (!emulated)
                return; /* a real device's memory is not mapped here */
        file = fx_read(s->f, name, &n);
        for (int i = 0; i < 8; i++)
                hlen |= (uint64_t) file[i] << (8 * i);
        fd = cache_entry_memory_fd(e, &map_size);
        assert_true(fd >= 0);
        got = mmap(NULL, map_size, PROT_READ, MAP_SHARED, fd, 0);
        assert_true(got != MAP_FAILED);
        for (size_t t = 0; t < ELEMENTSOF(two_tensors); t++) {
                uint64_t bytes = elems(&two_tensors[t]) * dtype_bits(two_tensors[t].dtype) / 8;

                off = ALIGN_UP(off, 256u);
                assert_true(off + bytes <= map_size);
                if (memcmp(got + off, file + 8 + hlen + begin, bytes) != 0)
                        fail_msg("%s: tensor %s differs on the device", name, two_tensors[t].name);
                off += bytes;
                begin += bytes;
        }
        assert_int_equal(8 + hlen + begin, n);
        munmap(got, map_size);
}

static Job *start(State *s, const Component *c, bool keep_host) {
        DeviceLoadParams p = { .dev = 0, .root_fd = s->f->root_fd, .variant = "", .keep_host = keep_host };
        WdError err = WD_ERROR_NULL;
        Job *dl = NULL;

        if (device_load_start(&s->tier, c, &p, &dl, &err) != 0)
                fail_msg("%s", err.message);
        return dl;
}

/* The host load that a device load started: the store's only job. */
static Job *the_host_load(State *s) {
        assert_int_equal(s->f->store.jobs.n, 1);
        assert_true(job_is_host_load(s->f->store.jobs.jobs));
        return job_ref(s->f->store.jobs.jobs);
}

static void assert_caches_empty(State *s) {
        CacheStats st;

        cache_get_stats(s->f->store.cache, &st);
        assert_int_equal(st.n_entries, 0);
        assert_int_equal(st.used, 0);
        cache_get_stats(s->tier.caches[0], &st);
        assert_int_equal(st.n_entries, 0);
        assert_int_equal(st.used, 0);
}

static void test_cold(void **state) {
        _cleanup_(component_freep) Component *c = NULL;
        State *s = *state;
        Job *dl, *hj;
        Rec a;

        fx_write_model(s->f, "m.safetensors", two_tensors, ELEMENTSOF(two_tensors), 11);
        c = fx_resolve(s->f, "m.safetensors");
        dl = start(s, c, true);
        hj = the_host_load(s);
        assert_int_equal(hj->n_waiters, 1); /* the device load */
        assert_int_equal(dl->state, JOB_RUNNING);
        rec_init(&a, 1);
        a.watch = dl;
        rec_join(&a, dl);
        RUN_UNTIL(s->f, a.n_done > 0);
        if (a.r != 0)
                fail_msg("%s", a.msg);
        assert_int_equal(a.watch_state, JOB_DONE);
        assert_true(a.had_plan);
        assert_false(a.progress_after_done);
        assert_int_equal(hj->state, JOB_DONE);
        assert_ptr_equal(a.entry->cache, s->tier.caches[0]);
        assert_device_bytes(s, a.entry, "m.safetensors");
        assert_int_equal(s->tier.jobs.n, 0);
        rec_release(&a);
        job_unref(hj);
        job_unref(dl);
}

static void test_rewritten_during_read(void **state) {
        _cleanup_(component_freep) Component *c = NULL;
        State *s = *state;
        Job *dl, *hj;
        Rec a;

        fx_write_big(s->f, "big.safetensors", 4u << 20, 12);
        c = fx_resolve(s->f, "big.safetensors");
        atomic_store(&slow_read_usec, 200);
        dl = start(s, c, false);
        hj = the_host_load(s);
        rec_init(&a, 1);
        a.watch = dl;
        rec_join(&a, dl);
        RUN_UNTIL(s->f, hj->done > 0);
        assert_int_equal(hj->state, JOB_RUNNING);
        assert_true(hj->done < c->total_bytes);
        fx_rewrite(s->f, "big.safetensors", c->total_bytes - 10);
        atomic_store(&slow_read_usec, 0);
        RUN_UNTIL(s->f, a.n_done > 0);
        assert_int_equal(a.n_done, 1);
        assert_int_equal(a.r, WD_E_CHANGED);
        assert_int_equal(a.watch_state, JOB_FAILED);
        assert_null(a.entry);
        assert_non_null(strstr(a.msg, "big.safetensors"));
        assert_int_equal(hj->state, JOB_FAILED);
        assert_caches_empty(s);
        job_unref(hj);
        job_unref(dl);
}

static void test_cancel_cancels_read(void **state) {
        _cleanup_(component_freep) Component *c = NULL;
        const uint64_t size = 16u << 20;
        State *s = *state;
        uint64_t before = reader_bytes_read(s->f->store.reader);
        Job *dl, *hj;
        Rec a;

        fx_write_big(s->f, "big.safetensors", size, 13);
        c = fx_resolve(s->f, "big.safetensors");
        atomic_store(&slow_read_usec, 500);
        dl = start(s, c, false);
        hj = the_host_load(s);
        rec_init(&a, 1);
        rec_join(&a, dl);
        RUN_UNTIL(s->f, hj->done > 0);
        job_remove_waiter(&a.w);
        assert_true(dl->cancelled);
        assert_true(hj->cancelled); /* its only waiter went */
        RUN_UNTIL(s->f, (hj->state == JOB_FAILED || hj->state == JOB_DONE) &&
                                (dl->state == JOB_FAILED || dl->state == JOB_DONE));
        assert_int_equal(hj->state, JOB_FAILED);
        assert_int_equal(dl->state, JOB_FAILED);
        assert_int_equal(a.n_done, 0);
        assert_true(reader_bytes_read(s->f->store.reader) - before < size / 2);
        assert_caches_empty(s);
        job_unref(hj);
        job_unref(dl);
}

/* ---- a host load that is sealing ---------------------------------------- */

typedef struct TFeed {
        HostLoadFeed feed;
        unsigned read_ended;
} TFeed;

static void tfeed_advance(HostLoadFeed *hf, size_t file, uint64_t filled) {
}

static void tfeed_read_ended(HostLoadFeed *hf, int error) {
        container_of(hf, TFeed, feed)->read_ended++;
}

static const HostLoadFeedOps tfeed_ops = {
        .advance = tfeed_advance,
        .read_ended = tfeed_read_ended,
};

static void test_host_sealing(void **state) {
        _cleanup_(component_freep) Component *c = NULL;
        State *s = *state;
        WdError err = WD_ERROR_NULL;
        TFeed t = { 0 };
        Job *dl, *hj = NULL;
        Rec a;

        fx_write_model(s->f, "m.safetensors", two_tensors, ELEMENTSOF(two_tensors), 14);
        c = fx_resolve(s->f, "m.safetensors");
        if (host_load_start(&s->f->store, s->f->root_fd, c, 0, &hj, &err) != 0)
                fail_msg("%s", err.message);
        /* Our feed holds the host load in SEALING once its read ended. */
        assert_int_equal(host_load_feed(hj, &t.feed, &tfeed_ops), 0);
        RUN_UNTIL(s->f, t.read_ended > 0);
        assert_int_equal(hj->state, JOB_SEALING);

        dl = start(s, c, true);
        assert_int_equal(s->f->store.jobs.n, 1); /* it joined, started no other */
        assert_int_equal(hj->n_waiters, 1);
        rec_init(&a, 1);
        a.watch = dl;
        rec_join(&a, dl);
        fx_run_for(s->f, 100000);
        assert_int_equal(hj->state, JOB_SEALING);
        assert_int_equal(dl->state, JOB_RUNNING);
        assert_int_equal(a.n_done, 0);
        host_load_unfeed(&t.feed);
        RUN_UNTIL(s->f, a.n_done > 0);
        if (a.r != 0)
                fail_msg("%s", a.msg);
        assert_int_equal(hj->state, JOB_DONE);
        assert_int_equal(a.watch_state, JOB_DONE);
        assert_device_bytes(s, a.entry, "m.safetensors");
        rec_release(&a);
        job_unref(hj);
        job_unref(dl);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_cold, setup, teardown),
                cmocka_unit_test_setup_teardown(test_rewritten_during_read, setup_slow, teardown),
                cmocka_unit_test_setup_teardown(test_cancel_cancels_read, setup_slow, teardown),
                cmocka_unit_test_setup_teardown(test_host_sealing, setup, teardown),
        };
        WdError err = WD_ERROR_NULL;
        int r;

        setenv("WEIGHTD_EMULATED_GPUS", "1:256M", 0);
        r = gpu_new(&gpu, NULL, 0, &err);
        if (r == -EOPNOTSUPP || r == -ENODEV) {
                printf("1..0 # SKIP no device to load to: %s\n", err.message);
                return 0; /* TAP: a plan of 1..0 with SKIP is a skipped test */
        }
        if (r < 0) {
                fprintf(stderr, "gpu_new: %s\n", err.message);
                return 1;
        }
        emulated = strcmp(gpu_device(gpu, 0)->name, "Emulated GPU") == 0;
        r = cmocka_run_group_tests(tests, NULL, NULL);
        gpu_free(gpu);
        return r;
}
