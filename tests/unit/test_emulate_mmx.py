"""MOVD/MOVQ between MMX and general-purpose registers or memory (NP 0F 6E, NP 0F 7E) in the
kvm_pvm emulator: "MOVD/MOVQ" (SDM Vol. 2B) and the MMX state rules of SDM Vol. 1 §9.5.1 (TOP
to 0, every tag valid, bits 79:64 of a written register set), with the registers in the stack
order KVM_GET_FPU gives them.

Encodings are GNU as output (the assembly is next to each one).
"""

from __future__ import annotations

import pytest

from hypervisor.vcpu.emulate import (
    CR0_EM,
    CR0_NE,
    CR0_TS,
    FSW_ERROR_SUMMARY,
    CpuState,
    EmulationResult,
    RegisterFile,
    X87Status,
    emulate,
    emulate_or_reason,
)

LONG_MODE_CR0 = 0x80050033  # PG WP NE ET MP PE
MASK64 = (1 << 64) - 1
EMPTY = bytes(10)


def register(mantissa: int, exponent: int = 0x4000) -> bytes:
    return mantissa.to_bytes(8, "little") + exponent.to_bytes(2, "little")


def x87(top: int = 0, st: tuple[bytes, ...] | None = None, fsw: int = 0, ftw: int = 0) -> X87Status:
    return X87Status(fsw=fsw | top << 11, ftw=ftw, st=st if st is not None else (EMPTY,) * 8)


def cpu(state: X87Status | None = None, cr0: int = LONG_MODE_CR0, code_bits: int = 64) -> CpuState:
    return CpuState(code_bits=code_bits, cpl=0, cr0=cr0, x87=state or x87(), segment_bases={"ds": 0, "ss": 0})


class Memory:
    def __init__(self) -> None:
        self.data = bytearray(0x2000)
        self.exchanges = 0

    def read(self, address: int, size: int) -> bytes | None:
        return bytes(self.data[address : address + size]) if address + size <= len(self.data) else None

    def exchange(self, linear: int, exp_lo: int, exp_hi: int, new_lo: int, new_hi: int) -> tuple[bool, int, int]:
        self.exchanges += 1
        current = int.from_bytes(self.data[linear : linear + 16], "little")
        low, high = current & MASK64, current >> 64
        if (low, high) == (exp_lo, exp_hi):
            self.data[linear : linear + 16] = (new_lo | new_hi << 64).to_bytes(16, "little")
            return True, low, high
        return False, low, high


def regs(**values: int) -> RegisterFile:
    return RegisterFile(rip=0x1000, rflags=0x2, **values)


def run(code: str, before: RegisterFile, state: CpuState, memory: Memory | None = None) -> EmulationResult | None:
    memory = memory or Memory()
    return emulate(bytes.fromhex(code), before, state, memory.read, memory.exchange)


def test_movq_rax_to_mm0_as_kvm_unit_tests_emulator_does() -> None:
    result = run("480f6ec0", regs(rax=0x0102_0304_0506_0708), cpu())  # movq %rax,%mm0
    assert result is not None and result.mnemonic == "movq" and result.exception is None
    assert result.length == 4 and result.registers.rip == 0x1004
    assert result.x87 is not None and result.x87.st is not None
    assert result.x87.st[0] == register(0x0102_0304_0506_0708, 0xFFFF)  # bits 79:64 all ones
    assert result.x87.st[1:] == (EMPTY,) * 7
    assert result.x87.ftw == 0xFF and result.x87.fsw >> 11 & 7 == 0  # all tags valid, TOP = 0


def test_movd_zero_extends_into_the_mmx_register() -> None:
    result = run("0f6ed9", regs(rcx=0xFFFF_FFFF_8765_4321), cpu())  # movd %ecx,%mm3
    assert result is not None and result.x87 is not None and result.x87.st is not None
    assert result.x87.st[3] == register(0x8765_4321, 0xFFFF)
    result = run("410f6ed1", regs(r9=0xAAAA_BBBB), cpu())  # movd %r9d,%mm2: REX.B picks r9
    assert result is not None and result.x87 is not None and result.x87.st is not None
    assert result.x87.st[2] == register(0xAAAA_BBBB, 0xFFFF)


def test_mmx_to_general_register() -> None:
    st = (EMPTY,) * 5 + (register(0x1122_3344_5566_7788),) + (EMPTY,) * 2
    result = run("490f7eea", regs(r10=MASK64), cpu(x87(st=st)))  # movq %mm5,%r10
    assert result is not None and result.registers.r10 == 0x1122_3344_5566_7788
    st = (EMPTY,) * 3 + (register(0x1122_3344_5566_7788),) + (EMPTY,) * 4
    result = run("0f7eda", regs(rdx=MASK64), cpu(x87(st=st)))  # movd %mm3,%edx: zero-extends
    assert result is not None and result.registers.rdx == 0x5566_7788
    assert result.x87 is not None and result.x87.st == st  # reading changes no register


def test_registers_come_in_stack_order_and_go_back_for_top_zero() -> None:
    """With TOP = 3, ST(i) is R((3 + i) mod 8): MM0 = R0 is ST(5) in what KVM_GET_FPU gives."""
    physical = [register(0x100 + index) for index in range(8)]
    stack_order = tuple(physical[(3 + i) % 8] for i in range(8))
    result = run("480f7ec0", regs(), cpu(x87(top=3, st=stack_order)))  # movq %mm0,%rax
    assert result is not None and result.registers.rax == 0x100
    assert result.x87 is not None and result.x87.st == tuple(physical)  # TOP = 0: ST(i) = Ri
    result = run("480f6ec0", regs(rax=0xABC), cpu(x87(top=3, st=stack_order)))  # movq %rax,%mm0
    assert result is not None and result.x87 is not None and result.x87.st is not None
    assert result.x87.st[0] == register(0xABC, 0xFFFF) and result.x87.st[1:] == tuple(physical[1:])


def test_memory_operands() -> None:
    memory = Memory()
    memory.data[0x104:0x108] = bytes.fromhex("44332211")
    result = run("0f6e7e04", regs(rsi=0x100), cpu(), memory)  # movd 4(%rsi),%mm7
    assert result is not None and result.x87 is not None and result.x87.st is not None
    assert result.x87.st[7] == register(0x1122_3344, 0xFFFF)
    memory.data[0x200:0x208] = bytes(range(1, 9))
    result = run("480f6e0f", regs(rdi=0x200), cpu(), memory)  # movq (%rdi),%mm1 (the 6E form)
    assert result is not None and result.x87 is not None and result.x87.st is not None
    assert result.x87.st[1][:8] == bytes(range(1, 9))
    st = (EMPTY,) * 7 + (register(0x0102_0304_0506_0708),)
    result = run("0f7e7e04", regs(rsi=0x300), cpu(x87(st=st)), memory)  # movd %mm7,4(%rsi)
    assert result is not None and memory.data[0x300:0x30C] == bytes(4) + bytes.fromhex("08070605") + bytes(4)


def test_32_bit_code_has_no_rex() -> None:
    st = (register(0x55),) + (EMPTY,) * 7
    result = run("0f7ec0", regs(rax=MASK64), cpu(x87(st=st), code_bits=32))  # movd %mm0,%eax
    assert result is not None and result.mnemonic == "movd" and result.registers.rax == 0x55


@pytest.mark.parametrize(
    ("cr0", "vector"), [(LONG_MODE_CR0 | CR0_EM, 6), (LONG_MODE_CR0 | CR0_TS, 7), (LONG_MODE_CR0 | CR0_EM | CR0_TS, 6)]
)
def test_em_is_undefined_and_ts_is_device_not_available(cr0: int, vector: int) -> None:
    before = regs(rax=1)
    result = run("480f6ec0", before, cpu(cr0=cr0))
    assert result is not None and result.exception is not None and result.exception.vector == vector
    assert result.registers == before and result.x87 is None


def test_lock_is_undefined() -> None:
    result = run("f0480f6ec0", regs(), cpu())
    assert result is not None and result.exception is not None and result.exception.vector == 6


def test_pending_x87_exception_is_a_math_fault() -> None:
    """kvm-unit-tests' test_mmx_movq_mf: 0.0/0.0 unmasked, then an MMX MOVQ takes #MF."""
    pending = x87(fsw=FSW_ERROR_SUMMARY | 0x1)
    result = run("480f7ec0", regs(), cpu(pending))
    assert result is not None and result.exception is not None and result.exception.vector == 16
    no_ne = cpu(pending, cr0=LONG_MODE_CR0 & ~CR0_NE)
    outcome = emulate_or_reason(bytes.fromhex("480f7ec0"), regs(), no_ne, Memory().read)
    assert isinstance(outcome, str) and "FERR" in outcome


def test_non_canonical_memory_operand() -> None:
    result = run("0f6e07", regs(rdi=0x8000_0000_0000), cpu())
    assert result is not None and result.exception is not None
    assert (result.exception.vector, result.exception.error_code) == (13, 0)


def test_not_guessed() -> None:
    no_registers = CpuState(code_bits=64, cpl=0, cr0=LONG_MODE_CR0, x87=X87Status(fsw=0, ftw=0))
    outcome = emulate_or_reason(bytes.fromhex("480f6ec0"), regs(), no_registers, Memory().read)
    assert isinstance(outcome, str) and "MMX registers are not known" in outcome
    assert run("660f6ec0", regs(), cpu()) is None  # movd %eax,%xmm0: SSE, not handled
    assert run("f30f7ec1", regs(), cpu()) is None  # movq %xmm1,%xmm0
    short = X87Status(fsw=0, ftw=0, st=(EMPTY,) * 7)
    assert run("480f6ec0", regs(), cpu(short)) is None
