/* libweightd-client: the connection to weightd and its requests.
 *
 * A wd_client is one blocking AF_UNIX stream socket.  Each call takes the
 * client's mutex, sends one Envelope with a fresh id and reads frames until
 * the Reply with that id arrives; Progress events for it go to the caller's
 * callback, which may cancel the request.  A frame the protocol does not
 * allow here (an unknown id, a request, descriptors nobody refers to, bytes
 * that do not decode) breaks the connection: it is shut down, so the daemon
 * ends its leases, and every later call fails with WD_UNAVAILABLE.  Leases
 * hold a reference on their client, so the socket stays open while any
 * lease lives.  A client belongs to the process that connected it (its pid
 * is recorded): in a forked child, which shares the socket and whose
 * copies of the leases are the parent's in the daemon, every request fails
 * with WD_UNAVAILABLE before the mutex is taken (a parent's thread may have
 * held it at fork()), and wd_release() only unmaps.  See proto/PROTOCOL.md
 * for the wire format. */

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "client-internal.h"

#define CLIENT_NAME "libweightd-client " WEIGHTD_VERSION

struct wd_lease {
        wd_client *client;
        uint64_t id;
        wd_manifest *manifest;
};

typedef Weightd__V1__Envelope__BodyCase BodyCase;
typedef Weightd__V1__Reply__ResultCase ResultCase;

/* ---- errors (error_set() and the codes' names are in error.c) ---- */

/* Hand a call's error to the caller: err is written only on failure. */
static int finish(int r, const wd_error *e, wd_error *err) {
        if (r != WD_OK && err)
                *err = *e;
        return r;
}

/* ok: every argument the caller must give is there. */
static int check_args(const char *func, bool ok, wd_error *err) {
        if (!ok)
                return error_set(err, WD_INVALID_ARGUMENT, "%s(): a required argument is NULL", func);
        return WD_OK;
}

static int error_from_reply(wd_error *err, const PbReply *reply) {
        int code = (int) reply->code;

        if (reply->message[0] != '\0')
                return error_set(err, code, "%s", reply->message);
        return error_set(err, code, "the daemon answered %s", wd_code_name(code));
}

_public_ const char *wd_version(void) {
        return WEIGHTD_VERSION;
}

_public_ int wd_default_socket(char *buf, size_t size) {
        const char *env = secure_getenv("WEIGHTD_SOCKET"), *runtime = secure_getenv("XDG_RUNTIME_DIR");
        int n;

        if (!buf && size > 0)
                return WD_INVALID_ARGUMENT;
        if (env && env[0] != '\0')
                n = snprintf(buf, size, "%s", env);
        else if (geteuid() == 0)
                n = snprintf(buf, size, "/run/weightd/weightd.sock");
        else if (runtime && runtime[0] == '/')
                n = snprintf(buf, size, "%s/weightd/weightd.sock", runtime);
        else
                n = snprintf(buf, size, "/tmp/weightd-%u/weightd.sock", (unsigned) geteuid());
        if (n < 0 || (size_t) n >= size)
                return WD_INVALID_ARGUMENT;
        return WD_OK;
}

/* ---- the connection ---- */

static const char *body_name(BodyCase b) {
        switch (b) {
        case WEIGHTD__V1__ENVELOPE__BODY_HELLO:
                return "Hello";
        case WEIGHTD__V1__ENVELOPE__BODY_LOAD:
                return "Load";
        case WEIGHTD__V1__ENVELOPE__BODY_RELEASE:
                return "Release";
        case WEIGHTD__V1__ENVELOPE__BODY_PREFETCH:
                return "Prefetch";
        case WEIGHTD__V1__ENVELOPE__BODY_EVICT:
                return "Evict";
        case WEIGHTD__V1__ENVELOPE__BODY_PIN:
                return "Pin";
        case WEIGHTD__V1__ENVELOPE__BODY_UNPIN:
                return "Unpin";
        case WEIGHTD__V1__ENVELOPE__BODY_LIST:
                return "List";
        case WEIGHTD__V1__ENVELOPE__BODY_TENSORS:
                return "Tensors";
        case WEIGHTD__V1__ENVELOPE__BODY_STATUS:
                return "Status";
        case WEIGHTD__V1__ENVELOPE__BODY_CANCEL:
                return "Cancel";
        case WEIGHTD__V1__ENVELOPE__BODY_COMPONENTS:
                return "Components";
        case WEIGHTD__V1__ENVELOPE__BODY_CLUSTER:
                return "Cluster";
        case WEIGHTD__V1__ENVELOPE__BODY_REPLY:
                return "Reply";
        case WEIGHTD__V1__ENVELOPE__BODY_PROGRESS:
                return "Progress";
        default:
                return "empty";
        }
}

static const char *result_name(ResultCase r) {
        switch (r) {
        case WEIGHTD__V1__REPLY__RESULT_HELLO:
                return "a HelloReply";
        case WEIGHTD__V1__REPLY__RESULT_LOAD:
                return "a LoadReply";
        case WEIGHTD__V1__REPLY__RESULT_LIST:
                return "a ListReply";
        case WEIGHTD__V1__REPLY__RESULT_TENSORS:
                return "a TensorsReply";
        case WEIGHTD__V1__REPLY__RESULT_STATUS:
                return "a StatusReply";
        case WEIGHTD__V1__REPLY__RESULT_COMPONENTS:
                return "a ComponentsReply";
        case WEIGHTD__V1__REPLY__RESULT_CLUSTER:
                return "a ClusterReply";
        default:
                return "no result";
        }
}

/* The caller is not the process that connected c: a child forked from it
 * (or from one of its children).  The socket is shared with the parent, and
 * the daemon's leases on it are the parent's. */
static bool client_foreign(const wd_client *c) {
        return getpid() != c->pid;
}

static int client_foreign_error(const wd_client *c, const char *func, wd_error *err) {
        return error_set(err, WD_UNAVAILABLE,
                         "%s: this client of %s was connected by process %d, not by this one (%d): a process "
                         "forked from it must connect again",
                         func, c->path, (int) c->pid, (int) getpid());
}

/* In a forked child this closes the child's descriptor only: the parent's
 * socket, and the leases on it, stay as they are. */
static wd_client *client_free(wd_client *c) {
        if (!c)
                return NULL;
        if (c->fd >= 0)
                close(c->fd);
        wire_reader_deinit(&c->reader);
        /* (A child's copy of the mutex may be locked for good.) */
        if (!client_foreign(c))
                pthread_mutex_destroy(&c->mutex);
        free(c->path);
        free(c);
        return NULL;
}

static void client_unref(wd_client *c) {
        if (atomic_fetch_sub(&c->n_ref, 1) == 1)
                client_free(c);
}

/* Give up on the connection after err: shut it down (the daemon then ends
 * our leases) and close descriptors that were queued. */
static int client_break(wd_client *c, wd_error *err) {
        if (!c->broken) {
                c->broken = true;
                snprintf(c->broken_reason, sizeof(c->broken_reason), "%s", err->message);
                (void) shutdown(c->fd, SHUT_RDWR);
        }
        wire_reader_deinit(&c->reader);
        return err->code;
}

static int client_fail(wd_client *c, wd_error *err, int code, const char *fmt, ...) _printf_(4, 5);
static int client_fail(wd_client *c, wd_error *err, int code, const char *fmt, ...) {
        va_list ap;

        err->code = code;
        va_start(ap, fmt);
        vsnprintf(err->message, sizeof(err->message), fmt, ap);
        va_end(ap);
        return client_break(c, err);
}

static void reader_close_fds(WireReader *r) {
        int fds[WIRE_MAX_FDS];
        size_t n = r->n_fds;

        if (n == 0 || wire_reader_take_fds(r, n, fds) < 0)
                return;
        for (size_t i = 0; i < n; i++)
                close(fds[i]);
}

/* Descriptors came with a frame that refers to none: once the reader holds
 * no byte past that frame, they cannot belong to a later one. */
static int client_check_fds(wd_client *c, wd_error *err) {
        if (c->reader.n_fds == 0 || wire_reader_partial(&c->reader))
                return WD_OK;
        return client_fail(c, err, WD_PROTOCOL_ERROR, "the daemon sent %zu descriptors with a frame that refers to none",
                           c->reader.n_fds);
}

static int client_recv_failed(wd_client *c, int r, wd_error *err) {
        switch (r) {
        case 0:
                if (wire_reader_partial(&c->reader))
                        return client_fail(c, err, WD_UNAVAILABLE, "daemon closed the connection in the middle of a frame");
                _fallthrough_;
        case -ECONNRESET:
        case -EPIPE:
                return client_fail(c, err, WD_UNAVAILABLE, "daemon closed the connection");
        case -EMSGSIZE: {
                const uint8_t *p = c->reader.buf + c->reader.done;
                uint32_t n = (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24;

                return client_fail(c, err, WD_PROTOCOL_ERROR,
                                   "the daemon announced a frame of %u bytes, over the client's limit of %u", n,
                                   c->reader.max_frame);
        }
        case -EPROTO:
                return client_fail(c, err, WD_PROTOCOL_ERROR,
                                   "the daemon sent more descriptors than the client holds (%u), or they were truncated",
                                   c->reader.max_fds);
        case -ENOMEM:
                return client_fail(c, err, WD_INTERNAL, "out of memory reading from the daemon");
        default:
                return client_fail(c, err, WD_UNAVAILABLE, "reading from %s failed: %s", c->path, strerror(-r));
        }
}

/* Read the next frame.  Returns WD_OK with *ret set, a wd_code (the
 * connection is broken then), or -EAGAIN when the socket is non-blocking
 * and has nothing more. */
static int client_read(wd_client *c, WireEnvelope **ret, wd_error *err) {
        for (;;) {
                const uint8_t *payload;
                size_t len;
                int r = wire_reader_next(&c->reader, &payload, &len);

                if (r > 0) {
                        WireEnvelope *env = client_unpack(payload, len);

                        if (!env)
                                return client_fail(c, err, WD_PROTOCOL_ERROR,
                                                   "the daemon sent a frame of %zu bytes that does not decode", len);
                        *ret = env;
                        return WD_OK;
                }
                if (r == 0)
                        r = wire_reader_recv(&c->reader, c->fd);
                if (r > 0)
                        continue;
                if (r == -EAGAIN)
                        return -EAGAIN;
                return client_recv_failed(c, r, err);
        }
}

/* A Reply with id 0 speaks of the connection: the daemon refuses or drops
 * it, and closes. */
static int client_refused(wd_client *c, const PbReply *reply, wd_error *err) {
        if (reply->code == WEIGHTD__V1__CODE__OK)
                return client_fail(c, err, WD_PROTOCOL_ERROR, "the daemon sent an OK reply with id 0");
        error_from_reply(err, reply);
        return client_break(c, err);
}

/* Sending failed because the daemon closed the connection: it may have
 * said why before it did.  Read what is already here, without waiting. */
static int client_closed(wd_client *c, wd_error *err) {
        int flags = fcntl(c->fd, F_GETFL);

        if (flags >= 0)
                (void) fcntl(c->fd, F_SETFL, flags | O_NONBLOCK);
        for (;;) {
                _cleanup_envelope_ WireEnvelope *env = NULL;
                int r = client_read(c, &env, err);

                if (r == -EAGAIN)
                        break;
                if (r != WD_OK)
                        return r;
                if (env->body_case == WEIGHTD__V1__ENVELOPE__BODY_REPLY && env->id == 0)
                        return client_refused(c, env->reply, err);
        }
        return client_fail(c, err, WD_UNAVAILABLE, "daemon closed the connection");
}

static int client_send(wd_client *c, const WireEnvelope *env, wd_error *err) {
        _cleanup_free_ uint8_t *buf = NULL;
        size_t len, offset = 0;
        int r;

        r = wire_pack(env, c->max_frame_out, &buf, &len);
        if (r == -EMSGSIZE)
                return error_set(err, WD_INVALID_ARGUMENT, "the %s request is over the daemon's frame limit of %u bytes",
                                 body_name(env->body_case), c->max_frame_out);
        if (r < 0)
                return error_set(err, WD_INTERNAL, "out of memory");

        r = wire_send(c->fd, buf, len, NULL, 0, &offset);
        if (r == -EPIPE || r == -ECONNRESET)
                return client_closed(c, err);
        if (r < 0)
                return client_fail(c, err, WD_UNAVAILABLE, "writing to %s failed: %s", c->path, strerror(-r));
        return WD_OK;
}

static int client_cancel(wd_client *c, uint64_t target, uint64_t *ret_id, wd_error *err) {
        Weightd__V1__CancelRequest cancel = WEIGHTD__V1__CANCEL_REQUEST__INIT;
        WireEnvelope env = WEIGHTD__V1__ENVELOPE__INIT;
        int r;

        cancel.target = target;
        env.id = c->next_id++;
        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_CANCEL;
        env.cancel = &cancel;
        r = client_send(c, &env, err);
        if (r != WD_OK)
                return r;
        *ret_id = env.id;
        return WD_OK;
}

/* Send req with a fresh id and wait for its reply, which must carry the
 * result `expect` when it is OK.  Progress events go to progress; when it
 * asks to stop, a Cancel goes out and the call ends with WD_CANCELLED once
 * both replies are in.  With takes_fds the caller takes the descriptors of
 * an OK reply from the reader.  Returns WD_OK with *ret (may be NULL) set,
 * the daemon's code, or a local one.  Call with the mutex held. */
static int client_release(wd_client *c, uint64_t lease, wd_error *err);

static int client_call(wd_client *c, WireEnvelope *req, ResultCase expect, wd_progress_fn progress, void *userdata,
                       bool takes_fds, WireEnvelope **ret, wd_error *err) {
        _cleanup_envelope_ WireEnvelope *reply = NULL;
        uint64_t cancel_id = 0;
        bool cancel_done = false;
        int r;

        if (client_foreign(c))
                return client_foreign_error(c, body_name(req->body_case), err);
        if (c->broken)
                return error_set(err, WD_UNAVAILABLE, "connection is broken: %s", c->broken_reason);

        req->id = c->next_id++;
        r = client_send(c, req, err);
        if (r != WD_OK)
                return r;

        while (!reply || (cancel_id != 0 && !cancel_done)) {
                _cleanup_envelope_ WireEnvelope *env = NULL;

                r = client_read(c, &env, err);
                if (r != WD_OK)
                        return r;

                if (env->body_case == WEIGHTD__V1__ENVELOPE__BODY_PROGRESS && env->id == req->id) {
                        r = client_check_fds(c, err);
                        if (r != WD_OK)
                                return r;
                        if (progress && cancel_id == 0 && !reply &&
                            progress(env->progress->done_bytes, env->progress->total_bytes, userdata) != 0) {
                                r = client_cancel(c, req->id, &cancel_id, err);
                                if (r != WD_OK)
                                        return r;
                        }
                        continue;
                }
                if (env->body_case != WEIGHTD__V1__ENVELOPE__BODY_REPLY)
                        return client_fail(c, err, WD_PROTOCOL_ERROR, "unexpected %s frame with id %llu from the daemon",
                                           body_name(env->body_case), (unsigned long long) env->id);

                if (env->id == req->id && !reply)
                        reply = TAKE_PTR(env);
                else if (cancel_id != 0 && env->id == cancel_id && !cancel_done) {
                        cancel_done = true;
                        r = client_check_fds(c, err);
                        if (r != WD_OK)
                                return r;
                } else if (env->id == 0)
                        return client_refused(c, env->reply, err);
                else
                        return client_fail(c, err, WD_PROTOCOL_ERROR, "the daemon sent a reply for unknown request %llu",
                                           (unsigned long long) env->id);
        }

        const PbReply *rp = reply->reply;
        bool ok = rp->code == WEIGHTD__V1__CODE__OK;

        if (!ok || !takes_fds || cancel_id != 0) {
                r = client_check_fds(c, err);
                if (r != WD_OK)
                        return r;
        }
        if (cancel_id != 0) {
                /* The Load was answered before the Cancel arrived: give
                 * its lease back. */
                if (ok && rp->result_case == WEIGHTD__V1__REPLY__RESULT_LOAD && rp->load->lease != 0) {
                        wd_error ignored;
                        (void) client_release(c, rp->load->lease, &ignored);
                }
                return error_set(err, WD_CANCELLED, "%s cancelled by the progress callback", body_name(req->body_case));
        }
        if (!ok)
                return error_from_reply(err, rp);
        if (rp->result_case != expect)
                return client_fail(c, err, WD_PROTOCOL_ERROR, "the daemon answered %s with %s instead of %s",
                                   body_name(req->body_case), result_name(rp->result_case), result_name(expect));
        if (ret)
                *ret = TAKE_PTR(reply);
        return WD_OK;
}

static int client_hello(wd_client *c, wd_error *err) {
        Weightd__V1__HelloRequest hello = WEIGHTD__V1__HELLO_REQUEST__INIT;
        WireEnvelope env = WEIGHTD__V1__ENVELOPE__INIT;
        _cleanup_envelope_ WireEnvelope *reply = NULL;
        int r;

        hello.min_version = WD_PROTOCOL_VERSION;
        hello.max_version = WD_PROTOCOL_VERSION;
        hello.client = (char *) CLIENT_NAME;
        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_HELLO;
        env.hello = &hello;
        r = client_call(c, &env, WEIGHTD__V1__REPLY__RESULT_HELLO, NULL, NULL, false, &reply, err);
        if (r != WD_OK)
                return r;

        const Weightd__V1__HelloReply *h = reply->reply->hello;
        if (h->version != WD_PROTOCOL_VERSION)
                return client_fail(c, err, WD_PROTOCOL_ERROR, "the daemon chose protocol version %u; this client speaks %u",
                                   h->version, WD_PROTOCOL_VERSION);

        wd_hello *info = &c->hello;
        size_t o = 0;

        *info = (wd_hello){
                .protocol_version = h->version,
                .max_frame_size = h->max_frame_size,
                .max_pending_requests = h->max_pending_requests,
        };
        snprintf(info->daemon_version, sizeof(info->daemon_version), "%s", h->daemon_version);
        for (size_t i = 0; i < h->n_features; i++) {
                size_t n = strlen(h->features[i]);

                if (o + (o > 0) + n >= sizeof(info->features))
                        break;
                if (o > 0)
                        info->features[o++] = ' ';
                memcpy(info->features + o, h->features[i], n + 1);
                o += n;
        }
        if (h->max_frame_size > 0)
                c->max_frame_out = h->max_frame_size > UINT32_MAX ? UINT32_MAX : (uint32_t) h->max_frame_size;
        return WD_OK;
}

int client_new_from_fd(int fd, const char *name, wd_client **ret, wd_error *err) {
        wd_client *c = calloc(1, sizeof(*c));
        int r;

        if (!c) {
                close(fd);
                return error_set(err, WD_INTERNAL, "out of memory");
        }
        c->fd = fd;
        atomic_init(&c->n_ref, 1);
        c->pid = getpid();
        c->next_id = 1;
        c->max_frame_out = WIRE_DEFAULT_MAX_FRAME;
        wire_reader_init(&c->reader, CLIENT_MAX_FRAME, WIRE_MAX_FDS);
        c->path = strdup(name);
        if (!c->path || pthread_mutex_init(&c->mutex, NULL) != 0) {
                free(c->path);
                close(fd);
                free(c);
                return error_set(err, WD_INTERNAL, "out of memory");
        }

        r = client_hello(c, err);
        if (r != WD_OK) {
                client_free(c);
                return r;
        }
        *ret = c;
        return WD_OK;
}

_public_ int wd_connect(const char *socket_path, wd_client **ret, wd_error *err) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        char path[sizeof(sa.sun_path)];
        wd_error e;
        int fd;

        if (check_args("wd_connect", ret, &e) != WD_OK)
                return finish(e.code, &e, err);
        if (!socket_path) {
                if (wd_default_socket(path, sizeof(path)) != WD_OK)
                        return finish(error_set(&e, WD_INVALID_ARGUMENT, "the default socket path is too long"), &e,
                                      err);
                socket_path = path;
        }
        if (strlen(socket_path) >= sizeof(sa.sun_path))
                return finish(error_set(&e, WD_INVALID_ARGUMENT, "socket path %s is too long (at most %zu bytes)",
                                        socket_path, sizeof(sa.sun_path) - 1),
                              &e, err);
        memcpy(sa.sun_path, socket_path, strlen(socket_path) + 1);

        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return finish(error_set(&e, WD_INTERNAL, "cannot create a socket: %s", strerror(errno)), &e, err);
        if (connect(fd, (const struct sockaddr *) &sa, sizeof(sa)) < 0) {
                int k = errno;

                close(fd);
                if (k == ENOENT || k == ECONNREFUSED)
                        error_set(&e, WD_UNAVAILABLE, "no daemon at %s: %s", socket_path, strerror(k));
                else if (k == EACCES || k == EPERM)
                        error_set(&e, WD_PERMISSION_DENIED, "cannot connect to %s: %s", socket_path, strerror(k));
                else
                        error_set(&e, WD_UNAVAILABLE, "cannot connect to %s: %s", socket_path, strerror(k));
                return finish(e.code, &e, err);
        }
        return finish(client_new_from_fd(fd, socket_path, ret, &e), &e, err);
}

_public_ void wd_disconnect(wd_client *c) {
        if (c)
                client_unref(c);
}

_public_ int wd_hello_info(wd_client *c, wd_hello *ret) {
        if (!c || !ret)
                return WD_INVALID_ARGUMENT;
        *ret = c->hello; /* written once, by wd_connect() */
        return WD_OK;
}

/* ---- requests ---- */

static Weightd__V1__ComponentRef component_ref(const char *model, const char *component) {
        Weightd__V1__ComponentRef ref = WEIGHTD__V1__COMPONENT_REF__INIT;

        ref.model = (char *) model;
        ref.component = (char *) (component ? component : "");
        return ref;
}

static Weightd__V1__LoadRequest load_request(const char *model, const char *component, bool progress) {
        Weightd__V1__LoadRequest load = WEIGHTD__V1__LOAD_REQUEST__INIT;

        load.model = (char *) model;
        load.component = (char *) (component ? component : "");
        load.target = (char *) "";
        load.progress = progress;
        return load;
}

/* client_call() under the client's mutex, which a forked child never takes. */
static int client_request(wd_client *c, WireEnvelope *req, ResultCase expect, wd_progress_fn progress, void *userdata,
                          WireEnvelope **ret, wd_error *err) {
        int r;

        if (client_foreign(c))
                return client_foreign_error(c, body_name(req->body_case), err);
        pthread_mutex_lock(&c->mutex);
        r = client_call(c, req, expect, progress, userdata, false, ret, err);
        pthread_mutex_unlock(&c->mutex);
        return r;
}

_public_ int wd_tensors(wd_client *c, const char *model, const char *component, wd_manifest **ret, wd_error *err) {
        Weightd__V1__ComponentRef ref = component_ref(model, component);
        WireEnvelope env = WEIGHTD__V1__ENVELOPE__INIT;
        _cleanup_envelope_ WireEnvelope *reply = NULL;
        wd_error e;
        int r;

        r = check_args("wd_tensors", c && model && ret, &e);
        if (r != WD_OK)
                return finish(r, &e, err);

        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_TENSORS;
        env.tensors = &ref;
        r = client_request(c, &env, WEIGHTD__V1__REPLY__RESULT_TENSORS, NULL, NULL, &reply, &e);
        if (r == WD_OK) {
                Weightd__V1__TensorsReply *t = reply->reply->tensors;

                r = manifest_new(&reply, t->model, t->component, t->files, t->n_files, NULL, 0, 0, t->tensors,
                                 t->n_tensors, NULL, NULL, ret, &e);
        }
        return finish(r, &e, err);
}

static int client_release(wd_client *c, uint64_t lease, wd_error *err) {
        Weightd__V1__ReleaseRequest release = WEIGHTD__V1__RELEASE_REQUEST__INIT;
        WireEnvelope env = WEIGHTD__V1__ENVELOPE__INIT;

        release.lease = lease;
        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_RELEASE;
        env.release = &release;
        return client_call(c, &env, WEIGHTD__V1__REPLY__RESULT__NOT_SET, NULL, NULL, false, NULL, err);
}

static void close_fds(const int *fds, size_t n) {
        for (size_t i = 0; i < n; i++)
                close(fds[i]);
}

/* The LoadReply's slabs and the descriptors that came with it do not
 * match: end the lease and the connection, whose descriptor queue can no
 * longer be trusted. */
static int client_load_fd_mismatch(wd_client *c, uint64_t lease, size_t n_slabs, size_t n_fds, wd_error *err) {
        wd_error ignored;

        error_set(err, WD_PROTOCOL_ERROR, "the daemon's LoadReply lists %zu slabs but %zu descriptors came with it",
                  n_slabs, n_fds);
        reader_close_fds(&c->reader);
        (void) client_release(c, lease, &ignored);
        return client_break(c, err);
}

static int client_load(wd_client *c, WireEnvelope *req, wd_progress_fn progress, void *userdata, wd_lease **ret,
                       wd_error *err) {
        _cleanup_envelope_ WireEnvelope *reply = NULL;
        int fds[WIRE_MAX_FDS];
        wd_error ignored;
        wd_lease *l;
        int r;

        /* The table costs both sides a fraction of 100,000 Tensor messages;
         * a daemon that does not know the field sends the messages. */
        req->load->compact_tensors = true;
        r = client_call(c, req, WEIGHTD__V1__REPLY__RESULT_LOAD, progress, userdata, true, &reply, err);
        if (r != WD_OK)
                return r;

        Weightd__V1__LoadReply *lr = reply->reply->load;
        size_t n = lr->n_slabs;

        if (lr->lease == 0)
                return client_fail(c, err, WD_PROTOCOL_ERROR, "the daemon's LoadReply holds no lease");
        /* (wire_reader_take_fds() must not be asked for 0 before any
         * descriptor came: its queue is still NULL.) */
        if (n > WIRE_MAX_FDS || (n > 0 && wire_reader_take_fds(&c->reader, n, fds) < 0))
                return client_load_fd_mismatch(c, lr->lease, n, c->reader.n_fds, err);
        if (c->reader.n_fds > 0 && !wire_reader_partial(&c->reader)) {
                close_fds(fds, n);
                return client_load_fd_mismatch(c, lr->lease, n, n + c->reader.n_fds, err);
        }

        l = calloc(1, sizeof(*l));
        if (!l)
                r = error_set(err, WD_INTERNAL, "out of memory");
        else {
                l->id = lr->lease;
                r = manifest_new(&reply, lr->model, lr->component, lr->slabs, n, lr->files, lr->n_files, lr->bytes,
                                 lr->tensors, lr->n_tensors, lr->table, fds, &l->manifest, err);
        }
        close_fds(fds, n);
        if (r != WD_OK) {
                /* Nothing of the lease may stay behind in the daemon. */
                (void) client_release(c, lr->lease, &ignored);
                free(l);
                return r;
        }

        l->manifest->leased = true;
        l->client = c;
        atomic_fetch_add(&c->n_ref, 1);
        *ret = l;
        return WD_OK;
}

#define CLIENT_TARGET_MAX 80

/* A LoadRequest from options; the shard's rules live in rules (n_rules
 * entries, allocated here), the device target in target.  Returns WD_OK,
 * WD_INVALID_ARGUMENT, or WD_UNSUPPORTED for a device target where this
 * process has no CUDA driver. */
static int load_request_ex(const char *func, const char *model, const char *component, const wd_load_options *o,
                           Weightd__V1__LoadRequest *load, char target[static CLIENT_TARGET_MAX],
                           Weightd__V1__Shard *shard, Weightd__V1__ShardRule **rules,
                           Weightd__V1__ShardRule ***rule_ptrs, wd_error *err) {
        int r;

        *load = load_request(model, component, o && o->progress);
        if (!o)
                return WD_OK;
        /* Our "cuda:N" is not the daemon's: the target names the device by
         * its UUID. */
        r = cuda_target(o->device, target, CLIENT_TARGET_MAX, err);
        if (r != WD_OK)
                return r;
        if (target[0] != '\0')
                load->target = target;
        if (o->keep_host < WD_KEEP_HOST_DEFAULT || o->keep_host > WD_KEEP_HOST_NO)
                return error_set(err, WD_INVALID_ARGUMENT, "%s: keep_host %d is not a WD_KEEP_HOST_* value", func,
                                 o->keep_host);
        load->keep_host = (Weightd__V1__KeepHost) o->keep_host;
        if (o->n_names > 0 && !o->names)
                return error_set(err, WD_INVALID_ARGUMENT, "%s: n_names is %zu but names is NULL", func, o->n_names);
        for (size_t i = 0; i < o->n_names; i++)
                if (!o->names[i] || !o->names[i][0])
                        return error_set(err, WD_INVALID_ARGUMENT, "%s: tensor name %zu is %s", func, i,
                                         o->names[i] ? "empty" : "NULL");
        load->names = (char **) o->names;
        load->n_names = o->n_names;
        if (o->n_tensors > 0 && !o->tensors)
                return error_set(err, WD_INVALID_ARGUMENT, "%s: n_tensors is %zu but tensors is NULL", func,
                                 o->n_tensors);
        for (size_t i = 0; i < o->n_tensors; i++)
                if (!o->tensors[i])
                        return error_set(err, WD_INVALID_ARGUMENT, "%s: tensors pattern %zu is NULL", func, i);
        if (o->world == 0) {
                if (o->n_rules > 0 || o->rank > 0)
                        return error_set(err, WD_INVALID_ARGUMENT, "%s: shard rules or a rank without a world", func);
                if (o->n_tensors == 0)
                        return WD_OK;
        }
        if (o->world > 0 && o->rank >= o->world)
                return error_set(err, WD_INVALID_ARGUMENT, "%s: rank %u is not below world %u", func, o->rank,
                                 o->world);
        if (o->n_rules > 0 && !o->rules)
                return error_set(err, WD_INVALID_ARGUMENT, "%s: n_rules is %zu but rules is NULL", func, o->n_rules);

        weightd__v1__shard__init(shard);
        shard->rank = o->rank;
        shard->world = o->world ? o->world : 1; /* tensors only: nothing split */
        shard->tensors = (char **) o->tensors;
        shard->n_tensors = o->n_tensors;
        shard->uneven = o->uneven != 0;
        *rules = calloc(o->n_rules ? o->n_rules : 1, sizeof(Weightd__V1__ShardRule));
        *rule_ptrs = calloc(o->n_rules ? o->n_rules : 1, sizeof(Weightd__V1__ShardRule *));
        if (!*rules || !*rule_ptrs)
                return error_set(err, WD_INTERNAL, "out of memory");
        for (size_t i = 0; i < o->n_rules; i++) {
                Weightd__V1__ShardRule *x = &(*rules)[i];

                if (!o->rules[i].pattern)
                        return error_set(err, WD_INVALID_ARGUMENT, "%s: rule %zu has no pattern", func, i);
                weightd__v1__shard_rule__init(x);
                x->pattern = (char *) o->rules[i].pattern;
                x->dim = o->rules[i].dim;
                (*rule_ptrs)[i] = x;
        }
        shard->n_rules = o->n_rules;
        shard->rules = *rule_ptrs;
        load->shard = shard;
        return WD_OK;
}

_public_ int wd_load_ex(wd_client *c, const char *model, const char *component, const wd_load_options *opts,
                        wd_lease **ret, wd_error *err) {
        Weightd__V1__LoadRequest load;
        char target[CLIENT_TARGET_MAX];
        Weightd__V1__Shard shard;
        _cleanup_free_ Weightd__V1__ShardRule *rules = NULL;
        _cleanup_free_ Weightd__V1__ShardRule **rule_ptrs = NULL;
        WireEnvelope env = WEIGHTD__V1__ENVELOPE__INIT;
        wd_error e;
        int r;

        r = check_args("wd_load", c && model && ret, &e);
        if (r == WD_OK && client_foreign(c)) /* before the mutex, and before a device target asks CUDA */
                r = client_foreign_error(c, "Load", &e);
        if (r == WD_OK)
                r = load_request_ex("wd_load", model, component, opts, &load, target, &shard, &rules, &rule_ptrs, &e);
        if (r != WD_OK)
                return finish(r, &e, err);

        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_LOAD;
        env.load = &load;
        pthread_mutex_lock(&c->mutex);
        r = client_load(c, &env, opts ? opts->progress : NULL, opts ? opts->userdata : NULL, ret, &e);
        pthread_mutex_unlock(&c->mutex);
        return finish(r, &e, err);
}

_public_ int wd_load(wd_client *c, const char *model, const char *component, wd_lease **ret, wd_error *err) {
        return wd_load_ex(c, model, component, NULL, ret, err);
}

_public_ const wd_manifest *wd_lease_manifest(const wd_lease *l) {
        return l ? l->manifest : NULL;
}

_public_ uint64_t wd_lease_id(const wd_lease *l) {
        return l ? l->id : 0;
}

_public_ int wd_release(wd_lease *l, wd_error *err) {
        wd_client *c;
        wd_error e;
        int r;

        if (!l)
                return WD_OK;
        c = l->client;

        /* A forked child's copy of the lease is the parent's lease in the
         * daemon: drop only this process's mapping, send nothing. */
        if (client_foreign(c))
                r = WD_OK;
        else {
                pthread_mutex_lock(&c->mutex);
                r = client_release(c, l->id, &e);
                pthread_mutex_unlock(&c->mutex);
        }

        manifest_free(l->manifest);
        free(l);
        client_unref(c);
        return finish(r, &e, err);
}

_public_ int wd_prefetch_ex(wd_client *c, const char *model, const char *component, const wd_load_options *opts,
                            wd_prefetch_result *ret, wd_error *err) {
        Weightd__V1__LoadRequest load;
        char target[CLIENT_TARGET_MAX];
        Weightd__V1__Shard shard;
        _cleanup_free_ Weightd__V1__ShardRule *rules = NULL;
        _cleanup_free_ Weightd__V1__ShardRule **rule_ptrs = NULL;
        WireEnvelope env = WEIGHTD__V1__ENVELOPE__INIT;
        _cleanup_envelope_ WireEnvelope *reply = NULL;
        wd_error e;
        int r;

        r = check_args("wd_prefetch", c && model, &e);
        if (r == WD_OK && opts && opts->n_names > 0)
                r = error_set(&e, WD_INVALID_ARGUMENT,
                              "wd_prefetch: names: only wd_load_ex() leases named tensors; a prefetch makes the "
                              "whole component resident");
        if (r == WD_OK && client_foreign(c))
                r = client_foreign_error(c, "Prefetch", &e);
        if (r == WD_OK)
                r = load_request_ex("wd_prefetch", model, component, opts, &load, target, &shard, &rules, &rule_ptrs, &e);
        if (r != WD_OK)
                return finish(r, &e, err);

        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_PREFETCH;
        env.prefetch = &load;
        r = client_request(c, &env, WEIGHTD__V1__REPLY__RESULT_LOAD, opts ? opts->progress : NULL,
                           opts ? opts->userdata : NULL, &reply, &e);
        if (r == WD_OK && ret)
                *ret = (wd_prefetch_result){
                        .bytes = reply->reply->load->bytes,
                        .was_resident = reply->reply->load->was_resident,
                };
        return finish(r, &e, err);
}

_public_ int wd_prefetch(wd_client *c, const char *model, const char *component, wd_progress_fn progress,
                         void *userdata, wd_prefetch_result *ret, wd_error *err) {
        wd_load_options o = { .progress = progress, .userdata = userdata };

        return wd_prefetch_ex(c, model, component, &o, ret, err);
}

/* Copy s to *p and advance it past the copy's NUL. */
static const char *pack_string(char **p, const char *s) {
        size_t n = strlen(s) + 1;
        char *d = *p;

        memcpy(d, s, n);
        *p += n;
        return d;
}

/* The LoadReply of a cluster prefetch names every node it speaks of and
 * its state.  A daemon older than the cluster tier does not know
 * LoadRequest.cluster and answers as for a plain prefetch, without nodes
 * (a cluster has one node at least: the daemon's own).  Returns WD_OK,
 * WD_UNSUPPORTED, or WD_PROTOCOL_ERROR naming the node that breaks a
 * rule. */
static int cluster_loads_check(const Weightd__V1__LoadReply *lr, const char *model, wd_error *err) {
        char name[256];

        if (lr->n_cluster_nodes == 0) {
                escape_string(name, sizeof(name), model, 200);
                return error_set(err, WD_UNSUPPORTED,
                                 "%s: the daemon answered the cluster prefetch as a plain one (it is older than the "
                                 "cluster tier): the component is resident on its node only",
                                 name);
        }
        for (size_t i = 0; i < lr->n_cluster_nodes; i++) {
                const Weightd__V1__ClusterNodeLoad *x = lr->cluster_nodes[i];

                escape_string(name, sizeof(name), x->node, 200);
                if (x->node[0] == '\0')
                        return error_set(err, WD_PROTOCOL_ERROR, "daemon's cluster prefetch: node %zu has no name", i);
                if (x->state[0] == '\0')
                        return error_set(err, WD_PROTOCOL_ERROR, "daemon's cluster prefetch: node \"%s\": no state",
                                         name);
        }
        return WD_OK;
}

/* A cluster prefetch of nodes (shards: one per node, or NULL). */
static int prefetch_cluster(wd_client *c, const char *func, const char *model, const char *component,
                            const char *const *nodes, size_t n_nodes, Weightd__V1__Shard **shards,
                            const char *const *targets, const char *device, wd_progress_fn progress, void *userdata,
                            wd_cluster_prefetch_result **ret, wd_error *err) {
        Weightd__V1__LoadRequest load = load_request(model, component, progress != NULL);
        WireEnvelope env = WEIGHTD__V1__ENVELOPE__INIT;
        _cleanup_envelope_ WireEnvelope *reply = NULL;
        wd_error e;
        int r;

        r = check_args(func, c && model && (nodes || n_nodes == 0), &e);
        for (size_t i = 0; r == WD_OK && i < n_nodes; i++)
                if (!nodes[i])
                        r = error_set(&e, WD_INVALID_ARGUMENT, "%s(): node %zu is NULL", func, i);
        if (r != WD_OK)
                return finish(r, &e, err);

        /* The names go as they are: which node the daemon knows is its
         * business. */
        load.cluster = true;
        load.nodes = (char **) nodes;
        load.n_nodes = n_nodes;
        if (shards) {
                load.node_shards = shards;
                load.n_node_shards = n_nodes;
        }
        if (targets) {
                load.node_targets = (char **) targets;
                load.n_node_targets = n_nodes;
        }
        /* The daemons' device index, as it is: not this process's ordinal. */
        if (device && *device && strcmp(device, "host") != 0)
                load.target = (char *) device;
        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_PREFETCH;
        env.prefetch = &load;
        r = client_request(c, &env, WEIGHTD__V1__REPLY__RESULT_LOAD, progress, userdata, &reply, &e);
        if (r == WD_OK)
                r = cluster_loads_check(reply->reply->load, model, &e);
        if (r != WD_OK || !ret)
                return finish(r, &e, err);

        const Weightd__V1__LoadReply *lr = reply->reply->load;
        size_t n = lr->n_cluster_nodes, strings = 0;

        for (size_t i = 0; i < n; i++)
                strings += strlen(lr->cluster_nodes[i]->node) + strlen(lr->cluster_nodes[i]->state) +
                           strlen(lr->cluster_nodes[i]->message) + 3;

        /* One allocation: the result, its nodes, then their strings. */
        wd_cluster_prefetch_result *res = malloc(sizeof(*res) + n * sizeof(wd_cluster_node_load) + strings);
        if (!res)
                return finish(error_set(&e, WD_INTERNAL, "out of memory"), &e, err);
        wd_cluster_node_load *v = (wd_cluster_node_load *) (res + 1);
        char *p = (char *) (v + n);

        for (size_t i = 0; i < n; i++) {
                const Weightd__V1__ClusterNodeLoad *x = lr->cluster_nodes[i];

                v[i] = (wd_cluster_node_load){
                        .node = pack_string(&p, x->node),
                        .state = pack_string(&p, x->state),
                        .storage_read_bytes = x->storage_read_bytes,
                        .peer_received_bytes = x->peer_received_bytes,
                        .peer_sent_bytes = x->peer_sent_bytes,
                        .message = pack_string(&p, x->message),
                };
        }
        *res = (wd_cluster_prefetch_result){
                .bytes = lr->bytes,
                .was_resident = lr->was_resident,
                .n_nodes = n,
                .nodes = v,
        };
        *ret = res;
        return WD_OK;
}

_public_ int wd_prefetch_cluster(wd_client *c, const char *model, const char *component, const char *const *nodes,
                                 size_t n_nodes, wd_progress_fn progress, void *userdata,
                                 wd_cluster_prefetch_result **ret, wd_error *err) {
        return prefetch_cluster(c, "wd_prefetch_cluster", model, component, nodes, n_nodes, NULL, NULL, NULL,
                                progress, userdata, ret, err);
}

_public_ int wd_prefetch_cluster_ex(wd_client *c, const char *model, const char *component,
                                    const wd_cluster_options *o, wd_cluster_prefetch_result **ret, wd_error *err) {
        const wd_cluster_part *parts = o ? o->parts : NULL;
        size_t n_parts = o ? o->n_parts : 0;
        _cleanup_free_ const char **nodes = NULL, **targets = NULL;
        bool any_target = false;
        _cleanup_free_ Weightd__V1__Shard *shards = NULL;
        _cleanup_free_ Weightd__V1__Shard **shard_ptrs = NULL;
        _cleanup_free_ Weightd__V1__ShardRule *rules = NULL;
        _cleanup_free_ Weightd__V1__ShardRule **rule_ptrs = NULL;
        size_t n_rules = 0, k = 0;
        wd_error e;
        int r;

        r = check_args("wd_prefetch_cluster_ex", c && model && o && (parts || n_parts == 0) &&
                                                          (o->nodes || o->n_nodes == 0), &e);
        if (r == WD_OK && n_parts > 0 && o->n_nodes > 0)
                r = error_set(&e, WD_INVALID_ARGUMENT, "wd_prefetch_cluster_ex(): nodes or parts, not both");
        if (r != WD_OK)
                return finish(r, &e, err);
        if (n_parts == 0)
                return prefetch_cluster(c, "wd_prefetch_cluster_ex", model, component, o->nodes, o->n_nodes, NULL,
                                        NULL, o->device, o->progress, o->userdata, ret, err);
        for (size_t i = 0; i < n_parts; i++) {
                const wd_cluster_part *x = &parts[i];

                if (!x->node)
                        return finish(error_set(&e, WD_INVALID_ARGUMENT, "wd_prefetch_cluster_ex(): part %zu "
                                                "names no node", i), &e, err);
                if ((x->world == 0 ? x->rank > 0 || x->n_rules > 0 : x->rank >= x->world || (x->n_rules && !x->rules)) ||
                    (x->n_tensors && !x->tensors))
                        return finish(error_set(&e, WD_INVALID_ARGUMENT,
                                                "wd_prefetch_cluster_ex(): %s: rank %u of world %u with %zu rules "
                                                "(world 0: the whole component, no rank or rules)",
                                                x->node, x->rank, x->world, x->n_rules), &e, err);
                for (size_t j = 0; j < x->n_rules; j++)
                        if (!x->rules[j].pattern)
                                return finish(error_set(&e, WD_INVALID_ARGUMENT,
                                                        "wd_prefetch_cluster_ex(): %s: rule %zu has no pattern",
                                                        x->node, j), &e, err);
                for (size_t j = 0; j < x->n_tensors; j++)
                        if (!x->tensors[j])
                                return finish(error_set(&e, WD_INVALID_ARGUMENT,
                                                        "wd_prefetch_cluster_ex(): %s: tensors pattern %zu is NULL",
                                                        x->node, j), &e, err);
                n_rules += x->n_rules;
                any_target = any_target || (x->device && *x->device);
        }
        nodes = calloc(n_parts, sizeof(char *));
        shards = calloc(n_parts, sizeof(*shards));
        shard_ptrs = calloc(n_parts, sizeof(*shard_ptrs));
        rules = calloc(n_rules + 1, sizeof(*rules));
        rule_ptrs = calloc(n_rules + 1, sizeof(*rule_ptrs));
        targets = any_target ? calloc(n_parts, sizeof(char *)) : NULL;
        if (!nodes || !shards || !shard_ptrs || !rules || !rule_ptrs || (any_target && !targets))
                return finish(error_set(&e, WD_INTERNAL, "out of memory"), &e, err);
        for (size_t i = 0; i < n_parts; i++) {
                const wd_cluster_part *x = &parts[i];
                Weightd__V1__Shard *m = &shards[i];

                nodes[i] = x->node;
                if (targets)
                        targets[i] = x->device ? x->device : "";
                weightd__v1__shard__init(m);
                shard_ptrs[i] = m;
                /* The whole component: world 1 splits nothing. */
                m->world = x->world ? x->world : 1;
                m->rank = x->rank;
                m->uneven = x->uneven != 0;
                m->rules = &rule_ptrs[k];
                m->n_rules = x->n_rules;
                m->tensors = (char **) x->tensors;
                m->n_tensors = x->n_tensors;
                for (size_t j = 0; j < x->n_rules; j++, k++) {
                        weightd__v1__shard_rule__init(&rules[k]);
                        rules[k].pattern = (char *) x->rules[j].pattern;
                        rules[k].dim = x->rules[j].dim;
                        rule_ptrs[k] = &rules[k];
                }
        }
        return prefetch_cluster(c, "wd_prefetch_cluster_ex", model, component, nodes, n_parts, shard_ptrs, targets,
                                o->device, o->progress, o->userdata, ret, err);
}

_public_ void wd_cluster_prefetch_result_free(wd_cluster_prefetch_result *r) {
        free(r);
}

/* Evict, Pin and Unpin: a ComponentRef and a reply without a result. */
static int component_request(wd_client *c, const char *func, BodyCase body, const char *model, const char *component,
                             wd_error *err) {
        Weightd__V1__ComponentRef ref = component_ref(model, component);
        WireEnvelope env = WEIGHTD__V1__ENVELOPE__INIT;
        wd_error e;
        int r;

        r = check_args(func, c && model, &e);
        if (r != WD_OK)
                return finish(r, &e, err);

        env.body_case = body;
        if (body == WEIGHTD__V1__ENVELOPE__BODY_EVICT)
                env.evict = &ref;
        else if (body == WEIGHTD__V1__ENVELOPE__BODY_PIN)
                env.pin = &ref;
        else
                env.unpin = &ref;
        r = client_request(c, &env, WEIGHTD__V1__REPLY__RESULT__NOT_SET, NULL, NULL, NULL, &e);
        return finish(r, &e, err);
}

_public_ int wd_evict(wd_client *c, const char *model, const char *component, wd_error *err) {
        return component_request(c, "wd_evict", WEIGHTD__V1__ENVELOPE__BODY_EVICT, model, component, err);
}

_public_ int wd_pin(wd_client *c, const char *model, const char *component, wd_error *err) {
        return component_request(c, "wd_pin", WEIGHTD__V1__ENVELOPE__BODY_PIN, model, component, err);
}

_public_ int wd_unpin(wd_client *c, const char *model, const char *component, wd_error *err) {
        return component_request(c, "wd_unpin", WEIGHTD__V1__ENVELOPE__BODY_UNPIN, model, component, err);
}

/* List, Status and Cluster: a request without fields and a reply with one
 * result. */
static int query_request(wd_client *c, BodyCase body, ResultCase expect, WireEnvelope **ret, wd_error *err) {
        Weightd__V1__ListRequest list = WEIGHTD__V1__LIST_REQUEST__INIT;
        Weightd__V1__StatusRequest status = WEIGHTD__V1__STATUS_REQUEST__INIT;
        Weightd__V1__ClusterRequest cluster = WEIGHTD__V1__CLUSTER_REQUEST__INIT;
        WireEnvelope env = WEIGHTD__V1__ENVELOPE__INIT;

        env.body_case = body;
        if (body == WEIGHTD__V1__ENVELOPE__BODY_LIST)
                env.list = &list;
        else if (body == WEIGHTD__V1__ENVELOPE__BODY_CLUSTER)
                env.cluster = &cluster;
        else
                env.status = &status;
        return client_request(c, &env, expect, NULL, NULL, ret, err);
}

_public_ int wd_list(wd_client *c, wd_entry **ret_entries, size_t *ret_n, wd_error *err) {
        _cleanup_envelope_ WireEnvelope *reply = NULL;
        wd_error e;
        int r;

        r = check_args("wd_list", c && ret_entries && ret_n, &e);
        if (r == WD_OK)
                r = query_request(c, WEIGHTD__V1__ENVELOPE__BODY_LIST, WEIGHTD__V1__REPLY__RESULT_LIST, &reply, &e);
        if (r != WD_OK)
                return finish(r, &e, err);

        const Weightd__V1__ListReply *lr = reply->reply->list;
        size_t n = lr->n_entries, strings = 0;

        for (size_t i = 0; i < n; i++) {
                const Weightd__V1__Entry *x = lr->entries[i];

                strings += strlen(x->model) + strlen(x->component) + strlen(x->tier) + strlen(x->state) +
                           strlen(x->shard) + 5;
        }

        /* One allocation: the entries, then their strings. */
        wd_entry *v = malloc(n * sizeof(wd_entry) + strings + 1);
        if (!v)
                return finish(error_set(&e, WD_INTERNAL, "out of memory"), &e, err);
        char *p = (char *) (v + n);
        for (size_t i = 0; i < n; i++) {
                const Weightd__V1__Entry *x = lr->entries[i];

                v[i] = (wd_entry){
                        .model = pack_string(&p, x->model),
                        .component = pack_string(&p, x->component),
                        .tier = pack_string(&p, x->tier),
                        .state = pack_string(&p, x->state),
                        .bytes = x->bytes,
                        .leases = x->leases,
                        .pinned = x->pinned,
                        .files = x->files,
                        .idle_ms = x->idle_ms,
                        .shard = pack_string(&p, x->shard),
                };
        }
        *ret_entries = v;
        *ret_n = n;
        return WD_OK;
}

_public_ void wd_entries_free(wd_entry *entries, size_t n) {
        free(entries);
}

static int info_name_cmp(const void *a, const void *b) {
        const Weightd__V1__ComponentInfo *x = *(Weightd__V1__ComponentInfo *const *) a;
        const Weightd__V1__ComponentInfo *y = *(Weightd__V1__ComponentInfo *const *) b;

        return strcmp(x->name, y->name);
}

/* A ComponentsReply as the daemon builds it: a pipeline's components are
 * named by distinct plain folder names, any other model has one component
 * named "", and every component has a kind.  Returns WD_OK,
 * WD_PROTOCOL_ERROR naming the component that breaks a rule, or
 * WD_INTERNAL. */
static int components_check(const Weightd__V1__ComponentsReply *cr, wd_error *err) {
        size_t n = cr->n_components;
        char name[256];

        if (!cr->diffusers && n != 1)
                return error_set(err, WD_PROTOCOL_ERROR,
                                 "daemon's component list: %zu components for a model that is not a pipeline", n);
        for (size_t i = 0; i < n; i++) {
                const Weightd__V1__ComponentInfo *x = cr->components[i];

                escape_string(name, sizeof(name), x->name, 200);
                if (!cr->diffusers && x->name[0] != '\0')
                        return error_set(err, WD_PROTOCOL_ERROR,
                                         "daemon's component list: component \"%s\" of a model that is not a pipeline",
                                         name);
                if (cr->diffusers && (x->name[0] == '\0' || strcmp(x->name, ".") == 0 ||
                                      strcmp(x->name, "..") == 0 || strchr(x->name, '/')))
                        return error_set(err, WD_PROTOCOL_ERROR,
                                         "daemon's component list: component \"%s\" is not a folder name", name);
                if (x->kind[0] == '\0')
                        return error_set(err, WD_PROTOCOL_ERROR, "daemon's component list: component \"%s\": no kind",
                                         name);
        }
        if (n < 2)
                return WD_OK;

        _cleanup_free_ Weightd__V1__ComponentInfo **sorted = malloc(n * sizeof(*sorted));
        if (!sorted)
                return error_set(err, WD_INTERNAL, "out of memory");
        memcpy(sorted, cr->components, n * sizeof(*sorted));
        qsort(sorted, n, sizeof(*sorted), info_name_cmp);
        for (size_t i = 1; i < n; i++)
                if (strcmp(sorted[i - 1]->name, sorted[i]->name) == 0) {
                        escape_string(name, sizeof(name), sorted[i]->name, 200);
                        return error_set(err, WD_PROTOCOL_ERROR,
                                         "daemon's component list: component \"%s\" is listed twice", name);
                }
        return WD_OK;
}

_public_ int wd_components(wd_client *c, const char *model, wd_component **ret, size_t *ret_n, int *ret_diffusers,
                           wd_error *err) {
        Weightd__V1__ComponentRef ref = component_ref(model, NULL);
        WireEnvelope env = WEIGHTD__V1__ENVELOPE__INIT;
        _cleanup_envelope_ WireEnvelope *reply = NULL;
        wd_error e;
        int r;

        r = check_args("wd_components", c && model && ret && ret_n, &e);
        if (r != WD_OK)
                return finish(r, &e, err);

        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_COMPONENTS;
        env.components = &ref;
        r = client_request(c, &env, WEIGHTD__V1__REPLY__RESULT_COMPONENTS, NULL, NULL, &reply, &e);
        if (r != WD_OK)
                return finish(r, &e, err);

        const Weightd__V1__ComponentsReply *cr = reply->reply->components;
        size_t n = cr->n_components, strings = 0;

        r = components_check(cr, &e);
        if (r != WD_OK)
                return finish(r, &e, err);
        for (size_t i = 0; i < n; i++) {
                const Weightd__V1__ComponentInfo *x = cr->components[i];

                strings += strlen(x->name) + strlen(x->kind) + strlen(x->library) + strlen(x->class_name) + 4;
        }

        /* One allocation: the components, then their strings. */
        wd_component *v = malloc(n * sizeof(wd_component) + strings + 1);
        if (!v)
                return finish(error_set(&e, WD_INTERNAL, "out of memory"), &e, err);
        char *p = (char *) (v + n);
        for (size_t i = 0; i < n; i++) {
                const Weightd__V1__ComponentInfo *x = cr->components[i];

                v[i] = (wd_component){
                        .name = pack_string(&p, x->name),
                        .kind = pack_string(&p, x->kind),
                        .library = pack_string(&p, x->library),
                        .class_name = pack_string(&p, x->class_name),
                };
        }
        *ret = v;
        *ret_n = n;
        if (ret_diffusers)
                *ret_diffusers = cr->diffusers;
        return WD_OK;
}

_public_ void wd_components_free(wd_component *components, size_t n) {
        free(components);
}

/* A ClusterReply as the daemon builds it: an enabled cluster names this
 * node, and every node has a name and a state.  Returns WD_OK or
 * WD_PROTOCOL_ERROR naming the node that breaks a rule. */
static int cluster_check(const Weightd__V1__ClusterReply *cr, wd_error *err) {
        char name[256];

        if (!cr->enabled)
                return WD_OK;
        if (cr->node[0] == '\0')
                return error_set(err, WD_PROTOCOL_ERROR, "daemon's cluster: no name for this node");
        for (size_t i = 0; i < cr->n_nodes; i++) {
                const Weightd__V1__ClusterNode *x = cr->nodes[i];

                escape_string(name, sizeof(name), x->name, 200);
                if (x->name[0] == '\0')
                        return error_set(err, WD_PROTOCOL_ERROR, "daemon's cluster: node %zu has no name", i);
                if (x->state[0] == '\0')
                        return error_set(err, WD_PROTOCOL_ERROR, "daemon's cluster: node \"%s\": no state", name);
        }
        return WD_OK;
}

/* The nodes and the bytes of strings that cluster_copy() takes for cr (none
 * when it is disabled). */
static size_t cluster_n_nodes(const Weightd__V1__ClusterReply *cr) {
        return cr->enabled ? cr->n_nodes : 0;
}

static size_t cluster_strings(const Weightd__V1__ClusterReply *cr) {
        size_t n = 0;

        if (!cr->enabled)
                return 0;
        n = strlen(cr->node) + 1 + strlen(cr->gpu_lane) + 1;
        for (size_t i = 0; i < cr->n_nodes; i++) {
                const Weightd__V1__ClusterNode *x = cr->nodes[i];

                n += strlen(x->name) + strlen(x->address) + strlen(x->state) + strlen(x->last_error) + 4;
        }
        return n;
}

/* Fill ci from cr: its nodes go to nodes (cluster_n_nodes() entries), its
 * strings to *p.  A disabled cluster is all zero but enabled's 0. */
static void cluster_copy(const Weightd__V1__ClusterReply *cr, wd_cluster_info *ci, wd_cluster_node *nodes, char **p) {
        size_t n = cluster_n_nodes(cr);

        *ci = (wd_cluster_info){};
        if (!cr->enabled)
                return;
        for (size_t i = 0; i < n; i++) {
                const Weightd__V1__ClusterNode *x = cr->nodes[i];

                nodes[i] = (wd_cluster_node){
                        .name = pack_string(p, x->name),
                        .address = pack_string(p, x->address),
                        .state = pack_string(p, x->state),
                        .generation = x->generation,
                        .rtt_us = x->rtt_us,
                        .sent_bytes = x->sent_bytes,
                        .received_bytes = x->received_bytes,
                        .last_error = pack_string(p, x->last_error),
                        .since_ms = x->since_ms,
                };
        }
        *ci = (wd_cluster_info){
                .enabled = 1,
                .node = pack_string(p, cr->node),
                .generation = cr->generation,
                .n_nodes = n,
                .nodes = nodes,
                .peer_sent_bytes = cr->peer_sent_bytes,
                .peer_received_bytes = cr->peer_received_bytes,
                .storage_saved_bytes = cr->storage_saved_bytes,
                .gpu_lane = pack_string(p, cr->gpu_lane),
                .lane_sent_bytes = cr->lane_sent_bytes,
                .lane_received_bytes = cr->lane_received_bytes,
        };
}

_public_ int wd_cluster(wd_client *c, wd_cluster_info **ret, wd_error *err) {
        _cleanup_envelope_ WireEnvelope *reply = NULL;
        wd_error e;
        int r;

        r = check_args("wd_cluster", c && ret, &e);
        if (r == WD_OK)
                r = query_request(c, WEIGHTD__V1__ENVELOPE__BODY_CLUSTER, WEIGHTD__V1__REPLY__RESULT_CLUSTER, &reply,
                                  &e);
        if (r == WD_OK)
                r = cluster_check(reply->reply->cluster, &e);
        if (r != WD_OK)
                return finish(r, &e, err);

        const Weightd__V1__ClusterReply *cr = reply->reply->cluster;
        size_t n = cluster_n_nodes(cr);

        /* One allocation: the cluster, its nodes, then their strings. */
        wd_cluster_info *ci = malloc(sizeof(*ci) + n * sizeof(wd_cluster_node) + cluster_strings(cr));
        if (!ci)
                return finish(error_set(&e, WD_INTERNAL, "out of memory"), &e, err);
        wd_cluster_node *nodes = (wd_cluster_node *) (ci + 1);
        char *p = (char *) (nodes + n);

        cluster_copy(cr, ci, nodes, &p);
        *ret = ci;
        return WD_OK;
}

_public_ void wd_cluster_free(wd_cluster_info *ci) {
        free(ci);
}

_public_ int wd_status_get(wd_client *c, wd_status **ret, wd_error *err) {
        _cleanup_envelope_ WireEnvelope *reply = NULL;
        wd_error e;
        int r;

        r = check_args("wd_status_get", c && ret, &e);
        if (r == WD_OK)
                r = query_request(c, WEIGHTD__V1__ENVELOPE__BODY_STATUS, WEIGHTD__V1__REPLY__RESULT_STATUS, &reply, &e);
        if (r != WD_OK)
                return finish(r, &e, err);

        const Weightd__V1__StatusReply *sr = reply->reply->status;
        /* The cluster part only where the daemon has one. */
        const Weightd__V1__ClusterReply *cr = sr->cluster && sr->cluster->enabled ? sr->cluster : NULL;
        size_t n = sr->n_model_roots, nd = sr->n_devices, ncl = cr ? cluster_n_nodes(cr) : 0,
               strings = strlen(sr->version) + strlen(sr->socket) + strlen(sr->gpu) + strlen(sr->hugetlb_pool) + 4;

        if (cr) {
                r = cluster_check(cr, &e);
                if (r != WD_OK)
                        return finish(r, &e, err);
                strings += cluster_strings(cr);
        }

        for (size_t i = 0; i < n; i++)
                strings += strlen(sr->model_roots[i]) + 1;
        for (size_t i = 0; i < nd; i++)
                strings += strlen(sr->devices[i]->uuid) + strlen(sr->devices[i]->name) +
                           strlen(sr->devices[i]->pci_bus_id) + 3;

        /* One allocation: the status, the devices, the cluster and its
         * nodes, the roots' pointers, then the strings. */
        wd_status *s = malloc(sizeof(wd_status) + nd * sizeof(wd_device) + (cr ? sizeof(wd_cluster_info) : 0) +
                              ncl * sizeof(wd_cluster_node) + n * sizeof(char *) + strings);
        if (!s)
                return finish(error_set(&e, WD_INTERNAL, "out of memory"), &e, err);
        wd_device *devs = (wd_device *) (s + 1);
        wd_cluster_info *ci = (wd_cluster_info *) (devs + nd);
        wd_cluster_node *cnodes = (wd_cluster_node *) (ci + (cr ? 1 : 0));
        const char **roots = (const char **) (cnodes + ncl);
        char *p = (char *) (roots + n);

        *s = (wd_status){
                .version = pack_string(&p, sr->version),
                .pid = sr->pid,
                .uptime_ms = sr->uptime_ms,
                .host_budget_bytes = sr->host_budget_bytes,
                .host_used_bytes = sr->host_used_bytes,
                .host_evictable_bytes = sr->host_evictable_bytes,
                .storage_read_bytes = sr->storage_read_bytes,
                .leases = sr->leases,
                .connections = sr->connections,
                .entries = sr->entries,
                .loading = sr->loading,
                .evictions = sr->evictions,
                .n_model_roots = n,
                .model_roots = roots,
                .socket = pack_string(&p, sr->socket),
                .hugetlb = sr->hugetlb,
                .gpu = pack_string(&p, sr->gpu),
                .n_devices = nd,
                .devices = devs,
                .cluster = cr ? ci : NULL,
                .hugetlb_pool = pack_string(&p, sr->hugetlb_pool),
                .hugetlb_reserved_bytes = sr->hugetlb_reserved_bytes,
                .hugetlb_touched_bytes = sr->hugetlb_touched_bytes,
                .hugetlb_free_bytes = sr->hugetlb_free_bytes,
                .shmem_fallback_slabs = sr->shmem_fallback_slabs,
                .shmem_fallback_bytes = sr->shmem_fallback_bytes,
        };
        if (cr)
                cluster_copy(cr, ci, cnodes, &p);
        for (size_t i = 0; i < n; i++)
                roots[i] = pack_string(&p, sr->model_roots[i]);
        for (size_t i = 0; i < nd; i++) {
                const Weightd__V1__Device *d = sr->devices[i];

                devs[i] = (wd_device){
                        .index = d->index,
                        .uuid = pack_string(&p, d->uuid),
                        .name = pack_string(&p, d->name),
                        .pci_bus_id = pack_string(&p, d->pci_bus_id),
                        .total_bytes = d->total_bytes,
                        .budget_bytes = d->budget_bytes,
                        .used_bytes = d->used_bytes,
                        .evictable_bytes = d->evictable_bytes,
                };
        }
        *ret = s;
        return WD_OK;
}

_public_ void wd_status_free(wd_status *s) {
        free(s);
}
