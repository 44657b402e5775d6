/* Model roots: the directories under which the daemon opens models.
 *
 * A client names a model by absolute path.  The path is normalised lexically
 * ("//", "/./" and a trailing '/' go; ".." stays, for openat2 to judge), the
 * root whose path is a prefix at a component boundary is found, and the rest
 * is opened beneath that root's fd with RESOLVE_BENEATH: "..", absolute
 * symlinks and symlinks leading out of the root are refused there.  Each root
 * keeps its own catalog (and its header cache). */
#pragma once

#include <stddef.h>

#include "format/catalog.h"
#include "util/error.h"

typedef struct Root {
        char *path; /* normalised, absolute */
        int fd;     /* O_PATH|O_DIRECTORY, or -1 when it could not be opened */
        int open_error;
        Catalog *catalog;
} Root;

/* Shared by the server and the requests resolving beneath it on worker
 * threads, so a reload can replace the server's while they run. */
typedef struct Roots {
        unsigned n_ref;
        size_t n;
        Root *items;
} Roots;

/* Open every root (one reference).  A root that cannot be opened is kept with fd -1 (and
 * requests under it fail with its error): mounts may come later, and a
 * reload retries.  Returns 0 or -ENOMEM. */
int roots_new(Roots **ret, char *const *paths, size_t n);
Roots *roots_ref(Roots *r);
/* Frees the roots, their descriptors and catalogs with the last reference.
 * Only on the loop thread. */
Roots *roots_unref(Roots *r);
DEFINE_TRIVIAL_CLEANUP_FUNC(Roots *, roots_unref);

/* A root with this path, or NULL. */
Root *roots_find(Roots *r, const char *path);

/* The root holding model, the path beneath it ("." for the root itself) and
 * the normalised absolute path that keys the model in the cache.
 * Returns 0, WD_E_INVALID (not an absolute path), WD_E_PERMISSION (outside
 * every root), WD_E_NOT_FOUND (its root could not be opened), -ENOMEM. */
int roots_resolve(Roots *r, const char *model, Root **ret_root, char **ret_rel, char **ret_key, WdError *err);
