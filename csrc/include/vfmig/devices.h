/* The built-in device models. Each constructor returns a device ready for vfmig_vm_add_device,
 * or NULL on allocation failure. */
#ifndef VFMIG_DEVICES_H
#define VFMIG_DEVICES_H
#include "vfmig/device.h"

/* Debug console on VFMIG_PORT_CONSOLE: keeps the last 64 KiB the guest printed. */
struct vfmig_device *vfmig_console_new(void);
/* Copies up to cap bytes of console output (oldest first); returns the length. */
size_t vfmig_console_read(struct vfmig_device *d, char *buf, size_t cap);

/* Host CLOCK_MONOTONIC in ns: reading base returns the low half and latches the high half
 * (per vCPU) for base + 4. Built in twice: ports VFMIG_PORT_CLOCK_LO and MMIO VFMIG_MMIO_CLOCK. */
struct vfmig_device *vfmig_clock_new(const char *name, enum vfmig_space space, uint64_t base);
/* Test knob, a vCPU stuck in a device: the next accesses to this clock from up to `vcpus` vCPUs
 * block inside the access until the knob is set to 0 (or the VM is torn down). Any thread.
 * 0, or -EINVAL if d is not a clock. */
int vfmig_clock_hold(struct vfmig_device *d, uint32_t vcpus);
/* Waits until at least count vCPUs are blocked by the hold. Any thread; blocks up to
 * timeout_ms. 0, -ETIMEDOUT, or -EINVAL if d is not a clock. */
int vfmig_clock_wait_held(struct vfmig_device *d, uint32_t count, uint32_t timeout_ms);

/* The in-kernel platform: PIC, IOAPIC and the KVM clock. No I/O of its own; it carries their
 * state through save/load. */
struct vfmig_device *vfmig_platform_new(int vm_fd);
/* Every check the platform's load hook makes, without KVM (fuzzed by csrc/fuzz). Pure, any
 * thread. 0 or -errno. */
int vfmig_platform_check(const uint8_t *buf, size_t len);


/* A DMA engine: writes guest RAM from the host side, as a device's DMA would, and logs the
 * pages it wrote; the dirty set drains that log through the device's dirty_log hook. The
 * emulated VF's DMA plugs into the same mechanism. */
struct vfmig_vm;
struct vfmig_device *vfmig_dma_engine_new(struct vfmig_vm *vm, const char *name);
/* Fill [gpa, gpa+len) with value and log the pages. Any thread, lock-free. 0, -EFAULT outside
 * RAM, or -EBUSY while the VM is stopped. */
int vfmig_dma_fill(struct vfmig_device *d, uint64_t gpa, uint8_t value, uint64_t len);
#endif
