/* The migration state machine (migstate.c) against a fake device: the path of arcs for every
 * (flags, current, target) equals the kernel's documented transitions, the conformance suite
 * passes (and fails on broken devices), a failing arc or data call leaves the device in ERROR with
 * the device's reason, and concurrent callers never run two hooks at once. No KVM needed. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "migstate_conformance.h"
#include "vfmig/migstate.h"

#define NS VFMIG_MIG__COUNT
#define SC VFMIG_MIGF_STOP_COPY
#define P2P VFMIG_MIGF_P2P
#define PRE VFMIG_MIGF_PRE_COPY

/* ---- the fake device ---------------------------------------------------------------------- */

/* Its stream is the bytes pattern(0 .. pre_len + sc_len): PRE_COPY serves the first pre_len
 * (the "initial image"), STOP_COPY the rest from wherever pre-copy stopped. RESUMING checks
 * every byte and applies on RESUMING -> STOP only a complete stream (or nothing). */
struct fake {
    struct vfmig_migration m;
    struct { enum vfmig_mig_state from, to; } arcs[32];
    int narcs;
    enum vfmig_mig_state fail_from, fail_to; /* fail this arc (fail_from == ERROR: none) */
    int fail_code;
    uint64_t pre_len, sc_len, pos, written;
    uint64_t max_chunk;
    int applied;        /* completed loads applied */
    /* Knobs that make it non-conformant (the suite must notice) or fail on purpose. */
    int read_error;     /* read fails with -EIO */
    int endless;        /* STOP_COPY never ends */
    int stuck_initial;  /* precopy info keeps reporting the initial bytes */
    int enomsg_in_stop; /* STOP_COPY says "nothing for now" */
    int overshoot;      /* read returns more than cap */
    int reset_fails;
    _Atomic int in_hook; /* hooks must never overlap */
    _Atomic int overlaps;
    int prestops;
    uint64_t prestop_deadline;
};

static uint8_t pattern(uint64_t i)
{
    return (uint8_t)(i * 7 + 3);
}

static void enter_hook(struct fake *f)
{
    if (atomic_fetch_add(&f->in_hook, 1) != 0)
        atomic_fetch_add(&f->overlaps, 1);
}

static void leave_hook(struct fake *f)
{
    atomic_fetch_sub(&f->in_hook, 1);
}

static int fake_arc(void *dev, enum vfmig_mig_state from, enum vfmig_mig_state to, struct vfmig_err *err)
{
    struct fake *f = dev;
    enter_hook(f);
    int rc = 0;
    if (f->narcs < (int)(sizeof(f->arcs) / sizeof(f->arcs[0])))
        f->arcs[f->narcs++] = (typeof(f->arcs[0])){from, to};
    if (f->fail_from != VFMIG_MIG_ERROR && from == f->fail_from && to == f->fail_to) {
        rc = vfmig_fail(err, f->fail_code, "bad checksum in the loaded state");
    } else if (from == VFMIG_MIG_RESUMING && to == VFMIG_MIG_STOP) {
        if (f->written != 0 && f->written != f->pre_len + f->sc_len)
            rc = vfmig_fail(err, EPROTO, "stream cut short at %llu of %llu bytes", (unsigned long long)f->written,
                            (unsigned long long)(f->pre_len + f->sc_len));
        else
            f->applied += f->written != 0;
    } else if (to == VFMIG_MIG_RESUMING) {
        f->written = 0;
    } else if (to == VFMIG_MIG_STOP_COPY && from == VFMIG_MIG_STOP) {
        f->pos = 0; /* no pre-copy: the whole stream in STOP_COPY */
    } else if ((to == VFMIG_MIG_PRE_COPY || to == VFMIG_MIG_PRE_COPY_P2P) &&
               (from == VFMIG_MIG_RUNNING || from == VFMIG_MIG_RUNNING_P2P)) {
        f->pos = 0; /* a new pre-copy session */
    }
    leave_hook(f);
    return rc;
}

static long fake_read(void *dev, uint8_t *buf, size_t cap, struct vfmig_err *err)
{
    struct fake *f = dev;
    enter_hook(f);
    enum vfmig_mig_state s = vfmig_mig_get_state(&f->m);
    uint64_t end = s == VFMIG_MIG_STOP_COPY ? f->pre_len + f->sc_len : f->pre_len;
    long rc;
    if (f->read_error) {
        rc = vfmig_fail(err, EIO, "DMA engine wedged");
    } else if (f->overshoot) {
        rc = (long)cap + 1;
    } else if (s == VFMIG_MIG_STOP_COPY && f->enomsg_in_stop) {
        rc = -ENOMSG;
    } else if (f->pos >= end && !(s == VFMIG_MIG_STOP_COPY && f->endless)) {
        rc = s == VFMIG_MIG_STOP_COPY ? 0 : -ENOMSG;
    } else {
        uint64_t n = f->endless && s == VFMIG_MIG_STOP_COPY ? f->max_chunk : end - f->pos;
        n = n < cap ? n : cap;
        n = n < f->max_chunk ? n : f->max_chunk;
        for (uint64_t i = 0; i < n; i++)
            buf[i] = pattern(f->pos + i);
        f->pos += n;
        rc = (long)n;
    }
    leave_hook(f);
    return rc;
}

static long fake_write(void *dev, const uint8_t *buf, size_t len, struct vfmig_err *err)
{
    struct fake *f = dev;
    enter_hook(f);
    long rc = (long)len;
    for (size_t i = 0; i < len; i++) {
        if (f->written + i >= f->pre_len + f->sc_len || buf[i] != pattern(f->written + i)) {
            rc = vfmig_fail(err, EPROTO, "stream byte %llu is wrong", (unsigned long long)(f->written + i));
            break;
        }
    }
    if (rc > 0)
        f->written += len;
    leave_hook(f);
    return rc;
}

static int fake_precopy_info(void *dev, uint64_t *initial, uint64_t *dirty, struct vfmig_err *err)
{
    struct fake *f = dev;
    (void)err;
    enter_hook(f);
    *initial = f->stuck_initial ? f->pre_len : (f->pos < f->pre_len ? f->pre_len - f->pos : 0);
    *dirty = 0;
    leave_hook(f);
    return 0;
}

static int fake_reset(void *dev, struct vfmig_err *err)
{
    struct fake *f = dev;
    enter_hook(f);
    int rc = 0;
    if (f->reset_fails)
        rc = vfmig_fail(err, EIO, "function-level reset timed out");
    f->pos = f->written = 0;
    leave_hook(f);
    return rc;
}

static int fake_prestop(void *dev, uint64_t deadline_ns, struct vfmig_prestop_result *out, struct vfmig_err *err)
{
    struct fake *f = dev;
    out->outcome = VFMIG_HS_ACKED;
    f->prestops++;
    f->prestop_deadline = deadline_ns;
    return deadline_ns == 1 ? vfmig_fail(err, ETIMEDOUT, "guest driver did not quiesce") : 0;
}

static const struct vfmig_mig_ops fake_ops = {
    .arc = fake_arc, .read = fake_read, .write = fake_write, .precopy_info = fake_precopy_info,
    .reset = fake_reset, .prestop = fake_prestop,
};

static void fake_init(struct fake *f, uint32_t flags)
{
    memset(f, 0, sizeof(*f));
    f->fail_from = f->fail_to = VFMIG_MIG_ERROR;
    f->pre_len = 300;
    f->sc_len = 1000;
    f->max_chunk = 97; /* several reads per stream, never aligned */
    CHECK(vfmig_mig_init(&f->m, &fake_ops, f, flags) == 0);
}

/* ---- the kernel's transitions, restated from its documentation (vfio_main.c) ---------------- */

static int parse_state(const char *s, size_t len)
{
    static const char *const names[NS] = {"ERROR", "STOP", "RUNNING", "STOP_COPY", "RESUMING", "RUNNING_P2P",
                                          "PRE_COPY", "PRE_COPY_P2P"};
    for (int i = 0; i < NS; i++)
        if (strlen(names[i]) == len && memcmp(names[i], s, len) == 0)
            return i;
    fprintf(stderr, "unknown state %.*s\n", (int)len, s);
    exit(1);
}

/* "A -> B -> C" into states; returns the count. */
static int parse_path(const char *text, int *out)
{
    int n = 0;
    for (const char *p = text;;) {
        const char *arrow = strstr(p, " -> ");
        size_t len = arrow ? (size_t)(arrow - p) : strlen(p);
        out[n++] = parse_state(p, len);
        if (!arrow)
            return n;
        p = arrow + 4;
    }
}

/* The arcs a driver must implement, per optional feature. */
static const char *const arcs_base[] = {"RESUMING -> STOP", "STOP -> RESUMING", "STOP -> STOP_COPY",
                                        "STOP_COPY -> STOP"};
static const char *const arcs_p2p[] = {"RUNNING -> RUNNING_P2P", "RUNNING_P2P -> RUNNING", "RUNNING_P2P -> STOP",
                                       "STOP -> RUNNING_P2P"};
static const char *const arcs_pre[] = {"RUNNING -> PRE_COPY", "PRE_COPY -> RUNNING", "PRE_COPY -> STOP_COPY"};
static const char *const arcs_pre_p2p[] = {"PRE_COPY -> RUNNING", "PRE_COPY -> PRE_COPY_P2P",
                                           "PRE_COPY_P2P -> PRE_COPY", "PRE_COPY_P2P -> RUNNING_P2P",
                                           "PRE_COPY_P2P -> STOP_COPY", "RUNNING -> PRE_COPY",
                                           "RUNNING_P2P -> PRE_COPY_P2P"};
static const char *const arcs_no_p2p[] = {"RUNNING -> STOP", "STOP -> RUNNING"};

/* The combination transitions with every optional feature; any other pair of distinct states
 * is one arc, except the blocked ones. */
static const char *const combos[] = {
    "PRE_COPY -> PRE_COPY_P2P -> STOP_COPY",
    "PRE_COPY -> RUNNING -> RUNNING_P2P",
    "PRE_COPY -> RUNNING -> RUNNING_P2P -> STOP",
    "PRE_COPY -> RUNNING -> RUNNING_P2P -> STOP -> RESUMING",
    "PRE_COPY_P2P -> RUNNING_P2P -> RUNNING",
    "PRE_COPY_P2P -> RUNNING_P2P -> STOP",
    "PRE_COPY_P2P -> RUNNING_P2P -> STOP -> RESUMING",
    "RESUMING -> STOP -> RUNNING_P2P",
    "RESUMING -> STOP -> RUNNING_P2P -> PRE_COPY_P2P",
    "RESUMING -> STOP -> RUNNING_P2P -> RUNNING",
    "RESUMING -> STOP -> RUNNING_P2P -> RUNNING -> PRE_COPY",
    "RESUMING -> STOP -> STOP_COPY",
    "RUNNING -> RUNNING_P2P -> PRE_COPY_P2P",
    "RUNNING -> RUNNING_P2P -> STOP",
    "RUNNING -> RUNNING_P2P -> STOP -> RESUMING",
    "RUNNING -> RUNNING_P2P -> STOP -> STOP_COPY",
    "RUNNING_P2P -> RUNNING -> PRE_COPY",
    "RUNNING_P2P -> STOP -> RESUMING",
    "RUNNING_P2P -> STOP -> STOP_COPY",
    "STOP -> RUNNING_P2P -> PRE_COPY_P2P",
    "STOP -> RUNNING_P2P -> RUNNING",
    "STOP -> RUNNING_P2P -> RUNNING -> PRE_COPY",
    "STOP_COPY -> STOP -> RESUMING",
    "STOP_COPY -> STOP -> RUNNING_P2P",
    "STOP_COPY -> STOP -> RUNNING_P2P -> RUNNING",
};
static const char *const blocked[] = {"STOP_COPY -> PRE_COPY", "STOP_COPY -> PRE_COPY_P2P"};

static int has(uint32_t flags, int s)
{
    return migconf_has(flags, s);
}

static int in_list(const char *const *list, size_t n, int from, int to)
{
    for (size_t i = 0; i < n; i++) {
        int p[8];
        CHECK(parse_path(list[i], p) == 2);
        if (p[0] == from && p[1] == to)
            return 1;
    }
    return 0;
}
#define IN(list, from, to) in_list(list, sizeof(list) / sizeof(list[0]), from, to)

static int arc_required(uint32_t flags, int from, int to)
{
    if (IN(arcs_base, from, to))
        return 1;
    if ((flags & P2P) && IN(arcs_p2p, from, to))
        return 1;
    if (!(flags & P2P) && IN(arcs_no_p2p, from, to))
        return 1;
    if ((flags & PRE) && !(flags & P2P) && IN(arcs_pre, from, to))
        return 1;
    if ((flags & PRE) && (flags & P2P) && IN(arcs_pre_p2p, from, to))
        return 1;
    return 0;
}

/* The states on the way from cur to target, both included, as the kernel documents them for a
 * device with every feature, with the states this device lacks left out (the kernel skips
 * them). -1: the request is invalid. */
static int expected_path(uint32_t flags, int cur, int target, int *out)
{
    if (!has(flags, cur) || !has(flags, target))
        return -1;
    if (cur == target) {
        out[0] = cur;
        return 1;
    }
    int full[8], n = 0;
    if (IN(blocked, cur, target))
        return -1;
    for (size_t i = 0; i < sizeof(combos) / sizeof(combos[0]) && n == 0; i++) {
        int p[8], k = parse_path(combos[i], p);
        if (p[0] == cur && p[k - 1] == target) {
            memcpy(full, p, sizeof(int) * (size_t)k);
            n = k;
        }
    }
    if (n == 0) {
        full[0] = cur;
        full[1] = target;
        n = 2;
    }
    int m = 0;
    for (int i = 0; i < n; i++)
        if (has(flags, full[i]))
            out[m++] = full[i];
    return m;
}

struct taken {
    int rc, after, n;
    int from[32], to[32];
};

/* The checker: 0 when what the state machine did for (flags, cur, target) is what the kernel
 * does, else -1 with why. */
static int check_path(uint32_t flags, int cur, int target, const struct taken *t, char *why, size_t cap)
{
    int exp[8];
    int n = expected_path(flags, cur, target, exp);
    if (n < 0) {
        if (t->rc != -EINVAL || t->after != VFMIG_MIG_ERROR || t->n != 0)
            return snprintf(why, cap, "invalid request: rc %d, state %d, %d arcs (want -EINVAL, ERROR, none)", t->rc,
                            t->after, t->n), -1;
        return 0;
    }
    if (t->rc != 0 || t->after != target)
        return snprintf(why, cap, "valid request: rc %d, ended in %d", t->rc, t->after), -1;
    if (t->n != n - 1)
        return snprintf(why, cap, "%d arcs taken, the kernel takes %d", t->n, n - 1), -1;
    for (int i = 0; i < t->n; i++) {
        if (t->from[i] != exp[i] || t->to[i] != exp[i + 1])
            return snprintf(why, cap, "arc %d is %d -> %d, the kernel takes %d -> %d", i, t->from[i], t->to[i], exp[i],
                            exp[i + 1]), -1;
        if (!arc_required(flags, t->from[i], t->to[i]))
            return snprintf(why, cap, "arc %d -> %d is not one of the device's arcs", t->from[i], t->to[i]), -1;
    }
    return 0;
}

static const uint32_t flag_sets[] = {SC, SC | P2P, SC | PRE, SC | P2P | PRE};

/* (a) Exhaustive over the 4 flag sets and 8 x 8 pairs. */
static void test_table(void)
{
    int checked = 0;
    for (size_t fi = 0; fi < sizeof(flag_sets) / sizeof(flag_sets[0]); fi++) {
        uint32_t flags = flag_sets[fi];
        for (int cur = 0; cur < NS; cur++) {
            for (int target = 0; target < NS; target++) {
                /* The pure function first, for states the device lacks too. */
                int exp[8], n = expected_path(flags, cur, target, exp);
                enum vfmig_mig_state next = VFMIG_MIG__COUNT;
                int rc = vfmig_mig_next_state(flags, cur, target, &next);
                if (n < 0)
                    CHECK(rc == -EINVAL);
                else
                    CHECK(rc == 0 && (int)next == (n > 1 ? exp[1] : cur));
                if (cur != VFMIG_MIG_ERROR && !has(flags, cur))
                    continue;

                struct fake f;
                struct vfmig_err err = {{0}};
                fake_init(&f, flags);
                if (cur == VFMIG_MIG_ERROR)
                    CHECK(vfmig_mig_set_state(&f.m, VFMIG_MIG_ERROR, &err) == -EINVAL);
                else
                    CHECK(vfmig_mig_set_state(&f.m, cur, &err) == 0);
                CHECK((int)vfmig_mig_get_state(&f.m) == cur);
                f.narcs = 0;
                struct taken t = {0};
                t.rc = vfmig_mig_set_state(&f.m, target, &err);
                t.after = vfmig_mig_get_state(&f.m);
                t.n = f.narcs;
                for (int i = 0; i < f.narcs; i++) {
                    t.from[i] = f.arcs[i].from;
                    t.to[i] = f.arcs[i].to;
                }
                char why[200];
                if (check_path(flags, cur, target, &t, why, sizeof(why)) < 0) {
                    fprintf(stderr, "flags %#x %s -> %s: %s (err: %s)\n", flags, vfmig_mig_state_name(cur),
                            vfmig_mig_state_name(target), why, err.msg);
                    exit(1);
                }
                if (n < 0) {
                    if (cur == VFMIG_MIG_ERROR)
                        CHECK(strstr(err.msg, "device is in ERROR") && strstr(err.msg, "only a reset leaves it"));
                    else
                        CHECK(strstr(err.msg, "device state: ") && strstr(err.msg, vfmig_mig_state_name(cur)) &&
                              strstr(err.msg, vfmig_mig_state_name(target)) &&
                              strstr(err.msg, "not a valid transition"));
                }
                CHECK(f.m.err.msg[0] == '\0' || n < 0);
                vfmig_mig_destroy(&f.m);
                checked++;
            }
        }
    }
    /* 4 flag sets: ERROR plus the states each has (4, 5, 5, 7), times 8 targets. */
    CHECK(checked == (5 + 6 + 6 + 8) * NS);
    /* Without STOP_COPY there is no state at all. */
    enum vfmig_mig_state next;
    CHECK(vfmig_mig_next_state(P2P | PRE, VFMIG_MIG_RUNNING, VFMIG_MIG_STOP, &next) == -EINVAL);
    CHECK(vfmig_mig_next_state(SC, 99, VFMIG_MIG_STOP, &next) == -EINVAL);
    CHECK(vfmig_mig_next_state(SC, VFMIG_MIG_RUNNING, -1, &next) == -EINVAL);
}

/* (d) The checker rejects what the kernel would not do. */
static void test_checker_catches_wrong_paths(void)
{
    char why[200];
    /* Right: RUNNING -> RUNNING_P2P -> STOP -> STOP_COPY with every feature. */
    struct taken good = {.rc = 0, .after = VFMIG_MIG_STOP_COPY, .n = 3,
                         .from = {VFMIG_MIG_RUNNING, VFMIG_MIG_RUNNING_P2P, VFMIG_MIG_STOP},
                         .to = {VFMIG_MIG_RUNNING_P2P, VFMIG_MIG_STOP, VFMIG_MIG_STOP_COPY}};
    CHECK(check_path(SC | P2P | PRE, VFMIG_MIG_RUNNING, VFMIG_MIG_STOP_COPY, &good, why, sizeof(why)) == 0);
    /* A shortcut that is no arc. */
    struct taken shortcut = {.rc = 0, .after = VFMIG_MIG_STOP_COPY, .n = 1, .from = {VFMIG_MIG_RUNNING},
                             .to = {VFMIG_MIG_STOP_COPY}};
    CHECK(check_path(SC | P2P | PRE, VFMIG_MIG_RUNNING, VFMIG_MIG_STOP_COPY, &shortcut, why, sizeof(why)) < 0);
    CHECK(check_path(SC, VFMIG_MIG_RUNNING, VFMIG_MIG_STOP_COPY, &shortcut, why, sizeof(why)) < 0);
    /* The P2P path on a device without P2P touches a state it lacks. */
    CHECK(check_path(SC, VFMIG_MIG_RUNNING, VFMIG_MIG_STOP_COPY, &good, why, sizeof(why)) < 0);
    /* A wrong intermediate state, every arc otherwise real. */
    struct taken detour = {.rc = 0, .after = VFMIG_MIG_STOP, .n = 3,
                           .from = {VFMIG_MIG_RESUMING, VFMIG_MIG_STOP, VFMIG_MIG_STOP_COPY},
                           .to = {VFMIG_MIG_STOP, VFMIG_MIG_STOP_COPY, VFMIG_MIG_STOP}};
    CHECK(check_path(SC, VFMIG_MIG_RESUMING, VFMIG_MIG_STOP, &detour, why, sizeof(why)) < 0);
    /* A blocked pair that "succeeded", and a valid pair that failed. */
    struct taken blocked_ok = {.rc = 0, .after = VFMIG_MIG_PRE_COPY, .n = 0};
    CHECK(check_path(SC | PRE, VFMIG_MIG_STOP_COPY, VFMIG_MIG_PRE_COPY, &blocked_ok, why, sizeof(why)) < 0);
    struct taken refused = {.rc = -EINVAL, .after = VFMIG_MIG_ERROR, .n = 0};
    CHECK(check_path(SC, VFMIG_MIG_RUNNING, VFMIG_MIG_RESUMING, &refused, why, sizeof(why)) < 0);
    CHECK(check_path(SC, VFMIG_MIG_STOP_COPY, VFMIG_MIG_PRE_COPY, &refused, why, sizeof(why)) == 0);
}

/* (b) The conformance suite passes for the fake in every flag set, and fails when the fake is
 * broken in ways the contract forbids. */
static void test_conformance(void)
{
    for (size_t fi = 0; fi < sizeof(flag_sets) / sizeof(flag_sets[0]); fi++) {
        struct fake f;
        fake_init(&f, flag_sets[fi]);
        int failures = vfmig_mig_conformance(&f.m, 1 << 20, stderr);
        CHECK(failures == 0);
        CHECK(f.applied > 0); /* the loopback really loaded the stream */
        CHECK(vfmig_mig_get_state(&f.m) == VFMIG_MIG_RUNNING);
        vfmig_mig_destroy(&f.m);
    }
    FILE *quiet = fopen("/dev/null", "w");
    CHECK(quiet);
    struct fake f;
    fake_init(&f, SC);
    f.endless = 1;
    CHECK(vfmig_mig_conformance(&f.m, 1 << 16, quiet) > 0);
    vfmig_mig_destroy(&f.m);
    fake_init(&f, SC | PRE);
    f.stuck_initial = 1;
    CHECK(vfmig_mig_conformance(&f.m, 1 << 20, quiet) > 0);
    vfmig_mig_destroy(&f.m);
    fake_init(&f, SC | P2P);
    f.fail_from = VFMIG_MIG_RUNNING_P2P;
    f.fail_to = VFMIG_MIG_STOP;
    f.fail_code = EIO;
    CHECK(vfmig_mig_conformance(&f.m, 1 << 20, quiet) > 0);
    vfmig_mig_destroy(&f.m);
    fclose(quiet);
}

/* (c) A failing arc leaves the device in ERROR with the device's reason; only a reset leaves. */
static void test_arc_failure(void)
{
    struct fake f;
    struct vfmig_err err = {{0}};
    fake_init(&f, SC | P2P);
    CHECK(vfmig_mig_set_state(&f.m, VFMIG_MIG_RESUMING, &err) == 0);
    f.fail_from = VFMIG_MIG_RESUMING;
    f.fail_to = VFMIG_MIG_STOP;
    f.fail_code = EPROTO;
    CHECK(vfmig_mig_set_state(&f.m, VFMIG_MIG_RUNNING, &err) == -EPROTO);
    CHECK(vfmig_mig_get_state(&f.m) == VFMIG_MIG_ERROR);
    CHECK(strstr(err.msg, "device state: RESUMING -> STOP (on the way to RUNNING) failed: bad checksum"));
    CHECK(strcmp(f.m.err.msg, err.msg) == 0);
    /* Every request now fails and keeps the first reason. */
    CHECK(vfmig_mig_set_state(&f.m, VFMIG_MIG_STOP, &err) == -EINVAL);
    CHECK(strstr(err.msg, "device is in ERROR (device state: RESUMING -> STOP") && strstr(err.msg, "only a reset"));
    uint8_t buf[64];
    CHECK(vfmig_mig_read(&f.m, buf, sizeof(buf), &err) == -EINVAL);
    CHECK(vfmig_mig_write(&f.m, buf, sizeof(buf), &err) == -EINVAL);
    CHECK(vfmig_mig_set_running(&f.m, 1, &err) == -EINVAL);
    CHECK(vfmig_mig_set_running(&f.m, 0, &err) == -EINVAL);
    CHECK(vfmig_mig_set_state(&f.m, VFMIG_MIG_ERROR, &err) == -EINVAL);
    CHECK(strstr(f.m.err.msg, "bad checksum") && vfmig_mig_get_state(&f.m) == VFMIG_MIG_ERROR);
    f.fail_from = VFMIG_MIG_ERROR;
    CHECK(vfmig_mig_reset(&f.m, &err) == 0);
    CHECK(vfmig_mig_get_state(&f.m) == VFMIG_MIG_RUNNING && f.m.err.msg[0] == '\0');

    /* A direct arc failing names just that arc; arcs before the failure were taken. */
    f.fail_from = VFMIG_MIG_RUNNING_P2P;
    f.fail_to = VFMIG_MIG_STOP;
    f.fail_code = EIO;
    f.narcs = 0;
    CHECK(vfmig_mig_set_state(&f.m, VFMIG_MIG_STOP_COPY, &err) == -EIO);
    CHECK(f.narcs == 2 && f.arcs[0].to == VFMIG_MIG_RUNNING_P2P && f.arcs[1].to == VFMIG_MIG_STOP);
    CHECK(strstr(err.msg, "RUNNING_P2P -> STOP (on the way to STOP_COPY) failed"));
    CHECK(vfmig_mig_reset(&f.m, &err) == 0);
    CHECK(vfmig_mig_set_state(&f.m, VFMIG_MIG_RUNNING_P2P, &err) == 0);
    CHECK(vfmig_mig_set_state(&f.m, VFMIG_MIG_STOP, &err) == -EIO);
    CHECK(strstr(err.msg, "device state: RUNNING_P2P -> STOP failed: bad checksum"));
    f.fail_from = VFMIG_MIG_ERROR;

    /* A stream cut short fails RESUMING -> STOP with the device's words. */
    CHECK(vfmig_mig_reset(&f.m, &err) == 0);
    CHECK(vfmig_mig_set_state(&f.m, VFMIG_MIG_RESUMING, &err) == 0);
    for (int i = 0; i < 10; i++)
        buf[i] = pattern((uint64_t)i);
    CHECK(vfmig_mig_write(&f.m, buf, 10, &err) == 10);
    CHECK(vfmig_mig_set_running(&f.m, 1, &err) == -EPROTO);
    CHECK(strstr(err.msg, "stream cut short at 10 of 1300 bytes"));

    /* A reset that fails leaves ERROR with that reason. */
    f.reset_fails = 1;
    CHECK(vfmig_mig_reset(&f.m, &err) == -EIO);
    CHECK(vfmig_mig_get_state(&f.m) == VFMIG_MIG_ERROR && strstr(f.m.err.msg, "reset failed: function-level"));
    f.reset_fails = 0;
    CHECK(vfmig_mig_reset(&f.m, &err) == 0 && f.m.err.msg[0] == '\0');

    /* An out-of-range target is an invalid request too. */
    CHECK(vfmig_mig_set_state(&f.m, 42, &err) == -EINVAL && strstr(err.msg, "RUNNING -> 42 is not a state"));
    CHECK(vfmig_mig_get_state(&f.m) == VFMIG_MIG_ERROR);
    /* A state the flags lack says so. */
    CHECK(vfmig_mig_reset(&f.m, &err) == 0);
    CHECK(vfmig_mig_set_state(&f.m, VFMIG_MIG_PRE_COPY, &err) == -EINVAL);
    CHECK(strstr(err.msg, "RUNNING -> PRE_COPY is not a valid transition (the device does not have that state)"));
    vfmig_mig_destroy(&f.m);
}

/* Data calls: -ENOMSG is no error in PRE_COPY, anything else from the device is. */
static void test_data(void)
{
    struct fake f;
    struct vfmig_err err = {{0}};
    uint8_t buf[4096];
    uint64_t initial = 7, dirty = 7;
    fake_init(&f, SC | PRE);

    /* Argument mistakes change nothing. */
    CHECK(vfmig_mig_set_state(&f.m, VFMIG_MIG_STOP_COPY, &err) == 0);
    CHECK(vfmig_mig_read(&f.m, buf, 0, &err) == -EINVAL && vfmig_mig_get_state(&f.m) == VFMIG_MIG_STOP_COPY);
    CHECK(vfmig_mig_read(&f.m, NULL, 10, &err) == -EINVAL && vfmig_mig_get_state(&f.m) == VFMIG_MIG_STOP_COPY);
    CHECK(vfmig_mig_write(&f.m, NULL, 10, &err) == -EINVAL && vfmig_mig_get_state(&f.m) == VFMIG_MIG_STOP_COPY);

    /* PRE_COPY: 300 initial bytes, then -ENOMSG without ERROR. */
    CHECK(vfmig_mig_reset(&f.m, &err) == 0);
    CHECK(vfmig_mig_set_state(&f.m, VFMIG_MIG_PRE_COPY, &err) == 0);
    CHECK(vfmig_mig_precopy_info(&f.m, &initial, &dirty, &err) == 0 && initial == 300 && dirty == 0);
    long got = 0, rc;
    while ((rc = vfmig_mig_read(&f.m, buf, sizeof(buf), &err)) > 0)
        got += rc;
    CHECK(rc == -ENOMSG && got == 300 && vfmig_mig_get_state(&f.m) == VFMIG_MIG_PRE_COPY);
    CHECK(strstr(err.msg, "nothing more in PRE_COPY for now"));
    CHECK(vfmig_mig_precopy_info(&f.m, &initial, NULL, &err) == 0 && initial == 0);
    /* -ENOMSG in STOP_COPY is a device bug. */
    CHECK(vfmig_mig_set_state(&f.m, VFMIG_MIG_STOP_COPY, &err) == 0);
    f.enomsg_in_stop = 1;
    CHECK(vfmig_mig_read(&f.m, buf, sizeof(buf), &err) == -EIO && vfmig_mig_get_state(&f.m) == VFMIG_MIG_ERROR);
    f.enomsg_in_stop = 0;

    /* A device read error and an overlong answer both put it in ERROR. */
    CHECK(vfmig_mig_reset(&f.m, &err) == 0);
    CHECK(vfmig_mig_set_state(&f.m, VFMIG_MIG_STOP_COPY, &err) == 0);
    f.read_error = 1;
    CHECK(vfmig_mig_read(&f.m, buf, sizeof(buf), &err) == -EIO);
    CHECK(vfmig_mig_get_state(&f.m) == VFMIG_MIG_ERROR);
    CHECK(strstr(err.msg, "read in STOP_COPY failed: DMA engine wedged"));
    f.read_error = 0;
    CHECK(vfmig_mig_reset(&f.m, &err) == 0);
    CHECK(vfmig_mig_set_state(&f.m, VFMIG_MIG_STOP_COPY, &err) == 0);
    f.overshoot = 1;
    CHECK(vfmig_mig_read(&f.m, buf, 16, &err) == -EIO && vfmig_mig_get_state(&f.m) == VFMIG_MIG_ERROR);
    f.overshoot = 0;

    /* Writes: only RESUMING; a bad byte is the device's ERROR; 0 bytes is nothing. */
    CHECK(vfmig_mig_reset(&f.m, &err) == 0);
    CHECK(vfmig_mig_write(&f.m, buf, 4, &err) == -EINVAL && vfmig_mig_get_state(&f.m) == VFMIG_MIG_ERROR);
    CHECK(strstr(err.msg, "write in RUNNING: only RESUMING takes data"));
    CHECK(vfmig_mig_reset(&f.m, &err) == 0);
    CHECK(vfmig_mig_set_state(&f.m, VFMIG_MIG_RESUMING, &err) == 0);
    CHECK(vfmig_mig_write(&f.m, buf, 0, &err) == 0 && vfmig_mig_get_state(&f.m) == VFMIG_MIG_RESUMING);
    memset(buf, 0xEE, 8);
    CHECK(vfmig_mig_write(&f.m, buf, 8, &err) == -EPROTO && vfmig_mig_get_state(&f.m) == VFMIG_MIG_ERROR);
    CHECK(strstr(err.msg, "write in RESUMING failed: stream byte 0 is wrong"));

    /* Precopy info outside PRE_COPY*: refused, state kept (also in ERROR). */
    CHECK(vfmig_mig_precopy_info(&f.m, &initial, &dirty, &err) == -EINVAL);
    CHECK(vfmig_mig_get_state(&f.m) == VFMIG_MIG_ERROR);
    CHECK(vfmig_mig_reset(&f.m, &err) == 0);
    CHECK(vfmig_mig_set_state(&f.m, VFMIG_MIG_STOP, &err) == 0);
    CHECK(vfmig_mig_precopy_info(&f.m, &initial, &dirty, &err) == -EINVAL);
    CHECK(vfmig_mig_get_state(&f.m) == VFMIG_MIG_STOP && strstr(err.msg, "precopy info in STOP"));
    /* Read in RESUMING: ERROR. */
    CHECK(vfmig_mig_set_state(&f.m, VFMIG_MIG_RESUMING, &err) == 0);
    CHECK(vfmig_mig_read(&f.m, buf, 16, &err) == -EINVAL && vfmig_mig_get_state(&f.m) == VFMIG_MIG_ERROR);
    CHECK(strstr(err.msg, "read in RESUMING"));
    vfmig_mig_destroy(&f.m);
}

/* VM stop/start mapping, pre-stop, init checks, names. */
static void test_misc(void)
{
    struct fake f;
    struct vfmig_err err = {{0}};
    fake_init(&f, SC | P2P | PRE);
    struct { int from, running, rc, to; } map[] = {
        {VFMIG_MIG_RUNNING, 0, 0, VFMIG_MIG_STOP},           {VFMIG_MIG_RUNNING_P2P, 0, 0, VFMIG_MIG_STOP},
        {VFMIG_MIG_PRE_COPY, 0, 0, VFMIG_MIG_STOP_COPY},     {VFMIG_MIG_PRE_COPY_P2P, 0, 0, VFMIG_MIG_STOP_COPY},
        {VFMIG_MIG_STOP_COPY, 0, 0, VFMIG_MIG_STOP_COPY},    {VFMIG_MIG_STOP, 0, 0, VFMIG_MIG_STOP},
        {VFMIG_MIG_RESUMING, 0, 0, VFMIG_MIG_RESUMING},      {VFMIG_MIG_ERROR, 0, -EINVAL, VFMIG_MIG_ERROR},
        {VFMIG_MIG_RUNNING, 1, 0, VFMIG_MIG_RUNNING},        {VFMIG_MIG_STOP, 1, 0, VFMIG_MIG_RUNNING},
        {VFMIG_MIG_STOP_COPY, 1, 0, VFMIG_MIG_RUNNING},      {VFMIG_MIG_RESUMING, 1, 0, VFMIG_MIG_RUNNING},
        {VFMIG_MIG_PRE_COPY_P2P, 1, 0, VFMIG_MIG_RUNNING},   {VFMIG_MIG_ERROR, 1, -EINVAL, VFMIG_MIG_ERROR},
    };
    for (size_t i = 0; i < sizeof(map) / sizeof(map[0]); i++) {
        CHECK(vfmig_mig_reset(&f.m, &err) == 0);
        vfmig_mig_set_state(&f.m, map[i].from, &err);
        CHECK((int)vfmig_mig_get_state(&f.m) == map[i].from);
        f.narcs = 0;
        CHECK(vfmig_mig_set_running(&f.m, map[i].running, &err) == map[i].rc);
        CHECK((int)vfmig_mig_get_state(&f.m) == map[i].to);
    }
    /* From RESUMING, running goes through STOP, where the loaded state is applied. */
    CHECK(f.narcs == 0); /* the ERROR case took no arc */
    CHECK(vfmig_mig_reset(&f.m, &err) == 0);
    CHECK(vfmig_mig_set_state(&f.m, VFMIG_MIG_RESUMING, &err) == 0);
    f.narcs = 0;
    CHECK(vfmig_mig_set_running(&f.m, 1, &err) == 0);
    CHECK(f.narcs == 3 && f.arcs[0].from == VFMIG_MIG_RESUMING && f.arcs[0].to == VFMIG_MIG_STOP);

    /* Pre-stop passes the deadline through and never changes the state. */
    CHECK(vfmig_mig_reset(&f.m, &err) == 0);
    struct vfmig_prestop_result pr;
    CHECK(vfmig_mig_prestop(&f.m, 12345, &pr, &err) == 0 && f.prestops == 1 && f.prestop_deadline == 12345);
    CHECK(pr.outcome == VFMIG_HS_ACKED && pr.end_ns >= pr.start_ns);
    CHECK(vfmig_mig_prestop(&f.m, 1, &pr, &err) == -ETIMEDOUT && strstr(err.msg, "did not quiesce"));
    CHECK(vfmig_mig_get_state(&f.m) == VFMIG_MIG_RUNNING);
    vfmig_mig_destroy(&f.m);
    struct vfmig_mig_ops no_prestop = fake_ops;
    no_prestop.prestop = NULL;
    CHECK(vfmig_mig_init(&f.m, &no_prestop, &f, SC) == 0);
    CHECK(vfmig_mig_prestop(&f.m, 1, &pr, &err) == 0 && pr.outcome == VFMIG_HS_DISABLED);
    vfmig_mig_prestop_abort(&f.m); /* no hook: nothing to do */
    CHECK(!strcmp(vfmig_hs_outcome_name(VFMIG_HS_LATE), "late") && !strcmp(vfmig_hs_outcome_name(99), "?"));
    vfmig_mig_destroy(&f.m);

    /* init: STOP_COPY is mandatory, unknown flags and missing hooks are refused. */
    CHECK(vfmig_mig_init(&f.m, &fake_ops, &f, P2P) == -EINVAL);
    CHECK(vfmig_mig_init(&f.m, &fake_ops, &f, SC | 0x8) == -EINVAL);
    struct vfmig_mig_ops no_info = fake_ops;
    no_info.precopy_info = NULL;
    CHECK(vfmig_mig_init(&f.m, &no_info, &f, SC | PRE) == -EINVAL);
    CHECK(vfmig_mig_init(&f.m, &no_info, &f, SC) == 0);
    CHECK(vfmig_mig_get_state(&f.m) == VFMIG_MIG_RUNNING);
    vfmig_mig_destroy(&f.m);
    struct vfmig_mig_ops no_arc = fake_ops;
    no_arc.arc = NULL;
    CHECK(vfmig_mig_init(&f.m, &no_arc, &f, SC) == -EINVAL);

    CHECK(strcmp(vfmig_mig_state_name(VFMIG_MIG_PRE_COPY_P2P), "PRE_COPY_P2P") == 0);
    CHECK(strcmp(vfmig_mig_state_name(VFMIG_MIG_ERROR), "ERROR") == 0);
    CHECK(strcmp(vfmig_mig_state_name(-1), "?") == 0 && strcmp(vfmig_mig_state_name(NS), "?") == 0);
}

/* Two threads drive the same device: the lock keeps hooks from overlapping (also run under TSan). */
struct racer {
    struct fake *f;
    int id;
};

static void *race_main(void *arg)
{
    struct racer *r = arg;
    struct vfmig_err err;
    uint8_t buf[128];
    for (int i = 0; i < 3000; i++) {
        switch ((i + r->id) % 4) {
        case 0: vfmig_mig_set_running(&r->f->m, i & 1, &err); break;
        case 1: vfmig_mig_set_state(&r->f->m, VFMIG_MIG_STOP_COPY, &err); break;
        case 2: vfmig_mig_read(&r->f->m, buf, sizeof(buf), &err); break;
        default: vfmig_mig_reset(&r->f->m, &err); break;
        }
    }
    return NULL;
}

static void test_threads(void)
{
    struct fake f;
    fake_init(&f, SC | P2P | PRE);
    pthread_t th[2];
    struct racer r[2] = {{&f, 0}, {&f, 1}};
    for (int i = 0; i < 2; i++)
        CHECK(pthread_create(&th[i], NULL, race_main, &r[i]) == 0);
    for (int i = 0; i < 2; i++)
        CHECK(pthread_join(th[i], NULL) == 0);
    CHECK(atomic_load(&f.overlaps) == 0);
    vfmig_mig_destroy(&f.m);
}

int main(void)
{
    test_table();
    test_checker_catches_wrong_paths();
    test_conformance();
    test_arc_failure();
    test_data();
    test_misc();
    test_threads();
    printf("test_migstate: ok\n");
    return 0;
}
