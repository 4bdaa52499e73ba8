/* The in-kernel platform devices (PIC master/slave, IOAPIC) and the KVM clock, carried as one
 * device-state record. Layout: magic, version, 3 x kvm_irqchip, kvm_clock_data. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

#include "vfmig/devices.h"

#define PLATFORM_MAGIC 0x54414C50u /* "PLAT" */
#define PLATFORM_VERSION 1u

struct platform_state {
    uint32_t magic, version;
    struct kvm_irqchip chips[3];
    struct kvm_clock_data clock;
};

struct platform {
    struct vfmig_device dev;
    int vm_fd;
};

/* All vCPUs paused; no lock. */
static long platform_save(struct vfmig_device *d, uint8_t *buf, size_t cap)
{
    struct platform *p = d->opaque;
    struct platform_state s;
    if (cap < sizeof(s))
        return -ENOSPC;
    memset(&s, 0, sizeof(s));
    s.magic = PLATFORM_MAGIC;
    s.version = PLATFORM_VERSION;
    for (uint32_t i = 0; i < 3; i++) {
        s.chips[i].chip_id = i; /* KVM_IRQCHIP_PIC_MASTER, _PIC_SLAVE, _IOAPIC */
        if (ioctl(p->vm_fd, KVM_GET_IRQCHIP, &s.chips[i]) < 0)
            return -errno;
    }
    if (ioctl(p->vm_fd, KVM_GET_CLOCK, &s.clock) < 0)
        return -errno;
    memcpy(buf, &s, sizeof(s));
    return (long)sizeof(s);
}

int vfmig_platform_check(const uint8_t *buf, size_t len)
{
    struct platform_state s;
    if (len != sizeof(s))
        return -EINVAL;
    memcpy(&s, buf, sizeof(s));
    if (s.magic != PLATFORM_MAGIC || s.version != PLATFORM_VERSION)
        return -EPROTO;
    for (uint32_t i = 0; i < 3; i++)
        if (s.chips[i].chip_id != i)
            return -EINVAL;
    return 0;
}

/* Before any vCPU runs; validates, then applies. */
static int platform_load(struct vfmig_device *d, const uint8_t *buf, size_t len)
{
    struct platform *p = d->opaque;
    struct platform_state s;
    int rc = vfmig_platform_check(buf, len);
    if (rc < 0)
        return rc;
    memcpy(&s, buf, sizeof(s));
    for (uint32_t i = 0; i < 3; i++)
        if (ioctl(p->vm_fd, KVM_SET_IRQCHIP, &s.chips[i]) < 0)
            return -errno;
    s.clock.flags &= KVM_CLOCK_REALTIME; /* only flag KVM_SET_CLOCK accepts besides none */
    if (ioctl(p->vm_fd, KVM_SET_CLOCK, &s.clock) < 0)
        return -errno;
    return 0;
}

static void platform_destroy(struct vfmig_device *d) { free(d->opaque); }

struct vfmig_device *vfmig_platform_new(int vm_fd)
{
    struct platform *p = calloc(1, sizeof(*p));
    if (!p)
        return NULL;
    p->vm_fd = vm_fd;
    p->dev = (struct vfmig_device){.name = "platform", .space = VFMIG_SPACE_NONE, .opaque = p,
                                   .save = platform_save, .load = platform_load, .destroy = platform_destroy};
    return &p->dev;
}
