/* The mesh: this node's authenticated links to every other node of the
 * cluster (DESIGN.md, "Cluster").
 *
 * One TCP connection per pair of nodes: the node whose name sorts first
 * dials, the other accepts on its own configured address.  Each link is TLS
 * 1.3 with an external PSK (OpenSSL): the PSK is derived from the cluster's
 * shared secret, its identity is the dialer's node name, so both ends prove
 * the secret and every record after the handshake is integrity protected
 * and encrypted.  A wrong secret fails the handshake: the node is
 * MESH_NODE_UNAUTHENTICATED, the failure is logged with its address, and
 * nothing else goes over that connection.
 *
 * After the handshake each end sends a Hello (proto/cluster.proto): its
 * name, its generation (random, new with each process), its data plane
 * address and the hash of its nodes list.  A Hello from the wrong name, or
 * with a different nodes list (MESH_NODE_MISMATCH), closes the link.  A new
 * generation from a node that was up is reported as down, then up.
 *
 * Liveness: heartbeats every deadline/4 each way; a link that received
 * nothing for deadline is closed and reported down (a partition is noticed
 * within the deadline, not after TCP's retransmission timeout; the socket's
 * TCP_USER_TIMEOUT is the deadline too).  The dialer redials with a
 * backoff (100 ms doubling to deadline/2).  Frames are the control API's
 * framing (u32 little-endian length + one weightd.cluster.v1.Envelope) of
 * at most MESH_MAX_FRAME bytes; a bigger or malformed frame closes the link.
 *
 * Loop thread only.  Callbacks never run inside mesh_send() or mesh_new(). */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "cluster.pb-c.h"
#include "util/error.h"
#include "macro.h"

#define MESH_MAX_FRAME (4u << 20)
#define MESH_VERSION 1u

typedef Weightd__Cluster__V1__Envelope ClusterEnvelope;
typedef struct Mesh Mesh;

typedef enum MeshNodeState {
        MESH_NODE_SELF,
        MESH_NODE_DOWN,            /* not connected (yet, or any more) */
        MESH_NODE_UP,              /* authenticated, Hellos exchanged, heard within the deadline */
        MESH_NODE_UNAUTHENTICATED, /* the last handshake with it failed: a different secret */
        MESH_NODE_MISMATCH,        /* it is configured with a different nodes list */
        _MESH_NODE_STATE_MAX,
} MeshNodeState;

/* "self", "down", "up", "unauthenticated", "mismatch" */
const char *mesh_node_state_to_string(MeshNodeState s);

/* One node as configured: "NAME=HOST:PORT" (HOST an IPv4 address, a
 * bracketed IPv6 one or a host name, resolved when dialing/binding). */
typedef struct MeshNodeSpec {
        const char *name;
        const char *host;
        uint16_t port;
} MeshNodeSpec;

typedef struct MeshParams {
        const char *self;            /* one of nodes[].name */
        const MeshNodeSpec *nodes;   /* every node, self included, the configured order */
        size_t n_nodes;
        const uint8_t *secret;       /* the shared secret's bytes */
        size_t secret_len;
        uint64_t deadline_usec;      /* heartbeats and handshakes */
        uint64_t generation;         /* this process's, nonzero */
        const void *data_address;    /* sent in Hello (copied), unless ops->hello_address */
        size_t data_address_len;
} MeshParams;

typedef struct MeshOps {
        /* node is up: authenticated, its Hello received. */
        void (*up)(Mesh *m, unsigned node, uint64_t generation, const void *data_address, size_t data_address_len,
                   void *userdata);
        /* node (generation as it was announced) is down; why for logs. */
        void (*down)(Mesh *m, unsigned node, uint64_t generation, const char *why, void *userdata);
        /* A frame from an up node other than Hello and Heartbeat (handled
         * here); env is freed after the call. */
        void (*message)(Mesh *m, unsigned node, const ClusterEnvelope *env, void *userdata);
        /* Optional: the data address for the Hello to node on a new link
         * (valid until the Hello is queued; called from the loop, it may
         * not free the mesh).  Returns 0, or -errno (err says why: the
         * link fails). */
        int (*hello_address)(Mesh *m, unsigned node, const void **ret, size_t *ret_len, WdError *err,
                             void *userdata);
} MeshOps;

typedef struct MeshNodeInfo {
        MeshNodeState state;
        uint64_t generation; /* the last one announced, 0 if never */
        uint64_t rtt_usec;   /* the last heartbeat's round trip, 0 if none */
        uint64_t since_usec; /* CLOCK_MONOTONIC when it entered state */
        const char *last_error; /* "" if none; valid until the next loop iteration */
        uint64_t frames_sent, frames_received;
} MeshNodeInfo;

/* Bind self's address (SO_REUSEADDR) and start dialing.  Returns 0, or
 * -errno/WD_E_INVALID with err naming what failed ("cannot bind
 * 10.0.0.1:7470: Address already in use"). */
int mesh_new(Mesh **ret, uv_loop_t *loop, const MeshParams *p, const MeshOps *ops, void *userdata, WdError *err);
/* Close every link (no down callbacks) and the listener.  The handles
 * close asynchronously: run the loop afterwards for them to go. */
Mesh *mesh_free(Mesh *m);
DEFINE_TRIVIAL_CLEANUP_FUNC(Mesh *, mesh_free);

unsigned mesh_n_nodes(const Mesh *m);
unsigned mesh_self(const Mesh *m);
const char *mesh_node_name(const Mesh *m, unsigned node);
/* The index of the node named name, or -ENOENT. */
int mesh_find(const Mesh *m, const char *name);
void mesh_node_info(const Mesh *m, unsigned node, MeshNodeInfo *ret);
bool mesh_node_up(const Mesh *m, unsigned node);

/* Queue env for node.  Returns 0, -ENOTCONN when node is not up, -EMSGSIZE
 * when the frame would exceed MESH_MAX_FRAME, -ENOMEM.  A link whose
 * queue passes MESH_MAX_QUEUED bytes is closed as stalled. */
#define MESH_MAX_QUEUED (64u << 20)
int mesh_send(Mesh *m, unsigned node, const ClusterEnvelope *env);

/* The hash of a nodes list as Hello carries it (names, hosts and ports in
 * the configured order). */
uint64_t mesh_nodes_hash(const MeshNodeSpec *nodes, size_t n_nodes);
