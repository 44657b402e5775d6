/* A transfer: one node's part in one plan (cluster/plan.h) -- the chunks it
 * reads from storage or already holds and sends to the plan's receivers
 * over the data plane, and, on a receiver, the chunks it gets from the
 * other sources into the slabs of a loading cache entry.
 *
 * A receiving transfer is a Job (store/job.h, kind "cluster fetch") filling
 * that entry, so that local requests for the component join it as they
 * would join a host load.  A chunk counts only once its bytes hash to the
 * xxh3 its sender sent over the authenticated mesh; when every chunk
 * counts, the files are checked unchanged and the slabs sealed (as a host
 * load does), and only then do waiters hear DONE.  Chunks whose source went
 * down are re-planned over the live sources (plan_owner()); chunks whose
 * source stalled past the deadline or sent bytes that failed the checksum,
 * and chunks no live source can give, are read from storage by this node.
 * So a receiving transfer ends with every byte right, or FAILED only for
 * what a plain load would fail for (a read error, a changed file, the
 * budget).
 *
 * A transfer keeps sending after it sealed (from the resident slabs) until
 * every live receiver said it is done, or nothing was asked of it for twice
 * the deadline; then it is finished and the cluster drops it.  A source
 * that held the component resident from the start is a transfer without a
 * job.
 *
 * Loop thread only. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "cluster/dataplane.h"
#include "cluster/mesh.h"
#include "cluster/plan.h"
#include "gpu/collective.h"
#include "gpu/gpu.h"
#include "store/store.h"

typedef struct Transfer Transfer;

/* The GPU lane (the cluster's, cluster.c): a communicator among the
 * same-index GPUs of a whole plan's nodes (gpu/collective.h) and a ring of
 * staging buffers on this node's device.  A transfer given one moves its
 * chunks through it, in chunk order on every rank: the chunk's reader
 * sends its checksum over the mesh, copies the chunk from its host slab
 * to a ring slot on its GPU and broadcasts it from there; every other node
 * receives it into its own slot and copies it to its host slab, where the
 * checksum is checked as for bytes from the data plane.  The first error
 * or a stall of the deadline ends the lane for the transfer (failed() and
 * the cluster aborts the communicator): what it did not deliver goes over
 * the data plane, as without a lane.  One transfer at a time uses a lane. */
typedef struct TransferLane {
        const GpuColl *coll;
        GpuCollComm *comm; /* ready */
        Gpu *gpu;          /* to page-lock the host slabs the lane copies to and from */
        uint8_t *ring;     /* device memory: slots x slot_bytes */
        size_t slots;
        uint64_t slot_bytes;
        unsigned peers[PLAN_MAX_SOURCES]; /* rank -> mesh index */
        int nranks, rank;
        bool ready; /* the communicator initialized: nothing is enqueued before */
        /* The lane ended for t: why NULL when every chunk went through it
         * (the lane is free for the next plan), else what went wrong (for
         * the log; the cluster aborts the communicator and tells the other
         * ranks).  Called once per transfer, from within it: it must not
         * call the transfer back. */
        void (*ended)(struct TransferLane *l, Transfer *t, const char *why);
        uint64_t sent_bytes, received_bytes; /* over the lane, by this node */
} TransferLane;

/* What transfers share: the cluster's. */
typedef struct TransferContext {
        Store *store;
        Mesh *mesh;
        DataPlane *data;
        uint64_t deadline_usec;
        uint64_t generation;    /* this process's, in every chunk header */
        uint64_t *node_sent, *node_received; /* data plane bytes per mesh node, counted here */
        unsigned corrupt_every; /* tests: every Nth chunk sent has one byte flipped (0: never) */
        uint64_t n_sent_chunks; /* for corrupt_every */
        /* The transfer finished: it needs nothing more and sends nothing
         * more.  The cluster unlinks it and drops its reference. */
        void (*finished)(Transfer *t, void *userdata);
        /* A receiving transfer has every byte (sealed, or failed): the
         * cluster tells the plan's other nodes (Done). */
        void (*complete)(Transfer *t, void *userdata);
        /* A fetch (this node the only receiver) gave up on source node: the
         * cluster tells the other sources, which take its chunks over. */
        void (*source_gone)(Transfer *t, unsigned node, void *userdata);
        void *userdata;
} TransferContext;

/* The header of a chunk on the data plane. */
typedef struct TransferChunkHeader {
        uint64_t plan_id;
        uint64_t generation; /* the sender's */
        uint32_t index;
        uint32_t sender;     /* the sender's mesh index */
} TransferChunkHeader;

typedef struct TransferStats {
        uint64_t storage_read_bytes;
        uint64_t peer_received_bytes;
        uint64_t peer_sent_bytes;
} TransferStats;

/* A receiving transfer for comp (copied; root_fd duplicated): reserves the
 * entry and its slabs now.  Returns 0 with *ret referenced for the caller,
 * or WD_E_BUDGET, WD_E_BUSY, -errno with err set. */
int transfer_new_receiving(TransferContext *ctx, uint64_t plan_id, const Component *comp, int root_fd,
                           uint64_t chunk_size, Transfer **ret, WdError *err);
/* A receiving transfer in a part plan: the plan's nodes (mesh indexes, n
 * of them, this node among them) each serve specs[i] (NULL: the whole
 * component).  The chunks are plan_pieces() of those specs: this node reads
 * and receives only the pieces it needs and sends each piece it reads to
 * the other nodes that need it.  A node serving the whole component ends
 * with the whole entry, as in a plain plan; a node serving a shard fills
 * sparse staging slabs reserved for its pieces only, then cuts its shard
 * out of them into an entry of its own (store/shard-build.h), the job's
 * outcome; the staging entry goes when the transfer is finished.  Start
 * with transfer_start() naming the nodes that take part as receivers
 * (sources are ignored: in a part plan they are its nodes).  Returns as
 * transfer_new_receiving(), and WD_E_INVALID for specs that do not fit
 * comp (err names the file, the tensor and the rule). */
int transfer_new_part(TransferContext *ctx, uint64_t plan_id, const Component *comp, int root_fd,
                      uint64_t chunk_size, const unsigned *nodes, ShardSpec *const *specs, size_t n, Transfer **ret,
                      WdError *err);
/* A transfer that sends from resident entry e (referenced). */
int transfer_new_resident(TransferContext *ctx, uint64_t plan_id, const Component *comp, CacheEntry *e,
                          uint64_t chunk_size, Transfer **ret, WdError *err);

/* Go: sources and receivers are mesh indexes (sources in plan order: the
 * order plan_assign() numbers them in).  This node reads its share, sends
 * what it has to the receivers and waits for the rest. */
int transfer_start(Transfer *t, const unsigned *sources, size_t n_sources, const unsigned *receivers,
                   size_t n_receivers);
/* Stop without finishing: a receiving transfer fails with -ECANCELED (its
 * waiters hear it), sends stop; finished() follows once nothing is in
 * flight. */
void transfer_abort(Transfer *t, const char *why);

/* The transfer whose job j is, or NULL when j is another kind's. */
Transfer *transfer_from_job(Job *j);

Transfer *transfer_ref(Transfer *t);
void transfer_unref(Transfer *t);

uint64_t transfer_plan_id(const Transfer *t);
uint64_t transfer_chunk_size(const Transfer *t);
Job *transfer_job(Transfer *t); /* NULL for a resident source */
bool transfer_receiving(const Transfer *t);
bool transfer_started(const Transfer *t);
/* 0 once every byte is here and sealed; -EINPROGRESS before; the error. */
int transfer_result(const Transfer *t, const WdError **ret_err);
void transfer_stats(const Transfer *t, TransferStats *ret);
/* Bytes of the component this node has (verified) and of the component. */
void transfer_progress(const Transfer *t, uint64_t *ret_done, uint64_t *ret_total);
const Component *transfer_component(const Transfer *t);
/* The shard this node serves in a part plan (NULL: the whole component). */
const ShardSpec *transfer_spec(const Transfer *t);
/* The model root's descriptor (the transfer's; -1 for a resident source). */
int transfer_root_fd(const Transfer *t);
/* Whether t is a part plan's transfer still making this node's part of comp
 * (the same files) that spec describes (NULL: the whole component). */
bool transfer_makes(const Transfer *t, const Component *comp, const ShardSpec *spec);

/* Move the chunks through lane (see TransferLane) from now on; before
 * transfer_start().  The transfer's ranks must be lane's.  Returns 0, or
 * -EINVAL (a part plan, or nodes that are not the lane's ranks). */
int transfer_set_lane(Transfer *t, TransferLane *lane);
/* Let go of the lane now (it failed elsewhere, or the cluster takes it
 * back): what it did not deliver goes over the data plane. */
void transfer_drop_lane(Transfer *t, const char *why);
/* Node (a rank) says the lane ended there: it gets what this node read
 * over the data plane from now on (again, where the lane did not deliver),
 * and the lane ends here too (ended() with why). */
void transfer_lane_down(Transfer *t, unsigned node, const char *why);

/* From the cluster: a node went down (its generation ended). */
void transfer_node_down(Transfer *t, unsigned node);
/* From the cluster: mesh messages for this plan. */
void transfer_chunk_sum(Transfer *t, unsigned node, uint32_t index, uint64_t xxh3);
void transfer_receiver_done(Transfer *t, unsigned node);
/* The source node will not send (it said Abort): read its chunks here. */
void transfer_source_failed(Transfer *t, unsigned node, const char *why);

/* From the cluster's timer, every deadline/4: sources silent for the
 * deadline that still owe this node chunks are failed here (their chunks
 * read from storage); a finished sender notices it is idle. */
void transfer_tick(Transfer *t);

/* From the data plane, for this plan (header checked for plan_id). */
void *transfer_incoming(Transfer *t, const TransferChunkHeader *h, uint64_t length, void **ret_token);
void transfer_received(void *token, int status);
