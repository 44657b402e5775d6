/* The residency cache: components resident in one kind of memory (host
 * memory, or one GPU's), keyed by model, component, variant (how they are
 * delivered: "" for whole tensors, else a sharding) and the identities of
 * their files, under a byte budget.
 *
 * An entry is charged against the budget from the moment a load reserves it
 * until its memory is gone.  When a reservation does not fit, the cache
 * evicts least-recently-used resident entries that have no lease and no pin;
 * if even evicting all of them would not make room it evicts nothing and
 * fails with WD_E_BUDGET naming the shortfall.  An entry whose files changed
 * is never served again.
 *
 * Every user of an entry holds a reference (cache_entry_ref()): a lease, a
 * reply being built, a copy or a shard build reading from it, a load filling
 * it.  Evicting or retiring an entry only unlinks it (DETACHED: nothing finds
 * it any more); its memory goes, and its bytes are credited to the budget,
 * when the last reference does.  Eviction by the budget takes only entries
 * nobody references; an explicit evict refuses leased and pinned ones.
 *
 * Not thread-safe: one thread (the daemon's loop) owns a cache. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "store/slab.h"
#include "util/error.h"
#include "util/fs-util.h"

typedef struct Cache Cache;
typedef struct CacheEntry CacheEntry;

typedef enum CacheEntryState {
        CACHE_ENTRY_LOADING,  /* reserved, being filled */
        CACHE_ENTRY_RESIDENT, /* sealed slabs, servable */
        CACHE_ENTRY_DETACHED, /* stale or evicted, kept only for its leases */
} CacheEntryState;

struct CacheEntry {
        Cache *cache;
        char *model;
        char *component;
        char *variant; /* "" for whole tensors */
        size_t n_files;
        FileId *ids;
        Slab **slabs; /* host memory: n_slabs, set when resident */
        size_t n_slabs;
        void *memory; /* other memory (a device slab), freed by the cache's cache_free_memory_fn */
        uint64_t bytes;
        CacheEntryState state;
        unsigned refs;   /* every user, leases included */
        unsigned leases; /* of those, clients' leases (listings, evict's BUSY) */
        bool pinned;
        bool wanted; /* a request wanted this entry itself, not only as the source of a device copy
                      * (device loads with keep_host no that shared its load leave it) */
        uint64_t last_use;      /* the cache's use counter: orders the LRU list */
        uint64_t last_use_usec; /* CLOCK_MONOTONIC of the last use, for listings */
        CacheEntry *prev, *next;
        /* The cache's hash tables (not detached entries): by model and
         * component, and by variant and files. */
        uint64_t key_hash, files_hash;
        CacheEntry *key_next, *files_next;
};

typedef struct CacheStats {
        uint64_t budget;
        uint64_t used;      /* charged: resident + loading + detached */
        uint64_t evictable; /* resident, no lease, no pin */
        size_t n_entries;   /* in the lookup list (not detached) */
        size_t n_detached;
        uint64_t evictions;
} CacheStats;

/* name says whose budget it is in messages: "host", "cuda:0". */
int cache_new(Cache **ret, const char *name, uint64_t budget);
const char *cache_name(const Cache *c);

/* Who frees an entry's memory (CacheEntry.memory) when the cache lets go. */
typedef void (*cache_free_memory_fn)(void *memory, void *userdata);
void cache_set_memory_free(Cache *c, cache_free_memory_fn free_memory, void *userdata);
/* How a client gets at such memory: its descriptor (and the bytes to map),
 * or -1. */
typedef int (*cache_memory_fd_fn)(const void *memory, uint64_t *ret_map_size);
void cache_set_memory_fd(Cache *c, cache_memory_fd_fn memory_fd);
int cache_entry_memory_fd(const CacheEntry *e, uint64_t *ret_map_size);

/* Who frees the slabs the cache lets go of (evicted, stale, released, or of
 * a failed load).  By default the cache frees them at once; the daemon hands
 * them to a worker thread instead, because giving many GiB of pages back to
 * the kernel takes a while (about 0.15 s per GiB of 4 KiB pages on the
 * project's VM).  reap takes the n slabs and the array.  The budget is
 * credited when the cache lets go, not when the pages are gone. */
typedef void (*cache_reap_fn)(Slab **slabs, size_t n, void *userdata);
void cache_set_reaper(Cache *c, cache_reap_fn reap, void *userdata);
/* Let go of slabs through the reaper (or free them now); takes the slabs and
 * the array (NULL entries allowed). */
void cache_reap_slabs(Cache *c, Slab **slabs, size_t n);
/* Frees every entry: only call when no lease can still be in use. */
Cache *cache_free(Cache *c);
DEFINE_TRIVIAL_CLEANUP_FUNC(Cache *, cache_free);

/* A resident or loading entry for exactly these files, marked as used; NULL
 * when there is none.  An entry for the same model and component whose files
 * differ is dropped or detached on the way. */
CacheEntry *cache_lookup(Cache *c, const char *model, const char *component, const char *variant, const FileId *ids,
                         size_t n_ids);

/* A resident or loading entry holding exactly these files under any model
 * path (a symlinked folder, another spelling), marked as used; NULL when
 * there is none.  Only ever one: cache_reserve() refuses a second. */
CacheEntry *cache_lookup_files(Cache *c, const char *variant, const FileId *ids, size_t n_ids);

/* Reserve bytes for a new LOADING entry, evicting as needed.  Returns 0,
 * WD_E_BUDGET (err names the shortfall), WD_E_BUSY if an entry for these
 * files exists already, or -ENOMEM. */
int cache_reserve(Cache *c, const char *model, const char *component, const char *variant, const FileId *ids,
                  size_t n_ids, uint64_t bytes, CacheEntry **ret, WdError *err);

/* Take and drop a reference.  cache_entry_unref() frees a detached entry
 * with its last reference (its memory through the reaper); it accepts NULL. */
CacheEntry *cache_entry_ref(CacheEntry *e);
void cache_entry_unref(CacheEntry *e);
static inline void cache_entry_unrefp(CacheEntry **e) {
        cache_entry_unref(*e);
}

/* A loading entry becomes resident; takes ownership of n_slabs slabs (the
 * array too), or of memory. */
void cache_entry_set_resident(CacheEntry *e, Slab **slabs, size_t n_slabs);
void cache_entry_set_resident_memory(CacheEntry *e, void *memory);
/* A load failed: unlink the loading entry; its bytes go back with its last
 * reference (at once when there is none). */
void cache_entry_abort(CacheEntry *e);

/* A client's lease: a reference that listings count and that makes an
 * explicit evict BUSY. */
void cache_entry_lease(CacheEntry *e);
/* Ends one lease (and its reference): the entry may be freed by this call. */
void cache_entry_unlease(CacheEntry *e);
void cache_entry_pin(CacheEntry *e);
void cache_entry_unpin(CacheEntry *e);

/* Evict a resident entry now: unlink it; its memory goes with its last
 * reference.  Returns 0, or WD_E_BUSY (err says why) when it is loading,
 * leased or pinned. */
int cache_entry_evict(CacheEntry *e, WdError *err);

/* Change the budget; entries over it stay until they can be evicted. */
void cache_set_budget(Cache *c, uint64_t budget);
/* O(1): every figure is kept as entries change, none is counted here. */
void cache_get_stats(Cache *c, CacheStats *ret);

/* Iterate entries that are not detached, most recently used first. */
CacheEntry *cache_first(Cache *c);
CacheEntry *cache_next(CacheEntry *e);
/* Iterate the entries of one model and component that are not detached,
 * whatever their variant and files, in no particular order; O(their
 * number).  An entry may be evicted or retired between the two calls only
 * if the next was taken before. */
CacheEntry *cache_first_of(Cache *c, const char *model, const char *component);
CacheEntry *cache_next_of(CacheEntry *e);
/* Iterate detached entries (stale or evicted, still leased); cache_next()
 * continues among them. */
CacheEntry *cache_first_detached(Cache *c);
