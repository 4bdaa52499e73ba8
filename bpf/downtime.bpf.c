/* Downtime as the kernel sees it: when each vCPU thread of a watched VMM runs guest code.
 *
 * Three sources, kept apart so the loader can use the best one that fired:
 *   KVM_ENTRY  kvm:kvm_entry / kvm:kvm_exit (each VM entry; some KVMs never fire them);
 *   KVM_RUN    raw_syscalls enter/exit of ioctl(KVM_RUN) on the thread;
 *   UEXIT      kvm:kvm_userspace_exit (returns only: a first entry is bounded by the first exit).
 *
 * Inside KVM_RUN is not the same as running the guest: on a busy host a vCPU thread can be
 * preempted in KVM_RUN for milliseconds, and when the VMM's stop signal finds it off the CPU,
 * KVM returns -EINTR as soon as it is scheduled again, without entering the guest. So for
 * KVM_RUN, sched:sched_switch and signal:signal_generate say when the guest last could run.
 * A run that ends in -EINTR ended it:
 *   - when the thread went off the CPU, if the first stop signal of the run found it
 *     preempted (runnable) or blocked uninterruptibly (the guest was stalled);
 *   - at that signal, if it found it sleeping interruptibly (a halted vCPU: idle, not stalled,
 *     it would have run on an interrupt until then);
 *   - at its first switch-out after the signal, or else at the syscall's return (it was on
 *     the CPU: a thread preempted on its way out of KVM_RUN has no guest left to run);
 *   - never, if the signal came before the run began (an immediate exit: no guest code ran;
 *     such a run is not an entry either).
 * `last_exit` is that end of guest execution; `raw_exit` the syscall's return. The verdict is
 * the first signal's: a VMM re-kicks until its vCPUs stop, and a later kick must not undo it.
 * Per thread: first and last entry, first and last exit, the longest out-of-guest gap; per
 * process a log2 histogram of gaps (µs). USDT vfmig:checkpoint calls are kept as exact records.
 * Each record's run fields are written only by its own thread; the scheduler and signal
 * events write only on_at/off_at/kick fields, which the thread reads at its next exit. */
#include "probes.h"

enum { SRC_KVM_ENTRY = 0, SRC_KVM_RUN = 1, SRC_UEXIT = 2, N_RUN_SOURCES = 3 };

struct run_key {
    u32 tid;
    u32 source;
};

struct run_rec {
    u64 first_entry, last_entry, first_exit, last_exit;
    u64 runs, max_gap_ns, max_gap_end;
    u64 raw_exit, on_at, off_at, kick_at, kick_end; /* KVM_RUN only */
    u64 off_after_kick;                             /* KVM_RUN: first switch-out after the kick */
    u64 empty_runs;                                 /* KVM_RUN: -EINTR before any guest code */
    u64 prev_entry, prev_first_entry;               /* to undo an empty run's entry */
    u32 tgid, in_run, off_state, kicked, pad;
    char comm[16];
};

struct gap_key {
    u32 tgid;
    u32 source;
    u64 slot;
};

BPF_HASH(runs, struct run_key, struct run_rec, 8192);
BPF_HISTOGRAM(gap_hist, struct gap_key, 2048);
BPF_ARRAY(run_fired, u64, N_RUN_SOURCES);

static __always_inline struct run_rec *run_rec(u32 source, u32 *tgid_out)
{
    u32 flags = 0;
    u32 tgid = watched_tgid(&flags);
    if (!tgid)
        return 0;
    struct run_key k = {.tid = (u32)bpf_get_current_pid_tgid(), .source = source};
    struct run_rec zero = {};
    struct run_rec *r = runs.lookup_or_try_init(&k, &zero);
    if (r && !r->tgid) {
        r->tgid = tgid;
        bpf_get_current_comm(&r->comm, sizeof(r->comm));
    }
    *tgid_out = tgid;
    return r;
}

static __always_inline void guest_entry(u32 source)
{
    u32 tgid = 0;
    struct run_rec *r = run_rec(source, &tgid);
    if (!r)
        return;
    u64 now = bpf_ktime_get_ns();
    r->prev_entry = r->last_entry;
    r->prev_first_entry = r->first_entry;
    if (!r->first_entry)
        r->first_entry = now;
    if (r->last_exit && now > r->last_exit) {
        u64 gap = now - r->last_exit;
        if (gap > r->max_gap_ns) {
            r->max_gap_ns = gap;
            r->max_gap_end = now;
        }
        struct gap_key gk = {.tgid = tgid, .source = source, .slot = bpf_log2l(gap / 1000)};
        gap_hist.increment(gk);
    }
    r->last_entry = now;
    r->runs++;
    r->in_run = 1;
    run_fired.increment(source);
}

static __always_inline void exit_at(struct run_rec *r, u32 source, u64 end)
{
    if (!r->first_exit)
        r->first_exit = end;
    r->last_exit = end;
    r->in_run = 0;
    run_fired.increment(source);
}

static __always_inline void guest_exit(u32 source)
{
    u32 tgid = 0;
    struct run_rec *r = run_rec(source, &tgid);
    if (r)
        exit_at(r, source, bpf_ktime_get_ns());
}

#define VFMIG_EINTR 4

/* The end of a KVM_RUN: when did its guest code stop running? (see the top of this file) */
static __always_inline void kvm_run_exit(long ret)
{
    struct run_key k = {.tid = (u32)bpf_get_current_pid_tgid(), .source = SRC_KVM_RUN};
    struct run_rec *r = runs.lookup(&k); /* only a thread that entered KVM_RUN has one */
    if (!r || !r->in_run)
        return;
    u64 now = bpf_ktime_get_ns();
    r->raw_exit = now;
    if (ret != -VFMIG_EINTR) {
        exit_at(r, SRC_KVM_RUN, now); /* a guest exit: it ran up to here */
    } else if (r->kick_at && r->kick_at < r->last_entry) {
        /* The signal was pending before the run began: no guest code ran, and this was no
         * entry either (a destination's first run can be one). */
        r->empty_runs++;
        r->last_entry = r->prev_entry;
        r->first_entry = r->prev_first_entry;
        r->in_run = 0;
    } else if (r->kicked && r->kick_end) {
        exit_at(r, SRC_KVM_RUN, r->kick_end);
    } else if (r->kicked && r->off_after_kick > r->kick_at) {
        /* On the CPU at the kick, then off it before the return: the guest had stopped by then
         * (it cannot run off the CPU, and after the kick KVM does not re-enter it). */
        exit_at(r, SRC_KVM_RUN, r->off_after_kick);
    } else {
        exit_at(r, SRC_KVM_RUN, now);
    }
}

#ifdef VFMIG_TP_KVM_ENTRY
TRACEPOINT_PROBE(kvm, kvm_entry)
{
    guest_entry(SRC_KVM_ENTRY);
    return 0;
}
#endif

#ifdef VFMIG_TP_KVM_EXIT
TRACEPOINT_PROBE(kvm, kvm_exit)
{
    guest_exit(SRC_KVM_ENTRY);
    return 0;
}
#endif

#ifdef VFMIG_TP_SYS_ENTER
TRACEPOINT_PROBE(raw_syscalls, sys_enter)
{
    if (args->id == VFMIG_NR_IOCTL && (u32)args->args[1] == VFMIG_KVM_RUN)
        guest_entry(SRC_KVM_RUN);
    return 0;
}
#endif

#ifdef VFMIG_TP_SYS_EXIT
TRACEPOINT_PROBE(raw_syscalls, sys_exit)
{
    if (args->id == VFMIG_NR_IOCTL)
        kvm_run_exit(args->ret); /* only an ioctl whose enter was KVM_RUN on this thread */
    return 0;
}
#endif

#ifdef VFMIG_TP_SCHED_SWITCH
static __always_inline struct run_rec *in_kvm_run(u32 tid)
{
    struct run_key k = {.tid = tid, .source = SRC_KVM_RUN};
    struct run_rec *r = runs.lookup(&k);
    return r && r->in_run ? r : 0;
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    u64 now = bpf_ktime_get_ns();
    struct run_rec *r = in_kvm_run((u32)args->prev_pid);
    if (r) {
        r->off_at = now;
        r->off_state = (u32)args->prev_state; /* 0 (or above 0xff): preempted; 1: sleeping; 2: blocked */
        if (r->kicked && r->kick_at >= r->last_entry && r->off_after_kick < r->kick_at)
            r->off_after_kick = now;
    }
    r = in_kvm_run((u32)args->next_pid);
    if (r)
        r->on_at = now;
    return 0;
}
#endif

#define VFMIG_TASK_INTERRUPTIBLE 1
#define VFMIG_TASK_UNINTERRUPTIBLE 2

#ifdef VFMIG_TP_SIGNAL_GENERATE
TRACEPOINT_PROBE(signal, signal_generate)
{
    struct run_key k = {.tid = (u32)args->pid, .source = SRC_KVM_RUN};
    struct run_rec *r = runs.lookup(&k);
    if (!r)
        return 0;
    if (r->in_run && r->kicked && r->kick_at >= r->last_entry)
        return 0; /* the first signal of this run decided */
    u64 now = bpf_ktime_get_ns();
    r->kick_at = now;
    r->kicked = r->in_run;
    r->kick_end = 0;
    if (r->in_run && r->off_at > r->on_at && r->off_at >= r->last_entry) {
        /* Off the CPU inside KVM_RUN: preempted or blocked, the guest stopped when it went
         * off; sleeping (halted), it was idle and could have run until now. */
        u32 st = r->off_state & 0xff;
        r->kick_end = (st & VFMIG_TASK_INTERRUPTIBLE) && !(st & VFMIG_TASK_UNINTERRUPTIBLE) ? now : r->off_at;
    }
    return 0;
}
#endif

#ifdef VFMIG_TP_KVM_USERSPACE_EXIT
TRACEPOINT_PROBE(kvm, kvm_userspace_exit)
{
    guest_exit(SRC_UEXIT);
    return 0;
}
#endif

/* ---- checkpoints: rare, so every one is kept as an exact record, up to CP_SLOTS ---- */
#define CP_SLOTS 512
#define CP_NAME 40

struct cp_key {
    u64 ts;
    u32 tid, pad;
};

struct cp_rec {
    u64 t_user;
    u32 tgid, pad;
    char name[CP_NAME];
};

BPF_HASH(cps, struct cp_key, struct cp_rec, CP_SLOTS);
BPF_ARRAY(cp_counts, u64, 2); /* [0] seen, [1] not kept (the table was full) */

#ifdef VFMIG_USDT_CHECKPOINT
int vfmig_on_checkpoint(struct pt_regs *ctx)
{
    u32 flags = 0;
    u32 tgid = watched_tgid(&flags);
    if (!tgid)
        return 0;
    struct cp_key k = {.ts = bpf_ktime_get_ns(), .tid = (u32)bpf_get_current_pid_tgid()};
    struct cp_rec rec = {.tgid = tgid};
    u64 name = 0;
    bpf_usdt_readarg(1, ctx, &name);
    bpf_usdt_readarg(2, ctx, &rec.t_user);
    bpf_probe_read_user_str(rec.name, sizeof(rec.name), (void *)name);
    cp_counts.increment(0);
    if (cps.insert(&k, &rec))
        cp_counts.increment(1);
    return 0;
}
#endif
