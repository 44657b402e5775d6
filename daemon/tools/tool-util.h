/* Shared bits of the developer tools: resolve a command-line path into the
 * root fd and the path beneath it that the catalog takes. */
#pragma once

#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "macro.h"

/* Open "/" as the root and turn arg into an absolute path without the
 * leading '/', in *ret_path (malloc'd). */
static inline int tool_open_root(const char *arg, int *ret_root, char **ret_path) {
        _cleanup_free_ char *abs = realpath(arg, NULL);
        int fd;

        if (!abs)
                return negative_errno();
        fd = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0)
                return negative_errno();
        *ret_path = strdup(abs + 1);
        if (!*ret_path) {
                close(fd);
                return -ENOMEM;
        }
        *ret_root = fd;
        return 0;
}
