/* Debug console: the guest writes bytes to a port, the host keeps the tail. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "vfmig/devices.h"
#include "vfmig/guest_abi.h"

#define CONSOLE_CAP (64u << 10)

struct console {
    struct vfmig_device dev;
    pthread_mutex_t lock; /* short: guards the ring between vCPU threads and readers */
    char buf[CONSOLE_CAP];
    uint64_t written;
};

/* vCPU thread; takes the console's own lock for one byte, never blocks otherwise. */
static int console_access(struct vfmig_device *d, struct vfmig_vcpu *cpu, uint64_t addr, uint8_t *data,
                          uint32_t len, int is_write)
{
    (void)cpu;
    (void)addr;
    struct console *c = d->opaque;
    if (!is_write) {
        memset(data, 0, len);
        return 0;
    }
    pthread_mutex_lock(&c->lock);
    c->buf[c->written++ % CONSOLE_CAP] = (char)data[0];
    pthread_mutex_unlock(&c->lock);
    return 0;
}

size_t vfmig_console_read(struct vfmig_device *d, char *out, size_t cap)
{
    struct console *c = d->opaque;
    pthread_mutex_lock(&c->lock);
    uint64_t have = c->written < CONSOLE_CAP ? c->written : CONSOLE_CAP;
    uint64_t n = have < cap ? have : cap;
    uint64_t start = c->written - n;
    for (uint64_t i = 0; i < n; i++)
        out[i] = c->buf[(start + i) % CONSOLE_CAP];
    pthread_mutex_unlock(&c->lock);
    return (size_t)n;
}

static void console_destroy(struct vfmig_device *d)
{
    struct console *c = d->opaque;
    pthread_mutex_destroy(&c->lock);
    free(c);
}

struct vfmig_device *vfmig_console_new(void)
{
    struct console *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    pthread_mutex_init(&c->lock, NULL);
    c->dev = (struct vfmig_device){.name = "console", .space = VFMIG_SPACE_PIO, .base = VFMIG_PORT_CONSOLE,
                                   .len = 1, .opaque = c, .access = console_access, .destroy = console_destroy};
    return &c->dev;
}
