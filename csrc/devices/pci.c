/* The PCI host (config mechanism #1 on 0xCF8..0xCFF, and the BAR window) and the generic PCI
 * function of pci.h: config space with write masks, memory BARs, PCIe, MSI-X and migration
 * capabilities, MSI-X through KVM routes and irqfds, doorbells as ioeventfds, and the
 * function's migration state (docs/device-state.md § PCI function state).
 * Lock order: config_lock, then msix_lock, then irq.c's table lock. Config bytes are stored
 * with relaxed atomics so lock-free readers (vfmig_pci_bus_master, check) see whole bytes.
 * The guest handshake (pci.h) waits for the driver's ack holding none of these. */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "vfmig/irq.h"
#include "vfmig/pci.h"
#include "vfmig/usdt.h"
#include "vfmig/vm.h"

/* Type-0 header (PCI Local Bus 3.0 §6.1). */
#define CFG_VENDOR 0x00u
#define CFG_DEVICE 0x02u
#define CFG_COMMAND 0x04u
#define CFG_STATUS 0x06u
#define CFG_REVISION 0x08u
#define CFG_CLASS 0x09u
#define CFG_CACHE_LINE 0x0Cu
#define CFG_HEADER_TYPE 0x0Eu
#define CFG_BAR0 0x10u
#define CFG_SUBSYS_VENDOR 0x2Cu
#define CFG_SUBSYS 0x2Eu
#define CFG_CAP_PTR 0x34u
#define CFG_INT_LINE 0x3Cu
#define CFG_HEADER_END 0x40u
#define CFG_CAPS_END 0x100u     /* standard capabilities live in the first 256 bytes */

/* Command bits a PCIe endpoint implements: I/O and memory decode, bus master, parity error
 * response, SERR# enable, INTx disable. The rest are hardwired to 0 on PCIe. */
#define CMD_MEM 0x0002u
#define CMD_WRITABLE 0x0547u
#define STATUS_CAP_LIST 0x0010u
/* Master data parity error, signaled/received target abort, received master abort, signaled
 * system error, detected parity error: set by the device, cleared by writing 1. */
#define STATUS_RW1C 0xF900u

#define CAP_ID_PCIE 0x10u
#define CAP_ID_MSIX 0x11u
#define PCIE_CAP_SIZE 0x3Cu     /* version 2 layout, through Slot Control/Status 2 */
#define MSIX_CAP_SIZE 0x0Cu
#define MSIX_CTRL 0x02u
#define MSIX_TABLE 0x04u
#define MSIX_PBA 0x08u
#define MSIX_ENABLE 0x8000u
#define MSIX_MASKALL 0x4000u
#define MSIX_ENTRY_SIZE 16u
#define MSIX_VEC_MASKED 0x1u

/* The state blob (docs/device-state.md § PCI function state). */
#define STATE_MAGIC 0x49435056u /* "VPCI" */
#define STATE_VERSION 2u
#define STATE_HEADER 48u
#define STATE_HS_OUTCOME 40u /* u32 enum vfmig_hs_outcome */
#define STATE_HS_LATENCY 44u /* u32 microseconds */

struct vfmig_pci_host {
    struct vfmig_vm *vm;
    struct vfmig_device pio, mmio;
    /* CONFIG_ADDRESS: one register for the whole host, as on a real chipset; guests serialise
     * their address/data pairs themselves. */
    _Atomic uint32_t latch;
    struct vfmig_pci_func *_Atomic funcs[VFMIG_PCI_MAX_FUNCS]; /* by device number */
};

/* ---- little-endian helpers ---- */

static uint64_t le_get(const uint8_t *p, uint32_t len)
{
    uint64_t v = 0;
    for (uint32_t i = 0; i < len; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static void le_put(uint8_t *p, uint64_t v, uint32_t len)
{
    for (uint32_t i = 0; i < len; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint8_t cfg_get(const struct vfmig_pci_func *f, uint32_t off)
{
    return __atomic_load_n(&f->config[off], __ATOMIC_RELAXED);
}

static void cfg_set(struct vfmig_pci_func *f, uint32_t off, uint8_t v)
{
    __atomic_store_n(&f->config[off], v, __ATOMIC_RELAXED);
}

static uint32_t cfg_le(const struct vfmig_pci_func *f, uint32_t off, uint32_t len)
{
    uint32_t v = 0;
    for (uint32_t i = 0; i < len; i++)
        v |= (uint32_t)cfg_get(f, off + i) << (8 * i);
    return v;
}

static int overlaps(uint32_t off, uint32_t len, uint32_t start, uint32_t n)
{
    return off < start + n && start < off + len;
}

static uint32_t ones(uint32_t len)
{
    return len >= 4 ? 0xFFFFFFFFu : (1u << (8 * len)) - 1;
}

static uint32_t pba_bytes(uint32_t nvec)
{
    return (nvec + 63) / 64 * 8;
}

/* ---- builder ---- */

static uint32_t find_cap(const struct vfmig_pci_func *f, uint8_t id)
{
    uint32_t p = cfg_get(f, CFG_CAP_PTR) & 0xFCu;
    for (uint32_t hops = 0; p >= CFG_HEADER_END && hops < 48; hops++) {
        if (cfg_get(f, p) == id)
            return p;
        p = cfg_get(f, p + 1) & 0xFCu;
    }
    return 0;
}

/* Appends a capability of size bytes to the chain; returns its offset or -errno. */
static int add_cap(struct vfmig_pci_func *f, uint8_t id, uint32_t size, struct vfmig_err *err)
{
    uint32_t off = f->next_cap;
    if (off < CFG_HEADER_END || off + size > CFG_CAPS_END)
        return vfmig_fail(err, ENOSPC, "%s: no room for capability 0x%02x (%u bytes) at 0x%x", f->dev.name, id, size,
                          off);
    uint32_t last = 0;
    for (uint32_t p = f->config[CFG_CAP_PTR]; p; p = f->config[p + 1])
        last = p;
    f->config[off] = id;
    f->config[off + 1] = 0;
    if (last)
        f->config[last + 1] = (uint8_t)off;
    else
        f->config[CFG_CAP_PTR] = (uint8_t)off;
    f->next_cap = (uint16_t)((off + size + 3) & ~3u);
    return (int)off;
}

int vfmig_pci_func_init(struct vfmig_pci_func *f, struct vfmig_vm *vm, const char *name,
                        const struct vfmig_pci_ids *ids, struct vfmig_err *err)
{
    if (!f || !vm || !name || !ids)
        return vfmig_fail(err, EINVAL, "PCI function: missing function, VM, name or IDs");
    if (ids->vendor == 0xFFFFu || ids->vendor == 0)
        return vfmig_fail(err, EINVAL, "%s: vendor ID 0x%04x is not a valid vendor", name, ids->vendor);
    if (ids->class_code > 0xFFFFFFu)
        return vfmig_fail(err, EINVAL, "%s: class code 0x%x is wider than 24 bits", name, ids->class_code);
    memset(f, 0, sizeof(*f));
    f->vm = vm;
    f->dev.name = name;
    f->dev.space = VFMIG_SPACE_NONE; /* the host decodes its config space and BARs */
    for (uint32_t i = 0; i < VFMIG_PCI_MSIX_MAX; i++)
        f->irqfd[i] = -1;
    f->hs.ack_fd = -1;
    pthread_mutex_init(&f->msix_lock, NULL);
    pthread_mutex_init(&f->config_lock, NULL);

    le_put(f->config + CFG_VENDOR, ids->vendor, 2);
    le_put(f->config + CFG_DEVICE, ids->device, 2);
    le_put(f->config + CFG_STATUS, STATUS_CAP_LIST, 2);
    f->config[CFG_REVISION] = ids->revision;
    le_put(f->config + CFG_CLASS, ids->class_code, 3);
    f->config[CFG_HEADER_TYPE] = 0x00; /* type 0, single function */
    le_put(f->config + CFG_SUBSYS_VENDOR, ids->subsys_vendor, 2);
    le_put(f->config + CFG_SUBSYS, ids->subsys, 2);
    /* Interrupt pin 0: no INTx, MSI-X only. */

    le_put(f->wmask + CFG_COMMAND, CMD_WRITABLE, 2);
    le_put(f->w1cmask + CFG_STATUS, STATUS_RW1C, 2);
    f->wmask[CFG_CACHE_LINE] = 0xFF; /* PCIe keeps it read-write for legacy software */
    f->wmask[CFG_INT_LINE] = 0xFF;   /* firmware/OS scratch byte */
    f->next_cap = CFG_HEADER_END;
    return 0;
}

int vfmig_pci_add_bar(struct vfmig_pci_func *f, uint32_t bar, uint32_t size, vfmig_pci_bar_fn access,
                      struct vfmig_err *err)
{
    if (bar >= VFMIG_PCI_MAX_BARS)
        return vfmig_fail(err, EINVAL, "%s: BAR %u: there are %u BARs", f->dev.name, bar, VFMIG_PCI_MAX_BARS);
    if (f->bars[bar].size)
        return vfmig_fail(err, EEXIST, "%s: BAR %u was already added", f->dev.name, bar);
    if (size < 4096 || (size & (size - 1)) || size > VFMIG_PCI_MMIO_SIZE)
        return vfmig_fail(err, EINVAL, "%s: BAR %u size %u is not a power of two in 4 KiB..%u MiB", f->dev.name, bar,
                          size, VFMIG_PCI_MMIO_SIZE >> 20);
    f->bars[bar].size = size;
    f->bars[bar].access = access;
    atomic_store(&f->bars[bar].addr, 0);
    /* 32-bit non-prefetchable memory BAR: type bits 0; the address bits below the size read 0,
     * which is how the guest sizes it. */
    le_put(f->wmask + CFG_BAR0 + 4 * bar, ~(size - 1), 4);
    return 0;
}

int vfmig_pci_add_pcie_cap(struct vfmig_pci_func *f, struct vfmig_err *err)
{
    if (find_cap(f, CAP_ID_PCIE))
        return vfmig_fail(err, EEXIST, "%s: already has a PCI Express capability", f->dev.name);
    int c = add_cap(f, CAP_ID_PCIE, PCIE_CAP_SIZE, err);
    if (c < 0)
        return c;
    uint32_t o = (uint32_t)c;
    le_put(f->config + o + 0x02, 0x0002, 2);     /* capability version 2, PCI Express endpoint */
    le_put(f->config + o + 0x04, 0x00008000, 4); /* role-based error reporting; 128-byte payloads, no FLR */
    /* Device control after reset: relaxed ordering and no snoop enabled, 512-byte read requests.
     * Writable: error reporting enables, relaxed ordering, max payload, no snoop, max read
     * request. Extended tags, phantom functions, aux power and FLR are not supported: 0. */
    le_put(f->config + o + 0x08, 0x2810, 2);
    le_put(f->wmask + o + 0x08, 0x78FF, 2);
    le_put(f->w1cmask + o + 0x0A, 0x000F, 2);    /* device status: error detected bits */
    le_put(f->config + o + 0x0C, 0x00000011, 4); /* link: 2.5 GT/s, x1 */
    le_put(f->wmask + o + 0x10, 0x00C3, 2);      /* link control: ASPM, common clock, extended synch */
    le_put(f->config + o + 0x12, 0x0011, 2);     /* link status: 2.5 GT/s, x1 */
    le_put(f->config + o + 0x2C, 0x00000002, 4); /* supported link speeds: 2.5 GT/s */
    le_put(f->config + o + 0x30, 0x0001, 2);     /* target link speed, hardwired: 2.5 GT/s only */
    return 0;
}

static void msix_undo(struct vfmig_pci_func *f, struct vfmig_irq *irq, uint32_t n)
{
    for (uint32_t v = 0; v < n; v++) {
        vfmig_irq_irqfd(irq, f->irqfd[v], f->gsi[v], 0, NULL);
        close(f->irqfd[v]);
        f->irqfd[v] = -1;
        vfmig_irq_free_gsi(irq, f->gsi[v]);
    }
}

int vfmig_pci_add_msix(struct vfmig_pci_func *f, uint32_t nvec, uint32_t bar, uint32_t table_off,
                       uint32_t pba_off, struct vfmig_err *err)
{
    if (f->msix_cap)
        return vfmig_fail(err, EEXIST, "%s: already has MSI-X", f->dev.name);
    if (nvec < 1 || nvec > VFMIG_PCI_MSIX_MAX)
        return vfmig_fail(err, EINVAL, "%s: %u MSI-X vectors, expected 1..%u", f->dev.name, nvec, VFMIG_PCI_MSIX_MAX);
    if (bar >= VFMIG_PCI_MAX_BARS || !f->bars[bar].size || f->bars[bar].access)
        return vfmig_fail(err, EINVAL, "%s: MSI-X BAR %u must be added first, with no handler", f->dev.name, bar);
    uint64_t size = f->bars[bar].size, tlen = (uint64_t)nvec * MSIX_ENTRY_SIZE, plen = pba_bytes(nvec);
    if ((table_off | pba_off) & 7u)
        return vfmig_fail(err, EINVAL, "%s: MSI-X table and PBA offsets must be 8-byte aligned", f->dev.name);
    if (table_off + tlen > size || pba_off + plen > size)
        return vfmig_fail(err, EINVAL, "%s: MSI-X table or PBA does not fit in BAR %u (%llu bytes)", f->dev.name,
                          bar, (unsigned long long)size);
    if (overlaps(table_off, (uint32_t)tlen, pba_off, (uint32_t)plen))
        return vfmig_fail(err, EINVAL, "%s: MSI-X table and PBA overlap", f->dev.name);
    if (f->next_cap < CFG_HEADER_END || f->next_cap + MSIX_CAP_SIZE > CFG_CAPS_END)
        return vfmig_fail(err, ENOSPC, "%s: no room for the MSI-X capability", f->dev.name);
    struct vfmig_irq *irq;
    int r = vfmig_irq_get(f->vm, &irq, err);
    if (r < 0)
        return r;

    for (uint32_t v = 0; v < nvec; v++) {
        f->irqfd[v] = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (f->irqfd[v] < 0) {
            r = vfmig_fail(err, errno, "%s: eventfd for MSI-X vector %u: %s", f->dev.name, v, strerror(errno));
            msix_undo(f, irq, v);
            return r;
        }
        int have_gsi = 0;
        if ((r = vfmig_irq_alloc_gsi(irq, &f->gsi[v], err)) < 0 || !(have_gsi = 1) ||
            (r = vfmig_irq_irqfd(irq, f->irqfd[v], f->gsi[v], 1, err)) < 0) {
            close(f->irqfd[v]);
            f->irqfd[v] = -1;
            if (have_gsi)
                vfmig_irq_free_gsi(irq, f->gsi[v]);
            msix_undo(f, irq, v);
            return r;
        }
    }
    uint32_t c = (uint32_t)add_cap(f, CAP_ID_MSIX, MSIX_CAP_SIZE, err); /* room checked above */
    le_put(f->config + c + MSIX_CTRL, nvec - 1, 2);
    le_put(f->config + c + MSIX_TABLE, table_off | bar, 4);
    le_put(f->config + c + MSIX_PBA, pba_off | bar, 4);
    le_put(f->wmask + c + MSIX_CTRL, MSIX_ENABLE | MSIX_MASKALL, 2);
    f->msix_cap = (uint16_t)c;
    f->msix_nvec = nvec;
    f->msix_bar = bar;
    f->msix_table_off = table_off;
    f->msix_pba_off = pba_off;
    for (uint32_t v = 0; v < nvec; v++)
        f->msix[v] = (struct vfmig_pci_msix_entry){.ctrl = MSIX_VEC_MASKED}; /* masked after reset */
    f->msix_pba = 0;
    return 0;
}

int vfmig_pci_add_migcap(struct vfmig_pci_func *f, struct vfmig_err *err)
{
    if (f->migcap)
        return vfmig_fail(err, EEXIST, "%s: already has the migration capability", f->dev.name);
    /* Non-blocking: the handshake drains it with reads that must not wait. */
    int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (fd < 0)
        return vfmig_fail(err, errno, "%s: eventfd for the migration handshake: %s", f->dev.name, strerror(errno));
    int c = add_cap(f, VFMIG_PCI_CAP_ID_VNDR, VFMIG_MIGCAP_SIZE, err);
    if (c < 0) {
        close(fd);
        return c;
    }
    f->hs.ack_fd = fd;
    uint32_t o = (uint32_t)c;
    f->config[o + 2] = VFMIG_MIGCAP_SIZE; /* a vendor-specific capability's length byte */
    le_put(f->config + o + VFMIG_MIGCAP_SIG, VFMIG_MIGCAP_SIGNATURE, 4);
    f->wmask[o + VFMIG_MIGCAP_CTRL] = VFMIG_MIGCAP_ENABLE;
    f->wmask[o + VFMIG_MIGCAP_IRQ] = 0xFF; /* range-checked on write: see config_write */
    f->wmask[o + VFMIG_MIGCAP_DEV_STATUS] = VFMIG_DEV_ACK;
    /* VMM_STATUS: wmask 0; only vfmig_pci_migcap_update changes it. */
    f->migcap = (uint16_t)o;
    return 0;
}

/* ---- BAR decode and doorbells ---- */

/* Moves every doorbell's ioeventfd to where its BAR decodes now. config_lock held (or the
 * builder); blocks in KVM_IOEVENTFD. A registration KVM refuses (another ioeventfd already at
 * that address: overlapping BARs) leaves the doorbell unregistered, so its writes reach the
 * BAR handler as ordinary MMIO instead. */
static void move_doorbells(struct vfmig_pci_func *f)
{
    for (uint32_t i = 0; i < f->ndoorbells; i++) {
        struct vfmig_pci_doorbell *db = &f->doorbells[i];
        uint64_t base = atomic_load(&f->bars[db->bar].addr);
        uint64_t want = base ? base + db->off : 0;
        if (want == db->at)
            continue;
        if (db->at)
            vfmig_irq_ioeventfd(f->vm->irq, db->at, db->fd, NULL, 0, NULL);
        db->at = 0;
        if (want && vfmig_irq_ioeventfd(f->vm->irq, want, db->fd, NULL, 1, NULL) == 0)
            db->at = want;
    }
}

/* A BAR decodes when memory space is on and the whole BAR lies inside the window (the address
 * is then nonzero). config_lock held; blocks while doorbells move. */
static void update_decode(struct vfmig_pci_func *f)
{
    uint32_t cmd = cfg_le(f, CFG_COMMAND, 2);
    for (uint32_t b = 0; b < VFMIG_PCI_MAX_BARS; b++) {
        uint32_t size = f->bars[b].size;
        if (!size)
            continue;
        uint32_t base = cfg_le(f, CFG_BAR0 + 4 * b, 4) & ~0xFu;
        uint64_t at = 0;
        if ((cmd & CMD_MEM) && base >= VFMIG_PCI_MMIO_BASE && base - VFMIG_PCI_MMIO_BASE <= VFMIG_PCI_MMIO_SIZE - size)
            at = base;
        atomic_store(&f->bars[b].addr, at);
    }
    move_doorbells(f);
}

int vfmig_pci_add_doorbell(struct vfmig_pci_func *f, uint32_t bar, uint32_t off, int fd, struct vfmig_err *err)
{
    if (f->ndoorbells == VFMIG_PCI_MAX_DOORBELLS)
        return vfmig_fail(err, ENOSPC, "%s: at most %u doorbells", f->dev.name, VFMIG_PCI_MAX_DOORBELLS);
    if (bar >= VFMIG_PCI_MAX_BARS || !f->bars[bar].size || !f->bars[bar].access)
        return vfmig_fail(err, EINVAL, "%s: doorbell BAR %u must be a BAR with a handler", f->dev.name, bar);
    if ((off & 3u) || off > f->bars[bar].size - 4)
        return vfmig_fail(err, EINVAL, "%s: doorbell at BAR %u + 0x%x is not an aligned word inside it", f->dev.name,
                          bar, off);
    if (fd < 0)
        return vfmig_fail(err, EBADF, "%s: doorbell fd %d", f->dev.name, fd);
    for (uint32_t i = 0; i < f->ndoorbells; i++)
        if (f->doorbells[i].bar == bar && f->doorbells[i].off == off)
            return vfmig_fail(err, EEXIST, "%s: BAR %u + 0x%x already has a doorbell", f->dev.name, bar, off);
    struct vfmig_irq *irq;
    int r = vfmig_irq_get(f->vm, &irq, err);
    if (r < 0)
        return r;
    pthread_mutex_lock(&f->config_lock);
    f->doorbells[f->ndoorbells++] = (struct vfmig_pci_doorbell){.bar = bar, .off = off, .fd = fd, .at = 0};
    move_doorbells(f);
    pthread_mutex_unlock(&f->config_lock);
    return 0;
}

/* ---- MSI-X ---- */

/* msix_lock held. Message control lives in config space; its writers hold both locks. */
static int msix_vec_deliverable(struct vfmig_pci_func *f, uint32_t v)
{
    uint32_t ctrl = cfg_le(f, f->msix_cap + MSIX_CTRL, 2);
    return (ctrl & MSIX_ENABLE) && !(ctrl & MSIX_MASKALL) && !(f->msix[v].ctrl & MSIX_VEC_MASKED) &&
           vfmig_irq_route_ready(f->vm->irq, f->gsi[v]);
}

/* bus << 8 | dev << 3 | fn, as the probes name a function: bus 0, function 0 (pci.h). Marked
 * unused: only the probes use it, and they vanish without sys/sdt.h. */
__attribute__((unused)) static uint32_t func_bdf(const struct vfmig_pci_func *f)
{
    return f->devfn;
}

/* msix_lock held; an eventfd write never blocks (KVM consumes the count at once). Every
 * message the function sends goes through here, pending ones too, so the probe and the
 * counter see each one. */
static int msix_signal(struct vfmig_pci_func *f, uint32_t v)
{
    uint64_t one = 1;
    VFMIG_USDT(msix_raise, func_bdf(f), v, ((uint64_t)f->msix[v].addr_hi << 32 | f->msix[v].addr_lo),
               f->msix[v].data);
    if (write(f->irqfd[v], &one, sizeof(one)) != (ssize_t)sizeof(one))
        return 0;
    atomic_fetch_add_explicit(&f->msix_sent[v], 1, memory_order_relaxed);
    return 1;
}

/* Sends what became deliverable: unmasked, enabled, and its route in KVM. msix_lock held. */
static void msix_deliver_pending(struct vfmig_pci_func *f)
{
    for (uint32_t v = 0; v < f->msix_nvec; v++)
        if ((f->msix_pba & (1u << v)) && msix_vec_deliverable(f, v) && msix_signal(f, v))
            f->msix_pba &= ~(1u << v);
}

/* Routes every unmasked vector to its table entry. msix_lock held; never blocks. 1 if a
 * commit is due. */
static int msix_route_unmasked(struct vfmig_pci_func *f, uint32_t first, uint32_t last)
{
    int due = 0;
    for (uint32_t v = first; v <= last && v < f->msix_nvec; v++) {
        const struct vfmig_pci_msix_entry *e = &f->msix[v];
        if (!(e->ctrl & MSIX_VEC_MASKED) &&
            vfmig_irq_set_msi(f->vm->irq, f->gsi[v], (uint64_t)e->addr_hi << 32 | e->addr_lo, e->data) > 0)
            due = 1;
    }
    return due;
}

/* Commits routes outside msix_lock (it blocks), then sends what was waiting for them. */
static int msix_commit(struct vfmig_pci_func *f, struct vfmig_err *err)
{
    int r = vfmig_irq_commit(f->vm->irq, err);
    pthread_mutex_lock(&f->msix_lock);
    msix_deliver_pending(f);
    pthread_mutex_unlock(&f->msix_lock);
    return r;
}

static uint32_t *entry_word(struct vfmig_pci_msix_entry *e, uint32_t w)
{
    switch (w) {
    case 0: return &e->addr_lo;
    case 1: return &e->addr_hi;
    case 2: return &e->data;
    default: return &e->ctrl;
    }
}

/* Guest-writable bits of each entry word: the address is dword aligned; of vector control
 * only the mask bit exists. */
static const uint32_t entry_wmask[4] = {0xFFFFFFFCu, 0xFFFFFFFFu, 0xFFFFFFFFu, MSIX_VEC_MASKED};

/* The MSI-X BAR: table (16 bytes a vector), PBA (read-only), reserved space reads 0. vCPU
 * thread, no lock held on entry; takes msix_lock; a table write that changes a route blocks
 * in the routing commit. 0, or -errno when KVM refused the routing table. */
static int msix_access(struct vfmig_pci_func *f, uint64_t off, uint8_t *data, uint32_t len, int is_write)
{
    uint64_t tend = f->msix_table_off + (uint64_t)f->msix_nvec * MSIX_ENTRY_SIZE;
    uint64_t pend = f->msix_pba_off + (uint64_t)pba_bytes(f->msix_nvec);
    if (off >= f->msix_pba_off && off + len <= pend) {
        if (!is_write) {
            pthread_mutex_lock(&f->msix_lock);
            uint64_t pba = f->msix_pba;
            pthread_mutex_unlock(&f->msix_lock);
            le_put(data, pba >> (8 * (off - f->msix_pba_off)), len);
        }
        return 0;
    }
    if (!(off >= f->msix_table_off && off + len <= tend)) {
        if (!is_write)
            memset(data, 0, len);
        return 0;
    }
    uint32_t rel = (uint32_t)(off - f->msix_table_off);
    pthread_mutex_lock(&f->msix_lock);
    for (uint32_t i = 0; i < len; i++) {
        uint32_t b = rel + i, sh = 8 * (b % 4);
        uint32_t *w = entry_word(&f->msix[b / MSIX_ENTRY_SIZE], b % MSIX_ENTRY_SIZE / 4);
        if (!is_write) {
            data[i] = (uint8_t)(*w >> sh);
            continue;
        }
        uint32_t m = entry_wmask[b % MSIX_ENTRY_SIZE / 4] & (0xFFu << sh);
        *w = (*w & ~m) | ((uint32_t)data[i] << sh & m);
    }
    int due = 0;
    if (is_write) {
        due = msix_route_unmasked(f, rel / MSIX_ENTRY_SIZE, (rel + len - 1) / MSIX_ENTRY_SIZE);
        msix_deliver_pending(f);
    }
    pthread_mutex_unlock(&f->msix_lock);
    return due ? msix_commit(f, NULL) : 0;
}

int vfmig_pci_msix_notify(struct vfmig_pci_func *f, uint32_t vec)
{
    if (vec >= f->msix_nvec)
        return -EINVAL;
    pthread_mutex_lock(&f->msix_lock);
    int sent = msix_vec_deliverable(f, vec) && msix_signal(f, vec);
    if (!sent)
        f->msix_pba |= 1u << vec;
    pthread_mutex_unlock(&f->msix_lock);
    return sent;
}

uint32_t vfmig_pci_msix_counts(const struct vfmig_pci_func *f, uint64_t *out, uint32_t cap)
{
    for (uint32_t v = 0; v < f->msix_nvec && v < cap; v++)
        out[v] = atomic_load_explicit(&f->msix_sent[v], memory_order_relaxed);
    return f->msix_nvec;
}

/* ---- config space ---- */

uint32_t vfmig_pci_config_read(struct vfmig_pci_func *f, uint32_t off, uint32_t len)
{
    if ((len != 1 && len != 2 && len != 4) || off > VFMIG_PCI_CONFIG_SIZE - len)
        return ones(len);
    pthread_mutex_lock(&f->config_lock);
    uint32_t v = cfg_le(f, off, len);
    pthread_mutex_unlock(&f->config_lock);
    return v;
}

static void hs_note_ack(struct vfmig_pci_func *f);

/* A guest config write: each byte becomes (old & ~wmask) | (val & wmask), then the RW1C bits
 * written as 1 clear. The migration capability's IRQ byte keeps its old value when the new
 * one is not a vector of this function; a write of DEV_STATUS with ACK while a handshake is
 * armed is its ack. vCPU thread; takes config_lock (and msix_lock around MSI-X message
 * control); blocks when a BAR or memory decode change moves doorbells. */
static void config_write(struct vfmig_pci_func *f, uint32_t off, uint32_t val, uint32_t len)
{
    if (len < 1 || len > 4 || off > VFMIG_PCI_CONFIG_SIZE - len)
        return;
    pthread_mutex_lock(&f->config_lock);
    int msix_ctrl = f->msix_cap && overlaps(off, len, f->msix_cap + MSIX_CTRL, 2);
    if (msix_ctrl)
        pthread_mutex_lock(&f->msix_lock);
    for (uint32_t i = 0; i < len; i++) {
        uint32_t o = off + i;
        uint8_t v = (uint8_t)(val >> (8 * i)), old = cfg_get(f, o);
        uint8_t nv = (uint8_t)((old & ~f->wmask[o]) | (v & f->wmask[o]));
        nv &= (uint8_t)~(v & f->w1cmask[o]);
        if (f->migcap && o == f->migcap + VFMIG_MIGCAP_IRQ && nv >= f->msix_nvec)
            nv = old;
        cfg_set(f, o, nv);
    }
    if (msix_ctrl) {
        msix_deliver_pending(f); /* enable or function unmask sends what was pending */
        pthread_mutex_unlock(&f->msix_lock);
    }
    uint32_t ds = f->migcap + VFMIG_MIGCAP_DEV_STATUS;
    if (f->migcap && overlaps(off, len, ds, 1) && (val >> (8 * (ds - off)) & VFMIG_DEV_ACK) &&
        atomic_load(&f->hs.armed))
        hs_note_ack(f);
    if (overlaps(off, len, CFG_COMMAND, 2) || overlaps(off, len, CFG_BAR0, 4 * VFMIG_PCI_MAX_BARS))
        update_decode(f);
    if (f->config_written)
        f->config_written(f, off, len);
    pthread_mutex_unlock(&f->config_lock);
}

void vfmig_pci_migcap_update(struct vfmig_pci_func *f, uint8_t set_bits, uint8_t clear_bits)
{
    if (!f->migcap)
        return;
    uint32_t o = f->migcap + VFMIG_MIGCAP_VMM_STATUS;
    pthread_mutex_lock(&f->config_lock);
    cfg_set(f, o, (uint8_t)((cfg_get(f, o) & ~clear_bits) | set_bits)); /* a bit in both ends set */
    pthread_mutex_unlock(&f->config_lock);
}

uint8_t vfmig_pci_migcap_reg(struct vfmig_pci_func *f, uint32_t reg)
{
    if (!f->migcap || reg >= VFMIG_MIGCAP_SIZE)
        return 0;
    return (uint8_t)vfmig_pci_config_read(f, f->migcap + reg, 1);
}

/* ---- the guest handshake (pci.h) ---- */

/* The first ack of an arming: its time, and a wake-up for the waiting handshake. vCPU thread,
 * config_lock held (the config-write path); the eventfd write never blocks. Later acks of the
 * same arming find acked_ns set and change nothing, so a driver that repeats its ack can
 * neither move the recorded time nor wake the waiter again. */
static void hs_note_ack(struct vfmig_pci_func *f)
{
    uint64_t none = 0, now = vfmig_now_ns();
    if (!atomic_compare_exchange_strong(&f->hs.acked_ns, &none, now ? now : 1))
        return;
    VFMIG_USDT(handshake_ack, func_bdf(f));
    uint64_t one = 1;
    if (write(f->hs.ack_fd, &one, sizeof(one)) < 0) {
        /* Cannot fail on a valid eventfd; the waiter reads acked_ns after every wake-up anyway. */
    }
}

/* Empties the eventfd (non-blocking): a count left from an earlier arming must not wake a
 * later wait. Any thread, no lock needed. */
static void hs_drain(int fd)
{
    uint64_t v;
    while (read(fd, &v, sizeof(v)) == (ssize_t)sizeof(v)) {
    }
}

static uint32_t hs_latency_us(uint64_t from, uint64_t to)
{
    uint64_t us = to > from ? (to - from) / 1000 : 0;
    return us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
}

/* Takes m, but gives up at deadline_ns (CLOCK_MONOTONIC). Polls with trylock: portable to every
 * sanitizer build, and the wait is short. 1 if taken. */
static int lock_until(pthread_mutex_t *m, uint64_t deadline_ns)
{
    while (pthread_mutex_trylock(m) != 0) {
        if (vfmig_now_ns() >= deadline_ns)
            return 0;
        nanosleep(&(struct timespec){.tv_nsec = 20000}, NULL);
    }
    return 1;
}

int vfmig_pci_handshake(struct vfmig_pci_func *f, uint64_t deadline_ns, struct vfmig_prestop_result *out)
{
    uint64_t t0 = vfmig_now_ns();
    *out = (struct vfmig_prestop_result){.outcome = VFMIG_HS_DISABLED, .start_ns = t0, .end_ns = t0};
    if (!f->migcap) /* migration=off: no register to tell the guest with; the outcome stays NONE */
        return 0;
    uint32_t o = f->migcap;
    /* Arming needs config_lock, which a guest writing config space in a loop can keep busy (a
     * BAR or decode change holds it across KVM ioctls): take it only until the deadline. Not
     * armed by then: no notice went out, the guest is treated as not quiesced. */
    if (!lock_until(&f->config_lock, deadline_ns)) {
        atomic_store(&f->hs.outcome, VFMIG_HS_DISABLED);
        atomic_store(&f->hs.latency_us, 0);
        out->end_ns = vfmig_now_ns();
        return 0;
    }
    t0 = vfmig_now_ns();
    /* Without MSI-X there is no vector to raise; a deadline already past leaves no time to
     * answer. Either way no notice goes out, so nothing needs undoing later. */
    if (!(cfg_get(f, o + VFMIG_MIGCAP_CTRL) & VFMIG_MIGCAP_ENABLE) || !f->msix_nvec || t0 >= deadline_ns) {
        f->hs.outcome = VFMIG_HS_DISABLED;
        f->hs.latency_us = 0;
        pthread_mutex_unlock(&f->config_lock);
        return 0;
    }
    /* Armed in one critical section with the config-write path, so an ack is either before all
     * of this (and erased here) or after it (and counted); never half. */
    cfg_set(f, o + VFMIG_MIGCAP_DEV_STATUS, 0);
    cfg_set(f, o + VFMIG_MIGCAP_VMM_STATUS, VFMIG_VMM_MIGRATING);
    hs_drain(f->hs.ack_fd);
    atomic_store(&f->hs.acked_ns, 0);
    atomic_store(&f->hs.armed, 1);
    f->hs.notified = 1;
    f->hs.post_load = 0;
    f->hs.outcome = VFMIG_HS_NONE; /* under way */
    f->hs.latency_us = 0;
    f->hs.deadline_ns = deadline_ns;
    f->hs.raised_ns = vfmig_now_ns();
    uint32_t vec = cfg_get(f, o + VFMIG_MIGCAP_IRQ); /* < msix_nvec: config_write and check keep it so */
    /* Before the unlock: a guest that polls VMM_STATUS may ack as soon as it is released. */
    VFMIG_USDT(handshake_raise, func_bdf(f), vec, deadline_ns);
    pthread_mutex_unlock(&f->config_lock);
    vfmig_pci_msix_notify(f, vec); /* msix_lock briefly; masked: pending in the PBA, as hardware */

    /* No lock held from here: the vCPU that writes the ack takes config_lock, the interrupt
     * path msix_lock. ppoll, not poll: its nanosecond timeout ends the wait at the deadline
     * instead of up to 1 ms after it. */
    struct pollfd pfd = {.fd = f->hs.ack_fd, .events = POLLIN};
    for (;;) {
        if (atomic_load(&f->hs.acked_ns))
            break;
        uint64_t now = vfmig_now_ns();
        if (now >= deadline_ns)
            break;
        uint64_t left = deadline_ns - now;
        struct timespec ts = {.tv_sec = (time_t)(left / 1000000000ull), .tv_nsec = (long)(left % 1000000000ull)};
        int r = ppoll(&pfd, 1, &ts, NULL);
        if (r > 0)
            hs_drain(f->hs.ack_fd); /* acked_ns, checked next round, says whether it was the ack */
        else if (r < 0 && errno != EINTR)
            nanosleep(&(struct timespec){.tv_nsec = left < 1000000 ? (long)left : 1000000}, NULL);
    }
    uint64_t acked = atomic_load(&f->hs.acked_ns);
    /* No lock from here either: a guest hammering config space holds config_lock often enough
     * to keep a woken waiter from it for milliseconds (mutexes are not fair). raised_ns was
     * written by this thread. An ack stamped after the deadline is a timeout for now;
     * stopped() makes it LATE. */
    int in_time = acked && acked <= deadline_ns;
    out->outcome = in_time ? VFMIG_HS_ACKED : VFMIG_HS_TIMEOUT;
    out->latency_us = in_time ? hs_latency_us(f->hs.raised_ns, acked) : 0;
    atomic_store(&f->hs.latency_us, out->latency_us);
    atomic_store(&f->hs.outcome, out->outcome);
    VFMIG_USDT(handshake_end, func_bdf(f), out->outcome, (uint64_t)out->latency_us);
    out->end_ns = vfmig_now_ns();
    return 0;
}

void vfmig_pci_handshake_stopped(struct vfmig_pci_func *f)
{
    if (!f->migcap)
        return;
    pthread_mutex_lock(&f->config_lock);
    uint64_t acked = atomic_load(&f->hs.acked_ns);
    if (f->hs.outcome == VFMIG_HS_TIMEOUT && acked) {
        f->hs.outcome = VFMIG_HS_LATE;
        f->hs.latency_us = hs_latency_us(f->hs.raised_ns, acked);
        VFMIG_USDT(handshake_end, func_bdf(f), (uint32_t)VFMIG_HS_LATE, (uint64_t)f->hs.latency_us);
    }
    atomic_store(&f->hs.armed, 0);
    pthread_mutex_unlock(&f->config_lock);
}

void vfmig_pci_handshake_abort(struct vfmig_pci_func *f)
{
    if (!f->migcap)
        return;
    uint32_t o = f->migcap;
    pthread_mutex_lock(&f->config_lock);
    int raise = f->hs.notified;
    if (raise) {
        /* Both registers back to idle: a stale ack must not answer the next notice. */
        cfg_set(f, o + VFMIG_MIGCAP_VMM_STATUS, 0);
        cfg_set(f, o + VFMIG_MIGCAP_DEV_STATUS, 0);
        f->hs.notified = 0;
    }
    atomic_store(&f->hs.armed, 0);
    f->hs.outcome = VFMIG_HS_NONE;
    f->hs.latency_us = 0;
    uint32_t vec = cfg_get(f, o + VFMIG_MIGCAP_IRQ);
    pthread_mutex_unlock(&f->config_lock);
    if (raise && vec < f->msix_nvec)
        vfmig_pci_msix_notify(f, vec);
}

void vfmig_pci_handshake_loaded(struct vfmig_pci_func *f)
{
    if (!f->migcap)
        return;
    uint32_t o = f->migcap;
    pthread_mutex_lock(&f->config_lock);
    atomic_store(&f->hs.armed, 0);
    f->hs.notified = 0;
    if (cfg_get(f, o + VFMIG_MIGCAP_CTRL) & VFMIG_MIGCAP_ENABLE) {
        /* Only an ack proves the driver quiesced: NONE and DISABLED (never told), TIMEOUT and
         * LATE (told, not quiesced by the stop) all need its reset path. */
        uint8_t st = VFMIG_VMM_MIGRATED | (f->hs.outcome == VFMIG_HS_ACKED ? 0 : VFMIG_VMM_RESET_REQUIRED);
        cfg_set(f, o + VFMIG_MIGCAP_VMM_STATUS, st);
        cfg_set(f, o + VFMIG_MIGCAP_DEV_STATUS, 0);
        cfg_set(f, o + VFMIG_MIGCAP_LOADS, (uint8_t)(cfg_get(f, o + VFMIG_MIGCAP_LOADS) + 1));
        f->hs.post_load = 1;
    }
    pthread_mutex_unlock(&f->config_lock);
}

void vfmig_pci_handshake_started(struct vfmig_pci_func *f)
{
    if (!f->migcap)
        return;
    pthread_mutex_lock(&f->config_lock);
    int raise = f->hs.post_load;
    f->hs.post_load = 0;
    uint32_t vec = cfg_get(f, f->migcap + VFMIG_MIGCAP_IRQ);
    pthread_mutex_unlock(&f->config_lock);
    if (raise && vec < f->msix_nvec)
        vfmig_pci_msix_notify(f, vec);
}

/* ---- the host ---- */

static struct vfmig_pci_func *host_func(struct vfmig_pci_host *h, uint32_t latch)
{
    if (!(latch & 0x80000000u) || (latch >> 16 & 0xFFu) != 0 || (latch >> 8 & 7u) != 0)
        return NULL; /* disabled, another bus, or a function other than 0: nothing answers */
    return atomic_load(&h->funcs[latch >> 11 & 31u]);
}

/* 0xCF8: CONFIG_ADDRESS, dword accesses only (reserved bits 30:24 and 1:0 read 0; other sizes
 * are not this register). 0xCFC..0xCFF: CONFIG_DATA for the latched register, an access that
 * runs past 0xCFF is not decoded. Nothing answering reads all-ones; writes are dropped. vCPU
 * thread, no lock held; takes the function's config_lock. */
static int host_pio(struct vfmig_device *d, struct vfmig_vcpu *cpu, uint64_t addr, uint8_t *data, uint32_t len,
                    int is_write)
{
    (void)cpu;
    struct vfmig_pci_host *h = d->opaque;
    uint32_t port = (uint32_t)(addr - VFMIG_PCI_CONFIG_ADDR);
    if (port < 4) {
        if (port == 0 && len == 4) {
            if (is_write)
                atomic_store(&h->latch, (uint32_t)le_get(data, 4) & 0x80FFFFFCu);
            else
                le_put(data, atomic_load(&h->latch), 4);
        } else if (!is_write) {
            memset(data, 0xFF, len);
        }
        return 0;
    }
    uint32_t k = port - 4, latch = atomic_load(&h->latch);
    struct vfmig_pci_func *f = len <= 4 && k + len <= 4 ? host_func(h, latch) : NULL;
    if (!f) {
        if (!is_write)
            memset(data, 0xFF, len);
        return 0;
    }
    uint32_t reg = (latch & 0xFCu) + k;
    if (is_write)
        config_write(f, reg, (uint32_t)le_get(data, len), len);
    else
        le_put(data, vfmig_pci_config_read(f, reg, len), len);
    return 0;
}

/* The BAR window: the first decoding BAR that holds the whole access gets it, as an offset.
 * vCPU thread, no lock held (BAR addresses are atomics); the handler runs unlocked. */
static int host_mmio(struct vfmig_device *d, struct vfmig_vcpu *cpu, uint64_t addr, uint8_t *data, uint32_t len,
                     int is_write)
{
    struct vfmig_pci_host *h = d->opaque;
    for (uint32_t n = 0; n < VFMIG_PCI_MAX_FUNCS; n++) {
        struct vfmig_pci_func *f = atomic_load(&h->funcs[n]);
        if (!f)
            continue;
        for (uint32_t b = 0; b < VFMIG_PCI_MAX_BARS; b++) {
            uint64_t at = atomic_load(&f->bars[b].addr), size = f->bars[b].size;
            if (!at || addr < at || addr - at >= size)
                continue;
            uint64_t off = addr - at;
            if (off + len > size)
                break; /* straddles the BAR's end: not decoded */
            if (f->bars[b].access)
                return f->bars[b].access(f, cpu, off, data, len, is_write);
            if (f->msix_cap && b == f->msix_bar)
                return msix_access(f, off, data, len, is_write);
            if (!is_write) /* a handler-less BAR without MSI-X: nothing behind it */
                memset(data, 0, len);
            return 0;
        }
    }
    if (!is_write)
        memset(data, 0xFF, len);
    return 0;
}

/* The latched CONFIG_ADDRESS is guest state: a vCPU can stop between its outl and inl. */
static long host_save(struct vfmig_device *d, uint8_t *buf, size_t cap)
{
    struct vfmig_pci_host *h = d->opaque;
    if (cap < 4)
        return -ENOSPC;
    le_put(buf, atomic_load(&h->latch), 4);
    return 4;
}

static int host_load(struct vfmig_device *d, const uint8_t *buf, size_t len)
{
    struct vfmig_pci_host *h = d->opaque;
    if (len != 4)
        return -EINVAL;
    uint32_t v = (uint32_t)le_get(buf, 4);
    if (v & ~0x80FFFFFCu)
        return -EINVAL; /* reserved bits the register never holds */
    atomic_store(&h->latch, v);
    return 0;
}

int vfmig_pci_attach(struct vfmig_vm *vm, struct vfmig_pci_func *f, struct vfmig_err *err)
{
    if (f->vm != vm)
        return vfmig_fail(err, EINVAL, "%s was built for another VM", f->dev.name);
    struct vfmig_pci_host *h = vm->pci;
    uint32_t need = h ? 1 : 3;
    if (vm->ndevices + need > VFMIG_MAX_DEVICES)
        return vfmig_fail(err, ENOSPC, "%s: the VM has room for %u devices", f->dev.name, VFMIG_MAX_DEVICES);
    if (vfmig_vm_find_device(vm, f->dev.name) || (!h && (vfmig_vm_find_device(vm, "pci-host") ||
                                                          vfmig_vm_find_device(vm, "pci-mmio"))))
        return vfmig_fail(err, EEXIST, "%s: a device of that name (or of the PCI host's) exists", f->dev.name);
    uint32_t slot = 0;
    while (h && slot < VFMIG_PCI_MAX_FUNCS && atomic_load(&h->funcs[slot]))
        slot++;
    if (slot == VFMIG_PCI_MAX_FUNCS)
        return vfmig_fail(err, ENOSPC, "%s: bus 0 is full", f->dev.name);
    if (!h) {
        h = calloc(1, sizeof(*h));
        if (!h)
            return vfmig_fail(err, ENOMEM, "out of memory for the PCI host");
        h->vm = vm;
        h->pio = (struct vfmig_device){.name = "pci-host", .space = VFMIG_SPACE_PIO, .base = VFMIG_PCI_CONFIG_ADDR,
                                       .len = 8, .opaque = h, .access = host_pio, .save = host_save,
                                       .load = host_load};
        h->mmio = (struct vfmig_device){.name = "pci-mmio", .space = VFMIG_SPACE_MMIO, .base = VFMIG_PCI_MMIO_BASE,
                                        .len = VFMIG_PCI_MMIO_SIZE, .opaque = h, .access = host_mmio};
        vm->pci = h;
        /* Room and names were checked above, so neither add fails. */
        vfmig_vm_add_device(vm, &h->pio);
        vfmig_vm_add_device(vm, &h->mmio);
    }
    f->devfn = (uint8_t)(slot << 3);
    int r = vfmig_vm_add_device(vm, &f->dev);
    if (r < 0)
        return vfmig_fail(err, -r, "%s: %s", f->dev.name, vm->err.msg);
    atomic_store(&h->funcs[slot], f);
    return 0;
}

void vfmig_pci_func_release(struct vfmig_pci_func *f)
{
    if (!f || !f->vm)
        return;
    struct vfmig_vm *vm = f->vm;
    struct vfmig_pci_host *h = vm->pci;
    if (h && atomic_load(&h->funcs[f->devfn >> 3]) == f)
        atomic_store(&h->funcs[f->devfn >> 3], NULL);
    for (uint32_t i = 0; i < f->ndoorbells; i++) {
        struct vfmig_pci_doorbell *db = &f->doorbells[i];
        if (db->at)
            vfmig_irq_ioeventfd(vm->irq, db->at, db->fd, NULL, 0, NULL);
        db->at = 0;
    }
    if (f->msix_nvec) {
        msix_undo(f, vm->irq, f->msix_nvec);
        vfmig_irq_commit(vm->irq, NULL); /* drop the routes from KVM */
    }
    if (f->hs.ack_fd >= 0)
        close(f->hs.ack_fd);
    f->hs.ack_fd = -1;
    pthread_mutex_destroy(&f->msix_lock);
    pthread_mutex_destroy(&f->config_lock);
    f->vm = NULL;
}

void vfmig_pci_host_destroy(struct vfmig_vm *vm)
{
    free(vm->pci);
    vm->pci = NULL;
}

/* ---- migration state ---- */

size_t vfmig_pci_state_size(const struct vfmig_pci_func *f)
{
    return STATE_HEADER + VFMIG_PCI_CONFIG_SIZE + (size_t)f->msix_nvec * MSIX_ENTRY_SIZE +
           (f->msix_nvec ? pba_bytes(f->msix_nvec) : 0);
}

long vfmig_pci_save(struct vfmig_pci_func *f, uint8_t *buf, size_t cap)
{
    size_t size = vfmig_pci_state_size(f);
    if (cap < size)
        return -ENOSPC;
    memset(buf, 0, STATE_HEADER);
    le_put(buf + 0, STATE_MAGIC, 4);
    le_put(buf + 4, STATE_VERSION, 2);
    le_put(buf + 6, STATE_HEADER, 2);
    le_put(buf + 8, VFMIG_PCI_CONFIG_SIZE, 4);
    le_put(buf + 12, f->msix_nvec, 2);
    for (uint32_t b = 0; b < VFMIG_PCI_MAX_BARS; b++)
        le_put(buf + 16 + 4 * b, f->bars[b].size, 4);
    uint8_t *p = buf + STATE_HEADER;
    pthread_mutex_lock(&f->config_lock);
    le_put(buf + STATE_HS_OUTCOME, f->hs.outcome, 4);
    le_put(buf + STATE_HS_LATENCY, f->hs.latency_us, 4);
    pthread_mutex_lock(&f->msix_lock);
    for (uint32_t o = 0; o < VFMIG_PCI_CONFIG_SIZE; o++)
        p[o] = cfg_get(f, o);
    p += VFMIG_PCI_CONFIG_SIZE;
    for (uint32_t v = 0; v < f->msix_nvec; v++, p += MSIX_ENTRY_SIZE)
        for (uint32_t w = 0; w < 4; w++)
            le_put(p + 4 * w, *entry_word(&f->msix[v], w), 4);
    if (f->msix_nvec)
        le_put(p, f->msix_pba, pba_bytes(f->msix_nvec));
    pthread_mutex_unlock(&f->msix_lock);
    pthread_mutex_unlock(&f->config_lock);
    return (long)size;
}

struct field {
    uint8_t off, len;
    const char *name;
};

static const struct field header_fields[] = {
    {0x00, 2, "vendor ID"}, {0x02, 2, "device ID"}, {0x04, 2, "command"}, {0x06, 2, "status"},
    {0x08, 1, "revision ID"}, {0x09, 3, "class code"}, {0x0C, 1, "cache line size"}, {0x0D, 1, "latency timer"},
    {0x0E, 1, "header type"}, {0x0F, 1, "BIST"}, {0x10, 4, "BAR 0"}, {0x14, 4, "BAR 1"}, {0x18, 4, "BAR 2"},
    {0x1C, 4, "BAR 3"}, {0x20, 4, "BAR 4"}, {0x24, 4, "BAR 5"}, {0x28, 4, "CardBus CIS pointer"},
    {0x2C, 2, "subsystem vendor ID"}, {0x2E, 2, "subsystem ID"}, {0x30, 4, "expansion ROM BAR"},
    {0x34, 1, "capabilities pointer"}, {0x3C, 1, "interrupt line"}, {0x3D, 1, "interrupt pin"},
    {0x3E, 1, "min grant"}, {0x3F, 1, "max latency"}, {0, 0, NULL}};
static const struct field pcie_fields[] = {
    {0x00, 1, "ID"}, {0x01, 1, "next pointer"}, {0x02, 2, "capabilities register"},
    {0x04, 4, "device capabilities"}, {0x08, 2, "device control"}, {0x0A, 2, "device status"},
    {0x0C, 4, "link capabilities"}, {0x10, 2, "link control"}, {0x12, 2, "link status"},
    {0x24, 4, "device capabilities 2"}, {0x28, 2, "device control 2"}, {0x2C, 4, "link capabilities 2"},
    {0x30, 2, "link control 2"}, {0x32, 2, "link status 2"}, {0, 0, NULL}};
static const struct field msix_fields[] = {
    {0x00, 1, "ID"}, {0x01, 1, "next pointer"}, {0x02, 2, "message control"}, {0x04, 4, "table offset/BIR"},
    {0x08, 4, "PBA offset/BIR"}, {0, 0, NULL}};
static const struct field migcap_fields[] = {
    {0x00, 1, "ID"}, {0x01, 1, "next pointer"}, {0x02, 1, "length"}, {0x04, 4, "signature"},
    {0x08, 1, "control"}, {0x09, 1, "IRQ"}, {0x0A, 1, "VMM status"}, {0x0B, 1, "device status"}, {0, 0, NULL}};

static const struct field *find_field(const struct field *t, uint32_t rel)
{
    for (; t->name; t++)
        if (rel >= t->off && rel < (uint32_t)t->off + t->len)
            return t;
    return NULL;
}

/* Names the register holding config byte off of f (by f's own layout): *start and *len span
 * it; a byte outside every known register is a register of its own. */
static void describe(const struct vfmig_pci_func *f, uint32_t off, uint32_t *start, uint32_t *len, char *name,
                     size_t cap)
{
    *start = off;
    *len = 1;
    if (off < CFG_HEADER_END) {
        const struct field *fl = find_field(header_fields, off);
        snprintf(name, cap, "%s", fl ? fl->name : "reserved");
        if (fl) {
            *start = fl->off;
            *len = fl->len;
        }
        return;
    }
    uint32_t p = cfg_get(f, CFG_CAP_PTR) & 0xFCu;
    for (uint32_t hops = 0; p >= CFG_HEADER_END && hops < 48; hops++) {
        uint8_t id = cfg_get(f, p);
        uint32_t size = id == CAP_ID_PCIE ? PCIE_CAP_SIZE : id == CAP_ID_MSIX ? MSIX_CAP_SIZE
                        : id == VFMIG_PCI_CAP_ID_VNDR ? cfg_get(f, p + 2) : 2;
        if (off >= p && off < p + size) {
            const struct field *t = id == CAP_ID_PCIE ? pcie_fields : id == CAP_ID_MSIX ? msix_fields
                                    : p == f->migcap ? migcap_fields : NULL;
            const char *cname = id == CAP_ID_PCIE ? "PCI Express" : id == CAP_ID_MSIX ? "MSI-X"
                                : p == f->migcap ? "migration" : "vendor-specific";
            const struct field *fl = t ? find_field(t, off - p) : NULL;
            snprintf(name, cap, "%s capability at 0x%02x: %s", cname, p, fl ? fl->name : "reserved");
            if (fl) {
                *start = p + fl->off;
                *len = fl->len;
            }
            return;
        }
        p = cfg_get(f, p + 1) & 0xFCu;
    }
    snprintf(name, cap, "%s", off < CFG_CAPS_END ? "outside every capability" : "extended config space");
}

int vfmig_pci_check(const struct vfmig_pci_func *f, const uint8_t *buf, size_t len, struct vfmig_err *err)
{
    const char *n = f->dev.name;
    if (len < STATE_HEADER)
        return vfmig_fail(err, EINVAL, "%s: PCI state is %zu bytes, shorter than its %u-byte header", n, len,
                          STATE_HEADER);
    uint32_t magic = (uint32_t)le_get(buf, 4), version = (uint32_t)le_get(buf + 4, 2);
    if (magic != STATE_MAGIC)
        return vfmig_fail(err, EINVAL, "%s: PCI state has magic 0x%08x, expected 0x%08x", n, magic, STATE_MAGIC);
    if (version != STATE_VERSION)
        return vfmig_fail(err, EINVAL, "%s: PCI state is version %u, this build reads version %u", n, version,
                          STATE_VERSION);
    uint32_t hdr = (uint32_t)le_get(buf + 6, 2), cfg = (uint32_t)le_get(buf + 8, 4);
    uint32_t nvec = (uint32_t)le_get(buf + 12, 2), rsvd = (uint32_t)le_get(buf + 14, 2);
    if (hdr != STATE_HEADER || cfg != VFMIG_PCI_CONFIG_SIZE || rsvd)
        return vfmig_fail(err, EINVAL, "%s: PCI state header says %u header bytes, %u config bytes, reserved 0x%x; "
                          "expected %u, %u, 0", n, hdr, cfg, rsvd, STATE_HEADER, VFMIG_PCI_CONFIG_SIZE);
    if (nvec != f->msix_nvec)
        return vfmig_fail(err, EINVAL, "%s: MSI-X table has %u vectors in the stream, %u here", n, nvec,
                          f->msix_nvec);
    size_t want = vfmig_pci_state_size(f);
    if (len != want)
        return vfmig_fail(err, EINVAL, "%s: PCI state is %zu bytes, expected %zu (header, %u config bytes, %u MSI-X "
                          "vectors and their PBA)", n, len, want, VFMIG_PCI_CONFIG_SIZE, nvec);
    /* A memory BAR's read-only low bits are 0 whatever its size, so the sizes travel in the
     * header: the config compare below alone would miss a different BAR size. */
    for (uint32_t b = 0; b < VFMIG_PCI_MAX_BARS; b++) {
        uint32_t s = (uint32_t)le_get(buf + 16 + 4 * b, 4);
        if (s != f->bars[b].size)
            return vfmig_fail(err, EINVAL, "%s: BAR %u is %u bytes in the stream, %u here", n, b, s, f->bars[b].size);
    }
    /* The handshake's outcome decides whether the destination's driver must reset: only values
     * a source of this kind can have produced are taken. */
    uint32_t hs = (uint32_t)le_get(buf + STATE_HS_OUTCOME, 4), lat = (uint32_t)le_get(buf + STATE_HS_LATENCY, 4);
    if (hs >= VFMIG_HS__COUNT)
        return vfmig_fail(err, EINVAL, "%s: handshake outcome %u in the stream is not an outcome (0..%u)", n, hs,
                          VFMIG_HS__COUNT - 1);
    if (hs != VFMIG_HS_NONE && !f->migcap)
        return vfmig_fail(err, EINVAL, "%s: handshake outcome %s in the stream, but this function has no "
                          "migration capability", n, vfmig_hs_outcome_name(hs));
    if (lat && hs != VFMIG_HS_ACKED && hs != VFMIG_HS_LATE)
        return vfmig_fail(err, EINVAL, "%s: handshake latency %u us in the stream with outcome %s (only an ack "
                          "has one)", n, lat, vfmig_hs_outcome_name(hs));
    const uint8_t *c = buf + STATE_HEADER;
    for (uint32_t o = 0; o < VFMIG_PCI_CONFIG_SIZE; o++) {
        uint8_t fixed = (uint8_t)~(f->wmask[o] | f->w1cmask[o]);
        if (f->migcap && (o == f->migcap + VFMIG_MIGCAP_VMM_STATUS || o == f->migcap + VFMIG_MIGCAP_LOADS))
            fixed = 0; /* the VMM's registers: state, not identity */
        if (!((c[o] ^ cfg_get(f, o)) & fixed))
            continue;
        uint32_t start, flen;
        char name[96];
        describe(f, o, &start, &flen, name, sizeof(name));
        return vfmig_fail(err, EINVAL, "%s: PCI config byte 0x%02x (%s) is 0x%0*x in the stream, 0x%0*x here", n, o,
                          name, (int)flen * 2, (unsigned)le_get(c + start, flen), (int)flen * 2,
                          cfg_le(f, start, flen));
    }
    /* Writes of a vector the function lacks are ignored, so only 0 or a real vector is valid. */
    if (f->migcap && c[f->migcap + VFMIG_MIGCAP_IRQ] && c[f->migcap + VFMIG_MIGCAP_IRQ] >= nvec)
        return vfmig_fail(err, EINVAL, "%s: migration capability IRQ is vector %u in the stream; there are %u", n,
                          c[f->migcap + VFMIG_MIGCAP_IRQ], nvec);
    const uint8_t *t = c + VFMIG_PCI_CONFIG_SIZE;
    for (uint32_t v = 0; v < nvec; v++)
        for (uint32_t w = 0; w < 4; w++) {
            uint32_t x = (uint32_t)le_get(t + MSIX_ENTRY_SIZE * v + 4 * w, 4);
            if (x & ~entry_wmask[w])
                return vfmig_fail(err, EINVAL, "%s: MSI-X vector %u word %u is 0x%08x in the stream: bits 0x%08x "
                                  "cannot be set", n, v, w, x, x & ~entry_wmask[w]);
        }
    if (nvec) {
        uint64_t pba = le_get(t + MSIX_ENTRY_SIZE * nvec, pba_bytes(nvec));
        if (nvec < 64 && pba >> nvec)
            return vfmig_fail(err, EINVAL, "%s: MSI-X PBA 0x%llx in the stream has bits beyond vector %u", n,
                              (unsigned long long)pba, nvec - 1);
    }
    return 0;
}

int vfmig_pci_apply(struct vfmig_pci_func *f, const uint8_t *buf, size_t len, struct vfmig_err *err)
{
    int r = vfmig_pci_check(f, buf, len, err);
    if (r < 0)
        return r;
    const uint8_t *c = buf + STATE_HEADER, *t = c + VFMIG_PCI_CONFIG_SIZE;
    pthread_mutex_lock(&f->config_lock);
    pthread_mutex_lock(&f->msix_lock);
    for (uint32_t o = 0; o < VFMIG_PCI_CONFIG_SIZE; o++)
        cfg_set(f, o, c[o]);
    /* The source's outcome, for vfmig_pci_handshake_loaded; nothing of its arming comes along. */
    f->hs.outcome = (uint32_t)le_get(buf + STATE_HS_OUTCOME, 4);
    f->hs.latency_us = (uint32_t)le_get(buf + STATE_HS_LATENCY, 4);
    atomic_store(&f->hs.armed, 0);
    atomic_store(&f->hs.acked_ns, 0);
    f->hs.notified = f->hs.post_load = 0;
    for (uint32_t v = 0; v < f->msix_nvec; v++)
        for (uint32_t w = 0; w < 4; w++)
            *entry_word(&f->msix[v], w) = (uint32_t)le_get(t + MSIX_ENTRY_SIZE * v + 4 * w, 4);
    f->msix_pba = f->msix_nvec ? (uint32_t)le_get(t + MSIX_ENTRY_SIZE * f->msix_nvec, 4) : 0;
    int due = f->msix_nvec ? msix_route_unmasked(f, 0, f->msix_nvec - 1) : 0;
    pthread_mutex_unlock(&f->msix_lock);
    update_decode(f);
    pthread_mutex_unlock(&f->config_lock);
    if (due && (r = msix_commit(f, err)) < 0)
        return r;
    return 0;
}
