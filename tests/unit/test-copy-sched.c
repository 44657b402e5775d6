/* The device copy order (gpu/copy-sched.c), run on the CPU: components of
 * several files, whole and sharded plans, the files "read" in random
 * increments.  Every step may only read bytes below its file's watermark
 * and only write inside its tensor's place; once a file is in, everything
 * of it has been handed out; pieces of one-row copies are never smaller
 * than piece_min unless they end the tensor; and the buffer the steps fill
 * with memcpy equals the plan's own copies (shard_copy_host, which
 * test-shard checks element by element). */
#include "gpu/copy-sched.h"
#include "test-components.h"

typedef struct Rng {
        uint64_t x;
} Rng;

static uint64_t rng_next(Rng *r) {
        r->x ^= r->x << 13;
        r->x ^= r->x >> 7;
        r->x ^= r->x << 17;
        return r->x;
}

/* Run one plan's steps under random watermarks and check every rule. */
static void run_plan(Component *comp, TFile *files, const ShardSpec *spec, uint64_t piece_min, uint64_t seed) {
        _cleanup_(shard_plan_freep) ShardPlan *plan = NULL;
        WdError err = WD_ERROR_NULL;
        CopySched s;
        CopyStep step;
        Rng rng = { seed * 0x9e3779b97f4a7c15ull + 1 };
        uint64_t filled[8] = {}, moved = 0;
        const uint8_t *bases[8];
        size_t n = comp->n_files;

        assert_true(n <= 8);
        assert_int_equal(shard_plan(comp, spec, 256, &plan, &err), 0);
        _cleanup_free_ uint8_t *got = calloc(MAX(plan->bytes, 1u), 1);
        _cleanup_free_ uint8_t *want = calloc(MAX(plan->bytes, 1u), 1);
        assert_non_null(got);
        assert_non_null(want);
        for (size_t f = 0; f < n; f++)
                bases[f] = files[f].buf;
        shard_copy_host(plan, bases, want, 0, plan->n_tensors);

        assert_int_equal(copy_sched_init(&s, plan, n, piece_min), 0);
        for (;;) {
                bool all_in = true;

                /* Hand out everything the watermarks allow. */
                while (copy_sched_next(&s, filled, &step)) {
                        const ShardTensor *t = &plan->tensors[step.tensor];
                        const ShardCopy *k = &step.copy;
                        uint64_t end = k->src + (k->height - 1) * k->src_pitch + k->width;

                        assert_int_equal(step.file, t->file);
                        assert_true(k->width > 0 && k->height > 0);
                        assert_true(end <= filled[step.file]);
                        assert_true(k->dst >= t->offset);
                        assert_true(k->dst + (k->height - 1) * k->dst_pitch + k->width <= t->offset + t->nbytes);
                        if (k->height == 1 && k->dst + k->width < t->offset + t->nbytes)
                                assert_true(k->width >= piece_min); /* a piece that does not end its tensor */
                        for (uint64_t row = 0; row < k->height; row++)
                                memcpy(got + k->dst + row * k->dst_pitch, bases[step.file] + k->src + row * k->src_pitch,
                                       k->width);
                        moved += k->width * k->height;
                }
                /* A file that is in has nothing left. */
                for (size_t f = 0; f < n; f++)
                        if (filled[f] == files[f].size)
                                for (size_t i = s.first[f]; i < s.first[f + 1]; i++)
                                        assert_true(s.cursor[f] > i || plan->tensors[i].nbytes == 0);
                for (size_t f = 0; f < n; f++)
                        all_in = all_in && filled[f] == files[f].size;
                if (all_in)
                        break;
                /* Read on: one file a little or a lot. */
                size_t f = (size_t) (rng_next(&rng) % n);
                uint64_t step_bytes = rng_next(&rng) % 4 == 0 ? files[f].size : 1 + rng_next(&rng) % 4096;
                filled[f] = MIN(files[f].size, filled[f] + step_bytes);
        }
        assert_true(copy_sched_done(&s));
        assert_int_equal(moved, copy_sched_total(&s));
        assert_memory_equal(got, want, MAX(plan->bytes, 1u));
        copy_sched_deinit(&s);
}

static const TSpec file_a[] = {
        { "embed.weight", DTYPE_BF16, 2, { 64, 48 } },
        { "layers.0.q.weight", DTYPE_F32, 2, { 32, 40 } },
        { "layers.0.o.weight", DTYPE_F16, 2, { 24, 36 } },
        { "empty", DTYPE_F32, 2, { 0, 7 } },
        { "scale", DTYPE_F32, 0, {} },
        { "big.vec", DTYPE_U8, 1, { 50000 } },
};
static const TSpec file_b[] = {
        { "layers.1.q.weight", DTYPE_F8_E4M3, 2, { 96, 80 } },
        { "layers.1.o.weight", DTYPE_I64, 3, { 6, 10, 3 } },
        { "norm", DTYPE_BF16, 1, { 128 } },
};

static void test_random_watermarks(void **state) {
        TFile files[2] = { make_file(file_a, ELEMENTSOF(file_a), 1), make_file(file_b, ELEMENTSOF(file_b), 2) };
        _cleanup_(component_freep) Component *comp = make_component(files, 2);
        ShardRule rules[] = { { (char *) "*.q.weight", 0 }, { (char *) "*.o.weight", 1 }, { (char *) "embed.*", 1 } };

        for (uint64_t seed = 1; seed <= 40; seed++) {
                uint64_t piece = seed % 3 == 0 ? 1 : seed % 3 == 1 ? 512 : 8192;

                run_plan(comp, files, NULL, piece, seed);
                for (unsigned rank = 0; rank < 3; rank++) {
                        ShardSpec spec = { .rank = rank, .world = 3, .uneven = true, .n_rules = 3, .rules = rules };

                        run_plan(comp, files, &spec, piece, seed * 7 + rank);
                }
        }
        free(files[0].buf);
        free(files[1].buf);
}

/* With every byte in at once, one call per tensor and no pieces. */
static void test_all_at_once(void **state) {
        TFile file = make_file(file_a, ELEMENTSOF(file_a), 3);
        _cleanup_(component_freep) Component *comp = make_component(&file, 1);
        _cleanup_(shard_plan_freep) ShardPlan *plan = NULL;
        WdError err = WD_ERROR_NULL;
        uint64_t filled = UINT64_MAX;
        CopySched s;
        CopyStep step;
        size_t steps = 0, nonempty = 0;

        assert_int_equal(shard_plan(comp, NULL, 256, &plan, &err), 0);
        for (size_t i = 0; i < plan->n_tensors; i++)
                nonempty += plan->tensors[i].nbytes > 0;
        assert_int_equal(copy_sched_init(&s, plan, 1, 1u << 20), 0);
        while (copy_sched_next(&s, &filled, &step)) {
                assert_int_equal(step.copy.width * step.copy.height, plan->tensors[step.tensor].nbytes);
                steps++;
        }
        assert_int_equal(steps, nonempty);
        assert_true(copy_sched_done(&s));
        copy_sched_deinit(&s);
        free(file.buf);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_random_watermarks),
                cmocka_unit_test(test_all_at_once),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
