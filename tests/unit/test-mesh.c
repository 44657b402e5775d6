/* The mesh (daemon/cluster/mesh.c) over real TCP sockets on 127.0.0.1 and
 * real TLS, several Mesh objects in one process.  Most tests put every mesh
 * on one loop; the deadline test puts the node that stops answering on a
 * second loop that the test simply stops running (its kernel sockets stay
 * open and keep ACKing, so only the heartbeats can tell).  A "rogue" peer
 * runs in a thread with blocking sockets and plain OpenSSL: it derives the
 * PSK as mesh.c documents it, so it authenticates like a node, and then
 * breaks the protocol (an oversized frame, garbage, a frame before Hello,
 * an unknown identity, a reader that stalls) or plays a restarted node
 * whose old connection never closed.
 *
 * Checked: three nodes come up and exchange frames each way (bytes
 * compared, one of 1 MiB); a wrong secret is UNAUTHENTICATED on both ends
 * and nothing is exchanged; a different nodes list is MISMATCH on both
 * ends; a silent node is down within the deadline and a restarted one (new
 * generation) comes back; a replaced link is down then up; hostile frames
 * close only their link; callbacks never run inside mesh_send() or
 * mesh_new(); and every test ends with the descriptors it began with and
 * loops with no handle left. */

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>

#include <cmocka.h>

#include "cluster/mesh.h"
#include "macro.h"
#include "util/log.h"
#include "util/time-util.h"
#include "test-util.h"

#define MSEC UINT64_C(1000)
#define SEC UINT64_C(1000000)
#define MAX_NODES 4
#define MAX_EVENTS 32
#define LONG_DEADLINE (5 * SEC)

static const char secret[] = "the cluster's shared secret";
static const char wrong_secret[] = "not the cluster's secret";

/* ---- a node under test -------------------------------------------------- */

typedef struct Event {
        char kind; /* 'u' up, 'd' down */
        unsigned node;
        uint64_t generation;
        uint64_t at_usec;
        char why[200];
} Event;

typedef struct TNode {
        Mesh *mesh;
        char name[8];
        uint64_t generation;
        char data_address[16];
        Event events[MAX_EVENTS];
        unsigned n_events;
        unsigned n_messages[MAX_NODES];
        uint8_t *msg[MAX_NODES]; /* the last message from each node, packed again */
        size_t msg_len[MAX_NODES];
        char up_address[MAX_NODES][16];
} TNode;

static bool in_api; /* inside mesh_new() or mesh_send() */
static unsigned callbacks_in_api;

static void record(TNode *t, char kind, unsigned node, uint64_t generation, const char *why) {
        if (in_api)
                callbacks_in_api++;
        if (t->n_events >= MAX_EVENTS)
                return;
        Event *e = &t->events[t->n_events++];
        e->kind = kind;
        e->node = node;
        e->generation = generation;
        e->at_usec = now_usec();
        snprintf(e->why, sizeof(e->why), "%s", why ? why : "");
}

static void on_up(Mesh *m, unsigned node, uint64_t generation, const void *data_address, size_t len, void *userdata) {
        TNode *t = userdata;

        record(t, 'u', node, generation, NULL);
        if (node < MAX_NODES && len < sizeof(t->up_address[0])) {
                if (len > 0) /* a rogue peer's Hello may carry none */
                        memcpy(t->up_address[node], data_address, len);
                t->up_address[node][len] = 0;
        }
}

static void on_down(Mesh *m, unsigned node, uint64_t generation, const char *why, void *userdata) {
        record(userdata, 'd', node, generation, why);
}

static void on_message(Mesh *m, unsigned node, const ClusterEnvelope *env, void *userdata) {
        TNode *t = userdata;
        size_t n = weightd__cluster__v1__envelope__get_packed_size(env);

        if (in_api)
                callbacks_in_api++;
        if (node >= MAX_NODES)
                return;
        t->n_messages[node]++;
        free(t->msg[node]);
        t->msg[node] = malloc(n ? n : 1);
        if (!t->msg[node])
                return;
        weightd__cluster__v1__envelope__pack(env, t->msg[node]);
        t->msg_len[node] = n;
}

static const MeshOps ops = { .up = on_up, .down = on_down, .message = on_message };

static unsigned count_events(const TNode *t, char kind, unsigned node) {
        unsigned k = 0;

        for (unsigned i = 0; i < t->n_events; i++)
                if (t->events[i].kind == kind && t->events[i].node == node)
                        k++;
        return k;
}

static const Event *last_event(const TNode *t, unsigned node) {
        for (unsigned i = t->n_events; i > 0; i--)
                if (t->events[i - 1].node == node)
                        return &t->events[i - 1];
        return NULL;
}

static int tnode_start(TNode *t, uv_loop_t *loop, const char *self, const MeshNodeSpec *nodes, size_t n_nodes,
                       const char *key, uint64_t deadline, uint64_t generation, WdError *err) {
        MeshParams p = {
                .self = self,
                .nodes = nodes,
                .n_nodes = n_nodes,
                .secret = (const uint8_t *) key,
                .secret_len = strlen(key),
                .deadline_usec = deadline,
                .generation = generation,
        };
        int r;

        snprintf(t->name, sizeof(t->name), "%s", self);
        snprintf(t->data_address, sizeof(t->data_address), "ucx-%s-%u", self, (unsigned) (generation & 0xff));
        p.data_address = t->data_address;
        p.data_address_len = strlen(t->data_address);
        t->generation = generation;
        in_api = true;
        r = mesh_new(&t->mesh, loop, &p, &ops, t, err);
        in_api = false;
        return r;
}

static void tnode_must_start(TNode *t, uv_loop_t *loop, const char *self, const MeshNodeSpec *nodes, size_t n_nodes,
                             const char *key, uint64_t deadline, uint64_t generation) {
        WdError err = WD_ERROR_NULL;
        int r = tnode_start(t, loop, self, nodes, n_nodes, key, deadline, generation, &err);

        if (r != 0)
                fprintf(stderr, "mesh_new(%s): %s\n", self, err.message);
        assert_int_equal(r, 0);
}

static void tnode_reset(TNode *t) {
        t->mesh = mesh_free(t->mesh);
        for (unsigned i = 0; i < MAX_NODES; i++)
                free(t->msg[i]);
        *t = (TNode){};
}

static int tnode_send(TNode *t, unsigned node, const ClusterEnvelope *env) {
        int r;

        in_api = true;
        r = mesh_send(t->mesh, node, env);
        in_api = false;
        return r;
}

static MeshNodeState state_of(const TNode *t, unsigned node) {
        MeshNodeInfo info;

        mesh_node_info(t->mesh, node, &info);
        return info.state;
}

/* ---- the fixture -------------------------------------------------------- */

typedef struct Fixture {
        int fds_before;
        uv_loop_t loops[2];
        TNode nodes[MAX_NODES];
        MeshNodeSpec specs[MAX_NODES];
        char names[MAX_NODES][8];
} Fixture;

static uint16_t free_port(void) {
        struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
        socklen_t len = sizeof(sa);
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

        assert_true(fd >= 0);
        assert_int_equal(bind(fd, (struct sockaddr *) &sa, sizeof(sa)), 0);
        assert_int_equal(getsockname(fd, (struct sockaddr *) &sa, &len), 0);
        close(fd);
        return ntohs(sa.sin_port);
}

/* n nodes "a", "b", ... on 127.0.0.1 and distinct free ports. */
static void make_specs(Fixture *f, unsigned n) {
        for (unsigned i = 0; i < n; i++) {
                uint16_t port;
                bool dup;

                do {
                        port = free_port();
                        dup = false;
                        for (unsigned j = 0; j < i; j++)
                                dup = dup || f->specs[j].port == port;
                } while (dup);
                snprintf(f->names[i], sizeof(f->names[i]), "%c", 'a' + i);
                f->specs[i] = (MeshNodeSpec){ .name = f->names[i], .host = "127.0.0.1", .port = port };
        }
}

static int setup(void **state) {
        Fixture *f = calloc(1, sizeof(Fixture));

        assert_non_null(f);
        f->fds_before = count_fds();
        assert_int_equal(uv_loop_init(&f->loops[0]), 0);
        assert_int_equal(uv_loop_init(&f->loops[1]), 0);
        callbacks_in_api = 0;
        *state = f;
        return 0;
}

static int teardown(void **state) {
        Fixture *f = *state;

        for (unsigned i = 0; i < MAX_NODES; i++)
                tnode_reset(&f->nodes[i]);
        for (unsigned i = 0; i < 2; i++) {
                (void) uv_run(&f->loops[i], UV_RUN_DEFAULT);
                assert_int_equal(uv_loop_close(&f->loops[i]), 0);
        }
        assert_int_equal(callbacks_in_api, 0);
        assert_int_equal(count_fds(), f->fds_before);
        free(f);
        return 0;
}

typedef bool (*Cond)(Fixture *f, void *arg);

/* Run the loops in loops_mask (bit i: loops[i]) until cond holds or
 * timeout passes; returns whether it held. */
static bool pump(Fixture *f, unsigned loops_mask, uint64_t timeout, Cond cond, void *arg) {
        uint64_t end = now_usec() + timeout;

        for (;;) {
                struct pollfd pfds[2];
                unsigned n = 0;
                int wait = 10;

                for (unsigned i = 0; i < 2; i++)
                        if (loops_mask & (1u << i))
                                (void) uv_run(&f->loops[i], UV_RUN_NOWAIT);
                if (cond && cond(f, arg))
                        return true;
                if (now_usec() >= end)
                        return false;
                for (unsigned i = 0; i < 2; i++)
                        if (loops_mask & (1u << i)) {
                                int t = uv_backend_timeout(&f->loops[i]);

                                pfds[n++] = (struct pollfd){ .fd = uv_backend_fd(&f->loops[i]), .events = POLLIN };
                                if (t >= 0 && t < wait)
                                        wait = t;
                        }
                (void) poll(pfds, n, wait);
        }
}

static bool never(Fixture *f, void *arg) {
        return false;
}

static bool all_up(Fixture *f, void *arg) {
        unsigned n = *(unsigned *) arg;

        for (unsigned i = 0; i < n; i++)
                for (unsigned j = 0; j < n; j++)
                        if (i != j && !mesh_node_up(f->nodes[i].mesh, j))
                                return false;
        return true;
}

typedef struct StateWait {
        unsigned node, peer;
        MeshNodeState state;
} StateWait;

static bool states_are(Fixture *f, void *arg) {
        for (const StateWait *w = arg; w->state != _MESH_NODE_STATE_MAX; w++)
                if (state_of(&f->nodes[w->node], w->peer) != w->state)
                        return false;
        return true;
}

typedef struct EventWait {
        unsigned node;
        char kind;
        unsigned peer;
        unsigned count;
} EventWait;

static bool has_events(Fixture *f, void *arg) {
        const EventWait *w = arg;

        return count_events(&f->nodes[w->node], w->kind, w->peer) >= w->count;
}

/* ---- frames ------------------------------------------------------------- */

static void fill_pattern(uint8_t *buf, size_t len, uint64_t seed) {
        uint64_t x = seed * UINT64_C(0x9E3779B97F4A7C15) + 1;

        for (size_t i = 0; i < len; i++) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf[i] = (uint8_t) x;
        }
}

/* A PlanRequest from node `from` to node `to`, packed into *ret_packed. */
static int send_request(TNode *t, unsigned to, unsigned from, size_t manifest_len, uint8_t **ret_packed,
                        size_t *ret_len) {
        Weightd__Cluster__V1__PlanRequest req = WEIGHTD__CLUSTER__V1__PLAN_REQUEST__INIT;
        ClusterEnvelope env = WEIGHTD__CLUSTER__V1__ENVELOPE__INIT;
        char model[32], *nodes[2] = { "a", "c" };
        uint8_t *manifest = malloc(manifest_len);
        int r;

        assert_non_null(manifest);
        fill_pattern(manifest, manifest_len, from * 16 + to + manifest_len);
        snprintf(model, sizeof(model), "model-%u-%u", from, to);
        req.request_id = UINT64_C(0x1000) * from + to;
        req.model = model;
        req.component = "transformer";
        req.manifest = (ProtobufCBinaryData){ .len = manifest_len, .data = manifest };
        req.n_nodes = 2;
        req.nodes = nodes;
        env.body_case = WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_PLAN_REQUEST;
        env.plan_request = &req;
        *ret_len = weightd__cluster__v1__envelope__get_packed_size(&env);
        *ret_packed = malloc(*ret_len);
        assert_non_null(*ret_packed);
        weightd__cluster__v1__envelope__pack(&env, *ret_packed);
        r = tnode_send(t, to, &env);
        free(manifest);
        return r;
}

static bool b_has_two_from_a(Fixture *f, void *arg) {
        return f->nodes[1].n_messages[0] >= 2;
}

typedef struct MsgWait {
        unsigned n;
        unsigned per_pair;
} MsgWait;

static bool all_messages(Fixture *f, void *arg) {
        const MsgWait *w = arg;

        for (unsigned i = 0; i < w->n; i++)
                for (unsigned j = 0; j < w->n; j++)
                        if (i != j && f->nodes[i].n_messages[j] < w->per_pair)
                                return false;
        return true;
}

/* ---- the rogue peer: plain OpenSSL in a thread -------------------------- */

typedef struct Rogue {
        uint16_t port;
        const char *identity;
        const char *key;
        bool send_hello;
        uint64_t generation;
        uint64_t nodes_hash;
        const uint8_t *extra; /* raw bytes inside TLS after the Hello */
        size_t extra_len;
        bool no_read;
        atomic_bool stop;
        atomic_int handshake; /* 0 pending, 1 done, -1 failed */
        atomic_bool closed;   /* the mesh closed the link */
        atomic_bool done;
        pthread_t thread;
} Rogue;

/* As mesh.c derives it: SHA-256("weightd cluster psk v1" || secret). */
static void derive_psk(const char *key, uint8_t out[32]) {
        unsigned len = 0;
        EVP_MD_CTX *c = EVP_MD_CTX_new();

        EVP_DigestInit_ex(c, EVP_sha256(), NULL);
        EVP_DigestUpdate(c, "weightd cluster psk v1", strlen("weightd cluster psk v1"));
        EVP_DigestUpdate(c, key, strlen(key));
        EVP_DigestFinal_ex(c, out, &len);
        EVP_MD_CTX_free(c);
}

static int rogue_psk_cb(SSL *ssl, const EVP_MD *md, const unsigned char **id, size_t *idlen, SSL_SESSION **sess) {
        static const unsigned char aes128gcm[] = { 0x13, 0x01 };
        Rogue *r = SSL_get_app_data(ssl);
        uint8_t psk[32];
        SSL_SESSION *s = SSL_SESSION_new();

        derive_psk(r->key, psk);
        if (!s || !SSL_SESSION_set1_master_key(s, psk, sizeof(psk)) ||
            !SSL_SESSION_set_cipher(s, SSL_CIPHER_find(ssl, aes128gcm)) ||
            !SSL_SESSION_set_protocol_version(s, TLS1_3_VERSION)) {
                SSL_SESSION_free(s);
                return 0;
        }
        *sess = s;
        *id = (const unsigned char *) r->identity;
        *idlen = strlen(r->identity);
        return 1;
}

static bool ssl_write_all(SSL *ssl, const uint8_t *buf, size_t len) {
        while (len > 0) {
                int k = SSL_write(ssl, buf, (int) len);

                if (k <= 0)
                        return false;
                buf += k;
                len -= (size_t) k;
        }
        return true;
}

static void *rogue_main(void *arg) {
        Rogue *r = arg;
        struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK), .sin_port = htons(r->port) };
        struct timeval tv = { .tv_sec = 0, .tv_usec = 50000 };
        uint64_t end = now_usec() + 20 * SEC;
        SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
        SSL *ssl = NULL;
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

        if (!ctx || fd < 0 || connect(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0)
                goto fail;
        (void) setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
        SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256");
        SSL_CTX_set_psk_use_session_callback(ctx, rogue_psk_cb);
        ssl = SSL_new(ctx);
        if (!ssl)
                goto fail;
        SSL_set_app_data(ssl, r);
        SSL_set_fd(ssl, fd);
        for (;;) {
                int k = SSL_connect(ssl);

                if (k == 1)
                        break;
                if (SSL_get_error(ssl, k) != SSL_ERROR_WANT_READ || now_usec() > end || atomic_load(&r->stop))
                        goto fail;
        }
        atomic_store(&r->handshake, 1);
        if (r->send_hello) {
                Weightd__Cluster__V1__Hello h = WEIGHTD__CLUSTER__V1__HELLO__INIT;
                ClusterEnvelope env = WEIGHTD__CLUSTER__V1__ENVELOPE__INIT;
                uint8_t buf[256];
                size_t n;

                h.version = MESH_VERSION;
                h.node = (char *) r->identity;
                h.generation = r->generation;
                h.nodes_hash = r->nodes_hash;
                env.body_case = WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_HELLO;
                env.hello = &h;
                n = weightd__cluster__v1__envelope__get_packed_size(&env);
                buf[0] = (uint8_t) n;
                buf[1] = (uint8_t) (n >> 8);
                buf[2] = buf[3] = 0;
                weightd__cluster__v1__envelope__pack(&env, buf + 4);
                if (!ssl_write_all(ssl, buf, n + 4))
                        goto closed;
        }
        if (r->extra_len > 0 && !ssl_write_all(ssl, r->extra, r->extra_len))
                goto closed;
        while (!atomic_load(&r->stop) && now_usec() < end) {
                uint8_t buf[4096];
                int k, e;

                if (r->no_read) {
                        usleep(10000);
                        continue;
                }
                k = SSL_read(ssl, buf, sizeof(buf));
                if (k > 0)
                        continue;
                e = SSL_get_error(ssl, k);
                if (e == SSL_ERROR_WANT_READ)
                        continue;
                goto closed;
        }
        goto out;
closed:
        atomic_store(&r->closed, true);
        goto out;
fail:
        atomic_store(&r->handshake, -1);
out:
        SSL_free(ssl);
        SSL_CTX_free(ctx);
        safe_close(fd);
        ERR_clear_error();
        OPENSSL_thread_stop();
        atomic_store(&r->done, true);
        return NULL;
}

static void rogue_start(Rogue *r) {
        atomic_init(&r->stop, false);
        atomic_init(&r->handshake, 0);
        atomic_init(&r->closed, false);
        atomic_init(&r->done, false);
        assert_int_equal(pthread_create(&r->thread, NULL, rogue_main, r), 0);
}

static void rogue_join(Fixture *f, Rogue *r) {
        atomic_store(&r->stop, true);
        while (!atomic_load(&r->done))
                (void) pump(f, 1, 10 * MSEC, never, NULL);
        assert_int_equal(pthread_join(r->thread, NULL), 0);
}

static bool rogue_closed(Fixture *f, void *arg) {
        Rogue *r = arg;

        return atomic_load(&r->closed) || atomic_load(&r->done);
}

static bool rogue_handshake_ended(Fixture *f, void *arg) {
        Rogue *r = arg;

        return atomic_load(&r->handshake) != 0;
}

/* ---- tests -------------------------------------------------------------- */

static void test_api(void **state) {
        Fixture *f = *state;
        WdError err = WD_ERROR_NULL;
        Mesh *m = NULL;
        MeshNodeSpec bad[2];

        make_specs(f, 2);
        assert_string_equal(mesh_node_state_to_string(MESH_NODE_SELF), "self");
        assert_string_equal(mesh_node_state_to_string(MESH_NODE_UNAUTHENTICATED), "unauthenticated");
        assert_string_equal(mesh_node_state_to_string(MESH_NODE_MISMATCH), "mismatch");
        assert_null(mesh_node_state_to_string(_MESH_NODE_STATE_MAX));

        /* The hash covers names, hosts and ports, in order. */
        memcpy(bad, f->specs, sizeof(bad));
        uint64_t h = mesh_nodes_hash(f->specs, 2);
        assert_int_equal(h, mesh_nodes_hash(bad, 2));
        bad[1].port++;
        assert_int_not_equal(h, mesh_nodes_hash(bad, 2));
        bad[1] = f->specs[1];
        bad[1].host = "127.0.0.2";
        assert_int_not_equal(h, mesh_nodes_hash(bad, 2));
        bad[0] = f->specs[1];
        bad[1] = f->specs[0];
        assert_int_not_equal(h, mesh_nodes_hash(bad, 2));

        /* Refused parameters. */
        assert_int_equal(tnode_start(&f->nodes[0], &f->loops[0], "z", f->specs, 2, secret, SEC, 1, &err), WD_E_INVALID);
        assert_non_null(strstr(err.message, "not in the nodes list"));
        assert_int_equal(tnode_start(&f->nodes[0], &f->loops[0], "a", f->specs, 2, secret, SEC, 0, &err), WD_E_INVALID);
        bad[0] = f->specs[0];
        bad[1] = f->specs[0];
        assert_int_equal(tnode_start(&f->nodes[0], &f->loops[0], "a", bad, 2, secret, SEC, 1, &err), WD_E_INVALID);
        assert_non_null(strstr(err.message, "twice"));
        assert_null(f->nodes[0].mesh);

        /* A port taken: the error names the address. */
        tnode_must_start(&f->nodes[0], &f->loops[0], "a", f->specs, 2, secret, SEC, 1);
        m = f->nodes[0].mesh;
        assert_int_equal(tnode_start(&f->nodes[1], &f->loops[0], "a", f->specs, 2, secret, SEC, 2, &err), -EADDRINUSE);
        assert_non_null(strstr(err.message, "cannot bind 127.0.0.1:"));
        assert_null(f->nodes[1].mesh);

        assert_int_equal(mesh_n_nodes(m), 2);
        assert_int_equal(mesh_self(m), 0);
        assert_string_equal(mesh_node_name(m, 1), "b");
        assert_int_equal(mesh_find(m, "b"), 1);
        assert_int_equal(mesh_find(m, "x"), -ENOENT);
        assert_false(mesh_node_up(m, 0));
        assert_false(mesh_node_up(m, 1));
        MeshNodeInfo info;
        mesh_node_info(m, 0, &info);
        assert_int_equal(info.state, MESH_NODE_SELF);
        assert_int_equal(info.generation, 1);
        mesh_node_info(m, 1, &info);
        assert_int_equal(info.state, MESH_NODE_DOWN);
        assert_int_equal(info.generation, 0);

        ClusterEnvelope env = WEIGHTD__CLUSTER__V1__ENVELOPE__INIT;
        Weightd__Cluster__V1__Abort abort_msg = WEIGHTD__CLUSTER__V1__ABORT__INIT;
        env.body_case = WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_ABORT;
        env.abort = &abort_msg;
        assert_int_equal(tnode_send(&f->nodes[0], 1, &env), -ENOTCONN);
        assert_int_equal(tnode_send(&f->nodes[0], 0, &env), -ENOTCONN);

        /* b never comes: a keeps dialing, and stays down. */
        (void) pump(f, 1, 300 * MSEC, never, NULL);
        mesh_node_info(m, 1, &info);
        assert_int_equal(info.state, MESH_NODE_DOWN);
        assert_non_null(strstr(info.last_error, "connect"));
        assert_int_equal(f->nodes[0].n_events, 0);
}

static void test_three_nodes(void **state) {
        Fixture *f = *state;
        unsigned n = 3;
        uint8_t *expected[3][3] = {};
        size_t expected_len[3][3] = {};
        uint8_t *big = NULL;
        size_t big_len = 0;

        make_specs(f, n);
        for (unsigned i = 0; i < n; i++)
                tnode_must_start(&f->nodes[i], &f->loops[0], f->names[i], f->specs, n, secret, LONG_DEADLINE,
                                 UINT64_C(0xabc0) + i);
        assert_true(pump(f, 1, 10 * SEC, all_up, &n));

        for (unsigned i = 0; i < n; i++)
                for (unsigned j = 0; j < n; j++) {
                        MeshNodeInfo info;

                        if (i == j)
                                continue;
                        assert_int_equal(count_events(&f->nodes[i], 'u', j), 1);
                        assert_int_equal(count_events(&f->nodes[i], 'd', j), 0);
                        assert_int_equal(last_event(&f->nodes[i], j)->generation, f->nodes[j].generation);
                        assert_string_equal(f->nodes[i].up_address[j], f->nodes[j].data_address);
                        mesh_node_info(f->nodes[i].mesh, j, &info);
                        assert_int_equal(info.state, MESH_NODE_UP);
                        assert_int_equal(info.generation, f->nodes[j].generation);
                        assert_string_equal(info.last_error, "");
                }

        /* Each way, a small frame; a to b also a 1 MiB one.  Nothing is
         * delivered inside mesh_send() (callbacks_in_api stays 0). */
        for (unsigned i = 0; i < n; i++)
                for (unsigned j = 0; j < n; j++)
                        if (i != j)
                                assert_int_equal(send_request(&f->nodes[i], j, i, 100 + 10 * i + j, &expected[i][j],
                                                              &expected_len[i][j]),
                                                 0);
        MsgWait w = { .n = n, .per_pair = 1 };
        assert_true(pump(f, 1, 10 * SEC, all_messages, &w));
        for (unsigned i = 0; i < n; i++)
                for (unsigned j = 0; j < n; j++)
                        if (i != j) {
                                assert_int_equal(f->nodes[j].n_messages[i], 1);
                                assert_int_equal(f->nodes[j].msg_len[i], expected_len[i][j]);
                                assert_memory_equal(f->nodes[j].msg[i], expected[i][j], expected_len[i][j]);
                        }

        assert_int_equal(send_request(&f->nodes[0], 1, 0, (size_t) 1 << 20, &big, &big_len), 0);
        assert_true(pump(f, 1, 10 * SEC, b_has_two_from_a, NULL));
        assert_int_equal(f->nodes[1].msg_len[0], big_len);
        assert_memory_equal(f->nodes[1].msg[0], big, big_len);

        /* Over the frame limit: refused, the link stays. */
        {
                Weightd__Cluster__V1__Abort a = WEIGHTD__CLUSTER__V1__ABORT__INIT;
                ClusterEnvelope env = WEIGHTD__CLUSTER__V1__ENVELOPE__INIT;
                char *msg = malloc(MESH_MAX_FRAME + 1);

                assert_non_null(msg);
                memset(msg, 'x', MESH_MAX_FRAME);
                msg[MESH_MAX_FRAME] = 0;
                a.message = msg;
                env.body_case = WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_ABORT;
                env.abort = &a;
                assert_int_equal(tnode_send(&f->nodes[0], 2, &env), -EMSGSIZE);
                free(msg);
                /* Hello and Heartbeat are the mesh's own. */
                Weightd__Cluster__V1__Hello h = WEIGHTD__CLUSTER__V1__HELLO__INIT;
                env.body_case = WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_HELLO;
                env.hello = &h;
                assert_int_equal(tnode_send(&f->nodes[0], 2, &env), -EINVAL);
                assert_true(mesh_node_up(f->nodes[0].mesh, 2));
        }

        /* Heartbeats measured a round trip; counters moved. */
        for (unsigned i = 0; i < n; i++)
                for (unsigned j = 0; j < n; j++) {
                        MeshNodeInfo info;

                        if (i == j)
                                continue;
                        mesh_node_info(f->nodes[i].mesh, j, &info);
                        assert_true(info.rtt_usec > 0);
                        assert_true(info.rtt_usec < 5 * SEC);
                        assert_true(info.frames_sent >= 2);     /* Hello, a heartbeat, ... */
                        assert_true(info.frames_received >= 3); /* Hello, a heartbeat, the request */
                }

        for (unsigned i = 0; i < n; i++)
                for (unsigned j = 0; j < n; j++)
                        free(expected[i][j]);
        free(big);
}

static void test_wrong_secret(void **state) {
        Fixture *f = *state;
        StateWait want[] = {
                { 0, 2, MESH_NODE_UNAUTHENTICATED }, { 2, 0, MESH_NODE_UNAUTHENTICATED },
                { 1, 2, MESH_NODE_UNAUTHENTICATED }, { 2, 1, MESH_NODE_UNAUTHENTICATED },
                { 0, 1, MESH_NODE_UP },              { 1, 0, MESH_NODE_UP },
                { 0, 0, _MESH_NODE_STATE_MAX },
        };

        make_specs(f, 3);
        tnode_must_start(&f->nodes[0], &f->loops[0], "a", f->specs, 3, secret, LONG_DEADLINE, 11);
        tnode_must_start(&f->nodes[1], &f->loops[0], "b", f->specs, 3, secret, LONG_DEADLINE, 12);
        tnode_must_start(&f->nodes[2], &f->loops[0], "c", f->specs, 3, wrong_secret, LONG_DEADLINE, 13);
        assert_true(pump(f, 1, 10 * SEC, states_are, want));
        /* Redials keep failing the same way, and nothing goes through. */
        (void) pump(f, 1, 500 * MSEC, never, NULL);
        assert_true(states_are(f, want));

        for (unsigned i = 0; i < 2; i++) {
                MeshNodeInfo info;
                uint8_t *p = NULL;
                size_t len;

                mesh_node_info(f->nodes[i].mesh, 2, &info);
                assert_non_null(strstr(info.last_error, "TLS handshake failed"));
                assert_int_equal(info.frames_sent + info.frames_received, 0);
                mesh_node_info(f->nodes[2].mesh, i, &info);
                assert_non_null(strstr(info.last_error, "TLS handshake failed"));
                assert_int_equal(info.frames_sent + info.frames_received, 0);
                assert_int_equal(count_events(&f->nodes[i], 'u', 2), 0);
                assert_int_equal(count_events(&f->nodes[2], 'u', i), 0);
                assert_int_equal(send_request(&f->nodes[i], 2, i, 10, &p, &len), -ENOTCONN);
                free(p);
        }
        assert_int_equal(f->nodes[2].n_events, 0);
        assert_int_equal(f->nodes[2].n_messages[0] + f->nodes[2].n_messages[1], 0);
        assert_int_equal(count_events(&f->nodes[0], 'u', 1), 1);
}

static void test_mismatch(void **state) {
        Fixture *f = *state;
        StateWait want[] = {
                { 0, 1, MESH_NODE_MISMATCH },
                { 1, 0, MESH_NODE_MISMATCH },
                { 0, 0, _MESH_NODE_STATE_MAX },
        };
        MeshNodeInfo info;

        /* a knows a and b; b knows a, b and c (never started). */
        make_specs(f, 3);
        tnode_must_start(&f->nodes[0], &f->loops[0], "a", f->specs, 2, secret, LONG_DEADLINE, 21);
        tnode_must_start(&f->nodes[1], &f->loops[0], "b", f->specs, 3, secret, LONG_DEADLINE, 22);
        assert_true(pump(f, 1, 10 * SEC, states_are, want));
        (void) pump(f, 1, 300 * MSEC, never, NULL);
        assert_true(states_are(f, want));
        mesh_node_info(f->nodes[0].mesh, 1, &info);
        assert_non_null(strstr(info.last_error, "nodes list differs"));
        mesh_node_info(f->nodes[1].mesh, 0, &info);
        assert_non_null(strstr(info.last_error, "nodes list differs"));
        assert_int_equal(f->nodes[0].n_events + f->nodes[1].n_events, 0);
        assert_int_equal(state_of(&f->nodes[1], 2), MESH_NODE_DOWN);
}

static void test_deadline_and_restart(void **state) {
        Fixture *f = *state;
        const uint64_t deadline = 400 * MSEC;
        unsigned two = 2;
        uint64_t t0, elapsed;
        const Event *e;

        /* b watches on loops[0]; a, the dialer, runs on loops[1]. */
        make_specs(f, 2);
        tnode_must_start(&f->nodes[1], &f->loops[0], "b", f->specs, 2, secret, deadline, 0xb1);
        tnode_must_start(&f->nodes[0], &f->loops[1], "a", f->specs, 2, secret, deadline, 0xa1);
        assert_true(pump(f, 3, 5 * SEC, all_up, &two));
        /* Up for a while: heartbeats keep it so. */
        (void) pump(f, 3, 2 * deadline, never, NULL);
        assert_true(all_up(f, &two));
        assert_int_equal(count_events(&f->nodes[1], 'd', 0), 0);

        /* a stops answering (its loop no longer runs). */
        t0 = now_usec();
        EventWait down = { .node = 1, .kind = 'd', .peer = 0, .count = 1 };
        assert_true(pump(f, 1, 3 * deadline, has_events, &down));
        elapsed = now_usec() - t0;
        fprintf(stderr, "# down after %" PRIu64 " ms (deadline %" PRIu64 " ms)\n", elapsed / MSEC, deadline / MSEC);
        assert_true(elapsed >= deadline / 2);
        assert_true(elapsed <= deadline + 300 * MSEC);
        e = last_event(&f->nodes[1], 0);
        assert_int_equal(e->kind, 'd');
        assert_int_equal(e->generation, 0xa1);
        assert_non_null(strstr(e->why, "nothing received"));
        assert_int_equal(state_of(&f->nodes[1], 0), MESH_NODE_DOWN);

        /* a restarts with a new generation on the same address. */
        tnode_reset(&f->nodes[0]);
        (void) uv_run(&f->loops[1], UV_RUN_DEFAULT);
        tnode_must_start(&f->nodes[0], &f->loops[1], "a", f->specs, 2, secret, deadline, 0xa2);
        EventWait up = { .node = 1, .kind = 'u', .peer = 0, .count = 2 };
        assert_true(pump(f, 3, 5 * SEC, has_events, &up));
        assert_true(pump(f, 3, 5 * SEC, all_up, &two));
        assert_int_equal(last_event(&f->nodes[1], 0)->generation, 0xa2);
        assert_int_equal(f->nodes[1].n_events, 3); /* up a1, down a1, up a2 */
        MeshNodeInfo info;
        mesh_node_info(f->nodes[1].mesh, 0, &info);
        assert_int_equal(info.generation, 0xa2);

        /* b is the dialer's peer here; the other way round: b stops, a (the
         * dialer) notices, redials in vain while b is stopped, and gets it
         * back once b runs again. */
        t0 = now_usec();
        EventWait a_down = { .node = 0, .kind = 'd', .peer = 1, .count = 1 };
        assert_true(pump(f, 2, 3 * deadline, has_events, &a_down));
        elapsed = now_usec() - t0;
        assert_true(elapsed <= deadline + 300 * MSEC);
        (void) pump(f, 2, deadline, never, NULL); /* a's redials time out */
        /* b saw nothing (its loop did not run): its link to a is "up" and
         * receives a's new connection, generation a2 again. */
        EventWait a_up = { .node = 0, .kind = 'u', .peer = 1, .count = 2 };
        assert_true(pump(f, 3, 5 * SEC, has_events, &a_up));
        assert_true(pump(f, 3, 5 * SEC, all_up, &two));
        assert_int_equal(f->nodes[0].n_events, 3);
}

static void test_hostile_frames(void **state) {
        Fixture *f = *state;
        uint8_t over[4], garbage[4 + 8], early[64];
        unsigned n_down = 0;

        /* b accepts (a sorts first); the rogue plays a. */
        make_specs(f, 2);
        uint64_t hash = mesh_nodes_hash(f->specs, 2);
        tnode_must_start(&f->nodes[1], &f->loops[0], "b", f->specs, 2, secret, LONG_DEADLINE, 0xb);
        TNode *b = &f->nodes[1];

        /* An announced length over MESH_MAX_FRAME after a good Hello. */
        {
                uint32_t len = MESH_MAX_FRAME + 1;
                over[0] = (uint8_t) len;
                over[1] = (uint8_t) (len >> 8);
                over[2] = (uint8_t) (len >> 16);
                over[3] = (uint8_t) (len >> 24);
        }
        /* Garbage: 8 bytes that are no Envelope. */
        memcpy(garbage, (uint8_t[]){ 8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff }, sizeof(garbage));
        struct {
                const char *name;
                const uint8_t *extra;
                size_t len;
                const char *why;
        } cases[] = {
                { "over the limit", over, sizeof(over), "over the limit" },
                { "garbage", garbage, sizeof(garbage), "malformed" },
        };
        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                Rogue r = { .port = f->specs[1].port, .identity = "a", .key = secret, .send_hello = true,
                            .generation = 100 + i, .nodes_hash = hash, .extra = cases[i].extra,
                            .extra_len = cases[i].len };
                EventWait w = { .node = 1, .kind = 'd', .peer = 0, .count = ++n_down };

                rogue_start(&r);
                assert_true(pump(f, 1, 10 * SEC, has_events, &w));
                assert_true(pump(f, 1, 10 * SEC, rogue_closed, &r));
                rogue_join(f, &r);
                assert_int_equal(atomic_load(&r.handshake), 1);
                assert_true(atomic_load(&r.closed));
                const Event *e = last_event(b, 0);
                assert_int_equal(e->kind, 'd');
                assert_int_equal(e->generation, 100 + i);
                if (!strstr(e->why, cases[i].why))
                        fail_msg("%s: down because \"%s\"", cases[i].name, e->why);
        }

        /* A frame before Hello: closed, never up. */
        {
                Weightd__Cluster__V1__Abort a = WEIGHTD__CLUSTER__V1__ABORT__INIT;
                ClusterEnvelope env = WEIGHTD__CLUSTER__V1__ENVELOPE__INIT;
                size_t n;

                a.plan_id = 7;
                a.message = "early";
                env.body_case = WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_ABORT;
                env.abort = &a;
                n = weightd__cluster__v1__envelope__get_packed_size(&env);
                early[0] = (uint8_t) n;
                early[1] = early[2] = early[3] = 0;
                weightd__cluster__v1__envelope__pack(&env, early + 4);
                Rogue r = { .port = f->specs[1].port, .identity = "a", .key = secret, .extra = early, .extra_len = n + 4 };
                rogue_start(&r);
                assert_true(pump(f, 1, 10 * SEC, rogue_closed, &r));
                rogue_join(f, &r);
                assert_true(atomic_load(&r.closed));
                assert_int_equal(count_events(b, 'u', 0), 2);
                MeshNodeInfo info;
                mesh_node_info(b->mesh, 0, &info);
                assert_non_null(strstr(info.last_error, "before Hello"));
        }

        /* An identity b does not know, and one that must not dial b (b
         * itself): refused in the handshake; no state changes. */
        const char *identities[] = { "mallory", "b" };
        for (size_t i = 0; i < ELEMENTSOF(identities); i++) {
                Rogue r = { .port = f->specs[1].port, .identity = identities[i], .key = secret, .send_hello = true,
                            .generation = 5, .nodes_hash = hash };

                rogue_start(&r);
                assert_true(pump(f, 1, 10 * SEC, rogue_handshake_ended, &r));
                rogue_join(f, &r);
                assert_int_equal(atomic_load(&r.handshake), -1);
        }
        assert_int_equal(count_events(b, 'u', 0), 2);

        /* A restarted a whose old connection never closed: down, then up. */
        {
                Rogue r1 = { .port = f->specs[1].port, .identity = "a", .key = secret, .send_hello = true,
                             .generation = 0x111, .nodes_hash = hash };
                Rogue r2 = r1;
                EventWait up1 = { .node = 1, .kind = 'u', .peer = 0, .count = 3 };
                EventWait up2 = { .node = 1, .kind = 'u', .peer = 0, .count = 4 };

                r2.generation = 0x222;
                rogue_start(&r1);
                assert_true(pump(f, 1, 10 * SEC, has_events, &up1));
                rogue_start(&r2);
                assert_true(pump(f, 1, 10 * SEC, has_events, &up2));
                assert_true(pump(f, 1, 10 * SEC, rogue_closed, &r1));
                unsigned k = b->n_events;
                assert_int_equal(b->events[k - 2].kind, 'd');
                assert_int_equal(b->events[k - 2].generation, 0x111);
                assert_non_null(strstr(b->events[k - 2].why, "replaced"));
                assert_int_equal(b->events[k - 1].kind, 'u');
                assert_int_equal(b->events[k - 1].generation, 0x222);
                assert_true(mesh_node_up(b->mesh, 0));
                rogue_join(f, &r1);
                rogue_join(f, &r2);
                EventWait d = { .node = 1, .kind = 'd', .peer = 0, .count = 4 };
                assert_true(pump(f, 1, 10 * SEC, has_events, &d));
        }

        /* A reader that stalls: mesh_send() queues past MESH_MAX_QUEUED,
         * refuses, and the link is closed from the loop, not inside. */
        {
                Rogue r = { .port = f->specs[1].port, .identity = "a", .key = secret, .send_hello = true,
                            .generation = 0x333, .nodes_hash = hash, .no_read = true };
                EventWait up = { .node = 1, .kind = 'u', .peer = 0, .count = 5 };
                EventWait down = { .node = 1, .kind = 'd', .peer = 0, .count = 5 };
                Weightd__Cluster__V1__PlanRequest req = WEIGHTD__CLUSTER__V1__PLAN_REQUEST__INIT;
                ClusterEnvelope env = WEIGHTD__CLUSTER__V1__ENVELOPE__INIT;
                uint8_t *manifest = calloc(1, MESH_MAX_FRAME - 64);
                unsigned sent = 0;
                int k;

                assert_non_null(manifest);
                req.manifest = (ProtobufCBinaryData){ .len = MESH_MAX_FRAME - 64, .data = manifest };
                env.body_case = WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_PLAN_REQUEST;
                env.plan_request = &req;
                rogue_start(&r);
                assert_true(pump(f, 1, 10 * SEC, has_events, &up));
                while ((k = tnode_send(b, 0, &env)) == 0)
                        sent++;
                assert_int_equal(k, -ENOTCONN);
                assert_int_equal(sent, 16); /* 16 frames of 4 MiB - 50 bytes fit, the 17th does not */
                assert_false(mesh_node_up(b->mesh, 0));
                assert_int_equal(count_events(b, 'd', 0), 4); /* not yet */
                assert_true(pump(f, 1, 10 * SEC, has_events, &down));
                assert_non_null(strstr(last_event(b, 0)->why, "stalled"));
                free(manifest);
                rogue_join(f, &r);
        }

        /* b carried on: the real a comes up. */
        tnode_must_start(&f->nodes[0], &f->loops[0], "a", f->specs, 2, secret, LONG_DEADLINE, 0xa);
        unsigned two = 2;
        assert_true(pump(f, 1, 10 * SEC, all_up, &two));
        assert_int_equal(last_event(b, 0)->generation, 0xa);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_api, setup, teardown),
                cmocka_unit_test_setup_teardown(test_three_nodes, setup, teardown),
                cmocka_unit_test_setup_teardown(test_wrong_secret, setup, teardown),
                cmocka_unit_test_setup_teardown(test_mismatch, setup, teardown),
                cmocka_unit_test_setup_teardown(test_deadline_and_restart, setup, teardown),
                cmocka_unit_test_setup_teardown(test_hostile_frames, setup, teardown),
        };
        uint8_t warm[8];

        if (getenv("WD_TEST_DEBUG"))
                log_set_max_level(LOG_LEVEL_DEBUG);
        uv_loop_t loop;

        /* What libuv (its signal lock pipe) and OpenSSL open once per
         * process, before the tests count descriptors. */
        assert_int_equal(uv_loop_init(&loop), 0);
        assert_int_equal(uv_loop_close(&loop), 0);
        OPENSSL_init_ssl(0, NULL);
        (void) RAND_bytes(warm, sizeof(warm));
        return cmocka_run_group_tests(tests, NULL, NULL);
}
