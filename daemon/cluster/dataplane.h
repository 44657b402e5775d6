/* The data plane: bulk bytes between nodes over UCX (DESIGN.md,
 * "Cluster").
 *
 * One UCP context per daemon, and a worker for each connection with a peer
 * (destroyed when the connection ends, so that nothing of it outlives it);
 * active messages only.  The address of the worker for peer goes to that
 * peer in the mesh's Hello (dataplane_address()); dataplane_connect() makes
 * an endpoint from the peer's address.  A message is a small header
 * (copied) and a payload that UCX sends from the caller's memory (rendezvous
 * for large payloads: the receiver pulls the bytes straight into the
 * destination it chose, no bounce buffer).  Progress is driven from the
 * libuv loop: each worker's event fd is watched with a uv_poll_t, and the
 * worker is progressed until ucp_worker_arm() says it is idle.  The
 * transports are whatever UCX finds (UCX_TLS and friends choose; tcp in the
 * tests).  The data plane does not authenticate: the bytes it moves are
 * checked against checksums sent over the authenticated mesh.
 *
 * Loop thread only.  Callbacks run from the loop (never inside
 * dataplane_send() or dataplane_connect()). */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "util/error.h"
#include "macro.h"

typedef struct DataPlane DataPlane;
typedef struct DataPlaneSend DataPlaneSend;

/* A send in flight, embedded in the caller's object; valid until done. */
struct DataPlaneSend {
        /* status 0 (the payload left and the caller's memory may be
         * reused), or -errno (the peer went, the send was cancelled). */
        void (*done)(DataPlaneSend *s, int status);
        void *request; /* the data plane's */
        unsigned peer;
        DataPlaneSend *prev, *next; /* the data plane's */
};

typedef struct DataPlaneOps {
        /* A message arrived from some peer: hdr (hdr_len bytes, valid for
         * the call) and length bytes of payload.  Return the destination
         * (length writable bytes that stay valid until received()), or NULL
         * to drop the payload.  *ret_token is handed back to received(). */
        void *(*incoming)(DataPlane *d, const void *hdr, size_t hdr_len, uint64_t length, void **ret_token,
                          void *userdata);
        /* The payload of an accepted message landed (status 0) or did not
         * (-errno, e.g. the sender went away or dataplane_free() ran). */
        void (*received)(DataPlane *d, void *token, int status, void *userdata);
} DataPlaneOps;

/* Returns 0 or -errno/WD_E_* with err naming what UCX said. */
int dataplane_new(DataPlane **ret, uv_loop_t *loop, const DataPlaneOps *ops, void *userdata, WdError *err);
/* Cancel everything in flight (sends and receives get their callbacks with
 * -ECANCELED before this returns), close the endpoints, free the worker. */
DataPlane *dataplane_free(DataPlane *d);
DEFINE_TRIVIAL_CLEANUP_FUNC(DataPlane *, dataplane_free);

/* The address of the worker for the next connection with peer (an index
 * the caller chooses, < DATAPLANE_MAX_PEERS), for the Hello to it: made
 * on the first call, the same until dataplane_connect() takes that worker,
 * a new one after.  *ret is valid until then, or until that connection
 * ends.  Returns 0 or -errno with err naming what UCX said. */
#define DATAPLANE_MAX_PEERS 1024u
int dataplane_address(DataPlane *d, unsigned peer, const void **ret, size_t *ret_len, WdError *err);

/* An endpoint to peer from its worker address, on the worker whose address
 * went out last (dataplane_address()); replaces the old connection
 * (disconnecting it first). */
int dataplane_connect(DataPlane *d, unsigned peer, const void *address, size_t address_len, WdError *err);
/* End the connection with peer: its endpoint is closed and its worker
 * destroyed; its sends and receives in flight end with -ECONNRESET (their
 * callbacks run from the loop later).  A worker whose address went out
 * since stays. */
void dataplane_disconnect(DataPlane *d, unsigned peer);
/* dataplane_disconnect(), and the worker whose address went out since goes
 * too: peer is to be someone else (the nodes were reconfigured). */
void dataplane_forget(DataPlane *d, unsigned peer);

/* Send hdr (at most DATAPLANE_MAX_HEADER bytes, copied) and length bytes
 * at data (must stay valid until s->done) to peer.  Returns 0 (s->done
 * will be called exactly once, from the loop), or -ENOTCONN, -EINVAL,
 * -ENOMEM (s->done is not called). */
#define DATAPLANE_MAX_HEADER 256u
int dataplane_send(DataPlane *d, unsigned peer, const void *hdr, size_t hdr_len, const void *data, uint64_t length,
                   DataPlaneSend *s);
/* Give up a send: done(-ECANCELED) follows (from the loop), unless it
 * completed already. */
void dataplane_send_cancel(DataPlane *d, DataPlaneSend *s);

/* Bytes handed to UCX and received by this data plane since it started. */
uint64_t dataplane_bytes_sent(const DataPlane *d);
uint64_t dataplane_bytes_received(const DataPlane *d);
