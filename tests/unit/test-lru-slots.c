/* LRU slots against a brute-force model: a plain array of keys in recency
 * order, searched and shifted by hand.  Random lookups and adds over more
 * keys than slots, with a hash that makes many keys collide, for several
 * sizes; after every step the hits, the slot given up and the whole order
 * (walked through the links) must match the model. */
#include "test-util.h"
#include "util/lru-slots.h"

static uint64_t hash_of(unsigned key) {
        return (key * 2654435761u) % 17; /* 17 hashes: long chains, equal hashes */
}

static void run(uint32_t max, unsigned n_keys, unsigned steps) {
        LruSlots s;
        unsigned *keys = calloc(max, sizeof(unsigned)); /* what each slot holds */
        unsigned *model = calloc(max, sizeof(unsigned)); /* keys, most recent first */
        size_t n_model = 0;
        uint64_t rng = 7 + max;

        assert_non_null(keys);
        assert_non_null(model);
        assert_int_equal(lru_slots_init(&s, max), 0);
        for (unsigned step = 0; step < steps; step++) {
                unsigned key, at;
                uint32_t slot;

                rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
                key = (unsigned) ((rng >> 33) % n_keys);
                for (at = 0; at < n_model && model[at] != key; at++)
                        ;
                for (slot = lru_slots_first(&s, hash_of(key)); slot != LRU_SLOT_NONE && keys[slot] != key;
                     slot = lru_slots_next(&s, slot))
                        assert_int_equal(s.links[slot].hash, hash_of(key));
                if (at < n_model) {
                        assert_int_not_equal(slot, LRU_SLOT_NONE);
                        lru_slots_use(&s, slot);
                } else {
                        bool reused;

                        assert_int_equal(slot, LRU_SLOT_NONE);
                        slot = lru_slots_add(&s, hash_of(key), &reused);
                        assert_true(slot < max);
                        assert_int_equal(reused, n_model == max);
                        if (reused)
                                assert_int_equal(keys[slot], model[max - 1]); /* the least recently used */
                        else
                                n_model++;
                        at = (unsigned) n_model - 1;
                        keys[slot] = key;
                }
                memmove(&model[1], &model[0], at * sizeof(unsigned));
                model[0] = key;

                /* The whole order, both ways. */
                assert_int_equal(s.n, n_model);
                slot = s.head;
                for (size_t i = 0; i < n_model; i++, slot = s.links[slot].next) {
                        assert_int_not_equal(slot, LRU_SLOT_NONE);
                        assert_int_equal(keys[slot], model[i]);
                }
                assert_int_equal(slot, LRU_SLOT_NONE);
                slot = s.tail;
                for (size_t i = n_model; i > 0; i--, slot = s.links[slot].prev)
                        assert_int_equal(keys[slot], model[i - 1]);
                assert_int_equal(slot, LRU_SLOT_NONE);
        }
        lru_slots_done(&s);
        free(keys);
        free(model);
}

static void test_against_model(void **state) {
        run(1, 3, 2000);
        run(2, 5, 5000);
        run(7, 20, 20000);
        run(64, 100, 40000);
        run(300, 900, 40000);
}

static void test_limits(void **state) {
        LruSlots s;

        assert_int_equal(lru_slots_init(&s, 0), -EINVAL);
        assert_int_equal(lru_slots_init(&s, (1u << 30) + 1), -EINVAL);
        assert_int_equal(lru_slots_init(&s, 5), 0);
        assert_true(s.n_buckets >= 10 && (s.n_buckets & (s.n_buckets - 1)) == 0);
        assert_int_equal(lru_slots_first(&s, 3), LRU_SLOT_NONE);
        lru_slots_done(&s);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_against_model),
                cmocka_unit_test(test_limits),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
