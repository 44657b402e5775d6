/* Benchmark client for the daemon, on libweightd-client.
 *
 *   wd-bench-client attach SOCKET MODEL COMPONENT RUNS [R/W [uneven] PATTERN:DIM...]
 *       RUNS times: fork a new process that connects, says Hello, loads
 *       the (resident) component and has every tensor mapped, then
 *       releases it; prints the attach times (connect to lease in hand,
 *       measured in the child) as JSON: {"runs", "median_ms", "p99_ms",
 *       "min_ms", "max_ms", "tensors", "bytes"}.  With a shard, the load
 *       asks for rank R of world W split by the rules.
 *   wd-bench-client load SOCKET MODEL COMPONENT
 *       one load, for fan-out runs: prints {"seconds", "bytes",
 *       "was_resident"}; the lease ends when the process exits.
 *   wd-bench-client latency SOCKET SECONDS
 *       one connection sends Status requests back to back for SECONDS and
 *       reports their round trips: {"requests", "median_us", "p99_us",
 *       "max_us"}; run beside a load or an eviction, it shows whether the
 *       daemon's loop ever stalls.
 *   wd-bench-client status SOCKET SECONDS CONNECTIONS
 *       CONNECTIONS threads, each with its own connection, send Status
 *       requests back to back for SECONDS; prints {"requests",
 *       "per_second", "connections"}. */

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <weightd/client.h>

static double now_s(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

static int fail(const char *what, const wd_error *err) {
        fprintf(stderr, "wd-bench-client: %s: %s: %s\n", what, wd_code_name(err->code), err->message);
        return 1;
}

static int parse_count(const char *s, unsigned long *ret) {
        char *end;

        errno = 0;
        unsigned long v = strtoul(s, &end, 10);
        if (errno || end == s || *end || v == 0 || v > 1000000)
                return -EINVAL;
        *ret = v;
        return 0;
}

/* The load options of attach: a shard, or none. */
static wd_load_options load_opts;
static wd_shard_rule load_rules[64];

/* "R/W [uneven] PATTERN:DIM...", split at the last ':'.  Returns 0 or -EINVAL. */
static int parse_shard(char **argv, int argc) {
        unsigned rank, world, dim;
        char c;

        if (argc < 1 || argc > 65 || sscanf(argv[0], "%u/%u%c", &rank, &world, &c) != 2)
                return -EINVAL;
        load_opts = (wd_load_options){ .rank = rank, .world = world, .rules = load_rules };
        for (int i = 1; i < argc; i++) {
                char *colon = strrchr(argv[i], ':');

                if (strcmp(argv[i], "uneven") == 0) {
                        load_opts.uneven = 1;
                        continue;
                }
                if (!colon || sscanf(colon + 1, "%u%c", &dim, &c) != 1)
                        return -EINVAL;
                *colon = '\0';
                load_rules[load_opts.n_rules++] = (wd_shard_rule){ .pattern = argv[i], .dim = dim };
        }
        return 0;
}

static int cmp_double(const void *a, const void *b) {
        double x = *(const double *) a, y = *(const double *) b;
        return (x > y) - (x < y);
}

/* In a fresh process: connect, load, release.  Returns seconds or < 0. */
static double attach_once(const char *sock, const char *model, const char *comp, size_t *ret_tensors,
                          uint64_t *ret_bytes) {
        wd_client *c = NULL;
        wd_lease *l = NULL;
        wd_error err;
        double t0 = now_s(), t;

        if (wd_connect(sock, &c, &err) != WD_OK)
                return fail("connect", &err), -1;
        if (wd_load_ex(c, model, comp, &load_opts, &l, &err) != WD_OK)
                return fail("load", &err), -1;
        t = now_s() - t0;
        *ret_tensors = wd_manifest_n_tensors(wd_lease_manifest(l));
        *ret_bytes = wd_manifest_bytes(wd_lease_manifest(l));
        (void) wd_release(l, NULL);
        wd_disconnect(c);
        return t;
}

static int cmd_attach(const char *sock, const char *model, const char *comp, unsigned long runs) {
        double *times = calloc(runs, sizeof(double));
        size_t tensors = 0;
        uint64_t bytes = 0;

        if (!times)
                return 1;
        for (unsigned long i = 0; i < runs; i++) {
                int fds[2];
                pid_t pid;
                struct {
                        double t;
                        size_t tensors;
                        uint64_t bytes;
                } res;

                if (pipe2(fds, O_CLOEXEC) < 0)
                        return perror("pipe"), 1;
                pid = fork();
                if (pid < 0)
                        return perror("fork"), 1;
                if (pid == 0) {
                        close(fds[0]);
                        res.t = attach_once(sock, model, comp, &res.tensors, &res.bytes);
                        _exit(write(fds[1], &res, sizeof(res)) == sizeof(res) && res.t >= 0 ? 0 : 1);
                }
                close(fds[1]);
                ssize_t k = read(fds[0], &res, sizeof(res));
                close(fds[0]);
                int status;
                if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0 ||
                    k != sizeof(res))
                        return fprintf(stderr, "wd-bench-client: attach run %lu failed\n", i), 1;
                times[i] = res.t;
                tensors = res.tensors;
                bytes = res.bytes;
        }
        qsort(times, runs, sizeof(double), cmp_double);
        printf("{\"runs\": %lu, \"median_ms\": %.3f, \"p99_ms\": %.3f, \"min_ms\": %.3f, \"max_ms\": %.3f, "
               "\"tensors\": %zu, \"bytes\": %" PRIu64 "}\n",
               runs, times[runs / 2] * 1e3, times[(runs * 99) / 100 < runs ? (runs * 99) / 100 : runs - 1] * 1e3,
               times[0] * 1e3, times[runs - 1] * 1e3, tensors, bytes);
        free(times);
        return 0;
}

static int cmd_load(const char *sock, const char *model, const char *comp) {
        wd_client *c = NULL;
        wd_lease *l = NULL;
        wd_prefetch_result pr;
        wd_error err;
        double t0 = now_s();

        if (wd_connect(sock, &c, &err) != WD_OK)
                return fail("connect", &err);
        if (wd_load(c, model, comp, &l, &err) != WD_OK)
                return fail("load", &err);
        double t = now_s() - t0;
        (void) pr;
        printf("{\"seconds\": %.6f, \"bytes\": %" PRIu64 "}\n", t, wd_manifest_bytes(wd_lease_manifest(l)));
        (void) wd_release(l, NULL);
        wd_disconnect(c);
        return 0;
}

typedef struct StatusWorker {
        pthread_t thread;
        const char *sock;
        double seconds;
        uint64_t requests;
        int failed;
} StatusWorker;

static void *status_worker(void *p) {
        StatusWorker *w = p;
        wd_client *c = NULL;
        wd_error err;
        double end;

        if (wd_connect(w->sock, &c, &err) != WD_OK) {
                w->failed = fail("connect", &err);
                return NULL;
        }
        end = now_s() + w->seconds;
        while (now_s() < end) {
                for (int i = 0; i < 64; i++) {
                        wd_status *st = NULL;
                        if (wd_status_get(c, &st, &err) != WD_OK) {
                                w->failed = fail("status", &err);
                                wd_disconnect(c);
                                return NULL;
                        }
                        wd_status_free(st);
                        w->requests++;
                }
        }
        wd_disconnect(c);
        return NULL;
}

static int cmd_status(const char *sock, unsigned long seconds, unsigned long conns) {
        StatusWorker *w = calloc(conns, sizeof(StatusWorker));
        uint64_t total = 0;
        double t0, t;
        int failed = 0;

        if (!w)
                return 1;
        t0 = now_s();
        for (unsigned long i = 0; i < conns; i++) {
                w[i] = (StatusWorker){ .sock = sock, .seconds = (double) seconds };
                if (pthread_create(&w[i].thread, NULL, status_worker, &w[i]) != 0)
                        return fprintf(stderr, "wd-bench-client: cannot start thread %lu\n", i), 1;
        }
        for (unsigned long i = 0; i < conns; i++) {
                pthread_join(w[i].thread, NULL);
                total += w[i].requests;
                failed |= w[i].failed;
        }
        t = now_s() - t0;
        free(w);
        if (failed)
                return 1;
        printf("{\"requests\": %" PRIu64 ", \"seconds\": %.3f, \"per_second\": %.0f, \"connections\": %lu}\n", total, t,
               (double) total / t, conns);
        return 0;
}

static int cmd_latency(const char *sock, unsigned long seconds) {
        size_t cap = 1 << 20, n = 0;
        double *rtt = calloc(cap, sizeof(double)), end;
        wd_client *c = NULL;
        wd_error err;

        if (!rtt)
                return 1;
        if (wd_connect(sock, &c, &err) != WD_OK)
                return fail("connect", &err);
        end = now_s() + (double) seconds;
        while (n < cap && now_s() < end) {
                wd_status *st = NULL;
                double t0 = now_s();

                if (wd_status_get(c, &st, &err) != WD_OK)
                        return fail("status", &err);
                rtt[n++] = now_s() - t0;
                wd_status_free(st);
        }
        wd_disconnect(c);
        qsort(rtt, n, sizeof(double), cmp_double);
        printf("{\"requests\": %zu, \"median_us\": %.0f, \"p99_us\": %.0f, \"max_us\": %.0f}\n", n,
               rtt[n / 2] * 1e6, rtt[(n * 99) / 100] * 1e6, rtt[n - 1] * 1e6);
        free(rtt);
        return 0;
}

int main(int argc, char **argv) {
        unsigned long a, b;

        if (argc >= 6 && strcmp(argv[1], "attach") == 0 && parse_count(argv[5], &a) == 0 &&
            (argc == 6 || parse_shard(argv + 6, argc - 6) == 0))
                return cmd_attach(argv[2], argv[3], argv[4], a);
        if (argc == 5 && strcmp(argv[1], "load") == 0)
                return cmd_load(argv[2], argv[3], argv[4]);
        if (argc == 4 && strcmp(argv[1], "latency") == 0 && parse_count(argv[3], &a) == 0)
                return cmd_latency(argv[2], a);
        if (argc == 5 && strcmp(argv[1], "status") == 0 && parse_count(argv[3], &a) == 0 &&
            parse_count(argv[4], &b) == 0)
                return cmd_status(argv[2], a, b);
        fprintf(stderr, "usage: wd-bench-client attach SOCKET MODEL COMPONENT RUNS [R/W [uneven] PATTERN:DIM...]\n"
                        "       wd-bench-client load SOCKET MODEL COMPONENT\n"
                        "       wd-bench-client latency SOCKET SECONDS\n"
                        "       wd-bench-client status SOCKET SECONDS CONNECTIONS\n");
        return 2;
}
