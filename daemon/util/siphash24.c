/* SipHash-2-4 after the reference implementation: the state is four 64-bit
 * words; each 8-byte little-endian word of input is mixed in with two
 * rounds, and the length byte and four more rounds finish it.  Bytes that do
 * not fill a word wait in padding until the next piece or the end. */
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "util/siphash24.h"

static uint64_t rotl(uint64_t x, unsigned b) {
        return (x << b) | (x >> (64 - b));
}

static uint64_t load_le64(const uint8_t *p) {
        uint64_t v = 0;

        for (unsigned i = 0; i < 8; i++)
                v |= (uint64_t) p[i] << (8 * i);
        return v;
}

static void sipround(SipHash *s) {
        s->v0 += s->v1;
        s->v1 = rotl(s->v1, 13);
        s->v1 ^= s->v0;
        s->v0 = rotl(s->v0, 32);
        s->v2 += s->v3;
        s->v3 = rotl(s->v3, 16);
        s->v3 ^= s->v2;
        s->v0 += s->v3;
        s->v3 = rotl(s->v3, 21);
        s->v3 ^= s->v0;
        s->v2 += s->v1;
        s->v1 = rotl(s->v1, 17);
        s->v1 ^= s->v2;
        s->v2 = rotl(s->v2, 32);
}

static void mix(SipHash *s, uint64_t m) {
        s->v3 ^= m;
        sipround(s);
        sipround(s);
        s->v0 ^= m;
}

void siphash24_init(SipHash *s, const uint8_t key[static SIPHASH_KEY_SIZE]) {
        uint64_t k0 = load_le64(key), k1 = load_le64(key + 8);

        *s = (SipHash){
                .v0 = 0x736f6d6570736575ULL ^ k0,
                .v1 = 0x646f72616e646f6dULL ^ k1,
                .v2 = 0x6c7967656e657261ULL ^ k0,
                .v3 = 0x7465646279746573ULL ^ k1,
        };
}

void siphash24_compress(SipHash *s, const void *data, size_t n) {
        const uint8_t *p = data;
        unsigned have = s->inlen & 7;

        s->inlen += n;
        /* Fill the partial word first. */
        for (; have > 0 && have < 8 && n > 0; have++, n--)
                s->padding |= (uint64_t) *p++ << (8 * have);
        if (have == 8) {
                mix(s, s->padding);
                s->padding = 0;
        } else if (have > 0)
                return; /* n is 0: the word is still partial */
        for (; n >= 8; p += 8, n -= 8)
                mix(s, load_le64(p));
        for (unsigned i = 0; i < n; i++)
                s->padding |= (uint64_t) p[i] << (8 * i);
}

uint64_t siphash24_finalize(SipHash *s) {
        mix(s, s->padding | ((uint64_t) (s->inlen & 0xff) << 56));
        s->v2 ^= 0xff;
        sipround(s);
        sipround(s);
        sipround(s);
        sipround(s);
        return s->v0 ^ s->v1 ^ s->v2 ^ s->v3;
}

void siphash24_random_key(uint8_t ret[static SIPHASH_KEY_SIZE]) {
        static uint64_t calls;
        struct timespec ts;
        uint64_t seed[2];

        if (getrandom(ret, SIPHASH_KEY_SIZE, GRND_NONBLOCK) == SIPHASH_KEY_SIZE)
                return;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        seed[0] = (uint64_t) ts.tv_nsec ^ ((uint64_t) ts.tv_sec << 30) ^ ((uint64_t) getpid() << 48);
        seed[1] = __atomic_add_fetch(&calls, 1, __ATOMIC_RELAXED) ^ (uint64_t) (uintptr_t) ret;
        memcpy(ret, seed, SIPHASH_KEY_SIZE);
}
