/* Checked number parsing, and the enum names users type. */
#include "store/loader.h"
#include "test-util.h"
#include "util/parse-util.h"

static void test_parse_size(void **state) {
        uint64_t v;

        assert_int_equal(parse_size("0", &v), 0);
        assert_int_equal(v, 0);
        assert_int_equal(parse_size("4096", &v), 0);
        assert_int_equal(v, 4096);
        assert_int_equal(parse_size("16M", &v), 0);
        assert_int_equal(v, 16u << 20);
        assert_int_equal(parse_size("2k", &v), 0);
        assert_int_equal(v, 2048);
        assert_int_equal(parse_size("3G", &v), 0);
        assert_int_equal(v, 3ull << 30);
        assert_int_equal(parse_size("1T", &v), 0);
        assert_int_equal(v, 1ull << 40);
        assert_int_equal(parse_size("", &v), -EINVAL);
        assert_int_equal(parse_size("M", &v), -EINVAL);
        assert_int_equal(parse_size("-1", &v), -EINVAL);
        assert_int_equal(parse_size(" 1", &v), -EINVAL);
        assert_int_equal(parse_size("1 ", &v), -EINVAL);
        assert_int_equal(parse_size("1MB", &v), -EINVAL);
        assert_int_equal(parse_size("1X", &v), -EINVAL);
        assert_int_equal(parse_size("18446744073709551615", &v), 0);
        assert_int_equal(parse_size("18446744073709551616", &v), -ERANGE);
        assert_int_equal(parse_size("16777216T", &v), -ERANGE);
}

static void test_parse_u64(void **state) {
        uint64_t v;

        assert_int_equal(parse_u64("32", 1, 4096, &v), 0);
        assert_int_equal(v, 32);
        assert_int_equal(parse_u64("0", 1, 4096, &v), -ERANGE);
        assert_int_equal(parse_u64("4097", 1, 4096, &v), -ERANGE);
        assert_int_equal(parse_u64("0x10", 0, 100, &v), -EINVAL);
        assert_int_equal(parse_u64("+1", 0, 100, &v), -EINVAL);
}

static void test_parse_timespan(void **state) {
        uint64_t v;

        assert_int_equal(parse_timespan("10s", &v), 0);
        assert_int_equal(v, 10000000);
        assert_int_equal(parse_timespan("500ms", &v), 0);
        assert_int_equal(v, 500000);
        assert_int_equal(parse_timespan("2m", &v), 0);
        assert_int_equal(v, 120000000);
        assert_int_equal(parse_timespan("2min", &v), 0);
        assert_int_equal(v, 120000000);
        assert_int_equal(parse_timespan("1h", &v), 0);
        assert_int_equal(v, 3600000000ull);
        assert_int_equal(parse_timespan("7us", &v), 0);
        assert_int_equal(v, 7);
        assert_int_equal(parse_timespan("0s", &v), 0);
        assert_int_equal(v, 0);
        assert_int_equal(parse_timespan("10", &v), -EINVAL);
        assert_int_equal(parse_timespan("", &v), -EINVAL);
        assert_int_equal(parse_timespan("s", &v), -EINVAL);
        assert_int_equal(parse_timespan("10 s", &v), -EINVAL);
        assert_int_equal(parse_timespan("1.5s", &v), -EINVAL);
        assert_int_equal(parse_timespan("10S", &v), -EINVAL);
        assert_int_equal(parse_timespan("-1s", &v), -EINVAL);
        assert_int_equal(parse_timespan("1m30s", &v), -EINVAL);
        assert_int_equal(parse_timespan("18446744073709551615us", &v), 0);
        assert_int_equal(v, UINT64_MAX);
        assert_int_equal(parse_timespan("18446744073709551616us", &v), -ERANGE);
        assert_int_equal(parse_timespan("5124095577h", &v), -ERANGE);
}

static void test_enum_names(void **state) {
        assert_int_equal(direct_mode_from_string("auto"), DIRECT_AUTO);
        assert_int_equal(direct_mode_from_string("on"), DIRECT_ON);
        assert_int_equal(direct_mode_from_string("off"), DIRECT_OFF);
        assert_int_equal(direct_mode_from_string("yes"), -EINVAL);
        assert_int_equal(slab_pages_from_string("auto"), SLAB_PAGES_AUTO);
        assert_int_equal(slab_pages_from_string("hugetlb"), SLAB_PAGES_HUGETLB);
        assert_int_equal(slab_pages_from_string("small"), SLAB_PAGES_SMALL);
        assert_int_equal(slab_pages_from_string("Small"), -EINVAL);
        assert_null(direct_mode_to_string(_DIRECT_MODE_MAX));
        assert_null(slab_pages_to_string(_SLAB_PAGES_MAX));
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_parse_size),
                cmocka_unit_test(test_parse_u64),
                cmocka_unit_test(test_parse_timespan),
                cmocka_unit_test(test_enum_names),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
