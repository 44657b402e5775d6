/* The daemon's own hugetlb pool ([memory] hugetlb_reserve): 2 MiB pages
 * that the daemon adds to the kernel's pool (vm.nr_hugepages, through
 * /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages) so that slabs
 * land on huge pages on a node nobody tuned, and that it touches once on
 * background threads at start, so that the first load does not pay for
 * memory the machine never used (zeroing it, and on a VM the host backing
 * it).
 *
 * The pages stay in the kernel's pool, free until a slab takes them: the
 * slabs take them as any hugetlb memfd does (store/slab.c), and when other
 * processes took them first the slabs fall back to shmem.  The daemon only
 * ever adds and removes its own share, relative to what the pool holds:
 * resizing to 0, or freeing the pool, gives back every page it added.  The
 * kernel frees free pages at once and pages still in use when they are
 * released.
 *
 * One thread (the daemon's loop) calls these; the touch runs on threads of
 * its own. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "macro.h"

#define HUGEPOOL_PAGE_SIZE (2ull << 20)
#define HUGEPOOL_NR_PATH "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
#define HUGEPOOL_FREE_PATH "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages"
#define HUGEPOOL_SURPLUS_PATH "/sys/kernel/mm/hugepages/hugepages-2048kB/surplus_hugepages"

typedef struct HugePool HugePool;

typedef struct HugePoolStats {
        uint64_t reserved_pages; /* added to the kernel's pool by this daemon, not given back yet */
        uint64_t owed_pages;     /* of those, pages a smaller size left to give back: slabs hold them */
        uint64_t touch_target;   /* what the last touch set out to touch: the free part of the share */
        uint64_t touched_pages;  /* of that, touched so far */
        bool touching;           /* the touch is running, or paused for a load */
        bool paused;
        uint64_t touch_usec;     /* how long the last finished touch took */
} HugePoolStats;

int hugepool_new(HugePool **ret);
/* Stops the touch and gives every page this daemon added back. */
HugePool *hugepool_free(HugePool *p);
DEFINE_TRIVIAL_CLEANUP_FUNC(HugePool *, hugepool_free);

/* Pages the daemon may reserve for a budget: the budget in 2 MiB pages
 * (rounded up), at most max_bytes (0: no limit), and never so many that
 * MemAvailable would drop below a tenth of the RAM or 1 GiB, whichever is
 * more (the pages the daemon holds already count as available). */
uint64_t hugepool_pages_for(HugePool *p, uint64_t budget, uint64_t max_bytes);

/* Make the daemon's share of the pool pages: add or remove the difference
 * to the kernel's pool.  A touch in progress stops first.  Returns 0, or
 * -errno when the pool cannot be changed (-EACCES, -EROFS: not allowed;
 * -ENOENT: no 2 MiB pool on this system); the share stays then.  The kernel
 * may add fewer pages than asked for (memory too fragmented): the share is
 * what it added.  It gives back only free pages: what slabs hold stays
 * owed (HugePoolStats.owed_pages) until hugepool_retry() finds it free.
 * *ret_before and *ret_after: vm.nr_hugepages around the
 * change (either may be NULL). */
int hugepool_resize(HugePool *p, uint64_t pages, uint64_t *ret_before, uint64_t *ret_after);

/* Give back what a shrink could not (the kernel keeps pages in use):
 * *ret_pages, the pages given back now.  Cheap when nothing is owed.
 * Returns 0 or -errno. */
int hugepool_retry(HugePool *p, uint64_t *ret_pages);

/* Touch the share on background threads (up to 4, one per CPU): each page
 * is allocated and zeroed once through a hugetlb memfd, then freed back to
 * the pool at the end.  It covers the share's pages that are free (slabs
 * hold the others).  Returns 0 or -errno (no thread). */
int hugepool_touch(HugePool *p);

/* A load is about to create slabs: stop a touch in progress, so that the
 * pages touched so far go back to the pool's free list, where the load's
 * slabs take them first (the touch holds them until it ends).  Blocks for
 * at most one step of each thread (16 MiB).  hugepool_resume() starts the
 * touch again (from the start: touched pages go fast) once no load reads. */
void hugepool_pause(HugePool *p);
int hugepool_resume(HugePool *p);

/* True once after a touch ended (the threads are joined then). */
bool hugepool_poll(HugePool *p);
void hugepool_get_stats(HugePool *p, HugePoolStats *ret);

/* Free pages of the 2 MiB pool, whoever reserved them (0 when there is
 * none). */
uint64_t hugepool_free_pages(void);
