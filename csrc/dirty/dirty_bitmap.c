/* DirtyTracker over KVM's dirty bitmap with manual protect (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2):
 * GET returns what was written since the last CLEAR; CLEAR re-protects, chunk by chunk. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "vfmig/dirty.h"

#define CLEAR_CHUNK_PAGES (256u * 1024u) /* 1 GiB a CLEAR, as QEMU does */

struct bitmap_priv {
    uint64_t *slot_bits[VFMIG_MAX_SLOTS];
};

static int bitmap_start(struct vfmig_tracker *t)
{
    struct bitmap_priv *p = calloc(1, sizeof(*p));
    if (!p)
        return vfmig_fail(&t->err, ENOMEM, "out of memory");
    t->priv = p;
    for (uint32_t i = 0; i < t->vm->nslots; i++) {
        uint64_t pages = t->vm->slots[i].size / VFMIG_PAGE_SIZE;
        p->slot_bits[i] = calloc((pages + 63) / 64, sizeof(uint64_t));
        if (!p->slot_bits[i])
            return vfmig_fail(&t->err, ENOMEM, "out of memory");
    }
    int r = vfmig_vm_set_dirty_logging(t->vm, 1);
    return r < 0 ? vfmig_fail(&t->err, -r, "%s", t->vm->err.msg) : 0;
}

static int bitmap_sync(struct vfmig_tracker *t)
{
    struct bitmap_priv *p = t->priv;
    struct vfmig_vm *vm = t->vm;
    for (uint32_t i = 0; i < vm->nslots; i++) {
        const struct vfmig_slot *s = &vm->slots[i];
        uint64_t pages = s->size / VFMIG_PAGE_SIZE, words = (pages + 63) / 64;
        uint64_t *bits = p->slot_bits[i];
        memset(bits, 0, words * 8);
        struct kvm_dirty_log dl = {.slot = s->id, .dirty_bitmap = bits};
        if (ioctl(vm->vm_fd, KVM_GET_DIRTY_LOG, &dl) < 0)
            return vfmig_fail(&t->err, errno, "KVM_GET_DIRTY_LOG slot %u: %s", s->id, strerror(errno));
        /* Re-protect before the pages are read, so writes from here on are logged again. */
        for (uint64_t first = 0; first < pages; first += CLEAR_CHUNK_PAGES) {
            uint64_t n = pages - first < CLEAR_CHUNK_PAGES ? pages - first : CLEAR_CHUNK_PAGES;
            uint64_t any = 0;
            for (uint64_t w = first / 64; w < (first + n + 63) / 64; w++)
                any |= bits[w];
            if (!any)
                continue;
            struct kvm_clear_dirty_log cl = {.slot = s->id, .first_page = first, .num_pages = (uint32_t)n,
                                             .dirty_bitmap = bits + first / 64};
            if (ioctl(vm->vm_fd, KVM_CLEAR_DIRTY_LOG, &cl) < 0)
                return vfmig_fail(&t->err, errno, "KVM_CLEAR_DIRTY_LOG slot %u: %s", s->id, strerror(errno));
        }
        uint64_t cnt = 0;
        for (uint64_t w = 0; w < words; w++)
            cnt += (uint64_t)__builtin_popcountll(bits[w]);
        atomic_fetch_add(&t->harvested, cnt);
        vfmig_dirty_set_or(&t->set, bits, s->first_page, pages);
    }
    return 0;
}

static void bitmap_stop(struct vfmig_tracker *t)
{
    struct bitmap_priv *p = t->priv;
    vfmig_vm_set_dirty_logging(t->vm, 0);
    if (!p)
        return;
    for (uint32_t i = 0; i < VFMIG_MAX_SLOTS; i++)
        free(p->slot_bits[i]);
    free(p);
    t->priv = NULL;
}

const struct vfmig_tracker_ops vfmig_tracker_bitmap = {
    .name = "bitmap", .start = bitmap_start, .sync = bitmap_sync, .stop = bitmap_stop,
};
