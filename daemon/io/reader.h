/* The io_uring reader: a thread with its own ring that streams extents of
 * files into destination memory.
 *
 * A job is a list of extents.  The reader splits them into chunks of
 * chunk_size bytes and keeps up to queue_depth reads in flight across all
 * jobs, served round-robin so that one large job does not starve another.
 * Direct extents are read with aligned offsets and lengths (the last chunk
 * rounded up: the destination must have room up to the next multiple of
 * READER_ALIGN); short reads are resubmitted, through the buffered fd when
 * the remainder is no longer aligned; EINTR and EAGAIN are retried; any other
 * error fails that job only.  If the ring itself fails, every job (running,
 * queued, or submitted later) ends with the ring's error, and so do reads
 * in flight; the kernel may still be finishing those when their job's done
 * callback runs.  Progress and completion are reported through callbacks
 * that run on the reader thread: keep them short and hand over to your own
 * loop. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "macro.h"

/* Offset, length and memory alignment of direct reads. */
#define READER_ALIGN 4096u

typedef struct Reader Reader;
typedef struct ReaderJob ReaderJob;

typedef struct ReaderParams {
        unsigned queue_depth; /* reads in flight, 1..4096 */
        uint64_t chunk_size;  /* bytes per read, a multiple of READER_ALIGN */
} ReaderParams;

#define READER_PARAMS_DEFAULT ((ReaderParams){ .queue_depth = 32, .chunk_size = 16u << 20 })

typedef struct ReaderExtent {
        int fd;          /* read from here: O_DIRECT when direct is set */
        int buffered_fd; /* without O_DIRECT; for unaligned remainders (may equal fd when !direct) */
        bool direct;
        uint64_t offset; /* file offset; aligned when direct */
        uint64_t length;
        void *dest;      /* receives byte `offset`; aligned when direct */
} ReaderExtent;

/* Called after each completed chunk with the job's bytes done so far. */
typedef void (*reader_progress_fn)(ReaderJob *job, uint64_t done, uint64_t total, void *userdata);
/* Called once, last: error is 0, -ECANCELED, -ENODATA (a file ended before
 * its extent did), or the -errno of the failed read; failed_extent is the
 * index of the extent that failed (undefined when error is 0). */
typedef void (*reader_done_fn)(ReaderJob *job, int error, size_t failed_extent, void *userdata);

int reader_new(Reader **ret, const ReaderParams *params);
/* Stops the thread; jobs still running complete with -ECANCELED first. */
Reader *reader_free(Reader *r);
DEFINE_TRIVIAL_CLEANUP_FUNC(Reader *, reader_free);

/* A job copies the extents.  It must stay allocated until its done callback
 * has returned; free it after that (not from inside the callback). */
int reader_job_new(ReaderJob **ret, const ReaderExtent *extents, size_t n_extents, reader_progress_fn progress,
                   reader_done_fn done, void *userdata);
ReaderJob *reader_job_free(ReaderJob *job);
DEFINE_TRIVIAL_CLEANUP_FUNC(ReaderJob *, reader_job_free);
uint64_t reader_job_total(const ReaderJob *job);
/* Bytes of extent i read contiguously from its start so far: its
 * destination holds them.  Any thread; monotone; the whole extent by the time
 * done reports success.  The progress callback runs after it moved. */
uint64_t reader_job_filled(const ReaderJob *job, size_t extent);
/* When the reader issued the job's first read and when its last read
 * completed, by now_usec() (both when the job ended, if it had nothing to
 * read).  Once done was called: in the done callback, or on a thread that
 * learnt of it from there (through a lock or an atomic). */
void reader_job_times(const ReaderJob *job, uint64_t *ret_first_usec, uint64_t *ret_last_usec);

/* Queue a job.  Returns 0 or -errno (nothing was queued then). */
int reader_submit(Reader *r, ReaderJob *job);
/* Ask a submitted job to stop: no new reads start, and once the reads in
 * flight have landed its done callback gets -ECANCELED (unless it had already
 * finished).  Safe from any thread until the job is freed. */
void reader_cancel(ReaderJob *job);

/* Bytes read from storage by this reader since it started. */
uint64_t reader_bytes_read(Reader *r);
/* Reads from storage that completed with data, since it started. */
uint64_t reader_reads(Reader *r);

/* Convenience for tools and tests: submit and wait for completion. */
int reader_run(Reader *r, const ReaderExtent *extents, size_t n_extents, size_t *ret_failed_extent);

struct io_uring;
/* Tests only: when a test program defines this function, the reader thread
 * calls it instead of io_uring_submit_and_wait(ring, wait_nr), so that a
 * test can make the ring fail.  Not defined in the daemon (a weak
 * reference, NULL there). */
int reader_test_submit_and_wait(struct io_uring *ring, unsigned wait_nr) __attribute__((weak));
