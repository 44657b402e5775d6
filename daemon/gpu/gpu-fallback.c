/* The GPU tier of a build without the CUDA toolkit: every call says so with
 * -EOPNOTSUPP, so that callers carry no #ifdef and device requests get a
 * clear UNSUPPORTED. */
#include "gpu/gpu.h"

#define NO_CUDA "built without CUDA (the CUDA toolkit was not found when weightd was built)"

bool gpu_built(void) {
        return false;
}

bool gpu_emulated(void) {
        return false;
}

int gpu_new(Gpu **ret, const unsigned *only, size_t n_only, WdError *err) {
        return wd_error_set(err, -EOPNOTSUPP, NO_CUDA);
}

Gpu *gpu_free(Gpu *g) {
        return NULL;
}

size_t gpu_n_devices(const Gpu *g) {
        return 0;
}

const GpuDeviceInfo *gpu_device(const Gpu *g, size_t i) {
        return NULL;
}

uint64_t gpu_device_free_bytes(Gpu *g, size_t i) {
        return 0;
}

int gpu_slab_new(Gpu *g, size_t i, uint64_t bytes, GpuSlab **ret, WdError *err) {
        return wd_error_set(err, -EOPNOTSUPP, NO_CUDA);
}

GpuSlab *gpu_slab_free(GpuSlab *s) {
        return NULL;
}

int gpu_slab_fd(const GpuSlab *s) {
        return -1;
}

uint64_t gpu_slab_size(const GpuSlab *s) {
        return 0;
}

uint64_t gpu_slab_map_size(const GpuSlab *s) {
        return 0;
}

size_t gpu_slab_device(const GpuSlab *s) {
        return 0;
}

void *gpu_slab_address(const GpuSlab *s) {
        return NULL;
}

int gpu_host_register(Gpu *g, void *p, uint64_t size, bool read_only, WdError *err) {
        return g ? wd_error_set(err, -EOPNOTSUPP, NO_CUDA) : 0;
}

void gpu_host_unregister(Gpu *g, void *p) {
}

int gpu_copy_new(Gpu *g, size_t dev, const ShardPlan *plan, Slab *const *files, size_t n_files, bool read_only,
                 gpu_copy_fn wake, void *userdata, GpuCopy **ret) {
        return -EOPNOTSUPP;
}

void gpu_copy_advance(GpuCopy *c, size_t file, uint64_t filled) {
}

void gpu_copy_advance_all(GpuCopy *c) {
}

void gpu_copy_cancel(GpuCopy *c) {
}

uint64_t gpu_copy_copied(const GpuCopy *c) {
        return 0;
}

uint64_t gpu_copy_total(const GpuCopy *c) {
        return 0;
}

bool gpu_copy_finished(GpuCopy *c, int *ret_error, WdError *err) {
        *ret_error = -EOPNOTSUPP;
        wd_error_set(err, -EOPNOTSUPP, NO_CUDA);
        return true;
}

GpuCopy *gpu_copy_free(GpuCopy *c) {
        return NULL;
}

GpuSlab *gpu_copy_take_slab(GpuCopy *c) {
        return NULL;
}
