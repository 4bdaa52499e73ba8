/* Errors and checkpoints. */
#include <stdarg.h>
#include <stdio.h>

#include "vfmig/util.h"

#ifdef VFMIG_HAVE_SDT
#include <sys/sdt.h>
#endif

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

uint64_t vfmig_checkpoint(const char *name)
{
    uint64_t t = vfmig_now_ns();
#ifdef VFMIG_HAVE_SDT
    DTRACE_PROBE2(vfmig, checkpoint, name, t);
#else
    (void)name;
#endif
    return t;
}
