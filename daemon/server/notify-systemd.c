/* Service-manager integration through libsystemd. */

#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <systemd/sd-daemon.h>

#include "server/notify.h"

int notify_send(const char *state) {
        return sd_notify(0, state);
}

int notify_listen_fds(char ***ret_names) {
        char **names = NULL;
        int n = sd_listen_fds_with_names(1, &names);

        if (n <= 0) {
                notify_names_free(names);
                return n;
        }
        *ret_names = names;
        return n;
}

void notify_names_free(char **names) {
        for (char **p = names; p && *p; p++)
                free(*p);
        free(names);
}

bool notify_available(void) {
        const char *e = getenv("NOTIFY_SOCKET");

        return e && *e;
}

int notify_store_fd(int fd, const char *name) {
        char msg[64 + 256];

        if (snprintf(msg, sizeof(msg), "FDSTORE=1\nFDPOLL=0\nFDNAME=%s", name) >= (int) sizeof(msg))
                return -ENAMETOOLONG;
        return sd_pid_notify_with_fds(0, 0, msg, &fd, 1);
}

int notify_store_remove(const char *name) {
        char msg[64 + 256];

        if (snprintf(msg, sizeof(msg), "FDSTOREREMOVE=1\nFDNAME=%s", name) >= (int) sizeof(msg))
                return -ENAMETOOLONG;
        return sd_notify(0, msg);
}

uint64_t notify_watchdog_usec(void) {
        uint64_t usec = 0;

        if (sd_watchdog_enabled(1, &usec) <= 0)
                return 0;
        return usec;
}
