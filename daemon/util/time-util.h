/* The monotonic clock, and durations written for people. */
#pragma once

#include <stddef.h>
#include <stdint.h>

/* Room for any format_timespan() result, with its NUL. */
#define FORMAT_TIMESPAN_MAX 32u

/* CLOCK_MONOTONIC in µs: the same clock in every thread. */
uint64_t now_usec(void);
/* CLOCK_REALTIME in µs since the Unix epoch (for timestamps others read). */
uint64_t now_realtime_usec(void);

/* usec as "41.2 ms" below one second and as "1.21 s" from there on, in buf.
 * Returns buf. */
char *format_timespan(char *buf, size_t size, uint64_t usec);
