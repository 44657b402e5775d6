/* LRU slots: the slots are an array of links; a chained hash table of
 * slot numbers (twice as many buckets as slots, so chains stay short) finds
 * them, and a doubly linked list through the same links orders them, most
 * recently used first.  A full table gives up its tail. */
#include <errno.h>
#include <stdlib.h>

#include "util/lru-slots.h"

int lru_slots_init(LruSlots *s, uint32_t max) {
        uint32_t n_buckets = 2;

        if (max == 0 || max > (1u << 30))
                return -EINVAL;
        while (n_buckets < 2 * max)
                n_buckets *= 2;
        *s = (LruSlots){ .max = max, .n_buckets = n_buckets, .head = LRU_SLOT_NONE, .tail = LRU_SLOT_NONE };
        s->buckets = malloc(n_buckets * sizeof(uint32_t));
        s->links = calloc(max, sizeof(LruSlotLink));
        if (!s->buckets || !s->links) {
                lru_slots_done(s);
                return -ENOMEM;
        }
        for (uint32_t i = 0; i < n_buckets; i++)
                s->buckets[i] = LRU_SLOT_NONE;
        return 0;
}

void lru_slots_done(LruSlots *s) {
        free(s->buckets);
        free(s->links);
        *s = (LruSlots){ .head = LRU_SLOT_NONE, .tail = LRU_SLOT_NONE };
}

static uint32_t *bucket(const LruSlots *s, uint64_t hash) {
        return &s->buckets[hash & (s->n_buckets - 1)];
}

static uint32_t same_hash(const LruSlots *s, uint32_t i, uint64_t hash) {
        while (i != LRU_SLOT_NONE && s->links[i].hash != hash)
                i = s->links[i].bucket_next;
        return i;
}

uint32_t lru_slots_first(const LruSlots *s, uint64_t hash) {
        return same_hash(s, *bucket(s, hash), hash);
}

uint32_t lru_slots_next(const LruSlots *s, uint32_t slot) {
        return same_hash(s, s->links[slot].bucket_next, s->links[slot].hash);
}

static void list_unlink(LruSlots *s, uint32_t i) {
        LruSlotLink *l = &s->links[i];

        if (l->prev != LRU_SLOT_NONE)
                s->links[l->prev].next = l->next;
        else
                s->head = l->next;
        if (l->next != LRU_SLOT_NONE)
                s->links[l->next].prev = l->prev;
        else
                s->tail = l->prev;
}

static void list_push_front(LruSlots *s, uint32_t i) {
        LruSlotLink *l = &s->links[i];

        l->prev = LRU_SLOT_NONE;
        l->next = s->head;
        if (s->head != LRU_SLOT_NONE)
                s->links[s->head].prev = i;
        else
                s->tail = i;
        s->head = i;
}

void lru_slots_use(LruSlots *s, uint32_t slot) {
        if (s->head == slot)
                return;
        list_unlink(s, slot);
        list_push_front(s, slot);
}

uint32_t lru_slots_add(LruSlots *s, uint64_t hash, bool *ret_reused) {
        uint32_t i, *p;

        if (s->n < s->max) {
                i = s->n++;
                *ret_reused = false;
        } else {
                i = s->tail;
                list_unlink(s, i);
                for (p = bucket(s, s->links[i].hash); *p != i; p = &s->links[*p].bucket_next)
                        ;
                *p = s->links[i].bucket_next;
                *ret_reused = true;
        }
        p = bucket(s, hash);
        s->links[i].hash = hash;
        s->links[i].bucket_next = *p;
        *p = i;
        list_push_front(s, i);
        return i;
}
