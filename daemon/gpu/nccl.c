/* NCCL, loaded at run time (see nccl.h). */
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <errno.h>
#include <nccl.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/nccl.h"

_Static_assert(sizeof(ncclUniqueId) == NCCL_ID_BYTES, "ncclUniqueId is not NCCL_ID_BYTES");

struct Nccl {
        void *dl;
        int version;
        ncclResult_t (*GetVersion)(int *version);
        const char *(*GetErrorString)(ncclResult_t result);
        const char *(*GetLastError)(ncclComm_t comm);
        ncclResult_t (*GetUniqueId)(ncclUniqueId *id);
        ncclResult_t (*CommInitRankConfig)(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank,
                                           ncclConfig_t *config);
        ncclResult_t (*CommGetAsyncError)(ncclComm_t comm, ncclResult_t *result);
        ncclResult_t (*Broadcast)(const void *send, void *recv, size_t count, ncclDataType_t type, int root,
                                  ncclComm_t comm, cudaStream_t stream);
        ncclResult_t (*CommAbort)(ncclComm_t comm);
};

struct NcclComm {
        Nccl *n;
        ncclComm_t comm;
        int device;
};

Nccl *nccl_close(Nccl *n) {
        if (!n)
                return NULL;
        if (n->dl)
                dlclose(n->dl);
        free(n);
        return NULL;
}

int nccl_open(Nccl **ret, WdError *err) {
        static const struct {
                const char *name;
                size_t offset;
        } syms[] = {
                { "ncclGetVersion", offsetof(Nccl, GetVersion) },
                { "ncclGetErrorString", offsetof(Nccl, GetErrorString) },
                { "ncclGetLastError", offsetof(Nccl, GetLastError) },
                { "ncclGetUniqueId", offsetof(Nccl, GetUniqueId) },
                { "ncclCommInitRankConfig", offsetof(Nccl, CommInitRankConfig) },
                { "ncclCommGetAsyncError", offsetof(Nccl, CommGetAsyncError) },
                { "ncclBroadcast", offsetof(Nccl, Broadcast) },
                { "ncclCommAbort", offsetof(Nccl, CommAbort) },
        };
        const char *file = getenv("WEIGHTD_NCCL_LIBRARY");
        _cleanup_(nccl_closep) Nccl *n = calloc(1, sizeof(Nccl));

        if (!n)
                return wd_error_set(err, -ENOMEM, "out of memory");
        if (!file || !*file)
                file = "libnccl.so.2";
        n->dl = dlopen(file, RTLD_NOW | RTLD_LOCAL);
        if (!n->dl)
                return wd_error_set(err, -ENOENT, "NCCL: cannot load %s: %s", file, dlerror());
        for (size_t i = 0; i < sizeof(syms) / sizeof(syms[0]); i++) {
                void *p = dlsym(n->dl, syms[i].name);

                if (!p)
                        return wd_error_set(err, -ENOSYS, "NCCL: %s has no %s (NCCL 2.19 or later is needed)", file,
                                            syms[i].name);
                memcpy((char *) n + syms[i].offset, &p, sizeof(p));
        }
        if (n->GetVersion(&n->version) != ncclSuccess)
                return wd_error_set(err, -EIO, "NCCL: %s: ncclGetVersion failed", file);
        *ret = TAKE_PTR(n);
        return 0;
}

int nccl_version(const Nccl *n) {
        return n->version;
}

static int nccl_error(Nccl *n, ncclComm_t comm, ncclResult_t r, WdError *err, const char *what) {
        const char *last = n->GetLastError(comm);

        return wd_error_set(err, -EIO, "NCCL: %s: %s%s%s", what, n->GetErrorString(r), last && *last ? ": " : "",
                            last ? last : "");
}

int nccl_unique_id(Nccl *n, uint8_t ret[NCCL_ID_BYTES], WdError *err) {
        ncclUniqueId id;
        ncclResult_t r = n->GetUniqueId(&id);

        if (r != ncclSuccess)
                return nccl_error(n, NULL, r, err, "ncclGetUniqueId");
        memcpy(ret, id.internal, NCCL_ID_BYTES);
        return 0;
}

int nccl_comm_init(Nccl *n, const uint8_t id[NCCL_ID_BYTES], int nranks, int rank, int device, NcclComm **ret,
                   WdError *err) {
        ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
        ncclUniqueId uid;
        cudaError_t ce;
        ncclResult_t r;
        NcclComm *c;

        if (nranks < 1 || rank < 0 || rank >= nranks)
                return wd_error_set(err, -EINVAL, "NCCL: rank %d of %d ranks", rank, nranks);
        ce = cudaSetDevice(device);
        if (ce != cudaSuccess)
                return wd_error_set(err, -ENODEV, "NCCL: cuda:%d: %s", device, cudaGetErrorString(ce));
        c = calloc(1, sizeof(NcclComm));
        if (!c)
                return wd_error_set(err, -ENOMEM, "out of memory");
        memcpy(uid.internal, id, NCCL_ID_BYTES);
        config.blocking = 0;
        r = n->CommInitRankConfig(&c->comm, nranks, uid, rank, &config);
        if (r != ncclSuccess && r != ncclInProgress) {
                int e = nccl_error(n, c->comm, r, err, "ncclCommInitRankConfig");

                if (c->comm)
                        (void) n->CommAbort(c->comm);
                free(c);
                return e;
        }
        c->n = n;
        c->device = device;
        *ret = c;
        return 0;
}

int nccl_comm_poll(NcclComm *c, WdError *err) {
        ncclResult_t state = ncclSuccess, r;

        r = c->n->CommGetAsyncError(c->comm, &state);
        if (r != ncclSuccess)
                return nccl_error(c->n, c->comm, r, err, "ncclCommGetAsyncError");
        if (state == ncclInProgress)
                return -EINPROGRESS;
        if (state != ncclSuccess)
                return nccl_error(c->n, c->comm, state, err, "the communicator");
        return 0;
}

int nccl_broadcast(NcclComm *c, const void *send, void *recv, size_t bytes, int root, void *stream, WdError *err) {
        ncclResult_t r = c->n->Broadcast(send, recv, bytes, ncclUint8, root, c->comm, (cudaStream_t) stream);

        if (r != ncclSuccess && r != ncclInProgress)
                return nccl_error(c->n, c->comm, r, err, "ncclBroadcast");
        return 0;
}

void nccl_comm_abort(NcclComm *c) {
        if (!c)
                return;
        if (c->comm)
                (void) c->n->CommAbort(c->comm);
        free(c);
}
