/* Layout plans: where each tensor of a component goes in a derived buffer
 * (a sharded host slab, or a device slab), and the copy that puts it there.
 *
 * A plan covers a whole component: every tensor of every file, in file
 * order (files in the component's order, each by data offset).  Each tensor
 * gets a destination offset aligned to `align` bytes in one buffer of
 * plan->bytes bytes, and one 2-D copy from its file: `height` rows of
 * `width` bytes, `src_pitch` apart in the file and `dst_pitch` apart in the
 * buffer.  A whole tensor or a dimension-0 slice is one row; a dimension-1
 * slice of a [d0, d1, ...] tensor is d0 rows.  That is exactly what
 * cudaMemcpy2DAsync takes, and shard_copy_host() runs the same copies on the
 * CPU.
 *
 * Without a spec (or with world 1) every tensor is whole: the plan of an
 * unsharded device slab.  Pure functions of the component's headers: no
 * I/O, no global state. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "format/catalog.h"
#include "util/error.h"

typedef struct ShardRule {
        char *pattern; /* fnmatch(3) glob, no flags */
        unsigned dim;  /* 0 or 1 */
} ShardRule;

typedef struct ShardSpec {
        unsigned rank;
        unsigned world;
        bool uneven; /* allow sizes world does not divide: the first size % world ranks take one more */
        size_t n_rules;
        ShardRule *rules;
        /* Only the tensors whose name matches one of these globs (a
         * pipeline stage); none: every tensor. */
        size_t n_tensors;
        char **tensors;
} ShardSpec;

/* One 2-D copy: file bytes [src, ...) to buffer bytes [dst, ...).  src is an
 * offset in the tensor's file (the host slab), dst in the plan's buffer. */
typedef struct ShardCopy {
        uint64_t src;
        uint64_t dst;
        uint64_t width;     /* bytes per row */
        uint64_t height;    /* rows; 0 for an empty tensor */
        uint64_t src_pitch; /* bytes between rows in the file */
        uint64_t dst_pitch; /* bytes between rows in the buffer (== width) */
} ShardCopy;

typedef struct ShardTensor {
        const StTensor *source; /* in the component's header, which must outlive the plan */
        unsigned file;          /* index in Component.files */
        uint64_t offset;        /* in the buffer, a multiple of align */
        uint64_t nbytes;        /* this rank's bytes */
        unsigned ndim;
        uint64_t *shape;        /* this rank's shape (ndim entries); NULL for a scalar */
        bool split;             /* a rule matched and split it */
        unsigned dim;           /* when split */
        uint64_t start;         /* when split: the first index along dim */
        ShardCopy copy;
} ShardTensor;

typedef struct ShardPlan {
        uint64_t align;
        uint64_t bytes; /* the buffer's size: the end of the last tensor */
        size_t n_tensors;
        ShardTensor *tensors;
} ShardPlan;

/* Whether spec splits nothing and leaves nothing out: an ordinary load. */
bool shard_spec_empty(const ShardSpec *spec);

/* Plan the component's layout for spec (NULL: every tensor whole) with each
 * tensor at an offset aligned to align (a power of two).  Returns 0, or
 * WD_E_INVALID with err naming the file, the tensor and the rule: a rank
 * outside the world, a dim beyond a tensor's, a size world does not divide
 * (without uneven), a row of a sub-byte dtype that does not end on a byte;
 * or -ENOMEM. */
int shard_plan(const Component *comp, const ShardSpec *spec, uint64_t align, ShardPlan **ret, WdError *err);
/* (A spec with tensors plans those only, in file order, and is WD_E_INVALID
 * when none of the component's tensors matches.) */
ShardPlan *shard_plan_free(ShardPlan *p);
DEFINE_TRIVIAL_CLEANUP_FUNC(ShardPlan *, shard_plan_free);

/* Run tensors [first, first + n) of the plan on the CPU: files[i] is the
 * start of file i's bytes (its host slab), dst the plan's buffer. */
void shard_copy_host(const ShardPlan *p, const uint8_t *const *files, uint8_t *dst, size_t first, size_t n);

/* The canonical text of a spec, used as the cache variant and in listings:
 * "" for NULL or an empty spec, else e.g. "rank 1/4 uneven
 * *.q_proj.weight:0 *.o_proj.weight:1" (nothing of the rank when it splits
 * nothing), then " tensors PAT PAT" with tensors.  Returns NULL on out of
 * memory. */
char *shard_spec_key(const ShardSpec *spec);

/* Limits on a spec from a peer (a client, another node). */
#define SHARD_MAX_WORLD 65536u
#define SHARD_MAX_RULES 64u
#define SHARD_MAX_PATTERN 256u
/* fnmatch() backtracks over every '*': more than a few make a pattern that
 * can take very long on a long name. */
#define SHARD_MAX_STARS 4u
#define SHARD_MAX_TENSOR_PATTERNS 64u

/* Rule index of a spec from a peer: pattern (may be NULL) of 1 to
 * SHARD_MAX_PATTERN bytes without control bytes and with at most
 * SHARD_MAX_STARS '*', dim 0 or 1.  Returns 0 or WD_E_INVALID with err
 * saying which rule broke which limit. */
int shard_rule_check(size_t index, const char *pattern, unsigned dim, WdError *err);
/* The same limits for tensors[index] of a spec from a peer. */
int shard_tensors_check(size_t index, const char *pattern, WdError *err);

/* A spec from a peer's fields (a client's Shard, another node's part):
 * world in 1..SHARD_MAX_WORLD, rank below it, at most SHARD_MAX_RULES rules
 * and SHARD_MAX_TENSOR_PATTERNS tensors patterns (the counts are checked
 * before rules or tensors is read, so a caller may pass a count larger than
 * what it filled), each rule and pattern as shard_rule_check() and
 * shard_tensors_check() say.  *ret is an owned copy, or NULL for a spec
 * that splits nothing and picks nothing (an ordinary load).  Returns 0,
 * WD_E_INVALID with err naming the field and the limit, or -ENOMEM. */
int shard_spec_from_fields(unsigned rank, unsigned world, bool uneven, const ShardRule *rules, size_t n_rules,
                           char *const *tensors, size_t n_tensors, ShardSpec **ret, WdError *err);

/* Deep copy and free of a spec (the daemon keeps one per job). */
int shard_spec_copy(const ShardSpec *spec, ShardSpec **ret);
ShardSpec *shard_spec_free(ShardSpec *spec);
DEFINE_TRIVIAL_CLEANUP_FUNC(ShardSpec *, shard_spec_free);
