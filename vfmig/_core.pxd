# C declarations of the vfmig core, for _core.pyx.
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t


cdef extern from "vfmig/util.h":
    struct vfmig_err:
        char msg[256]
    uint64_t vfmig_now_ns() nogil
    uint64_t vfmig_checkpoint(const char *name) nogil

cdef extern from "vfmig/device.h":
    struct vfmig_device:
        const char *name
        long (*save)(vfmig_device *d, uint8_t *buf, size_t cap) nogil
        int (*load)(vfmig_device *d, const uint8_t *buf, size_t len) nogil

cdef extern from "vfmig/devices.h":
    vfmig_device *vfmig_console_new()
    size_t vfmig_console_read(vfmig_device *d, char *buf, size_t cap)
    vfmig_device *vfmig_clock_new()
    vfmig_device *vfmig_platform_new(int vm_fd)

cdef extern from "vfmig/vm.h":
    enum:
        VFMIG_EXIT__COUNT
        VFMIG_MAX_VCPUS
    struct vfmig_vm_config:
        uint64_t mem_bytes
        uint32_t vcpus
        uint32_t ring_entries
    struct vfmig_vcpu:
        uint32_t id
        uint64_t exits[8]
    struct vfmig_vm:
        int vm_fd
        int mem_fd
        uint8_t *ram
        uint64_t ram_bytes
        uint64_t npages
        uint32_t nvcpus
        uint32_t ndevices
        vfmig_device *devices[16]
        vfmig_vcpu vcpus[8]
        uint64_t last_pause_ns
        uint64_t last_resume_ns
        int failed
        vfmig_err err
        int started
    int vfmig_vm_create(const vfmig_vm_config *cfg, vfmig_vm **out, vfmig_err *err) nogil
    int vfmig_vm_add_device(vfmig_vm *vm, vfmig_device *dev) nogil
    vfmig_device *vfmig_vm_find_device(vfmig_vm *vm, const char *name) nogil
    int vfmig_vm_boot(vfmig_vm *vm, const uint8_t *image, size_t len) nogil
    int vfmig_vm_start(vfmig_vm *vm) nogil
    int vfmig_vm_pause(vfmig_vm *vm) nogil
    int vfmig_vm_resume(vfmig_vm *vm) nogil
    void vfmig_vm_destroy(vfmig_vm *vm) nogil
    int vfmig_vm_set_dirty_logging(vfmig_vm *vm, int on) nogil
    int vfmig_vm_set_throttle(vfmig_vm *vm, int pct) nogil
    uint8_t *vfmig_vm_host(const vfmig_vm *vm, uint64_t gpa, uint64_t len) nogil

cdef extern from "vfmig/vcpu_state.h":
    enum:
        VFMIG_VCPU_STATE_MAX
    long vfmig_vcpu_save(vfmig_vcpu *cpu, uint8_t *buf, size_t cap, vfmig_err *err) nogil
    int vfmig_vcpu_load(vfmig_vcpu *cpu, const uint8_t *buf, size_t len, vfmig_err *err) nogil

cdef extern from "vfmig/ramfile.h":
    int vfmig_ram_save(vfmig_vm *vm, int fd, vfmig_err *err) nogil
    int vfmig_ram_load(vfmig_vm *vm, int fd, vfmig_err *err) nogil
    int64_t vfmig_ram_wrap_edges(vfmig_vm *vm, uint64_t gpa, uint64_t pages, uint32_t width) nogil

cdef extern from "vfmig/refbench.h":
    double vfmig_ref_memcpy(uint64_t bytes, int reps) nogil
    double vfmig_ref_eventfd_rtt(int rounds) nogil
    double vfmig_ref_tcp_loopback(uint64_t bytes) nogil
