/* Model and component resolution.
 *
 * A directory is resolved in this order: model.safetensors or
 * diffusion_pytorch_model.safetensors; a *.safetensors.index.json (the
 * canonical name, or the only one); all *.safetensors in sorted order.  A
 * folder with only pickle checkpoints is refused with WD_E_UNSUPPORTED.
 * Headers are parsed once per file identity and kept in an LRU cache of
 * CATALOG_CACHE_MAX (catalog.h); checked sharded indexes and sets of files
 * whose tensor names were found unique are remembered in two more of the
 * same size.
 * Each is an array of LruSlots (util/lru-slots.h), found by a SipHash of its
 * key under a key drawn per catalog, so that a lookup and an insert cost the
 * same with 10 cached models as with thousands.
 *
 * Concurrency: one mutex guards the header cache and the memos,
 * and it is held only to look an entry up (taking a reference or a copy) or
 * to insert one, never across open(), fstat(), read() or a header parse.  A
 * file whose header is not cached is parsed into a private header outside
 * the lock and inserted afterwards; where another thread inserted the same
 * identity meanwhile, the first insert stays and the later copy is dropped.
 * What an insert evicts is released after the lock is dropped, since the
 * last reference to a large header takes long to free. */
#include <dirent.h>
#include <fcntl.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "format/catalog.h"
#include "util/lru-slots.h"
#include "util/siphash24.h"

#define INDEX_JSON_MAX (64ULL << 20)

static const char *const single_names[] = { "model.safetensors", "diffusion_pytorch_model.safetensors" };
static const char *const index_names[] = { "model.safetensors.index.json",
                                           "diffusion_pytorch_model.safetensors.index.json" };
static const char *const pickle_suffixes[] = { ".bin", ".pt", ".pth", ".ckpt" };

typedef struct HeaderCacheEntry {
        FileId id;
        StHeader *header;
} HeaderCacheEntry;

/* A sharded index that passed every check, with the identities of the
 * index and of the shards it was checked against: while none of them
 * changes, resolving it again needs no JSON parse and no cross-check. */
typedef struct IndexMemo {
        char *path; /* beneath the root */
        FileId id;
        size_t n_shards;
        char **shards; /* sorted, as resolved */
        FileId *shard_ids;
} IndexMemo;

/* A set of files (by identity, in order) whose tensor names were found
 * unique across the set: no header references, so a memo keeps no header
 * alive that the header cache gave up. */
typedef struct UniqueMemo {
        size_t n;
        FileId *ids;
} UniqueMemo;

struct Catalog {
        int root_fd;        /* read-only after catalog_new() */
        char *root_display; /* read-only after catalog_new() */
        CatalogParseHook parse_hook;
        void *parse_hook_userdata;

        /* Guards everything below; never held across I/O or a parse. */
        pthread_mutex_t lock;
        uint8_t hash_key[SIPHASH_KEY_SIZE];
        LruSlots header_slots; /* each indexes the array below it */
        HeaderCacheEntry *headers;
        LruSlots index_slots;
        IndexMemo *index_memos;
        LruSlots unique_slots;
        UniqueMemo *unique_memos;
};

static void index_memo_done(IndexMemo *m) {
        for (size_t i = 0; i < m->n_shards; i++)
                free(m->shards[i]);
        free(m->shards);
        free(m->shard_ids);
        free(m->path);
        *m = (IndexMemo){};
}

static void unique_memo_done(UniqueMemo *m) {
        free(m->ids);
        *m = (UniqueMemo){};
}

const char *component_kind_to_string(ComponentKind k) {
        static const char *const names[_COMPONENT_KIND_MAX] = {
                [COMPONENT_WEIGHTS] = "weights",        [COMPONENT_ABSENT] = "absent",
                [COMPONENT_MISSING] = "missing",        [COMPONENT_NO_WEIGHTS] = "no-weights",
                [COMPONENT_PICKLE_ONLY] = "pickle-only",
        };
        return k < _COMPONENT_KIND_MAX ? names[k] : NULL;
}

int catalog_new(Catalog **ret, int root_fd, const char *root_display) {
        return catalog_new_sized(ret, root_fd, root_display, CATALOG_CACHE_MAX);
}

int catalog_new_sized(Catalog **ret, int root_fd, const char *root_display, uint32_t cache_max) {
        Catalog *c;
        int r;

        if (cache_max == 0 || cache_max > (1u << 30))
                return -EINVAL;

        c = calloc(1, sizeof(Catalog));
        if (!c)
                return -ENOMEM;
        r = pthread_mutex_init(&c->lock, NULL);
        if (r != 0) {
                free(c);
                return -r;
        }
        c->root_fd = root_fd;
        c->root_display = strdup(root_display ? root_display : "");
        c->headers = calloc(cache_max, sizeof(HeaderCacheEntry));
        c->index_memos = calloc(cache_max, sizeof(IndexMemo));
        c->unique_memos = calloc(cache_max, sizeof(UniqueMemo));
        if (!c->root_display || !c->headers || !c->index_memos || !c->unique_memos ||
            lru_slots_init(&c->header_slots, cache_max) < 0 || lru_slots_init(&c->index_slots, cache_max) < 0 ||
            lru_slots_init(&c->unique_slots, cache_max) < 0)
                return catalog_free(c), -ENOMEM;
        siphash24_random_key(c->hash_key);
        *ret = c;
        return 0;
}

Catalog *catalog_free(Catalog *c) {
        if (!c)
                return NULL;
        for (size_t i = 0; c->headers && i < c->header_slots.n; i++)
                st_header_unref(c->headers[i].header);
        for (size_t i = 0; c->index_memos && i < c->index_slots.n; i++)
                index_memo_done(&c->index_memos[i]);
        for (size_t i = 0; c->unique_memos && i < c->unique_slots.n; i++)
                unique_memo_done(&c->unique_memos[i]);
        lru_slots_done(&c->header_slots);
        lru_slots_done(&c->index_slots);
        lru_slots_done(&c->unique_slots);
        free(c->headers);
        free(c->index_memos);
        free(c->unique_memos);
        free(c->root_display);
        pthread_mutex_destroy(&c->lock);
        free(c);
        return NULL;
}

void catalog_set_parse_hook(Catalog *c, CatalogParseHook hook, void *userdata) {
        c->parse_hook = hook;
        c->parse_hook_userdata = userdata;
}

static void catalog_lock(Catalog *c) {
        pthread_mutex_lock(&c->lock);
}

static void catalog_unlock(Catalog *c) {
        pthread_mutex_unlock(&c->lock);
}

size_t catalog_cached_headers(Catalog *c) {
        size_t n;

        catalog_lock(c);
        n = c->header_slots.n;
        catalog_unlock(c);
        return n;
}

/* SipHash of file identities (and a path: "" for none) under the catalog's
 * key. */
static uint64_t ids_hash(const Catalog *c, const char *path, const FileId *ids, size_t n) {
        return file_ids_hash(c->hash_key, path, ids, n);
}

/* The slot caching id's header, or LRU_SLOT_NONE.  Under the lock. */
static uint32_t header_find(const Catalog *c, const FileId *id, uint64_t hash) {
        uint32_t i;

        for (i = lru_slots_first(&c->header_slots, hash); i != LRU_SLOT_NONE; i = lru_slots_next(&c->header_slots, i))
                if (file_id_equal(&c->headers[i].id, id))
                        break;
        return i;
}

/* A reference to the cached header of a file identity, or NULL. */
static StHeader *cache_get(Catalog *c, const FileId *id) {
        uint64_t hash = ids_hash(c, "", id, 1);
        StHeader *h = NULL;
        uint32_t i;

        catalog_lock(c);
        i = header_find(c, id, hash);
        if (i != LRU_SLOT_NONE) {
                lru_slots_use(&c->header_slots, i);
                h = st_header_ref(c->headers[i].header);
        }
        catalog_unlock(c);
        return h;
}

/* Insert a freshly parsed header, taking over the reference h.  Returns the
 * reference to use: h, or the header another thread inserted for the same
 * identity meanwhile (h is then dropped: the first insert wins, so that every
 * user of one identity shares one header).  A full cache gives up its least
 * recently used header. */
static StHeader *cache_put(Catalog *c, const FileId *id, StHeader *h) {
        _cleanup_(st_header_unrefp) StHeader *drop = NULL;
        uint64_t hash = ids_hash(c, "", id, 1);
        StHeader *use = h;
        uint32_t slot;
        bool reused;

        catalog_lock(c);
        slot = header_find(c, id, hash);
        if (slot != LRU_SLOT_NONE) {
                lru_slots_use(&c->header_slots, slot);
                use = st_header_ref(c->headers[slot].header);
                drop = h;
        } else {
                slot = lru_slots_add(&c->header_slots, hash, &reused);
                if (reused)
                        drop = c->headers[slot].header;
                c->headers[slot] = (HeaderCacheEntry){ .id = *id, .header = st_header_ref(h) };
        }
        catalog_unlock(c);
        return use; /* drop, if any, is released here, outside the lock */
}

/* "root_display/path" for messages. */
static char *display_path(Catalog *c, const char *path) {
        return path_join(c->root_display, path);
}

/* Turn an open/stat failure into a user-facing error naming the path. */
static int open_error(Catalog *c, const char *path, int r, WdError *err) {
        _cleanup_free_ char *d = display_path(c, path);

        if (r == -EXDEV || r == -ELOOP)
                return wd_error_set(err, WD_E_PERMISSION, "%s: path leaves the model root", d ? d : path);
        if (r == -ENOENT || r == -ENOTDIR)
                return wd_error_set(err, WD_E_NOT_FOUND, "%s: no such file or directory", d ? d : path);
        if (r == -EACCES || r == -EPERM)
                return wd_error_set(err, WD_E_PERMISSION, "%s: permission denied", d ? d : path);
        return wd_error_set(err, r, "%s: %s", d ? d : path, strerror(-r));
}

/* ---- directory scans ---- */

typedef struct StrList {
        size_t n;
        char **items;
} StrList;

static void strlist_done(StrList *l) {
        for (size_t i = 0; i < l->n; i++)
                free(l->items[i]);
        free(l->items);
        *l = (StrList){};
}

static int strlist_add(StrList *l, const char *s) {
        char **n = realloc(l->items, (l->n + 1) * sizeof(char *));

        if (!n)
                return -ENOMEM;
        l->items = n;
        l->items[l->n] = strdup(s);
        if (!l->items[l->n])
                return -ENOMEM;
        l->n++;
        return 0;
}

static int strcmp_ptr(const void *a, const void *b) {
        return strcmp(*(char *const *) a, *(char *const *) b);
}

static void strlist_sort(StrList *l) {
        if (l->n > 1)
                qsort(l->items, l->n, sizeof(char *), strcmp_ptr);
}

static bool strlist_contains(const StrList *l, const char *s) {
        for (size_t i = 0; i < l->n; i++)
                if (strcmp(l->items[i], s) == 0)
                        return true;
        return false;
}

typedef struct DirScan {
        StrList safetensors; /* *.safetensors, sorted */
        StrList indexes;     /* *.safetensors.index.json, sorted */
        StrList pickles;     /* *.bin, *.pt, *.pth, *.ckpt, sorted */
        bool model_index;    /* model_index.json present */
} DirScan;

static void dir_scan_done(DirScan *s) {
        strlist_done(&s->safetensors);
        strlist_done(&s->indexes);
        strlist_done(&s->pickles);
}

static bool is_pickle(const char *name) {
        for (size_t i = 0; i < ELEMENTSOF(pickle_suffixes); i++)
                if (str_endswith(name, pickle_suffixes[i]))
                        return true;
        return false;
}

static int dir_scan(Catalog *c, const char *path, DirScan *ret, WdError *err) {
        _cleanup_(dir_scan_done) DirScan s = {};
        struct dirent *de;
        DIR *d;
        int fd, r = 0;

        fd = fs_open_beneath(c->root_fd, path, O_RDONLY | O_DIRECTORY);
        if (fd < 0)
                return open_error(c, path, fd, err);
        d = fdopendir(fd);
        if (!d) {
                r = negative_errno();
                safe_close(fd);
                return open_error(c, path, r, err);
        }
        while (r >= 0 && (de = readdir(d))) {
                if (de->d_type != DT_REG && de->d_type != DT_LNK && de->d_type != DT_UNKNOWN)
                        continue;
                if (str_endswith(de->d_name, ".safetensors"))
                        r = strlist_add(&s.safetensors, de->d_name);
                else if (str_endswith(de->d_name, ".safetensors.index.json"))
                        r = strlist_add(&s.indexes, de->d_name);
                else if (is_pickle(de->d_name))
                        r = strlist_add(&s.pickles, de->d_name);
                else if (strcmp(de->d_name, "model_index.json") == 0)
                        s.model_index = true;
        }
        closedir(d);
        if (r < 0)
                return wd_error_set(err, r, "out of memory");
        strlist_sort(&s.safetensors);
        strlist_sort(&s.indexes);
        strlist_sort(&s.pickles);
        *ret = s;
        s = (DirScan){};
        return 0;
}

static ComponentKind dir_kind(const DirScan *s) {
        if (s->safetensors.n > 0 || s->indexes.n > 0)
                return COMPONENT_WEIGHTS;
        if (s->pickles.n > 0)
                return COMPONENT_PICKLE_ONLY;
        return COMPONENT_NO_WEIGHTS;
}

/* ---- JSON files of the layout ---- */

/* Open a JSON file of the layout beneath the root: a regular file. */
static int json_open(Catalog *c, const char *path, int *ret_fd, struct stat *ret_st, WdError *err) {
        _cleanup_close_ int fd = -1;

        fd = fs_open_beneath(c->root_fd, path, O_RDONLY | O_NONBLOCK);
        if (fd < 0)
                return open_error(c, path, fd, err);
        if (fstat(fd, ret_st) < 0)
                return open_error(c, path, negative_errno(), err);
        *ret_fd = TAKE_FD(fd);
        return 0;
}

static int load_json_fd(Catalog *c, const char *path, int fd, const struct stat *st_in, json_t **ret, WdError *err) {
        _cleanup_free_ char *d = display_path(c, path), *buf = NULL;
        const struct stat st = *st_in;
        json_error_t je;
        size_t done = 0;
        json_t *j;

        if (!S_ISREG(st.st_mode))
                return wd_error_set(err, WD_E_FORMAT, "%s: not a regular file", d);
        if ((uint64_t) st.st_size > INDEX_JSON_MAX)
                return wd_error_set(err, WD_E_FORMAT, "%s: %llu bytes exceeds the limit of %llu bytes for JSON files", d,
                                    (unsigned long long) st.st_size, INDEX_JSON_MAX);
        buf = malloc((size_t) st.st_size + 1);
        if (!buf)
                return wd_error_set(err, -ENOMEM, "out of memory");
        while (done < (size_t) st.st_size) {
                ssize_t k = pread(fd, buf + done, (size_t) st.st_size - done, (off_t) done);
                if (k < 0 && errno == EINTR)
                        continue;
                if (k < 0)
                        return open_error(c, path, negative_errno(), err);
                if (k == 0)
                        return wd_error_set(err, WD_E_CHANGED, "%s: file shrank while reading", d);
                done += (size_t) k;
        }
        j = json_loadb(buf, done, JSON_REJECT_DUPLICATES, &je);
        if (!j)
                return wd_error_set(err, WD_E_FORMAT, "%s: not valid JSON: %s (line %d, column %d)", d, je.text,
                                    je.line, je.column);
        *ret = j;
        return 0;
}

static int load_json(Catalog *c, const char *path, json_t **ret, WdError *err) {
        _cleanup_close_ int fd = -1;
        struct stat st;
        int r;

        r = json_open(c, path, &fd, &st, err);
        if (r != 0)
                return r;
        return load_json_fd(c, path, fd, &st, ret, err);
}

/* ---- files ---- */

static void catalog_file_done(CatalogFile *f) {
        free(f->path);
        free(f->display);
        safe_close(f->fd);
        st_header_unref(f->header);
}

Component *component_free(Component *c) {
        if (!c)
                return NULL;
        for (size_t i = 0; i < c->n_files; i++)
                catalog_file_done(&c->files[i]);
        free(c->files);
        free(c->model);
        free(c->name);
        free(c);
        return NULL;
}

int component_dup(const Component *c, Component **ret) {
        _cleanup_(component_freep) Component *d = NULL;

        d = calloc(1, sizeof(Component));
        if (!d)
                return -ENOMEM;
        d->model = strdup(c->model);
        d->name = strdup(c->name);
        d->files = calloc(MAX(c->n_files, 1), sizeof(CatalogFile));
        if (!d->model || !d->name || !d->files)
                return -ENOMEM;
        d->total_bytes = c->total_bytes;
        d->n_tensors = c->n_tensors;
        for (size_t i = 0; i < c->n_files; i++) {
                const CatalogFile *f = &c->files[i];
                CatalogFile *g = &d->files[d->n_files];

                *g = (CatalogFile){ .fd = -1, .id = f->id };
                g->path = strdup(f->path);
                g->display = strdup(f->display);
                g->fd = fcntl(f->fd, F_DUPFD_CLOEXEC, 3);
                g->header = st_header_ref(f->header);
                d->n_files++;
                if (!g->path || !g->display)
                        return -ENOMEM;
                if (g->fd < 0)
                        return -errno;
        }
        *ret = TAKE_PTR(d);
        return 0;
}

/* Open one safetensors file beneath the root and get its validated header. */
static int file_open(Catalog *c, const char *dir, const char *name, CatalogFile *f, WdError *err) {
        struct stat st;
        StHeader *h;
        int r;

        *f = (CatalogFile){ .fd = -1 };
        f->path = path_join(dir, name);
        f->display = f->path ? display_path(c, f->path) : NULL;
        if (!f->path || !f->display)
                return wd_error_set(err, -ENOMEM, "out of memory");
        f->fd = fs_open_beneath(c->root_fd, f->path, O_RDONLY | O_NONBLOCK);
        if (f->fd < 0)
                return open_error(c, f->path, f->fd, err);
        if (fstat(f->fd, &st) < 0)
                return open_error(c, f->path, negative_errno(), err);
        if (!S_ISREG(st.st_mode))
                return wd_error_set(err, WD_E_FORMAT, "%s: not a regular file", f->display);
        /* Opened non-blocking so that a FIFO cannot hang us; reads must block
         * (io_uring would answer -EAGAIN forever on an uncached page). */
        if (fcntl(f->fd, F_SETFL, fcntl(f->fd, F_GETFL) & ~O_NONBLOCK) < 0)
                return open_error(c, f->path, negative_errno(), err);
        file_id_from_stat(&f->id, &st);

        h = cache_get(c, &f->id);
        if (!h) {
                /* Parsed outside the lock: other models resolve meanwhile. */
                if (c->parse_hook)
                        c->parse_hook(c->parse_hook_userdata, f->path);
                r = st_header_parse_fd(f->fd, f->display, &h, err);
                if (r != 0)
                        return r;
                h = cache_put(c, &f->id, h);
        }
        f->header = h;
        return 0;
}

static int component_add_file(Catalog *c, Component *comp, const char *dir, const char *name, WdError *err) {
        CatalogFile *n;
        int r;

        n = realloc(comp->files, (comp->n_files + 1) * sizeof(CatalogFile));
        if (!n)
                return wd_error_set(err, -ENOMEM, "out of memory");
        comp->files = n;
        r = file_open(c, dir, name, &comp->files[comp->n_files], err);
        comp->n_files++; /* even on failure: component_free() cleans it up */
        if (r != 0)
                return r;
        comp->total_bytes += comp->files[comp->n_files - 1].header->file_size;
        comp->n_tensors += comp->files[comp->n_files - 1].header->n_tensors;
        return 0;
}

/* ---- sharded indexes ---- */

static int index_shards(Catalog *c, const char *index_display, json_t *map, StrList *ret, WdError *err) {
        _cleanup_(strlist_done) StrList shards = {};
        const char *tensor;
        json_t *value;

        json_object_foreach(map, tensor, value) {
                char t[256], v[256];

                if (!json_is_string(value)) {
                        wd_escape(t, sizeof(t), tensor, 200);
                        return wd_error_set(err, WD_E_FORMAT, "%s: weight_map: tensor \"%s\": shard is not a string",
                                            index_display, t);
                }
                if (!filename_is_plain(json_string_value(value))) {
                        wd_escape(t, sizeof(t), tensor, 200);
                        wd_escape(v, sizeof(v), json_string_value(value), 200);
                        return wd_error_set(err, WD_E_FORMAT,
                                            "%s: weight_map: tensor \"%s\": shard \"%s\" is not a file name in the "
                                            "index's folder",
                                            index_display, t, v);
                }
                if (!strlist_contains(&shards, json_string_value(value)) &&
                    strlist_add(&shards, json_string_value(value)) < 0)
                        return wd_error_set(err, -ENOMEM, "out of memory");
        }
        (void) c;
        strlist_sort(&shards);
        *ret = shards;
        shards = (StrList){};
        return 0;
}

/* Every tensor a shard holds must be mapped to it, and every tensor mapped to
 * it must be there. */
static int index_check_shard(const char *index_display, json_t *map, const char *shard, const CatalogFile *f,
                             WdError *err) {
        const StHeader *h = f->header;
        size_t mapped = 0;
        const char *tensor;
        json_t *value;
        char t[256];

        for (size_t i = 0; i < h->n_tensors; i++) {
                json_t *v = json_object_get(map, h->tensors[i].name);

                if (!v || strcmp(json_string_value(v), shard) != 0)
                        wd_escape(t, sizeof(t), h->tensors[i].name, 200);
                if (!v)
                        return wd_error_set(err, WD_E_FORMAT,
                                            "%s: shard %s holds tensor \"%s\", which the weight_map does not list",
                                            index_display, shard, t);
                if (strcmp(json_string_value(v), shard) != 0)
                        return wd_error_set(err, WD_E_FORMAT,
                                            "%s: weight_map puts tensor \"%s\" in %s, but shard %s holds it",
                                            index_display, t, json_string_value(v), shard);
        }
        json_object_foreach(map, tensor, value)
                if (strcmp(json_string_value(value), shard) == 0)
                        mapped++;
        if (mapped == h->n_tensors)
                return 0;
        /* Some mapped tensor is not in the shard: find it for the message. */
        json_object_foreach(map, tensor, value)
                if (strcmp(json_string_value(value), shard) == 0 && !st_header_find(h, tensor)) {
                        wd_escape(t, sizeof(t), tensor, 200);
                        return wd_error_set(err, WD_E_FORMAT,
                                            "%s: weight_map puts tensor \"%s\" in %s, which does not hold it",
                                            index_display, t, shard);
                }
        return wd_error_set(err, WD_E_FORMAT, "%s: shard %s does not match the weight_map", index_display, shard);
}

/* A private copy of the memo of an index (path and identity), so that it can
 * be used outside the lock while another thread evicts the original.  False
 * when there is none (or no memory for the copy: that only costs speed). */
static bool index_memo_find(Catalog *c, const char *path, const FileId *id, IndexMemo *ret) {
        uint64_t hash = ids_hash(c, path, id, 1);
        IndexMemo m = {};
        bool found = false;

        catalog_lock(c);
        for (uint32_t i = lru_slots_first(&c->index_slots, hash); i != LRU_SLOT_NONE;
             i = lru_slots_next(&c->index_slots, i)) {
                const IndexMemo *o = &c->index_memos[i];

                if (!file_id_equal(&o->id, id) || strcmp(o->path, path) != 0)
                        continue;
                lru_slots_use(&c->index_slots, i);
                m = (IndexMemo){ .id = o->id, .n_shards = o->n_shards };
                m.path = strdup(o->path);
                m.shards = calloc(MAX(o->n_shards, 1), sizeof(char *));
                m.shard_ids = calloc(MAX(o->n_shards, 1), sizeof(FileId));
                found = m.path && m.shards && m.shard_ids;
                for (size_t k = 0; found && k < o->n_shards; k++) {
                        m.shards[k] = strdup(o->shards[k]);
                        m.shard_ids[k] = o->shard_ids[k];
                        found = m.shards[k];
                }
                break;
        }
        catalog_unlock(c);
        if (!found) {
                index_memo_done(&m);
                return false;
        }
        *ret = m;
        return true;
}

/* Remember a checked index; failing to (out of memory) only costs speed.
 * Where another thread remembered the same index (path and identity)
 * meanwhile, its memo stays. */
static void index_memo_put(Catalog *c, const char *path, const FileId *id, const Component *comp, size_t first) {
        _cleanup_(index_memo_done) IndexMemo drop = {};
        IndexMemo m = { .id = *id, .n_shards = comp->n_files - first };
        uint64_t hash = ids_hash(c, path, id, 1);
        uint32_t slot;
        bool reused;

        m.path = strdup(path);
        m.shards = calloc(m.n_shards, sizeof(char *));
        m.shard_ids = calloc(m.n_shards, sizeof(FileId));
        if (!m.path || !m.shards || !m.shard_ids)
                return index_memo_done(&m);
        for (size_t i = 0; i < m.n_shards; i++) {
                const char *base = strrchr(comp->files[first + i].path, '/');
                m.shards[i] = strdup(base ? base + 1 : comp->files[first + i].path);
                if (!m.shards[i])
                        return index_memo_done(&m);
                m.shard_ids[i] = comp->files[first + i].id;
        }

        catalog_lock(c);
        for (slot = lru_slots_first(&c->index_slots, hash); slot != LRU_SLOT_NONE;
             slot = lru_slots_next(&c->index_slots, slot))
                if (file_id_equal(&c->index_memos[slot].id, id) && strcmp(c->index_memos[slot].path, path) == 0)
                        break;
        if (slot != LRU_SLOT_NONE)
                drop = m;
        else {
                slot = lru_slots_add(&c->index_slots, hash, &reused);
                if (reused)
                        drop = c->index_memos[slot];
                c->index_memos[slot] = m;
        }
        catalog_unlock(c);
}

/* Drop the files added since first (a memo that no longer holds). */
static void component_truncate(Component *comp, size_t first) {
        while (comp->n_files > first) {
                CatalogFile *f = &comp->files[--comp->n_files];
                if (f->header) {
                        comp->total_bytes -= f->header->file_size;
                        comp->n_tensors -= f->header->n_tensors;
                }
                catalog_file_done(f);
        }
}

/* Resolve from a memo: every shard still the file that was checked. */
static bool resolve_index_memo(Catalog *c, Component *comp, const char *dir, const IndexMemo *m) {
        size_t first = comp->n_files;

        for (size_t i = 0; i < m->n_shards; i++)
                if (component_add_file(c, comp, dir, m->shards[i], NULL) != 0 ||
                    !file_id_equal(&comp->files[comp->n_files - 1].id, &m->shard_ids[i])) {
                        component_truncate(comp, first);
                        return false;
                }
        return true;
}

static int resolve_index(Catalog *c, Component *comp, const char *dir, const char *index, WdError *err) {
        _cleanup_free_ char *ipath = path_join(dir, index), *idisplay = NULL;
        _cleanup_(json_decrefp) json_t *root = NULL;
        _cleanup_(strlist_done) StrList shards = {};
        _cleanup_(index_memo_done) IndexMemo memo = {};
        _cleanup_close_ int fd = -1;
        size_t first = comp->n_files;
        struct stat st;
        FileId id;
        json_t *map;
        int r;

        if (!ipath || !(idisplay = display_path(c, ipath)))
                return wd_error_set(err, -ENOMEM, "out of memory");
        r = json_open(c, ipath, &fd, &st, err);
        if (r != 0)
                return r;
        file_id_from_stat(&id, &st);
        if (index_memo_find(c, ipath, &id, &memo) && resolve_index_memo(c, comp, dir, &memo))
                return 0;

        if (c->parse_hook)
                c->parse_hook(c->parse_hook_userdata, ipath);
        r = load_json_fd(c, ipath, fd, &st, &root, err);
        if (r != 0)
                return r;
        map = json_is_object(root) ? json_object_get(root, "weight_map") : NULL;
        if (!json_is_object(map))
                return wd_error_set(err, WD_E_FORMAT, "%s: no \"weight_map\" object", idisplay);
        if (json_object_size(map) == 0)
                return wd_error_set(err, WD_E_FORMAT, "%s: the weight_map is empty", idisplay);
        r = index_shards(c, idisplay, map, &shards, err);
        if (r != 0)
                return r;
        for (size_t i = 0; i < shards.n; i++) {
                r = component_add_file(c, comp, dir, shards.items[i], err);
                if (r == WD_E_NOT_FOUND)
                        return wd_error_set(err, WD_E_NOT_FOUND, "%s: shard %s does not exist", idisplay,
                                            shards.items[i]);
                if (r != 0)
                        return r;
                r = index_check_shard(idisplay, map, shards.items[i], &comp->files[comp->n_files - 1], err);
                if (r != 0)
                        return r;
        }
        index_memo_put(c, ipath, &id, comp, first);
        return 0;
}

/* ---- directories and components ---- */

static const char *first_present(const StrList *l, const char *const *names, size_t n) {
        for (size_t i = 0; i < n; i++)
                if (strlist_contains(l, names[i]))
                        return names[i];
        return NULL;
}

static int pickle_only_error(Catalog *c, const char *dir, const DirScan *s, WdError *err) {
        _cleanup_free_ char *d = display_path(c, dir);

        return wd_error_set(err, WD_E_UNSUPPORTED,
                            "%s: only pickle checkpoints (%s%s); weightd serves safetensors files only", d ? d : dir,
                            s->pickles.items[0], s->pickles.n > 1 ? ", ..." : "");
}

static int resolve_dir(Catalog *c, Component *comp, const char *dir, const DirScan *s, WdError *err) {
        _cleanup_free_ char *d = NULL;
        const char *name;

        name = first_present(&s->safetensors, single_names, ELEMENTSOF(single_names));
        if (name)
                return component_add_file(c, comp, dir, name, err);

        name = first_present(&s->indexes, index_names, ELEMENTSOF(index_names));
        if (!name && s->indexes.n == 1)
                name = s->indexes.items[0];
        if (name)
                return resolve_index(c, comp, dir, name, err);
        if (s->indexes.n > 1) {
                d = display_path(c, dir);
                return wd_error_set(err, WD_E_FORMAT, "%s: %zu sharded indexes (%s, %s, ...) and no canonical one",
                                    d ? d : dir, s->indexes.n, s->indexes.items[0], s->indexes.items[1]);
        }

        for (size_t i = 0; i < s->safetensors.n; i++) {
                int r = component_add_file(c, comp, dir, s->safetensors.items[i], err);
                if (r != 0)
                        return r;
        }
        if (s->safetensors.n > 0)
                return 0;

        if (s->pickles.n > 0)
                return pickle_only_error(c, dir, s, err);
        d = display_path(c, dir);
        return wd_error_set(err, WD_E_NOT_FOUND, "%s: no safetensors weights", d ? d : dir);
}

static int tensor_name_compare(const void *a, const void *b) {
        return strcmp((*(const StTensor *const *) a)->name, (*(const StTensor *const *) b)->name);
}

static uint64_t component_ids_hash(const Catalog *c, const Component *comp) {
        SipHash h;

        siphash24_init(&h, c->hash_key);
        for (size_t i = 0; i < comp->n_files; i++)
                file_id_hash(&comp->files[i].id, &h);
        return siphash24_finalize(&h);
}

/* The slot of the memo of comp's files, or LRU_SLOT_NONE.  Under the lock. */
static uint32_t unique_memo_find_locked(Catalog *c, const Component *comp, uint64_t hash) {
        for (uint32_t i = lru_slots_first(&c->unique_slots, hash); i != LRU_SLOT_NONE;
             i = lru_slots_next(&c->unique_slots, i)) {
                const UniqueMemo *m = &c->unique_memos[i];
                size_t k = 0;

                if (m->n != comp->n_files)
                        continue;
                while (k < m->n && file_id_equal(&m->ids[k], &comp->files[k].id))
                        k++;
                if (k == m->n)
                        return i;
        }
        return LRU_SLOT_NONE;
}

static bool unique_memo_find(Catalog *c, const Component *comp) {
        uint64_t hash = component_ids_hash(c, comp);
        uint32_t i;

        catalog_lock(c);
        i = unique_memo_find_locked(c, comp, hash);
        if (i != LRU_SLOT_NONE)
                lru_slots_use(&c->unique_slots, i);
        catalog_unlock(c);
        return i != LRU_SLOT_NONE;
}

/* Where another thread remembered the same set meanwhile, its memo stays. */
static void unique_memo_put(Catalog *c, const Component *comp) {
        _cleanup_(unique_memo_done) UniqueMemo drop = {};
        UniqueMemo m = { .n = comp->n_files };
        uint64_t hash = component_ids_hash(c, comp);
        uint32_t slot;
        bool reused;

        m.ids = calloc(m.n, sizeof(FileId));
        if (!m.ids)
                return;
        for (size_t i = 0; i < m.n; i++)
                m.ids[i] = comp->files[i].id;

        catalog_lock(c);
        if (unique_memo_find_locked(c, comp, hash) != LRU_SLOT_NONE)
                drop = m;
        else {
                slot = lru_slots_add(&c->unique_slots, hash, &reused);
                if (reused)
                        drop = c->unique_memos[slot];
                c->unique_memos[slot] = m;
        }
        catalog_unlock(c);
}

/* Tensor names must be unique across the files of a component (checked once
 * per set of headers). */
static int check_unique_names(Catalog *c, const Component *comp, WdError *err) {
        _cleanup_free_ const StTensor **all = NULL;
        size_t n = 0;

        if (comp->n_files < 2 || unique_memo_find(c, comp))
                return 0;
        all = malloc(comp->n_tensors * sizeof(StTensor *) + 1);
        if (!all)
                return wd_error_set(err, -ENOMEM, "out of memory");
        for (size_t i = 0; i < comp->n_files; i++)
                for (size_t j = 0; j < comp->files[i].header->n_tensors; j++)
                        all[n++] = &comp->files[i].header->tensors[j];
        qsort(all, n, sizeof(StTensor *), tensor_name_compare);
        for (size_t i = 1; i < n; i++)
                if (strcmp(all[i - 1]->name, all[i]->name) == 0) {
                        _cleanup_free_ char *d = display_path(c, comp->model);
                        char t[256];

                        wd_escape(t, sizeof(t), all[i]->name, 200);
                        return wd_error_set(err, WD_E_FORMAT,
                                            "%s: tensor \"%s\" is stored in more than one file of component \"%s\"",
                                            d ? d : comp->model, t, comp->name);
                }
        unique_memo_put(c, comp);
        return 0;
}

static int component_new(const char *model, const char *name, Component **ret) {
        Component *comp = calloc(1, sizeof(Component));

        if (!comp)
                return -ENOMEM;
        comp->model = strdup(model);
        comp->name = strdup(name);
        if (!comp->model || !comp->name)
                return component_free(comp), -ENOMEM;
        *ret = comp;
        return 0;
}

ComponentList *component_list_free(ComponentList *l) {
        if (!l)
                return NULL;
        for (size_t i = 0; i < l->n; i++) {
                free(l->items[i].name);
                free(l->items[i].library);
                free(l->items[i].class_name);
        }
        free(l->items);
        free(l);
        return NULL;
}

/* model_index.json: keys not starting with '_' whose value is a two-element
 * array [library, class] are components; [null, ...] means absent. */
static int diffusers_read(Catalog *c, const char *model, ComponentList *l, WdError *err) {
        _cleanup_free_ char *path = path_join(model, "model_index.json"), *d = NULL;
        _cleanup_(json_decrefp) json_t *root = NULL;
        const char *key;
        json_t *value;
        int r;

        if (!path || !(d = display_path(c, path)))
                return wd_error_set(err, -ENOMEM, "out of memory");
        r = load_json(c, path, &root, err);
        if (r != 0)
                return r;
        if (!json_is_object(root))
                return wd_error_set(err, WD_E_FORMAT, "%s: not a JSON object", d);
        l->items = calloc(json_object_size(root) + 1, sizeof(ComponentInfo));
        if (!l->items)
                return wd_error_set(err, -ENOMEM, "out of memory");
        json_object_foreach(root, key, value) {
                ComponentInfo *ci = &l->items[l->n];
                json_t *lib, *cls;

                if (key[0] == '_' || !json_is_array(value) || json_array_size(value) != 2)
                        continue;
                lib = json_array_get(value, 0);
                cls = json_array_get(value, 1);
                if ((!json_is_null(lib) && !json_is_string(lib)) || (!json_is_null(cls) && !json_is_string(cls)))
                        continue;
                if (!filename_is_plain(key)) {
                        char k[256];

                        wd_escape(k, sizeof(k), key, 200);
                        return wd_error_set(err, WD_E_FORMAT, "%s: component \"%s\" is not a folder name", d, k);
                }
                ci->name = strdup(key);
                ci->library = json_is_string(lib) ? strdup(json_string_value(lib)) : NULL;
                ci->class_name = json_is_string(cls) ? strdup(json_string_value(cls)) : NULL;
                l->n++;
                if (!ci->name || (json_is_string(lib) && !ci->library) || (json_is_string(cls) && !ci->class_name))
                        return wd_error_set(err, -ENOMEM, "out of memory");
                ci->kind = json_is_null(lib) ? COMPONENT_ABSENT : COMPONENT_WEIGHTS;
        }
        return 0;
}

static int component_dir_kind(Catalog *c, const char *model, ComponentInfo *ci, WdError *err) {
        _cleanup_(dir_scan_done) DirScan s = {};
        _cleanup_free_ char *dir = path_join(model, ci->name);
        int r;

        if (!dir)
                return wd_error_set(err, -ENOMEM, "out of memory");
        r = dir_scan(c, dir, &s, err);
        if (r == WD_E_NOT_FOUND) {
                ci->kind = COMPONENT_MISSING;
                return 0;
        }
        if (r != 0)
                return r;
        ci->kind = dir_kind(&s);
        return 0;
}

static bool is_safetensors_file(Catalog *c, const char *model, int *ret_error) {
        int fd = fs_open_beneath(c->root_fd, model, O_RDONLY | O_NOCTTY | O_NONBLOCK);
        struct stat st;
        bool reg;

        if (fd < 0) {
                *ret_error = fd;
                return false;
        }
        reg = fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
        safe_close(fd);
        *ret_error = 0;
        return reg;
}

int catalog_list(Catalog *c, const char *model, ComponentList **ret, WdError *err) {
        _cleanup_(component_list_freep) ComponentList *l = NULL;
        _cleanup_(dir_scan_done) DirScan s = {};
        int r;

        l = calloc(1, sizeof(ComponentList));
        if (!l)
                return wd_error_set(err, -ENOMEM, "out of memory");

        if (is_safetensors_file(c, model, &r) || r < 0) {
                if (r < 0)
                        return open_error(c, model, r, err);
                l->items = calloc(1, sizeof(ComponentInfo));
                if (!l->items || !(l->items[0].name = strdup("")))
                        return wd_error_set(err, -ENOMEM, "out of memory");
                l->n = 1;
                l->items[0].kind = is_pickle(model) ? COMPONENT_PICKLE_ONLY : COMPONENT_WEIGHTS;
                *ret = TAKE_PTR(l);
                return 0;
        }

        r = dir_scan(c, model, &s, err);
        if (r != 0)
                return r;
        if (s.model_index) {
                l->diffusers = true;
                r = diffusers_read(c, model, l, err);
                if (r != 0)
                        return r;
                for (size_t i = 0; i < l->n; i++)
                        if (l->items[i].kind == COMPONENT_WEIGHTS) {
                                r = component_dir_kind(c, model, &l->items[i], err);
                                if (r != 0)
                                        return r;
                        }
        } else {
                l->items = calloc(1, sizeof(ComponentInfo));
                if (!l->items || !(l->items[0].name = strdup("")))
                        return wd_error_set(err, -ENOMEM, "out of memory");
                l->n = 1;
                l->items[0].kind = dir_kind(&s);
        }
        *ret = TAKE_PTR(l);
        return 0;
}

static int resolve_diffusers(Catalog *c, Component *comp, const char *model, const char *component,
                             WdError *err) {
        _cleanup_(component_list_freep) ComponentList *l = NULL;
        _cleanup_(dir_scan_done) DirScan s = {};
        _cleanup_free_ char *dir = NULL, *d = display_path(c, model);
        const ComponentInfo *ci = NULL;
        char name[256];
        int r;

        l = calloc(1, sizeof(ComponentList));
        if (!l || !d)
                return wd_error_set(err, -ENOMEM, "out of memory");
        r = diffusers_read(c, model, l, err);
        if (r != 0)
                return r;
        if (!component || !*component) {
                char names[512] = "";
                size_t o = 0;

                for (size_t i = 0; i < l->n && o < sizeof(names); i++)
                        if (l->items[i].kind == COMPONENT_WEIGHTS)
                                o += (size_t) snprintf(names + o, sizeof(names) - o, "%s%s", o ? ", " : "",
                                                       l->items[i].name);
                return wd_error_set(err, WD_E_INVALID, "%s: a diffusers model; name a component (%s)", d, names);
        }
        wd_escape(name, sizeof(name), component, 200);
        for (size_t i = 0; i < l->n; i++)
                if (strcmp(l->items[i].name, component) == 0)
                        ci = &l->items[i];
        if (!ci)
                return wd_error_set(err, WD_E_NOT_FOUND, "%s: model_index.json lists no component \"%s\"", d, name);
        if (ci->kind == COMPONENT_ABSENT)
                return wd_error_set(err, WD_E_NOT_FOUND,
                                    "%s: component \"%s\" is absent (model_index.json gives it as null)", d, name);

        dir = path_join(model, component);
        if (!dir)
                return wd_error_set(err, -ENOMEM, "out of memory");
        r = dir_scan(c, dir, &s, err);
        if (r == WD_E_NOT_FOUND)
                return wd_error_set(err, WD_E_NOT_FOUND, "%s: component \"%s\" has no folder %s/", d, name, name);
        if (r != 0)
                return r;
        return resolve_dir(c, comp, dir, &s, err);
}

int catalog_resolve(Catalog *c, const char *model, const char *component, Component **ret, WdError *err) {
        _cleanup_(component_freep) Component *comp = NULL;
        _cleanup_(dir_scan_done) DirScan s = {};
        _cleanup_free_ char *d = NULL;
        char name[256];
        int r;

        r = component_new(model, component ? component : "", &comp);
        if (r < 0)
                return wd_error_set(err, r, "out of memory");
        wd_escape(name, sizeof(name), comp->name, 200);

        if (is_safetensors_file(c, model, &r) || r < 0) {
                if (r < 0)
                        return open_error(c, model, r, err);
                d = display_path(c, model);
                if (component && *component)
                        return wd_error_set(err, WD_E_NOT_FOUND, "%s: a single file has no component \"%s\"",
                                            d ? d : model, name);
                if (is_pickle(model))
                        return wd_error_set(err, WD_E_UNSUPPORTED,
                                            "%s: a pickle checkpoint; weightd serves safetensors files only",
                                            d ? d : model);
                r = component_add_file(c, comp, "", model, err);
                if (r != 0)
                        return r;
                *ret = TAKE_PTR(comp);
                return 0;
        }

        r = dir_scan(c, model, &s, err);
        if (r != 0)
                return r;
        if (s.model_index)
                r = resolve_diffusers(c, comp, model, component, err);
        else if (component && *component) {
                d = display_path(c, model);
                return wd_error_set(err, WD_E_NOT_FOUND, "%s: not a diffusers model, so it has no component \"%s\"",
                                    d ? d : model, name);
        } else
                r = resolve_dir(c, comp, model, &s, err);
        if (r != 0)
                return r;
        r = check_unique_names(c, comp, err);
        if (r != 0)
                return r;
        *ret = TAKE_PTR(comp);
        return 0;
}
