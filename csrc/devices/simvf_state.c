/* simvf's migration stream: section encoding and the incremental, validating parser. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "vfmig/crc32c.h"
#include "vfmig/simvf_abi.h"
#include "vfmig/simvf_state.h"

static const char *sec_name(uint32_t type)
{
    static const char *names[] = {"?", "IDENT", "TABLE", "PCI", "REGS", "END"};
    return type <= SIMVF_SEC_END ? names[type] : "unknown";
}

static uint32_t sec_crc(const struct simvf_sec_hdr *h, const void *payload, uint32_t len)
{
    struct simvf_sec_hdr z = *h;
    z.crc = 0;
    uint32_t c = vfmig_crc32c(0, &z, sizeof(z));
    return len ? vfmig_crc32c(c, payload, len) : c;
}

size_t simvf_sec_put(uint8_t *out, uint16_t type, uint64_t offset, const void *payload, uint32_t len)
{
    struct simvf_sec_hdr h = {.magic = SIMVF_SEC_MAGIC, .type = type, .version = SIMVF_SEC_VERSION,
                              .len = len, .offset = offset};
    h.crc = sec_crc(&h, payload, len);
    memcpy(out, &h, sizeof(h));
    if (len && payload != out + sizeof(h)) /* a payload built in place needs no copy */
        memcpy(out + sizeof(h), payload, len);
    return sizeof(h) + len;
}

static int ring_ok(uint32_t size, uint32_t head, uint64_t gpa)
{
    if (size == 0)
        return head == 0;
    return size >= 8 && size <= SIMVF_RING_MAX && !(size & (size - 1)) && head < size && gpa % 16 == 0;
}

int simvf_regs_check(const struct simvf_regs *r, struct vfmig_err *err)
{
    if (r->ctrl & ~SIMVF_CTRL_ENABLE)
        return vfmig_fail(err, EINVAL, "simvf REGS: control bits 0x%x are not defined", r->ctrl);
    if (!ring_ok(r->rx_size, r->rx_head, r->rx_ring))
        return vfmig_fail(err, EINVAL, "simvf REGS: RX ring of %u entries at 0x%llx with head %u is not valid",
                          r->rx_size, (unsigned long long)r->rx_ring, r->rx_head);
    if (!ring_ok(r->tx_size, r->tx_head, r->tx_ring))
        return vfmig_fail(err, EINVAL, "simvf REGS: TX ring of %u entries at 0x%llx with head %u is not valid",
                          r->tx_size, (unsigned long long)r->tx_ring, r->tx_head);
    if (r->sent != r->delivered + r->dropped || r->delivered > r->sent)
        return vfmig_fail(err, EINVAL, "simvf REGS: %llu packets sent but %llu delivered + %llu dropped",
                          (unsigned long long)r->sent, (unsigned long long)r->delivered,
                          (unsigned long long)r->dropped);
    return 0;
}

int simvf_ident_check(const struct simvf_ident *want, const struct simvf_ident *got, struct vfmig_err *err)
{
    if (got->vendor != want->vendor || got->device != want->device)
        return vfmig_fail(err, EINVAL, "simvf identity: the stream is for PCI device %04x:%04x, this one is %04x:%04x",
                          got->vendor, got->device, want->vendor, want->device);
    if (got->revision != want->revision)
        return vfmig_fail(err, EINVAL, "simvf identity: revision %u in the stream, %u here", got->revision,
                          want->revision);
    if (got->state_bytes != want->state_bytes)
        return vfmig_fail(err, EINVAL, "simvf identity: state of %llu bytes in the stream, %llu here",
                          (unsigned long long)got->state_bytes, (unsigned long long)want->state_bytes);
    if (got->nvec != want->nvec)
        return vfmig_fail(err, EINVAL, "simvf identity: %u MSI-X vectors in the stream, %u here", got->nvec,
                          want->nvec);
    for (int i = 0; i < 6; i++)
        if (got->bar_size[i] != want->bar_size[i])
            return vfmig_fail(err, EINVAL, "simvf identity: BAR%d is %u bytes in the stream, %u here", i,
                              got->bar_size[i], want->bar_size[i]);
    if (got->migration != want->migration)
        return vfmig_fail(err, EINVAL, "simvf identity: migration capability %s in the stream, %s here",
                          got->migration ? "on" : "off", want->migration ? "on" : "off");
    return 0;
}

int simvf_loader_init(struct simvf_loader *l, const struct simvf_ident *want, uint8_t *table, uint64_t table_bytes)
{
    memset(l, 0, sizeof(*l));
    l->want = *want;
    l->table = table;
    l->table_bytes = table_bytes;
    /* The largest section there can be; the header's len is checked before a byte is buffered. */
    l->buf = malloc(sizeof(struct simvf_sec_hdr) + SIMVF_PCI_MAX + SIMVF_TABLE_SECTION);
    l->pci = malloc(SIMVF_PCI_MAX);
    l->covered = calloc((table_bytes / SIMVF_CHUNK + 64) / 64, sizeof(uint64_t));
    if (!l->buf || !l->pci || !l->covered) {
        simvf_loader_free(l);
        return -ENOMEM;
    }
    return 0;
}

void simvf_loader_free(struct simvf_loader *l)
{
    free(l->buf);
    free(l->pci);
    free(l->covered);
    l->buf = l->pci = NULL;
    l->covered = NULL;
}

/* The payload size a section of this type may have; 0 for an unknown type. */
static uint32_t max_len(uint32_t type)
{
    switch (type) {
    case SIMVF_SEC_IDENT: return sizeof(struct simvf_ident);
    case SIMVF_SEC_TABLE: return SIMVF_TABLE_SECTION;
    case SIMVF_SEC_PCI: return SIMVF_PCI_MAX;
    case SIMVF_SEC_REGS: return sizeof(struct simvf_regs);
    case SIMVF_SEC_END: return 0;
    }
    return 0;
}

static int check_hdr(struct simvf_loader *l, const struct simvf_sec_hdr *h, struct vfmig_err *err)
{
    uint64_t at = l->total - sizeof(*h);
    if (h->magic != SIMVF_SEC_MAGIC)
        return vfmig_fail(err, EPROTO, "simvf state: no section header at stream byte %llu (magic 0x%08x)",
                          (unsigned long long)at, h->magic);
    if (h->version != SIMVF_SEC_VERSION)
        return vfmig_fail(err, EPROTO, "simvf state: section version %u at byte %llu; this device reads version %u",
                          h->version, (unsigned long long)at, SIMVF_SEC_VERSION);
    if (h->type < SIMVF_SEC_IDENT || h->type > SIMVF_SEC_END)
        return vfmig_fail(err, EPROTO, "simvf state: unknown section type %u at byte %llu", h->type,
                          (unsigned long long)at);
    if (l->seen_end)
        return vfmig_fail(err, EPROTO, "simvf state: a %s section after END", sec_name(h->type));
    if (!l->seen_ident && h->type != SIMVF_SEC_IDENT)
        return vfmig_fail(err, EPROTO, "simvf state: the stream starts with %s, not IDENT", sec_name(h->type));
    if (l->seen_ident && h->type == SIMVF_SEC_IDENT)
        return vfmig_fail(err, EPROTO, "simvf state: a second IDENT section");
    uint32_t max = max_len(h->type);
    int exact = h->type == SIMVF_SEC_IDENT || h->type == SIMVF_SEC_REGS || h->type == SIMVF_SEC_END;
    if (h->len > max || (exact && h->len != max))
        return vfmig_fail(err, EMSGSIZE, "simvf state: %s section of %u bytes (%s %u)", sec_name(h->type), h->len,
                          exact ? "must be" : "at most", max);
    if (h->type == SIMVF_SEC_TABLE && (h->offset > l->table_bytes || h->len > l->table_bytes - h->offset))
        return vfmig_fail(err, EMSGSIZE, "simvf state: TABLE section [%llu, +%u) beyond the %llu-byte table",
                          (unsigned long long)h->offset, h->len, (unsigned long long)l->table_bytes);
    if (h->type == SIMVF_SEC_TABLE &&
        (h->offset % SIMVF_CHUNK || (h->len % SIMVF_CHUNK && h->offset + h->len != l->table_bytes)))
        return vfmig_fail(err, EPROTO, "simvf state: TABLE section [%llu, +%u) is not whole %u-byte chunks",
                          (unsigned long long)h->offset, h->len, SIMVF_CHUNK);
    if (h->type != SIMVF_SEC_TABLE && h->offset)
        return vfmig_fail(err, EPROTO, "simvf state: %s section with offset %llu", sec_name(h->type),
                          (unsigned long long)h->offset);
    return 0;
}

/* A whole section is in l->buf: check its CRC, then take it. */
static int take_section(struct simvf_loader *l, struct vfmig_err *err)
{
    struct simvf_sec_hdr h;
    memcpy(&h, l->buf, sizeof(h));
    const uint8_t *p = l->buf + sizeof(h);
    if (sec_crc(&h, p, h.len) != h.crc)
        return vfmig_fail(err, EBADMSG, "simvf state: %s section %llu fails its CRC", sec_name(h.type),
                          (unsigned long long)l->sections);
    switch (h.type) {
    case SIMVF_SEC_IDENT: {
        struct simvf_ident id;
        memcpy(&id, p, sizeof(id));
        int r = simvf_ident_check(&l->want, &id, err);
        if (r < 0)
            return r;
        l->seen_ident = 1;
        break;
    }
    case SIMVF_SEC_TABLE:
        memcpy(l->table + h.offset, p, h.len);
        for (uint64_t c = h.offset / SIMVF_CHUNK; c < (h.offset + h.len + SIMVF_CHUNK - 1) / SIMVF_CHUNK; c++)
            l->covered[c / 64] |= 1ull << (c % 64);
        break;
    case SIMVF_SEC_PCI:
        memcpy(l->pci, p, h.len);
        l->pci_len = h.len;
        break;
    case SIMVF_SEC_REGS: {
        struct simvf_regs r;
        memcpy(&r, p, sizeof(r));
        int rc = simvf_regs_check(&r, err);
        if (rc < 0)
            return rc;
        l->regs = r;
        l->seen_regs = 1;
        break;
    }
    case SIMVF_SEC_END:
        l->seen_end = 1;
        break;
    }
    l->sections++;
    l->have = 0;
    return 0;
}

int simvf_loader_feed(struct simvf_loader *l, const uint8_t *data, size_t len, struct vfmig_err *err)
{
    const size_t hsz = sizeof(struct simvf_sec_hdr);
    while (len) {
        size_t need;
        if (l->have < hsz) {
            need = hsz - l->have;
        } else {
            struct simvf_sec_hdr h;
            memcpy(&h, l->buf, hsz);
            need = hsz + h.len - l->have;
        }
        size_t n = len < need ? len : need;
        memcpy(l->buf + l->have, data, n);
        l->have += n;
        l->total += n;
        data += n;
        len -= n;
        if (l->have == hsz) {
            struct simvf_sec_hdr h;
            memcpy(&h, l->buf, hsz);
            int r = check_hdr(l, &h, err);
            if (r < 0)
                return r;
        }
        if (l->have >= hsz) {
            struct simvf_sec_hdr h;
            memcpy(&h, l->buf, hsz);
            if (l->have == hsz + h.len) {
                int r = take_section(l, err);
                if (r < 0)
                    return r;
            }
        }
    }
    return 0;
}

int simvf_loader_finish(const struct simvf_loader *l, struct vfmig_err *err)
{
    if (l->have)
        return vfmig_fail(err, EINVAL, "simvf state: the stream ends inside a section (%zu of its bytes arrived)",
                          l->have);
    if (!l->seen_end)
        return vfmig_fail(err, EINVAL, "simvf state: the stream ended after %llu bytes without its END section",
                          (unsigned long long)l->total);
    if (!l->pci_len)
        return vfmig_fail(err, EINVAL, "simvf state: no PCI section");
    if (!l->seen_regs)
        return vfmig_fail(err, EINVAL, "simvf state: no REGS section");
    /* A stream that skipped part of the table would leave the destination's power-on bytes there. */
    for (uint64_t c = 0; c < (l->table_bytes + SIMVF_CHUNK - 1) / SIMVF_CHUNK; c++)
        if (!(l->covered[c / 64] >> (c % 64) & 1))
            return vfmig_fail(err, EINVAL, "simvf state: table bytes [%llu, +%u) never arrived",
                              (unsigned long long)c * SIMVF_CHUNK, SIMVF_CHUNK);
    return 0;
}
