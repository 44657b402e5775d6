/* A peer (see peer.h): framing under a uv_poll_t, an output queue whose
 * frames borrow descriptors from references they hold (nothing is
 * duplicated at queue time), per-uid charges, and the ready list.
 *
 * Reading stops while the peer has max_pending requests in flight, so a
 * peer cannot queue unbounded work; peer_resume() puts it on the ready list
 * and the context's uv_check_t reads on.  Output a peer does not read is
 * capped per connection and per uid, counting what is queued behind the
 * frame being sent (one reply of any legal size can always go out); over
 * the uid's cap the uid's connection with the most unread output is the one
 * closed.  A peer that breaks the protocol is logged and disconnected. */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "macro.h"
#include "server/peer.h"
#include "util/fs-util.h"
#include "util/log.h"
#include "util/time-util.h"

/* A line about a peer, with its uid as the journal's PEER_UID=. */
#define log_peer_info(p, ...) log_info_fields(&(LogFields){ .peer_uid = &(p)->cred.uid }, __VA_ARGS__)
#define log_peer_warning(p, ...) log_warning_fields(&(LogFields){ .peer_uid = &(p)->cred.uid }, __VA_ARGS__)

struct OutFrame {
        OutFrame *next;
        uint8_t *buf;
        size_t len, off;
        int *fds; /* borrowed from keep */
        size_t n_fds;
        PeerRef *keep;
        size_t n_keep;
};

static void refs_release(PeerRef *refs, size_t n) {
        for (size_t i = 0; i < n; i++)
                if (refs[i].release)
                        refs[i].release(refs[i].obj);
        free(refs);
}

static void out_frame_free(OutFrame *f) {
        refs_release(f->keep, f->n_keep);
        free(f->fds);
        free(f->buf);
        free(f);
}

/* ---- the context -------------------------------------------------------- */

static void peer_read(Peer *p);

static void on_ready_idle(uv_idle_t *h);

static void on_ready_check(uv_check_t *h) {
        PeerContext *ctx = h->data;
        unsigned n = 0;

        /* As many as were ready when the pass began, each popped off the
         * list before it reads, so a peer closed meanwhile is never on a
         * list of ours; one that becomes ready again waits for the next. */
        LIST_FOREACH(ready, p, ctx->ready)
                n++;
        uv_idle_stop(&ctx->ready_idle);
        while (n-- > 0 && ctx->ready) {
                Peer *p = ctx->ready;

                LIST_REMOVE(ready, ctx->ready, p);
                p->on_ready = false;
                peer_read(p);
        }
        if (ctx->ready)
                uv_idle_start(&ctx->ready_idle, on_ready_idle);
}

static void on_ready_idle(uv_idle_t *h) {
        /* Nothing: its being active makes the loop poll without blocking,
         * so the check runs at once. */
}

int peer_context_init(PeerContext *ctx, uv_loop_t *loop, const PeerLimits *limits, const PeerOps *ops,
                      void *userdata) {
        int r;

        *ctx = (PeerContext){ .loop = loop, .ops = ops, .userdata = userdata, .limits = *limits };
        r = uv_check_init(loop, &ctx->ready_check);
        if (r < 0)
                return r;
        r = uv_idle_init(loop, &ctx->ready_idle);
        if (r < 0) {
                uv_close((uv_handle_t *) &ctx->ready_check, NULL);
                return r;
        }
        ctx->ready_check.data = ctx->ready_idle.data = ctx;
        uv_check_start(&ctx->ready_check, on_ready_check);
        return 0;
}

void peer_context_close(PeerContext *ctx) {
        while (ctx->peers)
                peer_close(ctx->peers);
        uv_close((uv_handle_t *) &ctx->ready_check, NULL);
        uv_close((uv_handle_t *) &ctx->ready_idle, NULL);
}

void peer_context_set_limits(PeerContext *ctx, const PeerLimits *limits) {
        ctx->limits = *limits;
        LIST_FOREACH(peers, p, ctx->peers)
                p->in.max_frame = limits->max_request_size;
}

UserCharge *peer_context_user(PeerContext *ctx, uid_t uid) {
        UserCharge *u;

        for (u = ctx->users; u; u = u->next)
                if (u->uid == uid)
                        return u;
        u = calloc(1, sizeof(UserCharge));
        if (!u)
                return NULL;
        u->uid = uid;
        u->next = ctx->users;
        ctx->users = u;
        return u;
}

static void user_forget(PeerContext *ctx, UserCharge *u) {
        if (u->conns > 0 || u->leases > 0)
                return;
        for (UserCharge **x = &ctx->users; *x; x = &(*x)->next)
                if (*x == u) {
                        *x = u->next;
                        free(u);
                        return;
                }
}

void peer_context_stop(PeerContext *ctx) {
        ctx->stopping = true;
        /* peer_close() unlinks p (and clears its next): step first. */
        for (Peer *p = ctx->peers, *next; p; p = next) {
                next = p->peers_next;
                peer_close_when_sent(p);
        }
}

void peer_context_tick(PeerContext *ctx, uint64_t now) {
        for (Peer *p = ctx->peers, *next; p; p = next) {
                next = p->peers_next;
                if (p->closing)
                        continue;
                if (!p->hello && now - p->accepted_usec >= ctx->limits.hello_timeout_usec) {
                        log_peer_info(p, "%s: no Hello within %" PRIu64 " s, disconnecting", p->name,
                                      ctx->limits.hello_timeout_usec / 1000000u);
                        peer_close(p);
                } else if (p->frame_started_usec > 0 &&
                           now - p->frame_started_usec >= ctx->limits.frame_timeout_usec) {
                        log_peer_info(p, "%s: a frame did not complete within %" PRIu64 " s, disconnecting", p->name,
                                      ctx->limits.frame_timeout_usec / 1000000u);
                        peer_close(p);
                }
        }
}

/* ---- one peer ----------------------------------------------------------- */

static void peer_update_poll(Peer *p);
static void on_poll(uv_poll_t *h, int status, int events);

static void peer_free(Peer *p) {
        while (p->out_head) {
                OutFrame *f = p->out_head;

                p->out_head = f->next;
                out_frame_free(f);
        }
        wire_reader_deinit(&p->in);
        safe_close(p->fd);
        free(p);
}

static void on_closed(uv_handle_t *h) {
        peer_free(h->data);
}

int peer_new(PeerContext *ctx, int fd, const struct ucred *cred, Peer **ret) {
        UserCharge *u;
        Peer *p;
        int r;

        if (ctx->stopping)
                return -ESHUTDOWN;
        if (ctx->n_peers >= ctx->limits.max_connections)
                return -EUSERS;
        u = peer_context_user(ctx, cred->uid);
        if (!u)
                return -ENOMEM;
        if (u->conns >= ctx->limits.max_connections_per_uid) {
                user_forget(ctx, u);
                return -EDQUOT;
        }
        p = calloc(1, sizeof(Peer));
        if (!p) {
                user_forget(ctx, u);
                return -ENOMEM;
        }
        p->ctx = ctx;
        p->fd = fd;
        p->cred = *cred;
        p->user = u;
        p->accepted_usec = now_usec();
        snprintf(p->name, sizeof(p->name), "pid %d uid %u", (int) cred->pid, (unsigned) cred->uid);
        wire_reader_init(&p->in, ctx->limits.max_request_size, 0);
        r = uv_poll_init(ctx->loop, &p->poll, fd);
        if (r < 0) {
                wire_reader_deinit(&p->in);
                free(p);
                user_forget(ctx, u);
                return r;
        }
        p->poll.data = p;
        LIST_PREPEND(peers, ctx->peers, p);
        ctx->n_peers++;
        u->conns++;
        peer_update_poll(p);
        if (ctx->ops->changed)
                ctx->ops->changed(ctx->userdata);
        *ret = p;
        return 0;
}

static bool peer_wants_input(const Peer *p) {
        return !p->closing && !p->close_pending && !p->close_when_sent && !p->ctx->stopping && p->n_requests < p->ctx->limits.max_pending;
}

static void peer_update_poll(Peer *p) {
        int events = 0;

        if (p->closing || p->close_pending)
                return;
        if (peer_wants_input(p))
                events |= UV_READABLE;
        else
                /* Not reading (max_pending requests in flight): still hear
                 * the client hang up, so that its requests, and the reads
                 * nobody else waits for, are cancelled now rather than when
                 * one of them ends. */
                events |= UV_DISCONNECT;
        if (p->out_head)
                events |= UV_WRITABLE;
        if (events == p->events)
                return;
        p->events = events;
        if (events)
                (void) uv_poll_start(&p->poll, events, on_poll);
        else
                (void) uv_poll_stop(&p->poll);
}

static void peer_uncharge_input(Peer *p) {
        p->user->in_bytes -= p->in_charged;
        p->in_charged = 0;
}

void peer_close(Peer *p) {
        PeerContext *ctx = p->ctx;

        if (p->closing)
                return;
        p->closing = true;
        if (p->on_ready) {
                LIST_REMOVE(ready, ctx->ready, p);
                p->on_ready = false;
        }
        /* The requests first: a reply being built may still take a lease. */
        if (ctx->ops->closing)
                ctx->ops->closing(p, ctx->userdata);
        while (p->leases)
                peer_lease_drop(p, p->leases);

        LIST_REMOVE(peers, ctx->peers, p);
        ctx->n_peers--;
        p->user->conns--;
        if (!p->close_pending) /* uncharged then */
                p->user->out_bytes -= p->out_bytes;
        p->out_bytes = 0;
        peer_uncharge_input(p);
        user_forget(ctx, p->user);
        p->user = NULL;
        /* What is queued will never be sent: let go of it now. */
        while (p->out_head) {
                OutFrame *f = p->out_head;

                p->out_head = f->next;
                out_frame_free(f);
        }
        p->out_tail = NULL;
        uv_close((uv_handle_t *) &p->poll, on_closed);
        if (ctx->ops->changed)
                ctx->ops->changed(ctx->userdata);
}

/* Close p from the loop's ready list, not under the caller.  Output is
 * queued from inside job completions (a reply, a progress event) that walk
 * a job's waiters, and closing a peer drops its requests, which are such
 * waiters: a send that fails or a limit that trips there must not free
 * them underneath.  Until it goes, p neither reads nor sends, and its
 * output no longer counts against its uid (so the uid's cap closes no
 * other connection for it). */
static void peer_close_deferred(Peer *p) {
        PeerContext *ctx = p->ctx;

        if (p->closing || p->close_pending)
                return;
        p->close_pending = true;
        p->user->out_bytes -= p->out_bytes;
        if (p->events) {
                (void) uv_poll_stop(&p->poll);
                p->events = 0;
        }
        if (!p->on_ready) {
                LIST_PREPEND(ready, ctx->ready, p);
                p->on_ready = true;
        }
        uv_idle_start(&ctx->ready_idle, on_ready_idle);
}

void peer_close_when_sent(Peer *p) {
        if (p->closing)
                return;
        p->close_when_sent = true;
        if (!p->out_head)
                peer_close(p);
        else
                peer_update_poll(p);
}

void peer_link(Peer *p, PeerLink *l) {
        LIST_PREPEND(links, p->requests, l);
        p->n_requests++;
}

void peer_unlink(Peer *p, PeerLink *l) {
        LIST_REMOVE(links, p->requests, l);
        p->n_requests--;
}

void peer_resume(Peer *p) {
        PeerContext *ctx = p->ctx;

        if (p->closing || p->on_ready)
                return;
        peer_update_poll(p);
        if (!peer_wants_input(p) || !wire_reader_partial(&p->in))
                return; /* nothing buffered: the poll reads when more comes */
        LIST_PREPEND(ready, ctx->ready, p);
        p->on_ready = true;
        uv_idle_start(&ctx->ready_idle, on_ready_idle);
}

/* ---- leases ------------------------------------------------------------- */

const char *peer_lease_limit(Peer *p, char *buf, size_t size) {
        if (p->n_leases >= PEER_MAX_LEASES)
                snprintf(buf, size, "this connection holds %u leases, the limit", PEER_MAX_LEASES);
        else if (p->user->leases >= PEER_MAX_LEASES_PER_UID)
                snprintf(buf, size, "uid %u holds %u leases, the limit", (unsigned) p->cred.uid,
                         PEER_MAX_LEASES_PER_UID);
        else
                return NULL;
        return buf;
}

uint64_t peer_lease_add(Peer *p, PeerRef ref) {
        PeerLease *l = calloc(1, sizeof(PeerLease));

        if (!l) {
                ref.release(ref.obj);
                return 0;
        }
        l->id = ++p->ctx->next_lease_id;
        l->ref = ref;
        LIST_PREPEND(leases, p->leases, l);
        p->n_leases++;
        p->user->leases++;
        p->ctx->n_leases++;
        return l->id;
}

PeerLease *peer_lease_find(Peer *p, uint64_t id) {
        LIST_FOREACH(leases, l, p->leases)
                if (l->id == id)
                        return l;
        return NULL;
}

void peer_lease_drop(Peer *p, PeerLease *l) {
        LIST_REMOVE(leases, p->leases, l);
        p->n_leases--;
        p->user->leases--;
        p->ctx->n_leases--;
        l->ref.release(l->ref.obj);
        free(l);
}

/* ---- output ------------------------------------------------------------- */

/* Unread output that counts against the limits: what waits behind the
 * frame being sent. */
static size_t peer_backlog(const Peer *p) {
        const OutFrame *h = p->out_head;

        return h ? p->out_bytes - (h->len - h->off) : 0;
}

/* Write what the socket takes.  Returns 0 or -errno: the peer is closed,
 * or with deferred (under peer_queue()) will be, from the ready list. */
static int peer_flush(Peer *p, bool deferred) {
        while (p->out_head) {
                OutFrame *f = p->out_head;
                size_t before = f->off;
                int r;

                r = wire_send(p->fd, f->buf, f->len, f->fds, f->n_fds, &f->off);
                p->out_bytes -= f->off - before;
                p->user->out_bytes -= f->off - before;
                if (r == -EAGAIN)
                        break;
                if (r < 0) {
                        log_debug_errno(r, "%s: send failed, disconnecting: %m", p->name);
                        deferred ? peer_close_deferred(p) : peer_close(p);
                        return r;
                }
                p->out_head = f->next;
                if (!p->out_head)
                        p->out_tail = NULL;
                out_frame_free(f);
        }
        if (!p->out_head && p->close_when_sent) {
                deferred ? peer_close_deferred(p) : peer_close(p);
                return -ECONNRESET;
        }
        peer_update_poll(p);
        return 0;
}

/* Over the uid's output cap: close its connection with the most unread
 * output (the one that does not read), whichever queued last. */
static void user_enforce_out(Peer *p) {
        Peer *worst = NULL;

        while (p->user && p->user->out_bytes > PEER_MAX_OUT_BYTES_PER_UID) {
                UserCharge *u = p->user;

                worst = NULL;
                LIST_FOREACH(peers, q, p->ctx->peers)
                        if (q->user == u && !q->closing && !q->close_pending && (!worst || peer_backlog(q) > peer_backlog(worst)))
                                worst = q;
                if (!worst || peer_backlog(worst) == 0)
                        return;
                log_peer_warning(worst, "%s: more than %zu bytes of replies not read over the connections of uid %u, "
                                 "disconnecting the one that reads least",
                                 worst->name, PEER_MAX_OUT_BYTES_PER_UID, (unsigned) u->uid);
                peer_close_deferred(worst);
                if (worst == p)
                        return;
        }
}

int peer_queue(Peer *p, uint8_t *buf, size_t len, const int *fds, size_t n_fds, PeerRef *keep, size_t n_keep) {
        OutFrame *f;
        int r;

        if (p->closing || p->close_pending) {
                refs_release(keep, n_keep);
                free(buf);
                return -ECONNRESET;
        }
        f = calloc(1, sizeof(OutFrame));
        if (f && n_fds > 0) {
                f->fds = calloc(n_fds, sizeof(int));
                if (f->fds)
                        memcpy(f->fds, fds, n_fds * sizeof(int));
        }
        if (!f || (n_fds > 0 && !f->fds)) {
                free(f);
                refs_release(keep, n_keep);
                free(buf);
                peer_close_deferred(p);
                return -ENOMEM;
        }
        f->buf = buf;
        f->len = len;
        f->n_fds = n_fds;
        f->keep = keep;
        f->n_keep = n_keep;
        if (p->out_tail)
                p->out_tail->next = f;
        else
                p->out_head = f;
        p->out_tail = f;
        p->out_bytes += len;
        p->user->out_bytes += len;

        r = peer_flush(p, true);
        if (r < 0)
                return r;
        if (peer_backlog(p) > PEER_MAX_OUT_BYTES) {
                log_peer_warning(p, "%s: more than %zu bytes of replies not read, disconnecting", p->name,
                                 PEER_MAX_OUT_BYTES);
                peer_close_deferred(p);
                return -ENOBUFS;
        }
        user_enforce_out(p);
        return p->close_pending ? -ENOBUFS : 0;
}

int peer_send(Peer *p, const WireEnvelope *env, const int *fds, size_t n_fds, PeerRef *keep, size_t n_keep) {
        uint8_t *buf;
        size_t len;
        int r;

        if (p->closing || p->close_pending) {
                refs_release(keep, n_keep);
                return -ECONNRESET;
        }
        r = wire_pack(env, SIZE_MAX, &buf, &len);
        if (r < 0) {
                refs_release(keep, n_keep);
                log_warning_errno(r, "%s: cannot pack a reply: %m", p->name);
                peer_close_deferred(p);
                return r;
        }
        return peer_queue(p, buf, len, fds, n_fds, keep, n_keep);
}

/* ---- input -------------------------------------------------------------- */

/* Keep the uid's charge in step with the input buffer; false when the uid
 * holds too much (the peer is closed). */
static bool peer_charge_input(Peer *p) {
        UserCharge *u = p->user;

        u->in_bytes = u->in_bytes - p->in_charged + p->in.size;
        p->in_charged = p->in.size;
        if (u->in_bytes <= PEER_MAX_IN_BYTES_PER_UID)
                return true;
        log_peer_warning(p, "%s: the connections of uid %u buffer more than %zu bytes of requests, disconnecting",
                         p->name, (unsigned) u->uid, PEER_MAX_IN_BYTES_PER_UID);
        peer_close(p);
        return false;
}

/* Whether the buffer ends in the middle of a frame (its header or body). */
static bool frame_incomplete(const WireReader *r) {
        size_t avail = r->used - r->done;
        const uint8_t *h = r->buf + r->done;
        uint32_t n;

        if (avail == 0)
                return false;
        if (avail < WIRE_HEADER_SIZE)
                return true;
        n = (uint32_t) h[0] | (uint32_t) h[1] << 8 | (uint32_t) h[2] << 16 | (uint32_t) h[3] << 24;
        return avail < WIRE_HEADER_SIZE + (size_t) n;
}

/* Decode and hand over every complete frame in the buffer, as long as the
 * peer may have more requests in flight.  Returns 0, or < 0 when the peer
 * was closed. */
static int peer_process(Peer *p) {
        PeerContext *ctx = p->ctx;

        while (peer_wants_input(p)) {
                const uint8_t *payload;
                WireEnvelope *env;
                size_t len;
                int r;

                r = wire_reader_next(&p->in, &payload, &len);
                if (r == 0)
                        break;
                if (r < 0) {
                        log_peer_warning(p, "%s: frame longer than the limit of %" PRIu32 " bytes, disconnecting",
                                         p->name, ctx->limits.max_request_size);
                        peer_close(p);
                        return r;
                }
                env = wire_unpack_bounded(payload, len, WIRE_UNPACK_BUDGET(len));
                if (!env) {
                        log_peer_warning(p, "%s: undecodable frame of %zu bytes, disconnecting", p->name, len);
                        peer_close(p);
                        return -EBADMSG;
                }
                r = ctx->ops->frame(p, env, ctx->userdata);
                wire_envelope_free(env);
                if (r < 0) {
                        peer_close(p);
                        return r;
                }
                if (p->closing || p->close_pending)
                        return -ECONNRESET; /* a reply's send failed: the ready list closes it */
        }
        /* A frame that started has frame_timeout to complete, while the
         * daemon reads: a peer paused at max_pending is not timed, nor are
         * whole frames that wait for it to resume. */
        if (!peer_wants_input(p) || !frame_incomplete(&p->in))
                p->frame_started_usec = 0;
        else if (p->frame_started_usec == 0)
                p->frame_started_usec = now_usec();
        return 0;
}

static void peer_read(Peer *p) {
        if (p->closing)
                return;
        if (p->close_pending) {
                peer_close(p);
                return;
        }
        if (peer_process(p) < 0)
                return;
        peer_update_poll(p);
}

static void peer_on_readable(Peer *p) {
        /* Bounded, so one busy peer cannot starve the others. */
        for (unsigned i = 0; i < 16 && peer_wants_input(p); i++) {
                int r = wire_reader_recv(&p->in, p->fd);

                if (r == -EAGAIN) {
                        /* The buffer may have grown to a frame's announced
                         * length before the read found nothing: charge it. */
                        if (!peer_charge_input(p))
                                return;
                        break;
                }
                if (r == 0) {
                        if (wire_reader_partial(&p->in))
                                log_peer_warning(p, "%s: connection closed in the middle of a frame", p->name);
                        peer_close(p);
                        return;
                }
                if (r == -EPROTO) {
                        log_peer_warning(p, "%s: sent file descriptors, which the daemon never accepts; disconnecting",
                                         p->name);
                        peer_close(p);
                        return;
                }
                if (r == -EMSGSIZE) {
                        log_peer_warning(p, "%s: frame longer than the limit of %" PRIu32 " bytes, disconnecting",
                                         p->name, p->ctx->limits.max_request_size);
                        peer_close(p);
                        return;
                }
                if (r < 0) {
                        log_debug_errno(r, "%s: receive failed, disconnecting: %m", p->name);
                        peer_close(p);
                        return;
                }
                if (!peer_charge_input(p))
                        return;
                if (peer_process(p) < 0)
                        return;
        }
        peer_update_poll(p);
}

static void on_poll(uv_poll_t *h, int status, int events) {
        Peer *p = h->data;

        /* A peer to close from the ready list sends nothing more: its
         * output is no longer charged to its uid. */
        if (p->closing || p->close_pending)
                return;
        if (status < 0) {
                log_debug("%s: poll failed: %s, disconnecting", p->name, uv_strerror(status));
                peer_close(p);
                return;
        }
        if (events & UV_WRITABLE) {
                if (peer_flush(p, false) < 0)
                        return;
        }
        if ((events & UV_DISCONNECT) && !peer_wants_input(p)) {
                /* The client shut down its end while the peer does not
                 * read: as at an end of stream it reads, the peer goes,
                 * and its requests with it; what it sent and the daemon
                 * had not read is dropped. */
                log_debug("%s: hung up with %u requests in flight, disconnecting", p->name, p->n_requests);
                peer_close(p);
                return;
        }
        if (events & (UV_READABLE | UV_DISCONNECT))
                peer_on_readable(p);
}
