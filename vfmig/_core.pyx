# cython: language_level=3, boundscheck=False, wraparound=False
"""Bindings to the vfmig C core. Every call that loops over pages or waits releases the GIL."""
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from vfmig._core cimport *

EXIT_KINDS = ("io", "mmio", "hlt", "intr", "ring_full", "shutdown", "internal", "other")
COMPILED = True  # the test suite asserts it imports this compiled module, not a stand-in


class CoreError(OSError):
    """An error reported by the C core, with its message."""


cdef raise_err(int rc, const char *msg):
    raise CoreError(-rc, msg.decode("utf-8", "replace") or "error")


def now_ns():
    """CLOCK_MONOTONIC in nanoseconds: the clock every vfmig timing uses."""
    return vfmig_now_ns()


def checkpoint(str name):
    """Record a checkpoint: fires the vfmig:checkpoint USDT probe; returns its time in ns."""
    cdef bytes b = name.encode()
    return vfmig_checkpoint(b)


cdef class VM:
    """A KVM VM with memfd RAM, an in-kernel irqchip, vCPU threads and the built-in devices."""
    cdef vfmig_vm *vm

    def __cinit__(self, uint64_t mem_bytes, uint32_t vcpus=1, uint32_t ring_entries=0):
        cdef vfmig_vm_config cfg
        cdef vfmig_err err
        cdef int rc
        cfg.mem_bytes = mem_bytes
        cfg.vcpus = vcpus
        cfg.ring_entries = ring_entries
        err.msg[0] = 0
        with nogil:
            rc = vfmig_vm_create(&cfg, &self.vm, &err)
        if rc < 0:
            self.vm = NULL
            raise_err(rc, err.msg)
        self._add(vfmig_console_new())
        self._add(vfmig_clock_new())
        self._add(vfmig_platform_new(self.vm.vm_fd))

    cdef _add(self, vfmig_device *dev):
        if dev == NULL:
            raise MemoryError()
        cdef int rc = vfmig_vm_add_device(self.vm, dev)
        if rc < 0:
            raise_err(rc, self.vm.err.msg)

    def __dealloc__(self):
        if self.vm != NULL:
            with nogil:
                vfmig_vm_destroy(self.vm)
            self.vm = NULL

    cdef vfmig_vm *_vm(self) except NULL:
        if self.vm == NULL:
            raise ValueError("VM is closed")
        return self.vm

    def close(self):
        """Stop the vCPU threads and free everything. Idempotent."""
        if self.vm != NULL:
            with nogil:
                vfmig_vm_destroy(self.vm)
            self.vm = NULL

    @property
    def ram_bytes(self):
        return self._vm().ram_bytes

    @property
    def npages(self):
        return self._vm().npages

    @property
    def vcpus(self):
        return self._vm().nvcpus

    @property
    def mem_fd(self):
        return self._vm().mem_fd

    @property
    def failed(self):
        """None while healthy; the error message once a vCPU stopped on an error."""
        cdef vfmig_vm *vm = self._vm()
        return vm.err.msg.decode("utf-8", "replace") if vm.failed else None

    def _check(self, int rc):
        if rc < 0:
            raise_err(rc, self._vm().err.msg)

    def boot(self, const uint8_t[::1] image):
        """Load a guest image at 1 MiB and set every vCPU at its entry (fresh boot)."""
        cdef vfmig_vm *vm = self._vm()
        cdef int rc
        with nogil:
            rc = vfmig_vm_boot(vm, &image[0], image.shape[0])
        self._check(rc)

    def write(self, uint64_t gpa, const uint8_t[::1] data):
        """Write a small control structure (boot parameters) into guest RAM."""
        cdef vfmig_vm *vm = self._vm()
        cdef uint8_t *dst = vfmig_vm_host(vm, gpa, data.shape[0])
        if dst == NULL or data.shape[0] > 65536:
            raise ValueError(f"write of {data.shape[0]} bytes at {gpa:#x} is outside RAM")
        memcpy(dst, &data[0], data.shape[0])

    def read(self, uint64_t gpa, uint64_t length):
        """Read a small guest structure (stats page); at most 64 KiB."""
        cdef vfmig_vm *vm = self._vm()
        cdef uint8_t *src = vfmig_vm_host(vm, gpa, length)
        if src == NULL or length > 65536:
            raise ValueError(f"read of {length} bytes at {gpa:#x} is outside RAM")
        return (<char *>src)[:length]

    def start(self):
        cdef vfmig_vm *vm = self._vm()
        cdef int rc
        with nogil:
            rc = vfmig_vm_start(vm)
        self._check(rc)

    def pause(self):
        """Stop every vCPU; returns the pause latency in ns."""
        cdef vfmig_vm *vm = self._vm()
        with nogil:
            vfmig_vm_pause(vm)
        return vm.last_pause_ns

    def resume(self):
        """Restart every vCPU; returns the resume latency in ns."""
        cdef vfmig_vm *vm = self._vm()
        cdef int rc
        with nogil:
            rc = vfmig_vm_resume(vm)
        self._check(rc)
        return vm.last_resume_ns

    def set_throttle(self, int pct):
        cdef vfmig_vm *vm = self._vm()
        cdef int rc
        with nogil:
            rc = vfmig_vm_set_throttle(vm, pct)
        self._check(rc)

    def exits(self):
        """Exit counts per reason, summed over vCPUs."""
        cdef vfmig_vm *vm = self._vm()
        out = dict.fromkeys(EXIT_KINDS, 0)
        for c in range(vm.nvcpus):
            for k in range(VFMIG_EXIT__COUNT):
                out[EXIT_KINDS[k]] += vm.vcpus[c].exits[k]
        return out

    def console(self):
        cdef vfmig_device *d = vfmig_vm_find_device(self._vm(), b"console")
        cdef char buf[65536]
        cdef size_t n = vfmig_console_read(d, buf, sizeof(buf))
        return buf[:n].decode("latin-1")

    def save_vcpu(self, uint32_t index):
        """The complete state of a paused vCPU as an opaque blob."""
        cdef vfmig_vm *vm = self._vm()
        cdef vfmig_err err
        cdef long n
        if index >= vm.nvcpus:
            raise IndexError(index)
        cdef uint8_t *buf = <uint8_t *>malloc(VFMIG_VCPU_STATE_MAX)
        if buf == NULL:
            raise MemoryError()
        try:
            with nogil:
                n = vfmig_vcpu_save(&vm.vcpus[index], buf, VFMIG_VCPU_STATE_MAX, &err)
            if n < 0:
                raise_err(n, err.msg)
            return (<char *>buf)[:n]
        finally:
            free(buf)

    def load_vcpu(self, uint32_t index, const uint8_t[::1] blob):
        cdef vfmig_vm *vm = self._vm()
        cdef vfmig_err err
        cdef int rc
        if index >= vm.nvcpus:
            raise IndexError(index)
        with nogil:
            rc = vfmig_vcpu_load(&vm.vcpus[index], &blob[0], blob.shape[0], &err)
        if rc < 0:
            raise_err(rc, err.msg)

    def device_names(self):
        cdef vfmig_vm *vm = self._vm()
        return [vm.devices[i].name.decode() for i in range(vm.ndevices)]

    def save_device(self, str name):
        """Device state as an opaque blob, or None for a stateless device. vCPUs paused."""
        cdef bytes bname = name.encode()
        cdef vfmig_device *d = vfmig_vm_find_device(self._vm(), bname)
        cdef long n
        cdef uint8_t buf[65536]
        if d == NULL:
            raise KeyError(name)
        if d.save == NULL:
            return None
        with nogil:
            n = d.save(d, buf, sizeof(buf))
        if n < 0:
            raise CoreError(-n, f"save device {name} failed")
        return (<char *>buf)[:n]

    def load_device(self, str name, const uint8_t[::1] blob):
        cdef bytes bname = name.encode()
        cdef vfmig_device *d = vfmig_vm_find_device(self._vm(), bname)
        cdef int rc
        if d == NULL:
            raise KeyError(f"stream carries state for unknown device {name!r}")
        if d.load == NULL:
            raise ValueError(f"device {name!r} takes no state")
        with nogil:
            rc = d.load(d, &blob[0], blob.shape[0])
        if rc < 0:
            raise CoreError(-rc, f"device {name} rejected its state")

    def save_ram(self, int fd):
        """Write RAM to fd as a sparse image (cold migration)."""
        cdef vfmig_vm *vm = self._vm()
        cdef vfmig_err err
        cdef int rc
        with nogil:
            rc = vfmig_ram_save(vm, fd, &err)
        if rc < 0:
            raise_err(rc, err.msg)

    def load_ram(self, int fd):
        cdef vfmig_vm *vm = self._vm()
        cdef vfmig_err err
        cdef int rc
        with nogil:
            rc = vfmig_ram_load(vm, fd, &err)
        if rc < 0:
            raise_err(rc, err.msg)

    def wrap_edges(self, uint64_t gpa, uint64_t pages, uint32_t width=1):
        """Steps in the per-page counter over a range: a sequential dirtier leaves at most one."""
        cdef vfmig_vm *vm = self._vm()
        cdef int64_t n
        with nogil:
            n = vfmig_ram_wrap_edges(vm, gpa, pages, width)
        if n < 0:
            raise ValueError("range outside RAM")
        return n


# Reference measurements for benchmark ratios -------------------------------------------------
def ref_memcpy(uint64_t nbytes=256 << 20, int reps=4):
    """memcpy bandwidth in bytes/s."""
    cdef double r
    with nogil:
        r = vfmig_ref_memcpy(nbytes, reps)
    return r


def ref_eventfd_rtt(int rounds=50000):
    """Mean eventfd ping-pong round trip between two threads, ns."""
    cdef double r
    with nogil:
        r = vfmig_ref_eventfd_rtt(rounds)
    return r


def ref_tcp_loopback(uint64_t nbytes=2 << 30):
    """Loopback TCP throughput, one stream, bytes/s."""
    cdef double r
    with nogil:
        r = vfmig_ref_tcp_loopback(nbytes)
    return r
