/* Plans (cluster/plan.c): what every node must compute alike.
 *
 * The components here are built by hand (paths, sizes, mtimes and header
 * bytes are all a manifest reads), and every property is checked against a
 * plain recomputation in the test: the chunks cover each file exactly once,
 * shares are contiguous and balanced by bytes, a gone source's chunks move
 * only to live sources and no other chunk moves, coordinators are spread
 * and do not depend on the order names are listed in, and a manifest
 * changes with each field it covers and names the file that differs. */
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

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_manifest),
                cmocka_unit_test(test_chunks_and_shares),
                cmocka_unit_test(test_owner),
                cmocka_unit_test(test_coordinator),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
