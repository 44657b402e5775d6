/* Checked number parsing; never bare strtol(). */
#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "macro.h"
#include "util/parse-util.h"

static int parse_digits(const char *s, const char **ret_end, uint64_t *ret) {
        uint64_t v = 0;
        const char *p = s;

        if (!isdigit((unsigned char) *p))
                return -EINVAL;
        for (; isdigit((unsigned char) *p); p++)
                if (mul_overflow_u64(v, 10, &v) || add_overflow_u64(v, (uint64_t) (*p - '0'), &v))
                        return -ERANGE;
        *ret_end = p;
        *ret = v;
        return 0;
}

int parse_u64(const char *s, uint64_t min, uint64_t max, uint64_t *ret) {
        const char *end;
        uint64_t v;
        int r;

        r = parse_digits(s, &end, &v);
        if (r < 0)
                return r;
        if (*end)
                return -EINVAL;
        if (v < min || v > max)
                return -ERANGE;
        *ret = v;
        return 0;
}

int parse_size(const char *s, uint64_t *ret) {
        static const char suffixes[] = "KMGT";
        const char *end, *sfx;
        uint64_t v, mult = 1;
        int r;

        r = parse_digits(s, &end, &v);
        if (r < 0)
                return r;
        if (*end) {
                if (end[1] != '\0' || !(sfx = strchr(suffixes, toupper((unsigned char) *end))))
                        return -EINVAL;
                for (const char *q = suffixes; q <= sfx; q++)
                        mult *= 1024;
        }
        if (mul_overflow_u64(v, mult, &v))
                return -ERANGE;
        *ret = v;
        return 0;
}

int parse_timespan(const char *s, uint64_t *ret_usec) {
        static const struct {
                const char *unit;
                uint64_t usec;
        } units[] = {
                { "us", 1 },          { "ms", 1000 },           { "s", 1000000 },
                { "m", 60000000 },    { "min", 60000000 },      { "h", 3600000000ull },
        };
        const char *end;
        uint64_t v;
        int r;

        r = parse_digits(s, &end, &v);
        if (r < 0)
                return r;
        for (size_t i = 0; i < ELEMENTSOF(units); i++)
                if (strcmp(end, units[i].unit) == 0) {
                        if (mul_overflow_u64(v, units[i].usec, &v))
                                return -ERANGE;
                        *ret_usec = v;
                        return 0;
                }
        return -EINVAL;
}
