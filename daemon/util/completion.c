/* The loop's completion queue: a locked FIFO of intrusive Completions and
 * one uv_async_t (see completion.h).  uv_async_send() coalesces wakes, so
 * the drain takes the whole list at once and runs it in posting order. */
#include <errno.h>
#include <stdatomic.h>

#include "util/completion.h"

static void on_async(uv_async_t *a) {
        completion_queue_drain(a->data);
}

int completion_queue_init(CompletionQueue *q, uv_loop_t *loop) {
        int r;

        *q = (CompletionQueue){};
        r = pthread_mutex_init(&q->lock, NULL);
        if (r != 0)
                return -r;
        r = uv_async_init(loop, &q->async, on_async);
        if (r < 0) {
                pthread_mutex_destroy(&q->lock);
                return r;
        }
        q->async.data = q;
        q->initialized = true;
        return 0;
}

static void on_closed(uv_handle_t *h) {
        CompletionQueue *q = h->data;

        pthread_mutex_destroy(&q->lock);
}

void completion_queue_close(CompletionQueue *q) {
        if (!q->initialized)
                return;
        q->initialized = false;
        uv_close((uv_handle_t *) &q->async, on_closed);
}

int completion_queue_add_hook(CompletionQueue *q, completion_hook_fn fn, void *userdata) {
        if (q->n_hooks >= COMPLETION_QUEUE_MAX_HOOKS)
                return -ENOSPC;
        q->hooks[q->n_hooks].fn = fn;
        q->hooks[q->n_hooks].userdata = userdata;
        q->n_hooks++;
        return 0;
}

void completion_post(CompletionQueue *q, Completion *c, completion_fn fn) {
        c->fn = fn;
        c->next = NULL;
        pthread_mutex_lock(&q->lock);
        if (q->tail)
                q->tail->next = c;
        else
                q->head = c;
        q->tail = c;
        /* Under the lock: once it is released the loop may run c and free
         * its owner, and q is the only thing touched after. */
        (void) uv_async_send(&q->async);
        pthread_mutex_unlock(&q->lock);
}

void completion_kick(CompletionQueue *q) {
        /* uv_async_send() returns at once when it reads a send as still
         * pending, with a relaxed load that may pass the caller's earlier
         * stores (a copy's finished flag, a watermark): the loop could then
         * clear that send, run the drain and its hooks without seeing them,
         * and no wake would follow.  The fence orders them first, pairing
         * with the loop's atomic exchange of the pending flag. */
        atomic_thread_fence(memory_order_seq_cst);
        (void) uv_async_send(&q->async);
}

void completion_queue_drain(CompletionQueue *q) {
        Completion *c;

        pthread_mutex_lock(&q->lock);
        c = q->head;
        q->head = q->tail = NULL;
        pthread_mutex_unlock(&q->lock);
        while (c) {
                Completion *next = c->next; /* c->fn may free c */

                c->fn(c);
                c = next;
        }
        for (unsigned i = 0; i < q->n_hooks; i++)
                q->hooks[i].fn(q->hooks[i].userdata);
}
