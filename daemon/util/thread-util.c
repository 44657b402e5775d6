/* The new thread inherits the creating thread's signal mask: block all
 * signals around pthread_create() and put the caller's mask back. */
#include <signal.h>

#include "util/thread-util.h"

int thread_create_nosignals(pthread_t *ret, void *(*fn)(void *), void *arg) {
        sigset_t all, old;
        int r, k;

        sigfillset(&all);
        r = pthread_sigmask(SIG_BLOCK, &all, &old);
        if (r != 0)
                return r;
        r = pthread_create(ret, NULL, fn, arg);
        k = pthread_sigmask(SIG_SETMASK, &old, NULL);
        return r != 0 ? r : k;
}
