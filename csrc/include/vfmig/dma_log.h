/* Device DMA dirty logging with VFIO's semantics (VFIO_DEVICE_FEATURE_DMA_LOGGING_START /
 * _REPORT / _STOP): start with IOVA ranges and a page size, report-and-clear a range into a
 * bitmap, stop. Every device that writes guest RAM by DMA (the DMA engine, simvf) logs through
 * one of these, and the dirty tracker drains them all the same way (dirty_set.c). IOVA = GPA. */
#ifndef VFMIG_DMA_LOG_H
#define VFMIG_DMA_LOG_H
#include <stdatomic.h>
#include <stdint.h>

#include "vfmig/util.h"

struct vfmig_vm;

#define VFMIG_DMA_LOG_MAX_RANGES 8

struct vfmig_dma_range {
    uint64_t iova, length;
};

struct vfmig_dma_log {
    struct vfmig_vm *vm;
    _Atomic uint64_t *bits;   /* one bit per 4 KiB RAM page (RAM page index, as the dirty set) */
    uint64_t npages;
    _Atomic int logging;      /* between start and stop */
    _Atomic int broken;       /* test knob: marks are dropped, to prove the log matters */
    _Atomic uint64_t pages_logged; /* bits reported (at the report's page size) since the last start */
    uint64_t page_size;
    uint32_t nranges;
    struct vfmig_dma_range ranges[VFMIG_DMA_LOG_MAX_RANGES];
};

/* Allocates the bitmap for all of vm's RAM. Lifecycle thread. 0 or -ENOMEM. */
int vfmig_dma_log_init(struct vfmig_dma_log *l, struct vfmig_vm *vm);
void vfmig_dma_log_free(struct vfmig_dma_log *l);

/* Start logging [iova, iova+length) ranges (each inside RAM, page aligned, 1..MAX_RANGES of them)
 * at page_size granularity (a power of two, 4 KiB..1 GiB). Clears the log. Migration thread.
 * 0, -EINVAL with err saying which argument is wrong, -EBUSY if already started. */
int vfmig_dma_log_start(struct vfmig_dma_log *l, const struct vfmig_dma_range *ranges, uint32_t nranges,
                        uint64_t page_size, struct vfmig_err *err);
/* Report-and-clear: for [iova, iova+length) (page_size aligned, inside one started range), set
 * bit i of bitmap when page i at page_size was written since the last report, and clear those
 * pages in the log. bitmap has length/page_size bits, zeroed by the caller. page_size may differ
 * from the start's: a page smaller than the log's is dirty when its log page is. Migration
 * thread, concurrent with marks (lock-free). 0, -EINVAL (err says why), -ENOENT if not started. */
int vfmig_dma_log_report(struct vfmig_dma_log *l, uint64_t iova, uint64_t length, uint64_t page_size,
                         uint64_t *bitmap, struct vfmig_err *err);
/* Stop logging; marks are ignored from here. Migration thread. Always 0. */
int vfmig_dma_log_stop(struct vfmig_dma_log *l);

/* A device wrote [gpa, gpa+len) by DMA. Any thread, lock-free; call after the data landed (a
 * report in between just sends the page one round later). No-op when not logging (or broken);
 * the parts outside RAM are ignored, those outside the started ranges are never reported. */
void vfmig_dma_log_mark(struct vfmig_dma_log *l, uint64_t gpa, uint64_t len);

/* The dirty tracker's side: start over all of RAM at 4 KiB (one range per slot; -EBUSY if
 * started) / OR everything logged in the started ranges into bits (one bit per RAM page index)
 * and clear (-ENOENT if not started) / stop. Migration thread. 0 or -errno with err. */
int vfmig_dma_log_start_all(struct vfmig_dma_log *l, struct vfmig_err *err);
int vfmig_dma_log_drain_all(struct vfmig_dma_log *l, uint64_t *bits, struct vfmig_err *err);

#endif
