/* Leveled logging: to the journal with structured fields when stderr is
 * the journal's stream (systemd sets $JOURNAL_STREAM to its device and
 * inode), else plain lines on stderr.  Library code logs at debug only; the
 * daemon's top layer logs once, with context.  Any thread may log. */
#pragma once

#include <stdint.h>
#include <sys/types.h>

#include "macro.h"

typedef enum LogLevel {
        LOG_LEVEL_ERROR,
        LOG_LEVEL_WARNING,
        LOG_LEVEL_INFO,
        LOG_LEVEL_DEBUG,
} LogLevel;

void log_set_max_level(LogLevel level);
LogLevel log_get_max_level(void);

/* What a line is about, for the journal's fields (MODEL=, COMPONENT=,
 * TIER=, CODE=, PEER_UID=, BYTES=, DURATION_USEC=).  NULL: not set.
 * On stderr only the message is written: it says the same in words. */
typedef struct LogFields {
        const char *model, *component;
        const char *tier; /* "host", "cuda:N" */
        const char *code; /* an error's name: wd_error_code_name() */
        const uid_t *peer_uid;
        const uint64_t *bytes;
        const uint64_t *duration_usec;
} LogFields;

/* Logs and returns -abs(error) (or -EIO for 0), so callers can
 * "return log_error_errno(r, ...)".  %m in fmt prints strerror(error).
 * fields may be NULL. */
int log_internal(LogLevel level, int error, const char *fmt, ...) _printf_(3, 4);
int log_fields_internal(LogLevel level, int error, const LogFields *fields, const char *fmt, ...) _printf_(4, 5);

#define log_error(...) log_internal(LOG_LEVEL_ERROR, 0, __VA_ARGS__)
#define log_warning(...) log_internal(LOG_LEVEL_WARNING, 0, __VA_ARGS__)
#define log_info(...) log_internal(LOG_LEVEL_INFO, 0, __VA_ARGS__)
#define log_debug(...) log_internal(LOG_LEVEL_DEBUG, 0, __VA_ARGS__)
#define log_error_errno(e, ...) log_internal(LOG_LEVEL_ERROR, (e), __VA_ARGS__)
#define log_warning_errno(e, ...) log_internal(LOG_LEVEL_WARNING, (e), __VA_ARGS__)
#define log_debug_errno(e, ...) log_internal(LOG_LEVEL_DEBUG, (e), __VA_ARGS__)

/* The same with fields first: log_info_fields(&(LogFields){ .model = m }, fmt, ...)
 * (one variadic list, so that the compound literal's commas pass). */
#define log_warning_fields(...) log_fields_internal(LOG_LEVEL_WARNING, 0, __VA_ARGS__)
#define log_info_fields(...) log_fields_internal(LOG_LEVEL_INFO, 0, __VA_ARGS__)
#define log_debug_fields(...) log_fields_internal(LOG_LEVEL_DEBUG, 0, __VA_ARGS__)

/* Send one entry to the journal in its native protocol: sd_journal_sendv()
 * where the daemon is built with libsystemd (log-journal.c), else
 * -EOPNOTSUPP (log-journal-fallback.c).  Returns 0 or -errno. */
struct iovec;
int log_journal_sendv(const struct iovec *iov, int n);
