/* Parser tests: the malformed corpus with the error each file must produce,
 * every good file, the dtype table against the format's specification, and
 * truncations and byte flips of valid files. */
#include <dirent.h>
#include <jansson.h>

#include "format/safetensors.h"
#include "util/fs-util.h"
#include "test-util.h"

/* The format's dtypes and their bit widths, written out from the
 * specification (not from the parser's table). */
static const struct {
        const char *name;
        unsigned bits;
} spec_dtypes[] = {
        { "BOOL", 8 },         { "U8", 8 },   { "I8", 8 },   { "F8_E4M3", 8 }, { "F8_E5M2", 8 },
        { "F8_E8M0", 8 },      { "F8_E4M3FNUZ", 8 },         { "F8_E5M2FNUZ", 8 },
        { "I16", 16 },         { "U16", 16 }, { "F16", 16 }, { "BF16", 16 },   { "I32", 32 },
        { "U32", 32 },         { "F32", 32 }, { "I64", 64 }, { "U64", 64 },    { "F64", 64 },
        { "C64", 64 },         { "F4", 4 },   { "F6_E2M3", 6 },                { "F6_E3M2", 6 },
};

static void test_dtype_table(void **state) {
        assert_int_equal(ELEMENTSOF(spec_dtypes), _DTYPE_MAX);
        for (size_t i = 0; i < ELEMENTSOF(spec_dtypes); i++) {
                Dtype d = dtype_from_string(spec_dtypes[i].name);

                assert_int_not_equal(d, _DTYPE_INVALID);
                assert_string_equal(dtype_to_string(d), spec_dtypes[i].name);
                assert_int_equal(dtype_bits(d), spec_dtypes[i].bits);
        }
        assert_int_equal(dtype_from_string("bf16"), _DTYPE_INVALID);
        assert_int_equal(dtype_from_string("F128"), _DTYPE_INVALID);
        assert_int_equal(dtype_from_string(""), _DTYPE_INVALID);
        assert_null(dtype_to_string(_DTYPE_MAX));
}

static int parse_path(const char *path, StHeader **ret, WdError *err) {
        _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);

        assert_true(fd >= 0);
        return st_header_parse_fd(fd, path, ret, err);
}

static void check_corpus(bool from_buffer) {
        _cleanup_(json_decrefp) json_t *expected = NULL;
        const char *name;
        json_t *value;
        size_t n = 0;

        expected = json_load_file(testdata("bad/expected.json"), 0, NULL);
        assert_non_null(expected);
        json_object_foreach(expected, name, value) {
                _cleanup_free_ char *path = strdup(testdata("bad/"));
                _cleanup_(st_header_unrefp) StHeader *h = NULL;
                _cleanup_free_ char *full = NULL;
                WdError err = WD_ERROR_NULL;
                int r;

                assert_true(asprintf(&full, "%s%s", path, name) > 0);
                if (from_buffer) {
                        _cleanup_free_ uint8_t *buf = NULL;
                        size_t size = 0;

                        buf = read_file(full, &size);
                        assert_non_null(buf);
                        r = st_header_parse_buffer(buf, size, name, &h, &err);
                } else
                        r = parse_path(full, &h, &err);
                if (r != WD_E_FORMAT || !strstr(err.message, json_string_value(value)))
                        fail_msg("%s: expected FORMAT_ERROR containing \"%s\", got %d: %s", name,
                                 json_string_value(value), r, err.message);
                assert_null(h);
                /* The message names the file. */
                assert_non_null(strstr(err.message, name));
                n++;
        }
        assert_true(n >= 30);
}

static void test_corpus_fd(void **state) {
        check_corpus(false);
}

static void test_corpus_buffer(void **state) {
        check_corpus(true);
}

static void test_good_files(void **state) {
        static const struct {
                const char *file;
                size_t n_tensors;
        } cases[] = {
                { "all-dtypes.safetensors", 22 },
                { "empty.safetensors", 0 },
                { "many.safetensors", 1000 },
        };
        _cleanup_(st_header_unrefp) StHeader *h = NULL;
        WdError err = WD_ERROR_NULL;
        struct dirent *de;
        DIR *d;
        size_t n = 0;

        d = opendir(testdata("good"));
        assert_non_null(d);
        while ((de = readdir(d))) {
                _cleanup_(st_header_unrefp) StHeader *g = NULL;
                _cleanup_free_ char *path = NULL;

                if (!str_endswith(de->d_name, ".safetensors"))
                        continue;
                assert_true(asprintf(&path, "%s/%s", testdata("good"), de->d_name) > 0);
                if (parse_path(path, &g, &err) != 0)
                        fail_msg("%s: %s", de->d_name, err.message);
                n++;
        }
        closedir(d);
        assert_true(n >= 9);

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                _cleanup_free_ char *path = NULL;

                assert_true(asprintf(&path, "%s/%s", testdata("good"), cases[i].file) > 0);
                assert_int_equal(parse_path(path, &h, &err), 0);
                assert_int_equal(h->n_tensors, cases[i].n_tensors);
                h = st_header_unref(h);
        }

        /* One tensor of each dtype, all distinct. */
        assert_int_equal(parse_path(testdata("good/all-dtypes.safetensors"), &h, &err), 0);
        {
                bool seen[_DTYPE_MAX] = {};

                for (size_t i = 0; i < h->n_tensors; i++) {
                        assert_false(seen[h->tensors[i].dtype]);
                        seen[h->tensors[i].dtype] = true;
                }
        }
        assert_true(h->n_metadata >= 1);
        assert_string_equal(h->metadata[0].key, "format");
        assert_string_equal(h->metadata[0].value, "pt");
}

static void test_zero_size_and_scalars(void **state) {
        _cleanup_(st_header_unrefp) StHeader *h = NULL;
        WdError err = WD_ERROR_NULL;
        bool zero = false, scalar = false;

        assert_int_equal(parse_path(testdata("good/zero-size.safetensors"), &h, &err), 0);
        for (size_t i = 0; i < h->n_tensors; i++)
                if (h->tensors[i].n_elements == 0) {
                        assert_int_equal(h->tensors[i].begin, h->tensors[i].end);
                        zero = true;
                }
        assert_true(zero);
        h = st_header_unref(h);

        assert_int_equal(parse_path(testdata("good/scalars.safetensors"), &h, &err), 0);
        for (size_t i = 0; i < h->n_tensors; i++)
                if (h->tensors[i].ndim == 0) {
                        assert_int_equal(h->tensors[i].n_elements, 1);
                        assert_int_equal(h->tensors[i].end - h->tensors[i].begin,
                                         dtype_bits(h->tensors[i].dtype) / 8);
                        scalar = true;
                }
        assert_true(scalar);
}

/* Every strict prefix of a valid file with data is invalid, and parsing it
 * neither crashes nor leaks (under ASan). */
static void test_truncations(void **state) {
        _cleanup_free_ uint8_t *buf = NULL;
        size_t size = 0;

        buf = read_file(testdata("good/scalars.safetensors"), &size);
        assert_non_null(buf);
        for (size_t n = 0; n < size; n++) {
                StHeader *h = NULL;
                WdError err = WD_ERROR_NULL;

                assert_int_equal(st_header_parse_buffer(buf, n, "t", &h, &err), WD_E_FORMAT);
                assert_null(h);
        }
}

/* Flipping any single header byte gives a clean accept or reject. */
static void test_byte_flips(void **state) {
        _cleanup_free_ uint8_t *buf = NULL;
        size_t size = 0, rejected = 0;
        uint64_t hlen;

        buf = read_file(testdata("good/all-dtypes.safetensors"), &size);
        assert_non_null(buf);
        memcpy(&hlen, buf, sizeof(hlen));
        for (size_t i = 0; i < 8 + hlen; i++)
                for (unsigned bit = 0; bit < 8; bit += 3) {
                        StHeader *h = NULL;
                        WdError err = WD_ERROR_NULL;
                        int r;

                        buf[i] ^= (uint8_t) (1u << bit);
                        r = st_header_parse_buffer(buf, size, "t", &h, &err);
                        assert_true(r == 0 || r == WD_E_FORMAT);
                        if (r == 0)
                                st_header_unref(h);
                        else
                                rejected++;
                        buf[i] ^= (uint8_t) (1u << bit);
                }
        assert_true(rejected > 0);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_dtype_table),      cmocka_unit_test(test_corpus_fd),
                cmocka_unit_test(test_corpus_buffer),    cmocka_unit_test(test_good_files),
                cmocka_unit_test(test_zero_size_and_scalars), cmocka_unit_test(test_truncations),
                cmocka_unit_test(test_byte_flips),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
