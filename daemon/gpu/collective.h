/* Collectives among the same-index GPUs of the cluster's nodes: the table
 * the cluster's GPU lane (cluster/fetch.c) moves component bytes through,
 * device to device, and its two backends (DESIGN.md, "Cluster"):
 *
 * - NCCL (gpu/coll-nccl.c, over gpu/nccl.h): libnccl.so.2 loaded with
 *   dlopen(), a non-blocking communicator, one CUDA stream per
 *   communicator that the copies, the broadcasts and the signals go on in
 *   order.  Built where the CUDA toolkit has nccl.h; run only on GPUs.
 * - host (cluster/coll-host.c): the same collectives over the cluster's
 *   host links (the data plane), for the emulated GPUs of the test builds,
 *   whose device memory is host memory.  NCCL cannot initialise on a
 *   machine without a GPU, so this is what the CPU tests run.
 *
 * A communicator behaves as a CUDA stream: what is enqueued on it (copy,
 * broadcast, signal) runs in the order enqueued, and every rank must
 * enqueue the same broadcasts in the same order (as with NCCL).  A
 * communicator that failed once is never used again: the owner aborts it.
 *
 * Loop thread only (the NCCL backend makes the CUDA device current itself). */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "util/error.h"

#define GPU_COLL_ID_BYTES 128u /* sizeof(ncclUniqueId) */

typedef struct GpuCollComm GpuCollComm;
typedef struct GpuCollOp GpuCollOp;

/* A signal: done runs on the loop thread once everything enqueued on the
 * communicator before it ended (status 0), or never when the communicator
 * is aborted first (the owner knows what it had in flight). */
struct GpuCollOp {
        void (*done)(GpuCollOp *op, int status);
        GpuCollOp *next; /* the backend's */
};

typedef struct GpuCollOps {
        const char *name; /* "nccl", "host" */
        /* A new id (rank 0 makes it; it reaches the others over the
         * authenticated mesh).  Returns 0 or -EIO with err set. */
        int (*unique_id)(void *backend, uint8_t ret[GPU_COLL_ID_BYTES], WdError *err);
        /* Start a communicator of nranks in which this node is rank, on
         * device (the daemon's CUDA ordinal); peers[r] is rank r's mesh
         * index (the host backend's links; NCCL ignores it).  Poll it until
         * ready.  Returns 0, -ENODEV, -ENOMEM, -EIO with err set. */
        int (*comm_init)(void *backend, const uint8_t id[GPU_COLL_ID_BYTES], int nranks, int rank, int device,
                         const unsigned *peers, GpuCollComm **ret, WdError *err);
        /* 0 once ready and idle or working, -EINPROGRESS while it
         * initializes, -EIO with err set once it failed (abort it). */
        int (*comm_poll)(GpuCollComm *c, WdError *err);
        /* Enqueue: bytes from src to dst, either in host or device memory of
         * the communicator's device.  Returns 0 or -EIO with err set. */
        int (*copy)(GpuCollComm *c, void *dst, const void *src, size_t bytes, WdError *err);
        /* Enqueue: bytes from root's send to every other rank's recv (device
         * memory; send is ignored on the others). */
        int (*broadcast)(GpuCollComm *c, const void *send, void *recv, size_t bytes, int root, WdError *err);
        /* Enqueue op (see GpuCollOp). */
        int (*signal)(GpuCollComm *c, GpuCollOp *op, WdError *err);
        /* From the loop, while signals are pending: run the done of those
         * that ended.  Where completions are events (the host backend),
         * nothing to do. */
        void (*progress)(GpuCollComm *c);
        /* End it now, whatever it does (ncclCommAbort), and free it; gone
         * runs (possibly within the call) once nothing touches the memory
         * that was enqueued any more. */
        void (*abort)(GpuCollComm *c, void (*gone)(void *userdata), void *userdata);
} GpuCollOps;

/* A backend: its table and its state. */
typedef struct GpuColl {
        const GpuCollOps *ops;
        void *backend;
        int version; /* NCCL_VERSION_CODE, 0 for the host backend */
} GpuColl;

/* The NCCL backend (libnccl.so.2, or $WEIGHTD_NCCL_LIBRARY).  Returns 0,
 * -EOPNOTSUPP (built without NCCL's header), -ENOENT (no library), -ENOSYS
 * (too old), with err set. */
int gpu_coll_nccl_new(GpuColl *ret, WdError *err);
void gpu_coll_nccl_free(GpuColl *c);
