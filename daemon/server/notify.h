/* The service manager: readiness, status, watchdog, socket activation and
 * the file descriptor store.  With libsystemd these are sd_notify(),
 * sd_pid_notify_with_fds() and sd_listen_fds_with_names(); without it
 * (notify-fallback.c) they do nothing and report -EOPNOTSUPP. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

/* sd_notify(0, state); 0 when nobody listens.  Returns >= 0 or -errno. */
int notify_send(const char *state);
/* The descriptors the service manager passed ($LISTEN_FDS, from fd 3 on:
 * the socket unit's sockets, then the file descriptor store's) and their
 * names ($LISTEN_FDNAMES, "unknown" where none was given): their number,
 * 0 when none was passed, or -errno.  ret_names (a NULL-terminated array
 * the caller frees with notify_names_free()) is set when the number is
 * positive.  The descriptors are close-on-exec and the caller's; the
 * variables are unset. */
int notify_listen_fds(char ***ret_names);
void notify_names_free(char **names);
/* Whether a service manager listens for notifications ($NOTIFY_SOCKET). */
bool notify_available(void);
/* Hand a duplicate of fd to the service manager's file descriptor store
 * under name (FDSTORE=1, FDNAME=, FDPOLL=0).  Returns > 0 when sent, 0
 * when nobody listens, -errno. */
int notify_store_fd(int fd, const char *name);
/* Drop what the store holds under name (FDSTOREREMOVE=1, FDNAME=). */
int notify_store_remove(const char *name);
/* The watchdog interval in microseconds, or 0 when the watchdog is off. */
uint64_t notify_watchdog_usec(void);
