/* The daemon's lifecycle: the listening socket (from the service manager or
 * bound at the configured path), accepting peers against the allow list,
 * the GPU tier's discovery, configuration reloads on SIGHUP, readiness,
 * status and watchdog notifications, and a clean drain on SIGTERM.
 *
 * Everything else has its own place: peers (peer.c), requests and replies
 * (request.c), the handlers (driver.c), and below the server the jobs
 * (store/job.h and its kinds).  Threads: models are resolved on libuv's
 * thread pool; reads run on the reader thread, copies on the devices'
 * threads, seals, shard builds and slab reaping on the background worker;
 * all of them hand results to the loop through one completion queue. */

#include <fcntl.h>
#include <grp.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <syslog.h>
#include <unistd.h>

#include "cluster/cluster.h"
#include "gpu/device-load.h"
#include "server/driver.h"
#include "server/metrics-http.h"
#include "server/metrics.h"
#include "server/fdstore.h"
#include "server/notify.h"
#include "server/peer.h"
#include "server/request.h"
#include "server/roots.h"
#include "server/server.h"
#include "store/hugepool.h"
#include "store/store.h"
#include "util/completion.h"
#include "util/log.h"
#include "util/time-util.h"
#include "util/worker.h"

#define SERVER_DRAIN_TIMEOUT_MS 2000u

struct Server {
        uv_loop_t loop;
        Config *config;
        char *config_path;
        Roots *roots;
        CompletionQueue queue;
        Worker worker;
        Store store;
        DeviceTier tier;
        Driver driver;
        PeerContext peers;
        bool peers_init;
        Cluster *cluster;    /* NULL without [cluster] */
        bool cluster_closing; /* freed, its transfers still draining */

        /* The GPU tier: found on the thread pool at start. */
        int gpu_state; /* GPU_STARTING, GPU_UP, GPU_OFF */
        char gpu_reason[WD_ERROR_MESSAGE_MAX]; /* "ok" or why there is none */
        bool gpu_searching;
        uv_work_t gpu_work;
        unsigned *gpu_only; /* the search's own copy of [gpu] devices: a reload may free the config meanwhile */
        size_t n_gpu_only;
        Gpu *gpu_found;
        int gpu_r;
        WdError gpu_err;

        bool reader_stale; /* io settings changed: replace when idle */
        uint64_t storage_read_retired;
        uint64_t storage_reads_retired;

        /* Prometheus metrics, rendered on the tick and served by their own thread. */
        Metrics *metrics;
        MetricsHttp *metrics_http; /* NULL: [metrics] listen empty, or it could not bind */
        char *metrics_listen;      /* what metrics_http serves, as configured */
        uint64_t started_realtime_usec;

        FdStore fdstore; /* what the service manager's store passed, until adopted */
        int listen_fd;
        bool listen_bound; /* we bound it: unlink at exit */
        char *socket_path;
        uv_poll_t listen_poll;
        bool listening;
        uv_signal_t sig_term, sig_int, sig_hup;
        uv_timer_t status_timer, watchdog_timer, drain_timer, accept_timer, tick_timer;
        bool handles_init;
        uint64_t watchdog_usec;
        uint64_t started_usec;
        uint64_t hugetlb_free_pages; /* of the default pool, refreshed every second */
        HugePool *hugepool;          /* the pool of [memory] hugetlb_reserve */
        uint64_t adopted_hugetlb;    /* bytes of huge pages the slabs adopted at start hold (fdstore.c) */
        char hugepool_note[192];     /* "" while it is in use, else "off" or why there is none */
        char status_line[256];       /* the last STATUS= sent */
        bool ready_pending;          /* READY=1 waits for the hugetlb pool's touch ([memory] ready_after_touch) */
        bool stopping;
        bool handles_closed;
        int exit_code;
};

static LogLevel log_level_from_syslog(int prio) {
        if (prio <= LOG_ERR)
                return LOG_LEVEL_ERROR;
        if (prio == LOG_WARNING)
                return LOG_LEVEL_WARNING;
        if (prio < LOG_DEBUG)
                return LOG_LEVEL_INFO;
        return LOG_LEVEL_DEBUG;
}

static ReaderParams reader_params(const Config *c) {
        return (ReaderParams){ .queue_depth = c->queue_depth, .chunk_size = c->chunk_size };
}

static PeerLimits peer_limits(const Config *c) {
        return (PeerLimits){
                .max_connections = c->max_connections,
                .max_connections_per_uid = c->max_connections_per_uid,
                .max_pending = c->max_pending_requests,
                .max_request_size = (uint32_t) MIN(c->max_request_size, UINT32_MAX),
                .hello_timeout_usec = (uint64_t) c->hello_timeout * 1000000u,
                .frame_timeout_usec = (uint64_t) c->frame_timeout * 1000000u,
        };
}

static void server_maybe_exit(Server *s);

/* ---- the daemon's hugetlb pool ------------------------------------------ */

static uint64_t hugepool_target(Server *s, const Config *c) {
        if (c->hugetlb_reserve == 0 || c->host_pages == SLAB_PAGES_SMALL)
                return 0;
        /* The slabs adopted from the process before hold huge pages of
         * their own: the pool need not hold them again. */
        return hugepool_pages_for(s->hugepool, c->host_budget - MIN(c->host_budget, s->adopted_hugetlb),
                                  c->hugetlb_reserve == CONFIG_HUGETLB_RESERVE_AUTO ? 0 : c->hugetlb_reserve);
}

static double gib(uint64_t pages) {
        return (double) (pages * HUGEPOOL_PAGE_SIZE) / (1u << 30);
}

/* At start and on SIGHUP: size the pool for c (prefix: "" or "SIGHUP: ")
 * and touch what was added. */
static void server_hugepool_apply(Server *s, const Config *c, const char *prefix) {
        uint64_t want = hugepool_target(s, c), before = 0, after = 0;
        HugePoolStats had, now;
        int r;

        hugepool_get_stats(s->hugepool, &had);
        if (c->hugetlb_reserve == 0 || c->host_pages == SLAB_PAGES_SMALL)
                snprintf(s->hugepool_note, sizeof(s->hugepool_note), "off (%s)",
                         c->hugetlb_reserve == 0 ? "hugetlb_reserve = off" : "host_pages = small");
        else if (want == 0)
                snprintf(s->hugepool_note, sizeof(s->hugepool_note),
                         "none: the node has too little memory available to reserve any");
        else
                s->hugepool_note[0] = '\0';
        if (want == had.reserved_pages) {
                if (*prefix == '\0' && want == 0)
                        log_info("hugetlb pool: %s", s->hugepool_note);
                return;
        }
        r = hugepool_resize(s->hugepool, want, &before, &after);
        if (r < 0) {
                snprintf(s->hugepool_note, sizeof(s->hugepool_note), "none: cannot write %s: %s", HUGEPOOL_NR_PATH,
                         strerror(-r));
                log_warning("%shugetlb pool: cannot change %s: %s; slabs use what the system reserved, else small "
                            "pages, ignoring.",
                            prefix, HUGEPOOL_NR_PATH, strerror(-r));
                return;
        }
        hugepool_get_stats(s->hugepool, &now);
        if (now.reserved_pages > had.reserved_pages) {
                log_info("%shugetlb pool: reserved %" PRIu64 " pages of 2 MiB (%.2f GiB; host budget %.2f GiB), "
                         "vm.nr_hugepages %" PRIu64 " -> %" PRIu64 "; touching them in the background",
                         prefix, now.reserved_pages, gib(now.reserved_pages), (double) c->host_budget / (1u << 30),
                         before, after);
                if (now.reserved_pages < want)
                        log_warning("%shugetlb pool: the kernel added %" PRIu64 " of the %" PRIu64
                                    " pages asked for (memory too fragmented or in use), ignoring.",
                                    prefix, now.reserved_pages - had.reserved_pages, want - had.reserved_pages);
                r = hugepool_touch(s->hugepool);
                if (r < 0)
                        log_warning_errno(r, "%shugetlb pool: cannot start touching it: %m, ignoring.", prefix);
        } else {
                /* The resize stopped a touch in progress: touch what is left. */
                if (had.touching && now.reserved_pages > 0)
                        (void) hugepool_touch(s->hugepool);
                log_info("%shugetlb pool: gave back %" PRIu64 " pages (%.2f GiB), %" PRIu64 " left (%.2f GiB)%s; "
                         "vm.nr_hugepages %" PRIu64 " -> %" PRIu64,
                         prefix, had.reserved_pages - now.reserved_pages,
                         gib(had.reserved_pages - now.reserved_pages), now.reserved_pages, gib(now.reserved_pages),
                         now.owed_pages > 0 ? ", of which slabs hold the pages still to give back" : "", before,
                         after);
        }
}

static bool server_hugepool_touching(Server *s) {
        HugePoolStats hp;

        if (!s->hugepool)
                return false;
        hugepool_get_stats(s->hugepool, &hp);
        return hp.touching;
}

static void server_update_status(Server *s);

/* READY=1, unless it waits for the touch at start (server_ready_check()). */
static void server_notify_ready(Server *s) {
        if (!s->ready_pending)
                (void) notify_send("READY=1");
}

/* While READY=1 waits for the touch: ask systemd for more time to start
 * (the touch of a large pool on fresh memory can outlast TimeoutStartSec),
 * else say READY=1. */
static void server_ready_check(Server *s) {
        char buf[64];

        if (!s->ready_pending)
                return;
        if (server_hugepool_touching(s)) {
                snprintf(buf, sizeof(buf), "EXTEND_TIMEOUT_USEC=%" PRIu64, (uint64_t) 30000000);
                (void) notify_send(buf);
                server_update_status(s);
                return;
        }
        s->ready_pending = false;
        log_info("Ready, %.2f s after start: the hugetlb pool is touched ([memory] ready_after_touch = yes)",
                 (double) (now_usec() - s->started_usec) / 1e6);
        server_notify_ready(s);
        server_update_status(s);
}

/* Every second: give back what slabs held when the pool shrank, and log
 * once when the touch ended. */
static void server_hugepool_tick(Server *s) {
        HugePoolStats st;
        uint64_t n;
        int r;

        if (!s->hugepool)
                return;
        hugepool_get_stats(s->hugepool, &st);
        if (st.owed_pages > 0) {
                r = hugepool_retry(s->hugepool, &n);
                if (r < 0)
                        log_debug_errno(r, "hugetlb pool: cannot give back %" PRIu64 " pages: %m", st.owed_pages);
                else if (n > 0)
                        log_info("hugetlb pool: gave back %" PRIu64 " more pages that slabs held, %" PRIu64
                                 " to go",
                                 n, st.owed_pages - MIN(n, st.owed_pages));
        }
        if (!hugepool_poll(s->hugepool))
                return;
        hugepool_get_stats(s->hugepool, &st);
        if (st.reserved_pages == 0)
                return;
        log_info("hugetlb pool: touched %" PRIu64 " free pages of its %" PRIu64 " (%.2f GiB) in %.2f s; ready",
                 st.touched_pages, st.reserved_pages, gib(st.touched_pages), (double) st.touch_usec / 1e6);
        if (st.touched_pages < st.touch_target)
                log_warning("hugetlb pool: %" PRIu64 " free pages could not be touched: other processes took them, "
                            "ignoring.",
                            st.touch_target - st.touched_pages);
}

static void server_hugepool_free(Server *s) {
        uint64_t before, after;
        int r;
        HugePoolStats st;

        if (!s->hugepool)
                return;
        hugepool_get_stats(s->hugepool, &st);
        if (st.reserved_pages > 0) {
                r = hugepool_resize(s->hugepool, 0, &before, &after);
                if (r < 0)
                        log_warning_errno(r, "hugetlb pool: cannot give back its %" PRIu64 " pages: %m",
                                          st.reserved_pages);
                else
                        log_info("hugetlb pool: gave back its %" PRIu64 " pages (%.2f GiB) at exit; "
                                 "vm.nr_hugepages %" PRIu64 " -> %" PRIu64,
                                 st.reserved_pages, gib(st.reserved_pages), before, after);
        }
        s->hugepool = s->store.hugepool = hugepool_free(s->hugepool);
}

static void server_hugepool_status(Server *s, Weightd__V1__StatusReply *st) {
        HugePoolStats hp;

        hugepool_get_stats(s->hugepool, &hp);
        st->hugetlb_pool = s->hugepool_note[0] ? s->hugepool_note : hp.touching ? "touching" : "ready";
        st->hugetlb_reserved_bytes = hp.reserved_pages * HUGEPOOL_PAGE_SIZE;
        st->hugetlb_touched_bytes = hp.touched_pages * HUGEPOOL_PAGE_SIZE;
        st->hugetlb_free_bytes = s->hugetlb_free_pages * HUGEPOOL_PAGE_SIZE;
        st->shmem_fallback_slabs = s->store.shmem_fallback_slabs;
        st->shmem_fallback_bytes = s->store.shmem_fallback_bytes;
}

/* ---- status ------------------------------------------------------------- */

static void server_update_status(Server *s) {
        char buf[sizeof(s->status_line)];
        CacheStats st;

        if (s->stopping)
                return;
        cache_get_stats(s->store.cache, &st);
        if (s->ready_pending) {
                HugePoolStats hp;

                hugepool_get_stats(s->hugepool, &hp);
                snprintf(buf, sizeof(buf),
                         "STATUS=not ready: touching the hugetlb pool, %.1f of %.1f GiB; %u connections, %u loading",
                         gib(hp.touched_pages), gib(hp.touch_target), s->peers.n_peers, s->store.jobs.n);
        } else
                snprintf(buf, sizeof(buf),
                         "STATUS=%zu components, %.1f of %.1f GiB used, %u leases, %u connections, %u loading",
                         st.n_entries, (double) st.used / (1u << 30), (double) st.budget / (1u << 30),
                         s->peers.n_leases, s->peers.n_peers, s->store.jobs.n);
        if (strcmp(buf, s->status_line) == 0)
                return;
        memcpy(s->status_line, buf, sizeof(buf));
        (void) notify_send(buf);
}

static void on_status_timer(uv_timer_t *t) {
        server_update_status(t->data);
}

/* The Status reply's daemon-wide part. */
static void server_status(Weightd__V1__StatusReply *st, void *userdata) {
        Server *s = userdata;

        st->uptime_ms = (now_usec() - s->started_usec) / 1000;
        st->storage_read_bytes = s->storage_read_retired + reader_bytes_read(s->store.reader);
        st->socket = s->socket_path;
        st->hugetlb = s->store.load_opts.pages != SLAB_PAGES_SMALL && s->hugetlb_free_pages > 0;
        server_hugepool_status(s, st);
}

/* Swap in a reader with the reloaded io settings once no load uses the old. */
static void server_replace_reader(Server *s) {
        Reader *r;
        int k;

        if (!s->reader_stale || s->store.n_reading > 0)
                return;
        ReaderParams p = reader_params(s->config);
        k = reader_new(&r, &p);
        if (k < 0) {
                log_warning_errno(k, "Cannot start a reader with the reloaded io settings, keeping the old one: %m");
                s->reader_stale = false;
                return;
        }
        s->storage_read_retired += reader_bytes_read(s->store.reader);
        s->storage_reads_retired += reader_reads(s->store.reader);
        reader_free(s->store.reader);
        s->store.reader = r;
        s->reader_stale = false;
}

/* A job, a peer or an entry changed. */
static void server_changed(void *userdata) {
        Server *s = userdata;

        server_replace_reader(s);
        server_update_status(s);
        server_maybe_exit(s);
}

/* Free pages in the default hugetlb pool (0 when there is none). */
static uint64_t hugetlb_pool_free(void) {
        _cleanup_fclose_ FILE *f = fopen("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages", "re");
        unsigned long long n = 0;

        if (!f || fscanf(f, "%llu", &n) != 1)
                return 0;
        return n;
}

/* ---- metrics ------------------------------------------------------------ */

/* Render the metrics and hand them to the HTTP thread. */
static void server_publish_metrics(Server *s) {
        MetricsSources src = {
                .peers = &s->peers,
                .cluster = s->cluster,
                .storage_read_bytes = s->storage_read_retired + reader_bytes_read(s->store.reader),
                .storage_reads = s->storage_reads_retired + reader_reads(s->store.reader),
                .start_time_usec = s->started_realtime_usec,
        };
        char *text;
        size_t len;

        if (!s->metrics_http || metrics_render(s->metrics, &src, &text, &len) < 0)
                return;
        (void) metrics_http_publish(s->metrics_http, text, len);
}

/* Serve [metrics] listen of c, when it differs from what is served.  A
 * failure leaves the daemon without metrics, never without service. */
static void server_metrics_listen(Server *s, const Config *c) {
        WdError err = WD_ERROR_NULL;
        char *l;
        int r;

        if (s->metrics_listen && strcmp(s->metrics_listen, c->metrics_listen) == 0 && s->metrics_http)
                return;
        s->metrics_http = metrics_http_free(s->metrics_http);
        free(TAKE_PTR(s->metrics_listen));
        if (!c->metrics_host)
                return;
        l = strdup(c->metrics_listen);
        if (!l) {
                log_warning_errno(-ENOMEM, "Metrics: out of memory, serving without metrics.");
                return;
        }
        r = metrics_http_new(&s->metrics_http, c->metrics_host, c->metrics_port, &err);
        if (r < 0) {
                log_warning_errno(r, "Metrics: [metrics] listen = %s: %s; serving without metrics.",
                                  c->metrics_listen, err.message);
                free(l);
                return;
        }
        s->metrics_listen = l;
        log_info("Metrics on http://%s%s%s:%u/metrics", strchr(c->metrics_host, ':') ? "[" : "", c->metrics_host,
                 strchr(c->metrics_host, ':') ? "]" : "", (unsigned) metrics_http_port(s->metrics_http));
        server_publish_metrics(s);
}

/* Every second: close peers past their Hello or frame deadline, and note
 * whether the hugetlb pool has room (for Status, which must not read sysfs
 * each time). */
static void on_tick(uv_timer_t *t) {
        Server *s = t->data;

        s->hugetlb_free_pages = hugetlb_pool_free();
        server_hugepool_tick(s);
        server_ready_check(s);
        peer_context_tick(&s->peers, now_usec());
        server_publish_metrics(s);
}

static void on_watchdog_timer(uv_timer_t *t) {
        (void) notify_send("WATCHDOG=1");
}

/* ---- slab memory -------------------------------------------------------- */

/* Slabs the cache let go of, freed on the background worker: returning GiB
 * of pages to the kernel must not stall the loop. */
typedef struct Reap {
        WorkerTask task;
        Gpu *gpu;
        Slab **slabs;
        size_t n;
} Reap;

/* Page-locked slabs are unlocked before their mapping goes. */
static void reap_free_slabs(Gpu *gpu, Slab **slabs, size_t n) {
        for (size_t i = 0; i < n; i++) {
                if (slabs[i])
                        gpu_host_unregister(gpu, slabs[i]->data);
                slab_free(slabs[i]);
        }
        free(slabs);
}

static void reap_work(WorkerTask *t) {
        Reap *r = container_of(t, Reap, task);

        reap_free_slabs(r->gpu, r->slabs, r->n);
}

static void reap_done(Completion *c) {
        free(container_of(c, Reap, task.done));
}

static void server_reap(Slab **slabs, size_t n, void *userdata) {
        Server *s = userdata;
        Reap *r = calloc(1, sizeof(Reap));

        if (r && s->worker.started) {
                *r = (Reap){ .gpu = s->tier.gpu, .slabs = slabs, .n = n };
                worker_push(&s->worker, &r->task, reap_work, reap_done);
                return;
        }
        free(r);
        reap_free_slabs(s->tier.gpu, slabs, n); /* here, then */
}

/* On the worker, before a host load seals: its copies to devices read the
 * writable mappings, page-locked, and those mappings go now. */
static void server_before_seal(Slab *const *slabs, size_t n, void *userdata) {
        Server *s = userdata;

        for (size_t i = 0; slabs && i < n; i++)
                gpu_host_unregister(s->tier.gpu, slabs[i]->data);
}

/* ---- the GPU tier ------------------------------------------------------- */

static void gpu_work(uv_work_t *w) {
        Server *s = w->data;

        s->gpu_r = gpu_new(&s->gpu_found, s->gpu_only, s->n_gpu_only, &s->gpu_err);
}

static void gpu_free_slab(void *memory, void *userdata) {
        gpu_slab_free(memory);
}

static int gpu_memory_fd(const void *memory, uint64_t *ret_map_size) {
        *ret_map_size = gpu_slab_map_size(memory);
        return gpu_slab_fd(memory);
}

static void gpu_tier_off(Server *s, const char *reason, Gpu *g) {
        snprintf(s->gpu_reason, sizeof(s->gpu_reason), "%s", reason);
        s->gpu_state = GPU_OFF;
        s->driver.gpu_state = GPU_OFF;
        gpu_free(g);
        log_info("No GPU tier: %s", s->gpu_reason);
}

static void gpu_done(uv_work_t *w, int status) {
        Server *s = w->data;
        Gpu *g = TAKE_PTR(s->gpu_found);
        size_t n = gpu_n_devices(g);
        int r;

        s->gpu_searching = false;
        free(TAKE_PTR(s->gpu_only));
        if (s->gpu_r != 0 || status < 0) {
                gpu_tier_off(s, s->gpu_r != 0 ? s->gpu_err.message : "the device search was cancelled", g);
                server_maybe_exit(s);
                return;
        }
        s->tier.caches = calloc(n, sizeof(Cache *));
        if (!s->tier.caches) {
                gpu_tier_off(s, "out of memory", g);
                server_maybe_exit(s);
                return;
        }
        for (size_t i = 0; i < n; i++) {
                const GpuDeviceInfo *d = gpu_device(g, i);
                char name[32];

                snprintf(name, sizeof(name), "cuda:%u", d->index);
                r = cache_new(&s->tier.caches[i], name, config_gpu_budget(s->config, d->index, d->total_bytes));
                if (r < 0) {
                        for (size_t k = 0; k < i; k++)
                                cache_free(s->tier.caches[k]);
                        free(TAKE_PTR(s->tier.caches));
                        gpu_tier_off(s, "out of memory", g);
                        server_maybe_exit(s);
                        return;
                }
                cache_set_memory_free(s->tier.caches[i], gpu_free_slab, s);
                cache_set_memory_fd(s->tier.caches[i], gpu_memory_fd);
                log_info("GPU tier: cuda:%u %s %s (%s), %.1f GiB, budget %.1f GiB", d->index, d->uuid, d->name,
                         d->pci_bus_id, (double) d->total_bytes / (1u << 30),
                         (double) config_gpu_budget(s->config, d->index, d->total_bytes) / (1u << 30));
        }
        s->tier.gpu = g;
        snprintf(s->gpu_reason, sizeof(s->gpu_reason), "ok");
        s->gpu_state = GPU_UP;
        s->driver.gpu_state = GPU_UP;
        if (s->cluster)
                cluster_set_device_tier(s->cluster, &s->tier);
        server_maybe_exit(s);
}

static void gpu_tier_start(Server *s) {
        s->gpu_state = s->driver.gpu_state = GPU_STARTING;
        snprintf(s->gpu_reason, sizeof(s->gpu_reason), "starting: looking for CUDA devices");
        s->gpu_work.data = s;
        if (!gpu_built()) {
                WdError err = WD_ERROR_NULL;

                (void) gpu_new(&s->gpu_found, NULL, 0, &err);
                gpu_tier_off(s, err.message, TAKE_PTR(s->gpu_found));
                return;
        }
        if (s->config->n_gpu_devices > 0) {
                s->gpu_only = calloc(s->config->n_gpu_devices, sizeof(unsigned));
                if (!s->gpu_only) {
                        gpu_tier_off(s, "out of memory", NULL);
                        return;
                }
                memcpy(s->gpu_only, s->config->gpu_devices, s->config->n_gpu_devices * sizeof(unsigned));
                s->n_gpu_only = s->config->n_gpu_devices;
        }
        if (uv_queue_work(&s->loop, &s->gpu_work, gpu_work, gpu_done) < 0) {
                free(TAKE_PTR(s->gpu_only));
                gpu_tier_off(s, "cannot queue the device search", NULL);
                return;
        }
        s->gpu_searching = true; /* the daemon waits for it before it exits */
}

static void gpu_tier_free(Server *s) {
        for (size_t i = 0; s->tier.caches && i < gpu_n_devices(s->tier.gpu); i++)
                cache_free(s->tier.caches[i]);
        free(TAKE_PTR(s->tier.caches));
        s->tier.gpu = gpu_free(s->tier.gpu);
}

/* SIGHUP: the devices' budgets from c (before c replaces s->config). */
static void gpu_tier_reload(Server *s, const Config *c) {
        bool same = c->n_gpu_devices == s->config->n_gpu_devices &&
                    (c->n_gpu_devices == 0 ||
                     memcmp(c->gpu_devices, s->config->gpu_devices, c->n_gpu_devices * sizeof(c->gpu_devices[0])) == 0);

        if (!same)
                log_warning("SIGHUP: [gpu] devices changed: that needs a restart, ignoring.");
        if (s->gpu_state != GPU_UP)
                return;
        for (size_t i = 0; i < gpu_n_devices(s->tier.gpu); i++) {
                const GpuDeviceInfo *d = gpu_device(s->tier.gpu, i);

                cache_set_budget(s->tier.caches[i], config_gpu_budget(c, d->index, d->total_bytes));
        }
}

/* ---- peers -------------------------------------------------------------- */

static bool gid_allowed(const Config *c, gid_t gid) {
        for (size_t i = 0; i < c->n_allow_gids; i++)
                if (c->allow_gids[i] == gid)
                        return true;
        return false;
}

/* Whether the peer's supplementary groups include an allowed one; however
 * many groups it has (SO_PEERGROUPS says how many with ERANGE). */
static bool peer_groups_allowed(const Config *c, int fd) {
        _cleanup_free_ gid_t *groups = NULL;
        socklen_t len = 256 * sizeof(gid_t);

        for (unsigned tries = 0; tries < 4; tries++) {
                gid_t *g = realloc(groups, len);

                if (!g)
                        return false;
                groups = g;
                if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &len) == 0) {
                        for (size_t i = 0; i < len / sizeof(gid_t); i++)
                                if (gid_allowed(c, groups[i]))
                                        return true;
                        return false;
                }
                if (errno != ERANGE)
                        return false;
        }
        return false;
}

static bool peer_allowed(const Config *c, int fd, const struct ucred *cred) {
        /* Root could take the daemon over anyway; refusing it helps nobody. */
        if (cred->uid == geteuid() || cred->uid == 0)
                return true;
        for (size_t i = 0; i < c->n_allow_uids; i++)
                if (c->allow_uids[i] == cred->uid)
                        return true;
        if (gid_allowed(c, cred->gid))
                return true;
        return c->n_allow_gids > 0 && peer_groups_allowed(c, fd);
}

/* Tell a peer why it is refused (best effort, never blocking), then close. */
static void refuse(int fd, int code, const char *msg) {
        Weightd__V1__Envelope env = WEIGHTD__V1__ENVELOPE__INIT;
        Weightd__V1__Reply reply = WEIGHTD__V1__REPLY__INIT;
        _cleanup_free_ uint8_t *buf = NULL;
        size_t len, off = 0;

        reply.code = code;
        reply.message = (char *) msg;
        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_REPLY;
        env.reply = &reply;
        if (wire_pack(&env, SIZE_MAX, &buf, &len) == 0)
                (void) wire_send(fd, buf, len, NULL, 0, &off);
        safe_close(fd);
}

static void on_accept_resume(uv_timer_t *t);

/* Take an accepted socket as a peer, or refuse it saying why. */
static void server_take_peer(Server *s, int fd, const struct ucred *cred) {
        UserCharge *u;
        char msg[160];
        Peer *p;
        int r;

        r = peer_new(&s->peers, fd, cred, &p);
        if (r == 0) {
                log_debug("%s: connected", p->name);
                return;
        }
        if (r == -EUSERS) {
                log_warning_fields(&(LogFields){ .peer_uid = &cred->uid },
                                   "pid %d uid %u: %u connections, the limit; refused", (int) cred->pid,
                                   (unsigned) cred->uid, s->peers.n_peers);
                snprintf(msg, sizeof(msg), "the daemon has %u connections, its limit (max_connections)",
                         s->peers.n_peers);
        } else if (r == -EDQUOT) {
                u = peer_context_user(&s->peers, cred->uid);
                log_warning_fields(&(LogFields){ .peer_uid = &cred->uid },
                                   "pid %d uid %u: %u connections from this uid, the limit; refused", (int) cred->pid,
                                   (unsigned) cred->uid, u ? u->conns : 0);
                snprintf(msg, sizeof(msg), "uid %u has %u connections, the limit (max_connections_per_uid)",
                         (unsigned) cred->uid, u ? u->conns : 0);
        } else {
                log_warning_errno(r, "Cannot set up a connection: %m");
                snprintf(msg, sizeof(msg), "out of resources");
        }
        refuse(fd, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, msg);
}

static void on_listen(uv_poll_t *h, int status, int events) {
        Server *s = h->data;

        for (unsigned i = 0; i < 64 && !s->stopping; i++) {
                struct ucred cred;
                socklen_t len = sizeof(cred);
                char msg[160];
                int fd;

                fd = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
                if (fd < 0) {
                        if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED)
                                return;
                        /* Out of descriptors: pause accepting a moment
                         * rather than spin on a level-triggered poll. */
                        log_warning_errno(-errno, "Cannot accept a connection: %m; pausing for 100 ms");
                        uv_poll_stop(&s->listen_poll);
                        uv_timer_start(&s->accept_timer, on_accept_resume, 100, 0);
                        return;
                }
                if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
                        log_warning_errno(-errno, "Cannot read a peer's credentials, closing it: %m");
                        safe_close(fd);
                        continue;
                }
                if (!peer_allowed(s->config, fd, &cred)) {
                        log_info_fields(&(LogFields){ .peer_uid = &cred.uid },
                                        "pid %d uid %u gid %u: not on the allow list, refused", (int) cred.pid,
                                        (unsigned) cred.uid, (unsigned) cred.gid);
                        snprintf(msg, sizeof(msg), "uid %u is not allowed to use this daemon (allow_uids, allow_gids)",
                                 (unsigned) cred.uid);
                        refuse(fd, WEIGHTD__V1__CODE__PERMISSION_DENIED, msg);
                        continue;
                }
                server_take_peer(s, fd, &cred);
        }
        server_update_status(s);
}

int server_add_peer(Server *s, int fd, const struct ucred *cred) {
        Peer *p;
        int r = peer_new(&s->peers, fd, cred, &p);

        if (r < 0)
                safe_close(fd);
        return r;
}

int server_run_nowait(Server *s) {
        return uv_run(&s->loop, UV_RUN_NOWAIT);
}

bool server_searching_devices(const Server *s) {
        return s->gpu_searching;
}

static void on_accept_resume(uv_timer_t *t) {
        Server *s = t->data;

        if (!s->stopping && s->listening)
                uv_poll_start(&s->listen_poll, UV_READABLE, on_listen);
}

/* ---- the listening socket ----------------------------------------------- */

static int mkdir_parents(const char *path) {
        _cleanup_free_ char *p = strdup(path);

        if (!p)
                return -ENOMEM;
        for (char *q = strchr(p + 1, '/'); q; q = strchr(q + 1, '/')) {
                *q = 0;
                if (mkdir(p, 0755) < 0 && errno != EEXIST)
                        return -errno;
                *q = '/';
        }
        return 0;
}

/* The socket's folder must be ours (or root's) and writable by nobody else
 * (unless sticky, like /tmp): otherwise another user could have put a
 * socket of their own where clients look for the daemon. */
static int check_socket_dir(const char *path) {
        _cleanup_free_ char *dir = strdup(path);
        struct stat st;
        char *slash;

        if (!dir)
                return -ENOMEM;
        slash = strrchr(dir, '/');
        if (slash == dir)
                slash[1] = 0;
        else if (slash)
                *slash = 0;
        if (stat(dir, &st) < 0)
                return log_error_errno(-errno, "Cannot stat the socket's folder %s: %m", dir);
        if (st.st_uid != geteuid() && st.st_uid != 0)
                return log_error_errno(-EPERM, "The socket's folder %s belongs to uid %u, not to this daemon; refusing",
                                       dir, (unsigned) st.st_uid);
        if ((st.st_mode & (S_IWGRP | S_IWOTH)) && !(st.st_mode & S_ISVTX))
                return log_error_errno(-EPERM, "The socket's folder %s is writable by others; refusing", dir);
        return 0;
}

/* Bind path, replacing only a stale socket: never a symlink, never a file,
 * never a socket someone still listens on. */
static int listen_bind(const char *path, int *ret_fd) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        _cleanup_close_ int fd = -1;
        struct stat st;
        int r;

        if (strlen(path) >= sizeof(sa.sun_path))
                return log_error_errno(-ENAMETOOLONG, "Socket path %s is too long", path);
        strcpy(sa.sun_path, path);

        r = mkdir_parents(path);
        if (r < 0)
                return log_error_errno(r, "Cannot create the directory of %s: %m", path);
        r = check_socket_dir(path);
        if (r < 0)
                return r;

        if (lstat(path, &st) == 0) {
                if (S_ISLNK(st.st_mode))
                        return log_error_errno(-ELOOP, "%s is a symbolic link; refusing to replace it", path);
                if (!S_ISSOCK(st.st_mode))
                        return log_error_errno(-EEXIST, "%s exists and is not a socket; refusing to replace it",
                                               path);
                _cleanup_close_ int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
                if (probe < 0)
                        return log_error_errno(-errno, "Cannot create a socket: %m");
                if (connect(probe, (struct sockaddr *) &sa, sizeof(sa)) == 0)
                        return log_error_errno(-EADDRINUSE, "Another daemon is listening on %s", path);
                if (errno != ECONNREFUSED && errno != ENOENT)
                        return log_error_errno(-errno, "Cannot tell whether %s is in use: %m", path);
                if (unlink(path) < 0 && errno != ENOENT)
                        return log_error_errno(-errno, "Cannot remove the stale socket %s: %m", path);
                log_info("Removed the stale socket %s", path);
        }

        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return log_error_errno(-errno, "Cannot create a socket: %m");
        if (bind(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0)
                return log_error_errno(-errno, "Cannot bind %s: %m", sa.sun_path);
        /* Access is decided by SO_PEERCRED and the allow lists. */
        if (chmod(sa.sun_path, 0666) < 0) {
                r = log_error_errno(-errno, "Cannot set the mode of %s: %m", sa.sun_path);
                (void) unlink(sa.sun_path);
                return r;
        }
        if (listen(fd, SOMAXCONN) < 0) {
                r = log_error_errno(-errno, "Cannot listen on %s: %m", sa.sun_path);
                (void) unlink(sa.sun_path);
                return r;
        }
        *ret_fd = TAKE_FD(fd);
        return 0;
}

static int listen_open(Server *s) {
        int fd = fdstore_take(&s->fdstore); /* the socket unit's socket, and the store's descriptors */

        if (fd < 0)
                return fd;
        if (fd > 0) {
                struct sockaddr_un sa = {};
                socklen_t len = sizeof(sa);
                int fl = fcntl(fd, F_GETFL);

                if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0 || fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)
                        return log_error_errno(-errno, "Cannot set up the passed socket: %m");
                s->listen_fd = fd;
                if (getsockname(fd, (struct sockaddr *) &sa, &len) == 0 && sa.sun_path[0])
                        s->socket_path = strndup(sa.sun_path, sizeof(sa.sun_path));
                else
                        s->socket_path = strdup("(socket activation)");
                if (!s->socket_path)
                        return -ENOMEM;
                log_info("Listening on %s (socket activation)", s->socket_path);
                return 0;
        }

        int r = listen_bind(s->config->socket, &s->listen_fd);
        if (r < 0)
                return r;
        s->listen_bound = true;
        s->socket_path = strdup(s->config->socket);
        if (!s->socket_path)
                return -ENOMEM;
        log_info("Listening on %s", s->socket_path);
        return 0;
}

static void listen_close(Server *s) {
        if (!s->listening)
                return;
        s->listening = false;
        uv_close((uv_handle_t *) &s->listen_poll, NULL);
}


/* ---- reload ------------------------------------------------------------- */

static bool roots_changed(const Roots *old, const Config *c) {
        if (old->n != c->n_model_roots)
                return true;
        for (size_t i = 0; i < old->n; i++)
                if (old->items[i].fd < 0 || strcmp(old->items[i].path, c->model_roots[i]) != 0)
                        return true;
        return false;
}

static void server_apply_log_level(const Config *c) {
        log_set_max_level(log_level_from_syslog(c->log_level));
}

static int server_cluster_reload(Server *s, const Config *c, WdError *err);

static void server_reload(Server *s) {
        _cleanup_(config_freep) Config *c = NULL;
        WdError err = WD_ERROR_NULL;
        char buf[64];
        int r;

        snprintf(buf, sizeof(buf), "RELOADING=1\nMONOTONIC_USEC=%" PRIu64, now_usec());
        (void) notify_send(buf);

        if (!s->config_path) {
                log_info("SIGHUP: running on built-in defaults, no configuration file to re-read");
                server_notify_ready(s);
                return;
        }
        r = config_load(s->config_path, &c, &err);
        if (r != 0) {
                log_error("SIGHUP: %s; keeping the running configuration", err.message);
                server_notify_ready(s);
                return;
        }

        if (strcmp(c->socket, s->config->socket) != 0)
                log_warning("SIGHUP: socket %s -> %s needs a restart, ignoring.", s->config->socket, c->socket);
        if (roots_changed(s->roots, c)) {
                Roots *roots;
                r = roots_new(&roots, c->model_roots, c->n_model_roots);
                if (r < 0) {
                        log_error_errno(r, "SIGHUP: cannot open the model roots: %m; keeping the running configuration");
                        server_notify_ready(s);
                        return;
                }
                roots_unref(s->roots);
                s->roots = s->driver.roots = roots;
                for (size_t i = 0; i < roots->n; i++)
                        if (roots->items[i].fd < 0)
                                log_warning_errno(roots->items[i].open_error, "Model root %s: %m, ignoring.",
                                                  roots->items[i].path);
        }
        r = server_cluster_reload(s, c, &err);
        if (r != 0) {
                log_error("SIGHUP: %s; keeping the running configuration", err.message);
                server_notify_ready(s);
                return;
        }
        cache_set_budget(s->store.cache, c->host_budget);
        server_hugepool_apply(s, c, "SIGHUP: ");
        gpu_tier_reload(s, c);
        s->store.load_opts = (LoadOptions){ .direct = c->direct_io, .pages = c->host_pages };
        if (c->queue_depth != s->config->queue_depth || c->chunk_size != s->config->chunk_size)
                s->reader_stale = true;
        server_apply_log_level(c);
        server_metrics_listen(s, c);
        PeerLimits limits = peer_limits(c);
        peer_context_set_limits(&s->peers, &limits);
        config_free(s->config);
        s->config = TAKE_PTR(c);
        s->driver.config = s->config;
        server_replace_reader(s);
        log_info("Reloaded the configuration from %s", s->config_path);
        server_update_status(s);
        server_notify_ready(s);
}

/* ---- the cluster -------------------------------------------------------- */

static ClusterParams cluster_params(const Config *c, MeshNodeSpec *specs) {
        for (size_t i = 0; i < c->n_cluster_nodes; i++)
                specs[i] = (MeshNodeSpec){
                        .name = c->cluster_nodes[i].name,
                        .host = c->cluster_nodes[i].host,
                        .port = c->cluster_nodes[i].port,
                };
        return (ClusterParams){
                .self = c->cluster_node,
                .nodes = specs,
                .n_nodes = c->n_cluster_nodes,
                .secret = c->cluster_secret,
                .secret_len = c->cluster_secret_len,
                .deadline_usec = c->cluster_deadline_usec,
                .peer_fetch = c->cluster_peer_fetch,
                .gpu_transport = c->cluster_gpu_transport,
                .chunk_size = c->chunk_size,
        };
}

static void server_cluster_closed(void *userdata) {
        Server *s = userdata;

        s->cluster_closing = false;
        server_maybe_exit(s);
}

static const ClusterOps server_cluster_ops = {
        .resolve = driver_cluster_resolve,
        .closed = server_cluster_closed,
};

static int server_cluster_start(Server *s, const Config *c, WdError *err) {
        _cleanup_free_ MeshNodeSpec *specs = calloc(c->n_cluster_nodes + 1, sizeof(MeshNodeSpec));
        ClusterParams p;
        int r;

        if (!specs)
                return wd_error_set(err, -ENOMEM, "out of memory");
        p = cluster_params(c, specs);
        s->cluster_closing = true; /* until server_cluster_closed() */
        r = cluster_new(&s->cluster, &s->loop, &s->store, &p, &server_cluster_ops, &s->driver, s, err);
        if (r != 0)
                s->cluster_closing = false;
        else if (s->gpu_state == GPU_UP)
                cluster_set_device_tier(s->cluster, &s->tier);
        return r;
}

static void server_cluster_stop(Server *s) {
        if (!s->cluster)
                return;
        s->driver.cluster = NULL;
        s->cluster = cluster_free(s->cluster);
}

/* SIGHUP: start, reconfigure or stop the cluster.  Returns 0 or an error
 * (the running cluster stays then). */
static int server_cluster_reload(Server *s, const Config *c, WdError *err) {
        _cleanup_free_ MeshNodeSpec *specs = NULL;
        ClusterParams p;
        int r;

        if (!c->cluster_node) {
                if (s->cluster)
                        log_info("SIGHUP: [cluster] is gone; this node serves alone now");
                server_cluster_stop(s);
                return 0;
        }
        if (!s->cluster) {
                if (s->cluster_closing)
                        return wd_error_set(err, -EBUSY, "[cluster]: the old cluster is still closing, try again");
                r = server_cluster_start(s, c, err);
                if (r == 0)
                        s->driver.cluster = s->cluster;
                return r;
        }
        specs = calloc(c->n_cluster_nodes + 1, sizeof(MeshNodeSpec));
        if (!specs)
                return wd_error_set(err, -ENOMEM, "out of memory");
        p = cluster_params(c, specs);
        return cluster_reconfigure(s->cluster, &p, err);
}

/* ---- stopping ----------------------------------------------------------- */

static void on_drain_timeout(uv_timer_t *t) {
        Server *s = t->data;

        log_warning("Peers did not read their last replies within %u ms; closing them", SERVER_DRAIN_TIMEOUT_MS);
        while (s->peers.peers)
                peer_close(s->peers.peers);
        server_maybe_exit(s);
}

static void server_close_handles(Server *s) {
        uv_close((uv_handle_t *) &s->sig_term, NULL);
        uv_close((uv_handle_t *) &s->sig_int, NULL);
        uv_close((uv_handle_t *) &s->sig_hup, NULL);
        uv_close((uv_handle_t *) &s->status_timer, NULL);
        uv_close((uv_handle_t *) &s->watchdog_timer, NULL);
        uv_close((uv_handle_t *) &s->drain_timer, NULL);
        uv_close((uv_handle_t *) &s->accept_timer, NULL);
        uv_close((uv_handle_t *) &s->tick_timer, NULL);
        listen_close(s);
        peer_context_close(&s->peers);
        s->peers_init = false;
        worker_stop(&s->worker);
        completion_queue_drain(&s->queue); /* what the worker finished last */
        completion_queue_close(&s->queue);
}

static void server_maybe_exit(Server *s) {
        if (!s->stopping || s->peers.n_peers > 0 || s->store.jobs.n > 0 || s->tier.jobs.n > 0 || s->cluster_closing ||
            s->driver.n_resolving > 0 || s->gpu_searching || s->handles_closed)
                return;
        s->handles_closed = true;
        server_close_handles(s);
}

static void server_stop(Server *s) {
        if (s->stopping)
                return;
        (void) notify_send("STOPPING=1");
        log_info("Stopping: %u connections, %u loads running", s->peers.n_peers, s->store.jobs.n + s->tier.jobs.n);
        s->stopping = true;
        listen_close(s);
        s->metrics_http = metrics_http_free(s->metrics_http);

        /* Every request waiting for a resolve or a load hears why it ends;
         * a load nobody waits for any more is cancelled.  Then peers may
         * read what is queued for them, for a while. */
        driver_stop(&s->driver);
        server_cluster_stop(s);
        peer_context_stop(&s->peers);
        uv_timer_stop(&s->drain_timer);
        uv_timer_start(&s->drain_timer, on_drain_timeout, SERVER_DRAIN_TIMEOUT_MS, 0);
        uv_timer_stop(&s->status_timer);
        uv_timer_stop(&s->watchdog_timer);
        uv_timer_stop(&s->accept_timer);
        uv_timer_stop(&s->tick_timer);
        server_maybe_exit(s);
}

static void on_signal(uv_signal_t *h, int signum) {
        Server *s = h->data;

        if (signum == SIGHUP)
                server_reload(s);
        else
                server_stop(s);
}

/* ---- setup -------------------------------------------------------------- */

Server *server_free(Server *s) {
        if (!s)
                return NULL;
        /* Only after server_run() returned (or before it ran): every job
         * ended then, nothing is queued on the loop any more; free slabs
         * here. */
        if (!s->handles_closed && s->handles_init) {
                /* server_run() never ran to its end (fuzzers, tests): stop as
                 * on SIGTERM, without waiting for peers to read, and run the
                 * loop until the jobs ended and the handles closed. */
                uint64_t deadline = now_usec() + 60 * 1000000ull;

                server_stop(s);
                while (s->peers.peers)
                        peer_close(s->peers.peers);
                server_maybe_exit(s);
                while (!s->handles_closed && now_usec() < deadline) {
                        (void) uv_run(&s->loop, UV_RUN_NOWAIT);
                        server_maybe_exit(s);
                        if (!s->handles_closed)
                                usleep(200);
                }
                if (!s->handles_closed) {
                        log_error("Jobs did not end within 60 s of the stop; leaking the loop");
                        return NULL;
                }
                (void) uv_run(&s->loop, UV_RUN_NOWAIT);
        } else if (!s->handles_closed) {
                if (s->peers_init)
                        peer_context_close(&s->peers);
                worker_stop(&s->worker);
                completion_queue_close(&s->queue);
                (void) uv_run(&s->loop, UV_RUN_NOWAIT);
        }
        if (s->store.cache)
                cache_set_reaper(s->store.cache, NULL, NULL);
        reader_free(s->store.reader);
        gpu_tier_free(s);
        cache_free(s->store.cache);
        server_hugepool_free(s); /* after the slabs: their pages go back at once */
        roots_unref(s->roots);
        metrics_http_free(s->metrics_http);
        free(s->metrics_listen);
        metrics_free(s->metrics);
        fdstore_done(&s->fdstore);
        if (s->listen_fd >= 0) {
                if (s->listen_bound && s->socket_path)
                        (void) unlink(s->socket_path);
                safe_close(s->listen_fd);
        }
        (void) uv_loop_close(&s->loop);
        config_free(s->config);
        free(s->config_path);
        free(s->socket_path);
        free(s);
        return NULL;
}

int server_new(Server **ret, Config *config, const char *config_path) {
        _cleanup_(server_freep) Server *s = NULL;
        int r;

        s = calloc(1, sizeof(Server));
        if (!s) {
                config_free(config);
                return log_error_errno(-ENOMEM, "Out of memory");
        }
        s->listen_fd = -1;
        s->config = config;
        s->started_usec = now_usec();
        s->started_realtime_usec = now_realtime_usec();
        server_apply_log_level(config);
        if (config_path) {
                s->config_path = strdup(config_path);
                if (!s->config_path)
                        return log_error_errno(-ENOMEM, "Out of memory");
        }
        r = uv_loop_init(&s->loop);
        if (r < 0)
                return log_error_errno(r, "Cannot create the event loop: %s", uv_strerror(r));
        r = completion_queue_init(&s->queue, &s->loop);
        if (r < 0)
                return log_error_errno(r, "Cannot set up the event loop: %s", uv_strerror(r));
        r = worker_start(&s->worker, &s->queue);
        if (r < 0)
                return log_error_errno(r, "Cannot start the background worker: %m");

        r = roots_new(&s->roots, config->model_roots, config->n_model_roots);
        if (r < 0)
                return log_error_errno(r, "Cannot set up the model roots: %m");
        for (size_t i = 0; i < s->roots->n; i++)
                if (s->roots->items[i].fd < 0)
                        log_warning_errno(s->roots->items[i].open_error, "Model root %s: %m, ignoring.",
                                          s->roots->items[i].path);
        r = hugepool_new(&s->hugepool);
        if (r < 0)
                return log_error_errno(r, "Out of memory");
        r = cache_new(&s->store.cache, "host", config->host_budget);
        if (r < 0)
                return log_error_errno(r, "Cannot create the cache: %m");
        cache_set_reaper(s->store.cache, server_reap, s);
        ReaderParams p = reader_params(config);
        r = reader_new(&s->store.reader, &p);
        if (r < 0)
                return log_error_errno(r, "Cannot start the io_uring reader: %m");
        s->store.load_opts = (LoadOptions){ .direct = config->direct_io, .pages = config->host_pages };
        s->store.queue = &s->queue;
        s->store.hugepool = s->hugepool;
        s->store.worker = &s->worker;
        s->store.before_seal = server_before_seal;
        s->store.changed = server_changed;
        s->store.userdata = s;
        s->tier.store = &s->store;
        r = metrics_new(&s->metrics, &s->store, &s->tier);
        if (r < 0)
                return log_error_errno(r, "Out of memory");
        (void) completion_queue_add_hook(&s->queue, (completion_hook_fn) job_list_poll, &s->store.jobs);
        (void) completion_queue_add_hook(&s->queue, device_tier_poll, &s->tier);

        PeerLimits limits = peer_limits(config);
        r = peer_context_init(&s->peers, &s->loop, &limits, &driver_peer_ops, &s->driver);
        if (r < 0)
                return log_error_errno(r, "Cannot set up the event loop: %s", uv_strerror(r));
        s->peers_init = true;
        s->driver = (Driver){
                .loop = &s->loop,
                .store = &s->store,
                .tier = &s->tier,
                .gpu_reason = s->gpu_reason,
                .roots = s->roots,
                .config = s->config,
                .peers = &s->peers,
                .status = server_status,
                .changed = server_changed,
                .metrics = s->metrics,
                .userdata = s,
        };

        r = listen_open(s);
        if (r < 0)
                return r;
        /* The host tier of the process before, from the service manager's
         * store: before the first request can look for it. */
        s->adopted_hugetlb = fdstore_adopt(&s->fdstore, s->store.cache, s->roots);

        if (config->cluster_node) {
                WdError err = WD_ERROR_NULL;

                r = server_cluster_start(s, config, &err);
                if (r != 0)
                        return log_error_errno(r < 0 ? r : -EINVAL, "%s", err.message);
                s->driver.cluster = s->cluster;
        }

        if ((r = uv_poll_init(&s->loop, &s->listen_poll, s->listen_fd)) < 0 ||
            (r = uv_signal_init(&s->loop, &s->sig_term)) < 0 || (r = uv_signal_init(&s->loop, &s->sig_int)) < 0 ||
            (r = uv_signal_init(&s->loop, &s->sig_hup)) < 0 || (r = uv_timer_init(&s->loop, &s->status_timer)) < 0 ||
            (r = uv_timer_init(&s->loop, &s->watchdog_timer)) < 0 ||
            (r = uv_timer_init(&s->loop, &s->drain_timer)) < 0 ||
            (r = uv_timer_init(&s->loop, &s->accept_timer)) < 0 ||
            (r = uv_timer_init(&s->loop, &s->tick_timer)) < 0)
                return log_error_errno(r, "Cannot set up the event loop: %s", uv_strerror(r));
        s->handles_init = true;
        s->listening = true;
        gpu_tier_start(s);
        s->listen_poll.data = s->sig_term.data = s->sig_int.data = s->sig_hup.data = s;
        server_metrics_listen(s, config);
        s->status_timer.data = s->watchdog_timer.data = s->drain_timer.data = s->accept_timer.data =
                s->tick_timer.data = s;

        log_info("weightd %s: budget %.1f GiB (%s), %zu model roots, io queue depth %u, chunk %" PRIu64
                 " KiB, direct I/O %s",
                 WEIGHTD_VERSION, (double) config->host_budget / (1u << 30), config->host_budget_spec,
                 config->n_model_roots, config->queue_depth, config->chunk_size >> 10,
                 direct_mode_to_string(config->direct_io));
        server_hugepool_apply(s, config, "");
        *ret = TAKE_PTR(s);
        return 0;
}

static void handled_signals(sigset_t *set) {
        sigemptyset(set);
        sigaddset(set, SIGTERM);
        sigaddset(set, SIGINT);
        sigaddset(set, SIGHUP);
}

void server_block_signals(void) {
        sigset_t set;

        handled_signals(&set);
        (void) pthread_sigmask(SIG_BLOCK, &set, NULL);
}

int server_run(Server *s) {
        sigset_t set;

        uv_poll_start(&s->listen_poll, UV_READABLE, on_listen);
        uv_signal_start(&s->sig_term, on_signal, SIGTERM);
        uv_signal_start(&s->sig_int, on_signal, SIGINT);
        uv_signal_start(&s->sig_hup, on_signal, SIGHUP);
        /* One that came while the daemon started is handled now. */
        handled_signals(&set);
        (void) pthread_sigmask(SIG_UNBLOCK, &set, NULL);
        uv_timer_start(&s->status_timer, on_status_timer, 5000, 5000);
        s->hugetlb_free_pages = hugetlb_pool_free();
        uv_timer_start(&s->tick_timer, on_tick, 1000, 1000);
        s->watchdog_usec = notify_watchdog_usec();
        if (s->watchdog_usec > 0) {
                uint64_t ms = MAX(s->watchdog_usec / 2000, 1);
                uv_timer_start(&s->watchdog_timer, on_watchdog_timer, ms, ms);
        }
        /* With [memory] ready_after_touch, READY=1 waits for the pool the
         * daemon added to be touched (server_ready_check()): the first
         * load after `systemctl start` returns then lands on touched huge
         * pages.  The socket serves meanwhile. */
        s->ready_pending = s->config->ready_after_touch && server_hugepool_touching(s);
        if (s->ready_pending)
                log_info("Not ready until the hugetlb pool is touched ([memory] ready_after_touch = yes); "
                         "serving meanwhile");
        server_notify_ready(s);
        server_update_status(s);

        (void) uv_run(&s->loop, UV_RUN_DEFAULT);
        /* Every job ended and every peer left: hand what is resident to the
         * service manager for the next start. */
        fdstore_save(s->store.cache);
        log_info("Stopped");
        return s->exit_code;
}
