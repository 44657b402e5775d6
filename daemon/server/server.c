/* The daemon's lifecycle: the listening socket (from the service manager or
 * bound at the configured path), accepting peers against the allow list and
 * the connection limits, load jobs shared by every request for the same
 * component, configuration reloads on SIGHUP, readiness, status and watchdog
 * notifications, and a clean drain on SIGTERM.
 *
 * Threads: models are resolved (opened, headers parsed) on libuv's thread
 * pool, one at a time under catalog_lock, so slow storage never stalls the
 * loop; load jobs run on the reader thread, whose callbacks store progress in
 * atomics and wake the loop with a uv_async_t; the loop does the rest. */

#include <fcntl.h>
#include <grp.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <syslog.h>
#include <unistd.h>

#include "server/notify.h"
#include "server/server-private.h"
#include "util/log.h"

static LogLevel log_level_from_syslog(int prio) {
        if (prio <= LOG_ERR)
                return LOG_LEVEL_ERROR;
        if (prio == LOG_WARNING)
                return LOG_LEVEL_WARNING;
        if (prio < LOG_DEBUG)
                return LOG_LEVEL_INFO;
        return LOG_LEVEL_DEBUG;
}

static ReaderParams reader_params(const Config *c) {
        return (ReaderParams){ .queue_depth = c->queue_depth, .chunk_size = c->chunk_size };
}


/* ---- status ------------------------------------------------------------- */

void server_update_status(Server *s) {
        char buf[sizeof(s->status_line)];
        CacheStats st;

        if (s->stopping)
                return;
        cache_get_stats(s->cache, &st);
        snprintf(buf, sizeof(buf),
                 "STATUS=%zu components, %.1f of %.1f GiB used, %u leases, %u connections, %u loading", st.n_entries,
                 (double) st.used / (1u << 30), (double) st.budget / (1u << 30), s->n_leases, s->n_conns, s->n_jobs);
        if (strcmp(buf, s->status_line) == 0)
                return;
        memcpy(s->status_line, buf, sizeof(buf));
        (void) notify_send(buf);
}

static void on_status_timer(uv_timer_t *t) {
        server_update_status(t->data);
}

/* Free pages in the default hugetlb pool (0 when there is none). */
static uint64_t hugetlb_pool_free(void) {
        _cleanup_fclose_ FILE *f = fopen("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages", "re");
        unsigned long long n = 0;

        if (!f || fscanf(f, "%llu", &n) != 1)
                return 0;
        return n;
}

/* Every second: close connections that did not say Hello in time, so that
 * silent ones cannot hold a uid's connection slots, and note whether the
 * hugetlb pool has room (for Status, which must not read sysfs each time). */
static void on_tick(uv_timer_t *t) {
        Server *s = t->data;
        uint64_t now = now_usec(), limit = (uint64_t) s->config->hello_timeout * 1000000u;

        s->hugetlb_free_pages = hugetlb_pool_free();

        for (Conn *c = s->conns, *next; c; c = next) {
                next = c->conns_next;
                if (!c->hello && now - c->accepted_usec >= limit) {
                        log_info("%s: no Hello within %u s, disconnecting", c->name, s->config->hello_timeout);
                        conn_close(c);
                }
        }
}

static void on_watchdog_timer(uv_timer_t *t) {
        (void) notify_send("WATCHDOG=1");
}

/* ---- slab memory -------------------------------------------------------- */

/* Slabs the cache let go of, freed on the thread pool: returning GiB of
 * pages to the kernel must not stall the loop. */
typedef struct Reap {
        uv_work_t work;
        Gpu *gpu;
        Slab **slabs;
        size_t n;
} Reap;

/* Page-locked slabs are unlocked before their mapping goes. */
static void reap_free_slabs(Gpu *gpu, Slab **slabs, size_t n) {
        for (size_t i = 0; i < n; i++) {
                if (slabs[i])
                        gpu_host_unregister(gpu, slabs[i]->data);
                slab_free(slabs[i]);
        }
        free(slabs);
}

static void reap_work(uv_work_t *w) {
        Reap *r = w->data;

        reap_free_slabs(r->gpu, r->slabs, r->n);
}

static void reap_done(uv_work_t *w, int status) {
        free(w->data);
}

static void server_reap(Slab **slabs, size_t n, void *userdata) {
        Server *s = userdata;
        Reap *r = calloc(1, sizeof(Reap));

        if (r) {
                *r = (Reap){ .gpu = s->gpu, .slabs = slabs, .n = n };
                r->work.data = r;
                if (uv_queue_work(&s->loop, &r->work, reap_work, reap_done) == 0)
                        return;
        }
        free(r);
        reap_free_slabs(s->gpu, slabs, n); /* here, then */
}

/* ---- load jobs ---------------------------------------------------------- */

static void job_on_progress(LoadJob *lj, uint64_t done, uint64_t total, void *userdata) {
        Job *j = userdata;

        atomic_store(&j->done, done);
        device_feed_progress(j, lj);
        (void) uv_async_send(&j->server->wake);
}

static void job_on_done(LoadJob *lj, void *userdata) {
        Job *j = userdata;
        Server *s = j->server;

        /* The loop may free j as soon as this is set. */
        atomic_store(&j->finished, true);
        (void) uv_async_send(&s->wake);
}

/* Take a job out of the list: nothing can find or join it any more. */
static void job_unlink(Job *j) {
        Server *s = j->server;

        LIST_REMOVE(jobs, s->jobs, j);
        s->n_jobs--;
}

static void job_free(Job *j) {
        pthread_mutex_destroy(&j->feeds_lock);
        component_free(j->comp);
        safe_close(j->root_fd);
        free(j);
}

/* Swap in a reader with the reloaded io settings once no job uses the old. */
static void server_replace_reader(Server *s) {
        Reader *r;
        int k;

        if (!s->reader_stale || s->n_jobs > 0)
                return;
        ReaderParams p = reader_params(s->config);
        k = reader_new(&r, &p);
        if (k < 0) {
                log_warning_errno(k, "Cannot start a reader with the reloaded io settings, keeping the old one: %m");
                s->reader_stale = false;
                return;
        }
        s->storage_read_retired += reader_bytes_read(s->reader);
        reader_free(s->reader);
        s->reader = r;
        s->reader_stale = false;
}

int server_job_start(Server *s, int root_fd, Component *comp, uint64_t requested_usec, Job **ret, WdError *err) {
        Job *j;
        int r;

        j = calloc(1, sizeof(Job));
        if (!j)
                return wd_error_set(err, -ENOMEM, "out of memory");
        /* A reload may close the root; a restarted load needs it. */
        j->root_fd = fcntl(root_fd, F_DUPFD_CLOEXEC, 3);
        if (j->root_fd < 0) {
                r = negative_errno();
                free(j);
                return wd_error_set(err, r, "cannot duplicate the model root's descriptor: %s", strerror(-r));
        }
        r = pthread_mutex_init(&j->feeds_lock, NULL);
        if (r != 0) {
                safe_close(j->root_fd);
                free(j);
                return wd_error_set(err, -r, "cannot create a lock");
        }
        j->server = s;
        j->comp = comp;
        j->total = comp->total_bytes;
        j->requested_usec = requested_usec;
        j->started_usec = now_usec();
        r = load_job_start(&j->load, s->reader, s->cache, j->root_fd, comp, &s->load_opts, job_on_progress,
                           job_on_done, j, err);
        if (r != 0) {
                j->comp = NULL; /* still the caller's */
                job_free(j);
                return r;
        }
        LIST_PREPEND(jobs, s->jobs, j);
        s->n_jobs++;
        log_debug("loading %s %s: %zu files, %" PRIu64 " bytes", comp->model, comp->name, comp->n_files,
                  comp->total_bytes);
        server_update_status(s);
        *ret = j;
        return 0;
}

Job *server_job_find(Server *s, CacheEntry *e) {
        LIST_FOREACH(jobs, j, s->jobs)
                if (j->load && load_job_entry(j->load) == e)
                        return j;
        return NULL;
}

void server_job_waiter_gone(Job *j) {
        if (j->n_waiters > 0 || j->feeds || j->cancelled || !j->load)
                return;
        j->cancelled = true;
        log_debug("nobody waits for %s %s any more, cancelling its load", j->comp->model, j->comp->name);
        load_job_cancel(j->load);
}

/* Requests joined after the job was cancelled: hand them to a new load of
 * the same component.  Returns true when it started; else *r and err say
 * why, for the waiters. */
static bool job_restart(Job *j, int *r, WdError *err) {
        Job *n;
        int k;

        *err = WD_ERROR_NULL;
        /* The component was resolved for the cancelled load: this one has
         * no resolve of its own to report. */
        k = server_job_start(j->server, j->root_fd, j->comp, 0, &n, err);
        if (k != 0) {
                *r = k;
                return false;
        }
        log_debug("restarting the load of %s %s for %u requests that came after it was cancelled", j->comp->model,
                  j->comp->name, j->n_waiters);
        j->comp = NULL; /* the new job's */
        while (j->waiters) {
                Request *w = j->waiters;

                LIST_REMOVE(job, j->waiters, w);
                j->n_waiters--;
                w->job = n;
                LIST_PREPEND(job, n->waiters, w);
                n->n_waiters++;
        }
        return true;
}

/* Where the time of a load went, for its log line: "resolve 3.1 ms, queue
 * 0.0 ms, read 1.21 s, seal 41.2 ms".  The resolve ran before the job
 * started (0 when there was none); the stages after it follow one another
 * from load_job_start() to now.  Seal includes waiting for the device copies
 * this read fed, which end before it. */
static void job_format_stages(const Job *j, const LoadStages *st, char *buf, size_t size) {
        char resolve[FORMAT_TIMESPAN_MAX], queue[FORMAT_TIMESPAN_MAX], reading[FORMAT_TIMESPAN_MAX],
                seal[FORMAT_TIMESPAN_MAX];

        format_timespan(resolve, sizeof(resolve), j->requested_usec > 0 ? j->started_usec - j->requested_usec : 0);
        snprintf(buf, size, "resolve %s, queue %s, read %s, seal %s", resolve,
                 format_timespan(queue, sizeof(queue), st->queue_usec),
                 format_timespan(reading, sizeof(reading), st->read_usec),
                 format_timespan(seal, sizeof(seal), st->seal_usec));
}

static void job_complete(Job *j) {
        Server *s = j->server;
        WdError err = WD_ERROR_NULL;
        CacheEntry *e = NULL;
        uint64_t now = now_usec();
        double secs = (double) (now - j->started_usec) / 1e6;
        char stages[4 * FORMAT_TIMESPAN_MAX + 64];
        LoadStages st;
        int r;

        /* Replies can make peers send requests that must not find this job. */
        job_unlink(j);
        load_job_stages(j->load, now, &st); /* load_job_finish() frees the job */
        r = load_job_finish(TAKE_PTR(j->load), &e, &err);
        if (r == 0) {
                job_format_stages(j, &st, stages, sizeof(stages));
                log_info("loaded %s%s%s: %.1f MiB in %.2f s (%.2f GB/s); %s", j->comp->model,
                         *j->comp->name ? " " : "", j->comp->name, (double) j->total / (1u << 20), secs,
                         secs > 0 ? (double) j->total / secs / 1e9 : 0.0, stages);
        } else if (r != -ECANCELED)
                log_warning("load of %s%s%s failed: %s", j->comp->model, *j->comp->name ? " " : "", j->comp->name,
                            err.message);
        if (r == -ECANCELED && j->waiters && !s->stopping && job_restart(j, &r, &err)) {
                job_free(j);
                server_update_status(s);
                return;
        }
        dispatch_job_finished(j, r, e, &err);
        device_host_done(j, r == 0 ? e : NULL);
        job_free(j);
        server_replace_reader(s);
        server_update_status(s);
        server_maybe_exit(s);
}

static void seal_work(uv_work_t *w) {
        Job *j = w->data;
        Slab *const *slabs = load_job_slabs(j->load);

        /* Copies to devices read the writable mappings, page-locked; they
         * ended (device_feeds_busy()), and the mappings go now. */
        for (size_t i = 0; slabs && i < j->comp->n_files; i++)
                gpu_host_unregister(j->seal_gpu, slabs[i]->data);
        load_job_seal(j->load);
}

static void seal_done(uv_work_t *w, int status) {
        Job *j = w->data;

        j->sealing = false;
        j->sealed = true;
        job_complete(j);
}

/* Checking the files and sealing the slabs drops their writable mappings:
 * page tables of GiB, so on the thread pool.  The job stays joinable. */
static void job_seal(Job *j) {
        j->sealing = true;
        j->seal_gpu = j->server->gpu;
        j->seal_work.data = j;
        if (uv_queue_work(&j->server->loop, &j->seal_work, seal_work, seal_done) < 0) {
                load_job_seal(j->load);
                seal_done(&j->seal_work, 0);
        }
}

static void on_wake(uv_async_t *a) {
        Server *s = a->data;
        uint64_t now = now_usec();
        Job *next;

        for (Job *j = s->jobs; j; j = next) {
                next = j->jobs_next;
                if (atomic_load(&j->finished)) {
                        if (!j->sealing && !j->sealed && !device_feeds_busy(j, load_job_error(j->load)))
                                job_seal(j);
                        continue;
                }
                if (now - j->progress_usec >= SERVER_PROGRESS_INTERVAL_USEC) {
                        j->progress_usec = now;
                        dispatch_job_progress(j);
                }
        }
        device_jobs_poll(s);
}

/* ---- peers -------------------------------------------------------------- */

static bool gid_allowed(const Config *c, gid_t gid) {
        for (size_t i = 0; i < c->n_allow_gids; i++)
                if (c->allow_gids[i] == gid)
                        return true;
        return false;
}

static bool peer_allowed(const Config *c, int fd, const struct ucred *cred) {
        gid_t groups[256];
        socklen_t len = sizeof(groups);

        /* Root could take the daemon over anyway; refusing it helps nobody. */
        if (cred->uid == geteuid() || cred->uid == 0)
                return true;
        for (size_t i = 0; i < c->n_allow_uids; i++)
                if (c->allow_uids[i] == cred->uid)
                        return true;
        if (gid_allowed(c, cred->gid))
                return true;
        if (c->n_allow_gids > 0 && getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &len) == 0)
                for (size_t i = 0; i < len / sizeof(gid_t); i++)
                        if (gid_allowed(c, groups[i]))
                                return true;
        return false;
}

static UidSlot *uid_slot(Server *s, uid_t uid) {
        UidSlot *u;

        for (u = s->uids; u; u = u->next)
                if (u->uid == uid)
                        return u;
        u = calloc(1, sizeof(UidSlot));
        if (!u)
                return NULL;
        u->uid = uid;
        u->next = s->uids;
        s->uids = u;
        return u;
}

/* Tell a peer why it is refused (best effort, never blocking), then close. */
static void refuse(int fd, int code, const char *msg) {
        Weightd__V1__Envelope env = WEIGHTD__V1__ENVELOPE__INIT;
        Weightd__V1__Reply reply = WEIGHTD__V1__REPLY__INIT;
        _cleanup_free_ uint8_t *buf = NULL;
        size_t len, off = 0;

        reply.code = code;
        reply.message = (char *) msg;
        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_REPLY;
        env.reply = &reply;
        if (wire_pack(&env, SIZE_MAX, &buf, &len) == 0)
                (void) wire_send(fd, buf, len, NULL, 0, &off);
        safe_close(fd);
}

static void on_accept_resume(uv_timer_t *t);

static void on_listen(uv_poll_t *p, int status, int events) {
        Server *s = p->data;

        for (unsigned i = 0; i < 64 && !s->stopping; i++) {
                struct ucred cred;
                socklen_t len = sizeof(cred);
                char msg[160];
                UidSlot *slot;
                Conn *c;
                int fd, r;

                fd = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
                if (fd < 0) {
                        if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED)
                                return;
                        /* Out of descriptors: pause accepting a moment
                         * rather than spin on a level-triggered poll. */
                        log_warning_errno(-errno, "Cannot accept a connection: %m; pausing for 100 ms");
                        uv_poll_stop(&s->listen_poll);
                        uv_timer_start(&s->accept_timer, on_accept_resume, 100, 0);
                        return;
                }
                if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
                        log_warning_errno(-errno, "Cannot read a peer's credentials, closing it: %m");
                        safe_close(fd);
                        continue;
                }
                if (!peer_allowed(s->config, fd, &cred)) {
                        log_info("pid %d uid %u gid %u: not on the allow list, refused", (int) cred.pid,
                                 (unsigned) cred.uid, (unsigned) cred.gid);
                        snprintf(msg, sizeof(msg), "uid %u is not allowed to use this daemon (allow_uids, allow_gids)",
                                 (unsigned) cred.uid);
                        refuse(fd, WEIGHTD__V1__CODE__PERMISSION_DENIED, msg);
                        continue;
                }
                if (s->n_conns >= s->config->max_connections) {
                        log_warning("pid %d uid %u: %u connections, the limit; refused", (int) cred.pid,
                                    (unsigned) cred.uid, s->n_conns);
                        snprintf(msg, sizeof(msg), "the daemon has %u connections, its limit (max_connections)",
                                 s->n_conns);
                        refuse(fd, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, msg);
                        continue;
                }
                slot = uid_slot(s, cred.uid);
                if (!slot) {
                        refuse(fd, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "out of memory");
                        continue;
                }
                if (slot->n >= s->config->max_connections_per_uid) {
                        log_warning("pid %d uid %u: %u connections from this uid, the limit; refused", (int) cred.pid,
                                    (unsigned) cred.uid, slot->n);
                        snprintf(msg, sizeof(msg), "uid %u has %u connections, the limit (max_connections_per_uid)",
                                 (unsigned) cred.uid, slot->n);
                        refuse(fd, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, msg);
                        continue;
                }
                r = conn_new(s, fd, &cred, slot, &c);
                if (r < 0) {
                        log_warning_errno(r, "Cannot set up a connection: %m");
                        refuse(fd, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "out of resources");
                        continue;
                }
                log_debug("%s: connected", c->name);
        }
        server_update_status(s);
}

int server_add_peer(Server *s, int fd, const struct ucred *cred) {
        UidSlot *slot = uid_slot(s, cred->uid);
        Conn *c;
        int r;

        if (!slot) {
                safe_close(fd);
                return -ENOMEM;
        }
        r = conn_new(s, fd, cred, slot, &c);
        if (r < 0)
                safe_close(fd);
        return r;
}

int server_run_nowait(Server *s) {
        return uv_run(&s->loop, UV_RUN_NOWAIT);
}

static void on_accept_resume(uv_timer_t *t) {
        Server *s = t->data;

        if (!s->stopping && s->listening)
                uv_poll_start(&s->listen_poll, UV_READABLE, on_listen);
}

/* ---- the listening socket ----------------------------------------------- */

static int mkdir_parents(const char *path) {
        _cleanup_free_ char *p = strdup(path);

        if (!p)
                return -ENOMEM;
        for (char *q = strchr(p + 1, '/'); q; q = strchr(q + 1, '/')) {
                *q = 0;
                if (mkdir(p, 0755) < 0 && errno != EEXIST)
                        return -errno;
                *q = '/';
        }
        return 0;
}

/* The socket's folder must be ours (or root's) and writable by nobody else
 * (unless sticky, like /tmp): otherwise another user could have put a
 * socket of their own where clients look for the daemon. */
static int check_socket_dir(const char *path) {
        _cleanup_free_ char *dir = strdup(path);
        struct stat st;
        char *slash;

        if (!dir)
                return -ENOMEM;
        slash = strrchr(dir, '/');
        if (slash == dir)
                slash[1] = 0;
        else if (slash)
                *slash = 0;
        if (stat(dir, &st) < 0)
                return log_error_errno(-errno, "Cannot stat the socket's folder %s: %m", dir);
        if (st.st_uid != geteuid() && st.st_uid != 0)
                return log_error_errno(-EPERM, "The socket's folder %s belongs to uid %u, not to this daemon; refusing",
                                       dir, (unsigned) st.st_uid);
        if ((st.st_mode & (S_IWGRP | S_IWOTH)) && !(st.st_mode & S_ISVTX))
                return log_error_errno(-EPERM, "The socket's folder %s is writable by others; refusing", dir);
        return 0;
}

/* Bind path, replacing only a stale socket: never a symlink, never a file,
 * never a socket someone still listens on. */
static int listen_bind(const char *path, int *ret_fd) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        _cleanup_close_ int fd = -1;
        struct stat st;
        int r;

        if (strlen(path) >= sizeof(sa.sun_path))
                return log_error_errno(-ENAMETOOLONG, "Socket path %s is too long", path);
        strcpy(sa.sun_path, path);

        r = mkdir_parents(path);
        if (r < 0)
                return log_error_errno(r, "Cannot create the directory of %s: %m", path);
        r = check_socket_dir(path);
        if (r < 0)
                return r;

        if (lstat(path, &st) == 0) {
                if (S_ISLNK(st.st_mode))
                        return log_error_errno(-ELOOP, "%s is a symbolic link; refusing to replace it", path);
                if (!S_ISSOCK(st.st_mode))
                        return log_error_errno(-EEXIST, "%s exists and is not a socket; refusing to replace it",
                                               path);
                _cleanup_close_ int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
                if (probe < 0)
                        return log_error_errno(-errno, "Cannot create a socket: %m");
                if (connect(probe, (struct sockaddr *) &sa, sizeof(sa)) == 0)
                        return log_error_errno(-EADDRINUSE, "Another daemon is listening on %s", path);
                if (errno != ECONNREFUSED && errno != ENOENT)
                        return log_error_errno(-errno, "Cannot tell whether %s is in use: %m", path);
                if (unlink(path) < 0 && errno != ENOENT)
                        return log_error_errno(-errno, "Cannot remove the stale socket %s: %m", path);
                log_info("Removed the stale socket %s", path);
        }

        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return log_error_errno(-errno, "Cannot create a socket: %m");
        if (bind(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0)
                return log_error_errno(-errno, "Cannot bind %s: %m", sa.sun_path);
        /* Access is decided by SO_PEERCRED and the allow lists. */
        if (chmod(sa.sun_path, 0666) < 0) {
                r = log_error_errno(-errno, "Cannot set the mode of %s: %m", sa.sun_path);
                (void) unlink(sa.sun_path);
                return r;
        }
        if (listen(fd, SOMAXCONN) < 0) {
                r = log_error_errno(-errno, "Cannot listen on %s: %m", sa.sun_path);
                (void) unlink(sa.sun_path);
                return r;
        }
        *ret_fd = TAKE_FD(fd);
        return 0;
}

static int listen_open(Server *s) {
        int fd = notify_listen_fd();

        if (fd < 0)
                return log_error_errno(fd, "The service manager passed a socket that is not one Unix stream socket");
        if (fd > 0) {
                struct sockaddr_un sa = {};
                socklen_t len = sizeof(sa);
                int fl = fcntl(fd, F_GETFL);

                if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0 || fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)
                        return log_error_errno(-errno, "Cannot set up the passed socket: %m");
                s->listen_fd = fd;
                if (getsockname(fd, (struct sockaddr *) &sa, &len) == 0 && sa.sun_path[0])
                        s->socket_path = strndup(sa.sun_path, sizeof(sa.sun_path));
                else
                        s->socket_path = strdup("(socket activation)");
                if (!s->socket_path)
                        return -ENOMEM;
                log_info("Listening on %s (socket activation)", s->socket_path);
                return 0;
        }

        int r = listen_bind(s->config->socket, &s->listen_fd);
        if (r < 0)
                return r;
        s->listen_bound = true;
        s->socket_path = strdup(s->config->socket);
        if (!s->socket_path)
                return -ENOMEM;
        log_info("Listening on %s", s->socket_path);
        return 0;
}

static void listen_close(Server *s) {
        if (!s->listening)
                return;
        s->listening = false;
        uv_close((uv_handle_t *) &s->listen_poll, NULL);
}

/* ---- reload ------------------------------------------------------------- */

static bool roots_changed(const Roots *old, const Config *c) {
        if (old->n != c->n_model_roots)
                return true;
        for (size_t i = 0; i < old->n; i++)
                if (old->items[i].fd < 0 || strcmp(old->items[i].path, c->model_roots[i]) != 0)
                        return true;
        return false;
}

static void server_apply_log_level(const Config *c) {
        log_set_max_level(log_level_from_syslog(c->log_level));
}

static void server_reload(Server *s) {
        _cleanup_(config_freep) Config *c = NULL;
        WdError err = WD_ERROR_NULL;
        char buf[64];
        int r;

        snprintf(buf, sizeof(buf), "RELOADING=1\nMONOTONIC_USEC=%" PRIu64, now_usec());
        (void) notify_send(buf);

        if (!s->config_path) {
                log_info("SIGHUP: running on built-in defaults, no configuration file to re-read");
                (void) notify_send("READY=1");
                return;
        }
        r = config_load(s->config_path, &c, &err);
        if (r != 0) {
                log_error("SIGHUP: %s; keeping the running configuration", err.message);
                (void) notify_send("READY=1");
                return;
        }

        if (strcmp(c->socket, s->config->socket) != 0)
                log_warning("SIGHUP: socket %s -> %s needs a restart, ignoring.", s->config->socket, c->socket);
        if (roots_changed(s->roots, c)) {
                Roots *roots;
                r = roots_new(&roots, c->model_roots, c->n_model_roots);
                if (r < 0) {
                        log_error_errno(r, "SIGHUP: cannot open the model roots: %m; keeping the running configuration");
                        (void) notify_send("READY=1");
                        return;
                }
                roots_unref(s->roots);
                s->roots = roots;
                for (size_t i = 0; i < roots->n; i++)
                        if (roots->items[i].fd < 0)
                                log_warning_errno(roots->items[i].open_error, "Model root %s: %m, ignoring.",
                                                  roots->items[i].path);
        }
        cache_set_budget(s->cache, c->host_budget);
        device_tier_reload(s, c);
        s->load_opts = (LoadOptions){ .direct = c->direct_io, .pages = c->host_pages };
        if (c->queue_depth != s->config->queue_depth || c->chunk_size != s->config->chunk_size)
                s->reader_stale = true;
        server_apply_log_level(c);
        config_free(s->config);
        s->config = TAKE_PTR(c);
        server_replace_reader(s);
        log_info("Reloaded the configuration from %s", s->config_path);
        server_update_status(s);
        (void) notify_send("READY=1");
}

/* ---- stopping ----------------------------------------------------------- */

static void on_drain_timeout(uv_timer_t *t) {
        Server *s = t->data;

        log_warning("Peers did not read their last replies within %u ms; closing them", SERVER_DRAIN_TIMEOUT_MS);
        while (s->conns)
                conn_close(s->conns);
        server_maybe_exit(s);
}

static void server_close_handles(Server *s) {
        uv_close((uv_handle_t *) &s->sig_term, NULL);
        uv_close((uv_handle_t *) &s->sig_int, NULL);
        uv_close((uv_handle_t *) &s->sig_hup, NULL);
        uv_close((uv_handle_t *) &s->wake, NULL);
        uv_close((uv_handle_t *) &s->status_timer, NULL);
        uv_close((uv_handle_t *) &s->watchdog_timer, NULL);
        uv_close((uv_handle_t *) &s->drain_timer, NULL);
        uv_close((uv_handle_t *) &s->accept_timer, NULL);
        uv_close((uv_handle_t *) &s->tick_timer, NULL);
}

void server_maybe_exit(Server *s) {
        if (!s->stopping || s->n_conns > 0 || s->n_jobs > 0 || s->n_dev_jobs > 0 || s->n_resolving > 0 ||
            s->handles_closed)
                return;
        s->handles_closed = true;
        server_close_handles(s);
}

static void server_stop(Server *s) {
        if (s->stopping)
                return;
        (void) notify_send("STOPPING=1");
        log_info("Stopping: %u connections, %u loads running", s->n_conns, s->n_jobs);
        s->stopping = true;
        listen_close(s);

        /* Every request waiting for a resolve or a load hears why it ends;
         * a load nobody waits for any more is cancelled. */
        for (Conn *c = s->conns, *next; c; c = next) {
                next = c->conns_next;
                while (c->pending) {
                        uint64_t id = c->pending->id;

                        request_drop(c->pending);
                        (void) conn_send_error(c, id, WEIGHTD__V1__CODE__UNAVAILABLE, "weightd is stopping");
                }
        }

        /* Let peers read what is queued for them, for a while. */
        for (Conn *c = s->conns, *next; c; c = next) {
                next = c->conns_next;
                conn_close_when_sent(c);
        }
        uv_timer_stop(&s->drain_timer);
        uv_timer_start(&s->drain_timer, on_drain_timeout, SERVER_DRAIN_TIMEOUT_MS, 0);
        uv_timer_stop(&s->status_timer);
        uv_timer_stop(&s->watchdog_timer);
        uv_timer_stop(&s->accept_timer);
        uv_timer_stop(&s->tick_timer);
        server_maybe_exit(s);
}

static void on_signal(uv_signal_t *h, int signum) {
        Server *s = h->data;

        if (signum == SIGHUP)
                server_reload(s);
        else
                server_stop(s);
}

/* ---- setup -------------------------------------------------------------- */

Server *server_free(Server *s) {
        if (!s)
                return NULL;
        /* Only after server_run() returned: no handle is active any more,
         * and nothing may be queued on the loop: free slabs here. */
        if (s->cache)
                cache_set_reaper(s->cache, NULL, NULL);
        while (s->jobs) {
                Job *j = s->jobs;
                if (j->load) {
                        load_job_cancel(j->load);
                        while (!atomic_load(&j->finished))
                                usleep(1000);
                        WdError err;
                        CacheEntry *e;
                        (void) load_job_finish(TAKE_PTR(j->load), &e, &err);
                }
                job_unlink(j);
                job_free(j);
        }
        /* Device loads ended before the loop did (server_maybe_exit()). */
        reader_free(s->reader);
        device_tier_free(s);
        cache_free(s->cache);
        roots_unref(s->roots);
        if (s->listen_fd >= 0) {
                if (s->listen_bound && s->socket_path)
                        (void) unlink(s->socket_path);
                safe_close(s->listen_fd);
        }
        while (s->uids) {
                UidSlot *u = s->uids;
                s->uids = u->next;
                free(u);
        }
        (void) uv_loop_close(&s->loop);
        if (s->catalog_lock_init)
                pthread_mutex_destroy(&s->catalog_lock);
        config_free(s->config);
        free(s->config_path);
        free(s->socket_path);
        free(s);
        return NULL;
}

int server_new(Server **ret, Config *config, const char *config_path) {
        _cleanup_(server_freep) Server *s = NULL;
        int r;

        s = calloc(1, sizeof(Server));
        if (!s) {
                config_free(config);
                return log_error_errno(-ENOMEM, "Out of memory");
        }
        s->listen_fd = -1;
        s->config = config;
        s->started_usec = now_usec();
        server_apply_log_level(config);
        if (config_path) {
                s->config_path = strdup(config_path);
                if (!s->config_path)
                        return log_error_errno(-ENOMEM, "Out of memory");
        }
        r = pthread_mutex_init(&s->catalog_lock, NULL);
        if (r != 0)
                return log_error_errno(-r, "Cannot create a lock: %m");
        s->catalog_lock_init = true;
        r = uv_loop_init(&s->loop);
        if (r < 0)
                return log_error_errno(r, "Cannot create the event loop: %s", uv_strerror(r));

        r = roots_new(&s->roots, config->model_roots, config->n_model_roots);
        if (r < 0)
                return log_error_errno(r, "Cannot set up the model roots: %m");
        for (size_t i = 0; i < s->roots->n; i++)
                if (s->roots->items[i].fd < 0)
                        log_warning_errno(s->roots->items[i].open_error, "Model root %s: %m, ignoring.",
                                          s->roots->items[i].path);
        r = cache_new(&s->cache, "host", config->host_budget);
        if (r < 0)
                return log_error_errno(r, "Cannot create the cache: %m");
        cache_set_reaper(s->cache, server_reap, s);
        ReaderParams p = reader_params(config);
        r = reader_new(&s->reader, &p);
        if (r < 0)
                return log_error_errno(r, "Cannot start the io_uring reader: %m");
        s->load_opts = (LoadOptions){ .direct = config->direct_io, .pages = config->host_pages };

        r = listen_open(s);
        if (r < 0)
                return r;

        if ((r = uv_poll_init(&s->loop, &s->listen_poll, s->listen_fd)) < 0 ||
            (r = uv_signal_init(&s->loop, &s->sig_term)) < 0 || (r = uv_signal_init(&s->loop, &s->sig_int)) < 0 ||
            (r = uv_signal_init(&s->loop, &s->sig_hup)) < 0 || (r = uv_async_init(&s->loop, &s->wake, on_wake)) < 0 ||
            (r = uv_timer_init(&s->loop, &s->status_timer)) < 0 ||
            (r = uv_timer_init(&s->loop, &s->watchdog_timer)) < 0 ||
            (r = uv_timer_init(&s->loop, &s->drain_timer)) < 0 ||
            (r = uv_timer_init(&s->loop, &s->accept_timer)) < 0 ||
            (r = uv_timer_init(&s->loop, &s->tick_timer)) < 0)
                return log_error_errno(r, "Cannot set up the event loop: %s", uv_strerror(r));
        device_tier_start(s);
        s->listening = true;
        s->listen_poll.data = s->sig_term.data = s->sig_int.data = s->sig_hup.data = s;
        s->wake.data = s->status_timer.data = s->watchdog_timer.data = s->drain_timer.data = s->accept_timer.data = s->tick_timer.data = s;

        log_info("weightd %s: budget %.1f GiB (%s), %zu model roots, io queue depth %u, chunk %" PRIu64
                 " KiB, direct I/O %s",
                 WEIGHTD_VERSION, (double) config->host_budget / (1u << 30), config->host_budget_spec,
                 config->n_model_roots, config->queue_depth, config->chunk_size >> 10,
                 direct_mode_to_string(config->direct_io));
        *ret = TAKE_PTR(s);
        return 0;
}

int server_run(Server *s) {
        int r;

        uv_poll_start(&s->listen_poll, UV_READABLE, on_listen);
        uv_signal_start(&s->sig_term, on_signal, SIGTERM);
        uv_signal_start(&s->sig_int, on_signal, SIGINT);
        uv_signal_start(&s->sig_hup, on_signal, SIGHUP);
        uv_timer_start(&s->status_timer, on_status_timer, 5000, 5000);
        s->hugetlb_free_pages = hugetlb_pool_free();
        uv_timer_start(&s->tick_timer, on_tick, 1000, 1000);
        s->watchdog_usec = notify_watchdog_usec();
        if (s->watchdog_usec > 0) {
                uint64_t ms = MAX(s->watchdog_usec / 2000, 1);
                uv_timer_start(&s->watchdog_timer, on_watchdog_timer, ms, ms);
        }
        (void) notify_send("READY=1");
        server_update_status(s);

        r = uv_run(&s->loop, UV_RUN_DEFAULT);
        (void) r;
        log_info("Stopped");
        return s->exit_code;
}
