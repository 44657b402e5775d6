/* Helpers shared by the unit tests: where the generated test data is, whole
 * file reads with plain read(), hashes, temporary directories. */
#pragma once

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <cmocka.h>

#include "macro.h"

/* How many descriptors the process has open (for leak checks). */
static inline int count_fds(void) {
        DIR *d = opendir("/proc/self/fd");
        struct dirent *de;
        int n = 0;

        assert_non_null(d);
        while ((de = readdir(d)))
                if (de->d_name[0] != '.')
                        n++;
        closedir(d);
        return n - 1; /* the DIR's own */
}

/* $WD_TESTDATA/rel, as a static buffer (tests are single threaded). */
static inline const char *testdata(const char *rel) {
        static char buf[PATH_MAX];
        const char *base = getenv("WD_TESTDATA");

        if (!base) {
                fprintf(stderr, "WD_TESTDATA is not set: run the tests through meson\n");
                exit(99);
        }
        snprintf(buf, sizeof(buf), "%s/%s", base, rel);
        return buf;
}

/* Read a whole file with read(): the independent reference for the bytes. */
static inline uint8_t *read_file(const char *path, size_t *ret_size) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        struct stat st;
        uint8_t *buf;
        size_t done = 0;

        if (fd < 0 || fstat(fd, &st) < 0)
                return NULL;
        buf = malloc((size_t) st.st_size + 1);
        while (buf && done < (size_t) st.st_size) {
                ssize_t k = read(fd, buf + done, (size_t) st.st_size - done);
                if (k <= 0) {
                        free(buf);
                        buf = NULL;
                        break;
                }
                done += (size_t) k;
        }
        close(fd);
        *ret_size = done;
        return buf;
}

static inline XXH128_hash_t hash_file(const char *path) {
        size_t n = 0;
        uint8_t *buf = read_file(path, &n);
        XXH128_hash_t h;

        assert_non_null(buf);
        h = XXH3_128bits(buf, n);
        free(buf);
        return h;
}

static inline void assert_hash_equal(XXH128_hash_t a, XXH128_hash_t b) {
        assert_true(XXH128_isEqual(a, b));
}

/* Write size bytes of a deterministic pattern to path. */
static inline void write_pattern_file(const char *path, size_t size, uint32_t seed) {
        FILE *f = fopen(path, "we");
        uint32_t x = seed * 2654435761u + 1;

        assert_non_null(f);
        for (size_t i = 0; i < size; i++) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                fputc((int) (x & 0xff), f);
        }
        assert_int_equal(fclose(f), 0);
}

/* A fresh directory under $WD_SCRATCH (the build tree: a real disk) or the
 * given base; returns a malloc'd path. */
static inline char *make_temp_dir(const char *base) {
        char *p = NULL;

        if (!base)
                base = getenv("WD_SCRATCH") ? getenv("WD_SCRATCH") : "/tmp";
        mkdir(base, 0755);
        assert_true(asprintf(&p, "%s/wdtest.XXXXXX", base) > 0);
        assert_non_null(mkdtemp(p));
        return p;
}

static inline void remove_tree(const char *path) {
        char *cmd = NULL;

        assert_true(asprintf(&cmd, "rm -rf '%s'", path) > 0);
        assert_int_equal(system(cmd), 0);
        free(cmd);
}
