/* Clock port: reading the low half samples CLOCK_MONOTONIC and latches the high half for that
 * vCPU, so a 32-bit guest reads a consistent 64-bit value with two inl. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "vfmig/devices.h"
#include "vfmig/util.h"
#include "vfmig/vm.h"

struct clockdev {
    struct vfmig_device dev;
    uint32_t latch[VFMIG_MAX_VCPUS]; /* each slot touched only by its own vCPU thread */
};

/* vCPU thread; lock-free. */
static int clock_access(struct vfmig_device *d, struct vfmig_vcpu *cpu, uint64_t addr, uint8_t *data,
                        uint32_t len, int is_write)
{
    struct clockdev *c = d->opaque;
    if (is_write)
        return 0;
    uint32_t v;
    if (addr == d->base) { /* the low half, at the start of either window */
        uint64_t now = vfmig_now_ns();
        c->latch[cpu->id] = (uint32_t)(now >> 32);
        v = (uint32_t)now;
    } else {
        v = c->latch[cpu->id];
    }
    memset(data, 0, len);
    memcpy(data, &v, len < 4 ? len : 4);
    return 0;
}

/* The latches are guest-visible state: a vCPU stopped between its two reads must find its
 * high half on the destination. All vCPUs paused. */
static long clock_save(struct vfmig_device *d, uint8_t *buf, size_t cap)
{
    struct clockdev *c = d->opaque;
    if (cap < sizeof(c->latch))
        return -ENOSPC;
    memcpy(buf, c->latch, sizeof(c->latch));
    return (long)sizeof(c->latch);
}

static int clock_load(struct vfmig_device *d, const uint8_t *buf, size_t len)
{
    struct clockdev *c = d->opaque;
    if (len != sizeof(c->latch))
        return -EINVAL;
    memcpy(c->latch, buf, len);
    return 0;
}

static void clock_destroy(struct vfmig_device *d) { free(d->opaque); }

struct vfmig_device *vfmig_clock_new(const char *name, enum vfmig_space space, uint64_t base)
{
    struct clockdev *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->dev = (struct vfmig_device){.name = name, .space = space, .base = base, .len = 8, .opaque = c,
                                   .access = clock_access, .save = clock_save, .load = clock_load,
                                   .destroy = clock_destroy};
    return &c->dev;
}
