/* The guest handshake: raise-to-ack latency (log2 µs) and how each handshake ended, from
 * vfmig's USDT probes (handshake_raise on the migration thread, handshake_ack on the vCPU that
 * executes the driver's ack, handshake_end when the wait ends or a timeout turns late).
 * VFMIG_HS_OUTCOMES (the number of enum vfmig_hs_outcome values) comes from the loader. */
#include "probes.h"

#ifndef VFMIG_HS_OUTCOMES
#error "the loader defines VFMIG_HS_OUTCOMES from vfmig._core.HS_OUTCOMES"
#endif

enum { HS_RAISED = 0, HS_ACKS = 1, HS_ACKS_PAST_DEADLINE = 2, HS_ACKS_UNMATCHED = 3, N_HS_COUNTS = 4 };

struct hs_key {
    u32 tgid, bdf;
};

struct hs_open {
    u64 raised_at, deadline;
};

struct hs_hist_key {
    u32 tgid;
    u32 pad;
    u64 slot;
};

BPF_HASH(hs_open, struct hs_key, struct hs_open, 256);
BPF_HISTOGRAM(hs_hist, struct hs_hist_key, 512);
BPF_ARRAY(hs_counts, u64, N_HS_COUNTS);
BPF_ARRAY(hs_outcomes, u64, VFMIG_HS_OUTCOMES);

#ifdef VFMIG_USDT_HANDSHAKE_RAISE
int vfmig_on_handshake_raise(struct pt_regs *ctx)
{
    u32 flags = 0;
    u32 tgid = watched_tgid(&flags);
    if (!tgid)
        return 0;
    u32 bdf = 0; /* bcc reads an argument only into its declared size */
    u64 deadline = 0;
    bpf_usdt_readarg(1, ctx, &bdf);
    bpf_usdt_readarg(3, ctx, &deadline);
    struct hs_key k = {.tgid = tgid, .bdf = bdf};
    struct hs_open o = {.raised_at = bpf_ktime_get_ns(), .deadline = deadline};
    hs_open.update(&k, &o);
    hs_counts.increment(HS_RAISED);
    return 0;
}
#endif

#ifdef VFMIG_USDT_HANDSHAKE_ACK
int vfmig_on_handshake_ack(struct pt_regs *ctx)
{
    u32 flags = 0;
    u32 tgid = watched_tgid(&flags);
    if (!tgid)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u32 bdf = 0;
    bpf_usdt_readarg(1, ctx, &bdf);
    struct hs_key k = {.tgid = tgid, .bdf = bdf};
    struct hs_open *o = hs_open.lookup(&k);
    if (!o) {
        hs_counts.increment(HS_ACKS_UNMATCHED);
        return 0;
    }
    struct hs_hist_key hk = {.tgid = tgid, .slot = bpf_log2l(now > o->raised_at ? (now - o->raised_at) / 1000 : 0)};
    hs_hist.increment(hk);
    hs_counts.increment(now > o->deadline ? HS_ACKS_PAST_DEADLINE : HS_ACKS);
    hs_open.delete(&k);
    return 0;
}
#endif

#ifdef VFMIG_USDT_HANDSHAKE_END
int vfmig_on_handshake_end(struct pt_regs *ctx)
{
    u32 flags = 0;
    if (!watched_tgid(&flags))
        return 0;
    u32 outcome = 0;
    bpf_usdt_readarg(2, ctx, &outcome);
    if (outcome < VFMIG_HS_OUTCOMES)
        hs_outcomes.increment(outcome);
    return 0;
}
#endif
