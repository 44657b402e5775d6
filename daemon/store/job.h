/* The Job base: what every kind of background load has in common.
 *
 * A job is refcounted and goes RUNNING -> SEALING (its bytes are being
 * verified and sealed; nothing new can feed on it) -> DONE or FAILED.  Its
 * waiters are requests or other jobs (a device load waits on its host load,
 * a shard build on the whole component); each is a JobWaiter with callbacks.
 * Waiters hear the outcome only once the job is DONE or FAILED, that is
 * after verification and sealing, in the order they joined, each taken off
 * the job before its callback runs.  A job whose last waiter left while it
 * runs is cancelled (its kind stops its work, which may cancel the work it
 * waits on in turn).  A request that joins a job that was cancelled is not
 * answered CANCELLED: when the cancelled job ends, its kind may restart the
 * work for the waiters that came after, and they move to the new job.
 *
 * Jobs never see a peer or a reply: kinds live in store/ and gpu/, below
 * the server.  Loop thread only; threads reach a job through the completion
 * queue (util/completion.h). */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "store/cache.h"
#include "store/shard.h"
#include "util/error.h"
#include "util/list.h"

typedef struct Job Job;
typedef struct JobWaiter JobWaiter;
typedef struct JobList JobList;

typedef enum JobState {
        JOB_RUNNING,
        JOB_SEALING,
        JOB_DONE,
        JOB_FAILED,
} JobState;

const char *job_state_to_string(JobState s);

/* One node's part in a cluster prefetch (cluster/), for the reply. */
typedef struct JobNodeReport {
        const char *node;
        const char *state;   /* "ok", "resident", "mismatch", "failed", "down" */
        const char *message; /* "" when none */
        uint64_t storage_read_bytes, peer_received_bytes, peer_sent_bytes;
} JobNodeReport;

/* What a waiter hears.  entry: the resident entry the job made (DONE), valid
 * for the callback: the waiter takes its own reference to keep it. */
typedef struct JobOutcome {
        int r; /* 0, -ECANCELED, WD_E_*, -errno */
        const WdError *err;
        CacheEntry *entry;
        const ShardPlan *plan; /* the entry's layout where it has one of its own (a shard, a device slab) */
        const JobNodeReport *nodes; /* a cluster prefetch: every node named (entry may be NULL then) */
        size_t n_nodes;
} JobOutcome;

typedef struct JobWaiterOps {
        /* Progress of the job (done of total bytes read, copied to a device). */
        void (*progress)(JobWaiter *w, uint64_t done, uint64_t total, uint64_t copied);
        /* The outcome; w is off the job already and may be freed here. */
        void (*done)(JobWaiter *w, const JobOutcome *o);
} JobWaiterOps;

struct JobWaiter {
        const JobWaiterOps *ops;
        Job *job; /* NULL when not waiting */
        LIST_FIELDS(JobWaiter, waiters);
};

typedef struct JobKind {
        const char *name; /* "host load", "shard build", "device load" */
        /* The last waiter left a RUNNING job: stop (the job still ends
         * through job_finish(), with -ECANCELED or its result). */
        void (*cancel)(Job *j);
        /* A job that ended -ECANCELED still has waiters that joined after
         * the cancel: start the same work again as a new job (returned with
         * a reference for the caller), or return an error for them. */
        int (*restart)(Job *j, Job **ret, WdError *err);
        /* The last reference went: free the kind's part (the base is freed
         * by job_unref()). */
        void (*free)(Job *j);
        /* Optional, on the loop after every wake (job_list_poll()): look at
         * what threads left in atomics, send progress. */
        void (*poll)(Job *j);
} JobKind;

struct Job {
        const JobKind *kind;
        JobList *list;     /* where job_find() looks; NULL once unlinked */
        LIST_FIELDS(Job, jobs);
        unsigned refs;
        JobState state;
        bool cancelled;
        CacheEntry *entry; /* the loading entry this job fills (referenced), for job_find() */
        JobWaiter *waiters, *waiters_tail;
        unsigned n_waiters;
        uint64_t done, total, copied; /* the last progress */
        uint64_t progress_usec;       /* when waiters last heard */
        uint64_t started_usec;        /* job_init()'s now_usec() */
};

/* The jobs running somewhere (the host tier's, a device's). */
struct JobList {
        Job *jobs;
        unsigned n;
        /* Optional: each job of the list that ends, before its waiters hear
         * (j->entry still set), with how long it ran (the daemon's load
         * metrics). */
        void (*finished)(const Job *j, const JobOutcome *o, uint64_t duration_usec, void *userdata);
        void *userdata;
};

/* Set up the base of a kind's job (embedded first in its struct): one
 * reference, RUNNING, linked into list (NULL: not findable), filling entry
 * (referenced here; may be NULL). */
void job_init(Job *j, const JobKind *kind, JobList *list, CacheEntry *entry);
Job *job_ref(Job *j);
void job_unref(Job *j);
static inline void job_unrefp(Job **j) {
        if (*j)
                job_unref(*j);
}

/* Every job's poll, for the completion queue's hook. */
void job_list_poll(JobList *l);

/* The running or sealing job filling e, or NULL. */
Job *job_find(JobList *l, const CacheEntry *e);

/* Wait for j.  A waiter waits on one job at a time. */
void job_add_waiter(Job *j, JobWaiter *w, const JobWaiterOps *ops);
/* Stop waiting (no callback); a RUNNING job left with no waiter is
 * cancelled.  Accepts a waiter that is not waiting. */
void job_remove_waiter(JobWaiter *w);

/* The kind's progress: tell the waiters that want to hear it (no more often
 * than every interval_usec unless force). */
void job_progress(Job *j, uint64_t done, uint64_t total, uint64_t copied, bool force);
/* The read ended: SEALING.  Nothing may start feeding on j's memory now. */
void job_set_sealing(Job *j);
/* The end: DONE (o->r == 0) or FAILED, then every waiter hears o (or moves
 * to the restarted job, see above).  Unlinks j from its list first, so
 * nothing new finds it; drops the job's reference to its entry after. */
void job_finish(Job *j, const JobOutcome *o);

#define JOB_PROGRESS_INTERVAL_USEC 100000u
