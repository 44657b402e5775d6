/* The device load (see device-load.h). */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "gpu/device-load.h"
#include "util/log.h"
#include "util/time-util.h"

typedef struct DeviceLoad {
        Job job; /* first */
        DeviceTier *tier;
        size_t dev;
        Component *comp; /* owned */
        ShardSpec *spec; /* owned, NULL for whole tensors */
        char *variant;
        ShardPlan *plan; /* owned; points into comp's headers */
        /* A shard copied from its own host entry (one slab laid out as the
         * device slab is): plan's tensors read from that slab. */
        ShardPlan *copy_plan;
        int root_fd;     /* borrowed for the start only */
        bool keep_host;
        uint64_t started_usec;

        CacheEntry *host_entry; /* the resident host copy, referenced while copied from */
        JobWaiter host_wait;    /* on the host load, until it ends */
        HostLoadFeed feed;      /* copying while it reads */
        bool host_known;        /* the host side's outcome is in (or there is none to wait for) */
        bool host_loaded;       /* the host copy came from a load this one waited for */
        int host_r;
        WdError host_err;

        GpuCopy *copy;
        bool copy_finished;
        int copy_r;
        WdError copy_err;
} DeviceLoad;

static const JobKind device_load_kind;

static DeviceLoad *device_load(Job *j) {
        return (DeviceLoad *) j;
}

void device_copy_wake(GpuCopy *c, void *queue) {
        completion_kick(queue);
}

static const GpuDeviceInfo *dl_info(DeviceLoad *dl) {
        return gpu_device(dl->tier->gpu, dl->dev);
}

static int dl_copy(DeviceLoad *dl, Slab *const *slabs, bool read_only, WdError *err) {
        int r = gpu_copy_new(dl->tier->gpu, dl->dev, dl->copy_plan ? dl->copy_plan : dl->plan, slabs,
                             dl->copy_plan ? 1 : dl->comp->n_files, read_only, device_copy_wake,
                             dl->tier->store->queue, &dl->copy);

        if (r < 0)
                return wd_error_set(err, r, "cannot start the copy to the device: %s", strerror(-r));
        return 0;
}

/* Drop the host copy a device load was made from, when the request asked so
 * and no client holds it: no lease, no pin, and, where the host load was
 * shared, no request that wanted the host copy itself.  Evicting only
 * unlinks it: another copy still reading it keeps its memory until done. */
static void drop_host_entry(CacheEntry *he, bool shared_load) {
        WdError err = WD_ERROR_NULL;

        if (he->state != CACHE_ENTRY_RESIDENT || he->leases > 0 || he->pinned || (shared_load && he->wanted))
                return;
        log_debug("dropping the host copy of %s %s after its device load", he->model, he->component);
        if (cache_entry_evict(he, &err) != 0)
                log_debug("cannot drop it: %s", err.message);
}

/* Both halves are in: publish or fail. */
static void dl_complete(DeviceLoad *dl) {
        const GpuDeviceInfo *info = dl_info(dl);
        double secs = (double) (now_usec() - dl->started_usec) / 1e6;
        const char *sep = *dl->comp->name ? " " : "";
        CacheEntry *e = dl->job.entry;
        const WdError *err = &dl->copy_err;
        int r = dl->copy_r;
        uint64_t usec = now_usec() - dl->started_usec;
        char tier[32];

        snprintf(tier, sizeof(tier), "cuda:%u", info->index);
        if (r == 0 && dl->host_r != 0) {
                /* The copy read bytes the host side did not verify. */
                r = dl->host_r;
                err = &dl->host_err;
        }
        if (r == 0) {
                cache_entry_set_resident_memory(e, gpu_copy_take_slab(dl->copy));
                log_info_fields(&(LogFields){ .model = dl->comp->model, .component = dl->comp->name, .tier = tier,
                                              .bytes = &dl->plan->bytes, .duration_usec = &usec },
                                "loaded %s%s%s to cuda:%u: %.1f MiB in %.2f s (%.2f GB/s)", dl->comp->model, sep,
                                dl->comp->name, info->index, (double) dl->plan->bytes / (1u << 20), secs,
                                secs > 0 ? (double) dl->plan->bytes / secs / 1e9 : 0.0);
        } else {
                if (r != -ECANCELED)
                        log_warning_fields(&(LogFields){ .model = dl->comp->model, .component = dl->comp->name,
                                                         .tier = tier, .code = wd_error_code_name(r) },
                                           "load of %s%s%s to cuda:%u failed: %s", dl->comp->model, sep,
                                           dl->comp->name, info->index, err->message);
                cache_entry_abort(e);
        }
        job_finish(&dl->job, &(JobOutcome){ .r = r, .err = err, .entry = r == 0 ? e : NULL, .plan = dl->plan });
        if (dl->host_entry) {
                if (r == 0 && !dl->keep_host)
                        drop_host_entry(dl->host_entry, dl->host_loaded);
                cache_entry_unref(TAKE_PTR(dl->host_entry));
        }
        store_changed(dl->tier->store);
}

static void dl_maybe_complete(DeviceLoad *dl) {
        if (dl->job.state == JOB_DONE || dl->job.state == JOB_FAILED)
                return;
        if (dl->host_known && (dl->copy_finished || !dl->copy)) {
                if (!dl->copy && dl->copy_r == 0)
                        dl->copy_r = wd_error_set(&dl->copy_err, dl->host_r ? dl->host_r : -ECANCELED, "%s",
                                                  dl->host_r ? dl->host_err.message : "cancelled");
                dl_complete(dl);
                job_unref(&dl->job); /* the running one's */
        }
}

/* ---- the host side ------------------------------------------------------ */

static void feed_advance(HostLoadFeed *f, size_t file, uint64_t filled) {
        DeviceLoad *dl = container_of(f, DeviceLoad, feed);

        gpu_copy_advance(dl->copy, file, filled);
}

static void feed_read_ended(HostLoadFeed *f, int error) {
        DeviceLoad *dl = container_of(f, DeviceLoad, feed);

        if (error != 0)
                gpu_copy_cancel(dl->copy);
        else
                gpu_copy_advance_all(dl->copy);
}

static const HostLoadFeedOps feed_ops = {
        .advance = feed_advance,
        .read_ended = feed_read_ended,
};

static void host_progress(JobWaiter *w, uint64_t done, uint64_t total, uint64_t copied) {
        /* The device load's own poll reports both. */
}

static void host_done(JobWaiter *w, const JobOutcome *o) {
        DeviceLoad *dl = container_of(w, DeviceLoad, host_wait);
        WdError err = WD_ERROR_NULL;

        dl->host_known = true;
        dl->host_r = o->r;
        if (o->r == 0 && !dl->host_entry) {
                dl->host_loaded = true;
                dl->host_entry = cache_entry_ref(o->entry); /* to drop it afterwards, if asked */
        }
        if (o->r != 0) {
                if (o->err)
                        dl->host_err = *o->err;
                else
                        wd_error_set(&dl->host_err, o->r, "the host load failed");
                if (dl->copy)
                        gpu_copy_cancel(dl->copy);
        } else if (!dl->copy) {
                /* It was sealing when we came: copy from what it made. */
                if (dl_copy(dl, o->entry->slabs, true, &err) != 0) {
                        dl->copy_r = err.message[0] ? -EIO : -ENOMEM;
                        dl->copy_err = err;
                        dl->copy_finished = true;
                } else
                        gpu_copy_advance_all(dl->copy);
        }
        dl_maybe_complete(dl);
}

static const JobWaiterOps host_wait_ops = {
        .progress = host_progress,
        .done = host_done,
};

/* ---- the job ------------------------------------------------------------ */

static void device_load_poll(Job *j) {
        DeviceLoad *dl = device_load(j);
        Job *host = dl->host_wait.job;
        uint64_t done, copied;

        if (!dl->copy || dl->copy_finished || j->state != JOB_RUNNING)
                return;
        if (gpu_copy_finished(dl->copy, &dl->copy_r, &dl->copy_err)) {
                dl->copy_finished = true;
                host_load_unfeed(&dl->feed); /* the host load may seal now */
                dl_maybe_complete(dl);
                return;
        }
        copied = gpu_copy_copied(dl->copy);
        done = host && job_is_host_load(host) && host->state == JOB_RUNNING ? host->done : dl->comp->total_bytes;
        job_progress(j, done, dl->comp->total_bytes, copied, false);
}

static void device_load_cancel(Job *j) {
        DeviceLoad *dl = device_load(j);

        if (dl->copy && !dl->copy_finished)
                gpu_copy_cancel(dl->copy);
        /* Stop waiting for the host side: that cancels its read when nothing
         * else wants it. */
        job_remove_waiter(&dl->host_wait);
        if (!dl->host_known) {
                dl->host_known = true;
                dl->host_r = wd_error_set(&dl->host_err, -ECANCELED, "cancelled");
        }
        dl_maybe_complete(dl);
}

static int device_load_restart(Job *j, Job **ret, WdError *err) {
        DeviceLoad *dl = device_load(j);
        DeviceLoadParams p = {
                .dev = dl->dev,
                .root_fd = dl->root_fd,
                .spec = dl->spec,
                .variant = dl->variant,
                .keep_host = dl->keep_host,
        };

        if (dl->root_fd < 0)
                return wd_error_set(err, -ECANCELED, "the load to cuda:%u was cancelled", dl_info(dl)->index);
        return device_load_start(dl->tier, dl->comp, &p, ret, err);
}

static void device_load_free(Job *j) {
        DeviceLoad *dl = device_load(j);

        host_load_unfeed(&dl->feed);
        job_remove_waiter(&dl->host_wait);
        cache_entry_unref(dl->host_entry);
        gpu_copy_free(dl->copy);
        safe_close(dl->root_fd);
        shard_plan_free(dl->plan);
        shard_plan_free(dl->copy_plan);
        shard_spec_free(dl->spec);
        free(dl->variant);
        component_free(dl->comp);
        free(dl);
}

static const JobKind device_load_kind = {
        .name = "device load",
        .cancel = device_load_cancel,
        .restart = device_load_restart,
        .free = device_load_free,
        .poll = device_load_poll,
};

void device_tier_poll(void *tier) {
        DeviceTier *t = tier;

        job_list_poll(&t->jobs);
}

/* The copies of plan p from its own laid-out slab (a host shard entry, as
 * store/shard-build.h makes it with the same alignment): tensor i from
 * offset to offset, one row each. */
static int identity_plan(const ShardPlan *p, ShardPlan **ret) {
        ShardPlan *q = calloc(1, sizeof(ShardPlan));

        if (!q || !(q->tensors = calloc(MAX(p->n_tensors, 1u), sizeof(ShardTensor)))) {
                free(q);
                return -ENOMEM;
        }
        *q = (ShardPlan){ .align = p->align, .bytes = p->bytes, .n_tensors = p->n_tensors, .tensors = q->tensors };
        for (size_t i = 0; i < p->n_tensors; i++) {
                const ShardTensor *t = &p->tensors[i];

                q->tensors[i] = (ShardTensor){ .source = t->source, .file = 0, .offset = t->offset,
                                               .nbytes = t->nbytes };
                q->tensors[i].copy = (ShardCopy){ .src = t->offset, .dst = t->offset, .width = t->nbytes,
                                                  .height = t->nbytes > 0 ? 1 : 0, .src_pitch = t->nbytes,
                                                  .dst_pitch = t->nbytes };
        }
        *ret = q;
        return 0;
}

static CacheEntry *host_lookup(Store *st, const Component *comp, const FileId *ids) {
        CacheEntry *e = cache_lookup(st->cache, comp->model, comp->name, "", ids, comp->n_files);

        return e ? e : cache_lookup_files(st->cache, "", ids, comp->n_files);
}

int device_load_start(DeviceTier *t, const Component *comp, const DeviceLoadParams *p, Job **ret, WdError *err) {
        const GpuDeviceInfo *info = gpu_device(t->gpu, p->dev);
        Store *st = t->store;
        _cleanup_free_ FileId *ids = calloc(MAX(comp->n_files, 1), sizeof(FileId));
        CacheEntry *entry, *he;
        DeviceLoad *dl;
        Job *hj = NULL;
        int r;

        dl = calloc(1, sizeof(DeviceLoad));
        if (!dl || !ids) {
                free(dl);
                return wd_error_set(err, -ENOMEM, "out of memory");
        }
        *dl = (DeviceLoad){ .tier = t, .dev = p->dev, .keep_host = p->keep_host, .started_usec = now_usec(),
                            .root_fd = -1 };
        if (component_dup(comp, &dl->comp) < 0 || !(dl->variant = strdup(p->variant ? p->variant : "")) ||
            (p->spec && shard_spec_copy(p->spec, &dl->spec) < 0)) {
                device_load_free(&dl->job);
                return wd_error_set(err, -ENOMEM, "out of memory");
        }
        /* A reload may close the root; the host load it starts needs it. */
        dl->root_fd = fcntl(p->root_fd, F_DUPFD_CLOEXEC, 3);
        if (dl->root_fd < 0) {
                r = negative_errno();
                device_load_free(&dl->job);
                return wd_error_set(err, r, "cannot duplicate the model root's descriptor: %s", strerror(-r));
        }
        r = shard_plan(dl->comp, dl->spec, GPU_ALIGN, &dl->plan, err);
        if (r != 0) {
                device_load_free(&dl->job);
                return r;
        }
        for (size_t i = 0; i < comp->n_files; i++)
                ids[i] = comp->files[i].id;
        r = cache_reserve(t->caches[p->dev], comp->model, comp->name, dl->variant, ids, comp->n_files,
                          ALIGN_UP(MAX(dl->plan->bytes, 1u), info->granularity), &entry, err);
        if (r != 0) {
                device_load_free(&dl->job);
                return r;
        }
        job_init(&dl->job, &device_load_kind, &t->jobs, entry);
        job_ref(&dl->job); /* the running one's, until it completes */

        /* The host copy: resident, being read, or to be read now; for a
         * shard whose whole component is not resident, the shard's own host
         * entry where it is (a cluster part plan leaves only that). */
        he = host_lookup(st, dl->comp, ids);
        if (dl->spec && *dl->variant && !(he && he->state == CACHE_ENTRY_RESIDENT)) {
                CacheEntry *se = cache_lookup(st->cache, comp->model, comp->name, dl->variant, ids, comp->n_files);

                if (se && se->state == CACHE_ENTRY_RESIDENT && se->n_slabs == 1 &&
                    se->slabs[0]->size >= dl->plan->bytes) {
                        r = identity_plan(dl->plan, &dl->copy_plan);
                        if (r < 0) {
                                r = wd_error_set(err, r, "out of memory");
                                goto fail;
                        }
                        he = se;
                }
        }
        if (he && p->keep_host)
                he->wanted = true;
        if (he && he->state == CACHE_ENTRY_RESIDENT) {
                dl->host_entry = cache_entry_ref(he);
                dl->host_known = true;
                r = dl_copy(dl, he->slabs, true, err);
                if (r != 0)
                        goto fail;
                gpu_copy_advance_all(dl->copy);
        } else {
                hj = he ? job_find(&st->jobs, he) : NULL;
                if (hj)
                        job_ref(hj);
                else {
                        r = host_load_start(st, p->root_fd, dl->comp, p->requested_usec, &hj, err);
                        if (r != 0)
                                goto fail;
                        if (p->keep_host)
                                hj->entry->wanted = true;
                }
                job_add_waiter(hj, &dl->host_wait, &host_wait_ops);
                if (hj->state == JOB_RUNNING) {
                        r = dl_copy(dl, host_load_slabs(hj), false, err);
                        if (r != 0)
                                goto fail;
                        r = host_load_feed(hj, &dl->feed, &feed_ops);
                        if (r < 0) /* cannot be: it runs */
                                gpu_copy_cancel(dl->copy);
                }
                job_unref(hj);
        }
        log_debug("loading %s %s to cuda:%u: %" PRIu64 " bytes", comp->model, comp->name, info->index,
                  dl->plan->bytes);
        store_changed(st);
        *ret = &dl->job;
        return 0;

fail:
        if (hj) {
                job_remove_waiter(&dl->host_wait);
                job_unref(hj);
        }
        cache_entry_abort(entry);
        job_finish(&dl->job, &(JobOutcome){ .r = r, .err = err });
        job_unref(&dl->job);
        job_unref(&dl->job);
        return r;
}
