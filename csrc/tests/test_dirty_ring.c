/* The dirty-ring walk (dirty_ring.c) on rings laid out by hand: entries in step with the walk,
 * entries this KVM wrote out of step after it overran the ring (a walk alone misses them; the
 * sweep takes them and brings the walk back in step), a run that wraps the ring's end, and an
 * entry that names no RAM. No KVM: the ring is plain memory. */
#include <string.h>

#include "check.h"
#include "fake_vm.h"
#include "vfmig/dirty.h"

#define NENT 16u

static struct kvm_dirty_gfn ring[NENT];

/* KVM's side: entry pos says page `page` (slot 0) is dirty. */
static void put(uint32_t pos, uint64_t page)
{
    ring[pos % NENT] = (struct kvm_dirty_gfn){.slot = 0, .offset = page};
    __atomic_store_n(&ring[pos % NENT].flags, KVM_DIRTY_GFN_F_DIRTY, __ATOMIC_RELEASE);
}

/* KVM_RESET_DIRTY_RINGS: entries handed back become free. */
static void reset(void)
{
    for (uint32_t i = 0; i < NENT; i++)
        if (ring[i].flags & KVM_DIRTY_GFN_F_RESET)
            ring[i].flags = 0;
}

static int none_left(void)
{
    for (uint32_t i = 0; i < NENT; i++)
        if (ring[i].flags & KVM_DIRTY_GFN_F_DIRTY)
            return 0;
    return 1;
}

int main(void)
{
    struct vfmig_vm *vm = fake_vm_new(64);
    uint64_t pages[NENT];
    uint64_t n = 0;
    uint32_t idx = 0;
    struct vfmig_ring_take got;

    /* In step: KVM writes at the walk's index. */
    for (uint32_t i = 0; i < 4; i++)
        put(i, 10 + i);
    vfmig_dirty_ring_take(vm, ring, NENT, &idx, 0, pages, &n, &got);
    CHECK(got.walked == 4 && got.strays == 0 && got.garbage == 0 && n == 4 && idx == 4);
    for (uint32_t i = 0; i < 4; i++)
        CHECK(pages[i] == 10 + i && ring[i].flags == KVM_DIRTY_GFN_F_RESET);
    reset();

    /* Out of step, as this KVM goes on after an overrun: it writes at 9..11 while the walk
     * reads at 4. The walk alone takes nothing and the pages would miss the round... */
    for (uint32_t i = 9; i < 12; i++)
        put(i, 20 + i);
    n = 0;
    vfmig_dirty_ring_take(vm, ring, NENT, &idx, 0, pages, &n, &got);
    CHECK(got.walked == 0 && got.strays == 0 && n == 0 && idx == 4 && !none_left());
    /* ...the sweep takes them and moves the walk past them, */
    vfmig_dirty_ring_take(vm, ring, NENT, &idx, 1, pages, &n, &got);
    CHECK(got.walked == 0 && got.strays == 3 && n == 3 && idx % NENT == 12 && none_left());
    CHECK(pages[0] == 29 && pages[1] == 30 && pages[2] == 31);
    reset();
    /* so the next entries KVM writes are the walk's again. */
    put(12, 40);
    put(13, 41);
    n = 0;
    vfmig_dirty_ring_take(vm, ring, NENT, &idx, 1, pages, &n, &got);
    CHECK(got.walked == 2 && got.strays == 0 && n == 2 && idx % NENT == 14 && pages[0] == 40 && pages[1] == 41);
    reset();

    /* A run out of step that wraps the ring's end: KVM writes at 15, 0 and 1 while the walk
     * reads at 14. */
    put(15, 50);
    put(16, 51);
    put(17, 52);
    n = 0;
    vfmig_dirty_ring_take(vm, ring, NENT, &idx, 1, pages, &n, &got);
    CHECK(got.walked == 0 && got.strays == 3 && n == 3 && idx % NENT == 2 && none_left());
    CHECK(pages[0] == 50 && pages[1] == 51 && pages[2] == 52);
    reset();

    /* An entry that names no RAM is taken (handed back) but yields no page. */
    put(2, 1000); /* past the fake VM's 64 pages */
    put(3, 5);
    n = 0;
    vfmig_dirty_ring_take(vm, ring, NENT, &idx, 1, pages, &n, &got);
    CHECK(got.walked == 2 && got.garbage == 1 && n == 1 && pages[0] == 5 && none_left());
    reset();

    /* A full ring: the walk takes every entry once, and the sweep finds nothing more. */
    for (uint32_t i = 0; i < NENT; i++)
        put(idx + i, i);
    n = 0;
    vfmig_dirty_ring_take(vm, ring, NENT, &idx, 1, pages, &n, &got);
    CHECK(got.walked == NENT && got.strays == 0 && n == NENT && none_left());

    fake_vm_free(vm);
    printf("test_dirty_ring: ok\n");
    return 0;
}
