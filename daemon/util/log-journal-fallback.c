/* Built without libsystemd: no journal, lines go to stderr (see log.h). */
#include <errno.h>

#include "util/log.h"

int log_journal_sendv(const struct iovec *iov, int n) {
        return -EOPNOTSUPP;
}
