/* USDT probes of provider "vfmig", for perf, bpftrace and the BPF probes (bpf/). With
 * <sys/sdt.h> (VFMIG_HAVE_SDT, set by meson.build) each probe is a nop plus an ELF note naming
 * it and where its arguments are; without it a probe expands to nothing and its arguments are
 * not evaluated, so a probe site must not compute values only the probe uses.
 * Probe names and argument types are a contract with bpf/: pass each argument with its exact
 * type (cast if needed), since the note records its size and signedness. */
#ifndef VFMIG_USDT_H
#define VFMIG_USDT_H

#ifdef VFMIG_HAVE_SDT
#define SDT_USE_VARIADIC 1 /* for STAP_PROBEV: one macro whatever the number of arguments */
#include <sys/sdt.h>
#define VFMIG_USDT(name, ...) STAP_PROBEV(vfmig, name, ##__VA_ARGS__)
#else
#define VFMIG_USDT(name, ...) ((void)0)
#endif

#endif
