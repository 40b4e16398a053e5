"""The exit breakpoint expression language: `io port=0x3f8 write count=3` to `machine.break_on(...)`.

One expression is a list of whitespace-separated words, each narrowing what the breakpoint
matches (docs/debugging.md, "Break expressions", is the user's reference):

    kind        io | mmio | hlt | shutdown | debug | emulation-failure | internal-error |
                system-event | fail-entry | run-error | other      (hypervisor.vcpu.events)
    direction   read | write   (in and out are accepted for io)
    port=P      an I/O port or an inclusive range P..Q; implies io
    addr=A      a guest physical MMIO address or range A..B; implies mmio unless io is given
    A or A..B   after io or mmio, the same as port= or addr=
    size=N      access width in bytes: 1, 2, 4 or 8
    data=V      the value written or read (little-endian, as the guest sees it)
    vcpu=N      only exits of vCPU N
    count=N     the Nth matching exit and every later one (gdb's ignore count plus one)
    count>N     the same as count=N+1;  count>=N  the same as count=N
    REG=V       a register condition read at the exit (rax..r15, rip, rflags); also != < <= > >=
    pdb         drop into pdb in the hypervisor process at a hit (hypervisor.debug.pdb_break)

Numbers are Python integer literals (0x3f8, 1016, 0b1, 1_000). The parser returns the keyword
arguments of `Machine.break_on`, so the same text works in `pyhv debug`, `pyhv debug --break`
and gdb's `monitor break-exit`. Every mistake is one BreakExpressionError line naming the word.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hypervisor.errors import ConfigError
from hypervisor.kvm.vcpu import GPR_NAMES
from hypervisor.vcpu.events import EVENT_KINDS

if TYPE_CHECKING:
    from hypervisor.vcpu.context import ExitContext
    from hypervisor.vcpu.events import ExitEvent

PORT_LIMIT = 0xFFFF  # x86 I/O space is 64 KiB (SDM Vol. 1 §18.3)
ADDRESS_LIMIT = (1 << 52) - 1  # the x86-64 physical address ceiling (SDM Vol. 1 §3.3.7.1)
VALUE_LIMIT = (1 << 64) - 1
ACCESS_SIZES = (1, 2, 4, 8)
VCPU_LIMIT = 1023  # KVM_CAP_MAX_VCPUS on current kernels is 1024 at most
MAX_EXPRESSION = 1000  # characters: an expression is typed, not generated
ACCESS_KINDS = ("io", "mmio")
DIRECTIONS = {"read": False, "write": True, "in": False, "out": True}
# Longest operators first, so that `<=` is not read as `<` followed by `=...`.
COMPARISONS: dict[str, Callable[[int, int], bool]] = {
    "!=": operator.ne, "<=": operator.le, ">=": operator.ge, "=": operator.eq, "<": operator.lt, ">": operator.gt,
}  # fmt: skip
KEYWORDS = ("port", "addr", "size", "data", "vcpu", "count")
WORDS = (*EVENT_KINDS, *DIRECTIONS, "pdb")  # for completion


class BreakExpressionError(ConfigError, ValueError):
    """An exit breakpoint expression that cannot be understood (one line, names the word)."""


class RegisterCondition:
    """`rax=7`-style conditions, all of which must hold; read from the vCPU at the exit."""

    def __init__(self, tests: list[tuple[str, str, int]]) -> None:
        self.tests = tests

    def __call__(self, event: ExitEvent, ctx: ExitContext) -> bool:
        regs = ctx.regs()
        return all(COMPARISONS[op](regs[name], value) for name, op, value in self.tests)

    def describe(self) -> str:
        return " ".join(f"{name}{op}{value:#x}" for name, op, value in self.tests)

    def __repr__(self) -> str:
        return f"RegisterCondition({self.describe()})"


def parse_number(text: str, what: str, limit: int = VALUE_LIMIT) -> int:
    """A non-negative integer literal no larger than `limit`, or one line saying what is wrong."""
    try:
        value = int(text, 0)
    except ValueError:
        raise BreakExpressionError(f"{what} {text!r} is not a number (write 0x3f8, 1016 or 0b1)") from None
    if value < 0:
        raise BreakExpressionError(f"{what} {text} must not be negative")
    if value > limit:
        raise BreakExpressionError(f"{what} {text} is larger than {limit:#x}")
    return value


def parse_range(text: str, what: str, limit: int) -> int | tuple[int, int]:
    """`A` or the inclusive range `A..B`."""
    low_text, dots, high_text = text.partition("..")
    low = parse_number(low_text, what, limit)
    if not dots:
        return low
    high = parse_number(high_text, what, limit)
    if low > high:
        raise BreakExpressionError(f"{what} range {text} is empty (its start is above its end)")
    return (low, high) if low != high else low


def _split_comparison(word: str) -> tuple[str, str, str] | None:
    for op in COMPARISONS:
        name, found, value = word.partition(op)
        if found and name and not any(other in name for other in "<>!="):
            return name, op, value
    return None


class _Parser:
    """Collects one expression's words into break_on's keyword arguments."""

    def __init__(self) -> None:
        self.result: dict[str, Any] = {}
        self.registers: list[tuple[str, str, int]] = []

    def set(self, key: str, value: Any, word: str) -> None:
        if key in self.result and self.result[key] != value:
            raise BreakExpressionError(f"{word!r} contradicts an earlier word of the expression")
        if key in self.result:
            raise BreakExpressionError(f"{word!r} is given twice")
        self.result[key] = value

    def set_kind(self, kind: str, word: str) -> None:
        current = self.result.get("kind")
        if current is not None and current != kind:
            raise BreakExpressionError(f"{word!r}: the expression already says {current}; an exit has one kind")
        self.result["kind"] = kind

    def word(self, word: str) -> None:
        lowered = word.lower()
        if lowered in EVENT_KINDS:
            if "kind" in self.result and self.result["kind"] == lowered:
                raise BreakExpressionError(f"{word!r} is given twice")
            self.set_kind(lowered, word)
        elif lowered in DIRECTIONS:
            self.set("is_write", DIRECTIONS[lowered], word)
        elif lowered == "pdb":
            from hypervisor.debug.pdb_break import pdb_action

            self.set("action", pdb_action, word)
        elif word[:1].isdigit():
            self.bare_address(word)
        elif (split := _split_comparison(word)) is not None:
            self.comparison(*split, word)
        else:
            raise BreakExpressionError(
                f"unknown word {word!r}: expected a kind ({', '.join(EVENT_KINDS)}), read or write, "
                f"or one of {', '.join(k + '=' for k in KEYWORDS)} or a register condition such as rax=7"
            )

    def bare_address(self, word: str) -> None:
        kind = self.result.get("kind")
        if kind not in ACCESS_KINDS:
            raise BreakExpressionError(f"{word!r}: a bare address needs io or mmio before it (or write port=/addr=)")
        self.address("port" if kind == "io" else "addr", word, word)

    def address(self, key: str, text: str, word: str) -> None:
        if "port" in self.result or "address" in self.result:
            raise BreakExpressionError(f"{word!r}: the expression already has a port or address")
        if key == "port":
            self.set_kind("io", word)
            self.result["port"] = parse_range(text, "port", PORT_LIMIT)
        else:
            if "kind" not in self.result:
                self.result["kind"] = "mmio"
            limit = PORT_LIMIT if self.result["kind"] == "io" else ADDRESS_LIMIT
            self.result["address"] = parse_range(text, "address", limit)

    def comparison(self, name: str, op: str, text: str, word: str) -> None:
        key = name.lower()
        if key == "count":
            self.count(op, text, word)
            return
        if key in ("port", "addr", "address", "size", "data", "vcpu") and op != "=":
            raise BreakExpressionError(f"{word!r}: {key} takes =, not {op}")
        if key in ("port", "addr", "address"):
            self.address("port" if key == "port" else "addr", text, word)
        elif key == "size":
            size = parse_number(text, "size", 8)
            if size not in ACCESS_SIZES:
                raise BreakExpressionError(f"size {text}: an access is 1, 2, 4 or 8 bytes")
            self.set("size", size, word)
        elif key == "data":
            self.set("data", parse_number(text, "data"), word)
        elif key == "vcpu":
            self.set("vcpu", parse_number(text, "vcpu", VCPU_LIMIT), word)
        elif key in GPR_NAMES:
            self.registers.append((key, op, parse_number(text, key)))
        else:
            raise BreakExpressionError(
                f"unknown name {name!r} in {word!r}: use {', '.join(KEYWORDS)} or a register ({', '.join(GPR_NAMES)})"
            )

    def count(self, op: str, text: str, word: str) -> None:
        value = parse_number(text, "count")
        if op == ">":
            value += 1
        elif op not in ("=", ">="):
            raise BreakExpressionError(f"{word!r}: count takes =, > or >= (count=3, count>1000)")
        if value < 1:
            raise BreakExpressionError(f"{word!r}: the first matching exit is number 1")
        self.set("count", value, word)

    def finish(self) -> dict[str, Any]:
        result = self.result
        kind = result.get("kind")
        access_words = [key for key in ("port", "address", "is_write", "size", "data") if key in result]
        if access_words and kind not in (None, *ACCESS_KINDS):
            raise BreakExpressionError(f"{kind} exits have no port, address, direction, size or data")
        size, data = result.get("size"), result.get("data")
        if size is not None and data is not None and data >> (8 * size):
            raise BreakExpressionError(f"data={data:#x} does not fit in a {size}-byte access")
        if self.registers:
            result["condition"] = RegisterCondition(self.registers)
        return result


def parse_break_expression(text: str) -> dict[str, Any]:
    """The keyword arguments of `Machine.break_on` for `text`; BreakExpressionError if bad.

    >>> parse_break_expression("io port=0x3f8 write count>2")
    {'kind': 'io', 'port': 1016, 'is_write': True, 'count': 3}
    """
    if len(text) > MAX_EXPRESSION:
        raise BreakExpressionError(f"the expression is {len(text)} characters long; the limit is {MAX_EXPRESSION}")
    if not text.isprintable():
        raise BreakExpressionError("the expression contains control characters")
    words = text.split()
    if not words:
        raise BreakExpressionError("empty expression: say which exits to stop at, e.g. `io port=0x3f8 write`")
    parser = _Parser()
    for word in words:
        parser.word(word)
    return parser.finish()


def describe_keywords(keywords: dict[str, Any]) -> str:
    """The expression back from parse_break_expression's result (for listings and messages)."""
    parts = [str(keywords.get("kind", "any"))]
    for key, name in (("port", "port"), ("address", "addr")):
        value = keywords.get(key)
        if isinstance(value, tuple):
            parts.append(f"{name}={value[0]:#x}..{value[1]:#x}")
        elif value is not None:
            parts.append(f"{name}={value:#x}")
    if "is_write" in keywords:
        parts.append("write" if keywords["is_write"] else "read")
    for key in ("size", "vcpu", "count"):
        if key in keywords:
            parts.append(f"{key}={keywords[key]}")
    if "data" in keywords:
        parts.append(f"data={keywords['data']:#x}")
    condition = keywords.get("condition")
    if isinstance(condition, RegisterCondition):
        parts.append(condition.describe())
    if keywords.get("action") is not None:
        parts.append("pdb")
    return " ".join(parts)
