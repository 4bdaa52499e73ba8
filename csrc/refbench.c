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

/* One stream: a writer and a reader thread, each touching only its own end and counter. */
struct stream {
    int listen_fd;
    struct sockaddr_in sa;
    struct end from, to;
    uint64_t bytes, got;
    int err; /* the writer's connect failure, as errno */
};

static void *sink_thread(void *arg)
{
    struct stream *s = arg;
    int c = accept(s->listen_fd, NULL, NULL);
    ssize_t r;
    while (c >= 0 && (r = read(c, s->to.buf + s->got % s->to.cap, step(&s->to, s->got))) > 0)
        s->got += (uint64_t)r;
    if (c >= 0)
        close(c);
    return NULL;
}

static void *source_thread(void *arg)
{
    struct stream *s = arg;
    int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    s->err = c < 0 || connect(c, (void *)&s->sa, sizeof(s->sa)) < 0 ? errno : 0;
    for (uint64_t sent = 0; !s->err && sent < s->bytes;) {
        size_t n = step(&s->from, sent);
        if (n > s->bytes - sent)
            n = (size_t)(s->bytes - sent); /* the last write: no byte past the count */
        ssize_t w = write(c, s->from.buf + sent % s->from.cap, n);
        if (w <= 0)
            break;
        sent += (uint64_t)w;
    }
    if (s->err)
        shutdown(s->listen_fd, SHUT_RDWR); /* no client came: the sink's accept must not wait */
    if (c >= 0)
        close(c);
    return NULL;
}

/* `bytes` over n parallel loopback TCP streams, stream i from from[i] to to[i], bytes/n each;
 * bytes/s from the first write to the last byte read, or -errno (-EIO if any stream came up
 * short). 2n threads it joins before returning. */
static double tcp_streams(uint64_t bytes, const struct end *from, const struct end *to, unsigned n)
{
    struct stream st[VFMIG_REF_MAX_STREAMS];
    pthread_t th[2 * VFMIG_REF_MAX_STREAMS];
    unsigned started = 0, ready = 0;
    int e = 0;
    for (; ready < n; ready++) {
        struct stream *s = &st[ready];
        *s = (struct stream){.listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), .from = from[ready],
                             .to = to[ready], .bytes = bytes / n + (ready == n - 1 ? bytes % n : 0)};
        s->sa = (struct sockaddr_in){.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t sl = sizeof(s->sa);
        if (s->listen_fd < 0 || bind(s->listen_fd, (void *)&s->sa, sizeof(s->sa)) < 0 ||
            listen(s->listen_fd, 1) < 0 || getsockname(s->listen_fd, (void *)&s->sa, &sl) < 0) {
            e = errno;
            if (s->listen_fd >= 0)
                close(s->listen_fd);
            break;
        }
    }
    uint64_t t0 = vfmig_now_ns();
    for (unsigned i = 0; !e && i < n; i++) {
        if (pthread_create(&th[started], NULL, sink_thread, &st[i]) != 0) {
            e = EAGAIN;
            break;
        }
        started++;
        if (pthread_create(&th[started], NULL, source_thread, &st[i]) != 0) {
            e = EAGAIN;
            shutdown(st[i].listen_fd, SHUT_RDWR); /* its sink must not wait for a writer */
            break;
        }
        started++;
    }
    if (e) /* streams whose sink never started: nothing to wait for; the others get an EOF */
        for (unsigned i = 0; i < ready; i++)
            shutdown(st[i].listen_fd, SHUT_RDWR);
    for (unsigned i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    double secs = (double)(vfmig_now_ns() - t0) / 1e9;
    uint64_t got = 0;
    for (unsigned i = 0; i < ready; i++) {
        close(st[i].listen_fd);
        e = e ? e : st[i].err;
        got += st[i].got == st[i].bytes ? st[i].got : 0;
    }
    if (e)
        return -e;
    return got == bytes ? (double)got / secs : -EIO; /* a short stream measured nothing */
}

double vfmig_ref_tcp_loopback(uint64_t bytes, unsigned streams)
{
    if (streams < 1 || streams > VFMIG_REF_MAX_STREAMS)
        return -EINVAL;
    struct end a[VFMIG_REF_MAX_STREAMS] = {{0}}, b[VFMIG_REF_MAX_STREAMS] = {{0}};
    double r = 0;
    for (unsigned i = 0; i < streams; i++) {
        a[i] = (struct end){malloc(CHUNK), CHUNK};
        b[i] = (struct end){malloc(CHUNK), CHUNK};
        if (!a[i].buf || !b[i].buf)
            r = -ENOMEM;
        else {
            memset(a[i].buf, 0x5a, CHUNK);
            memset(b[i].buf, 0, CHUNK);
        }
    }
    if (r == 0)
        r = tcp_streams(bytes, a, b, streams);
    for (unsigned i = 0; i < streams; i++) {
        free(a[i].buf);
        free(b[i].buf);
    }
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

double vfmig_ref_tcp_loopback_ram(uint64_t bytes, unsigned streams)
{
    if (bytes < 4096 || streams < 1 || streams > VFMIG_REF_MAX_STREAMS)
        return -EINVAL;
    uint8_t *src = ram_like(bytes), *dst = ram_like(bytes);
    double r = -ENOMEM;
    if (src && dst) {
        for (uint64_t off = 0; off < bytes; off += 4096)
            src[off] = (uint8_t)(off >> 12 | 1); /* every page present, as the idle guest leaves it */
        /* Stream i moves the i-th of n contiguous slices (the last takes the remainder). */
        struct end a[VFMIG_REF_MAX_STREAMS], b[VFMIG_REF_MAX_STREAMS];
        uint64_t slice = bytes / streams;
        for (unsigned i = 0; i < streams; i++) {
            uint64_t len = i == streams - 1 ? bytes - slice * i : slice;
            a[i] = (struct end){src + slice * i, len};
            b[i] = (struct end){dst + slice * i, len};
        }
        r = tcp_streams(bytes, a, b, streams);
        for (uint64_t off = 0; r > 0 && off < bytes; off += 4096)
            if (dst[off] != src[off])
                r = -EIO; /* the RAM did not arrive where it belongs */
    }
    if (src)
        munmap(src, bytes);
    if (dst)
        munmap(dst, bytes);
    return r;
}
