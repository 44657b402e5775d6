/* The requests of the control API: validation of every field protobuf-c
 * leaves unchecked, the handshake, and the replies (manifests with their slab
 * descriptors, listings, counters).
 *
 * Requests that name a model (Load, Prefetch, Tensors, Components) are
 * checked lexically here, resolved on the thread pool (resolve_work), and
 * finished back on the loop (resolve_done): answered, or a Load or Prefetch
 * attached to the job that reads its component.  Every other request is
 * answered at once. */

#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "server/server-private.h"
#include "util/log.h"

#define REPLY_ENVELOPE(env, reply, req_id)                        \
        Weightd__V1__Envelope env = WEIGHTD__V1__ENVELOPE__INIT;  \
        Weightd__V1__Reply reply = WEIGHTD__V1__REPLY__INIT;      \
        env.id = (req_id);                                        \
        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_REPLY;        \
        env.reply = &reply

static void request_detach_conn(Request *r) {
        Conn *c = r->conn;

        if (!c)
                return;
        LIST_REMOVE(conn, c->pending, r);
        c->n_pending--;
        r->conn = NULL;
}

static void request_detach_job(Request *r) {
        Job *j = r->job;

        if (!j)
                return;
        LIST_REMOVE(job, j->waiters, r);
        j->n_waiters--;
        r->job = NULL;
}

static void request_attach_job(Request *r, Job *j) {
        r->job = j;
        LIST_PREPEND(job, j->waiters, r);
        j->n_waiters++;
}

void request_free(Request *r) {
        request_detach_conn(r);
        request_detach_job(r);
        shard_request_forget(r);
        device_request_detach(r);
        shard_plan_free(r->plan);
        shard_spec_free(r->shard);
        free(r->variant);
        component_free(r->comp);
        component_list_free(r->list);
        free(r->rel);
        free(r->key);
        free(r->component);
        roots_unref(r->roots);
        free(r);
}

void request_drop(Request *r) {
        Job *j = r->job;

        if (r->resolving) {
                request_detach_conn(r); /* freed when the resolve ends */
                return;
        }
        request_free(r);
        if (j)
                server_job_waiter_gone(j);
}

static Request *request_new(Conn *c, uint64_t id, RequestKind kind, bool progress) {
        Request *r = calloc(1, sizeof(Request));

        if (!r)
                return NULL;
        *r = (Request){ .server = c->server, .conn = c, .id = id, .kind = kind, .progress = progress, .device = -1,
                        .received_usec = now_usec() };
        LIST_PREPEND(conn, c->pending, r);
        c->n_pending++;
        return r;
}

static Request *request_find(Conn *c, uint64_t id) {
        LIST_FOREACH(conn, r, c->pending)
                if (r->id == id)
                        return r;
        return NULL;
}

/* ---- manifests ---------------------------------------------------------- */

/* The protobuf view of a component: arrays that point into the component's
 * headers (nothing is copied). */
typedef struct Manifest {
        size_t n_files, n_tensors, n_meta;
        Weightd__V1__Slab *slabs;
        Weightd__V1__Slab **slab_ptrs;
        Weightd__V1__MetadataEntry *meta;
        Weightd__V1__MetadataEntry **meta_ptrs;
        Weightd__V1__Tensor *tensors;
        Weightd__V1__Tensor **tensor_ptrs;
} Manifest;

static void manifest_deinit(Manifest *m) {
        free(m->slabs);
        free(m->slab_ptrs);
        free(m->meta);
        free(m->meta_ptrs);
        free(m->tensors);
        free(m->tensor_ptrs);
}

/* entry NULL: no descriptors (Tensors). */
static int manifest_build(Manifest *m, const Component *comp, const CacheEntry *entry) {
        size_t n_meta = 0, t = 0, k = 0;

        *m = (Manifest){ .n_files = comp->n_files, .n_tensors = comp->n_tensors };
        for (size_t i = 0; i < comp->n_files; i++)
                n_meta += comp->files[i].header->n_metadata;
        m->n_meta = n_meta;

        m->slabs = calloc(MAX(comp->n_files, 1), sizeof(*m->slabs));
        m->slab_ptrs = calloc(MAX(comp->n_files, 1), sizeof(*m->slab_ptrs));
        m->meta = calloc(MAX(n_meta, 1), sizeof(*m->meta));
        m->meta_ptrs = calloc(MAX(n_meta, 1), sizeof(*m->meta_ptrs));
        m->tensors = calloc(MAX(comp->n_tensors, 1), sizeof(*m->tensors));
        m->tensor_ptrs = calloc(MAX(comp->n_tensors, 1), sizeof(*m->tensor_ptrs));
        if (!m->slabs || !m->slab_ptrs || !m->meta || !m->meta_ptrs || !m->tensors || !m->tensor_ptrs) {
                manifest_deinit(m);
                return -ENOMEM;
        }

        for (size_t i = 0; i < comp->n_files; i++) {
                const CatalogFile *f = &comp->files[i];
                const StHeader *h = f->header;
                Weightd__V1__Slab *s = &m->slabs[i];

                weightd__v1__slab__init(s);
                s->file = f->display;
                s->size = f->id.size;
                if (entry) {
                        s->fd_index = (uint32_t) i;
                        s->map_size = entry->slabs[i]->capacity;
                }
                s->metadata = &m->meta_ptrs[k];
                s->n_metadata = h->n_metadata;
                for (size_t j = 0; j < h->n_metadata; j++, k++) {
                        weightd__v1__metadata_entry__init(&m->meta[k]);
                        m->meta[k].key = h->metadata[j].key;
                        m->meta[k].value = h->metadata[j].value;
                        m->meta_ptrs[k] = &m->meta[k];
                }
                m->slab_ptrs[i] = s;

                for (size_t j = 0; j < h->n_tensors; j++, t++) {
                        const StTensor *st = &h->tensors[j];
                        Weightd__V1__Tensor *x = &m->tensors[t];

                        weightd__v1__tensor__init(x);
                        x->name = st->name;
                        x->dtype = (char *) dtype_to_string(st->dtype);
                        x->n_shape = st->ndim;
                        x->shape = st->shape;
                        x->slab = (uint32_t) i;
                        x->offset = h->data_offset + st->begin;
                        x->nbytes = st->end - st->begin;
                        m->tensor_ptrs[t] = x;
                }
        }
        return 0;
}

/* Reply to a Load or Prefetch with a resident entry.  A Load takes a lease
 * and sends the slabs' descriptors. */
static int reply_loaded(Conn *c, uint64_t id, RequestKind kind, const Component *comp, CacheEntry *entry,
                        bool was_resident) {
        REPLY_ENVELOPE(env, reply, id);
        Weightd__V1__LoadReply load = WEIGHTD__V1__LOAD_REPLY__INIT;
        _cleanup_free_ int *fds = NULL;
        Manifest m = {};
        int r;

        load.model = comp->model;
        load.component = comp->name;
        load.bytes = comp->total_bytes;
        load.was_resident = was_resident;
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_LOAD;
        reply.load = &load;

        if (kind == REQUEST_PREFETCH)
                return conn_send(c, &env, NULL, 0);

        if (conn_lease_limit(c, id))
                return 0;

        r = manifest_build(&m, comp, entry);
        fds = calloc(MAX(comp->n_files, 1), sizeof(int));
        if (r < 0 || !fds) {
                manifest_deinit(&m);
                return conn_send_error(c, id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "out of memory");
        }
        for (size_t i = 0; i < comp->n_files; i++)
                fds[i] = entry->slabs[i]->fd;
        load.lease = conn_lease_add(c, entry);
        if (load.lease == 0) {
                manifest_deinit(&m);
                return conn_send_error(c, id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "out of memory");
        }
        load.n_slabs = m.n_files;
        load.slabs = m.slab_ptrs;
        load.n_tensors = m.n_tensors;
        load.tensors = m.tensor_ptrs;
        r = conn_send(c, &env, fds, comp->n_files);
        manifest_deinit(&m);
        return r;
}

void dispatch_job_finished(Job *j, int r, CacheEntry *entry, const WdError *err) {
        while (j->waiters) {
                Request *req = j->waiters;
                Conn *c = req->conn;
                uint64_t id = req->id;
                RequestKind kind = req->kind;

                if (req->shard) {
                        /* It needed the whole component to cut its slices. */
                        request_detach_job(req);
                        shard_whole_loaded(req, r, entry, err);
                        continue;
                }
                request_free(req);
                if (r == 0)
                        (void) reply_loaded(c, id, kind, j->comp, entry, false);
                else
                        (void) conn_send_wd_error(c, id, r, err);
                conn_request_done(c);
        }
}

void dispatch_job_progress(Job *j) {
        uint64_t done = atomic_load(&j->done);

        /* A failed send closes that connection, which frees its requests
         * (maybe several of this job's): start over, skipping those told. */
restart:
        for (Request *r = j->waiters; r; r = r->job_next) {
                Weightd__V1__Envelope env = WEIGHTD__V1__ENVELOPE__INIT;
                Weightd__V1__ProgressEvent ev = WEIGHTD__V1__PROGRESS_EVENT__INIT;

                if (!r->progress || r->progress_sent == done)
                        continue;
                r->progress_sent = done;
                ev.done_bytes = done;
                ev.total_bytes = j->total;
                ev.model = j->comp->model;
                ev.component = j->comp->name;
                env.id = r->id;
                env.body_case = WEIGHTD__V1__ENVELOPE__BODY_PROGRESS;
                env.progress = &ev;
                if (conn_send(r->conn, &env, NULL, 0) < 0)
                        goto restart;
        }
}

/* ---- requests ----------------------------------------------------------- */

static bool string_ok(const char *s, size_t max) {
        return s && strnlen(s, max + 1) <= max;
}

/* Check a model and component from a peer and resolve them to a root and
 * the cache key.  Replies with the error itself; returns 0 or 1 (replied). */
static int component_ref_resolve(Conn *c, uint64_t id, const char *model, const char *component, Root **ret_root,
                                 char **ret_rel, char **ret_key) {
        WdError err = WD_ERROR_NULL;
        int r;

        if (!string_ok(model, PATH_MAX) || !*model)
                return conn_send_error(c, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT, "model: an absolute path is required"),
                       1;
        if (!string_ok(component, SERVER_MAX_COMPONENT_NAME) || (*component && !filename_is_plain(component)))
                return conn_send_error(c, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT,
                                       "component: not a plain name of at most %u bytes", SERVER_MAX_COMPONENT_NAME),
                       1;
        r = roots_resolve(c->server->roots, model, ret_root, ret_rel, ret_key, &err);
        if (r != 0) {
                if (r == WD_E_PERMISSION)
                        log_info("%s: refused: %s", c->name, err.message);
                conn_send_wd_error(c, id, r, &err);
                return 1;
        }
        return 0;
}

/* ---- resolving on the thread pool --------------------------------------- */

static void resolve_work(uv_work_t *w) {
        Request *r = w->data;

        /* Only the request's own fields and the catalog (under its lock):
         * the loop owns everything else. */
        pthread_mutex_lock(&r->server->catalog_lock);
        if (r->kind == REQUEST_COMPONENTS)
                r->r = catalog_list(r->root->catalog, r->rel, &r->list, &r->err);
        else
                r->r = catalog_resolve(r->root->catalog, r->rel, r->component, &r->comp, &r->err);
        pthread_mutex_unlock(&r->server->catalog_lock);
        /* A sharded load is planned here, before anything is read: globs
         * over every tensor name are no work for the loop. */
        if (r->r == 0 && r->comp && r->shard)
                r->r = shard_plan(r->comp, r->shard, 256, &r->plan, &r->err);
        if (r->r == 0 && r->comp) {
                /* Key the cache by the absolute path: two roots may hold
                 * the same relative one. */
                free(r->comp->model);
                r->comp->model = TAKE_PTR(r->key);
        }
}

static void resolve_done(uv_work_t *w, int status);

/* Check the model and component (lexically, here), then resolve them on the
 * thread pool; the request's reply comes from resolve_done(). */
static int request_resolve(Conn *c, uint64_t id, RequestKind kind, bool progress, const char *model,
                           const char *component, ShardSpec *shard) {
        _cleanup_(shard_spec_freep) ShardSpec *spec = shard;
        Server *s = c->server;
        Root *root;
        char *rel, *key;
        Request *r;
        int k;

        if (component_ref_resolve(c, id, model, component, &root, &rel, &key))
                return 0;
        r = request_new(c, id, kind, progress);
        if (!r) {
                free(rel);
                free(key);
                return conn_send_error(c, id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "out of memory");
        }
        r->roots = roots_ref(s->roots);
        r->root = root;
        r->rel = rel;
        r->key = key;
        r->component = strdup(component);
        if (spec) {
                r->variant = shard_spec_key(spec);
                r->shard = TAKE_PTR(spec);
        }
        if (!r->component || (r->shard && !r->variant)) {
                request_free(r);
                return conn_send_error(c, id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "out of memory");
        }
        r->work.data = r;
        k = uv_queue_work(&s->loop, &r->work, resolve_work, resolve_done);
        if (k < 0) {
                request_free(r);
                return conn_send_error(c, id, WEIGHTD__V1__CODE__INTERNAL, "cannot queue the resolve: %s",
                                       uv_strerror(k));
        }
        r->resolving = true;
        s->n_resolving++;
        return 0;
}

static void reply_tensors(Conn *c, uint64_t id, const Component *comp);
static void reply_components(Conn *c, uint64_t id, const char *model, const ComponentList *l);

/* A resolved Load or Prefetch: serve it from memory, or wait for a load
 * (joining one that runs).  Takes r. */
static void load_resolved(Request *r) {
        _cleanup_(component_freep) Component *comp = TAKE_PTR(r->comp);
        Server *s = r->server;
        Conn *c = r->conn;
        WdError err = WD_ERROR_NULL;
        uint64_t id = r->id;
        RequestKind kind = r->kind;
        CacheEntry *e;
        Job *j;
        int k;

        if (r->device >= 0) {
                device_load_resolved(r, TAKE_PTR(comp));
                return;
        }
        if (r->shard) {
                r->comp = TAKE_PTR(comp);
                shard_load_resolved(r);
                return;
        }

        /* Refused before anything is read: one reply carries every slab. */
        if (kind == REQUEST_LOAD && comp->n_files > WIRE_MAX_FDS) {
                request_free(r);
                conn_send_error(c, id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED,
                                "%s: %zu files, more than the %u descriptors one Load reply can carry "
                                "(Prefetch has no such limit)",
                                comp->model, comp->n_files, WIRE_MAX_FDS);
                return;
        }

        _cleanup_free_ FileId *ids = calloc(MAX(comp->n_files, 1), sizeof(FileId));
        if (!ids) {
                request_free(r);
                conn_send_error(c, id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "out of memory");
                return;
        }
        for (size_t i = 0; i < comp->n_files; i++)
                ids[i] = comp->files[i].id;
        e = cache_lookup(s->cache, comp->model, comp->name, "", ids, comp->n_files);
        if (!e)
                /* The same files by another path (a symlinked folder inside
                 * the root): one copy in memory, one read. */
                e = cache_lookup_files(s->cache, "", ids, comp->n_files);
        if (e && e->state == CACHE_ENTRY_RESIDENT) {
                request_free(r);
                reply_loaded(c, id, kind, comp, e, true);
                return;
        }
        j = e ? server_job_find(s, e) : NULL;
        if (!j) {
                k = server_job_start(s, r->root->fd, comp, r->received_usec, &j, &err);
                if (k != 0) {
                        request_free(r);
                        conn_send_wd_error(c, id, k, &err);
                        return;
                }
                comp = NULL; /* the job's now */
        }
        j->keep_host = true;
        request_attach_job(r, j);
}

static void resolve_done(uv_work_t *w, int status) {
        Request *r = w->data;
        Server *s = r->server;
        Conn *c = r->conn;
        uint64_t id = r->id;

        r->resolving = false;
        s->n_resolving--;
        if (!c) {
                /* The peer left or cancelled meanwhile. */
                request_free(r);
                server_maybe_exit(s);
                return;
        }
        if (status < 0 && r->r == 0)
                r->r = wd_error_set(&r->err, -ECANCELED, "the resolve was cancelled");
        if (r->r != 0) {
                int k = r->r;
                WdError err = r->err;

                if (k == WD_E_PERMISSION)
                        log_info("%s: refused: %s", c->name, err.message);
                request_free(r);
                conn_send_wd_error(c, id, k, &err);
        } else if (r->kind == REQUEST_LOAD || r->kind == REQUEST_PREFETCH) {
                load_resolved(r);
        } else if (r->kind == REQUEST_TENSORS) {
                _cleanup_(component_freep) Component *comp = TAKE_PTR(r->comp);
                request_free(r);
                reply_tensors(c, id, comp);
        } else {
                _cleanup_(component_list_freep) ComponentList *l = TAKE_PTR(r->list);
                _cleanup_free_ char *key = TAKE_PTR(r->key);
                request_free(r);
                reply_components(c, id, key, l);
        }
        conn_request_done(c);
}

static int handle_load(Conn *c, uint64_t id, const Weightd__V1__LoadRequest *req, RequestKind kind) {
        int device = -1, k;

        if (!string_ok(req->target, 64))
                return conn_send_error(c, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT, "target: too long");
        if (*req->target && strcmp(req->target, "host") != 0) {
                device = device_target(c, id, req->target);
                if (device < 0)
                        return 0;
        }
        if (req->keep_host > WEIGHTD__V1__KEEP_HOST__KEEP_HOST_NO)
                return conn_send_error(c, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT, "keep_host: unknown value %d",
                                       (int) req->keep_host);
        ShardSpec *spec = NULL;
        if (req->shard) {
                WdError err = WD_ERROR_NULL;
                int r = shard_spec_from_wire(req->shard, &spec, &err);
                if (r != 0)
                        return conn_send_wd_error(c, id, r, &err);
        }
        k = request_resolve(c, id, kind, req->progress, req->model, req->component, spec);
        if (k == 0 && device >= 0) {
                Request *r = request_find(c, id);

                if (r) {
                        r->device = device;
                        r->keep_host = req->keep_host;
                }
        }
        return k;
}

static int handle_release(Conn *c, uint64_t id, const Weightd__V1__ReleaseRequest *req) {
        REPLY_ENVELOPE(env, reply, id);
        Lease *l = conn_lease_find(c, req->lease);

        if (!l)
                return conn_send_error(c, id, WEIGHTD__V1__CODE__NOT_FOUND,
                                       "lease %" PRIu64 ": not held by this connection", req->lease);
        conn_lease_drop(c, l);
        server_update_status(c->server);
        return conn_send(c, &env, NULL, 0);
}

/* The cache after c: the host cache, then each device's. */
static Cache *next_cache(Server *s, Cache *c) {
        size_t n = s->dev_caches ? gpu_n_devices(s->gpu) : 0;

        if (c == s->cache)
                return n > 0 ? s->dev_caches[0] : NULL;
        for (size_t i = 0; i + 1 < n; i++)
                if (s->dev_caches[i] == c)
                        return s->dev_caches[i + 1];
        return NULL;
}

/* The next entry for a model and component after e (NULL: the first), in
 * the host tier or on a device, whatever its files and variant: NULL when
 * none is left. */
static CacheEntry *find_entry(Server *s, CacheEntry *e, const char *key, const char *component) {
        Cache *c = e ? e->cache : s->cache;

        for (e = e ? cache_next(e) : cache_first(c);; e = cache_next(e)) {
                while (!e) {
                        c = next_cache(s, c);
                        if (!c)
                                return NULL;
                        e = cache_first(c);
                }
                if (strcmp(e->model, key) == 0 && strcmp(e->component, component) == 0)
                        return e;
        }
}

typedef enum EntryOp {
        ENTRY_EVICT,
        ENTRY_PIN,
        ENTRY_UNPIN,
} EntryOp;

/* Evict, Pin and Unpin act on every entry of the component: the whole one
 * and each sharded one, in the host tier and on every device.  Evict takes all or none: one that is loading,
 * leased or pinned makes it BUSY and nothing is evicted. */
static int handle_entry_op(Conn *c, uint64_t id, const Weightd__V1__ComponentRef *ref, EntryOp op) {
        REPLY_ENVELOPE(env, reply, id);
        _cleanup_free_ char *rel = NULL, *key = NULL;
        WdError err = WD_ERROR_NULL;
        Server *s = c->server;
        CacheEntry *e, *next;
        unsigned n = 0;
        Root *root;
        int r;

        if (component_ref_resolve(c, id, ref->model, ref->component, &root, &rel, &key))
                return 0;
        e = find_entry(s, NULL, key, ref->component);
        if (!e)
                return conn_send_error(c, id, WEIGHTD__V1__CODE__NOT_FOUND, "%s%s%s: not resident", key,
                                       *ref->component ? " component " : "", ref->component);

        switch (op) {
        case ENTRY_EVICT:
                for (CacheEntry *x = e; x; x = find_entry(s, x, key, ref->component))
                        if (x->state != CACHE_ENTRY_RESIDENT || x->pinned || x->leases > 0) {
                                r = cache_entry_evict(x, &err);
                                if (r != 0) {
                                        if (*x->variant)
                                                wd_error_prefix(&err, "shard \"%s\"", x->variant);
                                        if (x->cache != s->cache)
                                                wd_error_prefix(&err, "%s", cache_name(x->cache));
                                        return conn_send_wd_error(c, id, r, &err);
                                }
                        }
                for (; e; e = next) {
                        next = find_entry(s, e, key, ref->component);
                        r = cache_entry_evict(e, &err);
                        if (r != 0)
                                return conn_send_wd_error(c, id, r, &err);
                        n++;
                }
                log_info("%s: evicted %s %s (%u entr%s)", c->name, key, ref->component, n, n == 1 ? "y" : "ies");
                break;
        case ENTRY_PIN:
                for (; e; e = find_entry(s, e, key, ref->component))
                        if (e->state == CACHE_ENTRY_RESIDENT) {
                                cache_entry_pin(e);
                                n++;
                        }
                if (n == 0)
                        return conn_send_error(c, id, WEIGHTD__V1__CODE__NOT_FOUND, "%s: still loading", key);
                break;
        case ENTRY_UNPIN:
                for (; e; e = find_entry(s, e, key, ref->component))
                        cache_entry_unpin(e);
                break;
        }
        server_update_status(s);
        return conn_send(c, &env, NULL, 0);
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

static int handle_list(Conn *c, uint64_t id) {
        REPLY_ENVELOPE(env, reply, id);
        Weightd__V1__ListReply list = WEIGHTD__V1__LIST_REPLY__INIT;
        _cleanup_free_ Weightd__V1__Entry *entries = NULL;
        _cleanup_free_ Weightd__V1__Entry **ptrs = NULL;
        Cache *cache = c->server->cache;
        uint64_t now = now_usec();
        size_t n = 0, total;
        CacheStats st;

        cache_get_stats(cache, &st);
        total = st.n_entries + st.n_detached + device_n_entries(c->server);
        entries = calloc(MAX(total, 1), sizeof(*entries));
        ptrs = calloc(MAX(total, 1), sizeof(*ptrs));
        if (!entries || !ptrs)
                return conn_send_error(c, id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "out of memory");
        /* Resident and loading entries, most recently used first, then the
         * ones kept only for their leases; the host tier, then each device. */
        for (size_t d = 0; d <= gpu_n_devices(c->server->gpu); d++) {
                if (d > 0) {
                        if (!c->server->dev_caches)
                                break;
                        cache = c->server->dev_caches[d - 1];
                }
                for (CacheEntry *e = cache_first(cache); e && n < total; e = cache_next(e), n++)
                        entry_fill(ptrs[n] = &entries[n], e, now);
                for (CacheEntry *e = cache_first_detached(cache); e && n < total; e = cache_next(e), n++)
                        entry_fill(ptrs[n] = &entries[n], e, now);
        }
        list.n_entries = n;
        list.entries = ptrs;
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_LIST;
        reply.list = &list;
        return conn_send(c, &env, NULL, 0);
}

static int handle_components(Conn *c, uint64_t id, const Weightd__V1__ComponentRef *ref) {
        if (*ref->component)
                return conn_send_error(c, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT,
                                       "components: name a model, not a component");
        return request_resolve(c, id, REQUEST_COMPONENTS, false, ref->model, "", NULL);
}

static void reply_components(Conn *c, uint64_t id, const char *model, const ComponentList *l) {
        REPLY_ENVELOPE(env, reply, id);
        Weightd__V1__ComponentsReply cr = WEIGHTD__V1__COMPONENTS_REPLY__INIT;
        _cleanup_free_ Weightd__V1__ComponentInfo *infos = NULL;
        _cleanup_free_ Weightd__V1__ComponentInfo **ptrs = NULL;

        infos = calloc(MAX(l->n, 1), sizeof(*infos));
        ptrs = calloc(MAX(l->n, 1), sizeof(*ptrs));
        if (!infos || !ptrs) {
                conn_send_error(c, id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "out of memory");
                return;
        }
        for (size_t i = 0; i < l->n; i++) {
                weightd__v1__component_info__init(&infos[i]);
                infos[i].name = l->items[i].name;
                infos[i].kind = (char *) component_kind_to_string(l->items[i].kind);
                infos[i].library = l->items[i].library ? l->items[i].library : (char *) "";
                infos[i].class_name = l->items[i].class_name ? l->items[i].class_name : (char *) "";
                ptrs[i] = &infos[i];
        }
        cr.model = (char *) model;
        cr.diffusers = l->diffusers;
        cr.n_components = l->n;
        cr.components = ptrs;
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_COMPONENTS;
        reply.components = &cr;
        conn_send(c, &env, NULL, 0);
}

static int handle_tensors(Conn *c, uint64_t id, const Weightd__V1__ComponentRef *ref) {
        return request_resolve(c, id, REQUEST_TENSORS, false, ref->model, ref->component, NULL);
}

static void reply_tensors(Conn *c, uint64_t id, const Component *comp) {
        REPLY_ENVELOPE(env, reply, id);
        Weightd__V1__TensorsReply tr = WEIGHTD__V1__TENSORS_REPLY__INIT;
        Manifest m;

        if (manifest_build(&m, comp, NULL) < 0) {
                conn_send_error(c, id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "out of memory");
                return;
        }
        tr.model = comp->model;
        tr.component = comp->name;
        tr.n_files = m.n_files;
        tr.files = m.slab_ptrs;
        tr.n_tensors = m.n_tensors;
        tr.tensors = m.tensor_ptrs;
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_TENSORS;
        reply.tensors = &tr;
        conn_send(c, &env, NULL, 0);
        manifest_deinit(&m);
}

static int handle_status(Conn *c, uint64_t id) {
        REPLY_ENVELOPE(env, reply, id);
        Weightd__V1__StatusReply st = WEIGHTD__V1__STATUS_REPLY__INIT;
        Server *s = c->server;
        _cleanup_free_ char **roots = calloc(MAX(s->roots->n, 1), sizeof(char *));
        _cleanup_free_ Weightd__V1__Device *devs = calloc(MAX(gpu_n_devices(s->gpu), 1), sizeof(*devs));
        _cleanup_free_ Weightd__V1__Device **dev_ptrs = calloc(MAX(gpu_n_devices(s->gpu), 1), sizeof(*dev_ptrs));
        CacheStats cs;

        if (!roots || !devs || !dev_ptrs)
                return conn_send_error(c, id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "out of memory");
        cache_get_stats(s->cache, &cs);
        st.version = (char *) WEIGHTD_VERSION;
        st.pid = (uint32_t) getpid();
        st.uptime_ms = (now_usec() - s->started_usec) / 1000;
        st.host_budget_bytes = cs.budget;
        st.host_used_bytes = cs.used;
        st.host_evictable_bytes = cs.evictable;
        st.storage_read_bytes = s->storage_read_retired + reader_bytes_read(s->reader);
        st.leases = s->n_leases;
        st.connections = s->n_conns;
        st.entries = (uint32_t) cs.n_entries;
        st.loading = s->n_jobs;
        st.evictions = cs.evictions;
        for (size_t i = 0; i < s->roots->n; i++)
                roots[i] = s->roots->items[i].path;
        st.n_model_roots = s->roots->n;
        st.model_roots = roots;
        st.socket = s->socket_path;
        st.hugetlb = s->load_opts.pages != SLAB_PAGES_SMALL && s->hugetlb_free_pages > 0;
        device_status(s, &st, devs, dev_ptrs);
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_STATUS;
        reply.status = &st;
        return conn_send(c, &env, NULL, 0);
}

static int handle_cancel(Conn *c, uint64_t id, const Weightd__V1__CancelRequest *req) {
        REPLY_ENVELOPE(env, reply, id);
        Request *r = request_find(c, req->target);

        if (!r)
                return conn_send_error(c, id, WEIGHTD__V1__CODE__NOT_FOUND,
                                       "request %" PRIu64 ": nothing to cancel", req->target);
        request_drop(r);
        (void) conn_send_error(c, req->target, WEIGHTD__V1__CODE__CANCELLED, "request %" PRIu64 " cancelled",
                               req->target);
        if (conn_send(c, &env, NULL, 0) < 0)
                return 0;
        conn_request_done(c);
        return 0;
}

static int handle_hello(Conn *c, uint64_t id, const Weightd__V1__HelloRequest *req) {
        REPLY_ENVELOPE(env, reply, id);
        Weightd__V1__HelloReply hello = WEIGHTD__V1__HELLO_REPLY__INIT;
        char *features[] = { (char *) "host", (char *) "cuda" };

        if (c->hello)
                return conn_send_error(c, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT, "hello: already done");
        if (req->min_version > WIRE_VERSION || req->max_version < WIRE_VERSION) {
                conn_send_error(c, id, WEIGHTD__V1__CODE__UNSUPPORTED,
                                "hello: the daemon speaks protocol version %u, the client %u..%u", WIRE_VERSION,
                                req->min_version, req->max_version);
                conn_close_when_sent(c);
                return 0;
        }
        c->hello = true;
        hello.version = WIRE_VERSION;
        hello.daemon_version = (char *) WEIGHTD_VERSION;
        hello.n_features = c->server->gpu_state == GPU_UP ? 2 : 1;
        hello.features = features;
        hello.max_frame_size = c->server->config->max_frame_size;
        hello.max_pending_requests = c->server->config->max_pending_requests;
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_HELLO;
        reply.hello = &hello;
        if (string_ok(req->client, 128))
                log_debug("%s: hello from \"%s\"", c->name, req->client);
        return conn_send(c, &env, NULL, 0);
}

int dispatch_frame(Conn *c, WireEnvelope *env) {
        uint64_t id = env->id;

        switch (env->body_case) {
        case WEIGHTD__V1__ENVELOPE__BODY_REPLY:
        case WEIGHTD__V1__ENVELOPE__BODY_PROGRESS:
                log_warning("%s: sent a reply or an event to the daemon, disconnecting", c->name);
                return -EBADMSG;
        default:
                break;
        }

        if (id == 0)
                return conn_send_error(c, 0, WEIGHTD__V1__CODE__INVALID_ARGUMENT,
                                       "request id 0 is reserved for the daemon's own messages"),
                       0;
        if (!c->hello && env->body_case != WEIGHTD__V1__ENVELOPE__BODY_HELLO) {
                conn_send_error(c, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT, "the first request must be Hello");
                conn_close_when_sent(c);
                return 0;
        }
        if (request_find(c, id))
                return conn_send_error(c, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT,
                                       "request id %" PRIu64 " is already in flight", id),
                       0;

        switch (env->body_case) {
        case WEIGHTD__V1__ENVELOPE__BODY_HELLO:
                return handle_hello(c, id, env->hello), 0;
        case WEIGHTD__V1__ENVELOPE__BODY_LOAD:
                return handle_load(c, id, env->load, REQUEST_LOAD), 0;
        case WEIGHTD__V1__ENVELOPE__BODY_PREFETCH:
                return handle_load(c, id, env->prefetch, REQUEST_PREFETCH), 0;
        case WEIGHTD__V1__ENVELOPE__BODY_RELEASE:
                return handle_release(c, id, env->release), 0;
        case WEIGHTD__V1__ENVELOPE__BODY_EVICT:
                return handle_entry_op(c, id, env->evict, ENTRY_EVICT), 0;
        case WEIGHTD__V1__ENVELOPE__BODY_PIN:
                return handle_entry_op(c, id, env->pin, ENTRY_PIN), 0;
        case WEIGHTD__V1__ENVELOPE__BODY_UNPIN:
                return handle_entry_op(c, id, env->unpin, ENTRY_UNPIN), 0;
        case WEIGHTD__V1__ENVELOPE__BODY_LIST:
                return handle_list(c, id), 0;
        case WEIGHTD__V1__ENVELOPE__BODY_TENSORS:
                return handle_tensors(c, id, env->tensors), 0;
        case WEIGHTD__V1__ENVELOPE__BODY_STATUS:
                return handle_status(c, id), 0;
        case WEIGHTD__V1__ENVELOPE__BODY_CANCEL:
                return handle_cancel(c, id, env->cancel), 0;
        case WEIGHTD__V1__ENVELOPE__BODY_COMPONENTS:
                return handle_components(c, id, env->components), 0;
        default:
                return conn_send_error(c, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT, "unknown request"), 0;
        }
}
