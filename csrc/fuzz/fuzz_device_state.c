/* Device state loading (csrc/devices/: clock, platform, console, DMA engine) without KVM: the clocks' load hooks, the platform's checks
 * (its hook then hands the state to KVM), and that the console and DMA engines take no state.
 * Input: byte 0 picks the device, the rest is its DEVICE blob. */
#include "fuzz.h"
#include "vfmig/devices.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct vfmig_device *clock, *clock_mmio, *console, *dma;
    static struct vfmig_vm *vm;
    if (!vm) {
        vm = fuzz_fake_vm();
        clock = vfmig_clock_new("clock", VFMIG_SPACE_PIO, VFMIG_PORT_CLOCK_LO);
        clock_mmio = vfmig_clock_new("clock-mmio", VFMIG_SPACE_MMIO, VFMIG_MMIO_CLOCK);
        console = vfmig_console_new();
        dma = vfmig_dma_engine_new(vm, "dma0");
        FUZZ_ASSERT(clock && clock_mmio && console && dma);
    }
    if (size < 1)
        return 0;
    const uint8_t *blob = data + 1;
    size_t len = size - 1;
    int rc;
    uint8_t saved[64];
    switch (data[0] % 4) {
    case 0:
    case 1: {
        struct vfmig_device *d = data[0] % 4 ? clock_mmio : clock;
        rc = d->load(d, blob, len);
        FUZZ_ASSERT(rc == 0 || rc == -EINVAL);
        if (rc == 0) { /* what loaded is what the device saves */
            long n = d->save(d, saved, sizeof(saved));
            FUZZ_ASSERT(n >= 0 && (size_t)n == len && memcmp(saved, blob, len) == 0);
        }
        break;
    }
    case 2:
        rc = vfmig_platform_check(blob, len);
        FUZZ_ASSERT(rc == 0 || rc == -EINVAL || rc == -EPROTO);
        break;
    default: /* stateless: the destination refuses a DEVICE record for them before any hook */
        FUZZ_ASSERT(!console->load && !console->save && !dma->load && !dma->save);
        break;
    }
    return 0;
}
