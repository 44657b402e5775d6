/* The client library's error codes and messages: wd_code_name(), the
 * wd_error filler every other file of the library uses, and the escaping
 * of the daemon's strings for messages.  It is the bottom of the library:
 * client.c, manifest.c and cuda.c call it, and it calls none of them. */

#include <stdio.h>

#include "client-internal.h"

int error_set(wd_error *err, int code, const char *fmt, ...) {
        va_list ap;

        err->code = code;
        va_start(ap, fmt);
        vsnprintf(err->message, sizeof(err->message), fmt, ap);
        va_end(ap);
        return code;
}

void escape_string(char *dst, size_t dst_size, const char *src, size_t max_bytes) {
        size_t o = 0;

        if (dst_size == 0)
                return;
        for (size_t i = 0; src[i] != '\0' && o + 5 < dst_size; i++) {
                unsigned char ch = (unsigned char) src[i];

                if (i >= max_bytes && (ch & 0xc0) != 0x80) { /* cut between characters */
                        snprintf(dst + o, dst_size - o, "...");
                        o += 3;
                        break;
                }
                if (ch < 0x20 || ch == 0x7f) {
                        snprintf(dst + o, dst_size - o, "\\x%02x", ch);
                        o += 4;
                } else {
                        if (ch == '"' || ch == '\\')
                                dst[o++] = '\\';
                        dst[o++] = (char) ch;
                }
        }
        dst[o < dst_size ? o : dst_size - 1] = '\0';
}

_public_ const char *wd_code_name(int code) {
        static const char *const names[] = {
                [WD_OK] = "OK",
                [WD_INVALID_ARGUMENT] = "INVALID_ARGUMENT",
                [WD_NOT_FOUND] = "NOT_FOUND",
                [WD_PERMISSION_DENIED] = "PERMISSION_DENIED",
                [WD_FORMAT_ERROR] = "FORMAT_ERROR",
                [WD_IO_ERROR] = "IO_ERROR",
                [WD_RESOURCE_EXHAUSTED] = "RESOURCE_EXHAUSTED",
                [WD_UNAVAILABLE] = "UNAVAILABLE",
                [WD_CANCELLED] = "CANCELLED",
                [WD_INTERNAL] = "INTERNAL",
                [WD_UNSUPPORTED] = "UNSUPPORTED",
                [WD_BUSY] = "BUSY",
                [WD_PROTOCOL_ERROR] = "PROTOCOL_ERROR",
        };

        if (code < 0 || (size_t) code >= ELEMENTSOF(names))
                return "UNKNOWN";
        return names[code];
}
