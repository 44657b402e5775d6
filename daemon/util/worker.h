/* A background thread for the loop's slow chores that must not queue behind
 * model resolves on libuv's pool: checking and sealing a finished read,
 * building a shard slab, giving slab memory back to the kernel.  Tasks run
 * one at a time in the order pushed; each one's done callback then runs on
 * the loop through the completion queue. */
#pragma once

#include <pthread.h>
#include <stdbool.h>

#include "util/completion.h"

typedef struct WorkerTask WorkerTask;
typedef void (*worker_fn)(WorkerTask *t);

struct WorkerTask {
        WorkerTask *next;
        worker_fn work;    /* on the worker thread */
        Completion done;   /* its fn runs on the loop afterwards */
};

typedef struct Worker {
        CompletionQueue *queue;
        pthread_t thread;
        bool started;
        pthread_mutex_t lock;
        pthread_cond_t cond;
        WorkerTask *head, *tail; /* under lock */
        bool stopping;           /* under lock */
} Worker;

/* Returns 0 or -errno. */
int worker_start(Worker *w, CompletionQueue *q);
/* Runs what is still queued, then joins the thread.  Accepts a worker that
 * never started. */
void worker_stop(Worker *w);
/* Queue t: work(t) on the thread, then done(&t->done) on the loop; t must
 * live until done ran. */
void worker_push(Worker *w, WorkerTask *t, worker_fn work, completion_fn done);
