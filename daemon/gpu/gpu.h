/* The GPU tier: device discovery, device slabs, page-locked host slabs and
 * the host-to-device copy engine.
 *
 * gpu_new() finds the CUDA devices through the runtime (the static cudart)
 * and the driver's entry points (cudaGetDriverEntryPointByVersion), so the
 * daemon never links libcuda and starts where there is no driver; then the
 * tier is off and the error says why.  Built without the toolkit,
 * gpu-fallback.c answers every call with -EOPNOTSUPP and "built without
 * CUDA".
 *
 * A device slab (GpuSlab) is one CUDA VMM allocation (cuMemCreate with POSIX
 * file descriptor handles, rounded up to the allocation granularity) holding
 * a whole component on one device, mapped into the daemon's address space
 * so that the copies can fill it, and exported as a file descriptor for the
 * clients.  The memory lives while any process holds a handle or a mapping.
 *
 * A copy (GpuCopy) fills a device slab from host slabs along a layout plan
 * (store/shard.h): one cudaMemcpyAsync or cudaMemcpy2DAsync per planned
 * tensor, issued on the device's copy streams by the device's own thread as
 * soon as the tensor's source bytes are in its host slab
 * (gpu_copy_advance()), completion tracked with CUDA events on that thread.
 * The owner hears of progress and of the end through a callback that runs on
 * the device thread: keep it short and wake your own loop.
 *
 * Host slabs that copies read from are page-locked (cudaHostRegister, in
 * pieces of at most GPU_REGISTER_PIECE bytes) on first use and stay so until
 * gpu_host_unregister(), which the owner must call before the mapping goes
 * away (a slab is sealed or freed).
 *
 * Errors of CUDA and of the driver are turned into our codes at one boundary
 * (gpu_check() and cu_check() in gpu-cuda.c): -ENOMEM for memory, -ENODEV for
 * a missing driver or device, -EIO otherwise, with the CUDA error's name in
 * the message. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "store/shard.h"
#include "store/slab.h"
#include "util/error.h"

#define GPU_ALIGN 256u                        /* tensor offsets in a device slab */
#define GPU_REGISTER_PIECE (64ull << 30)      /* largest cudaHostRegister call */
#define GPU_UUID_MAX 48                       /* "GPU-" + 36 + NUL, with room */
#define GPU_MAX_DEVICES 64u

typedef struct GpuDeviceInfo {
        unsigned index;          /* the daemon's CUDA ordinal */
        char uuid[GPU_UUID_MAX]; /* "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", as nvidia-smi -L prints it */
        char name[256];          /* "NVIDIA H200" */
        char pci_bus_id[32];     /* "0000:19:00.0" */
        uint64_t total_bytes;
        uint64_t granularity;    /* of VMM allocations with POSIX fd handles */
        bool host_register_read_only; /* cudaDevAttrHostRegisterReadOnlySupported: sealed (read-only)
                                       * host slabs are page-locked with cudaHostRegisterReadOnly; without
                                       * it they are registered without the flag */
} GpuDeviceInfo;

typedef struct Gpu Gpu;
typedef struct GpuSlab GpuSlab;
typedef struct GpuCopy GpuCopy;

/* Whether this build has the CUDA code. */
bool gpu_built(void);
/* Whether its devices are emulated in host memory (-Dgpu_emulation=true):
 * device addresses are host addresses then. */
bool gpu_emulated(void);

/* Find the devices and start one thread per device.  Blocking (the driver's
 * initialisation takes a while): call it off the loop.  only: the ordinals
 * to serve (n_only 0: all).  Returns 0, or -EOPNOTSUPP (built without
 * CUDA), -ENODEV (no driver, a driver older than the runtime, no device, or
 * none of only), -ENOMEM, -EIO with err saying why. */
int gpu_new(Gpu **ret, const unsigned *only, size_t n_only, WdError *err);
/* Stops the threads; every copy must have ended.  Accepts NULL. */
Gpu *gpu_free(Gpu *g);
DEFINE_TRIVIAL_CLEANUP_FUNC(Gpu *, gpu_free);

size_t gpu_n_devices(const Gpu *g);
const GpuDeviceInfo *gpu_device(const Gpu *g, size_t i);
/* Bytes of device memory free now (cudaMemGetInfo); 0 when unknown. */
uint64_t gpu_device_free_bytes(Gpu *g, size_t i);

/* Target names (gpu-target.c, in every build).  A device target is
 * "cuda:N" (N a decimal ordinal, at most GPU_MAX_DEVICES - 1) or
 * "cuda:GPU-<uuid>" (hex digits and dashes).  Returns 1 for a device
 * target (with the ordinal, or -1 and the uuid), 0 for the host tier ("" or
 * "host"), WD_E_INVALID for anything else.  ret_uuid has GPU_UUID_MAX
 * bytes. */
int gpu_target_parse(const char *target, int *ret_ordinal, char *ret_uuid);
/* The device among devs that target names.  Returns 0 with its index,
 * WD_E_NOT_FOUND when no device matches, WD_E_INVALID when target is no
 * device target. */
int gpu_target_lookup(const GpuDeviceInfo *devs, size_t n, const char *target, size_t *ret_index);

/* A device slab of at least bytes (rounded up to the granularity) on device
 * i, mapped into the daemon and exported.  Returns 0, -ENOMEM (the device
 * is out of memory), -EIO, with err filled. */
int gpu_slab_new(Gpu *g, size_t i, uint64_t bytes, GpuSlab **ret, WdError *err);
/* Unmaps the daemon's mapping and releases its handle and descriptor;
 * processes that imported it keep the memory.  Accepts NULL. */
GpuSlab *gpu_slab_free(GpuSlab *s);
DEFINE_TRIVIAL_CLEANUP_FUNC(GpuSlab *, gpu_slab_free);
int gpu_slab_fd(const GpuSlab *s);
uint64_t gpu_slab_size(const GpuSlab *s);     /* bytes asked for */
uint64_t gpu_slab_map_size(const GpuSlab *s); /* bytes allocated (granularity) */
size_t gpu_slab_device(const GpuSlab *s);
/* The slab's address in the daemon's mapping: a device address (CUDA's
 * unified addressing), a host address on emulated devices. */
void *gpu_slab_address(const GpuSlab *s);

/* Page-lock [p, p + size) for copies (idempotent per p, size and
 * read_only; a registration overlapping the range otherwise is taken for a
 * mapping that is gone and is dropped first).  read_only: the mapping is
 * read-only (a sealed slab); registered with cudaHostRegisterReadOnly where
 * the device supports it (GpuDeviceInfo.host_register_read_only).  Any
 * thread.  Returns 0, -ENOMEM, -EOPNOTSUPP, -EIO with err filled.
 * gpu_host_unregister() undoes the registration at p (nothing when p was
 * never registered); both accept g NULL. */
int gpu_host_register(Gpu *g, void *p, uint64_t size, bool read_only, WdError *err);
void gpu_host_unregister(Gpu *g, void *p);

/* Called on the device thread when a copy made progress or ended.  After
 * the end the copy may be gone already: c is the copy's address, for
 * comparison only, never to dereference. */
typedef void (*gpu_copy_fn)(GpuCopy *c, void *userdata);

/* Create a device slab of plan->bytes on device dev and fill it along plan
 * (which must outlive the copy) from the host slabs files[0..n_files) (the
 * plan's file indices; their data must stay mapped until the copy ended).
 * The slab is created and the host slabs page-locked on the device's
 * thread; nothing is copied until gpu_copy_advance() says the bytes are
 * there.  read_only: the host slabs are sealed.  wake runs on the device
 * thread after progress and once after the end was published: once
 * gpu_copy_finished() says so, the owner may free the copy at once, from any
 * thread, even while that last wake still runs.  So userdata must outlive
 * the copy (a long-lived queue or loop handle, not the job that owns the
 * copy), and wake must touch neither c nor the copy's owner: it only tells
 * userdata to look (e.g. kicks the queue), and the owner then asks
 * gpu_copy_finished() on its own thread.  Returns 0, -ENODEV, -ENOMEM. */
int gpu_copy_new(Gpu *g, size_t dev, const ShardPlan *plan, Slab *const *files, size_t n_files, bool read_only,
                 gpu_copy_fn wake, void *userdata, GpuCopy **ret);
/* The first filled bytes of file are in its slab (monotone; smaller values
 * are ignored).  Any thread. */
void gpu_copy_advance(GpuCopy *c, size_t file, uint64_t filled);
/* Every file is whole in its slab. */
void gpu_copy_advance_all(GpuCopy *c);
/* Stop issuing copies; the copy ends with -ECANCELED once the ones in flight
 * landed.  Any thread. */
void gpu_copy_cancel(GpuCopy *c);
/* Bytes copied to the device so far, and the bytes to copy. */
uint64_t gpu_copy_copied(const GpuCopy *c);
uint64_t gpu_copy_total(const GpuCopy *c);
/* Whether the copy ended; then *ret_error (0, -ECANCELED, -errno) and err
 * say how. */
bool gpu_copy_finished(GpuCopy *c, int *ret_error, WdError *err);
/* The filled device slab, once the copy finished without error; NULL
 * otherwise (the copy frees it then). */
GpuSlab *gpu_copy_take_slab(GpuCopy *c);
/* Only once it finished (or before it was started).  Accepts NULL. */
GpuCopy *gpu_copy_free(GpuCopy *c);
DEFINE_TRIVIAL_CLEANUP_FUNC(GpuCopy *, gpu_copy_free);
