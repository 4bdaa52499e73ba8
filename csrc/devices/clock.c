/* Clock port: reading the low half samples CLOCK_MONOTONIC and latches the high half for that
 * vCPU, so a 32-bit guest reads a consistent 64-bit value with two inl. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "vfmig/devices.h"
#include "vfmig/util.h"
#include "vfmig/vm.h"

struct clockdev {
    struct vfmig_device dev;
    uint32_t latch[VFMIG_MAX_VCPUS]; /* each slot touched only by its own vCPU thread */

    /* Test knob (vfmig_clock_hold): while hold > 0, accesses block their vCPU, as a device that
     * never answers would, until held (the vCPUs blocked) reaches hold; the others pass. lock
     * guards held and the wait. */
    _Atomic uint32_t hold;
    uint32_t held;
    pthread_mutex_t lock;
    pthread_cond_t cond;
};

#define HOLD_POLL_NS 10000000l /* a held vCPU looks for VM teardown this often */

static void deadline_in(struct timespec *ts, uint64_t ns)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ns += (uint64_t)ts->tv_nsec;
    ts->tv_sec += (time_t)(ns / 1000000000ull);
    ts->tv_nsec = (long)(ns % 1000000000ull);
}

/* Block this vCPU, if the hold wants more, until the hold is released or the VM is torn down
 * (so close never hangs). */
static void hold_access(struct clockdev *c, struct vfmig_vcpu *cpu)
{
    pthread_mutex_lock(&c->lock);
    if (c->held >= atomic_load(&c->hold)) {
        pthread_mutex_unlock(&c->lock);
        return;
    }
    c->held++;
    pthread_cond_broadcast(&c->cond);
    while (atomic_load(&c->hold) && !__atomic_load_n(&cpu->vm->quit, __ATOMIC_ACQUIRE)) {
        struct timespec ts;
        deadline_in(&ts, HOLD_POLL_NS);
        pthread_cond_timedwait(&c->cond, &c->lock, &ts);
    }
    c->held--;
    pthread_mutex_unlock(&c->lock);
}

/* vCPU thread; lock-free unless the test hold is on. */
static int clock_access(struct vfmig_device *d, struct vfmig_vcpu *cpu, uint64_t addr, uint8_t *data,
                        uint32_t len, int is_write)
{
    struct clockdev *c = d->opaque;
    if (atomic_load_explicit(&c->hold, memory_order_relaxed))
        hold_access(c, cpu);
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

static void clock_destroy(struct vfmig_device *d)
{
    struct clockdev *c = d->opaque;
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->cond);
    free(c);
}

int vfmig_clock_hold(struct vfmig_device *d, uint32_t vcpus)
{
    if (d->destroy != clock_destroy)
        return -EINVAL;
    struct clockdev *c = d->opaque;
    pthread_mutex_lock(&c->lock);
    atomic_store(&c->hold, vcpus);
    pthread_cond_broadcast(&c->cond);
    pthread_mutex_unlock(&c->lock);
    return 0;
}

int vfmig_clock_wait_held(struct vfmig_device *d, uint32_t count, uint32_t timeout_ms)
{
    if (d->destroy != clock_destroy)
        return -EINVAL;
    struct clockdev *c = d->opaque;
    struct timespec ts;
    deadline_in(&ts, (uint64_t)timeout_ms * 1000000ull);
    pthread_mutex_lock(&c->lock);
    int r = 0;
    while (c->held < count && r != ETIMEDOUT)
        r = pthread_cond_timedwait(&c->cond, &c->lock, &ts);
    int ok = c->held >= count;
    pthread_mutex_unlock(&c->lock);
    return ok ? 0 : -ETIMEDOUT;
}

struct vfmig_device *vfmig_clock_new(const char *name, enum vfmig_space space, uint64_t base)
{
    struct clockdev *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&c->cond, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&c->lock, NULL);
    c->dev = (struct vfmig_device){.name = name, .space = space, .base = base, .len = 8, .opaque = c,
                                   .access = clock_access, .save = clock_save, .load = clock_load,
                                   .destroy = clock_destroy};
    return &c->dev;
}
