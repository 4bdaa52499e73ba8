# cython: language_level=3, boundscheck=False, wraparound=False
"""Bindings to the vfmig C core. Every call that loops over pages or waits releases the GIL."""
from libc.errno cimport EBUSY, EINVAL, ENOENT, ENOMSG, errno
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from vfmig._core cimport *

EXIT_KINDS = ("io", "mmio", "hlt", "intr", "ring_full", "shutdown", "internal", "other")
COMPILED = True  # the test suite asserts it imports this compiled module, not a stand-in
PAUSE_TIMEOUT_MS_DEFAULT = VFMIG_PAUSE_TIMEOUT_MS_DEFAULT
PAUSE_TIMEOUT_MS_MAX = VFMIG_PAUSE_TIMEOUT_MS_MAX


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


cdef dict _unthrottle_dict(vfmig_unthrottle *out):
    return {"woken": out.woken, "late": out.late, "longest_sleep_ms": out.longest_sleep_ns / 1e6}


cdef class VM:
    """A KVM VM with memfd RAM, an in-kernel irqchip, vCPU threads and the built-in devices."""
    cdef vfmig_vm *vm
    cdef public uint64_t pause_checkpoint_ns  # the time of pause()'s checkpoint; 0: none
    cdef public dict pause_unthrottle  # what pause()'s unthrottle did

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
        self._add(vfmig_clock_new("clock", VFMIG_SPACE_PIO, VFMIG_PORT_CLOCK_LO))
        self._add(vfmig_clock_new("clock-mmio", VFMIG_SPACE_MMIO, VFMIG_MMIO_CLOCK))
        self._add(vfmig_platform_new(self.vm.vm_fd))

    cdef _add(self, vfmig_device *dev):
        if dev == NULL:
            raise MemoryError()
        cdef int rc = vfmig_vm_add_device(self.vm, dev)
        if rc < 0:
            raise_err(rc, self.vm.err.msg)

    def __dealloc__(self):
        self.close()

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

    @property
    def pause_requested(self):
        """Whether a pause has asked the vCPUs to stop (and not yet let them go)."""
        return bool(self._vm().pause_req)

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

    def pause(self, uint32_t timeout_ms=VFMIG_PAUSE_TIMEOUT_MS_DEFAULT, str checkpoint=None,
              uint32_t unthrottle_ms=0):
        """Stop every vCPU within timeout_ms; returns the pause latency in ns. On a timeout
        (CoreError ETIMEDOUT) every vCPU was let go again: the VM keeps running.
        unthrottle_ms: first unthrottle() (its result in self.pause_unthrottle). checkpoint: a
        name recorded right before the kick; self.pause_checkpoint_ns is when the last vCPU
        left its guest, no earlier than that mark and no later than the kicks. All in one
        GIL-free block: from Python, each step could wait out another thread's GIL slice (5 ms)
        while the guest runs on, unthrottled, dirtying pages the last round did not count."""
        cdef vfmig_vm *vm = self._vm()
        cdef int rc = 0
        cdef bytes name = checkpoint.encode() if checkpoint is not None else b""
        cdef const char *cname = name
        cdef bint mark = checkpoint is not None
        cdef uint64_t t = 0
        cdef vfmig_unthrottle out
        out.woken = out.late = 0
        out.longest_sleep_ns = 0
        with nogil:
            if unthrottle_ms:
                rc = vfmig_vm_unthrottle(vm, unthrottle_ms, &out)
            if rc == 0:
                if mark:
                    t = vfmig_checkpoint(cname)
                rc = vfmig_vm_pause(vm, timeout_ms)
        self.pause_checkpoint_ns = max(t, vm.pause_stopped_ns) if mark and rc == 0 else t
        self.pause_unthrottle = _unthrottle_dict(&out)
        self._check(rc)
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

    def unthrottle(self, uint32_t timeout_ms=10):
        """Throttle off, throttle sleeps cut short, and each vCPU let run guest code again (one
        exit; two after a sleep; at most timeout_ms). Returns {woken, late, longest_sleep_ms}."""
        cdef vfmig_vm *vm = self._vm()
        cdef vfmig_unthrottle out
        cdef int rc
        with nogil:
            rc = vfmig_vm_unthrottle(vm, timeout_ms, &out)
        self._check(rc)
        return _unthrottle_dict(&out)

    def exits(self):
        """Exit counts per reason, summed over vCPUs."""
        cdef vfmig_vm *vm = self._vm()
        out = dict.fromkeys(EXIT_KINDS, 0)
        for c in range(vm.nvcpus):
            for k in range(VFMIG_EXIT__COUNT):
                out[EXIT_KINDS[k]] += vm.vcpus[c].exits[k]
        return out

    def vcpu_tids(self):
        """Kernel thread id of each vCPU's thread, by index (0 before start), for tracers."""
        cdef vfmig_vm *vm = self._vm()
        return [vm.vcpus[c].tid for c in range(vm.nvcpus)]

    def throttle_states(self):
        """Per vCPU: (due, asleep): the throttle has asked it to sleep at its next chance; it
        is in a throttle sleep now."""
        cdef vfmig_vm *vm = self._vm()
        return [(bool(vm.vcpus[c].throttle_due), vm.vcpus[c].throttle_sleep_since_ns != 0) for c in range(vm.nvcpus)]

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

    def stateful_devices(self):
        """Devices with state to migrate through save/load (a save hook and no migration state
        machine: those migrate through mig_read/mig_write)."""
        cdef vfmig_vm *vm = self._vm()
        return [vm.devices[i].name.decode() for i in range(vm.ndevices)
                if vm.devices[i].save != NULL and vm.devices[i].mig == NULL]

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
        if d.save == NULL or d.mig != NULL:
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
        if d.load == NULL or d.mig != NULL:
            raise ValueError(f"device {name!r} takes no state in a DEVICE record")
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

    def page_gpa(self, uint64_t page):
        """The guest-physical address of RAM page index `page` (as page_crcs() numbers them)."""
        cdef vfmig_vm *vm = self._vm()
        if page >= vm.npages:
            raise ValueError(f"page {page} is outside RAM")
        return vfmig_vm_page_to_gpa(vm, page)

    @property
    def first_run_ns(self):
        """CLOCK_MONOTONIC ns when a vCPU first entered the guest (0 before that)."""
        return self._vm().first_run_ns

    def add_dma_engine(self, str name):
        """Add a DMA engine device whose writes are logged for dirty tracking."""
        cdef bytes b = name.encode()
        self._add(vfmig_dma_engine_new(self._vm(), b))

    def dma_fill(self, str name, uint64_t gpa, uint8_t value, uint64_t length):
        """A device DMA write: fill guest RAM from the host side and log the pages. False while
        the VM is stopped (a stopped device does no DMA)."""
        cdef bytes b = name.encode()
        cdef vfmig_device *d = vfmig_vm_find_device(self._vm(), b)
        cdef int rc
        if d == NULL:
            raise KeyError(name)
        with nogil:
            rc = vfmig_dma_fill(d, gpa, value, length)
        if rc == -16:  # EBUSY
            return False
        if rc < 0:
            raise ValueError(f"DMA to {gpa:#x}+{length} is outside RAM")
        return True

    cdef vfmig_device *_clock(self, str name) except NULL:
        cdef bytes b = name.encode()
        cdef vfmig_device *d = vfmig_vm_find_device(self._vm(), b)
        if d == NULL:
            raise KeyError(name)
        return d

    def hold_clock(self, str name, uint32_t vcpus=VFMIG_MAX_VCPUS):
        """Test knob: the next accesses to this clock device from up to `vcpus` vCPUs block
        inside the access (a vCPU stuck in a device); 0 releases them."""
        if vfmig_clock_hold(self._clock(name), vcpus) < 0:
            raise ValueError(f"{name} is not a clock device")

    def wait_clock_held(self, str name, uint32_t count=1, uint32_t timeout_ms=10000):
        """Wait until `count` vCPUs are blocked by hold_clock; False on timeout."""
        cdef vfmig_device *d = self._clock(name)
        cdef int rc
        with nogil:
            rc = vfmig_clock_wait_held(d, count, timeout_ms)
        if rc == -22:  # EINVAL
            raise ValueError(f"{name} is not a clock device")
        return rc == 0

    # Device migration in the VFIO v2 model (migstate.h): any device with d->mig ---------------
    cdef vfmig_device *_dev(self, str name) except NULL:
        cdef bytes b = name.encode()
        cdef vfmig_device *d = vfmig_vm_find_device(self._vm(), b)
        if d == NULL:
            raise KeyError(f"no device named {name!r}")
        return d

    cdef vfmig_migration *_mig(self, str name) except NULL:
        cdef vfmig_device *d = self._dev(name)
        if d.mig == NULL:
            raise ValueError(f"device {name!r} has no migration state machine")
        return d.mig

    def mig_devices(self):
        """Devices that migrate through the state machine (d->mig), in bus order."""
        cdef vfmig_vm *vm = self._vm()
        return [vm.devices[i].name.decode() for i in range(vm.ndevices) if vm.devices[i].mig != NULL]

    def mig_precopy_supported(self, str name):
        """The device offers PRE_COPY (VFMIG_MIGF_PRE_COPY)."""
        return bool(self._mig(name).flags & VFMIG_MIGF_PRE_COPY)

    def mig_state(self, str name):
        """The device's migration state: "RUNNING", "PRE_COPY", ... (MIG_STATES)."""
        cdef vfmig_migration *m = self._mig(name)
        return vfmig_mig_state_name(vfmig_mig_get_state(m)).decode()

    def mig_set_state(self, str name, str state):
        """Move the device to `state` (every arc on the way). CoreError with the device's reason;
        a failed transition leaves it in ERROR (mig_reset leaves ERROR)."""
        cdef vfmig_migration *m = self._mig(name)
        cdef vfmig_err err
        cdef int rc
        cdef vfmig_mig_state target
        if state not in _MIG_STATE_VALUES:
            raise ValueError(f"unknown migration state {state!r}: one of {', '.join(MIG_STATES)}")
        target = <vfmig_mig_state>_MIG_STATE_VALUES[state]
        err.msg[0] = 0
        with nogil:
            rc = vfmig_mig_set_state(m, target, &err)
        if rc < 0:
            raise_err(rc, err.msg)

    def mig_can_reach(self, str name, str state):
        """Whether the state machine has a path from the device's current state to `state`
        (the kernel's next-state rule): asking for one it has not puts the device in ERROR, so
        a caller that must keep the device's state checks first. Asks the device nothing."""
        cdef vfmig_migration *m = self._mig(name)
        cdef vfmig_mig_state nxt
        if state not in _MIG_STATE_VALUES:
            raise ValueError(f"unknown migration state {state!r}: one of {', '.join(MIG_STATES)}")
        cur = vfmig_mig_get_state(m)
        if <int>cur == _MIG_STATE_VALUES[state]:
            return True
        return vfmig_mig_next_state(m.flags, cur, <vfmig_mig_state>_MIG_STATE_VALUES[state], &nxt) == 0

    def mig_read(self, str name, size_t cap):
        """Up to cap bytes of the device's data stream (PRE_COPY or STOP_COPY). None: PRE_COPY
        has nothing more for now; b"": the STOP_COPY stream is complete."""
        cdef vfmig_migration *m = self._mig(name)
        cdef vfmig_err err
        cdef long n
        if cap == 0:
            raise ValueError("mig_read needs a capacity of at least one byte")
        cdef uint8_t *buf = <uint8_t *>malloc(cap)
        if buf == NULL:
            raise MemoryError()
        err.msg[0] = 0
        try:
            with nogil:
                n = vfmig_mig_read(m, buf, cap, &err)
            if n == -ENOMSG:
                return None
            if n < 0:
                raise_err(n, err.msg)
            return (<char *>buf)[:n]
        finally:
            free(buf)

    def mig_write(self, str name, const uint8_t[::1] data):
        """Feed a RESUMING device the next piece of its stream (any split is valid)."""
        cdef vfmig_migration *m = self._mig(name)
        cdef vfmig_err err
        cdef long n
        cdef size_t length = data.shape[0]
        cdef const uint8_t *p = &data[0] if length else NULL
        err.msg[0] = 0
        with nogil:
            n = vfmig_mig_write(m, p, length, &err)
        if n < 0:
            raise_err(n, err.msg)

    def mig_precopy_info(self, str name):
        """(initial bytes not yet read, bytes dirtied since read), in a PRE_COPY state."""
        cdef vfmig_migration *m = self._mig(name)
        cdef vfmig_err err
        cdef uint64_t initial = 0, dirty = 0
        cdef int rc
        err.msg[0] = 0
        with nogil:
            rc = vfmig_mig_precopy_info(m, &initial, &dirty, &err)
        if rc < 0:
            raise_err(rc, err.msg)
        return initial, dirty

    def mig_reset(self, str name):
        """Back to RUNNING from any state, ERROR included (a function-level reset)."""
        cdef vfmig_migration *m = self._mig(name)
        cdef vfmig_err err
        cdef int rc
        err.msg[0] = 0
        with nogil:
            rc = vfmig_mig_reset(m, &err)
        if rc < 0:
            raise_err(rc, err.msg)

    def mig_prestop(self, str name, uint64_t deadline_ms, uint64_t until_ns=0):
        """The device's pre-stop hook (the guest handshake), called while the vCPUs still run;
        it returns by the deadline whatever the guest does: deadline_ms from now, or until_ns
        (CLOCK_MONOTONIC, as now_ns()) when given, so that several devices share one deadline.
        deadline_ms 0 without until_ns: the guest is not asked (outcome disabled). Returns
        {outcome (one of HS_OUTCOMES), latency_us, start_ns, end_ns}. CoreError with the
        device's reason."""
        cdef vfmig_migration *m = self._mig(name)
        cdef vfmig_err err
        cdef vfmig_prestop_result res
        cdef int rc
        cdef uint64_t deadline = until_ns
        if not deadline and deadline_ms:
            deadline = vfmig_now_ns() + deadline_ms * 1000000
        err.msg[0] = 0
        with nogil:
            rc = vfmig_mig_prestop(m, deadline, &res, &err)
        if rc < 0:
            raise_err(rc, err.msg)
        return {"outcome": vfmig_hs_outcome_name(res.outcome).decode(), "latency_us": res.latency_us,
                "start_ns": res.start_ns, "end_ns": res.end_ns}

    def mig_prestop_abort(self, str name):
        """The migration failed after the pre-stop hook: the device tells the guest it runs on."""
        cdef vfmig_migration *m = self._mig(name)
        with nogil:
            vfmig_mig_prestop_abort(m)

    # The PCI function of a simvf (pci.h): config space and the migration capability ------------
    cdef vfmig_pci_func *_pci(self, str name) except NULL:
        return <vfmig_pci_func *>self._simvf(name)  # its vfmig_device is the function's first member

    def handshake_state(self, str name):
        """The guest handshake as the device holds it: outcome (HS_OUTCOMES) and latency_us, what
        the source's last handshake recorded (LATE once the VM stopped after a late ack) or what
        the destination loaded; the capability's registers: vmm_status, dev_status, enabled (the
        driver enabled the capability), vector; migrated and reset_required (VMM status bits,
        what the destination told its driver); capability: False without migration=on."""
        cdef vfmig_pci_func *f = self._pci(name)
        cdef uint32_t outcome, latency
        cdef uint8_t ctrl, irq, vmm, dev
        with nogil:
            # Written by the hooks this thread called (prestop, the stop, load), never behind its back.
            outcome, latency = f.hs.outcome, f.hs.latency_us
            ctrl = vfmig_pci_migcap_reg(f, VFMIG_MIGCAP_CTRL)
            irq = vfmig_pci_migcap_reg(f, VFMIG_MIGCAP_IRQ)
            vmm = vfmig_pci_migcap_reg(f, VFMIG_MIGCAP_VMM_STATUS)
            dev = vfmig_pci_migcap_reg(f, VFMIG_MIGCAP_DEV_STATUS)
        return {"outcome": vfmig_hs_outcome_name(outcome).decode(), "latency_us": latency, "vmm_status": vmm,
                "dev_status": dev, "enabled": bool(ctrl & VFMIG_MIGCAP_ENABLE), "vector": irq,
                "migrated": bool(vmm & VFMIG_VMM_MIGRATED), "reset_required": bool(vmm & VFMIG_VMM_RESET_REQUIRED),
                "capability": f.migcap != 0}

    def migcap_offset(self, str name):
        """Config-space offset of the migration capability (0: migration=off); it spans
        MIGCAP_SIZE bytes."""
        return self._pci(name).migcap

    def pci_config(self, str name):
        """The function's whole config space as the guest reads it (VFMIG_PCI_CONFIG_SIZE bytes)."""
        cdef vfmig_pci_func *f = self._pci(name)
        cdef uint8_t buf[VFMIG_PCI_CONFIG_SIZE]
        cdef uint32_t off, v
        with nogil:
            for off in range(0, VFMIG_PCI_CONFIG_SIZE, 4):
                v = vfmig_pci_config_read(f, off, 4)
                memcpy(&buf[off], &v, 4)
        return buf[:VFMIG_PCI_CONFIG_SIZE]

    def pci_config_write(self, str name, uint32_t off, uint32_t value, uint32_t size=1):
        """Test use: a guest's config write to the function (size 1, 2 or 4 at off < 0x100), through the
        PCI host's port hook as a vCPU's exit would take it (CONFIG_ADDRESS, then CONFIG_DATA),
        with the guest's write masks. The CONFIG_ADDRESS latch is the guest's: call it only while
        the guest makes no config access."""
        cdef vfmig_pci_func *f = self._pci(name)
        cdef vfmig_device *host = self._dev("pci-host")
        cdef uint32_t latch = 0x80000000u | (<uint32_t>f.devfn << 8) | (off & 0xFCu)
        cdef uint8_t data[4]
        cdef int rc
        if size not in (1, 2, 4) or (off & 3) + size > 4 or off > 0xFF:
            raise ValueError(f"bad config access: {size} byte(s) at {off:#x} (ports reach bytes 0..0xFF)")
        memcpy(data, &latch, 4)
        with nogil:
            rc = host.access(host, NULL, VFMIG_PCI_CONFIG_ADDR, data, 4, 1)
            if rc == 0:
                memcpy(data, &value, 4)
                rc = host.access(host, NULL, VFMIG_PCI_CONFIG_DATA + (off & 3), data, size, 1)
        if rc < 0:
            raise CoreError(-rc, f"config write to {name!r} at {off:#x} failed")

    # MSI-X of a PCI function (pci.h), for observing and driving interrupts ----------------------
    cdef vfmig_pci_func *_msix(self, str name) except NULL:
        """_pci's lookup, with ValueError for a name no device has (not _dev's KeyError) and for
        a device that is no PCI function with MSI-X."""
        cdef vfmig_pci_func *f
        self._vm()  # a closed VM says so, not that the device is missing
        try:
            f = self._pci(name)
        except KeyError:
            raise ValueError(f"no device named {name!r}") from None
        except ValueError:
            raise ValueError(f"device {name!r} is not a PCI function with MSI-X") from None
        if vfmig_pci_msix_counts(f, NULL, 0) == 0:
            raise ValueError(f"device {name!r} is not a PCI function with MSI-X")
        return f

    def msix_counts(self, str name):
        """Messages each MSI-X vector of the function sent (irqfd writes), by vector."""
        cdef vfmig_pci_func *f = self._msix(name)
        cdef uint64_t counts[VFMIG_PCI_MSIX_MAX]
        cdef uint32_t n = vfmig_pci_msix_counts(f, counts, VFMIG_PCI_MSIX_MAX)
        return [counts[v] for v in range(n)]

    def msix_raise(self, str name, entry):
        """Test knob: the device raises MSI-X vector entry, as its own interrupt path does. True
        if the message was sent now, False if it was left pending (masked, MSI-X off)."""
        cdef vfmig_pci_func *f = self._msix(name)
        cdef uint32_t n = vfmig_pci_msix_counts(f, NULL, 0)
        cdef uint32_t vec
        cdef int rc
        if not 0 <= entry < n:  # any int: a huge one is a bad entry too, not an OverflowError
            raise ValueError(f"device {name!r} has no MSI-X vector {entry}: it has {n} (0..{n - 1})")
        vec = entry
        with nogil:
            rc = vfmig_pci_msix_notify(f, vec)  # takes msix_lock; -EINVAL excluded above
        return rc == 1

    # simvf, the emulated NIC VF (devices.h) ---------------------------------------------------
    def add_simvf(self, str name, uint64_t state_bytes, uint32_t dma_rate, bint precopy=True,
                  bint migration=True):
        """Create a simvf on the VM's PCI bus (before the VM starts). CoreError with the reason."""
        cdef bytes b = name.encode()
        cdef const char *cname = b
        cdef vfmig_simvf_config cfg
        cdef vfmig_err err
        cdef vfmig_device *d
        cdef vfmig_vm *vm = self._vm()
        cfg.state_bytes = state_bytes
        cfg.dma_rate = dma_rate
        cfg.precopy = precopy
        cfg.migration = migration
        err.msg[0] = 0
        with nogil:
            d = vfmig_simvf_new(vm, cname, &cfg, &err)
        if d == NULL:
            raise CoreError(errno or EINVAL, err.msg.decode("utf-8", "replace") or f"cannot create simvf {name!r}")

    cdef vfmig_device *_simvf(self, str name) except NULL:
        cdef vfmig_device *d = self._dev(name)
        if vfmig_simvf_state_size(d) == 0:  # pure: 0 for any device that is not a simvf
            raise ValueError(f"device {name!r} is not a simvf")
        return d

    def simvf_counters(self, str name):
        """The device's counters: sent (offered by the wire) = delivered + dropped, tx_ok,
        tx_bad, table_updates, interrupts."""
        cdef vfmig_device *d = self._simvf(name)
        cdef simvf_counters c
        cdef int rc
        with nogil:
            rc = vfmig_simvf_counters(d, &c)
        if rc < 0:
            raise ValueError(f"device {name!r} is not a simvf")
        return {"sent": c.sent, "delivered": c.delivered, "dropped": c.dropped, "tx_ok": c.tx_ok,
                "tx_bad": c.tx_bad, "table_updates": c.table_updates, "interrupts": c.interrupts}

    def simvf_set_rate(self, str name, uint32_t pps):
        """The wire's rate in packets/s; 0 stops it."""
        cdef vfmig_device *d = self._simvf(name)
        cdef int rc
        if pps > VFMIG_SIMVF_RATE_MAX:
            raise ValueError(f"simvf rate must be 0..{VFMIG_SIMVF_RATE_MAX} packets/s, got {pps}")
        with nogil:
            rc = vfmig_simvf_set_rate(d, pps)
        if rc < 0:
            raise CoreError(-rc, f"cannot set the rate of {name!r}")

    def simvf_state(self, str name):
        """The device's whole state as its canonical stop-copy stream (device not running)."""
        return self._simvf_bytes(name, False)

    def simvf_stop_state(self, str name):
        """The copy simvf_keep_stop_state kept when the device entered STOP_COPY."""
        return self._simvf_bytes(name, True)

    cdef bytes _simvf_bytes(self, str name, bint at_stop):
        cdef vfmig_device *d = self._simvf(name)
        cdef size_t cap = vfmig_simvf_state_size(d)
        cdef long n
        cdef uint8_t *buf = <uint8_t *>malloc(cap if cap else 1)
        if buf == NULL:
            raise MemoryError()
        try:
            with nogil:
                n = vfmig_simvf_stop_state(d, buf, cap) if at_stop else vfmig_simvf_state(d, buf, cap)
            if n == -EBUSY:
                raise CoreError(EBUSY, f"simvf {name!r} is running: its state is read only while it is stopped")
            if n == -ENOENT:
                raise CoreError(ENOENT, f"simvf {name!r} kept no stop state (simvf_keep_stop_state first)")
            if n < 0:
                raise CoreError(-n, f"cannot read the {'stop ' if at_stop else ''}state of simvf {name!r}")
            return (<char *>buf)[:n]
        finally:
            free(buf)

    def simvf_keep_stop_state(self, str name, bint on):
        """Test knob: keep a copy of simvf_state taken when the device enters STOP_COPY."""
        cdef vfmig_device *d = self._simvf(name)
        cdef int keep = 1 if on else 0
        cdef int rc
        with nogil:
            rc = vfmig_simvf_keep_stop_state(d, keep)
        if rc < 0:
            raise CoreError(-rc, f"cannot keep the stop state of {name!r}")

    def simvf_guest_stats(self):
        """The VF driver's counters (struct simvf_guest_stats at SIMVF_GUEST_STATS_GPA in guest
        RAM), with its part in the migration handshake (mig_notices, acks, resets,
        resumed_in_place, cancels, ...). `magic` equals SIMVF_GUEST_MAGIC once the driver started."""
        cdef vfmig_vm *vm = self._vm()
        cdef simvf_guest_stats s
        cdef uint8_t *src = vfmig_vm_host(vm, SIMVF_GUEST_STATS_GPA, sizeof(simvf_guest_stats))
        if src == NULL:
            raise ValueError("the guest stats page is outside RAM")
        memcpy(&s, src, sizeof(s))
        return {"magic": s.magic, "state": s.state, "received": s.received, "dropped_seen": s.dropped_seen,
                "errors": s.errors, "next_seq": s.next_seq, "last_drops": s.last_drops, "tx_sent": s.tx_sent,
                "interrupts": s.interrupts, "bdf": s.bdf, "first_error": s.first_error,
                "mig_notices": s.mig_notices, "acks": s.acks, "resets": s.resets,
                "resumed_in_place": s.resumed_in_place, "cancels": s.cancels, "resync_skipped": s.resync_skipped,
                "last_vmm_status": s.last_vmm_status, "quiesced": s.quiesced,
                "reset_discarded": s.reset_discarded}

    def dma_pages_logged(self, str name):
        """Pages the device's DMA dirty log reported since logging last started; None without
        a DMA log."""
        cdef vfmig_device *d = self._dev(name)
        return None if d.dma_log == NULL else d.dma_log.pages_logged

    def set_dma_log_broken(self, str name, bint on):
        """Test knob: the device's DMA dirty log drops its marks (proves the log matters)."""
        cdef vfmig_device *d = self._dev(name)
        if d.dma_log == NULL:
            raise ValueError(f"device {name!r} has no DMA dirty log")
        d.dma_log.broken = 1 if on else 0

    def page_crcs(self):
        """CRC32C of every RAM page (4 bytes each): the verification digest."""
        cdef vfmig_vm *vm = self._vm()
        cdef bytearray out = bytearray(vm.npages * 4)
        cdef unsigned char[::1] view = out
        with nogil:
            vfmig_ram_page_crcs(vm, <uint32_t *>&view[0])
        return bytes(out)

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


def ref_tcp_loopback(uint64_t nbytes=2 << 30, unsigned streams=1):
    """Loopback TCP throughput over `streams` parallel connections, bytes/s in all, between
    cache-hot 1 MiB buffers; -errno on failure."""
    cdef double r
    with nogil:
        r = vfmig_ref_tcp_loopback(nbytes, streams)
    return r


def ref_tcp_loopback_ram(uint64_t nbytes=1 << 30, unsigned streams=1):
    """Loopback TCP throughput over `streams` parallel connections, bytes/s in all, moving nbytes
    of RAM (a memfd with every page present) into a fresh memfd of the same size, each stream its
    own slice, as a migration moves guest RAM; -errno on failure."""
    cdef double r
    with nogil:
        r = vfmig_ref_tcp_loopback_ram(nbytes, streams)
    return r


# The stream: record framing for the control channel ------------------------------------------
STREAM_VERSION = VFMIG_STREAM_VERSION
ZSTD_LEVEL_MAX = VFMIG_ZSTD_LEVEL_MAX
TOKEN_LEN = VFMIG_TOKEN_LEN
CTRL_MAX = VFMIG_CTRL_MAX
MAX_CHANNELS = VFMIG_MAX_CHANNELS
MAX_VCPUS = VFMIG_MAX_VCPUS
REC = {vfmig_rec_name(i).decode(): i for i in range(1, VFMIG_REC__COUNT)}
REC_HEADER_LEN = sizeof(vfmig_rec_hdr)


class StreamError(CoreError):
    """A malformed, corrupt or truncated stream, or a peer that went away."""


def crc32c(const uint8_t[::1] data, uint32_t crc=0):
    cdef uint32_t r
    with nogil:
        r = vfmig_crc32c(crc, &data[0] if data.shape[0] else NULL, data.shape[0])
    return r


def crc32c_impl():
    """The CRC32C loop this CPU runs: "fold" (VPCLMULQDQ) or "lanes" (the crc32 instruction)."""
    return vfmig_crc32c_impl().decode()


def rec_name(uint32_t rtype):
    return vfmig_rec_name(rtype).decode()


def encode_record(uint16_t rtype, const uint8_t[::1] payload):
    """Header + payload, sealed with its CRC32C."""
    cdef vfmig_rec_hdr h
    cdef size_t n = payload.shape[0]
    vfmig_rec_seal(&h, rtype, &payload[0] if n else NULL, n, NULL, 0)
    return (<char *>&h)[:sizeof(h)] + bytes(payload)


def check_header(const uint8_t[::1] raw, uint32_t max_len):
    """Validate a received 16-byte header; returns (type, payload_len)."""
    cdef vfmig_rec_hdr h
    cdef vfmig_err err
    if raw.shape[0] != sizeof(h):
        raise StreamError(71, "short record header")
    memcpy(&h, &raw[0], sizeof(h))
    cdef int rc = vfmig_rec_check_hdr(&h, max_len, &err)
    if rc < 0:
        raise StreamError(-rc, err.msg.decode())
    return h.type, h.len


def check_crc(const uint8_t[::1] raw_hdr, const uint8_t[::1] payload):
    cdef vfmig_rec_hdr h
    cdef vfmig_err err
    memcpy(&h, &raw_hdr[0], sizeof(h))
    cdef int rc = vfmig_rec_check_crc(&h, &payload[0] if payload.shape[0] else NULL, &err)
    if rc < 0:
        raise StreamError(-rc, err.msg.decode())


# HELLO and CHANNEL, the session openers (csrc/hello.c) ----------------------------------------
HELLO_LEN = VFMIG_HELLO_LEN
CHANNEL_LEN = VFMIG_CHANNEL_LEN
HELLO_VERIFY = VFMIG_HELLO_VERIFY
CONFIG_MAX = VFMIG_CONFIG_MAX


cdef const uint8_t *_token(const uint8_t[::1] token) except NULL:
    if token.shape[0] != VFMIG_TOKEN_LEN:
        raise ValueError(f"a session token is {VFMIG_TOKEN_LEN} bytes, not {token.shape[0]}")
    return &token[0]


def encode_hello(uint16_t version, uint16_t channels, uint64_t mem_bytes, uint32_t vcpus, uint32_t flags,
                 const uint8_t[::1] token, uint32_t config_len):
    """The HELLO header (HELLO_LEN bytes); the config_len bytes of JSON config follow it."""
    cdef vfmig_hello h
    vfmig_hello_encode(&h, version, channels, mem_bytes, vcpus, flags, _token(token), config_len)
    return (<char *>&h)[:sizeof(h)]


def decode_hello(const uint8_t[::1] raw):
    """Check a HELLO payload; returns (version, channels, mem_bytes, vcpus, flags, token,
    config_len), the config being raw[HELLO_LEN:]. StreamError with the reason otherwise."""
    cdef vfmig_hello h
    cdef vfmig_err err
    cdef int rc = vfmig_hello_decode(&raw[0] if raw.shape[0] else NULL, raw.shape[0], &h, &err)
    if rc < 0:
        raise StreamError(-rc, err.msg.decode())
    return h.version, h.channels, h.mem_bytes, h.vcpus, h.flags, (<char *>h.token)[:VFMIG_TOKEN_LEN], h.config_len


def encode_channel(const uint8_t[::1] token, uint16_t index):
    """The CHANNEL opener of page channel `index`."""
    cdef vfmig_channel_hello c
    vfmig_channel_encode(&c, _token(token), index)
    return (<char *>&c)[:sizeof(c)]


def decode_channel(const uint8_t[::1] raw):
    """Check a CHANNEL payload; returns (token, index). StreamError with the reason otherwise."""
    cdef vfmig_channel_hello c
    cdef vfmig_err err
    cdef int rc = vfmig_channel_decode(&raw[0] if raw.shape[0] else NULL, raw.shape[0], &c, &err)
    if rc < 0:
        raise StreamError(-rc, err.msg.decode())
    return (<char *>c.token)[:VFMIG_TOKEN_LEN], c.index


def count_mismatches(const uint8_t[::1] a, const uint8_t[::1] b):
    """Pages whose CRCs differ between two page_crcs() digests."""
    if a.shape[0] != b.shape[0]:
        raise ValueError("digests of different RAM sizes")
    cdef const uint32_t *x = <const uint32_t *>&a[0]
    cdef const uint32_t *y = <const uint32_t *>&b[0]
    cdef size_t i, n = a.shape[0] // 4, bad = 0
    with nogil:
        for i in range(n):
            if x[i] != y[i]:
                bad += 1
    return bad


cdef list _fd_list(fds):
    fds = list(fds)
    if not 1 <= len(fds) <= VFMIG_MAX_CHANNELS:
        raise ValueError(f"channels must be 1..{VFMIG_MAX_CHANNELS}")
    return fds


cdef class PageSender:
    """Source side: the dirty tracker, its bitmap, and the page channels."""
    cdef vfmig_sender s
    cdef vfmig_tracker *t
    cdef uint64_t *bits
    cdef VM vm
    cdef int ready
    cdef readonly uint64_t last_dirty

    def __cinit__(self, VM vm, fds, uint64_t bandwidth=0):
        cdef int cfds[16]
        cdef vfmig_err err
        fds = _fd_list(fds)
        for i, fd in enumerate(fds):
            cfds[i] = fd
        self.vm = vm
        cdef int rc = vfmig_sender_init(&self.s, vm._vm(), cfds, len(fds), &err)
        if rc < 0:
            raise_err(rc, err.msg)
        self.ready = 1
        self.s.bandwidth = bandwidth
        self.bits = <uint64_t *>malloc(((vm._vm().npages + 63) // 64) * 8)
        if self.bits == NULL:
            raise MemoryError()

    def __dealloc__(self):
        self.close()

    def close(self):
        self.stop_tracking()
        if self.ready:
            vfmig_sender_free(&self.s)
            self.ready = 0
        free(self.bits)
        self.bits = NULL

    def start_tracking(self):
        """Turn on the VM's dirty tracker; the first collect() returns every page."""
        cdef vfmig_err err
        cdef int rc
        cdef vfmig_vm *vm = self.vm._vm()
        with nogil:
            rc = vfmig_tracker_open(vm, &self.t, &err)
        if rc < 0:
            self.t = NULL
            raise_err(rc, err.msg)

    def stop_tracking(self):
        if self.t != NULL:
            with nogil:
                vfmig_tracker_close(self.t)
            self.t = NULL

    @property
    def tracker(self):
        return self.t.ops.name.decode() if self.t != NULL else None

    def tracker_stats(self):
        if self.t == NULL:
            return {}
        return {"harvested": self.t.harvested, "overruns": self.t.overruns, "syncs": self.t.syncs}

    def collect(self, bint accumulate=False):
        """Sync the tracker into this round's bitmap (OR-ing into the unsent one with
        accumulate); returns the number of pages the next send_round() will send."""
        cdef int64_t n
        if self.t == NULL:
            raise ValueError("tracking is off")
        with nogil:
            n = vfmig_tracker_collect(self.t, self.bits, accumulate)
        if n < 0:
            raise_err(n, self.t.err.msg)
        self.last_dirty = n
        return n

    def cached(self):
        """Of the pages the last collect() found, those the delta cache holds a copy of."""
        cdef uint64_t n
        with nogil:
            n = vfmig_sender_cached(&self.s, self.bits)
        return n

    def send_round(self, bint zero_copy=False):
        """Send every page of the last collect(). Returns the round's counters."""
        cdef vfmig_round_stats st
        cdef int rc
        with nogil:
            rc = vfmig_send_round(&self.s, self.bits, zero_copy, &st)
        if rc < 0:
            raise StreamError(-rc, self.s.err.msg.decode())
        return {"pages": st.pages, "zero_pages": st.zero_pages, "raw_pages": st.raw_pages,
                "delta_pages": st.delta_pages, "zstd_pages": st.zstd_pages, "bytes_in": st.bytes_in,
                "bytes": st.bytes, "records": st.records, "ns": st.ns, "cache_lookups": st.cache_lookups,
                "cache_hits": st.cache_hits, "delta_fallbacks": st.delta_fallbacks,
                "delta_bytes": st.delta_bytes}

    def set_delta(self, uint64_t cache_pages):
        """Delta pages with a cache of cache_pages pages over all channels (0: off). Between rounds."""
        cdef int rc
        with nogil:
            rc = vfmig_sender_set_delta(&self.s, cache_pages)
        if rc < 0:
            raise StreamError(-rc, self.s.err.msg.decode())

    def set_compress(self, int level):
        """zstd at this level on every channel (0: off). Between rounds."""
        cdef int rc
        with nogil:
            rc = vfmig_sender_set_compress(&self.s, level)
        if rc < 0:
            raise StreamError(-rc, self.s.err.msg.decode())

    def send_marker(self, uint32_t iteration, uint64_t dirty):
        cdef int rc
        with nogil:
            rc = vfmig_send_marker(&self.s, iteration, dirty)
        if rc < 0:
            raise StreamError(-rc, self.s.err.msg.decode())

    def wait_applied(self, uint32_t iteration, int timeout_ms):
        """Block (GIL released) until the destination has applied round `iteration` on every
        channel."""
        cdef int rc
        with nogil:
            rc = vfmig_sender_wait_applied(&self.s, iteration, timeout_ms)
        if rc < 0:
            raise StreamError(-rc, self.s.err.msg.decode())

    def send_eos(self):
        cdef int rc
        with nogil:
            rc = vfmig_send_eos(&self.s)
        if rc < 0:
            raise StreamError(-rc, self.s.err.msg.decode())

    def set_bandwidth(self, uint64_t bytes_per_s):
        self.s.bandwidth = bytes_per_s

    def cancel(self):
        """Any thread: the send loops stop at the next record."""
        self.s.cancel = 1


cdef class PageReceiver:
    """Destination side: decodes the page channels into the VM's RAM."""
    cdef vfmig_receiver r
    cdef VM vm
    cdef int ready
    cdef int started

    def __cinit__(self, VM vm, fds):
        cdef int cfds[16]
        cdef vfmig_err err
        fds = _fd_list(fds)
        for i, fd in enumerate(fds):
            cfds[i] = fd
        self.vm = vm
        cdef int rc = vfmig_receiver_init(&self.r, vm._vm(), cfds, len(fds), &err)
        if rc < 0:
            raise_err(rc, err.msg)
        self.ready = 1

    def __dealloc__(self):
        if self.started:
            self.r.cancel = 1
            with nogil:
                vfmig_receiver_join(&self.r)
        if self.ready:
            vfmig_receiver_free(&self.r)
            self.ready = 0

    def start(self):
        """Start decoding every channel (C threads) to its end-of-stream."""
        cdef int rc = vfmig_receiver_start(&self.r)
        if rc < 0:
            raise StreamError(-rc, self.r.err.msg.decode())
        self.started = 1

    def join(self):
        """Wait for every channel, without the GIL. Raises the first channel's error."""
        cdef int rc
        with nogil:
            rc = vfmig_receiver_join(&self.r)
        if rc < 0:
            raise StreamError(-rc, self.r.err.msg.decode())

    def cancel(self):
        self.r.cancel = 1

    @property
    def failed(self):
        """A channel failed (or cancel was called): join() will raise."""
        return bool(self.r.cancel)

    def stats(self):
        out = {"pages": 0, "zero_pages": 0, "delta_pages": 0, "zstd_records": 0, "bytes": 0, "records": 0,
               "iterations": 0}
        for c in range(self.r.nchan):
            out["pages"] += self.r.ch[c].pages
            out["zero_pages"] += self.r.ch[c].zero_pages
            out["delta_pages"] += self.r.ch[c].delta_pages
            out["zstd_records"] += self.r.ch[c].zstd_records
            out["bytes"] += self.r.ch[c].bytes
            out["records"] += self.r.ch[c].records
            out["iterations"] = max(out["iterations"], self.r.ch[c].iterations)
        return out


# Device migration states (migstate.h): MIG_STATES[value] is the name -------------------------------
MIG_STATES = tuple(vfmig_mig_state_name(i).decode() for i in range(VFMIG_MIG__COUNT))
_MIG_STATE_VALUES = {n: i for i, n in enumerate(MIG_STATES)}


# simvf's limits and its guest driver's contract (devices.h, simvf_abi.h) ---------------------------
SIMVF_STATE_MIN = VFMIG_SIMVF_STATE_MIN
SIMVF_STATE_MAX = VFMIG_SIMVF_STATE_MAX
SIMVF_RATE_MAX = VFMIG_SIMVF_RATE_MAX
SIMVF_VECTORS = {"rx": SIMVF_VEC_RX, "tx": SIMVF_VEC_TX, "migration": SIMVF_VEC_MIGRATION,
                 "misc": SIMVF_VEC_MISC}  # a simvf's MSI-X vectors by use (simvf_abi.h)
GUEST_ACKS = {"normal": VFMIG_ACK_NORMAL, "never": VFMIG_ACK_NEVER, "late": VFMIG_ACK_LATE,
              "slow": VFMIG_ACK_SLOW}  # how vfdrv answers the handshake (guest_abi.h enum vfmig_guest_ack)
HS_OUTCOMES = tuple(vfmig_hs_outcome_name(i).decode() for i in range(VFMIG_HS__COUNT))
MIGCAP_SIZE = VFMIG_MIGCAP_SIZE
MIGCAP_REGS = {"ctrl": VFMIG_MIGCAP_CTRL, "irq": VFMIG_MIGCAP_IRQ, "vmm_status": VFMIG_MIGCAP_VMM_STATUS,
               "dev_status": VFMIG_MIGCAP_DEV_STATUS}
VMM_STATUS_BITS = {"migrating": VFMIG_VMM_MIGRATING, "migrated": VFMIG_VMM_MIGRATED,
                   "reset_required": VFMIG_VMM_RESET_REQUIRED}
DEV_ACK = VFMIG_DEV_ACK
SIMVF_TABLE_OFFSET = SIMVF_REGS_BYTES  # a simvf's state is its queues and counters, then its table
SIMVF_GUEST_MAGIC = SIMVF_GUEST_MAGIC_C
SIMVF_GUEST_STATES = {SIMVF_GUEST_PROBING: "probing", SIMVF_GUEST_RUNNING: "running",
                      SIMVF_GUEST_NO_DEVICE: "no_device", SIMVF_GUEST_FAILED: "failed"}
SIMVF_GUEST_ERRORS = {SIMVF_ERR_NONE: "none", SIMVF_ERR_MAGIC: "magic", SIMVF_ERR_LEN: "length",
                      SIMVF_ERR_CSUM: "checksum", SIMVF_ERR_GAP: "gap"}
