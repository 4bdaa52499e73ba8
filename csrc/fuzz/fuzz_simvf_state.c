/* simvf's migration stream (precopy and stop-copy sections) through the loader a RESUMING device
 * runs, without KVM: vfmig_simvf_check_stream, against a 64 KiB-state destination.
 * Input: byte 0 picks how the stream is split into writes (1..255 bytes; 0: one write), byte 1
 * picks precopy and migration=on/off of the destination; the rest is the stream. */
#include "fuzz.h"
#include "vfmig/devices.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    struct vfmig_simvf_config cfg = {.state_bytes = 64 << 10, .dma_rate = 1000, .precopy = data[1] & 1,
                                     .migration = !(data[1] & 2)};
    struct vfmig_err err = {{0}};
    int rc = vfmig_simvf_check_stream(&cfg, data + 2, size - 2, data[0], &err);
    FUZZ_ASSERT(rc == 0 || rc == -EINVAL || rc == -EPROTO || rc == -EMSGSIZE || rc == -EBADMSG);
    FUZZ_ASSERT(rc == 0 || err.msg[0]); /* every refusal says why */
    if (data[0] > 1 && rc == 0) { /* how the stream is split never changes the verdict */
        FUZZ_ASSERT(vfmig_simvf_check_stream(&cfg, data + 2, size - 2, 1, &err) == 0);
    }
    return 0;
}
