"""Naming the instruction of an emulation failure and the kvm_pvm limits it may be (issue 14).

The built-in table is tested with capstone switched off; capstone's reading, where installed,
is checked on the same bytes (it is an optional extra). Encodings are GNU as output.
"""

from __future__ import annotations

import pytest

from hypervisor.vcpu import insn_names
from hypervisor.vcpu.insn_names import describe_instruction, known_host_limit


@pytest.fixture
def builtin_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(insn_names, "_capstone_text", lambda data, code_bits: None)


@pytest.mark.parametrize(
    ("encoding", "text"),
    [
        ("f0480fc70f", "lock cmpxchg16b [rdi]"),  # lock cmpxchg16b (%rdi)
        ("0fc70f", "cmpxchg8b [rdi]"),
        ("cd80", "int 0x80"),
        ("cc", "int3"),
        ("660f388208", "invpcid rcx, [rax]"),
        ("66440f38824c2410", "invpcid r9, [rsp + 0x10]"),
        ("0f01fd", "rdpru"),
        ("0f01d0", "xgetbv"),
        ("0f01c1", "vmcall"),
        ("0f01d9", "vmmcall"),
        ("0f01ca", "clac"),
        ("0faeac2440010000", "xrstor [rsp + 0x140]"),  # xrstor 0x140(%rsp)
        ("480fae2c24", "xrstor64 [rsp]"),
        ("0fae6500", "xsave [rbp]"),
        ("660fae30", "clwb [rax]"),
        ("64660fae7308", "clwb fs:[rbx + 0x8]"),
        ("660fae3f", "clflushopt [rdi]"),
        ("0faef0", "mfence"),
        ("f3480faec0", "rdfsbase rax"),
        ("f3480fb8c3", "popcnt rax, rbx"),
        ("f30fb80d10000000", "popcnt ecx, [rip + 0x10]"),
        ("66f3410fb8c0", "popcnt ax, r8w"),
        ("db0424", "fild dword [rsp]"),
        ("dbe2", "fnclex"),
        ("9b", "fwait"),
        ("0f77", "emms"),
        ("0fc7f0", "rdrand eax"),
        ("480fc7f8", "rdseed rax"),
        ("0f0138", "invlpg [rax]"),
        ("0f0b", "ud2"),
        ("0f05", "syscall"),
        ("c4e27df7c0", "VEX-encoded instruction (AVX, AVX2, BMI1, BMI2...)"),
        ("0f011425f0ffffff", "lgdt [0xfffffffffffffff0]"),
        ("0f38f007", "movbe eax, [rdi]"),  # movbe (%rdi),%eax
        ("480f38f107", "movbe [rdi], rax"),  # movbe %rax,(%rdi)
        ("6566440f38f114b3", "movbe gs:[rbx + rsi*4], r10w"),
        ("0f38f0c0", "movbe eax, eax"),  # no such instruction (#UD), named as the bytes read
        ("f20f38f007", "crc32 eax, byte [rdi]"),  # crc32b (%rdi),%eax
        ("66f20f38f107", "crc32 eax, [rdi]"),  # crc32w (%rdi),%eax
        ("f2480f38f0c1", "crc32 rax, r8"),  # crc32b %cl,%rax
    ],
)
def test_builtin_names(builtin_only: None, encoding: str, text: str) -> None:
    assert describe_instruction(bytes.fromhex(encoding)) == text


def test_builtin_32_bit_code(builtin_only: None) -> None:
    assert describe_instruction(bytes.fromhex("660f388208"), 32) == "invpcid ecx, [rax]"
    assert describe_instruction(bytes.fromhex("f30fb8c3"), 32) == "popcnt eax, ebx"
    # 0x48 is DEC EAX outside 64-bit mode, not REX.W: unknown to the table
    assert describe_instruction(bytes.fromhex("48"), 32) == "unknown instruction (48)"


@pytest.mark.parametrize("encoding", ["", "0f", "0f01", "cd", "660f3882", "f0f0f0", "ff", "0faeac24"])
def test_truncated_and_unknown_bytes_never_raise(builtin_only: None, encoding: str) -> None:
    text = describe_instruction(bytes.fromhex(encoding))
    assert text in ("no instruction bytes",) or text.startswith("unknown instruction")
    assert known_host_limit(bytes.fromhex(encoding)) is None


def test_every_byte_string_gets_a_name(builtin_only: None) -> None:
    """No byte sequence makes the namer raise: it runs on whatever a guest left in memory."""
    for first in range(256):
        for second in (0x00, 0x01, 0x0F, 0x38, 0xAE, 0xC7, 0xFF):
            data = bytes([first, second, 0x04, 0x24, 0xFF, 0xFF, 0xFF, 0xFF])
            assert describe_instruction(data)
            known_host_limit(data)


def test_capstone_reading_when_installed() -> None:
    pytest.importorskip("capstone", reason="capstone (optional extra) is not installed")
    assert describe_instruction(bytes.fromhex("f0480fc70f")) == "lock cmpxchg16b xmmword ptr [rdi]"
    assert describe_instruction(bytes.fromhex("0f01c1")) == "vmcall"
    # capstone does not know RDPRU: the built-in table names it
    assert describe_instruction(bytes.fromhex("0f01fd")) == "rdpru"


@pytest.mark.parametrize("encoding", ["0faeac2440010000", "480fae2c24", "0fae6500", "0f01d1", "0fc76500"])
def test_xsave_family_is_a_known_limit(encoding: str) -> None:
    limit = known_host_limit(bytes.fromhex(encoding))
    assert limit is not None and "XSAVE" in limit and "noxsave" in limit


@pytest.mark.parametrize("encoding", ["0f01c1", "0f01d9"])
def test_hypercalls_are_a_known_limit(encoding: str) -> None:
    limit = known_host_limit(bytes.fromhex(encoding))
    assert limit is not None and "hypercall" in limit


@pytest.mark.parametrize(
    ("encoding", "name"),
    [("f0480fc70f", "cmpxchg16b"), ("cd80", "int imm8"), ("660f388208", "invpcid"), ("0f01d0", "xgetbv"),
     ("660fae30", "clwb"), ("0f01fd", "rdpru"), ("cc", "int3"), ("f3480fb8c3", "popcnt"), ("9b", "fwait"),
     ("0f38f107", "movbe")],
)  # fmt: skip
def test_instructions_pyhv_emulates_say_so(encoding: str, name: str) -> None:
    limit = known_host_limit(bytes.fromhex(encoding))
    assert limit is not None and f"cannot emulate {name} at CPL0" in limit and "pyhv emulates it" in limit


@pytest.mark.parametrize(
    ("encoding", "numbers"),
    [("0fc7f0", "158"), ("480fc7f8", "306"), ("f3480faec0", "288"), ("c4e27df7c0", "156,293,291,296")],
)
def test_features_a_kernel_can_hide_name_the_clearcpuid_numbers(encoding: str, numbers: str) -> None:
    limit = known_host_limit(bytes.fromhex(encoding))
    assert limit is not None and f"clearcpuid={numbers}" in limit


def test_x87_arithmetic_is_a_known_limit() -> None:
    limit = known_host_limit(bytes.fromhex("db0424"))  # fild dword [rsp]
    assert limit is not None and "x87" in limit


@pytest.mark.parametrize("encoding", ["0f01f8", "0f0b", "0fa2", "90"])
def test_other_instructions_are_not_claimed_as_host_limits(encoding: str) -> None:
    assert known_host_limit(bytes.fromhex(encoding)) is None


def test_failure_line_on_a_kvm_pvm_host(builtin_only: None) -> None:
    from hypervisor.vcpu.insn_names import describe_failure

    data = bytes.fromhex("f0480fc70f")
    line = describe_failure(data, 0xFFFF_FFFF_8100_0000, refusal="the operand is not mapped", pvm_host=True)
    assert line.startswith("KVM could not emulate lock cmpxchg16b [rdi] (f0 48 0f c7 0f) at rip 0xffffffff81000000")
    assert "pyhv's emulator did not either: the operand is not mapped" in line
    assert "kvm_pvm's KVM cannot emulate cmpxchg16b at CPL0" in line
    assert "\n" not in line


def test_failure_line_on_hardware_virtualization_names_no_host_limit(builtin_only: None) -> None:
    from hypervisor.vcpu.insn_names import describe_failure

    line = describe_failure(bytes.fromhex("0faeac2440010000"), 0x1000)
    assert line == "KVM could not emulate xrstor [rsp + 0x140] (0f ae ac 24 40 01 00 00) at rip 0x1000"
