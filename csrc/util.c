/* Errors and checkpoints. */
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "vfmig/usdt.h"
#include "vfmig/util.h"

int vfmig_fail(struct vfmig_err *err, int code, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
        va_end(ap);
    }
    return code > 0 ? -code : (code ? code : -1);
}

/* tracefs' trace_marker, opened once: -1 when there is none we may write (not root, no tracefs),
 * and then never looked for again, so a checkpoint costs no failing open() each time. */
static int marker_fd = -1;
static pthread_once_t marker_once = PTHREAD_ONCE_INIT;

static void marker_open(void)
{
    static const char *const paths[] = {"/sys/kernel/tracing/trace_marker",
                                        "/sys/kernel/debug/tracing/trace_marker"};
    for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]) && marker_fd < 0; i++)
        marker_fd = open(paths[i], O_WRONLY | O_CLOEXEC);
}

/* One write(), so concurrent checkpoints' lines never interleave (the kernel writes each
 * marker whole); a failed write (tracing buffer off, full) is nothing to report. */
static void marker_write(const char *name)
{
    pthread_once(&marker_once, marker_open);
    if (marker_fd < 0)
        return;
    char line[128];
    int n = snprintf(line, sizeof(line), "vfmig: %s\n", name);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof(line)) { /* a long name: cut, but keep the line a line */
        n = (int)sizeof(line) - 1;
        line[n - 1] = '\n';
    }
    if (write(marker_fd, line, (size_t)n) < 0) {
        /* ignored: see above */
    }
}

void vfmig_checkpoint_prepare(void)
{
    pthread_once(&marker_once, marker_open);
}

uint64_t vfmig_checkpoint(const char *name)
{
    uint64_t t = vfmig_now_ns();
    VFMIG_USDT(checkpoint, name, t);
    marker_write(name);
    return t;
}
