/* The cluster's GPU lanes (see lanes.h). */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cluster/lanes.h"
#include "util/list.h"
#include "util/log.h"
#include "util/time-util.h"
#include "macro.h"

/* How often lanes are looked at while one initialises or carries a plan
 * (NCCL's completions are CUDA events, polled). */
#define LANES_POLL_MSEC 1

typedef struct Lane {
        TransferLane tl; /* first: a transfer's ended() finds the lane */
        Lanes *owner;
        uint8_t id[GPU_COLL_ID_BYTES];
        int device;
        GpuSlab *ring;
        uint64_t since_usec;
        Transfer *user;        /* referenced */
        uint64_t offered_plan; /* coordinator: the plan it went to, until it ends (0: none) */
        LIST_FIELDS(struct Lane, lanes);
} Lane;

struct Lanes {
        uv_loop_t *loop;
        Mesh *mesh;
        DataPlane *data;
        uint64_t generation, deadline_usec;
        LanesTransport transport;
        Gpu *gpu;
        GpuColl coll;        /* ops NULL: no backend */
        CollHost *host;      /* the host backend's, kept while any of its communicators lives */
        GpuColl host_coll;   /* its table */
        char describe[sizeof(((WdError *) NULL)->message) + 16];
        Lane *lanes;
        unsigned n_dying;    /* aborted communicators whose gone did not run yet */
        uv_timer_t timer;
        bool timer_running, freeing;
        uint64_t sent_bytes, received_bytes; /* of lanes that ended */
};

static void timer_fire(uv_timer_t *timer);

static void kick(void *userdata) {
        Lanes *l = userdata;

        if (!l->freeing)
                uv_timer_start(&l->timer, timer_fire, 0, LANES_POLL_MSEC);
        l->timer_running = !l->freeing;
}

static void choose_backend(Lanes *l) {
        WdError err = WD_ERROR_NULL;

        if (l->coll.ops)
                return;
        if (l->transport == LANES_TRANSPORT_HOST) {
                snprintf(l->describe, sizeof(l->describe), "off ([cluster] gpu_transport = host)");
                return;
        }
        if (!l->gpu) {
                snprintf(l->describe, sizeof(l->describe), "off (no GPU tier)");
                return;
        }
        if (gpu_emulated()) {
                if (!l->host && coll_host_new(&l->host, l->data, mesh_self(l->mesh), l->generation, kick, l,
                                              &l->host_coll) < 0) {
                        snprintf(l->describe, sizeof(l->describe), "off (out of memory)");
                        return;
                }
                l->coll = l->host_coll;
                snprintf(l->describe, sizeof(l->describe), "host links (emulated GPUs)");
                return;
        }
        if (gpu_coll_nccl_new(&l->coll, &err) < 0) {
                snprintf(l->describe, sizeof(l->describe), "off (%s)", err.message);
                if (l->transport == LANES_TRANSPORT_NCCL)
                        log_warning("cluster: [cluster] gpu_transport = nccl, but %s; device plans move bytes "
                                    "host to host", err.message);
                return;
        }
        snprintf(l->describe, sizeof(l->describe), "nccl %d.%d.%d", l->coll.version / 10000,
                 l->coll.version / 100 % 100, l->coll.version % 100);
}

int lanes_new(Lanes **ret, uv_loop_t *loop, Mesh *mesh, DataPlane *data, uint64_t generation,
              LanesTransport transport, uint64_t deadline_usec) {
        Lanes *l = calloc(1, sizeof(Lanes));

        if (!l)
                return -ENOMEM;
        *l = (Lanes){ .loop = loop, .mesh = mesh, .data = data, .generation = generation, .transport = transport,
                      .deadline_usec = deadline_usec };
        snprintf(l->describe, sizeof(l->describe), "off (no GPU tier)");
        uv_timer_init(loop, &l->timer);
        l->timer.data = l;
        *ret = l;
        return 0;
}

/* ---- a lane's life ------------------------------------------------------ */

static void lane_gone(void *userdata) {
        Lane *lane = userdata;
        Lanes *l = lane->owner;

        gpu_slab_free(lane->ring);
        free(lane);
        l->n_dying--;
}

/* LaneDown for plan_id to the ranks other than this node. */
static void send_lane_down(Lanes *l, uint64_t plan_id, const unsigned *ranks, size_t n, const char *why) {
        Weightd__Cluster__V1__LaneDown ld = WEIGHTD__CLUSTER__V1__LANE_DOWN__INIT;
        ClusterEnvelope env = WEIGHTD__CLUSTER__V1__ENVELOPE__INIT;
        char msg[256];

        snprintf(msg, sizeof(msg), "%s: %s", mesh_node_name(l->mesh, mesh_self(l->mesh)), why);
        ld.plan_id = plan_id;
        ld.message = msg;
        env.body_case = WEIGHTD__CLUSTER__V1__ENVELOPE__BODY_LANE_DOWN;
        env.lane_down = &ld;
        for (size_t i = 0; i < n; i++)
                if (ranks[i] != mesh_self(l->mesh))
                        (void) mesh_send(l->mesh, ranks[i], &env);
}

/* Abort lane: its user (if any) lets go of it, the other ranks hear why
 * (tell) for the plan it carried, the communicator is aborted. */
static void lane_kill(Lane *lane, const char *why, bool tell) {
        Lanes *l = lane->owner;
        Transfer *user = TAKE_PTR(lane->user);

        LIST_REMOVE(lanes, l->lanes, lane);
        l->sent_bytes += lane->tl.sent_bytes;
        l->received_bytes += lane->tl.received_bytes;
        if (tell && user && l->mesh)
                send_lane_down(l, transfer_plan_id(user), lane->tl.peers, (size_t) lane->tl.nranks, why);
        if (user) {
                transfer_drop_lane(user, why); /* nothing if it let go already */
                transfer_unref(user);
        }
        l->n_dying++;
        if (lane->tl.comm)
                l->coll.ops->abort(lane->tl.comm, lane_gone, lane);
        else
                lane_gone(lane);
}

/* TransferLane.ended: from within the transfer. */
static void lane_ended(TransferLane *tl, Transfer *t, const char *why) {
        Lane *lane = (Lane *) tl;

        if (lane->user != t)
                return;
        if (!why) {
                /* Free for the next plan; the reference goes later (not
                 * from within the transfer). */
                lane->user = NULL;
                transfer_unref(t);
                return;
        }
        lane_kill(lane, why, true);
}

static Lane *lane_find(Lanes *l, const uint8_t *id) {
        LIST_FOREACH(lanes, lane, l->lanes)
                if (memcmp(lane->id, id, GPU_COLL_ID_BYTES) == 0)
                        return lane;
        return NULL;
}

static int lane_create(Lanes *l, const uint8_t *id, const unsigned *ranks, size_t n, int device, uint64_t chunk_size,
                       Lane **ret, WdError *err) {
        unsigned self = mesh_self(l->mesh);
        Lane *lane;
        int rank = -1, r;

        if (!l->coll.ops)
                return wd_error_set(err, -EOPNOTSUPP, "no GPU lane here: %s", l->describe);
        if (n < 2 || n > PLAN_MAX_SOURCES)
                return wd_error_set(err, -EINVAL, "a lane of %zu ranks", n);
        for (size_t i = 0; i < n; i++)
                if (ranks[i] == self)
                        rank = (int) i;
        if (rank < 0)
                return wd_error_set(err, -EINVAL, "this node is no rank of the lane");
        if (device < 0 || (size_t) device >= gpu_n_devices(l->gpu))
                return wd_error_set(err, -ENODEV, "device %d: no such device on this node", device);
        /* The ring is outside the device budget (it lives only while lanes
         * do): never more than an eighth of what is free. */
        if (LANE_SLOTS * chunk_size > gpu_device_free_bytes(l->gpu, (size_t) device) / 8)
                return wd_error_set(err, -ENOMEM, "cuda:%d: a ring of %u x %llu bytes is more than an eighth of the "
                                    "device's free memory", device, LANE_SLOTS, (unsigned long long) chunk_size);
        /* Room for it: the lane idle longest goes (its other ranks find out
         * when a plan names it: this node then refuses it). */
        size_t n_lanes = 0;
        Lane *oldest = NULL;

        LIST_FOREACH(lanes, x, l->lanes) {
                n_lanes++;
                if (!x->user && x->offered_plan == 0 && (!oldest || x->since_usec < oldest->since_usec))
                        oldest = x;
        }
        if (n_lanes >= LANES_MAX && !oldest)
                return wd_error_set(err, -EBUSY, "%u GPU lanes carry plans already", LANES_MAX);
        if (n_lanes >= LANES_MAX)
                lane_kill(oldest, "more lanes than this node keeps", false);
        lane = calloc(1, sizeof(Lane));
        if (!lane)
                return wd_error_set(err, -ENOMEM, "out of memory");
        lane->owner = l;
        lane->device = device;
        lane->since_usec = now_usec();
        memcpy(lane->id, id, GPU_COLL_ID_BYTES);
        lane->tl = (TransferLane){ .coll = &l->coll, .gpu = l->gpu, .slots = LANE_SLOTS, .slot_bytes = chunk_size,
                                   .nranks = (int) n, .rank = rank, .ended = lane_ended };
        memcpy(lane->tl.peers, ranks, n * sizeof(unsigned));
        r = gpu_slab_new(l->gpu, (size_t) device, LANE_SLOTS * chunk_size, &lane->ring, err);
        if (r == 0)
                r = l->coll.ops->comm_init(l->coll.backend, id, (int) n, rank, device, ranks, &lane->tl.comm, err);
        if (r < 0) {
                gpu_slab_free(lane->ring);
                free(lane);
                return r;
        }
        lane->tl.ring = gpu_slab_address(lane->ring);
        LIST_PREPEND(lanes, l->lanes, lane);
        kick(l);
        *ret = lane;
        return 0;
}

/* ---- the poll ------------------------------------------------------------ */

static void timer_fire(uv_timer_t *timer) {
        Lanes *l = timer->data;
        uint64_t now = now_usec();
        bool busy = false;

        for (Lane *lane = l->lanes, *next; lane; lane = next) {
                WdError err = WD_ERROR_NULL;
                int r;

                next = lane->lanes_next;
                r = l->coll.ops->comm_poll(lane->tl.comm, &err);
                if (r == -EINPROGRESS && !lane->tl.ready) {
                        if (now - lane->since_usec > l->deadline_usec) {
                                lane_kill(lane, "the communicator did not initialise within the deadline", true);
                                continue;
                        }
                        busy = true;
                        continue;
                }
                if (r < 0 && r != -EINPROGRESS) {
                        lane_kill(lane, err.message, true);
                        continue;
                }
                if (!lane->tl.ready) {
                        lane->tl.ready = true;
                        log_debug("cluster: GPU lane on cuda:%d of %d ranks ready in %" PRIu64 " ms", lane->device,
                                  lane->tl.nranks, (now - lane->since_usec) / 1000);
                        if (lane->user)
                                transfer_tick(lane->user);
                }
                if (lane->user) {
                        /* A done may end the lane (and free it): hold the
                         * transfer, and look at the lane no more. */
                        Transfer *t = transfer_ref(lane->user);

                        l->coll.ops->progress(lane->tl.comm);
                        transfer_unref(t);
                        busy = true;
                }
        }
        if (!busy) {
                uv_timer_stop(&l->timer);
                l->timer_running = false;
        }
}

static void timer_closed(uv_handle_t *h) {
        free(h->data);
}

/* ---- what the cluster calls -------------------------------------------- */

void lanes_set_gpu(Lanes *l, Gpu *gpu) {
        l->gpu = gpu;
        choose_backend(l);
        log_info("cluster: GPU lane: %s", l->describe);
}

static bool is_nccl(const GpuColl *c) {
        return c->ops && strcmp(c->ops->name, "nccl") == 0;
}

/* Let go of the backend (every lane was shut down), to choose it anew. */
static void drop_backend(Lanes *l) {
        if (is_nccl(&l->coll))
                gpu_coll_nccl_free(&l->coll);
        l->coll = (GpuColl){ 0 };
        if (l->host && l->n_dying == 0) {
                l->host = coll_host_free(l->host);
                l->host_coll = (GpuColl){ 0 };
        } else if (l->host)
                coll_host_set_self(l->host, mesh_self(l->mesh)); /* its node index may differ now */
}

void lanes_set_mesh(Lanes *l, Mesh *mesh) {
        l->mesh = mesh;
        drop_backend(l);
        choose_backend(l);
}

void lanes_set_transport(Lanes *l, LanesTransport transport) {
        if (transport == l->transport)
                return;
        l->transport = transport;
        lanes_shutdown(l);
        drop_backend(l);
        choose_backend(l);
}

const char *lanes_describe(const Lanes *l) {
        return l->describe;
}

int lanes_offer(Lanes *l, uint64_t plan_id, int device, const unsigned *ranks, size_t n, uint64_t chunk_size,
                uint8_t ret_id[GPU_COLL_ID_BYTES]) {
        WdError err = WD_ERROR_NULL;
        uint8_t id[GPU_COLL_ID_BYTES];
        Lane *lane;

        if (!l->coll.ops || n < 2 || n > PLAN_MAX_SOURCES || device < 0 || (size_t) device >= gpu_n_devices(l->gpu))
                return -1;
        LIST_FOREACH(lanes, x, l->lanes)
                if (x->device == device && x->tl.nranks == (int) n && !x->user && x->offered_plan == 0 &&
                    x->tl.slot_bytes >= chunk_size && memcmp(x->tl.peers, ranks, n * sizeof(unsigned)) == 0) {
                        x->offered_plan = plan_id;
                        memcpy(ret_id, x->id, GPU_COLL_ID_BYTES);
                        return 0;
                }
        if (l->coll.ops->unique_id(l->coll.backend, id, &err) < 0 ||
            lane_create(l, id, ranks, n, device, chunk_size, &lane, &err) < 0) {
                log_warning("cluster: plan %016" PRIx64 " goes without a GPU lane: %s", plan_id, err.message);
                return -1;
        }
        lane->offered_plan = plan_id;
        memcpy(ret_id, id, GPU_COLL_ID_BYTES);
        return 0;
}

void lanes_plan_ended(Lanes *l, uint64_t plan_id) {
        LIST_FOREACH(lanes, lane, l->lanes)
                if (lane->offered_plan == plan_id)
                        lane->offered_plan = 0;
}

/* This node cannot take part in the lane that the Start of t names: the
 * other ranks hear it, and abort their ends. */
static void refuse(Lanes *l, Transfer *t, const unsigned *ranks, size_t n, const char *why) {
        log_warning("cluster: plan %016" PRIx64 ": cannot join its GPU lane: %s", transfer_plan_id(t), why);
        send_lane_down(l, transfer_plan_id(t), ranks, n, why);
}

void lanes_join(Lanes *l, Transfer *t, const uint8_t *id, size_t id_len, const unsigned *ranks, size_t n, int device,
                uint64_t chunk_size) {
        WdError err = WD_ERROR_NULL;
        Lane *lane;

        if (!id) {
                refuse(l, t, ranks, n, "its part of the plan is not on the lane's device");
                return;
        }
        if (id_len != GPU_COLL_ID_BYTES) {
                refuse(l, t, ranks, n, "a lane id of the wrong size");
                return;
        }
        lane = lane_find(l, id);
        if (lane && (lane->user || lane->device != device || lane->tl.nranks != (int) n ||
                     memcmp(lane->tl.peers, ranks, n * sizeof(unsigned)) != 0 || lane->tl.slot_bytes < chunk_size)) {
                /* Still busy here with the last plan, or not the same
                 * lane: it cannot carry this one in step with the
                 * others. */
                lane_kill(lane, "the lane is busy or differs on this node", true);
                refuse(l, t, ranks, n, "its lane was busy or differed here");
                return;
        }
        if (!lane && lane_create(l, id, ranks, n, device, chunk_size, &lane, &err) < 0) {
                refuse(l, t, ranks, n, err.message);
                return;
        }
        if (transfer_set_lane(t, &lane->tl) < 0) {
                lane_kill(lane, "the plan does not fit the lane", true);
                refuse(l, t, ranks, n, "the plan does not fit the lane");
                return;
        }
        lane->user = transfer_ref(t);
        lane->since_usec = now_usec(); /* last used, for the choice of the one to drop */
        kick(l);
}

void lanes_lane_down(Lanes *l, Transfer *t, unsigned node, const char *why) {
        transfer_lane_down(t, node, why); /* ends its lane here too (lane_ended()) */
}

void lanes_node_down(Lanes *l, unsigned node) {
        if (l->host)
                coll_host_node_down(l->host, node);
        for (Lane *lane = l->lanes, *next; lane; lane = next) {
                next = lane->lanes_next;
                for (int r = 0; r < lane->tl.nranks; r++)
                        if (lane->tl.peers[r] == node) {
                                lane_kill(lane, "a rank went down", false);
                                break;
                        }
        }
}

void lanes_shutdown(Lanes *l) {
        while (l && l->lanes)
                lane_kill(l->lanes, "the cluster stops or was reconfigured", false);
}

Lanes *lanes_free(Lanes *l) {
        if (!l)
                return NULL;
        lanes_shutdown(l);
        l->freeing = true;
        if (is_nccl(&l->coll))
                gpu_coll_nccl_free(&l->coll);
        /* The host backend's communicators end once the data plane let go
         * of their memory: lanes_free() comes after dataplane_free(). */
        if (l->n_dying == 0) {
                coll_host_free(l->host);
                uv_close((uv_handle_t *) &l->timer, timer_closed);
        } else {
                /* Their gone may still come: l stays for it. */
                log_warning("cluster: %u GPU lanes did not end; their memory stays", l->n_dying);
                uv_close((uv_handle_t *) &l->timer, NULL);
        }
        return NULL;
}

void *lanes_incoming(Lanes *l, const CollHostHeader *hdr, uint64_t length, void **ret_token) {
        return l->host ? coll_host_incoming(l->host, hdr, length, ret_token) : NULL;
}

void lanes_received(void *token, int status) {
        coll_host_received(token, status);
}

void lanes_bytes(const Lanes *l, uint64_t *ret_sent, uint64_t *ret_received) {
        uint64_t s = l->sent_bytes, r = l->received_bytes;

        for (const Lane *lane = l->lanes; lane; lane = lane->lanes_next) {
                s += lane->tl.sent_bytes;
                r += lane->tl.received_bytes;
        }
        *ret_sent = s;
        *ret_received = r;
}
