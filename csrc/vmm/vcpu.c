/* vCPU threads: the KVM_RUN loop, exit dispatch to devices, pause/resume and throttling. */
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include "vfmig/migstate.h"
#include "vfmig/vm.h"

#define KICK_SIGNAL SIGUSR2
#define THROTTLE_SLICE_NS 10000000ull

static void on_kick(int sig) { (void)sig; }

static void install_kick_signal(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_kick; /* no SA_RESTART: KVM_RUN must return EINTR */
    sigemptyset(&sa.sa_mask);
    sigaction(KICK_SIGNAL, &sa, NULL);
}

static void install_kick_handler(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, install_kick_signal);
}

void vfmig_vcpu_kick(struct vfmig_vcpu *cpu)
{
    /* immediate_exit covers the window before the thread enters KVM_RUN; the signal covers
     * the time inside it (halted in the kernel, or running guest code). */
    __atomic_store_n(&cpu->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
    if (cpu->thread_live)
        pthread_kill(cpu->thread, KICK_SIGNAL);
}

static struct vfmig_device *bus_find(struct vfmig_vm *vm, enum vfmig_space space, uint64_t addr)
{
    for (uint32_t i = 0; i < vm->ndevices; i++) {
        struct vfmig_device *d = vm->devices[i];
        if (d->space == space && addr >= d->base && addr - d->base < d->len)
            return d;
    }
    return NULL;
}

static int dispatch(struct vfmig_vcpu *cpu, enum vfmig_space space, uint64_t addr, uint8_t *data,
                    uint32_t len, int is_write)
{
    struct vfmig_device *d = bus_find(cpu->vm, space, addr);
    if (!d) {
        if (!is_write)
            memset(data, 0xff, len); /* open bus */
        return 0;
    }
    atomic_store_explicit(&cpu->in_access, addr << 4 | (uint64_t)!!is_write << 2 | (uint64_t)space,
                          memory_order_relaxed);
    int r = d->access(d, cpu, addr, data, len, is_write);
    atomic_store_explicit(&cpu->in_access, 0, memory_order_relaxed);
    return r;
}

static int handle_io(struct vfmig_vcpu *cpu)
{
    struct kvm_run *run = cpu->run;
    uint8_t *data = (uint8_t *)run + run->io.data_offset;
    for (uint32_t i = 0; i < run->io.count; i++, data += run->io.size) {
        int r = dispatch(cpu, VFMIG_SPACE_PIO, run->io.port, data, run->io.size,
                         run->io.direction == KVM_EXIT_IO_OUT);
        if (r < 0)
            return r;
    }
    return 0;
}

static void vcpu_failed(struct vfmig_vcpu *cpu, const char *what, uint32_t detail)
{
    struct vfmig_vm *vm = cpu->vm;
    struct kvm_regs regs = {0};
    ioctl(cpu->fd, KVM_GET_REGS, &regs);
    pthread_mutex_lock(&vm->lock);
    if (!atomic_load(&vm->failed))
        vfmig_fail(&vm->err, EIO, "vCPU %u stopped: %s (%u) at rip 0x%llx", cpu->id, what, detail,
                   (unsigned long long)regs.rip);
    atomic_store(&vm->failed, 1);
    pthread_mutex_unlock(&vm->lock);
}

/* Sleep pct/(100-pct) slices once the vCPU has run a whole slice since its last sleep. The
 * tick only prompts the check: a tick that lands during a sleep must not start another sleep at
 * once, or a throttle of 50% or more would leave the guest almost no time at all. */
static void throttle(struct vfmig_vcpu *cpu)
{
    int pct = atomic_load(&cpu->vm->throttle_pct);
    if (!atomic_exchange(&cpu->throttle_due, 0) || pct <= 0)
        return;
    uint64_t now = vfmig_now_ns();
    if (now - atomic_load(&cpu->throttle_ran_since_ns) < THROTTLE_SLICE_NS)
        return;
    /* Sleep to an absolute time: a signal (a kick) must not cut the sleep short, but a pause
     * request or the throttle's end must (vfmig_vm_unthrottle kicks until it sees us awake). */
    uint64_t until = now + THROTTLE_SLICE_NS * (uint64_t)pct / (uint64_t)(100 - pct);
    struct timespec ts = {.tv_sec = (time_t)(until / 1000000000ull), .tv_nsec = (long)(until % 1000000000ull)};
    atomic_store(&cpu->throttle_sleep_since_ns, now);
    while (!atomic_load(&cpu->vm->pause_req) && atomic_load(&cpu->vm->throttle_pct) > 0 &&
           clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
    atomic_store(&cpu->throttle_sleep_since_ns, 0);
    atomic_store(&cpu->throttle_ran_since_ns, vfmig_now_ns());
}

static int handle_exit(struct vfmig_vcpu *cpu)
{
    struct kvm_run *run = cpu->run;
    switch (run->exit_reason) {
    case KVM_EXIT_IO:
        atomic_fetch_add_explicit(&cpu->exits[VFMIG_EXIT_IO], 1, memory_order_relaxed);
        return handle_io(cpu);
    case KVM_EXIT_MMIO:
        atomic_fetch_add_explicit(&cpu->exits[VFMIG_EXIT_MMIO], 1, memory_order_relaxed);
        return dispatch(cpu, VFMIG_SPACE_MMIO, run->mmio.phys_addr, run->mmio.data, run->mmio.len,
                        run->mmio.is_write);
    case KVM_EXIT_HLT:
        atomic_fetch_add_explicit(&cpu->exits[VFMIG_EXIT_HLT], 1, memory_order_relaxed);
        usleep(1000);
        return 0;
    case KVM_EXIT_DIRTY_RING_FULL:
        atomic_fetch_add_explicit(&cpu->exits[VFMIG_EXIT_RING_FULL], 1, memory_order_relaxed);
        /* The harvester (dirty_ring.c) sees the flag; give it a moment before re-entering. */
        atomic_store(&cpu->ring_full, 1);
        usleep(500);
        return 0;
    case KVM_EXIT_SHUTDOWN:
        atomic_fetch_add_explicit(&cpu->exits[VFMIG_EXIT_SHUTDOWN], 1, memory_order_relaxed);
        vcpu_failed(cpu, "triple fault (shutdown)", 0);
        return -EIO;
    case KVM_EXIT_INTERNAL_ERROR:
        atomic_fetch_add_explicit(&cpu->exits[VFMIG_EXIT_INTERNAL], 1, memory_order_relaxed);
        vcpu_failed(cpu, "KVM internal error", run->internal.suberror);
        return -EIO;
    default:
        atomic_fetch_add_explicit(&cpu->exits[VFMIG_EXIT_OTHER], 1, memory_order_relaxed);
        vcpu_failed(cpu, "unexpected exit reason", run->exit_reason);
        return -EIO;
    }
}

/* Let KVM finish the access of the last exit without running the guest on: KVM stores a port or
 * MMIO read's value and moves RIP past it only on the next KVM_RUN. A vCPU parked before that
 * has its state saved mid-instruction, and the destination would do the access again: a second
 * device write, or a clock read that loses the one the guest made before the stop.
 * immediate_exit makes that KVM_RUN return EINTR once the access is done. vCPU thread, unlocked. */
static void finish_last_exit(struct vfmig_vcpu *cpu)
{
    while (cpu->exit_pending && !atomic_load(&cpu->vm->failed)) {
        __atomic_store_n(&cpu->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
        int ran = ioctl(cpu->fd, KVM_RUN, 0);
        cpu->exit_pending = 0;
        if (ran < 0) {
            if (errno != EINTR && errno != EAGAIN)
                vcpu_failed(cpu, strerror(errno), (uint32_t)errno);
        } else if (handle_exit(cpu) == 0) {
            cpu->exit_pending = 1; /* the access went on: a string I/O's next chunk */
        } else if (!atomic_load(&cpu->vm->failed)) {
            vcpu_failed(cpu, "device error", 0);
        }
    }
}

/* Blocks while a pause is requested. Returns 1 when the VM is being torn down. */
static int wait_if_paused(struct vfmig_vcpu *cpu)
{
    struct vfmig_vm *vm = cpu->vm;
    __atomic_store_n(&cpu->run->immediate_exit, 0, __ATOMIC_SEQ_CST);
    if (!atomic_load(&vm->pause_req) && !atomic_load(&vm->failed) && !__atomic_load_n(&vm->quit, __ATOMIC_ACQUIRE))
        return 0;
    if (atomic_load(&vm->pause_req) && !__atomic_load_n(&vm->quit, __ATOMIC_ACQUIRE))
        finish_last_exit(cpu);
    pthread_mutex_lock(&vm->lock);
    while ((atomic_load(&vm->pause_req) || atomic_load(&vm->failed)) && !vm->quit) {
        if (!cpu->paused) {
            cpu->paused = 1;
            cpu->parked_left_ns = atomic_load_explicit(&cpu->left_guest_ns, memory_order_relaxed);
            pthread_cond_broadcast(&vm->cond);
        }
        pthread_cond_wait(&vm->cond, &vm->lock);
    }
    cpu->paused = 0;
    int quit = vm->quit;
    pthread_mutex_unlock(&vm->lock);
    __atomic_store_n(&cpu->run->immediate_exit, 0, __ATOMIC_SEQ_CST);
    return quit;
}

/* Names the thread "vcpuN" and publishes its tid; vfmig_vm_start waits for the tid. vCPU
 * thread, as it starts; takes vm->lock briefly. Naming cannot fail with a name this short. */
static void vcpu_announce(struct vfmig_vcpu *cpu)
{
    char name[16];
    snprintf(name, sizeof(name), "vcpu%u", cpu->id);
    pthread_setname_np(pthread_self(), name);
    pthread_mutex_lock(&cpu->vm->lock);
    atomic_store(&cpu->tid, (int)gettid());
    pthread_cond_broadcast(&cpu->vm->cond);
    pthread_mutex_unlock(&cpu->vm->lock);
}

static void *vcpu_thread(void *arg)
{
    struct vfmig_vcpu *cpu = arg;
    vcpu_announce(cpu);
    sigset_t only_kick;
    sigfillset(&only_kick);
    sigdelset(&only_kick, KICK_SIGNAL);
    pthread_sigmask(SIG_SETMASK, &only_kick, NULL); /* SIGINT and friends go to Python */
    for (;;) {
        if (wait_if_paused(cpu))
            break;
        throttle(cpu);
        if (!atomic_load_explicit(&cpu->vm->first_run_ns, memory_order_relaxed)) {
            uint64_t zero = 0;
            atomic_compare_exchange_strong(&cpu->vm->first_run_ns, &zero, vfmig_checkpoint("vcpu-first-run"));
        }
        int ran = ioctl(cpu->fd, KVM_RUN, 0);
        atomic_store_explicit(&cpu->left_guest_ns, vfmig_now_ns(), memory_order_relaxed);
        cpu->exit_pending = 0;
        if (ran < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                atomic_fetch_add_explicit(&cpu->exits[VFMIG_EXIT_INTR], 1, memory_order_relaxed);
                continue;
            }
            vcpu_failed(cpu, strerror(errno), (uint32_t)errno);
            continue;
        }
        if (handle_exit(cpu) == 0)
            cpu->exit_pending = 1;
        else if (!atomic_load(&cpu->vm->failed))
            vcpu_failed(cpu, "device error", 0);
    }
    return NULL;
}

static void *throttle_thread(void *arg)
{
    struct vfmig_vm *vm = arg;
    pthread_setname_np(pthread_self(), "vfmig-throttle");
    /* Tick at a quarter slice, so a vCPU overruns its slice by at most that much. */
    struct timespec slice = {.tv_sec = 0, .tv_nsec = (long)(THROTTLE_SLICE_NS / 4)};
    while (atomic_load(&vm->throttle_pct) > 0 && !__atomic_load_n(&vm->quit, __ATOMIC_ACQUIRE)) {
        nanosleep(&slice, NULL);
        uint64_t now = vfmig_now_ns();
        for (uint32_t i = 0; i < vm->nvcpus; i++) {
            if (now - atomic_load(&vm->vcpus[i].throttle_ran_since_ns) < THROTTLE_SLICE_NS)
                continue; /* still in its slice, or asleep: no need to make it exit */
            atomic_store(&vm->vcpus[i].throttle_due, 1);
            vfmig_vcpu_kick(&vm->vcpus[i]);
        }
    }
    return NULL;
}

int vfmig_vm_set_throttle(struct vfmig_vm *vm, int pct)
{
    if (pct < 0 || pct > 99)
        return vfmig_fail(&vm->err, EINVAL, "throttle must be 0..99%%, got %d", pct);
    atomic_store(&vm->throttle_pct, pct);
    if (pct == 0 && vm->throttle_live) {
        pthread_join(vm->throttle_thread, NULL);
        vm->throttle_live = 0;
    } else if (pct > 0 && !vm->throttle_live) {
        if (pthread_create(&vm->throttle_thread, NULL, throttle_thread, vm) != 0)
            return vfmig_fail(&vm->err, EAGAIN, "cannot start the throttle thread");
        vm->throttle_live = 1;
    }
    return 0;
}

/* Guest exits of a vCPU: each one means it ran guest code. A kick's EINTR does not count. */
static uint64_t guest_exits(struct vfmig_vcpu *cpu)
{
    uint64_t n = 0;
    for (int k = 0; k < VFMIG_EXIT__COUNT; k++)
        if (k != VFMIG_EXIT_INTR)
            n += atomic_load_explicit(&cpu->exits[k], memory_order_relaxed);
    return n;
}

/* Whether KVM holds this vCPU in its halt (HLT with nothing to do, or waiting for a SIPI): an
 * idle vCPU has no guest code to run and no faults to finish, and no exit would come to say so
 * (an idle guest that halts with interrupts off never exits again). Its thread then sleeps in
 * kvm_vcpu_block, which /proc names; if it cannot be read, the answer is no. Any thread. */
static int vcpu_halted(const struct vfmig_vcpu *cpu)
{
    int tid = atomic_load(&cpu->tid);
    char path[48], name[32];
    if (!tid)
        return 0;
    snprintf(path, sizeof(path), "/proc/self/task/%d/wchan", tid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, name, sizeof(name) - 1);
    close(fd);
    if (n <= 0)
        return 0;
    name[n] = 0;
    return strcmp(name, "kvm_vcpu_block") == 0;
}

int vfmig_vm_unthrottle(struct vfmig_vm *vm, uint32_t timeout_ms, struct vfmig_unthrottle *out)
{
    memset(out, 0, sizeof(*out));
    if (timeout_ms < 1 || timeout_ms > VFMIG_PAUSE_TIMEOUT_MS_MAX)
        return vfmig_fail(&vm->err, EINVAL, "unthrottle timeout must be 1..%d ms, got %u", VFMIG_PAUSE_TIMEOUT_MS_MAX,
                          timeout_ms);
    /* Who sleeps, read before the throttle goes: its thread's kicks end sleeps as it stops. */
    uint64_t now = vfmig_now_ns(), deadline = now + (uint64_t)timeout_ms * 1000000ull;
    uint64_t seen[VFMIG_MAX_VCPUS], need[VFMIG_MAX_VCPUS];
    int waiting[VFMIG_MAX_VCPUS] = {0};
    uint32_t left = 0;
    for (uint32_t i = 0; i < vm->nvcpus; i++) {
        /* Every vCPU, not only sleepers: the dirty-log sync just before the stop write-protects
         * the guest's pages, and a vCPU stalled in those faults has not run either. */
        waiting[i] = 1;
        left++;
        seen[i] = guest_exits(&vm->vcpus[i]);
        need[i] = 1;
        uint64_t since = atomic_load(&vm->vcpus[i].throttle_sleep_since_ns);
        if (!since)
            continue;
        need[i] = 2;
        out->woken++;
        if (now - since > out->longest_sleep_ns)
            out->longest_sleep_ns = now - since;
    }
    int rc = vfmig_vm_set_throttle(vm, 0);
    if (rc < 0)
        return rc;
    /* A kick that lands just before the vCPU enters its sleep is lost, so kick again until it is
     * awake; then wait for its next guest exit, or two after a sleep: the throttle can stop a vCPU
     * inside a sequence of accesses, and the first exit after the wake may only end it (this
     * guest's clock is two port reads, and a sleep between them hands it a time read before the
     * sleep). Short polls: this is the guest's time. */
    while (left && vfmig_now_ns() < deadline) {
        left = 0;
        for (uint32_t i = 0; i < vm->nvcpus; i++) {
            if (!waiting[i])
                continue;
            if (atomic_load(&vm->vcpus[i].throttle_sleep_since_ns)) {
                seen[i] = guest_exits(&vm->vcpus[i]); /* asleep: no exit is under way */
                need[i] = 2;
                vfmig_vcpu_kick(&vm->vcpus[i]);
            } else if (guest_exits(&vm->vcpus[i]) - seen[i] >= need[i] || vcpu_halted(&vm->vcpus[i])) {
                waiting[i] = 0; /* it ran guest code, or it is idle (halted) */
            }
            left += (uint32_t)waiting[i];
        }
        if (left) {
            struct timespec ts = {.tv_sec = 0, .tv_nsec = 50000};
            nanosleep(&ts, NULL);
        }
    }
    for (uint32_t i = 0; i < vm->nvcpus; i++)
        out->late += (uint32_t)waiting[i];
    return 0;
}

/* Stop or start every device, as VFIO's RUNNING <-> STOP: migratable devices through their state
 * machine, the rest through set_running. Lifecycle thread. 0, or the first device's error
 * (in vm->err); the others are still moved. */
static int set_devices_running(struct vfmig_vm *vm, int running)
{
    int rc = 0;
    for (uint32_t i = 0; i < vm->ndevices; i++) {
        struct vfmig_device *d = vm->devices[i];
        if (d->mig) {
            struct vfmig_err e;
            int r = vfmig_mig_set_running(d->mig, running, &e);
            if (r < 0 && rc == 0)
                rc = vfmig_fail(&vm->err, -r, "device %s: %s", d->name, e.msg);
        } else if (d->set_running) {
            d->set_running(d, running);
        }
    }
    return rc;
}

/* Until every vCPU thread has published its tid, so vcpu_tids() read after start is complete.
 * Each thread does that first thing, without waiting on anything: a wait of microseconds. */
static void wait_vcpu_tids(struct vfmig_vm *vm)
{
    pthread_mutex_lock(&vm->lock);
    for (uint32_t i = 0; i < vm->nvcpus; i++)
        while (!atomic_load(&vm->vcpus[i].tid))
            pthread_cond_wait(&vm->cond, &vm->lock);
    pthread_mutex_unlock(&vm->lock);
}

int vfmig_vm_start(struct vfmig_vm *vm)
{
    if (vm->started)
        return vfmig_fail(&vm->err, EALREADY, "VM already started");
    install_kick_handler();
    /* A device loaded by a migration waits in STOP until its VM starts. */
    int r = set_devices_running(vm, 1);
    if (r < 0)
        return r;
    for (uint32_t i = 0; i < vm->nvcpus; i++) {
        struct vfmig_vcpu *cpu = &vm->vcpus[i];
        if (pthread_create(&cpu->thread, NULL, vcpu_thread, cpu) != 0)
            return vfmig_fail(&vm->err, EAGAIN, "cannot start vCPU thread %u", i);
        cpu->thread_live = 1;
    }
    wait_vcpu_tids(vm);
    vm->started = 1;
    return 0;
}

/* Spin this long for the vCPUs to park (a healthy pause takes tens of us), then poll gently. */
#define PAUSE_SPIN_NS 1000000ull
#define PAUSE_POLL_US 100

/* Bit i set: vCPU i is live and not parked. Under vm->lock. */
static uint32_t vcpus_running(struct vfmig_vm *vm)
{
    uint32_t mask = 0;
    for (uint32_t i = 0; i < vm->nvcpus; i++)
        if (vm->vcpus[i].thread_live && !vm->vcpus[i].paused)
            mask |= 1u << i;
    return mask;
}

/* "vCPU 0 (in a read of port 0x5f0)" for each vCPU in mask, into buf; truncated to cap. */
static void describe_vcpus(struct vfmig_vm *vm, uint32_t mask, char *buf, size_t cap)
{
    size_t n = 0;
    buf[0] = 0;
    for (uint32_t i = 0; i < vm->nvcpus && n < cap; i++) {
        if (!(mask & (1u << i)))
            continue;
        uint64_t a = atomic_load_explicit(&vm->vcpus[i].in_access, memory_order_relaxed);
        const char *sep = n ? ", " : "";
        int w;
        if (a)
            w = snprintf(buf + n, cap - n, "%svCPU %u (in a %s of %s 0x%llx)", sep, i, a & 4 ? "write" : "read",
                         (a & 3) == VFMIG_SPACE_PIO ? "port" : "MMIO", (unsigned long long)(a >> 4));
        else
            w = snprintf(buf + n, cap - n, "%svCPU %u (not in a device access)", sep, i);
        if (w < 0)
            break;
        n += (size_t)w;
    }
}

int vfmig_vm_pause(struct vfmig_vm *vm, uint32_t timeout_ms)
{
    if (timeout_ms < 1 || timeout_ms > VFMIG_PAUSE_TIMEOUT_MS_MAX)
        return vfmig_fail(&vm->err, EINVAL, "pause timeout must be 1..%u ms, got %u", VFMIG_PAUSE_TIMEOUT_MS_MAX,
                          timeout_ms);
    uint64_t t0 = vfmig_now_ns(), deadline = t0 + (uint64_t)timeout_ms * 1000000ull;
    atomic_store(&vm->pause_req, 1);
    for (uint32_t i = 0; i < vm->nvcpus; i++)
        vfmig_vcpu_kick(&vm->vcpus[i]);
    uint64_t kicked = vfmig_now_ns();
    pthread_mutex_lock(&vm->lock);
    for (uint32_t running; (running = vcpus_running(vm));) {
        uint64_t now = vfmig_now_ns();
        if (now >= deadline) {
            /* Let go of the parked ones too, under the lock so no vCPU parks in between: the
             * guest keeps running and nothing was stopped. */
            char who[VFMIG_ERR_LEN - 64]; /* room for the rest of the message */
            describe_vcpus(vm, running, who, sizeof(who));
            atomic_store(&vm->pause_req, 0);
            pthread_cond_broadcast(&vm->cond);
            int r = vfmig_fail(&vm->err, ETIMEDOUT, "pause timed out after %u ms: %s did not stop", timeout_ms, who);
            pthread_mutex_unlock(&vm->lock);
            return r;
        }
        pthread_mutex_unlock(&vm->lock);
        /* A kick can land just before KVM_RUN re-arms; re-kick until all are parked. */
        for (uint32_t i = 0; i < vm->nvcpus; i++)
            if (running & (1u << i))
                vfmig_vcpu_kick(&vm->vcpus[i]);
        if (now - t0 < PAUSE_SPIN_NS)
            sched_yield();
        else
            usleep(PAUSE_POLL_US);
        pthread_mutex_lock(&vm->lock);
    }
    if (atomic_load(&vm->failed)) {
        /* Parked because a vCPU failed, not for us: a dead guest must not be saved and moved
         * (its other vCPUs may even sit mid-access). vm->err keeps the failure's message. */
        atomic_store(&vm->pause_req, 0);
        pthread_cond_broadcast(&vm->cond);
        pthread_mutex_unlock(&vm->lock);
        return -EIO;
    }
    vm->pause_stopped_ns = t0;
    for (uint32_t i = 0; i < vm->nvcpus; i++) {
        uint64_t left = vm->vcpus[i].parked_left_ns;
        left = left < t0 ? t0 : left > kicked ? kicked : left;
        if (left > vm->pause_stopped_ns)
            vm->pause_stopped_ns = left;
    }
    pthread_mutex_unlock(&vm->lock);
    int r = set_devices_running(vm, 0);
    if (r < 0) {
        /* A device that cannot stop fails the pause: everything runs again, as on a timeout. */
        set_devices_running(vm, 1);
        pthread_mutex_lock(&vm->lock);
        atomic_store(&vm->pause_req, 0);
        pthread_cond_broadcast(&vm->cond);
        pthread_mutex_unlock(&vm->lock);
        return r;
    }
    vm->last_pause_ns = vfmig_now_ns() - t0;
    return 0;
}

int vfmig_vm_resume(struct vfmig_vm *vm)
{
    uint64_t t0 = vfmig_now_ns();
    if (atomic_load(&vm->failed))
        return -EIO;
    int r = set_devices_running(vm, 1);
    pthread_mutex_lock(&vm->lock);
    atomic_store(&vm->pause_req, 0);
    pthread_cond_broadcast(&vm->cond);
    pthread_mutex_unlock(&vm->lock);
    vm->last_resume_ns = vfmig_now_ns() - t0;
    return r; /* the vCPUs run even if a device could not: the guest sees a broken device, not a hang */
}

void vfmig_vcpus_stop(struct vfmig_vm *vm)
{
    pthread_mutex_lock(&vm->lock);
    __atomic_store_n(&vm->quit, 1, __ATOMIC_RELEASE); /* the throttle thread reads it unlocked */
    pthread_cond_broadcast(&vm->cond);
    pthread_mutex_unlock(&vm->lock);
    atomic_store(&vm->throttle_pct, 0);
    if (vm->throttle_live)
        pthread_join(vm->throttle_thread, NULL);
    vm->throttle_live = 0;
    for (uint32_t i = 0; i < vm->nvcpus; i++) {
        struct vfmig_vcpu *cpu = &vm->vcpus[i];
        if (!cpu->thread_live)
            continue;
        vfmig_vcpu_kick(cpu);
        pthread_join(cpu->thread, NULL);
        cpu->thread_live = 0;
    }
}
