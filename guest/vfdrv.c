/* vfdrv: a driver for simvf (csrc/include/vfmig/simvf_abi.h) plus the dirtier workload.
 *
 * vCPU 0 finds simvf on PCI bus 0, places its BARs, programs MSI-X and the migration
 * capability, posts an RX ring and a TX ring, and enables the device; then every vCPU runs the
 * dirtier loop (workload.h). Received packets are checked in the RX interrupt handler, or under
 * load in the workload's poll (magic, length, checksum, and the sequence oracle: every gap must
 * equal the growth of the device's drop count), and the results kept in struct
 * simvf_guest_stats, in guest RAM so they migrate.
 * Every VFDRV_TX_EVERY good packets it sends one on TX.
 *
 * The migration handshake (the capability's VMM_STATUS and DEV_STATUS, simvf_abi.h): a notice
 * (MIGRATING) quiesces the driver: RX buffers are no longer re-posted and nothing is sent, while
 * what arrives is still taken and checked; then it acks (DEV_STATUS = VFMIG_DEV_ACK), at once or
 * later as the boot parameter guest_ack says. A cancel (VMM_STATUS back to 0) resumes in place;
 * the post-load interrupt on the destination (MIGRATED) resumes in place, or with
 * RESET_REQUIRED re-initialises the device and its rings and restarts the oracle.
 *
 * Interrupts go to vCPU 0 only; the other vCPUs keep IF clear. Every handler runs with IF
 * clear, so the driver state needs no locking: it is only touched by vCPU 0 with IF clear
 * (in a handler, in the poll fallback, or before interrupts are on). */
#include "pci.h"
#include "workload.h"

/* Guest-physical layout. Low pages: guest_abi.h has 0x1000..0x4FFF, simvf_abi.h 0x5000, stacks
 * grow down from 0x80000 to 0x60000 at most. The rings and buffers sit between the image
 * (0x100000, < 1 MiB) and the working set (VFMIG_DATA_GPA). */
#define VFDRV_IDT_GPA     0x6000u   /* 256 gates x 8 bytes */
#define VFDRV_PRIV_GPA    0x6800u   /* struct vfdrv_priv */
#define VFDRV_IRQ_RET_GPA 0x6FFCu   /* irq.S: the interrupted EIP while a handler returns */
#define VFDRV_RX_RING_GPA 0x200000u
#define VFDRV_TX_RING_GPA 0x201000u
#define VFDRV_RX_BUF_GPA  0x210000u /* VFDRV_RX_N x SIMVF_BUF_MAX: buffer i belongs to descriptor i */
#define VFDRV_TX_BUF_GPA  0x290000u /* VFDRV_TX_N x SIMVF_BUF_MAX */
#define VFDRV_END_GPA     0x2B0000u
#define VFDRV_RX_N        256u
#define VFDRV_TX_N        64u
_Static_assert(VFDRV_RX_BUF_GPA + VFDRV_RX_N * SIMVF_BUF_MAX <= VFDRV_TX_BUF_GPA &&
               VFDRV_TX_BUF_GPA + VFDRV_TX_N * SIMVF_BUF_MAX <= VFDRV_END_GPA && VFDRV_END_GPA <= VFMIG_DATA_GPA,
               "vfdrv's buffers overlap");

/* Vectors: MSI-X entry i raises VFDRV_VEC_BASE + i. */
#define VFDRV_VEC_BASE    0x30u
#define VFDRV_VEC_RX      (VFDRV_VEC_BASE + SIMVF_VEC_RX)
#define VFDRV_VEC_TX      (VFDRV_VEC_BASE + SIMVF_VEC_TX)
#define VFDRV_VEC_MIG     (VFDRV_VEC_BASE + SIMVF_VEC_MIGRATION)
#define VFDRV_VEC_MISC    (VFDRV_VEC_BASE + SIMVF_VEC_MISC)
#define VFDRV_VEC_SPURIOUS 0xFFu

/* RX work is bounded so that the workload on vCPU 0 keeps running however fast the wire is:
 * every instruction is emulated here, and a packet costs a few hundred microseconds. An RX
 * interrupt takes up to VFDRV_IRQ_BUDGET packets; if more are waiting, the driver switches to
 * polling (NAPI style): later RX interrupts only acknowledge, and the workload's poll takes
 * VFDRV_POLL_BUDGET packets after each of its clock reads until the ring is caught up; then
 * interrupts take over again. Under overload the device finds no free buffer and counts drops. */
#define VFDRV_IRQ_BUDGET  32u
#define VFDRV_POLL_BUDGET 2u
#define VFDRV_TX_EVERY    64u

/* The migration handshake. LATE acks after more than any VMM deadline (the default is 50 ms). */
#define VFDRV_MIG_IDLE     0u /* no notice outstanding */
#define VFDRV_MIG_NOTIFIED 1u /* a notice was taken; a cancel or the post-load interrupt ends it */
#define VFDRV_LATE_ACK_NS  500000000ull
_Static_assert(sizeof(struct simvf_guest_stats) == 136 && __builtin_offsetof(struct simvf_guest_stats, mig_notices) == 72 &&
                   __builtin_offsetof(struct simvf_guest_stats, reset_discarded) == 128,
               "struct simvf_guest_stats differs between the 32-bit guest and the 64-bit host");

/* xAPIC registers. */
#define LAPIC_BASE        0xFEE00000u
#define LAPIC_ID          0x020u
#define LAPIC_TPR         0x080u
#define LAPIC_EOI         0x0B0u
#define LAPIC_SVR         0x0F0u
#define LAPIC_LVT_LINT0   0x350u
#define LAPIC_SVR_ENABLE  0x100u
#define LAPIC_LVT_MASKED  0x10000u

/* The driver's own counters and state, next to its IDT: the ABI's stats say whether the
 * packets were right, these say how the driver got there (for tests and debugging). */
#define VFDRV_PRIV_MAGIC  0x56524456u /* "VDRV" */
struct vfdrv_priv {
    uint32_t magic;
    uint32_t bar0, msix_table;     /* where the driver put the registers and the MSI-X table */
    uint32_t migcap;               /* config offset of the migration capability, 0: none */
    uint32_t rx_head;              /* next RX descriptor to look at */
    uint32_t tx_head, tx_clean;    /* free-running: next to post, next to reclaim */
    uint32_t msix_vectors;         /* table size the device reports */
    uint32_t rx_polling;           /* 1: RX is taken by the workload's poll, interrupts only acknowledge */
    uint64_t rx_polled;            /* RX packets taken by the poll */
    uint64_t rx_irqs_deferred;     /* RX interrupts that found polling on */
    uint64_t tx_done, tx_errors;   /* TX descriptors reclaimed: DONE, DONE | ERROR */
    uint64_t tx_ring_full;         /* TX packets not sent: no free descriptor */
    uint64_t tx_irqs, mig_irqs, misc_irqs, spurious_irqs, other_irqs;
    uint32_t rx_bad_run;           /* bad packets since the last good one: each used a sequence number */
    /* The first RX error, as seen: for reporting a device bug with evidence. */
    uint32_t err_desc, err_desc_len, err_pkt_len, err_magic;
    uint64_t err_seq, err_next_seq, err_drops, err_last_drops;
    uint32_t err_csum, err_csum_want;
    /* The migration handshake. */
    uint32_t ack_mode;             /* enum vfmig_guest_ack, from the boot parameters */
    uint32_t mig_phase;            /* VFDRV_MIG_*: a notice outstanding or not */
    uint32_t rx_held;              /* RX descriptors taken while quiesced and not re-posted: the ones just before rx_head */
    uint32_t ack_pending;          /* a delayed ack is due at ack_due_ns (0: the next poll sets it) */
    uint32_t oracle_resync;        /* 1 after a reset: the next good packet is the oracle's new baseline */
    uint64_t ack_delay_ns, ack_due_ns;
    uint64_t mig_repeats;          /* migration interrupts that found a status already handled */
    uint64_t mig_spurious;         /* ... that found nothing to do (no notice outstanding, no MIGRATED) */
    uint32_t last_loads;           /* VFMIG_MIGCAP_LOADS when the last post-load was handled */
    uint32_t loads_seen;           /* last_loads is valid */
    uint64_t acks_dropped;         /* delayed acks not sent: the status had moved on when they fell due */
    uint64_t tx_held_back;         /* TX packets not sent because the driver was quiesced */
    uint64_t tx_discarded;         /* posted TX descriptors a reset threw away unprocessed */
};

extern char irq_stubs[]; /* irq.S: 16 bytes per vector */
void vfdrv_irq(uint32_t vec);
void vfdrv_exception(uint32_t vec);

static inline volatile struct simvf_guest_stats *gstats(void)
{
    return (volatile struct simvf_guest_stats *)SIMVF_GUEST_STATS_GPA;
}
static inline volatile struct vfdrv_priv *priv(void) { return (volatile struct vfdrv_priv *)VFDRV_PRIV_GPA; }
static inline volatile struct simvf_desc *rx_ring(void) { return (volatile struct simvf_desc *)VFDRV_RX_RING_GPA; }
static inline volatile struct simvf_desc *tx_ring(void) { return (volatile struct simvf_desc *)VFDRV_TX_RING_GPA; }

static void put_hex(uint32_t v, int digits)
{
    char s[9];
    for (int i = digits - 1; i >= 0; i--, v >>= 4)
        s[i] = "0123456789abcdef"[v & 0xF];
    s[digits] = 0;
    puts_console(s);
}

static void lapic_write(uint32_t reg, uint32_t v) { mmio_write32(LAPIC_BASE + reg, v); }

/* simvf_csum, hand-unrolled: the emulator's cost is per instruction, and the plain loop takes
 * about six a word where this takes under three. */
static uint32_t csum_words(const volatile uint32_t *w, uint32_t n, uint64_t seq)
{
    uint32_t h = (uint32_t)seq ^ (uint32_t)(seq >> 32) ^ 0x9E3779B9u;
    const volatile uint32_t *end8 = w + (n & ~7u);
    if (w != end8)
        __asm__ volatile("1: xorl (%1), %0\n imull $0x01000193, %0, %0\n"
                         " xorl 4(%1), %0\n imull $0x01000193, %0, %0\n"
                         " xorl 8(%1), %0\n imull $0x01000193, %0, %0\n"
                         " xorl 12(%1), %0\n imull $0x01000193, %0, %0\n"
                         " xorl 16(%1), %0\n imull $0x01000193, %0, %0\n"
                         " xorl 20(%1), %0\n imull $0x01000193, %0, %0\n"
                         " xorl 24(%1), %0\n imull $0x01000193, %0, %0\n"
                         " xorl 28(%1), %0\n imull $0x01000193, %0, %0\n"
                         " addl $32, %1\n cmpl %2, %1\n jne 1b"
                         : "+r"(h), "+r"(w) : "r"(end8) : "memory", "cc");
    for (uint32_t i = 0; i < (n & 7u); i++)
        h = (h ^ w[i]) * 0x01000193u;
    return h;
}

static void doorbell(uint32_t reg) { mmio_write32(priv()->bar0 + reg, 1); }

/* TX ------------------------------------------------------------------------------------------ */
static void tx_reclaim(void)
{
    volatile struct vfdrv_priv *p = priv();
    uint32_t clean = p->tx_clean, head = p->tx_head;
    while (clean != head) {
        volatile struct simvf_desc *d = &tx_ring()[clean % VFDRV_TX_N];
        uint32_t f = d->flags;
        if (!(f & SIMVF_DESC_DONE))
            break;
        if (f & SIMVF_DESC_ERROR)
            p->tx_errors = p->tx_errors + 1;
        else
            p->tx_done = p->tx_done + 1;
        d->flags = 0;
        clean++;
    }
    p->tx_clean = clean;
}

static void tx_send(void)
{
    volatile struct vfdrv_priv *p = priv();
    volatile struct simvf_guest_stats *gs = gstats();
    tx_reclaim();
    if (gs->quiesced) {
        p->tx_held_back = p->tx_held_back + 1;
        return;
    }
    if (p->tx_head - p->tx_clean >= VFDRV_TX_N) {
        p->tx_ring_full = p->tx_ring_full + 1;
        return;
    }
    uint32_t slot = p->tx_head % VFDRV_TX_N;
    uint64_t seq = gs->tx_sent;
    /* Lengths vary (64..304 bytes) so the device's length handling is exercised, but stay
     * short: every payload word costs the emulated guest a few instructions. */
    uint32_t len = SIMVF_PKT_MIN + ((uint32_t)seq % 16u) * 16u;
    uint32_t buf = VFDRV_TX_BUF_GPA + slot * SIMVF_BUF_MAX;
    volatile struct simvf_pkt *pkt = (volatile struct simvf_pkt *)buf;
    volatile uint32_t *w = (volatile uint32_t *)(buf + sizeof(struct simvf_pkt));
    uint32_t nwords = (len - (uint32_t)sizeof(struct simvf_pkt)) / 4;
    for (uint32_t i = 0; i < nwords; i++)
        w[i] = (uint32_t)seq * 0x9E3779B1u + i;
    pkt->magic = SIMVF_PKT_MAGIC;
    pkt->len = len;
    pkt->seq = seq;
    pkt->drops = 0;
    pkt->reserved = 0;
    pkt->csum = csum_words(w, nwords, seq);
    volatile struct simvf_desc *d = &tx_ring()[slot];
    d->addr = buf;
    d->len = len;
    __asm__ volatile("" ::: "memory"); /* AVAIL last: the device may take it at once */
    d->flags = SIMVF_DESC_AVAIL;
    p->tx_head = p->tx_head + 1;
    gs->tx_sent = seq + 1;
    doorbell(SIMVF_REG_TX_DOORBELL);
}

/* RX ------------------------------------------------------------------------------------------ */
static void rx_error(uint32_t err, uint32_t desc, uint32_t dlen, const volatile struct simvf_pkt *pkt, uint32_t want)
{
    volatile struct simvf_guest_stats *gs = gstats();
    volatile struct vfdrv_priv *p = priv();
    gs->errors = gs->errors + 1;
    if (err != SIMVF_ERR_GAP)
        p->rx_bad_run = p->rx_bad_run + 1;
    if (gs->first_error != SIMVF_ERR_NONE)
        return;
    p->err_desc = desc;
    p->err_desc_len = dlen;
    p->err_magic = pkt->magic;
    p->err_pkt_len = pkt->len;
    p->err_seq = pkt->seq;
    p->err_drops = pkt->drops;
    p->err_next_seq = gs->next_seq;
    p->err_last_drops = gs->last_drops;
    p->err_csum = pkt->csum;
    p->err_csum_want = want;
    gs->first_error = err;
    puts_console("vfdrv: RX error ");
    put_hex(err, 1);
    puts_console(" at seq ");
    put_hex((uint32_t)pkt->seq, 8);
    puts_console("\n");
}

/* Check one received packet and account it. */
static void rx_packet(uint32_t desc, uint32_t dlen)
{
    volatile struct simvf_guest_stats *gs = gstats();
    const volatile struct simvf_pkt *pkt =
        (const volatile struct simvf_pkt *)(VFDRV_RX_BUF_GPA + desc * SIMVF_BUF_MAX);
    uint32_t len = pkt->len;
    if (pkt->magic != SIMVF_PKT_MAGIC) {
        rx_error(SIMVF_ERR_MAGIC, desc, dlen, pkt, 0);
        return;
    }
    if (len < SIMVF_PKT_MIN || len > SIMVF_BUF_MAX || (len & 3) || len != dlen) {
        rx_error(SIMVF_ERR_LEN, desc, dlen, pkt, 0);
        return;
    }
    uint64_t seq = pkt->seq, drops = pkt->drops;
    const volatile uint32_t *payload = (const volatile uint32_t *)((uint32_t)pkt + sizeof(struct simvf_pkt));
    uint32_t want = csum_words(payload, (len - (uint32_t)sizeof(struct simvf_pkt)) / 4, seq);
    if (pkt->csum != want) {
        rx_error(SIMVF_ERR_CSUM, desc, dlen, pkt, want);
        return;
    }
    /* A bad packet since the last good one was offered too: it takes a sequence number but is
     * neither received nor a drop, so one corrupt packet makes one error, not two. */
    volatile struct vfdrv_priv *p = priv();
    if (p->oracle_resync) {
        /* The first good packet after a reset is the new baseline: what the reset threw away
         * (packets in the ring unread, the drops meanwhile) cannot be told apart, so the books
         * note the skipped sequence numbers instead. The wire never goes back: that is an error. */
        p->oracle_resync = 0;
        int back = seq < gs->next_seq;
        if (back)
            rx_error(SIMVF_ERR_GAP, desc, dlen, pkt, 0);
        else
            gs->resync_skipped = gs->resync_skipped + (seq - gs->next_seq);
        gs->last_drops = drops;
        gs->next_seq = seq + 1;
        p->rx_bad_run = 0;
        if (!back)
            gs->received = gs->received + 1; /* last: see below */
        return;
    }
    uint64_t next = gs->next_seq + p->rx_bad_run, last_drops = gs->last_drops;
    /* The oracle: the gap (0 for the next packet) equals what the device's drop count grew by;
     * a drop count that moved without a gap is as wrong as a gap it does not explain. */
    if (seq < next || seq - next != drops - last_drops) {
        rx_error(SIMVF_ERR_GAP, desc, dlen, pkt, 0);
        /* Resynchronise forward, so one bad gap is one error, not one per packet after it. */
        if (seq >= next) {
            gs->last_drops = drops;
            gs->next_seq = seq + 1;
            p->rx_bad_run = 0;
        }
        return;
    }
    gs->dropped_seen = gs->dropped_seen + (seq - next);
    gs->last_drops = drops;
    gs->next_seq = seq + 1;
    p->rx_bad_run = 0;
    /* received last (volatile stores stay in order, and x86 keeps them so): whoever sees it reach
     * the device's delivered count sees the books balanced, even if the VM stops right here. */
    gs->received = gs->received + 1;
}

static int rx_pending(void) { return rx_ring()[priv()->rx_head].flags & SIMVF_DESC_DONE; }

/* Take every completed RX descriptor in ring order, up to budget, re-posting each buffer, or,
 * while quiesced, holding it back (flags 0: the device stops there, and drops and counts what
 * it cannot deliver). Returns how many. IF clear. */
static uint32_t rx_drain(uint32_t budget)
{
    volatile struct vfdrv_priv *p = priv();
    volatile struct simvf_guest_stats *gs = gstats();
    uint32_t head = p->rx_head, n = 0, quiesced = gs->quiesced;
    for (; n < budget; n++) {
        volatile struct simvf_desc *d = &rx_ring()[head];
        if (!(d->flags & SIMVF_DESC_DONE))
            break;
        uint64_t before = gs->received;
        rx_packet(head, d->len);
        if (quiesced) {
            d->flags = 0;
            p->rx_held = p->rx_held + 1;
        } else {
            d->len = SIMVF_BUF_MAX;
            __asm__ volatile("" ::: "memory"); /* AVAIL last */
            d->flags = SIMVF_DESC_AVAIL;
        }
        head = (head + 1) % VFDRV_RX_N;
        p->rx_head = head;
        if (gs->received != before && gs->received % VFDRV_TX_EVERY == 0)
            tx_send();
    }
    if (n && !quiesced)
        doorbell(SIMVF_REG_RX_DOORBELL);
    return n;
}

/* Re-post the buffers held back while quiesced, oldest first, and say so. IF clear. */
static void rx_repost_held(void)
{
    volatile struct vfdrv_priv *p = priv();
    uint32_t held = p->rx_held;
    for (uint32_t k = held; k > 0; k--) {
        volatile struct simvf_desc *d = &rx_ring()[(p->rx_head + VFDRV_RX_N - k) % VFDRV_RX_N];
        d->len = SIMVF_BUF_MAX;
        __asm__ volatile("" ::: "memory"); /* AVAIL last */
        d->flags = SIMVF_DESC_AVAIL;
    }
    p->rx_held = 0;
    if (held)
        doorbell(SIMVF_REG_RX_DOORBELL);
}

/* Every RX buffer posted, its header zeroed (no stale packet can pass as new), TX empty, and
 * both rings programmed; the device must be disabled and reset. IF clear or not yet on. */
static void rings_init(void)
{
    volatile struct vfdrv_priv *p = priv();
    for (uint32_t i = 0; i < VFDRV_RX_N; i++) {
        volatile uint32_t *h = (volatile uint32_t *)(VFDRV_RX_BUF_GPA + i * SIMVF_BUF_MAX);
        for (uint32_t w = 0; w < sizeof(struct simvf_pkt) / 4; w++)
            h[w] = 0;
        volatile struct simvf_desc *d = &rx_ring()[i];
        d->addr = VFDRV_RX_BUF_GPA + i * SIMVF_BUF_MAX;
        d->len = SIMVF_BUF_MAX;
        d->flags = SIMVF_DESC_AVAIL;
    }
    for (uint32_t i = 0; i < VFDRV_TX_N * 4; i++)
        ((volatile uint32_t *)VFDRV_TX_RING_GPA)[i] = 0;
    p->rx_head = 0;
    p->rx_held = 0;
    p->rx_polling = 0;
    p->tx_head = p->tx_clean = 0;
    uint32_t r = p->bar0;
    mmio_write32(r + SIMVF_REG_RX_RING_LO, VFDRV_RX_RING_GPA);
    mmio_write32(r + SIMVF_REG_RX_RING_HI, 0);
    mmio_write32(r + SIMVF_REG_RX_RING_SIZE, VFDRV_RX_N);
    mmio_write32(r + SIMVF_REG_TX_RING_LO, VFDRV_TX_RING_GPA);
    mmio_write32(r + SIMVF_REG_TX_RING_HI, 0);
    mmio_write32(r + SIMVF_REG_TX_RING_SIZE, VFDRV_TX_N);
}

/* Migration handshake ------------------------------------------------------------------------- */

/* The capability's registers: each access is two port exits. vCPU 0 with IF clear only: the
 * 0xCF8 latch is one per host, and a handler between a select and its data access would move it. */
static uint8_t mig_vmm_status(void)
{
    return pci_read8(gstats()->bdf, priv()->migcap + VFMIG_MIGCAP_VMM_STATUS);
}
static void mig_dev_status(uint8_t v) { pci_write8(gstats()->bdf, priv()->migcap + VFMIG_MIGCAP_DEV_STATUS, v); }

/* The ack goes last: whoever sees it (the VMM, a test) sees the driver's stats already say so. */
static void mig_ack(void)
{
    priv()->ack_pending = 0;
    gstats()->acks = gstats()->acks + 1;
    mig_dev_status(VFMIG_DEV_ACK);
}

/* Out of quiesce and out of the handshake: held buffers go back to the device, TX runs again. */
static void mig_resume(void)
{
    volatile struct vfdrv_priv *p = priv();
    gstats()->quiesced = 0;
    rx_repost_held();
    p->ack_pending = 0;
    p->mig_phase = VFDRV_MIG_IDLE;
}

/* RESET_REQUIRED: the device may hold anything in its rings, so start it over: disable (no more
 * DMA), reset (ring heads to 0), every buffer re-posted and TX emptied, enable; and the oracle
 * takes its next good packet as the new baseline. Packets left unread in the ring are lost. */
static void mig_reset(void)
{
    volatile struct vfdrv_priv *p = priv();
    volatile struct simvf_guest_stats *gs = gstats();
    uint32_t r = p->bar0;
    mmio_write32(r + SIMVF_REG_CTRL, 0);
    uint32_t unread = 0;
    for (uint32_t i = 0; i < VFDRV_RX_N; i++)
        unread += (rx_ring()[i].flags & SIMVF_DESC_DONE) != 0;
    gs->reset_discarded = gs->reset_discarded + unread;
    tx_reclaim();
    p->tx_discarded = p->tx_discarded + (p->tx_head - p->tx_clean);
    mmio_write32(r + SIMVF_REG_CTRL, SIMVF_CTRL_RESET);
    rings_init();
    p->rx_bad_run = 0;
    p->oracle_resync = 1;
    gs->quiesced = 0;
    p->ack_pending = 0;
    p->mig_phase = VFDRV_MIG_IDLE;
    mmio_write32(r + SIMVF_REG_CTRL, SIMVF_CTRL_ENABLE);
    doorbell(SIMVF_REG_RX_DOORBELL);
}

/* Act on VMM_STATUS as just read: from the migration interrupt, or from the poll when a delayed
 * ack fell due (whichever sees a change first acts; the other finds it handled). IF clear. */
static void mig_event(uint32_t status)
{
    volatile struct vfdrv_priv *p = priv();
    volatile struct simvf_guest_stats *gs = gstats();
    gs->last_vmm_status = status;
    if ((status & VFMIG_VMM_MIGRATING) && !(status & VFMIG_VMM_MIGRATED)) {
        /* A stop is coming. */
        if (p->mig_phase == VFDRV_MIG_NOTIFIED) {
            /* Again: a duplicate, or a cancel that coalesced with the next attempt's notice (whose
             * arming cleared DEV_STATUS). Still quiesced and already acked: ack again, which a
             * duplicate does not mind. */
            p->mig_repeats = p->mig_repeats + 1;
            if (gs->quiesced && !p->ack_pending)
                mig_ack();
            return;
        }
        p->mig_phase = VFDRV_MIG_NOTIFIED;
        gs->mig_notices = gs->mig_notices + 1;
        if (p->ack_mode == VFMIG_ACK_NEVER)
            return; /* a stuck driver: neither quiesces nor acks */
        /* Quiesce: no buffer is re-posted and nothing is sent from now on. The device finishes a
         * packet's DMA before it marks its descriptor done (under its lock), so nothing is half
         * written; completed descriptors are still taken as usual, reclaimed TX ones here. */
        gs->quiesced = 1;
        tx_reclaim();
        if (p->ack_mode == VFMIG_ACK_LATE || p->ack_mode == VFMIG_ACK_SLOW) {
            p->ack_due_ns = 0; /* the poll sets it from its clock read: the handler reads no clock */
            p->ack_pending = 1;
            return;
        }
        mig_ack();
        return;
    }
    if (status & VFMIG_VMM_MIGRATED) {
        /* The post-load interrupt on the destination. One already handled (an interrupt the
         * source left pending lands too) is not acted on twice; the VMM counts its loads, so a
         * second move with the same status is still a new one. */
        uint32_t loads = pci_read8(gs->bdf, p->migcap + VFMIG_MIGCAP_LOADS);
        if (p->loads_seen && loads == p->last_loads) {
            p->mig_repeats = p->mig_repeats + 1;
            return;
        }
        p->last_loads = loads;
        p->loads_seen = 1;
        if (status & VFMIG_VMM_RESET_REQUIRED) {
            mig_reset();
            gs->resets = gs->resets + 1;
            puts_console("vfdrv: migrated, device reset\n");
        } else {
            /* No console line here: at ~35 us a character it would add a millisecond to the
             * downtime vCPU 0 sees on every migration that went right. */
            mig_resume();
            gs->resumed_in_place = gs->resumed_in_place + 1;
        }
        return;
    }
    if (status == 0 && p->mig_phase == VFDRV_MIG_NOTIFIED) {
        /* Cancelled: the VM stays here. A stale ack must not answer the next notice. */
        mig_resume();
        mig_dev_status(0);
        gs->cancels = gs->cancels + 1;
        puts_console("vfdrv: migration cancelled, resumed\n");
        return;
    }
    p->mig_spurious = p->mig_spurious + 1;
}

/* A delayed ack (LATE, SLOW), from the poll on vCPU 0 with IF set: its due time is set at the
 * first poll after the notice, and when the clock passes it the status is read again, since
 * the VM may have moved or the migration failed meanwhile: then that is handled instead. */
static void mig_ack_poll(uint64_t now)
{
    volatile struct vfdrv_priv *p = priv();
    __asm__ volatile("cli" ::: "memory"); /* decided as one step: a handler may have settled it, or begun another */
    if (p->ack_pending && !p->ack_due_ns) {
        p->ack_due_ns = now + p->ack_delay_ns;
    } else if (p->ack_pending && now >= p->ack_due_ns) {
        uint32_t status = mig_vmm_status();
        if ((status & VFMIG_VMM_MIGRATING) && !(status & VFMIG_VMM_MIGRATED)) {
            gstats()->last_vmm_status = status;
            mig_ack();
        } else {
            p->ack_pending = 0;
            p->acks_dropped = p->acks_dropped + 1;
            mig_event(status);
        }
    }
    __asm__ volatile("sti" ::: "memory");
}

/* Interrupts ----------------------------------------------------------------------------------- */
void vfdrv_irq(uint32_t vec)
{
    volatile struct vfdrv_priv *p = priv();
    switch (vec) {
    case VFDRV_VEC_RX:
        gstats()->interrupts = gstats()->interrupts + 1;
        if (p->rx_polling)
            p->rx_irqs_deferred = p->rx_irqs_deferred + 1;
        else if (rx_drain(VFDRV_IRQ_BUDGET) == VFDRV_IRQ_BUDGET && rx_pending())
            p->rx_polling = 1;
        break;
    case VFDRV_VEC_TX:
        p->tx_irqs = p->tx_irqs + 1;
        tx_reclaim();
        break;
    case VFDRV_VEC_MIG:
        /* One config read (two port exits) per interrupt: the status says which step this is. */
        p->mig_irqs = p->mig_irqs + 1;
        if (p->migcap)
            mig_event(mig_vmm_status());
        break;
    case VFDRV_VEC_MISC:
        p->misc_irqs = p->misc_irqs + 1;
        break;
    case VFDRV_VEC_SPURIOUS:
        /* A spurious interrupt sets no in-service bit: no EOI. */
        p->spurious_irqs = p->spurious_irqs + 1;
        return;
    default:
        p->other_irqs = p->other_irqs + 1;
        break;
    }
    lapic_write(LAPIC_EOI, 0);
}

void vfdrv_exception(uint32_t vec)
{
    gstats()->state = SIMVF_GUEST_FAILED;
    puts_console("vfdrv: exception ");
    put_hex(vec, 2);
    puts_console(", vCPU stopped\n");
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* The workload calls this on vCPU 0 after each clock read: a delayed ack, RX in polling mode,
 * and any packet that is waiting without an interrupt due (two loads when there is nothing to
 * do: the workload may call it after every page). */
static void vfdrv_poll(uint64_t now)
{
    volatile struct vfdrv_priv *p = priv();
    if (p->ack_pending)
        mig_ack_poll(now);
    if (!rx_pending()) {
        p->rx_polling = 0; /* caught up: interrupts again (a racing one finds the packet here next time) */
        return;
    }
    __asm__ volatile("cli" ::: "memory");
    p->rx_polled = p->rx_polled + rx_drain(VFDRV_POLL_BUDGET);
    if (!rx_pending())
        p->rx_polling = 0;
    __asm__ volatile("sti" ::: "memory");
}

static void idt_init(void)
{
    uint16_t cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs)); /* the loader's flat code segment (0x08 here) */
    volatile uint32_t *idt = (volatile uint32_t *)VFDRV_IDT_GPA;
    for (uint32_t v = 0; v < 256; v++) {
        uint32_t at = (uint32_t)irq_stubs + v * 16;
        idt[v * 2] = (uint32_t)cs << 16 | (at & 0xFFFFu);
        idt[v * 2 + 1] = (at & 0xFFFF0000u) | 0x8E00u; /* present, DPL 0, 32-bit interrupt gate */
    }
    struct __attribute__((packed)) { uint16_t limit; uint32_t base; } idtr = {256 * 8 - 1, VFDRV_IDT_GPA};
    __asm__ volatile("lidt %0" ::"m"(idtr));
}

/* Only MSIs reach vCPU 0: the legacy PIC and LINT0 (KVM wires the BSP's to the PIC) are
 * masked; the xAPIC is enabled with 0xFF as its spurious vector. */
static void lapic_init(void)
{
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
    lapic_write(LAPIC_LVT_LINT0, LAPIC_LVT_MASKED);
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_SVR, LAPIC_SVR_ENABLE | VFDRV_VEC_SPURIOUS);
}

static int migcap_match(uint32_t bdf, uint32_t off)
{
    return pci_read32(bdf, off + VFMIG_MIGCAP_SIG) == VFMIG_MIGCAP_SIGNATURE;
}

static void fail(const char *why)
{
    gstats()->state = SIMVF_GUEST_FAILED;
    puts_console("vfdrv: ");
    puts_console(why);
    puts_console(", running the dirtier only\n");
}

/* Bring simvf up. Returns 1 when it runs with interrupts on, 0 otherwise (stats say why). */
static int vfdrv_init(void)
{
    volatile struct simvf_guest_stats *gs = gstats();
    volatile struct vfdrv_priv *p = priv();
    for (uint32_t i = 0; i < sizeof(struct simvf_guest_stats) / 4; i++)
        ((volatile uint32_t *)gs)[i] = 0;
    for (uint32_t i = 0; i < sizeof(struct vfdrv_priv) / 4; i++)
        ((volatile uint32_t *)p)[i] = 0;
    _Static_assert(VFDRV_PRIV_GPA + sizeof(struct vfdrv_priv) <= VFDRV_IRQ_RET_GPA, "priv overlaps irq.S's word");
    gs->magic = SIMVF_GUEST_MAGIC;
    gs->state = SIMVF_GUEST_PROBING;
    p->magic = VFDRV_PRIV_MAGIC;

    int found = pci_find(SIMVF_VENDOR_ID, SIMVF_DEVICE_ID);
    if (found < 0) {
        gs->state = SIMVF_GUEST_NO_DEVICE;
        puts_console("vfdrv: no simvf on PCI bus 0, running the dirtier only\n");
        return 0;
    }
    uint32_t bdf = (uint32_t)found;
    gs->bdf = bdf;
    puts_console("vfdrv: simvf at 00:");
    put_hex(bdf >> 3, 2);
    puts_console(".0\n");
    if ((uint32_t)boot_params()->wss_gpa < VFDRV_END_GPA) {
        fail("working set overlaps the rings");
        return 0;
    }

    /* BARs: decode off while sizing, then placed in the window in BAR order. */
    uint16_t cmd = pci_read16(bdf, PCI_COMMAND);
    pci_write16(bdf, PCI_COMMAND, cmd & (uint16_t)~(PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER));
    uint32_t bars[6] = {0}, next = VFMIG_PCI_MMIO_BASE;
    for (uint32_t b = 0; b < 6; b++) {
        uint32_t raw = pci_read32(bdf, PCI_BAR0 + b * 4);
        bars[b] = pci_assign_bar(bdf, b, &next, VFMIG_PCI_MMIO_BASE + VFMIG_PCI_MMIO_SIZE);
        if (!(raw & PCI_BAR_IO) && (raw & PCI_BAR_TYPE_MASK) == PCI_BAR_TYPE_64)
            b++; /* its upper half */
    }
    p->bar0 = bars[SIMVF_BAR_REGS];
    if (!p->bar0) {
        fail("BAR0 missing or does not fit");
        return 0;
    }
    pci_write16(bdf, PCI_COMMAND, (uint16_t)(cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_OFF));

    /* MSI-X: function masked while the table is written. */
    uint32_t msix = pci_find_cap(bdf, PCI_CAP_ID_MSIX, 0);
    if (!msix) {
        fail("no MSI-X capability");
        return 0;
    }
    uint16_t mctrl = pci_read16(bdf, msix + PCI_MSIX_CTRL);
    uint32_t nvec = (mctrl & 0x7FFu) + 1, tbl = pci_read32(bdf, msix + PCI_MSIX_TABLE);
    p->msix_vectors = nvec;
    p->msix_table = bars[tbl & 7] ? bars[tbl & 7] + (tbl & ~7u) : 0;
    if (!p->msix_table) {
        fail("MSI-X table BAR missing");
        return 0;
    }
    idt_init();
    lapic_init();
    uint32_t apic_id = mmio_read32(LAPIC_BASE + LAPIC_ID) >> 24;
    pci_write16(bdf, msix + PCI_MSIX_CTRL, (uint16_t)(PCI_MSIX_ENABLE | PCI_MSIX_MASKALL));
    for (uint32_t i = 0; i < nvec && i < SIMVF_NUM_VECTORS; i++) {
        uint32_t e = p->msix_table + i * 16;
        mmio_write32(e + 0, LAPIC_BASE | apic_id << 12);
        mmio_write32(e + 4, 0);
        mmio_write32(e + 8, VFDRV_VEC_BASE + i);
        mmio_write32(e + 12, 0); /* unmasked */
    }
    pci_write16(bdf, msix + PCI_MSIX_CTRL, PCI_MSIX_ENABLE);

    /* The migration capability: take part, with our migration vector. */
    p->migcap = pci_find_cap(bdf, VFMIG_PCI_CAP_ID_VNDR, migcap_match);
    const volatile struct vfmig_boot_params *bp = boot_params();
    p->ack_mode = bp->guest_ack <= VFMIG_ACK_SLOW ? bp->guest_ack : VFMIG_ACK_NORMAL;
    p->ack_delay_ns = p->ack_mode == VFMIG_ACK_LATE   ? VFDRV_LATE_ACK_NS
                      : p->ack_mode == VFMIG_ACK_SLOW ? (uint64_t)bp->ack_delay_us * 1000u
                                                      : 0;
    if (p->migcap) {
        pci_write8(bdf, p->migcap + VFMIG_MIGCAP_CTRL, VFMIG_MIGCAP_ENABLE);
        pci_write8(bdf, p->migcap + VFMIG_MIGCAP_IRQ, SIMVF_VEC_MIGRATION);
        puts_console("vfdrv: migration capability at 0x");
        put_hex(p->migcap, 2);
        puts_console("\n");
    }

    /* Rings: every RX buffer posted; TX empty. */
    uint32_t r = p->bar0;
    mmio_write32(r + SIMVF_REG_CTRL, SIMVF_CTRL_RESET); /* whatever a previous boot left */
    rings_init();
    gs->state = SIMVF_GUEST_RUNNING;
    __asm__ volatile("sti" ::: "memory");
    mmio_write32(r + SIMVF_REG_CTRL, SIMVF_CTRL_ENABLE);
    doorbell(SIMVF_REG_RX_DOORBELL);
    puts_console((mmio_read32(r + SIMVF_REG_STATUS) & SIMVF_STATUS_LINK_UP) ? "vfdrv: running, link up\n"
                                                                             : "vfdrv: running, link down\n");
    return 1;
}

void guest_main(uint32_t id)
{
    int up = id == 0 && vfdrv_init();
    workload_run(id, up ? vfdrv_poll : 0);
}
