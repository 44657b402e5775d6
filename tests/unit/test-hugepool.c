/* The daemon's hugetlb pool: how many pages a budget asks for, and (as
 * root, where the 2 MiB pool exists) that a resize adds and gives back
 * exactly its own pages, that the touch ends, and that pages slabs hold
 * go back once they are free. */
#include <sys/mman.h>
#include <unistd.h>

#include "store/hugepool.h"
#include "test-util.h"

#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21U << 26)
#endif

static void test_pages_for(void **state) {
        _cleanup_(hugepool_freep) HugePool *p = NULL;

        assert_int_equal(hugepool_new(&p), 0);
        /* The budget in 2 MiB pages, rounded up; never more than max_bytes. */
        assert_true(hugepool_pages_for(p, 1, 0) == 1);
        assert_true(hugepool_pages_for(p, 4ull << 20, 0) == 2);
        assert_true(hugepool_pages_for(p, (4ull << 20) + 1, 0) == 3);
        assert_true(hugepool_pages_for(p, 64ull << 20, 32ull << 20) == 16);
        assert_true(hugepool_pages_for(p, 64ull << 20, (32ull << 20) + 1) == 16);
        /* Never the whole RAM: a tenth (at least 1 GiB) stays available. */
        long pages = sysconf(_SC_PHYS_PAGES), size = sysconf(_SC_PAGESIZE);
        uint64_t total = (uint64_t) pages * (uint64_t) size;
        assert_true(hugepool_pages_for(p, total, 0) * HUGEPOOL_PAGE_SIZE <= total - total / 10);
        assert_true(hugepool_pages_for(p, UINT64_MAX / 2, 0) * HUGEPOOL_PAGE_SIZE < total);
}

static bool can_resize(void) {
        return geteuid() == 0 && access(HUGEPOOL_NR_PATH, W_OK) == 0;
}

static void test_resize_touch_give_back(void **state) {
        _cleanup_(hugepool_freep) HugePool *p = NULL;
        uint64_t before, after, n;
        HugePoolStats st;
        int fd;
        void *m;

        if (!can_resize()) {
                print_message("not root or no writable %s: skipping\n", HUGEPOOL_NR_PATH);
                skip();
        }
        assert_int_equal(hugepool_new(&p), 0);
        assert_int_equal(hugepool_resize(p, 8, &before, &after), 0);
        hugepool_get_stats(p, &st);
        assert_true(st.reserved_pages == 8);
        /* Relative: others may change the pool meanwhile, but not by
         * exactly this much at exactly this moment. */
        assert_true(after - before == 8);

        assert_int_equal(hugepool_touch(p), 0);
        for (int i = 0; i < 10000 && !hugepool_poll(p); i++)
                usleep(1000);
        hugepool_get_stats(p, &st);
        assert_false(st.touching);
        assert_true(st.touched_pages <= st.reserved_pages);
        assert_false(hugepool_poll(p)); /* once */

        /* A "slab" holds 2 of the pages: a shrink to 0 gives back the other
         * 6, and the 2 either at once (the kernel makes them surplus pages,
         * which it frees with the slab) or, owed, once the slab lets go. */
        fd = memfd_create("test-hugepool", MFD_CLOEXEC | MFD_HUGETLB | MFD_HUGE_2MB);
        assert_true(fd >= 0);
        assert_int_equal(ftruncate(fd, 2 * HUGEPOOL_PAGE_SIZE), 0);
        m = mmap(NULL, 2 * HUGEPOOL_PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
        assert_true(m != MAP_FAILED);
        assert_int_equal(hugepool_resize(p, 0, &before, &after), 0);
        hugepool_get_stats(p, &st);
        /* The kernel keeps the pages in use (or makes them surplus, freed
         * with the slab): either way the books add up. */
        assert_true(st.reserved_pages == 8 - (before - after));
        assert_true(st.owed_pages == st.reserved_pages);
        munmap(m, 2 * HUGEPOOL_PAGE_SIZE);
        close(fd);
        assert_int_equal(hugepool_retry(p, &n), 0);
        hugepool_get_stats(p, &st);
        assert_true(st.reserved_pages == 0);
        assert_true(st.owed_pages == 0);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_pages_for),
                cmocka_unit_test(test_resize_touch_give_back),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
