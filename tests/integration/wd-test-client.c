/* wd-test-client: a small weightd client for the integration tests, on the
 * public API of libweightd-client only.
 *
 *   hash SOCKET MODEL [COMPONENT]         load, print every tensor's dtype,
 *                                         shape, size and XXH3-128 of its
 *                                         bytes in the mapping, release
 *   hold SOCKET MODEL [COMPONENT]         load, print "ready", sleep until killed
 *   write-probe SOCKET MODEL [COMPONENT]  load, try to make the first tensor's
 *                                         page writable, print the errno
 *   load-many SOCKET MODEL COMPONENT N    N sequential loads and releases,
 *                                         print their timing
 *   shard SOCKET MODEL COMPONENT OUT R/W [uneven] [tensors=PATTERN] PATTERN:DIM...
 *     (R/W 0/0: no shard; each tensors= adds a pattern of the tensors to take)
 *                                         a sharded load: every tensor's
 *                                         bytes written to OUT one after
 *                                         the other, and per tensor its
 *                                         place in OUT, shape, full_shape,
 *                                         shard_dim, shard_start and file
 *
 * Results are one JSON document on stdout.  A failed call prints
 * {"error": CODE_NAME, "message": ...} on stdout and the same on stderr,
 * and exits 1; usage errors exit 2. */

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "weightd/client.h"

static int fail(int code, const wd_error *err) {
        const char *name = wd_code_name(code);
        const char *msg = err ? err->message : "";
        json_t *o = json_pack("{s:s, s:s}", "error", name, "message", msg);

        if (o) {
                json_dumpf(o, stdout, JSON_COMPACT);
                fputc('\n', stdout);
                json_decref(o);
        }
        fflush(stdout);
        fprintf(stderr, "wd-test-client: %s: %s\n", name, msg);
        return 1;
}

static int print_json(json_t *o) {
        if (!o || json_dumpf(o, stdout, JSON_COMPACT) < 0) {
                fprintf(stderr, "wd-test-client: cannot write JSON (a name that is not UTF-8?)\n");
                json_decref(o);
                return 1;
        }
        fputc('\n', stdout);
        json_decref(o);
        return fflush(stdout) == 0 ? 0 : 1;
}

static double now_sec(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

static json_t *tensor_json(const wd_tensor *t) {
        char hex[2 * sizeof(XXH128_canonical_t) + 1];
        XXH128_canonical_t canon;
        json_t *shape = json_array();

        for (unsigned i = 0; i < t->ndim; i++)
                json_array_append_new(shape, json_integer((json_int_t) t->shape[i]));
        XXH128_canonicalFromHash(&canon, XXH3_128bits(t->data, (size_t) t->nbytes));
        for (size_t i = 0; i < sizeof(canon.digest); i++)
                snprintf(hex + 2 * i, 3, "%02x", canon.digest[i]);
        return json_pack("{s:s, s:o, s:I, s:s}", "dtype", t->dtype, "shape", shape, "nbytes",
                         (json_int_t) t->nbytes, "xxh3_128", hex);
}

static int cmd_hash(wd_client *c, const char *model, const char *component) {
        wd_error err = { 0 };
        wd_lease *l = NULL;
        const wd_manifest *m;
        json_t *tensors, *o;
        int r;

        r = wd_load(c, model, component, &l, &err);
        if (r != WD_OK)
                return fail(r, &err);
        m = wd_lease_manifest(l);
        tensors = json_object();
        for (size_t i = 0; i < wd_manifest_n_tensors(m); i++) {
                const wd_tensor *t = wd_manifest_tensor(m, i);
                json_t *tj = tensor_json(t);

                if (!tj || json_object_set_new(tensors, t->name, tj) < 0) {
                        fprintf(stderr, "wd-test-client: tensor %zu: cannot represent it in JSON\n", i);
                        return 1;
                }
        }
        o = json_pack("{s:I, s:o, s:I, s:I}", "lease", (json_int_t) wd_lease_id(l), "tensors", tensors, "files",
                      (json_int_t) wd_manifest_n_files(m), "bytes", (json_int_t) wd_manifest_bytes(m));
        r = wd_release(l, &err);
        if (r != WD_OK) {
                json_decref(o);
                return fail(r, &err);
        }
        return print_json(o);
}

static int cmd_hold(wd_client *c, const char *model, const char *component) {
        wd_error err = { 0 };
        wd_lease *l = NULL;
        int r;

        r = wd_load(c, model, component, &l, &err);
        if (r != WD_OK)
                return fail(r, &err);
        fputs("ready\n", stdout);
        fflush(stdout);
        for (;;)
                pause();
}

static int cmd_write_probe(wd_client *c, const char *model, const char *component) {
        wd_error err = { 0 };
        wd_lease *l = NULL;
        const wd_tensor *t;
        long page = sysconf(_SC_PAGESIZE);
        uintptr_t p;
        int r, e = 0;

        r = wd_load(c, model, component, &l, &err);
        if (r != WD_OK)
                return fail(r, &err);
        t = wd_manifest_tensor(wd_lease_manifest(l), 0);
        if (!t || !t->data) {
                fprintf(stderr, "wd-test-client: the component has no tensor data to probe\n");
                return 1;
        }
        p = (uintptr_t) t->data & ~((uintptr_t) page - 1);
        if (mprotect((void *) p, (size_t) page, PROT_READ | PROT_WRITE) < 0)
                e = errno;
        /* Never write through it, even if the kernel allowed it: the
         * result alone says the protection is gone. */
        r = wd_release(l, &err);
        if (r != WD_OK)
                return fail(r, &err);
        return print_json(json_pack("{s:i, s:s}", "mprotect_errno", e, "strerror", e ? strerror(e) : ""));
}

static int cmp_double(const void *a, const void *b) {
        double x = *(const double *) a, y = *(const double *) b;
        return (x > y) - (x < y);
}

static int cmd_load_many(wd_client *c, const char *model, const char *component, const char *count) {
        wd_error err = { 0 };
        double *t, start;
        char *end;
        unsigned long n;
        size_t n_tensors = 0;
        int r;

        errno = 0;
        n = strtoul(count, &end, 10);
        if (errno != 0 || end == count || *end || n < 1 || n > 1000000) {
                fprintf(stderr, "wd-test-client: N must be a number in 1..1000000, not \"%s\"\n", count);
                return 2;
        }
        t = calloc(n, sizeof(double));
        if (!t)
                return 1;
        start = now_sec();
        for (unsigned long i = 0; i < n; i++) {
                double t0 = now_sec();
                wd_lease *l = NULL;

                r = wd_load(c, model, component, &l, &err);
                if (r != WD_OK) {
                        free(t);
                        return fail(r, &err);
                }
                n_tensors = wd_manifest_n_tensors(wd_lease_manifest(l));
                r = wd_release(l, &err);
                if (r != WD_OK) {
                        free(t);
                        return fail(r, &err);
                }
                t[i] = now_sec() - t0;
        }
        double total = now_sec() - start;
        qsort(t, n, sizeof(double), cmp_double);
        r = print_json(json_pack("{s:I, s:I, s:f, s:f, s:f, s:f, s:f}", "loads", (json_int_t) n, "tensors",
                                 (json_int_t) n_tensors, "seconds", total, "min_us", t[0] * 1e6, "median_us",
                                 t[n / 2] * 1e6, "p99_us", t[(size_t) ((double) (n - 1) * 0.99)] * 1e6, "max_us",
                                 t[n - 1] * 1e6));
        free(t);
        return r;
}

/* Parse "R/W", "uneven", "tensors=PATTERN" and "PATTERN:DIM" (split at
 * the last ':'). */
static int parse_shard(char **argv, int argc, wd_load_options *o, wd_shard_rule *rules, const char **tensors) {
        unsigned rank, world;
        char c;

        if (argc < 1 || sscanf(argv[0], "%u/%u%c", &rank, &world, &c) != 2)
                return -1;
        o->rank = rank;
        o->world = world;
        o->rules = rules;
        for (int i = 1; i < argc; i++) {
                char *colon = strrchr(argv[i], ':');
                unsigned dim;

                if (strcmp(argv[i], "uneven") == 0) {
                        o->uneven = 1;
                        continue;
                }
                if (strncmp(argv[i], "tensors=", 8) == 0) {
                        tensors[o->n_tensors++] = argv[i] + 8;
                        o->tensors = tensors;
                        continue;
                }
                if (!colon || sscanf(colon + 1, "%u%c", &dim, &c) != 1)
                        return -1;
                *colon = 0;
                rules[o->n_rules++] = (wd_shard_rule){ .pattern = argv[i], .dim = dim };
        }
        return 0;
}

static int cmd_shard(wd_client *c, const char *model, const char *component, const char *out, char **argv,
                     int argc) {
        wd_shard_rule rules[64];
        const char *patterns[64];
        wd_load_options o = { 0 };
        wd_error err = { 0 };
        wd_lease *l = NULL;
        const wd_manifest *m;
        json_t *tensors, *files, *o_json;
        uint64_t off = 0;
        FILE *f;
        int r;

        if (argc > 65 || parse_shard(argv, argc, &o, rules, patterns) < 0) {
                fprintf(stderr, "wd-test-client: shard: R/W [uneven] [tensors=PATTERN]... PATTERN:DIM...\n");
                return 2;
        }
        r = wd_load_ex(c, model, component, &o, &l, &err);
        if (r != WD_OK)
                return fail(r, &err);
        m = wd_lease_manifest(l);
        f = fopen(out, "we");
        if (!f) {
                fprintf(stderr, "wd-test-client: %s: %s\n", out, strerror(errno));
                return 1;
        }
        tensors = json_object();
        for (size_t i = 0; i < wd_manifest_n_tensors(m); i++) {
                const wd_tensor *t = wd_manifest_tensor(m, i);
                json_t *shape = json_array(), *full = json_null();

                for (unsigned d = 0; d < t->ndim; d++)
                        json_array_append_new(shape, json_integer((json_int_t) t->shape[d]));
                if (t->full_shape) {
                        full = json_array();
                        for (unsigned d = 0; d < t->ndim; d++)
                                json_array_append_new(full, json_integer((json_int_t) t->full_shape[d]));
                }
                if (t->nbytes > 0 && fwrite(t->data, 1, (size_t) t->nbytes, f) != t->nbytes) {
                        fprintf(stderr, "wd-test-client: %s: short write\n", out);
                        return 1;
                }
                json_object_set_new(tensors, t->name,
                                    json_pack("{s:s, s:o, s:o, s:i, s:I, s:i, s:I, s:I, s:I}", "dtype", t->dtype,
                                              "shape", shape, "full_shape", full, "shard_dim", (int) t->shard_dim,
                                              "shard_start", (json_int_t) t->shard_start, "file", (int) t->file,
                                              "nbytes", (json_int_t) t->nbytes, "dump_offset", (json_int_t) off,
                                              "slab_offset", (json_int_t) t->offset));
                off += t->nbytes;
        }
        if (fclose(f) != 0) {
                fprintf(stderr, "wd-test-client: %s: %s\n", out, strerror(errno));
                return 1;
        }
        files = json_array();
        for (size_t i = 0; i < wd_manifest_n_files(m); i++) {
                const char *k = NULL, *v = NULL;
                json_t *meta = json_object();

                for (size_t j = 0; wd_manifest_metadata(m, i, j, &k, &v) == WD_OK; j++)
                        json_object_set_new(meta, k, json_string(v));
                json_array_append_new(files, json_pack("{s:s, s:o}", "path", wd_manifest_file(m, i), "metadata", meta));
        }
        o_json = json_pack("{s:I, s:o, s:o, s:I}", "lease", (json_int_t) wd_lease_id(l), "tensors", tensors, "files",
                           files, "bytes", (json_int_t) wd_manifest_bytes(m));
        r = wd_release(l, &err);
        if (r != WD_OK) {
                json_decref(o_json);
                return fail(r, &err);
        }
        return print_json(o_json);
}

static int usage(void) {
        fprintf(stderr, "Usage: wd-test-client hash|hold|write-probe SOCKET MODEL [COMPONENT]\n"
                        "       wd-test-client load-many SOCKET MODEL COMPONENT N\n"
                        "       wd-test-client shard SOCKET MODEL COMPONENT OUT R/W [uneven] [tensors=PATTERN]... "
                        "PATTERN:DIM...\n");
        return 2;
}

int main(int argc, char **argv) {
        wd_error err = { 0 };
        wd_client *c = NULL;
        const char *cmd, *component;
        int r;

        if (argc < 4)
                return usage();
        cmd = argv[1];
        component = argc > 4 ? argv[4] : "";
        if (strcmp(cmd, "shard") == 0 ? argc < 7 : strcmp(cmd, "load-many") == 0 ? argc != 6 : argc > 5)
                return usage();

        r = wd_connect(argv[2], &c, &err);
        if (r != WD_OK)
                return fail(r, &err);

        if (strcmp(cmd, "hash") == 0)
                r = cmd_hash(c, argv[3], component);
        else if (strcmp(cmd, "hold") == 0)
                r = cmd_hold(c, argv[3], component);
        else if (strcmp(cmd, "write-probe") == 0)
                r = cmd_write_probe(c, argv[3], component);
        else if (strcmp(cmd, "load-many") == 0)
                r = cmd_load_many(c, argv[3], component, argv[5]);
        else if (strcmp(cmd, "shard") == 0)
                r = cmd_shard(c, argv[3], component, argv[5], argv + 6, argc - 6);
        else
                r = usage();
        wd_disconnect(c);
        return r;
}
