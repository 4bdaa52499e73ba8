/* Every thread of a live migration at once, for TSan (and ASan): a 2-vCPU dirtier under the ring
 * tracker (its harvester thread) and auto-converge (the throttle thread), a host thread doing
 * device DMA into RAM, precopy rounds over 3 channels (sender and receiver threads) into a
 * plain-RAM destination, then pause and a zero-copy final round. The destination must then hold
 * the source's RAM exactly. argv[1]: dirtier.bin */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "check.h"
#include "fixture.h"
#include "vfmig/channels.h"
#include "vfmig/devices.h"
#include "vfmig/dirty.h"
#include "vfmig/vm.h"

#define NCHAN 3u

static _Atomic int stop_dma;

static void *dma_main(void *arg)
{
    struct vfmig_device *dma = arg;
    for (uint8_t v = 1; !atomic_load(&stop_dma); v++)
        if (vfmig_dma_fill(dma, (40ull << 20) + (uint64_t)(v % 64) * 4096, v, 4096) == -EBUSY)
            sched_yield(); /* paused: no DMA until resumed */
    return NULL;
}

struct rx_job {
    struct vfmig_receiver *r;
    int rc;
};

static void *rx_main(void *a)
{
    struct rx_job *j = a;
    j->rc = vfmig_receiver_run(j->r);
    return NULL;
}

int main(int argc, char **argv)
{
    CHECK(argc == 2);
    FILE *f = fopen(argv[1], "rb");
    CHECK(f);
    static uint8_t image[1 << 20];
    size_t n = fread(image, 1, sizeof(image), f);
    fclose(f);

    struct vfmig_vm *vm = test_vm(64ull << 20, 2, 4096);
    test_add_builtins(vm);
    struct vfmig_err err = {{0}};
    struct vfmig_device *dma = vfmig_dma_engine_new(vm, "dma0");
    CHECK(dma && vfmig_vm_add_device(vm, dma) == 0);
    struct vfmig_boot_params bp = {.magic = VFMIG_BOOT_MAGIC, .version = VFMIG_BOOT_VERSION, .vcpus = 2,
                                   .wss_gpa = VFMIG_DATA_GPA, .wss_bytes = 16u << 20, .clock_every = 256,
                                   .gap_threshold_ns = 500000, .width = 1, .seed = 1};
    memcpy(vm->ram + VFMIG_BOOT_GPA, &bp, sizeof(bp));
    CHECK(vfmig_vm_boot(vm, image, n) == 0);
    CHECK(vfmig_vm_start(vm) == 0);
    pthread_t dma_th;
    CHECK(pthread_create(&dma_th, NULL, dma_main, dma) == 0);

    /* Destination: plain RAM of the same shape. */
    struct vfmig_vm dst = {.ram_bytes = vm->ram_bytes, .npages = vm->npages, .mem_fd = -1, .nslots = 1};
    dst.ram = aligned_alloc(4096, dst.ram_bytes);
    CHECK(dst.ram);
    memset(dst.ram, 0, dst.ram_bytes);
    dst.slots[0] = (struct vfmig_slot){.id = 0, .gpa = 0, .size = dst.ram_bytes, .first_page = 0};

    int sfd[NCHAN], rfd[NCHAN], sv[2];
    for (uint32_t i = 0; i < NCHAN; i++) {
        CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
        sfd[i] = sv[0];
        rfd[i] = sv[1];
    }
    static struct vfmig_sender s;
    static struct vfmig_receiver r;
    CHECK(vfmig_sender_init(&s, vm, sfd, NCHAN, &err) == 0);
    CHECK(vfmig_receiver_init(&r, &dst, rfd, NCHAN, &err) == 0);
    struct rx_job job = {&r, 0};
    pthread_t rx_th;
    CHECK(pthread_create(&rx_th, NULL, rx_main, &job) == 0);

    struct vfmig_tracker *t = NULL;
    CHECK(vfmig_tracker_open(vm, &t, &err) == 0);
    CHECK(vfmig_vm_set_throttle(vm, 30) == 0);
    uint64_t *bits = calloc((vm->npages + 63) / 64, sizeof(uint64_t));
    CHECK(bits);
    struct vfmig_round_stats st;
    for (uint32_t round = 1; round <= 3; round++) {
        CHECK(vfmig_tracker_collect(t, bits, 0) >= 0);
        CHECK(vfmig_send_round(&s, bits, 0, &st) == 0);
        CHECK(vfmig_send_marker(&s, round, st.pages) == 0);
    }
    CHECK(vfmig_vm_pause(vm, VFMIG_PAUSE_TIMEOUT_MS_DEFAULT) == 0);
    CHECK(vfmig_tracker_collect(t, bits, 0) >= 0);
    /* The vCPUs are parked: the final harvest must have left no entry in any ring (this KVM
     * writes out of step after it overruns one; a walk alone left hundreds behind). */
    for (uint32_t c = 0; c < vm->nvcpus; c++)
        for (uint32_t i = 0; i < vm->ring_entries; i++)
            CHECK(!(__atomic_load_n(&vm->vcpus[c].ring[i].flags, __ATOMIC_ACQUIRE) & KVM_DIRTY_GFN_F_DIRTY));
    CHECK(vfmig_send_round(&s, bits, 1, &st) == 0);
    CHECK(vfmig_send_eos(&s) == 0);
    CHECK(pthread_join(rx_th, NULL) == 0);
    if (job.rc != 0)
        fprintf(stderr, "receiver: %s\n", r.err.msg);
    CHECK(job.rc == 0);

    /* Source paused, DMA stopped with it: the destination holds exactly the source's RAM. */
    uint32_t *crcs = malloc(2 * vm->npages * sizeof(uint32_t));
    CHECK(crcs);
    vfmig_ram_page_crcs(vm, crcs); /* what --verify compares */
    vfmig_ram_page_crcs(&dst, crcs + vm->npages);
    uint64_t differ = 0;
    for (uint64_t pg = 0, run = 0; pg <= vm->npages; pg++) {
        int d = pg < vm->npages && crcs[pg] != crcs[vm->npages + pg];
        differ += (uint64_t)d;
        if (d)
            run++;
        else if (run) /* the ranges, to tell a lost harvest (runs) from a lost page */
            fprintf(stderr, "pages %llu-%llu differ\n", (unsigned long long)(pg - run), (unsigned long long)pg - 1);
        if (!d)
            run = 0;
    }
    if (differ)
        fprintf(stderr, "%llu pages differ; ring-full exits %llu+%llu, overruns %llu\n", (unsigned long long)differ,
                (unsigned long long)vm->vcpus[0].exits[VFMIG_EXIT_RING_FULL],
                (unsigned long long)vm->vcpus[1].exits[VFMIG_EXIT_RING_FULL], (unsigned long long)t->overruns);
    CHECK(memcmp(crcs, crcs + vm->npages, vm->npages * sizeof(uint32_t)) == 0);
    CHECK(memcmp(vm->ram, dst.ram, vm->ram_bytes) == 0);
    CHECK(!atomic_load(&vm->failed));

    atomic_store(&stop_dma, 1);
    CHECK(pthread_join(dma_th, NULL) == 0);
    vfmig_tracker_close(t);
    vfmig_sender_free(&s);
    vfmig_receiver_free(&r);
    for (uint32_t i = 0; i < NCHAN; i++) {
        close(sfd[i]);
        close(rfd[i]);
    }
    vfmig_vm_destroy(vm);
    free(dst.ram);
    free(crcs);
    free(bits);
    printf("test_threads: ok (%llu pages in the final round)\n", (unsigned long long)st.pages);
    return 0;
}
