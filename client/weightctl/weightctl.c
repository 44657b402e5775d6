/* weightctl: the operator's command-line client of weightd.
 *
 * One connection, one command: the command line is parsed with getopt_long
 * (options may follow the command), MODEL is made absolute without resolving
 * symlinks, and the request goes through libweightd-client's public API
 * only.  Results are text for people, or with --json one compact JSON
 * document on stdout.  Exit 0 on success, 1 when the daemon refused or a
 * local step failed ("weightctl: CODE_NAME: message" on stderr), 2 on a
 * usage error.  The manual is weightctl(1), man/weightctl.1.scd; a new option
 * goes into help(), the man page and shell-completion/bash/weightctl (their
 * tests check that the three agree). */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include "macro.h"
#include "path-util.h"
#include "weightd/client.h"

enum {
        EXIT_OK = 0,
        EXIT_FAILED = 1,
        EXIT_USAGE = 2,
};

/* An owned list of strings. */
typedef struct Strv {
        char **items;
        size_t n;
} Strv;

static void strv_done(Strv *s) {
        for (size_t i = 0; i < s->n; i++)
                free(s->items[i]);
        free(s->items);
        *s = (Strv) {};
}

/* The daemon's answer to wd_components(). */
typedef struct ComponentList {
        wd_component *items;
        size_t n;
        int diffusers;
} ComponentList;

static void component_list_done(ComponentList *l) {
        wd_components_free(l->items, l->n);
        *l = (ComponentList) {};
}

DEFINE_TRIVIAL_CLEANUP_FUNC(wd_client *, wd_disconnect);
DEFINE_TRIVIAL_CLEANUP_FUNC(wd_manifest *, wd_manifest_free);
DEFINE_TRIVIAL_CLEANUP_FUNC(wd_status *, wd_status_free);
DEFINE_TRIVIAL_CLEANUP_FUNC(wd_cluster_info *, wd_cluster_free);
DEFINE_TRIVIAL_CLEANUP_FUNC(wd_cluster_prefetch_result *, wd_cluster_prefetch_result_free);

/* A failed release needs no report: closing the connection ends the lease. */
static inline void wd_releasep(wd_lease **l) {
        if (*l)
                (void) wd_release(*l, NULL);
}

/* The one JSON style of every --json output: a single line. */
#define JSON_FLAGS (JSON_COMPACT | JSON_REAL_PRECISION(9))

#define SIZE_MAX_LEN 32
#define DURATION_MAX_LEN 32

enum {
        CMD_MODEL = 1u << 0,      /* takes MODEL */
        CMD_COMPONENT = 1u << 1,  /* takes one --component */
        CMD_COMPONENTS = 1u << 2, /* takes --component more than once */
        CMD_JSON = 1u << 3,       /* takes --json */
        CMD_TENSOR = 1u << 4,     /* takes --tensor (required) and --force */
        CMD_SHARD = 1u << 5,      /* takes --shard, --rule and --uneven */
        CMD_DEVICE = 1u << 6,     /* takes --device and --keep-host */
        CMD_CLUSTER = 1u << 7,    /* takes --cluster and --nodes */
};

typedef struct Options {
        const char *socket;
        const char *command;
        const char *model_arg;
        char *model; /* model_arg made absolute */
        const char **components;
        size_t n_components;
        const char *tensor;
        bool json;
        bool force;
        /* --shard RANK/WORLD (world 0: none), --rule PATTERN:DIM, --uneven */
        unsigned rank, world;
        wd_shard_rule *rules;
        size_t n_rules;
        bool uneven;
        /* --device cuda:N|cuda:GPU-... (NULL: host memory), --keep-host yes|no */
        const char *device;
        int keep_host;
        /* --cluster, --nodes A,B,... (none: every node of the cluster) */
        bool cluster;
        Strv nodes;
        /* --node-shard NODE=RANK/WORLD (with --cluster; --rule and --uneven
         * apply to each): the node's part of a part plan */
        wd_cluster_part *parts;
        Strv *part_tensors; /* --node-tensors NODE=PAT,...: parts[i]'s */
        size_t n_parts;
        /* --tensors PAT,...: only these tensors */
        Strv tensors;
} Options;

static void options_done(Options *o) {
        free(o->model);
        free(o->components);
        free(o->rules);
        for (size_t i = 0; i < o->n_parts; i++)
                strv_done(&o->part_tensors[i]);
        free(o->parts);
        free(o->part_tensors);
        strv_done(&o->nodes);
        strv_done(&o->tensors);
}

/* The load options of --shard, --rule, --uneven, --device and --keep-host. */
static wd_load_options load_options(const Options *o) {
        return (wd_load_options){
                .device = o->device,
                .keep_host = o->keep_host,
                .rank = o->rank,
                .world = o->world,
                .rules = o->rules,
                .n_rules = o->n_rules,
                .uneven = o->uneven,
                .tensors = (const char *const *) o->tensors.items,
                .n_tensors = o->tensors.n,
        };
}

typedef struct Command {
        const char *name;
        unsigned flags;
        int (*run)(wd_client *c, const Options *o);
} Command;

/* ---- output helpers ---------------------------------------------------- */

static int usage_error(const char *fmt, ...) _printf_(1, 2);
static int usage_error(const char *fmt, ...) {
        va_list ap;

        fputs("weightctl: ", stderr);
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputs("\nUsage: weightctl [--socket PATH] COMMAND [ARGS]...  (weightctl --help lists the commands)\n",
              stderr);
        return EXIT_USAGE;
}

/* A local failure, with errno_value's text when it is not 0. */
static int fail(int errno_value, const char *fmt, ...) _printf_(2, 3);
static int fail(int errno_value, const char *fmt, ...) {
        va_list ap;

        fputs("weightctl: ", stderr);
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        if (errno_value != 0)
                fprintf(stderr, ": %s", strerror(errno_value));
        fputc('\n', stderr);
        return EXIT_FAILED;
}

/* A refusal by the daemon or the library: "weightctl: CODE_NAME: message". */
static int fail_wd(int code, const wd_error *e) {
        fprintf(stderr, "weightctl: %s%s%s\n", wd_code_name(code), e->message[0] ? ": " : "", e->message);
        return EXIT_FAILED;
}

static int fail_oom(void) {
        return fail(ENOMEM, "cannot build the output");
}

/* A copy of s that is safe to print on a terminal: control characters become
 * \xNN (names come from files nobody vetted).  NULL s gives "-". */
static char *printable(const char *s) {
        char *out, *o;

        if (!s)
                s = "-";
        out = malloc(strlen(s) * 4 + 1);
        if (!out)
                return NULL;
        o = out;
        for (const unsigned char *p = (const unsigned char *) s; *p; p++)
                if (*p < 0x20 || *p == 0x7f)
                        o += sprintf(o, "\\x%02x", *p);
                else
                        *o++ = (char) *p;
        *o = '\0';
        return out;
}

/* Terminal columns taken by a UTF-8 string, counting one per code point. */
static size_t text_width(const char *s) {
        size_t n = 0;

        for (; *s; s++)
                if (((unsigned char) *s & 0xc0) != 0x80)
                        n++;
        return n;
}

/* "512 B", "1.5 GiB": binary units with one decimal. */
static const char *format_bytes(char buf[static SIZE_MAX_LEN], uint64_t n) {
        static const char *const units[] = { "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" };
        double v;
        size_t u = 0;

        if (n < 1024) {
                snprintf(buf, SIZE_MAX_LEN, "%" PRIu64 " B", n);
                return buf;
        }
        v = (double) n / 1024.0;
        /* Move up a unit where one decimal would round to 1024.0. */
        while (v >= 1023.95 && u + 1 < ELEMENTSOF(units)) {
                v /= 1024.0;
                u++;
        }
        snprintf(buf, SIZE_MAX_LEN, "%.1f %s", v, units[u]);
        return buf;
}

/* "350ms", "4.2s", "5m03s", "2h05m", "3d04h". */
static const char *format_duration(char buf[static DURATION_MAX_LEN], uint64_t ms) {
        uint64_t s = ms / 1000;

        if (ms < 1000)
                snprintf(buf, DURATION_MAX_LEN, "%" PRIu64 "ms", ms);
        else if (s < 60)
                snprintf(buf, DURATION_MAX_LEN, "%" PRIu64 ".%" PRIu64 "s", s, ms % 1000 / 100);
        else if (s < 3600)
                snprintf(buf, DURATION_MAX_LEN, "%" PRIu64 "m%02" PRIu64 "s", s / 60, s % 60);
        else if (s < 86400)
                snprintf(buf, DURATION_MAX_LEN, "%" PRIu64 "h%02" PRIu64 "m", s / 3600, s % 3600 / 60);
        else
                snprintf(buf, DURATION_MAX_LEN, "%" PRIu64 "d%02" PRIu64 "h", s / 86400, s % 86400 / 3600);
        return buf;
}

static double now_s(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double) ts.tv_sec + (double) ts.tv_nsec * 1e-9;
}

/* A JSON string; null for NULL.  jansson takes only valid UTF-8, and paths
 * need not be: such a string is written with '?' for every non-ASCII byte. */
static json_t *json_str(const char *s) {
        _cleanup_free_ char *ascii = NULL;
        json_t *v;

        if (!s)
                return json_null();
        v = json_string(s);
        if (v)
                return v;
        ascii = strdup(s);
        if (!ascii)
                return NULL;
        for (char *p = ascii; *p; p++)
                if ((unsigned char) *p >= 0x80)
                        *p = '?';
        return json_string(ascii);
}

/* jansson integers are signed 64-bit; larger values become reals. */
static json_t *json_u64(uint64_t v) {
        if (v <= INT64_MAX)
                return json_integer((json_int_t) v);
        return json_real((double) v);
}

/* Write doc (consumed) as the one JSON document of this run. */
static int json_print(json_t *doc) {
        _cleanup_(json_decrefp) json_t *d = doc;

        if (!d)
                return fail_oom();
        if (json_dumpf(d, stdout, JSON_FLAGS) < 0)
                return fail(errno, "cannot write the JSON output");
        fputc('\n', stdout);
        return EXIT_OK;
}

/* Text tables: a header row, then rows; two spaces between columns. */
typedef struct Table {
        size_t n_columns;
        unsigned right; /* bit i: column i is right-aligned */
        Strv cells;     /* row-major, printable copies */
        size_t allocated;
} Table;

static void table_done(Table *t) {
        strv_done(&t->cells);
}

static int table_add_row(Table *t, const char *const *row) {
        Strv *c = &t->cells;

        if (c->n + t->n_columns > t->allocated) {
                size_t n = t->allocated ? t->allocated * 2 : t->n_columns * 16;
                char **items = reallocarray(c->items, n, sizeof(char *));

                if (!items)
                        return -ENOMEM;
                c->items = items;
                t->allocated = n;
        }
        for (size_t i = 0; i < t->n_columns; i++) {
                c->items[c->n] = printable(row[i]);
                if (!c->items[c->n])
                        return -ENOMEM;
                c->n++;
        }
        return 0;
}

static int table_print(const Table *t) {
        _cleanup_free_ size_t *width = calloc(t->n_columns, sizeof(size_t));
        const Strv *c = &t->cells;

        if (!width)
                return -ENOMEM;
        for (size_t i = 0; i < c->n; i++) {
                size_t w = text_width(c->items[i]);

                if (w > width[i % t->n_columns])
                        width[i % t->n_columns] = w;
        }
        for (size_t i = 0; i < c->n; i++) {
                size_t col = i % t->n_columns, pad = width[col] - text_width(c->items[i]);
                bool last = col + 1 == t->n_columns;

                if (t->right & (1u << col))
                        printf("%*s%s", (int) pad, "", c->items[i]);
                else
                        printf("%s%*s", c->items[i], last ? 0 : (int) pad, "");
                fputs(last ? "\n" : "  ", stdout);
        }
        return 0;
}

/* ---- MODEL ------------------------------------------------------------- */

/* MODEL as an absolute path: a relative one is joined to getcwd(); "."
 * components and repeated or trailing slashes are dropped lexically.
 * Symlinks and ".." in MODEL stay as written: the daemon judges where they
 * lead. */
static int model_path_absolute(const char *arg, char **ret) {
        _cleanup_free_ char *cwd = NULL, *joined = NULL;

        if (arg[0] != '/') {
                cwd = getcwd(NULL, 0);
                if (!cwd)
                        return -errno;
                if (asprintf(&joined, "%s/%s", cwd, arg) < 0)
                        return -ENOMEM;
                arg = joined;
        }
        return path_simplify(arg, ret);
}

/* ---- prefetch ---------------------------------------------------------- */

static volatile sig_atomic_t cancel_requested = 0;

static void on_sigint(int sig) {
        cancel_requested = 1;
}

typedef struct Progress {
        char label[25]; /* printable, cut to leave room for a bar */
        bool tty;
        unsigned columns;
        double start;
        double last_draw;
        bool drawn;
} Progress;

static void progress_clear(Progress *p) {
        if (p->drawn) {
                fputs("\r\033[K", stderr);
                fflush(stderr);
                p->drawn = false;
        }
}

static void progress_draw(Progress *p, uint64_t done, uint64_t total, double now) {
        char d[SIZE_MAX_LEN], t[SIZE_MAX_LEN], eta[DURATION_MAX_LEN] = "-", tail[160], bar[64];
        double elapsed = now - p->start, rate = elapsed > 0 ? (double) done / elapsed : 0;
        double fraction = total > 0 ? (double) MIN(done, total) / (double) total : 1.0;
        size_t used, width = 0;

        if (rate > 0 && total > done)
                format_duration(eta, (uint64_t) ((double) (total - done) / rate * 1000.0));
        /* Fixed-width fields, so the bar keeps its length. */
        snprintf(tail, sizeof(tail), "%10s/%-10s %3u%% %6.2f GB/s ETA %-6s", format_bytes(d, done),
                 format_bytes(t, total), (unsigned) (fraction * 100.0), rate / 1e9, eta);
        used = text_width(p->label) + strlen(tail) + 4; /* " [" "] " */
        if (p->columns > used + 10)
                width = MIN(p->columns - used - 1, 40);
        if (width > 0) {
                size_t filled = (size_t) (fraction * (double) width);

                memset(bar, '#', filled);
                memset(bar + filled, '-', width - filled);
                bar[width] = '\0';
                fprintf(stderr, "\r\033[K%s [%s] %s", p->label, bar, tail);
        } else
                fprintf(stderr, "\r\033[K%s %s", p->label, tail);
        fflush(stderr);
        p->drawn = true;
        p->last_draw = now;
}

static int progress_update(uint64_t done, uint64_t total, void *userdata) {
        Progress *p = userdata;
        double now;

        if (cancel_requested)
                return 1;
        if (!p->tty)
                return 0;
        now = now_s();
        /* At most ten frames a second, and always the last one. */
        if (p->drawn && now - p->last_draw < 0.1 && done < total)
                return 0;
        progress_draw(p, done, total, now);
        return 0;
}

static void progress_init(Progress *p, const char *label, bool tty) {
        _cleanup_free_ char *l = printable(label);
        struct winsize ws;
        size_t n;

        *p = (Progress) { .tty = tty, .columns = 80, .start = now_s() };
        if (tty && ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0)
                p->columns = ws.ws_col;
        snprintf(p->label, sizeof(p->label), "%s", l ? l : "?");
        /* Do not leave half a UTF-8 sequence where the label was cut. */
        n = strlen(p->label);
        if (l && strlen(l) > n)
                while (n > 0 && ((unsigned char) p->label[n] & 0xc0) == 0x80)
                        p->label[--n] = '\0';
}

/* Why prefetch skips a pipeline's component of this kind; NULL for one
 * with weights. */
static const char *kind_skip_reason(const char *kind) {
        static const char *const reasons[][2] = {
                { "no-weights", "no weights" },
                { "absent", "absent" },
                { "missing", "missing folder" },
                { "pickle-only", "pickle checkpoints only, not served" },
        };

        if (strcmp(kind, "weights") == 0)
                return NULL;
        for (size_t i = 0; i < ELEMENTSOF(reasons); i++)
                if (strcmp(kind, reasons[i][0]) == 0)
                        return reasons[i][1];
        return kind; /* from a newer daemon */
}

/* Which components "prefetch MODEL" means without --component, as the
 * daemon lists them: "" for a model that is not a pipeline (whatever its
 * kind: a refusal of the prefetch says best what is wrong with it), else
 * each component of kind "weights", in model_index.json's order. */
static int prefetch_components(wd_client *c, const Options *o, Strv *ret) {
        _cleanup_(component_list_done) ComponentList cl = {};
        _cleanup_(strv_done) Strv l = {};
        wd_error e = {};
        int r;

        r = wd_components(c, o->model, &cl.items, &cl.n, &cl.diffusers, &e);
        if (r != WD_OK)
                return fail_wd(r, &e);
        l.items = calloc(cl.n + 1, sizeof(char *));
        if (!l.items)
                return fail_oom();
        for (size_t i = 0; i < cl.n; i++) {
                const wd_component *x = &cl.items[i];
                const char *reason = cl.diffusers ? kind_skip_reason(x->kind) : NULL;

                if (reason) {
                        if (!o->json) {
                                _cleanup_free_ char *name = printable(x->name), *why = printable(reason);

                                fprintf(stderr, "weightctl: skipping %s: %s\n", name ? name : "?", why ? why : "?");
                        }
                        continue;
                }
                l.items[l.n] = strdup(x->name);
                if (!l.items[l.n])
                        return fail_oom();
                l.n++;
        }
        if (l.n == 0)
                return fail(0, "%s: no component of this diffusers model has safetensors weights", o->model);
        *ret = l;
        l = (Strv) {};
        return 0;
}

/* ---- the cluster ------------------------------------------------------ */

/* A node's state after a cluster prefetch that leaves the component
 * resident there: "ok", "resident", and "mismatch" (it read its own
 * files). */
static bool node_load_resident(const char *state) {
        return strcmp(state, "ok") == 0 || strcmp(state, "resident") == 0 || strcmp(state, "mismatch") == 0;
}

static json_t *node_loads_json(const wd_cluster_prefetch_result *res) {
        json_t *a = json_array();

        for (size_t i = 0; a && i < res->n_nodes; i++) {
                const wd_cluster_node_load *x = &res->nodes[i];

                if (json_array_append_new(a, json_pack("{s:o, s:o, s:o, s:o, s:o, s:o}", "node", json_str(x->node),
                                                       "state", json_str(x->state), "storage_read_bytes",
                                                       json_u64(x->storage_read_bytes), "peer_received_bytes",
                                                       json_u64(x->peer_received_bytes), "peer_sent_bytes",
                                                       json_u64(x->peer_sent_bytes), "message",
                                                       json_str(x->message))) < 0) {
                        json_decref(a);
                        a = NULL;
                }
        }
        return a;
}

/* The text of a cluster prefetch: a line for the component, then a table
 * of its nodes.  Returns 0 or -ENOMEM. */
static int node_loads_print(const char *label, const wd_cluster_prefetch_result *res, double seconds) {
        _cleanup_(table_done) Table t = { .n_columns = 6, .right = 1u << 2 | 1u << 3 | 1u << 4 };
        _cleanup_free_ char *l = printable(label);
        char size[2][SIZE_MAX_LEN];
        uint64_t read = 0;
        bool all_resident = res->n_nodes > 0;
        int r;

        for (size_t i = 0; i < res->n_nodes; i++) {
                read += res->nodes[i].storage_read_bytes;
                all_resident = all_resident && strcmp(res->nodes[i].state, "resident") == 0;
        }
        if (!l)
                return -ENOMEM;
        if (all_resident)
                printf("%s: %s already resident on %zu nodes\n", l, format_bytes(size[0], res->bytes), res->n_nodes);
        else
                printf("%s: %s to %zu nodes in %.1f s, %s read from storage\n", l, format_bytes(size[0], res->bytes),
                       res->n_nodes, seconds, format_bytes(size[1], read));

        r = table_add_row(&t, (const char *const[]) { "NODE", "STATE", "READ", "RECEIVED", "SENT", "MESSAGE" });
        for (size_t i = 0; r == 0 && i < res->n_nodes; i++) {
                const wd_cluster_node_load *x = &res->nodes[i];
                char b[3][SIZE_MAX_LEN];

                r = table_add_row(&t, (const char *const[]) {
                                              x->node,
                                              x->state,
                                              format_bytes(b[0], x->storage_read_bytes),
                                              format_bytes(b[1], x->peer_received_bytes),
                                              format_bytes(b[2], x->peer_sent_bytes),
                                              x->message[0] ? x->message : "-",
                                      });
        }
        if (r == 0)
                r = table_print(&t);
        fflush(stdout);
        return r;
}

/* A line on stderr for each node that did not make the component
 * resident; returns their number. */
static size_t node_loads_report(const char *label, const wd_cluster_prefetch_result *res) {
        size_t n = 0;

        for (size_t i = 0; i < res->n_nodes; i++) {
                const wd_cluster_node_load *x = &res->nodes[i];
                _cleanup_free_ char *l = NULL, *node = NULL, *state = NULL, *msg = NULL;

                if (node_load_resident(x->state))
                        continue;
                n++;
                l = printable(label);
                node = printable(x->node);
                state = printable(x->state);
                msg = printable(x->message);
                fprintf(stderr, "weightctl: %s: node %s: %s%s%s\n", l ? l : "?", node ? node : "?",
                        state ? state : "?", x->message[0] ? ": " : "", x->message[0] && msg ? msg : "");
        }
        return n;
}

/* The parts of a part plan: each node of --nodes (the whole component,
 * unless it has a --node-shard), then the other --node-shard nodes; the
 * rules apply to every shard.  NULL when out of memory. */
static wd_cluster_part *cluster_parts(const Options *o, size_t *ret_n) {
        wd_cluster_part *v = calloc(o->nodes.n + o->n_parts + 1, sizeof(wd_cluster_part));
        size_t n = 0;

        if (!v)
                return NULL;
        for (size_t i = 0; i < o->nodes.n; i++) {
                bool sharded = false;

                for (size_t k = 0; k < o->n_parts; k++)
                        sharded = sharded || strcmp(o->parts[k].node, o->nodes.items[i]) == 0;
                if (!sharded)
                        v[n++] = (wd_cluster_part){ .node = o->nodes.items[i] };
        }
        for (size_t k = 0; k < o->n_parts; k++) {
                v[n] = o->parts[k];
                if (v[n].world > 0) {
                        v[n].rules = o->rules;
                        v[n].n_rules = o->n_rules;
                        v[n].uneven = o->uneven;
                }
                v[n].tensors = (const char *const *) o->part_tensors[k].items;
                v[n++].n_tensors = o->part_tensors[k].n;
        }
        *ret_n = n;
        return v;
}

static int run_prefetch(wd_client *c, const Options *o) {
        _cleanup_(json_decrefp) json_t *results = NULL;
        _cleanup_(strv_done) Strv names = {};
        struct sigaction sa = { .sa_handler = on_sigint, .sa_flags = SA_RESTART | SA_RESETHAND };
        bool tty = isatty(STDERR_FILENO);
        size_t incomplete = 0; /* nodes of a cluster prefetch without the component */
        int r;

        /* The first Ctrl-C cancels at the next progress report; a second
         * one ends weightctl at once. */
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGINT, &sa, NULL) < 0)
                return fail(errno, "cannot handle SIGINT");

        if (o->n_components > 0) {
                names.items = calloc(o->n_components, sizeof(char *));
                if (!names.items)
                        return fail_oom();
                for (; names.n < o->n_components; names.n++)
                        if (!(names.items[names.n] = strdup(o->components[names.n])))
                                return fail_oom();
        } else {
                r = prefetch_components(c, o, &names);
                if (r != 0)
                        return r;
        }

        results = json_array();
        if (!results)
                return fail_oom();
        for (size_t i = 0; i < names.n; i++) {
                const char *component = names.items[i], *label = component[0] ? component : o->model;
                const char *slash = strrchr(o->model, '/');
                _cleanup_(wd_cluster_prefetch_result_freep) wd_cluster_prefetch_result *cres = NULL;
                wd_prefetch_result res = {};
                wd_error e = {};
                json_t *obj;
                Progress p;
                double seconds;

                if (cancel_requested)
                        break;
                /* The bar names a plain model by its last component.  For a
                 * cluster prefetch it counts the cluster's bytes, as the
                 * daemon reports them. */
                progress_init(&p, component[0] || !slash[1] ? label : slash + 1, tty);
                if (o->cluster) {
                        size_t n_parts = 0;
                        _cleanup_free_ wd_cluster_part *parts = o->n_parts > 0 ? cluster_parts(o, &n_parts) : NULL;
                        wd_cluster_options co = {
                                .parts = parts,
                                .n_parts = n_parts,
                                .device = o->device,
                                .progress = progress_update,
                                .userdata = &p,
                        };

                        if (o->n_parts > 0 && !parts)
                                return fail_oom();
                        if (o->n_parts == 0) {
                                co.nodes = (const char *const *) o->nodes.items;
                                co.n_nodes = o->nodes.n;
                        }
                        r = wd_prefetch_cluster_ex(c, o->model, component, &co, &cres, &e);
                        if (r == WD_OK)
                                res = (wd_prefetch_result){ .bytes = cres->bytes, .was_resident = cres->was_resident };
                } else {
                        wd_load_options lo = load_options(o);
                        lo.progress = progress_update;
                        lo.userdata = &p;
                        r = wd_prefetch_ex(c, o->model, component, &lo, &res, &e);
                }
                seconds = now_s() - p.start;
                progress_clear(&p);
                if (r == WD_CANCELLED && cancel_requested)
                        break;
                if (r != WD_OK)
                        return fail_wd(r, &e);

                obj = json_pack("{s:o, s:o, s:o, s:f, s:b}", "model", json_str(o->model), "component",
                                json_str(component), "bytes", json_u64(res.bytes), "seconds", seconds, "was_resident",
                                res.was_resident);
                if (obj && cres && json_object_set_new(obj, "nodes", node_loads_json(cres)) < 0) {
                        json_decref(obj);
                        obj = NULL;
                }
                if (json_array_append_new(results, obj) < 0)
                        return fail_oom();
                if (cres) {
                        if (!o->json && node_loads_print(label, cres, seconds) < 0)
                                return fail_oom();
                        incomplete += node_loads_report(label, cres);
                } else if (!o->json) {
                        _cleanup_free_ char *l = printable(label);
                        char size[SIZE_MAX_LEN];

                        if (res.was_resident)
                                printf("%s: %s already resident\n", l ? l : "?", format_bytes(size, res.bytes));
                        else
                                printf("%s: %s resident in %.1f s (%.1f GB/s)\n", l ? l : "?",
                                       format_bytes(size, res.bytes), seconds,
                                       seconds > 0 ? (double) res.bytes / seconds / 1e9 : 0.0);
                        fflush(stdout);
                }
        }
        if (cancel_requested) {
                fputs("weightctl: cancelled\n", stderr);
                return EXIT_FAILED;
        }
        r = o->json ? json_print(TAKE_PTR(results)) : EXIT_OK;
        /* The nodes' lines are out (and the JSON document), but the
         * component is not resident everywhere it was asked for. */
        if (r == EXIT_OK && incomplete > 0)
                return fail(0, "%zu node%s did not make the component resident", incomplete,
                            incomplete == 1 ? "" : "s");
        return r;
}

/* ---- ls, status, tensors ----------------------------------------------- */

typedef struct EntryList {
        wd_entry *entries;
        size_t n;
} EntryList;

static void entry_list_done(EntryList *l) {
        if (l->entries)
                wd_entries_free(l->entries, l->n);
}

static int run_ls(wd_client *c, const Options *o) {
        _cleanup_(entry_list_done) EntryList l = {};
        _cleanup_(table_done) Table t = { .n_columns = 9, .right = 1u << 4 | 1u << 5 | 1u << 7 };
        wd_error e = {};
        int r;

        r = wd_list(c, &l.entries, &l.n, &e);
        if (r != WD_OK)
                return fail_wd(r, &e);

        if (o->json) {
                json_t *a = json_array();

                for (size_t i = 0; a && i < l.n; i++) {
                        const wd_entry *x = &l.entries[i];

                        if (json_array_append_new(
                                    a, json_pack("{s:o, s:o, s:o, s:o, s:o, s:I, s:b, s:I, s:o, s:o}", "model",
                                                 json_str(x->model), "component", json_str(x->component), "tier",
                                                 json_str(x->tier), "state", json_str(x->state), "bytes",
                                                 json_u64(x->bytes), "leases", (json_int_t) x->leases, "pinned",
                                                 x->pinned, "files", (json_int_t) x->files, "idle_ms",
                                                 json_u64(x->idle_ms), "shard",
                                                 json_str(x->shard ? x->shard : ""))) < 0) {
                                json_decref(a);
                                a = NULL;
                        }
                }
                return json_print(a);
        }

        r = table_add_row(&t, (const char *const[]) { "MODEL", "COMPONENT", "TIER", "STATE", "SIZE", "LEASES",
                                                       "PINNED", "IDLE", "SHARD" });
        for (size_t i = 0; r == 0 && i < l.n; i++) {
                const wd_entry *x = &l.entries[i];
                char size[SIZE_MAX_LEN], leases[16], idle[DURATION_MAX_LEN];

                snprintf(leases, sizeof(leases), "%" PRIu32, x->leases);
                r = table_add_row(&t, (const char *const[]) {
                                              x->model,
                                              x->component && x->component[0] ? x->component : "-",
                                              x->tier,
                                              x->state,
                                              format_bytes(size, x->bytes),
                                              leases,
                                              x->pinned ? "yes" : "no",
                                              format_duration(idle, x->idle_ms),
                                              x->shard && x->shard[0] ? x->shard : "-",
                                      });
        }
        if (r == 0)
                r = table_print(&t);
        return r == 0 ? EXIT_OK : fail_oom();
}

/* "250us", "1.2ms", "3.4s": a round trip. */
static const char *format_rtt(char buf[static DURATION_MAX_LEN], uint64_t us) {
        if (us < 1000)
                snprintf(buf, DURATION_MAX_LEN, "%" PRIu64 "us", us);
        else if (us < 1000000)
                snprintf(buf, DURATION_MAX_LEN, "%" PRIu64 ".%" PRIu64 "ms", us / 1000, us % 1000 / 100);
        else
                return format_duration(buf, us / 1000);
        return buf;
}

/* A generation (a 64-bit id of a daemon process) as 16 hex digits: JSON
 * integers past 2^63 would lose their low bits. */
#define GENERATION_MAX_LEN 17

static const char *format_generation(char buf[static GENERATION_MAX_LEN], uint64_t g) {
        snprintf(buf, GENERATION_MAX_LEN, "%016" PRIx64, g);
        return buf;
}

/* The nodes of a cluster in JSON; with full, each with its address and
 * since_ms too (weightctl cluster), else as status shows them. */
static json_t *cluster_nodes_json(const wd_cluster_info *ci, bool full) {
        json_t *a = json_array();

        for (size_t i = 0; a && i < ci->n_nodes; i++) {
                const wd_cluster_node *x = &ci->nodes[i];
                char gen[GENERATION_MAX_LEN];
                json_t *n = json_pack("{s:o, s:o, s:s, s:o, s:o, s:o, s:o}", "name", json_str(x->name), "state",
                                      json_str(x->state), "generation", format_generation(gen, x->generation),
                                      "rtt_us", json_u64(x->rtt_us), "sent_bytes", json_u64(x->sent_bytes),
                                      "received_bytes", json_u64(x->received_bytes), "last_error",
                                      json_str(x->last_error));

                if (n && full &&
                    (json_object_set_new(n, "address", json_str(x->address)) < 0 ||
                     json_object_set_new(n, "since_ms", json_u64(x->since_ms)) < 0)) {
                        json_decref(n);
                        n = NULL;
                }
                if (json_array_append_new(a, n) < 0) {
                        json_decref(a);
                        a = NULL;
                }
        }
        return a;
}

static int run_cluster(wd_client *c, const Options *o) {
        _cleanup_(wd_cluster_freep) wd_cluster_info *ci = NULL;
        _cleanup_(table_done) Table t = { .n_columns = 8, .right = 1u << 4 | 1u << 5 | 1u << 6 };
        char gen[GENERATION_MAX_LEN], size[3][SIZE_MAX_LEN];
        wd_error e = {};
        int r;

        r = wd_cluster(c, &ci, &e);
        if (r != WD_OK)
                return fail_wd(r, &e);

        if (o->json) {
                if (!ci->enabled)
                        return json_print(json_pack("{s:b}", "enabled", false));
                return json_print(json_pack("{s:b, s:o, s:s, s:o, s:o, s:o, s:o, s:o, s:o, s:o}", "enabled", true,
                                            "node", json_str(ci->node), "generation",
                                            format_generation(gen, ci->generation), "nodes",
                                            cluster_nodes_json(ci, true), "peer_sent_bytes",
                                            json_u64(ci->peer_sent_bytes), "peer_received_bytes",
                                            json_u64(ci->peer_received_bytes), "storage_saved_bytes",
                                            json_u64(ci->storage_saved_bytes), "gpu_lane", json_str(ci->gpu_lane),
                                            "lane_sent_bytes", json_u64(ci->lane_sent_bytes),
                                            "lane_received_bytes", json_u64(ci->lane_received_bytes)));
        }
        if (!ci->enabled) {
                puts("no cluster: the daemon has no [cluster] section");
                return EXIT_OK;
        }

        r = table_add_row(&t, (const char *const[]) { "NAME", "ADDRESS", "STATE", "GENERATION", "RTT", "SENT",
                                                       "RECEIVED", "LAST-ERROR" });
        for (size_t i = 0; r == 0 && i < ci->n_nodes; i++) {
                const wd_cluster_node *x = &ci->nodes[i];
                bool self = strcmp(x->state, "self") == 0;
                char rtt[DURATION_MAX_LEN], b[2][SIZE_MAX_LEN];

                r = table_add_row(&t, (const char *const[]) {
                                              x->name,
                                              x->address[0] ? x->address : "-",
                                              x->state,
                                              x->generation ? format_generation(gen, x->generation) : "-",
                                              self || x->rtt_us == 0 ? "-" : format_rtt(rtt, x->rtt_us),
                                              self ? "-" : format_bytes(b[0], x->sent_bytes),
                                              self ? "-" : format_bytes(b[1], x->received_bytes),
                                              x->last_error[0] ? x->last_error : "-",
                                      });
        }
        if (r == 0)
                r = table_print(&t);
        if (r != 0)
                return fail_oom();
        {
                _cleanup_free_ char *node = printable(ci->node);

                printf("node %s, generation %s: %s sent to peers, %s received, %s of storage reads saved\n",
                       node ? node : "?", format_generation(gen, ci->generation),
                       format_bytes(size[0], ci->peer_sent_bytes), format_bytes(size[1], ci->peer_received_bytes),
                       format_bytes(size[2], ci->storage_saved_bytes));
                _cleanup_free_ char *lane = printable(ci->gpu_lane ? ci->gpu_lane : "");

                printf("GPU lanes: %s; %s sent and %s received over them\n", lane ? lane : "?",
                       format_bytes(size[0], ci->lane_sent_bytes), format_bytes(size[1], ci->lane_received_bytes));
        }
        return EXIT_OK;
}

static int status_json(const wd_status *s) {
        json_t *roots = json_array();

        for (size_t i = 0; roots && i < s->n_model_roots; i++)
                if (json_array_append_new(roots, json_str(s->model_roots[i])) < 0) {
                        json_decref(roots);
                        roots = NULL;
                }
        if (!roots)
                return fail_oom();
        json_t *devs = json_array();

        for (size_t i = 0; devs && i < s->n_devices; i++) {
                const wd_device *d = &s->devices[i];

                if (json_array_append_new(devs, json_pack("{s:I, s:o, s:o, s:o, s:o, s:o, s:o, s:o}", "index",
                                                          (json_int_t) d->index, "uuid", json_str(d->uuid), "name",
                                                          json_str(d->name), "pci_bus_id", json_str(d->pci_bus_id),
                                                          "total_bytes", json_u64(d->total_bytes), "budget_bytes",
                                                          json_u64(d->budget_bytes), "used_bytes",
                                                          json_u64(d->used_bytes), "evictable_bytes",
                                                          json_u64(d->evictable_bytes))) < 0) {
                        json_decref(devs);
                        devs = NULL;
                }
        }
        if (!devs) {
                json_decref(roots);
                return fail_oom();
        }
        json_t *doc = json_pack("{s:o, s:I, s:o, s:o, s:o, s:o, s:o, s:I, s:I, s:I, s:I, s:o, s:o, s:o, s:b, s:o, s:o}",
                                "version", json_str(s->version), "pid", (json_int_t) s->pid, "uptime_ms",
                                json_u64(s->uptime_ms), "host_budget_bytes", json_u64(s->host_budget_bytes),
                                "host_used_bytes", json_u64(s->host_used_bytes), "host_evictable_bytes",
                                json_u64(s->host_evictable_bytes), "storage_read_bytes",
                                json_u64(s->storage_read_bytes), "leases", (json_int_t) s->leases, "connections",
                                (json_int_t) s->connections, "entries", (json_int_t) s->entries, "loading",
                                (json_int_t) s->loading, "evictions", json_u64(s->evictions), "model_roots",
                                roots, "socket", json_str(s->socket), "hugetlb", s->hugetlb, "gpu",
                                json_str(s->gpu ? s->gpu : ""), "devices", devs);
        if (doc && json_object_set_new(doc, "hugetlb_pool",
                                       json_pack("{s:o, s:o, s:o, s:o, s:o, s:o}", "state",
                                                 json_str(s->hugetlb_pool ? s->hugetlb_pool : ""),
                                                 "reserved_bytes", json_u64(s->hugetlb_reserved_bytes),
                                                 "touched_bytes", json_u64(s->hugetlb_touched_bytes),
                                                 "free_bytes", json_u64(s->hugetlb_free_bytes),
                                                 "shmem_fallback_slabs", json_u64(s->shmem_fallback_slabs),
                                                 "shmem_fallback_bytes", json_u64(s->shmem_fallback_bytes))) < 0) {
                json_decref(doc);
                doc = NULL;
        }
        /* Only where the daemon has a cluster. */
        if (doc && s->cluster &&
            json_object_set_new(doc, "cluster",
                                json_pack("{s:o, s:o, s:o, s:o}", "node", json_str(s->cluster->node), "nodes",
                                          cluster_nodes_json(s->cluster, false), "peer_sent_bytes",
                                          json_u64(s->cluster->peer_sent_bytes), "peer_received_bytes",
                                          json_u64(s->cluster->peer_received_bytes))) < 0) {
                json_decref(doc);
                doc = NULL;
        }
        return json_print(doc);
}

/* "ready: 11.8 GiB reserved, 11.8 GiB touched, 11.8 GiB free", or the state
 * alone where the daemon reserved nothing. */
static const char *hugetlb_pool_line(char *buf, size_t size, const wd_status *s) {
        char a[SIZE_MAX_LEN], b[SIZE_MAX_LEN], c[SIZE_MAX_LEN];
        const char *state = s->hugetlb_pool && s->hugetlb_pool[0] ? s->hugetlb_pool : "-";

        if (s->hugetlb_reserved_bytes == 0)
                snprintf(buf, size, "%s", state);
        else
                snprintf(buf, size, "%s: %s reserved, %s touched, %s free", state,
                         format_bytes(a, s->hugetlb_reserved_bytes), format_bytes(b, s->hugetlb_touched_bytes),
                         format_bytes(c, s->hugetlb_free_bytes));
        return buf;
}

/* Slabs that fell back to small pages: "none", or "3 slabs, 1.5 GiB". */
static const char *fallback_line(char *buf, size_t size, const wd_status *s) {
        char a[SIZE_MAX_LEN];

        if (s->shmem_fallback_slabs == 0)
                snprintf(buf, size, "none");
        else
                snprintf(buf, size, "%" PRIu64 " slab%s, %s (the hugetlb pool was short)", s->shmem_fallback_slabs,
                         s->shmem_fallback_slabs == 1 ? "" : "s", format_bytes(a, s->shmem_fallback_bytes));
        return buf;
}

static int run_status(wd_client *c, const Options *o) {
        char pool[192], fallback[128];
        _cleanup_(wd_status_freep) wd_status *s = NULL;
        char num[7][24], size[4][SIZE_MAX_LEN], uptime[DURATION_MAX_LEN];
        wd_error e = {};
        int r;

        r = wd_status_get(c, &s, &e);
        if (r != WD_OK)
                return fail_wd(r, &e);
        if (o->json)
                return status_json(s);

        snprintf(num[0], sizeof(num[0]), "%" PRIu32, s->pid);
        snprintf(num[1], sizeof(num[1]), "%" PRIu32, s->entries);
        snprintf(num[2], sizeof(num[2]), "%" PRIu32, s->loading);
        snprintf(num[3], sizeof(num[3]), "%" PRIu32, s->leases);
        snprintf(num[4], sizeof(num[4]), "%" PRIu32, s->connections);
        snprintf(num[5], sizeof(num[5]), "%" PRIu64, s->evictions);
        const char *const lines[][2] = {
                { "version", s->version },
                { "pid", num[0] },
                { "uptime", format_duration(uptime, s->uptime_ms) },
                { "socket", s->socket },
                { "host budget", format_bytes(size[0], s->host_budget_bytes) },
                { "host used", format_bytes(size[1], s->host_used_bytes) },
                { "host evictable", format_bytes(size[2], s->host_evictable_bytes) },
                { "hugetlb", s->hugetlb ? "yes" : "no" },
                { "hugetlb pool", hugetlb_pool_line(pool, sizeof(pool), s) },
                { "small pages", fallback_line(fallback, sizeof(fallback), s) },
                { "storage read", format_bytes(size[3], s->storage_read_bytes) },
                { "entries", num[1] },
                { "loading", num[2] },
                { "leases", num[3] },
                { "connections", num[4] },
                { "evictions", num[5] },
        };
        const int w = (int) strlen("host evictable");

        for (size_t i = 0; i < ELEMENTSOF(lines); i++) {
                _cleanup_free_ char *v = printable(lines[i][1]);

                printf("%s:%*s %s\n", lines[i][0], w - (int) strlen(lines[i][0]), "", v ? v : "?");
        }
        /* One root a line, the later ones under the first. */
        for (size_t i = 0; i < s->n_model_roots || i == 0; i++) {
                _cleanup_free_ char *v = printable(i < s->n_model_roots ? s->model_roots[i] : "-");

                if (i == 0)
                        printf("model roots:%*s %s\n", w - (int) strlen("model roots"), "", v ? v : "?");
                else
                        printf("%*s  %s\n", w, "", v ? v : "?");
        }
        /* The GPU tier: "ok" and a device a line, or why there is none. */
        {
                _cleanup_free_ char *v = printable(s->gpu ? s->gpu : "");

                printf("gpu:%*s %s\n", w - (int) strlen("gpu"), "", v ? v : "?");
        }
        for (size_t i = 0; i < s->n_devices; i++) {
                const wd_device *d = &s->devices[i];
                _cleanup_free_ char *name = printable(d->name), *uuid = printable(d->uuid);
                char dev[16];

                snprintf(dev, sizeof(dev), "cuda:%" PRIu32, d->index);
                printf("%s:%*s %s %s, %s of %s budget used (%s evictable), %s memory\n", dev,
                       w - (int) strlen(dev), "", uuid ? uuid : "?", name ? name : "?",
                       format_bytes(size[0], d->used_bytes), format_bytes(size[1], d->budget_bytes),
                       format_bytes(size[2], d->evictable_bytes), format_bytes(size[3], d->total_bytes));
        }
        /* The cluster in one line; weightctl cluster tells more. */
        if (s->cluster) {
                const wd_cluster_info *ci = s->cluster;
                _cleanup_free_ char *node = printable(ci->node);
                size_t up = 0;

                for (size_t i = 0; i < ci->n_nodes; i++)
                        if (strcmp(ci->nodes[i].state, "up") == 0 || strcmp(ci->nodes[i].state, "self") == 0)
                                up++;
                printf("cluster:%*s node %s, %zu of %zu nodes up, %s sent to peers, %s received\n",
                       w - (int) strlen("cluster"), "", node ? node : "?", up, ci->n_nodes,
                       format_bytes(size[0], ci->peer_sent_bytes), format_bytes(size[1], ci->peer_received_bytes));
        }
        return EXIT_OK;
}

/* "[32, 64]" into a malloc'd string; NULL when out of memory. */
static char *shape_string(const uint64_t *shape, unsigned ndim) {
        char *buf = NULL;
        size_t len;
        FILE *f = open_memstream(&buf, &len);

        if (!f)
                return NULL;
        fputc('[', f);
        for (unsigned d = 0; d < ndim; d++)
                fprintf(f, "%s%" PRIu64, d ? ", " : "", shape[d]);
        fputc(']', f);
        if (fclose(f) != 0) {
                free(buf);
                return NULL;
        }
        return buf;
}

static json_t *shape_json(const uint64_t *shape, unsigned ndim) {
        json_t *a = json_array();

        for (unsigned d = 0; a && d < ndim; d++)
                if (json_array_append_new(a, json_u64(shape[d])) < 0) {
                        json_decref(a);
                        a = NULL;
                }
        return a;
}

/* tensors with --shard: the rank's tensors, which only a sharded load
 * (it makes the shard resident) can tell. */
static int run_tensors_sharded(wd_client *c, const Options *o) {
        const char *component = o->n_components > 0 ? o->components[0] : NULL;
        _cleanup_(wd_releasep) wd_lease *lease = NULL;
        _cleanup_(table_done) Table t = { .n_columns = 6, .right = 1u << 3 | 1u << 5 };
        wd_load_options lo = load_options(o);
        const wd_manifest *m;
        wd_error e = {};
        size_t n;
        int r;

        r = wd_load_ex(c, o->model, component, &lo, &lease, &e);
        if (r != WD_OK)
                return fail_wd(r, &e);
        m = wd_lease_manifest(lease);
        n = wd_manifest_n_tensors(m);

        if (o->json) {
                json_t *a = json_array();

                for (size_t i = 0; a && i < n; i++) {
                        const wd_tensor *x = wd_manifest_tensor(m, i);
                        json_t *full = x->full_shape ? shape_json(x->full_shape, x->ndim) : json_null();

                        if (json_array_append_new(a, json_pack("{s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:I}", "name",
                                                               json_str(x->name), "dtype", json_str(x->dtype),
                                                               "shape", shape_json(x->shape, x->ndim), "nbytes",
                                                               json_u64(x->nbytes), "file",
                                                               json_str(wd_manifest_file(m, x->file)), "full_shape",
                                                               full, "shard_start", json_u64(x->shard_start),
                                                               "shard_dim", (json_int_t) x->shard_dim)) < 0) {
                                json_decref(a);
                                a = NULL;
                        }
                }
                return json_print(a);
        }

        r = table_add_row(&t, (const char *const[]) { "NAME", "DTYPE", "SHAPE", "SIZE", "FULL SHAPE", "DIM:START" });
        for (size_t i = 0; r == 0 && i < n; i++) {
                const wd_tensor *x = wd_manifest_tensor(m, i);
                _cleanup_free_ char *shape = shape_string(x->shape, x->ndim), *full = NULL;
                char size[SIZE_MAX_LEN], where[48] = "-";

                if (x->full_shape) {
                        full = shape_string(x->full_shape, x->ndim);
                        snprintf(where, sizeof(where), "%u:%" PRIu64, x->shard_dim, x->shard_start);
                }
                if (!shape || (x->full_shape && !full))
                        return fail_oom();
                r = table_add_row(&t, (const char *const[]) { x->name, x->dtype, shape, format_bytes(size, x->nbytes),
                                                              full ? full : "-", where });
        }
        if (r == 0)
                r = table_print(&t);
        return r == 0 ? EXIT_OK : fail_oom();
}

static int run_tensors(wd_client *c, const Options *o) {
        _cleanup_(wd_manifest_freep) wd_manifest *m = NULL;
        _cleanup_(table_done) Table t = { .n_columns = 4, .right = 1u << 3 };
        const char *component = o->n_components > 0 ? o->components[0] : NULL;
        size_t n;
        wd_error e = {};
        int r;

        if (o->world > 0)
                return run_tensors_sharded(c, o);
        r = wd_tensors(c, o->model, component, &m, &e);
        if (r != WD_OK)
                return fail_wd(r, &e);
        n = wd_manifest_n_tensors(m);

        if (o->json) {
                json_t *a = json_array();

                for (size_t i = 0; a && i < n; i++) {
                        const wd_tensor *x = wd_manifest_tensor(m, i);
                        json_t *shape = json_array();

                        for (unsigned d = 0; shape && d < x->ndim; d++)
                                if (json_array_append_new(shape, json_u64(x->shape[d])) < 0) {
                                        json_decref(shape);
                                        shape = NULL;
                                }
                        if (json_array_append_new(a, json_pack("{s:o, s:o, s:o, s:o, s:o, s:o}", "name",
                                                               json_str(x->name), "dtype", json_str(x->dtype),
                                                               "shape", shape, "nbytes", json_u64(x->nbytes), "file",
                                                               json_str(wd_manifest_file(m, x->file)), "offset",
                                                               json_u64(x->offset))) < 0) {
                                json_decref(a);
                                a = NULL;
                        }
                }
                return json_print(a);
        }

        r = table_add_row(&t, (const char *const[]) { "NAME", "DTYPE", "SHAPE", "SIZE" });
        for (size_t i = 0; r == 0 && i < n; i++) {
                const wd_tensor *x = wd_manifest_tensor(m, i);
                _cleanup_free_ char *shape = NULL;
                char size[SIZE_MAX_LEN];
                size_t len;
                FILE *f;

                f = open_memstream(&shape, &len);
                if (!f)
                        return fail_oom();
                fputc('[', f);
                for (unsigned d = 0; d < x->ndim; d++)
                        fprintf(f, "%s%" PRIu64, d ? ", " : "", x->shape[d]);
                fputc(']', f);
                if (fclose(f) != 0)
                        return fail_oom();
                r = table_add_row(&t,
                                  (const char *const[]) { x->name, x->dtype, shape, format_bytes(size, x->nbytes) });
        }
        if (r == 0)
                r = table_print(&t);
        return r == 0 ? EXIT_OK : fail_oom();
}

/* ---- components -------------------------------------------------------- */

static int run_components(wd_client *c, const Options *o) {
        _cleanup_(component_list_done) ComponentList l = {};
        _cleanup_(table_done) Table t = { .n_columns = 4 };
        wd_error e = {};
        int r;

        r = wd_components(c, o->model, &l.items, &l.n, &l.diffusers, &e);
        if (r != WD_OK)
                return fail_wd(r, &e);

        if (o->json) {
                json_t *a = json_array();

                for (size_t i = 0; a && i < l.n; i++) {
                        const wd_component *x = &l.items[i];

                        if (json_array_append_new(a, json_pack("{s:o, s:o, s:o, s:o}", "name", json_str(x->name),
                                                               "kind", json_str(x->kind), "library",
                                                               json_str(x->library), "class",
                                                               json_str(x->class_name))) < 0) {
                                json_decref(a);
                                a = NULL;
                        }
                }
                return json_print(a);
        }

        /* "-" stands for an empty field, as in ls. */
        r = table_add_row(&t, (const char *const[]) { "NAME", "KIND", "LIBRARY", "CLASS" });
        for (size_t i = 0; r == 0 && i < l.n; i++) {
                const wd_component *x = &l.items[i];

                r = table_add_row(&t, (const char *const[]) {
                                              x->name[0] ? x->name : "-",
                                              x->kind,
                                              x->library[0] ? x->library : "-",
                                              x->class_name[0] ? x->class_name : "-",
                                      });
        }
        if (r == 0)
                r = table_print(&t);
        return r == 0 ? EXIT_OK : fail_oom();
}

/* ---- cat --------------------------------------------------------------- */

/* Write all of buf to fd, across interruptions and partial writes.
 * Returns 0 or -errno. */
static int write_full(int fd, const void *buf, size_t n) {
        const char *p = buf;

        while (n > 0) {
                ssize_t k = write(fd, p, n);

                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                p += k;
                n -= (size_t) k;
        }
        return 0;
}

static int run_cat(wd_client *c, const Options *o) {
        const char *component = o->n_components > 0 ? o->components[0] : NULL;
        _cleanup_(wd_releasep) wd_lease *lease = NULL;
        const wd_tensor *t;
        wd_error e = {};
        int r;

        wd_load_options lo = load_options(o);
        /* A lease of that tensor only: its cost does not grow with the
         * component's (a daemon older than named leases lists them all,
         * and the tensor is found among them). */
        const char *names[] = { o->tensor };
        lo.names = names;
        lo.n_names = 1;
        r = wd_load_ex(c, o->model, component, &lo, &lease, &e);
        if (r != WD_OK)
                return fail_wd(r, &e);
        t = wd_manifest_find(wd_lease_manifest(lease), o->tensor);
        if (!t) {
                _cleanup_free_ char *name = printable(o->tensor);

                return fail(0, "%s: %s: no tensor \"%s\"", wd_code_name(WD_NOT_FOUND), o->model, name ? name : "?");
        }
        if (t->nbytes > 0 && !t->data)
                return fail(0, "%s: the lease maps no data for tensor \"%s\"", wd_code_name(WD_INTERNAL), o->tensor);
        if (t->nbytes > SIZE_MAX)
                return fail(EFBIG, "tensor \"%s\"", o->tensor);
        r = write_full(STDOUT_FILENO, t->data, (size_t) t->nbytes);
        if (r == -EPIPE)
                return EXIT_FAILED; /* the reader went away: nothing to say */
        if (r < 0)
                return fail(-r, "cannot write to stdout");
        return EXIT_OK;
}

/* ---- evict, pin, unpin ------------------------------------------------- */

static int run_change(wd_client *c, const Options *o, const char *done,
                      int (*call)(wd_client *, const char *, const char *, wd_error *)) {
        const char *component = o->n_components > 0 ? o->components[0] : NULL;
        wd_error e = {};
        int r;

        r = call(c, o->model, component, &e);
        if (r != WD_OK)
                return fail_wd(r, &e);
        if (!o->json)
                return EXIT_OK;
        return json_print(json_pack("{s:o, s:o, s:s}", "model", json_str(o->model), "component",
                                    json_str(component ? component : ""), "result", done));
}

static int run_evict(wd_client *c, const Options *o) {
        return run_change(c, o, "evicted", wd_evict);
}

static int run_pin(wd_client *c, const Options *o) {
        return run_change(c, o, "pinned", wd_pin);
}

static int run_unpin(wd_client *c, const Options *o) {
        return run_change(c, o, "unpinned", wd_unpin);
}

/* ---- main -------------------------------------------------------------- */

static const Command commands[] = {
        { "prefetch", CMD_MODEL | CMD_COMPONENT | CMD_COMPONENTS | CMD_JSON | CMD_SHARD | CMD_DEVICE | CMD_CLUSTER,
          run_prefetch },
        { "ls", CMD_JSON, run_ls },
        { "status", CMD_JSON, run_status },
        { "cluster", CMD_JSON, run_cluster },
        { "tensors", CMD_MODEL | CMD_COMPONENT | CMD_JSON | CMD_SHARD, run_tensors },
        { "components", CMD_MODEL | CMD_JSON, run_components },
        { "cat", CMD_MODEL | CMD_COMPONENT | CMD_TENSOR | CMD_SHARD, run_cat },
        { "evict", CMD_MODEL | CMD_COMPONENT | CMD_JSON, run_evict },
        { "pin", CMD_MODEL | CMD_COMPONENT | CMD_JSON, run_pin },
        { "unpin", CMD_MODEL | CMD_COMPONENT | CMD_JSON, run_unpin },
};

static void help(void) {
        char socket[256];

        if (wd_default_socket(socket, sizeof(socket)) != WD_OK)
                snprintf(socket, sizeof(socket), "(too long)");
        printf("Usage: weightctl [--socket PATH] COMMAND [ARGS]...\n"
               "\n"
               "Drive the weightd daemon of this node.\n"
               "\n"
               "Commands:\n"
               "  prefetch MODEL [--component NAME]...   make components resident in host memory\n"
               "           [--device cuda:N [--keep-host yes|no]]  or on a GPU (N as this process sees it)\n"
               "           [--cluster [--nodes A,B,...]]   or on the cluster's nodes (default: every node)\n"
               "           [--node-shard NODE=R/W]...      each node its own shard (with --rule PAT:DIM)\n"
               "           [--node-tensors NODE=PAT,...]... or its own tensors (a pipeline stage)\n"
               "  ls                                     list the daemon's entries\n"
               "  status                                 show the daemon's counters\n"
               "  cluster                                list the cluster's nodes as this daemon sees them\n"
               "  tensors MODEL [--component NAME]       list a component's tensors\n"
               "  components MODEL                       list a model's components\n"
               "  cat MODEL [--component NAME] --tensor NAME [--force]\n"
               "                                         write a tensor's bytes to stdout\n"
               "  evict MODEL [--component NAME]         drop a resident component now\n"
               "  pin MODEL [--component NAME]           keep a component from being evicted\n"
               "  unpin MODEL [--component NAME]         let it be evicted again\n"
               "\n"
               "prefetch, tensors and cat take a shard: --shard RANK/WORLD [--rule PATTERN:DIM]... [--uneven],\n"
               "and --tensors PATTERN,... (only those tensors, with or without a shard)\n"
               "(this rank's slices of the tensors a rule matches; tensors loads it to list them).\n"
               "ls shows the shard of each entry.  evict, pin and unpin act on every shard too.\n"
               "\n"
               "Options:\n"
               "  -s, --socket PATH     the daemon's socket (default here: %s)\n"
               "  -c, --component NAME  a component of a diffusers pipeline\n"
               "  -t, --tensor NAME     the tensor cat writes\n"
               "  -f, --force           let cat write binary to a terminal\n"
               "      --shard R/W       deliver rank R of a world of W (0 <= R < W)\n"
               "      --rule PAT:DIM    split tensors whose name matches the glob PAT along DIM (0 or 1)\n"
               "      --uneven          allow sizes W does not divide (the first ranks take one more)\n"
               "      --device DEV      cuda:N or cuda:GPU-<uuid>: load into that GPU's memory\n"
               "      --keep-host Y|N   after a device load, keep the host copy (yes) or drop it (no);\n"
               "                        default: the daemon's [gpu] keep_host\n"
               "      --cluster         prefetch into the host memory of the cluster's nodes, reading\n"
               "                        each byte from storage once across them; with --device cuda:N,\n"
               "                        each node's GPU N too (the daemons' index, as status lists it)\n"
               "      --nodes A,B,...   only these nodes (with --cluster)\n"
               "      --tensors PAT,... only the tensors whose name matches a glob (a pipeline stage)\n"
               "      --node-shard NODE=R/W  with --cluster: NODE serves rank R of W (--rule and --uneven\n"
               "                        apply); nodes of --nodes without one serve it whole.  Each node\n"
               "                        reads or receives only the bytes it serves\n"
               "      --node-tensors NODE=PAT,...  with --cluster: NODE serves those tensors only\n"
               "      --node-device NODE=cuda:N|host  with --cluster: NODE's device instead of --device's\n"
               "      --json            one JSON document on stdout instead of text\n"
               "  -h, --help            show this help\n"
               "  -V, --version         show the version\n"
               "\n"
               "MODEL is a checkpoint file or folder; a relative path is made absolute.\n"
               "Exit status: 0 success, 1 refused or failed, 2 usage error.\n",
               socket);
}

/* A whole decimal number in [0, max]: digits only, no sign, no spaces. */
static int parse_unsigned(const char *s, size_t len, unsigned max, unsigned *ret) {
        unsigned long long v = 0;

        if (len == 0 || len > 10)
                return -EINVAL;
        for (size_t i = 0; i < len; i++) {
                if (s[i] < '0' || s[i] > '9')
                        return -EINVAL;
                v = v * 10 + (unsigned) (s[i] - '0');
        }
        if (v > max)
                return -ERANGE;
        *ret = (unsigned) v;
        return 0;
}

/* --shard RANK/WORLD: world 1..65536 (the daemon's limit), rank below it. */
static int parse_shard(const char *arg, Options *o) {
        const char *slash = strchr(arg, '/');

        if (!slash || parse_unsigned(arg, (size_t) (slash - arg), UINT_MAX, &o->rank) < 0 ||
            parse_unsigned(slash + 1, strlen(slash + 1), 65536, &o->world) < 0 || o->world == 0)
                return usage_error("--shard takes RANK/WORLD with 1 <= WORLD <= 65536, not '%s'", arg);
        if (o->rank >= o->world)
                return usage_error("--shard %s: the rank must be below the world", arg);
        return 0;
}

/* A comma list of non-empty items, added to v; -EINVAL for an empty item. */
static int split_list(const char *arg, Strv *v) {
        _cleanup_free_ char *copy = strdup(arg);
        char *rest = copy, *item;

        if (!copy)
                return -ENOMEM;
        if (arg[0] == '\0' || arg[strlen(arg) - 1] == ',')
                return -EINVAL;
        while ((item = strsep(&rest, ","))) {
                char **items;

                if (item[0] == '\0')
                        return -EINVAL;
                items = reallocarray(v->items, v->n + 1, sizeof(char *));
                if (!items)
                        return -ENOMEM;
                v->items = items;
                if (!(v->items[v->n] = strdup(item)))
                        return -ENOMEM;
                v->n++;
        }
        return 0;
}

/* --nodes A,B,...: a comma list of non-empty names, added to o->nodes
 * (the daemon judges the names). */
static int parse_nodes(const char *arg, Options *o) {
        int r = split_list(arg, &o->nodes);

        if (r == -ENOMEM)
                return fail_oom();
        if (r < 0)
                return usage_error("--nodes takes a comma-separated list of node names, not '%s'", arg);
        return 0;
}

/* The part of node name, made (the whole component) if new; NULL when out
 * of memory.  The name stays in argv. */
static wd_cluster_part *find_part(Options *o, const char *name, Strv **ret_tensors) {
        wd_cluster_part *parts;
        Strv *tensors;

        for (size_t i = 0; i < o->n_parts; i++)
                if (strcmp(o->parts[i].node, name) == 0) {
                        *ret_tensors = &o->part_tensors[i];
                        return &o->parts[i];
                }
        parts = reallocarray(o->parts, o->n_parts + 1, sizeof(wd_cluster_part));
        if (parts)
                o->parts = parts;
        tensors = reallocarray(o->part_tensors, o->n_parts + 1, sizeof(Strv));
        if (tensors)
                o->part_tensors = tensors;
        if (!parts || !tensors)
                return NULL;
        o->parts[o->n_parts] = (wd_cluster_part){ .node = name };
        o->part_tensors[o->n_parts] = (Strv){};
        *ret_tensors = &o->part_tensors[o->n_parts];
        return &o->parts[o->n_parts++];
}

/* --node-shard NODE=RANK/WORLD, split at the last '='. */
static int parse_node_shard(char *arg, Options *o) {
        char *eq = strrchr(arg, '=');
        const char *slash = eq ? strchr(eq, '/') : NULL;
        unsigned rank, world;
        wd_cluster_part *part;
        Strv *tensors;

        if (!eq || eq == arg || !slash || parse_unsigned(eq + 1, (size_t) (slash - eq - 1), UINT_MAX, &rank) < 0 ||
            parse_unsigned(slash + 1, strlen(slash + 1), 65536, &world) < 0 || world == 0)
                return usage_error("--node-shard takes NODE=RANK/WORLD with 1 <= WORLD <= 65536, not '%s'", arg);
        if (rank >= world)
                return usage_error("--node-shard %s: the rank must be below the world", arg);
        *eq = '\0';
        part = find_part(o, arg, &tensors);
        if (!part)
                return fail_oom();
        if (part->world != 0)
                return usage_error("--node-shard: node '%s' named twice", arg);
        part->rank = rank;
        part->world = world;
        return 0;
}

/* --node-device NODE=cuda:N|host, split at the last '='. */
static int parse_node_device(char *arg, Options *o) {
        char *eq = strrchr(arg, '=');
        wd_cluster_part *part;
        Strv *tensors;

        if (!eq || eq == arg || (strcmp(eq + 1, "host") != 0 && strncmp(eq + 1, "cuda:", 5) != 0))
                return usage_error("--node-device takes NODE=cuda:N or NODE=host, not '%s'", arg);
        *eq = '\0';
        part = find_part(o, arg, &tensors);
        if (!part)
                return fail_oom();
        if (part->device)
                return usage_error("--node-device: node '%s' named twice", arg);
        part->device = eq + 1;
        return 0;
}

/* --node-tensors NODE=PATTERN,..., split at the first '='. */
static int parse_node_tensors(char *arg, Options *o) {
        char *eq = strchr(arg, '=');
        wd_cluster_part *part;
        Strv *tensors;
        int r;

        if (!eq || eq == arg)
                return usage_error("--node-tensors takes NODE=PATTERN[,PATTERN]..., not '%s'", arg);
        *eq = '\0';
        part = find_part(o, arg, &tensors);
        if (!part)
                return fail_oom();
        if (tensors->n > 0)
                return usage_error("--node-tensors: node '%s' named twice", arg);
        r = split_list(eq + 1, tensors);
        if (r == -ENOMEM)
                return fail_oom();
        if (r < 0)
                return usage_error("--node-tensors %s: a comma-separated list of tensor name patterns is required", arg);
        return 0;
}

/* --rule PATTERN:DIM, split at the last ':'.  The pattern stays in argv. */
static int parse_rule(char *arg, Options *o) {
        char *colon = strrchr(arg, ':');
        unsigned dim;

        if (!colon || colon == arg || parse_unsigned(colon + 1, strlen(colon + 1), 1, &dim) < 0)
                return usage_error("--rule takes PATTERN:DIM with DIM 0 or 1, not '%s'", arg);
        *colon = '\0';
        o->rules[o->n_rules++] = (wd_shard_rule){ .pattern = arg, .dim = dim };
        return 0;
}

static int parse_argv(int argc, char *argv[], Options *o, const Command **ret) {
        enum {
                ARG_JSON = 0x100,
                ARG_SHARD,
                ARG_RULE,
                ARG_UNEVEN,
                ARG_DEVICE,
                ARG_KEEP_HOST,
                ARG_CLUSTER,
                ARG_NODES,
                ARG_NODE_SHARD,
                ARG_NODE_TENSORS,
                ARG_NODE_DEVICE,
                ARG_TENSORS,
        };
        static const struct option options[] = {
                { "socket", required_argument, NULL, 's' },
                { "component", required_argument, NULL, 'c' },
                { "tensor", required_argument, NULL, 't' },
                { "force", no_argument, NULL, 'f' },
                { "json", no_argument, NULL, ARG_JSON },
                { "shard", required_argument, NULL, ARG_SHARD },
                { "rule", required_argument, NULL, ARG_RULE },
                { "uneven", no_argument, NULL, ARG_UNEVEN },
                { "device", required_argument, NULL, ARG_DEVICE },
                { "keep-host", required_argument, NULL, ARG_KEEP_HOST },
                { "cluster", no_argument, NULL, ARG_CLUSTER },
                { "nodes", required_argument, NULL, ARG_NODES },
                { "node-shard", required_argument, NULL, ARG_NODE_SHARD },
                { "node-tensors", required_argument, NULL, ARG_NODE_TENSORS },
                { "node-device", required_argument, NULL, ARG_NODE_DEVICE },
                { "tensors", required_argument, NULL, ARG_TENSORS },
                { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, 'V' },
                {},
        };
        const Command *cmd = NULL;
        const char *pos[2];
        size_t n_pos = 0;
        int opt, r;

        o->components = calloc((size_t) argc, sizeof(char *));
        o->rules = calloc((size_t) argc, sizeof(wd_shard_rule));
        if (!o->components || !o->rules)
                return fail_oom();

        /* '-': arguments come back in order as 1, whatever POSIXLY_CORRECT
         * says, so options may follow the command. */
        opterr = 0;
        while ((opt = getopt_long(argc, argv, "-:s:c:t:fhV", options, NULL)) >= 0)
                switch (opt) {
                case 1:
                        if (n_pos == ELEMENTSOF(pos))
                                return usage_error("unexpected argument '%s'", optarg);
                        pos[n_pos++] = optarg;
                        break;
                case 's':
                        if (optarg[0] == '\0')
                                return usage_error("--socket needs a path");
                        o->socket = optarg;
                        break;
                case 'c':
                        o->components[o->n_components++] = optarg;
                        break;
                case 't':
                        o->tensor = optarg;
                        break;
                case 'f':
                        o->force = true;
                        break;
                case ARG_JSON:
                        o->json = true;
                        break;
                case ARG_SHARD:
                        if (parse_shard(optarg, o) != 0)
                                return EXIT_USAGE;
                        break;
                case ARG_RULE:
                        if (parse_rule(optarg, o) != 0)
                                return EXIT_USAGE;
                        break;
                case ARG_UNEVEN:
                        o->uneven = true;
                        break;
                case ARG_DEVICE:
                        if (strcmp(optarg, "host") != 0 && strncmp(optarg, "cuda:", 5) != 0)
                                return usage_error("--device takes cuda:N, cuda:GPU-<uuid> or host, not '%s'", optarg);
                        o->device = optarg;
                        break;
                case ARG_KEEP_HOST:
                        if (strcmp(optarg, "yes") == 0)
                                o->keep_host = WD_KEEP_HOST_YES;
                        else if (strcmp(optarg, "no") == 0)
                                o->keep_host = WD_KEEP_HOST_NO;
                        else
                                return usage_error("--keep-host takes yes or no, not '%s'", optarg);
                        break;
                case ARG_CLUSTER:
                        o->cluster = true;
                        break;
                case ARG_NODES:
                        r = parse_nodes(optarg, o);
                        if (r != 0)
                                return r;
                        break;
                case ARG_NODE_SHARD:
                        r = parse_node_shard(optarg, o);
                        if (r != 0)
                                return r;
                        break;
                case ARG_NODE_TENSORS:
                        r = parse_node_tensors(optarg, o);
                        if (r != 0)
                                return r;
                        break;
                case ARG_NODE_DEVICE:
                        r = parse_node_device(optarg, o);
                        if (r != 0)
                                return r;
                        break;
                case ARG_TENSORS:
                        r = split_list(optarg, &o->tensors);
                        if (r == -ENOMEM)
                                return fail_oom();
                        if (r < 0)
                                return usage_error("--tensors takes a comma-separated list of tensor name patterns, "
                                                   "not '%s'", optarg);
                        break;
                case 'h':
                        help();
                        return -1;
                case 'V':
                        printf("weightctl %s (libweightd-client %s)\n", WEIGHTD_VERSION, wd_version());
                        return -1;
                case ':':
                        return usage_error("option '%s' needs an argument", argv[optind - 1]);
                default:
                        if (optopt)
                                return usage_error("unknown option '-%c'", optopt);
                        return usage_error("unknown option '%s'", argv[optind - 1]);
                }

        for (int i = optind; i < argc; i++) { /* after "--" */
                if (n_pos == ELEMENTSOF(pos))
                        return usage_error("unexpected argument '%s'", argv[i]);
                pos[n_pos++] = argv[i];
        }
        if (n_pos == 0)
                return usage_error("no command given");
        o->command = pos[0];
        for (size_t i = 0; i < ELEMENTSOF(commands); i++)
                if (strcmp(commands[i].name, o->command) == 0)
                        cmd = &commands[i];
        if (!cmd)
                return usage_error("unknown command '%s'", o->command);

        if (cmd->flags & CMD_MODEL) {
                if (n_pos < 2)
                        return usage_error("%s needs a MODEL", cmd->name);
                if (pos[1][0] == '\0')
                        return usage_error("MODEL must not be empty");
                o->model_arg = pos[1];
        } else if (n_pos > 1)
                return usage_error("%s takes no MODEL, but got '%s'", cmd->name, pos[1]);
        if (o->n_components > 0 && !(cmd->flags & CMD_COMPONENT))
                return usage_error("%s takes no --component", cmd->name);
        if (o->n_components > 1 && !(cmd->flags & CMD_COMPONENTS))
                return usage_error("%s takes one --component", cmd->name);
        if (o->json && !(cmd->flags & CMD_JSON))
                return usage_error("%s has no --json output", cmd->name);
        if ((o->tensor || o->force) && !(cmd->flags & CMD_TENSOR))
                return usage_error("%s takes no --%s", cmd->name, o->tensor ? "tensor" : "force");
        if ((cmd->flags & CMD_TENSOR) && !o->tensor)
                return usage_error("%s needs --tensor NAME", cmd->name);
        if ((o->world > 0 || o->n_rules > 0 || o->uneven || o->tensors.n > 0) && !(cmd->flags & CMD_SHARD))
                return usage_error("%s takes no --shard, --rule, --uneven or --tensors", cmd->name);
        if ((o->n_rules > 0 || o->uneven) && o->world == 0 && o->n_parts == 0)
                return usage_error("--rule and --uneven need --shard RANK/WORLD or --node-shard");
        if ((o->device || o->keep_host) && !(cmd->flags & CMD_DEVICE))
                return usage_error("%s takes no --device or --keep-host", cmd->name);
        if (o->keep_host && !o->device)
                return usage_error("--keep-host needs --device");
        if ((o->cluster || o->nodes.n > 0) && !(cmd->flags & CMD_CLUSTER))
                return usage_error("%s takes no --cluster or --nodes", cmd->name);
        if ((o->nodes.n > 0 || o->n_parts > 0) && !o->cluster)
                return usage_error("--%s needs --cluster",
                                   o->nodes.n > 0 ? "nodes" : "node-shard, --node-tensors or --node-device");
        if (o->cluster && o->keep_host)
                return usage_error("--cluster keeps the host copy: it takes no --keep-host");
        if (o->cluster && o->world > 0)
                return usage_error("--cluster takes no --shard: name each node's with --node-shard NODE=RANK/WORLD");
        if (o->cluster && o->tensors.n > 0)
                return usage_error("--cluster takes no --tensors: name each node's with --node-tensors NODE=PATTERN,...");
        if (o->cluster && (o->n_rules > 0 || o->uneven) && o->n_parts == 0)
                return usage_error("--cluster takes --rule and --uneven only with --node-shard");
        *ret = cmd;
        return 0;
}

/* Say how writing stdout ended, if it failed: quietly for a closed pipe. */
static int finish_stdout(int r) {
        if (fflush(stdout) == 0 && !ferror(stdout))
                return r;
        if (errno == EPIPE)
                return EXIT_FAILED;
        return fail(errno, "cannot write to stdout");
}

int main(int argc, char *argv[]) {
        _cleanup_(wd_disconnectp) wd_client *c = NULL;
        _cleanup_(options_done) Options o = {};
        const Command *cmd = NULL;
        wd_error e = {};
        const char *socket;
        int r;

        /* A reader that goes away shows up as EPIPE from write(). */
        signal(SIGPIPE, SIG_IGN);

        r = parse_argv(argc, argv, &o, &cmd);
        if (r != 0)
                return r < 0 ? finish_stdout(EXIT_OK) : r;
        if ((cmd->flags & CMD_TENSOR) && !o.force && isatty(STDOUT_FILENO)) {
                fputs("weightctl: refusing to write binary tensor data to a terminal; redirect stdout or use --force\n",
                      stderr);
                return EXIT_USAGE;
        }
        if (o.model_arg) {
                r = model_path_absolute(o.model_arg, &o.model);
                if (r < 0)
                        return fail(-r, "cannot make '%s' an absolute path", o.model_arg);
        }

        socket = o.socket;
        if (!socket) {
                socket = getenv("WEIGHTD_SOCKET");
                if (socket && !*socket)
                        socket = NULL;
        }
        r = wd_connect(socket, &c, &e);
        if (r != WD_OK)
                r = fail_wd(r, &e);
        else
                r = cmd->run(c, &o);
        return finish_stdout(r);
}
