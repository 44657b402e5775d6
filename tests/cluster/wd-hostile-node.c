/* wd-hostile-node: a cluster node that holds the shared secret and breaks
 * the node protocol on purpose, for tests/cluster/test_hostile.py.
 *
 * It joins the cluster as a configured node with the daemon's own mesh
 * (TLS-PSK links, Hello, heartbeats) and data plane (UCX), waits until its
 * targets are up, runs one scenario and exits 0 once the scenario ran.  It
 * does not judge the daemons: the test does, by their bytes, their state and
 * their resources.
 *
 * Scenarios:
 *   garbage       every message type with hostile fields
 *   garbage-parts part plans with hostile parts (Propose and PlanRequest);
 *                 each reply to them printed: "NODE: part reply STATUS WHY"
 *   garbage-lane  plans of --model whose Starts offer hostile GPU lanes (an
 *                 id of the wrong size, ranks that are no nodes, repeated,
 *                 too many, a lane the target cannot join, a device out of
 *                 range), each proposed again until READY (the test evicts
 *                 meanwhile), then LaneDowns for plans that do not exist and
 *                 with hostile words; each LaneDown a target sends printed:
 *                 "NODE: lane down PLAN WHY"
 *   flood         --count PlanRequests, Proposes and Fetches at once
 *   lie-bytes     coordinates a real plan of --model and is one of its
 *                 sources: right checksums, wrong bytes
 *   lie-sums      ... right bytes, wrong checksums
 *   lie-index     ... wrong bytes with right checksums for chunks others own,
 *                 and chunk headers with indexes and lengths out of range
 *   lie-sender    ... wrong bytes under another node's sender index and
 *                 generation
 *   lie-generation ... wrong bytes under an old generation of its own, and
 *                 nobody's sender index; then its share honestly
 *   stall         ... says it is a source, then sends nothing
 *   unstarted     proposes a plan of --model and never starts it
 *   participate   answers every Propose READY and every Start with nothing,
 *                 every PlanRequest with an error
 *
 * After the scenario it prints "ready" on stdout, stays --linger seconds (or
 * until SIGTERM) answering as the scenario says, prints "done" and exits.
 *
 *   wd-hostile-node --node x --nodes "a=10.77.0.1:7470, ..." --secret-file F
 *       --targets a,b --scenario NAME [--root DIR --model DIR] [--count N]
 *       [--deadline-ms MS] [--linger SECONDS] */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>
#include <xxhash.h>

#include "cluster/dataplane.h"
#include "cluster/fetch.h"
#include "cluster/mesh.h"
#include "cluster/plan.h"
#include "server/roots.h"
#include "util/log.h"
#include "util/parse-util.h"
#include "util/time-util.h"

#define MAX_NODES 64u
#define MAX_IN_FLIGHT 8u
#define CHUNK_SIZE (4ull << 20)
#define USEC_PER_SEC 1000000ull

typedef struct Item {
        size_t chunk;
        unsigned peer;     /* mesh index of the receiver */
        unsigned sender;   /* the header's sender */
        uint64_t generation;
        uint32_t index;    /* the header's index */
        uint64_t length;   /* the payload's length */
        bool corrupt;
} Item;

typedef struct Send {
        DataPlaneSend send;
        void *buf;
        struct Hostile *h;
} Send;

typedef struct Hostile {
        uv_loop_t *loop;
        Mesh *mesh;
        DataPlane *data;
        uv_timer_t timer;
        uv_signal_t sigterm;
        const char *scenario;
        uint64_t deadline_usec, generation, linger_usec;
        unsigned count;
        unsigned self;
        unsigned targets[MAX_NODES];
        size_t n_targets;
        uint64_t node_generation[MAX_NODES];
        bool data_connected[MAX_NODES];

        /* --model */
        Roots *roots;
        Component *comp;
        PlanManifest manifest;
        PlanFileView *views;
        PlanChunk *chunks;
        size_t n_chunks;

        /* Our own plan. */
        uint64_t plan_id;
        int reply[MAX_NODES]; /* ProposeStatus, -1 before */
        bool done[MAX_NODES];
        unsigned sources[MAX_NODES];
        size_t n_sources;
        unsigned receivers[MAX_NODES];
        size_t n_receivers;
        unsigned *owner;

        Item *items;
        size_t n_items, next_item;
        unsigned in_flight;

        enum { WAIT_UP, BAD_PROPOSED, BAD_STARTED, WAIT_REPLIES, SENDING, WAIT_DONE, LINGER, STOPPING } phase;
        unsigned variant;
        uint64_t phase_usec;
        unsigned messages_sent, messages_received;
} Hostile;

static bool streq(const char *a, const char *b) {
        return strcmp(a, b) == 0;
}

static uint64_t random_u64(void) {
        uint64_t v = 0;

        while (v == 0)
                if (getrandom(&v, sizeof(v), 0) != sizeof(v))
                        v = now_usec();
        return v;
}

static bool is_lie(const Hostile *h) {
        return strncmp(h->scenario, "lie-", 4) == 0 || streq(h->scenario, "stall");
}

static void set_phase(Hostile *h, int phase) {
        h->phase = phase;
        h->phase_usec = now_usec();
}

/* ---- sending messages --------------------------------------------------- */

#define ENVELOPE(var, field, FIELD, msg)                                                                      \
        ClusterEnvelope var = WEIGHTD__CLUSTER__V1__ENVELOPE__INIT;                                           \
        var.body_case = WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_##FIELD;                                         \
        var.field = (msg)

static void send_env(Hostile *h, unsigned node, const ClusterEnvelope *env) {
        int r = mesh_send(h->mesh, node, env);

        if (r < 0)
                fprintf(stderr, "send to %s: %s\n", mesh_node_name(h->mesh, node), strerror(-r));
        else
                h->messages_sent++;
}

typedef struct Views {
        Weightd__Cluster__V1__FileView *msgs;
        Weightd__Cluster__V1__FileView **ptrs;
        size_t n;
} Views;

static void views_wire(const Hostile *h, Views *ret) {
        size_t n = h->comp ? h->comp->n_files : 0;

        ret->msgs = calloc(n + 1, sizeof(*ret->msgs));
        ret->ptrs = calloc(n + 1, sizeof(*ret->ptrs));
        if (!ret->msgs || !ret->ptrs)
                abort();
        for (size_t i = 0; i < n; i++) {
                weightd__cluster__v1__file_view__init(&ret->msgs[i]);
                ret->msgs[i].path = (char *) h->views[i].path;
                ret->msgs[i].size = h->views[i].size;
                ret->msgs[i].mtime_sec = h->views[i].mtime_sec;
                ret->msgs[i].mtime_nsec = h->views[i].mtime_nsec;
                ret->msgs[i].header_xxh3.data = (uint8_t *) h->views[i].header;
                ret->msgs[i].header_xxh3.len = sizeof(h->views[i].header);
                ret->ptrs[i] = &ret->msgs[i];
        }
        ret->n = n;
}

static void views_done(Views *v) {
        free(v->msgs);
        free(v->ptrs);
}

static const char *model_key(const Hostile *h) {
        return h->comp ? h->comp->model : "/nonexistent/model";
}

static void plan_request(Hostile *h, unsigned node, uint64_t request_id, const char *model, const void *manifest,
                         size_t manifest_len, char **nodes, size_t n_nodes, bool with_views) {
        Weightd__Cluster__V1__PlanRequest pr = WEIGHTD__CLUSTER__V1__PLAN_REQUEST__INIT;
        Views v = {};

        pr.request_id = request_id;
        pr.model = (char *) model;
        pr.component = (char *) "";
        pr.manifest.data = (uint8_t *) manifest;
        pr.manifest.len = manifest_len;
        pr.nodes = nodes;
        pr.n_nodes = n_nodes;
        if (with_views) {
                views_wire(h, &v);
                pr.files = v.ptrs;
                pr.n_files = v.n;
        }
        ENVELOPE(env, plan_request, PLAN_REQUEST, &pr);
        send_env(h, node, &env);
        views_done(&v);
}

static void propose(Hostile *h, unsigned node, uint64_t plan_id, const char *model, const void *manifest,
                    size_t manifest_len, uint64_t chunk_size) {
        Weightd__Cluster__V1__Propose p = WEIGHTD__CLUSTER__V1__PROPOSE__INIT;
        Views v = {};

        views_wire(h, &v);
        p.plan_id = plan_id;
        p.model = (char *) model;
        p.component = (char *) "";
        p.manifest.data = (uint8_t *) manifest;
        p.manifest.len = manifest_len;
        p.chunk_size = chunk_size;
        p.files = v.ptrs;
        p.n_files = v.n;
        ENVELOPE(env, propose, PROPOSE, &p);
        send_env(h, node, &env);
        views_done(&v);
}

/* A Propose (or, with request, a PlanRequest) of a part plan whose parts
 * are n copies of part with node names from names (cycled). */
static void propose_parts(Hostile *h, unsigned node, uint64_t id, bool request, const char *model,
                          const void *manifest, const Weightd__Cluster__V1__NodePart *part, char **names,
                          size_t n_names, size_t n, bool on_device, uint32_t device) {
        Weightd__Cluster__V1__NodePart *parts = calloc(n + 1, sizeof(*parts));
        Weightd__Cluster__V1__NodePart **ptrs = calloc(n + 1, sizeof(*ptrs));
        Views v = {};

        if (!parts || !ptrs)
                abort();
        for (size_t i = 0; i < n; i++) {
                parts[i] = *part;
                parts[i].node = names[i % n_names];
                ptrs[i] = &parts[i];
        }
        views_wire(h, &v);
        if (request) {
                Weightd__Cluster__V1__PlanRequest pr = WEIGHTD__CLUSTER__V1__PLAN_REQUEST__INIT;

                pr.request_id = id;
                pr.model = (char *) model;
                pr.component = (char *) "";
                pr.manifest.data = (uint8_t *) manifest;
                pr.manifest.len = PLAN_MANIFEST_SIZE;
                pr.files = v.ptrs;
                pr.n_files = v.n;
                pr.parts = ptrs;
                pr.n_parts = n;
                pr.on_device = on_device;
                pr.device = device;
                ENVELOPE(env, plan_request, PLAN_REQUEST, &pr);
                send_env(h, node, &env);
        } else {
                Weightd__Cluster__V1__Propose p = WEIGHTD__CLUSTER__V1__PROPOSE__INIT;

                p.plan_id = id;
                p.model = (char *) model;
                p.component = (char *) "";
                p.manifest.data = (uint8_t *) manifest;
                p.manifest.len = PLAN_MANIFEST_SIZE;
                p.chunk_size = CHUNK_SIZE;
                p.files = v.ptrs;
                p.n_files = v.n;
                p.parts = ptrs;
                p.n_parts = n;
                p.on_device = on_device;
                p.device = device;
                ENVELOPE(env, propose, PROPOSE, &p);
                send_env(h, node, &env);
        }
        views_done(&v);
        free(parts);
        free(ptrs);
}

/* Malformed parts of part plans: refused (FAILED, or a PlanResult with
 * the error), nothing read or reserved, the node unharmed. */
static void garbage_parts(Hostile *h, unsigned n, const char *model, const uint8_t *right) {
        Weightd__Cluster__V1__NodePart part = WEIGHTD__CLUSTER__V1__NODE_PART__INIT;
        Weightd__Cluster__V1__PartRule rule = WEIGHTD__CLUSTER__V1__PART_RULE__INIT, nul = rule;
        Weightd__Cluster__V1__PartRule *rules[SHARD_MAX_RULES + 2];
        char *both[] = { (char *) mesh_node_name(h->mesh, n), (char *) mesh_node_name(h->mesh, h->self) };
        char *nosuch[] = { (char *) "nosuch" };
        char *stars = (char *) "*a*b*c*d*e*f", *tensors[3] = { (char *) "*", (char *) "", (char *) "x" };
        char *many_tensors[SHARD_MAX_TENSOR_PATTERNS + 1];
        uint64_t id = 300;

        rule.pattern = (char *) "*";
        rule.dim = 0;
        nul.pattern = (char *) ""; /* the wire has no NULL strings: empty */
        for (size_t i = 0; i < SHARD_MAX_RULES + 2; i++)
                rules[i] = &rule;
        for (size_t i = 0; i < SHARD_MAX_TENSOR_PATTERNS + 1; i++)
                many_tensors[i] = (char *) "layers.*";
        part.sharded = true;
        part.rank = 0;
        part.world = 2;
        part.rules = rules;
        part.n_rules = 1;

        for (int request = 0; request < 2; request++) {
                /* Unknown nodes, a node twice, more than 64 parts, the target left out. */
                propose_parts(h, n, id++, request, model, right, &part, nosuch, 1, 1, false, 0);
                propose_parts(h, n, id++, request, model, right, &part, both, 1, 2, false, 0);
                propose_parts(h, n, id++, request, model, right, &part, both, 2, PLAN_MAX_SOURCES + 1, false, 0);
                propose_parts(h, n, id++, request, model, right, &part, both + 1, 1, 1, false, 0);
                /* Out of limits: world 0, rank beyond, too many rules, bad patterns, dims. */
                part.world = 0;
                propose_parts(h, n, id++, request, model, right, &part, both, 2, 2, false, 0);
                part.world = 2;
                part.rank = 7;
                propose_parts(h, n, id++, request, model, right, &part, both, 2, 2, false, 0);
                part.rank = 0;
                part.n_rules = SHARD_MAX_RULES + 1;
                propose_parts(h, n, id++, request, model, right, &part, both, 2, 2, false, 0);
                part.n_rules = 1;
                rules[0] = &nul;
                propose_parts(h, n, id++, request, model, right, &part, both, 2, 2, false, 0);
                rule.pattern = stars;
                rules[0] = &rule;
                propose_parts(h, n, id++, request, model, right, &part, both, 2, 2, false, 0);
                rule.pattern = (char *) "*";
                rule.dim = 7;
                propose_parts(h, n, id++, request, model, right, &part, both, 2, 2, false, 0);
                rule.dim = 0;
                part.tensors = tensors;
                part.n_tensors = 3; /* an empty pattern */
                propose_parts(h, n, id++, request, model, right, &part, both, 2, 2, false, 0);
                part.tensors = many_tensors;
                part.n_tensors = SHARD_MAX_TENSOR_PATTERNS + 1;
                propose_parts(h, n, id++, request, model, right, &part, both, 2, 2, false, 0);
                /* Well formed, but the component does not fit: every
                 * tensor split along a dimension most do not have. */
                part.tensors = NULL;
                part.n_tensors = 0;
                rule.dim = 1;
                propose_parts(h, n, id++, request, model, right, &part, both, 2, 2, false, 0);
                rule.dim = 0;
                /* A device nobody has. */
                propose_parts(h, n, id++, request, model, right, &part, both, 2, 2, true, 4000000000u);
        }
}

static void start(Hostile *h, unsigned node, uint64_t plan_id, char **sources, size_t n_sources, char **receivers,
                  size_t n_receivers) {
        Weightd__Cluster__V1__Start st = WEIGHTD__CLUSTER__V1__START__INIT;

        st.plan_id = plan_id;
        st.sources = sources;
        st.n_sources = n_sources;
        st.receivers = receivers;
        st.n_receivers = n_receivers;
        ENVELOPE(env, start, START, &st);
        send_env(h, node, &env);
}

static void chunk_sum(Hostile *h, unsigned node, uint64_t plan_id, uint32_t index, uint64_t xxh3) {
        Weightd__Cluster__V1__ChunkSum s = WEIGHTD__CLUSTER__V1__CHUNK_SUM__INIT;

        s.plan_id = plan_id;
        s.index = index;
        s.xxh3 = xxh3;
        ENVELOPE(env, chunk_sum, CHUNK_SUM, &s);
        send_env(h, node, &env);
}

static void fetch(Hostile *h, unsigned node, uint64_t plan_id, const char *model, const void *manifest,
                  size_t manifest_len, uint64_t chunk_size, char **holders, size_t n_holders) {
        Weightd__Cluster__V1__Fetch f = WEIGHTD__CLUSTER__V1__FETCH__INIT;

        f.plan_id = plan_id;
        f.model = (char *) model;
        f.component = (char *) "";
        f.manifest.data = (uint8_t *) manifest;
        f.manifest.len = manifest_len;
        f.chunk_size = chunk_size;
        f.holders = holders;
        f.n_holders = n_holders;
        ENVELOPE(env, fetch, FETCH, &f);
        send_env(h, node, &env);
}

static void done(Hostile *h, unsigned node, uint64_t plan_id, int code) {
        Weightd__Cluster__V1__Done d = WEIGHTD__CLUSTER__V1__DONE__INIT;

        d.plan_id = plan_id;
        d.code = code;
        d.message = (char *) "hostile";
        d.storage_read_bytes = UINT64_MAX;
        d.peer_received_bytes = UINT64_MAX;
        d.peer_sent_bytes = UINT64_MAX;
        ENVELOPE(env, done, DONE, &d);
        send_env(h, node, &env);
}

static void abort_plan(Hostile *h, unsigned node, uint64_t plan_id) {
        Weightd__Cluster__V1__Abort a = WEIGHTD__CLUSTER__V1__ABORT__INIT;

        a.plan_id = plan_id;
        a.message = (char *) "hostile abort";
        ENVELOPE(env, abort, ABORT, &a);
        send_env(h, node, &env);
}

static void gone(Hostile *h, unsigned node, uint64_t plan_id, const char *name) {
        Weightd__Cluster__V1__Gone g = WEIGHTD__CLUSTER__V1__GONE__INIT;

        g.plan_id = plan_id;
        g.node = (char *) name;
        ENVELOPE(env, gone, GONE, &g);
        send_env(h, node, &env);
}

static void plan_result(Hostile *h, unsigned node, uint64_t request_id, int code, size_t n_nodes) {
        Weightd__Cluster__V1__PlanResult res = WEIGHTD__CLUSTER__V1__PLAN_RESULT__INIT;
        Weightd__Cluster__V1__NodeResult *nr = calloc(n_nodes + 1, sizeof(*nr));
        Weightd__Cluster__V1__NodeResult **nrp = calloc(n_nodes + 1, sizeof(*nrp));

        if (!nr || !nrp)
                abort();
        for (size_t i = 0; i < n_nodes; i++) {
                weightd__cluster__v1__node_result__init(&nr[i]);
                nr[i].node = (char *) mesh_node_name(h->mesh, (unsigned) (i % mesh_n_nodes(h->mesh)));
                nr[i].state = (char *) (i % 2 ? "mismatch" : "ok");
                nr[i].message = (char *) "hostile";
                nrp[i] = &nr[i];
        }
        res.request_id = request_id;
        res.code = code;
        res.message = (char *) "hostile";
        res.nodes = nrp;
        res.n_nodes = n_nodes;
        ENVELOPE(env, plan_result, PLAN_RESULT, &res);
        send_env(h, node, &env);
        free(nr);
        free(nrp);
}

/* ---- garbage -------------------------------------------------------------- */

static char *repeat(char c, size_t n, const char *prefix) {
        size_t p = strlen(prefix);
        char *s = malloc(p + n + 1);

        if (!s)
                abort();
        memcpy(s, prefix, p);
        memset(s + p, c, n);
        s[p + n] = 0;
        return s;
}

static void scenario_garbage(Hostile *h) {
        static const uint8_t zero[PLAN_MANIFEST_SIZE], big[4096];
        const uint8_t *right = h->manifest.bytes;
        const char *model = model_key(h);
        char *huge = repeat('m', 1u << 20, "/");
        char *deep = repeat('/', 8192, "");
        char dotdot[PATH_MAX], sibling[PATH_MAX];
        char *nosuch[] = { (char *) "nosuch", (char *) "", (char *) "zz" };
        char *self_only[] = { (char *) mesh_node_name(h->mesh, h->self) };
        size_t n_many = 5000;
        char **many = calloc(n_many, sizeof(char *));
        char *many_names = calloc(n_many, 16);

        if (!many || !many_names)
                abort();
        for (size_t i = 0; i < n_many; i++) {
                snprintf(many_names + 16 * i, 16, "%s%zu", i % 3 ? "n" : "", i);
                many[i] = i % 7 == 0 ? (char *) mesh_node_name(h->mesh, h->targets[0]) : many_names + 16 * i;
        }
        snprintf(dotdot, sizeof(dotdot), "%s/../../../../etc", model);
        snprintf(sibling, sizeof(sibling), "%s/..", model);

        for (size_t t = 0; t < h->n_targets; t++) {
                unsigned n = h->targets[t];
                const char *tname = mesh_node_name(h->mesh, n);

                /* PlanRequest */
                plan_request(h, n, 1, model, right, 3, NULL, 0, true);
                plan_request(h, n, 2, model, big, sizeof(big), NULL, 0, true);
                plan_request(h, n, 3, "", zero, sizeof(zero), NULL, 0, false);
                plan_request(h, n, 4, huge, zero, sizeof(zero), NULL, 0, false);
                plan_request(h, n, 5, deep, zero, sizeof(zero), NULL, 0, false);
                plan_request(h, n, 6, dotdot, zero, sizeof(zero), NULL, 0, false);
                plan_request(h, n, 7, sibling, zero, sizeof(zero), NULL, 0, false);
                plan_request(h, n, 8, "/etc", zero, sizeof(zero), NULL, 0, false);
                plan_request(h, n, 9, "relative/path", zero, sizeof(zero), NULL, 0, false);
                plan_request(h, n, 10, model, right, sizeof(zero), nosuch, 3, true);
                plan_request(h, n, 11, model, right, sizeof(zero), many, n_many, true);
                plan_request(h, n, 12, "/nonexistent", zero, sizeof(zero), self_only, 1, false);
                plan_request(h, n, 13, model, right, sizeof(zero), self_only, 1, true);

                /* Propose: malformed, then for models nobody can resolve. */
                propose(h, n, 101, model, right, PLAN_MANIFEST_SIZE, 0);
                propose(h, n, 102, model, right, PLAN_MANIFEST_SIZE, 1);
                propose(h, n, 103, model, right, PLAN_MANIFEST_SIZE, 4097);
                propose(h, n, 104, model, right, PLAN_MANIFEST_SIZE, 1ull << 62);
                propose(h, n, 105, model, right, 15, CHUNK_SIZE);
                propose(h, n, 106, "/nonexistent/model", zero, PLAN_MANIFEST_SIZE, CHUNK_SIZE);
                propose(h, n, 107, dotdot, zero, PLAN_MANIFEST_SIZE, CHUNK_SIZE);
                propose(h, n, 108, huge, zero, PLAN_MANIFEST_SIZE, CHUNK_SIZE);
                propose(h, n, 109, "/proc/self", zero, PLAN_MANIFEST_SIZE, CHUNK_SIZE);

                chunk_sum(h, n, 101, 0, 0);

                /* Done, Abort, Gone, PlanResult for plans that are not ours or
                 * do not exist. */
                for (uint64_t id = 0; id < 4; id++) {
                        done(h, n, id, id % 2 ? -5 : 0);
                        abort_plan(h, n, id);
                        gone(h, n, id, tname);
                        gone(h, n, id, "nosuch");
                        plan_result(h, n, id, (int) id - 2, id * 100);
                }
                plan_result(h, n, 1, 0, 5000);

                /* Fetch: no holders, ten thousand, made-up ones, malformed. */
                fetch(h, n, 201, model, right, PLAN_MANIFEST_SIZE, CHUNK_SIZE, NULL, 0);
                char **holders = calloc(10000, sizeof(char *));
                if (!holders)
                        abort();
                for (size_t i = 0; i < 10000; i++)
                        holders[i] = (char *) tname;
                fetch(h, n, 202, model, right, PLAN_MANIFEST_SIZE, CHUNK_SIZE, holders, 10000);
                fetch(h, n, 203, model, right, PLAN_MANIFEST_SIZE, CHUNK_SIZE, nosuch, 3);
                fetch(h, n, 204, model, right, PLAN_MANIFEST_SIZE, 0, (char **) &tname, 1);
                fetch(h, n, 205, model, right, 2, CHUNK_SIZE, (char **) &tname, 1);
                fetch(h, n, 206, "/etc", zero, PLAN_MANIFEST_SIZE, CHUNK_SIZE, (char **) &tname, 1);
                fetch(h, n, 207, dotdot, zero, PLAN_MANIFEST_SIZE, CHUNK_SIZE, (char **) &tname, 1);
                fetch(h, n, 208, model, zero, PLAN_MANIFEST_SIZE, CHUNK_SIZE, (char **) &tname, 1);
                /* A well-formed fetch, then a malformed one with its id. */
                fetch(h, n, 209, model, right, PLAN_MANIFEST_SIZE, CHUNK_SIZE, (char **) &tname, 1);
                fetch(h, n, 209, model, right, PLAN_MANIFEST_SIZE, 0, (char **) &tname, 1);
                fetch(h, n, 209, model, right, PLAN_MANIFEST_SIZE, CHUNK_SIZE, nosuch, 3);
                holders[0] = (char *) tname;
                holders[1] = (char *) tname;
                fetch(h, n, 210, model, right, PLAN_MANIFEST_SIZE, CHUNK_SIZE, holders, 2);
                free(holders);

                /* A message kind this node does not know. */
                ClusterEnvelope env = WEIGHTD__CLUSTER__V1__ENVELOPE__INIT;
                send_env(h, n, &env);
        }
        free(huge);
        free(deep);
        free(many);
        free(many_names);
}

/* Plans of ours started the wrong way, one after the other: each must be
 * dropped, so that the next Propose of the same model is READY again (not
 * LOADING behind a transfer that waits forever). */
#define N_BAD_STARTS 5u
#define N_LANE_STARTS 6u

/* A Start naming the target alone as source and receiver (it reads the
 * model itself), with a hostile GPU lane. */
static void lane_start(Hostile *h, unsigned variant) {
        char *self_name = (char *) mesh_node_name(h->mesh, h->self);
        char *nosuch[] = { (char *) "nosuch" };
        char **many = calloc(100, sizeof(char *));
        uint8_t id[128];

        if (!many)
                abort();
        if (getrandom(id, sizeof(id), 0) != sizeof(id))
                abort();
        for (size_t t = 0; t < h->n_targets; t++) {
                unsigned n = h->targets[t];
                char *tname = (char *) mesh_node_name(h->mesh, n);
                char *pair[2] = { n < h->self ? tname : self_name, n < h->self ? self_name : tname };
                char *twice[2] = { tname, tname };
                Weightd__Cluster__V1__Start st = WEIGHTD__CLUSTER__V1__START__INIT;

                for (size_t i = 0; i < 100; i++)
                        many[i] = i % 2 ? tname : self_name;
                st.plan_id = h->plan_id;
                st.sources = &tname;
                st.n_sources = 1;
                st.receivers = &tname;
                st.n_receivers = 1;
                st.lane_id.data = id;
                st.lane_id.len = sizeof(id);
                st.lane_ranks = pair;
                st.n_lane_ranks = 2;
                switch (variant) {
                case 0: /* an id of the wrong size */
                        st.lane_id.len = 5;
                        break;
                case 1: /* a rank that is no node */
                        st.lane_ranks = nosuch;
                        st.n_lane_ranks = 1;
                        break;
                case 2: /* the same rank twice */
                        st.lane_ranks = twice;
                        break;
                case 3: /* more ranks than a plan has */
                        st.lane_ranks = many;
                        st.n_lane_ranks = 100;
                        break;
                case 4: /* a lane of a host plan: the target cannot join it */
                        break;
                case 5: /* a device out of range */
                        st.lane_device = UINT32_MAX;
                        break;
                }
                ENVELOPE(env, start, START, &st);
                send_env(h, n, &env);
        }
        free(many);
        printf("lane start %u sent\n", variant);
        fflush(stdout);
}

/* LaneDowns nobody asked for: unknown plans, the last plan, hostile words. */
static void lane_downs(Hostile *h) {
        static const char words[] = "\033[2J\r\nforged log line\x7f\xff";
        uint64_t plans[3] = { 0, h->plan_id, random_u64() };

        for (size_t t = 0; t < h->n_targets; t++)
                for (size_t i = 0; i < 3; i++)
                        for (int k = 0; k < 3; k++) {
                                Weightd__Cluster__V1__LaneDown ld = WEIGHTD__CLUSTER__V1__LANE_DOWN__INIT;

                                ld.plan_id = plans[i];
                                ld.message = (char *) words;
                                ENVELOPE(env, lane_down, LANE_DOWN, &ld);
                                send_env(h, h->targets[t], &env);
                        }
        printf("lane downs sent\n");
        fflush(stdout);
}

static void bad_start(Hostile *h, unsigned variant) {
        char *self_name = (char *) mesh_node_name(h->mesh, h->self);
        char *nosuch[] = { (char *) "nosuch" };
        char **many = calloc(100, sizeof(char *));

        if (!many)
                abort();
        for (size_t t = 0; t < h->n_targets; t++) {
                unsigned n = h->targets[t];
                char *tname = (char *) mesh_node_name(h->mesh, n);
                char *sources[3] = { tname, tname, self_name }, *receivers[2] = { tname, tname };

                for (size_t i = 0; i < 100; i++)
                        many[i] = i % 2 ? tname : self_name;
                /* Checksums out of range for the plan, before any Start. */
                chunk_sum(h, n, h->plan_id, UINT32_MAX, 1);
                chunk_sum(h, n, h->plan_id, (uint32_t) h->n_chunks, 1);
                switch (variant) {
                case 0: /* a source that is no node */
                        start(h, n, h->plan_id, nosuch, 1, &tname, 1);
                        break;
                case 1: /* left out of its own plan */
                        start(h, n, h->plan_id, &self_name, 1, &self_name, 1);
                        break;
                case 2: /* more sources than a plan has */
                        start(h, n, h->plan_id, many, 100, many, 100);
                        break;
                case 3: /* the same source twice */
                        start(h, n, h->plan_id, sources, 3, receivers, 2);
                        break;
                case 4: /* a receiver that is no node */
                        start(h, n, h->plan_id, &tname, 1, nosuch, 1);
                        break;
                }
                /* Started twice, and a plan that does not exist. */
                start(h, n, h->plan_id, &self_name, 1, &tname, 1);
                start(h, n, h->plan_id ^ 1, &self_name, 1, &tname, 1);
        }
        free(many);
        printf("bad start %u sent\n", variant);
        fflush(stdout);
}

/* ---- flood -------------------------------------------------------------- */

static void scenario_flood(Hostile *h) {
        const char *model = model_key(h);
        const uint8_t *right = h->manifest.bytes;

        for (size_t t = 0; t < h->n_targets; t++) {
                unsigned n = h->targets[t];
                char *tname = (char *) mesh_node_name(h->mesh, n);

                for (unsigned i = 0; i < h->count; i++) {
                        uint8_t other[PLAN_MANIFEST_SIZE];
                        uint64_t id = random_u64();

                        memcpy(other, right, sizeof(other));
                        memcpy(other, &id, sizeof(id));
                        /* Plans of the real model: one that joins, one with a
                         * manifest of its own. */
                        plan_request(h, n, id, model, i % 2 ? right : other, PLAN_MANIFEST_SIZE, NULL, 0, true);
                        propose(h, n, id, model, right, PLAN_MANIFEST_SIZE, CHUNK_SIZE);
                        fetch(h, n, id, model, right, PLAN_MANIFEST_SIZE, CHUNK_SIZE, &tname, 1);
                }
        }
}

/* ---- lying and stalling --------------------------------------------------- */

static void send_done(DataPlaneSend *s, int status) {
        Send *x = container_of(s, Send, send);
        Hostile *h = x->h;

        if (status < 0)
                fprintf(stderr, "a send ended with %s\n", strerror(-status));
        h->in_flight--;
        free(x->buf);
        free(x);
}

static int read_chunk(Hostile *h, size_t c, void *buf) {
        const PlanChunk *pc = &h->chunks[c];
        ssize_t k = pread(h->comp->files[pc->file].fd, buf, pc->length, (off_t) pc->offset);

        return k == (ssize_t) pc->length ? 0 : -EIO;
}

static uint64_t chunk_xxh3(Hostile *h, size_t c) {
        void *buf = malloc(h->chunks[c].length ? h->chunks[c].length : 1);
        uint64_t v;

        if (!buf || read_chunk(h, c, buf) < 0)
                abort();
        v = XXH3_64bits(buf, h->chunks[c].length);
        free(buf);
        return v;
}

static void add_item(Hostile *h, Item it) {
        Item *n = realloc(h->items, (h->n_items + 1) * sizeof(Item));

        if (!n)
                abort();
        h->items = n;
        h->items[h->n_items++] = it;
}

static int source_of(const Hostile *h, unsigned node) {
        for (size_t i = 0; i < h->n_sources; i++)
                if (h->sources[i] == node)
                        return (int) i;
        return -1;
}

/* What to send, after the Start: checksums now, payloads queued. */
static void plan_sends(Hostile *h) {
        int me = source_of(h, h->self);
        const char *s = h->scenario;

        for (size_t c = 0; c < h->n_chunks; c++) {
                bool mine = h->owner[c] == (unsigned) me;
                unsigned owner = h->sources[h->owner[c]];
                uint64_t sum = 0;

                if (streq(s, "stall"))
                        break;
                if (mine || streq(s, "lie-index"))
                        sum = chunk_xxh3(h, c);
                for (size_t k = 0; k < h->n_receivers; k++) {
                        unsigned r = h->receivers[k];
                        Item it = { .chunk = c, .peer = r, .sender = h->self, .generation = h->generation,
                                    .index = (uint32_t) c, .length = h->chunks[c].length };

                        if (streq(s, "lie-bytes") && mine) {
                                chunk_sum(h, r, h->plan_id, (uint32_t) c, sum);
                                it.corrupt = true;
                                add_item(h, it);
                        } else if (streq(s, "lie-sums") && mine) {
                                chunk_sum(h, r, h->plan_id, (uint32_t) c, sum ^ 0x9e3779b97f4a7c15ull);
                                add_item(h, it);
                        } else if (streq(s, "lie-index")) {
                                /* Others' chunks: their right sums, wrong bytes;
                                 * ours honestly. */
                                chunk_sum(h, r, h->plan_id, (uint32_t) c, sum);
                                it.corrupt = !mine;
                                if (owner != r)
                                        add_item(h, it);
                        } else if (streq(s, "lie-sender") && !mine && owner != r) {
                                /* The owner's name on wrong bytes. */
                                it.sender = owner;
                                it.generation = h->node_generation[owner];
                                it.corrupt = true;
                                add_item(h, it);
                        } else if (streq(s, "lie-sender") && mine) {
                                chunk_sum(h, r, h->plan_id, (uint32_t) c, sum);
                                add_item(h, it);
                        } else if (streq(s, "lie-generation") && mine) {
                                Item old = it;

                                old.generation = h->generation ^ 0x5a5a5a5a5a5aull;
                                old.corrupt = true;
                                add_item(h, old);
                                old.generation = 0;
                                add_item(h, old);
                                old.sender = 4000;
                                old.generation = h->generation;
                                add_item(h, old);
                                chunk_sum(h, r, h->plan_id, (uint32_t) c, sum);
                                add_item(h, it);
                        }
                }
        }
        if (streq(s, "lie-index"))
                for (size_t k = 0; k < h->n_receivers; k++) {
                        Item it = { .chunk = 0, .peer = h->receivers[k], .sender = h->self,
                                    .generation = h->generation, .corrupt = true };

                        it.index = (uint32_t) h->n_chunks;
                        it.length = h->chunks[0].length;
                        add_item(h, it);
                        it.index = UINT32_MAX;
                        add_item(h, it);
                        it.index = 0;
                        it.length = h->chunks[0].length + 4096; /* longer than the chunk */
                        add_item(h, it);
                        it.length = 1;
                        add_item(h, it);
                }
}

static void pump_sends(Hostile *h) {
        while (h->in_flight < MAX_IN_FLIGHT && h->next_item < h->n_items) {
                const Item *it = &h->items[h->next_item++];
                Send *x = calloc(1, sizeof(Send));
                uint64_t alloc = it->length > h->chunks[it->chunk].length ? it->length : h->chunks[it->chunk].length;
                TransferChunkHeader hdr = {
                        .plan_id = h->plan_id,
                        .generation = it->generation,
                        .index = it->index,
                        .sender = it->sender,
                };
                int r;

                if (!x || !(x->buf = calloc(1, alloc)))
                        abort();
                if (read_chunk(h, it->chunk, x->buf) < 0)
                        abort();
                if (it->corrupt)
                        for (uint64_t i = 0; i < it->length; i += 4096)
                                ((uint8_t *) x->buf)[i] ^= 0xa5;
                x->h = h;
                x->send.done = send_done;
                r = dataplane_send(h->data, it->peer, &hdr, sizeof(hdr), x->buf, it->length, &x->send);
                if (r < 0) {
                        fprintf(stderr, "dataplane_send: %s\n", strerror(-r));
                        free(x->buf);
                        free(x);
                        continue;
                }
                h->in_flight++;
        }
}

/* Every target answered our Propose: start the plan with us among the
 * sources. */
static void plan_start(Hostile *h) {
        char *sources[MAX_NODES], *receivers[MAX_NODES];

        h->n_sources = h->n_receivers = 0;
        for (unsigned n = 0; n < mesh_n_nodes(h->mesh); n++) {
                int reply = -1;

                if (n == h->self) {
                        h->sources[h->n_sources++] = n;
                        continue;
                }
                for (size_t i = 0; i < h->n_targets; i++)
                        if (h->targets[i] == n)
                                reply = h->reply[n];
                if (reply == WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__READY ||
                    reply == WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__RESIDENT)
                        h->sources[h->n_sources++] = n;
                if (reply == WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__READY)
                        h->receivers[h->n_receivers++] = n;
        }
        for (size_t i = 0; i < h->n_sources; i++)
                sources[i] = (char *) mesh_node_name(h->mesh, h->sources[i]);
        for (size_t i = 0; i < h->n_receivers; i++)
                receivers[i] = (char *) mesh_node_name(h->mesh, h->receivers[i]);
        h->owner = calloc(h->n_chunks + 1, sizeof(unsigned));
        if (!h->owner)
                abort();
        plan_assign(h->chunks, h->n_chunks, h->n_sources, h->owner);
        for (size_t i = 0; i < h->n_sources; i++)
                if (h->sources[i] != h->self)
                        start(h, h->sources[i], h->plan_id, sources, h->n_sources, receivers, h->n_receivers);
        printf("started plan %016" PRIx64 ": %zu sources, %zu receivers\n", h->plan_id, h->n_sources,
               h->n_receivers);
        fflush(stdout);
        plan_sends(h);
        set_phase(h, SENDING);
        pump_sends(h);
}

static void scenario_plan(Hostile *h) {
        h->plan_id = random_u64();
        for (size_t i = 0; i < MAX_NODES; i++)
                h->reply[i] = -1;
        for (size_t i = 0; i < h->n_targets; i++)
                propose(h, h->targets[i], h->plan_id, model_key(h), h->manifest.bytes, PLAN_MANIFEST_SIZE,
                        CHUNK_SIZE);
        set_phase(h, WAIT_REPLIES);
}

/* ---- events ------------------------------------------------------------- */

static void on_up(Mesh *m, unsigned node, uint64_t generation, const void *addr, size_t len, void *userdata) {
        Hostile *h = userdata;
        WdError err = WD_ERROR_NULL;

        if (node >= MAX_NODES)
                return;
        h->node_generation[node] = generation;
        h->data_connected[node] = dataplane_connect(h->data, node, addr, len, &err) == 0;
        if (!h->data_connected[node])
                fprintf(stderr, "no data plane to %s: %s\n", mesh_node_name(m, node), err.message);
}

static void on_down(Mesh *m, unsigned node, uint64_t generation, const char *why, void *userdata) {
        Hostile *h = userdata;

        if (node >= MAX_NODES)
                return;
        fprintf(stderr, "node %s is down: %s\n", mesh_node_name(m, node), why);
        h->node_generation[node] = 0;
        h->data_connected[node] = false;
        dataplane_disconnect(h->data, node);
}

static void on_message(Mesh *m, unsigned node, const ClusterEnvelope *env, void *userdata) {
        Hostile *h = userdata;

        h->messages_received++;
        switch (env->body_case) {
        case WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_PROPOSE_REPLY:
                /* The malformed part plans of garbage_parts(). */
                if (env->propose_reply->plan_id >= 300 && env->propose_reply->plan_id < 400) {
                        printf("%s: part reply %d %s\n", mesh_node_name(m, node), env->propose_reply->status,
                               env->propose_reply->message);
                        fflush(stdout);
                }
                if (env->propose_reply->plan_id == h->plan_id && h->plan_id != 0 && node < MAX_NODES) {
                        h->reply[node] = env->propose_reply->status;
                        printf("%s: propose reply %d %s\n", mesh_node_name(m, node), env->propose_reply->status,
                               env->propose_reply->message);
                        fflush(stdout);
                }
                break;
        case WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_DONE:
                if (env->done->plan_id == h->plan_id && h->plan_id != 0 && node < MAX_NODES && !h->done[node]) {
                        h->done[node] = true;
                        printf("%s: done %d %s\n", mesh_node_name(m, node), env->done->code, env->done->message);
                        fflush(stdout);
                }
                break;
        case WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_LANE_DOWN:
                printf("%s: lane down %016" PRIx64 " %s\n", mesh_node_name(m, node), env->lane_down->plan_id,
                       env->lane_down->message);
                fflush(stdout);
                break;
        case WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_PROPOSE:
                if (streq(h->scenario, "participate")) {
                        Weightd__Cluster__V1__ProposeReply pr = WEIGHTD__CLUSTER__V1__PROPOSE_REPLY__INIT;

                        pr.plan_id = env->propose->plan_id;
                        pr.status = WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__READY;
                        pr.message = (char *) "";
                        ENVELOPE(reply, propose_reply, PROPOSE_REPLY, &pr);
                        send_env(h, node, &reply);
                        printf("said READY to %s\n", mesh_node_name(m, node));
                        fflush(stdout);
                }
                break;
        case WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_PLAN_REQUEST:
                if (streq(h->scenario, "participate")) {
                        printf("asked to coordinate by %s\n", mesh_node_name(m, node));
                        fflush(stdout);
                        plan_result(h, node, env->plan_request->request_id, WD_E_BUSY, 0);
                }
                break;
        default:
                break;
        }
}

static int on_hello_address(Mesh *m, unsigned node, const void **ret, size_t *ret_len, WdError *err,
                            void *userdata) {
        Hostile *h = userdata;

        return dataplane_address(h->data, node, ret, ret_len, err);
}

static const MeshOps mesh_ops = {
        .up = on_up,
        .down = on_down,
        .message = on_message,
        .hello_address = on_hello_address,
};

static void *on_incoming(DataPlane *d, const void *hdr, size_t hdr_len, uint64_t length, void **ret_token,
                         void *userdata) {
        return NULL; /* we want nobody's bytes */
}

static void on_received(DataPlane *d, void *token, int status, void *userdata) {
}

static const DataPlaneOps data_ops = {
        .incoming = on_incoming,
        .received = on_received,
};

static void stop(Hostile *h) {
        if (h->phase == STOPPING)
                return;
        set_phase(h, STOPPING);
        printf("done: %u messages sent, %u received\n", h->messages_sent, h->messages_received);
        fflush(stdout);
        uv_stop(h->loop);
}

static void linger(Hostile *h) {
        printf("ready\n");
        fflush(stdout);
        set_phase(h, LINGER);
}

static bool targets_up(Hostile *h) {
        for (size_t i = 0; i < h->n_targets; i++)
                if (!mesh_node_up(h->mesh, h->targets[i]) || !h->data_connected[h->targets[i]])
                        return false;
        return true;
}

static void on_timer(uv_timer_t *timer) {
        Hostile *h = timer->data;
        uint64_t now = now_usec(), in_phase = now - h->phase_usec;
        bool all;

        switch (h->phase) {
        case WAIT_UP:
                if (in_phase > 60 * USEC_PER_SEC) {
                        fprintf(stderr, "the targets did not come up within 60 s\n");
                        exit(2);
                }
                if (!targets_up(h))
                        return;
                printf("up\n");
                fflush(stdout);
                if (streq(h->scenario, "garbage") || streq(h->scenario, "garbage-lane")) {
                        h->variant = 0;
                        scenario_plan(h);
                        set_phase(h, BAD_PROPOSED);
                } else if (streq(h->scenario, "flood")) {
                        scenario_flood(h);
                        linger(h);
                } else if (streq(h->scenario, "garbage-parts")) {
                        for (size_t t = 0; t < h->n_targets; t++)
                                garbage_parts(h, h->targets[t], model_key(h), h->manifest.bytes);
                        linger(h);
                } else if (is_lie(h) || streq(h->scenario, "unstarted"))
                        scenario_plan(h);
                else
                        linger(h);
                return;
        case BAD_PROPOSED:
                all = true;
                for (size_t i = 0; i < h->n_targets; i++)
                        all = all && h->reply[h->targets[i]] >= 0;
                if (!all && in_phase < 4 * h->deadline_usec)
                        return;
                if (streq(h->scenario, "garbage-lane")) {
                        /* A target that holds it (or loads it) has no
                         * transfer to start: ask again once the test
                         * evicted it. */
                        bool ready = true;

                        for (size_t i = 0; i < h->n_targets; i++)
                                ready = ready && h->reply[h->targets[i]] == WEIGHTD__CLUSTER__V1__PROPOSE_STATUS__READY;
                        if (!ready) {
                                if (in_phase < 200 * 1000)
                                        return;
                                scenario_plan(h);
                                set_phase(h, BAD_PROPOSED);
                                return;
                        }
                        lane_start(h, h->variant);
                } else
                        bad_start(h, h->variant);
                set_phase(h, BAD_STARTED);
                return;
        case BAD_STARTED:
                if (in_phase < 300 * 1000)
                        return;
                if (++h->variant < (streq(h->scenario, "garbage-lane") ? N_LANE_STARTS : N_BAD_STARTS)) {
                        scenario_plan(h);
                        set_phase(h, BAD_PROPOSED);
                        return;
                }
                if (streq(h->scenario, "garbage-lane"))
                        lane_downs(h);
                else
                        scenario_garbage(h);
                linger(h);
                return;
        case WAIT_REPLIES:
                all = true;
                for (size_t i = 0; i < h->n_targets; i++)
                        all = all && h->reply[h->targets[i]] >= 0;
                if (!all && in_phase < 4 * h->deadline_usec)
                        return;
                if (streq(h->scenario, "unstarted"))
                        linger(h); /* READY from both, and never a Start */
                else
                        plan_start(h);
                return;
        case SENDING:
                pump_sends(h);
                if (h->next_item == h->n_items && h->in_flight == 0)
                        set_phase(h, WAIT_DONE);
                return;
        case WAIT_DONE:
                all = true;
                for (size_t i = 0; i < h->n_receivers; i++)
                        all = all && h->done[h->receivers[i]];
                if (all || in_phase > 120 * USEC_PER_SEC)
                        linger(h);
                return;
        case LINGER:
                if (in_phase >= h->linger_usec)
                        stop(h);
                return;
        case STOPPING:
                return;
        }
}

static void on_sigterm(uv_signal_t *s, int signum) {
        stop(s->data);
}

/* ---- set-up --------------------------------------------------------------- */

/* "a=10.77.0.1:7470, b=..." into specs (pointing into s, which is cut). */
static int parse_nodes(char *s, MeshNodeSpec *specs, size_t max, size_t *ret_n) {
        size_t n = 0;

        for (char *save = NULL, *item = strtok_r(s, ", ", &save); item; item = strtok_r(NULL, ", ", &save)) {
                char *eq = strchr(item, '='), *colon = strrchr(item, ':');
                uint64_t port;

                if (!eq || !colon || colon < eq || n >= max)
                        return -EINVAL;
                *eq = *colon = 0;
                if (parse_u64(colon + 1, 1, UINT16_MAX, &port) < 0)
                        return -EINVAL;
                specs[n++] = (MeshNodeSpec){ .name = item, .host = eq + 1, .port = (uint16_t) port };
        }
        *ret_n = n;
        return n > 0 ? 0 : -EINVAL;
}

static int read_secret(const char *path, uint8_t *buf, size_t max, size_t *ret_len) {
        FILE *f = fopen(path, "re");
        size_t n;

        if (!f)
                return -errno;
        n = fread(buf, 1, max, f);
        fclose(f);
        while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' ' || buf[n - 1] == '\t' || buf[n - 1] == '\r'))
                n--;
        *ret_len = n;
        return n > 0 ? 0 : -EINVAL;
}

static int load_model(Hostile *h, char *root, const char *model) {
        WdError err = WD_ERROR_NULL;
        Root *r;
        char *rel = NULL, *key = NULL;
        int k;

        k = roots_new(&h->roots, &root, 1);
        if (k == 0)
                k = roots_resolve(h->roots, model, &r, &rel, &key, &err);
        if (k == 0)
                k = catalog_resolve(r->catalog, rel, "", &h->comp, &err);
        if (k != 0) {
                fprintf(stderr, "%s: %s\n", model, err.message);
                free(rel);
                free(key);
                return k;
        }
        free(h->comp->model);
        h->comp->model = key;
        free(rel);
        if (plan_manifest(h->comp, &h->manifest) < 0 || plan_file_views(h->comp, &h->views) < 0 ||
            plan_chunks(h->comp, CHUNK_SIZE, &h->chunks, &h->n_chunks) < 0)
                return -ENOMEM;
        return 0;
}

static void usage(void) {
        fprintf(stderr, "usage: wd-hostile-node --node NAME --nodes LIST --secret-file FILE --targets A,B "
                        "--scenario NAME [--root DIR --model DIR] [--count N] [--deadline-ms MS] [--linger S]\n");
}

int main(int argc, char **argv) {
        static const struct option options[] = {
                { "node", required_argument, NULL, 'n' },
                { "nodes", required_argument, NULL, 'N' },
                { "secret-file", required_argument, NULL, 's' },
                { "targets", required_argument, NULL, 't' },
                { "scenario", required_argument, NULL, 'S' },
                { "root", required_argument, NULL, 'r' },
                { "model", required_argument, NULL, 'm' },
                { "count", required_argument, NULL, 'c' },
                { "deadline-ms", required_argument, NULL, 'd' },
                { "linger", required_argument, NULL, 'l' },
                {}
        };
        const char *self = NULL, *secret_file = NULL, *model = NULL;
        char *nodes = NULL, *targets = NULL, *root = NULL;
        uint64_t v, deadline_ms = 2000, linger_s = 0, count = 1000;
        MeshNodeSpec specs[MAX_NODES];
        size_t n_specs = 0, secret_len = 0;
        uint8_t secret[4096];
        WdError err = WD_ERROR_NULL;
        Hostile h = { .phase = WAIT_UP };
        uv_loop_t loop;
        int c, r;

        while ((c = getopt_long(argc, argv, "", options, NULL)) >= 0)
                switch (c) {
                case 'n': self = optarg; break;
                case 'N': nodes = optarg; break;
                case 's': secret_file = optarg; break;
                case 't': targets = optarg; break;
                case 'S': h.scenario = optarg; break;
                case 'r': root = optarg; break;
                case 'm': model = optarg; break;
                case 'c':
                case 'd':
                case 'l':
                        if (parse_u64(optarg, 0, 1000000, &v) < 0) {
                                fprintf(stderr, "--%s: \"%s\" is not a number in 0..1000000\n",
                                        c == 'c' ? "count" : c == 'd' ? "deadline-ms" : "linger", optarg);
                                return 1;
                        }
                        *(c == 'c' ? &count : c == 'd' ? &deadline_ms : &linger_s) = v;
                        break;
                default:
                        usage();
                        return 1;
                }
        if (!self || !nodes || !secret_file || !targets || !h.scenario || (model && !root) || deadline_ms < 100) {
                usage();
                return 1;
        }
        if (!streq(h.scenario, "garbage") && !streq(h.scenario, "garbage-parts") &&
            !streq(h.scenario, "garbage-lane") && !streq(h.scenario, "flood") &&
            !is_lie(&h) &&
            !streq(h.scenario, "unstarted") &&
            !streq(h.scenario, "participate")) {
                fprintf(stderr, "unknown scenario \"%s\"\n", h.scenario);
                return 1;
        }
        if (!streq(h.scenario, "participate") && !model) {
                fprintf(stderr, "scenario %s needs --model\n", h.scenario);
                return 1;
        }
        log_set_max_level(LOG_LEVEL_WARNING);
        h.deadline_usec = deadline_ms * 1000;
        h.linger_usec = linger_s * USEC_PER_SEC;
        h.count = (unsigned) count;
        h.generation = random_u64();
        if (parse_nodes(nodes, specs, MAX_NODES, &n_specs) < 0) {
                fprintf(stderr, "--nodes: not NAME=HOST:PORT, ...\n");
                return 1;
        }
        r = read_secret(secret_file, secret, sizeof(secret), &secret_len);
        if (r < 0) {
                fprintf(stderr, "%s: %s\n", secret_file, strerror(-r));
                return 1;
        }
        if (model && load_model(&h, root, model) != 0)
                return 1;

        uv_loop_init(&loop);
        h.loop = &loop;
        r = dataplane_new(&h.data, &loop, &data_ops, &h, &err);
        if (r != 0) {
                fprintf(stderr, "data plane: %s\n", err.message);
                return 1;
        }
        r = mesh_new(&h.mesh, &loop,
                     &(MeshParams){ .self = self, .nodes = specs, .n_nodes = n_specs, .secret = secret,
                                    .secret_len = secret_len, .deadline_usec = h.deadline_usec,
                                    .generation = h.generation },
                     &mesh_ops, &h, &err);
        if (r != 0) {
                fprintf(stderr, "mesh: %s\n", err.message);
                return 1;
        }
        h.self = mesh_self(h.mesh);
        for (char *save = NULL, *t = strtok_r(targets, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
                int k = mesh_find(h.mesh, t);

                if (k < 0 || (unsigned) k == h.self || h.n_targets >= MAX_NODES) {
                        fprintf(stderr, "--targets: \"%s\" is not another node\n", t);
                        return 1;
                }
                h.targets[h.n_targets++] = (unsigned) k;
        }

        uv_timer_init(&loop, &h.timer);
        h.timer.data = &h;
        uv_timer_start(&h.timer, on_timer, 20, 20);
        uv_signal_init(&loop, &h.sigterm);
        h.sigterm.data = &h;
        uv_signal_start(&h.sigterm, on_sigterm, SIGTERM);
        set_phase(&h, WAIT_UP);
        uv_run(&loop, UV_RUN_DEFAULT);

        /* Gone: links close, sends in flight are cancelled. */
        h.data = dataplane_free(h.data);
        h.mesh = mesh_free(h.mesh);
        uv_close((uv_handle_t *) &h.timer, NULL);
        uv_close((uv_handle_t *) &h.sigterm, NULL);
        uv_run(&loop, UV_RUN_DEFAULT);
        (void) uv_loop_close(&loop);
        free(h.items);
        free(h.owner);
        free(h.chunks);
        free(h.views);
        component_free(h.comp);
        roots_unref(h.roots);
        explicit_bzero(secret, sizeof(secret));
        return 0;
}
