/* The link's pace (pace.h). A mutex, not atomics: the start time, the byte count and the
 * bandwidth change together when the count restarts or drops idle credit, and a channel takes
 * it once a record (up to 1 MiB), which costs nothing next to the send. */
#include "vfmig/pace.h"

void vfmig_pacer_init(struct vfmig_pacer *p)
{
    pthread_mutex_init(&p->lock, NULL);
    p->t0 = p->bytes = p->bw = 0;
}

void vfmig_pacer_destroy(struct vfmig_pacer *p) { pthread_mutex_destroy(&p->lock); }

void vfmig_pacer_restart(struct vfmig_pacer *p, uint64_t now, uint64_t bw)
{
    pthread_mutex_lock(&p->lock);
    p->t0 = now;
    p->bytes = 0;
    p->bw = bw;
    pthread_mutex_unlock(&p->lock);
}

uint64_t vfmig_pacer_due(struct vfmig_pacer *p, uint64_t bytes, uint64_t bw, uint64_t now)
{
    if (!bw)
        return 0;
    pthread_mutex_lock(&p->lock);
    if (bw != p->bw) { /* what went before was paced at the old rate */
        p->bw = bw;
        p->t0 = now;
        p->bytes = 0;
    }
    /* Idle credit beyond the burst is forgotten before these bytes are counted. */
    uint64_t carried = p->t0 + (uint64_t)((double)p->bytes * 1e9 / (double)bw);
    if (carried + VFMIG_PACE_BURST_NS < now)
        p->t0 += now - VFMIG_PACE_BURST_NS - carried;
    p->bytes += bytes;
    uint64_t due = p->t0 + (uint64_t)((double)p->bytes * 1e9 / (double)bw);
    pthread_mutex_unlock(&p->lock);
    return due;
}
