/* Writes the seed corpus of every harness: small valid inputs (what the source really sends)
 * and a few edge cases next to each. Run by `csrc/fuzz/build.sh --seeds`; the output is
 * committed under csrc/fuzz/corpus/<harness>/ and tests/test_fuzz.py checks it is current. */
#include <linux/kvm.h>
#include <sys/stat.h>
#include <zstd.h>

#include "fuzz.h"
#include "vfmig/channels.h"
#include "vfmig/delta.h"
#include "vfmig/devices.h"
#include "vfmig/hello.h"
#include "vfmig/simvf_abi.h"
#include "vfmig/simvf_state.h"
#include "vfmig/vcpu_state.h"

static const char *root;

static void put(const char *harness, const char *name, const void *buf, size_t len)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", root, harness);
    mkdir(path, 0755);
    snprintf(path, sizeof(path), "%s/%s/%s", root, harness, name);
    FILE *f = fopen(path, "wb");
    FUZZ_ASSERT(f && fwrite(buf, 1, len, f) == len && fclose(f) == 0);
}

struct buf {
    uint8_t b[64 << 10];
    size_t n;
    struct vfmig_digest d;
};

static void add(struct buf *o, const void *p, size_t len)
{
    FUZZ_ASSERT(o->n + len <= sizeof(o->b));
    if (len)
        memcpy(o->b + o->n, p, len);
    o->n += len;
}

static void record(struct buf *o, uint16_t type, const void *p1, uint32_t l1, const void *p2, uint32_t l2)
{
    struct vfmig_rec_hdr h;
    vfmig_rec_seal(&h, type, p1, l1, p2, l2);
    add(o, &h, sizeof(h));
    add(o, p1, l1);
    add(o, p2, l2);
    if (type != VFMIG_REC_EOS)
        vfmig_digest_add(&o->d, &h);
}

static void run(struct buf *o, uint64_t gpa, uint32_t count, uint8_t enc)
{
    static uint8_t data[3 * VFMIG_PAGE_SIZE];
    for (size_t i = 0; i < sizeof(data); i++)
        data[i] = (uint8_t)(i * 7 + 1);
    struct vfmig_pages_hdr ph = {.gpa = gpa, .count = count, .encoding = enc};
    FUZZ_ASSERT(enc != VFMIG_ENC_RAW || count <= 3);
    record(o, VFMIG_REC_PAGES, &ph, sizeof(ph), data, enc == VFMIG_ENC_RAW ? count * VFMIG_PAGE_SIZE : 0);
}

/* Version 2 runs: DELTA bodies against what run() loads, and zstd frames of either. */
static void encoded(struct buf *o, uint64_t gpa, uint32_t count, uint8_t enc)
{
    static uint8_t old[3 * VFMIG_PAGE_SIZE], cur[3 * VFMIG_PAGE_SIZE], body[3 * VFMIG_PAGE_SIZE], z[4 * VFMIG_PAGE_SIZE];
    for (size_t i = 0; i < sizeof(old); i++)
        old[i] = cur[i] = (uint8_t)(i * 7 + 1); /* what run() sends */
    for (size_t i = 0; i < sizeof(cur); i += 1000)
        cur[i] ^= 0x5a;
    uint32_t len = 0;
    if ((enc & ~VFMIG_ENC_ZSTD) == VFMIG_ENC_DELTA) {
        for (uint32_t p = 0; p < count; p++) {
            int n = vfmig_delta_encode(cur + p * VFMIG_PAGE_SIZE, old + p * VFMIG_PAGE_SIZE, body + len + 2);
            FUZZ_ASSERT(n >= 0);
            uint16_t n16 = (uint16_t)n;
            memcpy(body + len, &n16, 2);
            len += 2 + (uint32_t)n;
        }
    } else {
        memcpy(body, cur, count * VFMIG_PAGE_SIZE);
        len = count * VFMIG_PAGE_SIZE;
    }
    const uint8_t *data = body;
    if (enc & VFMIG_ENC_ZSTD) {
        size_t zn = ZSTD_compress(z, sizeof(z), body, len, 1);
        FUZZ_ASSERT(!ZSTD_isError(zn));
        data = z;
        len = (uint32_t)zn;
    }
    struct vfmig_pages_hdr ph = {.gpa = gpa, .count = count, .encoding = enc};
    record(o, VFMIG_REC_PAGES, &ph, sizeof(ph), data, len);
}

static void iter(struct buf *o, uint32_t n)
{
    struct vfmig_iter it = {.iteration = n, .dirty_pages = 3};
    record(o, VFMIG_REC_ITER, &it, sizeof(it), NULL, 0);
}

static void eos(struct buf *o)
{
    struct vfmig_eos e = {.records = o->d.records, .bytes = o->d.bytes, .chain = o->d.chain};
    record(o, VFMIG_REC_EOS, &e, sizeof(e), NULL, 0);
}

static struct buf *channel(uint8_t sel)
{
    static struct buf o;
    memset(&o, 0, sizeof(o));
    add(&o, &sel, 1);
    return &o;
}

static void pages(void)
{
    struct buf *o = channel(0x00); /* one channel */
    run(o, 1 * VFMIG_PAGE_SIZE, 2, VFMIG_ENC_RAW);
    run(o, 3 * VFMIG_PAGE_SIZE, 1, VFMIG_ENC_ZERO);
    iter(o, 1);
    run(o, 1 * VFMIG_PAGE_SIZE, 1, VFMIG_ENC_ZERO); /* clears a page loaded raw */
    run(o, FUZZ_HIGH_GPA, 1, VFMIG_ENC_RAW);        /* high RAM, page 1024 */
    iter(o, 2);
    eos(o);
    put("pages", "one-channel", o->b, o->n);
    o->b[39] ^= 1; /* in the first run's data */
    put("pages", "edge-crc-mismatch", o->b, o->n);
    o->b[39] ^= 1;
    put("pages", "edge-truncated", o->b, o->n - 7);

    o = channel(0x00); /* delta pages and compression (stream version 2) */
    run(o, 1 * VFMIG_PAGE_SIZE, 3, VFMIG_ENC_RAW);
    iter(o, 1);
    encoded(o, 1 * VFMIG_PAGE_SIZE, 3, VFMIG_ENC_DELTA);
    encoded(o, 8 * VFMIG_PAGE_SIZE, 2, VFMIG_ENC_RAW | VFMIG_ENC_ZSTD);
    iter(o, 2);
    run(o, 1 * VFMIG_PAGE_SIZE, 3, VFMIG_ENC_RAW);
    encoded(o, 1 * VFMIG_PAGE_SIZE, 3, VFMIG_ENC_DELTA | VFMIG_ENC_ZSTD);
    eos(o);
    put("pages", "delta-and-zstd", o->b, o->n);
    o = channel(0x00);
    encoded(o, 1 * VFMIG_PAGE_SIZE, 1, VFMIG_ENC_DELTA); /* nothing to apply it to */
    eos(o);
    put("pages", "edge-delta-without-base", o->b, o->n);

    o = channel(0x11); /* channel 1 of 2: stripes 1 and 3 */
    run(o, 512 * VFMIG_PAGE_SIZE, 256, VFMIG_ENC_ZERO);
    run(o, FUZZ_HIGH_GPA + 512 * VFMIG_PAGE_SIZE, 1, VFMIG_ENC_RAW);
    eos(o);
    put("pages", "channel-1-of-2", o->b, o->n);

    o = channel(0x00);
    run(o, 510 * VFMIG_PAGE_SIZE, 4, VFMIG_ENC_ZERO);
    eos(o);
    put("pages", "edge-crosses-stripe", o->b, o->n);
    o = channel(0x11);
    run(o, 0, 1, VFMIG_ENC_ZERO);
    eos(o);
    put("pages", "edge-other-channels-stripe", o->b, o->n);
    o = channel(0x00);
    run(o, (uint64_t)FUZZ_LOW_PAGES * VFMIG_PAGE_SIZE - VFMIG_PAGE_SIZE, 2, VFMIG_ENC_ZERO); /* into the hole */
    iter(o, 2);
    eos(o);
    put("pages", "edge-outside-ram", o->b, o->n);
}

static void records(void)
{
    static const uint8_t json[] = "{\"pages_received\": 3}";
    struct vfmig_iter it = {.iteration = 1, .dirty_pages = 9};
    struct buf *o = channel(0x00);
    o->n = 1; /* limit selector only */
    record(o, VFMIG_REC_ITER, &it, sizeof(it), NULL, 0);
    put("record", "iter-page-channel", o->b, o->n);
    o->n = 0;
    add(o, "\x02", 1);
    record(o, VFMIG_REC_RESUMED, json, sizeof(json) - 1, NULL, 0);
    put("record", "resumed-control", o->b, o->n);
    o->n = 0;
    add(o, "\x02", 1);
    record(o, VFMIG_REC_GO, NULL, 0, NULL, 0);
    put("record", "go-empty", o->b, o->n);
    o->n = 0;
    add(o, "\x01", 1);
    struct vfmig_rec_hdr h;
    vfmig_rec_seal(&h, VFMIG_REC_HELLO, NULL, 0, NULL, 0);
    h.len = VFMIG_HELLO_LEN + VFMIG_CONFIG_MAX + 1;
    add(o, &h, sizeof(h));
    put("record", "edge-over-limit", o->b, o->n);
}

static void hello(void)
{
    static const char cfg[] = "{\"memory\": 67108864, \"vcpus\": 1, \"guest\": \"idle\", \"tracker\": \"bitmap\", "
                              "\"ring_entries\": 0, \"params\": {}}";
    uint8_t token[VFMIG_TOKEN_LEN];
    for (int i = 0; i < VFMIG_TOKEN_LEN; i++)
        token[i] = (uint8_t)(i * 17);
    struct vfmig_hello h;
    uint8_t m[VFMIG_HELLO_LEN + sizeof(cfg) - 1];
    vfmig_hello_encode(&h, VFMIG_STREAM_VERSION, 4, 64 << 20, 1, VFMIG_HELLO_VERIFY, token, sizeof(cfg) - 1);
    memcpy(m, &h, sizeof(h));
    memcpy(m + sizeof(h), cfg, sizeof(cfg) - 1);
    put("hello", "verify-4-channels", m, sizeof(m));
    m[52] = 1; /* reserved */
    put("hello", "edge-reserved", m, sizeof(m));
    m[52] = 0;
    memset(m + 48, 0xFF, 4); /* config_len */
    put("hello", "edge-config-length", m, sizeof(m));
    put("hello", "edge-short", m, VFMIG_HELLO_LEN - 1);

    struct vfmig_channel_hello c;
    vfmig_channel_encode(&c, token, 3);
    put("channel", "index-3", &c, sizeof(c));
    c.version = 2;
    put("channel", "edge-version-2", &c, sizeof(c));
    c.version = VFMIG_STREAM_VERSION;
    c.reserved = 1;
    put("channel", "edge-reserved", &c, sizeof(c));
}

/* The layout vfmig_vcpu_save writes (docs/stream-format.md §11), with zeroed register contents. */
static size_t vcpu_blob(uint8_t *b, uint32_t nmsrs)
{
    static const uint32_t order[][2] = {
        {2, sizeof(struct kvm_sregs)}, {1, sizeof(struct kvm_regs)}, {3, sizeof(struct kvm_fpu)},
        {4, sizeof(struct kvm_xsave)}, {5, sizeof(struct kvm_xcrs)}, {6, sizeof(struct kvm_lapic_state)},
        {8, sizeof(struct kvm_vcpu_events)}, {9, sizeof(struct kvm_debugregs)}, {7, sizeof(struct kvm_mp_state)},
    };
    uint32_t hdr[4] = {VFMIG_VCPU_STATE_MAGIC, VFMIG_VCPU_STATE_VERSION, 0, 10};
    size_t n = sizeof(hdr);
    memcpy(b, hdr, sizeof(hdr));
    for (size_t i = 0; i < sizeof(order) / sizeof(order[0]); i++) {
        memcpy(b + n, order[i], 8);
        memset(b + n + 8, 0, (order[i][1] + 7) & ~7u);
        n += 8 + ((order[i][1] + 7) & ~7u);
    }
    uint32_t msr_len = (uint32_t)(sizeof(struct kvm_msrs) + nmsrs * sizeof(struct kvm_msr_entry));
    uint32_t sec[2] = {10, msr_len};
    memcpy(b + n, sec, 8);
    memset(b + n + 8, 0, msr_len);
    memcpy(b + n + 8, &nmsrs, 4);
    for (uint32_t i = 0; i < nmsrs; i++) {
        struct kvm_msr_entry e = {.index = 0xC0000080u + i, .data = i};
        memcpy(b + n + 8 + sizeof(struct kvm_msrs) + i * sizeof(e), &e, sizeof(e));
    }
    return n + 8 + msr_len;
}

static void vcpu(void)
{
    static uint8_t b[VFMIG_VCPU_STATE_MAX];
    struct vfmig_err err;
    size_t n = vcpu_blob(b, 40);
    FUZZ_ASSERT(vfmig_vcpu_state_check(b, n, 0, &err) == 0);
    put("vcpu_state", "40-msrs", b, n);
    put("vcpu_state", "edge-trailing", b, n + 8);
    b[n - 40 * 16 - 8] = 39; /* nmsrs no longer matches the section */
    put("vcpu_state", "edge-msr-count", b, n);
    n = vcpu_blob(b, 0);
    put("vcpu_state", "no-msrs", b, n);
    b[8] = 1; /* for vCPU 1 */
    put("vcpu_state", "edge-other-vcpu", b, n);
}

/* Mirrors struct platform_state in devices/platform.c. */
struct platform_state {
    uint32_t magic, version;
    struct kvm_irqchip chips[3];
    struct kvm_clock_data clock;
};

static void devices(void)
{
    uint8_t b[1 + sizeof(struct platform_state)] = {0};
    for (uint32_t i = 0; i < 32; i++)
        b[1 + i] = (uint8_t)i;
    put("device_state", "clock", b, 33);
    b[0] = 1;
    put("device_state", "clock-mmio", b, 33);
    put("device_state", "edge-clock-short", b, 32);
    struct platform_state s = {.magic = 0x54414C50u, .version = 1};
    for (uint32_t i = 0; i < 3; i++)
        s.chips[i].chip_id = i;
    b[0] = 2;
    memcpy(b + 1, &s, sizeof(s));
    FUZZ_ASSERT(vfmig_platform_check(b + 1, sizeof(s)) == 0);
    put("device_state", "platform", b, sizeof(b));
    s.chips[2].chip_id = 0;
    memcpy(b + 1, &s, sizeof(s));
    put("device_state", "edge-platform-chip-id", b, sizeof(b));
    b[0] = 3;
    put("device_state", "stateless", b, 1);
}

/* A destination of 64 KiB state with migration=on (fuzz_simvf_state.c): a whole stream, as a
 * source with precopy would send it (IDENT, table, a re-sent dirty chunk, PCI, REGS, END). */
static size_t simvf_stream(uint8_t *b, uint32_t bad)
{
    static uint8_t table[(64 << 10) - SIMVF_REGS_BYTES], pci[4096 + 64];
    for (size_t i = 0; i < sizeof(table); i++)
        table[i] = (uint8_t)(i * 13);
    struct simvf_ident id = {.vendor = SIMVF_VENDOR_ID, .device = SIMVF_DEVICE_ID, .revision = SIMVF_REVISION,
                             .migration = 1, .nvec = SIMVF_NUM_VECTORS,
                             .bar_size = {SIMVF_BAR_REGS_SIZE, SIMVF_BAR_MSIX_SIZE}, .state_bytes = 64 << 10};
    struct simvf_regs r = {.ctrl = SIMVF_CTRL_ENABLE, .rx_size = 256, .rx_head = 3, .rx_ring = 0x200000,
                           .sent = 10, .delivered = 4, .dropped = 6};
    if (bad == 1)
        r.dropped = 5; /* sent != delivered + dropped */
    if (bad == 2)
        id.state_bytes = 128 << 10; /* another device's identity */
    size_t n = simvf_sec_put(b, SIMVF_SEC_IDENT, 0, &id, sizeof(id));
    n += simvf_sec_put(b + n, SIMVF_SEC_TABLE, 0, table, sizeof(table));
    n += simvf_sec_put(b + n, SIMVF_SEC_TABLE, SIMVF_CHUNK, table, SIMVF_CHUNK);
    n += simvf_sec_put(b + n, SIMVF_SEC_PCI, 0, pci, sizeof(pci));
    n += simvf_sec_put(b + n, SIMVF_SEC_REGS, 0, &r, sizeof(r));
    n += simvf_sec_put(b + n, SIMVF_SEC_END, 0, NULL, 0);
    return n;
}

static void simvf(void)
{
    static uint8_t b[2 + (128 << 10)];
    struct vfmig_simvf_config cfg = {.state_bytes = 64 << 10, .precopy = 1, .migration = 1};
    struct vfmig_err err;
    size_t n = simvf_stream(b + 2, 0);
    FUZZ_ASSERT(vfmig_simvf_check_stream(&cfg, b + 2, n, 0, &err) == 0);
    b[0] = 0, b[1] = 1;
    put("simvf_state", "whole", b, n + 2);
    b[0] = 7;
    put("simvf_state", "split-7", b, n + 2);
    put("simvf_state", "edge-truncated", b, n + 2 - 24);
    n = simvf_stream(b + 2, 1);
    put("simvf_state", "edge-counters", b, n + 2);
    n = simvf_stream(b + 2, 2);
    put("simvf_state", "edge-identity", b, n + 2);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s CORPUS_ROOT\n", argv[0]);
        return 2;
    }
    root = argv[1];
    mkdir(root, 0755);
    pages();
    records();
    hello();
    vcpu();
    devices();
    simvf();
    return 0;
}
