/* Plans (cluster/plan.c): what every node must compute alike.
 *
 * The components here are built by hand (paths, sizes, mtimes and header
 * bytes are all a manifest reads), and every property is checked against a
 * plain recomputation in the test: the chunks cover each file exactly once,
 * shares are contiguous and balanced by bytes, a gone source's chunks move
 * only to live sources and no other chunk moves, coordinators are spread
 * and do not depend on the order names are listed in, and a manifest
 * changes with each field it covers and names the file that differs.
 * Pieces (nodes that need different shards) are checked against a per-byte
 * map of who needs what, computed here from the tensors' shapes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "cluster/plan.h"
#include "test-components.h"

#define MAX_FILES 8

typedef struct Fake {
        Component comp;
        CatalogFile files[MAX_FILES];
        StHeader headers[MAX_FILES];
        uint8_t raw[MAX_FILES][64];
        char paths[MAX_FILES][64];
} Fake;

/* Files given in an order that is not sorted, on purpose. */
static void fake_init(Fake *f, size_t n, const uint64_t *sizes) {
        memset(f, 0, sizeof(*f));
        for (size_t i = 0; i < n; i++) {
                snprintf(f->paths[i], sizeof(f->paths[i]), "/models/m/model-%05zu-of-%05zu.safetensors", n - i, n);
                for (size_t k = 0; k < sizeof(f->raw[i]); k++)
                        f->raw[i][k] = (uint8_t) (i * 31 + k);
                f->headers[i].raw = f->raw[i];
                f->headers[i].data_offset = sizeof(f->raw[i]);
                f->files[i].display = f->paths[i];
                f->files[i].path = f->paths[i];
                f->files[i].id.size = sizes[i];
                f->files[i].id.mtime.tv_sec = 1700000000 + (time_t) i;
                f->files[i].header = &f->headers[i];
                f->comp.total_bytes += sizes[i];
        }
        f->comp.files = f->files;
        f->comp.n_files = n;
        f->comp.model = (char *) "/models/m";
        f->comp.name = (char *) "";
}

static const uint64_t sizes4[] = { 100u << 20, 37u << 20, (64u << 20) + 12345, 1 };

static void test_manifest(void **state) {
        Fake a, b;
        PlanManifest ma, mb;
        PlanFileView *va = NULL, *vb = NULL;
        char why[512];

        fake_init(&a, 4, sizes4);
        fake_init(&b, 4, sizes4);
        assert_int_equal(plan_manifest(&a.comp, &ma), 0);
        assert_int_equal(plan_manifest(&b.comp, &mb), 0);
        assert_true(plan_manifest_equal(&ma, &mb));

        /* The same files listed in another order: the same manifest. */
        CatalogFile t = b.files[0];
        b.files[0] = b.files[3];
        b.files[3] = t;
        assert_int_equal(plan_manifest(&b.comp, &mb), 0);
        assert_true(plan_manifest_equal(&ma, &mb));

        /* Each field counts, and the explanation names the file. */
        fake_init(&b, 4, sizes4);
        b.files[1].id.mtime.tv_nsec = 5;
        assert_int_equal(plan_manifest(&b.comp, &mb), 0);
        assert_false(plan_manifest_equal(&ma, &mb));
        assert_int_equal(plan_file_views(&a.comp, &va), 0);
        assert_int_equal(plan_file_views(&b.comp, &vb), 0);
        plan_explain_mismatch(vb, 4, va, 4, why, sizeof(why));
        assert_non_null(strstr(why, b.paths[1]));
        assert_non_null(strstr(why, "modified at"));
        free(vb);

        fake_init(&b, 4, sizes4);
        b.files[2].id.size++;
        assert_int_equal(plan_manifest(&b.comp, &mb), 0);
        assert_false(plan_manifest_equal(&ma, &mb));
        assert_int_equal(plan_file_views(&b.comp, &vb), 0);
        plan_explain_mismatch(vb, 4, va, 4, why, sizeof(why));
        assert_non_null(strstr(why, b.paths[2]));
        assert_non_null(strstr(why, "bytes here"));
        free(vb);

        fake_init(&b, 4, sizes4);
        b.raw[3][10] ^= 1;
        assert_int_equal(plan_manifest(&b.comp, &mb), 0);
        assert_false(plan_manifest_equal(&ma, &mb));
        assert_int_equal(plan_file_views(&b.comp, &vb), 0);
        plan_explain_mismatch(vb, 4, va, 4, why, sizeof(why));
        assert_non_null(strstr(why, b.paths[3]));
        assert_non_null(strstr(why, "header"));
        free(vb);

        /* A file fewer: the last file of the plan is missing here. */
        fake_init(&b, 4, sizes4);
        b.comp.n_files = 3; /* drops model-00001-of-00004, sorted first */
        assert_int_equal(plan_manifest(&b.comp, &mb), 0);
        assert_false(plan_manifest_equal(&ma, &mb));
        assert_int_equal(plan_file_views(&b.comp, &vb), 0);
        plan_explain_mismatch(vb, 3, va, 4, why, sizeof(why));
        assert_non_null(strstr(why, "missing here"));
        assert_non_null(strstr(why, b.paths[3]));
        plan_explain_mismatch(va, 4, va, 4, why, sizeof(why));
        assert_string_equal(why, "");
        free(vb);
        free(va);
}

static void test_chunks_and_shares(void **state) {
        const uint64_t chunk = 4u << 20;
        Fake f;
        PlanChunk *chunks = NULL;
        size_t n = 0;

        fake_init(&f, 4, sizes4);
        assert_int_equal(plan_chunks(&f.comp, chunk, &chunks, &n), 0);

        /* Every byte of every file once, files in sorted path order. */
        uint64_t covered[MAX_FILES] = {};
        const char *last = "";
        for (size_t c = 0; c < n; c++) {
                const CatalogFile *file = &f.files[chunks[c].file];

                assert_true(strcmp(last, file->display) <= 0);
                last = file->display;
                assert_int_equal(chunks[c].offset, covered[chunks[c].file]);
                assert_int_equal(chunks[c].offset % chunk, 0);
                assert_true(chunks[c].length > 0 && chunks[c].length <= chunk);
                covered[chunks[c].file] += chunks[c].length;
        }
        for (size_t i = 0; i < 4; i++)
                assert_int_equal(covered[i], sizes4[i]);

        for (size_t ns = 1; ns <= 7; ns++) {
                unsigned owner[256];
                uint64_t share[8] = {};

                assert_true(n <= 256);
                plan_assign(chunks, n, ns, owner);
                for (size_t c = 0; c < n; c++) {
                        assert_true(owner[c] < ns);
                        if (c > 0)
                                assert_true(owner[c] >= owner[c - 1]); /* contiguous runs */
                        share[owner[c]] += chunks[c].length;
                }
                /* Balanced within a chunk of the fair share. */
                for (size_t s = 0; s < ns; s++) {
                        int64_t d = (int64_t) share[s] - (int64_t) (f.comp.total_bytes / ns);

                        if (d < -(int64_t) chunk || d > (int64_t) chunk)
                                fail_msg("%zu sources: source %zu has %" PRIu64 " bytes, fair is %" PRIu64, ns, s,
                                         share[s], f.comp.total_bytes / ns);
                }
        }
        free(chunks);
}

static void test_owner(void **state) {
        const char *names[] = { "a", "b", "c", "d" };
        bool alive[4] = { true, true, true, true };
        unsigned count[4] = {};
        const size_t n_chunks = 400;

        for (size_t c = 0; c < n_chunks; c++)
                assert_int_equal(plan_owner(c, (unsigned) (c % 4), names, alive, 4), (int) (c % 4));

        alive[1] = false;
        for (size_t c = 0; c < n_chunks; c++) {
                int o = plan_owner(c, (unsigned) (c % 4), names, alive, 4);

                assert_true(o >= 0 && alive[o]);
                if (c % 4 != 1)
                        assert_int_equal(o, (int) (c % 4)); /* nothing else moves */
                else
                        count[o]++;
        }
        /* b's 100 chunks spread over the three others. */
        for (size_t s = 0; s < 4; s++)
                if (s != 1 && (count[s] < 15 || count[s] > 55))
                        fail_msg("%s took %u of b's 100 chunks", names[s], count[s]);

        /* Two gone: a function of the live set alone. */
        alive[3] = false;
        for (size_t c = 0; c < n_chunks; c++) {
                int o = plan_owner(c, (unsigned) (c % 4), names, alive, 4);

                assert_true(o == 0 || o == 2);
        }
        memset(alive, 0, sizeof(alive));
        assert_int_equal(plan_owner(7, 3, names, alive, 4), -1);
}

static void test_coordinator(void **state) {
        const char *names[] = { "node-a", "node-b", "node-c", "node-d" };
        const char *reversed[] = { "node-d", "node-c", "node-b", "node-a" };
        unsigned count[4] = {};

        for (unsigned k = 0; k < 2000; k++) {
                char key[64];
                size_t i, j;

                snprintf(key, sizeof(key), "/models/m%u\ntransformer", k);
                i = plan_coordinator(key, names, 4);
                j = plan_coordinator(key, reversed, 4);
                assert_string_equal(names[i], reversed[j]);
                count[i]++;
        }
        for (size_t i = 0; i < 4; i++)
                if (count[i] < 350 || count[i] > 650)
                        fail_msg("%s coordinates %u of 2000 components", names[i], count[i]);
        /* One node: itself. */
        assert_int_equal(plan_coordinator("x", names, 1), 0);
}


/* ---- pieces ------------------------------------------------------------- */

typedef struct PSpec {
        const char *name;
        unsigned dim;
} PSpec;

/* Node i's need of each byte of comp's file f, computed from the header:
 * spec NULL is the whole file; else each tensor a rule names exactly is
 * split evenly over world along dim, the others whole (tensor data only). */
static void mark_bytes(const Component *comp, size_t f, const ShardSpec *spec, uint64_t bit, uint64_t *need) {
        const StHeader *h = comp->files[f].header;

        if (!spec) {
                for (uint64_t b = 0; b < comp->files[f].id.size; b++)
                        need[b] |= bit;
                return;
        }
        for (size_t j = 0; j < h->n_tensors; j++) {
                const StTensor *t = &h->tensors[j];
                uint64_t base = h->data_offset + t->begin, es = dtype_bits(t->dtype) / 8;
                const ShardRule *rule = NULL;
                bool taken = spec->n_tensors == 0;

                for (size_t k = 0; k < spec->n_tensors; k++)
                        taken = taken || strcmp(spec->tensors[k], t->name) == 0;
                if (!taken)
                        continue;
                for (size_t k = 0; k < spec->n_rules && spec->world > 1; k++)
                        if (strcmp(spec->rules[k].pattern, t->name) == 0)
                                rule = &spec->rules[k];
                if (!rule) {
                        for (uint64_t b = base; b < h->data_offset + t->end; b++)
                                need[b] |= bit;
                        continue;
                }
                uint64_t d0 = t->shape[0], d1 = t->ndim > 1 ? t->shape[1] : 1;
                if (rule->dim == 0) {
                        uint64_t part = d0 / spec->world, row = d1 * es;
                        for (uint64_t b = base + spec->rank * part * row; b < base + (spec->rank + 1) * part * row; b++)
                                need[b] |= bit;
                } else {
                        uint64_t part = d1 / spec->world;
                        for (uint64_t r = 0; r < d0; r++)
                                for (uint64_t e = spec->rank * part; e < (spec->rank + 1) * part; e++)
                                        for (uint64_t x = 0; x < es; x++)
                                                need[base + (r * d1 + e) * es + x] |= bit;
                }
        }
}

static ShardSpec *tp_spec(unsigned rank, unsigned world, const PSpec *rules, size_t n) {
        ShardSpec *s = calloc(1, sizeof(ShardSpec));

        assert_non_null(s);
        s->rank = rank;
        s->world = world;
        s->rules = calloc(n + 1, sizeof(ShardRule));
        assert_non_null(s->rules);
        for (size_t i = 0; i < n; i++)
                s->rules[i] = (ShardRule){ .pattern = strdup(rules[i].name), .dim = rules[i].dim };
        s->n_rules = n;
        return s;
}

/* The pieces must be exactly the runs of align-sized blocks that the same
 * nodes need (a block is needed by a node that needs any of its bytes), cut
 * at the multiples of chunk. */
static void check_pieces(const Component *comp, ShardSpec **specs, size_t n, uint64_t chunk, uint64_t align) {
        PlanChunk *pieces = NULL;
        size_t n_pieces = 0, k = 0;
        WdError err = WD_ERROR_NULL;
        unsigned *owner;
        uint64_t load[PLAN_MAX_SOURCES] = {}, union_bytes = 0;

        if (plan_pieces(comp, (const ShardSpec *const *) specs, n, chunk, align, &pieces, &n_pieces, &err) != 0)
                fail_msg("%s", err.message);
        for (size_t f = 0; f < comp->n_files; f++) {
                uint64_t size = comp->files[f].id.size;
                uint64_t *need = calloc(size, sizeof(uint64_t));

                assert_non_null(need);
                for (size_t i = 0; i < n; i++)
                        mark_bytes(comp, f, specs[i], UINT64_C(1) << i, need);
                for (uint64_t b = 0; b < size;) {
                        uint64_t bn = 0, end = b, run_need;

                        /* The run of blocks from b with the same need, within b's chunk. */
                        for (uint64_t x = b; x < MIN(b + align, size); x++)
                                bn |= need[x];
                        run_need = bn;
                        end = MIN(b + align, size);
                        while (end < size && end % chunk != 0) {
                                uint64_t nb = 0;

                                for (uint64_t x = end; x < MIN(end + align, size); x++)
                                        nb |= need[x];
                                if (nb != run_need)
                                        break;
                                end = MIN(end + align, size);
                        }
                        if (run_need != 0) {
                                if (k >= n_pieces)
                                        fail_msg("file %zu: no piece for [%" PRIu64 ", %" PRIu64 ")", f, b, end);
                                if (pieces[k].file != f || pieces[k].offset != b || pieces[k].length != end - b ||
                                    pieces[k].need != run_need)
                                        fail_msg("piece %zu: file %zu [%" PRIu64 ", +%" PRIu64 ") need %" PRIx64
                                                 ", expected file %zu [%" PRIu64 ", +%" PRIu64 ") need %" PRIx64,
                                                 k, pieces[k].file, pieces[k].offset, pieces[k].length, pieces[k].need,
                                                 f, b, end - b, run_need);
                                union_bytes += end - b;
                                k++;
                        }
                        b = end;
                }
                free(need);
        }
        assert_int_equal(k, n_pieces);

        /* Readers: a node that needs the piece; alone, that node; the
         * shares of pieces several need balanced within one piece. */
        owner = calloc(n_pieces + 1, sizeof(unsigned));
        assert_non_null(owner);
        plan_assign_needed(pieces, n_pieces, n, owner);
        uint64_t shared = 0;
        for (size_t c = 0; c < n_pieces; c++) {
                assert_true(owner[c] < n);
                assert_true(pieces[c].need >> owner[c] & 1);
                if (__builtin_popcountll(pieces[c].need) == 1)
                        assert_int_equal(UINT64_C(1) << owner[c], pieces[c].need);
                else
                        shared += pieces[c].length;
                load[owner[c]] += pieces[c].length;
        }
        uint64_t total = 0;
        for (size_t i = 0; i < n; i++)
                total += load[i];
        assert_int_equal(total, union_bytes); /* every needed byte read once */
        /* Balance: a node given a shared piece had no more to read than any
         * other node that needed it, counting what it was given before. */
        if (shared > 0) {
                uint64_t so_far[PLAN_MAX_SOURCES] = {};

                for (size_t c = 0; c < n_pieces; c++)
                        if (__builtin_popcountll(pieces[c].need) == 1)
                                so_far[owner[c]] += pieces[c].length;
                for (size_t c = 0; c < n_pieces; c++) {
                        if (__builtin_popcountll(pieces[c].need) == 1)
                                continue;
                        for (size_t i = 0; i < n; i++)
                                if (pieces[c].need >> i & 1)
                                        assert_true(so_far[owner[c]] <= so_far[i]);
                        so_far[owner[c]] += pieces[c].length;
                }
        }

        /* A gone reader's pieces go to a live node that needs them. */
        const char *names[PLAN_MAX_SOURCES];
        char name_buf[PLAN_MAX_SOURCES][32];
        bool alive[PLAN_MAX_SOURCES];
        for (size_t i = 0; i < n; i++) {
                snprintf(name_buf[i], sizeof(name_buf[i]), "node-%zu", i);
                names[i] = name_buf[i];
                alive[i] = i != 0;
        }
        for (size_t c = 0; c < n_pieces; c++) {
                int o = plan_owner_needed(c, owner[c], pieces[c].need, names, alive, n);

                if ((pieces[c].need & ~UINT64_C(1)) == 0)
                        assert_int_equal(o, -1); /* only node 0 needs it: nobody else reads it */
                else {
                        assert_true(o > 0);
                        assert_true(pieces[c].need >> o & 1);
                        if (owner[c] != 0)
                                assert_int_equal(o, (int) owner[c]);
                }
        }
        free(owner);
        free(pieces);
}

static void test_pieces(void **state) {
        const TSpec f0[] = {
                { "q", DTYPE_F32, 2, { 64, 48 } },     /* 192-byte rows */
                { "o", DTYPE_BF16, 2, { 40, 256 } },   /* 512-byte rows */
                { "big", DTYPE_F32, 2, { 16, 4096 } }, /* 16 KiB rows: dim-1 slices 4 KiB apart */
                { "norm", DTYPE_F16, 1, { 100 } },
        };
        const TSpec f1[] = {
                { "w", DTYPE_F32, 2, { 1024, 64 } },
                { "e", DTYPE_F16, 2, { 8, 8 } },
        };
        TFile files[2] = { make_file(f0, 4, 1), make_file(f1, 2, 2) };
        Component *comp = make_component(files, 2);
        const PSpec tp[] = { { "q", 0 }, { "o", 1 }, { "big", 1 }, { "w", 0 } };
        ShardSpec *specs[4];

        for (size_t i = 0; i < comp->n_files; i++)
                comp->files[i].id.size = files[i].size;

        /* Tensor parallel over 4 nodes, two alignments and chunk sizes. */
        for (unsigned i = 0; i < 4; i++)
                specs[i] = tp_spec(i, 4, tp, 4);
        check_pieces(comp, specs, 4, 8192, 4096);
        check_pieces(comp, specs, 4, 65536, 4096);
        check_pieces(comp, specs, 4, 4096, 512);
        check_pieces(comp, specs, 1, 8192, 4096);

        /* One node serves it whole, three nodes shards of a world of 3. */
        ShardSpec *mixed[4] = { NULL, tp_spec(0, 2, tp, 4), tp_spec(1, 2, tp, 4), tp_spec(1, 2, tp, 2) };
        check_pieces(comp, mixed, 4, 8192, 4096);
        check_pieces(comp, mixed, 4, 8192, 512);

        /* Pipeline stages: one node the first file's tensors, one the
         * second's and "q" split with a third; nobody needs all of a file. */
        ShardSpec *stages[3] = { tp_spec(0, 1, NULL, 0), tp_spec(0, 2, tp, 4), tp_spec(1, 2, tp, 4) };
        const char *first[] = { "q", "o", "big", "norm" }, *second[] = { "w", "e", "e" };
        stages[0]->tensors = calloc(4, sizeof(char *));
        stages[1]->tensors = calloc(3, sizeof(char *));
        stages[2]->tensors = calloc(1, sizeof(char *));
        for (size_t i = 0; i < 4; i++)
                stages[0]->tensors[stages[0]->n_tensors++] = strdup(first[i]);
        for (size_t i = 0; i < 3; i++)
                stages[1]->tensors[stages[1]->n_tensors++] = strdup(second[i]);
        stages[2]->tensors[stages[2]->n_tensors++] = strdup("q");
        check_pieces(comp, stages, 3, 8192, 4096);
        check_pieces(comp, stages + 2, 1, 8192, 4096); /* only "q", half: file 1 needs nothing */
        check_pieces(comp, stages + 1, 1, 8192, 4096); /* not "q": file 0 needs nothing */
        for (size_t i = 0; i < 3; i++)
                shard_spec_free(stages[i]);

        /* Nobody but node 0 needs "big" split along dim 1 with 4 KiB
         * slices 12 KiB apart: its rows are separate reads. */
        const PSpec big_only[] = { { "big", 1 } };
        ShardSpec *one[1] = { tp_spec(2, 4, big_only, 1) };
        PlanChunk *pieces = NULL;
        size_t n = 0;
        WdError err = WD_ERROR_NULL;
        assert_int_equal(plan_pieces(comp, (const ShardSpec *const *) one, 1, 1u << 20, 4096, &pieces, &n, &err), 0);
        uint64_t bytes = 0;
        for (size_t c = 0; c < n; c++)
                bytes += pieces[c].length;
        /* The other tensors whole (each range rounded out by at most a
         * block at each end), plus the 16 rows of "big", each in two
         * blocks: half of the tensor, in 16 reads. */
        assert_true(bytes < files[0].size + files[1].size - 16 * 16384 + 16 * 8192 + 8 * 4096);
        assert_true(n >= 16);
        check_pieces(comp, one, 1, 1u << 20, 4096);
        free(pieces);

        /* A spec that does not fit: the error names the tensor and the rule. */
        const PSpec bad[] = { { "norm", 1 } };
        ShardSpec *b[2] = { tp_spec(0, 2, bad, 1), NULL };
        assert_int_equal(plan_pieces(comp, (const ShardSpec *const *) b, 2, 8192, 4096, &pieces, &n, &err), WD_E_INVALID);
        assert_non_null(strstr(err.message, "norm"));
        assert_non_null(strstr(err.message, "dim 1"));
        shard_spec_free(b[0]);
        shard_spec_free(one[0]);
        for (unsigned i = 0; i < 4; i++) {
                shard_spec_free(specs[i]);
                shard_spec_free(mixed[i]);
        }
        component_free(comp);
        free(files[0].buf);
        free(files[1].buf);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_manifest),
                cmocka_unit_test(test_chunks_and_shares),
                cmocka_unit_test(test_owner),
                cmocka_unit_test(test_coordinator),
                cmocka_unit_test(test_pieces),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
