/* Device DMA dirty logging (dma_log.c) with VFIO's start / report-and-clear / stop semantics, on
 * a 64 MiB VM whose vCPUs never run; a synthetic two-slot RAM layout for the slot above 4 GiB;
 * concurrent marks against reports; and the dirty tracker draining a DMA engine through its log.
 * Needs /dev/kvm. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "fixture.h"
#include "vfmig/devices.h"
#include "vfmig/dirty.h"
#include "vfmig/dma_log.h"
#include "vfmig/vm.h"

#define KB (1ull << 10)
#define MB (1ull << 20)
#define RAM (64 * MB)
#define NP (RAM / 4096)

static struct vfmig_err err;

static struct vfmig_vm *make_vm(void) { return test_vm(RAM, 1, 0); }

static int bit(const uint64_t *b, uint64_t i)
{
    return (int)(b[i / 64] >> (i % 64) & 1);
}

static uint64_t count_bits(const uint64_t *b, uint64_t n)
{
    uint64_t c = 0;
    for (uint64_t i = 0; i < n; i++)
        c += (uint64_t)bit(b, i);
    return c;
}

/* Report [iova, +len) at ps into a fresh bitmap (caller frees). */
static uint64_t *report(struct vfmig_dma_log *l, uint64_t iova, uint64_t len, uint64_t ps)
{
    uint64_t *bm = calloc(len / ps / 64 + 1, 8);
    CHECK(bm);
    int rc = vfmig_dma_log_report(l, iova, len, ps, bm, &err);
    if (rc != 0)
        fprintf(stderr, "report: %s\n", err.msg);
    CHECK(rc == 0);
    return bm;
}

/* Exactly the listed bits of a report at 4 KiB over all of RAM. */
static void expect_pages(struct vfmig_dma_log *l, const uint64_t *pages, size_t n)
{
    uint64_t *bm = report(l, 0, RAM, 4096);
    for (size_t i = 0; i < n; i++)
        CHECK(bit(bm, pages[i]));
    CHECK(count_bits(bm, NP) == n);
    free(bm);
}

static void test_start_report_stop(struct vfmig_vm *vm)
{
    struct vfmig_dma_log l;
    CHECK(vfmig_dma_log_init(&l, vm) == 0);
    uint64_t bm[4] = {0};
    CHECK(vfmig_dma_log_report(&l, 0, RAM, 4096, bm, &err) == -ENOENT && strstr(err.msg, "not started"));
    CHECK(vfmig_dma_log_drain_all(&l, bm, &err) == -ENOENT);
    vfmig_dma_log_mark(&l, 0x5000, 1); /* not logging: ignored */

    struct vfmig_dma_range all = {0, RAM};
    CHECK(vfmig_dma_log_start(&l, &all, 1, 4096, &err) == 0);
    CHECK(vfmig_dma_log_start(&l, &all, 1, 4096, &err) == -EBUSY && strstr(err.msg, "already started"));
    expect_pages(&l, NULL, 0);

    vfmig_dma_log_mark(&l, 0x5000, 1);             /* page 5 */
    vfmig_dma_log_mark(&l, 0x7ff0, 0x20);          /* pages 7, 8 */
    vfmig_dma_log_mark(&l, 0x10000, 3 * 4096);     /* pages 16..18 */
    vfmig_dma_log_mark(&l, 0x20000, 0);            /* nothing */
    vfmig_dma_log_mark(&l, RAM, 4096);             /* outside RAM: ignored */
    vfmig_dma_log_mark(&l, RAM - 8, 64);           /* clipped to the last page */
    vfmig_dma_log_mark(&l, UINT64_MAX - 10, 100);  /* wraps: ignored */
    uint64_t want[] = {5, 7, 8, 16, 17, 18, NP - 1};
    expect_pages(&l, want, 7);
    CHECK(atomic_load(&l.pages_logged) == 7);
    expect_pages(&l, NULL, 0); /* the report cleared them */

    /* A report of a sub-range clears only that sub-range. */
    vfmig_dma_log_mark(&l, 0x1000, 1);
    vfmig_dma_log_mark(&l, 0x100000, 1);
    uint64_t *sub = report(&l, 0, 0x2000, 4096);
    CHECK(sub[0] == 0x2);
    free(sub);
    uint64_t want2[] = {256};
    expect_pages(&l, want2, 1);
    CHECK(atomic_load(&l.pages_logged) == 9);

    /* Report arguments are checked. */
    CHECK(vfmig_dma_log_report(&l, 0x1000, RAM, 4096, bm, &err) == -EINVAL);
    CHECK(strstr(err.msg, "not inside one started range"));
    CHECK(vfmig_dma_log_report(&l, 0x800, 0x1000, 4096, bm, &err) == -EINVAL && strstr(err.msg, "not aligned"));
    CHECK(vfmig_dma_log_report(&l, 0, 0x2000, 0x2000 + 4096, bm, &err) == -EINVAL && strstr(err.msg, "page size"));
    CHECK(vfmig_dma_log_report(&l, 0, 0x2000, 2048, bm, &err) == -EINVAL && strstr(err.msg, "page size"));
    CHECK(vfmig_dma_log_report(&l, 0, 0, 4096, bm, &err) == -EINVAL && strstr(err.msg, "empty"));
    CHECK(vfmig_dma_log_report(&l, 0, 0x1000, 4096, NULL, &err) == -EINVAL && strstr(err.msg, "no bitmap"));

    /* Stop: marks are ignored, reports refused; a new start begins from a clean log. */
    vfmig_dma_log_mark(&l, 0x2000, 1); /* logged, never reported */
    CHECK(vfmig_dma_log_stop(&l) == 0);
    vfmig_dma_log_mark(&l, 0x3000, 1);
    CHECK(vfmig_dma_log_report(&l, 0, RAM, 4096, bm, &err) == -ENOENT);
    CHECK(vfmig_dma_log_stop(&l) == 0); /* idempotent */
    CHECK(vfmig_dma_log_start(&l, &all, 1, 4096, &err) == 0);
    CHECK(atomic_load(&l.pages_logged) == 0);
    expect_pages(&l, NULL, 0);
    vfmig_dma_log_stop(&l);
    vfmig_dma_log_free(&l);
}

static void test_page_sizes(struct vfmig_vm *vm)
{
    struct vfmig_dma_log l;
    CHECK(vfmig_dma_log_init(&l, vm) == 0);
    struct vfmig_dma_range all = {0, RAM};
    CHECK(vfmig_dma_log_start(&l, &all, 1, 8 * KB, &err) == 0);
    vfmig_dma_log_mark(&l, 0x1000, 1);      /* second half of 8 KiB page 0 */
    vfmig_dma_log_mark(&l, 0x2000, 0x2000); /* both halves of 8 KiB page 1 */
    uint64_t *bm = report(&l, 0, RAM, 8 * KB);
    CHECK(bm[0] == 0x3 && count_bits(bm, NP / 2) == 2);
    CHECK(atomic_load(&l.pages_logged) == 2);
    free(bm);
    /* Reported at 4 KiB, a log at 8 KiB still says whole 8 KiB pages. */
    vfmig_dma_log_mark(&l, 0x5000, 1);
    bm = report(&l, 0x4000, 0x4000, 4096);
    CHECK(bm[0] == 0x3);
    free(bm);
    /* Reported at 2 MiB: one bit for the 2 MiB page. */
    vfmig_dma_log_mark(&l, 0x9000, 1);
    vfmig_dma_log_mark(&l, 0x1ff000, 1);
    bm = report(&l, 0, 2 * MB, 2 * MB);
    CHECK(bm[0] == 0x1);
    free(bm);
    bm = report(&l, 0, RAM, 8 * KB);
    CHECK(count_bits(bm, NP / 2) == 0);
    free(bm);
    vfmig_dma_log_stop(&l);

    /* A 2 MiB log over two ranges. */
    struct vfmig_dma_range two[] = {{2 * MB, 8 * MB}, {32 * MB, 2 * MB}};
    CHECK(vfmig_dma_log_start(&l, two, 2, 2 * MB, &err) == 0);
    vfmig_dma_log_mark(&l, 2 * MB + 5 * 4096, 1);
    vfmig_dma_log_mark(&l, 4 * MB - 1, 1);
    vfmig_dma_log_mark(&l, 10 * MB - 1, 1);
    vfmig_dma_log_mark(&l, 32 * MB + 4096, 100);
    vfmig_dma_log_mark(&l, 20 * MB, 1); /* in RAM, outside every range: never reported */
    bm = report(&l, 2 * MB, 8 * MB, 2 * MB);
    CHECK(bm[0] == 0x9); /* [2, 4) and [8, 10) MiB */
    free(bm);
    bm = report(&l, 32 * MB, 2 * MB, 2 * MB);
    CHECK(bm[0] == 0x1);
    free(bm);
    uint64_t one[1];
    CHECK(vfmig_dma_log_report(&l, 10 * MB, 2 * MB, 2 * MB, one, &err) == -EINVAL);
    CHECK(vfmig_dma_log_report(&l, 8 * MB, 4 * MB, 2 * MB, one, &err) == -EINVAL); /* runs past the range */
    /* Reported at 4 KiB, a dirty 2 MiB log page is 512 dirty 4 KiB pages. */
    vfmig_dma_log_mark(&l, 6 * MB + 4096, 8);
    bm = report(&l, 2 * MB, 8 * MB, 4096);
    CHECK(count_bits(bm, 2048) == 512);
    for (uint64_t i = 1024; i < 1536; i++)
        CHECK(bit(bm, i));
    free(bm);
    CHECK(atomic_load(&l.pages_logged) == 3 + 512);
    vfmig_dma_log_stop(&l);
    vfmig_dma_log_free(&l);
}

static void expect_start_fails(struct vfmig_dma_log *l, const struct vfmig_dma_range *r, uint32_t n, uint64_t ps,
                               const char *words)
{
    memset(&err, 0, sizeof(err));
    CHECK(vfmig_dma_log_start(l, r, n, ps, &err) == -EINVAL);
    if (!strstr(err.msg, words)) {
        fprintf(stderr, "start error '%s' does not say '%s'\n", err.msg, words);
        exit(1);
    }
    uint64_t bm[1];
    CHECK(vfmig_dma_log_report(l, 0, 4096, 4096, bm, &err) == -ENOENT); /* nothing applied */
}

static void test_invalid_start(struct vfmig_vm *vm)
{
    struct vfmig_dma_log l;
    CHECK(vfmig_dma_log_init(&l, vm) == 0);
    struct vfmig_dma_range all = {0, RAM}, nine[9];
    for (int i = 0; i < 9; i++)
        nine[i] = (struct vfmig_dma_range){(uint64_t)i * MB, MB};
    expect_start_fails(&l, &all, 0, 4096, "0 ranges; 1 to 8 are allowed");
    expect_start_fails(&l, nine, 9, 4096, "9 ranges");
    expect_start_fails(&l, NULL, 1, 4096, "no ranges given");
    expect_start_fails(&l, &all, 1, 0, "page size 0 is not a power of two");
    expect_start_fails(&l, &all, 1, 2048, "page size 2048");
    expect_start_fails(&l, &all, 1, 12 * KB, "page size 12288");
    expect_start_fails(&l, &all, 1, 2ull << 30, "from 4 KiB to 1 GiB");
    expect_start_fails(&l, &all, 1, 1ull << 30, "not aligned to the page size"); /* 64 MiB of RAM */
    struct vfmig_dma_range r = {0x800, 4096};
    expect_start_fails(&l, &r, 1, 4096, "range 0 [0x800, +0x1000) is not aligned");
    r = (struct vfmig_dma_range){0x4000, 0x3000};
    expect_start_fails(&l, &r, 1, 8 * KB, "not aligned");
    r = (struct vfmig_dma_range){0x4000, 0};
    expect_start_fails(&l, &r, 1, 4096, "range 0 at 0x4000 is empty");
    r = (struct vfmig_dma_range){RAM, 4096};
    expect_start_fails(&l, &r, 1, 4096, "is not inside guest RAM");
    r = (struct vfmig_dma_range){RAM - 4096, 8192};
    expect_start_fails(&l, &r, 1, 4096, "is not inside guest RAM");
    r = (struct vfmig_dma_range){UINT64_MAX - 4095, 8192};
    expect_start_fails(&l, &r, 1, 4096, "wraps around");
    struct vfmig_dma_range overlap[] = {{0, 8 * KB}, {MB, MB}, {MB + 4096, 4096}};
    expect_start_fails(&l, overlap, 3, 4096, "ranges 1 and 2 overlap");
    /* Adjacent is fine, and so are 8 ranges. */
    struct vfmig_dma_range adjacent[] = {{0, 8 * KB}, {8 * KB, 8 * KB}};
    CHECK(vfmig_dma_log_start(&l, adjacent, 2, 4096, &err) == 0);
    vfmig_dma_log_stop(&l);
    CHECK(vfmig_dma_log_start(&l, nine, 8, 4096, &err) == 0);
    vfmig_dma_log_stop(&l);
    vfmig_dma_log_free(&l);
}

/* RAM in two slots, the second at 4 GiB with a first page index that is not word aligned. The
 * log only reads the layout, so no KVM VM is needed. */
static void test_two_slots(void)
{
    static struct vfmig_vm vm;
    vm.nslots = 2;
    vm.npages = 300;
    vm.ram_bytes = 300 * 4096;
    vm.slots[0] = (struct vfmig_slot){.id = 0, .gpa = 0, .size = 100 * 4096, .first_page = 0};
    vm.slots[1] = (struct vfmig_slot){.id = 1, .gpa = 4ull << 30, .size = 200 * 4096, .first_page = 100};
    const uint64_t hi = 4ull << 30;
    struct vfmig_dma_log l;
    CHECK(vfmig_dma_log_init(&l, &vm) == 0);
    CHECK(vfmig_dma_log_start_all(&l, &err) == 0);
    CHECK(l.nranges == 2 && l.page_size == 4096);
    CHECK(vfmig_dma_log_start_all(&l, &err) == -EBUSY);
    vfmig_dma_log_mark(&l, hi + 5 * 4096, 1);            /* RAM page 105 */
    vfmig_dma_log_mark(&l, hi + 60 * 4096, 10 * 4096);    /* 160..169 */
    vfmig_dma_log_mark(&l, 100 * 4096 - 1, 2);           /* 99; the rest is the hole */
    vfmig_dma_log_mark(&l, 3ull << 30, 4096);            /* the hole: ignored */
    vfmig_dma_log_mark(&l, 90 * 4096, (hi - 90 * 4096) + 3 * 4096); /* 90..99 and 100..102 */
    uint64_t bits[5] = {1}; /* drain ORs: bit 0 stays */
    CHECK(vfmig_dma_log_drain_all(&l, bits, &err) == 0);
    CHECK(bit(bits, 0) && bit(bits, 105) && bit(bits, 99));
    for (uint64_t p = 160; p < 170; p++)
        CHECK(bit(bits, p));
    for (uint64_t p = 90; p < 103; p++)
        CHECK(bit(bits, p));
    CHECK(count_bits(bits, 300) == 1 + 1 + 10 + 13);
    memset(bits, 0, sizeof(bits));
    CHECK(vfmig_dma_log_drain_all(&l, bits, &err) == 0 && count_bits(bits, 300) == 0);
    /* A report of the high slot: bit i is the slot's page i, whatever its RAM index. */
    vfmig_dma_log_mark(&l, hi, 1);
    vfmig_dma_log_mark(&l, hi + 63 * 4096, 2 * 4096);
    vfmig_dma_log_mark(&l, hi + 199 * 4096, 1);
    uint64_t *bm = report(&l, hi, 200 * 4096, 4096);
    CHECK(bit(bm, 0) && bit(bm, 63) && bit(bm, 64) && bit(bm, 199) && count_bits(bm, 200) == 4);
    free(bm);
    vfmig_dma_log_stop(&l);
    struct vfmig_dma_range across = {0, hi + 4096};
    CHECK(vfmig_dma_log_start(&l, &across, 1, 4096, &err) == -EINVAL && strstr(err.msg, "not inside guest RAM"));
    vfmig_dma_log_free(&l);
}

/* Marks every page in pages[] once and reports all of RAM: how many were not reported. */
static uint64_t lost_marks(struct vfmig_dma_log *l, const uint64_t *pages, size_t n)
{
    for (size_t i = 0; i < n; i++)
        vfmig_dma_log_mark(l, pages[i] * 4096 + 17, 1);
    uint64_t *bm = report(l, 0, RAM, 4096), lost = 0;
    for (size_t i = 0; i < n; i++)
        lost += !bit(bm, pages[i]);
    free(bm);
    return lost;
}

/* The test knob: a broken log drops marks, and the check above sees it (the log matters). */
static void test_broken(struct vfmig_vm *vm)
{
    struct vfmig_dma_log l;
    CHECK(vfmig_dma_log_init(&l, vm) == 0);
    CHECK(vfmig_dma_log_start_all(&l, &err) == 0);
    uint64_t pages[] = {0, 1, 63, 64, 1000, NP - 1};
    CHECK(lost_marks(&l, pages, 6) == 0);
    atomic_store(&l.broken, 1);
    CHECK(lost_marks(&l, pages, 6) == 6);
    atomic_store(&l.broken, 0);
    CHECK(lost_marks(&l, pages, 6) == 0);
    CHECK(atomic_load(&l.pages_logged) == 12);
    vfmig_dma_log_free(&l);
}

/* Two threads mark every page exactly once (in 2-page marks, interleaved in the same words)
 * while the migration thread reports: every page is reported exactly once overall. */
struct marker {
    struct vfmig_dma_log *l;
    int id;
    _Atomic int *go;
};

static void *marker_main(void *arg)
{
    struct marker *m = arg;
    while (!atomic_load(m->go))
        ;
    for (uint64_t b = (uint64_t)m->id; b < NP / 2; b += 2) {
        uint64_t block = (b * 4099) % (NP / 2); /* scattered, still every block once */
        vfmig_dma_log_mark(m->l, block * 2 * 4096, 2 * 4096);
    }
    return NULL;
}

static void test_concurrent(struct vfmig_vm *vm)
{
    struct vfmig_dma_log l;
    CHECK(vfmig_dma_log_init(&l, vm) == 0);
    uint8_t *seen = calloc(NP, 1);
    uint64_t *bm = calloc(NP / 64, 8);
    CHECK(seen && bm);
    for (int round = 0; round < 100; round++) {
        CHECK(vfmig_dma_log_start_all(&l, &err) == 0);
        memset(seen, 0, NP);
        _Atomic int go = 0;
        struct marker mk[2] = {{&l, 0, &go}, {&l, 1, &go}};
        pthread_t th[2];
        for (int i = 0; i < 2; i++)
            CHECK(pthread_create(&th[i], NULL, marker_main, &mk[i]) == 0);
        atomic_store(&go, 1);
        uint64_t reports = 0;
        int joined[2] = {0, 0};
        for (;;) {
            /* The report after both markers were joined picks up whatever is left. */
            int last = joined[0] && joined[1];
            memset(bm, 0, NP / 8);
            if (round % 2)
                CHECK(vfmig_dma_log_drain_all(&l, bm, &err) == 0);
            else
                CHECK(vfmig_dma_log_report(&l, 0, RAM, 4096, bm, &err) == 0);
            for (uint64_t p = 0; p < NP; p++)
                if (bit(bm, p))
                    CHECK(seen[p]++ == 0); /* never twice */
            reports++;
            if (last)
                break;
            for (int i = 0; i < 2; i++)
                if (!joined[i] && pthread_tryjoin_np(th[i], NULL) == 0)
                    joined[i] = 1;
        }
        for (uint64_t p = 0; p < NP; p++)
            CHECK(seen[p] == 1); /* never lost */
        CHECK(atomic_load(&l.pages_logged) == NP);
        CHECK(reports >= 2);
        vfmig_dma_log_stop(&l);
    }
    free(seen);
    free(bm);
    vfmig_dma_log_free(&l);
}

/* The dirty tracker starts every device's log, drains it each collect and stops it at close. */
static void test_tracker(struct vfmig_vm *vm)
{
    struct vfmig_device *dma = vfmig_dma_engine_new(vm, "dma0");
    CHECK(dma && vfmig_vm_add_device(vm, dma) == 0);
    struct vfmig_dma_log *l = dma->dma_log;
    CHECK(l);
    CHECK(vfmig_dma_fill(dma, 0x100000, 0xAA, 4096) == 0); /* before tracking: not logged */
    CHECK(!atomic_load(&l->logging));

    struct vfmig_tracker *t = NULL;
    uint64_t *out = calloc(NP / 64, 8);
    CHECK(out);
    CHECK(vfmig_tracker_open(vm, &t, &err) == 0);
    CHECK(atomic_load(&l->logging));
    CHECK(vfmig_tracker_collect(t, out, 0) == (int64_t)NP); /* the first round: all */
    CHECK(vfmig_tracker_collect(t, out, 0) == 0);           /* no vCPU runs, no DMA */
    CHECK(vfmig_dma_fill(dma, 0x200000, 0x55, 8192 + 1) == 0);
    CHECK(vfmig_tracker_collect(t, out, 0) == 3);
    CHECK(bit(out, 512) && bit(out, 513) && bit(out, 514));
    CHECK(vfmig_tracker_collect(t, out, 1) == 3);           /* accumulate keeps the unsent ones */
    CHECK(vfmig_tracker_collect(t, out, 0) == 0);
    CHECK(vfmig_dma_fill(dma, RAM - 4096, 0x11, 4096) == 0);
    CHECK(vfmig_tracker_collect(t, out, 0) == 1 && bit(out, NP - 1));
    vfmig_tracker_close(t);
    CHECK(!atomic_load(&l->logging));
    uint64_t logged = atomic_load(&l->pages_logged);
    CHECK(vfmig_dma_fill(dma, 0x300000, 0x22, 4096) == 0);
    CHECK(atomic_load(&l->pages_logged) == logged);

    /* A log someone else started makes the open fail and is left as it was. */
    CHECK(vfmig_dma_log_start_all(l, &err) == 0);
    t = NULL;
    CHECK(vfmig_tracker_open(vm, &t, &err) == -EBUSY && t == NULL);
    CHECK(strstr(err.msg, "device dma0: DMA log: already started"));
    CHECK(atomic_load(&l->logging));
    vfmig_dma_log_stop(l);
    /* A fresh tracker after all that works. */
    CHECK(vfmig_tracker_open(vm, &t, &err) == 0);
    CHECK(vfmig_tracker_collect(t, out, 0) == (int64_t)NP);
    CHECK(vfmig_dma_fill(dma, 0x5000, 0x33, 1) == 0);
    CHECK(vfmig_tracker_collect(t, out, 0) == 1 && bit(out, 5));
    vfmig_tracker_close(t);
    free(out);
}

int main(void)
{
    struct vfmig_vm *vm = make_vm();
    test_start_report_stop(vm);
    test_page_sizes(vm);
    test_invalid_start(vm);
    test_two_slots();
    test_broken(vm);
    test_concurrent(vm);
    test_tracker(vm);
    vfmig_vm_destroy(vm);
    printf("test_dma_log: ok\n");
    return 0;
}
