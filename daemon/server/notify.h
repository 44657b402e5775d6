/* The service manager: readiness, status, watchdog and socket activation.
 * With libsystemd these are sd_notify() and sd_listen_fds(); without it
 * (notify-fallback.c) they do nothing and report -EOPNOTSUPP. */
#pragma once

#include <stdint.h>

/* sd_notify(0, state); 0 when nobody listens.  Returns >= 0 or -errno. */
int notify_send(const char *state);
/* The one listening AF_UNIX stream socket passed by the service manager:
 * its fd (>= 3), 0 when none was passed, or -errno when what was passed is
 * not exactly one Unix stream socket.  Unsets $LISTEN_FDS. */
int notify_listen_fd(void);
/* The watchdog interval in microseconds, or 0 when the watchdog is off. */
uint64_t notify_watchdog_usec(void);
