/* File identity, root-confined opening (openat2 RESOLVE_BENEATH) and the
 * descriptor limit. */
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>

#include "util/fs-util.h"

void file_id_from_stat(FileId *id, const struct stat *st) {
        *id = (FileId){
                .dev = (uint64_t) st->st_dev,
                .ino = (uint64_t) st->st_ino,
                .size = (uint64_t) st->st_size,
                .mtime = st->st_mtim,
                .ctime = st->st_ctim,
        };
}

bool file_id_equal(const FileId *a, const FileId *b) {
        return a->dev == b->dev && a->ino == b->ino && a->size == b->size &&
               a->mtime.tv_sec == b->mtime.tv_sec && a->mtime.tv_nsec == b->mtime.tv_nsec &&
               a->ctime.tv_sec == b->ctime.tv_sec && a->ctime.tv_nsec == b->ctime.tv_nsec;
}

void file_id_hash(const FileId *id, SipHash *h) {
        const uint64_t f[] = {
                id->dev,
                id->ino,
                id->size,
                (uint64_t) id->mtime.tv_sec,
                (uint64_t) id->mtime.tv_nsec,
                (uint64_t) id->ctime.tv_sec,
                (uint64_t) id->ctime.tv_nsec,
        };

        siphash24_compress(h, f, sizeof(f));
}

uint64_t file_ids_hash(const uint8_t key[static SIPHASH_KEY_SIZE], const char *s, const FileId *ids, size_t n) {
        SipHash h;

        siphash24_init(&h, key);
        siphash24_compress(&h, s, strlen(s) + 1);
        for (size_t i = 0; i < n; i++)
                file_id_hash(&ids[i], &h);
        return siphash24_finalize(&h);
}

int file_id_from_fd(int fd, FileId *ret) {
        struct stat st;

        if (fstat(fd, &st) < 0)
                return negative_errno();
        file_id_from_stat(ret, &st);
        return 0;
}

int fs_open_beneath(int root_fd, const char *path, int flags) {
        struct open_how how = {
                .flags = (uint64_t) (flags | O_CLOEXEC),
                .resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
        };
        long fd;

        /* openat2 refuses an empty path; "." names the root itself. */
        if (!path || !*path)
                path = ".";
        do
                fd = syscall(SYS_openat2, root_fd, path, &how, sizeof(how));
        while (fd < 0 && (errno == EINTR || errno == EAGAIN));
        if (fd < 0)
                return negative_errno();
        return (int) fd;
}

char *path_join(const char *dir, const char *name) {
        size_t n = strlen(dir);
        char *p;

        if (n == 0)
                return strdup(name);
        while (n > 1 && dir[n - 1] == '/')
                n--;
        if (asprintf(&p, "%.*s%s%s", (int) n, dir, dir[n - 1] == '/' ? "" : "/", name) < 0)
                return NULL;
        return p;
}

bool str_endswith(const char *s, const char *suffix) {
        size_t a = strlen(s), b = strlen(suffix);

        return a >= b && memcmp(s + a - b, suffix, b) == 0;
}

bool filename_is_plain(const char *s) {
        return *s && strcmp(s, ".") != 0 && strcmp(s, "..") != 0 && !strchr(s, '/');
}

int rlimit_nofile_bump(uint64_t *ret_old, uint64_t *ret_new) {
        struct rlimit rl;
        uint64_t old;

        if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
                return negative_errno();
        old = (uint64_t) rl.rlim_cur;
        if (rl.rlim_cur < rl.rlim_max) {
                rl.rlim_cur = rl.rlim_max;
                if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
                        return negative_errno();
        }
        *ret_old = old;
        *ret_new = (uint64_t) rl.rlim_cur;
        return 0;
}
