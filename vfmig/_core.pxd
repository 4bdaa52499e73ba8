# C declarations of the vfmig core, for _core.pyx.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "vfmig/util.h":
    struct vfmig_err:
        char msg[256]
    uint64_t vfmig_now_ns() nogil
    uint64_t vfmig_checkpoint(const char *name) nogil

cdef extern from "vfmig/guest_abi.h":
    enum:
        VFMIG_PORT_CLOCK_LO
        VFMIG_MMIO_CLOCK
    enum:
        VFMIG_ACK_NORMAL
        VFMIG_ACK_NEVER
        VFMIG_ACK_LATE
        VFMIG_ACK_SLOW

cdef extern from "vfmig/device.h":
    enum:
        VFMIG_SPACE_PIO
        VFMIG_SPACE_MMIO
    struct vfmig_device:
        const char *name
        int (*access)(vfmig_device *d, vfmig_vcpu *cpu, uint64_t addr, uint8_t *data, uint32_t len,
                      int is_write) nogil
        long (*save)(vfmig_device *d, uint8_t *buf, size_t cap) nogil
        int (*load)(vfmig_device *d, const uint8_t *buf, size_t len) nogil
        vfmig_migration *mig
        vfmig_dma_log *dma_log

cdef extern from "vfmig/migstate.h":
    enum vfmig_mig_state:
        VFMIG_MIG_ERROR
        VFMIG_MIG_STOP
        VFMIG_MIG_RUNNING
        VFMIG_MIG_STOP_COPY
        VFMIG_MIG_RESUMING
        VFMIG_MIG_RUNNING_P2P
        VFMIG_MIG_PRE_COPY
        VFMIG_MIG_PRE_COPY_P2P
        VFMIG_MIG__COUNT
    enum:
        VFMIG_MIGF_STOP_COPY
        VFMIG_MIGF_P2P
        VFMIG_MIGF_PRE_COPY
    struct vfmig_migration:
        uint32_t flags
    const char *vfmig_mig_state_name(int state) nogil
    int vfmig_mig_next_state(uint32_t flags, vfmig_mig_state cur, vfmig_mig_state target,
                             vfmig_mig_state *next) nogil
    vfmig_mig_state vfmig_mig_get_state(vfmig_migration *m) nogil
    int vfmig_mig_set_state(vfmig_migration *m, vfmig_mig_state target, vfmig_err *err) nogil
    long vfmig_mig_read(vfmig_migration *m, uint8_t *buf, size_t cap, vfmig_err *err) nogil
    long vfmig_mig_write(vfmig_migration *m, const uint8_t *buf, size_t len, vfmig_err *err) nogil
    int vfmig_mig_precopy_info(vfmig_migration *m, uint64_t *initial_bytes, uint64_t *dirty_bytes,
                               vfmig_err *err) nogil
    int vfmig_mig_reset(vfmig_migration *m, vfmig_err *err) nogil
    struct vfmig_prestop_result:
        uint32_t outcome
        uint32_t latency_us
        uint64_t start_ns
        uint64_t end_ns
    int vfmig_mig_prestop(vfmig_migration *m, uint64_t deadline_ns, vfmig_prestop_result *out,
                          vfmig_err *err) nogil
    void vfmig_mig_prestop_abort(vfmig_migration *m) nogil
    const char *vfmig_hs_outcome_name(uint32_t outcome) nogil
    enum:
        VFMIG_HS__COUNT
    vfmig_mig_state vfmig_mig_get_state(vfmig_migration *m) nogil

cdef extern from "vfmig/dma_log.h":
    struct vfmig_dma_log:
        int broken
        uint64_t pages_logged

cdef extern from "vfmig/devices.h":
    vfmig_device *vfmig_console_new()
    size_t vfmig_console_read(vfmig_device *d, char *buf, size_t cap)
    vfmig_device *vfmig_clock_new(const char *name, int space, uint64_t base)
    int vfmig_clock_hold(vfmig_device *d, uint32_t vcpus) nogil
    int vfmig_clock_wait_held(vfmig_device *d, uint32_t count, uint32_t timeout_ms) nogil
    vfmig_device *vfmig_platform_new(int vm_fd)

cdef extern from "vfmig/vm.h":
    enum:
        VFMIG_EXIT__COUNT
        VFMIG_MAX_VCPUS
        VFMIG_PAUSE_TIMEOUT_MS_DEFAULT
        VFMIG_PAUSE_TIMEOUT_MS_MAX
    struct vfmig_vm_config:
        uint64_t mem_bytes
        uint32_t vcpus
        uint32_t ring_entries
    struct vfmig_vcpu:
        uint32_t id
        uint64_t exits[8]
        int tid  # _Atomic in C: each read is an atomic load
        int throttle_due  # _Atomic
        uint64_t throttle_sleep_since_ns  # _Atomic
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
        uint64_t pause_stopped_ns
        uint64_t last_resume_ns
        uint64_t first_run_ns
        int failed
        int pause_req  # _Atomic in C
        vfmig_err err
        int started
    int vfmig_vm_create(const vfmig_vm_config *cfg, vfmig_vm **out, vfmig_err *err) nogil
    int vfmig_vm_add_device(vfmig_vm *vm, vfmig_device *dev) nogil
    vfmig_device *vfmig_vm_find_device(vfmig_vm *vm, const char *name) nogil
    int vfmig_vm_boot(vfmig_vm *vm, const uint8_t *image, size_t len) nogil
    int vfmig_vm_start(vfmig_vm *vm) nogil
    int vfmig_vm_pause(vfmig_vm *vm, uint32_t timeout_ms) nogil
    int vfmig_vm_resume(vfmig_vm *vm) nogil
    void vfmig_vm_destroy(vfmig_vm *vm) nogil
    int vfmig_vm_set_dirty_logging(vfmig_vm *vm, int on) nogil
    int vfmig_vm_set_throttle(vfmig_vm *vm, int pct) nogil
    struct vfmig_unthrottle:
        uint32_t woken, late
        uint64_t longest_sleep_ns
    int vfmig_vm_unthrottle(vfmig_vm *vm, uint32_t timeout_ms, vfmig_unthrottle *out) nogil
    uint8_t *vfmig_vm_host(const vfmig_vm *vm, uint64_t gpa, uint64_t len) nogil
    uint64_t vfmig_vm_page_to_gpa(const vfmig_vm *vm, uint64_t page)

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
    double vfmig_ref_tcp_loopback(uint64_t bytes, unsigned streams) nogil
    double vfmig_ref_tcp_loopback_ram(uint64_t bytes, unsigned streams) nogil

cdef extern from "vfmig/crc32c.h":
    uint32_t vfmig_crc32c(uint32_t crc, const void *buf, size_t len) nogil
    const char *vfmig_crc32c_impl()

cdef extern from "vfmig/stream.h":
    enum:
        VFMIG_STREAM_VERSION
        VFMIG_ZSTD_LEVEL_MAX
        VFMIG_REC__COUNT
        VFMIG_TOKEN_LEN
        VFMIG_CTRL_MAX
    struct vfmig_rec_hdr:
        uint32_t magic
        uint16_t type
        uint16_t flags
        uint32_t len
        uint32_t crc
    void vfmig_rec_seal(vfmig_rec_hdr *h, uint16_t type, const void *p1, uint32_t l1, const void *p2, uint32_t l2)
    int vfmig_rec_check_hdr(const vfmig_rec_hdr *h, uint32_t max_len, vfmig_err *err)
    int vfmig_rec_check_crc(const vfmig_rec_hdr *h, const void *payload, vfmig_err *err)
    const char *vfmig_rec_name(uint32_t type)

cdef extern from "vfmig/hello.h":
    enum:
        VFMIG_HELLO_LEN
        VFMIG_CHANNEL_LEN
        VFMIG_HELLO_VERIFY
        VFMIG_CONFIG_MAX
    struct vfmig_hello:
        char magic[8]
        uint16_t version
        uint16_t channels
        uint32_t page_size
        uint64_t mem_bytes
        uint32_t vcpus
        uint32_t flags
        uint8_t token[16]
        uint32_t config_len
        uint32_t reserved
    struct vfmig_channel_hello:
        uint8_t token[16]
        uint16_t index
        uint16_t version
        uint32_t reserved
    void vfmig_hello_encode(vfmig_hello *out, uint16_t version, uint16_t channels, uint64_t mem_bytes,
                            uint32_t vcpus, uint32_t flags, const uint8_t *token, uint32_t config_len)
    int vfmig_hello_decode(const uint8_t *raw, size_t len, vfmig_hello *out, vfmig_err *err)
    void vfmig_channel_encode(vfmig_channel_hello *out, const uint8_t *token, uint16_t index)
    int vfmig_channel_decode(const uint8_t *raw, size_t len, vfmig_channel_hello *out, vfmig_err *err)

cdef extern from "vfmig/dirty.h":
    struct vfmig_tracker_ops:
        const char *name
    struct vfmig_tracker:
        const vfmig_tracker_ops *ops
        uint64_t harvested
        uint64_t overruns
        uint64_t syncs
        vfmig_err err
    int vfmig_tracker_open(vfmig_vm *vm, vfmig_tracker **out, vfmig_err *err) nogil
    int64_t vfmig_tracker_collect(vfmig_tracker *t, uint64_t *out, int accumulate) nogil
    void vfmig_tracker_close(vfmig_tracker *t) nogil

cdef extern from "vfmig/channels.h":
    enum:
        VFMIG_MAX_CHANNELS
    struct vfmig_round_stats:
        uint64_t pages, zero_pages, raw_pages, delta_pages, zstd_pages
        uint64_t bytes_in, bytes, records, ns
        uint64_t cache_lookups, cache_hits, delta_fallbacks
        uint64_t delta_bytes
    struct vfmig_chan_tx:
        pass
    struct vfmig_sender:
        uint64_t bandwidth
        int cancel
        vfmig_err err
    int vfmig_sender_init(vfmig_sender *s, vfmig_vm *vm, const int *fds, uint32_t nchan, vfmig_err *err) nogil
    void vfmig_sender_free(vfmig_sender *s) nogil
    uint64_t vfmig_sender_cached(const vfmig_sender *s, const uint64_t *bits) nogil
    int vfmig_sender_set_delta(vfmig_sender *s, uint64_t cache_pages) nogil
    int vfmig_sender_set_compress(vfmig_sender *s, int level) nogil
    int vfmig_send_round(vfmig_sender *s, const uint64_t *bits, int zero_copy, vfmig_round_stats *out) nogil
    int vfmig_send_marker(vfmig_sender *s, uint32_t iteration, uint64_t dirty) nogil
    int vfmig_sender_wait_applied(vfmig_sender *s, uint32_t iteration, int timeout_ms) nogil
    int vfmig_send_eos(vfmig_sender *s) nogil
    struct vfmig_chan_rx:
        uint64_t pages
        uint64_t zero_pages
        uint64_t delta_pages
        uint64_t zstd_records
        uint64_t bytes
        uint64_t records
        uint64_t iterations
        int done
    struct vfmig_receiver:
        uint32_t nchan
        vfmig_chan_rx ch[16]
        int cancel
        vfmig_err err
    int vfmig_receiver_init(vfmig_receiver *r, vfmig_vm *vm, const int *fds, uint32_t nchan,
                            vfmig_err *err) nogil
    void vfmig_receiver_free(vfmig_receiver *r) nogil
    int vfmig_receiver_start(vfmig_receiver *r) nogil
    int vfmig_receiver_join(vfmig_receiver *r) nogil
    int vfmig_receiver_run(vfmig_receiver *r) nogil
    void vfmig_ram_page_crcs(const vfmig_vm *vm, uint32_t *out) nogil

cdef extern from "vfmig/devices.h":
    vfmig_device *vfmig_dma_engine_new(vfmig_vm *vm, const char *name)
    int vfmig_dma_fill(vfmig_device *d, uint64_t gpa, uint8_t value, uint64_t len) nogil

cdef extern from "vfmig/devices.h":
    # simvf, the emulated NIC VF
    struct vfmig_simvf_config:
        uint64_t state_bytes
        uint32_t dma_rate
        int precopy
        int migration
    uint64_t VFMIG_SIMVF_STATE_MIN
    uint64_t VFMIG_SIMVF_STATE_MAX
    uint32_t VFMIG_SIMVF_RATE_MAX
    vfmig_device *vfmig_simvf_new(vfmig_vm *vm, const char *name, const vfmig_simvf_config *cfg,
                                  vfmig_err *err) nogil
    struct simvf_counters "vfmig_simvf_counters":
        uint64_t sent
        uint64_t delivered
        uint64_t dropped
        uint64_t tx_ok
        uint64_t tx_bad
        uint64_t table_updates
        uint64_t interrupts
    int vfmig_simvf_counters(vfmig_device *d, simvf_counters *out) nogil
    int vfmig_simvf_set_rate(vfmig_device *d, uint32_t pps) nogil
    long vfmig_simvf_state(vfmig_device *d, uint8_t *buf, size_t cap) nogil
    size_t vfmig_simvf_state_size(vfmig_device *d) nogil
    int vfmig_simvf_keep_stop_state(vfmig_device *d, int on) nogil
    long vfmig_simvf_stop_state(vfmig_device *d, uint8_t *buf, size_t cap) nogil

cdef extern from "vfmig/simvf_abi.h":
    enum:
        SIMVF_GUEST_STATS_GPA
        SIMVF_GUEST_MAGIC_C "SIMVF_GUEST_MAGIC"
    enum simvf_guest_state:
        SIMVF_GUEST_PROBING
        SIMVF_GUEST_RUNNING
        SIMVF_GUEST_NO_DEVICE
        SIMVF_GUEST_FAILED
    enum simvf_guest_error:
        SIMVF_ERR_NONE
        SIMVF_ERR_MAGIC
        SIMVF_ERR_LEN
        SIMVF_ERR_CSUM
        SIMVF_ERR_GAP
    struct simvf_guest_stats:
        uint32_t magic
        uint32_t state
        uint64_t received
        uint64_t dropped_seen
        uint64_t errors
        uint64_t next_seq
        uint64_t last_drops
        uint64_t tx_sent
        uint64_t interrupts
        uint32_t bdf
        uint32_t first_error
        uint64_t mig_notices
        uint64_t acks
        uint64_t resets
        uint64_t resumed_in_place
        uint64_t cancels
        uint64_t resync_skipped
        uint32_t last_vmm_status
        uint32_t quiesced
        uint64_t reset_discarded

cdef extern from "vfmig/pci.h":
    # A PCI function embeds its vfmig_device first: the device a simvf registers is its function.
    struct vfmig_pci_handshake:
        uint32_t outcome
        uint32_t latency_us
    struct vfmig_pci_func:
        vfmig_device dev
        uint8_t devfn
        uint16_t migcap
        vfmig_pci_handshake hs
    enum:
        VFMIG_PCI_CONFIG_SIZE
        VFMIG_PCI_MSIX_MAX
    uint32_t vfmig_pci_config_read(vfmig_pci_func *f, uint32_t off, uint32_t len) nogil
    int vfmig_pci_msix_notify(vfmig_pci_func *f, uint32_t vec) nogil
    uint32_t vfmig_pci_msix_counts(const vfmig_pci_func *f, uint64_t *out, uint32_t cap) nogil
    uint8_t vfmig_pci_migcap_reg(vfmig_pci_func *f, uint32_t reg) nogil

cdef extern from "vfmig/simvf_abi.h":
    enum:
        SIMVF_VEC_RX
        SIMVF_VEC_TX
        SIMVF_VEC_MIGRATION
        SIMVF_VEC_MISC
    enum:
        VFMIG_PCI_CONFIG_ADDR
        VFMIG_PCI_CONFIG_DATA
        VFMIG_MIGCAP_SIZE
        VFMIG_MIGCAP_CTRL
        VFMIG_MIGCAP_IRQ
        VFMIG_MIGCAP_VMM_STATUS
        VFMIG_MIGCAP_DEV_STATUS
        VFMIG_MIGCAP_ENABLE
        VFMIG_VMM_MIGRATING
        VFMIG_VMM_MIGRATED
        VFMIG_VMM_RESET_REQUIRED
        VFMIG_DEV_ACK

cdef extern from "vfmig/simvf_state.h":
    uint32_t SIMVF_REGS_BYTES
