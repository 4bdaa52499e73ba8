/* The link's pace on a clock the test sets: channels share the link, idle time earns at most
 * VFMIG_PACE_BURST_NS of credit, and a bandwidth change starts the count afresh. Each check
 * also names what a plain "bytes since the round began" count would have answered, which it
 * must not. */
#include <stdio.h>

#include "check.h"
#include "vfmig/pace.h"

#define MS 1000000ull
#define S 1000000000ull

static void test_shared_link(void)
{
    struct vfmig_pacer p;
    vfmig_pacer_init(&p);
    vfmig_pacer_restart(&p, 0, 1000000000);
    /* 1e9 bytes/s: a byte a nanosecond. Two channels' 1 MB each: the second waits for both. */
    CHECK(vfmig_pacer_due(&p, 1000000, 1000000000, 0) == 1 * MS);
    CHECK(vfmig_pacer_due(&p, 1000000, 1000000000, 0) == 2 * MS);
    CHECK(vfmig_pacer_due(&p, 0, 0, 5 * S) == 0); /* unlimited: never a wait */
    /* A new round counts from its own start. */
    vfmig_pacer_restart(&p, 10 * S, 1000000000);
    CHECK(vfmig_pacer_due(&p, 1000000, 1000000000, 10 * S) == 10 * S + 1 * MS);
    vfmig_pacer_destroy(&p);
}

static void test_idle_credit_is_capped(void)
{
    struct vfmig_pacer p;
    vfmig_pacer_init(&p);
    vfmig_pacer_restart(&p, 0, 1000000000);
    /* 1 s of zero pages (nothing on the wire), then 50 ms worth at once, then 50 ms more: the
     * uncapped count would let all 100 ms worth go at line rate (due 100 ms, long past); the
     * pacer lets 20 ms of it through early and holds the rest to the link's rate. */
    uint64_t first = vfmig_pacer_due(&p, 50000000, 1000000000, 1 * S);
    CHECK(first == 1 * S + 50 * MS - VFMIG_PACE_BURST_NS);
    uint64_t second = vfmig_pacer_due(&p, 50000000, 1000000000, 1 * S);
    CHECK(second == 1 * S + 100 * MS - VFMIG_PACE_BURST_NS);
    CHECK(second != 100 * MS);
    /* Credit within the burst is kept: 10 ms idle buys 10 ms. */
    vfmig_pacer_restart(&p, 2 * S, 1000000000);
    CHECK(vfmig_pacer_due(&p, 20000000, 1000000000, 2 * S + 10 * MS) == 2 * S + 20 * MS);
    vfmig_pacer_destroy(&p);
}

static void test_bandwidth_change_restarts(void)
{
    struct vfmig_pacer p;
    vfmig_pacer_init(&p);
    /* 1 GB in 1 s at 1 GB/s, then 100 MB/s: the next 1 MB is due 10 ms on, not the 10 s a
     * count charging the whole round at the new rate would make the channel sleep. */
    vfmig_pacer_restart(&p, 0, 1000000000);
    CHECK(vfmig_pacer_due(&p, 1000000000, 1000000000, 0) == 1 * S);
    uint64_t after_lower = vfmig_pacer_due(&p, 1000000, 100000000, 1 * S);
    CHECK(after_lower == 1 * S + 10 * MS);
    /* 10 s at 10 MB/s, then 1 GB/s: 100 MB more is due 100 ms on, where the same count would
     * have let 10 s worth of the new rate go unpaced (due at 0.2 s). */
    vfmig_pacer_restart(&p, 0, 1000000000);
    CHECK(vfmig_pacer_due(&p, 100000000, 10000000, 0) == 10 * S);
    uint64_t after_raise = vfmig_pacer_due(&p, 100000000, 1000000000, 10 * S);
    CHECK(after_raise == 10 * S + 100 * MS);
    vfmig_pacer_destroy(&p);
}

int main(void)
{
    test_shared_link();
    test_idle_credit_is_capped();
    test_bandwidth_change_restarts();
    printf("test_pace: ok\n");
    return 0;
}
