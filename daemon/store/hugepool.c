/* The daemon's hugetlb pool (see hugepool.h).
 *
 * Resizing writes the pool's size relative to what it reads just before,
 * so that pages others reserved stay theirs.  The touch: one thread per
 * CPU (at most TOUCH_THREADS_MAX), each with a hugetlb memfd of its part
 * of the share, fallocate()s it TOUCH_STEP_PAGES at a time (hugetlbfs
 * allocates and zeroes each page there), checking for a stop between
 * steps; the memfds stay open until every thread ended, because the
 * kernel's free list is last in, first out: a page given back early would
 * be the next one another thread takes, and pages would be touched twice
 * while others never are.  Closing them puts the touched pages at the head
 * of the free list, where the slabs' faults take them first.  A thread
 * that finds the pool short (others took pages) stops there. */
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "store/hugepool.h"
#include "util/parse-util.h"
#include "util/thread-util.h"
#include "util/time-util.h"

#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21U << 26)
#endif

#define TOUCH_THREADS_MAX 4u
#define TOUCH_STEP_PAGES 8u /* 16 MiB between checks for a stop */

typedef struct TouchPart {
        struct HugePool *pool;
        pthread_t thread;
        bool started;
        int fd;
        uint64_t pages;
} TouchPart;

struct HugePool {
        uint64_t reserved; /* pages this daemon added and did not give back yet */
        uint64_t target;   /* what the last resize asked for: below reserved while slabs hold the rest */

        pthread_t thread; /* the touch's coordinator */
        bool thread_started;
        uint64_t touch_pages; /* what the running touch covers */
        bool paused;          /* hugepool_pause() stopped the touch before its end */
        uint64_t touch_started_usec;
        atomic_bool stop;
        atomic_bool finished;
        _Atomic uint64_t touched;
        _Atomic uint64_t touch_usec;
        bool touched_once; /* poll reported the end */
};

static int read_u64_file(const char *path, uint64_t *ret) {
        _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
        char buf[32];
        ssize_t n;

        if (fd < 0)
                return negative_errno();
        n = read(fd, buf, sizeof(buf) - 1);
        if (n < 0)
                return negative_errno();
        buf[n] = '\0';
        buf[strcspn(buf, "\n")] = '\0';
        return parse_u64(buf, 0, UINT64_MAX, ret);
}

static int write_u64_file(const char *path, uint64_t v) {
        _cleanup_close_ int fd = open(path, O_WRONLY | O_CLOEXEC);
        char buf[32];
        int n;

        if (fd < 0)
                return negative_errno();
        n = snprintf(buf, sizeof(buf), "%llu\n", (unsigned long long) v);
        if (write(fd, buf, (size_t) n) != n)
                return negative_errno();
        return 0;
}

/* The persistent pool: nr_hugepages counts the surplus pages too (those a
 * smaller size left in use, which the kernel frees by itself once they
 * are), and what a write sets is the persistent count.  Accounting in
 * surplus pages would count pages the kernel gives back on its own, and a
 * write of nr_hugepages plus more would make them persistent again. */
static int read_persistent(uint64_t *ret) {
        uint64_t nr, surplus = 0;
        int r;

        r = read_u64_file(HUGEPOOL_NR_PATH, &nr);
        if (r < 0)
                return r;
        (void) read_u64_file(HUGEPOOL_SURPLUS_PATH, &surplus);
        *ret = nr - MIN(surplus, nr);
        return 0;
}

uint64_t hugepool_free_pages(void) {
        uint64_t n;

        return read_u64_file(HUGEPOOL_FREE_PATH, &n) == 0 ? n : 0;
}

/* MemTotal and MemAvailable from /proc/meminfo, in bytes. */
static int meminfo(uint64_t *ret_total, uint64_t *ret_available) {
        _cleanup_fclose_ FILE *f = fopen("/proc/meminfo", "re");
        unsigned long long total = 0, avail = 0, v;
        char key[64];

        if (!f)
                return negative_errno();
        while (fscanf(f, "%63s %llu kB\n", key, &v) == 2) {
                if (strcmp(key, "MemTotal:") == 0)
                        total = v;
                else if (strcmp(key, "MemAvailable:") == 0)
                        avail = v;
        }
        if (total == 0)
                return -EIO;
        *ret_total = total * 1024;
        *ret_available = avail * 1024;
        return 0;
}

uint64_t hugepool_pages_for(HugePool *p, uint64_t budget, uint64_t max_bytes) {
        /* Rounded up: the slabs round each file up to a page too. */
        uint64_t pages = budget / HUGEPOOL_PAGE_SIZE + (budget % HUGEPOOL_PAGE_SIZE != 0), total, avail, floor_bytes;

        if (max_bytes > 0)
                pages = MIN(pages, max_bytes / HUGEPOOL_PAGE_SIZE);
        if (meminfo(&total, &avail) == 0) {
                floor_bytes = MAX(total / 10, 1ull << 30);
                /* The pages the daemon holds are not available to others,
                 * but they are to it. */
                avail += p->reserved * HUGEPOOL_PAGE_SIZE;
                pages = MIN(pages, (avail > floor_bytes ? avail - floor_bytes : 0) / HUGEPOOL_PAGE_SIZE);
        }
        return pages;
}

int hugepool_new(HugePool **ret) {
        HugePool *p = calloc(1, sizeof(HugePool));

        if (!p)
                return -ENOMEM;
        atomic_init(&p->stop, false);
        atomic_init(&p->finished, false);
        atomic_init(&p->touched, 0);
        atomic_init(&p->touch_usec, 0);
        *ret = p;
        return 0;
}

static void touch_stop(HugePool *p) {
        if (!p->thread_started)
                return;
        atomic_store(&p->stop, true);
        pthread_join(p->thread, NULL);
        p->thread_started = false;
        atomic_store(&p->stop, false);
}

HugePool *hugepool_free(HugePool *p) {
        if (!p)
                return NULL;
        touch_stop(p);
        (void) hugepool_resize(p, 0, NULL, NULL);
        free(p);
        return NULL;
}

int hugepool_resize(HugePool *p, uint64_t pages, uint64_t *ret_before, uint64_t *ret_after) {
        uint64_t nr, now, target;
        int r;

        if (pages == p->reserved) {
                p->target = pages;
                goto done;
        }
        touch_stop(p);
        r = read_persistent(&nr);
        if (r < 0)
                return r;
        if (pages > p->reserved)
                target = nr + (pages - p->reserved);
        else
                target = nr > p->reserved - pages ? nr - (p->reserved - pages) : 0;
        r = write_u64_file(HUGEPOOL_NR_PATH, target);
        if (r < 0 && r != -ENOMEM) /* ENOMEM: the kernel added what it could */
                return r;
        r = read_persistent(&now);
        if (r < 0)
                return r;
        if (pages > p->reserved)
                p->reserved += now > nr ? now - nr : 0;
        else
                /* Pages in use (slabs hold them) become surplus, which the
                 * kernel frees once they are: given back.  Should it keep
                 * some persistent, they stay counted, and hugepool_retry()
                 * gives them back once they are free. */
                p->reserved -= MIN(nr > now ? nr - now : 0, p->reserved - pages);
        p->target = pages;
        if (ret_before)
                *ret_before = nr;
        if (ret_after)
                *ret_after = now;
        return 0;
done:
        if (ret_before || ret_after) {
                r = read_persistent(&nr);
                if (r < 0)
                        nr = 0;
                if (ret_before)
                        *ret_before = nr;
                if (ret_after)
                        *ret_after = nr;
        }
        return 0;
}

int hugepool_retry(HugePool *p, uint64_t *ret_pages) {
        uint64_t had = p->reserved;
        int r;

        /* Not while a touch holds pages: after it. */
        if (p->reserved <= p->target || p->paused || (p->thread_started && !atomic_load(&p->finished))) {
                *ret_pages = 0;
                return 0;
        }
        r = hugepool_resize(p, p->target, NULL, NULL);
        if (r < 0)
                return r;
        *ret_pages = had - p->reserved;
        return 0;
}

static void *touch_part(void *userdata) {
        TouchPart *t = userdata;
        HugePool *p = t->pool;

        t->fd = memfd_create("weightd:hugetlb-touch", MFD_CLOEXEC | MFD_HUGETLB | MFD_HUGE_2MB);
        if (t->fd < 0)
                return NULL;
        if (ftruncate(t->fd, (off_t) (t->pages * HUGEPOOL_PAGE_SIZE)) < 0)
                return NULL;
        for (uint64_t done = 0; done < t->pages && !atomic_load(&p->stop);) {
                uint64_t n = MIN(TOUCH_STEP_PAGES, t->pages - done);

                /* ENOSPC: the pool is short, others took its pages. */
                if (fallocate(t->fd, 0, (off_t) (done * HUGEPOOL_PAGE_SIZE), (off_t) (n * HUGEPOOL_PAGE_SIZE)) < 0)
                        break;
                done += n;
                atomic_fetch_add(&p->touched, n);
        }
        return NULL;
}

static void *touch_main(void *userdata) {
        HugePool *p = userdata;
        TouchPart parts[TOUCH_THREADS_MAX] = {};
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        unsigned n = (unsigned) MIN((uint64_t) MAX(cpus, 1L), TOUCH_THREADS_MAX);
        uint64_t left = p->touch_pages;

        n = (unsigned) MAX(MIN((uint64_t) n, left / TOUCH_STEP_PAGES), 1u);
        for (unsigned i = 0; i < n; i++) {
                parts[i] = (TouchPart){ .pool = p, .fd = -1, .pages = left / (n - i) };
                left -= parts[i].pages;
        }
        /* Part 0 on this thread; the others on their own. */
        for (unsigned i = 1; i < n; i++)
                parts[i].started = thread_create_nosignals(&parts[i].thread, touch_part, &parts[i]) == 0;
        touch_part(&parts[0]);
        for (unsigned i = 1; i < n; i++) {
                if (parts[i].started)
                        pthread_join(parts[i].thread, NULL);
                else
                        touch_part(&parts[i]);
        }
        for (unsigned i = 0; i < n; i++)
                safe_close(parts[i].fd);
        atomic_store(&p->touch_usec, now_usec() - p->touch_started_usec);
        atomic_store(&p->finished, true);
        return NULL;
}

int hugepool_touch(HugePool *p) {
        int r;

        touch_stop(p);
        p->paused = false;
        p->touched_once = false;
        atomic_store(&p->touched, 0);
        atomic_store(&p->finished, false);
        /* Pages slabs hold already need no touch: what is free, up to the
         * share. */
        p->touch_pages = MIN(p->reserved, hugepool_free_pages());
        if (p->touch_pages == 0) {
                atomic_store(&p->touch_usec, 0);
                atomic_store(&p->finished, true);
                return 0;
        }
        p->touch_started_usec = now_usec();
        r = thread_create_nosignals(&p->thread, touch_main, p);
        if (r != 0) {
                atomic_store(&p->finished, true);
                return -r;
        }
        p->thread_started = true;
        return 0;
}

void hugepool_pause(HugePool *p) {
        if (!p->thread_started || atomic_load(&p->finished))
                return;
        touch_stop(p);
        p->paused = true;
}

int hugepool_resume(HugePool *p) {
        return p->paused ? hugepool_touch(p) : 0;
}

bool hugepool_poll(HugePool *p) {
        if (p->touched_once || p->paused || !atomic_load(&p->finished))
                return false;
        if (p->thread_started) {
                pthread_join(p->thread, NULL);
                p->thread_started = false;
        }
        p->touched_once = true;
        return true;
}

void hugepool_get_stats(HugePool *p, HugePoolStats *ret) {
        *ret = (HugePoolStats){
                .reserved_pages = p->reserved,
                .owed_pages = p->reserved > p->target ? p->reserved - p->target : 0,
                .touched_pages = MIN(atomic_load(&p->touched), p->reserved),
                .touch_target = p->touch_pages,
                .touching = (p->thread_started && !atomic_load(&p->finished)) || p->paused,
                .paused = p->paused,
                .touch_usec = atomic_load(&p->touch_usec),
        };
}
