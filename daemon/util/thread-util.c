/* The new thread inherits the creating thread's signal mask: set the mask
 * the thread must start with around pthread_create() and put the caller's
 * mask back. */
#include <signal.h>

#include "macro.h"
#include "util/thread-util.h"

/* Raised by the thread's own faults (and abort(), seccomp, breakpoints).  A
 * fault whose signal the thread blocks kills the process outright (the
 * kernel unblocks it and resets its handler), so a sanitizer or a crash
 * handler never gets to report. */
static const int synchronous_signals[] = { SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGABRT, SIGSYS };

/* Every signal blocked but the synchronous ones. */
static void thread_signal_mask(sigset_t *ret) {
        sigfillset(ret);
        for (size_t i = 0; i < ELEMENTSOF(synchronous_signals); i++)
                sigdelset(ret, synchronous_signals[i]);
}

int thread_create_nosignals(pthread_t *ret, void *(*fn)(void *), void *arg) {
        sigset_t mask, old;
        int r, k;

        thread_signal_mask(&mask);
        r = pthread_sigmask(SIG_SETMASK, &mask, &old);
        if (r != 0)
                return r;
        r = pthread_create(ret, NULL, fn, arg);
        k = pthread_sigmask(SIG_SETMASK, &old, NULL);
        return r != 0 ? r : k;
}
