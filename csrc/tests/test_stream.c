/* The page stream without KVM: a fake VM (plain RAM, one slot) on each end of socketpairs.
 * Round trip over 1 and 3 channels, then reject tests: every single-byte corruption of a
 * captured stream, truncation, a record outside RAM with a valid CRC, a wrong magic. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "check.h"
#include "fake_vm.h"
#include "vfmig/channels.h"


#define NPAGES 2048u /* 8 MiB: four stripes */

static struct vfmig_vm *fake_vm(void) { return fake_vm_new(NPAGES); }


struct rx_job {
    struct vfmig_receiver *r;
    int rc;
};

static void *rx_main(void *a)
{
    struct rx_job *j = a;
    j->rc = vfmig_receiver_run(j->r);
    return NULL;
}

/* Send `bits` of src over n channels into dst; returns the receiver's rc and its error. */
static int transfer(struct vfmig_vm *src, struct vfmig_vm *dst, uint32_t n, const uint64_t *bits, char *msg)
{
    int sfd[4], rfd[4], sv[2];
    for (uint32_t i = 0; i < n; i++) {
        CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
        sfd[i] = sv[0];
        rfd[i] = sv[1];
    }
    struct vfmig_err err = {{0}};
    static struct vfmig_sender s;
    static struct vfmig_receiver r;
    CHECK(vfmig_sender_init(&s, src, sfd, n, &err) == 0);
    CHECK(vfmig_receiver_init(&r, dst, rfd, n, &err) == 0);
    struct rx_job j = {&r, 0};
    pthread_t th;
    pthread_create(&th, NULL, rx_main, &j);
    struct vfmig_round_stats st;
    CHECK(vfmig_send_round(&s, bits, 0, &st) == 0);
    CHECK(vfmig_send_marker(&s, 1, st.pages) == 0);
    CHECK(vfmig_send_round(&s, bits, 1, &st) == 0); /* zero-copy path too */
    CHECK(vfmig_send_eos(&s) == 0);
    pthread_join(th, NULL);
    snprintf(msg, 256, "%s", r.err.msg);
    if (j.rc == 0) { /* what --verify compares: both ends' RAM hashes, every page */
        uint32_t *want = malloc(NPAGES * 4), *got = malloc(NPAGES * 4);
        CHECK(want && got);
        vfmig_ram_page_crcs(src, want);
        vfmig_ram_page_crcs(dst, got);
        CHECK(memcmp(want, got, NPAGES * 4) == 0);
        free(want);
        free(got);
    }
    vfmig_sender_free(&s);
    vfmig_receiver_free(&r);
    for (uint32_t i = 0; i < n; i++) {
        close(sfd[i]);
        close(rfd[i]);
    }
    return j.rc;
}

/* Capture what one channel sends for `bits` into a buffer. */
static size_t capture(struct vfmig_vm *src, const uint64_t *bits, uint8_t **out)
{
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    int big = 64 << 20;
    setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &big, sizeof(big));
    setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &big, sizeof(big));
    struct vfmig_err err;
    static struct vfmig_sender s;
    CHECK(vfmig_sender_init(&s, src, &sv[0], 1, &err) == 0);
    struct vfmig_round_stats st;
    size_t cap = 16 << 20, len = 0;
    uint8_t *buf = malloc(cap);
    /* Drain as we go: a socketpair buffer is smaller than the stream. */
    pid_t pid = fork();
    if (pid == 0) {
        close(sv[1]);
        vfmig_send_round(&s, bits, 0, &st);
        vfmig_send_eos(&s);
        _exit(0);
    }
    close(sv[0]);
    ssize_t r;
    while ((r = read(sv[1], buf + len, cap - len)) > 0)
        len += (size_t)r;
    close(sv[1]);
    vfmig_sender_free(&s);
    *out = buf;
    return len;
}

static int replay(struct vfmig_vm *dst, const uint8_t *buf, size_t len, char *msg)
{
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        close(sv[1]);
        size_t off = 0;
        while (off < len) {
            ssize_t w = write(sv[0], buf + off, len - off);
            if (w <= 0)
                break;
            off += (size_t)w;
        }
        _exit(0);
    }
    close(sv[0]);
    struct vfmig_err err;
    static struct vfmig_receiver r;
    CHECK(vfmig_receiver_init(&r, dst, &sv[1], 1, &err) == 0);
    int rc = vfmig_receiver_run(&r);
    snprintf(msg, 256, "%s", r.err.msg);
    vfmig_receiver_free(&r);
    close(sv[1]);
    return rc;
}

/* One ZERO run (valid CRC), then the EOS that makes it a complete channel stream. */
static size_t zero_run_stream(uint8_t *out, uint64_t first_page, uint32_t count)
{
    struct vfmig_rec_hdr h;
    struct vfmig_pages_hdr ph = {.gpa = first_page * VFMIG_PAGE_SIZE, .count = count, .encoding = VFMIG_ENC_ZERO};
    struct vfmig_digest d = {0};
    vfmig_rec_seal(&h, VFMIG_REC_PAGES, &ph, sizeof(ph), NULL, 0);
    vfmig_digest_add(&d, &h);
    memcpy(out, &h, sizeof(h));
    memcpy(out + sizeof(h), &ph, sizeof(ph));
    size_t n = sizeof(h) + sizeof(ph);
    struct vfmig_eos e = {.records = d.records, .bytes = d.bytes, .chain = d.chain};
    vfmig_rec_seal(&h, VFMIG_REC_EOS, &e, sizeof(e), NULL, 0);
    memcpy(out + n, &h, sizeof(h));
    memcpy(out + n + sizeof(h), &e, sizeof(e));
    return n + sizeof(h) + sizeof(e);
}

/* Decode buf as channel c of nchan, from memory (no socket). */
static int decode_on(struct vfmig_vm *dst, uint32_t nchan, uint32_t c, const uint8_t *buf, size_t len, char *msg)
{
    struct vfmig_err err;
    static struct vfmig_receiver r;
    CHECK(vfmig_receiver_init(&r, dst, NULL, nchan, &err) == 0);
    int rc = vfmig_receiver_decode_mem(&r, c, buf, len);
    snprintf(msg, 256, "%s", r.err.msg);
    vfmig_receiver_free(&r);
    return rc;
}

/* A run must lie in one stripe, and in one of its own channel's stripes (p / 512 mod N). */
static void test_stripes(struct vfmig_vm *dst, const uint8_t *stream, size_t len)
{
    char msg[256];
    uint8_t buf[256];
    CHECK(decode_on(dst, 1, 0, stream, len, msg) == 0); /* the memory path takes what the socket did */
    CHECK(decode_on(dst, 2, 1, buf, zero_run_stream(buf, 768, 256), msg) == 0);
    CHECK(decode_on(dst, 3, 2, buf, zero_run_stream(buf, 1024 + 511, 1), msg) == 0);
    CHECK(decode_on(dst, 1, 0, buf, zero_run_stream(buf, 510, 4), msg) < 0);
    CHECK(strstr(msg, "channel 0: run at page 510 (+4) crosses its stripe"));
    CHECK(decode_on(dst, 2, 1, buf, zero_run_stream(buf, 1023, 2), msg) < 0);
    CHECK(strstr(msg, "crosses its stripe"));
    CHECK(decode_on(dst, 3, 1, buf, zero_run_stream(buf, 1536, 1), msg) < 0);
    CHECK(strstr(msg, "channel 1: run at page 1536 belongs to channel 0"));
    CHECK(decode_on(dst, 2, 0, buf, zero_run_stream(buf, 600, 1), msg) < 0);
    CHECK(strstr(msg, "channel 0: run at page 600 belongs to channel 1"));
    CHECK(decode_on(dst, 2, 2, buf, zero_run_stream(buf, 0, 1), msg) < 0);
    /* Truncated in memory: like a closed socket. */
    CHECK(decode_on(dst, 1, 0, stream, len - 1, msg) < 0 && strstr(msg, "closed"));
}

static void *zero_crc_main(void *out)
{
    *(uint32_t *)out = vfmig_zero_page_crc();
    return NULL;
}

int main(void)
{
    /* Receiver threads may be the first to ask for the zero-page CRC, together (TSan checks). */
    pthread_t zt[2];
    uint32_t zc[2];
    for (int i = 0; i < 2; i++)
        CHECK(pthread_create(&zt[i], NULL, zero_crc_main, &zc[i]) == 0);
    for (int i = 0; i < 2; i++)
        CHECK(pthread_join(zt[i], NULL) == 0);
    CHECK(zc[0] == 0x98F94189u && zc[1] == zc[0]);

    struct vfmig_vm *src = fake_vm(), *dst = fake_vm();
    static uint64_t bits[NPAGES / 64];
    srand(3);
    for (uint32_t p = 0; p < NPAGES; p++) {
        if (p % 3 == 0)
            continue; /* not dirty */
        if (p % 7 != 0) /* the rest stay zero pages */
            for (uint32_t k = 0; k < 16; k++)
                src->ram[(size_t)p * VFMIG_PAGE_SIZE + (size_t)(rand() % VFMIG_PAGE_SIZE)] = (uint8_t)(rand() | 1);
        bits[p / 64] |= 1ull << (p % 64);
    }
    char msg[256];
    /* A destination starts from zeroed RAM; zero pages that were once raw must be cleared. */
    for (uint32_t n = 1; n <= 3; n++) {
        memset(dst->ram, 0, dst->ram_bytes);
        CHECK(transfer(src, dst, n, bits, msg) == 0);
        for (uint32_t p = 0; p < NPAGES; p++)
            if (bits[p / 64] & (1ull << (p % 64)))
                CHECK(memcmp(src->ram + (size_t)p * 4096, dst->ram + (size_t)p * 4096, 4096) == 0);
    }

    uint8_t *stream;
    size_t len = capture(src, bits, &stream);
    CHECK(len > 4096);
    CHECK(replay(dst, stream, len, msg) == 0);
    /* Corrupt one byte at many offsets: headers, page data, the EOS. Each must be rejected. */
    size_t offsets[] = {0, 5, 9, 13, 17, 20, 27, 31, 40, 4000, len / 2, len - 20, len - 1};
    for (size_t i = 0; i < sizeof(offsets) / sizeof(offsets[0]); i++) {
        stream[offsets[i]] ^= 0x10;
        int rc = replay(dst, stream, len, msg);
        stream[offsets[i]] ^= 0x10;
        if (rc == 0)
            fprintf(stderr, "corruption at %zu was accepted\n", offsets[i]);
        CHECK(rc < 0);
    }
    /* Truncation anywhere: a clear error, never success. */
    CHECK(replay(dst, stream, len - 1, msg) < 0 && strstr(msg, "closed"));
    CHECK(replay(dst, stream, 100, msg) < 0);
    /* A well-formed record (valid CRC) pointing outside RAM is refused before any write. */
    struct {
        struct vfmig_rec_hdr h;
        struct vfmig_pages_hdr ph;
    } bad;
    bad.ph = (struct vfmig_pages_hdr){.gpa = (uint64_t)NPAGES * 4096 - 4096, .count = 2, .encoding = VFMIG_ENC_ZERO};
    vfmig_rec_seal(&bad.h, VFMIG_REC_PAGES, &bad.ph, sizeof(bad.ph), NULL, 0);
    CHECK(replay(dst, (uint8_t *)&bad, sizeof(bad), msg) < 0 && strstr(msg, "outside guest RAM"));
    bad.ph = (struct vfmig_pages_hdr){.gpa = 0, .count = 4096, .encoding = VFMIG_ENC_ZERO};
    vfmig_rec_seal(&bad.h, VFMIG_REC_PAGES, &bad.ph, sizeof(bad.ph), NULL, 0);
    CHECK(replay(dst, (uint8_t *)&bad, sizeof(bad), msg) < 0 && strstr(msg, "bad count"));
    bad.ph = (struct vfmig_pages_hdr){.gpa = 0, .count = 1, .encoding = 9};
    vfmig_rec_seal(&bad.h, VFMIG_REC_PAGES, &bad.ph, sizeof(bad.ph), NULL, 0);
    CHECK(replay(dst, (uint8_t *)&bad, sizeof(bad), msg) < 0 && strstr(msg, "encoding"));
    bad.h.len = 1u << 30;
    CHECK(replay(dst, (uint8_t *)&bad, sizeof(bad), msg) < 0 && strstr(msg, "exceeds"));
    /* A control record on a page channel is refused. */
    vfmig_rec_seal(&bad.h, VFMIG_REC_HELLO, &bad.ph, sizeof(bad.ph), NULL, 0);
    CHECK(replay(dst, (uint8_t *)&bad, sizeof(bad), msg) < 0 && strstr(msg, "unexpected HELLO"));
    test_stripes(dst, stream, len);
    free(stream);
    fake_vm_free(src);
    fake_vm_free(dst);
    printf("test_stream: ok\n");
    return 0;
}
