/* Host slabs: one sealed memfd per safetensors file holding the whole file,
 * so a file offset is a slab offset.
 *
 * A slab is created writable, filled in place by the reader, then sealed
 * (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL) and
 * mapped read-only; clients get the fd and can only map it read-only. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util/macro.h"

typedef struct Slab {
        int fd;
        uint64_t size;     /* bytes of content (the file's size) */
        uint64_t capacity; /* mapped bytes: size rounded up for direct reads */
        uint8_t *data;     /* writable until sealed, read-only after */
        bool sealed;
} Slab;

/* A slab of size bytes; the last component of name shows in /proc/PID/fd
 * ("memfd:weightd:NAME", cut to 200 bytes). */
int slab_new(Slab **ret, const char *name, uint64_t size);
Slab *slab_free(Slab *s);
DEFINE_TRIVIAL_CLEANUP_FUNC(Slab *, slab_free);

/* Trim to size, seal, and remap read-only. */
int slab_seal(Slab *s);
