/* Framing of the control API: length-prefixed protobuf Envelopes on a Unix
 * stream socket, with descriptors passed by SCM_RIGHTS.  Used by both the
 * daemon (non-blocking sockets under libuv) and the client library (blocking
 * sockets); see wire.h and PROTOCOL.md.  A bounded unpack goes through our
 * own protobuf-c allocator, which holds it to a heap budget. */

#include "wire.h"

#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define READ_AHEAD ((size_t) 64 << 10)

static uint32_t get_le32(const uint8_t *p) {
        return (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24;
}

int wire_pack(const WireEnvelope *env, size_t max_frame, uint8_t **ret_buf, size_t *ret_len) {
        size_t n = weightd__v1__envelope__get_packed_size(env);
        if (n > max_frame || n > UINT32_MAX)
                return -EMSGSIZE;

        uint8_t *buf = malloc(WIRE_HEADER_SIZE + n);
        if (!buf)
                return -ENOMEM;
        buf[0] = (uint8_t) n;
        buf[1] = (uint8_t) (n >> 8);
        buf[2] = (uint8_t) (n >> 16);
        buf[3] = (uint8_t) (n >> 24);
        weightd__v1__envelope__pack(env, buf + WIRE_HEADER_SIZE);
        *ret_buf = buf;
        *ret_len = WIRE_HEADER_SIZE + n;
        return 0;
}

/* The allocator of a bounded unpack.  It charges each block what malloc()
 * takes for it (the size plus the chunk header, rounded up to 16, at least
 * 32 bytes: glibc's chunks), and frees give nothing back: the charge is
 * all a decode allocated, the small scratch space protobuf-c frees before
 * it returns included, so it is exact and the same on every run.  The
 * budget lives in a HeapBudget on the unpacker's stack, and only while
 * protobuf-c unpacks.  The blocks are plain malloc() blocks, so every
 * envelope, bounded or not, is freed with protobuf-c's default allocator.
 * (An earlier version put a size header in front of every block of every
 * unpack, to give charges back on free: the client's replies of thousands
 * of small fields paid for it in malloc work, about 40 us of a 0.7 ms
 * attach.)  WireHeapBudget (wire.h) holds the budget. */
static size_t heap_charge(size_t size) {
        size_t c = (size + 8 + 15) & ~(size_t) 15;

        return c < 32 ? 32 : c;
}

static void *heap_alloc(void *data, size_t size) {
        WireHeapBudget *b = data;
        size_t c;
        void *p;

        if (size > SIZE_MAX / 2)
                return NULL;
        c = heap_charge(size);
        if (c > b->budget - b->used)
                return NULL;
        p = malloc(size);
        if (p)
                b->used += c;
        return p;
}

static void heap_free(void *data, void *p) {
        free(p);
}

ProtobufCAllocator wire_bounded_allocator(WireHeapBudget *b) {
        return (ProtobufCAllocator){ .alloc = heap_alloc, .free = heap_free, .allocator_data = b };
}

WireEnvelope *wire_unpack_bounded_peak(const uint8_t *payload, size_t len, size_t heap_budget, size_t *peak) {
        WireHeapBudget b = { .budget = heap_budget };
        ProtobufCAllocator a = wire_bounded_allocator(&b);
        WireEnvelope *env = weightd__v1__envelope__unpack(&a, len, payload);

        if (peak)
                *peak = b.used;
        return env;
}

WireEnvelope *wire_unpack_bounded(const uint8_t *payload, size_t len, size_t heap_budget) {
        return wire_unpack_bounded_peak(payload, len, heap_budget, NULL);
}

WireEnvelope *wire_unpack(const uint8_t *payload, size_t len) {
        return weightd__v1__envelope__unpack(NULL, len, payload);
}

void wire_envelope_free(WireEnvelope *env) {
        if (env)
                weightd__v1__envelope__free_unpacked(env, NULL);
}

int wire_send(int fd, const uint8_t *buf, size_t len, const int *fds, size_t n_fds, size_t *offset) {
        if (n_fds > WIRE_MAX_FDS)
                return -EINVAL;

        while (*offset < len) {
                struct iovec iov = { .iov_base = (void *) (buf + *offset), .iov_len = len - *offset };
                struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
                union {
                        struct cmsghdr align;
                        char buf[CMSG_SPACE(sizeof(int) * WIRE_MAX_FDS)];
                } control;

                if (*offset == 0 && n_fds > 0) {
                        memset(&control, 0, sizeof(control));
                        mh.msg_control = control.buf;
                        mh.msg_controllen = CMSG_SPACE(sizeof(int) * n_fds);
                        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
                        cm->cmsg_level = SOL_SOCKET;
                        cm->cmsg_type = SCM_RIGHTS;
                        cm->cmsg_len = CMSG_LEN(sizeof(int) * n_fds);
                        memcpy(CMSG_DATA(cm), fds, sizeof(int) * n_fds);
                }

                ssize_t k = sendmsg(fd, &mh, MSG_NOSIGNAL);
                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno == EWOULDBLOCK)
                                return -EAGAIN;
                        return -errno;
                }
                *offset += (size_t) k;
        }
        return 0;
}

void wire_reader_init(WireReader *r, uint32_t max_frame, unsigned max_fds) {
        *r = (WireReader){ .max_frame = max_frame, .max_fds = max_fds };
}

void wire_reader_deinit(WireReader *r) {
        for (size_t i = 0; i < r->n_fds; i++)
                close(r->fds[i]);
        free(r->fds);
        free(r->buf);
        *r = (WireReader){ .max_frame = r->max_frame, .max_fds = r->max_fds };
}

/* Drop the frame handed out last. */
static void reader_compact(WireReader *r) {
        if (r->done == 0)
                return;
        memmove(r->buf, r->buf + r->done, r->used - r->done);
        r->used -= r->done;
        r->done = 0;
}

/* Bytes the buffer must hold for the frame now at its head, or -EMSGSIZE. */
static int64_t reader_need(const WireReader *r) {
        if (r->used < WIRE_HEADER_SIZE)
                return WIRE_HEADER_SIZE;
        uint32_t n = get_le32(r->buf);
        if (n > r->max_frame)
                return -EMSGSIZE;
        return (int64_t) WIRE_HEADER_SIZE + n;
}

static int reader_queue_fds(WireReader *r, struct msghdr *mh) {
        int r_ = 0;

        if (mh->msg_flags & MSG_CTRUNC)
                r_ = -EPROTO;

        for (struct cmsghdr *cm = CMSG_FIRSTHDR(mh); cm; cm = CMSG_NXTHDR(mh, cm)) {
                if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
                        continue;
                size_t n = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                int *in = (int *) CMSG_DATA(cm);

                for (size_t i = 0; i < n; i++) {
                        int fd;
                        memcpy(&fd, in + i, sizeof(fd));
                        if (r_ < 0 || r->n_fds >= r->max_fds) {
                                close(fd);
                                r_ = -EPROTO;
                                continue;
                        }
                        if (!r->fds) {
                                r->fds = calloc(r->max_fds, sizeof(int));
                                if (!r->fds) {
                                        close(fd);
                                        r_ = -ENOMEM;
                                        continue;
                                }
                        }
                        r->fds[r->n_fds++] = fd;
                }
        }
        return r_;
}

int wire_reader_recv(WireReader *r, int fd) {
        reader_compact(r);

        /* Read at most to the end of the frame at the head when it is large,
         * else up to 64 KiB ahead, so a small frame costs one read. */
        int64_t need = reader_need(r);
        if (need < 0)
                return (int) need;
        size_t want = (size_t) need > READ_AHEAD ? (size_t) need : READ_AHEAD;
        if (r->used >= want)
                want = r->used + READ_AHEAD;
        if (want > r->size) {
                uint8_t *b = realloc(r->buf, want);
                if (!b)
                        return -ENOMEM;
                r->buf = b;
                r->size = want;
        }

        union {
                struct cmsghdr align;
                char buf[CMSG_SPACE(sizeof(int) * WIRE_MAX_FDS)];
        } control;
        struct iovec iov = { .iov_base = r->buf + r->used, .iov_len = r->size - r->used };
        struct msghdr mh = {
                .msg_iov = &iov,
                .msg_iovlen = 1,
                .msg_control = control.buf,
                .msg_controllen = sizeof(control.buf),
        };

        ssize_t k;
        do
                k = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);
        while (k < 0 && errno == EINTR);
        if (k < 0)
                return errno == EWOULDBLOCK ? -EAGAIN : -errno;

        int q = reader_queue_fds(r, &mh);
        if (q < 0)
                return q;
        r->used += (size_t) k;
        return k > INT32_MAX ? INT32_MAX : (int) k;
}

int wire_reader_next(WireReader *r, const uint8_t **ret_payload, size_t *ret_len) {
        reader_compact(r);

        int64_t need = reader_need(r);
        if (need < 0)
                return (int) need;
        if (r->used < (size_t) need || r->used < WIRE_HEADER_SIZE)
                return 0;

        *ret_payload = r->buf + WIRE_HEADER_SIZE;
        *ret_len = (size_t) need - WIRE_HEADER_SIZE;
        r->done = (size_t) need;
        return 1;
}

int wire_reader_take_fds(WireReader *r, size_t n, int *ret) {
        if (n == 0)
                return 0;
        if (n > r->n_fds)
                return -EPROTO;
        memcpy(ret, r->fds, n * sizeof(int));
        memmove(r->fds, r->fds + n, (r->n_fds - n) * sizeof(int));
        r->n_fds -= n;
        return 0;
}

bool wire_reader_partial(const WireReader *r) {
        return r->used > r->done;
}
