/* CRC32C, two ways, chosen at load time (vfmig_crc32c_use can switch, for tests and benches):
 * - fold: carry-less multiplication (VPCLMULQDQ on AVX-512), 256 bytes a step, where the CPU
 *   has it. It runs at memory speed on RAM that is not in cache (the page sender's case), about
 *   twice the crc32 instruction's rate on this machine (docs/host-facts.md);
 * - lanes: the SSE4.2 crc32 instruction on three interleaved lanes (its latency is three, its
 *   throughput one), everywhere else, and for short buffers.
 * Both reduce modulo the same polynomial, so either can continue the other's CRC. Every
 * constant is computed from the polynomial at load time, not written out. */
#include <immintrin.h>
#include <nmmintrin.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "vfmig/crc32c.h"

#define POLY 0x82F63B78u /* reflected Castagnoli */
#define LANE 8192u
#define FOLD_MIN 256u    /* the fold's first step takes four 64-byte vectors */

/* a * b modulo POLY, reflected bit order (x^0 is the top bit). */
static uint32_t multmodp(uint32_t a, uint32_t b)
{
    if (!a) /* the loop below ends on a's last set bit */
        return 0;
    uint32_t m = 1u << 31, p = 0;
    for (;;) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0)
                break;
        }
        m >>= 1;
        b = (b & 1) ? (b >> 1) ^ POLY : b >> 1;
    }
    return p;
}

/* x^n modulo POLY. */
static uint32_t xpow(uint64_t n)
{
    uint32_t p = 1u << 31, x2k = 1u << 30; /* x^0, and x^(2^k) starting at x^1 */
    while (n) {
        if (n & 1)
            p = multmodp(x2k, p);
        x2k = multmodp(x2k, x2k);
        n >>= 1;
    }
    return p;
}

uint32_t vfmig_crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b)
{
    return multmodp(xpow(8 * len_b), crc_a) ^ crc_b;
}

/* Fold constants: moving a 128-bit block D bits further multiplies its high-degree half by
 * x^(D+64) and its low half by x^D. A carry-less product of two reflected 64-bit values comes
 * out one bit short of 128, which is one more factor of x: hence D+63 and D-1. The 32-bit
 * residues sit in the top of each 64-bit half, as reflected values of degree < 64 do. */
struct fold_k {
    uint64_t hi, lo;
};
static struct fold_k fold_k(uint64_t d)
{
    return (struct fold_k){(uint64_t)xpow(d + 63) << 32, (uint64_t)xpow(d - 1) << 32};
}

/* Set once, before main, by crc_init; read-only afterwards except through vfmig_crc32c_use. */
static struct {
    uint32_t lane_op;                    /* x^(8*LANE): joins the three lanes */
    struct fold_k k2048, k512, k384, k256, k128;
    int can_fold;
} C;
static _Atomic int use_fold;

__attribute__((constructor)) static void crc_init(void)
{
    C.lane_op = xpow(8ull * LANE);
    C.k2048 = fold_k(2048);
    C.k512 = fold_k(512);
    C.k384 = fold_k(384);
    C.k256 = fold_k(256);
    C.k128 = fold_k(128);
    __builtin_cpu_init(); /* constructors may run before libgcc's own */
    C.can_fold = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("vpclmulqdq");
    const char *force = getenv("VFMIG_CRC32C");
    atomic_store_explicit(&use_fold, C.can_fold && !(force && strcmp(force, "lanes") == 0), memory_order_relaxed);
}

/* The crc32-instruction loop, from raw state a (not inverted). With dst it also copies src to
 * dst as it goes: one pass over the data instead of a memcpy and a CRC. static inline with
 * dst == NULL constant folds the stores away. */
static inline uint64_t crc_lanes(uint64_t a, uint8_t *dst, const uint8_t *p, size_t len)
{
    while (len >= 3 * LANE) {
        uint64_t b = 0xffffffffu, c = 0xffffffffu;
        for (size_t i = 0; i < LANE; i += 8) {
            uint64_t wa, wb, wc;
            memcpy(&wa, p + i, 8);
            memcpy(&wb, p + LANE + i, 8);
            memcpy(&wc, p + 2 * LANE + i, 8);
            a = _mm_crc32_u64(a, wa);
            b = _mm_crc32_u64(b, wb);
            c = _mm_crc32_u64(c, wc);
            if (dst) {
                memcpy(dst + i, &wa, 8);
                memcpy(dst + LANE + i, &wb, 8);
                memcpy(dst + 2 * LANE + i, &wc, 8);
            }
        }
        /* Join the lanes as standard CRCs: crc(A||B||C) = shift(shift(A) ^ B) ^ C. */
        uint32_t ca = ~(uint32_t)a, cb = ~(uint32_t)b, cc = ~(uint32_t)c;
        uint32_t joined = multmodp(C.lane_op, multmodp(C.lane_op, ca) ^ cb) ^ cc;
        a = ~joined & 0xffffffffu;
        p += 3 * LANE;
        len -= 3 * LANE;
        if (dst)
            dst += 3 * LANE;
    }
    for (; len >= 8; p += 8, len -= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        a = _mm_crc32_u64(a, w);
        if (dst) {
            memcpy(dst, &w, 8);
            dst += 8;
        }
    }
    for (; len; p++, len--) {
        a = _mm_crc32_u8((uint32_t)a, *p);
        if (dst)
            *dst++ = *p;
    }
    return a;
}

#define FOLD_TARGET __attribute__((target("avx512f,vpclmulqdq")))

FOLD_TARGET static inline __m512i k512v(struct fold_k k) { return _mm512_broadcast_i32x4(_mm_set_epi64x((long long)k.lo, (long long)k.hi)); }

/* x moved one fold distance on (by k), plus the next data y: per 128-bit lane. */
FOLD_TARGET static inline __m512i fold(__m512i x, __m512i k, __m512i y)
{
    return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(x, k, 0x00), _mm512_clmulepi64_epi128(x, k, 0x11), y,
                                     0x96 /* three-way xor */);
}

FOLD_TARGET static inline __m512i load(uint8_t **dst, const uint8_t *p)
{
    __m512i v = _mm512_loadu_si512(p);
    if (*dst) {
        _mm512_storeu_si512(*dst, v);
        *dst += 64;
    }
    return v;
}

/* The fold: a polynomial congruent to the data modulo POLY is all the crc32 instruction needs
 * to finish, so the data is folded down to 128 bits and those go through the instruction. A
 * starting state s is xor-ed into the first four bytes, which is what the instruction does with
 * it. len >= FOLD_MIN. */
FOLD_TARGET static uint64_t crc_fold(uint64_t s, uint8_t *dst, const uint8_t *p, size_t len)
{
    __m512i x0 = load(&dst, p), x1 = load(&dst, p + 64), x2 = load(&dst, p + 128), x3 = load(&dst, p + 192);
    x0 = _mm512_xor_si512(x0, _mm512_zextsi128_si512(_mm_cvtsi32_si128((int)(uint32_t)s)));
    p += 256;
    len -= 256;
    __m512i k = k512v(C.k2048); /* four vectors apart: 2048 bits */
    for (; len >= 256; p += 256, len -= 256) {
        __m512i y0 = load(&dst, p), y1 = load(&dst, p + 64), y2 = load(&dst, p + 128), y3 = load(&dst, p + 192);
        x0 = fold(x0, k, y0);
        x1 = fold(x1, k, y1);
        x2 = fold(x2, k, y2);
        x3 = fold(x3, k, y3);
    }
    k = k512v(C.k512);
    x3 = fold(fold(fold(x0, k, x1), k, x2), k, x3);
    for (; len >= 64; p += 64, len -= 64)
        x3 = fold(x3, k, load(&dst, p));
    /* The last vector's four 128-bit lanes onto its last one: 384, 256 and 128 bits on. */
    __m512i kl = _mm512_inserti32x4(_mm512_setzero_si512(), _mm_set_epi64x((long long)C.k384.lo, (long long)C.k384.hi), 0);
    kl = _mm512_inserti32x4(kl, _mm_set_epi64x((long long)C.k256.lo, (long long)C.k256.hi), 1);
    kl = _mm512_inserti32x4(kl, _mm_set_epi64x((long long)C.k128.lo, (long long)C.k128.hi), 2);
    __m512i t = _mm512_xor_si512(_mm512_clmulepi64_epi128(x3, kl, 0x00), _mm512_clmulepi64_epi128(x3, kl, 0x11));
    __m128i a = _mm_xor_si128(_mm_xor_si128(_mm512_extracti32x4_epi32(t, 0), _mm512_extracti32x4_epi32(t, 1)),
                              _mm_xor_si128(_mm512_extracti32x4_epi32(t, 2), _mm512_extracti32x4_epi32(x3, 3)));
    s = _mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(a));
    s = _mm_crc32_u64(s, (uint64_t)_mm_extract_epi64(a, 1));
    return crc_lanes(s, dst, p, len); /* the last < 64 bytes */
}

static inline uint32_t crc_any(uint32_t crc, uint8_t *dst, const uint8_t *p, size_t len)
{
    uint64_t s = ~crc & 0xffffffffu;
    if (len >= FOLD_MIN && atomic_load_explicit(&use_fold, memory_order_relaxed))
        return ~(uint32_t)crc_fold(s, dst, p, len);
    return ~(uint32_t)crc_lanes(s, dst, p, len);
}

uint32_t vfmig_crc32c(uint32_t crc, const void *buf, size_t len) { return crc_any(crc, NULL, buf, len); }

uint32_t vfmig_crc32c_copy(uint32_t crc, void *dst, const void *src, size_t len)
{
    return crc_any(crc, dst, src, len);
}

const char *vfmig_crc32c_impl(void)
{
    return atomic_load_explicit(&use_fold, memory_order_relaxed) ? "fold" : "lanes";
}

int vfmig_crc32c_use(const char *impl)
{
    if (strcmp(impl, "lanes") == 0)
        atomic_store_explicit(&use_fold, 0, memory_order_relaxed);
    else if (strcmp(impl, "fold") == 0 && C.can_fold)
        atomic_store_explicit(&use_fold, 1, memory_order_relaxed);
    else
        return -1;
    return 0;
}

uint32_t vfmig_crc32c_sw(uint32_t crc, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    crc = ~crc;
    while (len--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++)
            crc = (crc & 1) ? (crc >> 1) ^ POLY : crc >> 1;
    }
    return ~crc;
}
