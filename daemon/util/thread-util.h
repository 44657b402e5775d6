/* Threads of the daemon's own (the reader, the GPU copy threads). */
#pragma once

#include <pthread.h>

/* pthread_create() with the asynchronous signals blocked in the new thread
 * (SIGTERM, SIGINT, SIGHUP, SIGCHLD, SIGPIPE, SIGUSR1/2, SIGALRM, the
 * real-time ones: every signal but the synchronous ones), whatever the
 * caller's mask, so that they go to the loop thread, whose libuv handlers
 * expect them.  Blocked there, a process-directed signal cannot land on a
 * thread that sleeps in a system call and run its handler there (or, under
 * ThreadSanitizer, which delivers signals only at intercepted calls, wait
 * until that thread wakes).  The synchronous ones (SIGSEGV, SIGBUS, SIGFPE,
 * SIGILL, SIGTRAP, SIGABRT, SIGSYS) stay unblocked, so that a fault on the
 * thread reaches the process's handlers: a sanitizer's report, a crash
 * handler.  Returns 0 or a positive error number, as pthread_create(). */
int thread_create_nosignals(pthread_t *ret, void *(*fn)(void *), void *arg);
