/* What the C tests that need KVM share: a VM, and the built-in devices a guest expects. */
#ifndef VFMIG_TEST_FIXTURE_H
#define VFMIG_TEST_FIXTURE_H
#include <stdio.h>
#include <stdlib.h>

#include "check.h"
#include "vfmig/devices.h"
#include "vfmig/vm.h"

/* A VM of mem bytes; ring_entries 0: the dirty bitmap. Exits the test with KVM's reason if the
 * VM cannot be made. */
static inline struct vfmig_vm *test_vm(uint64_t mem, uint32_t vcpus, uint32_t ring_entries)
{
    struct vfmig_vm_config cfg = {.mem_bytes = mem, .vcpus = vcpus, .ring_entries = ring_entries};
    struct vfmig_vm *vm = NULL;
    struct vfmig_err err = {{0}};
    if (vfmig_vm_create(&cfg, &vm, &err) < 0) {
        fprintf(stderr, "create: %s\n", err.msg);
        exit(1);
    }
    return vm;
}

/* The console, the port clock and the in-kernel platform: what the built-in guests talk to. */
static inline void test_add_builtins(struct vfmig_vm *vm)
{
    CHECK(vfmig_vm_add_device(vm, vfmig_console_new()) == 0);
    CHECK(vfmig_vm_add_device(vm, vfmig_clock_new("clock", VFMIG_SPACE_PIO, VFMIG_PORT_CLOCK_LO)) == 0);
    CHECK(vfmig_vm_add_device(vm, vfmig_platform_new(vm->vm_fd)) == 0);
}
#endif
