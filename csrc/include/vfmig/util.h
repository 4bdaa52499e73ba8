/* Small shared helpers: errors, time, checkpoints. */
#ifndef VFMIG_UTIL_H
#define VFMIG_UTIL_H
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#define VFMIG_ERR_LEN 256

/* Error strings travel with the object that failed, so callers on any thread can report them. */
struct vfmig_err {
    char msg[VFMIG_ERR_LEN];
};

/* Formats msg into err (if not NULL) and returns -code, so callers can `return vfmig_fail(...)`. */
int vfmig_fail(struct vfmig_err *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static inline uint64_t vfmig_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

/* Records a named checkpoint: fires the USDT probe vfmig:checkpoint(name, t_ns), writes the
 * line "vfmig: <name>" to tracefs trace_marker for perf/ftrace (one write(); the file is
 * opened once, and nothing is written ever after if it cannot be: not root, no tracefs; a
 * failed write is ignored), and returns t_ns. Any thread, lock-free; never fails. */
uint64_t vfmig_checkpoint(const char *name);

/* Opens what checkpoints write to now, so the first checkpoint (which can fall inside a
 * downtime) does not pay for it. Thread-safe, idempotent; nothing to report. */
void vfmig_checkpoint_prepare(void);

#endif
