/* Metrics tests: the rendering of the host tier's figures, cache hits and
 * misses, and load durations into Prometheus's text format, over a real
 * cache and job list (no GPU tier, no cluster).  promtool's lint of the
 * same text runs in tests/integration/test_metrics.py. */
#include "server/metrics.h"
#include "test-util.h"

static FileId fid(uint64_t ino) {
        return (FileId){ .dev = 1, .ino = ino, .size = 100, .mtime = { 1, 0 }, .ctime = { 1, 0 } };
}

static CacheEntry *reserve(Cache *c, const char *model, uint64_t ino, uint64_t bytes) {
        FileId id = fid(ino);
        CacheEntry *e = NULL;
        WdError err = WD_ERROR_NULL;

        if (cache_reserve(c, model, "", "", &id, 1, bytes, &e, &err) != 0)
                fail_msg("%s: %s", model, err.message);
        return e;
}

static char *render(Metrics *m, const PeerContext *peers) {
        MetricsSources src = {
                .peers = peers,
                .storage_read_bytes = 12345,
                .storage_reads = 7,
                .start_time_usec = 1700000000123456ull,
        };
        char *text = NULL;
        size_t len = 0;

        assert_int_equal(metrics_render(m, &src, &text, &len), 0);
        assert_int_equal(strlen(text), len);
        return text;
}

static void has(const char *text, const char *line) {
        char want[512];

        snprintf(want, sizeof(want), "\n%s\n", line);
        if (!strstr(text, want))
                fail_msg("no line \"%s\" in:\n%s", line, text);
}

static void test_figures(void **state) {
        _cleanup_(cache_freep) Cache *c = NULL;
        _cleanup_(metrics_freep) Metrics *m = NULL;
        Store st = {};
        DeviceTier tier = { .store = &st };
        PeerContext peers = { .n_peers = 3, .n_leases = 2 };
        CacheEntry *a;
        char *text;

        assert_int_equal(cache_new(&c, "host", 1000000), 0);
        st.cache = c;
        assert_int_equal(metrics_new(&m, &st, &tier), 0);
        a = reserve(c, "/m/a", 1, 4096);
        (void) reserve(c, "/m/b", 2, 1000);
        cache_entry_set_resident(a, NULL, 0);
        metrics_count_lookup(m, METRICS_TIER_HOST, true);
        metrics_count_lookup(m, METRICS_TIER_HOST, false);
        metrics_count_lookup(m, METRICS_TIER_HOST, false);
        metrics_count_lookup(m, METRICS_TIERS, true); /* out of range: ignored */
        Job j = { .entry = a }; /* off its list, as job_finish() hands it over */
        st.jobs.finished(&j, &(JobOutcome){ .r = 0 }, 1500000, st.jobs.userdata);
        st.jobs.finished(&j, &(JobOutcome){ .r = WD_E_FORMAT }, 20000, st.jobs.userdata);
        st.jobs.finished(&j, &(JobOutcome){ .r = -ECANCELED }, 3000, st.jobs.userdata);

        text = render(m, &peers);
        assert_true(strncmp(text, "# HELP weightd_build_info ", 26) == 0);
        has(text, "process_start_time_seconds 1700000000.123456");
        assert_non_null(strstr(text, "\nprocess_resident_memory_bytes "));
        assert_non_null(strstr(text, "\nprocess_open_fds "));
        has(text, "weightd_storage_read_bytes_total 12345");
        has(text, "weightd_storage_reads_total 7");
        has(text, "# TYPE weightd_memory_budget_bytes gauge");
        has(text, "weightd_memory_budget_bytes{tier=\"host\"} 1000000");
        has(text, "weightd_memory_used_bytes{tier=\"host\"} 5096");
        has(text, "weightd_memory_resident_bytes{tier=\"host\"} 4096");
        has(text, "weightd_memory_evictable_bytes{tier=\"host\"} 4096");
        has(text, "weightd_cache_entries{tier=\"host\",state=\"loading\"} 1");
        has(text, "weightd_cache_entries{tier=\"host\",state=\"resident\"} 1");
        has(text, "weightd_cache_entries{tier=\"host\",state=\"detached\"} 0");
        has(text, "weightd_cache_entry_bytes{tier=\"host\",state=\"loading\"} 1000");
        has(text, "# TYPE weightd_cache_hits_total counter");
        has(text, "weightd_cache_hits_total{tier=\"host\"} 1");
        has(text, "weightd_cache_misses_total{tier=\"host\"} 2");
        has(text, "weightd_cache_evictions_total{tier=\"host\"} 0");
        has(text, "weightd_loads_in_progress{tier=\"host\"} 0");
        has(text, "# TYPE weightd_load_duration_seconds histogram");
        has(text, "weightd_load_duration_seconds_bucket{tier=\"host\",outcome=\"ok\",le=\"1\"} 0");
        has(text, "weightd_load_duration_seconds_bucket{tier=\"host\",outcome=\"ok\",le=\"2.5\"} 1");
        has(text, "weightd_load_duration_seconds_bucket{tier=\"host\",outcome=\"ok\",le=\"+Inf\"} 1");
        has(text, "weightd_load_duration_seconds_sum{tier=\"host\",outcome=\"ok\"} 1.500000");
        has(text, "weightd_load_duration_seconds_count{tier=\"host\",outcome=\"ok\"} 1");
        has(text, "weightd_load_duration_seconds_bucket{tier=\"host\",outcome=\"failed\",le=\"0.01\"} 0");
        has(text, "weightd_load_duration_seconds_bucket{tier=\"host\",outcome=\"failed\",le=\"0.025\"} 1");
        has(text, "weightd_load_duration_seconds_sum{tier=\"host\",outcome=\"failed\"} 0.020000");
        has(text, "weightd_load_duration_seconds_bucket{tier=\"host\",outcome=\"cancelled\",le=\"0.01\"} 1");
        has(text, "weightd_connections 3");
        has(text, "weightd_leases 2");
        /* No GPU tier, no cluster: none of their lines. */
        assert_null(strstr(text, "cuda:"));
        assert_null(strstr(text, "weightd_device_"));
        assert_null(strstr(text, "weightd_cluster_"));
        assert_int_equal(text[strlen(text) - 1], '\n');
        free(text);

        /* Evicted, still referenced: detached, counted as an eviction. */
        WdError err = WD_ERROR_NULL;
        cache_entry_ref(a);
        assert_int_equal(cache_entry_evict(a, &err), 0);
        text = render(m, &peers);
        has(text, "weightd_cache_entries{tier=\"host\",state=\"resident\"} 0");
        has(text, "weightd_cache_entries{tier=\"host\",state=\"detached\"} 1");
        has(text, "weightd_cache_entry_bytes{tier=\"host\",state=\"detached\"} 4096");
        has(text, "weightd_cache_evictions_total{tier=\"host\"} 1");
        has(text, "weightd_memory_resident_bytes{tier=\"host\"} 0");
        free(text);
        cache_entry_unref(a);

        /* metrics_free() unhooks the job lists. */
        m = metrics_free(m);
        assert_null(st.jobs.finished);
        assert_null(tier.jobs.finished);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_figures),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
