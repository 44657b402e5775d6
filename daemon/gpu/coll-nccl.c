/* The NCCL backend of the collectives table (gpu/collective.h): a thin
 * translation onto gpu/nccl.h and the CUDA runtime.  Each communicator has
 * one CUDA stream: copies (cudaMemcpyAsync), broadcasts (ncclBroadcast) and
 * signals (a CUDA event each) go on it in the order enqueued, so that the
 * order the table promises is the stream's own.  Never run on a machine
 * without a GPU (NCCL cannot initialise there): the CPU tests run the host
 * backend (cluster/coll-host.c) instead. */
#include <cuda_runtime_api.h>
#include <errno.h>
#include <stdlib.h>

#include "gpu/collective.h"
#include "gpu/nccl.h"
#include "util/time-util.h"

/* How long an NCCL call that answered "in progress" may take to be
 * enqueued, polled from the loop (it is about queueing, not the transfer). */
#define NCCL_ENQUEUE_USEC (2u * 1000 * 1000)

typedef struct Signal {
        GpuCollOp *op;
        cudaEvent_t event;
        struct Signal *next;
} Signal;

struct GpuCollComm {
        Nccl *n;
        NcclComm *comm;
        int device;
        cudaStream_t stream;
        Signal *head, *tail;
        int failed; /* 0, or the error once */
        /* progress() runs dones: an abort from one waits for it to return. */
        bool in_progress, aborting;
        void (*gone)(void *userdata);
        void *gone_userdata;
};

static void coll_abort(GpuCollComm *c, void (*gone)(void *userdata), void *userdata);

static int cuda_fail(cudaError_t e, WdError *err, int device, const char *what) {
        return wd_error_set(err, e == cudaErrorMemoryAllocation ? -ENOMEM : -EIO, "cuda:%d: %s: %s", device, what,
                            cudaGetErrorName(e));
}

static int coll_unique_id(void *backend, uint8_t ret[GPU_COLL_ID_BYTES], WdError *err) {
        return nccl_unique_id(backend, ret, err);
}

static int coll_comm_init(void *backend, const uint8_t id[GPU_COLL_ID_BYTES], int nranks, int rank, int device,
                          const unsigned *peers, GpuCollComm **ret, WdError *err) {
        GpuCollComm *c = calloc(1, sizeof(GpuCollComm));
        cudaError_t e;
        int r;

        if (!c)
                return wd_error_set(err, -ENOMEM, "out of memory");
        c->n = backend;
        c->device = device;
        r = nccl_comm_init(backend, id, nranks, rank, device, &c->comm, err);
        if (r < 0) {
                free(c);
                return r;
        }
        /* nccl_comm_init() made the device current. */
        e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking);
        if (e != cudaSuccess) {
                nccl_comm_abort(c->comm);
                free(c);
                return cuda_fail(e, err, device, "cannot create a stream");
        }
        *ret = c;
        return 0;
}

static int coll_comm_poll(GpuCollComm *c, WdError *err) {
        int r;

        if (c->failed)
                return wd_error_set(err, -EIO, "cuda:%d: the NCCL communicator failed", c->device);
        r = nccl_comm_poll(c->comm, err);
        if (r == -EIO)
                c->failed = r;
        return r;
}

/* NCCL calls on a non-blocking communicator may answer "in progress": the
 * next call must wait until the communicator says otherwise. */
static int settle(GpuCollComm *c, WdError *err) {
        uint64_t until = now_usec() + NCCL_ENQUEUE_USEC;
        int r;

        while ((r = coll_comm_poll(c, err)) == -EINPROGRESS)
                if (now_usec() > until) {
                        c->failed = -ETIMEDOUT;
                        return wd_error_set(err, -EIO, "cuda:%d: NCCL did not enqueue within %u ms", c->device,
                                            NCCL_ENQUEUE_USEC / 1000);
                }
        return r;
}

static int coll_copy(GpuCollComm *c, void *dst, const void *src, size_t bytes, WdError *err) {
        cudaError_t e = cudaSetDevice(c->device);

        if (e == cudaSuccess)
                e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, c->stream);
        if (e != cudaSuccess) {
                c->failed = -EIO;
                return cuda_fail(e, err, c->device, "cudaMemcpyAsync");
        }
        return 0;
}

static int coll_broadcast(GpuCollComm *c, const void *send, void *recv, size_t bytes, int root, WdError *err) {
        int r = settle(c, err);

        if (r == 0)
                r = nccl_broadcast(c->comm, send, recv, bytes, root, c->stream, err);
        if (r == 0)
                r = settle(c, err);
        if (r < 0)
                c->failed = r;
        return r;
}

static int coll_signal(GpuCollComm *c, GpuCollOp *op, WdError *err) {
        Signal *s = calloc(1, sizeof(Signal));
        cudaError_t e;

        if (!s)
                return wd_error_set(err, -ENOMEM, "out of memory");
        e = cudaSetDevice(c->device);
        if (e == cudaSuccess)
                e = cudaEventCreateWithFlags(&s->event, cudaEventDisableTiming);
        if (e == cudaSuccess && (e = cudaEventRecord(s->event, c->stream)) != cudaSuccess)
                (void) cudaEventDestroy(s->event);
        if (e != cudaSuccess) {
                free(s);
                c->failed = -EIO;
                return cuda_fail(e, err, c->device, "cannot record an event");
        }
        s->op = op;
        if (c->tail)
                c->tail->next = s;
        else
                c->head = s;
        c->tail = s;
        return 0;
}

/* The signals whose events passed, in order.  A failed stream or
 * communicator leaves them pending: the owner's deadline aborts it. */
static void coll_progress(GpuCollComm *c) {
        WdError err = WD_ERROR_NULL;

        if (c->failed || nccl_comm_poll(c->comm, &err) == -EIO) {
                c->failed = c->failed ? c->failed : -EIO;
                return;
        }
        c->in_progress = true;
        while (c->head && !c->aborting) {
                Signal *s = c->head;
                cudaError_t e = cudaEventQuery(s->event);

                if (e == cudaErrorNotReady)
                        return;
                if (e != cudaSuccess) {
                        c->failed = -EIO;
                        return;
                }
                c->head = s->next;
                if (!c->head)
                        c->tail = NULL;
                (void) cudaEventDestroy(s->event);
                s->op->done(s->op, 0);
                free(s);
        }
        c->in_progress = false;
        if (c->aborting)
                coll_abort(c, c->gone, c->gone_userdata);
}

static void coll_abort(GpuCollComm *c, void (*gone)(void *userdata), void *userdata) {
        if (c->in_progress) {
                c->aborting = true;
                c->gone = gone;
                c->gone_userdata = userdata;
                return;
        }
        (void) cudaSetDevice(c->device);
        nccl_comm_abort(c->comm); /* stops NCCL's kernels, so the stream drains */
        (void) cudaStreamSynchronize(c->stream);
        while (c->head) {
                Signal *s = c->head;

                c->head = s->next;
                (void) cudaEventDestroy(s->event);
                free(s);
        }
        (void) cudaStreamDestroy(c->stream);
        free(c);
        if (gone)
                gone(userdata);
}

static const GpuCollOps nccl_ops = {
        .name = "nccl",
        .unique_id = coll_unique_id,
        .comm_init = coll_comm_init,
        .comm_poll = coll_comm_poll,
        .copy = coll_copy,
        .broadcast = coll_broadcast,
        .signal = coll_signal,
        .progress = coll_progress,
        .abort = coll_abort,
};

int gpu_coll_nccl_new(GpuColl *ret, WdError *err) {
        Nccl *n = NULL;
        int r = nccl_open(&n, err);

        if (r < 0)
                return r;
        *ret = (GpuColl){ .ops = &nccl_ops, .backend = n, .version = nccl_version(n) };
        return 0;
}

void gpu_coll_nccl_free(GpuColl *c) {
        if (c && c->ops == &nccl_ops)
                nccl_close(c->backend);
        if (c)
                *c = (GpuColl){ 0 };
}
