/* Error reporting: an int code plus, for outcomes a user must act on, a
 * message that names the file, the item and the rule that failed.
 *
 * Functions return 0 on success, -errno for system failures, and the
 * positive WD_E_* codes below for documented outcomes.  When a function takes
 * a WdError *err (which may be NULL), it fills it on failure only. */
#pragma once

#include <stdarg.h>
#include <stddef.h>

#include "macro.h"

enum {
        WD_E_FORMAT = 1,   /* a safetensors file or index breaks a rule */
        WD_E_NOT_FOUND,    /* no such model, component, file or tensor */
        WD_E_UNSUPPORTED,  /* e.g. a component with pickle checkpoints only */
        WD_E_BUDGET,       /* the byte budget cannot hold the request */
        WD_E_CHANGED,      /* a file changed while or after it was read */
        WD_E_BUSY,         /* the entry has leases or pins */
        WD_E_PERMISSION,   /* a path escapes the model root */
        WD_E_INVALID,      /* the request itself is wrong */
        _WD_E_MAX,
};

#define WD_ERROR_MESSAGE_MAX 1024

typedef struct WdError {
        int code;
        char message[WD_ERROR_MESSAGE_MAX];
} WdError;

#define WD_ERROR_NULL ((WdError){ .code = 0, .message = "" })

/* Fill err (if not NULL) with code and a formatted message; returns code. */
int wd_error_set(WdError *err, int code, const char *fmt, ...) _printf_(3, 4);
int wd_error_setv(WdError *err, int code, const char *fmt, va_list ap) _printf_(3, 0);

/* Prefix an already set message with "prefix: ". */
void wd_error_prefix(WdError *err, const char *fmt, ...) _printf_(2, 3);

/* A short name for a code: "FORMAT_ERROR", "ENOENT" style for -errno. */
const char *wd_error_code_name(int code);

/* Append a user-controlled string to a message safely: at most max_bytes
 * bytes, control characters, quotes and backslashes escaped. */
void wd_escape(char *dst, size_t dst_size, const char *src, size_t max_bytes);
