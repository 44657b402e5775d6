/* Layout plans for derived buffers (sharded host slabs, device slabs): for
 * every tensor of a component, the first rule whose glob matches its name
 * decides whether it is split and along which dimension; the rank's part is
 * then one 2-D copy out of the tensor's file.
 *
 * The split of a dimension of size n over w ranks: n / w indices each, and
 * with uneven set the first n % w ranks take one more, so rank r starts at
 * r * (n / w) + min(r, n % w).  Splitting dimension d cuts the tensor into
 * rows of prod(shape[d+1..]) elements; those rows must be whole bytes (only
 * F4 and F6 can fail that).
 *
 * Everything that comes from a header goes through checked arithmetic: a
 * tensor with a zero dimension may have others whose product overflows. */

#include <fnmatch.h>
#include <stdio.h>
#include <string.h>

#include "store/shard.h"

/* How messages name a rule: "*.q_proj.weight:0", escaped and cut. */
static const char *rule_label(char *buf, size_t size, const ShardRule *rule) {
        char p[200];

        wd_escape(p, sizeof(p), rule->pattern, 150);
        snprintf(buf, size, "%s:%u", p, rule->dim);
        return buf;
}

static const ShardRule *rule_find(const ShardSpec *spec, const char *name) {
        for (size_t i = 0; i < spec->n_rules; i++)
                if (fnmatch(spec->rules[i].pattern, name, 0) == 0)
                        return &spec->rules[i];
        return NULL;
}

/* The product of shape[from..ndim); false on overflow. */
static bool shape_product(const uint64_t *shape, unsigned ndim, unsigned from, uint64_t *ret) {
        uint64_t n = 1;

        for (unsigned i = from; i < ndim; i++)
                if (__builtin_mul_overflow(n, shape[i], &n))
                        return false;
        *ret = n;
        return true;
}

ShardPlan *shard_plan_free(ShardPlan *p) {
        if (!p)
                return NULL;
        for (size_t i = 0; p->tensors && i < p->n_tensors; i++)
                free(p->tensors[i].shape);
        free(p->tensors);
        free(p);
        return NULL;
}

/* A whole tensor: one row of all its bytes. */
static void plan_whole(ShardTensor *t, uint64_t src) {
        uint64_t n = t->source->end - t->source->begin;

        t->nbytes = n;
        t->copy = (ShardCopy){
                .src = src,
                .width = n,
                .height = n > 0 ? 1 : 0,
                .src_pitch = n,
                .dst_pitch = n,
        };
}

/* The rank's part of t along rule->dim.  src is where the whole tensor
 * starts in its file. */
static int plan_split(ShardTensor *t, const ShardSpec *spec, const ShardRule *rule, uint64_t src,
                      const char *file, WdError *err) {
        const StTensor *st = t->source;
        unsigned dim = rule->dim, bits = dtype_bits(st->dtype);
        char name[300], label[300], shape[256];
        uint64_t size, base, extra, part, start, row_elems, row_bits, part_bytes, rows;

        wd_escape(name, sizeof(name), st->name, 200);
        rule_label(label, sizeof(label), rule);
        st_shape_format(shape, sizeof(shape), st->shape, st->ndim);

        if (dim >= st->ndim)
                return wd_error_set(err, WD_E_INVALID,
                                    "%s: tensor \"%s\": rule \"%s\": dim %u is beyond the tensor's %u dimensions "
                                    "(shape %s)",
                                    file, name, label, dim, st->ndim, shape);

        size = st->shape[dim];
        base = size / spec->world;
        extra = size % spec->world;
        if (extra != 0 && !spec->uneven)
                return wd_error_set(err, WD_E_INVALID,
                                    "%s: tensor \"%s\": rule \"%s\": dimension %u of shape %s is %llu, which world "
                                    "%u does not divide (ask for uneven splits to allow it)",
                                    file, name, label, dim, shape, (unsigned long long) size, spec->world);
        part = base + (spec->rank < extra ? 1 : 0);
        start = (uint64_t) spec->rank * base + MIN((uint64_t) spec->rank, extra);

        t->shape = calloc(st->ndim, sizeof(uint64_t));
        if (!t->shape)
                return wd_error_set(err, -ENOMEM, "out of memory");
        memcpy(t->shape, st->shape, st->ndim * sizeof(uint64_t));
        t->shape[dim] = part;
        t->split = true;
        t->dim = dim;
        t->start = start;

        if (st->n_elements == 0) {
                /* Empty, whatever the part: nothing to copy, and the other
                 * dimensions may be anything. */
                t->nbytes = 0;
                t->copy = (ShardCopy){ .src = src };
                return 0;
        }

        /* Non-empty: every product below is at most n_elements * 64 bits,
         * which the parser checked; still checked here. */
        if (!shape_product(st->shape, st->ndim, dim + 1, &row_elems) ||
            __builtin_mul_overflow(row_elems, (uint64_t) bits, &row_bits))
                return wd_error_set(err, WD_E_INVALID, "%s: tensor \"%s\": shape %s overflows 64 bits", file, name,
                                    shape);
        if (row_bits % 8 != 0)
                return wd_error_set(err, WD_E_INVALID,
                                    "%s: tensor \"%s\": rule \"%s\": a row of %s along dimension %u is %llu elements "
                                    "(%llu bits), not whole bytes",
                                    file, name, label, dtype_to_string(st->dtype), dim,
                                    (unsigned long long) row_elems, (unsigned long long) row_bits);
        row_bits /= 8; /* now bytes per index of dim */

        if (dim == 0) {
                if (__builtin_mul_overflow(part, row_bits, &part_bytes) ||
                    __builtin_mul_overflow(start, row_bits, &start) || __builtin_add_overflow(src, start, &src))
                        return wd_error_set(err, WD_E_INVALID, "%s: tensor \"%s\": offsets overflow 64 bits", file,
                                            name);
                t->nbytes = part_bytes;
                t->copy = (ShardCopy){
                        .src = src,
                        .width = part_bytes,
                        .height = part_bytes > 0 ? 1 : 0,
                        .src_pitch = part_bytes,
                        .dst_pitch = part_bytes,
                };
                return 0;
        }

        /* dim 1: shape[0] rows, each shape[1] * row_bits bytes in the file,
         * of which part * row_bits are this rank's. */
        uint64_t src_pitch, skip;

        rows = st->shape[0];
        if (__builtin_mul_overflow(size, row_bits, &src_pitch) ||
            __builtin_mul_overflow(part, row_bits, &part_bytes) || __builtin_mul_overflow(start, row_bits, &skip) ||
            __builtin_add_overflow(src, skip, &src) || __builtin_mul_overflow(part_bytes, rows, &t->nbytes))
                return wd_error_set(err, WD_E_INVALID, "%s: tensor \"%s\": offsets overflow 64 bits", file, name);
        t->copy = (ShardCopy){
                .src = src,
                .width = part_bytes,
                .height = part_bytes > 0 ? rows : 0,
                .src_pitch = src_pitch,
                .dst_pitch = part_bytes,
        };
        return 0;
}

static int spec_check(const ShardSpec *spec, WdError *err) {
        char label[300];

        if (spec->world == 0)
                return wd_error_set(err, WD_E_INVALID, "shard: world is 0, it must be at least 1");
        if (spec->rank >= spec->world)
                return wd_error_set(err, WD_E_INVALID, "shard: rank %u is not below world %u", spec->rank,
                                    spec->world);
        for (size_t i = 0; i < spec->n_rules; i++) {
                if (!spec->rules[i].pattern || spec->rules[i].pattern[0] == '\0')
                        return wd_error_set(err, WD_E_INVALID, "shard: rule %zu has an empty pattern", i);
                if (spec->rules[i].dim > 1)
                        return wd_error_set(err, WD_E_INVALID,
                                            "shard: rule \"%s\": dim %u, only dimensions 0 and 1 can be split",
                                            rule_label(label, sizeof(label), &spec->rules[i]), spec->rules[i].dim);
        }
        return 0;
}

bool shard_spec_empty(const ShardSpec *spec) {
        return !spec || ((spec->world <= 1 || spec->n_rules == 0) && spec->n_tensors == 0);
}

/* Whether spec delivers tensor name (no tensors: every one). */
static bool spec_takes(const ShardSpec *spec, const char *name) {
        if (!spec || spec->n_tensors == 0)
                return true;
        for (size_t i = 0; i < spec->n_tensors; i++)
                if (fnmatch(spec->tensors[i], name, 0) == 0)
                        return true;
        return false;
}

int shard_plan(const Component *comp, const ShardSpec *spec, uint64_t align, ShardPlan **ret, WdError *err) {
        _cleanup_(shard_plan_freep) ShardPlan *p = NULL;
        uint64_t cursor = 0;
        size_t k = 0, seen = 0;
        int r;

        if (align == 0 || (align & (align - 1)) != 0)
                return wd_error_set(err, WD_E_INVALID, "alignment %llu is not a power of two",
                                    (unsigned long long) align);
        if (spec) {
                r = spec_check(spec, err);
                if (r != 0)
                        return r;
        }

        p = calloc(1, sizeof(ShardPlan));
        if (!p)
                return wd_error_set(err, -ENOMEM, "out of memory");
        p->align = align;
        p->n_tensors = comp->n_tensors;
        p->tensors = calloc(MAX(comp->n_tensors, 1u), sizeof(ShardTensor));
        if (!p->tensors)
                return wd_error_set(err, -ENOMEM, "out of memory");

        for (size_t i = 0; i < comp->n_files; i++) {
                const CatalogFile *f = &comp->files[i];
                const StHeader *h = f->header;

                for (size_t j = 0; j < h->n_tensors; j++) {
                        const StTensor *st = &h->tensors[j];
                        const ShardRule *rule = NULL;
                        ShardTensor *t;
                        uint64_t src;

                        if (seen++ >= p->n_tensors)
                                return wd_error_set(err, WD_E_INVALID,
                                                    "%s: more tensors than the component counts (%zu)", f->display,
                                                    p->n_tensors);
                        if (!spec_takes(spec, st->name))
                                continue;
                        t = &p->tensors[k++];
                        *t = (ShardTensor){ .source = st, .file = (unsigned) i, .ndim = st->ndim };
                        if (__builtin_add_overflow(h->data_offset, st->begin, &src))
                                return wd_error_set(err, WD_E_INVALID, "%s: data offsets overflow 64 bits",
                                                    f->display);

                        /* world 1: every tensor whole, whatever the rules say. */
                        if (spec && spec->world > 1)
                                rule = rule_find(spec, st->name);
                        if (rule) {
                                r = plan_split(t, spec, rule, src, f->display, err);
                                if (r != 0)
                                        return r;
                        } else {
                                if (st->ndim > 0) {
                                        t->shape = calloc(st->ndim, sizeof(uint64_t));
                                        if (!t->shape)
                                                return wd_error_set(err, -ENOMEM, "out of memory");
                                        memcpy(t->shape, st->shape, st->ndim * sizeof(uint64_t));
                                }
                                plan_whole(t, src);
                        }

                        /* Align up, checked. */
                        uint64_t off;
                        if (__builtin_add_overflow(cursor, align - 1, &off))
                                return wd_error_set(err, WD_E_INVALID, "the plan's size overflows 64 bits");
                        off &= ~(align - 1);
                        t->offset = off;
                        t->copy.dst = off;
                        if (__builtin_add_overflow(off, t->nbytes, &cursor))
                                return wd_error_set(err, WD_E_INVALID, "the plan's size overflows 64 bits");
                }
        }
        if (seen != p->n_tensors)
                return wd_error_set(err, WD_E_INVALID, "the component counts %zu tensors, its files hold %zu",
                                    p->n_tensors, seen);
        if (k == 0 && spec && spec->n_tensors > 0) {
                char pat[200];

                wd_escape(pat, sizeof(pat), spec->tensors[0], 150);
                return wd_error_set(err, WD_E_INVALID, "%s: tensors: no tensor matches \"%s\"%s", comp->model, pat,
                                    spec->n_tensors > 1 ? " or the other patterns" : "");
        }
        p->n_tensors = k;
        p->bytes = cursor;
        *ret = TAKE_PTR(p);
        return 0;
}

void shard_copy_host(const ShardPlan *p, const uint8_t *const *files, uint8_t *dst, size_t first, size_t n) {
        for (size_t i = first; i < first + n && i < p->n_tensors; i++) {
                const ShardTensor *t = &p->tensors[i];
                const ShardCopy *c = &t->copy;
                const uint8_t *s = files[t->file] + c->src;
                uint8_t *d = dst + c->dst;

                if (c->width == 0)
                        continue;
                for (uint64_t row = 0; row < c->height; row++, s += c->src_pitch, d += c->dst_pitch)
                        memcpy(d, s, c->width);
        }
}

/* Append a pattern to the key with backslashes, spaces and every byte
 * outside printable ASCII as \xHH: the key stays one unambiguous line. */
static void key_put_pattern(FILE *f, const char *pattern) {
        for (const unsigned char *c = (const unsigned char *) pattern; *c; c++)
                if (*c <= ' ' || *c >= 0x7f || *c == '\\')
                        fprintf(f, "\\x%02x", *c);
                else
                        fputc(*c, f);
}

char *shard_spec_key(const ShardSpec *spec) {
        char *buf = NULL;
        size_t size = 0;
        FILE *f;

        if (shard_spec_empty(spec))
                return strdup("");
        f = open_memstream(&buf, &size);
        if (!f)
                return NULL;
        if (spec->world > 1 && spec->n_rules > 0) {
                fprintf(f, "rank %u/%u", spec->rank, spec->world);
                if (spec->uneven)
                        fputs(" uneven", f);
                for (size_t i = 0; i < spec->n_rules; i++) {
                        fputc(' ', f);
                        key_put_pattern(f, spec->rules[i].pattern);
                        fprintf(f, ":%u", spec->rules[i].dim);
                }
                if (spec->n_tensors > 0)
                        fputc(' ', f);
        }
        if (spec->n_tensors > 0)
                fputs("tensors", f);
        for (size_t i = 0; i < spec->n_tensors; i++) {
                fputc(' ', f);
                key_put_pattern(f, spec->tensors[i]);
        }
        if (ferror(f)) {
                fclose(f);
                free(buf);
                return NULL;
        }
        if (fclose(f) != 0) {
                free(buf);
                return NULL;
        }
        return buf;
}

static int pattern_check(const char *what, size_t i, const char *pattern, WdError *err) {
        unsigned stars = 0;
        size_t len;

        if (!pattern)
                return wd_error_set(err, WD_E_INVALID, "shard: %s %zu has no pattern", what, i);
        len = strnlen(pattern, SHARD_MAX_PATTERN + 1);
        if (len == 0 || len > SHARD_MAX_PATTERN)
                return wd_error_set(err, WD_E_INVALID, "shard: %s %zu: the pattern must have 1 to %u bytes", what, i,
                                    SHARD_MAX_PATTERN);
        for (size_t k = 0; k < len; k++) {
                unsigned char ch = (unsigned char) pattern[k];

                if (ch < 0x20 || ch == 0x7f)
                        return wd_error_set(err, WD_E_INVALID, "shard: %s %zu: the pattern has a control byte at %zu",
                                            what, i, k);
                stars += ch == '*';
        }
        if (stars > SHARD_MAX_STARS)
                return wd_error_set(err, WD_E_INVALID, "shard: %s %zu: %u '*' in the pattern, the limit is %u", what,
                                    i, stars, SHARD_MAX_STARS);
        return 0;
}

int shard_tensors_check(size_t i, const char *pattern, WdError *err) {
        if (i >= SHARD_MAX_TENSOR_PATTERNS)
                return wd_error_set(err, WD_E_INVALID, "shard: more than %u tensors patterns",
                                    SHARD_MAX_TENSOR_PATTERNS);
        return pattern_check("tensors pattern", i, pattern, err);
}

int shard_rule_check(size_t i, const char *pattern, unsigned dim, WdError *err) {
        int r = pattern_check("rule", i, pattern, err);

        if (r != 0)
                return r;
        if (dim > 1)
                return wd_error_set(err, WD_E_INVALID, "shard: rule %zu: dim %u, only dimensions 0 and 1 can be split",
                                    i, dim);
        return 0;
}

int shard_spec_from_fields(unsigned rank, unsigned world, bool uneven, const ShardRule *rules, size_t n_rules,
                           char *const *tensors, size_t n_tensors, ShardSpec **ret, WdError *err) {
        ShardSpec view = { .rank = rank, .world = world, .uneven = uneven, .rules = (ShardRule *) rules,
                           .n_rules = n_rules, .tensors = (char **) tensors, .n_tensors = n_tensors };
        int r;

        if (world == 0 || world > SHARD_MAX_WORLD)
                return wd_error_set(err, WD_E_INVALID, "shard: world %u is not in 1..%u", world, SHARD_MAX_WORLD);
        if (rank >= world)
                return wd_error_set(err, WD_E_INVALID, "shard: rank %u is not below world %u", rank, world);
        if (n_rules > SHARD_MAX_RULES)
                return wd_error_set(err, WD_E_INVALID, "shard: %zu rules, more than the limit of %u", n_rules,
                                    SHARD_MAX_RULES);
        if (n_tensors > SHARD_MAX_TENSOR_PATTERNS)
                return wd_error_set(err, WD_E_INVALID, "shard: %zu tensors patterns, more than the limit of %u",
                                    n_tensors, SHARD_MAX_TENSOR_PATTERNS);
        for (size_t i = 0; i < n_rules; i++) {
                r = shard_rule_check(i, rules[i].pattern, rules[i].dim, err);
                if (r != 0)
                        return r;
        }
        for (size_t i = 0; i < n_tensors; i++) {
                r = shard_tensors_check(i, tensors[i], err);
                if (r != 0)
                        return r;
        }
        /* Nothing split and nothing picked: an ordinary load, served from
         * the whole entry rather than a copy of it. */
        if (shard_spec_empty(&view)) {
                *ret = NULL;
                return 0;
        }
        r = shard_spec_copy(&view, ret);
        if (r < 0)
                return wd_error_set(err, r, "out of memory");
        return 0;
}

ShardSpec *shard_spec_free(ShardSpec *spec) {
        if (!spec)
                return NULL;
        for (size_t i = 0; spec->rules && i < spec->n_rules; i++)
                free(spec->rules[i].pattern);
        free(spec->rules);
        for (size_t i = 0; spec->tensors && i < spec->n_tensors; i++)
                free(spec->tensors[i]);
        free(spec->tensors);
        free(spec);
        return NULL;
}

int shard_spec_copy(const ShardSpec *spec, ShardSpec **ret) {
        _cleanup_(shard_spec_freep) ShardSpec *s = calloc(1, sizeof(ShardSpec));

        if (!s)
                return -ENOMEM;
        s->rank = spec->rank;
        s->world = spec->world;
        s->uneven = spec->uneven;
        s->rules = calloc(MAX(spec->n_rules, 1u), sizeof(ShardRule));
        if (!s->rules)
                return -ENOMEM;
        for (size_t i = 0; i < spec->n_rules; i++) {
                s->rules[i].pattern = strdup(spec->rules[i].pattern);
                if (!s->rules[i].pattern)
                        return -ENOMEM;
                s->rules[i].dim = spec->rules[i].dim;
                s->n_rules = i + 1;
        }
        s->tensors = calloc(MAX(spec->n_tensors, 1u), sizeof(char *));
        if (!s->tensors)
                return -ENOMEM;
        for (size_t i = 0; i < spec->n_tensors; i++) {
                s->tensors[i] = strdup(spec->tensors[i]);
                if (!s->tensors[i])
                        return -ENOMEM;
                s->n_tensors = i + 1;
        }
        *ret = TAKE_PTR(s);
        return 0;
}
