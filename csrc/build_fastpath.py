"""cffi build script (API mode, out of line) for `hypervisor._fastpath`.

ioctl numbers and struct layouts come from <linux/kvm.h> through the C compiler: every
`#define X ...` and every struct ending in `...;` below is filled in by the compiler, so no
number is typed by hand (DESIGN.md, "Facts checked"). tests/unit/test_layouts.py pins the
layouts the Python side relies on.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

IOCTLS = """
KVM_GET_API_VERSION KVM_CREATE_VM KVM_CHECK_EXTENSION KVM_GET_VCPU_MMAP_SIZE
KVM_GET_SUPPORTED_CPUID KVM_GET_MSR_INDEX_LIST KVM_CREATE_VCPU KVM_SET_USER_MEMORY_REGION
KVM_SET_TSS_ADDR KVM_SET_IDENTITY_MAP_ADDR KVM_CREATE_IRQCHIP KVM_CREATE_PIT2 KVM_IRQ_LINE
KVM_IRQFD KVM_IOEVENTFD KVM_RUN KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS KVM_SET_SREGS
KVM_GET_FPU KVM_SET_FPU KVM_GET_MSRS KVM_SET_MSRS KVM_SET_CPUID2 KVM_GET_LAPIC KVM_SET_LAPIC
KVM_GET_VCPU_EVENTS KVM_SET_VCPU_EVENTS KVM_SET_GUEST_DEBUG KVM_TRANSLATE KVM_GET_MP_STATE
KVM_SET_MP_STATE
""".split()

CONSTANTS = """
KVM_API_VERSION KVM_CAP_IRQCHIP KVM_CAP_HLT KVM_CAP_USER_MEMORY KVM_CAP_SET_TSS_ADDR
KVM_CAP_EXT_CPUID KVM_CAP_NR_VCPUS KVM_CAP_MAX_VCPUS KVM_CAP_NR_MEMSLOTS KVM_CAP_PIT2
KVM_CAP_IRQFD KVM_CAP_IOEVENTFD KVM_CAP_SET_IDENTITY_MAP_ADDR KVM_CAP_IMMEDIATE_EXIT
KVM_CAP_SET_GUEST_DEBUG KVM_CAP_VCPU_EVENTS KVM_CAP_MP_STATE KVM_CAP_IRQ_ROUTING
KVM_EXIT_UNKNOWN KVM_EXIT_EXCEPTION KVM_EXIT_IO KVM_EXIT_HYPERCALL KVM_EXIT_DEBUG KVM_EXIT_HLT
KVM_EXIT_MMIO KVM_EXIT_IRQ_WINDOW_OPEN KVM_EXIT_SHUTDOWN KVM_EXIT_FAIL_ENTRY KVM_EXIT_INTR
KVM_EXIT_SET_TPR KVM_EXIT_TPR_ACCESS KVM_EXIT_NMI KVM_EXIT_INTERNAL_ERROR KVM_EXIT_SYSTEM_EVENT
KVM_EXIT_IOAPIC_EOI KVM_EXIT_X86_RDMSR KVM_EXIT_X86_WRMSR KVM_EXIT_X86_BUS_LOCK KVM_EXIT_NOTIFY
KVM_EXIT_IO_IN KVM_EXIT_IO_OUT
KVM_INTERNAL_ERROR_EMULATION KVM_INTERNAL_ERROR_SIMUL_EX KVM_INTERNAL_ERROR_DELIVERY_EV
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
KVM_SYSTEM_EVENT_SHUTDOWN KVM_SYSTEM_EVENT_RESET KVM_SYSTEM_EVENT_CRASH
KVM_MEM_LOG_DIRTY_PAGES KVM_MEM_READONLY
KVM_IOEVENTFD_FLAG_DATAMATCH KVM_IOEVENTFD_FLAG_PIO KVM_IOEVENTFD_FLAG_DEASSIGN
KVM_IRQFD_FLAG_DEASSIGN KVM_PIT_SPEAKER_DUMMY
KVM_GUESTDBG_ENABLE KVM_GUESTDBG_SINGLESTEP KVM_GUESTDBG_USE_SW_BP KVM_GUESTDBG_USE_HW_BP
KVM_GUESTDBG_INJECT_DB KVM_GUESTDBG_INJECT_BP
KVM_MP_STATE_RUNNABLE KVM_MP_STATE_UNINITIALIZED KVM_MP_STATE_INIT_RECEIVED KVM_MP_STATE_HALTED
KVM_MP_STATE_SIPI_RECEIVED
KVM_NR_INTERRUPTS
PYHV_MAX_RANGES PYHV_MAX_EXIT_REASONS PYHV_RANGE_PYTHON PYHV_RANGE_SINK
PYHV_EXIT_PIO_IN PYHV_EXIT_PIO_OUT PYHV_EXIT_MMIO_READ PYHV_EXIT_MMIO_WRITE PYHV_EXIT_KICKED
PYHV_EXIT_INTERRUPTED PYHV_EXIT_BUDGET PYHV_EXIT_KVM PYHV_EXIT_ERROR
""".split()

STRUCTS = """
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
};
struct kvm_segment {
    uint64_t base; uint32_t limit; uint16_t selector;
    uint8_t type, present, dpl, db, s, l, g, avl, unusable, padding;
};
struct kvm_dtable { uint64_t base; uint16_t limit; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    unsigned long long interrupt_bitmap[...];
};
struct kvm_fpu {
    uint8_t fpr[8][16]; uint16_t fcw; uint16_t fsw; uint8_t ftwx;
    uint16_t last_opcode; uint64_t last_ip; uint64_t last_dp;
    uint8_t xmm[16][16]; uint32_t mxcsr; ...;
};
struct kvm_msr_entry { uint32_t index; uint32_t reserved; uint64_t data; };
struct kvm_msrs { uint32_t nmsrs; uint32_t pad; struct kvm_msr_entry entries[]; };
struct kvm_msr_list { uint32_t nmsrs; uint32_t indices[]; };
struct kvm_cpuid_entry2 {
    uint32_t function, index, flags, eax, ebx, ecx, edx; ...;
};
struct kvm_cpuid2 { uint32_t nent; uint32_t padding; struct kvm_cpuid_entry2 entries[]; };
struct kvm_userspace_memory_region {
    uint32_t slot; uint32_t flags; uint64_t guest_phys_addr; uint64_t memory_size;
    uint64_t userspace_addr;
};
struct kvm_irq_level { uint32_t irq; uint32_t level; };
struct kvm_irqfd { uint32_t fd; uint32_t gsi; uint32_t flags; uint32_t resamplefd; ...; };
struct kvm_ioeventfd {
    uint64_t datamatch; uint64_t addr; uint32_t len; int32_t fd; uint32_t flags; ...;
};
struct kvm_pit_config { uint32_t flags; ...; };
struct kvm_lapic_state { char regs[...]; };
struct kvm_guest_debug_arch { unsigned long long debugreg[8]; };
struct kvm_guest_debug { uint32_t control; uint32_t pad; struct kvm_guest_debug_arch arch; };
struct kvm_translation {
    uint64_t linear_address; uint64_t physical_address;
    uint8_t valid; uint8_t writeable; uint8_t usermode; ...;
};
struct kvm_mp_state { uint32_t mp_state; };
struct kvm_debug_exit_arch { uint32_t exception; uint32_t pad; uint64_t pc; uint64_t dr6; uint64_t dr7; };
struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint64_t cr8;
    uint64_t apic_base;
    union {
        struct { uint64_t hardware_exit_reason; } hw;
        struct { uint64_t hardware_entry_failure_reason; uint32_t cpu; } fail_entry;
        struct { uint32_t exception; uint32_t error_code; } ex;
        struct { uint8_t direction; uint8_t size; uint16_t port; uint32_t count; uint64_t data_offset; } io;
        struct { struct kvm_debug_exit_arch arch; } debug;
        struct { uint64_t phys_addr; uint8_t data[8]; uint32_t len; uint8_t is_write; } mmio;
        struct { uint32_t suberror; uint32_t ndata; unsigned long long data[16]; } internal;
        struct { uint32_t type; uint32_t ndata; unsigned long long data[16]; } system_event;
        char padding[256];
    };
    ...;
};
struct setup_header { ...; };
struct boot_e820_entry { uint64_t addr; uint64_t size; uint32_t type; ...; };
struct boot_params { struct setup_header hdr; uint8_t e820_entries; ...; };
"""

FASTPATH = """
struct pyhv_range { uint64_t base; uint64_t size; int32_t device_id; uint32_t action; uint8_t fill; };
struct pyhv_table { struct pyhv_range ranges[...]; uint32_t count; uint8_t unmapped_fill; };
struct pyhv_exit {
    uint32_t kind; uint32_t exit_reason; uint64_t address; uint64_t offset; int32_t device_id;
    uint32_t size; uint32_t count; int32_t error; uint8_t *data;
};
struct pyhv_stats {
    uint64_t exits_by_reason[...]; uint64_t kvm_run_calls; uint64_t total_exits;
    uint64_t python_exits; uint64_t pio_sink; uint64_t mmio_sink; uint64_t pio_unmapped_reads;
    uint64_t pio_unmapped_writes; uint64_t mmio_unmapped_reads; uint64_t mmio_unmapped_writes;
    uint64_t first_unmapped_pio; uint64_t first_unmapped_mmio; uint64_t kicks; uint64_t eintr;
    uint64_t eagain;
};
struct pyhv_vcpu {
    int fd; struct kvm_run *run; size_t run_size; struct pyhv_table pio; struct pyhv_table mmio;
    uint64_t exit_budget; struct pyhv_stats stats; ...;
};
int pyhv_ioctl(int fd, unsigned long request, void *arg);
int pyhv_ioctl_value(int fd, unsigned long request, unsigned long arg);
int pyhv_install_kick_handler(void);
int pyhv_vcpu_map_run(struct pyhv_vcpu *vcpu, int fd, size_t run_size);
void pyhv_vcpu_unmap_run(struct pyhv_vcpu *vcpu);
void pyhv_vcpu_detach_thread(struct pyhv_vcpu *vcpu);
int pyhv_vcpu_run(struct pyhv_vcpu *vcpu, struct pyhv_exit *out);
int pyhv_vcpu_kick(struct pyhv_vcpu *vcpu);
int pyhv_vcpu_inject_exception(struct pyhv_vcpu *vcpu, uint32_t vector, int has_error_code,
                               uint32_t error_code);
int pyhv_bench_raw_loop(struct pyhv_vcpu *vcpu, uint64_t exits);
"""


def make_builder() -> FFI:
    builder = FFI()
    defines = "\n".join(f"#define {name} ..." for name in IOCTLS + CONSTANTS)
    builder.cdef(defines + STRUCTS + FASTPATH)
    builder.set_source(
        "hypervisor._fastpath",
        '#include "vcpu_loop.h"',
        sources=[str(Path("csrc") / "vcpu_loop.c")],
        include_dirs=["csrc"],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"],
        libraries=["pthread"],
    )
    return builder


ffibuilder = make_builder()

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parent), verbose=True)
