/* The daemon's internal structures, shared by server.c (lifecycle, socket,
 * signals, load jobs), conn.c (one client connection: framing, output queue,
 * limits) and dispatch.c (the requests).  Everything here runs on the loop
 * thread except the two load-job callbacks, which only touch atomics and
 * wake the loop. */
#pragma once

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <uv.h>

#include "gpu/gpu.h"
#include "server/config.h"
#include "util/list.h"
#include "server/roots.h"
#include "server/server.h"
#include "store/cache.h"
#include "store/loader.h"
#include "store/shard.h"
#include "util/time-util.h"
#include "wire.h"

typedef struct Conn Conn;
typedef struct Job Job;
typedef struct Request Request;
typedef struct Lease Lease;
typedef struct OutFrame OutFrame;
typedef struct UidSlot UidSlot;
typedef struct ShardBuild ShardBuild;
typedef struct DevJob DevJob;

#define SERVER_MAX_LEASES_PER_CONN 4096u
#define SERVER_MAX_LEASES_PER_UID 65536u
#define SERVER_MAX_OUT_BYTES ((size_t) 64 << 20)          /* unread replies, per connection */
#define SERVER_MAX_OUT_BYTES_PER_UID ((size_t) 256 << 20) /* and over a uid's connections */
#define SERVER_PROGRESS_INTERVAL_USEC 100000u
#define SERVER_DRAIN_TIMEOUT_MS 2000u
#define SERVER_MAX_COMPONENT_NAME 255u

struct OutFrame {
        OutFrame *next;
        uint8_t *buf;
        size_t len, off;
        int *fds; /* owned duplicates, closed once sent */
        size_t n_fds;
};

struct Lease {
        LIST_FIELDS(Lease, leases);
        uint64_t id;
        CacheEntry *entry;
};

typedef enum RequestKind {
        REQUEST_LOAD,
        REQUEST_PREFETCH,
        REQUEST_TENSORS,
        REQUEST_COMPONENTS,
} RequestKind;

/* A request that cannot be answered at once: its model is resolved on the
 * thread pool (file system calls and header parsing stay off the loop),
 * then a Load or Prefetch waits for a job.  It counts against the
 * connection's max_pending_requests from start to reply. */
struct Request {
        Server *server;
        Conn *conn; /* NULL once the peer left or cancelled: dropped when the resolve ends */
        Job *job;   /* the load it waits for, once resolved */
        DevJob *dev_job; /* or the device load */
        int device;      /* -1: the host tier; else the index of the target in the GPU tier's devices */
        int keep_host;   /* KEEP_HOST_*, device targets only */
        uint64_t id;
        RequestKind kind;
        bool progress;
        uint64_t progress_sent;
        LIST_FIELDS(Request, conn); /* in conn->pending */
        LIST_FIELDS(Request, job);  /* in job->waiters or dev_job->waiters */

        /* A sharded Load or Prefetch (shard-job.c): the spec, its cache
         * variant, the plan (made on the thread pool with the resolve), and
         * the build of the derived slab it waits for. */
        ShardSpec *shard;
        char *variant;
        ShardPlan *plan;
        ShardBuild *build;
        LIST_FIELDS(Request, build); /* in build->waiters */

        /* The resolve, on a worker thread (resolving is true meanwhile). */
        uv_work_t work;
        bool resolving;
        uint64_t received_usec; /* when the daemon took the request: the resolve's start */
        Roots *roots; /* a reference: a reload may replace the server's */
        Root *root;
        char *rel, *key, *component;
        int r;
        WdError err;
        Component *comp;
        ComponentList *list;
};

struct Job {
        Server *server;
        LIST_FIELDS(Job, jobs);
        LoadJob *load;
        Component *comp; /* owned; comp->model is the cache key */
        int root_fd;     /* owned duplicate: where comp's files are opened */
        Request *waiters;
        unsigned n_waiters;
        uint64_t total;
        _Atomic uint64_t done;
        _Atomic bool finished;
        bool cancelled;
        bool sealing, sealed; /* load_job_seal() on the thread pool */
        uv_work_t seal_work;
        uint64_t progress_usec; /* when waiters last heard */
        uint64_t started_usec;
        uint64_t requested_usec; /* received_usec of the request whose resolve led here; 0: none */
        /* Device loads fed by this read (device.c); the list is read by the
         * reader thread's progress callback, under feeds_lock. */
        pthread_mutex_t feeds_lock;
        DevJob *feeds;
        Gpu *seal_gpu;  /* to unregister the writable slabs before sealing */
        bool keep_host; /* a host request or a keep_host device load wants the entry */
        bool drop_host; /* a device load asked to drop the host copy once copied */
};

/* A load of a component to one device: a copy from the host slabs (those of
 * a resident host entry, or of the host load that reads them now) into a new
 * device slab.  device.c. */
struct DevJob {
        Server *server;
        LIST_FIELDS(DevJob, dev_jobs); /* in server->dev_jobs */
        LIST_FIELDS(DevJob, feeds);    /* in host_job->feeds */
        size_t dev;
        Component *comp; /* owned */
        ShardPlan *plan; /* owned; points into comp's headers */
        CacheEntry *entry;      /* loading, in the device's cache */
        CacheEntry *host_entry; /* the resident host entry copied from, leased meanwhile */
        Job *host_job;          /* or the host load feeding the copy */
        GpuCopy *copy;
        Request *waiters;
        unsigned n_waiters;
        bool keep_host;
        bool cancelled;
        atomic_bool woke;
        uint64_t progress_usec;
        uint64_t started_usec;
};

/* What one uid holds, over all its connections. */
struct UidSlot {
        UidSlot *next;
        uid_t uid;
        unsigned n; /* connections */
        unsigned leases;
        size_t out_bytes;
};

struct Conn {
        Server *server;
        LIST_FIELDS(Conn, conns);
        uv_poll_t poll;
        int fd;
        int events; /* what poll watches now */
        struct ucred cred;
        UidSlot *uid_slot;
        char name[64];
        WireReader in;
        OutFrame *out_head, *out_tail;
        size_t out_bytes;
        bool hello;
        uint64_t accepted_usec; /* for the Hello deadline */
        bool closing;      /* uv_close() called */
        bool close_when_sent;
        Request *pending;
        unsigned n_pending;
        Lease *leases;
        unsigned n_leases;
};

struct Server {
        uv_loop_t loop;
        Config *config;
        char *config_path;
        Roots *roots;
        pthread_mutex_t catalog_lock; /* the catalogs are used by one worker at a time */
        bool catalog_lock_init;
        unsigned n_resolving;
        Cache *cache;
        Reader *reader;

        /* The GPU tier (device.c): found on the thread pool at start. */
        Gpu *gpu;
        int gpu_state;          /* GPU_STARTING, GPU_UP, GPU_OFF */
        char gpu_reason[WD_ERROR_MESSAGE_MAX]; /* "ok" or why there is none */
        uv_work_t gpu_work;
        unsigned *gpu_only; /* the search's own copy of [gpu] devices: a reload may free the config meanwhile */
        size_t n_gpu_only;
        Gpu *gpu_found;
        int gpu_r;
        WdError gpu_err;
        Cache **dev_caches;     /* one per device, gpu_n_devices() */
        DevJob *dev_jobs;
        unsigned n_dev_jobs;
        bool reader_stale; /* io settings changed: replace when idle */
        uint64_t storage_read_retired;
        LoadOptions load_opts;

        int listen_fd;
        bool listen_bound; /* we bound it: unlink at exit */
        char *socket_path;
        uv_poll_t listen_poll;
        bool listening;
        uv_signal_t sig_term, sig_int, sig_hup;
        uv_async_t wake;
        uv_timer_t status_timer, watchdog_timer, drain_timer, accept_timer, tick_timer;
        uint64_t watchdog_usec;

        Conn *conns;
        unsigned n_conns;
        UidSlot *uids;
        Job *jobs;
        unsigned n_jobs;
        ShardBuild *shard_builds; /* derived slabs being built (shard-job.c) */
        uint64_t next_lease_id;
        unsigned n_leases;
        uint64_t started_usec;
        uint64_t hugetlb_free_pages; /* of the default pool, refreshed every second */
        char status_line[256];       /* the last STATUS= sent */
        bool stopping;
        bool handles_closed;
        int exit_code;
};

enum {
        GPU_STARTING,
        GPU_UP,
        GPU_OFF,
};

/* conn.c */
int conn_new(Server *s, int fd, const struct ucred *cred, UidSlot *slot, Conn **ret);
void conn_close(Conn *c);
/* Stop reading; close once the queued output went out. */
void conn_close_when_sent(Conn *c);
/* Queue a frame (takes buf and fds, even on failure) and try to send it. */
int conn_queue(Conn *c, uint8_t *buf, size_t len, int *fds, size_t n_fds);
/* Pack and queue env.  On failure the connection is closed. */
int conn_send(Conn *c, const WireEnvelope *env, const int *fds, size_t n_fds);
int conn_send_error(Conn *c, uint64_t id, int code, const char *fmt, ...) _printf_(4, 5);
int conn_send_wd_error(Conn *c, uint64_t id, int r, const WdError *err);
/* A request in flight completed: read again if the limit held reading. */
void conn_request_done(Conn *c);
void conn_update_poll(Conn *c);
/* Whether c or its uid holds the most leases allowed; if so the request id
 * got RESOURCE_EXHAUSTED saying which. */
bool conn_lease_limit(Conn *c, uint64_t id);
uint64_t conn_lease_add(Conn *c, CacheEntry *e);
void conn_lease_drop(Conn *c, Lease *l);
Lease *conn_lease_find(Conn *c, uint64_t id);
/* Map one of our codes (WD_E_*, -errno) to the protocol's. */
int wd_code_to_proto(int r);

/* dispatch.c */
/* Handle one decoded frame.  Returns 0, or < 0 when the peer broke the
 * protocol (the caller logs and disconnects). */
int dispatch_frame(Conn *c, WireEnvelope *env);
/* A job finished: answer its waiters. */
void dispatch_job_finished(Job *j, int r, CacheEntry *entry, const WdError *err);
void dispatch_job_progress(Job *j);
void request_free(Request *r);
/* The peer does not wait any more (it left, cancelled, or the daemon is
 * stopping): forget the request, or orphan it until its resolve ends. */
void request_drop(Request *r);

/* shard-job.c */
/* The parts of a LoadReply whose one slab a plan lays out: the component's
 * files (names and __metadata__, no descriptors) and the plan's tensors.
 * They point into the component, the plan and the PlanReply. */
typedef struct PlanReply {
        Weightd__V1__Slab *files;
        Weightd__V1__Slab **file_ptrs;
        Weightd__V1__MetadataEntry *meta;
        Weightd__V1__MetadataEntry **meta_ptrs;
        Weightd__V1__Tensor *tensors;
        Weightd__V1__Tensor **tensor_ptrs;
} PlanReply;
/* Set load's files and tensors.  Returns 0 or -ENOMEM. */
int plan_reply_fill(PlanReply *pr, const Component *comp, const ShardPlan *plan, Weightd__V1__LoadReply *load);
void plan_reply_done(PlanReply *pr);
/* Check a Shard from the wire and turn it into a spec; *ret is NULL when it
 * shards nothing (world 1 without rules).  Returns 0 or WD_E_INVALID. */
int shard_spec_from_wire(const Weightd__V1__Shard *w, ShardSpec **ret, WdError *err);
/* A resolved sharded Load or Prefetch (its plan made): serve the derived
 * entry, join its build, or get the whole component resident first.
 * Takes r. */
void shard_load_resolved(Request *r);
/* The whole load that sharded request r waited for ended (r is off the
 * job already): build the derived slab, or pass the error on.  Takes r. */
void shard_whole_loaded(Request *r, int k, CacheEntry *whole, const WdError *err);
/* r goes away: take it off the build it waits for. */
void shard_request_forget(Request *r);

/* device.c */
/* Find the devices on the thread pool; until then device loads get
 * UNAVAILABLE. */
void device_tier_start(Server *s);
void device_tier_free(Server *s);
/* SIGHUP: the devices' budgets from c (before c replaces s->config). */
void device_tier_reload(Server *s, const Config *c);
/* A device target of a Load: the device's index, or replies (UNSUPPORTED
 * without a GPU tier, INVALID_ARGUMENT for a device it does not serve) and
 * returns -1. */
int device_target(Conn *c, uint64_t id, const char *target);
/* A resolved Load or Prefetch to r->device.  Takes r and comp. */
void device_load_resolved(Request *r, Component *comp);
/* On the loop after a wake: finish the device loads whose copy ended, send
 * progress. */
void device_jobs_poll(Server *s);
/* Reader thread: the host load j made progress (lj is its LoadJob). */
void device_feed_progress(Job *j, LoadJob *lj);
/* Whether host load j must wait for device copies before it seals;
 * cancels them when the read failed. */
bool device_feeds_busy(Job *j, int read_error);
/* Host load j ended (entry resident or NULL): drop it if only device loads
 * wanted it and one asked to drop the host copy. */
void device_host_done(Job *j, CacheEntry *entry);
/* The Status and List parts. */
void device_status(Server *s, Weightd__V1__StatusReply *st, Weightd__V1__Device *devs, Weightd__V1__Device **ptrs);
size_t device_n_entries(Server *s);
const char *device_tier_name(Server *s, const CacheEntry *e, char *buf, size_t size);
void device_request_detach(Request *r);

/* server.c */
/* Start loading comp (taken on success) from files beneath root_fd.
 * requested_usec: when the request that resolved comp came (its
 * received_usec), for the log; 0 when the load follows no resolve. */
int server_job_start(Server *s, int root_fd, Component *comp, uint64_t requested_usec, Job **ret, WdError *err);
Job *server_job_find(Server *s, CacheEntry *e);
/* A waiter went away; the job stops when nobody waits for it.  Requests
 * that join a job after it was cancelled get a fresh load when it ends. */
void server_job_waiter_gone(Job *j);
void server_update_status(Server *s);
/* When stopping: exit once no connection, load or resolve is left. */
void server_maybe_exit(Server *s);
