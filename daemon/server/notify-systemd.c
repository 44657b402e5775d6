/* Service-manager integration through libsystemd. */

#include <errno.h>
#include <stddef.h>
#include <sys/socket.h>
#include <systemd/sd-daemon.h>

#include "server/notify.h"

int notify_send(const char *state) {
        return sd_notify(0, state);
}

int notify_listen_fd(void) {
        int n = sd_listen_fds(1);

        if (n <= 0)
                return n;
        if (n > 1)
                return -EINVAL;
        if (sd_is_socket_unix(SD_LISTEN_FDS_START, SOCK_STREAM, 1, NULL, 0) <= 0)
                return -ENOTSOCK;
        return SD_LISTEN_FDS_START;
}

uint64_t notify_watchdog_usec(void) {
        uint64_t usec = 0;

        if (sd_watchdog_enabled(1, &usec) <= 0)
                return 0;
        return usec;
}
