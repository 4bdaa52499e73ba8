/* Shared by the libFuzzer harnesses: an invariant check and a fake VM (plain RAM, no KVM). */
#ifndef VFMIG_FUZZ_H
#define VFMIG_FUZZ_H
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vfmig/vm.h"

/* A broken invariant is a crash: libFuzzer saves the input that caused it. */
#define FUZZ_ASSERT(c)                                                                     \
    do {                                                                                   \
        if (!(c)) {                                                                        \
            fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #c);    \
            abort();                                                                       \
        }                                                                                  \
    } while (0)

/* 4 MiB at GPA 0 and 4 MiB at 4 GiB, like a real VM's RAM split around the PCI hole, in plain
 * memory: 2048 pages, four 512-page stripes. */
#define FUZZ_LOW_PAGES 1024u
#define FUZZ_NPAGES 2048u
#define FUZZ_HIGH_GPA (4ull << 30)

static inline struct vfmig_vm *fuzz_fake_vm(void)
{
    struct vfmig_vm *vm = calloc(1, sizeof(*vm));
    FUZZ_ASSERT(vm);
    vm->ram_bytes = (uint64_t)FUZZ_NPAGES * VFMIG_PAGE_SIZE;
    vm->npages = FUZZ_NPAGES;
    vm->ram = aligned_alloc(4096, vm->ram_bytes);
    FUZZ_ASSERT(vm->ram);
    memset(vm->ram, 0, vm->ram_bytes);
    vm->kvm_fd = vm->vm_fd = vm->mem_fd = -1;
    vm->nslots = 2;
    uint64_t low = (uint64_t)FUZZ_LOW_PAGES * VFMIG_PAGE_SIZE;
    vm->slots[0] = (struct vfmig_slot){.id = 0, .gpa = 0, .size = low, .first_page = 0};
    vm->slots[1] = (struct vfmig_slot){.id = 1, .gpa = FUZZ_HIGH_GPA, .size = vm->ram_bytes - low,
                                       .first_page = FUZZ_LOW_PAGES};
    return vm;
}
#endif
