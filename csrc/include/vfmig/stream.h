/* The vfmig migration stream: framed records, little-endian, each with a CRC32C.
 * docs/stream-format.md is the specification; this header is its C form. */
#ifndef VFMIG_STREAM_H
#define VFMIG_STREAM_H
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "vfmig/util.h"

#define VFMIG_REC_MAGIC 0x524D4656u       /* "VFMR" */
#define VFMIG_STREAM_MAGIC "VFMIGSTR"
#define VFMIG_STREAM_VERSION 2u          /* 2: DELTA and ZSTD page encodings */
#define VFMIG_RUN_MAX_PAGES 256u          /* pages in one PAGES record: 1 MiB */
#define VFMIG_CTRL_MAX (1u << 20)         /* control records; PAGE_HASHES is bounded by RAM size */
#define VFMIG_TOKEN_LEN 16

enum vfmig_rec_type {
    VFMIG_REC_INVALID = 0,
    VFMIG_REC_HELLO = 1,       /* control, src->dst: stream header and VM config */
    VFMIG_REC_HELLO_ACK = 2,   /* control, dst->src: ready (or ERROR instead) */
    VFMIG_REC_CHANNEL = 3,     /* page channel opener: session token and channel index */
    VFMIG_REC_PAGES = 4,       /* page channel: a run of pages */
    VFMIG_REC_ITER = 5,        /* page channel: end of a precopy iteration */
    VFMIG_REC_DEVICE = 6,      /* control: one device's state */
    VFMIG_REC_VCPU = 7,        /* control: one vCPU's state */
    VFMIG_REC_EOS = 8,         /* any channel: end of stream, with the channel's digest */
    VFMIG_REC_RESUMED = 9,     /* control, dst->src: guest running (JSON with checkpoints) */
    VFMIG_REC_ERROR = 10,      /* control, either way: why the peer gave up (UTF-8) */
    VFMIG_REC_PAGE_HASHES = 11,/* control, dst->src: CRC32C of every page as loaded (--verify) */
    VFMIG_REC_GUEST = 12,      /* control, dst->src: what the guest saw (JSON) */
    VFMIG_REC_READY = 13,      /* control, dst->src: everything loaded and checked; waiting for GO */
    VFMIG_REC_GO = 14,         /* control, src->dst: the commit point; the source never resumes after */
    VFMIG_REC_AUTH_INIT = 15,  /* control, src->dst, first record: auth mode and the source's nonce */
    VFMIG_REC_AUTH_CHALLENGE = 16, /* control, dst->src: the destination's nonce and proof */
    VFMIG_REC_AUTH_RESPONSE = 17,  /* control, src->dst: the source's proof; HELLO follows */
    VFMIG_REC_DEVICE_DATA = 18,    /* control, src->dst: a chunk of a device's migration data stream */
    VFMIG_REC_APPLIED = 19,        /* page channel, dst->src: every record up to ITER n is in RAM */
    VFMIG_REC__COUNT
};

/* A PAGES record's encoding: RAW, ZERO or DELTA, with the ZSTD bit when its payload (after the
 * run header) is one zstd frame of what it would otherwise be. ZERO carries no payload. */
enum vfmig_encoding { VFMIG_ENC_RAW = 1, VFMIG_ENC_ZERO = 2, VFMIG_ENC_DELTA = 3 };
#define VFMIG_ENC_ZSTD 0x80u
#define VFMIG_ZSTD_LEVEL_MAX 19

struct vfmig_rec_hdr {
    uint32_t magic;
    uint16_t type;
    uint16_t flags;  /* none defined: must be 0 */
    uint32_t len;    /* payload bytes after this header */
    uint32_t crc;    /* CRC32C of this header (crc = 0) followed by the payload */
};

struct vfmig_hello {
    char magic[8];   /* VFMIG_STREAM_MAGIC */
    uint16_t version;
    uint16_t channels;
    uint32_t page_size;
    uint64_t mem_bytes;
    uint32_t vcpus;
    uint32_t flags;  /* VFMIG_HELLO_VERIFY */
    uint8_t token[VFMIG_TOKEN_LEN];
    uint32_t config_len; /* JSON VM config follows */
    uint32_t reserved;
};
#define VFMIG_HELLO_VERIFY 1u
#define VFMIG_CONFIG_MAX 16384u

struct vfmig_channel_hello {
    uint8_t token[VFMIG_TOKEN_LEN];
    uint16_t index;
    uint16_t version;
    uint32_t reserved;
};

struct vfmig_pages_hdr {
    uint64_t gpa;
    uint32_t count;
    uint8_t encoding;
    uint8_t reserved[3];
};

struct vfmig_iter {
    uint32_t iteration;
    uint32_t reserved;
    uint64_t dirty_pages;
};

struct vfmig_eos {
    uint64_t records;   /* records on this channel before EOS */
    uint64_t bytes;     /* their payload bytes */
    uint32_t chain;     /* CRC32C over the CRCs of those records, in order */
    uint32_t reserved;
};

/* Per-channel running digest, updated by both ends for every record before EOS. */
struct vfmig_digest {
    uint64_t records, bytes;
    uint32_t chain;
};

static inline void vfmig_digest_add(struct vfmig_digest *d, const struct vfmig_rec_hdr *h);

/* Fill h (magic, type, len) and compute its CRC over h and the payload pieces. */
void vfmig_rec_seal(struct vfmig_rec_hdr *h, uint16_t type, const void *p1, uint32_t l1, const void *p2,
                    uint32_t l2);

/* The same, with the second piece copied from src to dst in the CRC's pass: the record's bytes
 * are then exactly the ones it was sealed over, even if src changes meanwhile. */
void vfmig_rec_seal_copy(struct vfmig_rec_hdr *h, uint16_t type, const void *p1, uint32_t l1, void *dst,
                         const void *src, uint32_t l2);

/* Validate a received header before reading its payload: magic, type, flags, and len against
 * max_len. Returns 0 or -EPROTO/-EMSGSIZE with err filled. */
int vfmig_rec_check_hdr(const struct vfmig_rec_hdr *h, uint32_t max_len, struct vfmig_err *err);

/* Whole-record CRC check once the payload is in. 0 or -EBADMSG. */
int vfmig_rec_check_crc(const struct vfmig_rec_hdr *h, const void *payload, struct vfmig_err *err);

const char *vfmig_rec_name(uint32_t type);

/* Full-buffer socket I/O. Return 0, -errno, or -EPIPE/-ECONNRESET for a closed peer. */
int vfmig_write_all(int fd, const void *buf, size_t len);
int vfmig_writev_all(int fd, struct iovec *iov, int iovcnt);
int vfmig_read_all(int fd, void *buf, size_t len); /* -ECONNRESET on EOF */

#include "vfmig/crc32c.h"
static inline void vfmig_digest_add(struct vfmig_digest *d, const struct vfmig_rec_hdr *h)
{
    d->records++;
    d->bytes += h->len;
    d->chain = vfmig_crc32c(d->chain, &h->crc, sizeof(h->crc));
}
#endif
