/* The daemon's metrics (see metrics.h): counters kept as requests and jobs
 * end, and the rendering of all metrics in Prometheus's text exposition
 * format (version 0.0.4).  Names and units follow Prometheus's conventions:
 * a weightd_ prefix (process_* as the client libraries name those), base
 * units (bytes, seconds) in the name, counters ending in _total, one gauge
 * per enumerated state.  Per-tier figures carry
 * a tier label ("host", "cuda:N"), the cluster's per-node ones a node label.
 *
 * Rendering walks the caches' entries and the job lists: O(entries + jobs),
 * on the loop, once a second (the server's tick). */
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "server/metrics.h"
#include "util/time-util.h"

enum {
        OUTCOME_OK,
        OUTCOME_FAILED,
        OUTCOME_CANCELLED,
        _OUTCOME_MAX,
};

static const char *const outcome_names[_OUTCOME_MAX] = { "ok", "failed", "cancelled" };

static const double load_buckets[METRICS_LOAD_BUCKETS] = { 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                                                            5,    10,    25,   50,  100, 250, 500, 1000 };

typedef struct Histogram {
        uint64_t buckets[METRICS_LOAD_BUCKETS]; /* not cumulative: rendering sums them */
        uint64_t count;
        uint64_t sum_usec;
} Histogram;

struct Metrics {
        Store *store;
        DeviceTier *tier;
        uint64_t hits[METRICS_TIERS], misses[METRICS_TIERS];
        Histogram loads[METRICS_TIERS][_OUTCOME_MAX];
};

/* ---- counting ------------------------------------------------------------ */

void metrics_count_lookup(Metrics *m, size_t tier, bool hit) {
        if (!m || tier >= METRICS_TIERS)
                return;
        if (hit)
                m->hits[tier]++;
        else
                m->misses[tier]++;
}

/* Which tier a job of the device tier's list filled: its entry's cache. */
static size_t device_tier_of(const Metrics *m, const Job *j) {
        const DeviceTier *t = m->tier;

        for (size_t i = 0; j->entry && t->caches && i < gpu_n_devices(t->gpu); i++)
                if (t->caches[i] == j->entry->cache)
                        return 1 + i;
        return METRICS_TIERS;
}

static void histogram_add(Histogram *h, uint64_t usec) {
        for (size_t i = 0; i < METRICS_LOAD_BUCKETS; i++)
                if ((double) usec <= load_buckets[i] * 1e6) {
                        h->buckets[i]++;
                        break;
                }
        h->count++;
        h->sum_usec += usec;
}

/* JobList.finished of both lists.  The job is off its list by now: its
 * entry's cache says the tier (every job of the two lists fills one). */
static void on_job_finished(const Job *j, const JobOutcome *o, uint64_t usec, void *userdata) {
        Metrics *m = userdata;
        size_t tier = !j->entry || j->entry->cache == m->store->cache ? METRICS_TIER_HOST : device_tier_of(m, j);
        int outcome = o->r == 0 ? OUTCOME_OK : o->r == -ECANCELED ? OUTCOME_CANCELLED : OUTCOME_FAILED;

        if (tier < METRICS_TIERS)
                histogram_add(&m->loads[tier][outcome], usec);
}

int metrics_new(Metrics **ret, Store *store, DeviceTier *tier) {
        Metrics *m = calloc(1, sizeof(Metrics));

        if (!m)
                return -ENOMEM;
        m->store = store;
        m->tier = tier;
        store->jobs.finished = on_job_finished;
        store->jobs.userdata = m;
        tier->jobs.finished = on_job_finished;
        tier->jobs.userdata = m;
        *ret = m;
        return 0;
}

Metrics *metrics_free(Metrics *m) {
        if (!m)
                return NULL;
        if (m->store->jobs.userdata == m)
                m->store->jobs.finished = NULL;
        if (m->tier->jobs.userdata == m)
                m->tier->jobs.finished = NULL;
        free(m);
        return NULL;
}

/* ---- rendering ----------------------------------------------------------- */

/* A label value: backslash, double quote and newline escaped. */
static void label_escape(char *dst, size_t size, const char *s) {
        size_t o = 0;

        for (; *s && o + 3 < size; s++) {
                if (*s == '\\' || *s == '"')
                        dst[o++] = '\\';
                if (*s == '\n') {
                        dst[o++] = '\\';
                        dst[o++] = 'n';
                } else
                        dst[o++] = *s;
        }
        dst[o] = 0;
}

static void put_label(FILE *f, const char *s) {
        for (; *s; s++) {
                if (*s == '\\' || *s == '"')
                        fputc('\\', f);
                if (*s == '\n')
                        fputs("\\n", f);
                else
                        fputc(*s, f);
        }
}

static void head(FILE *f, const char *name, const char *type, const char *help) {
        fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void put_seconds(FILE *f, uint64_t usec) {
        fprintf(f, "%" PRIu64 ".%06" PRIu64, usec / 1000000u, usec % 1000000u);
}

/* The tiers that exist now: the host tier, and each device once the GPU
 * tier is up. */
static size_t n_tiers(const Metrics *m) {
        return 1 + (m->tier->gpu && m->tier->caches ? gpu_n_devices(m->tier->gpu) : 0);
}

static Cache *tier_cache(const Metrics *m, size_t t) {
        return t == METRICS_TIER_HOST ? m->store->cache : m->tier->caches[t - 1];
}

typedef struct TierFigures {
        CacheStats stats;
        uint64_t entries[3], bytes[3]; /* by CacheEntryState */
        unsigned loading;              /* jobs filling entries of the tier */
} TierFigures;

static const char *const state_names[3] = {
        [CACHE_ENTRY_LOADING] = "loading",
        [CACHE_ENTRY_RESIDENT] = "resident",
        [CACHE_ENTRY_DETACHED] = "detached",
};

static void tier_figures(Metrics *m, size_t t, TierFigures *ret) {
        Cache *c = tier_cache(m, t);

        *ret = (TierFigures){};
        cache_get_stats(c, &ret->stats);
        for (CacheEntry *e = cache_first(c); e; e = cache_next(e))
                if ((size_t) e->state < 3) {
                        ret->entries[e->state]++;
                        ret->bytes[e->state] += e->bytes;
                }
        for (CacheEntry *e = cache_first_detached(c); e; e = cache_next(e)) {
                ret->entries[CACHE_ENTRY_DETACHED]++;
                ret->bytes[CACHE_ENTRY_DETACHED] += e->bytes;
        }
        if (t == METRICS_TIER_HOST)
                ret->loading = m->store->jobs.n;
        else
                LIST_FOREACH(jobs, j, m->tier->jobs.jobs)
                        if (device_tier_of(m, j) == t)
                                ret->loading++;
}

/* One sample per tier of a figure taken from TierFigures. */
#define PER_TIER(f, m, figs, name, expr)                                           \
        do {                                                                       \
                for (size_t ti = 0; ti < n_tiers(m); ti++) {                       \
                        const TierFigures *tf = &(figs)[ti];                       \
                        (void) tf;                                                 \
                        fprintf((f), "%s{tier=\"", (name));                        \
                        put_label((f), cache_name(tier_cache((m), ti)));           \
                        fprintf((f), "\"} %" PRIu64 "\n", (uint64_t) (expr));      \
                }                                                                  \
        } while (0)

static void render_tiers(Metrics *m, FILE *f) {
        size_t n = n_tiers(m);
        TierFigures *figs = calloc(n, sizeof(TierFigures));

        if (!figs) {
                fputs("# out of memory\n", f);
                return;
        }
        for (size_t t = 0; t < n; t++)
                tier_figures(m, t, &figs[t]);

        head(f, "weightd_memory_budget_bytes", "gauge", "Byte budget of the tier.");
        PER_TIER(f, m, figs, "weightd_memory_budget_bytes", tf->stats.budget);
        head(f, "weightd_memory_used_bytes", "gauge",
             "Bytes charged against the tier's budget: resident, loading and detached entries.");
        PER_TIER(f, m, figs, "weightd_memory_used_bytes", tf->stats.used);
        head(f, "weightd_memory_resident_bytes", "gauge", "Bytes of resident (servable) entries.");
        PER_TIER(f, m, figs, "weightd_memory_resident_bytes", tf->bytes[CACHE_ENTRY_RESIDENT]);
        head(f, "weightd_memory_evictable_bytes", "gauge", "Bytes of resident entries with no lease and no pin.");
        PER_TIER(f, m, figs, "weightd_memory_evictable_bytes", tf->stats.evictable);

        head(f, "weightd_cache_entries", "gauge", "Cache entries by state.");
        for (size_t t = 0; t < n; t++)
                for (size_t s = 0; s < 3; s++) {
                        fputs("weightd_cache_entries{tier=\"", f);
                        put_label(f, cache_name(tier_cache(m, t)));
                        fprintf(f, "\",state=\"%s\"} %" PRIu64 "\n", state_names[s], figs[t].entries[s]);
                }
        head(f, "weightd_cache_entry_bytes", "gauge", "Bytes of cache entries by state.");
        for (size_t t = 0; t < n; t++)
                for (size_t s = 0; s < 3; s++) {
                        fputs("weightd_cache_entry_bytes{tier=\"", f);
                        put_label(f, cache_name(tier_cache(m, t)));
                        fprintf(f, "\",state=\"%s\"} %" PRIu64 "\n", state_names[s], figs[t].bytes[s]);
                }
        head(f, "weightd_cache_evictions_total", "counter", "Entries evicted from the tier.");
        PER_TIER(f, m, figs, "weightd_cache_evictions_total", tf->stats.evictions);
        head(f, "weightd_cache_hits_total", "counter", "Loads and prefetches served from a resident entry.");
        PER_TIER(f, m, figs, "weightd_cache_hits_total", m->hits[ti]);
        head(f, "weightd_cache_misses_total", "counter",
             "Loads and prefetches that waited for a load (started or joined).");
        PER_TIER(f, m, figs, "weightd_cache_misses_total", m->misses[ti]);
        head(f, "weightd_loads_in_progress", "gauge", "Load jobs running for the tier.");
        PER_TIER(f, m, figs, "weightd_loads_in_progress", tf->loading);

        head(f, "weightd_load_duration_seconds", "histogram",
             "Duration of load jobs (reads, shard builds, device copies, cluster fetches) by tier and outcome.");
        for (size_t t = 0; t < n; t++)
                for (size_t o = 0; o < _OUTCOME_MAX; o++) {
                        const Histogram *h = &m->loads[t][o];
                        uint64_t cum = 0;
                        char tier[64], labels[128];

                        label_escape(tier, sizeof(tier), cache_name(tier_cache(m, t)));
                        snprintf(labels, sizeof(labels), "tier=\"%s\",outcome=\"%s\"", tier, outcome_names[o]);
                        for (size_t b = 0; b < METRICS_LOAD_BUCKETS; b++) {
                                cum += h->buckets[b];
                                fprintf(f, "weightd_load_duration_seconds_bucket{%s,le=\"%g\"} %" PRIu64 "\n", labels,
                                        load_buckets[b], cum);
                        }
                        fprintf(f, "weightd_load_duration_seconds_bucket{%s,le=\"+Inf\"} %" PRIu64 "\n", labels,
                                h->count);
                        fprintf(f, "weightd_load_duration_seconds_sum{%s} ", labels);
                        put_seconds(f, h->sum_usec);
                        fprintf(f, "\nweightd_load_duration_seconds_count{%s} %" PRIu64 "\n", labels, h->count);
                }
        free(figs);
}

static void render_devices(Metrics *m, FILE *f) {
        size_t n = n_tiers(m) - 1;

        if (n == 0)
                return;
        head(f, "weightd_device_info", "gauge", "The GPUs the daemon serves (value 1).");
        for (size_t i = 0; i < n; i++) {
                const GpuDeviceInfo *d = gpu_device(m->tier->gpu, i);

                fputs("weightd_device_info{tier=\"", f);
                put_label(f, cache_name(m->tier->caches[i]));
                fputs("\",uuid=\"", f);
                put_label(f, d->uuid);
                fputs("\",name=\"", f);
                put_label(f, d->name);
                fputs("\",pci_bus_id=\"", f);
                put_label(f, d->pci_bus_id);
                fputs("\"} 1\n", f);
        }
        head(f, "weightd_device_memory_bytes", "gauge", "Memory of the device.");
        for (size_t i = 0; i < n; i++) {
                fputs("weightd_device_memory_bytes{tier=\"", f);
                put_label(f, cache_name(m->tier->caches[i]));
                fprintf(f, "\"} %" PRIu64 "\n", gpu_device(m->tier->gpu, i)->total_bytes);
        }
}

static void render_cluster(Cluster *cluster, FILE *f) {
        static const char *const states[] = { "self", "up", "down", "unauthenticated", "mismatch" };
        ClusterStatus st = {};

        if (!cluster || cluster_get_status(cluster, &st) < 0)
                return;
        head(f, "weightd_cluster_info", "gauge", "This node's name and generation (new at every start), value 1.");
        fputs("weightd_cluster_info{node=\"", f);
        put_label(f, st.node ? st.node : "");
        fprintf(f, "\",generation=\"%016" PRIx64 "\"} 1\n", st.generation);
        head(f, "weightd_cluster_storage_saved_bytes_total", "counter",
             "Bytes this node did not read from storage because other nodes sent them.");
        fprintf(f, "weightd_cluster_storage_saved_bytes_total %" PRIu64 "\n", st.storage_saved_bytes);
        head(f, "weightd_cluster_node_state", "gauge",
             "Each node's link state as this node sees it (1 for the current state).");
        for (size_t i = 0; i < st.n_nodes; i++)
                for (size_t s = 0; s < ELEMENTSOF(states); s++) {
                        fputs("weightd_cluster_node_state{node=\"", f);
                        put_label(f, st.nodes[i].name);
                        fprintf(f, "\",state=\"%s\"} %d\n", states[s],
                                st.nodes[i].state && strcmp(st.nodes[i].state, states[s]) == 0);
                }
        head(f, "weightd_cluster_node_sent_bytes_total", "counter", "Bytes of components sent to the node.");
        for (size_t i = 0; i < st.n_nodes; i++) {
                fputs("weightd_cluster_node_sent_bytes_total{node=\"", f);
                put_label(f, st.nodes[i].name);
                fprintf(f, "\"} %" PRIu64 "\n", st.nodes[i].sent_bytes);
        }
        head(f, "weightd_cluster_node_received_bytes_total", "counter", "Bytes of components received from the node.");
        for (size_t i = 0; i < st.n_nodes; i++) {
                fputs("weightd_cluster_node_received_bytes_total{node=\"", f);
                put_label(f, st.nodes[i].name);
                fprintf(f, "\"} %" PRIu64 "\n", st.nodes[i].received_bytes);
        }
        head(f, "weightd_cluster_node_rtt_seconds", "gauge", "The last heartbeat round trip to the node.");
        for (size_t i = 0; i < st.n_nodes; i++) {
                fputs("weightd_cluster_node_rtt_seconds{node=\"", f);
                put_label(f, st.nodes[i].name);
                fputs("\"} ", f);
                put_seconds(f, st.nodes[i].rtt_usec);
                fputc('\n', f);
        }
        free(st.nodes);
}

/* The process_* metrics every Prometheus client library exports, from
 * /proc/self: CPU time, memory, descriptors, start time. */
static void render_process(FILE *f, uint64_t start_time_usec) {
        _cleanup_fclose_ FILE *stat = fopen("/proc/self/stat", "re");
        unsigned long long utime = 0, stime = 0, vsize = 0, rss = 0;
        long ticks = sysconf(_SC_CLK_TCK), page = sysconf(_SC_PAGESIZE);
        struct rlimit rl;
        uint64_t fds = 0;
        DIR *d;

        head(f, "process_start_time_seconds", "gauge", "Start time of the process since the Unix epoch in seconds.");
        fputs("process_start_time_seconds ", f);
        put_seconds(f, start_time_usec);
        fputc('\n', f);
        /* After "(comm)", which may hold blanks: the fields from state on. */
        if (stat && ticks > 0 && page > 0) {
                char buf[1024], *p;

                if (fgets(buf, sizeof(buf), stat) && (p = strrchr(buf, ')')) &&
                    sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu %*d %*d %*d %*d %*d %*d "
                                  "%*u %llu %llu", &utime, &stime, &vsize, &rss) == 4) {
                        head(f, "process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.");
                        fprintf(f, "process_cpu_seconds_total %.2f\n", (double) (utime + stime) / (double) ticks);
                        head(f, "process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.");
                        fprintf(f, "process_virtual_memory_bytes %llu\n", vsize);
                        head(f, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
                        fprintf(f, "process_resident_memory_bytes %llu\n", rss * (unsigned long long) page);
                }
        }
        d = opendir("/proc/self/fd");
        if (d) {
                for (struct dirent *de; (de = readdir(d));)
                        fds += de->d_name[0] != '.';
                closedir(d);
                head(f, "process_open_fds", "gauge", "Number of open file descriptors.");
                fprintf(f, "process_open_fds %" PRIu64 "\n", fds - 1); /* less opendir()'s own */
        }
        if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
                head(f, "process_max_fds", "gauge", "Maximum number of open file descriptors.");
                fprintf(f, "process_max_fds %llu\n", (unsigned long long) rl.rlim_cur);
        }
}

static const char *yes_no(bool b) {
        return b ? "yes" : "no";
}

int metrics_render(Metrics *m, const MetricsSources *src, char **ret, size_t *ret_len) {
        char *buf = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&buf, &len);

        if (!f)
                return -ENOMEM;
        head(f, "weightd_build_info", "gauge", "The daemon's version and what it was built with (value 1).");
        fprintf(f, "weightd_build_info{version=\"%s\",cuda=\"%s\",nccl=\"%s\",cluster=\"%s\",systemd=\"%s\"} 1\n",
                WEIGHTD_VERSION, yes_no(HAVE_CUDA), yes_no(HAVE_NCCL), yes_no(HAVE_CLUSTER), yes_no(HAVE_SYSTEMD));
        render_process(f, src->start_time_usec);

        head(f, "weightd_storage_read_bytes_total", "counter", "Bytes read from storage.");
        fprintf(f, "weightd_storage_read_bytes_total %" PRIu64 "\n", src->storage_read_bytes);
        head(f, "weightd_storage_reads_total", "counter", "Reads from storage that completed with data.");
        fprintf(f, "weightd_storage_reads_total %" PRIu64 "\n", src->storage_reads);

        render_tiers(m, f);
        render_devices(m, f);

        head(f, "weightd_connections", "gauge", "Client connections.");
        fprintf(f, "weightd_connections %u\n", src->peers->n_peers);
        head(f, "weightd_leases", "gauge", "Leases clients hold.");
        fprintf(f, "weightd_leases %u\n", src->peers->n_leases);

        render_cluster(src->cluster, f);

        if (fclose(f) != 0) {
                free(buf);
                return -ENOMEM;
        }
        *ret = buf;
        *ret_len = len;
        return 0;
}
