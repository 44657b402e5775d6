/* The order of a device copy: which part of which planned tensor the host
 * slabs' filled bytes allow to copy next.
 *
 * Files are read front to back, so each file has a watermark: its bytes
 * [0, filled) are in its host slab.  A tensor whose copy is one row (a
 * whole tensor, a dimension-0 slice) is copied in pieces as its bytes
 * arrive, each piece at least piece_min bytes unless it ends the tensor; a
 * strided copy (a dimension-1 slice) waits until every row it reads is in.
 * Files advance independently, each through its tensors in plan order.
 *
 * Pure bookkeeping with no CUDA in it, so that the pipelining is tested on
 * the CPU (tests/unit/test-copy-sched.c runs the copies with memcpy under
 * random watermarks); gpu-cuda.c issues each step as cudaMemcpyAsync or
 * cudaMemcpy2DAsync.  One thread owns a CopySched. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "store/shard.h"

typedef struct CopyStep {
        size_t tensor; /* index in the plan */
        unsigned file;
        ShardCopy copy; /* a piece of the tensor's copy: src and dst moved, width cut; one row if cut */
} CopyStep;

typedef struct CopySched {
        const ShardPlan *plan;
        size_t n_files;
        uint64_t piece_min;
        size_t *first;     /* per file: its first tensor in the plan; n_files + 1 entries */
        size_t *cursor;    /* per file: the next tensor to copy */
        uint64_t *partial; /* per file: bytes of that tensor copied (one-row copies) */
} CopySched;

/* plan lists its tensors file by file, as shard_plan() makes it.  Returns 0
 * or -ENOMEM. */
int copy_sched_init(CopySched *s, const ShardPlan *plan, size_t n_files, uint64_t piece_min);
void copy_sched_deinit(CopySched *s);

/* The next step that filled (n_files watermarks) allows, advancing past it;
 * false when none does now. */
bool copy_sched_next(CopySched *s, const uint64_t *filled, CopyStep *ret);

/* Every tensor's copy has been handed out. */
bool copy_sched_done(const CopySched *s);

/* The bytes all steps move: the sum of width * height over the plan. */
uint64_t copy_sched_total(const CopySched *s);
