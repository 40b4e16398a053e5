"""What the exit debugger's command arguments mean: gdb's `x/NFU` formats, address and value
expressions (`$rsp+8`), memory lines and disassembly. Pure functions, tested without KVM
(tests/unit/test_debug_repl.py); hypervisor/debug/repl.py runs the commands.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hypervisor.errors import HypervisorError
from hypervisor.kvm.vcpu import GPR_NAMES

if TYPE_CHECKING:
    from hypervisor.kvm.registers import SystemRegisters

MAX_EXAMINE_BYTES = 64 * 1024
VALUE_MASK = (1 << 64) - 1
UNIT_SIZES = {"b": 1, "h": 2, "w": 4, "g": 8}  # gdb's unit letters (gdb manual, "Examining Memory")
NUMBER_FORMATS = "xduot"
FORMATS = NUMBER_FORMATS + "csi"
PER_LINE = {1: 8, 2: 8, 4: 4, 8: 2}
CR0_PE = 1  # SDM Vol. 3 §2.5
CAPSTONE_HINT = "install capstone for disassembly: pip install 'pyhv[disasm]' (or pip install capstone)"


class DebugCommandError(HypervisorError):
    """A debugger command that cannot be carried out as typed (one line for the user)."""

    exit_status = 3


# -- pure parsing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExamineFormat:
    """gdb's `x/NFU`: count, format letter, unit size; `virtual` reads through the page tables."""

    count: int = 1
    format: str = "x"
    unit: int = 4
    virtual: bool = False


def parse_examine(argument: str) -> tuple[ExamineFormat, str]:
    """`/4xw 0x1000` (what follows `x`) to the format and the address text. gdb's letters: format
    x d u o t c s i, unit b h w g; `v` (or a `-v` word) means a virtual address."""
    text = argument.strip()
    count, format_letter, unit, virtual = 1, None, None, False
    if text.startswith("/"):
        spec, _, text = text[1:].partition(" ")
        # gdb puts the count first (x/4xw); `v` may come anywhere (x/v4xb, x/4xbv).
        match = re.fullmatch(r"(v?)(\d*)([a-z]*)", spec)
        if match is None:
            raise DebugCommandError(f"x/{spec}: expected x/<count><format><unit>, e.g. x/4xw or x/8xb")
        virtual = bool(match.group(1))
        if match.group(2):
            count = int(match.group(2))
        for letter in match.group(3):
            if letter in FORMATS:
                if format_letter is not None and format_letter != letter:
                    raise DebugCommandError(f"x/{spec}: two formats ({format_letter} and {letter})")
                format_letter = letter
            elif letter in UNIT_SIZES:
                if unit is not None and unit != UNIT_SIZES[letter]:
                    raise DebugCommandError(f"x/{spec}: two unit sizes")
                unit = UNIT_SIZES[letter]
            elif letter == "v":
                virtual = True
            else:
                raise DebugCommandError(
                    f"x/{spec}: unknown letter {letter!r} (formats {FORMATS}, units bhwg, v for virtual)"
                )
    words = text.split()
    if words[:1] == ["-v"]:
        virtual, words = True, words[1:]
    if not words:
        raise DebugCommandError("x wants an address, e.g. x/4xw 0x1000 or x/8i $rip")
    if count < 1 or count > MAX_EXAMINE_BYTES:
        raise DebugCommandError(f"x: the count must be 1 to {MAX_EXAMINE_BYTES}")
    format_letter = format_letter or "x"
    if format_letter == "c":
        unit = 1
    size = unit or 4
    if format_letter not in "si" and count * size > MAX_EXAMINE_BYTES:
        raise DebugCommandError(f"x: at most {MAX_EXAMINE_BYTES} bytes at a time")
    return ExamineFormat(count, format_letter, size, virtual), " ".join(words)


_TERM = re.compile(r"\s*([+-]?)\s*(\$?[A-Za-z0-9_]+)\s*")


def evaluate(text: str, registers: dict[str, int] | None = None) -> int:
    """A number, `$reg`, or a sum of them (`$rsp+8`, `0x1000-0x10`), modulo 2**64."""
    text = text.strip()
    if not text:
        raise DebugCommandError("expected a number or $register")
    position, total = 0, 0
    while position < len(text):
        match = _TERM.match(text, position)
        if match is None or match.end() == position or (position and not match.group(1)):
            raise DebugCommandError(f"cannot read {text!r}: use numbers, $registers, + and -")
        sign, term = match.groups()
        if term.startswith("$"):
            name = term[1:].lower()
            if registers is None or name not in registers:
                raise DebugCommandError(f"unknown register {term!r} (one of {', '.join(GPR_NAMES)})")
            value = registers[name]
        else:
            try:
                value = int(term, 0)
            except ValueError:
                raise DebugCommandError(f"{term!r} is not a number (write 0x2a, 42 or 0b101010)") from None
        total += -value if sign == "-" else value
        position = match.end()
    return total & VALUE_MASK


def parse_set_memory(words: list[str]) -> tuple[int, bool, str, str]:
    """`mem[/bhwg][v] [-v] ADDR VALUE` to (unit size, virtual, address text, value text); a value
    `hex:4142` writes those bytes as they are."""
    head, _, spec = words[0].partition("/")
    unit, virtual = 1, False
    for letter in spec:
        if letter in UNIT_SIZES:
            unit = UNIT_SIZES[letter]
        elif letter == "v":
            virtual = True
        else:
            raise DebugCommandError(f"set {words[0]}: unknown letter {letter!r} (units bhwg, v for virtual)")
    rest = words[1:]
    if rest[:1] == ["-v"]:
        virtual, rest = True, rest[1:]
    if len(rest) != 2:
        raise DebugCommandError("set mem wants an address and a value: set mem 0x1002 42, set mem/w 0x2000 0x1234")
    return unit, virtual, rest[0], rest[1]


def format_unit(value: int, letter: str, size: int) -> str:
    if letter == "x":
        return f"0x{value:0{size * 2}x}"
    if letter == "d":
        return str(value - (1 << (8 * size)) if value >> (8 * size - 1) else value)
    if letter == "u":
        return str(value)
    if letter == "o":
        return f"0{value:o}"
    if letter == "t":
        return f"{value:0{size * 8}b}"
    return repr(chr(value)) if 32 <= value < 127 else f"'\\x{value:02x}'"  # c


def format_memory(address: int, data: bytes, fmt: ExamineFormat) -> list[str]:
    """gdb-style lines: `0x1000: 0x12 0x34 ...`, a fixed number of units per line."""
    per_line = PER_LINE[fmt.unit]
    lines = []
    for line_start in range(0, len(data), fmt.unit * per_line):
        units = []
        for offset in range(line_start, min(len(data), line_start + fmt.unit * per_line), fmt.unit):
            value = int.from_bytes(data[offset : offset + fmt.unit], "little")
            units.append(format_unit(value, fmt.format, fmt.unit))
        lines.append(f"{address + line_start:#x}:\t" + "\t".join(units))
    return lines


def disassemble(code: bytes, address: int, bits: int, limit: int) -> list[str]:
    """Up to `limit` instructions with capstone, or a hex dump and how to get capstone."""
    try:
        import capstone  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        lines = [f"{address + offset:#x}:\t{code[offset : offset + 16].hex(' ')}" for offset in range(0, len(code), 16)]
        return [*lines, f"(no disassembler: {CAPSTONE_HINT})"]
    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
    engine = capstone.Cs(capstone.CS_ARCH_X86, mode)
    lines = []
    for instruction in engine.disasm(code, address):
        lines.append(f"{instruction.address:#x}:\t{instruction.bytes.hex(' '):<24}\t{instruction.mnemonic}\t"
                     f"{instruction.op_str}".rstrip())  # fmt: skip
        if len(lines) == limit:
            break
    if not lines:
        lines.append(f"{address:#x}:\t{code[:16].hex(' ')}\t(not a valid instruction)")
    return lines


def code_bits(sregs: SystemRegisters) -> int:
    """16, 32 or 64: the default operand size of the code segment (SDM Vol. 3 §3.4.5, CS.L/CS.D)."""
    if not sregs.cr0 & CR0_PE:
        return 16
    if sregs.cs.l:
        return 64
    return 32 if sregs.cs.db else 16
