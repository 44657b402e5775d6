/* The host tier across `systemctl restart weightd`, through the service
 * manager's file descriptor store (FileDescriptorStoreMax= in the unit).
 *
 * At exit the daemon hands the store an index of its resident host entries
 * and their slabs (store/persist.h); the next process finds them among the
 * descriptors it was started with, resolves each entry's component again,
 * and adopts the entries whose files are still the ones the slabs hold
 * (the identity the catalog reads: device, inode, size, mtime, ctime) and
 * whose slabs are still the sealed memfds the index names.  The rest is
 * dropped, its memory given back.  Without a service manager
 * ($NOTIFY_SOCKET unset) nothing of this happens. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "server/roots.h"
#include "store/cache.h"

typedef struct FdStore {
        int *fds; /* the store's descriptors not yet adopted or closed */
        char **names;
        size_t n;
} FdStore;

#define FDSTORE_NULL ((FdStore){})

/* Sort the descriptors the service manager passed: the store's are kept in
 * fs, the listening socket of a socket unit is returned.  Returns its fd
 * (>= 3), 0 when there is none, or -errno (logged) when there are several
 * listening Unix stream sockets.  Anything else is closed (and removed from
 * the store) with a warning. */
int fdstore_take(FdStore *fs);

/* Adopt what fs holds into cache, checking each entry's files under roots;
 * logs what was adopted and what was dropped and why.  Everything in fs is
 * closed afterwards and removed from the service manager's store.  Returns
 * the bytes of huge pages the adopted slabs hold: the process before took
 * them from its hugetlb pool, so they are not in the pool this one adds. */
uint64_t fdstore_adopt(FdStore *fs, Cache *cache, Roots *roots);

/* Close whatever fs still holds. */
void fdstore_done(FdStore *fs);

/* Before exit: hand the resident host entries of cache to the service
 * manager's store.  Slabs handed over keep their pages when the cache
 * frees them.  Does nothing without a service manager. */
void fdstore_save(Cache *cache);
