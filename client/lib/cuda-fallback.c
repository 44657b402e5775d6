/* Device slabs in a client built without the CUDA toolkit's headers: every
 * call answers WD_UNSUPPORTED. */
#include <stdio.h>
#include <string.h>

#include "client-internal.h"
#include "cuda-internal.h"

#define NO_CUDA "this libweightd-client was built without CUDA support"

int cuda_device_uuid(int ordinal, char *buf, size_t size, wd_error *err) {
        return error_set(err, WD_UNSUPPORTED, NO_CUDA);
}

int cuda_device_by_uuid(const char *uuid, int *ret_ordinal, wd_error *err) {
        return error_set(err, WD_UNSUPPORTED, NO_CUDA);
}

int cuda_target(const char *device, char *buf, size_t size, wd_error *err) {
        if (!device || !*device || strcmp(device, "host") == 0) {
                snprintf(buf, size, "%s", "");
                return WD_OK;
        }
        /* A UUID needs no driver to be named (a Prefetch to a device maps
         * nothing here); an ordinal of ours does. */
        if (strncmp(device, "cuda:GPU-", 9) == 0) {
                if (strlen(device) >= size)
                        return error_set(err, WD_INVALID_ARGUMENT, "device \"%.64s...\": too long", device);
                snprintf(buf, size, "%s", device);
                return WD_OK;
        }
        return error_set(err, WD_UNSUPPORTED, NO_CUDA ": name the device as cuda:GPU-<uuid>");
}

int cuda_import(int fd, const char *uuid, uint64_t map_size, CudaMapping *ret, wd_error *err) {
        return error_set(err, WD_UNSUPPORTED, NO_CUDA);
}

void cuda_unmap(CudaMapping *m) {
}
