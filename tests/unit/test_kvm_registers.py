"""The typed vCPU state of hypervisor/kvm/registers.py and kvm/stats.py against the cffi structs
the compiler laid out: every field lands where <linux/kvm.h> (and csrc/vcpu_loop.h) puts it,
and struct -> value -> struct gives back the same bytes (snapshots and KVM_SET_* rely on it)."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypervisor.kvm.ffi import ffi
from hypervisor.kvm.registers import (
    APIC_ID,
    APIC_LVT_LINT0,
    APIC_REGISTER_PAGE_SIZE,
    SEGMENT_FIELDS,
    SEGMENT_NAMES,
    FpuState,
    LapicState,
    Segment,
    SystemRegisters,
)
from hypervisor.kvm.stats import COUNTER_NAMES, MAX_EXIT_REASONS, VcpuStats, read_stats

SREGS_BYTES = ffi.sizeof("struct kvm_sregs")
FPU_BYTES = ffi.sizeof("struct kvm_fpu")


def _padding_offsets(struct_name: str) -> set[int]:
    """The bytes of `struct_name` that are padding, declared (kvm_segment.padding) or not (the
    rest of a cdef ending in `...;`): KVM zeroes them, and so does the typed value."""
    covered: set[int] = set()

    def walk(ctype: object, base: int) -> None:
        for name, field in ctype.fields:  # type: ignore[attr-defined]
            if field.type.kind == "struct":
                walk(field.type, base + field.offset)
            elif name != "padding":
                covered.update(range(base + field.offset, base + field.offset + ffi.sizeof(field.type)))

    walk(ffi.typeof(struct_name), 0)
    return set(range(ffi.sizeof(struct_name))) - covered


def _as_kvm_gives_it(struct_name: str, data: bytes) -> bytes:
    padding = _padding_offsets(struct_name)
    return bytes(0 if offset in padding else byte for offset, byte in enumerate(data))


def _struct_from(struct_name: str, data: bytes) -> object:
    cdata = ffi.new(f"{struct_name} *")
    ffi.memmove(cdata, data, len(data))
    return cdata


@given(st.binary(min_size=SREGS_BYTES, max_size=SREGS_BYTES))
def test_system_registers_round_trip_a_kvm_sregs_byte_for_byte(random: bytes) -> None:
    data = _as_kvm_gives_it("struct kvm_sregs", random)
    sregs = _struct_from("struct kvm_sregs", data)
    typed = SystemRegisters.from_struct(sregs)
    for name in SEGMENT_NAMES:
        for field in SEGMENT_FIELDS:
            assert getattr(typed.segment(name), field) == getattr(getattr(sregs, name), field), (name, field)
    for name in ("gdt", "idt"):
        assert (getattr(typed, name).base, getattr(typed, name).limit) == (
            getattr(sregs, name).base, getattr(sregs, name).limit)  # fmt: skip
    for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
        assert getattr(typed, name) == getattr(sregs, name), name
    assert typed.interrupt_bitmap == tuple(sregs.interrupt_bitmap)
    assert bytes(ffi.buffer(typed.to_struct())) == data
    assert typed.to_bytes() == data and SystemRegisters.from_bytes(data) == typed


@given(st.binary(min_size=FPU_BYTES, max_size=FPU_BYTES))
def test_fpu_state_round_trips_a_kvm_fpu_byte_for_byte(random: bytes) -> None:
    data = _as_kvm_gives_it("struct kvm_fpu", random)
    fpu = _struct_from("struct kvm_fpu", data)
    typed = FpuState.from_struct(fpu)
    assert typed.fpr == tuple(bytes(fpu.fpr[index]) for index in range(8))
    assert typed.xmm == tuple(bytes(fpu.xmm[index]) for index in range(16))
    assert (typed.fcw, typed.fsw, typed.ftwx, typed.last_opcode) == (fpu.fcw, fpu.fsw, fpu.ftwx, fpu.last_opcode)
    assert (typed.last_ip, typed.last_dp, typed.mxcsr) == (fpu.last_ip, fpu.last_dp, fpu.mxcsr)
    assert bytes(ffi.buffer(typed.to_struct())) == data
    assert typed.to_bytes() == data


def test_changes_make_new_values_and_reach_the_struct() -> None:
    sregs = SystemRegisters(cs=Segment(selector=0x10, l=1), cr4=0x20)
    changed = sregs.with_segment("cs", base=0x1000).with_table("gdt", base=0x5000, limit=0x27)
    changed = replace(changed.with_control("cr3", 0x9000), interrupt_bitmap=(1, 0, 0, 1 << 63))
    assert sregs.cs.base == 0 and sregs.cr3 == 0  # the original is untouched
    raw = changed.to_struct()
    assert (raw.cs.selector, raw.cs.base, raw.cs.l) == (0x10, 0x1000, 1)
    assert (raw.gdt.base, raw.gdt.limit, raw.cr3, raw.cr4) == (0x5000, 0x27, 0x9000, 0x20)
    assert raw.interrupt_bitmap[3] == 1 << 63
    for bad in (lambda: sregs.segment("xs"), lambda: sregs.with_table("ldt"), lambda: sregs.with_control("cr1", 0)):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError):
        SystemRegisters(interrupt_bitmap=(0,))

    fpu = FpuState().with_fpr(7, bytes(range(16))).with_xmm(15, b"\xee" * 16)
    with pytest.raises(FrozenInstanceError):
        fpu.fcw = 1  # type: ignore[misc]
    raw_fpu = fpu.to_struct()
    assert bytes(raw_fpu.fpr[7]) == bytes(range(16)) and bytes(raw_fpu.xmm[15]) == b"\xee" * 16
    with pytest.raises(ValueError):
        FpuState(fpr=(bytes(16),) * 7)
    with pytest.raises(ValueError):
        fpu.with_xmm(0, bytes(15))
    with pytest.raises(IndexError):
        fpu.with_fpr(8, bytes(16))


def test_lapic_page_registers_and_round_trip() -> None:
    page = bytes(index * 7 % 256 for index in range(APIC_REGISTER_PAGE_SIZE))
    lapic = LapicState.from_struct(_struct_from("struct kvm_lapic_state", page))
    assert lapic.registers == page
    assert bytes(ffi.buffer(lapic.to_struct())) == page
    assert lapic.register(APIC_ID) == int.from_bytes(page[APIC_ID : APIC_ID + 4], "little")
    assert lapic.id == page[APIC_ID + 3]  # xAPIC: bits 31:24
    changed = lapic.with_register(APIC_LVT_LINT0, 0x700)
    assert changed.lvt_lint0 == 0x700 and lapic.lvt_lint0 != 0x700
    assert changed.registers[:APIC_LVT_LINT0] == page[:APIC_LVT_LINT0]
    assert changed.registers[APIC_LVT_LINT0 + 4 :] == page[APIC_LVT_LINT0 + 4 :]
    assert LapicState(bytearray(page)).registers == page  # kept as bytes: it cannot change later
    with pytest.raises(ValueError):
        LapicState(page[:-1])
    for offset in (0x21, APIC_REGISTER_PAGE_SIZE, -16):
        with pytest.raises(ValueError):
            lapic.register(offset)


def test_vcpu_stats_read_every_counter_where_the_c_loop_writes_it() -> None:
    state = ffi.new("struct pyhv_vcpu *")
    for reason in range(MAX_EXIT_REASONS):
        state.stats.exits_by_reason[reason] = reason * 3
    for slot, name in enumerate(COUNTER_NAMES):
        setattr(state.stats, name, 1000 + slot)
    stats = read_stats(state)
    assert stats.exits_by_reason == tuple(reason * 3 for reason in range(MAX_EXIT_REASONS))
    assert all(getattr(stats, name) == 1000 + slot for slot, name in enumerate(COUNTER_NAMES))
    assert stats.to_bytes() == bytes(ffi.buffer(ffi.addressof(state, "stats"), ffi.sizeof("struct pyhv_stats")))
    assert stats.exits(2) == 6 and stats.exits(MAX_EXIT_REASONS) == 0
    # first_unmapped_* store port/address + 1 (0: none yet).
    assert stats.first_unmapped_port == stats.first_unmapped_pio - 1
    assert VcpuStats.zero().first_unmapped_port is None and VcpuStats.zero().first_unmapped_address is None


def test_vcpu_stats_total_sums_and_keeps_the_first_unmapped_address() -> None:
    first = replace(VcpuStats.zero(), total_exits=5, kicks=1, first_unmapped_mmio=0x1001)
    second = VcpuStats((1,) * MAX_EXIT_REASONS, total_exits=7, first_unmapped_pio=0x81, first_unmapped_mmio=0x2001)
    total = VcpuStats.total([first, second])
    assert total.total_exits == 12 and total.kicks == 1 and total.exits_by_reason == (1,) * MAX_EXIT_REASONS
    assert total.first_unmapped_address == 0x1000 and total.first_unmapped_port == 0x80
    assert VcpuStats.total([]) == VcpuStats.zero()
