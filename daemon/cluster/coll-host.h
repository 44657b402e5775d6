/* The host backend of the collectives table (gpu/collective.h): the same
 * collectives as NCCL's, over the cluster's host links (the data plane),
 * for the emulated GPUs of the test builds, whose device memory is host
 * memory.  NCCL cannot initialise on a machine without a GPU, so the CPU
 * tests of the GPU lane run this.
 *
 * A communicator is a queue run in order, as a CUDA stream: a copy is a
 * memcpy; a broadcast on the root sends the bytes to every other rank and
 * ends when every send left, on the others it ends when the root's bytes
 * landed in recv (straight there when the broadcast is at the head of the
 * queue, else in a buffer, copied once it is); a signal's done runs from
 * coll_host_progress().  Ranks are mesh nodes (comm_init's peers); a
 * broadcast's message carries the communicator's token (a hash of its
 * id), the broadcast's number and the sender's generation.  The data
 * plane does not authenticate: the bytes a lane receives are checked
 * against checksums that came over the mesh, as the host tier's are.
 *
 * Loop thread only. */
#pragma once

#include <stdint.h>

#include "cluster/dataplane.h"
#include "gpu/collective.h"

typedef struct CollHost CollHost;

/* The header of a broadcast's message on the data plane (distinct in size
 * from a transfer's chunk header). */
typedef struct CollHostHeader {
        uint64_t magic;
        uint64_t token;
        uint64_t seq;
        uint64_t generation; /* the sender's */
        uint32_t sender;     /* mesh index */
        uint32_t reserved;
} CollHostHeader;

/* self and generation: this node's mesh index and process generation;
 * kick is called after anything that may have ended a signal or failed a
 * communicator, possibly within a call of the table: it must only schedule
 * a later look (call progress and comm_poll then, from the loop).  Fills
 * *ret_table with the backend's table.  Returns 0 or -ENOMEM. */
int coll_host_new(CollHost **ret, DataPlane *d, unsigned self, uint64_t generation, void (*kick)(void *userdata),
                  void *userdata, GpuColl *ret_table);
/* This node's mesh index changed (the cluster was reconfigured). */
void coll_host_set_self(CollHost *h, unsigned self);
/* Every communicator must be gone (aborted, and its gone ran). */
CollHost *coll_host_free(CollHost *h);

/* From the data plane: a message whose header has CollHostHeader's size
 * (the sender's generation checked by the caller).  Returns the
 * destination or NULL (drop it); the token goes to coll_host_received(). */
void *coll_host_incoming(CollHost *h, const CollHostHeader *hdr, uint64_t length, void **ret_token);
void coll_host_received(void *token, int status);
/* A node went down: communicators it is a rank of fail. */
void coll_host_node_down(CollHost *h, unsigned node);
