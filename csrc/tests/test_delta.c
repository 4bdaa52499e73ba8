/* Delta pages and compressed runs without KVM: the codec round-trips (and refuses what it
 * cannot shrink), malformed bodies are refused, and a receiver given DELTA and ZSTD records
 * loads good ones and rejects corrupt, truncated, oversized and out-of-order ones. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>

#include "check.h"
#include "fake_vm.h"
#include "vfmig/channels.h"
#include "vfmig/delta.h"

#define NPAGES 1024u
#define PS VFMIG_PAGE_SIZE

static void test_codec(void)
{
    static uint8_t old[PS], cur[PS], body[PS], back[PS];
    srand(7);
    for (int round = 0; round < 2000; round++) {
        for (uint32_t i = 0; i < PS; i++)
            old[i] = (uint8_t)rand();
        memcpy(cur, old, PS);
        int changes = rand() % 64;
        for (int k = 0; k < changes; k++) /* scattered bytes and short runs, at the page's edges too */
            for (uint32_t n = (uint32_t)rand() % 12 + 1, at = (uint32_t)rand() % PS; n && at < PS; n--, at++)
                cur[round % 5 == 0 ? PS - 1 - at % 16 : at] ^= (uint8_t)(rand() | 1);
        int len = vfmig_delta_encode(cur, old, body);
        CHECK(len >= 0 && len <= (int)VFMIG_DELTA_MAX);
        memcpy(back, old, PS);
        CHECK(vfmig_delta_apply(back, body, (size_t)len) == 0);
        CHECK(memcmp(back, cur, PS) == 0);
    }
    CHECK(vfmig_delta_encode(old, old, body) == 0); /* unchanged: an empty delta */
    for (uint32_t i = 0; i < PS; i++)
        cur[i] = (uint8_t)~old[i];
    CHECK(vfmig_delta_encode(cur, old, body) == -1); /* a rewritten page goes raw */

    /* Malformed bodies: every one refused. */
    uint8_t page[PS] = {0};
    const struct {
        uint8_t b[8];
        size_t n;
    } bad[] = {
        {{0, 0}, 2},                /* a zero-length chunk */
        {{0x80, 0x20, 1, 0xff}, 4}, /* skip 4096: past the page */
        {{0xff, 0x1f, 2, 1, 1}, 5}, /* skip 4095 + 2 bytes */
        {{0x81, 0x00, 1, 1}, 4},    /* a non-canonical LEB128 */
        {{0x81, 0x81, 0x01, 1}, 4}, /* a 3-byte LEB128 */
        {{0, 4, 1, 2}, 4},          /* literal cut short */
        {{5}, 1},                   /* skip without its length */
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        CHECK(vfmig_delta_apply(page, bad[i].b, bad[i].n) == -1);
    const uint8_t last[] = {0xff, 0x1f, 1, 7}; /* the page's last byte: fine */
    CHECK(vfmig_delta_apply(page, last, sizeof(last)) == 0 && page[PS - 1] == 7);
}

/* A channel's records, sealed as the sender would, with the EOS that completes the stream. */
struct out {
    uint8_t *buf;
    size_t len;
    struct vfmig_digest d;
};

static void rec(struct out *o, uint8_t enc, uint64_t first, uint32_t count, const void *payload, uint32_t plen)
{
    struct vfmig_rec_hdr h;
    struct vfmig_pages_hdr ph = {.gpa = first * PS, .count = count, .encoding = enc};
    vfmig_rec_seal(&h, VFMIG_REC_PAGES, &ph, sizeof(ph), payload, plen);
    vfmig_digest_add(&o->d, &h);
    memcpy(o->buf + o->len, &h, sizeof(h));
    memcpy(o->buf + o->len + sizeof(h), &ph, sizeof(ph));
    if (plen)
        memcpy(o->buf + o->len + sizeof(h) + sizeof(ph), payload, plen);
    o->len += sizeof(h) + sizeof(ph) + plen;
}

static void eos(struct out *o)
{
    struct vfmig_rec_hdr h;
    struct vfmig_eos e = {.records = o->d.records, .bytes = o->d.bytes, .chain = o->d.chain};
    vfmig_rec_seal(&h, VFMIG_REC_EOS, &e, sizeof(e), NULL, 0);
    memcpy(o->buf + o->len, &h, sizeof(h));
    memcpy(o->buf + o->len + sizeof(h), &e, sizeof(e));
    o->len += sizeof(h) + sizeof(e);
}

/* A DELTA run's data, as the sender builds it: per page u16 length, then the delta of v2 on v1. */
static uint32_t delta_run(const uint8_t *v1, const uint8_t *v2, uint32_t count, uint8_t *out)
{
    uint32_t len = 0;
    for (uint32_t i = 0; i < count; i++) {
        int n = vfmig_delta_encode(v2 + i * PS, v1 + i * PS, out + len + 2);
        CHECK(n >= 0);
        uint16_t n16 = (uint16_t)n;
        memcpy(out + len, &n16, 2);
        len += 2 + (uint32_t)n;
    }
    return len;
}

static struct vfmig_vm *fake_vm(void) { return fake_vm_new(NPAGES); }

static int decode(struct vfmig_vm *dst, const struct out *o, char *msg)
{
    struct vfmig_err err;
    static struct vfmig_receiver r;
    CHECK(vfmig_receiver_init(&r, dst, NULL, 1, &err) == 0);
    int rc = vfmig_receiver_decode_mem(&r, 0, o->buf, o->len);
    snprintf(msg, 256, "%s", r.err.msg);
    vfmig_receiver_free(&r);
    return rc;
}

/* Two raw pages at 8..9, then a DELTA run over them (plus what `tweak` does to it). */
static int delta_case(struct vfmig_vm *dst, uint8_t *v1, uint8_t *v2, int (*tweak)(struct out *, uint8_t *, uint32_t *),
                      char *msg)
{
    static uint8_t buf[4 << 20], payload[2 * PS];
    struct out o = {buf, 0, {0}};
    rec(&o, VFMIG_ENC_RAW, 8, 2, v1, 2 * PS);
    uint32_t plen = delta_run(v1, v2, 2, payload);
    memset(dst->ram, 0, dst->ram_bytes);
    if (tweak && tweak(&o, payload, &plen)) /* it wrote the stream itself */
        return decode(dst, &o, msg);
    rec(&o, VFMIG_ENC_DELTA, 8, 2, payload, plen);
    eos(&o);
    return decode(dst, &o, msg);
}

static int flip_body(struct out *o, uint8_t *p, uint32_t *n)
{
    (void)o, (void)n;
    p[2] = 0x80; /* the first chunk's skip: now a truncated LEB128 */
    p[3] = 0x80;
    return 0;
}
static int short_len(struct out *o, uint8_t *p, uint32_t *n)
{
    (void)o, (void)p;
    *n -= 1; /* the last body loses a byte: the lengths no longer add up */
    return 0;
}
static int huge_len(struct out *o, uint8_t *p, uint32_t *n)
{
    (void)o, (void)n;
    uint16_t big = VFMIG_DELTA_MAX + 1;
    memcpy(p, &big, 2);
    return 0;
}
static int stray(struct out *o, uint8_t *p, uint32_t *n)
{
    (void)o;
    p[(*n)++] = 0; /* a byte after the last page's delta */
    return 0;
}
static int no_base(struct out *o, uint8_t *p, uint32_t *n)
{
    o->len = 0; /* drop the raw run: the delta then has nothing to apply to */
    rec(o, VFMIG_ENC_DELTA, 8, 2, p, *n);
    eos(o);
    return 1;
}

static void test_records(void)
{
    struct vfmig_vm *dst = fake_vm();
    static uint8_t v1[2 * PS], v2[2 * PS];
    char msg[256];
    for (uint32_t i = 0; i < 2 * PS; i++)
        v1[i] = (uint8_t)(i * 7);
    memcpy(v2, v1, sizeof(v1));
    v2[100] ^= 1;
    v2[PS + 4000] ^= 0x55;
    CHECK(delta_case(dst, v1, v2, NULL, msg) == 0);
    CHECK(memcmp(dst->ram + 8 * PS, v2, 2 * PS) == 0);
    CHECK(delta_case(dst, v1, v2, flip_body, msg) < 0 && strstr(msg, "corrupt delta for page 8"));
    CHECK(delta_case(dst, v1, v2, short_len, msg) < 0 && strstr(msg, "corrupt delta for page 9"));
    CHECK(delta_case(dst, v1, v2, huge_len, msg) < 0 && strstr(msg, "corrupt delta for page 8 (bad length)"));
    CHECK(delta_case(dst, v1, v2, stray, msg) < 0 && strstr(msg, "stray bytes"));
    CHECK(delta_case(dst, v1, v2, no_base, msg) < 0 && strstr(msg, "holds no earlier copy"));

    /* Compressed raw and delta runs load; corrupt, truncated and oversized ones do not. */
    static uint8_t buf[4 << 20], z[2 * PS + 1024];
    size_t zn = ZSTD_compress(z, sizeof(z), v2, 2 * PS, 3);
    CHECK(!ZSTD_isError(zn) && zn < 2 * PS);
    struct out o = {buf, 0, {0}};
    rec(&o, VFMIG_ENC_RAW | VFMIG_ENC_ZSTD, 8, 2, z, (uint32_t)zn);
    eos(&o);
    memset(dst->ram, 0, dst->ram_bytes);
    CHECK(decode(dst, &o, msg) == 0 && memcmp(dst->ram + 8 * PS, v2, 2 * PS) == 0);
    /* Every byte of it flipped in turn (header, run header, frame): always refused. */
    for (size_t at = 0; at < o.len; at += 7) {
        buf[at] ^= 0x40;
        CHECK(decode(dst, &o, msg) < 0);
        buf[at] ^= 0x40;
    }
    o.len -= 5; /* truncated */
    CHECK(decode(dst, &o, msg) < 0 && strstr(msg, "closed"));
    /* A frame that declares the wrong size for its run, with a valid record CRC. */
    o = (struct out){buf, 0, {0}};
    zn = ZSTD_compress(z, sizeof(z), v2, PS, 3);
    rec(&o, VFMIG_ENC_RAW | VFMIG_ENC_ZSTD, 8, 2, z, (uint32_t)zn);
    eos(&o);
    CHECK(decode(dst, &o, msg) < 0 && strstr(msg, "declares a bad size"));
    /* Garbage in place of a frame, valid CRC. */
    o = (struct out){buf, 0, {0}};
    rec(&o, VFMIG_ENC_RAW | VFMIG_ENC_ZSTD, 8, 2, v1, 100);
    eos(&o);
    CHECK(decode(dst, &o, msg) < 0 && strstr(msg, "bad size"));
    /* A compressed payload larger than its run could ever need, and ZERO|ZSTD. */
    o = (struct out){buf, 0, {0}};
    rec(&o, VFMIG_ENC_RAW | VFMIG_ENC_ZSTD, 8, 1, v1, PS + 1);
    eos(&o);
    CHECK(decode(dst, &o, msg) < 0 && strstr(msg, "payload of 4097 bytes"));
    o = (struct out){buf, 0, {0}};
    rec(&o, VFMIG_ENC_ZERO | VFMIG_ENC_ZSTD, 8, 1, NULL, 0);
    eos(&o);
    CHECK(decode(dst, &o, msg) < 0 && strstr(msg, "unknown page encoding 0x82"));
    /* A compressed DELTA run round-trips. */
    static uint8_t payload[2 * PS];
    uint32_t plen = delta_run(v1, v2, 2, payload);
    zn = ZSTD_compress(z, sizeof(z), payload, plen, 3);
    o = (struct out){buf, 0, {0}};
    rec(&o, VFMIG_ENC_RAW, 8, 2, v1, 2 * PS);
    rec(&o, VFMIG_ENC_DELTA | VFMIG_ENC_ZSTD, 8, 2, z, (uint32_t)zn);
    eos(&o);
    memset(dst->ram, 0, dst->ram_bytes);
    CHECK(decode(dst, &o, msg) == 0 && memcmp(dst->ram + 8 * PS, v2, 2 * PS) == 0);
    fake_vm_free(dst);
}

int main(void)
{
    test_codec();
    test_records();
    printf("test_delta: ok\n");
    return 0;
}
