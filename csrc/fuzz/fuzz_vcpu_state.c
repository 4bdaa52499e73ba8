/* vCPU state validation (vcpu_state.c): every check of a VCPU blob that runs before any KVM
 * ioctl applies it. Input: the blob, for vCPU 0. */
#include "fuzz.h"
#include "vfmig/vcpu_state.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct vfmig_err err = {{0}};
    if (vfmig_vcpu_state_check(data, size, 0, &err) < 0) {
        FUZZ_ASSERT(err.msg[0] && strchr(err.msg, '\n') == NULL);
        return 0;
    }
    uint32_t hdr[4];
    FUZZ_ASSERT(size >= sizeof(hdr) && size <= VFMIG_VCPU_STATE_MAX && size % 8 == 0);
    memcpy(hdr, data, sizeof(hdr));
    FUZZ_ASSERT(hdr[0] == VFMIG_VCPU_STATE_MAGIC && hdr[1] == VFMIG_VCPU_STATE_VERSION && hdr[2] == 0);
    return 0;
}
