/* DirtyTracker over KVM's per-vCPU dirty rings, harvested continuously by its own thread.
 *
 * This machine's KVM emulator overruns a full ring instead of stopping the vCPU at the soft
 * limit: entries are overwritten and pages lost (docs/host-facts.md). So:
 * the ring is sized far above what the guest dirties between harvests, the harvester runs
 * every HARVEST_US, and any sign of an overrun (a harvest near the ring size, or a ring-full
 * exit with nothing to harvest) marks all RAM dirty for the round. After an overrun this KVM
 * also goes on writing at a place other than where the walk reads next, so the vCPU's ring is
 * swept whole (every DIRTY entry, wherever it is) until the two agree again, and every sync()
 * sweeps all rings: a round never ends with an entry left behind. No page is lost silently. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

#include "vfmig/dirty.h"

#define HARVEST_US 500
#define OVERRUN_SLACK 128 /* a harvest this close to the ring size may have wrapped */

struct ring_priv {
    pthread_mutex_t lock;      /* serialises harvests: the thread's and sync()'s */
    pthread_t thread;
    int thread_live;
    _Atomic int stop;
    uint32_t idx[VFMIG_MAX_VCPUS];
    uint8_t resync[VFMIG_MAX_VCPUS]; /* overran: sweep this ring whole until KVM writes at idx */
    uint64_t *pages;           /* scratch: page indices of one harvest */
};

static uint64_t gfn_to_page(const struct vfmig_vm *vm, uint32_t slot, uint64_t offset)
{
    for (uint32_t i = 0; i < vm->nslots; i++)
        if (vm->slots[i].id == (slot & 0xffff) && offset < vm->slots[i].size / VFMIG_PAGE_SIZE)
            return vm->slots[i].first_page + offset;
    return UINT64_MAX;
}

/* One entry into pages[*n] (unless it names no RAM: returns 0) and handed back to KVM. */
static int take_entry(const struct vfmig_vm *vm, struct kvm_dirty_gfn *e, uint64_t *pages, uint64_t *n)
{
    uint64_t page = gfn_to_page(vm, e->slot, e->offset);
    if (page != UINT64_MAX)
        pages[(*n)++] = page;
    __atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
    return page != UINT64_MAX;
}

static int is_dirty(struct kvm_dirty_gfn *e)
{
    return (__atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) & KVM_DIRTY_GFN_F_DIRTY) != 0;
}

void vfmig_dirty_ring_take(const struct vfmig_vm *vm, struct kvm_dirty_gfn *ring, uint32_t nent, uint32_t *idx,
                           int sweep, uint64_t *pages, uint64_t *n, struct vfmig_ring_take *out)
{
    *out = (struct vfmig_ring_take){0};
    while (out->walked < nent && is_dirty(&ring[*idx % nent])) {
        out->garbage += !take_entry(vm, &ring[*idx % nent], pages, n);
        (*idx)++;
        out->walked++;
    }
    if (!sweep)
        return;
    /* The rest of the ring, in order from where the walk stopped (not DIRTY, so a run of
     * entries KVM wrote elsewhere cannot straddle it): KVM writes next after the last one. */
    uint32_t from = *idx % nent, last = 0;
    /* At most nent in all: KVM may refill walked slots while we sweep, and pages has room for one ring. */
    for (uint32_t k = 1; k < nent && out->walked + out->strays < nent; k++) {
        struct kvm_dirty_gfn *e = &ring[(from + k) % nent];
        if (!is_dirty(e))
            continue;
        out->garbage += !take_entry(vm, e, pages, n);
        out->strays++;
        last = k;
    }
    if (out->strays)
        *idx += last + 1;
}

/* Harvest every vCPU's ring once; sweep: every ring whole, not only those that overran.
 * Caller holds p->lock. */
static int harvest(struct vfmig_tracker *t, int sweep)
{
    struct ring_priv *p = t->priv;
    struct vfmig_vm *vm = t->vm;
    uint32_t nent = vm->ring_entries;
    uint64_t n = 0;
    int overrun = 0;
    for (uint32_t c = 0; c < vm->nvcpus; c++) {
        struct vfmig_ring_take got;
        vfmig_dirty_ring_take(vm, vm->vcpus[c].ring, nent, &p->idx[c], sweep || p->resync[c], p->pages, &n, &got);
        uint32_t taken = got.walked + got.strays;
        int was_full = atomic_exchange(&vm->vcpus[c].ring_full, 0); /* set by vcpu.c on a ring-full exit */
        if (got.garbage || taken + OVERRUN_SLACK >= nent || (was_full && taken == 0)) {
            overrun = 1; /* garbage: trust nothing this round */
            p->resync[c] = 1;
        } else if (got.walked && !got.strays) {
            p->resync[c] = 0; /* KVM wrote where the walk reads: in step again */
        }
    }
    if (n && ioctl(vm->vm_fd, KVM_RESET_DIRTY_RINGS, 0) < 0)
        return vfmig_fail(&t->err, errno, "KVM_RESET_DIRTY_RINGS: %s", strerror(errno));
    /* Only now, with the pages write-protected again, do they enter the set. */
    for (uint64_t i = 0; i < n; i++)
        vfmig_dirty_set_mark(&t->set, p->pages[i]);
    atomic_fetch_add(&t->harvested, n);
    if (overrun) {
        atomic_fetch_add(&t->overruns, 1);
        atomic_store(&t->set.all, 1);
    }
    return 0;
}

static void *harvester(void *arg)
{
    struct vfmig_tracker *t = arg;
    struct ring_priv *p = t->priv;
    struct timespec ts = {0, HARVEST_US * 1000L};
    pthread_setname_np(pthread_self(), "vfmig-harvest"); /* for perf and the BPF probes' thread filters */
    while (!atomic_load(&p->stop)) {
        pthread_mutex_lock(&p->lock);
        int r = harvest(t, 0);
        pthread_mutex_unlock(&p->lock);
        if (r < 0)
            atomic_store(&t->set.all, 1); /* sync() reports the error */
        nanosleep(&ts, NULL);
    }
    return NULL;
}

static int ring_start(struct vfmig_tracker *t)
{
    struct vfmig_vm *vm = t->vm;
    struct ring_priv *p = calloc(1, sizeof(*p));
    if (!p)
        return vfmig_fail(&t->err, ENOMEM, "out of memory");
    t->priv = p;
    pthread_mutex_init(&p->lock, NULL);
    p->pages = calloc((size_t)vm->ring_entries * vm->nvcpus, sizeof(uint64_t));
    if (!p->pages)
        return vfmig_fail(&t->err, ENOMEM, "out of memory");
    /* Entries left from an earlier tracking session are stale: skip them. */
    pthread_mutex_lock(&p->lock);
    harvest(t, 1);
    pthread_mutex_unlock(&p->lock);
    int r = vfmig_vm_set_dirty_logging(vm, 1);
    if (r < 0)
        return vfmig_fail(&t->err, -r, "%s", vm->err.msg);
    if (pthread_create(&p->thread, NULL, harvester, t) != 0)
        return vfmig_fail(&t->err, EAGAIN, "cannot start the dirty-ring harvester");
    p->thread_live = 1;
    return 0;
}

static int ring_sync(struct vfmig_tracker *t)
{
    struct ring_priv *p = t->priv;
    pthread_mutex_lock(&p->lock);
    int r = harvest(t, 1);
    pthread_mutex_unlock(&p->lock);
    return r;
}

static void ring_stop(struct vfmig_tracker *t)
{
    struct ring_priv *p = t->priv;
    if (!p)
        return;
    atomic_store(&p->stop, 1);
    if (p->thread_live)
        pthread_join(p->thread, NULL);
    vfmig_vm_set_dirty_logging(t->vm, 0);
    pthread_mutex_lock(&p->lock);
    harvest(t, 1); /* leave the rings empty for a later session */
    pthread_mutex_unlock(&p->lock);
    pthread_mutex_destroy(&p->lock);
    free(p->pages);
    free(p);
    t->priv = NULL;
}

const struct vfmig_tracker_ops vfmig_tracker_ring = {
    .name = "ring", .start = ring_start, .sync = ring_sync, .stop = ring_stop,
};
