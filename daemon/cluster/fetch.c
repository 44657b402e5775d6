/* Transfers (see fetch.h).
 *
 * Every chunk of the plan is in one state here: MISSING (nobody is getting
 * it to this node yet), READING (a read of this node's is in flight),
 * RECEIVING (a sender's bytes are landing in the slab), LANDED (they landed
 * and wait for their checksum) or HAVE (the bytes in the slab are right).
 * After any change (a read or a receive ended, a node went down, a source
 * failed) pump() looks at every chunk: a MISSING chunk whose owner is this
 * node is read, and a chunk this node owns and has is sent to every live
 * receiver that is not done and has not had it from us.  A receiving
 * transfer seals once every chunk is HAVE and no send or receive is in
 * flight (a seal remaps the slabs); it goes on sending from the resident
 * slabs after that. */
#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <xxhash.h>

#include "cluster/fetch.h"
#include "gpu/gpu.h"
#include "io/reader.h"
#include "store/shard-build.h"
#include "util/log.h"
#include "util/time-util.h"

/* Sends in flight per transfer: enough to keep every link busy, few enough
 * that a re-plan is not stuck behind a long queue. */
#define TRANSFER_MAX_SENDS 16u
/* Chunks pump() looks at past the first one it cannot send yet. */
#define TRANSFER_SCAN_AHEAD 256u

typedef enum ChunkState {
        CHUNK_MISSING,
        CHUNK_READING,
        CHUNK_RECEIVING,
        CHUNK_LANDED,
        CHUNK_HAVE,
} ChunkState;

typedef struct ChunkInfo {
        uint8_t state;
        bool needed;      /* by this node (always, but in a part plan) */
        bool sum_known;   /* a sender's checksum for it came */
        bool own_sum_known;
        uint32_t sum_from; /* who sent sum */
        uint32_t rx_from;  /* who sent the bytes (RECEIVING, LANDED) */
        uint64_t sum;
        uint64_t own_sum;  /* of the bytes here, once HAVE */
} ChunkInfo;

typedef struct ReadBatch {
        Transfer *t; /* referenced */
        ReaderJob *job;
        size_t *chunks;
        size_t n;
        size_t n_seen; /* chunks already taken as read */
        bool *seen;
        bool ended;
        Completion done;
        LIST_FIELDS(struct ReadBatch, batches);
} ReadBatch;

typedef struct Rx {
        Transfer *t; /* referenced */
        size_t index;
        unsigned from;
        uint64_t length;
} Rx;

/* A chunk on the GPU lane, in ring slot index % slots. */
typedef struct LaneOp {
        GpuCollOp op;
        Transfer *t;   /* referenced while the op is in flight */
        size_t index;
        unsigned root; /* mesh index */
        bool deliver;  /* into this node's slab (a chunk it needs and gets from the lane) */
} LaneOp;

typedef struct Tx {
        DataPlaneSend send;
        Transfer *t; /* referenced */
        size_t index;
        size_t receiver; /* index in t->receivers */
        void *copy;      /* corrupt_every: the bytes sent */
} Tx;

struct Transfer {
        Job job; /* first; job_init()ed for a receiving transfer only */
        unsigned refs;
        TransferContext *ctx;
        JobWaiter self_wait; /* keeps the job from being cancelled by local waiters leaving */
        uint64_t plan_id, chunk_size;
        Component *comp;
        int root_fd;
        unsigned self;

        bool receiving, started, sealing, aborted, finished;
        int result; /* -EINPROGRESS until sealed or failed */
        WdError err;
        LoadJob *load;     /* receiving, until sealed */
        /* load's entry, referenced while load is: fail() retires it and the
         * job lets go of it, and load_job_discard() still looks at it. */
        CacheEntry *load_entry;
        CacheEntry *entry; /* the resident entry to send from (referenced) */

        PlanChunk *chunks;
        size_t n_chunks;
        /* A part plan (transfer_new_part()): its nodes, each serving a
         * shard or the whole; the chunks are plan_pieces() of them, bit i
         * of a piece's need is nodes[i], and sources and receivers are
         * nodes in the same order. */
        bool part;
        unsigned nodes[PLAN_MAX_SOURCES];
        size_t n_nodes;
        ShardSpec *spec;  /* this node's shard; NULL: it serves the whole component */
        Job *build;       /* the shard build, after the seal */
        JobWaiter build_wait;
        CacheEntry *part_entry; /* the built shard */
        unsigned *first_owner; /* index in sources */
        ChunkInfo *ci;
        uint64_t have_bytes, total_bytes;
        size_t n_needed, n_have; /* chunks this node needs, and has of them */
        /* pump() looks at every chunk only when this is set: when a chunk
         * went back to MISSING or its owner may have changed; otherwise it
         * goes on from send_from, below which nothing is left to send. */
        bool rescan;
        size_t send_from;

        unsigned sources[PLAN_MAX_SOURCES];
        const char *source_names[PLAN_MAX_SOURCES];
        bool source_alive[PLAN_MAX_SOURCES];
        bool source_usable[PLAN_MAX_SOURCES]; /* alive and not failed here */
        uint64_t source_heard_usec[PLAN_MAX_SOURCES];
        size_t n_sources;
        int self_source; /* index in sources, -1 when not one */

        unsigned *receivers;
        bool *receiver_done; /* or gone */
        size_t n_receivers;
        uint8_t *sent; /* n_chunks x n_receivers */

        ReadBatch *batches;
        unsigned n_rx, n_tx;
        uint64_t activity_usec; /* the last send, receive or read */
        TransferStats stats;
        WorkerTask seal;

        /* The GPU lane (transfer_set_lane()): chunks [lane_done, lane_next)
         * are enqueued on it, their ops in lane_ops[index % slots]. */
        TransferLane *lane;
        bool lane_was_set;    /* transfer_set_lane() ran */
        bool lane_registered; /* the slabs are page-locked for it */
        uint64_t lane_down_from; /* receivers (bit k: receivers[k]) that said LaneDown: once each */
        size_t lane_next, lane_done;
        LaneOp *lane_ops;
        uint64_t lane_heard_usec;
};

static const JobKind transfer_kind;
static void pump(Transfer *t);
static void drop_unowned(Transfer *t);

/* A receiving transfer's references are its job's. */
Transfer *transfer_ref(Transfer *t) {
        if (t->receiving)
                job_ref(&t->job);
        else
                t->refs++;
        return t;
}

static void transfer_free(Transfer *t) {
        assert(!t->batches && t->n_rx == 0 && t->n_tx == 0);
        /* Never sealed: give the reservation back. */
        if (t->load)
                load_job_discard(TAKE_PTR(t->load));
        cache_entry_unref(TAKE_PTR(t->load_entry));
        /* A part plan's staging entry: nothing but this transfer uses it. */
        if (t->part && t->spec && t->entry)
                (void) cache_entry_evict(t->entry, NULL);
        cache_entry_unref(TAKE_PTR(t->entry));
        cache_entry_unref(TAKE_PTR(t->part_entry));
        shard_spec_free(t->spec);
        component_free(t->comp);
        safe_close(t->root_fd);
        free(t->chunks);
        free(t->first_owner);
        free(t->ci);
        free(t->receivers);
        free(t->receiver_done);
        free(t->sent);
        free(t->lane_ops);
        free(t);
}

void transfer_unref(Transfer *t) {
        if (!t)
                return;
        if (t->receiving)
                job_unref(&t->job); /* frees through transfer_kind.free */
        else if (--t->refs == 0)
                transfer_free(t);
}

Transfer *transfer_from_job(Job *j) {
        return j->kind == &transfer_kind ? (Transfer *) j : NULL;
}

uint64_t transfer_plan_id(const Transfer *t) {
        return t->plan_id;
}

Job *transfer_job(Transfer *t) {
        return t->receiving ? &t->job : NULL;
}

uint64_t transfer_chunk_size(const Transfer *t) {
        return t->chunk_size;
}

bool transfer_receiving(const Transfer *t) {
        return t->receiving;
}

bool transfer_started(const Transfer *t) {
        return t->started;
}

int transfer_result(const Transfer *t, const WdError **ret_err) {
        if (ret_err)
                *ret_err = &t->err;
        return t->result;
}

void transfer_stats(const Transfer *t, TransferStats *ret) {
        *ret = t->stats;
}

void transfer_progress(const Transfer *t, uint64_t *ret_done, uint64_t *ret_total) {
        *ret_done = t->have_bytes;
        *ret_total = t->total_bytes;
}

const Component *transfer_component(const Transfer *t) {
        return t->comp;
}

const ShardSpec *transfer_spec(const Transfer *t) {
        return t->spec;
}

int transfer_root_fd(const Transfer *t) {
        return t->root_fd;
}

bool transfer_makes(const Transfer *t, const Component *comp, const ShardSpec *spec) {
        _cleanup_free_ char *mine = NULL, *theirs = NULL;

        if (!t->part || t->aborted || t->result != -EINPROGRESS || strcmp(t->comp->model, comp->model) != 0 ||
            strcmp(t->comp->name, comp->name) != 0 || t->comp->n_files != comp->n_files)
                return false;
        for (size_t i = 0; i < comp->n_files; i++)
                if (!file_id_equal(&t->comp->files[i].id, &comp->files[i].id))
                        return false;
        mine = shard_spec_key(t->spec);
        theirs = shard_spec_key(spec);
        return mine && theirs && strcmp(mine, theirs) == 0;
}

/* ---- set-up ------------------------------------------------------------- */

static void self_wait_done(JobWaiter *w, const JobOutcome *o) {
}

static const JobWaiterOps self_wait_ops = { .done = self_wait_done };

static int transfer_alloc(TransferContext *ctx, uint64_t plan_id, const Component *comp, uint64_t chunk_size,
                          Transfer **ret, WdError *err) {
        Transfer *t;
        int r;

        t = calloc(1, sizeof(Transfer));
        if (!t)
                return wd_error_set(err, -ENOMEM, "out of memory");
        t->refs = 1;
        t->ctx = ctx;
        t->plan_id = plan_id;
        t->chunk_size = chunk_size;
        t->root_fd = -1;
        t->result = -EINPROGRESS;
        t->self = mesh_self(ctx->mesh);
        t->self_source = -1;
        t->activity_usec = now_usec();
        r = component_dup(comp, &t->comp);
        if (r < 0) {
                free(t);
                return wd_error_set(err, r, "cannot duplicate the component: %s", strerror(-r));
        }
        r = plan_chunks(t->comp, chunk_size, &t->chunks, &t->n_chunks);
        if (r == 0) {
                t->first_owner = calloc(t->n_chunks ? t->n_chunks : 1, sizeof(unsigned));
                t->ci = calloc(t->n_chunks ? t->n_chunks : 1, sizeof(ChunkInfo));
                if (!t->first_owner || !t->ci)
                        r = -ENOMEM;
        }
        t->total_bytes = t->comp->total_bytes;
        for (size_t c = 0; r == 0 && c < t->n_chunks; c++)
                t->ci[c].needed = true;
        t->n_needed = t->n_chunks;
        if (r < 0) {
                transfer_free(t);
                return wd_error_set(err, r, "out of memory");
        }
        *ret = t;
        return 0;
}

/* The staging slabs of a node that serves a shard: the component's files,
 * sparse, filled only where its pieces are; its memory is reserved for
 * those bytes only, under a variant no request asks for. */
static int prepare_part(Transfer *t, WdError *err) {
        LoadOptions opts = t->ctx->store->load_opts;
        _cleanup_free_ char *key = shard_spec_key(t->spec);
        _cleanup_free_ char *variant = NULL;
        uint64_t need = 0;

        if (!key || asprintf(&variant, "cluster staging %016" PRIx64 " %s", t->plan_id, key) < 0)
                return wd_error_set(err, -ENOMEM, "out of memory");
        for (size_t c = 0; c < t->n_chunks; c++)
                if (t->ci[c].needed)
                        need += t->chunks[c].length;
        /* hugetlb pages would be taken for the whole files. */
        opts.pages = SLAB_PAGES_SMALL;
        return load_job_prepare_variant(&t->load, t->ctx->store->cache, t->root_fd, t->comp, &opts, variant,
                                        MAX(need, 1u), err);
}

/* A receiving transfer's memory (its slabs, reserved) and job: the
 * transfer's references are the job's from here on.  Frees t on failure. */
static int receiving_prepare(Transfer *t, int root_fd, WdError *err) {
        TransferContext *ctx = t->ctx;
        int r;

        t->root_fd = fcntl(root_fd, F_DUPFD_CLOEXEC, 3);
        if (t->root_fd < 0) {
                r = negative_errno();
                transfer_free(t);
                return wd_error_set(err, r, "cannot duplicate the model root's descriptor: %s", strerror(-r));
        }
        if (t->spec)
                r = prepare_part(t, err);
        else
                r = load_job_prepare(&t->load, ctx->store->cache, t->root_fd, t->comp, &ctx->store->load_opts, err);
        if (r != 0) {
                transfer_free(t);
                return r;
        }
        t->load_entry = cache_entry_ref(load_job_entry(t->load));
        job_init(&t->job, &transfer_kind, &ctx->store->jobs, load_job_entry(t->load));
        t->job.total = t->total_bytes;
        job_add_waiter(&t->job, &t->self_wait, &self_wait_ops);
        store_changed(ctx->store);
        return 0;
}

int transfer_new_receiving(TransferContext *ctx, uint64_t plan_id, const Component *comp, int root_fd,
                           uint64_t chunk_size, Transfer **ret, WdError *err) {
        Transfer *t;
        int r;

        r = transfer_alloc(ctx, plan_id, comp, chunk_size, &t, err);
        if (r != 0)
                return r;
        t->receiving = true;
        r = receiving_prepare(t, root_fd, err);
        if (r != 0)
                return r;
        *ret = t;
        return 0;
}

int transfer_new_part(TransferContext *ctx, uint64_t plan_id, const Component *comp, int root_fd,
                      uint64_t chunk_size, const unsigned *nodes, ShardSpec *const *specs, size_t n, Transfer **ret,
                      WdError *err) {
        Transfer *t;
        int self = -1, r;

        if (n == 0 || n > PLAN_MAX_SOURCES)
                return wd_error_set(err, WD_E_INVALID, "a plan has 1 to %u nodes, not %zu", PLAN_MAX_SOURCES, n);
        for (size_t i = 0; i < n; i++)
                if (nodes[i] == mesh_self(ctx->mesh))
                        self = (int) i;
        if (self < 0)
                return wd_error_set(err, WD_E_INVALID, "this node is not one of the plan's");
        r = transfer_alloc(ctx, plan_id, comp, chunk_size, &t, err);
        if (r != 0)
                return r;
        t->receiving = true;
        t->part = true;
        t->n_nodes = n;
        memcpy(t->nodes, nodes, n * sizeof(unsigned));
        free(t->chunks);
        free(t->first_owner);
        free(t->ci);
        t->chunks = NULL;
        t->first_owner = NULL;
        t->ci = NULL;
        r = plan_pieces(t->comp, (const ShardSpec *const *) specs, n, chunk_size, READER_ALIGN, &t->chunks,
                        &t->n_chunks, err);
        if (r != 0) {
                transfer_free(t);
                return r;
        }
        t->first_owner = calloc(MAX(t->n_chunks, 1u), sizeof(unsigned));
        t->ci = calloc(MAX(t->n_chunks, 1u), sizeof(ChunkInfo));
        if (!t->first_owner || !t->ci || (specs[self] && shard_spec_copy(specs[self], &t->spec) < 0)) {
                transfer_free(t);
                return wd_error_set(err, -ENOMEM, "out of memory");
        }
        plan_assign_needed(t->chunks, t->n_chunks, n, t->first_owner);
        t->total_bytes = 0;
        t->n_needed = 0;
        for (size_t c = 0; c < t->n_chunks; c++) {
                t->ci[c].needed = t->chunks[c].need >> self & 1;
                if (t->ci[c].needed) {
                        t->total_bytes += t->chunks[c].length;
                        t->n_needed++;
                } else
                        t->ci[c].state = CHUNK_HAVE; /* nothing to wait for */
        }
        r = receiving_prepare(t, root_fd, err);
        if (r != 0)
                return r;
        *ret = t;
        return 0;
}

int transfer_new_resident(TransferContext *ctx, uint64_t plan_id, const Component *comp, CacheEntry *e,
                          uint64_t chunk_size, Transfer **ret, WdError *err) {
        Transfer *t;
        int r;

        if (e->state != CACHE_ENTRY_RESIDENT || e->n_slabs != comp->n_files)
                return wd_error_set(err, WD_E_BUSY, "%s: not resident here", comp->model);
        r = transfer_alloc(ctx, plan_id, comp, chunk_size, &t, err);
        if (r != 0)
                return r;
        t->entry = cache_entry_ref(e);
        for (size_t c = 0; c < t->n_chunks; c++)
                t->ci[c].state = CHUNK_HAVE;
        t->n_have = t->n_needed;
        t->have_bytes = t->total_bytes;
        t->result = 0;
        *ret = t;
        return 0;
}

static bool listed(const unsigned *a, size_t n, unsigned x) {
        for (size_t i = 0; i < n; i++)
                if (a[i] == x)
                        return true;
        return false;
}

/* Sources and receivers set: start reading, sending and receiving. */
static int go(Transfer *t, uint64_t now) {
        t->started = true;
        t->activity_usec = now;
        t->rescan = true;
        drop_unowned(t);
        pump(t);
        return 0;
}

/* A part plan: every node of the plan is a source and a receiver, in the
 * plan's order; those the Start leaves out (they hold their part, or
 * failed) neither read nor get anything. */
static int start_part(Transfer *t, const unsigned *takers, size_t n_takers) {
        uint64_t now = now_usec();

        t->receivers = calloc(t->n_nodes, sizeof(unsigned));
        t->receiver_done = calloc(t->n_nodes, sizeof(bool));
        t->sent = calloc(MAX(t->n_chunks * t->n_nodes, 1u), 1);
        if (!t->receivers || !t->receiver_done || !t->sent)
                return -ENOMEM;
        t->n_receivers = t->n_sources = t->n_nodes;
        for (size_t i = 0; i < t->n_nodes; i++) {
                unsigned node = t->nodes[i];
                bool takes = listed(takers, n_takers, node);

                t->receivers[i] = t->sources[i] = node;
                t->receiver_done[i] = node == t->self || !takes || !mesh_node_up(t->ctx->mesh, node);
                t->source_names[i] = mesh_node_name(t->ctx->mesh, node);
                t->source_alive[i] = node == t->self || (takes && mesh_node_up(t->ctx->mesh, node));
                t->source_usable[i] = t->source_alive[i];
                t->source_heard_usec[i] = now;
                if (node == t->self)
                        t->self_source = (int) i;
        }
        return go(t, now);
}

int transfer_start(Transfer *t, const unsigned *sources, size_t n_sources, const unsigned *receivers,
                   size_t n_receivers) {
        uint64_t now = now_usec();

        if (t->started || t->aborted || n_sources > PLAN_MAX_SOURCES)
                return -EINVAL;
        if (t->part)
                return start_part(t, receivers, n_receivers);
        t->receivers = calloc(n_receivers ? n_receivers : 1, sizeof(unsigned));
        t->receiver_done = calloc(n_receivers ? n_receivers : 1, sizeof(bool));
        t->sent = calloc(t->n_chunks * n_receivers > 0 ? t->n_chunks * n_receivers : 1, 1);
        if (!t->receivers || !t->receiver_done || !t->sent)
                return -ENOMEM;
        t->n_receivers = n_receivers;
        for (size_t i = 0; i < n_receivers; i++) {
                t->receivers[i] = receivers[i];
                /* We need nothing sent to ourselves. */
                t->receiver_done[i] = receivers[i] == t->self || !mesh_node_up(t->ctx->mesh, receivers[i]);
        }
        t->n_sources = n_sources;
        for (size_t i = 0; i < n_sources; i++) {
                t->sources[i] = sources[i];
                t->source_names[i] = mesh_node_name(t->ctx->mesh, sources[i]);
                t->source_alive[i] = sources[i] == t->self || mesh_node_up(t->ctx->mesh, sources[i]);
                t->source_usable[i] = t->source_alive[i];
                t->source_heard_usec[i] = now;
                if (sources[i] == t->self)
                        t->self_source = (int) i;
        }
        if (n_sources > 0)
                plan_assign(t->chunks, t->n_chunks, n_sources, t->first_owner);
        return go(t, now);
}

/* ---- ownership ---------------------------------------------------------- */

static int owner_of(Transfer *t, size_t c) {
        if (t->part)
                return plan_owner_needed(c, t->first_owner[c], t->chunks[c].need, t->source_names, t->source_alive,
                                         t->n_sources);
        return plan_owner(c, t->first_owner[c], t->source_names, t->source_alive, t->n_sources);
}

/* Who should get chunk c to this node: an index in sources, or -1 for
 * this node reading it from storage. */
static int chunk_owner(Transfer *t, size_t c) {
        int o;

        if (t->n_sources == 0)
                return -1;
        o = owner_of(t, c);
        if (o < 0 || !t->source_usable[o])
                return -1;
        return o;
}

/* After the Start a chunk is taken from its owner only: bytes that landed
 * from another node (before the Start, or before the owner changed) and
 * that their sender's checksum did not vouch for go back to MISSING, and a
 * checksum from anyone but the owner is forgotten, so that the owner's
 * bytes, or a read, fill the chunk.  (A receive from another node still in
 * flight ends as MISSING: transfer_received().)  Before this, a node that
 * sent a chunk it did not own first held it up for good: its bytes waited
 * for its checksum, which came only before the Start, and the owner's
 * bytes were refused as the chunk was not MISSING. */
static void drop_unowned(Transfer *t) {
        t->rescan = true;
        for (size_t c = 0; c < t->n_chunks; c++) {
                ChunkInfo *ci = &t->ci[c];
                int o = chunk_owner(t, c);
                bool owner_known = o >= 0;
                unsigned owner = owner_known ? t->sources[o] : 0;

                if (ci->state == CHUNK_HAVE)
                        continue;
                if (ci->state == CHUNK_LANDED && (!owner_known || ci->rx_from != owner))
                        ci->state = CHUNK_MISSING;
                if (ci->sum_known && (!owner_known || ci->sum_from != owner))
                        ci->sum_known = false;
        }
}

/* Whether this node is the one to send chunk c to the others. */
static bool chunk_mine_to_send(Transfer *t, size_t c) {
        int o;

        if (t->self_source < 0)
                return false;
        o = owner_of(t, c);
        return o == t->self_source;
}

/* ---- reading ------------------------------------------------------------ */

static void batch_free(ReadBatch *b) {
        Transfer *t = b->t;

        LIST_REMOVE(batches, t->batches, b);
        reader_job_free(b->job);
        free(b->chunks);
        free(b->seen);
        free(b);
        transfer_unref(t);
}

static void chunk_have(Transfer *t, size_t c, uint64_t sum, bool sum_known) {
        ChunkInfo *ci = &t->ci[c];

        if (ci->state != CHUNK_HAVE && ci->needed)
                t->n_have++;
        ci->state = CHUNK_HAVE;
        ci->own_sum = sum;
        ci->own_sum_known = sum_known;
        t->have_bytes += t->chunks[c].length;
        t->activity_usec = now_usec();
        if (t->receiving && t->job.state == JOB_RUNNING)
                job_progress(&t->job, t->have_bytes, t->total_bytes, 0, false);
}

/* Take the chunks of b that the reader filled. */
static void batch_collect(ReadBatch *b) {
        Transfer *t = b->t;

        for (size_t k = 0; k < b->n; k++) {
                size_t c = b->chunks[k];

                if (b->seen[k] || reader_job_filled(b->job, k) < t->chunks[c].length)
                        continue;
                b->seen[k] = true;
                b->n_seen++;
                t->stats.storage_read_bytes += t->chunks[c].length;
                /* Hashed when it is first sent: a node that only
                 * receives never hashes what it read itself. */
                if (t->ci[c].state == CHUNK_READING)
                        chunk_have(t, c, 0, false);
        }
}

static void fail(Transfer *t, int r, const WdError *err);

static void batch_done(Completion *comp) {
        ReadBatch *b = container_of(comp, ReadBatch, done);
        Transfer *t = transfer_ref(b->t);
        int error = 0;
        size_t failed = 0;

        b->ended = true;
        t->ctx->store->n_reading--;
        batch_collect(b);
        for (size_t k = 0; k < b->n; k++)
                if (!b->seen[k]) {
                        size_t c = b->chunks[k];

                        if (t->ci[c].state == CHUNK_READING)
                                t->ci[c].state = CHUNK_MISSING;
                        t->rescan = true;
                        if (!error) {
                                error = -EIO;
                                failed = c;
                        }
                }
        batch_free(b);
        store_changed(t->ctx->store);
        if (error && !t->aborted) {
                const CatalogFile *f = &t->comp->files[t->chunks[failed].file];
                WdError err = WD_ERROR_NULL;

                wd_error_set(&err, -EIO, "%s: reading bytes [%" PRIu64 ", %" PRIu64 ") failed", f->display,
                             t->chunks[failed].offset, t->chunks[failed].offset + t->chunks[failed].length);
                fail(t, -EIO, &err);
        }
        pump(t);
        transfer_unref(t);
}

/* On the reader thread. */
static void batch_progress(ReaderJob *rj, uint64_t done, uint64_t total, void *userdata) {
        ReadBatch *b = userdata;

        completion_kick(b->t->ctx->store->queue);
}

static void batch_reader_done(ReaderJob *rj, int error, size_t failed_extent, void *userdata) {
        ReadBatch *b = userdata;

        completion_post(b->t->ctx->store->queue, &b->done, batch_done);
}

/* Read chunks (MISSING, owned by nobody usable) from storage into the
 * slabs, in one reader job. */
static void read_chunks(Transfer *t, const size_t *chunks, size_t n) {
        _cleanup_free_ ReaderExtent *extents = NULL;
        ReadBatch *b;
        int r;

        if (n == 0)
                return;
        b = calloc(1, sizeof(ReadBatch));
        extents = calloc(n, sizeof(ReaderExtent));
        if (!b || !extents)
                goto oom;
        b->chunks = malloc(n * sizeof(size_t));
        b->seen = calloc(n, sizeof(bool));
        if (!b->chunks || !b->seen)
                goto oom;
        memcpy(b->chunks, chunks, n * sizeof(size_t));
        b->n = n;
        for (size_t k = 0; k < n; k++) {
                const PlanChunk *pc = &t->chunks[chunks[k]];

                load_job_extent(t->load, pc->file, pc->offset, pc->length, &extents[k]);
        }
        r = reader_job_new(&b->job, extents, n, batch_progress, batch_reader_done, b);
        if (r < 0)
                goto oom;
        b->t = transfer_ref(t);
        LIST_PREPEND(batches, t->batches, b);
        r = reader_submit(t->ctx->store->reader, b->job);
        if (r < 0) {
                WdError err = WD_ERROR_NULL;

                batch_free(b);
                wd_error_set(&err, r, "cannot queue a read: %s", strerror(-r));
                fail(t, r, &err);
                return;
        }
        for (size_t k = 0; k < n; k++)
                t->ci[chunks[k]].state = CHUNK_READING;
        /* The server swaps its reader only while nothing reads. */
        t->ctx->store->n_reading++;
        store_changed(t->ctx->store);
        return;
oom:
        if (b) {
                free(b->chunks);
                free(b->seen);
                reader_job_free(b->job);
                free(b);
        }
        fail(t, -ENOMEM, &(WdError){ .code = -ENOMEM, .message = "out of memory" });
}

/* Poll the running reads (progress arrives as bare kicks). */
static void transfer_poll(Job *j) {
        Transfer *t = (Transfer *) j;
        bool any = false;

        LIST_FOREACH(batches, b, t->batches)
                if (!b->ended) {
                        size_t before = b->n_seen;

                        batch_collect(b);
                        any = any || b->n_seen != before;
                }
        if (any)
                pump(t);
}

/* ---- sending ------------------------------------------------------------ */

static const uint8_t *chunk_data(Transfer *t, size_t c) {
        const PlanChunk *pc = &t->chunks[c];

        if (t->load)
                return load_job_slabs(t->load)[pc->file]->data + pc->offset;
        return t->entry->slabs[pc->file]->data + pc->offset;
}

static void tx_done(DataPlaneSend *s, int status) {
        Tx *tx = container_of(s, Tx, send);
        Transfer *t = tx->t;

        t->n_tx--;
        if (status == 0) {
                t->stats.peer_sent_bytes += t->chunks[tx->index].length;
                if (!t->aborted) /* a reconfigured cluster may number its nodes anew */
                        t->ctx->node_sent[t->receivers[tx->receiver]] += t->chunks[tx->index].length;
                t->activity_usec = now_usec();
        } else {
                /* Not delivered: a later pump sends it again if the
                 * receiver is still there. */
                t->sent[tx->index * t->n_receivers + tx->receiver] = 0;
                if (tx->index < t->send_from)
                        t->send_from = tx->index;
                log_debug("plan %016" PRIx64 ": chunk %zu to %s not sent: %s", t->plan_id, tx->index,
                          mesh_node_name(t->ctx->mesh, t->receivers[tx->receiver]), strerror(-status));
        }
        free(tx->copy);
        free(tx);
        pump(t);
        transfer_unref(t);
}

/* The xxh3 of chunk c (which this node has), over the mesh to node: the
 * bytes, whichever way they go, count there only if they match it. */
static int send_sum(Transfer *t, size_t c, unsigned node) {
        Weightd__Cluster__V1__ChunkSum sum = WEIGHTD__CLUSTER__V1__CHUNK_SUM__INIT;
        ClusterEnvelope env = WEIGHTD__CLUSTER__V1__ENVELOPE__INIT;

        if (!t->ci[c].own_sum_known) {
                t->ci[c].own_sum = XXH3_64bits(chunk_data(t, c), t->chunks[c].length);
                t->ci[c].own_sum_known = true;
        }
        sum.plan_id = t->plan_id;
        sum.index = (uint32_t) c;
        sum.xxh3 = t->ci[c].own_sum;
        env.body_case = WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_CHUNK_SUM;
        env.chunk_sum = &sum;
        return mesh_send(t->ctx->mesh, node, &env);
}

/* Send chunk c to receiver k: its checksum over the mesh, its bytes over
 * the data plane.  Returns 0, or -errno (nothing sent). */
static int send_chunk(Transfer *t, size_t c, size_t k) {
        TransferContext *ctx = t->ctx;
        unsigned node = t->receivers[k];
        const uint8_t *data = chunk_data(t, c);
        uint64_t len = t->chunks[c].length;
        TransferChunkHeader h = {
                .plan_id = t->plan_id,
                .generation = ctx->generation,
                .index = (uint32_t) c,
                .sender = t->self,
        };
        Tx *tx;
        int r;

        r = send_sum(t, c, node);
        if (r < 0)
                return r;

        tx = calloc(1, sizeof(Tx));
        if (!tx)
                return -ENOMEM;
        if (ctx->corrupt_every > 0 && ++ctx->n_sent_chunks % ctx->corrupt_every == 0) {
                tx->copy = malloc(len ? len : 1);
                if (!tx->copy) {
                        free(tx);
                        return -ENOMEM;
                }
                memcpy(tx->copy, data, len);
                ((uint8_t *) tx->copy)[len / 2] ^= 0x5a;
                data = tx->copy;
                log_warning("plan %016" PRIx64 ": corrupting chunk %zu sent to %s (WEIGHTD_TEST_CORRUPT_CHUNKS)",
                            t->plan_id, c, mesh_node_name(ctx->mesh, node));
        }
        tx->t = t;
        tx->index = c;
        tx->receiver = k;
        tx->send.done = tx_done;
        r = dataplane_send(ctx->data, node, &h, sizeof(h), data, len, &tx->send);
        if (r < 0) {
                free(tx->copy);
                free(tx);
                return r;
        }
        transfer_ref(t);
        t->n_tx++;
        t->sent[c * t->n_receivers + k] = 1;
        return 0;
}

/* ---- the GPU lane ------------------------------------------------------- */

static void verify(Transfer *t, size_t c);
static int source_index(const Transfer *t, unsigned node);
static int receiver_index(const Transfer *t, unsigned node);

static int rank_of(const TransferLane *l, unsigned node) {
        for (int r = 0; r < l->nranks; r++)
                if (l->peers[r] == node)
                        return r;
        return -1;
}

int transfer_set_lane(Transfer *t, TransferLane *lane) {
        if (t->part || t->started || t->lane || lane->slots == 0 || lane->slot_bytes < t->chunk_size)
                return -EINVAL;
        t->lane_ops = calloc(lane->slots, sizeof(LaneOp));
        if (!t->lane_ops)
                return -ENOMEM;
        t->lane = lane;
        t->lane_was_set = true;
        t->lane_heard_usec = now_usec();
        return 0;
}

/* The lane ends for t: why NULL when every chunk went through it, else
 * what went wrong (tell: the cluster hears it and aborts the
 * communicator, so that no signal of ours runs after).  What is still in
 * flight on it goes back to MISSING, and what this node broadcast goes
 * again over the data plane to the receivers not done (they drop what they
 * have).  The caller holds a reference of its own. */
static void lane_end(Transfer *t, const char *why, bool tell) {
        TransferLane *l = t->lane;
        size_t in_flight;

        if (!l)
                return;
        t->lane = NULL;
        if (why)
                log_warning("plan %016" PRIx64 ": %s: the GPU lane ended: %s; the rest goes over the data plane",
                            t->plan_id, t->comp->model, why);
        in_flight = t->lane_next - t->lane_done;
        if (why) {
                for (size_t c = t->lane_done; c < t->lane_next; c++) {
                        const LaneOp *op = &t->lane_ops[c % l->slots];

                        if (op->deliver && t->ci[c].state == CHUNK_RECEIVING)
                                t->ci[c].state = CHUNK_MISSING;
                }
                for (size_t c = 0; c < t->lane_next; c++)
                        if (t->self_source >= 0 && t->first_owner[c] == (unsigned) t->self_source)
                                memset(&t->sent[c * t->n_receivers], 0, t->n_receivers);
                t->rescan = true;
                t->send_from = 0;
        }
        t->lane_done = t->lane_next;
        /* Last: the cluster may abort the communicator and free the lane. */
        if (tell)
                l->ended(l, t, why);
        while (in_flight-- > 0)
                transfer_unref(t);
}

static void lane_op_done(GpuCollOp *o, int status) {
        LaneOp *op = container_of(o, LaneOp, op);
        Transfer *t = op->t;
        size_t c = op->index;
        uint64_t len = t->chunks[c].length, now = now_usec();
        ChunkInfo *ci = &t->ci[c];

        assert(t->lane && c == t->lane_done);
        t->lane_done++;
        t->lane_heard_usec = now;
        t->activity_usec = now;
        if (op->root == t->self) {
                for (size_t k = 0; k < t->n_receivers; k++)
                        if (t->receivers[k] != t->self) {
                                t->lane->sent_bytes += len;
                                t->stats.peer_sent_bytes += len;
                                t->ctx->node_sent[t->receivers[k]] += len;
                        }
        } else {
                int s = source_index(t, op->root);

                if (s >= 0)
                        t->source_heard_usec[s] = now;
                if (op->deliver && ci->state == CHUNK_RECEIVING && ci->rx_from == op->root) {
                        t->lane->received_bytes += len;
                        ci->state = CHUNK_LANDED;
                        verify(t, c);
                }
        }
        pump(t);
        transfer_unref(t);
}

/* Page-lock the slabs the lane copies from and to (the server unlocks
 * them before a seal or when they are freed). */
static int lane_register(Transfer *t, WdError *err) {
        for (size_t f = 0; f < t->comp->n_files; f++) {
                Slab *slab = t->load ? load_job_slabs(t->load)[f] : t->entry->slabs[f];
                int r;

                if (!slab || slab->size == 0)
                        continue;
                r = gpu_host_register(t->lane->gpu, slab->data, slab->size, !t->load, err);
                if (r < 0)
                        return r;
        }
        t->lane_registered = true;
        return 0;
}

/* Enqueue the next chunks, in chunk order (every rank enqueues the same
 * broadcasts in the same order), as many as the ring has slots. */
static void lane_pump(Transfer *t) {
        TransferLane *l = t->lane;
        WdError err = WD_ERROR_NULL;

        if (t->aborted || (t->result != -EINPROGRESS && t->result != 0)) {
                lane_end(t, "the transfer stopped", true);
                return;
        }
        if (!t->started || t->sealing)
                return;
        if (t->lane_done == t->n_chunks) {
                lane_end(t, NULL, true); /* every chunk went through it */
                return;
        }
        if (!l->ready)
                return;
        if (!t->lane_registered && lane_register(t, &err) < 0) {
                lane_end(t, err.message, true);
                return;
        }
        while (t->lane && t->lane_next < t->n_chunks && t->lane_next - t->lane_done < l->slots) {
                size_t c = t->lane_next;
                int o = chunk_owner(t, c), root_rank, r;
                LaneOp *op = &t->lane_ops[c % l->slots];
                uint8_t *slot = l->ring + (c % l->slots) * l->slot_bytes;
                uint64_t len = t->chunks[c].length;
                ChunkInfo *ci = &t->ci[c];
                unsigned root;

                /* Every rank follows the plan's first readers: a chunk
                 * whose reader changed (it went down, or failed here) ends
                 * the lane on every rank. */
                if (o < 0 || (unsigned) o != t->first_owner[c] || len > l->slot_bytes) {
                        lane_end(t, "a chunk's reader changed", true);
                        return;
                }
                root = t->sources[o];
                root_rank = rank_of(l, root);
                if (root_rank < 0) {
                        lane_end(t, "a reader that is no rank of the communicator", true);
                        return;
                }
                *op = (LaneOp){ .op.done = lane_op_done, .t = t, .index = c, .root = root };
                if (root == t->self) {
                        if (ci->state != CHUNK_HAVE)
                                return; /* in order: its read comes first */
                        for (size_t k = 0; k < t->n_receivers; k++) {
                                if (t->receivers[k] == t->self)
                                        continue;
                                if (!t->receiver_done[k])
                                        (void) send_sum(t, c, t->receivers[k]); /* one that went hears nothing */
                                t->sent[c * t->n_receivers + k] = 1;
                        }
                        r = l->coll->ops->copy(l->comm, slot, chunk_data(t, c), len, &err);
                        if (r == 0)
                                r = l->coll->ops->broadcast(l->comm, slot, slot, len, root_rank, &err);
                } else {
                        uint8_t *dst = t->load ? load_job_slabs(t->load)[t->chunks[c].file]->data +
                                                         t->chunks[c].offset
                                               : NULL;

                        op->deliver = dst && ci->needed && ci->state == CHUNK_MISSING;
                        r = l->coll->ops->broadcast(l->comm, NULL, slot, len, root_rank, &err);
                        if (r == 0 && op->deliver)
                                r = l->coll->ops->copy(l->comm, dst, slot, len, &err);
                        if (r == 0 && op->deliver) {
                                ci->state = CHUNK_RECEIVING;
                                ci->rx_from = root;
                        }
                }
                if (r == 0)
                        r = l->coll->ops->signal(l->comm, &op->op, &err);
                if (r < 0) {
                        if (op->deliver && ci->state == CHUNK_RECEIVING)
                                ci->state = CHUNK_MISSING;
                        lane_end(t, err.message, true);
                        return;
                }
                transfer_ref(t);
                t->lane_next++;
        }
}

void transfer_drop_lane(Transfer *t, const char *why) {
        if (!t->lane)
                return;
        transfer_ref(t);
        lane_end(t, why, false);
        pump(t);
        transfer_unref(t);
}

void transfer_lane_down(Transfer *t, unsigned node, const char *why) {
        int k = receiver_index(t, node);

        transfer_ref(t);
        /* Once per receiver, and only in a plan that had a lane: a node
         * cannot make this one send it everything again and again. */
        if (t->started && t->lane_was_set && k >= 0 && k < 64 && !(t->lane_down_from >> k & 1) &&
            t->self_source >= 0) {
                t->lane_down_from |= UINT64_C(1) << k;
                for (size_t c = 0; c < t->n_chunks; c++)
                        if (t->first_owner[c] == (unsigned) t->self_source || chunk_owner(t, c) == t->self_source)
                                t->sent[c * t->n_receivers + (size_t) k] = 0;
        }
        t->rescan = true;
        t->send_from = 0;
        lane_end(t, why, true);
        pump(t);
        transfer_unref(t);
}

/* ---- the pump ----------------------------------------------------------- */

static void seal_work(WorkerTask *w) {
        Transfer *t = container_of(w, Transfer, seal);
        Store *st = t->ctx->store;

        /* The lane page-locked the writable mappings, which go now. */
        if (t->lane_registered && st->before_seal)
                st->before_seal(load_job_slabs(t->load), t->comp->n_files, st->userdata);
        load_job_seal(t->load);
}

static void complete(Transfer *t) {
        if (t->ctx->complete)
                t->ctx->complete(t, t->ctx->userdata);
}

static void build_done(JobWaiter *w, const JobOutcome *o) {
        Transfer *t = container_of(w, Transfer, build_wait);
        WdError err = WD_ERROR_NULL;

        job_unref(TAKE_PTR(t->build));
        if (o->r == 0) {
                t->part_entry = cache_entry_ref(o->entry);
                t->result = 0;
                log_info("plan %016" PRIx64 ": %s%s%s (%s) resident: %.1f MiB read from storage, %.1f MiB from peers",
                         t->plan_id, t->comp->model, *t->comp->name ? " " : "", t->comp->name, o->entry->variant,
                         (double) t->stats.storage_read_bytes / (1u << 20),
                         (double) t->stats.peer_received_bytes / (1u << 20));
        } else {
                t->result = o->r;
                if (o->err)
                        t->err = *o->err;
                else
                        wd_error_set(&t->err, o->r, "%s: the shard build failed", t->comp->model);
                log_warning("plan %016" PRIx64 ": %s", t->plan_id, t->err.message);
        }
        err = t->err;
        job_finish(&t->job, &(JobOutcome){ .r = o->r, .err = &err, .entry = o->r == 0 ? o->entry : NULL });
        store_changed(t->ctx->store);
        complete(t);
        pump(t);
        transfer_unref(t); /* the build's */
}

static const JobWaiterOps build_wait_ops = { .done = build_done };

/* A node that serves a shard has its pieces (in the staging entry e): cut
 * its shard out of them, as a local sharded load cuts one out of the whole
 * component. */
static int start_build(Transfer *t, CacheEntry *e, WdError *err) {
        ShardPlan *plan = NULL;
        _cleanup_free_ char *key = shard_spec_key(t->spec);
        _cleanup_free_ FileId *ids = calloc(t->comp->n_files + 1, sizeof(FileId));
        CacheEntry *made;
        int r;

        if (!key || !ids)
                return wd_error_set(err, -ENOMEM, "out of memory");
        /* The shard may be here already, or being cut (a local sharded
         * load, another plan): this transfer ends with that one. */
        for (size_t i = 0; i < t->comp->n_files; i++)
                ids[i] = t->comp->files[i].id;
        made = cache_lookup(t->ctx->store->cache, t->comp->model, t->comp->name, key, ids, t->comp->n_files);
        if (made && made->state == CACHE_ENTRY_RESIDENT) {
                transfer_ref(t); /* as a build's */
                build_done(&t->build_wait, &(JobOutcome){ .r = 0, .entry = made });
                return 0;
        }
        t->build = made ? job_find(&t->ctx->store->jobs, made) : NULL;
        if (t->build) {
                job_ref(t->build);
                transfer_ref(t); /* the build's, until build_done() */
                job_add_waiter(t->build, &t->build_wait, &build_wait_ops);
                return 0;
        }
        r = shard_plan(t->comp, t->spec, GPU_ALIGN, &plan, err);
        if (r != 0)
                return r;
        r = shard_build_start(t->ctx->store, t->comp, plan, t->spec, key, e, NULL, &t->build, err);
        if (r != 0)
                return r;
        transfer_ref(t); /* the build's, until build_done() */
        job_add_waiter(t->build, &t->build_wait, &build_wait_ops);
        return 0;
}

static void seal_done(Completion *c) {
        Transfer *t = container_of(c, Transfer, seal.done);
        CacheEntry *e = NULL;
        WdError err = WD_ERROR_NULL;
        int r;

        t->sealing = false;
        r = load_job_finish(TAKE_PTR(t->load), &e, &err);
        cache_entry_unref(TAKE_PTR(t->load_entry));
        if (r == 0 && t->part && t->spec) {
                t->entry = cache_entry_ref(e);
                r = start_build(t, e, &err);
                if (r == 0) {
                        pump(t);
                        transfer_unref(t); /* the seal's */
                        return;
                }
                e = NULL;
        }
        if (r == 0) {
                t->entry = cache_entry_ref(e);
                t->result = 0;
                log_info("plan %016" PRIx64 ": %s%s%s resident: %.1f MiB, %.1f MiB read from storage, %.1f MiB "
                         "from peers",
                         t->plan_id, t->comp->model, *t->comp->name ? " " : "", t->comp->name,
                         (double) t->total_bytes / (1u << 20), (double) t->stats.storage_read_bytes / (1u << 20),
                         (double) t->stats.peer_received_bytes / (1u << 20));
        } else {
                t->result = r;
                t->err = err;
                log_warning("plan %016" PRIx64 ": %s", t->plan_id, err.message);
        }
        job_finish(&t->job, &(JobOutcome){ .r = r, .err = &err, .entry = e });
        store_changed(t->ctx->store);
        complete(t);
        pump(t);
        transfer_unref(t); /* the seal's */
}

static void fail(Transfer *t, int r, const WdError *err) {
        /* A seal under way ends the job itself, with the bytes it has. */
        if (t->result != -EINPROGRESS || t->sealing)
                return;
        t->result = r;
        t->err = *err;
        /* Nothing may find the half-filled entry any more; its memory goes
         * once the reads and receives in flight ended. */
        if (t->load)
                cache_entry_abort(load_job_entry(t->load));
        if (t->receiving && t->job.state == JOB_RUNNING) {
                job_finish(&t->job, &(JobOutcome){ .r = r, .err = err });
                store_changed(t->ctx->store);
        }
        complete(t);
}

static void finish(Transfer *t) {
        if (t->finished)
                return;
        t->finished = true;
        if (t->ctx->finished)
                t->ctx->finished(t, t->ctx->userdata);
}

/* Whether chunk c has bytes to go from here to a receiver that needs them
 * and did not get them; sends what the window allows (unless sending must
 * wait: all_have on a receiving transfer, which seals first). */
static bool send_pending(Transfer *t, size_t c, bool hold) {
        bool pending = false;

        if (!chunk_mine_to_send(t, c))
                return false;
        for (size_t k = 0; k < t->n_receivers; k++) {
                if (t->receiver_done[k] || t->sent[c * t->n_receivers + k] ||
                    (t->part && !(t->chunks[c].need >> k & 1)))
                        continue;
                if (t->ci[c].state != CHUNK_HAVE || hold || t->n_tx >= TRANSFER_MAX_SENDS ||
                    send_chunk(t, c, k) < 0)
                        pending = true; /* a receiver that went: its down event marks it done */
        }
        return pending;
}

/* A chunk this node needs and nobody gives it (or this node owns): read. */
static void read_missing(Transfer *t) {
        _cleanup_free_ size_t *to_read = NULL;
        size_t n_read = 0;

        for (size_t c = 0; c < t->n_chunks; c++) {
                ChunkInfo *ci = &t->ci[c];
                int o;

                if (ci->state != CHUNK_MISSING || !ci->needed)
                        continue;
                o = chunk_owner(t, c);
                if (o >= 0 && o != t->self_source)
                        continue;
                if (!to_read)
                        to_read = malloc(t->n_chunks * sizeof(size_t));
                if (to_read)
                        to_read[n_read++] = c;
        }
        if (n_read > 0)
                read_chunks(t, to_read, n_read);
}

/* After any event.  Amortized O(1) a call (a plan may have 10^5 chunks
 * and as many events): every chunk is looked at only after a rescan, and
 * the sends go on from send_from, stopping once the window is full. */
static void pump(Transfer *t) {
        bool all_have, prefix = true;
        uint64_t now = now_usec();

        if (t->lane)
                lane_pump(t);
        if (t->aborted || !t->started || t->finished) {
                if (t->aborted && t->n_rx == 0 && t->n_tx == 0 && !t->batches && !t->sealing)
                        finish(t);
                return;
        }
        if (t->result != -EINPROGRESS && t->result != 0) {
                /* Failed: nothing to send from, wait for what is in flight. */
                if (t->n_rx == 0 && t->n_tx == 0 && !t->batches)
                        finish(t);
                return;
        }
        if (t->rescan) {
                t->rescan = false;
                t->send_from = 0;
                if (t->load)
                        read_missing(t);
        }
        all_have = t->n_have == t->n_needed;

        /* Sending: never while the slabs are being sealed (remapped).  Past
         * the first chunk still to send, at most TRANSFER_SCAN_AHEAD more
         * are looked at: reads end about in order, and what lies further
         * is sent once the chunks before it went. */
        size_t ahead = 0;
        for (size_t c = t->send_from; !t->sealing && !t->lane && c < t->n_chunks; c++) {
                if (!send_pending(t, c, all_have && t->load)) {
                        if (prefix)
                                t->send_from = c + 1;
                        continue;
                }
                prefix = false;
                if (t->n_tx >= TRANSFER_MAX_SENDS || ++ahead > TRANSFER_SCAN_AHEAD)
                        break;
        }

        if (t->load && all_have && !t->sealing && t->n_rx == 0 && t->n_tx == 0 && !t->batches && !t->lane &&
            t->result == -EINPROGRESS) {
                /* Every byte is here and right: check the files, seal. */
                t->sealing = true;
                job_set_sealing(&t->job);
                transfer_ref(t);
                worker_push(t->ctx->store->worker, &t->seal, seal_work, seal_done);
                return;
        }
        /* A part plan's shard still being cut: the transfer must outlive
         * it, to tell the plan's nodes how it ended. */
        if (t->load || t->sealing || t->build)
                return;

        /* Sealed (or resident from the start): done once no receiver needs
         * anything, or nobody asked for anything for twice the deadline. */
        bool receivers_done = true, anything_to_send = t->send_from < t->n_chunks;
        for (size_t k = 0; k < t->n_receivers; k++)
                receivers_done = receivers_done && t->receiver_done[k];
        if (t->n_tx == 0 && !t->lane && (receivers_done || (!anything_to_send && now - t->activity_usec > 2 * t->ctx->deadline_usec)))
                finish(t);
}

/* ---- events ------------------------------------------------------------- */

static int source_index(const Transfer *t, unsigned node) {
        for (size_t i = 0; i < t->n_sources; i++)
                if (t->sources[i] == node)
                        return (int) i;
        return -1;
}

static int receiver_index(const Transfer *t, unsigned node) {
        for (size_t i = 0; i < t->n_receivers; i++)
                if (t->receivers[i] == node)
                        return (int) i;
        return -1;
}

/* Chunks that were on their way from node and did not arrive go back to
 * MISSING (LANDED ones whose checksum it sent are kept). */
static void forget_from(Transfer *t, unsigned node) {
        t->rescan = true;
        for (size_t c = 0; c < t->n_chunks; c++) {
                ChunkInfo *ci = &t->ci[c];

                if (ci->state == CHUNK_LANDED && ci->rx_from == node)
                        ci->state = CHUNK_MISSING;
                if (ci->sum_known && ci->sum_from == node && ci->state != CHUNK_HAVE)
                        ci->sum_known = false;
        }
}

void transfer_node_down(Transfer *t, unsigned node) {
        int s = source_index(t, node), k = receiver_index(t, node);

        if (s >= 0) {
                t->source_alive[s] = false;
                t->source_usable[s] = false;
                forget_from(t, node);
                if (t->started)
                        drop_unowned(t);
        }
        if (k >= 0)
                t->receiver_done[k] = true;
        t->rescan = true;
        if (s >= 0 || k >= 0)
                log_debug("plan %016" PRIx64 ": %s went down; its chunks are re-planned", t->plan_id,
                          mesh_node_name(t->ctx->mesh, node));
        pump(t);
}

/* A fetch: this node is the plan's only receiver, so its view of who
 * sends is the plan's. */
static bool is_fetch(const Transfer *t) {
        return t->n_receivers == 1 && t->receivers[0] == t->self;
}

void transfer_source_failed(Transfer *t, unsigned node, const char *why) {
        int s = source_index(t, node);

        if (s < 0 || !t->source_usable[s])
                return;
        t->source_usable[s] = false;
        if (is_fetch(t)) {
                /* Its chunks go to the other holders, who hear it. */
                t->source_alive[s] = false;
                if (t->ctx->source_gone)
                        t->ctx->source_gone(t, node, t->ctx->userdata);
        }
        forget_from(t, node);
        if (t->started)
                drop_unowned(t);
        if (t->load)
                log_warning("plan %016" PRIx64 ": %s: %s; %s its chunks of %s", t->plan_id,
                            mesh_node_name(t->ctx->mesh, node), why,
                            is_fetch(t) ? "the other holders send" : "reading from storage", t->comp->model);
        pump(t);
}

void transfer_receiver_done(Transfer *t, unsigned node) {
        int k = receiver_index(t, node);

        if (k < 0)
                return;
        t->receiver_done[k] = true;
        t->activity_usec = now_usec();
        pump(t);
}

/* The bytes of chunk c (LANDED) and a checksum from the same sender are
 * here: keep them, or read the chunk from storage. */
static void verify(Transfer *t, size_t c) {
        ChunkInfo *ci = &t->ci[c];
        const uint8_t *p;
        uint64_t h;

        if (ci->state != CHUNK_LANDED || !ci->sum_known || ci->sum_from != ci->rx_from || !t->load)
                return;
        p = load_job_slabs(t->load)[t->chunks[c].file]->data + t->chunks[c].offset;
        h = XXH3_64bits(p, t->chunks[c].length);
        if (h == ci->sum) {
                t->stats.peer_received_bytes += t->chunks[c].length;
                if (!t->aborted)
                        t->ctx->node_received[ci->rx_from] += t->chunks[c].length;
                chunk_have(t, c, h, true);
                return;
        }
        ci->state = CHUNK_MISSING;
        ci->sum_known = false;
        t->rescan = true;
        {
                char why[160];
                const CatalogFile *f = &t->comp->files[t->chunks[c].file];

                snprintf(why, sizeof(why), "chunk %zu (%s at %" PRIu64 ") failed its xxh3 checksum", c, f->path,
                         t->chunks[c].offset);
                transfer_source_failed(t, ci->rx_from, why);
        }
}

void transfer_chunk_sum(Transfer *t, unsigned node, uint32_t index, uint64_t xxh3) {
        ChunkInfo *ci;
        int s = source_index(t, node);

        /* Before the Start reached us, sources that heard it may send
         * already: take what any node sends (it is checked all the same).
         * After it, only the chunk's owner is heard. */
        if (index >= t->n_chunks || (t->started && (s < 0 || chunk_owner(t, index) != s)))
                return;
        ci = &t->ci[index];
        if (ci->state == CHUNK_HAVE || ci->state == CHUNK_READING)
                return;
        if (s >= 0)
                t->source_heard_usec[s] = now_usec();
        /* The sum that goes with the bytes in flight or landed wins: a sum
         * from another sender only replaces one whose bytes never came. */
        if (ci->sum_known && (ci->state == CHUNK_RECEIVING || ci->state == CHUNK_LANDED) && ci->rx_from != node &&
            ci->sum_from == ci->rx_from)
                return;
        ci->sum_known = true;
        ci->sum_from = node;
        ci->sum = xxh3;
        verify(t, index);
        pump(t);
}

void *transfer_incoming(Transfer *t, const TransferChunkHeader *h, uint64_t length, void **ret_token) {
        int s = source_index(t, h->sender);
        ChunkInfo *ci;
        Rx *rx;

        /* Bytes come from the chunk's owner (anyone before the Start, as
         * checksums do): a node cannot fill a chunk it was not given, nor
         * hold one up that its owner is sending. */
        if (!t->load || t->sealing || t->aborted || t->result != -EINPROGRESS || h->index >= t->n_chunks ||
            (t->started && (s < 0 || chunk_owner(t, h->index) != s)) || length != t->chunks[h->index].length)
                return NULL;
        ci = &t->ci[h->index];
        if (ci->state != CHUNK_MISSING || !ci->needed)
                return NULL;
        rx = calloc(1, sizeof(Rx));
        if (!rx)
                return NULL;
        rx->t = transfer_ref(t);
        rx->index = h->index;
        rx->from = h->sender;
        rx->length = length;
        ci->state = CHUNK_RECEIVING;
        ci->rx_from = h->sender;
        t->n_rx++;
        if (s >= 0)
                t->source_heard_usec[s] = now_usec();
        *ret_token = rx;
        return load_job_slabs(t->load)[t->chunks[h->index].file]->data + t->chunks[h->index].offset;
}

void transfer_received(void *token, int status) {
        Rx *rx = token;
        Transfer *t = rx->t;
        ChunkInfo *ci = &t->ci[rx->index];
        int s = source_index(t, rx->from);

        t->n_rx--;
        if (ci->state == CHUNK_RECEIVING) {
                /* After the Start, bytes count from the chunk's owner only. */
                bool from_owner = !t->started || (s >= 0 && chunk_owner(t, rx->index) == s);

                if (status == 0 && from_owner && (s >= 0 ? t->source_usable[s] : !t->started)) {
                        ci->state = CHUNK_LANDED;
                        if (s >= 0)
                                t->source_heard_usec[s] = now_usec();
                        t->activity_usec = now_usec();
                        verify(t, rx->index);
                } else {
                        ci->state = CHUNK_MISSING;
                        t->rescan = true;
                }
        }
        free(rx);
        pump(t);
        transfer_unref(t);
}

/* From the cluster's tick: sources that owe this node chunks and were
 * silent for the deadline have stalled; read their chunks here. */
void transfer_tick(Transfer *t) {
        uint64_t now = now_usec();

        if (!t->started || t->aborted || t->finished)
                return;
        if (t->lane && t->lane_next > t->lane_done && now - t->lane_heard_usec > t->ctx->deadline_usec) {
                lane_end(t, "nothing arrived for the deadline", true);
                /* The data plane's sources start their clocks now. */
                for (size_t i = 0; i < t->n_sources; i++)
                        t->source_heard_usec[i] = now;
        }
        if (t->lane) {
                pump(t);
                return;
        }
        if (t->load && !t->sealing)
                for (size_t i = 0; i < t->n_sources; i++) {
                        bool owes = false;

                        if (!t->source_usable[i] || t->sources[i] == t->self)
                                continue;
                        for (size_t c = 0; c < t->n_chunks && !owes; c++)
                                owes = t->ci[c].state != CHUNK_HAVE && chunk_owner(t, c) == (int) i;
                        if (owes && now - t->source_heard_usec[i] > t->ctx->deadline_usec)
                                transfer_source_failed(t, t->sources[i], "sent nothing for the deadline");
                }
        pump(t);
}

void transfer_abort(Transfer *t, const char *why) {
        WdError err = WD_ERROR_NULL;

        if (t->aborted)
                return;
        t->aborted = true;
        LIST_FOREACH(batches, b, t->batches)
                if (!b->ended)
                        reader_cancel(b->job);
        wd_error_set(&err, -ECANCELED, "%s: the cluster transfer stopped: %s", t->comp->model, why);
        fail(t, -ECANCELED, &err);
        pump(t);
}

/* ---- the job kind ------------------------------------------------------- */

static void transfer_cancel(Job *j) {
        /* The transfer's own waiter never leaves while it runs. */
}

static void transfer_job_free(Job *j) {
        transfer_free((Transfer *) j);
}

static const JobKind transfer_kind = {
        .name = "cluster fetch",
        .cancel = transfer_cancel,
        .free = transfer_job_free,
        .poll = transfer_poll,
};
