/* HELLO and CHANNEL: encode, and check every field of a received one before anyone uses it. */
#include <errno.h>
#include <string.h>

#include "vfmig/hello.h"
#include "vfmig/channels.h"

_Static_assert(sizeof(struct vfmig_hello) == VFMIG_HELLO_LEN, "HELLO header is 56 packed bytes");
_Static_assert(sizeof(struct vfmig_channel_hello) == VFMIG_CHANNEL_LEN, "CHANNEL is 24 packed bytes");

void vfmig_hello_encode(struct vfmig_hello *out, uint16_t version, uint16_t channels, uint64_t mem_bytes,
                        uint32_t vcpus, uint32_t flags, const uint8_t token[VFMIG_TOKEN_LEN],
                        uint32_t config_len)
{
    memset(out, 0, sizeof(*out));
    memcpy(out->magic, VFMIG_STREAM_MAGIC, sizeof(out->magic));
    out->version = version;
    out->channels = channels;
    out->page_size = VFMIG_PAGE_SIZE;
    out->mem_bytes = mem_bytes;
    out->vcpus = vcpus;
    out->flags = flags;
    memcpy(out->token, token, VFMIG_TOKEN_LEN);
    out->config_len = config_len;
}

int vfmig_hello_decode(const uint8_t *raw, size_t len, struct vfmig_hello *out, struct vfmig_err *err)
{
    if (len < sizeof(*out))
        return vfmig_fail(err, EPROTO, "stream header too short");
    memcpy(out, raw, sizeof(*out));
    if (memcmp(out->magic, VFMIG_STREAM_MAGIC, sizeof(out->magic)) != 0)
        return vfmig_fail(err, EPROTO, "not a vfmig stream (bad stream magic)");
    if (out->version != VFMIG_STREAM_VERSION)
        return vfmig_fail(err, EPROTO, "unsupported stream version %u (this vfmig speaks version %u)", out->version,
                          VFMIG_STREAM_VERSION);
    if (out->page_size != VFMIG_PAGE_SIZE || (out->flags & ~VFMIG_HELLO_VERIFY) || out->reserved)
        return vfmig_fail(err, EPROTO, "stream header has an unsupported page size or flags");
    if (out->channels < 1 || out->channels > VFMIG_MAX_CHANNELS)
        return vfmig_fail(err, EPROTO, "stream asks for %u channels (1..%u)", out->channels, VFMIG_MAX_CHANNELS);
    if (out->config_len > VFMIG_CONFIG_MAX || len - sizeof(*out) != out->config_len)
        return vfmig_fail(err, EPROTO, "stream header's VM config has a bad length");
    return 0;
}

void vfmig_channel_encode(struct vfmig_channel_hello *out, const uint8_t token[VFMIG_TOKEN_LEN], uint16_t index)
{
    memset(out, 0, sizeof(*out));
    memcpy(out->token, token, VFMIG_TOKEN_LEN);
    out->index = index;
    out->version = VFMIG_STREAM_VERSION;
}

int vfmig_channel_decode(const uint8_t *raw, size_t len, struct vfmig_channel_hello *out, struct vfmig_err *err)
{
    if (len != sizeof(*out))
        return vfmig_fail(err, EPROTO, "bad channel opener");
    memcpy(out, raw, sizeof(*out));
    if (out->reserved)
        return vfmig_fail(err, EPROTO, "bad channel opener (reserved field set)");
    if (out->version != VFMIG_STREAM_VERSION)
        return vfmig_fail(err, EPROTO, "page channel speaks stream version %u, not %u", out->version,
                          VFMIG_STREAM_VERSION);
    return 0;
}
