/* The index of the host tier for a restart, and the adoption of stored
 * slabs (see persist.h for the format).  Writing appends to a growable
 * buffer; reading walks a cursor that refuses to step past the end, so
 * every length and count is checked against the bytes that are left
 * before anything is allocated for it. */
#include <fcntl.h>
#include <inttypes.h>
#include <linux/magic.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include "store/persist.h"
#include "util/siphash24.h"

#define INDEX_MAGIC "WDFDIDX"  /* with its NUL: 8 bytes */
#define INDEX_VERSION 1u
#define INDEX_HEADER_SIZE 32u
#define STR_MAX 4096u          /* PATH_MAX: model paths, component names, variants */
#define FILE_ID_SIZE (3 * 8 + 8 + 4 + 8 + 4)
#define SLAB_REC_SIZE (4 + 3 * 8)
#define ENTRY_MIN_SIZE (3 * 4 + 8 + 4 + 4 + 4)
#define INDEX_SEALS (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL)

#ifndef HUGETLBFS_MAGIC
#define HUGETLBFS_MAGIC 0x958458f6
#endif

/* The checksum's key: fixed, the index is not a secret. */
static const uint8_t checksum_key[SIPHASH_KEY_SIZE] = "weightd fdstore";

const char *persist_slab_name(uint32_t id, char buf[static PERSIST_NAME_MAX]) {
        snprintf(buf, PERSIST_NAME_MAX, PERSIST_SLAB_PREFIX "%" PRIx32, id);
        return buf;
}

int64_t persist_slab_id(const char *name) {
        const char *p;
        uint64_t v = 0;

        if (strncmp(name, PERSIST_SLAB_PREFIX, strlen(PERSIST_SLAB_PREFIX)) != 0)
                return -EINVAL;
        p = name + strlen(PERSIST_SLAB_PREFIX);
        if (!*p || strlen(p) > 8)
                return -EINVAL;
        for (; *p; p++) {
                if (*p >= '0' && *p <= '9')
                        v = v * 16 + (uint64_t) (*p - '0');
                else if (*p >= 'a' && *p <= 'f')
                        v = v * 16 + (uint64_t) (*p - 'a' + 10);
                else
                        return -EINVAL;
        }
        return (int64_t) v;
}

/* ---- writing ------------------------------------------------------------ */

typedef struct Buf {
        uint8_t *data;
        size_t len, cap;
        bool oom;
} Buf;

static void put(Buf *b, const void *p, size_t n) {
        if (b->oom)
                return;
        if (n > b->cap - b->len) {
                size_t cap = MAX(b->cap * 2, b->len + n + 4096);
                uint8_t *d = realloc(b->data, cap);

                if (!d) {
                        b->oom = true;
                        return;
                }
                b->data = d;
                b->cap = cap;
        }
        memcpy(b->data + b->len, p, n);
        b->len += n;
}

static void put_u32(Buf *b, uint32_t v) {
        uint8_t x[4];

        for (unsigned i = 0; i < 4; i++)
                x[i] = (uint8_t) (v >> (8 * i));
        put(b, x, sizeof(x));
}

static void put_u64(Buf *b, uint64_t v) {
        uint8_t x[8];

        for (unsigned i = 0; i < 8; i++)
                x[i] = (uint8_t) (v >> (8 * i));
        put(b, x, sizeof(x));
}

static void put_str(Buf *b, const char *s) {
        size_t n = strlen(s);

        put_u32(b, (uint32_t) n);
        put(b, s, n);
}

static bool entry_storable(const CacheEntry *e) {
        if (e->state != CACHE_ENTRY_RESIDENT || e->memory || e->n_slabs == 0 || !e->slabs)
                return false;
        if (strlen(e->model) > STR_MAX || strlen(e->component) > STR_MAX || strlen(e->variant) > STR_MAX)
                return false;
        for (size_t i = 0; i < e->n_slabs; i++)
                if (!e->slabs[i] || !e->slabs[i]->sealed || e->slabs[i]->fd < 0)
                        return false;
        return true;
}

static void put_entry(Buf *b, const CacheEntry *e, uint32_t first_id, const struct stat *st) {
        put_str(b, e->model);
        put_str(b, e->component);
        put_str(b, e->variant);
        put_u64(b, e->bytes);
        put_u32(b, (e->pinned ? 1u : 0u) | (e->wanted ? 2u : 0u));
        put_u32(b, (uint32_t) e->n_files);
        for (size_t i = 0; i < e->n_files; i++) {
                const FileId *id = &e->ids[i];

                put_u64(b, id->dev);
                put_u64(b, id->ino);
                put_u64(b, id->size);
                put_u64(b, (uint64_t) id->mtime.tv_sec);
                put_u32(b, (uint32_t) id->mtime.tv_nsec);
                put_u64(b, (uint64_t) id->ctime.tv_sec);
                put_u32(b, (uint32_t) id->ctime.tv_nsec);
        }
        put_u32(b, (uint32_t) e->n_slabs);
        for (size_t i = 0; i < e->n_slabs; i++) {
                put_u32(b, first_id + (uint32_t) i);
                put_u64(b, e->slabs[i]->size);
                put_u64(b, (uint64_t) st[i].st_size);
                put_u64(b, (uint64_t) st[i].st_ino);
        }
}

static int memfd_from(const uint8_t *data, size_t len) {
        _cleanup_close_ int fd = memfd_create(PERSIST_INDEX_NAME, MFD_CLOEXEC | MFD_ALLOW_SEALING);
        size_t off = 0;

        if (fd < 0)
                return negative_errno();
        while (off < len) {
                ssize_t n = write(fd, data + off, len - off);

                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return negative_errno();
                }
                off += (size_t) n;
        }
        if (fcntl(fd, F_ADD_SEALS, INDEX_SEALS) < 0)
                return negative_errno();
        return TAKE_FD(fd);
}

int persist_index_save(Cache *c, size_t max_slabs, int *ret_fd, Slab ***ret_slabs, size_t *ret_n_slabs,
                       size_t *ret_n_entries) {
        _cleanup_free_ Slab **slabs = NULL;
        _cleanup_free_ struct stat *st = NULL;
        Buf b = {}, out = {};
        size_t n_slabs = 0, n_entries = 0, cap = 0;
        uint8_t header[INDEX_HEADER_SIZE] = INDEX_MAGIC;
        int fd, r = 0;

        put_u32(&b, 0); /* the number of entries, filled in at the end */
        for (CacheEntry *e = cache_first(c); e; e = cache_next(e)) {
                if (e->state == CACHE_ENTRY_DETACHED)
                        break; /* cache_next() continues among the detached */
                if (!entry_storable(e) || e->n_slabs > max_slabs - n_slabs || n_slabs + e->n_slabs > UINT32_MAX)
                        continue;
                free(st);
                st = calloc(e->n_slabs, sizeof(struct stat));
                if (!st) {
                        r = -ENOMEM;
                        goto finish;
                }
                bool ok = true;
                for (size_t i = 0; i < e->n_slabs && ok; i++)
                        ok = fstat(e->slabs[i]->fd, &st[i]) == 0;
                if (!ok)
                        continue;
                if (n_slabs + e->n_slabs > cap) {
                        size_t ncap = MAX(cap * 2, n_slabs + e->n_slabs + 64);
                        Slab **ns = realloc(slabs, ncap * sizeof(Slab *));

                        if (!ns) {
                                r = -ENOMEM;
                                goto finish;
                        }
                        slabs = ns;
                        cap = ncap;
                }
                put_entry(&b, e, (uint32_t) n_slabs, st);
                memcpy(slabs + n_slabs, e->slabs, e->n_slabs * sizeof(Slab *));
                n_slabs += e->n_slabs;
                n_entries++;
        }
        if (b.oom || n_entries > UINT32_MAX) {
                r = -ENOMEM;
                goto finish;
        }
        for (unsigned i = 0; i < 4; i++)
                b.data[i] = (uint8_t) (n_entries >> (8 * i));

        /* The header, then the payload. */
        put(&out, header, 8);
        put_u32(&out, INDEX_VERSION);
        put_u32(&out, 0);
        put_u64(&out, b.len);
        put_u64(&out, siphash24(b.data, b.len, checksum_key));
        put(&out, b.data, b.len);
        if (out.oom) {
                r = -ENOMEM;
                goto finish;
        }
        fd = memfd_from(out.data, out.len);
        if (fd < 0) {
                r = fd;
                goto finish;
        }
        *ret_fd = fd;
        *ret_slabs = TAKE_PTR(slabs);
        *ret_n_slabs = n_slabs;
        *ret_n_entries = n_entries;
finish:
        free(b.data);
        free(out.data);
        return r;
}

/* ---- reading ------------------------------------------------------------ */

typedef struct Cursor {
        const uint8_t *p;
        size_t left;
        bool short_read;
} Cursor;

static const uint8_t *take(Cursor *c, size_t n) {
        const uint8_t *p = c->p;

        if (c->short_read || n > c->left) {
                c->short_read = true;
                return NULL;
        }
        c->p += n;
        c->left -= n;
        return p;
}

static uint32_t get_u32(Cursor *c) {
        const uint8_t *p = take(c, 4);
        uint32_t v = 0;

        for (unsigned i = 0; p && i < 4; i++)
                v |= (uint32_t) p[i] << (8 * i);
        return v;
}

static uint64_t get_u64(Cursor *c) {
        const uint8_t *p = take(c, 8);
        uint64_t v = 0;

        for (unsigned i = 0; p && i < 8; i++)
                v |= (uint64_t) p[i] << (8 * i);
        return v;
}

/* A string without NUL bytes; NULL and err filled when it breaks a rule. */
static char *get_str(Cursor *c, const char *what, size_t entry, WdError *err) {
        uint32_t n = get_u32(c);
        const uint8_t *p;
        char *s;

        if (n > STR_MAX) {
                wd_error_set(err, WD_E_FORMAT, "entry %zu: %s of %" PRIu32 " bytes, more than %u", entry, what, n,
                             STR_MAX);
                return NULL;
        }
        p = take(c, n);
        if (!p) {
                wd_error_set(err, WD_E_FORMAT, "entry %zu: %s runs past the end", entry, what);
                return NULL;
        }
        if (memchr(p, 0, n)) {
                wd_error_set(err, WD_E_FORMAT, "entry %zu: %s holds a NUL byte", entry, what);
                return NULL;
        }
        s = strndup((const char *) p, n);
        if (!s)
                wd_error_set(err, -ENOMEM, "out of memory");
        return s;
}

static void entry_clear(PersistEntry *e) {
        free(e->model);
        free(e->component);
        free(e->variant);
        free(e->ids);
        free(e->slabs);
}

PersistIndex *persist_index_free(PersistIndex *x) {
        if (!x)
                return NULL;
        for (size_t i = 0; i < x->n_entries; i++)
                entry_clear(&x->entries[i]);
        free(x->entries);
        free(x);
        return NULL;
}

static int get_file_id(Cursor *c, FileId *id, size_t entry, size_t file, WdError *err) {
        int64_t ms, cs;
        uint32_t mns, cns;

        id->dev = get_u64(c);
        id->ino = get_u64(c);
        id->size = get_u64(c);
        ms = (int64_t) get_u64(c);
        mns = get_u32(c);
        cs = (int64_t) get_u64(c);
        cns = get_u32(c);
        if (c->short_read)
                return wd_error_set(err, WD_E_FORMAT, "entry %zu: file %zu runs past the end", entry, file);
        if (mns >= 1000000000u || cns >= 1000000000u)
                return wd_error_set(err, WD_E_FORMAT, "entry %zu: file %zu: a time's nanoseconds are out of range",
                                    entry, file);
        id->mtime = (struct timespec){ .tv_sec = (time_t) ms, .tv_nsec = mns };
        id->ctime = (struct timespec){ .tv_sec = (time_t) cs, .tv_nsec = cns };
        return 0;
}

static int get_entry(Cursor *c, PersistEntry *e, size_t i, uint8_t *seen_ids, uint32_t n_ids_max, WdError *err) {
        uint32_t flags, n;
        uint64_t sum = 0;

        if (!(e->model = get_str(c, "model", i, err)) || !(e->component = get_str(c, "component", i, err)) ||
            !(e->variant = get_str(c, "variant", i, err)))
                return err && err->code ? err->code : WD_E_FORMAT;
        if (!e->model[0] || e->model[0] != '/')
                return wd_error_set(err, WD_E_FORMAT, "entry %zu: the model is not an absolute path", i);
        e->bytes = get_u64(c);
        flags = get_u32(c);
        if (flags & ~3u)
                return wd_error_set(err, WD_E_FORMAT, "entry %zu: unknown flags 0x%" PRIx32, i, flags);
        e->pinned = flags & 1u;
        e->wanted = flags & 2u;

        n = get_u32(c);
        if (c->short_read || n == 0 || n > c->left / FILE_ID_SIZE)
                return wd_error_set(err, WD_E_FORMAT, "entry %zu: %" PRIu32 " files do not fit in what is left", i,
                                    n);
        e->ids = calloc(n, sizeof(FileId));
        if (!e->ids)
                return wd_error_set(err, -ENOMEM, "out of memory");
        e->n_files = n;
        for (size_t f = 0; f < n; f++) {
                int r = get_file_id(c, &e->ids[f], i, f, err);
                if (r != 0)
                        return r;
        }

        n = get_u32(c);
        if (c->short_read || n == 0 || n > c->left / SLAB_REC_SIZE)
                return wd_error_set(err, WD_E_FORMAT, "entry %zu: %" PRIu32 " slabs do not fit in what is left", i,
                                    n);
        e->slabs = calloc(n, sizeof(PersistSlab));
        if (!e->slabs)
                return wd_error_set(err, -ENOMEM, "out of memory");
        e->n_slabs = n;
        for (size_t k = 0; k < n; k++) {
                PersistSlab *s = &e->slabs[k];

                s->id = get_u32(c);
                s->size = get_u64(c);
                s->fd_size = get_u64(c);
                s->ino = get_u64(c);
                if (c->short_read)
                        return wd_error_set(err, WD_E_FORMAT, "entry %zu: slab %zu runs past the end", i, k);
                if (s->id >= n_ids_max || seen_ids[s->id])
                        return wd_error_set(err, WD_E_FORMAT, "entry %zu: slab id %" PRIu32 " is %s", i, s->id,
                                            s->id >= n_ids_max ? "out of range" : "used twice");
                seen_ids[s->id] = 1;
                if (s->size > s->fd_size)
                        return wd_error_set(err, WD_E_FORMAT, "entry %zu: slab %zu holds more than its memfd", i, k);
                if (add_overflow_u64(sum, s->size, &sum))
                        return wd_error_set(err, WD_E_FORMAT, "entry %zu: the slabs' sizes overflow", i);
        }
        if (e->bytes == 0)
                return wd_error_set(err, WD_E_FORMAT, "entry %zu: charges no bytes", i);
        return 0;
}

int persist_index_parse(const uint8_t *buf, size_t len, PersistIndex **ret, WdError *err) {
        _cleanup_(persist_index_freep) PersistIndex *x = NULL;
        _cleanup_free_ uint8_t *seen = NULL;
        Cursor c = { .p = buf, .left = len };
        uint64_t payload_len, sum;
        uint32_t version, n;

        if (len < INDEX_HEADER_SIZE)
                return wd_error_set(err, WD_E_FORMAT, "%zu bytes, shorter than the header", len);
        if (memcmp(take(&c, 8), INDEX_MAGIC, 8) != 0)
                return wd_error_set(err, WD_E_FORMAT, "not a weightd index (bad magic)");
        version = get_u32(&c);
        if (version != INDEX_VERSION)
                return wd_error_set(err, WD_E_FORMAT, "version %" PRIu32 ", this daemon reads version %u", version,
                                    INDEX_VERSION);
        if (get_u32(&c) != 0)
                return wd_error_set(err, WD_E_FORMAT, "the header's reserved field is not 0");
        payload_len = get_u64(&c);
        sum = get_u64(&c);
        if (payload_len != c.left)
                return wd_error_set(err, WD_E_FORMAT, "the header announces %" PRIu64 " bytes of entries, %zu follow",
                                    payload_len, c.left);
        if (siphash24(c.p, c.left, checksum_key) != sum)
                return wd_error_set(err, WD_E_FORMAT, "the checksum does not match");

        n = get_u32(&c);
        if (c.short_read || n > c.left / ENTRY_MIN_SIZE)
                return wd_error_set(err, WD_E_FORMAT, "%" PRIu32 " entries do not fit in %zu bytes", n, c.left);
        x = calloc(1, sizeof(PersistIndex));
        if (!x)
                return wd_error_set(err, -ENOMEM, "out of memory");
        x->entries = calloc(MAX(n, 1u), sizeof(PersistEntry));
        /* Slab ids are positions: there are fewer than the bytes left. */
        x->n_slab_ids = (uint32_t) MIN(c.left / SLAB_REC_SIZE + 1, UINT32_MAX);
        seen = calloc(x->n_slab_ids, 1);
        if (!x->entries || !seen)
                return wd_error_set(err, -ENOMEM, "out of memory");
        for (size_t i = 0; i < n; i++) {
                x->n_entries = i + 1;
                int r = get_entry(&c, &x->entries[i], i, seen, x->n_slab_ids, err);
                if (r != 0)
                        return r;
        }
        if (c.left != 0)
                return wd_error_set(err, WD_E_FORMAT, "%zu bytes follow the last entry", c.left);
        *ret = TAKE_PTR(x);
        return 0;
}

int persist_index_read(int fd, PersistIndex **ret, WdError *err) {
        _cleanup_free_ uint8_t *buf = NULL;
        struct stat st;
        size_t off = 0;
        int seals;

        if (fstat(fd, &st) < 0)
                return wd_error_set(err, negative_errno(), "cannot stat it: %m");
        if (!S_ISREG(st.st_mode))
                return wd_error_set(err, WD_E_FORMAT, "not a regular file (a memfd)");
        seals = fcntl(fd, F_GET_SEALS);
        if (seals < 0 || (seals & INDEX_SEALS) != INDEX_SEALS)
                return wd_error_set(err, WD_E_FORMAT, "not a sealed memfd");
        if (st.st_size < 0 || (uint64_t) st.st_size > PERSIST_INDEX_MAX)
                return wd_error_set(err, WD_E_FORMAT, "%lld bytes, more than the %u allowed", (long long) st.st_size,
                                    PERSIST_INDEX_MAX);
        buf = malloc(MAX((size_t) st.st_size, 1u));
        if (!buf)
                return wd_error_set(err, -ENOMEM, "out of memory");
        while (off < (size_t) st.st_size) {
                ssize_t n = pread(fd, buf + off, (size_t) st.st_size - off, (off_t) off);

                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return wd_error_set(err, negative_errno(), "cannot read it: %m");
                if (n == 0)
                        break;
                off += (size_t) n;
        }
        return persist_index_parse(buf, off, ret, err);
}

/* ---- adopting ----------------------------------------------------------- */

int persist_slab_adopt(int fd_in, const PersistSlab *ps, Slab **ret, WdError *err) {
        _cleanup_close_ int fd = fd_in, client_fd = -1;
        struct stat st;
        struct statfs sfs;
        char path[64];
        uint64_t map;
        bool hugetlb;
        void *data;
        int seals;

        if (fstat(fd, &st) < 0 || fstatfs(fd, &sfs) < 0)
                return wd_error_set(err, negative_errno(), "cannot stat it: %m");
        if (!S_ISREG(st.st_mode) || (uint64_t) st.st_ino != ps->ino)
                return wd_error_set(err, WD_E_CHANGED, "not the memfd the index names (inode %llu, not %" PRIu64 ")",
                                    (unsigned long long) st.st_ino, ps->ino);
        if ((uint64_t) st.st_size != ps->fd_size)
                return wd_error_set(err, WD_E_CHANGED, "%lld bytes, not %" PRIu64, (long long) st.st_size,
                                    ps->fd_size);
        if ((st.st_mode & 07777) != 0444)
                return wd_error_set(err, WD_E_CHANGED, "mode %04o, not 0444", (unsigned) (st.st_mode & 07777));
        seals = fcntl(fd, F_GET_SEALS);
        if (seals < 0 || !(seals & F_SEAL_GROW) || !(seals & (F_SEAL_FUTURE_WRITE | F_SEAL_WRITE)))
                return wd_error_set(err, WD_E_CHANGED, "not sealed against writes");
        hugetlb = (uint64_t) sfs.f_type == (uint64_t) HUGETLBFS_MAGIC;
        /* As slab_seal() leaves it: shmem trimmed to the content, hugetlb
         * in whole pages. */
        if (hugetlb ? ps->size > ps->fd_size : ps->size != ps->fd_size)
                return wd_error_set(err, WD_E_CHANGED, "%" PRIu64 " bytes of content in a memfd of %" PRIu64,
                                    ps->size, ps->fd_size);
        map = hugetlb ? ps->fd_size : MAX(ps->fd_size, 1u);
        if (hugetlb && map == 0)
                return wd_error_set(err, WD_E_CHANGED, "an empty hugetlb memfd");
        snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
        client_fd = open(path, O_RDONLY | O_CLOEXEC);
        if (client_fd < 0)
                return wd_error_set(err, negative_errno(), "cannot reopen it read-only: %m");
        data = mmap(NULL, map, PROT_READ, MAP_SHARED, fd, 0);
        if (data == MAP_FAILED)
                return wd_error_set(err, negative_errno(), "cannot map it: %m");

        Slab *s = calloc(1, sizeof(Slab));
        if (!s) {
                munmap(data, map);
                return wd_error_set(err, -ENOMEM, "out of memory");
        }
        *s = (Slab){
                .fd = TAKE_FD(fd),
                .client_fd = TAKE_FD(client_fd),
                .size = ps->size,
                .capacity = map,
                .data = data,
                .hugetlb = hugetlb,
                .sealed = true,
        };
        *ret = s;
        return 0;
}

void persist_slab_release(Slab *s) {
        if (s)
                s->fd = safe_close(s->fd);
}

static void slabs_free(Slab **slabs, size_t n) {
        for (size_t i = 0; slabs && i < n; i++)
                slab_free(slabs[i]);
        free(slabs);
}

int persist_entry_adopt(Cache *c, const PersistEntry *pe, Slab **slabs, WdError *err) {
        CacheEntry *e;
        int r;

        if (pe->variant[0] == '\0') {
                /* A whole entry: a slab per file, holding the file. */
                if (pe->n_slabs != pe->n_files) {
                        slabs_free(slabs, pe->n_slabs);
                        return wd_error_set(err, WD_E_CHANGED, "%zu slabs for %zu files", pe->n_slabs, pe->n_files);
                }
                for (size_t i = 0; i < pe->n_slabs; i++)
                        if (slabs[i]->size != pe->ids[i].size) {
                                r = wd_error_set(err, WD_E_CHANGED, "slab %zu holds %" PRIu64 " bytes, its file %" PRIu64,
                                                 i, slabs[i]->size, pe->ids[i].size);
                                slabs_free(slabs, pe->n_slabs);
                                return r;
                        }
        }
        r = cache_reserve(c, pe->model, pe->component, pe->variant, pe->ids, pe->n_files, pe->bytes, &e, err);
        if (r != 0) {
                slabs_free(slabs, pe->n_slabs);
                return r;
        }
        cache_entry_set_resident(e, slabs, pe->n_slabs);
        e->wanted = pe->wanted;
        if (pe->pinned)
                cache_entry_pin(e);
        return 0;
}
