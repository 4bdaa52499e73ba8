/* The micro-VMM: one KVM VM with memfd-backed RAM, an in-kernel irqchip, N vCPU threads and a
 * bus of device models. */
#ifndef VFMIG_VM_H
#define VFMIG_VM_H
#include <linux/kvm.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "vfmig/device.h"
#include "vfmig/guest_abi.h"
#include "vfmig/util.h"

#define VFMIG_MAX_DEVICES 16
#define VFMIG_MAX_SLOTS 2
#define VFMIG_MIN_RAM (64ull << 20)
#define VFMIG_MAX_RAM (1ull << 40)
#define VFMIG_MAX_MSRS 512
/* How long vfmig_vm_pause waits for the vCPUs to park: a vCPU stuck in a device access must
 * not stall a migration. The default is far above a healthy pause (tens of us). */
#define VFMIG_PAUSE_TIMEOUT_MS_DEFAULT 1000
#define VFMIG_PAUSE_TIMEOUT_MS_MAX 60000

enum vfmig_exit_kind {
    VFMIG_EXIT_IO, VFMIG_EXIT_MMIO, VFMIG_EXIT_HLT, VFMIG_EXIT_INTR, VFMIG_EXIT_RING_FULL,
    VFMIG_EXIT_SHUTDOWN, VFMIG_EXIT_INTERNAL, VFMIG_EXIT_OTHER, VFMIG_EXIT__COUNT
};

struct vfmig_irq;      /* irq.h */
struct vfmig_pci_host; /* pci.c */

struct vfmig_vm_config {
    uint64_t mem_bytes;
    uint32_t vcpus;
    uint32_t ring_entries; /* 0: dirty bitmap with manual protect; else dirty ring of this size */
};

struct vfmig_slot {
    uint32_t id;
    uint32_t flags;        /* KVM_MEM_* currently set */
    uint64_t gpa, size;
    uint64_t first_page;   /* index of this slot's first page in RAM (memfd offset / 4096) */
};

struct vfmig_vcpu {
    struct vfmig_vm *vm;
    uint32_t id;
    int fd;
    struct kvm_run *run;
    size_t run_size;
    struct kvm_dirty_gfn *ring; /* NULL in bitmap mode */
    pthread_t thread;
    int thread_live;
    /* Its thread's kernel id (gettid()), for tracers that filter by tid: stored by the thread as
     * it starts, and vfmig_vm_start returns only once every vCPU's is set; 0 before. Any thread
     * reads it lock-free. */
    _Atomic int tid;
    int paused;                 /* under vm->lock */
    _Atomic int throttle_due;
    _Atomic uint64_t throttle_ran_since_ns; /* set by the vCPU thread after each throttle sleep */
    _Atomic uint64_t throttle_sleep_since_ns; /* when its current throttle sleep began; 0 when awake */
    _Atomic int ring_full;      /* a KVM_EXIT_DIRTY_RING_FULL since the last harvest */
    _Atomic uint64_t exits[VFMIG_EXIT__COUNT];
    /* The device access this vCPU is inside, so a pause that times out can say where it is
     * stuck: addr << 4 | is_write << 2 | space (enum vfmig_space); 0 outside any access. */
    _Atomic uint64_t in_access;
    /* When its KVM_RUN last returned (the guest had stopped by then): set by the vCPU thread,
     * and copied under vm->lock as it parks, so a pause can tell when each vCPU stopped. */
    _Atomic uint64_t left_guest_ns;
    uint64_t parked_left_ns; /* under vm->lock */
    /* Its last KVM_RUN ended in an exit, not a kick: KVM may finish it only on the next KVM_RUN
     * (a port or MMIO access: the read's value, RIP past it; for other exits that KVM_RUN does
     * nothing). Only the vCPU thread touches it. */
    int exit_pending;
};

struct vfmig_vm {
    int kvm_fd, vm_fd, mem_fd;
    uint8_t *ram;          /* the whole memfd, mapped MAP_SHARED */
    uint64_t ram_bytes, npages;
    uint32_t nslots;
    struct vfmig_slot slots[VFMIG_MAX_SLOTS];
    uint32_t nvcpus;
    struct vfmig_vcpu vcpus[VFMIG_MAX_VCPUS];
    uint32_t ndevices;
    struct vfmig_device *devices[VFMIG_MAX_DEVICES];
    uint32_t ring_entries;

    /* Pause/resume. The lock is only ever taken around these flags, never across KVM_RUN or a
     * device access, so nothing a vCPU needs to make progress waits on it. */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    _Atomic int pause_req;
    int quit, started;
    uint64_t last_pause_ns, last_resume_ns;
    /* The last pause's stop: when its last vCPU left the guest, held between the request and the
     * end of the first round of kicks (a vCPU that returned later was off the CPU, not running
     * its guest); the downtime starts here, not at the request, which a preempted caller can
     * make milliseconds early. */
    uint64_t pause_stopped_ns;

    _Atomic uint64_t first_run_ns; /* when the first vCPU first entered KVM_RUN: a downtime end */
    _Atomic int failed;    /* a vCPU stopped on an error; err says why */
    struct vfmig_err err;

    /* The MSRs this KVM can both read and write: probed once (vcpu_state.c), not at each save. */
    uint32_t msr_idx[VFMIG_MAX_MSRS];
    uint32_t nmsrs;
    int msrs_probed;

    _Atomic int throttle_pct;
    pthread_t throttle_thread;
    int throttle_live;

    /* Created on first use by irq.c (GSIs, the KVM routing table) and pci.c (the PCI host);
     * freed by vfmig_vm_destroy after the devices, whose destroy hooks still use them. */
    struct vfmig_irq *irq;
    struct vfmig_pci_host *pci;
};

/* Lifecycle. Every call returns 0 or -errno with err filled; none is thread-safe against
 * another lifecycle call on the same VM (the Python layer serialises them). */
int vfmig_vm_create(const struct vfmig_vm_config *cfg, struct vfmig_vm **out, struct vfmig_err *err);
int vfmig_vm_add_device(struct vfmig_vm *vm, struct vfmig_device *dev);
struct vfmig_device *vfmig_vm_find_device(struct vfmig_vm *vm, const char *name);
int vfmig_vm_boot(struct vfmig_vm *vm, const uint8_t *image, size_t len);
int vfmig_vm_start(struct vfmig_vm *vm);
/* Parks every vCPU, then stops every device; waits at most timeout_ms (1..VFMIG_PAUSE_TIMEOUT_MS_MAX)
 * for the vCPUs. Lifecycle thread; takes vm->lock only between checks. 0; -EINVAL (bad timeout,
 * nothing changed); -ETIMEDOUT: err names the vCPUs that did not park and the access each is in,
 * and every vCPU was let go again, so the VM keeps running and no device was stopped; or a
 * migratable device's error (err names it): devices and vCPUs were started again; or -EIO when a
 * vCPU has failed (err says how): a dead guest is not paused to be saved, and nothing is stopped.
 * Migratable devices stop through migstate (PRE_COPY -> STOP_COPY, else STOP). */
int vfmig_vm_pause(struct vfmig_vm *vm, uint32_t timeout_ms);
/* Starts every device (migratable ones -> RUNNING), then lets the vCPUs go. Lifecycle thread.
 * 0, -EIO after a vCPU failed, or a device's error (the vCPUs run anyway). */
int vfmig_vm_resume(struct vfmig_vm *vm);
void vfmig_vm_destroy(struct vfmig_vm *vm);

/* Dirty logging on every slot (KVM_MEM_LOG_DIRTY_PAGES). */
int vfmig_vm_set_dirty_logging(struct vfmig_vm *vm, int on);

/* Auto-converge: each vCPU sleeps pct% of every 10 ms. 0 turns it off; a sleep under way then
 * runs to its end unless vfmig_vm_unthrottle cuts it short. */
int vfmig_vm_set_throttle(struct vfmig_vm *vm, int pct);

/* What vfmig_vm_unthrottle found: the vCPUs it woke from a throttle sleep, the longest such
 * sleep had lasted so far, and the vCPUs that had not yet run guest code at its timeout. */
struct vfmig_unthrottle {
    uint32_t woken, late;
    uint64_t longest_sleep_ns;
};

/* Before the stop: throttle off, every throttle sleep cut short, and each vCPU given the chance
 * to run guest code again (one exit; two after a sleep), so the stop does not land in a throttle
 * sleep or in the write faults after the last dirty-log sync, which the guest would feel as
 * downtime. Lifecycle thread, no lock held while waiting; waits at most timeout_ms. 0, or
 * -EINVAL for a bad timeout (nothing changed). */
int vfmig_vm_unthrottle(struct vfmig_vm *vm, uint32_t timeout_ms, struct vfmig_unthrottle *out);

/* Address translation. Both return -1 / NULL for anything outside RAM. */
int64_t vfmig_vm_gpa_to_page(const struct vfmig_vm *vm, uint64_t gpa);
uint64_t vfmig_vm_page_to_gpa(const struct vfmig_vm *vm, uint64_t page);
uint8_t *vfmig_vm_host(const struct vfmig_vm *vm, uint64_t gpa, uint64_t len);

/* Which of the RAM pages [first, first + n) hold data, as bits in map (n <= 512): the rest are
 * holes of the memfd and read as zero. Reading a hole would allocate it, so the loops over RAM
 * ask first. Any thread; a page written meanwhile is dirty and handled by the next round.
 * Returns the number of data pages. */
uint32_t vfmig_vm_data_map(const struct vfmig_vm *vm, uint64_t first, uint32_t n, uint64_t map[8]);

/* Kick one vCPU out of KVM_RUN. Any thread, lock-free. */
void vfmig_vcpu_kick(struct vfmig_vcpu *cpu);

#endif
