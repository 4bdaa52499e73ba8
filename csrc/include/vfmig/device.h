/* The device interface. Every device model (the built-in console and clock, the in-kernel
 * irqchip, later simvf and real VFIO) plugs into the VM through this one struct. */
#ifndef VFMIG_DEVICE_H
#define VFMIG_DEVICE_H
#include <stddef.h>
#include <stdint.h>

struct vfmig_vm;
struct vfmig_vcpu;
struct vfmig_migration; /* migstate.h */
struct vfmig_dma_log;   /* dma_log.h */

enum vfmig_space { VFMIG_SPACE_PIO = 1, VFMIG_SPACE_MMIO = 2, VFMIG_SPACE_NONE = 3 };

struct vfmig_device {
    const char *name;      /* unique per VM; names the device-state record in the stream */
    enum vfmig_space space;
    uint64_t base, len;    /* address range it claims, when space is PIO or MMIO */
    void *opaque;

    /* Access from a vCPU thread. Runs on that vCPU's thread with no VM lock held; must not
     * block. data is little-endian, len 1..8. Returns 0, or -errno to stop the vCPU. */
    int (*access)(struct vfmig_device *d, struct vfmig_vcpu *cpu, uint64_t addr, uint8_t *data,
                  uint32_t len, int is_write);

    /* Save the device state into buf (cap bytes). Called with all vCPUs paused. Returns the
     * length written, or -errno (-ENOSPC if cap is too small). NULL: the device is stateless. */
    long (*save)(struct vfmig_device *d, uint8_t *buf, size_t cap);

    /* Load state saved by save(). Called before any vCPU runs. Validates everything it reads;
     * returns 0 or -errno. */
    int (*load)(struct vfmig_device *d, const uint8_t *buf, size_t len);

    /* The VM stops (running = 0) after its vCPUs park, and starts (1) before they run again,
     * like VFIO's RUNNING <-> STOP. When it returns 0, the device issues no more DMA and raises
     * no interrupts. The pausing thread calls it; no VM lock held. NULL: nothing to quiesce. */
    void (*set_running)(struct vfmig_device *d, int running);

    void (*destroy)(struct vfmig_device *d);

    /* Migration in the VFIO v2 model (migstate.h): the state machine, chunked data and precopy.
     * When set, the engine moves the device through it instead of save/load/set_running, and a
     * VM pause or resume maps onto it (vfmig_mig_set_running). NULL: save/load as above. */
    struct vfmig_migration *mig;
    /* The device's DMA dirty log (dma_log.h), drained by the dirty tracker. NULL: no DMA. */
    struct vfmig_dma_log *dma_log;
};

#endif
