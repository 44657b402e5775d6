/* Leveled logging (see log.h).
 *
 * Under systemd stderr is a stream to journald, and $JOURNAL_STREAM names
 * its device and inode.  When stderr is still that stream (not redirected
 * by whoever started us), each line goes to the journal natively instead,
 * with PRIORITY=, SYSLOG_IDENTIFIER=, ERRNO= and the line's LogFields, so
 * that `journalctl MODEL=...` finds it; a line the journal refuses goes to
 * the stream with its "<N>" priority prefix.  Otherwise (no systemd, or
 * stderr redirected) lines go to stderr as "weightd: message". */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "util/log.h"

static atomic_int max_level = LOG_LEVEL_INFO;

void log_set_max_level(LogLevel level) {
        atomic_store_explicit(&max_level, (int) level, memory_order_relaxed);
}

LogLevel log_get_max_level(void) {
        return (LogLevel) atomic_load_explicit(&max_level, memory_order_relaxed);
}

static pthread_once_t stream_once = PTHREAD_ONCE_INIT;
static bool journal_stream; /* stderr is $JOURNAL_STREAM: "<N>" prefixes */
static bool to_journal;     /* and the journal's socket is there: native entries */

/* A decimal number up to end (or the NUL), all of it, without overflow.
 * (Here rather than parse_u64(): log.c stands alone in some tests.) */
static bool parse_decimal(const char *s, const char *end, uint64_t *ret) {
        uint64_t v = 0;

        if (s == end || !*s)
                return false;
        for (; s != end && *s; s++) {
                if (*s < '0' || *s > '9' || v > (UINT64_MAX - (uint64_t) (*s - '0')) / 10)
                        return false;
                v = v * 10 + (uint64_t) (*s - '0');
        }
        *ret = v;
        return true;
}

/* "DEVICE:INODE", both decimal, the whole string. */
static bool parse_dev_ino(const char *s, uint64_t *ret_dev, uint64_t *ret_ino) {
        const char *colon = strchr(s, ':');

        return colon && parse_decimal(s, colon, ret_dev) && parse_decimal(colon + 1, NULL, ret_ino);
}

static void stream_init(void) {
        const char *e = getenv("JOURNAL_STREAM");
        uint64_t dev, ino;
        struct stat st;

        journal_stream = e && parse_dev_ino(e, &dev, &ino) && fstat(STDERR_FILENO, &st) == 0 &&
                         (uint64_t) st.st_dev == dev && (uint64_t) st.st_ino == ino;
        /* sd_journal_sendv() drops entries silently (returns 0) when this
         * socket, libsystemd's built-in path, is missing. */
        to_journal = journal_stream && stat("/run/systemd/journal/socket", &st) == 0 && S_ISSOCK(st.st_mode);
}

#define FIELD_MAX 12

/* One journal entry: MESSAGE= and the fields.  Returns 0 or -errno. */
static int journal_send(int prio, int error, const LogFields *f, const char *msg) {
        char message[2048 + 16], priority[16], errno_f[32], uid[32], bytes[40], dur[48];
        const char *strings[][2] = {
                { "MODEL=", f ? f->model : NULL },
                { "COMPONENT=", f ? f->component : NULL },
                { "TIER=", f ? f->tier : NULL },
                { "CODE=", f ? f->code : NULL },
        };
        char strbuf[ELEMENTSOF(strings)][1100];
        struct iovec iov[FIELD_MAX];
        int n = 0;

        snprintf(message, sizeof(message), "MESSAGE=%s", msg);
        iov[n++] = (struct iovec){ message, strlen(message) };
        snprintf(priority, sizeof(priority), "PRIORITY=%d", prio);
        iov[n++] = (struct iovec){ priority, strlen(priority) };
        iov[n++] = (struct iovec){ (char *) "SYSLOG_IDENTIFIER=weightd", strlen("SYSLOG_IDENTIFIER=weightd") };
        if (error != 0) {
                snprintf(errno_f, sizeof(errno_f), "ERRNO=%d", error);
                iov[n++] = (struct iovec){ errno_f, strlen(errno_f) };
        }
        for (size_t i = 0; i < ELEMENTSOF(strings); i++)
                if (strings[i][1]) {
                        /* A newline would end the field early: the native
                         * protocol's text form is one field a line. */
                        int k = snprintf(strbuf[i], sizeof(strbuf[i]), "%s%s", strings[i][0], strings[i][1]);

                        for (char *p = strbuf[i]; *p; p++)
                                if (*p == '\n')
                                        *p = ' ';
                        iov[n++] = (struct iovec){ strbuf[i], (size_t) MIN(k, (int) sizeof(strbuf[i]) - 1) };
                }
        if (f && f->peer_uid) {
                snprintf(uid, sizeof(uid), "PEER_UID=%u", (unsigned) *f->peer_uid);
                iov[n++] = (struct iovec){ uid, strlen(uid) };
        }
        if (f && f->bytes) {
                snprintf(bytes, sizeof(bytes), "BYTES=%" PRIu64, *f->bytes);
                iov[n++] = (struct iovec){ bytes, strlen(bytes) };
        }
        if (f && f->duration_usec) {
                snprintf(dur, sizeof(dur), "DURATION_USEC=%" PRIu64, *f->duration_usec);
                iov[n++] = (struct iovec){ dur, strlen(dur) };
        }
        return log_journal_sendv(iov, n);
}

static int log_v(LogLevel level, int error, const LogFields *fields, const char *fmt, va_list ap) {
        static const int syslog_prio[] = { 3, 4, 6, 7 };
        int saved = errno, e = error < 0 ? -error : error;
        char buf[2048];

        if ((int) level <= atomic_load_explicit(&max_level, memory_order_relaxed)) {
                /* glibc's %m reads errno: point it at the error we were given. */
                errno = e;
                vsnprintf(buf, sizeof(buf), fmt, ap);
                pthread_once(&stream_once, stream_init);
                if (!to_journal || journal_send(syslog_prio[level], e, fields, buf) < 0) {
                        if (journal_stream)
                                fprintf(stderr, "<%d>%s\n", syslog_prio[level], buf);
                        else
                                fprintf(stderr, "weightd: %s\n", buf);
                }
        }
        errno = saved;
        return e ? -e : -EIO;
}

int log_internal(LogLevel level, int error, const char *fmt, ...) {
        va_list ap;
        int r;

        va_start(ap, fmt);
        r = log_v(level, error, NULL, fmt, ap);
        va_end(ap);
        return r;
}

int log_fields_internal(LogLevel level, int error, const LogFields *fields, const char *fmt, ...) {
        va_list ap;
        int r;

        va_start(ap, fmt);
        r = log_v(level, error, fields, fmt, ap);
        va_end(ap);
        return r;
}
