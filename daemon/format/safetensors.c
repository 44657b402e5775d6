/* safetensors header parser and validator.
 *
 * The 8-byte length prefix is checked before anything is allocated; the JSON
 * goes through jansson with duplicate keys rejected; then every entry is
 * checked against the format's rules with overflow-checked arithmetic, and
 * the tensors, sorted by offset, must tile the data section exactly.  Every
 * error names the file, the tensor where there is one, and the rule. */
#include <jansson.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "format/safetensors.h"

static const struct {
        const char *name;
        unsigned bits;
} dtype_table[_DTYPE_MAX] = {
        [DTYPE_BOOL] = { "BOOL", 8 },
        [DTYPE_U8] = { "U8", 8 },
        [DTYPE_I8] = { "I8", 8 },
        [DTYPE_F8_E4M3] = { "F8_E4M3", 8 },
        [DTYPE_F8_E5M2] = { "F8_E5M2", 8 },
        [DTYPE_F8_E8M0] = { "F8_E8M0", 8 },
        [DTYPE_F8_E4M3FNUZ] = { "F8_E4M3FNUZ", 8 },
        [DTYPE_F8_E5M2FNUZ] = { "F8_E5M2FNUZ", 8 },
        [DTYPE_I16] = { "I16", 16 },
        [DTYPE_U16] = { "U16", 16 },
        [DTYPE_F16] = { "F16", 16 },
        [DTYPE_BF16] = { "BF16", 16 },
        [DTYPE_I32] = { "I32", 32 },
        [DTYPE_U32] = { "U32", 32 },
        [DTYPE_F32] = { "F32", 32 },
        [DTYPE_I64] = { "I64", 64 },
        [DTYPE_U64] = { "U64", 64 },
        [DTYPE_F64] = { "F64", 64 },
        [DTYPE_C64] = { "C64", 64 },
        [DTYPE_F4] = { "F4", 4 },
        [DTYPE_F6_E2M3] = { "F6_E2M3", 6 },
        [DTYPE_F6_E3M2] = { "F6_E3M2", 6 },
};

const char *dtype_to_string(Dtype d) {
        if (d < 0 || d >= _DTYPE_MAX)
                return NULL;
        return dtype_table[d].name;
}

Dtype dtype_from_string(const char *s) {
        for (Dtype d = 0; d < _DTYPE_MAX; d++)
                if (strcmp(dtype_table[d].name, s) == 0)
                        return d;
        return _DTYPE_INVALID;
}

unsigned dtype_bits(Dtype d) {
        if (d < 0 || d >= _DTYPE_MAX)
                return 0;
        return dtype_table[d].bits;
}

void st_shape_format(char *buf, size_t size, const uint64_t *shape, unsigned ndim) {
        size_t o = 0;

        if (size == 0)
                return;
        o += (size_t) snprintf(buf, size, "[");
        for (unsigned i = 0; i < ndim && o < size; i++)
                o += (size_t) snprintf(buf + o, size - o, "%s%llu", i ? ", " : "",
                                       (unsigned long long) shape[i]);
        if (o < size)
                snprintf(buf + o, size - o, "]");
}

/* Atomic: the daemon resolves components on worker threads and frees them
 * on its loop, while the catalog's cache keeps its own references. */
StHeader *st_header_ref(StHeader *h) {
        if (h)
                __atomic_add_fetch(&h->n_ref, 1, __ATOMIC_RELAXED);
        return h;
}

StHeader *st_header_unref(StHeader *h) {
        if (!h || __atomic_sub_fetch(&h->n_ref, 1, __ATOMIC_ACQ_REL) > 0)
                return NULL;
        for (size_t i = 0; i < h->n_tensors; i++) {
                free(h->tensors[i].name);
                free(h->tensors[i].shape);
        }
        free(h->tensors);
        for (size_t i = 0; i < h->n_metadata; i++) {
                free(h->metadata[i].key);
                free(h->metadata[i].value);
        }
        free(h->metadata);
        free(h->raw);
        free(h);
        return NULL;
}

const StTensor *st_header_find(const StHeader *h, const char *name) {
        for (size_t i = 0; i < h->n_tensors; i++)
                if (strcmp(h->tensors[i].name, name) == 0)
                        return &h->tensors[i];
        return NULL;
}

/* Error context: the file's display name, for every message. */
typedef struct Parse {
        const char *display;
        WdError *err;
} Parse;

_printf_(2, 3) static int parse_fail(Parse *p, const char *fmt, ...) {
        char msg[WD_ERROR_MESSAGE_MAX];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        return wd_error_set(p->err, WD_E_FORMAT, "%s: %s", p->display, msg);
}

_printf_(3, 4) static int tensor_fail(Parse *p, const char *tensor, const char *fmt, ...) {
        char msg[WD_ERROR_MESSAGE_MAX], name[256];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        wd_escape(name, sizeof(name), tensor, 200);
        return wd_error_set(p->err, WD_E_FORMAT, "%s: tensor \"%s\": %s", p->display, name, msg);
}

/* A JSON integer that is >= 0; jansson has already refused anything beyond
 * int64. */
static bool json_get_u64(json_t *v, uint64_t *ret) {
        json_int_t i;

        if (!json_is_integer(v))
                return false;
        i = json_integer_value(v);
        if (i < 0)
                return false;
        *ret = (uint64_t) i;
        return true;
}

static int parse_metadata(Parse *p, json_t *obj, StHeader *h) {
        const char *key;
        json_t *value;
        size_t n;

        if (!json_is_object(obj))
                return parse_fail(p, "__metadata__ is not an object of strings");

        n = json_object_size(obj);
        h->metadata = calloc(n ? n : 1, sizeof(StMetadata));
        if (!h->metadata)
                return -ENOMEM;
        json_object_foreach(obj, key, value) {
                StMetadata *m = &h->metadata[h->n_metadata];
                char k[256];

                if (!json_is_string(value)) {
                        wd_escape(k, sizeof(k), key, 200);
                        return parse_fail(p, "__metadata__ \"%s\": value is not a string", k);
                }
                m->key = strdup(key);
                m->value = strndup(json_string_value(value), json_string_length(value));
                if (!m->key || !m->value) {
                        free(m->key);
                        free(m->value);
                        return -ENOMEM;
                }
                h->n_metadata++;
        }
        return 0;
}

static int parse_shape(Parse *p, const char *name, json_t *shape, StTensor *t) {
        size_t n;

        if (!json_is_array(shape))
                return tensor_fail(p, name, "shape is not an array");
        n = json_array_size(shape);
        if (n > 0) {
                t->shape = calloc(n, sizeof(uint64_t));
                if (!t->shape)
                        return -ENOMEM;
        }
        t->ndim = (unsigned) n;
        t->n_elements = 1;
        for (size_t i = 0; i < n; i++) {
                if (!json_get_u64(json_array_get(shape, i), &t->shape[i]))
                        return tensor_fail(p, name, "shape[%zu] is not a non-negative integer", i);
        }
        for (size_t i = 0; i < n; i++)
                if (mul_overflow_u64(t->n_elements, t->shape[i], &t->n_elements)) {
                        char s[256];

                        st_shape_format(s, sizeof(s), t->shape, t->ndim);
                        return tensor_fail(p, name, "shape %s overflows 64 bits", s);
                }
        return 0;
}

static int parse_tensor(Parse *p, const char *name, json_t *entry, StTensor *t) {
        json_t *dtype = NULL, *shape = NULL, *offsets = NULL, *value;
        unsigned __int128 bits, bytes;
        uint64_t begin, end;
        const char *field;
        char s[256];
        int r;

        if (!json_is_object(entry))
                return tensor_fail(p, name, "entry is not an object");

        json_object_foreach(entry, field, value) {
                if (strcmp(field, "dtype") == 0)
                        dtype = value;
                else if (strcmp(field, "shape") == 0)
                        shape = value;
                else if (strcmp(field, "data_offsets") == 0)
                        offsets = value;
                else {
                        char f[256];

                        wd_escape(f, sizeof(f), field, 200);
                        return tensor_fail(p, name, "unexpected field \"%s\"", f);
                }
        }
        if (!dtype)
                return tensor_fail(p, name, "missing field \"dtype\"");
        if (!shape)
                return tensor_fail(p, name, "missing field \"shape\"");
        if (!offsets)
                return tensor_fail(p, name, "missing field \"data_offsets\"");

        if (!json_is_string(dtype))
                return tensor_fail(p, name, "dtype is not a string");
        t->dtype = dtype_from_string(json_string_value(dtype));
        if (t->dtype == _DTYPE_INVALID) {
                char d[64];

                wd_escape(d, sizeof(d), json_string_value(dtype), 32);
                return tensor_fail(p, name, "unknown dtype \"%s\"", d);
        }

        r = parse_shape(p, name, shape, t);
        if (r != 0)
                return r;

        st_shape_format(s, sizeof(s), t->shape, t->ndim);
        bits = (unsigned __int128) t->n_elements * dtype_bits(t->dtype);
        if (bits % 8 != 0)
                return tensor_fail(p, name, "shape %s of %s is %llu bits, not a whole number of bytes", s,
                                   dtype_to_string(t->dtype), (unsigned long long) bits);
        bytes = bits / 8;
        if (bytes > UINT64_MAX)
                return tensor_fail(p, name, "shape %s of %s overflows 64 bits in bytes", s,
                                   dtype_to_string(t->dtype));

        if (!json_is_array(offsets) || json_array_size(offsets) != 2 ||
            !json_get_u64(json_array_get(offsets, 0), &begin) ||
            !json_get_u64(json_array_get(offsets, 1), &end))
                return tensor_fail(p, name, "data_offsets is not an array of two non-negative integers");
        if (begin > end)
                return tensor_fail(p, name, "data_offsets [%llu, %llu): begin after end",
                                   (unsigned long long) begin, (unsigned long long) end);
        if (end - begin != (uint64_t) bytes)
                return tensor_fail(p, name, "data_offsets [%llu, %llu) do not match shape %s of %s (%llu bytes)",
                                   (unsigned long long) begin, (unsigned long long) end, s,
                                   dtype_to_string(t->dtype), (unsigned long long) bytes);
        t->begin = begin;
        t->end = end;

        t->name = strdup(name);
        if (!t->name)
                return -ENOMEM;
        return 0;
}

static int tensor_compare(const void *a, const void *b) {
        const StTensor *x = a, *y = b;

        if (x->begin != y->begin)
                return x->begin < y->begin ? -1 : 1;
        if (x->end != y->end)
                return x->end < y->end ? -1 : 1;
        return strcmp(x->name, y->name);
}

/* Sorted by offset, the tensors must cover [0, data size) exactly. */
static int check_layout(Parse *p, StHeader *h) {
        uint64_t expected = 0, data_size = st_header_data_size(h);

        qsort(h->tensors, h->n_tensors, sizeof(StTensor), tensor_compare);
        for (size_t i = 0; i < h->n_tensors; i++) {
                const StTensor *t = &h->tensors[i];
                char prev[256];

                if (t->begin == expected) {
                        expected = t->end;
                        continue;
                }
                if (i == 0)
                        return tensor_fail(p, t->name,
                                           "data_offsets [%llu, %llu) leave a gap at the start of the data",
                                           (unsigned long long) t->begin, (unsigned long long) t->end);
                wd_escape(prev, sizeof(prev), h->tensors[i - 1].name, 200);
                return tensor_fail(p, t->name, "data_offsets [%llu, %llu) %s tensor \"%s\", which ends at %llu",
                                   (unsigned long long) t->begin, (unsigned long long) t->end,
                                   t->begin > expected ? "leave a gap after" : "overlap", prev,
                                   (unsigned long long) expected);
        }
        if (expected != data_size)
                return parse_fail(p, "tensors end at byte %llu of the data, but the data section is %llu bytes",
                                  (unsigned long long) expected, (unsigned long long) data_size);
        return 0;
}

static int parse_json_error(Parse *p, const json_error_t *je) {
        switch (json_error_code(je)) {
        case json_error_out_of_memory:
                return -ENOMEM;
        case json_error_invalid_utf8:
                return parse_fail(p, "header is not valid UTF-8 (%s, byte %d)", je->text, je->position);
        case json_error_stack_overflow:
                return parse_fail(p, "header nests deeper than the limit of %d levels", JSON_PARSER_MAX_DEPTH);
        case json_error_duplicate_key:
                return parse_fail(p, "header has a duplicate key (%s)", je->text);
        case json_error_numeric_overflow:
                return parse_fail(p, "header has an integer out of range (%s)", je->text);
        default:
                return parse_fail(p, "header is not valid JSON: %s (byte %d)", je->text, je->position);
        }
}

static int parse_json(Parse *p, StHeader *h) {
        const char *json = (const char *) h->raw + 8, *key;
        size_t len = h->header_len, n;
        _cleanup_(json_decrefp) json_t *root = NULL;
        json_error_t je;
        json_t *value;
        int r;

        if (len == 0 || json[0] != '{')
                return parse_fail(p, "header does not start with '{'");

        root = json_loadb(json, len, JSON_REJECT_DUPLICATES | JSON_DISABLE_EOF_CHECK, &je);
        if (!root)
                return parse_json_error(p, &je);
        /* With the EOF check off, je.position is how far the parser read. */
        for (size_t i = (size_t) je.position; i < len; i++)
                if (json[i] != ' ')
                        return parse_fail(p, "header padding must be spaces, found byte 0x%02x at byte %zu",
                                          (unsigned char) json[i], i);

        n = json_object_size(root);
        h->tensors = calloc(n ? n : 1, sizeof(StTensor));
        if (!h->tensors)
                return -ENOMEM;
        json_object_foreach(root, key, value) {
                if (strcmp(key, "__metadata__") == 0) {
                        r = parse_metadata(p, value, h);
                        if (r != 0)
                                return r;
                        continue;
                }
                r = parse_tensor(p, key, value, &h->tensors[h->n_tensors]);
                if (r != 0) {
                        /* Keep what the half-built tensor allocated reachable for st_header_unref(). */
                        h->n_tensors++;
                        return r;
                }
                h->n_tensors++;
        }
        return check_layout(p, h);
}

/* Check the length prefix against the file size before allocating anything. */
static int check_prefix(Parse *p, const uint8_t prefix[8], uint64_t file_size, uint64_t *ret_len) {
        uint64_t n = 0, end;

        for (int i = 7; i >= 0; i--)
                n = (n << 8) | prefix[i];
        if (n > ST_HEADER_MAX)
                return parse_fail(p, "header length %llu exceeds the limit of %llu bytes", (unsigned long long) n,
                                  ST_HEADER_MAX);
        if (add_overflow_u64(n, 8, &end) || end > file_size)
                return parse_fail(p, "header length %llu runs past the end of the file (%llu bytes)",
                                  (unsigned long long) n, (unsigned long long) file_size);
        *ret_len = n;
        return 0;
}

static int header_new(uint64_t file_size, uint64_t header_len, StHeader **ret) {
        StHeader *h;

        h = calloc(1, sizeof(StHeader));
        if (!h)
                return -ENOMEM;
        h->n_ref = 1;
        h->file_size = file_size;
        h->header_len = header_len;
        h->data_offset = 8 + header_len;
        h->raw = malloc(h->data_offset);
        if (!h->raw) {
                free(h);
                return -ENOMEM;
        }
        *ret = h;
        return 0;
}

static int short_file(Parse *p, uint64_t size) {
        return parse_fail(p, "file is %llu bytes, too short for the 8-byte header length", (unsigned long long) size);
}

int st_header_parse_buffer(const void *data, size_t size, const char *display, StHeader **ret, WdError *err) {
        _cleanup_(st_header_unrefp) StHeader *h = NULL;
        Parse p = { .display = display, .err = err };
        uint64_t len;
        int r;

        if (size < 8)
                return short_file(&p, size);
        r = check_prefix(&p, data, size, &len);
        if (r != 0)
                return r;
        r = header_new(size, len, &h);
        if (r < 0)
                return wd_error_set(err, r, "%s: out of memory", display);
        memcpy(h->raw, data, h->data_offset);
        r = parse_json(&p, h);
        if (r != 0)
                return r < 0 ? wd_error_set(err, r, "%s: out of memory", display) : r;
        *ret = TAKE_PTR(h);
        return 0;
}

static int pread_full(int fd, void *buf, size_t n, off_t off) {
        size_t done = 0;

        while (done < n) {
                ssize_t k = pread(fd, (uint8_t *) buf + done, n - done, off + (off_t) done);
                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        return negative_errno();
                }
                if (k == 0)
                        return -ENODATA;
                done += (size_t) k;
        }
        return 0;
}

int st_header_parse_fd(int fd, const char *display, StHeader **ret, WdError *err) {
        _cleanup_(st_header_unrefp) StHeader *h = NULL;
        Parse p = { .display = display, .err = err };
        uint8_t prefix[8];
        struct stat st;
        uint64_t len;
        int r;

        if (fstat(fd, &st) < 0) {
                r = negative_errno();
                return wd_error_set(err, r, "%s: cannot stat: %s", display, strerror(-r));
        }
        if (!S_ISREG(st.st_mode))
                return wd_error_set(err, WD_E_FORMAT, "%s: not a regular file", display);
        if ((uint64_t) st.st_size < 8)
                return short_file(&p, (uint64_t) st.st_size);

        r = pread_full(fd, prefix, sizeof(prefix), 0);
        if (r < 0)
                return wd_error_set(err, r == -ENODATA ? WD_E_CHANGED : r, "%s: cannot read the header: %s",
                                    display, strerror(r == -ENODATA ? EIO : -r));
        r = check_prefix(&p, prefix, (uint64_t) st.st_size, &len);
        if (r != 0)
                return r;
        r = header_new((uint64_t) st.st_size, len, &h);
        if (r < 0)
                return wd_error_set(err, r, "%s: out of memory", display);
        r = pread_full(fd, h->raw, h->data_offset, 0);
        if (r < 0)
                return wd_error_set(err, r == -ENODATA ? WD_E_CHANGED : r, "%s: cannot read the header: %s",
                                    display, r == -ENODATA ? "file shrank while reading" : strerror(-r));
        r = parse_json(&p, h);
        if (r != 0)
                return r < 0 ? wd_error_set(err, r, "%s: out of memory", display) : r;
        *ret = TAKE_PTR(h);
        return 0;
}
