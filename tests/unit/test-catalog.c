/* Catalog tests: every layout the generator writes, broken indexes, absent
 * and pickle-only components, escapes from the model root, the identity
 * cache noticing a changed file, and concurrent use of one catalog from
 * several threads.  Expected file lists come from the layout the generator
 * wrote, read back with readdir() and the index JSON; headers are compared
 * with the files' bytes, parsed here with jansson. */
#include <dirent.h>
#include <jansson.h>
#include <pthread.h>
#include <sys/time.h>

#include "format/catalog.h"
#include "test-util.h"
#include "util/time-util.h"

typedef struct Fixture {
        int root_fd;
        Catalog *catalog;
} Fixture;

/* The root is the generated models/ folder; paths are beneath it. */
static int setup(void **state) {
        Fixture *f = calloc(1, sizeof(Fixture));

        f->root_fd = open(testdata("models"), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        assert_true(f->root_fd >= 0);
        assert_int_equal(catalog_new(&f->catalog, f->root_fd, "models"), 0);
        *state = f;
        return 0;
}

static int teardown(void **state) {
        Fixture *f = *state;

        catalog_free(f->catalog);
        close(f->root_fd);
        free(f);
        return 0;
}

static Component *resolve_ok(Fixture *f, const char *model, const char *component) {
        Component *c = NULL;
        WdError err = WD_ERROR_NULL;

        if (catalog_resolve(f->catalog, model, component, &c, &err) != 0)
                fail_msg("%s/%s: %s", model, component ? component : "", err.message);
        return c;
}

static void resolve_fails(Fixture *f, const char *model, const char *component, int code, const char *substring) {
        Component *c = NULL;
        WdError err = WD_ERROR_NULL;
        int r;

        r = catalog_resolve(f->catalog, model, component, &c, &err);
        if (r != code || !strstr(err.message, substring))
                fail_msg("%s/%s: expected %s with \"%s\", got %s: %s", model, component ? component : "",
                         wd_error_code_name(code), substring, wd_error_code_name(r), err.message);
        assert_null(c);
}

static const char *file_name(const CatalogFile *cf) {
        const char *s = strrchr(cf->path, '/');
        return s ? s + 1 : cf->path;
}

static void test_single_and_plain(void **state) {
        Fixture *f = *state;
        _cleanup_(component_freep) Component *a = resolve_ok(f, "single.safetensors", NULL);
        _cleanup_(component_freep) Component *b = resolve_ok(f, "plain", NULL);
        struct stat st;

        assert_int_equal(a->n_files, 1);
        assert_int_equal(stat(testdata("models/single.safetensors"), &st), 0);
        assert_int_equal(a->total_bytes, (uint64_t) st.st_size);
        assert_string_equal(a->files[0].display, "models/single.safetensors");

        assert_int_equal(b->n_files, 1);
        assert_string_equal(file_name(&b->files[0]), "model.safetensors");
        resolve_fails(f, "plain", "vae", WD_E_NOT_FOUND, "not a diffusers model");
        resolve_fails(f, "single.safetensors", "vae", WD_E_NOT_FOUND, "no component");
}

/* The shards of an index, from its weight_map read with jansson here. */
static size_t index_shard_count(const char *index_path, size_t *ret_tensors) {
        _cleanup_(json_decrefp) json_t *j = json_load_file(index_path, 0, NULL);
        _cleanup_(json_decrefp) json_t *set = json_object();
        json_t *map, *v;
        const char *k;

        assert_non_null(j);
        map = json_object_get(j, "weight_map");
        json_object_foreach(map, k, v)
                json_object_set(set, json_string_value(v), json_true());
        *ret_tensors = json_object_size(map);
        return json_object_size(set);
}

static void test_sharded(void **state) {
        Fixture *f = *state;
        _cleanup_(component_freep) Component *c = resolve_ok(f, "sharded", NULL);
        size_t n_tensors, n_shards = index_shard_count(testdata("models/sharded/model.safetensors.index.json"), &n_tensors);

        assert_int_equal(c->n_files, n_shards);
        assert_int_equal(c->n_tensors, n_tensors);
        for (size_t i = 1; i < c->n_files; i++)
                assert_true(strcmp(c->files[i - 1].path, c->files[i].path) < 0);
}

static void test_diffusers(void **state) {
        Fixture *f = *state;
        _cleanup_(component_list_freep) ComponentList *l = NULL;
        WdError err = WD_ERROR_NULL;
        static const struct {
                const char *name;
                ComponentKind kind;
        } expect[] = {
                { "transformer", COMPONENT_WEIGHTS },    { "vae", COMPONENT_WEIGHTS },
                { "text_encoder", COMPONENT_WEIGHTS },   { "text_encoder_2", COMPONENT_ABSENT },
                { "scheduler", COMPONENT_NO_WEIGHTS },   { "tokenizer", COMPONENT_NO_WEIGHTS },
                { "controlnet", COMPONENT_WEIGHTS },
        };

        assert_int_equal(catalog_list(f->catalog, "diffusers", &l, &err), 0);
        assert_true(l->diffusers);
        assert_int_equal(l->n, ELEMENTSOF(expect));
        for (size_t i = 0; i < ELEMENTSOF(expect); i++) {
                bool found = false;

                for (size_t j = 0; j < l->n; j++)
                        if (strcmp(l->items[j].name, expect[i].name) == 0) {
                                assert_int_equal(l->items[j].kind, expect[i].kind);
                                found = true;
                        }
                assert_true(found);
        }

        {
                _cleanup_(component_freep) Component *t = resolve_ok(f, "diffusers", "transformer");
                _cleanup_(component_freep) Component *v = resolve_ok(f, "diffusers", "vae");
                _cleanup_(component_freep) Component *te = resolve_ok(f, "diffusers", "text_encoder");
                _cleanup_(component_freep) Component *cn = resolve_ok(f, "diffusers", "controlnet");
                size_t n_tensors,
                        n = index_shard_count(
                                testdata("models/diffusers/transformer/diffusion_pytorch_model.safetensors.index.json"),
                                &n_tensors);

                assert_int_equal(t->n_files, n);
                assert_int_equal(t->n_tensors, n_tensors);
                assert_string_equal(file_name(&v->files[0]), "diffusion_pytorch_model.safetensors");
                assert_string_equal(file_name(&te->files[0]), "model.safetensors");
                /* All *.safetensors in sorted order. */
                assert_int_equal(cn->n_files, 2);
                assert_string_equal(file_name(&cn->files[0]), "a-part.safetensors");
                assert_string_equal(file_name(&cn->files[1]), "b-part.safetensors");
                assert_string_equal(t->files[0].display,
                                    "models/diffusers/transformer/diffusion_pytorch_model-00001-of-00002.safetensors");
        }

        resolve_fails(f, "diffusers", NULL, WD_E_INVALID, "name a component");
        resolve_fails(f, "diffusers", "text_encoder_2", WD_E_NOT_FOUND, "absent");
        resolve_fails(f, "diffusers", "scheduler", WD_E_NOT_FOUND, "no safetensors weights");
        resolve_fails(f, "diffusers", "nonexistent", WD_E_NOT_FOUND, "lists no component \"nonexistent\"");
        resolve_fails(f, "diffusers", "../plain", WD_E_NOT_FOUND, "lists no component");
}

static void test_pickle_only(void **state) {
        Fixture *f = *state;
        _cleanup_(component_list_freep) ComponentList *l = NULL;
        WdError err = WD_ERROR_NULL;

        resolve_fails(f, "pickle-only", NULL, WD_E_UNSUPPORTED, "safetensors files only");
        resolve_fails(f, "pickle-only/pytorch_model.bin", NULL, WD_E_UNSUPPORTED, "safetensors files only");
        resolve_fails(f, "diffusers-pickle", "unet", WD_E_UNSUPPORTED, "pytorch_model.bin");
        component_free(resolve_ok(f, "diffusers-pickle", "vae"));
        assert_int_equal(catalog_list(f->catalog, "diffusers-pickle", &l, &err), 0);
        for (size_t i = 0; i < l->n; i++)
                if (strcmp(l->items[i].name, "unet") == 0)
                        assert_int_equal(l->items[i].kind, COMPONENT_PICKLE_ONLY);
        resolve_fails(f, "no-weights", NULL, WD_E_NOT_FOUND, "no safetensors weights");
}

static void test_broken_indexes(void **state) {
        Fixture *f = *state;

        resolve_fails(f, "index-missing-shard", NULL, WD_E_NOT_FOUND, "shard model-00002-of-00002.safetensors does not exist");
        resolve_fails(f, "index-wrong-shard", NULL, WD_E_FORMAT, "in model-00001-of-00002.safetensors, which does not hold it");
        resolve_fails(f, "index-extra-tensor", NULL, WD_E_FORMAT, "which the weight_map does not list");
        resolve_fails(f, "index-duplicate-tensor", NULL, WD_E_FORMAT, "holds it");
        resolve_fails(f, "index-bad-json", NULL, WD_E_FORMAT, "not valid JSON");
        resolve_fails(f, "index-no-weight-map", NULL, WD_E_FORMAT, "no \"weight_map\"");
        resolve_fails(f, "index-escape", NULL, WD_E_FORMAT, "is not a file name in the index's folder");
        resolve_fails(f, "index-bad-shard", NULL, WD_E_FORMAT, "runs past the end of the file");
        resolve_fails(f, "diffusers-missing-folder", "transformer", WD_E_NOT_FOUND, "has no folder");
        resolve_fails(f, "diffusers-bad-index", "vae", WD_E_FORMAT, "not a JSON object");
        resolve_fails(f, "does-not-exist", NULL, WD_E_NOT_FOUND, "no such file");
}

/* A private root with links that try to leave it. */
static void test_escapes(void **state) {
        _cleanup_free_ char *dir = make_temp_dir(NULL), *root = NULL, *p = NULL;
        _cleanup_(catalog_freep) Catalog *c = NULL;
        _cleanup_close_ int root_fd = -1;
        Component *comp = NULL;
        WdError err = WD_ERROR_NULL;

        assert_true(asprintf(&root, "%s/root", dir) > 0);
        assert_int_equal(mkdir(root, 0755), 0);
        assert_true(asprintf(&p, "%s/root/abs-link", dir) > 0);
        assert_int_equal(symlink(testdata("models/plain"), p), 0);
        free(p);
        assert_true(asprintf(&p, "%s/root/rel-link", dir) > 0);
        assert_int_equal(symlink("../outside", p), 0);
        free(p);
        assert_true(asprintf(&p, "%s/outside", dir) > 0);
        assert_int_equal(mkdir(p, 0755), 0);
        free(p);
        assert_true(asprintf(&p, "%s/root/inside", dir) > 0);
        assert_int_equal(symlink("sub/../sub", p), 0); /* stays inside: fine */
        free(p);
        assert_true(asprintf(&p, "%s/root/sub", dir) > 0);
        assert_int_equal(mkdir(p, 0755), 0);
        free(p);
        assert_true(asprintf(&p, "cp '%s' '%s/root/sub/model.safetensors'", testdata("models/plain/model.safetensors"), dir) > 0);
        assert_int_equal(system(p), 0);

        root_fd = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        assert_true(root_fd >= 0);
        assert_int_equal(catalog_new(&c, root_fd, "/srv"), 0);

        assert_int_equal(catalog_resolve(c, "abs-link", NULL, &comp, &err), WD_E_PERMISSION);
        assert_non_null(strstr(err.message, "/srv/abs-link: path leaves the model root"));
        assert_int_equal(catalog_resolve(c, "rel-link", NULL, &comp, &err), WD_E_PERMISSION);
        assert_int_equal(catalog_resolve(c, "../outside", NULL, &comp, &err), WD_E_PERMISSION);
        assert_int_equal(catalog_resolve(c, "sub/../../outside", NULL, &comp, &err), WD_E_PERMISSION);
        assert_int_equal(catalog_resolve(c, "/etc", NULL, &comp, &err), WD_E_PERMISSION);
        assert_null(comp);
        /* A FIFO behind a symlink: refused, never waited on. */
        free(p);
        assert_true(asprintf(&p, "%s/root/fifo", dir) > 0);
        assert_int_equal(mkdir(p, 0755), 0);
        free(p);
        assert_true(asprintf(&p, "%s/root/fifo/pipe", dir) > 0);
        assert_int_equal(mkfifo(p, 0644), 0);
        free(p);
        assert_true(asprintf(&p, "%s/root/fifo/model.safetensors", dir) > 0);
        assert_int_equal(symlink("pipe", p), 0);
        assert_int_equal(catalog_resolve(c, "fifo", NULL, &comp, &err), WD_E_FORMAT);
        assert_non_null(strstr(err.message, "/srv/fifo/model.safetensors: not a regular file"));

        assert_int_equal(catalog_resolve(c, "inside", NULL, &comp, &err), 0);
        assert_string_equal(comp->files[0].display, "/srv/inside/model.safetensors");
        component_free(comp);
        remove_tree(dir);
}

/* A rewritten file gets a new identity and a freshly validated header. */
static void test_identity_change(void **state) {
        _cleanup_free_ char *dir = make_temp_dir(NULL), *path = NULL, *cmd = NULL;
        _cleanup_(catalog_freep) Catalog *c = NULL;
        _cleanup_close_ int root_fd = -1;
        Component *a = NULL, *b = NULL;
        WdError err = WD_ERROR_NULL;
        struct timeval tv[2] = { { 1000000, 0 }, { 1000000, 0 } };

        assert_true(asprintf(&cmd, "cp '%s' '%s/m.safetensors'", testdata("good/scalars.safetensors"), dir) > 0);
        assert_int_equal(system(cmd), 0);
        assert_true(asprintf(&path, "%s/m.safetensors", dir) > 0);
        root_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        assert_int_equal(catalog_new(&c, root_fd, dir), 0);

        assert_int_equal(catalog_resolve(c, "m.safetensors", NULL, &a, &err), 0);
        assert_int_equal(catalog_resolve(c, "m.safetensors", NULL, &b, &err), 0);
        assert_ptr_equal(a->files[0].header, b->files[0].header); /* cached */
        assert_int_equal(catalog_cached_headers(c), 1);
        component_free(b);

        /* Same size, new mtime: a different identity. */
        assert_int_equal(utimes(path, tv), 0);
        assert_int_equal(catalog_resolve(c, "m.safetensors", NULL, &b, &err), 0);
        assert_false(file_id_equal(&a->files[0].id, &b->files[0].id));
        assert_ptr_not_equal(a->files[0].header, b->files[0].header);
        assert_int_equal(catalog_cached_headers(c), 2);
        component_free(b);

        /* Truncated: now invalid, and said so. */
        assert_int_equal(truncate(path, 40), 0);
        assert_int_equal(catalog_resolve(c, "m.safetensors", NULL, &b, &err), WD_E_FORMAT);
        component_free(a);
        remove_tree(dir);
}

/* Every malformed file, served as a model: refused by the catalog with the
 * corpus's error, the path shown beneath the root's display name. */
static void test_corpus_as_models(void **state) {
        _cleanup_(json_decrefp) json_t *expected = json_load_file(testdata("bad/expected.json"), 0, NULL);
        _cleanup_close_ int root_fd = open(testdata("bad"), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        _cleanup_(catalog_freep) Catalog *c = NULL;
        const char *name;
        json_t *value;

        assert_non_null(expected);
        assert_int_equal(catalog_new(&c, root_fd, "/models"), 0);
        json_object_foreach(expected, name, value) {
                _cleanup_free_ char *shown = NULL;
                Component *comp = NULL;
                WdError err = WD_ERROR_NULL;

                assert_true(asprintf(&shown, "/models/%s: ", name) > 0);
                if (catalog_resolve(c, name, NULL, &comp, &err) != WD_E_FORMAT ||
                    !strstr(err.message, json_string_value(value)) || strncmp(err.message, shown, strlen(shown)) != 0)
                        fail_msg("%s: %s", name, err.message);
                assert_null(comp);
        }
        assert_int_equal(catalog_cached_headers(c), 0); /* nothing invalid is cached */
}

/* Two files of one component holding the same tensor name. */
static void test_duplicate_across_files(void **state) {
        _cleanup_free_ char *dir = make_temp_dir(NULL), *cmd = NULL;
        _cleanup_(catalog_freep) Catalog *c = NULL;
        _cleanup_close_ int root_fd = -1;
        Component *comp = NULL;
        WdError err = WD_ERROR_NULL;

        assert_true(asprintf(&cmd, "cp '%s' '%s/a.safetensors' && cp '%s' '%s/b.safetensors'",
                             testdata("good/scalars.safetensors"), dir, testdata("good/scalars.safetensors"), dir) > 0);
        assert_int_equal(system(cmd), 0);
        root_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        assert_int_equal(catalog_new(&c, root_fd, "m"), 0);
        assert_int_equal(catalog_resolve(c, "", NULL, &comp, &err), WD_E_FORMAT);
        assert_non_null(strstr(err.message, "is stored in more than one file"));
        assert_null(comp);
        remove_tree(dir);
}

/* Resolving again skips the checks of an unchanged index and an unchanged
 * set of files, but never those of a changed one. */
static void test_memo_sees_changes(void **state) {
        _cleanup_free_ char *dir = make_temp_dir(NULL), *cmd = NULL, *index = NULL;
        _cleanup_(catalog_freep) Catalog *c = NULL;
        _cleanup_close_ int root_fd = -1;
        Component *a = NULL, *b = NULL;
        WdError err = WD_ERROR_NULL;
        json_t *j;

        /* testdata() returns one static buffer: one call per command. */
        assert_true(asprintf(&cmd, "cp -r '%s' '%s/m'", testdata("models/sharded"), dir) > 0);
        assert_int_equal(system(cmd), 0);
        free(cmd);
        assert_true(asprintf(&cmd, "cp '%s' '%s/d1.safetensors'", testdata("good/scalars.safetensors"), dir) > 0);
        assert_int_equal(system(cmd), 0);
        free(cmd);
        assert_true(asprintf(&cmd, "cp '%s' '%s/d2.safetensors'", testdata("good/zero-size.safetensors"), dir) > 0);
        assert_int_equal(system(cmd), 0);
        assert_true(asprintf(&index, "%s/m/model.safetensors.index.json", dir) > 0);
        root_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        assert_int_equal(catalog_new(&c, root_fd, dir), 0);

        assert_int_equal(catalog_resolve(c, "m", NULL, &a, &err), 0);
        assert_int_equal(catalog_resolve(c, "m", NULL, &b, &err), 0);
        /* The memo's answer is the index's: the shards it names, in order. */
        j = json_load_file(index, 0, NULL);
        assert_non_null(j);
        assert_int_equal(b->n_files, 3);
        for (size_t i = 0; i < b->n_files; i++) {
                char want[64];
                const char *v;
                json_t *t;
                bool named = false;

                snprintf(want, sizeof(want), "m/model-%05zu-of-00003.safetensors", i + 1);
                assert_string_equal(b->files[i].path, want);
                json_object_foreach(json_object_get(j, "weight_map"), v, t)
                        named = named || strcmp(json_string_value(t), want + 2) == 0;
                assert_true(named);
        }
        json_decref(j);
        assert_int_equal(a->n_files, b->n_files);
        assert_int_equal(a->n_tensors, b->n_tensors);
        assert_int_equal(a->total_bytes, b->total_bytes);
        for (size_t i = 0; i < a->n_files; i++)
                assert_string_equal(a->files[i].path, b->files[i].path);
        component_free(b);

        /* The index now puts a tensor in the wrong shard: refused. */
        j = json_load_file(index, 0, NULL);
        assert_non_null(j);
        json_object_set_new(json_object_get(j, "weight_map"), "extra.bool",
                            json_string("model-00001-of-00003.safetensors"));
        assert_int_equal(json_dump_file(j, index, 0), 0);
        json_decref(j);
        assert_int_equal(catalog_resolve(c, "m", NULL, &b, &err), WD_E_FORMAT);
        assert_non_null(strstr(err.message, "extra.bool"));

        /* Two files whose names do not clash, then one replaced by a copy of
         * the other: the clash is found. */
        component_free(a);
        a = NULL;
        free(cmd);
        assert_true(asprintf(&cmd, "rm -r '%s/m'", dir) > 0);
        assert_int_equal(system(cmd), 0);
        assert_int_equal(catalog_resolve(c, "", NULL, &a, &err), 0);
        assert_int_equal(catalog_resolve(c, "", NULL, &b, &err), 0);
        component_free(b);
        free(cmd);
        assert_true(asprintf(&cmd, "cp '%s/d1.safetensors' '%s/d2.tmp' && mv '%s/d2.tmp' '%s/d2.safetensors'", dir, dir,
                             dir, dir) > 0);
        assert_int_equal(system(cmd), 0);
        assert_int_equal(catalog_resolve(c, "", NULL, &b, &err), WD_E_FORMAT);
        assert_non_null(strstr(err.message, "is stored in more than one file"));
        component_free(a);
        remove_tree(dir);
}

/* ---- concurrency ---- */

typedef struct Case {
        const char *model, *component;
        int code; /* what catalog_resolve() must return */
} Case;

/* The same and different models, sharded ones (index memo), several files
 * of one component (unique-names memo), and failures. */
static const Case concurrent_cases[] = {
        { "plain", NULL, 0 },
        { "sharded", NULL, 0 },
        { "single.safetensors", NULL, 0 },
        { "diffusers", "transformer", 0 },
        { "diffusers", "vae", 0 },
        { "diffusers", "text_encoder", 0 },
        { "diffusers", "controlnet", 0 },
        { "diffusers-pickle", "vae", 0 },
        { "sharded", NULL, 0 },
        { "index-wrong-shard", NULL, WD_E_FORMAT },
        { "does-not-exist", NULL, WD_E_NOT_FOUND },
        { "diffusers", "transformer", 0 },
};

#define N_THREADS 8

typedef struct Shared {
        int root_fd;
        Catalog *catalog;
        pthread_barrier_t start;
        pthread_mutex_t lock;
        char failure[512]; /* the first one; cmocka asserts only in the main thread */
        unsigned n_resolved;
} Shared;

static void shared_fail(Shared *s, const char *fmt, ...) _printf_(2, 3);
static void shared_fail(Shared *s, const char *fmt, ...) {
        va_list ap;

        pthread_mutex_lock(&s->lock);
        if (!s->failure[0]) {
                va_start(ap, fmt);
                vsnprintf(s->failure, sizeof(s->failure), fmt, ap);
                va_end(ap);
        }
        pthread_mutex_unlock(&s->lock);
}

/* The first bytes of a file beneath root_fd, read with read(). */
static uint8_t *read_prefix(int root_fd, const char *path, size_t n, struct stat *ret_st) {
        int fd = openat(root_fd, path, O_RDONLY | O_CLOEXEC);
        uint8_t *buf = NULL;
        size_t done = 0;

        if (fd < 0)
                return NULL;
        if (fstat(fd, ret_st) == 0 && (buf = malloc(n + 1)))
                while (done < n) {
                        ssize_t k = read(fd, buf + done, n - done);
                        if (k <= 0) {
                                free(buf);
                                buf = NULL;
                                break;
                        }
                        done += (size_t) k;
                }
        close(fd);
        return buf;
}

/* A file of a resolved component against the file itself: its identity and
 * size, the header bytes, and the tensors of the header JSON parsed here.
 * Returns NULL or what differs (static text). */
static const char *check_file_against_disk(int root_fd, const CatalogFile *cf) {
        _cleanup_(json_decrefp) json_t *j = NULL;
        _cleanup_free_ uint8_t *buf = NULL;
        const StHeader *h = cf->header;
        uint64_t len = 0, data_offset;
        struct stat st;
        FileId id;
        size_t n = 0;
        const char *key;
        json_t *value;

        buf = read_prefix(root_fd, cf->path, 8, &st);
        if (!buf)
                return "cannot read the file's length prefix";
        for (unsigned i = 0; i < 8; i++)
                len |= (uint64_t) buf[i] << (8 * i);
        data_offset = 8 + len;
        free(buf);
        buf = read_prefix(root_fd, cf->path, data_offset, &st);
        if (!buf)
                return "cannot read the file's header";
        file_id_from_stat(&id, &st);
        if (!file_id_equal(&id, &cf->id))
                return "identity differs from the file's";
        if (h->file_size != (uint64_t) st.st_size || h->data_offset != data_offset)
                return "size or data offset differs from the file's";
        if (memcmp(h->raw, buf, data_offset) != 0)
                return "header bytes differ from the file's";
        j = json_loadb((const char *) buf + 8, len, 0, NULL);
        if (!json_is_object(j))
                return "the file's header is not a JSON object";
        json_object_foreach(j, key, value) {
                const StTensor *t;
                json_t *o;

                if (strcmp(key, "__metadata__") == 0)
                        continue;
                n++;
                t = st_header_find(h, key);
                o = json_object_get(value, "data_offsets");
                if (!t || json_integer_value(json_array_get(o, 0)) != (json_int_t) t->begin ||
                    json_integer_value(json_array_get(o, 1)) != (json_int_t) t->end)
                        return "a tensor differs from the file's";
        }
        if (n != h->n_tensors)
                return "tensor count differs from the file's";
        return NULL;
}

/* A component against the files and against the reference resolve. */
static void check_component(Shared *s, const Case *k, const Component *c, const Component *ref) {
        uint64_t bytes = 0;
        size_t tensors = 0;

        if (c->n_files != ref->n_files) {
                shared_fail(s, "%s/%s: %zu files, expected %zu", k->model, k->component ? k->component : "",
                            c->n_files, ref->n_files);
                return;
        }
        for (size_t i = 0; i < c->n_files; i++) {
                const char *why;

                if (strcmp(c->files[i].path, ref->files[i].path) != 0) {
                        shared_fail(s, "%s: file %zu is %s, expected %s", k->model, i, c->files[i].path,
                                    ref->files[i].path);
                        return;
                }
                why = check_file_against_disk(s->root_fd, &c->files[i]);
                if (why) {
                        shared_fail(s, "%s: %s", c->files[i].path, why);
                        return;
                }
                bytes += c->files[i].header->file_size;
                tensors += c->files[i].header->n_tensors;
        }
        if (c->total_bytes != bytes || c->n_tensors != tensors)
                shared_fail(s, "%s: totals differ from the files'", k->model);
}

typedef struct Worker {
        Shared *shared;
        unsigned index;
        Component *const *refs; /* one per case, from a single-threaded resolve */
} Worker;

static void *resolve_worker(void *userdata) {
        Worker *w = userdata;
        Shared *s = w->shared;
        size_t n = ELEMENTSOF(concurrent_cases);

        pthread_barrier_wait(&s->start);
        for (size_t pass = 0; pass < 2; pass++)
                for (size_t i = 0; i < n; i++) {
                        size_t ci = (i + w->index) % n; /* each thread in another order */
                        const Case *k = &concurrent_cases[ci];
                        _cleanup_(component_list_freep) ComponentList *l = NULL;
                        _cleanup_(component_freep) Component *c = NULL;
                        WdError err = WD_ERROR_NULL;
                        int r;

                        r = catalog_resolve(s->catalog, k->model, k->component, &c, &err);
                        if (r != k->code) {
                                shared_fail(s, "%s/%s: %s: %s", k->model, k->component ? k->component : "",
                                            wd_error_code_name(r), err.message);
                                continue;
                        }
                        if (r == 0)
                                check_component(s, k, c, w->refs[ci]);
                        if (k->component && catalog_list(s->catalog, k->model, &l, &err) != 0)
                                shared_fail(s, "list %s: %s", k->model, err.message);
                        pthread_mutex_lock(&s->lock);
                        s->n_resolved++;
                        pthread_mutex_unlock(&s->lock);
                }
        return NULL;
}

/* N threads resolve the same and different models of one fresh catalog at
 * once, so that they race on first parses, cache inserts and memos: every
 * component matches the files, and the cache holds each file once, as many
 * headers as a single-threaded run over the same models caches. */
static void test_concurrent_resolve(void **state) {
        _cleanup_close_ int root_fd = open(testdata("models"), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        Component *refs[ELEMENTSOF(concurrent_cases)] = {};
        size_t ref_cached;

        assert_true(root_fd >= 0);
        {
                _cleanup_(catalog_freep) Catalog *c = NULL;

                assert_int_equal(catalog_new(&c, root_fd, "models"), 0);
                for (size_t i = 0; i < ELEMENTSOF(concurrent_cases); i++) {
                        const Case *k = &concurrent_cases[i];
                        WdError err = WD_ERROR_NULL;

                        assert_int_equal(catalog_resolve(c, k->model, k->component, &refs[i], &err), k->code);
                }
                ref_cached = catalog_cached_headers(c);
        }

        for (unsigned round = 0; round < 8; round++) {
                Shared s = { .root_fd = root_fd };
                Worker w[N_THREADS];
                pthread_t t[N_THREADS];

                assert_int_equal(catalog_new(&s.catalog, root_fd, "models"), 0);
                assert_int_equal(pthread_barrier_init(&s.start, NULL, N_THREADS), 0);
                assert_int_equal(pthread_mutex_init(&s.lock, NULL), 0);
                for (unsigned i = 0; i < N_THREADS; i++) {
                        w[i] = (Worker){ .shared = &s, .index = i + round, .refs = refs };
                        assert_int_equal(pthread_create(&t[i], NULL, resolve_worker, &w[i]), 0);
                }
                for (unsigned i = 0; i < N_THREADS; i++)
                        assert_int_equal(pthread_join(t[i], NULL), 0);
                if (s.failure[0])
                        fail_msg("round %u: %s", round, s.failure);
                assert_int_equal(s.n_resolved, N_THREADS * 2 * ELEMENTSOF(concurrent_cases));
                assert_int_equal(catalog_cached_headers(s.catalog), ref_cached);
                catalog_free(s.catalog);
                pthread_barrier_destroy(&s.start);
                pthread_mutex_destroy(&s.lock);
        }
        for (size_t i = 0; i < ELEMENTSOF(concurrent_cases); i++)
                component_free(refs[i]);
}

/* Holds the parse of one file until released (or 10 s pass, so that a
 * catalog that does block fails the test instead of hanging it). */
typedef struct Hold {
        const char *path; /* beneath the root: the parse to hold */
        pthread_mutex_t lock;
        pthread_cond_t cond;
        bool entered, released, timed_out, parsed;
        int resolve_result;
        Catalog *catalog;
        Component *component;
} Hold;

static void hold_parse(void *userdata, const char *path) {
        Hold *h = userdata;
        struct timespec deadline;
        int r = 0;

        if (strcmp(path, h->path) != 0)
                return;
        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_sec += 10;
        pthread_mutex_lock(&h->lock);
        h->entered = true;
        pthread_cond_broadcast(&h->cond);
        while (!h->released && r != ETIMEDOUT)
                r = pthread_cond_timedwait(&h->cond, &h->lock, &deadline);
        h->timed_out = !h->released;
        pthread_mutex_unlock(&h->lock);
}

/* The held parse has neither finished nor timed out. */
static bool hold_in_progress(Hold *h) {
        bool b;

        pthread_mutex_lock(&h->lock);
        b = h->entered && !h->parsed && !h->timed_out;
        pthread_mutex_unlock(&h->lock);
        return b;
}

static void *held_resolve(void *userdata) {
        Hold *h = userdata;
        WdError err = WD_ERROR_NULL;
        int r;

        r = catalog_resolve(h->catalog, h->path, NULL, &h->component, &err);
        pthread_mutex_lock(&h->lock);
        h->resolve_result = r;
        h->parsed = true;
        pthread_mutex_unlock(&h->lock);
        return NULL;
}

/* Review finding 12: while one thread parses a header that is not cached
 * (held here in the parse for as long as the test needs), resolves of other,
 * cached models on the same catalog (index memo and headers hit), a listing,
 * and even another model's first parse complete, each quickly. */
static void test_parse_does_not_block_others(void **state) {
        _cleanup_close_ int root_fd = open(testdata("models"), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        _cleanup_(catalog_freep) Catalog *c = NULL;
        Hold h = { .path = "single.safetensors" };
        static const Case cached[] = {
                { "sharded", NULL, 0 },
                { "plain", NULL, 0 },
                { "diffusers", "transformer", 0 },
                { "diffusers", "controlnet", 0 },
        };
        char failure[1200] = "";
        uint64_t slowest = 0;
        const char *why;
        pthread_t t;

        assert_true(root_fd >= 0);
        assert_int_equal(pthread_mutex_init(&h.lock, NULL), 0);
        assert_int_equal(pthread_cond_init(&h.cond, NULL), 0);
        assert_int_equal(catalog_new(&c, root_fd, "models"), 0);
        h.catalog = c;
        for (size_t i = 0; i < ELEMENTSOF(cached); i++)
                component_free(resolve_ok(&(Fixture){ .catalog = c }, cached[i].model, cached[i].component));
        catalog_set_parse_hook(c, hold_parse, &h);

        assert_int_equal(pthread_create(&t, NULL, held_resolve, &h), 0);
        pthread_mutex_lock(&h.lock);
        while (!h.entered && !h.parsed)
                pthread_cond_wait(&h.cond, &h.lock);
        pthread_mutex_unlock(&h.lock);
        assert_true(h.entered);

        /* The parse is held: everything else goes on, each resolve while the
         * parse is still held.  The fastest of three tries of each bounds the
         * time, so that a busy machine does not fail the test. */
        for (size_t i = 0; i < ELEMENTSOF(cached) && !failure[0]; i++) {
                uint64_t best = UINT64_MAX;

                for (unsigned k = 0; k < 3 && !failure[0]; k++) {
                        uint64_t t0 = now_usec(), dt;

                        component_free(resolve_ok(&(Fixture){ .catalog = c }, cached[i].model, cached[i].component));
                        dt = now_usec() - t0;
                        best = MIN(best, dt);
                        if (!hold_in_progress(&h))
                                snprintf(failure, sizeof(failure),
                                         "%s: a cached resolve finished only after another model's parse (%llu ms)",
                                         cached[i].model, (unsigned long long) (dt / 1000));
                }
                if (!failure[0] && best >= 50 * 1000)
                        snprintf(failure, sizeof(failure),
                                 "%s: a cached resolve took %llu ms while another model's parse was in progress",
                                 cached[i].model, (unsigned long long) (best / 1000));
                slowest = MAX(slowest, best);
        }
        if (!failure[0]) {
                _cleanup_(component_list_freep) ComponentList *l = NULL;
                WdError err = WD_ERROR_NULL;

                if (catalog_list(c, "diffusers", &l, &err) != 0 || !hold_in_progress(&h))
                        snprintf(failure, sizeof(failure), "listing diffusers during another's parse: %s",
                                 err.message[0] ? err.message : "finished only after it");
        }
        if (!failure[0]) {
                /* Another model's first parse does not wait for the held one either. */
                component_free(resolve_ok(&(Fixture){ .catalog = c }, "diffusers", "vae"));
                (void) catalog_cached_headers(c);
                if (!hold_in_progress(&h))
                        snprintf(failure, sizeof(failure), "diffusers/vae: its parse waited for another's");
        }

        pthread_mutex_lock(&h.lock);
        h.released = true;
        pthread_cond_broadcast(&h.cond);
        pthread_mutex_unlock(&h.lock);
        assert_int_equal(pthread_join(t, NULL), 0);
        if (failure[0])
                fail_msg("%s", failure);
        assert_false(h.timed_out);
        print_message("cached resolves during another's parse: slowest %llu us\n", (unsigned long long) slowest);

        /* And the held resolve itself is right. */
        assert_int_equal(h.resolve_result, 0);
        assert_int_equal(h.component->n_files, 1);
        why = check_file_against_disk(root_fd, &h.component->files[0]);
        if (why)
                fail_msg("%s: %s", h.path, why);
        component_free(h.component);
        pthread_cond_destroy(&h.cond);
        pthread_mutex_destroy(&h.lock);
}

/* A safetensors file of one U8 tensor, t<n>, holding the byte value. */
static void write_one_tensor(const char *path, unsigned n, uint8_t value) {
        char header[128];
        uint64_t len = (uint64_t) snprintf(header, sizeof(header),
                                           "{\"t%u\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", n);
        FILE *f = fopen(path, "we");

        assert_non_null(f);
        assert_int_equal(fwrite(&len, 8, 1, f), 1);
        assert_int_equal(fwrite(header, 1, len, f), len);
        assert_int_equal(fwrite(&value, 1, 1, f), 1);
        assert_int_equal(fclose(f), 0);
}

/* The header cache past its capacity (a catalog of 512): which resolves
 * parse and which are served from the cache, against a least-recently-used
 * list of the same capacity kept here (an array searched and shifted by
 * hand). */
#define LRU_CAP 512
#define LRU_FILES 600

static void count_parse(void *userdata, const char *path) {
        (*(unsigned *) userdata)++;
}

static void test_header_cache_lru(void **state) {
        _cleanup_free_ char *dir = make_temp_dir(NULL);
        _cleanup_free_ unsigned *lru = calloc(LRU_CAP, sizeof(unsigned)); /* file numbers, most recent first */
        _cleanup_(catalog_freep) Catalog *c = NULL;
        _cleanup_close_ int root_fd = -1;
        size_t n_lru = 0;
        unsigned parses = 0, want_parses = 0;
        uint64_t rng = 42;
        char name[64];

        assert_non_null(lru);
        for (unsigned i = 0; i < LRU_FILES; i++) {
                char path[PATH_MAX];

                snprintf(path, sizeof(path), "%s/f%u.safetensors", dir, i);
                write_one_tensor(path, i, (uint8_t) i);
        }
        root_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        assert_true(root_fd >= 0);
        assert_int_equal(catalog_new_sized(&c, root_fd, dir, LRU_CAP), 0);
        catalog_set_parse_hook(c, count_parse, &parses);

        for (unsigned step = 0; step < 6 * LRU_FILES; step++) {
                /* First every file in order, then at random: hits and misses both. */
                unsigned i, at;
                Component *comp = NULL;
                WdError err = WD_ERROR_NULL;

                if (step < LRU_FILES)
                        i = step;
                else {
                        rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
                        i = (unsigned) ((rng >> 33) % LRU_FILES);
                }
                for (at = 0; at < n_lru && lru[at] != i; at++)
                        ;
                if (at == n_lru) { /* a miss: parsed, and the least recently used goes */
                        want_parses++;
                        if (n_lru < LRU_CAP)
                                n_lru++;
                        at = (unsigned) n_lru - 1;
                }
                memmove(&lru[1], &lru[0], at * sizeof(unsigned));
                lru[0] = i;

                snprintf(name, sizeof(name), "f%u.safetensors", i);
                assert_int_equal(catalog_resolve(c, name, NULL, &comp, &err), 0);
                assert_int_equal(comp->files[0].header->n_tensors, 1);
                snprintf(name, sizeof(name), "t%u", i);
                assert_string_equal(comp->files[0].header->tensors[0].name, name);
                component_free(comp);
                assert_int_equal(parses, want_parses);
                assert_int_equal(catalog_cached_headers(c), n_lru);
        }
        remove_tree(dir);
}

/* More sharded models than the catalog once remembered (64 indexes, 4096
 * headers): after a first resolve of each, resolving them all again parses
 * no index and no header, and gives the same files. */
static void test_many_sharded_models(void **state) {
        enum { MODELS = 2100, SHARDS = 2 };
        _cleanup_free_ char *dir = make_temp_dir(NULL);
        _cleanup_(catalog_freep) Catalog *c = NULL;
        _cleanup_close_ int root_fd = -1;
        unsigned parses = 0;
        char path[PATH_MAX], name[64];

        for (unsigned i = 0; i < MODELS; i++) {
                FILE *f;

                snprintf(path, sizeof(path), "%s/m%u", dir, i);
                assert_int_equal(mkdir(path, 0755), 0);
                for (unsigned k = 0; k < SHARDS; k++) {
                        snprintf(path, sizeof(path), "%s/m%u/model-%05u-of-%05u.safetensors", dir, i, k + 1, SHARDS);
                        write_one_tensor(path, k, (uint8_t) (i + k));
                }
                snprintf(path, sizeof(path), "%s/m%u/model.safetensors.index.json", dir, i);
                f = fopen(path, "we");
                assert_non_null(f);
                fprintf(f, "{\"weight_map\":{\"t0\":\"model-00001-of-00002.safetensors\","
                           "\"t1\":\"model-00002-of-00002.safetensors\"}}");
                assert_int_equal(fclose(f), 0);
        }
        root_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        assert_true(root_fd >= 0);
        assert_int_equal(catalog_new(&c, root_fd, dir), 0);
        catalog_set_parse_hook(c, count_parse, &parses);

        for (unsigned pass = 0; pass < 2; pass++) {
                for (unsigned i = 0; i < MODELS; i++) {
                        Component *comp = NULL;
                        WdError err = WD_ERROR_NULL;

                        snprintf(name, sizeof(name), "m%u", i);
                        assert_int_equal(catalog_resolve(c, name, NULL, &comp, &err), 0);
                        assert_int_equal(comp->n_files, SHARDS);
                        for (unsigned k = 0; k < SHARDS; k++) {
                                snprintf(path, sizeof(path), "m%u/model-%05u-of-%05u.safetensors", i, k + 1, SHARDS);
                                assert_string_equal(comp->files[k].path, path);
                        }
                        component_free(comp);
                }
                /* The first pass: every index and every header once. */
                assert_int_equal(parses, MODELS * (1 + SHARDS));
        }
        remove_tree(dir);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_single_and_plain, setup, teardown),
                cmocka_unit_test_setup_teardown(test_sharded, setup, teardown),
                cmocka_unit_test_setup_teardown(test_diffusers, setup, teardown),
                cmocka_unit_test_setup_teardown(test_pickle_only, setup, teardown),
                cmocka_unit_test_setup_teardown(test_broken_indexes, setup, teardown),
                cmocka_unit_test(test_escapes),
                cmocka_unit_test(test_identity_change),
                cmocka_unit_test(test_duplicate_across_files),
                cmocka_unit_test(test_memo_sees_changes),
                cmocka_unit_test(test_corpus_as_models),
                cmocka_unit_test(test_concurrent_resolve),
                cmocka_unit_test(test_parse_does_not_block_others),
                cmocka_unit_test(test_header_cache_lru),
                cmocka_unit_test(test_many_sharded_models),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
