"""The pieces machine_target.py is made of, without KVM: DR7 slots, int3 shadows, register maps."""

from __future__ import annotations

import pytest

from hypervisor.debug.gdb.debug_registers import DR7_RESERVED_ONE, DebugRegisters, split_aligned
from hypervisor.debug.gdb.registers import abridged_tag, apply_fpu, apply_system, collect, full_tag_word, split_writes
from hypervisor.debug.gdb.software_breakpoints import INT3, SoftwareBreakpoints
from hypervisor.debug.gdb.target import BreakKind, GdbTargetError
from hypervisor.kvm.ffi import lib
from hypervisor.kvm.registers import DescriptorTable, FpuState, Segment, SystemRegisters
from hypervisor.memory import GuestMemory


def test_dr7_encoding_follows_the_sdm() -> None:
    registers = DebugRegisters()
    registers.insert(BreakKind.HARDWARE, 0x1010, 1)
    registers.insert(BreakKind.WRITE_WATCH, 0x2000, 4)
    registers.insert(BreakKind.READ_WATCH, 0x3008, 8)
    registers.insert(BreakKind.ACCESS_WATCH, 0x4002, 2)
    values = registers.values()
    assert values[:4] == [0x1010, 0x2000, 0x3008, 0x4002]
    dr7 = values[7]
    assert dr7 & 0xFF == 0b01010101  # L0-L3
    assert dr7 & DR7_RESERVED_ONE and dr7 & (1 << 8)  # bit 10, LE
    assert (dr7 >> 16) & 0xF == 0b0000  # slot 0: execute, 1 byte
    assert (dr7 >> 20) & 0xF == 0b1101  # slot 1: LEN 11 (4 bytes), R/W 01 (write)
    assert (dr7 >> 24) & 0xF == 0b1011  # slot 2: LEN 10 (8 bytes), R/W 11 (read/write)
    assert (dr7 >> 28) & 0xF == 0b0111  # slot 3: LEN 01 (2 bytes), R/W 11
    with pytest.raises(GdbTargetError) as error:
        registers.insert(BreakKind.HARDWARE, 0x5000, 1)
    assert error.value.errno == 28
    assert registers.hit(0b0100) == registers.slots[2]
    assert registers.hit(1 << 14) is None  # BS only: a single step, no slot
    registers.remove(BreakKind.READ_WATCH, 0x3008, 8)
    assert registers.slots[2] is None and registers.values()[7] & (0b11 << 4) == 0
    with pytest.raises(GdbTargetError):
        registers.remove(BreakKind.READ_WATCH, 0x3008, 8)
    registers.clear()
    assert registers.values() == [0] * 7 + [DR7_RESERVED_ONE]


def test_unaligned_watchpoints_are_split_over_slots() -> None:
    assert split_aligned(0x1003, 6) == [(0x1003, 1), (0x1004, 4), (0x1008, 1)]
    assert split_aligned(0x1000, 16) == [(0x1000, 8), (0x1008, 8)]
    registers = DebugRegisters()
    registers.insert(BreakKind.WRITE_WATCH, 0x1003, 6)
    assert sum(slot is not None for slot in registers.slots) == 3
    with pytest.raises(GdbTargetError):  # needs 2, one left: refused whole, nothing changes
        registers.insert(BreakKind.WRITE_WATCH, 0x2001, 2)
    assert sum(slot is not None for slot in registers.slots) == 3
    registers.remove(BreakKind.WRITE_WATCH, 0x1003, 6)
    assert not registers.in_use
    with pytest.raises(GdbTargetError):
        registers.insert(BreakKind.WRITE_WATCH, 0x1000, 0)
    with pytest.raises(GdbTargetError):
        registers.insert(BreakKind.SOFTWARE, 0x1000, 1)


def test_software_breakpoints_shadow_and_restore() -> None:
    memory = GuestMemory.flat(0x10000)
    try:
        memory.write(0x1000, bytes(range(16)))
        table = SoftwareBreakpoints(memory.read, memory.write)
        table.insert(0x1004)
        table.insert(0x1004)  # twice: still one original byte
        assert memory.read(0x1004, 1) == bytes([INT3])
        assert table.shadow(0x1000, memory.read(0x1000, 8)) == bytes(range(8))
        stored = table.write_through(0x1003, b"\xaa\xbb\xcc")
        assert stored == b"\xaa\xcc\xcc" and table.original[0x1004] == 0xBB
        memory.write(0x1003, stored)
        table.remove(0x1004)
        assert memory.read(0x1003, 3) == b"\xaa\xbb\xcc"
        table.insert(0x1008)
        table.clear()
        assert memory.read(0x1008, 1) == b"\x08" and len(table) == 0
    finally:
        memory.close()


def test_registers_from_kvm_structures() -> None:
    sregs = SystemRegisters(
        cs=Segment(selector=0x10, base=0x1000), fs=Segment(base=0x7000), gs=Segment(base=0x8000),
        cr0=0x80050033, cr3=0x9000, efer=0xD01, gdt=DescriptorTable(0x5000, 0x27),
    )  # fmt: skip
    one = (0x3FFF << 64) | (1 << 63)  # 1.0 in the 80-bit format
    fpu = FpuState(fcw=0x37F, fsw=0, mxcsr=0x1F80, ftwx=0b1)
    fpu = fpu.with_fpr(0, one.to_bytes(10, "little") + bytes(6)).with_xmm(3, bytes(range(16)))
    values = collect({"rax": 1, "rip": 0x1000, "rflags": 2}, sregs, fpu, {0xC0000102: 0xABC})
    assert values["cs"] == 0x10 and values["cs_base"] == 0x1000
    assert values["fs_base"] == 0x7000 and values["gs_base"] == 0x8000 and values["k_gs_base"] == 0xABC
    assert values["cr0"] == 0x80050033 and values["efer"] == 0xD01 and values["gdtr_limit"] == 0x27
    assert values["st0"] == one and values["fctrl"] == 0x37F
    assert values["ftag"] == 0xFFFC  # st0 valid, the rest empty
    assert values["xmm3"] == int.from_bytes(bytes(range(16)), "little")
    gprs, system, fpu_values, msrs = split_writes({"rax": 5, "cr3": 0xA000, "cs_base": 0, "st1": one, "k_gs_base": 1})
    assert gprs == {"rax": 5} and system == {"cr3": 0xA000, "cs_base": 0} and msrs == {0xC0000102: 1}
    written = apply_system(sregs, system)
    assert written.cr3 == 0xA000 and written.cs.base == 0 and written.cs.selector == 0x10
    assert sregs.cr3 == 0x9000 and written.fs == sregs.fs  # a new value; the rest as it was
    changed = apply_fpu(fpu, fpu_values | {"ftag": 0xFFF0, "fioff": 0x1234, "xmm0": 7})
    assert int.from_bytes(changed.fpr[1][:10], "little") == one
    assert changed.ftwx == 0b11 and changed.last_ip == 0x1234 and changed.xmm[0][0] == 7
    assert changed.xmm[3] == fpu.xmm[3] and changed.fcw == 0x37F


def test_full_tag_word_follows_top_of_stack() -> None:
    zero = 0
    one = (0x3FFF << 64) | (1 << 63)
    # TOP=7: physical register 7 is ST(0).
    assert full_tag_word(0b1000_0000, 7 << 11, [one] + [zero] * 7) == 0x3FFF
    assert full_tag_word(0b1, 0, [zero] * 8) == 0xFFFD  # zero tag
    assert abridged_tag(0xFFFD) == 1


class FakeVcpu:
    """Identity-mapped paging, registers in a dict: what MachineTarget asks of a vCPU."""

    def __init__(self) -> None:
        self.regs = {"rip": 0x1000, "rflags": 2}
        self.sregs = SystemRegisters()
        self.debug: list[tuple[int, list[int]]] = []

    def translate(self, linear: int) -> int | None:
        return linear if linear < 0x10000 else None

    def get_regs(self) -> dict[str, int]:
        return dict(self.regs)

    def set_regs(self, **values: int) -> None:
        self.regs.update(values)

    def get_sregs(self) -> SystemRegisters:
        return self.sregs

    def set_guest_debug(self, control: int, debugregs: list[int] | tuple[int, ...] = ()) -> None:
        self.debug.append((control, list(debugregs)))


class FakeMachine:
    def __init__(self, memory: GuestMemory) -> None:
        from hypervisor.vcpu.control import RunControl

        self.memory = memory
        self.vcpus = [FakeVcpu()]
        self.runners = [object()]  # started
        self.control = RunControl()


@pytest.fixture
def machine_target():  # type: ignore[no-untyped-def]
    from hypervisor.debug.gdb.machine_target import MachineTarget

    memory = GuestMemory.flat(0x10000)
    target = MachineTarget(FakeMachine(memory))  # type: ignore[arg-type]
    yield target
    memory.close()


def test_stops_are_told_apart_by_vector_and_dr6(machine_target) -> None:  # type: ignore[no-untyped-def]
    from hypervisor.vcpu.events import DebugTrap

    target = machine_target
    target.memory.write(0x1000, b"\x90\x90")
    target.insert_breakpoint(BreakKind.SOFTWARE, 0x1000, 1)
    assert target.memory.read(0x1000, 1) == bytes([INT3])
    assert target.read_memory(0, 0x1000, 2) == b"\x90\x90"
    stop = target._debug_stop(DebugTrap(0, 3, 0x1000, 0, 0))
    assert stop.software_breakpoint
    target.machine.vcpus[0].regs["rip"] = 0x1001  # reported after the int3: moved back onto it
    stop = target._debug_stop(DebugTrap(0, 3, 0x1001, 0, 0))
    assert stop.software_breakpoint and target.machine.vcpus[0].regs["rip"] == 0x1000
    target.insert_breakpoint(BreakKind.HARDWARE, 0x2000, 1)
    target.insert_breakpoint(BreakKind.WRITE_WATCH, 0x3000, 4)
    assert target._debug_stop(DebugTrap(0, 1, 0x2000, 0xFFFF0FF1, 0)).hardware_breakpoint
    stop = target._debug_stop(DebugTrap(0, 1, 0x2000, 0xFFFF0FF2, 0))
    assert stop.watch is BreakKind.WRITE_WATCH and stop.watch_address == 0x3000
    assert target._debug_stop(DebugTrap(0, 1, 0x2000, 0xFFFF4FF0, 0)).description == "step"
    target._apply_guest_debug(step_vcpu=0)
    control, registers = target.machine.vcpus[0].debug[-1]
    assert control == lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_USE_SW_BP | lib.KVM_GUESTDBG_USE_HW_BP | (
        lib.KVM_GUESTDBG_SINGLESTEP
    )
    assert registers[:2] == [0x2000, 0x3000]
    target.remove_all_breakpoints()
    target._apply_guest_debug()
    assert target.machine.vcpus[0].debug[-1][0] == 0
    assert target.memory.read(0x1000, 1) == b"\x90"


def test_a_write_under_a_read_watchpoint_is_not_a_read(machine_target) -> None:  # type: ignore[no-untyped-def]
    from hypervisor.debug.gdb.machine_target import WRITE_UNDER_READ_WATCH
    from hypervisor.vcpu.events import DebugTrap

    target = machine_target
    target.insert_breakpoint(BreakKind.READ_WATCH, 0x3000, 8)
    target._snapshot_read_watches()
    stop = target._debug_stop(DebugTrap(0, 1, 0x1000, 0xFFFF0FF1, 0))
    assert stop.watch is BreakKind.READ_WATCH  # value unchanged: a read
    target.memory.write(0x3000, b"\x01")
    assert target._debug_stop(DebugTrap(0, 1, 0x1000, 0xFFFF0FF1, 0)).description == WRITE_UNDER_READ_WATCH
    assert target._debug_stop(DebugTrap(0, 1, 0x1000, 0xFFFF0FF1, 0)).watch is BreakKind.READ_WATCH


def test_memory_access_across_unmapped_pages(machine_target) -> None:  # type: ignore[no-untyped-def]
    target = machine_target
    target.memory.write(0xFFFC, b"abcd")
    assert target.read_memory(0, 0xFFFC, 8) == b"abcd"  # stops where the mapping ends
    with pytest.raises(GdbTargetError):
        target.read_memory(0, 0x20000, 4)
    with pytest.raises(GdbTargetError):
        target.write_memory(0, 0xFFFE, b"xxxx")
    with pytest.raises(GdbTargetError):
        target.insert_breakpoint(BreakKind.SOFTWARE, 0x20000, 1)
    with pytest.raises(GdbTargetError):
        target.remove_breakpoint(BreakKind.SOFTWARE, 0x1000, 1)
