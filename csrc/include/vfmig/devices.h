/* The built-in device models. Each constructor returns a device ready for vfmig_vm_add_device,
 * or NULL on allocation failure. */
#ifndef VFMIG_DEVICES_H
#define VFMIG_DEVICES_H
#include "vfmig/device.h"
#include "vfmig/util.h"

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
 * pages it wrote in its DMA dirty log (d->dma_log, dma_log.h), which the dirty tracker starts,
 * drains and stops like every device's (a write before tracking starts is not logged: the first
 * round sends all RAM). The emulated VF's DMA logs the same way. */
struct vfmig_vm;
struct vfmig_device *vfmig_dma_engine_new(struct vfmig_vm *vm, const char *name);
/* Fill [gpa, gpa+len) with value and log the pages. Any thread, lock-free. 0, -EFAULT outside
 * RAM, or -EBUSY while the VM is stopped. */
int vfmig_dma_fill(struct vfmig_device *d, uint64_t gpa, uint8_t value, uint64_t len);

/* simvf: an emulated NIC VF on the PCI bus (simvf_abi.h): RX by a DMA "wire" thread at dma_rate
 * packets/s, TX, MSI-X, an internal state of state_bytes (queue state, counters and a flow table
 * the device keeps changing slowly), DMA dirty logging, and migration in the VFIO v2 model
 * (migstate.h) with its state stream (docs/device-state.md). */
struct vfmig_simvf_config {
    uint64_t state_bytes;   /* VFMIG_SIMVF_STATE_MIN..VFMIG_SIMVF_STATE_MAX, a multiple of 4 KiB */
    uint32_t dma_rate;      /* packets/s offered by the wire, 0..VFMIG_SIMVF_RATE_MAX */
    int precopy;            /* offer PRE_COPY (VFMIG_MIGF_PRE_COPY) */
    int migration;          /* migration=on: the generic migration capability in config space */
};
#define VFMIG_SIMVF_STATE_MIN (4ull << 10)
#define VFMIG_SIMVF_STATE_MAX (256ull << 20)
#define VFMIG_SIMVF_RATE_MAX 1000000u
/* Lifecycle thread: creates it and attaches it to the VM's PCI bus. The device, or NULL with err
 * and errno set. */
struct vfmig_device *vfmig_simvf_new(struct vfmig_vm *vm, const char *name, const struct vfmig_simvf_config *cfg,
                                     struct vfmig_err *err);
struct vfmig_simvf_counters {
    uint64_t sent, delivered, dropped, tx_ok, tx_bad, table_updates, interrupts;
};
/* Any thread; takes the device lock briefly. 0, or -EINVAL if d is not simvf. */
int vfmig_simvf_counters(struct vfmig_device *d, struct vfmig_simvf_counters *out);
/* Change the wire's rate (0 stops it). A test knob: the rate is configuration, not state, so a
 * migrated device runs at its configured rate. Any thread. 0 or -EINVAL. */
int vfmig_simvf_set_rate(struct vfmig_device *d, uint32_t pps);
/* The device's whole state as one canonical stop-copy stream (what a save without precopy
 * sends): two devices in the same state give the same bytes. Device not running (STOP,
 * STOP_COPY, or loaded and not yet started); lifecycle thread. Bytes, -ENOSPC, or -EBUSY while it
 * runs. vfmig_simvf_state_size gives the exact size. */
long vfmig_simvf_state(struct vfmig_device *d, uint8_t *buf, size_t cap);
size_t vfmig_simvf_state_size(struct vfmig_device *d);
/* Test knob: keep a copy of vfmig_simvf_state taken when the device enters STOP_COPY. */
int vfmig_simvf_keep_stop_state(struct vfmig_device *d, int on);
long vfmig_simvf_stop_state(struct vfmig_device *d, uint8_t *buf, size_t cap);
/* Every check a RESUMING simvf makes on a state stream except the PCI section's contents (that
 * check needs a PCI function: vfmig_pci_check, tested in test_pci), without KVM (fuzzed by
 * csrc/fuzz): the stream split into chunks of `chunk` bytes, against a destination built with
 * cfg. Pure, any thread. 0 or -errno with err. */
int vfmig_simvf_check_stream(const struct vfmig_simvf_config *cfg, const uint8_t *buf, size_t len, size_t chunk,
                             struct vfmig_err *err);
#endif
