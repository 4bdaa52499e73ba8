/* Sparse RAM images and the wrap-edge check. */
#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "vfmig/ramfile.h"
#include "vfmig/zero.h"

int vfmig_ram_save(struct vfmig_vm *vm, int fd, struct vfmig_err *err)
{
    if (ftruncate(fd, (off_t)vm->ram_bytes) < 0)
        return vfmig_fail(err, errno, "truncate RAM image: %s", strerror(errno));
    uint64_t data[8];
    for (uint64_t p = 0; p < vm->npages; p++) {
        if (p % 512 == 0)
            vfmig_vm_data_map(vm, p, vm->npages - p < 512 ? (uint32_t)(vm->npages - p) : 512, data);
        const uint8_t *src = vm->ram + p * VFMIG_PAGE_SIZE;
        if (!(data[(p % 512) / 64] & (1ull << (p % 64))) || vfmig_page_is_zero(src))
            continue; /* holes are never read: a read would allocate them */
        off_t off = (off_t)(p * VFMIG_PAGE_SIZE);
        for (size_t done = 0; done < VFMIG_PAGE_SIZE;) {
            ssize_t w = pwrite(fd, src + done, VFMIG_PAGE_SIZE - done, off + (off_t)done);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0)
                return vfmig_fail(err, w < 0 ? errno : EIO, "write RAM image: %s", strerror(errno));
            done += (size_t)w;
        }
    }
    return 0;
}

int vfmig_ram_load(struct vfmig_vm *vm, int fd, struct vfmig_err *err)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return vfmig_fail(err, errno, "stat RAM image: %s", strerror(errno));
    if ((uint64_t)st.st_size != vm->ram_bytes)
        return vfmig_fail(err, EINVAL, "RAM image is %lld bytes, the VM has %llu", (long long)st.st_size,
                          (unsigned long long)vm->ram_bytes);
    for (uint64_t off = 0; off < vm->ram_bytes;) {
        size_t chunk = vm->ram_bytes - off > (1u << 20) ? (1u << 20) : (size_t)(vm->ram_bytes - off);
        ssize_t r = pread(fd, vm->ram + off, chunk, (off_t)off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return vfmig_fail(err, r < 0 ? errno : EIO, "read RAM image: %s", r < 0 ? strerror(errno) : "short");
        off += (uint64_t)r;
    }
    return 0;
}

static uint32_t counter_at(const uint8_t *page, uint32_t width)
{
    if (width == 4) {
        uint32_t v;
        memcpy(&v, page, 4);
        return v;
    }
    return page[0];
}

int64_t vfmig_ram_wrap_edges(struct vfmig_vm *vm, uint64_t gpa, uint64_t pages, uint32_t width)
{
    const uint8_t *base = vfmig_vm_host(vm, gpa, pages * VFMIG_PAGE_SIZE);
    if (!base || pages == 0)
        return -1;
    int64_t edges = 0;
    uint32_t prev = counter_at(base, width);
    for (uint64_t i = 1; i < pages; i++) {
        uint32_t v = counter_at(base + i * VFMIG_PAGE_SIZE, width);
        /* Pages ahead of the edge have been incremented once more than those after it. */
        if (v != prev)
            edges++;
        prev = v;
    }
    return edges;
}
