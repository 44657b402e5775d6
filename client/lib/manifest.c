/* The manifest of a component: its files and tensors as the daemon describes
 * them in a LoadReply or TensorsReply.  Every field is checked before it is
 * used, because the daemon's reply decides where this process reads: slab
 * and fd indices in range, each tensor inside its file, the shape matching
 * the byte count for the dtypes we know, names unique, a shard's part
 * inside its tensor.  For a lease the slabs are mapped read-only and each
 * tensor points into its mapping.  A sharded load's reply has one derived
 * slab for the whole component and lists the component's files apart
 * (LoadReply.files): Tensor.slab indexes the slabs, Tensor.file the files.
 * The tensors come as Tensor messages or, from a daemon that knows
 * LoadRequest.compact_tensors, as the columns of a LoadReply.table: the
 * table's own rules are checked first, then each of its rows becomes the
 * same TensorRow a message does and passes the same checks.  The
 * manifest keeps the unpacked reply and points into it, so nothing is
 * copied; a hash table of the names serves wd_manifest_find() and finds
 * a name sent twice.  A reply of 100,000 tensors is checked and indexed in
 * one pass each: nothing is formatted unless a check fails. */

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "client-internal.h"

/* Bits per element of the safetensors dtypes; 0 for one we do not know,
 * whose byte count then goes unchecked. */
static unsigned dtype_bits(const char *dtype) {
        static const struct {
                const char *name;
                unsigned bits;
        } table[] = {
                { "BOOL", 8 },     { "U8", 8 },       { "I8", 8 },          { "F8_E4M3", 8 },
                { "F8_E5M2", 8 },  { "F8_E8M0", 8 },  { "F8_E4M3FNUZ", 8 }, { "F8_E5M2FNUZ", 8 },
                { "I16", 16 },     { "U16", 16 },     { "F16", 16 },        { "BF16", 16 },
                { "I32", 32 },     { "U32", 32 },     { "F32", 32 },        { "I64", 64 },
                { "U64", 64 },     { "F64", 64 },     { "C64", 64 },        { "F4", 4 },
                { "F6_E2M3", 6 },  { "F6_E3M2", 6 },
        };

        for (size_t i = 0; i < ELEMENTSOF(table); i++)
                if (table[i].name[0] == dtype[0] && strcmp(table[i].name, dtype) == 0)
                        return table[i].bits;
        return 0;
}

static void shape_format(char *buf, size_t size, const uint64_t *shape, size_t ndim) {
        size_t o = (size_t) snprintf(buf, size, "[");

        for (size_t i = 0; i < ndim && o < size; i++)
                o += (size_t) snprintf(buf + o, size - o, "%s%llu", i > 0 ? ", " : "", (unsigned long long) shape[i]);
        if (o < size)
                snprintf(buf + o, size - o, "]");
}

wd_manifest *manifest_free(wd_manifest *m) {
        if (!m)
                return NULL;
        for (size_t i = 0; m->slabs && i < m->n_slabs; i++) {
                if (m->slabs[i].map)
                        munmap(m->slabs[i].map, m->slabs[i].map_size);
                cuda_unmap(&m->slabs[i].cuda);
        }
        free(m->slabs);
        free(m->files);
        free(m->tensors);
        free(m->slots);
        client_envelope_free(m->env);
        free(m);
        return NULL;
}

static void manifest_freep(wd_manifest **m) {
        manifest_free(*m);
}

/* The file's name for messages. */
static void file_label(char *buf, size_t size, const PbSlab *s, size_t i) {
        if (s->file[0] != '\0')
                escape_string(buf, size, s->file, 200);
        else
                snprintf(buf, size, "slab %zu", i);
}

/* Check one slab's descriptor and map it: host memory read-only, a device
 * slab (device_uuid set) through the CUDA driver. */
static int file_map(ManifestFile *f, size_t i, int fd, wd_error *err) {
        const PbSlab *s = f->slab;
        char label[256];
        struct stat st;
        int seals;

        file_label(label, sizeof(label), s, i);
        if (s->size > s->map_size)
                return error_set(err, WD_PROTOCOL_ERROR, "daemon's manifest: %s: size %llu is over map_size %llu",
                                 label, (unsigned long long) s->size, (unsigned long long) s->map_size);
        if (s->map_size == 0)
                return error_set(err, WD_PROTOCOL_ERROR, "daemon's manifest: %s: map_size is 0", label);
        if (s->device_uuid[0] != '\0') {
                if (strlen(s->device_uuid) > 64)
                        return error_set(err, WD_PROTOCOL_ERROR, "daemon's manifest: %s: device_uuid is too long",
                                         label);
                return cuda_import(fd, s->device_uuid, s->map_size, &f->cuda, err);
        }
        if (fstat(fd, &st) < 0)
                return error_set(err, WD_INTERNAL, "%s: cannot stat the slab's descriptor: %s", label, strerror(errno));
        if (!S_ISREG(st.st_mode))
                return error_set(err, WD_PROTOCOL_ERROR, "daemon's manifest: %s: the descriptor is not a memory file",
                                 label);
        if (st.st_size < 0 || s->map_size > (uint64_t) st.st_size || s->map_size > SIZE_MAX)
                return error_set(err, WD_PROTOCOL_ERROR,
                                 "daemon's manifest: %s: map_size %llu is over the descriptor's size %lld", label,
                                 (unsigned long long) s->map_size, (long long) st.st_size);
        /* The daemon seals every slab against writes and growth, and sends a
         * read-only descriptor of a 0444 file: no other client can change or
         * shrink what we map.  (The daemon itself truncates a slab once
         * nobody leases it: touching a mapping after its lease ended may
         * raise SIGBUS.) */
        seals = fcntl(fd, F_GET_SEALS);
        if (seals < 0 || !(seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE)) || !(seals & F_SEAL_GROW))
                return error_set(err, WD_PROTOCOL_ERROR,
                                 "daemon's manifest: %s: the descriptor is not sealed against writes and growth",
                                 label);

        void *p = mmap(NULL, (size_t) s->map_size, PROT_READ, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED)
                return error_set(err, errno == ENOMEM ? WD_RESOURCE_EXHAUSTED : WD_INTERNAL,
                                 "%s: cannot map %llu bytes: %s", label, (unsigned long long) s->map_size,
                                 strerror(errno));
        f->map = p;
        f->map_size = (size_t) s->map_size;
        return WD_OK;
}

static int manifest_map(wd_manifest *m, const int *fds, wd_error *err) {
        _cleanup_free_ bool *seen = calloc(m->n_slabs ? m->n_slabs : 1, sizeof(bool));

        if (!seen)
                return error_set(err, WD_INTERNAL, "out of memory");
        for (size_t i = 0; i < m->n_slabs; i++) {
                uint32_t k = m->slabs[i].slab->fd_index;
                char label[256];

                file_label(label, sizeof(label), m->slabs[i].slab, i);
                if (k >= m->n_slabs || seen[k])
                        return error_set(err, WD_PROTOCOL_ERROR,
                                         "daemon's manifest: %s: fd_index %u is %s among %zu descriptors", label, k,
                                         k >= m->n_slabs ? "out of range" : "used twice", m->n_slabs);
                seen[k] = true;

                int r = file_map(&m->slabs[i], i, fds[k], err);
                if (r != WD_OK)
                        return r;
        }
        return WD_OK;
}

/* One tensor as the daemon described it, in either form of the reply (a
 * Tensor message, or a row of a TensorTable): the checks below see only
 * this, so both forms pass the same ones. */
typedef struct TensorRow {
        const char *name;
        const char *dtype;
        const uint64_t *shape;
        size_t n_shape;
        uint32_t slab, file;
        uint64_t offset, nbytes;
        const uint64_t *full_shape;
        size_t n_full_shape;
        uint32_t shard_dim;
        uint64_t shard_start;
} TensorRow;

/* A sharded tensor's part: full_shape has the same dimensions, differs
 * only along shard_dim, and the part lies inside it there. */
static int tensor_check_shard(const TensorRow *t, const char *label, const char *name, wd_error *err) {
        uint64_t end;

        if (t->n_full_shape == 0)
                return t->shard_dim == 0 && t->shard_start == 0
                               ? WD_OK
                               : error_set(err, WD_PROTOCOL_ERROR,
                                           "daemon's manifest: %s: tensor \"%s\": a shard position without full_shape",
                                           label, name);
        if (t->n_full_shape != t->n_shape || t->shard_dim >= t->n_shape)
                return error_set(err, WD_PROTOCOL_ERROR,
                                 "daemon's manifest: %s: tensor \"%s\": full_shape has %zu dimensions, shape %zu, "
                                 "shard_dim %u",
                                 label, name, t->n_full_shape, t->n_shape, t->shard_dim);
        for (size_t i = 0; i < t->n_shape; i++)
                if (i != t->shard_dim && t->shape[i] != t->full_shape[i])
                        return error_set(err, WD_PROTOCOL_ERROR,
                                         "daemon's manifest: %s: tensor \"%s\": shape and full_shape differ in "
                                         "dimension %zu, not the shard's %u",
                                         label, name, i, t->shard_dim);
        if (__builtin_add_overflow(t->shard_start, t->shape[t->shard_dim], &end) ||
            end > t->full_shape[t->shard_dim])
                return error_set(err, WD_PROTOCOL_ERROR,
                                 "daemon's manifest: %s: tensor \"%s\": part [%llu, +%llu) is outside dimension %u "
                                 "of size %llu",
                                 label, name, (unsigned long long) t->shard_start,
                                 (unsigned long long) t->shape[t->shard_dim], t->shard_dim,
                                 (unsigned long long) t->full_shape[t->shard_dim]);
        return WD_OK;
}

/* Whether t's shape of its dtype makes its nbytes (true for a dtype this
 * library does not know: the daemon's word for it).  Bits of the whole
 * tensor: a zero dimension makes it empty, however large the others. */
static bool shape_matches_bytes(const TensorRow *t) {
        unsigned bits = dtype_bits(t->dtype);
        unsigned __int128 n = bits;
        bool overflow = false;

        if (bits == 0)
                return true;
        for (size_t i = 0; i < t->n_shape && !overflow; i++)
                overflow = __builtin_mul_overflow(n, t->shape[i], &n);
        for (size_t i = 0; i < t->n_shape; i++)
                if (t->shape[i] == 0)
                        overflow = false, n = 0;
        return !overflow && n % 8 == 0 && n / 8 == t->nbytes;
}

/* The checks of one tensor, without a message: true when it passes. */
static bool tensor_ok(const wd_manifest *m, const TensorRow *t, bool derived) {
        uint64_t end;

        if (t->slab >= m->n_slabs || (derived && t->file >= m->n_files) || t->dtype[0] == '\0' ||
            __builtin_add_overflow(t->offset, t->nbytes, &end) || end > m->slabs[t->slab].slab->size ||
            t->n_shape > UINT_MAX)
                return false;
        if (t->n_full_shape > 0 || t->shard_dim != 0 || t->shard_start != 0)
                return false; /* tensor_check() looks at the shard's part */

        return shape_matches_bytes(t);
}

static int tensor_check(const wd_manifest *m, const TensorRow *t, bool derived, wd_error *err) {
        char name[256], label[256];
        int r;

        if (tensor_ok(m, t, derived))
                return WD_OK;
        escape_string(name, sizeof(name), t->name, 200);
        if (t->slab >= m->n_slabs)
                return error_set(err, WD_PROTOCOL_ERROR, "daemon's manifest: tensor \"%s\": slab %u is out of range (%zu %s)",
                                 name, t->slab, m->n_slabs, derived ? "slabs" : "files");
        if (derived && t->file >= m->n_files)
                return error_set(err, WD_PROTOCOL_ERROR,
                                 "daemon's manifest: tensor \"%s\": file %u is out of range (%zu files)", name, t->file,
                                 m->n_files);

        const PbSlab *s = m->slabs[t->slab].slab;
        uint64_t end;

        file_label(label, sizeof(label), s, t->slab);
        if (t->dtype[0] == '\0')
                return error_set(err, WD_PROTOCOL_ERROR, "daemon's manifest: %s: tensor \"%s\": no dtype", label, name);
        if (__builtin_add_overflow(t->offset, t->nbytes, &end) || end > s->size)
                return error_set(err, WD_PROTOCOL_ERROR,
                                 "daemon's manifest: %s: tensor \"%s\": %llu bytes at offset %llu end past the file's %llu bytes",
                                 label, name, (unsigned long long) t->nbytes, (unsigned long long) t->offset,
                                 (unsigned long long) s->size);
        if (t->n_shape > UINT_MAX)
                return error_set(err, WD_PROTOCOL_ERROR, "daemon's manifest: %s: tensor \"%s\": %zu dimensions", label,
                                 name, t->n_shape);
        r = tensor_check_shard(t, label, name, err);
        if (r != WD_OK)
                return r;

        if (!shape_matches_bytes(t)) {
                char shape[256], dtype[64];

                shape_format(shape, sizeof(shape), t->shape, t->n_shape);
                escape_string(dtype, sizeof(dtype), t->dtype, 32);
                return error_set(err, WD_PROTOCOL_ERROR,
                                 "daemon's manifest: %s: tensor \"%s\": shape %s of %s does not match %llu bytes", label,
                                 name, shape, dtype, (unsigned long long) t->nbytes);
        }
        return WD_OK;
}

/* Check tensor i and make it the manifest's entry i. */
static int manifest_put(wd_manifest *m, size_t i, const TensorRow *t, bool derived, wd_error *err) {
        int r = tensor_check(m, t, derived, err);

        if (r != WD_OK)
                return r;

        const ManifestFile *f = &m->slabs[t->slab];
        m->tensors[i] = (wd_tensor){
                .name = t->name,
                .dtype = t->dtype,
                .ndim = (unsigned) t->n_shape,
                .shape = t->n_shape > 0 ? t->shape : NULL,
                .nbytes = t->nbytes,
                .file = derived ? t->file : t->slab,
                .offset = t->offset,
                .data = f->map ? (const uint8_t *) f->map + t->offset : NULL,
                .full_shape = t->n_full_shape > 0 ? t->full_shape : NULL,
                .shard_dim = t->shard_dim,
                .shard_start = t->shard_start,
                .device = f->cuda.size > 0 ? f->cuda.device : -1,
                .device_ptr = f->cuda.size > 0 ? f->cuda.ptr + t->offset : 0,
        };
        return WD_OK;
}

/* The tensors of a LoadReply.tensors or TensorsReply.tensors. */
static int manifest_put_messages(wd_manifest *m, PbTensor *const *tensors, bool derived, wd_error *err) {
        for (size_t i = 0; i < m->n_tensors; i++) {
                const PbTensor *t = tensors[i];
                TensorRow row = {
                        .name = t->name,
                        .dtype = t->dtype,
                        .shape = t->shape,
                        .n_shape = t->n_shape,
                        .slab = t->slab,
                        .file = t->file,
                        .offset = t->offset,
                        .nbytes = t->nbytes,
                        .full_shape = t->full_shape,
                        .n_full_shape = t->n_full_shape,
                        .shard_dim = t->shard_dim,
                        .shard_start = t->shard_start,
                };
                int r = manifest_put(m, i, &row, derived, err);

                if (r != WD_OK)
                        return r;
        }
        return WD_OK;
}

/* The rules of a table's columns, before any row is read: each per-tensor
 * column has count entries (file: count where the reply lists its files,
 * else none), names holds count NUL-terminated names and nothing after
 * them, and ndim adds up to the length of dims. */
static int table_check(const PbTensorTable *t, bool derived, wd_error *err) {
        const struct {
                const char *column;
                size_t n;
        } columns[] = {
                { "dtype", t->dtype.len },   { "ndim", t->ndim.len },   { "offset", t->n_offset },
                { "nbytes", t->n_nbytes },   { "slab", t->n_slab },
        };
        size_t n_dims = 0;

        for (size_t i = 0; i < ELEMENTSOF(columns); i++)
                if (columns[i].n != t->count)
                        return error_set(err, WD_PROTOCOL_ERROR,
                                         "daemon's manifest: table: %s has %zu entries for count %u", columns[i].column,
                                         columns[i].n, t->count);
        if (t->n_file != (derived ? t->count : 0))
                return error_set(err, WD_PROTOCOL_ERROR,
                                 "daemon's manifest: table: file has %zu entries, %s", t->n_file,
                                 derived ? "one per tensor is required (the reply lists its files)"
                                         : "none is allowed (the reply lists no files apart from its slabs)");

        const char *p = t->names.len > 0 ? (const char *) t->names.data : "", *end = p + t->names.len;
        for (size_t i = 0; i < t->count; i++) {
                const char *nul = p < end ? memchr(p, '\0', (size_t) (end - p)) : NULL;

                if (!nul)
                        return error_set(err, WD_PROTOCOL_ERROR,
                                         "daemon's manifest: table: names holds %zu NUL-terminated names for count %u",
                                         i, t->count);
                p = nul + 1;
        }
        if (p != end)
                return error_set(err, WD_PROTOCOL_ERROR,
                                 "daemon's manifest: table: names has %zu bytes after the last of count %u names",
                                 (size_t) (end - p), t->count);
        for (size_t i = 0; i < t->count; i++)
                n_dims += t->ndim.data[i];
        if (n_dims != t->n_dims)
                return error_set(err, WD_PROTOCOL_ERROR,
                                 "daemon's manifest: table: ndim adds up to %zu dimensions, dims has %zu", n_dims,
                                 t->n_dims);
        return WD_OK;
}

/* The tensors of a LoadReply.table: its columns checked, then each row as
 * the message form's tensors.  Names and shapes point into the table. */
static int manifest_put_table(wd_manifest *m, const PbTensorTable *t, bool derived, wd_error *err) {
        const char *name = (const char *) t->names.data;
        size_t dim = 0;
        int r;

        r = table_check(t, derived, err);
        if (r != WD_OK)
                return r;
        for (size_t i = 0; i < t->count; i++) {
                uint8_t dtype = t->dtype.data[i], ndim = t->ndim.data[i];

                if (dtype >= t->n_dtypes) {
                        char label[256];

                        escape_string(label, sizeof(label), name, 200);
                        return error_set(err, WD_PROTOCOL_ERROR,
                                         "daemon's manifest: table: tensor \"%s\": dtype index %u is out of range "
                                         "(%zu dtypes)",
                                         label, dtype, t->n_dtypes);
                }

                TensorRow row = {
                        .name = name,
                        .dtype = t->dtypes[dtype],
                        .shape = ndim > 0 ? t->dims + dim : NULL,
                        .n_shape = ndim,
                        .slab = t->slab[i],
                        .file = derived ? t->file[i] : 0,
                        .offset = t->offset[i],
                        .nbytes = t->nbytes[i],
                };
                r = manifest_put(m, i, &row, derived, err);
                if (r != WD_OK)
                        return r;
                name += strlen(name) + 1;
                dim += ndim;
        }
        return WD_OK;
}

/* FNV-1a, 64 bits: names are short and the table is sized for them. */
static uint64_t name_hash(const char *s) {
        uint64_t h = 0xcbf29ce484222325ULL;

        for (; *s; s++)
                h = (h ^ (uint8_t) *s) * 0x100000001b3ULL;
        return h ^ (h >> 29);
}

static int manifest_index(wd_manifest *m, wd_error *err) {
        size_t n = 16;

        while (n < 2 * m->n_tensors)
                n *= 2;
        m->slots = calloc(n, sizeof(uint32_t));
        if (!m->slots)
                return error_set(err, WD_INTERNAL, "out of memory");
        m->n_slots = n;
        if (m->n_tensors >= UINT32_MAX)
                return error_set(err, WD_PROTOCOL_ERROR, "daemon's manifest: %zu tensors", m->n_tensors);
        for (size_t i = 0; i < m->n_tensors; i++) {
                const char *name = m->tensors[i].name;
                size_t k = name_hash(name) & (n - 1);

                for (; m->slots[k] != 0; k = (k + 1) & (n - 1))
                        if (strcmp(m->tensors[m->slots[k] - 1].name, name) == 0) {
                                char label[256];

                                escape_string(label, sizeof(label), name, 200);
                                return error_set(err, WD_PROTOCOL_ERROR,
                                                 "daemon's manifest: tensor \"%s\" appears twice", label);
                        }
                m->slots[k] = (uint32_t) i + 1;
        }
        return WD_OK;
}

int manifest_new(WireEnvelope **env, const char *model, const char *component, PbSlab *const *slabs, size_t n_slabs,
                 PbSlab *const *files, size_t n_files, uint64_t bytes, PbTensor *const *tensors, size_t n_tensors,
                 const PbTensorTable *table, const int *fds, wd_manifest **ret, wd_error *err) {
        _cleanup_(manifest_freep) wd_manifest *m = calloc(1, sizeof(*m));
        bool derived = n_files > 0;
        int r;

        if (!m)
                return error_set(err, WD_INTERNAL, "out of memory");
        if (table && n_tensors > 0)
                return error_set(err, WD_PROTOCOL_ERROR,
                                 "daemon's manifest: the reply has both a table and %zu tensor messages", n_tensors);
        if (table)
                n_tensors = table->count;
        m->model = model;
        m->component = component;
        m->n_slabs = n_slabs;
        m->n_files = derived ? n_files : n_slabs;
        m->n_tensors = n_tensors;
        m->slabs = calloc(n_slabs ? n_slabs : 1, sizeof(ManifestFile));
        m->files = calloc(m->n_files ? m->n_files : 1, sizeof(PbSlab *));
        m->tensors = calloc(n_tensors ? n_tensors : 1, sizeof(wd_tensor));
        if (!m->slabs || !m->files || !m->tensors)
                return error_set(err, WD_INTERNAL, "out of memory");

        for (size_t i = 0; i < n_slabs; i++) {
                m->slabs[i].slab = slabs[i];
                if (!derived) {
                        m->files[i] = slabs[i];
                        if (__builtin_add_overflow(m->bytes, slabs[i]->size, &m->bytes))
                                return error_set(err, WD_PROTOCOL_ERROR,
                                                 "daemon's manifest: file sizes overflow 64 bits");
                }
        }
        if (derived) {
                /* The daemon sends these without descriptors. */
                for (size_t i = 0; i < n_files; i++)
                        m->files[i] = files[i];
                m->bytes = bytes;
        }
        if (fds) {
                r = manifest_map(m, fds, err);
                if (r != WD_OK)
                        return r;
        }

        r = table ? manifest_put_table(m, table, derived, err) : manifest_put_messages(m, tensors, derived, err);
        if (r != WD_OK)
                return r;

        r = manifest_index(m, err);
        if (r != WD_OK)
                return r;

        m->env = TAKE_PTR(*env);
        *ret = TAKE_PTR(m);
        return WD_OK;
}

_public_ const char *wd_manifest_model(const wd_manifest *m) {
        return m ? m->model : NULL;
}

_public_ const char *wd_manifest_component(const wd_manifest *m) {
        return m ? m->component : NULL;
}

_public_ uint64_t wd_manifest_bytes(const wd_manifest *m) {
        return m ? m->bytes : 0;
}

_public_ size_t wd_manifest_n_tensors(const wd_manifest *m) {
        return m ? m->n_tensors : 0;
}

_public_ const wd_tensor *wd_manifest_tensor(const wd_manifest *m, size_t i) {
        if (!m || i >= m->n_tensors)
                return NULL;
        return &m->tensors[i];
}

_public_ const wd_tensor *wd_manifest_tensors(const wd_manifest *m) {
        return m && m->n_tensors > 0 ? m->tensors : NULL;
}

_public_ size_t wd_manifest_strings_size(const wd_manifest *m) {
        size_t n = 0;

        /* Each string is at most a frame long, so the sum cannot overflow. */
        for (size_t i = 0; m && i < m->n_tensors; i++)
                n += strlen(m->tensors[i].name) + 1 + strlen(m->tensors[i].dtype) + 1;
        return n;
}

_public_ int wd_manifest_strings(const wd_manifest *m, char *buf, size_t size) {
        if (!m || (size > 0 && !buf) || size < wd_manifest_strings_size(m))
                return WD_INVALID_ARGUMENT;

        char *p = buf;
        for (size_t i = 0; i < m->n_tensors; i++) {
                p = stpcpy(p, m->tensors[i].name) + 1;
                p = stpcpy(p, m->tensors[i].dtype) + 1;
        }
        return WD_OK;
}

_public_ size_t wd_manifest_names_size(const wd_manifest *m) {
        size_t n = 0;

        for (size_t i = 0; m && i < m->n_tensors; i++)
                n += strlen(m->tensors[i].name) + 1;
        return n;
}

_public_ int wd_manifest_names(const wd_manifest *m, char *buf, size_t size) {
        if (!m || (size > 0 && !buf) || size < wd_manifest_names_size(m))
                return WD_INVALID_ARGUMENT;

        char *p = buf;
        for (size_t i = 0; i < m->n_tensors; i++)
                p = stpcpy(p, m->tensors[i].name) + 1;
        return WD_OK;
}

_public_ int wd_manifest_dtype_codes(const wd_manifest *m, uint8_t *codes, size_t n, const char **dtypes,
                                     size_t max_dtypes, size_t *ret_n_dtypes) {
        const char *last = NULL;
        size_t n_dtypes = 0;
        uint8_t code = 0;

        if (!m || n < m->n_tensors || (n > 0 && !codes) || !ret_n_dtypes || (max_dtypes > 0 && !dtypes))
                return WD_INVALID_ARGUMENT;
        max_dtypes = MIN(max_dtypes, (size_t) UINT8_MAX + 1);
        for (size_t i = 0; i < m->n_tensors; i++) {
                const char *d = m->tensors[i].dtype;

                /* Tensors of a dtype share its string in a table reply:
                 * mostly the same pointer as the tensor before. */
                if (d != last) {
                        size_t k = 0;

                        while (k < n_dtypes && dtypes[k] != d && strcmp(dtypes[k], d) != 0)
                                k++;
                        if (k == n_dtypes) {
                                if (n_dtypes == max_dtypes)
                                        return WD_RESOURCE_EXHAUSTED;
                                dtypes[n_dtypes++] = d;
                        }
                        code = (uint8_t) k;
                        last = d;
                }
                codes[i] = code;
        }
        *ret_n_dtypes = n_dtypes;
        return WD_OK;
}

_public_ size_t wd_manifest_n_dims(const wd_manifest *m) {
        size_t n = 0;

        for (size_t i = 0; m && i < m->n_tensors; i++)
                n += m->tensors[i].ndim;
        return n;
}

_public_ int wd_manifest_shapes(const wd_manifest *m, uint64_t *buf, size_t n) {
        if (!m || (n > 0 && !buf) || n < wd_manifest_n_dims(m))
                return WD_INVALID_ARGUMENT;

        for (size_t i = 0; i < m->n_tensors; i++) {
                const wd_tensor *t = &m->tensors[i];
                if (t->ndim > 0)
                        memcpy(buf, t->shape, t->ndim * sizeof(uint64_t));
                buf += t->ndim;
        }
        return WD_OK;
}

_public_ const wd_tensor *wd_manifest_find(const wd_manifest *m, const char *name) {
        if (!m || !name || m->n_tensors == 0)
                return NULL;

        size_t mask = m->n_slots - 1;
        for (size_t k = name_hash(name) & mask; m->slots[k] != 0; k = (k + 1) & mask)
                if (strcmp(m->tensors[m->slots[k] - 1].name, name) == 0)
                        return &m->tensors[m->slots[k] - 1];
        return NULL;
}

_public_ size_t wd_manifest_n_files(const wd_manifest *m) {
        return m ? m->n_files : 0;
}

_public_ const char *wd_manifest_file(const wd_manifest *m, size_t i) {
        if (!m || i >= m->n_files)
                return NULL;
        return m->files[i]->file;
}

_public_ size_t wd_manifest_n_metadata(const wd_manifest *m, size_t file) {
        if (!m || file >= m->n_files)
                return 0;
        return m->files[file]->n_metadata;
}

_public_ int wd_manifest_metadata(const wd_manifest *m, size_t file, size_t i, const char **ret_key,
                                  const char **ret_value) {
        if (!m || file >= m->n_files || i >= m->files[file]->n_metadata)
                return WD_NOT_FOUND;

        const Weightd__V1__MetadataEntry *e = m->files[file]->metadata[i];
        if (ret_key)
                *ret_key = e->key;
        if (ret_value)
                *ret_value = e->value;
        return WD_OK;
}

_public_ void wd_manifest_free(wd_manifest *m) {
        /* A lease's manifest ends with the lease. */
        if (m && !m->leased)
                manifest_free(m);
}
