/* The VFIO uAPI v2 device migration state machine, shared by every migratable device model:
 * the kernel's next-state table, the walk one arc at a time, and which state allows which data
 * access. A device model supplies only the arcs and the data (struct vfmig_mig_ops). */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "vfmig/migstate.h"

#define NSTATES VFMIG_MIG__COUNT
#define ALL_FLAGS (VFMIG_MIGF_STOP_COPY | VFMIG_MIGF_P2P | VFMIG_MIGF_PRE_COPY)

static const char *const names[NSTATES] = {
    "ERROR", "STOP", "RUNNING", "STOP_COPY", "RESUMING", "RUNNING_P2P", "PRE_COPY", "PRE_COPY_P2P",
};

/* One letter per state, in enum order (ERROR Stop Running Copy resuMing P2p preX preY), so that
 * the table below fits on a screen and reads as a matrix. */
static const char letters[] = "ESRCMPXY";

/* next_hop[cur][target]: the next state on the way from cur to target for a device that has
 * every optional state, as the kernel's vfio_from_fsm_table defines it. Columns in enum order:
 *                                      target: E S R C M P X Y */
static const char next_hop[NSTATES][NSTATES + 1] = {
    [VFMIG_MIG_ERROR] = /*               */ "EEEEEEEE",
    [VFMIG_MIG_STOP] = /*                */ "ESPCMPPP",
    [VFMIG_MIG_RUNNING] = /*             */ "EPRPPPXP",
    [VFMIG_MIG_STOP_COPY] = /*           */ "ESSCSSEE",
    [VFMIG_MIG_RESUMING] = /*            */ "ESSSMSSS",
    [VFMIG_MIG_RUNNING_P2P] = /*         */ "ESRSSPRY",
    [VFMIG_MIG_PRE_COPY] = /*            */ "ERRYRRXY",
    [VFMIG_MIG_PRE_COPY_P2P] = /*        */ "EPPCPPXY",
};

/* The device flags a state needs. ERROR needs a flag no device has: it is never a target and
 * never a state to leave, exactly as the kernel's ~0U entry does. */
static const uint32_t needs[NSTATES] = {
    [VFMIG_MIG_ERROR] = ~0u,
    [VFMIG_MIG_STOP] = VFMIG_MIGF_STOP_COPY,
    [VFMIG_MIG_RUNNING] = VFMIG_MIGF_STOP_COPY,
    [VFMIG_MIG_STOP_COPY] = VFMIG_MIGF_STOP_COPY,
    [VFMIG_MIG_RESUMING] = VFMIG_MIGF_STOP_COPY,
    [VFMIG_MIG_RUNNING_P2P] = VFMIG_MIGF_STOP_COPY | VFMIG_MIGF_P2P,
    [VFMIG_MIG_PRE_COPY] = VFMIG_MIGF_STOP_COPY | VFMIG_MIGF_PRE_COPY,
    [VFMIG_MIG_PRE_COPY_P2P] = VFMIG_MIGF_STOP_COPY | VFMIG_MIGF_P2P | VFMIG_MIGF_PRE_COPY,
};

static int has_state(uint32_t flags, unsigned s)
{
    return s < NSTATES && s != VFMIG_MIG_ERROR && (needs[s] & flags) == needs[s];
}

static enum vfmig_mig_state hop(unsigned cur, unsigned target)
{
    return (enum vfmig_mig_state)(strchr(letters, next_hop[cur][target]) - letters);
}

const char *vfmig_mig_state_name(int state)
{
    return state >= 0 && state < NSTATES ? names[state] : "?";
}

int vfmig_mig_next_state(uint32_t flags, enum vfmig_mig_state cur, enum vfmig_mig_state target,
                         enum vfmig_mig_state *next)
{
    if (!has_state(flags, (unsigned)cur) || !has_state(flags, (unsigned)target))
        return -EINVAL;
    /* States the device lacks are skipped by looking up again from them, as the kernel does.
     * ERROR ends the walk: the kernel's loop would keep looking it up (its flags are never
     * met), but the table only yields ERROR for a blocked pair, which is an invalid request. */
    enum vfmig_mig_state s = hop(cur, target);
    for (int hops = 0; s != VFMIG_MIG_ERROR && !has_state(flags, s); hops++) {
        if (hops == NSTATES)
            return -EINVAL; /* cannot happen with the table above; guards a bad edit of it */
        s = hop(s, target);
    }
    if (s == VFMIG_MIG_ERROR)
        return -EINVAL;
    *next = s;
    return 0;
}

int vfmig_mig_init(struct vfmig_migration *m, const struct vfmig_mig_ops *ops, void *dev, uint32_t flags)
{
    if (!m || !ops || !ops->arc || !ops->read || !ops->write || !ops->reset)
        return -EINVAL;
    if (!(flags & VFMIG_MIGF_STOP_COPY) || (flags & ~ALL_FLAGS))
        return -EINVAL;
    if ((flags & VFMIG_MIGF_PRE_COPY) && !ops->precopy_info)
        return -EINVAL;
    if (pthread_mutex_init(&m->lock, NULL) != 0)
        return -EINVAL;
    m->ops = ops;
    m->dev = dev;
    m->flags = flags;
    m->err.msg[0] = '\0';
    atomic_store(&m->state, VFMIG_MIG_RUNNING);
    return 0;
}

void vfmig_mig_destroy(struct vfmig_migration *m)
{
    if (m)
        pthread_mutex_destroy(&m->lock);
}

static enum vfmig_mig_state state_of(struct vfmig_migration *m)
{
    return (enum vfmig_mig_state)atomic_load(&m->state);
}

/* m->lock held. Puts the device in ERROR for the reason given and returns -code with err
 * filled. The first reason stays in m->err until a reset. */
__attribute__((format(printf, 4, 5))) static int enter_error(struct vfmig_migration *m, struct vfmig_err *err,
                                                             int code, const char *fmt, ...)
{
    struct vfmig_err why;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why.msg, sizeof(why.msg), fmt, ap);
    va_end(ap);
    if (state_of(m) != VFMIG_MIG_ERROR)
        m->err = why;
    atomic_store(&m->state, VFMIG_MIG_ERROR);
    return vfmig_fail(err, code, "%s", why.msg);
}

/* m->lock held: the answer to any request while in ERROR. */
static int refuse_in_error(struct vfmig_migration *m, struct vfmig_err *err)
{
    struct vfmig_err first = m->err; /* err may be &m->err */
    return vfmig_fail(err, EINVAL, "device is in ERROR (%s); only a reset leaves it", first.msg);
}

/* A device's reason, or strerror when the device left it empty. */
static const char *reason(const struct vfmig_err *why, int rc)
{
    return why->msg[0] ? why->msg : strerror(rc < 0 ? -rc : EIO);
}

static int errno_of(long rc)
{
    return rc < 0 && rc > -4096 ? (int)-rc : EIO;
}

/* m->lock held. */
static int set_state_locked(struct vfmig_migration *m, enum vfmig_mig_state target, struct vfmig_err *err)
{
    enum vfmig_mig_state from = state_of(m), cur = from, next;
    if (from == VFMIG_MIG_ERROR)
        return refuse_in_error(m, err);
    if ((unsigned)target >= NSTATES)
        return enter_error(m, err, EINVAL, "device state: %s -> %d is not a state", names[from], (int)target);
    if (target == from)
        return 0;
    if (vfmig_mig_next_state(m->flags, from, target, &next) < 0) {
        const char *why = target == VFMIG_MIG_ERROR    ? " (ERROR is never a target)"
                          : !has_state(m->flags, target) ? " (the device does not have that state)"
                                                         : "";
        return enter_error(m, err, EINVAL, "device state: %s -> %s is not a valid transition%s", names[from],
                           names[target], why);
    }
    /* One arc at a time, so a device only ever implements adjacent arcs. The walk is at most
     * five arcs; the bound guards against a table that would cycle. */
    for (int arcs = 0; cur != target; arcs++) {
        if (arcs == NSTATES || vfmig_mig_next_state(m->flags, cur, target, &next) < 0)
            return enter_error(m, err, EINVAL, "device state: %s -> %s: no path from %s", names[from],
                               names[target], names[cur]);
        struct vfmig_err why = {{0}};
        int rc = m->ops->arc(m->dev, cur, next, &why);
        if (rc < 0) {
            if (cur == from && next == target)
                return enter_error(m, err, errno_of(rc), "device state: %s -> %s failed: %s", names[cur],
                                   names[next], reason(&why, rc));
            return enter_error(m, err, errno_of(rc), "device state: %s -> %s (on the way to %s) failed: %s",
                               names[cur], names[next], names[target], reason(&why, rc));
        }
        atomic_store(&m->state, next);
        cur = next;
    }
    return 0;
}

int vfmig_mig_set_state(struct vfmig_migration *m, enum vfmig_mig_state target, struct vfmig_err *err)
{
    pthread_mutex_lock(&m->lock);
    int rc = set_state_locked(m, target, err);
    pthread_mutex_unlock(&m->lock);
    return rc;
}

static int is_precopy(enum vfmig_mig_state s)
{
    return s == VFMIG_MIG_PRE_COPY || s == VFMIG_MIG_PRE_COPY_P2P;
}

long vfmig_mig_read(struct vfmig_migration *m, uint8_t *buf, size_t cap, struct vfmig_err *err)
{
    /* A bad buffer is the caller's mistake, not the device's: refused without touching the
     * state. cap 0 is refused because 0 means end of stream. */
    if (!buf || cap == 0)
        return vfmig_fail(err, EINVAL, "device data read: no buffer (%zu bytes)", cap);
    pthread_mutex_lock(&m->lock);
    enum vfmig_mig_state s = state_of(m);
    long rc;
    if (s == VFMIG_MIG_ERROR) {
        rc = refuse_in_error(m, err);
    } else if (!is_precopy(s) && s != VFMIG_MIG_STOP_COPY) {
        rc = enter_error(m, err, EINVAL, "device data read in %s: only PRE_COPY, PRE_COPY_P2P and STOP_COPY have data",
                         names[s]);
    } else {
        struct vfmig_err why = {{0}};
        rc = m->ops->read(m->dev, buf, cap, &why);
        if (rc == -ENOMSG && is_precopy(s))
            rc = vfmig_fail(err, ENOMSG, "device data: nothing more in %s for now", names[s]);
        else if (rc == -ENOMSG)
            rc = enter_error(m, err, EIO, "device data read in STOP_COPY: the device had nothing for now, "
                             "which only PRE_COPY may say");
        else if (rc < 0)
            rc = enter_error(m, err, errno_of(rc), "device data read in %s failed: %s", names[s],
                             reason(&why, (int)rc));
        else if ((size_t)rc > cap)
            rc = enter_error(m, err, EIO, "device data read in %s: the device returned %ld bytes for %zu", names[s],
                             rc, cap);
    }
    pthread_mutex_unlock(&m->lock);
    return rc;
}

long vfmig_mig_write(struct vfmig_migration *m, const uint8_t *buf, size_t len, struct vfmig_err *err)
{
    if ((!buf && len) || len > (size_t)INT64_MAX)
        return vfmig_fail(err, EINVAL, "device data write: no buffer (%zu bytes)", len);
    pthread_mutex_lock(&m->lock);
    enum vfmig_mig_state s = state_of(m);
    long rc;
    if (s == VFMIG_MIG_ERROR) {
        rc = refuse_in_error(m, err);
    } else if (s != VFMIG_MIG_RESUMING) {
        rc = enter_error(m, err, EINVAL, "device data write in %s: only RESUMING takes data", names[s]);
    } else if (len == 0) {
        rc = 0;
    } else {
        struct vfmig_err why = {{0}};
        rc = m->ops->write(m->dev, buf, len, &why);
        if (rc < 0)
            rc = enter_error(m, err, errno_of(rc), "device data write in RESUMING failed: %s", reason(&why, (int)rc));
        else if (rc != 0 && (size_t)rc != len)
            rc = enter_error(m, err, EIO, "device data write in RESUMING: the device took %ld of %zu bytes", rc, len);
        else
            rc = (long)len; /* the hook may answer 0 or len for "all of it" */
    }
    pthread_mutex_unlock(&m->lock);
    return rc;
}

int vfmig_mig_precopy_info(struct vfmig_migration *m, uint64_t *initial_bytes, uint64_t *dirty_bytes,
                           struct vfmig_err *err)
{
    pthread_mutex_lock(&m->lock);
    enum vfmig_mig_state s = state_of(m);
    int rc;
    if (s == VFMIG_MIG_ERROR) {
        rc = refuse_in_error(m, err);
    } else if (!is_precopy(s)) {
        /* As the kernel's VFIO_MIG_GET_PRECOPY_INFO: refused, and the state stays. */
        rc = vfmig_fail(err, EINVAL, "precopy info in %s: only PRE_COPY and PRE_COPY_P2P have it", names[s]);
    } else {
        struct vfmig_err why = {{0}};
        uint64_t initial = 0, dirty = 0;
        rc = m->ops->precopy_info(m->dev, &initial, &dirty, &why);
        if (rc < 0) {
            rc = vfmig_fail(err, errno_of(rc), "precopy info in %s failed: %s", names[s], reason(&why, rc));
        } else {
            rc = 0;
            if (initial_bytes)
                *initial_bytes = initial;
            if (dirty_bytes)
                *dirty_bytes = dirty;
        }
    }
    pthread_mutex_unlock(&m->lock);
    return rc;
}

int vfmig_mig_reset(struct vfmig_migration *m, struct vfmig_err *err)
{
    pthread_mutex_lock(&m->lock);
    struct vfmig_err why = {{0}};
    int rc = m->ops->reset(m->dev, &why);
    if (rc < 0) {
        /* The device is in no known state: ERROR, with this as the new first reason. */
        struct vfmig_err first;
        vfmig_fail(&first, 0, "device reset failed: %s", reason(&why, rc));
        m->err = first;
        atomic_store(&m->state, VFMIG_MIG_ERROR);
        rc = vfmig_fail(err, errno_of(rc), "%s", first.msg);
    } else {
        rc = 0;
        m->err.msg[0] = '\0';
        atomic_store(&m->state, VFMIG_MIG_RUNNING);
    }
    pthread_mutex_unlock(&m->lock);
    return rc;
}

int vfmig_mig_prestop(struct vfmig_migration *m, uint64_t deadline_ns, struct vfmig_prestop_result *out,
                      struct vfmig_err *err)
{
    uint64_t t0 = vfmig_now_ns();
    *out = (struct vfmig_prestop_result){.outcome = VFMIG_HS_DISABLED, .start_ns = t0, .end_ns = t0};
    if (!m->ops->prestop)
        return 0;
    /* m->lock only serialises the device's migration hooks; no vCPU, interrupt or device path
     * takes it, so holding it while the hook waits for the guest blocks nobody the guest needs. */
    pthread_mutex_lock(&m->lock);
    struct vfmig_err why = {{0}};
    int rc = m->ops->prestop(m->dev, deadline_ns, out, &why);
    if (rc < 0)
        rc = vfmig_fail(err, errno_of(rc), "device pre-stop failed: %s", reason(&why, rc));
    else
        rc = 0;
    pthread_mutex_unlock(&m->lock);
    return rc;
}

void vfmig_mig_prestop_abort(struct vfmig_migration *m)
{
    if (!m->ops->prestop_abort)
        return;
    pthread_mutex_lock(&m->lock);
    m->ops->prestop_abort(m->dev);
    pthread_mutex_unlock(&m->lock);
}

const char *vfmig_hs_outcome_name(uint32_t outcome)
{
    static const char *names[VFMIG_HS__COUNT] = {"none", "acked", "timeout", "late", "disabled"};
    return outcome < VFMIG_HS__COUNT ? names[outcome] : "?";
}

int vfmig_mig_set_running(struct vfmig_migration *m, int running, struct vfmig_err *err)
{
    pthread_mutex_lock(&m->lock);
    enum vfmig_mig_state s = state_of(m);
    int rc;
    if (running) {
        /* From RESUMING this walks RESUMING -> STOP -> RUNNING: the device applies what it loaded. */
        rc = set_state_locked(m, VFMIG_MIG_RUNNING, err);
    } else if (is_precopy(s)) {
        rc = set_state_locked(m, VFMIG_MIG_STOP_COPY, err);
    } else if (s == VFMIG_MIG_ERROR) {
        rc = refuse_in_error(m, err);
    } else if (s == VFMIG_MIG_STOP_COPY || s == VFMIG_MIG_STOP || s == VFMIG_MIG_RESUMING) {
        rc = 0; /* already stopped: a migration's stop-copy, or a destination loading */
    } else {
        rc = set_state_locked(m, VFMIG_MIG_STOP, err);
    }
    pthread_mutex_unlock(&m->lock);
    return rc;
}
