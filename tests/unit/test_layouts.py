"""Pins every kernel struct layout the Python side relies on (values from the uapi headers:
linux/kvm.h, asm/kvm.h and asm/bootparam.h on x86-64) and the C fast path's records."""

import pytest

from hypervisor.kvm.ffi import ffi

SIZES = {
    "struct kvm_regs": 144,
    "struct kvm_segment": 24,
    "struct kvm_dtable": 16,
    "struct kvm_sregs": 312,
    "struct kvm_fpu": 416,
    "struct kvm_msr_entry": 16,
    "struct kvm_cpuid_entry2": 40,
    "struct kvm_userspace_memory_region": 32,
    "struct kvm_irq_level": 8,
    "struct kvm_irqfd": 32,
    "struct kvm_msi": 32,
    "struct kvm_irqchip": 520,
    "struct kvm_ioeventfd": 64,
    "struct kvm_pit_config": 64,
    "struct kvm_lapic_state": 1024,
    "struct kvm_guest_debug": 72,
    "struct kvm_translation": 24,
    "struct boot_params": 4096,
    "struct boot_e820_entry": 20,
}

OFFSETS = {
    ("struct kvm_run", "immediate_exit"): 1,
    ("struct kvm_run", "exit_reason"): 8,
    ("struct kvm_run", "io"): 32,
    ("struct kvm_run", "mmio"): 32,
    ("struct kvm_run", "internal"): 32,
    ("struct kvm_run", "system_event"): 32,
    ("struct kvm_sregs", "gdt"): 192,
    ("struct kvm_sregs", "cr0"): 224,
    ("struct kvm_sregs", "efer"): 264,
    ("struct kvm_regs", "rip"): 128,
    ("struct kvm_ioeventfd", "fd"): 20,
    ("struct kvm_cpuid2", "entries"): 8,
    ("struct kvm_msrs", "entries"): 8,
    ("struct boot_params", "hdr"): 0x1F1,
    ("struct boot_params", "e820_entries"): 0x1E8,
}


@pytest.mark.parametrize("name,size", SIZES.items())
def test_struct_sizes(name: str, size: int) -> None:
    assert ffi.sizeof(name) == size


@pytest.mark.parametrize("where,offset", OFFSETS.items())
def test_field_offsets(where: tuple[str, str], offset: int) -> None:
    assert ffi.offsetof(*where) == offset


def test_kvm_run_unions() -> None:
    run = ffi.new("struct kvm_run *")
    run.io.port = 0x3F8
    run.io.size = 1
    # io = {u8 direction, u8 size, u16 port, u32 count, u64 data_offset} over mmio.phys_addr
    assert run.mmio.phys_addr == (0x3F8 << 16) | (1 << 8)


def test_fast_path_exit_record() -> None:
    assert ffi.offsetof("struct pyhv_exit", "kind") == 0
    assert ffi.sizeof("struct pyhv_exit") == 48
