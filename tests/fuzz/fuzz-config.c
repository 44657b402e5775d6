/* libFuzzer target: the configuration parser on arbitrary bytes taken as a
 * whole file.  Whatever the input, config_load_string() must return 0 with
 * a Config that keeps every rule, or WD_E_INVALID (or -errno from a name
 * lookup) with a message naming the file, and leave *ret alone.  An accepted
 * Config must dump to text that loads back to an equal Config. */
#include <stdlib.h>
#include <string.h>

#include "server/config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_path(const char *p, size_t max) {
        size_t n = strlen(p);

        if (p[0] != '/' || n > max || (n > 1 && p[n - 1] == '/') || strstr(p, "//") || strstr(p, "/./") ||
            strstr(p, "/../") || (n >= 2 && strcmp(p + n - 2, "/.") == 0) || (n >= 3 && strcmp(p + n - 3, "/..") == 0))
                abort();
}

static void check_accepted(const Config *c) {
        if (c->socket[0] != '/' || strlen(c->socket) > 107 || c->socket[strlen(c->socket) - 1] == '/')
                abort();
        if (c->n_model_roots == 0)
                abort();
        for (size_t i = 0; i < c->n_model_roots; i++) {
                check_path(c->model_roots[i], SIZE_MAX);
                if (strcmp(c->model_roots[i], "/") == 0 || strchr(c->model_roots[i], ':'))
                        abort();
        }
        if (c->max_connections < 1 || c->max_connections > 65536 || c->max_connections_per_uid < 1 ||
            c->max_connections_per_uid > 65536 || c->max_pending_requests < 1 || c->max_pending_requests > 4096 ||
            c->max_frame_size < (4u << 10) || c->max_frame_size > (256u << 20) || !config_log_level_to_string(c->log_level) ||
            c->host_budget == 0 || !c->host_budget_spec || c->host_pages >= _SLAB_PAGES_MAX || c->queue_depth < 1 ||
            c->queue_depth > 4096 || c->chunk_size < (64u << 10) || c->chunk_size > (1u << 30) || c->chunk_size % 4096 ||
            c->direct_io >= _DIRECT_MODE_MAX)
                abort();
        /* [metrics] listen: "" and no address, or an address that parsed. */
        if (!c->metrics_listen || !*c->metrics_listen != !c->metrics_host ||
            (c->metrics_host && (!*c->metrics_host || strlen(c->metrics_host) >= strlen(c->metrics_listen))))
                abort();
        if (!c->cluster_node) {
                if (c->n_cluster_nodes || c->cluster_secret_file || c->cluster_secret || c->cluster_secret_len)
                        abort();
        } else {
                bool found = false;

                if (c->n_cluster_nodes == 0 || c->n_cluster_nodes > CONFIG_CLUSTER_NODES_MAX ||
                    !c->cluster_secret_file || c->cluster_secret_file[0] != '/' || !c->cluster_secret ||
                    c->cluster_secret_len < CONFIG_CLUSTER_SECRET_MIN || c->cluster_secret_len > CONFIG_CLUSTER_SECRET_MAX)
                        abort();
                for (size_t i = 0; i < c->n_cluster_nodes; i++) {
                        const ConfigClusterNode *n = &c->cluster_nodes[i];

                        if (!n->name[0] || strlen(n->name) > CONFIG_CLUSTER_NODE_NAME_MAX || !n->host[0] || n->port == 0 ||
                            strspn(n->name, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") !=
                                    strlen(n->name))
                                abort();
                        found = found || strcmp(n->name, c->cluster_node) == 0;
                        for (size_t j = 0; j < i; j++)
                                if (strcmp(c->cluster_nodes[j].name, n->name) == 0)
                                        abort();
                }
                if (!found)
                        abort();
        }
        if (c->cluster_deadline_usec < CONFIG_CLUSTER_DEADLINE_MIN_USEC ||
            c->cluster_deadline_usec > CONFIG_CLUSTER_DEADLINE_MAX_USEC)
                abort();
}

static void check_round_trip(const Config *c) {
        char *text = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&text, &len);
        Config *d = NULL;
        WdError err = WD_ERROR_NULL;

        if (!f || config_dump(c, f) < 0 || fclose(f) != 0)
                abort();
        if (config_load_string(text, len, "dump.conf", &d, &err) != 0 || !config_equal(c, d))
                abort();
        config_free(d);
        free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        Config *sentinel = (Config *) (uintptr_t) 1, *c = sentinel;
        WdError err = WD_ERROR_NULL;
        int r;

        r = config_load_string((const char *) data, size, "fuzz.conf", &c, &err);
        if (r == 0) {
                if (!c || c == sentinel)
                        abort();
                check_accepted(c);
                check_round_trip(c);
                config_free(c);
        } else if (c != sentinel || r != err.code || (r != WD_E_INVALID && r >= 0) ||
                   strncmp(err.message, "fuzz.conf", 9) != 0)
                abort();
        return 0;
}
