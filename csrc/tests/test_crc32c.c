/* CRC32C: known answer, interleaved == bitwise on many lengths, combine. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "vfmig/crc32c.h"


int main(void)
{
    CHECK(vfmig_crc32c(0, "123456789", 9) == 0xE3069283u);
    CHECK(vfmig_crc32c_sw(0, "123456789", 9) == 0xE3069283u);
    size_t n = 3 * 8192 * 3 + 77;
    uint8_t *buf = malloc(n);
    srand(7);
    for (size_t i = 0; i < n; i++)
        buf[i] = (uint8_t)rand();
    size_t lens[] = {0, 1, 7, 8, 4095, 4096, 24575, 24576, 24577, 49152 + 13, n};
    for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++)
        CHECK(vfmig_crc32c(0, buf, lens[i]) == vfmig_crc32c_sw(0, buf, lens[i]));
    uint32_t whole = vfmig_crc32c(0, buf, n);
    uint8_t *copy = malloc(n);
    for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
        memset(copy, 0, n);
        CHECK(vfmig_crc32c_copy(0, copy, buf, lens[i]) == vfmig_crc32c_sw(0, buf, lens[i]));
        CHECK(memcmp(copy, buf, lens[i]) == 0);
    }
    free(copy);
    CHECK(vfmig_crc32c(vfmig_crc32c(0, buf, 1000), buf + 1000, n - 1000) == whole);
    CHECK(vfmig_crc32c_combine(vfmig_crc32c(0, buf, 1000), vfmig_crc32c(0, buf + 1000, n - 1000), n - 1000) ==
          whole);
    buf[n / 2] ^= 1;
    CHECK(vfmig_crc32c(0, buf, n) != whole);
    free(buf);
    printf("test_crc32c: ok\n");
    return 0;
}
