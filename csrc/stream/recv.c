/* The page receiver: one thread per channel reads records, checks every bound before touching
 * destination RAM, receives raw page data straight into it and checks each record's CRC; delta
 * and compressed records are checked whole before they are decoded into RAM. A bad record fails
 * the whole migration: nothing loaded is ever run. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <zstd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14; the system headers may be older */
#endif

#include "vfmig/channels.h"

/* A dead source closes its sockets; this only catches a silent one. Generous, because a
 * channel whose stripes stay clean sees only one ITER a round, and rounds can be long. */
#define RECV_TIMEOUT_S 600
#define PAGES_MAX_LEN (sizeof(struct vfmig_pages_hdr) + VFMIG_RUN_MAX_PAGES * VFMIG_PAGE_SIZE)

int vfmig_receiver_init(struct vfmig_receiver *r, struct vfmig_vm *vm, const int *fds, uint32_t nchan,
                        struct vfmig_err *err)
{
    memset(r, 0, sizeof(*r));
    if (nchan < 1 || nchan > VFMIG_MAX_CHANNELS)
        return vfmig_fail(err, EINVAL, "channels must be 1..%d, got %u", VFMIG_MAX_CHANNELS, nchan);
    r->vm = vm;
    r->nchan = nchan;
    atomic_store(&r->first_failed, -1);
    for (uint32_t i = 0; i < nchan; i++)
        r->ch[i].fd = -1;
    r->written = calloc((vm->npages + 63) / 64, sizeof(uint64_t));
    r->populated = calloc((vm->npages / VFMIG_STRIPE_PAGES + 64) / 64, sizeof(uint64_t));
    if (!r->written || !r->populated) {
        vfmig_receiver_free(r);
        return vfmig_fail(err, ENOMEM, "out of memory");
    }
    struct timeval tv = {.tv_sec = RECV_TIMEOUT_S};
    for (uint32_t i = 0; fds && i < nchan; i++) {
        r->ch[i].fd = fds[i];
        setsockopt(fds[i], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    }
    return 0;
}

void vfmig_receiver_free(struct vfmig_receiver *r)
{
    for (uint32_t c = 0; c < VFMIG_MAX_CHANNELS; c++) {
        free(r->ch[c].buf);
        free(r->ch[c].zbuf);
        ZSTD_freeDCtx(r->ch[c].zctx);
        r->ch[c].buf = r->ch[c].zbuf = NULL;
        r->ch[c].zctx = NULL;
    }
    free((void *)r->written);
    free((void *)r->populated);
    r->written = NULL;
    r->populated = NULL;
}

/* Channel input: its socket, or the buffer of vfmig_receiver_decode_mem, whose end reads like a
 * closed peer. A short buffer copies nothing. */
static int chan_read(struct vfmig_chan_rx *ch, void *buf, size_t len)
{
    if (!ch->mem)
        return vfmig_read_all(ch->fd, buf, len);
    if (ch->mem_len - ch->mem_off < len)
        return -ECONNRESET;
    memcpy(buf, ch->mem + ch->mem_off, len);
    ch->mem_off += len;
    return 0;
}

static int io_fail(struct vfmig_chan_rx *ch, uint32_t c, int rc)
{
    if (rc == -ECONNRESET)
        return vfmig_fail(&ch->err, ECONNRESET, "channel %u: peer closed the connection mid-stream (after %llu records)",
                          c, (unsigned long long)ch->records);
    if (rc == -ETIMEDOUT)
        return vfmig_fail(&ch->err, ETIMEDOUT, "channel %u: no data for %d s", c, RECV_TIMEOUT_S);
    return vfmig_fail(&ch->err, -rc, "channel %u: receive failed: %s", c, strerror(-rc));
}

/* First data in a 2 MiB stripe: populate the whole stripe in one call rather than one fault a
 * page inside recv, and only where data lands (sparse guests stay sparse). With shmem THP that
 * is one huge page: 10x cheaper here. Failure is harmless: the copy faults instead. */
static void populate(struct vfmig_receiver *r, uint64_t first)
{
    struct vfmig_vm *vm = r->vm;
    uint64_t stripe = first / VFMIG_STRIPE_PAGES, bit = 1ull << (stripe % 64);
    if (!(atomic_fetch_or_explicit(&r->populated[stripe / 64], bit, memory_order_relaxed) & bit)) {
        uint64_t p0 = stripe * VFMIG_STRIPE_PAGES;
        uint64_t n = vm->npages - p0 < VFMIG_STRIPE_PAGES ? vm->npages - p0 : VFMIG_STRIPE_PAGES;
        madvise(vm->ram + p0 * VFMIG_PAGE_SIZE, n * VFMIG_PAGE_SIZE, MADV_POPULATE_WRITE);
    }
}

/* Decode a DELTA run (body = [u16 len][delta] per page) onto the pages it follows. */
static int apply_deltas(struct vfmig_receiver *r, uint32_t c, const struct vfmig_pages_hdr *ph, uint8_t *host,
                        uint64_t first, const uint8_t *p, size_t len)
{
    struct vfmig_chan_rx *ch = &r->ch[c];
    const uint8_t *end = p + len;
    for (uint32_t i = 0; i < ph->count; i++) {
        uint16_t n;
        if (end - p < 2 || (memcpy(&n, p, 2), n > VFMIG_DELTA_MAX) || (size_t)(end - p - 2) < n)
            return vfmig_fail(&ch->err, EBADMSG, "channel %u: corrupt delta for page %llu (bad length)", c,
                              (unsigned long long)(first + i));
        uint64_t pg = first + i;
        /* A delta applies to the copy sent before: a page never sent (or last sent as zero) has none. */
        if (!(atomic_load_explicit(&r->written[pg / 64], memory_order_relaxed) & (1ull << (pg % 64))))
            return vfmig_fail(&ch->err, EPROTO, "channel %u: delta for page %llu, which holds no earlier copy", c,
                              (unsigned long long)pg);
        if (vfmig_delta_apply(host + (size_t)i * VFMIG_PAGE_SIZE, p + 2, n) < 0)
            return vfmig_fail(&ch->err, EBADMSG, "channel %u: corrupt delta for page %llu", c, (unsigned long long)pg);
        p += 2 + n;
    }
    if (p != end)
        return vfmig_fail(&ch->err, EBADMSG, "channel %u: %zu stray bytes after the deltas of a run", c,
                          (size_t)(end - p));
    ch->delta_pages += ph->count;
    return 0;
}

/* A DELTA or compressed run: the whole payload is read and its CRC checked before any byte of
 * it reaches RAM; then it is decompressed (exactly the size its encoding allows) and decoded. */
static int load_encoded(struct vfmig_receiver *r, uint32_t c, const struct vfmig_rec_hdr *h,
                        const struct vfmig_pages_hdr *ph, uint8_t *host, uint64_t first)
{
    struct vfmig_chan_rx *ch = &r->ch[c];
    uint8_t base = ph->encoding & (uint8_t)~VFMIG_ENC_ZSTD;
    size_t raw = (size_t)ph->count * VFMIG_PAGE_SIZE, most = base == VFMIG_ENC_RAW ? raw : ph->count * (2u + VFMIG_DELTA_MAX);
    uint32_t plen = h->len - (uint32_t)sizeof(*ph);
    if (plen == 0 || plen > most)
        return vfmig_fail(&ch->err, EPROTO, "channel %u: %s run of %u pages with a payload of %u bytes", c,
                          base == VFMIG_ENC_RAW ? "compressed" : "delta", ph->count, plen);
    if (!ch->buf && !(ch->buf = malloc(PAGES_MAX_LEN)))
        return vfmig_fail(&ch->err, ENOMEM, "channel %u: out of memory", c);
    int rc = chan_read(ch, ch->buf, plen);
    if (rc < 0)
        return io_fail(ch, c, rc);
    struct vfmig_rec_hdr z = *h;
    z.crc = 0;
    if (vfmig_crc32c(vfmig_crc32c(vfmig_crc32c(0, &z, sizeof(z)), ph, sizeof(*ph)), ch->buf, plen) != h->crc)
        return vfmig_fail(&ch->err, EBADMSG, "channel %u: record %llu (pages at 0x%llx): CRC mismatch, stream corrupted",
                          c, (unsigned long long)ch->records, (unsigned long long)ph->gpa);
    const uint8_t *body = ch->buf;
    size_t blen = plen;
    if (ph->encoding & VFMIG_ENC_ZSTD) {
        unsigned long long want = ZSTD_getFrameContentSize(ch->buf, plen);
        if (want == ZSTD_CONTENTSIZE_ERROR || want == ZSTD_CONTENTSIZE_UNKNOWN || want > most ||
            (base == VFMIG_ENC_RAW && want != raw))
            return vfmig_fail(&ch->err, EBADMSG, "channel %u: compressed run at 0x%llx declares a bad size", c,
                              (unsigned long long)ph->gpa);
        if (!ch->zctx && !(ch->zctx = ZSTD_createDCtx()))
            return vfmig_fail(&ch->err, ENOMEM, "channel %u: out of memory", c);
        if (base == VFMIG_ENC_RAW)
            populate(r, first);
        uint8_t *out = base == VFMIG_ENC_RAW ? host : ch->zbuf;
        if (!out && !(out = ch->zbuf = malloc(PAGES_MAX_LEN)))
            return vfmig_fail(&ch->err, ENOMEM, "channel %u: out of memory", c);
        size_t got = ZSTD_decompressDCtx(ch->zctx, out, most, ch->buf, plen);
        if (ZSTD_isError(got) || got != want)
            return vfmig_fail(&ch->err, EBADMSG, "channel %u: corrupt compressed run at 0x%llx: %s", c,
                              (unsigned long long)ph->gpa, ZSTD_isError(got) ? ZSTD_getErrorName(got) : "short");
        ch->zstd_records++;
        body = out;
        blen = got;
    }
    if (base == VFMIG_ENC_DELTA)
        return apply_deltas(r, c, ph, host, first, body, blen);
    for (uint32_t i = 0; i < ph->count; i++)
        atomic_fetch_or_explicit(&r->written[(first + i) / 64], 1ull << ((first + i) % 64), memory_order_relaxed);
    return 0;
}

static int load_pages(struct vfmig_receiver *r, uint32_t c, const struct vfmig_rec_hdr *h)
{
    struct vfmig_chan_rx *ch = &r->ch[c];
    struct vfmig_vm *vm = r->vm;
    struct vfmig_pages_hdr ph;
    if (h->len < sizeof(ph))
        return vfmig_fail(&ch->err, EPROTO, "channel %u: PAGES record too short", c);
    int rc = chan_read(ch, &ph, sizeof(ph));
    if (rc < 0)
        return io_fail(ch, c, rc);
    /* Every bound before any byte lands in RAM. */
    if (ph.count == 0 || ph.count > VFMIG_RUN_MAX_PAGES)
        return vfmig_fail(&ch->err, EPROTO, "channel %u: PAGES record with bad count %u", c, ph.count);
    if (ph.reserved[0] | ph.reserved[1] | ph.reserved[2])
        return vfmig_fail(&ch->err, EPROTO, "channel %u: PAGES record with reserved bytes set", c);
    uint8_t base = ph.encoding & (uint8_t)~VFMIG_ENC_ZSTD;
    int zstd = !!(ph.encoding & VFMIG_ENC_ZSTD);
    if ((base != VFMIG_ENC_RAW && base != VFMIG_ENC_ZERO && base != VFMIG_ENC_DELTA) ||
        (zstd && base == VFMIG_ENC_ZERO))
        return vfmig_fail(&ch->err, EPROTO, "channel %u: unknown page encoding 0x%x", c, ph.encoding);
    uint64_t bytes = (uint64_t)ph.count * VFMIG_PAGE_SIZE;
    uint8_t *host = ph.gpa % VFMIG_PAGE_SIZE ? NULL : vfmig_vm_host(vm, ph.gpa, bytes);
    if (!host)
        return vfmig_fail(&ch->err, EPROTO, "channel %u: pages at gpa 0x%llx (+%u) are outside guest RAM", c,
                          (unsigned long long)ph.gpa, ph.count);
    /* The run lies in one stripe, and that stripe is this channel's: a page then always
     * arrives on one channel, which is what keeps its later copies behind its earlier ones. */
    uint64_t first = (uint64_t)vfmig_vm_gpa_to_page(vm, ph.gpa), stripe = first / VFMIG_STRIPE_PAGES;
    if ((first + ph.count - 1) / VFMIG_STRIPE_PAGES != stripe)
        return vfmig_fail(&ch->err, EPROTO, "channel %u: run at page %llu (+%u) crosses its stripe", c,
                          (unsigned long long)first, ph.count);
    if (stripe % r->nchan != c)
        return vfmig_fail(&ch->err, EPROTO, "channel %u: run at page %llu belongs to channel %llu", c,
                          (unsigned long long)first, (unsigned long long)(stripe % r->nchan));
    if (base == VFMIG_ENC_DELTA || zstd) {
        if ((rc = load_encoded(r, c, h, &ph, host, first)) < 0)
            return rc;
        ch->pages += ph.count;
        return 0;
    }
    uint32_t dlen = ph.encoding == VFMIG_ENC_RAW ? (uint32_t)bytes : 0;
    if (h->len != sizeof(ph) + dlen)
        return vfmig_fail(&ch->err, EPROTO, "channel %u: PAGES length %u does not match %u pages", c, h->len,
                          ph.count);
    if (dlen)
        populate(r, first);
    if (dlen && (rc = chan_read(ch, host, dlen)) < 0)
        return io_fail(ch, c, rc);
    struct vfmig_rec_hdr z = *h;
    z.crc = 0;
    uint32_t crc = vfmig_crc32c(vfmig_crc32c(vfmig_crc32c(0, &z, sizeof(z)), &ph, sizeof(ph)), host, dlen);
    if (crc != h->crc)
        return vfmig_fail(&ch->err, EBADMSG, "channel %u: record %llu (pages at 0x%llx): CRC mismatch, stream corrupted",
                          c, (unsigned long long)ch->records, (unsigned long long)ph.gpa);
    for (uint32_t i = 0; i < ph.count; i++) {
        uint64_t p = first + i;
        uint64_t bit = 1ull << (p % 64);
        if (ph.encoding == VFMIG_ENC_RAW) {
            atomic_fetch_or_explicit(&r->written[p / 64], bit, memory_order_relaxed);
        } else if (atomic_fetch_and_explicit(&r->written[p / 64], ~bit, memory_order_relaxed) & bit) {
            memset(host + (size_t)i * VFMIG_PAGE_SIZE, 0, VFMIG_PAGE_SIZE); /* untouched pages are zero */
        }
    }
    ch->pages += ph.count;
    ch->zero_pages += ph.encoding == VFMIG_ENC_ZERO ? ph.count : 0;
    return 0;
}

/* Tell the source every record before ITER n is in RAM: its round is not done until then (a
 * compressed round can sit whole in the socket buffers while this side still decodes it).
 * Channel thread. A failed send is left to the next read, which fails too. */
static void applied(struct vfmig_chan_rx *ch, uint32_t iteration)
{
    if (ch->mem)
        return;
    struct {
        struct vfmig_rec_hdr h;
        struct vfmig_iter it;
    } rec = {.it = {.iteration = iteration}};
    vfmig_rec_seal(&rec.h, VFMIG_REC_APPLIED, &rec.it, sizeof(rec.it), NULL, 0);
    (void)send(ch->fd, &rec, sizeof(rec), MSG_NOSIGNAL);
}

/* Errors from the shared record checks (stream.c) don't know the channel: add it. */
static int on_channel(struct vfmig_chan_rx *ch, uint32_t c, int rc)
{
    char msg[VFMIG_ERR_LEN];
    snprintf(msg, sizeof(msg), "%s", ch->err.msg);
    return vfmig_fail(&ch->err, -rc, "channel %u: %s", c, msg);
}

static int small_payload(struct vfmig_chan_rx *ch, uint32_t c, const struct vfmig_rec_hdr *h, void *buf,
                         uint32_t want)
{
    if (h->len != want)
        return vfmig_fail(&ch->err, EPROTO, "channel %u: %s record of %u bytes, expected %u", c,
                          vfmig_rec_name(h->type), h->len, want);
    int rc = chan_read(ch, buf, want);
    if (rc < 0)
        return io_fail(ch, c, rc);
    rc = vfmig_rec_check_crc(h, buf, &ch->err);
    return rc < 0 ? on_channel(ch, c, rc) : 0;
}

static int recv_channel(struct vfmig_receiver *r, uint32_t c)
{
    struct vfmig_chan_rx *ch = &r->ch[c];
    for (;;) {
        if (atomic_load(&r->cancel))
            return vfmig_fail(&ch->err, ECANCELED, "channel %u: cancelled", c);
        struct vfmig_rec_hdr h;
        int rc = chan_read(ch, &h, sizeof(h));
        if (rc < 0)
            return io_fail(ch, c, rc);
        if ((rc = vfmig_rec_check_hdr(&h, PAGES_MAX_LEN, &ch->err)) < 0)
            return on_channel(ch, c, rc);
        if (h.type == VFMIG_REC_PAGES) {
            if ((rc = load_pages(r, c, &h)) < 0)
                return rc;
        } else if (h.type == VFMIG_REC_ITER) {
            struct vfmig_iter it;
            if ((rc = small_payload(ch, c, &h, &it, sizeof(it))) < 0)
                return rc;
            if (it.reserved || it.iteration != ch->iterations + 1)
                return vfmig_fail(&ch->err, EPROTO, "channel %u: ITER %u out of sequence (expected %llu)", c,
                                  it.iteration, (unsigned long long)ch->iterations + 1);
            ch->iterations++;
            applied(ch, it.iteration);
        } else if (h.type == VFMIG_REC_EOS) {
            struct vfmig_eos e;
            if ((rc = small_payload(ch, c, &h, &e, sizeof(e))) < 0)
                return rc;
            if (e.reserved || e.records != ch->digest.records || e.bytes != ch->digest.bytes || e.chain != ch->digest.chain)
                return vfmig_fail(&ch->err, EBADMSG,
                                  "channel %u: end-of-stream digest mismatch (sent %llu records, got %llu)", c,
                                  (unsigned long long)e.records, (unsigned long long)ch->digest.records);
            ch->done = 1;
            return 0;
        } else {
            return vfmig_fail(&ch->err, EPROTO, "channel %u: unexpected %s record on a page channel", c,
                              vfmig_rec_name(h.type));
        }
        vfmig_digest_add(&ch->digest, &h);
        ch->records++;
        ch->bytes += sizeof(h) + h.len;
    }
}

static void *rx_thread(void *arg)
{
    struct vfmig_chan_rx *ch = arg;
    struct vfmig_receiver *r = ch->owner;
    char name[16]; /* "vfmig-rx0".."vfmig-rx15": for perf and the BPF probes' thread filters */
    snprintf(name, sizeof(name), "vfmig-rx%u", (unsigned)(ch - r->ch));
    pthread_setname_np(pthread_self(), name);
    int rc = recv_channel(r, (uint32_t)(ch - r->ch));
    ch->rc = rc;
    if (rc < 0) { /* one bad channel dooms the migration: stop the others promptly */
        atomic_store(&r->cancel, 1);
        int none = -1;
        /* The others may sit in recv with nothing coming (the source waits for APPLIED):
         * shutting their sockets wakes them, and tells the source at once. */
        if (atomic_compare_exchange_strong(&r->first_failed, &none, (int)(ch - r->ch)))
            for (uint32_t c = 0; c < r->nchan; c++)
                if (&r->ch[c] != ch && r->ch[c].fd >= 0)
                    shutdown(r->ch[c].fd, SHUT_RDWR);
    }
    return NULL;
}

int vfmig_receiver_start(struct vfmig_receiver *r)
{
    for (uint32_t c = 0; c < r->nchan; c++) {
        r->ch[c].owner = r;
        if (pthread_create(&r->ch[c].thread, NULL, rx_thread, &r->ch[c]) != 0) {
            atomic_store(&r->cancel, 1);
            vfmig_receiver_join(r);
            return vfmig_fail(&r->err, EAGAIN, "cannot start the thread of channel %u", c);
        }
        r->ch[c].thread_live = 1;
    }
    return 0;
}

int vfmig_receiver_join(struct vfmig_receiver *r)
{
    for (uint32_t c = 0; c < r->nchan; c++) {
        if (r->ch[c].thread_live)
            pthread_join(r->ch[c].thread, NULL);
        r->ch[c].thread_live = 0;
    }
    /* Report the root cause, not a channel that merely saw the cancel or its socket shut. */
    int first = atomic_load(&r->first_failed);
    if (first >= 0) {
        r->err = r->ch[first].err;
        return r->ch[first].rc;
    }
    int rc = 0;
    for (uint32_t c = 0; c < r->nchan; c++) {
        if (r->ch[c].rc < 0 && (rc == 0 || rc == -ECANCELED)) {
            rc = r->ch[c].rc;
            r->err = r->ch[c].err;
        }
    }
    return rc;
}

int vfmig_receiver_decode_mem(struct vfmig_receiver *r, uint32_t c, const uint8_t *buf, size_t len)
{
    if (c >= r->nchan)
        return vfmig_fail(&r->err, EINVAL, "no channel %u", c);
    struct vfmig_chan_rx *ch = &r->ch[c];
    ch->mem = buf;
    ch->mem_len = len;
    ch->mem_off = 0;
    ch->rc = recv_channel(r, c);
    ch->mem = NULL;
    if (ch->rc < 0)
        r->err = ch->err;
    return ch->rc;
}

int vfmig_receiver_run(struct vfmig_receiver *r)
{
    int rc = vfmig_receiver_start(r);
    return rc < 0 ? rc : vfmig_receiver_join(r);
}

uint32_t vfmig_zero_page_crc(void)
{
    static const uint8_t zero[VFMIG_PAGE_SIZE];
    static _Atomic uint32_t cached; /* any thread may be first: each computes the same value */
    uint32_t crc = atomic_load_explicit(&cached, memory_order_relaxed);
    if (!crc) {
        crc = vfmig_crc32c(0, zero, sizeof(zero));
        atomic_store_explicit(&cached, crc, memory_order_relaxed);
    }
    return crc;
}

void vfmig_ram_page_crcs(const struct vfmig_vm *vm, uint32_t *out)
{
    uint64_t data[8];
    for (uint64_t first = 0; first < vm->npages; first += VFMIG_STRIPE_PAGES) {
        uint32_t n = vm->npages - first < VFMIG_STRIPE_PAGES ? (uint32_t)(vm->npages - first) : VFMIG_STRIPE_PAGES;
        vfmig_vm_data_map(vm, first, n, data);
        for (uint32_t i = 0; i < n; i++)
            out[first + i] = data[i / 64] & (1ull << (i % 64))
                                 ? vfmig_crc32c(0, vm->ram + (first + i) * VFMIG_PAGE_SIZE, VFMIG_PAGE_SIZE)
                                 : vfmig_zero_page_crc();
    }
}
