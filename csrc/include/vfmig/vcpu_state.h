/* Complete vCPU state as a self-describing blob: regs, sregs, FPU, XSAVE, XCRs, LAPIC,
 * MP state, events, debug registers and every MSR KVM will save. */
#ifndef VFMIG_VCPU_STATE_H
#define VFMIG_VCPU_STATE_H
#include <stddef.h>
#include <stdint.h>

#include "vfmig/vm.h"

#define VFMIG_VCPU_STATE_MAGIC 0x55504356u /* "VCPU" */
#define VFMIG_VCPU_STATE_VERSION 1u
#define VFMIG_VCPU_STATE_MAX (64u << 10)

/* Save into buf. The vCPU must be paused (its thread parked). Returns length or -errno. */
long vfmig_vcpu_save(struct vfmig_vcpu *cpu, uint8_t *buf, size_t cap, struct vfmig_err *err);

/* Every check vfmig_vcpu_load makes, applying nothing and without KVM (fuzzed by csrc/fuzz).
 * Pure, any thread. 0 or -errno with err set. */
int vfmig_vcpu_state_check(const uint8_t *buf, size_t len, uint32_t vcpu_id, struct vfmig_err *err);

/* Validate the whole blob, then apply it. The vCPU must not be running. 0 or -errno. */
int vfmig_vcpu_load(struct vfmig_vcpu *cpu, const uint8_t *buf, size_t len, struct vfmig_err *err);

#endif
