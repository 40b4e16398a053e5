"""cffi build script (API mode, out of line) for `hypervisor._fastpath`.

ioctl numbers and struct layouts come from <linux/kvm.h> through the C compiler: every
`#define X ...` and every struct ending in `...;` below is filled in by the compiler, so no
number is typed by hand (DESIGN.md, "Facts checked"). tests/unit/test_layouts.py pins the
layouts the Python side relies on.
"""

from __future__ import annotations

import re
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
KVM_SET_MP_STATE KVM_GET_CPUID2 KVM_GET_XCRS KVM_SET_XCRS KVM_GET_XSAVE KVM_SET_XSAVE
KVM_GET_DEBUGREGS KVM_SET_DEBUGREGS KVM_GET_IRQCHIP KVM_SET_IRQCHIP KVM_GET_PIT2 KVM_SET_PIT2
KVM_GET_CLOCK KVM_SET_CLOCK KVM_GET_TSC_KHZ KVM_SET_TSC_KHZ KVM_SIGNAL_MSI
""".split()

CONSTANTS = """
KVM_API_VERSION KVM_CAP_IRQCHIP KVM_CAP_HLT KVM_CAP_USER_MEMORY KVM_CAP_SET_TSS_ADDR
KVM_CAP_EXT_CPUID KVM_CAP_NR_VCPUS KVM_CAP_MAX_VCPUS KVM_CAP_NR_MEMSLOTS KVM_CAP_PIT2
KVM_CAP_IRQFD KVM_CAP_IOEVENTFD KVM_CAP_SET_IDENTITY_MAP_ADDR KVM_CAP_IMMEDIATE_EXIT
KVM_CAP_SET_GUEST_DEBUG KVM_CAP_VCPU_EVENTS KVM_CAP_MP_STATE KVM_CAP_IRQ_ROUTING KVM_CAP_SIGNAL_MSI
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
KVM_MP_STATE_SIPI_RECEIVED KVM_IRQCHIP_PIC_MASTER KVM_IRQCHIP_PIC_SLAVE KVM_IRQCHIP_IOAPIC
KVM_CAP_XSAVE KVM_CAP_XCRS KVM_CAP_DEBUGREGS KVM_CAP_ADJUST_CLOCK KVM_CAP_GET_TSC_KHZ KVM_CAP_TSC_CONTROL
KVM_VCPUEVENT_VALID_NMI_PENDING KVM_VCPUEVENT_VALID_SIPI_VECTOR KVM_VCPUEVENT_VALID_SHADOW
KVM_NR_INTERRUPTS
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
struct kvm_vcpu_events {
    struct { uint8_t injected; uint8_t nr; uint8_t has_error_code; uint8_t pending; uint32_t error_code; } exception;
    struct { uint8_t injected; uint8_t nr; uint8_t soft; uint8_t shadow; } interrupt;
    struct { uint8_t injected; uint8_t pending; uint8_t masked; uint8_t pad; } nmi;
    uint32_t sipi_vector; uint32_t flags; ...;
};
struct kvm_xcr { uint32_t xcr; uint32_t reserved; uint64_t value; };
struct kvm_xcrs { uint32_t nr_xcrs; uint32_t flags; struct kvm_xcr xcrs[...]; ...; };
struct kvm_xsave { uint32_t region[...]; ...; };
struct kvm_debugregs {
    unsigned long long db[4]; unsigned long long dr6; unsigned long long dr7; unsigned long long flags; ...;
};
struct kvm_irqchip { uint32_t chip_id; ...; };
struct kvm_msi { uint32_t address_lo; uint32_t address_hi; uint32_t data; uint32_t flags; ...; };
struct kvm_pit_state2 { uint32_t flags; ...; };
struct kvm_clock_data { uint64_t clock; uint32_t flags; ...; };
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

# The headers whose CFFI sections declare the module, and the sources compiled into it.
HEADERS = (HERE / "vcpu_loop.h", HERE / "virtio_blk.h")
SOURCES = ("vcpu_loop.c", "virtio_blk.c")
CFFI_BEGIN = "/* PYHV_CFFI_BEGIN */"
CFFI_END = "/* PYHV_CFFI_END */"
C_ONLY = "/* C only */"
_COMMENT = re.compile(r"/\*.*?\*/", re.DOTALL)
_DEFINE = re.compile(r"^#define\s+(\w+)\s+.*$")
_MACRO_ARRAY = re.compile(r"\[[A-Z_][A-Z0-9_]*\]")


def header_text() -> str:
    """The headers of HEADERS, one after the other (each with its own CFFI section)."""
    return "".join(header.read_text() for header in HEADERS)


def fastpath_cdef(header: str) -> str:
    """The cffi declarations of pyhv's own types and functions, taken from the headers' text.

    The headers are the one source (issue: no hand-copied declarations): each section between the
    CFFI markers is rewritten so cffi accepts it and the compiler fills in what cffi cannot know:
    `#define NAME value` -> `#define NAME ...`, `type field[MACRO];` -> `type field[...];`, and
    C-only fields are dropped with `...;` closing their struct (cffi then takes the layout from
    the compiler, so hidden fields cannot shift the visible ones).
    """
    sections = [part.split(CFFI_END, 1) for part in header.split(CFFI_BEGIN)[1:]]
    if not sections or any(len(parts) != 2 for parts in sections):
        raise ValueError(f"a header has no {CFFI_BEGIN} ... {CFFI_END} section")
    lines: list[str] = []
    hidden_in_struct = False
    for raw in "\n".join(parts[0] for parts in sections).splitlines():
        if C_ONLY in raw:
            hidden_in_struct = True
            continue
        line = _COMMENT.sub("", raw).rstrip()
        define = _DEFINE.match(line)
        if define:
            lines.append(f"#define {define.group(1)} ...")
            continue
        line = _MACRO_ARRAY.sub("[...]", line)
        if line.strip() == "};" and hidden_in_struct:
            lines.append("    ...;")
            hidden_in_struct = False
        if line.strip():
            lines.append(line)
    return "\n".join(lines) + "\n"


_PROTOTYPE = re.compile(r"^(?P<result>[\w ]+?)\s*\b(?P<name>pyhv_\w+)\((?P<params>[^)]*)\);$")
_C_TO_PY = {"void": "None", "int": "int"}
STUB_PATH = HERE.parent / "hypervisor" / "_fastpath.pyi"


def stub_text(header: str) -> str:
    """The typed stub of the compiled module (hypervisor/_fastpath.pyi), generated from the same
    sources as the module: the constant names above and the prototypes of the headers. cffi
    objects (struct pointers, buffers) are `Any`; integers and results are typed.
    tests/unit/test_fastpath_stub.py fails when the committed stub differs from this text."""
    lines = [
        "# Generated by csrc/build_fastpath.py (stub_text) from the csrc/ headers and the constant lists;",
        "# do not edit: run `python csrc/build_fastpath.py --stub` after changing them.",
        "from typing import Any",
        "",
        "class _Lib:",
    ]
    defines = [m.group(1) for m in map(_DEFINE.match, fastpath_cdef(header).splitlines()) if m]
    for name in sorted(set(IOCTLS + CONSTANTS + defines)):
        lines.append(f"    {name}: int")
    for line in fastpath_cdef(header).splitlines():
        match = _PROTOTYPE.match(line.strip())
        if not match:
            continue
        params = []
        for index, param in enumerate(p.strip() for p in match.group("params").split(",")):
            if param in ("void", ""):
                continue
            c_type, _, name = param.rpartition(" ")
            is_int = "*" not in param and c_type.split()[-1] in ("int", "long", "uint32_t", "uint64_t", "size_t")
            params.append(f"{name.lstrip('*') or f'arg{index}'}: {'int' if is_int else 'Any'}")
        result = _C_TO_PY.get(match.group("result").strip(), "Any")
        signature = ", ".join(["self", *params])
        lines.append(f"    def {match.group('name')}({signature}) -> {result}: ...")
    lines += ["", "lib: _Lib", "ffi: Any  # a cffi.FFI: ffi.new, ffi.buffer, ffi.cast, ffi.sizeof", ""]
    return "\n".join(lines)


def make_builder() -> FFI:
    builder = FFI()
    defines = "\n".join(f"#define {name} ..." for name in IOCTLS + CONSTANTS)
    builder.cdef(defines + STRUCTS + fastpath_cdef(header_text()))
    builder.set_source(
        "hypervisor._fastpath",
        "".join(f'#include "{header.name}"\n' for header in HEADERS),
        sources=[str(Path("csrc") / source) for source in SOURCES],
        include_dirs=["csrc"],
        # -mcx16: pyhv_cmpxchg16b is an inline LOCK CMPXCHG16B (every x86-64 KVM host has it).
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11", "-mcx16"],
        libraries=["pthread"],
    )
    return builder


ffibuilder = make_builder()

if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--stub"]:
        STUB_PATH.write_text(stub_text(header_text()))
    else:
        ffibuilder.compile(tmpdir=str(HERE.parent), verbose=True)
