/* A fixed number of slots, found by a 64-bit hash and kept in least
 * recently used order: the index behind the catalog's caches.  What a slot
 * holds lives in the caller's own array, indexed by slot number; the caller
 * hashes its keys (with a keyed hash where keys come from outside) and
 * compares them, walking the slots of one hash with lru_slots_first() and
 * lru_slots_next().  A lookup, a use and an add cost O(1) on average however
 * many slots there are.  Not thread-safe. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#define LRU_SLOT_NONE UINT32_MAX

typedef struct LruSlotLink {
        uint64_t hash;
        uint32_t bucket_next; /* the next slot in its bucket */
        uint32_t prev, next;  /* most recently used first */
} LruSlotLink;

typedef struct LruSlots {
        uint32_t max, n;   /* slots: at most, in use (0 .. n-1) */
        uint32_t n_buckets; /* a power of two, at least 2 * max */
        uint32_t *buckets;
        LruSlotLink *links;
        uint32_t head, tail; /* most and least recently used, or LRU_SLOT_NONE */
} LruSlots;

/* max: 1 .. 2^30.  Returns 0 or -ENOMEM. */
int lru_slots_init(LruSlots *s, uint32_t max);
void lru_slots_done(LruSlots *s);

/* The first slot whose key has this hash, or LRU_SLOT_NONE; then the next
 * one with the same hash after slot. */
uint32_t lru_slots_first(const LruSlots *s, uint64_t hash);
uint32_t lru_slots_next(const LruSlots *s, uint32_t slot);

/* Make slot the most recently used. */
void lru_slots_use(LruSlots *s, uint32_t slot);

/* A slot for a new key of this hash, made the most recently used: a free one
 * while fewer than max are in use, else the least recently used one, whose
 * old contents the caller must let go of (*ret_reused says which). */
uint32_t lru_slots_add(LruSlots *s, uint64_t hash, bool *ret_reused);
