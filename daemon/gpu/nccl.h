/* NCCL, loaded at run time: the collectives the cluster's GPU tier will use
 * to move component bytes between the same-index GPUs of its nodes
 * (DESIGN.md, "Cluster").  A thin translation of the calls it needs, so
 * that it has little to get wrong:
 *
 * - libnccl.so.2 is opened with dlopen() ($WEIGHTD_NCCL_LIBRARY names
 *   another file), never linked, so weightd starts where NCCL is absent;
 * - a communicator is non-blocking (ncclConfig_t.blocking = 0): its
 *   initialization is polled, and a deadline ends it with ncclCommAbort();
 * - a communicator that failed once is never used again.
 *
 * Built where the CUDA toolkit is (its nccl.h); nothing in the daemon calls
 * it yet: cluster prefetches to devices move bytes host to host
 * (docs/cluster.md).  Not thread-safe: one thread per communicator. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "util/error.h"

#define NCCL_ID_BYTES 128u

typedef struct Nccl Nccl;
typedef struct NcclComm NcclComm;

/* Open the library and find its entry points.  Returns 0, -ENOENT (no
 * library: err says which file and why), -ENOSYS (a symbol is missing: too
 * old an NCCL). */
int nccl_open(Nccl **ret, WdError *err);
Nccl *nccl_close(Nccl *n);
DEFINE_TRIVIAL_CLEANUP_FUNC(Nccl *, nccl_close);

/* NCCL_VERSION_CODE of the library loaded (22809 for 2.28.9). */
int nccl_version(const Nccl *n);

/* A new unique id, for the ranks of one communicator (rank 0 makes it and
 * sends it to the others).  Returns 0 or -EIO with err set. */
int nccl_unique_id(Nccl *n, uint8_t ret[NCCL_ID_BYTES], WdError *err);

/* Start a communicator of nranks in which this process is rank, on CUDA
 * device ordinal device (made current for the call).  Returns 0 with *ret
 * (poll it until ready), or an error with err set: -ENODEV (no such
 * device), -EIO (NCCL refused). */
int nccl_comm_init(Nccl *n, const uint8_t id[NCCL_ID_BYTES], int nranks, int rank, int device, NcclComm **ret,
                   WdError *err);
/* 0 once ready, -EINPROGRESS while it initializes or an operation runs, or
 * -EIO with err set (it failed: abort it). */
int nccl_comm_poll(NcclComm *c, WdError *err);
/* Broadcast bytes from root's send to every rank's recv (device memory), on
 * stream (a cudaStream_t; NULL: the default stream).  Returns 0 (enqueued:
 * poll, or synchronize the stream), or -EIO with err set. */
int nccl_broadcast(NcclComm *c, const void *send, void *recv, size_t bytes, int root, void *stream, WdError *err);
/* End it now, whatever it does (ncclCommAbort), and free it. */
void nccl_comm_abort(NcclComm *c);
