"""gdb's `monitor` commands for a pyhv machine: the exit debugger from inside gdb.

`monitor help` lists them. They read the machine's own records (the C loop's per-exit counters,
the bus ranges, the exit breakpoint table) and never touch guest state, so they are safe to use
while the guest is stopped at any point.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

from hypervisor.debug.gdb.target import GdbTargetError

if TYPE_CHECKING:
    from hypervisor.machine import Machine

log = logging.getLogger(__name__)

TRACE_LINES = 256  # exits `monitor trace show` keeps
HELP = """pyhv monitor commands:
  exits                  VM exits so far, by KVM exit reason, and what the C fast path did
  devices                the port I/O and MMIO ranges and the device behind each
  break-exit EXPR        stop at exits matching EXPR, e.g. `io port=0x3f8 write` (docs/debugging.md)
  break-exit list        the exit breakpoints, with their hit counts
  break-exit delete ID   remove one
  trace on|off           log every exit that reaches Python (pyhv's log, and `trace show`)
  trace show             the last exits traced
  save PATH              save the machine to the new snapshot folder PATH (docs/snapshots.md)
  help                   this text"""


class MonitorCommands:
    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self._trace: deque[str] = deque(maxlen=TRACE_LINES)
        self._trace_lock = threading.Lock()
        self._tracing = False

    def run(self, line: str) -> str:
        words = line.split()
        if not words or words[0] == "help":
            return HELP
        command, arguments = words[0], words[1:]
        if command == "exits":
            return self._exits()
        if command == "devices":
            return self._devices()
        if command == "break-exit":
            return self._break_exit(arguments, line.split(None, 1)[1] if len(words) > 1 else "")
        if command == "trace":
            return self._trace_command(arguments)
        if command == "save":
            return self._save(arguments)
        raise GdbTargetError(f"unknown monitor command {command!r} (try `monitor help`)")

    def _save(self, arguments: list[str]) -> str:
        from hypervisor.errors import HypervisorError

        if len(arguments) != 1:
            raise GdbTargetError("usage: monitor save PATH")
        try:
            self.machine.save(arguments[0])
        except HypervisorError as error:
            raise GdbTargetError(f"save: {error}") from error
        return f"saved the machine to {arguments[0]}\n"

    def _exits(self) -> str:
        from hypervisor.vcpu.stats import exits_by_reason_name, statistics_dict, total_stats

        stats = total_stats(self.machine.vcpus)
        lines = ["exits by KVM reason:"]
        by_reason = exits_by_reason_name(stats)
        lines += [f"  {reason:<16} {count}" for reason, count in sorted(by_reason.items())] or ["  (none yet)"]
        lines.append("fast path:")
        for name, value in statistics_dict(stats).items():
            if name != "exits_by_reason" and isinstance(value, int):
                lines.append(f"  {name:<20} {value}")
        return "\n".join(lines)

    def _devices(self) -> str:
        lines = []
        for title, bus, width in (("port I/O", self.machine.pio_bus, 4), ("MMIO", self.machine.mmio_bus, 12)):
            lines.append(f"{title}:")
            ranges = bus.ranges()
            for entry in ranges:
                lines.append(f"  {entry.base:#0{width + 2}x}-{entry.end - 1:#0{width + 2}x}  {entry.name}")
            if not ranges:
                lines.append("  (none)")
        return "\n".join(lines)

    def _break_exit(self, arguments: list[str], text: str) -> str:
        if arguments[:1] == ["list"]:
            breakpoints = list(self.machine.breakpoints)
            if not breakpoints:
                return "no exit breakpoints"
            return "\n".join(f"{bp.id}: {bp.describe()} (hits {bp.hits})" for bp in breakpoints)
        if arguments[:1] == ["delete"]:
            if len(arguments) != 2 or not arguments[1].isdigit():
                raise GdbTargetError("break-exit delete wants a breakpoint number")
            if not self.machine.delete_breakpoint(int(arguments[1])):
                raise GdbTargetError(f"no exit breakpoint {arguments[1]}")
            return f"deleted exit breakpoint {arguments[1]}"
        if not arguments:
            raise GdbTargetError("break-exit wants an expression, `list` or `delete ID`")
        parse = _break_expression_parser()
        if parse is None:
            return "break-exit is not available: this pyhv has no exit breakpoint expressions"
        expression = text
        try:
            keywords = parse(expression)
            breakpoint = self.machine.break_on(**keywords)
        except Exception as error:  # the parser's error (ValueError, a HypervisorError) or break_on's
            raise GdbTargetError(f"break-exit {expression!r}: {error}") from error
        return f"exit breakpoint {breakpoint.id}: {breakpoint.describe()}"

    def _trace_command(self, arguments: list[str]) -> str:
        action = arguments[0] if arguments else "show"
        if action == "on":
            if not self._tracing:
                self._tracing = True
                self.machine.add_exit_hook(self._trace_hook)
            return "tracing exits"
        if action == "off":
            if self._tracing:
                self._tracing = False
                self.machine.remove_exit_hook(self._trace_hook)
            return "exit trace off"
        if action == "show":
            with self._trace_lock:
                lines = list(self._trace)
            return "\n".join(lines) if lines else "no exits traced (monitor trace on)"
        raise GdbTargetError("trace wants on, off or show")

    def _trace_hook(self, event: Any, context: Any) -> None:
        from hypervisor.vcpu.events import describe_event

        line = describe_event(event)
        with self._trace_lock:
            self._trace.append(line)
        log.info("exit: %s", line)

    def close(self) -> None:
        if self._tracing:
            self._tracing = False
            self.machine.remove_exit_hook(self._trace_hook)


def _break_expression_parser() -> Any:
    """`hypervisor.debug.break_expr.parse_break_expression`, written by another part of pyhv."""
    try:
        from hypervisor.debug import break_expr  # type: ignore[attr-defined]
    except ImportError:
        return None
    return getattr(break_expr, "parse_break_expression", None)
