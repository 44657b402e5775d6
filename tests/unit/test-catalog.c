/* Catalog tests: every layout the generator writes, broken indexes, absent
 * and pickle-only components, escapes from the model root, and the identity
 * cache noticing a changed file.  Expected file lists come from the layout
 * the generator wrote, read back with readdir() and the index JSON. */
#include <dirent.h>
#include <jansson.h>
#include <sys/time.h>

#include "format/catalog.h"
#include "test-util.h"

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
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
