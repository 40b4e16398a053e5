"""The exit debugger's command parsing and commands without KVM: the pure parsers
(hypervisor/debug/repl_syntax.py), then ExitDebugger (hypervisor/debug/repl.py) over a stand-in
machine with real guest memory, a real bus and a real breakpoint table (the KVM side is
tests/kvm/test_pyhv_debug.py)."""

from __future__ import annotations

import io
import queue
import sys
import threading
from collections import deque
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.debug.repl import ExitDebugger
from hypervisor.debug.repl_syntax import (
    DebugCommandError,
    ExamineFormat,
    code_bits,
    disassemble,
    evaluate,
    format_memory,
    format_unit,
    parse_examine,
    parse_set_memory,
)
from hypervisor.devices.bus import Bus
from hypervisor.kvm.exits import ExitReason
from hypervisor.kvm.ffi import ffi
from hypervisor.kvm.registers import SystemRegisters
from hypervisor.kvm.stats import MAX_EXIT_REASONS, VcpuStats
from hypervisor.kvm.vcpu import GPR_NAMES
from hypervisor.memory import GuestMemory
from hypervisor.outcome import Outcome, OutcomeKind
from hypervisor.vcpu.breakpoints import Breakpoint, BreakpointTable
from hypervisor.vcpu.control import Stop
from hypervisor.vcpu.events import PortIo

# -- the pure parsers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "expected", "address"),
    [
        ("/4xw 0x1000", ExamineFormat(4, "x", 4), "0x1000"),
        ("/8xb 0x1000", ExamineFormat(8, "x", 1), "0x1000"),
        ("/2g $rsp", ExamineFormat(2, "x", 8), "$rsp"),
        ("/3dh 16", ExamineFormat(3, "d", 2), "16"),
        ("/s 0x2000", ExamineFormat(1, "s", 4), "0x2000"),
        ("/5i $rip", ExamineFormat(5, "i", 4), "$rip"),
        ("/c 0x10", ExamineFormat(1, "c", 1), "0x10"),
        ("/v4xb 0x1000", ExamineFormat(4, "x", 1, True), "0x1000"),
        ("/4xbv 0x1000", ExamineFormat(4, "x", 1, True), "0x1000"),
        ("/4xb -v 0x1000", ExamineFormat(4, "x", 1, True), "0x1000"),
        (" 0x1000", ExamineFormat(1, "x", 4), "0x1000"),
        ("/bx $rsp + 8", ExamineFormat(1, "x", 1), "$rsp + 8"),
    ],
)
def test_examine_formats_like_gdb(argument: str, expected: ExamineFormat, address: str) -> None:
    assert parse_examine(argument) == (expected, address)


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("/4xw", "wants an address"),
        ("", "wants an address"),
        ("/4q 0x1000", "unknown letter 'q'"),
        ("/4xd 0x1000", "two formats"),
        ("/4bw 0x1000", "two unit sizes"),
        ("/0x 0x1000", "count must be"),
        ("/99999999g 0x1000", "count must be"),
        ("/20000g 0x1000", "at most"),
        ("/4-x 0x1000", "expected x/"),
        ("/4XW 0x1000", "expected x/"),
    ],
)
def test_bad_examine_formats(argument: str, message: str) -> None:
    with pytest.raises(DebugCommandError, match=message):
        parse_examine(argument)


def test_address_expressions() -> None:
    registers = {"rsp": 0x7000, "rip": 0x1158}
    assert evaluate("0x1000") == 0x1000
    assert evaluate("$rsp+8", registers) == 0x7008
    assert evaluate("$RSP - 0x10", registers) == 0x6FF0
    assert evaluate("$rip+1+2-3", registers) == 0x1158
    assert evaluate("0-1") == (1 << 64) - 1  # modulo 2**64, as registers are
    assert evaluate("1_000") == 1000
    for bad, message in (("", "expected"), ("$cr0", "unknown register"), ("0x1g", "not a number"),
                         ("1 2", "cannot read"), ("1+", "cannot read"), ("$rsp", "unknown register"),
                         ("1*2", "cannot read")):  # fmt: skip
        with pytest.raises(DebugCommandError, match=message):
            evaluate(bad, registers if bad != "$rsp" else None)


def test_set_memory_arguments() -> None:
    assert parse_set_memory(["mem", "0x1002", "42"]) == (1, False, "0x1002", "42")
    assert parse_set_memory(["mem/w", "0x1002", "42"]) == (4, False, "0x1002", "42")
    assert parse_set_memory(["mem/gv", "0x1002", "42"]) == (8, True, "0x1002", "42")
    assert parse_set_memory(["mem", "-v", "0x1002", "hex:4142"]) == (1, True, "0x1002", "hex:4142")
    with pytest.raises(DebugCommandError, match="unknown letter"):
        parse_set_memory(["mem/q", "1", "2"])
    with pytest.raises(DebugCommandError, match="an address and a value"):
        parse_set_memory(["mem", "1"])


def test_memory_lines_look_like_gdb() -> None:
    data = bytes(range(1, 17))
    assert format_memory(0x1000, data[:4], ExamineFormat(4, "x", 1)) == ["0x1000:\t0x01\t0x02\t0x03\t0x04"]
    assert format_memory(0x1000, data, ExamineFormat(4, "x", 4)) == [
        "0x1000:\t0x04030201\t0x08070605\t0x0c0b0a09\t0x100f0e0d"
    ]
    assert format_memory(0x1000, data, ExamineFormat(2, "x", 8)) == ["0x1000:\t0x0807060504030201\t0x100f0e0d0c0b0a09"]
    assert len(format_memory(0, bytes(20), ExamineFormat(20, "x", 1))) == 3  # 8 bytes per line
    assert format_unit(0xFF, "d", 1) == "-1" and format_unit(0xFF, "u", 1) == "255"
    assert format_unit(8, "o", 1) == "010" and format_unit(5, "t", 1) == "00000101"
    assert format_unit(0x41, "c", 1) == "'A'" and format_unit(0, "c", 1) == "'\\x00'"


def test_code_bits_follow_cs() -> None:
    sregs = SystemRegisters()
    assert code_bits(sregs) == 16  # real mode
    sregs = sregs.with_control("cr0", 1)
    assert code_bits(sregs) == 16
    sregs = sregs.with_segment("cs", db=1)
    assert code_bits(sregs) == 32
    sregs = sregs.with_segment("cs", l=1)
    assert code_bits(sregs) == 64


def test_disassembly_with_capstone_or_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    code = bytes.fromhex("ba f8 03 00 00 ee eb fe")  # mov edx, 0x3f8; out dx, al; jmp $
    try:
        import capstone  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        pass
    else:
        lines = disassemble(code, 0x1000, 32, 10)
        assert lines[0].startswith("0x1000:") and "mov" in lines[0] and "0x3f8" in lines[0]
        assert "out" in lines[1] and "jmp" in lines[2] and len(lines) == 3
        assert len(disassemble(code, 0x1000, 32, 2)) == 2
        assert "not a valid instruction" in disassemble(b"\x06", 0, 64, 1)[0]  # push es: invalid in 64-bit mode
    monkeypatch.setitem(sys.modules, "capstone", None)  # as if it were not installed
    lines = disassemble(code, 0x1000, 32, 10)
    assert lines[0] == "0x1000:\tba f8 03 00 00 ee eb fe"
    assert "pip install" in lines[-1] and "pyhv[disasm]" in lines[-1]


# -- the commands over a stand-in machine ----------------------------------------------------------


class FakeVcpu:
    def __init__(self, index: int) -> None:
        self.id = index
        self.registers = {name: 0 for name in GPR_NAMES} | {"rip": 0x1000, "rsp": 0x7000}
        self.sregs = SystemRegisters()
        self.exit_record = ffi.new("struct pyhv_exit *")

    def get_regs(self) -> dict[str, int]:
        return dict(self.registers)

    def set_regs(self, **values: int) -> None:
        for name, value in values.items():
            if name not in GPR_NAMES:
                raise ValueError(f"unknown register {name!r}")
            self.registers[name] = value

    def get_sregs(self) -> SystemRegisters:
        return self.sregs

    def read_stats(self) -> VcpuStats:
        reasons = [0] * MAX_EXIT_REASONS
        reasons[ExitReason.IO], reasons[ExitReason.HLT] = 5 + self.id, 1
        return VcpuStats(tuple(reasons), total_exits=6 + self.id, python_exits=2, pio_sink=4 + self.id)

    def translate(self, address: int) -> int | None:
        return address + 0x10000 if address < 0x10000 else None  # a fixed offset: virtual != physical


class FakeControl:
    def __init__(self) -> None:
        self.finished = threading.Event()
        self.outcome: Outcome | None = None
        self.queued: list[Stop] = []

    def pending_stops(self) -> list[Stop]:
        stops, self.queued = self.queued, []
        return stops

    def end(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.finished.set()


class Sink:
    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def write(self, offset: int, data: bytes) -> None:
        pass


class FakeMachine:
    """What ExitDebugger uses of Machine; steps and stops are scripted by the test."""

    def __init__(self) -> None:
        self.memory = GuestMemory([(0, 1 << 20)])
        self.vcpus = [FakeVcpu(0), FakeVcpu(1)]
        self.control = FakeControl()
        self.breakpoints = BreakpointTable()
        self.pio_bus = Bus("port I/O", 0x10000)
        self.pio_bus.insert(Sink(), 0x3F8, 8, "COM1")
        self.mmio_bus = Bus("MMIO", 1 << 52)
        self.exit_history: deque[Any] = deque(maxlen=16)
        self.exit_hooks: list[Any] = []
        self.steps: list[Any] = []
        self.stops: queue.Queue[Stop] = queue.Queue()
        self.last_step_stop: Stop | None = None
        self.resumed = 0
        self.saved: list[str] = []

    def break_on(self, kind: str | None = None, *, port: Any = None, address: Any = None, **rest: Any) -> Breakpoint:
        if port is not None:
            kind, address = "io", port
        return self.breakpoints.add(Breakpoint(kind, address, **rest))

    def delete_breakpoint(self, number: int) -> bool:
        return self.breakpoints.delete(number)

    def step_exit(self, vcpu_index: int = 0, timeout: float | None = None) -> Any:
        return self.steps.pop(0) if self.steps else None

    def resume(self) -> None:
        self.resumed += 1

    def save(self, path: str) -> None:
        self.saved.append(path)  # what `save PATH` asks of Machine.save (not the snapshot itself)

    def pause(self, wait: bool = True, timeout: float | None = None) -> bool:
        return True

    def wait_for_stop(self, timeout: float | None = None) -> Stop | None:
        try:
            return self.stops.get(timeout=timeout)
        except queue.Empty:
            return None

    def add_exit_hook(self, hook: Any) -> None:
        self.exit_hooks.append(hook)

    def remove_exit_hook(self, hook: Any) -> None:
        self.exit_hooks.remove(hook)


@pytest.fixture
def session() -> Any:
    machine = FakeMachine()
    output = io.StringIO()
    debugger = ExitDebugger(machine, output)  # type: ignore[arg-type]

    def run(line: str) -> str:
        start = output.tell()
        debugger.onecmd(line)
        output.seek(start)
        text = output.read()
        return text

    yield machine, debugger, run
    machine.memory.close()


def write(port: int, data: bytes, vcpu: int = 0) -> PortIo:
    return PortIo(vcpu, port, len(data), 1, True, data, "COM1", port - 0x3F8)


def test_break_info_and_delete(session: Any) -> None:
    machine, debugger, run = session
    text = run("break io port=0x3f8 write count=3")
    numbers = [bp.id for bp in machine.breakpoints]
    assert text == f"breakpoint {numbers[0]}: io port=0x3f8 write count=3\n"
    assert len(numbers) == 1 and machine.breakpoints._all[numbers[0]].count == 3
    run("b mmio 0xd0000000..0xd0000fff read")
    listing = run("info breakpoints")
    assert "io port=0x3f8 write count=3" in listing and "mmio 0xd0000000..0xd0000fff read" in listing
    assert run(f"delete {numbers[0]}") == f"deleted breakpoint {numbers[0]}\n"
    assert "no breakpoint" in run(f"delete {numbers[0]}")
    assert debugger.failure is not None
    run("d")
    assert len(machine.breakpoints) == 0 and run("info b") == "no breakpoints\n"
    assert "error: unknown word 'sideways'" in run("break io sideways")
    assert "error: empty expression" in run("break")


def test_next_prints_each_exit_and_stops_at_a_breakpoint(session: Any) -> None:
    machine, debugger, run = session
    machine.steps = [write(0x3FD, b"\x60"), write(0x3F8, b"h"), write(0x3F8, b"e")]
    text = run("next 2")
    assert text.splitlines() == ["vcpu0 io out port=0x3fd size=1 data=60 (COM1+0x5)",
                                 "vcpu0 io out port=0x3f8 size=1 data=68 (COM1+0x0)"]  # fmt: skip
    breakpoint = machine.break_on("io", port=0x3F8)
    machine.last_step_stop = Stop("breakpoint", 0, machine.steps[0], breakpoint)
    text = run("n 5")
    assert text.splitlines()[-1].startswith(f"stopped: breakpoint {breakpoint.id}: vcpu0 io out port=0x3f8")
    machine.last_step_stop = None
    # A stop queued during the step (the runner's order, or another vCPU) ends `next` too.
    machine.steps = [write(0x3F8, b"l")]
    machine.control.queued = [Stop("breakpoint", 1, write(0x3F8, b"x", vcpu=1), breakpoint)]
    assert run("next 4").splitlines()[-1].startswith(f"stopped: breakpoint {breakpoint.id}: vcpu1")
    assert machine.control.queued == []
    assert "made no exit" in run("next")  # nothing left: as if the guest spun without exits
    machine.control.end(Outcome(OutcomeKind.DEBUG_EXIT, code=7))
    assert "the run is over (debug-exit 7)" in run("next")
    assert "next: N must be" in run("next 0")


def test_continue_waits_for_the_next_stop(session: Any) -> None:
    machine, debugger, run = session
    event = write(0x3F8, b"l", vcpu=1)
    breakpoint = machine.break_on("io", port=0x3F8)
    machine.stops.put(Stop("breakpoint", 1, event, breakpoint))
    text = run("c")
    assert machine.resumed == 1 and text.startswith(f"stopped: breakpoint {breakpoint.id}: vcpu1 io out")
    assert debugger.vcpu_index == 1  # like gdb, the vCPU that stopped becomes the current one
    machine.control.end(Outcome(OutcomeKind.DEBUG_EXIT, code=42))
    machine.stops.put(Stop("finished"))
    debugger.vcpu_index = 0
    machine.control.finished.clear()
    assert run("continue") == "the run ended: debug-exit 42 (exit status 42)\n"


def test_registers_read_and_changed(session: Any) -> None:
    machine, debugger, run = session
    assert run("info regs rsp rip").splitlines() == ["rsp     0x0000000000007000  28672",
                                                     "rip     0x0000000000001000  4096"]  # fmt: skip
    assert len(run("info registers").splitlines()) == len(GPR_NAMES)
    assert run("set reg rax 0x2a") == "rax = 0x2a\n" and machine.vcpus[0].registers["rax"] == 42
    assert run("set reg $rsi $rsp+3") == "rsi = 0x7003\n"
    for bad, message in (("set reg cr0 1", "unknown register 'cr0'"), ("set reg rax", "wants a register"),
                         ("set reg rax banana", "not a number"), ("set", "set reg NAME"),
                         ("set frob 1 2", "set frob"), ("info regs r99", "unknown register")):  # fmt: skip
        assert message in run(bad), bad
    run("vcpu 1")
    run("set reg rbx 5")
    assert machine.vcpus[1].registers["rbx"] == 5 and machine.vcpus[0].registers["rbx"] == 0
    assert "no vcpu 2" in run("vcpu 2")


def test_memory_examined_and_changed(session: Any) -> None:
    machine, debugger, run = session
    machine.memory.write(0x1000, bytes.fromhex("eb0e0500") + b"hi\0")
    assert run("x/4xb 0x1000") == "0x1000:\t0xeb\t0x0e\t0x05\t0x00\n"
    assert run("x/s 0x1004") == "0x1004:\t'hi'\n"
    assert run("set mem 0x1002 42") == "wrote 1 byte at 0x1002\n"
    assert machine.memory.read(0x1002, 1) == bytes([42])
    assert run("set mem/w 0x2000 0x12345678") == "wrote 4 bytes at 0x2000\n"
    assert run("x/1xw 0x2000") == "0x2000:\t0x12345678\n"
    run("set mem 0x3000 hex:414243")
    assert machine.memory.read(0x3000, 3) == b"ABC"
    # Virtual addresses go through the vCPU's translation (here: physical = virtual + 0x10000).
    run("set mem/v 0x20 7")
    assert machine.memory.read(0x10020, 1) == b"\x07" and run("x/v1xb 0x20") == "0x20:\t0x07\n"
    assert "not mapped" in run("x/v4xb 0x20000")
    for bad, message in (("set mem 0x1000 256", "does not fit in 1 byte"), ("set mem 0x1000 hex:4", "hex:"),
                         ("x/4xb 0x40000000", "error:"), ("set mem 0x40000000 1", "error:"),
                         ("x/4xb $nope", "unknown register")):  # fmt: skip
        assert message in run(bad), bad


def test_info_exits_devices_and_sregs(session: Any) -> None:
    machine, debugger, run = session
    assert "port 0x03f8-0x03ff  COM1" in run("info devices")
    sregs = run("info sregs")
    assert "cs  selector 0x0000" in sregs and "efer" in sregs and "cr3" in sregs
    assert "unknown topic" in run("info nothing") and "info what?" in run("info")
    exits = run("info exits 0")  # the two vCPUs' counters summed, the most frequent reason first
    assert "exits: 13 in all, 4 reached Python, 9 port and 0 MMIO completed in C" in exits
    assert exits.index("IO") < exits.index("HLT") and "11" in exits


def test_trace_hooks_print_from_other_threads(session: Any) -> None:
    machine, debugger, run = session
    assert run("trace on") == "tracing exits\n" and len(machine.exit_hooks) == 1
    run("trace on")
    assert len(machine.exit_hooks) == 1  # not twice
    hook = machine.exit_hooks[0]
    thread = threading.Thread(target=hook, args=(write(0x3F8, b"A"), None))
    thread.start()
    thread.join()
    assert "trace: vcpu0 io out port=0x3f8 size=1 data=41" in debugger.stdout.getvalue()
    run("trace off")
    assert machine.exit_hooks == [] and "trace on or trace off" in run("trace sideways")


def test_help_aliases_and_unknown_commands(session: Any) -> None:
    machine, debugger, run = session
    text = run("help")
    for name in ("next", "continue", "break", "delete", "info", "x", "set", "disas", "trace", "vcpu", "quit"):
        assert f"\n  {name}" in text, name
    assert run("help next").startswith("next [N]: run the current vCPU")
    assert run("help n") == run("help next")
    assert "no command 'frob'" in run("help frob")
    assert "unknown command 'frob'" in run("frob 1 2")
    assert debugger.onecmd("quit") is True and debugger.onecmd("q") is True and debugger.onecmd("EOF") is True


def test_completion(session: Any) -> None:
    machine, debugger, run = session
    assert debugger.complete_info("re", "info re", 5, 7) == ["regs"]
    assert debugger.complete_info("rs", "info regs rs", 10, 12) == ["rsi", "rsp"]
    assert debugger.complete_set("r", "set r", 4, 5) == ["reg"]
    assert "rflags" in debugger.complete_set("rf", "set reg rf", 8, 10)
    assert debugger.complete_break("wr", "break wr", 6, 8) == ["write"]
    assert "port=" in debugger.complete_break("po", "break po", 6, 8)
    assert debugger.complete_trace("o", "trace o", 6, 7) == ["on", "off"]
    assert "continue" in debugger.completenames("con")


def test_a_script_stops_at_its_first_failing_command(session: Any) -> None:
    machine, debugger, run = session
    script = ["# set things up", "", "break hlt", "set reg rax 1", "x/4xq 0x1000", "set reg rax 2"]
    assert debugger.run_script(script, "commands.txt") == "commands.txt:5: x/4xq: unknown letter 'q' " + (
        "(formats xduotcsi, units bhwg, v for virtual)"
    )
    assert machine.vcpus[0].registers["rax"] == 1
    lines = debugger.stdout.getvalue().splitlines()
    assert lines[0] == "(pyhv) break hlt" and "(pyhv) set reg rax 2" not in lines
    assert debugger.run_script(["set reg rax 3", "quit", "set reg rax 4"], "s") is None
    assert machine.vcpus[0].registers["rax"] == 3


def test_disas_reads_at_the_current_instruction(session: Any) -> None:
    machine, debugger, run = session
    machine.memory.write(0x11000, bytes.fromhex("ee eb fe"))  # out dx, al; jmp $ (rip 0x1000, virtual)
    text = run("disas")
    assert text.startswith("0x1000:")
    assert "disas [ADDR] [N]" in run("disas 0x1000 0")


def test_set_data_changes_what_the_stopped_read_returns(session: Any) -> None:
    from hypervisor.kvm.loop import ExitKind

    machine, debugger, run = session
    record = machine.vcpus[0].exit_record
    assert "did not stop at a port or MMIO read" in run("set data 0")  # a fresh record: no exit
    buffer = ffi.new("uint8_t[4]", [0x60, 0, 0, 0])
    record.kind, record.address, record.size, record.count, record.data = ExitKind.PIO_IN, 0x3FD, 1, 1, buffer
    assert run("set data 0x21") == "the read at 0x3fd now returns 21\n" and buffer[0] == 0x21
    assert "does not fit in the 1-byte read" in run("set data 0x100")
    record.size = 4
    assert run("set data hex:01020304") == "the read at 0x3fd now returns 01020304\n"
    assert list(buffer) == [1, 2, 3, 4]
    assert "the read is 4 bytes, not 2" in run("set data hex:0102")
    assert "set data wants a value" in run("set data")
    record.kind = ExitKind.PIO_OUT
    assert "did not stop at a port or MMIO read" in run("set data 1")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("/0123456789xduotcsibhwgvq -$rspa+x")), max_size=30))
def test_examine_and_address_text_parse_or_fail_with_one_line(text: str) -> None:
    for parse in (parse_examine, lambda value: evaluate(value, {"rsp": 0x7000, "rax": 1})):
        try:
            parse(text)
        except DebugCommandError as error:
            assert str(error) and "\n" not in str(error)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_command_line_is_answered_in_one_line_or_runs(text: str) -> None:
    machine = FakeMachine()
    try:
        debugger = ExitDebugger(machine, io.StringIO())  # type: ignore[arg-type]
        if text.strip().split(" ", 1)[0] in ("quit", "q", "exit", "EOF", "continue", "c", "cont"):
            return  # these leave or wait for a stop
        debugger.onecmd(text)
        if debugger.failure is not None:
            assert "\n" not in debugger.failure
    finally:
        machine.memory.close()
