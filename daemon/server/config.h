/* The daemon configuration: an INI file plus drop-ins, parsed with libinih.
 *
 * For a main file PATH, every *.conf file in the directory PATH.d is applied
 * after it in lexical (strcmp) order; a value set later replaces an earlier
 * one, a list set later replaces the whole list.  A missing PATH.d is fine.
 *
 * Sections and keys are fixed: an unknown section or key is an error with
 * its file and line, and so is a value that fails its rule.  Keys that take
 * a list (model_roots, allow_uids, allow_gids, device_budgets, devices,
 * nodes) may continue on indented lines; other keys may not.  A line longer
 * than libinih's line buffer (198 bytes in Debian's build) is an error,
 * never split.
 *
 * [cluster] is optional: without any of its keys the daemon serves alone
 * (cluster_node NULL).  With any of them, node, nodes and secret_file are
 * required and node must be one of nodes; these rules span keys and files,
 * so they are checked once the main file and every drop-in have been read.
 * The secret file is read then too, from the secret_file that was set last.
 * Its bytes live in the Config only: config_dump() writes the path, never
 * the secret, and config_free() wipes it.
 *
 * The daemon's own uid and root are always allowed to connect: that is for the server
 * to add, allow_uids lists the others. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>

#include "cluster/lanes.h"
#include "store/loader.h"
#include "store/slab.h"
#include "util/error.h"
#include "macro.h"

/* Bounds and defaults. */
#define CONFIG_MAX_CONNECTIONS_DEFAULT 1024u
#define CONFIG_MAX_CONNECTIONS_PER_UID_DEFAULT 64u
#define CONFIG_MAX_PENDING_REQUESTS_DEFAULT 64u
#define CONFIG_MAX_FRAME_SIZE_DEFAULT (16ull << 20)
#define CONFIG_MAX_REQUEST_SIZE_DEFAULT (64ull << 10)
#define CONFIG_HELLO_TIMEOUT_DEFAULT 10u
#define CONFIG_FRAME_TIMEOUT_DEFAULT 10u
#define CONFIG_QUEUE_DEPTH_DEFAULT 32u
#define CONFIG_CHUNK_SIZE_DEFAULT (16ull << 20)
#define CONFIG_HOST_BUDGET_DEFAULT "50%"
#define CONFIG_HUGETLB_RESERVE_AUTO UINT64_MAX
#define CONFIG_MODEL_ROOT_DEFAULT "/srv/models"
#define CONFIG_FILE_MAX (1u << 20) /* bytes in one file */
#define CONFIG_GPU_BUDGET_DEFAULT "90%"
#define CONFIG_GPU_MAX_DEVICES 64u
#define CONFIG_CLUSTER_DEADLINE_DEFAULT_USEC (10ull * 1000000u)
#define CONFIG_CLUSTER_DEADLINE_MIN_USEC (100ull * 1000u)
#define CONFIG_CLUSTER_DEADLINE_MAX_USEC (3600ull * 1000000u)
#define CONFIG_CLUSTER_NODES_MAX 1024u
#define CONFIG_CLUSTER_NODE_NAME_MAX 63u  /* bytes */
#define CONFIG_CLUSTER_SECRET_MIN 16u     /* bytes, after trimming */
#define CONFIG_CLUSTER_SECRET_MAX 4096u   /* bytes of the file */
#define CONFIG_METRICS_LISTEN_DEFAULT "127.0.0.1:9471"

/* A budget as written: a percentage (of RAM, of a device's memory) or bytes. */
typedef struct ConfigBudget {
        bool percent;
        uint64_t value; /* 1..100 when percent, else bytes > 0 */
} ConfigBudget;

typedef struct ConfigDeviceBudget {
        unsigned device; /* the daemon's CUDA ordinal */
        ConfigBudget budget;
        char *spec;      /* as written */
} ConfigDeviceBudget;

/* One entry of [cluster] nodes: NAME=HOST:PORT. */
typedef struct ConfigClusterNode {
        char *name;    /* [A-Za-z0-9][A-Za-z0-9._-]{0,62} */
        char *host;    /* IPv4, IPv6 (written in brackets: [fd00::1]:7470; stored without) or host name */
        uint16_t port; /* 1..65535 */
} ConfigClusterNode;

typedef struct Config {
        char *path; /* main file, NULL for built-in defaults (and for config_load_string()) */

        /* [daemon] */
        char *socket;                     /* absolute path */
        char **model_roots;               /* absolute, normalised (no trailing '/', no '.' or '..'
                                           * components, no '//'), n_model_roots >= 1 entries */
        size_t n_model_roots;
        uid_t *allow_uids;                /* numbers or user names, resolved with getpwnam_r() */
        size_t n_allow_uids;
        gid_t *allow_gids;                /* numbers or group names, resolved with getgrnam_r() */
        size_t n_allow_gids;
        unsigned max_connections;         /* default 1024, 1..65536 */
        unsigned max_connections_per_uid; /* default 64, 1..65536 */
        unsigned max_pending_requests;    /* per connection, default 64, 1..4096 */
        uint64_t max_frame_size;          /* default 16M, 4K..256M: the bound on replies, which the
                                           * client library reads */
        uint64_t max_request_size;        /* default 64K, 1K..16M: the largest frame a peer may send,
                                           * which HelloReply.max_frame_size reports */
        unsigned hello_timeout;           /* seconds a new connection has to say Hello, default 10, 1..3600 */
        unsigned frame_timeout;           /* seconds a frame has to complete once its first byte came,
                                           * default 10, 1..3600 */
        int log_level;                    /* LOG_ERR..LOG_DEBUG of <syslog.h>; default LOG_INFO */

        /* [memory] */
        uint64_t host_budget;   /* resolved bytes */
        char *host_budget_spec; /* as written, e.g. "50%" or "64G" */
        SlabPages host_pages;   /* default SLAB_PAGES_AUTO */
        uint64_t hugetlb_reserve; /* bytes of 2 MiB hugetlb pages the daemon adds to the kernel's pool
                                   * for its slabs, at most the host budget: 0 (off), a size, or
                                   * CONFIG_HUGETLB_RESERVE_AUTO (the host budget); default auto */
        bool ready_after_touch;   /* READY=1 at start only once the pool added then is touched, default yes */

        /* [io] */
        unsigned queue_depth; /* default 32, 1..4096 */
        uint64_t chunk_size;  /* default 16M, multiple of 4096, 64K..1G */
        DirectMode direct_io; /* default DIRECT_AUTO */

        /* [gpu] */
        ConfigBudget gpu_budget;           /* every device's, default 90% of its memory */
        char *gpu_budget_spec;             /* as written */
        ConfigDeviceBudget *device_budgets; /* "N:SPEC, ..." overrides per device; later ones win */
        size_t n_device_budgets;
        bool keep_host;                    /* keep the host copy after a device load, default yes */
        unsigned *gpu_devices;             /* the ordinals to serve; none: all */
        size_t n_gpu_devices;

        /* [cluster] */
        char *cluster_node;               /* NULL: no cluster configured (the default) */
        ConfigClusterNode *cluster_nodes; /* configured order; names unique, (host, port) unique */
        size_t n_cluster_nodes;
        char *cluster_secret_file;        /* absolute path */
        uint8_t *cluster_secret;          /* its bytes, read when the file is loaded (trailing newline/whitespace
                                           * trimmed); CONFIG_CLUSTER_SECRET_MIN..MAX; never dumped or logged */
        size_t cluster_secret_len;
        uint64_t cluster_deadline_usec;   /* heartbeats and every transfer step; default 10 s, 100ms..1h */
        bool cluster_peer_fetch;          /* fetch from nodes that hold a component before storage; default yes */
        LanesTransport cluster_gpu_transport; /* device plans GPU to GPU: auto (default), nccl, host */

        /* [metrics] */
        char *metrics_listen;  /* as written, "" when off; default CONFIG_METRICS_LISTEN_DEFAULT */
        char *metrics_host;    /* an IPv4 or IPv6 address (without brackets); NULL when off */
        uint16_t metrics_port; /* 0: any free port */
} Config;

/* Built-in defaults.  socket: /run/weightd/weightd.sock when geteuid() is 0,
 * else $XDG_RUNTIME_DIR/weightd/weightd.sock, else
 * /tmp/weightd-<uid>/weightd.sock.  model_roots: /srv/models.  host_budget:
 * 50% of MemTotal (sysinfo()).  Returns 0 or -errno with err filled. */
int config_new_default(Config **ret, WdError *err);

/* Defaults, then path, then the drop-ins in path.d.  path NULL gives the defaults.
 * Returns 0; WD_E_INVALID with err->message "FILE:LINE: [section] key:
 * reason" (e.g. "/etc/weightd/weightd.conf:7: [io] queue_depth: \"0\" is
 * not in 1..4096"), "FILE:LINE: [section]: reason", "FILE: [cluster]:
 * reason" for a rule across keys (FILE being path) or "FILE: reason" for a
 * file that is not a regular file; or -errno with err filled, e.g. "FILE:
 * cannot open: No such file or directory" (-ENOENT), a user name lookup that
 * failed in NSS, a secret file that cannot be opened or read ("FILE:LINE:
 * [cluster] secret_file: cannot open ...", FILE:LINE where secret_file was
 * set), -EFBIG for a file over CONFIG_FILE_MAX.  On failure *ret is not
 * written and nothing is left behind. */
int config_load(const char *path, Config **ret, WdError *err);

/* The same for a buffer (len bytes, NUL bytes are refused), without
 * drop-ins; display names it in messages ("<string>" when NULL).  A
 * secret_file in it is read like config_load() reads it. */
int config_load_string(const char *text, size_t len, const char *display, Config **ret, WdError *err);

Config *config_free(Config *c);
DEFINE_TRIVIAL_CLEANUP_FUNC(Config *, config_free);

/* Whether two configurations have the same effective values (path is not
 * compared; host_budget_spec is, and so are the cluster secret's bytes: a
 * rewritten key file is a change). */
bool config_equal(const Config *a, const Config *b);

/* Write the effective configuration as INI, every key, for `weightd
 * --check-config` and logs; [cluster] as a comment when no cluster is
 * configured, and its secret_file but never the secret.  The output loads
 * back to an equal Config (while the secret file holds the same bytes).
 * Returns 0 or -errno (-EIO when the stream reports an error). */
int config_dump(const Config *c, FILE *f);

/* The byte budget of device ordinal (total bytes of memory): its
 * device_budgets entry if any, else budget. */
uint64_t config_gpu_budget(const Config *c, unsigned ordinal, uint64_t total);

/* "err", "warning", "notice", "info", "debug" for LOG_ERR..LOG_DEBUG; NULL
 * for other levels. */
const char *config_log_level_to_string(int level);
/* The syslog level for such a name, or -EINVAL. */
int config_log_level_from_string(const char *s);
