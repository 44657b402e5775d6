/* libweightd-client: the C API of the weightd daemon.
 *
 * A client is one connection to the daemon's Unix socket.  Every call is
 * synchronous: it sends one request and waits for its reply.  Calls return a
 * wd_code (WD_OK is 0) and, when err is not NULL, fill err with the code and
 * a message: the daemon's own message for codes the daemon sent, a local one
 * naming the socket and the system error otherwise.  Besides the codes each
 * function lists, any call may return WD_INTERNAL (out of memory here) and
 * a code from a newer daemon that this header does not name (kept as sent).
 * After WD_PROTOCOL_ERROR on a frame it cannot place, or once the daemon
 * closed the connection, a client is broken: every later call returns
 * WD_UNAVAILABLE "connection is broken: ..." with the first reason.
 *
 * Thread-safety: a wd_client may be shared between threads; its calls are
 * serialized by a mutex inside it, so one thread's wd_prefetch() of a large
 * model delays another thread's call on the same client (use one client per
 * thread for parallel requests).  A progress callback runs on the calling
 * thread while that mutex is held: it must not call into the same client,
 * and that includes wd_release() of a lease from it (which would deadlock).
 * wd_lease and wd_manifest accessors are read-only and safe from any thread
 * while the object lives; wd_release() and the *_free() functions must not
 * race with other uses of the object they end.  wd_entries_free(),
 * wd_status_free(), wd_components_free(), wd_manifest_free(), wd_cluster_free()
 * and wd_cluster_prefetch_result_free() accept NULL.
 *
 * Lifetime: a lease keeps its client's connection open, because the daemon
 * ends every lease of a connection when it closes.  wd_disconnect() drops the
 * caller's reference; the socket closes when the last lease is released.
 *
 * fork(): a client belongs to the process that connected it.  A forked child
 * (and its own children) shares the parent's socket, and the leases on it
 * are the parent's, so in a child every call that would send a request on
 * the parent's client returns WD_UNAVAILABLE ("... was connected by process
 * P ...: a process forked from it must connect again") without sending or
 * taking the client's lock; wd_hello_info() still answers.  wd_release() of
 * an inherited lease in a child unmaps the child's copy, frees it and
 * returns WD_OK without telling the daemon: the parent's lease stays.  (The
 * child's copy of the mapping stays readable only while the parent holds
 * its lease.)  wd_disconnect() in a child closes the child's descriptor
 * only.  A child that needs the daemon calls wd_connect() itself.  Device
 * leases cannot be used in a child at all: CUDA does not survive fork(). */
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define WD_PROTOCOL_VERSION 1

typedef enum wd_code {
        WD_OK = 0,
        WD_INVALID_ARGUMENT = 1,   /* the request itself is wrong */
        WD_NOT_FOUND = 2,          /* no such model, component, tensor or lease */
        WD_PERMISSION_DENIED = 3,  /* peer not allowed, or a path outside every model root */
        WD_FORMAT_ERROR = 4,       /* a safetensors file or index breaks a rule */
        WD_IO_ERROR = 5,           /* reading storage failed */
        WD_RESOURCE_EXHAUSTED = 6, /* a budget or limit cannot hold the request */
        WD_UNAVAILABLE = 7,        /* no daemon answers, the connection broke, the client is the parent
                                    * process's (after fork()), or try again */
        WD_CANCELLED = 8,          /* the request was cancelled */
        WD_INTERNAL = 9,           /* a bug or system failure (in the daemon or here) */
        WD_UNSUPPORTED = 10,       /* e.g. pickle-only component, unknown target */
        WD_BUSY = 11,              /* evicting an entry that is loading, leased or pinned */
        WD_PROTOCOL_ERROR = 12,    /* client side only: the daemon's reply broke the protocol */
} wd_code;

#define WD_ERROR_MESSAGE_MAX 1024

typedef struct wd_error {
        int code;
        char message[WD_ERROR_MESSAGE_MAX];
} wd_error;

/* "NOT_FOUND" etc.; "UNKNOWN" for codes this library does not know. */
const char *wd_code_name(int code);

/* The library's version string ("0.1.0"). */
const char *wd_version(void);

/* The socket a client without an explicit path uses: $WEIGHTD_SOCKET if set,
 * else /run/weightd/weightd.sock for root, else
 * $XDG_RUNTIME_DIR/weightd/weightd.sock, else /tmp/weightd-UID/weightd.sock.
 * Writes at most size bytes; returns WD_OK or WD_INVALID_ARGUMENT when it
 * does not fit. */
int wd_default_socket(char *buf, size_t size);

typedef struct wd_client wd_client;

/* Connect to the daemon at socket_path (NULL: wd_default_socket()) and
 * negotiate the protocol version (Hello).
 * Returns WD_OK, WD_UNAVAILABLE (no daemon answers there), WD_PERMISSION_DENIED
 * (the daemon refused this uid or the socket's permissions did),
 * WD_RESOURCE_EXHAUSTED (the daemon is at its connection limit for this uid
 * or in total), WD_UNSUPPORTED (no common protocol version),
 * WD_INVALID_ARGUMENT (the path does not fit a socket address),
 * WD_PROTOCOL_ERROR, WD_INTERNAL. */
int wd_connect(const char *socket_path, wd_client **ret, wd_error *err);

/* Drop the caller's reference.  Leases still held keep the connection open
 * until they are released.  Accepts NULL. */
void wd_disconnect(wd_client *c);

typedef struct wd_hello {
        uint32_t protocol_version;
        char daemon_version[64];
        uint64_t max_frame_size;
        uint32_t max_pending_requests;
        char features[256]; /* space-separated, e.g. "host" */
} wd_hello;

/* The daemon's answer to Hello, as received by wd_connect() (no request is
 * sent).  Returns WD_OK. */
int wd_hello_info(wd_client *c, wd_hello *ret);

/* One tensor of a component. */
typedef struct wd_tensor {
        const char *name;
        const char *dtype;     /* the safetensors spelling: "BF16", "F8_E4M3", ... */
        unsigned ndim;
        const uint64_t *shape; /* ndim entries (NULL for a scalar) */
        uint64_t nbytes;
        unsigned file;         /* index of its file in the manifest */
        uint64_t offset;       /* byte offset in its slab: in the file for a whole host load, in the one
                                * derived slab for a sharded or device load */
        const void *data;      /* read-only, in the mapped slab; NULL outside a lease or for a device lease */
        /* Added in 0.2.  Sharded loads: for a tensor a rule split, shape is
         * this rank's part, full_shape (ndim entries) the tensor's in the
         * file, and the part starts at index shard_start along shard_dim.
         * full_shape is NULL for a tensor delivered whole. */
        const uint64_t *full_shape;
        unsigned shard_dim;
        uint64_t shard_start;
        /* Device leases: the CUDA device ordinal in this process (after
         * CUDA_VISIBLE_DEVICES) and the tensor's device address; -1 and 0
         * for host memory.  The device memory is mapped read-only where the
         * driver allows it (a write faults, and a fault ends the process's
         * CUDA context); never write into it in any case: every worker on
         * the node shares it. */
        int device;
        uint64_t device_ptr;
} wd_tensor;

/* The tensors and files of a component. */
typedef struct wd_manifest wd_manifest;

const char *wd_manifest_model(const wd_manifest *m);
const char *wd_manifest_component(const wd_manifest *m);
/* Total bytes of the component's files. */
uint64_t wd_manifest_bytes(const wd_manifest *m);
size_t wd_manifest_n_tensors(const wd_manifest *m);
/* Tensors in file order (files in manifest order, each by data offset);
 * NULL when i is out of range. */
const wd_tensor *wd_manifest_tensor(const wd_manifest *m, size_t i);
/* For bindings that read every tensor at once: the whole
 * array of wd_manifest_n_tensors() tensors, in the order of
 * wd_manifest_tensor() (entry i is wd_manifest_tensor(m, i)); NULL when
 * there are none. */
const wd_tensor *wd_manifest_tensors(const wd_manifest *m);
/* The bytes wd_manifest_strings() writes: 0 for no tensors or a NULL m. */
size_t wd_manifest_strings_size(const wd_manifest *m);
/* Every tensor's name and dtype in one copy: for each tensor in the order
 * of wd_manifest_tensor(), its name, a NUL, its dtype and a NUL, back to
 * back in buf.  Returns WD_OK, or WD_INVALID_ARGUMENT (buf left alone)
 * when m is NULL or size is less than wd_manifest_strings_size(m). */
int wd_manifest_strings(const wd_manifest *m, char *buf, size_t size);
/* The bytes wd_manifest_names() writes: 0 for no tensors or a NULL m. */
size_t wd_manifest_names_size(const wd_manifest *m);
/* Every tensor's name in one copy: for each tensor in the order of
 * wd_manifest_tensor(), its name and a NUL, back to back in buf.  Returns
 * WD_OK, or WD_INVALID_ARGUMENT (buf left alone) when m is NULL or size is
 * less than wd_manifest_names_size(m). */
int wd_manifest_names(const wd_manifest *m, char *buf, size_t size);
/* Every tensor's dtype as a number, for bindings that group tensors by
 * dtype: codes[i] (n at least wd_manifest_n_tensors()) is tensor i's
 * dtype's place in dtypes, which receives the distinct spellings (pointers
 * into m), in the order of their first tensor, *ret_n_dtypes of them.
 * Returns WD_OK; WD_RESOURCE_EXHAUSTED when the manifest has more than
 * max_dtypes (at most 256) distinct dtypes (codes and dtypes then hold
 * nothing of use); WD_INVALID_ARGUMENT when m is NULL or a buffer is
 * short. */
int wd_manifest_dtype_codes(const wd_manifest *m, uint8_t *codes, size_t n, const char **dtypes,
                            size_t max_dtypes, size_t *ret_n_dtypes);
/* The sum of every tensor's ndim: the entries wd_manifest_shapes() writes. */
size_t wd_manifest_n_dims(const wd_manifest *m);
/* Every tensor's shape in one copy: for each tensor in the order of
 * wd_manifest_tensor(), its ndim entries of shape, back to back in buf.
 * Returns WD_OK, or WD_INVALID_ARGUMENT (buf left alone) when m is NULL
 * or n is less than wd_manifest_n_dims(m). */
int wd_manifest_shapes(const wd_manifest *m, uint64_t *buf, size_t n);
/* By name (a hash lookup); NULL when there is none. */
const wd_tensor *wd_manifest_find(const wd_manifest *m, const char *name);
size_t wd_manifest_n_files(const wd_manifest *m);
/* The file's path as the daemon names it; NULL when i is out of range. */
const char *wd_manifest_file(const wd_manifest *m, size_t i);
/* The file's __metadata__ entries, in the file's order. */
size_t wd_manifest_n_metadata(const wd_manifest *m, size_t file);
/* Returns WD_OK or WD_NOT_FOUND when an index is out of range. */
int wd_manifest_metadata(const wd_manifest *m, size_t file, size_t i, const char **ret_key, const char **ret_value);
/* Frees a manifest from wd_tensors(); never one owned by a lease.  Accepts NULL. */
void wd_manifest_free(wd_manifest *m);

/* The tensors of a component, from its validated headers, without loading
 * it.  component: NULL or "" for a model that is not a diffusers pipeline.
 * Returns WD_OK, WD_NOT_FOUND, WD_PERMISSION_DENIED, WD_FORMAT_ERROR,
 * WD_UNSUPPORTED, WD_INVALID_ARGUMENT, WD_UNAVAILABLE, WD_PROTOCOL_ERROR,
 * WD_INTERNAL. */
int wd_tensors(wd_client *c, const char *model, const char *component, wd_manifest **ret, wd_error *err);

typedef struct wd_lease wd_lease;

/* Progress of a load: bytes read so far of total.  Return 0 to go on, or
 * non-zero to cancel the request (the call then returns WD_CANCELLED). */
typedef int (*wd_progress_fn)(uint64_t done, uint64_t total, void *userdata);

/* One rule of a sharded load: tensors whose name matches pattern (a glob,
 * fnmatch(3) without flags) are split along dim (0 or 1). */
typedef struct wd_shard_rule {
        const char *pattern;
        unsigned dim;
} wd_shard_rule;

enum {
        WD_KEEP_HOST_DEFAULT = 0, /* the daemon's [gpu] keep_host */
        WD_KEEP_HOST_YES = 1,
        WD_KEEP_HOST_NO = 2,
};

/* Options of wd_load_ex() and wd_prefetch_ex(); zero-initialize, then set
 * what you need.  All zero means wd_load(). */
typedef struct wd_load_options {
        /* NULL, "" or "host": host memory.  "cuda:N" (N is this process's
         * ordinal, so CUDA_VISIBLE_DEVICES applies) or "cuda:GPU-<uuid>". */
        const char *device;
        /* Sharded delivery when world > 0: this rank's slices of the tensors
         * the rules match (the first matching rule wins; others whole).  A
         * dimension that world does not divide is an error unless uneven is
         * set (then the first size % world ranks take one more row). */
        unsigned rank;
        unsigned world;
        const wd_shard_rule *rules;
        size_t n_rules;
        int uneven;
        int keep_host;             /* WD_KEEP_HOST_*; device targets only */
        wd_progress_fn progress;   /* may be NULL; non-zero return cancels */
        void *userdata;
        /* Only the tensors whose name matches one of these globs (fnmatch(3)
         * without flags, as the rules): a pipeline stage's layers.  With or
         * without a shard; none: every tensor. */
        const char *const *tensors;
        size_t n_tensors;
        /* Added after 0.2.0 (the struct grew by these two; fields are only
         * ever appended).  wd_load_ex() only: lease just these tensors, by
         * exact name (no globs; each named once or more, none NULL or
         * empty, at most 65536 of at most 1024 bytes).  The daemon keeps the
         * whole component (or shard) resident and the lease maps the same
         * slabs; the manifest lists only the tensors named, in the order of
         * the component, so a lease of a few tensors of a large component
         * costs what they do, not what the component's manifest does.  A
         * name the component (or the shard's tensors) lacks is
         * WD_NOT_FOUND, naming it; with wd_prefetch_ex(),
         * WD_INVALID_ARGUMENT.  A daemon older than this field ignores
         * it and lists every tensor: a caller that must know compares
         * wd_manifest_n_tensors() with the names it gave.  none: every
         * tensor. */
        const char *const *names;
        size_t n_names;
} wd_load_options;

/* Make a component resident in host memory (reading it if needed) and lease
 * it: its slabs are mapped read-only into this process and every tensor's
 * data points into them, until wd_release().
 * Returns WD_OK, WD_NOT_FOUND, WD_PERMISSION_DENIED, WD_FORMAT_ERROR,
 * WD_IO_ERROR, WD_RESOURCE_EXHAUSTED (the budget cannot hold it: the message
 * names the shortfall), WD_UNSUPPORTED, WD_UNAVAILABLE (a file changed while
 * it was read: try again; or the connection broke; or c was connected by the
 * process this one was forked from), WD_INVALID_ARGUMENT,
 * WD_PROTOCOL_ERROR, WD_INTERNAL. */
int wd_load(wd_client *c, const char *model, const char *component, wd_lease **ret, wd_error *err);

/* The lease's manifest, with data pointers set; owned by the lease. */
const wd_manifest *wd_lease_manifest(const wd_lease *l);
/* The daemon's id of the lease. */
uint64_t wd_lease_id(const wd_lease *l);

/* End the lease in the daemon, unmap its memory and free l (always, whatever
 * the result: pointers from the lease are invalid afterwards).  Accepts NULL.
 * In a process forked from the one that loaded it, only unmap and free: the
 * lease is the parent's, nothing is sent, and the result is WD_OK.
 * Returns WD_OK, WD_NOT_FOUND (the daemon did not know it), WD_UNAVAILABLE
 * (the connection is gone, which ended the lease anyway), WD_PROTOCOL_ERROR. */
int wd_release(wd_lease *l, wd_error *err);

typedef struct wd_prefetch_result {
        uint64_t bytes;   /* the component's bytes */
        int was_resident; /* it was in memory already: nothing was read */
} wd_prefetch_result;

/* Make a component resident without leasing it.  progress (may be NULL) is
 * called as the daemon reports progress.  ret may be NULL.
 * Returns the codes of wd_load(), and WD_CANCELLED when progress asked. */
int wd_prefetch(wd_client *c, const char *model, const char *component, wd_progress_fn progress, void *userdata,
                wd_prefetch_result *ret, wd_error *err);

/* wd_load() and wd_prefetch() with options (NULL: none).  A device load
 * leaves the tensors in device memory: data is NULL and device_ptr the
 * address, mapped into this process's CUDA context until wd_release().
 * Besides their codes: WD_UNSUPPORTED (no GPU tier in the daemon, or this
 * library cannot reach the CUDA driver: the message says which),
 * WD_INVALID_ARGUMENT (a device this process does not see, a rule's dim
 * beyond a tensor's, a dimension world does not divide). */
int wd_load_ex(wd_client *c, const char *model, const char *component, const wd_load_options *opts,
               wd_lease **ret, wd_error *err);
int wd_prefetch_ex(wd_client *c, const char *model, const char *component, const wd_load_options *opts,
                   wd_prefetch_result *ret, wd_error *err);

/* ---- the cluster tier (added after 0.2.0) ----
 *
 * A daemon with a [cluster] section is one node of a cluster: the nodes
 * share what they read from storage, so a component that every node needs
 * is read once across them. */

/* One node's part of a cluster prefetch. */
typedef struct wd_cluster_node_load {
        const char *node;
        /* "ok", "resident" (it held the component already), "mismatch" (its
         * files differ from the others': it read them alone), "failed" or
         * "down"; a newer daemon may send others, kept as sent. */
        const char *state;
        uint64_t storage_read_bytes;  /* read from storage for this load */
        uint64_t peer_received_bytes; /* received from other nodes for this load */
        uint64_t peer_sent_bytes;     /* sent to other nodes for this load */
        const char *message;          /* why, where state is not "ok"; else "" */
} wd_cluster_node_load;

typedef struct wd_cluster_prefetch_result {
        uint64_t bytes;   /* the component's bytes */
        int was_resident; /* the node c is connected to held it already */
        size_t n_nodes;
        const wd_cluster_node_load *nodes; /* one per node named, in the cluster's configured order */
} wd_cluster_prefetch_result;

/* Make a component resident in the host memory of every live node named in
 * nodes (n_nodes names; none: every node of the cluster), through the
 * daemon c is connected to, which reads each byte from storage once across
 * them.  progress (may be NULL) gets the cluster's bytes as that daemon
 * reports them.  Free *ret (may be NULL) with
 * wd_cluster_prefetch_result_free().  A node that could not take part is not
 * an error: see its state.
 * Returns the codes of wd_prefetch(), and WD_CANCELLED when progress asked;
 * WD_UNSUPPORTED where the daemon has no [cluster] (or is older than the
 * cluster tier: it answered as a plain prefetch, so the component is
 * resident on that node only); WD_INVALID_ARGUMENT for a node name that is
 * NULL, or one the daemon does not know. */
int wd_prefetch_cluster(wd_client *c, const char *model, const char *component, const char *const *nodes,
                        size_t n_nodes, wd_progress_fn progress, void *userdata, wd_cluster_prefetch_result **ret,
                        wd_error *err);

/* What one node of a cluster prefetch serves (wd_prefetch_cluster_parts()):
 * world 0 and no tensors is the whole component; else rank's slices of the
 * tensors the rules match, of the tensors named (all when none), as in
 * wd_load_options (the same node then loads them with
 * wd_load_ex() and the same rank, world, rules and uneven). */
typedef struct wd_cluster_part {
        const char *node;
        unsigned rank;
        unsigned world;
        const wd_shard_rule *rules;
        size_t n_rules;
        int uneven;
        const char *const *tensors; /* only these tensors (a pipeline stage), as in wd_load_options */
        size_t n_tensors;
        /* NULL or "": the device of wd_cluster_options; "host": host memory
         * only; "cuda:N": this node's GPU N (the daemon's index). */
        const char *device;
} wd_cluster_part;

/* Options of wd_prefetch_cluster_ex(); zero-initialize, then set what you
 * need (all zero: wd_prefetch_cluster() of every node). */
typedef struct wd_cluster_options {
        /* The nodes, as in wd_prefetch_cluster() (none: every node). */
        const char *const *nodes;
        size_t n_nodes;
        /* Or what each node serves (a part plan; then nodes must be empty):
         * parts[i].node serves parts[i] (each node at most once, at most
         * 64).  Every byte any node serves is read from storage once across
         * them: a range only one node serves is read by that node and
         * crosses no link; a range several serve is read by one of them and
         * sent to the others that serve it, and to no other node.  Each
         * node ends with its part resident (a sharded entry, or the whole
         * component), and nothing else of it. */
        const wd_cluster_part *parts;
        size_t n_parts;
        /* NULL, "" or "host": host memory.  "cuda:N": also on the GPU of
         * index N of every node (the daemons' index, as weightctl status
         * lists it there, not this process's): each node copies its part
         * there from its host memory and reports only once it is there. */
        const char *device;
        wd_progress_fn progress; /* may be NULL: as in wd_prefetch_cluster() */
        void *userdata;
} wd_cluster_options;

/* wd_prefetch_cluster() with options.  Returns as wd_prefetch_cluster(),
 * and WD_INVALID_ARGUMENT for a part the component does not fit (the
 * message names the file, the tensor and the rule), for both nodes and
 * parts, or for a device that is not cuda:N; a node without that device
 * fails (its state and message say so). */
int wd_prefetch_cluster_ex(wd_client *c, const char *model, const char *component, const wd_cluster_options *o,
                           wd_cluster_prefetch_result **ret, wd_error *err);
/* Accepts NULL. */
void wd_cluster_prefetch_result_free(wd_cluster_prefetch_result *r);

/* One node of the cluster as the daemon sees it. */
typedef struct wd_cluster_node {
        const char *name;
        const char *address;     /* host:port as configured */
        const char *state;       /* "self", "up", "down", "unauthenticated", "mismatch"; others kept as sent */
        uint64_t generation;     /* the process behind the link (0: never seen) */
        uint64_t rtt_us;         /* the last heartbeat's round trip */
        uint64_t sent_bytes;     /* data plane bytes sent to it */
        uint64_t received_bytes; /* data plane bytes received from it */
        const char *last_error;  /* "" when none */
        uint64_t since_ms;       /* in this state for */
} wd_cluster_node;

typedef struct wd_cluster_info {
        int enabled;        /* 0: no [cluster] configured (then nothing else is set) */
        const char *node;   /* this daemon's node name */
        uint64_t generation;
        size_t n_nodes;
        const wd_cluster_node *nodes; /* the configured order, this node included */
        uint64_t peer_sent_bytes;
        uint64_t peer_received_bytes;
        uint64_t storage_saved_bytes; /* bytes this node got from peers instead of storage */
        /* GPU lanes (device plans GPU to GPU, docs/cluster.md): their
         * backend ("nccl 2.28.9") or why there is none, and the bytes of
         * peer_sent_bytes and peer_received_bytes that went over them. */
        const char *gpu_lane;
        uint64_t lane_sent_bytes;
        uint64_t lane_received_bytes;
} wd_cluster_info;

/* The cluster as the daemon sees it.  A daemon without [cluster] answers
 * with enabled 0.  Free with wd_cluster_free().
 * Returns WD_OK, WD_INVALID_ARGUMENT (a daemon older than the cluster tier:
 * "unknown request"), WD_UNAVAILABLE, WD_PROTOCOL_ERROR, WD_INTERNAL. */
int wd_cluster(wd_client *c, wd_cluster_info **ret, wd_error *err);
/* Accepts NULL. */
void wd_cluster_free(wd_cluster_info *ci);

/* Drop a resident component from memory now.
 * Returns WD_OK, WD_NOT_FOUND (not resident), WD_BUSY (loading, leased or
 * pinned: the message says which), WD_PERMISSION_DENIED, WD_INVALID_ARGUMENT,
 * WD_UNAVAILABLE, WD_PROTOCOL_ERROR. */
int wd_evict(wd_client *c, const char *model, const char *component, wd_error *err);

/* Keep a resident component from being evicted, or allow it again.
 * Returns WD_OK, WD_NOT_FOUND (not resident), WD_PERMISSION_DENIED,
 * WD_INVALID_ARGUMENT, WD_UNAVAILABLE, WD_PROTOCOL_ERROR. */
int wd_pin(wd_client *c, const char *model, const char *component, wd_error *err);
int wd_unpin(wd_client *c, const char *model, const char *component, wd_error *err);

typedef struct wd_entry {
        const char *model;
        const char *component;
        const char *tier;  /* "host" or "cuda:N" (the daemon's numbering) */
        const char *state; /* "loading", "resident", "detached" */
        uint64_t bytes;
        uint32_t leases;
        int pinned;
        uint32_t files;
        uint64_t idle_ms;
        const char *shard; /* added in 0.2: "" for whole tensors, else "rank R/W ..." */
} wd_entry;

/* The daemon's entries, most recently used first.  Free with
 * wd_entries_free().  Returns WD_OK, WD_UNAVAILABLE, WD_PROTOCOL_ERROR,
 * WD_INTERNAL. */
int wd_list(wd_client *c, wd_entry **ret_entries, size_t *ret_n, wd_error *err);
/* Accepts NULL. */
void wd_entries_free(wd_entry *entries, size_t n);

typedef struct wd_component {
        const char *name;       /* "" for a model that is not a diffusers pipeline */
        const char *kind;       /* "weights", "absent", "missing", "no-weights", "pickle-only" */
        const char *library;    /* from model_index.json, "" when none */
        const char *class_name; /* from model_index.json, "" when none */
} wd_component;

/* The components of a model, from model_index.json and directory listings
 * (no safetensors file is opened, so a component of kind "weights" may
 * still fail to load).  For a diffusers pipeline (*ret_diffusers 1) they
 * come in model_index.json's order, each named by its folder; for any other
 * model there is one, named "".  kind is "weights" (safetensors files),
 * "absent" (model_index.json gives it as null), "missing" (no folder),
 * "no-weights" (a folder without weights, such as a scheduler) or
 * "pickle-only" (.bin/.pt/.pth/.ckpt checkpoints only); a newer daemon may
 * send a kind not listed here, kept as sent.  ret_diffusers may be NULL.
 * Free with wd_components_free().
 * Returns WD_OK, WD_NOT_FOUND, WD_PERMISSION_DENIED, WD_FORMAT_ERROR (a
 * model_index.json that breaks a rule), WD_INVALID_ARGUMENT, WD_UNAVAILABLE,
 * WD_PROTOCOL_ERROR, WD_INTERNAL. */
int wd_components(wd_client *c, const char *model, wd_component **ret, size_t *ret_n, int *ret_diffusers,
                  wd_error *err);
/* Accepts NULL. */
void wd_components_free(wd_component *components, size_t n);

typedef struct wd_status {
        const char *version;
        uint32_t pid;
        uint64_t uptime_ms;
        uint64_t host_budget_bytes;
        uint64_t host_used_bytes;
        uint64_t host_evictable_bytes;
        uint64_t storage_read_bytes; /* read from storage since the daemon started */
        uint32_t leases;
        uint32_t connections;
        uint32_t entries;
        uint32_t loading;
        uint64_t evictions;
        size_t n_model_roots;
        const char *const *model_roots;
        const char *socket;
        int hugetlb;
        /* Added in 0.2: the GPU tier.  gpu is "ok" or why there is none. */
        const char *gpu;
        size_t n_devices;
        const struct wd_device *devices;
        /* Added after 0.2.0: the cluster (see wd_cluster()), NULL when the
         * daemon reports none (no [cluster], or older than the tier). */
        const struct wd_cluster_info *cluster;
        /* Added after 0.2.0: the daemon's own hugetlb pool ([memory]
         * hugetlb_reserve).  hugetlb_pool is "off", "touching" (being touched
         * after start), "ready", or why there is none; "" from older
         * daemons.  reserved: 2 MiB pages the daemon added to the kernel's
         * pool; touched: of those, touched since start or the last resize;
         * free: the kernel's free 2 MiB pages, whoever reserved them.
         * shmem_fallback_*: slabs (and their bytes) that got small pages
         * since start because the pool was short. */
        const char *hugetlb_pool;
        uint64_t hugetlb_reserved_bytes;
        uint64_t hugetlb_touched_bytes;
        uint64_t hugetlb_free_bytes;
        uint64_t shmem_fallback_slabs;
        uint64_t shmem_fallback_bytes;
} wd_status;

typedef struct wd_device {
        uint32_t index; /* the daemon's CUDA ordinal */
        const char *uuid;
        const char *name;
        const char *pci_bus_id;
        uint64_t total_bytes;
        uint64_t budget_bytes;
        uint64_t used_bytes;
        uint64_t evictable_bytes;
} wd_device;

/* The daemon's counters.  Free with wd_status_free().  Returns WD_OK,
 * WD_UNAVAILABLE, WD_PROTOCOL_ERROR, WD_INTERNAL. */
int wd_status_get(wd_client *c, wd_status **ret, wd_error *err);
/* Accepts NULL. */
void wd_status_free(wd_status *s);

#ifdef __cplusplus
}
#endif
