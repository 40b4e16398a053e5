/* See vcpu_loop.h for what this file owns and why. */
#define _GNU_SOURCE
#include "vcpu_loop.h"

#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

/* The kick signal. glibc reserves SIGRTMIN-2 and -1 for itself; SIGRTMIN is free for us and
 * Python's signal module never installs a handler on it. */
#define PYHV_KICK_SIGNAL (SIGRTMIN)

int pyhv_ioctl(int fd, unsigned long request, void *arg)
{
    int result = ioctl(fd, request, arg);
    return result < 0 ? -errno : result;
}

int pyhv_ioctl_value(int fd, unsigned long request, unsigned long arg)
{
    int result = ioctl(fd, request, arg);
    return result < 0 ? -errno : result;
}

static void kick_handler(int signo)
{
    /* Nothing to do: the kicker set immediate_exit before signalling, and the signal's only
     * job is to make a KVM_RUN already in progress return EINTR. */
    (void)signo;
}

int pyhv_install_kick_handler(void)
{
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_handler = kick_handler;
    sigemptyset(&action.sa_mask);
    action.sa_flags = 0; /* no SA_RESTART: KVM_RUN must return EINTR */
    if (sigaction(PYHV_KICK_SIGNAL, &action, NULL) < 0)
        return -errno;
    return 0;
}

int pyhv_vcpu_map_run(struct pyhv_vcpu *vcpu, int fd, size_t run_size)
{
    void *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (run == MAP_FAILED)
        return -errno;
    vcpu->fd = fd;
    vcpu->run = run;
    vcpu->run_size = run_size;
    return 0;
}

void pyhv_vcpu_detach_thread(struct pyhv_vcpu *vcpu)
{
    /* The thread that ran this vCPU is leaving: a later kick must not signal it. */
    __atomic_store_n(&vcpu->thread_valid, 0, __ATOMIC_SEQ_CST);
}

void pyhv_vcpu_unmap_run(struct pyhv_vcpu *vcpu)
{
    pyhv_vcpu_detach_thread(vcpu);
    if (vcpu->run) {
        munmap(vcpu->run, vcpu->run_size);
        vcpu->run = NULL;
    }
}

/* Binary search of a table sorted by base; NULL when [address, address + size) is not inside
 * one range. An access that starts in a range but runs past its end belongs to no device (as
 * Bus.read/Bus.write in devices/bus.py decide), so it is completed as unmapped and counted. */
static const struct pyhv_range *find_range(const struct pyhv_table *table, uint64_t address, uint64_t size)
{
    uint32_t low = 0, high = table->count;
    while (low < high) {
        uint32_t middle = low + (high - low) / 2;
        const struct pyhv_range *range = &table->ranges[middle];
        if (address < range->base)
            high = middle;
        else if (address - range->base >= range->size)
            low = middle + 1;
        else
            return size <= range->size - (address - range->base) ? range : NULL;
    }
    return NULL;
}

static int take_kick(struct pyhv_vcpu *vcpu, struct pyhv_exit *out)
{
    if (!vcpu->kick_pending)
        return 0;
    vcpu->kick_pending = 0;
    __atomic_store_n(&vcpu->run->immediate_exit, 0, __ATOMIC_SEQ_CST);
    vcpu->stats.kicks++;
    out->kind = PYHV_EXIT_KICKED;
    return 1;
}

int pyhv_uart_init(struct pyhv_uart *uart)
{
    memset(uart, 0, sizeof(*uart));
    return -pthread_mutex_init(&uart->lock, NULL);
}

void pyhv_uart_destroy(struct pyhv_uart *uart)
{
    pthread_mutex_destroy(&uart->lock);
}

/* Moves the waiting bytes to `out` (PYHV_UART_BUFFER_SIZE bytes) and returns how many. */
uint32_t pyhv_uart_take(struct pyhv_uart *uart, uint8_t *out)
{
    pthread_mutex_lock(&uart->lock);
    uint32_t count = uart->count;
    memcpy(out, uart->buffer, count);
    uart->count = 0;
    pthread_mutex_unlock(&uart->lock);
    return count;
}

/* Takes the waiting bytes (as pyhv_uart_take) and sets fast and lsr in the same critical
 * section, so no byte can be appended under the old state after Python has drained. */
uint32_t pyhv_uart_publish(struct pyhv_uart *uart, uint8_t *out, uint32_t fast, uint8_t lsr)
{
    pthread_mutex_lock(&uart->lock);
    uint32_t count = uart->count;
    memcpy(out, uart->buffer, count);
    uart->count = 0;
    uart->lsr = lsr;
    uart->fast = fast;
    pthread_mutex_unlock(&uart->lock);
    return count;
}

/* A one-byte THR write or LSR read of a fast UART. Returns 1 when done here, 2 when done and the
 * buffer must be drained (a newline, or full), 0 to go to Python. */
static int handle_uart(struct pyhv_vcpu *vcpu, uint64_t offset, int is_in, uint8_t *data)
{
    struct pyhv_uart *uart = vcpu->uart;
    /* PC16550D Table II: offset 0 is THR (the divisor latch is closed while fast), 5 is LSR. */
    if (is_in) {
        if (offset != 5 || !uart->fast)
            return 0;
        *data = uart->lsr;
        __atomic_add_fetch(&uart->lsr_reads, 1, __ATOMIC_RELAXED);
        return 1;
    }
    if (offset != 0)
        return 0;
    int result = 0;
    pthread_mutex_lock(&uart->lock);
    if (uart->fast && uart->count < PYHV_UART_BUFFER_SIZE) { /* checked again under the lock */
        uart->buffer[uart->count++] = *data;
        uart->bytes_taken++;
        result = (*data == '\n' || uart->count == PYHV_UART_BUFFER_SIZE) ? 2 : 1;
    }
    pthread_mutex_unlock(&uart->lock);
    return result;
}

/* Completes a port access in C when it can. Returns 1 when handled, 0 to go to Python. */
static int handle_pio(struct pyhv_vcpu *vcpu, struct pyhv_exit *out)
{
    struct kvm_run *run = vcpu->run;
    uint8_t *data = (uint8_t *)run + run->io.data_offset;
    size_t bytes = (size_t)run->io.size * run->io.count;
    int is_in = run->io.direction == KVM_EXIT_IO_IN;
    const struct pyhv_range *range = find_range(&vcpu->pio, run->io.port, run->io.size);

    if (range == NULL) {
        if (is_in) {
            memset(data, vcpu->pio.unmapped_fill, bytes);
            vcpu->stats.pio_unmapped_reads++;
        } else {
            vcpu->stats.pio_unmapped_writes++;
        }
        if (!vcpu->stats.first_unmapped_pio)
            vcpu->stats.first_unmapped_pio = (uint64_t)run->io.port + 1;
        return 1;
    }
    if (range->action == PYHV_RANGE_SINK) {
        if (is_in)
            memset(data, range->fill, bytes);
        vcpu->stats.pio_sink++;
        return 1;
    }
    if (range->action == PYHV_RANGE_UART && vcpu->uart && bytes == 1) {
        int done = handle_uart(vcpu, run->io.port - range->base, is_in, data);
        if (done == 1)
            return 1;
        if (done == 2) {
            out->kind = PYHV_EXIT_UART_FLUSH;
            out->device_id = range->device_id;
            return 0;
        }
    }
    out->kind = is_in ? PYHV_EXIT_PIO_IN : PYHV_EXIT_PIO_OUT;
    out->address = run->io.port;
    out->offset = run->io.port - range->base;
    out->device_id = range->device_id;
    out->size = run->io.size;
    out->count = run->io.count;
    out->data = data;
    return 0;
}

static int handle_mmio(struct pyhv_vcpu *vcpu, struct pyhv_exit *out)
{
    struct kvm_run *run = vcpu->run;
    uint32_t length = run->mmio.len > 8 ? 8 : run->mmio.len;
    const struct pyhv_range *range = find_range(&vcpu->mmio, run->mmio.phys_addr, length);

    if (range == NULL) {
        if (!run->mmio.is_write) {
            memset(run->mmio.data, vcpu->mmio.unmapped_fill, length);
            vcpu->stats.mmio_unmapped_reads++;
        } else {
            vcpu->stats.mmio_unmapped_writes++;
        }
        if (!vcpu->stats.first_unmapped_mmio)
            vcpu->stats.first_unmapped_mmio = run->mmio.phys_addr + 1;
        return 1;
    }
    if (range->action == PYHV_RANGE_SINK) {
        if (!run->mmio.is_write)
            memset(run->mmio.data, range->fill, length);
        vcpu->stats.mmio_sink++;
        return 1;
    }
    out->kind = run->mmio.is_write ? PYHV_EXIT_MMIO_WRITE : PYHV_EXIT_MMIO_READ;
    out->address = run->mmio.phys_addr;
    out->offset = run->mmio.phys_addr - range->base;
    out->device_id = range->device_id;
    out->size = length;
    out->count = 1;
    out->data = run->mmio.data;
    return 0;
}

int pyhv_vcpu_run(struct pyhv_vcpu *vcpu, struct pyhv_exit *out)
{
    struct kvm_run *run = vcpu->run;

    /* A fresh record per call: fields of an earlier exit must never be read as this one's. */
    memset(out, 0, sizeof(*out));
    if (!vcpu->thread_valid || !pthread_equal(vcpu->thread, pthread_self())) {
        vcpu->thread = pthread_self();
        __atomic_store_n(&vcpu->thread_valid, 1, __ATOMIC_SEQ_CST);
    }
    for (;;) {
        if (take_kick(vcpu, out))
            return out->kind;
        int result = ioctl(vcpu->fd, KVM_RUN, 0);
        vcpu->stats.kvm_run_calls++;
        if (result < 0) {
            int error = errno;
            if (error == EINTR) {
                __atomic_store_n(&run->immediate_exit, 0, __ATOMIC_SEQ_CST);
                if (take_kick(vcpu, out))
                    return out->kind;
                vcpu->stats.eintr++;
                out->kind = PYHV_EXIT_INTERRUPTED;
                return out->kind;
            }
            if (error == EAGAIN) {
                vcpu->stats.eagain++;
                continue;
            }
            out->kind = PYHV_EXIT_ERROR;
            out->error = error;
            return out->kind;
        }

        uint32_t reason = run->exit_reason;
        vcpu->stats.total_exits++;
        vcpu->stats.exits_by_reason[reason < PYHV_MAX_EXIT_REASONS ? reason : 0]++;
        out->exit_reason = reason;

        int handled;
        if (reason == KVM_EXIT_IO)
            handled = handle_pio(vcpu, out);
        else if (reason == KVM_EXIT_MMIO)
            handled = handle_mmio(vcpu, out);
        else {
            out->kind = PYHV_EXIT_KVM;
            handled = 0;
        }
        if (!handled) {
            vcpu->stats.python_exits++;
            if (vcpu->exit_budget)
                vcpu->exit_budget--; /* the budget counts exits, Python's included */
            return out->kind;
        }
        if (vcpu->exit_budget && --vcpu->exit_budget == 0) {
            out->kind = PYHV_EXIT_BUDGET;
            return out->kind;
        }
    }
}

int pyhv_vcpu_kick(struct pyhv_vcpu *vcpu)
{
    vcpu->kick_pending = 1;
    if (vcpu->run)
        __atomic_store_n(&vcpu->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&vcpu->thread_valid, __ATOMIC_SEQ_CST)) {
        int error = pthread_kill(vcpu->thread, PYHV_KICK_SIGNAL);
        if (error && error != ESRCH)
            return -error;
    }
    return 0;
}

/* Forgets a kick that is no longer needed: called by the vCPU's own thread when it leaves its
 * park (RunControl.park), where it was outside KVM_RUN already; a kick that arrives after this
 * is kept as usual, so a pause requested later is never lost. */
void pyhv_vcpu_clear_kick(struct pyhv_vcpu *vcpu)
{
    vcpu->kick_pending = 0;
    if (vcpu->run)
        __atomic_store_n(&vcpu->run->immediate_exit, 0, __ATOMIC_SEQ_CST);
}

/* Queues an exception for the next entry (api.rst, KVM_SET_VCPU_EVENTS): used to deliver the
 * #BP of an int3 that the hypervisor emulated on the guest's behalf. */
int pyhv_vcpu_inject_exception(struct pyhv_vcpu *vcpu, uint32_t vector, int has_error_code,
                               uint32_t error_code)
{
    struct kvm_vcpu_events events;
    if (ioctl(vcpu->fd, KVM_GET_VCPU_EVENTS, &events) < 0)
        return -errno;
    events.exception.injected = 1;
    events.exception.nr = (uint8_t)vector;
    events.exception.has_error_code = has_error_code ? 1 : 0;
    events.exception.error_code = error_code;
    events.exception.pending = 0;
    events.flags = 0;
    if (ioctl(vcpu->fd, KVM_SET_VCPU_EVENTS, &events) < 0)
        return -errno;
    return 0;
}

/* The benchmark's reference: KVM_RUN in a loop with no dispatch at all (port reads get
 * whatever the buffer holds). Returns 0 or -errno. */
int pyhv_bench_raw_loop(struct pyhv_vcpu *vcpu, uint64_t exits)
{
    for (uint64_t i = 0; i < exits; i++) {
        if (ioctl(vcpu->fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                __atomic_store_n(&vcpu->run->immediate_exit, 0, __ATOMIC_SEQ_CST);
                continue;
            }
            return -errno;
        }
    }
    return 0;
}

/* LOCK CMPXCHG16B on guest memory (SDM Vol. 2A "CMPXCHG8B/CMPXCHG16B"), for the instruction
 * emulator: the compare and the store must be one atomic operation with respect to the other
 * vCPUs, which run concurrently on the same host mapping, so it cannot be done in Python.
 * `address` must be 16-byte aligned (the caller raises #GP otherwise). expected[0..1] holds
 * RAX/RDX (low/high) and receives the memory's value when the comparison fails.
 * Returns 1 when the exchange happened (ZF=1), 0 otherwise. */
int pyhv_cmpxchg16b(uint8_t *address, uint64_t *expected, uint64_t desired_low, uint64_t desired_high)
{
    unsigned __int128 *target = (unsigned __int128 *)(void *)address;
    unsigned __int128 wanted = ((unsigned __int128)expected[1] << 64) | expected[0];
    unsigned __int128 desired = ((unsigned __int128)desired_high << 64) | desired_low;
    /* The __sync builtin compiles to LOCK CMPXCHG16B itself with -mcx16 (the __atomic one
     * would go through libatomic). */
    unsigned __int128 previous = __sync_val_compare_and_swap(target, wanted, desired);
    if (previous != wanted) {
        expected[0] = (uint64_t)previous;
        expected[1] = (uint64_t)(previous >> 64);
        return 0;
    }
    return 1;
}
