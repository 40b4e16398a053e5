"""MOVBE in the kvm_pvm emulator ("MOVBE—Move Data After Swapping Bytes", SDM Vol. 2B): every
operand size in both directions, the prefixes that change it, each #UD case, address faults,
and stores that cross a 16-byte block or a page, on fake guest memory and on real GuestMemory
through the glue's atomic exchange.

Encodings are GNU as output (the assembly is next to each one).
"""

from __future__ import annotations

import pytest

from hypervisor.memory.guest_memory import GuestMemory
from hypervisor.vcpu.emulate import (
    CR0_AM,
    RFLAGS_AC,
    RFLAGS_RF,
    CpuState,
    EmulationResult,
    RegisterFile,
    emulate,
    emulate_or_reason,
    guest_reader,
)
from hypervisor.vcpu.pvm import PvmEmulator

PAGE = 0x1000
MASK64 = (1 << 64) - 1
ALL_STATUS_FLAGS = 0x8D5  # OF SF ZF AF PF CF
CPUID_MOVBE = 1 << 22  # leaf 1 ECX
CPUID_SSE42 = 1 << 20  # leaf 1 ECX
WITH_MOVBE = {(0x1, 0): (0, 0, CPUID_MOVBE, 0)}
LONG_MODE = CpuState(code_bits=64, cpl=0, cr0=0x80050033, cpuid=WITH_MOVBE, segment_bases={"gs": 0x20_0000})
PROTECTED = CpuState(code_bits=32, cpl=0, cr0=0x11, cpuid=WITH_MOVBE, segment_bases={"ds": 0, "ss": 0})
REAL = CpuState(code_bits=16, cpl=0, cr0=0x10, cpuid=WITH_MOVBE, segment_bases={"ds": 0x1000, "ss": 0x1000})
BASE = 0x1_0000  # the fake's memory: three pages from here, plus one at the GS base


class FakeGuest:
    """Linear memory made of present pages; `read` is emulate's read_guest, `exchange` its
    exchange_guest (a 16-byte compare-and-exchange, aligned, as the glue's)."""

    def __init__(self, pages: list[int]) -> None:
        self.pages = {page: bytearray(PAGE) for page in pages}
        self.exchanges: list[int] = []
        self.before_exchange: list[tuple[int, bytes]] = []  # (address, bytes) written just before one

    def _page(self, address: int) -> bytearray | None:
        return self.pages.get(address & ~(PAGE - 1))

    def poke(self, address: int, data: bytes) -> None:
        for index, byte in enumerate(data):
            page = self._page(address + index)
            assert page is not None
            page[(address + index) % PAGE] = byte

    def peek(self, address: int, size: int) -> bytes:
        data = self.read(address, size)
        assert data is not None
        return data

    def read(self, address: int, size: int) -> bytes | None:
        out = bytearray()
        for index in range(size):
            page = self._page(address + index)
            if page is None:
                return None
            out.append(page[(address + index) % PAGE])
        return bytes(out)

    def exchange(self, linear: int, exp_lo: int, exp_hi: int, new_lo: int, new_hi: int) -> tuple[bool, int, int] | None:
        assert linear % 16 == 0
        self.exchanges.append(linear)
        if self._page(linear) is None:
            return None
        if self.before_exchange:  # another vCPU writes between emulate's read and its exchange
            self.poke(*self.before_exchange.pop(0))
        current = int.from_bytes(self.peek(linear, 16), "little")
        low, high = current & MASK64, current >> 64
        if (low, high) != (exp_lo, exp_hi):
            return False, low, high
        self.poke(linear, (new_lo | new_hi << 64).to_bytes(16, "little"))
        return True, low, high


def guest() -> FakeGuest:
    memory = FakeGuest([BASE, BASE + PAGE, BASE + 2 * PAGE, 0x20_0000])
    for page in memory.pages.values():
        page[:] = bytes(range(256)) * (PAGE // 256)  # a pattern, so a stray write shows
    return memory


def regs(**values: int) -> RegisterFile:
    return RegisterFile(rip=0x1000, rflags=0x2 | ALL_STATUS_FLAGS | RFLAGS_RF, **values)


def run(code: str, before: RegisterFile, memory: FakeGuest, cpu: CpuState = LONG_MODE) -> EmulationResult | None:
    return emulate(bytes.fromhex(code), before, cpu, memory.read, memory.exchange)


# ----------------------------------------------------------------------------- loads


@pytest.mark.parametrize(
    ("code", "length", "expected"),
    [
        ("660f38f007", 5, 0xFFFF_FFFF_FFFF_0102),  # movbe (%rdi),%ax: bits 63:16 kept
        ("0f38f007", 4, 0x0102_0304),  # movbe (%rdi),%eax: zero-extended
        ("480f38f007", 5, 0x0102_0304_0506_0708),  # movbe (%rdi),%rax
        ("66480f38f007", 6, 0x0102_0304_0506_0708),  # 66 REX.W: REX.W wins, 64 bits
    ],
)
def test_load_reverses_the_bytes(code: str, length: int, expected: int) -> None:
    memory = guest()
    memory.poke(BASE + 0x100, bytes.fromhex("0102030405060708"))
    result = run(code, regs(rdi=BASE + 0x100, rax=MASK64), memory)
    assert result is not None and result.mnemonic == "movbe" and result.exception is None
    assert result.length == length and result.registers.rip == 0x1000 + length
    assert result.registers.rax == expected
    assert result.registers.rflags & ALL_STATUS_FLAGS == ALL_STATUS_FLAGS  # no flags affected
    assert not result.registers.rflags & RFLAGS_RF
    assert memory.exchanges == []  # a load writes nothing


def test_load_addressing_forms() -> None:
    memory = guest()
    memory.poke(BASE + 0x210, bytes.fromhex("1122334455667788"))
    result = run("4c0f38f04c2410", regs(rsp=BASE + 0x200), memory)  # movbe 0x10(%rsp),%r9
    assert result is not None and result.registers.r9 == 0x1122_3344_5566_7788 and result.length == 7
    memory.poke(0x20_0000 + 0x48, bytes.fromhex("a1b2"))
    # movbe %gs:(%rbx,%rsi,4),%r10w with GS base 0x200000
    result = run("6566440f38f014b3", regs(rbx=0x40, rsi=2, r10=0x5555_0000), memory)
    assert result is not None and result.registers.r10 == 0x5555_A1B2
    memory.poke(BASE + 0x1038, bytes.fromhex("deadbeef"))
    result = run("0f38f01520000000", RegisterFile(rip=BASE + 0x1010), memory)  # movbe 0x20(%rip),%edx
    assert result is not None and result.registers.rdx == 0xDEAD_BEEF and result.length == 8


def test_load_in_32_and_16_bit_code() -> None:
    memory = guest()
    memory.poke(BASE + 0x300, bytes.fromhex("cafef00d"))
    result = run("0f38f007", regs(rdi=BASE + 0x300), memory, PROTECTED)  # movbe (%edi),%eax
    assert result is not None and result.registers.rax == 0xCAFE_F00D
    # 16-bit code: movbe (%bx,%si),%ax at DS base 0x1000 + BX + SI; 66 would make it EAX.
    memory.poke(BASE + 0x30, bytes.fromhex("beef"))
    result = run("0f38f000", regs(rbx=0xF020, rsi=0x10, rax=0x1234_0000), memory, REAL)  # 0x1000 + 0xf030
    assert result is not None and result.registers.rax == 0x1234_BEEF
    assert result.registers.rip == 0x1004


# ----------------------------------------------------------------------------- stores


@pytest.mark.parametrize(
    ("code", "stored"),
    [
        ("660f38f107", "0708"),  # movbe %ax,(%rdi)
        ("0f38f107", "05060708"),  # movbe %eax,(%rdi)
        ("480f38f107", "0102030405060708"),  # movbe %rax,(%rdi)
    ],
)
def test_store_reverses_the_bytes_and_touches_nothing_else(code: str, stored: str) -> None:
    memory = guest()
    around = memory.peek(BASE + 0x400 - 16, 48)
    before = regs(rdi=BASE + 0x404, rax=0x0102_0304_0506_0708)
    result = run(code, before, memory)
    assert result is not None and result.exception is None and result.mnemonic == "movbe"
    assert memory.peek(BASE + 0x404, len(stored) // 2) == bytes.fromhex(stored)
    after = memory.peek(BASE + 0x400 - 16, 48)
    changed = [i for i in range(48) if after[i] != around[i]]
    assert changed and min(changed) >= 20 and max(changed) < 20 + len(stored) // 2
    assert result.registers.rax == before.rax and result.registers.rip == before.rip + result.length


def test_store_from_r10w_with_gs_in_32_and_16_bit_code() -> None:
    memory = guest()
    result = run("6566440f38f114b3", regs(rbx=0x40, rsi=2, r10=0xFFFF_A1B2), memory)  # %r10w -> %gs:(..)
    assert result is not None and memory.peek(0x20_0048, 2) == bytes.fromhex("a1b2")
    result = run("660f38f14304", regs(rbx=BASE + 0x500, rax=0xBEEF), memory, PROTECTED)  # movbe %ax,4(%ebx)
    assert result is not None and memory.peek(BASE + 0x504, 2) == bytes.fromhex("beef")
    result = run("660f38f105", regs(rdi=0xF600, rax=0x1122_3344), memory, REAL)  # %eax -> 0x1000 + (%di)
    assert result is not None and memory.peek(BASE + 0x600, 4) == bytes.fromhex("11223344")


def test_store_across_a_16_byte_block() -> None:
    memory = guest()
    result = run("480f38f107", regs(rdi=BASE + 0x70C, rax=0x0102_0304_0506_0708), memory)
    assert result is not None and memory.peek(BASE + 0x70C, 8) == bytes.fromhex("0102030405060708")
    assert memory.exchanges == [BASE + 0x700, BASE + 0x710]


def test_store_across_a_page_writes_both_pages() -> None:
    memory = guest()
    result = run("480f38f107", regs(rdi=BASE + PAGE - 3, rax=0x0102_0304_0506_0708), memory)
    assert result is not None and result.exception is None
    assert memory.peek(BASE + PAGE - 3, 8) == bytes.fromhex("0102030405060708")
    assert memory.exchanges == [BASE + PAGE - 16, BASE + PAGE]


def test_load_across_a_page() -> None:
    memory = guest()
    memory.poke(BASE + 2 * PAGE - 2, bytes.fromhex("01020304"))
    result = run("0f38f007", regs(rdi=BASE + 2 * PAGE - 2), memory)
    assert result is not None and result.registers.rax == 0x0102_0304


@pytest.mark.parametrize("code", ["480f38f107", "480f38f007"])
def test_operand_running_into_a_page_that_is_not_present_is_not_emulated(code: str) -> None:
    """The emulator models no page fault (like CMPXCHG16B's): it refuses, naming the address,
    and a store writes neither page."""
    memory = guest()
    last = BASE + 3 * PAGE - 4  # the page after it is not present
    untouched = memory.peek(last, 4)
    outcome = emulate_or_reason(
        bytes.fromhex(code), regs(rdi=last, rax=MASK64), LONG_MODE, memory.read, memory.exchange
    )
    assert isinstance(outcome, str) and f"{last:#x}" in outcome and "cannot be read" in outcome
    assert memory.peek(last, 4) == untouched and memory.exchanges == []


def test_store_to_memory_the_exchange_cannot_reach_is_not_emulated() -> None:
    """Readable but not guest RAM to the exchange (MMIO, say): refused, not guessed."""
    memory = guest()

    def no_exchange(*_: int) -> None:
        return None

    outcome = emulate_or_reason(bytes.fromhex("0f38f107"), regs(rdi=BASE), LONG_MODE, memory.read, no_exchange)
    assert isinstance(outcome, str) and "not mapped guest RAM" in outcome


def test_store_keeps_what_another_vcpu_wrote_to_the_same_block() -> None:
    memory = guest()
    memory.before_exchange.append((BASE + 0x800, b"\xaa"))  # lands between the read and the exchange
    result = run("0f38f107", regs(rdi=BASE + 0x804, rax=0x0102_0304), memory)
    assert result is not None
    assert memory.peek(BASE + 0x800, 8) == b"\xaa" + bytes([1, 2, 3]) + bytes.fromhex("01020304")
    assert memory.exchanges == [BASE + 0x800, BASE + 0x800]  # the first lost the race, the retry won


def test_store_without_an_exchange_is_not_emulated_but_a_load_is() -> None:
    memory = guest()
    assert emulate(bytes.fromhex("0f38f107"), regs(rdi=BASE), LONG_MODE, memory.read) is None
    assert emulate(bytes.fromhex("0f38f007"), regs(rdi=BASE), LONG_MODE, memory.read) is not None


# ----------------------------------------------------------------------------- exceptions


def undefined(code: str, cpu: CpuState = LONG_MODE) -> None:
    memory = guest()
    untouched = memory.peek(BASE, 16)
    before = regs(rdi=BASE, rax=0x1234)
    result = run(code, before, memory, cpu)
    assert result is not None and result.exception is not None
    assert (result.exception.vector, result.exception.error_code) == (6, None)
    assert result.registers == before  # a fault leaves RIP on the instruction, registers as they were
    assert memory.peek(BASE, 16) == untouched


@pytest.mark.parametrize("code", ["0f38f0c0", "0f38f1c0", "480f38f1c8", "660f38f0c0"])
def test_register_operand_is_undefined(code: str) -> None:
    undefined(code)  # 0f 38 f0 c0 is kvm-unit-tests' test_illegal_movbe


@pytest.mark.parametrize("code", ["0f38f007", "0f38f107"])
def test_without_cpuid_movbe_is_undefined(code: str) -> None:
    undefined(code, CpuState(code_bits=64, cpl=0, cr0=0x80050033, cpuid={(0x1, 0): (0, 0, CPUID_SSE42, 0)}))
    undefined(code, CpuState(code_bits=64, cpl=0, cr0=0x80050033, cpuid={}))  # no leaf 1: no features


@pytest.mark.parametrize("code", ["f00f38f007", "f00f38f107", "f30f38f007", "f3480f38f107", "66f30f38f107"])
def test_lock_and_rep_are_undefined(code: str) -> None:
    undefined(code)


def test_repne_is_crc32_with_sse42_and_undefined_without() -> None:
    undefined("f20f38f007")  # the guest has MOVBE but not SSE4.2
    memory = guest()
    with_sse42 = CpuState(code_bits=64, cpl=0, cr0=0x80050033, cpuid={(0x1, 0): (0, 0, CPUID_MOVBE | CPUID_SSE42, 0)})
    assert run("f20f38f007", regs(rdi=BASE), memory, with_sse42) is None  # crc32b (%rdi),%eax
    assert run("66f20f38f107", regs(rdi=BASE), memory, with_sse42) is None  # crc32w (%rdi),%eax


def test_unknown_cpuid_is_not_guessed() -> None:
    memory = guest()
    unknown = CpuState(code_bits=64, cpl=0, cr0=0x80050033)
    outcome = emulate_or_reason(bytes.fromhex("0f38f107"), regs(rdi=BASE), unknown, memory.read, memory.exchange)
    assert isinstance(outcome, str) and "CPUID" in outcome
    assert memory.exchanges == []


def test_non_canonical_operand() -> None:
    memory = guest()
    result = run("0f38f107", regs(rdi=0x8000_0000_0000), memory)
    assert result is not None and result.exception is not None
    assert (result.exception.vector, result.exception.error_code) == (13, 0)
    result = run("0f38f04df8", regs(rbp=0x8000_0000_0010), memory)  # movbe -8(%rbp),%ecx: via SS
    assert result is not None and result.exception is not None and result.exception.vector == 12
    assert memory.exchanges == []


def test_misaligned_operand_at_cpl3_with_alignment_checking() -> None:
    memory = guest()
    user = CpuState(code_bits=64, cpl=3, cr0=0x80050033 | CR0_AM, cpuid=WITH_MOVBE)
    before = regs(rdi=BASE + 2)
    before.rflags |= RFLAGS_AC
    result = run("0f38f107", before, memory, user)
    assert result is not None and result.exception is not None
    assert (result.exception.vector, result.exception.error_code) == (17, 0)
    aligned = regs(rdi=BASE + 4)
    aligned.rflags |= RFLAGS_AC
    result = run("0f38f107", aligned, memory, user)
    assert result is not None and result.exception is None
    result = run("0f38f107", before, memory, LONG_MODE)  # CPL0: no alignment check
    assert result is not None and result.exception is None


def test_truncated_bytes_are_not_emulated() -> None:
    memory = guest()
    assert run("0f38f0", regs(), memory) is None
    assert run("0f38f084", regs(), memory) is None  # SIB and disp32 missing


# ----------------------------------------------------------------------------- real guest memory


class IdentityVcpu:
    id = 0

    def translate(self, linear: int) -> int | None:
        return linear if linear < 0x10_0000 else None


def test_store_and_load_on_guest_memory_through_the_glue() -> None:
    memory = GuestMemory.flat(0x10_0000)
    try:
        vcpu = IdentityVcpu()
        read = guest_reader(vcpu.translate, memory.read)
        exchange = PvmEmulator(memory)._exchange_guest(vcpu)  # type: ignore[arg-type]  # a fake vCPU
        memory.write(0x8FF8, bytes(range(16)))
        result = emulate(
            bytes.fromhex("480f38f107"), regs(rdi=0x8FFC, rax=0x1122_3344_5566_7788), LONG_MODE, read, exchange
        )
        assert result is not None and result.exception is None
        assert memory.read(0x8FF8, 16) == bytes(range(4)) + bytes.fromhex("1122334455667788") + bytes(range(12, 16))
        result = emulate(bytes.fromhex("480f38f007"), regs(rdi=0x8FFC), LONG_MODE, read, exchange)
        assert result is not None and result.registers.rax == 0x1122_3344_5566_7788
        outcome = emulate_or_reason(bytes.fromhex("0f38f107"), regs(rdi=0xFFFFE), LONG_MODE, read, exchange)
        assert isinstance(outcome, str) and memory.read(0xFFFFE, 2) == b"\0\0"  # crosses out of RAM
    finally:
        memory.close()
