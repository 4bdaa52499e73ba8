/* HELLO decoding (hello.c): the first record a destination reads from an unauthenticated peer.
 * Input: the HELLO payload. What decodes re-encodes to the same header bytes. */
#include "fuzz.h"
#include "vfmig/channels.h"
#include "vfmig/hello.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct vfmig_hello h, again;
    struct vfmig_err err = {{0}};
    if (vfmig_hello_decode(data, size, &h, &err) < 0) {
        FUZZ_ASSERT(err.msg[0] && strchr(err.msg, '\n') == NULL);
        return 0;
    }
    FUZZ_ASSERT(h.channels >= 1 && h.channels <= VFMIG_MAX_CHANNELS && h.config_len <= VFMIG_CONFIG_MAX);
    FUZZ_ASSERT(size == VFMIG_HELLO_LEN + h.config_len);
    vfmig_hello_encode(&again, h.version, h.channels, h.mem_bytes, h.vcpus, h.flags, h.token, h.config_len);
    FUZZ_ASSERT(memcmp(&again, data, VFMIG_HELLO_LEN) == 0);
    return 0;
}
