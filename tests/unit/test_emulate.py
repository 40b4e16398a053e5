"""The kvm_pvm instruction emulator against the SDM's definitions of each instruction.

Encodings were produced by GNU as (the assembly is next to each one); a test re-assembles them
when binutils is installed so lengths are checked against an independent decoder.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypervisor.errors import GuestMemoryError
from hypervisor.memory.guest_memory import GuestMemory
from hypervisor.vcpu.emulate import (
    CR0_EM,
    CR0_MP,
    CR0_NE,
    CR0_PE,
    CR0_TS,
    RFLAGS_AC,
    RFLAGS_RF,
    RFLAGS_TF,
    RFLAGS_ZF,
    CpuState,
    RegisterFile,
    X87Status,
    code_bits_from_cs,
    emulate,
    failure_instruction_bytes,
    guest_reader,
)

LONG_MODE = CpuState(code_bits=64, cpl=0, cr0=0x80050033)  # PG WP NE ET MP PE, as Linux sets it
ALL_STATUS_FLAGS = 0x8D5  # OF SF ZF AF PF CF
MASK64 = (1 << 64) - 1


def no_memory(address: int, size: int) -> bytes | None:
    raise AssertionError(f"unexpected memory read at {address:#x}")


class FakeMemory:
    """Linear memory for memory operands; records every read."""

    def __init__(self, contents: dict[int, bytes]) -> None:
        self.contents = contents
        self.reads: list[tuple[int, int]] = []

    def __call__(self, address: int, size: int) -> bytes | None:
        self.reads.append((address, size))
        data = self.contents.get(address)
        return None if data is None else data[:size]


def regs(**values: int) -> RegisterFile:
    return RegisterFile(rip=0x1000, rflags=0x2 | ALL_STATUS_FLAGS, **values)


# ----------------------------------------------------------------------------- clac / stac


def test_clac_clears_ac_and_advances() -> None:
    before = regs()
    before.rflags |= RFLAGS_AC | RFLAGS_RF
    result = emulate(bytes.fromhex("0f01ca 90 90"), before, LONG_MODE, no_memory)
    assert result is not None and result.mnemonic == "clac" and result.exception is None
    assert result.registers.rip == 0x1003
    assert not result.registers.rflags & RFLAGS_AC
    assert not result.registers.rflags & RFLAGS_RF  # RF clears when an instruction completes
    assert result.registers.rflags & ALL_STATUS_FLAGS == ALL_STATUS_FLAGS
    assert before.rflags & RFLAGS_AC  # the input is not modified


def test_stac_sets_ac() -> None:
    result = emulate(bytes.fromhex("0f01cb"), regs(), LONG_MODE, no_memory)
    assert result is not None and result.mnemonic == "stac"
    assert result.registers.rflags & RFLAGS_AC
    assert result.registers.rip == 0x1003


def test_clac_with_segment_prefix_and_rex_is_still_clac() -> None:
    result = emulate(bytes.fromhex("2e 40 0f01ca"), regs(), LONG_MODE, no_memory)
    assert result is not None and result.length == 5


def test_clac_undefined_cases() -> None:
    user = CpuState(code_bits=64, cpl=3, cr0=LONG_MODE.cr0)
    result = emulate(bytes.fromhex("0f01ca"), regs(), user, no_memory)
    assert result is not None and result.exception is not None and result.exception.vector == 6
    assert result.registers.rip == 0x1000  # #UD is a fault: RIP stays on the instruction
    real = CpuState(code_bits=16, cpl=0, cr0=0)
    result = emulate(bytes.fromhex("0f01ca"), regs(), real, no_memory)
    assert result is not None and result.exception is not None and result.exception.vector == 6
    lock = emulate(bytes.fromhex("f0 0f01ca"), regs(), LONG_MODE, no_memory)
    assert lock is not None and lock.exception is not None and lock.exception.vector == 6
    assert emulate(bytes.fromhex("66 0f01ca"), regs(), LONG_MODE, no_memory) is None  # NP prefix


# ----------------------------------------------------------------------------- int3


def test_int3_injects_bp_with_rip_after() -> None:
    result = emulate(bytes.fromhex("cc 90"), regs(), LONG_MODE, no_memory)
    assert result is not None and result.mnemonic == "int3"
    assert result.length == 1
    assert result.registers.rip == 0x1001  # SDM: the saved RIP of #BP follows the INT3
    assert result.exception is not None
    exception = result.exception
    assert (exception.vector, exception.error_code, exception.software) == (3, None, True)


def test_int3_outside_cpl0_is_not_guessed() -> None:
    user = CpuState(code_bits=64, cpl=3, cr0=LONG_MODE.cr0)
    assert emulate(b"\xcc", regs(), user, no_memory) is None


def test_int3_rip_wraps_in_16_bit_code() -> None:
    real = CpuState(code_bits=16, cpl=0, cr0=0)
    result = emulate(b"\xcc", RegisterFile(rip=0xFFFF), real, no_memory)
    assert result is not None and result.registers.rip == 0


# ----------------------------------------------------------------------------- x87


def x87_cpu(fsw: int = 0, ftw: int = 0xFF, cr0: int = LONG_MODE.cr0) -> CpuState:
    return CpuState(code_bits=64, cpl=0, cr0=cr0, x87=X87Status(fsw=fsw, ftw=ftw))


def test_fwait_without_pending_exception_is_a_no_op() -> None:
    result = emulate(bytes.fromhex("9b 48 83"), regs(rax=5), x87_cpu(fsw=0x3800), no_memory)
    assert result is not None and result.mnemonic == "fwait" and result.exception is None
    assert result.registers.rip == 0x1001 and result.registers.rax == 5
    assert result.x87 is None  # nothing to write back


def test_fwait_with_pending_exception_raises_mf() -> None:
    result = emulate(b"\x9b", regs(), x87_cpu(fsw=0x0081), no_memory)  # IE | ES
    assert result is not None and result.exception is not None and result.exception.vector == 16
    assert result.registers.rip == 0x1000
    legacy_ferr = x87_cpu(fsw=0x0081, cr0=LONG_MODE.cr0 & ~CR0_NE)
    assert emulate(b"\x9b", regs(), legacy_ferr, no_memory) is None


def test_fwait_device_not_available() -> None:
    result = emulate(b"\x9b", regs(), x87_cpu(cr0=CR0_PE | CR0_MP | CR0_TS), no_memory)
    assert result is not None and result.exception is not None and result.exception.vector == 7


def test_fwait_needs_x87_state() -> None:
    assert emulate(b"\x9b", regs(), LONG_MODE, no_memory) is None


def test_fnclex_clears_exception_flags_busy_and_es() -> None:
    result = emulate(bytes.fromhex("dbe2"), regs(), x87_cpu(fsw=0xFFFF, ftw=0x0F), no_memory)
    assert result is not None and result.mnemonic == "fnclex"
    assert result.registers.rip == 0x1002
    assert result.x87 == X87Status(fsw=0x7F00, ftw=0x0F)  # C3-C0 and TOP kept


def test_fnclex_device_not_available() -> None:
    for cr0 in (CR0_PE | CR0_EM, CR0_PE | CR0_TS):
        result = emulate(bytes.fromhex("dbe2"), regs(), x87_cpu(cr0=cr0), no_memory)
        assert result is not None and result.exception is not None and result.exception.vector == 7


def test_emms_empties_the_tag_word() -> None:
    result = emulate(bytes.fromhex("0f77"), regs(), x87_cpu(fsw=0x3800, ftw=0xFF), no_memory)
    assert result is not None and result.mnemonic == "emms"
    assert result.x87 == X87Status(fsw=0x3800, ftw=0x00)
    assert result.registers.rip == 0x1002


def test_emms_exceptions() -> None:
    cases = {CR0_PE | CR0_EM: 6, CR0_PE | CR0_TS: 7}
    for cr0, vector in cases.items():
        result = emulate(bytes.fromhex("0f77"), regs(), x87_cpu(cr0=cr0), no_memory)
        assert result is not None and result.exception is not None and result.exception.vector == vector
    pending = emulate(bytes.fromhex("0f77"), regs(), x87_cpu(fsw=0x84), no_memory)
    assert pending is not None and pending.exception is not None and pending.exception.vector == 16


# ----------------------------------------------------------------------------- popcnt


def popcnt_flags_ok(result_flags: int, source: int) -> bool:
    expected_zf = RFLAGS_ZF if source == 0 else 0
    return result_flags & ALL_STATUS_FLAGS == expected_zf


@given(st.integers(min_value=0, max_value=MASK64), st.integers(min_value=0, max_value=MASK64))
def test_popcnt_register_forms_match_definition(source: int, old_destination: int) -> None:
    # popcnt %rcx,%rax / %ecx,%eax / %cx,%ax
    cases = [("f3480fb8c1", 64), ("f30fb8c1", 32), ("66f30fb8c1", 16)]
    for encoding, bits in cases:
        mask = (1 << bits) - 1
        result = emulate(bytes.fromhex(encoding), regs(rcx=source, rax=old_destination), LONG_MODE, no_memory)
        assert result is not None and result.mnemonic == "popcnt"
        count = bin(source & mask).count("1")
        if bits == 16:
            assert result.registers.rax == (old_destination & ~0xFFFF & MASK64) | count
        else:
            assert result.registers.rax == count  # 32-bit results zero-extend in 64-bit mode
        assert popcnt_flags_ok(result.registers.rflags, source & mask)
        assert result.registers.rip == 0x1000 + len(bytes.fromhex(encoding))
        assert result.registers.rcx == source


def test_popcnt_zero_sets_only_zf() -> None:
    result = emulate(bytes.fromhex("f30fb8c1"), regs(rcx=0, rax=7), LONG_MODE, no_memory)
    assert result is not None and result.registers.rax == 0
    assert result.registers.rflags & ALL_STATUS_FLAGS == RFLAGS_ZF


def test_popcnt_rex_extended_registers() -> None:
    result = emulate(bytes.fromhex("f34d0fb8d1"), regs(r9=0xFF00FF00FF00FF00), LONG_MODE, no_memory)
    assert result is not None and result.registers.r10 == 32  # popcnt %r9,%r10
    result = emulate(bytes.fromhex("f3410fb8d7"), regs(r15=0xFFFFFFFF0000000F, rdx=MASK64), LONG_MODE, no_memory)
    assert result is not None and result.registers.rdx == 4  # popcnt %r15d,%edx


# (assembly, encoding, registers, expected linear address, operand bytes, destination register)
MEMORY_FORMS_64 = [
    ("popcnt (%rax),%ebx", "f30fb818", {"rax": 0x5000}, 0x5000, 4, "rbx"),
    ("popcnt 0x10(%rbp),%rsi", "f3480fb87510", {"rbp": 0x5000}, 0x5010, 8, "rsi"),
    ("popcnt (%rsp),%edi", "f30fb83c24", {"rsp": 0x7000}, 0x7000, 4, "rdi"),
    ("popcnt -0x8(%rsp),%rdx", "f3480fb85424f8", {"rsp": 0x7008}, 0x7000, 8, "rdx"),
    ("popcnt 0x12345678(%rbx,%rcx,8),%eax", "f30fb884cb78563412", {"rbx": 0x1000, "rcx": 2}, 0x12346688, 4, "rax"),
    ("popcnt 0x40(,%rdx,4),%eax", "f30fb8049540000000", {"rdx": 0x10}, 0x80, 4, "rax"),
    ("popcnt (%r12,%r12,2),%r8", "f34f0fb80464", {"r12": 0x100}, 0x300, 8, "r8"),
    ("popcnt 0x0(%r13),%eax", "f3410fb84500", {"r13": 0x9000}, 0x9000, 4, "rax"),
    ("popcnt 0x100(%rip),%eax", "f30fb80500010000", {}, 0x1000 + 8 + 0x100, 4, "rax"),
    ("popcnt (%eax),%ecx", "67f30fb808", {"rax": 0xFFFF_FFFF_0000_4000}, 0x4000, 4, "rcx"),
    ("popcnt 0x20(%eip),%ecx", "67f30fb80d20000000", {}, 0x1000 + 9 + 0x20, 4, "rcx"),
    ("popcnt -0x80(%rax,%rbx,2),%cx", "66f30fb84c5880", {"rax": 0x2000, "rbx": 0x40}, 0x2000, 2, "rcx"),
    ("popcnt (%rax),%rbx with negative wrap", "f3480fb818", {"rax": MASK64}, MASK64, 8, "rbx"),
]


@pytest.mark.parametrize(
    "assembly,encoding,registers,address,size,destination", MEMORY_FORMS_64, ids=[form[0] for form in MEMORY_FORMS_64]
)
def test_popcnt_memory_forms_64(
    assembly: str, encoding: str, registers: dict[str, int], address: int, size: int, destination: str
) -> None:
    value = 0xF0F0_F0F0_F0F0_F0F1
    memory = FakeMemory({address: value.to_bytes(8, "little")})
    result = emulate(bytes.fromhex(encoding) + b"\x90" * 4, regs(**registers), LONG_MODE, memory)
    assert result is not None, assembly
    assert memory.reads == [(address, size)]
    expected = bin(value & ((1 << (8 * size)) - 1)).count("1")
    assert getattr(result.registers, destination) & ((1 << (8 * size)) - 1) == expected
    assert result.length == len(bytes.fromhex(encoding))
    assert result.registers.rip == 0x1000 + result.length


def test_popcnt_fs_and_gs_use_their_bases() -> None:
    cpu = CpuState(code_bits=64, cpl=0, cr0=LONG_MODE.cr0, segment_bases={"fs": 0x7F00_0000, "gs": 0x10})
    memory = FakeMemory({0x7F00_0028: (0x7).to_bytes(8, "little"), 0x1010: b"\xff\xff\xff\xff"})
    result = emulate(bytes.fromhex("64f3480fb8042528000000"), regs(), cpu, memory)  # popcnt %fs:0x28,%rax
    assert result is not None and result.registers.rax == 3 and result.length == 11
    result = emulate(bytes.fromhex("65f30fb808"), regs(rax=0x1000), cpu, memory)  # popcnt %gs:(%rax),%ecx
    assert result is not None and result.registers.rcx == 32
    # Without the FS base the linear address is unknown: not emulated.
    assert emulate(bytes.fromhex("64f3480fb8042528000000"), regs(), LONG_MODE, memory) is None


def test_popcnt_unreadable_memory_is_not_emulated() -> None:
    assert emulate(bytes.fromhex("f30fb818"), regs(rax=0x5000), LONG_MODE, FakeMemory({})) is None


def test_popcnt_32_bit_mode_forms() -> None:
    cpu = CpuState(code_bits=32, cpl=0, cr0=CR0_PE, segment_bases={"ds": 0, "ss": 0x100})
    memory = FakeMemory({0x1000: b"\x0f\x00\x00\x00", 0x108: b"\x03\x00\x00\x00", 0x44: b"\x01\x01\x01\x01"})
    result = emulate(bytes.fromhex("f30fb81500100000"), regs(), cpu, memory)  # popcnt 0x1000,%edx
    assert result is not None and result.registers.rdx == 4 and result.length == 8
    result = emulate(bytes.fromhex("f30fb84504"), regs(rbp=4), cpu, memory)  # popcnt 0x4(%ebp),%eax: SS
    assert result is not None and result.registers.rax == 2
    result = emulate(bytes.fromhex("f30fb81cbe"), regs(rsi=4, rdi=0x10), cpu, memory)  # (%esi,%edi,4)
    assert result is not None and result.registers.rbx == 4
    result = emulate(bytes.fromhex("66f30fb8d1"), regs(rcx=0xFFFF, rdx=0xAB0000), cpu, no_memory)
    assert result is not None and result.registers.rdx == 0xAB0010  # popcnt %cx,%dx


def test_popcnt_16_bit_addressing() -> None:
    cpu = CpuState(code_bits=16, cpl=0, cr0=0, segment_bases={"ds": 0x10000, "ss": 0x20000})
    memory = FakeMemory(
        {
            0x10000 + 0x30: b"\x07\x00",
            0x10000 + 0x1234: b"\xff\x00",
            0x20000 + 0x102: b"\x01\x80",
            0x10000 + 0x40: b"\xff\xff\xff\xff",
        }
    )
    result = emulate(bytes.fromhex("f30fb84010"), regs(rbx=0x10, rsi=0x10), cpu, memory)
    assert result is not None and result.registers.rax & 0xFFFF == 3  # popcnt 0x10(%bx,%si),%ax
    result = emulate(bytes.fromhex("f30fb80e3412"), regs(), cpu, memory)  # popcnt 0x1234,%cx
    assert result is not None and result.registers.rcx == 8 and result.length == 6
    result = emulate(bytes.fromhex("f30fb84602"), regs(rbp=0x100), cpu, memory)  # popcnt 0x2(%bp),%ax: SS
    assert result is not None and result.registers.rax == 2
    result = emulate(bytes.fromhex("6766f30fb808"), regs(rax=0x40), cpu, memory)  # popcnt (%eax),%ecx
    assert result is not None and result.registers.rcx == 32 and result.length == 6


def test_popcnt_rejects_ambiguous_and_locked() -> None:
    assert emulate(bytes.fromhex("f2f30fb8c1"), regs(), LONG_MODE, no_memory) is None
    locked = emulate(bytes.fromhex("f0f30fb8c1"), regs(), LONG_MODE, no_memory)
    assert locked is not None and locked.exception is not None and locked.exception.vector == 6
    assert emulate(bytes.fromhex("0fb8c1"), regs(), LONG_MODE, no_memory) is None  # JMPE, not popcnt


def test_rex_before_legacy_prefix_is_ignored() -> None:
    # 48 66 f3 0f b8 c1: the REX.W is followed by a legacy prefix, so it does not count: 16-bit.
    result = emulate(bytes.fromhex("4866f30fb8c1"), regs(rcx=MASK64, rax=0), LONG_MODE, no_memory)
    assert result is not None and result.registers.rax == 16 and result.length == 6


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "encoding",
    [
        "0fae20",  # xsave (%rax)
        "0fae28",  # xrstor (%rax)
        "db00",  # fildl (%rax)
        "90",  # nop: KVM's business, not ours
        "0f0b",  # ud2
        "",  # no bytes at all
        "f3",  # truncated after a prefix
        "f30fb8",  # truncated before ModRM
        "f30fb884cb7856",  # truncated displacement
        "66" * 14 + "f30fb8c1",  # longer than 15 bytes
    ],
)
def test_unknown_or_malformed_bytes_are_not_emulated(encoding: str) -> None:
    assert emulate(bytes.fromhex(encoding), regs(), LONG_MODE, no_memory) is None


def test_trap_flag_and_vm86_are_not_emulated() -> None:
    for flag in (RFLAGS_TF, 1 << 17):  # single-step trap, virtual-8086 mode
        assert emulate(bytes.fromhex("0f01ca"), RegisterFile(rflags=0x2 | flag), LONG_MODE, no_memory) is None


# ----------------------------------------------------------------------------- helpers


def test_code_bits_from_cs() -> None:
    assert code_bits_from_cs(True, True, False) == 64
    assert code_bits_from_cs(True, False, True) == 32  # compatibility mode
    assert code_bits_from_cs(False, False, True) == 32
    assert code_bits_from_cs(False, False, False) == 16


def test_failure_instruction_bytes_from_exit_data() -> None:
    raw = bytes([3]) + bytes.fromhex("0f01ca") + bytes(12)
    data = [1, int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")]
    assert failure_instruction_bytes(3, data) == bytes.fromhex("0f01ca")
    assert failure_instruction_bytes(3, [0, *data[1:]]) is None  # flag not set
    assert failure_instruction_bytes(1, data) is None


def test_guest_reader_splits_at_page_boundaries() -> None:
    memory = GuestMemory.flat(0x10000)
    memory.write(0x3FFC, b"\x01\x02\x03\x04")  # the first half, physical page 3
    memory.write(0x8000, b"\x05\x06\x07\x08")  # the second half, physical page 8
    mapping = {0x7000_0000: 0x3000, 0x7000_1000: 0x8000}

    def translate(linear: int) -> int | None:
        page = mapping.get(linear & ~0xFFF)
        return None if page is None else page + (linear & 0xFFF)

    read_guest = guest_reader(translate, memory.read)
    assert read_guest(0x7000_0FFC, 8) == bytes(range(1, 9))
    assert read_guest(0x7000_1FFC, 8) is None  # second page unmapped

    def outside_ram(physical: int, size: int) -> bytes:
        raise GuestMemoryError("not RAM")

    assert guest_reader(lambda linear: linear, outside_ram)(0x1000, 4) is None
    # popcnt through the reader: an operand that straddles two pages
    result = emulate(bytes.fromhex("f3480fb818"), regs(rax=0x7000_0FFC), LONG_MODE, read_guest)
    assert result is not None and result.registers.rbx == bin(0x0807060504030201).count("1")


def test_register_file_kvm_round_trip() -> None:
    class KvmRegs:
        pass

    source = KvmRegs()
    for index, name in enumerate(
        (
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
            "rip",
            "rflags",
        )
    ):
        setattr(source, name, index + 1)
    registers = RegisterFile.from_kvm(source)
    assert (registers.rbx, registers.rip, registers.rflags) == (2, 17, 18)
    target = KvmRegs()
    registers.to_kvm(target)
    assert vars(target) == vars(source)
    assert RegisterFile.from_mapping({**vars(source), "extra": 1}) == registers
    assert registers.as_dict() == vars(source)


@pytest.mark.skipif(
    shutil.which("as") is None or shutil.which("objcopy") is None,
    reason="GNU as/objcopy (binutils) not installed: no independent encoder",
)
def test_encodings_match_gnu_as(tmp_path: Path) -> None:
    """Every 64-bit memory form above is what GNU as produces for its assembly text."""
    for assembly, encoding, *_ in MEMORY_FORMS_64:
        if " with " in assembly:
            continue
        source, obj, binary = tmp_path / "i.s", tmp_path / "i.o", tmp_path / "i.bin"
        source.write_text(f".code64\n{assembly}\n")
        subprocess.run(["as", "--64", str(source), "-o", str(obj)], check=True, timeout=30)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(binary)], check=True, timeout=30)
        assert binary.read_bytes().hex() == encoding, assembly
