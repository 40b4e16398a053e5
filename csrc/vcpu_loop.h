/*
 * pyhv's C fast path: the KVM_RUN loop of one vCPU.
 *
 * The loop owns KVM_RUN, EAGAIN retries, the kick (a signal plus kvm_run.immediate_exit, see
 * Documentation/virt/kvm/api.rst "immediate_exit"), frozen sorted tables of port and MMIO
 * ranges, and per-exit counters. Exits that need no Python (writes to sink ranges, accesses to
 * unmapped addresses) are completed here; every other exit comes back as one flat pyhv_exit
 * record so Python never decodes the kvm_run union on the hot path.
 */
#ifndef PYHV_VCPU_LOOP_H
#define PYHV_VCPU_LOOP_H

#include <stddef.h>
#include <stdint.h>
#include <signal.h>
#include <pthread.h>
#include <linux/kvm.h>
#include <asm/bootparam.h>

/* Everything between PYHV_CFFI_BEGIN and PYHV_CFFI_END is also the cffi declaration of the
 * module (csrc/build_fastpath.py extracts it): a `#define` becomes a constant the compiler
 * resolves, an array size named by a macro becomes `[...]`, and a field marked C-only is hidden
 * from Python (its struct then ends in `...;`). Keep one declaration per line there. */
/* PYHV_CFFI_BEGIN */
#define PYHV_MAX_RANGES 128
#define PYHV_MAX_EXIT_REASONS 64

/* What the loop does with an access that falls in a range. */
#define PYHV_RANGE_PYTHON 0 /* return the exit to Python with the range's device id */
#define PYHV_RANGE_SINK 1   /* writes are dropped, reads return the range's fill byte */
#define PYHV_RANGE_UART 2   /* a 16550A: THR writes and LSR reads done here while uart->fast */

/* pyhv_exit.kind */
#define PYHV_EXIT_PIO_IN 1
#define PYHV_EXIT_PIO_OUT 2
#define PYHV_EXIT_MMIO_READ 3
#define PYHV_EXIT_MMIO_WRITE 4
#define PYHV_EXIT_KICKED 5      /* another thread called pyhv_vcpu_kick() */
#define PYHV_EXIT_INTERRUPTED 6 /* KVM_RUN was interrupted by a signal that was not a kick */
#define PYHV_EXIT_BUDGET 7      /* exit_budget exits have been handled */
#define PYHV_EXIT_KVM 8         /* any other KVM exit: read exit_reason (and kvm_run) */
#define PYHV_EXIT_ERROR 9       /* KVM_RUN failed; error holds the errno */
#define PYHV_EXIT_UART_FLUSH 10 /* the UART's transmit buffer took a newline or is full */

#define PYHV_UART_BUFFER_SIZE 4096

struct pyhv_range {
    uint64_t base;
    uint64_t size;
    int32_t device_id;
    uint32_t action;
    uint8_t fill;
};

struct pyhv_table {
    struct pyhv_range ranges[PYHV_MAX_RANGES];
    uint32_t count;
    uint8_t unmapped_fill; /* byte returned for reads of addresses in no range */
};

struct pyhv_exit {
    uint32_t kind;
    uint32_t exit_reason;
    uint64_t address; /* port or guest physical address */
    uint64_t offset;  /* address minus the range's base */
    int32_t device_id;
    uint32_t size;  /* bytes per access */
    uint32_t count; /* accesses (string I/O: rep ins/outs), data holds size*count bytes */
    int32_t error;
    uint8_t *data;
};

struct pyhv_stats {
    uint64_t exits_by_reason[PYHV_MAX_EXIT_REASONS];
    uint64_t kvm_run_calls;
    uint64_t total_exits;
    uint64_t python_exits;
    uint64_t pio_sink;
    uint64_t mmio_sink;
    uint64_t pio_unmapped_reads;
    uint64_t pio_unmapped_writes;
    uint64_t mmio_unmapped_reads;
    uint64_t mmio_unmapped_writes;
    uint64_t first_unmapped_pio;  /* port + 1, 0 when none yet */
    uint64_t first_unmapped_mmio; /* address + 1, 0 when none yet */
    uint64_t kicks;
    uint64_t eintr;
    uint64_t eagain;
};

/* The transmit side of a 16550A, shared by every vCPU of the machine. The Python UART model
 * (hypervisor/devices/serial.py) stays the one source of register semantics: it sets `fast`
 * only while a THR write has no effect but its byte (divisor latch closed, THR-empty interrupt
 * disabled, no loopback) and an LSR read has none at all (no error bit to clear), and publishes
 * the LSR value to answer. Then the loop appends THR bytes to `buffer` and answers LSR reads
 * itself; Python drains the buffer (pyhv_uart_take) before it touches the UART, on a newline
 * (PYHV_EXIT_UART_FLUSH), when it is full, and from the machine's wait loop, so the bytes keep
 * their order. `fast` (1 while the loop may take THR writes and LSR reads) and `lsr` are set only
 * through pyhv_uart_publish. */
struct pyhv_uart {
    volatile uint32_t fast;  /* C only */
    volatile uint8_t lsr;    /* C only */
    uint32_t count;          /* bytes waiting in buffer */
    uint64_t bytes_taken;    /* THR writes completed in C, in all */
    uint64_t lsr_reads;      /* LSR reads answered in C, in all */
    pthread_mutex_t lock;    /* C only */
    uint8_t buffer[PYHV_UART_BUFFER_SIZE];
};

struct pyhv_vcpu {
    int fd;
    struct kvm_run *run;
    size_t run_size;
    struct pyhv_table pio;
    struct pyhv_table mmio;
    volatile sig_atomic_t kick_pending; /* C only */
    volatile int thread_valid;          /* C only */
    pthread_t thread;                   /* C only */
    uint64_t exit_budget; /* 0: unlimited; otherwise return PYHV_EXIT_BUDGET after this many */
    struct pyhv_stats stats;
    struct pyhv_uart *uart; /* the machine's COM1 for PYHV_RANGE_UART, or NULL */
};

int pyhv_ioctl(int fd, unsigned long request, void *arg);
int pyhv_ioctl_value(int fd, unsigned long request, unsigned long arg);
int pyhv_install_kick_handler(void);
int pyhv_vcpu_map_run(struct pyhv_vcpu *vcpu, int fd, size_t run_size);
void pyhv_vcpu_unmap_run(struct pyhv_vcpu *vcpu);
void pyhv_vcpu_detach_thread(struct pyhv_vcpu *vcpu);
int pyhv_vcpu_run(struct pyhv_vcpu *vcpu, struct pyhv_exit *out);
int pyhv_vcpu_kick(struct pyhv_vcpu *vcpu);
void pyhv_vcpu_clear_kick(struct pyhv_vcpu *vcpu);
int pyhv_vcpu_inject_exception(struct pyhv_vcpu *vcpu, uint32_t vector, int has_error_code, uint32_t error_code);
int pyhv_bench_raw_loop(struct pyhv_vcpu *vcpu, uint64_t exits);
int pyhv_uart_init(struct pyhv_uart *uart);
void pyhv_uart_destroy(struct pyhv_uart *uart);
uint32_t pyhv_uart_take(struct pyhv_uart *uart, uint8_t *out);
uint32_t pyhv_uart_publish(struct pyhv_uart *uart, uint8_t *out, uint32_t fast, uint8_t lsr);
int pyhv_cmpxchg16b(uint8_t *address, uint64_t *expected, uint64_t desired_low, uint64_t desired_high);
/* PYHV_CFFI_END */

#endif
