/* Device copy order: a cursor per file over the plan's tensors, and for a
 * one-row copy the bytes of it already handed out.  See copy-sched.h. */
#include <errno.h>
#include <stdlib.h>

#include "gpu/copy-sched.h"
#include "macro.h"

int copy_sched_init(CopySched *s, const ShardPlan *plan, size_t n_files, uint64_t piece_min) {
        *s = (CopySched){ .plan = plan, .n_files = n_files, .piece_min = MAX(piece_min, 1u) };
        s->first = calloc(n_files + 1, sizeof(size_t));
        s->cursor = calloc(MAX(n_files, 1u), sizeof(size_t));
        s->partial = calloc(MAX(n_files, 1u), sizeof(uint64_t));
        if (!s->first || !s->cursor || !s->partial) {
                copy_sched_deinit(s);
                return -ENOMEM;
        }
        /* The plan lists tensors file by file: find where each file starts. */
        for (size_t t = 0, f = 0; f <= n_files; f++) {
                while (t < plan->n_tensors && plan->tensors[t].file < f)
                        t++;
                s->first[f] = t;
        }
        for (size_t f = 0; f < n_files; f++)
                s->cursor[f] = s->first[f];
        return 0;
}

void copy_sched_deinit(CopySched *s) {
        free(s->first);
        free(s->cursor);
        free(s->partial);
        *s = (CopySched){};
}

/* Where the bytes of its file that a copy reads end. */
static uint64_t src_end(const ShardCopy *k) {
        return k->src + (k->height - 1) * k->src_pitch + k->width;
}

/* The next step of file f, or false. */
static bool file_next(CopySched *s, size_t f, uint64_t filled, CopyStep *ret) {
        while (s->cursor[f] < s->first[f + 1]) {
                size_t i = s->cursor[f];
                const ShardCopy *k = &s->plan->tensors[i].copy;

                if (k->height == 0 || k->width == 0) {
                        s->cursor[f]++;
                        continue;
                }
                if (k->height == 1) {
                        /* One row: what has arrived, in pieces. */
                        uint64_t from = k->src + s->partial[f], end = k->src + k->width, to = MIN(filled, end);

                        if (to <= from || (to < end && to - from < s->piece_min))
                                return false;
                        *ret = (CopyStep){
                                .tensor = i,
                                .file = (unsigned) f,
                                .copy = {
                                        .src = from,
                                        .dst = k->dst + s->partial[f],
                                        .width = to - from,
                                        .height = 1,
                                        .src_pitch = to - from,
                                        .dst_pitch = to - from,
                                },
                        };
                        if (to < end)
                                s->partial[f] += to - from;
                        else {
                                s->partial[f] = 0;
                                s->cursor[f]++;
                        }
                        return true;
                }
                if (src_end(k) > filled)
                        return false;
                *ret = (CopyStep){ .tensor = i, .file = (unsigned) f, .copy = *k };
                s->cursor[f]++;
                return true;
        }
        return false;
}

bool copy_sched_next(CopySched *s, const uint64_t *filled, CopyStep *ret) {
        for (size_t f = 0; f < s->n_files; f++)
                if (file_next(s, f, filled[f], ret))
                        return true;
        return false;
}

bool copy_sched_done(const CopySched *s) {
        for (size_t f = 0; f < s->n_files; f++)
                if (s->cursor[f] < s->first[f + 1])
                        return false;
        return true;
}

uint64_t copy_sched_total(const CopySched *s) {
        uint64_t n = 0;

        for (size_t t = 0; t < s->plan->n_tensors; t++)
                n += s->plan->tensors[t].copy.width * s->plan->tensors[t].copy.height;
        return n;
}
