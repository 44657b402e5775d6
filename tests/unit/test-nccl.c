/* NCCL loaded at run time (gpu/nccl.c), against NCCL linked the ordinary
 * way (the version it reports), and where no GPU is: what a node without
 * NCCL or without a device gets.  With a GPU, a one-rank communicator
 * broadcasts a buffer to itself and the bytes are read back with
 * cudaMemcpy; and the collectives table's NCCL backend (gpu/coll-nccl.c)
 * runs the lane's pattern: host to a device slot, broadcast, device slot to
 * host, a signal whose done comes through progress().  Built where the CUDA
 * toolkit and NCCL are. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <cuda_runtime_api.h>
#include <nccl.h>

#include "gpu/collective.h"
#include "gpu/nccl.h"

static void test_version_matches_linked_nccl(void **state) {
        _cleanup_(nccl_closep) Nccl *n = NULL;
        WdError err = WD_ERROR_NULL;
        int linked = 0;

        if (nccl_open(&n, &err) != 0)
                fail_msg("%s", err.message);
        assert_int_equal(ncclGetVersion(&linked), ncclSuccess);
        assert_int_equal(nccl_version(n), linked);
        assert_true(nccl_version(n) >= 21900);
}

static void test_missing_library_and_symbols(void **state) {
        Nccl *n = NULL;
        WdError err = WD_ERROR_NULL;

        setenv("WEIGHTD_NCCL_LIBRARY", "/nonexistent/libnccl.so.2", 1);
        assert_int_equal(nccl_open(&n, &err), -ENOENT);
        assert_non_null(strstr(err.message, "/nonexistent/libnccl.so.2"));
        /* A library that loads but is not NCCL. */
        setenv("WEIGHTD_NCCL_LIBRARY", "libm.so.6", 1);
        assert_int_equal(nccl_open(&n, &err), -ENOSYS);
        assert_non_null(strstr(err.message, "ncclGetVersion"));
        assert_null(n);
        unsetenv("WEIGHTD_NCCL_LIBRARY");
}

static void test_unique_ids(void **state) {
        _cleanup_(nccl_closep) Nccl *n = NULL;
        WdError err = WD_ERROR_NULL;
        uint8_t a[NCCL_ID_BYTES], b[NCCL_ID_BYTES];

        if (nccl_open(&n, &err) != 0)
                fail_msg("%s", err.message);
        if (nccl_unique_id(n, a, &err) != 0 || nccl_unique_id(n, b, &err) != 0)
                fail_msg("%s", err.message);
        assert_memory_not_equal(a, b, NCCL_ID_BYTES);
}

static void test_broadcast_or_no_device(void **state) {
        _cleanup_(nccl_closep) Nccl *n = NULL;
        WdError err = WD_ERROR_NULL;
        uint8_t id[NCCL_ID_BYTES];
        NcclComm *c = NULL;
        int count = 0, r;

        if (nccl_open(&n, &err) != 0 || nccl_unique_id(n, id, &err) != 0)
                fail_msg("%s", err.message);
        if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
                /* No GPU here: the device is refused, naming it. */
                assert_int_equal(nccl_comm_init(n, id, 1, 0, 0, &c, &err), -ENODEV);
                assert_non_null(strstr(err.message, "cuda:0"));
                assert_int_equal(nccl_comm_init(n, id, 1, 1, 0, &c, &err), -EINVAL);
                return;
        }
        const size_t bytes = 1u << 20;
        uint8_t *host = malloc(bytes), *back = malloc(bytes);
        void *send = NULL, *recv = NULL;

        assert_non_null(host);
        assert_non_null(back);
        for (size_t i = 0; i < bytes; i++)
                host[i] = (uint8_t) (i * 2654435761u >> 13);
        if (nccl_comm_init(n, id, 1, 0, 0, &c, &err) != 0)
                fail_msg("%s", err.message);
        while ((r = nccl_comm_poll(c, &err)) == -EINPROGRESS)
                ;
        if (r != 0)
                fail_msg("%s", err.message);
        assert_int_equal(cudaMalloc(&send, bytes), cudaSuccess);
        assert_int_equal(cudaMalloc(&recv, bytes), cudaSuccess);
        assert_int_equal(cudaMemcpy(send, host, bytes, cudaMemcpyHostToDevice), cudaSuccess);
        if (nccl_broadcast(c, send, recv, bytes, 0, NULL, &err) != 0)
                fail_msg("%s", err.message);
        while ((r = nccl_comm_poll(c, &err)) == -EINPROGRESS)
                ;
        assert_int_equal(r, 0);
        assert_int_equal(cudaDeviceSynchronize(), cudaSuccess);
        assert_int_equal(cudaMemcpy(back, recv, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
        assert_memory_equal(back, host, bytes);
        nccl_comm_abort(c);
        cudaFree(send);
        cudaFree(recv);
        free(host);
        free(back);
}

typedef struct Done {
        GpuCollOp op;
        int calls, status;
} Done;

static void done_fn(GpuCollOp *op, int status) {
        Done *d = (Done *) op;

        d->calls++;
        d->status = status;
}

static void test_table_lane_pattern_or_no_device(void **state) {
        GpuColl coll = { 0 };
        WdError err = WD_ERROR_NULL;
        uint8_t id[GPU_COLL_ID_BYTES];
        unsigned peers[1] = { 0 };
        GpuCollComm *c = NULL;
        int count = 0, r;

        if (gpu_coll_nccl_new(&coll, &err) != 0)
                fail_msg("%s", err.message);
        assert_string_equal(coll.ops->name, "nccl");
        if (coll.ops->unique_id(coll.backend, id, &err) != 0)
                fail_msg("%s", err.message);
        if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
                assert_int_equal(coll.ops->comm_init(coll.backend, id, 1, 0, 0, peers, &c, &err), -ENODEV);
                gpu_coll_nccl_free(&coll);
                return;
        }
        const size_t bytes = 3u << 20;
        uint8_t *host = NULL, *back = NULL;
        void *slot = NULL;
        Done d = { .op.done = done_fn };

        /* Page-locked, as the lane's host slabs are. */
        assert_int_equal(cudaMallocHost((void **) &host, bytes), cudaSuccess);
        assert_int_equal(cudaMallocHost((void **) &back, bytes), cudaSuccess);
        for (size_t i = 0; i < bytes; i++)
                host[i] = (uint8_t) (i * 2246822519u >> 11);
        memset(back, 0, bytes);
        if (coll.ops->comm_init(coll.backend, id, 1, 0, 0, peers, &c, &err) != 0)
                fail_msg("%s", err.message);
        while ((r = coll.ops->comm_poll(c, &err)) == -EINPROGRESS)
                ;
        if (r != 0)
                fail_msg("%s", err.message);
        assert_int_equal(cudaMalloc(&slot, bytes), cudaSuccess);
        assert_int_equal(coll.ops->copy(c, slot, host, bytes, &err), 0);
        assert_int_equal(coll.ops->broadcast(c, slot, slot, bytes, 0, &err), 0);
        assert_int_equal(coll.ops->copy(c, back, slot, bytes, &err), 0);
        assert_int_equal(coll.ops->signal(c, &d.op, &err), 0);
        while (d.calls == 0)
                coll.ops->progress(c);
        assert_int_equal(d.calls, 1);
        assert_int_equal(d.status, 0);
        assert_memory_equal(back, host, bytes);
        coll.ops->abort(c, NULL, NULL);
        cudaFree(slot);
        cudaFreeHost(host);
        cudaFreeHost(back);
        gpu_coll_nccl_free(&coll);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_version_matches_linked_nccl),
                cmocka_unit_test(test_missing_library_and_symbols),
                cmocka_unit_test(test_unique_ids),
                cmocka_unit_test(test_broadcast_or_no_device),
                cmocka_unit_test(test_table_lane_pattern_or_no_device),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
