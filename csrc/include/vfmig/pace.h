/* The link's pace, shared by every page channel: each channel adds what it wrote and sleeps
 * until a link of --bandwidth would have carried the total. Two things a plain "bytes since
 * the round began" count gets wrong are bounded here: time the link sat idle (a stretch of
 * zero pages, a slow bitmap scan) earns at most VFMIG_PACE_BURST_NS of credit, so a long idle
 * stretch cannot buy a burst at line rate; and a bandwidth change starts the count afresh, so
 * bytes sent under the old rate are not charged at the new one. */
#ifndef VFMIG_PACE_H
#define VFMIG_PACE_H
#include <pthread.h>
#include <stdint.h>

#define VFMIG_PACE_BURST_NS 20000000ull /* 20 ms: 2.5 MB at 1 Gbit/s */

struct vfmig_pacer {
    pthread_mutex_t lock;
    uint64_t t0;    /* when the count began (ns) */
    uint64_t bytes; /* written since t0, all channels together */
    uint64_t bw;    /* the bandwidth the count is at (bytes/s) */
};

void vfmig_pacer_init(struct vfmig_pacer *p);
void vfmig_pacer_destroy(struct vfmig_pacer *p);
/* Start the count at `now` (a new round) under `bw` bytes/s. Any thread; takes p->lock. */
void vfmig_pacer_restart(struct vfmig_pacer *p, uint64_t now, uint64_t bw);
/* Add `bytes` written at `now` under `bw` bytes/s (0: unlimited) and return the time by which
 * the link will have carried everything counted (<= now: no wait). Any thread; takes p->lock
 * for a few instructions, never sleeps. */
uint64_t vfmig_pacer_due(struct vfmig_pacer *p, uint64_t bytes, uint64_t bw, uint64_t now);
#endif
