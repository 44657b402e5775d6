/* Host slabs: one sealed memfd per safetensors file holding the whole file,
 * so a file offset is a slab offset.
 *
 * A slab is created writable, filled in place by the reader, then sealed
 * (F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL, mode 0444) and mapped
 * read-only; clients get client_fd, an O_RDONLY reopen, and can only map it
 * read-only.  slab_free() truncates a sealed slab to zero first, so its
 * memory is gone even where a client kept a descriptor.
 *
 * Slabs are backed by hugetlb pages where the system has a pool reserved for
 * them (vm.nr_hugepages): 512 times fewer page faults to fill a slab, which
 * is what bounds a load where faulting fresh memory is slow.  Without a pool,
 * or when it is short, a slab is ordinary shmem. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "macro.h"

#define SLAB_HUGE_PAGE_SIZE (2u << 20)

typedef enum SlabPages {
        SLAB_PAGES_AUTO,    /* hugetlb if the pool can hold the slab, else shmem */
        SLAB_PAGES_HUGETLB, /* hugetlb or fail */
        SLAB_PAGES_SMALL,   /* shmem with the base page size */
        _SLAB_PAGES_MAX,
} SlabPages;

const char *slab_pages_to_string(SlabPages p);
int slab_pages_from_string(const char *s); /* -EINVAL when unknown */

typedef struct Slab {
        int fd;            /* the daemon's, read-write */
        int client_fd;     /* once sealed: the O_RDONLY reopen clients get */
        uint64_t size;     /* bytes of content (the file's size) */
        uint64_t capacity; /* bytes of the memfd and its mapping: size rounded
                            * up to the page size (hugetlb memfds cannot be
                            * trimmed, so there it stays larger than size) */
        uint8_t *data;     /* writable until sealed, read-only after */
        bool hugetlb;
        bool sealed;
} Slab;

/* A slab of size bytes; the last component of name shows in /proc/PID/fd
 * ("memfd:weightd:NAME", cut to 200 bytes).  Returns 0 or -errno (-ENOMEM
 * for SLAB_PAGES_HUGETLB when the pool is short). */
int slab_new(Slab **ret, const char *name, uint64_t size, SlabPages pages);
Slab *slab_free(Slab *s);
DEFINE_TRIVIAL_CLEANUP_FUNC(Slab *, slab_free);

/* Trim to size (shmem only), seal, and remap read-only. */
int slab_seal(Slab *s);
