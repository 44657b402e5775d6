/* The peer (daemon/server/peer.c) on a real libuv loop over real socketpairs,
 * linked from peer.c, util/ and the wire code only: no store/, no request
 * layer.  The test plays the layer above through PeerOps (a frame may keep a
 * "request" linked to the peer until the test completes it) and plays the
 * client on the other end of each socketpair: frames are packed with
 * protobuf-c, written in one piece or cut anywhere, and what comes back is
 * read frame by frame with recvmsg() so the descriptors of each frame are
 * seen to arrive with that frame's first byte, then decoded with
 * wire_unpack() and compared with what the test queued.
 *
 * Checked: framing (pipelined, cut), the request size limit, the Hello and
 * frame deadlines, the per-uid input charge, connection limits, the output
 * queue (descriptors, the references that keep them, partial sends), the
 * output limits (the uid's connection that reads least is the one closed),
 * max_pending with peer_resume() that only ever schedules (the frame after
 * it is decoded in the loop's check phase, never inside peer_resume()),
 * leases as an owner list, and that every test ends with the descriptors it
 * began with and a loop with no handle left. */

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
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
#include "server/peer.h"
#include "util/log.h"
#include "util/time-util.h"
#include "test-util.h"
#include "wire.h"

#define MiB ((size_t) 1 << 20)
#define USEC_PER_SEC UINT64_C(1000000)

/* ---- the fixture -------------------------------------------------------- */

/* What the layer above would keep per request. */
typedef struct TestReq {
        PeerLink link;
        uint64_t id;
} TestReq;

typedef enum Phase {
        PHASE_OTHER,   /* timers, prepare, I/O (a peer's poll callback) */
        PHASE_CHECK,   /* the loop's check phase */
        PHASE_TEST,    /* the test's own code, outside uv_run() */
} Phase;

typedef struct Seen {
        Peer *peer;
        uint64_t id;
        int body_case;
        Phase phase;
        uint64_t iteration;
} Seen;

typedef struct Fixture Fixture;
struct Fixture {
        int fds_before;
        uv_loop_t loop;
        PeerContext ctx;
        PeerLimits limits;
        uv_prepare_t prepare;
        uv_check_t check;
        Phase phase;
        uint64_t iteration;
        bool in_resume;  /* inside peer_resume(), called by the test */
        unsigned depth;  /* frame callbacks on the stack */
        bool hold;       /* each frame keeps a request linked to its peer */
        Seen seen[512];
        size_t n_seen;
        unsigned closing_calls;
        unsigned leases_at_closing;
        unsigned changed_calls;
        /* Called from the frame callback after it recorded the frame. */
        void (*hook)(Fixture *f, Peer *p, const WireEnvelope *env);
        Peer *other;
};

static int frame_cb(Peer *p, WireEnvelope *env, void *userdata) {
        Fixture *f = userdata;

        /* Input is never processed re-entrantly. */
        assert_int_equal(f->depth, 0);
        assert_false(f->in_resume);
        f->depth++;
        assert_true(f->n_seen < ELEMENTSOF(f->seen));
        f->seen[f->n_seen++] = (Seen){ .peer = p, .id = env->id, .body_case = env->body_case, .phase = f->phase,
                                       .iteration = f->iteration };
        if (env->body_case == WEIGHTD__V1__ENVELOPE__BODY_HELLO)
                p->hello = true;
        if (f->hold) {
                TestReq *r = calloc(1, sizeof(TestReq));

                assert_non_null(r);
                r->id = env->id;
                peer_link(p, &r->link);
        }
        if (f->hook)
                f->hook(f, p, env);
        f->depth--;
        return 0;
}

static void closing_cb(Peer *p, void *userdata) {
        Fixture *f = userdata;

        f->closing_calls++;
        f->leases_at_closing += p->n_leases; /* still held: requests go first */
        while (p->requests) {
                TestReq *r = container_of(p->requests, TestReq, link);

                peer_unlink(p, &r->link);
                free(r);
        }
}

static void changed_cb(void *userdata) {
        Fixture *f = userdata;

        f->changed_calls++;
}

static const PeerOps test_ops = {
        .frame = frame_cb,
        .closing = closing_cb,
        .changed = changed_cb,
};

static void on_prepare(uv_prepare_t *h) {
        Fixture *f = h->data;

        f->iteration++;
        f->phase = PHASE_OTHER;
}

/* Started after the context's check, so it runs before it (libuv runs the
 * check handles last started first). */
static void on_check(uv_check_t *h) {
        Fixture *f = h->data;

        f->phase = PHASE_CHECK;
}

static const PeerLimits default_limits = {
        .max_connections = 64,
        .max_connections_per_uid = 32,
        .max_pending = 64,
        .max_request_size = 64u << 10,
        .hello_timeout_usec = 100 * USEC_PER_SEC,
        .frame_timeout_usec = 10 * USEC_PER_SEC,
};

static int setup(void **state) {
        Fixture *f = calloc(1, sizeof(Fixture));

        assert_non_null(f);
        log_set_max_level(LOG_LEVEL_ERROR);
        f->fds_before = count_fds();
        assert_int_equal(uv_loop_init(&f->loop), 0);
        f->limits = default_limits;
        assert_int_equal(peer_context_init(&f->ctx, &f->loop, &f->limits, &test_ops, f), 0);
        assert_int_equal(uv_prepare_init(&f->loop, &f->prepare), 0);
        assert_int_equal(uv_check_init(&f->loop, &f->check), 0);
        f->prepare.data = f->check.data = f;
        uv_prepare_start(&f->prepare, on_prepare);
        uv_check_start(&f->check, on_check);
        f->phase = PHASE_TEST;
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
        assert_null(f->ctx.users);
        assert_int_equal(f->ctx.n_peers, 0);
        assert_int_equal(f->ctx.n_leases, 0);
        assert_int_equal(count_fds(), f->fds_before);
        free(f);
        return 0;
}

static void set_limits(Fixture *f, const PeerLimits *l) {
        f->limits = *l;
        peer_context_set_limits(&f->ctx, &f->limits);
}

/* A few turns of the loop without blocking, then back to the test. */
static void pump(Fixture *f, unsigned turns) {
        for (unsigned i = 0; i < turns; i++)
                uv_run(&f->loop, UV_RUN_NOWAIT);
        f->phase = PHASE_TEST;
}

/* A peer for uid on one end of a socketpair; returns the client's end
 * (non-blocking too). */
static int connect_peer(Fixture *f, uid_t uid, Peer **ret) {
        int sv[2];
        struct ucred cred = { .pid = 4242, .uid = uid, .gid = uid };

        assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
        assert_int_equal(peer_new(&f->ctx, sv[0], &cred, ret), 0);
        return sv[1];
}

/* ---- the client's side -------------------------------------------------- */

/* A request frame (length prefix included) for id: Hello or Status. */
static uint8_t *pack_request(uint64_t id, int body_case, const char *client, size_t *ret_len) {
        Weightd__V1__Envelope env = WEIGHTD__V1__ENVELOPE__INIT;
        Weightd__V1__HelloRequest hello = WEIGHTD__V1__HELLO_REQUEST__INIT;
        Weightd__V1__StatusRequest status = WEIGHTD__V1__STATUS_REQUEST__INIT;
        uint8_t *buf;

        env.id = id;
        env.body_case = body_case;
        if (body_case == WEIGHTD__V1__ENVELOPE__BODY_HELLO) {
                hello.min_version = hello.max_version = WIRE_VERSION;
                hello.client = (char *) (client ? client : "test-peer");
                env.hello = &hello;
        } else {
                assert_int_equal(body_case, WEIGHTD__V1__ENVELOPE__BODY_STATUS);
                env.status = &status;
        }
        assert_int_equal(wire_pack(&env, SIZE_MAX, &buf, ret_len), 0);
        return buf;
}

/* Append n request frames with ids first.. to a buffer (Hello first when
 * hello). */
static uint8_t *pack_pipeline(uint64_t first, size_t n, bool hello, size_t *ret_len, size_t *ends) {
        uint8_t *all = NULL;
        size_t len = 0;

        for (size_t i = 0; i < n; i++) {
                size_t k;
                _cleanup_free_ uint8_t *b = pack_request(
                        first + i, hello && i == 0 ? WEIGHTD__V1__ENVELOPE__BODY_HELLO : WEIGHTD__V1__ENVELOPE__BODY_STATUS,
                        NULL, &k);

                all = realloc(all, len + k);
                assert_non_null(all);
                memcpy(all + len, b, k);
                len += k;
                if (ends)
                        ends[i] = len;
        }
        *ret_len = len;
        return all;
}

/* Write everything, turning the loop while the socket is full. */
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

/* Exactly len bytes; the descriptors that came with them into fds (when
 * not NULL, else none may come).  Turns the loop while nothing is there.
 * Returns false at end of stream before the first byte. */
static bool client_read_exact(Fixture *f, int fd, uint8_t *buf, size_t len, int *fds, size_t *n_fds, size_t max_fds) {
        size_t done = 0;

        if (n_fds)
                *n_fds = 0;
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
                        assert_int_equal(done, 0); /* never cut in the middle of a frame */
                        return false;
                }
                assert_false(mh.msg_flags & MSG_CTRUNC);
                for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
                        size_t n = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);

                        assert_int_equal(cm->cmsg_type, SCM_RIGHTS);
                        /* Descriptors ride on the first byte of their frame. */
                        assert_int_equal(done, 0);
                        assert_non_null(fds);
                        assert_true(*n_fds + n <= max_fds);
                        memcpy(fds + *n_fds, CMSG_DATA(cm), n * sizeof(int));
                        *n_fds += n;
                }
                done += (size_t) k;
        }
        return true;
}

/* One whole frame: its payload (malloc'd) and the descriptors that came with
 * it.  NULL at end of stream. */
static uint8_t *client_read_frame(Fixture *f, int fd, size_t *ret_len, int *fds, size_t *n_fds, size_t max_fds) {
        uint8_t h[WIRE_HEADER_SIZE];
        uint8_t *payload;
        uint32_t n;

        if (!client_read_exact(f, fd, h, sizeof(h), fds, n_fds, max_fds))
                return NULL;
        n = (uint32_t) h[0] | (uint32_t) h[1] << 8 | (uint32_t) h[2] << 16 | (uint32_t) h[3] << 24;
        payload = malloc(MAX(n, 1u));
        assert_non_null(payload);
        assert_true(client_read_exact(f, fd, payload, n, NULL, NULL, 0));
        *ret_len = n;
        return payload;
}

/* Whether the peer closed the connection: everything left is read (and
 * dropped) and then the stream ends. */
static bool client_sees_eof(Fixture *f, int fd) {
        uint8_t buf[65536];

        for (unsigned spins = 0; spins < 1000; spins++) {
                ssize_t k = read(fd, buf, sizeof(buf));

                if (k == 0)
                        return true;
                if (k < 0 && errno != EAGAIN && errno != ECONNRESET)
                        fail();
                if (k < 0)
                        pump(f, 1);
        }
        return false;
}

static bool client_nothing_to_read(Fixture *f, int fd) {
        uint8_t c;

        pump(f, 4);
        return recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) < 0 && errno == EAGAIN;
}

static void complete_one(Fixture *f, Peer *p);

/* ---- framing ------------------------------------------------------------ */

static void test_pipelined_frames(void **state) {
        Fixture *f = *state;
        Peer *p;
        int c = connect_peer(f, 1000, &p);
        size_t len;
        _cleanup_free_ uint8_t *all = pack_pipeline(100, 20, true, &len, NULL);

        client_write(f, c, all, len);
        pump(f, 4);
        assert_int_equal(f->n_seen, 20);
        for (size_t i = 0; i < 20; i++) {
                assert_ptr_equal(f->seen[i].peer, p);
                assert_int_equal(f->seen[i].id, 100 + i);
                assert_int_equal(f->seen[i].body_case,
                                 i == 0 ? WEIGHTD__V1__ENVELOPE__BODY_HELLO : WEIGHTD__V1__ENVELOPE__BODY_STATUS);
                /* From the peer's own poll callback, not the ready list. */
                assert_int_equal(f->seen[i].phase, PHASE_OTHER);
        }
        assert_true(p->hello);
        assert_int_equal(p->frame_started_usec, 0);
        close(c);
        pump(f, 4);
        assert_int_equal(f->closing_calls, 1);
        assert_int_equal(f->ctx.n_peers, 0);
}

static void test_frames_cut_across_writes(void **state) {
        Fixture *f = *state;
        static const size_t cuts[] = { 1, 2, 3, 5, 7, 11, 13 };
        Peer *p;
        int c = connect_peer(f, 1000, &p);
        size_t ends[8], len, off = 0;
        _cleanup_free_ uint8_t *all = pack_pipeline(1, 8, true, &len, ends);

        for (size_t i = 0; off < len; i++) {
                size_t n = MIN(cuts[i % ELEMENTSOF(cuts)], len - off), complete = 0;

                client_write(f, c, all + off, n);
                off += n;
                pump(f, 2);
                /* Exactly the frames whose last byte was written. */
                while (complete < 8 && ends[complete] <= off)
                        complete++;
                assert_int_equal(f->n_seen, complete);
                /* A frame in progress is timed; none between frames. */
                if (complete < 8 && off > (complete ? ends[complete - 1] : 0))
                        assert_true(p->frame_started_usec > 0);
                else
                        assert_int_equal(p->frame_started_usec, 0);
        }
        for (size_t i = 0; i < 8; i++)
                assert_int_equal(f->seen[i].id, 1 + i);
        close(c);
        pump(f, 4);
}

static void test_frame_over_limit(void **state) {
        Fixture *f = *state;
        PeerLimits l = default_limits;
        Peer *p, *q;
        int c, d;
        size_t len;
        _cleanup_free_ uint8_t *buf = NULL;
        Weightd__V1__Envelope env = WEIGHTD__V1__ENVELOPE__INIT;
        Weightd__V1__HelloRequest hello = WEIGHTD__V1__HELLO_REQUEST__INIT;
        _cleanup_free_ char *name = calloc(1, 2048);

        l.max_request_size = 1024;
        set_limits(f, &l);

        /* A Hello padded to exactly the limit passes. */
        c = connect_peer(f, 1000, &p);
        env.id = 1;
        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_HELLO;
        env.hello = &hello;
        hello.client = name;
        for (size_t n = 0; n < 2000; n++) {
                name[n] = 'x';
                if (weightd__v1__envelope__get_packed_size(&env) == 1024)
                        break;
        }
        assert_int_equal(weightd__v1__envelope__get_packed_size(&env), 1024);
        assert_int_equal(wire_pack(&env, SIZE_MAX, &buf, &len), 0);
        client_write(f, c, buf, len);
        pump(f, 4);
        assert_int_equal(f->n_seen, 1);
        assert_int_equal(f->closing_calls, 0);

        /* One byte more, announced in the header only: disconnected before
         * the body comes, the sibling carries on. */
        d = connect_peer(f, 1000, &q);
        {
                uint8_t h[4] = { 0x01, 0x04, 0, 0 }; /* 1025 */

                client_write(f, d, h, sizeof(h));
        }
        pump(f, 4);
        assert_int_equal(f->closing_calls, 1);
        assert_true(client_sees_eof(f, d));
        assert_int_equal(f->ctx.n_peers, 1);
        assert_ptr_equal(f->ctx.peers, p);

        /* The same when it comes after whole frames in one write. */
        {
                uint8_t h[4] = { 0x00, 0x00, 0x10, 0 };
                _cleanup_free_ uint8_t *two = malloc(len + 4);

                memcpy(two, buf, len);
                memcpy(two + len, h, 4);
                client_write(f, c, two, len + 4);
        }
        pump(f, 4);
        assert_int_equal(f->n_seen, 2);
        assert_int_equal(f->closing_calls, 2);
        assert_true(client_sees_eof(f, c));
        close(c);
        close(d);
}

/* ---- deadlines ---------------------------------------------------------- */

static void test_deadlines(void **state) {
        Fixture *f = *state;
        Peer *silent, *partial, *idle, *paused;
        int cs, cp, ci, cpa;
        size_t len, hlen;
        _cleanup_free_ uint8_t *hello = pack_request(1, WEIGHTD__V1__ENVELOPE__BODY_HELLO, NULL, &hlen);
        _cleanup_free_ uint8_t *status = pack_request(2, WEIGHTD__V1__ENVELOPE__BODY_STATUS, NULL, &len);
        uint64_t t0;

        cs = connect_peer(f, 1000, &silent);  /* never says Hello */
        cp = connect_peer(f, 1000, &partial); /* Hello, then half a frame */
        ci = connect_peer(f, 1000, &idle);    /* Hello, then nothing */
        cpa = connect_peer(f, 1000, &paused); /* Hello, at max_pending, then half a frame */
        client_write(f, cp, hello, hlen);
        client_write(f, ci, hello, hlen);
        client_write(f, cpa, hello, hlen);
        pump(f, 4);
        assert_int_equal(f->n_seen, 3);

        t0 = now_usec();
        client_write(f, cp, status, len - 1);
        pump(f, 4);
        assert_true(partial->frame_started_usec >= t0);
        assert_int_equal(idle->frame_started_usec, 0);

        /* A paused peer (max_pending reached) is not timed. */
        {
                PeerLimits l = default_limits;

                l.max_pending = 1;
                set_limits(f, &l);
                f->hold = true;
                client_write(f, cpa, status, len);
                pump(f, 4);
                assert_int_equal(paused->n_requests, 1);
                client_write(f, cpa, status, len - 1);
                pump(f, 4);
                assert_int_equal(paused->frame_started_usec, 0);
        }

        /* Before the deadlines: nothing happens. */
        peer_context_tick(&f->ctx, partial->frame_started_usec + f->limits.frame_timeout_usec - 1);
        assert_int_equal(f->closing_calls, 0);

        /* The frame deadline closes the peer with half a frame only. */
        peer_context_tick(&f->ctx, partial->frame_started_usec + f->limits.frame_timeout_usec);
        assert_int_equal(f->closing_calls, 1);
        assert_true(partial->closing);
        assert_false(idle->closing);
        assert_false(paused->closing);
        /* The Hello deadline closes the silent one, however late it is. */
        assert_false(silent->closing);
        peer_context_tick(&f->ctx, silent->accepted_usec + f->limits.hello_timeout_usec + 3600 * USEC_PER_SEC);
        assert_int_equal(f->closing_calls, 2);
        assert_true(silent->closing);
        assert_false(idle->closing);
        assert_false(paused->closing);
        pump(f, 4);
        assert_true(client_sees_eof(f, cs));
        assert_true(client_sees_eof(f, cp));
        assert_true(client_nothing_to_read(f, ci));
        assert_int_equal(f->ctx.n_peers, 2);
        close(cs);
        close(cp);
        close(ci);
        /* A paused peer (max_pending reached) does not read, but still
         * hears its client hang up: it is closed at once, its request
         * cancelled (the closing callback), not when the request ends. */
        close(cpa);
        pump(f, 4);
        assert_int_equal(f->ctx.n_peers, 0);
}

/* ---- input and connection charges -------------------------------------- */

static void test_input_charge_per_uid(void **state) {
        Fixture *f = *state;
        PeerLimits l = default_limits;
        Peer *a, *b, *o;
        int ca, cb, co;
        uint8_t h40[4] = { 0, 0, 0x80, 0x02 }; /* 40 MiB */
        uint8_t h30[4] = { 0, 0, 0xe0, 0x01 }; /* 30 MiB */
        UserCharge *u;

        l.max_request_size = 48u << 20;
        set_limits(f, &l);
        ca = connect_peer(f, 7, &a);
        cb = connect_peer(f, 7, &b);
        co = connect_peer(f, 8, &o);

        /* The reader makes room for the frame a header announces; the
         * uid is charged for that buffer at once, before any byte of the
         * body came (the review's finding 8: buffers are the uid's). */
        client_write(f, ca, h40, 4);
        pump(f, 4);
        u = a->user;
        assert_int_equal(u->uid, 7);
        assert_int_equal(a->in_charged, a->in.size);
        assert_true(u->in_bytes >= 40 * MiB && u->in_bytes <= PEER_MAX_IN_BYTES_PER_UID);
        client_write(f, ca, "x", 1);
        pump(f, 4);
        assert_int_equal(a->in_charged, a->in.size);
        assert_true(a->frame_started_usec > 0);

        /* Another uid has its own quota. */
        client_write(f, co, h40, 4);
        pump(f, 4);
        client_write(f, co, "x", 1);
        pump(f, 4);
        assert_false(o->closing);
        assert_true(o->user->in_bytes >= 40 * MiB);

        /* 30 MiB more for uid 7 is over its 64 MiB: that connection goes,
         * not the one that was there first. */
        client_write(f, cb, h30, 4);
        pump(f, 4);
        assert_int_equal(f->closing_calls, 1);
        assert_true(client_sees_eof(f, cb));
        assert_false(a->closing);
        assert_false(o->closing);
        assert_int_equal(u->in_bytes, a->in_charged);
        assert_int_equal(u->conns, 1);

        close(ca);
        pump(f, 4);
        /* The uid is forgotten with its last connection. */
        for (UserCharge *x = f->ctx.users; x; x = x->next)
                assert_int_not_equal(x->uid, 7);
        assert_int_equal(o->user->conns, 1);
        close(cb);
        close(co);
        pump(f, 4);
}

static void test_connection_limits(void **state) {
        Fixture *f = *state;
        PeerLimits l = default_limits;
        struct ucred cred1 = { .pid = 1, .uid = 1, .gid = 1 }, cred2 = { .pid = 2, .uid = 2, .gid = 2 };
        int sv[2], c[3];
        Peer *p[3], *x;

        l.max_connections = 3;
        l.max_connections_per_uid = 2;
        set_limits(f, &l);
        c[0] = connect_peer(f, 1, &p[0]);
        c[1] = connect_peer(f, 1, &p[1]);
        assert_int_equal(f->changed_calls, 2);

        /* uid 1's third: -EDQUOT, the fd stays the caller's. */
        assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
        assert_int_equal(peer_new(&f->ctx, sv[0], &cred1, &x), -EDQUOT);
        assert_int_equal(fcntl(sv[0], F_GETFD), FD_CLOEXEC);
        c[2] = connect_peer(f, 2, &p[2]);
        /* Three in all: -EUSERS for anyone; a refused uid is not remembered. */
        assert_int_equal(peer_new(&f->ctx, sv[0], &(struct ucred){ .uid = 3 }, &x), -EUSERS);
        assert_int_equal(peer_new(&f->ctx, sv[0], &cred2, &x), -EUSERS);
        for (UserCharge *u = f->ctx.users; u; u = u->next)
                assert_true(u->uid == 1 || u->uid == 2);
        assert_int_equal(f->ctx.n_peers, 3);
        assert_int_equal(f->changed_calls, 3);

        /* One goes: room for one more of uid 1. */
        close(c[0]);
        pump(f, 4);
        assert_int_equal(f->ctx.n_peers, 2);
        assert_int_equal(peer_new(&f->ctx, sv[0], &cred1, &x), 0);
        assert_int_equal(x->user->conns, 2);

        /* Stopping: no new peers, every peer closes once its output went. */
        peer_context_stop(&f->ctx);
        assert_int_equal(peer_new(&f->ctx, -1, &cred2, &x), -ESHUTDOWN);
        pump(f, 4);
        assert_int_equal(f->ctx.n_peers, 0);
        assert_null(f->ctx.users);
        close(sv[1]);
        close(c[1]);
        close(c[2]);
}

/* ---- output ------------------------------------------------------------- */

/* What a queued frame's descriptors are borrowed from. */
typedef struct Holder {
        int fd;         /* a sealed memfd */
        unsigned refs;  /* references handed out, not released */
        unsigned released;
} Holder;

static void holder_release(void *obj) {
        Holder *h = obj;

        assert_true(h->refs > 0);
        h->refs--;
        h->released++;
}

static PeerRef *holder_ref(Holder *h) {
        PeerRef *k = calloc(1, sizeof(PeerRef));

        assert_non_null(k);
        h->refs++;
        *k = (PeerRef){ .obj = h, .release = holder_release };
        return k;
}

static void holder_init(Holder *h, const char *text) {
        *h = (Holder){ .fd = memfd_create("test-peer", MFD_CLOEXEC | MFD_ALLOW_SEALING) };
        assert_true(h->fd >= 0);
        assert_int_equal(write(h->fd, text, strlen(text)), (ssize_t) strlen(text));
        assert_int_equal(fcntl(h->fd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL), 0);
}

static void holder_deinit(Holder *h) {
        assert_int_equal(h->refs, 0);
        close(h->fd);
}

/* A reply frame for id with a message of len bytes ('m'). */
static void queue_reply(Peer *p, uint64_t id, size_t msg_len, const int *fds, size_t n_fds, PeerRef *keep,
                        size_t n_keep, int expect) {
        Weightd__V1__Envelope env = WEIGHTD__V1__ENVELOPE__INIT;
        Weightd__V1__Reply reply = WEIGHTD__V1__REPLY__INIT;
        _cleanup_free_ char *msg = malloc(msg_len + 1);

        memset(msg, 'm', msg_len);
        msg[msg_len] = 0;
        reply.message = msg;
        env.id = id;
        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_REPLY;
        env.reply = &reply;
        assert_int_equal(peer_send(p, &env, fds, n_fds, keep, n_keep), expect);
}

static void check_reply(Fixture *f, int c, uint64_t id, size_t msg_len, const Holder *const *holders, size_t n) {
        int fds[8];
        size_t len = 0, n_fds = 0;
        _cleanup_free_ uint8_t *payload = client_read_frame(f, c, &len, fds, &n_fds, ELEMENTSOF(fds));
        WireEnvelope *env;

        assert_non_null(payload);
        env = wire_unpack(payload, len);
        assert_non_null(env);
        assert_int_equal(env->id, id);
        assert_int_equal(env->body_case, WEIGHTD__V1__ENVELOPE__BODY_REPLY);
        assert_int_equal(strlen(env->reply->message), msg_len);
        wire_envelope_free(env);
        assert_int_equal(n_fds, n);
        for (size_t i = 0; i < n; i++) {
                struct stat a, b;
                char text[64] = {};

                /* The very file the holder keeps, with its bytes. */
                assert_int_equal(fstat(fds[i], &a), 0);
                assert_int_equal(fstat(holders[i]->fd, &b), 0);
                assert_int_equal(a.st_ino, b.st_ino);
                assert_int_equal(a.st_dev, b.st_dev);
                assert_true(pread(fds[i], text, sizeof(text) - 1, 0) > 0);
                assert_int_equal(fcntl(fds[i], F_GET_SEALS) & F_SEAL_WRITE, F_SEAL_WRITE);
                assert_int_equal(fcntl(fds[i], F_GETFD), FD_CLOEXEC);
                {
                        char want[64] = {};

                        assert_true(pread(holders[i]->fd, want, sizeof(want) - 1, 0) > 0);
                        assert_string_equal(text, want);
                }
                close(fds[i]);
        }
}

static void test_output_descriptors(void **state) {
        Fixture *f = *state;
        Holder h1, h2, h3;
        Peer *p;
        int c = connect_peer(f, 1000, &p);

        holder_init(&h1, "one");
        holder_init(&h2, "two");
        holder_init(&h3, "three");

        /* Three frames, with 1, 0 and 2 descriptors, sent at once: each
         * reference is released as soon as its frame went out. */
        {
                int fds1[] = { h1.fd };
                int fds3[] = { h2.fd, h3.fd };
                PeerRef *k3 = calloc(2, sizeof(PeerRef));

                queue_reply(p, 1, 10, fds1, 1, holder_ref(&h1), 1, 0);
                assert_int_equal(h1.refs, 0);
                assert_int_equal(h1.released, 1);
                queue_reply(p, 2, 20, NULL, 0, NULL, 0, 0);
                h2.refs++;
                h3.refs++;
                k3[0] = (PeerRef){ .obj = &h2, .release = holder_release };
                k3[1] = (PeerRef){ .obj = &h3, .release = holder_release };
                queue_reply(p, 3, 30, fds3, 2, k3, 2, 0);
                assert_int_equal(h2.refs + h3.refs, 0);
        }
        check_reply(f, c, 1, 10, (const Holder *[]){ &h1 }, 1);
        check_reply(f, c, 2, 20, NULL, 0);
        check_reply(f, c, 3, 30, (const Holder *[]){ &h2, &h3 }, 2);

        /* A frame larger than the socket takes: its reference stays until
         * its last byte went, and the frame behind it waits, descriptors
         * and all. */
        {
                int fds1[] = { h1.fd };
                int fds2[] = { h2.fd };

                queue_reply(p, 4, 4 * MiB, fds1, 1, holder_ref(&h1), 1, 0);
                queue_reply(p, 5, 100, fds2, 1, holder_ref(&h2), 1, 0);
                pump(f, 4);
                assert_int_equal(h1.refs, 1);
                assert_int_equal(h2.refs, 1);
                assert_non_null(p->out_head);
                check_reply(f, c, 4, 4 * MiB, (const Holder *[]){ &h1 }, 1);
                pump(f, 4);
                assert_int_equal(h1.refs, 0);
                check_reply(f, c, 5, 100, (const Holder *[]){ &h2 }, 1);
                assert_int_equal(h2.refs, 0);
                assert_null(p->out_head);
                assert_int_equal(p->out_bytes, 0);
                assert_int_equal(p->user->out_bytes, 0);
        }

        /* Closed with frames queued: the references go with the peer. */
        {
                int fds1[] = { h1.fd };
                int fds3[] = { h3.fd };

                queue_reply(p, 6, 4 * MiB, fds1, 1, holder_ref(&h1), 1, 0);
                queue_reply(p, 7, 100, fds3, 1, holder_ref(&h3), 1, 0);
                assert_int_equal(h1.refs + h3.refs, 2);
                peer_close(p);
                assert_int_equal(h1.refs + h3.refs, 0);
                /* A closed peer takes nothing more, and lets go of it. */
                queue_reply(p, 8, 1, fds1, 1, holder_ref(&h1), 1, -ECONNRESET);
                assert_int_equal(h1.refs, 0);
        }
        pump(f, 4);
        assert_true(client_sees_eof(f, c));
        close(c);
        holder_deinit(&h1);
        holder_deinit(&h2);
        holder_deinit(&h3);
}

static void test_close_when_sent(void **state) {
        Fixture *f = *state;
        Holder h;
        Peer *p;
        int c = connect_peer(f, 1000, &p);
        int fds[1];

        holder_init(&h, "last words");
        fds[0] = h.fd;
        queue_reply(p, 9, 2 * MiB, fds, 1, holder_ref(&h), 1, 0);
        peer_close_when_sent(p);
        assert_false(p->closing);
        check_reply(f, c, 9, 2 * MiB, (const Holder *[]){ &h }, 1);
        pump(f, 4);
        assert_int_equal(f->closing_calls, 1);
        assert_int_equal(h.refs, 0);
        assert_true(client_sees_eof(f, c));
        close(c);
        holder_deinit(&h);
}

/* A frame of len bytes the client need not decode (it never reads it). */
static void queue_raw(Peer *p, size_t len, Holder *h, int expect) {
        uint8_t *buf = malloc(len);

        assert_non_null(buf);
        memset(buf, 0, MIN(len, (size_t) 1 << 20)); /* what the socket takes first */
        assert_int_equal(peer_queue(p, buf, len, NULL, 0, h ? holder_ref(h) : NULL, h ? 1 : 0), expect);
}

static void test_output_limit_per_connection(void **state) {
        Fixture *f = *state;
        Holder h;
        Peer *p, *q;
        int c = connect_peer(f, 1000, &p);
        int d = connect_peer(f, 1000, &q);

        holder_init(&h, "x");
        /* One frame of any size can go out: only what waits behind the one
         * being sent counts. */
        queue_raw(p, PEER_MAX_OUT_BYTES + 16 * MiB, &h, 0);
        assert_false(p->closing);
        queue_raw(p, PEER_MAX_OUT_BYTES - 4 * MiB, &h, 0);
        assert_false(p->closing);
        assert_int_equal(h.refs, 2);
        /* Behind it, more than the limit: this peer goes, not its sibling;
         * from the ready list, not under the caller, who may be walking a
         * job's waiters.  Its output stops counting at once. */
        queue_raw(p, 8 * MiB, &h, -ENOBUFS);
        assert_true(p->close_pending);
        assert_false(p->closing);
        assert_int_equal(f->closing_calls, 0);
        queue_raw(p, 10, &h, -ECONNRESET); /* it sends nothing more */
        assert_false(q->closing);
        assert_int_equal(q->user->out_bytes, 0);
        queue_reply(q, 1, 10, NULL, 0, NULL, 0, 0);
        check_reply(f, d, 1, 10, NULL, 0);
        pump(f, 4);
        assert_int_equal(f->closing_calls, 1);
        assert_int_equal(h.refs, 0);
        assert_true(client_sees_eof(f, c));
        close(c);
        close(d);
        holder_deinit(&h);
}

static void test_output_limit_per_uid(void **state) {
        Fixture *f = *state;
        Holder h;
        Peer *stalled[4], *healthy, *other;
        int cs[4], ch, co;
        size_t msg;

        holder_init(&h, "x");
        for (size_t i = 0; i < 4; i++)
                cs[i] = connect_peer(f, 1000, &stalled[i]);
        ch = connect_peer(f, 1000, &healthy);
        co = connect_peer(f, 1001, &other);

        /* Four connections of uid 1000 that never read: a 1 MiB frame in
         * the socket and 60 MiB behind it each, 63 MiB behind on the
         * second, all under the per-connection limit. */
        for (size_t i = 0; i < 4; i++) {
                queue_raw(stalled[i], MiB, &h, 0);
                queue_raw(stalled[i], (i == 1 ? 63 : 60) * MiB, &h, 0);
        }
        /* Another uid is not charged for them. */
        queue_raw(other, 60 * MiB, NULL, 0);
        assert_true(healthy->user->out_bytes > 240 * MiB);
        assert_true(healthy->user->out_bytes <= PEER_MAX_OUT_BYTES_PER_UID);
        assert_true(other->user->out_bytes <= 60 * MiB);

        /* A healthy sibling's reply takes the uid over its cap (by more than
         * the socket takes at once): the one that reads least is closed, not
         * the sibling whose reply it was. */
        msg = PEER_MAX_OUT_BYTES_PER_UID - healthy->user->out_bytes + 4 * MiB;
        queue_reply(healthy, 77, msg, NULL, 0, NULL, 0, 0);
        assert_false(healthy->close_pending);
        assert_true(stalled[1]->close_pending);
        assert_false(stalled[0]->close_pending);
        assert_false(stalled[2]->close_pending);
        assert_false(stalled[3]->close_pending);
        assert_false(other->close_pending);
        assert_true(healthy->user->out_bytes <= PEER_MAX_OUT_BYTES_PER_UID);
        check_reply(f, ch, 77, msg, NULL, 0);
        assert_int_equal(h.refs, 6);
        assert_true(client_sees_eof(f, cs[1]));

        /* A big reply that stays 2 MiB under the cap, then a stalled
         * connection queues over it while it reads least: it closes itself
         * (peer_queue() says so), the healthy one keeps its reply. */
        msg = PEER_MAX_OUT_BYTES_PER_UID - healthy->user->out_bytes - 2 * MiB;
        queue_reply(healthy, 78, msg, NULL, 0, NULL, 0, 0);
        assert_false(healthy->closing);
        assert_int_equal(h.refs, 6);
        queue_raw(stalled[0], 4 * MiB, &h, -ENOBUFS);
        assert_true(stalled[0]->close_pending);
        assert_false(stalled[2]->close_pending);
        assert_false(stalled[3]->close_pending);
        assert_false(healthy->close_pending);
        check_reply(f, ch, 78, msg, NULL, 0);
        assert_int_equal(h.refs, 4);

        for (size_t i = 0; i < 4; i++)
                close(cs[i]);
        close(ch);
        close(co);
        pump(f, 8);
        assert_int_equal(h.refs, 0);
        assert_int_equal(f->ctx.n_peers, 0);
        holder_deinit(&h);
}

/* ---- max_pending and the ready list -------------------------------------- */

static void complete_one(Fixture *f, Peer *p) {
        TestReq *r;

        /* The oldest request (the list is newest first). */
        assert_non_null(p->requests);
        r = container_of(p->requests, TestReq, link);
        while (r->link.links_next)
                r = container_of(r->link.links_next, TestReq, link);
        peer_unlink(p, &r->link);
        free(r);
        f->in_resume = true;
        peer_resume(p);
        f->in_resume = false;
}

typedef struct TimerCtx {
        Fixture *f;
        Peer *p;
        size_t seen_at_completion;
        uint64_t iteration;
} TimerCtx;

static void on_timer(uv_timer_t *t) {
        TimerCtx *tc = t->data;

        tc->seen_at_completion = tc->f->n_seen;
        tc->iteration = tc->f->iteration;
        complete_one(tc->f, tc->p);
        /* Nothing was decoded inside peer_resume(). */
        assert_int_equal(tc->f->n_seen, tc->seen_at_completion);
        assert_true(tc->p->on_ready);
}

static void test_max_pending_and_resume(void **state) {
        Fixture *f = *state;
        PeerLimits l = default_limits;
        Peer *p;
        int c;
        size_t len;
        _cleanup_free_ uint8_t *all = pack_pipeline(1, 6, true, &len, NULL);
        uv_timer_t timer;
        TimerCtx tc;

        l.max_pending = 2;
        set_limits(f, &l);
        f->hold = true;
        c = connect_peer(f, 1000, &p);
        client_write(f, c, all, len);
        pump(f, 8);
        /* Reading stopped at max_pending; the rest waits in the buffer. */
        assert_int_equal(f->n_seen, 2);
        assert_int_equal(p->n_requests, 2);
        assert_false(p->events & UV_READABLE);
        assert_true(wire_reader_partial(&p->in));

        /* Completed from the test: the peer is only scheduled. */
        complete_one(f, p);
        assert_int_equal(f->n_seen, 2);
        assert_true(p->on_ready);
        assert_ptr_equal(f->ctx.ready, p);
        /* Resuming twice does not list it twice. */
        f->in_resume = true;
        peer_resume(p);
        f->in_resume = false;
        assert_null(p->ready_next);
        /* One turn: the next frame is decoded in the check phase, and the
         * one after it waits again (max_pending). */
        uv_run(&f->loop, UV_RUN_NOWAIT);
        f->phase = PHASE_TEST;
        assert_int_equal(f->n_seen, 3);
        assert_int_equal(f->seen[2].id, 3);
        assert_int_equal(f->seen[2].phase, PHASE_CHECK);
        assert_false(p->on_ready);
        pump(f, 4);
        assert_int_equal(f->n_seen, 3);

        /* Completed from a timer: decoded in the same turn's check phase,
         * after the timer returned. */
        assert_int_equal(uv_timer_init(&f->loop, &timer), 0);
        tc = (TimerCtx){ .f = f, .p = p };
        timer.data = &tc;
        uv_timer_start(&timer, on_timer, 0, 0);
        pump(f, 2);
        assert_int_equal(tc.seen_at_completion, 3);
        assert_int_equal(f->n_seen, 4);
        assert_int_equal(f->seen[3].id, 4);
        assert_int_equal(f->seen[3].phase, PHASE_CHECK);
        assert_int_equal(f->seen[3].iteration, tc.iteration + 1); /* the prepare of the timer's turn counted it */

        /* Two at once: both resume in one pass, in order. */
        complete_one(f, p);
        complete_one(f, p);
        assert_int_equal(f->n_seen, 4);
        pump(f, 2);
        assert_int_equal(f->n_seen, 6);
        assert_int_equal(f->seen[4].id, 5);
        assert_int_equal(f->seen[5].id, 6);
        assert_false(wire_reader_partial(&p->in));

        /* Nothing buffered: resume re-arms the poll instead of listing. */
        complete_one(f, p);
        assert_false(p->on_ready);
        assert_true(p->events & UV_READABLE);
        {
                size_t k;
                _cleanup_free_ uint8_t *one = pack_request(7, WEIGHTD__V1__ENVELOPE__BODY_STATUS, NULL, &k);

                client_write(f, c, one, k);
        }
        pump(f, 4);
        assert_int_equal(f->n_seen, 7);
        assert_int_equal(f->seen[6].phase, PHASE_OTHER);

        /* A peer closed while it is on the ready list leaves it. */
        {
                size_t k;
                _cleanup_free_ uint8_t *two = pack_pipeline(8, 2, false, &k, NULL);

                client_write(f, c, two, k);
                complete_one(f, p);
                assert_false(p->on_ready); /* the bytes are in the socket, not read yet */
                pump(f, 4);
                assert_int_equal(f->n_seen, 8); /* 8 held, 9 buffered */
                assert_true(wire_reader_partial(&p->in));
                complete_one(f, p);
                assert_true(p->on_ready);
                peer_close(p);
                assert_null(f->ctx.ready);
                pump(f, 4);
                assert_int_equal(f->n_seen, 8);
        }
        uv_close((uv_handle_t *) &timer, NULL);
        close(c);
        pump(f, 2);
}

/* The shape of the review's finding 1: a request of peer a completes while
 * the loop is inside peer b's frame callback (a job finishing under another
 * peer's input).  a's next frame must not be decoded there, under b's
 * handler, but later, from the ready list in the check phase. */
static void complete_other(Fixture *f, Peer *p, const WireEnvelope *env) {
        if (p != f->other && f->other->requests)
                complete_one(f, f->other);
}

static void test_resume_never_reads_synchronously(void **state) {
        Fixture *f = *state;
        PeerLimits l = default_limits;
        Peer *a, *b;
        int ca, cb;
        size_t len, k;
        _cleanup_free_ uint8_t *all = pack_pipeline(1, 3, true, &len, NULL);
        _cleanup_free_ uint8_t *one = pack_request(50, WEIGHTD__V1__ENVELOPE__BODY_HELLO, NULL, &k);

        l.max_pending = 1;
        set_limits(f, &l);
        f->hold = true;
        ca = connect_peer(f, 1000, &a);
        cb = connect_peer(f, 1000, &b);
        client_write(f, ca, all, len);
        pump(f, 4);
        assert_int_equal(f->n_seen, 1);

        f->other = a;
        f->hook = complete_other;
        client_write(f, cb, one, k);
        uv_run(&f->loop, UV_RUN_NOWAIT);
        f->phase = PHASE_TEST;
        /* b's frame (I/O), then a's next one, in the check phase of the same
         * turn; the frame callback was never entered twice (it asserts). */
        assert_int_equal(f->n_seen, 3);
        assert_ptr_equal(f->seen[1].peer, b);
        assert_int_equal(f->seen[1].phase, PHASE_OTHER);
        assert_ptr_equal(f->seen[2].peer, a);
        assert_int_equal(f->seen[2].id, 2);
        assert_int_equal(f->seen[2].phase, PHASE_CHECK);
        assert_int_equal(f->seen[2].iteration, f->seen[1].iteration);
        f->hook = NULL;
        close(ca);
        close(cb);
        pump(f, 4);
}

/* ---- leases ------------------------------------------------------------- */

static void test_leases(void **state) {
        Fixture *f = *state;
        Holder h;
        Peer *p, *q;
        int c = connect_peer(f, 1000, &p);
        int d = connect_peer(f, 1000, &q);
        uint64_t ids[5];
        char why[128];

        holder_init(&h, "lease");
        for (size_t i = 0; i < 5; i++) {
                PeerRef *k = holder_ref(&h);

                ids[i] = peer_lease_add(i < 3 ? p : q, *k);
                free(k);
                assert_true(ids[i] > 0);
                for (size_t j = 0; j < i; j++)
                        assert_true(ids[j] != ids[i]);
        }
        assert_int_equal(p->n_leases, 3);
        assert_int_equal(q->n_leases, 2);
        assert_int_equal(p->user->leases, 5);
        assert_int_equal(f->ctx.n_leases, 5);
        assert_null(peer_lease_limit(p, why, sizeof(why)));

        /* Found only on the peer that holds it. */
        assert_non_null(peer_lease_find(p, ids[1]));
        assert_null(peer_lease_find(q, ids[1]));
        peer_lease_drop(p, peer_lease_find(p, ids[1]));
        assert_null(peer_lease_find(p, ids[1]));
        assert_int_equal(h.released, 1);
        assert_int_equal(p->user->leases, 4);

        /* Closing releases the peer's own leases, after its requests went. */
        peer_close(p);
        assert_int_equal(f->leases_at_closing, 2);
        assert_int_equal(h.released, 3);
        assert_int_equal(h.refs, 2);
        assert_int_equal(q->user->leases, 2);
        assert_int_equal(f->ctx.n_leases, 2);

        /* The per-connection limit. */
        for (unsigned i = q->n_leases; i < PEER_MAX_LEASES; i++) {
                PeerRef *k = holder_ref(&h);

                assert_true(peer_lease_add(q, *k) > 0);
                free(k);
        }
        assert_non_null(peer_lease_limit(q, why, sizeof(why)));
        assert_string_equal(why, "this connection holds 4096 leases, the limit");
        close(d);
        pump(f, 4);
        assert_int_equal(h.refs, 0);
        assert_int_equal(f->ctx.n_leases, 0);
        close(c);
        holder_deinit(&h);
}

static void test_leases_per_uid(void **state) {
        Fixture *f = *state;
        Holder h;
        Peer *p[PEER_MAX_LEASES_PER_UID / PEER_MAX_LEASES + 1];
        int c[ELEMENTSOF(p)];
        char why[128];
        PeerLimits l = default_limits;

        l.max_connections_per_uid = ELEMENTSOF(p);
        set_limits(f, &l);
        holder_init(&h, "lease");
        for (size_t i = 0; i < ELEMENTSOF(p); i++)
                c[i] = connect_peer(f, 1000, &p[i]);
        for (size_t i = 0; i + 1 < ELEMENTSOF(p); i++)
                for (unsigned j = 0; j < PEER_MAX_LEASES; j++) {
                        h.refs++;
                        assert_true(peer_lease_add(p[i], (PeerRef){ .obj = &h, .release = holder_release }) > 0);
                }
        /* The last connection holds none, but its uid holds the limit. */
        assert_int_equal(p[ELEMENTSOF(p) - 1]->n_leases, 0);
        assert_non_null(peer_lease_limit(p[ELEMENTSOF(p) - 1], why, sizeof(why)));
        assert_string_equal(why, "uid 1000 holds 65536 leases, the limit");
        peer_close(p[0]);
        assert_null(peer_lease_limit(p[ELEMENTSOF(p) - 1], why, sizeof(why)));
        for (size_t i = 0; i < ELEMENTSOF(p); i++)
                close(c[i]);
        pump(f, 4);
        assert_int_equal(h.refs, 0);
        holder_deinit(&h);
}

int main(void) {
        uv_loop_t loop;
        /* libuv opens a process-wide pipe with the first loop: before the
         * first test counts descriptors. */
        assert_int_equal(uv_loop_init(&loop), 0);
        assert_int_equal(uv_loop_close(&loop), 0);

        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_pipelined_frames, setup, teardown),
                cmocka_unit_test_setup_teardown(test_frames_cut_across_writes, setup, teardown),
                cmocka_unit_test_setup_teardown(test_frame_over_limit, setup, teardown),
                cmocka_unit_test_setup_teardown(test_deadlines, setup, teardown),
                cmocka_unit_test_setup_teardown(test_input_charge_per_uid, setup, teardown),
                cmocka_unit_test_setup_teardown(test_connection_limits, setup, teardown),
                cmocka_unit_test_setup_teardown(test_output_descriptors, setup, teardown),
                cmocka_unit_test_setup_teardown(test_close_when_sent, setup, teardown),
                cmocka_unit_test_setup_teardown(test_output_limit_per_connection, setup, teardown),
                cmocka_unit_test_setup_teardown(test_output_limit_per_uid, setup, teardown),
                cmocka_unit_test_setup_teardown(test_max_pending_and_resume, setup, teardown),
                cmocka_unit_test_setup_teardown(test_resume_never_reads_synchronously, setup, teardown),
                cmocka_unit_test_setup_teardown(test_leases, setup, teardown),
                cmocka_unit_test_setup_teardown(test_leases_per_uid, setup, teardown),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
