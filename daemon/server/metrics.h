/* The daemon's Prometheus metrics, on the loop side: the counters nothing
 * below the server keeps (cache hits and misses, load durations by tier and
 * outcome), and the rendering of every metric in the text exposition format
 * from the figures Status reports.  Loop thread only; the HTTP side
 * (metrics-http.h) only ever sees finished renderings. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cluster/cluster.h"
#include "gpu/device-load.h"
#include "gpu/gpu.h"
#include "server/peer.h"
#include "store/store.h"

typedef struct Metrics Metrics;

/* Tiers by index: 0 the host tier, 1 + i the GPU tier's device i (its
 * position in gpu_device(), not its CUDA ordinal). */
#define METRICS_TIER_HOST 0u
#define METRICS_TIERS (1u + GPU_MAX_DEVICES)

/* The upper bounds of the load duration histogram's buckets, in seconds. */
#define METRICS_LOAD_BUCKETS 16u

/* store and tier stay the server's; their job lists report to the metrics
 * from now on (JobList.finished). */
int metrics_new(Metrics **ret, Store *store, DeviceTier *tier);
Metrics *metrics_free(Metrics *m);
DEFINE_TRIVIAL_CLEANUP_FUNC(Metrics *, metrics_free);

/* A Load or Prefetch found its component resident in tier (hit) or had to
 * wait for a job (miss).  m may be NULL. */
void metrics_count_lookup(Metrics *m, size_t tier, bool hit);

/* What the server knows that the metrics do not. */
typedef struct MetricsSources {
        const PeerContext *peers;
        Cluster *cluster;            /* NULL without [cluster] */
        uint64_t storage_read_bytes; /* as Status reports them */
        uint64_t storage_reads;
        uint64_t start_time_usec;    /* CLOCK_REALTIME of the start */
} MetricsSources;

/* Every metric in the text format, in a new buffer (free()).  Returns 0 or
 * -ENOMEM. */
int metrics_render(Metrics *m, const MetricsSources *src, char **ret, size_t *ret_len);
