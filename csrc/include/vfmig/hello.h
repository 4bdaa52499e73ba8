/* The session openers, HELLO (control channel) and CHANNEL (each page channel): their fixed
 * headers in C, so the destination checks bytes from the network in one fuzzed place. The
 * JSON VM config after HELLO's header is the caller's (docs/stream-format.md §4). */
#ifndef VFMIG_HELLO_H
#define VFMIG_HELLO_H
#include <stddef.h>
#include <stdint.h>

#include "vfmig/stream.h"

#define VFMIG_HELLO_LEN 56u   /* sizeof(struct vfmig_hello): the config starts here */
#define VFMIG_CHANNEL_LEN 24u /* sizeof(struct vfmig_channel_hello) */

/* Fill a HELLO header announcing config_len bytes of config. No checks: the sender is trusted,
 * and tests craft bad headers with it. Pure, any thread. */
void vfmig_hello_encode(struct vfmig_hello *out, uint16_t version, uint16_t channels, uint64_t mem_bytes,
                        uint32_t vcpus, uint32_t flags, const uint8_t token[VFMIG_TOKEN_LEN],
                        uint32_t config_len);

/* Check a received HELLO payload (header and config) in the documented order. On success *out
 * is the header and the config is raw[VFMIG_HELLO_LEN..len). Pure, any thread; 0 or -EPROTO
 * with err set, *out undefined. */
int vfmig_hello_decode(const uint8_t *raw, size_t len, struct vfmig_hello *out, struct vfmig_err *err);

/* Fill a CHANNEL opener for page channel `index` (this stream version). Pure, any thread. */
void vfmig_channel_encode(struct vfmig_channel_hello *out, const uint8_t token[VFMIG_TOKEN_LEN], uint16_t index);

/* Check a received CHANNEL payload: length, reserved, version. The token and the index are the
 * caller's to check against its session. Pure, any thread; 0 or -EPROTO with err set. */
int vfmig_channel_decode(const uint8_t *raw, size_t len, struct vfmig_channel_hello *out, struct vfmig_err *err);

#endif
