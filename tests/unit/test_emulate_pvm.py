"""The glue between the kvm_pvm emulator and a vCPU (hypervisor/vcpu/pvm.py), with a fake vCPU
that holds the typed special registers and x87/SSE state (hypervisor/kvm/registers.py) and real
guest memory."""

from __future__ import annotations

import errno
from dataclasses import replace

import pytest

from hypervisor.errors import KvmError
from hypervisor.kvm.ffi import ffi
from hypervisor.kvm.registers import DescriptorTable, FpuState, Segment, SystemRegisters
from hypervisor.memory.guest_memory import GuestMemory
from hypervisor.vcpu import pvm
from hypervisor.vcpu.pvm import CR4_PGE, PvmEmulator, flush_guest_tlb, guest_cpuid_map

EFER_LMA_LME = 0x500
CR4_PAE = 1 << 5


class FakeVcpu:
    """A 64-bit CPL0 vCPU with identity paging; records what the glue writes back."""

    id = 0
    fd = -1  # every real ioctl on it fails, as it must when KVM has no answer

    def get_cpuid(self) -> list[object]:
        raise KvmError("KVM_GET_CPUID2", errno.EBADF)  # no KVM behind this vCPU

    def get_xcr0(self) -> int | None:
        return None

    def __init__(self, rip: int = 0x1000, **registers: int) -> None:
        self.registers = {
            name: 0
            for name in (
                "rax",
                "rbx",
                "rcx",
                "rdx",
                "rsi",
                "rdi",
                "rsp",
                "rbp",
                "r8",
                "r9",
                "r10",
                "r11",
                "r12",
                "r13",
                "r14",
                "r15",
            )
        }
        self.registers.update(registers, rip=rip, rflags=0x2)
        self.sregs = SystemRegisters(
            efer=EFER_LMA_LME, cs=Segment(l=1), cr0=0x80050033, cr4=CR4_PAE | CR4_PGE,
            idt=DescriptorTable(0x3000, 0xFFF), gdt=DescriptorTable(0x2000, 0x17), ldt=Segment(unusable=1),
        )  # fmt: skip
        self.set_sregs_calls: list[int] = []
        self.exceptions: list[tuple[int, int | None]] = []

    def get_regs(self) -> dict[str, int]:
        return dict(self.registers)

    def set_regs(self, **values: int) -> None:
        self.registers.update(values)

    def get_sregs(self) -> SystemRegisters:
        return self.sregs

    def set_sregs(self, sregs: SystemRegisters) -> None:
        self.set_sregs_calls.append(sregs.cr4)
        self.sregs = sregs

    def get_fpu(self) -> FpuState:
        return FpuState()

    def set_fpu_state(self, fpu: FpuState) -> None:
        raise AssertionError("no x87 state changes here")

    def translate(self, linear: int) -> int | None:
        return linear if linear < 0x10_0000 else None

    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        self.exceptions.append((vector, error_code))


@pytest.fixture
def memory():
    guest = GuestMemory.flat(0x10_0000)
    yield guest
    guest.close()


def with_cpuid(emulator: PvmEmulator, vcpu: FakeVcpu, table: dict[tuple[int, int], tuple[int, int, int, int]]) -> None:
    emulator._cpuid[vcpu.id] = table  # what KVM_GET_CPUID2 would have returned


def test_guest_cpuid_map_files_leaves_without_subleaves_under_zero() -> None:
    entries = ffi.new("struct kvm_cpuid_entry2[3]")
    for slot, (function, index, flags, ebx) in enumerate([(0x7, 0, 1, 0x400), (0x7, 1, 1, 0x1), (0x1, 9, 0, 0x2)]):
        entries[slot].function, entries[slot].index, entries[slot].flags = function, index, flags
        entries[slot].ebx = ebx
    table = guest_cpuid_map(entries, 3)
    assert table == {(0x7, 0): (0, 0x400, 0, 0), (0x7, 1): (0, 1, 0, 0), (0x1, 0): (0, 2, 0, 0)}


def test_flush_toggles_cr4_pge_and_restores_it() -> None:
    vcpu = FakeVcpu()
    flush_guest_tlb(vcpu)  # type: ignore[arg-type]
    assert vcpu.set_sregs_calls == [CR4_PAE, CR4_PAE | CR4_PGE]
    assert vcpu.sregs.cr4 == CR4_PAE | CR4_PGE


def test_flush_without_global_pages_also_toggles() -> None:
    vcpu = FakeVcpu()
    vcpu.sregs = replace(vcpu.sregs, cr4=CR4_PAE)
    flush_guest_tlb(vcpu)  # type: ignore[arg-type]
    assert vcpu.set_sregs_calls == [CR4_PAE | CR4_PGE, CR4_PAE]


def test_invpcid_through_the_glue_flushes(memory: GuestMemory) -> None:
    emulator = PvmEmulator(memory)
    vcpu = FakeVcpu(rax=0x6000, rcx=2)
    with_cpuid(emulator, vcpu, {(0x7, 0): (0, 1 << 10, 0, 0)})
    assert emulator(vcpu, bytes.fromhex("660f388208"))  # type: ignore[arg-type]
    assert vcpu.registers["rip"] == 0x1005
    assert vcpu.set_sregs_calls == [CR4_PAE, CR4_PAE | CR4_PGE]
    assert emulator.counts == {"invpcid": 1}


def test_undefined_instruction_is_injected(memory: GuestMemory) -> None:
    emulator = PvmEmulator(memory)
    vcpu = FakeVcpu()
    with_cpuid(emulator, vcpu, {(0x7, 0): (0, 0, 0, 0)})
    assert emulator(vcpu, bytes.fromhex("660f388208"))  # type: ignore[arg-type]
    assert vcpu.exceptions == [(6, None)] and vcpu.registers["rip"] == 0x1000
    assert vcpu.set_sregs_calls == []


def test_int_n_is_injected_as_an_interrupt(memory: GuestMemory, monkeypatch: pytest.MonkeyPatch) -> None:
    injected: list[int] = []
    monkeypatch.setattr(pvm, "inject_interrupt", lambda vcpu, vector: injected.append(vector))
    gate = (0x1234 | 0x08 << 16 | 0xE << 40 | 1 << 47).to_bytes(8, "little") + bytes(8)
    memory.write(0x3000 + 0x40 * 16, gate)
    memory.write(0x2008, (0x00AF9A000000FFFF).to_bytes(8, "little"))  # GDT 0x08: 64-bit code
    emulator = PvmEmulator(memory)
    vcpu = FakeVcpu()
    assert emulator(vcpu, bytes.fromhex("cd40"))  # type: ignore[arg-type]
    assert injected == [0x40] and vcpu.registers["rip"] == 0x1002 and vcpu.exceptions == []


def test_unknown_cpuid_is_not_guessed(memory: GuestMemory) -> None:
    """With fd -1, KVM_GET_CPUID2 fails: CPUID-dependent instructions are then not emulated."""
    emulator = PvmEmulator(memory)
    vcpu = FakeVcpu()
    assert not emulator(vcpu, bytes.fromhex("0f01fd"))  # type: ignore[arg-type]
    assert emulator._cpuid == {0: None}
    assert vcpu.exceptions == [] and vcpu.registers["rip"] == 0x1000
    assert emulator.refusal(0) == "the guest's CPUID is not known (KVM_GET_CPUID2 failed)"


def test_refusal_names_the_reason_and_clears_on_success(memory: GuestMemory) -> None:
    emulator = PvmEmulator(memory)
    vcpu = FakeVcpu(rax=0x20_0000)  # above the fake's identity mapping
    with_cpuid(emulator, vcpu, {(0x7, 0): (0, 1 << 24, 0, 0)})
    assert not emulator(vcpu, bytes.fromhex("660fae30"))  # type: ignore[arg-type]  # clwb (%rax)
    refusal = emulator.refusal(0)
    assert refusal is not None and "0x200000" in refusal and "page fault" in refusal
    assert not emulator(vcpu, bytes.fromhex("0f0b"))  # type: ignore[arg-type]  # ud2
    assert emulator.refusal(0) == "pyhv's emulator does not handle this instruction"
    vcpu.registers["rax"] = 0x5000
    assert emulator(vcpu, bytes.fromhex("660fae30"))  # type: ignore[arg-type]
    assert emulator.refusal(0) is None


def test_xcr0_is_read_for_xgetbv_only(memory: GuestMemory, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []

    def fake_xcr0(vcpu: object) -> int:
        reads.append(1)
        return 0x7

    monkeypatch.setattr(pvm, "read_xcr0", fake_xcr0)
    emulator = PvmEmulator(memory)
    vcpu = FakeVcpu(rcx=0)
    vcpu.sregs = replace(vcpu.sregs, cr4=vcpu.sregs.cr4 | 1 << 18)  # OSXSAVE
    with_cpuid(emulator, vcpu, {(0x1, 0): (0, 0, 1 << 26, 0), (0x7, 0): (0, 1 << 24, 0, 0)})
    assert emulator(vcpu, bytes.fromhex("0f01d0"))  # type: ignore[arg-type]  # xgetbv
    assert (vcpu.registers["rax"], vcpu.registers["rdx"], reads) == (7, 0, [1])
    vcpu.registers["rax"] = 0x5000
    assert emulator(vcpu, bytes.fromhex("660fae30"))  # type: ignore[arg-type]  # clwb: no XCR0 needed
    assert reads == [1]


class FpuVcpu(FakeVcpu):
    """A FakeVcpu that keeps its kvm_fpu, as KVM would between KVM_GET_FPU and KVM_SET_FPU."""

    def __init__(self, **registers: int) -> None:
        super().__init__(**registers)
        self.fpu = FpuState()
        self.fpu_sets = 0

    def get_fpu(self) -> FpuState:
        return self.fpu

    def set_fpu_state(self, fpu: FpuState) -> None:
        self.fpu_sets += 1
        self.fpu = fpu


def test_mmx_moves_go_through_kvm_fpu_both_ways(memory: GuestMemory) -> None:
    emulator = PvmEmulator(memory)
    vcpu = FpuVcpu(rax=0x1122334455667788)
    with_cpuid(emulator, vcpu, {(0x1, 0): (0, 0, 0, 1 << 23)})  # CPUID.01H:EDX.MMX
    assert emulator(vcpu, bytes.fromhex("480f6ec0"))  # type: ignore[arg-type]  # movq mm0, rax
    assert vcpu.fpu_sets == 1
    # MM0 is the mantissa of physical register 0, which is ST(0) with TOP = 0; the exponent
    # bits become all ones and every tag valid (SDM Vol. 1 §9.5.1).
    assert vcpu.fpu.fpr[0][:10] == bytes.fromhex("8877665544332211ffff")
    assert vcpu.fpu.ftwx == 0xFF
    vcpu.registers["rip"] = 0x1000
    assert emulator(vcpu, bytes.fromhex("480f7ec3"))  # type: ignore[arg-type]  # movq rbx, mm0
    assert vcpu.registers["rbx"] == 0x1122334455667788


def test_x87_state_is_read_only_for_the_instructions_that_use_it(memory: GuestMemory) -> None:
    class CountingVcpu(FpuVcpu):
        reads = 0

        def get_fpu(self) -> FpuState:
            self.reads += 1
            return super().get_fpu()

    emulator = PvmEmulator(memory)
    vcpu = CountingVcpu(rax=0x5000)
    with_cpuid(emulator, vcpu, {(0x1, 0): (0, 0, 0, 1 << 23), (0x7, 0): (0, 1 << 24, 0, 0)})
    assert emulator(vcpu, bytes.fromhex("660fae30"))  # type: ignore[arg-type]  # clwb
    assert vcpu.reads == 0
    for instruction in ("9b", "dbe2", "0f77", "0f7ec3"):  # fwait, fnclex, emms, movd ebx, mm0
        vcpu.registers["rip"] = 0x1000
        assert emulator(vcpu, bytes.fromhex(instruction)), instruction  # type: ignore[arg-type]
    assert vcpu.reads == 4
