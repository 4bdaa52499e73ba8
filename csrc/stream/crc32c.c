/* CRC32C: three interleaved hardware lanes (the crc32 instruction has a latency of three and
 * a throughput of one), joined by multiplying in GF(2) modulo the polynomial. */
#include <nmmintrin.h>
#include <stdatomic.h>
#include <string.h>

#include "vfmig/crc32c.h"

#define POLY 0x82F63B78u /* reflected Castagnoli */
#define LANE 8192u

/* a * b modulo POLY, reflected bit order (x^0 is the top bit). */
static uint32_t multmodp(uint32_t a, uint32_t b)
{
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

/* x^(8 * n) modulo POLY: the operator that shifts a CRC over n zero bytes. */
static uint32_t xpow8n(uint64_t n)
{
    uint32_t p = 1u << 31, x2k = 1u << 30; /* x^0, and x^(2^k) starting at x^1 */
    for (int k = 0; k < 3; k++)
        x2k = multmodp(x2k, x2k); /* x^8: one byte */
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
    return multmodp(xpow8n(len_b), crc_a) ^ crc_b;
}

/* The one loop behind both entry points. With dst it also copies src to dst as it goes: one
 * pass over the data instead of a memcpy and a CRC. static inline with dst == NULL constant
 * folds the stores away. */
static inline uint32_t crc_lanes(uint32_t crc, uint8_t *dst, const uint8_t *p, size_t len)
{
    /* x^(8*LANE), computed once. Threads may race to compute it; each stores the same value,
     * and the relaxed atomic makes that race defined (a plain static is a data race). */
    static _Atomic uint32_t lane_op_cache;
    uint32_t lane_op = atomic_load_explicit(&lane_op_cache, memory_order_relaxed);
    if (!lane_op) {
        lane_op = xpow8n(LANE);
        atomic_store_explicit(&lane_op_cache, lane_op, memory_order_relaxed);
    }
    uint64_t a = ~crc & 0xffffffffu;
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
        uint32_t joined = multmodp(lane_op, multmodp(lane_op, ca) ^ cb) ^ cc;
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
    return ~(uint32_t)a;
}

uint32_t vfmig_crc32c(uint32_t crc, const void *buf, size_t len) { return crc_lanes(crc, NULL, buf, len); }

uint32_t vfmig_crc32c_copy(uint32_t crc, void *dst, const void *src, size_t len)
{
    return crc_lanes(crc, dst, src, len);
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
