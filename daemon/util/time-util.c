/* Time: one clock for every thread, one way to print a duration. */
#include <stdio.h>
#include <time.h>

#include "util/time-util.h"

uint64_t now_usec(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000u + (uint64_t) ts.tv_nsec / 1000u;
}

uint64_t now_realtime_usec(void) {
        struct timespec ts;

        clock_gettime(CLOCK_REALTIME, &ts);
        return (uint64_t) ts.tv_sec * 1000000u + (uint64_t) ts.tv_nsec / 1000u;
}

char *format_timespan(char *buf, size_t size, uint64_t usec) {
        /* From 999.95 ms on, "1.00 s": never "1000.0 ms". */
        if (usec < 999950u)
                snprintf(buf, size, "%.1f ms", (double) usec / 1e3);
        else
                snprintf(buf, size, "%.2f s", (double) usec / 1e6);
        return buf;
}
