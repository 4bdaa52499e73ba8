/* vCPU state save/load. Layout: header, then sections {tag, len, payload padded to 8}. */
#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>

#include "vfmig/vcpu_state.h"

enum { SEC_REGS = 1, SEC_SREGS, SEC_FPU, SEC_XSAVE, SEC_XCRS, SEC_LAPIC, SEC_MP, SEC_EVENTS,
       SEC_DEBUGREGS, SEC_MSRS, SEC__END };

#define MAX_MSRS VFMIG_MAX_MSRS

struct state_hdr {
    uint32_t magic, version, vcpu_id, nsections;
};
struct sec_hdr {
    uint32_t tag, len;
};
struct msr_blob {
    struct kvm_msrs m;
    struct kvm_msr_entry e[MAX_MSRS];
};

/* Fixed-size sections: tag -> (get ioctl, set ioctl, size). MSRs are variable and handled apart. */
static const struct {
    uint32_t tag;
    unsigned long get, set;
    uint32_t size;
    const char *name;
} fixed[] = {
    {SEC_SREGS, KVM_GET_SREGS, KVM_SET_SREGS, sizeof(struct kvm_sregs), "sregs"},
    {SEC_REGS, KVM_GET_REGS, KVM_SET_REGS, sizeof(struct kvm_regs), "regs"},
    {SEC_FPU, KVM_GET_FPU, KVM_SET_FPU, sizeof(struct kvm_fpu), "fpu"},
    {SEC_XSAVE, KVM_GET_XSAVE, KVM_SET_XSAVE, sizeof(struct kvm_xsave), "xsave"},
    {SEC_XCRS, KVM_GET_XCRS, KVM_SET_XCRS, sizeof(struct kvm_xcrs), "xcrs"},
    {SEC_LAPIC, KVM_GET_LAPIC, KVM_SET_LAPIC, sizeof(struct kvm_lapic_state), "lapic"},
    {SEC_EVENTS, KVM_GET_VCPU_EVENTS, KVM_SET_VCPU_EVENTS, sizeof(struct kvm_vcpu_events), "events"},
    {SEC_DEBUGREGS, KVM_GET_DEBUGREGS, KVM_SET_DEBUGREGS, sizeof(struct kvm_debugregs), "debugregs"},
    /* MP state last: setting LAPIC can reset it. The save reads it first (vfmig_vcpu_save). */
    {SEC_MP, KVM_GET_MP_STATE, KVM_SET_MP_STATE, sizeof(struct kvm_mp_state), "mp_state"},
};
#define NFIXED (sizeof(fixed) / sizeof(fixed[0]))

static size_t pad8(size_t n) { return (n + 7) & ~(size_t)7; }

/* The MSRs this KVM can both read and write, found once per VM by asking for them one at a
 * time; later saves (inside the downtime) reuse the list. Callers are serialised. */
static int msr_list(struct vfmig_vcpu *cpu)
{
    struct vfmig_vm *vm = cpu->vm;
    if (vm->msrs_probed)
        return 0;
    struct {
        struct kvm_msr_list l;
        uint32_t idx[MAX_MSRS];
    } ml = {.l.nmsrs = MAX_MSRS};
    if (ioctl(vm->kvm_fd, KVM_GET_MSR_INDEX_LIST, &ml) < 0)
        return -errno;
    vm->nmsrs = 0;
    for (uint32_t i = 0; i < ml.l.nmsrs && i < MAX_MSRS; i++) {
        struct {
            struct kvm_msrs m;
            struct kvm_msr_entry e;
        } one = {.m.nmsrs = 1, .e.index = ml.idx[i]};
        if (ioctl(cpu->fd, KVM_GET_MSRS, &one) == 1)
            vm->msr_idx[vm->nmsrs++] = ml.idx[i];
    }
    vm->msrs_probed = 1;
    return 0;
}

static uint8_t *put_section(uint8_t *p, uint32_t tag, const void *data, uint32_t len)
{
    struct sec_hdr h = {tag, len};
    memcpy(p, &h, sizeof(h));
    memcpy(p + sizeof(h), data, len);
    memset(p + sizeof(h) + len, 0, pad8(len) - len);
    return p + sizeof(h) + pad8(len);
}

long vfmig_vcpu_save(struct vfmig_vcpu *cpu, uint8_t *buf, size_t cap, struct vfmig_err *err)
{
    struct msr_blob msrs;
    union {
        struct kvm_sregs sregs;
        struct kvm_xsave xsave;
        struct kvm_lapic_state lapic;
        struct kvm_vcpu_events ev;
        struct kvm_regs regs;
        struct kvm_fpu fpu;
    } u;
    int r = msr_list(cpu);
    const uint32_t *idx = cpu->vm->msr_idx, nmsr = cpu->vm->nmsrs;
    if (r < 0)
        return vfmig_fail(err, -r, "KVM_GET_MSR_INDEX_LIST: %s", strerror(-r));
    size_t need = sizeof(struct state_hdr) + (NFIXED + 1) * sizeof(struct sec_hdr) + sizeof(struct kvm_msrs) +
                  nmsr * sizeof(struct kvm_msr_entry);
    for (size_t i = 0; i < NFIXED; i++)
        need += pad8(fixed[i].size);
    if (need > cap)
        return vfmig_fail(err, ENOSPC, "vCPU state needs %zu bytes, buffer has %zu", need, cap);

    struct state_hdr h = {VFMIG_VCPU_STATE_MAGIC, VFMIG_VCPU_STATE_VERSION, cpu->id, NFIXED + 1};
    memcpy(buf, &h, sizeof(h));
    uint8_t *p = buf + sizeof(h);
    /* MP state first: KVM_GET_MP_STATE is not read-only. It delivers a latched INIT or SIPI,
     * which resets RIP, CS and the LAPIC, so what it can change must be read after it. */
    for (size_t k = 0; k < NFIXED; k++) {
        size_t i = (k + NFIXED - 1) % NFIXED; /* the table's last entry, MP state, then the rest */
        memset(&u, 0, sizeof(u));
        if (ioctl(cpu->fd, fixed[i].get, &u) < 0)
            return vfmig_fail(err, errno, "vCPU %u get %s: %s", cpu->id, fixed[i].name, strerror(errno));
        p = put_section(p, fixed[i].tag, &u, fixed[i].size);
    }
    memset(&msrs, 0, sizeof(msrs));
    msrs.m.nmsrs = nmsr;
    for (uint32_t i = 0; i < nmsr; i++)
        msrs.e[i].index = idx[i];
    int got = ioctl(cpu->fd, KVM_GET_MSRS, &msrs);
    if (got != (int)nmsr)
        return vfmig_fail(err, EIO, "vCPU %u: read %d of %u MSRs", cpu->id, got, nmsr);
    p = put_section(p, SEC_MSRS, &msrs, (uint32_t)(sizeof(struct kvm_msrs) + nmsr * sizeof(struct kvm_msr_entry)));
    return (long)(p - buf);
}

/* Pass 1 of a load: every check, nothing applied; fills the sections and the MSR list. */
static int parse(const uint8_t *buf, size_t len, uint32_t vcpu_id, const uint8_t *sec[SEC__END],
                 uint32_t seclen[SEC__END], struct msr_blob *msrs, struct vfmig_err *err)
{
    struct state_hdr h;
    if (len < sizeof(h) || len > VFMIG_VCPU_STATE_MAX)
        return vfmig_fail(err, EINVAL, "vCPU state of %zu bytes is out of range", len);
    memcpy(&h, buf, sizeof(h));
    if (h.magic != VFMIG_VCPU_STATE_MAGIC || h.version != VFMIG_VCPU_STATE_VERSION)
        return vfmig_fail(err, EPROTO, "vCPU state has bad magic/version (0x%x v%u)", h.magic, h.version);
    if (h.vcpu_id != vcpu_id)
        return vfmig_fail(err, EINVAL, "vCPU state is for vCPU %u, not %u", h.vcpu_id, vcpu_id);
    size_t off = sizeof(h);
    for (uint32_t s = 0; s < h.nsections; s++) {
        struct sec_hdr sh;
        if (len - off < sizeof(sh))
            return vfmig_fail(err, EINVAL, "vCPU state truncated at section %u", s);
        memcpy(&sh, buf + off, sizeof(sh));
        off += sizeof(sh);
        if (sh.tag == 0 || sh.tag >= SEC__END || sec[sh.tag])
            return vfmig_fail(err, EINVAL, "vCPU state: bad or repeated section tag %u", sh.tag);
        if (sh.len > len - off || pad8(sh.len) > len - off)
            return vfmig_fail(err, EINVAL, "vCPU state: section %u overruns the blob", sh.tag);
        sec[sh.tag] = buf + off;
        seclen[sh.tag] = sh.len;
        off += pad8(sh.len);
    }
    if (off != len)
        return vfmig_fail(err, EINVAL, "vCPU state: %zu trailing bytes after the last section", len - off);
    for (size_t i = 0; i < NFIXED; i++)
        if (!sec[fixed[i].tag] || seclen[fixed[i].tag] != fixed[i].size)
            return vfmig_fail(err, EINVAL, "vCPU state: section %s missing or of wrong size", fixed[i].name);
    uint32_t ml = seclen[SEC_MSRS];
    if (!sec[SEC_MSRS] || ml < sizeof(struct kvm_msrs) || ml > sizeof(*msrs))
        return vfmig_fail(err, EINVAL, "vCPU state: MSR section missing or too large");
    memset(msrs, 0, sizeof(*msrs));
    memcpy(msrs, sec[SEC_MSRS], ml);
    if ((ml - sizeof(struct kvm_msrs)) % sizeof(struct kvm_msr_entry) ||
        msrs->m.nmsrs != (ml - sizeof(struct kvm_msrs)) / sizeof(struct kvm_msr_entry))
        return vfmig_fail(err, EINVAL, "vCPU state: MSR count does not match its section");
    return 0;
}

int vfmig_vcpu_state_check(const uint8_t *buf, size_t len, uint32_t vcpu_id, struct vfmig_err *err)
{
    struct msr_blob msrs;
    const uint8_t *sec[SEC__END] = {0};
    uint32_t seclen[SEC__END] = {0};
    return parse(buf, len, vcpu_id, sec, seclen, &msrs, err);
}

int vfmig_vcpu_load(struct vfmig_vcpu *cpu, const uint8_t *buf, size_t len, struct vfmig_err *err)
{
    struct msr_blob msrs;
    const uint8_t *sec[SEC__END] = {0};
    uint32_t seclen[SEC__END] = {0};
    int rc = parse(buf, len, cpu->id, sec, seclen, &msrs, err);
    if (rc < 0)
        return rc;
    /* Pass 2: apply. The fixed table is already in a safe order. */
    for (size_t i = 0; i < NFIXED; i++) {
        uint8_t tmp[sizeof(struct kvm_xsave) > 8192 ? sizeof(struct kvm_xsave) : 8192]
            __attribute__((aligned(16)));
        memcpy(tmp, sec[fixed[i].tag], fixed[i].size);
        if (ioctl(cpu->fd, fixed[i].set, tmp) < 0)
            return vfmig_fail(err, errno, "vCPU %u set %s: %s", cpu->id, fixed[i].name, strerror(errno));
    }
    int set = ioctl(cpu->fd, KVM_SET_MSRS, &msrs);
    if (set != (int)msrs.m.nmsrs)
        return vfmig_fail(err, EIO, "vCPU %u: set %d of %u MSRs", cpu->id, set, msrs.m.nmsrs);
    return 0;
}
