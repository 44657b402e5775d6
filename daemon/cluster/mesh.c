/* The mesh (see mesh.h): one TLS 1.3 link per pair of nodes, driven by a
 * uv_poll_t on a non-blocking socket, with OpenSSL reading and writing the
 * socket through a small BIO of ours (send() with MSG_NOSIGNAL, so a peer
 * that left never raises SIGPIPE).
 *
 * Authentication: the PSK is SHA-256("weightd cluster psk v1" || secret),
 * used as the master key of an SSL_SESSION for TLS_AES_128_GCM_SHA256; the
 * dialer offers it under its own node name (SSL_CTX_set_psk_use_session_
 * callback), the acceptor looks the name up among the nodes that dial it
 * (SSL_CTX_set_psk_find_session_callback) and refuses any other.  TLS 1.3
 * only, psk_dhe_ke (forward secrecy), no certificates, no tickets.  A PSK
 * binder that does not verify (a different secret) fails the handshake with
 * an alert on both ends: MESH_NODE_UNAUTHENTICATED.
 *
 * A link goes CONNECTING (dialer only) -> TLS -> HELLO -> UP.  Each end
 * flushes its Hello as soon as the handshake is done, before it reads the
 * other's, so that a refused Hello (MESH_NODE_MISMATCH) is seen by both.
 * One timer per link bounds the handshake and the Hello to the deadline,
 * then sends heartbeats every deadline/4 and closes the link when nothing
 * came for the deadline.
 *
 * Frames: u32 little-endian length + one weightd.cluster.v1.Envelope, at
 * most MESH_MAX_FRAME.  The length is checked before anything is allocated,
 * and protobuf-c unpacks under a heap budget (8 bytes per frame byte +
 * 64 KiB) as in proto/wire.c.  One read pass takes at most READ_MAX_FRAMES
 * frames or READ_MAX_BYTES bytes; the rest waits for the ready list, a
 * uv_check_t (with a uv_idle_t so the loop does not block meanwhile), which
 * also runs the closes that mesh_send() decides but must not perform:
 * callbacks never run inside mesh_send() or mesh_new().
 *
 * Lifetime: the Mesh embeds its check, idle, listener poll and one redial
 * timer per node, and is freed when the last of them is closed.  A Link
 * embeds a poll and a timer and is freed when both are closed; its close
 * callbacks touch nothing of the Mesh, which may be gone by then.  A
 * pending host name resolution is orphaned by mesh_free() and frees itself.
 * Callbacks may call mesh_free() or mesh_send(): after each one the caller
 * checks whether its link or the mesh is closing. */
#include <arpa/inet.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <xxhash.h>

#include "cluster/mesh.h"
#include "util/list.h"
#include "util/log.h"
#include "util/time-util.h"
#include "wire.h"

#define PSK_LABEL "weightd cluster psk v1"
#define PSK_SIZE 32u
#define HEADER_SIZE 4u
#define BACKOFF_MIN_USEC UINT64_C(100000)
#define READ_MAX_FRAMES 64u
#define READ_MAX_BYTES ((size_t) 4 << 20)
#define UNPACK_BUDGET(len) ((size_t) 8 * (size_t) (len) + ((size_t) 64 << 10))
#define MAX_NAME 255u
#define ERROR_MAX 256u
#define ADDRESS_MAX (INET6_ADDRSTRLEN + 16)

typedef struct Link Link;
typedef struct MeshNode MeshNode;
typedef struct Resolve Resolve;

typedef struct OutFrame OutFrame;
struct OutFrame {
        OutFrame *next;
        size_t len, off;
        uint8_t buf[];
};

typedef enum LinkState {
        LINK_CONNECTING, /* TCP connect in progress (dialer) */
        LINK_TLS,        /* TLS handshake */
        LINK_HELLO,      /* our Hello sent, waiting for theirs */
        LINK_UP,
} LinkState;

struct Link {
        Mesh *mesh;
        LIST_FIELDS(Link, links);
        LIST_FIELDS(Link, ready);
        int node;    /* index, or -1 while an accepted link has not named itself */
        bool dialer; /* we dialed it */
        LinkState state;
        int fd;
        SSL *ssl;
        uv_poll_t poll;
        uv_timer_t timer;
        unsigned n_handles; /* open ones; the link goes with the last */
        int events;
        bool closing, close_pending, on_ready, read_more, want_write, pending_counted;
        bool eof;     /* the BIO saw the end of the stream */
        int io_error; /* the BIO's errno, 0 if none */
        uint64_t started_usec, last_rx_usec, next_heartbeat_usec;
        OutFrame *out_head, *out_tail;
        size_t out_bytes;
        uint8_t header[HEADER_SIZE];
        size_t header_got;
        uint8_t *in_buf;
        size_t in_len, in_got;
        char why[ERROR_MAX]; /* for close_pending */
        char address[ADDRESS_MAX];
};

struct Resolve {
        uv_getaddrinfo_t req;
        MeshNode *node; /* NULL once orphaned by mesh_free() */
};

struct MeshNode {
        Mesh *mesh;
        unsigned index;
        char *name, *host;
        uint16_t port;
        bool dialer; /* we dial it */
        MeshNodeState state;
        uint64_t generation, rtt_usec, since_usec, frames_sent, frames_received;
        char last_error[ERROR_MAX];
        Link *link;        /* the one link that counts: up, or being dialed */
        bool reported_up;  /* ops->up called, ops->down not yet */
        uint64_t up_generation;
        uint64_t backoff_usec;
        uv_timer_t redial;
        Resolve *resolve;
};

struct Mesh {
        uv_loop_t *loop;
        const MeshOps *ops;
        void *userdata;
        MeshNode *nodes;
        unsigned n_nodes, self;
        uint64_t deadline_usec, generation, nodes_hash;
        uint8_t *data_address;
        size_t data_address_len;
        uint8_t psk[PSK_SIZE];
        SSL_CTX *ssl_ctx;
        int listen_fd;
        uv_poll_t listen_poll;
        uv_check_t check;
        uv_idle_t idle;
        unsigned n_handles; /* open ones; the mesh goes with the last */
        bool closing;
        Link *links;
        Link *ready;
        unsigned n_pending; /* accepted links not up yet */
};

static const char *const state_names[_MESH_NODE_STATE_MAX] = {
        [MESH_NODE_SELF] = "self",
        [MESH_NODE_DOWN] = "down",
        [MESH_NODE_UP] = "up",
        [MESH_NODE_UNAUTHENTICATED] = "unauthenticated",
        [MESH_NODE_MISMATCH] = "mismatch",
};

const char *mesh_node_state_to_string(MeshNodeState s) {
        return (unsigned) s < _MESH_NODE_STATE_MAX ? state_names[s] : NULL;
}

static uint32_t get_le32(const uint8_t *p) {
        return (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24;
}

/* The body of a oneof: every member of the union is a message pointer. */
static const void *envelope_body(const ClusterEnvelope *env) {
        return env->hello;
}

static uint64_t usec_to_msec_up(uint64_t usec) {
        return (usec + 999) / 1000;
}

uint64_t mesh_nodes_hash(const MeshNodeSpec *nodes, size_t n_nodes) {
        /* Chained: each field hashed with the previous hash as the seed,
         * strings with their NUL so that boundaries are unambiguous. */
        uint64_t h = UINT64_C(0x77656967687464), n = n_nodes;
        uint8_t le[8];

        for (unsigned i = 0; i < 8; i++)
                le[i] = (uint8_t) (n >> (8 * i));
        h = XXH3_64bits_withSeed(le, sizeof(le), h);
        for (size_t i = 0; i < n_nodes; i++) {
                const char *name = nodes[i].name ? nodes[i].name : "";
                const char *host = nodes[i].host ? nodes[i].host : "";
                uint8_t port[2] = { (uint8_t) nodes[i].port, (uint8_t) (nodes[i].port >> 8) };

                h = XXH3_64bits_withSeed(name, strlen(name) + 1, h);
                h = XXH3_64bits_withSeed(host, strlen(host) + 1, h);
                h = XXH3_64bits_withSeed(port, sizeof(port), h);
        }
        return h;
}

/* ---- the socket BIO ------------------------------------------------------ */

static int fdbio_write(BIO *b, const char *buf, int len) {
        Link *l = BIO_get_data(b);
        ssize_t n;

        BIO_clear_retry_flags(b);
        if (len <= 0)
                return 0;
        n = send(l->fd, buf, (size_t) len, MSG_NOSIGNAL);
        if (n < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                        BIO_set_retry_write(b);
                else
                        l->io_error = errno;
                return -1;
        }
        return (int) n;
}

static int fdbio_read(BIO *b, char *buf, int len) {
        Link *l = BIO_get_data(b);
        ssize_t n;

        BIO_clear_retry_flags(b);
        if (len <= 0)
                return 0;
        n = recv(l->fd, buf, (size_t) len, 0);
        if (n < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                        BIO_set_retry_read(b);
                else
                        l->io_error = errno;
                return -1;
        }
        if (n == 0)
                l->eof = true;
        return (int) n;
}

static long fdbio_ctrl(BIO *b, int cmd, long num, void *ptr) {
        return cmd == BIO_CTRL_FLUSH ? 1 : 0;
}

static int fdbio_create(BIO *b) {
        BIO_set_init(b, 1);
        return 1;
}

static BIO_METHOD *fdbio_method;
static pthread_once_t fdbio_once = PTHREAD_ONCE_INIT;

/* Made once per process and kept: BIOs are freed in close callbacks that
 * may run after the mesh that made them is gone. */
static void fdbio_method_init(void) {
        BIO_METHOD *bm = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "weightd mesh socket");

        if (!bm)
                return;
        if (!BIO_meth_set_write(bm, fdbio_write) || !BIO_meth_set_read(bm, fdbio_read) ||
            !BIO_meth_set_ctrl(bm, fdbio_ctrl) || !BIO_meth_set_create(bm, fdbio_create)) {
                BIO_meth_free(bm);
                return;
        }
        fdbio_method = bm;
}

/* ---- TLS ---------------------------------------------------------------- */

static const unsigned char tls_aes_128_gcm_sha256[] = { 0x13, 0x01 };

static SSL_SESSION *psk_session_new(Mesh *m, SSL *ssl) {
        const SSL_CIPHER *cipher = SSL_CIPHER_find(ssl, tls_aes_128_gcm_sha256);
        SSL_SESSION *s;

        if (!cipher)
                return NULL;
        s = SSL_SESSION_new();
        if (!s)
                return NULL;
        if (!SSL_SESSION_set1_master_key(s, m->psk, sizeof(m->psk)) || !SSL_SESSION_set_cipher(s, cipher) ||
            !SSL_SESSION_set_protocol_version(s, TLS1_3_VERSION)) {
                SSL_SESSION_free(s);
                return NULL;
        }
        return s;
}

/* Dialer: offer the PSK under our name.  OpenSSL owns *sess afterwards
 * (a new one on each call). */
static int psk_use_session_cb(SSL *ssl, const EVP_MD *md, const unsigned char **id, size_t *idlen,
                              SSL_SESSION **sess) {
        Link *l = SSL_get_app_data(ssl);
        Mesh *m = l->mesh;
        const char *self = m->nodes[m->self].name;
        SSL_SESSION *s;

        if (md && EVP_MD_get_type(md) != NID_sha256) {
                /* A HelloRetryRequest chose another hash: no PSK fits. */
                *sess = NULL;
                *id = NULL;
                *idlen = 0;
                return 1;
        }
        s = psk_session_new(m, ssl);
        if (!s)
                return 0;
        *sess = s;
        *id = (const unsigned char *) self;
        *idlen = strlen(self);
        return 1;
}

/* Acceptor: the identity is the dialer's name; only a node whose name
 * sorts before ours dials us. */
static int psk_find_session_cb(SSL *ssl, const unsigned char *identity, size_t identity_len, SSL_SESSION **sess) {
        Link *l = SSL_get_app_data(ssl);
        Mesh *m = l->mesh;
        SSL_SESSION *s;

        *sess = NULL;
        if (l->dialer)
                return 0;
        for (unsigned i = 0; i < m->n_nodes; i++) {
                MeshNode *n = &m->nodes[i];

                if (i == m->self || strlen(n->name) != identity_len || memcmp(n->name, identity, identity_len) != 0)
                        continue;
                if (n->dialer) /* we dial it, it must not dial us */
                        break;
                s = psk_session_new(m, ssl);
                if (!s)
                        return 0;
                l->node = (int) i;
                *sess = s;
                return 1;
        }
        {
                char esc[2 * MAX_NAME];

                wd_escape(esc, sizeof(esc), (const char *) identity, MIN(identity_len, (size_t) 64));
                log_debug("cluster: connection from %s: unknown node \"%s\", refused", l->address, esc);
        }
        return 0;
}

static int ssl_ctx_new(Mesh *m, SSL_CTX **ret, WdError *err) {
        SSL_CTX *ctx = SSL_CTX_new(TLS_method());

        if (!ctx)
                return wd_error_set(err, -ENOMEM, "cannot create the TLS context");
        if (!SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) || !SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION) ||
            !SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256") || !SSL_CTX_set_num_tickets(ctx, 0)) {
                SSL_CTX_free(ctx);
                ERR_clear_error();
                return wd_error_set(err, -ENOTSUP, "cannot configure TLS 1.3 with TLS_AES_128_GCM_SHA256");
        }
        SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
        SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
        SSL_CTX_set_psk_use_session_callback(ctx, psk_use_session_cb);
        SSL_CTX_set_psk_find_session_callback(ctx, psk_find_session_cb);
        *ret = ctx;
        return 0;
}

static int psk_derive(const uint8_t *secret, size_t secret_len, uint8_t out[PSK_SIZE]) {
        EVP_MD_CTX *c = EVP_MD_CTX_new();
        unsigned len = 0;
        int ok;

        if (!c)
                return -ENOMEM;
        ok = EVP_DigestInit_ex(c, EVP_sha256(), NULL) && EVP_DigestUpdate(c, PSK_LABEL, strlen(PSK_LABEL)) &&
             EVP_DigestUpdate(c, secret, secret_len) && EVP_DigestFinal_ex(c, out, &len) && len == PSK_SIZE;
        EVP_MD_CTX_free(c);
        ERR_clear_error();
        return ok ? 0 : -EIO;
}

/* The reason of the oldest queued OpenSSL error (the queue is emptied). */
static const char *ssl_reason(char *buf, size_t size) {
        unsigned long e = ERR_get_error();
        const char *s = e ? ERR_reason_error_string(e) : NULL;

        ERR_clear_error();
        if (s)
                snprintf(buf, size, "%s", s);
        else if (e)
                snprintf(buf, size, "OpenSSL error %lx", e);
        else
                snprintf(buf, size, "unknown TLS error");
        return buf;
}

/* ---- nodes -------------------------------------------------------------- */

static void node_set_state(MeshNode *n, MeshNodeState s) {
        if (n->state == s)
                return;
        n->state = s;
        n->since_usec = now_usec();
}

static bool link_is_up(const Link *l) {
        return l && l->state == LINK_UP && !l->closing && !l->close_pending;
}

static void node_dial(MeshNode *n);

static void on_redial(uv_timer_t *t) {
        MeshNode *n = container_of(t, MeshNode, redial);

        if (n->mesh->closing || n->link || n->resolve)
                return;
        node_dial(n);
}

static void node_schedule_redial(MeshNode *n) {
        Mesh *m = n->mesh;
        uint64_t cap = MAX(m->deadline_usec / 2, (uint64_t) 1000);
        uint64_t delay = MIN(n->backoff_usec, cap);

        if (m->closing)
                return;
        n->backoff_usec = MIN(delay * 2, cap);
        (void) uv_timer_start(&n->redial, on_redial, usec_to_msec_up(delay), 0);
}

/* A dial that failed before a link existed. */
static void node_dial_failed(MeshNode *n, const char *fmt, ...) _printf_(2, 3);
static void node_dial_failed(MeshNode *n, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(n->last_error, sizeof(n->last_error), fmt, ap);
        va_end(ap);
        log_debug("cluster: node %s: %s", n->name, n->last_error);
        if (n->state != MESH_NODE_UNAUTHENTICATED && n->state != MESH_NODE_MISMATCH)
                node_set_state(n, MESH_NODE_DOWN);
        node_schedule_redial(n);
}

/* ---- links: life and death ---------------------------------------------- */

static void link_free(Link *l) {
        while (l->out_head) {
                OutFrame *f = l->out_head;

                l->out_head = f->next;
                free(f);
        }
        free(l->in_buf);
        SSL_free(l->ssl); /* and the BIO */
        safe_close(l->fd);
        free(l);
}

static void on_link_handle_closed(uv_handle_t *h) {
        Link *l = h->data;

        if (--l->n_handles == 0)
                link_free(l);
}

static void on_idle(uv_idle_t *h) {
        /* Nothing: its being active makes the loop poll without blocking,
         * so the check runs at once. */
}

static void link_ready(Link *l) {
        Mesh *m = l->mesh;

        if (!l->on_ready) {
                LIST_PREPEND(ready, m->ready, l);
                l->on_ready = true;
        }
        (void) uv_idle_start(&m->idle, on_idle);
}

static void link_update_poll(Link *l);
static void link_io(Link *l);
static void on_link_timer(uv_timer_t *t);
static void on_link_poll(uv_poll_t *h, int status, int events);

static void link_arm_timer(Link *l, uint64_t at_usec) {
        uint64_t now = now_usec();

        (void) uv_timer_start(&l->timer, on_link_timer, usec_to_msec_up(at_usec > now ? at_usec - now : 0), 0);
}

/* Close l without any callback: its handles close, it leaves every list. */
static void link_close(Link *l) {
        Mesh *m = l->mesh;

        if (l->closing)
                return;
        l->closing = true;
        if (l->on_ready) {
                LIST_REMOVE(ready, m->ready, l);
                l->on_ready = false;
        }
        LIST_REMOVE(links, m->links, l);
        if (l->pending_counted) {
                m->n_pending--;
                l->pending_counted = false;
        }
        if (l->node >= 0 && m->nodes[l->node].link == l)
                m->nodes[l->node].link = NULL;
        if (l->state >= LINK_HELLO && !l->eof && l->io_error == 0) {
                /* A close_notify, best effort. */
                ERR_clear_error();
                (void) SSL_shutdown(l->ssl);
                ERR_clear_error();
        }
        uv_close((uv_handle_t *) &l->poll, on_link_handle_closed);
        uv_close((uv_handle_t *) &l->timer, on_link_handle_closed);
}

/* Close l and tell: the node's state (when l is the node's link, or the
 * node has none), its last error, a redial, and down when it was up.  The
 * callback comes last; the caller checks l->closing (now true) and
 * m->closing (the callback may have freed the mesh) before going on. */
static void link_fail(Link *l, MeshNodeState state, const char *fmt, ...) _printf_(3, 4);
static void link_fail(Link *l, MeshNodeState state, const char *fmt, ...) {
        Mesh *m = l->mesh;
        MeshNode *n;
        bool current, was_up;
        char why[ERROR_MAX];
        va_list ap;

        if (l->closing)
                return;
        va_start(ap, fmt);
        vsnprintf(why, sizeof(why), fmt, ap);
        va_end(ap);

        n = l->node >= 0 ? &m->nodes[l->node] : NULL;
        current = n && n->link == l;
        was_up = current && n->reported_up;
        link_close(l);
        if (!n) {
                log_debug("cluster: connection %s: %s", l->address, why);
                return;
        }
        if (current || !n->link) {
                MeshNodeState old = n->state;

                node_set_state(n, state);
                snprintf(n->last_error, sizeof(n->last_error), "%s", why);
                if (state == MESH_NODE_UNAUTHENTICATED && old != state)
                        log_warning("cluster: node %s at %s: %s", n->name, l->address, why);
                else if (state == MESH_NODE_MISMATCH && old != state)
                        log_warning("cluster: node %s at %s: %s, refusing the link", n->name, l->address, why);
                else
                        log_debug("cluster: node %s at %s: %s", n->name, l->address, why);
        } else
                log_debug("cluster: node %s at %s: another connection: %s", n->name, l->address, why);
        if (current && n->dialer)
                node_schedule_redial(n);
        if (was_up) {
                n->reported_up = false;
                if (m->ops->down)
                        m->ops->down(m, n->index, n->up_generation, why, m->userdata);
        }
}

/* For where callbacks must not run (mesh_send()): l stops now and is
 * closed from the ready list. */
static void link_close_deferred(Link *l, const char *why) {
        if (l->closing || l->close_pending)
                return;
        l->close_pending = true;
        snprintf(l->why, sizeof(l->why), "%s", why);
        if (l->events) {
                (void) uv_poll_stop(&l->poll);
                l->events = 0;
        }
        (void) uv_timer_stop(&l->timer);
        link_ready(l);
}

static void link_fail_io(Link *l, const char *what, int ssl_error) {
        char reason[ERROR_MAX];

        if (l->eof || ssl_error == SSL_ERROR_ZERO_RETURN)
                link_fail(l, MESH_NODE_DOWN, "connection closed by the peer");
        else if (l->io_error)
                link_fail(l, MESH_NODE_DOWN, "%s: %s", what, strerror(l->io_error));
        else if (ssl_error == SSL_ERROR_SSL)
                link_fail(l, MESH_NODE_DOWN, "%s: TLS: %s", what, ssl_reason(reason, sizeof(reason)));
        else
                link_fail(l, MESH_NODE_DOWN, "%s: TLS error %d", what, ssl_error);
        ERR_clear_error();
}

static int link_new(Mesh *m, int fd, int node, bool dialer, LinkState state, const char *address, Link **ret) {
        BIO *bio = NULL;
        Link *l;
        int r;

        l = calloc(1, sizeof(Link));
        if (!l) {
                safe_close(fd);
                return -ENOMEM;
        }
        l->mesh = m;
        l->fd = fd;
        l->node = node;
        l->dialer = dialer;
        l->state = state;
        l->started_usec = l->last_rx_usec = now_usec();
        snprintf(l->address, sizeof(l->address), "%s", address);
        l->ssl = SSL_new(m->ssl_ctx);
        if (l->ssl)
                bio = BIO_new(fdbio_method);
        if (!bio) {
                ERR_clear_error();
                link_free(l);
                return -ENOMEM;
        }
        BIO_set_data(bio, l);
        SSL_set_bio(l->ssl, bio, bio);
        SSL_set_app_data(l->ssl, l);
        if (dialer)
                SSL_set_connect_state(l->ssl);
        else
                SSL_set_accept_state(l->ssl);

        (void) uv_timer_init(m->loop, &l->timer);
        l->timer.data = l;
        l->n_handles = 1;
        r = uv_poll_init(m->loop, &l->poll, fd);
        if (r < 0) {
                l->closing = true;
                uv_close((uv_handle_t *) &l->timer, on_link_handle_closed);
                return r;
        }
        l->poll.data = l;
        l->n_handles = 2;
        LIST_PREPEND(links, m->links, l);
        link_arm_timer(l, l->started_usec + m->deadline_usec);
        link_update_poll(l);
        *ret = l;
        return 0;
}

/* ---- links: output ------------------------------------------------------ */

static int link_queue(Link *l, const ClusterEnvelope *env) {
        size_t n = weightd__cluster__v1__envelope__get_packed_size(env);
        OutFrame *f;

        if (n > MESH_MAX_FRAME)
                return -EMSGSIZE;
        f = malloc(sizeof(OutFrame) + HEADER_SIZE + n);
        if (!f)
                return -ENOMEM;
        f->next = NULL;
        f->len = HEADER_SIZE + n;
        f->off = 0;
        f->buf[0] = (uint8_t) n;
        f->buf[1] = (uint8_t) (n >> 8);
        f->buf[2] = (uint8_t) (n >> 16);
        f->buf[3] = (uint8_t) (n >> 24);
        weightd__cluster__v1__envelope__pack(env, f->buf + HEADER_SIZE);
        if (l->out_tail)
                l->out_tail->next = f;
        else
                l->out_head = f;
        l->out_tail = f;
        l->out_bytes += f->len;
        if (l->out_bytes > MESH_MAX_QUEUED) {
                char why[ERROR_MAX];

                snprintf(why, sizeof(why), "stalled: more than %u bytes queued", MESH_MAX_QUEUED);
                link_close_deferred(l, why);
                return -ENOTCONN;
        }
        return 0;
}

/* Write what TLS and the socket take.  Returns 0, or -ECONNRESET when l
 * was closed (with callbacks). */
static int link_flush(Link *l) {
        MeshNode *n = &l->mesh->nodes[l->node];

        while (l->out_head) {
                OutFrame *f = l->out_head;
                int k, e;

                ERR_clear_error();
                k = SSL_write(l->ssl, f->buf + f->off, (int) MIN(f->len - f->off, (size_t) INT_MAX));
                if (k > 0) {
                        f->off += (size_t) k;
                        l->out_bytes -= (size_t) k;
                        if (f->off == f->len) {
                                l->out_head = f->next;
                                if (!l->out_head)
                                        l->out_tail = NULL;
                                free(f);
                                n->frames_sent++;
                        }
                        continue;
                }
                e = SSL_get_error(l->ssl, k);
                if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ)
                        return 0;
                link_fail_io(l, "send", e);
                return -ECONNRESET;
        }
        return 0;
}

static int link_send_heartbeat(Link *l, uint64_t sent_usec, bool reply) {
        Weightd__Cluster__V1__Heartbeat hb = WEIGHTD__CLUSTER__V1__HEARTBEAT__INIT;
        ClusterEnvelope env = WEIGHTD__CLUSTER__V1__ENVELOPE__INIT;

        hb.sent_usec = sent_usec;
        hb.reply = reply;
        env.body_case = WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_HEARTBEAT;
        env.heartbeat = &hb;
        return link_queue(l, &env);
}

static int link_send_hello(Link *l, WdError *err) {
        Mesh *m = l->mesh;
        Weightd__Cluster__V1__Hello h = WEIGHTD__CLUSTER__V1__HELLO__INIT;
        ClusterEnvelope env = WEIGHTD__CLUSTER__V1__ENVELOPE__INIT;
        const void *addr = m->data_address;
        size_t addr_len = m->data_address_len;
        int r;

        if (m->ops->hello_address) {
                r = m->ops->hello_address(m, (unsigned) l->node, &addr, &addr_len, err, m->userdata);
                if (r < 0)
                        return r;
                if (addr_len > MESH_MAX_FRAME / 2)
                        return wd_error_set(err, -EMSGSIZE, "a %zu byte data address", addr_len);
        }
        h.version = MESH_VERSION;
        h.node = m->nodes[m->self].name;
        h.generation = m->generation;
        h.data_address.data = (uint8_t *) addr;
        h.data_address.len = addr_len;
        h.nodes_hash = m->nodes_hash;
        env.body_case = WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_HELLO;
        env.hello = &h;
        return link_queue(l, &env);
}

static void link_update_poll(Link *l) {
        int events;

        if (l->closing || l->close_pending)
                return;
        if (l->state == LINK_CONNECTING)
                events = UV_WRITABLE;
        else if (l->state == LINK_TLS)
                events = UV_READABLE | (l->want_write ? UV_WRITABLE : 0);
        else
                events = UV_READABLE | (l->out_head || l->want_write ? UV_WRITABLE : 0);
        if (events == l->events)
                return;
        l->events = events;
        (void) uv_poll_start(&l->poll, events, on_link_poll);
}

/* ---- links: input ------------------------------------------------------- */

static void node_up(Link *l, const Weightd__Cluster__V1__Hello *h) {
        Mesh *m = l->mesh;
        MeshNode *n = &m->nodes[l->node];
        uint64_t now;

        if (n->link && n->link != l) {
                /* The node dialed again (it restarted, or lost the old link
                 * before we noticed): the old one is down first. */
                link_fail(n->link, MESH_NODE_DOWN, "replaced by a new connection (generation %016" PRIx64 ")",
                          h->generation);
                if (l->closing || m->closing)
                        return;
        }
        if (l->pending_counted) {
                m->n_pending--;
                l->pending_counted = false;
        }
        n->link = l;
        l->state = LINK_UP;
        n->generation = n->up_generation = h->generation;
        n->reported_up = true;
        n->last_error[0] = 0;
        n->backoff_usec = BACKOFF_MIN_USEC;
        node_set_state(n, MESH_NODE_UP);

        now = now_usec();
        if (link_send_heartbeat(l, now, false) < 0)
                return;
        l->next_heartbeat_usec = now + MAX(m->deadline_usec / 4, (uint64_t) 1000);
        link_arm_timer(l, MIN(l->next_heartbeat_usec, l->last_rx_usec + m->deadline_usec));
        log_debug("cluster: node %s at %s is up, generation %016" PRIx64, n->name, l->address, h->generation);
        if (m->ops->up)
                m->ops->up(m, n->index, h->generation, h->data_address.data, h->data_address.len, m->userdata);
}

static void link_hello(Link *l, const Weightd__Cluster__V1__Hello *h) {
        Mesh *m = l->mesh;
        MeshNode *n = &m->nodes[l->node];

        if (!h) {
                link_fail(l, MESH_NODE_DOWN, "a malformed Hello");
                return;
        }
        if (h->version != MESH_VERSION) {
                link_fail(l, MESH_NODE_MISMATCH, "it speaks protocol version %" PRIu32 ", this node %u", h->version,
                          MESH_VERSION);
                return;
        }
        if (!h->node || strcmp(h->node, n->name) != 0) {
                char esc[2 * MAX_NAME];

                wd_escape(esc, sizeof(esc), h->node ? h->node : "", 64);
                link_fail(l, MESH_NODE_MISMATCH, "it calls itself \"%s\"", esc);
                return;
        }
        if (h->nodes_hash != m->nodes_hash) {
                link_fail(l, MESH_NODE_MISMATCH,
                          "its nodes list differs (hash %016" PRIx64 ", this node's %016" PRIx64 ")", h->nodes_hash,
                          m->nodes_hash);
                return;
        }
        if (h->generation == 0 || (h->data_address.len > 0 && !h->data_address.data)) {
                link_fail(l, MESH_NODE_DOWN, "a malformed Hello");
                return;
        }
        node_up(l, h);
}

static void link_heartbeat(Link *l, const Weightd__Cluster__V1__Heartbeat *hb) {
        MeshNode *n = &l->mesh->nodes[l->node];

        if (!hb) {
                link_fail(l, MESH_NODE_DOWN, "a malformed Heartbeat");
                return;
        }
        if (!hb->reply) {
                (void) link_send_heartbeat(l, hb->sent_usec, true);
                return;
        }
        uint64_t now = now_usec();
        if (hb->sent_usec > 0 && hb->sent_usec <= now)
                n->rtt_usec = now - hb->sent_usec;
}

static void link_dispatch(Link *l, const uint8_t *buf, size_t len) {
        Mesh *m = l->mesh;
        MeshNode *n = &m->nodes[l->node];
        /* protobuf-c's allocations charged against a budget, as for the
         * control API's requests (proto/wire.h). */
        WireHeapBudget budget = { .budget = UNPACK_BUDGET(len) };
        ProtobufCAllocator a = wire_bounded_allocator(&budget);
        ClusterEnvelope *env;

        env = weightd__cluster__v1__envelope__unpack(&a, len, buf);
        if (!env) {
                link_fail(l, MESH_NODE_DOWN, "a malformed frame of %zu bytes", len);
                return;
        }
        n->frames_received++;
        switch (env->body_case) {
        case WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_HELLO:
                if (l->state != LINK_HELLO)
                        link_fail(l, MESH_NODE_DOWN, "a second Hello");
                else
                        link_hello(l, env->hello);
                break;
        case WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_HEARTBEAT:
                if (l->state != LINK_UP)
                        link_fail(l, MESH_NODE_DOWN, "a frame before Hello");
                else
                        link_heartbeat(l, env->heartbeat);
                break;
        case WEIGHTD__CLUSTER__V1__ENVELOPE__BODY__NOT_SET:
                /* protobuf-c sets a case only for the fields it knows. */
                link_fail(l, MESH_NODE_DOWN, "a frame with no known body");
                break;
        default:
                if (l->state != LINK_UP)
                        link_fail(l, MESH_NODE_DOWN, "a frame before Hello");
                else if (!envelope_body(env))
                        link_fail(l, MESH_NODE_DOWN, "a frame without its body");
                else if (m->ops->message)
                        m->ops->message(m, n->index, env, m->userdata);
                break;
        }
        weightd__cluster__v1__envelope__free_unpacked(env, NULL);
}

/* Read and dispatch frames until the socket is drained, or the budget of
 * one pass is spent (then the ready list goes on). */
static void link_read(Link *l) {
        size_t bytes = 0;
        unsigned frames = 0;

        l->want_write = false;
        while (!l->closing && !l->close_pending) {
                bool complete = false;
                uint8_t *dst;
                size_t want;
                int k, e;

                if (frames >= READ_MAX_FRAMES || bytes >= READ_MAX_BYTES) {
                        link_ready(l);
                        return;
                }
                if (l->header_got < HEADER_SIZE) {
                        dst = l->header + l->header_got;
                        want = HEADER_SIZE - l->header_got;
                } else {
                        dst = l->in_buf + l->in_got;
                        want = l->in_len - l->in_got;
                }
                ERR_clear_error();
                k = SSL_read(l->ssl, dst, (int) MIN(want, (size_t) INT_MAX));
                if (k <= 0) {
                        e = SSL_get_error(l->ssl, k);
                        if (e == SSL_ERROR_WANT_READ)
                                return;
                        if (e == SSL_ERROR_WANT_WRITE) {
                                l->want_write = true;
                                return;
                        }
                        link_fail_io(l, "receive", e);
                        return;
                }
                bytes += (size_t) k;
                l->last_rx_usec = now_usec();
                if (l->header_got < HEADER_SIZE) {
                        uint32_t len;

                        l->header_got += (size_t) k;
                        if (l->header_got < HEADER_SIZE)
                                continue;
                        len = get_le32(l->header);
                        if (len > MESH_MAX_FRAME) {
                                link_fail(l, MESH_NODE_DOWN, "a frame of %" PRIu32 " bytes, over the limit of %u",
                                          len, MESH_MAX_FRAME);
                                return;
                        }
                        l->in_buf = malloc(len > 0 ? len : 1);
                        if (!l->in_buf) {
                                link_fail(l, MESH_NODE_DOWN, "out of memory for a frame of %" PRIu32 " bytes", len);
                                return;
                        }
                        l->in_len = len;
                        l->in_got = 0;
                        complete = len == 0;
                } else {
                        l->in_got += (size_t) k;
                        complete = l->in_got == l->in_len;
                }
                if (complete) {
                        _cleanup_free_ uint8_t *buf = TAKE_PTR(l->in_buf);
                        size_t len = l->in_len;

                        l->header_got = l->in_len = l->in_got = 0;
                        frames++;
                        link_dispatch(l, buf, len);
                }
        }
}

/* Read, then write what that queued. */
static void link_io(Link *l) {
        link_read(l);
        if (l->closing || l->close_pending)
                return;
        if (link_flush(l) < 0)
                return;
        link_update_poll(l);
}

/* ---- links: connecting and the handshake -------------------------------- */

static void link_handshake_done(Link *l) {
        WdError err = WD_ERROR_NULL;
        int r;

        if (!SSL_session_reused(l->ssl) || l->node < 0) {
                link_fail(l, MESH_NODE_UNAUTHENTICATED, "TLS handshake without the cluster key");
                return;
        }
        l->state = LINK_HELLO;
        r = link_send_hello(l, &err);
        if (r < 0) {
                link_fail(l, MESH_NODE_DOWN, "cannot queue Hello: %s", err.message[0] ? err.message : strerror(-r));
                return;
        }
        /* Out before theirs is read: a refused Hello still reaches them. */
        if (link_flush(l) < 0)
                return;
        link_io(l);
}

static void link_handshake(Link *l) {
        int r, e;

        l->want_write = false;
        ERR_clear_error();
        r = SSL_do_handshake(l->ssl);
        if (r == 1) {
                link_handshake_done(l);
                return;
        }
        e = SSL_get_error(l->ssl, r);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
                l->want_write = e == SSL_ERROR_WANT_WRITE;
                link_update_poll(l);
                return;
        }
        if (l->eof)
                link_fail(l, MESH_NODE_DOWN, "connection closed during the TLS handshake");
        else if (l->io_error)
                link_fail(l, MESH_NODE_DOWN, "TLS handshake: %s", strerror(l->io_error));
        else if (e == SSL_ERROR_SSL) {
                char reason[ERROR_MAX];

                /* A binder that does not verify (a different secret), or
                 * an identity the acceptor does not take. */
                link_fail(l, MESH_NODE_UNAUTHENTICATED, "TLS handshake failed (%s): a different cluster secret?",
                          ssl_reason(reason, sizeof(reason)));
        } else
                link_fail(l, MESH_NODE_DOWN, "TLS handshake failed (error %d)", e);
        ERR_clear_error();
}

static void link_connected(Link *l) {
        int error = 0;
        socklen_t len = sizeof(error);

        if (getsockopt(l->fd, SOL_SOCKET, SO_ERROR, &error, &len) < 0)
                error = errno;
        if (error != 0) {
                link_fail(l, MESH_NODE_DOWN, "cannot connect: %s", strerror(error));
                return;
        }
        l->state = LINK_TLS;
        link_handshake(l);
}

static void on_link_poll(uv_poll_t *h, int status, int events) {
        Link *l = h->data;

        if (l->closing || l->close_pending)
                return;
        if (status < 0 && l->state != LINK_CONNECTING) {
                link_fail(l, MESH_NODE_DOWN, "poll: %s", uv_strerror(status));
                return;
        }
        switch (l->state) {
        case LINK_CONNECTING:
                link_connected(l);
                break;
        case LINK_TLS:
                link_handshake(l);
                break;
        default:
                link_io(l);
                break;
        }
}

static void on_link_timer(uv_timer_t *t) {
        Link *l = t->data;
        Mesh *m = l->mesh;
        uint64_t now = now_usec(), d = m->deadline_usec;
        char span[FORMAT_TIMESPAN_MAX];

        if (l->closing || l->close_pending)
                return;
        if (l->state != LINK_UP) {
                if (now < l->started_usec + d)
                        link_arm_timer(l, l->started_usec + d);
                else if (l->state == LINK_CONNECTING)
                        link_fail(l, MESH_NODE_DOWN, "cannot connect within %s",
                                  format_timespan(span, sizeof(span), d));
                else
                        link_fail(l, MESH_NODE_DOWN, "no %s within %s", l->state == LINK_TLS ? "TLS handshake" : "Hello",
                                  format_timespan(span, sizeof(span), d));
                return;
        }
        if (now >= l->last_rx_usec + d) {
                link_fail(l, MESH_NODE_DOWN, "nothing received for %s", format_timespan(span, sizeof(span), d));
                return;
        }
        if (now >= l->next_heartbeat_usec) {
                if (link_send_heartbeat(l, now, false) < 0)
                        return;
                l->next_heartbeat_usec = now + MAX(d / 4, (uint64_t) 1000);
                if (link_flush(l) < 0)
                        return;
                link_update_poll(l);
        }
        link_arm_timer(l, MIN(l->next_heartbeat_usec, l->last_rx_usec + d));
}

static void socket_setup(int fd, uint64_t deadline_usec) {
        int one = 1;
        unsigned timeout = (unsigned) MIN(usec_to_msec_up(deadline_usec), (uint64_t) UINT_MAX);

        (void) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        (void) setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &timeout, sizeof(timeout));
}

static void format_sockaddr(const struct sockaddr *sa, char *buf, size_t size) {
        char ip[INET6_ADDRSTRLEN] = "?";

        if (sa->sa_family == AF_INET6) {
                const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *) sa;

                (void) inet_ntop(AF_INET6, &s6->sin6_addr, ip, sizeof(ip));
                snprintf(buf, size, "[%s]:%u", ip, (unsigned) ntohs(s6->sin6_port));
        } else {
                const struct sockaddr_in *s4 = (const struct sockaddr_in *) sa;

                (void) inet_ntop(AF_INET, &s4->sin_addr, ip, sizeof(ip));
                snprintf(buf, size, "%s:%u", ip, (unsigned) ntohs(s4->sin_port));
        }
}

static void format_node_address(const MeshNode *n, char *buf, size_t size) {
        if (strchr(n->host, ':') && n->host[0] != '[')
                snprintf(buf, size, "[%s]:%u", n->host, (unsigned) n->port);
        else
                snprintf(buf, size, "%s:%u", n->host, (unsigned) n->port);
}

/* An IPv4 or IPv6 (bracketed or not) literal.  Returns 0 or -EINVAL. */
static int parse_numeric(const char *host, uint16_t port, struct sockaddr_storage *ret) {
        char buf[INET6_ADDRSTRLEN + 2];
        size_t len = strlen(host);
        struct sockaddr_in *s4 = (struct sockaddr_in *) ret;
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *) ret;

        memset(ret, 0, sizeof(*ret));
        if (inet_pton(AF_INET, host, &s4->sin_addr) == 1) {
                s4->sin_family = AF_INET;
                s4->sin_port = htons(port);
                return 0;
        }
        if (len >= 2 && host[0] == '[' && host[len - 1] == ']' && len - 2 < sizeof(buf)) {
                memcpy(buf, host + 1, len - 2);
                buf[len - 2] = 0;
                host = buf;
        }
        if (inet_pton(AF_INET6, host, &s6->sin6_addr) == 1) {
                s6->sin6_family = AF_INET6;
                s6->sin6_port = htons(port);
                return 0;
        }
        return -EINVAL;
}

static socklen_t sockaddr_len(const struct sockaddr_storage *ss) {
        return ss->ss_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
}

static void node_connect(MeshNode *n, const struct sockaddr_storage *ss) {
        Mesh *m = n->mesh;
        char address[ADDRESS_MAX];
        Link *l;
        int fd, r;

        format_node_address(n, address, sizeof(address));
        fd = socket(ss->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
        if (fd < 0) {
                node_dial_failed(n, "cannot create a socket: %s", strerror(errno));
                return;
        }
        socket_setup(fd, m->deadline_usec);
        if (connect(fd, (const struct sockaddr *) ss, sockaddr_len(ss)) < 0 && errno != EINPROGRESS) {
                r = errno;
                safe_close(fd);
                node_dial_failed(n, "cannot connect to %s: %s", address, strerror(r));
                return;
        }
        r = link_new(m, fd, (int) n->index, true, LINK_CONNECTING, address, &l);
        if (r < 0) {
                node_dial_failed(n, "cannot connect to %s: %s", address, strerror(-r));
                return;
        }
        n->link = l;
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
        Resolve *r = container_of(req, Resolve, req);
        MeshNode *n = r->node;
        struct sockaddr_storage ss = {};

        free(r);
        if (!n) { /* orphaned by mesh_free() */
                uv_freeaddrinfo(res);
                return;
        }
        n->resolve = NULL;
        if (status < 0 || !res || res->ai_addrlen > sizeof(ss)) {
                uv_freeaddrinfo(res);
                node_dial_failed(n, "cannot resolve %s: %s", n->host, status < 0 ? uv_strerror(status) : "no address");
                return;
        }
        memcpy(&ss, res->ai_addr, res->ai_addrlen);
        uv_freeaddrinfo(res);
        node_connect(n, &ss);
}

static void node_dial(MeshNode *n) {
        Mesh *m = n->mesh;
        struct sockaddr_storage ss;
        struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_ADDRCONFIG };
        char port[8];
        Resolve *r;
        int k;

        if (parse_numeric(n->host, n->port, &ss) == 0) {
                node_connect(n, &ss);
                return;
        }
        r = calloc(1, sizeof(Resolve));
        if (!r) {
                node_dial_failed(n, "out of memory");
                return;
        }
        r->node = n;
        snprintf(port, sizeof(port), "%u", (unsigned) n->port);
        k = uv_getaddrinfo(m->loop, &r->req, on_resolved, n->host, port, &hints);
        if (k < 0) {
                free(r);
                node_dial_failed(n, "cannot resolve %s: %s", n->host, uv_strerror(k));
                return;
        }
        n->resolve = r;
}

/* ---- accepting ---------------------------------------------------------- */

static void on_listen(uv_poll_t *h, int status, int events) {
        Mesh *m = h->data;

        for (unsigned i = 0; i < 16 && !m->closing; i++) {
                struct sockaddr_storage ss = {};
                socklen_t len = sizeof(ss);
                char address[ADDRESS_MAX];
                Link *l;
                int fd;

                fd = accept4(m->listen_fd, (struct sockaddr *) &ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (fd < 0) {
                        if (errno == EINTR || errno == ECONNABORTED)
                                continue;
                        if (errno != EAGAIN && errno != EWOULDBLOCK)
                                log_debug_errno(errno, "cluster: accept failed: %m");
                        return;
                }
                format_sockaddr((const struct sockaddr *) &ss, address, sizeof(address));
                /* Bounded: these are not authenticated yet. */
                if (m->n_pending >= 2 * m->n_nodes + 8) {
                        log_debug("cluster: connection from %s: too many handshakes in progress, refused", address);
                        safe_close(fd);
                        continue;
                }
                socket_setup(fd, m->deadline_usec);
                if (link_new(m, fd, -1, false, LINK_TLS, address, &l) < 0)
                        continue;
                l->pending_counted = true;
                m->n_pending++;
        }
}

/* ---- the ready list ----------------------------------------------------- */

static void on_check(uv_check_t *h) {
        Mesh *m = h->data;
        unsigned k = 0;

        /* Oldest first (the list's tail), as many as were ready when the
         * pass began; one that becomes ready again waits for the next. */
        LIST_FOREACH(ready, l, m->ready)
                k++;
        uv_idle_stop(&m->idle);
        while (k-- > 0 && m->ready && !m->closing) {
                Link *l = m->ready;

                while (l->ready_next)
                        l = l->ready_next;
                LIST_REMOVE(ready, m->ready, l);
                l->on_ready = false;
                if (l->close_pending)
                        link_fail(l, MESH_NODE_DOWN, "%s", l->why);
                else if (l->state >= LINK_HELLO)
                        link_io(l);
        }
        if (m->ready && !m->closing)
                (void) uv_idle_start(&m->idle, on_idle);
}

/* ---- the mesh ----------------------------------------------------------- */

static void mesh_destroy(Mesh *m) {
        if (m->nodes)
                for (unsigned i = 0; i < m->n_nodes; i++) {
                        free(m->nodes[i].name);
                        free(m->nodes[i].host);
                }
        free(m->nodes);
        free(m->data_address);
        OPENSSL_cleanse(m->psk, sizeof(m->psk));
        SSL_CTX_free(m->ssl_ctx);
        safe_close(m->listen_fd);
        free(m);
}

static void on_mesh_handle_closed(uv_handle_t *h) {
        Mesh *m = h->data;

        if (--m->n_handles == 0)
                mesh_destroy(m);
}

static int mesh_validate(const MeshParams *p, WdError *err) {
        bool self = false;

        if (!p || !p->nodes || p->n_nodes == 0 || p->n_nodes > 4096)
                return wd_error_set(err, WD_E_INVALID, "cluster: the nodes list is empty or too long");
        if (!p->secret || p->secret_len == 0)
                return wd_error_set(err, WD_E_INVALID, "cluster: no secret");
        if (p->deadline_usec < 4000 || p->deadline_usec > UINT64_C(3600000000))
                return wd_error_set(err, WD_E_INVALID, "cluster: the deadline must be between 4 ms and 1 h");
        if (p->generation == 0)
                return wd_error_set(err, WD_E_INVALID, "cluster: the generation must not be 0");
        if (p->data_address_len > MESH_MAX_FRAME / 2 || (p->data_address_len > 0 && !p->data_address))
                return wd_error_set(err, WD_E_INVALID, "cluster: the data plane address is too long");
        for (size_t i = 0; i < p->n_nodes; i++) {
                const MeshNodeSpec *s = &p->nodes[i];

                if (!s->name || !s->name[0] || strlen(s->name) > MAX_NAME)
                        return wd_error_set(err, WD_E_INVALID, "cluster: node %zu: a name of 1 to %u bytes is needed",
                                            i + 1, MAX_NAME);
                if (!s->host || !s->host[0] || strlen(s->host) > 255 || s->port == 0)
                        return wd_error_set(err, WD_E_INVALID, "cluster: node %s: a host and a nonzero port are needed",
                                            s->name);
                for (size_t j = 0; j < i; j++)
                        if (strcmp(p->nodes[j].name, s->name) == 0)
                                return wd_error_set(err, WD_E_INVALID, "cluster: node %s is listed twice", s->name);
                if (p->self && strcmp(p->self, s->name) == 0)
                        self = true;
        }
        if (!self)
                return wd_error_set(err, WD_E_INVALID, "cluster: this node (%s) is not in the nodes list",
                                    p->self ? p->self : "(none)");
        return 0;
}

static int mesh_listen(Mesh *m, WdError *err) {
        const MeshNode *n = &m->nodes[m->self];
        struct sockaddr_storage ss;
        char address[ADDRESS_MAX];
        int one = 1, r;
        _cleanup_close_ int fd = -1;

        format_node_address(n, address, sizeof(address));
        if (parse_numeric(n->host, n->port, &ss) < 0) {
                struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_ADDRCONFIG };
                struct addrinfo *res = NULL;
                char port[8];

                /* The same first address as the dialers' resolvers pick. */
                snprintf(port, sizeof(port), "%u", (unsigned) n->port);
                r = getaddrinfo(n->host, port, &hints, &res);
                if (r != 0 || !res || res->ai_addrlen > sizeof(ss)) {
                        if (res)
                                freeaddrinfo(res);
                        return wd_error_set(err, -EADDRNOTAVAIL, "cannot resolve %s: %s", n->host,
                                            r != 0 ? gai_strerror(r) : "no address");
                }
                memset(&ss, 0, sizeof(ss));
                memcpy(&ss, res->ai_addr, res->ai_addrlen);
                freeaddrinfo(res);
        }
        fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
        if (fd < 0)
                return wd_error_set(err, negative_errno(), "cannot create a socket for %s: %s", address, strerror(errno));
        (void) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, (const struct sockaddr *) &ss, sockaddr_len(&ss)) < 0)
                return wd_error_set(err, negative_errno(), "cannot bind %s: %s", address, strerror(errno));
        if (listen(fd, SOMAXCONN) < 0)
                return wd_error_set(err, negative_errno(), "cannot listen on %s: %s", address, strerror(errno));
        m->listen_fd = TAKE_FD(fd);
        return 0;
}

int mesh_new(Mesh **ret, uv_loop_t *loop, const MeshParams *p, const MeshOps *ops, void *userdata, WdError *err) {
        Mesh *m;
        int r;

        r = mesh_validate(p, err);
        if (r != 0)
                return r;
        if (!ops)
                return wd_error_set(err, WD_E_INVALID, "cluster: no callbacks");
        (void) pthread_once(&fdbio_once, fdbio_method_init);
        if (!fdbio_method)
                return wd_error_set(err, -ENOMEM, "cannot create the TLS socket method");

        m = calloc(1, sizeof(Mesh));
        if (!m)
                return wd_error_set(err, -ENOMEM, "out of memory");
        m->listen_fd = -1;
        m->loop = loop;
        m->ops = ops;
        m->userdata = userdata;
        m->deadline_usec = p->deadline_usec;
        m->generation = p->generation;
        m->nodes_hash = mesh_nodes_hash(p->nodes, p->n_nodes);
        m->nodes = calloc(p->n_nodes, sizeof(MeshNode));
        if (!m->nodes) {
                mesh_destroy(m);
                return wd_error_set(err, -ENOMEM, "out of memory");
        }
        m->n_nodes = (unsigned) p->n_nodes;
        for (unsigned i = 0; i < m->n_nodes; i++) {
                MeshNode *n = &m->nodes[i];

                n->mesh = m;
                n->index = i;
                n->name = strdup(p->nodes[i].name);
                n->host = strdup(p->nodes[i].host);
                n->port = p->nodes[i].port;
                n->state = MESH_NODE_DOWN;
                n->since_usec = now_usec();
                n->backoff_usec = BACKOFF_MIN_USEC;
                if (!n->name || !n->host) {
                        mesh_destroy(m);
                        return wd_error_set(err, -ENOMEM, "out of memory");
                }
                if (strcmp(n->name, p->self) == 0)
                        m->self = i;
        }
        m->nodes[m->self].state = MESH_NODE_SELF;
        m->nodes[m->self].generation = m->generation;
        for (unsigned i = 0; i < m->n_nodes; i++)
                m->nodes[i].dialer = i != m->self && strcmp(m->nodes[m->self].name, m->nodes[i].name) < 0;
        if (p->data_address_len > 0) {
                m->data_address = malloc(p->data_address_len);
                if (!m->data_address) {
                        mesh_destroy(m);
                        return wd_error_set(err, -ENOMEM, "out of memory");
                }
                memcpy(m->data_address, p->data_address, p->data_address_len);
                m->data_address_len = p->data_address_len;
        }
        r = psk_derive(p->secret, p->secret_len, m->psk);
        if (r < 0) {
                mesh_destroy(m);
                return wd_error_set(err, r, "cannot derive the cluster key");
        }
        r = ssl_ctx_new(m, &m->ssl_ctx, err);
        if (r == 0)
                r = mesh_listen(m, err);
        if (r != 0) {
                mesh_destroy(m);
                return r;
        }

        /* Nothing fails from here but the listener's poll. */
        (void) uv_check_init(loop, &m->check);
        (void) uv_idle_init(loop, &m->idle);
        m->check.data = m->idle.data = m;
        m->n_handles = 2;
        for (unsigned i = 0; i < m->n_nodes; i++) {
                (void) uv_timer_init(loop, &m->nodes[i].redial);
                m->nodes[i].redial.data = m;
                m->n_handles++;
        }
        r = uv_poll_init(loop, &m->listen_poll, m->listen_fd);
        if (r < 0) {
                mesh_free(m);
                return wd_error_set(err, r, "cannot watch the cluster socket: %s", uv_strerror(r));
        }
        m->listen_poll.data = m;
        m->n_handles++;
        (void) uv_check_start(&m->check, on_check);
        (void) uv_poll_start(&m->listen_poll, UV_READABLE, on_listen);
        /* Dial from the loop, not from here. */
        for (unsigned i = 0; i < m->n_nodes; i++)
                if (m->nodes[i].dialer)
                        (void) uv_timer_start(&m->nodes[i].redial, on_redial, 0, 0);
        *ret = m;
        return 0;
}

Mesh *mesh_free(Mesh *m) {
        if (!m || m->closing)
                return NULL;
        m->closing = true;
        while (m->links)
                link_close(m->links);
        for (unsigned i = 0; i < m->n_nodes; i++) {
                MeshNode *n = &m->nodes[i];

                if (n->resolve) {
                        n->resolve->node = NULL;
                        (void) uv_cancel((uv_req_t *) &n->resolve->req);
                        n->resolve = NULL;
                }
        }
        if (m->n_handles == 0) {
                mesh_destroy(m);
                return NULL;
        }
        uv_close((uv_handle_t *) &m->check, on_mesh_handle_closed);
        uv_close((uv_handle_t *) &m->idle, on_mesh_handle_closed);
        for (unsigned i = 0; i < m->n_nodes; i++)
                uv_close((uv_handle_t *) &m->nodes[i].redial, on_mesh_handle_closed);
        if (m->listen_poll.data == m) {
                /* Closed now, not when the handle is: a reload that keeps
                 * this node's address binds it again at once. */
                uv_poll_stop(&m->listen_poll);
                m->listen_fd = safe_close(m->listen_fd);
                uv_close((uv_handle_t *) &m->listen_poll, on_mesh_handle_closed);
        }
        return NULL;
}

unsigned mesh_n_nodes(const Mesh *m) {
        return m->n_nodes;
}

unsigned mesh_self(const Mesh *m) {
        return m->self;
}

const char *mesh_node_name(const Mesh *m, unsigned node) {
        return node < m->n_nodes ? m->nodes[node].name : NULL;
}

int mesh_find(const Mesh *m, const char *name) {
        for (unsigned i = 0; i < m->n_nodes; i++)
                if (strcmp(m->nodes[i].name, name) == 0)
                        return (int) i;
        return -ENOENT;
}

void mesh_node_info(const Mesh *m, unsigned node, MeshNodeInfo *ret) {
        const MeshNode *n;

        if (node >= m->n_nodes) {
                *ret = (MeshNodeInfo){ .state = MESH_NODE_DOWN, .last_error = "no such node" };
                return;
        }
        n = &m->nodes[node];
        *ret = (MeshNodeInfo){
                .state = n->state,
                .generation = n->generation,
                .rtt_usec = n->rtt_usec,
                .since_usec = n->since_usec,
                .last_error = n->last_error,
                .frames_sent = n->frames_sent,
                .frames_received = n->frames_received,
        };
}

bool mesh_node_up(const Mesh *m, unsigned node) {
        return node < m->n_nodes && node != m->self && link_is_up(m->nodes[node].link);
}

int mesh_send(Mesh *m, unsigned node, const ClusterEnvelope *env) {
        Link *l;
        int r;

        if (node >= m->n_nodes || !env || env->body_case == WEIGHTD__CLUSTER__V1__ENVELOPE__BODY__NOT_SET ||
            env->body_case == WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_HELLO ||
            env->body_case == WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_HEARTBEAT || !envelope_body(env))
                return -EINVAL; /* Hello and Heartbeat are the mesh's own */
        if (m->closing || node == m->self || !link_is_up(m->nodes[node].link))
                return -ENOTCONN;
        l = m->nodes[node].link;
        r = link_queue(l, env);
        if (r < 0)
                return r;
        link_update_poll(l);
        return 0;
}
