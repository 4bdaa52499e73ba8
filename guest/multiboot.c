/* Under a multiboot loader (the QEMU baseline) nobody writes our boot parameters: derive
 * defaults from the multiboot memory info so the same image runs unchanged. */
#include "runtime.h"

void multiboot_setup(uint32_t mbi);

/* enum guest_clock (runtime.h). In .data, so the image itself holds the 0 (the VMM's clock). */
uint32_t guest_clock __attribute__((section(".data"))) = GUEST_CLOCK_VMM;

/* The value of "key=" on the multiboot command line, or NULL. */
static const volatile char *cmdline_value(uint32_t mbi, const char *key)
{
    if (!(*(volatile uint32_t *)mbi & 4))
        return 0;
    for (const volatile char *p = (const volatile char *)*(volatile uint32_t *)(mbi + 16); *p; p++) {
        uint32_t i = 0;
        while (key[i] && p[i] == key[i])
            i++;
        if (!key[i] && (p == (const volatile char *)*(volatile uint32_t *)(mbi + 16) || p[-1] == ' '))
            return p + i;
    }
    return 0;
}

/* Does the value at p (ended by a space or the end) equal word? */
static int value_is(const volatile char *p, const char *word)
{
    uint32_t i = 0;
    for (; word[i]; i++)
        if (p[i] != word[i])
            return 0;
    return p[i] == 0 || p[i] == ' ';
}

/* The number after "key=" on the command line, 0 if none. */
static uint32_t cmdline_number(uint32_t mbi, const char *key)
{
    const volatile char *p = cmdline_value(mbi, key);
    uint32_t v = 0;
    for (; p && *p >= '0' && *p <= '9'; p++)
        v = v * 10 + (uint32_t)(*p - '0');
    return v;
}

static void cpuid(uint32_t leaf, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

/* KVM's paravirtual clock with the new MSRs (CPUID 0x40000001 EAX bit 3)? */
static int have_kvmclock(void)
{
    uint32_t a, b, c, d;
    cpuid(0x40000000u, &a, &b, &c, &d);
    if (b != 0x4b4d564bu || c != 0x564b4d56u || d != 0x4du || a < 0x40000001u) /* "KVMKVMKVM\0\0\0" */
        return 0;
    cpuid(0x40000001u, &a, &b, &c, &d);
    return (a >> 3) & 1;
}

/* "clock=tsc" or "clock=kvmclock": the clock to read instead of the VMM's clock device, which
 * QEMU does not have. Says on the console which one the guest runs with. */
static void cmdline_clock(uint32_t mbi)
{
    const volatile char *p = cmdline_value(mbi, "clock=");
    if (p && value_is(p, "kvmclock")) {
        if (have_kvmclock()) {
            volatile struct pvclock_vcpu_time_info *pv = (volatile struct pvclock_vcpu_time_info *)GUEST_PVCLOCK_GPA;
            pv->version = 0;
            wrmsr(MSR_KVM_SYSTEM_TIME_NEW, GUEST_PVCLOCK_GPA | 1u); /* bit 0: enable */
            for (uint32_t spins = 0; spins < 100000000u && (pv->version == 0 || (pv->version & 1)); spins++)
                ;
            if (pv->version && !(pv->version & 1)) {
                guest_clock = GUEST_CLOCK_KVMCLOCK;
                puts_console("clock: kvmclock\n");
                return;
            }
        }
        puts_console("clock: no kvmclock here\n");
        guest_clock = GUEST_CLOCK_TSC;
    } else if (p && value_is(p, "tsc")) {
        guest_clock = GUEST_CLOCK_TSC;
    }
    if (guest_clock == GUEST_CLOCK_TSC)
        puts_console("clock: tsc\n");
}

void multiboot_setup(uint32_t mbi)
{
    volatile struct vfmig_boot_params *bp = (volatile struct vfmig_boot_params *)VFMIG_BOOT_GPA;
    uint32_t flags = *(volatile uint32_t *)mbi;
    uint32_t mem_upper_kib = (flags & 1) ? *(volatile uint32_t *)(mbi + 8) : 60u << 10;
    uint32_t top = 0x100000u + mem_upper_kib * 1024u;
    bp->magic = VFMIG_BOOT_MAGIC;
    bp->version = VFMIG_BOOT_VERSION;
    bp->vcpus = 1;
    bp->pattern = VFMIG_PATTERN_SEQ;
    bp->wss_gpa = VFMIG_DATA_GPA;
    bp->wss_bytes = (top - VFMIG_DATA_GPA) & ~(VFMIG_PAGE_SIZE - 1);
    /* "wss=N" (MiB) limits the working set, so the baseline runs the same workload as a vfmig
     * run with --wss; "pattern=fresh" runs the fresh pattern (otherwise: sequential);
     * "gap=N" sets the gap ring's threshold in us (under clock=tsc, in thousands of TSC ticks). */
    uint32_t wss_mib = cmdline_number(mbi, "wss=");
    if (wss_mib && (uint64_t)wss_mib << 20 < bp->wss_bytes)
        bp->wss_bytes = (uint64_t)wss_mib << 20;
    bp->ps_per_page = 0;
    bp->clock_every = 256;
    const volatile char *pattern = cmdline_value(mbi, "pattern=");
    if (pattern && value_is(pattern, "fresh")) {
        bp->pattern = VFMIG_PATTERN_FRESH;
        bp->clock_every = 1; /* as GuestParams: a fresh page takes as long as ~1000 increments */
        puts_console("pattern: fresh\n");
    }
    uint32_t gap_us = cmdline_number(mbi, "gap=");
    bp->gap_threshold_ns = gap_us && gap_us < 4000000u ? gap_us * 1000u : 500000u;
    bp->width = 1;
    bp->seed = 1;
    bp->clock_mmio = 0;
    cmdline_clock(mbi);
}
