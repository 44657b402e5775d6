/* A request: what a peer asked that is not answered at once.  Linked to its
 * peer (the peer's owner list) and to what it waits on: the thread pool's
 * resolve, then a job (as a JobWaiter).  request_complete() is the only
 * function that turns a result into a reply: the manifest, the lease (a
 * reference on the entry held by the peer) and the descriptors to send
 * (borrowed from the entry, which the queued frame references until sent).
 *
 * Replies are queued, never read from: completing a request only puts its
 * peer on the ready list (peer_resume()).  Loop thread only. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "format/catalog.h"
#include "server/peer.h"
#include "server/roots.h"
#include "store/job.h"
#include "store/shard.h"
#include "util/error.h"
#include "wire.h"

typedef enum RequestKind {
        REQUEST_LOAD,
        REQUEST_PREFETCH,
        REQUEST_TENSORS,
        REQUEST_COMPONENTS,
} RequestKind;

typedef struct Request Request;

struct Request {
        Peer *peer; /* NULL once the peer left or cancelled: freed when the resolve ends */
        PeerLink link;
        JobWaiter wait;
        uint64_t id;
        RequestKind kind;
        bool progress;
        uint64_t progress_sent;
        uint64_t received_usec;

        /* The target: the host tier (device -1), or a device. */
        int device;     /* index in the GPU tier */
        int keep_host;  /* KEEP_HOST_*, device targets only */
        char target[32];      /* "cuda:N" for the reply */
        char device_uuid[64];

        /* A sharded Load or Prefetch: the spec, its cache variant, the plan
         * (made on the thread pool with the resolve). */
        ShardSpec *shard;
        char *variant;
        ShardPlan *plan;

        /* A cluster prefetch: the nodes named (none: all). */
        bool cluster;
        char **nodes;
        size_t n_nodes;
        ShardSpec **node_specs; /* a part plan: one per node (NULL: the whole component); NULL if none */
        int *node_devices;      /* one per node (CLUSTER_PLAN_DEVICE: device's, -1: host); NULL if none */

        /* A Load of named tensors: the names, sorted with strcmp() and
         * unique; after the resolve, the positions in the reply's full
         * manifest (the files' tensors in order, or the plan's) of the
         * tensors they name, ascending.  n_names 0: every tensor. */
        char **names;
        size_t n_names;
        size_t *pick;
        size_t n_pick;
        /* A Load whose client reads LoadReply.table. */
        bool compact_tensors;

        /* The resolve, on the thread pool (resolving meanwhile). */
        uv_work_t work;
        bool resolving;
        Roots *roots; /* a reference: a reload may replace the server's */
        Root *root;
        char *rel, *key, *component;
        int r;
        WdError err;
        Component *comp;
        ComponentList *list;
        void *userdata; /* the driver's */
};

/* The result a request is answered with. */
typedef struct RequestOutcome {
        int r;               /* 0, or the error for the reply */
        const WdError *err;
        CacheEntry *entry;   /* r == 0, Load and Prefetch: the resident entry */
        const ShardPlan *plan; /* its layout when it is a shard or a device slab, if the request has none */
        bool was_resident;
        const JobNodeReport *nodes; /* a cluster prefetch: every node's part */
        size_t n_nodes;
} RequestOutcome;

/* A new request of p, linked to it (counted against max_pending). */
Request *request_new(Peer *p, uint64_t id, RequestKind kind, bool progress);
/* Unlink and free (no reply).  A request that is resolving is only
 * orphaned: freed when the resolve ends. */
void request_drop(Request *r);
void request_free(Request *r);
Request *request_find(Peer *p, uint64_t id);
Request *request_from_link(PeerLink *l);

/* Wait for j: the outcome answers the request (request_complete()). */
void request_wait(Request *r, Job *j);
/* Answer r and free it, then let its peer read on. */
void request_complete(Request *r, const RequestOutcome *o);

/* Replies that need no request: an envelope for id with reply. */
int request_reply(Peer *p, uint64_t id, Weightd__V1__Reply *reply);
int request_reply_error(Peer *p, uint64_t id, int code, const char *fmt, ...) _printf_(4, 5);
int request_reply_wd_error(Peer *p, uint64_t id, int r, const WdError *err);
/* Map one of our codes (WD_E_*, -errno) to the protocol's. */
int wd_code_to_proto(int r);
