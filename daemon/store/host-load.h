/* The host load: a Job (store/job.h) that makes a resolved component
 * resident in the host cache with the loader (store/loader.h).
 *
 * RUNNING while the reader fills the slabs; then SEALING: it waits until no
 * feed reads the writable slabs any more, checks on the background worker
 * that no file changed and seals the slabs, and only then ends, DONE with
 * the resident entry or FAILED.  Waiters hear nothing before that.
 *
 * A feed (a device load copying while the file is read) subscribes to the
 * reader's watermarks; it can only do so while the job is RUNNING, and it
 * holds a reference on the job until host_load_unfeed().  Its advance
 * callback runs on the reader thread. */
#pragma once

#include "format/catalog.h"
#include "store/store.h"

typedef struct HostLoadFeed HostLoadFeed;

typedef struct HostLoadFeedOps {
        /* Reader thread: file's first filled bytes are in its slab. */
        void (*advance)(HostLoadFeed *f, size_t file, uint64_t filled);
        /* Loop: the read ended (error 0: every byte is in; else it failed or
         * was cancelled).  The feed must still call host_load_unfeed() once
         * it stopped reading the slabs. */
        void (*read_ended)(HostLoadFeed *f, int error);
} HostLoadFeedOps;

struct HostLoadFeed {
        const HostLoadFeedOps *ops;
        Job *job; /* referenced while feeding */
        LIST_FIELDS(HostLoadFeed, feeds);
};

/* Start loading comp (the job takes its own copy) from files beneath
 * root_fd (duplicated).  requested_usec: when the request that resolved it
 * came, for the log (0: none).  Returns 0 with *ret referenced for the
 * caller, or WD_E_BUDGET, WD_E_BUSY, WD_E_CHANGED, -errno with err set. */
int host_load_start(Store *st, int root_fd, const Component *comp, uint64_t requested_usec, Job **ret,
                    WdError *err);
bool job_is_host_load(const Job *j);
const Component *host_load_component(Job *j);

/* Subscribe f to j's watermarks: 0, or -EBUSY when j is not RUNNING any
 * more (wait for it as a waiter instead).  The slabs to read, writable and
 * page-aligned, are host_load_slabs(j); advance is called once per file with
 * what is there already. */
int host_load_feed(Job *j, HostLoadFeed *f, const HostLoadFeedOps *ops);
void host_load_unfeed(HostLoadFeed *f);
Slab *const *host_load_slabs(Job *j);
