/* The GPU tier in the server: finding the devices, device loads, their
 * replies, and the devices' part of Status and List.
 *
 * The devices are found on the thread pool when the daemon starts (the
 * driver's initialisation takes a while); until then a device Load gets
 * UNAVAILABLE, and where there is no tier UNSUPPORTED with the reason.
 * Each device has its own Cache (budget [gpu] budget / device_budgets) whose
 * entries hold a GpuSlab.
 *
 * A device load (DevJob) plans the component's layout (store/shard.h, 256-
 * byte aligned tensors; a sharded load's plan holds only its rank's slices,
 * and its entry is keyed by the shard's variant), reserves the bytes in the
 * device's cache and
 * copies from the host slabs: at once from a resident host entry (leased
 * meanwhile), or from a host load while it reads, fed by the reader's
 * watermarks (device_feed_progress() on the reader thread).  Several devices
 * asking for the same component share that one host load.  The host load
 * seals only once the copies fed from its writable slabs ended.  The copy
 * runs on the device's thread (gpu/); its wake callback only sets a flag and
 * wakes the loop, which finishes the load in device_jobs_poll(). */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "server/server-private.h"
#include "util/log.h"

/* ---- the tier ----------------------------------------------------------- */

static void gpu_work(uv_work_t *w) {
        Server *s = w->data;

        s->gpu_r = gpu_new(&s->gpu_found, s->gpu_only, s->n_gpu_only, &s->gpu_err);
}

static void gpu_free_slab(void *memory, void *userdata) {
        gpu_slab_free(memory);
}

static void gpu_done(uv_work_t *w, int status) {
        Server *s = w->data;
        Gpu *g = TAKE_PTR(s->gpu_found);
        size_t n = gpu_n_devices(g);
        int r;

        s->n_resolving--;
        free(TAKE_PTR(s->gpu_only));
        if (s->gpu_r != 0 || status < 0) {
                snprintf(s->gpu_reason, sizeof(s->gpu_reason), "%s",
                         s->gpu_r != 0 ? s->gpu_err.message : "the device search was cancelled");
                s->gpu_state = GPU_OFF;
                gpu_free(g);
                log_info("No GPU tier: %s", s->gpu_reason);
                server_maybe_exit(s);
                return;
        }
        s->dev_caches = calloc(n, sizeof(Cache *));
        if (!s->dev_caches) {
                snprintf(s->gpu_reason, sizeof(s->gpu_reason), "out of memory");
                s->gpu_state = GPU_OFF;
                gpu_free(g);
                server_maybe_exit(s);
                return;
        }
        for (size_t i = 0; i < n; i++) {
                const GpuDeviceInfo *d = gpu_device(g, i);
                char name[32];

                snprintf(name, sizeof(name), "cuda:%u", d->index);
                r = cache_new(&s->dev_caches[i], name, config_gpu_budget(s->config, d->index, d->total_bytes));
                if (r < 0) {
                        snprintf(s->gpu_reason, sizeof(s->gpu_reason), "out of memory");
                        for (size_t k = 0; k < i; k++)
                                cache_free(s->dev_caches[k]);
                        free(s->dev_caches);
                        s->dev_caches = NULL;
                        s->gpu_state = GPU_OFF;
                        gpu_free(g);
                        server_maybe_exit(s);
                        return;
                }
                cache_set_memory_free(s->dev_caches[i], gpu_free_slab, s);
                log_info("GPU tier: cuda:%u %s %s (%s), %.1f GiB, budget %.1f GiB", d->index, d->uuid, d->name,
                         d->pci_bus_id, (double) d->total_bytes / (1u << 30),
                         (double) config_gpu_budget(s->config, d->index, d->total_bytes) / (1u << 30));
        }
        s->gpu = g;
        snprintf(s->gpu_reason, sizeof(s->gpu_reason), "ok");
        s->gpu_state = GPU_UP;
        server_maybe_exit(s);
}

void device_tier_start(Server *s) {
        s->gpu_state = GPU_STARTING;
        snprintf(s->gpu_reason, sizeof(s->gpu_reason), "starting: looking for CUDA devices");
        s->gpu_work.data = s;
        if (!gpu_built()) {
                WdError err = WD_ERROR_NULL;

                (void) gpu_new(&s->gpu_found, NULL, 0, &err);
                snprintf(s->gpu_reason, sizeof(s->gpu_reason), "%s", err.message);
                s->gpu_state = GPU_OFF;
                log_info("No GPU tier: %s", s->gpu_reason);
                return;
        }
        if (s->config->n_gpu_devices > 0) {
                s->gpu_only = calloc(s->config->n_gpu_devices, sizeof(unsigned));
                if (!s->gpu_only) {
                        snprintf(s->gpu_reason, sizeof(s->gpu_reason), "out of memory");
                        s->gpu_state = GPU_OFF;
                        return;
                }
                memcpy(s->gpu_only, s->config->gpu_devices, s->config->n_gpu_devices * sizeof(unsigned));
                s->n_gpu_only = s->config->n_gpu_devices;
        }
        s->n_resolving++; /* the daemon waits for it before it exits */
        if (uv_queue_work(&s->loop, &s->gpu_work, gpu_work, gpu_done) < 0) {
                s->n_resolving--;
                free(TAKE_PTR(s->gpu_only));
                snprintf(s->gpu_reason, sizeof(s->gpu_reason), "cannot queue the device search");
                s->gpu_state = GPU_OFF;
        }
}

void device_tier_free(Server *s) {
        for (size_t i = 0; s->dev_caches && i < gpu_n_devices(s->gpu); i++)
                cache_free(s->dev_caches[i]);
        free(s->dev_caches);
        s->dev_caches = NULL;
        s->gpu = gpu_free(s->gpu);
}

void device_tier_reload(Server *s, const Config *c) {
        bool same = c->n_gpu_devices == s->config->n_gpu_devices &&
                    (c->n_gpu_devices == 0 ||
                     memcmp(c->gpu_devices, s->config->gpu_devices, c->n_gpu_devices * sizeof(c->gpu_devices[0])) == 0);

        if (!same)
                log_warning("SIGHUP: [gpu] devices changed: that needs a restart, ignoring.");
        if (s->gpu_state != GPU_UP)
                return;
        for (size_t i = 0; i < gpu_n_devices(s->gpu); i++) {
                const GpuDeviceInfo *d = gpu_device(s->gpu, i);

                cache_set_budget(s->dev_caches[i], config_gpu_budget(c, d->index, d->total_bytes));
        }
}

int device_target(Conn *c, uint64_t id, const char *target) {
        Server *s = c->server;
        GpuDeviceInfo infos[GPU_MAX_DEVICES];
        char uuid[GPU_UUID_MAX], t[80];
        size_t n = gpu_n_devices(s->gpu), idx;
        int ordinal, r;

        wd_escape(t, sizeof(t), target, 64);
        r = gpu_target_parse(target, &ordinal, uuid);
        if (r < 0 || r == WD_E_INVALID) {
                conn_send_error(c, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT,
                                "target \"%s\": not \"host\", \"cuda:N\" or \"cuda:GPU-<uuid>\"", t);
                return -1;
        }
        if (s->gpu_state == GPU_STARTING) {
                conn_send_error(c, id, WEIGHTD__V1__CODE__UNAVAILABLE,
                                "target \"%s\": the GPU tier is still starting, try again", t);
                return -1;
        }
        if (s->gpu_state != GPU_UP) {
                conn_send_error(c, id, WEIGHTD__V1__CODE__UNSUPPORTED, "target \"%s\": no GPU tier: %s", t,
                                s->gpu_reason);
                return -1;
        }
        for (size_t i = 0; i < n; i++)
                infos[i] = *gpu_device(s->gpu, i);
        r = gpu_target_lookup(infos, n, target, &idx);
        if (r != 0) {
                conn_send_error(c, id, WEIGHTD__V1__CODE__INVALID_ARGUMENT,
                                "target \"%s\": the daemon serves no such device (%zu devices)", t, n);
                return -1;
        }
        return (int) idx;
}

/* ---- replies ------------------------------------------------------------ */

/* Reply to a device Load or Prefetch with the device entry e (resident),
 * whose layout is plan.  A Load takes a lease and sends the slab's
 * descriptor. */
static int reply_device_loaded(Conn *c, uint64_t id, RequestKind kind, const Component *comp, const ShardPlan *plan,
                               size_t dev, CacheEntry *e, bool was_resident) {
        Server *s = c->server;
        const GpuDeviceInfo *info = gpu_device(s->gpu, dev);
        Weightd__V1__Envelope env = WEIGHTD__V1__ENVELOPE__INIT;
        Weightd__V1__Reply reply = WEIGHTD__V1__REPLY__INIT;
        Weightd__V1__LoadReply load = WEIGHTD__V1__LOAD_REPLY__INIT;
        Weightd__V1__Slab slab = WEIGHTD__V1__SLAB__INIT, *slab_ptr = &slab;
        _cleanup_(plan_reply_done) PlanReply pr = {};
        GpuSlab *g = e->memory;
        int fd = gpu_slab_fd(g);
        char target[32];

        snprintf(target, sizeof(target), "cuda:%u", info->index);
        env.id = id;
        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_REPLY;
        env.reply = &reply;
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_LOAD;
        reply.load = &load;
        load.model = comp->model;
        load.component = comp->name;
        load.bytes = comp->total_bytes;
        load.was_resident = was_resident;
        load.target = target;
        if (kind == REQUEST_PREFETCH)
                return conn_send(c, &env, NULL, 0);

        if (conn_lease_limit(c, id))
                return 0;
        if (plan_reply_fill(&pr, comp, plan, &load) < 0)
                return conn_send_error(c, id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "out of memory");
        slab.fd_index = 0;
        slab.size = plan->bytes;
        slab.map_size = gpu_slab_map_size(g);
        slab.file = (char *) "";
        slab.device_uuid = (char *) info->uuid;
        slab.device = target;
        load.n_slabs = 1;
        load.slabs = &slab_ptr;

        load.lease = conn_lease_add(c, e);
        if (load.lease == 0)
                return conn_send_error(c, id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "out of memory");
        return conn_send(c, &env, &fd, 1);
}

/* ---- device loads ------------------------------------------------------- */

static void dev_job_wake(GpuCopy *copy, void *userdata) {
        DevJob *dj = userdata;

        /* dj lives until the loop saw the copy finished: it cannot be
         * freed before this store. */
        atomic_store(&dj->woke, true);
        (void) uv_async_send(&dj->server->wake);
}

static DevJob *dev_job_find(Server *s, CacheEntry *e) {
        LIST_FOREACH(dev_jobs, dj, s->dev_jobs)
                if (dj->entry == e)
                        return dj;
        return NULL;
}

static void feed_detach(DevJob *dj) {
        Job *j = dj->host_job;

        if (!j)
                return;
        pthread_mutex_lock(&j->feeds_lock);
        LIST_REMOVE(feeds, j->feeds, dj);
        pthread_mutex_unlock(&j->feeds_lock);
        dj->host_job = NULL;
}

static void dev_job_free(DevJob *dj) {
        Server *s = dj->server;

        while (dj->waiters)
                request_free(dj->waiters);
        feed_detach(dj);
        if (dj->host_entry)
                cache_entry_unlease(TAKE_PTR(dj->host_entry));
        gpu_copy_free(dj->copy);
        if (dj->entry)
                cache_entry_abort(dj->entry);
        shard_plan_free(dj->plan);
        component_free(dj->comp);
        LIST_REMOVE(dev_jobs, s->dev_jobs, dj);
        s->n_dev_jobs--;
        free(dj);
}

static int dev_job_copy(DevJob *dj, Slab *const *slabs, bool read_only, WdError *err) {
        int r = gpu_copy_new(dj->server->gpu, dj->dev, dj->plan, slabs, dj->comp->n_files, read_only, dev_job_wake, dj,
                             &dj->copy);

        if (r < 0)
                return wd_error_set(err, r, "cannot start the copy to the device: %s", strerror(-r));
        return 0;
}

/* Copy while host load j reads. */
static int dev_job_feed(DevJob *dj, Job *j, WdError *err) {
        int r = dev_job_copy(dj, load_job_slabs(j->load), false, err);

        if (r != 0)
                return r;
        dj->host_job = j;
        if (dj->keep_host)
                j->keep_host = true;
        else
                j->drop_host = true;
        pthread_mutex_lock(&j->feeds_lock);
        LIST_PREPEND(feeds, j->feeds, dj);
        pthread_mutex_unlock(&j->feeds_lock);
        for (size_t f = 0; f < dj->comp->n_files; f++)
                gpu_copy_advance(dj->copy, f, load_job_filled(j->load, f));
        return 0;
}

static int dev_job_start(Server *s, int root_fd, Component *comp, size_t dev, bool keep_host,
                         const ShardSpec *spec, const char *variant, uint64_t requested_usec, DevJob **ret,
                         WdError *err) {
        const GpuDeviceInfo *info = gpu_device(s->gpu, dev);
        _cleanup_free_ FileId *ids = NULL;
        CacheEntry *he;
        DevJob *dj;
        Job *j;
        int r;

        dj = calloc(1, sizeof(DevJob));
        ids = calloc(MAX(comp->n_files, 1), sizeof(FileId));
        if (!dj || !ids) {
                free(dj);
                component_free(comp);
                return wd_error_set(err, -ENOMEM, "out of memory");
        }
        *dj = (DevJob){ .server = s, .dev = dev, .comp = comp, .keep_host = keep_host, .started_usec = now_usec() };
        LIST_PREPEND(dev_jobs, s->dev_jobs, dj);
        s->n_dev_jobs++;

        r = shard_plan(comp, spec, GPU_ALIGN, &dj->plan, err);
        if (r != 0)
                goto fail;
        for (size_t i = 0; i < comp->n_files; i++)
                ids[i] = comp->files[i].id;
        r = cache_reserve(s->dev_caches[dev], comp->model, comp->name, variant, ids, comp->n_files,
                          ALIGN_UP(MAX(dj->plan->bytes, 1u), info->granularity), &dj->entry, err);
        if (r != 0)
                goto fail;

        /* The host copy: resident, being read, or to be read now. */
        he = cache_lookup(s->cache, comp->model, comp->name, "", ids, comp->n_files);
        if (!he)
                he = cache_lookup_files(s->cache, "", ids, comp->n_files);
        if (he && he->state == CACHE_ENTRY_RESIDENT) {
                cache_entry_lease(he);
                dj->host_entry = he;
                r = dev_job_copy(dj, he->slabs, true, err);
                if (r != 0)
                        goto fail;
                gpu_copy_advance_all(dj->copy);
        } else {
                j = he ? server_job_find(s, he) : NULL;
                if (!j) {
                        Component *copy;

                        r = component_dup(comp, &copy);
                        if (r < 0) {
                                wd_error_set(err, r, "cannot duplicate the component: %s", strerror(-r));
                                goto fail;
                        }
                        r = server_job_start(s, root_fd, copy, requested_usec, &j, err);
                        if (r != 0) {
                                component_free(copy);
                                goto fail;
                        }
                }
                r = dev_job_feed(dj, j, err);
                if (r != 0)
                        goto fail;
        }
        log_debug("loading %s %s to cuda:%u: %" PRIu64 " bytes", comp->model, comp->name, info->index,
                  dj->plan->bytes);
        *ret = dj;
        return 0;

fail:
        dj->comp = NULL; /* the caller's still */
        dev_job_free(dj);
        return r;
}

void device_request_detach(Request *r) {
        DevJob *dj = r->dev_job;

        if (!dj)
                return;
        LIST_REMOVE(job, dj->waiters, r);
        dj->n_waiters--;
        r->dev_job = NULL;
        if (dj->n_waiters == 0 && !dj->cancelled && dj->copy) {
                dj->cancelled = true;
                gpu_copy_cancel(dj->copy);
        }
}

void device_load_resolved(Request *r, Component *comp_in) {
        _cleanup_(component_freep) Component *comp = comp_in;
        _cleanup_(shard_plan_freep) ShardPlan *plan = NULL;
        _cleanup_free_ FileId *ids = NULL;
        Server *s = r->server;
        Conn *c = r->conn;
        WdError err = WD_ERROR_NULL;
        uint64_t id = r->id;
        RequestKind kind = r->kind;
        size_t dev = (size_t) r->device;
        bool keep_host = r->keep_host == WEIGHTD__V1__KEEP_HOST__KEEP_HOST_YES ||
                         (r->keep_host != WEIGHTD__V1__KEEP_HOST__KEEP_HOST_NO && s->config->keep_host);
        const char *variant = r->variant ? r->variant : ""; /* a sharding: a device entry of its own */
        CacheEntry *e;
        DevJob *dj;
        int k;

        if (s->gpu_state != GPU_UP || dev >= gpu_n_devices(s->gpu)) {
                request_free(r);
                conn_send_error(c, id, WEIGHTD__V1__CODE__UNSUPPORTED, "no GPU tier: %s", s->gpu_reason);
                return;
        }
        ids = calloc(MAX(comp->n_files, 1), sizeof(FileId));
        if (!ids) {
                request_free(r);
                conn_send_error(c, id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "out of memory");
                return;
        }
        for (size_t i = 0; i < comp->n_files; i++)
                ids[i] = comp->files[i].id;
        e = cache_lookup(s->dev_caches[dev], comp->model, comp->name, variant, ids, comp->n_files);
        if (!e)
                e = cache_lookup_files(s->dev_caches[dev], variant, ids, comp->n_files);
        if (e && e->state == CACHE_ENTRY_RESIDENT) {
                k = shard_plan(comp, r->shard, GPU_ALIGN, &plan, &err);
                request_free(r);
                if (k != 0)
                        conn_send_wd_error(c, id, k, &err);
                else
                        reply_device_loaded(c, id, kind, comp, plan, dev, e, true);
                return;
        }
        dj = e ? dev_job_find(s, e) : NULL;
        if (dj && dj->cancelled) {
                request_free(r);
                conn_send_error(c, id, WEIGHTD__V1__CODE__UNAVAILABLE,
                                "%s: a cancelled load to this device is still ending, try again", comp->model);
                return;
        }
        if (!dj) {
                k = dev_job_start(s, r->root->fd, comp, dev, keep_host, r->shard, variant, r->received_usec, &dj,
                                  &err);
                if (k != 0) {
                        request_free(r);
                        conn_send_wd_error(c, id, k, &err);
                        return;
                }
                comp = NULL; /* the device load's now */
        }
        r->dev_job = dj;
        LIST_PREPEND(job, dj->waiters, r);
        dj->n_waiters++;
        server_update_status(s);
}

/* Drop the host copy that a device load was made from, when the request
 * asked so and nothing holds it. */
static void drop_host_entry(Server *s, CacheEntry *he) {
        WdError err = WD_ERROR_NULL;

        if (he->state != CACHE_ENTRY_RESIDENT || he->leases > 0 || he->pinned)
                return;
        /* Eviction frees he: say so first. */
        log_debug("dropping the host copy of %s %s after its device load", he->model, he->component);
        if (cache_entry_evict(he, &err) != 0)
                log_debug("cannot drop it: %s", err.message);
}

static void dev_job_finish(DevJob *dj) {
        Server *s = dj->server;
        const GpuDeviceInfo *info = gpu_device(s->gpu, dj->dev);
        WdError err = WD_ERROR_NULL;
        double secs = (double) (now_usec() - dj->started_usec) / 1e6;
        CacheEntry *e = NULL, *he;
        GpuSlab *slab;
        int r = 0;

        (void) gpu_copy_finished(dj->copy, &r, &err);
        feed_detach(dj);
        if (r == 0) {
                slab = gpu_copy_take_slab(dj->copy);
                e = TAKE_PTR(dj->entry);
                cache_entry_set_resident_memory(e, slab);
                log_info("loaded %s%s%s to cuda:%u: %.1f MiB in %.2f s (%.2f GB/s)", dj->comp->model,
                         *dj->comp->name ? " " : "", dj->comp->name, info->index,
                         (double) dj->plan->bytes / (1u << 20), secs,
                         secs > 0 ? (double) dj->plan->bytes / secs / 1e9 : 0.0);
        } else if (r != -ECANCELED)
                log_warning("load of %s%s%s to cuda:%u failed: %s", dj->comp->model, *dj->comp->name ? " " : "",
                            dj->comp->name, info->index, err.message);

        while (dj->waiters) {
                Request *req = dj->waiters;
                Conn *c = req->conn;
                uint64_t id = req->id;
                RequestKind kind = req->kind;

                request_free(req);
                if (r == 0)
                        (void) reply_device_loaded(c, id, kind, dj->comp, dj->plan, dj->dev, e, false);
                else
                        (void) conn_send_wd_error(c, id, r, &err);
                conn_request_done(c);
        }
        he = TAKE_PTR(dj->host_entry);
        if (he) {
                cache_entry_unlease(he);
                if (r == 0 && !dj->keep_host)
                        drop_host_entry(s, he);
        }
        dev_job_free(dj);
}

static void dev_job_progress(DevJob *dj) {
        uint64_t copied = gpu_copy_copied(dj->copy), done = dj->host_job ? atomic_load(&dj->host_job->done) : 0;

        if (!dj->host_job)
                done = dj->comp->total_bytes;
restart:
        for (Request *r = dj->waiters; r; r = r->job_next) {
                Weightd__V1__Envelope env = WEIGHTD__V1__ENVELOPE__INIT;
                Weightd__V1__ProgressEvent ev = WEIGHTD__V1__PROGRESS_EVENT__INIT;

                if (!r->progress || r->progress_sent == done + copied)
                        continue;
                r->progress_sent = done + copied;
                ev.done_bytes = done;
                ev.total_bytes = dj->comp->total_bytes;
                ev.copied_bytes = copied;
                ev.model = dj->comp->model;
                ev.component = dj->comp->name;
                env.id = r->id;
                env.body_case = WEIGHTD__V1__ENVELOPE__BODY_PROGRESS;
                env.progress = &ev;
                if (conn_send(r->conn, &env, NULL, 0) < 0)
                        goto restart;
        }
}

void device_jobs_poll(Server *s) {
        uint64_t now = now_usec();
        DevJob *next;

        for (DevJob *dj = s->dev_jobs; dj; dj = next) {
                int r;

                next = dj->dev_jobs_next;
                if (!atomic_exchange(&dj->woke, false))
                        continue;
                if (gpu_copy_finished(dj->copy, &r, NULL)) {
                        dev_job_finish(dj);
                        /* It may have let its host load seal: look again. */
                        next = s->dev_jobs;
                        (void) uv_async_send(&s->wake);
                        continue;
                }
                if (now - dj->progress_usec >= SERVER_PROGRESS_INTERVAL_USEC) {
                        dj->progress_usec = now;
                        dev_job_progress(dj);
                }
        }
        server_update_status(s);
        server_maybe_exit(s);
}

void device_feed_progress(Job *j, LoadJob *lj) {
        pthread_mutex_lock(&j->feeds_lock);
        LIST_FOREACH(feeds, dj, j->feeds)
                for (size_t f = 0; f < dj->comp->n_files; f++)
                        gpu_copy_advance(dj->copy, f, load_job_filled(lj, f));
        pthread_mutex_unlock(&j->feeds_lock);
}

bool device_feeds_busy(Job *j, int read_error) {
        if (!j->feeds)
                return false;
        if (read_error != 0)
                LIST_FOREACH(feeds, dj, j->feeds)
                        gpu_copy_cancel(dj->copy);
        else
                LIST_FOREACH(feeds, dj, j->feeds)
                        gpu_copy_advance_all(dj->copy);
        return true;
}

void device_host_done(Job *j, CacheEntry *entry) {
        if (entry && j->drop_host && !j->keep_host)
                drop_host_entry(j->server, entry);
}

/* ---- Status and List ---------------------------------------------------- */

void device_status(Server *s, Weightd__V1__StatusReply *st, Weightd__V1__Device *devs, Weightd__V1__Device **ptrs) {
        size_t n = gpu_n_devices(s->gpu);

        st->gpu = s->gpu_reason;
        for (size_t i = 0; i < n; i++) {
                const GpuDeviceInfo *d = gpu_device(s->gpu, i);
                CacheStats cs;

                cache_get_stats(s->dev_caches[i], &cs);
                weightd__v1__device__init(&devs[i]);
                devs[i].index = d->index;
                devs[i].uuid = (char *) d->uuid;
                devs[i].name = (char *) d->name;
                devs[i].pci_bus_id = (char *) d->pci_bus_id;
                devs[i].total_bytes = d->total_bytes;
                devs[i].budget_bytes = cs.budget;
                devs[i].used_bytes = cs.used;
                devs[i].evictable_bytes = cs.evictable;
                ptrs[i] = &devs[i];
        }
        st->n_devices = n;
        st->devices = ptrs;
}

size_t device_n_entries(Server *s) {
        size_t n = 0;

        for (size_t i = 0; s->dev_caches && i < gpu_n_devices(s->gpu); i++) {
                CacheStats cs;

                cache_get_stats(s->dev_caches[i], &cs);
                n += cs.n_entries + cs.n_detached;
        }
        return n;
}

const char *device_tier_name(Server *s, const CacheEntry *e, char *buf, size_t size) {
        const char *name = cache_name(e->cache);

        snprintf(buf, size, "%s", name);
        return buf;
}
