/* Shard planner tests: every dtype split along dimension 0 and 1, even and
 * uneven, for every rank of several worlds; the copies compared with a
 * reference that walks the rank's part element by element (bit by bit, so
 * F4 and F6 are covered) and never looks at the plan's copies; the parts of
 * all ranks tile the tensor; errors and their messages; alignment; empty
 * tensors and scalars; the canonical spec key.
 *
 * Components are built in memory (test-components.h). */
#include <fnmatch.h>

#include "format/catalog.h"
#include "store/shard.h"
#include "test-components.h"

static bool get_bit(const uint8_t *p, uint64_t i) {
        return (p[i / 8] >> (i % 8)) & 1;
}

static void put_bit(uint8_t *p, uint64_t i, bool v) {
        if (v)
                p[i / 8] |= (uint8_t) (1u << (i % 8));
        else
                p[i / 8] &= (uint8_t) ~(1u << (i % 8));
}

/* The rank's part of a tensor, element by element: for every index of the
 * part's shape, the element at that index (shifted by start along dim) in
 * the whole tensor. */
static uint8_t *reference_part(const uint8_t *src, const StTensor *st, unsigned dim, uint64_t start, uint64_t part,
                               uint64_t *ret_bytes) {
        unsigned bits = dtype_bits(st->dtype), nd = st->ndim;
        uint64_t shape[8], idx[8] = {}, n = 1;

        for (unsigned d = 0; d < nd; d++) {
                shape[d] = d == dim ? part : st->shape[d];
                n *= shape[d];
        }
        *ret_bytes = n * bits / 8;
        uint8_t *out = calloc(1, *ret_bytes + 1);
        assert_non_null(out);
        for (uint64_t e = 0; e < n; e++) {
                /* idx is the multi-index of e in the part's shape. */
                uint64_t rem = e, lin = 0;
                for (int d = (int) nd - 1; d >= 0; d--) {
                        idx[d] = rem % shape[d];
                        rem /= shape[d];
                }
                for (unsigned d = 0; d < nd; d++)
                        lin = lin * st->shape[d] + idx[d] + (d == dim ? start : 0);
                for (unsigned b = 0; b < bits; b++)
                        put_bit(out, e * bits + b, get_bit(src, lin * bits + b));
        }
        return out;
}

/* Where rank r of world w starts and how many it takes, from the rule. */
static void expected_split(uint64_t size, unsigned rank, unsigned world, uint64_t *start, uint64_t *part) {
        uint64_t base = size / world, extra = size % world;

        *part = base + (rank < extra);
        *start = rank * base + (rank < extra ? rank : extra);
}

static ShardSpec spec_of(unsigned rank, unsigned world, bool uneven, ShardRule *rules, size_t n) {
        return (ShardSpec){ .rank = rank, .world = world, .uneven = uneven, .rules = rules, .n_rules = n };
}

/* Plan and copy every rank of world with rule on tensor k of a one-file
 * component; compare with the reference, and check the parts tile the
 * tensor. */
static void check_all_ranks(Component *comp, TFile *file, unsigned world, bool uneven, ShardRule *rule) {
        const StHeader *h = comp->files[0].header;

        for (unsigned rank = 0; rank < world; rank++) {
                ShardSpec spec = spec_of(rank, world, uneven, rule, 1);
                _cleanup_(shard_plan_freep) ShardPlan *p = NULL;
                WdError err = WD_ERROR_NULL;
                const uint8_t *files[1] = { file->buf };
                uint64_t covered = 0;

                if (shard_plan(comp, &spec, 256, &p, &err) != 0)
                        fail_msg("rank %u/%u: %s", rank, world, err.message);
                assert_int_equal(p->n_tensors, h->n_tensors);
                uint8_t *dst = calloc(1, p->bytes + 1);
                assert_non_null(dst);
                shard_copy_host(p, files, dst, 0, p->n_tensors);

                for (size_t i = 0; i < p->n_tensors; i++) {
                        const ShardTensor *t = &p->tensors[i];
                        const StTensor *st = &h->tensors[i];
                        const uint8_t *whole = file->buf + h->data_offset + st->begin;
                        bool matched = fnmatch(rule->pattern, st->name, 0) == 0 && world > 1;
                        uint64_t start = 0, part = 0, nref;
                        uint8_t *ref;

                        assert_ptr_equal(t->source, st);
                        assert_int_equal(t->offset % 256, 0);
                        assert_int_equal(t->copy.dst, t->offset);
                        assert_true(t->offset >= covered);
                        covered = t->offset + t->nbytes;
                        assert_int_equal(t->split, matched);
                        if (matched) {
                                expected_split(st->shape[rule->dim], rank, world, &start, &part);
                                assert_int_equal(t->dim, rule->dim);
                                assert_int_equal(t->start, start);
                                ref = reference_part(whole, st, rule->dim, start, part, &nref);
                        } else
                                ref = reference_part(whole, st, 0, 0, st->ndim ? st->shape[0] : 1, &nref);
                        assert_int_equal(t->nbytes, nref);
                        assert_int_equal(t->ndim, st->ndim);
                        for (unsigned d = 0; d < st->ndim; d++)
                                assert_int_equal(t->shape[d], matched && d == rule->dim ? part : st->shape[d]);
                        assert_int_equal(t->copy.width * t->copy.height, t->nbytes);
                        assert_true(t->copy.src_pitch >= t->copy.width);
                        assert_int_equal(t->copy.dst_pitch, t->copy.width);
                        if (nref > 0 && memcmp(dst + t->offset, ref, nref) != 0)
                                fail_msg("%s %s rank %u/%u dim %u: bytes differ", st->name,
                                         dtype_to_string(st->dtype), rank, world, rule->dim);
                        free(ref);
                }
                assert_int_equal(p->bytes, covered);
                free(dst);
        }
}

static void test_every_dtype(void **state) {
        for (Dtype d = 0; d < _DTYPE_MAX; d++) {
                /* Rows along dim 1 are 4 elements: whole bytes even for F4
                 * and F6.  A 2-D tensor and a 1-D one too, where bytes allow. */
                bool sub = dtype_bits(d) < 8;
                TSpec ts[] = {
                        { "a.weight", d, 3, { 12, 8, 4 } },
                        { "b.weight", d, sub ? 3 : 2, { 10, 6, 4 } },
                        { "c.bias", d, 1, { sub ? 16 : 14 } },
                        { "d.other", d, 2, { 3, 8 } }, /* no rule: whole */
                };
                TFile f = make_file(ts, ELEMENTSOF(ts), (uint32_t) d + 1);
                _cleanup_(component_freep) Component *comp = make_component(&f, 1);

                for (unsigned dim = 0; dim <= 1; dim++)
                        for (unsigned world = 1; world <= 5; world++) {
                                /* A 1-D tensor of F4 or F6 cannot be split:
                                                 * its rows are single elements. */
                                const char *pattern = dim == 1 ? "[ab].weight" : sub ? "[ab].*" : "[abc].*";
                                ShardRule rule = { .pattern = (char *) pattern, .dim = dim };
                                bool even = true;

                                /* Do the matched tensors divide? */
                                for (size_t i = 0; i < ELEMENTSOF(ts); i++)
                                        if (fnmatch(rule.pattern, ts[i].name, 0) == 0 && ts[i].ndim > dim &&
                                            ts[i].shape[dim] % world != 0)
                                                even = false;
                                if (even)
                                        check_all_ranks(comp, &f, world, false, &rule);
                                else {
                                        ShardSpec spec = spec_of(0, world, false, &rule, 1);
                                        _cleanup_(shard_plan_freep) ShardPlan *p = NULL;
                                        WdError err = WD_ERROR_NULL;

                                        assert_int_equal(shard_plan(comp, &spec, 256, &p, &err), WD_E_INVALID);
                                        assert_null(p);
                                        assert_non_null(strstr(err.message, "does not divide"));
                                }
                                check_all_ranks(comp, &f, world, true, &rule);
                        }
                free(f.buf);
        }
}

static void test_multi_file_first_rule_wins(void **state) {
        TSpec t0[] = { { "x.q.weight", DTYPE_BF16, 2, { 8, 6 } }, { "x.o.weight", DTYPE_F32, 2, { 4, 8 } } };
        TSpec t1[] = { { "y.q.weight", DTYPE_F16, 2, { 6, 4 } }, { "y.norm", DTYPE_F32, 1, { 7 } } };
        TFile f[2] = { make_file(t0, 2, 11), make_file(t1, 2, 12) };
        _cleanup_(component_freep) Component *comp = make_component(f, 2);
        ShardRule rules[] = { { (char *) "*.o.*", 1 }, { (char *) "*.weight", 0 } };
        ShardSpec spec = spec_of(1, 2, false, rules, 2);
        _cleanup_(shard_plan_freep) ShardPlan *p = NULL;
        const uint8_t *bufs[2] = { f[0].buf, f[1].buf };
        WdError err = WD_ERROR_NULL;

        assert_int_equal(shard_plan(comp, &spec, 64, &p, &err), 0);
        assert_int_equal(p->n_tensors, 4);
        assert_int_equal(p->tensors[0].file, 0);
        assert_int_equal(p->tensors[2].file, 1);
        assert_true(p->tensors[0].split && p->tensors[0].dim == 0 && p->tensors[0].start == 4);
        assert_true(p->tensors[1].split && p->tensors[1].dim == 1 && p->tensors[1].start == 4);
        assert_true(p->tensors[2].split && p->tensors[2].dim == 0 && p->tensors[2].start == 3);
        assert_false(p->tensors[3].split);
        for (size_t i = 0; i < 4; i++)
                assert_int_equal(p->tensors[i].offset % 64, 0);

        uint8_t *dst = calloc(1, p->bytes);
        assert_non_null(dst);
        shard_copy_host(p, bufs, dst, 0, 2);
        shard_copy_host(p, bufs, dst, 2, 2);
        for (size_t i = 0; i < 4; i++) {
                const ShardTensor *t = &p->tensors[i];
                const StHeader *h = comp->files[t->file].header;
                uint64_t n;
                uint8_t *ref = reference_part(f[t->file].buf + h->data_offset + t->source->begin, t->source,
                                              t->split ? t->dim : 0, t->split ? t->start : 0,
                                              t->split ? t->shape[t->dim] : t->source->shape[0], &n);
                assert_int_equal(n, t->nbytes);
                assert_memory_equal(dst + t->offset, ref, n);
                free(ref);
        }
        free(dst);
        free(f[0].buf);
        free(f[1].buf);
}

static void expect_error(Component *comp, ShardSpec *spec, const char *const *needles) {
        _cleanup_(shard_plan_freep) ShardPlan *p = NULL;
        WdError err = WD_ERROR_NULL;

        assert_int_equal(shard_plan(comp, spec, 256, &p, &err), WD_E_INVALID);
        assert_null(p);
        for (size_t i = 0; needles[i]; i++)
                if (!strstr(err.message, needles[i]))
                        fail_msg("\"%s\" not in: %s", needles[i], err.message);
}

static void test_errors(void **state) {
        TSpec ts[] = {
                { "w", DTYPE_F32, 2, { 6, 4 } },
                { "v", DTYPE_F32, 1, { 6 } },
                { "s", DTYPE_F32, 0, {} },
                { "q4", DTYPE_F4, 2, { 4, 6 } },
                { "q6", DTYPE_F6_E2M3, 2, { 2, 4 } },
        };
        TFile f = make_file(ts, ELEMENTSOF(ts), 3);
        _cleanup_(component_freep) Component *comp = make_component(&f, 1);
        ShardRule r_w0 = { (char *) "w", 0 }, r_v1 = { (char *) "v", 1 }, r_s0 = { (char *) "s", 0 },
                  r_q41 = { (char *) "q4", 1 }, r_q60 = { (char *) "q6", 0 }, r_q61 = { (char *) "q6", 1 },
                  r_dim2 = { (char *) "w", 2 }, r_empty = { (char *) "", 0 };
        ShardSpec s;

        s = spec_of(4, 4, false, &r_w0, 1);
        expect_error(comp, &s, (const char *[]){ "rank 4 is not below world 4", NULL });
        s = spec_of(0, 0, false, &r_w0, 1);
        expect_error(comp, &s, (const char *[]){ "world is 0", NULL });
        s = spec_of(0, 2, false, &r_dim2, 1);
        expect_error(comp, &s, (const char *[]){ "rule \"w:2\"", "only dimensions 0 and 1", NULL });
        s = spec_of(0, 2, false, &r_empty, 1);
        expect_error(comp, &s, (const char *[]){ "empty pattern", NULL });
        s = spec_of(1, 4, false, &r_w0, 1);
        expect_error(comp, &s,
                     (const char *[]){ "/models/m/part-0.safetensors", "tensor \"w\"", "rule \"w:0\"", "is 6",
                                       "world 4 does not divide", NULL });
        s = spec_of(0, 2, false, &r_v1, 1);
        expect_error(comp, &s, (const char *[]){ "tensor \"v\"", "rule \"v:1\"", "beyond the tensor's 1", NULL });
        /* A rule that matches a scalar is an error, like any dim beyond a
         * tensor's: it asked for a split that cannot be. */
        s = spec_of(0, 2, false, &r_s0, 1);
        expect_error(comp, &s, (const char *[]){ "tensor \"s\"", "beyond the tensor's 0 dimensions", NULL });
        /* F4 along dim 1: rows of 1 element, 4 bits. */
        s = spec_of(0, 2, false, &r_q41, 1);
        expect_error(comp, &s, (const char *[]){ "tensor \"q4\"", "F4", "(4 bits), not whole bytes", NULL });
        /* F6 [2, 4] along dim 0: rows of 4 elements, 24 bits: fine. */
        s = spec_of(1, 2, false, &r_q60, 1);
        {
                _cleanup_(shard_plan_freep) ShardPlan *p = NULL;
                WdError err = WD_ERROR_NULL;
                assert_int_equal(shard_plan(comp, &s, 256, &p, &err), 0);
                assert_int_equal(p->tensors[4].nbytes, 3);
        }
        s = spec_of(0, 2, false, &r_q61, 1);
        expect_error(comp, &s, (const char *[]){ "F6_E2M3", "(6 bits)", NULL });
        /* With world 1 no rule applies: nothing to refuse. */
        s = spec_of(0, 1, false, &r_s0, 1);
        {
                _cleanup_(shard_plan_freep) ShardPlan *p = NULL;
                WdError err = WD_ERROR_NULL;
                assert_int_equal(shard_plan(comp, &s, 256, &p, &err), 0);
                for (size_t i = 0; i < p->n_tensors; i++)
                        assert_false(p->tensors[i].split);
        }
        /* Alignment must be a power of two. */
        {
                _cleanup_(shard_plan_freep) ShardPlan *p = NULL;
                WdError err = WD_ERROR_NULL;
                assert_int_equal(shard_plan(comp, NULL, 3, &p, &err), WD_E_INVALID);
        }
        free(f.buf);
}

static void test_empty_scalar_and_whole(void **state) {
        TSpec ts[] = {
                { "e0", DTYPE_BF16, 2, { 0, 8 } },
                { "e1", DTYPE_BF16, 2, { 8, 0 } },
                { "s", DTYPE_F64, 0, {} },
                { "w", DTYPE_U8, 1, { 3 } },
        };
        TFile f = make_file(ts, ELEMENTSOF(ts), 4);
        _cleanup_(component_freep) Component *comp = make_component(&f, 1);
        ShardRule rules[] = { { (char *) "e0", 0 }, { (char *) "e1", 1 } };
        const uint8_t *bufs[1] = { f.buf };
        WdError err = WD_ERROR_NULL;

        for (unsigned rank = 0; rank < 4; rank++) {
                ShardSpec s = spec_of(rank, 4, false, rules, 2);
                _cleanup_(shard_plan_freep) ShardPlan *p = NULL;

                assert_int_equal(shard_plan(comp, &s, 256, &p, &err), 0);
                assert_true(p->tensors[0].split && p->tensors[0].nbytes == 0 && p->tensors[0].copy.height == 0);
                assert_int_equal(p->tensors[0].shape[0], 0);
                assert_true(p->tensors[1].split && p->tensors[1].nbytes == 0 && p->tensors[1].copy.height == 0);
                assert_int_equal(p->tensors[1].shape[0], 8);
                assert_int_equal(p->tensors[1].shape[1], 0);
                /* The scalar: whole, no shape, 8 bytes. */
                assert_false(p->tensors[2].split);
                assert_int_equal(p->tensors[2].ndim, 0);
                assert_null(p->tensors[2].shape);
                assert_int_equal(p->tensors[2].nbytes, 8);
                assert_int_equal(p->tensors[3].nbytes, 3);
                assert_int_equal(p->bytes, p->tensors[3].offset + 3);

                uint8_t *dst = calloc(1, p->bytes);
                assert_non_null(dst);
                shard_copy_host(p, bufs, dst, 0, p->n_tensors);
                const StHeader *h = comp->files[0].header;
                assert_memory_equal(dst + p->tensors[2].offset, f.buf + h->data_offset + h->tensors[2].begin, 8);
                assert_memory_equal(dst + p->tensors[3].offset, f.buf + h->data_offset + h->tensors[3].begin, 3);
                free(dst);
        }

        /* Without a spec: the plan of an unsharded device slab. */
        _cleanup_(shard_plan_freep) ShardPlan *p = NULL;
        assert_int_equal(shard_plan(comp, NULL, 256, &p, &err), 0);
        for (size_t i = 0; i < p->n_tensors; i++) {
                assert_false(p->tensors[i].split);
                assert_int_equal(p->tensors[i].nbytes, p->tensors[i].source->end - p->tensors[i].source->begin);
                assert_int_equal(p->tensors[i].offset % 256, 0);
        }
        free(f.buf);
}

static void test_spec_key(void **state) {
        ShardRule rules[] = { { (char *) "*.q_proj.weight", 0 }, { (char *) "*.o_proj.weight", 1 },
                              { (char *) "a b\\c", 0 } };
        ShardSpec s;
        char *k;

        k = shard_spec_key(NULL);
        assert_string_equal(k, "");
        free(k);
        s = spec_of(0, 1, true, NULL, 0);
        k = shard_spec_key(&s);
        assert_string_equal(k, "");
        free(k);
        s = spec_of(1, 4, true, rules, 2);
        k = shard_spec_key(&s);
        assert_string_equal(k, "rank 1/4 uneven *.q_proj.weight:0 *.o_proj.weight:1");
        free(k);
        s = spec_of(3, 8, false, rules, 3);
        k = shard_spec_key(&s);
        assert_string_equal(k, "rank 3/8 *.q_proj.weight:0 *.o_proj.weight:1 a\\x20b\\x5cc:0");
        free(k);
        /* Nothing is split without rules, or in a world of one. */
        s = spec_of(0, 2, false, NULL, 0);
        k = shard_spec_key(&s);
        assert_string_equal(k, "");
        free(k);
        s = spec_of(0, 1, false, rules, 2);
        k = shard_spec_key(&s);
        assert_string_equal(k, "");
        free(k);

        /* Tensors picked: with a split, and alone (world 1, or no rules). */
        char *stage[] = { (char *) "model.layers.[0-3].*", (char *) "lm head" };
        s = spec_of(1, 4, false, rules, 1);
        s.tensors = stage;
        s.n_tensors = 2;
        k = shard_spec_key(&s);
        assert_string_equal(k, "rank 1/4 *.q_proj.weight:0 tensors model.layers.[0-3].* lm\\x20head");
        free(k);
        assert_false(shard_spec_empty(&s));
        s = spec_of(0, 1, false, rules, 2);
        s.tensors = stage;
        s.n_tensors = 1;
        k = shard_spec_key(&s);
        assert_string_equal(k, "tensors model.layers.[0-3].*");
        free(k);
        s.n_tensors = 0;
        assert_true(shard_spec_empty(&s));
        assert_true(shard_spec_empty(NULL));

        /* A deep copy has the same key and owns its strings. */
        _cleanup_(shard_spec_freep) ShardSpec *copy = NULL;
        s = spec_of(2, 3, true, rules, 3);
        s.tensors = stage;
        s.n_tensors = 2;
        assert_int_equal(shard_spec_copy(&s, &copy), 0);
        assert_ptr_not_equal(copy->rules, rules);
        assert_ptr_not_equal(copy->rules[0].pattern, rules[0].pattern);
        assert_int_equal(copy->n_tensors, 2);
        assert_ptr_not_equal(copy->tensors[1], stage[1]);
        assert_string_equal(copy->tensors[1], stage[1]);
        k = shard_spec_key(copy);
        char *k2 = shard_spec_key(&s);
        assert_string_equal(k, k2);
        free(k);
        free(k2);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_every_dtype),
                cmocka_unit_test(test_multi_file_first_rule_wins),
                cmocka_unit_test(test_errors),
                cmocka_unit_test(test_empty_scalar_and_whole),
                cmocka_unit_test(test_spec_key),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
