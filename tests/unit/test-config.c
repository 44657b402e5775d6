/* The configuration parser: every key with good and bad values (the exact
 * FILE:LINE message for each bad one), defaults, drop-in order, sections,
 * libinih's corners (continuation lines, long lines, comments), names
 * resolved through NSS, [cluster] with its secret file, and config_dump()
 * loading back to an equal Config.
 *
 * argv[1] is the shipped conf/weightd.conf, which must mean "defaults". */
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <sys/stat.h>
#include <syslog.h>

#include "server/config.h"
#include "test-util.h"
#include "util/fs-util.h"

static const char *shipped_conf;

/* MemTotal from /proc/meminfo, in bytes: the independent reference for the
 * percentage budgets. */
static uint64_t meminfo_total(void) {
        FILE *f = fopen("/proc/meminfo", "re");
        unsigned long long kb = 0;
        char line[256];

        assert_non_null(f);
        while (fgets(line, sizeof(line), f))
                if (sscanf(line, "MemTotal: %llu kB", &kb) == 1)
                        break;
        fclose(f);
        assert_true(kb > 0);
        return (uint64_t) kb * 1024;
}

static Config *load_ok(const char *text) {
        Config *c = NULL;
        WdError err = WD_ERROR_NULL;
        int r;

        r = config_load_string(text, strlen(text), "test.conf", &c, &err);
        if (r != 0)
                fail_msg("unexpected error %d for:\n%s\n%s", r, text, err.message);
        assert_non_null(c);
        return c;
}

/* text must fail with code and exactly message; *ret is not written. */
static void load_bad_len(const char *text, size_t len, int code, const char *message) {
        Config *sentinel = (Config *) (uintptr_t) 0x5a5a, *c = sentinel;
        WdError err = WD_ERROR_NULL;
        int r;

        r = config_load_string(text, len, "test.conf", &c, &err);
        if (r != code || strcmp(err.message, message) != 0)
                fail_msg("for:\n%s\nexpected %d \"%s\"\n     got %d \"%s\"", text, code, message, r, err.message);
        assert_int_equal(err.code, code);
        assert_ptr_equal(c, sentinel);
}

static void load_bad(const char *text, const char *message) {
        load_bad_len(text, strlen(text), WD_E_INVALID, message);
}

static void write_text(const char *dir, const char *name, const char *text) {
        char *p = path_join(dir, name);
        FILE *f;

        assert_non_null(p);
        f = fopen(p, "we");
        assert_non_null(f);
        assert_int_equal(fputs(text, f) >= 0, 1);
        assert_int_equal(fclose(f), 0);
        free(p);
}

static char *expected_default_socket(void) {
        const char *xdg = getenv("XDG_RUNTIME_DIR");
        char *p = NULL;

        if (geteuid() == 0)
                return strdup("/run/weightd/weightd.sock");
        if (xdg && xdg[0] == '/' && strlen(xdg) + strlen("/weightd/weightd.sock") <= 107)
                assert_true(asprintf(&p, "%s/weightd/weightd.sock", xdg) > 0);
        else
                assert_true(asprintf(&p, "/tmp/weightd-%u/weightd.sock", (unsigned) geteuid()) > 0);
        return p;
}

static void assert_defaults(const Config *c) {
        _cleanup_free_ char *sock = expected_default_socket();

        assert_string_equal(c->socket, sock);
        assert_int_equal(c->n_model_roots, 1);
        assert_string_equal(c->model_roots[0], "/srv/models");
        assert_int_equal(c->n_allow_uids, 0);
        assert_int_equal(c->n_allow_gids, 0);
        assert_int_equal(c->max_connections, 1024);
        assert_int_equal(c->max_connections_per_uid, 64);
        assert_int_equal(c->max_pending_requests, 64);
        assert_int_equal(c->hello_timeout, 10);
        assert_int_equal(c->frame_timeout, 10);
        assert_int_equal(c->max_frame_size, 16u << 20);
        assert_int_equal(c->max_request_size, 64u << 10);
        assert_int_equal(c->log_level, LOG_INFO);
        assert_string_equal(c->host_budget_spec, "50%");
        assert_int_equal(c->host_budget, meminfo_total() * 50 / 100);
        assert_int_equal(c->host_pages, SLAB_PAGES_AUTO);
        assert_int_equal(c->queue_depth, 32);
        assert_int_equal(c->chunk_size, 16u << 20);
        assert_int_equal(c->direct_io, DIRECT_AUTO);
        assert_null(c->cluster_node);
        assert_null(c->cluster_nodes);
        assert_int_equal(c->n_cluster_nodes, 0);
        assert_null(c->cluster_secret_file);
        assert_null(c->cluster_secret);
        assert_int_equal(c->cluster_secret_len, 0);
        assert_int_equal(c->cluster_deadline_usec, 10000000);
        assert_true(c->cluster_peer_fetch);
}

static void test_defaults(void **state) {
        _cleanup_(config_freep) Config *c = NULL, *d = NULL, *e = NULL;
        WdError err = WD_ERROR_NULL;

        assert_int_equal(config_new_default(&c, &err), 0);
        assert_null(c->path);
        assert_defaults(c);

        assert_int_equal(config_load(NULL, &d, &err), 0);
        assert_null(d->path);
        assert_true(config_equal(c, d));

        /* An empty file, and one with sections but no keys, mean defaults. */
        e = load_ok("");
        assert_true(config_equal(c, e));
        e = config_free(e);
        e = load_ok("; nothing\n\n[daemon]\n[memory]\n# nothing either\n[io]\n[gpu]\n[cluster]\n");
        assert_true(config_equal(c, e));
}

static char *saved_xdg;
static bool saved_xdg_set;

static int save_env(void **state) {
        const char *old = getenv("XDG_RUNTIME_DIR");

        saved_xdg_set = old != NULL;
        saved_xdg = old ? strdup(old) : NULL;
        return 0;
}

/* Back to root and the old $XDG_RUNTIME_DIR, also when a check failed. */
static int restore_env(void **state) {
        if (getuid() == 0 && geteuid() != 0 && seteuid(0) < 0)
                return -1;
        if (saved_xdg_set)
                setenv("XDG_RUNTIME_DIR", saved_xdg, 1);
        else
                unsetenv("XDG_RUNTIME_DIR");
        free(saved_xdg);
        saved_xdg = NULL;
        return 0;
}

/* The socket of a user other than root: $XDG_RUNTIME_DIR or /tmp.  Run as
 * root, the test switches its effective uid to 65534 for this. */
static void test_default_socket_user(void **state) {
        char long_dir[128];
        Config *c = NULL;

        if (geteuid() == 0 && seteuid(65534) < 0)
                skip();
        setenv("XDG_RUNTIME_DIR", "/run/user/4242/", 1);
        assert_int_equal(config_new_default(&c, NULL), 0);
        assert_string_equal(c->socket, "/run/user/4242/weightd/weightd.sock");
        c = config_free(c);

        unsetenv("XDG_RUNTIME_DIR");
        assert_int_equal(config_new_default(&c, NULL), 0);
        {
                char want[64];

                snprintf(want, sizeof(want), "/tmp/weightd-%u/weightd.sock", (unsigned) geteuid());
                assert_string_equal(c->socket, want);
                c = config_free(c);

                setenv("XDG_RUNTIME_DIR", "relative/dir", 1);
                assert_int_equal(config_new_default(&c, NULL), 0);
                assert_string_equal(c->socket, want);
                c = config_free(c);

                /* Too long for sun_path with the suffix: /tmp instead. */
                memset(long_dir, 'x', sizeof(long_dir) - 1);
                long_dir[0] = '/';
                long_dir[100] = '\0';
                setenv("XDG_RUNTIME_DIR", long_dir, 1);
                assert_int_equal(config_new_default(&c, NULL), 0);
                assert_string_equal(c->socket, want);
                c = config_free(c);
        }
}

static void test_shipped_conf(void **state) {
        _cleanup_(config_freep) Config *c = NULL, *d = NULL;
        WdError err = WD_ERROR_NULL;
        int r;

        if (!shipped_conf)
                skip();
        r = config_load(shipped_conf, &c, &err);
        if (r != 0)
                fail_msg("%s", err.message);
        assert_string_equal(c->path, shipped_conf);
        assert_int_equal(config_new_default(&d, &err), 0);
        assert_true(config_equal(c, d));
}

static void test_daemon_keys(void **state) {
        _cleanup_(config_freep) Config *c = NULL;
        char text[512], path[128];

        c = load_ok("[daemon]\n"
                    "socket = /tmp/wd-test/weightd.sock\n"
                    "model_roots = /srv/a : /srv//b/./c/\n"
                    "allow_uids = 0, 1000,65534 ,4294967294\n"
                    "allow_gids = 0,100\n"
                    "max_connections = 1\n"
                    "max_connections_per_uid = 65536\n"
                    "max_pending_requests = 4096\n"
                    "max_frame_size = 4K\n"
                    "max_request_size = 1K\n"
                    "hello_timeout = 3600\n"
                    "frame_timeout = 1\n"
                    "log_level = debug\n");
        assert_string_equal(c->socket, "/tmp/wd-test/weightd.sock");
        assert_int_equal(c->n_model_roots, 2);
        assert_string_equal(c->model_roots[0], "/srv/a");
        assert_string_equal(c->model_roots[1], "/srv/b/c");
        assert_int_equal(c->n_allow_uids, 4);
        assert_int_equal(c->allow_uids[0], 0);
        assert_int_equal(c->allow_uids[1], 1000);
        assert_int_equal(c->allow_uids[2], 65534);
        assert_int_equal(c->allow_uids[3], 4294967294u);
        assert_int_equal(c->n_allow_gids, 2);
        assert_int_equal(c->allow_gids[0], 0);
        assert_int_equal(c->allow_gids[1], 100);
        assert_int_equal(c->max_connections, 1);
        assert_int_equal(c->max_connections_per_uid, 65536);
        assert_int_equal(c->max_pending_requests, 4096);
        assert_int_equal(c->max_frame_size, 4096);
        assert_int_equal(c->max_request_size, 1024);
        assert_int_equal(c->hello_timeout, 3600);
        assert_int_equal(c->frame_timeout, 1);
        assert_int_equal(c->log_level, LOG_DEBUG);
        c = config_free(c);

        c = load_ok("[daemon]\nmax_connections = 65536\nmax_connections_per_uid = 1\nmax_pending_requests = 1\n"
                    "max_frame_size = 256M\nmax_request_size = 16M\nframe_timeout = 3600\nallow_uids =\nallow_gids =\n");
        assert_int_equal(c->max_connections, 65536);
        assert_int_equal(c->max_connections_per_uid, 1);
        assert_int_equal(c->max_pending_requests, 1);
        assert_int_equal(c->max_frame_size, 256u << 20);
        assert_int_equal(c->max_request_size, 16u << 20);
        assert_int_equal(c->frame_timeout, 3600);
        assert_int_equal(c->n_allow_uids, 0);
        assert_int_equal(c->n_allow_gids, 0);
        c = config_free(c);

        c = load_ok("[daemon]\nmax_frame_size = 1m\n");
        assert_int_equal(c->max_frame_size, 1u << 20);
        c = config_free(c);
        c = load_ok("[daemon]\nmax_frame_size = 65536\n");
        assert_int_equal(c->max_frame_size, 65536);
        c = config_free(c);
        /* The two limits are independent: a request limit over the reply
         * limit is allowed. */
        c = load_ok("[daemon]\nmax_request_size = 1048577\nmax_frame_size = 4k\n");
        assert_int_equal(c->max_request_size, (1u << 20) + 1);
        assert_int_equal(c->max_frame_size, 4096);
        c = config_free(c);

        static const struct {
                const char *name;
                int level;
        } levels[] = {
                { "err", LOG_ERR },   { "warning", LOG_WARNING }, { "notice", LOG_NOTICE },
                { "info", LOG_INFO }, { "debug", LOG_DEBUG },
        };
        for (size_t i = 0; i < ELEMENTSOF(levels); i++) {
                snprintf(text, sizeof(text), "[daemon]\nlog_level = %s\n", levels[i].name);
                c = load_ok(text);
                assert_int_equal(c->log_level, levels[i].level);
                assert_string_equal(config_log_level_to_string(c->log_level), levels[i].name);
                c = config_free(c);
        }

        /* The longest socket path that fits sun_path: 107 bytes. */
        memset(path, 'a', sizeof(path));
        path[0] = '/';
        path[107] = '\0';
        snprintf(text, sizeof(text), "[daemon]\nsocket = %s\n", path);
        c = load_ok(text);
        assert_string_equal(c->socket, path);
        c = config_free(c);
        path[107] = 'a';
        path[108] = '\0';
        snprintf(text, sizeof(text), "[daemon]\nsocket = %s\n", path);
        {
                char msg[512];

                snprintf(msg, sizeof(msg), "test.conf:2: [daemon] socket: \"%s\" is longer than 107 bytes", path);
                load_bad(text, msg);
        }
}

static void test_memory_keys(void **state) {
        _cleanup_(config_freep) Config *c = NULL;
        static const unsigned pcts[] = { 1, 37, 50, 99, 100 };
        uint64_t total = meminfo_total();
        char text[128];

        for (size_t i = 0; i < ELEMENTSOF(pcts); i++) {
                snprintf(text, sizeof(text), "[memory]\nhost_budget = %u%%\n", pcts[i]);
                c = load_ok(text);
                assert_int_equal(c->host_budget, (uint64_t) ((unsigned __int128) total * pcts[i] / 100));
                snprintf(text, sizeof(text), "%u%%", pcts[i]);
                assert_string_equal(c->host_budget_spec, text);
                c = config_free(c);
        }
        c = load_ok("[memory]\nhost_budget = 64G\nhost_pages = hugetlb\n");
        assert_int_equal(c->host_budget, 64ull << 30);
        assert_string_equal(c->host_budget_spec, "64G");
        assert_int_equal(c->host_pages, SLAB_PAGES_HUGETLB);
        c = config_free(c);
        c = load_ok("[memory]\nhost_budget = 1\nhost_pages = small\n");
        assert_int_equal(c->host_budget, 1);
        assert_int_equal(c->host_pages, SLAB_PAGES_SMALL);
        c = config_free(c);
        c = load_ok("[memory]\nhost_pages = hugetlb\nhost_pages = auto\n");
        assert_int_equal(c->host_pages, SLAB_PAGES_AUTO);
}

static void test_hugetlb_reserve(void **state) {
        _cleanup_(config_freep) Config *c = NULL;

        c = load_ok("[memory]\n");
        assert_true(c->hugetlb_reserve == CONFIG_HUGETLB_RESERVE_AUTO);
        c = config_free(c);
        c = load_ok("[memory]\nhugetlb_reserve = off\n");
        assert_true(c->hugetlb_reserve == 0);
        c = config_free(c);
        c = load_ok("[memory]\nhugetlb_reserve = 4G\n");
        assert_true(c->hugetlb_reserve == 4ull << 30);
        c = config_free(c);
        c = load_ok("[memory]\nhugetlb_reserve = 2M\nhugetlb_reserve = auto\n");
        assert_true(c->hugetlb_reserve == CONFIG_HUGETLB_RESERVE_AUTO);
        load_bad("[memory]\nhugetlb_reserve = 3M\n",
                 "test.conf:2: [memory] hugetlb_reserve: \"3M\" is not a multiple of 2M (the huge page size)");
        load_bad("[memory]\nhugetlb_reserve = 0\n",
                 "test.conf:2: [memory] hugetlb_reserve: \"0\" is not auto, off or a positive size");
        load_bad("[memory]\nhugetlb_reserve = yes\n",
                 "test.conf:2: [memory] hugetlb_reserve: \"yes\" is not auto, off or a positive size");
}

static void test_ready_after_touch(void **state) {
        _cleanup_(config_freep) Config *c = NULL;

        c = load_ok("[memory]\n");
        assert_true(c->ready_after_touch);
        c = config_free(c);
        c = load_ok("[memory]\nready_after_touch = no\n");
        assert_false(c->ready_after_touch);
        c = config_free(c);
        c = load_ok("[memory]\nready_after_touch = no\nready_after_touch = yes\n");
        assert_true(c->ready_after_touch);
        load_bad("[memory]\nready_after_touch = later\n",
                 "test.conf:2: [memory] ready_after_touch: \"later\" is not one of yes, no");
}

static void test_io_keys(void **state) {
        _cleanup_(config_freep) Config *c = NULL;

        c = load_ok("[io]\nqueue_depth = 1\nchunk_size = 64K\ndirect_io = on\n");
        assert_int_equal(c->queue_depth, 1);
        assert_int_equal(c->chunk_size, 64u << 10);
        assert_int_equal(c->direct_io, DIRECT_ON);
        c = config_free(c);
        c = load_ok("[io]\nqueue_depth = 4096\nchunk_size = 1G\ndirect_io = off\n");
        assert_int_equal(c->queue_depth, 4096);
        assert_int_equal(c->chunk_size, 1u << 30);
        assert_int_equal(c->direct_io, DIRECT_OFF);
        c = config_free(c);
        c = load_ok("[io]\nchunk_size = 69632\ndirect_io = auto\n"); /* 17 * 4096 */
        assert_int_equal(c->chunk_size, 69632);
        assert_int_equal(c->direct_io, DIRECT_AUTO);
}

static void test_gpu_keys(void **state) {
        _cleanup_(config_freep) Config *c = NULL;

        /* Defaults: 90% of every device, keep the host copy, all devices. */
        c = load_ok("");
        assert_true(c->gpu_budget.percent);
        assert_int_equal(c->gpu_budget.value, 90);
        assert_string_equal(c->gpu_budget_spec, "90%");
        assert_true(c->keep_host);
        assert_int_equal(c->n_gpu_devices, 0);
        assert_int_equal(c->n_device_budgets, 0);
        assert_int_equal(config_gpu_budget(c, 0, 1000), 900);
        assert_int_equal(config_gpu_budget(c, 3, 143771287552ull), 129394158796ull);
        c = config_free(c);

        c = load_ok("[gpu]\nbudget = 40G\ndevice_budgets = 1:50%, 3:10G\n\t5:100%\nkeep_host = no\n"
                    "devices = 0, 1,3\n\t5\n");
        assert_false(c->gpu_budget.percent);
        assert_int_equal(c->gpu_budget.value, 40ull << 30);
        assert_int_equal(config_gpu_budget(c, 0, 80ull << 30), 40ull << 30);
        assert_int_equal(config_gpu_budget(c, 1, 80ull << 30), 40ull << 30);
        assert_int_equal(config_gpu_budget(c, 1, 1000), 500);
        assert_int_equal(config_gpu_budget(c, 3, 80ull << 30), 10ull << 30);
        assert_int_equal(config_gpu_budget(c, 5, 1000), 1000);
        assert_false(c->keep_host);
        assert_int_equal(c->n_gpu_devices, 4);
        assert_int_equal(c->gpu_devices[2], 3);
        assert_int_equal(c->gpu_devices[3], 5);
        assert_int_equal(c->n_device_budgets, 3);
        assert_string_equal(c->device_budgets[1].spec, "10G");
        c = config_free(c);

        /* A later value replaces the list; "all" and "" clear it. */
        c = load_ok("[gpu]\ndevices = 2\ndevices = all\nkeep_host = yes\ndevice_budgets = 0:1G\ndevice_budgets =\n");
        assert_int_equal(c->n_gpu_devices, 0);
        assert_int_equal(c->n_device_budgets, 0);
        assert_true(c->keep_host);
}

/* Every rule, with the message a user sees. */
static void test_bad_values(void **state) {
        static const struct {
                const char *text;
                const char *message;
        } cases[] = {
                /* [gpu] */
                { "[gpu]\nbudget = 0%\n", "test.conf:2: [gpu] budget: \"0%\" is not in 1%..100%" },
                { "[gpu]\nbudget = 101%\n", "test.conf:2: [gpu] budget: \"101%\" is not in 1%..100%" },
                { "[gpu]\nbudget = lots\n",
                  "test.conf:2: [gpu] budget: \"lots\" is not a size or a percentage of device memory" },
                { "[gpu]\nbudget = 0\n", "test.conf:2: [gpu] budget: \"0\" is not a positive size" },
                { "[gpu]\ndevice_budgets = 40G\n",
                  "test.conf:2: [gpu] device_budgets: \"40G\" is not DEVICE:BUDGET (e.g. 0:40G or 1:80%)" },
                { "[gpu]\ndevice_budgets = x:40G\n", "test.conf:2: [gpu] device_budgets: \"x\" is not a device number" },
                { "[gpu]\ndevice_budgets = 64:40G\n", "test.conf:2: [gpu] device_budgets: device \"64\" is not in 0..63" },
                { "[gpu]\ndevice_budgets = 0:40G, 0:50%\n", "test.conf:2: [gpu] device_budgets: device 0 is listed twice" },
                { "[gpu]\ndevice_budgets = 0:200%\n", "test.conf:2: [gpu] device_budgets: \"200%\" is not in 1%..100%" },
                { "[gpu]\nkeep_host = maybe\n", "test.conf:2: [gpu] keep_host: \"maybe\" is not one of yes, no" },
                { "[gpu]\ndevices = 0, 0\n", "test.conf:2: [gpu] devices: device 0 is listed twice" },
                { "[gpu]\ndevices = -1\n", "test.conf:2: [gpu] devices: \"-1\" is not a device number" },
                { "[gpu]\ndevices = 0,,1\n", "test.conf:2: [gpu] devices: empty item in \"0,,1\"" },
                { "[gpu]\nbudget = 1G\n\t2G\n",
                  "test.conf:3: [gpu] budget: indented line continues a key that takes a single value" },
                /* [daemon] socket */
                { "[daemon]\nsocket = run/x.sock\n", "test.conf:2: [daemon] socket: \"run/x.sock\" is not an absolute path" },
                { "[daemon]\nsocket =\n", "test.conf:2: [daemon] socket: \"\" is not an absolute path" },
                { "[daemon]\nsocket = /run/weightd/\n",
                  "test.conf:2: [daemon] socket: \"/run/weightd/\" ends with '/': it must name a socket, not a directory" },
                /* model_roots */
                { "[daemon]\nmodel_roots = srv/models\n",
                  "test.conf:2: [daemon] model_roots: \"srv/models\" is not an absolute path" },
                { "[daemon]\nmodel_roots = /a::/b\n", "test.conf:2: [daemon] model_roots: empty item in \"/a::/b\"" },
                { "[daemon]\nmodel_roots = /a:\n", "test.conf:2: [daemon] model_roots: empty item in \"/a:\"" },
                { "[daemon]\n\nmodel_roots =\n", "test.conf:3: [daemon] model_roots: no model root given" },
                { "[daemon]\nmodel_roots = /a/../b\n", "test.conf:2: [daemon] model_roots: \"/a/../b\" has a \"..\" component" },
                { "[daemon]\nmodel_roots = /\n",
                  "test.conf:2: [daemon] model_roots: \"/\" is the root directory, which cannot be a model root" },
                { "[daemon]\nmodel_roots = //./\n",
                  "test.conf:2: [daemon] model_roots: \"//./\" is the root directory, which cannot be a model root" },
                { "[daemon]\nmodel_roots = /a:/b:/a/\n", "test.conf:2: [daemon] model_roots: \"/a/\" is listed twice" },
                { "[daemon]\nmodel_roots = /srv/x //\n",
                  "test.conf:2: [daemon] model_roots: \"/srv/x //\": the last component ends with a blank" },
                /* allow_uids, allow_gids */
                { "[daemon]\nallow_uids = 0,,1\n", "test.conf:2: [daemon] allow_uids: empty item in \"0,,1\"" },
                { "[daemon]\nallow_uids = 0,\n", "test.conf:2: [daemon] allow_uids: empty item in \"0,\"" },
                { "[daemon]\nallow_uids = 4294967295\n",
                  "test.conf:2: [daemon] allow_uids: \"4294967295\" is not in 0..4294967294" },
                { "[daemon]\nallow_uids = 99999999999999999999\n",
                  "test.conf:2: [daemon] allow_uids: \"99999999999999999999\" is not in 0..4294967294" },
                { "[daemon]\nallow_uids = root, wd-no-such-user\n",
                  "test.conf:2: [daemon] allow_uids: unknown user \"wd-no-such-user\"" },
                { "[daemon]\nallow_gids = wd-no-such-group\n",
                  "test.conf:2: [daemon] allow_gids: unknown group \"wd-no-such-group\"" },
                { "[daemon]\nallow_gids = -1\n", "test.conf:2: [daemon] allow_gids: unknown group \"-1\"" },
                /* numbers */
                { "[daemon]\nmax_connections = 0\n", "test.conf:2: [daemon] max_connections: \"0\" is not in 1..65536" },
                { "[daemon]\nmax_connections = 65537\n",
                  "test.conf:2: [daemon] max_connections: \"65537\" is not in 1..65536" },
                { "[daemon]\nmax_connections = abc\n", "test.conf:2: [daemon] max_connections: \"abc\" is not a number" },
                { "[daemon]\nmax_connections = -1\n", "test.conf:2: [daemon] max_connections: \"-1\" is not a number" },
                { "[daemon]\nmax_connections = 1k\n", "test.conf:2: [daemon] max_connections: \"1k\" is not a number" },
                { "[daemon]\nmax_connections =\n", "test.conf:2: [daemon] max_connections: \"\" is not a number" },
                { "[daemon]\nmax_connections_per_uid = 0\n",
                  "test.conf:2: [daemon] max_connections_per_uid: \"0\" is not in 1..65536" },
                { "[daemon]\nmax_connections_per_uid = 65537\n",
                  "test.conf:2: [daemon] max_connections_per_uid: \"65537\" is not in 1..65536" },
                { "[daemon]\nhello_timeout = 0\n",
                  "test.conf:2: [daemon] hello_timeout: \"0\" is not in 1..3600" },
                { "[daemon]\nhello_timeout = 3601\n",
                  "test.conf:2: [daemon] hello_timeout: \"3601\" is not in 1..3600" },
                { "[daemon]\nmax_pending_requests = 0\n",
                  "test.conf:2: [daemon] max_pending_requests: \"0\" is not in 1..4096" },
                { "[daemon]\nmax_pending_requests = 4097\n",
                  "test.conf:2: [daemon] max_pending_requests: \"4097\" is not in 1..4096" },
                { "[daemon]\nmax_frame_size = 4095\n", "test.conf:2: [daemon] max_frame_size: \"4095\" is not in 4K..256M" },
                { "[daemon]\nmax_frame_size = 257M\n", "test.conf:2: [daemon] max_frame_size: \"257M\" is not in 4K..256M" },
                { "[daemon]\nmax_frame_size = 1X\n",
                  "test.conf:2: [daemon] max_frame_size: \"1X\" is not a size (a number with an optional K, M, G or T suffix)" },
                { "[daemon]\nmax_frame_size = 16777216T\n",
                  "test.conf:2: [daemon] max_frame_size: \"16777216T\" is not in 4K..256M" },
                { "[daemon]\nmax_request_size = 1023\n",
                  "test.conf:2: [daemon] max_request_size: \"1023\" is not in 1K..16M" },
                { "[daemon]\nmax_request_size = 16777217\n",
                  "test.conf:2: [daemon] max_request_size: \"16777217\" is not in 1K..16M" },
                { "[daemon]\nmax_request_size = 0\n", "test.conf:2: [daemon] max_request_size: \"0\" is not in 1K..16M" },
                { "[daemon]\nmax_request_size = 64 K\n",
                  "test.conf:2: [daemon] max_request_size: \"64 K\" is not a size (a number with an optional K, M, G or T suffix)" },
                { "[daemon]\nmax_request_size = 1G\n", "test.conf:2: [daemon] max_request_size: \"1G\" is not in 1K..16M" },
                { "[daemon]\nframe_timeout = 0\n", "test.conf:2: [daemon] frame_timeout: \"0\" is not in 1..3600" },
                { "[daemon]\nframe_timeout = 3601\n", "test.conf:2: [daemon] frame_timeout: \"3601\" is not in 1..3600" },
                { "[daemon]\nframe_timeout = 10s\n", "test.conf:2: [daemon] frame_timeout: \"10s\" is not a number" },
                { "[daemon]\nlog_level = verbose\n",
                  "test.conf:2: [daemon] log_level: \"verbose\" is not one of err, warning, notice, info, debug" },
                { "[daemon]\nlog_level = INFO\n",
                  "test.conf:2: [daemon] log_level: \"INFO\" is not one of err, warning, notice, info, debug" },
                /* [memory] */
                { "[memory]\nhost_budget = 0%\n", "test.conf:2: [memory] host_budget: \"0%\" is not in 1%..100%" },
                { "[memory]\nhost_budget = 101%\n", "test.conf:2: [memory] host_budget: \"101%\" is not in 1%..100%" },
                { "[memory]\nhost_budget = %\n", "test.conf:2: [memory] host_budget: \"%\" is not a size or a percentage of RAM" },
                { "[memory]\nhost_budget = 50 %\n",
                  "test.conf:2: [memory] host_budget: \"50 %\" is not a size or a percentage of RAM" },
                { "[memory]\nhost_budget = 1.5G\n",
                  "test.conf:2: [memory] host_budget: \"1.5G\" is not a size or a percentage of RAM" },
                { "[memory]\nhost_budget = 0\n", "test.conf:2: [memory] host_budget: \"0\" is not a positive size" },
                { "[memory]\nhost_budget = 16777216T\n", "test.conf:2: [memory] host_budget: \"16777216T\" is too large" },
                { "[memory]\nhost_budget =\n", "test.conf:2: [memory] host_budget: \"\" is not a size or a percentage of RAM" },
                { "[memory]\nhost_pages = huge\n",
                  "test.conf:2: [memory] host_pages: \"huge\" is not one of auto, hugetlb, small" },
                /* [io] */
                { "[io]\nqueue_depth = 0\n", "test.conf:2: [io] queue_depth: \"0\" is not in 1..4096" },
                { "[io]\nqueue_depth = 4097\n", "test.conf:2: [io] queue_depth: \"4097\" is not in 1..4096" },
                { "[io]\nqueue_depth = 1.5\n", "test.conf:2: [io] queue_depth: \"1.5\" is not a number" },
                { "[io]\nchunk_size = 32K\n", "test.conf:2: [io] chunk_size: \"32K\" is not in 64K..1G" },
                { "[io]\nchunk_size = 2G\n", "test.conf:2: [io] chunk_size: \"2G\" is not in 64K..1G" },
                { "[io]\nchunk_size = 100000\n", "test.conf:2: [io] chunk_size: \"100000\" is not a multiple of 4096" },
                { "[io]\ndirect_io = yes\n", "test.conf:2: [io] direct_io: \"yes\" is not one of auto, on, off" },
                /* '#' starts a comment only at the start of a line */
                { "[io]\nqueue_depth = 8 # eight\n", "test.conf:2: [io] queue_depth: \"8 # eight\" is not a number" },
                /* the message quotes control characters escaped */
                { "[io]\nqueue_depth = 1\x01\n", "test.conf:2: [io] queue_depth: \"1\\x01\" is not a number" },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++)
                load_bad(cases[i].text, cases[i].message);
}

static void test_sections_and_keys(void **state) {
        load_bad("[io]\nqueue = 1\n", "test.conf:2: [io] queue: unknown key");
        load_bad("[io]\nsocket = /x\n", "test.conf:2: [io] socket: unknown key");
        load_bad("[daemon]\nsocket = /x\n\n[foo]\n", "test.conf:4: [foo]: unknown section");
        load_bad("[IO]\nqueue_depth = 1\n", "test.conf:1: [IO]: unknown section");
        load_bad("[ io ]\n", "test.conf:1: [ io ]: unknown section");
        load_bad("[io]\n[gpu]\nqueue_depth = 1\n", "test.conf:3: [gpu] queue_depth: unknown key");
        load_bad("[cluster]\nnodes = 2\n",
                 "test.conf:2: [cluster] nodes: \"2\" is not NAME=HOST:PORT (e.g. a=10.0.0.1:7470)");
        load_bad("[cluster]\nsecret = x\n", "test.conf:2: [cluster] secret: unknown key");
        load_bad("[Cluster]\n", "test.conf:1: [Cluster]: unknown section");
        load_bad("queue_depth = 1\n", "test.conf:1: queue_depth: key outside of any section");
        load_bad("[io]\nqueue_depth\n",
                 "test.conf:2: syntax error: expected \"key = value\", \"[section]\" or a comment");
        /* libinih's error on an earlier line comes first. */
        load_bad("[io]\nqueue_depth\nqueue_depth = 0\n",
                 "test.conf:2: syntax error: expected \"key = value\", \"[section]\" or a comment");
        load_bad("[io\n", "test.conf:1: syntax error: \"[\" without \"]\"");
        load_bad("[io] x\n", "test.conf:1: [io]: text after the section header");
        load_bad("[io]\nqueue_depth = 1\n  2\n",
                 "test.conf:3: [io] queue_depth: indented line continues a key that takes a single value");
        /* After a key, an indented key line is a continuation of it. */
        load_bad("[io]\nqueue_depth = 1\n  chunk_size = 1M\n",
                 "test.conf:3: [io] queue_depth: indented line continues a key that takes a single value");
        load_bad("[io]\nweird\x7fname = 1\n", "test.conf:2: [io] weird\\x7fname: unknown key");
}

static void test_syntax(void **state) {
        _cleanup_(config_freep) Config *c = NULL;
        char text[512], msg[256];
        size_t n;

        /* " ;" starts an inline comment; ';' without a blank before it does
         * not.  '#' and ';' start a comment at the start of a line, also
         * indented. */
        c = load_ok("# comment\n; comment\n[io] ; comment\nqueue_depth = 8 ; eight\n  ; indented comment\n"
                    "[daemon]\nsocket = /run/a;b ; the socket\n");
        assert_int_equal(c->queue_depth, 8);
        assert_string_equal(c->socket, "/run/a;b");
        c = config_free(c);

        /* A key given twice: the last one wins, lists included. */
        c = load_ok("[io]\nqueue_depth = 1\nqueue_depth = 2\n[daemon]\nmodel_roots = /a:/b\nallow_uids = 1, 2\n"
                    "[io]\nqueue_depth = 3\n[daemon]\nmodel_roots = /c\nallow_uids =\n");
        assert_int_equal(c->queue_depth, 3);
        assert_int_equal(c->n_model_roots, 1);
        assert_string_equal(c->model_roots[0], "/c");
        assert_int_equal(c->n_allow_uids, 0);
        c = config_free(c);

        /* A UTF-8 BOM, CRLF line ends, blanks around '=', no final newline. */
        c = load_ok("\xEF\xBB\xBF[io]\r\nqueue_depth=7\r\nchunk_size\t=   1M\r\n\r\n[daemon]\r\nlog_level = err");
        assert_int_equal(c->queue_depth, 7);
        assert_int_equal(c->chunk_size, 1u << 20);
        assert_int_equal(c->log_level, LOG_ERR);
        c = config_free(c);

        /* The first key of a section may be indented (there is nothing to
         * continue yet). */
        c = load_ok("[io]\n  queue_depth = 6\n");
        assert_int_equal(c->queue_depth, 6);
        c = config_free(c);

        /* A NUL byte is refused, not taken as the end of the text. */
        load_bad_len("[io]\nqueue_depth = 1\0\n", 21, WD_E_INVALID, "test.conf:2: NUL byte in the line");
        load_bad_len("[io]\n\0", 6, WD_E_INVALID, "test.conf:2: NUL byte in the line");

        /* 198 bytes fit libinih's buffer; 199 would be split into two lines
         * by libinih, so they are refused. */
        memset(text, 0, sizeof(text));
        strcpy(text, "[daemon]\n#");
        n = strlen(text);
        memset(text + n, 'x', 197);
        strcat(text, "\n[io]\nqueue_depth = 5\n");
        c = load_ok(text);
        assert_int_equal(c->queue_depth, 5);
        c = config_free(c);
        strcpy(text, "[daemon]\n#");
        memset(text + n, 'x', 198);
        text[n + 198] = '\0';
        strcat(text, "\nqueue_depth = 5\n");
        load_bad(text, "test.conf:2: line longer than 198 bytes");
        /* Also the last line, without a newline. */
        strcpy(text, "[daemon]\nsocket = /");
        n = strlen(text);
        memset(text + n, 's', 199 - n + 9);
        text[9 + 199] = '\0';
        assert_int_equal(strlen(text) - 9, 199);
        load_bad(text, "test.conf:2: line longer than 198 bytes");

        /* Messages name the file given as display; NULL gives "<string>". */
        {
                Config *d = NULL;
                WdError err = WD_ERROR_NULL;

                assert_int_equal(config_load_string("[x]\n", 4, NULL, &d, &err), WD_E_INVALID);
                assert_string_equal(err.message, "<string>:1: [x]: unknown section");
                assert_null(d);
        }
        snprintf(msg, sizeof(msg), "test.conf: larger than %u bytes", CONFIG_FILE_MAX);
        {
                char *big = calloc(1, CONFIG_FILE_MAX + 2);

                assert_non_null(big);
                memset(big, '\n', CONFIG_FILE_MAX + 1);
                load_bad_len(big, CONFIG_FILE_MAX + 1, -EFBIG, msg);
                /* Exactly the limit is fine. */
                big[CONFIG_FILE_MAX] = '\0';
                c = load_ok(big);
                c = config_free(c);
                free(big);
        }
}

/* Keys that take a list continue on indented lines. */
static void test_continuation(void **state) {
        _cleanup_(config_freep) Config *c = NULL;

        c = load_ok("[daemon]\n"
                    "model_roots =\n"
                    "    /m1\n"
                    "# a comment between\n"
                    "\n"
                    "    /m2 : /m3 ; a comment on a continuation line\n"
                    "allow_uids = 1, 2 ; two\n"
                    "\t3 ;three\n"
                    "allow_gids =\n"
                    " 4,5\n"
                    "[io]\n"
                    "queue_depth = 9\n");
        assert_int_equal(c->n_model_roots, 3);
        assert_string_equal(c->model_roots[0], "/m1");
        assert_string_equal(c->model_roots[1], "/m2");
        assert_string_equal(c->model_roots[2], "/m3");
        assert_int_equal(c->n_allow_uids, 3);
        assert_int_equal(c->allow_uids[2], 3);
        assert_int_equal(c->n_allow_gids, 2);
        assert_int_equal(c->allow_gids[0], 4);
        assert_int_equal(c->allow_gids[1], 5);
        assert_int_equal(c->queue_depth, 9);

        load_bad("[daemon]\nmodel_roots = /a\n  /a\n", "test.conf:3: [daemon] model_roots: \"/a\" is listed twice");
        load_bad("[daemon]\nmodel_roots = /a\n  b\n", "test.conf:3: [daemon] model_roots: \"b\" is not an absolute path");
        load_bad("[daemon]\nallow_uids = 1\n  2,\n", "test.conf:3: [daemon] allow_uids: empty item in \"2,\"");
        /* An indented section header after a key is a continuation too. */
        load_bad("[daemon]\nmodel_roots = /a\n  [io]\n",
                 "test.conf:3: [daemon] model_roots: \"[io]\" is not an absolute path");
}

static void test_names(void **state) {
        _cleanup_(config_freep) Config *c = NULL;
        struct group *gr = getgrgid(0);
        struct passwd *pw = getpwuid(0);
        char text[256];

        assert_non_null(gr);
        assert_non_null(pw);
        snprintf(text, sizeof(text), "[daemon]\nallow_uids = %s, 7\nallow_gids = 8 , %s\n", pw->pw_name, gr->gr_name);
        c = load_ok(text);
        assert_int_equal(c->n_allow_uids, 2);
        assert_int_equal(c->allow_uids[0], 0);
        assert_int_equal(c->allow_uids[1], 7);
        assert_int_equal(c->n_allow_gids, 2);
        assert_int_equal(c->allow_gids[0], 8);
        assert_int_equal(c->allow_gids[1], 0);
        c = config_free(c);

        c = load_ok("[daemon]\nallow_uids = root\n");
        assert_int_equal(c->n_allow_uids, 1);
        assert_int_equal(c->allow_uids[0], 0);
        c = config_free(c);

        /* A name that starts with digits is a name, not a number. */
        load_bad("[daemon]\nallow_uids = 12wd-nobody\n", "test.conf:2: [daemon] allow_uids: unknown user \"12wd-nobody\"");
}

/* Files: the main one, its drop-ins in lexical order, and file errors. */
static void test_files(void **state) {
        _cleanup_free_ char *dir = make_temp_dir(NULL);
        _cleanup_free_ char *main_path = path_join(dir, "weightd.conf");
        _cleanup_free_ char *dropins = path_join(dir, "weightd.conf.d");
        _cleanup_(config_freep) Config *c = NULL;
        Config *sentinel = (Config *) (uintptr_t) 0x5a5a, *bad = sentinel;
        WdError err = WD_ERROR_NULL;
        char msg[1024];
        int r;

        /* No main file. */
        r = config_load(main_path, &bad, &err);
        assert_int_equal(r, -ENOENT);
        snprintf(msg, sizeof(msg), "%s: cannot open: No such file or directory", main_path);
        assert_string_equal(err.message, msg);
        assert_ptr_equal(bad, sentinel);

        /* A main file and no drop-in directory. */
        write_text(dir, "weightd.conf",
                   "[daemon]\nallow_uids = 1, 2\nlog_level = debug\n[io]\nqueue_depth = 2\nchunk_size = 1M\n");
        assert_int_equal(config_load(main_path, &c, &err), 0);
        assert_string_equal(c->path, main_path);
        assert_int_equal(c->queue_depth, 2);
        c = config_free(c);

        /* Drop-ins override in strcmp() order: "10-" < "2-" < "20-". */
        assert_int_equal(mkdir(dropins, 0755), 0);
        write_text(dropins, "10-a.conf", "[io]\nqueue_depth = 3\n[daemon]\nmodel_roots = /a\n");
        write_text(dropins, "2-z.conf", "[io]\nqueue_depth = 4\n");
        write_text(dropins, "20-b.conf", "[daemon]\nallow_uids = 5\n");
        write_text(dropins, "30-skip.txt", "[io]\nqueue_depth = 99\n");
        write_text(dropins, ".hidden.conf", "[io]\nqueue_depth = 98\n");
        write_text(dropins, "conf", "garbage\n");
        assert_int_equal(config_load(main_path, &c, &err), 0);
        assert_int_equal(c->queue_depth, 4);
        assert_int_equal(c->chunk_size, 1u << 20);
        assert_int_equal(c->log_level, LOG_DEBUG);
        assert_int_equal(c->n_model_roots, 1);
        assert_string_equal(c->model_roots[0], "/a");
        assert_int_equal(c->n_allow_uids, 1);
        assert_int_equal(c->allow_uids[0], 5);
        c = config_free(c);

        /* An error in a drop-in names the drop-in and its line. */
        write_text(dropins, "25-bad.conf", "[io]\n\nchunk_size = 3\n");
        bad = sentinel;
        assert_int_equal(config_load(main_path, &bad, &err), WD_E_INVALID);
        snprintf(msg, sizeof(msg), "%s/25-bad.conf:3: [io] chunk_size: \"3\" is not in 64K..1G", dropins);
        assert_string_equal(err.message, msg);
        assert_ptr_equal(bad, sentinel);

        /* A drop-in that is a directory, a dangling link. */
        write_text(dropins, "25-bad.conf", "\n");
        {
                _cleanup_free_ char *sub = path_join(dropins, "40-dir.conf");
                _cleanup_free_ char *link = path_join(dropins, "50-link.conf");

                assert_int_equal(mkdir(sub, 0755), 0);
                assert_int_equal(config_load(main_path, &bad, &err), WD_E_INVALID);
                snprintf(msg, sizeof(msg), "%s: not a regular file", sub);
                assert_string_equal(err.message, msg);
                assert_int_equal(rmdir(sub), 0);

                assert_int_equal(symlink("nowhere", link), 0);
                assert_int_equal(config_load(main_path, &bad, &err), -ENOENT);
                snprintf(msg, sizeof(msg), "%s: cannot open: No such file or directory", link);
                assert_string_equal(err.message, msg);
                assert_int_equal(unlink(link), 0);
                assert_ptr_equal(bad, sentinel);
        }

        /* An error in the main file: its line. */
        write_text(dir, "weightd.conf", "[daemon]\n\n\n\n\n\n[io]\nqueue_depth = 0\n");
        assert_int_equal(config_load(main_path, &bad, &err), WD_E_INVALID);
        snprintf(msg, sizeof(msg), "%s:8: [io] queue_depth: \"0\" is not in 1..4096", main_path);
        assert_string_equal(err.message, msg);

        /* The main path is a directory; the drop-in path is a file. */
        assert_int_equal(config_load(dir, &bad, &err), WD_E_INVALID);
        snprintf(msg, sizeof(msg), "%s: not a regular file", dir);
        assert_string_equal(err.message, msg);
        write_text(dir, "weightd.conf", "");
        remove_tree(dropins);
        write_text(dir, "weightd.conf.d", "");
        assert_int_equal(config_load(main_path, &bad, &err), -ENOTDIR);
        snprintf(msg, sizeof(msg), "%s: cannot open: Not a directory", dropins);
        assert_string_equal(err.message, msg);
        assert_ptr_equal(bad, sentinel);

        /* A FIFO is refused without blocking. */
        {
                _cleanup_free_ char *fifo = path_join(dir, "fifo.conf");

                assert_int_equal(mkfifo(fifo, 0600), 0);
                assert_int_equal(config_load(fifo, &bad, &err), WD_E_INVALID);
                snprintf(msg, sizeof(msg), "%s: not a regular file", fifo);
                assert_string_equal(err.message, msg);
        }
        remove_tree(dir);
}

/* A file of text with mode, created afresh (whatever the umask). */
static char *write_mode(const char *dir, const char *name, const char *text, mode_t mode) {
        char *p = path_join(dir, name);
        int fd;

        assert_non_null(p);
        (void) unlink(p);
        fd = open(p, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        assert_true(fd >= 0);
        assert_int_equal(write(fd, text, strlen(text)), (ssize_t) strlen(text));
        assert_int_equal(fchmod(fd, mode), 0);
        assert_int_equal(close(fd), 0);
        return p;
}

#define SECRET "0123456789abcdef twenty-six b"

static void test_cluster_keys(void **state) {
        _cleanup_free_ char *dir = make_temp_dir(NULL);
        _cleanup_free_ char *key = write_mode(dir, "cluster.key", SECRET "\n \t\r\n", 0600);
        _cleanup_(config_freep) Config *c = NULL;
        char text[1024];

        snprintf(text, sizeof(text),
                 "[cluster]\n"
                 "node = b\n"
                 "nodes = a=10.0.0.1:7470, b=10.0.0.2:7470,c=10.0.0.3:7470\n"
                 "secret_file = %s\n"
                 "deadline = 10s\n"
                 "peer_fetch = yes\n",
                 key);
        c = load_ok(text);
        assert_string_equal(c->cluster_node, "b");
        assert_int_equal(c->n_cluster_nodes, 3);
        assert_string_equal(c->cluster_nodes[0].name, "a");
        assert_string_equal(c->cluster_nodes[0].host, "10.0.0.1");
        assert_int_equal(c->cluster_nodes[0].port, 7470);
        assert_string_equal(c->cluster_nodes[1].name, "b");
        assert_string_equal(c->cluster_nodes[1].host, "10.0.0.2");
        assert_int_equal(c->cluster_nodes[1].port, 7470);
        assert_string_equal(c->cluster_nodes[2].name, "c");
        assert_string_equal(c->cluster_nodes[2].host, "10.0.0.3");
        assert_int_equal(c->cluster_nodes[2].port, 7470);
        assert_string_equal(c->cluster_secret_file, key);
        /* Trailing blanks and newlines are trimmed, inner ones kept. */
        assert_int_equal(c->cluster_secret_len, strlen(SECRET));
        assert_memory_equal(c->cluster_secret, SECRET, strlen(SECRET));
        assert_int_equal(c->cluster_deadline_usec, 10000000);
        assert_true(c->cluster_peer_fetch);
        /* The other sections keep their defaults. */
        assert_int_equal(c->queue_depth, 32);
        c = config_free(c);

        /* Only the three required keys: deadline and peer_fetch default.
         * IPv6 in brackets (stored without), host names, ports at the
         * bounds, names at their longest, continuation lines. */
        snprintf(text, sizeof(text),
                 "[cluster]\n"
                 "secret_file = %s\n"
                 "nodes =\n"
                 "  gpu-01.rack_2=[fd00::1]:1, x=[::ffff:10.0.0.1]:65535\n"
                 "\tN3=node-3.example.com:7470 ; a comment\n"
                 "  abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz0 = localhost:80\n"
                 "  v4=127.0.0.1:7471, same-host=127.0.0.1:7472, dup6=[fd00::1]:2\n"
                 "node = N3\n",
                 key);
        c = load_ok(text);
        assert_string_equal(c->cluster_node, "N3");
        assert_int_equal(c->n_cluster_nodes, 7);
        assert_string_equal(c->cluster_nodes[0].name, "gpu-01.rack_2");
        assert_string_equal(c->cluster_nodes[0].host, "fd00::1");
        assert_int_equal(c->cluster_nodes[0].port, 1);
        assert_string_equal(c->cluster_nodes[1].name, "x");
        assert_string_equal(c->cluster_nodes[1].host, "::ffff:10.0.0.1");
        assert_int_equal(c->cluster_nodes[1].port, 65535);
        assert_string_equal(c->cluster_nodes[2].name, "N3");
        assert_string_equal(c->cluster_nodes[2].host, "node-3.example.com");
        assert_int_equal(c->cluster_nodes[2].port, 7470);
        assert_int_equal(strlen(c->cluster_nodes[3].name), 63);
        assert_string_equal(c->cluster_nodes[3].host, "localhost");
        assert_int_equal(c->cluster_nodes[3].port, 80);
        assert_string_equal(c->cluster_nodes[4].host, "127.0.0.1");
        assert_int_equal(c->cluster_nodes[4].port, 7471);
        assert_string_equal(c->cluster_nodes[5].host, "127.0.0.1");
        assert_int_equal(c->cluster_nodes[5].port, 7472);
        assert_string_equal(c->cluster_nodes[6].host, "fd00::1");
        assert_int_equal(c->cluster_nodes[6].port, 2);
        assert_int_equal(c->cluster_deadline_usec, 10000000);
        assert_true(c->cluster_peer_fetch);
        c = config_free(c);

        static const struct {
                const char *value;
                uint64_t usec;
        } deadlines[] = {
                { "100ms", 100000 },     { "500ms", 500000 },           { "2m", 120000000 },
                { "2min", 120000000 },   { "1h", 3600000000ull },       { "100000us", 100000 },
                { "3599999999us", 3599999999ull }, { "60m", 3600000000ull },
        };
        for (size_t i = 0; i < ELEMENTSOF(deadlines); i++) {
                snprintf(text, sizeof(text),
                         "[cluster]\nnode = a\nnodes = a=h:1\nsecret_file = %s\ndeadline = %s\npeer_fetch = no\n", key,
                         deadlines[i].value);
                c = load_ok(text);
                assert_int_equal(c->cluster_deadline_usec, deadlines[i].usec);
                assert_false(c->cluster_peer_fetch);
                c = config_free(c);
        }

        /* A key given twice: the last one wins; nodes replaces the list. */
        snprintf(text, sizeof(text),
                 "[cluster]\nnode = a\nnodes = a=h:1, b=h:2\nsecret_file = /nonexistent\n[io]\n[cluster]\n"
                 "nodes = c=h:3\n  d=h:4\nnode = d\nsecret_file = %s\n",
                 key);
        c = load_ok(text);
        assert_string_equal(c->cluster_node, "d");
        assert_int_equal(c->n_cluster_nodes, 2);
        assert_string_equal(c->cluster_nodes[0].name, "c");
        assert_string_equal(c->cluster_nodes[1].name, "d");
        assert_string_equal(c->cluster_secret_file, key);
        c = config_free(c);

        /* Exactly 16 bytes, and a file of exactly 4096, are enough and not
         * too many. */
        {
                char big[4097];
                _cleanup_free_ char *k16 = write_mode(dir, "k16", "0123456789abcdef", 0400);
                _cleanup_free_ char *k4096 = NULL;

                memset(big, 'k', 4095);
                big[4095] = '\n';
                big[4096] = '\0';
                k4096 = write_mode(dir, "k4096", big, 0600);
                snprintf(text, sizeof(text), "[cluster]\nnode = a\nnodes = a=h:1\nsecret_file = %s\n", k16);
                c = load_ok(text);
                assert_int_equal(c->cluster_secret_len, 16);
                c = config_free(c);
                snprintf(text, sizeof(text), "[cluster]\nnode = a\nnodes = a=h:1\nsecret_file = %s\n", k4096);
                c = load_ok(text);
                assert_int_equal(c->cluster_secret_len, 4095);
                c = config_free(c);
        }
        remove_tree(dir);
}

#define NAME_RULE "(a letter or digit, then up to 62 letters, digits, '.', '_' or '-')"
#define REQUIRED "(node, nodes and secret_file are required once any [cluster] key is set)"
#define DURATION "is not a duration (a number and one of the units us, ms, s, m, h: e.g. 10s)"
#define NOT_HOST "is not a host name, an IPv4 address or an IPv6 address in brackets"

/* Every [cluster] rule, with the message a user sees. */
static void test_cluster_bad(void **state) {
        static const struct {
                const char *text;
                const char *message;
        } cases[] = {
                /* node */
                { "[cluster]\nnode = a b\n", "test.conf:2: [cluster] node: \"a b\" is not a node name " NAME_RULE },
                { "[cluster]\nnode =\n", "test.conf:2: [cluster] node: \"\" is not a node name " NAME_RULE },
                { "[cluster]\nnode = -a\n", "test.conf:2: [cluster] node: \"-a\" is not a node name " NAME_RULE },
                { "[cluster]\nnode = .a\n", "test.conf:2: [cluster] node: \".a\" is not a node name " NAME_RULE },
                { "[cluster]\nnode = abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz01\n",
                  "test.conf:2: [cluster] node: \"abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz01\" is "
                  "not a node name " NAME_RULE },
                { "[cluster]\nnode = a\n  b\n",
                  "test.conf:3: [cluster] node: indented line continues a key that takes a single value" },
                /* nodes */
                { "[cluster]\nnodes = a=10.0.0.1:7470, a=10.0.0.2:7470\n",
                  "test.conf:2: [cluster] nodes: node \"a\" is listed twice" },
                { "[cluster]\nnodes = a=10.0.0.1:7470\n  b=10.0.0.1:7470\n",
                  "test.conf:3: [cluster] nodes: nodes \"a\" and \"b\" have the same address" },
                { "[cluster]\nnodes = a=[fd00::1]:7470, b=[fd00:0:0::1]:7470\n",
                  "test.conf:2: [cluster] nodes: nodes \"a\" and \"b\" have the same address" },
                { "[cluster]\nnodes = a=Node.example:7470, b=node.EXAMPLE:7470\n",
                  "test.conf:2: [cluster] nodes: nodes \"a\" and \"b\" have the same address" },
                { "[cluster]\nnodes = 10.0.0.1:7470\n",
                  "test.conf:2: [cluster] nodes: \"10.0.0.1:7470\" is not NAME=HOST:PORT (e.g. a=10.0.0.1:7470)" },
                { "[cluster]\nnodes = a/b=10.0.0.1:7470\n",
                  "test.conf:2: [cluster] nodes: \"a/b\" is not a node name " NAME_RULE },
                { "[cluster]\nnodes = =10.0.0.1:7470\n", "test.conf:2: [cluster] nodes: \"\" is not a node name " NAME_RULE },
                { "[cluster]\nnodes = a=10.0.0.1\n",
                  "test.conf:2: [cluster] nodes: \"10.0.0.1\" has no port (HOST:PORT, e.g. 10.0.0.1:7470)" },
                { "[cluster]\nnodes = a=[fd00::1]\n",
                  "test.conf:2: [cluster] nodes: \"[fd00::1]\" has no port (HOST:PORT, e.g. [fd00::1]:7470)" },
                { "[cluster]\nnodes = a=[fd00::1]7470\n",
                  "test.conf:2: [cluster] nodes: \"[fd00::1]7470\" has no port (HOST:PORT, e.g. [fd00::1]:7470)" },
                { "[cluster]\nnodes = a=fd00::1:7470\n",
                  "test.conf:2: [cluster] nodes: \"fd00::1:7470\": an IPv6 address is written in brackets, e.g. "
                  "[fd00::1]:7470" },
                { "[cluster]\nnodes = a=[fd00::1:7470\n",
                  "test.conf:2: [cluster] nodes: \"[fd00::1:7470\": '[' without ']'" },
                { "[cluster]\nnodes = a=[10.0.0.1]:7470\n",
                  "test.conf:2: [cluster] nodes: \"10.0.0.1\" is not an IPv6 address" },
                { "[cluster]\nnodes = a=[fe80::1%eth0]:7470\n",
                  "test.conf:2: [cluster] nodes: \"fe80::1%eth0\" is not an IPv6 address" },
                { "[cluster]\nnodes = a=10.0.0.256:7470\n",
                  "test.conf:2: [cluster] nodes: \"10.0.0.256\" is not an IPv4 address" },
                { "[cluster]\nnodes = a=10.0.0:7470\n", "test.conf:2: [cluster] nodes: \"10.0.0\" is not an IPv4 address" },
                { "[cluster]\nnodes = a=010.0.0.1:7470\n",
                  "test.conf:2: [cluster] nodes: \"010.0.0.1\" is not an IPv4 address" },
                { "[cluster]\nnodes = a=bad_host:7470\n", "test.conf:2: [cluster] nodes: \"bad_host\" " NOT_HOST },
                { "[cluster]\nnodes = a=-x.example:7470\n", "test.conf:2: [cluster] nodes: \"-x.example\" " NOT_HOST },
                { "[cluster]\nnodes = a=x-.example:7470\n", "test.conf:2: [cluster] nodes: \"x-.example\" " NOT_HOST },
                { "[cluster]\nnodes = a=x..example:7470\n", "test.conf:2: [cluster] nodes: \"x..example\" " NOT_HOST },
                { "[cluster]\nnodes = a=example.:7470\n", "test.conf:2: [cluster] nodes: \"example.\" " NOT_HOST },
                { "[cluster]\nnodes = a=:7470\n", "test.conf:2: [cluster] nodes: \"\" " NOT_HOST },
                { "[cluster]\nnodes = a=10.0.0.1:0\n", "test.conf:2: [cluster] nodes: port \"0\" is not in 1..65535" },
                { "[cluster]\nnodes = a=10.0.0.1:65536\n",
                  "test.conf:2: [cluster] nodes: port \"65536\" is not in 1..65535" },
                { "[cluster]\nnodes = a=10.0.0.1:\n", "test.conf:2: [cluster] nodes: port \"\" is not a number" },
                { "[cluster]\nnodes = a=10.0.0.1:http\n", "test.conf:2: [cluster] nodes: port \"http\" is not a number" },
                { "[cluster]\nnodes = a=10.0.0.1:-1\n", "test.conf:2: [cluster] nodes: port \"-1\" is not a number" },
                { "[cluster]\nnodes = a=10.0.0.1:1,\n", "test.conf:2: [cluster] nodes: empty item in \"a=10.0.0.1:1,\"" },
                /* secret_file, deadline, peer_fetch */
                { "[cluster]\nsecret_file = etc/cluster.key\n",
                  "test.conf:2: [cluster] secret_file: \"etc/cluster.key\" is not an absolute path" },
                { "[cluster]\nsecret_file =\n", "test.conf:2: [cluster] secret_file: \"\" is not an absolute path" },
                { "[cluster]\ndeadline = 10\n", "test.conf:2: [cluster] deadline: \"10\" " DURATION },
                { "[cluster]\ndeadline = 1.5s\n", "test.conf:2: [cluster] deadline: \"1.5s\" " DURATION },
                { "[cluster]\ndeadline = 10 s\n", "test.conf:2: [cluster] deadline: \"10 s\" " DURATION },
                { "[cluster]\ndeadline = 1m30s\n", "test.conf:2: [cluster] deadline: \"1m30s\" " DURATION },
                { "[cluster]\ndeadline =\n", "test.conf:2: [cluster] deadline: \"\" " DURATION },
                { "[cluster]\ndeadline = 99ms\n", "test.conf:2: [cluster] deadline: \"99ms\" is not in 100ms..1h" },
                { "[cluster]\ndeadline = 99999us\n", "test.conf:2: [cluster] deadline: \"99999us\" is not in 100ms..1h" },
                { "[cluster]\ndeadline = 0s\n", "test.conf:2: [cluster] deadline: \"0s\" is not in 100ms..1h" },
                { "[cluster]\ndeadline = 3601s\n", "test.conf:2: [cluster] deadline: \"3601s\" is not in 100ms..1h" },
                { "[cluster]\ndeadline = 99999999999999999999h\n",
                  "test.conf:2: [cluster] deadline: \"99999999999999999999h\" is not in 100ms..1h" },
                { "[cluster]\npeer_fetch = sometimes\n",
                  "test.conf:2: [cluster] peer_fetch: \"sometimes\" is not one of yes, no" },
                /* Rules across keys: after the whole file. */
                { "[cluster]\ndeadline = 5s\n", "test.conf: [cluster]: node is not set " REQUIRED },
                { "[cluster]\npeer_fetch = no\nnode = a\n", "test.conf: [cluster]: nodes is not set or empty " REQUIRED },
                { "[cluster]\nnode = a\nnodes = a=h:1\nnodes =\nsecret_file = /k\n",
                  "test.conf: [cluster]: nodes is not set or empty " REQUIRED },
                { "[cluster]\nnode = a\nnodes = a=h:1\n", "test.conf: [cluster]: secret_file is not set " REQUIRED },
                { "[cluster]\nsecret_file = /k\n", "test.conf: [cluster]: node is not set " REQUIRED },
                { "[cluster]\nnode = d\nnodes = a=h:1, b=h:2, c=h:3\nsecret_file = /k\n",
                  "test.conf: [cluster]: node \"d\" is not one of nodes" },
                { "[cluster]\nnode = A\nnodes = a=h:1\nsecret_file = /k\n",
                  "test.conf: [cluster]: node \"A\" is not one of nodes" },
                /* A per-key error comes first. */
                { "[cluster]\nnode = d\nnodes = a=h:1\nsecret_file = k\n",
                  "test.conf:4: [cluster] secret_file: \"k\" is not an absolute path" },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++)
                load_bad(cases[i].text, cases[i].message);
}

/* The secret file: who may read it, what it is, how long. */
static void test_cluster_secret(void **state) {
        _cleanup_free_ char *dir = make_temp_dir(NULL);
        _cleanup_free_ char *good = write_mode(dir, "good.key", SECRET "\n", 0600);
        char text[1024], msg[1024], path[512];
        static const struct {
                mode_t mode;
                const char *verb;
        } modes[] = {
                { 0640, "read" },  { 0604, "read" },    { 0644, "read" },    { 0620, "write" },
                { 0602, "write" }, { 0610, "execute" }, { 0601, "execute" }, { 0660, "read" },
        };

#define LOAD_SECRET(p) snprintf(text, sizeof(text), "[cluster]\nnode = a\nnodes = a=h:1\n\nsecret_file = %s\n", (p))

        /* Group and other bits: refused with the mode found. */
        for (size_t i = 0; i < ELEMENTSOF(modes); i++) {
                _cleanup_free_ char *k = write_mode(dir, "mode.key", SECRET, modes[i].mode);

                LOAD_SECRET(k);
                snprintf(msg, sizeof(msg),
                         "test.conf:5: [cluster] secret_file: \"%s\": mode %04o lets others %s it; chmod 600", k,
                         (unsigned) modes[i].mode, modes[i].verb);
                load_bad(text, msg);
        }
        /* Owner-only modes are fine. */
        {
                static const mode_t ok[] = { 0600, 0400, 0700, 0200 };

                for (size_t i = 0; i < ELEMENTSOF(ok); i++) {
                        _cleanup_free_ char *k = write_mode(dir, "ok.key", SECRET, ok[i]);
                        Config *c;

                        LOAD_SECRET(k);
                        c = load_ok(text);
                        assert_int_equal(c->cluster_secret_len, strlen(SECRET));
                        config_free(c);
                }
        }

        /* A symbolic link, even to a good file. */
        snprintf(path, sizeof(path), "%s/link.key", dir);
        assert_int_equal(symlink(good, path), 0);
        LOAD_SECRET(path);
        snprintf(msg, sizeof(msg), "test.conf:5: [cluster] secret_file: \"%s\" is a symbolic link; name the file itself",
                 path);
        load_bad(text, msg);

        /* Too short once trimmed; empty. */
        {
                _cleanup_free_ char *k = write_mode(dir, "short.key", "0123456789abcde\n\n  \n", 0600);
                _cleanup_free_ char *e = write_mode(dir, "empty.key", "", 0600);

                LOAD_SECRET(k);
                snprintf(msg, sizeof(msg),
                         "test.conf:5: [cluster] secret_file: \"%s\" holds 15 bytes without its trailing blanks and "
                         "newlines, fewer than 16",
                         k);
                load_bad(text, msg);
                LOAD_SECRET(e);
                snprintf(msg, sizeof(msg),
                         "test.conf:5: [cluster] secret_file: \"%s\" holds 0 bytes without its trailing blanks and "
                         "newlines, fewer than 16",
                         e);
                load_bad(text, msg);
        }

        /* Too long: 4097 bytes, even when most of them would be trimmed. */
        {
                char big[4098];
                _cleanup_free_ char *k = NULL;

                memset(big, '\n', 4097);
                memcpy(big, SECRET, strlen(SECRET));
                big[4097] = '\0';
                k = write_mode(dir, "big.key", big, 0600);
                LOAD_SECRET(k);
                snprintf(msg, sizeof(msg), "test.conf:5: [cluster] secret_file: \"%s\" is larger than 4096 bytes", k);
                load_bad(text, msg);
        }

        /* Missing, a directory, a FIFO (refused without blocking). */
        snprintf(path, sizeof(path), "%s/absent.key", dir);
        LOAD_SECRET(path);
        snprintf(msg, sizeof(msg), "test.conf:5: [cluster] secret_file: cannot open \"%s\": No such file or directory",
                 path);
        load_bad_len(text, strlen(text), -ENOENT, msg);
        LOAD_SECRET(dir);
        snprintf(msg, sizeof(msg), "test.conf:5: [cluster] secret_file: \"%s\" is not a regular file", dir);
        load_bad(text, msg);
        snprintf(path, sizeof(path), "%s/fifo.key", dir);
        assert_int_equal(mkfifo(path, 0600), 0);
        LOAD_SECRET(path);
        snprintf(msg, sizeof(msg), "test.conf:5: [cluster] secret_file: \"%s\" is not a regular file", path);
        load_bad(text, msg);

        /* Owned by another user (needs root to arrange). */
        if (geteuid() == 0) {
                _cleanup_free_ char *k = write_mode(dir, "other.key", SECRET, 0600);

                assert_int_equal(chown(k, 65534, 65534), 0);
                LOAD_SECRET(k);
                snprintf(msg, sizeof(msg),
                         "test.conf:5: [cluster] secret_file: \"%s\" is owned by uid 65534, neither the daemon's user "
                         "(uid 0) nor root",
                         k);
                load_bad(text, msg);
        }

        /* Without a complete [cluster] the secret is not read at all. */
        load_bad("[cluster]\nsecret_file = /nonexistent/key\n", "test.conf: [cluster]: node is not set " REQUIRED);

        /* A bare section header sets no key. */
        {
                Config *c = load_ok("[cluster]\n; nothing yet\n");

                assert_null(c->cluster_node);
                config_free(c);
        }
#undef LOAD_SECRET
        remove_tree(dir);
}

/* Drop-ins replace [cluster] keys too; rules across keys are checked after
 * the last drop-in and name the main file; the secret's errors name the file
 * and line that set secret_file. */
static void test_cluster_dropins(void **state) {
        _cleanup_free_ char *dir = make_temp_dir(NULL);
        _cleanup_free_ char *main_path = path_join(dir, "weightd.conf");
        _cleanup_free_ char *dropins = path_join(dir, "weightd.conf.d");
        _cleanup_free_ char *key1 = write_mode(dir, "one.key", "first secret, 22 bytes", 0600);
        _cleanup_free_ char *key2 = write_mode(dir, "two.key", "second secret, 23 bytes\n", 0600);
        _cleanup_free_ char *loose = write_mode(dir, "loose.key", "a secret that others may read", 0644);
        _cleanup_(config_freep) Config *c = NULL;
        Config *sentinel = (Config *) (uintptr_t) 0x5a5a, *bad = sentinel;
        WdError err = WD_ERROR_NULL;
        char text[1024], msg[1024];

        snprintf(text, sizeof(text),
                 "[cluster]\nnode = a\nnodes = a=10.0.0.1:7470, b=10.0.0.2:7470\nsecret_file = %s\ndeadline = 3s\n", key1);
        write_text(dir, "weightd.conf", text);
        assert_int_equal(config_load(main_path, &c, &err), 0);
        assert_int_equal(c->n_cluster_nodes, 2);
        assert_int_equal(c->cluster_secret_len, 22);
        c = config_free(c);

        /* A drop-in replaces the whole list and the secret file. */
        assert_int_equal(mkdir(dropins, 0755), 0);
        snprintf(text, sizeof(text), "[cluster]\nnodes = c=10.0.0.3:7470\n  a=10.0.0.1:7471\nsecret_file = %s\n", key2);
        write_text(dropins, "10-nodes.conf", text);
        assert_int_equal(config_load(main_path, &c, &err), 0);
        assert_string_equal(c->cluster_node, "a");
        assert_int_equal(c->n_cluster_nodes, 2);
        assert_string_equal(c->cluster_nodes[0].name, "c");
        assert_string_equal(c->cluster_nodes[1].name, "a");
        assert_int_equal(c->cluster_nodes[1].port, 7471);
        assert_string_equal(c->cluster_secret_file, key2);
        assert_int_equal(c->cluster_secret_len, 23);
        assert_memory_equal(c->cluster_secret, "second secret, 23 bytes", 23);
        assert_int_equal(c->cluster_deadline_usec, 3000000);
        c = config_free(c);

        /* A drop-in that leaves node out of nodes: the main file is named. */
        write_text(dropins, "20-drop-a.conf", "[cluster]\nnodes = c=10.0.0.3:7470\n");
        assert_int_equal(config_load(main_path, &bad, &err), WD_E_INVALID);
        snprintf(msg, sizeof(msg), "%s: [cluster]: node \"a\" is not one of nodes", main_path);
        assert_string_equal(err.message, msg);
        assert_ptr_equal(bad, sentinel);
        write_text(dropins, "20-drop-a.conf", "[cluster]\nnode = c\n");
        assert_int_equal(config_load(main_path, &c, &err), 0);
        assert_string_equal(c->cluster_node, "c");
        c = config_free(c);

        /* A bad secret file set in a drop-in: that drop-in and its line. */
        snprintf(text, sizeof(text), "[cluster]\n\nsecret_file = %s\n", loose);
        write_text(dropins, "30-key.conf", text);
        assert_int_equal(config_load(main_path, &bad, &err), WD_E_INVALID);
        snprintf(msg, sizeof(msg),
                 "%s/30-key.conf:3: [cluster] secret_file: \"%s\": mode 0644 lets others read it; chmod 600", dropins,
                 loose);
        assert_string_equal(err.message, msg);
        assert_ptr_equal(bad, sentinel);

        /* A drop-in alone can configure the cluster. */
        write_text(dir, "weightd.conf", "[daemon]\n");
        snprintf(text, sizeof(text), "[cluster]\nsecret_file = %s\nnode = z\nnodes = z=h:1\n", key1);
        write_text(dropins, "30-key.conf", text);
        assert_int_equal(config_load(main_path, &c, &err), 0);
        assert_string_equal(c->cluster_node, "z");
        assert_int_equal(c->cluster_secret_len, 22);
        remove_tree(dir);
}

static Config *dump_and_reload(const Config *c) {
        char *buf = NULL, *line, *save = NULL;
        size_t size = 0;
        FILE *f = open_memstream(&buf, &size);
        Config *d;

        assert_non_null(f);
        assert_int_equal(config_dump(c, f), 0);
        assert_int_equal(fclose(f), 0);
        d = load_ok(buf);
        /* Every line fits libinih's buffer. */
        for (line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save))
                assert_true(strlen(line) <= 198);
        free(buf);
        return d;
}

static void test_dump(void **state) {
        _cleanup_(config_freep) Config *c = NULL, *d = NULL;
        _cleanup_free_ char *text = NULL;
        char *p;
        size_t size = 0;
        FILE *f;

        /* Defaults. */
        assert_int_equal(config_new_default(&c, NULL), 0);
        d = dump_and_reload(c);
        assert_true(config_equal(c, d));
        c = config_free(c);
        d = config_free(d);

        /* Every key away from its default, lists long enough to wrap, and a
         * model root as long as a line allows. */
        f = open_memstream(&text, &size);
        assert_non_null(f);
        fputs("[daemon]\nsocket = /var/lib/wd test/s.sock\nmodel_roots = /srv/a:/srv/b b\n", f);
        for (int i = 0; i < 12; i++)
                fprintf(f, "  /data/models/collection-%02d/with/a/fairly/long/path:/x%d\n", i, i);
        fputc('\t', f);
        fputc('/', f);
        for (int i = 0; i < 196; i++)
                fputc('L', f);
        fputs("\nallow_uids = root", f);
        for (int i = 0; i < 60; i++)
                fprintf(f, "%s%u", i % 10 == 9 ? "\n  " : ", ", 4000000000u + (unsigned) i);
        fputs("\nallow_gids = 0, 1\nmax_connections = 10\nmax_connections_per_uid = 3\nmax_pending_requests = 5\n"
              "max_frame_size = 12288\nmax_request_size = 3K\nhello_timeout = 7\nframe_timeout = 5\nlog_level = notice\n"
              "[memory]\nhost_budget = 3%\nhost_pages = small\n"
              "[io]\nqueue_depth = 100\nchunk_size = 1G\ndirect_io = off\n"
              "[gpu]\nbudget = 80G\ndevice_budgets = 0:50%, 1:10G\nkeep_host = no\ndevices = 0, 1\n",
              f);
        assert_int_equal(fclose(f), 0);
        c = load_ok(text);
        assert_int_equal(c->n_model_roots, 2 + 24 + 1);
        assert_int_equal(strlen(c->model_roots[26]), 197);
        assert_int_equal(c->n_allow_uids, 61);
        assert_int_equal(c->max_frame_size, 12288);
        assert_int_equal(c->max_request_size, 3072);
        assert_int_equal(c->frame_timeout, 5);
        d = dump_and_reload(c);
        assert_true(config_equal(c, d));
        c = config_free(c);
        d = config_free(d);

        /* A size dumps with the largest exact suffix. */
        c = load_ok("[daemon]\nmax_frame_size = 1048576\nmax_request_size = 65536\nframe_timeout = 42\n[io]\nchunk_size = 69632\n[memory]\nhost_budget = 2048\n");
        free(text);
        text = NULL;
        f = open_memstream(&text, &size);
        assert_int_equal(config_dump(c, f), 0);
        assert_int_equal(fclose(f), 0);
        assert_non_null(strstr(text, "\nmax_frame_size = 1M\n"));
        assert_non_null(strstr(text, "\nmax_request_size = 64K\n"));
        assert_non_null(strstr(text, "\nframe_timeout = 42\n"));
        assert_non_null(strstr(text, "\nchunk_size = 68K\n"));
        assert_non_null(strstr(text, "\nhost_budget = 2048\n"));
        p = strstr(text, "\n[memory]\n# 2048 bytes\n");
        assert_non_null(p);

        /* config_equal() sees each field. */
        d = dump_and_reload(c);
        assert_true(config_equal(c, d));
        d->allow_uids = realloc(d->allow_uids, sizeof(uid_t));
        d->allow_uids[0] = 1;
        d->n_allow_uids = 1;
        assert_false(config_equal(c, d));
        d = config_free(d);
        d = dump_and_reload(c);
        free(d->host_budget_spec);
        d->host_budget_spec = strdup("2K");
        assert_false(config_equal(c, d));
        d = config_free(d);
        d = dump_and_reload(c);
        d->max_request_size++;
        assert_false(config_equal(c, d));
        d = config_free(d);
        d = dump_and_reload(c);
        d->frame_timeout++;
        assert_false(config_equal(c, d));
        d = config_free(d);

        /* Without a cluster, [cluster] is a comment. */
        free(text);
        text = NULL;
        f = open_memstream(&text, &size);
        assert_int_equal(config_dump(c, f), 0);
        assert_int_equal(fclose(f), 0);
        assert_non_null(strstr(text, "\n[cluster]\n# not configured: this node serves alone\n"));
        assert_null(strstr(text, "node ="));
}

static char *dump_text(const Config *c) {
        char *text = NULL;
        size_t size = 0;
        FILE *f = open_memstream(&text, &size);

        assert_non_null(f);
        assert_int_equal(config_dump(c, f), 0);
        assert_int_equal(fclose(f), 0);
        return text;
}

/* [cluster] through config_dump() and back; config_equal() sees the
 * secret's bytes. */
static void test_cluster_dump(void **state) {
        _cleanup_free_ char *dir = make_temp_dir(NULL);
        _cleanup_free_ char *key = write_mode(dir, "cluster.key", SECRET "\n", 0600);
        _cleanup_(config_freep) Config *c = NULL, *d = NULL;
        _cleanup_free_ char *text = NULL;
        char conf[4096];
        size_t n;

        n = (size_t) snprintf(conf, sizeof(conf),
                              "[cluster]\nnode = n07\nsecret_file = %s\ndeadline = 90s\npeer_fetch = no\nnodes =\n", key);
        /* Enough nodes to wrap the list, IPv6 and names among them. */
        for (int i = 0; i < 40; i++)
                n += (size_t) snprintf(conf + n, sizeof(conf) - n, "  n%02d=%s%d%s:%d\n", i,
                                       i % 3 == 0   ? "[fd00::"
                                       : i % 3 == 1 ? "10.1.0."
                                                    : "node-",
                                       i + 1,
                                       i % 3 == 0   ? "]"
                                       : i % 3 == 2 ? ".cluster.example"
                                                    : "",
                                       7000 + i);
        c = load_ok(conf);
        assert_int_equal(c->n_cluster_nodes, 40);
        assert_string_equal(c->cluster_nodes[3].host, "fd00::4");
        text = dump_text(c);
        assert_non_null(strstr(text, "\n[cluster]\nnode = n07\nnodes = n00=[fd00::1]:7000, n01=10.1.0.2:7001, "));
        assert_non_null(strstr(text, "n02=node-3.cluster.example:7002"));
        assert_non_null(strstr(strstr(text, "[cluster]"), "\n\t"));
        {
                char line[600];

                snprintf(line, sizeof(line), "\nsecret_file = %s\ndeadline = 90s\npeer_fetch = no\n", key);
                assert_non_null(strstr(text, line));
        }
        /* Never the secret. */
        assert_null(strstr(text, "0123456789abcdef"));
        d = dump_and_reload(c);
        assert_true(config_equal(c, d));
        d = config_free(d);

        /* Durations dump in the largest exact unit. */
        {
                static const struct {
                        const char *in, *out;
                } durations[] = { { "2min", "2m" },           { "3600s", "1h" }, { "1500ms", "1500ms" },
                                  { "100001us", "100001us" }, { "120000ms", "2m" }, { "10s", "10s" } };

                for (size_t i = 0; i < ELEMENTSOF(durations); i++) {
                        char want[64];

                        snprintf(conf, sizeof(conf),
                                 "[cluster]\nnode = a\nnodes = a=h:1\nsecret_file = %s\ndeadline = %s\n", key,
                                 durations[i].in);
                        c = config_free(c);
                        c = load_ok(conf);
                        free(text);
                        text = dump_text(c);
                        snprintf(want, sizeof(want), "\ndeadline = %s\n", durations[i].out);
                        assert_non_null(strstr(text, want));
                        d = dump_and_reload(c);
                        assert_true(config_equal(c, d));
                        d = config_free(d);
                }
        }

        /* A secret file path as long as a line allows loads back too. */
        {
                char name[256];
                _cleanup_free_ char *longkey = NULL;
                size_t room = 198 - strlen("secret_file=") - strlen(dir) - 1;

                assert_true(room < sizeof(name) && room > 100);
                memset(name, 'k', room);
                name[room] = '\0';
                longkey = write_mode(dir, name, SECRET, 0600);
                assert_int_equal(strlen("secret_file=") + strlen(longkey), 198);
                snprintf(conf, sizeof(conf), "[cluster]\nnode = a\nnodes = a=h:1\nsecret_file=%s\n", longkey);
                c = config_free(c);
                c = load_ok(conf);
                d = dump_and_reload(c);
                assert_true(config_equal(c, d));
                d = config_free(d);
        }

        /* config_equal(): only the secret's bytes differ (same path, same
         * length; then another length); a trailing newline more is the
         * same secret. */
        snprintf(conf, sizeof(conf), "[cluster]\nnode = a\nnodes = a=h:1\nsecret_file = %s\n", key);
        c = config_free(c);
        c = load_ok(conf);
        d = load_ok(conf);
        assert_true(config_equal(c, d));
        d = config_free(d);
        free(write_mode(dir, "cluster.key", "0123456789abcdef twenty-six c\n", 0600));
        d = load_ok(conf);
        assert_int_equal(d->cluster_secret_len, c->cluster_secret_len);
        assert_false(config_equal(c, d));
        d = config_free(d);
        free(write_mode(dir, "cluster.key", SECRET "x", 0600));
        d = load_ok(conf);
        assert_false(config_equal(c, d));
        d = config_free(d);
        free(write_mode(dir, "cluster.key", SECRET "\n\n  \n", 0600));
        d = load_ok(conf);
        assert_true(config_equal(c, d));
        d = config_free(d);

        /* ... and every other [cluster] field. */
        d = dump_and_reload(c);
        d->cluster_deadline_usec++;
        assert_false(config_equal(c, d));
        d = config_free(d);
        d = dump_and_reload(c);
        d->cluster_peer_fetch = !d->cluster_peer_fetch;
        assert_false(config_equal(c, d));
        d = config_free(d);
        d = dump_and_reload(c);
        d->cluster_nodes[0].port++;
        assert_false(config_equal(c, d));
        d = config_free(d);
        d = dump_and_reload(c);
        d->cluster_node[0] = 'b';
        assert_false(config_equal(c, d));
        d = config_free(d);
        d = load_ok("");
        assert_false(config_equal(c, d));
        assert_false(config_equal(d, c));
        remove_tree(dir);
}

static void test_metrics_keys(void **state) {
        _cleanup_(config_freep) Config *c = NULL, *d = NULL;
        _cleanup_free_ char *text = NULL;
        size_t len = 0;
        FILE *f;

        c = load_ok("");
        assert_string_equal(c->metrics_listen, "127.0.0.1:9471");
        assert_string_equal(c->metrics_host, "127.0.0.1");
        assert_int_equal(c->metrics_port, 9471);
        c = config_free(c);

        c = load_ok("[metrics]\nlisten =\n");
        assert_string_equal(c->metrics_listen, "");
        assert_null(c->metrics_host);
        c = config_free(c);

        c = load_ok("[metrics]\nlisten = [::1]:0\n");
        assert_string_equal(c->metrics_host, "::1");
        assert_int_equal(c->metrics_port, 0);
        d = load_ok("[metrics]\nlisten = 0.0.0.0:65535\n");
        assert_string_equal(d->metrics_host, "0.0.0.0");
        assert_int_equal(d->metrics_port, 65535);
        assert_false(config_equal(c, d));

        /* The dump loads back. */
        f = open_memstream(&text, &len);
        assert_non_null(f);
        assert_int_equal(config_dump(c, f), 0);
        fclose(f);
        assert_non_null(strstr(text, "\n[metrics]\nlisten = [::1]:0\n"));
        d = config_free(d);
        d = load_ok(text);
        assert_true(config_equal(c, d));

        load_bad("[metrics]\nlisten = 9471\n",
                 "test.conf:2: [metrics] listen: \"9471\" is not ADDRESS:PORT (127.0.0.1:9471, [::1]:9471; PORT "
                 "0..65535; empty: off)");
        load_bad("[metrics]\nlisten = localhost:9471\n",
                 "test.conf:2: [metrics] listen: \"localhost:9471\": not an IPv4 address (an IPv6 address goes in "
                 "brackets: [::1]:9471)");
        load_bad("[metrics]\nlisten = ::1:9471\n",
                 "test.conf:2: [metrics] listen: \"::1:9471\": not an IPv4 address (an IPv6 address goes in "
                 "brackets: [::1]:9471)");
        load_bad("[metrics]\nlisten = [::1]9471\n",
                 "test.conf:2: [metrics] listen: \"[::1]9471\" is not ADDRESS:PORT (127.0.0.1:9471, [::1]:9471; "
                 "PORT 0..65535; empty: off)");
        load_bad("[metrics]\nlisten = 127.0.0.1:65536\n",
                 "test.conf:2: [metrics] listen: \"127.0.0.1:65536\" is not ADDRESS:PORT (127.0.0.1:9471, "
                 "[::1]:9471; PORT 0..65535; empty: off)");
        load_bad("[metrics]\nlisten = :9471\n",
                 "test.conf:2: [metrics] listen: \":9471\": the address is missing or too long");
}

int main(int argc, char **argv) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_defaults),
                cmocka_unit_test_setup_teardown(test_default_socket_user, save_env, restore_env),
                cmocka_unit_test(test_shipped_conf),
                cmocka_unit_test(test_daemon_keys),
                cmocka_unit_test(test_memory_keys),
                cmocka_unit_test(test_hugetlb_reserve),
                cmocka_unit_test(test_ready_after_touch),
                cmocka_unit_test(test_io_keys),
                cmocka_unit_test(test_gpu_keys),
                cmocka_unit_test(test_bad_values),
                cmocka_unit_test(test_sections_and_keys),
                cmocka_unit_test(test_syntax),
                cmocka_unit_test(test_continuation),
                cmocka_unit_test(test_names),
                cmocka_unit_test(test_files),
                cmocka_unit_test(test_dump),
                cmocka_unit_test(test_cluster_keys),
                cmocka_unit_test(test_cluster_bad),
                cmocka_unit_test(test_cluster_secret),
                cmocka_unit_test(test_cluster_dropins),
                cmocka_unit_test(test_cluster_dump),
                cmocka_unit_test(test_metrics_keys),
        };

        shipped_conf = argc > 1 ? argv[1] : NULL;
        return cmocka_run_group_tests(tests, NULL, NULL);
}
