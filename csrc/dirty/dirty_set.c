/* The dirty set, and the tracker front door that feeds it. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "vfmig/dirty.h"
#include "vfmig/dma_log.h"

int vfmig_dirty_set_init(struct vfmig_dirty_set *s, uint64_t npages)
{
    s->npages = npages;
    s->bits = calloc((npages + 63) / 64, sizeof(uint64_t));
    atomic_store(&s->all, 0);
    return s->bits ? 0 : -ENOMEM;
}

void vfmig_dirty_set_free(struct vfmig_dirty_set *s)
{
    free((void *)s->bits);
    s->bits = NULL;
}

void vfmig_dirty_set_or(struct vfmig_dirty_set *s, const uint64_t *bits, uint64_t first_page, uint64_t npages)
{
    if (first_page % 64 == 0) {
        for (uint64_t w = 0; w < (npages + 63) / 64; w++)
            if (bits[w])
                atomic_fetch_or_explicit(&s->bits[first_page / 64 + w], bits[w], memory_order_relaxed);
        return;
    }
    for (uint64_t i = 0; i < npages; i++)
        if (bits[i / 64] & (1ull << (i % 64)))
            vfmig_dirty_set_mark(s, first_page + i);
}

uint64_t vfmig_dirty_set_take(struct vfmig_dirty_set *s, uint64_t *out, int accumulate)
{
    uint64_t words = (s->npages + 63) / 64, n = 0;
    int all = atomic_exchange(&s->all, 0);
    uint64_t tail = s->npages % 64 ? (1ull << (s->npages % 64)) - 1 : ~0ull;
    for (uint64_t w = 0; w < words; w++) {
        uint64_t v = atomic_exchange_explicit(&s->bits[w], 0, memory_order_acq_rel);
        out[w] = all ? ~0ull : (accumulate ? out[w] | v : v);
        if (w == words - 1)
            out[w] &= tail;
        n += (uint64_t)__builtin_popcountll(out[w]);
    }
    return n;
}

/* Stops the DMA logs of the first `started` devices and frees t. */
static void tracker_free(struct vfmig_tracker *t, uint32_t started)
{
    if (!t)
        return;
    for (uint32_t i = 0; t->vm && i < started && i < t->vm->ndevices; i++)
        if (t->vm->devices[i]->dma_log)
            vfmig_dma_log_stop(t->vm->devices[i]->dma_log);
    if (t->ops)
        t->ops->stop(t);
    vfmig_dirty_set_free(&t->set);
    free(t->scratch);
    free(t);
}

int vfmig_tracker_open(struct vfmig_vm *vm, struct vfmig_tracker **out, struct vfmig_err *err)
{
    struct vfmig_tracker *t = calloc(1, sizeof(*t));
    if (!t || vfmig_dirty_set_init(&t->set, vm->npages) < 0) {
        free(t);
        return vfmig_fail(err, ENOMEM, "out of memory for the dirty set");
    }
    t->vm = vm;
    t->scratch = calloc((vm->npages + 63) / 64, sizeof(uint64_t));
    if (!t->scratch) {
        tracker_free(t, 0);
        return vfmig_fail(err, ENOMEM, "out of memory for the dirty set");
    }
    t->ops = vm->ring_entries ? &vfmig_tracker_ring : &vfmig_tracker_bitmap;
    int r = t->ops->start(t);
    if (r < 0) {
        vfmig_fail(err, -r, "%s", t->err.msg);
        tracker_free(t, 0);
        return r;
    }
    /* Device DMA is logged from here on; what it wrote before, the first round covers. */
    for (uint32_t i = 0; i < vm->ndevices; i++) {
        struct vfmig_device *d = vm->devices[i];
        if (d->dma_log && (r = vfmig_dma_log_start_all(d->dma_log, &t->err)) < 0) {
            vfmig_fail(err, -r, "device %s: %s", d->name, t->err.msg);
            tracker_free(t, i);
            return r;
        }
    }
    atomic_store(&t->set.all, 1); /* the first round sends everything */
    *out = t;
    return 0;
}

int64_t vfmig_tracker_collect(struct vfmig_tracker *t, uint64_t *out, int accumulate)
{
    int r = t->ops->sync(t);
    if (r < 0)
        return r;
    t->syncs++;
    /* Device logs go through scratch, then atomically into the set: a ring harvester may be
     * OR-ing into the set at the same time. */
    struct vfmig_vm *vm = t->vm;
    uint64_t words = (vm->npages + 63) / 64;
    for (uint32_t i = 0; i < vm->ndevices; i++) {
        struct vfmig_device *d = vm->devices[i];
        if (!d->dma_log)
            continue;
        memset(t->scratch, 0, words * 8);
        struct vfmig_err why;
        r = vfmig_dma_log_drain_all(d->dma_log, t->scratch, &why);
        if (r < 0)
            return vfmig_fail(&t->err, -r, "device %s: %s", d->name, why.msg);
        vfmig_dirty_set_or(&t->set, t->scratch, 0, vm->npages);
    }
    return (int64_t)vfmig_dirty_set_take(&t->set, out, accumulate);
}

void vfmig_tracker_close(struct vfmig_tracker *t)
{
    tracker_free(t, t ? t->vm->ndevices : 0);
}
