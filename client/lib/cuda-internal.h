/* Device slabs in the client (cuda.c): the CUDA driver reached with
 * dlopen("libcuda.so.1") and cuGetProcAddress, never linked.  Every
 * function returns WD_OK, or WD_UNSUPPORTED when this process has no usable
 * driver (the message says why), WD_INVALID_ARGUMENT for a device it does
 * not see, WD_RESOURCE_EXHAUSTED, WD_INTERNAL with the driver's error name. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "weightd/client.h"

typedef struct CudaMapping {
        int device;      /* this process's ordinal */
        uint64_t ptr;    /* CUdeviceptr of offset 0 */
        size_t size;     /* mapped bytes; 0 when not mapped */
        bool read_only;  /* the driver gave read-only access (else read-write) */
} CudaMapping;

/* "GPU-<uuid>" of this process's ordinal. */
int cuda_device_uuid(int ordinal, char *buf, size_t size, wd_error *err);
/* This process's ordinal of the device with that UUID. */
int cuda_device_by_uuid(const char *uuid, int *ret_ordinal, wd_error *err);
/* The daemon's target for a user's device: "" for the host tier, "cuda:GPU-..."
 * for "cuda:N" (our ordinal) or "cuda:GPU-...". */
int cuda_target(const char *device, char *buf, size_t size, wd_error *err);
/* Import a device slab's descriptor (not taken) and map map_size bytes with
 * read/write access on the device with that UUID. */
int cuda_import(int fd, const char *uuid, uint64_t map_size, CudaMapping *ret, wd_error *err);
/* Unmap and free the address range; the memory goes when no process maps it. */
void cuda_unmap(CudaMapping *m);
