/* The GPU tier's CPU-testable parts: target names ("cuda:N",
 * "cuda:GPU-<uuid>", garbage) and their lookup among devices, the
 * device-budget accounting (a device Cache under a budget from [gpu], memory
 * that leases hold counted until the lease ends, eviction order, the
 * memory freed through the cache's callback), and the fallback's behaviour
 * where the build or the machine has no CUDA: gpu_new() fails with a reason
 * and every device call is refused, never crashes. */
#include "gpu/gpu.h"
#include "server/config.h"
#include "store/cache.h"
#include "test-util.h"

static void test_target_parse(void **state) {
        char uuid[GPU_UUID_MAX];
        int ordinal;

        assert_int_equal(gpu_target_parse("", &ordinal, uuid), 0);
        assert_int_equal(gpu_target_parse("host", &ordinal, uuid), 0);
        assert_int_equal(gpu_target_parse("cuda:0", &ordinal, uuid), 1);
        assert_int_equal(ordinal, 0);
        assert_int_equal(gpu_target_parse("cuda:63", &ordinal, uuid), 1);
        assert_int_equal(ordinal, 63);
        assert_int_equal(gpu_target_parse("cuda:GPU-1f2e3d4c-0000-1111-2222-333344445555", &ordinal, uuid), 1);
        assert_int_equal(ordinal, -1);
        assert_string_equal(uuid, "GPU-1f2e3d4c-0000-1111-2222-333344445555");
        static const char *const bad[] = { "cuda", "cuda:", "cuda:64", "cuda:-1", "cuda:+1", "cuda: 1", "cuda:01",
                                           "cuda:1x", "CUDA:0", "gpu:0", "cuda:GPU-", "cuda:GPU-xyz", "Host",
                                           "cuda:GPU-0123456789012345678901234567890123456789abcdef" };
        for (size_t i = 0; i < ELEMENTSOF(bad); i++)
                if (gpu_target_parse(bad[i], &ordinal, uuid) != WD_E_INVALID)
                        fail_msg("\"%s\" was accepted", bad[i]);
}

static void test_target_lookup(void **state) {
        GpuDeviceInfo devs[2] = {
                { .index = 2, .uuid = "GPU-aaaaaaaa-0000-0000-0000-000000000000" },
                { .index = 5, .uuid = "GPU-bbbbbbbb-0000-0000-0000-000000000000" },
        };
        size_t i = 99;

        assert_int_equal(gpu_target_lookup(devs, 2, "cuda:5", &i), 0);
        assert_int_equal(i, 1);
        assert_int_equal(gpu_target_lookup(devs, 2, "cuda:GPU-AAAAAAAA-0000-0000-0000-000000000000", &i), 0);
        assert_int_equal(i, 0);
        assert_int_equal(gpu_target_lookup(devs, 2, "cuda:0", &i), WD_E_NOT_FOUND);
        assert_int_equal(gpu_target_lookup(devs, 2, "cuda:GPU-cccc", &i), WD_E_NOT_FOUND);
        assert_int_equal(gpu_target_lookup(devs, 2, "host", &i), WD_E_INVALID);
        assert_int_equal(gpu_target_lookup(devs, 0, "cuda:0", &i), WD_E_NOT_FOUND);
}

static unsigned freed;

static void count_free(void *memory, void *userdata) {
        freed++;
        free(memory);
}

static CacheEntry *reserve(Cache *c, const char *model, uint64_t bytes, int expect) {
        FileId id = { .dev = 1, .ino = (uint64_t) model[0], .size = 100, .mtime = { 1, 0 }, .ctime = { 1, 0 } };
        WdError err = WD_ERROR_NULL;
        CacheEntry *e = NULL;

        assert_int_equal(cache_reserve(c, model, "", "", &id, 1, bytes, &e, &err), expect);
        if (expect == WD_E_BUDGET)
                assert_non_null(strstr(err.message, "cuda:0"));
        return e;
}

static void test_device_budget(void **state) {
        _cleanup_(config_freep) Config *cfg = NULL;
        _cleanup_(cache_freep) Cache *c = NULL;
        WdError err = WD_ERROR_NULL;
        uint64_t total = 1000000, budget;
        CacheEntry *a, *b, *d;
        CacheStats st;

        assert_int_equal(config_load_string("[gpu]\ndevice_budgets = 1:10%\n", strlen("[gpu]\ndevice_budgets = 1:10%\n"),
                                            NULL, &cfg, &err),
                         0);
        budget = config_gpu_budget(cfg, 0, total);
        assert_int_equal(budget, 900000); /* 90% by default */
        assert_int_equal(config_gpu_budget(cfg, 1, total), 100000);
        assert_int_equal(cache_new(&c, "cuda:0", budget), 0);
        cache_set_memory_free(c, count_free, NULL);
        freed = 0;

        a = reserve(c, "a", 400000, 0);
        cache_entry_set_resident_memory(a, malloc(1));
        b = reserve(c, "b", 400000, 0);
        cache_entry_set_resident_memory(b, malloc(1));
        /* A worker maps a: it is leased, so c evicts b, the other. */
        cache_entry_lease(a);
        d = reserve(c, "c", 400000, 0);
        assert_int_equal(freed, 1);
        cache_entry_set_resident_memory(d, malloc(1));
        /* Both leased: nothing can make room, the shortfall is named. */
        cache_entry_lease(d);
        reserve(c, "d", 400000, WD_E_BUDGET);
        cache_get_stats(c, &st);
        assert_int_equal(st.used, 800000);
        /* Evicting a leased entry is refused; the worker's memory stays charged. */
        assert_int_equal(cache_entry_evict(a, &err), WD_E_BUSY);
        /* The lease ends (release, or SIGKILL closing the connection): a is
         * evictable again, and is the least recently used. */
        cache_entry_unlease(a);
        reserve(c, "e", 400000, 0);
        assert_int_equal(freed, 2);
        cache_get_stats(c, &st);
        assert_int_equal(st.used, 800000);
        assert_int_equal(st.evictable, 0);
        cache_entry_unlease(d);
}

static void test_without_cuda(void **state) {
        WdError err = WD_ERROR_NULL;
        Gpu *g = NULL;
        int r;

        r = gpu_new(&g, NULL, 0, &err);
        if (r == 0) {
                /* A machine with a GPU: the tier is up; tests/gpu covers it. */
                assert_true(gpu_n_devices(g) > 0);
                gpu_free(g);
                return;
        }
        assert_true(r == -EOPNOTSUPP || r == -ENODEV);
        assert_true(strlen(err.message) > 0);
        assert_null(g);
        assert_int_equal(gpu_n_devices(NULL), 0);
        assert_null(gpu_device(NULL, 0));
        assert_int_equal(gpu_host_register(NULL, &r, sizeof(r), false, &err), 0);
        gpu_host_unregister(NULL, &r);
        if (!gpu_built())
                assert_non_null(strstr(err.message, "built without CUDA"));
        else
                assert_non_null(strstr(err.message, "CUDA"));
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_target_parse),
                cmocka_unit_test(test_target_lookup),
                cmocka_unit_test(test_device_budget),
                cmocka_unit_test(test_without_cuda),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
