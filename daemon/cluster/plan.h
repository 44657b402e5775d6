/* Plans: what every node of the cluster computes the same way from the same
 * inputs, so that a plan needs no more than the list of its sources to be
 * known everywhere (DESIGN.md, "Cluster").
 *
 * - The manifest of a component: its files in sorted order, each with its
 *   path, size, the digest of its header and its mtime, hashed.  Nodes whose
 *   views hash the same hold the same bytes.
 * - The coordinator of a component: the live node with the highest
 *   rendezvous hash of (component key, node name).
 * - The chunks: every file cut into chunk_size pieces, files in manifest
 *   order; chunk i of a plan is the same byte range on every node.
 * - The shares: the chunks split over the sources in balanced, contiguous,
 *   chunk-aligned shares by bytes; a chunk whose source is gone goes to the
 *   live source with the highest rendezvous hash of (chunk, source), so
 *   every node that knows the same live set agrees, whatever order it
 *   learnt of the failures in. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "format/catalog.h"
#include "store/shard.h"
#include "util/error.h"

#define PLAN_MANIFEST_SIZE 16u
#define PLAN_MAX_SOURCES 64u

typedef struct PlanManifest {
        uint8_t bytes[PLAN_MANIFEST_SIZE];
} PlanManifest;

/* The manifest hash of comp (paths as display names them: the absolute
 * path, the same on every node that mounts the storage at the same place).
 * Returns 0 or -ENOMEM. */
int plan_manifest(const Component *comp, PlanManifest *ret);
bool plan_manifest_equal(const PlanManifest *a, const PlanManifest *b);
/* 32 hex digits and a NUL. */
void plan_manifest_hex(const PlanManifest *m, char ret[2 * PLAN_MANIFEST_SIZE + 1]);

/* One file as the manifest sees it. */
typedef struct PlanFileView {
        const char *path; /* borrowed from the component */
        uint64_t size;
        int64_t mtime_sec;
        uint32_t mtime_nsec;
        uint8_t header[16]; /* XXH3-128 of the header bytes */
} PlanFileView;

/* comp's files in sorted path order (*ret freed by the caller; the paths
 * are comp's).  Returns 0 or -ENOMEM. */
int plan_file_views(const Component *comp, PlanFileView **ret);
/* How views a (this node's) and b (the plan's) differ, for a message that
 * names the file and the rule ("/m/x.safetensors: 1048576 bytes here,
 * 1048577 in the plan"); "" when they are the same. */
void plan_explain_mismatch(const PlanFileView *a, size_t na, const PlanFileView *b, size_t nb, char *buf,
                           size_t size);

/* The index (in names) of the coordinator for key among n names; n > 0. */
size_t plan_coordinator(const char *key, const char *const *names, size_t n);

typedef struct PlanChunk {
        size_t file;     /* index in comp->files */
        uint64_t offset; /* in the file: a multiple of chunk_size (plan_chunks()) or of the alignment */
        uint64_t length;
        uint64_t need;   /* plan_pieces(): bit i set when node i needs these bytes; else every bit */
} PlanChunk;

/* The chunks of comp: files in sorted path order, each cut at multiples of
 * chunk_size (> 0).  *ret is freed by the caller.  Returns 0 or -ENOMEM. */
int plan_chunks(const Component *comp, uint64_t chunk_size, PlanChunk **ret, size_t *ret_n);

/* The first owner of every chunk: an index < n_sources (> 0), balanced by
 * bytes, contiguous runs in chunk order. */
void plan_assign(const PlanChunk *chunks, size_t n_chunks, size_t n_sources, unsigned *ret_owner);

/* The owner of chunk index among sources (names, n) now that some are gone
 * (alive[i] false): its first owner if alive, else the alive source with the
 * highest rendezvous hash; -1 when none is alive. */
int plan_owner(size_t index, unsigned first_owner, const char *const *names, const bool *alive, size_t n);

/* ---- plans where each node needs only part of a component --------------
 *
 * A node of a plan may serve one shard of the component (a rank's slices,
 * store/shard.h) rather than all of it.  Then the plan moves pieces rather
 * than chunks: byte ranges each of which the same nodes need.  A range one
 * node needs is read by that node and crosses no link; a range several
 * need is read by one of them and sent to the others only. */

#define PLAN_MAX_PIECES (1u << 24)

/* The pieces of comp for n nodes (1..PLAN_MAX_SOURCES): specs[i] is what
 * node i serves, NULL for the whole component (every byte of its files,
 * headers too), else the bytes of its shard_plan() copies (tensor data
 * only).  Each node's byte ranges are rounded out to align (a power of
 * two; O_DIRECT's unit) and clamped to the file, then merged where they
 * touch: the fewest aligned reads that cover them (the rows of a
 * dimension-1 slice make one read when the gaps between them are under
 * align).  The pieces cover the union of those ranges and nothing else,
 * files in sorted path order and each by offset, cut at the multiples of
 * chunk_size (a multiple of align) and wherever the set of nodes that need
 * the bytes changes; need says which.  Pure: every node computes the same
 * pieces from the same component and specs.  Returns 0, WD_E_INVALID with
 * err naming the file, the tensor and the rule (a spec that does not fit
 * comp) or the limit (more than PLAN_MAX_PIECES pieces), or -ENOMEM. */
int plan_pieces(const Component *comp, const ShardSpec *const *specs, size_t n, uint64_t chunk_size, uint64_t align,
                PlanChunk **ret, size_t *ret_n, WdError *err);

/* The first reader of every piece (an index < n_nodes): the one node that
 * needs it, or, of the nodes that need it, the one with the fewest bytes
 * to read so far (ties to the lowest index), pieces in order, after the
 * pieces only one node needs were counted. */
void plan_assign_needed(const PlanChunk *chunks, size_t n_chunks, size_t n_nodes, unsigned *ret_owner);

/* plan_owner() among the nodes of need only: a piece whose reader is gone
 * goes to a live node that needs it; -1 when none is alive (the piece's
 * consumers are all gone). */
int plan_owner_needed(size_t index, unsigned first_owner, uint64_t need, const char *const *names, const bool *alive,
                      size_t n);
