/* CRC32C: known answer, each loop (fold, lanes) == bitwise on many lengths and alignments,
 * copy, continuation across loops, combine. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "vfmig/crc32c.h"


/* Every check, on the loop in use. */
static void check_all(const uint8_t *buf, size_t n)
{
    CHECK(vfmig_crc32c(0, "123456789", 9) == 0xE3069283u);
    size_t lens[] = {0, 1, 7, 8, 63, 64, 255, 256, 257, 319, 320, 511, 512, 4095, 4096, 4097,
                     24575, 24576, 24577, 49152 + 13, n - 3};
    for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++)
        for (size_t off = 0; off < 4; off++) /* unaligned starts too */
            CHECK(vfmig_crc32c(0x12345678u, buf + off, lens[i]) == vfmig_crc32c_sw(0x12345678u, buf + off, lens[i]));
    for (size_t len = 200; len < 1200; len++) /* every tail the fold can leave */
        CHECK(vfmig_crc32c(7, buf, len) == vfmig_crc32c_sw(7, buf, len));
    uint32_t whole = vfmig_crc32c(0, buf, n);
    uint8_t *copy = malloc(n);
    for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
        memset(copy, 0, n);
        CHECK(vfmig_crc32c_copy(0, copy + 1, buf, lens[i]) == vfmig_crc32c_sw(0, buf, lens[i]));
        CHECK(memcmp(copy + 1, buf, lens[i]) == 0);
        CHECK(lens[i] + 1 >= n || copy[lens[i] + 1] == 0); /* nothing past the end */
    }
    free(copy);
    CHECK(vfmig_crc32c(vfmig_crc32c(0, buf, 1000), buf + 1000, n - 1000) == whole);
    CHECK(vfmig_crc32c_combine(vfmig_crc32c(0, buf, 1000), vfmig_crc32c(0, buf + 1000, n - 1000), n - 1000) ==
          whole);
}

int main(void)
{
    CHECK(vfmig_crc32c_sw(0, "123456789", 9) == 0xE3069283u);
    size_t n = 3 * 8192 * 3 + 77;
    uint8_t *buf = malloc(n);
    srand(7);
    for (size_t i = 0; i < n; i++)
        buf[i] = (uint8_t)rand();
    CHECK(vfmig_crc32c_use("lanes") == 0 && strcmp(vfmig_crc32c_impl(), "lanes") == 0);
    check_all(buf, n);
    uint32_t half = vfmig_crc32c(0, buf, 5000);
    int fold = vfmig_crc32c_use("fold") == 0;
    if (fold) {
        CHECK(strcmp(vfmig_crc32c_impl(), "fold") == 0);
        check_all(buf, n);
        CHECK(vfmig_crc32c(half, buf + 5000, n - 5000) == vfmig_crc32c_sw(0, buf, n)); /* lanes, then fold */
    } else {
        printf("test_crc32c: this CPU has no AVX-512 VPCLMULQDQ: the fold is not tested\n");
    }
    CHECK(vfmig_crc32c_use("crc64") == -1);
    uint32_t whole = vfmig_crc32c(0, buf, n);
    for (size_t at = 0; at < n; at += n / 7) { /* a flipped bit anywhere changes it */
        buf[at] ^= 0x10;
        CHECK(vfmig_crc32c(0, buf, n) != whole);
        buf[at] ^= 0x10;
    }
    free(buf);
    printf("test_crc32c: ok (%s)\n", fold ? "fold and lanes" : "lanes");
    return 0;
}
