/* Builds without NCCL's header (no CUDA toolkit, or the emulated GPUs of
 * the test builds): no NCCL backend (gpu/collective.h). */
#include <errno.h>

#include "gpu/collective.h"

int gpu_coll_nccl_new(GpuColl *ret, WdError *err) {
        return wd_error_set(err, -EOPNOTSUPP, "NCCL: built without NCCL's header");
}

void gpu_coll_nccl_free(GpuColl *c) {
}
