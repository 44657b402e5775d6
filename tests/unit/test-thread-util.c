/* The daemon's threads (util/thread-util.c): a thread started with
 * thread_create_nosignals() has the asynchronous signals blocked and the
 * synchronous ones (faults) unblocked, whatever its creator's mask, and the
 * creator's mask is left as it was.  The mask is read twice: by the thread
 * with pthread_sigmask(), and from the kernel's SigBlk line of
 * /proc/self/task/TID/status. */
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>

#include "test-util.h"
#include "util/thread-util.h"

static const int synchronous[] = { SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGABRT, SIGSYS };
static const int asynchronous[] = { SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGCHLD, SIGPIPE, SIGUSR1, SIGUSR2, SIGALRM,
                                    SIGWINCH, SIGURG, SIGIO, SIGXCPU, SIGXFSZ, SIGVTALRM, SIGPROF, SIGTSTP, SIGTTIN,
                                    SIGTTOU, SIGCONT };

typedef struct Probe {
        pthread_mutex_t lock;
        pthread_cond_t cond;
        sigset_t mask; /* as the thread saw it */
        int mask_r;
        pid_t tid;
        bool ready, release;
} Probe;

static void *probe_thread(void *arg) {
        Probe *p = arg;

        pthread_mutex_lock(&p->lock);
        p->mask_r = pthread_sigmask(SIG_BLOCK, NULL, &p->mask);
        p->tid = (pid_t) syscall(SYS_gettid);
        p->ready = true;
        pthread_cond_broadcast(&p->cond);
        while (!p->release) /* stay alive while /proc is read */
                pthread_cond_wait(&p->cond, &p->lock);
        pthread_mutex_unlock(&p->lock);
        return NULL;
}

/* The SigBlk mask of thread tid: bit (signal - 1) of a hex number. */
static uint64_t proc_sigblk(pid_t tid) {
        char path[64], line[256];
        unsigned long long v = 0;
        bool found = false;
        FILE *f;

        snprintf(path, sizeof(path), "/proc/self/task/%d/status", (int) tid);
        f = fopen(path, "re");
        assert_non_null(f);
        while (fgets(line, sizeof(line), f))
                if (sscanf(line, "SigBlk: %llx", &v) == 1) {
                        found = true;
                        break;
                }
        fclose(f);
        assert_true(found);
        return v;
}

static void check_thread(void) {
        Probe p = { .lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER };
        pthread_t t;
        uint64_t blk;

        assert_int_equal(thread_create_nosignals(&t, probe_thread, &p), 0);
        pthread_mutex_lock(&p.lock);
        while (!p.ready)
                pthread_cond_wait(&p.cond, &p.lock);
        pthread_mutex_unlock(&p.lock);
        assert_int_equal(p.mask_r, 0);
        blk = proc_sigblk(p.tid);

        for (size_t i = 0; i < ELEMENTSOF(synchronous); i++) {
                if (sigismember(&p.mask, synchronous[i]))
                        fail_msg("signal %d (%s) is blocked in the thread", synchronous[i], strsignal(synchronous[i]));
                if (blk & (1ull << (synchronous[i] - 1)))
                        fail_msg("SigBlk %016llx: signal %d (%s) is blocked", (unsigned long long) blk, synchronous[i],
                                 strsignal(synchronous[i]));
        }
        for (size_t i = 0; i < ELEMENTSOF(asynchronous); i++) {
                if (!sigismember(&p.mask, asynchronous[i]))
                        fail_msg("signal %d (%s) is not blocked in the thread", asynchronous[i],
                                 strsignal(asynchronous[i]));
                if (!(blk & (1ull << (asynchronous[i] - 1))))
                        fail_msg("SigBlk %016llx: signal %d (%s) is not blocked", (unsigned long long) blk,
                                 asynchronous[i], strsignal(asynchronous[i]));
        }
        /* The real-time signals an application may use are blocked too. */
        assert_true(sigismember(&p.mask, SIGRTMIN + 1));
        assert_true(sigismember(&p.mask, SIGRTMAX));

        pthread_mutex_lock(&p.lock);
        p.release = true;
        pthread_cond_broadcast(&p.cond);
        pthread_mutex_unlock(&p.lock);
        assert_int_equal(pthread_join(t, NULL), 0);
}

static void test_mask(void **state) {
        sigset_t before, after;

        assert_int_equal(pthread_sigmask(SIG_BLOCK, NULL, &before), 0);
        check_thread();
        assert_int_equal(pthread_sigmask(SIG_BLOCK, NULL, &after), 0);
        for (int s = 1; s < NSIG; s++)
                if (sigismember(&before, s) != sigismember(&after, s))
                        fail_msg("the creator's mask changed for signal %d", s);
}

/* A creator that blocks faults itself (as a loop thread might around a
 * critical section) still starts threads that take them. */
static void test_mask_from_blocking_creator(void **state) {
        sigset_t set, old, after;

        sigemptyset(&set);
        sigaddset(&set, SIGBUS);
        sigaddset(&set, SIGSEGV);
        assert_int_equal(pthread_sigmask(SIG_BLOCK, &set, &old), 0);
        check_thread();
        assert_int_equal(pthread_sigmask(SIG_BLOCK, NULL, &after), 0);
        assert_true(sigismember(&after, SIGBUS));
        assert_true(sigismember(&after, SIGSEGV));
        assert_int_equal(pthread_sigmask(SIG_SETMASK, &old, NULL), 0);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_mask),
                cmocka_unit_test(test_mask_from_blocking_creator),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
