/* Device interrupt latency per guest vector, as log2 histograms in µs.
 *
 * Start: the device raising it. An emulated device in a vfmig process fires USDT
 * vfmig:msix_raise just before its irqfd write; a real VF's host interrupt is the vfio-msix
 * handler (irq:irq_handler_entry named "vfio-msix[...]", or a kprobe/fentry on
 * vfio_msihandler), matched to the kvm:kvm_msi_set_irq that follows on the same CPU; a
 * process without either (QEMU's emulated devices) starts at kvm:kvm_msi_set_irq.
 * Path: raise -> kvm:kvm_apic_accept_irq on the raising thread (stage DELIVER).
 * End: kvm:kvm_eoi for that vector on a vCPU of the same process (stage HANDLED). Every raise
 * pending when an EOI comes is completed by it: raises that coalesced into one interrupt are
 * all counted, so the HANDLED total equals the raises that reached an EOI.
 *
 * Vectors are per local APIC, so everything is keyed by (process, destination APIC id, vector):
 * the id is the MSI address's destination field, and kvm_eoi names the APIC that EOIs. (With
 * logical destination mode the two need not match; vfmig's guests and Linux in x2APIC physical
 * mode use physical ids.) Pending raises sit in a ring per key with one producer (a vector of
 * one APIC belongs to one MSI-X entry, raised under its function's MSI-X lock; a vfio vector's
 * host interrupt runs on one CPU at a time) and one consumer (that APIC's vCPU). Tracing
 * programs cannot take bpf_spin_lock, so the ring publishes with an atomic tail; a raise that
 * finds it full is counted as untimed. A raise that lands while its vector is in service is
 * completed by that service's EOI, so its latency reads short and its own EOI as unmatched.
 * EOIs are seen as kvm:kvm_eoi, or kvm:kvm_pv_eoi for guests using the paravirtual EOI; with
 * APICv/AVIC most EOIs of edge interrupts do not exit, and the loader says so. */
#include "probes.h"

#define PEND_SLOTS 32
#define PEND_MASK (PEND_SLOTS - 1)

enum { STAGE_DELIVER = 0, STAGE_HANDLED = 1 };
enum {
    IRQ_RAISED = 0,    /* starts recorded (any kind) */
    IRQ_UNTIMED = 1,   /* starts lost: ring full */
    IRQ_MSI = 2,       /* kvm_msi_set_irq in a watched process or after a vfio interrupt */
    IRQ_ACCEPT = 3,    /* kvm_apic_accept_irq in a watched process */
    IRQ_EOI = 4,       /* kvm_eoi with a vector, in a watched process */
    IRQ_UNMATCHED = 5, /* an EOI with no raise pending (timers, IPIs, a start missed) */
    IRQ_HW = 6,        /* vfio-msix host interrupts */
    N_IRQ_COUNTS = 7,
};

struct vec_key {
    u32 tgid; /* 0: a host interrupt, whose process is not known in hard-irq context */
    u32 apic; /* destination APIC id */
    u32 vec;
};

struct pend {
    u32 head, tail;
    u64 ts[PEND_SLOTS];
};

struct irq_hist_key {
    u32 tgid;
    u32 apic;
    u32 vec;
    u32 stage;
    u64 slot;
};

/* Which device entry a guest vector belongs to, from the raise (USDT only). */
struct vec_src {
    u32 bdf, entry;
    u64 raises;
};

BPF_HASH(pending, struct vec_key, struct pend, 1024);
BPF_HISTOGRAM(irq_hist, struct irq_hist_key, 4096);
BPF_HASH(vec_src, struct vec_key, struct vec_src, 1024);
BPF_ARRAY(irq_counts, u64, N_IRQ_COUNTS);
BPF_HASH(raise_at, u32, u64, 4096); /* tid -> start of the raise it is delivering */
BPF_PERCPU_ARRAY(hw_start, u64, 1);  /* a vfio-msix host interrupt on this CPU */

static __always_inline void push_start(struct vec_key *k, u64 ts)
{
    struct pend zero = {};
    struct pend *p = pending.lookup_or_try_init(k, &zero);
    if (!p || p->tail - p->head >= PEND_SLOTS) {
        irq_counts.increment(IRQ_UNTIMED);
        return;
    }
    p->ts[p->tail & PEND_MASK] = ts;
    __sync_fetch_and_add(&p->tail, 1); /* publishes ts (x86: stores are not reordered) */
    irq_counts.increment(IRQ_RAISED);
}

/* Completes every raise pending for k at `now`; returns how many. */
static __always_inline u32 complete(struct vec_key *k, u64 now)
{
    struct pend *p = pending.lookup(k);
    if (!p)
        return 0;
    u32 head = p->head, tail = p->tail, done = 0;
#pragma unroll
    for (int i = 0; i < PEND_SLOTS; i++) {
        if (head + i == tail)
            break;
        u64 ts = p->ts[(head + i) & PEND_MASK];
        struct irq_hist_key hk = {.tgid = k->tgid, .apic = k->apic, .vec = k->vec, .stage = STAGE_HANDLED};
        hk.slot = bpf_log2l(now > ts ? (now - ts) / 1000 : 0);
        irq_hist.increment(hk);
        done++;
    }
    p->head = head + done;
    return done;
}

static __always_inline void note_deliver_start(u64 ts)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    raise_at.update(&tid, &ts);
}

#ifdef VFMIG_USDT_MSIX_RAISE
int vfmig_on_msix_raise(struct pt_regs *ctx)
{
    u32 flags = 0;
    u32 tgid = watched_tgid(&flags);
    if (!tgid)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u32 bdf = 0, entry = 0, data = 0; /* bcc reads an argument only into its declared size */
    u64 addr = 0;
    bpf_usdt_readarg(1, ctx, &bdf);
    bpf_usdt_readarg(2, ctx, &entry);
    bpf_usdt_readarg(3, ctx, &addr);
    bpf_usdt_readarg(4, ctx, &data);
    struct vec_key k = {.tgid = tgid, .apic = (addr >> 12) & 0xff, .vec = data & 0xff};
    struct vec_src zero = {.bdf = bdf, .entry = entry};
    struct vec_src *s = vec_src.lookup_or_try_init(&k, &zero);
    if (s) {
        s->bdf = bdf;
        s->entry = entry;
        __sync_fetch_and_add(&s->raises, 1);
    }
    push_start(&k, now);
    note_deliver_start(now);
    return 0;
}
#endif

static __always_inline void hw_irq(void)
{
    int zero = 0;
    u64 *t = hw_start.lookup(&zero);
    if (t)
        *t = bpf_ktime_get_ns();
    irq_counts.increment(IRQ_HW);
}

#ifdef VFMIG_TP_IRQ_HANDLER_ENTRY
TRACEPOINT_PROBE(irq, irq_handler_entry)
{
    char name[10] = {};
    TP_DATA_LOC_READ_STR(name, name, sizeof(name));
    if (name[0] == 'v' && name[1] == 'f' && name[2] == 'i' && name[3] == 'o' && name[4] == '-' &&
        name[5] == 'm' && name[6] == 's' && name[7] == 'i' && name[8] == 'x')
        hw_irq();
    return 0;
}
#endif

#ifdef VFMIG_KPROBE_VFIO_MSIHANDLER
int vfmig_on_vfio_msihandler(struct pt_regs *ctx)
{
    hw_irq();
    return 0;
}
#endif

#ifdef VFMIG_FENTRY_VFIO_MSIHANDLER
KFUNC_PROBE(vfio_msihandler)
{
    hw_irq();
    return 0;
}
#endif

#ifdef VFMIG_TP_KVM_MSI_SET_IRQ
TRACEPOINT_PROBE(kvm, kvm_msi_set_irq)
{
    u64 now = bpf_ktime_get_ns();
    u32 vec = (u32)args->data & 0xff, apic = (args->address >> 12) & 0xff;
    int zero = 0;
    u64 *hw = hw_start.lookup(&zero);
    if (hw && *hw && now - *hw < 1000000) { /* the vfio interrupt this CPU is handling */
        struct vec_key k = {.tgid = 0, .apic = apic, .vec = vec};
        push_start(&k, *hw);
        *hw = 0;
        irq_counts.increment(IRQ_MSI);
        return 0;
    }
    u32 flags = 0;
    u32 tgid = watched_tgid(&flags);
    if (!tgid)
        return 0;
    irq_counts.increment(IRQ_MSI);
    if (flags & VFMIG_T_USDT)
        return 0; /* its device's raise already started it */
    struct vec_key k = {.tgid = tgid, .apic = apic, .vec = vec};
    push_start(&k, now);
    note_deliver_start(now);
    return 0;
}
#endif

#ifdef VFMIG_TP_KVM_APIC_ACCEPT_IRQ
TRACEPOINT_PROBE(kvm, kvm_apic_accept_irq)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u64 *start = raise_at.lookup(&tid);
    if (!start)
        return 0;
    u64 now = bpf_ktime_get_ns();
    struct irq_hist_key hk = {
        .tgid = bpf_get_current_pid_tgid() >> 32, .apic = args->apicid, .vec = args->vec, .stage = STAGE_DELIVER};
    hk.slot = bpf_log2l(now > *start ? (now - *start) / 1000 : 0);
    irq_hist.increment(hk);
    raise_at.delete(&tid);
    irq_counts.increment(IRQ_ACCEPT);
    return 0;
}
#endif

static __always_inline void guest_eoi(u32 apic, int vector)
{
    if (vector < 0)
        return; /* an EOI with nothing in service */
    u32 flags = 0;
    u32 tgid = watched_tgid(&flags);
    if (!tgid)
        return;
    u64 now = bpf_ktime_get_ns();
    irq_counts.increment(IRQ_EOI);
    struct vec_key k = {.tgid = tgid, .apic = apic, .vec = (u32)vector};
    if (complete(&k, now))
        return;
    struct vec_key hwk = {.tgid = 0, .apic = apic, .vec = (u32)vector};
    if (!complete(&hwk, now))
        irq_counts.increment(IRQ_UNMATCHED);
}

#ifdef VFMIG_TP_KVM_EOI
TRACEPOINT_PROBE(kvm, kvm_eoi)
{
    guest_eoi(args->apicid, args->vector);
    return 0;
}
#endif

#ifdef VFMIG_TP_KVM_PV_EOI
TRACEPOINT_PROBE(kvm, kvm_pv_eoi)
{
    guest_eoi(args->apicid, args->vector);
    return 0;
}
#endif
