/* The journal's native protocol through libsystemd (see log.h). */
#include <systemd/sd-journal.h>

#include "util/log.h"

int log_journal_sendv(const struct iovec *iov, int n) {
        return sd_journal_sendv(iov, n);
}
