/* Error messages for users: formatting, prefixing and escaping of names that
 * come from untrusted files. */
#include <stdio.h>
#include <string.h>

#include "util/error.h"

int wd_error_setv(WdError *err, int code, const char *fmt, va_list ap) {
        if (err) {
                err->code = code;
                vsnprintf(err->message, sizeof(err->message), fmt, ap);
        }
        return code;
}

int wd_error_set(WdError *err, int code, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        wd_error_setv(err, code, fmt, ap);
        va_end(ap);
        return code;
}

void wd_error_prefix(WdError *err, const char *fmt, ...) {
        char prefix[WD_ERROR_MESSAGE_MAX], old[WD_ERROR_MESSAGE_MAX];
        va_list ap;

        if (!err)
                return;
        va_start(ap, fmt);
        vsnprintf(prefix, sizeof(prefix), fmt, ap);
        va_end(ap);
        memcpy(old, err->message, sizeof(old));
        if (snprintf(err->message, sizeof(err->message), "%s: %s", prefix, old) >= (int) sizeof(err->message))
                err->message[sizeof(err->message) - 1] = '\0'; /* truncated, still terminated */
}

const char *wd_error_code_name(int code) {
        static const char *const names[_WD_E_MAX] = {
                [0] = "OK",
                [WD_E_FORMAT] = "FORMAT_ERROR",
                [WD_E_NOT_FOUND] = "NOT_FOUND",
                [WD_E_UNSUPPORTED] = "UNSUPPORTED",
                [WD_E_BUDGET] = "RESOURCE_EXHAUSTED",
                [WD_E_CHANGED] = "CHANGED",
                [WD_E_BUSY] = "BUSY",
                [WD_E_PERMISSION] = "PERMISSION_DENIED",
                [WD_E_INVALID] = "INVALID_ARGUMENT",
        };

        if (code >= 0 && code < _WD_E_MAX)
                return names[code];
        return "SYSTEM_ERROR";
}

void wd_escape(char *dst, size_t dst_size, const char *src, size_t max_bytes) {
        size_t o = 0;

        if (dst_size == 0)
                return;
        for (size_t i = 0; src[i] && o + 5 < dst_size; i++) {
                unsigned char c = (unsigned char) src[i];

                if (i >= max_bytes && (c & 0xc0) != 0x80) { /* cut on a character boundary */
                        o += (size_t) snprintf(dst + o, dst_size - o, "...");
                        break;
                }
                if (c < 0x20 || c == 0x7f)
                        o += (size_t) snprintf(dst + o, dst_size - o, "\\x%02x", c);
                else if (c == '"' || c == '\\') {
                        dst[o++] = '\\';
                        dst[o++] = (char) c;
                } else
                        dst[o++] = (char) c;
        }
        dst[MIN(o, dst_size - 1)] = '\0';
}
