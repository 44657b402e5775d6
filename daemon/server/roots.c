/* Model roots: lexical normalisation of client paths, the prefix match that
 * picks a root, and one catalog per root.  See roots.h. */

#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "path-util.h"
#include "server/roots.h"

static void root_deinit(Root *r) {
        catalog_free(r->catalog);
        safe_close(r->fd);
        free(r->path);
}

Roots *roots_ref(Roots *r) {
        r->n_ref++;
        return r;
}

Roots *roots_unref(Roots *r) {
        if (!r || --r->n_ref > 0)
                return NULL;
        for (size_t i = 0; i < r->n; i++)
                root_deinit(&r->items[i]);
        free(r->items);
        free(r);
        return NULL;
}

int roots_new(Roots **ret, char *const *paths, size_t n) {
        _cleanup_(roots_unrefp) Roots *r = NULL;
        int k;

        r = calloc(1, sizeof(Roots));
        if (!r)
                return -ENOMEM;
        r->n_ref = 1;
        r->items = calloc(n ? n : 1, sizeof(Root));
        if (!r->items)
                return -ENOMEM;

        for (size_t i = 0; i < n; i++) {
                Root *root = &r->items[r->n];

                root->fd = -1;
                k = path_simplify(paths[i], &root->path);
                if (k == -ENOMEM)
                        return k;
                if (k < 0)
                        continue; /* the config parser refuses these */
                r->n++;
                root->fd = open(root->path, O_PATH | O_DIRECTORY | O_CLOEXEC);
                if (root->fd < 0) {
                        root->open_error = negative_errno();
                        continue;
                }
                k = catalog_new(&root->catalog, root->fd, root->path);
                if (k < 0)
                        return k;
        }
        *ret = TAKE_PTR(r);
        return 0;
}

Root *roots_find(Roots *r, const char *path) {
        for (size_t i = 0; i < r->n; i++)
                if (strcmp(r->items[i].path, path) == 0)
                        return &r->items[i];
        return NULL;
}

/* Whether root is path or a parent directory of it. */
static const char *beneath(const char *root, const char *path) {
        size_t n = strlen(root);

        if (strcmp(root, "/") == 0)
                return path + 1;
        if (strncmp(root, path, n) != 0)
                return NULL;
        if (path[n] == 0)
                return path + n;
        if (path[n] == '/')
                return path + n + 1;
        return NULL;
}

int roots_resolve(Roots *r, const char *model, Root **ret_root, char **ret_rel, char **ret_key, WdError *err) {
        _cleanup_free_ char *key = NULL;
        char shown[256];
        Root *best = NULL;
        const char *rest = NULL;
        int k;

        wd_escape(shown, sizeof(shown), model, 200);
        k = path_simplify(model, &key);
        if (k == -ENOMEM)
                return wd_error_set(err, k, "out of memory");
        if (k < 0)
                return wd_error_set(err, WD_E_INVALID, "model \"%s\": %s", shown,
                                    k == -ENAMETOOLONG ? "path too long" : "not an absolute path");

        /* The longest matching root wins, so nested roots behave. */
        for (size_t i = 0; i < r->n; i++) {
                const char *b = beneath(r->items[i].path, key);
                if (b && (!best || strlen(r->items[i].path) > strlen(best->path))) {
                        best = &r->items[i];
                        rest = b;
                }
        }
        if (!best)
                return wd_error_set(err, WD_E_PERMISSION, "model \"%s\": outside every model root", shown);
        if (best->fd < 0)
                return wd_error_set(err, WD_E_NOT_FOUND, "model root %s cannot be opened: %s", best->path,
                                    strerror(-best->open_error));

        char *rel = strdup(*rest ? rest : ".");
        if (!rel)
                return wd_error_set(err, -ENOMEM, "out of memory");
        *ret_root = best;
        *ret_rel = rel;
        *ret_key = TAKE_PTR(key);
        return 0;
}
