/* Reference measurements: memcpy, eventfd ping-pong, loopback TCP (cache-hot, and RAM to RAM). */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vfmig/refbench.h"
#include "vfmig/util.h"

#define CHUNK (1u << 20) /* one write or read of the TCP references */

double vfmig_ref_memcpy(uint64_t bytes, int reps)
{
    uint8_t *a = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint8_t *b = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED || b == MAP_FAILED)
        return -ENOMEM;
    memset(a, 1, bytes);
    memset(b, 2, bytes);
    uint64_t t0 = vfmig_now_ns();
    for (int i = 0; i < reps; i++) {
        memcpy(b, a, bytes);
        __asm__ volatile("" ::"r"(b) : "memory");
    }
    double secs = (double)(vfmig_now_ns() - t0) / 1e9;
    munmap(a, bytes);
    munmap(b, bytes);
    return (double)bytes * reps / secs;
}

struct pingpong {
    int ping, pong, rounds;
};

static void *pong_thread(void *arg)
{
    struct pingpong *p = arg;
    uint64_t v;
    for (int i = 0; i < p->rounds; i++) {
        if (read(p->ping, &v, 8) != 8 || write(p->pong, &v, 8) != 8)
            break;
    }
    return NULL;
}

double vfmig_ref_eventfd_rtt(int rounds)
{
    struct pingpong p = {eventfd(0, 0), eventfd(0, 0), rounds};
    pthread_t th;
    if (p.ping < 0 || p.pong < 0 || pthread_create(&th, NULL, pong_thread, &p) != 0)
        return -errno;
    uint64_t v = 1, t0 = vfmig_now_ns();
    for (int i = 0; i < rounds; i++) {
        v = 1;
        if (write(p.ping, &v, 8) != 8 || read(p.pong, &v, 8) != 8)
            break;
    }
    double ns = (double)(vfmig_now_ns() - t0) / rounds;
    pthread_join(th, NULL);
    close(p.ping);
    close(p.pong);
    return ns;
}

/* One end of a loopback stream: its buffer, read or written in 1 MiB steps that wrap at cap. */
struct end {
    uint8_t *buf;
    uint64_t cap;
};

static size_t step(const struct end *e, uint64_t at)
{
    uint64_t left = e->cap - at % e->cap;
    return (size_t)(left < CHUNK ? left : CHUNK);
}

struct sink {
    int listen_fd;
    struct end to;
    uint64_t got;
};

static void *sink_thread(void *arg)
{
    struct sink *s = arg;
    int c = accept(s->listen_fd, NULL, NULL);
    ssize_t r;
    while (c >= 0 && (r = read(c, s->to.buf + s->got % s->to.cap, step(&s->to, s->got))) > 0)
        s->got += (uint64_t)r;
    if (c >= 0)
        close(c);
    return NULL;
}

/* `bytes` from `from` to `to` over one loopback TCP stream; bytes/s, or -errno (-EIO if fewer
 * arrived). Calling thread plus one sink thread it joins; no shared state but the sink's. */
static double tcp_stream(uint64_t bytes, struct end from, struct end to)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sa);
    struct sink s = {socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), to, 0};
    if (s.listen_fd < 0 || bind(s.listen_fd, (void *)&sa, sizeof(sa)) < 0 || listen(s.listen_fd, 1) < 0 ||
        getsockname(s.listen_fd, (void *)&sa, &sl) < 0) {
        int e = errno;
        if (s.listen_fd >= 0)
            close(s.listen_fd);
        return -e;
    }
    pthread_t th;
    if (pthread_create(&th, NULL, sink_thread, &s) != 0) {
        close(s.listen_fd);
        return -EAGAIN;
    }
    int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int e = c < 0 || connect(c, (void *)&sa, sizeof(sa)) < 0 ? errno : 0;
    uint64_t sent = 0, t0 = vfmig_now_ns();
    while (!e && sent < bytes) {
        ssize_t w = write(c, from.buf + sent % from.cap, step(&from, sent));
        if (w <= 0)
            break;
        sent += (uint64_t)w;
    }
    if (e)
        shutdown(s.listen_fd, SHUT_RDWR); /* no client came: the sink's accept must not wait */
    if (c >= 0)
        close(c);
    pthread_join(th, NULL);
    double secs = (double)(vfmig_now_ns() - t0) / 1e9;
    close(s.listen_fd);
    if (e)
        return -e;
    return s.got == bytes ? (double)s.got / secs : -EIO; /* a short stream measured nothing */
}

double vfmig_ref_tcp_loopback(uint64_t bytes)
{
    struct end a = {malloc(CHUNK), CHUNK}, b = {malloc(CHUNK), CHUNK};
    double r = -ENOMEM;
    if (a.buf && b.buf) {
        memset(a.buf, 0x5a, CHUNK);
        memset(b.buf, 0, CHUNK);
        r = tcp_stream(bytes, a, b);
    }
    free(a.buf);
    free(b.buf);
    return r;
}

/* Guest-RAM-like memory: a memfd mapped shared, huge pages asked for, as vm.c maps guest RAM. */
static uint8_t *ram_like(uint64_t bytes)
{
    int fd = memfd_create("vfmig-ref", MFD_CLOEXEC);
    if (fd < 0)
        return NULL;
    void *p = ftruncate(fd, (off_t)bytes) == 0
                  ? mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0)
                  : MAP_FAILED;
    close(fd);
    if (p == MAP_FAILED)
        return NULL;
    madvise(p, bytes, MADV_HUGEPAGE);
    return p;
}

double vfmig_ref_tcp_loopback_ram(uint64_t bytes)
{
    if (bytes < 4096)
        return -EINVAL;
    struct end a = {ram_like(bytes), bytes}, b = {ram_like(bytes), bytes};
    double r = -ENOMEM;
    if (a.buf && b.buf) {
        for (uint64_t off = 0; off < bytes; off += 4096)
            a.buf[off] = (uint8_t)(off >> 12 | 1); /* every page present, as the idle guest leaves it */
        r = tcp_stream(bytes, a, b);
        for (uint64_t off = 0; r > 0 && off < bytes; off += 4096)
            if (b.buf[off] != a.buf[off])
                r = -EIO; /* the RAM did not arrive where it belongs */
    }
    if (a.buf)
        munmap(a.buf, bytes);
    if (b.buf)
        munmap(b.buf, bytes);
    return r;
}
