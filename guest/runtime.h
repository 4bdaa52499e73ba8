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

static inline uint64_t clock_ns(void)
{
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
