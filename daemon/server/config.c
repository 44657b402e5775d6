/* The daemon configuration: defaults, then the main file, then its drop-ins.
 *
 * libinih splits lines into sections and key = value pairs and strips
 * comments (';' and '#' at the start of a line, " ;" after a value).  It is
 * fed through ini_parse_stream() by our own line reader, which is what makes
 * the result strict: the reader counts lines (the handler has no line
 * number in Debian's build), refuses a line longer than libinih's buffer
 * instead of letting it be split into two, refuses NUL bytes, and checks
 * every [section] header as it passes, so an unknown section is an error
 * even when it holds no keys.  Indented lines after a key are libinih's
 * continuation lines: the handler accepts them for the list keys only.
 *
 * Values are written into the Config as they are parsed; the caller loads
 * into a fresh Config and frees it on any error, so nothing partial leaks
 * out.  What spans files is kept in a LoadState: whether any [cluster] key
 * was set and where secret_file was set last.  Once every file is read,
 * config_finish() checks the [cluster] rules that span keys and reads the
 * secret file (O_NOFOLLOW, owner and mode checked on the open fd, the bytes
 * wiped from every buffer they passed through). */
#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <ini.h>
#include <pwd.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysinfo.h>
#include <sys/un.h>
#include <syslog.h>

#include "path-util.h"
#include "server/config.h"
#include "util/fs-util.h"
#include "util/parse-util.h"

#define SOCKET_PATH_MAX (sizeof(((struct sockaddr_un *) NULL)->sun_path) - 1)
#define ID_MAX (UINT32_MAX - 1) /* (uid_t) -1 and (gid_t) -1 mean "none" */
#define REASON_MAX 512
#define VALUE_SHOWN_MAX 128     /* bytes of a value quoted in a message */
#define DUMP_WIDTH 100          /* wrap lists in config_dump() after this many bytes */

static const char *const known_sections[] = { "daemon", "memory", "io", "gpu", "cluster", "metrics" };

static const char *const log_level_names[] = {
        [LOG_ERR - LOG_ERR] = "err",
        [LOG_WARNING - LOG_ERR] = "warning",
        [LOG_NOTICE - LOG_ERR] = "notice",
        [LOG_INFO - LOG_ERR] = "info",
        [LOG_DEBUG - LOG_ERR] = "debug",
};

typedef enum KeyType {
        KEY_UNSIGNED,  /* decimal in [min, max] */
        KEY_SIZE,      /* parse_size() in [min, max], a multiple of align */
        KEY_SOCKET,
        KEY_ROOTS,     /* list */
        KEY_UIDS,      /* list */
        KEY_GIDS,      /* list */
        KEY_LOG_LEVEL,
        KEY_BUDGET,
        KEY_PAGES,
        KEY_RESERVE,
        KEY_DIRECT,
        KEY_GPU_BUDGET,
        KEY_DEVICE_BUDGETS, /* list */
        KEY_BOOL,
        KEY_DEVICES,        /* list */
        KEY_DURATION,       /* parse_timespan() in [min, max] µs */
        KEY_NODE,
        KEY_NODES,          /* list */
        KEY_SECRET_FILE,
        KEY_LISTEN,
        KEY_GPU_TRANSPORT,
} KeyType;

typedef struct KeyDef {
        const char *section;
        const char *name;
        KeyType type;
        size_t offset; /* of the field, for KEY_UNSIGNED, KEY_SIZE, KEY_BOOL and KEY_DURATION */
        uint64_t min, max, align;
} KeyDef;

static const KeyDef key_defs[] = {
        { "daemon", "socket", KEY_SOCKET },
        { "daemon", "model_roots", KEY_ROOTS },
        { "daemon", "allow_uids", KEY_UIDS },
        { "daemon", "allow_gids", KEY_GIDS },
        { "daemon", "max_connections", KEY_UNSIGNED, offsetof(Config, max_connections), 1, 65536 },
        { "daemon", "max_connections_per_uid", KEY_UNSIGNED, offsetof(Config, max_connections_per_uid), 1, 65536 },
        { "daemon", "max_pending_requests", KEY_UNSIGNED, offsetof(Config, max_pending_requests), 1, 4096 },
        { "daemon", "max_frame_size", KEY_SIZE, offsetof(Config, max_frame_size), 4ull << 10, 256ull << 20, 1 },
        { "daemon", "max_request_size", KEY_SIZE, offsetof(Config, max_request_size), 1ull << 10, 16ull << 20, 1 },
        { "daemon", "hello_timeout", KEY_UNSIGNED, offsetof(Config, hello_timeout), 1, 3600 },
        { "daemon", "frame_timeout", KEY_UNSIGNED, offsetof(Config, frame_timeout), 1, 3600 },
        { "daemon", "log_level", KEY_LOG_LEVEL },
        { "memory", "host_budget", KEY_BUDGET },
        { "memory", "host_pages", KEY_PAGES },
        { "memory", "hugetlb_reserve", KEY_RESERVE },
        { "memory", "ready_after_touch", KEY_BOOL, offsetof(Config, ready_after_touch) },
        { "io", "queue_depth", KEY_UNSIGNED, offsetof(Config, queue_depth), 1, 4096 },
        { "io", "chunk_size", KEY_SIZE, offsetof(Config, chunk_size), 64ull << 10, 1ull << 30, 4096 },
        { "io", "direct_io", KEY_DIRECT },
        { "gpu", "budget", KEY_GPU_BUDGET },
        { "gpu", "device_budgets", KEY_DEVICE_BUDGETS },
        { "gpu", "keep_host", KEY_BOOL, offsetof(Config, keep_host) },
        { "gpu", "devices", KEY_DEVICES },
        { "cluster", "node", KEY_NODE },
        { "cluster", "nodes", KEY_NODES },
        { "cluster", "secret_file", KEY_SECRET_FILE },
        { "cluster", "deadline", KEY_DURATION, offsetof(Config, cluster_deadline_usec),
          CONFIG_CLUSTER_DEADLINE_MIN_USEC, CONFIG_CLUSTER_DEADLINE_MAX_USEC },
        { "cluster", "peer_fetch", KEY_BOOL, offsetof(Config, cluster_peer_fetch) },
        { "cluster", "gpu_transport", KEY_GPU_TRANSPORT },
        { "metrics", "listen", KEY_LISTEN },
};

/* [cluster] gpu_transport, in LanesTransport's order. */
static const char *const gpu_transport_names[] = { "auto", "nccl", "host" };

static bool key_is_list(const KeyDef *k) {
        return k->type == KEY_ROOTS || k->type == KEY_UIDS || k->type == KEY_GIDS || k->type == KEY_DEVICE_BUDGETS ||
               k->type == KEY_DEVICES || k->type == KEY_NODES;
}

/* What a load carries from one file to the next. */
typedef struct LoadState {
        bool cluster_set;   /* some file set a [cluster] key */
        char *secret_where; /* "FILE:LINE" of the secret_file that counts, for messages */
} LoadState;

static void load_state_deinit(LoadState *s) {
        free(s->secret_where);
        s->secret_where = NULL;
}

/* One file (or buffer) being parsed into a Config. */
typedef struct Parser {
        Config *config;
        LoadState *load;
        const char *display;
        const char *text;
        size_t len;
        size_t pos;
        unsigned line;      /* of the line last handed to libinih */
        bool indented;      /* that line starts with a blank */
        bool have_key;      /* libinih's "prev_name": a key line since the last section header */
        unsigned roots_line; /* last line that set model_roots, 0 if none in this file */
        uint64_t mem_total;
        bool failed;
        unsigned error_line;
        int error;
        WdError *err;
} Parser;

const char *config_log_level_to_string(int level) {
        if (level < LOG_ERR || level > LOG_DEBUG)
                return NULL;
        return log_level_names[level - LOG_ERR];
}

int config_log_level_from_string(const char *s) {
        int i = string_table_lookup(log_level_names, ELEMENTSOF(log_level_names), s);

        return i < 0 ? i : LOG_ERR + i;
}

static bool str_in(const char *s, const char *const *table, size_t n) {
        return string_table_lookup(table, n, s) >= 0;
}

/* "10s" for 10 s: the largest unit that divides usec exactly, which
 * parse_timespan() reads back. */
static const char *format_duration(uint64_t usec, char buf[static 32]) {
        static const struct {
                const char *unit;
                uint64_t usec;
        } units[] = { { "h", 3600000000ull }, { "m", 60000000 }, { "s", 1000000 }, { "ms", 1000 } };

        for (size_t i = 0; i < ELEMENTSOF(units); i++)
                if (usec && usec % units[i].usec == 0) {
                        snprintf(buf, 32, "%llu%s", (unsigned long long) (usec / units[i].usec), units[i].unit);
                        return buf;
                }
        snprintf(buf, 32, "%lluus", (unsigned long long) usec);
        return buf;
}

/* "16M" for 16 MiB: the largest suffix that divides v exactly. */
static const char *format_size(uint64_t v, char buf[static 32]) {
        static const char suffixes[] = "TGMK";

        for (size_t i = 0; i < 4; i++) {
                unsigned shift = 10 * (unsigned) (4 - i);

                if (v && v % (1ull << shift) == 0) {
                        snprintf(buf, 32, "%llu%c", (unsigned long long) (v >> shift), suffixes[i]);
                        return buf;
                }
        }
        snprintf(buf, 32, "%llu", (unsigned long long) v);
        return buf;
}

static int mem_total(uint64_t *ret) {
        struct sysinfo si;
        uint64_t t;

        if (sysinfo(&si) < 0)
                return negative_errno();
        if (mul_overflow_u64(si.totalram, si.mem_unit ? si.mem_unit : 1, &t))
                t = UINT64_MAX;
        *ret = t;
        return 0;
}

static int default_socket(char **ret) {
        uid_t uid = geteuid();
        const char *xdg;
        char *p = NULL;

        if (uid == 0)
                p = strdup("/run/weightd/weightd.sock");
        else {
                xdg = secure_getenv("XDG_RUNTIME_DIR");
                if (xdg && xdg[0] == '/') {
                        size_t n = strlen(xdg);

                        while (n > 1 && xdg[n - 1] == '/')
                                n--;
                        if (asprintf(&p, "%.*s/weightd/weightd.sock", (int) n, xdg) < 0)
                                return -ENOMEM;
                        if (strlen(p) > SOCKET_PATH_MAX) {
                                free(p);
                                p = NULL;
                        }
                }
                if (!p && asprintf(&p, "/tmp/weightd-%u/weightd.sock", (unsigned) uid) < 0)
                        return -ENOMEM;
        }
        if (!p)
                return -ENOMEM;
        *ret = p;
        return 0;
}

static void strv_free(char **l, size_t n) {
        for (size_t i = 0; i < n; i++)
                free(l[i]);
        free(l);
}

static void device_budgets_clear(Config *c) {
        for (size_t i = 0; i < c->n_device_budgets; i++)
                free(c->device_budgets[i].spec);
        free(c->device_budgets);
        c->device_budgets = NULL;
        c->n_device_budgets = 0;
}

static void cluster_nodes_clear(Config *c) {
        for (size_t i = 0; i < c->n_cluster_nodes; i++) {
                free(c->cluster_nodes[i].name);
                free(c->cluster_nodes[i].host);
        }
        free(c->cluster_nodes);
        c->cluster_nodes = NULL;
        c->n_cluster_nodes = 0;
}

static void cluster_secret_clear(Config *c) {
        if (c->cluster_secret) {
                explicit_bzero(c->cluster_secret, c->cluster_secret_len);
                free(c->cluster_secret);
        }
        c->cluster_secret = NULL;
        c->cluster_secret_len = 0;
}

Config *config_free(Config *c) {
        if (!c)
                return NULL;
        free(c->path);
        free(c->socket);
        strv_free(c->model_roots, c->n_model_roots);
        free(c->allow_uids);
        free(c->allow_gids);
        free(c->host_budget_spec);
        free(c->gpu_budget_spec);
        device_budgets_clear(c);
        free(c->gpu_devices);
        free(c->cluster_node);
        cluster_nodes_clear(c);
        free(c->cluster_secret_file);
        cluster_secret_clear(c);
        free(c->metrics_listen);
        free(c->metrics_host);
        free(c);
        return NULL;
}

static uint64_t budget_percent(uint64_t total, uint64_t pct) {
        return (uint64_t) ((unsigned __int128) total * pct / 100);
}

int config_new_default(Config **ret, WdError *err) {
        _cleanup_(config_freep) Config *c = NULL;
        uint64_t total;
        int r;

        c = calloc(1, sizeof(Config));
        if (!c)
                return wd_error_set(err, -ENOMEM, "configuration: out of memory");
        *c = (Config){
                .max_connections = CONFIG_MAX_CONNECTIONS_DEFAULT,
                .max_connections_per_uid = CONFIG_MAX_CONNECTIONS_PER_UID_DEFAULT,
                .max_pending_requests = CONFIG_MAX_PENDING_REQUESTS_DEFAULT,
                .max_frame_size = CONFIG_MAX_FRAME_SIZE_DEFAULT,
                .max_request_size = CONFIG_MAX_REQUEST_SIZE_DEFAULT,
                .hello_timeout = CONFIG_HELLO_TIMEOUT_DEFAULT,
                .frame_timeout = CONFIG_FRAME_TIMEOUT_DEFAULT,
                .log_level = LOG_INFO,
                .host_pages = SLAB_PAGES_AUTO,
                .hugetlb_reserve = CONFIG_HUGETLB_RESERVE_AUTO,
                .ready_after_touch = true,
                .queue_depth = CONFIG_QUEUE_DEPTH_DEFAULT,
                .chunk_size = CONFIG_CHUNK_SIZE_DEFAULT,
                .direct_io = DIRECT_AUTO,
                .cluster_deadline_usec = CONFIG_CLUSTER_DEADLINE_DEFAULT_USEC,
                .cluster_peer_fetch = true,
        };
        r = default_socket(&c->socket);
        if (r < 0)
                return wd_error_set(err, r, "configuration: out of memory");
        c->model_roots = calloc(1, sizeof(char *));
        if (c->model_roots)
                c->model_roots[0] = strdup(CONFIG_MODEL_ROOT_DEFAULT);
        if (!c->model_roots || !c->model_roots[0])
                return wd_error_set(err, -ENOMEM, "configuration: out of memory");
        c->n_model_roots = 1;
        c->host_budget_spec = strdup(CONFIG_HOST_BUDGET_DEFAULT);
        if (!c->host_budget_spec)
                return wd_error_set(err, -ENOMEM, "configuration: out of memory");
        r = mem_total(&total);
        if (r < 0)
                return wd_error_set(err, r, "configuration: cannot read the memory size: %s", strerror(-r));
        c->host_budget = budget_percent(total, 50);
        c->gpu_budget_spec = strdup(CONFIG_GPU_BUDGET_DEFAULT);
        if (!c->gpu_budget_spec)
                return wd_error_set(err, -ENOMEM, "configuration: out of memory");
        c->gpu_budget = (ConfigBudget){ .percent = true, .value = 90 };
        c->keep_host = true;
        c->metrics_listen = strdup(CONFIG_METRICS_LISTEN_DEFAULT);
        c->metrics_host = strdup("127.0.0.1");
        if (!c->metrics_listen || !c->metrics_host)
                return wd_error_set(err, -ENOMEM, "configuration: out of memory");
        c->metrics_port = 9471;
        *ret = TAKE_PTR(c);
        return 0;
}

/* Record the first error of a parse as "DISPLAY:LINE: message". */
_printf_(4, 5) static int parser_fail(Parser *p, unsigned line, int code, const char *fmt, ...) {
        char msg[WD_ERROR_MESSAGE_MAX];
        va_list ap;

        if (p->failed)
                return p->error;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        p->failed = true;
        p->error_line = line;
        p->error = code;
        wd_error_set(p->err, code, "%s:%u: %s", p->display, line, msg);
        return code;
}

/* A [section] header line: check the name; libinih ignores what follows
 * the ']', we allow only a comment there. */
static void parser_section(Parser *p, const char *start) {
        const char *end = strchr(start + 1, ']'), *rest;
        char name[64], shown[160];

        if (!end) {
                parser_fail(p, p->line, WD_E_INVALID, "syntax error: \"[\" without \"]\"");
                return;
        }
        snprintf(name, sizeof(name), "%.*s", (int) MIN((size_t) (end - start - 1), sizeof(name) - 1), start + 1);
        wd_escape(shown, sizeof(shown), name, VALUE_SHOWN_MAX);
        if ((size_t) (end - start - 1) >= sizeof(name) || !str_in(name, known_sections, ELEMENTSOF(known_sections))) {
                parser_fail(p, p->line, WD_E_INVALID, "[%s]: unknown section", shown);
                return;
        }
        for (rest = end + 1; isspace((unsigned char) *rest); rest++)
                ;
        if (*rest && *rest != ';' && *rest != '#') {
                parser_fail(p, p->line, WD_E_INVALID, "[%s]: text after the section header", shown);
                return;
        }
        p->have_key = false;
}

/* libinih's fgets(): one line per call, never a part of one. */
static char *parser_read_line(char *str, int num, void *userdata) {
        Parser *p = userdata;
        const char *s, *nl, *start;
        size_t n, content;

        if (p->failed || p->pos >= p->len)
                return NULL;
        s = p->text + p->pos;
        nl = memchr(s, '\n', p->len - p->pos);
        n = nl ? (size_t) (nl - s) + 1 : p->len - p->pos;
        content = nl ? n - 1 : n;
        p->line++;
        if (memchr(s, '\0', n)) {
                parser_fail(p, p->line, WD_E_INVALID, "NUL byte in the line");
                return NULL;
        }
        if (num < 3 || content > (size_t) num - 2) {
                parser_fail(p, p->line, WD_E_INVALID, "line longer than %d bytes", MAX(num - 2, 0));
                return NULL;
        }
        memcpy(str, s, n);
        str[n] = '\0';
        p->pos += n;
        p->indented = isspace((unsigned char) str[0]);

        /* Mirror libinih's view of the line: a UTF-8 BOM is skipped on the
         * first line, and an indented line after a key continues its value
         * even when it starts with '['. */
        start = str;
        if (p->line == 1 && n >= 3 && memcmp(start, "\xEF\xBB\xBF", 3) == 0)
                start += 3;
        while (isspace((unsigned char) *start))
                start++;
        if (*start == '[' && !(p->have_key && start > str))
                parser_section(p, start);
        return p->failed ? NULL : str;
}

/* Split value at sep into items with blanks trimmed; calls fn on each.  An
 * empty item is an error. */
typedef int (*item_fn)(Parser *p, const KeyDef *k, const char *item, char *reason);

static int for_each_item(Parser *p, const KeyDef *k, const char *value, char sep, item_fn fn, char *reason) {
        _cleanup_free_ char *copy = strdup(value);
        char *item, *next, *end;
        char shown[VALUE_SHOWN_MAX + 32];
        int r;

        if (!copy)
                return -ENOMEM;
        for (item = copy; item; item = next) {
                next = strchr(item, sep);
                if (next)
                        *next++ = '\0';
                while (isspace((unsigned char) *item))
                        item++;
                end = item + strlen(item);
                while (end > item && isspace((unsigned char) end[-1]))
                        *--end = '\0';
                if (!*item) {
                        wd_escape(shown, sizeof(shown), value, VALUE_SHOWN_MAX);
                        snprintf(reason, REASON_MAX, "empty item in \"%s\"", shown);
                        return WD_E_INVALID;
                }
                r = fn(p, k, item, reason);
                if (r != 0)
                        return r;
        }
        return 0;
}

static int root_add(Parser *p, const KeyDef *k, const char *item, char *reason) {
        Config *c = p->config;
        char shown[VALUE_SHOWN_MAX + 32], *norm, **l;
        size_t o;
        int r;

        wd_escape(shown, sizeof(shown), item, VALUE_SHOWN_MAX);
        if (item[0] != '/') {
                snprintf(reason, REASON_MAX, "\"%s\" is not an absolute path", shown);
                return WD_E_INVALID;
        }
        r = path_simplify(item, &norm);
        if (r == -ENOMEM)
                return r;
        if (r < 0) {
                snprintf(reason, REASON_MAX, "\"%s\" is too long", shown);
                return WD_E_INVALID;
        }
        o = strlen(norm);
        if (path_has_dotdot(norm)) {
                free(norm);
                snprintf(reason, REASON_MAX, "\"%s\" has a \"..\" component", shown);
                return WD_E_INVALID;
        }
        /* libinih would strip such a blank when the path is read back. */
        if (isspace((unsigned char) norm[o - 1])) {
                free(norm);
                snprintf(reason, REASON_MAX, "\"%s\": the last component ends with a blank", shown);
                return WD_E_INVALID;
        }
        if (strcmp(norm, "/") == 0) {
                free(norm);
                snprintf(reason, REASON_MAX, "\"%s\" is the root directory, which cannot be a model root", shown);
                return WD_E_INVALID;
        }
        for (size_t i = 0; i < c->n_model_roots; i++)
                if (strcmp(c->model_roots[i], norm) == 0) {
                        free(norm);
                        snprintf(reason, REASON_MAX, "\"%s\" is listed twice", shown);
                        return WD_E_INVALID;
                }
        l = reallocarray(c->model_roots, c->n_model_roots + 1, sizeof(char *));
        if (!l) {
                free(norm);
                return -ENOMEM;
        }
        c->model_roots = l;
        c->model_roots[c->n_model_roots++] = norm;
        return 0;
}

/* A user or group name through NSS: 0, -ENOENT when there is none, or
 * another -errno when the lookup itself failed. */
static int lookup_id(const char *name, bool group, uint32_t *ret) {
        long m = sysconf(group ? _SC_GETGR_R_SIZE_MAX : _SC_GETPW_R_SIZE_MAX);
        size_t size = m > 0 ? (size_t) m : 4096;

        for (;;) {
                _cleanup_free_ char *buf = malloc(size);
                int r;

                if (!buf)
                        return -ENOMEM;
                if (group) {
                        struct group gr, *res = NULL;

                        r = getgrnam_r(name, &gr, buf, size, &res);
                        if (r == 0 && res) {
                                *ret = (uint32_t) res->gr_gid;
                                return 0;
                        }
                } else {
                        struct passwd pw, *res = NULL;

                        r = getpwnam_r(name, &pw, buf, size, &res);
                        if (r == 0 && res) {
                                *ret = (uint32_t) res->pw_uid;
                                return 0;
                        }
                }
                if (r == ERANGE && size < (16u << 20)) {
                        size *= 2;
                        continue;
                }
                /* glibc reports "no such entry" as 0; other libcs and NSS
                 * modules use these. */
                if (r == 0 || r == ENOENT || r == ESRCH || r == EBADF || r == EPERM)
                        return -ENOENT;
                return -r;
        }
}

static int id_add(Parser *p, const KeyDef *k, const char *item, char *reason) {
        Config *c = p->config;
        bool group = k->type == KEY_GIDS;
        const char *what = group ? "group" : "user";
        char shown[VALUE_SHOWN_MAX + 32];
        uint32_t id = 0;
        uint64_t v;
        int r;

        wd_escape(shown, sizeof(shown), item, VALUE_SHOWN_MAX);
        if (item[strspn(item, "0123456789")] == '\0') {
                r = parse_u64(item, 0, ID_MAX, &v);
                if (r < 0) {
                        snprintf(reason, REASON_MAX, "\"%s\" is not in 0..%u", shown, (unsigned) ID_MAX);
                        return WD_E_INVALID;
                }
                id = (uint32_t) v;
        } else {
                r = lookup_id(item, group, &id);
                if (r == -ENOENT) {
                        snprintf(reason, REASON_MAX, "unknown %s \"%s\"", what, shown);
                        return WD_E_INVALID;
                }
                if (r < 0) {
                        snprintf(reason, REASON_MAX, "cannot look up %s \"%s\": %s", what, shown, strerror(-r));
                        return r;
                }
        }
        if (group) {
                gid_t *l = reallocarray(c->allow_gids, c->n_allow_gids + 1, sizeof(gid_t));

                if (!l)
                        return -ENOMEM;
                c->allow_gids = l;
                c->allow_gids[c->n_allow_gids++] = (gid_t) id;
        } else {
                uid_t *l = reallocarray(c->allow_uids, c->n_allow_uids + 1, sizeof(uid_t));

                if (!l)
                        return -ENOMEM;
                c->allow_uids = l;
                c->allow_uids[c->n_allow_uids++] = (uid_t) id;
        }
        return 0;
}

static int parse_enum(int v, const char *shown, const char *choices, char *reason) {
        if (v < 0) {
                snprintf(reason, REASON_MAX, "\"%s\" is not one of %s", shown, choices);
                return WD_E_INVALID;
        }
        return 0;
}

/* A budget: "N%" of some memory (of_what names it in messages: "RAM",
 * "device memory") or a positive size such as "40G". */
static int parse_budget_value(const char *value, const char *shown, const char *of_what, ConfigBudget *ret,
                              char *reason) {
        size_t n = strlen(value);
        uint64_t v;
        int r;

        if (n > 0 && value[n - 1] == '%') {
                _cleanup_free_ char *digits = strndup(value, n - 1);

                if (!digits)
                        return -ENOMEM;
                r = parse_u64(digits, 1, 100, &v);
                if (r == -ERANGE) {
                        snprintf(reason, REASON_MAX, "\"%s\" is not in 1%%..100%%", shown);
                        return WD_E_INVALID;
                }
                if (r < 0) {
                        snprintf(reason, REASON_MAX, "\"%s\" is not a size or a percentage of %s", shown, of_what);
                        return WD_E_INVALID;
                }
                *ret = (ConfigBudget){ .percent = true, .value = v };
                return 0;
        }
        r = parse_size(value, &v);
        if (r == -ERANGE) {
                snprintf(reason, REASON_MAX, "\"%s\" is too large", shown);
                return WD_E_INVALID;
        }
        if (r < 0) {
                snprintf(reason, REASON_MAX, "\"%s\" is not a size or a percentage of %s", shown, of_what);
                return WD_E_INVALID;
        }
        if (v == 0) {
                snprintf(reason, REASON_MAX, "\"%s\" is not a positive size", shown);
                return WD_E_INVALID;
        }
        *ret = (ConfigBudget){ .percent = false, .value = v };
        return 0;
}

/* The host budget: a percentage of RAM is worked out now. */
static int parse_budget(Parser *p, const char *value, const char *shown, char *reason) {
        Config *c = p->config;
        ConfigBudget b;
        char *spec;
        int r;

        r = parse_budget_value(value, shown, "RAM", &b, reason);
        if (r != 0)
                return r;
        if (b.percent) {
                if (p->mem_total == 0) {
                        r = mem_total(&p->mem_total);
                        if (r < 0) {
                                snprintf(reason, REASON_MAX, "cannot read the memory size: %s", strerror(-r));
                                return r;
                        }
                }
                b.value = budget_percent(p->mem_total, b.value);
        }
        spec = strdup(value);
        if (!spec)
                return -ENOMEM;
        free(c->host_budget_spec);
        c->host_budget_spec = spec;
        c->host_budget = b.value;
        return 0;
}

/* [memory] hugetlb_reserve: auto, off, or a size that is a multiple of
 * 2 MiB (the pool's page size). */
static int parse_hugetlb_reserve(Config *c, const char *value, const char *shown, char *reason) {
        uint64_t v;
        int r;

        if (strcmp(value, "auto") == 0) {
                c->hugetlb_reserve = CONFIG_HUGETLB_RESERVE_AUTO;
                return 0;
        }
        if (strcmp(value, "off") == 0) {
                c->hugetlb_reserve = 0;
                return 0;
        }
        r = parse_size(value, &v);
        if (r < 0 || v == 0 || v == CONFIG_HUGETLB_RESERVE_AUTO) {
                snprintf(reason, REASON_MAX, "\"%s\" is not auto, off or a positive size", shown);
                return WD_E_INVALID;
        }
        if (v % (2u << 20)) {
                snprintf(reason, REASON_MAX, "\"%s\" is not a multiple of 2M (the huge page size)", shown);
                return WD_E_INVALID;
        }
        c->hugetlb_reserve = v;
        return 0;
}

/* A device ordinal: decimal, below CONFIG_GPU_MAX_DEVICES. */
static int parse_ordinal(const char *s, const char *shown, unsigned *ret, char *reason) {
        uint64_t v;
        int r;

        r = parse_u64(s, 0, CONFIG_GPU_MAX_DEVICES - 1, &v);
        if (r == -ERANGE) {
                snprintf(reason, REASON_MAX, "device \"%s\" is not in 0..%u", shown, CONFIG_GPU_MAX_DEVICES - 1);
                return WD_E_INVALID;
        }
        if (r < 0 || strspn(s, "0123456789") != strlen(s)) {
                snprintf(reason, REASON_MAX, "\"%s\" is not a device number", shown);
                return WD_E_INVALID;
        }
        *ret = (unsigned) v;
        return 0;
}

/* One "N:SPEC" of device_budgets. */
static int device_budget_add(Parser *p, const KeyDef *k, const char *item, char *reason) {
        Config *c = p->config;
        char shown[VALUE_SHOWN_MAX + 32];
        _cleanup_free_ char *dev = NULL, *spec = NULL;
        const char *colon = strchr(item, ':');
        ConfigDeviceBudget *l;
        ConfigBudget b;
        unsigned n;
        int r;

        wd_escape(shown, sizeof(shown), item, VALUE_SHOWN_MAX);
        if (!colon) {
                snprintf(reason, REASON_MAX, "\"%s\" is not DEVICE:BUDGET (e.g. 0:40G or 1:80%%)", shown);
                return WD_E_INVALID;
        }
        dev = strndup(item, (size_t) (colon - item));
        spec = strdup(colon + 1);
        if (!dev || !spec)
                return -ENOMEM;
        wd_escape(shown, sizeof(shown), dev, VALUE_SHOWN_MAX);
        r = parse_ordinal(dev, shown, &n, reason);
        if (r != 0)
                return r;
        wd_escape(shown, sizeof(shown), spec, VALUE_SHOWN_MAX);
        r = parse_budget_value(spec, shown, "device memory", &b, reason);
        if (r != 0)
                return r;
        for (size_t i = 0; i < c->n_device_budgets; i++)
                if (c->device_budgets[i].device == n) {
                        snprintf(reason, REASON_MAX, "device %u is listed twice", n);
                        return WD_E_INVALID;
                }
        l = reallocarray(c->device_budgets, c->n_device_budgets + 1, sizeof(ConfigDeviceBudget));
        if (!l)
                return -ENOMEM;
        c->device_budgets = l;
        c->device_budgets[c->n_device_budgets++] = (ConfigDeviceBudget){ .device = n, .budget = b,
                                                                           .spec = TAKE_PTR(spec) };
        return 0;
}

static int device_add(Parser *p, const KeyDef *k, const char *item, char *reason) {
        Config *c = p->config;
        char shown[VALUE_SHOWN_MAX + 32];
        unsigned n, *l;
        int r;

        wd_escape(shown, sizeof(shown), item, VALUE_SHOWN_MAX);
        r = parse_ordinal(item, shown, &n, reason);
        if (r != 0)
                return r;
        for (size_t i = 0; i < c->n_gpu_devices; i++)
                if (c->gpu_devices[i] == n) {
                        snprintf(reason, REASON_MAX, "device %u is listed twice", n);
                        return WD_E_INVALID;
                }
        l = reallocarray(c->gpu_devices, c->n_gpu_devices + 1, sizeof(unsigned));
        if (!l)
                return -ENOMEM;
        c->gpu_devices = l;
        c->gpu_devices[c->n_gpu_devices++] = n;
        return 0;
}

uint64_t config_gpu_budget(const Config *c, unsigned ordinal, uint64_t total) {
        ConfigBudget b = c->gpu_budget;

        for (size_t i = 0; i < c->n_device_budgets; i++)
                if (c->device_budgets[i].device == ordinal)
                        b = c->device_budgets[i].budget;
        return b.percent ? budget_percent(total, b.value) : b.value;
}

#define NODE_NAME_RULE "a letter or digit, then up to 62 letters, digits, '.', '_' or '-'"

/* [A-Za-z0-9][A-Za-z0-9._-]{0,62} */
static bool node_name_valid(const char *s) {
        size_t n = strlen(s);

        if (n == 0 || n > CONFIG_CLUSTER_NODE_NAME_MAX || !isalnum((unsigned char) s[0]))
                return false;
        for (size_t i = 1; i < n; i++)
                if (!isalnum((unsigned char) s[i]) && !strchr("._-", s[i]))
                        return false;
        return true;
}

/* A DNS name: dot-separated labels of 1..63 letters, digits and '-', not
 * starting or ending with '-'; 253 bytes at most. */
static bool hostname_valid(const char *s) {
        size_t n = strlen(s), label = 0;

        if (n == 0 || n > 253)
                return false;
        for (size_t i = 0; i <= n; i++) {
                if (i == n || s[i] == '.') {
                        if (label == 0 || label > 63 || s[i - 1] == '-')
                                return false;
                        label = 0;
                        continue;
                }
                if (!isalnum((unsigned char) s[i]) && s[i] != '-')
                        return false;
                if (label == 0 && s[i] == '-')
                        return false;
                label++;
        }
        return true;
}

/* Whether two hosts name the same address as written: IPv6 addresses by
 * value (fd00::1 and fd00:0::1), IPv4 addresses and names as strings, names
 * without regard to case. */
static bool host_equal(const char *a, const char *b) {
        struct in6_addr x, y;

        if (inet_pton(AF_INET6, a, &x) == 1 && inet_pton(AF_INET6, b, &y) == 1)
                return memcmp(&x, &y, sizeof(x)) == 0;
        return strcasecmp(a, b) == 0;
}

/* HOST:PORT, HOST being an IPv4 address, a host name or an IPv6 address in
 * brackets (stored without them). */
static int parse_host_port(const char *addr, char **ret_host, uint16_t *ret_port, char *reason) {
        char shown[VALUE_SHOWN_MAX + 32];
        _cleanup_free_ char *host = NULL;
        const char *port;
        uint64_t v;
        int r;

        wd_escape(shown, sizeof(shown), addr, VALUE_SHOWN_MAX);
        if (addr[0] == '[') {
                const char *close = strchr(addr, ']');
                struct in6_addr a6;

                if (!close) {
                        snprintf(reason, REASON_MAX, "\"%s\": '[' without ']'", shown);
                        return WD_E_INVALID;
                }
                host = strndup(addr + 1, (size_t) (close - addr - 1));
                if (!host)
                        return -ENOMEM;
                if (inet_pton(AF_INET6, host, &a6) != 1) {
                        wd_escape(shown, sizeof(shown), host, VALUE_SHOWN_MAX);
                        snprintf(reason, REASON_MAX, "\"%s\" is not an IPv6 address", shown);
                        return WD_E_INVALID;
                }
                if (close[1] != ':') {
                        snprintf(reason, REASON_MAX, "\"%s\" has no port (HOST:PORT, e.g. [fd00::1]:7470)", shown);
                        return WD_E_INVALID;
                }
                port = close + 2;
        } else {
                const char *colon = strrchr(addr, ':');
                struct in_addr a4;

                if (!colon) {
                        snprintf(reason, REASON_MAX, "\"%s\" has no port (HOST:PORT, e.g. 10.0.0.1:7470)", shown);
                        return WD_E_INVALID;
                }
                host = strndup(addr, (size_t) (colon - addr));
                if (!host)
                        return -ENOMEM;
                if (strchr(host, ':')) {
                        snprintf(reason, REASON_MAX,
                                 "\"%s\": an IPv6 address is written in brackets, e.g. [fd00::1]:7470", shown);
                        return WD_E_INVALID;
                }
                wd_escape(shown, sizeof(shown), host, VALUE_SHOWN_MAX);
                if (host[0] && host[strspn(host, "0123456789.")] == '\0') {
                        if (inet_pton(AF_INET, host, &a4) != 1) {
                                snprintf(reason, REASON_MAX, "\"%s\" is not an IPv4 address", shown);
                                return WD_E_INVALID;
                        }
                } else if (!hostname_valid(host)) {
                        snprintf(reason, REASON_MAX,
                                 "\"%s\" is not a host name, an IPv4 address or an IPv6 address in brackets", shown);
                        return WD_E_INVALID;
                }
                port = colon + 1;
        }
        wd_escape(shown, sizeof(shown), port, VALUE_SHOWN_MAX);
        r = parse_u64(port, 1, UINT16_MAX, &v);
        if (r == -ERANGE) {
                snprintf(reason, REASON_MAX, "port \"%s\" is not in 1..65535", shown);
                return WD_E_INVALID;
        }
        if (r < 0) {
                snprintf(reason, REASON_MAX, "port \"%s\" is not a number", shown);
                return WD_E_INVALID;
        }
        *ret_host = TAKE_PTR(host);
        *ret_port = (uint16_t) v;
        return 0;
}

/* One NAME=HOST:PORT of nodes. */
static int cluster_node_add(Parser *p, const KeyDef *k, const char *item, char *reason) {
        Config *c = p->config;
        char shown[VALUE_SHOWN_MAX + 32], other[VALUE_SHOWN_MAX + 32];
        _cleanup_free_ char *name = NULL, *host = NULL;
        const char *eq = strchr(item, '='), *addr;
        ConfigClusterNode *l;
        uint16_t port;
        size_t n;
        int r;

        wd_escape(shown, sizeof(shown), item, VALUE_SHOWN_MAX);
        if (!eq) {
                snprintf(reason, REASON_MAX, "\"%s\" is not NAME=HOST:PORT (e.g. a=10.0.0.1:7470)", shown);
                return WD_E_INVALID;
        }
        n = (size_t) (eq - item);
        while (n > 0 && isspace((unsigned char) item[n - 1]))
                n--;
        name = strndup(item, n);
        if (!name)
                return -ENOMEM;
        for (addr = eq + 1; isspace((unsigned char) *addr); addr++)
                ;
        wd_escape(shown, sizeof(shown), name, VALUE_SHOWN_MAX);
        if (!node_name_valid(name)) {
                snprintf(reason, REASON_MAX, "\"%s\" is not a node name (" NODE_NAME_RULE ")", shown);
                return WD_E_INVALID;
        }
        r = parse_host_port(addr, &host, &port, reason);
        if (r != 0)
                return r;
        for (size_t i = 0; i < c->n_cluster_nodes; i++) {
                if (strcmp(c->cluster_nodes[i].name, name) == 0) {
                        snprintf(reason, REASON_MAX, "node \"%s\" is listed twice", shown);
                        return WD_E_INVALID;
                }
                if (c->cluster_nodes[i].port == port && host_equal(c->cluster_nodes[i].host, host)) {
                        wd_escape(other, sizeof(other), c->cluster_nodes[i].name, VALUE_SHOWN_MAX);
                        snprintf(reason, REASON_MAX, "nodes \"%s\" and \"%s\" have the same address", other, shown);
                        return WD_E_INVALID;
                }
        }
        if (c->n_cluster_nodes >= CONFIG_CLUSTER_NODES_MAX) {
                snprintf(reason, REASON_MAX, "more than %u nodes", CONFIG_CLUSTER_NODES_MAX);
                return WD_E_INVALID;
        }
        l = reallocarray(c->cluster_nodes, c->n_cluster_nodes + 1, sizeof(ConfigClusterNode));
        if (!l)
                return -ENOMEM;
        c->cluster_nodes = l;
        c->cluster_nodes[c->n_cluster_nodes++] = (ConfigClusterNode){ .name = TAKE_PTR(name), .host = TAKE_PTR(host),
                                                                       .port = port };
        return 0;
}

/* Read the secret file into buf (CONFIG_CLUSTER_SECRET_MAX + 1 bytes): the
 * file itself, not a link; a regular file of the daemon's user or root that
 * neither group nor others may use; at most CONFIG_CLUSTER_SECRET_MAX bytes,
 * at least CONFIG_CLUSTER_SECRET_MIN once trailing blanks are trimmed.
 * Returns 0 and the trimmed length, WD_E_INVALID for a rule or -errno, with
 * the reason written.  The caller wipes buf either way. */
static int read_secret_into(const char *path, uint8_t *buf, size_t *ret_len, char *reason) {
        _cleanup_close_ int fd = -1;
        char shown[VALUE_SHOWN_MAX + 32];
        struct stat st;
        mode_t mode;
        size_t n = 0;
        int r;

        wd_escape(shown, sizeof(shown), path, VALUE_SHOWN_MAX);
        /* O_NONBLOCK: a FIFO put there must not make us hang in open(). */
        fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        if (fd < 0) {
                r = negative_errno();
                if (r == -ELOOP) {
                        snprintf(reason, REASON_MAX, "\"%s\" is a symbolic link; name the file itself", shown);
                        return WD_E_INVALID;
                }
                snprintf(reason, REASON_MAX, "cannot open \"%s\": %s", shown, strerror(-r));
                return r;
        }
        if (fstat(fd, &st) < 0) {
                r = negative_errno();
                snprintf(reason, REASON_MAX, "cannot stat \"%s\": %s", shown, strerror(-r));
                return r;
        }
        if (!S_ISREG(st.st_mode)) {
                snprintf(reason, REASON_MAX, "\"%s\" is not a regular file", shown);
                return WD_E_INVALID;
        }
        if (st.st_uid != geteuid() && st.st_uid != 0) {
                snprintf(reason, REASON_MAX, "\"%s\" is owned by uid %u, neither the daemon's user (uid %u) nor root",
                         shown, (unsigned) st.st_uid, (unsigned) geteuid());
                return WD_E_INVALID;
        }
        mode = st.st_mode & 07777;
        if (mode & 077) {
                snprintf(reason, REASON_MAX, "\"%s\": mode %04o lets others %s it; chmod 600", shown, (unsigned) mode,
                         mode & 044 ? "read" : mode & 022 ? "write" : "execute");
                return WD_E_INVALID;
        }
        if (st.st_size > (off_t) CONFIG_CLUSTER_SECRET_MAX) {
                snprintf(reason, REASON_MAX, "\"%s\" is larger than %u bytes", shown, CONFIG_CLUSTER_SECRET_MAX);
                return WD_E_INVALID;
        }
        /* One byte more than allowed, to notice a file that grew. */
        while (n <= CONFIG_CLUSTER_SECRET_MAX) {
                ssize_t k = read(fd, buf + n, CONFIG_CLUSTER_SECRET_MAX + 1 - n);

                if (k < 0 && errno == EINTR)
                        continue;
                if (k < 0) {
                        r = negative_errno();
                        snprintf(reason, REASON_MAX, "cannot read \"%s\": %s", shown, strerror(-r));
                        return r;
                }
                if (k == 0)
                        break;
                n += (size_t) k;
        }
        if (n > CONFIG_CLUSTER_SECRET_MAX) {
                snprintf(reason, REASON_MAX, "\"%s\" is larger than %u bytes", shown, CONFIG_CLUSTER_SECRET_MAX);
                return WD_E_INVALID;
        }
        while (n > 0 && isspace(buf[n - 1]))
                n--;
        if (n < CONFIG_CLUSTER_SECRET_MIN) {
                snprintf(reason, REASON_MAX,
                         "\"%s\" holds %zu bytes without its trailing blanks and newlines, fewer than %u", shown, n,
                         CONFIG_CLUSTER_SECRET_MIN);
                return WD_E_INVALID;
        }
        *ret_len = n;
        return 0;
}

static int read_secret(Config *c, char *reason) {
        uint8_t buf[CONFIG_CLUSTER_SECRET_MAX + 1];
        size_t n = 0;
        int r;

        r = read_secret_into(c->cluster_secret_file, buf, &n, reason);
        if (r == 0) {
                cluster_secret_clear(c);
                c->cluster_secret = malloc(n);
                if (c->cluster_secret) {
                        memcpy(c->cluster_secret, buf, n);
                        c->cluster_secret_len = n;
                } else
                        r = -ENOMEM;
        }
        explicit_bzero(buf, sizeof(buf));
        return r;
}

/* [metrics] listen: "" (off), "IPV4:PORT" or "[IPV6]:PORT", PORT 0..65535
 * (0: any free port).  Addresses only: no name lookup at start. */
static int listen_parse(Config *c, const char *value, char *reason) {
        char shown[VALUE_SHOWN_MAX + 32], host[INET6_ADDRSTRLEN + 1];
        unsigned char addr[sizeof(struct in6_addr)];
        const char *h = value, *end = NULL, *port_s = NULL;
        int family = AF_INET;
        uint64_t port = 0;
        char *l, *hs = NULL;

        wd_escape(shown, sizeof(shown), value, VALUE_SHOWN_MAX);
        if (*value) {
                if (value[0] == '[') {
                        family = AF_INET6;
                        h = value + 1;
                        end = strchr(h, ']');
                        port_s = end && end[1] == ':' ? end + 2 : NULL;
                } else {
                        end = strrchr(value, ':');
                        port_s = end ? end + 1 : NULL;
                }
                if (!port_s || parse_u64(port_s, 0, 65535, &port) < 0) {
                        snprintf(reason, REASON_MAX,
                                 "\"%s\" is not ADDRESS:PORT (127.0.0.1:9471, [::1]:9471; PORT 0..65535; empty: off)",
                                 shown);
                        return WD_E_INVALID;
                }
                if (end == h || (size_t) (end - h) >= sizeof(host)) {
                        snprintf(reason, REASON_MAX, "\"%s\": the address is missing or too long", shown);
                        return WD_E_INVALID;
                }
                memcpy(host, h, (size_t) (end - h));
                host[end - h] = 0;
                if (inet_pton(family, host, addr) != 1) {
                        snprintf(reason, REASON_MAX, "\"%s\": not an %s address%s", shown,
                                 family == AF_INET6 ? "IPv6" : "IPv4",
                                 family == AF_INET6 ? "" : " (an IPv6 address goes in brackets: [::1]:9471)");
                        return WD_E_INVALID;
                }
                hs = strdup(host);
                if (!hs)
                        return -ENOMEM;
        }
        l = strdup(value);
        if (!l) {
                free(hs);
                return -ENOMEM;
        }
        free(c->metrics_listen);
        free(c->metrics_host);
        c->metrics_listen = l;
        c->metrics_host = hs;
        c->metrics_port = (uint16_t) port;
        return 0;
}

/* Apply one value (or, with append, one continuation line of a list).
 * Returns 0, or WD_E_INVALID / -errno with the reason written. */
static int parser_apply(Parser *p, const KeyDef *k, const char *value, bool append, char *reason) {
        Config *c = p->config;
        char shown[VALUE_SHOWN_MAX + 32], a[32], b[32];
        uint64_t v;
        int r;

        wd_escape(shown, sizeof(shown), value, VALUE_SHOWN_MAX);
        switch (k->type) {
        case KEY_UNSIGNED:
                r = parse_u64(value, k->min, k->max, &v);
                if (r == -ERANGE) {
                        snprintf(reason, REASON_MAX, "\"%s\" is not in %llu..%llu", shown,
                                 (unsigned long long) k->min, (unsigned long long) k->max);
                        return WD_E_INVALID;
                }
                if (r < 0) {
                        snprintf(reason, REASON_MAX, "\"%s\" is not a number", shown);
                        return WD_E_INVALID;
                }
                *(unsigned *) ((uint8_t *) c + k->offset) = (unsigned) v;
                return 0;

        case KEY_SIZE:
                r = parse_size(value, &v);
                if (r == -EINVAL) {
                        snprintf(reason, REASON_MAX, "\"%s\" is not a size (a number with an optional K, M, G or T suffix)",
                                 shown);
                        return WD_E_INVALID;
                }
                if (r < 0 || v < k->min || v > k->max) {
                        snprintf(reason, REASON_MAX, "\"%s\" is not in %s..%s", shown, format_size(k->min, a),
                                 format_size(k->max, b));
                        return WD_E_INVALID;
                }
                if (v % k->align) {
                        snprintf(reason, REASON_MAX, "\"%s\" is not a multiple of %llu", shown,
                                 (unsigned long long) k->align);
                        return WD_E_INVALID;
                }
                *(uint64_t *) ((uint8_t *) c + k->offset) = v;
                return 0;

        case KEY_SOCKET: {
                char *s;

                if (value[0] != '/') {
                        snprintf(reason, REASON_MAX, "\"%s\" is not an absolute path", shown);
                        return WD_E_INVALID;
                }
                if (strlen(value) > SOCKET_PATH_MAX) {
                        snprintf(reason, REASON_MAX, "\"%s\" is longer than %zu bytes", shown, SOCKET_PATH_MAX);
                        return WD_E_INVALID;
                }
                if (value[strlen(value) - 1] == '/') {
                        snprintf(reason, REASON_MAX, "\"%s\" ends with '/': it must name a socket, not a directory",
                                 shown);
                        return WD_E_INVALID;
                }
                s = strdup(value);
                if (!s)
                        return -ENOMEM;
                free(c->socket);
                c->socket = s;
                return 0;
        }

        case KEY_ROOTS:
                if (!append) {
                        strv_free(c->model_roots, c->n_model_roots);
                        c->model_roots = NULL;
                        c->n_model_roots = 0;
                        p->roots_line = p->line;
                        /* "model_roots =" may be followed by indented lines. */
                        if (!*value)
                                return 0;
                }
                return for_each_item(p, k, value, ':', root_add, reason);

        case KEY_UIDS:
        case KEY_GIDS:
                if (!append) {
                        if (k->type == KEY_UIDS) {
                                free(c->allow_uids);
                                c->allow_uids = NULL;
                                c->n_allow_uids = 0;
                        } else {
                                free(c->allow_gids);
                                c->allow_gids = NULL;
                                c->n_allow_gids = 0;
                        }
                        if (!*value) /* the empty list */
                                return 0;
                }
                return for_each_item(p, k, value, ',', id_add, reason);

        case KEY_LOG_LEVEL:
                r = config_log_level_from_string(value);
                if (r < 0)
                        return parse_enum(r, shown, "err, warning, notice, info, debug", reason);
                c->log_level = r;
                return 0;

        case KEY_BUDGET:
                return parse_budget(p, value, shown, reason);

        case KEY_PAGES:
                r = slab_pages_from_string(value);
                if (r < 0)
                        return parse_enum(r, shown, "auto, hugetlb, small", reason);
                c->host_pages = (SlabPages) r;
                return 0;

        case KEY_RESERVE:
                return parse_hugetlb_reserve(c, value, shown, reason);

        case KEY_GPU_TRANSPORT:
                for (r = 0; r < (int) ELEMENTSOF(gpu_transport_names); r++)
                        if (strcmp(value, gpu_transport_names[r]) == 0) {
                                c->cluster_gpu_transport = (LanesTransport) r;
                                return 0;
                        }
                return parse_enum(-EINVAL, shown, "auto, nccl, host", reason);

        case KEY_DIRECT:
                r = direct_mode_from_string(value);
                if (r < 0)
                        return parse_enum(r, shown, "auto, on, off", reason);
                c->direct_io = (DirectMode) r;
                return 0;

        case KEY_GPU_BUDGET: {
                ConfigBudget budget;
                char *spec;

                r = parse_budget_value(value, shown, "device memory", &budget, reason);
                if (r != 0)
                        return r;
                spec = strdup(value);
                if (!spec)
                        return -ENOMEM;
                free(c->gpu_budget_spec);
                c->gpu_budget_spec = spec;
                c->gpu_budget = budget;
                return 0;
        }

        case KEY_DEVICE_BUDGETS:
                if (!append) {
                        device_budgets_clear(c);
                        if (!*value)
                                return 0;
                }
                return for_each_item(p, k, value, ',', device_budget_add, reason);

        case KEY_BOOL:
                if (strcmp(value, "yes") == 0 || strcmp(value, "true") == 0 || strcmp(value, "1") == 0)
                        *(bool *) ((uint8_t *) c + k->offset) = true;
                else if (strcmp(value, "no") == 0 || strcmp(value, "false") == 0 || strcmp(value, "0") == 0)
                        *(bool *) ((uint8_t *) c + k->offset) = false;
                else
                        return parse_enum(-EINVAL, shown, "yes, no", reason);
                return 0;

        case KEY_DEVICES:
                if (!append) {
                        free(c->gpu_devices);
                        c->gpu_devices = NULL;
                        c->n_gpu_devices = 0;
                        /* "all" (or nothing) serves every device. */
                        if (!*value || strcmp(value, "all") == 0)
                                return 0;
                }
                return for_each_item(p, k, value, ',', device_add, reason);

        case KEY_DURATION:
                r = parse_timespan(value, &v);
                if (r == -EINVAL) {
                        snprintf(reason, REASON_MAX,
                                 "\"%s\" is not a duration (a number and one of the units us, ms, s, m, h: e.g. 10s)",
                                 shown);
                        return WD_E_INVALID;
                }
                if (r < 0 || v < k->min || v > k->max) {
                        snprintf(reason, REASON_MAX, "\"%s\" is not in %s..%s", shown, format_duration(k->min, a),
                                 format_duration(k->max, b));
                        return WD_E_INVALID;
                }
                *(uint64_t *) ((uint8_t *) c + k->offset) = v;
                return 0;

        case KEY_NODE: {
                char *s;

                if (!node_name_valid(value)) {
                        snprintf(reason, REASON_MAX, "\"%s\" is not a node name (" NODE_NAME_RULE ")", shown);
                        return WD_E_INVALID;
                }
                s = strdup(value);
                if (!s)
                        return -ENOMEM;
                free(c->cluster_node);
                c->cluster_node = s;
                return 0;
        }

        case KEY_NODES:
                if (!append) {
                        cluster_nodes_clear(c);
                        /* "nodes =" may be followed by indented lines. */
                        if (!*value)
                                return 0;
                }
                return for_each_item(p, k, value, ',', cluster_node_add, reason);

        case KEY_SECRET_FILE: {
                char *s, *where = NULL;

                if (value[0] != '/') {
                        snprintf(reason, REASON_MAX, "\"%s\" is not an absolute path", shown);
                        return WD_E_INVALID;
                }
                s = strdup(value);
                if (!s || asprintf(&where, "%s:%u", p->display, p->line) < 0) {
                        free(s);
                        return -ENOMEM;
                }
                free(c->cluster_secret_file);
                c->cluster_secret_file = s;
                free(p->load->secret_where);
                p->load->secret_where = where;
                return 0;
        }

        case KEY_LISTEN:
                return listen_parse(c, value, reason);
        }
        return -EINVAL;
}

/* Cut s at an inline comment (';' after a blank, libinih's rule for values
 * on a key line) and drop the blanks before it. */
static void strip_inline_comment(char *s) {
        size_t n;

        for (char *q = s; *q; q++)
                if (*q == ';' && q > s && isspace((unsigned char) q[-1])) {
                        *q = '\0';
                        break;
                }
        n = strlen(s);
        while (n > 0 && isspace((unsigned char) s[n - 1]))
                s[--n] = '\0';
}

static int parser_handle(void *userdata, const char *section, const char *name, const char *value) {
        Parser *p = userdata;
        _cleanup_free_ char *stripped = NULL;
        char reason[REASON_MAX] = "", shown[VALUE_SHOWN_MAX + 32];
        const KeyDef *k = NULL;
        bool continuation;
        int r;

        /* libinih calls us for an indented line after a key with that key's
         * name: a continuation line. */
        continuation = p->have_key && p->indented;
        p->have_key = true;
        if (p->failed)
                return 0;

        wd_escape(shown, sizeof(shown), name, VALUE_SHOWN_MAX);
        if (!*section) {
                parser_fail(p, p->line, WD_E_INVALID, "%s: key outside of any section", shown);
                return 0;
        }
        if (!str_in(section, known_sections, ELEMENTSOF(known_sections))) {
                /* parser_read_line() stops at such a header already. */
                parser_fail(p, p->line, WD_E_INVALID, "[%s]: unknown section", section);
                return 0;
        }
        for (size_t i = 0; i < ELEMENTSOF(key_defs); i++)
                if (strcmp(key_defs[i].section, section) == 0 && strcmp(key_defs[i].name, name) == 0)
                        k = &key_defs[i];
        if (!k) {
                parser_fail(p, p->line, WD_E_INVALID, "[%s] %s: unknown key", section, shown);
                return 0;
        }
        if (continuation && !key_is_list(k)) {
                parser_fail(p, p->line, WD_E_INVALID,
                            "[%s] %s: indented line continues a key that takes a single value", section, shown);
                return 0;
        }
        if (continuation) {
                /* libinih (r55) leaves " ; comment" on continuation lines. */
                stripped = strdup(value);
                if (!stripped) {
                        parser_fail(p, p->line, -ENOMEM, "out of memory");
                        return 0;
                }
                strip_inline_comment(stripped);
                value = stripped;
        }
        r = parser_apply(p, k, value, continuation, reason);
        if (r != 0) {
                if (r == -ENOMEM && !*reason)
                        snprintf(reason, sizeof(reason), "out of memory");
                parser_fail(p, p->line, r, "[%s] %s: %s", section, shown, reason);
                return 0;
        }
        if (strcmp(k->section, "cluster") == 0)
                p->load->cluster_set = true;
        return 1;
}

/* Parse one file's text over c. */
static int config_parse_text(Config *c, LoadState *load, const char *text, size_t len, const char *display,
                             WdError *err) {
        Parser p = {
                .config = c,
                .load = load,
                .display = display,
                .text = text,
                .len = len,
                .err = err,
        };
        int r;

        if (len > CONFIG_FILE_MAX)
                return wd_error_set(err, -EFBIG, "%s: larger than %u bytes", display, CONFIG_FILE_MAX);
        r = ini_parse_stream(parser_read_line, &p, parser_handle, &p);
        /* libinih goes on after a line it cannot parse and reports the first
         * one; that comes before an error of ours on a later line. */
        if (r > 0 && (!p.failed || (unsigned) r < p.error_line)) {
                p.failed = false;
                return parser_fail(&p, (unsigned) r, WD_E_INVALID,
                                   "syntax error: expected \"key = value\", \"[section]\" or a comment");
        }
        if (p.failed)
                return p.error;
        if (r < 0)
                return wd_error_set(err, -ENOMEM, "%s: out of memory", display);
        if (p.roots_line && c->n_model_roots == 0)
                return parser_fail(&p, p.roots_line, WD_E_INVALID, "[daemon] model_roots: no model root given");
        return 0;
}

/* Read a whole configuration file; a FIFO or device cannot make us hang. */
static int read_config_file(int dir_fd, const char *name, const char *display, char **ret, size_t *ret_len,
                            WdError *err) {
        _cleanup_close_ int fd = -1;
        _cleanup_free_ char *buf = NULL;
        size_t n = 0;
        struct stat st;

        fd = openat(dir_fd, name, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        if (fd < 0) {
                int r = negative_errno();
                return wd_error_set(err, r, "%s: cannot open: %s", display, strerror(-r));
        }
        if (fstat(fd, &st) < 0) {
                int r = negative_errno();
                return wd_error_set(err, r, "%s: cannot stat: %s", display, strerror(-r));
        }
        if (!S_ISREG(st.st_mode))
                return wd_error_set(err, WD_E_INVALID, "%s: not a regular file", display);
        if (st.st_size > CONFIG_FILE_MAX)
                return wd_error_set(err, -EFBIG, "%s: larger than %u bytes", display, CONFIG_FILE_MAX);
        /* One byte more than allowed, to notice a file that grew. */
        buf = malloc(CONFIG_FILE_MAX + 1);
        if (!buf)
                return wd_error_set(err, -ENOMEM, "%s: out of memory", display);
        while (n <= CONFIG_FILE_MAX) {
                ssize_t k = read(fd, buf + n, CONFIG_FILE_MAX + 1 - n);

                if (k < 0 && errno == EINTR)
                        continue;
                if (k < 0) {
                        int r = negative_errno();
                        return wd_error_set(err, r, "%s: cannot read: %s", display, strerror(-r));
                }
                if (k == 0)
                        break;
                n += (size_t) k;
        }
        if (n > CONFIG_FILE_MAX)
                return wd_error_set(err, -EFBIG, "%s: larger than %u bytes", display, CONFIG_FILE_MAX);
        *ret = TAKE_PTR(buf);
        *ret_len = n;
        return 0;
}

static int config_parse_file(Config *c, LoadState *load, int dir_fd, const char *name, const char *display,
                             WdError *err) {
        _cleanup_free_ char *text = NULL;
        size_t len = 0;
        int r;

        r = read_config_file(dir_fd, name, display, &text, &len, err);
        if (r != 0)
                return r;
        return config_parse_text(c, load, text, len, display, err);
}

static int cmp_names(const void *a, const void *b) {
        return strcmp(*(char *const *) a, *(char *const *) b);
}

static void closedirp(DIR **d) {
        if (*d)
                closedir(*d);
}

/* Every NAME.conf in dir (not hidden), in strcmp() order.  A missing dir is
 * fine. */
static int config_parse_dropins(Config *c, LoadState *load, const char *dir, WdError *err) {
        _cleanup_(closedirp) DIR *d = NULL;
        char **names = NULL;
        size_t n = 0;
        struct dirent *de;
        int fd, r = 0;

        fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0) {
                if (errno == ENOENT)
                        return 0;
                r = negative_errno();
                return wd_error_set(err, r, "%s: cannot open: %s", dir, strerror(-r));
        }
        d = fdopendir(fd);
        if (!d) {
                r = negative_errno();
                close(fd);
                return wd_error_set(err, r, "%s: cannot open: %s", dir, strerror(-r));
        }
        for (errno = 0; (de = readdir(d)); errno = 0) {
                char **l, *s;

                if (de->d_name[0] == '.' || !str_endswith(de->d_name, ".conf"))
                        continue;
                l = reallocarray(names, n + 1, sizeof(char *));
                s = l ? strdup(de->d_name) : NULL;
                if (l)
                        names = l;
                if (!s) {
                        r = wd_error_set(err, -ENOMEM, "%s: out of memory", dir);
                        goto finish;
                }
                names[n++] = s;
        }
        if (errno) {
                r = negative_errno();
                wd_error_set(err, r, "%s: cannot read: %s", dir, strerror(-r));
                goto finish;
        }
        if (n > 0)
                qsort(names, n, sizeof(char *), cmp_names);
        for (size_t i = 0; i < n; i++) {
                _cleanup_free_ char *display = path_join(dir, names[i]);

                if (!display) {
                        r = wd_error_set(err, -ENOMEM, "%s: out of memory", dir);
                        goto finish;
                }
                r = config_parse_file(c, load, dirfd(d), names[i], display, err);
                if (r != 0)
                        goto finish;
        }
finish:
        strv_free(names, n);
        return r;
}

#define CLUSTER_REQUIRED "node, nodes and secret_file are required once any [cluster] key is set"

/* After the last file: the [cluster] rules that span keys (and files), then
 * the secret.  display names the configuration as a whole. */
static int config_finish(Config *c, const LoadState *load, const char *display, WdError *err) {
        char reason[REASON_MAX] = "", shown[VALUE_SHOWN_MAX + 32];
        bool found = false;
        int r;

        if (!load->cluster_set)
                return 0;
        if (!c->cluster_node)
                return wd_error_set(err, WD_E_INVALID, "%s: [cluster]: node is not set (" CLUSTER_REQUIRED ")", display);
        if (c->n_cluster_nodes == 0)
                return wd_error_set(err, WD_E_INVALID, "%s: [cluster]: nodes is not set or empty (" CLUSTER_REQUIRED ")",
                                    display);
        if (!c->cluster_secret_file)
                return wd_error_set(err, WD_E_INVALID, "%s: [cluster]: secret_file is not set (" CLUSTER_REQUIRED ")",
                                    display);
        for (size_t i = 0; i < c->n_cluster_nodes; i++)
                found = found || strcmp(c->cluster_nodes[i].name, c->cluster_node) == 0;
        if (!found) {
                wd_escape(shown, sizeof(shown), c->cluster_node, VALUE_SHOWN_MAX);
                return wd_error_set(err, WD_E_INVALID, "%s: [cluster]: node \"%s\" is not one of nodes", display, shown);
        }
        r = read_secret(c, reason);
        if (r == -ENOMEM && !*reason)
                snprintf(reason, sizeof(reason), "out of memory");
        if (r != 0)
                return wd_error_set(err, r, "%s: [cluster] secret_file: %s", load->secret_where, reason);
        return 0;
}

int config_load(const char *path, Config **ret, WdError *err) {
        _cleanup_(config_freep) Config *c = NULL;
        _cleanup_free_ char *dir = NULL;
        _cleanup_(load_state_deinit) LoadState load = {};
        int r;

        r = config_new_default(&c, err);
        if (r != 0)
                return r;
        if (path) {
                c->path = strdup(path);
                if (!c->path || asprintf(&dir, "%s.d", path) < 0)
                        return wd_error_set(err, -ENOMEM, "%s: out of memory", path);
                r = config_parse_file(c, &load, AT_FDCWD, path, path, err);
                if (r != 0)
                        return r;
                r = config_parse_dropins(c, &load, dir, err);
                if (r != 0)
                        return r;
                r = config_finish(c, &load, path, err);
                if (r != 0)
                        return r;
        }
        *ret = TAKE_PTR(c);
        return 0;
}

int config_load_string(const char *text, size_t len, const char *display, Config **ret, WdError *err) {
        _cleanup_(config_freep) Config *c = NULL;
        _cleanup_(load_state_deinit) LoadState load = {};
        int r;

        if (!display)
                display = "<string>";
        r = config_new_default(&c, err);
        if (r != 0)
                return r;
        r = config_parse_text(c, &load, text, len, display, err);
        if (r != 0)
                return r;
        r = config_finish(c, &load, display, err);
        if (r != 0)
                return r;
        *ret = TAKE_PTR(c);
        return 0;
}

static bool streq_null(const char *a, const char *b) {
        return a == b || (a && b && strcmp(a, b) == 0);
}

static bool cluster_equal(const Config *a, const Config *b) {
        if (!streq_null(a->cluster_node, b->cluster_node) || a->n_cluster_nodes != b->n_cluster_nodes ||
            !streq_null(a->cluster_secret_file, b->cluster_secret_file) ||
            a->cluster_secret_len != b->cluster_secret_len ||
            (a->cluster_secret_len > 0 && memcmp(a->cluster_secret, b->cluster_secret, a->cluster_secret_len) != 0) ||
            a->cluster_deadline_usec != b->cluster_deadline_usec || a->cluster_peer_fetch != b->cluster_peer_fetch ||
            a->cluster_gpu_transport != b->cluster_gpu_transport)
                return false;
        for (size_t i = 0; i < a->n_cluster_nodes; i++)
                if (strcmp(a->cluster_nodes[i].name, b->cluster_nodes[i].name) != 0 ||
                    strcmp(a->cluster_nodes[i].host, b->cluster_nodes[i].host) != 0 ||
                    a->cluster_nodes[i].port != b->cluster_nodes[i].port)
                        return false;
        return true;
}

bool config_equal(const Config *a, const Config *b) {
        if (strcmp(a->socket, b->socket) != 0 || a->n_model_roots != b->n_model_roots ||
            a->n_allow_uids != b->n_allow_uids || a->n_allow_gids != b->n_allow_gids ||
            a->max_connections != b->max_connections || a->max_connections_per_uid != b->max_connections_per_uid ||
            a->max_pending_requests != b->max_pending_requests || a->max_frame_size != b->max_frame_size ||
            a->max_request_size != b->max_request_size || a->hello_timeout != b->hello_timeout ||
            a->frame_timeout != b->frame_timeout ||
            a->log_level != b->log_level || a->host_budget != b->host_budget ||
            strcmp(a->host_budget_spec, b->host_budget_spec) != 0 || a->host_pages != b->host_pages ||
            a->hugetlb_reserve != b->hugetlb_reserve || a->ready_after_touch != b->ready_after_touch ||
            a->queue_depth != b->queue_depth || a->chunk_size != b->chunk_size || a->direct_io != b->direct_io ||
            strcmp(a->gpu_budget_spec, b->gpu_budget_spec) != 0 || a->gpu_budget.percent != b->gpu_budget.percent ||
            a->gpu_budget.value != b->gpu_budget.value || a->keep_host != b->keep_host ||
            a->n_device_budgets != b->n_device_budgets || a->n_gpu_devices != b->n_gpu_devices ||
            strcmp(a->metrics_listen, b->metrics_listen) != 0)
                return false;
        for (size_t i = 0; i < a->n_device_budgets; i++)
                if (a->device_budgets[i].device != b->device_budgets[i].device ||
                    a->device_budgets[i].budget.percent != b->device_budgets[i].budget.percent ||
                    a->device_budgets[i].budget.value != b->device_budgets[i].budget.value ||
                    strcmp(a->device_budgets[i].spec, b->device_budgets[i].spec) != 0)
                        return false;
        for (size_t i = 0; i < a->n_gpu_devices; i++)
                if (a->gpu_devices[i] != b->gpu_devices[i])
                        return false;
        for (size_t i = 0; i < a->n_model_roots; i++)
                if (strcmp(a->model_roots[i], b->model_roots[i]) != 0)
                        return false;
        for (size_t i = 0; i < a->n_allow_uids; i++)
                if (a->allow_uids[i] != b->allow_uids[i])
                        return false;
        for (size_t i = 0; i < a->n_allow_gids; i++)
                if (a->allow_gids[i] != b->allow_gids[i])
                        return false;
        return cluster_equal(a, b);
}

/* A list as "key = a, b" that wraps onto indented continuation lines. */
typedef struct ListWriter {
        FILE *f;
        const char *sep;
        size_t col;
        bool key_line;
        bool line_empty;
} ListWriter;

static void list_begin(ListWriter *w, FILE *f, const char *key, const char *sep) {
        *w = (ListWriter){ .f = f, .sep = sep, .key_line = true, .line_empty = true };
        w->col = (size_t) fprintf(f, "%s =", key);
}

static void list_item(ListWriter *w, const char *item) {
        size_t len = strlen(item), add = w->line_empty ? 1 + len : strlen(w->sep) + len;

        if (w->col + add > DUMP_WIDTH && !(w->line_empty && !w->key_line)) {
                fputs("\n\t", w->f);
                w->col = 1;
                w->key_line = false;
                w->line_empty = true;
        }
        if (w->line_empty)
                w->col += (size_t) fprintf(w->f, "%s%s", w->key_line ? " " : "", item);
        else
                w->col += (size_t) fprintf(w->f, "%s%s", w->sep, item);
        w->line_empty = false;
}

static void list_end(ListWriter *w) {
        fputc('\n', w->f);
}

static const char *name_or(const char *name, const char *fallback) {
        return name ? name : fallback;
}

int config_dump(const Config *c, FILE *f) {
        char a[32];
        ListWriter w;

        fprintf(f, "# weightd: effective configuration%s%s%s\n", c->path ? " (" : "", c->path ? c->path : "",
                c->path ? " and its drop-ins)" : "");
        fprintf(f, "\n[daemon]\nsocket = %s\n", c->socket);
        list_begin(&w, f, "model_roots", ":");
        for (size_t i = 0; i < c->n_model_roots; i++)
                list_item(&w, c->model_roots[i]);
        list_end(&w);
        list_begin(&w, f, "allow_uids", ", ");
        for (size_t i = 0; i < c->n_allow_uids; i++) {
                snprintf(a, sizeof(a), "%u", (unsigned) c->allow_uids[i]);
                list_item(&w, a);
        }
        list_end(&w);
        list_begin(&w, f, "allow_gids", ", ");
        for (size_t i = 0; i < c->n_allow_gids; i++) {
                snprintf(a, sizeof(a), "%u", (unsigned) c->allow_gids[i]);
                list_item(&w, a);
        }
        list_end(&w);
        fprintf(f, "max_connections = %u\n", c->max_connections);
        fprintf(f, "max_connections_per_uid = %u\n", c->max_connections_per_uid);
        fprintf(f, "max_pending_requests = %u\n", c->max_pending_requests);
        fprintf(f, "max_frame_size = %s\n", format_size(c->max_frame_size, a));
        fprintf(f, "max_request_size = %s\n", format_size(c->max_request_size, a));
        fprintf(f, "hello_timeout = %u\n", c->hello_timeout);
        fprintf(f, "frame_timeout = %u\n", c->frame_timeout);
        fprintf(f, "log_level = %s\n", name_or(config_log_level_to_string(c->log_level), "info"));

        fprintf(f, "\n[memory]\n# %llu bytes\nhost_budget = %s\n", (unsigned long long) c->host_budget,
                c->host_budget_spec);
        fprintf(f, "host_pages = %s\n", name_or(slab_pages_to_string(c->host_pages), "auto"));
        fprintf(f, "hugetlb_reserve = %s\n", c->hugetlb_reserve == CONFIG_HUGETLB_RESERVE_AUTO ? "auto"
                                              : c->hugetlb_reserve == 0                       ? "off"
                                                                                              : format_size(c->hugetlb_reserve, a));
        fprintf(f, "ready_after_touch = %s\n", c->ready_after_touch ? "yes" : "no");

        fprintf(f, "\n[io]\nqueue_depth = %u\n", c->queue_depth);
        fprintf(f, "chunk_size = %s\n", format_size(c->chunk_size, a));
        fprintf(f, "direct_io = %s\n", name_or(direct_mode_to_string(c->direct_io), "auto"));

        fprintf(f, "\n[gpu]\nbudget = %s\n", c->gpu_budget_spec);
        list_begin(&w, f, "device_budgets", ", ");
        for (size_t i = 0; i < c->n_device_budgets; i++) {
                char item[256];

                snprintf(item, sizeof(item), "%u:%s", c->device_budgets[i].device, c->device_budgets[i].spec);
                list_item(&w, item);
        }
        list_end(&w);
        fprintf(f, "keep_host = %s\n", c->keep_host ? "yes" : "no");
        if (c->n_gpu_devices == 0)
                fprintf(f, "devices = all\n");
        else {
                list_begin(&w, f, "devices", ", ");
                for (size_t i = 0; i < c->n_gpu_devices; i++) {
                        snprintf(a, sizeof(a), "%u", c->gpu_devices[i]);
                        list_item(&w, a);
                }
                list_end(&w);
        }

        fputs("\n[cluster]\n", f);
        if (!c->cluster_node)
                fputs("# not configured: this node serves alone\n", f);
        else {
                fprintf(f, "node = %s\n", c->cluster_node);
                list_begin(&w, f, "nodes", ", ");
                for (size_t i = 0; i < c->n_cluster_nodes; i++) {
                        const ConfigClusterNode *n = &c->cluster_nodes[i];
                        bool v6 = strchr(n->host, ':');
                        char item[512];

                        snprintf(item, sizeof(item), "%s=%s%s%s:%u", n->name, v6 ? "[" : "", n->host, v6 ? "]" : "",
                                 (unsigned) n->port);
                        list_item(&w, item);
                }
                list_end(&w);
                /* "secret_file=PATH" fitted libinih's line (INI_MAX_LINE - 2
                 * bytes) when it was read; with blanks around '=' it might
                 * not. */
                fprintf(f, "secret_file%s%s\n",
                        strlen("secret_file = ") + strlen(c->cluster_secret_file) > INI_MAX_LINE - 2 ? "=" : " = ",
                        c->cluster_secret_file);
                fprintf(f, "deadline = %s\n", format_duration(c->cluster_deadline_usec, a));
                fprintf(f, "peer_fetch = %s\n", c->cluster_peer_fetch ? "yes" : "no");
                fprintf(f, "gpu_transport = %s\n", gpu_transport_names[c->cluster_gpu_transport]);
        }

        fprintf(f, "\n[metrics]\nlisten =%s%s\n", *c->metrics_listen ? " " : "", c->metrics_listen);

        if (fflush(f) != 0 || ferror(f))
                return -EIO;
        return 0;
}
