/* The layout planner for whole tensors only: the plan of an unsharded
 * device slab.  It stands in for store/shard.c (sharded delivery), which
 * implements the whole of store/shard.h and replaces this file as soon as
 * it is in the tree; until then a sharding is refused. */
#include <string.h>

#include "store/shard.h"

int shard_plan(const Component *comp, const ShardSpec *spec, uint64_t align, ShardPlan **ret, WdError *err) {
        _cleanup_(shard_plan_freep) ShardPlan *p = NULL;
        uint64_t off = 0;
        size_t t = 0;

        if (spec && (spec->world > 1 || spec->n_rules > 0))
                return wd_error_set(err, WD_E_UNSUPPORTED, "sharded delivery is not built into this daemon");
        p = calloc(1, sizeof(ShardPlan));
        if (!p)
                return wd_error_set(err, -ENOMEM, "out of memory");
        p->align = align;
        p->tensors = calloc(MAX(comp->n_tensors, 1), sizeof(ShardTensor));
        if (!p->tensors)
                return wd_error_set(err, -ENOMEM, "out of memory");
        for (size_t f = 0; f < comp->n_files; f++) {
                const StHeader *h = comp->files[f].header;

                for (size_t j = 0; j < h->n_tensors && t < comp->n_tensors; j++, t++) {
                        const StTensor *st = &h->tensors[j];
                        ShardTensor *x = &p->tensors[t];
                        uint64_t n = st->end - st->begin;

                        off = ALIGN_UP(off, align);
                        *x = (ShardTensor){
                                .source = st,
                                .file = (unsigned) f,
                                .offset = off,
                                .nbytes = n,
                                .ndim = st->ndim,
                                .shape = NULL,
                                .copy = { .src = h->data_offset + st->begin, .dst = off, .width = n,
                                          .height = n > 0 ? 1 : 0, .src_pitch = n, .dst_pitch = n },
                        };
                        if (st->ndim > 0) {
                                x->shape = malloc(st->ndim * sizeof(uint64_t));
                                if (!x->shape)
                                        return wd_error_set(err, -ENOMEM, "out of memory");
                                memcpy(x->shape, st->shape, st->ndim * sizeof(uint64_t));
                        }
                        p->n_tensors++;
                        off += n;
                }
        }
        p->bytes = off;
        *ret = TAKE_PTR(p);
        return 0;
}

ShardPlan *shard_plan_free(ShardPlan *p) {
        if (!p)
                return NULL;
        for (size_t i = 0; i < p->n_tensors; i++)
                free(p->tensors[i].shape);
        free(p->tensors);
        free(p);
        return NULL;
}

void shard_copy_host(const ShardPlan *p, const uint8_t *const *files, uint8_t *dst, size_t first, size_t n) {
        for (size_t i = first; i < first + n && i < p->n_tensors; i++) {
                const ShardCopy *k = &p->tensors[i].copy;

                for (uint64_t row = 0; row < k->height; row++)
                        memcpy(dst + k->dst + row * k->dst_pitch, files[p->tensors[i].file] + k->src + row * k->src_pitch,
                               k->width);
        }
}

char *shard_spec_key(const ShardSpec *spec) {
        return strdup("");
}

int shard_spec_copy(const ShardSpec *spec, ShardSpec **ret) {
        return -EOPNOTSUPP;
}

ShardSpec *shard_spec_free(ShardSpec *spec) {
        return NULL;
}
