"""The exit breakpoint expression language (hypervisor/debug/break_expr.py), without KVM: every
form, what the resulting breakpoints match, and many bad inputs (one line each, never a crash)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.debug.break_expr import (
    BreakExpressionError,
    RegisterCondition,
    describe_keywords,
    parse_break_expression,
)
from hypervisor.debug.pdb_break import pdb_action
from hypervisor.errors import ConfigError
from hypervisor.vcpu.breakpoints import Breakpoint
from hypervisor.vcpu.events import Halt, MmioAccess, PortIo


def breakpoint_from(keywords: dict[str, Any]) -> Breakpoint:
    """What Machine.break_on builds from the keywords (port is an io address)."""
    keywords = dict(keywords)
    port = keywords.pop("port", None)
    if port is not None:
        keywords["address"] = port
    return Breakpoint(**keywords)


def port_io(port: int = 0x3F8, is_write: bool = True, data: bytes = b"A", vcpu: int = 0) -> PortIo:
    return PortIo(vcpu, port, len(data), 1, is_write, data, "COM1", port - 0x3F8)


def mmio(address: int, is_write: bool = False, data: bytes = bytes(4)) -> MmioAccess:
    return MmioAccess(0, address, len(data), is_write, data, "window", address & 0xFFF)


class FakeContext:
    def __init__(self, **registers: int) -> None:
        self.registers = {"rax": 0, "rbx": 0, "rip": 0x1000} | registers

    def regs(self) -> dict[str, int]:
        return self.registers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("io port=0x3f8 write", {"kind": "io", "port": 0x3F8, "is_write": True}),
        ("io port=0x3f8 write count=3", {"kind": "io", "port": 0x3F8, "is_write": True, "count": 3}),
        ("mmio addr=0xd0000000..0xd0000fff read", {"kind": "mmio", "address": (0xD000_0000, 0xD000_0FFF),
                                                   "is_write": False}),
        ("hlt", {"kind": "hlt"}),
        ("shutdown", {"kind": "shutdown"}),
        ("debug", {"kind": "debug"}),
        ("emulation-failure", {"kind": "emulation-failure"}),
        ("count>1000", {"count": 1001}),
        ("count>=1000", {"count": 1000}),
        ("count=1", {"count": 1}),
        ("vcpu=1", {"vcpu": 1}),
        ("size=4", {"size": 4}),
        ("data=0x41", {"data": 0x41}),
        ("io 0x3f8 out", {"kind": "io", "port": 0x3F8, "is_write": True}),
        ("io 0x3f8..0x3ff in", {"kind": "io", "port": (0x3F8, 0x3FF), "is_write": False}),
        ("mmio 0xd0000008", {"kind": "mmio", "address": 0xD000_0008}),
        ("addr=0xfee00000", {"kind": "mmio", "address": 0xFEE0_0000}),
        ("port=0x501", {"kind": "io", "port": 0x501}),
        ("io addr=0x70..0x71", {"kind": "io", "address": (0x70, 0x71)}),
        ("port=0x3f8..0x3f8", {"kind": "io", "port": 0x3F8}),
        ("  IO   PORT=1016   WRITE  ", {"kind": "io", "port": 1016, "is_write": True}),
        ("io port=0x3f8 write size=1 data=0x41 vcpu=0 count>2",
         {"kind": "io", "port": 0x3F8, "is_write": True, "size": 1, "data": 0x41, "vcpu": 0, "count": 3}),
        ("data=1_000", {"data": 1000}),
        ("size=8 data=0xffffffffffffffff", {"size": 8, "data": (1 << 64) - 1}),
    ],
)  # fmt: skip
def test_every_form(text: str, expected: dict[str, Any]) -> None:
    assert parse_break_expression(text) == expected
    breakpoint_from(parse_break_expression(text))  # Breakpoint accepts what the parser makes


def test_the_third_write_to_com1() -> None:
    breakpoint = breakpoint_from(parse_break_expression("io port=0x3f8 write count=3"))
    assert breakpoint.matches(port_io())
    assert not breakpoint.matches(port_io(is_write=False))
    assert not breakpoint.matches(port_io(port=0x3FD))
    assert not breakpoint.matches(Halt(0))
    assert breakpoint.count == 3  # the runner counts hits and stops from the third on


def test_an_mmio_window_matches_overlapping_reads_only() -> None:
    breakpoint = breakpoint_from(parse_break_expression("mmio addr=0xd0000000..0xd0000fff read"))
    assert breakpoint.matches(mmio(0xD000_0008))
    assert breakpoint.matches(mmio(0xCFFF_FFFE))  # a 4-byte read overlapping the window's start
    assert not breakpoint.matches(mmio(0xD000_0008, is_write=True))
    assert not breakpoint.matches(mmio(0xD000_1000))
    assert not breakpoint.matches(port_io(is_write=False))


def test_data_size_and_vcpu_filters() -> None:
    breakpoint = breakpoint_from(parse_break_expression("io port=0x3f8 data=0x41 size=1 vcpu=1"))
    assert breakpoint.matches(port_io(data=b"A", vcpu=1))
    assert not breakpoint.matches(port_io(data=b"B", vcpu=1))
    assert not breakpoint.matches(port_io(data=b"A", vcpu=0))


def test_register_conditions_read_the_vcpu_at_the_exit() -> None:
    keywords = parse_break_expression("io port=0x3f8 rax=7 rbx!=0 rip>=0x1000 rip<0x2000")
    condition = keywords["condition"]
    assert isinstance(condition, RegisterCondition)
    event = port_io()
    assert condition(event, FakeContext(rax=7, rbx=1))  # type: ignore[arg-type]
    assert not condition(event, FakeContext(rax=8, rbx=1))  # type: ignore[arg-type]
    assert not condition(event, FakeContext(rax=7, rbx=0))  # type: ignore[arg-type]
    assert not condition(event, FakeContext(rax=7, rbx=1, rip=0x2000))  # type: ignore[arg-type]
    assert "rax=0x7" in describe_keywords(keywords)
    for op, value, expected in (("<=", 7, True), (">", 7, False), ("<", 8, True), (">=", 8, False)):
        test = parse_break_expression(f"rax{op}{value}")["condition"]
        assert test(event, FakeContext(rax=7)) is expected  # type: ignore[arg-type]


def test_pdb_word_sets_the_pdb_action() -> None:
    assert parse_break_expression("io port=0x3f8 write pdb")["action"] is pdb_action
    assert describe_keywords(parse_break_expression("hlt pdb")) == "hlt pdb"


def test_describe_gives_the_expression_back() -> None:
    text = "io port=0x3f8 write size=1 count=3"
    assert describe_keywords(parse_break_expression(text)) == "io port=0x3f8 write size=1 count=3"
    assert describe_keywords(parse_break_expression("mmio 0xd0000000..0xd0000fff read")) == (
        "mmio addr=0xd0000000..0xd0000fff read"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty expression"),
        ("   ", "empty expression"),
        ("frobnicate", "unknown word 'frobnicate'"),
        ("io mmio", "one kind"),
        ("io io", "given twice"),
        ("write read", "contradicts"),
        ("write write", "given twice"),
        ("hlt write", "hlt exits have no port"),
        ("shutdown size=4", "no port, address"),
        ("debug port=0x3f8", "already says debug"),
        ("port=0x10000", "larger than 0xffff"),
        ("io addr=0x10000", "larger than 0xffff"),
        ("addr=0x10000000000000", "larger than"),
        ("port=5..3", "is empty"),
        ("port=", "is not a number"),
        ("port=0x3g8", "is not a number"),
        ("port=..5", "is not a number"),
        ("port=1..", "is not a number"),
        ("port=1...2", "is not a number"),
        ("port=-1", "must not be negative"),
        ("port>1", "takes =, not >"),
        ("size!=1", "takes =, not !="),
        ("size=3", "1, 2, 4 or 8"),
        ("size=16", "larger than"),
        ("size=1 data=0x100", "does not fit"),
        ("data=0x10000000000000000", "larger than"),
        ("count=0", "number 1"),
        ("count>=0", "number 1"),
        ("count<5", "count takes"),
        ("count!=5", "count takes"),
        ("count=1 count=2", "contradicts"),
        ("vcpu=1024", "larger than"),
        ("vcpu=1 vcpu=2", "contradicts"),
        ("io port=1 port=2", "already has a port"),
        ("io port=1 0x3f8", "already has a port"),
        ("0x3f8", "needs io or mmio"),
        ("hlt 0x3f8", "needs io or mmio"),
        ("rax=", "is not a number"),
        ("rax=seven", "is not a number"),
        ("rax=0x10000000000000000", "larger than"),
        ("cr0=1", "unknown name 'cr0'"),
        ("=5", "unknown word"),
        ("a<b=c", "unknown name"),
        ("io\x00port=1", "control characters"),
        ("io port=0x3f8\x1b[2J", "control characters"),
        ("io " * 400, "limit is"),
        ("pdb pdb", "given twice"),
    ],
)
def test_bad_expressions_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(BreakExpressionError) as error:
        parse_break_expression(text)
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    assert isinstance(error.value, ConfigError) and isinstance(error.value, ValueError)
    assert error.value.exit_status == 3


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("iomdhltwrePp=<>!.x0123456789abf_ -$")), max_size=60))
def test_any_text_parses_or_fails_with_one_line(text: str) -> None:
    try:
        keywords = parse_break_expression(text)
    except BreakExpressionError as error:
        assert str(error) and "\n" not in str(error)
        return
    breakpoint_from(keywords)  # whatever parses is a breakpoint the table accepts


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(["io", "mmio"]),
    low=st.integers(0, 0xFFFF),
    span=st.integers(0, 0xFF),
    is_write=st.none() | st.booleans(),
    size=st.none() | st.sampled_from([1, 2, 4, 8]),
    count=st.none() | st.integers(1, 10**6),
)
def test_generated_expressions_mean_what_they_say(
    kind: str, low: int, span: int, is_write: bool | None, size: int | None, count: int | None
) -> None:
    high = min(low + span, 0xFFFF)
    words = [kind, f"{'port' if kind == 'io' else 'addr'}={low:#x}..{high:#x}"]
    if is_write is not None:
        words.append("write" if is_write else "read")
    if size is not None:
        words.append(f"size={size}")
    if count is not None:
        words.append(f"count>{count - 1}" if count > 1 else "count=1")
    keywords = parse_break_expression(" ".join(words))
    assert keywords["kind"] == kind
    assert keywords["port" if kind == "io" else "address"] == ((low, high) if high != low else low)
    assert keywords.get("is_write") == is_write and keywords.get("size") == size and keywords.get("count") == count


def test_pdb_without_a_terminal_stops_instead_of_hanging(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("c\n"))
    with caplog.at_level("WARNING"):
        assert pdb_action(port_io(), FakeContext()) is None  # type: ignore[arg-type]
    assert "stdin is not a terminal" in caplog.text
