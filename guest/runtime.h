/* Tiny freestanding runtime shared by the guest programs: port I/O, the clock, stats. */
#ifndef GUEST_RUNTIME_H
#define GUEST_RUNTIME_H
#define VFMIG_GUEST 1
#include "vfmig/guest_abi.h"

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0,%1" ::"a"(v), "Nd"(port)); }
static inline uint32_t inl(uint16_t port)
{
    uint32_t v;
    __asm__ volatile("inl %1,%0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0,%1" ::"a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0,%1" ::"a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1,%0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline uint16_t inw(uint16_t port)
{
    uint16_t v;
    __asm__ volatile("inw %1,%0" : "=a"(v) : "Nd"(port));
    return v;
}

/* 32-bit device registers (no paging: a GPA is the address). */
static inline uint32_t mmio_read32(uint32_t gpa) { return *(volatile uint32_t *)gpa; }
static inline void mmio_write32(uint32_t gpa, uint32_t v) { *(volatile uint32_t *)gpa = v; }

static inline const volatile struct vfmig_boot_params *boot_params(void)
{
    return (const volatile struct vfmig_boot_params *)VFMIG_BOOT_GPA;
}

static inline volatile struct vfmig_vcpu_stats *vcpu_stats(uint32_t id)
{
    return (volatile struct vfmig_vcpu_stats *)(VFMIG_STATS_GPA + id * VFMIG_STATS_STRIDE);
}

/* Where clock_ns() reads time. By default the VMM's clock device (vfmig: port 0x5F0, or MMIO
 * when the boot parameters say so). QEMU has no such device (an unassigned port reads all ones,
 * a clock that never moves), so under a multiboot loader "clock=tsc" or "clock=kvmclock" on the
 * command line (multiboot.c) picks a clock the CPU or KVM provides instead. */
enum guest_clock { GUEST_CLOCK_VMM = 0, GUEST_CLOCK_TSC = 1, GUEST_CLOCK_KVMCLOCK = 2 };
extern uint32_t guest_clock; /* multiboot.c: GUEST_CLOCK_VMM unless multiboot_setup chose another */

/* clock=kvmclock: vCPU 0's pvclock_vcpu_time_info (KVM's ABI), registered by multiboot_setup in
 * the free page after the stats. The multiboot setup runs one vCPU. */
#define GUEST_PVCLOCK_GPA 0x4000u
#define MSR_KVM_SYSTEM_TIME_NEW 0x4b564d01u
struct pvclock_vcpu_time_info {
    uint32_t version; /* odd while KVM updates it */
    uint32_t pad0;
    uint64_t tsc_timestamp;
    uint64_t system_time; /* ns at tsc_timestamp */
    uint32_t tsc_to_system_mul;
    signed char tsc_shift;
    uint8_t flags;
    uint8_t pad[2];
};

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

static inline void wrmsr(uint32_t msr, uint64_t v)
{
    __asm__ volatile("wrmsr" ::"c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)) : "memory");
}

/* (a * mul) >> 32 without a 128-bit product (32-bit code). */
static inline uint64_t mul_u64_u32_shr32(uint64_t a, uint32_t mul)
{
    return (uint64_t)(uint32_t)(a >> 32) * mul + (((uint64_t)(uint32_t)a * mul) >> 32);
}

static inline uint64_t kvmclock_ns(void)
{
    const volatile struct pvclock_vcpu_time_info *p = (const volatile struct pvclock_vcpu_time_info *)GUEST_PVCLOCK_GPA;
    uint32_t version;
    uint64_t ns;
    do {
        version = p->version;
        __asm__ volatile("" ::: "memory");
        uint64_t delta = rdtsc() - p->tsc_timestamp;
        signed char shift = p->tsc_shift;
        delta = shift < 0 ? delta >> -shift : delta << shift;
        ns = p->system_time + mul_u64_u32_shr32(delta, p->tsc_to_system_mul);
        __asm__ volatile("" ::: "memory");
    } while ((version & 1) || version != p->version);
    return ns;
}

/* The guest's clock: ns, except under clock=tsc, where it is raw TSC ticks (the host scales them
 * with the TSC frequency; the gap threshold is then in ticks too). */
static inline uint64_t clock_ns(void)
{
    if (guest_clock == GUEST_CLOCK_TSC)
        return rdtsc();
    if (guest_clock == GUEST_CLOCK_KVMCLOCK)
        return kvmclock_ns();
    if (boot_params()->clock_mmio) {
        volatile uint32_t *mmio = (volatile uint32_t *)VFMIG_MMIO_CLOCK;
        uint32_t lo = mmio[0]; /* latches the high half for this vCPU */
        return ((uint64_t)mmio[1] << 32) | lo;
    }
    uint32_t lo = inl(VFMIG_PORT_CLOCK_LO); /* latches the high half for this vCPU */
    uint32_t hi = inl(VFMIG_PORT_CLOCK_HI);
    return ((uint64_t)hi << 32) | lo;
}

static inline void puts_console(const char *s)
{
    while (*s)
        outb(VFMIG_PORT_CONSOLE, (uint8_t)*s++);
}

/* Read the clock and account the gap since the previous read; returns now. */
static inline uint64_t clock_tick(volatile struct vfmig_vcpu_stats *st, uint32_t threshold)
{
    uint64_t now = clock_ns();
    uint64_t last = st->last_clock_ns;
    if (last && now > last) {
        uint64_t gap = now - last;
        if (gap > st->max_gap_ns) {
            st->max_gap_ns = gap;
            st->max_gap_start_ns = last;
        }
        if (gap > threshold) {
            uint32_t i = st->gap_count % VFMIG_GAP_RING;
            st->gaps[i].start_ns = last;
            st->gaps[i].len_ns = gap;
            st->gap_count = st->gap_count + 1;
        }
    }
    if (!st->first_clock_ns)
        st->first_clock_ns = now;
    st->last_clock_ns = now;
    return now;
}

/* The slice of the working set that vCPU `id` owns, in pages. */
static inline void vcpu_slice(uint32_t id, uint32_t *first_gpa, uint32_t *pages)
{
    const volatile struct vfmig_boot_params *bp = boot_params();
    uint32_t total = (uint32_t)(bp->wss_bytes / VFMIG_PAGE_SIZE);
    uint32_t n = bp->vcpus ? bp->vcpus : 1;
    uint32_t per = total / n;
    *first_gpa = (uint32_t)bp->wss_gpa + id * per * VFMIG_PAGE_SIZE;
    *pages = per;
}
#endif
