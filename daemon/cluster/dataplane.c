/* The data plane (see dataplane.h): UCX active messages driven from the
 * libuv loop.
 *
 * One UCP context (AM and wakeup) and one single-threaded worker.  A
 * message is one active message with id DATAPLANE_AM_ID: our copy of the
 * caller's header and the payload straight from the caller's memory,
 * rendezvous from DATAPLANE_RNDV_MIN bytes on (the receiver pulls the
 * bytes into the destination it chose).
 *
 * Nothing the caller registered runs inside UCX.  UCX's callbacks (send
 * and receive completions, arrivals, endpoint errors) only record what
 * happened on the data plane's queues; dataplane_dispatch() hands it to the
 * caller from the loop, after the worker was progressed.  Arrivals are
 * kept (UCS_INPROGRESS) until then, so incoming() too runs from the loop and
 * may send, connect or free.  The worker is progressed from a uv_poll_t on
 * its event fd and, after anything was posted, from a uv_check_t (a
 * uv_idle_t keeps the loop from blocking until it ran); each pass
 * progresses until ucp_worker_arm() says the worker is idle, or a budget
 * of progress calls is spent (then the next loop iteration goes on), so a
 * transfer never starves the rest of the loop.
 *
 * UCX cannot take back a send it started: dataplane_send_cancel() and a
 * force-closed endpoint only decide what done() is told, and done() comes
 * once UCX has let go of the caller's memory.  dataplane_free() destroys
 * the worker before it calls anything, so nothing UCX does afterwards can
 * touch the memory of a send or a receive the caller was told ended. */
#include <inttypes.h>
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
/* Progress calls per pass before the loop gets a turn. */
#define DATAPLANE_PROGRESS_BUDGET 1024u
/* How long dataplane_free() waits for force-closed endpoints. */
#define DATAPLANE_CLOSE_TIMEOUT_USEC (2u * 1000u * 1000u)
#define DATAPLANE_FLUSH_TIMEOUT_USEC (250u * 1000u)

typedef enum ConnState {
        CONN_OPEN,
        CONN_FAILED,  /* UCX reported an error: closed from dispatch */
        CONN_CLOSING, /* ucp_ep_close_nbx() in flight */
} ConnState;

/* An endpoint to one peer; lives until UCX closed it. */
typedef struct Conn {
        DataPlane *d;
        ucp_ep_h ep;
        unsigned peer;
        ConnState state;
        void *close_request;
        bool close_posting, close_done;
        LIST_FIELDS(struct Conn, conns); /* on d->failed or d->closing */
} Conn;

/* What the data plane keeps of a send (DataPlaneSend.request). */
typedef struct SendOp {
        DataPlane *d;
        DataPlaneSend *s;
        Conn *conn;    /* NULL once disconnected */
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
        uv_poll_t poll;
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
        ucp_worker_h worker;
        ucp_address_t *address;
        size_t address_len;
        DataPlaneHandles *handles;
        bool kicked;

        Conn *conns[DATAPLANE_MAX_PEERS];
        Conn *failed, *closing;

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

static void dataplane_progress(DataPlane *d) {
        unsigned budget = DATAPLANE_PROGRESS_BUDGET;
        ucs_status_t st;

        for (;;) {
                while (ucp_worker_progress(d->worker))
                        if (--budget == 0) {
                                dataplane_kick(d);
                                return;
                        }
                st = ucp_worker_arm(d->worker);
                if (st == UCS_OK)
                        return; /* idle: the event fd says when not */
                if (st != UCS_ERR_BUSY) {
                        log_debug("dataplane: ucp_worker_arm: %s, polling instead", ucs_status_string(st));
                        dataplane_kick(d);
                        return;
                }
                if (--budget == 0) {
                        dataplane_kick(d);
                        return;
                }
        }
}

/* ---- endpoints ------------------------------------------------------------ */

static void conn_free(Conn *c) {
        free(c);
}

static void on_ep_closed(void *request, ucs_status_t status, void *user_data) {
        Conn *c = user_data;

        ucp_request_free(request);
        if (c->close_posting) { /* inside ucp_ep_close_nbx(): conn_close() frees it */
                c->close_done = true;
                return;
        }
        LIST_REMOVE(conns, c->d->closing, c);
        conn_free(c);
}

static void on_ep_error(void *arg, ucp_ep_h ep, ucs_status_t status) {
        Conn *c = arg;
        DataPlane *d = c->d;

        log_debug("dataplane: peer %u: %s", c->peer, ucs_status_string(status));
        if (c->state != CONN_OPEN)
                return;
        c->state = CONN_FAILED;
        LIST_PREPEND(conns, d->failed, c);
        dataplane_kick(d);
}

static void sends_mark_reset(DataPlaneSend *list, Conn *c) {
        for (DataPlaneSend *s = list; s; s = s->next) {
                SendOp *op = s->request;

                if (op->conn == c) {
                        op->conn = NULL;
                        op->reset = true;
                }
        }
}

/* Take c out of the peer table and close its endpoint by force: its sends
 * end at once (UCX purges them) and will report -ECONNRESET.  (A close that
 * flushes instead waits for the peer, and UCX 1.13 asserts when the worker
 * goes with such a close pending: dataplane_free() flushes first, with a
 * bound, and then closes by force.) */
static void conn_close(DataPlane *d, Conn *c, bool force) {
        ucp_request_param_t param = {
                .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                                UCP_OP_ATTR_FIELD_FLAGS,
                .flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0,
                .cb.send = on_ep_closed,
                .user_data = c,
        };
        ucs_status_ptr_t sp;

        if (c->state == CONN_CLOSING)
                return;
        if (c->state == CONN_FAILED)
                LIST_REMOVE(conns, d->failed, c);
        if (d->conns[c->peer] == c)
                d->conns[c->peer] = NULL;
        sends_mark_reset(d->sends, c);
        sends_mark_reset(d->sends_done, c);
        c->state = CONN_CLOSING;

        c->close_posting = true;
        sp = ucp_ep_close_nbx(c->ep, &param);
        c->close_posting = false;
        dataplane_kick(d);
        if (sp == NULL || UCS_PTR_IS_ERR(sp) || c->close_done) {
                if (UCS_PTR_IS_ERR(sp))
                        log_debug("dataplane: peer %u: ucp_ep_close_nbx: %s", c->peer,
                                  ucs_status_string(UCS_PTR_STATUS(sp)));
                conn_free(c);
                return;
        }
        c->close_request = sp;
        LIST_PREPEND(conns, d->closing, c);
}

/* user_data is the data plane: a flush may end after its endpoint's Conn
 * went (purged by the force-close). */
static void on_flushed(void *request, ucs_status_t status, void *user_data) {
        DataPlane *d = user_data;

        d->n_flushing--;
        ucp_request_free(request);
}

/* Flush c's endpoint: its rendezvous sends complete before the endpoint is
 * closed by force.  UCX 1.13's tcp transport may crash a live peer whose
 * endpoint back to us sees a force-close with rendezvous sends in flight. */
static void conn_flush(Conn *c) {
        ucp_request_param_t param = {
                .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA,
                .cb.send = on_flushed,
                .user_data = c->d,
        };
        ucs_status_ptr_t sp;

        if (c->state != CONN_OPEN)
                return;
        sp = ucp_ep_flush_nbx(c->ep, &param);
        if (sp != NULL && !UCS_PTR_IS_ERR(sp))
                c->d->n_flushing++;
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
        Conn *c;

        if (!s || !s->done || hdr_len > DATAPLANE_MAX_HEADER || (hdr_len > 0 && !hdr) || (length > 0 && !data) ||
            length > SIZE_MAX || peer >= DATAPLANE_MAX_PEERS)
                return -EINVAL;
        if (d->freeing)
                return -ENOTCONN;
        c = d->conns[peer];
        if (!c || c->state != CONN_OPEN)
                return -ENOTCONN;

        op = malloc(sizeof(SendOp) + hdr_len);
        if (!op)
                return -ENOMEM;
        *op = (SendOp){ .d = d, .s = s, .conn = c, .hdr_len = hdr_len };
        if (hdr_len > 0)
                memcpy(op->hdr, hdr, hdr_len);
        s->request = op;
        s->peer = peer;
        param.user_data = op;

        /* On the list before UCX sees it: UCX may call back before it
         * returns. */
        send_link(&d->sends, s);
        sp = ucp_am_send_nbx(c->ep, DATAPLANE_AM_ID, hdr_len > 0 ? op->hdr : NULL, hdr_len, data, (size_t) length,
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
        DataPlane *d = arg;
        bool rndv = param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV;
        bool keep = rndv || (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_DATA);
        size_t copy = keep ? 0 : length;
        Incoming *in;

        /* For a rendezvous an error status fails the sender's send; an
         * eager message is gone either way. */
        if (d->freeing)
                return rndv ? UCS_ERR_CANCELED : UCS_OK;
        if (header_length > DATAPLANE_MAX_HEADER) {
                log_debug("dataplane: dropping a message with a %zu byte header", header_length);
                return rndv ? UCS_ERR_MESSAGE_TRUNCATED : UCS_OK;
        }
        in = malloc(sizeof(Incoming) + header_length + copy);
        if (!in)
                return rndv ? UCS_ERR_NO_MEMORY : UCS_OK;
        *in = (Incoming){ .d = d, .length = length, .rndv = rndv, .hdr_len = header_length };
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

        dst = d->ops->incoming(d, in->data, in->hdr_len, in->length, &token, d->userdata);
        in->token = token;
        if (d->freeing) {
                /* dataplane_free() from incoming(): the worker, and the
                 * descriptor with it, are gone. */
                in->completed = false;
                if (dst)
                        recv_report(d, in);
                else
                        free(in);
                return;
        }
        if (!dst) {
                if (in->desc) {
                        ucp_am_data_release(d->worker, in->desc);
                        dataplane_kick(d);
                }
                free(in);
                return;
        }
        if (!in->rndv) {
                if (in->length > 0)
                        memcpy(dst, in->desc ?: in->data + in->hdr_len, in->length);
                if (in->desc) {
                        ucp_am_data_release(d->worker, in->desc);
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
        sp = ucp_am_recv_data_nbx(d->worker, in->desc, dst, (size_t) in->length, &param);
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

/* Tell the caller what UCX did, from the loop.  Each queue is taken as far
 * as it reached when the pass began (what callbacks add waits for the next
 * pass); a callback may free the data plane, which ends the pass. */
static void dataplane_dispatch(DataPlane *d) {
        size_t n;

        d->dispatching++;
        while (d->failed && !d->freeing)
                conn_close(d, d->failed, true);

        for (n = sends_count(d->sends_done); n > 0 && !d->freeing && d->sends_done; n--)
                send_report(d, send_pop(d));
        for (n = incoming_count(d->incoming); n > 0 && !d->freeing && d->incoming; n--)
                incoming_accept(d, in_pop(&d->incoming, &d->incoming_tail));
        for (n = incoming_count(d->recvs_done); n > 0 && !d->freeing && d->recvs_done; n--)
                recv_report(d, in_pop(&d->recvs_done, &d->recvs_done_tail));

        if (--d->dispatching == 0 && d->freeing)
                free(d); /* dataplane_free() ran in a callback and left this to us */
}

static void on_poll(uv_poll_t *h, int status, int events) {
        DataPlane *d = h->data;

        if (status < 0)
                log_debug("dataplane: polling the worker's event fd: %s", uv_strerror(status));
        dataplane_progress(d);
        dataplane_dispatch(d);
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
        uv_handle_t *all[] = { (uv_handle_t *) &h->poll, (uv_handle_t *) &h->check, (uv_handle_t *) &h->idle };

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

static int handles_open(DataPlane *d, int efd) {
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
        r = uv_poll_init(d->loop, &h->poll, efd);
        if (r < 0)
                return r;
        h->n_open++;
        h->poll.data = d;

        r = uv_poll_start(&h->poll, UV_READABLE, on_poll);
        if (r < 0)
                return r;
        return uv_check_start(&h->check, on_check);
}

/* ---- the data plane ----------------------------------------------------------- */

int dataplane_new(DataPlane **ret, uv_loop_t *loop, const DataPlaneOps *ops, void *userdata, WdError *err) {
        _cleanup_(dataplane_freep) DataPlane *d = NULL;
        ucp_params_t params = {
                .field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_NAME,
                .features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP,
                .name = "weightd",
        };
        ucp_worker_params_t wparams = {
                .field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE,
                .thread_mode = UCS_THREAD_MODE_SINGLE,
        };
        ucp_worker_attr_t attr = { .field_mask = UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER };
        ucp_am_handler_param_t am = {
                .field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_FLAGS |
                              UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG,
                .id = DATAPLANE_AM_ID,
                .flags = UCP_AM_FLAG_WHOLE_MSG | UCP_AM_FLAG_PERSISTENT_DATA,
                .cb = on_am,
        };
        ucs_status_t st;
        int efd, r;

        if (!ops || !ops->incoming || !ops->received)
                return wd_error_set(err, -EINVAL, "dataplane: incoming() and received() are required");
        d = calloc(1, sizeof(DataPlane));
        if (!d)
                return wd_error_set(err, -ENOMEM, "dataplane: out of memory");
        d->loop = loop;
        d->ops = ops;
        d->userdata = userdata;
        am.arg = d;

        st = ucp_init(&params, NULL, &d->context);
        if (st != UCS_OK)
                return ucs_error(err, st, "ucp_init");
        st = ucp_worker_create(d->context, &wparams, &d->worker);
        if (st != UCS_OK)
                return ucs_error(err, st, "ucp_worker_create");
        st = ucp_worker_query(d->worker, &attr);
        if (st != UCS_OK)
                return ucs_error(err, st, "ucp_worker_query");
        if (attr.max_am_header < DATAPLANE_MAX_HEADER)
                return wd_error_set(err, -EOPNOTSUPP,
                                    "UCX: the transports carry active message headers of at most %zu bytes, "
                                    "the data plane needs %u",
                                    attr.max_am_header, DATAPLANE_MAX_HEADER);
        st = ucp_worker_set_am_recv_handler(d->worker, &am);
        if (st != UCS_OK)
                return ucs_error(err, st, "ucp_worker_set_am_recv_handler");
        st = ucp_worker_get_address(d->worker, &d->address, &d->address_len);
        if (st != UCS_OK)
                return ucs_error(err, st, "ucp_worker_get_address");
        st = ucp_worker_get_efd(d->worker, &efd);
        if (st != UCS_OK)
                return ucs_error(err, st, "ucp_worker_get_efd");

        r = handles_open(d, efd);
        if (r < 0)
                return wd_error_set(err, r, "dataplane: watching the worker's event fd: %s", uv_strerror(r));
        dataplane_progress(d); /* arms the worker */

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

        if (d->worker) {
                uint64_t deadline = now_usec() + DATAPLANE_CLOSE_TIMEOUT_USEC,
                         flush_deadline = now_usec() + DATAPLANE_FLUSH_TIMEOUT_USEC;

                /* What is in flight now ends with -ECANCELED, whatever UCX
                 * says while the endpoints close. */
                for (s = d->sends; s; s = s->next)
                        ((SendOp *) s->request)->cancelled = true;
                LIST_FOREACH(in, i, d->recvs)
                        i->cancelled = true;
                /* Arrivals nobody accepted go back to UCX, unseen. */
                while ((in = in_pop(&d->incoming, &d->incoming_tail))) {
                        if (in->desc)
                                ucp_am_data_release(d->worker, in->desc);
                        free(in);
                }
                /* Live peers first get what is in flight (for at most
                 * DATAPLANE_FLUSH_TIMEOUT_USEC: a live peer's flush takes
                 * milliseconds), then every endpoint is closed by force. */
                for (unsigned i = 0; i < DATAPLANE_MAX_PEERS; i++)
                        if (d->conns[i])
                                conn_flush(d->conns[i]);
                while (d->n_flushing > 0 && now_usec() < flush_deadline)
                        (void) ucp_worker_progress(d->worker);
                for (unsigned i = 0; i < DATAPLANE_MAX_PEERS; i++)
                        if (d->conns[i])
                                conn_close(d, d->conns[i], true);
                /* Live peers' endpoints flush what is in flight, failed ones'
                 * are purged; UCX completes both (and the closes) from its
                 * progress, which gets DATAPLANE_CLOSE_TIMEOUT_USEC. */
                while ((d->closing || d->sends || d->n_flushing > 0) && now_usec() < deadline)
                        (void) ucp_worker_progress(d->worker);
                if (d->address)
                        ucp_worker_release_address(d->worker, d->address);
                /* With the worker gone nothing writes into a destination or
                 * reads from a send's memory any more: only now the caller
                 * hears of them. */
                ucp_worker_destroy(d->worker);
        }
        while (d->closing) {
                Conn *c = d->closing;

                LIST_REMOVE(conns, d->closing, c);
                conn_free(c);
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

void dataplane_address(DataPlane *d, const void **ret, size_t *ret_len) {
        *ret = d->address;
        *ret_len = d->address_len;
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
        Conn *c;

        if (peer >= DATAPLANE_MAX_PEERS)
                return wd_error_set(err, -EINVAL, "dataplane: peer %u is out of range (fewer than %u)", peer,
                                    DATAPLANE_MAX_PEERS);
        if (!address || address_len == 0)
                return wd_error_set(err, -EINVAL, "dataplane: peer %u: empty worker address", peer);
        if (d->freeing)
                return wd_error_set(err, -ESHUTDOWN, "dataplane: being freed");

        dataplane_disconnect(d, peer);
        c = calloc(1, sizeof(Conn));
        if (!c)
                return wd_error_set(err, -ENOMEM, "dataplane: out of memory");
        *c = (Conn){ .d = d, .peer = peer, .state = CONN_OPEN };
        params.err_handler.arg = c;
        st = ucp_ep_create(d->worker, &params, &c->ep);
        if (st != UCS_OK) {
                conn_free(c);
                ucs_error(err, st, "ucp_ep_create");
                wd_error_prefix(err, "dataplane: peer %u", peer);
                return ucs_to_errno(st);
        }
        d->conns[peer] = c;
        dataplane_kick(d); /* the wireup goes out from the loop */
        return 0;
}

void dataplane_disconnect(DataPlane *d, unsigned peer) {
        if (peer < DATAPLANE_MAX_PEERS && d->conns[peer])
                conn_close(d, d->conns[peer], true);
}

uint64_t dataplane_bytes_sent(const DataPlane *d) {
        return d->bytes_sent;
}

uint64_t dataplane_bytes_received(const DataPlane *d) {
        return d->bytes_received;
}
