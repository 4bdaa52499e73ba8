/* Device DMA dirty logging with VFIO's semantics. Marks from device threads are lock-free atomic
 * ORs into one bit per 4 KiB RAM page; reports take bits out with atomic exchanges, so a mark
 * racing a report is reported by this report or the next, never lost and never twice. The
 * log's page size only coarsens what a report says: a dirty 4 KiB page dirties its whole log
 * page. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "vfmig/dma_log.h"
#include "vfmig/vm.h"

#define PAGE ((uint64_t)VFMIG_PAGE_SIZE)
#define MAX_PAGE_SIZE (1ull << 30)

_Static_assert(VFMIG_MAX_SLOTS <= VFMIG_DMA_LOG_MAX_RANGES, "start_all needs a range per RAM slot");

int vfmig_dma_log_init(struct vfmig_dma_log *l, struct vfmig_vm *vm)
{
    memset(l, 0, sizeof(*l));
    l->vm = vm;
    l->npages = vm->npages;
    l->bits = calloc((vm->npages + 63) / 64, sizeof(uint64_t));
    return l->bits ? 0 : -ENOMEM;
}

void vfmig_dma_log_free(struct vfmig_dma_log *l)
{
    atomic_store(&l->logging, 0);
    free((void *)l->bits);
    l->bits = NULL;
}

/* The RAM slot holding all of [gpa, gpa + len), or NULL. */
static const struct vfmig_slot *slot_of(const struct vfmig_vm *vm, uint64_t gpa, uint64_t len)
{
    for (uint32_t i = 0; i < vm->nslots; i++) {
        const struct vfmig_slot *s = &vm->slots[i];
        if (gpa >= s->gpa && gpa - s->gpa < s->size && len <= s->size - (gpa - s->gpa))
            return s;
    }
    return NULL;
}

static int valid_page_size(uint64_t ps)
{
    return ps >= PAGE && ps <= MAX_PAGE_SIZE && (ps & (ps - 1)) == 0;
}

int vfmig_dma_log_start(struct vfmig_dma_log *l, const struct vfmig_dma_range *ranges, uint32_t nranges,
                        uint64_t page_size, struct vfmig_err *err)
{
    if (atomic_load(&l->logging))
        return vfmig_fail(err, EBUSY, "DMA log: already started");
    if (nranges < 1 || nranges > VFMIG_DMA_LOG_MAX_RANGES)
        return vfmig_fail(err, EINVAL, "DMA log: %u ranges; 1 to %d are allowed", nranges, VFMIG_DMA_LOG_MAX_RANGES);
    if (!ranges)
        return vfmig_fail(err, EINVAL, "DMA log: no ranges given");
    if (!valid_page_size(page_size))
        return vfmig_fail(err, EINVAL, "DMA log: page size %llu is not a power of two from 4 KiB to 1 GiB",
                          (unsigned long long)page_size);
    for (uint32_t i = 0; i < nranges; i++) {
        uint64_t iova = ranges[i].iova, len = ranges[i].length;
        if (len == 0)
            return vfmig_fail(err, EINVAL, "DMA log: range %u at 0x%llx is empty", i, (unsigned long long)iova);
        if (iova % page_size || len % page_size)
            return vfmig_fail(err, EINVAL, "DMA log: range %u [0x%llx, +0x%llx) is not aligned to the page size %llu",
                              i, (unsigned long long)iova, (unsigned long long)len, (unsigned long long)page_size);
        if (iova + len < iova)
            return vfmig_fail(err, EINVAL, "DMA log: range %u [0x%llx, +0x%llx) wraps around", i,
                              (unsigned long long)iova, (unsigned long long)len);
        if (!slot_of(l->vm, iova, len))
            return vfmig_fail(err, EINVAL, "DMA log: range %u [0x%llx, +0x%llx) is not inside guest RAM", i,
                              (unsigned long long)iova, (unsigned long long)len);
        for (uint32_t j = 0; j < i; j++)
            if (iova < ranges[j].iova + ranges[j].length && ranges[j].iova < iova + len)
                return vfmig_fail(err, EINVAL, "DMA log: ranges %u and %u overlap", j, i);
    }
    /* Valid: clear what an earlier session left, then open for marks. */
    for (uint64_t w = 0; w < (l->npages + 63) / 64; w++)
        atomic_store_explicit(&l->bits[w], 0, memory_order_relaxed);
    memcpy(l->ranges, ranges, nranges * sizeof(ranges[0]));
    l->nranges = nranges;
    l->page_size = page_size;
    atomic_store(&l->pages_logged, 0);
    atomic_store_explicit(&l->logging, 1, memory_order_release);
    return 0;
}

int vfmig_dma_log_stop(struct vfmig_dma_log *l)
{
    atomic_store_explicit(&l->logging, 0, memory_order_release);
    return 0;
}

/* Sets bits [first, first + n). Release: whoever takes a bit sees the data written before. */
static void mark_run(_Atomic uint64_t *bits, uint64_t first, uint64_t n)
{
    while (n) {
        unsigned shift = (unsigned)(first % 64);
        uint64_t k = 64 - shift < n ? 64 - shift : n;
        uint64_t mask = (k == 64 ? ~0ull : (1ull << k) - 1) << shift;
        atomic_fetch_or_explicit(&bits[first / 64], mask, memory_order_release);
        first += k;
        n -= k;
    }
}

void vfmig_dma_log_mark(struct vfmig_dma_log *l, uint64_t gpa, uint64_t len)
{
    if (len == 0 || !atomic_load_explicit(&l->logging, memory_order_acquire) ||
        atomic_load_explicit(&l->broken, memory_order_relaxed))
        return;
    uint64_t end = gpa + len < gpa ? UINT64_MAX : gpa + len;
    /* Pages outside RAM are not the log's business (the device's DMA would have faulted). */
    for (uint32_t i = 0; i < l->vm->nslots; i++) {
        const struct vfmig_slot *s = &l->vm->slots[i];
        if (end <= s->gpa || (gpa >= s->gpa && gpa - s->gpa >= s->size))
            continue;
        uint64_t lo = gpa > s->gpa ? gpa : s->gpa;
        uint64_t hi = end - s->gpa < s->size ? end : s->gpa + s->size;
        uint64_t first = s->first_page + (lo - s->gpa) / PAGE, last = s->first_page + (hi - 1 - s->gpa) / PAGE;
        mark_run(l->bits, first, last - first + 1);
    }
}

/* Takes bits [idx, idx + k) of one word out of the log (k <= 64 - idx % 64); returns them as
 * the low k bits. A clean word is only loaded: most of RAM is clean in a late round. */
static uint64_t take_word(_Atomic uint64_t *bits, uint64_t idx, unsigned k)
{
    _Atomic uint64_t *w = &bits[idx / 64];
    unsigned shift = (unsigned)(idx % 64);
    uint64_t mask = (k == 64 ? ~0ull : (1ull << k) - 1) << shift;
    if (!(atomic_load_explicit(w, memory_order_relaxed) & mask))
        return 0;
    uint64_t old = mask == ~0ull ? atomic_exchange_explicit(w, 0, memory_order_acq_rel)
                                 : atomic_fetch_and_explicit(w, ~mask, memory_order_acq_rel);
    return (old & mask) >> shift;
}

/* The same for up to 64 bits at any index. */
static uint64_t take_bits(_Atomic uint64_t *bits, uint64_t idx, unsigned n)
{
    unsigned k = 64 - (unsigned)(idx % 64) < n ? 64 - (unsigned)(idx % 64) : n;
    uint64_t v = take_word(bits, idx, k);
    if (k < n)
        v |= take_word(bits, idx + k, n - k) << k;
    return v;
}

/* ORs the low n bits of v into out at bit pos. */
static void put_bits(uint64_t *out, uint64_t pos, uint64_t v, unsigned n)
{
    unsigned shift = (unsigned)(pos % 64);
    out[pos / 64] |= v << shift;
    if (shift && shift + n > 64)
        out[pos / 64 + 1] |= v >> (64 - shift);
}

static void set_bits(uint64_t *out, uint64_t pos, uint64_t n)
{
    for (; n && pos % 64; pos++, n--)
        out[pos / 64] |= 1ull << (pos % 64);
    for (; n >= 64; pos += 64, n -= 64)
        out[pos / 64] = ~0ull;
    for (; n; pos++, n--)
        out[pos / 64] |= 1ull << (pos % 64);
}

/* Report-and-clear [gpa, gpa + len) of slot s: bit base + i of out for page i at out_ps. The
 * range is validated: inside one started range, aligned to out_ps. Returns the bits set. */
static uint64_t collect(struct vfmig_dma_log *l, const struct vfmig_slot *s, uint64_t gpa, uint64_t len,
                        uint64_t out_ps, uint64_t *out, uint64_t base)
{
    uint64_t idx0 = s->first_page + (gpa - s->gpa) / PAGE, npages = len / PAGE, count = 0;
    uint64_t unit = l->page_size > out_ps ? l->page_size : out_ps;
    if (unit == PAGE) {
        /* One bit in, one bit out: a word at a time. */
        for (uint64_t off = 0; off < npages;) {
            uint64_t left = npages - off, room = 64 - (idx0 + off) % 64;
            unsigned n = (unsigned)(left < room ? left : room);
            uint64_t v = take_bits(l->bits, idx0 + off, n);
            if (v) {
                put_bits(out, base + off, v, n);
                count += (uint64_t)__builtin_popcountll(v);
            }
            off += n;
        }
        return count;
    }
    /* Blocks of `unit` bytes (aligned in GPA, clipped to the range): any dirty 4 KiB page makes
     * every out page of the block dirty. Every block is taken whole, dirty or not. */
    for (uint64_t a = gpa; a < gpa + len;) {
        uint64_t b = (a & ~(unit - 1)) + unit;
        b = b < gpa + len ? b : gpa + len;
        uint64_t idx = idx0 + (a - gpa) / PAGE, n = (b - a) / PAGE, dirty = 0;
        for (uint64_t k = 0; k < n;) {
            uint64_t left = n - k, room = 64 - (idx + k) % 64;
            unsigned c = (unsigned)(left < room ? left : room);
            dirty |= take_bits(l->bits, idx + k, c);
            k += c;
        }
        if (dirty) {
            set_bits(out, base + (a - gpa) / out_ps, (b - a) / out_ps);
            count += (b - a) / out_ps;
        }
        a = b;
    }
    return count;
}

int vfmig_dma_log_report(struct vfmig_dma_log *l, uint64_t iova, uint64_t length, uint64_t page_size,
                         uint64_t *bitmap, struct vfmig_err *err)
{
    if (!atomic_load(&l->logging))
        return vfmig_fail(err, ENOENT, "DMA log report: logging is not started");
    if (!valid_page_size(page_size))
        return vfmig_fail(err, EINVAL, "DMA log report: page size %llu is not a power of two from 4 KiB to 1 GiB",
                          (unsigned long long)page_size);
    if (!bitmap)
        return vfmig_fail(err, EINVAL, "DMA log report: no bitmap");
    if (length == 0 || iova % page_size || length % page_size || iova + length < iova)
        return vfmig_fail(err, EINVAL,
                          "DMA log report: [0x%llx, +0x%llx) is empty or not aligned to the page size %llu",
                          (unsigned long long)iova, (unsigned long long)length, (unsigned long long)page_size);
    const struct vfmig_dma_range *r = NULL;
    for (uint32_t i = 0; i < l->nranges && !r; i++)
        if (iova >= l->ranges[i].iova && iova + length <= l->ranges[i].iova + l->ranges[i].length)
            r = &l->ranges[i];
    if (!r)
        return vfmig_fail(err, EINVAL, "DMA log report: [0x%llx, +0x%llx) is not inside one started range",
                          (unsigned long long)iova, (unsigned long long)length);
    uint64_t n = collect(l, slot_of(l->vm, iova, length), iova, length, page_size, bitmap, 0);
    atomic_fetch_add(&l->pages_logged, n);
    return 0;
}

int vfmig_dma_log_start_all(struct vfmig_dma_log *l, struct vfmig_err *err)
{
    struct vfmig_dma_range r[VFMIG_MAX_SLOTS];
    for (uint32_t i = 0; i < l->vm->nslots; i++)
        r[i] = (struct vfmig_dma_range){l->vm->slots[i].gpa, l->vm->slots[i].size};
    return vfmig_dma_log_start(l, r, l->vm->nslots, PAGE, err);
}

int vfmig_dma_log_drain_all(struct vfmig_dma_log *l, uint64_t *bits, struct vfmig_err *err)
{
    if (!atomic_load(&l->logging))
        return vfmig_fail(err, ENOENT, "DMA log drain: logging is not started");
    if (!bits)
        return vfmig_fail(err, EINVAL, "DMA log drain: no bitmap");
    uint64_t n = 0;
    for (uint32_t i = 0; i < l->nranges; i++) {
        const struct vfmig_slot *s = slot_of(l->vm, l->ranges[i].iova, l->ranges[i].length);
        uint64_t first = s->first_page + (l->ranges[i].iova - s->gpa) / PAGE;
        n += collect(l, s, l->ranges[i].iova, l->ranges[i].length, PAGE, bits, first);
    }
    atomic_fetch_add(&l->pages_logged, n);
    return 0;
}
