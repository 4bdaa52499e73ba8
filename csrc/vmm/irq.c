/* VM-wide GSI allocation and the one KVM routing table; irqfd and ioeventfd registration. */
#include <errno.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "vfmig/irq.h"
#include "vfmig/vm.h"

/* The kernel's default routing (what KVM_CREATE_IRQCHIP installs): GSI n to IOAPIC pin n, and
 * GSIs 0..15 also to PIC pin n % 8 of the master (n < 8) or the slave. */
#define PIC_ROUTES 16u
#define DEFAULT_ROUTES (VFMIG_IRQ_PINS + PIC_ROUTES)

struct route {
    uint8_t used;       /* allocated */
    uint8_t msi;        /* has an MSI route */
    uint8_t committed;  /* KVM has the route as last set */
    uint64_t addr;
    uint32_t data;
    uint64_t ver;       /* irq->gen when the route last changed */
};

struct vfmig_irq {
    int vm_fd;
    uint32_t limit;                 /* GSIs below this may be allocated */
    pthread_mutex_t lock;           /* routes and gen; held briefly, never across an ioctl */
    uint64_t gen;
    struct route routes[VFMIG_IRQ_MAX_GSI];
    /* One KVM_SET_GSI_ROUTING at a time, held across the ioctl: a later commit then always
     * carries a table at least as new as an earlier one, so KVM ends with the newest. */
    pthread_mutex_t commit_lock;
    struct kvm_irq_routing *table;  /* commit_lock; room for every route */
};

static size_t table_bytes(void)
{
    return sizeof(struct kvm_irq_routing) + (DEFAULT_ROUTES + VFMIG_IRQ_MAX_GSI) * sizeof(struct kvm_irq_routing_entry);
}

int vfmig_irq_get(struct vfmig_vm *vm, struct vfmig_irq **out, struct vfmig_err *err)
{
    if (vm->irq) {
        *out = vm->irq;
        return 0;
    }
    int max = ioctl(vm->vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_IRQ_ROUTING);
    if (max <= (int)VFMIG_IRQ_PINS)
        return vfmig_fail(err, ENOTSUP, "this KVM has no GSI routing for MSIs (KVM_CAP_IRQ_ROUTING is %d)", max);
    struct vfmig_irq *irq = calloc(1, sizeof(*irq));
    struct kvm_irq_routing *table = calloc(1, table_bytes());
    if (!irq || !table) {
        free(irq);
        free(table);
        return vfmig_fail(err, ENOMEM, "out of memory for the interrupt routing table");
    }
    irq->vm_fd = vm->vm_fd;
    irq->limit = (uint32_t)max < VFMIG_IRQ_MAX_GSI ? (uint32_t)max : VFMIG_IRQ_MAX_GSI;
    irq->table = table;
    pthread_mutex_init(&irq->lock, NULL);
    pthread_mutex_init(&irq->commit_lock, NULL);
    vm->irq = irq;
    *out = irq;
    return 0;
}

void vfmig_irq_destroy(struct vfmig_irq *irq)
{
    if (!irq)
        return;
    pthread_mutex_destroy(&irq->lock);
    pthread_mutex_destroy(&irq->commit_lock);
    free(irq->table);
    free(irq);
}

int vfmig_irq_alloc_gsi(struct vfmig_irq *irq, uint32_t *gsi, struct vfmig_err *err)
{
    pthread_mutex_lock(&irq->lock);
    for (uint32_t g = VFMIG_IRQ_PINS; g < irq->limit; g++) {
        if (irq->routes[g].used)
            continue;
        irq->routes[g] = (struct route){.used = 1};
        pthread_mutex_unlock(&irq->lock);
        *gsi = g;
        return 0;
    }
    pthread_mutex_unlock(&irq->lock);
    return vfmig_fail(err, ENOSPC, "all %u MSI GSIs are in use", irq->limit - VFMIG_IRQ_PINS);
}

void vfmig_irq_free_gsi(struct vfmig_irq *irq, uint32_t gsi)
{
    if (gsi < VFMIG_IRQ_PINS || gsi >= irq->limit)
        return;
    pthread_mutex_lock(&irq->lock);
    irq->routes[gsi] = (struct route){0};
    pthread_mutex_unlock(&irq->lock);
}

int vfmig_irq_set_msi(struct vfmig_irq *irq, uint32_t gsi, uint64_t addr, uint32_t data)
{
    if (gsi < VFMIG_IRQ_PINS || gsi >= irq->limit)
        return -EINVAL;
    pthread_mutex_lock(&irq->lock);
    struct route *r = &irq->routes[gsi];
    int changed = 0;
    if (!r->used) {
        changed = -EINVAL;
    } else if (!r->msi || r->addr != addr || r->data != data) {
        r->msi = 1;
        r->addr = addr;
        r->data = data;
        r->committed = 0;
        r->ver = ++irq->gen;
        changed = 1;
    }
    pthread_mutex_unlock(&irq->lock);
    return changed;
}

int vfmig_irq_route_ready(struct vfmig_irq *irq, uint32_t gsi)
{
    if (gsi < VFMIG_IRQ_PINS || gsi >= irq->limit)
        return 0;
    pthread_mutex_lock(&irq->lock);
    int ready = irq->routes[gsi].msi && irq->routes[gsi].committed;
    pthread_mutex_unlock(&irq->lock);
    return ready;
}

static void default_routes(struct kvm_irq_routing_entry *e)
{
    uint32_t n = 0;
    for (uint32_t pin = 0; pin < VFMIG_IRQ_PINS; pin++) {
        e[n++] = (struct kvm_irq_routing_entry){
            .gsi = pin, .type = KVM_IRQ_ROUTING_IRQCHIP,
            .u.irqchip = {.irqchip = KVM_IRQCHIP_IOAPIC, .pin = pin}};
        if (pin < PIC_ROUTES)
            e[n++] = (struct kvm_irq_routing_entry){
                .gsi = pin, .type = KVM_IRQ_ROUTING_IRQCHIP,
                .u.irqchip = {.irqchip = pin < 8 ? KVM_IRQCHIP_PIC_MASTER : KVM_IRQCHIP_PIC_SLAVE, .pin = pin % 8}};
    }
}

int vfmig_irq_commit(struct vfmig_irq *irq, struct vfmig_err *err)
{
    pthread_mutex_lock(&irq->commit_lock);
    struct kvm_irq_routing *t = irq->table;
    memset(t, 0, table_bytes());
    default_routes(t->entries);
    uint32_t n = DEFAULT_ROUTES;
    pthread_mutex_lock(&irq->lock);
    uint64_t gen = irq->gen;
    for (uint32_t g = VFMIG_IRQ_PINS; g < irq->limit; g++) {
        const struct route *r = &irq->routes[g];
        if (!r->used || !r->msi)
            continue;
        t->entries[n++] = (struct kvm_irq_routing_entry){
            .gsi = g, .type = KVM_IRQ_ROUTING_MSI,
            .u.msi = {.address_lo = (uint32_t)r->addr, .address_hi = (uint32_t)(r->addr >> 32), .data = r->data}};
    }
    pthread_mutex_unlock(&irq->lock);
    t->nr = n;
    if (ioctl(irq->vm_fd, KVM_SET_GSI_ROUTING, t) < 0) {
        int e = errno;
        pthread_mutex_unlock(&irq->commit_lock);
        return vfmig_fail(err, e, "KVM_SET_GSI_ROUTING with %u routes: %s", n, strerror(e));
    }
    /* Routes changed after the snapshot (ver > gen) are not in KVM yet: their setter commits. */
    pthread_mutex_lock(&irq->lock);
    for (uint32_t g = VFMIG_IRQ_PINS; g < irq->limit; g++) {
        struct route *r = &irq->routes[g];
        if (r->used && r->msi && r->ver <= gen)
            r->committed = 1;
    }
    pthread_mutex_unlock(&irq->lock);
    pthread_mutex_unlock(&irq->commit_lock);
    return 0;
}

int vfmig_irq_irqfd(struct vfmig_irq *irq, int fd, uint32_t gsi, int assign, struct vfmig_err *err)
{
    if (fd < 0 || gsi >= irq->limit)
        return vfmig_fail(err, EINVAL, "irqfd %d for GSI %u: bad fd or GSI", fd, gsi);
    struct kvm_irqfd a = {.fd = (uint32_t)fd, .gsi = gsi, .flags = assign ? 0 : KVM_IRQFD_FLAG_DEASSIGN};
    if (ioctl(irq->vm_fd, KVM_IRQFD, &a) < 0)
        return vfmig_fail(err, errno, "KVM_IRQFD %s fd %d, GSI %u: %s", assign ? "assign" : "deassign", fd, gsi,
                          strerror(errno));
    return 0;
}

int vfmig_irq_ioeventfd(struct vfmig_irq *irq, uint64_t addr, int fd, const uint32_t *datamatch, int assign,
                        struct vfmig_err *err)
{
    if (fd < 0 || addr > UINT64_MAX - 4)
        return vfmig_fail(err, EINVAL, "ioeventfd %d at 0x%llx: bad fd or address", fd, (unsigned long long)addr);
    struct kvm_ioeventfd a = {.addr = addr, .len = 4, .fd = fd};
    if (datamatch) {
        a.flags |= KVM_IOEVENTFD_FLAG_DATAMATCH;
        a.datamatch = *datamatch;
    }
    if (!assign)
        a.flags |= KVM_IOEVENTFD_FLAG_DEASSIGN;
    if (ioctl(irq->vm_fd, KVM_IOEVENTFD, &a) < 0)
        return vfmig_fail(err, errno, "KVM_IOEVENTFD %s fd %d at 0x%llx: %s", assign ? "assign" : "deassign", fd,
                          (unsigned long long)addr, strerror(errno));
    return 0;
}
