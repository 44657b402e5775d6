/* Host slabs on sealed memfds.  The slab's capacity is rounded up to its
 * page size, which also lets the last direct read of a file land whole;
 * sealing trims a shmem slab back to the file size before the seals go on.
 *
 * What clients receive is not the daemon's descriptor but an O_RDONLY
 * reopen of it (client_fd), made when the slab is sealed, after the memfd's
 * mode became 0444: a client can map it read-only and nothing else; it can
 * neither grow it (the seal), nor shrink it (not open for writing), nor
 * reopen it for writing under another uid (the mode).  When the daemon lets
 * go of a slab it truncates it to zero through its own descriptor, so the
 * memory goes back at once and the host budget bounds what clients can keep
 * mapped: a client that touches a mapping after its lease ended gets
 * SIGBUS.
 *
 * A hugetlb memfd reserves its pages when it is mapped shared, so a short
 * pool shows up as ENOMEM at slab_new() and never as SIGBUS later. */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "io/reader.h"
#include "store/slab.h"

#define MEMFD_NAME_MAX 200 /* the kernel allows 249 bytes */
/* Not F_SEAL_SHRINK: the daemon truncates a slab to nothing when it lets
 * go of it, so its pages go back at once even where a client still holds
 * a descriptor (clients hold an O_RDONLY one: they cannot truncate). */
#define SLAB_SEALS (F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL)

#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21U << 26)
#endif

static const char *const slab_pages_names[_SLAB_PAGES_MAX] = {
        [SLAB_PAGES_AUTO] = "auto",
        [SLAB_PAGES_HUGETLB] = "hugetlb",
        [SLAB_PAGES_SMALL] = "small",
};

const char *slab_pages_to_string(SlabPages p) {
        return p < _SLAB_PAGES_MAX ? slab_pages_names[p] : NULL;
}

int slab_pages_from_string(const char *s) {
        return string_table_lookup(slab_pages_names, _SLAB_PAGES_MAX, s);
}

/* Create, size and map the memfd; on failure nothing is left open. */
static int slab_map(Slab *s, const char *name, bool hugetlb) {
        unsigned flags = MFD_CLOEXEC | MFD_ALLOW_SEALING | (hugetlb ? MFD_HUGETLB | MFD_HUGE_2MB : 0);
        uint64_t page = hugetlb ? SLAB_HUGE_PAGE_SIZE : READER_ALIGN;
        int fd, r;

        s->capacity = ALIGN_UP(MAX(s->size, 1u), page);
        fd = memfd_create(name, flags);
        if (fd < 0)
                return negative_errno();
        if (ftruncate(fd, (off_t) s->capacity) < 0) {
                r = negative_errno();
                safe_close(fd);
                return r;
        }
        s->data = mmap(NULL, s->capacity, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (s->data == MAP_FAILED) {
                r = negative_errno();
                s->data = NULL;
                safe_close(fd);
                return r;
        }
        s->fd = fd;
        s->hugetlb = hugetlb;
        return 0;
}

int slab_new(Slab **ret, const char *name, uint64_t size, SlabPages pages) {
        _cleanup_(slab_freep) Slab *s = NULL;
        const char *base = strrchr(name, '/');
        char memfd_name[MEMFD_NAME_MAX + 1];
        int r = -EOPNOTSUPP;

        s = calloc(1, sizeof(Slab));
        if (!s)
                return -ENOMEM;
        s->fd = s->client_fd = -1;
        s->size = size;

        /* memfd names are limited; the file name is what helps in /proc. */
        snprintf(memfd_name, sizeof(memfd_name), "weightd:%s", base ? base + 1 : name);
        if (pages != SLAB_PAGES_SMALL) {
                r = slab_map(s, memfd_name, true);
                if (r < 0 && pages == SLAB_PAGES_HUGETLB)
                        return r;
        }
        if (r < 0) {
                r = slab_map(s, memfd_name, false);
                if (r < 0)
                        return r;
                /* Shmem can still use transparent huge pages where the
                 * system allows it (shmem_enabled=advise); a hint only. */
                (void) madvise(s->data, s->capacity, MADV_HUGEPAGE);
        }
        *ret = TAKE_PTR(s);
        return 0;
}

Slab *slab_free(Slab *s) {
        if (!s)
                return NULL;
        if (s->data)
                munmap(s->data, s->capacity);
        /* Clients may still hold client_fd: take the pages back anyway. */
        if (s->fd >= 0 && s->sealed)
                (void) ftruncate(s->fd, 0);
        safe_close(s->client_fd);
        safe_close(s->fd);
        free(s);
        return NULL;
}

int slab_seal(Slab *s) {
        uint64_t capacity = s->capacity;
        void *ro;

        if (s->sealed)
                return 0;
        /* hugetlb files only take whole huge pages: the tail stays. */
        if (!s->hugetlb) {
                if (ftruncate(s->fd, (off_t) s->size) < 0)
                        return negative_errno();
                capacity = MAX(s->size, 1u);
        }
        if (fchmod(s->fd, 0444) < 0)
                return negative_errno();
        if (s->client_fd < 0) {
                char path[64];

                snprintf(path, sizeof(path), "/proc/self/fd/%d", s->fd);
                s->client_fd = open(path, O_RDONLY | O_CLOEXEC);
                if (s->client_fd < 0)
                        return negative_errno();
        }
        if (fcntl(s->fd, F_ADD_SEALS, SLAB_SEALS) < 0)
                return negative_errno();
        /* Replace the writable mapping: nothing in this process can write any more either. */
        ro = mmap(NULL, capacity, PROT_READ, MAP_SHARED, s->fd, 0);
        if (ro == MAP_FAILED)
                return negative_errno();
        munmap(s->data, s->capacity);
        s->data = ro;
        s->capacity = capacity;
        s->sealed = true;
        return 0;
}
