/* idle: touches every page of its slice once, then halts with interrupts off. */
#include "runtime.h"

void guest_main(uint32_t id)
{
    volatile struct vfmig_vcpu_stats *st = vcpu_stats(id);
    uint32_t base, pages;
    vcpu_slice(id, &base, &pages);
    st->state = VFMIG_GUEST_RUNNING;
    clock_tick(st, boot_params()->gap_threshold_ns);
    for (uint32_t i = 0; i < pages; i++) {
        *(volatile uint8_t *)(base + i * VFMIG_PAGE_SIZE) = (uint8_t)(i | 1);
        st->touches = st->touches + 1;
    }
    st->passes = 1;
    st->state = VFMIG_GUEST_IDLE;
    if (id == 0)
        puts_console("idle: memory touched, halting\n");
    for (;;)
        __asm__ volatile("cli; hlt");
}
