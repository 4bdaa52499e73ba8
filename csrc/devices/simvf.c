/* simvf: an emulated NIC VF. PCI function (pci.c) + registers + the wire (RX DMA at a fixed
 * rate) + TX + an internal flow table, migrating through the generic VFIO-v2 state machine
 * (migstate.c) with the section stream of simvf_state.c. Guest contract: simvf_abi.h. */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "vfmig/devices.h"
#include "vfmig/dma_log.h"
#include "vfmig/migstate.h"
#include "vfmig/pci.h"
#include "vfmig/simvf_state.h"
#include "vfmig/vm.h"

#define TABLE_ENTRY 64u
#define TABLE_UPDATES_PER_S 200u   /* "slowly": precopy can keep up, stop-copy stays small */
#define WIRE_TICK_MS 1
#define TX_BATCH 64u               /* TX descriptors per tick at most */
#define CATCHUP_MAX_S 10ull        /* packets missed while stopped, counted as drops, at most this long */
#define OUT_CAP (sizeof(struct simvf_sec_hdr) + SIMVF_PCI_MAX + SIMVF_TABLE_SECTION)

enum gen_phase { GEN_IDENT, GEN_INITIAL, GEN_DIRTY, GEN_PCI, GEN_REGS, GEN_END, GEN_DONE };

/* Where a stream being written has got to. full: the canonical whole state (no dirty sections,
 * leaves the dirty bits alone); otherwise a migration: sent ranges are clean, and PRE_COPY stops
 * at GEN_DIRTY until stop is set by the move to STOP_COPY. */
struct gen {
    enum gen_phase phase;
    uint64_t initial_off;
    int full, stop;
};

struct simvf {
    struct vfmig_pci_func pci;     /* first: the device is reached as a PCI function */
    struct vfmig_migration mig;
    struct vfmig_dma_log log;
    struct vfmig_simvf_config cfg;
    struct simvf_ident ident;
    char name[32];

    pthread_mutex_t lock;          /* regs, table, dirty bits, wire timing: the wire thread holds it per tick */
    struct simvf_regs regs;
    uint8_t *table;
    uint64_t table_bytes, nchunks;
    uint64_t *dirty;               /* one bit per SIMVF_CHUNK of the table */
    int active;                    /* RUNNING or PRE_COPY: the wire and TX run */
    uint32_t rate;
    uint64_t wire_t0, wire_n0;     /* monotonic ns, sent count at t0 */
    uint64_t table_t0, table_n0;

    /* Migration stream (migration thread, under mig.lock). */
    struct gen gen;
    uint8_t *out;
    size_t out_pos, out_len;
    struct simvf_loader loader;
    int loading;
    int keep_stop;
    uint8_t *stop_state;
    long stop_state_len;
    int just_loaded;               /* RESUMING -> STOP applied a state; the guest is told when it starts */

    int tx_db, rx_db, wake;        /* eventfds: doorbells (ioeventfd), thread wake-up */
    int pci_live, log_live, mig_live; /* what to undo on destroy */
    pthread_t thread;
    int thread_live;
    _Atomic int quit;
    _Atomic uint64_t irq_count;
};

static void simvf_destroy(struct vfmig_device *d);

static struct simvf *as_simvf(struct vfmig_device *d)
{
    return d && d->destroy == simvf_destroy ? d->opaque : NULL;
}

static uint32_t xorshift(uint32_t *s)
{
    uint32_t x = *s ? *s : 0x2545F491u;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

static uint64_t realtime_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static uint64_t due(uint64_t n0, uint64_t t0, uint64_t now, uint32_t rate)
{
    return n0 + (uint64_t)((__uint128_t)(now - t0) * rate / 1000000000ull);
}

/* The power-on table: a recognisable pattern, not zeros, so a lost chunk shows. */
static void table_fill(struct simvf *s)
{
    uint32_t *w = (uint32_t *)s->table;
    for (uint64_t i = 0; i < s->table_bytes / 4; i++)
        w[i] = (uint32_t)(i * 0x9E3779B1u) ^ 0x5A5A5A5Au;
}

/* ---- the wire, TX and the table: the device thread, s->lock held ---------------------- */

static volatile struct simvf_desc *desc_at(struct simvf *s, uint64_t ring, uint32_t i)
{
    return (volatile struct simvf_desc *)vfmig_vm_host(s->pci.vm, ring + (uint64_t)i * sizeof(struct simvf_desc),
                                                       sizeof(struct simvf_desc));
}

static uint32_t pkt_len(uint64_t seq) { return SIMVF_PKT_MIN + (uint32_t)(seq * 7 % 49) * 4; }

/* One packet into the next RX buffer. 1 if delivered, 0 if no usable buffer is posted. */
static int rx_deliver(struct simvf *s)
{
    struct simvf_regs *r = &s->regs;
    if (!r->rx_size)
        return 0;
    volatile struct simvf_desc *d = desc_at(s, r->rx_ring, r->rx_head);
    if (!d || !(__atomic_load_n(&d->flags, __ATOMIC_ACQUIRE) & SIMVF_DESC_AVAIL))
        return 0;
    uint64_t seq = r->sent, addr = d->addr; /* read once: the guest may rewrite it meanwhile */
    uint32_t len = pkt_len(seq), room = d->len;
    uint8_t *buf = room >= len ? vfmig_vm_host(s->pci.vm, addr, len) : NULL;
    if (!buf)
        return 0; /* a buffer outside RAM or too small: the driver's bug; the ring stalls there */
    struct simvf_pkt h = {.magic = SIMVF_PKT_MAGIC, .len = len, .seq = seq, .drops = r->dropped};
    uint32_t *payload = (uint32_t *)(buf + sizeof(h));
    uint32_t nwords = (len - (uint32_t)sizeof(h)) / 4;
    for (uint32_t i = 0; i < nwords; i++)
        payload[i] = (uint32_t)(seq * 0x9E3779B1u) ^ (i * 0x85EBCA6Bu);
    h.csum = simvf_csum(payload, nwords, seq);
    memcpy(buf, &h, sizeof(h));
    vfmig_dma_log_mark(&s->log, addr, len);
    d->len = len;
    __atomic_store_n(&d->flags, SIMVF_DESC_DONE, __ATOMIC_RELEASE);
    vfmig_dma_log_mark(&s->log, r->rx_ring + (uint64_t)r->rx_head * sizeof(struct simvf_desc),
                       sizeof(struct simvf_desc));
    r->rx_head = (r->rx_head + 1) & (r->rx_size - 1);
    r->sent++;
    r->delivered++;
    return 1;
}

/* Offers every packet due by now. Returns how many were delivered. */
static uint32_t rx_wire(struct simvf *s, uint64_t now)
{
    uint64_t target = due(s->wire_n0, s->wire_t0, now, s->rate);
    uint32_t delivered = 0;
    while (s->regs.sent < target) {
        if (!rx_deliver(s)) {
            /* No buffer: the rest of this tick's packets are lost, and counted, as on a real NIC. */
            s->regs.dropped += target - s->regs.sent;
            s->regs.sent = target;
            break;
        }
        delivered++;
    }
    return delivered;
}

static int tx_packet_ok(const uint8_t *p, uint32_t len)
{
    struct simvf_pkt h;
    if (len < SIMVF_PKT_MIN || len > SIMVF_BUF_MAX || len % 4)
        return 0;
    memcpy(&h, p, sizeof(h));
    if (h.magic != SIMVF_PKT_MAGIC || h.len != len)
        return 0;
    uint32_t nwords = (len - (uint32_t)sizeof(h)) / 4;
    return simvf_csum((const uint32_t *)(p + sizeof(h)), nwords, h.seq) == h.csum;
}

static uint32_t tx_process(struct simvf *s)
{
    struct simvf_regs *r = &s->regs;
    uint32_t done = 0;
    /* A bounded batch per tick: the guest decides how many it posts, and vCPUs and the stop
     * wait for s->lock. The rest waits for the next tick. */
    while (r->tx_size && done < TX_BATCH) {
        volatile struct simvf_desc *d = desc_at(s, r->tx_ring, r->tx_head);
        if (!d || !(__atomic_load_n(&d->flags, __ATOMIC_ACQUIRE) & SIMVF_DESC_AVAIL))
            break;
        uint32_t len = d->len;
        uint64_t addr = d->addr;
        const uint8_t *p = len <= SIMVF_BUF_MAX ? vfmig_vm_host(s->pci.vm, addr, len) : NULL;
        int ok = p && tx_packet_ok(p, len);
        ok ? r->tx_ok++ : r->tx_bad++;
        __atomic_store_n(&d->flags, SIMVF_DESC_DONE | (ok ? 0 : SIMVF_DESC_ERROR), __ATOMIC_RELEASE);
        vfmig_dma_log_mark(&s->log, r->tx_ring + (uint64_t)r->tx_head * sizeof(struct simvf_desc),
                           sizeof(struct simvf_desc));
        r->tx_head = (r->tx_head + 1) & (r->tx_size - 1);
        done++;
    }
    return done;
}

static void table_update(struct simvf *s, uint64_t now)
{
    uint64_t entries = s->table_bytes / TABLE_ENTRY;
    uint64_t target = due(s->table_n0, s->table_t0, now, TABLE_UPDATES_PER_S);
    while (entries && s->regs.table_updates < target) {
        uint64_t i = xorshift(&s->regs.rng) % entries;
        uint32_t *e = (uint32_t *)(s->table + i * TABLE_ENTRY);
        e[0] = s->regs.rng;            /* key */
        e[1] += 1;                     /* hits */
        e[2] = (uint32_t)s->regs.sent; /* last packet */
        s->dirty[i * TABLE_ENTRY / SIMVF_CHUNK / 64] |= 1ull << (i * TABLE_ENTRY / SIMVF_CHUNK % 64);
        s->regs.table_updates++;
    }
    if (!entries)
        s->regs.table_updates = target;
}

static void *wire_thread(void *arg)
{
    struct simvf *s = arg;
    pthread_setname_np(pthread_self(), "simvf-wire"); /* for perf and the BPF probes' thread filters */
    struct pollfd fds[3] = {{.fd = s->tx_db, .events = POLLIN}, {.fd = s->rx_db, .events = POLLIN},
                            {.fd = s->wake, .events = POLLIN}};
    while (!atomic_load(&s->quit)) {
        poll(fds, 3, WIRE_TICK_MS);
        uint64_t v;
        for (int i = 0; i < 3; i++)
            if (fds[i].revents & POLLIN && read(fds[i].fd, &v, sizeof(v)) < 0)
                continue;
        pthread_mutex_lock(&s->lock);
        if (s->active && (s->regs.ctrl & SIMVF_CTRL_ENABLE) && vfmig_pci_bus_master(&s->pci)) {
            uint64_t now = vfmig_now_ns();
            uint32_t rx = rx_wire(s, now), tx = tx_process(s);
            table_update(s, now);
            s->regs.interrupts += (rx > 0) + (tx > 0);
            /* Still under s->lock (MSI-X takes its own, inside it), so once a stop has taken the
             * lock no interrupt of this tick can land: not in the guest after its vCPU state was
             * saved, not in the PBA after the config was. One per tick and queue (moderation). */
            if (rx)
                vfmig_pci_msix_notify(&s->pci, SIMVF_VEC_RX);
            if (tx)
                vfmig_pci_msix_notify(&s->pci, SIMVF_VEC_TX);
        }
        pthread_mutex_unlock(&s->lock);
    }
    return NULL;
}

/* The wire and the table updater count from now. s->lock held. */
static void rebase(struct simvf *s)
{
    s->wire_t0 = s->table_t0 = vfmig_now_ns();
    s->wire_n0 = s->regs.sent;
    s->table_n0 = s->regs.table_updates;
}

/* Start or stop the wire, TX and table. Migration thread; waits at most one tick for the device
 * thread (it holds s->lock per tick). After a stop no DMA lands and no interrupt is raised. */
static void set_active(struct simvf *s, int on)
{
    pthread_mutex_lock(&s->lock);
    if (on && !s->active) {
        uint64_t rt = realtime_ns();
        struct simvf_regs *r = &s->regs;
        if ((r->ctrl & SIMVF_CTRL_ENABLE) && r->stopped_at_ns && rt > r->stopped_at_ns) {
            /* Packets that reached the NIC while it was stopped (or migrating) were lost. */
            uint64_t away = rt - r->stopped_at_ns, cap = CATCHUP_MAX_S * 1000000000ull;
            uint64_t missed = due(0, 0, away < cap ? away : cap, s->rate);
            r->sent += missed;
            r->dropped += missed;
        }
        r->stopped_at_ns = 0;
        rebase(s);
    } else if (!on && s->active) {
        s->regs.stopped_at_ns = realtime_ns();
    }
    s->active = on;
    pthread_mutex_unlock(&s->lock);
}

/* ---- registers: vCPU threads ----------------------------------------------------------- */

static int ring_size_ok(uint32_t v) { return v == 0 || (v >= 8 && v <= SIMVF_RING_MAX && !(v & (v - 1))); }

static uint32_t reg_read(struct simvf *s, uint64_t off)
{
    const struct simvf_regs *r = &s->regs;
    switch (off) {
    case SIMVF_REG_CTRL: return r->ctrl;
    case SIMVF_REG_STATUS: return SIMVF_STATUS_LINK_UP;
    case SIMVF_REG_RX_RING_LO: return (uint32_t)r->rx_ring;
    case SIMVF_REG_RX_RING_HI: return (uint32_t)(r->rx_ring >> 32);
    case SIMVF_REG_RX_RING_SIZE: return r->rx_size;
    case SIMVF_REG_TX_RING_LO: return (uint32_t)r->tx_ring;
    case SIMVF_REG_TX_RING_HI: return (uint32_t)(r->tx_ring >> 32);
    case SIMVF_REG_TX_RING_SIZE: return r->tx_size;
    case SIMVF_REG_SENT_LO: return (uint32_t)r->sent;
    case SIMVF_REG_SENT_HI: return (uint32_t)(r->sent >> 32);
    case SIMVF_REG_DELIVERED_LO: return (uint32_t)r->delivered;
    case SIMVF_REG_DELIVERED_HI: return (uint32_t)(r->delivered >> 32);
    case SIMVF_REG_DROPPED_LO: return (uint32_t)r->dropped;
    case SIMVF_REG_DROPPED_HI: return (uint32_t)(r->dropped >> 32);
    case SIMVF_REG_TX_OK: return (uint32_t)r->tx_ok;
    case SIMVF_REG_TX_BAD: return (uint32_t)r->tx_bad;
    }
    return 0;
}

static void reg_write(struct simvf *s, uint64_t off, uint32_t v)
{
    struct simvf_regs *r = &s->regs;
    switch (off) {
    case SIMVF_REG_CTRL:
        if (v & SIMVF_CTRL_RESET)
            r->rx_head = r->tx_head = 0;
        if ((v & SIMVF_CTRL_ENABLE) && !(r->ctrl & SIMVF_CTRL_ENABLE))
            rebase(s); /* the link comes up now: nothing was offered before */
        r->ctrl = v & SIMVF_CTRL_ENABLE;
        break;
    /* Ring addresses are 16-byte aligned; a size that is not a valid ring is ignored. Changing a
     * ring restarts it at entry 0. */
    case SIMVF_REG_RX_RING_LO: r->rx_ring = (r->rx_ring & ~0xFFFFFFFFull) | (v & ~0xFu); r->rx_head = 0; break;
    case SIMVF_REG_RX_RING_HI: r->rx_ring = (r->rx_ring & 0xFFFFFFFFull) | (uint64_t)v << 32; r->rx_head = 0; break;
    case SIMVF_REG_RX_RING_SIZE: if (ring_size_ok(v)) { r->rx_size = v; r->rx_head = 0; } break;
    case SIMVF_REG_TX_RING_LO: r->tx_ring = (r->tx_ring & ~0xFFFFFFFFull) | (v & ~0xFu); r->tx_head = 0; break;
    case SIMVF_REG_TX_RING_HI: r->tx_ring = (r->tx_ring & 0xFFFFFFFFull) | (uint64_t)v << 32; r->tx_head = 0; break;
    case SIMVF_REG_TX_RING_SIZE: if (ring_size_ok(v)) { r->tx_size = v; r->tx_head = 0; } break;
    case SIMVF_REG_TX_DOORBELL: /* only reached when the ioeventfd is not registered */
    case SIMVF_REG_RX_DOORBELL: {
        uint64_t one = 1;
        if (write(off == SIMVF_REG_TX_DOORBELL ? s->tx_db : s->rx_db, &one, sizeof(one)) < 0)
            break;
        break;
    }
    }
}

/* BAR0: a vCPU thread; takes s->lock briefly (the wire holds it for one tick's packets at most). */
static int regs_access(struct vfmig_pci_func *f, struct vfmig_vcpu *cpu, uint64_t off, uint8_t *data, uint32_t len,
                       int is_write)
{
    (void)cpu;
    struct simvf *s = (struct simvf *)f;
    if (len != 4 || off % 4) { /* registers are 32-bit */
        if (!is_write)
            memset(data, 0xff, len);
        return 0;
    }
    uint32_t v;
    pthread_mutex_lock(&s->lock);
    if (is_write) {
        memcpy(&v, data, 4);
        reg_write(s, off, v);
    } else {
        v = reg_read(s, off);
        memcpy(data, &v, 4);
    }
    pthread_mutex_unlock(&s->lock);
    return 0;
}

/* ---- the migration stream ------------------------------------------------------------- */

static void mark_clean(struct simvf *s, uint64_t off, uint64_t len)
{
    for (uint64_t c = off / SIMVF_CHUNK; c < (off + len + SIMVF_CHUNK - 1) / SIMVF_CHUNK; c++)
        s->dirty[c / 64] &= ~(1ull << (c % 64));
}

/* The next run of dirty chunks (up to one TABLE section), or 0. s->lock held. */
static uint64_t next_dirty(struct simvf *s, uint64_t *off)
{
    for (uint64_t w = 0; w < (s->nchunks + 63) / 64; w++) {
        if (!s->dirty[w])
            continue;
        uint64_t c = w * 64 + (uint64_t)__builtin_ctzll(s->dirty[w]), n = 0;
        while (c + n < s->nchunks && n < SIMVF_TABLE_SECTION / SIMVF_CHUNK &&
               (s->dirty[(c + n) / 64] >> ((c + n) % 64) & 1))
            n++;
        *off = c * SIMVF_CHUNK;
        uint64_t len = n * SIMVF_CHUNK;
        return *off + len > s->table_bytes ? s->table_bytes - *off : len;
    }
    return 0;
}

/* Writes the next section of g's stream into out (OUT_CAP bytes). Returns its size, or 0 when
 * there is nothing more: for now (PRE_COPY, g->phase stays GEN_DIRTY) or at all (GEN_DONE).
 * Migration thread; takes s->lock to copy device state the wire may be changing. */
static size_t gen_next(struct simvf *s, struct gen *g, uint8_t *out)
{
    size_t n = 0;
    pthread_mutex_lock(&s->lock);
    while (!n && g->phase != GEN_DONE) {
        switch (g->phase) {
        case GEN_IDENT:
            n = simvf_sec_put(out, SIMVF_SEC_IDENT, 0, &s->ident, sizeof(s->ident));
            g->phase = GEN_INITIAL;
            break;
        case GEN_INITIAL: {
            uint64_t rest = s->table_bytes - g->initial_off;
            if (!rest) {
                g->phase = g->full ? GEN_PCI : GEN_DIRTY;
                break;
            }
            uint32_t len = rest < SIMVF_TABLE_SECTION ? (uint32_t)rest : SIMVF_TABLE_SECTION;
            n = simvf_sec_put(out, SIMVF_SEC_TABLE, g->initial_off, s->table + g->initial_off, len);
            if (!g->full)
                mark_clean(s, g->initial_off, len);
            g->initial_off += len;
            break;
        }
        case GEN_DIRTY: {
            uint64_t off, len = next_dirty(s, &off);
            if (len) {
                n = simvf_sec_put(out, SIMVF_SEC_TABLE, off, s->table + off, (uint32_t)len);
                mark_clean(s, off, len);
            } else if (g->stop) {
                g->phase = GEN_PCI;
            } else {
                pthread_mutex_unlock(&s->lock);
                return 0; /* PRE_COPY: clean for now */
            }
            break;
        }
        case GEN_PCI: {
            /* Saved in place after the header; simvf_sec_put then only seals it. */
            uint8_t *payload = out + sizeof(struct simvf_sec_hdr);
            long len = vfmig_pci_save(&s->pci, payload, SIMVF_PCI_MAX);
            if (len < 0) { /* cannot happen: SIMVF_PCI_MAX is far above a function's state */
                g->phase = GEN_DONE;
                break;
            }
            n = simvf_sec_put(out, SIMVF_SEC_PCI, 0, payload, (uint32_t)len);
            g->phase = GEN_REGS;
            break;
        }
        case GEN_REGS:
            n = simvf_sec_put(out, SIMVF_SEC_REGS, 0, &s->regs, sizeof(s->regs));
            g->phase = GEN_END;
            break;
        case GEN_END:
            n = simvf_sec_put(out, SIMVF_SEC_END, 0, NULL, 0);
            g->phase = GEN_DONE;
            break;
        case GEN_DONE:
            break;
        }
    }
    pthread_mutex_unlock(&s->lock);
    return n;
}

/* The canonical whole state, with its own scratch: a migration stream may be half-read. */
static long full_state(struct simvf *s, uint8_t *buf, size_t cap)
{
    struct gen g = {.phase = GEN_IDENT, .full = 1, .stop = 1};
    uint8_t *scratch = malloc(OUT_CAP);
    if (!scratch)
        return -ENOMEM;
    size_t total = 0, n;
    while ((n = gen_next(s, &g, scratch)) > 0) {
        if (total + n > cap) {
            free(scratch);
            return -ENOSPC;
        }
        memcpy(buf + total, scratch, n);
        total += n;
    }
    free(scratch);
    return (long)total;
}

static size_t full_state_size(struct simvf *s)
{
    const size_t h = sizeof(struct simvf_sec_hdr);
    uint64_t sections = (s->table_bytes + SIMVF_TABLE_SECTION - 1) / SIMVF_TABLE_SECTION;
    return h + sizeof(struct simvf_ident) + sections * h + s->table_bytes + h + vfmig_pci_state_size(&s->pci) + h +
           sizeof(struct simvf_regs) + h;
}

static void start_stream(struct simvf *s, int stop)
{
    s->gen = (struct gen){.phase = GEN_IDENT, .stop = stop};
    s->out_pos = s->out_len = 0;
    pthread_mutex_lock(&s->lock);
    memset(s->dirty, 0, (s->nchunks + 63) / 64 * 8);
    pthread_mutex_unlock(&s->lock);
}

static void keep_stop_state(struct simvf *s)
{
    if (!s->keep_stop)
        return;
    free(s->stop_state);
    size_t cap = full_state_size(s);
    s->stop_state = malloc(cap);
    s->stop_state_len = s->stop_state ? full_state(s, s->stop_state, cap) : -ENOMEM;
}

/* ---- the migstate hooks: migration thread, s->mig.lock held ----------------------------- */

static int load_apply(struct simvf *s, struct vfmig_err *err)
{
    int r = simvf_loader_finish(&s->loader, err);
    if (r == 0)
        r = vfmig_pci_check(&s->pci, s->loader.pci, s->loader.pci_len, err);
    if (r == 0)
        r = vfmig_pci_apply(&s->pci, s->loader.pci, s->loader.pci_len, err);
    if (r == 0) {
        pthread_mutex_lock(&s->lock);
        s->regs = s->loader.regs;
        pthread_mutex_unlock(&s->lock);
        s->just_loaded = 1;
    }
    simvf_loader_free(&s->loader);
    s->loading = 0;
    return r;
}

/* The handshake's calls into pci.c take config_lock and msix_lock, never with s->lock held
 * (the order here is mig.lock -> s->lock -> config_lock -> msix_lock, and the wire's s->lock ->
 * msix_lock). */
static int simvf_arc(void *dev, enum vfmig_mig_state from, enum vfmig_mig_state to, struct vfmig_err *err)
{
    struct simvf *s = dev;
    switch (from * 16 + to) {
    case VFMIG_MIG_RUNNING * 16 + VFMIG_MIG_STOP:
        set_active(s, 0);
        vfmig_pci_handshake_stopped(&s->pci); /* the vCPUs are stopped: the outcome is final */
        return 0;
    case VFMIG_MIG_STOP * 16 + VFMIG_MIG_RUNNING:
        if (s->just_loaded) {
            /* Destination. Told only now, not at RESUMING -> STOP, so the state at STOP is the
             * source's at stop byte for byte; the vCPUs start right after this, their state
             * already loaded, so the post-load interrupt lands in the loaded LAPIC. */
            vfmig_pci_handshake_loaded(&s->pci);
            set_active(s, 1);
            vfmig_pci_handshake_started(&s->pci);
            s->just_loaded = 0;
        } else {
            set_active(s, 1);
            /* Source: running again with a notice out means the migration failed; the engine
             * calls prestop_abort too, and only the first raises the cancel. */
            vfmig_pci_handshake_abort(&s->pci);
        }
        return 0;
    case VFMIG_MIG_RUNNING * 16 + VFMIG_MIG_PRE_COPY:
        start_stream(s, 0);
        return 0;
    case VFMIG_MIG_PRE_COPY * 16 + VFMIG_MIG_RUNNING:
        vfmig_pci_handshake_abort(&s->pci); /* cancelled after the notice, before the stop */
        /* fall through */
    case VFMIG_MIG_STOP_COPY * 16 + VFMIG_MIG_STOP:
        s->out_pos = s->out_len = 0; /* the stream is abandoned or finished */
        s->gen.phase = GEN_DONE;
        return 0;
    case VFMIG_MIG_PRE_COPY * 16 + VFMIG_MIG_STOP_COPY:
        set_active(s, 0);
        vfmig_pci_handshake_stopped(&s->pci); /* before the state (and the outcome in it) is saved */
        s->gen.stop = 1; /* the precopy stream goes on: what is dirty, then the rest */
        keep_stop_state(s);
        return 0;
    case VFMIG_MIG_STOP * 16 + VFMIG_MIG_STOP_COPY:
        start_stream(s, 1);
        keep_stop_state(s);
        return 0;
    case VFMIG_MIG_STOP * 16 + VFMIG_MIG_RESUMING:
        if (simvf_loader_init(&s->loader, &s->ident, s->table, s->table_bytes) < 0)
            return vfmig_fail(err, ENOMEM, "out of memory for the state loader");
        s->loading = 1;
        s->just_loaded = 0;
        return 0;
    case VFMIG_MIG_RESUMING * 16 + VFMIG_MIG_STOP:
        return load_apply(s, err);
    }
    return vfmig_fail(err, EINVAL, "simvf has no %s -> %s arc", vfmig_mig_state_name(from), vfmig_mig_state_name(to));
}

static long simvf_read(void *dev, uint8_t *buf, size_t cap, struct vfmig_err *err)
{
    (void)err;
    struct simvf *s = dev;
    size_t done = 0;
    while (done < cap) {
        if (s->out_pos == s->out_len) {
            s->out_pos = 0;
            s->out_len = gen_next(s, &s->gen, s->out);
            if (!s->out_len)
                break;
        }
        size_t n = s->out_len - s->out_pos < cap - done ? s->out_len - s->out_pos : cap - done;
        memcpy(buf + done, s->out + s->out_pos, n);
        s->out_pos += n;
        done += n;
    }
    if (done)
        return (long)done;
    return s->gen.phase == GEN_DONE ? 0 : -ENOMSG;
}

static long simvf_write(void *dev, const uint8_t *buf, size_t len, struct vfmig_err *err)
{
    struct simvf *s = dev;
    int r = simvf_loader_feed(&s->loader, buf, len, err);
    return r < 0 ? r : (long)len;
}

static int simvf_precopy_info(void *dev, uint64_t *initial, uint64_t *dirty, struct vfmig_err *err)
{
    (void)err;
    struct simvf *s = dev;
    pthread_mutex_lock(&s->lock);
    /* As VFIO means them: initial counts down to 0 once (the bytes of the first image not yet
     * read); dirty is what changed in parts already sent (a chunk past initial_off goes with the
     * initial image anyway). A half-read section counts where it came from. */
    int in_initial = s->gen.phase <= GEN_INITIAL;
    uint64_t pending = s->out_len - s->out_pos, chunks = 0;
    uint64_t sent_chunks = in_initial ? s->gen.initial_off / SIMVF_CHUNK : s->nchunks;
    for (uint64_t c = 0; c < sent_chunks; c++)
        chunks += s->dirty[c / 64] >> (c % 64) & 1;
    uint64_t ident = s->gen.phase == GEN_IDENT ? sizeof(struct simvf_sec_hdr) + sizeof(struct simvf_ident) : 0;
    *initial = in_initial ? pending + ident + s->table_bytes - s->gen.initial_off : 0;
    *dirty = chunks * SIMVF_CHUNK + (in_initial ? 0 : pending);
    pthread_mutex_unlock(&s->lock);
    return 0;
}

/* As a function-level reset of the NIC: stopped, rings and counters cleared, table back to its
 * power-on pattern; config space and MSI-X are left as they are. */
static int simvf_reset(void *dev, struct vfmig_err *err)
{
    (void)err;
    struct simvf *s = dev;
    set_active(s, 0);
    if (s->loading)
        simvf_loader_free(&s->loader);
    s->loading = 0;
    s->just_loaded = 0; /* a reset device owes the guest no post-load notice */
    s->gen.phase = GEN_DONE;
    s->out_pos = s->out_len = 0;
    table_fill(s); /* stopped: nothing else touches the table, so vCPUs need not wait for this */
    pthread_mutex_lock(&s->lock);
    memset(&s->regs, 0, sizeof(s->regs));
    memset(s->dirty, 0, (s->nchunks + 63) / 64 * 8);
    pthread_mutex_unlock(&s->lock);
    set_active(s, 1);
    vfmig_pci_handshake_abort(&s->pci); /* running again: a notice still out is withdrawn */
    return 0;
}

/* The guest handshake (pci.c does it for any function with the migration capability).
 * Migration thread, mig.lock held (no vCPU, device or interrupt path takes it); takes
 * config_lock and msix_lock briefly, waits with neither held; returns by deadline_ns. A device
 * not running (the VM paused) has no guest to answer: no notice, DISABLED at once. */
static int simvf_prestop(void *dev, uint64_t deadline_ns, struct vfmig_prestop_result *out, struct vfmig_err *err)
{
    (void)err;
    struct simvf *s = dev;
    enum vfmig_mig_state st = vfmig_mig_get_state(&s->mig);
    if (st != VFMIG_MIG_RUNNING && st != VFMIG_MIG_PRE_COPY) {
        uint64_t t = vfmig_now_ns();
        *out = (struct vfmig_prestop_result){.outcome = VFMIG_HS_DISABLED, .start_ns = t, .end_ns = t};
        /* Nobody runs to answer. What the state carries must not claim more than is true: an
         * ack of this VM's own standing notice still holds (the driver stays quiesced), but an
         * outcome loaded with the state, or from a notice since withdrawn, would tell the
         * destination that a driver quiesced which was never asked. */
        if (!(s->pci.hs.notified && atomic_load(&s->pci.hs.outcome) == VFMIG_HS_ACKED)) {
            atomic_store(&s->pci.hs.outcome, VFMIG_HS_DISABLED);
            atomic_store(&s->pci.hs.latency_us, 0);
        }
        return 0;
    }
    return vfmig_pci_handshake(&s->pci, deadline_ns, out);
}

/* The migration failed after prestop: tell the guest it runs on here. Migration thread,
 * mig.lock held; config_lock and msix_lock briefly. */
static void simvf_prestop_abort(void *dev)
{
    struct simvf *s = dev;
    vfmig_pci_handshake_abort(&s->pci);
}

static const struct vfmig_mig_ops simvf_ops = {
    .arc = simvf_arc, .read = simvf_read, .write = simvf_write, .precopy_info = simvf_precopy_info,
    .reset = simvf_reset, .prestop = simvf_prestop, .prestop_abort = simvf_prestop_abort,
};

/* ---- lifecycle ------------------------------------------------------------------------ */

static void simvf_free(struct simvf *s)
{
    atomic_store(&s->quit, 1);
    if (s->thread_live) {
        uint64_t one = 1;
        if (write(s->wake, &one, sizeof(one)) < 0) { /* the tick ends the poll anyway */ }
        pthread_join(s->thread, NULL);
    }
    if (s->pci_live)
        vfmig_pci_func_release(&s->pci);
    if (s->loading)
        simvf_loader_free(&s->loader);
    int fds[] = {s->tx_db, s->rx_db, s->wake};
    for (int i = 0; i < 3; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    if (s->log_live)
        vfmig_dma_log_free(&s->log);
    if (s->mig_live)
        vfmig_mig_destroy(&s->mig);
    pthread_mutex_destroy(&s->lock);
    free(s->table);
    free(s->dirty);
    free(s->out);
    free(s->stop_state);
    free(s);
}

/* Lifecycle thread (VM teardown): stops the device thread, then frees everything. */
static void simvf_destroy(struct vfmig_device *d) { simvf_free(d->opaque); }

static int check_config(const struct vfmig_simvf_config *c, struct vfmig_err *err)
{
    if (c->state_bytes < VFMIG_SIMVF_STATE_MIN || c->state_bytes > VFMIG_SIMVF_STATE_MAX ||
        c->state_bytes % 4096)
        return vfmig_fail(err, EINVAL, "simvf state must be %llu KiB..%llu MiB in 4 KiB steps, got %llu bytes",
                          VFMIG_SIMVF_STATE_MIN >> 10, VFMIG_SIMVF_STATE_MAX >> 20,
                          (unsigned long long)c->state_bytes);
    if (c->dma_rate > VFMIG_SIMVF_RATE_MAX)
        return vfmig_fail(err, EINVAL, "simvf dma_rate must be 0..%u packets/s, got %u", VFMIG_SIMVF_RATE_MAX,
                          c->dma_rate);
    return 0;
}

static struct simvf_ident make_ident(const struct vfmig_simvf_config *c)
{
    return (struct simvf_ident){.vendor = SIMVF_VENDOR_ID, .device = SIMVF_DEVICE_ID, .revision = SIMVF_REVISION,
                                .migration = c->migration ? 1 : 0, .nvec = SIMVF_NUM_VECTORS,
                                .bar_size = {SIMVF_BAR_REGS_SIZE, SIMVF_BAR_MSIX_SIZE},
                                .state_bytes = c->state_bytes};
}

static int build_function(struct simvf *s, struct vfmig_vm *vm, struct vfmig_err *err)
{
    const struct vfmig_pci_ids ids = {.vendor = SIMVF_VENDOR_ID, .device = SIMVF_DEVICE_ID,
                                      .revision = SIMVF_REVISION, .class_code = SIMVF_CLASS,
                                      .subsys_vendor = SIMVF_SUBSYS_VENDOR_ID, .subsys = SIMVF_SUBSYS_ID};
    int r = vfmig_pci_func_init(&s->pci, vm, s->name, &ids, err);
    if (r < 0)
        return r;
    s->pci_live = 1;
    if ((r = vfmig_pci_add_bar(&s->pci, SIMVF_BAR_REGS, SIMVF_BAR_REGS_SIZE, regs_access, err)) < 0 ||
        (r = vfmig_pci_add_bar(&s->pci, SIMVF_BAR_MSIX, SIMVF_BAR_MSIX_SIZE, NULL, err)) < 0 ||
        (r = vfmig_pci_add_pcie_cap(&s->pci, err)) < 0 ||
        (r = vfmig_pci_add_msix(&s->pci, SIMVF_NUM_VECTORS, SIMVF_BAR_MSIX, SIMVF_MSIX_TABLE_OFF,
                                SIMVF_MSIX_PBA_OFF, err)) < 0)
        return r;
    if (s->cfg.migration && (r = vfmig_pci_add_migcap(&s->pci, err)) < 0)
        return r;
    if ((r = vfmig_pci_add_doorbell(&s->pci, SIMVF_BAR_REGS, SIMVF_REG_TX_DOORBELL, s->tx_db, err)) < 0 ||
        (r = vfmig_pci_add_doorbell(&s->pci, SIMVF_BAR_REGS, SIMVF_REG_RX_DOORBELL, s->rx_db, err)) < 0)
        return r;
    return 0;
}

struct vfmig_device *vfmig_simvf_new(struct vfmig_vm *vm, const char *name, const struct vfmig_simvf_config *cfg,
                                     struct vfmig_err *err)
{
    int rc = check_config(cfg, err);
    if (rc < 0) {
        errno = -rc;
        return NULL;
    }
    struct simvf *s = calloc(1, sizeof(*s));
    if (!s) {
        errno = -vfmig_fail(err, ENOMEM, "out of memory for simvf");
        return NULL;
    }
    s->cfg = *cfg;
    s->rate = cfg->dma_rate;
    s->ident = make_ident(cfg);
    strncpy(s->name, name, sizeof(s->name) - 1);
    pthread_mutex_init(&s->lock, NULL);
    s->tx_db = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    s->rx_db = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    s->wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    s->table_bytes = cfg->state_bytes - SIMVF_REGS_BYTES;
    s->nchunks = (s->table_bytes + SIMVF_CHUNK - 1) / SIMVF_CHUNK;
    s->table = malloc(s->table_bytes ? s->table_bytes : 1);
    s->dirty = calloc((s->nchunks + 63) / 64 + 1, 8);
    s->out = malloc(OUT_CAP);
    uint32_t flags = VFMIG_MIGF_STOP_COPY | (cfg->precopy ? VFMIG_MIGF_PRE_COPY : 0);
    s->mig_live = vfmig_mig_init(&s->mig, &simvf_ops, s, flags) == 0;
    s->log_live = vfmig_dma_log_init(&s->log, vm) == 0;
    if (s->tx_db < 0 || s->rx_db < 0 || s->wake < 0 || !s->table || !s->dirty || !s->out || !s->mig_live ||
        !s->log_live) {
        rc = vfmig_fail(err, ENOMEM, "out of memory or file descriptors for simvf");
        goto fail;
    }
    table_fill(s);
    s->gen.phase = GEN_DONE;
    s->active = 1; /* RUNNING; the wire waits for the driver to enable the device */
    if ((rc = build_function(s, vm, err)) < 0)
        goto fail;
    rebase(s);
    s->pci.dev.opaque = s;
    s->pci.dev.destroy = simvf_destroy;
    s->pci.dev.mig = &s->mig;
    s->pci.dev.dma_log = &s->log;
    if (pthread_create(&s->thread, NULL, wire_thread, s) != 0) {
        rc = vfmig_fail(err, EAGAIN, "cannot start the simvf thread");
        goto fail;
    }
    s->thread_live = 1;
    if ((rc = vfmig_pci_attach(vm, &s->pci, err)) < 0)
        goto fail;
    return &s->pci.dev;
fail:
    simvf_free(s);
    errno = -rc;
    return NULL;
}

int vfmig_simvf_counters(struct vfmig_device *d, struct vfmig_simvf_counters *out)
{
    struct simvf *s = as_simvf(d);
    if (!s)
        return -EINVAL;
    pthread_mutex_lock(&s->lock);
    const struct simvf_regs *r = &s->regs;
    *out = (struct vfmig_simvf_counters){.sent = r->sent, .delivered = r->delivered, .dropped = r->dropped,
                                         .tx_ok = r->tx_ok, .tx_bad = r->tx_bad,
                                         .table_updates = r->table_updates, .interrupts = r->interrupts};
    pthread_mutex_unlock(&s->lock);
    return 0;
}

int vfmig_simvf_set_rate(struct vfmig_device *d, uint32_t pps)
{
    struct simvf *s = as_simvf(d);
    if (!s || pps > VFMIG_SIMVF_RATE_MAX)
        return -EINVAL;
    pthread_mutex_lock(&s->lock);
    s->wire_t0 = vfmig_now_ns();
    s->wire_n0 = s->regs.sent;
    s->rate = pps;
    pthread_mutex_unlock(&s->lock);
    return 0;
}

long vfmig_simvf_state(struct vfmig_device *d, uint8_t *buf, size_t cap)
{
    struct simvf *s = as_simvf(d);
    if (!s)
        return -EINVAL;
    pthread_mutex_lock(&s->lock);
    int active = s->active;
    pthread_mutex_unlock(&s->lock);
    if (active)
        return -EBUSY;
    pthread_mutex_lock(&s->mig.lock);
    long n = full_state(s, buf, cap);
    pthread_mutex_unlock(&s->mig.lock);
    return n;
}

size_t vfmig_simvf_state_size(struct vfmig_device *d)
{
    struct simvf *s = as_simvf(d);
    return s ? full_state_size(s) : 0;
}

int vfmig_simvf_keep_stop_state(struct vfmig_device *d, int on)
{
    struct simvf *s = as_simvf(d);
    if (!s)
        return -EINVAL;
    pthread_mutex_lock(&s->mig.lock);
    s->keep_stop = on;
    pthread_mutex_unlock(&s->mig.lock);
    return 0;
}

long vfmig_simvf_stop_state(struct vfmig_device *d, uint8_t *buf, size_t cap)
{
    struct simvf *s = as_simvf(d);
    if (!s)
        return -EINVAL;
    pthread_mutex_lock(&s->mig.lock);
    long n = s->stop_state ? s->stop_state_len : -ENOENT;
    if (n > 0 && (size_t)n > cap)
        n = -ENOSPC;
    else if (n > 0)
        memcpy(buf, s->stop_state, (size_t)n);
    pthread_mutex_unlock(&s->mig.lock);
    return n;
}

int vfmig_simvf_check_stream(const struct vfmig_simvf_config *cfg, const uint8_t *buf, size_t len, size_t chunk,
                             struct vfmig_err *err)
{
    int r = check_config(cfg, err);
    if (r < 0)
        return r;
    struct simvf_ident want = make_ident(cfg);
    uint64_t table_bytes = cfg->state_bytes - SIMVF_REGS_BYTES;
    uint8_t *table = malloc(table_bytes ? table_bytes : 1);
    struct simvf_loader l;
    if (!table || simvf_loader_init(&l, &want, table, table_bytes) < 0) {
        free(table);
        return vfmig_fail(err, ENOMEM, "out of memory");
    }
    if (!chunk)
        chunk = len ? len : 1;
    for (size_t off = 0; off < len && r == 0; off += chunk)
        r = simvf_loader_feed(&l, buf + off, len - off < chunk ? len - off : chunk, err);
    if (r == 0)
        r = simvf_loader_finish(&l, err);
    simvf_loader_free(&l);
    free(table);
    return r;
}
