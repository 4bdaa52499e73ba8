/* The one assertion the C unit tests use: print where and exit non-zero. */
#ifndef VFMIG_TEST_CHECK_H
#define VFMIG_TEST_CHECK_H
#include <stdio.h>
#include <stdlib.h>

#define CHECK(c)                                                                  \
    do {                                                                          \
        if (!(c)) {                                                               \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #c); \
            exit(1);                                                              \
        }                                                                         \
    } while (0)
#endif
