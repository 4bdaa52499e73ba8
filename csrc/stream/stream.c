/* Record framing and checks shared by the page channels (C) and the control channel (Python). */
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "vfmig/stream.h"

static const char *const names[VFMIG_REC__COUNT] = {
    "INVALID", "HELLO", "HELLO_ACK", "CHANNEL", "PAGES", "ITER", "DEVICE",
    "VCPU", "EOS", "RESUMED", "ERROR", "PAGE_HASHES", "GUEST", "READY", "GO",
    "AUTH_INIT", "AUTH_CHALLENGE", "AUTH_RESPONSE", "DEVICE_DATA", "APPLIED",
};

const char *vfmig_rec_name(uint32_t type) { return type < VFMIG_REC__COUNT ? names[type] : "UNKNOWN"; }

/* Header fields, and the CRC over the header (crc = 0) and the first payload piece. */
static uint32_t seal_start(struct vfmig_rec_hdr *h, uint16_t type, const void *p1, uint32_t l1, uint32_t l2)
{
    h->magic = VFMIG_REC_MAGIC;
    h->type = type;
    h->flags = 0;
    h->len = l1 + l2;
    h->crc = 0;
    uint32_t c = vfmig_crc32c(0, h, sizeof(*h));
    return l1 ? vfmig_crc32c(c, p1, l1) : c;
}

void vfmig_rec_seal(struct vfmig_rec_hdr *h, uint16_t type, const void *p1, uint32_t l1, const void *p2,
                    uint32_t l2)
{
    uint32_t c = seal_start(h, type, p1, l1, l2);
    h->crc = l2 ? vfmig_crc32c(c, p2, l2) : c;
}

void vfmig_rec_seal_copy(struct vfmig_rec_hdr *h, uint16_t type, const void *p1, uint32_t l1, void *dst,
                         const void *src, uint32_t l2)
{
    uint32_t c = seal_start(h, type, p1, l1, l2);
    h->crc = vfmig_crc32c_copy(c, dst, src, l2);
}

int vfmig_rec_check_hdr(const struct vfmig_rec_hdr *h, uint32_t max_len, struct vfmig_err *err)
{
    if (h->magic != VFMIG_REC_MAGIC)
        return vfmig_fail(err, EPROTO, "bad record magic 0x%08x (corrupt or not a vfmig stream)", h->magic);
    if (h->type == VFMIG_REC_INVALID || h->type >= VFMIG_REC__COUNT)
        return vfmig_fail(err, EPROTO, "unknown record type %u", h->type);
    if (h->flags)
        return vfmig_fail(err, EPROTO, "%s record has unknown flags 0x%x", vfmig_rec_name(h->type), h->flags);
    if (h->len > max_len)
        return vfmig_fail(err, EMSGSIZE, "%s record of %u bytes exceeds the limit of %u", vfmig_rec_name(h->type),
                          h->len, max_len);
    return 0;
}

int vfmig_rec_check_crc(const struct vfmig_rec_hdr *h, const void *payload, struct vfmig_err *err)
{
    struct vfmig_rec_hdr z = *h;
    z.crc = 0;
    uint32_t c = vfmig_crc32c(vfmig_crc32c(0, &z, sizeof(z)), payload, h->len);
    if (c != h->crc)
        return vfmig_fail(err, EBADMSG, "%s record: CRC mismatch (stream corrupted in transit)",
                          vfmig_rec_name(h->type));
    return 0;
}

int vfmig_write_all(int fd, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    while (len) {
        ssize_t w = send(fd, p, len, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return -errno;
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

int vfmig_writev_all(int fd, struct iovec *iov, int iovcnt)
{
    while (iovcnt > 0) {
        struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)iovcnt};
        ssize_t w = sendmsg(fd, &m, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return -errno;
        while (iovcnt > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            iovcnt--;
        }
        if (iovcnt > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

int vfmig_read_all(int fd, void *buf, size_t len)
{
    uint8_t *p = buf;
    while (len) {
        ssize_t r = recv(fd, p, len, MSG_WAITALL);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return errno == EAGAIN ? -ETIMEDOUT : -errno;
        if (r == 0)
            return -ECONNRESET;
        p += r;
        len -= (size_t)r;
    }
    return 0;
}
