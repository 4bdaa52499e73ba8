/* Under a multiboot loader (the QEMU baseline) nobody writes our boot parameters: derive
 * defaults from the multiboot memory info so the same image runs unchanged. */
#include "runtime.h"

void multiboot_setup(uint32_t mbi);

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
    bp->ps_per_page = 0;
    bp->clock_every = 256;
    bp->gap_threshold_ns = 500000;
    bp->width = 1;
    bp->seed = 1;
}
