/* CRC32C (Castagnoli): carry-less folding (VPCLMULQDQ) where the CPU has it, else the SSE4.2
 * crc32 instruction. The environment variable VFMIG_CRC32C=lanes forces the latter. */
#ifndef VFMIG_CRC32C_H
#define VFMIG_CRC32C_H
#include <stddef.h>
#include <stdint.h>

/* Standard CRC32C continued from crc (0 to start), like zlib's crc32(). Pure; any thread. */
uint32_t vfmig_crc32c(uint32_t crc, const void *buf, size_t len);
/* The same, copying src to dst (non-overlapping) in the same pass. Pure; any thread. */
uint32_t vfmig_crc32c_copy(uint32_t crc, void *dst, const void *src, size_t len);
/* Bit-at-a-time reference, for tests. */
uint32_t vfmig_crc32c_sw(uint32_t crc, const void *buf, size_t len);
/* CRC of A||B from crc(A), crc(B) and len(B). */
uint32_t vfmig_crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);
/* The loop in use: "fold" or "lanes". Any thread. */
const char *vfmig_crc32c_impl(void);
/* Switch to "fold" or "lanes" (tests and benchmarks); -1 if unknown or this CPU cannot fold.
 * Any thread: CRCs already running finish on the loop they started with, same result. */
int vfmig_crc32c_use(const char *impl);
#endif
