/* C-level test of the micro-VMM (runs under ASan/UBSan): boot the dirtier, pause, move vCPU and
 * platform state plus RAM into a second VM, and check the guest carries on. Also checks that a
 * corrupt vCPU blob is rejected before anything is applied. argv[1]: dirtier.bin */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "fixture.h"
#include "vfmig/devices.h"
#include "vfmig/vcpu_state.h"
#include "vfmig/vm.h"


static uint64_t touches(struct vfmig_vm *vm)
{
    const struct vfmig_vcpu_stats *st = (const void *)(vm->ram + VFMIG_STATS_GPA);
    return __atomic_load_n(&st->touches, __ATOMIC_RELAXED);
}

static struct vfmig_vm *make_vm(void)
{
    struct vfmig_vm *vm = test_vm(64ull << 20, 1, 0);
    test_add_builtins(vm);
    return vm;
}

int main(int argc, char **argv)
{
    CHECK(argc == 2);
    FILE *f = fopen(argv[1], "rb");
    CHECK(f);
    static uint8_t image[1 << 20];
    size_t n = fread(image, 1, sizeof(image), f);
    fclose(f);

    struct vfmig_vm_config bad = {.mem_bytes = (64ull << 20) + 1, .vcpus = 1};
    struct vfmig_vm *none = NULL;
    struct vfmig_err err = {{0}};
    CHECK(vfmig_vm_create(&bad, &none, &err) < 0 && strstr(err.msg, "page size"));

    struct vfmig_vm *a = make_vm();
    struct vfmig_boot_params bp = {.magic = VFMIG_BOOT_MAGIC, .version = VFMIG_BOOT_VERSION, .vcpus = 1,
                                   .wss_gpa = VFMIG_DATA_GPA, .wss_bytes = 32u << 20, .clock_every = 256,
                                   .gap_threshold_ns = 500000, .width = 1, .seed = 1};
    memcpy(a->ram + VFMIG_BOOT_GPA, &bp, sizeof(bp));
    CHECK(vfmig_vm_boot(a, image, n) == 0);
    CHECK(vfmig_vm_start(a) == 0);
    usleep(200000);
    CHECK(vfmig_vm_pause(a, VFMIG_PAUSE_TIMEOUT_MS_DEFAULT) == 0);
    uint64_t c0 = touches(a);
    usleep(50000);
    CHECK(touches(a) == c0 && c0 > 0);

    static uint8_t blob[VFMIG_VCPU_STATE_MAX], plat[8192];
    long len = vfmig_vcpu_save(&a->vcpus[0], blob, sizeof(blob), &err);
    CHECK(len > 0);
    struct vfmig_device *pa = vfmig_vm_find_device(a, "platform");
    long plen = pa->save(pa, plat, sizeof(plat));
    CHECK(plen > 0);

    struct vfmig_vm *b = make_vm();
    memcpy(b->ram, a->ram, a->ram_bytes);
    uint8_t corrupt[VFMIG_VCPU_STATE_MAX];
    memcpy(corrupt, blob, (size_t)len);
    corrupt[20] ^= 0x7f; /* first section's length */
    CHECK(vfmig_vcpu_load(&b->vcpus[0], corrupt, (size_t)len, &err) < 0);
    CHECK(vfmig_vcpu_load(&b->vcpus[0], blob, (size_t)len - 3, &err) < 0);
    CHECK(vfmig_vcpu_load(&b->vcpus[0], blob, (size_t)len + 8, &err) < 0 && strstr(err.msg, "trailing"));
    struct vfmig_device *pb = vfmig_vm_find_device(b, "platform");
    CHECK(pb->load(pb, plat, (size_t)plen - 1) < 0);
    CHECK(pb->load(pb, plat, (size_t)plen) == 0);
    CHECK(vfmig_vcpu_load(&b->vcpus[0], blob, (size_t)len, &err) == 0);
    CHECK(vfmig_vm_start(b) == 0);
    usleep(200000);
    CHECK(vfmig_vm_pause(b, VFMIG_PAUSE_TIMEOUT_MS_DEFAULT) == 0);
    uint64_t c1 = touches(b);
    CHECK(c1 > c0);
    CHECK(!atomic_load(&b->failed));
    vfmig_vm_destroy(a);
    vfmig_vm_destroy(b);
    printf("test_vm: ok (counter %llu -> %llu)\n", (unsigned long long)c0, (unsigned long long)c1);
    return 0;
}
