/* Host slabs on sealed memfds.  The slab's capacity is rounded up to the
 * reader's alignment so that the last direct read of a file may land whole;
 * sealing trims it back to the file size before the seals go on. */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#include "io/reader.h"
#include "store/slab.h"

#define MEMFD_NAME_MAX 200 /* the kernel allows 249 bytes */
#define SLAB_SEALS (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL)

int slab_new(Slab **ret, const char *name, uint64_t size) {
        _cleanup_(slab_freep) Slab *s = NULL;
        const char *base = strrchr(name, '/');
        char memfd_name[MEMFD_NAME_MAX + 1];

        s = calloc(1, sizeof(Slab));
        if (!s)
                return -ENOMEM;
        s->fd = -1;
        s->size = size;
        s->capacity = ALIGN_UP(MAX(size, 1u), READER_ALIGN);

        /* memfd names are limited; the file name is what helps in /proc. */
        snprintf(memfd_name, sizeof(memfd_name), "weightd:%s", base ? base + 1 : name);
        s->fd = memfd_create(memfd_name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
        if (s->fd < 0)
                return negative_errno();
        if (ftruncate(s->fd, (off_t) s->capacity) < 0)
                return negative_errno();
        s->data = mmap(NULL, s->capacity, PROT_READ | PROT_WRITE, MAP_SHARED, s->fd, 0);
        if (s->data == MAP_FAILED) {
                s->data = NULL;
                return negative_errno();
        }
        /* Large slabs fill faster and page-lock faster on huge pages where
         * shmem offers them; a hint only. */
        (void) madvise(s->data, s->capacity, MADV_HUGEPAGE);
        *ret = TAKE_PTR(s);
        return 0;
}

Slab *slab_free(Slab *s) {
        if (!s)
                return NULL;
        if (s->data)
                munmap(s->data, s->sealed ? MAX(s->size, 1u) : s->capacity);
        safe_close(s->fd);
        free(s);
        return NULL;
}

int slab_seal(Slab *s) {
        void *ro;

        if (s->sealed)
                return 0;
        if (ftruncate(s->fd, (off_t) s->size) < 0)
                return negative_errno();
        if (fcntl(s->fd, F_ADD_SEALS, SLAB_SEALS) < 0)
                return negative_errno();
        /* Replace the writable mapping: nothing in this process can write any more either. */
        ro = mmap(NULL, MAX(s->size, 1u), PROT_READ, MAP_SHARED, s->fd, 0);
        if (ro == MAP_FAILED)
                return negative_errno();
        munmap(s->data, s->capacity);
        s->data = ro;
        s->sealed = true;
        return 0;
}
