/* Lexical path clean-up shared by the daemon (model roots, requested
 * models) and weightctl (MODEL arguments).  Header-only, like macro.h. */
#pragma once

#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

/* A new copy of the absolute path with "//" and "/./" folded and no trailing
 * '/' ("/" stays "/").  ".." stays: only the file system can say where it
 * leads.  Returns 0, -EINVAL for a relative or empty path, -ENAMETOOLONG
 * from PATH_MAX bytes on, -ENOMEM. */
static inline int path_simplify(const char *path, char **ret) {
        size_t n;
        char *out, *o;

        if (!path || path[0] != '/')
                return -EINVAL;
        n = strlen(path);
        if (n >= PATH_MAX)
                return -ENAMETOOLONG;
        out = malloc(n + 1);
        if (!out)
                return -ENOMEM;

        o = out;
        for (const char *p = path; *p;) {
                size_t len;

                while (*p == '/')
                        p++;
                len = strcspn(p, "/");
                if (len > 0 && !(len == 1 && p[0] == '.')) {
                        *o++ = '/';
                        memcpy(o, p, len);
                        o += len;
                }
                p += len;
        }
        if (o == out)
                *o++ = '/';
        *o = 0;
        *ret = out;
        return 0;
}

/* Whether a simplified path has a ".." component. */
static inline bool path_has_dotdot(const char *path) {
        size_t n = strlen(path);

        return strstr(path, "/../") || (n >= 3 && strcmp(path + n - 3, "/..") == 0);
}
