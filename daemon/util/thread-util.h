/* Threads of the daemon's own (the reader, the GPU copy threads). */
#pragma once

#include <pthread.h>

/* pthread_create() with every signal blocked in the new thread, so that
 * signals go to the loop thread, whose libuv handlers expect them.  A
 * process-directed signal may otherwise land on a thread that sleeps in a
 * system call and handle it there (or, under ThreadSanitizer, which delivers
 * signals only at intercepted calls, not until that thread wakes).  Returns
 * 0 or a positive error number, as pthread_create(). */
int thread_create_nosignals(pthread_t *ret, void *(*fn)(void *), void *arg);
