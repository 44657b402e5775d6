/* Cache tests: budget accounting, LRU eviction order, pins and leases that
 * block eviction, the shortfall message, identity changes, and detached
 * entries that stay charged until their last lease ends. */
#include "store/cache.h"
#include "test-util.h"

static bool streq(const char *a, const char *b) {
        return strcmp(a, b) == 0;
}

static FileId fid(uint64_t ino, uint64_t mtime) {
        return (FileId){ .dev = 1, .ino = ino, .size = 100, .mtime = { (time_t) mtime, 0 }, .ctime = { 1, 0 } };
}

/* Reserve and mark resident (with no slabs: the cache does not look at them). */
static CacheEntry *add(Cache *c, const char *model, uint64_t ino, uint64_t bytes) {
        FileId id = fid(ino, 1);
        CacheEntry *e = NULL;
        WdError err = WD_ERROR_NULL;

        if (cache_reserve(c, model, "", "", &id, 1, bytes, &e, &err) != 0)
                fail_msg("%s: %s", model, err.message);
        cache_entry_set_resident(e, NULL, 0);
        return e;
}

static bool present(Cache *c, const char *model, uint64_t ino) {
        FileId id = fid(ino, 1);

        return cache_lookup(c, model, "", "", &id, 1) != NULL;
}

static uint64_t used(Cache *c) {
        CacheStats st;

        cache_get_stats(c, &st);
        return st.used;
}

static void test_budget_and_lru(void **state) {
        _cleanup_(cache_freep) Cache *c = NULL;

        assert_int_equal(cache_new(&c, "host", 1000), 0);
        add(c, "a", 1, 300);
        add(c, "b", 2, 300);
        add(c, "c", 3, 300);
        assert_int_equal(used(c), 900);
        /* Touch a: b is now the least recently used. */
        assert_true(present(c, "a", 1));
        add(c, "d", 4, 300);
        assert_false(present(c, "b", 2));
        assert_true(present(c, "a", 1));
        assert_true(present(c, "c", 3));
        assert_true(present(c, "d", 4));
        assert_int_equal(used(c), 900);
        /* Order now (most recent first): a, d, c.  600 more evicts c, then d. */
        assert_true(present(c, "a", 1));
        add(c, "e", 5, 600);
        assert_false(present(c, "c", 3));
        assert_false(present(c, "d", 4));
        assert_true(present(c, "a", 1));
        assert_true(present(c, "e", 5));
        assert_int_equal(used(c), 900);
}

static void test_pins_and_leases(void **state) {
        _cleanup_(cache_freep) Cache *c = NULL;
        CacheEntry *a, *b, *e = NULL;
        WdError err = WD_ERROR_NULL;
        FileId id = fid(9, 1);
        CacheStats st;

        assert_int_equal(cache_new(&c, "host", 1000), 0);
        a = add(c, "a", 1, 400);
        b = add(c, "b", 2, 400);
        cache_entry_pin(a);
        cache_entry_lease(b);
        /* 300 does not fit in 200 free, and nothing is evictable. */
        assert_int_equal(cache_reserve(c, "x", "", "", &id, 1, 300, &e, &err), WD_E_BUDGET);
        assert_non_null(strstr(err.message, "x needs 300 bytes"));
        assert_non_null(strstr(err.message, "short by 100 bytes"));
        assert_null(e);
        /* A plain model is named by its path alone. */
        assert_int_equal(cache_entry_evict(a, &err), WD_E_BUSY);
        assert_string_equal(err.message, "a is pinned");
        assert_int_equal(cache_entry_evict(b, &err), WD_E_BUSY);
        assert_string_equal(err.message, "b has 1 lease");
        assert_true(present(c, "a", 1) && present(c, "b", 2));

        /* Once unleased, b is the one to go. */
        cache_entry_unlease(b);
        assert_int_equal(cache_reserve(c, "x", "", "", &id, 1, 300, &e, &err), 0);
        assert_false(present(c, "b", 2));
        assert_true(present(c, "a", 1));
        cache_get_stats(c, &st);
        assert_int_equal(st.used, 700);
        assert_int_equal(st.evictions, 1);

        /* A loading entry is never evicted and cannot be evicted. */
        assert_int_equal(cache_entry_evict(e, &err), WD_E_BUSY);
        assert_string_equal(err.message, "x is still loading");
        cache_entry_abort(e);
        assert_int_equal(used(c), 400);

        /* Larger than the whole budget. */
        assert_int_equal(cache_reserve(c, "huge", "", "", &id, 1, 5000, &e, &err), WD_E_BUDGET);
        assert_non_null(strstr(err.message, "short by 4400 bytes"));
        cache_entry_unpin(a);
        assert_int_equal(cache_reserve(c, "huge", "", "", &id, 1, 5000, &e, &err), WD_E_BUDGET);
        assert_non_null(strstr(err.message, "short by 4000 bytes"));
        /* Failing evicted nothing. */
        assert_true(present(c, "a", 1));
}

/* A changed file: the old entry is never served; while leased it stays
 * charged (its memory is still mapped), then goes with its last lease. */
static void test_identity_change(void **state) {
        _cleanup_(cache_freep) Cache *c = NULL;
        FileId new_id = fid(1, 2);
        CacheEntry *a, *e = NULL;
        WdError err = WD_ERROR_NULL;
        CacheStats st;

        assert_int_equal(cache_new(&c, "host", 1000), 0);
        a = add(c, "a", 1, 400);
        cache_entry_lease(a);
        assert_null(cache_lookup(c, "a", "", "", &new_id, 1));
        assert_false(present(c, "a", 1));
        assert_int_equal(a->state, CACHE_ENTRY_DETACHED);
        cache_get_stats(c, &st);
        assert_int_equal(st.used, 400);
        assert_int_equal(st.n_entries, 0);
        assert_int_equal(st.n_detached, 1);

        /* The new version loads beside it; the detached one cannot be evicted. */
        assert_int_equal(cache_reserve(c, "a", "", "", &new_id, 1, 500, &e, &err), 0);
        cache_entry_set_resident(e, NULL, 0);
        assert_int_equal(used(c), 900);
        assert_int_equal(cache_reserve(c, "b", "", "", &new_id, 1, 200, &e, &err), 0); /* evicts the new a */
        assert_int_equal(used(c), 600);
        cache_entry_unlease(a); /* frees it */
        cache_get_stats(c, &st);
        assert_int_equal(st.used, 200);
        assert_int_equal(st.n_detached, 0);

        /* Without leases a stale entry goes at once. */
        a = add(c, "z", 7, 100);
        new_id = fid(7, 5);
        assert_null(cache_lookup(c, "z", "", "", &new_id, 1));
        assert_int_equal(used(c), 200);
}

static void test_duplicate_reserve(void **state) {
        _cleanup_(cache_freep) Cache *c = NULL;
        FileId id = fid(1, 1);
        CacheEntry *e = NULL, *e2 = NULL;
        WdError err = WD_ERROR_NULL;

        assert_int_equal(cache_new(&c, "host", 1000), 0);
        assert_int_equal(cache_reserve(c, "a", "vae", "", &id, 1, 10, &e, &err), 0);
        assert_int_equal(cache_reserve(c, "a", "vae", "", &id, 1, 10, &e2, &err), WD_E_BUSY);
        assert_string_equal(err.message, "a component \"vae\" is already loading");
        assert_ptr_equal(cache_lookup(c, "a", "vae", "", &id, 1), e);
        /* Other component, same model: a different entry. */
        assert_int_equal(cache_reserve(c, "a", "transformer", "", &id, 1, 10, &e2, &err), 0);
        assert_int_equal(used(c), 20);

        /* A pipeline's component is named with its model. */
        cache_entry_set_resident(e2, NULL, 0);
        cache_entry_pin(e2);
        assert_int_equal(cache_entry_evict(e2, &err), WD_E_BUSY);
        assert_string_equal(err.message, "a component \"transformer\" is pinned");
        cache_entry_unpin(e2);
        cache_entry_lease(e2);
        cache_entry_lease(e2);
        assert_int_equal(cache_entry_evict(e2, &err), WD_E_BUSY);
        assert_string_equal(err.message, "a component \"transformer\" has 2 leases");
        assert_int_equal(cache_reserve(c, "a", "unet", "", &id, 1, 5000, &e2, &err), WD_E_BUDGET);
        assert_non_null(strstr(err.message, "a component \"unet\" needs 5000 bytes"));
}

typedef struct Reaped {
        Slab *slabs[8];
        size_t n;
} Reaped;

static void collect(Slab **slabs, size_t n, void *userdata) {
        Reaped *r = userdata;

        for (size_t i = 0; i < n; i++)
                r->slabs[r->n++] = slabs[i];
        free(slabs);
}

/* Slabs the cache lets go of go to the reaper, not freed in place; without
 * a reaper (and at cache_free) they are freed at once. */
static void test_reaper(void **state) {
        _cleanup_(cache_freep) Cache *c = NULL;
        Reaped reaped = {};
        WdError err = WD_ERROR_NULL;
        FileId ids[2] = { fid(1, 1), fid(2, 1) };
        CacheEntry *e = NULL;
        Slab **slabs = calloc(2, sizeof(Slab *));

        assert_non_null(slabs);
        assert_int_equal(slab_new(&slabs[0], "a", 4096, SLAB_PAGES_SMALL), 0);
        assert_int_equal(slab_new(&slabs[1], "b", 8192, SLAB_PAGES_SMALL), 0);
        Slab *a = slabs[0], *b = slabs[1];

        assert_int_equal(cache_new(&c, "host", 1 << 20), 0);
        cache_set_reaper(c, collect, &reaped);
        assert_int_equal(cache_reserve(c, "m", "", "", ids, 2, 12288, &e, &err), 0);
        cache_entry_set_resident(e, slabs, 2);
        assert_int_equal(cache_entry_evict(e, &err), 0);
        assert_int_equal(reaped.n, 2);
        assert_ptr_equal(reaped.slabs[0], a);
        assert_ptr_equal(reaped.slabs[1], b);
        /* Still ours, still mapped: the reaper decides when they go. */
        assert_int_equal(a->data[0], 0);
        assert_int_equal(used(c), 0);
        slab_free(a);
        slab_free(b);

        /* A load that failed lets go of its slabs the same way. */
        slabs = calloc(1, sizeof(Slab *));
        assert_non_null(slabs);
        assert_int_equal(slab_new(&slabs[0], "c", 4096, SLAB_PAGES_SMALL), 0);
        cache_reap_slabs(c, slabs, 1);
        assert_int_equal(reaped.n, 3);
        slab_free(reaped.slabs[2]);

        /* No reaper: freed in place (ASan would see a leak otherwise). */
        cache_set_reaper(c, NULL, NULL);
        slabs = calloc(1, sizeof(Slab *));
        assert_non_null(slabs);
        assert_int_equal(slab_new(&slabs[0], "d", 4096, SLAB_PAGES_SMALL), 0);
        cache_reap_slabs(c, slabs, 1);
        assert_int_equal(reaped.n, 3);
}

static void count_free(void *memory, void *userdata) {
        (*(int *) userdata)++;
        free(memory);
}

/* Variants of the same files are separate entries; a cache names its
 * budget in messages; other memory goes to the cache's free function. */
static void test_variants_and_memory(void **state) {
        _cleanup_(cache_freep) Cache *c = NULL;
        FileId id = fid(7, 1);
        CacheEntry *whole = NULL, *r0 = NULL, *r1 = NULL, *e = NULL;
        WdError err = WD_ERROR_NULL;
        int freed = 0;

        assert_int_equal(cache_new(&c, "cuda:3", 100), 0);
        assert_string_equal(cache_name(c), "cuda:3");
        cache_set_memory_free(c, count_free, &freed);
        assert_int_equal(cache_reserve(c, "m", "", "", &id, 1, 40, &whole, &err), 0);
        assert_int_equal(cache_reserve(c, "m", "", "rank 0/2", &id, 1, 20, &r0, &err), 0);
        assert_int_equal(cache_reserve(c, "m", "", "rank 1/2", &id, 1, 20, &r1, &err), 0);
        assert_int_equal(cache_reserve(c, "m", "", "rank 1/2", &id, 1, 20, &e, &err), WD_E_BUSY);
        assert_ptr_equal(cache_lookup(c, "m", "", "rank 0/2", &id, 1), r0);
        assert_ptr_equal(cache_lookup(c, "m", "", NULL, &id, 1), whole);
        assert_ptr_equal(cache_lookup_files(c, "rank 1/2", &id, 1), r1);
        assert_null(cache_lookup_files(c, "rank 2/3", &id, 1));
        assert_int_equal(used(c), 80);

        void *mem = malloc(16);
        assert_non_null(mem);
        cache_entry_set_resident_memory(r0, mem);
        assert_int_equal(cache_entry_evict(r0, &err), 0);
        assert_int_equal(freed, 1);
        assert_int_equal(used(c), 60);

        /* 30 more fit only after evicting: nothing is evictable while loading. */
        assert_int_equal(cache_reserve(c, "n", "", "", &id, 1, 50, &e, &err), WD_E_BUDGET);
        assert_non_null(strstr(err.message, "the cuda:3 budget of 100 bytes has 60 in use"));
}

/* ---- the indexes and the evictable counter against a brute-force recount --- */

#define HELD_MAX 4096

/* What the test holds: references (a load's, a reply's) and leases. */
typedef struct Held {
        CacheEntry *e;
        bool lease;
        bool loading; /* a load's reference: it will set the entry resident or abort it */
} Held;

typedef struct Model {
        Cache *c;
        Held held[HELD_MAX];
        size_t n_held;
        uint64_t rng;
} Model;

static uint64_t next_rand(Model *m) {
        /* xorshift64*: fixed seed, the same run every time */
        m->rng ^= m->rng >> 12;
        m->rng ^= m->rng << 25;
        m->rng ^= m->rng >> 27;
        return m->rng * 0x2545F4914F6CDD1DULL;
}

static unsigned pick(Model *m, unsigned n) {
        return (unsigned) (next_rand(m) % n);
}

static const char *const models[] = { "a", "b", "ab", "c/d", "x", "long/model/path", "m7", "m8" };
static const char *const components[] = { "", "text_encoder", "unet", "vae" };
static const char *const variants[] = { "", "rank 0/2 .*:0", "rank 1/2 .*:0" };

typedef struct Key {
        const char *model, *component, *variant;
        FileId ids[2];
        size_t n_ids;
} Key;

static Key random_key(Model *m) {
        Key k = {
                .model = models[pick(m, ELEMENTSOF(models))],
                .component = components[pick(m, ELEMENTSOF(components))],
                .variant = variants[pick(m, ELEMENTSOF(variants))],
                .n_ids = 1 + pick(m, 2),
        };

        /* Few distinct files and versions, so that keys and files repeat. */
        for (size_t i = 0; i < k.n_ids; i++)
                k.ids[i] = fid(1 + pick(m, 6), 1 + pick(m, 2));
        return k;
}

/* The same files, by the only fields random_key() varies. */
static bool ids_same(const CacheEntry *e, const FileId *ids, size_t n) {
        size_t same = 0;

        for (size_t i = 0; i < n && n == e->n_files; i++)
                same += e->ids[i].ino == ids[i].ino && e->ids[i].mtime.tv_sec == ids[i].mtime.tv_sec;
        return e->n_files == n && same == n;
}

static size_t listed(Cache *c, CacheEntry **out, size_t max) {
        size_t n = 0;

        for (CacheEntry *e = cache_first(c); e; e = cache_next(e)) {
                assert_true(n < max);
                out[n++] = e;
        }
        return n;
}

/* Every figure of cache_get_stats() and every index, recounted by walking
 * the lists. */
static void check(Model *m) {
        static CacheEntry *all[HELD_MAX * 2];
        uint64_t evictable = 0, used = 0, prev_use = UINT64_MAX;
        size_t n = listed(m->c, all, ELEMENTSOF(all)), n_detached = 0;
        CacheStats st;

        for (size_t i = 0; i < n; i++) {
                CacheEntry *e = all[i];

                assert_int_not_equal(e->state, CACHE_ENTRY_DETACHED);
                assert_true(e->last_use < prev_use); /* most recently used first */
                prev_use = e->last_use;
                used += e->bytes;
                if (e->state == CACHE_ENTRY_RESIDENT && e->refs == 0 && !e->pinned)
                        evictable += e->bytes;
        }
        for (CacheEntry *e = cache_first_detached(m->c); e; e = cache_next(e)) {
                assert_int_equal(e->state, CACHE_ENTRY_DETACHED);
                assert_true(e->refs > 0);
                used += e->bytes;
                n_detached++;
        }
        cache_get_stats(m->c, &st);
        assert_int_equal(st.evictable, evictable);
        assert_int_equal(st.used, used);
        assert_int_equal(st.n_entries, n);
        assert_int_equal(st.n_detached, n_detached);

        /* cache_first_of() finds exactly the listed entries of each key. */
        for (size_t mi = 0; mi < ELEMENTSOF(models); mi++)
                for (size_t ci = 0; ci < ELEMENTSOF(components); ci++) {
                        size_t want = 0, got = 0;

                        for (size_t i = 0; i < n; i++)
                                if (streq(all[i]->model, models[mi]) && streq(all[i]->component, components[ci]))
                                        want++;
                        for (CacheEntry *e = cache_first_of(m->c, models[mi], components[ci]); e;
                             e = cache_next_of(e)) {
                                bool in_list = false;

                                assert_string_equal(e->model, models[mi]);
                                assert_string_equal(e->component, components[ci]);
                                for (size_t i = 0; i < n && !in_list; i++)
                                        in_list = all[i] == e;
                                assert_true(in_list);
                                got++;
                        }
                        assert_int_equal(got, want);
                }
}

static void hold(Model *m, CacheEntry *e, bool lease, bool loading) {
        assert_true(m->n_held < HELD_MAX);
        if (lease)
                cache_entry_lease(e);
        else if (!loading)
                cache_entry_ref(e);
        m->held[m->n_held++] = (Held){ .e = e, .lease = lease, .loading = loading };
}

static void drop(Model *m, size_t i) {
        Held h = m->held[i];

        m->held[i] = m->held[--m->n_held];
        if (h.lease)
                cache_entry_unlease(h.e);
        else
                cache_entry_unref(h.e);
}

static void step(Model *m) {
        static CacheEntry *all[HELD_MAX * 2];
        size_t n = listed(m->c, all, ELEMENTSOF(all));
        CacheEntry *e = n ? all[pick(m, (unsigned) n)] : NULL, *want, *got;
        WdError err = WD_ERROR_NULL;
        Key k = random_key(m);
        size_t stale = 0;
        int r;

        switch (pick(m, 10)) {
        case 0: /* a load starts: its reference, as a job holds it */
        case 1:
                want = NULL; /* before: the reservation may evict what all[] points to */
                for (size_t i = 0; i < n; i++)
                        if (streq(all[i]->model, k.model) && streq(all[i]->component, k.component) &&
                            streq(all[i]->variant, k.variant) && ids_same(all[i], k.ids, k.n_ids))
                                want = all[i];
                r = cache_reserve(m->c, k.model, k.component, k.variant, k.ids, k.n_ids, 1 + pick(m, 200), &got, &err);
                if (want)
                        assert_int_equal(r, WD_E_BUSY);
                else if (r == 0 && m->n_held < HELD_MAX)
                        hold(m, cache_entry_ref(got), false, true);
                else if (r == 0)
                        cache_entry_abort(got);
                else
                        assert_int_equal(r, WD_E_BUDGET);
                break;
        case 2: /* a load ends */
                for (size_t i = 0; i < m->n_held; i++)
                        if (m->held[i].loading) {
                                if (m->held[i].e->state == CACHE_ENTRY_LOADING) {
                                        if (pick(m, 4) == 0)
                                                cache_entry_abort(m->held[i].e);
                                        else
                                                cache_entry_set_resident(m->held[i].e, NULL, 0);
                                }
                                drop(m, i);
                                break;
                        }
                break;
        case 3: /* a lookup: the entry of these files; the resident ones of its key with other files that
                 * a walk from the most recently used end passes before it are retired */
                want = NULL;
                for (size_t i = 0; i < n && !want; i++)
                        if (streq(all[i]->model, k.model) && streq(all[i]->component, k.component) &&
                            streq(all[i]->variant, k.variant)) {
                                if (ids_same(all[i], k.ids, k.n_ids))
                                        want = all[i];
                                else if (all[i]->state == CACHE_ENTRY_RESIDENT)
                                        stale++;
                        }
                got = cache_lookup(m->c, k.model, k.component, k.variant, k.ids, k.n_ids);
                assert_ptr_equal(got, want);
                if (got)
                        assert_ptr_equal(cache_first(m->c), got);
                assert_int_equal(listed(m->c, all, ELEMENTSOF(all)), n - stale);
                break;
        case 4: /* the same files under any model: the most recently used */
                want = NULL;
                for (size_t i = 0; i < n && !want; i++)
                        if (streq(all[i]->variant, k.variant) && ids_same(all[i], k.ids, k.n_ids))
                                want = all[i];
                assert_ptr_equal(cache_lookup_files(m->c, k.variant, k.ids, k.n_ids), want);
                if (want)
                        assert_ptr_equal(cache_first(m->c), want);
                break;
        case 5: /* a reference or a lease */
                if (e && m->n_held < HELD_MAX)
                        hold(m, e, pick(m, 2), false);
                break;
        case 6:
        case 7:
                if (m->n_held > 0 && !m->held[pick(m, (unsigned) m->n_held)].loading) {
                        for (size_t i = 0; i < m->n_held; i++)
                                if (!m->held[i].loading) {
                                        drop(m, i);
                                        break;
                                }
                }
                break;
        case 8:
                if (e && pick(m, 2))
                        cache_entry_pin(e);
                else if (e)
                        cache_entry_unpin(e);
                break;
        case 9:
                if (e && pick(m, 4) == 0) {
                        bool busy = e->state != CACHE_ENTRY_RESIDENT || e->pinned || e->leases > 0;

                        assert_int_equal(cache_entry_evict(e, &err), busy ? WD_E_BUSY : 0);
                } else
                        cache_set_budget(m->c, 2000 + pick(m, 40000));
                break;
        }
        check(m);
}

static void test_against_recount(void **state) {
        static Model m;

        m = (Model){ .rng = 0x9E3779B97F4A7C15ULL };
        assert_int_equal(cache_new(&m.c, "host", 20000), 0);
        for (unsigned i = 0; i < 20000; i++)
                step(&m);
        while (m.n_held > 0) {
                Held *h = &m.held[m.n_held - 1];

                if (h->loading && h->e->state == CACHE_ENTRY_LOADING)
                        cache_entry_set_resident(h->e, NULL, 0);
                drop(&m, m.n_held - 1);
                check(&m);
        }
        m.c = cache_free(m.c);
}

/* Thousands of entries: the tables grow, and each is still found. */
static void test_many_entries(void **state) {
        _cleanup_(cache_freep) Cache *c = NULL;
        enum { N = 5000 };
        char name[32];
        CacheStats st;

        assert_int_equal(cache_new(&c, "host", UINT64_MAX), 0);
        for (unsigned i = 0; i < N; i++) {
                snprintf(name, sizeof(name), "model-%u", i);
                add(c, name, 1000 + i, 10 + i % 7);
        }
        for (unsigned i = 0; i < N; i++) {
                FileId id = fid(1000 + i, 1);
                CacheEntry *e;

                snprintf(name, sizeof(name), "model-%u", i);
                e = cache_lookup(c, name, "", "", &id, 1);
                assert_non_null(e);
                assert_string_equal(e->model, name);
                assert_ptr_equal(cache_lookup_files(c, "", &id, 1), e);
                assert_ptr_equal(cache_first_of(c, name, ""), e);
                assert_null(cache_next_of(e));
                if (i % 2)
                        cache_entry_pin(e);
        }
        cache_get_stats(c, &st);
        assert_int_equal(st.n_entries, N);
        uint64_t want = 0;
        for (CacheEntry *e = cache_first(c); e; e = cache_next(e))
                if (!e->pinned)
                        want += e->bytes;
        assert_int_equal(st.evictable, want);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_variants_and_memory),
                cmocka_unit_test(test_budget_and_lru),
                cmocka_unit_test(test_pins_and_leases),
                cmocka_unit_test(test_identity_change),
                cmocka_unit_test(test_duplicate_reserve),
                cmocka_unit_test(test_reaper),
                cmocka_unit_test(test_against_recount),
                cmocka_unit_test(test_many_entries),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
