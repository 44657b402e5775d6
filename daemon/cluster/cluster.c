/* The cluster (see cluster.h): the node protocol on top of the mesh, the
 * data plane and the transfers.
 *
 * Four kinds of records, each in its own list:
 * - Slot: a transfer this node takes part in, with the nodes to tell when
 *   it has everything (Done) and its coordinator.
 * - Coord: a plan this node coordinates: the nodes proposed to, what each
 *   said, who asked for it.
 * - Ask: a cluster prefetch asked of this node (a Job requests wait on),
 *   waiting for the coordinator's PlanResult; asked again of the next
 *   coordinator if this one goes down.
 * - Pending: a Propose or Fetch waiting for the server's resolve.
 *
 * Messages to this node itself go through the same handlers as everyone
 * else's, from a zero timer (never re-entrantly). */
#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "cluster/cluster.h"
#include "cluster/dataplane.h"
#include "cluster/fetch.h"
#include "cluster/plan.h"
#include "gpu/gpu.h"
#include "store/host-load.h"
#include "store/shard-build.h"
#include "util/list.h"
#include "util/log.h"
#include "util/parse-util.h"
#include "util/time-util.h"

#define CLUSTER_ASK_ATTEMPTS 3u
/* What one node may make this one hold at once: plans it asked this node to
 * coordinate, resolves, transfers it proposed or asked for.  Generous for a
 * well-behaved cluster (a plan per component being loaded), and a bound on
 * what an authenticated node that misbehaves can cost. */
#define CLUSTER_MAX_PER_NODE 64u
#define CLUSTER_PROGRESS_MSEC 250u
#define MESH_MAX_NODES 1024u

static bool streq(const char *a, const char *b) {
        return strcmp(a, b) == 0;
}
#define CLUSTER_MESSAGE_MAX 1024u

/* What each node of a part plan serves, in the plan's order (n 0: a plain
 * plan, every node the whole component). */
typedef struct Parts {
        unsigned nodes[PLAN_MAX_SOURCES]; /* mesh indexes */
        ShardSpec *specs[PLAN_MAX_SOURCES]; /* NULL: the whole component */
        int devices[PLAN_MAX_SOURCES]; /* a node's own device; PARTS_PLAN_DEVICE: the plan's */
        size_t n;
} Parts;

#define PARTS_PLAN_DEVICE CLUSTER_PLAN_DEVICE

typedef struct Slot {
        Cluster *c;
        Transfer *t; /* referenced */
        int coordinator; /* mesh index, -1 for a peer fetch */
        unsigned *tell;  /* whom to send Done: the plan's other nodes */
        size_t n_tell;
        uint64_t since_usec; /* when it was added */
        uint64_t progress_sent; /* the bytes the coordinator heard of last */
        uint64_t progress_sent_usec; /* and when */
        /* A plan to a device: once the transfer has its bytes, they are
         * copied there (dev_job), and Done waits for that. */
        int device;
        Job *dev_job;
        JobWaiter dev_wait;
        bool transfer_finished; /* it finished while the copy ran: the slot goes after */
        LIST_FIELDS(struct Slot, slots);
} Slot;

enum {
        TARGET_PROPOSED,
        TARGET_READY,
        TARGET_RESIDENT,
        TARGET_MISMATCH,
        TARGET_FAILED,
        TARGET_DOWN,
        TARGET_DONE,
        TARGET_LOADING, /* loading it by other means: waits for its Done */
        TARGET_SOURCE_COPYING, /* a source (as RESIDENT) copying to its device: waits for its Done */
};

typedef struct Target {
        unsigned node;
        int state;
        bool receiver;       /* in the Start's receivers */
        uint64_t done_bytes; /* its last Progress */
        uint64_t heard_usec, moved_usec; /* its last Progress, and the last that moved */
        int code;
        char message[CLUSTER_MESSAGE_MAX];
        TransferStats stats;
} Target;

typedef struct Origin {
        unsigned node;
        uint64_t request_id;
} Origin;

typedef struct Coord {
        Cluster *c;
        uint64_t plan_id;
        char *model, *component;
        PlanManifest manifest;
        PlanFileView *views; /* the asking node's files */
        size_t n_views;
        Target *targets;
        size_t n_targets;
        Origin *origins;
        size_t n_origins;
        Parts parts; /* a part plan's, in target order */
        int device;  /* -1: host memory only */
        bool started;
        uint64_t propose_deadline_usec;
        uint64_t progress_sent, progress_sent_usec;
        LIST_FIELDS(struct Coord, coords);
} Coord;

typedef struct Ask {
        Job job; /* first */
        Cluster *c;
        uint64_t request_id;
        Component *comp;
        PlanManifest manifest;
        char **nodes;
        size_t n_nodes;
        Parts parts;
        int device;
        int coordinator;
        unsigned attempts;
        int tried[CLUSTER_ASK_ATTEMPTS]; /* the coordinators asked, in order */
        uint64_t heard_usec, moved_usec, done_bytes; /* from the coordinator */
        bool linked;
        LIST_FIELDS(struct Ask, asks);
} Ask;

typedef enum PendingKind {
        PENDING_PROPOSE,
        PENDING_FETCH,
} PendingKind;

struct ClusterResolve {
        Cluster *c; /* NULL once the cluster let go: the answer is dropped */
        PendingKind kind;
        unsigned from;
        uint64_t from_generation;
        uint64_t plan_id;
        uint64_t chunk_size;
        PlanManifest manifest;
        unsigned *holders;
        size_t n_holders;
        PlanFileView *views; /* a Propose's: the plan's files */
        size_t n_views;
        unsigned *gone; /* a Fetch's holders the fetcher gave up on meanwhile (n_holders room) */
        size_t n_gone;
        Parts parts; /* a Propose's */
        int device;  /* a Propose's, -1: host memory only */
        LIST_FIELDS(struct ClusterResolve, pendings);
};

/* A Propose for a component this node is loading already: the coordinator
 * hears Done when that load ends. */
typedef struct Watch {
        JobWaiter wait;
        uint64_t progress_sent_usec;
        Job *job; /* referenced, for its numbers */
        Cluster *c;
        uint64_t plan_id;
        unsigned coordinator;
        bool read_nothing; /* a copy or a cut of what this node holds */
        LIST_FIELDS(struct Watch, watches);
} Watch;

typedef struct LocalMessage {
        uint8_t *buf;
        size_t len;
        struct LocalMessage *next;
} LocalMessage;

struct Cluster {
        uv_loop_t *loop;
        Store *store;
        ClusterOps ops;
        void *userdata;

        /* The configuration (owned copies). */
        char *self_name;
        MeshNodeSpec *nodes;
        size_t n_nodes;
        uint8_t *secret;
        size_t secret_len;
        uint64_t deadline_usec;
        bool peer_fetch;
        uint64_t chunk_size;

        uint64_t generation;
        Mesh *mesh;
        DataPlane *data;
        Lanes *lanes;
        LanesTransport gpu_transport;
        uint64_t *node_generation; /* the up generation, 0 when down */
        char **node_mismatch;      /* why its view of a component differed, NULL if it did not */
        uint64_t *node_sent, *node_received;
        TransferContext tctx;
        uint64_t storage_saved_bytes;
        DeviceTier *tier; /* NULL: no GPU tier (yet) */

        Slot *slots;
        Coord *coords;
        Ask *asks;
        ClusterResolve *pendings;
        Watch *watches;
        LocalMessage *local_head, *local_tail;
        uv_timer_t local_timer, tick, progress_timer;
        uint64_t next_request_id;

        bool closing; /* cluster_free() ran: freed once nothing is left */
        unsigned open_timers;
        void *closed_userdata;
};

static void cluster_maybe_free(Cluster *c) {
        void (*closed)(void *userdata) = c->ops.closed;
        void *userdata = c->closed_userdata;

        if (!c->closing || c->open_timers > 0 || c->slots)
                return;
        free(c->node_sent);
        free(c->node_received);
        free(c);
        if (closed)
                closed(userdata);
}

/* ---- sending ------------------------------------------------------------ */

static void local_timer_fire(uv_timer_t *timer);

static uint64_t random_u64(void) {
        uint64_t v = 0;

        while (v == 0)
                if (getrandom(&v, sizeof(v), 0) != sizeof(v))
                        v = now_usec() ^ ((uint64_t) getpid() << 32);
        return v;
}

/* Send env to node: over the mesh, or to ourselves through the local queue.
 * Returns 0 or -errno (node not up). */
static int send_to(Cluster *c, unsigned node, const ClusterEnvelope *env) {
        LocalMessage *m;
        size_t len;

        if (node != mesh_self(c->mesh))
                return mesh_send(c->mesh, node, env);
        len = weightd__cluster__v1__envelope__get_packed_size(env);
        m = calloc(1, sizeof(LocalMessage));
        if (!m)
                return -ENOMEM;
        m->buf = malloc(len ? len : 1);
        if (!m->buf) {
                free(m);
                return -ENOMEM;
        }
        m->len = weightd__cluster__v1__envelope__pack(env, m->buf);
        if (c->local_tail)
                c->local_tail->next = m;
        else
                c->local_head = m;
        c->local_tail = m;
        (void) uv_timer_start(&c->local_timer, local_timer_fire, 0, 0);
        return 0;
}

#define ENVELOPE(var, field, FIELD, msg)                                                                      \
        ClusterEnvelope var = WEIGHTD__CLUSTER__V1__ENVELOPE__INIT;                                           \
        var.body_case = WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_##FIELD;                                         \
        var.field = (msg)

/* File views on the wire and back (owned copies of the paths). */
typedef struct WireViews {
        Weightd__Cluster__V1__FileView *msgs;
        Weightd__Cluster__V1__FileView **ptrs;
        size_t n;
} WireViews;

static void wire_views_done(WireViews *w) {
        free(w->msgs);
        free(w->ptrs);
        *w = (WireViews){};
}

/* Points into v: valid while v is. */
static int wire_views(const PlanFileView *v, size_t n, WireViews *ret) {
        ret->msgs = calloc(n + 1, sizeof(*ret->msgs));
        ret->ptrs = calloc(n + 1, sizeof(*ret->ptrs));
        if (!ret->msgs || !ret->ptrs) {
                wire_views_done(ret);
                return -ENOMEM;
        }
        for (size_t i = 0; i < n; i++) {
                Weightd__Cluster__V1__FileView *m = &ret->msgs[i];

                weightd__cluster__v1__file_view__init(m);
                m->path = (char *) v[i].path;
                m->size = v[i].size;
                m->mtime_sec = v[i].mtime_sec;
                m->mtime_nsec = v[i].mtime_nsec;
                m->header_xxh3.data = (uint8_t *) v[i].header;
                m->header_xxh3.len = sizeof(v[i].header);
                ret->ptrs[i] = m;
        }
        ret->n = n;
        return 0;
}

static void views_free(PlanFileView *v, size_t n) {
        for (size_t i = 0; v && i < n; i++)
                free((char *) v[i].path);
        free(v);
}

static int views_from_wire(Weightd__Cluster__V1__FileView *const *m, size_t n, PlanFileView **ret) {
        PlanFileView *v = calloc(n + 1, sizeof(PlanFileView));

        if (!v)
                return -ENOMEM;
        for (size_t i = 0; i < n; i++) {
                v[i] = (PlanFileView){
                        .path = strdup(m[i]->path ? m[i]->path : ""),
                        .size = m[i]->size,
                        .mtime_sec = m[i]->mtime_sec,
                        .mtime_nsec = m[i]->mtime_nsec,
                };
                if (m[i]->header_xxh3.len == sizeof(v[i].header))
                        memcpy(v[i].header, m[i]->header_xxh3.data, sizeof(v[i].header));
                if (!v[i].path) {
                        views_free(v, i);
                        return -ENOMEM;
                }
        }
        *ret = v;
        return 0;
}

static void parts_done(Parts *p) {
        for (size_t i = 0; i < p->n; i++)
                shard_spec_free(p->specs[i]);
        p->n = 0;
}

static int parts_find(const Parts *p, unsigned node) {
        for (size_t i = 0; i < p->n; i++)
                if (p->nodes[i] == node)
                        return (int) i;
        return -1;
}

/* One node's part from a peer, checked as a client's shard is (driver.c):
 * *ret NULL when it splits nothing and leaves nothing out. */
static int part_spec_from_wire(const Weightd__Cluster__V1__NodePart *x, ShardSpec **ret, WdError *err) {
        ShardRule rules[SHARD_MAX_RULES];

        for (size_t i = 0; i < x->n_rules && i < SHARD_MAX_RULES; i++)
                rules[i] = (ShardRule){ .pattern = x->rules[i] ? x->rules[i]->pattern : NULL,
                                        .dim = x->rules[i] ? x->rules[i]->dim : 0 };
        return shard_spec_from_fields(x->rank, x->world, x->uneven, rules, x->n_rules, x->tensors, x->n_tensors, ret,
                                      err);
}

/* Parts from a peer, checked as a client's shard is (driver.c): a node
 * named twice, a node that is not one, a spec out of limits are errors. */
static int parts_from_wire(Cluster *c, Weightd__Cluster__V1__NodePart *const *m, size_t n, Parts *ret,
                           WdError *err) {
        *ret = (Parts){};
        if (n > PLAN_MAX_SOURCES)
                return wd_error_set(err, WD_E_INVALID, "a part plan has at most %u nodes, not %zu", PLAN_MAX_SOURCES,
                                    n);
        for (size_t i = 0; i < n; i++) {
                const Weightd__Cluster__V1__NodePart *x = m[i];
                int k = x && x->node ? mesh_find(c->mesh, x->node) : -1;
                ShardSpec *spec = NULL;

                if (k < 0 || parts_find(ret, (unsigned) k) >= 0) {
                        parts_done(ret);
                        return wd_error_set(err, WD_E_INVALID, "part %zu: \"%.64s\" is %s", i,
                                            x && x->node ? x->node : "", k < 0 ? "not a node of the cluster" : "named twice");
                }
                if (x->sharded) {
                        WdError why = WD_ERROR_NULL;
                        int r = part_spec_from_wire(x, &spec, &why);

                        if (r != 0) {
                                parts_done(ret);
                                return wd_error_set(err, r, "%s: %s", x->node, why.message);
                        }
                }
                ret->nodes[ret->n] = (unsigned) k;
                ret->devices[ret->n] = x->host_only   ? -1
                                       : x->on_device ? (int) MIN(x->device, (uint32_t) INT32_MAX)
                                                      : PARTS_PLAN_DEVICE;
                ret->specs[ret->n++] = spec;
        }
        return 0;
}

/* Parts on the wire: points into p, valid while it is. */
typedef struct WireParts {
        Weightd__Cluster__V1__NodePart msgs[PLAN_MAX_SOURCES];
        Weightd__Cluster__V1__NodePart *ptrs[PLAN_MAX_SOURCES];
        Weightd__Cluster__V1__PartRule *rules;
        Weightd__Cluster__V1__PartRule **rule_ptrs;
        size_t n;
} WireParts;

static void wire_parts_done(WireParts *w) {
        free(w->rules);
        free(w->rule_ptrs);
        w->rules = NULL;
        w->rule_ptrs = NULL;
}

static int wire_parts(Cluster *c, const Parts *p, WireParts *w) {
        size_t n_rules = 0, k = 0;

        for (size_t i = 0; i < p->n; i++)
                n_rules += p->specs[i] ? p->specs[i]->n_rules : 0;
        w->rules = calloc(n_rules + 1, sizeof(*w->rules));
        w->rule_ptrs = calloc(n_rules + 1, sizeof(*w->rule_ptrs));
        if (!w->rules || !w->rule_ptrs) {
                wire_parts_done(w);
                return -ENOMEM;
        }
        for (size_t i = 0; i < p->n; i++) {
                Weightd__Cluster__V1__NodePart *m = &w->msgs[i];
                const ShardSpec *spec = p->specs[i];

                weightd__cluster__v1__node_part__init(m);
                m->node = (char *) mesh_node_name(c->mesh, p->nodes[i]);
                m->on_device = p->devices[i] >= 0;
                m->device = p->devices[i] >= 0 ? (uint32_t) p->devices[i] : 0;
                m->host_only = p->devices[i] == -1;
                w->ptrs[i] = m;
                if (!spec)
                        continue;
                m->sharded = true;
                m->rank = spec->rank;
                m->world = spec->world;
                m->uneven = spec->uneven;
                m->rules = &w->rule_ptrs[k];
                m->n_rules = spec->n_rules;
                m->tensors = spec->tensors;
                m->n_tensors = spec->n_tensors;
                for (size_t j = 0; j < spec->n_rules; j++, k++) {
                        weightd__cluster__v1__part_rule__init(&w->rules[k]);
                        w->rules[k].pattern = spec->rules[j].pattern;
                        w->rules[k].dim = spec->rules[j].dim;
                        w->rule_ptrs[k] = &w->rules[k];
                }
        }
        w->n = p->n;
        return 0;
}

static void send_abort(Cluster *c, unsigned node, uint64_t plan_id, const char *why) {
        Weightd__Cluster__V1__Abort a = WEIGHTD__CLUSTER__V1__ABORT__INIT;

        a.plan_id = plan_id;
        a.message = (char *) why;
        ENVELOPE(env, abort, ABORT, &a);
        (void) send_to(c, node, &env);
}

/* ---- slots -------------------------------------------------------------- */

/* What node has this node hold for it. */
static unsigned count_for(Cluster *c, unsigned node) {
        unsigned n = 0;

        LIST_FOREACH(slots, s, c->slots)
                n += s->coordinator == (int) node || (s->coordinator < 0 && s->n_tell == 1 && s->tell[0] == node);
        LIST_FOREACH(coords, co, c->coords)
                for (size_t i = 0; i < co->n_origins; i++)
                        n += co->origins[i].node == node;
        LIST_FOREACH(pendings, p, c->pendings)
                n += p->from == node;
        return n;
}

static bool over_limit(Cluster *c, unsigned node) {
        if (node == mesh_self(c->mesh) || count_for(c, node) < CLUSTER_MAX_PER_NODE)
                return false;
        log_debug("%s asks for more than %u plans, fetches and resolves at once; refusing",
                  mesh_node_name(c->mesh, node), CLUSTER_MAX_PER_NODE);
        return true;
}

static Slot *slot_find(Cluster *c, uint64_t plan_id) {
        LIST_FOREACH(slots, s, c->slots)
                if (transfer_plan_id(s->t) == plan_id)
                        return s;
        return NULL;
}

static Slot *slot_of(Cluster *c, const Transfer *t) {
        LIST_FOREACH(slots, s, c->slots)
                if (s->t == t)
                        return s;
        return NULL;
}

static int slot_add(Cluster *c, Transfer *t, int coordinator, Slot **ret) {
        Slot *s = calloc(1, sizeof(Slot));

        if (!s)
                return -ENOMEM;
        s->c = c;
        s->t = transfer_ref(t);
        s->coordinator = coordinator;
        s->device = -1;
        s->since_usec = now_usec();
        LIST_PREPEND(slots, c->slots, s);
        if (ret)
                *ret = s;
        return 0;
}

static void slot_free(Slot *s) {
        LIST_REMOVE(slots, s->c->slots, s);
        transfer_unref(s->t);
        free(s->tell);
        free(s);
}

static int slot_set_tell(Slot *s, const unsigned *a, size_t na, const unsigned *b, size_t nb) {
        unsigned self = mesh_self(s->c->mesh);

        free(s->tell);
        s->n_tell = 0;
        s->tell = calloc(na + nb + 1, sizeof(unsigned));
        if (!s->tell)
                return -ENOMEM;
        for (size_t k = 0; k < na + nb + 1; k++) {
                unsigned n;
                bool seen = false;

                if (k < na)
                        n = a[k];
                else if (k < na + nb)
                        n = b[k - na];
                else if (s->coordinator >= 0)
                        n = (unsigned) s->coordinator;
                else
                        continue;
                for (size_t i = 0; i < s->n_tell; i++)
                        seen = seen || s->tell[i] == n;
                if (!seen && n != self)
                        s->tell[s->n_tell++] = n;
        }
        /* The coordinator hears Done even when it is this node. */
        if (s->coordinator == (int) self)
                s->tell[s->n_tell++] = self;
        return 0;
}

/* Tell the plan's nodes how this node's part ended (r, why), with t's
 * numbers. */
static void send_done(Cluster *c, Slot *s, int r, const char *why) {
        Weightd__Cluster__V1__Done d = WEIGHTD__CLUSTER__V1__DONE__INIT;
        TransferStats st;

        transfer_stats(s->t, &st);
        if (r == 0)
                c->storage_saved_bytes += st.peer_received_bytes;
        d.plan_id = transfer_plan_id(s->t);
        d.code = r;
        d.message = r == 0 ? (char *) "" : (char *) why;
        d.storage_read_bytes = st.storage_read_bytes;
        d.peer_received_bytes = st.peer_received_bytes;
        d.peer_sent_bytes = st.peer_sent_bytes;
        ENVELOPE(env, done, DONE, &d);
        for (size_t i = 0; i < s->n_tell; i++)
                (void) send_to(c, s->tell[i], &env);
}

static void slot_device_done(JobWaiter *w, const JobOutcome *o) {
        Slot *s = container_of(w, Slot, dev_wait);

        job_unref(TAKE_PTR(s->dev_job));
        send_done(s->c, s, o->r, o->r == 0 ? "" : o->err ? o->err->message : "the copy to the device failed");
        if (s->transfer_finished)
                slot_free(s);
}

static const JobWaiterOps slot_device_ops = { .done = slot_device_done };

static int device_job(Cluster *c, const Component *comp, const ShardSpec *spec, int root_fd, int device, Job **ret,
                      WdError *err);

/* TransferContext.complete: tell the plan's nodes, after the copy to the
 * device where the plan has one. */
static void on_transfer_complete(Transfer *t, void *userdata) {
        Cluster *c = userdata;
        Slot *s = slot_of(c, t);
        const WdError *err;
        WdError derr = WD_ERROR_NULL;
        int r;

        if (!s)
                return;
        r = transfer_result(t, &err);
        if (r == 0 && s->device >= 0) {
                r = device_job(c, transfer_component(t), transfer_spec(t), transfer_root_fd(t), s->device,
                               &s->dev_job, &derr);
                if (r == 0 && s->dev_job) {
                        job_add_waiter(s->dev_job, &s->dev_wait, &slot_device_ops);
                        return;
                }
                err = &derr;
        }
        send_done(c, s, r, r == 0 ? "" : err->message);
}

static void on_transfer_finished(Transfer *t, void *userdata) {
        Cluster *c = userdata;
        Slot *s = slot_of(c, t);

        if (s && s->dev_job)
                s->transfer_finished = true; /* Done still to say */
        else if (s)
                slot_free(s);
        cluster_maybe_free(c);
}

/* ---- coordinating ------------------------------------------------------- */

static void coord_free(Coord *co) {
        if (!co)
                return;
        LIST_REMOVE(coords, co->c->coords, co);
        lanes_plan_ended(co->c->lanes, co->plan_id);
        free(co->model);
        free(co->component);
        views_free(co->views, co->n_views);
        parts_done(&co->parts);
        free(co->targets);
        free(co->origins);
        free(co);
}

static const char *target_state_string(int s) {
        switch (s) {
        case TARGET_RESIDENT:
                return "resident";
        case TARGET_MISMATCH:
                return "mismatch";
        case TARGET_DOWN:
                return "down";
        case TARGET_DONE:
                return "ok";
        default:
                return "failed";
        }
}

static bool target_final(const Target *t) {
        return t->state != TARGET_PROPOSED && t->state != TARGET_READY && t->state != TARGET_LOADING &&
               t->state != TARGET_SOURCE_COPYING;
}

/* Every target is final: answer the nodes that asked. */
static void coord_maybe_finish(Coord *co) {
        Cluster *c = co->c;
        Weightd__Cluster__V1__PlanResult res = WEIGHTD__CLUSTER__V1__PLAN_RESULT__INIT;
        _cleanup_free_ Weightd__Cluster__V1__NodeResult *nr = NULL;
        _cleanup_free_ Weightd__Cluster__V1__NodeResult **nrp = NULL;

        if (!co->started)
                return;
        for (size_t i = 0; i < co->n_targets; i++)
                if (!target_final(&co->targets[i]))
                        return;
        nr = calloc(co->n_targets + 1, sizeof(*nr));
        nrp = calloc(co->n_targets + 1, sizeof(*nrp));
        if (!nr || !nrp)
                return; /* the askers' coordinator check retries */
        for (size_t i = 0; i < co->n_targets; i++) {
                Target *t = &co->targets[i];

                weightd__cluster__v1__node_result__init(&nr[i]);
                nr[i].node = (char *) mesh_node_name(c->mesh, t->node);
                nr[i].state = (char *) target_state_string(t->state);
                nr[i].storage_read_bytes = t->stats.storage_read_bytes;
                nr[i].peer_received_bytes = t->stats.peer_received_bytes;
                nr[i].peer_sent_bytes = t->stats.peer_sent_bytes;
                nr[i].message = t->message;
                nrp[i] = &nr[i];
        }
        res.n_nodes = co->n_targets;
        res.nodes = nrp;
        for (size_t i = 0; i < co->n_origins; i++) {
                res.request_id = co->origins[i].request_id;
                ENVELOPE(env, plan_result, PLAN_RESULT, &res);
                (void) send_to(c, co->origins[i].node, &env);
        }
        log_info("plan %016" PRIx64 " for %s%s%s ended", co->plan_id, co->model, *co->component ? " " : "",
                 co->component);
        coord_free(co);
}

/* All proposals answered (or the deadline passed): start. */
static void coord_start(Coord *co) {
        Cluster *c = co->c;
        Weightd__Cluster__V1__Start st = WEIGHTD__CLUSTER__V1__START__INIT;
        _cleanup_free_ char **sources = calloc(co->n_targets + 1, sizeof(char *));
        _cleanup_free_ char **receivers = calloc(co->n_targets + 1, sizeof(char *));

        if (!sources || !receivers)
                return;
        co->started = true;
        /* Targets in mesh order, so sources are numbered alike everywhere. */
        for (size_t i = 0; i < co->n_targets; i++) {
                Target *t = &co->targets[i];

                if (t->state == TARGET_PROPOSED) {
                        t->state = TARGET_FAILED;
                        snprintf(t->message, sizeof(t->message), "no answer within the deadline");
                        send_abort(c, t->node, co->plan_id, "no answer within the deadline");
                        continue;
                }
                /* In a part plan a node that holds its part is no source:
                 * it may hold a shard only. */
                bool holds = t->state == TARGET_RESIDENT || t->state == TARGET_SOURCE_COPYING;

                if (t->state == TARGET_READY || (holds && co->parts.n == 0))
                        sources[st.n_sources++] = (char *) mesh_node_name(c->mesh, t->node);
                if (t->state == TARGET_READY) {
                        receivers[st.n_receivers++] = (char *) mesh_node_name(c->mesh, t->node);
                        t->receiver = true;
                }
                t->heard_usec = t->moved_usec = now_usec();
        }
        st.plan_id = co->plan_id;
        st.sources = sources;
        st.receivers = receivers;
        /* A whole plan to a device: its chunks go GPU to GPU, through a
         * lane of every source and receiver (targets are in mesh order). */
        uint8_t lane_id[GPU_COLL_ID_BYTES];
        unsigned lane_ranks[PLAN_MAX_SOURCES];
        _cleanup_free_ char **lane_names = calloc(co->n_targets + 1, sizeof(char *));
        size_t n_lane = 0;

        for (size_t i = 0; lane_names && i < co->n_targets; i++) {
                const Target *t = &co->targets[i];

                if ((t->state == TARGET_READY || t->state == TARGET_RESIDENT || t->state == TARGET_SOURCE_COPYING) &&
                    n_lane < PLAN_MAX_SOURCES) {
                        lane_ranks[n_lane] = t->node;
                        lane_names[n_lane++] = (char *) mesh_node_name(c->mesh, t->node);
                }
        }
        if (lane_names && co->device >= 0 && co->parts.n == 0 && st.n_receivers > 0 &&
            lanes_offer(c->lanes, co->plan_id, co->device, lane_ranks, n_lane, c->chunk_size, lane_id) == 0) {
                st.lane_id.data = lane_id;
                st.lane_id.len = GPU_COLL_ID_BYTES;
                st.lane_ranks = lane_names;
                st.n_lane_ranks = n_lane;
                st.lane_device = (uint32_t) co->device;
        }
        for (size_t i = 0; i < co->n_targets; i++) {
                Target *t = &co->targets[i];

                if (t->state != TARGET_READY && t->state != TARGET_RESIDENT && t->state != TARGET_SOURCE_COPYING)
                        continue;
                if (co->parts.n > 0 && t->state != TARGET_READY)
                        continue; /* it holds its part and has nothing to give */
                if (st.n_receivers == 0 && t->state != TARGET_READY) {
                        /* Nobody needs anything: done already. */
                        send_abort(c, t->node, co->plan_id, "every node holds it");
                        continue;
                }
                ENVELOPE(env, start, START, &st);
                if (send_to(c, t->node, &env) < 0 && t->state == TARGET_READY) {
                        t->state = TARGET_DOWN;
                        snprintf(t->message, sizeof(t->message), "went down before the start");
                }
        }
        log_info("plan %016" PRIx64 " for %s%s%s: %zu sources, %zu receivers", co->plan_id, co->model,
                 *co->component ? " " : "", co->component, st.n_sources, st.n_receivers);
        coord_maybe_finish(co);
}

static Target *coord_target(Coord *co, unsigned node) {
        for (size_t i = 0; i < co->n_targets; i++)
                if (co->targets[i].node == node)
                        return &co->targets[i];
        return NULL;
}

static void coord_maybe_start(Coord *co) {
        if (co->started)
                return;
        for (size_t i = 0; i < co->n_targets; i++)
                if (co->targets[i].state == TARGET_PROPOSED)
                        return;
        coord_start(co);
}

static int coord_add_origin(Coord *co, unsigned node, uint64_t request_id) {
        Origin *o = realloc(co->origins, (co->n_origins + 1) * sizeof(Origin));

        if (!o)
                return -ENOMEM;
        co->origins = o;
        o[co->n_origins++] = (Origin){ .node = node, .request_id = request_id };
        return 0;
}

static void reply_plan_error(Cluster *c, unsigned node, uint64_t request_id, int code, const char *msg) {
        Weightd__Cluster__V1__PlanResult res = WEIGHTD__CLUSTER__V1__PLAN_RESULT__INIT;

        res.request_id = request_id;
        res.code = code;
        res.message = (char *) msg;
        ENVELOPE(env, plan_result, PLAN_RESULT, &res);
        (void) send_to(c, node, &env);
}

/* Whether request m wants node n resident (no nodes named: every node). */
static bool request_wants(Cluster *c, const Weightd__Cluster__V1__PlanRequest *m, unsigned n) {
        bool wanted = m->n_nodes == 0;

        for (size_t k = 0; k < m->n_nodes && !wanted; k++)
                wanted = streq(m->nodes[k], mesh_node_name(c->mesh, n));
        return wanted;
}

/* Whether plan co's nodes are the ones request m names: only then does its
 * result answer m (not a failure on a node m did not ask for). */
static bool coord_same_nodes(Cluster *c, Coord *co, const Weightd__Cluster__V1__PlanRequest *m) {
        for (unsigned n = 0; n < c->n_nodes; n++)
                if (request_wants(c, m, n) != (coord_target(co, n) != NULL))
                        return false;
        return true;
}

static void handle_plan_request(Cluster *c, unsigned from, const Weightd__Cluster__V1__PlanRequest *m) {
        Weightd__Cluster__V1__Propose pr = WEIGHTD__CLUSTER__V1__PROPOSE__INIT;
        Coord *co;

        if (m->manifest.len != PLAN_MANIFEST_SIZE || !m->model || !m->component) {
                reply_plan_error(c, from, m->request_id, WD_E_INVALID, "malformed plan request");
                return;
        }
        if (over_limit(c, from)) {
                reply_plan_error(c, from, m->request_id, WD_E_BUSY, "too many plans asked of this node at once");
                return;
        }
        Parts parts;
        WdError perr = WD_ERROR_NULL;
        if (parts_from_wire(c, m->parts, m->n_parts, &parts, &perr) != 0) {
                reply_plan_error(c, from, m->request_id, perr.code, perr.message);
                return;
        }
        /* Two nodes asking at once for the same nodes: one plan (not for
         * part plans, which may differ in their parts). */
        LIST_FOREACH(coords, x, c->coords)
                if (parts.n == 0 && x->parts.n == 0 && x->device == (m->on_device ? (int) m->device : -1) &&
                    streq(x->model, m->model) && streq(x->component, m->component) &&
                    memcmp(x->manifest.bytes, m->manifest.data, PLAN_MANIFEST_SIZE) == 0 &&
                    coord_same_nodes(c, x, m)) {
                        if (coord_add_origin(x, from, m->request_id) < 0)
                                reply_plan_error(c, from, m->request_id, -ENOMEM, "out of memory");
                        log_debug("plan %016" PRIx64 ": %s asked too, joined", x->plan_id,
                                  mesh_node_name(c->mesh, from));
                        coord_maybe_finish(x);
                        return;
                }

        co = calloc(1, sizeof(Coord));
        if (!co) {
                parts_done(&parts);
                reply_plan_error(c, from, m->request_id, -ENOMEM, "out of memory");
                return;
        }
        co->c = c;
        co->device = m->on_device ? (int) MIN(m->device, (uint32_t) INT32_MAX) : -1;
        co->plan_id = random_u64();
        co->model = strdup(m->model);
        co->component = strdup(m->component);
        co->targets = calloc(c->n_nodes, sizeof(Target));
        memcpy(co->manifest.bytes, m->manifest.data, PLAN_MANIFEST_SIZE);
        LIST_PREPEND(coords, c->coords, co);
        if (views_from_wire(m->files, m->n_files, &co->views) == 0)
                co->n_views = m->n_files;
        if (!co->model || !co->component || !co->targets || !co->views ||
            coord_add_origin(co, from, m->request_id) < 0) {
                reply_plan_error(c, from, m->request_id, -ENOMEM, "out of memory");
                coord_free(co);
                return;
        }
        /* Targets in mesh order; a part plan's parts in the same order. */
        for (unsigned n = 0; n < c->n_nodes; n++) {
                int k = parts_find(&parts, n);

                if (parts.n > 0 ? k < 0 : !request_wants(c, m, n))
                        continue;
                co->targets[co->n_targets++] = (Target){ .node = n, .state = TARGET_PROPOSED };
                if (k >= 0) {
                        co->parts.nodes[co->parts.n] = n;
                        co->parts.devices[co->parts.n] = parts.devices[k];
                        co->parts.specs[co->parts.n++] = TAKE_PTR(parts.specs[k]);
                }
        }
        parts_done(&parts);
        co->propose_deadline_usec = now_usec() + c->deadline_usec;
        log_info("plan %016" PRIx64 ": %s%s%s on %zu nodes, asked by %s", co->plan_id, co->model,
                 *co->component ? " " : "", co->component, co->n_targets, mesh_node_name(c->mesh, from));

        pr.plan_id = co->plan_id;
        pr.model = co->model;
        pr.component = co->component;
        pr.manifest.data = co->manifest.bytes;
        pr.manifest.len = PLAN_MANIFEST_SIZE;
        pr.chunk_size = c->chunk_size;
        pr.on_device = co->device >= 0;
        pr.device = co->device >= 0 ? (uint32_t) co->device : 0;
        _cleanup_(wire_views_done) WireViews wv = {};
        if (wire_views(co->views, co->n_views, &wv) == 0) {
                pr.files = wv.ptrs;
                pr.n_files = wv.n;
        }
        _cleanup_(wire_parts_done) WireParts wp = {};
        if (co->parts.n > 0) {
                if (wire_parts(c, &co->parts, &wp) < 0) {
                        reply_plan_error(c, from, m->request_id, -ENOMEM, "out of memory");
                        coord_free(co);
                        return;
                }
                pr.parts = wp.ptrs;
                pr.n_parts = wp.n;
        }
        for (size_t i = 0; i < co->n_targets; i++) {
                Target *t = &co->targets[i];

                ENVELOPE(env, propose, PROPOSE, &pr);
                if (send_to(c, t->node, &env) < 0) {
                        t->state = TARGET_DOWN;
                        snprintf(t->message, sizeof(t->message), "down");
                }
        }
        coord_maybe_start(co);
}

static Coord *coord_find(Cluster *c, uint64_t plan_id) {
        LIST_FOREACH(coords, co, c->coords)
                if (co->plan_id == plan_id)
                        return co;
        return NULL;
}

static void set_mismatch(Cluster *c, unsigned node, const char *why) {
        free(c->node_mismatch[node]);
        c->node_mismatch[node] = why ? strdup(why) : NULL;
}

static void handle_propose_reply(Cluster *c, unsigned from, const Weightd__Cluster__V1__ProposeReply *m) {
        Coord *co = coord_find(c, m->plan_id);
        Target *t = co ? coord_target(co, from) : NULL;

        if (!t || t->state != TARGET_PROPOSED || co->started)
                return;
        snprintf(t->message, sizeof(t->message), "%s", m->message ? m->message : "");
        switch (m->status) {
        case WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__READY:
                t->state = TARGET_READY;
                break;
        case WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__RESIDENT:
                t->state = TARGET_RESIDENT;
                break;
        case WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__LOADING:
                t->state = TARGET_LOADING;
                break;
        case WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__SOURCE_COPYING:
                t->state = co->parts.n == 0 ? TARGET_SOURCE_COPYING : TARGET_LOADING;
                break;
        case WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__MISMATCH:
                /* Which view is the odd one is for the asking node to say
                 * (it records it from the result), not for the coordinator. */
                t->state = TARGET_MISMATCH;
                break;
        default:
                t->state = TARGET_FAILED;
                break;
        }
        coord_maybe_start(co);
}

static void handle_done_coord(Cluster *c, unsigned from, const Weightd__Cluster__V1__Done *m) {
        Coord *co = coord_find(c, m->plan_id);
        Target *t = co ? coord_target(co, from) : NULL;

        if (!t || (t->state != TARGET_READY && t->state != TARGET_LOADING && t->state != TARGET_SOURCE_COPYING))
                return;
        t->state = m->code == 0 ? TARGET_DONE : TARGET_FAILED;
        snprintf(t->message, sizeof(t->message), "%s", m->message ? m->message : "");
        t->stats = (TransferStats){
                .storage_read_bytes = m->storage_read_bytes,
                .peer_received_bytes = m->peer_received_bytes,
                .peer_sent_bytes = m->peer_sent_bytes,
        };
        coord_maybe_finish(co);
}

/* ---- taking part -------------------------------------------------------- */

static void reply_propose(Cluster *c, unsigned to, uint64_t plan_id, int status, const char *msg) {
        Weightd__Cluster__V1__ProposeReply r = WEIGHTD__CLUSTER__V1__PROPOSE_REPLY__INIT;

        r.plan_id = plan_id;
        r.status = status;
        r.message = (char *) (msg ? msg : "");
        ENVELOPE(env, propose_reply, PROPOSE_REPLY, &r);
        (void) send_to(c, to, &env);
}

static int pending_start(Cluster *c, PendingKind kind, unsigned from, uint64_t plan_id, const char *model,
                         const char *component, const ProtobufCBinaryData *manifest, uint64_t chunk_size,
                         ClusterResolve **ret) {
        ClusterResolve *p;

        if (manifest->len != PLAN_MANIFEST_SIZE || !model || !component || chunk_size < 4096 ||
            chunk_size % 4096 != 0 || chunk_size > (1ull << 30))
                return -EINVAL;
        p = calloc(1, sizeof(ClusterResolve));
        if (!p)
                return -ENOMEM;
        p->c = c;
        p->kind = kind;
        p->from = from;
        p->from_generation = c->node_generation[from];
        p->plan_id = plan_id;
        p->chunk_size = chunk_size;
        memcpy(p->manifest.bytes, manifest->data, PLAN_MANIFEST_SIZE);
        LIST_PREPEND(pendings, c->pendings, p);
        *ret = p;
        return 0;
}

static void handle_propose(Cluster *c, unsigned from, const Weightd__Cluster__V1__Propose *m) {
        ClusterResolve *p;
        int r;

        if (over_limit(c, from)) {
                reply_propose(c, from, m->plan_id, WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__FAILED,
                              "too many plans proposed to this node at once");
                return;
        }
        /* A plan id is proposed once. */
        if (slot_find(c, m->plan_id))
                return;
        LIST_FOREACH(pendings, x, c->pendings)
                if (x->plan_id == m->plan_id)
                        return;

        r = pending_start(c, PENDING_PROPOSE, from, m->plan_id, m->model, m->component, &m->manifest, m->chunk_size,
                          &p);
        if (r < 0) {
                reply_propose(c, from, m->plan_id, WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__FAILED,
                              r == -EINVAL ? "malformed proposal" : "out of memory");
                return;
        }
        if (views_from_wire(m->files, m->n_files, &p->views) == 0)
                p->n_views = m->n_files;
        p->device = m->on_device ? (int) MIN(m->device, (uint32_t) INT32_MAX) : -1;
        WdError err = WD_ERROR_NULL;
        if (parts_from_wire(c, m->parts, m->n_parts, &p->parts, &err) != 0 ||
            (m->n_parts > 0 && parts_find(&p->parts, mesh_self(c->mesh)) < 0)) {
                LIST_REMOVE(pendings, c->pendings, p);
                views_free(p->views, p->n_views);
                parts_done(&p->parts);
                free(p);
                reply_propose(c, from, m->plan_id, WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__FAILED,
                              err.code ? err.message : "a part plan that leaves this node out");
                return;
        }
        if (p->parts.n > 0) {
                int own = p->parts.devices[parts_find(&p->parts, mesh_self(c->mesh))];

                if (own != PARTS_PLAN_DEVICE)
                        p->device = own; /* -1: host memory only, for this node */
        }
        c->ops.resolve(m->model, m->component, p, c->userdata);
}

static void handle_fetch(Cluster *c, unsigned from, const Weightd__Cluster__V1__Fetch *m) {
        ClusterResolve *p = NULL;
        int r;

        if (over_limit(c, from)) {
                send_abort(c, from, m->plan_id, "too many fetches asked of this node at once");
                return;
        }
        if (slot_find(c, m->plan_id))
                return;

        r = pending_start(c, PENDING_FETCH, from, m->plan_id, m->model, m->component, &m->manifest, m->chunk_size,
                          &p);
        if (r == 0 && (m->n_holders == 0 || m->n_holders > PLAN_MAX_SOURCES))
                r = -EINVAL;
        if (r == 0) {
                p->holders = calloc(m->n_holders, sizeof(unsigned));
                p->gone = calloc(m->n_holders, sizeof(unsigned));
                if (!p->holders || !p->gone)
                        r = -ENOMEM;
                for (size_t i = 0; r == 0 && i < m->n_holders; i++) {
                        int k = mesh_find(c->mesh, m->holders[i]);

                        if (k < 0)
                                r = -EINVAL;
                        else
                                p->holders[p->n_holders++] = (unsigned) k;
                }
        }
        if (r < 0) {
                if (p) {
                        LIST_REMOVE(pendings, c->pendings, p);
                        free(p->holders);
                        free(p->gone);
                        free(p);
                }
                send_abort(c, from, m->plan_id, r == -EINVAL ? "malformed fetch" : "out of memory");
                return;
        }
        c->ops.resolve(m->model, m->component, p, c->userdata);
}

static void watch_done(JobWaiter *w, const JobOutcome *o) {
        Watch *x = container_of(w, Watch, wait);
        Cluster *c = x->c;
        Weightd__Cluster__V1__Done d = WEIGHTD__CLUSTER__V1__DONE__INIT;

        Transfer *t = transfer_from_job(x->job);
        TransferStats st = {};

        if (t)
                transfer_stats(t, &st);
        else if (o->r == 0 && !x->read_nothing)
                st.storage_read_bytes = x->job->total; /* a host load read it all */
        d.plan_id = x->plan_id;
        d.code = o->r;
        d.message = o->r == 0 ? (char *) "" : (char *) (o->err ? o->err->message : "failed");
        d.storage_read_bytes = st.storage_read_bytes;
        d.peer_received_bytes = st.peer_received_bytes;
        d.peer_sent_bytes = st.peer_sent_bytes;
        ENVELOPE(env, done, DONE, &d);
        (void) send_to(c, x->coordinator, &env);
        LIST_REMOVE(watches, c->watches, x);
        job_unref(x->job);
        free(x);
}

static const JobWaiterOps watch_ops = { .done = watch_done };

/* Follow job j for the coordinator (read_nothing: it reads nothing from
 * storage, a copy or a cut of what this node holds); returns 0 or
 * -ENOMEM. */
static int watch_start(Cluster *c, Job *j, unsigned coordinator, uint64_t plan_id, bool read_nothing) {
        Watch *x = calloc(1, sizeof(Watch));

        if (!x)
                return -ENOMEM;
        x->c = c;
        x->plan_id = plan_id;
        x->coordinator = coordinator;
        x->read_nothing = read_nothing;
        x->job = job_ref(j);
        LIST_PREPEND(watches, c->watches, x);
        job_add_waiter(j, &x->wait, &watch_ops);
        return 0;
}

/* The copy of comp (or its shard spec) to device of this node: 0 with
 * *ret the device load (referenced), or NULL when the device holds it
 * already; else an error with err set (no GPU tier, no such device, the
 * device's budget). */
static int device_job(Cluster *c, const Component *comp, const ShardSpec *spec, int root_fd, int device, Job **ret,
                      WdError *err) {
        _cleanup_free_ FileId *ids = calloc(comp->n_files + 1, sizeof(FileId));
        _cleanup_free_ char *key = spec ? shard_spec_key(spec) : strdup("");
        DeviceTier *t = c->tier;
        CacheEntry *e;
        Job *j;

        *ret = NULL;
        if (!ids || !key)
                return wd_error_set(err, -ENOMEM, "out of memory");
        if (!t || (size_t) device >= gpu_n_devices(t->gpu))
                return wd_error_set(err, WD_E_UNSUPPORTED, "%s: device %d: %s", mesh_node_name(c->mesh,
                                    mesh_self(c->mesh)), device, t ? "no such device on this node" :
                                    "this node has no GPU tier");
        for (size_t i = 0; i < comp->n_files; i++)
                ids[i] = comp->files[i].id;
        e = cache_lookup(t->caches[device], comp->model, comp->name, key, ids, comp->n_files);
        if (e && e->state == CACHE_ENTRY_RESIDENT)
                return 0;
        j = e ? job_find(&t->jobs, e) : NULL;
        if (j) {
                *ret = job_ref(j);
                return 0;
        }
        DeviceLoadParams params = {
                .dev = (size_t) device,
                .root_fd = root_fd,
                .spec = spec,
                .variant = key,
                .keep_host = true, /* the plan made it resident in host memory too */
                .requested_usec = now_usec(),
        };
        return device_load_start(t, comp, &params, ret, err);
}

/* This node holds its part in host memory: copy it to the plan's device,
 * answering the Propose with LOADING (or RESIDENT when the device holds it
 * already; FAILED when it cannot); as_source: a source of a plain plan,
 * SOURCE_COPYING then. */
static void propose_device(Cluster *c, ClusterResolve *p, const Component *comp, const ShardSpec *spec, int root_fd,
                           bool as_source) {
        WdError err = WD_ERROR_NULL;
        Job *j = NULL;
        int r;

        r = device_job(c, comp, spec, root_fd, p->device, &j, &err);
        if (r != 0) {
                reply_propose(c, p->from, p->plan_id, WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__FAILED, err.message);
                return;
        }
        if (!j) {
                reply_propose(c, p->from, p->plan_id, WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__RESIDENT, "");
                return;
        }
        if (watch_start(c, j, p->from, p->plan_id, true) < 0) {
                reply_propose(c, p->from, p->plan_id, WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__FAILED, "out of memory");
        } else {
                reply_propose(c, p->from, p->plan_id,
                              as_source ? WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__SOURCE_COPYING
                                        : WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__LOADING, "");
        }
        job_unref(j);
}

/* A receiving transfer t was made (r 0) for Propose p, or not: READY, or
 * FAILED with why. */
static void take_part(Cluster *c, ClusterResolve *p, Transfer *t, int r, const WdError *err) {
        if (r != 0) {
                reply_propose(c, p->from, p->plan_id, WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__FAILED, err->message);
                return;
        }
        Slot *s = NULL;

        if (slot_add(c, t, (int) p->from, &s) < 0) {
                transfer_abort(t, "out of memory");
                transfer_unref(t);
                reply_propose(c, p->from, p->plan_id, WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__FAILED, "out of memory");
                return;
        }
        s->device = p->device;
        transfer_unref(t);
        reply_propose(c, p->from, p->plan_id, WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__READY, "");
}

/* Follow the job filling entry e for the coordinator: LOADING, or FAILED
 * when there is none. */
static void reply_loading(Cluster *c, ClusterResolve *p, const Component *comp, CacheEntry *e) {
        Job *j = job_find(&c->store->jobs, e);
        char msg[CLUSTER_MESSAGE_MAX];

        if (j && watch_start(c, j, p->from, p->plan_id, false) == 0) {
                reply_propose(c, p->from, p->plan_id, WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__LOADING, "");
                return;
        }
        snprintf(msg, sizeof(msg), "%s: this node is loading it already", comp->model);
        reply_propose(c, p->from, p->plan_id, WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__FAILED, msg);
}

/* A part plan's Propose (the manifest matched): RESIDENT when this node
 * holds its part, LOADING when it is being made (or can be cut out of the
 * whole component held here), else READY with a part transfer. */
static void propose_part(Cluster *c, ClusterResolve *p, const Component *comp, int root_fd) {
        int self = parts_find(&p->parts, mesh_self(c->mesh));
        const ShardSpec *spec = p->parts.specs[self];
        _cleanup_free_ FileId *ids = calloc(comp->n_files + 1, sizeof(FileId));
        _cleanup_free_ char *key = spec ? shard_spec_key(spec) : strdup("");
        WdError err = WD_ERROR_NULL;
        Transfer *t = NULL;
        CacheEntry *e, *whole;
        int r;

        if (!ids || !key) {
                reply_propose(c, p->from, p->plan_id, WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__FAILED, "out of memory");
                return;
        }
        for (size_t i = 0; i < comp->n_files; i++)
                ids[i] = comp->files[i].id;
        e = cache_lookup(c->store->cache, comp->model, comp->name, key, ids, comp->n_files);
        if (e && e->state == CACHE_ENTRY_RESIDENT) {
                if (p->device >= 0)
                        propose_device(c, p, comp, spec, root_fd, false);
                else
                        reply_propose(c, p->from, p->plan_id, WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__RESIDENT, "");
                return;
        }
        if (e) {
                reply_loading(c, p, comp, e);
                return;
        }
        /* An earlier part plan still making this part here (its asker went
         * on to another coordinator): follow it rather than read again. */
        LIST_FOREACH(slots, s, c->slots)
                if (p->device < 0 && transfer_makes(s->t, comp, spec)) {
                        if (watch_start(c, transfer_job(s->t), p->from, p->plan_id, false) == 0)
                                reply_propose(c, p->from, p->plan_id, WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__LOADING,
                                              "");
                        else
                                reply_propose(c, p->from, p->plan_id, WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__FAILED,
                                              "out of memory");
                        return;
                }
        whole = spec ? cache_lookup(c->store->cache, comp->model, comp->name, "", ids, comp->n_files) : NULL;
        if (whole && whole->state == CACHE_ENTRY_RESIDENT && p->device >= 0) {
                /* The device load cuts the shard out of it. */
                propose_device(c, p, comp, spec, root_fd, false);
                return;
        }
        if (whole && whole->state == CACHE_ENTRY_RESIDENT) {
                /* Cut here out of what this node holds: nothing to read. */
                ShardPlan *plan = NULL;
                Job *j = NULL;

                r = shard_plan(comp, spec, GPU_ALIGN, &plan, &err);
                if (r == 0)
                        r = shard_build_start(c->store, comp, plan, spec, key, whole, NULL, &j, &err);
                if (r == 0 && watch_start(c, j, p->from, p->plan_id, true) == 0)
                        reply_propose(c, p->from, p->plan_id, WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__LOADING, "");
                else
                        reply_propose(c, p->from, p->plan_id, WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__FAILED,
                                      r != 0 ? err.message : "out of memory");
                job_unref(j);
                return;
        }
        r = transfer_new_part(&c->tctx, p->plan_id, comp, root_fd, p->chunk_size, p->parts.nodes, p->parts.specs,
                              p->parts.n, &t, &err);
        take_part(c, p, t, r, &err);
}

/* A resolved Propose: take part, or say why not. */
static void propose_resolved(Cluster *c, ClusterResolve *p, const Component *comp, int root_fd) {
        _cleanup_free_ FileId *ids = NULL;
        PlanManifest mine;
        CacheEntry *e;
        Transfer *t = NULL;
        WdError err = WD_ERROR_NULL;
        char hex_mine[2 * PLAN_MANIFEST_SIZE + 1], hex_theirs[2 * PLAN_MANIFEST_SIZE + 1];
        char msg[CLUSTER_MESSAGE_MAX];
        int r;

        if (plan_manifest(comp, &mine) < 0 || !(ids = calloc(comp->n_files + 1, sizeof(FileId)))) {
                reply_propose(c, p->from, p->plan_id, WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__FAILED, "out of memory");
                return;
        }
        if (!plan_manifest_equal(&mine, &p->manifest)) {
                Job *j = NULL;

                _cleanup_free_ PlanFileView *views = NULL;
                char how[CLUSTER_MESSAGE_MAX / 2] = "";

                plan_manifest_hex(&mine, hex_mine);
                plan_manifest_hex(&p->manifest, hex_theirs);
                if (plan_file_views(comp, &views) == 0)
                        plan_explain_mismatch(views, comp->n_files, p->views, p->n_views, how, sizeof(how));
                if (!*how)
                        snprintf(how, sizeof(how), "manifest %s here, %s in the plan", hex_mine, hex_theirs);
                snprintf(msg, sizeof(msg), "%s%s%s differs on this node: %s; it reads alone", comp->model,
                         *comp->name ? " " : "", comp->name, how);
                log_warning("plan %016" PRIx64 ": %s", p->plan_id, msg);
                reply_propose(c, p->from, p->plan_id, WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__MISMATCH, msg);
                set_mismatch(c, mesh_self(c->mesh), msg);
                /* Read alone: the plan wanted it here. */
                for (size_t i = 0; i < comp->n_files; i++)
                        ids[i] = comp->files[i].id;
                e = cache_lookup(c->store->cache, comp->model, comp->name, "", ids, comp->n_files);
                if (!e && p->parts.n == 0) {
                        r = host_load_start(c->store, root_fd, comp, 0, &j, &err);
                        if (r != 0)
                                log_warning("%s: cannot load it alone: %s", comp->model, err.message);
                        job_unref(j);
                }
                return;
        }
        /* A device this node lacks: say so before reserving anything. */
        if (p->device >= 0 && (!c->tier || (size_t) p->device >= gpu_n_devices(c->tier->gpu))) {
                snprintf(msg, sizeof(msg), "%s: device %d: %s", mesh_node_name(c->mesh, mesh_self(c->mesh)),
                         p->device, c->tier ? "no such device on this node" : "this node has no GPU tier");
                reply_propose(c, p->from, p->plan_id, WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__FAILED, msg);
                return;
        }
        if (p->parts.n > 0) {
                propose_part(c, p, comp, root_fd);
                return;
        }
        for (size_t i = 0; i < comp->n_files; i++)
                ids[i] = comp->files[i].id;
        e = cache_lookup(c->store->cache, comp->model, comp->name, "", ids, comp->n_files);
        if (e && e->state == CACHE_ENTRY_RESIDENT) {
                r = transfer_new_resident(&c->tctx, p->plan_id, comp, e, p->chunk_size, &t, &err);
                if (r == 0 && slot_add(c, t, (int) p->from, NULL) < 0)
                        r = wd_error_set(&err, -ENOMEM, "out of memory");
                if (r != 0)
                        reply_propose(c, p->from, p->plan_id, WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__FAILED,
                                      err.message);
                else if (p->device >= 0)
                        propose_device(c, p, comp, NULL, root_fd, true); /* a source that copies too */
                else
                        reply_propose(c, p->from, p->plan_id, WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__RESIDENT, "");
                transfer_unref(t);
                return;
        }
        if (e) {
                /* An earlier plan whose coordinator went, a local load: it
                 * ends on its own, and the coordinator hears how. */
                Job *j = job_find(&c->store->jobs, e);

                if (j && watch_start(c, j, p->from, p->plan_id, false) == 0) {
                        reply_propose(c, p->from, p->plan_id, WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__LOADING, "");
                        return;
                }
                snprintf(msg, sizeof(msg), "%s: this node is loading it already", comp->model);
                reply_propose(c, p->from, p->plan_id, WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__FAILED, msg);
                return;
        }
        r = transfer_new_receiving(&c->tctx, p->plan_id, comp, root_fd, p->chunk_size, &t, &err);
        take_part(c, p, t, r, &err);
}

/* A resolved Fetch: send our share if we hold it. */
static void fetch_resolved(Cluster *c, ClusterResolve *p, const Component *comp) {
        _cleanup_free_ FileId *ids = calloc(comp->n_files + 1, sizeof(FileId));
        unsigned self = mesh_self(c->mesh), fetcher = p->from;
        WdError err = WD_ERROR_NULL;
        PlanManifest mine;
        Transfer *t = NULL;
        Slot *s = NULL;
        CacheEntry *e;
        int r;

        if (!ids || plan_manifest(comp, &mine) < 0) {
                send_abort(c, p->from, p->plan_id, "out of memory");
                return;
        }
        if (!plan_manifest_equal(&mine, &p->manifest)) {
                send_abort(c, p->from, p->plan_id, "this node's view of the files differs");
                return;
        }
        for (size_t i = 0; i < comp->n_files; i++)
                ids[i] = comp->files[i].id;
        e = cache_lookup(c->store->cache, comp->model, comp->name, "", ids, comp->n_files);
        if (!e || e->state != CACHE_ENTRY_RESIDENT) {
                send_abort(c, p->from, p->plan_id, "not resident here");
                return;
        }
        bool listed = false;
        for (size_t i = 0; i < p->n_holders; i++)
                listed = listed || p->holders[i] == self;
        r = listed ? transfer_new_resident(&c->tctx, p->plan_id, comp, e, p->chunk_size, &t, &err) : -EINVAL;
        if (r == 0)
                r = slot_add(c, t, -1, &s);
        if (r == 0)
                r = slot_set_tell(s, &fetcher, 1, NULL, 0);
        if (r == 0)
                r = transfer_start(t, p->holders, p->n_holders, &fetcher, 1);
        for (size_t i = 0; r == 0 && i < p->n_gone; i++)
                transfer_node_down(t, p->gone[i]);
        if (r != 0) {
                send_abort(c, p->from, p->plan_id, r > 0 ? err.message : "cannot send it");
                if (t)
                        transfer_abort(t, "cannot send it");
        }
        transfer_unref(t);
}

void cluster_resolved(ClusterResolve *p, int r, const WdError *err, const Component *comp, int root_fd) {
        Cluster *c = p->c;

        if (c) {
                LIST_REMOVE(pendings, c->pendings, p);
                /* A node that restarted meanwhile asked nothing of us. */
                if (c->node_generation[p->from] != p->from_generation && p->from != mesh_self(c->mesh))
                        r = r == 0 ? -ESTALE : r;
        }
        if (c && r != 0 && r != -ESTALE) {
                if (p->kind == PENDING_PROPOSE)
                        reply_propose(c, p->from, p->plan_id, WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__FAILED,
                                      err ? err->message : "cannot resolve it");
                else
                        send_abort(c, p->from, p->plan_id, err ? err->message : "cannot resolve it");
        } else if (c && r == 0) {
                if (p->kind == PENDING_PROPOSE)
                        propose_resolved(c, p, comp, root_fd);
                else
                        fetch_resolved(c, p, comp);
        }
        free(p->holders);
        free(p->gone);
        views_free(p->views, p->n_views);
        parts_done(&p->parts);
        free(p);
}

/* The Start names a GPU lane: s's transfer moves its chunks through it,
 * where this node's part of the plan is on the lane's device. */
static void join_lane(Cluster *c, Slot *s, const Weightd__Cluster__V1__Start *m) {
        unsigned ranks[PLAN_MAX_SOURCES];
        size_t n = 0;

        for (size_t i = 0; i < m->n_lane_ranks && i < PLAN_MAX_SOURCES; i++) {
                int k = mesh_find(c->mesh, m->lane_ranks[i]);

                /* In mesh order, each once: anything else is no lane. */
                if (k < 0 || (n > 0 && (unsigned) k <= ranks[n - 1]))
                        return;
                ranks[n++] = (unsigned) k;
        }
        if (n != m->n_lane_ranks)
                return;
        if (m->lane_id.len == GPU_COLL_ID_BYTES && (s->device < 0 || (uint32_t) s->device != m->lane_device)) {
                /* Its ranks wait for this node: they must hear it. */
                lanes_join(c->lanes, s->t, NULL, 0, ranks, n, -1, 0);
                return;
        }
        lanes_join(c->lanes, s->t, m->lane_id.data, m->lane_id.len, ranks, n, s->device, transfer_chunk_size(s->t));
}

static void handle_start(Cluster *c, unsigned from, const Weightd__Cluster__V1__Start *m) {
        Slot *s = slot_find(c, m->plan_id);
        unsigned src[PLAN_MAX_SOURCES], rcv[PLAN_MAX_SOURCES];
        size_t ns = 0, nr = 0;
        bool me = false;
        unsigned self = mesh_self(c->mesh);

        if (!s || s->coordinator != (int) from || transfer_started(s->t))
                return;
        if (m->n_sources > PLAN_MAX_SOURCES || m->n_receivers > PLAN_MAX_SOURCES) {
                transfer_abort(s->t, "malformed start");
                return;
        }
        for (size_t i = 0; i < m->n_sources; i++) {
                int k = mesh_find(c->mesh, m->sources[i]);

                if (k < 0) {
                        transfer_abort(s->t, "a source that is not a node");
                        return;
                }
                /* Twice in the list, its chunks under one of its indexes
                 * would be waited for from it forever. */
                for (size_t j = 0; j < ns; j++)
                        if (src[j] == (unsigned) k) {
                                transfer_abort(s->t, "a source listed twice");
                                return;
                        }
                src[ns++] = (unsigned) k;
                me = me || (unsigned) k == self;
        }
        for (size_t i = 0; i < m->n_receivers; i++) {
                int k = mesh_find(c->mesh, m->receivers[i]);

                if (k < 0) {
                        transfer_abort(s->t, "a receiver that is not a node");
                        return;
                }
                for (size_t j = 0; j < nr; j++)
                        if (rcv[j] == (unsigned) k) {
                                transfer_abort(s->t, "a receiver listed twice");
                                return;
                        }
                rcv[nr++] = (unsigned) k;
                me = me || (unsigned) k == self;
        }
        if (!me) {
                transfer_abort(s->t, "left out of the plan");
                return;
        }
        if (m->lane_id.len > 0)
                join_lane(c, s, m);
        if (slot_set_tell(s, src, ns, rcv, nr) < 0 || transfer_start(s->t, src, ns, rcv, nr) < 0)
                transfer_abort(s->t, "cannot start");
}

static void handle_done(Cluster *c, unsigned from, const Weightd__Cluster__V1__Done *m) {
        Slot *s = slot_find(c, m->plan_id);

        if (s)
                transfer_receiver_done(s->t, from);
        handle_done_coord(c, from, m);
}

static void handle_abort(Cluster *c, unsigned from, const Weightd__Cluster__V1__Abort *m) {
        Slot *s = slot_find(c, m->plan_id);
        const char *why = m->message && *m->message ? m->message : "aborted";

        if (!s)
                return;
        if (!transfer_started(s->t) && s->coordinator == (int) from)
                transfer_abort(s->t, why);
        else {
                /* A node that will not take part (a fetch asked of a node
                 * that does not hold it): its chunks go to the others. */
                log_debug("plan %016" PRIx64 ": %s will not send: %s", m->plan_id, mesh_node_name(c->mesh, from),
                          why);
                transfer_source_failed(s->t, from, why);
        }
}

/* TransferContext.source_gone: tell a fetch's other holders. */
static void on_source_gone(Transfer *t, unsigned node, void *userdata) {
        Cluster *c = userdata;
        Slot *s = slot_of(c, t);
        Weightd__Cluster__V1__Gone g = WEIGHTD__CLUSTER__V1__GONE__INIT;

        if (!s)
                return;
        g.plan_id = transfer_plan_id(t);
        g.node = (char *) mesh_node_name(c->mesh, node);
        for (size_t i = 0; i < s->n_tell; i++)
                if (s->tell[i] != node) {
                        ENVELOPE(env, gone, GONE, &g);
                        (void) send_to(c, s->tell[i], &env);
                }
}

static void handle_gone(Cluster *c, unsigned from, const Weightd__Cluster__V1__Gone *m) {
        Slot *s = slot_find(c, m->plan_id);
        int node = m->node ? mesh_find(c->mesh, m->node) : -1;

        if (node < 0)
                return;
        if (!s) {
                /* The fetch is still being resolved here. */
                LIST_FOREACH(pendings, p, c->pendings)
                        if (p->kind == PENDING_FETCH && p->plan_id == m->plan_id && p->from == from && p->gone &&
                            p->n_gone < p->n_holders)
                                p->gone[p->n_gone++] = (unsigned) node;
                return;
        }
        /* Only the fetcher speaks for a fetch. */
        if (s->coordinator >= 0 || s->n_tell != 1 || s->tell[0] != from)
                return;
        transfer_node_down(s->t, (unsigned) node);
}

/* ---- asking ------------------------------------------------------------- */

static const JobKind ask_kind;

static Ask *ask_find(Cluster *c, uint64_t request_id) {
        LIST_FOREACH(asks, a, c->asks)
                if (a->request_id == request_id)
                        return a;
        return NULL;
}

static void ask_unlink(Ask *a) {
        if (!a->linked)
                return;
        LIST_REMOVE(asks, a->c->asks, a);
        a->linked = false;
}

static void ask_finish(Ask *a, int r, const WdError *err, const JobNodeReport *nodes, size_t n_nodes) {
        Cluster *c = a->c;
        _cleanup_free_ FileId *ids = calloc(a->comp->n_files + 1, sizeof(FileId));
        CacheEntry *e = NULL;

        ask_unlink(a);
        if (r == 0 && ids) {
                for (size_t i = 0; i < a->comp->n_files; i++)
                        ids[i] = a->comp->files[i].id;
                int self = parts_find(&a->parts, mesh_self(c->mesh));
                _cleanup_free_ char *key = self >= 0 && a->parts.specs[self] ? shard_spec_key(a->parts.specs[self])
                                                                              : strdup("");

                e = key ? cache_lookup(c->store->cache, a->comp->model, a->comp->name, key, ids, a->comp->n_files)
                        : NULL;
                if (e && e->state != CACHE_ENTRY_RESIDENT)
                        e = NULL;
        }
        job_finish(&a->job, &(JobOutcome){ .r = r, .err = err, .entry = e, .nodes = nodes, .n_nodes = n_nodes });
        job_unref(&a->job); /* the list's */
}

static int ask_send(Ask *a) {
        Cluster *c = a->c;
        Weightd__Cluster__V1__PlanRequest pr = WEIGHTD__CLUSTER__V1__PLAN_REQUEST__INIT;
        const char *names[MESH_MAX_NODES];
        unsigned idx[MESH_MAX_NODES];
        char key[PATH_MAX + 300];
        size_t n = 0;

        /* The live nodes, less those that failed this ask already (this
         * node always counts: it can coordinate its own ask). */
        for (unsigned i = 0; i < c->n_nodes && n < MESH_MAX_NODES; i++) {
                bool tried = false;

                for (unsigned k = 0; k < a->attempts; k++)
                        tried = tried || a->tried[k] == (int) i;
                if (i == mesh_self(c->mesh) || (mesh_node_up(c->mesh, i) && !tried)) {
                        names[n] = mesh_node_name(c->mesh, i);
                        idx[n++] = i;
                }
        }
        /* Every node computes the same key for the same component. */
        snprintf(key, sizeof(key), "%s\n%s", a->comp->model, a->comp->name);
        a->coordinator = (int) idx[plan_coordinator(key, names, n)];
        a->tried[a->attempts++] = a->coordinator;
        a->heard_usec = a->moved_usec = now_usec();
        pr.request_id = a->request_id;
        pr.model = a->comp->model;
        pr.component = a->comp->name;
        pr.manifest.data = a->manifest.bytes;
        pr.manifest.len = PLAN_MANIFEST_SIZE;
        pr.nodes = a->nodes;
        pr.n_nodes = a->n_nodes;
        pr.on_device = a->device >= 0;
        pr.device = a->device >= 0 ? (uint32_t) a->device : 0;
        _cleanup_(wire_parts_done) WireParts wp = {};
        if (a->parts.n > 0) {
                if (wire_parts(c, &a->parts, &wp) < 0)
                        return -ENOMEM;
                pr.parts = wp.ptrs;
                pr.n_parts = wp.n;
        }
        _cleanup_free_ PlanFileView *views = NULL;
        _cleanup_(wire_views_done) WireViews wv = {};
        if (plan_file_views(a->comp, &views) == 0 && wire_views(views, a->comp->n_files, &wv) == 0) {
                pr.files = wv.ptrs;
                pr.n_files = wv.n;
        }
        ENVELOPE(env, plan_request, PLAN_REQUEST, &pr);
        log_debug("cluster prefetch of %s: coordinator %s (try %u)", a->comp->model,
                  mesh_node_name(c->mesh, (unsigned) a->coordinator), a->attempts);
        return send_to(c, (unsigned) a->coordinator, &env);
}

static void ask_retry(Ask *a, const char *why) {
        WdError err = WD_ERROR_NULL;

        if (a->attempts < CLUSTER_ASK_ATTEMPTS) {
                log_info("cluster prefetch of %s: %s; asking another coordinator", a->comp->model, why);
                if (ask_send(a) == 0)
                        return;
        }
        wd_error_set(&err, -EHOSTDOWN, "%s: cluster prefetch failed: %s", a->comp->model, why);
        ask_finish(a, -EHOSTDOWN, &err, NULL, 0);
}

static void handle_plan_result(Cluster *c, unsigned from, const Weightd__Cluster__V1__PlanResult *m) {
        Ask *a = ask_find(c, m->request_id);
        _cleanup_free_ JobNodeReport *reports = NULL;
        WdError err = WD_ERROR_NULL;

        if (!a || a->coordinator != (int) from)
                return;
        if (m->code != 0) {
                /* A coordinator that cannot plan (busy, out of memory, or
                 * not telling the truth): ask another one. */
                char why[256];

                snprintf(why, sizeof(why), "coordinator %s: %.200s", mesh_node_name(c->mesh, from),
                         m->message ? m->message : "the plan failed");
                ask_retry(a, why);
                return;
        }
        reports = calloc(m->n_nodes + 1, sizeof(JobNodeReport));
        if (!reports) {
                wd_error_set(&err, -ENOMEM, "out of memory");
                ask_finish(a, -ENOMEM, &err, NULL, 0);
                return;
        }
        for (size_t i = 0; i < m->n_nodes; i++) {
                const Weightd__Cluster__V1__NodeResult *n = m->nodes[i];
                int k = n->node ? mesh_find(c->mesh, n->node) : -1;

                reports[i] = (JobNodeReport){
                        .node = n->node ? n->node : "",
                        .state = n->state ? n->state : "",
                        .message = n->message ? n->message : "",
                        .storage_read_bytes = n->storage_read_bytes,
                        .peer_received_bytes = n->peer_received_bytes,
                        .peer_sent_bytes = n->peer_sent_bytes,
                };
                /* The asking node's view is the plan's: a node that
                 * differed is "mismatch" here until it next takes part. */
                if (k >= 0 && n->state && streq(n->state, "mismatch"))
                        set_mismatch(c, (unsigned) k, reports[i].message);
                else if (k >= 0 && n->state && (streq(n->state, "ok") || streq(n->state, "resident")))
                        set_mismatch(c, (unsigned) k, NULL);
        }
        ask_finish(a, 0, NULL, reports, m->n_nodes);
}

static void ask_cancel(Job *j) {
        /* The plan goes on for the other nodes; the asker hears it end. */
}

static void ask_free(Job *j) {
        Ask *a = (Ask *) j;

        assert(!a->linked);
        component_free(a->comp);
        for (size_t i = 0; i < a->n_nodes; i++)
                free(a->nodes[i]);
        free(a->nodes);
        parts_done(&a->parts);
        free(a);
}

static const JobKind ask_kind = {
        .name = "cluster prefetch",
        .cancel = ask_cancel,
        .free = ask_free,
};

int cluster_prefetch(Cluster *c, const Component *comp, char *const *nodes, ShardSpec *const *specs,
                     const int *devices, size_t n_nodes, int device, Job **ret, WdError *err) {
        Ask *a;
        int r;

        for (size_t i = 0; i < n_nodes; i++)
                if (mesh_find(c->mesh, nodes[i]) < 0)
                        return wd_error_set(err, WD_E_INVALID, "nodes: \"%.64s\" is not a node of the cluster",
                                            nodes[i]);
        if ((specs || devices) && (n_nodes == 0 || n_nodes > PLAN_MAX_SOURCES))
                return wd_error_set(err, WD_E_INVALID, "a prefetch with shards per node names 1 to %u nodes, not %zu",
                                    PLAN_MAX_SOURCES, n_nodes);
        a = calloc(1, sizeof(Ask));
        if (!a)
                return wd_error_set(err, -ENOMEM, "out of memory");
        a->c = c;
        a->device = device;
        a->request_id = ++c->next_request_id;
        r = component_dup(comp, &a->comp);
        if (r == 0)
                r = plan_manifest(comp, &a->manifest);
        if (r == 0 && n_nodes > 0) {
                a->nodes = calloc(n_nodes, sizeof(char *));
                r = a->nodes ? 0 : -ENOMEM;
                for (size_t i = 0; r == 0 && i < n_nodes; i++) {
                        a->nodes[i] = strdup(nodes[i]);
                        if (!a->nodes[i])
                                r = -ENOMEM;
                        else
                                a->n_nodes++;
                }
        }
        for (size_t i = 0; r == 0 && (specs || devices) && i < n_nodes; i++) {
                a->parts.nodes[i] = (unsigned) mesh_find(c->mesh, nodes[i]);
                a->parts.specs[i] = NULL;
                a->parts.devices[i] = devices ? devices[i] : PARTS_PLAN_DEVICE;
                a->parts.n = i + 1;
                if (parts_find(&a->parts, a->parts.nodes[i]) != (int) i)
                        r = -EINVAL;
                else if (specs && !shard_spec_empty(specs[i]))
                        r = shard_spec_copy(specs[i], &a->parts.specs[i]);
        }
        job_init(&a->job, &ask_kind, NULL, NULL);
        if (r == -EINVAL) {
                job_unref(&a->job);
                return wd_error_set(err, WD_E_INVALID, "a node is named twice");
        }
        if (r < 0) {
                job_unref(&a->job);
                return wd_error_set(err, r, "out of memory");
        }
        LIST_PREPEND(asks, c->asks, a);
        a->linked = true;
        job_ref(&a->job); /* the list's */
        if (ask_send(a) < 0)
                ask_retry(a, "the coordinator cannot be reached");
        *ret = &a->job;
        return 0;
}

/* ---- peer fetch --------------------------------------------------------- */

int cluster_fetch(Cluster *c, const Component *comp, int root_fd, Job **ret, WdError *err) {
        Weightd__Cluster__V1__Fetch f = WEIGHTD__CLUSTER__V1__FETCH__INIT;
        unsigned holders[PLAN_MAX_SOURCES], self = mesh_self(c->mesh);
        char *names[PLAN_MAX_SOURCES];
        PlanManifest m;
        Transfer *t;
        Slot *s;
        size_t n = 0;
        int r;

        *ret = NULL;
        if (!c->peer_fetch)
                return 0;
        for (unsigned i = 0; i < c->n_nodes && n < PLAN_MAX_SOURCES; i++)
                if (i != self && mesh_node_up(c->mesh, i)) {
                        names[n] = (char *) mesh_node_name(c->mesh, i);
                        holders[n++] = i;
                }
        if (n == 0)
                return 0;
        r = plan_manifest(comp, &m);
        if (r < 0)
                return wd_error_set(err, r, "out of memory");
        r = transfer_new_receiving(&c->tctx, random_u64(), comp, root_fd, c->chunk_size, &t, err);
        if (r != 0)
                return r;
        r = slot_add(c, t, -1, &s);
        if (r == 0)
                r = slot_set_tell(s, holders, n, NULL, 0);
        if (r == 0)
                r = transfer_start(t, holders, n, &self, 1);
        if (r < 0) {
                transfer_abort(t, "out of memory");
                transfer_unref(t);
                return wd_error_set(err, r, "out of memory");
        }
        f.plan_id = transfer_plan_id(t);
        f.model = comp->model;
        f.component = comp->name;
        f.manifest.data = m.bytes;
        f.manifest.len = PLAN_MANIFEST_SIZE;
        f.chunk_size = c->chunk_size;
        f.holders = names;
        f.n_holders = n;
        for (size_t i = 0; i < n; i++) {
                ENVELOPE(env, fetch, FETCH, &f);
                if (send_to(c, holders[i], &env) < 0)
                        transfer_source_failed(t, holders[i], "cannot be reached");
        }
        log_debug("peer fetch of %s%s%s: asked %zu nodes", comp->model, *comp->name ? " " : "", comp->name, n);
        *ret = transfer_job(t); /* the transfer's reference is the job's */
        return 0;
}

/* ---- progress ----------------------------------------------------------- */

static void send_progress(Cluster *c, unsigned to, uint64_t id, uint64_t done, uint64_t total) {
        Weightd__Cluster__V1__Progress pr = WEIGHTD__CLUSTER__V1__PROGRESS__INIT;

        pr.id = id;
        pr.done_bytes = done;
        pr.total_bytes = total;
        ENVELOPE(env, progress, PROGRESS, &pr);
        (void) send_to(c, to, &env);
}

static void handle_progress(Cluster *c, unsigned from, const Weightd__Cluster__V1__Progress *m) {
        Coord *co = coord_find(c, m->id);
        Target *t = co ? coord_target(co, from) : NULL;
        Ask *a;

        uint64_t now = now_usec();

        if (t && (t->state == TARGET_READY || t->state == TARGET_LOADING || t->state == TARGET_SOURCE_COPYING)) {
                t->heard_usec = now;
                if (m->done_bytes != t->done_bytes)
                        t->moved_usec = now;
                t->done_bytes = m->done_bytes;
                return;
        }
        a = ask_find(c, m->id);
        if (a && a->coordinator == (int) from && m->done_bytes <= m->total_bytes) {
                a->heard_usec = now;
                if (m->done_bytes != a->done_bytes)
                        a->moved_usec = now;
                a->done_bytes = m->done_bytes;
                job_progress(&a->job, m->done_bytes, m->total_bytes, 0, false);
        }
}

/* Every quarter second: receivers tell their coordinators what they have,
 * coordinators tell the asking nodes what the plan has. */
static void on_progress_timer(uv_timer_t *timer) {
        Cluster *c = timer->data;
        uint64_t now = now_usec();

        /* Sent when it moved, and every half deadline regardless: silence
         * is how a coordinator and an asker tell a node that stopped. */
        LIST_FOREACH(slots, s, c->slots) {
                uint64_t done, total;

                if (s->coordinator < 0 || !transfer_receiving(s->t) || !transfer_started(s->t) ||
                    transfer_result(s->t, NULL) != -EINPROGRESS)
                        continue;
                transfer_progress(s->t, &done, &total);
                if (done != s->progress_sent || now - s->progress_sent_usec > c->deadline_usec / 2) {
                        s->progress_sent = done;
                        s->progress_sent_usec = now;
                        send_progress(c, (unsigned) s->coordinator, transfer_plan_id(s->t), done, total);
                }
        }
        LIST_FOREACH(watches, x, c->watches)
                if (now - x->progress_sent_usec > c->deadline_usec / 2) {
                        x->progress_sent_usec = now;
                        send_progress(c, x->coordinator, x->plan_id, x->job->done, x->job->total);
                }
        LIST_FOREACH(coords, co, c->coords) {
                uint64_t bytes = 0, done = 0, total = 0;

                if (!co->started)
                        continue;
                for (size_t i = 0; i < co->n_views; i++)
                        bytes += co->views[i].size;
                for (size_t i = 0; i < co->n_targets; i++) {
                        const Target *t = &co->targets[i];

                        if (!t->receiver)
                                continue;
                        total += bytes;
                        done += t->state == TARGET_READY ? MIN(t->done_bytes, bytes) : bytes;
                }
                if (done == co->progress_sent && now - co->progress_sent_usec <= c->deadline_usec / 2)
                        continue;
                co->progress_sent = done;
                co->progress_sent_usec = now;
                for (size_t i = 0; i < co->n_origins; i++)
                        send_progress(c, co->origins[i].node, co->origins[i].request_id, done, total);
        }
}

/* A plan must keep moving: a target that says nothing for twice the
 * deadline, or whose bytes do not move for ten, is failed (it reads alone
 * if it is alive at all); an asker whose coordinator does the same asks the
 * next one.  A node with the secret that takes part and then stops cannot
 * hold a plan forever. */
#define CLUSTER_STALL_DEADLINES 10u

static void check_liveness(Cluster *c, uint64_t now) {
        for (Coord *co = c->coords, *next; co; co = next) {
                bool changed = false;

                next = co->coords_next;
                if (!co->started)
                        continue;
                for (size_t i = 0; i < co->n_targets; i++) {
                        Target *t = &co->targets[i];
                        const char *why = NULL;

                        if (t->state != TARGET_READY && t->state != TARGET_LOADING &&
                            t->state != TARGET_SOURCE_COPYING)
                                continue;
                        if (now - t->heard_usec > 2 * c->deadline_usec)
                                why = "nothing heard from it for twice the deadline";
                        else if (now - t->moved_usec > CLUSTER_STALL_DEADLINES * c->deadline_usec)
                                why = "its bytes did not move for ten deadlines";
                        if (!why)
                                continue;
                        t->state = TARGET_FAILED;
                        snprintf(t->message, sizeof(t->message), "%s", why);
                        log_warning("plan %016" PRIx64 ": %s: %s", co->plan_id, mesh_node_name(c->mesh, t->node),
                                    why);
                        changed = true;
                }
                if (changed)
                        coord_maybe_finish(co);
        }
        for (Ask *a = c->asks, *next; a; a = next) {
                next = a->asks_next;
                if (now - a->heard_usec > 2 * c->deadline_usec)
                        ask_retry(a, "the coordinator went silent");
                else if (now - a->moved_usec > CLUSTER_STALL_DEADLINES * c->deadline_usec)
                        ask_retry(a, "the plan did not move for ten deadlines");
        }
}

/* ---- events from the mesh and the data plane ---------------------------- */

static void dispatch(Cluster *c, unsigned from, const ClusterEnvelope *env) {
        switch (env->body_case) {
        case WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_PLAN_REQUEST:
                handle_plan_request(c, from, env->plan_request);
                break;
        case WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_PLAN_RESULT:
                handle_plan_result(c, from, env->plan_result);
                break;
        case WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_PROPOSE:
                handle_propose(c, from, env->propose);
                break;
        case WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_PROPOSE_REPLY:
                handle_propose_reply(c, from, env->propose_reply);
                break;
        case WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_START:
                handle_start(c, from, env->start);
                break;
        case WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_CHUNK_SUM: {
                Slot *s = slot_find(c, env->chunk_sum->plan_id);

                if (s)
                        transfer_chunk_sum(s->t, from, env->chunk_sum->index, env->chunk_sum->xxh3);
                break;
        }
        case WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_DONE:
                handle_done(c, from, env->done);
                break;
        case WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_FETCH:
                handle_fetch(c, from, env->fetch);
                break;
        case WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_ABORT:
                handle_abort(c, from, env->abort);
                break;
        case WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_GONE:
                handle_gone(c, from, env->gone);
                break;
        case WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_LANE_DOWN: {
                Slot *s = slot_find(c, env->lane_down->plan_id);
                char why[256];

                /* The peer's words, escaped for the log. */
                wd_escape(why, sizeof(why), env->lane_down->message ? env->lane_down->message : "", 200);
                if (s)
                        lanes_lane_down(c->lanes, s->t, from, *why ? why : "a rank ended the lane");
                break;
        }
        case WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_PROGRESS:
                handle_progress(c, from, env->progress);
                break;
        default:
                log_debug("%s sent a message this node does not know (%d), ignoring", mesh_node_name(c->mesh, from),
                          (int) env->body_case);
                break;
        }
}

static void local_timer_fire(uv_timer_t *timer) {
        Cluster *c = timer->data;

        while (c->local_head) {
                LocalMessage *m = c->local_head;
                ClusterEnvelope *env;

                c->local_head = m->next;
                if (!c->local_head)
                        c->local_tail = NULL;
                env = weightd__cluster__v1__envelope__unpack(NULL, m->len, m->buf);
                if (env) {
                        dispatch(c, mesh_self(c->mesh), env);
                        weightd__cluster__v1__envelope__free_unpacked(env, NULL);
                }
                free(m->buf);
                free(m);
        }
}

static void on_mesh_message(Mesh *m, unsigned node, const ClusterEnvelope *env, void *userdata) {
        dispatch(userdata, node, env);
}

/* Each link to a node gets the address of a worker of its own: what a
 * connection leaves in UCX goes with it. */
static int on_mesh_hello_address(Mesh *m, unsigned node, const void **ret, size_t *ret_len, WdError *err,
                                 void *userdata) {
        Cluster *c = userdata;

        return dataplane_address(c->data, node, ret, ret_len, err);
}

static void on_mesh_up(Mesh *m, unsigned node, uint64_t generation, const void *addr, size_t len, void *userdata) {
        Cluster *c = userdata;
        WdError err = WD_ERROR_NULL;
        int r;

        r = dataplane_connect(c->data, node, addr, len, &err);
        if (r != 0) {
                log_warning("node %s: no data plane: %s", mesh_node_name(m, node), err.message);
                return;
        }
        c->node_generation[node] = generation;
        log_info("node %s is up (generation %016" PRIx64 ")", mesh_node_name(m, node), generation);
}

static void on_mesh_down(Mesh *m, unsigned node, uint64_t generation, const char *why, void *userdata) {
        Cluster *c = userdata;

        log_warning("node %s is down: %s", mesh_node_name(m, node), why);
        c->node_generation[node] = 0;
        lanes_node_down(c->lanes, node);
        dataplane_disconnect(c->data, node);
        for (Slot *s = c->slots, *next; s; s = next) {
                /* An abort may finish the transfer and free its slot. */
                Transfer *t = transfer_ref(s->t);

                next = s->slots_next;
                if (!transfer_started(t) && s->coordinator == (int) node)
                        transfer_abort(t, "the coordinator went down");
                else
                        transfer_node_down(t, node);
                transfer_unref(t);
        }
        for (Coord *co = c->coords, *next; co; co = next) {
                Target *t = coord_target(co, node);

                next = co->coords_next;
                if (t && !target_final(t)) {
                        t->state = TARGET_DOWN;
                        snprintf(t->message, sizeof(t->message), "went down: %s", why);
                }
                if (co->started)
                        coord_maybe_finish(co);
                else
                        coord_maybe_start(co);
        }
        for (Ask *a = c->asks, *next; a; a = next) {
                next = a->asks_next;
                if (a->coordinator == (int) node)
                        ask_retry(a, "the coordinator went down");
        }
}

/* Every deadline/4: transfers look for stalled sources, coordinators for
 * proposals nobody answered. */
static void on_tick(uv_timer_t *timer) {
        Cluster *c = timer->data;
        uint64_t now = now_usec();

        for (Slot *s = c->slots, *next; s; s = next) {
                /* Either may finish the transfer and free its slot. */
                Transfer *t = transfer_ref(s->t);

                next = s->slots_next;
                /* Asked to take part and never started: the coordinator
                 * gave up on us (a Start comes within about 1.25
                 * deadlines of the Propose).  It hears Done. */
                if (!transfer_started(t) && s->coordinator >= 0 && now - s->since_usec > 2 * c->deadline_usec) {
                        if (slot_set_tell(s, NULL, 0, NULL, 0) == 0)
                                transfer_abort(t, "no Start within twice the deadline");
                } else
                        transfer_tick(t);
                transfer_unref(t);
        }
        for (Coord *co = c->coords, *next; co; co = next) {
                next = co->coords_next;
                if (!co->started && now > co->propose_deadline_usec)
                        coord_start(co);
        }
        check_liveness(c, now);
}

static void *on_incoming(DataPlane *d, const void *hdr, size_t hdr_len, uint64_t length, void **ret_token,
                         void *userdata) {
        Cluster *c = userdata;
        TransferChunkHeader h;
        Slot *s;

        if (hdr_len == sizeof(CollHostHeader)) {
                /* A GPU lane's broadcast, on emulated GPUs. */
                CollHostHeader ch;
                void *dst;

                memcpy(&ch, hdr, sizeof(ch));
                if (ch.sender >= c->n_nodes || ch.generation == 0 || c->node_generation[ch.sender] != ch.generation)
                        return NULL;
                dst = lanes_incoming(c->lanes, &ch, length, ret_token);
                /* Its tokens are told apart from transfers' by the low bit. */
                if (dst)
                        *ret_token = (void *) ((uintptr_t) *ret_token | 1u);
                return dst;
        }
        if (hdr_len != sizeof(h))
                return NULL;
        memcpy(&h, hdr, sizeof(h));
        if (h.sender >= c->n_nodes || h.generation == 0 || c->node_generation[h.sender] != h.generation)
                return NULL; /* an old generation's, or nobody's */
        s = slot_find(c, h.plan_id);
        if (!s)
                return NULL;
        return transfer_incoming(s->t, &h, length, ret_token);
}

static void on_received(DataPlane *d, void *token, int status, void *userdata) {
        if ((uintptr_t) token & 1u)
                lanes_received((void *) ((uintptr_t) token & ~(uintptr_t) 1u), status);
        else
                transfer_received(token, status);
}

static const MeshOps mesh_ops = {
        .up = on_mesh_up,
        .down = on_mesh_down,
        .message = on_mesh_message,
        .hello_address = on_mesh_hello_address,
};

static const DataPlaneOps data_ops = {
        .incoming = on_incoming,
        .received = on_received,
};

/* ---- life --------------------------------------------------------------- */

static void free_config(Cluster *c) {
        for (size_t i = 0; i < c->n_nodes; i++) {
                free((char *) c->nodes[i].name);
                free((char *) c->nodes[i].host);
        }
        free(c->nodes);
        c->nodes = NULL;
        c->n_nodes = 0;
        if (c->secret)
                explicit_bzero(c->secret, c->secret_len);
        free(c->secret);
        c->secret = NULL;
        free(c->self_name);
        c->self_name = NULL;
}

static int copy_config(Cluster *c, const ClusterParams *p) {
        c->self_name = strdup(p->self);
        c->nodes = calloc(p->n_nodes + 1, sizeof(MeshNodeSpec));
        c->secret = malloc(p->secret_len + 1);
        if (!c->self_name || !c->nodes || !c->secret)
                return -ENOMEM;
        memcpy(c->secret, p->secret, p->secret_len);
        c->secret_len = p->secret_len;
        for (size_t i = 0; i < p->n_nodes; i++) {
                c->nodes[i].name = strdup(p->nodes[i].name);
                c->nodes[i].host = strdup(p->nodes[i].host);
                c->nodes[i].port = p->nodes[i].port;
                c->n_nodes++;
                if (!c->nodes[i].name || !c->nodes[i].host)
                        return -ENOMEM;
        }
        c->deadline_usec = p->deadline_usec;
        c->peer_fetch = p->peer_fetch;
        c->chunk_size = p->chunk_size;
        c->gpu_transport = p->gpu_transport;
        return 0;
}

static int mesh_start(Cluster *c, WdError *err) {
        MeshParams mp;
        int r;

        free(c->node_generation);
        free(c->node_sent);
        free(c->node_received);
        if (c->node_mismatch)
                for (size_t i = 0; i < c->n_nodes; i++)
                        free(c->node_mismatch[i]);
        free(c->node_mismatch);
        c->node_generation = calloc(c->n_nodes, sizeof(uint64_t));
        c->node_sent = calloc(c->n_nodes, sizeof(uint64_t));
        c->node_received = calloc(c->n_nodes, sizeof(uint64_t));
        c->node_mismatch = calloc(c->n_nodes, sizeof(char *));
        if (!c->node_generation || !c->node_sent || !c->node_received || !c->node_mismatch)
                return wd_error_set(err, -ENOMEM, "out of memory");
        mp = (MeshParams){
                .self = c->self_name,
                .nodes = c->nodes,
                .n_nodes = c->n_nodes,
                .secret = c->secret,
                .secret_len = c->secret_len,
                .deadline_usec = c->deadline_usec,
                .generation = c->generation,
        };
        r = mesh_new(&c->mesh, c->loop, &mp, &mesh_ops, c, err);
        if (r != 0)
                return r;
        c->tctx = (TransferContext){
                .store = c->store,
                .mesh = c->mesh,
                .data = c->data,
                .deadline_usec = c->deadline_usec,
                .generation = c->generation,
                .node_sent = c->node_sent,
                .node_received = c->node_received,
                .corrupt_every = c->tctx.corrupt_every,
                .finished = on_transfer_finished,
                .complete = on_transfer_complete,
                .source_gone = on_source_gone,
                .userdata = c,
        };
        return 0;
}

/* End everything that runs over the mesh: transfers abort (receivers fail
 * CANCELLED: their memory goes back), coordinated plans and asks end. */
static void stop_all(Cluster *c, const char *why) {
        WdError err = WD_ERROR_NULL;

        /* Copies to devices go on (they are the GPU tier's); nobody hears
         * how they end. */
        for (Slot *s = c->slots, *next; s; s = next) {
                next = s->slots_next;
                if (!s->dev_job)
                        continue;
                job_remove_waiter(&s->dev_wait);
                job_unref(TAKE_PTR(s->dev_job));
                if (s->transfer_finished)
                        slot_free(s);
        }

        for (Slot *s = c->slots, *next; s; s = next) {
                /* The abort may finish the transfer and free its slot. */
                Transfer *t = transfer_ref(s->t);

                next = s->slots_next;
                transfer_abort(t, why);
                transfer_unref(t);
        }
        while (c->coords)
                coord_free(c->coords);
        wd_error_set(&err, -ECANCELED, "the cluster stopped: %s", why);
        while (c->asks)
                ask_finish(c->asks, -ECANCELED, &err, NULL, 0);
        LIST_FOREACH(pendings, p, c->pendings)
                p->c = NULL;
        c->pendings = NULL;
        while (c->watches) {
                Watch *x = c->watches;

                LIST_REMOVE(watches, c->watches, x);
                job_remove_waiter(&x->wait);
                job_unref(x->job);
                free(x);
        }
}

int cluster_new(Cluster **ret, uv_loop_t *loop, Store *store, const ClusterParams *p, const ClusterOps *ops,
                void *userdata, void *closed_userdata, WdError *err) {
        Cluster *c;
        const char *corrupt;
        int r;

        if (p->n_nodes == 0 || p->n_nodes > MESH_MAX_NODES)
                return wd_error_set(err, WD_E_INVALID, "[cluster] nodes: 1..%u nodes", MESH_MAX_NODES);
        c = calloc(1, sizeof(Cluster));
        if (!c)
                return wd_error_set(err, -ENOMEM, "out of memory");
        c->loop = loop;
        c->store = store;
        c->ops = *ops;
        c->userdata = userdata;
        c->closed_userdata = closed_userdata;
        c->generation = random_u64();
        r = copy_config(c, p);
        if (r < 0) {
                free_config(c);
                free(c);
                return wd_error_set(err, r, "out of memory");
        }
        corrupt = getenv("WEIGHTD_TEST_CORRUPT_CHUNKS");
        if (corrupt && *corrupt) {
                uint64_t n = 0;

                if (parse_u64(corrupt, 1, 1u << 20, &n) == 0) {
                        c->tctx.corrupt_every = (unsigned) n;
                        log_warning("WEIGHTD_TEST_CORRUPT_CHUNKS=%" PRIu64 ": every %" PRIu64 "th chunk sent to a "
                                    "node is corrupted (a test of the checksums; never set this in production)",
                                    n, n);
                }
        }
        r = dataplane_new(&c->data, loop, &data_ops, c, err);
        if (r != 0) {
                free_config(c);
                free(c);
                return r;
        }
        uv_timer_init(loop, &c->local_timer);
        uv_timer_init(loop, &c->tick);
        uv_timer_init(loop, &c->progress_timer);
        c->local_timer.data = c;
        c->tick.data = c;
        c->progress_timer.data = c;
        c->open_timers = 3;
        r = mesh_start(c, err);
        if (r == 0 && lanes_new(&c->lanes, loop, c->mesh, c->data, c->generation, c->gpu_transport,
                                c->deadline_usec) < 0)
                r = wd_error_set(err, -ENOMEM, "out of memory");
        if (r != 0) {
                c->ops.closed = NULL; /* a cluster that never was */
                cluster_free(c);
                return r;
        }
        uv_timer_start(&c->tick, on_tick, c->deadline_usec / 4000 + 1, c->deadline_usec / 4000 + 1);
        uv_timer_start(&c->progress_timer, on_progress_timer, CLUSTER_PROGRESS_MSEC, CLUSTER_PROGRESS_MSEC);
        log_info("cluster: node %s of %zu, generation %016" PRIx64 ", deadline %" PRIu64 " ms%s", c->self_name,
                 c->n_nodes, c->generation, c->deadline_usec / 1000, c->peer_fetch ? ", peer fetch" : "");
        *ret = c;
        return 0;
}

static void timer_closed(uv_handle_t *h) {
        Cluster *c = h->data;

        c->open_timers--;
        cluster_maybe_free(c);
}

Cluster *cluster_free(Cluster *c) {
        if (!c)
                return NULL;
        c->closing = true;
        lanes_shutdown(c->lanes);
        stop_all(c, "the daemon stops");
        /* The data plane calls back every send and receive in flight now
         * (the mesh still names the nodes for their logs); transfers drain,
         * those with reads in flight when the reads end. */
        c->data = dataplane_free(c->data);
        c->tctx.data = NULL;
        c->lanes = lanes_free(c->lanes);
        c->mesh = mesh_free(c->mesh);
        c->tctx.mesh = NULL;
        while (c->local_head) {
                LocalMessage *m = c->local_head;

                c->local_head = m->next;
                free(m->buf);
                free(m);
        }
        c->local_tail = NULL;
        if (c->node_mismatch)
                for (size_t i = 0; i < c->n_nodes; i++)
                        free(c->node_mismatch[i]);
        free(c->node_mismatch);
        c->node_mismatch = NULL;
        free(c->node_generation);
        c->node_generation = NULL;
        /* node_sent and node_received stay for transfers still draining. */
        free_config(c);
        uv_close((uv_handle_t *) &c->local_timer, timer_closed);
        uv_close((uv_handle_t *) &c->tick, timer_closed);
        uv_close((uv_handle_t *) &c->progress_timer, timer_closed);
        return NULL;
}

static bool same_mesh(const Cluster *c, const ClusterParams *p) {
        if (!streq(c->self_name, p->self) || c->n_nodes != p->n_nodes || c->deadline_usec != p->deadline_usec ||
            c->secret_len != p->secret_len || memcmp(c->secret, p->secret, p->secret_len) != 0)
                return false;
        for (size_t i = 0; i < p->n_nodes; i++)
                if (!streq(c->nodes[i].name, p->nodes[i].name) || !streq(c->nodes[i].host, p->nodes[i].host) ||
                    c->nodes[i].port != p->nodes[i].port)
                        return false;
        return true;
}

int cluster_reconfigure(Cluster *c, const ClusterParams *p, WdError *err) {
        Cluster old = *c;
        int r;

        if (same_mesh(c, p)) {
                c->peer_fetch = p->peer_fetch;
                c->chunk_size = p->chunk_size;
                c->gpu_transport = p->gpu_transport;
                lanes_set_transport(c->lanes, p->gpu_transport);
                return 0;
        }
        if (p->n_nodes == 0 || p->n_nodes > MESH_MAX_NODES)
                return wd_error_set(err, WD_E_INVALID, "[cluster] nodes: 1..%u nodes", MESH_MAX_NODES);
        log_info("cluster: the nodes, secret or deadline changed; the links start over");
        lanes_shutdown(c->lanes);
        stop_all(c, "the cluster was reconfigured");
        c->mesh = mesh_free(c->mesh);
        /* Transfers in flight on the data plane drain as their peers are
         * disconnected below. */
        for (unsigned i = 0; i < old.n_nodes; i++)
                dataplane_forget(c->data, i);
        c->nodes = NULL;
        c->n_nodes = 0;
        c->secret = NULL;
        c->self_name = NULL;
        c->node_mismatch = NULL;
        c->node_generation = NULL;
        c->node_sent = NULL;
        c->node_received = NULL;
        r = copy_config(c, p);
        if (r == 0)
                r = mesh_start(c, err);
        else
                wd_error_set(err, r, "out of memory");
        if (r == 0) {
                lanes_set_mesh(c->lanes, c->mesh);
                lanes_set_transport(c->lanes, p->gpu_transport);
        }
        /* The old configuration's memory. */
        for (size_t i = 0; i < old.n_nodes; i++) {
                free((char *) old.nodes[i].name);
                free((char *) old.nodes[i].host);
                free(old.node_mismatch ? old.node_mismatch[i] : NULL);
        }
        free(old.nodes);
        free(old.node_mismatch);
        free(old.node_generation);
        free(old.node_sent);
        free(old.node_received);
        if (old.secret)
                explicit_bzero(old.secret, old.secret_len);
        free(old.secret);
        free(old.self_name);
        if (r != 0)
                return r;
        uv_timer_start(&c->tick, on_tick, c->deadline_usec / 4000 + 1, c->deadline_usec / 4000 + 1);
        return 0;
}

void cluster_set_device_tier(Cluster *c, DeviceTier *tier) {
        c->tier = tier;
        lanes_set_gpu(c->lanes, tier ? tier->gpu : NULL);
}

int cluster_get_status(Cluster *c, ClusterStatus *ret) {
        ClusterNodeStatus *nodes = calloc(c->n_nodes + 1, sizeof(ClusterNodeStatus));
        uint64_t sent = 0, received = 0;

        if (!nodes)
                return -ENOMEM;
        for (unsigned i = 0; i < c->n_nodes; i++) {
                MeshNodeInfo info;
                ClusterNodeStatus *n = &nodes[i];
                bool v6 = strchr(c->nodes[i].host, ':') != NULL;

                mesh_node_info(c->mesh, i, &info);
                n->name = c->nodes[i].name;
                snprintf(n->address, sizeof(n->address), v6 ? "[%s]:%u" : "%s:%u", c->nodes[i].host,
                         c->nodes[i].port);
                n->state = mesh_node_state_to_string(info.state);
                n->last_error = info.last_error;
                if (info.state == MESH_NODE_UP && c->node_mismatch[i]) {
                        n->state = "mismatch";
                        n->last_error = c->node_mismatch[i];
                }
                if (info.state == MESH_NODE_SELF && c->node_mismatch[i])
                        n->last_error = c->node_mismatch[i];
                n->generation = info.state == MESH_NODE_SELF ? c->generation : info.generation;
                n->rtt_usec = info.rtt_usec;
                n->sent_bytes = c->node_sent[i];
                n->received_bytes = c->node_received[i];
                n->since_usec = info.since_usec;
                sent += c->node_sent[i];
                received += c->node_received[i];
        }
        *ret = (ClusterStatus){
                .node = c->self_name,
                .generation = c->generation,
                .nodes = nodes,
                .n_nodes = c->n_nodes,
                .peer_sent_bytes = sent,
                .peer_received_bytes = received,
                .storage_saved_bytes = c->storage_saved_bytes,
                .gpu_lane = lanes_describe(c->lanes),
        };
        lanes_bytes(c->lanes, &ret->lane_sent_bytes, &ret->lane_received_bytes);
        return 0;
}
