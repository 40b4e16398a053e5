"""The instructions kvm_pvm's KVM cannot run at CPL0, in a guest (tests/guests/emulated.S).

On a kvm_pvm host each of them reaches pyhv as an emulation failure and hypervisor/vcpu/emulate.py
answers; under hardware virtualization the CPU runs them itself, so the same expectations check
the emulation against silicon. What the CPU must do depends on the guest's CPUID (SDM Vol. 2:
#UD when the feature is absent), so the expected lines are computed from it.
"""

from __future__ import annotations

import pytest

from hypervisor.boot.cpuid import guest_cpuid
from hypervisor.console import MemoryConsole
from hypervisor.kvm import Kvm, kvm_is_pvm
from hypervisor.machine import Machine
from hypervisor.outcome import OutcomeKind
from hypervisor.vcpu.pvm import PvmEmulator
from tests.guests.build import GUEST_BASE

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(60)]

NO_FAULT, UD = "ff", "06"


def guest_has(function: int, register: str, bit: int, index: int = 0) -> bool:
    with Kvm() as kvm:
        entries = guest_cpuid(kvm.supported_cpuid(), 0, 1)
    return any(e.function == function and e.index == index and getattr(e, register) >> bit & 1 for e in entries)


def fault_unless(offered: bool) -> str:
    return NO_FAULT if offered else UD


@pytest.fixture(scope="module")
def guest_run(guest_binary) -> tuple[list[str], dict[str, int]]:
    """The guest's output lines and how often pyhv emulated each instruction."""
    console = MemoryConsole()
    with Machine(16, console=console, pvm_emulation=True) as machine:
        machine.load_raw_bytes(guest_binary("emulated").read_bytes(), GUEST_BASE, "emulated")
        result = machine.run(timeout=30)
        assert isinstance(machine.emulator, PvmEmulator)
        counts = dict(machine.emulator.counts)
    text = console.data().decode()
    assert result.outcome.kind is OutcomeKind.DEBUG_EXIT, f"{result.outcome}; guest printed:\n{text}"
    return text.splitlines(), counts


@pytest.fixture
def guest_lines(guest_run) -> list[str]:
    return guest_run[0]


def test_on_kvm_pvm_pyhv_emulated_them(guest_run) -> None:
    if not kvm_is_pvm():
        pytest.skip("hardware virtualization runs these instructions itself: nothing to emulate")
    counts = guest_run[1]
    # int 0x40, 0x41, 8, 0x50; the rest once each (the misaligned cmpxchg16b may be KVM's #GP).
    assert counts["int"] == 4
    assert {"rdpru", "xgetbv", "invpcid", "clwb", "cmpxchg16b", "movbe", "movq"} <= counts.keys()


def test_int_n_runs_the_handler_and_returns_after_the_instruction(guest_lines) -> None:
    assert "int 0x40 ok" in guest_lines


def test_int_n_through_an_interrupt_gate_clears_if_and_a_trap_gate_keeps_it(guest_lines) -> None:
    assert "int 0x40 if 00" in guest_lines
    assert "int 0x41 if 01" in guest_lines


def test_int_8_pushes_no_error_code(guest_lines) -> None:
    assert "int 8 ok" in guest_lines


def test_int_n_beyond_the_idt_limit_is_a_general_protection_fault(guest_lines) -> None:
    # #GP (0x0d) with error code 0x50 * 8 + 2: the IDT bit, EXT clear for a software interrupt.
    assert "int 0x50 0d 0282" in guest_lines


def test_rdpru(guest_lines) -> None:
    assert "rdpru " + fault_unless(guest_has(0x80000008, "ebx", 4)) in guest_lines


def test_xgetbv_without_cr4_osxsave_is_undefined(guest_lines) -> None:
    assert "xgetbv " + UD in guest_lines  # the guest never sets CR4.OSXSAVE


def test_invpcid(guest_lines) -> None:
    assert "invpcid " + fault_unless(guest_has(7, "ebx", 10)) in guest_lines


def test_clwb(guest_lines) -> None:
    assert "clwb " + fault_unless(guest_has(7, "ebx", 24)) in guest_lines


def test_lock_cmpxchg16b(guest_lines) -> None:
    if not guest_has(1, "ecx", 13):
        pytest.skip("the guest's CPUID has no CMPXCHG16B")
    assert "cmpxchg16b equal ff ok" in guest_lines
    assert "cmpxchg16b unequal ff ok" in guest_lines
    assert "cmpxchg16b misaligned 0d 0000" in guest_lines


def test_movbe(guest_lines) -> None:
    assert "movbe register " + UD in guest_lines  # memory forms only: mod = 3 is #UD either way
    if not guest_has(1, "ecx", 22):
        for name in ("load16", "load32", "load64", "store64 across a page", "store16"):
            assert f"movbe {name} {UD} bad" in guest_lines
        return
    for name in ("load16", "load32", "load64", "store64 across a page", "store16"):
        assert f"movbe {name} {NO_FAULT} ok" in guest_lines


def test_mmx_registers_written_after_fninit_reach_the_guest(guest_lines) -> None:
    # After FNINIT the x87 state is in its initial configuration: an MMX register pyhv writes
    # must be marked present in XSTATE_BV or the next XRSTOR loads zeros (hypervisor/kvm/fpu.py).
    assert "mmx movq to mm0 " + NO_FAULT in guest_lines
    assert f"mmx movq mm0 to memory {NO_FAULT} ok" in guest_lines
    assert f"mmx movq from mm0 {NO_FAULT} ok" in guest_lines
