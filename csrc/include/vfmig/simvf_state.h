/* simvf's migration data: the byte stream its VFIO-style data_fd carries (docs/device-state.md
 * § simvf). A sequence of sections, each with a fixed header and a CRC32C; written by the source
 * device in PRE_COPY and STOP_COPY, parsed incrementally by a RESUMING device from chunks of any
 * size. Pure code: no KVM, no threads (simvf.c owns those), so the fuzzers reach all of it. */
#ifndef VFMIG_SIMVF_STATE_H
#define VFMIG_SIMVF_STATE_H
#include <stddef.h>
#include <stdint.h>

#include "vfmig/util.h"

#define SIMVF_SEC_MAGIC 0x53465653u   /* "SVFS" */
#define SIMVF_SEC_VERSION 1u
#define SIMVF_TABLE_SECTION 65536u    /* largest TABLE payload */
#define SIMVF_CHUNK 4096u             /* precopy tracks the table in chunks of this size */
#define SIMVF_REGS_BYTES 4096u        /* the state's first 4 KiB: queue state and counters */
#define SIMVF_PCI_MAX (64u << 10)     /* largest PCI section payload */

enum simvf_sec_type {
    SIMVF_SEC_IDENT = 1, /* identity: must come first, must match the destination device */
    SIMVF_SEC_TABLE = 2, /* bytes of the flow table at a SIMVF_CHUNK-aligned offset, whole chunks
                          * (or up to the table's end); later sections overwrite earlier */
    SIMVF_SEC_PCI = 3,   /* the PCI function's state (pci.h vfmig_pci_save) */
    SIMVF_SEC_REGS = 4,  /* queue pointers, counters, the wire */
    SIMVF_SEC_END = 5,   /* nothing may follow */
};

struct simvf_sec_hdr {
    uint32_t magic;
    uint16_t type;
    uint16_t version;
    uint32_t len;        /* payload bytes after this header */
    uint32_t crc;        /* CRC32C of this header (crc = 0) and the payload */
    uint64_t offset;     /* TABLE: byte offset in the table; other sections: 0 */
};

struct simvf_ident {
    uint16_t vendor, device;
    uint8_t revision, migration;   /* migration: the migration capability is present */
    uint16_t nvec;                 /* MSI-X vectors */
    uint32_t bar_size[6];
    uint64_t state_bytes;          /* REGS_BYTES + table bytes */
};

/* Queue state and counters: what the device's registers and DMA engines hold. */
struct simvf_regs {                /* 104 bytes, no padding */
    uint32_t ctrl;                 /* SIMVF_CTRL_ENABLE */
    uint32_t rx_size, tx_size;     /* ring entries: 0 or a power of two 8..SIMVF_RING_MAX */
    uint32_t rx_head, tx_head;     /* next descriptor the device uses, < size */
    uint32_t rng;                  /* the table updater's PRNG */
    uint64_t rx_ring, tx_ring;     /* GPAs, 16-byte aligned */
    uint64_t sent, delivered, dropped; /* sent == delivered + dropped */
    uint64_t tx_ok, tx_bad, table_updates, interrupts;
    uint64_t stopped_at_ns;        /* CLOCK_REALTIME when the wire stopped: drops while away */
};
_Static_assert(sizeof(struct simvf_regs) == 104, "simvf_regs has padding");
_Static_assert(sizeof(struct simvf_ident) == 40, "simvf_ident has padding");

/* Writes one section (header + payload) at out, which has room for sizeof header + len.
 * The payload may already sit at out + sizeof header (built in place). Returns the bytes written. Pure. */
size_t simvf_sec_put(uint8_t *out, uint16_t type, uint64_t offset, const void *payload, uint32_t len);

/* Checks a REGS payload: sizes, ring geometry, counter identities. Pure. 0 or -EINVAL with err. */
int simvf_regs_check(const struct simvf_regs *r, struct vfmig_err *err);

/* The incremental parser of a RESUMING device. Sections may be split across writes at any byte.
 * Every bound is checked before anything is buffered or copied. */
struct simvf_loader {
    struct simvf_ident want;       /* the destination device's identity */
    uint8_t *table;                /* where TABLE sections land (the device's own table) */
    uint64_t table_bytes;
    uint8_t *buf;                  /* the section being assembled: header, then payload */
    size_t have;                   /* bytes of it so far */
    uint64_t total;                /* stream bytes consumed */
    int seen_ident, seen_end;
    uint8_t *pci;                  /* the last PCI section's payload (checked by the device) */
    uint32_t pci_len;
    struct simvf_regs regs;
    int seen_regs;
    uint64_t sections;
    uint64_t *covered;             /* one bit per SIMVF_CHUNK of the table that some TABLE section filled */
};

/* table: table_bytes of the device's table. 0 or -ENOMEM. */
int simvf_loader_init(struct simvf_loader *l, const struct simvf_ident *want, uint8_t *table, uint64_t table_bytes);
void simvf_loader_free(struct simvf_loader *l);
/* Consume len bytes. 0, or -errno with err naming the section and the check that failed; after an
 * error the loader must not be fed again. Pure apart from writing TABLE bytes into table. */
int simvf_loader_feed(struct simvf_loader *l, const uint8_t *data, size_t len, struct vfmig_err *err);
/* The stream is over: END seen, exactly at a section boundary, with IDENT, PCI and REGS present
 * and every byte of the table sent at least once. 0 or -EINVAL with err. */
int simvf_loader_finish(const struct simvf_loader *l, struct vfmig_err *err);

/* The identity check alone, for the loader and for tests. 0 or -EINVAL naming the field. */
int simvf_ident_check(const struct simvf_ident *want, const struct simvf_ident *got, struct vfmig_err *err);

#endif
