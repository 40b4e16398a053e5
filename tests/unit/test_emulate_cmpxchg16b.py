"""CMPXCHG16B in the kvm_pvm emulator ("CMPXCHG8B/CMPXCHG16B", SDM Vol. 2A): encodings, flags,
exceptions; and the atomic exchange the glue does with the fast path's C helper on real guest
memory, including against a concurrent writer.
"""

from __future__ import annotations

import threading

import pytest

from hypervisor.memory.guest_memory import GuestMemory
from hypervisor.vcpu.emulate import RFLAGS_ZF, CpuState, RegisterFile, emulate
from hypervisor.vcpu.pvm import PvmEmulator

ALL_STATUS_FLAGS = 0x8D5  # OF SF ZF AF PF CF
OTHER_FLAGS = ALL_STATUS_FLAGS & ~RFLAGS_ZF
CPUID = {(0x1, 0): (0, 0, 1 << 13, 0)}  # CX16
LONG_MODE = CpuState(code_bits=64, cpl=0, cr0=0x80050033, cpuid=CPUID, segment_bases={"gs": 0x10_0000})
MASK64 = (1 << 64) - 1


class FakeExchange:
    """A 16-byte compare-and-exchange on a dict of (address -> (low, high)); records calls."""

    def __init__(self, contents: dict[int, tuple[int, int]]) -> None:
        self.contents = contents
        self.calls: list[tuple[int, int, int, int, int]] = []

    def __call__(self, linear: int, exp_lo: int, exp_hi: int, new_lo: int, new_hi: int) -> tuple[bool, int, int] | None:
        self.calls.append((linear, exp_lo, exp_hi, new_lo, new_hi))
        if linear not in self.contents:
            return None
        low, high = self.contents[linear]
        if (low, high) == (exp_lo, exp_hi):
            self.contents[linear] = (new_lo, new_hi)
            return True, low, high
        return False, low, high


def no_memory(address: int, size: int) -> bytes | None:
    raise AssertionError("CMPXCHG16B reads through exchange_guest only")


def regs(**values: int) -> RegisterFile:
    return RegisterFile(rip=0x1000, rflags=0x2 | OTHER_FLAGS, **values)


def test_equal_stores_rcx_rbx_and_sets_zf() -> None:
    memory = FakeExchange({0x7000: (1, 2)})
    before = regs(rdi=0x7000, rax=1, rdx=2, rbx=3, rcx=4)
    result = emulate(bytes.fromhex("f0480fc70f"), before, LONG_MODE, no_memory, memory)  # lock cmpxchg16b (%rdi)
    assert result is not None and result.mnemonic == "cmpxchg16b" and result.exception is None
    assert result.length == 5 and result.registers.rip == 0x1005
    assert memory.contents[0x7000] == (3, 4)
    assert memory.calls == [(0x7000, 1, 2, 3, 4)]
    assert result.registers.rflags & RFLAGS_ZF
    assert result.registers.rflags & OTHER_FLAGS == OTHER_FLAGS  # CF PF AF SF OF unaffected
    assert (result.registers.rax, result.registers.rdx) == (1, 2)


def test_unequal_loads_rdx_rax_and_clears_zf() -> None:
    memory = FakeExchange({0x7020: (5, 6)})
    before = regs(rsp=0x7000, rax=1, rdx=2, rbx=3, rcx=4)
    before.rflags |= RFLAGS_ZF
    result = emulate(bytes.fromhex("480fc74c2420"), before, LONG_MODE, no_memory, memory)  # cmpxchg16b 0x20(%rsp)
    assert result is not None and result.exception is None and result.length == 6
    assert memory.contents[0x7020] == (5, 6)
    assert not result.registers.rflags & RFLAGS_ZF
    assert (result.registers.rax, result.registers.rdx) == (5, 6)
    assert (result.registers.rbx, result.registers.rcx) == (3, 4)
    assert result.registers.rflags & OTHER_FLAGS == OTHER_FLAGS


def test_gs_segment_base() -> None:
    memory = FakeExchange({0x10_0040: (7, 8)})
    # lock cmpxchg16b %gs:(%rax): GS base 0x100000 + RAX
    result = emulate(bytes.fromhex("65f0480fc708"), regs(rax=0x40, rdx=0), LONG_MODE, no_memory, memory)
    assert result is not None and memory.calls[0][0] == 0x10_0040
    assert (result.registers.rax, result.registers.rdx) == (7, 8)


@pytest.mark.parametrize("offset", [1, 4, 8, 15])
def test_misaligned_operand_is_a_general_protection_fault(offset: int) -> None:
    memory = FakeExchange({})
    result = emulate(bytes.fromhex("f0480fc70f"), regs(rdi=0x7000 + offset), LONG_MODE, no_memory, memory)
    assert result is not None and result.exception is not None
    assert (result.exception.vector, result.exception.error_code) == (13, 0)
    assert result.registers.rip == 0x1000 and memory.calls == []


def test_non_canonical_operand() -> None:
    memory = FakeExchange({})
    result = emulate(bytes.fromhex("f0480fc70f"), regs(rdi=0x8000_0000_0000), LONG_MODE, no_memory, memory)
    assert result is not None and result.exception is not None and result.exception.vector == 13
    result = emulate(bytes.fromhex("480fc74c2420"), regs(rsp=0x8000_0000_0000), LONG_MODE, no_memory, memory)
    assert result is not None and result.exception is not None and result.exception.vector == 12  # via SS


def test_undefined_cases() -> None:
    register_form = emulate(bytes.fromhex("f0480fc7c9"), regs(), LONG_MODE, no_memory, FakeExchange({}))
    assert register_form is not None and register_form.exception is not None
    assert register_form.exception.vector == 6
    without_cx16 = CpuState(code_bits=64, cpl=0, cr0=0x80050033, cpuid={(0x1, 0): (0, 0, 0, 0)})
    result = emulate(bytes.fromhex("f0480fc70f"), regs(rdi=0x7000), without_cx16, no_memory, FakeExchange({}))
    assert result is not None and result.exception is not None and result.exception.vector == 6


def test_not_guessed() -> None:
    aligned = regs(rdi=0x7000)
    assert emulate(bytes.fromhex("f0480fc70f"), aligned, LONG_MODE, no_memory) is None  # no exchange_guest
    assert emulate(bytes.fromhex("f0480fc70f"), aligned, LONG_MODE, no_memory, FakeExchange({})) is None  # #PF
    unknown = CpuState(code_bits=64, cpl=0, cr0=0x80050033)
    assert emulate(bytes.fromhex("f0480fc70f"), aligned, unknown, no_memory, FakeExchange({})) is None
    assert emulate(bytes.fromhex("0fc70f"), aligned, LONG_MODE, no_memory, FakeExchange({})) is None  # cmpxchg8b
    assert emulate(bytes.fromhex("480fc7f0"), aligned, LONG_MODE, no_memory, FakeExchange({})) is None  # rdrand


# ----------------------------------------------------------------------------- the glue's exchange


class IdentityVcpu:
    """What PvmEmulator's exchange needs of a vCPU: an identity linear -> physical mapping."""

    id = 0

    def translate(self, linear: int) -> int | None:
        return linear if linear < 0x10_0000 else None


@pytest.fixture
def memory():
    guest = GuestMemory.flat(0x10_0000)
    yield guest
    guest.close()


def test_glue_exchange_on_guest_memory(memory: GuestMemory) -> None:
    exchange = PvmEmulator(memory)._exchange_guest(IdentityVcpu())
    memory.write(0x8000, (1).to_bytes(8, "little") + (2).to_bytes(8, "little"))
    assert exchange(0x8000, 1, 2, 3, 4) == (True, 1, 2)
    assert memory.read_u64(0x8000) == 3 and memory.read_u64(0x8008) == 4
    assert exchange(0x8000, 1, 2, 5, 6) == (False, 3, 4)
    assert memory.read_u64(0x8000) == 3 and memory.read_u64(0x8008) == 4
    assert exchange(0x20_0000, 0, 0, 0, 0) is None  # not mapped


def test_glue_exchange_is_atomic_against_a_concurrent_incrementer(memory: GuestMemory) -> None:
    """Two threads each add 1 to a 128-bit counter 20 000 times through compare-and-exchange;
    a lost update (a non-atomic exchange) would leave less than 40 000."""
    exchange = PvmEmulator(memory)._exchange_guest(IdentityVcpu())
    rounds = 20_000

    def increment() -> None:
        low, high = 0, 0
        for _ in range(rounds):
            while True:
                swapped, low, high = exchange(0x9000, low, high, (low + 1) & MASK64, high + (low == MASK64))
                if swapped:
                    low, high = (low + 1) & MASK64, high
                    break

    threads = [threading.Thread(target=increment) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert memory.read_u64(0x9000) == 2 * rounds and memory.read_u64(0x9008) == 0


def test_emulate_with_the_glue_exchange(memory: GuestMemory) -> None:
    exchange = PvmEmulator(memory)._exchange_guest(IdentityVcpu())
    memory.write(0x8010, (10).to_bytes(8, "little") + (20).to_bytes(8, "little"))
    result = emulate(
        bytes.fromhex("f0480fc70f"), regs(rdi=0x8010, rax=10, rdx=20, rbx=30, rcx=40), LONG_MODE, no_memory, exchange
    )
    assert result is not None and result.registers.rflags & RFLAGS_ZF
    assert memory.read_u64(0x8010) == 30 and memory.read_u64(0x8018) == 40
