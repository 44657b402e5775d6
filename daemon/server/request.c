/* Requests (see request.h) and every reply the daemon builds: manifests of
 * whole components (one slab per file), of shards and device slabs (one
 * slab laid out by a plan), listings of tensors and components, errors.
 *
 * A Load's reply takes a lease (a reference on the entry, held in the
 * peer's owner list) and borrows the descriptors of the entry's slabs; the
 * queued frame holds its own reference until it went out, so nothing is
 * duplicated at queue time and an evicted entry's memory stays until the
 * reply was sent. */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "server/request.h"
#include "util/log.h"
#include "util/time-util.h"

int wd_code_to_proto(int r) {
        switch (r) {
        case 0:
                return WEIGHTD__V1__CODE__OK;
        case WD_E_FORMAT:
                return WEIGHTD__V1__CODE__FORMAT_ERROR;
        case WD_E_NOT_FOUND:
        case -ENOENT:
        case -ENOTDIR:
                return WEIGHTD__V1__CODE__NOT_FOUND;
        case WD_E_UNSUPPORTED:
                return WEIGHTD__V1__CODE__UNSUPPORTED;
        case WD_E_BUDGET:
        case -ENOMEM:
        case -EMFILE:
        case -ENFILE:
        case -ENOSPC:
                return WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED;
        case WD_E_CHANGED:
        case -EAGAIN:
                return WEIGHTD__V1__CODE__UNAVAILABLE;
        case WD_E_BUSY:
                return WEIGHTD__V1__CODE__BUSY;
        case WD_E_PERMISSION:
        case -EACCES:
        case -EPERM:
                return WEIGHTD__V1__CODE__PERMISSION_DENIED;
        case WD_E_INVALID:
                return WEIGHTD__V1__CODE__INVALID_ARGUMENT;
        case -ECANCELED:
                return WEIGHTD__V1__CODE__CANCELLED;
        case -EINVAL:
        case -EFAULT:
                return WEIGHTD__V1__CODE__INTERNAL;
        default:
                return r < 0 ? WEIGHTD__V1__CODE__IO_ERROR : WEIGHTD__V1__CODE__INTERNAL;
        }
}

/* ---- plain replies ------------------------------------------------------ */

int request_reply(Peer *p, uint64_t id, Weightd__V1__Reply *reply) {
        Weightd__V1__Envelope env = WEIGHTD__V1__ENVELOPE__INIT;

        env.id = id;
        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_REPLY;
        env.reply = reply;
        return peer_send(p, &env, NULL, 0, NULL, 0);
}

int request_reply_error(Peer *p, uint64_t id, int code, const char *fmt, ...) {
        Weightd__V1__Reply reply = WEIGHTD__V1__REPLY__INIT;
        char msg[WD_ERROR_MESSAGE_MAX];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        reply.code = code;
        reply.message = msg;
        return request_reply(p, id, &reply);
}

int request_reply_wd_error(Peer *p, uint64_t id, int r, const WdError *err) {
        if (err && err->message[0])
                return request_reply_error(p, id, wd_code_to_proto(r), "%s", err->message);
        return request_reply_error(p, id, wd_code_to_proto(r), "%s", r < 0 ? strerror(-r) : wd_error_code_name(r));
}

/* ---- the request -------------------------------------------------------- */

Request *request_from_link(PeerLink *l) {
        return container_of(l, Request, link);
}

Request *request_new(Peer *p, uint64_t id, RequestKind kind, bool progress) {
        Request *r = calloc(1, sizeof(Request));

        if (!r)
                return NULL;
        *r = (Request){ .peer = p, .id = id, .kind = kind, .progress = progress, .device = -1,
                        .received_usec = now_usec() };
        peer_link(p, &r->link);
        return r;
}

static void request_detach_peer(Request *r) {
        if (!r->peer)
                return;
        peer_unlink(r->peer, &r->link);
        r->peer = NULL;
}

void request_free(Request *r) {
        if (!r)
                return;
        request_detach_peer(r);
        job_remove_waiter(&r->wait);
        shard_plan_free(r->plan);
        shard_spec_free(r->shard);
        free(r->variant);
        component_free(r->comp);
        component_list_free(r->list);
        free(r->rel);
        free(r->key);
        free(r->component);
        for (size_t i = 0; i < r->n_nodes; i++) {
                free(r->nodes[i]);
                if (r->node_specs)
                        shard_spec_free(r->node_specs[i]);
        }
        free(r->nodes);
        free(r->node_specs);
        free(r->node_devices);
        for (size_t i = 0; i < r->n_names; i++)
                free(r->names[i]);
        free(r->names);
        free(r->pick);
        roots_unref(r->roots);
        free(r);
}

void request_drop(Request *r) {
        if (r->resolving) {
                request_detach_peer(r); /* freed when the resolve ends */
                return;
        }
        request_free(r);
}

Request *request_find(Peer *p, uint64_t id) {
        LIST_FOREACH(links, l, p->requests) {
                Request *r = request_from_link(l);

                if (r->id == id)
                        return r;
        }
        return NULL;
}

/* ---- waiting ------------------------------------------------------------ */

static void on_progress(JobWaiter *w, uint64_t done, uint64_t total, uint64_t copied) {
        Request *r = container_of(w, Request, wait);
        Weightd__V1__Envelope env = WEIGHTD__V1__ENVELOPE__INIT;
        Weightd__V1__ProgressEvent ev = WEIGHTD__V1__PROGRESS_EVENT__INIT;

        if (!r->progress || !r->peer || r->progress_sent == done + copied)
                return;
        r->progress_sent = done + copied;
        ev.done_bytes = done;
        ev.total_bytes = total;
        ev.copied_bytes = copied;
        ev.model = r->comp ? r->comp->model : (char *) "";
        ev.component = r->comp ? r->comp->name : (char *) "";
        env.id = r->id;
        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_PROGRESS;
        env.progress = &ev;
        /* A failed send closes the peer, which drops this request. */
        (void) peer_send(r->peer, &env, NULL, 0, NULL, 0);
}

static void on_done(JobWaiter *w, const JobOutcome *o) {
        Request *r = container_of(w, Request, wait);

        request_complete(r, &(RequestOutcome){ .r = o->r,
                                                .err = o->err,
                                                .entry = o->entry,
                                                .plan = o->plan,
                                                .nodes = o->nodes,
                                                .n_nodes = o->n_nodes });
}

static const JobWaiterOps request_wait_ops = {
        .progress = on_progress,
        .done = on_done,
};

void request_wait(Request *r, Job *j) {
        job_add_waiter(j, &r->wait, &request_wait_ops);
}

/* ---- manifests ---------------------------------------------------------- */

/* The protobuf view of a component: arrays that point into the component's
 * headers and the plan (nothing is copied), and for a client that reads
 * LoadReply.table the tensors as its columns instead of Tensor messages:
 * 100,000 messages cost milliseconds to pack and to unpack, columns a few
 * memcpy()s. */
typedef struct Manifest {
        Weightd__V1__Slab *files;
        Weightd__V1__Slab **file_ptrs;
        Weightd__V1__MetadataEntry *meta;
        Weightd__V1__MetadataEntry **meta_ptrs;
        Weightd__V1__Tensor *tensors;
        Weightd__V1__Tensor **tensor_ptrs;
        size_t n_files, n_tensors;

        /* compact: the tensors are in table (tensors stays NULL). */
        bool compact;
        Weightd__V1__TensorTable table;
        char *dtype_names[_DTYPE_MAX];
        uint8_t dtype_index[_DTYPE_MAX]; /* + 1; 0: not in table.dtypes yet */
        size_t names_used, dims_used;
} Manifest;

static void manifest_done(Manifest *m) {
        free(m->files);
        free(m->file_ptrs);
        free(m->meta);
        free(m->meta_ptrs);
        free(m->tensors);
        free(m->tensor_ptrs);
        free(m->table.names.data);
        free(m->table.dtype.data);
        free(m->table.ndim.data);
        free(m->table.dims);
        free(m->table.offset);
        free(m->table.nbytes);
        free(m->table.slab);
        free(m->table.file);
        *m = (Manifest){};
}

/* One tensor of the reply, whichever form it takes. */
typedef struct ManifestRow {
        const char *name;
        Dtype dtype;
        unsigned ndim;
        const uint64_t *shape;
        uint32_t slab, file;
        uint64_t offset, nbytes;
        const ShardTensor *split; /* a rule split it: its part */
} ManifestRow;

/* What a table of these rows needs, or false when a row cannot go in one
 * (a split tensor, more than 255 dimensions). */
typedef struct TableSize {
        bool ok;
        size_t names, dims;
} TableSize;

static void row_measure(TableSize *z, const ManifestRow *x) {
        if (x->split || x->ndim > UINT8_MAX)
                z->ok = false;
        z->names += strlen(x->name) + 1;
        z->dims += x->ndim;
}

static void row_put(Manifest *m, size_t o, const ManifestRow *x) {
        if (m->compact) {
                Weightd__V1__TensorTable *t = &m->table;
                size_t len = strlen(x->name) + 1;

                memcpy(t->names.data + m->names_used, x->name, len);
                m->names_used += len;
                if (m->dtype_index[x->dtype] == 0) {
                        m->dtype_names[t->n_dtypes] = (char *) dtype_to_string(x->dtype);
                        m->dtype_index[x->dtype] = (uint8_t) ++t->n_dtypes;
                }
                t->dtype.data[o] = (uint8_t) (m->dtype_index[x->dtype] - 1);
                t->ndim.data[o] = (uint8_t) x->ndim;
                if (x->ndim > 0)
                        memcpy(t->dims + m->dims_used, x->shape, x->ndim * sizeof(uint64_t));
                m->dims_used += x->ndim;
                t->offset[o] = x->offset;
                t->nbytes[o] = x->nbytes;
                t->slab[o] = x->slab;
                if (t->file)
                        t->file[o] = x->file;
                return;
        }

        Weightd__V1__Tensor *t = &m->tensors[o];

        weightd__v1__tensor__init(t);
        t->name = (char *) x->name;
        t->dtype = (char *) dtype_to_string(x->dtype);
        t->n_shape = x->ndim;
        t->shape = (uint64_t *) x->shape;
        t->slab = x->slab;
        t->offset = x->offset;
        t->nbytes = x->nbytes;
        t->file = x->file;
        if (x->split) {
                t->n_full_shape = x->split->source->ndim;
                t->full_shape = x->split->source->shape;
                t->shard_dim = x->split->dim;
                t->shard_start = x->split->start;
        }
        m->tensor_ptrs[o] = t;
}

/* Each tensor of the reply in order: as they lie in the files (plan NULL:
 * slab i is file i), or where plan put them in its one slab; with pick
 * only those.  Measures into z when it is not NULL, else puts each row. */
static void manifest_rows(Manifest *m, TableSize *z, const Component *comp, const ShardPlan *plan,
                          const size_t *pick, size_t n_pick) {
        size_t t = 0, out = 0;

        for (size_t i = 0; !plan && i < comp->n_files; i++) {
                const StHeader *h = comp->files[i].header;

                for (size_t j = 0; j < h->n_tensors; j++, t++) {
                        const StTensor *st = &h->tensors[j];

                        if (pick && (out >= n_pick || pick[out] != t))
                                continue;
                        ManifestRow x = {
                                .name = st->name,
                                .dtype = st->dtype,
                                .ndim = st->ndim,
                                .shape = st->shape,
                                .slab = (uint32_t) i,
                                .offset = h->data_offset + st->begin,
                                .nbytes = st->end - st->begin,
                        };
                        if (z)
                                row_measure(z, &x);
                        else
                                row_put(m, out, &x);
                        out++;
                }
        }
        for (size_t o = 0; plan && o < m->n_tensors; o++) {
                const ShardTensor *st = &plan->tensors[pick ? pick[o] : o];
                ManifestRow x = {
                        .name = st->source->name,
                        .dtype = st->source->dtype,
                        .ndim = st->ndim,
                        .shape = st->shape,
                        .slab = 0,
                        .file = st->file,
                        .offset = st->offset,
                        .nbytes = st->nbytes,
                        .split = st->split ? st : NULL,
                };
                if (z)
                        row_measure(z, &x);
                else
                        row_put(m, o, &x);
        }
}

/* The columns of a table of n tensors; file only where plan is set (the
 * reply lists the files apart). */
static int table_alloc(Manifest *m, const TableSize *z, bool plan) {
        Weightd__V1__TensorTable *t = &m->table;
        size_t n = m->n_tensors;

        weightd__v1__tensor_table__init(t);
        t->count = (uint32_t) n;
        t->names.len = z->names;
        t->names.data = malloc(MAX(z->names, 1u));
        t->dtypes = m->dtype_names;
        t->dtype.len = n;
        t->dtype.data = malloc(MAX(n, 1u));
        t->ndim.len = n;
        t->ndim.data = malloc(MAX(n, 1u));
        t->n_dims = z->dims;
        t->dims = malloc(MAX(z->dims, 1u) * sizeof(uint64_t));
        t->n_offset = t->n_nbytes = t->n_slab = n;
        t->offset = malloc(MAX(n, 1u) * sizeof(uint64_t));
        t->nbytes = malloc(MAX(n, 1u) * sizeof(uint64_t));
        t->slab = malloc(MAX(n, 1u) * sizeof(uint32_t));
        if (plan) {
                t->n_file = n;
                t->file = malloc(MAX(n, 1u) * sizeof(uint32_t));
        }
        if (!t->names.data || !t->dtype.data || !t->ndim.data || !t->dims || !t->offset || !t->nbytes || !t->slab ||
            (plan && !t->file))
                return -ENOMEM;
        return 0;
}

/* The component's files with their __metadata__, and its tensors: as they
 * lie in the files (plan NULL: slab i is file i), or where plan put them in
 * its one slab.  pick (n_pick ascending positions in that order, checked
 * here) keeps only those tensors; NULL keeps every one.  compact puts them
 * in m->table where every one fits there.  Returns 0, -ENOMEM, or -EINVAL
 * when a position is past the end. */
static int manifest_build(Manifest *m, const Component *comp, const ShardPlan *plan, const size_t *pick,
                          size_t n_pick, bool compact) {
        size_t n_all = plan ? plan->n_tensors : comp->n_tensors, n_meta = 0, k = 0;
        size_t n_tensors = pick ? n_pick : n_all;
        TableSize z = { .ok = compact && n_tensors <= UINT32_MAX };

        for (size_t i = 0; pick && i < n_pick; i++)
                if (pick[i] >= n_all || (i > 0 && pick[i] <= pick[i - 1]))
                        return -EINVAL;
        *m = (Manifest){ .n_files = comp->n_files, .n_tensors = n_tensors };
        if (z.ok)
                manifest_rows(m, &z, comp, plan, pick, n_pick);
        m->compact = z.ok;
        for (size_t i = 0; i < comp->n_files; i++)
                n_meta += comp->files[i].header->n_metadata;
        m->files = calloc(MAX(comp->n_files, 1u), sizeof(*m->files));
        m->file_ptrs = calloc(MAX(comp->n_files, 1u), sizeof(*m->file_ptrs));
        m->meta = calloc(MAX(n_meta, 1u), sizeof(*m->meta));
        m->meta_ptrs = calloc(MAX(n_meta, 1u), sizeof(*m->meta_ptrs));
        if (m->compact) {
                if (table_alloc(m, &z, plan) < 0) {
                        manifest_done(m);
                        return -ENOMEM;
                }
        } else {
                m->tensors = calloc(MAX(n_tensors, 1u), sizeof(*m->tensors));
                m->tensor_ptrs = calloc(MAX(n_tensors, 1u), sizeof(*m->tensor_ptrs));
        }
        if (!m->files || !m->file_ptrs || !m->meta || !m->meta_ptrs ||
            (!m->compact && (!m->tensors || !m->tensor_ptrs))) {
                manifest_done(m);
                return -ENOMEM;
        }
        for (size_t i = 0; i < comp->n_files; i++) {
                const CatalogFile *f = &comp->files[i];
                const StHeader *h = f->header;
                Weightd__V1__Slab *s = &m->files[i];

                weightd__v1__slab__init(s);
                s->file = f->display;
                s->size = f->id.size;
                s->fd_index = (uint32_t) i;
                s->metadata = &m->meta_ptrs[k];
                s->n_metadata = h->n_metadata;
                for (size_t j = 0; j < h->n_metadata; j++, k++) {
                        weightd__v1__metadata_entry__init(&m->meta[k]);
                        m->meta[k].key = h->metadata[j].key;
                        m->meta[k].value = h->metadata[j].value;
                        m->meta_ptrs[k] = &m->meta[k];
                }
                m->file_ptrs[i] = s;
        }
        manifest_rows(m, NULL, comp, plan, pick, n_pick);
        return 0;
}

static void entry_release(void *obj) {
        cache_entry_unref(obj);
}

static void lease_release(void *obj) {
        cache_entry_unlease(obj);
}

/* A Load or Prefetch with its resident entry.  A Load takes a lease and
 * sends the slabs' descriptors. */
static int reply_loaded(Request *r, CacheEntry *e, const RequestOutcome *o) {
        const ShardPlan *plan = r->plan ? r->plan : o->plan;
        Peer *p = r->peer;
        Weightd__V1__Envelope env = WEIGHTD__V1__ENVELOPE__INIT;
        Weightd__V1__Reply reply = WEIGHTD__V1__REPLY__INIT;
        Weightd__V1__LoadReply load = WEIGHTD__V1__LOAD_REPLY__INIT;
        Weightd__V1__Slab slab = WEIGHTD__V1__SLAB__INIT, *slab_ptr = &slab;
        _cleanup_(manifest_done) Manifest m = {};
        _cleanup_free_ int *fds = NULL;
        const Component *comp = r->comp;
        bool device = r->device >= 0, one_slab = device || r->shard;
        char why[128];
        PeerRef *keep;
        size_t n_fds;
        int k;

        env.id = r->id;
        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_REPLY;
        env.reply = &reply;
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_LOAD;
        reply.load = &load;
        load.model = comp->model;
        load.component = comp->name;
        load.bytes = comp->total_bytes;
        load.was_resident = o->was_resident;
        if (device)
                load.target = r->target;
        else if (r->shard)
                load.target = (char *) "host";
        if (r->kind == REQUEST_PREFETCH) {
                _cleanup_free_ Weightd__V1__ClusterNodeLoad *nodes = NULL;
                _cleanup_free_ Weightd__V1__ClusterNodeLoad **node_ptrs = NULL;

                if (o->n_nodes > 0) {
                        nodes = calloc(o->n_nodes, sizeof(*nodes));
                        node_ptrs = calloc(o->n_nodes, sizeof(*node_ptrs));
                        if (!nodes || !node_ptrs)
                                return request_reply_error(p, r->id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED,
                                                           "out of memory");
                        for (size_t i = 0; i < o->n_nodes; i++) {
                                const JobNodeReport *n = &o->nodes[i];

                                weightd__v1__cluster_node_load__init(&nodes[i]);
                                nodes[i].node = (char *) n->node;
                                nodes[i].state = (char *) n->state;
                                nodes[i].message = (char *) n->message;
                                nodes[i].storage_read_bytes = n->storage_read_bytes;
                                nodes[i].peer_received_bytes = n->peer_received_bytes;
                                nodes[i].peer_sent_bytes = n->peer_sent_bytes;
                                node_ptrs[i] = &nodes[i];
                        }
                        load.n_cluster_nodes = o->n_nodes;
                        load.cluster_nodes = node_ptrs;
                }
                return peer_send(p, &env, NULL, 0, NULL, 0);
        }

        if (peer_lease_limit(p, why, sizeof(why)))
                return request_reply_error(p, r->id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "%s", why);
        if (one_slab && !plan)
                return request_reply_error(p, r->id, WEIGHTD__V1__CODE__INTERNAL, "%s: no layout for the reply",
                                           comp->model);
        k = manifest_build(&m, comp, one_slab ? plan : NULL, r->n_names > 0 ? r->pick : NULL, r->n_pick,
                           r->compact_tensors);
        if (k == -EINVAL)
                return request_reply_error(p, r->id, WEIGHTD__V1__CODE__INTERNAL,
                                           "%s: the tensors named do not match the resident entry", comp->model);
        if (k < 0)
                return request_reply_error(p, r->id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "out of memory");
        n_fds = one_slab ? 1 : comp->n_files;
        fds = calloc(MAX(n_fds, 1u), sizeof(int));
        keep = calloc(1, sizeof(PeerRef));
        if (!fds || !keep) {
                free(keep);
                return request_reply_error(p, r->id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "out of memory");
        }
        if (device) {
                uint64_t map_size = 0;

                fds[0] = cache_entry_memory_fd(e, &map_size);
                slab.size = plan->bytes;
                slab.map_size = map_size;
                slab.device_uuid = r->device_uuid;
                slab.device = r->target;
        } else if (r->shard) {
                if (e->n_slabs != 1 || e->slabs[0]->size != MAX(plan->bytes, 1u)) {
                        free(keep);
                        return request_reply_error(p, r->id, WEIGHTD__V1__CODE__INTERNAL,
                                                   "%s: the cached shard does not match its plan", comp->model);
                }
                fds[0] = e->slabs[0]->client_fd;
                slab.size = e->slabs[0]->size;
                slab.map_size = e->slabs[0]->capacity;
        } else {
                if (e->n_slabs != comp->n_files) {
                        free(keep);
                        return request_reply_error(p, r->id, WEIGHTD__V1__CODE__INTERNAL,
                                                   "%s: the resident entry has %zu slabs for %zu files",
                                                   comp->model, e->n_slabs, comp->n_files);
                }
                for (size_t i = 0; i < comp->n_files; i++) {
                        fds[i] = e->slabs[i]->client_fd;
                        m.files[i].map_size = e->slabs[i]->capacity;
                }
        }
        for (size_t i = 0; i < n_fds; i++)
                if (fds[i] < 0) {
                        free(keep);
                        return request_reply_error(p, r->id, WEIGHTD__V1__CODE__INTERNAL,
                                                   "%s: the entry has no descriptor to send", comp->model);
                }
        load.n_files = m.n_files;
        load.files = m.file_ptrs;
        if (m.compact)
                load.table = &m.table;
        else {
                load.n_tensors = m.n_tensors;
                load.tensors = m.tensor_ptrs;
        }
        if (one_slab) {
                for (size_t i = 0; i < m.n_files; i++) {
                        m.files[i].fd_index = 0;
                        m.files[i].size = 0;
                }
                slab.fd_index = 0;
                slab.file = (char *) "";
                load.n_slabs = 1;
                load.slabs = &slab_ptr;
        } else {
                load.n_slabs = m.n_files;
                load.slabs = m.file_ptrs;
                load.n_files = 0;
                load.files = NULL;
        }
        cache_entry_lease(e);
        load.lease = peer_lease_add(p, (PeerRef){ .obj = e, .release = lease_release });
        if (load.lease == 0) {
                free(keep);
                return request_reply_error(p, r->id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "out of memory");
        }
        keep[0] = (PeerRef){ .obj = cache_entry_ref(e), .release = entry_release };
        return peer_send(p, &env, fds, n_fds, keep, 1);
}

static void reply_tensors(Request *r) {
        Weightd__V1__Reply reply = WEIGHTD__V1__REPLY__INIT;
        Weightd__V1__TensorsReply tr = WEIGHTD__V1__TENSORS_REPLY__INIT;
        _cleanup_(manifest_done) Manifest m = {};

        if (manifest_build(&m, r->comp, NULL, NULL, 0, false) < 0) {
                request_reply_error(r->peer, r->id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "out of memory");
                return;
        }
        for (size_t i = 0; i < m.n_files; i++)
                m.files[i].fd_index = 0;
        tr.model = r->comp->model;
        tr.component = r->comp->name;
        tr.n_files = m.n_files;
        tr.files = m.file_ptrs;
        tr.n_tensors = m.n_tensors;
        tr.tensors = m.tensor_ptrs;
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_TENSORS;
        reply.tensors = &tr;
        request_reply(r->peer, r->id, &reply);
}

static void reply_components(Request *r) {
        Weightd__V1__Reply reply = WEIGHTD__V1__REPLY__INIT;
        Weightd__V1__ComponentsReply cr = WEIGHTD__V1__COMPONENTS_REPLY__INIT;
        const ComponentList *l = r->list;
        _cleanup_free_ Weightd__V1__ComponentInfo *infos = calloc(MAX(l->n, 1), sizeof(*infos));
        _cleanup_free_ Weightd__V1__ComponentInfo **ptrs = calloc(MAX(l->n, 1), sizeof(*ptrs));

        if (!infos || !ptrs) {
                request_reply_error(r->peer, r->id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "out of memory");
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
        cr.model = r->key;
        cr.diffusers = l->diffusers;
        cr.n_components = l->n;
        cr.components = ptrs;
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_COMPONENTS;
        reply.components = &cr;
        request_reply(r->peer, r->id, &reply);
}

void request_complete(Request *r, const RequestOutcome *o) {
        Peer *p = r->peer;

        /* Off the job and the peer first: what the reply does to the peer
         * (closing it, on an output limit) must not find this request. */
        job_remove_waiter(&r->wait);
        if (p) {
                peer_unlink(p, &r->link);
                r->peer = p; /* for the reply only; not linked any more */
        }
        if (p && !p->closing) {
                if (o->r != 0)
                        (void) request_reply_wd_error(p, r->id, o->r, o->err);
                else if (r->kind == REQUEST_TENSORS)
                        reply_tensors(r);
                else if (r->kind == REQUEST_COMPONENTS)
                        reply_components(r);
                else {
                        /* The entry stays while the reply is built (a
                         * cluster prefetch for other nodes has none). */
                        _cleanup_(cache_entry_unrefp) CacheEntry *e = o->entry ? cache_entry_ref(o->entry) : NULL;

                        (void) reply_loaded(r, e, o);
                }
        }
        r->peer = NULL;
        request_free(r);
        if (p)
                peer_resume(p);
}
