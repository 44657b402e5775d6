/* The monotonic clock and durations written for people. */
#include "test-util.h"
#include "util/time-util.h"

static void test_format_timespan(void **state) {
        char buf[FORMAT_TIMESPAN_MAX];

        assert_string_equal(format_timespan(buf, sizeof(buf), 0), "0.0 ms");
        assert_string_equal(format_timespan(buf, sizeof(buf), 49), "0.0 ms");
        assert_string_equal(format_timespan(buf, sizeof(buf), 3100), "3.1 ms");
        assert_string_equal(format_timespan(buf, sizeof(buf), 41240), "41.2 ms");
        assert_string_equal(format_timespan(buf, sizeof(buf), 999949), "999.9 ms");
        assert_string_equal(format_timespan(buf, sizeof(buf), 999950), "1.00 s");
        assert_string_equal(format_timespan(buf, sizeof(buf), 1000000), "1.00 s");
        assert_string_equal(format_timespan(buf, sizeof(buf), 1210000), "1.21 s");
        assert_string_equal(format_timespan(buf, sizeof(buf), 3725500000), "3725.50 s");
        /* Cut to the buffer, and always terminated. */
        assert_string_equal(format_timespan(buf, 4, 41240), "41.");
}

static void test_now_usec(void **state) {
        uint64_t a = now_usec(), b = now_usec();

        assert_true(a > 0);
        assert_true(a <= b);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_format_timespan),
                cmocka_unit_test(test_now_usec),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
