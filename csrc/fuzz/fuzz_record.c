/* The record header and CRC checks (stream.c) that every channel runs before trusting a record.
 * Input: byte 0 picks the length limit (page channel, HELLO, control), then a 16-byte header,
 * then the payload. */
#include "fuzz.h"
#include "vfmig/channels.h"
#include "vfmig/hello.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const uint32_t limits[] = {
        sizeof(struct vfmig_pages_hdr) + VFMIG_RUN_MAX_PAGES * VFMIG_PAGE_SIZE, /* page channel */
        VFMIG_HELLO_LEN + VFMIG_CONFIG_MAX,                                      /* HELLO */
        VFMIG_CTRL_MAX,                                                          /* control */
    };
    struct vfmig_rec_hdr h;
    if (size < 1 + sizeof(h))
        return 0;
    uint32_t limit = limits[data[0] % 3];
    memcpy(&h, data + 1, sizeof(h));
    const uint8_t *payload = data + 1 + sizeof(h);
    size_t plen = size - 1 - sizeof(h);
    struct vfmig_err err = {{0}};
    if (vfmig_rec_check_hdr(&h, limit, &err) < 0) {
        FUZZ_ASSERT(err.msg[0] && strchr(err.msg, '\n') == NULL);
        return 0;
    }
    FUZZ_ASSERT(h.magic == VFMIG_REC_MAGIC && h.type > 0 && h.type < VFMIG_REC__COUNT && !h.flags && h.len <= limit);
    FUZZ_ASSERT(strcmp(vfmig_rec_name(h.type), "UNKNOWN") != 0);
    if (h.len > plen) /* a short read: the channel reports the peer, not the checks */
        return 0;
    int rc = vfmig_rec_check_crc(&h, payload, &err);
    /* The CRC accepts exactly what sealing the same payload produces. */
    struct vfmig_rec_hdr s;
    vfmig_rec_seal(&s, h.type, payload, h.len, NULL, 0);
    FUZZ_ASSERT((rc == 0) == (s.crc == h.crc));
    FUZZ_ASSERT(vfmig_rec_check_crc(&s, payload, &err) == 0);
    return 0;
}
