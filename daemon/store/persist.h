/* The host tier across a restart of the daemon.  Before it exits, the daemon
 * describes its resident host entries in an index (a sealed memfd) and hands
 * the index and every entry's slabs to the service manager's file
 * descriptor store; the next process gets them back, checks them and adopts
 * what still matches into its cache, charged to its budget like a load.
 *
 * This module knows the index and the slabs; it does not know the service
 * manager (server/fdstore.c), nor how a file's identity is checked now (the
 * caller resolves the component again and compares).
 *
 * The index, every integer little-endian:
 *
 *   header   8  magic "WDFDIDX\0"
 *            4  version (1)
 *            4  0
 *            8  payload length in bytes
 *            8  SipHash-2-4 of the payload under a fixed key: a checksum
 *               against truncation and corruption, not an authenticator
 *   payload  4  number of entries, most recently used first; each:
 *            str model, str component, str variant (str: u32 length, bytes
 *            without NUL), u64 bytes charged, u32 flags (1 pinned, 2
 *            wanted), u32 number of files and per file its identity (u64
 *            dev, ino, size, i64 mtime s, u32 mtime ns, i64 ctime s, u32
 *            ctime ns), u32 number of slabs and per slab u32 id, u64 content
 *            size, u64 memfd size, u64 memfd inode.
 *
 * A slab with id N is stored under the name "weightd-slab-N" (N in hex),
 * the index under "weightd-index".  Anything that breaks a rule refuses the
 * whole index: it comes from the daemon itself, so a broken one means
 * something went wrong, and nothing of it is trusted. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "store/cache.h"
#include "util/error.h"
#include "util/fs-util.h"

#define PERSIST_INDEX_NAME "weightd-index"
#define PERSIST_SLAB_PREFIX "weightd-slab-"
#define PERSIST_NAME_MAX 32
/* The largest index accepted (about 3 KiB per entry at worst). */
#define PERSIST_INDEX_MAX (256u << 20)

typedef struct PersistSlab {
        uint32_t id;
        uint64_t size;     /* bytes of content */
        uint64_t fd_size;  /* the memfd's size (st_size) */
        uint64_t ino;      /* the memfd's inode */
} PersistSlab;

typedef struct PersistEntry {
        char *model;
        char *component;
        char *variant;
        uint64_t bytes;
        bool pinned;
        bool wanted;
        size_t n_files;
        FileId *ids;
        size_t n_slabs;
        PersistSlab *slabs;
} PersistEntry;

typedef struct PersistIndex {
        size_t n_entries; /* most recently used first */
        PersistEntry *entries;
        uint32_t n_slab_ids; /* every slab id is below this */
} PersistIndex;

PersistIndex *persist_index_free(PersistIndex *x);
DEFINE_TRIVIAL_CLEANUP_FUNC(PersistIndex *, persist_index_free);

/* "weightd-slab-N". */
const char *persist_slab_name(uint32_t id, char buf[static PERSIST_NAME_MAX]);
/* The id in a slab's name, or -EINVAL when name is not one. */
int64_t persist_slab_id(const char *name);

/* The index of the resident host entries of c, at most max_slabs slabs in
 * all (whole entries only, most recently used first).  Returns 0, a sealed
 * memfd in ret_fd and the slabs in ret_slabs (borrowed from the cache:
 * slab id i is ret_slabs[i]), or -errno. */
int persist_index_save(Cache *c, size_t max_slabs, int *ret_fd, Slab ***ret_slabs, size_t *ret_n_slabs,
                       size_t *ret_n_entries);

/* Parse an index from memory.  Returns 0, or WD_E_FORMAT with err saying
 * what is wrong, or -ENOMEM. */
int persist_index_parse(const uint8_t *buf, size_t len, PersistIndex **ret, WdError *err);
/* Read and parse the index in fd (a sealed memfd, checked).  Returns 0,
 * WD_E_FORMAT or -errno with err filled. */
int persist_index_read(int fd, PersistIndex **ret, WdError *err);

/* A slab from a stored memfd that must be exactly what ps describes: its
 * inode, size, mode 0444 and seals as slab_seal() left them.  Takes fd
 * (closed on failure).  Returns 0, WD_E_CHANGED (err says why) or -errno. */
int persist_slab_adopt(int fd, const PersistSlab *ps, Slab **ret, WdError *err);

/* The slab's pages stay with the store: close the daemon's descriptor
 * without truncating, so that slab_free() leaves the memory alone. */
void persist_slab_release(Slab *s);

/* Make pe resident in c with its slabs (n = pe->n_slabs, taken, the array
 * too, also on failure), reserved like a load: evicting older entries, or
 * WD_E_BUDGET.  A whole entry's slabs must match its files' sizes.
 * Returns 0, WD_E_BUDGET, WD_E_BUSY, WD_E_CHANGED or -ENOMEM with err
 * filled. */
int persist_entry_adopt(Cache *c, const PersistEntry *pe, Slab **slabs, WdError *err);
