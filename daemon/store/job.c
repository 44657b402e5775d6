/* The Job base (see job.h): references, states, waiters in join order, and
 * the restart of a cancelled job for the waiters that joined after. */
#include <errno.h>

#include "store/job.h"
#include "util/time-util.h"

const char *job_state_to_string(JobState s) {
        switch (s) {
        case JOB_RUNNING:
                return "running";
        case JOB_SEALING:
                return "sealing";
        case JOB_DONE:
                return "done";
        case JOB_FAILED:
                return "failed";
        }
        return "unknown";
}

static void job_unlink(Job *j) {
        if (!j->list)
                return;
        LIST_REMOVE(jobs, j->list->jobs, j);
        j->list->n--;
        j->list = NULL;
}

void job_init(Job *j, const JobKind *kind, JobList *list, CacheEntry *entry) {
        j->kind = kind;
        j->refs = 1;
        j->state = JOB_RUNNING;
        j->started_usec = now_usec();
        j->entry = entry ? cache_entry_ref(entry) : NULL;
        if (list) {
                j->list = list;
                LIST_PREPEND(jobs, list->jobs, j);
                list->n++;
        }
}

Job *job_ref(Job *j) {
        j->refs++;
        return j;
}

void job_unref(Job *j) {
        if (!j || --j->refs > 0)
                return;
        job_unlink(j);
        cache_entry_unref(TAKE_PTR(j->entry));
        j->kind->free(j);
}

/* A poll may end its job (a device load whose copy finished), which unlinks
 * it and clears its jobs_next, or end others.  So the next job is held
 * across the poll; if it was unlinked meanwhile, the walk starts over from
 * the head (polls that have nothing to do return at once), so that no job
 * misses the wake: a finished copy may never kick the queue again. */
void job_list_poll(JobList *l) {
        Job *j = l->jobs;

        while (j) {
                Job *next = j->jobs_next;

                if (j->kind->poll) {
                        job_ref(j);
                        if (next)
                                job_ref(next);
                        j->kind->poll(j);
                        job_unref(j);
                        if (next) {
                                /* Still linked and held by others: go on from it. */
                                bool go_on = next->list && next->refs > 1;

                                job_unref(next);
                                next = go_on ? next : l->jobs;
                        }
                }
                j = next;
        }
}

Job *job_find(JobList *l, const CacheEntry *e) {
        LIST_FOREACH(jobs, j, l->jobs)
                if (j->entry == e && (j->state == JOB_RUNNING || j->state == JOB_SEALING))
                        return j;
        return NULL;
}

/* Append: waiters hear the outcome in the order they joined. */
static void waiter_link(Job *j, JobWaiter *w) {
        w->job = j;
        w->waiters_next = NULL;
        w->waiters_prev = j->waiters_tail;
        if (j->waiters_tail)
                j->waiters_tail->waiters_next = w;
        else
                j->waiters = w;
        j->waiters_tail = w;
        j->n_waiters++;
}

static void waiter_unlink(JobWaiter *w) {
        Job *j = w->job;

        if (w->waiters_prev)
                w->waiters_prev->waiters_next = w->waiters_next;
        else
                j->waiters = w->waiters_next;
        if (w->waiters_next)
                w->waiters_next->waiters_prev = w->waiters_prev;
        else
                j->waiters_tail = w->waiters_prev;
        w->waiters_prev = w->waiters_next = NULL;
        w->job = NULL;
        j->n_waiters--;
}

void job_add_waiter(Job *j, JobWaiter *w, const JobWaiterOps *ops) {
        w->ops = ops;
        waiter_link(j, w);
}

void job_remove_waiter(JobWaiter *w) {
        Job *j = w->job;

        if (!j)
                return;
        waiter_unlink(w);
        if (j->n_waiters == 0 && j->state == JOB_RUNNING && !j->cancelled) {
                j->cancelled = true;
                job_ref(j);
                j->kind->cancel(j);
                job_unref(j);
        }
}

void job_progress(Job *j, uint64_t done, uint64_t total, uint64_t copied, bool force) {
        uint64_t now = now_usec();

        j->done = done;
        j->total = total;
        j->copied = copied;
        if (!force && now - j->progress_usec < JOB_PROGRESS_INTERVAL_USEC)
                return;
        j->progress_usec = now;
        /* A progress callback never frees a waiter: it queues an event, and
         * the server closes a peer whose send fails from its ready list,
         * not under this walk (fuzz-peer found the walk reading a waiter
         * freed that way).  Walk by next taken first all the same. */
        for (JobWaiter *w = j->waiters, *next; w; w = next) {
                next = w->waiters_next;
                if (w->ops->progress)
                        w->ops->progress(w, done, total, copied);
        }
}

void job_set_sealing(Job *j) {
        if (j->state == JOB_RUNNING)
                j->state = JOB_SEALING;
}

void job_finish(Job *j, const JobOutcome *o) {
        JobList *list = j->list;
        Job *restarted = NULL;

        job_ref(j); /* waiters' callbacks may drop the last other reference */
        job_unlink(j);
        j->state = o->r == 0 ? JOB_DONE : JOB_FAILED;
        if (list && list->finished)
                list->finished(j, o, now_usec() - j->started_usec, list->userdata);

        if (o->r == -ECANCELED && j->waiters && j->kind->restart) {
                WdError err = WD_ERROR_NULL;
                int r = j->kind->restart(j, &restarted, &err);

                if (r == 0) {
                        while (j->waiters) {
                                JobWaiter *w = j->waiters;
                                const JobWaiterOps *ops = w->ops;

                                waiter_unlink(w);
                                job_add_waiter(restarted, w, ops);
                        }
                        job_unref(restarted);
                } else {
                        JobOutcome failed = { .r = r, .err = &err };

                        while (j->waiters) {
                                JobWaiter *w = j->waiters;

                                waiter_unlink(w);
                                w->ops->done(w, &failed);
                        }
                }
        }
        while (j->waiters) {
                JobWaiter *w = j->waiters;

                waiter_unlink(w);
                w->ops->done(w, o);
        }
        cache_entry_unref(TAKE_PTR(j->entry));
        job_unref(j);
}
