/* VM-wide interrupt plumbing on the in-kernel irqchip: GSI numbers for MSIs, the VM's one KVM
 * routing table (KVM_SET_GSI_ROUTING replaces the whole table, so it always carries the kernel's
 * default PIC/IOAPIC routes as well as every MSI route), irqfds and ioeventfds. */
#ifndef VFMIG_IRQ_H
#define VFMIG_IRQ_H
#include <stdint.h>

#include "vfmig/util.h"

#define VFMIG_IRQ_PINS 24u      /* GSIs 0..23: IOAPIC pins (0..15 also the PICs), as KVM's default */
#define VFMIG_IRQ_MAX_GSI 1024u /* GSIs VFMIG_IRQ_PINS..this-1 are for MSIs (fewer if KVM allows fewer) */

struct vfmig_vm;
struct vfmig_irq;

/* The VM's routing state (vm->irq), created on the first call. Lifecycle thread. 0, or -errno
 * with err (no memory, or this KVM has no GSI routing). */
int vfmig_irq_get(struct vfmig_vm *vm, struct vfmig_irq **out, struct vfmig_err *err);
/* vfmig_vm_destroy calls it after every device was destroyed. NULL is fine. */
void vfmig_irq_destroy(struct vfmig_irq *irq);

/* A free MSI GSI, with no route until vfmig_irq_set_msi. Any thread; table lock held briefly,
 * never blocks. 0, or -ENOSPC with err. */
int vfmig_irq_alloc_gsi(struct vfmig_irq *irq, uint32_t *gsi, struct vfmig_err *err);
/* Gives gsi back; its route leaves KVM at the next commit. Any thread; table lock briefly. */
void vfmig_irq_free_gsi(struct vfmig_irq *irq, uint32_t gsi);
/* Route an allocated gsi to the MSI (addr, data) from the next commit on. Any thread; table lock
 * briefly, never blocks, so callers may hold their own locks. 1 if the route changed (a commit
 * is due), 0 if it was already so, -EINVAL for a GSI not allocated. */
int vfmig_irq_set_msi(struct vfmig_irq *irq, uint32_t gsi, uint64_t addr, uint32_t data);
/* Hands the whole table to KVM. Any thread; blocks in KVM_SET_GSI_ROUTING under the commit mutex
 * (one commit at a time), so call it holding no other lock. Every route set before the call is
 * in KVM when it returns 0; -errno with err leaves them pending for the next commit. */
int vfmig_irq_commit(struct vfmig_irq *irq, struct vfmig_err *err);
/* 1 if gsi has an MSI route and KVM already has it as last set (an irqfd write goes there), 0
 * otherwise. Any thread; table lock briefly, never blocks. */
int vfmig_irq_route_ready(struct vfmig_irq *irq, uint32_t gsi);

/* KVM_IRQFD: bind (assign = 1) or unbind eventfd fd to gsi; a write to fd then injects gsi's
 * route inside KVM. Lifecycle thread; blocks in the ioctl. 0 or -errno with err. */
int vfmig_irq_irqfd(struct vfmig_irq *irq, int fd, uint32_t gsi, int assign, struct vfmig_err *err);
/* KVM_IOEVENTFD: a 4-byte guest MMIO write at addr signals eventfd fd without leaving KVM (only
 * writing datamatch's value when datamatch is not NULL). Deassign with the same arguments. Any
 * thread; blocks in the ioctl. 0 or -errno with err (-EEXIST: something is registered there). */
int vfmig_irq_ioeventfd(struct vfmig_irq *irq, uint64_t addr, int fd, const uint32_t *datamatch, int assign,
                        struct vfmig_err *err);

#endif
