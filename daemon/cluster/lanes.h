/* The cluster's GPU lanes (DESIGN.md, "Cluster"): the communicators among
 * the same-index GPUs of the nodes (gpu/collective.h), each with a ring of
 * staging buffers on this node's device, that whole plans to a device move
 * their chunks through (cluster/fetch.h, TransferLane).
 *
 * A lane is one communicator of the ranks of a plan (its sources and
 * receivers, in mesh order), on one device index, kept for the next plan
 * of the same nodes and device while every rank lives: so a communicator
 * per (device index, membership generation), reused, and never after an
 * error.  The coordinator offers a lane in its Start (lanes_offer(): the
 * communicator's id, which travels over the authenticated mesh, and its
 * ranks); every rank joins it (lanes_join()), creating its end of the
 * communicator the first time.  A rank that cannot join, a communicator
 * that fails or does not initialise within the deadline, a rank that goes
 * down: the lane is aborted everywhere (LaneDown to the other ranks), and
 * the plan goes on over the data plane.
 *
 * The backend: [cluster] gpu_transport = auto (the default) takes NCCL
 * where it loads and the devices are real, the host backend
 * (cluster/coll-host.h) on the emulated devices of the test builds; nccl
 * the same but says so in the log when it cannot; host never makes a lane
 * (a device plan then moves bytes host to host and each node copies to its
 * GPU).
 *
 * Loop thread only. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "cluster/coll-host.h"
#include "cluster/dataplane.h"
#include "cluster/fetch.h"
#include "cluster/mesh.h"

typedef enum LanesTransport {
        LANES_TRANSPORT_AUTO,
        LANES_TRANSPORT_NCCL,
        LANES_TRANSPORT_HOST,
} LanesTransport;

/* Ring slots of a lane, each of a plan's chunk size. */
#define LANE_SLOTS 4u
/* Lanes a node keeps (each coordinator makes its own): past it, the one
 * idle longest goes, and a plan finds none idle goes without. */
#define LANES_MAX 4u

typedef struct Lanes Lanes;

/* Returns 0 or -ENOMEM. */
int lanes_new(Lanes **ret, uv_loop_t *loop, Mesh *mesh, DataPlane *data, uint64_t generation,
              LanesTransport transport, uint64_t deadline_usec);
/* Abort every lane (no LaneDown: the nodes are going away or renumbered).
 * Before the data plane goes; lanes_free() after it.  Both accept NULL. */
void lanes_shutdown(Lanes *l);
Lanes *lanes_free(Lanes *l);
/* The GPU tier (NULL: none): lanes need devices; the backend is chosen
 * then. */
void lanes_set_gpu(Lanes *l, Gpu *gpu);
/* After a reconfiguration: the new mesh (lanes_shutdown() ran). */
void lanes_set_mesh(Lanes *l, Mesh *mesh);
void lanes_set_transport(Lanes *l, LanesTransport transport);
/* "nccl 2.28.9", "host", or why there is none. */
const char *lanes_describe(const Lanes *l);

/* The coordinator of plan_id: a lane for the plan's ranks (mesh indexes in
 * mesh order, this node among them) on device, its id to *ret_id.
 * Returns 0, or -1 when the plan goes without one. */
int lanes_offer(Lanes *l, uint64_t plan_id, int device, const unsigned *ranks, size_t n, uint64_t chunk_size,
                uint8_t ret_id[GPU_COLL_ID_BYTES]);
/* The coordinator's plan ended: its lane may be offered again. */
void lanes_plan_ended(Lanes *l, uint64_t plan_id);
/* A Start naming a lane: t (before transfer_start()) moves its chunks
 * through it, or, when this node cannot join, the other ranks hear so. */
void lanes_join(Lanes *l, Transfer *t, const uint8_t *id, size_t id_len, const unsigned *ranks, size_t n, int device,
                uint64_t chunk_size);
/* LaneDown from node for t's plan. */
void lanes_lane_down(Lanes *l, Transfer *t, unsigned node, const char *why);
/* A node went down: its lanes are aborted. */
void lanes_node_down(Lanes *l, unsigned node);

/* The host backend's messages on the data plane (hdr_len ==
 * sizeof(CollHostHeader)). */
void *lanes_incoming(Lanes *l, const CollHostHeader *hdr, uint64_t length, void **ret_token);
void lanes_received(void *token, int status);
/* Bytes this node sent and received over lanes. */
void lanes_bytes(const Lanes *l, uint64_t *ret_sent, uint64_t *ret_received);
