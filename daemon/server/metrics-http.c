/* The Prometheus endpoint over libmicrohttpd (see metrics-http.h).
 *
 * We bind the socket ourselves (close-on-exec, our error messages) and hand
 * it to libmicrohttpd, which serves it from one internal thread with epoll.
 * Each publication is an MHD_Response made on the loop thread; the HTTP
 * thread queues the current one under a mutex.  libmicrohttpd counts the
 * response's users under its own lock, so the loop may drop its reference
 * to an old rendering while a slow client is still being sent it. */
#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "server/metrics-http.h"
#include "util/fs-util.h"

#define CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"

struct MetricsHttp {
        struct MHD_Daemon *mhd;
        uint16_t port;
        pthread_mutex_t lock;
        struct MHD_Response *current; /* under lock; NULL until the first publication */
        struct MHD_Response *not_found, *not_allowed, *not_ready; /* made once, read-only after */
};

static struct MHD_Response *static_response(const char *text) {
        struct MHD_Response *r =
                MHD_create_response_from_buffer(strlen(text), (void *) text, MHD_RESPMEM_PERSISTENT);

        if (r && MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/plain; charset=utf-8") != MHD_YES) {
                MHD_destroy_response(r);
                return NULL;
        }
        return r;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_data_size,
                                  void **req_cls) {
        MetricsHttp *h = cls;
        enum MHD_Result r;

        /* Answered at once, a body (if any) unread: MHD closes such a
         * connection after the reply. */
        if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 && strcmp(method, MHD_HTTP_METHOD_HEAD) != 0)
                return MHD_queue_response(c, MHD_HTTP_METHOD_NOT_ALLOWED, h->not_allowed);
        if (strcmp(url, "/metrics") != 0)
                return MHD_queue_response(c, MHD_HTTP_NOT_FOUND, h->not_found);

        pthread_mutex_lock(&h->lock);
        if (h->current)
                r = MHD_queue_response(c, MHD_HTTP_OK, h->current);
        else
                r = MHD_queue_response(c, MHD_HTTP_SERVICE_UNAVAILABLE, h->not_ready);
        pthread_mutex_unlock(&h->lock);
        return r;
}

static int bind_socket(const char *host, uint16_t port, uint16_t *ret_port, WdError *err) {
        struct sockaddr_storage ss = {};
        socklen_t len;
        _cleanup_close_ int fd = -1;
        int one = 1;

        if (strchr(host, ':')) {
                struct sockaddr_in6 *a = (struct sockaddr_in6 *) &ss;

                a->sin6_family = AF_INET6;
                a->sin6_port = htons(port);
                if (inet_pton(AF_INET6, host, &a->sin6_addr) != 1)
                        return wd_error_set(err, -EINVAL, "%s is not an IPv6 address", host);
                len = sizeof(*a);
        } else {
                struct sockaddr_in *a = (struct sockaddr_in *) &ss;

                a->sin_family = AF_INET;
                a->sin_port = htons(port);
                if (inet_pton(AF_INET, host, &a->sin_addr) != 1)
                        return wd_error_set(err, -EINVAL, "%s is not an IPv4 address", host);
                len = sizeof(*a);
        }
        fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return wd_error_set(err, -errno, "cannot create a socket: %s", strerror(errno));
        /* A restarted daemon binds again while the old connections linger
         * in TIME_WAIT. */
        (void) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (ss.ss_family == AF_INET6)
                (void) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
        if (bind(fd, (struct sockaddr *) &ss, len) < 0)
                return wd_error_set(err, -errno, "cannot bind %s%s%s:%u: %s", ss.ss_family == AF_INET6 ? "[" : "",
                                    host, ss.ss_family == AF_INET6 ? "]" : "", (unsigned) port, strerror(errno));
        if (listen(fd, 64) < 0)
                return wd_error_set(err, -errno, "cannot listen: %s", strerror(errno));
        len = sizeof(ss);
        if (getsockname(fd, (struct sockaddr *) &ss, &len) < 0)
                return wd_error_set(err, -errno, "cannot read the bound address: %s", strerror(errno));
        *ret_port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *) &ss)->sin6_port
                                                   : ((struct sockaddr_in *) &ss)->sin_port);
        return TAKE_FD(fd);
}

MetricsHttp *metrics_http_free(MetricsHttp *h) {
        if (!h)
                return NULL;
        if (h->mhd)
                MHD_stop_daemon(h->mhd); /* closes the listening socket too */
        if (h->current)
                MHD_destroy_response(h->current);
        if (h->not_found)
                MHD_destroy_response(h->not_found);
        if (h->not_allowed)
                MHD_destroy_response(h->not_allowed);
        if (h->not_ready)
                MHD_destroy_response(h->not_ready);
        pthread_mutex_destroy(&h->lock);
        free(h);
        return NULL;
}

int metrics_http_new(MetricsHttp **ret, const char *host, uint16_t port, WdError *err) {
        _cleanup_(metrics_http_freep) MetricsHttp *h = NULL;
        _cleanup_close_ int fd = -1;

        h = calloc(1, sizeof(MetricsHttp));
        if (!h)
                return wd_error_set(err, -ENOMEM, "out of memory");
        pthread_mutex_init(&h->lock, NULL);
        h->not_found = static_response("Not found: the metrics are at /metrics\n");
        h->not_allowed = static_response("Only GET and HEAD\n");
        h->not_ready = static_response("No metrics yet\n");
        if (!h->not_found || !h->not_allowed || !h->not_ready)
                return wd_error_set(err, -ENOMEM, "out of memory");

        fd = bind_socket(host, port, &h->port, err);
        if (fd < 0)
                return fd;
        h->mhd = MHD_start_daemon(
                /* No MHD_USE_ERROR_LOG: a client that breaks the protocol
                 * or meets a limit is not worth a line of the log each. */
                MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL, 0, NULL, NULL, on_request, h,
                MHD_OPTION_LISTEN_SOCKET, (MHD_socket) fd,
                MHD_OPTION_CONNECTION_LIMIT, (unsigned) METRICS_HTTP_MAX_CONNECTIONS,
                MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned) METRICS_HTTP_MAX_PER_ADDRESS,
                MHD_OPTION_CONNECTION_TIMEOUT, (unsigned) METRICS_HTTP_TIMEOUT_SEC,
                MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t) METRICS_HTTP_REQUEST_MEMORY,
                MHD_OPTION_SIGPIPE_HANDLED_BY_APP, 1, /* the daemon ignores SIGPIPE */
                MHD_OPTION_END);
        if (!h->mhd)
                return wd_error_set(err, -EIO, "libmicrohttpd did not start");
        TAKE_FD(fd); /* the MHD daemon's now */
        *ret = TAKE_PTR(h);
        return 0;
}

uint16_t metrics_http_port(const MetricsHttp *h) {
        return h->port;
}

static void free_text(void *p) {
        free(p);
}

int metrics_http_publish(MetricsHttp *h, char *text, size_t len) {
        struct MHD_Response *r, *old;

        r = MHD_create_response_from_buffer_with_free_callback_cls(len, text, free_text, text);
        if (!r) {
                free(text);
                return -ENOMEM;
        }
        if (MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, CONTENT_TYPE) != MHD_YES) {
                MHD_destroy_response(r);
                return -ENOMEM;
        }
        pthread_mutex_lock(&h->lock);
        old = h->current;
        h->current = r;
        pthread_mutex_unlock(&h->lock);
        if (old)
                MHD_destroy_response(old);
        return 0;
}
