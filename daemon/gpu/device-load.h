/* The GPU tier's jobs: one Cache per device (entries hold a GpuSlab) and the
 * device load, a Job (store/job.h) that fills a device slab from the host
 * copy of a component.
 *
 * A device load plans the component's layout (store/shard.h, 256-byte
 * aligned tensors; a sharded load's plan holds only its rank's slices, its
 * entry keyed by the shard's variant), reserves the bytes in the device's
 * cache and copies from the host slabs: at once from a resident host entry
 * (referenced meanwhile), or while a host load reads them, fed by the
 * reader's watermarks (HostLoadFeed).  Either way it is a waiter of that
 * host load, so it hears its outcome, and when its own last waiter leaves
 * it cancels its copy and stops waiting, which cancels the read if nothing
 * else wants it.  A host load that is already sealing is waited for, and the
 * copy then starts from the resident entry it made.  The device entry is
 * published (resident, waiters answered) only once the copy ended AND the
 * host side was verified: a file that changed during the read fails the
 * device load too.
 *
 * Copies run on the device's thread (gpu/copy-engine.c); its wake is a bare
 * completion_kick() of the queue, and the loop polls the copies
 * (device_tier_poll()), so no thread ever touches a device load. */
#pragma once

#include "gpu/gpu.h"
#include "store/host-load.h"
#include "store/shard.h"
#include "store/store.h"

typedef struct DeviceTier {
        Gpu *gpu;
        Cache **caches; /* one per device, gpu_n_devices() */
        JobList jobs;   /* device loads, of every device */
        Store *store;   /* the host tier they copy from */
} DeviceTier;

typedef struct DeviceLoadParams {
        size_t dev;             /* index in gpu */
        int root_fd;            /* where comp's files are opened, for a host load */
        const ShardSpec *spec;  /* NULL: whole tensors */
        const char *variant;    /* spec's key, "" for whole tensors */
        bool keep_host;         /* keep the host copy afterwards */
        uint64_t requested_usec;
} DeviceLoadParams;

/* Start a device load of comp (copied as needed).  Returns 0 with *ret
 * referenced for the caller, or WD_E_BUDGET, WD_E_INVALID, -errno with err
 * set. */
int device_load_start(DeviceTier *t, const Component *comp, const DeviceLoadParams *p, Job **ret, WdError *err);
/* On the loop after every wake: finish the device loads whose copy ended,
 * send progress. */
void device_tier_poll(void *tier);
/* The gpu_copy_fn for copies whose userdata is the completion queue. */
void device_copy_wake(GpuCopy *c, void *queue);
