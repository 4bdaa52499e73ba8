/* DMA engine: writes guest RAM from the host side as a device's DMA would, and logs what it
 * wrote in its DMA dirty log (dma_log.h). */
#include <errno.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "vfmig/devices.h"
#include "vfmig/dma_log.h"
#include "vfmig/vm.h"

struct dma_engine {
    struct vfmig_device dev;
    struct vfmig_vm *vm;
    char name[32];
    struct vfmig_dma_log log;
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
    /* Log after the data lands: a report in between just sends the page one round later. */
    vfmig_dma_log_mark(&e->log, gpa, len);
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

static void dma_destroy(struct vfmig_device *d)
{
    struct dma_engine *e = d->opaque;
    vfmig_dma_log_free(&e->log);
    free(e);
}

struct vfmig_device *vfmig_dma_engine_new(struct vfmig_vm *vm, const char *name)
{
    struct dma_engine *e = calloc(1, sizeof(*e));
    if (!e)
        return NULL;
    e->vm = vm;
    if (vfmig_dma_log_init(&e->log, vm) < 0) {
        free(e);
        return NULL;
    }
    strncpy(e->name, name, sizeof(e->name) - 1);
    e->dev = (struct vfmig_device){.name = e->name, .space = VFMIG_SPACE_NONE, .opaque = e,
                                   .set_running = dma_set_running, .destroy = dma_destroy,
                                   .dma_log = &e->log};
    return &e->dev;
}
