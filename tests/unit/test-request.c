/* Requests (daemon/server/request.c) over real peers (server/peer.c), a real
 * libuv loop and real socketpairs, linked without store/ (format/ is the
 * real one: components are freed and dtypes named by catalog.c and
 * safetensors.c): the review's decomposition asks that peer.c and request.c
 * unit-test without the store, so this file carries doubles for exactly the
 * functions request.c calls from store/, and for roots_unref():
 *
 *   - cache_entry_ref/unref/lease/unlease/memory_fd: a test entry (the real
 *     CacheEntry struct) whose slabs are real sealed memfds with their
 *     O_RDONLY reopens, refcounted as the cache does: a detached entry goes
 *     with its last reference.  So the descriptors a reply carries can be
 *     checked for what a client gets (the same inode, read-only, sealed,
 *     the bytes), and a reference that is missing is a use after free that
 *     ASan reports.
 *   - job_add_waiter/job_remove_waiter: a waiter list on the real Job struct;
 *     the test finishes a "job" the way job_finish() does (each waiter taken
 *     off before its done callback) and sends progress.
 *   - shard_plan_free, shard_spec_free: free what the test built;
 *     roots_unref: counts the calls (the test's requests resolve nothing).
 *
 * The test plays the driver (a frame callback that makes requests) and the
 * client (replies read frame by frame with their descriptors, decoded with
 * wire_unpack() and compared with the component the test built).  Checked:
 * request_complete() queues exactly one reply with the request's id and its
 * descriptors, takes a lease for a Load and not for a Prefetch, and never
 * decodes the peer's next frame under it: a pipelined Evict behind
 * max_pending waits for the loop's check phase, after the job answered all
 * its waiters from the entry it evicts (the unit-level regression for the
 * review's finding 1).  Dropping and cancelling (resolving or waiting), and
 * a peer that closed: not answered, nothing leaked. */

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include <cmocka.h>

#include "macro.h"
#include "server/request.h"
#include "util/log.h"
#include "test-util.h"
#include "wire.h"

#define MiB ((size_t) 1 << 20)
#define PAGE 4096u
#define MAX_FILES 2

/* ---- doubles for store/ --------------------------------------------------- */

typedef struct DeviceMem {
        int fd;
        uint64_t map_size;
} DeviceMem;

typedef struct TestEntry {
        CacheEntry e;
        Slab slabs[MAX_FILES];
        Slab *slab_ptrs[MAX_FILES];
        uint8_t *bytes[MAX_FILES]; /* what each slab holds */
        DeviceMem mem;
} TestEntry;

static unsigned entries_freed;
static unsigned roots_unrefs;

static void test_entry_free(TestEntry *t) {
        for (size_t i = 0; i < t->e.n_slabs; i++) {
                safe_close(t->slabs[i].fd);
                safe_close(t->slabs[i].client_fd);
                free(t->bytes[i]);
        }
        safe_close(t->mem.fd);
        free(t);
        entries_freed++;
}

CacheEntry *cache_entry_ref(CacheEntry *e) {
        assert_non_null(e);
        assert_true(e->refs > 0); /* nobody refs a freed entry back to life */
        e->refs++;
        return e;
}

void cache_entry_unref(CacheEntry *e) {
        if (!e)
                return;
        assert_true(e->refs > 0);
        if (--e->refs == 0 && e->state == CACHE_ENTRY_DETACHED)
                test_entry_free(container_of(e, TestEntry, e));
}

void cache_entry_lease(CacheEntry *e) {
        cache_entry_ref(e);
        e->leases++;
}

void cache_entry_unlease(CacheEntry *e) {
        assert_true(e->leases > 0);
        e->leases--;
        cache_entry_unref(e);
}

int cache_entry_memory_fd(const CacheEntry *e, uint64_t *ret_map_size) {
        const DeviceMem *m = e->memory;

        if (!m)
                return -1;
        *ret_map_size = m->map_size;
        return m->fd;
}

void job_add_waiter(Job *j, JobWaiter *w, const JobWaiterOps *ops) {
        assert_null(w->job);
        w->ops = ops;
        w->job = j;
        w->waiters_next = NULL;
        w->waiters_prev = j->waiters_tail;
        if (j->waiters_tail)
                j->waiters_tail->waiters_next = w;
        else
                j->waiters = w;
        j->waiters_tail = w;
        j->n_waiters++;
}

void job_remove_waiter(JobWaiter *w) {
        Job *j = w->job;

        if (!j)
                return;
        if (w->waiters_prev)
                w->waiters_prev->waiters_next = w->waiters_next;
        else
                j->waiters = w->waiters_next;
        if (w->waiters_next)
                w->waiters_next->waiters_prev = w->waiters_prev;
        else
                j->waiters_tail = w->waiters_prev;
        w->waiters_prev = w->waiters_next = NULL;
        w->job = NULL;
        j->n_waiters--;
}

/* The end of a job as job_finish() delivers it: in order, each waiter off
 * the job before its callback. */
static void fake_job_finish(Job *j, const JobOutcome *o) {
        while (j->waiters) {
                JobWaiter *w = j->waiters;

                job_remove_waiter(w);
                w->ops->done(w, o);
        }
}

static void fake_job_progress(Job *j, uint64_t done, uint64_t total, uint64_t copied) {
        for (JobWaiter *w = j->waiters, *next; w; w = next) {
                next = w->waiters_next;
                if (w->ops->progress)
                        w->ops->progress(w, done, total, copied);
        }
}

ShardPlan *shard_plan_free(ShardPlan *p) {
        if (p) {
                free(p->tensors);
                free(p);
        }
        return NULL;
}

ShardSpec *shard_spec_free(ShardSpec *s) {
        if (s) {
                free(s->rules);
                free(s);
        }
        return NULL;
}

Roots *roots_unref(Roots *r) {
        roots_unrefs++;
        assert_null(r); /* the test's requests resolve nothing */
        return NULL;
}

/* ---- the model the test serves ------------------------------------------ */

typedef struct TensorSpec {
        const char *name;
        Dtype dtype;
        unsigned ndim;
        uint64_t shape[2];
        uint64_t begin, end;
} TensorSpec;

typedef struct FileSpec {
        const char *path;
        uint64_t header_len;
        size_t n_tensors;
        TensorSpec tensors[2];
        const char *meta_key, *meta_value;
} FileSpec;

static const FileSpec files_spec[MAX_FILES] = {
        { "m/model-00001-of-00002.safetensors", 64, 2,
          { { "a.weight", DTYPE_F32, 2, { 2, 3 }, 0, 24 }, { "a.bias", DTYPE_F32, 1, { 3 }, 24, 36 } }, NULL, NULL },
        { "m/model-00002-of-00002.safetensors", 32, 1, { { "b.weight", DTYPE_BF16, 1, { 4 }, 0, 8 } }, "format",
          "pt" },
};

static uint64_t file_size(size_t i) {
        const FileSpec *fs = &files_spec[i];

        return 8 + fs->header_len + fs->tensors[fs->n_tensors - 1].end;
}

static Component *component_new_test(void) {
        Component *c = calloc(1, sizeof(Component));

        assert_non_null(c);
        c->model = strdup("/models/m");
        c->name = strdup("");
        c->n_files = MAX_FILES;
        c->files = calloc(MAX_FILES, sizeof(CatalogFile));
        assert_non_null(c->files);
        for (size_t i = 0; i < MAX_FILES; i++) {
                const FileSpec *fs = &files_spec[i];
                CatalogFile *f = &c->files[i];
                StHeader *h = calloc(1, sizeof(StHeader));

                assert_non_null(h);
                f->path = strdup(fs->path);
                assert_true(asprintf(&f->display, "/models/%s", fs->path) > 0);
                f->fd = -1;
                f->id.size = file_size(i);
                f->header = h;
                h->n_ref = 1;
                h->file_size = f->id.size;
                h->header_len = fs->header_len;
                h->data_offset = 8 + fs->header_len;
                h->n_tensors = fs->n_tensors;
                h->tensors = calloc(fs->n_tensors, sizeof(StTensor));
                assert_non_null(h->tensors);
                for (size_t j = 0; j < fs->n_tensors; j++) {
                        const TensorSpec *ts = &fs->tensors[j];
                        StTensor *t = &h->tensors[j];

                        t->name = strdup(ts->name);
                        t->dtype = ts->dtype;
                        t->ndim = ts->ndim;
                        t->shape = calloc(ts->ndim, sizeof(uint64_t));
                        assert_non_null(t->shape);
                        memcpy(t->shape, ts->shape, ts->ndim * sizeof(uint64_t));
                        t->begin = ts->begin;
                        t->end = ts->end;
                }
                if (fs->meta_key) {
                        h->n_metadata = 1;
                        h->metadata = calloc(1, sizeof(StMetadata));
                        assert_non_null(h->metadata);
                        h->metadata[0].key = strdup(fs->meta_key);
                        h->metadata[0].value = strdup(fs->meta_value);
                }
                c->total_bytes += f->id.size;
                c->n_tensors += fs->n_tensors;
        }
        return c;
}

/* A sealed memfd of size bytes (capacity: rounded to pages) holding a
 * pattern; ret_ro: its O_RDONLY reopen, what clients get. */
static int sealed_memfd(uint64_t size, uint32_t seed, uint8_t **ret_bytes, int *ret_ro) {
        uint8_t *b = malloc(size);
        uint32_t x = seed * 2654435761u + 1;
        char path[64];
        int fd;

        assert_non_null(b);
        for (uint64_t i = 0; i < size; i++) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                b[i] = (uint8_t) x;
        }
        fd = memfd_create("test-request", MFD_CLOEXEC | MFD_ALLOW_SEALING);
        assert_true(fd >= 0);
        assert_int_equal(pwrite(fd, b, size, 0), (ssize_t) size);
        assert_int_equal(ftruncate(fd, (off_t) ((size + PAGE - 1) / PAGE * PAGE)), 0);
        assert_int_equal(fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL), 0);
        snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
        *ret_ro = open(path, O_RDONLY | O_CLOEXEC);
        assert_true(*ret_ro >= 0);
        *ret_bytes = b;
        return fd;
}

/* A resident entry of the test's component, with the cache's reference. */
static TestEntry *test_entry_new(void) {
        TestEntry *t = calloc(1, sizeof(TestEntry));

        assert_non_null(t);
        t->mem.fd = -1;
        t->e.state = CACHE_ENTRY_RESIDENT;
        t->e.refs = 1;
        t->e.n_slabs = MAX_FILES;
        t->e.slabs = t->slab_ptrs;
        for (size_t i = 0; i < MAX_FILES; i++) {
                Slab *s = &t->slabs[i];

                s->size = file_size(i);
                s->capacity = (s->size + PAGE - 1) / PAGE * PAGE;
                s->fd = sealed_memfd(s->size, (uint32_t) i + 1, &t->bytes[i], &s->client_fd);
                s->sealed = true;
                t->slab_ptrs[i] = s;
        }
        return t;
}

/* The cache lets go (evicted): freed now unless someone holds it. */
static void test_entry_evict(TestEntry *t) {
        assert_int_equal(t->e.state, CACHE_ENTRY_RESIDENT);
        t->e.state = CACHE_ENTRY_DETACHED;
        cache_entry_unref(&t->e);
}

/* ---- the fixture: a loop, peers, and a driver in the frame callback ----- */

typedef enum Phase {
        PHASE_OTHER,
        PHASE_CHECK,
        PHASE_TEST,
} Phase;

typedef struct Seen {
        uint64_t id;
        int body_case;
        Phase phase;
        bool in_job_finish;
} Seen;

typedef struct Fixture {
        int fds_before;
        uv_loop_t loop;
        PeerContext ctx;
        uv_prepare_t prepare;
        uv_check_t check;
        Phase phase;
        unsigned depth;
        bool in_job_finish;
        Job job;             /* what Load and Prefetch requests wait on */
        TestEntry *entry;    /* what Evict evicts */
        bool entry_evicted;
        Seen seen[64];
        size_t n_seen;
        /* closing: complete the peer's requests instead of dropping them */
        bool complete_on_close;
        unsigned closing_calls;
} Fixture;

static int driver_frame(Peer *p, WireEnvelope *env, void *userdata) {
        Fixture *f = userdata;
        Weightd__V1__Reply ok = WEIGHTD__V1__REPLY__INIT;
        Request *r;

        assert_int_equal(f->depth, 0); /* never re-entered */
        f->depth++;
        assert_true(f->n_seen < ELEMENTSOF(f->seen));
        f->seen[f->n_seen++] = (Seen){ .id = env->id, .body_case = env->body_case, .phase = f->phase,
                                       .in_job_finish = f->in_job_finish };
        switch (env->body_case) {
        case WEIGHTD__V1__ENVELOPE__BODY_HELLO:
                p->hello = true;
                request_reply(p, env->id, &ok);
                break;
        case WEIGHTD__V1__ENVELOPE__BODY_LOAD:
        case WEIGHTD__V1__ENVELOPE__BODY_PREFETCH:
                r = request_new(p, env->id,
                                env->body_case == WEIGHTD__V1__ENVELOPE__BODY_LOAD ? REQUEST_LOAD : REQUEST_PREFETCH,
                                false);
                assert_non_null(r);
                r->comp = component_new_test();
                request_wait(r, &f->job);
                break;
        case WEIGHTD__V1__ENVELOPE__BODY_TENSORS:
                /* Answered at once, inside the frame callback. */
                r = request_new(p, env->id, REQUEST_TENSORS, false);
                assert_non_null(r);
                r->comp = component_new_test();
                request_complete(r, &(RequestOutcome){});
                break;
        case WEIGHTD__V1__ENVELOPE__BODY_EVICT:
                if (f->entry && !f->entry_evicted && f->entry->e.leases == 0) {
                        f->entry_evicted = true;
                        test_entry_evict(f->entry);
                        request_reply(p, env->id, &ok);
                } else
                        request_reply_error(p, env->id, WEIGHTD__V1__CODE__BUSY, "leased");
                break;
        default:
                fail_msg("unexpected frame %d", (int) env->body_case);
        }
        f->depth--;
        return 0;
}

static void driver_closing(Peer *p, void *userdata) {
        Fixture *f = userdata;

        f->closing_calls++;
        while (p->requests) {
                Request *r = request_from_link(p->requests);

                if (f->complete_on_close && !r->resolving)
                        request_complete(r, &(RequestOutcome){ .entry = &f->entry->e, .was_resident = true });
                else
                        request_drop(r);
        }
}

static const PeerOps driver_ops = {
        .frame = driver_frame,
        .closing = driver_closing,
};

static void on_prepare(uv_prepare_t *h) {
        Fixture *f = h->data;

        f->phase = PHASE_OTHER;
}

/* Started after the context's check, so it runs before it. */
static void on_check(uv_check_t *h) {
        Fixture *f = h->data;

        f->phase = PHASE_CHECK;
}

static const PeerLimits limits = {
        .max_connections = 16,
        .max_connections_per_uid = 16,
        .max_pending = 2,
        .max_request_size = 64u << 10,
        .hello_timeout_usec = 100000000u,
        .frame_timeout_usec = 100000000u,
};

static int setup(void **state) {
        Fixture *f = calloc(1, sizeof(Fixture));

        assert_non_null(f);
        log_set_max_level(LOG_LEVEL_ERROR);
        entries_freed = roots_unrefs = 0;
        f->fds_before = count_fds();
        assert_int_equal(uv_loop_init(&f->loop), 0);
        assert_int_equal(peer_context_init(&f->ctx, &f->loop, &limits, &driver_ops, f), 0);
        assert_int_equal(uv_prepare_init(&f->loop, &f->prepare), 0);
        assert_int_equal(uv_check_init(&f->loop, &f->check), 0);
        f->prepare.data = f->check.data = f;
        uv_prepare_start(&f->prepare, on_prepare);
        uv_check_start(&f->check, on_check);
        f->phase = PHASE_TEST;
        f->entry = test_entry_new();
        *state = f;
        return 0;
}

static int teardown(void **state) {
        Fixture *f = *state;

        peer_context_close(&f->ctx);
        uv_close((uv_handle_t *) &f->prepare, NULL);
        uv_close((uv_handle_t *) &f->check, NULL);
        assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
        assert_int_equal(uv_loop_close(&f->loop), 0);
        assert_int_equal(f->job.n_waiters, 0);
        /* Every reference but the cache's is gone; evicting frees it. */
        if (!f->entry_evicted) {
                assert_int_equal(f->entry->e.refs, 1);
                assert_int_equal(f->entry->e.leases, 0);
                test_entry_evict(f->entry);
        }
        assert_int_equal(entries_freed, 1);
        assert_null(f->ctx.users);
        assert_int_equal(count_fds(), f->fds_before);
        free(f);
        return 0;
}

static void pump(Fixture *f, unsigned turns) {
        for (unsigned i = 0; i < turns; i++)
                uv_run(&f->loop, UV_RUN_NOWAIT);
        f->phase = PHASE_TEST;
}

static int connect_peer(Fixture *f, Peer **ret) {
        int sv[2];
        struct ucred cred = { .pid = 4242, .uid = 1000, .gid = 1000 };

        assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
        assert_int_equal(peer_new(&f->ctx, sv[0], &cred, ret), 0);
        (*ret)->hello = true;
        return sv[1];
}

/* ---- the client's side -------------------------------------------------- */

static uint8_t *pack_request(uint64_t id, int body_case, size_t *ret_len) {
        Weightd__V1__Envelope env = WEIGHTD__V1__ENVELOPE__INIT;
        Weightd__V1__LoadRequest load = WEIGHTD__V1__LOAD_REQUEST__INIT;
        Weightd__V1__ComponentRef ref = WEIGHTD__V1__COMPONENT_REF__INIT;
        uint8_t *buf;

        load.model = ref.model = (char *) "/models/m";
        env.id = id;
        env.body_case = body_case;
        if (body_case == WEIGHTD__V1__ENVELOPE__BODY_LOAD || body_case == WEIGHTD__V1__ENVELOPE__BODY_PREFETCH)
                env.load = &load; /* prefetch shares the union slot */
        else
                env.evict = &ref; /* evict, tensors: a ComponentRef */
        assert_int_equal(wire_pack(&env, SIZE_MAX, &buf, ret_len), 0);
        return buf;
}

static void client_write(Fixture *f, int fd, const void *buf, size_t len) {
        size_t done = 0;

        for (unsigned spins = 0; done < len; spins++) {
                ssize_t k = write(fd, (const uint8_t *) buf + done, len - done);

                if (k < 0) {
                        assert_int_equal(errno, EAGAIN);
                        assert_true(spins < 100000);
                        pump(f, 1);
                        continue;
                }
                done += (size_t) k;
        }
}

/* Frames in one write. */
static void client_send(Fixture *f, int fd, const uint64_t *ids, const int *bodies, size_t n) {
        uint8_t *all = NULL;
        size_t len = 0;

        for (size_t i = 0; i < n; i++) {
                size_t k;
                _cleanup_free_ uint8_t *b = pack_request(ids[i], bodies[i], &k);

                all = realloc(all, len + k);
                assert_non_null(all);
                memcpy(all + len, b, k);
                len += k;
        }
        client_write(f, fd, all, len);
        free(all);
}

static bool client_read_exact(Fixture *f, int fd, uint8_t *buf, size_t len, int *fds, size_t *n_fds, size_t max_fds) {
        size_t done = 0;

        for (unsigned spins = 0; done < len; spins++) {
                union {
                        struct cmsghdr align;
                        char buf[CMSG_SPACE(sizeof(int) * WIRE_MAX_FDS)];
                } control;
                struct iovec iov = { .iov_base = buf + done, .iov_len = len - done };
                struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                                     .msg_controllen = sizeof(control.buf) };
                ssize_t k = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);

                if (k < 0) {
                        assert_int_equal(errno, EAGAIN);
                        assert_true(spins < 100000);
                        pump(f, 1);
                        continue;
                }
                if (k == 0) {
                        assert_int_equal(done, 0);
                        return false;
                }
                assert_false(mh.msg_flags & MSG_CTRUNC);
                for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
                        size_t n = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);

                        assert_int_equal(cm->cmsg_type, SCM_RIGHTS);
                        assert_int_equal(done, 0); /* with the frame's first byte */
                        assert_non_null(fds);
                        assert_true(*n_fds + n <= max_fds);
                        memcpy(fds + *n_fds, CMSG_DATA(cm), n * sizeof(int));
                        *n_fds += n;
                }
                done += (size_t) k;
        }
        return true;
}

/* The next frame, decoded, with the descriptors that came with it. */
static WireEnvelope *client_read(Fixture *f, int fd, int *fds, size_t *n_fds, size_t max_fds) {
        uint8_t h[WIRE_HEADER_SIZE];
        _cleanup_free_ uint8_t *payload = NULL;
        size_t n_dummy = 0;
        uint32_t n;
        WireEnvelope *env;

        if (!n_fds)
                n_fds = &n_dummy;
        *n_fds = 0;
        if (!client_read_exact(f, fd, h, sizeof(h), fds, n_fds, max_fds))
                return NULL;
        n = (uint32_t) h[0] | (uint32_t) h[1] << 8 | (uint32_t) h[2] << 16 | (uint32_t) h[3] << 24;
        payload = malloc(MAX(n, 1u));
        assert_non_null(payload);
        assert_true(client_read_exact(f, fd, payload, n, NULL, NULL, 0));
        env = wire_unpack(payload, n);
        assert_non_null(env);
        return env;
}

static bool client_nothing_to_read(Fixture *f, int fd) {
        uint8_t c;

        pump(f, 4);
        return recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) < 0 && errno == EAGAIN;
}

static bool client_sees_eof(Fixture *f, int fd) {
        uint8_t c;

        for (unsigned spins = 0; spins < 1000; spins++) {
                ssize_t k = recv(fd, &c, 1, MSG_DONTWAIT);

                if (k == 0)
                        return true;
                if (k > 0)
                        return false; /* something was sent */
                pump(f, 1);
        }
        return false;
}

/* A reply for id, with code. */
static WireEnvelope *expect_reply(Fixture *f, int fd, uint64_t id, int code, int *fds, size_t *n_fds, size_t max_fds) {
        WireEnvelope *env = client_read(f, fd, fds, n_fds, max_fds);

        assert_non_null(env);
        assert_int_equal(env->id, id);
        assert_int_equal(env->body_case, WEIGHTD__V1__ENVELOPE__BODY_REPLY);
        if ((int) env->reply->code != code)
                fail_msg("reply %" PRIu64 ": code %d (%s), expected %d", id, (int) env->reply->code, env->reply->message,
                         code);
        return env;
}

/* A descriptor as a client gets it: slab i of t, read-only and sealed, with
 * the slab's bytes. */
static void check_slab_fd(int fd, const TestEntry *t, size_t i) {
        const Slab *s = &t->slabs[i];
        struct stat a, b;
        uint8_t *map;

        assert_int_equal(fstat(fd, &a), 0);
        assert_int_equal(fstat(s->client_fd, &b), 0);
        assert_int_equal(a.st_ino, b.st_ino);
        assert_int_equal(a.st_dev, b.st_dev);
        assert_int_equal((uint64_t) a.st_size, s->capacity);
        assert_int_equal(fcntl(fd, F_GETFL) & O_ACCMODE, O_RDONLY);
        assert_int_equal(fcntl(fd, F_GETFD), FD_CLOEXEC);
        assert_true(fcntl(fd, F_GET_SEALS) & F_SEAL_WRITE);
        assert_true(mmap(NULL, s->capacity, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) == MAP_FAILED);
        map = mmap(NULL, s->capacity, PROT_READ, MAP_SHARED, fd, 0);
        assert_true(map != MAP_FAILED);
        assert_memory_equal(map, t->bytes[i], s->size);
        munmap(map, s->capacity);
}

/* The manifest of the test's component in a reply (files as the slabs or
 * as the files of one slab). */
static void check_manifest(Weightd__V1__Slab **files, size_t n_files, Weightd__V1__Tensor **tensors, size_t n_tensors,
                           bool one_slab) {
        size_t t = 0;

        assert_int_equal(n_files, MAX_FILES);
        for (size_t i = 0; i < MAX_FILES; i++) {
                const FileSpec *fs = &files_spec[i];
                char display[256];

                snprintf(display, sizeof(display), "/models/%s", fs->path);
                assert_string_equal(files[i]->file, display);
                assert_int_equal(files[i]->fd_index, one_slab ? 0 : i);
                assert_int_equal(files[i]->size, one_slab ? 0 : file_size(i));
                if (!one_slab)
                        assert_int_equal(files[i]->map_size, (file_size(i) + PAGE - 1) / PAGE * PAGE);
                assert_int_equal(files[i]->n_metadata, fs->meta_key ? 1 : 0);
                if (fs->meta_key) {
                        assert_string_equal(files[i]->metadata[0]->key, fs->meta_key);
                        assert_string_equal(files[i]->metadata[0]->value, fs->meta_value);
                }
                if (one_slab)
                        continue;
                for (size_t j = 0; j < fs->n_tensors; j++, t++) {
                        const TensorSpec *ts = &fs->tensors[j];

                        assert_string_equal(tensors[t]->name, ts->name);
                        assert_string_equal(tensors[t]->dtype, ts->dtype == DTYPE_F32 ? "F32" : "BF16");
                        assert_int_equal(tensors[t]->n_shape, ts->ndim);
                        for (unsigned k = 0; k < ts->ndim; k++)
                                assert_int_equal(tensors[t]->shape[k], ts->shape[k]);
                        assert_int_equal(tensors[t]->slab, i);
                        assert_int_equal(tensors[t]->offset, 8 + fs->header_len + ts->begin);
                        assert_int_equal(tensors[t]->nbytes, ts->end - ts->begin);
                }
        }
        if (!one_slab)
                assert_int_equal(n_tensors, 3);
}

/* ---- replies ------------------------------------------------------------ */

static void test_load_reply(void **state) {
        Fixture *f = *state;
        CacheEntry *e = &f->entry->e;
        Peer *p;
        int c = connect_peer(f, &p);
        int fds[4];
        size_t n_fds;
        Request *r = request_new(p, 42, REQUEST_LOAD, false);
        WireEnvelope *env;
        Weightd__V1__LoadReply *lr;
        PeerLease *l;

        r->comp = component_new_test();
        assert_int_equal(p->n_requests, 1);
        request_complete(r, &(RequestOutcome){ .entry = e, .was_resident = true });
        assert_int_equal(p->n_requests, 0);
        assert_int_equal(roots_unrefs, 1); /* the request was freed */

        /* A lease, held by the peer; the frame's own reference went with the
         * frame (the socket took it at once). */
        assert_int_equal(p->n_leases, 1);
        assert_int_equal(e->leases, 1);
        assert_int_equal(e->refs, 2);
        assert_null(p->out_head);

        env = expect_reply(f, c, 42, WEIGHTD__V1__CODE__OK, fds, &n_fds, ELEMENTSOF(fds));
        assert_int_equal(env->reply->result_case, WEIGHTD__V1__REPLY__RESULT_LOAD);
        lr = env->reply->load;
        assert_true(lr->lease > 0);
        l = peer_lease_find(p, lr->lease);
        assert_non_null(l);
        assert_ptr_equal(l->ref.obj, e);
        assert_string_equal(lr->model, "/models/m");
        assert_string_equal(lr->component, "");
        assert_string_equal(lr->target, "");
        assert_true(lr->was_resident);
        assert_int_equal(lr->bytes, file_size(0) + file_size(1));
        assert_int_equal(lr->n_files, 0);
        check_manifest(lr->slabs, lr->n_slabs, lr->tensors, lr->n_tensors, false);
        /* One descriptor per slab, in slab order. */
        assert_int_equal(n_fds, MAX_FILES);
        for (size_t i = 0; i < n_fds; i++) {
                check_slab_fd(fds[i], f->entry, i);
                close(fds[i]);
        }
        wire_envelope_free(env);
        /* Exactly one reply. */
        assert_true(client_nothing_to_read(f, c));

        /* Releasing the lease gives the reference back. */
        peer_lease_drop(p, l);
        assert_int_equal(e->leases, 0);
        assert_int_equal(e->refs, 1);
        close(c);
        pump(f, 4);
}

static void test_prefetch_reply(void **state) {
        Fixture *f = *state;
        CacheEntry *e = &f->entry->e;
        Peer *p;
        int c = connect_peer(f, &p);
        int fds[4];
        size_t n_fds;
        Request *r = request_new(p, 7, REQUEST_PREFETCH, false);
        WireEnvelope *env;

        r->comp = component_new_test();
        request_complete(r, &(RequestOutcome){ .entry = e, .was_resident = false });
        assert_int_equal(p->n_leases, 0);
        assert_int_equal(e->leases, 0);
        assert_int_equal(e->refs, 1);
        env = expect_reply(f, c, 7, WEIGHTD__V1__CODE__OK, fds, &n_fds, ELEMENTSOF(fds));
        assert_int_equal(n_fds, 0);
        assert_int_equal(env->reply->result_case, WEIGHTD__V1__REPLY__RESULT_LOAD);
        assert_int_equal(env->reply->load->lease, 0);
        assert_int_equal(env->reply->load->n_slabs, 0);
        assert_int_equal(env->reply->load->n_tensors, 0);
        assert_false(env->reply->load->was_resident);
        assert_int_equal(env->reply->load->bytes, file_size(0) + file_size(1));
        wire_envelope_free(env);
        assert_true(client_nothing_to_read(f, c));
        close(c);
        pump(f, 4);
}

/* A device slab: one descriptor (the entry's memory), the files listed for
 * their metadata, the tensors where the plan put them. */
static void test_device_reply(void **state) {
        Fixture *f = *state;
        CacheEntry *e = &f->entry->e;
        Peer *p;
        int c = connect_peer(f, &p);
        int fds[4];
        size_t n_fds;
        Request *r = request_new(p, 9, REQUEST_LOAD, false);
        WireEnvelope *env;
        Weightd__V1__LoadReply *lr;
        uint8_t *dev_bytes;
        int dev_rw;
        ShardTensor st[3];
        ShardPlan plan = { .align = 256, .bytes = 768 + 8, .n_tensors = 3, .tensors = st };
        struct stat a, b;

        r->comp = component_new_test();
        r->device = 0;
        snprintf(r->target, sizeof(r->target), "cuda:0");
        snprintf(r->device_uuid, sizeof(r->device_uuid), "GPU-0123");
        for (size_t i = 0, k = 0; i < MAX_FILES; i++)
                for (size_t j = 0; j < r->comp->files[i].header->n_tensors; j++, k++) {
                        const StTensor *src = &r->comp->files[i].header->tensors[j];

                        st[k] = (ShardTensor){ .source = src, .file = (unsigned) i, .offset = 256 * k,
                                               .nbytes = src->end - src->begin, .ndim = src->ndim,
                                               .shape = src->shape };
                }
        dev_rw = sealed_memfd(plan.bytes, 99, &dev_bytes, &f->entry->mem.fd);
        f->entry->mem.map_size = 2 * MiB;
        e->memory = &f->entry->mem;

        request_complete(r, &(RequestOutcome){ .entry = e, .plan = &plan, .was_resident = true });
        env = expect_reply(f, c, 9, WEIGHTD__V1__CODE__OK, fds, &n_fds, ELEMENTSOF(fds));
        lr = env->reply->load;
        assert_string_equal(lr->target, "cuda:0");
        assert_int_equal(lr->n_slabs, 1);
        assert_int_equal(lr->slabs[0]->fd_index, 0);
        assert_int_equal(lr->slabs[0]->size, plan.bytes);
        assert_int_equal(lr->slabs[0]->map_size, 2 * MiB);
        assert_string_equal(lr->slabs[0]->device_uuid, "GPU-0123");
        assert_string_equal(lr->slabs[0]->device, "cuda:0");
        assert_string_equal(lr->slabs[0]->file, "");
        check_manifest(lr->files, lr->n_files, lr->tensors, lr->n_tensors, true);
        assert_int_equal(lr->n_tensors, 3);
        for (size_t k = 0; k < 3; k++) {
                /* (st[k].source went with the request's component) */
                assert_string_equal(lr->tensors[k]->name, k < 2 ? files_spec[0].tensors[k].name : files_spec[1].tensors[0].name);
                assert_int_equal(lr->tensors[k]->slab, 0);
                assert_int_equal(lr->tensors[k]->offset, 256 * k);
                assert_int_equal(lr->tensors[k]->nbytes, st[k].nbytes);
                assert_int_equal(lr->tensors[k]->file, st[k].file);
        }
        assert_true(lr->lease > 0);
        assert_int_equal(n_fds, 1);
        assert_int_equal(fstat(fds[0], &a), 0);
        assert_int_equal(fstat(dev_rw, &b), 0);
        assert_int_equal(a.st_ino, b.st_ino);
        close(fds[0]);
        wire_envelope_free(env);
        assert_int_equal(e->leases, 1);
        peer_lease_drop(p, p->leases);
        assert_int_equal(e->refs, 1);
        close(dev_rw);
        free(dev_bytes);
        close(c);
        pump(f, 4);
}

static void test_error_replies(void **state) {
        Fixture *f = *state;
        CacheEntry *e = &f->entry->e;
        Peer *p;
        int c = connect_peer(f, &p);
        WdError err = WD_ERROR_NULL;
        WireEnvelope *env;
        size_t n_fds;
        int fds[2];
        Request *r;

        wd_error_set(&err, WD_E_NOT_FOUND, "/models/m: no such model");
        r = request_new(p, 1, REQUEST_LOAD, false);
        request_complete(r, &(RequestOutcome){ .r = WD_E_NOT_FOUND, .err = &err, .entry = e });
        r = request_new(p, 2, REQUEST_LOAD, false);
        request_complete(r, &(RequestOutcome){ .r = -ECANCELED });
        r = request_new(p, 3, REQUEST_PREFETCH, false);
        request_complete(r, &(RequestOutcome){ .r = WD_E_BUDGET, .err = &WD_ERROR_NULL });

        env = expect_reply(f, c, 1, WEIGHTD__V1__CODE__NOT_FOUND, fds, &n_fds, ELEMENTSOF(fds));
        assert_string_equal(env->reply->message, "/models/m: no such model");
        assert_int_equal(n_fds, 0);
        wire_envelope_free(env);
        env = expect_reply(f, c, 2, WEIGHTD__V1__CODE__CANCELLED, fds, &n_fds, ELEMENTSOF(fds));
        assert_string_equal(env->reply->message, strerror(ECANCELED));
        wire_envelope_free(env);
        env = expect_reply(f, c, 3, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, fds, &n_fds, ELEMENTSOF(fds));
        assert_string_equal(env->reply->message, wd_error_code_name(WD_E_BUDGET));
        wire_envelope_free(env);
        assert_true(client_nothing_to_read(f, c));
        assert_int_equal(p->n_leases, 0);
        assert_int_equal(e->refs, 1);
        close(c);
        pump(f, 4);
}

static void test_tensors_and_components(void **state) {
        Fixture *f = *state;
        Peer *p;
        int c = connect_peer(f, &p);
        WireEnvelope *env;
        size_t n_fds;
        int fds[2];
        Request *r;
        ComponentList *l = calloc(1, sizeof(ComponentList));

        r = request_new(p, 5, REQUEST_TENSORS, false);
        r->comp = component_new_test();
        request_complete(r, &(RequestOutcome){});
        env = expect_reply(f, c, 5, WEIGHTD__V1__CODE__OK, fds, &n_fds, ELEMENTSOF(fds));
        assert_int_equal(n_fds, 0);
        assert_int_equal(env->reply->result_case, WEIGHTD__V1__REPLY__RESULT_TENSORS);
        assert_string_equal(env->reply->tensors->model, "/models/m");
        /* Files are not slabs here: every fd_index 0, sizes as in the files. */
        for (size_t i = 0; i < env->reply->tensors->n_files; i++)
                assert_int_equal(env->reply->tensors->files[i]->fd_index, 0);
        assert_int_equal(env->reply->tensors->n_files, MAX_FILES);
        assert_int_equal(env->reply->tensors->n_tensors, 3);
        assert_string_equal(env->reply->tensors->tensors[2]->name, "b.weight");
        assert_int_equal(env->reply->tensors->tensors[2]->offset, 8 + 32);
        wire_envelope_free(env);

        assert_non_null(l);
        l->diffusers = true;
        l->n = 2;
        l->items = calloc(2, sizeof(ComponentInfo));
        l->items[0] = (ComponentInfo){ .name = strdup("unet"), .library = strdup("diffusers"),
                                       .class_name = strdup("UNet2DConditionModel"), .kind = COMPONENT_WEIGHTS };
        l->items[1] = (ComponentInfo){ .name = strdup("scheduler"), .kind = COMPONENT_NO_WEIGHTS };
        r = request_new(p, 6, REQUEST_COMPONENTS, false);
        r->list = l;
        r->key = strdup("/models/sd");
        request_complete(r, &(RequestOutcome){});
        env = expect_reply(f, c, 6, WEIGHTD__V1__CODE__OK, fds, &n_fds, ELEMENTSOF(fds));
        assert_int_equal(env->reply->result_case, WEIGHTD__V1__REPLY__RESULT_COMPONENTS);
        assert_string_equal(env->reply->components->model, "/models/sd");
        assert_true(env->reply->components->diffusers);
        assert_int_equal(env->reply->components->n_components, 2);
        assert_string_equal(env->reply->components->components[0]->name, "unet");
        assert_string_equal(env->reply->components->components[0]->kind, "weights");
        assert_string_equal(env->reply->components->components[0]->library, "diffusers");
        assert_string_equal(env->reply->components->components[0]->class_name, "UNet2DConditionModel");
        assert_string_equal(env->reply->components->components[1]->kind, "no-weights");
        assert_string_equal(env->reply->components->components[1]->library, "");
        wire_envelope_free(env);
        assert_true(client_nothing_to_read(f, c));
        close(c);
        pump(f, 4);
}

static void release_nothing(void *obj) {
}

static void test_lease_limit(void **state) {
        Fixture *f = *state;
        CacheEntry *e = &f->entry->e;
        Peer *p;
        int c = connect_peer(f, &p);
        WireEnvelope *env;
        size_t n_fds;
        int fds[4];
        Request *r;

        for (unsigned i = 0; i < PEER_MAX_LEASES; i++)
                assert_true(peer_lease_add(p, (PeerRef){ .obj = NULL, .release = release_nothing }) > 0);
        r = request_new(p, 11, REQUEST_LOAD, false);
        r->comp = component_new_test();
        request_complete(r, &(RequestOutcome){ .entry = e, .was_resident = true });
        env = expect_reply(f, c, 11, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, fds, &n_fds, ELEMENTSOF(fds));
        assert_string_equal(env->reply->message, "this connection holds 4096 leases, the limit");
        assert_int_equal(n_fds, 0);
        wire_envelope_free(env);
        assert_int_equal(e->leases, 0);
        assert_int_equal(e->refs, 1);
        assert_int_equal(p->n_leases, PEER_MAX_LEASES);
        close(c);
        pump(f, 4);
}

static void test_progress(void **state) {
        Fixture *f = *state;
        Peer *p;
        int c = connect_peer(f, &p);
        WireEnvelope *env;
        Request *r = request_new(p, 21, REQUEST_LOAD, true);
        Request *quiet = request_new(p, 22, REQUEST_PREFETCH, false);

        r->comp = component_new_test();
        quiet->comp = component_new_test();
        request_wait(r, &f->job);
        request_wait(quiet, &f->job);
        assert_int_equal(f->job.n_waiters, 2);
        fake_job_progress(&f->job, 10, 100, 0);
        fake_job_progress(&f->job, 10, 100, 0); /* the same again: not sent */
        fake_job_progress(&f->job, 60, 100, 5);

        env = client_read(f, c, NULL, NULL, 0);
        assert_int_equal(env->id, 21);
        assert_int_equal(env->body_case, WEIGHTD__V1__ENVELOPE__BODY_PROGRESS);
        assert_int_equal(env->progress->done_bytes, 10);
        assert_int_equal(env->progress->total_bytes, 100);
        assert_int_equal(env->progress->copied_bytes, 0);
        assert_string_equal(env->progress->model, "/models/m");
        wire_envelope_free(env);
        env = client_read(f, c, NULL, NULL, 0);
        assert_int_equal(env->id, 21);
        assert_int_equal(env->progress->done_bytes, 60);
        assert_int_equal(env->progress->copied_bytes, 5);
        wire_envelope_free(env);
        assert_true(client_nothing_to_read(f, c));

        f->in_job_finish = true;
        fake_job_finish(&f->job, &(JobOutcome){ .entry = &f->entry->e });
        f->in_job_finish = false;
        assert_int_equal(f->job.n_waiters, 0);
        {
                int fds[4];
                size_t n_fds;

                env = expect_reply(f, c, 21, WEIGHTD__V1__CODE__OK, fds, &n_fds, ELEMENTSOF(fds));
                assert_int_equal(n_fds, MAX_FILES);
                for (size_t i = 0; i < n_fds; i++)
                        close(fds[i]);
                wire_envelope_free(env);
                env = expect_reply(f, c, 22, WEIGHTD__V1__CODE__OK, fds, &n_fds, ELEMENTSOF(fds));
                assert_int_equal(n_fds, 0);
                wire_envelope_free(env);
        }
        assert_int_equal(p->n_leases, 1);
        close(c);
        pump(f, 4);
        /* The peer went: its lease too. */
        assert_int_equal(f->entry->e.leases, 0);
}

/* A client hangs up while its requests wait on a job, and the loop has not
 * seen it yet: the next progress event's send fails.  Its peer must not be
 * closed right there, inside the job's walk over its waiters (that frees
 * this peer's other requests, the next waiters: found by fuzz-peer as a
 * heap-use-after-free in job_progress()), but from the ready list after. */
static void test_progress_to_a_client_that_hung_up(void **state) {
        Fixture *f = *state;
        Peer *p, *q;
        int c = connect_peer(f, &p);
        int d = connect_peer(f, &q);
        Request *a = request_new(p, 31, REQUEST_LOAD, true);
        Request *b = request_new(p, 32, REQUEST_PREFETCH, true);
        Request *other = request_new(q, 33, REQUEST_LOAD, true);
        WireEnvelope *env;

        a->comp = component_new_test();
        b->comp = component_new_test();
        other->comp = component_new_test();
        request_wait(a, &f->job);
        request_wait(b, &f->job);
        request_wait(other, &f->job);
        close(c); /* the loop does not know yet */
        fake_job_progress(&f->job, 10, 100, 0);
        assert_int_equal(f->closing_calls, 0);
        assert_true(p->close_pending);
        assert_int_equal(f->job.n_waiters, 3);
        /* The other peer heard it. */
        env = client_read(f, d, NULL, NULL, 0);
        assert_int_equal(env->id, 33);
        assert_int_equal(env->body_case, WEIGHTD__V1__ENVELOPE__BODY_PROGRESS);
        wire_envelope_free(env);
        /* From the ready list: the peer goes with its requests. */
        pump(f, 4);
        assert_int_equal(f->closing_calls, 1);
        assert_int_equal(f->job.n_waiters, 1);
        f->in_job_finish = true;
        fake_job_finish(&f->job, &(JobOutcome){ .entry = &f->entry->e });
        f->in_job_finish = false;
        {
                int fds[4];
                size_t n_fds;

                env = expect_reply(f, d, 33, WEIGHTD__V1__CODE__OK, fds, &n_fds, ELEMENTSOF(fds));
                for (size_t i = 0; i < n_fds; i++)
                        close(fds[i]);
                wire_envelope_free(env);
        }
        close(d);
        pump(f, 4);
        assert_int_equal(f->entry->e.leases, 0);
}

/* ---- never re-entrant: the review's finding 1 ---------------------------- */

typedef struct FinishTimer {
        Fixture *f;
        size_t seen_before, seen_after;
} FinishTimer;

static void on_finish_timer(uv_timer_t *t) {
        FinishTimer *ft = t->data;
        Fixture *f = ft->f;

        ft->seen_before = f->n_seen;
        f->in_job_finish = true;
        fake_job_finish(&f->job, &(JobOutcome){ .entry = &f->entry->e });
        f->in_job_finish = false;
        ft->seen_after = f->n_seen;
}

/* Two Prefetches fill max_pending; an Evict of their entry waits in the
 * buffer.  The job answers both from the entry: the first answer resumes
 * the peer, which must not decode the Evict there (it would free the entry
 * the second answer is built from, a use after free ASan reports through
 * the doubles).  The Evict is decoded in the check phase after the job
 * answered everyone, and then frees the entry. */
static void test_no_input_under_completion(void **state) {
        Fixture *f = *state;
        Peer *p;
        int c = connect_peer(f, &p);
        uv_timer_t timer;
        FinishTimer ft = { .f = f };
        WireEnvelope *env;

        client_send(f, c, (const uint64_t[]){ 1, 2, 3 },
                    (const int[]){ WEIGHTD__V1__ENVELOPE__BODY_PREFETCH, WEIGHTD__V1__ENVELOPE__BODY_PREFETCH,
                                   WEIGHTD__V1__ENVELOPE__BODY_EVICT },
                    3);
        pump(f, 4);
        assert_int_equal(f->n_seen, 2);
        assert_int_equal(f->job.n_waiters, 2);
        assert_true(wire_reader_partial(&p->in));

        assert_int_equal(uv_timer_init(&f->loop, &timer), 0);
        timer.data = &ft;
        uv_timer_start(&timer, on_finish_timer, 0, 0);
        uv_run(&f->loop, UV_RUN_NOWAIT);
        f->phase = PHASE_TEST;
        assert_int_equal(ft.seen_before, 2);
        assert_int_equal(ft.seen_after, 2); /* nothing decoded while the job answered */
        assert_int_equal(f->n_seen, 3);
        assert_int_equal(f->seen[2].id, 3);
        assert_int_equal(f->seen[2].body_case, WEIGHTD__V1__ENVELOPE__BODY_EVICT);
        assert_false(f->seen[2].in_job_finish);
        assert_int_equal(f->seen[2].phase, PHASE_CHECK);
        assert_true(f->entry_evicted);
        assert_int_equal(entries_freed, 1);

        for (uint64_t id = 1; id <= 3; id++) {
                env = expect_reply(f, c, id, WEIGHTD__V1__CODE__OK, NULL, NULL, 0);
                wire_envelope_free(env);
        }
        assert_true(client_nothing_to_read(f, c));
        uv_close((uv_handle_t *) &timer, NULL);
        close(c);
        pump(f, 4);
}

/* The same with Loads: each answer takes a lease, so the Evict is refused
 * BUSY, after the answers, and the leases keep the entry. */
static void test_no_input_under_completion_loads(void **state) {
        Fixture *f = *state;
        Peer *p;
        int c = connect_peer(f, &p);
        WireEnvelope *env;
        int fds[4];
        size_t n_fds;

        client_send(f, c, (const uint64_t[]){ 1, 2, 3 },
                    (const int[]){ WEIGHTD__V1__ENVELOPE__BODY_LOAD, WEIGHTD__V1__ENVELOPE__BODY_LOAD,
                                   WEIGHTD__V1__ENVELOPE__BODY_EVICT },
                    3);
        pump(f, 4);
        assert_int_equal(f->n_seen, 2);
        /* From the test's own code this time (no loop callback at all). */
        f->in_job_finish = true;
        fake_job_finish(&f->job, &(JobOutcome){ .entry = &f->entry->e });
        f->in_job_finish = false;
        assert_int_equal(f->n_seen, 2);
        assert_true(p->on_ready);
        assert_int_equal(p->n_leases, 2);
        assert_int_equal(f->entry->e.leases, 2);
        pump(f, 1);
        assert_int_equal(f->n_seen, 3);
        assert_int_equal(f->seen[2].phase, PHASE_CHECK);
        assert_false(f->entry_evicted);

        for (uint64_t id = 1; id <= 2; id++) {
                env = expect_reply(f, c, id, WEIGHTD__V1__CODE__OK, fds, &n_fds, ELEMENTSOF(fds));
                assert_int_equal(n_fds, MAX_FILES);
                for (size_t i = 0; i < n_fds; i++) {
                        check_slab_fd(fds[i], f->entry, i);
                        close(fds[i]);
                }
                wire_envelope_free(env);
        }
        env = expect_reply(f, c, 3, WEIGHTD__V1__CODE__BUSY, NULL, NULL, 0);
        wire_envelope_free(env);
        close(c);
        pump(f, 4);
        assert_int_equal(f->entry->e.leases, 0);
        assert_int_equal(f->entry->e.refs, 1);
}

/* Requests answered inside their own frame callback, five pipelined with
 * max_pending 2: each is answered once, in order, and the callback is
 * never entered twice (it asserts). */
static void test_complete_inside_frame_callback(void **state) {
        Fixture *f = *state;
        Peer *p;
        int c = connect_peer(f, &p);
        uint64_t ids[5] = { 10, 11, 12, 13, 14 };
        int bodies[5];

        for (size_t i = 0; i < 5; i++)
                bodies[i] = WEIGHTD__V1__ENVELOPE__BODY_TENSORS;
        client_send(f, c, ids, bodies, 5);
        pump(f, 4);
        assert_int_equal(f->n_seen, 5);
        for (size_t i = 0; i < 5; i++) {
                WireEnvelope *env = expect_reply(f, c, ids[i], WEIGHTD__V1__CODE__OK, NULL, NULL, 0);

                assert_int_equal(env->reply->result_case, WEIGHTD__V1__REPLY__RESULT_TENSORS);
                wire_envelope_free(env);
        }
        assert_true(client_nothing_to_read(f, c));
        assert_int_equal(p->n_requests, 0);
        close(c);
        pump(f, 4);
}

/* ---- references, drops, closed peers ------------------------------------ */

/* A Load's reply waits behind a frame the client has not read; the entry is
 * evicted and the lease released meanwhile: the queued frame's reference
 * keeps the entry (and the descriptors it borrows) until it went out. */
static void test_reply_keeps_entry_until_sent(void **state) {
        Fixture *f = *state;
        Peer *p;
        int c = connect_peer(f, &p);
        Request *r;
        WireEnvelope *env;
        int fds[4];
        size_t n_fds;
        uint8_t *big = calloc(1, 4 * MiB);

        /* A frame the client skips: 4 MiB of a length prefix and zeros. */
        assert_non_null(big);
        big[0] = 0xfc;
        big[1] = 0xff;
        big[2] = 0x3f; /* 4 MiB - 4 */
        assert_int_equal(peer_queue(p, big, 4 * MiB, NULL, 0, NULL, 0), 0);
        assert_non_null(p->out_head);

        r = request_new(p, 31, REQUEST_LOAD, false);
        r->comp = component_new_test();
        request_complete(r, &(RequestOutcome){ .entry = &f->entry->e, .was_resident = true });
        assert_int_equal(f->entry->e.refs, 3); /* the cache's, the lease, the queued frame's */
        peer_lease_drop(p, p->leases);
        f->entry_evicted = true;
        test_entry_evict(f->entry);
        assert_int_equal(entries_freed, 0);
        assert_int_equal(f->entry->e.refs, 1);

        {
                uint8_t h[4], *skip = malloc(4 * MiB);

                assert_true(client_read_exact(f, c, h, 4, NULL, NULL, 0));
                assert_true(client_read_exact(f, c, skip, 4 * MiB - 4, NULL, NULL, 0));
                free(skip);
        }
        env = expect_reply(f, c, 31, WEIGHTD__V1__CODE__OK, fds, &n_fds, ELEMENTSOF(fds));
        pump(f, 2);
        assert_int_equal(entries_freed, 1);
        /* The client's descriptors outlive the entry. */
        assert_int_equal(n_fds, MAX_FILES);
        for (size_t i = 0; i < n_fds; i++) {
                uint8_t b[8];

                assert_int_equal(pread(fds[i], b, sizeof(b), 8), (ssize_t) sizeof(b));
                close(fds[i]);
        }
        wire_envelope_free(env);
        close(c);
        pump(f, 4);
}

static void test_drop_and_cancel(void **state) {
        Fixture *f = *state;
        Peer *p;
        int c = connect_peer(f, &p);
        Request *resolving = request_new(p, 1, REQUEST_LOAD, false);
        Request *waiting = request_new(p, 2, REQUEST_LOAD, false);

        waiting->comp = component_new_test();
        request_wait(waiting, &f->job);
        assert_ptr_equal(request_find(p, 1), resolving);
        assert_ptr_equal(request_find(p, 2), waiting);

        /* A resolving request is only orphaned: off the peer, freed when the
         * resolve ends (the driver's resolve_done() frees it). */
        resolving->resolving = true;
        request_drop(resolving);
        assert_null(resolving->peer);
        assert_int_equal(p->n_requests, 1);
        assert_null(request_find(p, 1));
        assert_int_equal(roots_unrefs, 0);
        resolving->resolving = false;
        request_free(resolving);
        assert_int_equal(roots_unrefs, 1);

        /* A waiting one leaves its job (a job nobody waits for is cancelled). */
        request_drop(waiting);
        assert_int_equal(f->job.n_waiters, 0);
        assert_null(f->job.waiters);
        assert_int_equal(p->n_requests, 0);
        fake_job_finish(&f->job, &(JobOutcome){ .entry = &f->entry->e });
        assert_true(client_nothing_to_read(f, c));
        assert_int_equal(f->entry->e.refs, 1);
        close(c);
        pump(f, 4);
}

static void test_closed_peer(void **state) {
        Fixture *f = *state;
        Peer *p, *q;
        int c = connect_peer(f, &p);
        int d = connect_peer(f, &q);
        Request *resolving = request_new(p, 1, REQUEST_LOAD, false);
        Request *waiting = request_new(p, 2, REQUEST_PREFETCH, false);
        Request *other = request_new(q, 3, REQUEST_LOAD, false);

        waiting->comp = component_new_test();
        other->comp = component_new_test();
        resolving->resolving = true;
        request_wait(waiting, &f->job);
        request_wait(other, &f->job);

        /* The client hangs up: the peer, at max_pending and not reading,
         * still hears it and goes at once; it drops its requests, nothing
         * answers them. */
        close(c);
        pump(f, 4);
        assert_int_equal(f->closing_calls, 1);
        assert_null(resolving->peer);
        assert_int_equal(f->job.n_waiters, 1);
        resolving->resolving = false;
        request_free(resolving);
        f->in_job_finish = true;
        fake_job_finish(&f->job, &(JobOutcome){ .entry = &f->entry->e });
        f->in_job_finish = false;
        /* Only the other peer's request was answered. */
        {
                int fds[4];
                size_t n_fds;
                WireEnvelope *env = expect_reply(f, d, 3, WEIGHTD__V1__CODE__OK, fds, &n_fds, ELEMENTSOF(fds));

                for (size_t i = 0; i < n_fds; i++)
                        close(fds[i]);
                wire_envelope_free(env);
        }
        assert_int_equal(f->entry->e.leases, 1);

        /* A request completed while its peer is closing (here: from the
         * closing callback) is not answered and takes no lease. */
        f->complete_on_close = true;
        {
                Request *late = request_new(q, 4, REQUEST_LOAD, false);

                late->comp = component_new_test();
                request_wait(late, &f->job);
        }
        peer_close(q);
        assert_int_equal(f->closing_calls, 2);
        assert_int_equal(f->job.n_waiters, 0);
        assert_int_equal(f->entry->e.leases, 0);
        assert_int_equal(f->entry->e.refs, 1);
        assert_true(client_sees_eof(f, d));
        close(d);
        pump(f, 4);
}

int main(void) {
        uv_loop_t loop;
        /* libuv opens a process-wide pipe with the first loop: before the
         * first test counts descriptors. */
        assert_int_equal(uv_loop_init(&loop), 0);
        assert_int_equal(uv_loop_close(&loop), 0);

        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_load_reply, setup, teardown),
                cmocka_unit_test_setup_teardown(test_prefetch_reply, setup, teardown),
                cmocka_unit_test_setup_teardown(test_device_reply, setup, teardown),
                cmocka_unit_test_setup_teardown(test_error_replies, setup, teardown),
                cmocka_unit_test_setup_teardown(test_tensors_and_components, setup, teardown),
                cmocka_unit_test_setup_teardown(test_lease_limit, setup, teardown),
                cmocka_unit_test_setup_teardown(test_progress, setup, teardown),
                cmocka_unit_test_setup_teardown(test_progress_to_a_client_that_hung_up, setup, teardown),
                cmocka_unit_test_setup_teardown(test_no_input_under_completion, setup, teardown),
                cmocka_unit_test_setup_teardown(test_no_input_under_completion_loads, setup, teardown),
                cmocka_unit_test_setup_teardown(test_complete_inside_frame_callback, setup, teardown),
                cmocka_unit_test_setup_teardown(test_reply_keeps_entry_until_sent, setup, teardown),
                cmocka_unit_test_setup_teardown(test_drop_and_cancel, setup, teardown),
                cmocka_unit_test_setup_teardown(test_closed_peer, setup, teardown),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
