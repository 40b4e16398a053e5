"""The exit debugger's command loop (`pyhv debug`): gdb-like commands over a paused Machine.

The machine is driven only through its debugging contract (hypervisor/machine.py): the loop
waits at its prompt while every vCPU is parked, `next` runs one vCPU to its next exit that reaches
Python (`step_exit`), `continue` resumes until a breakpoint, a hook or the end of the run stops it
again (`wait_for_stop`), and every other command reads or changes state while nothing runs.
Output goes to the stream the CLI hands in; exit traces (`trace on`) are written from the vCPU
threads under the same lock, so lines never interleave mid-way.

The command texts are parsed by pure functions, tested without KVM (tests/unit/test_debug_repl.py):
x/FMT, addresses and values in hypervisor/debug/repl_syntax.py, break expressions in
hypervisor/debug/break_expr.py.
"""

from __future__ import annotations

import cmd
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from hypervisor.debug.break_expr import KEYWORDS, WORDS, parse_break_expression
from hypervisor.debug.repl_syntax import (
    MAX_EXAMINE_BYTES,
    VALUE_MASK,
    DebugCommandError,
    code_bits,
    disassemble,
    evaluate,
    format_memory,
    parse_examine,
    parse_set_memory,
)
from hypervisor.errors import HypervisorError
from hypervisor.kvm.registers import SEGMENT_NAMES
from hypervisor.kvm.vcpu import GPR_NAMES
from hypervisor.vcpu.context import ExitContext
from hypervisor.vcpu.events import describe_event

if TYPE_CHECKING:
    from hypervisor.machine import Machine
    from hypervisor.vcpu.control import Stop
    from hypervisor.vcpu.events import ExitEvent

log = logging.getLogger(__name__)

PROMPT = "(pyhv) "
HISTORY_FILE = "~/.pyhv_history"
HISTORY_LENGTH = 1000
STEP_TIMEOUT = 10.0  # seconds a `next` waits for one exit before it gives up (a spinning guest)
PAUSE_TIMEOUT = 5.0
WAIT_SLICE = 0.25  # `continue` waits in slices so that Ctrl-C is seen promptly
MAX_STRING = 4096  # x/s reads at most this much looking for the NUL
MAX_STEPS = 1_000_000
MAX_DISAS = 1000
INFO_TOPICS = ("exits", "regs", "sregs", "devices", "breakpoints")
INFO_ALIASES = {"registers": "regs", "r": "regs", "b": "breakpoints", "break": "breakpoints", "e": "exits"}
ALIASES = {"n": "next", "c": "continue", "cont": "continue", "b": "break", "d": "delete", "i": "info",
           "q": "quit", "exit": "quit"}  # fmt: skip


# -- the command loop -------------------------------------------------------------------------------


class ExitDebugger(cmd.Cmd):
    """gdb-like commands over a machine started with `start(paused=True)`."""

    prompt = PROMPT
    intro = None

    def __init__(self, machine: Machine, stdout: IO[str], interactive: bool = False,
                 step_timeout: float = STEP_TIMEOUT) -> None:  # fmt: skip
        super().__init__(stdout=stdout)
        self.machine = machine
        self.interactive = interactive
        self.step_timeout = step_timeout
        self.vcpu_index = 0
        self.expressions: dict[int, str] = {}  # breakpoint id -> the text the user typed
        self.failure: str | None = None  # the last command's error (scripts stop at the first)
        self._lock = threading.Lock()
        self._tracing = False

    # -- output and dispatch -------------------------------------------------------------------

    def out(self, text: str = "") -> None:
        with self._lock:
            self.stdout.write(text + "\n")
            self.stdout.flush()

    def onecmd(self, line: str) -> bool:
        """One command; an error is one line (and remembered: a script stops at it)."""
        self.failure = None
        name, _, rest = line.strip().partition(" ")
        if "/" in name and name.split("/", 1)[0] in ("x", "set"):
            name, rest = name.split("/", 1)[0], "/" + name.split("/", 1)[1] + " " + rest
        name = ALIASES.get(name, name)
        try:
            return bool(super().onecmd(f"{name} {rest}".strip() if name else line))
        except (HypervisorError, ValueError) as error:
            self.failure = str(error).splitlines()[0] if str(error) else type(error).__name__
            self.out(f"error: {self.failure}")
            return False

    def default(self, line: str) -> None:
        raise DebugCommandError(f"unknown command {line.split()[0]!r} (type help for the list)")

    def emptyline(self) -> bool:
        # gdb repeats the last command on Enter, which is what makes `next` pleasant at a
        # terminal; a script's blank lines do nothing.
        return bool(self.lastcmd and self.interactive and self.onecmd(self.lastcmd))

    @property
    def vcpu(self) -> Any:
        return self.machine.vcpus[self.vcpu_index]

    def _context(self) -> ExitContext:
        return ExitContext(self.vcpu, self.machine.memory, None, None, self.machine)

    def _registers(self) -> dict[str, int]:
        return self.vcpu.get_regs()

    def _running(self) -> bool:
        return not self.machine.control.finished.is_set()

    def _require_running(self) -> None:
        if not self._running():
            outcome = self.machine.control.outcome
            raise DebugCommandError(f"the run is over ({outcome.describe() if outcome else 'stopped'})")

    def _report_end(self) -> None:
        outcome = self.machine.control.outcome
        if outcome is not None:
            self.out(f"the run ended: {outcome.describe()} (exit status {outcome.exit_status})")

    def _report_stop(self, stop: Stop) -> None:
        if stop.reason == "finished":
            self._report_end()
            return
        # The vCPU that stopped parked itself and asked the others to; wait for all of them.
        self.machine.pause(wait=True, timeout=PAUSE_TIMEOUT)
        if stop.vcpu is not None:
            self.vcpu_index = stop.vcpu
        self.out(f"stopped: {stop.describe()}")

    # -- running -------------------------------------------------------------------------------

    def do_next(self, argument: str) -> None:
        """next [N]: run the current vCPU to its next N exits that reach Python, printing each.
        Stops early at a breakpoint or when the run ends. (Exits the C fast path completes,
        such as POST-code writes, are counted by `info exits` but are not steps.)"""
        count = evaluate(argument) if argument.strip() else 1
        if not 1 <= count <= MAX_STEPS:
            raise DebugCommandError(f"next: N must be 1 to {MAX_STEPS}")
        self._require_running()
        for _ in range(count):
            try:
                event = self.machine.step_exit(self.vcpu_index, timeout=self.step_timeout)
            except KeyboardInterrupt:
                # The step may still be under way: the pause kicks the vCPU back to its park.
                self.machine.pause(wait=True, timeout=PAUSE_TIMEOUT)
                self.out("interrupted (Ctrl-C); the guest is paused")
                return
            if event is not None:
                self.out(describe_event(event))
            # A breakpoint the step met answers the step (last_step_stop); the runner may also
            # queue it as an ordinary stop, as it does for one met by another vCPU meanwhile. Either
            # way `next` ends there, and a queued one must not make the next `continue` stop at once.
            stops = [stop for stop in self.machine.control.pending_stops() if stop.reason != "finished"]
            if self.machine.last_step_stop is not None and self.machine.last_step_stop.breakpoint is not None:
                stops.insert(0, self.machine.last_step_stop)
            if not self._running():
                self._report_end()
                return
            if event is None:
                raise DebugCommandError(
                    f"vcpu{self.vcpu_index} made no exit that reaches Python within {self.step_timeout:g} s "
                    "(it runs guest code without exits; `continue` and Ctrl-C, or a breakpoint, stop it)"
                )
            if stops:
                for stop in dict.fromkeys(stops):
                    self.out(f"stopped: {stop.describe()}")
                return

    def do_continue(self, argument: str) -> None:
        """continue: let every vCPU run until a breakpoint, a debug trap or the end of the run
        (Ctrl-C pauses the guest and returns to the prompt)."""
        self._require_running()
        self.machine.resume()
        try:
            stop = None
            while stop is None:
                stop = self.machine.wait_for_stop(WAIT_SLICE)
        except KeyboardInterrupt:
            self.machine.pause(wait=True, timeout=PAUSE_TIMEOUT)
            rip = self._registers()["rip"] if self._running() else None
            self.out("paused (Ctrl-C)" + (f" with vcpu{self.vcpu_index} at rip {rip:#x}" if rip is not None else ""))
            return
        self._report_stop(stop)

    # -- breakpoints ---------------------------------------------------------------------------

    def add_breakpoint(self, expression: str) -> int:
        keywords = parse_break_expression(expression)
        breakpoint = self.machine.break_on(**keywords)
        self.expressions[breakpoint.id] = " ".join(expression.split())
        return breakpoint.id

    def do_break(self, argument: str) -> None:
        """break EXPR: stop at exits matching EXPR, e.g. `break io port=0x3f8 write count=3`,
        `break mmio addr=0xd0000000..0xd0000fff read`, `break hlt`, `break count>1000`,
        `break io port=0x3f8 read rax=7` (docs/debugging.md: break expressions)."""
        number = self.add_breakpoint(argument)
        self.out(f"breakpoint {number}: {self.expressions[number]}")

    def do_delete(self, argument: str) -> None:
        """delete [ID...]: delete those breakpoints, or all of them."""
        if not argument.strip():
            for breakpoint in list(self.machine.breakpoints):
                self.machine.delete_breakpoint(breakpoint.id)
            self.expressions.clear()
            self.out("deleted every breakpoint")
            return
        for word in argument.split():
            number = evaluate(word)
            if not self.machine.delete_breakpoint(number):
                raise DebugCommandError(f"no breakpoint {word}")
            self.expressions.pop(number, None)
            self.out(f"deleted breakpoint {number}")

    # -- looking -------------------------------------------------------------------------------

    def do_info(self, argument: str) -> None:
        """info exits [N] | regs [NAME...] | sregs | devices | breakpoints"""
        words = argument.split()
        if not words:
            raise DebugCommandError(f"info what? ({', '.join(INFO_TOPICS)})")
        topic = INFO_ALIASES.get(words[0], words[0])
        if topic not in INFO_TOPICS:
            raise DebugCommandError(f"info {words[0]}: unknown topic (one of {', '.join(INFO_TOPICS)})")
        getattr(self, f"_info_{topic}")(words[1:])

    def _info_exits(self, words: list[str]) -> None:
        from hypervisor.vcpu.stats import exits_by_reason_name, total_stats

        last = evaluate(words[0]) if words else 10
        stats = total_stats(self.machine.vcpus)
        self.out(f"exits: {stats.total_exits} in all, {stats.python_exits} reached Python, "
                 f"{stats.pio_sink} port and {stats.mmio_sink} MMIO completed in C")  # fmt: skip
        for reason, count in sorted(exits_by_reason_name(stats).items(), key=lambda item: -item[1]):
            self.out(f"  {reason:<16} {count}")
        history = list(self.machine.exit_history or ())
        if history and last:
            self.out(f"last {min(last, len(history))} exits that reached Python:")
            for event in history[-last:]:
                self.out(f"  {describe_event(event)}")

    def _info_regs(self, words: list[str]) -> None:
        registers = self._registers()
        names = [word.lstrip("$").lower() for word in words] or list(GPR_NAMES)
        for name in names:
            if name not in registers:
                raise DebugCommandError(f"unknown register {name!r} (one of {', '.join(GPR_NAMES)})")
            self.out(f"{name:<8}{registers[name]:#018x}  {registers[name]}")

    def _info_sregs(self, words: list[str]) -> None:
        sregs = self.vcpu.get_sregs()
        for name in SEGMENT_NAMES:
            segment = sregs.segment(name)
            self.out(f"{name:<4}selector {segment.selector:#06x} base {segment.base:#018x} limit {segment.limit:#010x}"
                     f" type {segment.type:#x} dpl {segment.dpl} {'present' if segment.present else 'not present'}"
                     f"{' l' if segment.l else ''}{' db' if segment.db else ''}")  # fmt: skip
        for name in ("gdt", "idt"):
            table = getattr(sregs, name)
            self.out(f"{name:<4}base {table.base:#018x} limit {table.limit:#06x}")
        for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
            self.out(f"{name:<10}{getattr(sregs, name):#018x}")

    def _info_devices(self, words: list[str]) -> None:
        for bus, label, width in ((self.machine.pio_bus, "port", 4), (self.machine.mmio_bus, "mmio", 12)):
            for entry in bus.ranges():
                self.out(f"{label} {entry.base:#0{width + 2}x}-{entry.end - 1:#0{width + 2}x}  {entry.name}")

    def _info_breakpoints(self, words: list[str]) -> None:
        breakpoints = sorted(self.machine.breakpoints, key=lambda bp: bp.id)
        if not breakpoints:
            self.out("no breakpoints")
            return
        self.out("Num  Hits  What")
        for breakpoint in breakpoints:
            what = self.expressions.get(breakpoint.id, breakpoint.describe())
            state = "" if breakpoint.enabled else " (disabled)"
            self.out(f"{breakpoint.id:<4} {breakpoint.hits:<5} {what}{state}")

    def _read(self, address: int, size: int, virtual: bool) -> bytes:
        context = self._context()
        return context.read_virtual(address, size) if virtual else context.read_physical(address, size)

    def do_x(self, argument: str) -> None:
        """x/<n><f><u> ADDR: examine memory (physical; x/v... or -v for virtual through the
        current vCPU's page tables). f: x d u o t c s i; u: b h w g. ADDR: 0x1000, $rsp+8."""
        fmt, address_text = parse_examine(argument)
        address = evaluate(address_text, self._registers())
        if fmt.format == "s":
            for _ in range(fmt.count):
                data = self._read_string(address, fmt.virtual)
                self.out(f"{address:#x}:\t{data.decode('latin-1')!r}")
                address += len(data) + 1
            return
        if fmt.format == "i":
            bits = code_bits(self.vcpu.get_sregs())
            code = self._read_available(address, min(fmt.count, MAX_DISAS) * 15, fmt.virtual)
            for line in disassemble(code, address, bits, fmt.count):
                self.out(line)
            return
        for line in format_memory(address, self._read(address, fmt.count * fmt.unit, fmt.virtual), fmt):
            self.out(line)

    def _read_string(self, address: int, virtual: bool) -> bytes:
        data = bytearray()
        while len(data) < MAX_STRING:
            byte = self._read(address + len(data), 1, virtual)
            if byte == b"\0":
                break
            data += byte
        return bytes(data)

    def _read_available(self, address: int, size: int, virtual: bool) -> bytes:
        """As many of `size` bytes as can be read (an instruction stream may end at a page)."""
        try:
            return self._read(address, size, virtual)
        except HypervisorError:
            data = bytearray()
            while len(data) < size:
                try:
                    data += self._read(address + len(data), 1, virtual)
                except HypervisorError:
                    break
            if not data:
                raise
            return bytes(data)

    def do_disas(self, argument: str) -> None:
        """disas [ADDR] [N]: disassemble N (default 10) instructions at ADDR (virtual; default
        the current instruction, CS.base + RIP). Needs capstone (pip install 'pyhv[disasm]')."""
        words = argument.split()
        registers = self._registers()
        sregs = self.vcpu.get_sregs()
        address = evaluate(words[0], registers) if words else (sregs.cs.base + registers["rip"]) & VALUE_MASK
        count = evaluate(words[1]) if len(words) > 1 else 10
        if len(words) > 2 or not 1 <= count <= MAX_DISAS:
            raise DebugCommandError(f"disas [ADDR] [N], N from 1 to {MAX_DISAS}")
        code = self._read_available(address, count * 15, virtual=True)
        for line in disassemble(code, address, code_bits(sregs), count):
            self.out(line)

    # -- changing ------------------------------------------------------------------------------

    def do_set(self, argument: str) -> None:
        """set reg NAME VALUE | set mem[/bhwg][v] ADDR VALUE | set data VALUE: change a register
        of the current vCPU, guest memory (physical; v or -v: virtual), or what the read the vCPU
        stopped at returns to the guest. VALUE: 42, 0x2a, $rsi+3, or hex:4142 for raw bytes."""
        words = argument.split()
        if not words:
            raise DebugCommandError("set reg NAME VALUE or set mem ADDR VALUE")
        if words[0] == "reg":
            if len(words) != 3:
                raise DebugCommandError("set reg wants a register and a value: set reg rax 0x2a")
            name = words[1].lstrip("$").lower()
            if name not in GPR_NAMES:
                raise DebugCommandError(f"unknown register {words[1]!r} (one of {', '.join(GPR_NAMES)})")
            registers = self._registers()
            value = evaluate(words[2], registers)
            self.vcpu.set_regs(**{name: value})
            self.out(f"{name} = {value:#x}")
            return
        if words[0].split("/", 1)[0] == "mem":
            unit, virtual, address_text, value_text = parse_set_memory(words)
            registers = self._registers()
            address = evaluate(address_text, registers)
            if value_text.startswith("hex:"):
                try:
                    data = bytes.fromhex(value_text[4:])
                except ValueError:
                    raise DebugCommandError(f"{value_text!r}: hex: wants pairs of hex digits") from None
                if not data or len(data) > MAX_EXAMINE_BYTES:
                    raise DebugCommandError(f"hex: wants 1 to {MAX_EXAMINE_BYTES} bytes")
            else:
                value = evaluate(value_text, registers)
                if value >> (8 * unit):
                    raise DebugCommandError(f"{value:#x} does not fit in {unit} byte{'s' if unit > 1 else ''} "
                                            "(set mem/h, /w or /g for wider values)")  # fmt: skip
                data = value.to_bytes(unit, "little")
            context = self._context()
            (context.write_virtual if virtual else context.write_physical)(address, data)
            self.out(f"wrote {len(data)} byte{'s' if len(data) > 1 else ''} at {address:#x}"
                     f"{' (virtual)' if virtual else ''}")  # fmt: skip
            return
        if words[0] == "data":
            if len(words) != 2:
                raise DebugCommandError("set data wants a value: set data 0x20 (or hex:2000 for the bytes)")
            self._set_read_data(words[1])
            return
        raise DebugCommandError(f"set {words[0]}: use set reg NAME VALUE, set mem ADDR VALUE or set data VALUE")

    def _set_read_data(self, text: str) -> None:
        """Changes what the current vCPU's last exit, a port or MMIO read, gives the guest. The
        device's answer waits in kvm_run until the vCPU's next KVM_RUN completes the instruction
        (api.rst, KVM_EXIT_IO and KVM_EXIT_MMIO), and a stopped vCPU has not entered KVM_RUN since
        its exit (the C loop's record of it is only reset by the next run)."""
        from hypervisor.kvm.loop import ExitKind, exit_buffer

        record = self.vcpu.exit_record
        if int(record.kind) not in (ExitKind.PIO_IN, ExitKind.MMIO_READ):
            raise DebugCommandError(
                f"vcpu{self.vcpu_index} did not stop at a port or MMIO read (set data changes what a read returns)"
            )
        length = int(record.size) * int(record.count)
        if text.startswith("hex:"):
            try:
                data = bytes.fromhex(text[4:])
            except ValueError:
                raise DebugCommandError(f"{text!r}: hex: wants pairs of hex digits") from None
            if len(data) != length:
                raise DebugCommandError(f"the read is {length} bytes, not {len(data)}")
        else:
            value = evaluate(text, self._registers())
            if value >> (8 * length):
                raise DebugCommandError(f"{value:#x} does not fit in the {length}-byte read")
            data = value.to_bytes(length, "little")
        exit_buffer(record.data, length)[:] = data
        self.out(f"the read at {int(record.address):#x} now returns {data.hex()}")

    def do_vcpu(self, argument: str) -> None:
        """vcpu [N]: show or choose the vCPU that next, info regs/sregs, x/v, set reg and disas use."""
        if not argument.strip():
            self.out(f"current vcpu: {self.vcpu_index} of {len(self.machine.vcpus)}")
            return
        index = evaluate(argument)
        if index >= len(self.machine.vcpus):
            raise DebugCommandError(f"no vcpu {index}: this machine has {len(self.machine.vcpus)}")
        self.vcpu_index = index
        self.out(f"current vcpu: {index}")

    def do_trace(self, argument: str) -> None:
        """trace on|off: print every exit that reaches Python as it happens."""
        word = argument.strip()
        if word == "on":
            if not self._tracing:
                self.machine.add_exit_hook(self._trace_hook)
                self._tracing = True
            self.out("tracing exits")
        elif word == "off":
            self.stop_tracing()
            self.out("exit trace off")
        else:
            raise DebugCommandError("trace on or trace off")

    def stop_tracing(self) -> None:
        if self._tracing:
            self.machine.remove_exit_hook(self._trace_hook)
            self._tracing = False

    def _trace_hook(self, event: ExitEvent, context: ExitContext) -> None:
        self.out(f"trace: {describe_event(event)}")

    def do_save(self, argument: str) -> None:
        """save PATH: save the machine, as it is now, to the new snapshot folder PATH
        (docs/snapshots.md); `pyhv run --restore PATH` continues it."""
        path = argument.strip()
        if not path:
            raise DebugCommandError("save PATH")
        self.machine.save(path)
        self.out(f"saved the machine to {path}")

    def do_quit(self, argument: str) -> bool:
        """quit: stop the guest and leave (the exit status is the guest's outcome)."""
        return True

    def do_EOF(self, argument: str) -> bool:  # noqa: N802 (cmd.Cmd's name for end of input)
        """End of input (Ctrl-D): the same as quit."""
        if self.interactive:
            self.out("quit")
        return True

    def do_help(self, argument: str) -> None:
        """help [COMMAND]: the commands, or one command's description."""
        name = ALIASES.get(argument.strip(), argument.strip())
        if name:
            method = getattr(self, f"do_{name}", None)
            if method is None or name == "EOF":
                raise DebugCommandError(f"no command {argument.strip()!r}")
            self.out(" ".join((method.__doc__ or "").split()))
            return
        self.out("commands (help COMMAND for one):")
        for name in self.command_names():
            doc = (getattr(self, f"do_{name}").__doc__ or "").split(":", 1)[0]
            self.out(f"  {doc}")
        self.out("aliases: " + ", ".join(f"{short}={long}" for short, long in ALIASES.items()))

    def command_names(self) -> list[str]:
        return [name[3:] for name in self.get_names() if name.startswith("do_") and name != "do_EOF"]

    # -- completion (readline) -------------------------------------------------------------------

    def complete_info(self, text: str, line: str, begin: int, end: int) -> list[str]:
        words = line[:begin].split()
        if len(words) <= 1:
            return [topic for topic in INFO_TOPICS if topic.startswith(text)]
        if INFO_ALIASES.get(words[1], words[1]) == "regs":
            return [name for name in GPR_NAMES if name.startswith(text)]
        return []

    def complete_set(self, text: str, line: str, begin: int, end: int) -> list[str]:
        words = line[:begin].split()
        if len(words) <= 1:
            return [word for word in ("reg", "mem", "data") if word.startswith(text)]
        if words[1] == "reg" and len(words) == 2:
            return [name for name in GPR_NAMES if name.startswith(text)]
        return []

    def complete_break(self, text: str, line: str, begin: int, end: int) -> list[str]:
        candidates = [*WORDS, *(key + "=" for key in KEYWORDS), "count>", *(name + "=" for name in GPR_NAMES)]
        return [word for word in candidates if word.startswith(text)]

    def complete_delete(self, text: str, line: str, begin: int, end: int) -> list[str]:
        return [str(bp.id) for bp in self.machine.breakpoints if str(bp.id).startswith(text)]

    def complete_trace(self, text: str, line: str, begin: int, end: int) -> list[str]:
        return [word for word in ("on", "off") if word.startswith(text)]

    def complete_help(self, *args: Any) -> list[str]:
        return [name for name in self.command_names() if name.startswith(args[0])]

    # -- driving ---------------------------------------------------------------------------------

    def run_script(self, lines: Iterable[str], name: str) -> str | None:
        """Runs commands one per line, echoed after the prompt; '#' starts a comment. Stops at
        `quit`, at the end, or at the first failing command, whose `name:line: error` it returns."""
        for number, raw_line in enumerate(lines, 1):
            line = raw_line.strip()
            if not line or line.startswith("#"):
                continue
            self.out(f"{self.prompt}{line}")
            if self.onecmd(line):
                return None
            if self.failure is not None:
                return f"{name}:{number}: {self.failure}"
        return None

    def run_interactive(self, history_file: str = HISTORY_FILE) -> None:
        """The prompt at a terminal: readline history and completion; Ctrl-C at the prompt only
        clears the line, Ctrl-D or quit leaves."""
        history = _start_history(Path(os.path.expanduser(history_file)))
        try:
            while True:
                try:
                    self.cmdloop()
                    return
                except KeyboardInterrupt:
                    self.stdout.write("^C\n")
                    self.intro = None
        finally:
            _save_history(history)


def _start_history(path: Path) -> Path | None:
    try:
        import readline
    except ImportError:  # a Python without readline still gets the prompt
        return None
    readline.set_history_length(HISTORY_LENGTH)
    # `x/4xw` and `$rsp+8` are single words to complete; `=` and `>` end a break keyword.
    readline.set_completer_delims(" \t\n")
    try:
        readline.read_history_file(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        log.warning("cannot read the command history %s: %s", path, error.strerror)
    return path


def _save_history(path: Path | None) -> None:
    if path is None:
        return
    import readline

    try:
        readline.write_history_file(path)
    except OSError as error:
        log.warning("cannot write the command history %s: %s", path, error.strerror)
