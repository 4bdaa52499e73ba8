/* Delta pages (the XBZRLE idea, in vfmig's own format; docs/stream-format.md §3b): a bounded
 * cache of the last-sent content of re-dirtied pages, and an XOR delta with zero-run encoding.
 *
 * A page's delta body is a sequence of chunks, each LEB128(skip) LEB128(len) then len bytes:
 * skip bytes of the page are unchanged, the next len bytes are XORed with the given ones. The
 * chunks cover at most the page; what follows the last one is unchanged. len >= 1, and each
 * LEB128 has at most 2 bytes (values < 4096): anything else is a corrupt delta. */
#ifndef VFMIG_DELTA_H
#define VFMIG_DELTA_H
#include <stddef.h>
#include <stdint.h>

#include "vfmig/guest_abi.h"

/* A delta must be smaller than the page with its 2-byte length, or the page goes raw. */
#define VFMIG_DELTA_MAX (VFMIG_PAGE_SIZE - 2 - 1)

/* Encode cur ^ old into out (room for VFMIG_DELTA_MAX bytes). cur may be live guest memory
 * that changes meanwhile: the bytes written are what vfmig_delta_apply reproduces, so applying
 * out to old (as the destination does to its copy) gives both ends the same page. Returns the
 * length (0: unchanged), or -1 when the delta would not be smaller than the page. Pure. */
int vfmig_delta_encode(const uint8_t *cur, const uint8_t *old, uint8_t *out);

/* Apply a delta body of len bytes to page. Returns 0, or -1 for a malformed body (page may
 * then be partly changed: the caller fails the migration). Pure. */
int vfmig_delta_apply(uint8_t *page, const uint8_t *body, size_t len);

/* The source's cache, one per page channel (a page always travels on one channel, so no lock):
 * direct-mapped by the page's position in its channel's stripes, so a contiguous working set of
 * up to nslots pages per channel never evicts itself. A slot hit or filled in this round is not
 * taken by another page in the same round: a working set larger than the cache then keeps the
 * share that fits, where a plain direct map (or LRU) would evict every page before its next use
 * and hit nothing. Owned by its channel's thread. */
struct vfmig_delta_cache {
    uint64_t nslots;
    uint64_t *tag;   /* page index + 1, 0: empty */
    uint32_t *used;  /* the round the slot was last hit or filled in */
    uint8_t *data;   /* nslots pages */
};

/* 0, or -1 when out of memory (c is then empty and may be freed). */
int vfmig_delta_cache_init(struct vfmig_delta_cache *c, uint64_t nslots);
void vfmig_delta_cache_free(struct vfmig_delta_cache *c);
/* The slot's content if it holds page `page`, else NULL. */
static inline uint8_t *vfmig_delta_cache_get(struct vfmig_delta_cache *c, uint64_t slot, uint64_t page)
{
    return c->nslots && c->tag[slot % c->nslots] == page + 1 ? c->data + (slot % c->nslots) * VFMIG_PAGE_SIZE
                                                             : NULL;
}
#endif
