/* Shared by vfmig's probe sets (downtime, irqlat, handshake), loaded together with bcc.
 *
 * Every set watches only the processes in `targets`; the loader fills it, and may add a
 * process while attached (a destination found after the connection). Each event is compiled
 * in only when the loader defines its macro (-DVFMIG_TP_..., -DVFMIG_USDT_..., -DVFMIG_KPROBE_...,
 * -DVFMIG_FENTRY_...): it picks, per event, the first attach method this kernel has.
 * Times are bpf_ktime_get_ns(), i.e. CLOCK_MONOTONIC, the clock vfmig's checkpoints use. */
#ifndef VFMIG_PROBES_H
#define VFMIG_PROBES_H

#include <uapi/linux/ptrace.h>

/* target flags */
#define VFMIG_T_WATCH 1u
#define VFMIG_T_USDT 2u /* the process has vfmig's USDT probes: its device interrupts start there */

#define VFMIG_KVM_RUN 0xAE80u /* _IO(KVMIO, 0x80), linux/kvm.h */
#define VFMIG_NR_IOCTL 16     /* x86_64 */

BPF_HASH(targets, u32, u32, 256);

/* The calling thread's process if it is watched (its flags in *flags), else 0. */
static __always_inline u32 watched_tgid(u32 *flags)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u32 *f = targets.lookup(&tgid);
    if (!f)
        return 0;
    *flags = *f;
    return tgid;
}

#endif
