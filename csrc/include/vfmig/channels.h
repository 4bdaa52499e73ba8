/* Page channels: the sender splits the dirty set over N TCP channels in 2 MiB stripes (a page
 * always travels on the same channel, so TCP keeps its versions in order without barriers);
 * the receiver decodes each channel straight into destination RAM. */
#ifndef VFMIG_CHANNELS_H
#define VFMIG_CHANNELS_H
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "vfmig/delta.h"
#include "vfmig/pace.h"
#include "vfmig/stream.h"
#include "vfmig/vm.h"

#define VFMIG_MAX_CHANNELS 16
#define VFMIG_STRIPE_PAGES 512u

/* One round's counters. pages = raw + zero + delta; zstd_pages were in compressed records.
 * bytes_in: what the non-zero pages were before encoding (4 KiB each); bytes: on the wire. A
 * cache lookup is a re-sent non-zero page while delta pages are on; a hit found its last copy;
 * a fallback is a hit whose delta was not smaller than the page (sent raw). */
struct vfmig_round_stats {
    uint64_t pages, zero_pages, raw_pages, delta_pages, zstd_pages;
    uint64_t bytes_in, bytes, records, ns;
    uint64_t cache_lookups, cache_hits, delta_fallbacks;
    uint64_t delta_bytes; /* of `bytes`, those of DELTA records (headers included) */
};

struct vfmig_chan_tx {
    int fd;
    struct vfmig_digest digest;
    uint8_t *staging;           /* record header + run header + up to 256 pages */
    uint8_t *dbuf;              /* the DELTA run being built, then its encoded page scratch */
    uint8_t *zbuf;              /* a compressed payload (--compress) */
    void *zctx;                 /* ZSTD_CCtx, NULL without compression */
    struct vfmig_delta_cache cache;
    struct vfmig_round_stats st;
    uint32_t applied;           /* the last round the destination said it applied (APPLIED) */
    int rc;
    struct vfmig_err err;
};

struct vfmig_sender {
    struct vfmig_vm *vm;
    uint32_t nchan;
    struct vfmig_chan_tx ch[VFMIG_MAX_CHANNELS];
    _Atomic uint64_t bandwidth; /* bytes/s over all channels, 0 = unlimited */
    struct vfmig_pacer pacer;   /* the link's pace, all channels together */
    _Atomic int cancel;
    const uint64_t *bits;       /* the round being sent */
    int zero_copy;
    uint64_t *sent;             /* pages sent at least once: a re-dirtied one may go as a delta */
    _Atomic int delta;          /* delta pages on (vfmig_sender_set_delta; read each round) */
    uint32_t round;             /* rounds sent, for the delta cache's slot stamps */
    int zstd_level;             /* 0: no compression */
    struct vfmig_err err;
};

/* Sender over connected sockets (already past the CHANNEL handshake). 0 or -errno. */
int vfmig_sender_init(struct vfmig_sender *s, struct vfmig_vm *vm, const int *fds, uint32_t nchan,
                      struct vfmig_err *err);
void vfmig_sender_free(struct vfmig_sender *s);
/* Delta pages with a cache of cache_pages pages split over the channels (0: off and freed).
 * Between rounds, caller's thread. 0, -EINVAL or -ENOMEM (s->err; delta pages then stay off). */
int vfmig_sender_set_delta(struct vfmig_sender *s, uint64_t cache_pages);
/* zstd at level 1..VFMIG_ZSTD_LEVEL_MAX on every channel (0: off). Between rounds, caller's
 * thread. 0, -EINVAL or -ENOMEM (s->err). */
int vfmig_sender_set_compress(struct vfmig_sender *s, int level);
/* Of the pages whose bit is set, those the delta cache holds an earlier copy of: the next
 * round can send them as deltas, the rest go whole. Between rounds, caller's thread; 0 when
 * delta pages are off. */
uint64_t vfmig_sender_cached(const struct vfmig_sender *s, const uint64_t *bits);
/* Send every page whose bit is set, one thread per channel. zero_copy sends straight from
 * guest RAM (only when vCPUs are stopped; live pages are copied first so each record's CRC
 * matches its bytes). Blocks the caller, no lock held. 0 or -errno (s->err). */
int vfmig_send_round(struct vfmig_sender *s, const uint64_t *bits, int zero_copy, struct vfmig_round_stats *out);
/* Wait until every channel's destination end says it applied round `iteration` (APPLIED
 * records, read in sequence). Between rounds, caller's thread; vfmig_sender cancel ends it within
 * 50 ms. 0, or -ETIMEDOUT after timeout_ms, -ECANCELED, -EPROTO on a bad record, -errno (s->err). */
int vfmig_sender_wait_applied(struct vfmig_sender *s, uint32_t iteration, int timeout_ms);
/* ITER or EOS on every channel. 0 or -errno. */
int vfmig_send_marker(struct vfmig_sender *s, uint32_t iteration, uint64_t dirty);
int vfmig_send_eos(struct vfmig_sender *s);

struct vfmig_receiver;

struct vfmig_chan_rx {
    int fd;
    struct vfmig_receiver *owner;
    pthread_t thread;
    int thread_live;
    struct vfmig_digest digest;
    uint64_t pages, zero_pages, delta_pages, zstd_records, bytes, records, iterations;
    uint8_t *buf, *zbuf;        /* an encoded payload, and its decompressed form */
    void *zctx;                 /* ZSTD_DCtx, made on the first compressed record */
    int done, rc;
    struct vfmig_err err;
    const uint8_t *mem;         /* vfmig_receiver_decode_mem: records come from here, not fd */
    size_t mem_len, mem_off;
};

struct vfmig_receiver {
    struct vfmig_vm *vm;
    uint32_t nchan;
    struct vfmig_chan_rx ch[VFMIG_MAX_CHANNELS];
    _Atomic uint64_t *written;  /* pages that hold data (a ZERO record must clear them) */
    _Atomic uint64_t *populated; /* stripes already populated */
    _Atomic int cancel;
    _Atomic int first_failed;   /* the channel that failed first (-1: none): the root cause */
    struct vfmig_err err;
};

/* fds NULL: no sockets, for vfmig_receiver_decode_mem only. Caller's thread. 0 or -errno. */
int vfmig_receiver_init(struct vfmig_receiver *r, struct vfmig_vm *vm, const int *fds, uint32_t nchan,
                        struct vfmig_err *err);
void vfmig_receiver_free(struct vfmig_receiver *r);
/* Start one decoding thread per channel; each runs to its EOS. 0 or -errno. */
int vfmig_receiver_start(struct vfmig_receiver *r);
/* Wait for every channel thread. Cancel (and shutting the sockets) makes them stop early.
 * Returns 0, or the root-cause channel's -errno with r->err naming the channel. */
int vfmig_receiver_join(struct vfmig_receiver *r);
/* start + join. */
int vfmig_receiver_run(struct vfmig_receiver *r);
/* Decode channel c's records from buf as if they arrived on its socket, to its EOS or first
 * error, in the caller's thread (fuzzing, tests): the end of buf reads as a closed peer. Not
 * while the channel threads run. 0, or -errno with r->err (and r->ch[c].err) set. */
int vfmig_receiver_decode_mem(struct vfmig_receiver *r, uint32_t c, const uint8_t *buf, size_t len);

/* CRC32C of every RAM page into out[npages] (verification, outside the downtime). */
void vfmig_ram_page_crcs(const struct vfmig_vm *vm, uint32_t *out);
/* Any thread, lock-free. */
uint32_t vfmig_zero_page_crc(void);
#endif
