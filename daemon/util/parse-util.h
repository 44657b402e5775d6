/* Checked parsers for numbers that come from users: the whole string must be
 * consumed and the value must be in range. */
#pragma once

#include <stdint.h>

/* Unsigned decimal in [min, max].  Returns 0, -EINVAL or -ERANGE. */
int parse_u64(const char *s, uint64_t min, uint64_t max, uint64_t *ret);

/* A byte count: decimal digits with an optional K, M, G or T suffix (powers
 * of 1024, case-insensitive).  Returns 0, -EINVAL or -ERANGE. */
int parse_size(const char *s, uint64_t *ret);

/* A duration: decimal digits and one unit, "us", "ms", "s", "m" (or "min")
 * or "h", without blanks ("10s", "500ms", "2m").  A bare number is refused
 * rather than guessed at.  Returns 0 with *ret_usec in microseconds, -EINVAL
 * or -ERANGE (overflow). */
int parse_timespan(const char *s, uint64_t *ret_usec);
