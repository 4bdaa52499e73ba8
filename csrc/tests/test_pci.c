/* C test of the PCI host and the generic PCI function (pci.c, irq.c). Needs /dev/kvm: VMs of
 * 64 MiB whose vCPUs never start; the host's access hooks are called directly, as a vCPU's
 * port or MMIO exit would. The test function has BAR0 (16 KiB, a handler that records
 * accesses, a doorbell at 0x100), BAR1 (8 KiB, MSI-X with 4 vectors), PCIe and the migration
 * capability. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "fixture.h"
#include "vfmig/irq.h"
#include "vfmig/pci.h"
#include "vfmig/vm.h"

#define ONES32 0xFFFFFFFFu
#define BAR0_SIZE 0x4000u
#define BAR1_SIZE 0x2000u
#define BAR0_AT 0xE0000000u
#define BAR1_AT 0xE0004000u
#define DOORBELL_OFF 0x100u
#define NVEC 4u
#define HANDLER_VALUE 0x5A5A0000u
#define HDR 48u /* the PCI state blob's header: docs/device-state.md */

/* A failing call whose message must contain want: prints the message when it does not. */
#define CHECK_FAILS(call, err, want)                                                        \
    do {                                                                                    \
        int r_ = (call);                                                                    \
        if (r_ >= 0 || !strstr((err).msg, (want))) {                                        \
            fprintf(stderr, "%s:%d: expected failure with \"%s\", got %d: \"%s\"\n", __FILE__, \
                    __LINE__, (want), r_, (err).msg);                                       \
            exit(1);                                                                        \
        }                                                                                   \
    } while (0)

struct tdev {
    struct vfmig_pci_func f;
    int accesses, last_write;
    uint64_t last_off, last_val;
    uint32_t last_len;
    int db_fd;
    int attached;
};

static int tdev_bar0(struct vfmig_pci_func *f, struct vfmig_vcpu *cpu, uint64_t off, uint8_t *data, uint32_t len,
                     int is_write)
{
    (void)cpu;
    struct tdev *t = f->dev.opaque;
    t->accesses++;
    t->last_off = off;
    t->last_len = len;
    t->last_write = is_write;
    if (is_write) {
        t->last_val = 0;
        memcpy(&t->last_val, data, len);
    } else {
        uint64_t v = HANDLER_VALUE | off;
        memcpy(data, &v, len);
    }
    return 0;
}

static void tdev_free(struct tdev *t)
{
    vfmig_pci_func_release(&t->f);
    close(t->db_fd);
    free(t);
}

static void tdev_destroy(struct vfmig_device *d) { tdev_free(d->opaque); }

struct variant {
    uint16_t device;
    uint32_t bar0_size, nvec;
    int migcap;
};
static const struct variant standard = {0x10F0, BAR0_SIZE, NVEC, 1};

static struct tdev *tdev_new(struct vfmig_vm *vm, const char *name, const struct variant *v, int attach)
{
    struct tdev *t = calloc(1, sizeof(*t));
    CHECK(t);
    struct vfmig_err err = {{0}};
    struct vfmig_pci_ids ids = {.vendor = 0x1B36, .device = v->device, .revision = 1, .class_code = 0x020000,
                                .subsys_vendor = 0x1B36, .subsys = 0x0001};
    CHECK(vfmig_pci_func_init(&t->f, vm, name, &ids, &err) == 0);
    t->f.dev.opaque = t;
    t->f.dev.destroy = tdev_destroy;
    t->db_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    CHECK(t->db_fd >= 0);
    int r = vfmig_pci_add_bar(&t->f, 0, v->bar0_size, tdev_bar0, &err);
    r = r ? r : vfmig_pci_add_bar(&t->f, 1, BAR1_SIZE, NULL, &err);
    r = r ? r : vfmig_pci_add_pcie_cap(&t->f, &err);
    r = r ? r : vfmig_pci_add_msix(&t->f, v->nvec, 1, 0x0000, 0x1000, &err);
    r = r ? r : v->migcap ? vfmig_pci_add_migcap(&t->f, &err) : 0;
    r = r ? r : vfmig_pci_add_doorbell(&t->f, 0, DOORBELL_OFF, t->db_fd, &err);
    r = r ? r : attach ? vfmig_pci_attach(vm, &t->f, &err) : 0;
    if (r < 0) {
        fprintf(stderr, "building %s: %s\n", name, err.msg);
        exit(1);
    }
    t->attached = attach;
    return t;
}

static struct vfmig_vm *make_vm(void) { return test_vm(64ull << 20, 1, 0); }

/* ---- what a vCPU's exits would do ---- */

static uint64_t host_io(struct vfmig_vm *vm, const char *dev, uint64_t addr, uint64_t val, uint32_t len, int is_write)
{
    struct vfmig_device *d = vfmig_vm_find_device(vm, dev);
    CHECK(d && d->access);
    uint8_t data[8];
    uint64_t out = 0;
    memcpy(data, &val, 8);
    CHECK(d->access(d, NULL, addr, data, len, is_write) == 0);
    memcpy(&out, data, len);
    return out;
}

static void outl_addr(struct vfmig_vm *vm, uint32_t v) { host_io(vm, "pci-host", VFMIG_PCI_CONFIG_ADDR, v, 4, 1); }

static uint32_t bdf(uint32_t bus, uint32_t dev, uint32_t fn, uint32_t reg)
{
    return 0x80000000u | bus << 16 | dev << 11 | fn << 8 | (reg & 0xFCu);
}

static uint32_t cfg_rd(struct vfmig_vm *vm, uint32_t dev, uint32_t reg, uint32_t len)
{
    outl_addr(vm, bdf(0, dev, 0, reg));
    return (uint32_t)host_io(vm, "pci-host", VFMIG_PCI_CONFIG_DATA + (reg & 3), 0, len, 0);
}

static void cfg_wr(struct vfmig_vm *vm, uint32_t dev, uint32_t reg, uint32_t val, uint32_t len)
{
    outl_addr(vm, bdf(0, dev, 0, reg));
    host_io(vm, "pci-host", VFMIG_PCI_CONFIG_DATA + (reg & 3), val, len, 1);
}

static uint64_t mm_rd(struct vfmig_vm *vm, uint64_t addr, uint32_t len)
{
    return host_io(vm, "pci-mmio", addr, 0, len, 0);
}

static void mm_wr(struct vfmig_vm *vm, uint64_t addr, uint64_t val, uint32_t len)
{
    host_io(vm, "pci-mmio", addr, val, len, 1);
}

static uint32_t find_cap(struct vfmig_vm *vm, uint8_t id)
{
    for (uint32_t p = cfg_rd(vm, 0, 0x34, 1) & 0xFC, n = 0; p && n < 48; p = cfg_rd(vm, 0, p + 1, 1) & 0xFC, n++)
        if (cfg_rd(vm, 0, p, 1) == id)
            return p;
    return 0;
}

static void place_bars(struct vfmig_vm *vm, int mem_on)
{
    cfg_wr(vm, 0, 0x10, BAR0_AT, 4);
    cfg_wr(vm, 0, 0x14, BAR1_AT, 4);
    cfg_wr(vm, 0, 0x04, mem_on ? 0x0006 : 0x0000, 2); /* memory space and bus master */
}

/* ---- LAPIC: where an MSI that went through KVM's route shows up ---- */

static uint32_t lapic_reg(struct vfmig_vcpu *cpu, uint32_t off)
{
    struct kvm_lapic_state s;
    CHECK(ioctl(cpu->fd, KVM_GET_LAPIC, &s) == 0);
    uint32_t v;
    memcpy(&v, s.regs + off, 4);
    return v;
}

static void lapic_enable(struct vfmig_vcpu *cpu)
{
    struct kvm_lapic_state s;
    CHECK(ioctl(cpu->fd, KVM_GET_LAPIC, &s) == 0);
    uint32_t svr = 0x1FF; /* software enable, spurious vector 0xFF */
    memcpy(s.regs + 0xF0, &svr, 4);
    CHECK(ioctl(cpu->fd, KVM_SET_LAPIC, &s) == 0);
}

/* Waits up to 1 s: irqfd injection may run from a kernel work item. */
static int lapic_irr(struct vfmig_vcpu *cpu, uint32_t vec)
{
    for (int i = 0; i < 1000; i++) {
        if (lapic_reg(cpu, 0x200 + vec / 32 * 0x10) >> (vec % 32) & 1)
            return 1;
        usleep(1000);
    }
    return 0;
}

/* ---- tests ---- */

/* Config mechanism #1: the function at 00:00.0, all-ones everywhere else. */
static void test_enumerate(struct vfmig_vm *vm)
{
    CHECK(cfg_rd(vm, 0, 0x00, 4) == (0x10F0u << 16 | 0x1B36u));
    CHECK(cfg_rd(vm, 0, 0x02, 2) == 0x10F0);
    CHECK(cfg_rd(vm, 0, 0x03, 1) == 0x10);
    CHECK(cfg_rd(vm, 0, 0x08, 4) == (0x020000u << 8 | 1u));
    CHECK(cfg_rd(vm, 0, 0x0E, 1) == 0x00);                 /* header type 0 */
    CHECK(cfg_rd(vm, 0, 0x06, 2) & 0x0010);                /* capabilities list */
    CHECK(cfg_rd(vm, 0, 0x2C, 4) == (0x0001u << 16 | 0x1B36u));
    CHECK(cfg_rd(vm, 0, 0x3D, 1) == 0);                    /* no INTx pin */
    CHECK(cfg_rd(vm, 1, 0x00, 4) == ONES32);               /* 00:01.0: nothing */
    CHECK(cfg_rd(vm, 31, 0x00, 2) == 0xFFFF);
    outl_addr(vm, bdf(0, 0, 1, 0));                        /* 00:00.1 */
    CHECK(host_io(vm, "pci-host", VFMIG_PCI_CONFIG_DATA, 0, 4, 0) == ONES32);
    outl_addr(vm, bdf(1, 0, 0, 0));                        /* bus 1 */
    CHECK(host_io(vm, "pci-host", VFMIG_PCI_CONFIG_DATA, 0, 4, 0) == ONES32);
    outl_addr(vm, bdf(0, 0, 0, 0) & ~0x80000000u);         /* enable bit clear */
    CHECK(host_io(vm, "pci-host", VFMIG_PCI_CONFIG_DATA, 0, 4, 0) == ONES32);
    /* The latch reads back without its reserved bits; only dword accesses reach it. */
    outl_addr(vm, 0xFF000A07u);
    CHECK(host_io(vm, "pci-host", VFMIG_PCI_CONFIG_ADDR, 0, 4, 0) == 0x80000A04u);
    CHECK(host_io(vm, "pci-host", VFMIG_PCI_CONFIG_ADDR + 1, 0, 1, 0) == 0xFF);
    /* A data access past 0xCFF is not decoded. */
    outl_addr(vm, bdf(0, 0, 0, 0));
    CHECK(host_io(vm, "pci-host", VFMIG_PCI_CONFIG_DATA + 3, 0, 2, 0) == 0xFFFF);
    /* Writes to an absent function go nowhere. */
    cfg_wr(vm, 1, 0x04, 0xFFFF, 2);
    CHECK(cfg_rd(vm, 1, 0x04, 2) == 0xFFFF);
    printf("test_enumerate: ok\n");
}

/* The chain a guest walks: PCIe, MSI-X, migration capability, then the end. */
static void test_cap_chain(struct vfmig_vm *vm)
{
    const uint8_t want[] = {0x10, 0x11, 0x09};
    uint32_t p = cfg_rd(vm, 0, 0x34, 1), n = 0;
    for (; p && n < 8; n++, p = cfg_rd(vm, 0, p + 1, 1)) {
        CHECK(n < sizeof(want) && p >= 0x40 && p % 4 == 0);
        CHECK(cfg_rd(vm, 0, p, 1) == want[n]);
    }
    CHECK(n == 3);
    uint32_t e = find_cap(vm, 0x10), x = find_cap(vm, 0x11), m = find_cap(vm, 0x09);
    CHECK(e && x && m);
    CHECK((cfg_rd(vm, 0, e + 2, 2) & 0xF) == 2);          /* version 2 */
    CHECK((cfg_rd(vm, 0, e + 2, 2) >> 4 & 0xF) == 0);     /* endpoint */
    CHECK(cfg_rd(vm, 0, e + 8, 2) == 0x2810);             /* device control after reset */
    CHECK((cfg_rd(vm, 0, x + 2, 2) & 0x7FF) == NVEC - 1); /* table size N - 1 */
    CHECK(cfg_rd(vm, 0, x + 4, 4) == (0x0000u | 1));      /* table at BAR1 + 0 */
    CHECK(cfg_rd(vm, 0, x + 8, 4) == (0x1000u | 1));      /* PBA at BAR1 + 0x1000 */
    CHECK(cfg_rd(vm, 0, m + 2, 1) == VFMIG_MIGCAP_SIZE);
    CHECK(cfg_rd(vm, 0, m + VFMIG_MIGCAP_SIG, 4) == VFMIG_MIGCAP_SIGNATURE);
    printf("test_cap_chain: ok\n");
}

/* Read-only bits stay, RW1C bits clear on 1, writable bits take. */
static void test_masks(struct vfmig_vm *vm, struct tdev *t)
{
    cfg_wr(vm, 0, 0x00, ONES32, 4);
    CHECK(cfg_rd(vm, 0, 0x00, 4) == (0x10F0u << 16 | 0x1B36u));
    cfg_wr(vm, 0, 0x04, 0xFFFF, 2);
    CHECK(cfg_rd(vm, 0, 0x04, 2) == 0x0547); /* IO, MEM, MASTER, PARITY, SERR, INTX_DISABLE */
    cfg_wr(vm, 0, 0x04, 0, 2);
    CHECK(cfg_rd(vm, 0, 0x04, 2) == 0);
    /* The device reports a received master abort and a parity error; the guest clears one. */
    t->f.config[0x07] |= 0x21;
    cfg_wr(vm, 0, 0x06, 0x2000, 2);
    CHECK(cfg_rd(vm, 0, 0x06, 2) == 0x0110);
    cfg_wr(vm, 0, 0x06, 0x0000, 2); /* writing 0 clears nothing */
    CHECK(cfg_rd(vm, 0, 0x06, 2) == 0x0110);
    cfg_wr(vm, 0, 0x06, 0xFFFF, 2); /* capabilities list is read-only, not RW1C */
    CHECK(cfg_rd(vm, 0, 0x06, 2) == 0x0010);
    cfg_wr(vm, 0, 0x08, ONES32, 4); /* revision, class */
    CHECK(cfg_rd(vm, 0, 0x08, 4) == (0x020000u << 8 | 1u));
    cfg_wr(vm, 0, 0x0C, ONES32, 4); /* cache line RW; latency, header type, BIST read-only */
    CHECK(cfg_rd(vm, 0, 0x0C, 4) == 0x000000FF);
    cfg_wr(vm, 0, 0x0C, 0, 1);
    cfg_wr(vm, 0, 0x2C, ONES32, 4);
    CHECK(cfg_rd(vm, 0, 0x2C, 4) == (0x0001u << 16 | 0x1B36u));
    cfg_wr(vm, 0, 0x30, ONES32, 4); /* no expansion ROM */
    CHECK(cfg_rd(vm, 0, 0x30, 4) == 0);
    uint32_t cp = cfg_rd(vm, 0, 0x34, 1);
    cfg_wr(vm, 0, 0x34, 0, 1);
    CHECK(cfg_rd(vm, 0, 0x34, 1) == cp);
    cfg_wr(vm, 0, 0x3C, 0xFFFF0B, 4); /* line RW; pin, min grant, max latency read-only */
    CHECK(cfg_rd(vm, 0, 0x3C, 4) == 0x0B);

    uint32_t e = find_cap(vm, 0x10);
    cfg_wr(vm, 0, e, 0xFFFF, 2); /* ID and next pointer */
    CHECK(cfg_rd(vm, 0, e, 1) == 0x10 && cfg_rd(vm, 0, e + 1, 1) == find_cap(vm, 0x11));
    cfg_wr(vm, 0, e + 4, ONES32, 4); /* device capabilities read-only */
    CHECK(cfg_rd(vm, 0, e + 4, 4) == 0x00008000);
    cfg_wr(vm, 0, e + 8, 0xFFFF, 2); /* device control: partly writable */
    CHECK(cfg_rd(vm, 0, e + 8, 2) == 0x78FF);
    cfg_wr(vm, 0, e + 8, 0x2810, 2);
    t->f.config[e + 0x0A] |= 0x05; /* correctable and fatal error detected */
    cfg_wr(vm, 0, e + 0x0A, 0x0001, 2);
    CHECK(cfg_rd(vm, 0, e + 0x0A, 2) == 0x0004);
    cfg_wr(vm, 0, e + 0x0A, 0xFFFF, 2);
    CHECK(cfg_rd(vm, 0, e + 0x0A, 2) == 0);
    cfg_wr(vm, 0, e + 0x10, ONES32, 4); /* link control partly writable, link status read-only */
    CHECK(cfg_rd(vm, 0, e + 0x10, 4) == (0x0011u << 16 | 0x00C3u));
    cfg_wr(vm, 0, e + 0x10, 0, 2);

    uint32_t x = find_cap(vm, 0x11);
    cfg_wr(vm, 0, x + 2, 0xFFFF, 2); /* only enable and function mask */
    CHECK(cfg_rd(vm, 0, x + 2, 2) == (0xC000u | (NVEC - 1)));
    cfg_wr(vm, 0, x + 2, 0, 2);
    cfg_wr(vm, 0, x + 4, 0, 4);
    CHECK(cfg_rd(vm, 0, x + 4, 4) == 1);
    printf("test_masks: ok\n");
}

/* Sizing, placing, and decoding only inside the window with memory space on. */
static void test_bars(struct vfmig_vm *vm, struct tdev *t)
{
    for (uint32_t b = 0; b < 6; b++) {
        cfg_wr(vm, 0, 0x10 + 4 * b, ONES32, 4);
        uint32_t want = b == 0 ? ~(BAR0_SIZE - 1) : b == 1 ? ~(BAR1_SIZE - 1) : 0;
        CHECK(cfg_rd(vm, 0, 0x10 + 4 * b, 4) == want);
        cfg_wr(vm, 0, 0x10 + 4 * b, 0, 4);
    }
    place_bars(vm, 0);
    CHECK(cfg_rd(vm, 0, 0x10, 4) == BAR0_AT && cfg_rd(vm, 0, 0x14, 4) == BAR1_AT);
    int n = t->accesses;
    CHECK(mm_rd(vm, BAR0_AT + 0x10, 4) == ONES32 && t->accesses == n); /* memory space off */
    CHECK(atomic_load(&t->f.bars[0].addr) == 0);

    place_bars(vm, 1);
    CHECK(atomic_load(&t->f.bars[0].addr) == BAR0_AT);
    CHECK(mm_rd(vm, BAR0_AT + 0x10, 4) == (HANDLER_VALUE | 0x10));
    CHECK(t->accesses == n + 1 && t->last_off == 0x10 && t->last_len == 4 && !t->last_write);
    mm_wr(vm, BAR0_AT + 0x20, 0xAABBCCDD, 4);
    CHECK(t->accesses == n + 2 && t->last_off == 0x20 && t->last_write && t->last_val == 0xAABBCCDD);
    mm_wr(vm, BAR0_AT + 0x3FF8, 0x1122334455667788ull, 8);
    CHECK(t->last_off == 0x3FF8 && t->last_len == 8 && t->last_val == 0x1122334455667788ull);
    n = t->accesses;
    CHECK(mm_rd(vm, BAR0_AT + 0x3FFE, 4) == ONES32);                 /* runs past the BAR's end */
    CHECK(mm_rd(vm, 0xE0100000u, 4) == ONES32);                       /* nobody's */
    mm_wr(vm, 0xE0100000u, 1, 4);
    CHECK(t->accesses == n);

    cfg_wr(vm, 0, 0x10, 0xD0000000u, 4); /* outside the window: no decode */
    CHECK(atomic_load(&t->f.bars[0].addr) == 0 && mm_rd(vm, BAR0_AT, 4) == ONES32);
    cfg_wr(vm, 0, 0x10, 0xEFFFC000u, 4); /* the window's last 16 KiB */
    CHECK(mm_rd(vm, 0xEFFFC000u + 8, 4) == (HANDLER_VALUE | 8));
    CHECK(mm_rd(vm, BAR0_AT, 4) == ONES32);
    cfg_wr(vm, 0, 0x10, 0xE0000003u, 4); /* the type bits stay */
    CHECK(cfg_rd(vm, 0, 0x10, 4) == BAR0_AT);
    cfg_wr(vm, 0, 0x04, 0x0004, 2); /* memory space off again */
    CHECK(atomic_load(&t->f.bars[0].addr) == 0 && mm_rd(vm, BAR0_AT, 4) == ONES32);
    CHECK(t->accesses == n + 1);
    place_bars(vm, 1);
    CHECK(vfmig_pci_bus_master(&t->f));
    printf("test_bars: ok\n");
}

static void msix_program(struct vfmig_vm *vm, uint32_t vec, uint32_t lapic_vec, uint32_t ctrl)
{
    uint64_t e = BAR1_AT + 16ull * vec;
    mm_wr(vm, e + 0, 0xFEE00000u, 4); /* destination APIC 0, physical */
    mm_wr(vm, e + 4, 0, 4);
    mm_wr(vm, e + 8, lapic_vec, 4);   /* fixed, edge */
    mm_wr(vm, e + 12, ctrl, 4);
}

static uint64_t pba(struct vfmig_vm *vm) { return mm_rd(vm, BAR1_AT + 0x1000, 8); }

/* Masking leaves a notification pending in the PBA; unmasking (vector or function) sends it
 * through the MSI route into the LAPIC. */
static void test_msix(struct vfmig_vm *vm, struct tdev *t)
{
    struct vfmig_pci_func *f = &t->f;
    uint32_t x = find_cap(vm, 0x11);
    lapic_enable(&vm->vcpus[0]);
    CHECK(mm_rd(vm, BAR1_AT + 12, 4) == 1); /* masked after reset */
    mm_wr(vm, BAR1_AT, 0xFEE00003u, 4);     /* the address is dword aligned */
    CHECK(mm_rd(vm, BAR1_AT, 4) == 0xFEE00000u);
    mm_wr(vm, BAR1_AT + 12, ONES32, 4);     /* only the mask bit exists */
    CHECK(mm_rd(vm, BAR1_AT + 12, 4) == 1);
    CHECK(mm_rd(vm, BAR1_AT + 16 * NVEC, 4) == 0); /* reserved space after the table */

    msix_program(vm, 0, 0x41, 0);
    CHECK(mm_rd(vm, BAR1_AT + 8, 4) == 0x41 && mm_rd(vm, BAR1_AT + 12, 4) == 0);
    CHECK(vfmig_irq_route_ready(vm->irq, f->gsi[0]));
    CHECK(vfmig_pci_msix_notify(f, 0) == 0); /* MSI-X off: pending */
    CHECK(pba(vm) == 1);
    cfg_wr(vm, 0, x + 2, 0xC000, 2); /* enabled, function masked */
    CHECK(pba(vm) == 1 && vfmig_pci_msix_notify(f, 0) == 0);
    CHECK(!(lapic_reg(&vm->vcpus[0], 0x200 + 0x41 / 32 * 0x10) >> (0x41 % 32) & 1));
    cfg_wr(vm, 0, x + 2, 0x8000, 2); /* function unmasked: the pending one goes */
    CHECK(pba(vm) == 0);
    CHECK(lapic_irr(&vm->vcpus[0], 0x41));
    CHECK(vfmig_pci_msix_notify(f, 0) == 1);

    msix_program(vm, 1, 0x42, 1); /* programmed while masked: no route yet */
    CHECK(!vfmig_irq_route_ready(vm->irq, f->gsi[1]));
    CHECK(vfmig_pci_msix_notify(f, 1) == 0 && pba(vm) == 2);
    mm_wr(vm, BAR1_AT + 0x1000, ONES32, 4); /* the PBA is read-only */
    CHECK(pba(vm) == 2);
    mm_wr(vm, BAR1_AT + 16 + 12, 0, 4);     /* unmask: route, then delivery */
    CHECK(vfmig_irq_route_ready(vm->irq, f->gsi[1]));
    CHECK(pba(vm) == 0 && lapic_irr(&vm->vcpus[0], 0x42));

    mm_wr(vm, BAR1_AT + 16 + 8, 0x43, 4); /* new data while unmasked: the route follows */
    CHECK(vfmig_pci_msix_notify(f, 1) == 1 && lapic_irr(&vm->vcpus[0], 0x43));
    CHECK(vfmig_pci_msix_notify(f, NVEC) == -EINVAL);
    CHECK(vfmig_pci_msix_notify(f, 99) == -EINVAL);
    printf("test_msix: ok\n");
}

/* 1 if KVM already has a 4-byte MMIO ioeventfd at addr (a second one collides). */
static int ioeventfd_at(struct vfmig_vm *vm, uint64_t addr)
{
    int fd = eventfd(0, EFD_CLOEXEC);
    CHECK(fd >= 0);
    struct vfmig_err err = {{0}};
    int r = vfmig_irq_ioeventfd(vm->irq, addr, fd, NULL, 1, &err);
    if (r == 0)
        CHECK(vfmig_irq_ioeventfd(vm->irq, addr, fd, NULL, 0, &err) == 0);
    close(fd);
    CHECK(r == 0 || r == -EEXIST);
    return r == -EEXIST;
}

/* The doorbell's ioeventfd follows its BAR and goes away with memory decode. */
static void test_doorbell(struct vfmig_vm *vm, struct tdev *t)
{
    struct vfmig_pci_doorbell *db = &t->f.doorbells[0];
    CHECK(db->at == BAR0_AT + DOORBELL_OFF && ioeventfd_at(vm, BAR0_AT + DOORBELL_OFF));
    cfg_wr(vm, 0, 0x10, 0xE0008000u, 4);
    CHECK(db->at == 0xE0008000u + DOORBELL_OFF);
    CHECK(!ioeventfd_at(vm, BAR0_AT + DOORBELL_OFF) && ioeventfd_at(vm, 0xE0008000u + DOORBELL_OFF));
    cfg_wr(vm, 0, 0x04, 0x0004, 2);
    CHECK(db->at == 0 && !ioeventfd_at(vm, 0xE0008000u + DOORBELL_OFF));
    place_bars(vm, 1);
    CHECK(db->at == BAR0_AT + DOORBELL_OFF && ioeventfd_at(vm, BAR0_AT + DOORBELL_OFF));
    printf("test_doorbell: ok\n");
}

/* The guest writes CTRL, IRQ (valid vectors only) and DEV_STATUS; VMM_STATUS is the VMM's. */
static void test_migcap(struct vfmig_vm *vm, struct tdev *t)
{
    uint32_t m = find_cap(vm, 0x09);
    cfg_wr(vm, 0, m + VFMIG_MIGCAP_SIG, 0, 4);
    CHECK(cfg_rd(vm, 0, m + VFMIG_MIGCAP_SIG, 4) == VFMIG_MIGCAP_SIGNATURE);
    cfg_wr(vm, 0, m + VFMIG_MIGCAP_CTRL, 0xFF, 1);
    CHECK(cfg_rd(vm, 0, m + VFMIG_MIGCAP_CTRL, 1) == VFMIG_MIGCAP_ENABLE);
    cfg_wr(vm, 0, m + VFMIG_MIGCAP_IRQ, 2, 1);
    CHECK(cfg_rd(vm, 0, m + VFMIG_MIGCAP_IRQ, 1) == 2);
    cfg_wr(vm, 0, m + VFMIG_MIGCAP_IRQ, NVEC, 1); /* not a vector of this function: ignored */
    CHECK(cfg_rd(vm, 0, m + VFMIG_MIGCAP_IRQ, 1) == 2);
    cfg_wr(vm, 0, m + VFMIG_MIGCAP_IRQ, 0xFF, 1);
    CHECK(cfg_rd(vm, 0, m + VFMIG_MIGCAP_IRQ, 1) == 2);
    cfg_wr(vm, 0, m + VFMIG_MIGCAP_VMM_STATUS, 0xFF, 1);
    CHECK(cfg_rd(vm, 0, m + VFMIG_MIGCAP_VMM_STATUS, 1) == 0);
    vfmig_pci_migcap_update(&t->f, VFMIG_VMM_MIGRATING, 0);
    CHECK(cfg_rd(vm, 0, m + VFMIG_MIGCAP_VMM_STATUS, 1) == VFMIG_VMM_MIGRATING);
    cfg_wr(vm, 0, m + VFMIG_MIGCAP_VMM_STATUS, 0, 1); /* nor can it clear it */
    CHECK(cfg_rd(vm, 0, m + VFMIG_MIGCAP_VMM_STATUS, 1) == VFMIG_VMM_MIGRATING);
    vfmig_pci_migcap_update(&t->f, VFMIG_VMM_MIGRATED, VFMIG_VMM_MIGRATING);
    CHECK(cfg_rd(vm, 0, m + VFMIG_MIGCAP_VMM_STATUS, 1) == VFMIG_VMM_MIGRATED);
    cfg_wr(vm, 0, m + VFMIG_MIGCAP_DEV_STATUS, 0xFF, 1);
    CHECK(cfg_rd(vm, 0, m + VFMIG_MIGCAP_DEV_STATUS, 1) == VFMIG_DEV_ACK);
    CHECK(vfmig_pci_migcap_reg(&t->f, VFMIG_MIGCAP_DEV_STATUS) == VFMIG_DEV_ACK);
    /* One dword write over all four registers: each byte by its own rule. */
    cfg_wr(vm, 0, m + VFMIG_MIGCAP_CTRL, 0x00FF0F00u, 4);
    CHECK(cfg_rd(vm, 0, m + VFMIG_MIGCAP_CTRL, 4) == ((uint32_t)VFMIG_VMM_MIGRATED << 16 | 2u << 8));
    cfg_wr(vm, 0, m + VFMIG_MIGCAP_CTRL, 0x01000301u, 4);
    CHECK(cfg_rd(vm, 0, m + VFMIG_MIGCAP_CTRL, 4) == (0x01u << 24 | (uint32_t)VFMIG_VMM_MIGRATED << 16 | 3u << 8 | 1u));
    CHECK(vfmig_pci_migcap_reg(&t->f, VFMIG_MIGCAP_SIZE) == 0);
    printf("test_migcap: ok\n");
}

/* Save on one VM, check and apply on a second: the second saves the same bytes, and decodes,
 * routes and rings the doorbell where the first did. */
static void test_state_roundtrip(struct vfmig_vm *a, struct tdev *ta, uint8_t *blob, size_t *blen)
{
    struct vfmig_err err = {{0}};
    CHECK(vfmig_pci_msix_notify(&ta->f, 3) == 0); /* vector 3 still masked: pending */
    msix_program(a, 2, 0x44, 1);
    size_t size = vfmig_pci_state_size(&ta->f);
    CHECK(size == HDR + 4096 + 16 * NVEC + 8);
    CHECK(vfmig_pci_save(&ta->f, blob, size - 1) == -ENOSPC);
    long len = vfmig_pci_save(&ta->f, blob, size);
    CHECK(len == (long)size);
    *blen = (size_t)len;

    struct vfmig_vm *b = make_vm();
    struct tdev *tb = tdev_new(b, "fn", &standard, 1);
    lapic_enable(&b->vcpus[0]);
    CHECK(vfmig_pci_check(&tb->f, blob, *blen, &err) == 0);
    CHECK(vfmig_pci_apply(&tb->f, blob, *blen, &err) == 0);
    static uint8_t again[8192];
    CHECK(vfmig_pci_save(&tb->f, again, sizeof(again)) == len && memcmp(blob, again, *blen) == 0);
    CHECK(cfg_rd(b, 0, 0x00, 4) == cfg_rd(a, 0, 0x00, 4) && cfg_rd(b, 0, 0x3C, 1) == 0x0B);
    CHECK(mm_rd(b, BAR0_AT + 4, 4) == (HANDLER_VALUE | 4) && tb->accesses == 1);
    CHECK(tb->f.doorbells[0].at == BAR0_AT + DOORBELL_OFF && ioeventfd_at(b, BAR0_AT + DOORBELL_OFF));
    CHECK(vfmig_irq_route_ready(b->irq, tb->f.gsi[0]) && vfmig_irq_route_ready(b->irq, tb->f.gsi[1]));
    CHECK(!vfmig_irq_route_ready(b->irq, tb->f.gsi[2])); /* masked: routed on unmask */
    CHECK(vfmig_pci_msix_notify(&tb->f, 1) == 1 && lapic_irr(&b->vcpus[0], 0x43));
    CHECK(pba(b) == 8); /* vector 3's pending bit came along */
    msix_program(b, 3, 0x45, 1);
    CHECK(pba(b) == 8);
    mm_wr(b, BAR1_AT + 16 * 3 + 12, 0, 4); /* unmasked on the destination: delivered there */
    CHECK(pba(b) == 0 && lapic_irr(&b->vcpus[0], 0x45));
    CHECK(vfmig_pci_bus_master(&tb->f));
    CHECK(vfmig_pci_migcap_reg(&tb->f, VFMIG_MIGCAP_VMM_STATUS) == VFMIG_VMM_MIGRATED);
    vfmig_vm_destroy(b);
    printf("test_state_roundtrip: ok\n");
}

/* What check refuses, each with its reason, and that a refused apply changes nothing. */
static void test_state_rejections(const uint8_t *blob, size_t len)
{
    struct vfmig_err err = {{0}};
    struct vfmig_vm *b = make_vm();
    struct tdev *same = tdev_new(b, "same", &standard, 1);
    struct variant v = standard;
    v.device = 0x10F1;
    struct tdev *other_id = tdev_new(b, "other-id", &v, 0);
    CHECK_FAILS(vfmig_pci_check(&other_id->f, blob, len, &err), err,
                "PCI config byte 0x02 (device ID) is 0x10f0 in the stream, 0x10f1 here");
    v = standard;
    v.bar0_size = 0x2000;
    struct tdev *small_bar = tdev_new(b, "small-bar", &v, 0);
    CHECK_FAILS(vfmig_pci_check(&small_bar->f, blob, len, &err), err, "BAR 0 is 16384 bytes in the stream, 8192 here");
    v = standard;
    v.nvec = 2;
    struct tdev *two_vec = tdev_new(b, "two-vectors", &v, 0);
    CHECK_FAILS(vfmig_pci_check(&two_vec->f, blob, len, &err), err, "MSI-X table has 4 vectors in the stream, 2 here");
    v = standard;
    v.migcap = 0;
    struct tdev *no_mig = tdev_new(b, "no-migcap", &v, 0);
    CHECK_FAILS(vfmig_pci_check(&no_mig->f, blob, len, &err), err,
                "(MSI-X capability at 0x7c: next pointer) is 0x88 in the stream, 0x00 here");

    CHECK_FAILS(vfmig_pci_check(&same->f, blob, len - 1, &err), err, "PCI state is 4215 bytes, expected 4216");
    CHECK_FAILS(vfmig_pci_check(&same->f, blob, len + 1, &err), err, "PCI state is 4217 bytes, expected 4216");
    CHECK_FAILS(vfmig_pci_check(&same->f, blob, 12, &err), err, "PCI state is 12 bytes, shorter than its 48-byte header");
    static uint8_t bad[8192];
    memcpy(bad, blob, len);
    bad[0] ^= 0xFF;
    CHECK_FAILS(vfmig_pci_check(&same->f, bad, len, &err), err, "PCI state has magic 0x494350a9, expected 0x49435056");
    memcpy(bad, blob, len);
    bad[4] = 1; /* the layout before the handshake's fields */
    CHECK_FAILS(vfmig_pci_check(&same->f, bad, len, &err), err, "PCI state is version 1, this build reads version 2");

    /* The mask check: a bit the guest cannot write differs, so the stream did not come from
     * this kind of function (or is corrupt). Command bit 3 (special cycles) is hardwired 0. */
    memcpy(bad, blob, len);
    bad[HDR + 0x04] |= 0x08;
    CHECK_FAILS(vfmig_pci_check(&same->f, bad, len, &err), err,
                "PCI config byte 0x04 (command) is 0x000e in the stream, 0x0000 here");
    memcpy(bad, blob, len);
    bad[HDR + 0x08] = 2;
    CHECK_FAILS(vfmig_pci_check(&same->f, bad, len, &err), err, "(revision ID) is 0x02 in the stream, 0x01 here");
    memcpy(bad, blob, len);
    bad[HDR + 0x40 + 0x0A] ^= 0x10; /* device status bit 4 (aux power detected): not RW1C */
    CHECK_FAILS(vfmig_pci_check(&same->f, bad, len, &err), err, "(PCI Express capability at 0x40: device status)");
    memcpy(bad, blob, len);
    bad[HDR + 0x200] = 1; /* extended config space, all read-only */
    CHECK_FAILS(vfmig_pci_check(&same->f, bad, len, &err), err, "PCI config byte 0x200 (extended config space)");
    /* Bits the guest (or the VMM) can write are state, not identity: accepted. */
    memcpy(bad, blob, len);
    bad[HDR + 0x3C] = 0x77;                       /* interrupt line */
    bad[HDR + 0x07] |= 0x80;                      /* status: detected parity error (RW1C) */
    bad[HDR + 0x88 + VFMIG_MIGCAP_VMM_STATUS] = 7; /* the VMM's register */
    CHECK(vfmig_pci_check(&same->f, bad, len, &err) == 0);
    /* Values no guest write can produce. */
    memcpy(bad, blob, len);
    bad[HDR + 0x88 + VFMIG_MIGCAP_IRQ] = NVEC;
    CHECK_FAILS(vfmig_pci_check(&same->f, bad, len, &err), err, "IRQ is vector 4 in the stream; there are 4");
    memcpy(bad, blob, len);
    bad[HDR + 4096 + 16 * 1 + 12] |= 0x02; /* vector 1 control, reserved bit */
    CHECK_FAILS(vfmig_pci_check(&same->f, bad, len, &err), err, "MSI-X vector 1 word 3");
    memcpy(bad, blob, len);
    bad[HDR + 4096 + 16 * NVEC] |= 0x10; /* PBA bit of vector 4 */
    CHECK_FAILS(vfmig_pci_check(&same->f, bad, len, &err), err, "bits beyond vector 3");

    /* A refused apply leaves the function as it was. */
    static uint8_t before[8192], after[8192];
    long n0 = vfmig_pci_save(&same->f, before, sizeof(before));
    memcpy(bad, blob, len);
    bad[HDR + 0x02] ^= 1;
    CHECK_FAILS(vfmig_pci_apply(&same->f, bad, len, &err), err, "(device ID)");
    CHECK(vfmig_pci_save(&same->f, after, sizeof(after)) == n0 && memcmp(before, after, (size_t)n0) == 0);

    tdev_free(other_id);
    tdev_free(small_bar);
    tdev_free(two_vec);
    tdev_free(no_mig);
    vfmig_vm_destroy(b);
    printf("test_state_rejections: ok\n");
}

/* irq.c alone: a route is ready only once a commit carried it to KVM. */
static void test_irq(void)
{
    struct vfmig_err err = {{0}};
    struct vfmig_vm *vm = make_vm();
    struct vfmig_irq *irq, *again;
    CHECK(vfmig_irq_get(vm, &irq, &err) == 0 && vfmig_irq_get(vm, &again, &err) == 0 && irq == again);
    uint32_t g, h;
    CHECK(vfmig_irq_alloc_gsi(irq, &g, &err) == 0 && g == VFMIG_IRQ_PINS);
    CHECK(vfmig_irq_alloc_gsi(irq, &h, &err) == 0 && h == g + 1);
    CHECK(!vfmig_irq_route_ready(irq, g));
    CHECK(vfmig_irq_set_msi(irq, g, 0xFEE00000u, 0x51) == 1);
    CHECK(vfmig_irq_set_msi(irq, g, 0xFEE00000u, 0x51) == 0); /* unchanged: no commit due */
    CHECK(!vfmig_irq_route_ready(irq, g));                     /* set, not yet in KVM */
    CHECK(vfmig_irq_commit(irq, &err) == 0 && vfmig_irq_route_ready(irq, g) && !vfmig_irq_route_ready(irq, h));
    CHECK(vfmig_irq_set_msi(irq, g, 0xFEE00000u, 0x52) == 1 && !vfmig_irq_route_ready(irq, g));
    CHECK(vfmig_irq_commit(irq, &err) == 0 && vfmig_irq_route_ready(irq, g));
    CHECK(vfmig_irq_set_msi(irq, 3, 0xFEE00000u, 0x52) == -EINVAL);     /* an irqchip pin */
    CHECK(vfmig_irq_set_msi(irq, g + 2, 0xFEE00000u, 0x52) == -EINVAL); /* not allocated */
    /* The whole table replaces KVM's: the default pins must still be routed. */
    struct kvm_irq_level line = {.irq = 4, .level = 1};
    CHECK(ioctl(vm->vm_fd, KVM_IRQ_LINE, &line) == 0);
    line.level = 0;
    CHECK(ioctl(vm->vm_fd, KVM_IRQ_LINE, &line) == 0);
    vfmig_irq_free_gsi(irq, g);
    CHECK(!vfmig_irq_route_ready(irq, g) && vfmig_irq_commit(irq, &err) == 0);
    uint32_t n = 0, x;
    while (vfmig_irq_alloc_gsi(irq, &x, &err) == 0)
        n++;
    CHECK(n == VFMIG_IRQ_MAX_GSI - VFMIG_IRQ_PINS - 1 && strstr(err.msg, "in use"));
    CHECK_FAILS(vfmig_irq_irqfd(irq, -1, g, 1, &err), err, "bad fd");
    vfmig_vm_destroy(vm);
    printf("test_irq: ok\n");
}

struct racer {
    struct vfmig_pci_func *f;
    _Atomic int stop, sent, pending, bad;
};

static void *notify_loop(void *arg)
{
    struct racer *r = arg;
    while (!atomic_load(&r->stop)) {
        int v = vfmig_pci_msix_notify(r->f, 0);
        atomic_fetch_add(v == 1 ? &r->sent : v == 0 ? &r->pending : &r->bad, 1);
        (void)vfmig_pci_bus_master(r->f);
    }
    return NULL;
}

/* A device thread raising a vector while the guest masks, unmasks and re-routes it: every
 * notification is sent or left pending, nothing stays pending once all is unmasked, and (under
 * TSan) no data race. */
static void test_concurrency(void)
{
    struct vfmig_vm *vm = make_vm();
    struct tdev *t = tdev_new(vm, "fn", &standard, 1);
    lapic_enable(&vm->vcpus[0]);
    place_bars(vm, 1);
    uint32_t x = find_cap(vm, 0x11);
    cfg_wr(vm, 0, x + 2, 0x8000, 2);
    msix_program(vm, 0, 0x50, 0);
    struct racer r = {.f = &t->f};
    pthread_t th;
    CHECK(pthread_create(&th, NULL, notify_loop, &r) == 0);
    /* At least 300 rounds, and on until both outcomes were seen (a loaded host may keep the
     * thread off the CPU for a while). */
    for (uint32_t i = 0; i < 300 || ((!atomic_load(&r.sent) || !atomic_load(&r.pending)) && i < 100000); i++) {
        cfg_wr(vm, 0, x + 2, i % 3 == 0 ? 0xC000 : 0x8000, 2); /* function mask on every third */
        mm_wr(vm, BAR1_AT + 12, i % 2, 4);                     /* vector mask on every other */
        mm_wr(vm, BAR1_AT + 8, 0x50 + i % 8, 4);               /* re-route while unmasked */
        cfg_wr(vm, 0, 0x04, i % 2 ? 0x0002 : 0x0006, 2);       /* bus master flips */
    }
    atomic_store(&r.stop, 1);
    CHECK(pthread_join(th, NULL) == 0);
    cfg_wr(vm, 0, x + 2, 0x8000, 2);
    mm_wr(vm, BAR1_AT + 12, 0, 4);
    CHECK(r.bad == 0 && r.sent > 0 && r.pending > 0 && pba(vm) == 0);
    vfmig_vm_destroy(vm);
    printf("test_concurrency: ok (%d sent, %d left pending)\n", atomic_load(&r.sent), atomic_load(&r.pending));
}

/* Builder and attach refusals; numbering of a second function; the host's latch record. */
static void test_builder(void)
{
    struct vfmig_err err = {{0}};
    struct vfmig_vm *vm = make_vm();
    struct vfmig_pci_func *f = calloc(1, sizeof(*f));
    CHECK(f);
    struct vfmig_pci_ids ids = {.vendor = 0x1B36, .device = 0x10F0};
    CHECK(vfmig_pci_func_init(f, vm, "f", &ids, &err) == 0);
    CHECK_FAILS(vfmig_pci_add_bar(f, 6, 4096, NULL, &err), err, "BAR 6");
    CHECK_FAILS(vfmig_pci_add_bar(f, 0, 4096 + 1, NULL, &err), err, "not a power of two");
    CHECK_FAILS(vfmig_pci_add_bar(f, 0, 2048, NULL, &err), err, "not a power of two");
    CHECK(vfmig_pci_add_bar(f, 0, 4096, NULL, &err) == 0);
    CHECK_FAILS(vfmig_pci_add_bar(f, 0, 4096, NULL, &err), err, "already added");
    CHECK_FAILS(vfmig_pci_add_msix(f, 0, 0, 0, 0x800, &err), err, "0 MSI-X vectors");
    CHECK_FAILS(vfmig_pci_add_msix(f, 33, 0, 0, 0x800, &err), err, "33 MSI-X vectors");
    CHECK_FAILS(vfmig_pci_add_msix(f, 4, 1, 0, 0x800, &err), err, "must be added first");
    CHECK_FAILS(vfmig_pci_add_msix(f, 4, 0, 4, 0x800, &err), err, "8-byte aligned");
    CHECK_FAILS(vfmig_pci_add_msix(f, 4, 0, 0, 0x1000, &err), err, "does not fit");
    CHECK_FAILS(vfmig_pci_add_msix(f, 4, 0, 0, 0x30, &err), err, "overlap");
    CHECK_FAILS(vfmig_pci_add_doorbell(f, 0, 0, 0, &err), err, "with a handler");
    CHECK(vfmig_pci_add_msix(f, 32, 0, 0, 0x800, &err) == 0);
    CHECK_FAILS(vfmig_pci_add_msix(f, 1, 0, 0, 0x800, &err), err, "already has MSI-X");
    CHECK(vfmig_pci_add_migcap(f, &err) == 0);
    CHECK_FAILS(vfmig_pci_add_migcap(f, &err), err, "already has");
    CHECK(vfmig_pci_add_pcie_cap(f, &err) == 0);
    CHECK_FAILS(vfmig_pci_add_pcie_cap(f, &err), err, "already has");
    CHECK(vfmig_pci_attach(vm, f, &err) == 0);
    struct tdev *t = tdev_new(vm, "second", &standard, 1);
    CHECK(t->f.devfn == 1 << 3 && f->devfn == 0);
    CHECK(cfg_rd(vm, 1, 0x00, 4) == (0x10F0u << 16 | 0x1B36u));
    struct tdev *dup = tdev_new(vm, "f", &standard, 0);
    CHECK_FAILS(vfmig_pci_attach(vm, &dup->f, &err), err, "exists");
    tdev_free(dup);

    struct vfmig_device *host = vfmig_vm_find_device(vm, "pci-host");
    uint8_t rec[8];
    outl_addr(vm, bdf(0, 1, 0, 0x10));
    CHECK(host->save(host, rec, 3) == -ENOSPC && host->save(host, rec, sizeof(rec)) == 4);
    outl_addr(vm, 0);
    CHECK(host->load(host, rec, 4) == 0 && host_io(vm, "pci-host", VFMIG_PCI_CONFIG_ADDR, 0, 4, 0) == bdf(0, 1, 0, 0x10));
    CHECK(host->load(host, rec, 3) == -EINVAL);
    rec[0] |= 1;
    CHECK(host->load(host, rec, 4) == -EINVAL);

    /* f has no destroy hook: its owner releases it while the VM lives, and frees it after. */
    vfmig_pci_func_release(f);
    vfmig_pci_func_release(f); /* a second release does nothing */
    CHECK(cfg_rd(vm, 0, 0x00, 4) == ONES32); /* and the host no longer sees it */
    vfmig_vm_destroy(vm);
    free(f);
    printf("test_builder: ok\n");
}

int main(void)
{
    struct vfmig_vm *a = make_vm();
    struct tdev *t = tdev_new(a, "fn", &standard, 1);
    test_enumerate(a);
    test_cap_chain(a);
    test_masks(a, t);
    test_bars(a, t);
    test_msix(a, t);
    test_doorbell(a, t);
    test_migcap(a, t);
    static uint8_t blob[8192];
    size_t len = 0;
    test_state_roundtrip(a, t, blob, &len);
    test_state_rejections(blob, len);
    vfmig_vm_destroy(a);
    test_builder();
    test_irq();
    test_concurrency();
    printf("test_pci: ok\n");
    return 0;
}
