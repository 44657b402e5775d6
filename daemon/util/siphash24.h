/* SipHash-2-4 (Aumasson and Bernstein, "SipHash: a fast short-input PRF",
 * 2012): a keyed 64-bit hash for hash tables whose keys come from outside,
 * so that nobody who does not know the key can make entries collide (as
 * systemd's hashmaps and the Linux kernel's use it).
 *
 * Incremental: siphash24_compress() may be called any number of times, on
 * pieces of any length; the result is that of the concatenated pieces. */
#pragma once

#include <stddef.h>
#include <stdint.h>

typedef struct SipHash {
        uint64_t v0, v1, v2, v3;
        uint64_t padding; /* bytes of a partial word, little-endian */
        size_t inlen;
} SipHash;

#define SIPHASH_KEY_SIZE 16

/* A key nobody can guess, from getrandom(); before the kernel's pool is
 * ready (early boot) one that still differs per process and per call. */
void siphash24_random_key(uint8_t ret[static SIPHASH_KEY_SIZE]);

void siphash24_init(SipHash *s, const uint8_t key[static SIPHASH_KEY_SIZE]);
void siphash24_compress(SipHash *s, const void *data, size_t n);
uint64_t siphash24_finalize(SipHash *s);

static inline uint64_t siphash24(const void *data, size_t n, const uint8_t key[static SIPHASH_KEY_SIZE]) {
        SipHash s;

        siphash24_init(&s, key);
        siphash24_compress(&s, data, n);
        return siphash24_finalize(&s);
}
