/* A minimal PCI host and the generic parts of a PCI function: 4 KiB config space with per-byte
 * writable and write-1-to-clear masks (QEMU's wmask/w1cmask), memory BARs the guest sizes and
 * places, a PCIe capability, MSI-X delivered through KVM MSI routing and irqfd (no exit to the
 * VMM per interrupt), doorbells as ioeventfds, the generic migration capability (migration=on,
 * simvf_abi.h), and the function's config-space state for migration. Device models (simvf, a
 * future VFIO function) embed struct vfmig_pci_func and add their BAR handlers. */
#ifndef VFMIG_PCI_H
#define VFMIG_PCI_H
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "vfmig/device.h"
#include "vfmig/migstate.h"
#include "vfmig/simvf_abi.h"
#include "vfmig/util.h"

#define VFMIG_PCI_CONFIG_SIZE 4096u
#define VFMIG_PCI_MAX_BARS 6u
#define VFMIG_PCI_MAX_FUNCS 32u      /* bus 0, function 0 of devices 0..31 */
#define VFMIG_PCI_MSIX_MAX 32u
#define VFMIG_PCI_MAX_DOORBELLS 4u

struct vfmig_vm;
struct vfmig_vcpu;
struct vfmig_pci_func;

/* A BAR's register handler: a vCPU thread, no lock held, must not block. off is from the BAR's
 * start; len 1..8; data little-endian. 0, or -errno to stop the vCPU. */
typedef int (*vfmig_pci_bar_fn)(struct vfmig_pci_func *f, struct vfmig_vcpu *cpu, uint64_t off, uint8_t *data,
                                uint32_t len, int is_write);

struct vfmig_pci_ids {
    uint16_t vendor, device;
    uint8_t revision;
    uint32_t class_code;            /* 24 bits: base class, subclass, prog-if */
    uint16_t subsys_vendor, subsys;
};

struct vfmig_pci_bar {
    uint32_t size;                  /* power of two >= 4096; 0: not implemented (reads 0) */
    vfmig_pci_bar_fn access;        /* NULL for the MSI-X BAR: pci.c serves it */
    _Atomic uint64_t addr;          /* where it decodes now; 0 while memory decode is off */
};

struct vfmig_pci_msix_entry {
    uint32_t addr_lo, addr_hi, data, ctrl; /* ctrl bit 0: vector masked */
};

struct vfmig_pci_doorbell {
    uint32_t bar, off;
    int fd;                         /* the device's eventfd; KVM signals it on a 4-byte write */
    uint64_t at;                    /* registered KVM_IOEVENTFD address, 0 when none */
};

/* The guest handshake's state (see vfmig_pci_handshake below). Fields marked (config_lock) are
 * read and written under f->config_lock; the atomics are also read lock-free by the waiter. */
struct vfmig_pci_handshake {
    int ack_fd;                     /* eventfd (-1 without the capability): the config-write path
                                     * signals it on the first DEV_STATUS = ACK of an arming */
    _Atomic int armed;              /* a notice is out and its ack still counts (config_lock to write) */
    _Atomic uint64_t acked_ns;      /* CLOCK_MONOTONIC of that first ack (0: none yet) */
    uint64_t raised_ns, deadline_ns; /* (config_lock) when the notice went out; its deadline */
    /* enum vfmig_hs_outcome of the last handshake and its ack latency; travel in the PCI state
     * blob. Atomics: the handshake stores them after its wait without config_lock, which a
     * guest writing config space in a loop could keep from it past the deadline. */
    _Atomic uint32_t outcome, latency_us;
    int notified;                   /* (config_lock) the guest was told MIGRATING and not told since */
    int post_load;                  /* (config_lock) destination: loaded() set MIGRATED; started()
                                     * owes the guest the post-load interrupt */
};

struct vfmig_pci_func {
    struct vfmig_device dev;        /* registered with the VM; dev.opaque is the device model */
    struct vfmig_vm *vm;
    uint8_t devfn;                  /* dev << 3, assigned by vfmig_pci_attach */
    uint8_t config[VFMIG_PCI_CONFIG_SIZE], wmask[VFMIG_PCI_CONFIG_SIZE], w1cmask[VFMIG_PCI_CONFIG_SIZE];
    uint16_t next_cap;              /* where the next capability goes (builder) */
    struct vfmig_pci_bar bars[VFMIG_PCI_MAX_BARS];

    uint16_t msix_cap;              /* 0: no MSI-X */
    uint32_t msix_nvec, msix_bar, msix_table_off, msix_pba_off;
    struct vfmig_pci_msix_entry msix[VFMIG_PCI_MSIX_MAX];
    uint32_t msix_pba;              /* pending bits (vectors < 32) */
    int irqfd[VFMIG_PCI_MSIX_MAX];  /* eventfd per vector, bound to gsi[] with KVM_IRQFD */
    uint32_t gsi[VFMIG_PCI_MSIX_MAX];
    pthread_mutex_t msix_lock;      /* table, PBA and routes: held briefly, never across a blocking call */
    /* Messages sent per vector (irqfd writes that succeeded), for observability: counted under
     * msix_lock, read lock-free; local to this process, not migrated. */
    _Atomic uint64_t msix_sent[VFMIG_PCI_MSIX_MAX];

    uint16_t migcap;                /* config offset of the migration capability; 0: migration=off */
    struct vfmig_pci_handshake hs;

    uint32_t ndoorbells;
    struct vfmig_pci_doorbell doorbells[VFMIG_PCI_MAX_DOORBELLS];
    pthread_mutex_t config_lock;    /* config space writes vs. the VMM's migcap updates and save */

    /* Optional: after the guest wrote config [off, off + len). vCPU thread, config_lock held. */
    void (*config_written)(struct vfmig_pci_func *f, uint32_t off, uint32_t len);
};

/* Builder, before vfmig_pci_attach; lifecycle thread. Each returns 0 or -errno with err.
 * vfmig_pci_func_init zeroes all of f first: set dev.opaque, dev's hooks and config_written
 * after it. Capabilities are laid out from 0x40 in the order they are added. */
int vfmig_pci_func_init(struct vfmig_pci_func *f, struct vfmig_vm *vm, const char *name,
                        const struct vfmig_pci_ids *ids, struct vfmig_err *err);
int vfmig_pci_add_bar(struct vfmig_pci_func *f, uint32_t bar, uint32_t size, vfmig_pci_bar_fn access,
                      struct vfmig_err *err);
int vfmig_pci_add_pcie_cap(struct vfmig_pci_func *f, struct vfmig_err *err);
/* MSI-X with nvec vectors, table and PBA at these offsets of BAR bar (which must have been added
 * with access == NULL). Allocates a GSI and an irqfd per vector. */
int vfmig_pci_add_msix(struct vfmig_pci_func *f, uint32_t nvec, uint32_t bar, uint32_t table_off,
                       uint32_t pba_off, struct vfmig_err *err);
/* migration=on: the generic migration capability (simvf_abi.h VFMIG_MIGCAP_*). */
int vfmig_pci_add_migcap(struct vfmig_pci_func *f, struct vfmig_err *err);
/* A 4-byte guest write to BAR bar + off signals fd through KVM_IOEVENTFD (no exit to user space)
 * whenever the BAR decodes; the registration follows the BAR when the guest moves it. */
int vfmig_pci_add_doorbell(struct vfmig_pci_func *f, uint32_t bar, uint32_t off, int fd, struct vfmig_err *err);

/* Put f on bus 0 at the next free device number, creating the host (config ports and the BAR
 * window) on first use, and add f->dev to the VM (which then destroys it). Lifecycle thread. */
int vfmig_pci_attach(struct vfmig_vm *vm, struct vfmig_pci_func *f, struct vfmig_err *err);
/* Release irqfds, ioeventfds and routes; the device model's destroy hook calls it. Lifecycle
 * thread, vCPUs stopped; blocks in KVM ioctls. A second call does nothing. */
void vfmig_pci_func_release(struct vfmig_pci_func *f);
/* Frees the host after every device's destroy hook ran; vfmig_vm_destroy calls it. */
void vfmig_pci_host_destroy(struct vfmig_vm *vm);

/* Whether the guest lets f master the bus (command register bit 2): a device model checks it
 * before each DMA. Any thread, lock-free (config bytes are stored atomically). */
static inline int vfmig_pci_bus_master(const struct vfmig_pci_func *f)
{
    return (__atomic_load_n(&f->config[0x04], __ATOMIC_RELAXED) & 0x04) != 0;
}

/* Raise MSI-X vector vec: writes its irqfd, or sets its PBA bit while the vector or function is
 * masked or MSI-X is off (delivered on unmask), or while the vector's new route is still on its
 * way into KVM (delivered when that commit completes). Any thread; takes msix_lock briefly.
 * 1 if it was delivered, 0 if left pending, -EINVAL for a bad vector. */
int vfmig_pci_msix_notify(struct vfmig_pci_func *f, uint32_t vec);
/* The messages each vector sent so far (a raise left pending counts once it is delivered)
 * into out[0 .. min(cap, nvec)); returns nvec (0 without MSI-X). Any thread, lock-free. */
uint32_t vfmig_pci_msix_counts(const struct vfmig_pci_func *f, uint64_t *out, uint32_t cap);

/* Config space as the guest reads it (little-endian, len 1/2/4). Any thread; config_lock. */
uint32_t vfmig_pci_config_read(struct vfmig_pci_func *f, uint32_t off, uint32_t len);
/* The VMM's side of the migration capability: set/clear VMM status bits the guest cannot write
 * (a bit in both ends set), read any of its registers (reg < VFMIG_MIGCAP_SIZE; 0 otherwise or
 * without the capability). Any thread; config_lock. */
void vfmig_pci_migcap_update(struct vfmig_pci_func *f, uint8_t set_bits, uint8_t clear_bits);
uint8_t vfmig_pci_migcap_reg(struct vfmig_pci_func *f, uint32_t reg);

/* The guest handshake of the migration capability (the seed's idea, without its faults): a
 * device's prestop hook calls these. Any PCI device model with migration=on has it. None of
 * them fails; each is a no-op on a function without the capability. */
/* Source, migration thread, vCPUs running. If the driver enabled the capability (CTRL), the
 * function has MSI-X, and deadline_ns (CLOCK_MONOTONIC) is still ahead: DEV_STATUS cleared,
 * VMM_STATUS = MIGRATING (only: a MIGRATED left from an earlier migration in would read as a
 * post-load notice), armed; the MSI-X vector the IRQ register names raised (pending in the PBA
 * if masked); then a wait with ppoll() on ack_fd until the ack or deadline_ns. Takes
 * config_lock and msix_lock only briefly, to arm and to raise, and holds no lock while it
 * waits, so the vCPU that delivers the ack never waits for this thread. Returns 0 by the
 * deadline (plus scheduling slack) with out filled: ACKED (latency_us from the raise to the
 * ack), TIMEOUT, or DISABLED (no notice given); hs.outcome/latency_us set alike. Only the
 * first ACK write of an arming counts; nothing else the guest writes extends the wait. */
int vfmig_pci_handshake(struct vfmig_pci_func *f, uint64_t deadline_ns, struct vfmig_prestop_result *out);
/* The VM stopped (the device's move out of RUNNING/PRE_COPY), before its state is saved: an
 * ack that came after the deadline turns TIMEOUT into LATE; disarm, so nothing the guest
 * writes later changes the outcome. Migration thread; config_lock briefly. */
void vfmig_pci_handshake_stopped(struct vfmig_pci_func *f);
/* The migration failed and the source runs on: if a notice was given, VMM_STATUS and
 * DEV_STATUS cleared and the vector raised again ("cancelled": the driver resumes its queues);
 * disarmed; outcome back to NONE. Idempotent: a second call raises nothing. Migration thread;
 * config_lock, then msix_lock, briefly. */
void vfmig_pci_handshake_abort(struct vfmig_pci_func *f);
/* Destination, after apply and before any vCPU runs (simvf: when the loaded device starts, so
 * the state at STOP stays the source's at stop byte for byte): if the loaded config has the
 * capability enabled, VMM_STATUS = MIGRATED, plus RESET_REQUIRED unless the loaded outcome is
 * ACKED (NONE, DISABLED, TIMEOUT, LATE: the driver was not known to be quiesced), DEV_STATUS
 * cleared; a disabled capability is left as loaded. started(), once it runs: the post-load
 * interrupt (the vector raised) if loaded() set MIGRATED, once. Lifecycle or migration thread;
 * config_lock (and msix_lock) briefly. */
void vfmig_pci_handshake_loaded(struct vfmig_pci_func *f);
void vfmig_pci_handshake_started(struct vfmig_pci_func *f);

/* Migration of the function's PCI state: config space, MSI-X table and PBA, and the guest
 * handshake's outcome and latency. The blob layout is docs/device-state.md § PCI function
 * state. save: device stopped (after vfmig_pci_handshake_stopped); returns bytes written or
 * -ENOSPC. check: pure, any thread: sizes (BAR sizes included), the handshake outcome (a known
 * value; NONE without the capability; a latency only with ACKED or LATE), then every bit the
 * guest cannot write (identity, capability chain, MSI-X table size) equal to this function's;
 * err says which. apply: before the vCPUs run; runs check itself and changes nothing if it
 * fails; restores BAR decode, MSI-X routes and doorbells (blocks in KVM ioctls) and the
 * outcome, disarmed (the device model then calls vfmig_pci_handshake_loaded). */
size_t vfmig_pci_state_size(const struct vfmig_pci_func *f);
long vfmig_pci_save(struct vfmig_pci_func *f, uint8_t *buf, size_t cap);
int vfmig_pci_check(const struct vfmig_pci_func *f, const uint8_t *buf, size_t len, struct vfmig_err *err);
int vfmig_pci_apply(struct vfmig_pci_func *f, const uint8_t *buf, size_t len, struct vfmig_err *err);

#endif
