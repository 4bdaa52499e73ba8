/* Reference measurements taken in the same run as a benchmark, so figures can be reported as
 * ratios on a noisy machine. Each runs without the GIL and returns its figure, or -errno. */
#ifndef VFMIG_REFBENCH_H
#define VFMIG_REFBENCH_H
#include <stdint.h>

/* memcpy bandwidth in bytes/s over a buffer of `bytes`, repeated `reps` times. */
double vfmig_ref_memcpy(uint64_t bytes, int reps);
/* Mean round trip of an eventfd ping-pong between two threads, in ns. */
double vfmig_ref_eventfd_rtt(int rounds);
/* Loopback TCP, one stream, bytes/s, sending `bytes` in 1 MiB writes. */
double vfmig_ref_tcp_loopback(uint64_t bytes);
#endif
