/* Reference measurements: memcpy, eventfd ping-pong, loopback TCP. */
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

struct sink {
    int listen_fd;
    uint64_t got;
};

static void *sink_thread(void *arg)
{
    struct sink *s = arg;
    int c = accept(s->listen_fd, NULL, NULL);
    char *buf = malloc(1 << 20);
    ssize_t r;
    while (c >= 0 && buf && (r = read(c, buf, 1 << 20)) > 0)
        s->got += (uint64_t)r;
    free(buf);
    if (c >= 0)
        close(c);
    return NULL;
}

double vfmig_ref_tcp_loopback(uint64_t bytes)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sa);
    struct sink s = {socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), 0};
    if (s.listen_fd < 0 || bind(s.listen_fd, (void *)&sa, sizeof(sa)) < 0 || listen(s.listen_fd, 1) < 0 ||
        getsockname(s.listen_fd, (void *)&sa, &sl) < 0)
        return -errno;
    pthread_t th;
    pthread_create(&th, NULL, sink_thread, &s);
    int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (connect(c, (void *)&sa, sizeof(sa)) < 0)
        return -errno;
    char *buf = malloc(1 << 20);
    memset(buf, 0x5a, 1 << 20);
    uint64_t sent = 0, t0 = vfmig_now_ns();
    while (sent < bytes) {
        ssize_t w = write(c, buf, 1 << 20);
        if (w <= 0)
            break;
        sent += (uint64_t)w;
    }
    close(c);
    pthread_join(th, NULL);
    double secs = (double)(vfmig_now_ns() - t0) / 1e9;
    free(buf);
    close(s.listen_fd);
    return (double)s.got / secs;
}
