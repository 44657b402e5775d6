/* Leveled logging to stderr with "<N>" sd-daemon priority prefixes when
 * stderr goes to the journal. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/log.h"

static LogLevel max_level = LOG_LEVEL_INFO;

void log_set_max_level(LogLevel level) {
        max_level = level;
}

LogLevel log_get_max_level(void) {
        return max_level;
}

int log_internal(LogLevel level, int error, const char *fmt, ...) {
        static const int syslog_prio[] = { 3, 4, 6, 7 };
        int saved = errno, e = error < 0 ? -error : error;
        char buf[2048];
        va_list ap;

        if (level <= max_level) {
                /* glibc's %m reads errno: point it at the error we were given. */
                errno = e;
                va_start(ap, fmt);
                vsnprintf(buf, sizeof(buf), fmt, ap);
                va_end(ap);
                if (getenv("JOURNAL_STREAM"))
                        fprintf(stderr, "<%d>%s\n", syslog_prio[level], buf);
                else
                        fprintf(stderr, "weightd: %s\n", buf);
        }
        errno = saved;
        return e ? -e : -EIO;
}
