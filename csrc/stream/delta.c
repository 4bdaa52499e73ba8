/* Delta pages: the XOR + zero-run codec and the source's page cache (vfmig/delta.h). */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "vfmig/delta.h"

#define WORDS (VFMIG_PAGE_SIZE / 8)

static inline uint64_t word(const uint8_t *p, uint32_t i)
{
    uint64_t w;
    memcpy(&w, p + i * 8, 8);
    return w;
}

/* First word index >= i where cur and old differ, or WORDS. SSE4.1 over 64 bytes at a time:
 * most of a re-dirtied page is unchanged, and this skip is where the encoder spends its time. */
static uint32_t next_diff(const uint8_t *cur, const uint8_t *old, uint32_t i)
{
    while (i % 8 && i < WORDS && word(cur, i) == word(old, i))
        i++;
    if (i % 8)
        return i;
    for (; i < WORDS; i += 8) {
        const __m128i *a = (const __m128i *)(cur + i * 8), *b = (const __m128i *)(old + i * 8);
        __m128i x = _mm_or_si128(_mm_or_si128(_mm_xor_si128(_mm_loadu_si128(a), _mm_loadu_si128(b)),
                                              _mm_xor_si128(_mm_loadu_si128(a + 1), _mm_loadu_si128(b + 1))),
                                 _mm_or_si128(_mm_xor_si128(_mm_loadu_si128(a + 2), _mm_loadu_si128(b + 2)),
                                              _mm_xor_si128(_mm_loadu_si128(a + 3), _mm_loadu_si128(b + 3))));
        if (!_mm_testz_si128(x, x))
            break;
    }
    while (i < WORDS && word(cur, i) == word(old, i))
        i++;
    return i;
}

static uint8_t *put_leb(uint8_t *o, uint32_t v)
{
    if (v < 0x80) {
        *o++ = (uint8_t)v;
    } else {
        *o++ = (uint8_t)(v | 0x80);
        *o++ = (uint8_t)(v >> 7);
    }
    return o;
}

int vfmig_delta_encode(const uint8_t *cur, const uint8_t *old, uint8_t *out)
{
    uint8_t *o = out, *end = out + VFMIG_DELTA_MAX;
    uint32_t pos = 0; /* page offset after the last chunk */
    for (uint32_t i = next_diff(cur, old, 0); i < WORDS; i = next_diff(cur, old, i)) {
        uint32_t j = i + 1;
        while (j < WORDS && word(cur, j) != word(old, j))
            j++;
        /* Trim the run to its changed bytes. The words are read again below, so a word that
         * changes meanwhile only changes the bytes sent, never the framing. */
        uint64_t first = word(cur, i) ^ word(old, i), last = word(cur, j - 1) ^ word(old, j - 1);
        uint32_t start = i * 8 + (first ? (uint32_t)__builtin_ctzll(first) / 8 : 0);
        uint32_t stop = j * 8 - (last ? (uint32_t)__builtin_clzll(last) / 8 : 0);
        if (stop <= start) { /* the guest undid its change meanwhile: nothing to send here */
            i = j;
            continue;
        }
        uint32_t len = stop - start;
        if (o + 4 + len > end)
            return -1;
        o = put_leb(o, start - pos);
        o = put_leb(o, len);
        for (uint32_t k = 0; k < len; k++)
            o[k] = cur[start + k] ^ old[start + k];
        o += len;
        pos = stop;
        i = j;
    }
    return (int)(o - out);
}

/* A LEB128 of at most 2 bytes. Returns the bytes read, or 0 if malformed or past end. */
static size_t get_leb(const uint8_t *p, const uint8_t *end, uint32_t *v)
{
    if (p >= end)
        return 0;
    if (!(p[0] & 0x80)) {
        *v = p[0];
        return 1;
    }
    if (p + 1 >= end || (p[1] & 0x80) || p[1] == 0) /* the canonical form only */
        return 0;
    *v = (uint32_t)(p[0] & 0x7f) | (uint32_t)p[1] << 7;
    return 2;
}

int vfmig_delta_apply(uint8_t *page, const uint8_t *body, size_t len)
{
    const uint8_t *p = body, *end = body + len;
    uint32_t pos = 0;
    while (p < end) {
        uint32_t skip, n;
        size_t a = get_leb(p, end, &skip);
        size_t b = a ? get_leb(p + a, end, &n) : 0;
        if (!b || n == 0)
            return -1;
        p += a + b;
        if ((uint64_t)pos + skip + n > VFMIG_PAGE_SIZE || (size_t)(end - p) < n)
            return -1;
        pos += skip;
        for (uint32_t k = 0; k < n; k++)
            page[pos + k] ^= p[k];
        pos += n;
        p += n;
    }
    return 0;
}

int vfmig_delta_cache_init(struct vfmig_delta_cache *c, uint64_t nslots)
{
    memset(c, 0, sizeof(*c));
    if (!nslots)
        return 0;
    c->tag = calloc(nslots, sizeof(*c->tag));
    c->used = calloc(nslots, sizeof(*c->used));
    c->data = aligned_alloc(VFMIG_PAGE_SIZE, nslots * VFMIG_PAGE_SIZE);
    if (!c->tag || !c->used || !c->data) {
        vfmig_delta_cache_free(c);
        return -1;
    }
    c->nslots = nslots;
    return 0;
}

void vfmig_delta_cache_free(struct vfmig_delta_cache *c)
{
    free(c->tag);
    free(c->used);
    free(c->data);
    memset(c, 0, sizeof(*c));
}
