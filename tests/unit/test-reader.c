/* Reader tests against real files on disk (O_DIRECT) and on tmpfs: odd
 * sizes, empty and partial extents, more chunks than the queue holds, a
 * failing job beside a healthy one, a file shorter than its extent,
 * cancellation, and a ring that fails with reads in flight.  Bytes are
 * compared with a plain read() of the file. */
#include <liburing.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/mman.h>

#include "io/reader.h"
#include "test-util.h"
#include "util/time-util.h"

static char *scratch;

static int group_setup(void **state) {
        scratch = make_temp_dir(NULL);
        return 0;
}

static int group_teardown(void **state) {
        remove_tree(scratch);
        free(scratch);
        return 0;
}

static char *scratch_file(const char *base, const char *name, size_t size, uint32_t seed) {
        char *p = NULL;

        assert_true(asprintf(&p, "%s/%s", base ? base : scratch, name) > 0);
        write_pattern_file(p, size, seed);
        return p;
}

static void *alloc_dest(size_t size) {
        void *p = mmap(NULL, ALIGN_UP(size, READER_ALIGN) + READER_ALIGN, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

        assert_true(p != MAP_FAILED);
        return p;
}

static void free_dest(void *p, size_t size) {
        munmap(p, ALIGN_UP(size, READER_ALIGN) + READER_ALIGN);
}

/* Read [offset, offset+length) of path through the reader and compare with
 * the same range of an independent read(). */
static void check_range(Reader *r, const char *path, uint64_t offset, uint64_t length, bool direct) {
        _cleanup_free_ uint8_t *ref = NULL;
        _cleanup_close_ int fd = -1, dfd = -1;
        size_t size = 0, failed = 0;
        uint8_t *dest = alloc_dest(length);
        ReaderExtent e;

        ref = read_file(path, &size);
        assert_non_null(ref);
        assert_true(offset + length <= size);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        assert_true(fd >= 0);
        if (direct) {
                dfd = open(path, O_RDONLY | O_CLOEXEC | O_DIRECT);
                assert_true(dfd >= 0);
        }
        e = (ReaderExtent){ .fd = direct ? dfd : fd, .buffered_fd = fd, .direct = direct, .offset = offset,
                            .length = length, .dest = dest };
        assert_int_equal(reader_run(r, &e, 1, &failed), 0);
        assert_true(XXH128_isEqual(XXH3_128bits(dest, length), XXH3_128bits(ref + offset, length)));
        free_dest(dest, length);
}

static void test_sizes(void **state) {
        static const size_t sizes[] = { 1, 100, 4095, 4096, 4097, 65536, 65537, (1 << 20) + 123, (10 << 20) + 7 };
        ReaderParams p = { .queue_depth = 4, .chunk_size = 64 << 10 };
        _cleanup_(reader_freep) Reader *r = NULL;

        assert_int_equal(reader_new(&r, &p), 0);
        for (size_t i = 0; i < ELEMENTSOF(sizes); i++) {
                _cleanup_free_ char *name = NULL, *path = NULL;

                assert_true(asprintf(&name, "size-%zu", sizes[i]) > 0);
                path = scratch_file(NULL, name, sizes[i], (uint32_t) i);
                check_range(r, path, 0, sizes[i], true);
                check_range(r, path, 0, sizes[i], false);
                if (sizes[i] > 8192) {
                        check_range(r, path, 4096, sizes[i] - 4096, true);  /* aligned start, odd end */
                        check_range(r, path, 4096, 4096, true);
                        check_range(r, path, 17, sizes[i] - 100, false);    /* anything goes buffered */
                }
        }
}

/* Several extents in one job, empty ones among them. */
static void test_multi_extent(void **state) {
        ReaderParams p = { .queue_depth = 3, .chunk_size = 8192 };
        _cleanup_(reader_freep) Reader *r = NULL;
        _cleanup_free_ char *a = scratch_file(NULL, "multi-a", 50000, 1), *b = scratch_file(NULL, "multi-b", 4096 * 3, 2);
        _cleanup_free_ uint8_t *ra = NULL, *rb = NULL;
        size_t na = 0, nb = 0, failed;
        int fa = open(a, O_RDONLY | O_CLOEXEC), fb = open(b, O_RDONLY | O_CLOEXEC);
        int da = open(a, O_RDONLY | O_CLOEXEC | O_DIRECT);
        uint8_t *d1 = alloc_dest(50000), *d2 = alloc_dest(4096 * 3);
        ReaderExtent e[] = {
                { .fd = fb, .buffered_fd = fb, .offset = 0, .length = 0, .dest = d2 },
                { .fd = da, .buffered_fd = fa, .direct = true, .offset = 0, .length = 50000, .dest = d1 },
                { .fd = fb, .buffered_fd = fb, .offset = 5, .length = 0, .dest = d2 },
                { .fd = fb, .buffered_fd = fb, .offset = 0, .length = 4096 * 3, .dest = d2 },
        };

        ra = read_file(a, &na);
        rb = read_file(b, &nb);
        assert_int_equal(reader_new(&r, &p), 0);
        assert_int_equal(reader_run(r, e, ELEMENTSOF(e), &failed), 0);
        assert_memory_equal(d1, ra, na);
        assert_memory_equal(d2, rb, nb);
        /* A job of nothing completes at once. */
        assert_int_equal(reader_run(r, e, 1, &failed), 0);
        assert_int_equal(reader_run(r, NULL, 0, &failed), 0);
        free_dest(d1, 50000);
        free_dest(d2, 4096 * 3);
        close(fa);
        close(fb);
        close(da);
}

static void test_tmpfs(void **state) {
        _cleanup_free_ char *dir = make_temp_dir("/dev/shm"), *path = scratch_file(dir, "t", 300001, 7);
        ReaderParams p = { .queue_depth = 2, .chunk_size = 4096 };
        _cleanup_(reader_freep) Reader *r = NULL;
        int fd;

        assert_int_equal(reader_new(&r, &p), 0);
        check_range(r, path, 0, 300001, false);
        /* Where tmpfs takes O_DIRECT (newer kernels) it must work too. */
        fd = open(path, O_RDONLY | O_CLOEXEC | O_DIRECT);
        if (fd >= 0) {
                close(fd);
                check_range(r, path, 0, 300001, true);
        } else
                assert_int_equal(errno, EINVAL);
        remove_tree(dir);
}

typedef struct Tracker {
        pthread_mutex_t lock;
        pthread_cond_t cond;
        bool finished;
        int error;
        size_t failed;
        uint64_t last_progress;
        bool monotonic;
        unsigned calls;
        ReaderJob *cancel_after_first;
} Tracker;

#define TRACKER_INIT { .lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER, .monotonic = true }

static void tracker_progress(ReaderJob *job, uint64_t done, uint64_t total, void *userdata) {
        Tracker *t = userdata;

        if (done < t->last_progress || done > total)
                t->monotonic = false;
        t->last_progress = done;
        if (t->calls++ == 0 && t->cancel_after_first)
                reader_cancel(t->cancel_after_first);
}

static void tracker_done(ReaderJob *job, int error, size_t failed, void *userdata) {
        Tracker *t = userdata;

        pthread_mutex_lock(&t->lock);
        t->finished = true;
        t->error = error;
        t->failed = failed;
        pthread_cond_signal(&t->cond);
        pthread_mutex_unlock(&t->lock);
}

static void tracker_wait(Tracker *t) {
        pthread_mutex_lock(&t->lock);
        while (!t->finished)
                pthread_cond_wait(&t->cond, &t->lock);
        pthread_mutex_unlock(&t->lock);
}

/* Whether t finished within timeout_usec. */
static bool tracker_wait_for(Tracker *t, uint64_t timeout_usec) {
        struct timespec deadline;
        bool finished;

        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_sec += (time_t) (timeout_usec / 1000000);
        deadline.tv_nsec += (long) (timeout_usec % 1000000) * 1000;
        if (deadline.tv_nsec >= 1000000000) {
                deadline.tv_sec++;
                deadline.tv_nsec -= 1000000000;
        }
        pthread_mutex_lock(&t->lock);
        while (!t->finished)
                if (pthread_cond_timedwait(&t->cond, &t->lock, &deadline) != 0)
                        break;
        finished = t->finished;
        pthread_mutex_unlock(&t->lock);
        return finished;
}

/* The reader's test hook (io/reader.h).  Armed with an error, it waits for
 * a read of a job to be queued, submits it, so that it is really in flight,
 * and from then on fails as a broken ring would, every time it is called. */
static atomic_int ring_error;
static atomic_bool ring_broken;
static atomic_uint ring_failures;

int reader_test_submit_and_wait(struct io_uring *ring, unsigned wait_nr) {
        int e = atomic_load(&ring_error);

        if (e == 0)
                return io_uring_submit_and_wait(ring, wait_nr);
        if (!atomic_load(&ring_broken)) {
                /* The thread's first call has only its eventfd read queued. */
                if (io_uring_sq_ready(ring) < 2)
                        return io_uring_submit_and_wait(ring, wait_nr);
                (void) io_uring_submit(ring);
                atomic_store(&ring_broken, true);
        }
        atomic_fetch_add(&ring_failures, 1);
        return e;
}

/* 8 MiB in 4 KiB chunks through a queue of 2: 2048 reads. */
static void test_more_chunks_than_queue(void **state) {
        ReaderParams p = { .queue_depth = 2, .chunk_size = 4096 };
        _cleanup_(reader_freep) Reader *r = NULL;
        _cleanup_(reader_job_freep) ReaderJob *job = NULL;
        _cleanup_free_ char *path = scratch_file(NULL, "many-chunks", 8 << 20, 3);
        _cleanup_free_ uint8_t *ref = NULL;
        Tracker t = TRACKER_INIT;
        size_t n = 0;
        uint64_t before, first, last;
        int fd = open(path, O_RDONLY | O_CLOEXEC), dfd = open(path, O_RDONLY | O_CLOEXEC | O_DIRECT);
        uint8_t *dest = alloc_dest(8 << 20);
        ReaderExtent e = { .fd = dfd, .buffered_fd = fd, .direct = true, .length = 8 << 20, .dest = dest };

        ref = read_file(path, &n);
        assert_int_equal(reader_new(&r, &p), 0);
        assert_int_equal(reader_job_new(&job, &e, 1, tracker_progress, tracker_done, &t), 0);
        before = now_usec();
        assert_int_equal(reader_submit(r, job), 0);
        tracker_wait(&t);
        assert_int_equal(t.error, 0);
        /* 2048 reads take time; the done callback came after the last. */
        reader_job_times(job, &first, &last);
        assert_true(before <= first);
        assert_true(first < last);
        assert_true(last <= now_usec());
        assert_true(t.monotonic);
        assert_int_equal(t.calls, 2048);
        assert_int_equal(t.last_progress, 8 << 20);
        assert_memory_equal(dest, ref, n);
        assert_true(reader_bytes_read(r) >= (8u << 20));
        free_dest(dest, 8 << 20);
        close(fd);
        close(dfd);
}

/* One job reads from an fd that cannot be read (EBADF), another from a good
 * file at the same time: only the first fails. */
static void test_error_isolated(void **state) {
        ReaderParams p = { .queue_depth = 4, .chunk_size = 4096 };
        _cleanup_(reader_freep) Reader *r = NULL;
        _cleanup_(reader_job_freep) ReaderJob *bad = NULL, *good = NULL;
        _cleanup_free_ char *path = scratch_file(NULL, "err", 1 << 20, 4);
        _cleanup_free_ uint8_t *ref = NULL;
        Tracker tb = TRACKER_INIT, tg = TRACKER_INIT;
        size_t n = 0;
        int wfd = open(path, O_WRONLY | O_CLOEXEC), fd = open(path, O_RDONLY | O_CLOEXEC);
        uint8_t *d1 = alloc_dest(1 << 20), *d2 = alloc_dest(1 << 20);
        ReaderExtent eb[] = {
                { .fd = fd, .buffered_fd = fd, .length = 4096, .dest = d1 },
                { .fd = wfd, .buffered_fd = wfd, .length = 1 << 20, .dest = d1 },
        };
        ReaderExtent eg = { .fd = fd, .buffered_fd = fd, .length = 1 << 20, .dest = d2 };

        ref = read_file(path, &n);
        assert_int_equal(reader_new(&r, &p), 0);
        assert_int_equal(reader_job_new(&bad, eb, 2, NULL, tracker_done, &tb), 0);
        assert_int_equal(reader_job_new(&good, &eg, 1, NULL, tracker_done, &tg), 0);
        assert_int_equal(reader_submit(r, bad), 0);
        assert_int_equal(reader_submit(r, good), 0);
        tracker_wait(&tb);
        tracker_wait(&tg);
        assert_int_equal(tb.error, -EBADF);
        assert_int_equal(tb.failed, 1);
        assert_int_equal(tg.error, 0);
        assert_memory_equal(d2, ref, n);
        free_dest(d1, 1 << 20);
        free_dest(d2, 1 << 20);
        close(wfd);
        close(fd);
}

/* An extent longer than the file: the job fails with -ENODATA. */
static void test_short_file(void **state) {
        ReaderParams p = { .queue_depth = 2, .chunk_size = 8192 };
        _cleanup_(reader_freep) Reader *r = NULL;
        _cleanup_free_ char *path = scratch_file(NULL, "short", 10000, 5);
        int fd = open(path, O_RDONLY | O_CLOEXEC), dfd = open(path, O_RDONLY | O_CLOEXEC | O_DIRECT);
        uint8_t *dest = alloc_dest(40000);
        ReaderExtent e = { .fd = fd, .buffered_fd = fd, .length = 40000, .dest = dest };
        size_t failed = 99;

        assert_int_equal(reader_new(&r, &p), 0);
        assert_int_equal(reader_run(r, &e, 1, &failed), -ENODATA);
        assert_int_equal(failed, 0);
        e.fd = dfd;
        e.direct = true;
        assert_int_equal(reader_run(r, &e, 1, &failed), -ENODATA);
        free_dest(dest, 40000);
        close(fd);
        close(dfd);
}

static void test_cancel(void **state) {
        ReaderParams p = { .queue_depth = 1, .chunk_size = 4096 };
        _cleanup_(reader_freep) Reader *r = NULL;
        _cleanup_(reader_job_freep) ReaderJob *job = NULL;
        _cleanup_free_ char *path = scratch_file(NULL, "cancel", 16 << 20, 6);
        Tracker t = TRACKER_INIT;
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        uint8_t *dest = alloc_dest(16 << 20);
        ReaderExtent e = { .fd = fd, .buffered_fd = fd, .length = 16 << 20, .dest = dest };

        assert_int_equal(reader_new(&r, &p), 0);
        assert_int_equal(reader_job_new(&job, &e, 1, tracker_progress, tracker_done, &t), 0);
        t.cancel_after_first = job;
        assert_int_equal(reader_submit(r, job), 0);
        tracker_wait(&t);
        assert_int_equal(t.error, -ECANCELED);
        assert_true(t.last_progress < (16u << 20));
        free_dest(dest, 16 << 20);
        close(fd);
}

/* Freeing a reader with a job still running cancels it cleanly. */
static void test_free_while_running(void **state) {
        ReaderParams p = { .queue_depth = 1, .chunk_size = 4096 };
        _cleanup_(reader_job_freep) ReaderJob *job = NULL;
        _cleanup_free_ char *path = scratch_file(NULL, "free-running", 16 << 20, 8);
        Tracker t = TRACKER_INIT;
        Reader *r = NULL;
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        uint8_t *dest = alloc_dest(16 << 20);
        ReaderExtent e = { .fd = fd, .buffered_fd = fd, .length = 16 << 20, .dest = dest };

        assert_int_equal(reader_new(&r, &p), 0);
        assert_int_equal(reader_job_new(&job, &e, 1, NULL, tracker_done, &t), 0);
        assert_int_equal(reader_submit(r, job), 0);
        reader_free(r);
        assert_true(t.finished);
        assert_true(t.error == 0 || t.error == -ECANCELED);
        free_dest(dest, 16 << 20);
        close(fd);
}

/* Finding 17 of the 2026-12 review: the ring fails hard with a read in
 * flight (from a pipe nobody writes to: it never completes).  The job ends
 * with the ring's error, the thread does not keep calling the failing ring,
 * a job submitted afterwards fails too, and the reader stops. */
static void test_ring_failure(void **state) {
        ReaderParams p = { .queue_depth = 2, .chunk_size = 4096 };
        _cleanup_(reader_job_freep) ReaderJob *stuck = NULL, *later = NULL;
        _cleanup_free_ char *path = scratch_file(NULL, "ring-fail", 8192, 9);
        Tracker ts = TRACKER_INIT, tl = TRACKER_INIT;
        Reader *r = NULL;
        int pipe_fds[2], fd = open(path, O_RDONLY | O_CLOEXEC);
        uint8_t *d1 = alloc_dest(65536), *d2 = alloc_dest(8192);
        ReaderExtent es, el = { .fd = fd, .buffered_fd = fd, .length = 8192, .dest = d2 };
        unsigned failures;

        assert_true(fd >= 0);
        assert_int_equal(pipe2(pipe_fds, O_CLOEXEC), 0);
        es = (ReaderExtent){ .fd = pipe_fds[0], .buffered_fd = pipe_fds[0], .length = 65536, .dest = d1 };
        atomic_store(&ring_failures, 0);
        atomic_store(&ring_broken, false);
        assert_int_equal(reader_new(&r, &p), 0);
        atomic_store(&ring_error, -ENOMEM);
        assert_int_equal(reader_job_new(&stuck, &es, 1, NULL, tracker_done, &ts), 0);
        assert_int_equal(reader_submit(r, stuck), 0);
        if (!tracker_wait_for(&ts, 10 * 1000000))
                fail_msg("the job with a read in flight on a failed ring did not end in 10 s (%u calls to the "
                         "failing ring)",
                         atomic_load(&ring_failures));
        assert_int_equal(ts.error, -ENOMEM);
        assert_int_equal(ts.failed, 0);

        /* No spinning on the dead ring. */
        usleep(200 * 1000);
        failures = atomic_load(&ring_failures);
        if (failures != 1)
                fail_msg("the thread called the failing ring %u times", failures);

        /* A job after the failure ends too, with the same error. */
        assert_int_equal(reader_job_new(&later, &el, 1, NULL, tracker_done, &tl), 0);
        assert_int_equal(reader_submit(r, later), 0);
        if (!tracker_wait_for(&tl, 10 * 1000000))
                fail_msg("a job submitted after the ring failed did not end in 10 s");
        assert_int_equal(tl.error, -ENOMEM);
        assert_int_equal(atomic_load(&ring_failures), 1);

        reader_free(r);
        atomic_store(&ring_error, 0);
        close(pipe_fds[1]);
        close(pipe_fds[0]);
        close(fd);
        free_dest(d1, 65536);
        free_dest(d2, 8192);
}

static void test_invalid(void **state) {
        _cleanup_(reader_freep) Reader *r = NULL;
        _cleanup_(reader_job_freep) ReaderJob *job = NULL;
        ReaderParams bad_chunk = { .queue_depth = 4, .chunk_size = 1000 }, bad_qd = { .queue_depth = 0, .chunk_size = 4096 };
        ReaderParams ok = READER_PARAMS_DEFAULT;
        ReaderExtent e = { .fd = 0, .buffered_fd = 0, .direct = true, .offset = 100, .length = 10, .dest = NULL };

        assert_int_equal(reader_new(&r, &bad_chunk), -EINVAL);
        assert_int_equal(reader_new(&r, &bad_qd), -EINVAL);
        assert_int_equal(reader_new(&r, &ok), 0);
        assert_int_equal(reader_job_new(&job, &e, 1, NULL, NULL, NULL), 0);
        assert_int_equal(reader_submit(r, job), -EINVAL); /* unaligned direct offset */
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_sizes),       cmocka_unit_test(test_multi_extent),
                cmocka_unit_test(test_tmpfs),       cmocka_unit_test(test_more_chunks_than_queue),
                cmocka_unit_test(test_error_isolated), cmocka_unit_test(test_short_file),
                cmocka_unit_test(test_cancel),      cmocka_unit_test(test_free_while_running),
                cmocka_unit_test(test_invalid),     cmocka_unit_test(test_ring_failure),
        };
        return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
