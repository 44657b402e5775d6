/* What the host tier's jobs share: the host cache, the reader, how slabs are
 * made, the list of jobs filling host entries (host loads and shard builds),
 * and the loop's completion queue and background worker.  The server owns
 * one and fills it in; the job kinds only borrow it. */
#pragma once

#include "io/reader.h"
#include "store/cache.h"
#include "store/hugepool.h"
#include "store/job.h"
#include "store/loader.h"
#include "util/completion.h"
#include "util/worker.h"

typedef struct Store {
        Cache *cache;
        Reader *reader;
        LoadOptions load_opts;
        JobList jobs;        /* host loads and shard builds */
        unsigned n_reading;  /* host loads that still use the reader */
        CompletionQueue *queue;
        Worker *worker;
        /* On the worker thread, before a host load's slabs are sealed (their
         * writable mappings go): the GPU tier unregisters them. */
        void (*before_seal)(Slab *const *slabs, size_t n, void *userdata);
        /* On the loop, whenever a job started or ended: status lines, the
         * reader swap, the drain. */
        void (*changed)(void *userdata);
        void *userdata;
        /* The daemon's hugetlb pool (NULL: none): a host load pauses its
         * touch before it creates slabs, and resumes it when no load reads. */
        HugePool *hugepool;
        /* Host load slabs that asked for hugetlb pages (host_pages auto)
         * and got shmem: the pool was short. */
        uint64_t shmem_fallback_slabs, shmem_fallback_bytes;
} Store;

static inline void store_changed(Store *s) {
        if (s->changed)
                s->changed(s->userdata);
}
