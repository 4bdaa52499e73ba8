/* A VM without KVM for the page-stream tests: plain RAM in one slot at GPA 0, no memfd, so every
 * page counts as data. */
#ifndef VFMIG_TEST_FAKE_VM_H
#define VFMIG_TEST_FAKE_VM_H
#include <stdlib.h>
#include <string.h>

#include "vfmig/vm.h"

static inline struct vfmig_vm *fake_vm_new(uint32_t npages)
{
    struct vfmig_vm *vm = calloc(1, sizeof(*vm));
    vm->ram_bytes = (uint64_t)npages * VFMIG_PAGE_SIZE;
    vm->npages = npages;
    vm->ram = aligned_alloc(4096, vm->ram_bytes);
    memset(vm->ram, 0, vm->ram_bytes);
    vm->mem_fd = -1;
    vm->nslots = 1;
    vm->slots[0] = (struct vfmig_slot){.id = 0, .gpa = 0, .size = vm->ram_bytes, .first_page = 0};
    return vm;
}

static inline void fake_vm_free(struct vfmig_vm *vm)
{
    free(vm->ram);
    free(vm);
}
#endif
