/* Plans: manifests, coordinators, chunks and shares (plan.h). */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define XXH_STATIC_LINKING_ONLY /* XXH3_state_t on the stack */
#include <xxhash.h>

#include "cluster/plan.h"

static int compare_display(const void *a, const void *b, void *userdata) {
        const Component *comp = userdata;
        size_t i = *(const size_t *) a, j = *(const size_t *) b;

        return strcmp(comp->files[i].display, comp->files[j].display);
}

/* comp's file indexes in sorted path order; NULL when out of memory. */
static size_t *sorted_files(const Component *comp) {
        size_t *order = calloc(comp->n_files ? comp->n_files : 1, sizeof(size_t));

        if (!order)
                return NULL;
        for (size_t i = 0; i < comp->n_files; i++)
                order[i] = i;
        qsort_r(order, comp->n_files, sizeof(size_t), compare_display, (void *) comp);
        return order;
}

static void hash_u64(XXH3_state_t *s, uint64_t v) {
        uint8_t b[8];

        for (unsigned i = 0; i < 8; i++)
                b[i] = (uint8_t) (v >> (8 * i));
        XXH3_128bits_update(s, b, sizeof(b));
}

int plan_file_views(const Component *comp, PlanFileView **ret) {
        _cleanup_free_ size_t *order = sorted_files(comp);
        PlanFileView *v;

        v = calloc(comp->n_files ? comp->n_files : 1, sizeof(PlanFileView));
        if (!order || !v) {
                free(v);
                return -ENOMEM;
        }
        for (size_t k = 0; k < comp->n_files; k++) {
                const CatalogFile *f = &comp->files[order[k]];
                XXH128_canonical_t h;

                XXH128_canonicalFromHash(&h, XXH3_128bits(f->header->raw, f->header->data_offset));
                v[k] = (PlanFileView){
                        .path = f->display,
                        .size = f->id.size,
                        .mtime_sec = f->id.mtime.tv_sec,
                        .mtime_nsec = (uint32_t) f->id.mtime.tv_nsec,
                };
                memcpy(v[k].header, h.digest, sizeof(v[k].header));
        }
        *ret = v;
        return 0;
}

int plan_manifest(const Component *comp, PlanManifest *ret) {
        _cleanup_free_ PlanFileView *v = NULL;
        XXH128_canonical_t c;
        XXH3_state_t s;
        int r;

        r = plan_file_views(comp, &v);
        if (r < 0)
                return r;
        XXH3_128bits_reset(&s);
        hash_u64(&s, comp->n_files);
        for (size_t k = 0; k < comp->n_files; k++) {
                XXH3_128bits_update(&s, v[k].path, strlen(v[k].path) + 1);
                hash_u64(&s, v[k].size);
                XXH3_128bits_update(&s, v[k].header, sizeof(v[k].header));
                hash_u64(&s, (uint64_t) v[k].mtime_sec);
                hash_u64(&s, v[k].mtime_nsec);
        }
        XXH128_canonicalFromHash(&c, XXH3_128bits_digest(&s));
        memcpy(ret->bytes, c.digest, PLAN_MANIFEST_SIZE);
        return 0;
}

void plan_explain_mismatch(const PlanFileView *a, size_t na, const PlanFileView *b, size_t nb, char *buf,
                           size_t size) {
        size_t i = 0, j = 0;

        *buf = '\0';
        while (i < na || j < nb) {
                int cmp = i >= na ? 1 : j >= nb ? -1 : strcmp(a[i].path, b[j].path);

                if (cmp < 0) {
                        snprintf(buf, size, "%s: a file here that the plan does not have", a[i].path);
                        return;
                }
                if (cmp > 0) {
                        snprintf(buf, size, "%s: in the plan, missing here", b[j].path);
                        return;
                }
                if (a[i].size != b[j].size) {
                        snprintf(buf, size, "%s: %" PRIu64 " bytes here, %" PRIu64 " in the plan", a[i].path,
                                 a[i].size, b[j].size);
                        return;
                }
                if (memcmp(a[i].header, b[j].header, sizeof(a[i].header)) != 0) {
                        snprintf(buf, size, "%s: its header differs from the plan's", a[i].path);
                        return;
                }
                if (a[i].mtime_sec != b[j].mtime_sec || a[i].mtime_nsec != b[j].mtime_nsec) {
                        snprintf(buf, size,
                                 "%s: modified at %" PRId64 ".%09" PRIu32 " here, %" PRId64 ".%09" PRIu32
                                 " in the plan (size and header equal)",
                                 a[i].path, a[i].mtime_sec, a[i].mtime_nsec, b[j].mtime_sec, b[j].mtime_nsec);
                        return;
                }
                i++;
                j++;
        }
}

bool plan_manifest_equal(const PlanManifest *a, const PlanManifest *b) {
        return memcmp(a->bytes, b->bytes, PLAN_MANIFEST_SIZE) == 0;
}

void plan_manifest_hex(const PlanManifest *m, char ret[2 * PLAN_MANIFEST_SIZE + 1]) {
        static const char hex[] = "0123456789abcdef";

        for (unsigned i = 0; i < PLAN_MANIFEST_SIZE; i++) {
                ret[2 * i] = hex[m->bytes[i] >> 4];
                ret[2 * i + 1] = hex[m->bytes[i] & 15];
        }
        ret[2 * PLAN_MANIFEST_SIZE] = '\0';
}

static uint64_t rendezvous(const void *key, size_t key_len, const char *name) {
        XXH3_state_t s;

        XXH3_64bits_reset(&s);
        XXH3_64bits_update(&s, key, key_len);
        XXH3_64bits_update(&s, "", 1);
        XXH3_64bits_update(&s, name, strlen(name));
        return XXH3_64bits_digest(&s);
}

size_t plan_coordinator(const char *key, const char *const *names, size_t n) {
        size_t best = 0;
        uint64_t best_h = 0;

        for (size_t i = 0; i < n; i++) {
                uint64_t h = rendezvous(key, strlen(key), names[i]);

                /* Ties (never in practice) go to the smaller name. */
                if (i == 0 || h > best_h || (h == best_h && strcmp(names[i], names[best]) < 0)) {
                        best = i;
                        best_h = h;
                }
        }
        return best;
}

int plan_chunks(const Component *comp, uint64_t chunk_size, PlanChunk **ret, size_t *ret_n) {
        _cleanup_free_ size_t *order = sorted_files(comp);
        _cleanup_free_ PlanChunk *chunks = NULL;
        size_t n = 0, k = 0;

        if (!order || chunk_size == 0)
                return -ENOMEM;
        for (size_t i = 0; i < comp->n_files; i++)
                n += (size_t) ((comp->files[i].id.size + chunk_size - 1) / chunk_size);
        chunks = calloc(n ? n : 1, sizeof(PlanChunk));
        if (!chunks)
                return -ENOMEM;
        for (size_t o = 0; o < comp->n_files; o++) {
                size_t i = order[o];
                uint64_t size = comp->files[i].id.size;

                for (uint64_t off = 0; off < size; off += chunk_size)
                        chunks[k++] = (PlanChunk){
                                .file = i,
                                .offset = off,
                                .length = size - off < chunk_size ? size - off : chunk_size,
                                .need = UINT64_MAX,
                        };
        }
        *ret = TAKE_PTR(chunks);
        *ret_n = n;
        return 0;
}

void plan_assign(const PlanChunk *chunks, size_t n_chunks, size_t n_sources, unsigned *ret_owner) {
        uint64_t total = 0, before = 0;

        for (size_t c = 0; c < n_chunks; c++)
                total += chunks[c].length;
        for (size_t c = 0; c < n_chunks; c++) {
                /* The share whose byte range holds the chunk's middle. */
                uint64_t mid = before + chunks[c].length / 2;
                unsigned __int128 owner = total ? (unsigned __int128) mid * n_sources / total : 0;

                ret_owner[c] = owner < n_sources ? (unsigned) owner : (unsigned) n_sources - 1;
                before += chunks[c].length;
        }
}

int plan_owner(size_t index, unsigned first_owner, const char *const *names, const bool *alive, size_t n) {
        uint64_t key = index, best_h = 0;
        int best = -1;

        if (first_owner < n && alive[first_owner])
                return (int) first_owner;
        for (size_t i = 0; i < n; i++) {
                uint64_t h;

                if (!alive[i])
                        continue;
                h = rendezvous(&key, sizeof(key), names[i]);
                if (best < 0 || h > best_h) {
                        best = (int) i;
                        best_h = h;
                }
        }
        return best;
}

int plan_owner_needed(size_t index, unsigned first_owner, uint64_t need, const char *const *names, const bool *alive,
                      size_t n) {
        bool among[PLAN_MAX_SOURCES];

        if (n > PLAN_MAX_SOURCES)
                return -1;
        for (size_t i = 0; i < n; i++)
                among[i] = alive[i] && (need >> i & 1);
        return plan_owner(index, first_owner, names, among, n);
}

/* ---- pieces ------------------------------------------------------------- */

typedef struct Range {
        uint64_t begin, end;
} Range;

/* One node's ranges in one file, appended in any order, then sorted and
 * merged. */
typedef struct RangeList {
        Range *r;
        size_t n, size;
} RangeList;

static int range_add(RangeList *l, uint64_t begin, uint64_t end, uint64_t align, uint64_t file_size) {
        if (begin >= end)
                return 0;
        begin &= ~(align - 1);
        end = (end + align - 1) & ~(align - 1);
        if (end > file_size)
                end = file_size;
        if (l->n > 0 && l->r[l->n - 1].end >= begin && l->r[l->n - 1].begin <= begin) {
                /* Rows in order: most ranges extend the last one. */
                if (end > l->r[l->n - 1].end)
                        l->r[l->n - 1].end = end;
                return 0;
        }
        if (l->n == l->size) {
                size_t size = l->size ? 2 * l->size : 16;
                Range *r = realloc(l->r, size * sizeof(Range));

                if (!r)
                        return -ENOMEM;
                l->r = r;
                l->size = size;
        }
        l->r[l->n++] = (Range){ begin, end };
        return 0;
}

static int compare_range(const void *a, const void *b) {
        const Range *x = a, *y = b;

        return x->begin < y->begin ? -1 : x->begin > y->begin ? 1 : 0;
}

static void range_merge(RangeList *l) {
        size_t k = 0;

        if (l->n == 0)
                return;
        qsort(l->r, l->n, sizeof(Range), compare_range);
        for (size_t i = 0; i < l->n; i++) {
                if (k > 0 && l->r[i].begin <= l->r[k - 1].end) {
                        if (l->r[i].end > l->r[k - 1].end)
                                l->r[k - 1].end = l->r[i].end;
                        continue;
                }
                l->r[k++] = l->r[i];
        }
        l->n = k;
}

/* The ranges of file of node's shard plan sp (NULL: the whole file). */
static int node_ranges(const Component *comp, const ShardPlan *sp, size_t file, uint64_t align, RangeList *ret) {
        uint64_t size = comp->files[file].id.size;
        int r;

        if (!sp)
                return range_add(ret, 0, size, align, size);
        for (size_t k = 0; k < sp->n_tensors; k++) {
                const ShardTensor *t = &sp->tensors[k];
                const ShardCopy *c = &t->copy;

                if (t->file != file || c->width == 0 || c->height == 0)
                        continue;
                /* Gaps under align between rows: one read covers them all
                 * (their aligned ranges touch). */
                if (c->height == 1 || c->src_pitch - c->width < align) {
                        r = range_add(ret, c->src, c->src + (c->height - 1) * c->src_pitch + c->width, align, size);
                        if (r < 0)
                                return r;
                        continue;
                }
                for (uint64_t row = 0; row < c->height; row++) {
                        uint64_t b = c->src + row * c->src_pitch;

                        r = range_add(ret, b, b + c->width, align, size);
                        if (r < 0)
                                return r;
                }
        }
        range_merge(ret);
        return 0;
}

static int compare_u64(const void *a, const void *b) {
        uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;

        return x < y ? -1 : x > y ? 1 : 0;
}

/* Append file's pieces for the n nodes' ranges l[]. */
static int file_pieces(size_t file, uint64_t size, RangeList *l, size_t n, uint64_t chunk_size, PlanChunk **chunks,
                       size_t *n_chunks, size_t *cap, WdError *err, const char *display) {
        _cleanup_free_ uint64_t *cuts = NULL;
        _cleanup_free_ size_t *next = NULL;
        size_t n_cuts = 0, total = 0, k = 0;

        for (size_t i = 0; i < n; i++)
                total += 2 * l[i].n;
        if (total == 0)
                return 0;
        cuts = malloc(total * sizeof(uint64_t));
        next = calloc(n, sizeof(size_t));
        if (!cuts || !next)
                return wd_error_set(err, -ENOMEM, "out of memory");
        for (size_t i = 0; i < n; i++)
                for (size_t j = 0; j < l[i].n; j++) {
                        cuts[n_cuts++] = l[i].r[j].begin;
                        cuts[n_cuts++] = l[i].r[j].end;
                }
        qsort(cuts, n_cuts, sizeof(uint64_t), compare_u64);
        for (size_t j = 0; j < n_cuts; j++)
                if (k == 0 || cuts[j] != cuts[k - 1])
                        cuts[k++] = cuts[j];
        n_cuts = k;

        /* Between two cuts the set of nodes is the same; split at chunk_size. */
        for (size_t j = 0; j + 1 < n_cuts; j++) {
                uint64_t begin = cuts[j], end = cuts[j + 1], need = 0;

                for (size_t i = 0; i < n; i++) {
                        while (next[i] < l[i].n && l[i].r[next[i]].end <= begin)
                                next[i]++;
                        if (next[i] < l[i].n && l[i].r[next[i]].begin <= begin)
                                need |= UINT64_C(1) << i;
                }
                if (need == 0)
                        continue;
                while (begin < end) {
                        uint64_t stop = (begin / chunk_size + 1) * chunk_size;

                        if (stop > end)
                                stop = end;
                        if (*n_chunks == *cap) {
                                size_t c2 = *cap ? 2 * *cap : 64;
                                PlanChunk *p;

                                if (*n_chunks >= PLAN_MAX_PIECES)
                                        return wd_error_set(err, WD_E_INVALID,
                                                            "%s: the plan needs more than %u pieces (shards cut the "
                                                            "files too finely)",
                                                            display, PLAN_MAX_PIECES);
                                p = realloc(*chunks, c2 * sizeof(PlanChunk));
                                if (!p)
                                        return wd_error_set(err, -ENOMEM, "out of memory");
                                *chunks = p;
                                *cap = c2;
                        }
                        (*chunks)[(*n_chunks)++] = (PlanChunk){
                                .file = file, .offset = begin, .length = stop - begin, .need = need
                        };
                        begin = stop;
                }
        }
        (void) size;
        return 0;
}

int plan_pieces(const Component *comp, const ShardSpec *const *specs, size_t n, uint64_t chunk_size, uint64_t align,
                PlanChunk **ret, size_t *ret_n, WdError *err) {
        _cleanup_free_ size_t *order = sorted_files(comp);
        _cleanup_free_ ShardPlan **plans = NULL;
        _cleanup_free_ RangeList *lists = NULL;
        _cleanup_free_ PlanChunk *chunks = NULL;
        size_t n_chunks = 0, cap = 0;
        int r = 0;

        if (n == 0 || n > PLAN_MAX_SOURCES)
                return wd_error_set(err, WD_E_INVALID, "a plan has 1 to %u nodes, not %zu", PLAN_MAX_SOURCES, n);
        if (align == 0 || (align & (align - 1)) != 0 || chunk_size == 0 || chunk_size % align != 0)
                return wd_error_set(err, WD_E_INVALID, "chunk size %" PRIu64 " is not a multiple of the alignment %" PRIu64,
                                    chunk_size, align);
        plans = calloc(n, sizeof(ShardPlan *));
        lists = calloc(n, sizeof(RangeList));
        if (!order || !plans || !lists)
                return wd_error_set(err, -ENOMEM, "out of memory");
        for (size_t i = 0; i < n && r == 0; i++)
                if (specs[i])
                        r = shard_plan(comp, specs[i], 1, &plans[i], err);
        for (size_t o = 0; o < comp->n_files && r == 0; o++) {
                size_t f = order[o];

                for (size_t i = 0; i < n && r == 0; i++) {
                        lists[i].n = 0;
                        r = node_ranges(comp, plans[i], f, align, &lists[i]);
                        if (r < 0)
                                wd_error_set(err, r, "out of memory");
                }
                if (r == 0)
                        r = file_pieces(f, comp->files[f].id.size, lists, n, chunk_size, &chunks, &n_chunks, &cap, err,
                                        comp->files[f].display);
        }
        for (size_t i = 0; i < n; i++) {
                shard_plan_free(plans[i]);
                free(lists[i].r);
        }
        if (r != 0)
                return r;
        *ret = TAKE_PTR(chunks);
        *ret_n = n_chunks;
        return 0;
}

void plan_assign_needed(const PlanChunk *chunks, size_t n_chunks, size_t n_nodes, unsigned *ret_owner) {
        uint64_t load[PLAN_MAX_SOURCES] = {};

        for (size_t c = 0; c < n_chunks; c++)
                if (chunks[c].need && (chunks[c].need & (chunks[c].need - 1)) == 0) {
                        ret_owner[c] = (unsigned) __builtin_ctzll(chunks[c].need);
                        if (ret_owner[c] < PLAN_MAX_SOURCES)
                                load[ret_owner[c]] += chunks[c].length;
                }
        for (size_t c = 0; c < n_chunks; c++) {
                uint64_t need = chunks[c].need;
                int best = -1;

                if (need && (need & (need - 1)) == 0)
                        continue;
                for (size_t i = 0; i < n_nodes && i < PLAN_MAX_SOURCES; i++)
                        if ((need >> i & 1) && (best < 0 || load[i] < load[best]))
                                best = (int) i;
                if (best < 0)
                        best = 0; /* needed by nobody: not a piece plan_pieces() makes */
                ret_owner[c] = (unsigned) best;
                load[best] += chunks[c].length;
        }
}
