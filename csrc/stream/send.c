/* The page sender: one thread per channel walks its stripes of the dirty bitmap, groups pages
 * into runs (raw, zero or delta) and writes them as PAGES records, compressed on request. */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <zstd.h>

#include "vfmig/channels.h"
#include "vfmig/zero.h"

#define HDRS (sizeof(struct vfmig_rec_hdr) + sizeof(struct vfmig_pages_hdr))
#define SEND_TIMEOUT_S 30
#define CANCEL_POLL_MS 50 /* how often a wait for APPLIED looks at cancel */
#define RUN_BYTES ((size_t)VFMIG_RUN_MAX_PAGES * VFMIG_PAGE_SIZE)

struct run {
    uint64_t first;  /* RAM page index */
    uint32_t count;
    uint8_t enc;
    uint32_t dlen;   /* DELTA: bytes of [u16 len][body] built in dbuf */
    uint64_t keep[VFMIG_RUN_MAX_PAGES / 64]; /* RAW: pages to put in the delta cache once sent */
};

int vfmig_sender_init(struct vfmig_sender *s, struct vfmig_vm *vm, const int *fds, uint32_t nchan,
                      struct vfmig_err *err)
{
    memset(s, 0, sizeof(*s));
    vfmig_pacer_init(&s->pacer);
    if (nchan < 1 || nchan > VFMIG_MAX_CHANNELS)
        return vfmig_fail(err, EINVAL, "channels must be 1..%d, got %u", VFMIG_MAX_CHANNELS, nchan);
    s->vm = vm;
    s->nchan = nchan;
    struct timeval tv = {.tv_sec = SEND_TIMEOUT_S};
    for (uint32_t i = 0; i < nchan; i++) {
        s->ch[i].fd = fds[i];
        /* A peer that stops reading must not hang us: time out and fail the migration. */
        setsockopt(fds[i], SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
        setsockopt(fds[i], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)); /* a record of APPLIED cut short */
        /* Headers fill the end of the first page, so pages start page-aligned right after. */
        s->ch[i].staging = aligned_alloc(4096, 4096 + RUN_BYTES);
        s->ch[i].dbuf = malloc(RUN_BYTES + VFMIG_PAGE_SIZE);
        if (!s->ch[i].staging || !s->ch[i].dbuf) {
            vfmig_sender_free(s);
            return vfmig_fail(err, ENOMEM, "out of memory for staging buffers");
        }
    }
    s->sent = calloc((vm->npages + 63) / 64, sizeof(uint64_t));
    if (!s->sent) {
        vfmig_sender_free(s);
        return vfmig_fail(err, ENOMEM, "out of memory for the sent-pages map");
    }
    return 0;
}

void vfmig_sender_free(struct vfmig_sender *s)
{
    vfmig_sender_set_delta(s, 0);
    vfmig_sender_set_compress(s, 0);
    for (uint32_t i = 0; i < VFMIG_MAX_CHANNELS; i++) {
        free(s->ch[i].staging);
        free(s->ch[i].dbuf);
        s->ch[i].staging = s->ch[i].dbuf = NULL;
    }
    free(s->sent);
    s->sent = NULL;
    vfmig_pacer_destroy(&s->pacer);
}

int vfmig_sender_set_delta(struct vfmig_sender *s, uint64_t cache_pages)
{
    atomic_store(&s->delta, 0);
    for (uint32_t i = 0; i < VFMIG_MAX_CHANNELS; i++)
        vfmig_delta_cache_free(&s->ch[i].cache);
    if (!cache_pages)
        return 0;
    if (cache_pages < s->nchan || cache_pages > s->vm->npages)
        return vfmig_fail(&s->err, EINVAL, "delta cache of %llu pages: must be %u..%llu (one per channel up to RAM)",
                          (unsigned long long)cache_pages, s->nchan, (unsigned long long)s->vm->npages);
    for (uint32_t i = 0; i < s->nchan; i++) {
        if (vfmig_delta_cache_init(&s->ch[i].cache, cache_pages / s->nchan) < 0) {
            vfmig_sender_set_delta(s, 0);
            return vfmig_fail(&s->err, ENOMEM, "out of memory for a delta cache of %llu MiB",
                              (unsigned long long)(cache_pages * VFMIG_PAGE_SIZE >> 20));
        }
    }
    atomic_store(&s->delta, 1);
    return 0;
}

int vfmig_sender_set_compress(struct vfmig_sender *s, int level)
{
    if (level < 0 || level > VFMIG_ZSTD_LEVEL_MAX)
        return vfmig_fail(&s->err, EINVAL, "zstd level must be 1..%d, got %d", VFMIG_ZSTD_LEVEL_MAX, level);
    s->zstd_level = 0;
    for (uint32_t i = 0; i < VFMIG_MAX_CHANNELS; i++) {
        ZSTD_freeCCtx(s->ch[i].zctx);
        free(s->ch[i].zbuf);
        s->ch[i].zctx = NULL;
        s->ch[i].zbuf = NULL;
    }
    if (!level)
        return 0;
    for (uint32_t i = 0; i < s->nchan; i++) {
        s->ch[i].zctx = ZSTD_createCCtx();
        s->ch[i].zbuf = malloc(ZSTD_compressBound(RUN_BYTES));
        if (!s->ch[i].zctx || !s->ch[i].zbuf) {
            vfmig_sender_set_compress(s, 0);
            return vfmig_fail(&s->err, ENOMEM, "out of memory for compression");
        }
        ZSTD_CCtx_setParameter(s->ch[i].zctx, ZSTD_c_compressionLevel, level);
        ZSTD_CCtx_setParameter(s->ch[i].zctx, ZSTD_c_contentSizeFlag, 1);
        ZSTD_CCtx_setParameter(s->ch[i].zctx, ZSTD_c_checksumFlag, 0); /* the record CRC covers it */
    }
    s->zstd_level = level;
    return 0;
}

/* The cache slot of page p on its channel: its position in that channel's stripes. */
static inline uint64_t cache_slot(const struct vfmig_sender *s, uint64_t p)
{
    return (p / VFMIG_STRIPE_PAGES / s->nchan) * VFMIG_STRIPE_PAGES + p % VFMIG_STRIPE_PAGES;
}

uint64_t vfmig_sender_cached(const struct vfmig_sender *s, const uint64_t *bits)
{
    if (!atomic_load(&s->delta))
        return 0;
    uint64_t n = 0;
    for (uint64_t w = 0; w < (s->vm->npages + 63) / 64; w++)
        for (uint64_t b = bits[w]; b; b &= b - 1) {
            uint64_t p = w * 64 + (uint64_t)__builtin_ctzll(b);
            const struct vfmig_delta_cache *c = &s->ch[p / VFMIG_STRIPE_PAGES % s->nchan].cache;
            n += c->nslots && c->tag[cache_slot(s, p) % c->nslots] == p + 1;
        }
    return n;
}

static void cache_put(struct vfmig_sender *s, struct vfmig_chan_tx *ch, uint64_t p, const uint8_t *data)
{
    struct vfmig_delta_cache *c = &ch->cache;
    uint64_t slot = cache_slot(s, p) % c->nslots;
    c->tag[slot] = p + 1;
    memcpy(c->data + slot * VFMIG_PAGE_SIZE, data, VFMIG_PAGE_SIZE);
}

static void cache_drop(struct vfmig_sender *s, struct vfmig_chan_tx *ch, uint64_t p)
{
    struct vfmig_delta_cache *c = &ch->cache;
    if (c->nslots && c->tag[cache_slot(s, p) % c->nslots] == p + 1)
        c->tag[cache_slot(s, p) % c->nslots] = 0;
}

/* All channels share --bandwidth, the link's: each adds what it wrote since its last call
 * (*counted) to the pacer and sleeps until the link would have carried the total, so a round
 * whose pages fall on one channel's stripes gets the whole link, not a 1/N share. Any channel
 * thread; the pacer's lock is not held while it sleeps. */
static void pace(struct vfmig_sender *s, struct vfmig_chan_tx *ch, uint64_t *counted)
{
    uint64_t mine = ch->st.bytes - *counted, now = vfmig_now_ns();
    *counted = ch->st.bytes;
    uint64_t due = vfmig_pacer_due(&s->pacer, mine, atomic_load(&s->bandwidth), now);
    if (due > now) {
        struct timespec ts = {.tv_sec = (time_t)((due - now) / 1000000000ull),
                              .tv_nsec = (long)((due - now) % 1000000000ull)};
        nanosleep(&ts, NULL);
    }
}

/* Compress the payload into zbuf if that makes it smaller; returns the bytes to send. */
static uint32_t squeeze(struct vfmig_sender *s, struct vfmig_chan_tx *ch, const uint8_t **data, uint32_t len,
                        struct vfmig_pages_hdr *ph)
{
    if (!s->zstd_level || !len)
        return len;
    size_t z = ZSTD_compress2(ch->zctx, ch->zbuf, ZSTD_compressBound(len), *data, len);
    if (ZSTD_isError(z) || z >= len)
        return len; /* incompressible (or a library error): the plain record is as good */
    *data = ch->zbuf;
    ph->encoding |= VFMIG_ENC_ZSTD;
    ch->st.zstd_pages += ph->count;
    return (uint32_t)z;
}

/* Write one run as a PAGES record. */
static int flush(struct vfmig_sender *s, struct vfmig_chan_tx *ch, const struct run *r)
{
    struct vfmig_vm *vm = s->vm;
    struct vfmig_rec_hdr *h = (struct vfmig_rec_hdr *)(ch->staging + 4096 - HDRS);
    struct vfmig_pages_hdr *ph = (struct vfmig_pages_hdr *)(h + 1);
    *ph = (struct vfmig_pages_hdr){.gpa = vfmig_vm_page_to_gpa(vm, r->first), .count = r->count, .encoding = r->enc};
    const uint8_t *ram = vm->ram + r->first * VFMIG_PAGE_SIZE, *data = NULL;
    uint32_t dlen = 0;
    if (r->enc == VFMIG_ENC_DELTA) {
        data = ch->dbuf;
        dlen = r->dlen;
    } else if (r->enc == VFMIG_ENC_RAW) {
        data = ram;
        dlen = r->count * VFMIG_PAGE_SIZE;
    }
    if (r->enc == VFMIG_ENC_RAW && !s->zero_copy && s->zstd_level) {
        /* Live pages: snapshot them first, so the compressed bytes and the cache agree. */
        memcpy(ch->staging + 4096, ram, dlen);
        data = ch->staging + 4096;
    }
    if (s->zstd_level)
        dlen = squeeze(s, ch, &data, dlen, ph);
    if (r->enc == VFMIG_ENC_RAW && !s->zero_copy && !s->zstd_level) {
        /* Live pages: snapshot them into staging in the CRC's own pass, so the record is
         * consistent however the guest writes meanwhile (it is dirty then, and goes again). */
        vfmig_rec_seal_copy(h, VFMIG_REC_PAGES, ph, sizeof(*ph), ch->staging + 4096, ram, dlen);
        data = ch->staging + 4096;
    } else {
        vfmig_rec_seal(h, VFMIG_REC_PAGES, ph, sizeof(*ph), data, dlen);
    }
    int rc;
    if (data == ch->staging + 4096 || !dlen) {
        rc = vfmig_write_all(ch->fd, h, HDRS + dlen); /* headers sit right before the pages */
    } else {
        struct iovec iov[2] = {{h, HDRS}, {(void *)data, dlen}};
        rc = vfmig_writev_all(ch->fd, iov, 2);
    }
    if (rc < 0)
        return rc;
    vfmig_digest_add(&ch->digest, h);
    ch->st.records++;
    ch->st.bytes += HDRS + dlen;
    ch->st.pages += r->count;
    if (r->enc == VFMIG_ENC_ZERO) {
        ch->st.zero_pages += r->count;
        return 0;
    }
    ch->st.bytes_in += (uint64_t)r->count * VFMIG_PAGE_SIZE;
    if (r->enc == VFMIG_ENC_DELTA) {
        ch->st.delta_pages += r->count;
        ch->st.delta_bytes += HDRS + dlen;
        return 0;
    }
    ch->st.raw_pages += r->count;
    /* The cache gets exactly the bytes sent: the snapshot in staging (never live RAM). */
    for (uint32_t w = 0; w < VFMIG_RUN_MAX_PAGES / 64; w++)
        for (uint64_t k = r->keep[w]; k; k &= k - 1) {
            uint32_t i = w * 64 + (uint32_t)__builtin_ctzll(k);
            cache_put(s, ch, r->first + i, ch->staging + 4096 + (size_t)i * VFMIG_PAGE_SIZE);
        }
    return 0;
}

static int send_fail(struct vfmig_chan_tx *ch, uint32_t c, int rc)
{
    if (rc == -EAGAIN || rc == -EWOULDBLOCK)
        return vfmig_fail(&ch->err, ETIMEDOUT, "channel %u: the destination stopped reading for %d s", c,
                          SEND_TIMEOUT_S);
    if (rc == -EPIPE || rc == -ECONNRESET)
        return vfmig_fail(&ch->err, -rc, "channel %u: the destination closed the connection", c);
    return vfmig_fail(&ch->err, -rc, "channel %u: send failed: %s", c, strerror(-rc));
}

static int send_stripes(struct vfmig_sender *s, uint32_t c)
{
    struct vfmig_chan_tx *ch = &s->ch[c];
    struct vfmig_vm *vm = s->vm;
    uint64_t counted = 0; /* of this channel's bytes, those pace() has added to the round's */
    int delta = atomic_load(&s->delta) && ch->cache.nslots;
    struct run r = {0};
    for (uint64_t stripe = c * (uint64_t)VFMIG_STRIPE_PAGES; stripe < vm->npages;
         stripe += (uint64_t)s->nchan * VFMIG_STRIPE_PAGES) {
        uint64_t end = stripe + VFMIG_STRIPE_PAGES < vm->npages ? stripe + VFMIG_STRIPE_PAGES : vm->npages;
        uint64_t any = 0, data[8];
        for (uint64_t w = stripe / 64; w < (end + 63) / 64; w++)
            any |= s->bits[w];
        if (!any)
            continue;
        /* Pages the guest never wrote are memfd holes: zero, and not to be read (a read would
         * allocate them). */
        vfmig_vm_data_map(vm, stripe, (uint32_t)(end - stripe), data);
        for (uint64_t w = stripe / 64; w < (end + 63) / 64; w++) {
            uint64_t word = s->bits[w];
            while (word) {
                uint64_t p = w * 64 + (uint64_t)__builtin_ctzll(word);
                word &= word - 1;
                if (p >= end)
                    break;
                int hole = !(data[(p - stripe) / 64] & (1ull << ((p - stripe) % 64)));
                const uint8_t *page = vm->ram + p * VFMIG_PAGE_SIZE;
                uint8_t *old = NULL, *body = ch->dbuf + RUN_BYTES;
                int before = (int)(s->sent[p / 64] >> (p % 64) & 1), dl = -1, keep = 0;
                s->sent[p / 64] |= 1ull << (p % 64); /* this word lies in our stripe: no other writer */
                uint8_t enc = VFMIG_ENC_RAW;
                if (hole || vfmig_page_is_zero(page)) {
                    enc = VFMIG_ENC_ZERO;
                    if (delta)
                        cache_drop(s, ch, p);
                } else if (delta && before) {
                    ch->st.cache_lookups++;
                    uint64_t slot = cache_slot(s, p) % ch->cache.nslots;
                    if ((old = vfmig_delta_cache_get(&ch->cache, slot, p))) {
                        ch->st.cache_hits++;
                        ch->cache.used[slot] = s->round;
                        if ((dl = vfmig_delta_encode(page, old, body)) >= 0)
                            enc = VFMIG_ENC_DELTA;
                        else
                            ch->st.delta_fallbacks++;
                    }
                    /* No round follows a zero-copy one; a slot used this round stays put. */
                    keep = enc == VFMIG_ENC_RAW && !s->zero_copy && (old || ch->cache.used[slot] != s->round);
                    if (keep)
                        ch->cache.used[slot] = s->round;
                }
                int contiguous = r.count && p == r.first + r.count &&
                                 vfmig_vm_page_to_gpa(vm, p) == vfmig_vm_page_to_gpa(vm, r.first) +
                                                                    (uint64_t)r.count * VFMIG_PAGE_SIZE;
                if (r.count && (!contiguous || enc != r.enc || r.count == VFMIG_RUN_MAX_PAGES)) {
                    if (atomic_load(&s->cancel))
                        return vfmig_fail(&ch->err, ECANCELED, "migration cancelled");
                    int rc = flush(s, ch, &r);
                    if (rc < 0)
                        return send_fail(ch, c, rc);
                    pace(s, ch, &counted);
                    r.count = 0;
                }
                if (!r.count) {
                    r.first = p;
                    r.enc = enc;
                    r.dlen = 0;
                    memset(r.keep, 0, sizeof(r.keep));
                }
                if (enc == VFMIG_ENC_DELTA) {
                    uint16_t len16 = (uint16_t)dl;
                    memcpy(ch->dbuf + r.dlen, &len16, 2);
                    memcpy(ch->dbuf + r.dlen + 2, body, (size_t)dl);
                    r.dlen += 2 + (uint32_t)dl;
                    /* The cache takes the delta as the destination will: the same bytes, so
                     * both copies stay equal however the page changed while it was encoded. */
                    if (!s->zero_copy)
                        vfmig_delta_apply(old, body, (size_t)dl);
                }
                if (keep)
                    r.keep[r.count / 64] |= 1ull << (r.count % 64);
                r.count++;
            }
        }
        /* Runs never span stripes: flush at each stripe's end. */
        if (r.count) {
            int rc = flush(s, ch, &r);
            if (rc < 0)
                return send_fail(ch, c, rc);
            pace(s, ch, &counted);
            r.count = 0;
        }
    }
    return 0;
}

struct job {
    struct vfmig_sender *s;
    uint32_t c;
};

static void *chan_thread(void *arg)
{
    struct job *j = arg;
    j->s->ch[j->c].rc = send_stripes(j->s, j->c);
    return NULL;
}

int vfmig_send_round(struct vfmig_sender *s, const uint64_t *bits, int zero_copy, struct vfmig_round_stats *out)
{
    uint64_t t0 = vfmig_now_ns();
    s->round++;
    s->bits = bits;
    s->zero_copy = zero_copy;
    vfmig_pacer_restart(&s->pacer, t0, atomic_load(&s->bandwidth));
    pthread_t th[VFMIG_MAX_CHANNELS];
    struct job jobs[VFMIG_MAX_CHANNELS];
    int live[VFMIG_MAX_CHANNELS] = {0};
    for (uint32_t c = 0; c < s->nchan; c++) {
        memset(&s->ch[c].st, 0, sizeof(s->ch[c].st));
        s->ch[c].rc = 0;
        jobs[c] = (struct job){s, c};
        if (c > 0)
            live[c] = pthread_create(&th[c], NULL, chan_thread, &jobs[c]) == 0;
    }
    chan_thread(&jobs[0]);
    int rc = 0;
    memset(out, 0, sizeof(*out));
    for (uint32_t c = 0; c < s->nchan; c++) {
        if (c > 0 && live[c])
            pthread_join(th[c], NULL);
        else if (c > 0)
            s->ch[c].rc = vfmig_fail(&s->ch[c].err, EAGAIN, "cannot start the thread of channel %u", c);
        if (s->ch[c].rc < 0 && rc == 0) {
            rc = s->ch[c].rc;
            s->err = s->ch[c].err;
        }
        const struct vfmig_round_stats *st = &s->ch[c].st;
        out->pages += st->pages;
        out->zero_pages += st->zero_pages;
        out->raw_pages += st->raw_pages;
        out->delta_pages += st->delta_pages;
        out->zstd_pages += st->zstd_pages;
        out->bytes_in += st->bytes_in;
        out->bytes += st->bytes;
        out->records += st->records;
        out->cache_lookups += st->cache_lookups;
        out->cache_hits += st->cache_hits;
        out->delta_fallbacks += st->delta_fallbacks;
        out->delta_bytes += st->delta_bytes;
    }
    out->ns = vfmig_now_ns() - t0;
    return rc;
}

static int send_small(struct vfmig_sender *s, uint32_t c, uint16_t type, const void *p, uint32_t len, int digest)
{
    struct {
        struct vfmig_rec_hdr h;
        uint8_t payload[64];
    } rec;
    memcpy(rec.payload, p, len);
    vfmig_rec_seal(&rec.h, type, rec.payload, len, NULL, 0);
    int rc = vfmig_write_all(s->ch[c].fd, &rec, sizeof(rec.h) + len);
    if (rc < 0)
        return vfmig_fail(&s->err, -rc, "channel %u: send %s failed: %s", c, vfmig_rec_name(type), strerror(-rc));
    if (digest)
        vfmig_digest_add(&s->ch[c].digest, &rec.h);
    return 0;
}

int vfmig_send_marker(struct vfmig_sender *s, uint32_t iteration, uint64_t dirty)
{
    struct vfmig_iter it = {.iteration = iteration, .dirty_pages = dirty};
    for (uint32_t c = 0; c < s->nchan; c++) {
        int rc = send_small(s, c, VFMIG_REC_ITER, &it, sizeof(it), 1);
        if (rc < 0)
            return rc;
    }
    return 0;
}

static int applied_io(struct vfmig_sender *s, uint32_t c, int rc)
{
    if (rc == -ECONNRESET)
        return vfmig_fail(&s->err, ECONNRESET, "channel %u: the destination closed the connection", c);
    return vfmig_fail(&s->err, -rc, "channel %u: reading APPLIED failed: %s", c, strerror(-rc));
}

static int read_applied(struct vfmig_sender *s, uint32_t c)
{
    struct vfmig_chan_tx *ch = &s->ch[c];
    struct vfmig_rec_hdr h;
    struct vfmig_iter it;
    int rc = vfmig_read_all(ch->fd, &h, sizeof(h));
    if (rc < 0)
        return applied_io(s, c, rc);
    if ((rc = vfmig_rec_check_hdr(&h, sizeof(it), &s->err)) < 0)
        return rc;
    if (h.type != VFMIG_REC_APPLIED || h.len != sizeof(it))
        return vfmig_fail(&s->err, EPROTO, "channel %u: the destination sent %s, not APPLIED", c, vfmig_rec_name(h.type));
    if ((rc = vfmig_read_all(ch->fd, &it, sizeof(it))) < 0)
        return applied_io(s, c, rc);
    if ((rc = vfmig_rec_check_crc(&h, &it, &s->err)) < 0)
        return rc;
    if (it.iteration != ch->applied + 1 || it.reserved || it.dirty_pages)
        return vfmig_fail(&s->err, EPROTO, "channel %u: APPLIED %u out of sequence (expected %u)", c, it.iteration,
                          ch->applied + 1);
    ch->applied = it.iteration;
    return 0;
}

int vfmig_sender_wait_applied(struct vfmig_sender *s, uint32_t iteration, int timeout_ms)
{
    uint64_t deadline = vfmig_now_ns() + (uint64_t)timeout_ms * 1000000ull;
    for (uint32_t c = 0; c < s->nchan; c++) {
        while (s->ch[c].applied < iteration) {
            if (atomic_load(&s->cancel))
                return vfmig_fail(&s->err, ECANCELED, "migration cancelled");
            uint64_t now = vfmig_now_ns();
            struct pollfd pfd = {.fd = s->ch[c].fd, .events = POLLIN};
            int left = now < deadline ? (int)((deadline - now + 999999) / 1000000) : 0;
            int n = poll(&pfd, 1, left < CANCEL_POLL_MS ? left : CANCEL_POLL_MS);
            if ((n < 0 && errno == EINTR) || (n == 0 && left > CANCEL_POLL_MS))
                continue; /* a slice ended: look at cancel again */
            if (n < 0)
                return vfmig_fail(&s->err, errno, "channel %u: poll failed: %s", c, strerror(errno));
            if (n == 0)
                return vfmig_fail(&s->err, ETIMEDOUT,
                                  "channel %u: the destination did not answer that it applied round %u in %d ms", c,
                                  iteration, timeout_ms);
            int rc = read_applied(s, c);
            if (rc < 0)
                return rc;
        }
    }
    return 0;
}

int vfmig_send_eos(struct vfmig_sender *s)
{
    for (uint32_t c = 0; c < s->nchan; c++) {
        const struct vfmig_digest *d = &s->ch[c].digest;
        struct vfmig_eos e = {.records = d->records, .bytes = d->bytes, .chain = d->chain};
        int rc = send_small(s, c, VFMIG_REC_EOS, &e, sizeof(e), 0);
        if (rc < 0)
            return rc;
    }
    return 0;
}
