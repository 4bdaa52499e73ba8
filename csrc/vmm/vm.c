/* VM creation, RAM and memslots, boot state, destruction. vCPU threads live in vcpu.c. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vfmig/irq.h"
#include "vfmig/pci.h"
#include "vfmig/vm.h"

#ifndef KVM_CAP_DIRTY_LOG_RING_ACQ_REL
#define KVM_CAP_DIRTY_LOG_RING_ACQ_REL 223
#endif

static int enable_cap(int vm_fd, uint32_t cap, uint64_t arg0)
{
    struct kvm_enable_cap c = {.cap = cap, .args = {arg0}};
    return ioctl(vm_fd, KVM_ENABLE_CAP, &c);
}

static int set_slot(struct vfmig_vm *vm, struct vfmig_slot *s, uint32_t flags)
{
    struct kvm_userspace_memory_region r = {
        .slot = s->id,
        .flags = flags,
        .guest_phys_addr = s->gpa,
        .memory_size = s->size,
        .userspace_addr = (uint64_t)(uintptr_t)(vm->ram + s->first_page * VFMIG_PAGE_SIZE),
    };
    if (ioctl(vm->vm_fd, KVM_SET_USER_MEMORY_REGION, &r) < 0)
        return -errno;
    s->flags = flags;
    return 0;
}

static int create_ram(struct vfmig_vm *vm, uint64_t bytes, struct vfmig_err *err)
{
    vm->mem_fd = memfd_create("vfmig-ram", MFD_CLOEXEC);
    if (vm->mem_fd < 0)
        return vfmig_fail(err, errno, "memfd_create: %s", strerror(errno));
    if (ftruncate(vm->mem_fd, (off_t)bytes) < 0)
        return vfmig_fail(err, errno, "memfd size %llu: %s", (unsigned long long)bytes, strerror(errno));
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, vm->mem_fd, 0);
    if (p == MAP_FAILED)
        return vfmig_fail(err, errno, "mmap guest RAM: %s", strerror(errno));
    /* Huge pages where the host allows them for shmem (shmem_enabled=advise): populating RAM
     * costs a tenth. KVM still logs dirty pages at 4 KiB: it maps small pages while logging. */
    madvise(p, bytes, MADV_HUGEPAGE);
    vm->ram = p;
    vm->ram_bytes = bytes;
    vm->npages = bytes / VFMIG_PAGE_SIZE;

    /* Low RAM below 3 GiB for the 32-bit guest; the rest above 4 GiB, as on a PC. */
    uint64_t low = bytes < VFMIG_LOW_RAM_MAX ? bytes : VFMIG_LOW_RAM_MAX;
    vm->slots[0] = (struct vfmig_slot){.id = 0, .gpa = 0, .size = low, .first_page = 0};
    vm->nslots = 1;
    if (bytes > low) {
        vm->slots[1] = (struct vfmig_slot){.id = 1, .gpa = VFMIG_HIGH_RAM_GPA, .size = bytes - low,
                                           .first_page = low / VFMIG_PAGE_SIZE};
        vm->nslots = 2;
    }
    for (uint32_t i = 0; i < vm->nslots; i++) {
        int r = set_slot(vm, &vm->slots[i], 0);
        if (r < 0)
            return vfmig_fail(err, -r, "memslot %u: %s", i, strerror(-r));
    }
    return 0;
}

static int create_vcpu(struct vfmig_vm *vm, uint32_t id, struct vfmig_err *err)
{
    struct vfmig_vcpu *cpu = &vm->vcpus[id];
    cpu->vm = vm;
    cpu->id = id;
    cpu->fd = ioctl(vm->vm_fd, KVM_CREATE_VCPU, id);
    if (cpu->fd < 0)
        return vfmig_fail(err, errno, "KVM_CREATE_VCPU %u: %s", id, strerror(errno));
    int sz = ioctl(vm->kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (sz <= 0)
        return vfmig_fail(err, EINVAL, "KVM_GET_VCPU_MMAP_SIZE failed");
    cpu->run_size = (size_t)sz;
    cpu->run = mmap(NULL, cpu->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, cpu->fd, 0);
    if (cpu->run == MAP_FAILED) {
        cpu->run = NULL;
        return vfmig_fail(err, errno, "mmap kvm_run: %s", strerror(errno));
    }
    if (vm->ring_entries) {
        size_t rsz = (size_t)vm->ring_entries * sizeof(struct kvm_dirty_gfn);
        void *r = mmap(NULL, rsz, PROT_READ | PROT_WRITE, MAP_SHARED, cpu->fd,
                       (off_t)KVM_DIRTY_LOG_PAGE_OFFSET * getpagesize());
        if (r == MAP_FAILED)
            return vfmig_fail(err, errno, "mmap dirty ring: %s", strerror(errno));
        cpu->ring = r;
    }
    return 0;
}

static int check_config(const struct vfmig_vm_config *cfg, struct vfmig_err *err)
{
    if (cfg->mem_bytes % VFMIG_PAGE_SIZE)
        return vfmig_fail(err, EINVAL, "memory size %llu is not a multiple of the page size (%u)",
                          (unsigned long long)cfg->mem_bytes, VFMIG_PAGE_SIZE);
    if (cfg->mem_bytes < VFMIG_MIN_RAM)
        return vfmig_fail(err, EINVAL, "memory size %llu MiB is below the minimum of %llu MiB",
                          (unsigned long long)(cfg->mem_bytes >> 20), VFMIG_MIN_RAM >> 20);
    uint64_t host = (uint64_t)sysconf(_SC_PHYS_PAGES) * (uint64_t)sysconf(_SC_PAGESIZE);
    if (cfg->mem_bytes > VFMIG_MAX_RAM || cfg->mem_bytes > host)
        return vfmig_fail(err, E2BIG, "memory size %llu MiB is too large for this host (%llu MiB of RAM)",
                          (unsigned long long)(cfg->mem_bytes >> 20), (unsigned long long)(host >> 20));
    if (cfg->vcpus < 1 || cfg->vcpus > VFMIG_MAX_VCPUS)
        return vfmig_fail(err, EINVAL, "vcpus must be 1..%d, got %u", VFMIG_MAX_VCPUS, cfg->vcpus);
    if (cfg->ring_entries && (cfg->ring_entries & (cfg->ring_entries - 1)))
        return vfmig_fail(err, EINVAL, "dirty ring entries must be a power of two, got %u", cfg->ring_entries);
    return 0;
}

static int enable_dirty_mode(struct vfmig_vm *vm, struct vfmig_err *err)
{
    if (vm->ring_entries) {
        uint64_t bytes = (uint64_t)vm->ring_entries * sizeof(struct kvm_dirty_gfn);
        /* ACQ_REL is the ordering-safe variant; plain is the x86-only fallback. */
        if (enable_cap(vm->vm_fd, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, bytes) < 0 &&
            enable_cap(vm->vm_fd, KVM_CAP_DIRTY_LOG_RING, bytes) < 0)
            return vfmig_fail(err, errno, "this KVM has no dirty ring of %u entries: %s", vm->ring_entries,
                              strerror(errno));
        return 0;
    }
    if (enable_cap(vm->vm_fd, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE) < 0)
        return vfmig_fail(err, errno, "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: %s", strerror(errno));
    return 0;
}

int vfmig_vm_create(const struct vfmig_vm_config *cfg, struct vfmig_vm **out, struct vfmig_err *err)
{
    vfmig_checkpoint_prepare(); /* a destination's first checkpoint is inside the downtime */
    int r = check_config(cfg, err);
    if (r < 0)
        return r;
    struct vfmig_vm *vm = calloc(1, sizeof(*vm));
    if (!vm)
        return vfmig_fail(err, ENOMEM, "out of memory");
    vm->kvm_fd = vm->vm_fd = vm->mem_fd = -1;
    vm->ring_entries = cfg->ring_entries;
    pthread_mutex_init(&vm->lock, NULL);
    pthread_cond_init(&vm->cond, NULL);

    vm->kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (vm->kvm_fd < 0) {
        r = vfmig_fail(err, errno, "cannot open /dev/kvm: %s", strerror(errno));
        goto fail;
    }
    vm->vm_fd = ioctl(vm->kvm_fd, KVM_CREATE_VM, 0);
    if (vm->vm_fd < 0) {
        r = vfmig_fail(err, errno, "KVM_CREATE_VM: %s", strerror(errno));
        goto fail;
    }
    if ((r = enable_dirty_mode(vm, err)) < 0)
        goto fail;
    ioctl(vm->vm_fd, KVM_SET_TSS_ADDR, 0xfffbd000ul); /* needed by VMX only; harmless elsewhere */
    if (ioctl(vm->vm_fd, KVM_CREATE_IRQCHIP, 0) < 0) {
        r = vfmig_fail(err, errno, "KVM_CREATE_IRQCHIP: %s", strerror(errno));
        goto fail;
    }
    if ((r = create_ram(vm, cfg->mem_bytes, err)) < 0)
        goto fail;
    vm->nvcpus = cfg->vcpus;
    for (uint32_t i = 0; i < cfg->vcpus; i++)
        if ((r = create_vcpu(vm, i, err)) < 0)
            goto fail;
    *out = vm;
    return 0;
fail:
    vfmig_vm_destroy(vm);
    return r;
}

int vfmig_vm_add_device(struct vfmig_vm *vm, struct vfmig_device *dev)
{
    if (vm->ndevices == VFMIG_MAX_DEVICES)
        return vfmig_fail(&vm->err, ENOSPC, "too many devices");
    if (vfmig_vm_find_device(vm, dev->name))
        return vfmig_fail(&vm->err, EEXIST, "device %s already exists", dev->name);
    vm->devices[vm->ndevices++] = dev;
    return 0;
}

struct vfmig_device *vfmig_vm_find_device(struct vfmig_vm *vm, const char *name)
{
    for (uint32_t i = 0; i < vm->ndevices; i++)
        if (strcmp(vm->devices[i]->name, name) == 0)
            return vm->devices[i];
    return NULL;
}

/* A fresh boot: image at VFMIG_CODE_GPA, flat GDT, every vCPU at the entry in 32-bit
 * protected mode with %esi = its id. No BIOS, no INIT/SIPI. */
int vfmig_vm_boot(struct vfmig_vm *vm, const uint8_t *image, size_t len)
{
    if (len == 0 || len > VFMIG_CODE_MAX)
        return vfmig_fail(&vm->err, EINVAL, "guest image of %zu bytes does not fit in %u", len, VFMIG_CODE_MAX);
    memcpy(vm->ram + VFMIG_CODE_GPA, image, len);
    uint64_t *gdt = (uint64_t *)(vm->ram + VFMIG_GDT_GPA);
    gdt[0] = 0;
    gdt[1] = 0x00cf9a000000ffffull; /* code, flat 4 GiB */
    gdt[2] = 0x00cf92000000ffffull; /* data, flat 4 GiB */
    for (uint32_t i = 0; i < vm->nvcpus; i++) {
        int fd = vm->vcpus[i].fd;
        struct kvm_sregs s;
        if (ioctl(fd, KVM_GET_SREGS, &s) < 0)
            return vfmig_fail(&vm->err, errno, "KVM_GET_SREGS: %s", strerror(errno));
        struct kvm_segment seg = {.base = 0, .limit = 0xffffffff, .selector = 8, .present = 1,
                                  .type = 11, .dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1};
        s.cs = seg;
        seg.type = 3;
        seg.selector = 16;
        s.ds = s.es = s.fs = s.gs = s.ss = seg;
        s.cr0 |= 1;
        s.gdt.base = VFMIG_GDT_GPA;
        s.gdt.limit = 23;
        if (ioctl(fd, KVM_SET_SREGS, &s) < 0)
            return vfmig_fail(&vm->err, errno, "KVM_SET_SREGS: %s", strerror(errno));
        struct kvm_regs regs = {.rip = VFMIG_CODE_GPA, .rflags = 2, .rsi = i};
        if (ioctl(fd, KVM_SET_REGS, &regs) < 0)
            return vfmig_fail(&vm->err, errno, "KVM_SET_REGS: %s", strerror(errno));
        /* With the in-kernel LAPIC, APs wait for SIPI unless told they are runnable. */
        struct kvm_mp_state mp = {.mp_state = KVM_MP_STATE_RUNNABLE};
        if (ioctl(fd, KVM_SET_MP_STATE, &mp) < 0)
            return vfmig_fail(&vm->err, errno, "KVM_SET_MP_STATE: %s", strerror(errno));
    }
    return 0;
}

int vfmig_vm_set_dirty_logging(struct vfmig_vm *vm, int on)
{
    for (uint32_t i = 0; i < vm->nslots; i++) {
        uint32_t flags = on ? KVM_MEM_LOG_DIRTY_PAGES : 0;
        if (vm->slots[i].flags == flags)
            continue;
        int r = set_slot(vm, &vm->slots[i], flags);
        if (r < 0)
            return vfmig_fail(&vm->err, -r, "dirty logging %s on slot %u: %s", on ? "on" : "off", i,
                              strerror(-r));
    }
    return 0;
}

int64_t vfmig_vm_gpa_to_page(const struct vfmig_vm *vm, uint64_t gpa)
{
    for (uint32_t i = 0; i < vm->nslots; i++) {
        const struct vfmig_slot *s = &vm->slots[i];
        if (gpa >= s->gpa && gpa - s->gpa < s->size)
            return (int64_t)(s->first_page + (gpa - s->gpa) / VFMIG_PAGE_SIZE);
    }
    return -1;
}

uint64_t vfmig_vm_page_to_gpa(const struct vfmig_vm *vm, uint64_t page)
{
    for (uint32_t i = 0; i < vm->nslots; i++) {
        const struct vfmig_slot *s = &vm->slots[i];
        if (page >= s->first_page && page - s->first_page < s->size / VFMIG_PAGE_SIZE)
            return s->gpa + (page - s->first_page) * VFMIG_PAGE_SIZE;
    }
    return UINT64_MAX;
}

uint8_t *vfmig_vm_host(const struct vfmig_vm *vm, uint64_t gpa, uint64_t len)
{
    for (uint32_t i = 0; i < vm->nslots; i++) {
        const struct vfmig_slot *s = &vm->slots[i];
        if (gpa >= s->gpa && gpa - s->gpa < s->size && len <= s->size - (gpa - s->gpa))
            return vm->ram + s->first_page * VFMIG_PAGE_SIZE + (gpa - s->gpa);
    }
    return NULL;
}

static uint32_t mark_pages(uint64_t map[8], uint64_t from, uint64_t to)
{
    for (uint64_t i = from; i < to; i++)
        map[i / 64] |= 1ull << (i % 64);
    return (uint32_t)(to - from);
}

uint32_t vfmig_vm_data_map(const struct vfmig_vm *vm, uint64_t first, uint32_t n, uint64_t map[8])
{
    memset(map, 0, 8 * sizeof(uint64_t));
    /* Fast path: a page in the memfd's page cache holds data (a hole has no page), so when
     * mincore() finds every page of the range resident, one call answers it. SEEK_HOLE below is
     * the slow part: it walks the page cache from `data` to the first hole, which for a guest
     * that wrote all its RAM is the end of the file, at every call. A pass over 1 GiB (512
     * calls) cost 10 ms with huge pages and 2.9 s with 4 KiB pages here (quadratic in RAM
     * size), and 20-45 ms of the page sender's CPU in an idle 1 GiB migration; mincore, 1 ms.
     * Pages not resident may be holes or data swapped out: such ranges still ask lseek. */
    if (n <= 512) {
        unsigned char vec[512];
        if (mincore(vm->ram + first * VFMIG_PAGE_SIZE, (size_t)n * VFMIG_PAGE_SIZE, vec) == 0) {
            uint32_t resident = 0;
            for (uint32_t i = 0; i < n; i++)
                resident += vec[i] & 1;
            if (resident == n)
                return mark_pages(map, 0, n);
        }
    }
    const off_t base = (off_t)(first * VFMIG_PAGE_SIZE), end = (off_t)((first + n) * VFMIG_PAGE_SIZE);
    uint32_t count = 0;
    for (off_t pos = base; pos < end;) {
        off_t data = lseek(vm->mem_fd, pos, SEEK_DATA);
        if (data < 0 && errno == ENXIO)
            break; /* nothing but hole from pos on */
        if (data < 0) /* no SEEK_DATA here: everything may hold data */
            return count + mark_pages(map, (uint64_t)(pos - base) / VFMIG_PAGE_SIZE, n);
        if (data >= end)
            break;
        off_t hole = lseek(vm->mem_fd, data, SEEK_HOLE);
        if (hole < 0 || hole > end)
            hole = end;
        count += mark_pages(map, (uint64_t)(data - base) / VFMIG_PAGE_SIZE,
                            ((uint64_t)(hole - base) + VFMIG_PAGE_SIZE - 1) / VFMIG_PAGE_SIZE);
        pos = hole;
    }
    return count;
}

void vfmig_vcpus_stop(struct vfmig_vm *vm); /* vcpu.c */

void vfmig_vm_destroy(struct vfmig_vm *vm)
{
    if (!vm)
        return;
    vfmig_vcpus_stop(vm);
    for (uint32_t i = 0; i < vm->ndevices; i++)
        if (vm->devices[i]->destroy)
            vm->devices[i]->destroy(vm->devices[i]);
    vfmig_pci_host_destroy(vm);
    vfmig_irq_destroy(vm->irq);
    for (uint32_t i = 0; i < VFMIG_MAX_VCPUS; i++) {
        struct vfmig_vcpu *cpu = &vm->vcpus[i];
        if (cpu->ring)
            munmap(cpu->ring, (size_t)vm->ring_entries * sizeof(struct kvm_dirty_gfn));
        if (cpu->run)
            munmap(cpu->run, cpu->run_size);
        if (cpu->fd > 0)
            close(cpu->fd);
    }
    if (vm->ram)
        munmap(vm->ram, vm->ram_bytes);
    if (vm->mem_fd >= 0)
        close(vm->mem_fd);
    if (vm->vm_fd >= 0)
        close(vm->vm_fd);
    if (vm->kvm_fd >= 0)
        close(vm->kvm_fd);
    pthread_mutex_destroy(&vm->lock);
    pthread_cond_destroy(&vm->cond);
    free(vm);
}
