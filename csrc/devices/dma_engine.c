/* DMA engine with a dirty log: the device side of dirty tracking. */
#include <errno.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "vfmig/devices.h"
#include "vfmig/vm.h"

struct dma_engine {
    struct vfmig_device dev;
    struct vfmig_vm *vm;
    char name[32];
    _Atomic uint64_t *log; /* one bit per RAM page written since the last drain */
    _Atomic int stopped;   /* the VM is stopped: no DMA */
    _Atomic int inflight;  /* DMA writes in progress */
};

int vfmig_dma_fill(struct vfmig_device *d, uint64_t gpa, uint8_t value, uint64_t len)
{
    struct dma_engine *e = d->opaque;
    uint8_t *host = vfmig_vm_host(e->vm, gpa, len);
    if (!host || len == 0)
        return -EFAULT;
    atomic_fetch_add(&e->inflight, 1);
    if (atomic_load(&e->stopped)) {
        atomic_fetch_sub(&e->inflight, 1);
        return -EBUSY;
    }
    memset(host, value, len);
    /* Log after the data lands: a drain in between just sends the page one round later. */
    int64_t first = vfmig_vm_gpa_to_page(e->vm, gpa), last = vfmig_vm_gpa_to_page(e->vm, gpa + len - 1);
    for (int64_t p = first; p <= last; p++)
        atomic_fetch_or(&e->log[p / 64], 1ull << (p % 64));
    atomic_fetch_sub(&e->inflight, 1);
    return 0;
}

/* Pausing thread; waits out DMA already in flight, so none lands after the stop. */
static void dma_set_running(struct vfmig_device *d, int running)
{
    struct dma_engine *e = d->opaque;
    atomic_store(&e->stopped, !running);
    while (!running && atomic_load(&e->inflight))
        sched_yield();
}

/* Any thread; lock-free (each word is swapped out atomically). */
static void dma_dirty_log(struct vfmig_device *d, uint64_t *bits, uint64_t npages)
{
    struct dma_engine *e = d->opaque;
    for (uint64_t w = 0; w < (npages + 63) / 64; w++)
        bits[w] |= atomic_exchange(&e->log[w], 0);
}

static void dma_destroy(struct vfmig_device *d)
{
    struct dma_engine *e = d->opaque;
    free((void *)e->log);
    free(e);
}

struct vfmig_device *vfmig_dma_engine_new(struct vfmig_vm *vm, const char *name)
{
    struct dma_engine *e = calloc(1, sizeof(*e));
    if (!e)
        return NULL;
    e->vm = vm;
    e->log = calloc((vm->npages + 63) / 64, sizeof(uint64_t));
    if (!e->log) {
        free(e);
        return NULL;
    }
    strncpy(e->name, name, sizeof(e->name) - 1);
    e->dev = (struct vfmig_device){.name = e->name, .space = VFMIG_SPACE_NONE, .opaque = e,
                                   .dirty_log = dma_dirty_log, .set_running = dma_set_running,
                                   .destroy = dma_destroy};
    return &e->dev;
}
