/* The Prometheus endpoint's HTTP side: libmicrohttpd serving /metrics on its
 * own thread.  The loop publishes each rendering of the metrics here; the
 * HTTP thread only hands the last one out, and never calls into the daemon.
 * Connections are bounded in number (in all and per client address), in
 * time and in request memory, so that no client can hold more than that. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "util/error.h"

typedef struct MetricsHttp MetricsHttp;

#define METRICS_HTTP_MAX_CONNECTIONS 64u
#define METRICS_HTTP_MAX_PER_ADDRESS 16u
#define METRICS_HTTP_TIMEOUT_SEC 10u
#define METRICS_HTTP_REQUEST_MEMORY (16u << 10) /* a request's headers, per connection */

/* Bind host (an IPv4 or IPv6 address) and port (0: any free one) and serve.
 * Until the first metrics_http_publish() /metrics answers 503.  Returns 0,
 * or -errno with err saying what failed. */
int metrics_http_new(MetricsHttp **ret, const char *host, uint16_t port, WdError *err);
/* Stops the thread (a scrape in progress may finish) and frees. */
MetricsHttp *metrics_http_free(MetricsHttp *h);
DEFINE_TRIVIAL_CLEANUP_FUNC(MetricsHttp *, metrics_http_free);

/* The port it listens on (the one picked, for port 0). */
uint16_t metrics_http_port(const MetricsHttp *h);

/* Serve text (len bytes, taken over: freed with free()) from now on.
 * Returns 0, or -ENOMEM (text freed, the previous one stays). */
int metrics_http_publish(MetricsHttp *h, char *text, size_t len);
