/* A harness with a planted bug, for tests/test_fuzz.py only: it shows the runner notices a
 * crash and names its reproducer. Crashes (heap overflow) on any input that starts with "BUG". */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size >= 3 && memcmp(data, "BUG", 3) == 0) {
        volatile char *p = malloc(4);
        p[4] = 1; /* ASan: heap-buffer-overflow */
        free((void *)p);
    }
    return 0;
}
