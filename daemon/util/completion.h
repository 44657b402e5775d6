/* The loop's completion queue: how the daemon's threads (the reader, the GPU
 * copy threads, the background worker) hand results to the loop thread.
 *
 * A thread posts a Completion (embedded in the object whose work ended) and
 * must not touch that object afterwards: the loop may free it as soon as the
 * completion ran.  One uv_async_t wakes the loop, which pops every posted
 * completion in order and runs it, then runs the hooks registered with
 * completion_queue_add_hook() (the things that are polled rather than
 * posted: progress, GPU copies whose wake is a bare completion_kick()). */
#pragma once

#include <pthread.h>
#include <stdbool.h>
#include <uv.h>

typedef struct Completion Completion;
typedef void (*completion_fn)(Completion *c);

struct Completion {
        Completion *next;
        completion_fn fn;
};

#define COMPLETION_QUEUE_MAX_HOOKS 4

typedef void (*completion_hook_fn)(void *userdata);

typedef struct CompletionQueue {
        pthread_mutex_t lock;
        Completion *head, *tail; /* under lock */
        uv_async_t async;
        bool initialized;
        struct {
                completion_hook_fn fn;
                void *userdata;
        } hooks[COMPLETION_QUEUE_MAX_HOOKS];
        unsigned n_hooks;
} CompletionQueue;

/* Returns 0 or a negative errno (libuv's). */
int completion_queue_init(CompletionQueue *q, uv_loop_t *loop);
/* Close the async handle (the queue must be empty: every poster done). */
void completion_queue_close(CompletionQueue *q);
/* Run after every drain, on the loop.  Returns 0 or -ENOSPC. */
int completion_queue_add_hook(CompletionQueue *q, completion_hook_fn fn, void *userdata);

/* Any thread: queue c (fn runs on the loop) and wake the loop.  The caller
 * hands c's owner over: it must not touch it after this call. */
void completion_post(CompletionQueue *q, Completion *c, completion_fn fn);
/* Any thread: wake the loop to run the hooks, with no message.  Touches only
 * q, which outlives every thread that posts to it. */
void completion_kick(CompletionQueue *q);
/* On the loop: pop and run what is queued, then the hooks (also what
 * the async callback does).  For shutdown paths that cannot wait a turn. */
void completion_queue_drain(CompletionQueue *q);
