/* CHANNEL decoding (hello.c): the first record on each page channel, before the session token is
 * compared. Input: the CHANNEL payload. What decodes re-encodes to the same bytes. */
#include "fuzz.h"
#include "vfmig/hello.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct vfmig_channel_hello c, again;
    struct vfmig_err err = {{0}};
    if (vfmig_channel_decode(data, size, &c, &err) < 0) {
        FUZZ_ASSERT(err.msg[0] && strchr(err.msg, '\n') == NULL);
        return 0;
    }
    FUZZ_ASSERT(size == VFMIG_CHANNEL_LEN && c.version == VFMIG_STREAM_VERSION && !c.reserved);
    vfmig_channel_encode(&again, c.token, c.index);
    FUZZ_ASSERT(memcmp(&again, data, size) == 0);
    return 0;
}
