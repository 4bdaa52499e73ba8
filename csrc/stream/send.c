/* The page sender: one thread per channel walks its stripes of the dirty bitmap, groups pages
 * into runs (raw or zero) and writes them as PAGES records. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>

#include "vfmig/channels.h"
#include "vfmig/zero.h"

#define HDRS (sizeof(struct vfmig_rec_hdr) + sizeof(struct vfmig_pages_hdr))
#define SEND_TIMEOUT_S 30

struct run {
    uint64_t first;  /* RAM page index */
    uint32_t count;
    uint8_t enc;
};

int vfmig_sender_init(struct vfmig_sender *s, struct vfmig_vm *vm, const int *fds, uint32_t nchan,
                      struct vfmig_err *err)
{
    memset(s, 0, sizeof(*s));
    if (nchan < 1 || nchan > VFMIG_MAX_CHANNELS)
        return vfmig_fail(err, EINVAL, "channels must be 1..%d, got %u", VFMIG_MAX_CHANNELS, nchan);
    s->vm = vm;
    s->nchan = nchan;
    struct timeval tv = {.tv_sec = SEND_TIMEOUT_S};
    for (uint32_t i = 0; i < nchan; i++) {
        s->ch[i].fd = fds[i];
        /* A peer that stops reading must not hang us: time out and fail the migration. */
        setsockopt(fds[i], SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
        /* Headers fill the end of the first page, so pages start page-aligned right after. */
        s->ch[i].staging = aligned_alloc(4096, 4096 + (size_t)VFMIG_RUN_MAX_PAGES * VFMIG_PAGE_SIZE);
        if (!s->ch[i].staging) {
            vfmig_sender_free(s);
            return vfmig_fail(err, ENOMEM, "out of memory for staging buffers");
        }
    }
    return 0;
}

void vfmig_sender_free(struct vfmig_sender *s)
{
    for (uint32_t i = 0; i < VFMIG_MAX_CHANNELS; i++) {
        free(s->ch[i].staging);
        s->ch[i].staging = NULL;
    }
}

static void pace(struct vfmig_sender *s, struct vfmig_chan_tx *ch, uint64_t t0)
{
    uint64_t bw = atomic_load(&s->bandwidth);
    if (!bw)
        return;
    double per_chan = (double)bw / s->nchan;
    uint64_t due = t0 + (uint64_t)((double)ch->st.bytes * 1e9 / per_chan), now = vfmig_now_ns();
    if (due > now) {
        struct timespec ts = {.tv_sec = (time_t)((due - now) / 1000000000ull),
                              .tv_nsec = (long)((due - now) % 1000000000ull)};
        nanosleep(&ts, NULL);
    }
}

/* Write one run as a PAGES record. */
static int flush(struct vfmig_sender *s, struct vfmig_chan_tx *ch, const struct run *r)
{
    struct vfmig_vm *vm = s->vm;
    struct vfmig_rec_hdr *h = (struct vfmig_rec_hdr *)(ch->staging + 4096 - HDRS);
    struct vfmig_pages_hdr *ph = (struct vfmig_pages_hdr *)(h + 1);
    *ph = (struct vfmig_pages_hdr){.gpa = vfmig_vm_page_to_gpa(vm, r->first), .count = r->count, .encoding = r->enc};
    uint32_t dlen = r->enc == VFMIG_ENC_RAW ? r->count * VFMIG_PAGE_SIZE : 0;
    const uint8_t *data = vm->ram + r->first * VFMIG_PAGE_SIZE;
    if (s->zero_copy || !dlen) {
        vfmig_rec_seal(h, VFMIG_REC_PAGES, ph, sizeof(*ph), data, dlen);
    } else {
        /* Live pages: snapshot them into staging in the CRC's own pass, so the record is
         * consistent however the guest writes meanwhile (it is dirty then, and goes again). */
        vfmig_rec_seal_copy(h, VFMIG_REC_PAGES, ph, sizeof(*ph), ch->staging + 4096, data, dlen);
        data = ch->staging + 4096;
    }
    int rc;
    if (dlen && s->zero_copy) {
        struct iovec iov[2] = {{h, HDRS}, {(void *)data, dlen}};
        rc = vfmig_writev_all(ch->fd, iov, 2);
    } else {
        rc = vfmig_write_all(ch->fd, h, HDRS + dlen); /* headers sit right before the pages */
    }
    if (rc < 0)
        return rc;
    vfmig_digest_add(&ch->digest, h);
    ch->st.records++;
    ch->st.bytes += HDRS + dlen;
    ch->st.pages += r->count;
    if (r->enc == VFMIG_ENC_ZERO)
        ch->st.zero_pages += r->count;
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
    uint64_t t0 = vfmig_now_ns();
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
                uint8_t enc = hole || vfmig_page_is_zero(vm->ram + p * VFMIG_PAGE_SIZE) ? VFMIG_ENC_ZERO
                                                                                           : VFMIG_ENC_RAW;
                int contiguous = r.count && p == r.first + r.count &&
                                 vfmig_vm_page_to_gpa(vm, p) == vfmig_vm_page_to_gpa(vm, r.first) +
                                                                    (uint64_t)r.count * VFMIG_PAGE_SIZE;
                if (r.count && (!contiguous || enc != r.enc || r.count == VFMIG_RUN_MAX_PAGES)) {
                    if (atomic_load(&s->cancel))
                        return vfmig_fail(&ch->err, ECANCELED, "migration cancelled");
                    int rc = flush(s, ch, &r);
                    if (rc < 0)
                        return send_fail(ch, c, rc);
                    pace(s, ch, t0);
                    r.count = 0;
                }
                if (!r.count) {
                    r.first = p;
                    r.enc = enc;
                }
                r.count++;
            }
        }
        /* Runs never span stripes: flush at each stripe's end. */
        if (r.count) {
            int rc = flush(s, ch, &r);
            if (rc < 0)
                return send_fail(ch, c, rc);
            pace(s, ch, t0);
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
    s->bits = bits;
    s->zero_copy = zero_copy;
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
        out->pages += s->ch[c].st.pages;
        out->zero_pages += s->ch[c].st.zero_pages;
        out->bytes += s->ch[c].st.bytes;
        out->records += s->ch[c].st.records;
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
