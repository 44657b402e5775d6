/* wd-inspect: print what the format layer makes of a file or model, as JSON.
 *
 *   wd-inspect header FILE             the validated safetensors header
 *   wd-inspect list MODEL              the components of a model
 *   wd-inspect resolve MODEL [COMP]    the files of a component
 *
 * On a refusal it prints "CODE: message" on stderr and exits 1; usage errors
 * exit 2.  Tests compare its output with the safetensors library. */
#include <jansson.h>
#include <stdio.h>
#include <string.h>

#include "format/catalog.h"
#include "tools/tool-util.h"

static json_t *shape_json(const StTensor *t) {
        json_t *a = json_array();

        for (unsigned i = 0; i < t->ndim; i++)
                json_array_append_new(a, json_integer((json_int_t) t->shape[i]));
        return a;
}

static json_t *header_json(const StHeader *h) {
        json_t *o = json_object(), *tensors = json_array(), *meta = json_object();

        for (size_t i = 0; i < h->n_tensors; i++) {
                const StTensor *t = &h->tensors[i];

                json_array_append_new(tensors, json_pack("{s:s, s:s, s:o, s:[I, I]}", "name", t->name, "dtype",
                                                         dtype_to_string(t->dtype), "shape", shape_json(t),
                                                         "data_offsets", (json_int_t) t->begin,
                                                         (json_int_t) t->end));
        }
        for (size_t i = 0; i < h->n_metadata; i++)
                json_object_set_new(meta, h->metadata[i].key, json_string(h->metadata[i].value));
        json_object_set_new(o, "file_size", json_integer((json_int_t) h->file_size));
        json_object_set_new(o, "header_len", json_integer((json_int_t) h->header_len));
        json_object_set_new(o, "tensors", tensors);
        json_object_set_new(o, "metadata", meta);
        return o;
}

static int fail(const WdError *err) {
        fprintf(stderr, "%s: %s\n", wd_error_code_name(err->code), err->message);
        return 1;
}

static int print_json(json_t *j) {
        int r = json_dumpf(j, stdout, JSON_INDENT(1) | JSON_ENSURE_ASCII);

        json_decref(j);
        fputc('\n', stdout);
        return r == 0 ? 0 : 1;
}

static int cmd_header(const char *path) {
        _cleanup_(st_header_unrefp) StHeader *h = NULL;
        _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
        WdError err = WD_ERROR_NULL;

        if (fd < 0) {
                fprintf(stderr, "%s: %m\n", path);
                return 1;
        }
        if (st_header_parse_fd(fd, path, &h, &err) != 0)
                return fail(&err);
        return print_json(header_json(h));
}

static int cmd_list(Catalog *c, const char *model) {
        _cleanup_(component_list_freep) ComponentList *l = NULL;
        WdError err = WD_ERROR_NULL;
        json_t *a;

        if (catalog_list(c, model, &l, &err) != 0)
                return fail(&err);
        a = json_array();
        for (size_t i = 0; i < l->n; i++) {
                const ComponentInfo *ci = &l->items[i];

                json_array_append_new(a, json_pack("{s:s, s:s, s:s?, s:s?}", "name", ci->name, "kind",
                                                   component_kind_to_string(ci->kind), "library", ci->library,
                                                   "class", ci->class_name));
        }
        return print_json(json_pack("{s:b, s:o}", "diffusers", l->diffusers, "components", a));
}

static int cmd_resolve(Catalog *c, const char *model, const char *component) {
        _cleanup_(component_freep) Component *comp = NULL;
        WdError err = WD_ERROR_NULL;
        json_t *files;

        if (catalog_resolve(c, model, component, &comp, &err) != 0)
                return fail(&err);
        files = json_array();
        for (size_t i = 0; i < comp->n_files; i++)
                json_array_append_new(files, json_pack("{s:s, s:I, s:o}", "path", comp->files[i].display, "size",
                                                       (json_int_t) comp->files[i].id.size, "header",
                                                       header_json(comp->files[i].header)));
        return print_json(json_pack("{s:s, s:I, s:I, s:o}", "component", comp->name, "total_bytes",
                                    (json_int_t) comp->total_bytes, "n_tensors", (json_int_t) comp->n_tensors,
                                    "files", files));
}

int main(int argc, char **argv) {
        _cleanup_(catalog_freep) Catalog *c = NULL;
        _cleanup_free_ char *model = NULL;
        _cleanup_close_ int root = -1;
        int r;

        if (argc == 3 && strcmp(argv[1], "header") == 0)
                return cmd_header(argv[2]);
        if (argc < 3 || argc > 4 || (strcmp(argv[1], "list") != 0 && strcmp(argv[1], "resolve") != 0) ||
            (strcmp(argv[1], "list") == 0 && argc != 3)) {
                fprintf(stderr, "usage: wd-inspect header FILE | list MODEL | resolve MODEL [COMPONENT]\n");
                return 2;
        }
        r = tool_open_root(argv[2], &root, &model);
        if (r < 0) {
                fprintf(stderr, "NOT_FOUND: %s: %s\n", argv[2], strerror(-r));
                return 1;
        }
        if (catalog_new(&c, root, "/") < 0)
                return 1;
        if (strcmp(argv[1], "list") == 0)
                return cmd_list(c, model);
        return cmd_resolve(c, model, argc == 4 ? argv[3] : NULL);
}
