/* Checked number parsing. */
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

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_parse_size),
                cmocka_unit_test(test_parse_u64),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
