/* Replies unpacked into an arena.  A LoadReply of a component of 100,000
 * tensors unpacks into some 400,000 small blocks (each Tensor, its name, its
 * dtype, its shape); malloc() and free() of each were a fifth of a lease's
 * time in the library.  Here protobuf-c allocates from large blocks by
 * bumping a pointer, its frees do nothing, and the whole reply goes at once
 * in client_envelope_free().
 *
 * The Arena lives in its first block, in front of the first allocation,
 * which protobuf-c makes for the message itself (the Envelope) before any
 * other: client_unpack() checks that it did (a reply that does not is
 * refused as undecodable, so a protobuf-c that changed this fails every
 * test at once), and client_envelope_free() finds the arena from the
 * envelope alone. */
#include <stdalign.h>
#include <string.h>

#include "client-internal.h"

#define ARENA_ALIGN 16u
#define ARENA_MIN_BLOCK ((size_t) 64 << 10)

typedef struct ArenaBlock {
        struct ArenaBlock *next;
        size_t size, used;
        alignas(ARENA_ALIGN) unsigned char data[];
} ArenaBlock;

/* sizeof(Arena) is a multiple of ARENA_ALIGN: the first allocation
 * follows it. */
typedef struct Arena {
        alignas(ARENA_ALIGN) ArenaBlock *blocks;
        size_t next_size;
        void *first;
} Arena;

static void *arena_block_take(ArenaBlock *b, size_t size) {
        void *p = b->data + b->used;

        b->used += (size + ARENA_ALIGN - 1) & ~(size_t) (ARENA_ALIGN - 1);
        return p;
}

static void *arena_alloc(void *data, size_t size) {
        Arena *a = data;
        ArenaBlock *b = a->blocks;
        size_t need, block;

        if (size > SIZE_MAX / 4)
                return NULL;
        need = (size + ARENA_ALIGN - 1) & ~(size_t) (ARENA_ALIGN - 1);
        if (b->size - b->used >= need)
                return arena_block_take(b, size);
        block = MAX(a->next_size, need);
        b = malloc(sizeof(ArenaBlock) + block);
        if (!b)
                return NULL;
        *b = (ArenaBlock){ .next = a->blocks, .size = block };
        a->blocks = b;
        if (a->next_size < ((size_t) 64 << 20))
                a->next_size *= 2;
        return arena_block_take(b, size);
}

static void arena_free(void *data, void *p) {
        /* Everything goes with the arena. */
}

static void arena_destroy(Arena *a, ArenaBlock *first) {
        ArenaBlock *b = a->blocks;

        while (b) {
                ArenaBlock *next = b->next;

                if (b != first)
                        free(b);
                b = next;
        }
        free(first); /* holds a itself */
}

WireEnvelope *client_unpack(const uint8_t *payload, size_t len) {
        /* Unpacked replies take about 4 times their frame: start there. */
        size_t size = MAX(ARENA_MIN_BLOCK, len < SIZE_MAX / 8 ? 4 * len : len);
        ArenaBlock *first = malloc(sizeof(ArenaBlock) + sizeof(Arena) + size);
        ProtobufCAllocator alloc;
        WireEnvelope *env;
        Arena *a;

        if (!first)
                return NULL;
        *first = (ArenaBlock){ .size = sizeof(Arena) + size, .used = sizeof(Arena) };
        a = (Arena *) first->data;
        *a = (Arena){ .blocks = first, .next_size = size, .first = first->data + sizeof(Arena) };
        alloc = (ProtobufCAllocator){ .alloc = arena_alloc, .free = arena_free, .allocator_data = a };
        env = weightd__v1__envelope__unpack(&alloc, len, payload);
        if (env && (void *) env != a->first)
                /* A protobuf-c that allocates the message later: then the
                 * arena cannot be found from it.  Every reply fails to
                 * decode, loudly, rather than being freed wrongly. */
                env = NULL;
        if (!env)
                arena_destroy(a, first);
        return env;
}

void client_envelope_free(WireEnvelope *env) {
        if (!env)
                return;

        Arena *a = (Arena *) ((unsigned char *) env - sizeof(Arena));
        ArenaBlock *first = (ArenaBlock *) ((unsigned char *) a - offsetof(ArenaBlock, data));

        arena_destroy(a, first);
}
