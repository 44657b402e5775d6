/* The cluster: this daemon's part in a cluster of node daemons that share
 * one read of shared storage (DESIGN.md, "Cluster"; docs/cluster.md).
 *
 * It owns the mesh (authenticated node links, cluster/mesh.h), the data
 * plane (UCX, cluster/dataplane.h) and the transfers (cluster/fetch.h), and
 * speaks the node protocol (proto/cluster.proto):
 *
 * - A cluster prefetch asked of any node goes to the component's
 *   coordinator (plan_coordinator() over the live nodes), which proposes a
 *   plan to the nodes named.  Each checks the manifest against its own view
 *   of the files (a node that differs reads alone: "mismatch"), reserves
 *   the memory and says READY, or RESIDENT when it holds the component
 *   already.  Start names the sources and receivers; every source reads its
 *   share once and sends each chunk to every receiver as soon as it is
 *   read.  Receivers say Done; the coordinator answers the node that asked
 *   with every node's part.
 * - A plain load on this node of a component that it does not hold asks
 *   every live node for it (Fetch); those that hold it resident send their
 *   shares, the others say so (Abort) and their shares are re-planned; what
 *   nobody gives is read from storage here.
 *
 * The server resolves models for it (ClusterOps.resolve): the cluster sits
 * below the server and knows no model roots.  Loop thread only. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "cluster/mesh.h"
#include "format/catalog.h"
#include "gpu/device-load.h"
#include "cluster/lanes.h"
#include "store/shard.h"
#include "store/store.h"

typedef struct Cluster Cluster;
typedef struct ClusterResolve ClusterResolve;

typedef struct ClusterParams {
        const char *self;
        const MeshNodeSpec *nodes; /* every node, self included, the configured order */
        size_t n_nodes;
        const uint8_t *secret;
        size_t secret_len;
        uint64_t deadline_usec;
        bool peer_fetch;
        uint64_t chunk_size; /* [io] chunk_size: the unit of plans */
        LanesTransport gpu_transport; /* [cluster] gpu_transport */
} ClusterParams;

typedef struct ClusterOps {
        /* Resolve model (an absolute path, as the cache keys it) and
         * component for the node protocol; answer with cluster_resolved(),
         * on the loop, later (never from inside this call). */
        void (*resolve)(const char *model, const char *component, ClusterResolve *req, void *userdata);
        /* After cluster_free(): the last transfer drained and the handles
         * closed (closed_userdata). */
        void (*closed)(void *userdata);
} ClusterOps;

/* The answer to ClusterOps.resolve: r 0 with comp (its model the absolute
 * path) and the root's descriptor, both borrowed for the call; else r and
 * err. */
void cluster_resolved(ClusterResolve *req, int r, const WdError *err, const Component *comp, int root_fd);

/* Returns 0, -EOPNOTSUPP (built without UCX, OpenSSL or libxxhash) or
 * another error with err set (the address cannot be bound, UCX fails). */
int cluster_new(Cluster **ret, uv_loop_t *loop, Store *store, const ClusterParams *p, const ClusterOps *ops,
                void *userdata, void *closed_userdata, WdError *err);
/* Aborts every transfer (their waiters hear CANCELLED, memory reserved for
 * them goes back) and closes the links.  The cluster is freed once the
 * reads in flight ended and the handles closed (run the loop):
 * ClusterOps.closed says when. */
Cluster *cluster_free(Cluster *c);
DEFINE_TRIVIAL_CLEANUP_FUNC(Cluster *, cluster_free);

/* SIGHUP: new nodes, secret or deadline rebuild the mesh (transfers under
 * way end the way a node going down ends them); peer_fetch and chunk_size
 * apply to later plans.  Returns 0 or an error with err set (the old
 * configuration stays then). */
int cluster_reconfigure(Cluster *c, const ClusterParams *p, WdError *err);

/* A cluster prefetch of comp (resolved here, its model the absolute path)
 * on nodes (names; all when n_nodes is 0): a job whose outcome carries one
 * report per node, and the entry when this node is one of them.  With
 * specs (n_nodes of them, copied), a part plan: node i serves specs[i],
 * one rank's slices (store/shard.h), or the whole component where it is
 * NULL; each node then reads and receives only the bytes it serves
 * (cluster/plan.h, plan_pieces()).  device >= 0: on that GPU of every
 * node too (cluster_set_device_tier()); devices (n_nodes, or NULL): node
 * i's own instead (-1: host memory only, CLUSTER_PLAN_DEVICE: device's),
 * which makes a part plan too.  Returns 0 with *ret referenced, or
 * WD_E_INVALID (an unknown node name, one named twice), -ENOMEM. */
int cluster_prefetch(Cluster *c, const Component *comp, char *const *nodes, ShardSpec *const *specs,
                     const int *devices, size_t n_nodes, int device, Job **ret, WdError *err);

/* The GPU tier, once it is up (NULL: none): a cluster prefetch with a
 * device (cluster_prefetch()'s device >= 0: that index on every node) has
 * each node copy its part there from host memory once it holds it there,
 * and say Done only then.  The bytes move between nodes host to host. */
void cluster_set_device_tier(Cluster *c, DeviceTier *tier);

#define CLUSTER_PLAN_DEVICE (-2)

/* Peer fetch: a job filling comp's host entry from the nodes that hold it
 * (and from storage for what they cannot give).  Returns 0 with *ret NULL
 * when there is nobody to ask (peer_fetch off, no node up): load it
 * yourself.  Errors as host_load_start(). */
int cluster_fetch(Cluster *c, const Component *comp, int root_fd, Job **ret, WdError *err);

typedef struct ClusterNodeStatus {
        const char *name;
        char address[300];   /* host:port as configured */
        const char *state;   /* "self", "up", "down", "unauthenticated", "mismatch" */
        uint64_t generation;
        uint64_t rtt_usec;
        uint64_t sent_bytes, received_bytes;
        const char *last_error;
        uint64_t since_usec;
} ClusterNodeStatus;

typedef struct ClusterStatus {
        const char *node;
        uint64_t generation;
        ClusterNodeStatus *nodes; /* free() */
        size_t n_nodes;
        uint64_t peer_sent_bytes, peer_received_bytes;
        uint64_t storage_saved_bytes;
        const char *gpu_lane;  /* the GPU lanes' backend, or why there is none */
        uint64_t lane_sent_bytes, lane_received_bytes; /* of those, over GPU lanes */
} ClusterStatus;

/* Valid until the loop runs again; free ret->nodes.  Returns 0 or -ENOMEM. */
int cluster_get_status(Cluster *c, ClusterStatus *ret);
