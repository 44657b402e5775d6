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
