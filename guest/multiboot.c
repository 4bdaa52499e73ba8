/* Under a multiboot loader (the QEMU baseline) nobody writes our boot parameters: derive
 * defaults from the multiboot memory info so the same image runs unchanged. */
#include "runtime.h"

void multiboot_setup(uint32_t mbi);

/* "wss=N" (MiB) on the multiboot command line limits the working set, so the baseline runs
 * the same workload as a vfmig run with --wss. */
static uint32_t cmdline_wss_mib(uint32_t mbi)
{
    if (!(*(volatile uint32_t *)mbi & 4))
        return 0;
    const volatile char *p = (const volatile char *)*(volatile uint32_t *)(mbi + 16);
    for (; *p; p++) {
        if (p[0] == 'w' && p[1] == 's' && p[2] == 's' && p[3] == '=') {
            uint32_t v = 0;
            for (p += 4; *p >= '0' && *p <= '9'; p++)
                v = v * 10 + (uint32_t)(*p - '0');
            return v;
        }
    }
    return 0;
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
    uint32_t wss_mib = cmdline_wss_mib(mbi);
    if (wss_mib && (uint64_t)wss_mib << 20 < bp->wss_bytes)
        bp->wss_bytes = (uint64_t)wss_mib << 20;
    bp->ps_per_page = 0;
    bp->clock_every = 256;
    bp->gap_threshold_ns = 500000;
    bp->width = 1;
    bp->seed = 1;
    bp->clock_mmio = 0;
}
