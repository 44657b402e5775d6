/* Fuzz target: whole peers over the real store.  Each input is a program of
 * byte-coded operations over up to four client connections to one server
 * that lives for the whole run: connect (a socketpair end served as a
 * peer), Hello, Load and Prefetch (whole and sharded) of a few small real
 * models under a model root written at startup, pipelines of several frames
 * in one write, Cancel of a recent request, Release of a lease received,
 * Evict, Pin, Unpin, List, Status, Tensors, Components, raw bytes, frames cut
 * across loop turns, disconnects (also in the middle of a load), reading the
 * replies or never reading them, and loop turns and short sleeps in between.
 * The larger models take several MiB, read in 64 KiB chunks with a queue
 * depth of 2 and no O_DIRECT, so their loads span loop turns and requests
 * arrive while they run; the host budget is smaller than all of them
 * together.
 *
 * What the daemon sends is checked as a client would: frames decode, only
 * replies and events come, a LoadReply brings exactly one descriptor per
 * slab, read-only and sealed against writes and growth, leases are non-zero
 * and unique, and (on a connection that sent only well-formed frames) every
 * reply answers an id that was sent.  A fifth connection, the checker, asks
 * Status and List in one write, so both answer the same moment: the host
 * budget's used bytes are the sum of the listed host entries' and the
 * leases are the sum of the entries' leases.  After each input every peer is
 * closed and the daemon must settle (no connection but the checker's, no
 * lease, no job, every entry resident) within a bound; then every entry is
 * unpinned and evicted, after which nothing may stay charged and the
 * process may hold no more descriptors than after the first input. */

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "macro.h"
#include "server/config.h"
#include "server/server.h"
#include "wire.h"

#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The model root, shared by every fuzzer process: its files are the same
 * bytes whoever writes them, written only when missing. */
#define FUZZ_ROOT "/tmp/weightd-fuzz-peer-root"

#define N_CLIENTS 4
#define MAX_RECENT 8
#define MAX_LEASES 64
#define CLIENT_OUT_MAX (256u << 10)   /* unsent bytes a client keeps; more is dropped */
#define CLIENT_MAX_FRAME (256u << 20) /* what libweightd-client accepts */
#define MAX_CONNECTS 64               /* per input */
#define MAX_TURNS 4000                /* loop turns the RUN operation may take, per input */
#define MAX_SLEEP_USEC 20000          /* per input */
#define SETTLE_USEC (10u * 1000000u)  /* for the daemon to settle after the input */
#define REPLY_USEC (5u * 1000000u)    /* for the checker's replies */

typedef struct Client {
        int fd; /* -1: the slot is free */
        bool dead;    /* the daemon closed its end, or sending failed */
        bool tainted; /* sent raw bytes: a reply may answer an id this side never chose */
        bool hold;    /* a cut frame: the rest goes on the next loop turn */
        WireReader in;
        uint8_t *out;
        size_t out_len;
        uint64_t next_id;
        uint64_t recent[MAX_RECENT]; /* request ids, a ring */
        unsigned n_recent;
        uint64_t leases[MAX_LEASES];
        unsigned n_leases;
        /* The checker only: the replies it waits for. */
        uint64_t want[2];
        WireEnvelope *got[2];
} Client;

static Server *server;
static char run_dir[] = "/tmp/weightd-fuzz-peer-XXXXXX";
static Client clients[N_CLIENTS];
static Client checker;
static uint64_t checker_id = 1;
static long fd_baseline = -1;
static uint64_t input_usec;
static bool verbose; /* $FUZZ_PEER_VERBOSE: print what each client receives */

_printf_(1, 2) __attribute__((noreturn)) static void fail(const char *fmt, ...) {
        va_list ap;

        fputs("fuzz-peer: ", stderr);
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputc('\n', stderr);
        abort();
}

static uint64_t now_usec_(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000u + (uint64_t) ts.tv_nsec / 1000u;
}

/* ---- the model root ----------------------------------------------------- */

typedef struct TensorDef {
        const char *name;
        unsigned rows, cols; /* F32; cols 0 for a 1-D tensor */
} TensorDef;

static uint64_t tensor_bytes(const TensorDef *t) {
        return (uint64_t) t->rows * (t->cols ? t->cols : 1) * 4;
}

/* A safetensors file of F32 tensors filled with a pattern; with
 * short_by > 0 the data ends that many bytes early (a file that breaks the
 * format).  Written under a temporary name and renamed, and only when the
 * file is missing or has another size. */
static void write_safetensors(const char *rel, const TensorDef *t, size_t n, uint64_t short_by) {
        char path[512], tmp[600], header[1024];
        uint64_t off = 0, hlen, total;
        size_t h = 0;
        struct stat st;
        FILE *f;

        h += (size_t) snprintf(header + h, sizeof(header) - h, "{");
        for (size_t i = 0; i < n; i++) {
                uint64_t b = tensor_bytes(&t[i]);

                if (t[i].cols)
                        h += (size_t) snprintf(header + h, sizeof(header) - h,
                                               "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[%u,%u],\"data_offsets\":[%" PRIu64
                                               ",%" PRIu64 "]}",
                                               i ? "," : "", t[i].name, t[i].rows, t[i].cols, off, off + b);
                else
                        h += (size_t) snprintf(header + h, sizeof(header) - h,
                                               "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[%u],\"data_offsets\":[%" PRIu64
                                               ",%" PRIu64 "]}",
                                               i ? "," : "", t[i].name, t[i].rows, off, off + b);
                off += b;
        }
        h += (size_t) snprintf(header + h, sizeof(header) - h, "}");
        if (h >= sizeof(header))
                fail("header of %s too long", rel);
        hlen = h;
        total = 8 + hlen + off - short_by;

        snprintf(path, sizeof(path), FUZZ_ROOT "/%s", rel);
        if (stat(path, &st) == 0 && (uint64_t) st.st_size == total)
                return;
        snprintf(tmp, sizeof(tmp), "%s.%d.tmp", path, (int) getpid());
        f = fopen(tmp, "we");
        if (!f)
                fail("%s: %m", tmp);
        fwrite(&hlen, 8, 1, f);
        fwrite(header, 1, hlen, f);
        for (uint64_t i = 0; i < (off - short_by) / 4; i++) {
                uint32_t v = (uint32_t) (i * 2654435761u);
                fwrite(&v, 4, 1, f);
        }
        if (fclose(f) != 0 || rename(tmp, path) < 0)
                fail("%s: %m", path);
}

static void write_text(const char *rel, const char *text) {
        char path[512], tmp[600];
        FILE *f;

        snprintf(path, sizeof(path), FUZZ_ROOT "/%s", rel);
        snprintf(tmp, sizeof(tmp), "%s.%d.tmp", path, (int) getpid());
        f = fopen(tmp, "we");
        if (!f)
                fail("%s: %m", tmp);
        fputs(text, f);
        if (fclose(f) != 0 || rename(tmp, path) < 0)
                fail("%s: %m", path);
}

static void make_dir(const char *rel) {
        char path[512];

        snprintf(path, sizeof(path), FUZZ_ROOT "%s%s", *rel ? "/" : "", rel);
        if (mkdir(path, 0755) < 0 && errno != EEXIST)
                fail("%s: %m", path);
}

/* tiny.safetensors   8 bytes, one tensor
 * big/               one 4 MiB file: a.weight [512,1024], b.weight [1024,512], c.bias [1024]
 * multi/             two 3 MiB files taken in sorted order
 * pipe/              a diffusers pipeline: unet (5 MiB), vae (16 KiB), a
 *                    scheduler without weights, a null component
 * bad.safetensors    data shorter than its header says
 * alias -> big       a symlinked folder inside the root: the same files */
static void write_models(void) {
        static const TensorDef tiny[] = { { "w", 2, 0 } };
        static const TensorDef big[] = { { "a.weight", 512, 1024 }, { "b.weight", 1024, 512 }, { "c.bias", 1024, 0 } };
        static const TensorDef multi1[] = { { "l0.weight", 768, 1024 } };
        static const TensorDef multi2[] = { { "l1.weight", 1024, 768 }, { "l1.bias", 768, 0 } };
        static const TensorDef unet[] = { { "conv.weight", 1280, 1024 } };
        static const TensorDef vae[] = { { "d.weight", 64, 64 } };
        static const TensorDef bad[] = { { "w", 16, 0 } };

        make_dir("");
        make_dir("big");
        make_dir("multi");
        make_dir("pipe");
        make_dir("pipe/unet");
        make_dir("pipe/vae");
        make_dir("pipe/scheduler");
        write_safetensors("tiny.safetensors", tiny, ELEMENTSOF(tiny), 0);
        write_safetensors("big/model.safetensors", big, ELEMENTSOF(big), 0);
        write_safetensors("multi/model-00001-of-00002.safetensors", multi1, ELEMENTSOF(multi1), 0);
        write_safetensors("multi/model-00002-of-00002.safetensors", multi2, ELEMENTSOF(multi2), 0);
        write_safetensors("pipe/unet/diffusion_pytorch_model.safetensors", unet, ELEMENTSOF(unet), 0);
        write_safetensors("pipe/vae/diffusion_pytorch_model.safetensors", vae, ELEMENTSOF(vae), 0);
        write_safetensors("bad.safetensors", bad, ELEMENTSOF(bad), 24);
        write_text("pipe/model_index.json",
                   "{\"_class_name\": \"FuzzPipeline\", \"unet\": [\"diffusers\", \"UNet\"], "
                   "\"vae\": [\"diffusers\", \"AutoencoderKL\"], \"scheduler\": [\"diffusers\", \"Scheduler\"], "
                   "\"text\": [null, null]}\n");
        write_text("pipe/scheduler/scheduler_config.json", "{}\n");
        if (symlink("big", FUZZ_ROOT "/alias") < 0 && errno != EEXIST)
                fail(FUZZ_ROOT "/alias: %m");
}

/* The model an operand byte names: its low 3 bits pick the model, the next
 * 3 the component. */
static const char *model_path(uint8_t m, char *buf, size_t size) {
        static const char *const rel[] = {
                "tiny.safetensors", "big", "multi", "pipe", "bad.safetensors", "missing", "alias", NULL,
        };
        unsigned i = m & 7;

        if (rel[i])
                snprintf(buf, size, FUZZ_ROOT "/%s", rel[i]);
        else /* outside every root, relative, or empty */
                snprintf(buf, size, "%s", (m >> 3) % 3 == 0 ? "/etc" : (m >> 3) % 3 == 1 ? "relative" : "");
        return buf;
}

static const char *model_component(uint8_t m) {
        static const char *const pipe[] = { "unet", "vae", "scheduler", "text", "nope", "", "../big", "unet" };

        if ((m & 7) == 3)
                return pipe[(m >> 3) & 7];
        return ((m >> 3) & 7) == 7 ? "unet" : "";
}

/* ---- the server --------------------------------------------------------- */

static void remove_run_dir(void) {
        char path[sizeof(run_dir) + 32];

        snprintf(path, sizeof(path), "%s/weightd.sock", run_dir);
        (void) unlink(path);
        (void) rmdir(run_dir);
}

/* The open descriptors but pipes: the daemon makes its pipes (libuv's)
 * when it starts, while libFuzzer and the sanitizers open a pair of pipes
 * to a symbolizer the first time they print a new function, at any input,
 * and keep them. */
static long count_fds(void) {
        DIR *d = opendir("/proc/self/fd");
        struct dirent *de;
        long n = 0;

        if (!d)
                fail("/proc/self/fd: %m");
        while ((de = readdir(d))) {
                char path[300], target[64];
                ssize_t k;

                if (de->d_name[0] == '.')
                        continue;
                snprintf(path, sizeof(path), "/proc/self/fd/%s", de->d_name);
                k = readlink(path, target, sizeof(target) - 1);
                target[k > 0 ? k : 0] = 0;
                n += strncmp(target, "pipe:", 5) != 0;
        }
        closedir(d);
        return n - 1; /* the directory's own */
}

/* Every open descriptor and what it is, for a report. */
static void list_fds(void) {
        DIR *d = opendir("/proc/self/fd");
        struct dirent *de;

        if (!d)
                return;
        while ((de = readdir(d))) {
                char path[300], target[256];
                ssize_t n;

                if (de->d_name[0] == '.')
                        continue;
                snprintf(path, sizeof(path), "/proc/self/fd/%s", de->d_name);
                n = readlink(path, target, sizeof(target) - 1);
                target[n > 0 ? n : 0] = 0;
                fprintf(stderr, "  fd %s: %s\n", de->d_name, target);
        }
        closedir(d);
}

static void client_init(Client *c, int fd) {
        *c = (Client){ .fd = fd, .next_id = 1 };
        wire_reader_init(&c->in, CLIENT_MAX_FRAME, WIRE_MAX_FDS);
}

static void client_close(Client *c) {
        if (c->fd < 0)
                return;
        safe_close(c->fd);
        wire_reader_deinit(&c->in);
        free(c->out);
        for (size_t i = 0; i < ELEMENTSOF(c->got); i++)
                wire_envelope_free(c->got[i]);
        *c = (Client){ .fd = -1 };
}

static bool client_connect(Client *c, uid_t uid) {
        struct ucred cred = { .pid = getpid(), .uid = uid, .gid = getgid() };
        int sv[2];

        client_close(c);
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) < 0)
                fail("socketpair: %m");
        /* Refused over a connection limit: the daemon closed its end. */
        if (server_add_peer(server, sv[0], &cred) < 0) {
                safe_close(sv[1]);
                return false;
        }
        client_init(c, sv[1]);
        return true;
}

/* ---- sending ------------------------------------------------------------ */

static void client_append(Client *c, const uint8_t *p, size_t n) {
        uint8_t *b;

        /* n == 0 too: realloc() of a buffer to 0 bytes frees it. */
        if (n == 0 || c->fd < 0 || c->dead || c->out_len + n > CLIENT_OUT_MAX)
                return;
        b = realloc(c->out, c->out_len + n);
        if (!b)
                fail("out of memory");
        memcpy(b + c->out_len, p, n);
        c->out = b;
        c->out_len += n;
}

static void client_queue(Client *c, WireEnvelope *env) {
        uint8_t *buf;
        size_t len;

        if (wire_pack(env, SIZE_MAX, &buf, &len) < 0)
                fail("wire_pack failed");
        client_append(c, buf, len);
        free(buf);
}

/* Send at most max bytes of what is queued, as much as the socket takes. */
static void client_flush(Client *c, size_t max) {
        while (c->fd >= 0 && !c->dead && c->out_len > 0 && max > 0) {
                ssize_t k = send(c->fd, c->out, MIN(c->out_len, max), MSG_NOSIGNAL | MSG_DONTWAIT);

                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno != EAGAIN) {
                                c->dead = true;
                                c->out_len = 0;
                        }
                        return;
                }
                memmove(c->out, c->out + k, c->out_len - (size_t) k);
                c->out_len -= (size_t) k;
                max -= (size_t) k;
        }
}

static uint64_t client_new_id(Client *c) {
        uint64_t id = c->next_id++;

        c->recent[c->n_recent++ % MAX_RECENT] = id;
        return id;
}

/* A recent id again (a duplicate of one in flight, or of one answered) or
 * a new one. */
static uint64_t client_pick_id(Client *c, bool reuse, uint8_t which) {
        if (reuse && c->n_recent > 0)
                return c->recent[(c->n_recent - 1 - which % MIN(c->n_recent, MAX_RECENT)) % MAX_RECENT];
        return client_new_id(c);
}

/* ---- receiving ---------------------------------------------------------- */

static void check_slab_fd(int fd) {
        int seals = fcntl(fd, F_GET_SEALS), fl = fcntl(fd, F_GETFL);

        if (seals < 0 || fl < 0)
                fail("a LoadReply's descriptor %d: %m", fd);
        if (!(seals & F_SEAL_GROW) || !(seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE)))
                fail("a LoadReply's descriptor is not sealed against writes and growth (seals 0x%x)", seals);
        if ((fl & O_ACCMODE) != O_RDONLY)
                fail("a LoadReply's descriptor is not read-only (flags 0x%x)", fl);
}

/* A LoadReply.table: the tensors in it alone, every column as long as the
 * table says, every slab index in range. */
static void client_got_table(const Weightd__V1__LoadReply *l) {
        const Weightd__V1__TensorTable *t = l->table;
        size_t n_dims = 0, n_names = 0;

        if (l->n_tensors > 0)
                fail("a LoadReply with a table and %zu tensors", l->n_tensors);
        if (t->dtype.len != t->count || t->ndim.len != t->count || t->n_offset != t->count ||
            t->n_nbytes != t->count || t->n_slab != t->count || (t->n_file != 0 && t->n_file != t->count))
                fail("a table of %u tensors with columns of other lengths", t->count);
        for (size_t i = 0; i < t->names.len; i++)
                n_names += t->names.data[i] == 0;
        if (n_names != t->count || (t->count > 0 && t->names.data[t->names.len - 1] != 0))
                fail("a table of %u tensors with %zu names", t->count, n_names);
        for (size_t i = 0; i < t->count; i++) {
                n_dims += t->ndim.data[i];
                if (t->dtype.data[i] >= t->n_dtypes || t->slab[i] >= l->n_slabs)
                        fail("a table's tensor %zu has dtype %u of %zu, slab %u of %zu", i, t->dtype.data[i],
                             t->n_dtypes, t->slab[i], l->n_slabs);
        }
        if (n_dims != t->n_dims)
                fail("a table's ndim adds up to %zu, dims has %zu", n_dims, t->n_dims);
}

static void client_got_load(Client *c, const Weightd__V1__LoadReply *l) {
        int fds[WIRE_MAX_FDS];

        if (l->n_slabs > WIRE_MAX_FDS)
                fail("a LoadReply with %zu slabs", l->n_slabs);
        if (wire_reader_take_fds(&c->in, l->n_slabs, fds) < 0)
                fail("a LoadReply with %zu slabs came with %zu descriptors", l->n_slabs, c->in.n_fds);
        for (size_t i = 0; i < l->n_slabs; i++) {
                check_slab_fd(fds[i]);
                safe_close(fds[i]);
        }
        if (l->lease == 0) {
                if (l->n_slabs > 0)
                        fail("a LoadReply with slabs and no lease");
                return; /* a Prefetch */
        }
        if (l->n_slabs == 0)
                fail("a LoadReply with lease %" PRIu64 " and no slab", l->lease);
        if (l->table)
                client_got_table(l);
        for (unsigned i = 0; i < MIN(c->n_leases, MAX_LEASES); i++)
                if (c->leases[i] == l->lease)
                        fail("lease %" PRIu64 " handed out twice", l->lease);
        if (c->n_leases < MAX_LEASES)
                c->leases[c->n_leases++] = l->lease;
}

static void client_got(Client *c, WireEnvelope *env) {
        if (env->body_case != WEIGHTD__V1__ENVELOPE__BODY_REPLY &&
            env->body_case != WEIGHTD__V1__ENVELOPE__BODY_PROGRESS)
                fail("the daemon sent an envelope with body %d", (int) env->body_case);
        if (!c->tainted && env->id >= c->next_id)
                fail("a reply or an event for id %" PRIu64 ", which was never sent (next %" PRIu64 ")", env->id,
                     c->next_id);
        if (verbose && c != &checker) {
                if (env->body_case == WEIGHTD__V1__ENVELOPE__BODY_REPLY)
                        fprintf(stderr, "%" PRIu64 " us: client %d: id %" PRIu64 ": code %d, result %d%s%s\n",
                                now_usec_() - input_usec, (int) (c - clients), env->id, (int) env->reply->code,
                                (int) env->reply->result_case, *env->reply->message ? ": " : "", env->reply->message);
                else
                        fprintf(stderr, "%" PRIu64 " us: client %d: id %" PRIu64 ": progress %" PRIu64 "/%" PRIu64 "\n",
                                now_usec_() - input_usec, (int) (c - clients), env->id, env->progress->done_bytes,
                                env->progress->total_bytes);
        }
        if (env->body_case == WEIGHTD__V1__ENVELOPE__BODY_REPLY && env->reply->code == WEIGHTD__V1__CODE__OK &&
            env->reply->result_case == WEIGHTD__V1__REPLY__RESULT_LOAD)
                client_got_load(c, env->reply->load);
        for (size_t i = 0; i < ELEMENTSOF(c->want); i++)
                if (c->want[i] != 0 && env->id == c->want[i] &&
                    env->body_case == WEIGHTD__V1__ENVELOPE__BODY_REPLY && !c->got[i]) {
                        c->got[i] = env;
                        return;
                }
        wire_envelope_free(env);
}

/* Read and check whatever the daemon sent. */
static void client_drain(Client *c) {
        while (c->fd >= 0 && !c->dead) {
                const uint8_t *payload;
                size_t len;
                int r = wire_reader_recv(&c->in, c->fd);

                if (r == -EAGAIN)
                        break;
                if (r == 0 || r == -ECONNRESET) {
                        c->dead = true;
                        c->out_len = 0;
                } else if (r < 0)
                        fail("receiving from the daemon: %s", strerror(-r));
                while ((r = wire_reader_next(&c->in, &payload, &len)) == 1) {
                        WireEnvelope *env = wire_unpack(payload, len);

                        if (!env)
                                fail("the daemon sent a frame of %zu bytes that does not decode", len);
                        client_got(c, env);
                }
                if (r < 0)
                        fail("the daemon sent a frame over %u bytes", CLIENT_MAX_FRAME);
                /* Descriptors ride on a frame's first byte: with no frame
                 * begun, none may wait. */
                if (!wire_reader_partial(&c->in) && c->in.n_fds > 0)
                        fail("%zu descriptors came that no frame refers to", c->in.n_fds);
        }
}

static void turn(void) {
        server_run_nowait(server);
        for (size_t i = 0; i < N_CLIENTS; i++) {
                clients[i].hold = false;
                client_flush(&clients[i], SIZE_MAX);
        }
}

/* ---- requests ----------------------------------------------------------- */

typedef struct Prog {
        const uint8_t *p;
        size_t n, off;
        unsigned connects, turns;
        uint64_t slept;
} Prog;

static uint8_t next_byte(Prog *g) {
        return g->off < g->n ? g->p[g->off++] : 0;
}

static void send_hello(Client *c, unsigned variant) {
        WireEnvelope env = WEIGHTD__V1__ENVELOPE__INIT;
        Weightd__V1__HelloRequest h = WEIGHTD__V1__HELLO_REQUEST__INIT;
        static const uint32_t range[4][2] = { { 1, 1 }, { 0, 7 }, { 2, 3 }, { 1, 1 } };

        h.min_version = range[variant][0];
        h.max_version = range[variant][1];
        h.client = (char *) "fuzz-peer";
        env.id = variant == 3 ? 0 : client_new_id(c);
        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_HELLO;
        env.hello = &h;
        client_queue(c, &env);
}

typedef struct RuleDef {
        const char *pattern;
        unsigned dim;
} RuleDef;

static const RuleDef rule_sets[8][3] = {
        { { "*.weight", 0 } },
        { { "*.weight", 1 } },
        { { "a.*", 1 }, { "*", 0 } },
        { { "*", 1 } }, /* a 1-D tensor has no dimension 1 */
        { { "*.bias", 0 }, { "*.weight", 1 } },
        { { "l?.weight", 0 }, { "conv.*", 1 } },
        { { "*", 0 } },
        { { "", 0 } }, /* an empty pattern is refused */
};

/* LOAD: a model byte (bit 6: compact_tensors) and a flags byte (bit 0
 * Prefetch, 1 progress, 2 a shard byte follows, 3-4 the target, 5 reuse a
 * recent id, 6-7 keep_host), then the shard byte: world 1 + bits 0-1, rank
 * bits 2-3, bit 4 uneven, bits 5-7 the rules. */
static void send_load(Client *c, uint8_t m, uint8_t flags, uint8_t s) {
        static const char *const targets[] = { "", "host", "cuda:0", "disk" };
        WireEnvelope env = WEIGHTD__V1__ENVELOPE__INIT;
        Weightd__V1__LoadRequest l = WEIGHTD__V1__LOAD_REQUEST__INIT;
        Weightd__V1__Shard sh = WEIGHTD__V1__SHARD__INIT;
        Weightd__V1__ShardRule rules[3], *rule_ptrs[3];
        char model[256];

        l.model = (char *) model_path(m, model, sizeof(model));
        l.component = (char *) model_component(m);
        l.target = (char *) targets[(flags >> 3) & 3];
        l.progress = flags & 2;
        l.keep_host = (Weightd__V1__KeepHost) (flags >> 6); /* 3 is not a value */
        l.compact_tensors = (m >> 6) & 1;
        if (flags & 4) {
                const RuleDef *set = rule_sets[s >> 5];

                sh.world = 1 + (s & 3);
                sh.rank = (s >> 2) & 3;
                sh.uneven = (s >> 4) & 1;
                for (size_t i = 0; i < 3 && set[i].pattern; i++) {
                        weightd__v1__shard_rule__init(&rules[i]);
                        rules[i].pattern = (char *) set[i].pattern;
                        rules[i].dim = set[i].dim;
                        rule_ptrs[i] = &rules[i];
                        sh.n_rules = i + 1;
                }
                sh.rules = rule_ptrs;
                l.shard = &sh;
        }
        env.id = client_pick_id(c, flags & 32, s);
        if (flags & 1) {
                env.body_case = WEIGHTD__V1__ENVELOPE__BODY_PREFETCH;
                env.prefetch = &l;
        } else {
                env.body_case = WEIGHTD__V1__ENVELOPE__BODY_LOAD;
                env.load = &l;
        }
        client_queue(c, &env);
}

/* CANCEL: a recent request (the b-th most recent), or below 0x10 one never
 * sent. */
static void send_cancel(Client *c, uint8_t b) {
        WireEnvelope env = WEIGHTD__V1__ENVELOPE__INIT;
        Weightd__V1__CancelRequest x = WEIGHTD__V1__CANCEL_REQUEST__INIT;

        if (b < 0x10 || c->n_recent == 0)
                x.target = 1000000u + b;
        else
                x.target = c->recent[(c->n_recent - 1 - b % MIN(c->n_recent, MAX_RECENT)) % MAX_RECENT];
        env.id = client_new_id(c);
        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_CANCEL;
        env.cancel = &x;
        client_queue(c, &env);
}

/* RELEASE: a lease received (forgotten here unless bit 7 is set, which
 * releases it again later), or below 0x10 one never handed out. */
static void send_release(Client *c, uint8_t b) {
        WireEnvelope env = WEIGHTD__V1__ENVELOPE__INIT;
        Weightd__V1__ReleaseRequest x = WEIGHTD__V1__RELEASE_REQUEST__INIT;

        if (b < 0x10 || c->n_leases == 0)
                x.lease = b == 0 ? 0 : 1000000u + b;
        else {
                unsigned i = b % c->n_leases;

                x.lease = c->leases[i];
                if (!(b & 0x80))
                        c->leases[i] = c->leases[--c->n_leases];
        }
        env.id = client_new_id(c);
        env.body_case = WEIGHTD__V1__ENVELOPE__BODY_RELEASE;
        env.release = &x;
        client_queue(c, &env);
}

/* Evict, Pin, Unpin, Tensors or Components of a model byte. */
static void send_ref(Client *c, Weightd__V1__Envelope__BodyCase body, uint64_t id, const char *model,
                     const char *component) {
        WireEnvelope env = WEIGHTD__V1__ENVELOPE__INIT;
        Weightd__V1__ComponentRef ref = WEIGHTD__V1__COMPONENT_REF__INIT;

        ref.model = (char *) model;
        ref.component = (char *) component;
        env.id = id;
        env.body_case = body;
        switch (body) {
        case WEIGHTD__V1__ENVELOPE__BODY_EVICT:
                env.evict = &ref;
                break;
        case WEIGHTD__V1__ENVELOPE__BODY_PIN:
                env.pin = &ref;
                break;
        case WEIGHTD__V1__ENVELOPE__BODY_UNPIN:
                env.unpin = &ref;
                break;
        case WEIGHTD__V1__ENVELOPE__BODY_TENSORS:
                env.tensors = &ref;
                break;
        default:
                env.components = &ref;
                break;
        }
        client_queue(c, &env);
}

static void send_model_ref(Client *c, Weightd__V1__Envelope__BodyCase body, uint8_t m) {
        char model[256];

        send_ref(c, body, client_new_id(c), model_path(m, model, sizeof(model)), model_component(m));
}

static void send_list_status(Client *c, uint64_t list_id, uint64_t status_id) {
        WireEnvelope env = WEIGHTD__V1__ENVELOPE__INIT;
        Weightd__V1__ListRequest list = WEIGHTD__V1__LIST_REQUEST__INIT;
        Weightd__V1__StatusRequest status = WEIGHTD__V1__STATUS_REQUEST__INIT;

        if (list_id) {
                env.id = list_id;
                env.body_case = WEIGHTD__V1__ENVELOPE__BODY_LIST;
                env.list = &list;
                client_queue(c, &env);
        }
        if (status_id) {
                env.id = status_id;
                env.body_case = WEIGHTD__V1__ENVELOPE__BODY_STATUS;
                env.status = &status;
                client_queue(c, &env);
        }
}

/* ---- the checker -------------------------------------------------------- */

typedef struct Snapshot {
        WireEnvelope *list, *status;
} Snapshot;

static void snapshot_done(Snapshot *s) {
        wire_envelope_free(s->list);
        wire_envelope_free(s->status);
        *s = (Snapshot){};
}

/* List and Status in one write, so the daemon answers both in one go. */
static void checker_snapshot(Snapshot *ret) {
        Client *c = &checker;
        uint64_t start = now_usec_();

        c->want[0] = checker_id++;
        c->want[1] = checker_id++;
        c->next_id = checker_id;
        send_list_status(c, c->want[0], c->want[1]);
        for (unsigned spins = 0; !c->got[0] || !c->got[1]; spins++) {
                server_run_nowait(server);
                client_flush(c, SIZE_MAX);
                client_drain(c);
                if (c->dead)
                        fail("the daemon closed the checker's connection");
                if (now_usec_() - start > REPLY_USEC)
                        fail("no answer to List and Status within %u s", REPLY_USEC / 1000000u);
                if (spins > 100)
                        usleep(20);
        }
        for (size_t i = 0; i < 2; i++)
                if (c->got[i]->reply->code != WEIGHTD__V1__CODE__OK ||
                    c->got[i]->reply->result_case !=
                            (i ? WEIGHTD__V1__REPLY__RESULT_STATUS : WEIGHTD__V1__REPLY__RESULT_LIST))
                        fail("the checker's %s failed: %s", i ? "Status" : "List", c->got[i]->reply->message);
        *ret = (Snapshot){ .list = c->got[0], .status = c->got[1] };
        c->got[0] = c->got[1] = NULL;
        c->want[0] = c->want[1] = 0;
}

/* The budget and the leases agree with the entries.  Returns whether the
 * daemon is at rest: no peer but the checker, no lease, no job, every entry
 * resident and unleased. */
static bool check_snapshot(const Snapshot *s, bool report) {
        const Weightd__V1__ListReply *l = s->list->reply->list;
        const Weightd__V1__StatusReply *st = s->status->reply->status;
        uint64_t used = 0, leases = 0;
        size_t linked = 0;
        bool rest = st->connections == 1 && st->leases == 0 && st->loading == 0;

        for (size_t i = 0; i < l->n_entries; i++) {
                const Weightd__V1__Entry *e = l->entries[i];

                if (strcmp(e->tier, "host") == 0)
                        used += e->bytes;
                leases += e->leases;
                linked += strcmp(e->state, "detached") != 0 && strcmp(e->tier, "host") == 0;
                if (strcmp(e->state, "resident") != 0 || e->leases > 0)
                        rest = false;
                if (report)
                        fprintf(stderr, "  entry %s [%s] %s %s %" PRIu64 " bytes, %u leases%s\n", e->model,
                                e->component, e->shard, e->state, e->bytes, e->leases, e->pinned ? ", pinned" : "");
        }
        if (report)
                fprintf(stderr,
                        "  status: %u connections, %u leases, %u loading, %u entries, %" PRIu64 " of %" PRIu64
                        " bytes used\n",
                        st->connections, st->leases, st->loading, st->entries, st->host_used_bytes,
                        st->host_budget_bytes);
        if (used != st->host_used_bytes)
                fail("the host budget has %" PRIu64 " bytes used, the listed host entries %" PRIu64, st->host_used_bytes,
                     used);
        if (leases != st->leases)
                fail("%u leases held, the listed entries have %" PRIu64, st->leases, leases);
        if (linked != st->entries)
                fail("status counts %u entries, the list %zu that are not detached", st->entries, linked);
        if (st->host_used_bytes > st->host_budget_bytes)
                fail("%" PRIu64 " bytes used of a budget of %" PRIu64, st->host_used_bytes, st->host_budget_bytes);
        return rest;
}

static void audit(void) {
        Snapshot s;

        checker_snapshot(&s);
        (void) check_snapshot(&s, false);
        snapshot_done(&s);
}

/* After the input: every peer closed, the daemon settles; then everything
 * goes and nothing may stay behind. */
static void finish(void) {
        uint64_t start;
        Snapshot s;
        long fds;

        for (size_t i = 0; i < N_CLIENTS; i++) {
                if (verbose)
                        client_drain(&clients[i]);
                client_close(&clients[i]);
        }
        start = now_usec_();
        for (;;) {
                checker_snapshot(&s);
                if (check_snapshot(&s, false))
                        break;
                if (now_usec_() - start > SETTLE_USEC) {
                        fprintf(stderr, "fuzz-peer: the daemon did not settle within %u s after every peer left:\n",
                                SETTLE_USEC / 1000000u);
                        (void) check_snapshot(&s, true);
                        abort();
                }
                snapshot_done(&s);
                for (unsigned i = 0; i < 10; i++)
                        server_run_nowait(server);
                usleep(100);
        }

        /* Unpin and evict what the input left resident. */
        for (size_t i = 0; i < s.list->reply->list->n_entries; i++) {
                const Weightd__V1__Entry *e = s.list->reply->list->entries[i];

                send_ref(&checker, WEIGHTD__V1__ENVELOPE__BODY_UNPIN, checker_id++, e->model, e->component);
                send_ref(&checker, WEIGHTD__V1__ENVELOPE__BODY_EVICT, checker_id++, e->model, e->component);
        }
        snapshot_done(&s);
        checker.next_id = checker_id;
        checker_snapshot(&s);
        (void) check_snapshot(&s, false);
        if (s.list->reply->list->n_entries > 0 || s.status->reply->status->host_used_bytes > 0) {
                fprintf(stderr, "fuzz-peer: entries left after evicting every entry at rest:\n");
                (void) check_snapshot(&s, true);
                abort();
        }
        snapshot_done(&s);

        /* Slabs go on the daemon's worker: give it a moment. */
        start = now_usec_();
        while ((fds = count_fds()) > fd_baseline && fd_baseline >= 0) {
                if (now_usec_() - start > SETTLE_USEC) {
                        list_fds();
                        fail("%ld descriptors (not counting pipes) open at rest, %ld after the first input", fds,
                             fd_baseline);
                }
                server_run_nowait(server);
                usleep(200);
        }
        if (fd_baseline < 0)
                fd_baseline = fds;
}

static void setup(void) {
        char text[1024];
        WdError err = WD_ERROR_NULL;
        Config *c = NULL;

        signal(SIGPIPE, SIG_IGN);
        verbose = getenv("FUZZ_PEER_VERBOSE") != NULL;
        for (size_t i = 0; i < N_CLIENTS; i++)
                clients[i].fd = -1;
        if (!mkdtemp(run_dir))
                fail("mkdtemp: %m");
        atexit(remove_run_dir);
        write_models();
        snprintf(text, sizeof(text),
                 "[daemon]\nsocket = %s/weightd.sock\nmodel_roots = " FUZZ_ROOT "\nmax_pending_requests = 4\n"
                 "max_connections_per_uid = 8\nlog_level = err\n"
                 "[memory]\nhost_budget = 12M\nhugetlb_reserve = off\n"
                 "[io]\nqueue_depth = 2\nchunk_size = 64K\ndirect_io = off\n[metrics]\nlisten =\n",
                 run_dir);
        if (config_load_string(text, strlen(text), "fuzz.conf", &c, &err) != 0)
                fail("%s", err.message);
        if (server_new(&server, c, NULL) < 0)
                abort();
        /* The device search runs in the CUDA runtime on the thread pool; the
         * fuzzer exits without freeing the server, which would tear the
         * runtime down under a search still running. */
        while (server_searching_devices(server)) {
                server_run_nowait(server);
                usleep(1000);
        }
        checker.fd = -1;
        if (!client_connect(&checker, getuid()))
                fail("cannot connect the checker");
        send_hello(&checker, 0);
        checker_id = checker.next_id;
        audit();
}

/* ---- the program -------------------------------------------------------- */

enum {
        OP_CONNECT,    /* variant bit 0: another uid */
        OP_HELLO,      /* variant: good, a wide range, no overlap, id 0 */
        OP_LOAD,       /* model, flags[, shard] */
        OP_CANCEL,     /* which */
        OP_RELEASE,    /* which */
        OP_ENTRY,      /* model; variant: evict, pin, unpin, evict */
        OP_QUERY,      /* model; variant: list, status, tensors, components */
        OP_CLOSE,      /* variant: close, shut the write side, close, shut both */
        OP_DRAIN,      /* read and check what came */
        OP_RUN,        /* turns; variant bit 0: read every client each turn */
        OP_SLEEP,      /* (variant + 1) ms */
        OP_RAW,        /* length, bytes */
        OP_PIPELINE,   /* count, then that many request operations, in one write */
        OP_CUT,        /* bytes, one request operation: that many bytes now, the rest next turn */
        OP_AUDIT,      /* the checker's List and Status agree */
        OP_LOAD_ALL,   /* flags: a Load or Prefetch of every model in one write */
};

/* One request operation, appended to c's output. */
static bool request_op(Prog *g, Client *c, unsigned op, unsigned variant) {
        static const Weightd__V1__Envelope__BodyCase entry_ops[] = {
                WEIGHTD__V1__ENVELOPE__BODY_EVICT,
                WEIGHTD__V1__ENVELOPE__BODY_PIN,
                WEIGHTD__V1__ENVELOPE__BODY_UNPIN,
                WEIGHTD__V1__ENVELOPE__BODY_EVICT,
        };
        uint8_t a, b;

        switch (op) {
        case OP_HELLO:
                send_hello(c, variant);
                return true;
        case OP_LOAD:
                a = next_byte(g);
                b = next_byte(g);
                send_load(c, a, b, (b & 4) || (b & 32) ? next_byte(g) : 0);
                return true;
        case OP_CANCEL:
                send_cancel(c, next_byte(g));
                return true;
        case OP_RELEASE:
                send_release(c, next_byte(g));
                return true;
        case OP_ENTRY:
                send_model_ref(c, entry_ops[variant], next_byte(g));
                return true;
        case OP_QUERY:
                a = next_byte(g);
                if (variant == 0)
                        send_list_status(c, client_new_id(c), 0);
                else if (variant == 1)
                        send_list_status(c, 0, client_new_id(c));
                else
                        send_model_ref(c,
                                       variant == 2 ? WEIGHTD__V1__ENVELOPE__BODY_TENSORS
                                                    : WEIGHTD__V1__ENVELOPE__BODY_COMPONENTS,
                                       a);
                return true;
        case OP_RAW:
                a = next_byte(g);
                a = (uint8_t) MIN((size_t) a, g->n - g->off);
                client_append(c, g->p + g->off, a);
                g->off += a;
                c->tainted = true;
                return true;
        default:
                return false;
        }
}

static void step(Prog *g) {
        uint8_t x = next_byte(g), a;
        unsigned op = x & 15, variant = x >> 6;
        Client *c = &clients[(x >> 4) & 3];
        bool usable = c->fd >= 0 && !c->dead;

        switch (op) {
        case OP_CONNECT:
                if (g->connects++ < MAX_CONNECTS)
                        (void) client_connect(c, getuid() + (variant & 1));
                return;
        case OP_CLOSE:
                if (c->fd < 0)
                        return;
                if (variant == 1 || variant == 3) {
                        (void) shutdown(c->fd, variant == 1 ? SHUT_WR : SHUT_RDWR);
                        c->out_len = 0;
                        if (variant == 3)
                                c->dead = true;
                } else
                        client_close(c);
                return;
        case OP_DRAIN:
                client_drain(c);
                return;
        case OP_RUN:
                a = next_byte(g);
                for (unsigned i = 0; i <= (a & 31u) && g->turns < MAX_TURNS; i++, g->turns++) {
                        turn();
                        if (variant & 1)
                                for (size_t k = 0; k < N_CLIENTS; k++)
                                        client_drain(&clients[k]);
                }
                return;
        case OP_SLEEP:
                if (g->slept + (variant + 1) * 1000u <= MAX_SLEEP_USEC) {
                        g->slept += (variant + 1) * 1000u;
                        usleep((variant + 1) * 1000u);
                }
                return;
        case OP_AUDIT:
                audit();
                return;
        case OP_PIPELINE:
                a = next_byte(g);
                for (unsigned i = 0; i <= (a & 7u) && g->off < g->n; i++) {
                        uint8_t y = next_byte(g);

                        (void) request_op(g, c, y & 15, y >> 6);
                }
                break;
        case OP_CUT:
                a = next_byte(g);
                x = next_byte(g);
                (void) request_op(g, c, x & 15, x >> 6);
                if (usable && !c->hold) {
                        client_flush(c, (size_t) a + 1);
                        c->hold = true;
                }
                return;
        case OP_LOAD_ALL:
                a = next_byte(g);
                for (uint8_t m = 0; m < 8; m++)
                        send_load(c, m, a & 0x1b, 0);
                break;
        default:
                (void) request_op(g, c, op, variant);
                break;
        }
        if (!c->hold)
                client_flush(c, SIZE_MAX);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        Prog g = { .p = data, .n = size };

        if (!server)
                setup();
        input_usec = now_usec_();
        while (g.off < g.n)
                step(&g);
        finish();
        return 0;
}
