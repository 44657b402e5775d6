/* A peer: one client connection.  Transport and accounting only: the
 * socket under a uv_poll_t, framing, the output queue with its descriptors,
 * the Hello state, the per-uid charges (connections, input and output
 * bytes, leases) and the peer's leases as an owner list.  It knows nothing
 * of requests or the store: a decoded frame goes to the PeerOps frame
 * callback, and a lease is an opaque reference with its release function.
 *
 * Input is only ever decoded from the peer's own poll callback or from the
 * context's ready list, which a uv_check_t drains after the loop's I/O:
 * peer_resume() (a request completed, so the peer may read again) only
 * schedules the peer there.  Nothing that completes a request can run
 * another request of the peer underneath it.
 *
 * Loop thread only. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <uv.h>

#include "util/list.h"
#include "wire.h"

typedef struct Peer Peer;
typedef struct PeerContext PeerContext;
typedef struct PeerLease PeerLease;
typedef struct OutFrame OutFrame;

#define PEER_MAX_LEASES 4096u              /* per connection */
#define PEER_MAX_LEASES_PER_UID 65536u
#define PEER_MAX_OUT_BYTES ((size_t) 64 << 20)          /* queued behind the frame being sent, per connection */
#define PEER_MAX_OUT_BYTES_PER_UID ((size_t) 256 << 20) /* and over a uid's connections */
#define PEER_MAX_IN_BYTES_PER_UID ((size_t) 64 << 20)   /* input buffers over a uid's connections */

/* Something a peer holds on to until it lets go: a lease's entry, the entry
 * whose descriptors a queued frame carries. */
typedef struct PeerRef {
        void *obj;
        void (*release)(void *obj);
} PeerRef;

/* What one uid holds over all its connections. */
typedef struct UserCharge {
        struct UserCharge *next;
        uid_t uid;
        unsigned conns;
        unsigned leases;
        size_t in_bytes;
        size_t out_bytes;
} UserCharge;

typedef struct PeerLimits {
        unsigned max_connections;     /* in all */
        unsigned max_connections_per_uid;
        unsigned max_pending;         /* requests in flight per connection: reading stops there */
        uint32_t max_request_size;    /* bytes of one incoming frame */
        uint64_t hello_timeout_usec;  /* to say Hello */
        uint64_t frame_timeout_usec;  /* to finish a frame once its first byte came */
} PeerLimits;

typedef struct PeerOps {
        /* A decoded frame (freed by the caller afterwards).  Returns 0, or
         * < 0 when the peer broke the protocol: it is disconnected. */
        int (*frame)(Peer *p, WireEnvelope *env, void *userdata);
        /* The peer is going: forget its requests (its leases go after). */
        void (*closing)(Peer *p, void *userdata);
        /* Connections or leases changed (status lines). */
        void (*changed)(void *userdata);
} PeerOps;

struct PeerContext {
        uv_loop_t *loop;
        const PeerOps *ops;
        void *userdata;
        PeerLimits limits;
        Peer *peers;
        unsigned n_peers;
        unsigned n_leases;
        uint64_t next_lease_id;
        UserCharge *users;
        Peer *ready; /* peers to read from once the loop's I/O is done */
        uv_check_t ready_check;
        uv_idle_t ready_idle; /* keeps the loop from blocking while peers are ready */
        bool stopping;        /* no reading, no new peers */
};

struct PeerLease {
        LIST_FIELDS(PeerLease, leases);
        uint64_t id;
        PeerRef ref;
};

/* A link in a list the peer owns for the layer above (its requests): the
 * peer only keeps the head and a count; peer_link()/peer_unlink(). */
typedef struct PeerLink {
        LIST_FIELDS(struct PeerLink, links);
} PeerLink;

struct Peer {
        PeerContext *ctx;
        LIST_FIELDS(Peer, peers);
        LIST_FIELDS(Peer, ready);
        bool on_ready;
        uv_poll_t poll;
        int fd;
        int events;
        struct ucred cred;
        UserCharge *user;
        char name[64];
        WireReader in;
        size_t in_charged;          /* of in's buffer, charged to the uid */
        uint64_t frame_started_usec; /* 0: no frame in progress */
        OutFrame *out_head, *out_tail;
        size_t out_bytes;
        bool hello;
        uint64_t accepted_usec;
        bool closing;
        bool close_pending; /* closed from the ready list (see peer_queue()) */
        bool close_when_sent;
        PeerLink *requests; /* the layer above's, see PeerLink */
        unsigned n_requests;
        PeerLease *leases;
        unsigned n_leases;
};

int peer_context_init(PeerContext *ctx, uv_loop_t *loop, const PeerLimits *limits, const PeerOps *ops,
                      void *userdata);
/* Close every peer and the context's handles. */
void peer_context_close(PeerContext *ctx);
void peer_context_set_limits(PeerContext *ctx, const PeerLimits *limits);
UserCharge *peer_context_user(PeerContext *ctx, uid_t uid);
/* Stop reading from every peer (the daemon is stopping). */
void peer_context_stop(PeerContext *ctx);
/* Every second: close peers past the Hello or the frame deadline. */
void peer_context_tick(PeerContext *ctx, uint64_t now_usec);

/* Take fd (a connected socket, non-blocking) for a new peer.  Returns 0, or
 * -EUSERS / -EMFILE style errors when the limits say no (fd still the
 * caller's then), -ENOMEM. */
int peer_new(PeerContext *ctx, int fd, const struct ucred *cred, Peer **ret);
/* Disconnect now: closing callback, leases released, output dropped. */
void peer_close(Peer *p);
/* Stop reading; close once the queued output went out. */
void peer_close_when_sent(Peer *p);

/* Queue a packed frame (buf taken) with descriptors (borrowed: they stay
 * valid while the keep references do) and the references that keep them
 * (taken; released once the frame was sent or dropped).  Never reads, and
 * never closes a peer under the caller, who may be walking a job's waiters:
 * a peer whose send failed, or that the output limits close (the peer that
 * does not read, not its siblings), goes later from the ready list.
 * Returns 0, or < 0 when p is closed or about to be (it sends nothing
 * more). */
int peer_queue(Peer *p, uint8_t *buf, size_t len, const int *fds, size_t n_fds, PeerRef *keep, size_t n_keep);
/* Pack and queue env. */
int peer_send(Peer *p, const WireEnvelope *env, const int *fds, size_t n_fds, PeerRef *keep, size_t n_keep);

/* A request of p ended: read again later, from the ready list. */
void peer_resume(Peer *p);

/* The owner list of the layer above. */
void peer_link(Peer *p, PeerLink *l);
void peer_unlink(Peer *p, PeerLink *l);

/* Leases.  peer_lease_limit(): NULL or why p may hold no more (for the
 * reply).  peer_lease_add() takes ref and returns the lease id (0: out of
 * memory, ref released). */
const char *peer_lease_limit(Peer *p, char *buf, size_t size);
uint64_t peer_lease_add(Peer *p, PeerRef ref);
PeerLease *peer_lease_find(Peer *p, uint64_t id);
void peer_lease_drop(Peer *p, PeerLease *l);
