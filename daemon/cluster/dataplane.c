/* The data plane (see dataplane.h): UCX active messages driven from the
 * libuv loop.
 *
 * One UCP context, and a single-threaded worker for each connection with a
 * peer.  A peer's worker serves one incarnation of the link to it and is
 * destroyed when that ends (the peer went down, its endpoint failed, the
 * link was replaced): nothing of an old connection lives on into the next
 * one.  With one worker for all peers, UCX's tcp transport kept the
 * sockets of a force-closed endpoint and, when a partitioned peer came
 * back, handled an event for an endpoint it had freed (a crash seen with
 * UCX 1.13 and 1.22 alike).  A worker's address goes in the mesh Hello of
 * the link it is for (dataplane_address()); once connected it is never
 * handed out again.
 *
 * A message is one active message with id DATAPLANE_AM_ID: our copy of the
 * caller's header and the payload straight from the caller's memory,
 * rendezvous from DATAPLANE_RNDV_MIN bytes on (the receiver pulls the
 * bytes into the destination it chose).
 *
 * Nothing the caller registered runs inside UCX.  UCX's callbacks (send
 * and receive completions, arrivals, endpoint errors) only record what
 * happened on the data plane's queues; dataplane_dispatch() hands it to the
 * caller from the loop, after the workers were progressed.  Arrivals are
 * kept (UCS_INPROGRESS) until then, so incoming() too runs from the loop and
 * may send, connect or free.  Each worker is progressed from a uv_poll_t on
 * its event fd and, after anything was posted, from a uv_check_t (a
 * uv_idle_t keeps the loop from blocking until it ran); each pass
 * progresses a worker until ucp_worker_arm() says it is idle, or a budget
 * of progress calls is spent (then the next loop iteration goes on), so a
 * transfer never starves the rest of the loop.
 *
 * UCX cannot take back a send it started: dataplane_send_cancel() and a
 * closed endpoint only decide what done() is told, and done() comes once
 * UCX has let go of the caller's memory: when it completed the send, or
 * when the send's worker was destroyed.  Receives likewise: nothing UCX
 * does afterwards can touch the memory of a send or a receive the caller
 * was told ended. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucp/api/ucp.h>

#include "cluster/dataplane.h"
#include "macro.h"
#include "util/list.h"
#include "util/log.h"
#include "util/time-util.h"

#define DATAPLANE_AM_ID 1u
/* From here on a payload goes by rendezvous, below UCX chooses (eager for
 * what fits a few fragments). */
#define DATAPLANE_RNDV_MIN (64u * 1024u)
/* Progress calls per worker and pass before the loop gets a turn. */
#define DATAPLANE_PROGRESS_BUDGET 1024u
/* How long a worker's endpoint may take to close by force before the
 * worker goes all the same (it takes microseconds). */
#define DATAPLANE_RETIRE_TIMEOUT_USEC (200u * 1000u)
/* dataplane_free(): live peers' flushes, then every close. */
#define DATAPLANE_FLUSH_TIMEOUT_USEC (250u * 1000u)
#define DATAPLANE_CLOSE_TIMEOUT_USEC (2u * 1000u * 1000u)

typedef enum EpState {
        EP_NONE,
        EP_OPEN,
        EP_FAILED,  /* UCX reported an error: the worker goes from dispatch */
        EP_CLOSING, /* ucp_ep_close_nbx() in flight */
        EP_CLOSED,
} EpState;

/* One connection with one peer: a worker and its endpoint. */
typedef struct Worker {
        DataPlane *d;
        unsigned peer;
        ucp_worker_h worker;
        ucp_address_t *address;
        size_t address_len;
        uv_poll_t *poll; /* freed in its close callback */
        ucp_ep_h ep;
        EpState ep_state;
        bool retiring, parked;
        LIST_FIELDS(struct Worker, workers); /* d->workers */
        LIST_FIELDS(struct Worker, failed);  /* d->failed */
} Worker;

/* What the data plane keeps of a send (DataPlaneSend.request). */
typedef struct SendOp {
        DataPlane *d;
        DataPlaneSend *s;
        Worker *w;     /* NULL once its worker went */
        void *request; /* UCX's, until its callback */
        int status;
        bool completed, cancelled, reset;
        size_t hdr_len;
        uint8_t hdr[]; /* UCX 1.13 reads the header until completion */
} SendOp;

/* An arrival: queued by the AM handler, handed to incoming() from the
 * loop, then (rendezvous) a receive in flight. */
typedef struct Incoming {
        DataPlane *d;
        Worker *w;  /* the worker it came by; NULL once that went */
        void *desc; /* UCX's data or rendezvous descriptor (UCS_INPROGRESS) */
        void *request;
        void *token;
        uint64_t length;
        int status;
        bool rndv, completed, cancelled;
        LIST_FIELDS(struct Incoming, in);
        size_t hdr_len;
        uint8_t data[]; /* the header, then an eager payload UCX did not keep */
} Incoming;

/* The loop's handles, freed in their close callbacks (after the data plane
 * that owned them). */
typedef struct DataPlaneHandles {
        uv_check_t check;
        uv_idle_t idle;
        unsigned n_open;
} DataPlaneHandles;

struct DataPlane {
        uv_loop_t *loop;
        const DataPlaneOps *ops;
        void *userdata;

        unsigned n_flushing; /* dataplane_free()'s flushes in flight */
        ucp_context_h context;
        DataPlaneHandles *handles;
        bool kicked;

        /* Each peer's connected worker, and the one whose address went out
         * in a Hello since (not connected yet). */
        Worker *active[DATAPLANE_MAX_PEERS];
        Worker *next[DATAPLANE_MAX_PEERS];
        Worker *workers, *failed;
        Incoming *accepting; /* the arrival incoming() is deciding on */

        /* Sends in flight, and those UCX finished that done() has not been
         * told of yet (a FIFO: head and tail). */
        DataPlaneSend *sends;
        DataPlaneSend *sends_done, *sends_done_tail;
        /* Arrivals not handed out yet (a FIFO), receives in flight, and
         * receives that ended, received() not called yet (a FIFO). */
        Incoming *incoming, *incoming_tail;
        Incoming *recvs;
        Incoming *recvs_done, *recvs_done_tail;

        unsigned dispatching;
        bool freeing;

        uint64_t bytes_sent, bytes_received;
};

/* UCX's status as ours: the one place. */
static int ucs_to_errno(ucs_status_t s) {
        switch (s) {
        case UCS_OK:
                return 0;
        case UCS_ERR_NO_MEMORY:
        case UCS_ERR_NO_RESOURCE:
                return -ENOMEM;
        case UCS_ERR_INVALID_PARAM:
        case UCS_ERR_INVALID_ADDR:
                return -EINVAL;
        case UCS_ERR_CANCELED:
                return -ECANCELED;
        case UCS_ERR_CONNECTION_RESET:
                return -ECONNRESET;
        case UCS_ERR_NOT_CONNECTED:
                return -ENOTCONN;
        case UCS_ERR_UNREACHABLE:
                return -EHOSTUNREACH;
        case UCS_ERR_REJECTED:
                return -ECONNREFUSED;
        case UCS_ERR_ENDPOINT_TIMEOUT:
        case UCS_ERR_TIMED_OUT:
                return -ETIMEDOUT;
        case UCS_ERR_MESSAGE_TRUNCATED:
        case UCS_ERR_EXCEEDS_LIMIT:
                return -EMSGSIZE;
        case UCS_ERR_UNSUPPORTED:
                return -EOPNOTSUPP;
        case UCS_ERR_NO_DEVICE:
                return -ENODEV;
        case UCS_ERR_BUSY:
                return -EBUSY;
        case UCS_ERR_NO_ELEM:
                return -ENOENT;
        default:
                return -EIO;
        }
}

static int ucs_error(WdError *err, ucs_status_t s, const char *what) {
        return wd_error_set(err, ucs_to_errno(s), "UCX: %s: %s", what, ucs_status_string(s));
}

/* ---- small queues --------------------------------------------------------- */

/* DataPlaneSend's links are plain prev/next (the header's): its lists by
 * hand. */
static void send_link(DataPlaneSend **head, DataPlaneSend *s) {
        s->prev = NULL;
        s->next = *head;
        if (*head)
                (*head)->prev = s;
        *head = s;
}

static void send_unlink(DataPlaneSend **head, DataPlaneSend *s) {
        if (s->next)
                s->next->prev = s->prev;
        if (s->prev)
                s->prev->next = s->next;
        else
                *head = s->next;
        s->prev = s->next = NULL;
}

static void send_push(DataPlane *d, DataPlaneSend *s) {
        s->next = NULL;
        s->prev = d->sends_done_tail;
        if (d->sends_done_tail)
                d->sends_done_tail->next = s;
        else
                d->sends_done = s;
        d->sends_done_tail = s;
}

static DataPlaneSend *send_pop(DataPlane *d) {
        DataPlaneSend *s = d->sends_done;

        if (!s)
                return NULL;
        d->sends_done = s->next;
        if (d->sends_done)
                d->sends_done->prev = NULL;
        else
                d->sends_done_tail = NULL;
        s->prev = s->next = NULL;
        return s;
}

static void in_push(Incoming **head, Incoming **tail, Incoming *in) {
        in->in_next = NULL;
        in->in_prev = *tail;
        if (*tail)
                (*tail)->in_next = in;
        else
                *head = in;
        *tail = in;
}

static Incoming *in_pop(Incoming **head, Incoming **tail) {
        Incoming *in = *head;

        if (!in)
                return NULL;
        *head = in->in_next;
        if (*head)
                (*head)->in_prev = NULL;
        else
                *tail = NULL;
        in->in_prev = in->in_next = NULL;
        return in;
}


/* Take in out of a FIFO, wherever it is. */
static void in_unlink(Incoming **head, Incoming **tail, Incoming *in) {
        if (in->in_next)
                in->in_next->in_prev = in->in_prev;
        else
                *tail = in->in_prev;
        if (in->in_prev)
                in->in_prev->in_next = in->in_next;
        else
                *head = in->in_next;
        in->in_prev = in->in_next = NULL;
}

/* ---- progress ------------------------------------------------------------- */

static void on_idle(uv_idle_t *h) {
        /* Nothing: being active, it makes the loop poll without blocking,
         * so the check runs at once. */
}

/* Something was posted or queued: progress and dispatch from the loop's
 * next check. */
static void dataplane_kick(DataPlane *d) {
        if (d->freeing || d->kicked)
                return;
        d->kicked = true;
        (void) uv_idle_start(&d->handles->idle, on_idle);
}

/* Progress w until it is idle and armed (its event fd says when it is not),
 * or DATAPLANE_PROGRESS_BUDGET calls were spent (the loop's next check goes
 * on). */
static void worker_progress(Worker *w) {
        unsigned budget = DATAPLANE_PROGRESS_BUDGET;
        ucs_status_t st;

        for (;;) {
                while (ucp_worker_progress(w->worker))
                        if (--budget == 0) {
                                dataplane_kick(w->d);
                                return;
                        }
                st = ucp_worker_arm(w->worker);
                if (st == UCS_OK)
                        return;
                if (st != UCS_ERR_BUSY) {
                        log_debug("dataplane: peer %u: ucp_worker_arm: %s, polling instead", w->peer,
                                  ucs_status_string(st));
                        dataplane_kick(w->d);
                        return;
                }
                if (--budget == 0) {
                        dataplane_kick(w->d);
                        return;
                }
        }
}

/* Callbacks only queue: progressing never frees a worker. */
static void dataplane_progress(DataPlane *d) {
        LIST_FOREACH(workers, w, d->workers)
                worker_progress(w);
}

static void dataplane_dispatch(DataPlane *d);

static void on_poll(uv_poll_t *h, int status, int events) {
        Worker *w = h->data;
        DataPlane *d = w->d;

        if (status < 0)
                log_debug("dataplane: peer %u: polling the worker's event fd: %s", w->peer, uv_strerror(status));
        worker_progress(w);
        dataplane_dispatch(d);
}

static void on_poll_closed(uv_handle_t *h) {
        free(h);
}

/* ---- workers -------------------------------------------------------------- */

static ucs_status_t on_am(void *arg, const void *header, size_t header_length, void *data, size_t length,
                          const ucp_am_recv_param_t *param);

static void on_ep_closed(void *request, ucs_status_t status, void *user_data) {
        Worker *w = user_data;

        ucp_request_free(request);
        w->ep_state = EP_CLOSED;
}

static void on_ep_error(void *arg, ucp_ep_h ep, ucs_status_t status) {
        Worker *w = arg;
        DataPlane *d = w->d;

        log_debug("dataplane: peer %u: %s", w->peer, ucs_status_string(status));
        if (w->ep_state != EP_OPEN)
                return;
        w->ep_state = EP_FAILED;
        LIST_PREPEND(failed, d->failed, w);
        dataplane_kick(d);
}

/* Close w's endpoint by force: UCX purges what is in flight on it. */
static void worker_close_ep(Worker *w) {
        ucp_request_param_t param = {
                .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                                UCP_OP_ATTR_FIELD_FLAGS,
                .flags = UCP_EP_CLOSE_FLAG_FORCE,
                .cb.send = on_ep_closed,
                .user_data = w,
        };
        ucs_status_ptr_t sp;

        if (w->ep_state != EP_OPEN && w->ep_state != EP_FAILED)
                return;
        w->ep_state = EP_CLOSING;
        sp = ucp_ep_close_nbx(w->ep, &param);
        if (UCS_PTR_IS_ERR(sp))
                log_debug("dataplane: peer %u: ucp_ep_close_nbx: %s", w->peer, ucs_status_string(UCS_PTR_STATUS(sp)));
        if (sp == NULL || UCS_PTR_IS_ERR(sp))
                w->ep_state = EP_CLOSED;
        /* else on_ep_closed() says when (it may have already) */
}

/* user_data is the data plane: a flush may end as its worker goes. */
static void on_flushed(void *request, ucs_status_t status, void *user_data) {
        DataPlane *d = user_data;

        d->n_flushing--;
        ucp_request_free(request);
}

/* Flush w's endpoint: its rendezvous sends complete before it is closed
 * by force (dataplane_free()).  UCX 1.13's tcp transport may crash a live
 * peer whose endpoint back to us sees a force-close with rendezvous sends
 * in flight. */
static void worker_flush(Worker *w) {
        ucp_request_param_t param = {
                .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA,
                .cb.send = on_flushed,
                .user_data = w->d,
        };
        ucs_status_ptr_t sp;

        if (w->ep_state != EP_OPEN)
                return;
        sp = ucp_ep_flush_nbx(w->ep, &param);
        if (sp != NULL && !UCS_PTR_IS_ERR(sp))
                w->d->n_flushing++;
}

/* Destroy w's worker, then end what it carried: UCX has let go of every
 * buffer of w's sends and receives now.  Sends report -ECONNRESET (or
 * -ECANCELED when dataplane_free() cancelled them), so do receives. */
static void worker_destroy(DataPlane *d, Worker *w) {
        DataPlaneSend *s, *s_next;
        Incoming *in, *in_next;

        LIST_REMOVE(workers, d->workers, w);
        if (w->poll)
                uv_close((uv_handle_t *) w->poll, on_poll_closed); /* off the loop's epoll before the fd goes */
        if (w->worker) {
                if (w->address)
                        ucp_worker_release_address(w->worker, w->address);
                ucp_worker_destroy(w->worker);
        }

        for (s = d->sends; s; s = s_next) {
                SendOp *op = s->request;

                s_next = s->next;
                if (op->w != w)
                        continue;
                send_unlink(&d->sends, s);
                op->w = NULL;
                op->completed = true;
                op->status = -ECONNRESET;
                op->reset = true;
                send_push(d, s);
        }
        for (s = d->sends_done; s; s = s->next)
                if (((SendOp *) s->request)->w == w)
                        ((SendOp *) s->request)->w = NULL;
        for (in = d->recvs; in; in = in_next) {
                in_next = in->in_next;
                if (in->w != w)
                        continue;
                LIST_REMOVE(in, d->recvs, in);
                in->w = NULL;
                in->completed = true;
                in->status = -ECONNRESET;
                in_push(&d->recvs_done, &d->recvs_done_tail, in);
        }
        for (in = d->recvs_done; in; in = in->in_next)
                if (in->w == w)
                        in->w = NULL;
        free(w);
        dataplane_kick(d);
}

/* Whether w's endpoint is closing, or UCX has sends or receives of w's. */
static bool worker_busy(const DataPlane *d, const Worker *w) {
        if (w->ep_state == EP_CLOSING)
                return true;
        for (const DataPlaneSend *s = d->sends; s; s = s->next)
                if (((const SendOp *) s->request)->w == w)
                        return true;
        for (const Incoming *in = d->recvs; in; in = in->in_next)
                if (in->w == w)
                        return true;
        return false;
}

/* End the connection w serves: its arrivals nobody saw go back to UCX, its
 * endpoint is closed by force (progressed until closed, or until
 * deadline), then the worker is destroyed and what it carried ends. */
static void worker_retire(DataPlane *d, Worker *w, uint64_t deadline) {
        Incoming *in, *next;

        w->retiring = true; /* on_am() refuses what still comes */
        if (d->active[w->peer] == w)
                d->active[w->peer] = NULL;
        if (d->next[w->peer] == w)
                d->next[w->peer] = NULL;
        if (w->ep_state == EP_FAILED)
                LIST_REMOVE(failed, d->failed, w);

        for (in = d->incoming; in; in = next) {
                next = in->in_next;
                if (in->w != w)
                        continue;
                in_unlink(&d->incoming, &d->incoming_tail, in);
                if (in->desc)
                        ucp_am_data_release(w->worker, in->desc);
                free(in);
        }
        if (d->accepting && d->accepting->w == w) {
                /* incoming() disconnected the peer of the arrival it is
                 * deciding on: its descriptor goes back now. */
                if (d->accepting->desc)
                        ucp_am_data_release(w->worker, d->accepting->desc);
                d->accepting->desc = NULL;
                d->accepting->w = NULL;
        }
        for (DataPlaneSend *s = d->sends; s; s = s->next)
                if (((SendOp *) s->request)->w == w)
                        ((SendOp *) s->request)->reset = true;
        for (DataPlaneSend *s = d->sends_done; s; s = s->next)
                if (((SendOp *) s->request)->w == w)
                        ((SendOp *) s->request)->reset = true;

        /* UCX purges the endpoint's sends and receives from progress after
         * the close; a worker destroyed with a receive still listed
         * trips an assertion in UCX. */
        worker_close_ep(w);
        while (worker_busy(d, w) && now_usec() < deadline)
                (void) ucp_worker_progress(w->worker);
        if (worker_busy(d, w) && !d->freeing) {
                /* A receive on an endpoint UCX made for the peer (not ours,
                 * not closed): the worker stays, refusing arrivals, until
                 * UCX ends it (the peer's failure is detected). */
                log_debug("dataplane: peer %u: a receive outlives the connection; its worker stays until it ends",
                          w->peer);
                w->parked = true;
                return;
        }
        worker_destroy(d, w);
}

/* A worker for a connection with peer: its active message handler set,
 * its event fd watched, its address ready for a Hello. */
static int worker_new(DataPlane *d, unsigned peer, Worker **ret, WdError *err) {
        ucp_worker_params_t wparams = {
                .field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE,
                .thread_mode = UCS_THREAD_MODE_SINGLE,
        };
        ucp_am_handler_param_t am = {
                .field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_FLAGS |
                              UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG,
                .id = DATAPLANE_AM_ID,
                .flags = UCP_AM_FLAG_WHOLE_MSG | UCP_AM_FLAG_PERSISTENT_DATA,
                .cb = on_am,
        };
        ucs_status_t st;
        Worker *w;
        int efd, r;

        w = calloc(1, sizeof(Worker));
        if (!w)
                return wd_error_set(err, -ENOMEM, "dataplane: out of memory");
        *w = (Worker){ .d = d, .peer = peer };
        am.arg = w;
        st = ucp_worker_create(d->context, &wparams, &w->worker);
        if (st != UCS_OK) {
                free(w);
                return ucs_error(err, st, "ucp_worker_create");
        }
        LIST_PREPEND(workers, d->workers, w); /* from here worker_destroy() undoes it all */

        st = ucp_worker_set_am_recv_handler(w->worker, &am);
        if (st == UCS_OK)
                st = ucp_worker_get_address(w->worker, &w->address, &w->address_len);
        if (st == UCS_OK)
                st = ucp_worker_get_efd(w->worker, &efd);
        if (st != UCS_OK) {
                worker_destroy(d, w);
                return ucs_error(err, st, "setting up a worker");
        }
        w->poll = malloc(sizeof(uv_poll_t));
        if (!w->poll) {
                worker_destroy(d, w);
                return wd_error_set(err, -ENOMEM, "dataplane: out of memory");
        }
        r = uv_poll_init(d->loop, w->poll, efd);
        if (r < 0) {
                free(w->poll);
                w->poll = NULL;
                worker_destroy(d, w);
                return wd_error_set(err, r, "dataplane: watching a worker's event fd: %s", uv_strerror(r));
        }
        w->poll->data = w;
        r = uv_poll_start(w->poll, UV_READABLE, on_poll);
        if (r < 0) {
                worker_destroy(d, w);
                return wd_error_set(err, r, "dataplane: watching a worker's event fd: %s", uv_strerror(r));
        }
        worker_progress(w); /* arms it */
        *ret = w;
        return 0;
}

/* ---- sends ---------------------------------------------------------------- */

static void on_send_done(void *request, ucs_status_t status, void *user_data) {
        SendOp *op = user_data;
        DataPlane *d = op->d;

        ucp_request_free(request);
        op->request = NULL;
        op->completed = true;
        op->status = ucs_to_errno(status);
        send_unlink(&d->sends, op->s);
        send_push(d, op->s);
        dataplane_kick(d);
}

/* What done() is told: UCX's result, -ECONNRESET for any failure once the
 * peer's endpoint went, -ECANCELED if the caller gave up on the send or
 * dataplane_free() ran before UCX finished it. */
static int send_result(const SendOp *op) {
        if (!op->completed || op->cancelled)
                return -ECANCELED;
        if (op->status < 0 && op->reset)
                return -ECONNRESET;
        return op->status;
}

static void send_report(DataPlane *d, DataPlaneSend *s) {
        SendOp *op = s->request;
        int r = send_result(op);

        s->request = NULL;
        free(op);
        s->done(s, r);
}

int dataplane_send(DataPlane *d, unsigned peer, const void *hdr, size_t hdr_len, const void *data, uint64_t length,
                   DataPlaneSend *s) {
        ucp_request_param_t param = {
                .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                                UCP_OP_ATTR_FIELD_DATATYPE | UCP_OP_ATTR_FIELD_MEMORY_TYPE | UCP_OP_ATTR_FIELD_FLAGS,
                .cb.send = on_send_done,
                .datatype = ucp_dt_make_contig(1),
                .memory_type = UCS_MEMORY_TYPE_HOST,
                .flags = length >= DATAPLANE_RNDV_MIN ? UCP_AM_SEND_FLAG_RNDV : 0,
        };
        ucs_status_ptr_t sp;
        SendOp *op;
        Worker *w;

        if (!s || !s->done || hdr_len > DATAPLANE_MAX_HEADER || (hdr_len > 0 && !hdr) || (length > 0 && !data) ||
            length > SIZE_MAX || peer >= DATAPLANE_MAX_PEERS)
                return -EINVAL;
        if (d->freeing)
                return -ENOTCONN;
        w = d->active[peer];
        if (!w || w->ep_state != EP_OPEN)
                return -ENOTCONN;

        op = malloc(sizeof(SendOp) + hdr_len);
        if (!op)
                return -ENOMEM;
        *op = (SendOp){ .d = d, .s = s, .w = w, .hdr_len = hdr_len };
        if (hdr_len > 0)
                memcpy(op->hdr, hdr, hdr_len);
        s->request = op;
        s->peer = peer;
        param.user_data = op;

        /* On the list before UCX sees it: UCX may call back before it
         * returns. */
        send_link(&d->sends, s);
        sp = ucp_am_send_nbx(w->ep, DATAPLANE_AM_ID, hdr_len > 0 ? op->hdr : NULL, hdr_len, data, (size_t) length,
                             &param);
        if (op->completed)
                ; /* called back already */
        else if (sp == NULL || UCS_PTR_IS_ERR(sp)) {
                /* Done already (or refused): done() still runs from the
                 * loop, never from here. */
                op->completed = true;
                op->status = ucs_to_errno(UCS_PTR_STATUS(sp));
                send_unlink(&d->sends, s);
                send_push(d, s);
        } else
                op->request = sp;
        if (op->status == 0)
                d->bytes_sent += length;
        /* Even a send that completed at once may have left work queued. */
        dataplane_kick(d);
        return 0;
}

void dataplane_send_cancel(DataPlane *d, DataPlaneSend *s) {
        SendOp *op = s ? s->request : NULL;

        /* UCX cannot withdraw bytes it is moving (ucp_request_cancel()
         * ignores sends): done(-ECANCELED) waits until it let go of them. */
        if (!op || op->completed)
                return;
        op->cancelled = true;
}

/* ---- receives ------------------------------------------------------------- */

static ucs_status_t on_am(void *arg, const void *header, size_t header_length, void *data, size_t length,
                          const ucp_am_recv_param_t *param) {
        Worker *w = arg;
        DataPlane *d = w->d;
        bool rndv = param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV;
        bool keep = rndv || (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_DATA);
        size_t copy = keep ? 0 : length;
        Incoming *in;

        /* For a rendezvous an error status fails the sender's send; an
         * eager message is gone either way. */
        if (d->freeing || w->retiring)
                return rndv ? UCS_ERR_CANCELED : UCS_OK;
        if (header_length > DATAPLANE_MAX_HEADER) {
                log_debug("dataplane: dropping a message with a %zu byte header", header_length);
                return rndv ? UCS_ERR_MESSAGE_TRUNCATED : UCS_OK;
        }
        in = malloc(sizeof(Incoming) + header_length + copy);
        if (!in)
                return rndv ? UCS_ERR_NO_MEMORY : UCS_OK;
        *in = (Incoming){ .d = d, .w = w, .length = length, .rndv = rndv, .hdr_len = header_length };
        if (header_length > 0)
                memcpy(in->data, header, header_length);
        if (copy > 0)
                memcpy(in->data + header_length, data, copy);
        if (keep)
                in->desc = data;
        in_push(&d->incoming, &d->incoming_tail, in);
        dataplane_kick(d);
        return keep ? UCS_INPROGRESS : UCS_OK;
}

static void on_recv_done(void *request, ucs_status_t status, size_t length, void *user_data) {
        Incoming *in = user_data;
        DataPlane *d = in->d;

        ucp_request_free(request);
        in->request = NULL;
        in->completed = true;
        in->status = ucs_to_errno(status);
        if (in->status == 0 && length != in->length)
                in->status = -EIO;
        LIST_REMOVE(in, d->recvs, in);
        in_push(&d->recvs_done, &d->recvs_done_tail, in);
        dataplane_kick(d);
}

static void recv_report(DataPlane *d, Incoming *in) {
        int r = in->completed && !in->cancelled ? in->status : -ECANCELED;
        void *token = in->token;

        if (r == 0)
                d->bytes_received += in->length;
        free(in);
        d->ops->received(d, token, r, d->userdata);
}

/* Hand an arrival to incoming() and land it where that says. */
static void incoming_accept(DataPlane *d, Incoming *in) {
        ucp_request_param_t param = {
                .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                                UCP_OP_ATTR_FIELD_DATATYPE | UCP_OP_ATTR_FIELD_MEMORY_TYPE,
                .cb.recv_am = on_recv_done,
                .user_data = in,
                .datatype = ucp_dt_make_contig(1),
                .memory_type = UCS_MEMORY_TYPE_HOST,
        };
        ucs_status_ptr_t sp;
        void *token = NULL, *dst;

        d->accepting = in;
        dst = d->ops->incoming(d, in->data, in->hdr_len, in->length, &token, d->userdata);
        d->accepting = NULL;
        in->token = token;
        if (d->freeing || !in->w) {
                /* dataplane_free() or the peer's disconnect from
                 * incoming(): the worker, and the descriptor with it, are
                 * gone. */
                in->completed = !d->freeing;
                in->status = -ECONNRESET;
                if (dst)
                        recv_report(d, in);
                else
                        free(in);
                return;
        }
        if (!dst) {
                if (in->desc) {
                        ucp_am_data_release(in->w->worker, in->desc);
                        dataplane_kick(d);
                }
                free(in);
                return;
        }
        if (!in->rndv) {
                if (in->length > 0)
                        memcpy(dst, in->desc ?: in->data + in->hdr_len, in->length);
                if (in->desc) {
                        ucp_am_data_release(in->w->worker, in->desc);
                        dataplane_kick(d);
                }
                in->completed = true;
                in->status = 0;
                recv_report(d, in);
                return;
        }

        /* UCX owns the descriptor from here, whatever the result.  On the
         * list first: a receive that fails at once (the sender is gone)
         * calls back before ucp_am_recv_data_nbx() returns. */
        LIST_PREPEND(in, d->recvs, in);
        sp = ucp_am_recv_data_nbx(in->w->worker, in->desc, dst, (size_t) in->length, &param);
        in->desc = NULL;
        dataplane_kick(d);
        if (in->completed)
                return; /* called back already: on recvs_done */
        if (sp == NULL || UCS_PTR_IS_ERR(sp)) {
                LIST_REMOVE(in, d->recvs, in);
                in->completed = true;
                in->status = ucs_to_errno(UCS_PTR_STATUS(sp));
                recv_report(d, in);
                return;
        }
        in->request = sp;
}

/* ---- the loop --------------------------------------------------------------- */

static size_t sends_count(const DataPlaneSend *s) {
        size_t n = 0;

        for (; s; s = s->next)
                n++;
        return n;
}

static size_t incoming_count(const Incoming *in) {
        size_t n = 0;

        for (; in; in = in->in_next)
                n++;
        return n;
}

/* Tell the caller what UCX did, from the loop.  Workers whose endpoint
 * failed go first; each queue is taken as far as it reached when the pass
 * began (what callbacks add waits for the next pass); a callback may free
 * the data plane, which ends the pass. */
static void dataplane_dispatch(DataPlane *d) {
        size_t n;

        d->dispatching++;
        while (d->failed && !d->freeing)
                worker_retire(d, d->failed, now_usec() + DATAPLANE_RETIRE_TIMEOUT_USEC);
        for (Worker *w = d->workers, *next; w && !d->freeing; w = next) {
                next = w->workers_next;
                if (w->parked && !worker_busy(d, w))
                        worker_destroy(d, w);
        }

        for (n = sends_count(d->sends_done); n > 0 && !d->freeing && d->sends_done; n--)
                send_report(d, send_pop(d));
        for (n = incoming_count(d->incoming); n > 0 && !d->freeing && d->incoming; n--)
                incoming_accept(d, in_pop(&d->incoming, &d->incoming_tail));
        for (n = incoming_count(d->recvs_done); n > 0 && !d->freeing && d->recvs_done; n--)
                recv_report(d, in_pop(&d->recvs_done, &d->recvs_done_tail));

        if (--d->dispatching == 0 && d->freeing)
                free(d); /* dataplane_free() ran in a callback and left this to us */
}

static void on_check(uv_check_t *h) {
        DataPlane *d = h->data;

        if (!d->kicked)
                return;
        d->kicked = false;
        (void) uv_idle_stop(&d->handles->idle);
        dataplane_progress(d);
        dataplane_dispatch(d);
}

static void on_handle_closed(uv_handle_t *handle) {
        DataPlaneHandles *h = handle->data;

        if (--h->n_open == 0)
                free(h);
}

static void handles_close(DataPlaneHandles *h) {
        uv_handle_t *all[] = { (uv_handle_t *) &h->check, (uv_handle_t *) &h->idle };

        if (h->n_open == 0) {
                free(h);
                return;
        }
        for (size_t i = 0; i < ELEMENTSOF(all); i++)
                if (all[i]->loop) { /* initialized */
                        all[i]->data = h;
                        uv_close(all[i], on_handle_closed);
                }
}

static int handles_open(DataPlane *d) {
        DataPlaneHandles *h = calloc(1, sizeof(DataPlaneHandles));
        int r;

        if (!h)
                return -ENOMEM;
        d->handles = h;
        r = uv_check_init(d->loop, &h->check);
        if (r < 0)
                return r;
        h->n_open++;
        h->check.data = d;
        r = uv_idle_init(d->loop, &h->idle);
        if (r < 0)
                return r;
        h->n_open++;
        h->idle.data = d;
        return uv_check_start(&h->check, on_check);
}

/* ---- the data plane ----------------------------------------------------------- */

/* The transports must carry our headers: asked of a worker made for the
 * question, so that a data plane that cannot work fails at once. */
static int check_transports(DataPlane *d, WdError *err) {
        ucp_worker_params_t wparams = {
                .field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE,
                .thread_mode = UCS_THREAD_MODE_SINGLE,
        };
        ucp_worker_attr_t attr = { .field_mask = UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER };
        ucp_worker_h worker;
        ucs_status_t st;

        st = ucp_worker_create(d->context, &wparams, &worker);
        if (st != UCS_OK)
                return ucs_error(err, st, "ucp_worker_create");
        st = ucp_worker_query(worker, &attr);
        ucp_worker_destroy(worker);
        if (st != UCS_OK)
                return ucs_error(err, st, "ucp_worker_query");
        if (attr.max_am_header < DATAPLANE_MAX_HEADER)
                return wd_error_set(err, -EOPNOTSUPP,
                                    "UCX: the transports carry active message headers of at most %zu bytes, "
                                    "the data plane needs %u",
                                    attr.max_am_header, DATAPLANE_MAX_HEADER);
        return 0;
}

/* UCX settings the data plane chooses unless the environment does: no
 * zero-copy sends on the tcp transport.  UCX 1.13 (Debian 12's) completes a
 * tcp zero-copy operation a second time when it handles a dead peer's
 * endpoint (an assertion, `comp->count > 0`, aborts the daemon; seen in 1 of
 * about 30 `kill -9` tests); with bcopy sends, and rendezvous data in
 * active-message fragments instead of tcp PUTs, no completion is pending
 * there.  The cost, on loopback tcp: ucx_perftest ucp_am_bw 16 MiB
 * messages 1.78 GB/s -> 0.81 GB/s.  Our large messages go by rendezvous,
 * which RDMA transports run as zero-copy GETs whatever ZCOPY_THRESH says. */
static const struct {
        const char *name, *value;
} dataplane_defaults[] = {
        { "ZCOPY_THRESH", "inf" },
        { "TCP_PUT_ENABLE", "n" },
};

static int read_config(ucp_config_t **ret, WdError *err) {
        ucp_config_t *config;
        ucs_status_t st;
        char var[64];

        st = ucp_config_read(NULL, NULL, &config);
        if (st != UCS_OK)
                return ucs_error(err, st, "ucp_config_read");
        for (size_t i = 0; i < ELEMENTSOF(dataplane_defaults); i++) {
                snprintf(var, sizeof(var), "UCX_%s", dataplane_defaults[i].name);
                if (getenv(var))
                        continue;
                st = ucp_config_modify(config, dataplane_defaults[i].name, dataplane_defaults[i].value);
                if (st != UCS_OK)
                        log_debug("dataplane: UCX has no setting %s: %s", dataplane_defaults[i].name,
                                  ucs_status_string(st));
        }
        *ret = config;
        return 0;
}

int dataplane_new(DataPlane **ret, uv_loop_t *loop, const DataPlaneOps *ops, void *userdata, WdError *err) {
        _cleanup_(dataplane_freep) DataPlane *d = NULL;
        ucp_params_t params = {
                .field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_NAME,
                .features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP,
                .name = "weightd",
        };
        ucp_config_t *config = NULL;
        ucs_status_t st;
        int r;

        if (!ops || !ops->incoming || !ops->received)
                return wd_error_set(err, -EINVAL, "dataplane: incoming() and received() are required");
        d = calloc(1, sizeof(DataPlane));
        if (!d)
                return wd_error_set(err, -ENOMEM, "dataplane: out of memory");
        d->loop = loop;
        d->ops = ops;
        d->userdata = userdata;

        r = read_config(&config, err);
        if (r < 0)
                return r;
        st = ucp_init(&params, config, &d->context);
        ucp_config_release(config);
        if (st != UCS_OK)
                return ucs_error(err, st, "ucp_init");
        r = check_transports(d, err);
        if (r < 0)
                return r;
        r = handles_open(d);
        if (r < 0)
                return wd_error_set(err, r, "dataplane: loop handles: %s", uv_strerror(r));

        *ret = TAKE_PTR(d);
        return 0;
}

DataPlane *dataplane_free(DataPlane *d) {
        DataPlaneSend *s;
        Incoming *in;

        if (!d || d->freeing)
                return NULL;
        d->freeing = true; /* no kicks, no arrivals, no new sends from here */
        if (d->handles)
                handles_close(d->handles);
        d->handles = NULL;

        if (d->workers) {
                uint64_t deadline = now_usec() + DATAPLANE_CLOSE_TIMEOUT_USEC,
                         flush_deadline = now_usec() + DATAPLANE_FLUSH_TIMEOUT_USEC;

                /* What is in flight now ends with -ECANCELED, whatever UCX
                 * says while the endpoints close. */
                for (s = d->sends; s; s = s->next)
                        ((SendOp *) s->request)->cancelled = true;
                LIST_FOREACH(in, i, d->recvs)
                        i->cancelled = true;
                /* Live peers first get what is in flight (for at most
                 * DATAPLANE_FLUSH_TIMEOUT_USEC: a live peer's flush takes
                 * milliseconds), then every worker goes: its endpoint closed
                 * by force, what it carried purged. */
                LIST_FOREACH(workers, w, d->workers)
                        worker_flush(w);
                while (d->n_flushing > 0 && now_usec() < flush_deadline)
                        LIST_FOREACH(workers, w, d->workers)
                                (void) ucp_worker_progress(w->worker);
                while (d->workers)
                        worker_retire(d, d->workers, deadline);
        }
        if (d->context)
                ucp_cleanup(d->context);

        while ((s = send_pop(d)))
                send_report(d, s);
        while ((s = d->sends)) {
                send_unlink(&d->sends, s);
                send_report(d, s);
        }
        while ((in = in_pop(&d->recvs_done, &d->recvs_done_tail)))
                recv_report(d, in);
        while ((in = d->recvs)) {
                LIST_REMOVE(in, d->recvs, in);
                in->completed = false;
                recv_report(d, in);
        }

        if (d->dispatching == 0)
                free(d);
        return NULL;
}

int dataplane_address(DataPlane *d, unsigned peer, const void **ret, size_t *ret_len, WdError *err) {
        int r;

        if (peer >= DATAPLANE_MAX_PEERS)
                return wd_error_set(err, -EINVAL, "dataplane: peer %u is out of range (fewer than %u)", peer,
                                    DATAPLANE_MAX_PEERS);
        if (d->freeing)
                return wd_error_set(err, -ESHUTDOWN, "dataplane: being freed");
        if (!d->next[peer]) {
                r = worker_new(d, peer, &d->next[peer], err);
                if (r < 0) {
                        wd_error_prefix(err, "dataplane: peer %u", peer);
                        return r;
                }
        }
        *ret = d->next[peer]->address;
        *ret_len = d->next[peer]->address_len;
        return 0;
}

int dataplane_connect(DataPlane *d, unsigned peer, const void *address, size_t address_len, WdError *err) {
        ucp_ep_params_t params = {
                .field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                              UCP_EP_PARAM_FIELD_ERR_HANDLER,
                .address = address,
                .err_mode = UCP_ERR_HANDLING_MODE_PEER,
                .err_handler.cb = on_ep_error,
        };
        ucs_status_t st;
        Worker *w;
        int r;

        if (peer >= DATAPLANE_MAX_PEERS)
                return wd_error_set(err, -EINVAL, "dataplane: peer %u is out of range (fewer than %u)", peer,
                                    DATAPLANE_MAX_PEERS);
        if (!address || address_len == 0)
                return wd_error_set(err, -EINVAL, "dataplane: peer %u: empty worker address", peer);
        if (d->freeing)
                return wd_error_set(err, -ESHUTDOWN, "dataplane: being freed");

        dataplane_disconnect(d, peer);
        /* The worker whose address the peer has; a new one if none went
         * out (the peer learns its address from the wireup). */
        w = d->next[peer];
        if (!w) {
                r = worker_new(d, peer, &w, err);
                if (r < 0) {
                        wd_error_prefix(err, "dataplane: peer %u", peer);
                        return r;
                }
        }
        d->next[peer] = NULL;
        d->active[peer] = w;
        params.err_handler.arg = w;
        st = ucp_ep_create(w->worker, &params, &w->ep);
        if (st != UCS_OK) {
                worker_retire(d, w, now_usec());
                ucs_error(err, st, "ucp_ep_create");
                wd_error_prefix(err, "dataplane: peer %u", peer);
                return ucs_to_errno(st);
        }
        w->ep_state = EP_OPEN;
        dataplane_kick(d); /* the wireup goes out from the loop */
        return 0;
}

void dataplane_disconnect(DataPlane *d, unsigned peer) {
        if (peer < DATAPLANE_MAX_PEERS && d->active[peer])
                worker_retire(d, d->active[peer], now_usec() + DATAPLANE_RETIRE_TIMEOUT_USEC);
}

void dataplane_forget(DataPlane *d, unsigned peer) {
        dataplane_disconnect(d, peer);
        if (peer < DATAPLANE_MAX_PEERS && d->next[peer])
                worker_retire(d, d->next[peer], now_usec() + DATAPLANE_RETIRE_TIMEOUT_USEC);
}

uint64_t dataplane_bytes_sent(const DataPlane *d) {
        return d->bytes_sent;
}

uint64_t dataplane_bytes_received(const DataPlane *d) {
        return d->bytes_received;
}
