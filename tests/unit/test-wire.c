/* The frame decoder's heap budget (proto/wire.c): wire_unpack_bounded()
 * decodes every request the daemon accepts within WIRE_UNPACK_BUDGET(len),
 * and refuses frames of many tiny repeated fields, which protobuf-c would
 * otherwise turn into one heap object each, with bounded memory.  Frames are
 * packed by protobuf-c from structs the test fills in, or written byte by
 * byte for the hostile ones; what decodes is compared with those structs.
 * The memory a refusal takes is measured twice: by the allocator's own
 * high-water mark, and by the process's peak RSS (VmHWM, reset through
 * /proc/self/clear_refs). */

#include <errno.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "macro.h"
#include "wire.h"

#define N_RULES_MAX 64       /* what the daemon accepts (PROTOCOL.md) */
#define PATTERN_MAX 256
#define REQUEST_LIMIT (64u << 10) /* [daemon] max_request_size by default */
#define REVIEW_RULES 8388508u     /* the review's 16 MiB frame */
#define SMALL_RULES 30000u

/* ---- packing ------------------------------------------------------------ */

typedef struct Buf {
        uint8_t *p;
        size_t len, size;
} Buf;

static void buf_put(Buf *b, const void *data, size_t n) {
        if (b->len + n > b->size) {
                b->size = (b->len + n) * 2;
                b->p = realloc(b->p, b->size);
                assert_non_null(b->p);
        }
        memcpy(b->p + b->len, data, n);
        b->len += n;
}

static void buf_varint(Buf *b, uint64_t v) {
        uint8_t c;

        do {
                c = (uint8_t) (v & 0x7f);
                v >>= 7;
                if (v)
                        c |= 0x80;
                buf_put(b, &c, 1);
        } while (v);
}

/* A length-delimited field: tag, length, bytes. */
static void buf_field(Buf *b, unsigned field, const Buf *inner) {
        buf_varint(b, (uint64_t) field << 3 | 2);
        buf_varint(b, inner->len);
        buf_put(b, inner->p, inner->len);
}

/* Envelope{id 1, load: LoadRequest{model "/m", shard: Shard{world 1,
 * n_rules empty ShardRules}}}, written by hand (packing it with protobuf-c
 * would first need the structs this test is about): each rule is the two
 * bytes 0x1a 0x00. */
static Buf load_with_empty_rules(size_t n_rules) {
        Buf shard = {}, load = {}, env = {};
        static const uint8_t world[] = { 0x10, 0x01 }, rule[] = { 0x1a, 0x00 }, model[] = { 0x0a, 0x02, '/', 'm' },
                             id[] = { 0x08, 0x01 };

        buf_put(&shard, world, sizeof(world));
        for (size_t i = 0; i < n_rules; i++)
                buf_put(&shard, rule, sizeof(rule));
        buf_put(&load, model, sizeof(model));
        buf_field(&load, 5, &shard);
        buf_put(&env, id, sizeof(id));
        buf_field(&env, 11, &load);
        free(shard.p);
        free(load.p);
        return env;
}

static void pack(const WireEnvelope *env, uint8_t **ret, size_t *ret_len) {
        uint8_t *buf;
        size_t len;

        assert_int_equal(wire_pack(env, 256u << 20, &buf, &len), 0);
        /* The payload, without the length prefix. */
        memmove(buf, buf + WIRE_HEADER_SIZE, len - WIRE_HEADER_SIZE);
        *ret = buf;
        *ret_len = len - WIRE_HEADER_SIZE;
}

/* ---- memory ------------------------------------------------------------- */

static long status_kib(const char *key) {
        char line[256];
        size_t n = strlen(key);
        long v = -1;
        FILE *f = fopen("/proc/self/status", "re");

        assert_non_null(f);
        while (fgets(line, sizeof(line), f))
                if (strncmp(line, key, n) == 0 && line[n] == ':')
                        v = strtol(line + n + 1, NULL, 10);
        fclose(f);
        assert_true(v >= 0);
        return v;
}

/* Reset VmHWM to the current RSS; false where the kernel does not let us. */
static bool hwm_reset(void) {
        FILE *f = fopen("/proc/self/clear_refs", "we");
        bool ok;

        if (!f)
                return false;
        ok = fputs("5", f) >= 0;
        ok = fclose(f) == 0 && ok;
        return ok;
}

/* ---- legitimate requests ------------------------------------------------ */

static char *filled(size_t n, char c) {
        char *s = malloc(n + 1);

        assert_non_null(s);
        memset(s, c, n);
        s[n] = 0;
        return s;
}

/* Every request type, each field as large as the daemon accepts, plus a few
 * variants; kind picks one.  Strings are freed by the caller through
 * request_clear(). */
typedef struct Request {
        WireEnvelope env;
        Weightd__V1__HelloRequest hello;
        Weightd__V1__LoadRequest load;
        Weightd__V1__Shard shard;
        Weightd__V1__ShardRule rules[N_RULES_MAX];
        Weightd__V1__ShardRule *rule_ptrs[N_RULES_MAX];
        Weightd__V1__ReleaseRequest release;
        Weightd__V1__ComponentRef ref;
        Weightd__V1__ListRequest list;
        Weightd__V1__StatusRequest status;
        Weightd__V1__CancelRequest cancel;
        char *strings[N_RULES_MAX + 4];
        size_t n_strings;
} Request;

static char *request_string(Request *r, size_t n, char c) {
        assert_true(r->n_strings < ELEMENTSOF(r->strings));
        return r->strings[r->n_strings++] = filled(n, c);
}

static void request_clear(Request *r) {
        for (size_t i = 0; i < r->n_strings; i++)
                free(r->strings[i]);
}

enum {
        REQ_HELLO,
        REQ_LOAD_LARGEST,     /* PATH_MAX model, 255-byte component, 64 rules of 256 bytes */
        REQ_LOAD_TINY_RULES,  /* 64 rules of 1 byte, the most structs per byte */
        REQ_PREFETCH_LARGEST,
        REQ_LOAD_PLAIN,
        REQ_RELEASE,
        REQ_EVICT,
        REQ_PIN,
        REQ_UNPIN,
        REQ_TENSORS,
        REQ_COMPONENTS,
        REQ_LIST,
        REQ_STATUS,
        REQ_CANCEL,
        REQ_EMPTY,
        _REQ_MAX,
};

static void request_init(Request *r, int kind) {
        *r = (Request){};
        weightd__v1__envelope__init(&r->env);
        r->env.id = UINT64_MAX;

        switch (kind) {
        case REQ_HELLO:
                weightd__v1__hello_request__init(&r->hello);
                r->hello.min_version = 1;
                r->hello.max_version = UINT32_MAX;
                r->hello.client = request_string(r, 4096, 'c');
                r->env.body_case = WEIGHTD__V1__ENVELOPE__BODY_HELLO;
                r->env.hello = &r->hello;
                break;
        case REQ_LOAD_LARGEST:
        case REQ_LOAD_TINY_RULES:
        case REQ_PREFETCH_LARGEST:
        case REQ_LOAD_PLAIN:
                weightd__v1__load_request__init(&r->load);
                r->load.model = request_string(r, PATH_MAX - 1, 'm');
                r->load.model[0] = '/';
                r->load.component = request_string(r, 255, 'k');
                r->load.target = request_string(r, strlen("cuda:GPU-01234567-89ab-cdef-0123-456789abcdef"), 'g');
                r->load.progress = true;
                r->load.keep_host = WEIGHTD__V1__KEEP_HOST__KEEP_HOST_NO;
                if (kind != REQ_LOAD_PLAIN) {
                        weightd__v1__shard__init(&r->shard);
                        r->shard.rank = 65535;
                        r->shard.world = 65536;
                        r->shard.uneven = true;
                        r->shard.n_rules = N_RULES_MAX;
                        r->shard.rules = r->rule_ptrs;
                        for (size_t i = 0; i < N_RULES_MAX; i++) {
                                weightd__v1__shard_rule__init(&r->rules[i]);
                                r->rules[i].pattern =
                                        request_string(r, kind == REQ_LOAD_TINY_RULES ? 1 : PATTERN_MAX, '*');
                                r->rules[i].dim = 1;
                                r->rule_ptrs[i] = &r->rules[i];
                        }
                        r->load.shard = &r->shard;
                }
                r->env.body_case = kind == REQ_PREFETCH_LARGEST ? WEIGHTD__V1__ENVELOPE__BODY_PREFETCH
                                                                : WEIGHTD__V1__ENVELOPE__BODY_LOAD;
                r->env.load = &r->load; /* one union */
                break;
        case REQ_RELEASE:
                weightd__v1__release_request__init(&r->release);
                r->release.lease = UINT64_MAX;
                r->env.body_case = WEIGHTD__V1__ENVELOPE__BODY_RELEASE;
                r->env.release = &r->release;
                break;
        case REQ_EVICT:
        case REQ_PIN:
        case REQ_UNPIN:
        case REQ_TENSORS:
        case REQ_COMPONENTS:
                weightd__v1__component_ref__init(&r->ref);
                r->ref.model = request_string(r, PATH_MAX - 1, 'm');
                r->ref.component = request_string(r, kind == REQ_COMPONENTS ? 0 : 255, 'k');
                r->env.body_case = kind == REQ_EVICT    ? WEIGHTD__V1__ENVELOPE__BODY_EVICT
                                   : kind == REQ_PIN    ? WEIGHTD__V1__ENVELOPE__BODY_PIN
                                   : kind == REQ_UNPIN  ? WEIGHTD__V1__ENVELOPE__BODY_UNPIN
                                   : kind == REQ_TENSORS ? WEIGHTD__V1__ENVELOPE__BODY_TENSORS
                                                        : WEIGHTD__V1__ENVELOPE__BODY_COMPONENTS;
                r->env.evict = &r->ref;
                break;
        case REQ_LIST:
                weightd__v1__list_request__init(&r->list);
                r->env.body_case = WEIGHTD__V1__ENVELOPE__BODY_LIST;
                r->env.list = &r->list;
                break;
        case REQ_STATUS:
                weightd__v1__status_request__init(&r->status);
                r->env.body_case = WEIGHTD__V1__ENVELOPE__BODY_STATUS;
                r->env.status = &r->status;
                break;
        case REQ_CANCEL:
                weightd__v1__cancel_request__init(&r->cancel);
                r->cancel.target = UINT64_MAX - 1;
                r->env.body_case = WEIGHTD__V1__ENVELOPE__BODY_CANCEL;
                r->env.cancel = &r->cancel;
                break;
        case REQ_EMPTY:
                r->env.id = 0;
                break;
        default:
                fail();
        }
}

static void assert_load_equal(const Weightd__V1__LoadRequest *got, const Weightd__V1__LoadRequest *want) {
        assert_string_equal(got->model, want->model);
        assert_string_equal(got->component, want->component);
        assert_string_equal(got->target, want->target);
        assert_int_equal(got->progress, want->progress);
        assert_int_equal(got->keep_host, want->keep_host);
        if (!want->shard) {
                assert_null(got->shard);
                return;
        }
        assert_non_null(got->shard);
        assert_int_equal(got->shard->rank, want->shard->rank);
        assert_int_equal(got->shard->world, want->shard->world);
        assert_int_equal(got->shard->uneven, want->shard->uneven);
        assert_int_equal(got->shard->n_rules, want->shard->n_rules);
        for (size_t i = 0; i < want->shard->n_rules; i++) {
                assert_string_equal(got->shard->rules[i]->pattern, want->shard->rules[i]->pattern);
                assert_int_equal(got->shard->rules[i]->dim, want->shard->rules[i]->dim);
        }
}

static void assert_request_equal(const WireEnvelope *got, const Request *r) {
        const WireEnvelope *want = &r->env;

        assert_int_equal(got->id, want->id);
        assert_int_equal(got->body_case, want->body_case);
        switch (want->body_case) {
        case WEIGHTD__V1__ENVELOPE__BODY_HELLO:
                assert_int_equal(got->hello->min_version, want->hello->min_version);
                assert_int_equal(got->hello->max_version, want->hello->max_version);
                assert_string_equal(got->hello->client, want->hello->client);
                break;
        case WEIGHTD__V1__ENVELOPE__BODY_LOAD:
        case WEIGHTD__V1__ENVELOPE__BODY_PREFETCH:
                assert_load_equal(got->load, want->load);
                break;
        case WEIGHTD__V1__ENVELOPE__BODY_RELEASE:
                assert_int_equal(got->release->lease, want->release->lease);
                break;
        case WEIGHTD__V1__ENVELOPE__BODY_EVICT:
        case WEIGHTD__V1__ENVELOPE__BODY_PIN:
        case WEIGHTD__V1__ENVELOPE__BODY_UNPIN:
        case WEIGHTD__V1__ENVELOPE__BODY_TENSORS:
        case WEIGHTD__V1__ENVELOPE__BODY_COMPONENTS:
                assert_string_equal(got->evict->model, want->evict->model);
                assert_string_equal(got->evict->component, want->evict->component);
                break;
        case WEIGHTD__V1__ENVELOPE__BODY_CANCEL:
                assert_int_equal(got->cancel->target, want->cancel->target);
                break;
        case WEIGHTD__V1__ENVELOPE__BODY_LIST:
        case WEIGHTD__V1__ENVELOPE__BODY_STATUS:
        case WEIGHTD__V1__ENVELOPE__BODY__NOT_SET:
                break;
        default:
                fail();
        }
}

/* Every request the daemon accepts decodes within its budget, with room to
 * spare, and fits the default request limit. */
static void test_legitimate_requests_decode(void **state) {
        for (int kind = 0; kind < _REQ_MAX; kind++) {
                Request r;
                uint8_t *buf;
                size_t len, peak = SIZE_MAX, unbounded_peak = 0;
                WireEnvelope *env;

                request_init(&r, kind);
                pack(&r.env, &buf, &len);
                assert_true(len <= REQUEST_LIMIT);

                env = wire_unpack_bounded_peak(buf, len, WIRE_UNPACK_BUDGET(len), &peak);
                assert_non_null(env);
                assert_request_equal(env, &r);
                wire_envelope_free(env);
                print_message("# request %d: %zu bytes, %zu bytes of heap, budget %zu\n", kind, len, peak,
                              WIRE_UNPACK_BUDGET(len));
                assert_true(peak > 0);
                assert_true(peak <= WIRE_UNPACK_BUDGET(len) / 2);

                /* The peak does not depend on the budget as long as it is met. */
                env = wire_unpack_bounded_peak(buf, len, SIZE_MAX, &unbounded_peak);
                assert_non_null(env);
                wire_envelope_free(env);
                assert_int_equal(unbounded_peak, peak);

                env = wire_unpack_bounded(buf, len, WIRE_UNPACK_BUDGET(len));
                assert_non_null(env);
                assert_request_equal(env, &r);
                wire_envelope_free(env);

                env = wire_unpack(buf, len);
                assert_non_null(env);
                assert_request_equal(env, &r);
                wire_envelope_free(env);

                free(buf);
                request_clear(&r);
        }
}

/* A budget decides exactly: the decode succeeds with its peak and fails, with
 * everything it built freed (ASan's leak check sees the rest), with any less.
 * Every budget below the peak makes a different allocation fail, so this goes
 * through each of protobuf-c's error paths. */
static void test_budget_is_exact(void **state) {
        static const int kinds[] = { REQ_LOAD_LARGEST, REQ_LOAD_TINY_RULES, REQ_HELLO, REQ_EMPTY };

        for (size_t k = 0; k < ELEMENTSOF(kinds); k++) {
                Request r;
                uint8_t *buf;
                size_t len, peak, p;
                WireEnvelope *env;

                request_init(&r, kinds[k]);
                pack(&r.env, &buf, &len);
                env = wire_unpack_bounded_peak(buf, len, SIZE_MAX, &peak);
                assert_non_null(env);
                wire_envelope_free(env);

                env = wire_unpack_bounded_peak(buf, len, peak, &p);
                assert_non_null(env);
                assert_int_equal(p, peak);
                wire_envelope_free(env);
                for (size_t b = 0; b < peak; b += 16) {
                        assert_null(wire_unpack_bounded_peak(buf, len, b, &p));
                        assert_true(p <= b);
                }
                assert_null(wire_unpack_bounded(buf, len, peak - 1));

                free(buf);
                request_clear(&r);
        }
}

/* Malformed frames are still refused, whatever the budget. */
static void test_malformed(void **state) {
        static const uint8_t truncated_varint[] = { 0x08, 0x80 }, bad_wire_type[] = { 0x0f },
                             length_past_end[] = { 0x5a, 0x05, 0x0a };

        assert_null(wire_unpack_bounded(truncated_varint, sizeof(truncated_varint), SIZE_MAX));
        assert_null(wire_unpack_bounded(bad_wire_type, sizeof(bad_wire_type), SIZE_MAX));
        assert_null(wire_unpack_bounded(length_past_end, sizeof(length_past_end), SIZE_MAX));
        assert_null(wire_unpack(length_past_end, sizeof(length_past_end)));
        wire_envelope_free(NULL);
}

/* ---- the review's frames ------------------------------------------------ */

/* A frame that fits the default request limit and holds 30,000 empty rules:
 * it is well formed (an unbounded decode finds every rule, and needs far
 * more than the budget), and the bounded decode refuses it within the
 * budget. */
static void test_small_frame_of_empty_rules(void **state) {
        Buf f = load_with_empty_rules(SMALL_RULES);
        size_t budget = WIRE_UNPACK_BUDGET(f.len), peak = 0, need = 0;
        WireEnvelope *env;

        assert_true(f.len <= REQUEST_LIMIT);

        env = wire_unpack_bounded_peak(f.p, f.len, SIZE_MAX, &need);
        assert_non_null(env);
        assert_int_equal(env->body_case, WEIGHTD__V1__ENVELOPE__BODY_LOAD);
        assert_string_equal(env->load->model, "/m");
        assert_non_null(env->load->shard);
        assert_int_equal(env->load->shard->world, 1);
        assert_int_equal(env->load->shard->n_rules, SMALL_RULES);
        assert_string_equal(env->load->shard->rules[SMALL_RULES - 1]->pattern, "");
        wire_envelope_free(env);
        print_message("# %u empty rules: %zu bytes, %zu bytes of heap unbounded, budget %zu\n", SMALL_RULES, f.len,
                      need, budget);
        /* Each rule is a 40-byte struct, a pointer and a 32-byte scan slot. */
        assert_true(need >= (size_t) SMALL_RULES * (40 + 8 + 32));
        assert_true(need > 8 * budget);

        assert_null(wire_unpack_bounded_peak(f.p, f.len, budget, &peak));
        assert_true(peak <= budget);
        free(f.p);
}

/* The review's repro: one 16 MiB frame (the largest max_frame_size lets
 * through by default) of 8,388,508 empty rules, which took the daemon to
 * 723 MiB of RSS.  Refused with at most its budget of heap, and the
 * process's peak RSS grows by no more than that and some slack (the frame
 * itself is resident before the measurement starts). */
static void test_review_frame_of_empty_rules(void **state) {
        Buf f = load_with_empty_rules(REVIEW_RULES);
        size_t budget = WIRE_UNPACK_BUDGET(f.len), peak = 0;
        long rss, hwm;
        bool measured;

        assert_true(f.len <= 16u << 20);
        assert_true(f.len > (16u << 20) - 1024);

        measured = hwm_reset();
        rss = status_kib("VmRSS");
        assert_null(wire_unpack_bounded_peak(f.p, f.len, budget, &peak));
        hwm = status_kib("VmHWM");
        assert_true(peak <= budget);
        if (measured) {
                print_message("# %u empty rules: %zu bytes, refused after %zu bytes of heap (budget %zu); "
                              "peak RSS grew by %ld KiB\n",
                              REVIEW_RULES, f.len, peak, budget, hwm - rss);
                assert_true((size_t) (hwm - rss) * 1024 <= budget + (16u << 20));
        } else
                print_message("# cannot reset VmHWM (/proc/self/clear_refs): %s; only the allocator's count is "
                              "checked\n",
                              strerror(errno));

        /* What the daemon's request limit would let a bounded decode hold. */
        assert_null(wire_unpack_bounded_peak(f.p, f.len, WIRE_UNPACK_BUDGET(REQUEST_LIMIT), &peak));
        assert_true(peak <= WIRE_UNPACK_BUDGET(REQUEST_LIMIT));
        free(f.p);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_legitimate_requests_decode),
                cmocka_unit_test(test_budget_is_exact),
                cmocka_unit_test(test_malformed),
                cmocka_unit_test(test_small_frame_of_empty_rules),
                cmocka_unit_test(test_review_frame_of_empty_rules),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
