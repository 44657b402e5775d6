/* Without libsystemd: no notifications, no socket activation. */

#include <errno.h>

#include "server/notify.h"

int notify_send(const char *state) {
        (void) state;
        return -EOPNOTSUPP;
}

int notify_listen_fd(void) {
        return 0;
}

uint64_t notify_watchdog_usec(void) {
        return 0;
}
