/* The contract between the micro-VMM and its freestanding 32-bit guests.
 * Included by both sides, so it uses only fixed-width types and no libc. */
#ifndef VFMIG_GUEST_ABI_H
#define VFMIG_GUEST_ABI_H

#ifdef VFMIG_GUEST
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
#else
#include <stdint.h>
#endif

/* Guest-physical layout (low memory). */
#define VFMIG_GDT_GPA        0x1000u   /* null, flat code (0x08), flat data (0x10) */
#define VFMIG_BOOT_GPA       0x2000u   /* struct vfmig_boot_params, written by the VMM */
#define VFMIG_STATS_GPA      0x3000u   /* struct vfmig_vcpu_stats[VFMIG_MAX_VCPUS] */
#define VFMIG_STACK_TOP      0x80000u  /* vCPU i: stack top = VFMIG_STACK_TOP - i*VFMIG_STACK_SIZE */
#define VFMIG_STACK_SIZE     0x4000u
#define VFMIG_CODE_GPA       0x100000u /* guest image load address and entry */
#define VFMIG_CODE_MAX       0x100000u
#define VFMIG_DATA_GPA       0x400000u /* default working-set start */
#define VFMIG_LOW_RAM_MAX    0xC0000000ull /* RAM above this GPA lives in a second slot at 4 GiB */
#define VFMIG_HIGH_RAM_GPA   0x100000000ull
#define VFMIG_MAX_VCPUS      8
#define VFMIG_PAGE_SIZE      4096u

/* I/O ports. */
#define VFMIG_PORT_CONSOLE   0xE9      /* outb: one character */
#define VFMIG_PORT_CLOCK_LO  0x5F0     /* inl: CLOCK_MONOTONIC ns, low half; latches the high half (0x510 is QEMU fw_cfg) */
#define VFMIG_PORT_CLOCK_HI  0x5F4     /* inl: the latched high half */
#define VFMIG_MMIO_CLOCK     0xFEB00000u /* the same clock as MMIO: low half at +0, high at +4 */

#define VFMIG_BOOT_MAGIC     0x544F4256u /* "VBOT" */
#define VFMIG_BOOT_VERSION   1u

/* SEQ, RANDOM and HOTCOLD increment one byte (or word) per touched page; FRESH walks the working
 * set like SEQ but rewrites every page whole (4096 bytes) with new pseudo-random data each pass,
 * so a page's XOR delta against its previous copy is the whole page and it does not compress. */
enum vfmig_pattern { VFMIG_PATTERN_SEQ = 0, VFMIG_PATTERN_RANDOM = 1, VFMIG_PATTERN_HOTCOLD = 2, VFMIG_PATTERN_FRESH = 3 };
/* How the VF driver (vfdrv) answers the migration capability's notice (simvf_abi.h), for
 * testing the VMM's handshake: NORMAL quiesces and acks at once; NEVER is a stuck driver (it
 * neither quiesces nor acks, and still handles what comes after); LATE quiesces and acks after
 * 500 ms, past any deadline; SLOW quiesces and acks after ack_delay_us. */
enum vfmig_guest_ack { VFMIG_ACK_NORMAL = 0, VFMIG_ACK_NEVER = 1, VFMIG_ACK_LATE = 2, VFMIG_ACK_SLOW = 3 };

struct vfmig_boot_params {
    uint32_t magic;
    uint32_t version;
    uint32_t vcpus;
    uint32_t pattern;          /* enum vfmig_pattern */
    uint64_t wss_gpa;          /* working set: [wss_gpa, wss_gpa + wss_bytes), split evenly over vCPUs */
    uint64_t wss_bytes;
    uint32_t ps_per_page;      /* per vCPU throttle: picoseconds per page, 0 = as fast as possible */
    uint32_t clock_every;      /* pages between clock reads (power of two) */
    uint32_t gap_threshold_ns; /* clock gaps longer than this are logged in the gap ring */
    uint32_t hot_pct;          /* hot/cold: share of touches that go to the hot set */
    uint32_t hot_size_pct;     /* hot/cold: size of the hot set, % of the slice */
    uint32_t width;            /* bytes incremented per page: 1 or 4 */
    uint32_t seed;
    uint32_t clock_mmio;       /* read the clock through MMIO instead of ports */
    uint32_t guest_ack;        /* enum vfmig_guest_ack: how vfdrv answers a migration notice */
    uint32_t ack_delay_us;     /* VFMIG_ACK_SLOW: the ack's delay after the notice, in us */
};

struct vfmig_gap {
    uint64_t start_ns; /* guest clock read before the gap */
    uint64_t len_ns;
};

#define VFMIG_GAP_RING 16
#define VFMIG_STATS_STRIDE 512u

enum vfmig_guest_state { VFMIG_GUEST_BOOTING = 0, VFMIG_GUEST_RUNNING = 1, VFMIG_GUEST_IDLE = 2 };

/* One per vCPU at VFMIG_STATS_GPA + id * VFMIG_STATS_STRIDE. Lives in guest RAM, so it migrates. */
struct vfmig_vcpu_stats {
    uint64_t touches;        /* pages incremented since boot: the guest's counter */
    uint64_t passes;         /* full passes over the slice */
    uint64_t first_clock_ns;
    uint64_t last_clock_ns;
    uint64_t max_gap_ns;     /* largest gap between consecutive clock reads */
    uint64_t max_gap_start_ns;
    uint32_t state;          /* enum vfmig_guest_state */
    uint32_t gap_count;      /* gaps logged so far; the ring holds the last VFMIG_GAP_RING */
    struct vfmig_gap gaps[VFMIG_GAP_RING];
};

#endif
