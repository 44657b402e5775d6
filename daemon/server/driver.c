/* The driver (see driver.h): validation and handlers of every request.
 *
 * Requests that name a model are checked lexically here, resolved on the
 * thread pool (resolve_work: the catalog, which is safe to use from several
 * threads and never locks across I/O; a sharded or device load is planned
 * there too), and finished back on the loop (resolve_done): answered, or
 * made to wait on the job that makes their entry resident. */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "gpu/device-load.h"
#include "server/driver.h"
#include "server/request.h"
#include "store/host-load.h"
#include "store/shard-build.h"
#include "util/log.h"
#include "util/time-util.h"

#define DRIVER_MAX_COMPONENT_NAME 255u
/* Nodes a cluster prefetch may name. */
#define DRIVER_MAX_CLUSTER_NODES 1024u
/* Tensors a Load may name (LoadRequest.names), and the bytes of each name. */
#define DRIVER_MAX_LOAD_NAMES 65536u
#define DRIVER_MAX_TENSOR_NAME 1024u

static void driver_changed(Driver *d) {
        if (d->changed)
                d->changed(d->userdata);
}

static bool string_ok(const char *s, size_t max) {
        return s && strnlen(s, max + 1) <= max;
}

/* ---- the shard spec from the wire --------------------------------------- */

int shard_spec_from_wire(const Weightd__V1__Shard *w, ShardSpec **ret, WdError *err) {
        ShardRule rules[SHARD_MAX_RULES];

        /* Borrowed; shard_spec_from_fields() refuses a count past the array
         * before it reads it. */
        for (size_t i = 0; i < w->n_rules && i < SHARD_MAX_RULES; i++)
                rules[i] = (ShardRule){ .pattern = w->rules[i] ? w->rules[i]->pattern : NULL,
                                        .dim = w->rules[i] ? w->rules[i]->dim : 0 };
        return shard_spec_from_fields(w->rank, w->world, w->uneven, rules, w->n_rules, w->tensors, w->n_tensors, ret,
                                      err);
}

/* ---- answering ---------------------------------------------------------- */

static void complete_error(Request *r, int k, const WdError *err) {
        request_complete(r, &(RequestOutcome){ .r = k, .err = err });
}

static void complete_errorf(Request *r, int k, const char *msg) {
        WdError err = WD_ERROR_NULL;

        wd_error_set(&err, k, "%s", msg);
        complete_error(r, k, &err);
}

/* Check a model and component from a peer and resolve them to a root and
 * the cache key.  Replies with the error itself; returns 0 or 1 (replied). */
static int component_ref_resolve(Driver *d, Peer *p, uint64_t id, const char *model, const char *component,
                                 Root **ret_root, char **ret_rel, char **ret_key) {
        WdError err = WD_ERROR_NULL;
        int r;

        if (!string_ok(model, PATH_MAX) || !*model)
                return request_reply_error(p, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT,
                                           "model: an absolute path is required"),
                       1;
        if (!string_ok(component, DRIVER_MAX_COMPONENT_NAME) || (*component && !filename_is_plain(component)))
                return request_reply_error(p, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT,
                                           "component: not a plain name of at most %u bytes",
                                           DRIVER_MAX_COMPONENT_NAME),
                       1;
        r = roots_resolve(d->roots, model, ret_root, ret_rel, ret_key, &err);
        if (r != 0) {
                if (r == WD_E_PERMISSION)
                        log_info_fields(&(LogFields){ .model = model, .component = component,
                                                      .code = wd_error_code_name(r), .peer_uid = &p->cred.uid },
                                        "%s: refused: %s", p->name, err.message);
                request_reply_wd_error(p, id, r, &err);
                return 1;
        }
        return 0;
}

/* ---- resolving on the thread pool --------------------------------------- */

static int name_cmp(const void *a, const void *b) {
        return strcmp(*(char *const *) a, *(char *const *) b);
}

/* A Load of named tensors: find each name among the tensors the reply
 * would list (the plan's, or the files' in order) and keep their
 * positions.  n log k string compares for n tensors and k names: no work
 * for the loop, so it runs here.  Returns 0, WD_E_NOT_FOUND naming the
 * first name that is missing, or -ENOMEM. */
static int names_pick(Request *r) {
        const Component *comp = r->comp;
        size_t n = r->plan ? r->plan->n_tensors : comp->n_tensors, k = 0, t = 0;
        _cleanup_free_ bool *found = calloc(r->n_names, sizeof(bool));
        _cleanup_free_ size_t *pick = calloc(MIN(r->n_names, MAX(n, 1u)), sizeof(size_t));

        if (!found || !pick)
                return wd_error_set(&r->err, -ENOMEM, "out of memory");
        for (size_t i = 0; i < comp->n_files && !r->plan; i++) {
                const StHeader *h = comp->files[i].header;

                for (size_t j = 0; j < h->n_tensors; j++, t++) {
                        const char *name = h->tensors[j].name;
                        char **p = bsearch(&name, r->names, r->n_names, sizeof(char *), name_cmp);

                        if (p && k < r->n_names) {
                                found[p - r->names] = true;
                                pick[k++] = t;
                        }
                }
        }
        for (t = 0; r->plan && t < n; t++) {
                const char *name = r->plan->tensors[t].source->name;
                char **p = bsearch(&name, r->names, r->n_names, sizeof(char *), name_cmp);

                if (p && k < r->n_names) {
                        found[p - r->names] = true;
                        pick[k++] = t;
                }
        }
        for (size_t i = 0; i < r->n_names; i++)
                if (!found[i]) {
                        char name[256], model[256], component[128];

                        wd_escape(name, sizeof(name), r->names[i], 200);
                        wd_escape(model, sizeof(model), comp->model, 200);
                        wd_escape(component, sizeof(component), comp->name, 100);
                        return wd_error_set(&r->err, WD_E_NOT_FOUND, "%s%s%s%s: no tensor \"%s\"%s", model,
                                            *component ? ", component \"" : "", component, *component ? "\"" : "",
                                            name, r->shard ? " among the tensors of this shard" : "");
                }
        r->pick = TAKE_PTR(pick);
        r->n_pick = k;
        return 0;
}

static void resolve_work(uv_work_t *w) {
        Request *r = w->data;

        /* Only the request's own fields and the catalog, which is safe for
         * several threads: the loop owns everything else. */
        if (r->kind == REQUEST_COMPONENTS)
                r->r = catalog_list(r->root->catalog, r->rel, &r->list, &r->err);
        else
                r->r = catalog_resolve(r->root->catalog, r->rel, r->component, &r->comp, &r->err);
        /* A sharded or device load is planned here, before anything is
         * read: globs over every tensor name are no work for the loop.
         * Host shards and device slabs both align tensors to 256 bytes. */
        if (r->r == 0 && r->comp && (r->shard || r->device >= 0))
                r->r = shard_plan(r->comp, r->shard, GPU_ALIGN, &r->plan, &r->err);
        if (r->r == 0 && r->comp) {
                /* Key the cache by the absolute path: two roots may hold
                 * the same relative one. */
                free(r->comp->model);
                r->comp->model = strdup(r->key);
                if (!r->comp->model)
                        r->r = wd_error_set(&r->err, -ENOMEM, "out of memory");
        }
        if (r->r == 0 && r->comp && r->n_names > 0)
                r->r = names_pick(r);
}

static void load_resolved(Driver *d, Request *r);

static void resolve_done(uv_work_t *w, int status) {
        Request *r = w->data;
        Driver *d = r->userdata;

        r->resolving = false;
        d->n_resolving--;
        if (!r->peer) {
                /* The peer left or cancelled meanwhile. */
                request_free(r);
                driver_changed(d);
                return;
        }
        if (status < 0 && r->r == 0)
                r->r = wd_error_set(&r->err, -ECANCELED, "the resolve was cancelled");
        if (r->r != 0) {
                if (r->r == WD_E_PERMISSION)
                        log_info_fields(&(LogFields){ .component = r->component, .code = wd_error_code_name(r->r),
                                                      .peer_uid = &r->peer->cred.uid },
                                        "%s: refused: %s", r->peer->name, r->err.message);
                complete_error(r, r->r, &r->err);
        } else if (r->kind == REQUEST_LOAD || r->kind == REQUEST_PREFETCH)
                load_resolved(d, r);
        else
                request_complete(r, &(RequestOutcome){});
        driver_changed(d);
}

/* Check the model and component (lexically, here), then resolve them on the
 * thread pool.  Takes shard.  Returns the request (resolving), or NULL when
 * it was answered already. */
static Request *request_resolve(Driver *d, Peer *p, uint64_t id, RequestKind kind, bool progress,
                                const char *model, const char *component, ShardSpec *shard) {
        _cleanup_(shard_spec_freep) ShardSpec *spec = shard;
        Root *root;
        char *rel, *key;
        Request *r;

        if (component_ref_resolve(d, p, id, model, component, &root, &rel, &key))
                return NULL;
        r = request_new(p, id, kind, progress);
        if (!r) {
                free(rel);
                free(key);
                request_reply_error(p, id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "out of memory");
                return NULL;
        }
        r->userdata = d;
        r->roots = roots_ref(d->roots);
        r->root = root;
        r->rel = rel;
        r->key = key;
        r->component = strdup(component);
        if (spec) {
                r->variant = shard_spec_key(spec);
                r->shard = TAKE_PTR(spec);
        }
        if (!r->component || (r->shard && !r->variant)) {
                complete_errorf(r, -ENOMEM, "out of memory");
                return NULL;
        }
        return r;
}

static void request_start_resolve(Driver *d, Request *r) {
        int k;

        r->work.data = r;
        k = uv_queue_work(d->loop, &r->work, resolve_work, resolve_done);
        if (k < 0) {
                WdError err = WD_ERROR_NULL;

                wd_error_set(&err, -EIO, "cannot queue the resolve: %s", uv_strerror(k));
                complete_error(r, -EIO, &err);
                return;
        }
        r->resolving = true;
        d->n_resolving++;
}

/* ---- loads -------------------------------------------------------------- */

static FileId *component_ids(const Component *comp) {
        FileId *ids = calloc(MAX(comp->n_files, 1u), sizeof(FileId));

        if (ids)
                for (size_t i = 0; i < comp->n_files; i++)
                        ids[i] = comp->files[i].id;
        return ids;
}

static CacheEntry *lookup(Cache *c, const Component *comp, const char *variant, const FileId *ids) {
        CacheEntry *e = cache_lookup(c, comp->model, comp->name, variant, ids, comp->n_files);

        /* The same files by another path (a symlinked folder inside the
         * root): one copy in memory, one read. */
        return e ? e : cache_lookup_files(c, variant, ids, comp->n_files);
}

/* The host load making comp's whole entry resident, found or started; a
 * reference for the caller.  Returns 0 or an error in err. */
static int host_job(Driver *d, Request *r, CacheEntry *whole, Job **ret, WdError *err) {
        Job *j = whole ? job_find(&d->store->jobs, whole) : NULL;
        int k;

        if (j) {
                *ret = job_ref(j);
                return 0;
        }
        /* Other nodes may hold it: fetch from them before storage. */
        if (d->cluster && !whole) {
                k = cluster_fetch(d->cluster, r->comp, r->root->fd, &j, err);
                if (k != 0 || j) {
                        *ret = j;
                        return k;
                }
        }
        return host_load_start(d->store, r->root->fd, r->comp, r->received_usec, ret, err);
}

/* A cluster prefetch: the plan's outcome, with every node's part. */
static void load_cluster(Driver *d, Request *r) {
        WdError err = WD_ERROR_NULL;
        Job *j;
        int k;

        k = cluster_prefetch(d->cluster, r->comp, r->nodes, r->node_specs, r->node_devices, r->n_nodes, r->device, &j,
                             &err);
        if (k != 0) {
                complete_error(r, k, &err);
                return;
        }
        request_wait(r, j);
        job_unref(j);
}

static void load_host(Driver *d, Request *r, const FileId *ids) {
        WdError err = WD_ERROR_NULL;
        CacheEntry *e;
        Job *j;
        int k;

        /* Refused before anything is read: one reply carries every slab. */
        if (r->kind == REQUEST_LOAD && r->comp->n_files > WIRE_MAX_FDS) {
                wd_error_set(&err, WD_E_BUDGET,
                             "%s: %zu files, more than the %u descriptors one Load reply can carry "
                             "(Prefetch has no such limit)",
                             r->comp->model, r->comp->n_files, WIRE_MAX_FDS);
                complete_error(r, WD_E_BUDGET, &err);
                return;
        }
        e = lookup(d->store->cache, r->comp, "", ids);
        metrics_count_lookup(d->metrics, METRICS_TIER_HOST, e && e->state == CACHE_ENTRY_RESIDENT);
        if (e && e->state == CACHE_ENTRY_RESIDENT) {
                e->wanted = true;
                request_complete(r, &(RequestOutcome){ .entry = e, .was_resident = true });
                return;
        }
        k = host_job(d, r, e, &j, &err);
        if (k != 0) {
                complete_error(r, k, &err);
                return;
        }
        if (j->entry)
                j->entry->wanted = true;
        request_wait(r, j);
        job_unref(j);
}

static void load_shard(Driver *d, Request *r, const FileId *ids) {
        WdError err = WD_ERROR_NULL;
        CacheEntry *derived, *whole;
        Job *j, *wj = NULL;
        int k;

        derived = lookup(d->store->cache, r->comp, r->variant, ids);
        metrics_count_lookup(d->metrics, METRICS_TIER_HOST, derived && derived->state == CACHE_ENTRY_RESIDENT);
        if (derived && derived->state == CACHE_ENTRY_RESIDENT) {
                request_complete(r, &(RequestOutcome){ .entry = derived, .was_resident = true });
                return;
        }
        j = derived ? job_find(&d->store->jobs, derived) : NULL;
        if (j) {
                request_wait(r, j);
                return;
        }
        /* Build it from the whole component: resident, or once its load
         * (joined or started) made it so; the request hears that read's
         * progress. */
        whole = lookup(d->store->cache, r->comp, "", ids);
        if (!whole || whole->state != CACHE_ENTRY_RESIDENT) {
                k = host_job(d, r, whole, &wj, &err);
                if (k != 0) {
                        complete_error(r, k, &err);
                        return;
                }
                whole = NULL;
        }
        k = shard_build_start(d->store, r->comp, TAKE_PTR(r->plan), r->shard, r->variant, whole, wj, &j, &err);
        job_unref(wj);
        if (k != 0) {
                complete_error(r, k, &err);
                return;
        }
        request_wait(r, j);
        job_unref(j);
}

static void load_device(Driver *d, Request *r, const FileId *ids) {
        DeviceTier *t = d->tier;
        WdError err = WD_ERROR_NULL;
        const char *variant = r->variant ? r->variant : ""; /* a sharding: a device entry of its own */
        bool keep_host = r->keep_host == WEIGHTD__V1__KEEP_HOST__KEEP_HOST_YES ||
                         (r->keep_host != WEIGHTD__V1__KEEP_HOST__KEEP_HOST_NO && d->config->keep_host);
        CacheEntry *e;
        Job *j;
        int k;

        if (d->gpu_state != GPU_UP || (size_t) r->device >= gpu_n_devices(t->gpu)) {
                wd_error_set(&err, WD_E_UNSUPPORTED, "no GPU tier: %s", d->gpu_reason);
                complete_error(r, WD_E_UNSUPPORTED, &err);
                return;
        }
        e = lookup(t->caches[r->device], r->comp, variant, ids);
        metrics_count_lookup(d->metrics, 1 + (size_t) r->device, e && e->state == CACHE_ENTRY_RESIDENT);
        if (e && e->state == CACHE_ENTRY_RESIDENT) {
                request_complete(r, &(RequestOutcome){ .entry = e, .was_resident = true });
                return;
        }
        j = e ? job_find(&t->jobs, e) : NULL;
        if (j) {
                request_wait(r, j);
                return;
        }
        DeviceLoadParams params = {
                .dev = (size_t) r->device,
                .root_fd = r->root->fd,
                .spec = r->shard,
                .variant = variant,
                .keep_host = keep_host,
                .requested_usec = r->received_usec,
        };
        k = device_load_start(t, r->comp, &params, &j, &err);
        if (k != 0) {
                complete_error(r, k, &err);
                return;
        }
        request_wait(r, j);
        job_unref(j);
}

/* A resolved Load or Prefetch: serve it from memory, or wait for a job. */
static void load_resolved(Driver *d, Request *r) {
        _cleanup_free_ FileId *ids = component_ids(r->comp);

        if (!ids) {
                complete_errorf(r, -ENOMEM, "out of memory");
                return;
        }
        if (r->cluster)
                load_cluster(d, r);
        else if (r->device >= 0)
                load_device(d, r, ids);
        else if (r->shard)
                load_shard(d, r, ids);
        else
                load_host(d, r, ids);
}

/* A device target of a Load: the device's index, or replies (UNSUPPORTED
 * without a GPU tier, INVALID_ARGUMENT for a device it does not serve) and
 * returns -1. */
static int device_target(Driver *d, Peer *p, uint64_t id, const char *target, const GpuDeviceInfo **ret_info) {
        GpuDeviceInfo infos[GPU_MAX_DEVICES];
        char uuid[GPU_UUID_MAX], t[80];
        size_t n, idx;
        int ordinal, r;

        wd_escape(t, sizeof(t), target, 64);
        r = gpu_target_parse(target, &ordinal, uuid);
        if (r < 0 || r == WD_E_INVALID) {
                request_reply_error(p, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT,
                                    "target \"%s\": not \"host\", \"cuda:N\" or \"cuda:GPU-<uuid>\"", t);
                return -1;
        }
        if (d->gpu_state == GPU_STARTING) {
                request_reply_error(p, id, WEIGHTD__V1__CODE__UNAVAILABLE,
                                    "target \"%s\": the GPU tier is still starting, try again", t);
                return -1;
        }
        if (d->gpu_state != GPU_UP) {
                request_reply_error(p, id, WEIGHTD__V1__CODE__UNSUPPORTED, "target \"%s\": no GPU tier: %s", t,
                                    d->gpu_reason);
                return -1;
        }
        n = gpu_n_devices(d->tier->gpu);
        for (size_t i = 0; i < n; i++)
                infos[i] = *gpu_device(d->tier->gpu, i);
        r = gpu_target_lookup(infos, n, target, &idx);
        if (r != 0) {
                request_reply_error(p, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT,
                                    "target \"%s\": the daemon serves no such device (%zu devices)", t, n);
                return -1;
        }
        *ret_info = gpu_device(d->tier->gpu, idx);
        return (int) idx;
}

/* "cuda:N", N a decimal index below 1024. */
static int parse_cluster_device(const char *target, unsigned *ret) {
        unsigned v = 0;

        if (strncmp(target, "cuda:", 5) != 0 || !target[5] || strlen(target + 5) > 4)
                return -EINVAL;
        for (const char *c = target + 5; *c; c++) {
                if (*c < '0' || *c > '9')
                        return -EINVAL;
                v = v * 10 + (unsigned) (*c - '0');
        }
        if (v >= 1024)
                return -EINVAL;
        *ret = v;
        return 0;
}

static int handle_load(Driver *d, Peer *p, uint64_t id, const Weightd__V1__LoadRequest *req, RequestKind kind) {
        const GpuDeviceInfo *info = NULL;
        ShardSpec *spec = NULL;
        int device = -1;
        Request *r;

        if (!string_ok(req->target, 64))
                return request_reply_error(p, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT, "target: too long");
        if (*req->target && strcmp(req->target, "host") != 0 && req->cluster) {
                /* The same device index on every node: this one need not
                 * have it (each node says what it has). */
                unsigned index;

                if (parse_cluster_device(req->target, &index) < 0)
                        return request_reply_error(p, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT,
                                                   "target: a cluster prefetch takes cuda:N (the daemons' device "
                                                   "index) or host, not \"%.64s\"", req->target);
                device = (int) index;
        } else if (*req->target && strcmp(req->target, "host") != 0) {
                device = device_target(d, p, id, req->target, &info);
                if (device < 0)
                        return 0;
        }
        if (req->n_names > 0) {
                if (kind != REQUEST_LOAD)
                        return request_reply_error(p, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT,
                                                   "names: only a Load leases named tensors, not a Prefetch");
                if (req->n_names > DRIVER_MAX_LOAD_NAMES)
                        return request_reply_error(p, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT,
                                                   "names: %zu tensors named, at most %u", req->n_names,
                                                   DRIVER_MAX_LOAD_NAMES);
                for (size_t i = 0; i < req->n_names; i++)
                        if (!string_ok(req->names[i], DRIVER_MAX_TENSOR_NAME) || !*req->names[i])
                                return request_reply_error(p, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT,
                                                           "names: name %zu: 1 to %u bytes are required", i,
                                                           DRIVER_MAX_TENSOR_NAME);
        }
        if (req->keep_host > WEIGHTD__V1__KEEP_HOST__KEEP_HOST_NO)
                return request_reply_error(p, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT, "keep_host: unknown value %d",
                                           (int) req->keep_host);
        if (req->shard) {
                WdError err = WD_ERROR_NULL;
                int k = shard_spec_from_wire(req->shard, &spec, &err);

                if (k != 0)
                        return request_reply_wd_error(p, id, k, &err);
        }
        if (req->cluster || req->n_nodes > 0) {
                if (kind != REQUEST_PREFETCH || !req->cluster)
                        return shard_spec_free(spec),
                               request_reply_error(p, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT,
                                                   "cluster, nodes: a cluster load is a Prefetch with cluster set");
                if (spec)
                        return shard_spec_free(spec),
                               request_reply_error(p, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT,
                                                   "cluster: no shard; name each node's in node_shards");
                if (!d->cluster)
                        return request_reply_error(p, id, WEIGHTD__V1__CODE__UNSUPPORTED,
                                                   "cluster: this daemon has no [cluster] configured");
                if (req->n_nodes > DRIVER_MAX_CLUSTER_NODES)
                        return request_reply_error(p, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT,
                                                   "nodes: more than %u", DRIVER_MAX_CLUSTER_NODES);
                for (size_t i = 0; i < req->n_nodes; i++)
                        if (!string_ok(req->nodes[i], 64) || !*req->nodes[i])
                                return request_reply_error(p, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT,
                                                           "nodes: a name of 1..63 bytes is required");
                if (req->n_node_shards > 0 && req->n_node_shards != req->n_nodes)
                        return request_reply_error(p, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT,
                                                   "node_shards: %zu shards for %zu nodes, one per node is required",
                                                   req->n_node_shards, req->n_nodes);
                if (req->n_node_targets > 0 && req->n_node_targets != req->n_nodes)
                        return request_reply_error(p, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT,
                                                   "node_targets: %zu targets for %zu nodes, one per node is required",
                                                   req->n_node_targets, req->n_nodes);
        } else if (req->n_node_shards > 0 || req->n_node_targets > 0)
                return shard_spec_free(spec), request_reply_error(p, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT,
                                                                  "node_shards, node_targets: only with cluster and "
                                                                  "nodes");
        r = request_resolve(d, p, id, kind, req->progress, req->model, req->component, spec);
        if (!r)
                return 0;
        r->compact_tensors = req->compact_tensors;
        if (req->cluster) {
                r->cluster = true;
                r->nodes = calloc(req->n_nodes + 1, sizeof(char *));
                if (!r->nodes) {
                        complete_errorf(r, -ENOMEM, "out of memory");
                        return 0;
                }
                for (size_t i = 0; i < req->n_nodes; i++) {
                        r->nodes[i] = strdup(req->nodes[i]);
                        if (!r->nodes[i]) {
                                complete_errorf(r, -ENOMEM, "out of memory");
                                return 0;
                        }
                        r->n_nodes++;
                }
                if (req->n_node_targets > 0) {
                        r->node_devices = calloc(req->n_nodes + 1, sizeof(int));
                        if (!r->node_devices) {
                                complete_errorf(r, -ENOMEM, "out of memory");
                                return 0;
                        }
                        for (size_t i = 0; i < req->n_node_targets; i++) {
                                const char *t = req->node_targets[i] ? req->node_targets[i] : "";
                                unsigned index;

                                if (!*t)
                                        r->node_devices[i] = CLUSTER_PLAN_DEVICE;
                                else if (strcmp(t, "host") == 0)
                                        r->node_devices[i] = -1;
                                else if (parse_cluster_device(t, &index) == 0)
                                        r->node_devices[i] = (int) index;
                                else {
                                        WdError err = WD_ERROR_NULL;

                                        wd_error_set(&err, WD_E_INVALID,
                                                     "node_targets: %.64s: \"%.64s\" is not \"\", host or cuda:N",
                                                     r->nodes[i], t);
                                        complete_error(r, WD_E_INVALID, &err);
                                        return 0;
                                }
                        }
                }
                if (req->n_node_shards > 0) {
                        r->node_specs = calloc(req->n_nodes + 1, sizeof(ShardSpec *));
                        if (!r->node_specs) {
                                complete_errorf(r, -ENOMEM, "out of memory");
                                return 0;
                        }
                        for (size_t i = 0; i < req->n_node_shards; i++) {
                                WdError err = WD_ERROR_NULL;
                                int k = req->node_shards[i] ? shard_spec_from_wire(req->node_shards[i],
                                                                                   &r->node_specs[i], &err)
                                                            : 0;

                                if (k != 0) {
                                        WdError named = WD_ERROR_NULL;

                                        wd_error_set(&named, k, "node_shards: %.64s: %s", r->nodes[i], err.message);
                                        complete_error(r, k, &named);
                                        return 0;
                                }
                        }
                }
        }
        if (req->n_names > 0) {
                r->names = calloc(req->n_names, sizeof(char *));
                if (!r->names) {
                        complete_errorf(r, -ENOMEM, "out of memory");
                        return 0;
                }
                for (size_t i = 0; i < req->n_names; i++) {
                        r->names[i] = strdup(req->names[i]);
                        if (!r->names[i]) {
                                complete_errorf(r, -ENOMEM, "out of memory");
                                return 0;
                        }
                        r->n_names++;
                }
                /* Sorted and unique, for bsearch() over every tensor name. */
                qsort(r->names, r->n_names, sizeof(char *), name_cmp);
                size_t u = 1;
                for (size_t i = 1; i < r->n_names; i++) {
                        if (strcmp(r->names[i], r->names[u - 1]) == 0)
                                free(r->names[i]);
                        else
                                r->names[u++] = r->names[i];
                }
                r->n_names = u;
        }
        if (device >= 0) {
                r->device = device;
                r->keep_host = req->keep_host;
                snprintf(r->target, sizeof(r->target), "cuda:%u", info ? info->index : (unsigned) device);
                snprintf(r->device_uuid, sizeof(r->device_uuid), "%s", info ? info->uuid : "");
        }
        request_start_resolve(d, r);
        return 0;
}

static int handle_named(Driver *d, Peer *p, uint64_t id, const Weightd__V1__ComponentRef *ref, RequestKind kind) {
        Request *r;

        if (kind == REQUEST_COMPONENTS && *ref->component)
                return request_reply_error(p, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT,
                                           "components: name a model, not a component");
        r = request_resolve(d, p, id, kind, false, ref->model, kind == REQUEST_COMPONENTS ? "" : ref->component,
                            NULL);
        if (r)
                request_start_resolve(d, r);
        return 0;
}

static int handle_release(Driver *d, Peer *p, uint64_t id, const Weightd__V1__ReleaseRequest *req) {
        Weightd__V1__Reply reply = WEIGHTD__V1__REPLY__INIT;
        PeerLease *l = peer_lease_find(p, req->lease);

        if (!l)
                return request_reply_error(p, id, WEIGHTD__V1__CODE__NOT_FOUND,
                                           "lease %" PRIu64 ": not held by this connection", req->lease);
        peer_lease_drop(p, l);
        driver_changed(d);
        return request_reply(p, id, &reply);
}

/* ---- entries ------------------------------------------------------------ */

/* The cache after c: the host cache, then each device's. */
static Cache *next_cache(Driver *d, Cache *c) {
        size_t n = d->gpu_state == GPU_UP ? gpu_n_devices(d->tier->gpu) : 0;

        if (c == d->store->cache)
                return n > 0 ? d->tier->caches[0] : NULL;
        for (size_t i = 0; i + 1 < n; i++)
                if (d->tier->caches[i] == c)
                        return d->tier->caches[i + 1];
        return NULL;
}

/* The next entry for a model and component after e (NULL: the first), in
 * the host tier or on a device, whatever its files and variant: NULL when
 * none is left.  Each cache finds them by their key, without walking its
 * other entries. */
static CacheEntry *find_entry(Driver *d, CacheEntry *e, const char *key, const char *component) {
        Cache *c = e ? e->cache : d->store->cache;

        for (e = e ? cache_next_of(e) : cache_first_of(c, key, component); !e;
             e = cache_first_of(c, key, component)) {
                c = next_cache(d, c);
                if (!c)
                        return NULL;
        }
        return e;
}

static bool entry_busy(const CacheEntry *e) {
        return e->state != CACHE_ENTRY_RESIDENT || e->pinned || e->leases > 0;
}

typedef enum EntryOp {
        ENTRY_EVICT,
        ENTRY_PIN,
        ENTRY_UNPIN,
} EntryOp;

/* Evict, Pin and Unpin act on every entry of the component: the whole one
 * and each sharded one, in the host tier and on every device.  Evict takes
 * all or none: one that is loading, leased or pinned makes it BUSY and
 * nothing is evicted.  Evicting unlinks: a reply or a copy still using an
 * entry keeps its memory until it is done. */
static int handle_entry_op(Driver *d, Peer *p, uint64_t id, const Weightd__V1__ComponentRef *ref, EntryOp op) {
        Weightd__V1__Reply reply = WEIGHTD__V1__REPLY__INIT;
        _cleanup_free_ char *rel = NULL, *key = NULL;
        WdError err = WD_ERROR_NULL;
        CacheEntry *e, *next, *busy;
        unsigned n = 0;
        Root *root;
        int r;

        if (component_ref_resolve(d, p, id, ref->model, ref->component, &root, &rel, &key))
                return 0;
        e = find_entry(d, NULL, key, ref->component);
        if (!e)
                return request_reply_error(p, id, WEIGHTD__V1__CODE__NOT_FOUND, "%s%s%s: not resident", key,
                                           *ref->component ? " component " : "", ref->component);
        switch (op) {
        case ENTRY_EVICT:
                /* The one that refuses says why: the most recently used
                 * of the first tier (host, then each device) that has one. */
                busy = NULL;
                for (CacheEntry *x = e; x; x = find_entry(d, x, key, ref->component)) {
                        if (busy && x->cache != busy->cache)
                                break;
                        if (entry_busy(x) && (!busy || x->last_use > busy->last_use))
                                busy = x;
                }
                r = busy ? cache_entry_evict(busy, &err) : 0; /* refuses what entry_busy() names */
                if (r != 0) {
                        if (*busy->variant)
                                wd_error_prefix(&err, "shard \"%s\"", busy->variant);
                        if (busy->cache != d->store->cache)
                                wd_error_prefix(&err, "%s", cache_name(busy->cache));
                        return request_reply_wd_error(p, id, r, &err);
                }
                for (; e; e = next) {
                        next = find_entry(d, e, key, ref->component);
                        r = cache_entry_evict(e, &err);
                        if (r != 0)
                                return request_reply_wd_error(p, id, r, &err);
                        n++;
                }
                log_info_fields(&(LogFields){ .model = key, .component = ref->component, .peer_uid = &p->cred.uid },
                                "%s: evicted %s %s (%u entr%s)", p->name, key, ref->component, n, n == 1 ? "y" : "ies");
                break;
        case ENTRY_PIN:
                for (; e; e = find_entry(d, e, key, ref->component))
                        if (e->state == CACHE_ENTRY_RESIDENT) {
                                cache_entry_pin(e);
                                n++;
                        }
                if (n == 0)
                        return request_reply_error(p, id, WEIGHTD__V1__CODE__NOT_FOUND, "%s: still loading", key);
                break;
        case ENTRY_UNPIN:
                for (; e; e = find_entry(d, e, key, ref->component))
                        cache_entry_unpin(e);
                break;
        }
        driver_changed(d);
        return request_reply(p, id, &reply);
}

static const char *entry_state_name(CacheEntryState s) {
        switch (s) {
        case CACHE_ENTRY_LOADING:
                return "loading";
        case CACHE_ENTRY_RESIDENT:
                return "resident";
        case CACHE_ENTRY_DETACHED:
                return "detached";
        }
        return "unknown";
}

static void entry_fill(Weightd__V1__Entry *x, CacheEntry *e, uint64_t now) {
        weightd__v1__entry__init(x);
        x->model = e->model;
        x->component = e->component;
        x->tier = (char *) cache_name(e->cache);
        x->state = (char *) entry_state_name(e->state);
        x->bytes = e->bytes;
        x->leases = e->leases;
        x->pinned = e->pinned;
        x->files = (uint32_t) e->n_files;
        x->idle_ms = now > e->last_use_usec ? (now - e->last_use_usec) / 1000 : 0;
        x->shard = e->variant;
}

static size_t cache_n_listed(Cache *c) {
        CacheStats st;

        cache_get_stats(c, &st);
        return st.n_entries + st.n_detached;
}

static int handle_list(Driver *d, Peer *p, uint64_t id) {
        Weightd__V1__Reply reply = WEIGHTD__V1__REPLY__INIT;
        Weightd__V1__ListReply list = WEIGHTD__V1__LIST_REPLY__INIT;
        _cleanup_free_ Weightd__V1__Entry *entries = NULL;
        _cleanup_free_ Weightd__V1__Entry **ptrs = NULL;
        uint64_t now = now_usec();
        size_t n = 0, total = 0;

        for (Cache *c = d->store->cache; c; c = next_cache(d, c))
                total += cache_n_listed(c);
        entries = calloc(MAX(total, 1), sizeof(*entries));
        ptrs = calloc(MAX(total, 1), sizeof(*ptrs));
        if (!entries || !ptrs)
                return request_reply_error(p, id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "out of memory");
        /* Resident and loading entries, most recently used first, then the
         * ones kept only for their users; the host tier, then each device. */
        for (Cache *c = d->store->cache; c; c = next_cache(d, c)) {
                for (CacheEntry *e = cache_first(c); e && n < total; e = cache_next(e), n++)
                        entry_fill(ptrs[n] = &entries[n], e, now);
                for (CacheEntry *e = cache_first_detached(c); e && n < total; e = cache_next(e), n++)
                        entry_fill(ptrs[n] = &entries[n], e, now);
        }
        list.n_entries = n;
        list.entries = ptrs;
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_LIST;
        reply.list = &list;
        return request_reply(p, id, &reply);
}

/* ---- the cluster -------------------------------------------------------- */

/* A resolve another node asked for (cluster/cluster.h). */
typedef struct ClusterWork {
        uv_work_t work;
        Driver *d;
        ClusterResolve *req;
        Roots *roots;
        Root *root;
        char *rel, *key, *component;
        Component *comp;
        int r;
        WdError err;
} ClusterWork;

static void cluster_work(uv_work_t *w) {
        ClusterWork *cw = w->data;

        cw->r = catalog_resolve(cw->root->catalog, cw->rel, cw->component, &cw->comp, &cw->err);
        if (cw->r == 0) {
                free(cw->comp->model);
                cw->comp->model = strdup(cw->key);
                if (!cw->comp->model)
                        cw->r = wd_error_set(&cw->err, -ENOMEM, "out of memory");
        }
}

static void cluster_work_free(ClusterWork *cw) {
        component_free(cw->comp);
        free(cw->rel);
        free(cw->key);
        free(cw->component);
        roots_unref(cw->roots);
        free(cw);
}

static void cluster_work_done(uv_work_t *w, int status) {
        ClusterWork *cw = w->data;
        Driver *d = cw->d;

        d->n_resolving--;
        if (status < 0 && cw->r == 0)
                cw->r = wd_error_set(&cw->err, -ECANCELED, "the resolve was cancelled");
        cluster_resolved(cw->req, cw->r, &cw->err, cw->comp, cw->root->fd);
        cluster_work_free(cw);
        driver_changed(d);
}

void driver_cluster_resolve(const char *model, const char *component, ClusterResolve *req, void *userdata) {
        Driver *d = userdata;
        ClusterWork *cw = calloc(1, sizeof(ClusterWork));
        WdError err = WD_ERROR_NULL;
        int r;

        if (!cw) {
                cluster_resolved(req, -ENOMEM, &(WdError){ .code = -ENOMEM, .message = "out of memory" }, NULL, -1);
                return;
        }
        cw->d = d;
        cw->req = req;
        if (!string_ok(model, PATH_MAX) || !string_ok(component, DRIVER_MAX_COMPONENT_NAME) ||
            (*component && !filename_is_plain(component)))
                r = wd_error_set(&err, WD_E_INVALID, "a model or component that is not well formed");
        else
                r = roots_resolve(d->roots, model, &cw->root, &cw->rel, &cw->key, &err);
        if (r == 0) {
                cw->roots = roots_ref(d->roots);
                cw->component = strdup(component);
                if (!cw->component)
                        r = wd_error_set(&err, -ENOMEM, "out of memory");
        }
        if (r == 0) {
                cw->work.data = cw;
                r = uv_queue_work(d->loop, &cw->work, cluster_work, cluster_work_done);
                if (r < 0)
                        r = wd_error_set(&err, -EIO, "cannot queue the resolve: %s", uv_strerror(r));
                else
                        d->n_resolving++;
        }
        if (r != 0) {
                /* Answered later, on the loop, like any resolve. */
                cw->r = r;
                cw->err = err;
                cluster_resolved(req, r, &err, NULL, -1);
                cluster_work_free(cw);
        }
}

/* The cluster's part of a reply: points into st (free st.nodes and the
 * arrays after the reply was sent). */
typedef struct ClusterReplyParts {
        ClusterStatus st;
        Weightd__V1__ClusterNode *nodes;
        Weightd__V1__ClusterNode **ptrs;
} ClusterReplyParts;

static void cluster_reply_parts_done(ClusterReplyParts *p) {
        free(p->st.nodes);
        free(p->nodes);
        free(p->ptrs);
}

static int cluster_reply(Driver *d, Weightd__V1__ClusterReply *cr, ClusterReplyParts *parts) {
        uint64_t now = now_usec();
        int r;

        weightd__v1__cluster_reply__init(cr);
        *parts = (ClusterReplyParts){};
        if (!d->cluster)
                return 0;
        r = cluster_get_status(d->cluster, &parts->st);
        if (r < 0)
                return r;
        parts->nodes = calloc(parts->st.n_nodes + 1, sizeof(*parts->nodes));
        parts->ptrs = calloc(parts->st.n_nodes + 1, sizeof(*parts->ptrs));
        if (!parts->nodes || !parts->ptrs)
                return -ENOMEM;
        cr->enabled = true;
        cr->node = (char *) parts->st.node;
        cr->generation = parts->st.generation;
        cr->peer_sent_bytes = parts->st.peer_sent_bytes;
        cr->peer_received_bytes = parts->st.peer_received_bytes;
        cr->storage_saved_bytes = parts->st.storage_saved_bytes;
        cr->gpu_lane = (char *) parts->st.gpu_lane;
        cr->lane_sent_bytes = parts->st.lane_sent_bytes;
        cr->lane_received_bytes = parts->st.lane_received_bytes;
        for (size_t i = 0; i < parts->st.n_nodes; i++) {
                const ClusterNodeStatus *n = &parts->st.nodes[i];
                Weightd__V1__ClusterNode *w = &parts->nodes[i];

                weightd__v1__cluster_node__init(w);
                w->name = (char *) n->name;
                w->address = (char *) n->address;
                w->state = (char *) n->state;
                w->generation = n->generation;
                w->rtt_us = n->rtt_usec;
                w->sent_bytes = n->sent_bytes;
                w->received_bytes = n->received_bytes;
                w->last_error = (char *) (n->last_error ? n->last_error : "");
                w->since_ms = n->since_usec && now > n->since_usec ? (now - n->since_usec) / 1000 : 0;
                parts->ptrs[i] = w;
        }
        cr->n_nodes = parts->st.n_nodes;
        cr->nodes = parts->ptrs;
        return 0;
}

static int handle_cluster(Driver *d, Peer *p, uint64_t id) {
        Weightd__V1__Envelope env = WEIGHTD__V1__ENVELOPE__INIT;
        Weightd__V1__Reply reply = WEIGHTD__V1__REPLY__INIT;
        Weightd__V1__ClusterReply cr;
        _cleanup_(cluster_reply_parts_done) ClusterReplyParts parts = {};

        if (cluster_reply(d, &cr, &parts) < 0)
                return request_reply_error(p, id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "out of memory");
        env.id = id;
        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_REPLY;
        env.reply = &reply;
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_CLUSTER;
        reply.cluster = &cr;
        return peer_send(p, &env, NULL, 0, NULL, 0);
}

static int handle_status(Driver *d, Peer *p, uint64_t id) {
        Weightd__V1__Reply reply = WEIGHTD__V1__REPLY__INIT;
        Weightd__V1__StatusReply st = WEIGHTD__V1__STATUS_REPLY__INIT;
        size_t n_dev = d->gpu_state == GPU_UP ? gpu_n_devices(d->tier->gpu) : 0;
        _cleanup_free_ Weightd__V1__Device *devs = calloc(MAX(n_dev, 1), sizeof(*devs));
        _cleanup_free_ Weightd__V1__Device **dev_ptrs = calloc(MAX(n_dev, 1), sizeof(*dev_ptrs));
        _cleanup_free_ char **roots = calloc(MAX(d->roots->n, 1), sizeof(char *));
        CacheStats cs;

        if (!roots || !devs || !dev_ptrs)
                return request_reply_error(p, id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "out of memory");
        cache_get_stats(d->store->cache, &cs);
        st.version = (char *) WEIGHTD_VERSION;
        st.pid = (uint32_t) getpid();
        st.host_budget_bytes = cs.budget;
        st.host_used_bytes = cs.used;
        st.host_evictable_bytes = cs.evictable;
        st.leases = d->peers->n_leases;
        st.connections = d->peers->n_peers;
        st.entries = (uint32_t) cs.n_entries;
        st.loading = d->store->jobs.n;
        st.evictions = cs.evictions;
        for (size_t i = 0; i < d->roots->n; i++)
                roots[i] = d->roots->items[i].path;
        st.n_model_roots = d->roots->n;
        st.model_roots = roots;
        st.gpu = (char *) d->gpu_reason;
        for (size_t i = 0; i < n_dev; i++) {
                const GpuDeviceInfo *g = gpu_device(d->tier->gpu, i);
                CacheStats ds;

                cache_get_stats(d->tier->caches[i], &ds);
                weightd__v1__device__init(&devs[i]);
                devs[i].index = g->index;
                devs[i].uuid = (char *) g->uuid;
                devs[i].name = (char *) g->name;
                devs[i].pci_bus_id = (char *) g->pci_bus_id;
                devs[i].total_bytes = g->total_bytes;
                devs[i].budget_bytes = ds.budget;
                devs[i].used_bytes = ds.used;
                devs[i].evictable_bytes = ds.evictable;
                dev_ptrs[i] = &devs[i];
        }
        st.n_devices = n_dev;
        st.devices = dev_ptrs;
        Weightd__V1__ClusterReply cr;
        _cleanup_(cluster_reply_parts_done) ClusterReplyParts parts = {};
        if (d->cluster && cluster_reply(d, &cr, &parts) == 0)
                st.cluster = &cr;
        if (d->status)
                d->status(&st, d->userdata);
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_STATUS;
        reply.status = &st;
        return request_reply(p, id, &reply);
}

static int handle_cancel(Driver *d, Peer *p, uint64_t id, const Weightd__V1__CancelRequest *req) {
        Weightd__V1__Reply reply = WEIGHTD__V1__REPLY__INIT;
        Request *r = request_find(p, req->target);

        if (!r)
                return request_reply_error(p, id, WEIGHTD__V1__CODE__NOT_FOUND,
                                           "request %" PRIu64 ": nothing to cancel", req->target);
        /* Off its job: a job nobody waits for any more is cancelled. */
        request_drop(r);
        (void) request_reply_error(p, req->target, WEIGHTD__V1__CODE__CANCELLED, "request %" PRIu64 " cancelled",
                                   req->target);
        driver_changed(d);
        return request_reply(p, id, &reply);
}

static int handle_hello(Driver *d, Peer *p, uint64_t id, const Weightd__V1__HelloRequest *req) {
        Weightd__V1__Reply reply = WEIGHTD__V1__REPLY__INIT;
        Weightd__V1__HelloReply hello = WEIGHTD__V1__HELLO_REPLY__INIT;
        char *features[] = { (char *) "host", (char *) "cuda" };

        if (p->hello)
                return request_reply_error(p, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT, "hello: already done");
        if (req->min_version > WIRE_VERSION || req->max_version < WIRE_VERSION) {
                request_reply_error(p, id, WEIGHTD__V1__CODE__UNSUPPORTED,
                                    "hello: the daemon speaks protocol version %u, the client %u..%u", WIRE_VERSION,
                                    req->min_version, req->max_version);
                peer_close_when_sent(p);
                return 0;
        }
        p->hello = true;
        hello.version = WIRE_VERSION;
        hello.daemon_version = (char *) WEIGHTD_VERSION;
        hello.n_features = d->gpu_state == GPU_UP ? 2 : 1;
        hello.features = features;
        hello.max_frame_size = d->config->max_request_size; /* the largest frame it accepts */
        hello.max_pending_requests = d->config->max_pending_requests;
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_HELLO;
        reply.hello = &hello;
        if (string_ok(req->client, 128))
                log_debug("%s: hello from \"%s\"", p->name, req->client);
        return request_reply(p, id, &reply);
}

static int driver_frame(Peer *p, WireEnvelope *env, void *userdata) {
        Driver *d = userdata;
        uint64_t id = env->id;

        switch (env->body_case) {
        case WEIGHTD__V1__ENVELOPE__BODY_REPLY:
        case WEIGHTD__V1__ENVELOPE__BODY_PROGRESS:
                log_warning("%s: sent a reply or an event to the daemon, disconnecting", p->name);
                return -EBADMSG;
        default:
                break;
        }
        if (id == 0)
                return request_reply_error(p, 0, WEIGHTD__V1__CODE__INVALID_ARGUMENT,
                                           "request id 0 is reserved for the daemon's own messages"),
                       0;
        if (!p->hello && env->body_case != WEIGHTD__V1__ENVELOPE__BODY_HELLO) {
                request_reply_error(p, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT, "the first request must be Hello");
                peer_close_when_sent(p);
                return 0;
        }
        if (request_find(p, id))
                return request_reply_error(p, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT,
                                           "request id %" PRIu64 " is already in flight", id),
                       0;

        switch (env->body_case) {
        case WEIGHTD__V1__ENVELOPE__BODY_HELLO:
                return handle_hello(d, p, id, env->hello), 0;
        case WEIGHTD__V1__ENVELOPE__BODY_LOAD:
                return handle_load(d, p, id, env->load, REQUEST_LOAD), 0;
        case WEIGHTD__V1__ENVELOPE__BODY_PREFETCH:
                return handle_load(d, p, id, env->prefetch, REQUEST_PREFETCH), 0;
        case WEIGHTD__V1__ENVELOPE__BODY_RELEASE:
                return handle_release(d, p, id, env->release), 0;
        case WEIGHTD__V1__ENVELOPE__BODY_EVICT:
                return handle_entry_op(d, p, id, env->evict, ENTRY_EVICT), 0;
        case WEIGHTD__V1__ENVELOPE__BODY_PIN:
                return handle_entry_op(d, p, id, env->pin, ENTRY_PIN), 0;
        case WEIGHTD__V1__ENVELOPE__BODY_UNPIN:
                return handle_entry_op(d, p, id, env->unpin, ENTRY_UNPIN), 0;
        case WEIGHTD__V1__ENVELOPE__BODY_LIST:
                return handle_list(d, p, id), 0;
        case WEIGHTD__V1__ENVELOPE__BODY_TENSORS:
                return handle_named(d, p, id, env->tensors, REQUEST_TENSORS), 0;
        case WEIGHTD__V1__ENVELOPE__BODY_STATUS:
                return handle_status(d, p, id), 0;
        case WEIGHTD__V1__ENVELOPE__BODY_CANCEL:
                return handle_cancel(d, p, id, env->cancel), 0;
        case WEIGHTD__V1__ENVELOPE__BODY_COMPONENTS:
                return handle_named(d, p, id, env->components, REQUEST_COMPONENTS), 0;
        case WEIGHTD__V1__ENVELOPE__BODY_CLUSTER:
                return handle_cluster(d, p, id), 0;
        default:
                return request_reply_error(p, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT, "unknown request"), 0;
        }
}

static void driver_closing(Peer *p, void *userdata) {
        while (p->requests)
                request_drop(request_from_link(p->requests));
        driver_changed(userdata);
}

static void driver_peers_changed(void *userdata) {
        driver_changed(userdata);
}

const PeerOps driver_peer_ops = {
        .frame = driver_frame,
        .closing = driver_closing,
        .changed = driver_peers_changed,
};

void driver_stop(Driver *d) {
        for (Peer *p = d->peers->peers, *next; p; p = next) {
                next = p->peers_next;
                while (p->requests) {
                        Request *r = request_from_link(p->requests);
                        uint64_t id = r->id;

                        request_drop(r);
                        (void) request_reply_error(p, id, WEIGHTD__V1__CODE__UNAVAILABLE, "weightd is stopping");
                }
        }
}
