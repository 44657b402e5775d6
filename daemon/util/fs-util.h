/* File helpers: identity of a file, opening paths beneath a root directory
 * so that no "..", absolute symlink or magic link escapes it, and the
 * process's descriptor limit. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/stat.h>
#include <time.h>

#include "macro.h"
#include "util/siphash24.h"

/* What identifies a file's contents without reading them: a replaced or
 * rewritten file differs in at least one field. */
typedef struct FileId {
        uint64_t dev;
        uint64_t ino;
        uint64_t size;
        struct timespec mtime;
        struct timespec ctime;
} FileId;

void file_id_from_stat(FileId *id, const struct stat *st);
bool file_id_equal(const FileId *a, const FileId *b);
/* Feed what file_id_equal() compares into a hash (field by field: the
 * struct may have padding). */
void file_id_hash(const FileId *id, SipHash *h);
/* SipHash under key of s (with its NUL) and then the n identities: the
 * key of a lookup by a name and files. */
uint64_t file_ids_hash(const uint8_t key[static SIPHASH_KEY_SIZE], const char *s, const FileId *ids, size_t n);
/* fstat() fd into ret; returns 0 or -errno. */
int file_id_from_fd(int fd, FileId *ret);

/* openat2(root, path, flags, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS).
 * O_CLOEXEC is always added.  Returns the fd or -errno: -EXDEV when the path
 * leaves root, -ELOOP for magic links. */
int fs_open_beneath(int root_fd, const char *path, int flags);

/* Join a directory and a name with exactly one '/'; "" joins to name. */
char *path_join(const char *dir, const char *name);

bool str_endswith(const char *s, const char *suffix);

/* A name safe to use as one path component: not empty, not "." or "..",
 * no '/'. */
bool filename_is_plain(const char *s);

/* Raise the soft RLIMIT_NOFILE to the hard limit, as systemd's
 * rlimit_nofile_bump() does for its daemons: the daemon holds one memfd per
 * file of every resident entry, two descriptors per file of every load and
 * the duplicates in queued replies, and 1024 is the kernel's default soft
 * limit.  Safe because nothing in the daemon uses select() or execs a
 * program that might.  Returns 0 and the soft limits before and after (equal
 * when it was already at the hard limit), or -errno. */
int rlimit_nofile_bump(uint64_t *ret_old, uint64_t *ret_new);
