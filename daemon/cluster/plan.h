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
        uint64_t offset; /* in the file, a multiple of chunk_size */
        uint64_t length;
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
