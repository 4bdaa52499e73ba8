/* Whole-RAM helpers for cold migration and for checking guests. All run without the GIL and
 * read RAM with the vCPUs paused (or accept a torn view for the wrap-edge check). */
#ifndef VFMIG_RAMFILE_H
#define VFMIG_RAMFILE_H
#include "vfmig/vm.h"

/* Write RAM to fd as a sparse image (zero pages become holes). 0 or -errno. */
int vfmig_ram_save(struct vfmig_vm *vm, int fd, struct vfmig_err *err);
/* Read an image written by vfmig_ram_save; its size must equal RAM. 0 or -errno. */
int vfmig_ram_load(struct vfmig_vm *vm, int fd, struct vfmig_err *err);
/* Count the places where the per-page counter at offset 0 steps down over pages
 * [gpa, gpa + pages*4096): the a-b-bootblock check (a sequential dirtier leaves at most one).
 * width is 1 or 4. Returns the count, or -1 if the range is outside RAM. */
int64_t vfmig_ram_wrap_edges(struct vfmig_vm *vm, uint64_t gpa, uint64_t pages, uint32_t width);
#endif
