/* simvf, the emulated NIC VF, as its guest driver sees it: PCI identity, BARs, registers,
 * descriptor rings, the packet format and its checksum, the generic migration capability, and
 * where the driver keeps its counters. Included by the VMM and by guest/ (freestanding). */
#ifndef VFMIG_SIMVF_ABI_H
#define VFMIG_SIMVF_ABI_H
#include "vfmig/guest_abi.h"

/* PCI host: configuration mechanism #1. Bus 0 only; the guest enumerates devices 0..31. */
#define VFMIG_PCI_CONFIG_ADDR   0xCF8u   /* outl: 0x80000000 | bus << 16 | dev << 11 | fn << 8 | reg */
#define VFMIG_PCI_CONFIG_DATA   0xCFCu   /* in/out 1, 2 or 4 bytes at 0xCFC + (reg & 3) */
/* Guest-physical window for memory BARs. There is no firmware: the guest assigns BARs itself,
 * naturally aligned, inside this window; the host decodes BARs only inside it. */
#define VFMIG_PCI_MMIO_BASE     0xE0000000u
#define VFMIG_PCI_MMIO_SIZE     0x10000000u

/* Identity: Red Hat's PCI vendor ID (the one QEMU uses for its own emulated devices) with a
 * device ID no real driver claims, so no host or guest driver binds to it by accident. */
#define SIMVF_VENDOR_ID         0x1B36u
#define SIMVF_DEVICE_ID         0x10F0u
#define SIMVF_REVISION          0x01u
#define SIMVF_CLASS             0x020000u /* network controller, Ethernet */
#define SIMVF_SUBSYS_VENDOR_ID  0x1B36u
#define SIMVF_SUBSYS_ID         0x0001u

/* BAR0: registers (32-bit memory, 16 KiB). BAR1: MSI-X table and PBA (32-bit memory, 8 KiB). */
#define SIMVF_BAR_REGS          0
#define SIMVF_BAR_REGS_SIZE     0x4000u
#define SIMVF_BAR_MSIX          1
#define SIMVF_BAR_MSIX_SIZE     0x2000u
#define SIMVF_MSIX_TABLE_OFF    0x0000u
#define SIMVF_MSIX_PBA_OFF      0x1000u

/* MSI-X vectors. */
#define SIMVF_VEC_RX            0u
#define SIMVF_VEC_TX            1u
#define SIMVF_VEC_MIGRATION     2u   /* the default the driver writes into the migration capability */
#define SIMVF_VEC_MISC          3u
#define SIMVF_NUM_VECTORS       4u

/* BAR0 registers: 32 bits wide, 32-bit aligned accesses only (others read ~0, writes ignored). */
#define SIMVF_REG_CTRL          0x000u /* RW: SIMVF_CTRL_* */
#define SIMVF_REG_STATUS        0x004u /* RO: SIMVF_STATUS_* */
#define SIMVF_REG_RX_RING_LO    0x008u /* RW: GPA of the RX descriptor ring (16-byte aligned) */
#define SIMVF_REG_RX_RING_HI    0x00Cu
#define SIMVF_REG_RX_RING_SIZE  0x010u /* RW: entries, a power of two, 0 or 8..SIMVF_RING_MAX */
#define SIMVF_REG_TX_RING_LO    0x018u
#define SIMVF_REG_TX_RING_HI    0x01Cu
#define SIMVF_REG_TX_RING_SIZE  0x020u
#define SIMVF_REG_SENT_LO       0x040u /* RO: packets the wire offered (delivered + dropped) */
#define SIMVF_REG_SENT_HI       0x044u
#define SIMVF_REG_DELIVERED_LO  0x048u /* RO: packets written into RX buffers */
#define SIMVF_REG_DELIVERED_HI  0x04Cu
#define SIMVF_REG_DROPPED_LO    0x050u /* RO: packets dropped: device stopped, or no buffer posted */
#define SIMVF_REG_DROPPED_HI    0x054u
#define SIMVF_REG_TX_OK         0x058u /* RO: TX packets consumed with a good checksum */
#define SIMVF_REG_TX_BAD        0x05Cu /* RO: TX packets with a bad header or checksum */
#define SIMVF_REG_TX_DOORBELL   0x100u /* WO: any value; an ioeventfd, no VM exit to user space */
#define SIMVF_REG_RX_DOORBELL   0x104u /* WO: any value: buffers were posted (ioeventfd) */

#define SIMVF_CTRL_ENABLE       0x1u   /* the wire delivers into the RX ring; TX is processed */
#define SIMVF_CTRL_RESET        0x2u   /* write 1: reset rings, counters keep; reads 0 */
#define SIMVF_STATUS_LINK_UP    0x1u

#define SIMVF_RING_MAX          4096u
#define SIMVF_BUF_MAX           2048u  /* largest packet the wire sends */

/* One descriptor, 16 bytes, in guest RAM. The driver fills addr and len and sets flags to
 * SIMVF_DESC_AVAIL; the device writes the packet, then len = packet bytes and flags =
 * SIMVF_DESC_DONE (TX: flags = DONE, or DONE | ERROR for a bad packet). Ring order, no skips:
 * the device stops at the first descriptor that is not AVAIL. */
struct simvf_desc {
    uint64_t addr;
    uint32_t len;
    uint32_t flags;
};
#define SIMVF_DESC_AVAIL        0x1u
#define SIMVF_DESC_DONE         0x2u
#define SIMVF_DESC_ERROR        0x4u

/* Every packet starts with this header; the payload follows (len - header bytes). */
struct simvf_pkt {
    uint32_t magic;      /* SIMVF_PKT_MAGIC */
    uint32_t len;        /* whole packet, header included: 64..SIMVF_BUF_MAX, a multiple of 4 */
    uint64_t seq;        /* RX: the wire's sequence number, from 0, +1 per packet offered */
    uint64_t drops;      /* RX: the device's dropped count when it wrote this packet */
    uint32_t csum;       /* simvf_csum over the payload words, seeded with seq */
    uint32_t reserved;
};
#define SIMVF_PKT_MAGIC         0x50465653u /* "SVFP" */
#define SIMVF_PKT_MIN           64u

/* The payload checksum: cheap enough for a guest whose every instruction is emulated. */
static inline uint32_t simvf_csum(const volatile uint32_t *w, uint32_t nwords, uint64_t seq)
{
    uint32_t h = (uint32_t)seq ^ (uint32_t)(seq >> 32) ^ 0x9E3779B9u;
    for (uint32_t i = 0; i < nwords; i++)
        h = (h ^ w[i]) * 0x01000193u;
    return h;
}

/* The generic migration capability: a vendor-specific capability (ID 0x09) that any vfmig PCI
 * device model carries when created with migration=on. Nothing in it is SR-IOV specific.
 * Offsets are from the capability's start in config space. */
#define VFMIG_PCI_CAP_ID_VNDR     0x09u
#define VFMIG_MIGCAP_SIZE         0x10u
#define VFMIG_MIGCAP_SIG          0x04u /* RO u32: VFMIG_MIGCAP_SIGNATURE, tells it from other vendor caps */
#define VFMIG_MIGCAP_CTRL         0x08u /* RW u8: VFMIG_MIGCAP_ENABLE: the driver takes part in migration */
#define VFMIG_MIGCAP_IRQ          0x09u /* RW u8: the MSI-X vector for migration notices */
#define VFMIG_MIGCAP_VMM_STATUS   0x0Au /* RO u8 to the guest: VFMIG_VMM_* set by the VMM */
#define VFMIG_MIGCAP_DEV_STATUS   0x0Bu /* RW u8: VFMIG_DEV_* written by the driver */
#define VFMIG_MIGCAP_LOADS        0x0Cu /* RO u8: how many times a VMM loaded this function's state
                                         * (mod 256). A new value is a new post-load notice, so a
                                         * driver that moves twice with the same VMM status still
                                         * sees the second one. */
#define VFMIG_MIGCAP_SIGNATURE    0x4749464Du /* "MFIG" */
#define VFMIG_MIGCAP_ENABLE       0x01u
#define VFMIG_VMM_MIGRATING       0x01u /* migration is about to stop the VM */
#define VFMIG_VMM_MIGRATED        0x02u /* the VM now runs on the destination */
#define VFMIG_VMM_RESET_REQUIRED  0x04u /* the driver did not ack: reinitialise rings and device */
#define VFMIG_DEV_ACK             0x01u /* quiesced: stopped posting, in-flight DMA done */

/* The VF driver's counters in guest RAM (they migrate with it), written by vCPU 0. */
#define SIMVF_GUEST_STATS_GPA     0x5000u
#define SIMVF_GUEST_MAGIC         0x53465647u /* "GVFS" */
enum simvf_guest_state {
    SIMVF_GUEST_PROBING = 0, SIMVF_GUEST_RUNNING = 1, SIMVF_GUEST_NO_DEVICE = 2, SIMVF_GUEST_FAILED = 3
};
struct simvf_guest_stats {
    uint32_t magic;          /* SIMVF_GUEST_MAGIC once the driver started */
    uint32_t state;          /* enum simvf_guest_state */
    uint64_t received;       /* good packets taken from the RX ring */
    uint64_t dropped_seen;   /* sum of sequence gaps, each checked against the packet's drops field */
    uint64_t errors;         /* bad magic, length or checksum, or a gap the drop count does not explain */
    uint64_t next_seq;       /* the sequence number expected next */
    uint64_t last_drops;     /* the drops field of the last good packet */
    uint64_t tx_sent;        /* TX packets posted */
    uint64_t interrupts;     /* RX interrupts handled */
    uint32_t bdf;            /* where enumeration found the device: bus << 8 | dev << 3 | fn */
    uint32_t first_error;    /* which check failed first: SIMVF_ERR_* */
    /* The migration handshake (the capability above), as the driver took part in it. The
     * oracle's books balance: received + dropped_seen + resync_skipped == next_seq; and the
     * device's: delivered == received + reset_discarded + what waits in the RX ring. */
    uint64_t mig_notices;      /* migration interrupts that found MIGRATING: a stop is coming */
    uint64_t acks;             /* DEV_STATUS = VFMIG_DEV_ACK written */
    uint64_t resets;           /* post-load with RESET_REQUIRED: device, rings and oracle restarted */
    uint64_t resumed_in_place; /* post-load without it: held-back buffers re-posted */
    uint64_t cancels;          /* VMM_STATUS back to 0 after a notice: the migration failed, resumed */
    uint64_t resync_skipped;   /* sequence numbers passed over when the oracle restarted after a reset */
    uint32_t last_vmm_status;  /* VMM_STATUS as the last migration interrupt read it */
    uint32_t quiesced;         /* 1 while RX re-posting and TX are held back for a migration */
    uint64_t reset_discarded;  /* packets a reset threw out of the RX ring unread */
};
enum simvf_guest_error { SIMVF_ERR_NONE = 0, SIMVF_ERR_MAGIC = 1, SIMVF_ERR_LEN = 2, SIMVF_ERR_CSUM = 3, SIMVF_ERR_GAP = 4 };

#endif
