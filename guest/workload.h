/* The dirtier workload: increments one byte (or word) per page of the vCPU's slice, QEMU
 * a-b-bootblock style (or, with the fresh pattern, rewrites each page whole with new data), at
 * a rate throttled against the clock, and logs clock gaps for downtime.
 * One copy shared by every guest that runs it (dirtier.c, vfdrv.c). */
#ifndef GUEST_WORKLOAD_H
#define GUEST_WORKLOAD_H
#include "runtime.h"

static uint32_t xorshift(uint32_t *s)
{
    uint32_t x = *s;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

static inline void touch(uint32_t gpa, uint32_t width)
{
    if (width == 4)
        *(volatile uint32_t *)gpa += 1;
    else
        *(volatile uint8_t *)gpa += 1;
}

/* Increment n consecutive pages from gpa. This KVM emulates guest instructions, so the loop
 * is hand-unrolled to under two instructions a page. */
static inline void touch_run(uint32_t gpa, uint32_t n, uint32_t width)
{
    uint32_t end4 = gpa + (n & ~3u) * VFMIG_PAGE_SIZE, end = gpa + n * VFMIG_PAGE_SIZE;
    if (width == 4 && gpa != end4)
        __asm__ volatile("1: incl (%0)\n incl 4096(%0)\n incl 8192(%0)\n incl 12288(%0)\n"
                         " add $16384, %0\n cmp %1, %0\n jne 1b"
                         : "+r"(gpa) : "r"(end4) : "memory", "cc");
    else if (gpa != end4)
        __asm__ volatile("1: incb (%0)\n incb 4096(%0)\n incb 8192(%0)\n incb 12288(%0)\n"
                         " add $16384, %0\n cmp %1, %0\n jne 1b"
                         : "+r"(gpa) : "r"(end4) : "memory", "cc");
    for (; gpa != end; gpa += VFMIG_PAGE_SIZE)
        touch(gpa, width);
}

/* The fresh pattern's seeds for page frame `pfn` on pass `pass`: a 32-bit mix (murmur3's
 * finaliser) of both and the boot seed, so no two (page, pass) start their generator alike. */
static inline uint32_t fresh_seed(uint32_t pfn, uint32_t pass, uint32_t seed)
{
    uint32_t h = pfn * 0x9E3779B1u ^ pass * 0x85EBCA77u ^ seed;
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return h;
}

/* Rewrite n consecutive pages from gpa whole (all 4096 bytes) with new pseudo-random data.
 * This KVM emulates every guest instruction (~1.5 us each, even a `rep movs` element costs
 * ~1 us), so the generator is the cheapest we found that compresses neither the data nor its
 * XOR against the page's previous pass (zlib -9 per page, zstd -1 and -19, xz -9): three
 * instructions a 4-byte word. Per page a full-period 32-bit LCG, x' = (x * A + c) mod 2^32,
 * with x and the odd c seeded by the page frame and the pass; each word written is the high
 * half of x * A (mul leaves it in edx), whose low bits, unlike an LCG's own, are not periodic.
 * A is near 2^32 since that half is below A. (A plain LCG's XOR delta compresses by up to
 * 11% under zlib; xorshift32 takes ten instructions a word and runs at a fifth of the rate.) */
#define FRESH_A 0xF9B25D65u /* = 1 mod 4: the LCG has full period */
static inline void fresh_run(uint32_t gpa, uint32_t n, uint32_t pass, uint32_t seed)
{
    for (uint32_t end = gpa + n * VFMIG_PAGE_SIZE; gpa != end;) {
        uint32_t x = fresh_seed(gpa >> 12, pass, seed), c = fresh_seed(gpa >> 12, pass, ~seed) | 1u;
        uint32_t page_end = gpa + VFMIG_PAGE_SIZE, hi;
        __asm__ volatile("1:\n"
                         " .irp o,0,4,8,12,16,20,24,28,32,36,40,44,48,52,56,60,"
                         "64,68,72,76,80,84,88,92,96,100,104,108,112,116,120,124\n"
                         " mull %[a]\n add %[c], %%eax\n mov %%edx, \\o(%[p])\n"
                         " .endr\n"
                         " add $128, %[p]\n cmp %[end], %[p]\n jne 1b"
                         : "+a"(x), "=&d"(hi), [p] "+r"(gpa)
                         : [a] "r"(FRESH_A), [c] "r"(c), [end] "r"(page_end)
                         : "memory", "cc");
    }
}

/* Next page index for the random and hot/cold patterns. */
static uint32_t next_page(uint32_t pattern, uint32_t pages, uint32_t *rng, uint32_t hot_pct,
                          uint32_t hot_pages)
{
    if (pattern == VFMIG_PATTERN_HOTCOLD) {
        uint32_t r = xorshift(rng);
        if (r % 100 < hot_pct)
            return (r >> 8) % hot_pages;
        return hot_pages + (r >> 8) % (pages - hot_pages);
    }
    return xorshift(rng) % pages;
}

/* Run the workload on vCPU id forever. poll, if not NULL, is called after every clock read with
 * the time it read (a driver's deferred work: once per batch, and while the throttle waits, so
 * a rate-limited workload leaves its idle time to it; with clock_every = 1, after every page).
 * Always inlined, so a constant NULL leaves no trace in the code of a guest without one. */
static inline __attribute__((always_inline, noreturn)) void workload_run(uint32_t id, void (*poll)(uint64_t now))
{
    const volatile struct vfmig_boot_params *bp = boot_params();
    volatile struct vfmig_vcpu_stats *st = vcpu_stats(id);
    uint32_t base, pages;
    vcpu_slice(id, &base, &pages);
    uint32_t pattern = bp->pattern, width = bp->width == 4 ? 4 : 1;
    uint32_t every = bp->clock_every ? bp->clock_every : 128;
    uint32_t threshold = bp->gap_threshold_ns;
    uint32_t ps_per_page = bp->ps_per_page;
    uint32_t hot_pct = bp->hot_pct, hot_pages = pages / 100 * (bp->hot_size_pct ? bp->hot_size_pct : 10);
    uint32_t rng = bp->seed ^ (0x9E3779B9u * (id + 1));
    if (!rng)
        rng = 1;
    if (hot_pages == 0 || hot_pages >= pages)
        hot_pages = pages > 1 ? pages / 2 : 1;

    if (id == 0)
        puts_console("dirtier: running\n");
    st->state = VFMIG_GUEST_RUNNING;
    uint64_t t0 = clock_tick(st, threshold);
    uint64_t done = 0; /* pages touched since t0, for the throttle */
    uint32_t pass = 0; /* passes so far, for the fresh pattern's seeds */
    if (pages == 0)
        for (;;) {
            uint64_t now = clock_tick(st, threshold);
            if (poll)
                poll(now);
        }
    for (;;) {
        /* Work in batches of `every` pages between clock reads; this KVM emulates guest
         * instructions, so the per-page loop is kept to a handful of them. */
        for (uint32_t i = 0; i < pages; i += every) {
            uint32_t n = pages - i < every ? pages - i : every;
            if (pattern == VFMIG_PATTERN_SEQ) {
                touch_run(base + i * VFMIG_PAGE_SIZE, n, width);
            } else if (pattern == VFMIG_PATTERN_FRESH) {
                fresh_run(base + i * VFMIG_PAGE_SIZE, n, pass, bp->seed);
            } else {
                for (uint32_t j = 0; j < n; j++)
                    touch(base + next_page(pattern, pages, &rng, hot_pct, hot_pages) * VFMIG_PAGE_SIZE, width);
            }
            st->touches = st->touches + n;
            done += n;
            uint64_t now = clock_tick(st, threshold);
            if (poll)
                poll(now);
            /* Throttle: wait until `done` pages are due. Picoseconds avoid 64-bit division. */
            while (ps_per_page && (now - t0) * 1000 < done * ps_per_page) {
                now = clock_tick(st, threshold);
                if (poll)
                    poll(now);
            }
            /* After a long stop (migration, pause), don't sprint to catch up. */
            if (ps_per_page && (now - t0) * 1000 > done * ps_per_page + 50000000000ull) {
                t0 = now;
                done = 0;
            }
        }
        st->passes = st->passes + 1;
        pass++;
    }
}
#endif
