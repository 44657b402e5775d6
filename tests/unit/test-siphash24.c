/* SipHash-2-4 against the reference implementation's published vectors
 * (key 00 01 .. 0f, message 00 01 .. n-1, for n = 0 .. 17: every length of
 * a partial last word, with and without whole words before it), whole and
 * fed in every split into two and into single bytes. */
#include "test-util.h"
#include "util/siphash24.h"

static const uint64_t vectors[] = {
        0x726fdb47dd0e0e31ULL, 0x74f839c593dc67fdULL, 0x0d6c8009d9a94f5aULL, 0x85676696d7fb7e2dULL,
        0xcf2794e0277187b7ULL, 0x18765564cd99a68dULL, 0xcbc9466e58fee3ceULL, 0xab0200f58b01d137ULL,
        0x93f5f5799a932462ULL, 0x9e0082df0ba9e4b0ULL, 0x7a5dbbc594ddb9f3ULL, 0xf4b32f46226bada7ULL,
        0x751e8fbc860ee5fbULL, 0x14ea5627c0843d90ULL, 0xf723ca908e7af2eeULL, 0xa129ca6149be45e5ULL,
        0x3f2acc7f57c29bdbULL, 0x699ae9f52cbe4794ULL,
};

static uint8_t key[SIPHASH_KEY_SIZE], msg[ELEMENTSOF(vectors)];

static void setup_data(void) {
        for (size_t i = 0; i < sizeof(key); i++)
                key[i] = (uint8_t) i;
        for (size_t i = 0; i < sizeof(msg); i++)
                msg[i] = (uint8_t) i;
}

static void test_vectors(void **state) {
        setup_data();
        for (size_t n = 0; n < ELEMENTSOF(vectors); n++)
                assert_int_equal(siphash24(msg, n, key), vectors[n]);
}

static void test_pieces(void **state) {
        setup_data();
        for (size_t n = 0; n < ELEMENTSOF(vectors); n++) {
                SipHash s;

                for (size_t cut = 0; cut <= n; cut++) {
                        siphash24_init(&s, key);
                        siphash24_compress(&s, msg, cut);
                        siphash24_compress(&s, msg + cut, 0);
                        siphash24_compress(&s, msg + cut, n - cut);
                        assert_int_equal(siphash24_finalize(&s), vectors[n]);
                }
                siphash24_init(&s, key);
                for (size_t i = 0; i < n; i++)
                        siphash24_compress(&s, msg + i, 1);
                assert_int_equal(siphash24_finalize(&s), vectors[n]);
        }
}

static void test_key_matters(void **state) {
        uint8_t other[SIPHASH_KEY_SIZE];

        setup_data();
        memcpy(other, key, sizeof(other));
        other[15] ^= 1;
        assert_int_not_equal(siphash24(msg, 8, other), vectors[8]);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_vectors),
                cmocka_unit_test(test_pieces),
                cmocka_unit_test(test_key_matters),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
