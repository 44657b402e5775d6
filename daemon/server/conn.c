/* One client connection: non-blocking framing under a uv_poll_t, the output
 * queue with descriptors, the per-connection limits, and its leases.
 *
 * Reading stops while the connection has max_pending_requests requests in
 * flight, so a peer cannot queue unbounded work; output it does not read is
 * capped at SERVER_MAX_OUT_BYTES.  A peer that breaks the protocol is logged
 * and disconnected; closing a connection, however it happens, ends its
 * leases and stops waiting for its requests. */

#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "server/server-private.h"
#include "util/log.h"

int wd_code_to_proto(int r) {
        switch (r) {
        case 0:
                return WEIGHTD__V1__CODE__OK;
        case WD_E_FORMAT:
                return WEIGHTD__V1__CODE__FORMAT_ERROR;
        case WD_E_NOT_FOUND:
        case -ENOENT:
        case -ENOTDIR:
                return WEIGHTD__V1__CODE__NOT_FOUND;
        case WD_E_UNSUPPORTED:
                return WEIGHTD__V1__CODE__UNSUPPORTED;
        case WD_E_BUDGET:
        case -ENOMEM:
        case -EMFILE:
        case -ENFILE:
        case -ENOSPC:
                return WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED;
        case WD_E_CHANGED:
        case -EAGAIN:
                return WEIGHTD__V1__CODE__UNAVAILABLE;
        case WD_E_BUSY:
                return WEIGHTD__V1__CODE__BUSY;
        case WD_E_PERMISSION:
        case -EACCES:
        case -EPERM:
                return WEIGHTD__V1__CODE__PERMISSION_DENIED;
        case WD_E_INVALID:
                return WEIGHTD__V1__CODE__INVALID_ARGUMENT;
        case -ECANCELED:
                return WEIGHTD__V1__CODE__CANCELLED;
        case -EINVAL:
        case -EFAULT:
                return WEIGHTD__V1__CODE__INTERNAL;
        default:
                return r < 0 ? WEIGHTD__V1__CODE__IO_ERROR : WEIGHTD__V1__CODE__INTERNAL;
        }
}

static void out_frame_free(OutFrame *f) {
        for (size_t i = 0; i < f->n_fds; i++)
                safe_close(f->fds[i]);
        free(f->fds);
        free(f->buf);
        free(f);
}

static void conn_free(Conn *c) {
        while (c->out_head) {
                OutFrame *f = c->out_head;
                c->out_head = f->next;
                out_frame_free(f);
        }
        wire_reader_deinit(&c->in);
        safe_close(c->fd);
        free(c);
}

static void on_closed(uv_handle_t *h) {
        conn_free(h->data);
}

static void on_poll(uv_poll_t *p, int status, int events);

int conn_new(Server *s, int fd, const struct ucred *cred, UidSlot *slot, Conn **ret) {
        Conn *c;
        int r;

        c = calloc(1, sizeof(Conn));
        if (!c)
                return -ENOMEM;
        c->server = s;
        c->fd = fd;
        c->cred = *cred;
        c->uid_slot = slot;
        c->accepted_usec = now_usec();
        snprintf(c->name, sizeof(c->name), "pid %d uid %u", (int) cred->pid, (unsigned) cred->uid);
        wire_reader_init(&c->in, (uint32_t) MIN(s->config->max_frame_size, UINT32_MAX), 0);

        r = uv_poll_init(&s->loop, &c->poll, fd);
        if (r < 0) {
                c->fd = -1; /* the caller still owns it */
                wire_reader_deinit(&c->in);
                free(c);
                return r;
        }
        c->poll.data = c;

        LIST_PREPEND(conns, s->conns, c);
        s->n_conns++;
        slot->n++;

        conn_update_poll(c);
        *ret = c;
        return 0;
}

void conn_update_poll(Conn *c) {
        int events = 0;

        if (c->closing)
                return;
        if (!c->close_when_sent && !c->server->stopping && c->n_pending < c->server->config->max_pending_requests)
                events |= UV_READABLE;
        if (c->out_head)
                events |= UV_WRITABLE;
        if (events == c->events)
                return;
        c->events = events;
        if (events)
                (void) uv_poll_start(&c->poll, events, on_poll);
        else
                (void) uv_poll_stop(&c->poll);
}

void conn_close(Conn *c) {
        Server *s = c->server;

        if (c->closing)
                return;
        c->closing = true;

        while (c->pending)
                request_drop(c->pending);
        while (c->leases)
                conn_lease_drop(c, c->leases);

        LIST_REMOVE(conns, s->conns, c);
        s->n_conns--;
        c->uid_slot->n--;
        /* What is queued will never be sent. */
        c->uid_slot->out_bytes -= c->out_bytes;
        c->out_bytes = 0;

        uv_close((uv_handle_t *) &c->poll, on_closed);
        server_update_status(s);
}

void conn_close_when_sent(Conn *c) {
        if (c->closing)
                return;
        c->close_when_sent = true;
        if (!c->out_head)
                conn_close(c);
        else
                conn_update_poll(c);
}

bool conn_lease_limit(Conn *c, uint64_t id) {
        if (c->n_leases >= SERVER_MAX_LEASES_PER_CONN)
                (void) conn_send_error(c, id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED,
                                       "this connection holds %u leases, the limit", SERVER_MAX_LEASES_PER_CONN);
        else if (c->uid_slot->leases >= SERVER_MAX_LEASES_PER_UID)
                (void) conn_send_error(c, id, WEIGHTD__V1__CODE__RESOURCE_EXHAUSTED, "uid %u holds %u leases, the limit",
                                       (unsigned) c->cred.uid, SERVER_MAX_LEASES_PER_UID);
        else
                return false;
        return true;
}

uint64_t conn_lease_add(Conn *c, CacheEntry *e) {
        Lease *l = calloc(1, sizeof(Lease));

        if (!l)
                return 0;
        l->id = ++c->server->next_lease_id;
        l->entry = e;
        cache_entry_lease(e);
        LIST_PREPEND(leases, c->leases, l);
        c->n_leases++;
        c->uid_slot->leases++;
        c->server->n_leases++;
        return l->id;
}

void conn_lease_drop(Conn *c, Lease *l) {
        LIST_REMOVE(leases, c->leases, l);
        c->n_leases--;
        c->uid_slot->leases--;
        c->server->n_leases--;
        cache_entry_unlease(l->entry);
        free(l);
}

Lease *conn_lease_find(Conn *c, uint64_t id) {
        LIST_FOREACH(leases, l, c->leases)
                if (l->id == id)
                        return l;
        return NULL;
}

/* Write what the socket takes.  Returns 0 or -errno (connection closed). */
static int conn_flush(Conn *c) {
        while (c->out_head) {
                OutFrame *f = c->out_head;
                size_t before = f->off;
                int r;

                r = wire_send(c->fd, f->buf, f->len, f->fds, f->n_fds, &f->off);
                c->out_bytes -= f->off - before;
                c->uid_slot->out_bytes -= f->off - before;
                if (r == -EAGAIN)
                        break;
                if (r < 0) {
                        log_debug_errno(r, "%s: send failed, disconnecting: %m", c->name);
                        conn_close(c);
                        return r;
                }
                c->out_head = f->next;
                if (!c->out_head)
                        c->out_tail = NULL;
                out_frame_free(f);
        }
        if (!c->out_head && c->close_when_sent) {
                conn_close(c);
                return -ECONNRESET;
        }
        conn_update_poll(c);
        return 0;
}

int conn_queue(Conn *c, uint8_t *buf, size_t len, int *fds, size_t n_fds) {
        OutFrame *f;

        if (c->closing) {
                for (size_t i = 0; i < n_fds; i++)
                        safe_close(fds[i]);
                free(fds);
                free(buf);
                return -ECONNRESET;
        }
        f = calloc(1, sizeof(OutFrame));
        if (!f) {
                for (size_t i = 0; i < n_fds; i++)
                        safe_close(fds[i]);
                free(fds);
                free(buf);
                conn_close(c);
                return -ENOMEM;
        }
        *f = (OutFrame){ .buf = buf, .len = len, .fds = fds, .n_fds = n_fds };
        if (c->out_tail)
                c->out_tail->next = f;
        else
                c->out_head = f;
        c->out_tail = f;
        c->out_bytes += len;
        c->uid_slot->out_bytes += len;
        if (c->out_bytes > SERVER_MAX_OUT_BYTES) {
                log_warning("%s: more than %zu bytes of replies not read, disconnecting", c->name,
                            SERVER_MAX_OUT_BYTES);
                conn_close(c);
                return -ENOBUFS;
        }
        if (c->uid_slot->out_bytes > SERVER_MAX_OUT_BYTES_PER_UID) {
                log_warning("%s: more than %zu bytes of replies not read over the connections of uid %u, "
                            "disconnecting",
                            c->name, SERVER_MAX_OUT_BYTES_PER_UID, (unsigned) c->cred.uid);
                conn_close(c);
                return -ENOBUFS;
        }
        return conn_flush(c);
}

int conn_send(Conn *c, const WireEnvelope *env, const int *fds, size_t n_fds) {
        _cleanup_free_ int *dups = NULL;
        uint8_t *buf;
        size_t len;
        int r;

        if (c->closing)
                return -ECONNRESET;
        if (n_fds > 0) {
                dups = calloc(n_fds, sizeof(int));
                if (!dups) {
                        conn_close(c);
                        return -ENOMEM;
                }
                for (size_t i = 0; i < n_fds; i++) {
                        dups[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, 3);
                        if (dups[i] < 0) {
                                r = negative_errno();
                                for (size_t k = 0; k < i; k++)
                                        safe_close(dups[k]);
                                log_warning_errno(r, "%s: cannot duplicate a slab descriptor: %m", c->name);
                                conn_close(c);
                                return r;
                        }
                }
        }
        r = wire_pack(env, SIZE_MAX, &buf, &len);
        if (r < 0) {
                for (size_t i = 0; i < n_fds; i++)
                        safe_close(dups[i]);
                log_warning_errno(r, "%s: cannot pack a reply: %m", c->name);
                conn_close(c);
                return r;
        }
        return conn_queue(c, buf, len, TAKE_PTR(dups), n_fds);
}

int conn_send_error(Conn *c, uint64_t id, int code, const char *fmt, ...) {
        Weightd__V1__Envelope env = WEIGHTD__V1__ENVELOPE__INIT;
        Weightd__V1__Reply reply = WEIGHTD__V1__REPLY__INIT;
        char msg[WD_ERROR_MESSAGE_MAX];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        reply.code = code;
        reply.message = msg;
        env.id = id;
        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_REPLY;
        env.reply = &reply;
        return conn_send(c, &env, NULL, 0);
}

int conn_send_wd_error(Conn *c, uint64_t id, int r, const WdError *err) {
        if (err && err->message[0])
                return conn_send_error(c, id, wd_code_to_proto(r), "%s", err->message);
        return conn_send_error(c, id, wd_code_to_proto(r), "%s", r < 0 ? strerror(-r) : wd_error_code_name(r));
}

/* Decode and dispatch every complete frame in the buffer.  Returns 0, or
 * < 0 when the connection was closed. */
static int conn_process(Conn *c) {
        while (!c->closing && !c->close_when_sent && c->n_pending < c->server->config->max_pending_requests) {
                const uint8_t *payload;
                size_t len;
                WireEnvelope *env;
                int r;

                r = wire_reader_next(&c->in, &payload, &len);
                if (r == 0)
                        return 0;
                if (r < 0) {
                        log_warning("%s: frame longer than the limit of %" PRIu64 " bytes, disconnecting", c->name,
                                    c->server->config->max_frame_size);
                        conn_close(c);
                        return r;
                }
                env = wire_unpack(payload, len);
                if (!env) {
                        log_warning("%s: undecodable frame of %zu bytes, disconnecting", c->name, len);
                        conn_close(c);
                        return -EBADMSG;
                }
                r = dispatch_frame(c, env);
                wire_envelope_free(env);
                if (r < 0) {
                        conn_close(c);
                        return r;
                }
        }
        return c->closing ? -ECONNRESET : 0;
}

void conn_request_done(Conn *c) {
        if (c->closing)
                return;
        if (conn_process(c) < 0)
                return;
        conn_update_poll(c);
}

static void conn_on_readable(Conn *c) {
        /* Bounded, so one busy peer cannot starve the others. */
        for (unsigned i = 0; i < 16 && !c->closing; i++) {
                int r = wire_reader_recv(&c->in, c->fd);

                if (r == -EAGAIN)
                        break;
                if (r == 0) {
                        if (wire_reader_partial(&c->in))
                                log_warning("%s: connection closed in the middle of a frame", c->name);
                        conn_close(c);
                        return;
                }
                if (r == -EPROTO) {
                        log_warning("%s: sent file descriptors, which the daemon never accepts; disconnecting",
                                    c->name);
                        conn_close(c);
                        return;
                }
                if (r == -EMSGSIZE) {
                        log_warning("%s: frame longer than the limit of %" PRIu64 " bytes, disconnecting",
                                    c->name, c->server->config->max_frame_size);
                        conn_close(c);
                        return;
                }
                if (r < 0) {
                        log_debug_errno(r, "%s: receive failed, disconnecting: %m", c->name);
                        conn_close(c);
                        return;
                }
                if (conn_process(c) < 0)
                        return;
                if (c->n_pending >= c->server->config->max_pending_requests)
                        break;
        }
        conn_update_poll(c);
}

static void on_poll(uv_poll_t *p, int status, int events) {
        Conn *c = p->data;

        if (c->closing)
                return;
        if (status < 0) {
                log_debug("%s: poll failed: %s, disconnecting", c->name, uv_strerror(status));
                conn_close(c);
                return;
        }
        if (events & UV_WRITABLE) {
                if (conn_flush(c) < 0)
                        return;
        }
        if (events & (UV_READABLE | UV_DISCONNECT))
                conn_on_readable(c);
}
