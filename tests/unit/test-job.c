/* The Job base (store/job.c) with a kind written here, over the real loop,
 * completion queue and worker, and recording waiters in place of requests:
 *
 * - RUNNING -> SEALING -> DONE|FAILED; waiters hear nothing before the end,
 *   then the outcome in the order they joined, each off the job before its
 *   callback, so a callback may free its waiter, add it (or another) to
 *   another job, or drop the last other reference to the job;
 * - the last waiter leaving a RUNNING job cancels it (once); leaving a
 *   SEALING one does not;
 * - waiters that joined a cancelled job move to the kind's restarted job and
 *   never hear -ECANCELED (or hear the restart's error);
 * - job_ref() keeps a finished job alive; the kind's free runs once, last;
 * - job_find() finds only RUNNING and SEALING jobs of its list;
 * - job_list_poll() (the queue's hook) polls every job, also when a poll
 *   ends its own job. */
#include "test-job-util.h"

/* ---- a kind of job for the test ----------------------------------------- */

typedef struct TJob TJob;
struct TJob {
        Job job; /* first */
        JobList *list;
        unsigned n_cancel, n_restart, n_poll;
        int restart_r;      /* what restart answers: 0 (a new TJob) or an error */
        TJob *restarted;
        bool finish_in_poll; /* its poll ends it (FAILED) and drops the running reference */
        bool finish_in_cancel;
        int work_r; /* the result its work on the worker gives */
        WorkerTask task;
};

static unsigned n_freed;

static void tjob_cancel(Job *j) {
        TJob *t = (TJob *) j;

        t->n_cancel++;
        if (t->finish_in_cancel) {
                WdError err = WD_ERROR_NULL;

                wd_error_set(&err, -ECANCELED, "cancelled");
                job_finish(j, &(JobOutcome){ .r = -ECANCELED, .err = &err });
                job_unref(j); /* the running one's */
        }
}

static TJob *tjob_new(JobList *l, CacheEntry *e);

static int tjob_restart(Job *j, Job **ret, WdError *err) {
        TJob *t = (TJob *) j;

        t->n_restart++;
        if (t->restart_r != 0)
                return wd_error_set(err, t->restart_r, "no room for the restart");
        t->restarted = tjob_new(t->list, j->entry);
        *ret = job_ref(&t->restarted->job); /* the caller's; the running one keeps its own */
        return 0;
}

static void tjob_free(Job *j) {
        n_freed++;
        free(j);
}

static void tjob_poll(Job *j) {
        TJob *t = (TJob *) j;

        t->n_poll++;
        if (t->finish_in_poll) {
                WdError err = WD_ERROR_NULL;

                t->finish_in_poll = false;
                wd_error_set(&err, -EIO, "ended in its poll");
                job_finish(j, &(JobOutcome){ .r = -EIO, .err = &err });
                job_unref(j);
        }
}

static const JobKind tjob_kind = {
        .name = "test job",
        .cancel = tjob_cancel,
        .restart = tjob_restart,
        .free = tjob_free,
        .poll = tjob_poll,
};

/* One reference: the running one, dropped by whoever ends it. */
static TJob *tjob_new(JobList *l, CacheEntry *e) {
        TJob *t = calloc(1, sizeof(TJob));

        assert_non_null(t);
        t->list = l;
        job_init(&t->job, &tjob_kind, l, e);
        return t;
}

static void tjob_end(TJob *t, int r, CacheEntry *e) {
        WdError err = WD_ERROR_NULL;

        if (r != 0)
                wd_error_set(&err, r, "test job: ended with %d", r);
        job_set_sealing(&t->job);
        job_finish(&t->job, &(JobOutcome){ .r = r, .err = &err, .entry = r == 0 ? e : NULL });
        job_unref(&t->job); /* the running one's */
}

/* Its work, on the real worker: the result comes back through the queue. */
static void tjob_work(WorkerTask *w) {
        TJob *t = container_of(w, TJob, task);

        usleep(20000);
        t->work_r = t->work_r ? t->work_r : -EIO;
}

static void tjob_work_done(Completion *c) {
        TJob *t = container_of(c, TJob, task.done);

        tjob_end(t, t->work_r, NULL);
}

/* ---- fixture ------------------------------------------------------------ */

typedef struct State {
        Fx *f;
        JobList list;
        CacheEntry *e, *e2; /* loading entries, referenced by the test */
} State;

static CacheEntry *reserve(Fx *f, const char *model) {
        WdError err = WD_ERROR_NULL;
        FileId id = { .dev = 1, .ino = (uint64_t) (uintptr_t) model, .size = 4096 };
        CacheEntry *e = NULL;

        if (cache_reserve(f->store.cache, model, "", "", &id, 1, 4096, &e, &err) != 0)
                fail_msg("%s", err.message);
        return cache_entry_ref(e);
}

static int setup(void **state) {
        State *s = calloc(1, sizeof(State));

        assert_non_null(s);
        s->f = fx_new(NULL, 1u << 20);
        assert_int_equal(completion_queue_add_hook(&s->f->queue, (completion_hook_fn) job_list_poll, &s->list), 0);
        s->e = reserve(s->f, "/models/a");
        s->e2 = reserve(s->f, "/models/b");
        n_freed = 0;
        *state = s;
        return 0;
}

static int teardown(void **state) {
        State *s = *state;

        assert_int_equal(s->list.n, 0);
        for (CacheEntry *e = s->e; e; e = e == s->e ? s->e2 : NULL) {
                if (e->state == CACHE_ENTRY_LOADING)
                        cache_entry_abort(e);
                cache_entry_unref(e);
        }
        fx_free(s->f);
        free(s);
        return 0;
}

/* ---- tests -------------------------------------------------------------- */

static void test_states(void **state) {
        State *s = *state;
        unsigned refs0 = s->e->refs;
        WdError err = WD_ERROR_NULL;
        Rec r[3];
        TJob *t = tjob_new(&s->list, s->e);

        assert_int_equal(t->job.state, JOB_RUNNING);
        assert_int_equal(t->job.refs, 1);
        assert_int_equal(s->list.n, 1);
        assert_int_equal(s->e->refs, refs0 + 1); /* the job's */
        assert_ptr_equal(job_find(&s->list, s->e), &t->job);
        for (unsigned i = 0; i < 3; i++) {
                rec_init(&r[i], i + 1);
                r[i].watch = &t->job;
                rec_join(&r[i], &t->job);
                assert_ptr_equal(r[i].w.job, &t->job);
        }
        assert_int_equal(t->job.n_waiters, 3);

        /* Progress reaches every waiter; the outcome does not come with it. */
        job_progress(&t->job, 10, 100, 5, true);
        for (unsigned i = 0; i < 3; i++) {
                assert_int_equal(r[i].n_progress, 1);
                assert_int_equal(r[i].done, 10);
                assert_int_equal(r[i].total, 100);
                assert_int_equal(r[i].copied, 5);
        }
        assert_int_equal(t->job.done, 10);

        /* SEALING: still findable, nothing heard yet, even after turns of the loop. */
        job_set_sealing(&t->job);
        assert_int_equal(t->job.state, JOB_SEALING);
        assert_ptr_equal(job_find(&s->list, s->e), &t->job);
        fx_run_for(s->f, 20000);
        for (unsigned i = 0; i < 3; i++)
                assert_int_equal(r[i].n_done, 0);
        assert_int_equal(n_done_order, 0);

        job_ref(&t->job); /* the test's, to look at it afterwards */
        cache_entry_set_resident(s->e, calloc(1, sizeof(Slab *)), 0);
        tjob_end(t, 0, s->e);
        assert_int_equal(t->job.state, JOB_DONE);
        assert_int_equal(n_done_order, 3);
        for (unsigned i = 0; i < 3; i++) {
                assert_int_equal(done_order[i], i + 1);
                assert_int_equal(r[i].n_done, 1);
                assert_int_equal(r[i].r, 0);
                assert_true(r[i].off_at_done);
                assert_int_equal(r[i].watch_state, JOB_DONE);
                assert_ptr_equal(r[i].entry, s->e);
                assert_null(r[i].w.job);
                assert_false(r[i].progress_after_done);
        }
        assert_int_equal(t->job.n_waiters, 0);
        assert_null(job_find(&s->list, s->e));
        assert_int_equal(s->list.n, 0);
        assert_null(t->job.entry); /* the job let go of it */
        assert_int_equal(s->e->refs, refs0 + 3); /* the waiters' */
        /* An ended job stays ended. */
        job_set_sealing(&t->job);
        assert_int_equal(t->job.state, JOB_DONE);
        assert_int_equal(n_freed, 0);
        job_unref(&t->job);
        assert_int_equal(n_freed, 1);
        for (unsigned i = 0; i < 3; i++)
                rec_release(&r[i]);
        assert_int_equal(s->e->refs, refs0);
        /* Resident now: evict it, the teardown drops the last reference. */
        assert_int_equal(cache_entry_evict(s->e, &err), 0);
}

/* The end comes from the worker, through the completion queue, FAILED. */
static void test_failed_on_loop(void **state) {
        State *s = *state;
        TJob *t = tjob_new(&s->list, s->e2);
        Rec a, b;

        rec_init(&a, 1);
        rec_init(&b, 2);
        rec_join(&a, &t->job);
        rec_join(&b, &t->job);
        a.watch = &t->job;
        job_ref(&t->job);
        t->work_r = WD_E_BUDGET;
        worker_push(&s->f->worker, &t->task, tjob_work, tjob_work_done);
        assert_int_equal(a.n_done, 0);
        RUN_UNTIL(s->f, b.n_done > 0);
        assert_int_equal(t->job.state, JOB_FAILED);
        assert_int_equal(a.watch_state, JOB_FAILED);
        assert_int_equal(n_done_order, 2);
        assert_int_equal(done_order[0], 1);
        assert_int_equal(done_order[1], 2);
        for (Rec *r = &a; r; r = r == &a ? &b : NULL) {
                assert_int_equal(r->r, WD_E_BUDGET);
                assert_null(r->entry);
                assert_true(r->off_at_done);
                assert_non_null(strstr(r->msg, "test job: ended"));
        }
        assert_null(job_find(&s->list, s->e2));
        job_unref(&t->job);
        assert_int_equal(n_freed, 1);
}

/* Callbacks that free their waiter, move a waiter to another job, or drop
 * the last reference to the job that calls them. */
static Job *other_job;
static Rec extra;
static Job *drop_in_callback;
static unsigned freed_seen_in_callback;

static void done_free_self(Rec *r) {
        free(r);
}

static void done_join_other(Rec *r) {
        rec_join(r, other_job);
}

static void done_add_extra(Rec *r) {
        rec_init(&extra, 4);
        rec_join(&extra, other_job);
        free(r);
}

static void done_drop_job(Rec *r) {
        job_unref(TAKE_PTR(drop_in_callback));
        freed_seen_in_callback = n_freed;
}

static void test_reentrant_callbacks(void **state) {
        State *s = *state;
        TJob *a = tjob_new(&s->list, s->e), *b = tjob_new(&s->list, s->e2);
        Rec *h1 = calloc(1, sizeof(Rec)), *h3 = calloc(1, sizeof(Rec));
        WdError err = WD_ERROR_NULL;
        Rec r0, r2, r5;

        other_job = &b->job;
        rec_init(&r0, 10);
        r0.on_done = done_drop_job;
        rec_init(h1, 1);
        h1->on_done = done_free_self;
        rec_init(&r2, 2);
        r2.on_done = done_join_other;
        rec_init(h3, 3);
        h3->on_done = done_add_extra;
        rec_init(&r5, 5);
        rec_join(&r0, &a->job);
        rec_join(h1, &a->job);
        rec_join(&r2, &a->job);
        rec_join(h3, &a->job);
        rec_join(&r5, &a->job);

        /* The first callback drops the test's reference: the job must live
         * until every waiter heard (ASan would see the later ones touch it). */
        drop_in_callback = job_ref(&a->job);
        job_unref(&a->job); /* the running one's: the test's is the last now */
        job_finish(&a->job, &(JobOutcome){ .r = -EIO });
        assert_int_equal(freed_seen_in_callback, 0);
        assert_int_equal(n_freed, 1); /* once job_finish() let go */
        assert_int_equal(n_done_order, 5);
        assert_int_equal(done_order[0], 10);
        assert_int_equal(done_order[1], 1);
        assert_int_equal(done_order[2], 2);
        assert_int_equal(done_order[3], 3);
        assert_int_equal(done_order[4], 5);
        assert_int_equal(r5.r, -EIO);

        /* r2 and extra wait on b now, in that order, and hear its end. */
        assert_int_equal(b->job.n_waiters, 2);
        assert_ptr_equal(b->job.waiters, &r2.w);
        assert_ptr_equal(b->job.waiters_tail, &extra.w);
        assert_ptr_equal(r2.w.job, &b->job);
        r2.on_done = NULL; /* it would join b again */
        cache_entry_set_resident(s->e2, calloc(1, sizeof(Slab *)), 0);
        tjob_end(b, 0, s->e2);
        assert_int_equal(n_done_order, 7);
        assert_int_equal(done_order[5], 2);
        assert_int_equal(done_order[6], 4);
        assert_int_equal(r2.n_done, 2);
        assert_int_equal(r2.r, 0);
        assert_ptr_equal(r2.entry, s->e2);
        assert_int_equal(extra.r, 0);
        assert_int_equal(n_freed, 2);
        rec_release(&r2);
        rec_release(&extra);
        assert_int_equal(cache_entry_evict(s->e2, &err), 0);
}

static void test_cancel(void **state) {
        State *s = *state;
        TJob *t = tjob_new(&s->list, s->e), *u = tjob_new(&s->list, s->e2);
        Rec a, b, c;

        rec_init(&a, 1);
        rec_init(&b, 2);
        rec_init(&c, 3);
        rec_join(&a, &t->job);
        rec_join(&b, &t->job);
        job_remove_waiter(&a.w);
        assert_null(a.w.job);
        assert_int_equal(t->n_cancel, 0); /* b still waits */
        job_remove_waiter(&a.w);           /* not waiting: nothing */
        assert_int_equal(t->job.n_waiters, 1);
        assert_int_equal(t->n_cancel, 0);
        job_remove_waiter(&b.w);
        assert_int_equal(t->n_cancel, 1);
        assert_true(t->job.cancelled);
        assert_int_equal(t->job.state, JOB_RUNNING); /* the kind ends it when it stopped */
        /* Joining and leaving again does not cancel twice. */
        rec_join(&c, &t->job);
        job_remove_waiter(&c.w);
        assert_int_equal(t->n_cancel, 1);
        /* Nobody waits: the end has nobody to tell and nothing to restart. */
        job_ref(&t->job);
        tjob_end(t, -ECANCELED, NULL);
        assert_int_equal(t->n_restart, 0);
        job_unref(&t->job);
        assert_int_equal(a.n_done + b.n_done + c.n_done, 0);

        /* The last waiter of a SEALING job leaves: its bytes are being
         * verified and sealed, it is not cancelled. */
        rec_join(&a, &u->job);
        job_set_sealing(&u->job);
        job_remove_waiter(&a.w);
        assert_int_equal(u->n_cancel, 0);
        assert_false(u->job.cancelled);
        tjob_end(u, -EIO, NULL);
        assert_int_equal(a.n_done, 0);
        assert_int_equal(n_freed, 2);

        /* A kind that ends the job inside its cancel. */
        t = tjob_new(&s->list, s->e);
        t->finish_in_cancel = true;
        job_ref(&t->job);
        rec_join(&a, &t->job);
        job_remove_waiter(&a.w);
        assert_int_equal(t->n_cancel, 1);
        assert_int_equal(t->job.state, JOB_FAILED);
        assert_int_equal(a.n_done, 0);
        assert_null(job_find(&s->list, s->e));
        job_unref(&t->job);
        assert_int_equal(n_freed, 3);
}

static void test_restart(void **state) {
        State *s = *state;
        TJob *t = tjob_new(&s->list, s->e), *t2;
        WdError err = WD_ERROR_NULL;
        Job *moved;
        Rec a, b, c, d;

        rec_init(&a, 1);
        rec_init(&b, 2);
        rec_init(&c, 3);
        rec_init(&d, 4);
        rec_join(&a, &t->job);
        job_remove_waiter(&a.w);
        assert_int_equal(t->n_cancel, 1);
        /* Requests that come after the cancel join the job they find. */
        rec_join(&b, &t->job);
        rec_join(&c, &t->job);
        assert_ptr_equal(job_find(&s->list, s->e), &t->job);
        job_ref(&t->job);
        t->work_r = -ECANCELED;
        worker_push(&s->f->worker, &t->task, tjob_work, tjob_work_done);
        RUN_UNTIL(s->f, t->job.state == JOB_FAILED);
        assert_int_equal(t->n_restart, 1);
        assert_non_null(t->restarted);
        moved = &t->restarted->job;
        /* They moved, in order, and heard nothing (least of all -ECANCELED). */
        assert_int_equal(b.n_done + c.n_done + a.n_done, 0);
        assert_ptr_equal(b.w.job, moved);
        assert_ptr_equal(c.w.job, moved);
        assert_ptr_equal(moved->waiters, &b.w);
        assert_ptr_equal(moved->waiters_tail, &c.w);
        assert_int_equal(moved->refs, 1); /* the running one's; the restart's went to job_finish() */
        assert_ptr_equal(job_find(&s->list, s->e), moved);
        assert_ptr_equal(moved->entry, s->e);
        cache_entry_set_resident(s->e, calloc(1, sizeof(Slab *)), 0);
        tjob_end(t->restarted, 0, s->e);
        assert_int_equal(b.r, 0);
        assert_int_equal(c.r, 0);
        assert_int_equal(n_done_order, 2);
        assert_int_equal(done_order[0], 2);
        assert_int_equal(done_order[1], 3);
        rec_release(&b);
        rec_release(&c);
        job_unref(&t->job);
        assert_int_equal(n_freed, 2);

        /* A restart that fails: the later waiter hears its error. */
        t2 = tjob_new(&s->list, s->e2);
        t2->restart_r = WD_E_BUDGET;
        rec_join(&a, &t2->job);
        job_remove_waiter(&a.w);
        rec_join(&d, &t2->job);
        tjob_end(t2, -ECANCELED, NULL);
        assert_int_equal(d.n_done, 1);
        assert_int_equal(d.r, WD_E_BUDGET);
        assert_non_null(strstr(d.msg, "no room for the restart"));
        assert_true(d.off_at_done);
        assert_int_equal(n_freed, 3);
        assert_int_equal(cache_entry_evict(s->e, &err), 0);
}

static void test_refs_and_find(void **state) {
        State *s = *state;
        TJob *t = tjob_new(&s->list, s->e), *u = tjob_new(&s->list, s->e2), *v, *w;

        /* Only RUNNING and SEALING jobs of the list are found. */
        job_set_sealing(&u->job);
        assert_ptr_equal(job_find(&s->list, s->e), &t->job);
        assert_ptr_equal(job_find(&s->list, s->e2), &u->job);
        v = tjob_new(NULL, s->e); /* not in a list: never found */
        assert_ptr_equal(job_find(&s->list, s->e), &t->job);

        assert_ptr_equal(job_ref(&t->job), &t->job);
        assert_int_equal(t->job.refs, 2);
        tjob_end(t, -EIO, NULL);
        assert_null(job_find(&s->list, s->e));
        assert_int_equal(n_freed, 0); /* the test's reference keeps it */
        assert_int_equal(t->job.state, JOB_FAILED);
        assert_int_equal(t->job.refs, 1);
        job_unref(&t->job);
        assert_int_equal(n_freed, 1);

        /* A new job for the same entry is found, not the ended one. */
        w = tjob_new(&s->list, s->e);
        assert_ptr_equal(job_find(&s->list, s->e), &w->job);
        tjob_end(w, -EIO, NULL);
        tjob_end(u, -EIO, NULL);
        assert_null(job_find(&s->list, s->e2));
        tjob_end(v, -EIO, NULL);
        assert_int_equal(n_freed, 4);
        assert_int_equal(s->list.n, 0);
}

/* The queue's hook polls every job; a poll may end its own job. */
static void test_poll(void **state) {
        State *s = *state;
        TJob *t = tjob_new(&s->list, s->e), *u = tjob_new(&s->list, s->e2), *v = tjob_new(&s->list, NULL);
        Rec a;

        rec_init(&a, 1);
        rec_join(&a, &u->job);
        u->finish_in_poll = true;
        completion_kick(&s->f->queue);
        RUN_UNTIL(s->f, t->n_poll > 0 && v->n_poll > 0);
        assert_int_equal(a.n_done, 1);
        assert_int_equal(a.r, -EIO);
        assert_int_equal(n_freed, 1);
        assert_int_equal(s->list.n, 2);
        tjob_end(t, -EIO, NULL);
        tjob_end(v, -EIO, NULL);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_states, setup, teardown),
                cmocka_unit_test_setup_teardown(test_failed_on_loop, setup, teardown),
                cmocka_unit_test_setup_teardown(test_reentrant_callbacks, setup, teardown),
                cmocka_unit_test_setup_teardown(test_cancel, setup, teardown),
                cmocka_unit_test_setup_teardown(test_restart, setup, teardown),
                cmocka_unit_test_setup_teardown(test_refs_and_find, setup, teardown),
                cmocka_unit_test_setup_teardown(test_poll, setup, teardown),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
