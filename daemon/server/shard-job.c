/* Sharded delivery to the host: a Load or Prefetch with a Shard gets one
 * derived memfd slab holding only its rank's slices of the whole component,
 * cached as its own entry (variant: the spec's canonical key) in the host
 * cache, under the same budget.
 *
 * The way there: the request is planned with its resolve (shard_plan(), on
 * the thread pool, so a bad spec fails before anything is read).  A resident
 * derived entry is served at once.  Otherwise the whole component must be
 * resident: the request joins the running load or starts one exactly as an
 * unsharded one does (and hears its progress), then a build copies the
 * slices out of the whole entry's slabs on the thread pool.  A build holds a
 * lease on the whole entry while it copies (nothing can evict it under the
 * copy) and reserves the derived entry in the cache before it starts;
 * identical requests meanwhile wait for the same build.  The whole entry
 * stays an ordinary evictable entry afterwards. */

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "server/server-private.h"
#include "util/log.h"

/* Limits on a Shard from the wire. */
#define SHARD_MAX_WORLD 65536u
#define SHARD_MAX_RULES 64u
#define SHARD_MAX_PATTERN 256u
/* fnmatch() backtracks over every '*': more than a few make a pattern that
 * can take very long on a long name. */
#define SHARD_MAX_STARS 4u

struct ShardBuild {
        Server *server;
        LIST_FIELDS(ShardBuild, builds); /* in server->shard_builds */
        CacheEntry *derived;             /* LOADING while the build runs */
        CacheEntry *whole;               /* leased while the build runs */
        Component *comp;                 /* headers and names, no descriptors read */
        ShardPlan *plan;
        char *name;                      /* for the memfd: "MODEL rank R of W" */
        Request *waiters;
        unsigned n_waiters;
        uv_work_t work;
        const uint8_t **files;           /* the whole entry's slabs, by file */
        SlabPages pages;
        Slab *slab;
        int r; /* of the work */
        uint64_t started_usec;
};

/* ---- the spec from the wire --------------------------------------------- */

int shard_spec_from_wire(const Weightd__V1__Shard *w, ShardSpec **ret, WdError *err) {
        _cleanup_(shard_spec_freep) ShardSpec *spec = NULL;

        if (w->world == 0 || w->world > SHARD_MAX_WORLD)
                return wd_error_set(err, WD_E_INVALID, "shard: world %u is not in 1..%u", w->world, SHARD_MAX_WORLD);
        if (w->rank >= w->world)
                return wd_error_set(err, WD_E_INVALID, "shard: rank %u is not below world %u", w->rank, w->world);
        if (w->n_rules > SHARD_MAX_RULES)
                return wd_error_set(err, WD_E_INVALID, "shard: %zu rules, more than the limit of %u", w->n_rules,
                                    SHARD_MAX_RULES);
        for (size_t i = 0; i < w->n_rules; i++) {
                const Weightd__V1__ShardRule *x = w->rules[i];
                unsigned stars = 0;
                size_t len;

                if (!x || !x->pattern)
                        return wd_error_set(err, WD_E_INVALID, "shard: rule %zu has no pattern", i);
                len = strnlen(x->pattern, SHARD_MAX_PATTERN + 1);
                if (len == 0 || len > SHARD_MAX_PATTERN)
                        return wd_error_set(err, WD_E_INVALID, "shard: rule %zu: the pattern must have 1 to %u bytes",
                                            i, SHARD_MAX_PATTERN);
                for (size_t k = 0; k < len; k++) {
                        unsigned char ch = (unsigned char) x->pattern[k];

                        if (ch < 0x20 || ch == 0x7f)
                                return wd_error_set(err, WD_E_INVALID,
                                                    "shard: rule %zu: the pattern has a control byte at %zu", i, k);
                        stars += ch == '*';
                }
                if (stars > SHARD_MAX_STARS)
                        return wd_error_set(err, WD_E_INVALID, "shard: rule %zu: %u '*' in the pattern, the limit is %u",
                                            i, stars, SHARD_MAX_STARS);
                if (x->dim > 1)
                        return wd_error_set(err, WD_E_INVALID,
                                            "shard: rule %zu: dim %u, only dimensions 0 and 1 can be split", i, x->dim);
        }
        /* World 1, or no rules, splits nothing: an ordinary load, served from
         * the whole entry rather than a copy of it. */
        if (w->world == 1 || w->n_rules == 0) {
                *ret = NULL;
                return 0;
        }

        spec = calloc(1, sizeof(ShardSpec));
        if (!spec)
                return wd_error_set(err, -ENOMEM, "out of memory");
        spec->rules = calloc(MAX(w->n_rules, 1u), sizeof(ShardRule));
        if (!spec->rules)
                return wd_error_set(err, -ENOMEM, "out of memory");
        spec->rank = w->rank;
        spec->world = w->world;
        spec->uneven = w->uneven;
        for (size_t i = 0; i < w->n_rules; i++) {
                spec->rules[i].pattern = strdup(w->rules[i]->pattern);
                if (!spec->rules[i].pattern)
                        return wd_error_set(err, -ENOMEM, "out of memory");
                spec->rules[i].dim = w->rules[i]->dim;
                spec->n_rules = i + 1;
        }
        *ret = TAKE_PTR(spec);
        return 0;
}

/* ---- replies ------------------------------------------------------------ */

/* The size of a derived slab: at least one byte, so that every slab can be
 * mapped. */
static uint64_t derived_size(const ShardPlan *p) {
        return MAX(p->bytes, 1u);
}

void plan_reply_done(PlanReply *pr) {
        free(pr->files);
        free(pr->file_ptrs);
        free(pr->meta);
        free(pr->meta_ptrs);
        free(pr->tensors);
        free(pr->tensor_ptrs);
        *pr = (PlanReply){};
}

int plan_reply_fill(PlanReply *pr, const Component *comp, const ShardPlan *plan, Weightd__V1__LoadReply *load) {
        size_t n_meta = 0, k = 0;

        for (size_t i = 0; i < comp->n_files; i++)
                n_meta += comp->files[i].header->n_metadata;
        pr->files = calloc(MAX(comp->n_files, 1u), sizeof(*pr->files));
        pr->file_ptrs = calloc(MAX(comp->n_files, 1u), sizeof(*pr->file_ptrs));
        pr->meta = calloc(MAX(n_meta, 1u), sizeof(*pr->meta));
        pr->meta_ptrs = calloc(MAX(n_meta, 1u), sizeof(*pr->meta_ptrs));
        pr->tensors = calloc(MAX(plan->n_tensors, 1u), sizeof(*pr->tensors));
        pr->tensor_ptrs = calloc(MAX(plan->n_tensors, 1u), sizeof(*pr->tensor_ptrs));
        if (!pr->files || !pr->file_ptrs || !pr->meta || !pr->meta_ptrs || !pr->tensors || !pr->tensor_ptrs) {
                plan_reply_done(pr);
                return -ENOMEM;
        }

        /* The component's files: names and __metadata__, no descriptors. */
        for (size_t i = 0; i < comp->n_files; i++) {
                const StHeader *h = comp->files[i].header;
                Weightd__V1__Slab *f = &pr->files[i];

                weightd__v1__slab__init(f);
                f->file = comp->files[i].display;
                f->metadata = &pr->meta_ptrs[k];
                f->n_metadata = h->n_metadata;
                for (size_t j = 0; j < h->n_metadata; j++, k++) {
                        weightd__v1__metadata_entry__init(&pr->meta[k]);
                        pr->meta[k].key = h->metadata[j].key;
                        pr->meta[k].value = h->metadata[j].value;
                        pr->meta_ptrs[k] = &pr->meta[k];
                }
                pr->file_ptrs[i] = f;
        }

        /* Every tensor in slab 0, where the plan put it. */
        for (size_t i = 0; i < plan->n_tensors; i++) {
                const ShardTensor *t = &plan->tensors[i];
                Weightd__V1__Tensor *x = &pr->tensors[i];

                weightd__v1__tensor__init(x);
                x->name = t->source->name;
                x->dtype = (char *) dtype_to_string(t->source->dtype);
                x->n_shape = t->ndim;
                x->shape = t->shape;
                x->slab = 0;
                x->offset = t->offset;
                x->nbytes = t->nbytes;
                x->file = t->file;
                if (t->split) {
                        x->n_full_shape = t->source->ndim;
                        x->full_shape = t->source->shape;
                        x->shard_dim = t->dim;
                        x->shard_start = t->start;
                }
                pr->tensor_ptrs[i] = x;
        }
        load->n_files = comp->n_files;
        load->files = pr->file_ptrs;
        load->n_tensors = plan->n_tensors;
        load->tensors = pr->tensor_ptrs;
        return 0;
}

/* Reply to a sharded Load or Prefetch with the resident derived entry.  A
 * Load takes a lease on it and sends its one descriptor. */
static int reply_sharded(Conn *c, uint64_t id, RequestKind kind, const Component *comp, const ShardPlan *plan,
                         CacheEntry *entry, bool was_resident) {
        Weightd__V1__Envelope env = WEIGHTD__V1__ENVELOPE__INIT;
        Weightd__V1__Reply reply = WEIGHTD__V1__REPLY__INIT;
        Weightd__V1__LoadReply load = WEIGHTD__V1__LOAD_REPLY__INIT;
        Weightd__V1__Slab slab = WEIGHTD__V1__SLAB__INIT, *slab_ptr = &slab;
        _cleanup_(plan_reply_done) PlanReply pr = {};
        const Slab *s;
        int fd;

        env.id = id;
        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_REPLY;
        env.reply = &reply;
        load.model = comp->model;
        load.component = comp->name;
        load.bytes = comp->total_bytes;
        load.was_resident = was_resident;
        load.target = (char *) "host";
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_LOAD;
        reply.load = &load;

        if (kind == REQUEST_PREFETCH)
                return conn_send(c, &env, NULL, 0);

        if (entry->n_slabs != 1 || entry->slabs[0]->size != derived_size(plan))
                return conn_send_error(c, id, WEIGHTD__V1__CODE__INTERNAL,
                                       "%s: the cached shard does not match its plan", comp->model);
        if (conn_lease_limit(c, id))
                return 0;
        if (plan_reply_fill(&pr, comp, plan, &load) < 0)
                return conn_send_error(c, id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "out of memory");

        s = entry->slabs[0];
        slab.fd_index = 0;
        slab.size = s->size;
        slab.map_size = s->capacity;
        slab.file = (char *) "";
        load.n_slabs = 1;
        load.slabs = &slab_ptr;
        load.lease = conn_lease_add(c, entry);
        if (load.lease == 0)
                return conn_send_error(c, id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "out of memory");
        fd = s->fd;
        return conn_send(c, &env, &fd, 1);
}

/* Answer r (taken) from a resident derived entry. */
static void request_reply_sharded(Request *r, const Component *comp, const ShardPlan *plan, CacheEntry *derived,
                                  bool was_resident) {
        Conn *c = r->conn;
        uint64_t id = r->id;
        RequestKind kind = r->kind;

        /* The reply may outlive r's own copies: it uses the ones given. */
        _cleanup_(component_freep) Component *own_comp = comp == r->comp ? TAKE_PTR(r->comp) : NULL;
        _cleanup_(shard_plan_freep) ShardPlan *own_plan = plan == r->plan ? TAKE_PTR(r->plan) : NULL;

        request_free(r);
        (void) reply_sharded(c, id, kind, comp, plan, derived, was_resident);
        conn_request_done(c);
}

static void request_fail(Request *r, int k, const WdError *err) {
        Conn *c = r->conn;
        uint64_t id = r->id;

        request_free(r);
        (void) conn_send_wd_error(c, id, k, err);
        conn_request_done(c);
}

/* ---- builds ------------------------------------------------------------- */

static ShardBuild *build_find(Server *s, CacheEntry *derived) {
        LIST_FOREACH(builds, b, s->shard_builds)
                if (b->derived == derived)
                        return b;
        return NULL;
}

static void build_attach(ShardBuild *b, Request *r) {
        r->build = b;
        LIST_PREPEND(build, b->waiters, r);
        b->n_waiters++;
}

void shard_request_forget(Request *r) {
        ShardBuild *b = r->build;

        if (!b)
                return;
        /* The build goes on: its slab is cached for the next request. */
        LIST_REMOVE(build, b->waiters, r);
        b->n_waiters--;
        r->build = NULL;
}

static void build_free(ShardBuild *b) {
        if (!b)
                return;
        component_free(b->comp);
        shard_plan_free(b->plan);
        slab_free(b->slab);
        free(b->files);
        free(b->name);
        free(b);
}

static void build_work(uv_work_t *w) {
        ShardBuild *b = w->data;
        const ShardPlan *p = b->plan;
        int r;

        r = slab_new(&b->slab, b->name, derived_size(p), b->pages);
        if (r < 0) {
                b->r = r;
                return;
        }
        shard_copy_host(p, b->files, b->slab->data, 0, p->n_tensors);
        b->r = slab_seal(b->slab);
}

static void build_done(uv_work_t *w, int status) {
        ShardBuild *b = w->data;
        Server *s = b->server;
        double secs = (double) (now_usec() - b->started_usec) / 1e6;
        WdError err = WD_ERROR_NULL;
        int r = b->r;

        LIST_REMOVE(builds, s->shard_builds, b);
        cache_entry_unlease(TAKE_PTR(b->whole)); /* may free it if it went stale */

        if (status < 0 && r == 0)
                r = -ECANCELED;
        if (r == 0) {
                Slab **slabs = calloc(1, sizeof(Slab *));

                if (!slabs)
                        r = -ENOMEM;
                else {
                        slabs[0] = TAKE_PTR(b->slab);
                        cache_entry_set_resident(b->derived, slabs, 1);
                }
        }
        if (r == 0)
                log_info("sharded %s%s%s (%s): %.1f MiB in %.3f s (%.2f GB/s)", b->comp->model,
                         *b->comp->name ? " " : "", b->comp->name, b->derived->variant,
                         (double) b->plan->bytes / (1u << 20), secs,
                         secs > 0 ? (double) b->plan->bytes / secs / 1e9 : 0.0);
        else {
                wd_error_set(&err, r, "%s: cannot build the shard slab (%s): %s", b->comp->model, b->derived->variant,
                             strerror(-r));
                log_warning("%s", err.message);
                cache_entry_abort(b->derived);
                b->derived = NULL;
        }

        while (b->waiters) {
                Request *req = b->waiters;

                shard_request_forget(req);
                if (r == 0)
                        request_reply_sharded(req, req->comp ? req->comp : b->comp, req->plan ? req->plan : b->plan,
                                              b->derived, false);
                else
                        request_fail(req, r, &err);
        }
        build_free(b);
        server_update_status(s);
}

/* A copy of comp without its descriptors: names, identities and headers
 * (shared), which is all a plan and a reply need. */
static int component_copy_names(const Component *comp, Component **ret) {
        _cleanup_(component_freep) Component *n = calloc(1, sizeof(Component));

        if (!n)
                return -ENOMEM;
        n->model = strdup(comp->model);
        n->name = strdup(comp->name);
        n->files = calloc(MAX(comp->n_files, 1u), sizeof(CatalogFile));
        if (!n->model || !n->name || !n->files)
                return -ENOMEM;
        for (size_t i = 0; i < comp->n_files; i++) {
                const CatalogFile *f = &comp->files[i];
                CatalogFile *g = &n->files[i];

                *g = (CatalogFile){ .fd = -1, .id = f->id };
                n->n_files = i + 1;
                g->path = strdup(f->path);
                g->display = strdup(f->display);
                if (!g->path || !g->display)
                        return -ENOMEM;
                g->header = st_header_ref(f->header);
        }
        n->total_bytes = comp->total_bytes;
        n->n_tensors = comp->n_tensors;
        *ret = TAKE_PTR(n);
        return 0;
}

static FileId *component_ids(const Component *comp) {
        FileId *ids = calloc(MAX(comp->n_files, 1u), sizeof(FileId));

        if (ids)
                for (size_t i = 0; i < comp->n_files; i++)
                        ids[i] = comp->files[i].id;
        return ids;
}

static CacheEntry *lookup(Server *s, const Component *comp, const char *variant, const FileId *ids) {
        CacheEntry *e = cache_lookup(s->cache, comp->model, comp->name, variant, ids, comp->n_files);

        /* The same files by another path: one copy in memory. */
        return e ? e : cache_lookup_files(s->cache, variant, ids, comp->n_files);
}

/* The derived entry of r's files and variant, if there is one: answer r or
 * join its build.  Returns true when r was taken. */
static bool derived_serve(Request *r, const FileId *ids) {
        Server *s = r->server;
        CacheEntry *d = lookup(s, r->comp, r->variant, ids);
        ShardBuild *b;

        if (!d)
                return false;
        if (d->state == CACHE_ENTRY_RESIDENT) {
                request_reply_sharded(r, r->comp, r->plan, d, true);
                return true;
        }
        b = build_find(s, d);
        if (!b)
                return false; /* cannot be: a loading derived entry has a build */
        build_attach(b, r);
        return true;
}

/* The last component of a path, for the memfd's name (slab_new() keeps
 * what follows the last '/'). */
static const char *base_name(const char *path) {
        const char *slash = strrchr(path, '/');

        return slash && slash[1] ? slash + 1 : path;
}

/* Start building r's derived slab from the resident whole entry. */
static void build_start(Request *r, CacheEntry *whole, const FileId *ids) {
        Server *s = r->server;
        WdError err = WD_ERROR_NULL;
        ShardBuild *b;
        int k;

        if (whole->n_slabs != r->comp->n_files) {
                wd_error_set(&err, -EIO, "%s: the resident entry has %zu slabs for %zu files", r->comp->model,
                             whole->n_slabs, r->comp->n_files);
                request_fail(r, -EIO, &err);
                return;
        }
        b = calloc(1, sizeof(ShardBuild));
        if (!b || !(b->files = calloc(MAX(whole->n_slabs, 1u), sizeof(uint8_t *))) ||
            asprintf(&b->name, "%s rank %u of %u", base_name(r->comp->model), r->shard->rank, r->shard->world) < 0) {
                if (b)
                        b->name = NULL;
                build_free(b);
                wd_error_set(&err, -ENOMEM, "out of memory");
                request_fail(r, -ENOMEM, &err);
                return;
        }
        b->server = s;
        b->pages = s->load_opts.pages;
        b->started_usec = now_usec();
        for (size_t i = 0; i < whole->n_slabs; i++)
                b->files[i] = whole->slabs[i]->data;

        /* Lease the whole entry first: the reservation must not evict it. */
        cache_entry_lease(whole);
        k = cache_reserve(s->cache, r->comp->model, r->comp->name, r->variant, ids, r->comp->n_files,
                          derived_size(r->plan), &b->derived, &err);
        if (k != 0) {
                cache_entry_unlease(whole);
                build_free(b);
                request_fail(r, k, &err);
                return;
        }
        b->whole = whole;
        b->comp = TAKE_PTR(r->comp);
        b->plan = TAKE_PTR(r->plan);
        b->work.data = b;
        k = uv_queue_work(&s->loop, &b->work, build_work, build_done);
        if (k < 0) {
                cache_entry_unlease(TAKE_PTR(b->whole));
                cache_entry_abort(b->derived);
                r->comp = TAKE_PTR(b->comp);
                build_free(b);
                wd_error_set(&err, -EIO, "cannot queue the shard build: %s", uv_strerror(k));
                request_fail(r, -EIO, &err);
                return;
        }
        LIST_PREPEND(builds, s->shard_builds, b);
        build_attach(b, r);
        log_debug("building %s %s (%s): %" PRIu64 " bytes", b->comp->model, b->comp->name, b->derived->variant,
                  b->plan->bytes);
        server_update_status(s);
}

void shard_load_resolved(Request *r) {
        Server *s = r->server;
        WdError err = WD_ERROR_NULL;
        _cleanup_free_ FileId *ids = component_ids(r->comp);
        _cleanup_(component_freep) Component *job_comp = NULL;
        CacheEntry *whole;
        Job *j;
        int k;

        if (!ids) {
                wd_error_set(&err, -ENOMEM, "out of memory");
                request_fail(r, -ENOMEM, &err);
                return;
        }
        if (derived_serve(r, ids))
                return;

        whole = lookup(s, r->comp, "", ids);
        if (whole && whole->state == CACHE_ENTRY_RESIDENT) {
                build_start(r, whole, ids);
                return;
        }

        /* Get the whole component resident first: join its load or start
         * one; the request hears its progress like any other. */
        j = whole ? server_job_find(s, whole) : NULL;
        if (!j) {
                /* The job takes the component with its descriptors; the
                 * request keeps a copy of the names and headers. */
                job_comp = TAKE_PTR(r->comp);
                k = component_copy_names(job_comp, &r->comp);
                if (k < 0) {
                        wd_error_set(&err, k, "out of memory");
                        request_fail(r, k, &err);
                        return;
                }
                k = server_job_start(s, r->root->fd, job_comp, r->received_usec, &j, &err);
                if (k != 0) {
                        request_fail(r, k, &err);
                        return;
                }
                job_comp = NULL; /* the job's now */
        }
        r->job = j;
        LIST_PREPEND(job, j->waiters, r);
        j->n_waiters++;
}

void shard_whole_loaded(Request *r, int k, CacheEntry *whole, const WdError *err) {
        _cleanup_free_ FileId *ids = NULL;
        WdError e = WD_ERROR_NULL;

        if (k != 0) {
                request_fail(r, k, err);
                return;
        }
        ids = component_ids(r->comp);
        if (!ids) {
                wd_error_set(&e, -ENOMEM, "out of memory");
                request_fail(r, -ENOMEM, &e);
                return;
        }
        /* Another request for the same shard may have started its build
         * from this very load. */
        if (derived_serve(r, ids))
                return;
        build_start(r, whole, ids);
}
