/* Residency cache: a doubly linked list kept in most-recently-used order, so
 * eviction walks from the tail, and two hash tables over the same entries
 * (not detached ones), so that no request walks every entry:
 *
 *   - by model and component: the entries of a component, whatever their
 *     variant and files (a lookup, a reservation's duplicate check, Evict,
 *     Pin and Unpin);
 *   - by variant and file identities: the entry holding these files under
 *     any model path (cache_lookup_files()).
 *
 * Both are chained tables of a power-of-two size that doubles when entries
 * outnumber buckets, hashed with SipHash-2-4 under a key drawn at
 * cache_new(): model paths come from peers, and a peer that cannot predict
 * the hash cannot make entries share a bucket.
 *
 * The bytes eviction could free (resident, unreferenced, unpinned) are kept
 * as a counter, updated wherever what evictable() reads changes, so that
 * Status and a reservation that does not fit read it in O(1). */
#include <assert.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "store/cache.h"
#include "util/siphash24.h"

#define BUCKETS_MIN 64

struct Cache {
        char *name; /* "host", "cuda:0": for messages */
        uint64_t budget;
        uint64_t used;
        uint64_t evictable; /* bytes of the entries evictable() takes */
        uint64_t evictions;
        uint64_t clock;
        CacheEntry *head, *tail; /* MRU .. LRU, not detached */
        CacheEntry *detached;    /* singly linked through next */
        size_t n_entries, n_detached;
        uint8_t hash_key[SIPHASH_KEY_SIZE];
        size_t n_buckets;                  /* of each table: a power of two */
        CacheEntry **by_key, **by_files;   /* chained through key_next, files_next */
        cache_reap_fn reap;
        void *reap_userdata;
        cache_free_memory_fn free_memory;
        void *free_memory_userdata;
        cache_memory_fd_fn memory_fd;
};

int cache_new(Cache **ret, const char *name, uint64_t budget) {
        Cache *c = calloc(1, sizeof(Cache));

        if (!c)
                return -ENOMEM;
        c->name = strdup(name);
        if (!c->name) {
                free(c);
                return -ENOMEM;
        }
        c->n_buckets = BUCKETS_MIN;
        c->by_key = calloc(c->n_buckets, sizeof(CacheEntry *));
        c->by_files = calloc(c->n_buckets, sizeof(CacheEntry *));
        if (!c->by_key || !c->by_files)
                return cache_free(c), -ENOMEM;
        siphash24_random_key(c->hash_key);
        c->budget = budget;
        *ret = c;
        return 0;
}

void cache_set_memory_free(Cache *c, cache_free_memory_fn free_memory, void *userdata) {
        c->free_memory = free_memory;
        c->free_memory_userdata = userdata;
}

void cache_set_memory_fd(Cache *c, cache_memory_fd_fn memory_fd) {
        c->memory_fd = memory_fd;
}

int cache_entry_memory_fd(const CacheEntry *e, uint64_t *ret_map_size) {
        if (!e->memory || !e->cache->memory_fd)
                return -1;
        return e->cache->memory_fd(e->memory, ret_map_size);
}

void cache_set_reaper(Cache *c, cache_reap_fn reap, void *userdata) {
        c->reap = reap;
        c->reap_userdata = userdata;
}

void cache_reap_slabs(Cache *c, Slab **slabs, size_t n) {
        if (!slabs)
                return;
        if (c->reap) {
                c->reap(slabs, n, c->reap_userdata);
                return;
        }
        for (size_t i = 0; i < n; i++)
                slab_free(slabs[i]);
        free(slabs);
}

static void entry_free(CacheEntry *e) {
        cache_reap_slabs(e->cache, TAKE_PTR(e->slabs), e->n_slabs);
        if (e->memory && e->cache->free_memory)
                e->cache->free_memory(TAKE_PTR(e->memory), e->cache->free_memory_userdata);
        free(e->ids);
        free(e->variant);
        free(e->model);
        free(e->component);
        free(e);
}

Cache *cache_free(Cache *c) {
        if (!c)
                return NULL;
        c->reap = NULL; /* the owner is going away too: free here */
        while (c->head) {
                CacheEntry *e = c->head;
                c->head = e->next;
                entry_free(e);
        }
        while (c->detached) {
                CacheEntry *e = c->detached;
                c->detached = e->next;
                entry_free(e);
        }
        free(c->by_key);
        free(c->by_files);
        free(c->name);
        free(c);
        return NULL;
}

static void list_unlink(Cache *c, CacheEntry *e) {
        if (e->prev)
                e->prev->next = e->next;
        else
                c->head = e->next;
        if (e->next)
                e->next->prev = e->prev;
        else
                c->tail = e->prev;
        e->prev = e->next = NULL;
        c->n_entries--;
}

static void list_push_front(Cache *c, CacheEntry *e) {
        e->prev = NULL;
        e->next = c->head;
        if (c->head)
                c->head->prev = e;
        else
                c->tail = e;
        c->head = e;
        c->n_entries++;
}

/* ---- the hash tables ---- */

static uint64_t key_hash(const Cache *c, const char *model, const char *component) {
        SipHash h;

        siphash24_init(&h, c->hash_key);
        siphash24_compress(&h, model, strlen(model) + 1); /* with its NUL: "ab"+"c" is not "a"+"bc" */
        siphash24_compress(&h, component, strlen(component));
        return siphash24_finalize(&h);
}

static uint64_t files_hash(const Cache *c, const char *variant, const FileId *ids, size_t n_ids) {
        return file_ids_hash(c->hash_key, variant, ids, n_ids);
}

static CacheEntry **key_bucket(const Cache *c, uint64_t hash) {
        return &c->by_key[hash & (c->n_buckets - 1)];
}

static CacheEntry **files_bucket(const Cache *c, uint64_t hash) {
        return &c->by_files[hash & (c->n_buckets - 1)];
}

static void index_link(Cache *c, CacheEntry *e) {
        CacheEntry **b = key_bucket(c, e->key_hash), **f = files_bucket(c, e->files_hash);

        e->key_next = *b;
        *b = e;
        e->files_next = *f;
        *f = e;
}

static void index_unlink(Cache *c, CacheEntry *e) {
        CacheEntry **p;

        for (p = key_bucket(c, e->key_hash); *p != e; p = &(*p)->key_next)
                assert(*p);
        *p = e->key_next;
        for (p = files_bucket(c, e->files_hash); *p != e; p = &(*p)->files_next)
                assert(*p);
        *p = e->files_next;
        e->key_next = e->files_next = NULL;
}

/* Double both tables once entries outnumber buckets.  Returns 0 or -ENOMEM
 * (the tables stay as they were, only longer chained). */
static int index_grow(Cache *c) {
        size_t n = c->n_buckets * 2;
        CacheEntry **by_key, **by_files;

        if (c->n_entries < c->n_buckets || n > SIZE_MAX / sizeof(CacheEntry *))
                return 0;
        by_key = calloc(n, sizeof(CacheEntry *));
        by_files = calloc(n, sizeof(CacheEntry *));
        if (!by_key || !by_files) {
                free(by_key);
                free(by_files);
                return -ENOMEM;
        }
        free(c->by_key);
        free(c->by_files);
        c->by_key = by_key;
        c->by_files = by_files;
        c->n_buckets = n;
        for (CacheEntry *e = c->head; e; e = e->next)
                index_link(c, e);
        return 0;
}

/* ---- evictable bytes ---- */

static bool evictable(const CacheEntry *e) {
        return e->state == CACHE_ENTRY_RESIDENT && e->refs == 0 && !e->pinned;
}

/* Around every change of what evictable() reads: take e out of the count
 * before, put it back after. */
static void evictable_forget(CacheEntry *e) {
        if (evictable(e))
                e->cache->evictable -= e->bytes;
}

static void evictable_count(CacheEntry *e) {
        if (evictable(e))
                e->cache->evictable += e->bytes;
}

static uint64_t monotonic_usec(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000u + (uint64_t) ts.tv_nsec / 1000u;
}

static void touch(CacheEntry *e) {
        Cache *c = e->cache;

        e->last_use = ++c->clock;
        e->last_use_usec = monotonic_usec();
        if (c->head != e) {
                list_unlink(c, e);
                list_push_front(c, e);
        }
}

/* Take an entry out of service: freed now, or detached while referenced. */
static void entry_retire(CacheEntry *e) {
        Cache *c = e->cache;

        evictable_forget(e);
        index_unlink(c, e);
        list_unlink(c, e);
        if (e->refs > 0) {
                e->state = CACHE_ENTRY_DETACHED;
                e->next = c->detached;
                c->detached = e;
                c->n_detached++;
                return;
        }
        c->used -= e->bytes;
        entry_free(e);
}

static void detached_remove(Cache *c, CacheEntry *e) {
        for (CacheEntry **p = &c->detached; *p; p = &(*p)->next)
                if (*p == e) {
                        *p = e->next;
                        c->n_detached--;
                        break;
                }
        c->used -= e->bytes;
        entry_free(e);
}

static bool ids_equal(const CacheEntry *e, const FileId *ids, size_t n) {
        if (e->n_files != n)
                return false;
        for (size_t i = 0; i < n; i++)
                if (!file_id_equal(&e->ids[i], &ids[i]))
                        return false;
        return true;
}

static bool same_variant(const CacheEntry *e, const char *variant) {
        return strcmp(e->variant, variant ? variant : "") == 0;
}

static bool same_key(const CacheEntry *e, const char *model, const char *component, const char *variant) {
        return strcmp(e->model, model) == 0 && strcmp(e->component, component ? component : "") == 0 &&
               same_variant(e, variant);
}

CacheEntry *cache_lookup(Cache *c, const char *model, const char *component, const char *variant, const FileId *ids,
                         size_t n_ids) {
        uint64_t h = key_hash(c, model, component ? component : "");
        CacheEntry *found = NULL, *e, *next;

        for (e = *key_bucket(c, h); e && !found; e = e->key_next)
                if (e->key_hash == h && same_key(e, model, component, variant) && ids_equal(e, ids, n_ids))
                        found = e;
        /* The files changed: never serve the old bytes.  Resident entries of
         * the key with other files are retired, those used more recently
         * than the one found (what a walk from the most recently used end
         * passes before it).  A loading entry finishes first and is retired
         * by a later lookup. */
        for (e = *key_bucket(c, h); e; e = next) {
                next = e->key_next;
                if (e != found && e->key_hash == h && same_key(e, model, component, variant) &&
                    e->state == CACHE_ENTRY_RESIDENT && !ids_equal(e, ids, n_ids) &&
                    (!found || e->last_use > found->last_use))
                        entry_retire(e);
        }
        if (found)
                touch(found);
        return found;
}

/* How messages name an entry: "MODEL" for a model that is not a pipeline,
 * else "MODEL component \"NAME\"".  Cut to fit an error message. */
static const char *entry_label(char buf[static WD_ERROR_MESSAGE_MAX], const char *model, const char *component) {
        if (!component || component[0] == '\0')
                snprintf(buf, WD_ERROR_MESSAGE_MAX, "%s", model);
        else
                snprintf(buf, WD_ERROR_MESSAGE_MAX, "%s component \"%s\"", model, component);
        return buf;
}

CacheEntry *cache_lookup_files(Cache *c, const char *variant, const FileId *ids, size_t n_ids) {
        uint64_t h = files_hash(c, variant ? variant : "", ids, n_ids);
        CacheEntry *found = NULL;

        /* Should there be several, the most recently used, as a walk of
         * the LRU list would find. */
        for (CacheEntry *e = *files_bucket(c, h); e; e = e->files_next)
                if (e->files_hash == h && same_variant(e, variant) && ids_equal(e, ids, n_ids) &&
                    (!found || e->last_use > found->last_use))
                        found = e;
        if (found)
                touch(found);
        return found;
}

static bool fits(const Cache *c, uint64_t bytes) {
        return c->used <= c->budget && bytes <= c->budget - c->used;
}

int cache_reserve(Cache *c, const char *model, const char *component, const char *variant, const FileId *ids,
                  size_t n_ids, uint64_t bytes, CacheEntry **ret, WdError *err) {
        char label[WD_ERROR_MESSAGE_MAX];
        CacheEntry *e;

        uint64_t kh = key_hash(c, model, component ? component : "");

        for (e = *key_bucket(c, kh); e; e = e->key_next)
                if (e->key_hash == kh && same_key(e, model, component, variant) && ids_equal(e, ids, n_ids))
                        return wd_error_set(err, WD_E_BUSY, "%s is already %s", entry_label(label, model, component),
                                            e->state == CACHE_ENTRY_LOADING ? "loading" : "resident");

        if (!fits(c, bytes)) {
                uint64_t free_now = c->used < c->budget ? c->budget - c->used : 0, ev = c->evictable;

                if (free_now + ev < bytes)
                        return wd_error_set(err, WD_E_BUDGET,
                                            "%s needs %llu bytes, but the %s budget of %llu bytes has %llu in "
                                            "use, of which %llu can be evicted: short by %llu bytes",
                                            entry_label(label, model, component), (unsigned long long) bytes, c->name,
                                            (unsigned long long) c->budget, (unsigned long long) c->used,
                                            (unsigned long long) ev, (unsigned long long) (bytes - free_now - ev));
                /* Evict from the least recently used end until it fits. */
                for (e = c->tail; e && !fits(c, bytes);) {
                        CacheEntry *prev = e->prev;

                        if (evictable(e)) {
                                entry_retire(e);
                                c->evictions++;
                        }
                        e = prev;
                }
        }

        if (index_grow(c) < 0)
                return -ENOMEM;
        e = calloc(1, sizeof(CacheEntry));
        if (!e)
                return -ENOMEM;
        e->cache = c;
        e->model = strdup(model);
        e->component = strdup(component ? component : "");
        e->variant = strdup(variant ? variant : "");
        e->ids = calloc(n_ids ? n_ids : 1, sizeof(FileId));
        if (!e->model || !e->component || !e->variant || !e->ids) {
                entry_free(e);
                return -ENOMEM;
        }
        if (n_ids)
                memcpy(e->ids, ids, n_ids * sizeof(FileId));
        e->n_files = n_ids;
        e->bytes = bytes;
        e->state = CACHE_ENTRY_LOADING;
        e->last_use = ++c->clock;
        e->last_use_usec = monotonic_usec();
        e->key_hash = kh;
        e->files_hash = files_hash(c, e->variant, e->ids, n_ids);
        c->used += bytes;
        list_push_front(c, e);
        index_link(c, e);
        *ret = e;
        return 0;
}

void cache_entry_set_resident(CacheEntry *e, Slab **slabs, size_t n_slabs) {
        evictable_forget(e);
        e->slabs = slabs;
        e->n_slabs = n_slabs;
        e->state = CACHE_ENTRY_RESIDENT;
        evictable_count(e);
}

void cache_entry_set_resident_memory(CacheEntry *e, void *memory) {
        evictable_forget(e);
        e->memory = memory;
        e->state = CACHE_ENTRY_RESIDENT;
        evictable_count(e);
}

const char *cache_name(const Cache *c) {
        return c->name;
}

void cache_entry_abort(CacheEntry *e) {
        if (e->state == CACHE_ENTRY_DETACHED)
                return;
        entry_retire(e);
}

CacheEntry *cache_entry_ref(CacheEntry *e) {
        evictable_forget(e);
        e->refs++;
        evictable_count(e);
        return e;
}

void cache_entry_unref(CacheEntry *e) {
        if (!e || e->refs == 0)
                return;
        evictable_forget(e);
        e->refs--;
        if (e->refs == 0 && e->state == CACHE_ENTRY_DETACHED)
                detached_remove(e->cache, e);
        else
                evictable_count(e);
}

void cache_entry_lease(CacheEntry *e) {
        cache_entry_ref(e);
        e->leases++;
        if (e->state != CACHE_ENTRY_DETACHED)
                touch(e);
}

void cache_entry_unlease(CacheEntry *e) {
        if (e->leases == 0)
                return;
        e->leases--;
        cache_entry_unref(e);
}

void cache_entry_pin(CacheEntry *e) {
        evictable_forget(e);
        e->pinned = true;
        evictable_count(e);
}

void cache_entry_unpin(CacheEntry *e) {
        evictable_forget(e);
        e->pinned = false;
        evictable_count(e);
}

int cache_entry_evict(CacheEntry *e, WdError *err) {
        char label[WD_ERROR_MESSAGE_MAX];

        if (e->state != CACHE_ENTRY_RESIDENT)
                return wd_error_set(err, WD_E_BUSY, "%s is still loading", entry_label(label, e->model, e->component));
        if (e->pinned)
                return wd_error_set(err, WD_E_BUSY, "%s is pinned", entry_label(label, e->model, e->component));
        if (e->leases > 0)
                return wd_error_set(err, WD_E_BUSY, "%s has %u lease%s", entry_label(label, e->model, e->component),
                                    e->leases, e->leases == 1 ? "" : "s");
        e->cache->evictions++;
        entry_retire(e);
        return 0;
}

void cache_set_budget(Cache *c, uint64_t budget) {
        c->budget = budget;
}

void cache_get_stats(Cache *c, CacheStats *ret) {
        *ret = (CacheStats){
                .budget = c->budget,
                .used = c->used,
                .evictable = c->evictable,
                .n_entries = c->n_entries,
                .n_detached = c->n_detached,
                .evictions = c->evictions,
        };
}

CacheEntry *cache_first(Cache *c) {
        return c->head;
}

CacheEntry *cache_next(CacheEntry *e) {
        return e->next;
}

CacheEntry *cache_first_detached(Cache *c) {
        return c->detached;
}

static CacheEntry *key_match(CacheEntry *e, uint64_t h, const char *model, const char *component) {
        for (; e; e = e->key_next)
                if (e->key_hash == h && strcmp(e->model, model) == 0 && strcmp(e->component, component) == 0)
                        return e;
        return NULL;
}

CacheEntry *cache_first_of(Cache *c, const char *model, const char *component) {
        uint64_t h = key_hash(c, model, component ? component : "");

        return key_match(*key_bucket(c, h), h, model, component ? component : "");
}

CacheEntry *cache_next_of(CacheEntry *e) {
        return key_match(e->key_next, e->key_hash, e->model, e->component);
}
