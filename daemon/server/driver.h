/* The driver: the requests of the control API.  It validates every field
 * protobuf-c leaves unchecked, answers what needs no waiting (Hello,
 * Release, Evict, Pin, Unpin, List, Status, Cancel), and for what names a
 * model (Load, Prefetch, Tensors, Components) resolves it on the thread
 * pool and then either answers at once from a resident entry or makes the
 * request wait on a job (joining one that runs, or starting one).
 *
 * It owns no transport state (peer.c) and builds no reply of its own
 * (request.c); it learns of peers through their frame and closing callbacks
 * and of the daemon through the fields the server keeps current. */
#pragma once

#include "cluster/cluster.h"
#include "gpu/device-load.h"
#include "server/config.h"
#include "server/metrics.h"
#include "server/peer.h"
#include "server/roots.h"
#include "store/store.h"

enum {
        GPU_STARTING,
        GPU_UP,
        GPU_OFF,
};

typedef struct Driver {
        uv_loop_t *loop;
        Store *store;
        DeviceTier *tier;      /* gpu NULL while not up */
        int gpu_state;         /* GPU_* */
        const char *gpu_reason;
        Roots *roots;          /* the server's current ones */
        const Config *config;  /* the server's current one */
        PeerContext *peers;
        Cluster *cluster;      /* NULL without [cluster] */
        unsigned n_resolving;  /* resolves on the thread pool (the cluster's too) */
        /* The Status reply's daemon-wide part (the server's). */
        void (*status)(Weightd__V1__StatusReply *st, void *userdata);
        /* Something changed: status lines, the drain. */
        void (*changed)(void *userdata);
        Metrics *metrics;      /* cache hits and misses; may be NULL */
        void *userdata;
} Driver;

/* The PeerOps of the daemon's peers, with the Driver as their userdata. */
extern const PeerOps driver_peer_ops;

/* Stopping: every request waiting for a resolve or a job hears why it ends
 * (UNAVAILABLE); jobs nobody waits for any more are cancelled. */
void driver_stop(Driver *d);

/* ClusterOps.resolve, with the Driver as userdata: resolves a model for
 * another node beneath this daemon's own roots, on the thread pool. */
void driver_cluster_resolve(const char *model, const char *component, ClusterResolve *req, void *userdata);

/* Check a Shard from the wire and turn it into a spec; *ret is NULL when it
 * shards nothing (world 1 without rules).  Returns 0 or WD_E_INVALID. */
int shard_spec_from_wire(const Weightd__V1__Shard *w, ShardSpec **ret, WdError *err);
