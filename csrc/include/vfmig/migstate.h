/* Device migration in the VFIO uAPI v2 model: one state machine, one chunked data stream and
 * precopy info, shared by every migratable device model (simvf now, the VFIO backend later), so
 * the emulated VF and a real one cannot drift apart. The engine drives devices only through this
 * header; a device without it (d->mig == NULL) keeps the plain save/load hooks of device.h. */
#ifndef VFMIG_MIGSTATE_H
#define VFMIG_MIGSTATE_H
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "vfmig/util.h"

/* Values equal the kernel's enum vfio_device_mig_state. */
enum vfmig_mig_state {
    VFMIG_MIG_ERROR = 0,
    VFMIG_MIG_STOP = 1,
    VFMIG_MIG_RUNNING = 2,
    VFMIG_MIG_STOP_COPY = 3,
    VFMIG_MIG_RESUMING = 4,
    VFMIG_MIG_RUNNING_P2P = 5,
    VFMIG_MIG_PRE_COPY = 6,
    VFMIG_MIG_PRE_COPY_P2P = 7,
    VFMIG_MIG__COUNT
};

/* What the device supports, as VFIO_MIGRATION_STOP_COPY / _P2P / _PRE_COPY. STOP_COPY is
 * mandatory; without P2P the *_P2P states are skipped, without PRE_COPY the PRE_COPY states. */
#define VFMIG_MIGF_STOP_COPY 0x1u
#define VFMIG_MIGF_P2P       0x2u
#define VFMIG_MIGF_PRE_COPY  0x4u

struct vfmig_migration;

/* The guest handshake's outcome (the pre-stop hook of a device with the migration capability).
 * It travels with the device's state, so the destination knows whether the driver quiesced. */
enum vfmig_hs_outcome {
    VFMIG_HS_NONE = 0,     /* no handshake was asked for */
    VFMIG_HS_ACKED = 1,    /* the driver acked before the deadline */
    VFMIG_HS_TIMEOUT = 2,  /* no ack by the deadline: the migration went on */
    VFMIG_HS_LATE = 3,     /* acked after the deadline (before the stop): treated as a timeout */
    VFMIG_HS_DISABLED = 4, /* deadline 0, or the driver never enabled the capability */
    VFMIG_HS__COUNT
};

struct vfmig_prestop_result {
    uint32_t outcome;      /* enum vfmig_hs_outcome */
    uint32_t latency_us;   /* ACKED/LATE: from raising the interrupt to the ack */
    uint64_t start_ns, end_ns; /* CLOCK_MONOTONIC: when the hook started and returned */
};

/* Implemented by a device model. Every hook is called by migstate.c only, on the thread that
 * drives the migration, with m->lock held (so hooks never race each other); a hook must not
 * wait for a vCPU, and may wait only for the device's own threads. Each returns 0 (or a byte
 * count) or -errno with err saying why in words. */
struct vfmig_mig_ops {
    /* Take one arc of the kernel's state diagram (from -> to are adjacent, never ERROR). */
    int (*arc)(void *dev, enum vfmig_mig_state from, enum vfmig_mig_state to, struct vfmig_err *err);
    /* data_fd read in PRE_COPY, PRE_COPY_P2P or STOP_COPY: up to cap bytes of the device's
     * stream. > 0 bytes; 0: end of stream (STOP_COPY: everything is out); -ENOMSG: PRE_COPY has
     * nothing more for now. */
    long (*read)(void *dev, uint8_t *buf, size_t cap, struct vfmig_err *err);
    /* data_fd write in RESUMING: consumes all of buf (any split of the stream is valid) or fails. */
    long (*write)(void *dev, const uint8_t *buf, size_t len, struct vfmig_err *err);
    /* PRE_COPY states: bytes of the initial image not yet read, and bytes dirtied since read. */
    int (*precopy_info)(void *dev, uint64_t *initial_bytes, uint64_t *dirty_bytes, struct vfmig_err *err);
    /* Back to RUNNING from any state, ERROR included, as a function-level reset would. */
    int (*reset)(void *dev, struct vfmig_err *err);
    /* Optional (NULL: nothing to do). Called while the vCPUs still run, just before the engine
     * stops the VM; returns by deadline_ns (CLOCK_MONOTONIC) whatever the guest does, with out
     * filled. The guest handshake. Holds no lock a vCPU, interrupt or device path takes while it
     * waits. Never fails the migration: an error here is reported, and the migration goes on. */
    int (*prestop)(void *dev, uint64_t deadline_ns, struct vfmig_prestop_result *out, struct vfmig_err *err);
    /* Optional. The migration failed after prestop ran and the source VM runs on: tell the
     * guest (the driver resumes its queues). Migration thread, m->lock held (it serialises the
     * device's migration hooks; no vCPU, interrupt or device path takes it). */
    void (*prestop_abort)(void *dev);
};

struct vfmig_migration {
    const struct vfmig_mig_ops *ops;
    void *dev;
    uint32_t flags;           /* VFMIG_MIGF_* */
    _Atomic int state;        /* enum vfmig_mig_state; device threads may read it lock-free */
    pthread_mutex_t lock;     /* serialises the calls below; no other path takes it */
    struct vfmig_err err;     /* why the device entered ERROR (under lock) */
};

/* Pure: the next state on the way from cur to target, computed as the kernel's
 * vfio_mig_get_next_state does. 0 with *next set (cur itself when cur == target), or -EINVAL
 * with *next untouched (target unreachable: ERROR is never a target, nothing leaves ERROR, flags
 * lack cur or target, STOP_COPY never returns to PRE_COPY*). Any thread. */
int vfmig_mig_next_state(uint32_t flags, enum vfmig_mig_state cur, enum vfmig_mig_state target,
                         enum vfmig_mig_state *next);
const char *vfmig_mig_state_name(int state); /* "RUNNING", ...; "?" when out of range */

/* Starts in RUNNING. flags must include VFMIG_MIGF_STOP_COPY. 0 or -EINVAL. */
int vfmig_mig_init(struct vfmig_migration *m, const struct vfmig_mig_ops *ops, void *dev, uint32_t flags);
void vfmig_mig_destroy(struct vfmig_migration *m);

/* The calls below: the migration-driving thread (any thread; m->lock serialises them), never
 * blocking on vCPUs. Each returns 0 (or bytes) or -errno with err filled. Any failure of a
 * transition, an invalid request (unreachable target, reading or writing in the wrong state), or
 * a data error in read/write puts the device in ERROR, keeping the first reason in m->err; only
 * vfmig_mig_reset leaves ERROR. In ERROR every call but reset and prestop fails with -EINVAL.
 * Not device errors, so the state stays: a NULL buffer or a 0-byte read (0 means end of
 * stream), precopy_info outside PRE_COPY* or failing in the device (as the kernel's ioctl), and
 * prestop. Requesting the current state succeeds without an arc. */
int vfmig_mig_set_state(struct vfmig_migration *m, enum vfmig_mig_state target, struct vfmig_err *err);
/* Bytes (1..cap), 0 at end of stream, -ENOMSG in PRE_COPY* when the device has nothing for
 * now (no ERROR); -ENOMSG in STOP_COPY is a device error. */
long vfmig_mig_read(struct vfmig_migration *m, uint8_t *buf, size_t cap, struct vfmig_err *err);
/* len (the hook may answer 0 or len for "all of it"); 0 for an empty write in RESUMING. */
long vfmig_mig_write(struct vfmig_migration *m, const uint8_t *buf, size_t len, struct vfmig_err *err);
int vfmig_mig_precopy_info(struct vfmig_migration *m, uint64_t *initial_bytes, uint64_t *dirty_bytes,
                           struct vfmig_err *err);
/* RUNNING with m->err cleared; if the device's reset fails, ERROR with that as the reason. */
int vfmig_mig_reset(struct vfmig_migration *m, struct vfmig_err *err);
/* The pre-stop hook with a deadline; 0 when the device has none. Does not change the state. */
int vfmig_mig_prestop(struct vfmig_migration *m, uint64_t deadline_ns, struct vfmig_prestop_result *out,
                      struct vfmig_err *err);
/* prestop_abort if the device has one. Migration thread. */
void vfmig_mig_prestop_abort(struct vfmig_migration *m);
const char *vfmig_hs_outcome_name(uint32_t outcome); /* "acked", "timeout", ...; "?" out of range */
static inline enum vfmig_mig_state vfmig_mig_get_state(struct vfmig_migration *m)
{
    return (enum vfmig_mig_state)atomic_load(&m->state);
}

/* What a VM pause/resume means for a migratable device, as QEMU's vfio_vmstate_change does:
 * stopping moves PRE_COPY* to STOP_COPY (a migration is under way) and anything else to STOP;
 * running moves to RUNNING (from RESUMING this is where the loaded state is applied). */
int vfmig_mig_set_running(struct vfmig_migration *m, int running, struct vfmig_err *err);

#endif
