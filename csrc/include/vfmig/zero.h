/* Zero-page detection: the first non-zero word ends the scan, so dirty pages cost little. */
#ifndef VFMIG_ZERO_H
#define VFMIG_ZERO_H
#include <stdint.h>
#include <string.h>

#include "vfmig/guest_abi.h"

static inline int vfmig_page_is_zero(const uint8_t *p)
{
    const uint64_t *w = (const uint64_t *)p;
    if (w[0] | w[1])
        return 0;
    uint64_t acc = 0;
    for (uint32_t i = 0; i < VFMIG_PAGE_SIZE / 8; i += 8) {
        acc |= w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
        if (acc)
            return 0;
    }
    return 1;
}
#endif
