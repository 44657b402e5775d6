/* Framing of the control API, shared by the daemon and the client library.
 *
 * A frame is a u32 little-endian length followed by that many bytes of a
 * weightd.v1.Envelope.  File descriptors ride with SCM_RIGHTS on the first
 * sendmsg() of the frame that refers to them; the receiver queues them in
 * arrival order and a frame that refers to k descriptors takes the first k.
 *
 * Nothing here allocates more than the announced frame length, and the
 * length is checked against the receiver's limit before the buffer grows;
 * wire_unpack_bounded() holds decoding to a budget proportional to it. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "weightd.pb-c.h"

#define WIRE_VERSION 1
#define WIRE_HEADER_SIZE 4u
/* The kernel's cap on descriptors in one SCM_RIGHTS message (SCM_MAX_FD). */
#define WIRE_MAX_FDS 253u
#define WIRE_DEFAULT_MAX_FRAME (16u << 20)

typedef Weightd__V1__Envelope WireEnvelope;

/* Serialize env with its length prefix into a new buffer (free()).  Returns 0,
 * -EMSGSIZE when it would exceed max_frame, or -ENOMEM. */
int wire_pack(const WireEnvelope *env, size_t max_frame, uint8_t **ret_buf, size_t *ret_len);

/* Unpack one frame's payload (without the prefix); NULL when malformed or
 * out of memory.  The heap it takes is not bounded: for frames from a peer
 * that is trusted to send sane ones (the client reading the daemon's
 * replies). */
WireEnvelope *wire_unpack(const uint8_t *payload, size_t len);

/* The same with a heap budget, for frames from untrusted peers (the daemon
 * reading requests).  protobuf-c materialises every element of a repeated
 * field before anything can be checked: an empty ShardRule is 2 bytes on the
 * wire and over 100 on the heap (its struct, a pointer to it and protobuf-c's
 * scan slot), and a 16 MiB frame of them took the daemon to 723 MiB.  Here
 * every allocation protobuf-c makes (the messages, their strings and arrays,
 * its own scratch space) is charged what it costs on the heap -- its size
 * and malloc's chunk overhead, at least 32 bytes -- and freeing gives
 * nothing back (what protobuf-c frees before it returns is its small scratch
 * space); an allocation that would take the charge
 * over heap_budget fails, protobuf-c frees what it built and NULL is
 * returned, as for a malformed frame.
 *
 * WIRE_UNPACK_BUDGET(len) is the budget to pass for a frame of len bytes:
 * twice the frame (each string is copied with a terminator and a chunk
 * header) plus 64 KiB for the message structs and scratch space of the
 * largest request that passes the daemon's checks, a Load with 64 shard rules
 * (PROTOCOL.md, "Limits").  The largest such request, a PATH_MAX model path,
 * a 255-byte component and 64 rules with 256-byte patterns, is a frame of
 * 21 KiB that takes 28 KiB of heap, about a quarter of its budget of
 * 106 KiB; 64 one-byte rules take 13 KiB.  A frame of many small fields
 * gets at most 2 bytes of heap per byte: a 60 KiB frame of 30,000 empty
 * rules (2.6 MiB unbounded) is refused within 181 KiB, and a 16 MiB one of
 * 8,388,508 within 32 MiB + 64 KiB, where the daemon's request limit
 * (PROTOCOL.md) has not refused it already. */
#define WIRE_UNPACK_BUDGET_PER_BYTE 2u
#define WIRE_UNPACK_BUDGET_BASE ((size_t) 64 << 10)
#define WIRE_UNPACK_BUDGET(len) ((size_t) WIRE_UNPACK_BUDGET_PER_BYTE * (size_t) (len) + WIRE_UNPACK_BUDGET_BASE)

WireEnvelope *wire_unpack_bounded(const uint8_t *payload, size_t len, size_t heap_budget);

/* The allocator behind wire_unpack_bounded(), for other messages decoded
 * from peers (the daemon's node links): every allocation charged as above
 * against b->budget in b->used, nothing given back; the blocks are plain
 * malloc() blocks (free the message with protobuf-c's default allocator).
 * b must outlive the unpack. */
typedef struct WireHeapBudget {
        size_t budget;
        size_t used;
} WireHeapBudget;
ProtobufCAllocator wire_bounded_allocator(WireHeapBudget *b);

/* wire_unpack_bounded() that also reports, in *peak (when not NULL; written
 * on success and failure alike), the charge it reached: all it allocated,
 * charged as above.  For tests and benchmarks. */
WireEnvelope *wire_unpack_bounded_peak(const uint8_t *payload, size_t len, size_t heap_budget, size_t *peak);

/* Frees an envelope from any of the three (NULL is fine).  Envelopes built
 * by hand are not freed with it. */
void wire_envelope_free(WireEnvelope *env);

/* Send buf[*offset..len) on a non-blocking or blocking stream socket, with
 * the descriptors on the first byte (only while *offset is 0).  Advances
 * *offset.  Returns 0 once everything went out, -EAGAIN when the socket is
 * full (call again when writable), or -errno (-EPIPE when the peer left). */
int wire_send(int fd, const uint8_t *buf, size_t len, const int *fds, size_t n_fds, size_t *offset);

/* A receive buffer with its queue of descriptors. */
typedef struct WireReader {
        uint8_t *buf;
        size_t size; /* allocated */
        size_t used; /* received, not consumed */
        size_t done; /* bytes of the frame last returned, dropped on the next call */
        int *fds;    /* received descriptors, oldest first */
        size_t n_fds;
        uint32_t max_frame;
        unsigned max_fds; /* at most this many queued; 0 refuses any */
} WireReader;

void wire_reader_init(WireReader *r, uint32_t max_frame, unsigned max_fds);
/* Frees the buffer and closes queued descriptors. */
void wire_reader_deinit(WireReader *r);

/* One recvmsg().  Returns bytes received (> 0), 0 at end of stream, -EAGAIN,
 * -EPROTO when descriptors came that the reader does not accept (they are
 * closed) or were truncated, -EMSGSIZE when the pending frame announces a
 * length over max_frame, or -errno. */
int wire_reader_recv(WireReader *r, int fd);

/* The next complete frame, if any: returns 1 and points ret_payload at its
 * bytes (valid until the next wire_reader_* call), 0 when more bytes are
 * needed, or -EMSGSIZE when the announced length is over max_frame. */
int wire_reader_next(WireReader *r, const uint8_t **ret_payload, size_t *ret_len);

/* Take the oldest n queued descriptors into ret (caller owns them).
 * Returns 0 or -EPROTO when fewer are queued. */
int wire_reader_take_fds(WireReader *r, size_t n, int *ret);

/* Whether a frame has started but not completed (a peer that closes now
 * cut a frame in the middle). */
bool wire_reader_partial(const WireReader *r);
