/* Component loads: cache reservation, slabs, reader job, verification. */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "store/loader.h"
#include "util/time-util.h"

struct LoadJob {
        Cache *cache;
        int root_fd;
        const Component *comp;
        CacheEntry *entry;
        Slab **slabs;         /* comp->n_files */
        int *direct_fds;      /* comp->n_files, -1 where buffered */
        ReaderJob *reader_job;
        load_progress_fn progress;
        load_done_fn done;
        void *userdata;

        int error;
        size_t failed_extent;
        bool direct_used;
        bool part;     /* load_job_prepare_variant(): the slabs hold only parts of the files */
        uint64_t started_usec;

        bool sealed;   /* load_job_seal() ran */
        int seal_r;    /* and its outcome */
        WdError seal_err;
};

static const char *const direct_mode_names[_DIRECT_MODE_MAX] = {
        [DIRECT_AUTO] = "auto",
        [DIRECT_ON] = "on",
        [DIRECT_OFF] = "off",
};

const char *direct_mode_to_string(DirectMode m) {
        return m < _DIRECT_MODE_MAX ? direct_mode_names[m] : NULL;
}

int direct_mode_from_string(const char *s) {
        return string_table_lookup(direct_mode_names, _DIRECT_MODE_MAX, s);
}

static LoadJob *load_job_free(LoadJob *j) {
        if (!j)
                return NULL;
        /* A failed load's slabs may hold GiB already read. */
        cache_reap_slabs(j->cache, TAKE_PTR(j->slabs), j->comp->n_files);
        if (j->direct_fds)
                for (size_t i = 0; i < j->comp->n_files; i++)
                        safe_close(j->direct_fds[i]);
        free(j->direct_fds);
        reader_job_free(j->reader_job);
        free(j);
        return NULL;
}

/* On failure before the reader took the job: give the reservation back. */
static LoadJob *load_job_abort(LoadJob *j) {
        if (j && j->entry)
                cache_entry_abort(j->entry);
        return load_job_free(j);
}
DEFINE_TRIVIAL_CLEANUP_FUNC(LoadJob *, load_job_abort);

void load_job_discard(LoadJob *job) {
        load_job_abort(job);
}

static void on_progress(ReaderJob *rj, uint64_t done, uint64_t total, void *userdata) {
        LoadJob *j = userdata;

        if (j->progress)
                j->progress(j, done, total, j->userdata);
}

static void on_done(ReaderJob *rj, int error, size_t failed_extent, void *userdata) {
        LoadJob *j = userdata;

        j->error = error;
        j->failed_extent = failed_extent;
        j->done(j, j->userdata);
}

/* Open the file again with O_DIRECT, and make sure it is the same file.
 * *ret_fd is -1 when the file is to be read buffered. */
static int open_direct(LoadJob *j, const CatalogFile *f, DirectMode mode, int *ret_fd, WdError *err) {
        _cleanup_close_ int fd = -1;
        FileId id;
        int r;

        if (mode == DIRECT_OFF) {
                *ret_fd = -1;
                return 0;
        }
        fd = fs_open_beneath(j->root_fd, f->path, O_RDONLY | O_DIRECT);
        if (fd == -EINVAL && mode == DIRECT_AUTO) {
                *ret_fd = -1; /* the file system has no direct I/O */
                return 0;
        }
        if (fd < 0)
                return wd_error_set(err, fd, "%s: cannot open for direct I/O: %s", f->display, strerror(-fd));
        r = file_id_from_fd(fd, &id);
        if (r < 0)
                return wd_error_set(err, r, "%s: cannot stat: %s", f->display, strerror(-r));
        if (!file_id_equal(&id, &f->id))
                return wd_error_set(err, WD_E_CHANGED, "%s: the file changed since its header was read", f->display);
        *ret_fd = TAKE_FD(fd);
        return 0;
}

/* Reserve comp's entry, create its slabs and open its files for direct
 * I/O: everything but the read. */
static int prepare(LoadJob **ret, Cache *cache, int root_fd, const Component *comp, const LoadOptions *opts,
                   const char *variant, uint64_t reserve_bytes, load_progress_fn progress, load_done_fn done,
                   void *userdata, WdError *err) {
        _cleanup_(load_job_abortp) LoadJob *j = NULL;
        _cleanup_free_ FileId *ids = NULL;
        uint64_t started = now_usec();
        size_t n = comp->n_files;
        int r;

        j = calloc(1, sizeof(LoadJob));
        ids = calloc(n ? n : 1, sizeof(FileId));
        if (!j || !ids)
                return wd_error_set(err, -ENOMEM, "out of memory");
        *j = (LoadJob){ .cache = cache, .root_fd = root_fd, .comp = comp, .progress = progress, .done = done,
                        .userdata = userdata, .started_usec = started };
        j->slabs = calloc(n ? n : 1, sizeof(Slab *));
        j->direct_fds = calloc(n ? n : 1, sizeof(int));
        if (!j->slabs || !j->direct_fds)
                return wd_error_set(err, -ENOMEM, "out of memory");
        for (size_t i = 0; i < n; i++) {
                j->direct_fds[i] = -1;
                ids[i] = comp->files[i].id;
        }

        r = cache_reserve(cache, comp->model, comp->name, variant, ids, n, reserve_bytes, &j->entry, err);
        if (r != 0)
                return r;

        for (size_t i = 0; i < n; i++) {
                const CatalogFile *f = &comp->files[i];

                r = slab_new(&j->slabs[i], f->path, f->id.size, opts->pages);
                if (r < 0)
                        return wd_error_set(err, r, "%s: cannot create a host slab of %llu bytes: %s", f->display,
                                            (unsigned long long) f->id.size, strerror(-r));
                r = open_direct(j, f, opts->direct, &j->direct_fds[i], err);
                if (r != 0)
                        return r;
                j->direct_used = j->direct_used || j->direct_fds[i] >= 0;
        }
        *ret = TAKE_PTR(j);
        return 0;
}

void load_job_extent(LoadJob *j, size_t file, uint64_t offset, uint64_t length, ReaderExtent *ret) {
        const CatalogFile *f = &j->comp->files[file];

        *ret = (ReaderExtent){
                .fd = j->direct_fds[file] >= 0 ? j->direct_fds[file] : f->fd,
                .buffered_fd = f->fd,
                .direct = j->direct_fds[file] >= 0 && offset % READER_ALIGN == 0,
                .offset = offset,
                .length = length,
                .dest = j->slabs[file]->data + offset,
        };
}

int load_job_prepare(LoadJob **ret, Cache *cache, int root_fd, const Component *comp, const LoadOptions *opts,
                     WdError *err) {
        return prepare(ret, cache, root_fd, comp, opts, "", comp->total_bytes, NULL, NULL, NULL, err);
}

int load_job_prepare_variant(LoadJob **ret, Cache *cache, int root_fd, const Component *comp, const LoadOptions *opts,
                             const char *variant, uint64_t reserve_bytes, WdError *err) {
        int r = prepare(ret, cache, root_fd, comp, opts, variant, reserve_bytes, NULL, NULL, NULL, err);

        if (r == 0)
                (*ret)->part = true;
        return r;
}

int load_job_start(LoadJob **ret, Reader *reader, Cache *cache, int root_fd, const Component *comp,
                   const LoadOptions *opts, load_progress_fn progress, load_done_fn done, void *userdata, WdError *err) {
        _cleanup_(load_job_abortp) LoadJob *j = NULL;
        _cleanup_free_ ReaderExtent *extents = NULL;
        size_t n = comp->n_files;
        int r;

        extents = calloc(n ? n : 1, sizeof(ReaderExtent));
        if (!extents)
                return wd_error_set(err, -ENOMEM, "out of memory");
        r = prepare(&j, cache, root_fd, comp, opts, "", comp->total_bytes, progress, done, userdata, err);
        if (r != 0)
                return r;
        for (size_t i = 0; i < n; i++)
                load_job_extent(j, i, 0, comp->files[i].id.size, &extents[i]);

        r = reader_job_new(&j->reader_job, extents, n, on_progress, on_done, j);
        if (r < 0)
                return wd_error_set(err, r, "out of memory");
        r = reader_submit(reader, j->reader_job);
        if (r < 0)
                return wd_error_set(err, r, "cannot queue the read: %s", strerror(-r));
        *ret = TAKE_PTR(j);
        return 0;
}

void load_job_cancel(LoadJob *job) {
        if (job->reader_job)
                reader_cancel(job->reader_job);
}

CacheEntry *load_job_entry(LoadJob *job) {
        return job->entry;
}

uint64_t load_job_filled(LoadJob *job, size_t file) {
        return job->reader_job ? reader_job_filled(job->reader_job, file) : 0;
}

Slab *const *load_job_slabs(LoadJob *job) {
        return job->slabs;
}

int load_job_error(LoadJob *job) {
        return job->error;
}

bool load_job_direct(LoadJob *job) {
        return job->direct_used;
}

void load_job_stages(LoadJob *job, uint64_t end_usec, LoadStages *ret) {
        uint64_t first, last;

        reader_job_times(job->reader_job, &first, &last);
        *ret = (LoadStages){
                .queue_usec = first - job->started_usec,
                .read_usec = last - first,
                .seal_usec = end_usec - last,
        };
}

static int read_error(const LoadJob *j, WdError *err) {
        const CatalogFile *f = &j->comp->files[j->failed_extent];

        if (j->error == -ECANCELED)
                return wd_error_set(err, -ECANCELED, "%s: load cancelled", f->display);
        if (j->error == -ENODATA)
                return wd_error_set(err, WD_E_CHANGED, "%s: the file ended before its %llu bytes were read",
                                    f->display, (unsigned long long) f->id.size);
        return wd_error_set(err, j->error, "%s: read failed: %s", f->display, strerror(-j->error));
}

/* The bytes in the slabs must be the bytes whose header we validated. */
static int verify(const LoadJob *j, WdError *err) {
        for (size_t i = 0; i < j->comp->n_files; i++) {
                const CatalogFile *f = &j->comp->files[i];
                FileId now;
                int r;

                r = file_id_from_fd(f->fd, &now);
                if (r < 0)
                        return wd_error_set(err, r, "%s: cannot stat: %s", f->display, strerror(-r));
                if (!file_id_equal(&now, &f->id))
                        return wd_error_set(err, WD_E_CHANGED, "%s: the file changed while it was read", f->display);
                /* Partly filled slabs may lack the header; their owner
                 * checks the parts it filled itself. */
                if (!j->part && memcmp(j->slabs[i]->data, f->header->raw, f->header->data_offset) != 0)
                        return wd_error_set(err, WD_E_CHANGED,
                                            "%s: the header read differs from the one validated (the file was "
                                            "rewritten in place)",
                                            f->display);
        }
        return 0;
}

void load_job_seal(LoadJob *j) {
        if (j->sealed)
                return;
        j->sealed = true;
        if (j->error != 0)
                return; /* load_job_finish() reports it */
        j->seal_r = verify(j, &j->seal_err);
        for (size_t i = 0; i < j->comp->n_files && j->seal_r == 0; i++) {
                int r = slab_seal(j->slabs[i]);
                if (r < 0)
                        j->seal_r = wd_error_set(&j->seal_err, r, "%s: cannot seal the host slab: %s",
                                                 j->comp->files[i].display, strerror(-r));
        }
}

int load_job_finish(LoadJob *job, CacheEntry **ret_entry, WdError *err) {
        _cleanup_(load_job_abortp) LoadJob *j = job;
        CacheEntry *e;

        if (j->error != 0)
                return read_error(j, err);
        load_job_seal(j);
        if (j->seal_r != 0) {
                if (err)
                        *err = j->seal_err;
                return j->seal_r;
        }
        e = TAKE_PTR(j->entry);
        cache_entry_set_resident(e, TAKE_PTR(j->slabs), j->comp->n_files);
        load_job_free(TAKE_PTR(j));
        *ret_entry = e;
        return 0;
}

typedef struct SyncLoad {
        pthread_mutex_t lock;
        pthread_cond_t cond;
        bool finished;
} SyncLoad;

static void sync_done(LoadJob *job, void *userdata) {
        SyncLoad *s = userdata;

        pthread_mutex_lock(&s->lock);
        s->finished = true;
        pthread_cond_signal(&s->cond);
        pthread_mutex_unlock(&s->lock);
}

typedef struct SyncProgress {
        load_progress_fn fn;
        void *userdata;
        SyncLoad wait;
} SyncProgress;

static void sync_progress(LoadJob *job, uint64_t done, uint64_t total, void *userdata) {
        SyncProgress *p = userdata;

        if (p->fn)
                p->fn(job, done, total, p->userdata);
}

static void sync_progress_done(LoadJob *job, void *userdata) {
        sync_done(job, &((SyncProgress *) userdata)->wait);
}

int load_component(Reader *reader, Cache *cache, int root_fd, const Component *comp, const LoadOptions *opts,
                   load_progress_fn progress, void *userdata, CacheEntry **ret_entry, LoadStages *ret_stages,
                   WdError *err) {
        SyncProgress p = {
                .fn = progress,
                .userdata = userdata,
                .wait = { .lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER },
        };
        _cleanup_free_ FileId *ids = calloc(comp->n_files ? comp->n_files : 1, sizeof(FileId));
        LoadStages stages;
        CacheEntry *e;
        LoadJob *job;
        int r;

        if (!ids)
                return wd_error_set(err, -ENOMEM, "out of memory");
        for (size_t i = 0; i < comp->n_files; i++)
                ids[i] = comp->files[i].id;
        e = cache_lookup(cache, comp->model, comp->name, "", ids, comp->n_files);
        if (e && e->state == CACHE_ENTRY_RESIDENT) {
                *ret_entry = e;
                if (ret_stages)
                        *ret_stages = (LoadStages){};
                return 0;
        }

        r = load_job_start(&job, reader, cache, root_fd, comp, opts, sync_progress, sync_progress_done, &p, err);
        if (r != 0)
                return r;
        pthread_mutex_lock(&p.wait.lock);
        while (!p.wait.finished)
                pthread_cond_wait(&p.wait.cond, &p.wait.lock);
        pthread_mutex_unlock(&p.wait.lock);
        load_job_seal(job);
        load_job_stages(job, now_usec(), &stages);
        r = load_job_finish(job, ret_entry, err);
        if (r == 0 && ret_stages)
                *ret_stages = stages;
        return r;
}
