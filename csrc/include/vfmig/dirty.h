/* Dirty tracking: one dirty set (a bitmap over RAM page indices) fed by one DirtyTracker
 * implementation (KVM bitmap or KVM ring) plus every device's DMA log. */
#ifndef VFMIG_DIRTY_H
#define VFMIG_DIRTY_H
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "vfmig/vm.h"

struct vfmig_dirty_set {
    uint64_t npages;
    _Atomic uint64_t *bits;
    _Atomic int all;   /* every page is dirty (first round, or a tracker lost track) */
};

int vfmig_dirty_set_init(struct vfmig_dirty_set *s, uint64_t npages);
void vfmig_dirty_set_free(struct vfmig_dirty_set *s);
/* Lock-free, any thread. */
static inline void vfmig_dirty_set_mark(struct vfmig_dirty_set *s, uint64_t page)
{
    atomic_fetch_or_explicit(&s->bits[page / 64], 1ull << (page % 64), memory_order_relaxed);
}
void vfmig_dirty_set_or(struct vfmig_dirty_set *s, const uint64_t *bits, uint64_t first_page, uint64_t npages);
/* Move the set into out (npages bits) and empty it; with accumulate, OR into what out already
 * holds (pages collected but not yet sent). Returns the number of pages set in out. */
uint64_t vfmig_dirty_set_take(struct vfmig_dirty_set *s, uint64_t *out, int accumulate);

struct vfmig_tracker;

struct vfmig_tracker_ops {
    const char *name;
    /* Turn logging on. vCPUs may be running. 0 or -errno (t->err). */
    int (*start)(struct vfmig_tracker *t);
    /* Move what KVM logged into t->set. Every page put in the set has been write-protected
     * again before it is put there, so a later write is logged anew. Caller's thread; takes no
     * lock a vCPU needs. 0 or -errno (t->err). */
    int (*sync)(struct vfmig_tracker *t);
    /* Turn logging off and release everything. Idempotent. */
    void (*stop)(struct vfmig_tracker *t);
};

struct vfmig_tracker {
    const struct vfmig_tracker_ops *ops;
    struct vfmig_vm *vm;
    struct vfmig_dirty_set set;
    _Atomic uint64_t harvested;      /* entries/bits taken from KVM */
    _Atomic uint64_t overruns;       /* rounds that fell back to "all dirty" */
    uint64_t syncs;
    uint64_t *scratch;               /* device logs land here before entering the set */
    void *priv;
    struct vfmig_err err;
};

/* What one vCPU's dirty ring gave: entries from the walk's index on, entries found elsewhere by
 * a sweep (this KVM writes out of step after it overran the ring), entries naming no RAM. */
struct vfmig_ring_take {
    uint32_t walked, strays, garbage;
};
/* Take one ring's DIRTY entries, at most nent, into pages[*n...] (*n advances) and mark them RESET:
 * those from *idx on in ring order and, with sweep, every other DIRTY entry too, after which *idx
 * points past the last of them. The caller still owes KVM_RESET_DIRTY_RINGS. One harvesting
 * thread at a time (the tracker's lock). */
void vfmig_dirty_ring_take(const struct vfmig_vm *vm, struct kvm_dirty_gfn *ring, uint32_t nent, uint32_t *idx,
                           int sweep, uint64_t *pages, uint64_t *n, struct vfmig_ring_take *out);

extern const struct vfmig_tracker_ops vfmig_tracker_bitmap;
extern const struct vfmig_tracker_ops vfmig_tracker_ring;

/* Open the tracker the VM was built for (ring if it has a dirty ring, else bitmap), start it
 * and mark all RAM dirty for the first round. 0 or -errno (err). */
int vfmig_tracker_open(struct vfmig_vm *vm, struct vfmig_tracker **out, struct vfmig_err *err);
/* Sync the tracker, OR in every device's DMA log, and move the set into out (OR into it with
 * accumulate). Returns the page count in out, or -errno (t->err). Caller's thread. */
int64_t vfmig_tracker_collect(struct vfmig_tracker *t, uint64_t *out, int accumulate);
void vfmig_tracker_close(struct vfmig_tracker *t);

#endif
