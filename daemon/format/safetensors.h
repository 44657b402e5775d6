/* The safetensors file format: dtypes, and a strict parser and validator for
 * the header that treats every file as hostile until it has passed. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util/error.h"

/* The header length limit of the reference implementation. */
#define ST_HEADER_MAX 100000000ULL

typedef enum Dtype {
        DTYPE_BOOL,
        DTYPE_U8,
        DTYPE_I8,
        DTYPE_F8_E4M3,
        DTYPE_F8_E5M2,
        DTYPE_F8_E8M0,
        DTYPE_F8_E4M3FNUZ,
        DTYPE_F8_E5M2FNUZ,
        DTYPE_I16,
        DTYPE_U16,
        DTYPE_F16,
        DTYPE_BF16,
        DTYPE_I32,
        DTYPE_U32,
        DTYPE_F32,
        DTYPE_I64,
        DTYPE_U64,
        DTYPE_F64,
        DTYPE_C64,
        DTYPE_F4,
        DTYPE_F6_E2M3,
        DTYPE_F6_E3M2,
        _DTYPE_MAX,
        _DTYPE_INVALID = -1,
} Dtype;

/* The safetensors spelling ("BF16"), or NULL for an invalid value. */
const char *dtype_to_string(Dtype d);
/* Exact, case-sensitive match; _DTYPE_INVALID when unknown. */
Dtype dtype_from_string(const char *s);
/* Bits per element: 4 for F4, 6 for F6_*, 8..64 otherwise. */
unsigned dtype_bits(Dtype d);

typedef struct StTensor {
        char *name;
        Dtype dtype;
        unsigned ndim;
        uint64_t *shape;     /* ndim entries; NULL for a scalar */
        uint64_t n_elements;
        uint64_t begin, end; /* byte range in the data section */
} StTensor;

typedef struct StMetadata {
        char *key;
        char *value;
} StMetadata;

typedef struct StHeader {
        unsigned n_ref;
        uint64_t file_size;
        uint64_t header_len;  /* N, the JSON bytes after the 8-byte prefix */
        uint64_t data_offset; /* 8 + N: where the data section starts */
        size_t n_tensors;
        StTensor *tensors;    /* sorted by data offset: the file's order */
        size_t n_metadata;
        StMetadata *metadata; /* in the order the file gives them */
        uint8_t *raw;         /* the first data_offset bytes of the file */
} StHeader;

/* Parse and validate the header of an open file.  display names the file in
 * error messages.  Reads only the header, never tensor data.
 * Returns 0, WD_E_FORMAT with err filled, or -errno (err filled too). */
int st_header_parse_fd(int fd, const char *display, StHeader **ret, WdError *err);

/* The same for a file held in memory (size bytes: the whole file). */
int st_header_parse_buffer(const void *data, size_t size, const char *display, StHeader **ret,
                           WdError *err);

/* Headers are shared (the catalog caches them by file identity). */
StHeader *st_header_ref(StHeader *h);
StHeader *st_header_unref(StHeader *h);
DEFINE_TRIVIAL_CLEANUP_FUNC(StHeader *, st_header_unref);

/* Binary search in name order is not possible on data order; this is a
 * linear scan, for tests and tools. */
const StTensor *st_header_find(const StHeader *h, const char *name);

/* Bytes of the data section. */
static inline uint64_t st_header_data_size(const StHeader *h) {
        return h->file_size - h->data_offset;
}

/* Format a shape as "[32, 64]" into buf. */
void st_shape_format(char *buf, size_t size, const uint64_t *shape, unsigned ndim);
