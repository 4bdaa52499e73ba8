/* PCI configuration mechanism #1 for the guests: bus 0, function 0 only (all the VMM has).
 * Every access is two port exits (~35 us each here), so callers read each register once. */
#ifndef GUEST_PCI_H
#define GUEST_PCI_H
#include "runtime.h"
#include "vfmig/simvf_abi.h"

#define PCI_VENDOR_ID     0x00u
#define PCI_DEVICE_ID     0x02u
#define PCI_COMMAND       0x04u
#define PCI_STATUS        0x06u
#define PCI_HEADER_TYPE   0x0Eu
#define PCI_BAR0          0x10u
#define PCI_CAP_PTR       0x34u
#define PCI_COMMAND_MEMORY  0x0002u
#define PCI_COMMAND_MASTER  0x0004u
#define PCI_COMMAND_INTX_OFF 0x0400u
#define PCI_STATUS_CAP_LIST 0x0010u
#define PCI_BAR_IO          0x1u
#define PCI_BAR_TYPE_MASK   0x6u
#define PCI_BAR_TYPE_64     0x4u
#define PCI_CAP_ID_MSIX     0x11u
#define PCI_MSIX_CTRL       0x02u  /* u16: table size - 1 in bits 0..10 */
#define PCI_MSIX_TABLE      0x04u  /* u32: offset | BIR */
#define PCI_MSIX_PBA        0x08u
#define PCI_MSIX_ENABLE     0x8000u
#define PCI_MSIX_MASKALL    0x4000u

static inline uint32_t pci_bdf(uint32_t dev) { return dev << 3; } /* bus 0, function 0 */

static inline void pci_select(uint32_t bdf, uint32_t reg)
{
    outl(VFMIG_PCI_CONFIG_ADDR, 0x80000000u | bdf << 8 | (reg & 0xFCu));
}

static inline uint32_t pci_read32(uint32_t bdf, uint32_t reg)
{
    pci_select(bdf, reg);
    return inl(VFMIG_PCI_CONFIG_DATA);
}
static inline uint16_t pci_read16(uint32_t bdf, uint32_t reg)
{
    pci_select(bdf, reg);
    return inw((uint16_t)(VFMIG_PCI_CONFIG_DATA + (reg & 2)));
}
static inline uint8_t pci_read8(uint32_t bdf, uint32_t reg)
{
    pci_select(bdf, reg);
    return inb((uint16_t)(VFMIG_PCI_CONFIG_DATA + (reg & 3)));
}
static inline void pci_write32(uint32_t bdf, uint32_t reg, uint32_t v)
{
    pci_select(bdf, reg);
    outl(VFMIG_PCI_CONFIG_DATA, v);
}
static inline void pci_write16(uint32_t bdf, uint32_t reg, uint16_t v)
{
    pci_select(bdf, reg);
    outw((uint16_t)(VFMIG_PCI_CONFIG_DATA + (reg & 2)), v);
}
static inline void pci_write8(uint32_t bdf, uint32_t reg, uint8_t v)
{
    pci_select(bdf, reg);
    outb((uint16_t)(VFMIG_PCI_CONFIG_DATA + (reg & 3)), v);
}

/* The first device on bus 0 with this vendor and device ID: its bdf, or -1. */
static inline int pci_find(uint16_t vendor, uint16_t device)
{
    for (uint32_t dev = 0; dev < 32; dev++) {
        uint32_t id = pci_read32(pci_bdf(dev), PCI_VENDOR_ID);
        if ((id & 0xFFFFu) == vendor && id >> 16 == device)
            return (int)pci_bdf(dev);
    }
    return -1;
}

/* Config offset of the first capability with this ID for which match(bdf, offset) agrees
 * (match may be NULL), or 0. The walk is bounded: a looping list must not hang the guest. */
static inline uint32_t pci_find_cap(uint32_t bdf, uint8_t id, int (*match)(uint32_t bdf, uint32_t off))
{
    if (!(pci_read16(bdf, PCI_STATUS) & PCI_STATUS_CAP_LIST))
        return 0;
    uint32_t off = pci_read8(bdf, PCI_CAP_PTR) & 0xFCu;
    for (int n = 0; off >= 0x40 && n < 48; n++) {
        uint32_t head = pci_read16(bdf, off);
        if ((head & 0xFFu) == id && (!match || match(bdf, off)))
            return off;
        off = (head >> 8) & 0xFCu;
    }
    return 0;
}

/* Size memory BAR bar and place it naturally aligned at or above *next, below limit; memory
 * decode must be off. Returns its address and advances *next, or 0 if the BAR is absent, an
 * I/O BAR, or does not fit. A 64-bit BAR gets 0 in its upper half. */
static inline uint32_t pci_assign_bar(uint32_t bdf, uint32_t bar, uint32_t *next, uint32_t limit)
{
    uint32_t reg = PCI_BAR0 + bar * 4;
    uint32_t orig = pci_read32(bdf, reg);
    if (orig & PCI_BAR_IO)
        return 0;
    pci_write32(bdf, reg, 0xFFFFFFFFu);
    uint32_t probe = pci_read32(bdf, reg) & ~0xFu;
    if (!probe)
        return 0;
    uint32_t size = ~probe + 1;
    uint32_t addr = (*next + size - 1) & ~(size - 1);
    if (addr < *next || addr - 1 + size > limit - 1)
        return 0;
    pci_write32(bdf, reg, addr);
    if ((orig & PCI_BAR_TYPE_MASK) == PCI_BAR_TYPE_64)
        pci_write32(bdf, reg + 4, 0);
    *next = addr + size;
    return addr;
}
#endif
