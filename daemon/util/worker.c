/* The background worker: one thread, a locked FIFO of tasks, completions
 * posted to the loop's queue (see worker.h). */
#include <errno.h>

#include "util/thread-util.h"
#include "util/worker.h"

static void *worker_main(void *arg) {
        Worker *w = arg;

        for (;;) {
                WorkerTask *t;

                pthread_mutex_lock(&w->lock);
                while (!w->head && !w->stopping)
                        pthread_cond_wait(&w->cond, &w->lock);
                t = w->head;
                if (t) {
                        w->head = t->next;
                        if (!w->head)
                                w->tail = NULL;
                }
                pthread_mutex_unlock(&w->lock);
                if (!t)
                        return NULL; /* stopping, and nothing left */
                t->work(t);
                completion_post(w->queue, &t->done, t->done.fn);
        }
}

int worker_start(Worker *w, CompletionQueue *q) {
        int r;

        *w = (Worker){ .queue = q };
        r = pthread_mutex_init(&w->lock, NULL);
        if (r != 0)
                return -r;
        r = pthread_cond_init(&w->cond, NULL);
        if (r != 0) {
                pthread_mutex_destroy(&w->lock);
                return -r;
        }
        r = thread_create_nosignals(&w->thread, worker_main, w);
        if (r != 0) {
                pthread_cond_destroy(&w->cond);
                pthread_mutex_destroy(&w->lock);
                return -r;
        }
        w->started = true;
        return 0;
}

void worker_stop(Worker *w) {
        if (!w->started)
                return;
        pthread_mutex_lock(&w->lock);
        w->stopping = true;
        pthread_cond_signal(&w->cond);
        pthread_mutex_unlock(&w->lock);
        pthread_join(w->thread, NULL);
        pthread_cond_destroy(&w->cond);
        pthread_mutex_destroy(&w->lock);
        w->started = false;
}

void worker_push(Worker *w, WorkerTask *t, worker_fn work, completion_fn done) {
        t->work = work;
        t->done.fn = done;
        t->next = NULL;
        pthread_mutex_lock(&w->lock);
        if (w->tail)
                w->tail->next = t;
        else
                w->head = t;
        w->tail = t;
        pthread_cond_signal(&w->cond);
        pthread_mutex_unlock(&w->lock);
}
