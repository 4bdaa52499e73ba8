/* Reference measurements taken in the same run as a benchmark, so figures can be reported as
 * ratios on a noisy machine. Each runs without the GIL and returns its figure, or -errno. */
#ifndef VFMIG_REFBENCH_H
#define VFMIG_REFBENCH_H
#include <stdint.h>

/* memcpy bandwidth in bytes/s over a buffer of `bytes`, repeated `reps` times. */
double vfmig_ref_memcpy(uint64_t bytes, int reps);
/* Mean round trip of an eventfd ping-pong between two threads, in ns. */
double vfmig_ref_eventfd_rtt(int rounds);
#define VFMIG_REF_MAX_STREAMS 16
/* Loopback TCP over `streams` parallel connections (1..16, a writer and a reader thread each),
 * bytes/s in all, sending `bytes` in 1 MiB writes from 1 MiB buffers into others: all stay in
 * cache, so this is TCP at its fastest. -EINVAL for a stream count out of range. */
double vfmig_ref_tcp_loopback(uint64_t bytes, unsigned streams);
/* The same streams moving RAM as a migration does: from a `bytes` memfd with every page
 * present into a fresh one (huge pages asked for on both, as for guest RAM), each stream its
 * own slice, so every byte is read from and written to memory, and the receiver populates its
 * pages. -EINVAL under one page; -EIO if a page did not arrive in place. */
double vfmig_ref_tcp_loopback_ram(uint64_t bytes, unsigned streams);
#endif
