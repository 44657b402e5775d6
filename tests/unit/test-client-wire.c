/* libweightd-client against a scripted daemon on a socketpair: the framing,
 * the handshake, descriptors, progress and cancellation, and the checks on
 * every field of a hostile reply.  The test writes the daemon's frames
 * before the client asks (the socket buffers them), then reads back what the
 * client sent; replies larger than the socket buffer go out from a thread.
 * Every case compares the process's open descriptors before and after. */

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "client-internal.h"
#include "test-util.h"

#define SLAB_SIZE 200u
#define SLAB_MAP 4096u

/* ---- the daemon's side ---- */

typedef struct Fake {
        int fd;
        WireReader reader; /* what the client sent */
        int fds_before;
} Fake;

static void fake_send_raw(Fake *f, const void *buf, size_t len, const int *fds, size_t n_fds) {
        size_t off = 0;

        assert_int_equal(wire_send(f->fd, buf, len, fds, n_fds, &off), 0);
}

static void fake_send_fds(Fake *f, WireEnvelope *env, const int *fds, size_t n_fds) {
        uint8_t *buf = NULL;
        size_t len = 0;

        assert_int_equal(wire_pack(env, CLIENT_MAX_FRAME, &buf, &len), 0);
        fake_send_raw(f, buf, len, fds, n_fds);
        free(buf);
}

static void fake_send(Fake *f, WireEnvelope *env) {
        fake_send_fds(f, env, NULL, 0);
}

/* The Envelope that answers request id with reply. */
static WireEnvelope reply_envelope(uint64_t id, PbReply *reply) {
        WireEnvelope env = WEIGHTD__V1__ENVELOPE__INIT;

        env.id = id;
        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_REPLY;
        env.reply = reply;
        return env;
}

static void fake_send_reply(Fake *f, uint64_t id, PbReply *reply, const int *fds, size_t n_fds) {
        WireEnvelope env = reply_envelope(id, reply);

        fake_send_fds(f, &env, fds, n_fds);
}

/* A Reply with its result set by the caller (or none). */
static void fake_reply(Fake *f, uint64_t id, int code, const char *message) {
        PbReply reply = WEIGHTD__V1__REPLY__INIT;

        reply.code = (Weightd__V1__Code) code;
        reply.message = (char *) message;
        fake_send_reply(f, id, &reply, NULL, 0);
}

static void fake_progress(Fake *f, uint64_t id, uint64_t done, uint64_t total) {
        Weightd__V1__ProgressEvent ev = WEIGHTD__V1__PROGRESS_EVENT__INIT;
        WireEnvelope env = WEIGHTD__V1__ENVELOPE__INIT;

        ev.done_bytes = done;
        ev.total_bytes = total;
        env.id = id;
        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_PROGRESS;
        env.progress = &ev;
        fake_send(f, &env);
}

/* The next frame the client sent; NULL when it closed the connection. */
static WireEnvelope *fake_recv(Fake *f) {
        for (;;) {
                const uint8_t *p;
                size_t len;
                int r = wire_reader_next(&f->reader, &p, &len);

                if (r > 0) {
                        WireEnvelope *env = wire_unpack(p, len);

                        assert_non_null(env);
                        return env;
                }
                assert_int_equal(r, 0);
                r = wire_reader_recv(&f->reader, f->fd);
                if (r == 0)
                        return NULL;
                assert_true(r > 0);
        }
}

/* The next frame must be a request of this kind; returns it. */
static WireEnvelope *fake_expect(Fake *f, Weightd__V1__Envelope__BodyCase body, uint64_t id) {
        WireEnvelope *env = fake_recv(f);

        assert_non_null(env);
        assert_int_equal(env->body_case, body);
        assert_int_equal(env->id, id);
        return env;
}

static void fake_expect_release(Fake *f, uint64_t id, uint64_t lease) {
        WireEnvelope *env = fake_expect(f, WEIGHTD__V1__ENVELOPE__BODY_RELEASE, id);

        assert_int_equal(env->release->lease, lease);
        wire_envelope_free(env);
}

/* A HelloReply frame; no cmocka assert, so a listener thread may use it. */
static int hello_reply_pack(uint64_t id, uint32_t version, uint8_t **ret_buf, size_t *ret_len) {
        Weightd__V1__HelloReply hello = WEIGHTD__V1__HELLO_REPLY__INIT;
        PbReply reply = WEIGHTD__V1__REPLY__INIT;
        WireEnvelope env;
        char *features[] = { (char *) "host", (char *) "cuda" };

        hello.version = version;
        hello.daemon_version = (char *) "0.1.0-fake";
        hello.features = features;
        hello.n_features = 2;
        hello.max_frame_size = 1 << 20;
        hello.max_pending_requests = 64;
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_HELLO;
        reply.hello = &hello;
        env = reply_envelope(id, &reply);
        return wire_pack(&env, CLIENT_MAX_FRAME, ret_buf, ret_len);
}

static void fake_hello_reply(Fake *f, uint64_t id, uint32_t version) {
        uint8_t *buf = NULL;
        size_t len = 0;

        assert_int_equal(hello_reply_pack(id, version, &buf, &len), 0);
        fake_send_raw(f, buf, len, NULL, 0);
        free(buf);
}

static void fake_open(Fake *f, int *ret_client_fd) {
        struct timeval tv = { .tv_sec = 10 };
        int sv[2];

        f->fds_before = count_fds();
        assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
        /* A test that waits for a frame the client never sends fails, not hangs. */
        assert_int_equal(setsockopt(sv[1], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)), 0);
        f->fd = sv[1];
        wire_reader_init(&f->reader, CLIENT_MAX_FRAME, 0);
        *ret_client_fd = sv[0];
}

/* A client connected to the fake through Hello (id 1). */
static wd_client *fake_connect(Fake *f) {
        wd_client *c = NULL;
        wd_error err;
        int fd;

        fake_open(f, &fd);
        fake_hello_reply(f, 1, 1);
        assert_int_equal(client_new_from_fd(fd, "fake", &c, &err), WD_OK);

        WireEnvelope *env = fake_expect(f, WEIGHTD__V1__ENVELOPE__BODY_HELLO, 1);
        assert_int_equal(env->hello->min_version, 1);
        assert_int_equal(env->hello->max_version, 1);
        assert_true(strncmp(env->hello->client, "libweightd-client ", 18) == 0);
        wire_envelope_free(env);
        return c;
}

/* Close the daemon's end; every descriptor the case opened must be gone. */
static void fake_close(Fake *f) {
        wire_reader_deinit(&f->reader);
        close(f->fd);
        assert_int_equal(count_fds(), f->fds_before);
}

/* ---- a component: one or two files in sealed memfds ---- */

typedef struct Component {
        PbSlab slabs[2];
        PbSlab *slab_ptrs[2];
        size_t n_slabs;
        Weightd__V1__MetadataEntry md[2];
        Weightd__V1__MetadataEntry *md_ptrs[2];
        PbTensor tensors[8];
        PbTensor *tensor_ptrs[8];
        size_t n_tensors;
        uint64_t shapes[8][4];
        uint8_t content[2][SLAB_SIZE];
        int fds[2];
} Component;

static int memfd_with(const uint8_t *data, size_t size, size_t map_size, bool seal) {
        int fd = memfd_create("test-slab", MFD_CLOEXEC | MFD_ALLOW_SEALING);

        assert_true(fd >= 0);
        assert_int_equal(write(fd, data, size), (ssize_t) size);
        assert_int_equal(ftruncate(fd, (off_t) map_size), 0);
        if (seal)
                assert_int_equal(fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL), 0);
        return fd;
}

static void component_tensor(Component *k, const char *name, const char *dtype, uint32_t slab, uint64_t offset,
                             uint64_t nbytes, size_t ndim, ...) {
        size_t i = k->n_tensors++;
        PbTensor *t = &k->tensors[i];
        va_list ap;

        *t = (PbTensor) WEIGHTD__V1__TENSOR__INIT;
        t->name = (char *) name;
        t->dtype = (char *) dtype;
        t->slab = slab;
        t->offset = offset;
        t->nbytes = nbytes;
        va_start(ap, ndim);
        for (size_t d = 0; d < ndim; d++)
                k->shapes[i][d] = va_arg(ap, uint64_t);
        va_end(ap);
        t->n_shape = ndim;
        t->shape = k->shapes[i];
        k->tensor_ptrs[i] = t;
}

/* Every kind of tensor the client checks: known dtypes, a scalar, an empty
 * one, a dtype the client does not know; with two files, two more in the
 * second.  Slab 0 travels as descriptor 1 and slab 1 as descriptor 0. */
static void component_init(Component *k, size_t n_slabs) {
        static const char *files[] = { "/models/m/model-00001.safetensors", "/models/m/model-00002.safetensors" };

        memset(k, 0, sizeof(*k));
        k->n_slabs = n_slabs;
        for (size_t s = 0; s < n_slabs; s++) {
                for (size_t i = 0; i < SLAB_SIZE; i++)
                        k->content[s][i] = (uint8_t) (i * 7 + s * 31 + 1);
                k->fds[s] = memfd_with(k->content[s], SLAB_SIZE, SLAB_MAP, true);
                k->slabs[s] = (PbSlab) WEIGHTD__V1__SLAB__INIT;
                k->slabs[s].fd_index = (uint32_t) (n_slabs - 1 - s);
                k->slabs[s].size = SLAB_SIZE;
                k->slabs[s].map_size = SLAB_MAP;
                k->slabs[s].file = (char *) files[s];
                k->slab_ptrs[s] = &k->slabs[s];
        }
        k->md[0] = (Weightd__V1__MetadataEntry) WEIGHTD__V1__METADATA_ENTRY__INIT;
        k->md[0].key = (char *) "format";
        k->md[0].value = (char *) "pt";
        k->md[1] = (Weightd__V1__MetadataEntry) WEIGHTD__V1__METADATA_ENTRY__INIT;
        k->md[1].key = (char *) "author";
        k->md[1].value = (char *) "test";
        k->md_ptrs[0] = &k->md[0];
        k->md_ptrs[1] = &k->md[1];
        k->slabs[0].metadata = k->md_ptrs;
        k->slabs[0].n_metadata = 2;

        component_tensor(k, "a.weight", "F32", 0, 0, 128, 2, (uint64_t) 4, (uint64_t) 8);
        component_tensor(k, "b.bias", "BF16", 0, 128, 32, 1, (uint64_t) 16);
        component_tensor(k, "c.scale", "F32", 0, 160, 4, 0);
        component_tensor(k, "d.odd", "X9_FUTURE", 0, 164, 7, 1, (uint64_t) 3);
        component_tensor(k, "e.empty", "F16", 0, 171, 0, 2, (uint64_t) 0, (uint64_t) 5);
        if (n_slabs > 1) {
                component_tensor(k, "f.packed", "F4", 1, 0, 3, 1, (uint64_t) 6);
                component_tensor(k, "g.weight", "I64", 1, 8, 192, 2, (uint64_t) 3, (uint64_t) 8);
        }
}

static void component_close(Component *k) {
        for (size_t s = 0; s < k->n_slabs; s++)
                if (k->fds[s] >= 0) {
                        close(k->fds[s]);
                        k->fds[s] = -1;
                }
}

static void component_load_reply(Fake *f, Component *k, uint64_t id, uint64_t lease, const int *fds, size_t n_fds) {
        Weightd__V1__LoadReply load = WEIGHTD__V1__LOAD_REPLY__INIT;
        PbReply reply = WEIGHTD__V1__REPLY__INIT;

        load.lease = lease;
        load.model = (char *) "/models/m";
        load.component = (char *) "unet";
        load.slabs = k->slab_ptrs;
        load.n_slabs = k->n_slabs;
        load.tensors = k->tensor_ptrs;
        load.n_tensors = k->n_tensors;
        load.bytes = SLAB_SIZE * k->n_slabs;
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_LOAD;
        reply.load = &load;
        fake_send_reply(f, id, &reply, fds, n_fds);
}

/* The descriptors in the order component_init() gave the slabs' fd_index,
 * whatever a case did to those fields since. */
static void component_fds(const Component *k, int *ret) {
        for (size_t s = 0; s < k->n_slabs; s++)
                ret[k->n_slabs - 1 - s] = k->fds[s];
}

static void component_check_manifest(const Component *k, const wd_manifest *m, bool mapped) {
        assert_string_equal(wd_manifest_model(m), "/models/m");
        assert_int_equal(wd_manifest_n_files(m), k->n_slabs);
        assert_int_equal(wd_manifest_bytes(m), SLAB_SIZE * k->n_slabs);
        assert_int_equal(wd_manifest_n_tensors(m), k->n_tensors);
        assert_null(wd_manifest_tensor(m, k->n_tensors));
        assert_null(wd_manifest_file(m, k->n_slabs));
        assert_null(wd_manifest_find(m, "no.such.tensor"));
        assert_string_equal(wd_manifest_file(m, 0), "/models/m/model-00001.safetensors");

        for (size_t i = 0; i < k->n_tensors; i++) {
                const PbTensor *want = &k->tensors[i];
                const wd_tensor *t = wd_manifest_tensor(m, i);

                assert_ptr_equal(wd_manifest_find(m, want->name), t);
                assert_string_equal(t->name, want->name);
                assert_string_equal(t->dtype, want->dtype);
                assert_int_equal(t->ndim, want->n_shape);
                if (want->n_shape == 0)
                        assert_null(t->shape);
                for (size_t d = 0; d < want->n_shape; d++)
                        assert_int_equal(t->shape[d], want->shape[d]);
                assert_int_equal(t->file, want->slab);
                assert_int_equal(t->offset, want->offset);
                assert_int_equal(t->nbytes, want->nbytes);
                if (!mapped) {
                        assert_null(t->data);
                        continue;
                }
                assert_non_null(t->data);
                assert_memory_equal(t->data, k->content[want->slab] + want->offset, want->nbytes);
        }

        /* The bulk forms give the same tensors and strings. */
        assert_null(wd_manifest_tensors(NULL));
        assert_int_equal(wd_manifest_strings_size(NULL), 0);
        assert_int_equal(wd_manifest_strings(NULL, NULL, 0), WD_INVALID_ARGUMENT);
        const wd_tensor *all = wd_manifest_tensors(m);
        size_t size = wd_manifest_strings_size(m);
        char *strings = malloc(size + 1);
        assert_non_null(strings);
        strings[size] = 'x';
        assert_int_equal(wd_manifest_strings(m, strings, size - 1), WD_INVALID_ARGUMENT);
        assert_int_equal(wd_manifest_strings(m, strings, size), WD_OK);
        assert_int_equal(strings[size], 'x');
        const char *p = strings;
        for (size_t i = 0; i < k->n_tensors; i++) {
                assert_ptr_equal(&all[i], wd_manifest_tensor(m, i));
                assert_string_equal(p, k->tensors[i].name);
                p += strlen(p) + 1;
                assert_string_equal(p, k->tensors[i].dtype);
                p += strlen(p) + 1;
        }
        assert_ptr_equal(p, strings + size);
        free(strings);

        /* Names alone, and dtypes as codes into the distinct spellings. */
        assert_int_equal(wd_manifest_names_size(NULL), 0);
        assert_int_equal(wd_manifest_names(NULL, NULL, 0), WD_INVALID_ARGUMENT);
        size = wd_manifest_names_size(m);
        char *names = malloc(size + 1);
        assert_non_null(names);
        names[size] = 'x';
        if (size > 0)
                assert_int_equal(wd_manifest_names(m, names, size - 1), WD_INVALID_ARGUMENT);
        assert_int_equal(wd_manifest_names(m, names, size), WD_OK);
        assert_int_equal(names[size], 'x');
        p = names;
        for (size_t i = 0; i < k->n_tensors; i++) {
                assert_string_equal(p, k->tensors[i].name);
                p += strlen(p) + 1;
        }
        assert_ptr_equal(p, names + size);
        free(names);

        uint8_t *codes = malloc(k->n_tensors + 1);
        const char *kinds[256];
        size_t n_kinds = 0, want_kinds = 0;
        assert_non_null(codes);
        for (size_t i = 0; i < k->n_tensors; i++) {
                size_t j = 0;
                while (j < i && strcmp(k->tensors[j].dtype, k->tensors[i].dtype) != 0)
                        j++;
                want_kinds += j == i;
        }
        assert_int_equal(wd_manifest_dtype_codes(NULL, codes, k->n_tensors, kinds, 256, &n_kinds),
                         WD_INVALID_ARGUMENT);
        if (k->n_tensors > 0)
                assert_int_equal(wd_manifest_dtype_codes(m, codes, k->n_tensors - 1, kinds, 256, &n_kinds),
                                 WD_INVALID_ARGUMENT);
        assert_int_equal(wd_manifest_dtype_codes(m, codes, k->n_tensors, kinds, 256, &n_kinds), WD_OK);
        assert_int_equal(n_kinds, want_kinds);
        for (size_t i = 0; i < k->n_tensors; i++) {
                assert_true(codes[i] < n_kinds);
                assert_string_equal(kinds[codes[i]], k->tensors[i].dtype);
                /* In the order of their first tensor. */
                if (i == 0)
                        assert_int_equal(codes[i], 0);
        }
        if (want_kinds > 1)
                assert_int_equal(wd_manifest_dtype_codes(m, codes, k->n_tensors, kinds, want_kinds - 1, &n_kinds),
                                 WD_RESOURCE_EXHAUSTED);
        free(codes);

        size_t n_dims = wd_manifest_n_dims(m);
        uint64_t *dims = malloc((n_dims + 1) * sizeof(uint64_t));
        assert_non_null(dims);
        dims[n_dims] = 7;
        assert_int_equal(wd_manifest_n_dims(NULL), 0);
        assert_int_equal(wd_manifest_shapes(NULL, dims, n_dims), WD_INVALID_ARGUMENT);
        if (n_dims > 0)
                assert_int_equal(wd_manifest_shapes(m, dims, n_dims - 1), WD_INVALID_ARGUMENT);
        assert_int_equal(wd_manifest_shapes(m, dims, n_dims), WD_OK);
        assert_int_equal(dims[n_dims], 7);
        const uint64_t *d = dims;
        for (size_t i = 0; i < k->n_tensors; i++)
                for (size_t j = 0; j < k->tensors[i].n_shape; j++)
                        assert_int_equal(*d++, k->tensors[i].shape[j]);
        assert_ptr_equal(d, dims + n_dims);
        free(dims);

        const char *key, *value;
        assert_int_equal(wd_manifest_n_metadata(m, 0), 2);
        assert_int_equal(wd_manifest_metadata(m, 0, 1, &key, &value), WD_OK);
        assert_string_equal(key, "author");
        assert_string_equal(value, "test");
        assert_int_equal(wd_manifest_metadata(m, 0, 2, &key, &value), WD_NOT_FOUND);
        assert_int_equal(wd_manifest_metadata(m, 9, 0, &key, &value), WD_NOT_FOUND);
}

/* ---- cases ---- */

static void test_hello(void **state) {
        Fake f;
        wd_client *c = fake_connect(&f);
        wd_hello h;

        assert_int_equal(wd_hello_info(c, &h), WD_OK);
        assert_int_equal(h.protocol_version, 1);
        assert_string_equal(h.daemon_version, "0.1.0-fake");
        assert_string_equal(h.features, "host cuda");
        assert_int_equal(h.max_frame_size, 1 << 20);
        assert_int_equal(h.max_pending_requests, 64);
        wd_disconnect(c);
        assert_null(fake_recv(&f));
        fake_close(&f);
}

/* The daemon's side of a handshake that fails, and what the client says. */
typedef void (*Hostile)(Fake *f);

static void hello_fails(Hostile send, int code, const char *message) {
        wd_client *c = NULL;
        wd_error err;
        Fake f;
        int fd;

        fake_open(&f, &fd);
        send(&f);
        assert_int_equal(client_new_from_fd(fd, "fake", &c, &err), code);
        assert_null(c);
        assert_int_equal(err.code, code);
        assert_string_equal(err.message, message);
        fake_close(&f);
}

/* Refused at accept, before the daemon reads Hello, and closed. */
static void send_refused_closed(Fake *f) {
        fake_reply(f, 0, WD_PERMISSION_DENIED, "uid 1234 is not allowed to connect");
        shutdown(f->fd, SHUT_RDWR);
}
/* The same while the daemon still holds its end. */
static void send_refused(Fake *f) {
        fake_reply(f, 0, WD_RESOURCE_EXHAUSTED, "too many connections");
}
static void send_unsupported(Fake *f) {
        fake_reply(f, 1, WD_UNSUPPORTED, "no common protocol version");
}
/* A version the client did not offer. */
static void send_hello_v2(Fake *f) {
        fake_hello_reply(f, 1, 2);
}

static void test_hello_fails(void **state) {
        hello_fails(send_refused_closed, WD_PERMISSION_DENIED, "uid 1234 is not allowed to connect");
        hello_fails(send_refused, WD_RESOURCE_EXHAUSTED, "too many connections");
        hello_fails(send_unsupported, WD_UNSUPPORTED, "no common protocol version");
        hello_fails(send_hello_v2, WD_PROTOCOL_ERROR, "the daemon chose protocol version 2; this client speaks 1");
}

static void test_load_release(void **state) {
        wd_lease *l = NULL;
        Component k;
        wd_error err = { .code = 4242 };
        int fds[2];
        Fake f;
        wd_client *c = fake_connect(&f);

        component_init(&k, 2);
        component_fds(&k, fds);
        component_load_reply(&f, &k, 2, 77, fds, 2);
        component_close(&k);

        assert_int_equal(wd_load(c, "/models/m", "unet", &l, &err), WD_OK);
        assert_int_equal(err.code, 4242); /* untouched on success */
        assert_int_equal(wd_lease_id(l), 77);
        component_check_manifest(&k, wd_lease_manifest(l), true);

        WireEnvelope *env = fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_LOAD, 2);
        assert_string_equal(env->load->model, "/models/m");
        assert_string_equal(env->load->component, "unet");
        assert_string_equal(env->load->target, "");
        /* The client asks for the table, and still takes the Tensor
         * messages of a daemon that does not know it (this reply). */
        assert_true(env->load->compact_tensors);
        wire_envelope_free(env);

        /* A lease's manifest is not the caller's to free. */
        wd_manifest_free((wd_manifest *) wd_lease_manifest(l));

        /* The lease keeps the connection: release still reaches the daemon. */
        wd_disconnect(c);
        assert_int_equal(wd_manifest_find(wd_lease_manifest(l), "g.weight")->nbytes, 192);
        fake_reply(&f, 3, WD_OK, "");
        assert_int_equal(wd_release(l, &err), WD_OK);
        fake_expect_release(&f, 3, 77);
        assert_null(fake_recv(&f));
        fake_close(&f);
}

/* What a forked child does with its parent's client and lease; returns the
 * child's exit status: 0, or the number of the check that failed.  A call
 * that takes the client's mutex (which the parent held at fork()) never
 * returns: the alarm ends the child then. */
static int fork_child(wd_client *c, wd_lease *l, const Component *k) {
        const wd_tensor *t = wd_manifest_find(wd_lease_manifest(l), "g.weight");
        wd_manifest *m = NULL;
        wd_status *st = NULL;
        wd_lease *l2 = NULL;
        wd_entry *e = NULL;
        wd_hello h;
        size_t n = 0;
        wd_error err;

        alarm(10);
        if (wd_status_get(c, &st, &err) != WD_UNAVAILABLE || err.code != WD_UNAVAILABLE || st)
                return 1;
        if (!strstr(err.message, "was connected by process") || !strstr(err.message, "must connect again"))
                return 2;
        if (wd_load(c, "/models/m", "unet", &l2, &err) != WD_UNAVAILABLE || l2)
                return 3;
        if (wd_prefetch(c, "/models/m", "unet", NULL, NULL, NULL, &err) != WD_UNAVAILABLE)
                return 4;
        if (wd_evict(c, "/models/m", "unet", &err) != WD_UNAVAILABLE)
                return 5;
        if (wd_list(c, &e, &n, &err) != WD_UNAVAILABLE || wd_tensors(c, "/models/m", NULL, &m, &err) != WD_UNAVAILABLE)
                return 6;
        if (wd_hello_info(c, &h) != WD_OK || h.protocol_version != 1)
                return 7;
        /* The child's copy of the mapping is readable until it drops it. */
        if (!t || memcmp(t->data, k->content[1] + 8, 192) != 0)
                return 8;
        if (wd_release(l, &err) != WD_OK)
                return 9;
        wd_disconnect(c);
        return 0;
}

/* fork(): the child's calls on the parent's client fail with
 * WD_UNAVAILABLE without sending or taking the client's mutex, and its
 * wd_release() of the inherited lease only unmaps; the parent's lease and
 * connection carry on, and the next frame the daemon reads is the parent's
 * own Release. */
static void test_fork(void **state) {
        wd_lease *l = NULL;
        Component k;
        wd_error err;
        int fds[2], status;
        Fake f;
        wd_client *c = fake_connect(&f);
        pid_t pid;

        component_init(&k, 2);
        component_fds(&k, fds);
        component_load_reply(&f, &k, 2, 77, fds, 2);
        component_close(&k);
        assert_int_equal(wd_load(c, "/models/m", "unet", &l, &err), WD_OK);
        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_LOAD, 2));

        /* As if another thread of the parent were inside a call at fork(). */
        assert_int_equal(pthread_mutex_lock(&c->mutex), 0);
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0)
                _exit(fork_child(c, l, &k));
        assert_int_equal(pthread_mutex_unlock(&c->mutex), 0);
        assert_int_equal(waitpid(pid, &status, 0), pid);
        assert_true(WIFEXITED(status));
        assert_int_equal(WEXITSTATUS(status), 0);

        /* The parent's lease is whole, and its client works. */
        component_check_manifest(&k, wd_lease_manifest(l), true);
        fake_reply(&f, 3, WD_OK, "");
        assert_int_equal(wd_release(l, &err), WD_OK);
        fake_expect_release(&f, 3, 77);
        wd_disconnect(c);
        assert_null(fake_recv(&f));
        fake_close(&f);
}

static void test_release_not_found(void **state) {
        wd_lease *l = NULL;
        Component k;
        wd_error err;
        Fake f;
        wd_client *c = fake_connect(&f);

        component_init(&k, 1);
        component_load_reply(&f, &k, 2, 5, k.fds, 1);
        component_close(&k);
        assert_int_equal(wd_load(c, "/models/m", NULL, &l, &err), WD_OK);
        fake_reply(&f, 3, WD_NOT_FOUND, "no lease 5 on this connection");
        assert_int_equal(wd_release(l, &err), WD_NOT_FOUND);
        assert_string_equal(err.message, "no lease 5 on this connection");
        wd_disconnect(c);
        fake_close(&f);
}

/* A component without files: no descriptors to take, nothing to map. */
static void test_load_empty(void **state) {
        wd_lease *l = NULL;
        Component k;
        wd_error err;
        Fake f;
        wd_client *c = fake_connect(&f);

        memset(&k, 0, sizeof(k));
        component_load_reply(&f, &k, 2, 3, NULL, 0);
        assert_int_equal(wd_load(c, "/models/m", "unet", &l, &err), WD_OK);
        assert_int_equal(wd_manifest_n_tensors(wd_lease_manifest(l)), 0);
        assert_int_equal(wd_manifest_n_files(wd_lease_manifest(l)), 0);
        assert_null(wd_manifest_find(wd_lease_manifest(l), "a.weight"));
        assert_null(wd_manifest_file(wd_lease_manifest(l), 0));
        fake_reply(&f, 3, WD_OK, "");
        assert_int_equal(wd_release(l, &err), WD_OK);
        wd_disconnect(c);
        fake_close(&f);
}

/* A sharded load's reply: one derived slab, the component's files listed
 * apart.  The request carries the shard; the manifest names the real files,
 * Tensor.file indexes them, and split tensors have their full shape. */
typedef struct Sharded {
        Component k;     /* slab 0 is the derived slab; slabs[1] is unused */
        PbSlab files[2];
        PbSlab *file_ptrs[2];
        uint64_t full[8][4];
} Sharded;

static void sharded_init(Sharded *x) {
        component_init(&x->k, 1);
        x->k.slabs[0].fd_index = 0;
        x->k.slabs[0].file = (char *) "";
        x->k.slabs[0].n_metadata = 0;
        for (size_t i = 0; i < 2; i++) {
                x->files[i] = (PbSlab) WEIGHTD__V1__SLAB__INIT;
                x->files[i].file = (char *) (i == 0 ? "/models/m/model-00001.safetensors"
                                                    : "/models/m/model-00002.safetensors");
                x->file_ptrs[i] = &x->files[i];
        }
        x->files[1].metadata = x->k.md_ptrs;
        x->files[1].n_metadata = 2;
        /* a.weight: rows [2, 4) of [8, 8] along dim 0, in file 1. */
        x->k.tensors[0].file = 1;
        x->full[0][0] = 8;
        x->full[0][1] = 8;
        x->k.tensors[0].full_shape = x->full[0];
        x->k.tensors[0].n_full_shape = 2;
        x->k.tensors[0].shard_dim = 0;
        x->k.tensors[0].shard_start = 2;
        /* b.bias: columns [16, 32) of [32] along dim 0, in file 0. */
        x->full[1][0] = 32;
        x->k.tensors[1].full_shape = x->full[1];
        x->k.tensors[1].n_full_shape = 1;
        x->k.tensors[1].shard_start = 16;
}

static void sharded_reply(Fake *f, Sharded *x, uint64_t id, uint64_t lease) {
        Weightd__V1__LoadReply load = WEIGHTD__V1__LOAD_REPLY__INIT;
        PbReply reply = WEIGHTD__V1__REPLY__INIT;

        load.lease = lease;
        load.model = (char *) "/models/m";
        load.component = (char *) "unet";
        load.slabs = x->k.slab_ptrs;
        load.n_slabs = 1;
        load.files = x->file_ptrs;
        load.n_files = 2;
        load.tensors = x->k.tensor_ptrs;
        load.n_tensors = x->k.n_tensors;
        load.bytes = 123456;
        load.target = (char *) "host";
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_LOAD;
        reply.load = &load;
        fake_send_reply(f, id, &reply, x->k.fds, 1);
}

static void test_sharded_load(void **state) {
        static const wd_shard_rule rules[] = { { "a.*", 0 }, { "*.bias", 0 } };
        wd_load_options o = { .rank = 1, .world = 4, .rules = rules, .n_rules = 2, .uneven = 1 };
        const char *key, *value;
        const wd_manifest *m;
        const wd_tensor *t;
        wd_lease *l = NULL;
        wd_error err;
        Sharded x;
        Fake f;
        wd_client *c = fake_connect(&f);

        sharded_init(&x);
        sharded_reply(&f, &x, 2, 5);
        component_close(&x.k);

        assert_int_equal(wd_load_ex(c, "/models/m", "unet", &o, &l, &err), WD_OK);
        WireEnvelope *env = fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_LOAD, 2);
        assert_non_null(env->load->shard);
        assert_int_equal(env->load->shard->rank, 1);
        assert_int_equal(env->load->shard->world, 4);
        assert_true(env->load->shard->uneven);
        assert_int_equal(env->load->shard->n_rules, 2);
        assert_string_equal(env->load->shard->rules[1]->pattern, "*.bias");
        assert_string_equal(env->load->target, "");
        wire_envelope_free(env);

        m = wd_lease_manifest(l);
        assert_int_equal(wd_manifest_n_files(m), 2);
        assert_int_equal(wd_manifest_bytes(m), 123456);
        assert_string_equal(wd_manifest_file(m, 1), "/models/m/model-00002.safetensors");
        assert_int_equal(wd_manifest_n_metadata(m, 0), 0);
        assert_int_equal(wd_manifest_metadata(m, 1, 1, &key, &value), WD_OK);
        assert_string_equal(key, "author");
        t = wd_manifest_find(m, "a.weight");
        assert_int_equal(t->file, 1);
        assert_non_null(t->full_shape);
        assert_int_equal(t->full_shape[0], 8);
        assert_int_equal(t->shard_start, 2);
        assert_memory_equal(t->data, x.k.content[0], 128);
        t = wd_manifest_find(m, "b.bias");
        assert_int_equal(t->file, 0);
        assert_int_equal(t->shard_start, 16);
        assert_memory_equal(t->data, x.k.content[0] + 128, 32);
        assert_null(wd_manifest_find(m, "c.scale")->full_shape);

        fake_reply(&f, 3, WD_OK, "");
        assert_int_equal(wd_release(l, &err), WD_OK);
        fake_expect_release(&f, 3, 5);
        wd_disconnect(c);
        fake_close(&f);
}

/* A Load (id 2) of lease 9 that the client refused: WD_PROTOCOL_ERROR
 * with needle in the message, no lease, and a Release (id 3) of it sent. */
static void expect_refused(Fake *f, int r, wd_lease *const *l, const wd_error *err, const char *needle) {
        assert_int_equal(r, WD_PROTOCOL_ERROR);
        assert_null(*l);
        assert_int_equal(err->code, WD_PROTOCOL_ERROR);
        if (!strstr(err->message, needle))
                fail_msg("\"%s\" does not contain \"%s\"", err->message, needle);
        wire_envelope_free(fake_expect(f, WEIGHTD__V1__ENVELOPE__BODY_LOAD, 2));
        fake_expect_release(f, 3, 9);
}

typedef void (*SpoilSharded)(Sharded *x);

static void spoil_file_index(Sharded *x) {
        x->k.tensors[2].file = 2;
}
static void spoil_full_ndim(Sharded *x) {
        x->k.tensors[0].n_full_shape = 1;
}
static void spoil_part_outside(Sharded *x) {
        x->k.tensors[0].shard_start = 7;
}
static void spoil_other_dim(Sharded *x) {
        x->full[0][1] = 9;
}
static void spoil_dim_range(Sharded *x) {
        x->k.tensors[1].shard_dim = 1;
}
static void spoil_start_without_full(Sharded *x) {
        x->k.tensors[2].shard_start = 1;
}
static void spoil_derived_offset(Sharded *x) {
        x->k.tensors[1].offset = 190;
}

static void test_hostile_sharded(void **state) {
        static const struct {
                SpoilSharded spoil;
                const char *message;
        } cases[] = {
                { spoil_file_index, "tensor \"c.scale\": file 2 is out of range (2 files)" },
                { spoil_full_ndim, "tensor \"a.weight\": full_shape has 1 dimensions, shape 2, shard_dim 0" },
                { spoil_part_outside, "tensor \"a.weight\": part [7, +4) is outside dimension 0 of size 8" },
                { spoil_other_dim, "shape and full_shape differ in dimension 1" },
                { spoil_dim_range, "tensor \"b.bias\": full_shape has 1 dimensions, shape 1, shard_dim 1" },
                { spoil_start_without_full, "tensor \"c.scale\": a shard position without full_shape" },
                { spoil_derived_offset, "tensor \"b.bias\": 32 bytes at offset 190 end past the file's 200 bytes" },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                wd_load_options o = { .world = 2 };
                wd_lease *l = NULL;
                wd_error err;
                Sharded x;
                Fake f;
                wd_client *c = fake_connect(&f);

                sharded_init(&x);
                cases[i].spoil(&x);
                sharded_reply(&f, &x, 2, 9);
                component_close(&x.k);
                fake_reply(&f, 3, WD_OK, ""); /* to the Release */

                expect_refused(&f, wd_load_ex(c, "/models/m", "unet", &o, &l, &err), &l, &err, cases[i].message);
                wd_disconnect(c);
                fake_close(&f);
        }
}

static void test_load_options_checked(void **state) {
        static const wd_shard_rule rules[] = { { NULL, 0 } };
        const struct {
                wd_load_options o;
                const char *message;
        } cases[] = {
                { { .rank = 2, .world = 2 }, "rank 2 is not below world 2" },
                { { .n_rules = 1, .rules = rules }, "without a world" },
                { { .world = 2, .n_rules = 1 }, "rules is NULL" },
                { { .world = 2, .n_rules = 1, .rules = rules }, "rule 0 has no pattern" },
                { { .keep_host = 7 }, "keep_host 7" },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                wd_lease *l = NULL;
                wd_error err;
                Fake f;
                wd_client *c = fake_connect(&f);

                assert_int_equal(wd_load_ex(c, "/models/m", NULL, &cases[i].o, &l, &err), WD_INVALID_ARGUMENT);
                assert_non_null(strstr(err.message, cases[i].message));
                assert_int_equal(wd_prefetch_ex(c, "/models/m", NULL, &cases[i].o, NULL, &err), WD_INVALID_ARGUMENT);
                wd_disconnect(c);
                assert_null(fake_recv(&f)); /* nothing was sent */
                fake_close(&f);
        }
}

/* A reply that breaks one rule of the manifest: WD_PROTOCOL_ERROR naming
 * the culprit, the lease released, nothing left open or mapped, and the
 * connection still usable. */
typedef void (*Spoil)(Component *k);

static void hostile_load(Spoil spoil, size_t n_slabs, const char *needle) {
        wd_lease *l = NULL;
        wd_entry *entries = NULL;
        size_t n = 99;
        Component k;
        wd_error err;
        int fds[2];
        Fake f;
        wd_client *c = fake_connect(&f);

        component_init(&k, n_slabs);
        spoil(&k);
        component_fds(&k, fds);
        component_load_reply(&f, &k, 2, 9, fds, n_slabs);
        component_close(&k);
        fake_reply(&f, 3, WD_OK, ""); /* to the Release */

        expect_refused(&f, wd_load(c, "/models/m", "unet", &l, &err), &l, &err, needle);

        /* An empty ListReply: the connection carries on. */
        Weightd__V1__ListReply list = WEIGHTD__V1__LIST_REPLY__INIT;
        PbReply reply = WEIGHTD__V1__REPLY__INIT;
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_LIST;
        reply.list = &list;
        fake_send_reply(&f, 4, &reply, NULL, 0);
        assert_int_equal(wd_list(c, &entries, &n, &err), WD_OK);
        assert_int_equal(n, 0);
        wd_entries_free(entries, n);

        wd_disconnect(c);
        fake_close(&f);
}

static void spoil_offset(Component *k) {
        k->tensors[1].offset = 190; /* 32 bytes from 190 end past 200 */
}
static void spoil_offset_wrap(Component *k) {
        k->tensors[1].offset = UINT64_MAX - 8;
}
static void spoil_slab_index(Component *k) {
        k->tensors[2].slab = 2;
}
static void spoil_shape(Component *k) {
        k->shapes[0][1] = 9; /* F32 [4, 9] is 144 bytes, not 128 */
}
static void spoil_shape_overflow(Component *k) {
        k->shapes[0][0] = UINT64_MAX;
        k->shapes[0][1] = UINT64_MAX;
}
static void spoil_subbyte(Component *k) {
        k->shapes[5][0] = 5; /* F4 [5] is 20 bits */
}
static void spoil_duplicate(Component *k) {
        k->tensors[3].name = (char *) "a.weight";
}
static void spoil_dtype(Component *k) {
        k->tensors[3].dtype = (char *) "";
}
static void spoil_map_size(Component *k) {
        k->slabs[0].map_size = 2 * SLAB_MAP; /* beyond the memfd */
}
static void spoil_size(Component *k) {
        k->slabs[1].size = SLAB_MAP + 1;
}
static void spoil_fd_index_range(Component *k) {
        k->slabs[0].fd_index = 2;
}
static void spoil_fd_index_twice(Component *k) {
        k->slabs[0].fd_index = k->slabs[1].fd_index;
}
static void spoil_unsealed(Component *k) {
        close(k->fds[0]);
        k->fds[0] = memfd_with(k->content[0], SLAB_SIZE, SLAB_MAP, false);
}
static void spoil_escape(Component *k) {
        k->tensors[1].name = (char *) "evil\n\x1b[2Jname";
        k->tensors[1].offset = 190;
}

static void test_hostile_manifest(void **state) {
        static const struct {
                Spoil spoil;
                size_t n_slabs;
                const char *message;
        } cases[] = {
                { spoil_offset, 1, "tensor \"b.bias\": 32 bytes at offset 190 end past the file's 200 bytes" },
                { spoil_offset_wrap, 1, "tensor \"b.bias\"" },
                { spoil_slab_index, 2, "tensor \"c.scale\": slab 2 is out of range (2 files)" },
                { spoil_escape, 1, "tensor \"evil\\x0a\\x1b[2Jname\"" },
                { spoil_shape, 1, "tensor \"a.weight\": shape [4, 9] of F32 does not match 128 bytes" },
                { spoil_shape_overflow, 1, "tensor \"a.weight\": shape [18446744073709551615, 18446744073709551615]" },
                { spoil_subbyte, 2, "tensor \"f.packed\": shape [5] of F4" },
                { spoil_duplicate, 1, "tensor \"a.weight\" appears twice" },
                { spoil_dtype, 1, "tensor \"d.odd\": no dtype" },
                { spoil_map_size, 1, "model-00001.safetensors: map_size 8192 is over the descriptor's size 4096" },
                { spoil_size, 2, "model-00002.safetensors: size 4097 is over map_size 4096" },
                { spoil_fd_index_range, 2, "fd_index 2 is out of range" },
                { spoil_fd_index_twice, 2, "fd_index 0 is used twice" },
                { spoil_unsealed, 1, "not sealed against writes and growth" },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++)
                hostile_load(cases[i].spoil, cases[i].n_slabs, cases[i].message);
}

/* ---- LoadReply.table: the same component as columns ---- */

/* A TensorTable of a Component's tensors, encoded here column by column
 * from the Component's own fields (the dtypes in order of first use);
 * derived: with the file column (from Tensor.file). */
typedef struct Table {
        PbTensorTable t;
        char names[512];
        char *dtypes[8];
        uint8_t dtype[8], ndim[8];
        uint64_t dims[32], offset[8], nbytes[8];
        uint32_t slab[8], file[8];
        bool with_messages; /* also send the Tensor messages */
} Table;

static void table_from(Table *x, const Component *k, bool derived) {
        size_t o = 0, d = 0, n_dtypes = 0;

        memset(x, 0, sizeof(*x));
        x->t = (PbTensorTable) WEIGHTD__V1__TENSOR_TABLE__INIT;
        for (size_t i = 0; i < k->n_tensors; i++) {
                const PbTensor *t = &k->tensors[i];
                size_t j = 0;

                memcpy(x->names + o, t->name, strlen(t->name) + 1);
                o += strlen(t->name) + 1;
                while (j < n_dtypes && strcmp(x->dtypes[j], t->dtype) != 0)
                        j++;
                if (j == n_dtypes)
                        x->dtypes[n_dtypes++] = t->dtype;
                x->dtype[i] = (uint8_t) j;
                x->ndim[i] = (uint8_t) t->n_shape;
                for (size_t e = 0; e < t->n_shape; e++)
                        x->dims[d++] = t->shape[e];
                x->offset[i] = t->offset;
                x->nbytes[i] = t->nbytes;
                x->slab[i] = t->slab;
                x->file[i] = t->file;
        }
        x->t.count = (uint32_t) k->n_tensors;
        x->t.names = (ProtobufCBinaryData){ .len = o, .data = (uint8_t *) x->names };
        x->t.n_dtypes = n_dtypes;
        x->t.dtypes = x->dtypes;
        x->t.dtype = (ProtobufCBinaryData){ .len = k->n_tensors, .data = x->dtype };
        x->t.ndim = (ProtobufCBinaryData){ .len = k->n_tensors, .data = x->ndim };
        x->t.n_dims = d;
        x->t.dims = x->dims;
        x->t.n_offset = x->t.n_nbytes = x->t.n_slab = k->n_tensors;
        x->t.offset = x->offset;
        x->t.nbytes = x->nbytes;
        x->t.slab = x->slab;
        if (derived) {
                x->t.n_file = k->n_tensors;
                x->t.file = x->file;
        }
}

static void table_load_reply(Fake *f, Component *k, Table *x, PbSlab **files, size_t n_files, uint64_t id,
                             uint64_t lease, const int *fds, size_t n_fds) {
        Weightd__V1__LoadReply load = WEIGHTD__V1__LOAD_REPLY__INIT;
        PbReply reply = WEIGHTD__V1__REPLY__INIT;

        load.lease = lease;
        load.model = (char *) "/models/m";
        load.component = (char *) "unet";
        load.slabs = k->slab_ptrs;
        load.n_slabs = k->n_slabs;
        load.files = files;
        load.n_files = n_files;
        load.table = &x->t;
        if (x->with_messages) {
                load.tensors = k->tensor_ptrs;
                load.n_tensors = k->n_tensors;
        }
        load.bytes = n_files > 0 ? 123456 : SLAB_SIZE * k->n_slabs;
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_LOAD;
        reply.load = &load;
        fake_send_reply(f, id, &reply, fds, n_fds);
}

/* The table gives the manifest the message form gives (every field of
 * every tensor, compared with the Component's), names and shapes
 * included, for one and for two files. */
static void test_load_table(void **state) {
        for (size_t n_slabs = 1; n_slabs <= 2; n_slabs++) {
                wd_lease *l = NULL;
                wd_error err;
                Component k;
                Table x;
                int fds[2];
                Fake f;
                wd_client *c = fake_connect(&f);

                component_init(&k, n_slabs);
                table_from(&x, &k, false);
                component_fds(&k, fds);
                table_load_reply(&f, &k, &x, NULL, 0, 2, 77, fds, n_slabs);
                component_close(&k);

                assert_int_equal(wd_load(c, "/models/m", "unet", &l, &err), WD_OK);
                component_check_manifest(&k, wd_lease_manifest(l), true);
                wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_LOAD, 2));
                fake_reply(&f, 3, WD_OK, "");
                assert_int_equal(wd_release(l, &err), WD_OK);
                fake_expect_release(&f, 3, 77);
                wd_disconnect(c);
                fake_close(&f);
        }
}

/* A sharded or device reply's table has the file column: Tensor.file. */
static void test_load_table_files(void **state) {
        wd_load_options o = { .world = 1, .tensors = (const char *const[]){ "*" }, .n_tensors = 1 };
        const wd_manifest *m;
        wd_lease *l = NULL;
        wd_error err;
        Sharded s;
        Table x;
        Fake f;
        wd_client *c = fake_connect(&f);

        sharded_init(&s);
        /* A table carries no split tensors. */
        for (size_t i = 0; i < 2; i++) {
                s.k.tensors[i].full_shape = NULL;
                s.k.tensors[i].n_full_shape = 0;
                s.k.tensors[i].shard_start = 0;
        }
        s.k.tensors[3].file = 1;
        table_from(&x, &s.k, true);
        table_load_reply(&f, &s.k, &x, s.file_ptrs, 2, 2, 5, s.k.fds, 1);
        component_close(&s.k);

        assert_int_equal(wd_load_ex(c, "/models/m", "unet", &o, &l, &err), WD_OK);
        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_LOAD, 2));
        m = wd_lease_manifest(l);
        assert_int_equal(wd_manifest_n_files(m), 2);
        assert_int_equal(wd_manifest_n_tensors(m), s.k.n_tensors);
        for (size_t i = 0; i < s.k.n_tensors; i++) {
                const wd_tensor *t = wd_manifest_tensor(m, i);

                assert_string_equal(t->name, s.k.tensors[i].name);
                assert_int_equal(t->file, s.k.tensors[i].file);
                assert_null(t->full_shape);
                assert_memory_equal(t->data, s.k.content[0] + s.k.tensors[i].offset, s.k.tensors[i].nbytes);
        }
        assert_int_equal(wd_manifest_find(m, "d.odd")->file, 1);

        fake_reply(&f, 3, WD_OK, "");
        assert_int_equal(wd_release(l, &err), WD_OK);
        fake_expect_release(&f, 3, 5);
        wd_disconnect(c);
        fake_close(&f);
}

typedef void (*SpoilTable)(Table *x, Component *k);

static void spoil_t_count(Table *x, Component *k) {
        x->t.count = 4;
}
static void spoil_t_nbytes_short(Table *x, Component *k) {
        x->t.n_nbytes = 4;
}
static void spoil_t_dtype_long(Table *x, Component *k) {
        x->t.dtype.len = 6;
}
static void spoil_t_file_unasked(Table *x, Component *k) {
        x->t.n_file = x->t.count;
        x->t.file = x->file;
}
static void spoil_t_unterminated(Table *x, Component *k) {
        x->t.names.len--; /* the last name loses its NUL */
}
static void spoil_t_fewer_names(Table *x, Component *k) {
        x->t.names.len = strlen(x->names) + 1; /* only the first */
}
static void spoil_t_more_names(Table *x, Component *k) {
        memcpy(x->names + x->t.names.len, "extra", 6);
        x->t.names.len += 6;
}
static void spoil_t_ndim_sum(Table *x, Component *k) {
        x->ndim[2] = 1; /* the scalar c.scale now takes a dimension from dims */
}
static void spoil_t_dtype_index(Table *x, Component *k) {
        x->dtype[1] = 9;
}
static void spoil_t_both(Table *x, Component *k) {
        x->with_messages = true;
}
/* The rules both forms share, broken in the table: */
static void spoil_t_offset(Table *x, Component *k) {
        x->offset[1] = 190;
}
static void spoil_t_shape(Table *x, Component *k) {
        x->dims[1] = 9; /* a.weight [4, 9] */
}
static void spoil_t_duplicate(Table *x, Component *k) {
        Table y;

        k->tensors[3].name = (char *) "a.weight";
        table_from(&y, k, false);
        memcpy(x->names, y.names, y.t.names.len);
        x->t.names.len = y.t.names.len;
}
static void spoil_t_slab(Table *x, Component *k) {
        x->slab[2] = 2;
}
static void spoil_t_no_dtype(Table *x, Component *k) {
        x->dtypes[x->dtype[3]] = (char *) "";
}

static void hostile_table(SpoilTable spoil, const char *needle) {
        wd_lease *l = NULL;
        wd_error err;
        Component k;
        Table x;
        int fds[1];
        Fake f;
        wd_client *c = fake_connect(&f);

        component_init(&k, 1);
        table_from(&x, &k, false);
        spoil(&x, &k);
        component_fds(&k, fds);
        table_load_reply(&f, &k, &x, NULL, 0, 2, 9, fds, 1);
        component_close(&k);
        fake_reply(&f, 3, WD_OK, ""); /* to the Release */

        expect_refused(&f, wd_load(c, "/models/m", "unet", &l, &err), &l, &err, needle);
        wd_disconnect(c);
        fake_close(&f);
}

static void test_hostile_table(void **state) {
        static const struct {
                SpoilTable spoil;
                const char *message;
        } cases[] = {
                { spoil_t_count, "table: dtype has 5 entries for count 4" },
                { spoil_t_nbytes_short, "table: nbytes has 4 entries for count 5" },
                { spoil_t_dtype_long, "table: dtype has 6 entries for count 5" },
                { spoil_t_file_unasked, "table: file has 5 entries, none is allowed" },
                { spoil_t_unterminated, "table: names holds 4 NUL-terminated names for count 5" },
                { spoil_t_fewer_names, "table: names holds 1 NUL-terminated names for count 5" },
                { spoil_t_more_names, "table: names has 6 bytes after the last of count 5 names" },
                { spoil_t_ndim_sum, "table: ndim adds up to 7 dimensions, dims has 6" },
                { spoil_t_dtype_index, "table: tensor \"b.bias\": dtype index 9 is out of range (4 dtypes)" },
                { spoil_t_both, "the reply has both a table and 5 tensor messages" },
                { spoil_t_offset, "tensor \"b.bias\": 32 bytes at offset 190 end past the file's 200 bytes" },
                { spoil_t_shape, "tensor \"a.weight\": shape [4, 9] of F32 does not match 128 bytes" },
                { spoil_t_slab, "tensor \"c.scale\": slab 2 is out of range (1 files)" },
                { spoil_t_duplicate, "tensor \"a.weight\" appears twice" },
                { spoil_t_no_dtype, "tensor \"d.odd\": no dtype" },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++)
                hostile_table(cases[i].spoil, cases[i].message);
}

/* Fewer or more descriptors than slabs: the lease is released and the
 * connection given up, since its descriptor queue is out of step. */
static void fd_mismatch(size_t n_slabs, size_t n_fds, const char *needle) {
        wd_lease *l = NULL;
        Component k;
        wd_error err;
        int fds[3];
        Fake f;
        wd_client *c = fake_connect(&f);

        component_init(&k, 2);
        component_fds(&k, fds);
        fds[2] = k.fds[0];
        k.n_slabs = n_slabs;
        k.n_tensors = 5;
        k.slabs[0].fd_index = 0;
        component_load_reply(&f, &k, 2, 11, fds, n_fds);
        k.n_slabs = 2;
        component_close(&k);
        fake_reply(&f, 3, WD_OK, "");

        assert_int_equal(wd_load(c, "/models/m", "unet", &l, &err), WD_PROTOCOL_ERROR);
        assert_non_null(strstr(err.message, needle));
        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_LOAD, 2));
        fake_expect_release(&f, 3, 11);
        assert_null(fake_recv(&f)); /* shut down */

        assert_int_equal(wd_evict(c, "/models/m", "unet", &err), WD_UNAVAILABLE);
        assert_non_null(strstr(err.message, "connection is broken: "));
        assert_non_null(strstr(err.message, needle));
        wd_disconnect(c);
        fake_close(&f);
}

static void test_fd_count_mismatch(void **state) {
        fd_mismatch(2, 1, "lists 2 slabs but 1 descriptors came with it");
        fd_mismatch(1, 2, "lists 1 slabs but 2 descriptors came with it");
        fd_mismatch(1, 3, "lists 1 slabs but 3 descriptors came with it");
        fd_mismatch(2, 0, "lists 2 slabs but 0 descriptors came with it");
}

/* A frame the client must not accept breaks the connection. */
static void hostile_frame(Hostile send, int code, const char *needle) {
        wd_entry *entries = NULL;
        size_t n = 0;
        wd_error err;
        Fake f;
        wd_client *c = fake_connect(&f);

        send(&f);
        assert_int_equal(wd_list(c, &entries, &n, &err), code);
        assert_null(entries);
        if (!strstr(err.message, needle))
                fail_msg("\"%s\" does not contain \"%s\"", err.message, needle);
        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_LIST, 2));

        /* Every later call says why. */
        assert_int_equal(wd_pin(c, "/models/m", NULL, &err), WD_UNAVAILABLE);
        assert_true(strncmp(err.message, "connection is broken: ", 22) == 0);
        assert_non_null(strstr(err.message, needle));
        wd_disconnect(c);
        assert_null(fake_recv(&f));
        fake_close(&f);
}

static void send_oversized(Fake *f) {
        const uint8_t header[4] = { 0x00, 0x00, 0x00, 0x12 }; /* 288 MiB */

        fake_send_raw(f, header, sizeof(header), NULL, 0);
}
static void send_garbage(Fake *f) {
        const uint8_t frame[] = { 4, 0, 0, 0, 0xff, 0xff, 0xff, 0xff };

        fake_send_raw(f, frame, sizeof(frame), NULL, 0);
}
static void send_unknown_id(Fake *f) {
        fake_reply(f, 1234, WD_OK, "");
}
static void send_progress_unknown_id(Fake *f) {
        fake_progress(f, 99, 1, 2);
}
static void send_request(Fake *f) {
        Weightd__V1__ComponentRef ref = WEIGHTD__V1__COMPONENT_REF__INIT;
        WireEnvelope env = WEIGHTD__V1__ENVELOPE__INIT;

        env.id = 2;
        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_EVICT;
        env.evict = &ref;
        fake_send(f, &env);
}
static void send_empty(Fake *f) {
        WireEnvelope env = WEIGHTD__V1__ENVELOPE__INIT;

        env.id = 2;
        fake_send(f, &env);
}
static void send_wrong_result(Fake *f) {
        Weightd__V1__StatusReply status = WEIGHTD__V1__STATUS_REPLY__INIT;
        PbReply reply = WEIGHTD__V1__REPLY__INIT;

        reply.result_case = WEIGHTD__V1__REPLY__RESULT_STATUS;
        reply.status = &status;
        fake_send_reply(f, 2, &reply, NULL, 0);
}
static void send_fd_with_list(Fake *f) {
        Weightd__V1__ListReply list = WEIGHTD__V1__LIST_REPLY__INIT;
        PbReply reply = WEIGHTD__V1__REPLY__INIT;
        int fd = memfd_create("stray", MFD_CLOEXEC);

        reply.result_case = WEIGHTD__V1__REPLY__RESULT_LIST;
        reply.list = &list;
        fake_send_reply(f, 2, &reply, &fd, 1);
        close(fd);
}
static void send_cut_frame(Fake *f) {
        const uint8_t frame[] = { 100, 0, 0, 0, 0x08, 0x02 };

        fake_send_raw(f, frame, sizeof(frame), NULL, 0);
        shutdown(f->fd, SHUT_WR);
}
static void send_eof(Fake *f) {
        shutdown(f->fd, SHUT_WR);
}
static void send_dropped(Fake *f) {
        fake_reply(f, 0, WD_UNAVAILABLE, "the daemon is stopping");
        shutdown(f->fd, SHUT_WR);
}

static void test_hostile_frames(void **state) {
        hostile_frame(send_oversized, WD_PROTOCOL_ERROR,
                      "announced a frame of 301989888 bytes, over the client's limit of 268435456");
        hostile_frame(send_garbage, WD_PROTOCOL_ERROR, "frame of 4 bytes that does not decode");
        hostile_frame(send_unknown_id, WD_PROTOCOL_ERROR, "reply for unknown request 1234");
        hostile_frame(send_progress_unknown_id, WD_PROTOCOL_ERROR, "Progress frame with id 99");
        hostile_frame(send_request, WD_PROTOCOL_ERROR, "Evict frame with id 2");
        hostile_frame(send_empty, WD_PROTOCOL_ERROR, "empty frame with id 2");
        hostile_frame(send_wrong_result, WD_PROTOCOL_ERROR, "answered List with a StatusReply instead of a ListReply");
        hostile_frame(send_fd_with_list, WD_PROTOCOL_ERROR, "1 descriptors with a frame that refers to none");
        hostile_frame(send_cut_frame, WD_UNAVAILABLE, "daemon closed the connection in the middle of a frame");
        hostile_frame(send_eof, WD_UNAVAILABLE, "daemon closed the connection");
        hostile_frame(send_dropped, WD_UNAVAILABLE, "the daemon is stopping");
}

/* Writing to a daemon that left must not raise SIGPIPE. */
static void test_daemon_gone(void **state) {
        wd_error err;
        Fake f;
        wd_client *c = fake_connect(&f);

        close(f.fd);
        f.fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
        assert_int_equal(wd_evict(c, "/models/m", "", &err), WD_UNAVAILABLE);
        assert_string_equal(err.message, "daemon closed the connection");
        assert_int_equal(wd_unpin(c, "/models/m", "", &err), WD_UNAVAILABLE);
        assert_string_equal(err.message, "connection is broken: daemon closed the connection");
        wd_disconnect(c);
        fake_close(&f);
}

static void test_daemon_codes(void **state) {
        wd_error err = { .code = 0 };
        Fake f;
        wd_client *c = fake_connect(&f);

        fake_reply(&f, 2, WD_BUSY, "/models/m unet: 2 leases hold it");
        assert_int_equal(wd_evict(c, "/models/m", "unet", &err), WD_BUSY);
        assert_string_equal(err.message, "/models/m unet: 2 leases hold it");
        WireEnvelope *env = fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_EVICT, 2);
        assert_string_equal(env->evict->component, "unet");
        wire_envelope_free(env);

        /* A code this client does not know keeps its number and message. */
        fake_reply(&f, 3, 99, "something new");
        assert_int_equal(wd_pin(c, "/models/m", NULL, &err), 99);
        assert_int_equal(err.code, 99);
        assert_string_equal(err.message, "something new");
        assert_string_equal(wd_code_name(99), "UNKNOWN");
        env = fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_PIN, 3);
        assert_string_equal(env->pin->component, "");
        wire_envelope_free(env);

        /* No message: the code's name stands in. */
        fake_reply(&f, 4, WD_NOT_FOUND, "");
        assert_int_equal(wd_unpin(c, "/models/m", NULL, &err), WD_NOT_FOUND);
        assert_string_equal(err.message, "the daemon answered NOT_FOUND");
        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_UNPIN, 4));

        /* An error reply is not a broken connection. */
        fake_reply(&f, 5, WD_OK, "");
        assert_int_equal(wd_unpin(c, "/models/m", NULL, &err), WD_OK);
        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_UNPIN, 5));

        assert_int_equal(wd_load(c, NULL, NULL, &(wd_lease *){ NULL }, &err), WD_INVALID_ARGUMENT);
        wd_disconnect(c);
        fake_close(&f);
}

typedef struct ProgressLog {
        uint64_t done[8], total[8];
        size_t n;
        size_t stop_at; /* return non-zero on this call (1-based); 0: never */
} ProgressLog;

static int on_progress(uint64_t done, uint64_t total, void *userdata) {
        ProgressLog *p = userdata;

        if (p->n < ELEMENTSOF(p->done)) {
                p->done[p->n] = done;
                p->total[p->n] = total;
        }
        p->n++;
        return p->n == p->stop_at;
}

static void fake_prefetch_reply(Fake *f, uint64_t id, uint64_t bytes, bool resident) {
        Weightd__V1__LoadReply load = WEIGHTD__V1__LOAD_REPLY__INIT;
        PbReply reply = WEIGHTD__V1__REPLY__INIT;

        load.bytes = bytes;
        load.was_resident = resident;
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_LOAD;
        reply.load = &load;
        fake_send_reply(f, id, &reply, NULL, 0);
}

static void test_prefetch_progress(void **state) {
        ProgressLog p = { 0 };
        wd_prefetch_result res = { 0 };
        wd_error err;
        Fake f;
        wd_client *c = fake_connect(&f);

        fake_progress(&f, 2, 100, 1000);
        fake_progress(&f, 2, 1000, 1000);
        fake_prefetch_reply(&f, 2, 1000, false);
        assert_int_equal(wd_prefetch(c, "/models/m", "vae", on_progress, &p, &res, &err), WD_OK);
        assert_int_equal(p.n, 2);
        assert_int_equal(p.done[0], 100);
        assert_int_equal(p.done[1], 1000);
        assert_int_equal(p.total[1], 1000);
        assert_int_equal(res.bytes, 1000);
        assert_false(res.was_resident);

        WireEnvelope *env = fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_PREFETCH, 2);
        assert_true(env->prefetch->progress);
        assert_string_equal(env->prefetch->component, "vae");
        wire_envelope_free(env);

        /* Without a callback no progress is asked for; ret may be NULL. */
        fake_prefetch_reply(&f, 3, 1000, true);
        assert_int_equal(wd_prefetch(c, "/models/m", "vae", NULL, NULL, NULL, &err), WD_OK);
        env = fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_PREFETCH, 3);
        assert_false(env->prefetch->progress);
        wire_envelope_free(env);

        wd_disconnect(c);
        fake_close(&f);
}

/* The callback cancels: the client sends Cancel and waits for both
 * replies, in either order. */
static void prefetch_cancel(bool cancel_reply_first) {
        ProgressLog p = { .stop_at = 2 };
        wd_prefetch_result res = { .bytes = 7 };
        wd_error err;
        Fake f;
        wd_client *c = fake_connect(&f);

        fake_progress(&f, 2, 10, 100);
        fake_progress(&f, 2, 20, 100);
        fake_progress(&f, 2, 30, 100); /* already on its way: not reported */
        if (cancel_reply_first)
                fake_reply(&f, 3, WD_OK, "");
        fake_reply(&f, 2, WD_CANCELLED, "cancelled");
        if (!cancel_reply_first)
                fake_reply(&f, 3, WD_OK, "");

        assert_int_equal(wd_prefetch(c, "/models/m", "unet", on_progress, &p, &res, &err), WD_CANCELLED);
        assert_int_equal(err.code, WD_CANCELLED);
        assert_int_equal(p.n, 2);
        assert_int_equal(res.bytes, 7);

        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_PREFETCH, 2));
        WireEnvelope *env = fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_CANCEL, 3);
        assert_int_equal(env->cancel->target, 2);
        wire_envelope_free(env);

        /* Both replies were consumed: the next call is in step. */
        fake_reply(&f, 4, WD_OK, "");
        assert_int_equal(wd_evict(c, "/models/m", "unet", &err), WD_OK);
        wd_disconnect(c);
        fake_close(&f);
}

static void test_prefetch_cancel(void **state) {
        prefetch_cancel(false);
        prefetch_cancel(true);
}

static void test_list_status(void **state) {
        Weightd__V1__Entry e[2] = { WEIGHTD__V1__ENTRY__INIT, WEIGHTD__V1__ENTRY__INIT };
        Weightd__V1__Entry *ep[2] = { &e[0], &e[1] };
        Weightd__V1__ListReply list = WEIGHTD__V1__LIST_REPLY__INIT;
        Weightd__V1__StatusReply status = WEIGHTD__V1__STATUS_REPLY__INIT;
        PbReply reply = WEIGHTD__V1__REPLY__INIT;
        char *roots[] = { (char *) "/models", (char *) "/scratch/models" };
        wd_entry *entries = NULL;
        wd_status *s = NULL;
        size_t n = 0;
        wd_error err;
        Fake f;
        wd_client *c = fake_connect(&f);

        e[0].model = (char *) "/models/a";
        e[0].component = (char *) "unet";
        e[0].tier = (char *) "host";
        e[0].state = (char *) "resident";
        e[0].bytes = 1 << 30;
        e[0].leases = 3;
        e[0].pinned = true;
        e[0].files = 2;
        e[0].idle_ms = 5;
        e[1].model = (char *) "/models/b.safetensors";
        e[1].tier = (char *) "host";
        e[1].state = (char *) "loading";
        list.entries = ep;
        list.n_entries = 2;
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_LIST;
        reply.list = &list;
        fake_send_reply(&f, 2, &reply, NULL, 0);

        assert_int_equal(wd_list(c, &entries, &n, &err), WD_OK);
        assert_int_equal(n, 2);
        assert_string_equal(entries[0].model, "/models/a");
        assert_string_equal(entries[0].component, "unet");
        assert_string_equal(entries[0].state, "resident");
        assert_int_equal(entries[0].bytes, 1 << 30);
        assert_int_equal(entries[0].leases, 3);
        assert_true(entries[0].pinned);
        assert_int_equal(entries[0].files, 2);
        assert_int_equal(entries[0].idle_ms, 5);
        assert_string_equal(entries[1].model, "/models/b.safetensors");
        assert_string_equal(entries[1].component, "");
        assert_string_equal(entries[1].state, "loading");
        assert_false(entries[1].pinned);
        wd_entries_free(entries, n);

        status.version = (char *) "0.1.0";
        status.pid = 4321;
        status.uptime_ms = 1000;
        status.host_budget_bytes = 64ull << 30;
        status.host_used_bytes = 3ull << 30;
        status.storage_read_bytes = 12345;
        status.leases = 4;
        status.connections = 2;
        status.entries = 2;
        status.evictions = 1;
        status.model_roots = roots;
        status.n_model_roots = 2;
        status.socket = (char *) "/run/weightd/weightd.sock";
        status.hugetlb = true;
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_STATUS;
        reply.status = &status;
        fake_send_reply(&f, 3, &reply, NULL, 0);

        assert_int_equal(wd_status_get(c, &s, &err), WD_OK);
        assert_string_equal(s->version, "0.1.0");
        assert_int_equal(s->pid, 4321);
        assert_int_equal(s->host_budget_bytes, 64ull << 30);
        assert_int_equal(s->storage_read_bytes, 12345);
        assert_int_equal(s->leases, 4);
        assert_int_equal(s->n_model_roots, 2);
        assert_string_equal(s->model_roots[0], "/models");
        assert_string_equal(s->model_roots[1], "/scratch/models");
        assert_string_equal(s->socket, "/run/weightd/weightd.sock");
        assert_true(s->hugetlb);
        wd_status_free(s);

        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_LIST, 2));
        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_STATUS, 3));
        wd_disconnect(c);
        fake_close(&f);
}

/* ---- the cluster tier ---- */

/* The next frame the client sent, decoded by protobuf-c's own unpack
 * (not the library's wire_unpack()): what the client packed, read back by
 * the generated code alone.  Free with weightd__v1__envelope__free_unpacked(). */
static Weightd__V1__Envelope *fake_expect_pb(Fake *f, Weightd__V1__Envelope__BodyCase body, uint64_t id) {
        for (;;) {
                const uint8_t *p;
                size_t len;
                int r = wire_reader_next(&f->reader, &p, &len);

                if (r > 0) {
                        Weightd__V1__Envelope *env = weightd__v1__envelope__unpack(NULL, len, p);

                        assert_non_null(env);
                        assert_int_equal(env->body_case, body);
                        assert_int_equal(env->id, id);
                        return env;
                }
                assert_int_equal(r, 0);
                assert_true(wire_reader_recv(&f->reader, f->fd) > 0);
        }
}

typedef struct NodeLoad {
        const char *node, *state, *message;
        uint64_t read, received, sent;
} NodeLoad;

static void fake_cluster_prefetch_reply(Fake *f, uint64_t id, uint64_t bytes, const NodeLoad *nodes, size_t n) {
        Weightd__V1__ClusterNodeLoad v[8];
        Weightd__V1__ClusterNodeLoad *vp[8];
        Weightd__V1__LoadReply load = WEIGHTD__V1__LOAD_REPLY__INIT;
        PbReply reply = WEIGHTD__V1__REPLY__INIT;

        assert_true(n <= ELEMENTSOF(v));
        for (size_t i = 0; i < n; i++) {
                weightd__v1__cluster_node_load__init(&v[i]);
                v[i].node = (char *) nodes[i].node;
                v[i].state = (char *) nodes[i].state;
                v[i].message = (char *) nodes[i].message;
                v[i].storage_read_bytes = nodes[i].read;
                v[i].peer_received_bytes = nodes[i].received;
                v[i].peer_sent_bytes = nodes[i].sent;
                vp[i] = &v[i];
        }
        load.model = (char *) "/models/m";
        load.bytes = bytes;
        load.target = (char *) "host";
        load.cluster_nodes = vp;
        load.n_cluster_nodes = n;
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_LOAD;
        reply.load = &load;
        fake_send_reply(f, id, &reply, NULL, 0);
}

static const NodeLoad three_nodes[] = {
        { "a", "ok", "", 1000, 2000, 0 },
        { "b", "resident", "", 0, 0, 1500 },
        { "c", "failed", "c: reading from b: connection reset", 0, 500, 0 },
};

static void test_prefetch_cluster(void **state) {
        const char *const names[] = { "a", "b", "c" };
        wd_cluster_prefetch_result *res = NULL;
        ProgressLog p = { 0 };
        wd_error err;
        Fake f;
        wd_client *c = fake_connect(&f);

        /* Progress is the cluster's bytes, passed on as the daemon says. */
        fake_progress(&f, 2, 1000, 3000);
        fake_progress(&f, 2, 3000, 3000);
        fake_cluster_prefetch_reply(&f, 2, 3000, three_nodes, 3);
        assert_int_equal(wd_prefetch_cluster(c, "/models/m", "unet", names, 3, on_progress, &p, &res, &err), WD_OK);
        assert_int_equal(p.n, 2);
        assert_int_equal(p.done[0], 1000);
        assert_int_equal(p.total[0], 3000);
        assert_int_equal(p.done[1], 3000);
        assert_non_null(res);
        assert_int_equal(res->bytes, 3000);
        assert_false(res->was_resident);
        assert_int_equal(res->n_nodes, 3);
        for (size_t i = 0; i < 3; i++) {
                const wd_cluster_node_load *x = &res->nodes[i];

                assert_string_equal(x->node, three_nodes[i].node);
                assert_string_equal(x->state, three_nodes[i].state);
                assert_string_equal(x->message, three_nodes[i].message);
                assert_int_equal(x->storage_read_bytes, three_nodes[i].read);
                assert_int_equal(x->peer_received_bytes, three_nodes[i].received);
                assert_int_equal(x->peer_sent_bytes, three_nodes[i].sent);
        }
        wd_cluster_prefetch_result_free(res);

        /* The request: a Prefetch for the host tier, no shard, the cluster
         * flag and the names in the caller's order. */
        Weightd__V1__Envelope *env = fake_expect_pb(&f, WEIGHTD__V1__ENVELOPE__BODY_PREFETCH, 2);
        const Weightd__V1__LoadRequest *lr = env->prefetch;
        assert_string_equal(lr->model, "/models/m");
        assert_string_equal(lr->component, "unet");
        assert_string_equal(lr->target, "");
        assert_null(lr->shard);
        assert_int_equal(lr->keep_host, WEIGHTD__V1__KEEP_HOST__KEEP_HOST_DEFAULT);
        assert_true(lr->progress);
        assert_true(lr->cluster);
        assert_int_equal(lr->n_nodes, 3);
        for (size_t i = 0; i < 3; i++)
                assert_string_equal(lr->nodes[i], names[i]);
        weightd__v1__envelope__free_unpacked(env, NULL);

        /* No names: every node.  No callback: no progress asked; ret may
         * be NULL. */
        fake_cluster_prefetch_reply(&f, 3, 3000, three_nodes, 1);
        assert_int_equal(wd_prefetch_cluster(c, "/models/m", NULL, NULL, 0, NULL, NULL, NULL, &err), WD_OK);
        env = fake_expect_pb(&f, WEIGHTD__V1__ENVELOPE__BODY_PREFETCH, 3);
        assert_string_equal(env->prefetch->component, "");
        assert_true(env->prefetch->cluster);
        assert_false(env->prefetch->progress);
        assert_int_equal(env->prefetch->n_nodes, 0);
        weightd__v1__envelope__free_unpacked(env, NULL);

        /* A plain prefetch still sends no cluster fields. */
        fake_prefetch_reply(&f, 4, 3000, true);
        assert_int_equal(wd_prefetch(c, "/models/m", "unet", NULL, NULL, NULL, &err), WD_OK);
        env = fake_expect_pb(&f, WEIGHTD__V1__ENVELOPE__BODY_PREFETCH, 4);
        assert_false(env->prefetch->cluster);
        assert_int_equal(env->prefetch->n_nodes, 0);
        weightd__v1__envelope__free_unpacked(env, NULL);

        wd_disconnect(c);
        fake_close(&f);
}

/* What the library refuses itself, the daemon's refusals, and replies that
 * break the rules: none of them breaks the connection. */
static void test_prefetch_cluster_refused(void **state) {
        const char *const with_null[] = { "a", NULL };
        const NodeLoad nameless[] = { { "", "ok", "", 0, 0, 0 } };
        const NodeLoad stateless[] = { { "a", "", "", 0, 0, 0 } };
        wd_cluster_prefetch_result *res = (wd_cluster_prefetch_result *) &res; /* not written on failure */
        wd_cluster_prefetch_result *const untouched = res;
        wd_error err;
        Fake f;
        wd_client *c = fake_connect(&f);

        /* Nothing is sent for these: the next request still has id 2. */
        assert_int_equal(wd_prefetch_cluster(c, "/models/m", NULL, with_null, 2, NULL, NULL, &res, &err),
                         WD_INVALID_ARGUMENT);
        assert_non_null(strstr(err.message, "node 1 is NULL"));
        assert_int_equal(wd_prefetch_cluster(c, "/models/m", NULL, NULL, 2, NULL, NULL, &res, &err),
                         WD_INVALID_ARGUMENT);
        assert_int_equal(wd_prefetch_cluster(c, NULL, NULL, NULL, 0, NULL, NULL, &res, &err), WD_INVALID_ARGUMENT);
        assert_ptr_equal(res, untouched);

        /* The daemon's code and message come through. */
        fake_reply(&f, 2, WD_UNSUPPORTED, "cluster prefetch: this daemon has no [cluster]");
        assert_int_equal(wd_prefetch_cluster(c, "/models/m", NULL, NULL, 0, NULL, NULL, &res, &err), WD_UNSUPPORTED);
        assert_string_equal(err.message, "cluster prefetch: this daemon has no [cluster]");
        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_PREFETCH, 2));

        /* A daemon older than the tier answers as for a plain prefetch. */
        fake_prefetch_reply(&f, 3, 3000, false);
        assert_int_equal(wd_prefetch_cluster(c, "/models/m", NULL, NULL, 0, NULL, NULL, &res, &err), WD_UNSUPPORTED);
        assert_non_null(strstr(err.message, "older than the cluster tier"));
        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_PREFETCH, 3));

        fake_cluster_prefetch_reply(&f, 4, 3000, nameless, 1);
        assert_int_equal(wd_prefetch_cluster(c, "/models/m", NULL, NULL, 0, NULL, NULL, &res, &err),
                         WD_PROTOCOL_ERROR);
        assert_string_equal(err.message, "daemon's cluster prefetch: node 0 has no name");
        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_PREFETCH, 4));

        fake_cluster_prefetch_reply(&f, 5, 3000, stateless, 1);
        assert_int_equal(wd_prefetch_cluster(c, "/models/m", NULL, NULL, 0, NULL, NULL, &res, &err),
                         WD_PROTOCOL_ERROR);
        assert_string_equal(err.message, "daemon's cluster prefetch: node \"a\": no state");
        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_PREFETCH, 5));
        assert_ptr_equal(res, untouched);

        fake_reply(&f, 6, WD_OK, "");
        assert_int_equal(wd_evict(c, "/models/m", NULL, &err), WD_OK);
        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_EVICT, 6));
        wd_disconnect(c);
        fake_close(&f);
}

/* The callback cancels a cluster prefetch as any other. */
static void test_prefetch_cluster_cancel(void **state) {
        ProgressLog p = { .stop_at = 1 };
        wd_cluster_prefetch_result *res = NULL;
        wd_error err;
        Fake f;
        wd_client *c = fake_connect(&f);

        fake_progress(&f, 2, 10, 100);
        fake_reply(&f, 2, WD_CANCELLED, "cancelled");
        fake_reply(&f, 3, WD_OK, "");
        assert_int_equal(wd_prefetch_cluster(c, "/models/m", NULL, NULL, 0, on_progress, &p, &res, &err),
                         WD_CANCELLED);
        assert_null(res);
        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_PREFETCH, 2));
        WireEnvelope *env = fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_CANCEL, 3);
        assert_int_equal(env->cancel->target, 2);
        wire_envelope_free(env);
        wd_disconnect(c);
        fake_close(&f);
}

/* A ClusterReply of two nodes: this one and a peer. */
typedef struct FakeCluster {
        Weightd__V1__ClusterNode nodes[2];
        Weightd__V1__ClusterNode *ptrs[2];
        Weightd__V1__ClusterReply reply;
} FakeCluster;

static void fake_cluster_init(FakeCluster *k) {
        weightd__v1__cluster_reply__init(&k->reply);
        for (size_t i = 0; i < 2; i++) {
                weightd__v1__cluster_node__init(&k->nodes[i]);
                k->ptrs[i] = &k->nodes[i];
        }
        k->nodes[0].name = (char *) "a";
        k->nodes[0].address = (char *) "10.0.0.1:7411";
        k->nodes[0].state = (char *) "self";
        k->nodes[0].generation = UINT64_C(0xfedcba9876543210);
        k->nodes[0].since_ms = 60000;
        k->nodes[1].name = (char *) "b";
        k->nodes[1].address = (char *) "10.0.0.2:7411";
        k->nodes[1].state = (char *) "down";
        k->nodes[1].generation = 7;
        k->nodes[1].rtt_us = 250;
        k->nodes[1].sent_bytes = 1ull << 33;
        k->nodes[1].received_bytes = 12345;
        k->nodes[1].last_error = (char *) "connect: connection refused";
        k->nodes[1].since_ms = 5000;
        k->reply.enabled = true;
        k->reply.node = (char *) "a";
        k->reply.generation = UINT64_C(0xfedcba9876543210);
        k->reply.nodes = k->ptrs;
        k->reply.n_nodes = 2;
        k->reply.peer_sent_bytes = 1ull << 33;
        k->reply.peer_received_bytes = 12345;
        k->reply.storage_saved_bytes = 12000;
}

static void fake_cluster_reply(Fake *f, uint64_t id, Weightd__V1__ClusterReply *cr) {
        PbReply reply = WEIGHTD__V1__REPLY__INIT;

        reply.result_case = WEIGHTD__V1__REPLY__RESULT_CLUSTER;
        reply.cluster = cr;
        fake_send_reply(f, id, &reply, NULL, 0);
}

static void check_cluster_info(const wd_cluster_info *ci) {
        assert_non_null(ci);
        assert_true(ci->enabled);
        assert_string_equal(ci->node, "a");
        assert_true(ci->generation == UINT64_C(0xfedcba9876543210));
        assert_int_equal(ci->peer_sent_bytes, 1ull << 33);
        assert_int_equal(ci->peer_received_bytes, 12345);
        assert_int_equal(ci->storage_saved_bytes, 12000);
        assert_int_equal(ci->n_nodes, 2);
        assert_string_equal(ci->nodes[0].name, "a");
        assert_string_equal(ci->nodes[0].address, "10.0.0.1:7411");
        assert_string_equal(ci->nodes[0].state, "self");
        assert_string_equal(ci->nodes[0].last_error, "");
        assert_true(ci->nodes[0].generation == UINT64_C(0xfedcba9876543210));
        assert_int_equal(ci->nodes[0].since_ms, 60000);
        assert_string_equal(ci->nodes[1].name, "b");
        assert_string_equal(ci->nodes[1].state, "down");
        assert_int_equal(ci->nodes[1].generation, 7);
        assert_int_equal(ci->nodes[1].rtt_us, 250);
        assert_int_equal(ci->nodes[1].sent_bytes, 1ull << 33);
        assert_int_equal(ci->nodes[1].received_bytes, 12345);
        assert_string_equal(ci->nodes[1].last_error, "connect: connection refused");
        assert_int_equal(ci->nodes[1].since_ms, 5000);
}

static void test_cluster(void **state) {
        Weightd__V1__ClusterReply off = WEIGHTD__V1__CLUSTER_REPLY__INIT;
        wd_cluster_info *ci = NULL;
        FakeCluster k;
        wd_error err;
        Fake f;
        wd_client *c = fake_connect(&f);

        fake_cluster_init(&k);
        fake_cluster_reply(&f, 2, &k.reply);
        assert_int_equal(wd_cluster(c, &ci, &err), WD_OK);
        check_cluster_info(ci);
        wd_cluster_free(ci);
        Weightd__V1__Envelope *env = fake_expect_pb(&f, WEIGHTD__V1__ENVELOPE__BODY_CLUSTER, 2);
        assert_non_null(env->cluster);
        weightd__v1__envelope__free_unpacked(env, NULL);

        /* No [cluster]: enabled 0 and nothing else, whatever came along. */
        off.node = (char *) "stray";
        fake_cluster_reply(&f, 3, &off);
        assert_int_equal(wd_cluster(c, &ci, &err), WD_OK);
        assert_false(ci->enabled);
        assert_null(ci->node);
        assert_int_equal(ci->n_nodes, 0);
        wd_cluster_free(ci);
        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_CLUSTER, 3));

        /* A daemon older than the tier does not know the request. */
        fake_reply(&f, 4, WD_INVALID_ARGUMENT, "unknown request");
        assert_int_equal(wd_cluster(c, &ci, &err), WD_INVALID_ARGUMENT);
        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_CLUSTER, 4));

        /* Replies that break the rules. */
        k.nodes[1].state = (char *) "";
        fake_cluster_reply(&f, 5, &k.reply);
        assert_int_equal(wd_cluster(c, &ci, &err), WD_PROTOCOL_ERROR);
        assert_string_equal(err.message, "daemon's cluster: node \"b\": no state");
        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_CLUSTER, 5));
        k.nodes[1].state = (char *) "up";
        k.nodes[0].name = (char *) "";
        fake_cluster_reply(&f, 6, &k.reply);
        assert_int_equal(wd_cluster(c, &ci, &err), WD_PROTOCOL_ERROR);
        assert_string_equal(err.message, "daemon's cluster: node 0 has no name");
        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_CLUSTER, 6));
        k.nodes[0].name = (char *) "a";
        k.reply.node = (char *) "";
        fake_cluster_reply(&f, 7, &k.reply);
        assert_int_equal(wd_cluster(c, &ci, &err), WD_PROTOCOL_ERROR);
        assert_string_equal(err.message, "daemon's cluster: no name for this node");
        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_CLUSTER, 7));

        assert_int_equal(wd_cluster(NULL, &ci, &err), WD_INVALID_ARGUMENT);
        assert_int_equal(wd_cluster(c, NULL, &err), WD_INVALID_ARGUMENT);

        /* Another result breaks the connection, as for every request. */
        fake_prefetch_reply(&f, 8, 1, false);
        assert_int_equal(wd_cluster(c, &ci, &err), WD_PROTOCOL_ERROR);
        assert_string_equal(err.message, "the daemon answered Cluster with a LoadReply instead of a ClusterReply");
        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_CLUSTER, 8));
        wd_disconnect(c);
        fake_close(&f);
}

static void fake_status_reply(Fake *f, uint64_t id, Weightd__V1__ClusterReply *cr) {
        Weightd__V1__StatusReply status = WEIGHTD__V1__STATUS_REPLY__INIT;
        char *roots[] = { (char *) "/models" };
        PbReply reply = WEIGHTD__V1__REPLY__INIT;

        status.version = (char *) "0.2.0";
        status.model_roots = roots;
        status.n_model_roots = 1;
        status.socket = (char *) "/run/weightd/weightd.sock";
        status.gpu = (char *) "ok";
        status.cluster = cr;
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_STATUS;
        reply.status = &status;
        fake_send_reply(f, id, &reply, NULL, 0);
}

/* The status carries the cluster where the daemon has one, and NULL
 * otherwise; the rest of the status is intact either way. */
static void test_status_cluster(void **state) {
        Weightd__V1__ClusterReply off = WEIGHTD__V1__CLUSTER_REPLY__INIT;
        wd_status *s = NULL;
        FakeCluster k;
        wd_error err;
        Fake f;
        wd_client *c = fake_connect(&f);

        fake_cluster_init(&k);
        fake_status_reply(&f, 2, &k.reply);
        assert_int_equal(wd_status_get(c, &s, &err), WD_OK);
        check_cluster_info(s->cluster);
        assert_string_equal(s->version, "0.2.0");
        assert_string_equal(s->model_roots[0], "/models");
        assert_string_equal(s->socket, "/run/weightd/weightd.sock");
        assert_string_equal(s->gpu, "ok");
        wd_status_free(s);

        fake_status_reply(&f, 3, &off);
        assert_int_equal(wd_status_get(c, &s, &err), WD_OK);
        assert_null(s->cluster);
        assert_string_equal(s->model_roots[0], "/models");
        wd_status_free(s);

        fake_status_reply(&f, 4, NULL);
        assert_int_equal(wd_status_get(c, &s, &err), WD_OK);
        assert_null(s->cluster);
        wd_status_free(s);

        k.nodes[1].name = (char *) "";
        fake_status_reply(&f, 5, &k.reply);
        assert_int_equal(wd_status_get(c, &s, &err), WD_PROTOCOL_ERROR);
        assert_string_equal(err.message, "daemon's cluster: node 1 has no name");

        for (uint64_t id = 2; id <= 5; id++)
                wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_STATUS, id));
        wd_disconnect(c);
        fake_close(&f);
}

static void fake_tensors_reply(Fake *f, Component *k, uint64_t id) {
        Weightd__V1__TensorsReply tr = WEIGHTD__V1__TENSORS_REPLY__INIT;
        PbReply reply = WEIGHTD__V1__REPLY__INIT;

        for (size_t s = 0; s < k->n_slabs; s++) {
                k->slabs[s].fd_index = 0;
                k->slabs[s].map_size = 0;
        }
        tr.model = (char *) "/models/m";
        tr.component = (char *) "unet";
        tr.files = k->slab_ptrs;
        tr.n_files = k->n_slabs;
        tr.tensors = k->tensor_ptrs;
        tr.n_tensors = k->n_tensors;
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_TENSORS;
        reply.tensors = &tr;
        fake_send_reply(f, id, &reply, NULL, 0);
}

static void test_tensors(void **state) {
        wd_manifest *m = NULL;
        Component k;
        wd_error err;
        Fake f;
        wd_client *c = fake_connect(&f);

        component_init(&k, 2);
        component_close(&k);
        fake_tensors_reply(&f, &k, 2);
        assert_int_equal(wd_tensors(c, "/models/m", "unet", &m, &err), WD_OK);
        component_check_manifest(&k, m, false);
        assert_string_equal(wd_manifest_component(m), "unet");
        wd_manifest_free(m);
        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_TENSORS, 2));

        /* The same checks without descriptors. */
        spoil_offset(&k);
        fake_tensors_reply(&f, &k, 3);
        m = NULL;
        assert_int_equal(wd_tensors(c, "/models/m", "unet", &m, &err), WD_PROTOCOL_ERROR);
        assert_null(m);
        assert_non_null(strstr(err.message, "tensor \"b.bias\": 32 bytes at offset 190"));

        wd_disconnect(c);
        fake_close(&f);
}

/* A ComponentsReply of n components: names[i], kinds[i]; pipeline
 * components get a library and a class. */
static void fake_components_reply(Fake *f, uint64_t id, bool diffusers, const char *const *names,
                                  const char *const *kinds, size_t n) {
        Weightd__V1__ComponentsReply cr = WEIGHTD__V1__COMPONENTS_REPLY__INIT;
        Weightd__V1__ComponentInfo infos[4], *ptrs[4];
        PbReply reply = WEIGHTD__V1__REPLY__INIT;

        assert_true(n <= ELEMENTSOF(infos));
        for (size_t i = 0; i < n; i++) {
                weightd__v1__component_info__init(&infos[i]);
                infos[i].name = (char *) names[i];
                infos[i].kind = (char *) kinds[i];
                if (diffusers && strcmp(kinds[i], "absent") != 0) {
                        infos[i].library = (char *) "diffusers";
                        infos[i].class_name = (char *) "AutoencoderKL";
                }
                ptrs[i] = &infos[i];
        }
        cr.model = (char *) "/models/m";
        cr.diffusers = diffusers;
        cr.components = ptrs;
        cr.n_components = n;
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_COMPONENTS;
        reply.components = &cr;
        fake_send_reply(f, id, &reply, NULL, 0);
}

/* A reply that breaks a rule is refused; the connection stays usable. */
static void components_refused(Fake *f, wd_client *c, uint64_t id, bool diffusers, const char *const *names,
                               const char *const *kinds, size_t n, const char *needle) {
        wd_component *v = NULL;
        size_t n_v = 7;
        int diff = 7;
        wd_error err;

        fake_components_reply(f, id, diffusers, names, kinds, n);
        assert_int_equal(wd_components(c, "/models/m", &v, &n_v, &diff, &err), WD_PROTOCOL_ERROR);
        assert_int_equal(err.code, WD_PROTOCOL_ERROR);
        if (!strstr(err.message, needle))
                fail_msg("\"%s\" does not contain \"%s\"", err.message, needle);
        assert_null(v);
        assert_int_equal(n_v, 7);
        assert_int_equal(diff, 7);
        wire_envelope_free(fake_expect(f, WEIGHTD__V1__ENVELOPE__BODY_COMPONENTS, id));
}

static void test_components(void **state) {
        const char *names[] = { "transformer", "text_encoder_2", "scheduler", "vae" };
        const char *kinds[] = { "weights", "absent", "no-weights", "pickle-only" };
        wd_component *v = NULL;
        size_t n = 0;
        int diffusers = -1;
        wd_error err;
        Fake f;
        wd_client *c = fake_connect(&f);

        fake_components_reply(&f, 2, true, names, kinds, 4);
        assert_int_equal(wd_components(c, "/models/m", &v, &n, &diffusers, &err), WD_OK);
        assert_int_equal(n, 4);
        assert_int_equal(diffusers, 1);
        for (size_t i = 0; i < n; i++) {
                assert_string_equal(v[i].name, names[i]);
                assert_string_equal(v[i].kind, kinds[i]);
        }
        assert_string_equal(v[0].library, "diffusers");
        assert_string_equal(v[0].class_name, "AutoencoderKL");
        assert_string_equal(v[1].library, "");
        assert_string_equal(v[1].class_name, "");
        wd_components_free(v, n);
        WireEnvelope *env = fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_COMPONENTS, 2);
        assert_string_equal(env->components->model, "/models/m");
        assert_string_equal(env->components->component, "");
        wire_envelope_free(env);

        /* A plain model: one component named ""; ret_diffusers may be NULL.
         * A kind this client does not know is kept as sent. */
        v = NULL;
        fake_components_reply(&f, 3, false, (const char *[]){ "" }, (const char *[]){ "holographic" }, 1);
        assert_int_equal(wd_components(c, "/models/m.safetensors", &v, &n, NULL, &err), WD_OK);
        assert_int_equal(n, 1);
        assert_string_equal(v[0].name, "");
        assert_string_equal(v[0].kind, "holographic");
        assert_string_equal(v[0].library, "");
        wd_components_free(v, n);
        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_COMPONENTS, 3));

        /* A pipeline without components. */
        v = NULL;
        fake_components_reply(&f, 4, true, NULL, NULL, 0);
        assert_int_equal(wd_components(c, "/models/m", &v, &n, &diffusers, &err), WD_OK);
        assert_int_equal(n, 0);
        assert_int_equal(diffusers, 1);
        wd_components_free(v, n);
        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_COMPONENTS, 4));

        components_refused(&f, c, 5, true, (const char *[]){ "vae", "unet", "vae" },
                           (const char *[]){ "weights", "weights", "missing" }, 3,
                           "component \"vae\" is listed twice");
        components_refused(&f, c, 6, true, (const char *[]){ "../etc" }, (const char *[]){ "weights" }, 1,
                           "component \"../etc\" is not a folder name");
        components_refused(&f, c, 7, true, (const char *[]){ ".." }, (const char *[]){ "weights" }, 1,
                           "component \"..\" is not a folder name");
        components_refused(&f, c, 8, true, (const char *[]){ "" }, (const char *[]){ "weights" }, 1,
                           "component \"\" is not a folder name");
        components_refused(&f, c, 9, true, (const char *[]){ "vae\n" }, (const char *[]){ "" }, 1,
                           "component \"vae\\x0a\": no kind");
        components_refused(&f, c, 10, false, (const char *[]){ "", "" }, (const char *[]){ "weights", "weights" }, 2,
                           "2 components for a model that is not a pipeline");
        components_refused(&f, c, 11, false, NULL, NULL, 0, "0 components for a model that is not a pipeline");
        components_refused(&f, c, 12, false, (const char *[]){ "vae" }, (const char *[]){ "weights" }, 1,
                           "component \"vae\" of a model that is not a pipeline");

        /* The daemon's refusal, with its message. */
        fake_reply(&f, 13, WD_INVALID_ARGUMENT, "components: name a model, not a component");
        assert_int_equal(wd_components(c, "/models/m", &v, &n, NULL, &err), WD_INVALID_ARGUMENT);
        assert_string_equal(err.message, "components: name a model, not a component");
        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_COMPONENTS, 13));

        /* Another result breaks the connection. */
        fake_reply(&f, 14, WD_OK, "");
        assert_int_equal(wd_components(c, "/models/m", &v, &n, NULL, &err), WD_PROTOCOL_ERROR);
        assert_non_null(strstr(err.message, "answered Components with no result instead of a ComponentsReply"));
        wire_envelope_free(fake_expect(&f, WEIGHTD__V1__ENVELOPE__BODY_COMPONENTS, 14));

        assert_int_equal(wd_components(c, NULL, &v, &n, NULL, &err), WD_INVALID_ARGUMENT);
        assert_int_equal(wd_components(c, "/models/m", NULL, &n, NULL, &err), WD_INVALID_ARGUMENT);
        assert_int_equal(wd_components(c, "/models/m", &v, NULL, NULL, &err), WD_INVALID_ARGUMENT);
        wd_disconnect(c);
        assert_null(fake_recv(&f));
        fake_close(&f);
}

/* The *_free() functions accept NULL. */
static void test_free_null(void **state) {
        wd_entries_free(NULL, 0);
        wd_components_free(NULL, 0);
        wd_status_free(NULL);
        wd_cluster_free(NULL);
        wd_cluster_prefetch_result_free(NULL);
        wd_manifest_free(NULL);
        wd_disconnect(NULL);
        assert_int_equal(wd_release(NULL, NULL), WD_OK);
}

/* ---- a reply larger than the socket buffer, from a thread ---- */

typedef struct BigReply {
        Fake *f;
        uint8_t *buf;
        size_t len;
        int fd;
        int r;
} BigReply;

static void *big_reply_send(void *userdata) {
        BigReply *b = userdata;
        size_t off = 0;

        b->r = wire_send(b->f->fd, b->buf, b->len, &b->fd, 1, &off);
        return NULL;
}

static void test_big_manifest(void **state) {
        enum { N = 20000 };
        static PbTensor tensors[N];
        static PbTensor *ptrs[N];
        static char names[N][32];
        static uint64_t shapes[N];
        Weightd__V1__LoadReply load = WEIGHTD__V1__LOAD_REPLY__INIT;
        PbReply reply = WEIGHTD__V1__REPLY__INIT;
        WireEnvelope env = WEIGHTD__V1__ENVELOPE__INIT;
        PbSlab slab = WEIGHTD__V1__SLAB__INIT;
        PbSlab *slab_ptr = &slab;
        static uint8_t content[N * 4];
        BigReply b = { 0 };
        wd_lease *l = NULL;
        pthread_t t;
        wd_error err;
        Fake f;
        wd_client *c = fake_connect(&f);

        for (size_t i = 0; i < sizeof(content); i++)
                content[i] = (uint8_t) (i ^ (i >> 8));
        for (size_t i = 0; i < N; i++) {
                /* Reverse name order, so the index has to sort. */
                snprintf(names[i], sizeof(names[i]), "layers.%05zu.weight", N - 1 - i);
                shapes[i] = 2;
                tensors[i] = (PbTensor) WEIGHTD__V1__TENSOR__INIT;
                tensors[i].name = names[i];
                tensors[i].dtype = (char *) "BF16";
                tensors[i].n_shape = 1;
                tensors[i].shape = &shapes[i];
                tensors[i].offset = 4 * i;
                tensors[i].nbytes = 4;
                ptrs[i] = &tensors[i];
        }
        slab.size = sizeof(content);
        slab.map_size = ((sizeof(content) + 4095) / 4096) * 4096;
        slab.file = (char *) "/models/big.safetensors";
        load.lease = 1;
        load.slabs = &slab_ptr;
        load.n_slabs = 1;
        load.tensors = ptrs;
        load.n_tensors = N;
        reply.result_case = WEIGHTD__V1__REPLY__RESULT_LOAD;
        reply.load = &load;
        env = reply_envelope(2, &reply);

        assert_int_equal(wire_pack(&env, CLIENT_MAX_FRAME, &b.buf, &b.len), 0);
        assert_true(b.len > (512u << 10)); /* more than the socket buffers */
        b.f = &f;
        b.fd = memfd_with(content, sizeof(content), slab.map_size, true);
        assert_int_equal(pthread_create(&t, NULL, big_reply_send, &b), 0);
        assert_int_equal(wd_load(c, "/models/big.safetensors", NULL, &l, &err), WD_OK);
        assert_int_equal(pthread_join(t, NULL), 0);
        assert_int_equal(b.r, 0);
        free(b.buf);
        close(b.fd);

        const wd_manifest *m = wd_lease_manifest(l);
        assert_int_equal(wd_manifest_n_tensors(m), N);
        for (size_t i = 0; i < N; i += 997) {
                const wd_tensor *x = wd_manifest_find(m, names[i]);

                assert_ptr_equal(x, wd_manifest_tensor(m, i));
                assert_memory_equal(x->data, content + 4 * i, 4);
        }

        fake_reply(&f, 3, WD_OK, "");
        assert_int_equal(wd_release(l, &err), WD_OK);
        wd_disconnect(c);
        fake_close(&f);
}

/* ---- wd_connect() on a path ---- */

typedef struct Listener {
        int fd;
        int r;
} Listener;

/* Accept one client, answer its Hello and wait for it to close.  No cmocka
 * asserts on this thread: ls->r says whether it all went as expected. */
static void *listener_run(void *userdata) {
        Listener *ls = userdata;
        int fd = accept4(ls->fd, NULL, NULL, SOCK_CLOEXEC);
        WireReader reader;
        uint8_t *buf = NULL;
        size_t len = 0, off = 0;
        int frames = 0, r;

        ls->r = -1;
        if (fd < 0)
                return NULL;
        wire_reader_init(&reader, CLIENT_MAX_FRAME, 0);
        if (hello_reply_pack(1, 1, &buf, &len) == 0 && wire_send(fd, buf, len, NULL, 0, &off) == 0)
                while ((r = wire_reader_recv(&reader, fd)) > 0) {
                        const uint8_t *p;
                        size_t n;

                        while (wire_reader_next(&reader, &p, &n) > 0) {
                                WireEnvelope *env = wire_unpack(p, n);

                                if (env && env->body_case == WEIGHTD__V1__ENVELOPE__BODY_HELLO && env->id == 1)
                                        frames++;
                                else
                                        frames = -100;
                                wire_envelope_free(env);
                        }
                }
        if (frames == 1 && r == 0)
                ls->r = 0;
        free(buf);
        wire_reader_deinit(&reader);
        close(fd);
        return NULL;
}

static void test_connect_path(void **state) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        char long_path[200];
        int before = count_fds();
        Listener ls = { 0 };
        wd_client *c = NULL;
        wd_error err;
        pthread_t t;

        snprintf(sa.sun_path, sizeof(sa.sun_path), "/tmp/test-client-wire.%d.sock", (int) getpid());
        unlink(sa.sun_path);

        assert_int_equal(wd_connect(sa.sun_path, &c, &err), WD_UNAVAILABLE);
        assert_true(strncmp(err.message, "no daemon at /tmp/test-client-wire.", 35) == 0);
        assert_null(c);

        /* A socket nobody listens on any more. */
        ls.fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        assert_int_equal(bind(ls.fd, (struct sockaddr *) &sa, sizeof(sa)), 0);
        close(ls.fd);
        assert_int_equal(wd_connect(sa.sun_path, &c, &err), WD_UNAVAILABLE);
        assert_non_null(strstr(err.message, "Connection refused"));
        unlink(sa.sun_path);

        memset(long_path, 'x', sizeof(long_path) - 1);
        long_path[0] = '/';
        long_path[sizeof(long_path) - 1] = '\0';
        assert_int_equal(wd_connect(long_path, &c, &err), WD_INVALID_ARGUMENT);

        ls.fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        assert_int_equal(bind(ls.fd, (struct sockaddr *) &sa, sizeof(sa)), 0);
        assert_int_equal(listen(ls.fd, 4), 0);
        assert_int_equal(pthread_create(&t, NULL, listener_run, &ls), 0);
        assert_int_equal(wd_connect(sa.sun_path, &c, &err), WD_OK);
        wd_disconnect(c);
        assert_int_equal(pthread_join(t, NULL), 0);
        assert_int_equal(ls.r, 0);
        close(ls.fd);
        unlink(sa.sun_path);
        assert_int_equal(count_fds(), before);
}

static void test_default_socket(void **state) {
        char buf[256], small[8];

        setenv("WEIGHTD_SOCKET", "/srv/wd.sock", 1);
        assert_int_equal(wd_default_socket(buf, sizeof(buf)), WD_OK);
        assert_string_equal(buf, "/srv/wd.sock");
        assert_int_equal(wd_default_socket(small, sizeof(small)), WD_INVALID_ARGUMENT);
        unsetenv("WEIGHTD_SOCKET");

        assert_int_equal(wd_default_socket(buf, sizeof(buf)), WD_OK);
        if (geteuid() == 0)
                assert_string_equal(buf, "/run/weightd/weightd.sock");
        else
                assert_non_null(strstr(buf, "/weightd/weightd.sock"));

        assert_string_equal(wd_code_name(WD_OK), "OK");
        assert_string_equal(wd_code_name(WD_PROTOCOL_ERROR), "PROTOCOL_ERROR");
        assert_string_equal(wd_code_name(-1), "UNKNOWN");
        assert_string_equal(wd_version(), WEIGHTD_VERSION);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_hello),
                cmocka_unit_test(test_hello_fails),
                cmocka_unit_test(test_load_release),
                cmocka_unit_test(test_release_not_found),
                cmocka_unit_test(test_fork),
                cmocka_unit_test(test_load_empty),
                cmocka_unit_test(test_hostile_manifest),
                cmocka_unit_test(test_sharded_load),
                cmocka_unit_test(test_hostile_sharded),
                cmocka_unit_test(test_load_table),
                cmocka_unit_test(test_load_table_files),
                cmocka_unit_test(test_hostile_table),
                cmocka_unit_test(test_load_options_checked),
                cmocka_unit_test(test_fd_count_mismatch),
                cmocka_unit_test(test_hostile_frames),
                cmocka_unit_test(test_daemon_gone),
                cmocka_unit_test(test_daemon_codes),
                cmocka_unit_test(test_prefetch_progress),
                cmocka_unit_test(test_prefetch_cancel),
                cmocka_unit_test(test_list_status),
                cmocka_unit_test(test_prefetch_cluster),
                cmocka_unit_test(test_prefetch_cluster_refused),
                cmocka_unit_test(test_prefetch_cluster_cancel),
                cmocka_unit_test(test_cluster),
                cmocka_unit_test(test_status_cluster),
                cmocka_unit_test(test_tensors),
                cmocka_unit_test(test_components),
                cmocka_unit_test(test_free_null),
                cmocka_unit_test(test_big_manifest),
                cmocka_unit_test(test_connect_path),
                cmocka_unit_test(test_default_socket),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
