/* The shard build (see shard-build.h). */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "store/shard-build.h"
#include "util/log.h"
#include "util/time-util.h"

typedef struct ShardBuild {
        Job job; /* first */
        Store *st;
        Component *comp;  /* names and headers */
        ShardPlan *plan;
        char *name;       /* for the memfd: "MODEL rank R of W" */
        CacheEntry *whole; /* referenced once resident, while the copy runs */
        JobWaiter whole_wait; /* on the host load, until it ends */
        bool copying;
        const uint8_t **files;
        SlabPages pages;
        Slab *slab;
        int r;
        uint64_t started_usec;
        WorkerTask task;
} ShardBuild;

static const JobKind shard_build_kind;

uint64_t shard_build_size(const ShardPlan *p) {
        return MAX(p->bytes, 1u);
}

static ShardBuild *shard_build(Job *j) {
        return (ShardBuild *) j;
}

static void build_work(WorkerTask *t) {
        ShardBuild *b = container_of(t, ShardBuild, task);
        const ShardPlan *p = b->plan;

        b->r = slab_new(&b->slab, b->name, shard_build_size(p), b->pages);
        if (b->r < 0)
                return;
        shard_copy_host(p, b->files, b->slab->data, 0, p->n_tensors);
        b->r = slab_seal(b->slab);
}

static void build_end(ShardBuild *b, int r, WdError *err) {
        CacheEntry *derived = b->job.entry;
        double secs = (double) (now_usec() - b->started_usec) / 1e6;

        if (r == 0) {
                Slab **slabs = calloc(1, sizeof(Slab *));

                if (!slabs)
                        r = wd_error_set(err, -ENOMEM, "out of memory");
                else {
                        slabs[0] = TAKE_PTR(b->slab);
                        cache_entry_set_resident(derived, slabs, 1);
                        log_info_fields(&(LogFields){ .model = b->comp->model, .component = b->comp->name,
                                                      .tier = "host", .bytes = &b->plan->bytes,
                                                      .duration_usec = &(uint64_t){ now_usec() - b->started_usec } },
                                        "sharded %s%s%s (%s): %.1f MiB in %.3f s (%.2f GB/s)", b->comp->model,
                                        *b->comp->name ? " " : "", b->comp->name, derived->variant,
                                        (double) b->plan->bytes / (1u << 20), secs,
                                        secs > 0 ? (double) b->plan->bytes / secs / 1e9 : 0.0);
                }
        }
        if (r != 0) {
                if (r != -ECANCELED)
                        log_warning_fields(&(LogFields){ .model = b->comp->model, .component = b->comp->name,
                                                         .tier = "host", .code = wd_error_code_name(r) },
                                           "%s", err->message);
                cache_entry_abort(derived);
        }
        job_finish(&b->job,
                   &(JobOutcome){ .r = r, .err = err, .entry = r == 0 ? derived : NULL, .plan = b->plan });
        store_changed(b->st);
}

static void build_done(Completion *c) {
        ShardBuild *b = container_of(c, ShardBuild, task.done);
        WdError err = WD_ERROR_NULL;
        int r = b->r;

        cache_entry_unref(TAKE_PTR(b->whole));
        if (r < 0)
                wd_error_set(&err, r, "%s: cannot build the shard slab (%s): %s", b->comp->model,
                             b->job.entry->variant, strerror(-r));
        build_end(b, r, &err);
        job_unref(&b->job); /* the worker's */
}

/* The whole entry is resident: copy out of it on the worker. */
static int build_copy(ShardBuild *b, CacheEntry *whole, WdError *err) {
        if (whole->n_slabs != b->comp->n_files)
                return wd_error_set(err, -EIO, "%s: the resident entry has %zu slabs for %zu files", b->comp->model,
                                    whole->n_slabs, b->comp->n_files);
        b->files = calloc(MAX(whole->n_slabs, 1u), sizeof(uint8_t *));
        if (!b->files)
                return wd_error_set(err, -ENOMEM, "out of memory");
        for (size_t i = 0; i < whole->n_slabs; i++)
                b->files[i] = whole->slabs[i]->data;
        b->whole = cache_entry_ref(whole);
        b->copying = true;
        job_ref(&b->job); /* the worker's, until build_done() */
        worker_push(b->st->worker, &b->task, build_work, build_done);
        return 0;
}

static void whole_progress(JobWaiter *w, uint64_t done, uint64_t total, uint64_t copied) {
        ShardBuild *b = container_of(w, ShardBuild, whole_wait);

        /* The requests waiting for the shard hear the whole load's read. */
        job_progress(&b->job, done, total, copied, true);
}

static void whole_done(JobWaiter *w, const JobOutcome *o) {
        ShardBuild *b = container_of(w, ShardBuild, whole_wait);
        WdError err = WD_ERROR_NULL;
        int r = o->r;

        if (r == 0)
                r = build_copy(b, o->entry, &err);
        else if (o->err)
                err = *o->err;
        if (r != 0)
                build_end(b, r, &err);
        job_unref(&b->job); /* the wait's */
}

static const JobWaiterOps whole_wait_ops = {
        .progress = whole_progress,
        .done = whole_done,
};

static void shard_build_cancel(Job *j) {
        ShardBuild *b = shard_build(j);
        WdError err = WD_ERROR_NULL;

        if (b->copying)
                return; /* it finishes, and the slab is cached for the next request */
        /* Stop waiting: that cancels the whole load if nobody else wants it. */
        job_remove_waiter(&b->whole_wait);
        wd_error_set(&err, -ECANCELED, "cancelled");
        build_end(b, -ECANCELED, &err);
        job_unref(j); /* the wait's */
}

static void shard_build_free(Job *j) {
        ShardBuild *b = shard_build(j);

        cache_entry_unref(b->whole);
        component_free(b->comp);
        shard_plan_free(b->plan);
        slab_free(b->slab);
        free(b->files);
        free(b->name);
        free(b);
}

static const JobKind shard_build_kind = {
        .name = "shard build",
        .cancel = shard_build_cancel,
        .free = shard_build_free,
};

/* The last component of a path, for the memfd's name (slab_new() keeps
 * what follows the last '/'). */
static const char *base_name(const char *path) {
        const char *slash = strrchr(path, '/');

        return slash && slash[1] ? slash + 1 : path;
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

int shard_build_start(Store *st, const Component *comp, ShardPlan *plan, const ShardSpec *spec,
                      const char *variant, CacheEntry *whole, Job *whole_job, Job **ret, WdError *err) {
        _cleanup_free_ FileId *ids = calloc(MAX(comp->n_files, 1u), sizeof(FileId));
        CacheEntry *derived;
        ShardBuild *b;
        int r;

        b = calloc(1, sizeof(ShardBuild));
        if (!b || !ids) {
                free(b);
                shard_plan_free(plan);
                return wd_error_set(err, -ENOMEM, "out of memory");
        }
        b->st = st;
        b->pages = st->load_opts.pages;
        b->started_usec = now_usec();
        b->plan = plan; /* it points into the headers, which b->comp shares */
        if (component_copy_names(comp, &b->comp) < 0 ||
            asprintf(&b->name, "%s rank %u of %u", base_name(comp->model), spec->rank, spec->world) < 0) {
                b->name = NULL;
                shard_build_free(&b->job);
                return wd_error_set(err, -ENOMEM, "out of memory");
        }
        for (size_t i = 0; i < comp->n_files; i++)
                ids[i] = comp->files[i].id;

        /* Reference the whole entry first: the reservation must not evict it. */
        if (whole)
                cache_entry_ref(whole);
        r = cache_reserve(st->cache, comp->model, comp->name, variant, ids, comp->n_files,
                          shard_build_size(b->plan), &derived, err);
        cache_entry_unref(whole);
        if (r != 0) {
                shard_build_free(&b->job);
                return r;
        }
        job_init(&b->job, &shard_build_kind, &st->jobs, derived);
        if (whole) {
                r = build_copy(b, whole, err);
                if (r != 0) {
                        cache_entry_abort(derived);
                        job_finish(&b->job, &(JobOutcome){ .r = r, .err = err });
                        job_unref(&b->job);
                        return r;
                }
        } else {
                job_ref(&b->job); /* the wait's, until whole_done() */
                job_add_waiter(whole_job, &b->whole_wait, &whole_wait_ops);
        }
        log_debug("building %s %s (%s): %" PRIu64 " bytes", comp->model, comp->name, variant, b->plan->bytes);
        store_changed(st);
        *ret = &b->job;
        return 0;
}
