/* Internals of libweightd-client shared by its source files and its unit
 * test: the connection, the manifest, error helpers.  Nothing here is
 * exported from the shared library. */
#pragma once

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/types.h>
#include <unistd.h>

#include "macro.h"
#include "weightd/client.h"
#include "wire.h"
#include "cuda-internal.h"

#define _public_ __attribute__((visibility("default")))
#define _fallthrough_ __attribute__((fallthrough))

/* arena.c: a frame from the daemon unpacked into one arena (NULL when it
 * does not decode), and its end.  Every envelope the client holds comes
 * from client_unpack(). */
WireEnvelope *client_unpack(const uint8_t *payload, size_t len);
void client_envelope_free(WireEnvelope *env);

static inline void envelope_freep(WireEnvelope **p) {
        client_envelope_free(*p);
}
#define _cleanup_envelope_ _cleanup_(envelope_freep)

/* The largest frame the client accepts from the daemon: a LoadReply lists
 * every tensor of a component. */
#define CLIENT_MAX_FRAME (256u << 20)

/* Short aliases for the generated protobuf-c names. */
typedef Weightd__V1__Reply PbReply;
typedef Weightd__V1__Slab PbSlab;
typedef Weightd__V1__Tensor PbTensor;
typedef Weightd__V1__TensorTable PbTensorTable;

struct wd_client {
        pthread_mutex_t mutex;
        atomic_uint n_ref; /* the caller's plus one per lease */
        pid_t pid;         /* the process that connected: the only one that may send or take mutex */
        int fd;
        char *path; /* for messages */
        WireReader reader;
        uint64_t next_id;
        uint32_t max_frame_out; /* the daemon's limit for our frames */
        wd_hello hello;
        bool broken;
        char broken_reason[WD_ERROR_MESSAGE_MAX];
};

/* One slab of a manifest, and its mapping when a lease owns the manifest:
 * host memory (map), or a device slab imported into this process (cuda). */
typedef struct ManifestFile {
        const PbSlab *slab; /* points into the manifest's envelope */
        void *map;
        size_t map_size;
        CudaMapping cuda; /* cuda.size 0: none */
} ManifestFile;

struct wd_manifest {
        WireEnvelope *env; /* the reply the strings and shapes point into */
        const char *model;
        const char *component;
        uint64_t bytes;
        ManifestFile *slabs; /* what Tensor.slab indexes */
        size_t n_slabs;
        const PbSlab **files; /* the component's files (names, metadata): the slabs' own, or LoadReply.files */
        size_t n_files;
        wd_tensor *tensors;
        size_t n_tensors;
        /* The name index: an open-addressing hash table of n_slots (a
         * power of two, at least twice n_tensors) tensor numbers + 1 (0:
         * empty), probed linearly from the name's hash. */
        uint32_t *slots;
        size_t n_slots;
        bool leased;               /* owned by a lease: wd_manifest_free() leaves it */
};

/* error.c, the bottom of the library: client.c, manifest.c and cuda.c call
 * it and it calls none of them.  Fill err (not NULL) with code and a
 * formatted message; returns code. */
int error_set(wd_error *err, int code, const char *fmt, ...) _printf_(3, 4);
/* Write src into dst for a message: control bytes, quotes and backslashes
 * escaped, at most max_bytes of the source (then "..."). */
void escape_string(char *dst, size_t dst_size, const char *src, size_t max_bytes);

/* Build and validate a manifest from the daemon's slabs and tensors, which
 * point into *env: the tensors as messages, or (table not NULL, tensors
 * then empty) as a LoadReply.table, whose columns must break no rule of
 * the table and whose rows pass the same checks as messages.  files
 * (n_files > 0) is LoadReply.files of a reply whose slabs are derived (a
 * sharded load): the component's files, which Tensor.file indexes, while
 * Tensor.slab indexes the slabs; bytes is then the component's size.
 * Without files every slab is one whole file.  With
 * fds (one per slab, by fd_index) each slab is mapped read-only and the
 * tensors' data pointers set; the caller still closes the fds.  On success
 * the manifest takes *env.  Returns WD_OK, WD_PROTOCOL_ERROR naming the
 * tensor or file that breaks a rule, or WD_INTERNAL. */
int manifest_new(WireEnvelope **env, const char *model, const char *component, PbSlab *const *slabs, size_t n_slabs,
                 PbSlab *const *files, size_t n_files, uint64_t bytes, PbTensor *const *tensors, size_t n_tensors,
                 const PbTensorTable *table, const int *fds, wd_manifest **ret, wd_error *err);
/* Unmap and free, whoever owns it.  Accepts NULL; returns NULL. */
wd_manifest *manifest_free(wd_manifest *m);

/* Take ownership of fd, a connected stream socket, say Hello on it and
 * return the client.  name is used in messages.  On failure fd is closed.
 * wd_connect() is socket() + connect() + this; the unit test calls it on
 * one end of a socketpair. */
int client_new_from_fd(int fd, const char *name, wd_client **ret, wd_error *err);
