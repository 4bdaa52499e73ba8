/* simvf without a guest (runs under ASan/UBSan and TSan): this test plays the driver through the
 * PCI host's config ports and the BAR window, checks every packet the wire writes, the DMA log,
 * the migration state machine (the shared conformance suite), and moves the device's state into a
 * second VM through its data stream, with precopy; corrupt, truncated and foreign streams are
 * refused. argv[1] (optional): vfdrv.bin, booted for a short end-to-end check of the guest driver,
 * and of its side of the migration handshake against the VMM's (pci.c, through simvf's migstate). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "fixture.h"
#include "migstate_conformance.h"
#include "vfmig/devices.h"
#include "vfmig/dma_log.h"
#include "vfmig/migstate.h"
#include "vfmig/pci.h"
#include "vfmig/simvf_abi.h"
#include "vfmig/simvf_state.h"
#include "vfmig/vm.h"

#define STATE (256u << 10)
#define RX_RING 0x200000u
#define RX_BUFS 0x210000u
#define RX_N 64u
#define BAR0 0xE0000000u
#define BAR1 0xE0004000u

static struct vfmig_vm *make_vm(void) { return test_vm(64ull << 20, 1, 0); }

static struct vfmig_device *add_vf(struct vfmig_vm *vm, uint64_t state, uint32_t rate)
{
    struct vfmig_simvf_config c = {.state_bytes = state, .dma_rate = rate, .precopy = 1, .migration = 1};
    struct vfmig_err err = {{0}};
    struct vfmig_device *d = vfmig_simvf_new(vm, "vf0", &c, &err);
    if (!d)
        fprintf(stderr, "simvf: %s\n", err.msg);
    CHECK(d);
    return d;
}

static void bus(struct vfmig_vm *vm, const char *dev, uint64_t addr, uint32_t *v, uint32_t len, int wr)
{
    struct vfmig_device *d = vfmig_vm_find_device(vm, dev);
    CHECK(d && d->access);
    CHECK(d->access(d, NULL, addr, (uint8_t *)v, len, wr) == 0);
}

static uint32_t cfg_rw(struct vfmig_vm *vm, uint32_t devno, uint32_t reg, uint32_t v, int wr)
{
    uint32_t a = 0x80000000u | devno << 11 | (reg & 0xFC);
    bus(vm, "pci-host", VFMIG_PCI_CONFIG_ADDR, &a, 4, 1);
    bus(vm, "pci-host", VFMIG_PCI_CONFIG_DATA, &v, 4, wr);
    return v;
}

static uint32_t reg_rw(struct vfmig_vm *vm, uint32_t off, uint32_t v, int wr)
{
    bus(vm, "pci-mmio", BAR0 + off, &v, 4, wr);
    return v;
}

/* What a driver does: find the VF, place its BARs, enable decode and DMA, post RX buffers. */
static void driver_up(struct vfmig_vm *vm)
{
    uint32_t devno = 0;
    while (devno < 32 && cfg_rw(vm, devno, 0, 0, 0) != (SIMVF_DEVICE_ID << 16 | SIMVF_VENDOR_ID))
        devno++;
    CHECK(devno < 32);
    CHECK(cfg_rw(vm, devno, 0x10, 0xFFFFFFFFu, 1) == 0xFFFFFFFFu); /* the write goes in... */
    CHECK((cfg_rw(vm, devno, 0x10, 0, 0) & ~0xFu) == (uint32_t)~(SIMVF_BAR_REGS_SIZE - 1)); /* ...size reads back */
    cfg_rw(vm, devno, 0x10, BAR0, 1);
    cfg_rw(vm, devno, 0x14, BAR1, 1);
    cfg_rw(vm, devno, 0x04, 0x6, 1); /* memory space, bus master */
    struct simvf_desc *ring = (struct simvf_desc *)vfmig_vm_host(vm, RX_RING, RX_N * sizeof(*ring));
    for (uint32_t i = 0; i < RX_N; i++)
        ring[i] = (struct simvf_desc){.addr = RX_BUFS + i * SIMVF_BUF_MAX, .len = SIMVF_BUF_MAX,
                                      .flags = SIMVF_DESC_AVAIL};
    reg_rw(vm, SIMVF_REG_RX_RING_LO, RX_RING, 1);
    reg_rw(vm, SIMVF_REG_RX_RING_HI, 0, 1);
    reg_rw(vm, SIMVF_REG_RX_RING_SIZE, RX_N, 1);
    reg_rw(vm, SIMVF_REG_RX_RING_SIZE, 12, 1); /* not a power of two: ignored */
    CHECK(reg_rw(vm, SIMVF_REG_RX_RING_SIZE, 0, 0) == RX_N);
    reg_rw(vm, SIMVF_REG_CTRL, SIMVF_CTRL_ENABLE, 1);
}

/* The guest's oracle, in C: every DONE buffer holds the next packet or a gap the drops explain. */
static uint32_t check_packets(struct vfmig_vm *vm)
{
    const struct simvf_desc *ring = (const void *)vfmig_vm_host(vm, RX_RING, RX_N * sizeof(*ring));
    uint64_t next = 0, drops = 0;
    uint32_t n = 0;
    for (; n < RX_N && ring[n].flags == SIMVF_DESC_DONE; n++) {
        const struct simvf_pkt *p = (const void *)vfmig_vm_host(vm, ring[n].addr, ring[n].len);
        CHECK(p && p->magic == SIMVF_PKT_MAGIC && p->len == ring[n].len && p->len >= SIMVF_PKT_MIN);
        CHECK(p->csum == simvf_csum((const uint32_t *)(p + 1), (p->len - sizeof(*p)) / 4, p->seq));
        CHECK(p->seq - next == p->drops - drops);
        next = p->seq + 1, drops = p->drops;
    }
    return n;
}

/* Removes section `index` (0: the first) from a stream; returns the new length. */
static size_t drop_section(uint8_t *s, size_t len, int index)
{
    size_t off = 0;
    for (int i = 0; i < index; i++) {
        struct simvf_sec_hdr h;
        memcpy(&h, s + off, sizeof(h));
        off += sizeof(h) + h.len;
    }
    struct simvf_sec_hdr h;
    memcpy(&h, s + off, sizeof(h));
    size_t n = sizeof(h) + h.len;
    memmove(s + off, s + off + n, len - off - n);
    return len - n;
}

static struct vfmig_simvf_counters counters(struct vfmig_device *d)
{
    struct vfmig_simvf_counters c;
    CHECK(vfmig_simvf_counters(d, &c) == 0);
    return c;
}

static void wait_for(struct vfmig_device *d, uint64_t sent)
{
    for (int i = 0; i < 2000 && counters(d).sent < sent; i++)
        usleep(1000);
    CHECK(counters(d).sent >= sent);
}

/* Moves everything a's device can say into b's device, chunk by chunk, as the engine would. */
static uint64_t pump(struct vfmig_migration *from, struct vfmig_migration *to, size_t chunk)
{
    static uint8_t buf[1 << 20];
    struct vfmig_err err = {{0}};
    uint64_t total = 0;
    long n;
    while ((n = vfmig_mig_read(from, buf, chunk, &err)) > 0) {
        if (vfmig_mig_write(to, buf, (size_t)n, &err) < 0)
            fprintf(stderr, "write: %s\n", err.msg);
        total += (uint64_t)n;
    }
    CHECK(n == 0 || n == -ENOMSG);
    return total;
}

static uint8_t *state_of(struct vfmig_device *d, long *len, int at_stop)
{
    size_t cap = vfmig_simvf_state_size(d);
    uint8_t *b = malloc(cap);
    CHECK(b);
    *len = at_stop ? vfmig_simvf_stop_state(d, b, cap) : vfmig_simvf_state(d, b, cap);
    CHECK(*len > 0 && (size_t)*len == cap);
    return b;
}

static void test_wire_and_dma_log(void)
{
    struct vfmig_vm *vm = make_vm();
    struct vfmig_device *d = add_vf(vm, STATE, 20000);
    struct vfmig_err err = {{0}};
    CHECK(d->dma_log && vfmig_dma_log_start_all(d->dma_log, &err) == 0);
    usleep(20000);
    CHECK(counters(d).sent == 0); /* the wire waits for the driver */
    driver_up(vm);
    wait_for(d, 400);
    struct vfmig_simvf_counters c = counters(d);
    CHECK(c.delivered == RX_N && c.sent == c.delivered + c.dropped && c.dropped > 0);
    CHECK(c.sent < 20000 * 5); /* the wire counts from when the link came up, not from boot */
    CHECK(check_packets(vm) == RX_N);
    uint64_t *bits = calloc(vm->npages / 64 + 1, 8);
    CHECK(vfmig_dma_log_drain_all(d->dma_log, bits, &err) == 0);
    for (uint64_t gpa = RX_RING; gpa < RX_BUFS + RX_N * SIMVF_BUF_MAX; gpa += 4096) {
        uint64_t p = gpa / 4096;
        if (gpa < RX_RING + 4096 || gpa >= RX_BUFS)
            CHECK(bits[p / 64] >> (p % 64) & 1); /* the ring and every buffer page was logged */
    }
    free(bits);
    vfmig_vm_destroy(vm);
}

/* Precopy while the wire runs, then stop-copy, into a second VM; the loaded device equals the
 * source's at stop, byte for byte. */
static void test_move_state(void)
{
    struct vfmig_vm *a = make_vm(), *b = make_vm();
    struct vfmig_device *da = add_vf(a, STATE, 20000), *db = add_vf(b, STATE, 20000);
    struct vfmig_err err = {{0}};
    driver_up(a);
    wait_for(da, 200);
    CHECK(vfmig_mig_set_state(db->mig, VFMIG_MIG_RESUMING, &err) == 0);
    CHECK(vfmig_mig_set_state(da->mig, VFMIG_MIG_PRE_COPY, &err) == 0);
    uint64_t initial, dirty;
    CHECK(vfmig_mig_precopy_info(da->mig, &initial, &dirty, &err) == 0 && initial >= STATE - SIMVF_REGS_BYTES);
    uint64_t pre = pump(da->mig, db->mig, 100000);
    CHECK(pre >= STATE - SIMVF_REGS_BYTES);
    CHECK(vfmig_mig_precopy_info(da->mig, &initial, &dirty, &err) == 0 && initial == 0);
    wait_for(da, counters(da).sent + 400); /* the table keeps changing: some chunks are dirty again */
    CHECK(vfmig_simvf_keep_stop_state(da, 1) == 0);
    CHECK(vfmig_mig_set_running(da->mig, 0, &err) == 0 && vfmig_mig_get_state(da->mig) == VFMIG_MIG_STOP_COPY);
    uint64_t stop = pump(da->mig, db->mig, 777);
    CHECK(stop > 0 && stop < STATE / 4); /* precopy moved the table: stop-copy is small */
    CHECK(vfmig_mig_set_state(db->mig, VFMIG_MIG_STOP, &err) == 0);
    long la, lb;
    uint8_t *sa = state_of(da, &la, 1), *sb = state_of(db, &lb, 0);
    CHECK(la == lb && memcmp(sa, sb, (size_t)la) == 0);
    free(sb);

    /* The same stream, damaged three ways, into fresh devices: each refused with its reason. */
    struct { const char *why; size_t cut; long flip; uint64_t state; int skip; } cases[] = {
        {"fails its CRC", 0, 5000, STATE, 0},
        {"without its END", 24, -1, STATE, 0},
        {"state of 262144 bytes in the stream, 524288 here", 0, -1, 2 * STATE, 0},
        {"table bytes [0, +4096) never arrived", 0, -1, STATE, 1},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct vfmig_vm *c = make_vm();
        struct vfmig_device *dc = add_vf(c, cases[i].state, 0);
        CHECK(vfmig_mig_set_state(dc->mig, VFMIG_MIG_RESUMING, &err) == 0);
        uint8_t *s = malloc((size_t)la);
        memcpy(s, sa, (size_t)la);
        size_t len = (size_t)la - cases[i].cut;
        if (cases[i].flip >= 0)
            s[cases[i].flip] ^= 0x20;
        if (cases[i].skip) /* drop the first TABLE section, after IDENT: well formed, but a hole */
            len = drop_section(s, len, 1);
        long w = vfmig_mig_write(dc->mig, s, len, &err);
        int r = w < 0 ? (int)w : vfmig_mig_set_state(dc->mig, VFMIG_MIG_STOP, &err);
        if (r == 0 || !strstr(err.msg, cases[i].why))
            fprintf(stderr, "case %zu: rc %d, %s\n", i, r, err.msg);
        CHECK(r < 0 && strstr(err.msg, cases[i].why));
        CHECK(vfmig_mig_get_state(dc->mig) == VFMIG_MIG_ERROR);
        CHECK(vfmig_mig_set_state(dc->mig, VFMIG_MIG_RUNNING, &err) < 0); /* only reset leaves ERROR */
        CHECK(vfmig_mig_reset(dc->mig, &err) == 0 && vfmig_mig_get_state(dc->mig) == VFMIG_MIG_RUNNING);
        free(s);
        vfmig_vm_destroy(c);
    }
    free(sa);
    /* The source goes back to running: its wire resumes, counting what it missed as drops. */
    uint64_t before = counters(da).sent;
    CHECK(vfmig_mig_set_running(da->mig, 1, &err) == 0 && vfmig_mig_get_state(da->mig) == VFMIG_MIG_RUNNING);
    wait_for(da, before + 100);
    vfmig_vm_destroy(a);
    vfmig_vm_destroy(b);
}

static void test_conformance(void)
{
    struct vfmig_vm *vm = make_vm();
    struct vfmig_device *d = add_vf(vm, 64u << 10, 0);
    CHECK(vfmig_mig_conformance(d->mig, STATE * 4, stderr) == 0);
    vfmig_vm_destroy(vm);
}

static void test_bad_config(void)
{
    struct vfmig_vm *vm = make_vm();
    struct vfmig_err err = {{0}};
    struct vfmig_simvf_config c = {.state_bytes = 5000, .dma_rate = 1};
    CHECK(!vfmig_simvf_new(vm, "vf0", &c, &err) && strstr(err.msg, "4 KiB steps"));
    c = (struct vfmig_simvf_config){.state_bytes = 4096, .dma_rate = VFMIG_SIMVF_RATE_MAX + 1};
    CHECK(!vfmig_simvf_new(vm, "vf0", &c, &err) && strstr(err.msg, "dma_rate"));
    vfmig_vm_destroy(vm);
}

static const volatile struct simvf_guest_stats *guest_stats(struct vfmig_vm *vm)
{
    return (const volatile struct simvf_guest_stats *)vfmig_vm_host(vm, SIMVF_GUEST_STATS_GPA, 4096);
}

static uint8_t guest_image[1 << 20];
static size_t guest_image_len;

/* vfdrv on vcpus vCPUs with a simvf at 20k packets/s, once its driver took 300 packets. ack and
 * ack_delay_us: how it answers the migration handshake (enum vfmig_guest_ack). */
static struct vfmig_vm *boot_vfdrv(uint32_t vcpus, uint32_t clock_every, uint32_t ack, uint32_t ack_delay_us,
                                   struct vfmig_device **d)
{
    struct vfmig_vm *vm = test_vm(128ull << 20, vcpus, 0);
    test_add_builtins(vm);
    *d = add_vf(vm, STATE, 20000);
    struct vfmig_boot_params bp = {.magic = VFMIG_BOOT_MAGIC, .version = VFMIG_BOOT_VERSION, .vcpus = vcpus,
                                   .wss_gpa = VFMIG_DATA_GPA, .wss_bytes = 16u << 20, .clock_every = clock_every,
                                   .gap_threshold_ns = 500000, .width = 1, .seed = 1, .guest_ack = ack,
                                   .ack_delay_us = ack_delay_us};
    memcpy(vm->ram + VFMIG_BOOT_GPA, &bp, sizeof(bp));
    CHECK(vfmig_vm_boot(vm, guest_image, guest_image_len) == 0);
    CHECK(vfmig_vm_start(vm) == 0);
    const volatile struct simvf_guest_stats *g = guest_stats(vm);
    for (int i = 0; i < 30000 && !(g->state == SIMVF_GUEST_RUNNING && g->received >= 300); i++)
        usleep(1000);
    CHECK(g->magic == SIMVF_GUEST_MAGIC && g->state == SIMVF_GUEST_RUNNING && g->received >= 300);
    return vm;
}

/* Wait up to 5 s for a guest counter to reach want. */
static void wait_guest(const volatile uint64_t *v, uint64_t want)
{
    for (int i = 0; i < 5000 && *v < want; i++)
        usleep(1000);
    CHECK(*v >= want);
}

/* The wire stopped and every packet delivered taken or thrown out by a reset, the VM paused: the
 * oracle held (no error, its books balance) and lost nothing else. */
static void guest_settle(struct vfmig_vm *vm, struct vfmig_device *d)
{
    const volatile struct simvf_guest_stats *g = guest_stats(vm);
    CHECK(vfmig_simvf_set_rate(d, 0) == 0);
    for (int i = 0; i < 30000 && g->received + g->reset_discarded != counters(d).delivered; i++)
        usleep(1000);
    CHECK(vfmig_vm_pause(vm, VFMIG_PAUSE_TIMEOUT_MS_DEFAULT) == 0);
    struct vfmig_simvf_counters c = counters(d);
    CHECK(g->errors == 0 && g->first_error == SIMVF_ERR_NONE);
    CHECK(g->received + g->dropped_seen + g->resync_skipped == g->next_seq && g->next_seq <= c.sent);
    CHECK(g->received + g->reset_discarded == c.delivered && g->reset_discarded <= g->resets * 256);
    if (!g->resets)
        CHECK(g->resync_skipped == 0);
}

/* The engine's pre-stop step: the device's handshake with a deadline. */
static struct vfmig_prestop_result guest_handshake(struct vfmig_device *d, uint32_t deadline_ms)
{
    struct vfmig_prestop_result out;
    struct vfmig_err err = {{0}};
    CHECK(vfmig_mig_prestop(d->mig, vfmig_now_ns() + deadline_ms * 1000000ull, &out, &err) == 0);
    return out;
}

/* A migration in place: the VM stops (the handshake's outcome is final), the device's state goes
 * out through its stream and back into it, so it starts as a destination's would: VMM_STATUS =
 * MIGRATED (RESET_REQUIRED unless acked), DEV_STATUS 0, and the post-load interrupt. */
static void move_in_place(struct vfmig_vm *vm, struct vfmig_device *d)
{
    static uint8_t buf[1 << 20];
    struct vfmig_err err = {{0}};
    CHECK(vfmig_vm_pause(vm, VFMIG_PAUSE_TIMEOUT_MS_DEFAULT) == 0 && vfmig_mig_get_state(d->mig) == VFMIG_MIG_STOP);
    CHECK(vfmig_mig_set_state(d->mig, VFMIG_MIG_STOP_COPY, &err) == 0);
    size_t len = 0;
    long n;
    while ((n = vfmig_mig_read(d->mig, buf + len, sizeof(buf) - len, &err)) > 0)
        len += (size_t)n;
    CHECK((n == 0 || n == -ENOMSG) && len < sizeof(buf));
    CHECK(vfmig_mig_set_state(d->mig, VFMIG_MIG_STOP, &err) == 0);
    usleep(50000); /* away: the wire's packets meanwhile are drops */
    CHECK(vfmig_mig_set_state(d->mig, VFMIG_MIG_RESUMING, &err) == 0);
    CHECK(vfmig_mig_write(d->mig, buf, len, &err) == (long)len);
    CHECK(vfmig_mig_set_state(d->mig, VFMIG_MIG_STOP, &err) == 0);
    CHECK(vfmig_vm_resume(vm) == 0);
}

static uint8_t migcap(struct vfmig_device *d, uint32_t reg)
{
    return vfmig_pci_migcap_reg((struct vfmig_pci_func *)d, reg);
}

/* The real driver (guest/vfdrv.c) against the device: it finds it by enumeration, takes packets
 * through MSI-X and polling, and its oracle holds once the wire is stopped and drained. */
static void test_guest_driver(void)
{
    struct vfmig_device *d;
    struct vfmig_vm *vm = boot_vfdrv(1, 256, VFMIG_ACK_NORMAL, 0, &d);
    const volatile struct simvf_guest_stats *g = guest_stats(vm);
    CHECK(vfmig_simvf_set_rate(d, 0) == 0);
    for (int i = 0; i < 30000 && g->received != counters(d).delivered; i++)
        usleep(1000);
    CHECK(vfmig_vm_pause(vm, VFMIG_PAUSE_TIMEOUT_MS_DEFAULT) == 0);
    struct vfmig_simvf_counters c = counters(d);
    CHECK(g->errors == 0 && g->received == c.delivered && g->interrupts > 0);
    CHECK(g->received + g->dropped_seen == g->next_seq && g->next_seq <= c.sent);
    printf("vfdrv: received %llu, dropped %llu, interrupts %llu\n", (unsigned long long)g->received,
           (unsigned long long)g->dropped_seen, (unsigned long long)g->interrupts);
    vfmig_vm_destroy(vm);
}

/* vfdrv's side of the migration handshake, against the VMM's: a normal driver acks at once and
 * stops sending, resumes on a cancel and in place after a move; a stuck one (guest_ack never, a
 * clock read every page on two vCPUs) holds up nothing and is reset after the move; a slow one
 * acks after its delay. The oracle holds throughout. */
static void test_guest_handshake(void)
{
    struct vfmig_device *d;
    struct vfmig_vm *vm = boot_vfdrv(1, 256, VFMIG_ACK_NORMAL, 0, &d);
    const volatile struct simvf_guest_stats *g = guest_stats(vm);
    struct vfmig_prestop_result o = guest_handshake(d, 2000);
    CHECK(o.outcome == VFMIG_HS_ACKED && g->mig_notices == 1 && g->acks == 1 && g->quiesced == 1);
    CHECK(g->last_vmm_status == VFMIG_VMM_MIGRATING);
    uint32_t normal_us = o.latency_us;
    uint64_t tx = g->tx_sent;
    usleep(50000);
    CHECK(g->tx_sent == tx); /* quiesced: nothing sent */
    vfmig_mig_prestop_abort(d->mig);
    wait_guest(&g->cancels, 1);
    CHECK(g->quiesced == 0 && migcap(d, VFMIG_MIGCAP_VMM_STATUS) == 0 && migcap(d, VFMIG_MIGCAP_DEV_STATUS) == 0);
    wait_guest(&g->tx_sent, tx + 1);
    o = guest_handshake(d, 2000);
    CHECK(o.outcome == VFMIG_HS_ACKED && g->mig_notices == 2 && g->acks == 2);
    move_in_place(vm, d);
    CHECK(migcap(d, VFMIG_MIGCAP_VMM_STATUS) == VFMIG_VMM_MIGRATED);
    wait_guest(&g->resumed_in_place, 1);
    CHECK(g->quiesced == 0 && g->resets == 0 && g->last_vmm_status == VFMIG_VMM_MIGRATED);
    wait_guest(&g->received, g->received + 100);
    guest_settle(vm, d);
    vfmig_vm_destroy(vm);

    vm = boot_vfdrv(2, 1, VFMIG_ACK_NEVER, 0, &d);
    g = guest_stats(vm);
    const volatile struct vfmig_vcpu_stats *v0 = (const void *)(vm->ram + VFMIG_STATS_GPA),
                                           *v1 = (const void *)(vm->ram + VFMIG_STATS_GPA + VFMIG_STATS_STRIDE);
    uint64_t t0 = v0->touches, t1 = v1->touches;
    o = guest_handshake(d, 50);
    CHECK(o.outcome == VFMIG_HS_TIMEOUT);
    wait_guest(&g->mig_notices, 1);
    CHECK(g->acks == 0 && g->quiesced == 0);
    wait_guest(&v0->touches, t0 + 1); /* the dirtier runs on, on every vCPU */
    wait_guest(&v1->touches, t1 + 1);
    move_in_place(vm, d);
    CHECK(migcap(d, VFMIG_MIGCAP_VMM_STATUS) == (VFMIG_VMM_MIGRATED | VFMIG_VMM_RESET_REQUIRED));
    wait_guest(&g->resets, 1);
    wait_guest(&g->received, g->received + 100);
    CHECK(g->resets == 1 && g->acks == 0 && migcap(d, VFMIG_MIGCAP_DEV_STATUS) == 0);
    guest_settle(vm, d);
    vfmig_vm_destroy(vm);

    vm = boot_vfdrv(1, 256, VFMIG_ACK_SLOW, 10000, &d);
    g = guest_stats(vm);
    o = guest_handshake(d, 2000);
    CHECK(o.outcome == VFMIG_HS_ACKED && o.latency_us >= 10000 && g->quiesced == 1);
    uint32_t slow_us = o.latency_us;
    vfmig_mig_prestop_abort(d->mig);
    wait_guest(&g->cancels, 1);
    guest_settle(vm, d);
    vfmig_vm_destroy(vm);
    printf("vfdrv handshake: ack after %u us (normal), %u us (slow:10000); a stuck driver reset\n", normal_us,
           slow_us);
}

/* The handshake's outcome as simvf holds it now, and as its PCI section carries it (blob byte 40). */
static uint32_t hs_outcome_now(struct vfmig_device *d)
{
    return atomic_load(&((struct vfmig_pci_func *)d)->hs.outcome);
}

static uint32_t stream_outcome(const uint8_t *s, long len)
{
    for (long off = 0; off + (long)sizeof(struct simvf_sec_hdr) <= len;) {
        struct simvf_sec_hdr h;
        memcpy(&h, s + off, sizeof(h));
        if (h.type == SIMVF_SEC_PCI) {
            uint32_t o;
            CHECK(h.len >= 48);
            memcpy(&o, s + off + (long)sizeof(h) + 40, sizeof(o));
            return o;
        }
        off += (long)sizeof(h) + h.len;
    }
    CHECK(!"a PCI section");
    return ~0u;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* simvf's arcs around the handshake, with the real driver. Under the engine's 50 ms deadline a
 * normal driver acks in a few ms. A source that runs again after a notice cancels it once: its
 * device's STOP -> RUNNING (or PRE_COPY -> RUNNING) does, and the engine's prestop_abort after
 * that says nothing more. A paused VM gets no notice. In PRE_COPY an ack after the deadline and
 * before the stop is LATE in the state the stop saves, and after the move the driver resets. */
static void test_guest_handshake_arcs(void)
{
    struct vfmig_err err = {{0}};
    struct vfmig_device *d;
    struct vfmig_vm *vm = boot_vfdrv(1, 256, VFMIG_ACK_NORMAL, 0, &d);
    const volatile struct simvf_guest_stats *g = guest_stats(vm);
    uint32_t lat[7];
    for (uint32_t i = 0; i < 7; i++) {
        struct vfmig_prestop_result o = guest_handshake(d, 50);
        CHECK(o.outcome == VFMIG_HS_ACKED && g->acks == i + 1 && o.end_ns - o.start_ns < 50000000ull);
        lat[i] = o.latency_us;
        vfmig_mig_prestop_abort(d->mig);
        wait_guest(&g->cancels, i + 1);
    }
    qsort(lat, 7, sizeof(lat[0]), cmp_u32);

    CHECK(guest_handshake(d, 50).outcome == VFMIG_HS_ACKED);
    CHECK(vfmig_vm_pause(vm, VFMIG_PAUSE_TIMEOUT_MS_DEFAULT) == 0 && vfmig_mig_get_state(d->mig) == VFMIG_MIG_STOP);
    CHECK(hs_outcome_now(d) == VFMIG_HS_ACKED);
    uint64_t notices = g->mig_notices;
    struct vfmig_prestop_result o = guest_handshake(d, 50); /* paused: nobody to answer */
    CHECK(o.outcome == VFMIG_HS_DISABLED && o.end_ns - o.start_ns < 5000000ull && hs_outcome_now(d) == VFMIG_HS_ACKED);
    CHECK(vfmig_vm_resume(vm) == 0);
    wait_guest(&g->cancels, 8);
    CHECK(migcap(d, VFMIG_MIGCAP_VMM_STATUS) == 0 && hs_outcome_now(d) == VFMIG_HS_NONE && g->quiesced == 0);
    vfmig_mig_prestop_abort(d->mig); /* the engine's own, after the device's: no second cancel */
    usleep(50000);
    CHECK(g->cancels == 8 && g->mig_notices == notices);

    CHECK(vfmig_mig_set_state(d->mig, VFMIG_MIG_PRE_COPY, &err) == 0);
    CHECK(guest_handshake(d, 50).outcome == VFMIG_HS_ACKED);
    CHECK(vfmig_mig_set_state(d->mig, VFMIG_MIG_RUNNING, &err) == 0); /* cancelled before the stop */
    wait_guest(&g->cancels, 9);
    CHECK(migcap(d, VFMIG_MIGCAP_VMM_STATUS) == 0);
    guest_settle(vm, d);
    vfmig_vm_destroy(vm);

    vm = boot_vfdrv(1, 256, VFMIG_ACK_LATE, 0, &d); /* acks 500 ms after the notice */
    g = guest_stats(vm);
    CHECK(vfmig_simvf_keep_stop_state(d, 1) == 0);
    CHECK(vfmig_mig_set_state(d->mig, VFMIG_MIG_PRE_COPY, &err) == 0);
    o = guest_handshake(d, 20);
    CHECK(o.outcome == VFMIG_HS_TIMEOUT && g->acks == 0);
    /* The vCPUs still run: the ack comes, late. The driver counts it before writing DEV_STATUS,
     * so wait for the register (the write the VMM sees), not the counter. */
    for (int i = 0; i < 5000 && migcap(d, VFMIG_MIGCAP_DEV_STATUS) != VFMIG_DEV_ACK; i++)
        usleep(1000);
    CHECK(migcap(d, VFMIG_MIGCAP_DEV_STATUS) == VFMIG_DEV_ACK && g->acks == 1);
    CHECK(hs_outcome_now(d) == VFMIG_HS_TIMEOUT); /* late until the stop says so */
    CHECK(vfmig_vm_pause(vm, VFMIG_PAUSE_TIMEOUT_MS_DEFAULT) == 0);
    CHECK(vfmig_mig_get_state(d->mig) == VFMIG_MIG_STOP_COPY && hs_outcome_now(d) == VFMIG_HS_LATE);
    long slen;
    uint8_t *stop = state_of(d, &slen, 1);
    CHECK(stream_outcome(stop, slen) == VFMIG_HS_LATE);
    free(stop);
    static uint8_t buf[1 << 20]; /* the rest of the precopy stream (all of it: nothing was read) */
    size_t len = 0;
    long n;
    while ((n = vfmig_mig_read(d->mig, buf + len, sizeof(buf) - len, &err)) > 0)
        len += (size_t)n;
    CHECK(n == 0 && stream_outcome(buf, (long)len) == VFMIG_HS_LATE);
    CHECK(vfmig_mig_set_state(d->mig, VFMIG_MIG_STOP, &err) == 0);
    CHECK(vfmig_mig_set_state(d->mig, VFMIG_MIG_RESUMING, &err) == 0);
    CHECK(vfmig_mig_write(d->mig, buf, len, &err) == (long)len);
    CHECK(vfmig_mig_set_state(d->mig, VFMIG_MIG_STOP, &err) == 0);
    CHECK(migcap(d, VFMIG_MIGCAP_VMM_STATUS) == VFMIG_VMM_MIGRATING); /* loaded: still the source's at stop */
    CHECK(vfmig_vm_resume(vm) == 0);
    CHECK(migcap(d, VFMIG_MIGCAP_VMM_STATUS) == (VFMIG_VMM_MIGRATED | VFMIG_VMM_RESET_REQUIRED));
    wait_guest(&g->resets, 1);
    CHECK(g->resumed_in_place == 0 && g->cancels == 0);
    guest_settle(vm, d);
    vfmig_vm_destroy(vm);
    printf("vfdrv handshake arcs: 7 acks under a 50 ms deadline in %u..%u us (median %u); one cancel per "
           "notice; LATE carried by the stop-copy stream, then reset\n", lat[0], lat[6], lat[3]);
}

int main(int argc, char **argv)
{
    test_bad_config();
    test_wire_and_dma_log();
    test_move_state();
    test_conformance();
    if (argc > 1) {
        FILE *f = fopen(argv[1], "rb");
        CHECK(f);
        guest_image_len = fread(guest_image, 1, sizeof(guest_image), f);
        fclose(f);
        test_guest_driver();
        test_guest_handshake();
        test_guest_handshake_arcs();
    }
    printf("test_simvf: ok\n");
    return 0;
}
