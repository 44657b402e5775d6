/* The index of the host tier for a restart (store/persist.c): what is saved
 * reads back the same; stored slabs are adopted into a cache with their
 * bytes, charged to its budget; an index cut short at every length, with any
 * byte flipped, or with hostile counts behind a valid checksum is refused
 * without a crash or a leak; a slab that is not the memfd the index names is
 * refused. */
#include <sys/mman.h>

#include "store/persist.h"
#include "test-util.h"
#include "util/siphash24.h"

static Slab *filled_slab(const char *name, uint64_t size, uint8_t seed) {
        Slab *s = NULL;

        assert_int_equal(slab_new(&s, name, size, SLAB_PAGES_SMALL), 0);
        for (uint64_t i = 0; i < size; i++)
                s->data[i] = (uint8_t) (seed + i * 7);
        assert_int_equal(slab_seal(s), 0);
        return s;
}

static FileId file_id(uint64_t ino, uint64_t size) {
        return (FileId){ .dev = 42, .ino = ino, .size = size, .mtime = { 1700000000, 123 }, .ctime = { 1700000001, 456 } };
}

/* Two whole entries (one pinned) and a shard variant of the first. */
static Cache *make_cache(void) {
        Cache *c = NULL;
        CacheEntry *e;
        FileId ids[2] = { file_id(1, 10000), file_id(2, 5000) };
        FileId one[1] = { file_id(3, 777) };
        Slab **slabs;

        assert_int_equal(cache_new(&c, "host", 1u << 30), 0);
        assert_int_equal(cache_reserve(c, "/m/a", "", "", ids, 2, 15000, &e, NULL), 0);
        slabs = calloc(2, sizeof(Slab *));
        slabs[0] = filled_slab("a1", 10000, 1);
        slabs[1] = filled_slab("a2", 5000, 2);
        cache_entry_set_resident(e, slabs, 2);
        cache_entry_pin(e);

        assert_int_equal(cache_reserve(c, "/m/b", "unet", "", one, 1, 777, &e, NULL), 0);
        slabs = calloc(1, sizeof(Slab *));
        slabs[0] = filled_slab("b", 777, 3);
        cache_entry_set_resident(e, slabs, 1);
        e->wanted = true;

        assert_int_equal(cache_reserve(c, "/m/a", "", "rank 0/2 *:0", ids, 2, 7500, &e, NULL), 0);
        slabs = calloc(1, sizeof(Slab *));
        slabs[0] = filled_slab("a-shard", 7500, 4);
        cache_entry_set_resident(e, slabs, 1);
        /* A loading entry is not saved. */
        FileId other[1] = { file_id(9, 1) };
        assert_int_equal(cache_reserve(c, "/m/loading", "", "", other, 1, 1, &e, NULL), 0);
        return c;
}

static uint8_t *read_all(int fd, size_t *ret_len) {
        struct stat st;
        uint8_t *buf;

        assert_int_equal(fstat(fd, &st), 0);
        buf = malloc(st.st_size + 1);
        assert_int_equal(pread(fd, buf, st.st_size, 0), st.st_size);
        *ret_len = st.st_size;
        return buf;
}

static void test_save_read_adopt(void **state) {
        _cleanup_(cache_freep) Cache *c = make_cache(), *c2 = NULL;
        _cleanup_(persist_index_freep) PersistIndex *x = NULL;
        _cleanup_free_ Slab **slabs = NULL;
        size_t n_slabs = 0, n_entries = 0;
        int fd = -1, fds_before;
        WdError err = WD_ERROR_NULL;
        char name[PERSIST_NAME_MAX];

        assert_int_equal(persist_index_save(c, SIZE_MAX, &fd, &slabs, &n_slabs, &n_entries), 0);
        assert_int_equal(n_entries, 3);
        assert_int_equal(n_slabs, 4);
        assert_int_equal(persist_index_read(fd, &x, &err), 0);
        close(fd);
        assert_int_equal(x->n_entries, 3);

        /* Most recently used first: the shard, b, a. */
        assert_string_equal(x->entries[0].variant, "rank 0/2 *:0");
        assert_string_equal(x->entries[1].model, "/m/b");
        assert_string_equal(x->entries[1].component, "unet");
        assert_true(x->entries[1].wanted);
        assert_false(x->entries[1].pinned);
        const PersistEntry *a = &x->entries[2];
        assert_string_equal(a->model, "/m/a");
        assert_true(a->pinned);
        assert_int_equal(a->bytes, 15000);
        assert_int_equal(a->n_files, 2);
        assert_true(file_id_equal(&a->ids[1], &(FileId){ .dev = 42, .ino = 2, .size = 5000,
                                                         .mtime = { 1700000000, 123 }, .ctime = { 1700000001, 456 } }));
        assert_int_equal(a->n_slabs, 2);
        assert_int_equal(a->slabs[0].id, 2);
        assert_int_equal(a->slabs[1].id, 3);
        assert_string_equal(persist_slab_name(10, name), "weightd-slab-a");
        assert_int_equal(persist_slab_id("weightd-slab-a"), 10);
        assert_true(persist_slab_id("weightd-slab-") < 0);
        assert_true(persist_slab_id("weightd-slab-A") < 0);
        assert_true(persist_slab_id("weightd-index") < 0);

        /* Adopt into a new cache, least recently used first, from duplicates
         * of the stored descriptors (what the service manager hands back). */
        assert_int_equal(cache_new(&c2, "host", 1u << 30), 0);
        fds_before = count_fds();
        for (size_t k = x->n_entries; k > 0; k--) {
                const PersistEntry *pe = &x->entries[k - 1];
                Slab **adopted = calloc(pe->n_slabs, sizeof(Slab *));

                for (size_t i = 0; i < pe->n_slabs; i++) {
                        int dup_fd = fcntl(slabs[pe->slabs[i].id]->fd, F_DUPFD_CLOEXEC, 3);

                        assert_int_equal(persist_slab_adopt(dup_fd, &pe->slabs[i], &adopted[i], &err), 0);
                        assert_memory_equal(adopted[i]->data, slabs[pe->slabs[i].id]->data, adopted[i]->size);
                        assert_true(adopted[i]->client_fd >= 0);
                }
                assert_int_equal(persist_entry_adopt(c2, pe, adopted, &err), 0);
        }
        CacheStats st;
        cache_get_stats(c2, &st);
        assert_int_equal(st.used, 15000 + 777 + 7500);
        assert_int_equal(st.n_entries, 3);
        assert_int_equal(st.evictable, 777 + 7500); /* a is pinned */
        FileId ids[2] = { file_id(1, 10000), file_id(2, 5000) };
        CacheEntry *e = cache_lookup(c2, "/m/a", "", "", ids, 2);
        assert_non_null(e);
        assert_int_equal(e->state, CACHE_ENTRY_RESIDENT);
        assert_true(e->pinned);
        assert_int_equal(e->slabs[0]->data[5], (uint8_t) (1 + 5 * 7));
        c2 = cache_free(c2);
        assert_int_equal(count_fds(), fds_before);
}

/* Released slabs keep their pages when the cache frees them: the store
 * holds them now. */
static void test_release(void **state) {
        _cleanup_(cache_freep) Cache *c = make_cache();
        _cleanup_free_ Slab **slabs = NULL;
        size_t n_slabs = 0, n_entries = 0;
        struct stat st;
        uint8_t first, b;
        int fd, keep;

        assert_int_equal(persist_index_save(c, SIZE_MAX, &fd, &slabs, &n_slabs, &n_entries), 0);
        close(fd);
        keep = fcntl(slabs[0]->fd, F_DUPFD_CLOEXEC, 3);
        first = slabs[0]->data[0];
        persist_slab_release(slabs[0]);
        assert_int_equal(slabs[0]->fd, -1);
        c = cache_free(c);
        assert_int_equal(fstat(keep, &st), 0);
        assert_int_equal(st.st_size, 7500);
        assert_int_equal(pread(keep, &b, 1, 0), 1);
        assert_int_equal(b, first);
        close(keep);
}

/* The same entry twice is refused (its slabs freed). */
static void test_twice(void **state) {
        _cleanup_(cache_freep) Cache *c = make_cache(), *c2 = NULL;
        _cleanup_(persist_index_freep) PersistIndex *x = NULL;
        _cleanup_free_ Slab **slabs = NULL;
        size_t n_slabs = 0, n_entries = 0;
        WdError err = WD_ERROR_NULL;
        int fd;

        assert_int_equal(persist_index_save(c, SIZE_MAX, &fd, &slabs, &n_slabs, &n_entries), 0);
        assert_int_equal(persist_index_read(fd, &x, &err), 0);
        close(fd);
        assert_int_equal(cache_new(&c2, "host", 1u << 30), 0);
        const PersistEntry *b = &x->entries[1];
        for (unsigned k = 0; k < 2; k++) {
                Slab **adopted = calloc(1, sizeof(Slab *));

                assert_int_equal(persist_slab_adopt(fcntl(slabs[b->slabs[0].id]->fd, F_DUPFD_CLOEXEC, 3),
                                                    &b->slabs[0], &adopted[0], &err),
                                 0);
                assert_int_equal(persist_entry_adopt(c2, b, adopted, &err), k == 0 ? 0 : WD_E_BUSY);
        }
}

static void test_slab_checks(void **state) {
        int fds_before = count_fds();
        Slab *s = filled_slab("x", 4096, 9), *out = NULL;
        WdError err = WD_ERROR_NULL;
        struct stat st;

        assert_int_equal(fstat(s->fd, &st), 0);
        PersistSlab ps = { .id = 0, .size = 4096, .fd_size = st.st_size, .ino = st.st_ino };

        PersistSlab wrong_ino = ps;
        wrong_ino.ino++;
        assert_int_equal(persist_slab_adopt(fcntl(s->fd, F_DUPFD_CLOEXEC, 3), &wrong_ino, &out, &err), WD_E_CHANGED);
        PersistSlab wrong_size = ps;
        wrong_size.fd_size++;
        assert_int_equal(persist_slab_adopt(fcntl(s->fd, F_DUPFD_CLOEXEC, 3), &wrong_size, &out, &err), WD_E_CHANGED);
        assert_null(out);
        assert_int_equal(count_fds(), fds_before + 2); /* s's own two */

        /* An unsealed memfd of the right size and mode. */
        int raw = memfd_create("raw", MFD_CLOEXEC | MFD_ALLOW_SEALING);
        assert_int_equal(ftruncate(raw, 4096), 0);
        assert_int_equal(fchmod(raw, 0444), 0);
        assert_int_equal(fstat(raw, &st), 0);
        PersistSlab raw_ps = { .size = 4096, .fd_size = 4096, .ino = st.st_ino };
        assert_int_equal(persist_slab_adopt(raw, &raw_ps, &out, &err), WD_E_CHANGED);
        assert_non_null(strstr(err.message, "not sealed"));
        assert_null(out);
        assert_int_equal(count_fds(), fds_before + 2);

        /* A whole entry whose slab is not its file's size: refused, and the
         * slab freed, which takes its pages (the memfd is truncated). */
        Cache *c = NULL;
        assert_int_equal(cache_new(&c, "host", 1u << 20), 0);
        FileId id = file_id(5, 4000);
        PersistEntry pe = { .model = "/m", .component = "", .variant = "", .bytes = 4000, .n_files = 1, .ids = &id,
                            .n_slabs = 1, .slabs = &ps };
        Slab **one = calloc(1, sizeof(Slab *));
        assert_int_equal(persist_slab_adopt(fcntl(s->fd, F_DUPFD_CLOEXEC, 3), &ps, &one[0], &err), 0);
        assert_int_equal(persist_entry_adopt(c, &pe, one, &err), WD_E_CHANGED);
        assert_int_equal(fstat(s->fd, &st), 0);
        assert_int_equal(st.st_size, 0);
        slab_free(s);

        /* Over the budget. */
        s = filled_slab("y", 4096, 10);
        assert_int_equal(fstat(s->fd, &st), 0);
        ps.ino = st.st_ino;
        id.size = 4096;
        pe.bytes = 2u << 20;
        one = calloc(1, sizeof(Slab *));
        assert_int_equal(persist_slab_adopt(fcntl(s->fd, F_DUPFD_CLOEXEC, 3), &ps, &one[0], &err), 0);
        assert_int_equal(persist_entry_adopt(c, &pe, one, &err), WD_E_BUDGET);
        slab_free(s);
        cache_free(c);
        assert_int_equal(count_fds(), fds_before);
}

static int parse(const uint8_t *buf, size_t len) {
        PersistIndex *x = NULL;
        WdError err = WD_ERROR_NULL;
        int r = persist_index_parse(buf, len, &x, &err);

        if (r == 0)
                persist_index_free(x);
        else
                assert_true(err.message[0] != '\0');
        return r;
}

static void test_damaged(void **state) {
        _cleanup_(cache_freep) Cache *c = make_cache();
        _cleanup_free_ Slab **slabs = NULL;
        _cleanup_free_ uint8_t *buf = NULL;
        size_t n_slabs, n_entries, len;
        int fd;

        assert_int_equal(persist_index_save(c, SIZE_MAX, &fd, &slabs, &n_slabs, &n_entries), 0);
        buf = read_all(fd, &len);
        close(fd);
        assert_int_equal(parse(buf, len), 0);
        /* Cut short anywhere. */
        for (size_t n = 0; n < len; n++)
                assert_int_equal(parse(buf, n), WD_E_FORMAT);
        /* Any byte flipped. */
        for (size_t i = 0; i < len; i++) {
                buf[i] ^= 0x10;
                assert_int_not_equal(parse(buf, len), 0);
                buf[i] ^= 0x10;
        }
        /* Fewer slabs than the limit: the least recently used go first. */
        free(TAKE_PTR(slabs));
        assert_int_equal(persist_index_save(c, 3, &fd, &slabs, &n_slabs, &n_entries), 0);
        close(fd);
        assert_int_equal(n_entries, 2);
        assert_int_equal(n_slabs, 2);
}

/* A payload behind a valid checksum, as a forger would write it. */
static size_t with_header(const uint8_t *payload, size_t n, uint8_t *out) {
        static const uint8_t key[SIPHASH_KEY_SIZE] = "weightd fdstore";
        uint64_t sum = siphash24(payload, n, key);

        memcpy(out, "WDFDIDX", 8);
        out[8] = 1;
        memset(out + 9, 0, 7);
        for (unsigned i = 0; i < 8; i++) {
                out[16 + i] = (uint8_t) ((uint64_t) n >> (8 * i));
                out[24 + i] = (uint8_t) (sum >> (8 * i));
        }
        memcpy(out + 32, payload, n);
        return 32 + n;
}

static size_t put32(uint8_t *p, uint32_t v) {
        for (unsigned i = 0; i < 4; i++)
                p[i] = (uint8_t) (v >> (8 * i));
        return 4;
}

static size_t put64(uint8_t *p, uint64_t v) {
        for (unsigned i = 0; i < 8; i++)
                p[i] = (uint8_t) (v >> (8 * i));
        return 8;
}

/* One entry, the model "/m", then n_files and n_slabs as given (their
 * records zeroed), slab ids as given. */
static size_t forged(uint8_t *p, uint32_t n_entries, uint32_t model_len, uint32_t n_files, uint32_t n_slabs,
                     uint32_t slab_id0, uint32_t slab_id1) {
        size_t o = 0;

        o += put32(p + o, n_entries);
        o += put32(p + o, model_len);
        memcpy(p + o, "/m", 2);
        o += 2;
        o += put32(p + o, 0); /* component */
        o += put32(p + o, 0); /* variant */
        o += put64(p + o, 100);
        o += put32(p + o, 0);
        o += put32(p + o, n_files);
        for (uint32_t i = 0; i < MIN(n_files, 2u); i++) {
                memset(p + o, 0, 48); /* dev, ino, size, mtime s and ns, ctime s and ns */
                o += 48;
        }
        o += put32(p + o, n_slabs);
        for (uint32_t i = 0; i < MIN(n_slabs, 2u); i++) {
                o += put32(p + o, i == 0 ? slab_id0 : slab_id1);
                o += put64(p + o, 100);
                o += put64(p + o, 100);
                o += put64(p + o, 7);
        }
        return o;
}

static void test_hostile_counts(void **state) {
        uint8_t payload[512], buf[600];
        size_t n;

        n = forged(payload, 1, 2, 1, 1, 0, 0);
        assert_int_equal(parse(buf, with_header(payload, n, buf)), 0);
        n = forged(payload, 1, 2, 2, 2, 0, 1);
        assert_int_equal(parse(buf, with_header(payload, n, buf)), 0);
        /* Counts past what the bytes can hold: refused before allocating. */
        n = forged(payload, UINT32_MAX, 2, 1, 1, 0, 0);
        assert_int_equal(parse(buf, with_header(payload, n, buf)), WD_E_FORMAT);
        n = forged(payload, 1, UINT32_MAX, 1, 1, 0, 0);
        assert_int_equal(parse(buf, with_header(payload, n, buf)), WD_E_FORMAT);
        n = forged(payload, 1, 2, UINT32_MAX, 1, 0, 0);
        assert_int_equal(parse(buf, with_header(payload, n, buf)), WD_E_FORMAT);
        n = forged(payload, 1, 2, 1, UINT32_MAX, 0, 0);
        assert_int_equal(parse(buf, with_header(payload, n, buf)), WD_E_FORMAT);
        n = forged(payload, 1, 2, 0, 1, 0, 0);
        assert_int_equal(parse(buf, with_header(payload, n, buf)), WD_E_FORMAT);
        /* A slab id used twice, or past every slab. */
        n = forged(payload, 1, 2, 2, 2, 0, 0);
        assert_int_equal(parse(buf, with_header(payload, n, buf)), WD_E_FORMAT);
        n = forged(payload, 1, 2, 1, 1, UINT32_MAX, 0);
        assert_int_equal(parse(buf, with_header(payload, n, buf)), WD_E_FORMAT);
        /* A relative model path; bytes after the last entry. */
        n = forged(payload, 1, 2, 1, 1, 0, 0);
        payload[8] = 'm';
        assert_int_equal(parse(buf, with_header(payload, n, buf)), WD_E_FORMAT);
        n = forged(payload, 1, 2, 1, 1, 0, 0);
        payload[n++] = 0;
        assert_int_equal(parse(buf, with_header(payload, n, buf)), WD_E_FORMAT);
        /* An empty index is fine. */
        n = put32(payload, 0);
        assert_int_equal(parse(buf, with_header(payload, n, buf)), 0);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_save_read_adopt),
                cmocka_unit_test(test_release),
                cmocka_unit_test(test_twice),
                cmocka_unit_test(test_slab_checks),
                cmocka_unit_test(test_damaged),
                cmocka_unit_test(test_hostile_counts),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
