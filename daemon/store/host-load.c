/* The host load (see host-load.h): a LoadJob of the loader wrapped in the
 * Job base.  The reader thread stores progress in an atomic, advances the
 * feeds under feeds_lock and kicks the loop; its done callback posts
 * read_done and never touches the job again.  The loop then waits for the
 * feeds to let go of the writable slabs, has the worker verify and seal,
 * and ends the job. */
#include <assert.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "store/host-load.h"
#include "util/log.h"
#include "util/time-util.h"

typedef struct HostLoad {
        Job job; /* first */
        Store *store;
        LoadJob *load;
        Component *comp; /* owned; comp->model is the cache key */
        int root_fd;     /* owned duplicate */
        uint64_t requested_usec, started_usec;
        _Atomic uint64_t done_bytes;
        pthread_mutex_t feeds_lock; /* the reader thread walks feeds */
        HostLoadFeed *feeds;
        unsigned n_feeds;
        bool read_finished, seal_queued;
        int read_error;
        Completion read_done;
        WorkerTask seal;
} HostLoad;

static const JobKind host_load_kind;

static HostLoad *host_load(Job *j) {
        return (HostLoad *) j;
}

bool job_is_host_load(const Job *j) {
        return j->kind == &host_load_kind;
}

const Component *host_load_component(Job *j) {
        return host_load(j)->comp;
}

Slab *const *host_load_slabs(Job *j) {
        HostLoad *hl = host_load(j);

        return hl->load ? load_job_slabs(hl->load) : NULL;
}

/* ---- on the reader thread ----------------------------------------------- */

static void on_progress(LoadJob *lj, uint64_t done, uint64_t total, void *userdata) {
        HostLoad *hl = userdata;

        atomic_store(&hl->done_bytes, done);
        pthread_mutex_lock(&hl->feeds_lock);
        LIST_FOREACH(feeds, f, hl->feeds)
                for (size_t i = 0; i < hl->comp->n_files; i++)
                        f->ops->advance(f, i, load_job_filled(lj, i));
        pthread_mutex_unlock(&hl->feeds_lock);
        completion_kick(hl->store->queue);
}

static void read_done(Completion *c);

static void on_done(LoadJob *lj, void *userdata) {
        HostLoad *hl = userdata;

        /* The hand-over: the loop may free hl from here on. */
        completion_post(hl->store->queue, &hl->read_done, read_done);
}

/* ---- on the worker ------------------------------------------------------ */

static void seal_work(WorkerTask *t) {
        HostLoad *hl = container_of(t, HostLoad, seal);
        Store *st = hl->store;

        /* Copies to devices read the writable mappings, page-locked; they
         * ended (no feed is left), and the mappings go now. */
        if (hl->read_error == 0 && st->before_seal)
                st->before_seal(load_job_slabs(hl->load), hl->comp->n_files, st->userdata);
        load_job_seal(hl->load);
}

/* ---- on the loop -------------------------------------------------------- */

/* "resolve 3.1 ms, queue 0.0 ms, read 1.21 s, seal 41.2 ms": the resolve ran
 * before the job started (0 when there was none); seal includes waiting for
 * the device copies this read fed. */
static void format_stages(const HostLoad *hl, const LoadStages *st, char *buf, size_t size) {
        char resolve[FORMAT_TIMESPAN_MAX], queue[FORMAT_TIMESPAN_MAX], reading[FORMAT_TIMESPAN_MAX],
                seal[FORMAT_TIMESPAN_MAX];

        format_timespan(resolve, sizeof(resolve),
                        hl->requested_usec > 0 ? hl->started_usec - hl->requested_usec : 0);
        snprintf(buf, size, "resolve %s, queue %s, read %s, seal %s", resolve,
                 format_timespan(queue, sizeof(queue), st->queue_usec),
                 format_timespan(reading, sizeof(reading), st->read_usec),
                 format_timespan(seal, sizeof(seal), st->seal_usec));
}

/* Slabs that wanted hugetlb pages (host_pages auto) and got shmem because
 * the pool was short: counted for Status, and "; 2 of 4 files on small
 * pages (the hugetlb pool was short)" for the log line (or ""). */
static void count_fallbacks(HostLoad *hl, char *buf, size_t size) {
        Slab *const *slabs = load_job_slabs(hl->load);
        size_t n = 0;

        buf[0] = '\0';
        if (hl->store->load_opts.pages != SLAB_PAGES_AUTO || load_job_error(hl->load) != 0)
                return;
        for (size_t i = 0; i < hl->comp->n_files; i++)
                if (slabs[i] && !slabs[i]->hugetlb) {
                        n++;
                        hl->store->shmem_fallback_slabs++;
                        hl->store->shmem_fallback_bytes += slabs[i]->size;
                }
        if (n > 0)
                snprintf(buf, size, "; %zu of %zu files on small pages (the hugetlb pool was short)", n,
                         hl->comp->n_files);
}

static void seal_done(Completion *c) {
        HostLoad *hl = container_of(c, HostLoad, seal.done);
        WdError err = WD_ERROR_NULL;
        CacheEntry *e = NULL;
        uint64_t now = now_usec(), total = hl->comp->total_bytes;
        double secs = (double) (now - hl->started_usec) / 1e6;
        char stages[4 * FORMAT_TIMESPAN_MAX + 64], fallback[128];
        const char *sep = *hl->comp->name ? " " : "";
        LoadStages ls;
        int r;

        load_job_stages(hl->load, now, &ls);
        count_fallbacks(hl, fallback, sizeof(fallback));
        r = load_job_finish(TAKE_PTR(hl->load), &e, &err);
        if (r == 0) {
                format_stages(hl, &ls, stages, sizeof(stages));
                log_info_fields(&(LogFields){ .model = hl->comp->model, .component = hl->comp->name, .tier = "host",
                                              .bytes = &total, .duration_usec = &(uint64_t){ now - hl->started_usec } },
                                "loaded %s%s%s: %.1f MiB in %.2f s (%.2f GB/s); %s%s", hl->comp->model, sep,
                                hl->comp->name, (double) total / (1u << 20), secs,
                                secs > 0 ? (double) total / secs / 1e9 : 0.0, stages, fallback);
        } else if (r != -ECANCELED)
                log_warning_fields(&(LogFields){ .model = hl->comp->model, .component = hl->comp->name, .tier = "host",
                                                 .code = wd_error_code_name(r) },
                                   "load of %s%s%s failed: %s", hl->comp->model, sep, hl->comp->name, err.message);
        else
                log_debug("load of %s%s%s cancelled", hl->comp->model, sep, hl->comp->name);

        job_finish(&hl->job, &(JobOutcome){ .r = r, .err = &err, .entry = r == 0 ? e : NULL });
        store_changed(hl->store);
        job_unref(&hl->job); /* the reader's */
}

static void maybe_seal(HostLoad *hl) {
        if (!hl->read_finished || hl->seal_queued || hl->n_feeds > 0)
                return;
        hl->seal_queued = true;
        worker_push(hl->store->worker, &hl->seal, seal_work, seal_done);
}

static void read_done(Completion *c) {
        HostLoad *hl = container_of(c, HostLoad, read_done);
        Store *st = hl->store;

        hl->read_finished = true;
        hl->read_error = load_job_error(hl->load);
        st->n_reading--;
        if (st->n_reading == 0 && st->hugepool)
                (void) hugepool_resume(st->hugepool);
        job_progress(&hl->job, atomic_load(&hl->done_bytes), hl->comp->total_bytes, 0, true);
        job_set_sealing(&hl->job);
        for (HostLoadFeed *f = hl->feeds, *next; f; f = next) {
                next = f->feeds_next;
                f->ops->read_ended(f, hl->read_error);
        }
        maybe_seal(hl);
        store_changed(st);
}

static void host_load_poll(Job *j) {
        HostLoad *hl = host_load(j);

        if (j->state == JOB_RUNNING)
                job_progress(j, atomic_load(&hl->done_bytes), hl->comp->total_bytes, 0, false);
}

static void host_load_cancel(Job *j) {
        HostLoad *hl = host_load(j);

        log_debug("nobody waits for %s %s any more, cancelling its load", hl->comp->model, hl->comp->name);
        if (!hl->read_finished)
                load_job_cancel(hl->load);
}

static int host_load_restart(Job *j, Job **ret, WdError *err) {
        HostLoad *hl = host_load(j);

        log_debug("restarting the load of %s %s for %u requests that came after it was cancelled",
                  hl->comp->model, hl->comp->name, j->n_waiters);
        /* The component was resolved for the cancelled load: this one has
         * no resolve of its own to report. */
        return host_load_start(hl->store, hl->root_fd, hl->comp, 0, ret, err);
}

static void host_load_free(Job *j) {
        HostLoad *hl = host_load(j);

        assert(!hl->load); /* the reader's reference kept it alive until seal_done() */
        pthread_mutex_destroy(&hl->feeds_lock);
        component_free(hl->comp);
        safe_close(hl->root_fd);
        free(hl);
}

static const JobKind host_load_kind = {
        .name = "host load",
        .cancel = host_load_cancel,
        .restart = host_load_restart,
        .free = host_load_free,
        .poll = host_load_poll,
};

int host_load_start(Store *st, int root_fd, const Component *comp, uint64_t requested_usec, Job **ret,
                    WdError *err) {
        HostLoad *hl;
        int r;

        hl = calloc(1, sizeof(HostLoad));
        if (!hl)
                return wd_error_set(err, -ENOMEM, "out of memory");
        hl->store = st;
        hl->root_fd = -1;
        r = component_dup(comp, &hl->comp);
        if (r < 0) {
                free(hl);
                return wd_error_set(err, r, "cannot duplicate the component: %s", strerror(-r));
        }
        /* A reload may close the root; a restarted load needs it. */
        hl->root_fd = fcntl(root_fd, F_DUPFD_CLOEXEC, 3);
        if (hl->root_fd < 0) {
                r = negative_errno();
                component_free(hl->comp);
                free(hl);
                return wd_error_set(err, r, "cannot duplicate the model root's descriptor: %s", strerror(-r));
        }
        r = pthread_mutex_init(&hl->feeds_lock, NULL);
        if (r != 0) {
                component_free(hl->comp);
                safe_close(hl->root_fd);
                free(hl);
                return wd_error_set(err, -r, "cannot create a lock");
        }
        hl->requested_usec = requested_usec;
        hl->started_usec = now_usec();
        if (st->hugepool)
                hugepool_pause(st->hugepool);
        r = load_job_start(&hl->load, st->reader, st->cache, hl->root_fd, hl->comp, &st->load_opts, on_progress,
                           on_done, hl, err);
        if (r != 0) {
                if (st->n_reading == 0 && st->hugepool)
                        (void) hugepool_resume(st->hugepool);
                pthread_mutex_destroy(&hl->feeds_lock);
                component_free(hl->comp);
                safe_close(hl->root_fd);
                free(hl);
                return r;
        }
        job_init(&hl->job, &host_load_kind, &st->jobs, load_job_entry(hl->load));
        job_ref(&hl->job); /* the reader's, until seal_done() */
        hl->job.total = comp->total_bytes;
        st->n_reading++;
        log_debug("loading %s %s: %zu files, %" PRIu64 " bytes", comp->model, comp->name, comp->n_files,
                  comp->total_bytes);
        store_changed(st);
        *ret = &hl->job;
        return 0;
}

int host_load_feed(Job *j, HostLoadFeed *f, const HostLoadFeedOps *ops) {
        HostLoad *hl = host_load(j);

        if (j->state != JOB_RUNNING || hl->read_finished)
                return -EBUSY;
        f->ops = ops;
        f->job = job_ref(j);
        pthread_mutex_lock(&hl->feeds_lock);
        LIST_PREPEND(feeds, hl->feeds, f);
        pthread_mutex_unlock(&hl->feeds_lock);
        hl->n_feeds++;
        for (size_t i = 0; i < hl->comp->n_files; i++)
                ops->advance(f, i, load_job_filled(hl->load, i));
        return 0;
}

void host_load_unfeed(HostLoadFeed *f) {
        HostLoad *hl;

        if (!f->job)
                return;
        hl = host_load(f->job);
        pthread_mutex_lock(&hl->feeds_lock);
        LIST_REMOVE(feeds, hl->feeds, f);
        pthread_mutex_unlock(&hl->feeds_lock);
        hl->n_feeds--;
        f->job = NULL;
        maybe_seal(hl);
        job_unref(&hl->job);
}
