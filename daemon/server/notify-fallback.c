/* Without libsystemd: no notifications, no socket activation, no file
 * descriptor store. */

#include <errno.h>

#include "server/notify.h"

int notify_send(const char *state) {
        (void) state;
        return -EOPNOTSUPP;
}

int notify_listen_fds(char ***ret_names) {
        (void) ret_names;
        return 0;
}

void notify_names_free(char **names) {
        (void) names;
}

bool notify_available(void) {
        return false;
}

int notify_store_fd(int fd, const char *name) {
        (void) fd;
        (void) name;
        return -EOPNOTSUPP;
}

int notify_store_remove(const char *name) {
        (void) name;
        return -EOPNOTSUPP;
}

uint64_t notify_watchdog_usec(void) {
        return 0;
}
