/* Common macros: cleanup attributes, ownership transfer, checked arithmetic.
 * Modelled on systemd's cleanup-fundamental.h.  Header-only and without
 * dependencies, so the daemon, the client library and weightctl share it
 * (common/ is the one folder besides proto/ that the client and the daemon
 * both include). */
#pragma once

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define _cleanup_(f) __attribute__((cleanup(f)))
#define _unused_ __attribute__((unused))
#define _printf_(a, b) __attribute__((format(printf, a, b)))
#define _likely_(x) __builtin_expect(!!(x), 1)
#define _unlikely_(x) __builtin_expect(!!(x), 0)

#define ELEMENTSOF(x) (sizeof(x) / sizeof((x)[0]))
/* The struct of type that embeds member at ptr. */
#define container_of(ptr, type, member) ((type *) ((char *) (ptr) - offsetof(type, member)))

/* Take ownership of a pointer: return it and set the variable to NULL. */
#define TAKE_PTR(p)                          \
        ({                                   \
                __typeof__(p) _ptr_ = (p);   \
                (p) = NULL;                  \
                _ptr_;                       \
        })

/* Take ownership of an fd: return it and set the variable to -1. */
#define TAKE_FD(fd)                          \
        ({                                   \
                int _fd_ = (fd);             \
                (fd) = -1;                   \
                _fd_;                        \
        })

/* Define foo_freep() for a foo_free() that takes and returns Foo *. */
#define DEFINE_TRIVIAL_CLEANUP_FUNC(type, func)        \
        static inline void func##p(type *p) {          \
                if (*p)                                \
                        func(*p);                      \
        }

static inline void freep(void *p) {
        free(*(void **) p);
}
#define _cleanup_free_ _cleanup_(freep)

static inline int safe_close(int fd) {
        if (fd >= 0) {
                int saved = errno;
                (void) close(fd);
                errno = saved;
        }
        return -1;
}

static inline void fclosep(FILE **f) {
        if (*f)
                (void) fclose(*f);
}
#define _cleanup_fclose_ _cleanup_(fclosep)

static inline void closep(int *fd) {
        safe_close(*fd);
}
#define _cleanup_close_ _cleanup_(closep)

/* Return -errno for the last failed libc call, never 0. */
static inline int negative_errno(void) {
        return errno > 0 ? -errno : -EIO;
}

static inline bool add_overflow_u64(uint64_t a, uint64_t b, uint64_t *ret) {
        return __builtin_add_overflow(a, b, ret);
}

static inline bool mul_overflow_u64(uint64_t a, uint64_t b, uint64_t *ret) {
        return __builtin_mul_overflow(a, b, ret);
}

#define ALIGN_UP(x, a) ((((x) + (a) - 1) / (a)) * (a))
#define ALIGN_DOWN(x, a) (((x) / (a)) * (a))
/* <sys/param.h> (pulled in by uv.h) may have defined these already. */
#ifndef MIN
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#endif
#ifndef MAX
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#endif

/* The index of s in a table of names (NULL entries allowed), or -EINVAL:
 * the parser behind every foo_from_string() of an enum. */
static inline int string_table_lookup(const char *const *table, size_t n, const char *s) {
        for (size_t i = 0; i < n; i++)
                if (table[i] && __builtin_strcmp(table[i], s) == 0)
                        return (int) i;
        return -EINVAL;
}
