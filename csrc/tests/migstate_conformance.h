/* The conformance suite every device implementing migstate.h must pass (the emulated VF, a real
 * VFIO backend, the fake device of test_migstate.c). It knows the device only through
 * migstate.h, so one suite holds them all to the same contract:
 *   - every (current, target) pair of the 8 states ends in target when the kernel's table can
 *     reach it under the device's flags, and otherwise fails with -EINVAL, puts the device in
 *     ERROR and names both states; a reset then returns it to RUNNING;
 *   - reading outside PRE_COPY* and STOP_COPY, or writing outside RESUMING, puts it in ERROR;
 *     precopy info outside PRE_COPY* is refused with the state kept;
 *   - a STOP_COPY read loop ends with 0 (end of stream); PRE_COPY reads run dry with -ENOMSG
 *     once the initial bytes are out, and precopy info then reports no initial bytes left;
 *   - the device takes its own stream back in RESUMING and runs again (loopback), in any split.
 * What the device must accept: leaving RESUMING after its own complete stream was written, and
 * leaving RESUMING when nothing was written if its stream does not fit in the byte budget.
 *
 * vfmig_mig_conformance(m, byte_budget, log): m initialised, any state. byte_budget caps every
 * read loop and the copy of the stream kept for the loopback (0: 64 MiB); pass more than the
 * device's whole stream. Runs on the calling thread; blocks as long as the device's hooks do.
 * Returns the number of failed checks (0: conformant), each described on log. Leaves the device
 * reset (RUNNING). */
#ifndef VFMIG_MIGSTATE_CONFORMANCE_H
#define VFMIG_MIGSTATE_CONFORMANCE_H
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vfmig/migstate.h"

#define MIGCONF_CHUNK (64u << 10)

struct migconf {
    struct vfmig_migration *m;
    FILE *log;
    int failures;
    uint64_t budget;
    uint8_t *chunk;            /* one read's buffer */
    uint8_t *stream;           /* the device's stop-copy stream, for the loopback */
    uint64_t stream_len;
    int stream_whole;          /* the stream ended within the budget */
    struct vfmig_err err;
};

__attribute__((format(printf, 4, 5))) static inline void migconf_fail(struct migconf *c, int line, const char *what,
                                                                     const char *fmt, ...)
{
    va_list ap;
    fprintf(c->log, "migstate conformance (line %d): %s: ", line, what);
    va_start(ap, fmt);
    vfprintf(c->log, fmt, ap);
    va_end(ap);
    fprintf(c->log, " [state %s; last error: %s]\n", vfmig_mig_state_name(vfmig_mig_get_state(c->m)), c->err.msg);
    c->failures++;
}

/* Record a failed check with context and carry on: a report lists every broken rule. */
#define MIGCONF_CHECK(c, cond, ...)                                   \
    do {                                                              \
        if (!(cond))                                                  \
            migconf_fail((c), __LINE__, #cond, __VA_ARGS__);          \
    } while (0)

#define MIGCONF_NAME(s) vfmig_mig_state_name((int)(s))

/* The states a device with these flags has (ERROR is no state to ask for). */
static inline int migconf_has(uint32_t flags, int s)
{
    switch (s) {
    case VFMIG_MIG_STOP: case VFMIG_MIG_RUNNING: case VFMIG_MIG_STOP_COPY: case VFMIG_MIG_RESUMING:
        return (flags & VFMIG_MIGF_STOP_COPY) != 0;
    case VFMIG_MIG_RUNNING_P2P:
        return (flags & VFMIG_MIGF_STOP_COPY) && (flags & VFMIG_MIGF_P2P);
    case VFMIG_MIG_PRE_COPY:
        return (flags & VFMIG_MIGF_STOP_COPY) && (flags & VFMIG_MIGF_PRE_COPY);
    case VFMIG_MIG_PRE_COPY_P2P:
        return (flags & VFMIG_MIGF_STOP_COPY) && (flags & VFMIG_MIGF_P2P) && (flags & VFMIG_MIGF_PRE_COPY);
    default:
        return 0;
    }
}

static inline int migconf_is_precopy(int s)
{
    return s == VFMIG_MIG_PRE_COPY || s == VFMIG_MIG_PRE_COPY_P2P;
}

/* Reachability in the kernel's table, restated independently of migstate.c: between any two
 * states the device has, except that STOP_COPY never goes back to PRE_COPY*; never to or from
 * ERROR. */
static inline int migconf_reachable(uint32_t flags, int cur, int target)
{
    if (!migconf_has(flags, cur) || !migconf_has(flags, target))
        return 0;
    return !(cur == VFMIG_MIG_STOP_COPY && migconf_is_precopy(target));
}

/* Reset; 0 when the device is back in RUNNING. A device that cannot reset stops the suite. */
static inline int migconf_reset(struct migconf *c)
{
    int rc = vfmig_mig_reset(c->m, &c->err);
    MIGCONF_CHECK(c, rc == 0, "reset returned %d", rc);
    MIGCONF_CHECK(c, vfmig_mig_get_state(c->m) == VFMIG_MIG_RUNNING, "reset did not return to RUNNING");
    return rc == 0 && vfmig_mig_get_state(c->m) == VFMIG_MIG_RUNNING ? 0 : -1;
}

/* From RUNNING (after a reset) into s; ERROR by an invalid request. 0 when there. */
static inline int migconf_enter(struct migconf *c, int s)
{
    if (s == VFMIG_MIG_ERROR) {
        int rc = vfmig_mig_set_state(c->m, VFMIG_MIG_ERROR, &c->err);
        MIGCONF_CHECK(c, rc == -EINVAL, "asking for ERROR returned %d", rc);
    } else {
        int rc = vfmig_mig_set_state(c->m, (enum vfmig_mig_state)s, &c->err);
        MIGCONF_CHECK(c, rc == 0, "RUNNING -> %s returned %d", MIGCONF_NAME(s), rc);
    }
    int ok = (int)vfmig_mig_get_state(c->m) == s;
    MIGCONF_CHECK(c, ok, "driving the device from RUNNING to %s", MIGCONF_NAME(s));
    return ok ? 0 : -1;
}

/* Writes the kept stream in RESUMING in three uneven pieces (any split must do). */
static inline void migconf_load_stream(struct migconf *c)
{
    uint64_t cuts[4] = {0, c->stream_len > 0 ? 1 : 0, c->stream_len / 2 + 1, c->stream_len};
    if (cuts[2] > c->stream_len)
        cuts[2] = c->stream_len;
    for (int i = 0; i < 3; i++) {
        if (cuts[i + 1] <= cuts[i])
            continue;
        size_t len = (size_t)(cuts[i + 1] - cuts[i]);
        long rc = vfmig_mig_write(c->m, c->stream + cuts[i], len, &c->err);
        MIGCONF_CHECK(c, rc == (long)len, "RESUMING: writing bytes %llu..%llu of the device's own stream returned %ld",
                      (unsigned long long)cuts[i], (unsigned long long)cuts[i + 1], rc);
    }
}

/* Reads until end of stream in STOP_COPY, appending to c->stream from *len on. Returns 1 at
 * end of stream within the budget, else 0. */
static inline int migconf_read_to_end(struct migconf *c, uint64_t *len, const char *what)
{
    for (;;) {
        long rc = vfmig_mig_read(c->m, c->chunk, MIGCONF_CHUNK, &c->err);
        if (rc == 0)
            return 1;
        MIGCONF_CHECK(c, rc > 0 && rc <= (long)MIGCONF_CHUNK, "%s: STOP_COPY read returned %ld", what, rc);
        if (rc <= 0 || rc > (long)MIGCONF_CHUNK)
            return 0;
        if (*len + (uint64_t)rc > c->budget) {
            MIGCONF_CHECK(c, 0, "%s: the STOP_COPY stream did not end within the budget of %llu bytes", what,
                          (unsigned long long)c->budget);
            return 0;
        }
        memcpy(c->stream + *len, c->chunk, (size_t)rc);
        *len += (uint64_t)rc;
    }
}

/* STOP_COPY: the stream ends with 0, stays ended, and the state holds. Keeps the stream. */
static inline void migconf_stop_copy_stream(struct migconf *c)
{
    if (migconf_reset(c) < 0 || migconf_enter(c, VFMIG_MIG_STOP_COPY) < 0)
        return;
    c->stream_len = 0;
    c->stream_whole = migconf_read_to_end(c, &c->stream_len, "stop-copy");
    if (!c->stream_whole)
        return;
    long rc = vfmig_mig_read(c->m, c->chunk, MIGCONF_CHUNK, &c->err);
    MIGCONF_CHECK(c, rc == 0, "a STOP_COPY read after the end of stream returned %ld", rc);
    MIGCONF_CHECK(c, vfmig_mig_get_state(c->m) == VFMIG_MIG_STOP_COPY, "reading the whole stream left STOP_COPY");
}

/* The device takes its own stream back and runs again. */
static inline void migconf_loopback(struct migconf *c, const char *what)
{
    if (!c->stream_whole || migconf_reset(c) < 0 || migconf_enter(c, VFMIG_MIG_RESUMING) < 0)
        return;
    migconf_load_stream(c);
    int rc = vfmig_mig_set_state(c->m, VFMIG_MIG_RUNNING, &c->err);
    MIGCONF_CHECK(c, rc == 0, "loopback of the %s stream: RESUMING -> RUNNING returned %d", what, rc);
}

/* PRE_COPY or PRE_COPY_P2P: the initial bytes come out, then -ENOMSG with none left; the
 * stream goes on in STOP_COPY to its end; the whole of it loads back. */
static inline void migconf_precopy(struct migconf *c, int s)
{
    if (migconf_reset(c) < 0 || migconf_enter(c, s) < 0)
        return;
    uint64_t initial = UINT64_MAX, dirty = UINT64_MAX, got = 0;
    int rc = vfmig_mig_precopy_info(c->m, &initial, &dirty, &c->err);
    MIGCONF_CHECK(c, rc == 0 && initial != UINT64_MAX && dirty != UINT64_MAX, "%s: precopy info returned %d",
                  MIGCONF_NAME(s), rc);
    int dry = 0;
    while (!dry) {
        long n = vfmig_mig_read(c->m, c->chunk, MIGCONF_CHUNK, &c->err);
        if (n == -ENOMSG) {
            dry = 1;
            break;
        }
        MIGCONF_CHECK(c, n > 0 && n <= (long)MIGCONF_CHUNK, "%s: read returned %ld (0 ends a stream only in STOP_COPY)",
                      MIGCONF_NAME(s), n);
        if (n <= 0 || n > (long)MIGCONF_CHUNK)
            return;
        if (got + (uint64_t)n > c->budget) {
            MIGCONF_CHECK(c, 0, "%s: reads never ran dry (-ENOMSG) within the budget of %llu bytes", MIGCONF_NAME(s),
                          (unsigned long long)c->budget);
            return;
        }
        memcpy(c->stream + got, c->chunk, (size_t)n);
        got += (uint64_t)n;
    }
    MIGCONF_CHECK(c, got >= initial || initial == UINT64_MAX,
                  "%s: -ENOMSG after %llu bytes, before the %llu initial bytes were out", MIGCONF_NAME(s),
                  (unsigned long long)got, (unsigned long long)initial);
    MIGCONF_CHECK(c, (int)vfmig_mig_get_state(c->m) == s, "-ENOMSG in %s changed the state", MIGCONF_NAME(s));
    rc = vfmig_mig_precopy_info(c->m, &initial, &dirty, &c->err);
    MIGCONF_CHECK(c, rc == 0 && initial == 0, "%s: after running dry, precopy info returned %d with %llu initial bytes",
                  MIGCONF_NAME(s), rc, (unsigned long long)initial);
    rc = vfmig_mig_set_state(c->m, VFMIG_MIG_STOP_COPY, &c->err);
    MIGCONF_CHECK(c, rc == 0, "%s -> STOP_COPY returned %d", MIGCONF_NAME(s), rc);
    if (rc != 0)
        return;
    c->stream_len = got;
    c->stream_whole = migconf_read_to_end(c, &c->stream_len, "pre-copy then stop-copy");
    migconf_loopback(c, "pre-copy then stop-copy");
}

/* Every (cur, target) pair. */
static inline void migconf_pairs(struct migconf *c)
{
    uint32_t flags = c->m->flags;
    for (int cur = 0; cur < VFMIG_MIG__COUNT; cur++) {
        if (cur != VFMIG_MIG_ERROR && !migconf_has(flags, cur))
            continue; /* the device never is in a state it lacks */
        for (int target = 0; target < VFMIG_MIG__COUNT; target++) {
            if (migconf_reset(c) < 0 || migconf_enter(c, cur) < 0)
                continue;
            if (cur == VFMIG_MIG_RESUMING && target != cur && c->stream_whole)
                migconf_load_stream(c); /* leave RESUMING with a state to apply */
            c->err.msg[0] = '\0';
            int rc = vfmig_mig_set_state(c->m, (enum vfmig_mig_state)target, &c->err);
            int now = (int)vfmig_mig_get_state(c->m);
            if (migconf_reachable(flags, cur, target) || (cur == target && cur != VFMIG_MIG_ERROR)) {
                MIGCONF_CHECK(c, rc == 0 && now == target, "%s -> %s is valid: returned %d, now %s", MIGCONF_NAME(cur),
                              MIGCONF_NAME(target), rc, MIGCONF_NAME(now));
            } else {
                MIGCONF_CHECK(c, rc == -EINVAL && now == VFMIG_MIG_ERROR,
                              "%s -> %s is invalid: returned %d, now %s (want -EINVAL, ERROR)", MIGCONF_NAME(cur),
                              MIGCONF_NAME(target), rc, MIGCONF_NAME(now));
                if (cur == VFMIG_MIG_ERROR)
                    MIGCONF_CHECK(c, strstr(c->err.msg, "ERROR") != NULL, "%s -> %s: the error does not say ERROR",
                                  MIGCONF_NAME(cur), MIGCONF_NAME(target));
                else
                    MIGCONF_CHECK(c, strstr(c->err.msg, MIGCONF_NAME(cur)) && strstr(c->err.msg, MIGCONF_NAME(target)),
                                  "%s -> %s: the error does not name both states", MIGCONF_NAME(cur),
                                  MIGCONF_NAME(target));
            }
        }
    }
}

/* Data calls in states that do not allow them. */
static inline void migconf_wrong_state_access(struct migconf *c)
{
    uint32_t flags = c->m->flags;
    static const uint8_t zeros[16];
    for (int s = 0; s < VFMIG_MIG__COUNT; s++) {
        if (s != VFMIG_MIG_ERROR && !migconf_has(flags, s))
            continue;
        if (!migconf_is_precopy(s) && s != VFMIG_MIG_STOP_COPY && migconf_reset(c) == 0 && migconf_enter(c, s) == 0) {
            long rc = vfmig_mig_read(c->m, c->chunk, 16, &c->err);
            MIGCONF_CHECK(c, rc == -EINVAL && vfmig_mig_get_state(c->m) == VFMIG_MIG_ERROR,
                          "a read in %s returned %ld (want -EINVAL and ERROR)", MIGCONF_NAME(s), rc);
        }
        if (s != VFMIG_MIG_RESUMING && migconf_reset(c) == 0 && migconf_enter(c, s) == 0) {
            long rc = vfmig_mig_write(c->m, zeros, sizeof(zeros), &c->err);
            MIGCONF_CHECK(c, rc == -EINVAL && vfmig_mig_get_state(c->m) == VFMIG_MIG_ERROR,
                          "a write in %s returned %ld (want -EINVAL and ERROR)", MIGCONF_NAME(s), rc);
        }
        if (!migconf_is_precopy(s) && migconf_reset(c) == 0 && migconf_enter(c, s) == 0) {
            uint64_t initial = 0, dirty = 0;
            int rc = vfmig_mig_precopy_info(c->m, &initial, &dirty, &c->err);
            MIGCONF_CHECK(c, rc == -EINVAL && (int)vfmig_mig_get_state(c->m) == s,
                          "precopy info in %s returned %d, now %s (want -EINVAL, state kept)", MIGCONF_NAME(s), rc,
                          MIGCONF_NAME(vfmig_mig_get_state(c->m)));
        }
    }
}

/* VM stop and start map onto the states as QEMU's vmstate change does. */
static inline void migconf_vm_stop_start(struct migconf *c)
{
    if (migconf_reset(c) < 0)
        return;
    int rc = vfmig_mig_set_running(c->m, 0, &c->err);
    MIGCONF_CHECK(c, rc == 0 && vfmig_mig_get_state(c->m) == VFMIG_MIG_STOP, "VM stop from RUNNING: %d", rc);
    rc = vfmig_mig_set_running(c->m, 1, &c->err);
    MIGCONF_CHECK(c, rc == 0 && vfmig_mig_get_state(c->m) == VFMIG_MIG_RUNNING, "VM start from STOP: %d", rc);
    if (migconf_has(c->m->flags, VFMIG_MIG_PRE_COPY) && migconf_reset(c) == 0 &&
        migconf_enter(c, VFMIG_MIG_PRE_COPY) == 0) {
        rc = vfmig_mig_set_running(c->m, 0, &c->err);
        MIGCONF_CHECK(c, rc == 0 && vfmig_mig_get_state(c->m) == VFMIG_MIG_STOP_COPY, "VM stop from PRE_COPY: %d", rc);
    }
    if (c->stream_whole && migconf_reset(c) == 0 && migconf_enter(c, VFMIG_MIG_RESUMING) == 0) {
        migconf_load_stream(c);
        rc = vfmig_mig_set_running(c->m, 0, &c->err);
        MIGCONF_CHECK(c, rc == 0 && vfmig_mig_get_state(c->m) == VFMIG_MIG_RESUMING, "VM stop in RESUMING: %d", rc);
        rc = vfmig_mig_set_running(c->m, 1, &c->err);
        MIGCONF_CHECK(c, rc == 0 && vfmig_mig_get_state(c->m) == VFMIG_MIG_RUNNING, "VM start from RESUMING: %d", rc);
    }
}

static inline int vfmig_mig_conformance(struct vfmig_migration *m, uint64_t byte_budget, FILE *log)
{
    struct migconf c = {.m = m, .log = log, .budget = byte_budget ? byte_budget : 64ull << 20};
    c.chunk = malloc(MIGCONF_CHUNK);
    c.stream = malloc((size_t)c.budget);
    if (!c.chunk || !c.stream) {
        fprintf(log, "migstate conformance: out of memory for a %llu-byte budget\n", (unsigned long long)c.budget);
        free(c.chunk);
        free(c.stream);
        return 1;
    }
    if (migconf_reset(&c) == 0) {
        migconf_stop_copy_stream(&c);
        migconf_loopback(&c, "stop-copy");
        if (migconf_has(m->flags, VFMIG_MIG_PRE_COPY))
            migconf_precopy(&c, VFMIG_MIG_PRE_COPY);
        if (migconf_has(m->flags, VFMIG_MIG_PRE_COPY_P2P))
            migconf_precopy(&c, VFMIG_MIG_PRE_COPY_P2P);
        /* The pairs and the VM mapping load the plain stop-copy stream when leaving RESUMING. */
        migconf_stop_copy_stream(&c);
        migconf_pairs(&c);
        migconf_wrong_state_access(&c);
        migconf_vm_stop_start(&c);
        migconf_reset(&c);
    }
    free(c.chunk);
    free(c.stream);
    return c.failures;
}

#endif
