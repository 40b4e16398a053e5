"""Watches the guest's console for boot phases and kernel panics, with timestamps.

The report's phase times come from here (seconds from the start of the run), and so does the
panic outcome: with `panic=-1` a panicking Linux resets at once, and only its console says why.
"""

from __future__ import annotations

import re
import threading
import time

from hypervisor.debug.kernel_log import KernelLogScanner
from hypervisor.debug.phase_watcher import PhaseWatcher
from hypervisor.outcome import (
    PANIC_SOURCE_CONSOLE,
    PANIC_SOURCE_PVPANIC,
    Outcome,
    OutcomeKind,
    panic_outcome,
    panic_source,
)

# Console lines that mark the phases of a Linux boot (printed by init/main.c and by the
# bundled guest's init, guest_images/init), in the order they appear.
LINUX_PHASES = {
    "kernel_banner": b"Linux version ",
    "init_started": b"Run /init as init process",
    "guest_init_greeting": b"pyhv guest: init started",
    "shell_started": b"pyhv guest: starting shell",
    "command_started": b"pyhv guest: running command",
    "guest_rebooting": b"pyhv guest: rebooting",
    "reboot": b"reboot: Restarting system",
}
PANIC_MARKER = b"Kernel panic - not syncing"
TAIL_BYTES = 8192
_PANIC_LINE = re.compile(rb"Kernel panic - not syncing: ?([^\r\n]*)")
# guest_images/init prints this after running `pyhv.cmd`, then resets the machine.
_COMMAND_STATUS_LINE = re.compile(rb"pyhv guest: command exited with status (\d+)\r?\n")
# Outcomes a panic explains: the reset panic=-1 causes, or whatever ended a hung panic.
PANIC_EXPLAINS = (OutcomeKind.RESET, OutcomeKind.TRIPLE_FAULT, OutcomeKind.TIMEOUT, OutcomeKind.POWER_OFF)


class ConsoleObserver:
    """`linux_rules`: the console is a Linux kernel's, so its panic line and the bundled init's
    command status explain how the run ended, and its oops/WARNING/... reports are counted. For
    other guests (raw binaries, multiboot kernels) console text never changes an outcome: a raw
    guest that prints "Kernel panic - not syncing" and resets has reset."""

    def __init__(self, started_at: float | None = None, linux_rules: bool = False) -> None:
        self.started_at = started_at if started_at is not None else time.monotonic()
        self.first_byte_at: float | None = None
        self.linux_rules = linux_rules
        self._lock = threading.Lock()
        self._tail = bytearray()
        self.phases = PhaseWatcher({**LINUX_PHASES, "panic": PANIC_MARKER})
        self.kernel_log = KernelLogScanner()

    def restart_clock(self) -> None:
        self.started_at = time.monotonic()

    def feed(self, data: bytes) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = time.monotonic()
        with self._lock:
            self._tail += data
            if len(self._tail) > TAIL_BYTES:
                del self._tail[:-TAIL_BYTES]
        self.phases(data)
        if self.linux_rules:
            self.kernel_log.feed(data)

    def tail(self) -> bytes:
        """The last TAIL_BYTES of console output."""
        with self._lock:
            return bytes(self._tail)

    @property
    def panicked(self) -> bool:
        return "panic" in self.phases.seen

    def panic_reason(self) -> str:
        with self._lock:
            match = _PANIC_LINE.search(bytes(self._tail))
        return match.group(1).decode(errors="replace").strip() if match else ""

    def command_status(self) -> int | None:
        """The exit status of the bundled guest's `pyhv.cmd`, when its init reported one."""
        with self._lock:
            matches = _COMMAND_STATUS_LINE.findall(bytes(self._tail))
        return min(int(matches[-1]), 255) if matches else None

    def explain(self, outcome: Outcome) -> Outcome:
        """`outcome`, or what the console says really happened: a kernel panic, or the status
        of the command the bundled guest ran before it reset the machine (Linux guests only)."""
        if not self.linux_rules:
            return outcome
        if self.panicked and panic_source(outcome) == PANIC_SOURCE_PVPANIC:
            # The machine's verdict stands; the console only adds why (Linux prints its panic
            # line before the panic notifiers run, pvpanic's among them: kernel/panic.c).
            reason = self.panic_reason()
            if not reason:
                return outcome
            facts = outcome.data.get("panic")
            facts = {**(facts if isinstance(facts, dict) else {}), "reason": reason}
            return Outcome(OutcomeKind.PANIC, f"{outcome.detail}: {reason}", data={"panic": facts})
        if self.panicked and outcome.kind in PANIC_EXPLAINS:
            reason = self.panic_reason()
            detail = f"guest kernel panic: {reason}" if reason else "guest kernel panic"
            return panic_outcome(detail, PANIC_SOURCE_CONSOLE, reason=reason)
        status = self.command_status() if outcome.kind is OutcomeKind.RESET else None
        if status is not None:
            return Outcome(OutcomeKind.COMMAND_EXIT, "the guest's pyhv.cmd command finished", code=status)
        return outcome

    def timeline(self) -> dict[str, float]:
        """Seconds from the start of the run to the first console byte and to each phase seen."""
        times: dict[str, float] = {}
        if self.first_byte_at is not None:
            times["first_console_byte"] = round(self.first_byte_at - self.started_at, 3)
        for name, when in sorted(self.phases.seen.items(), key=lambda item: item[1]):
            times[name] = round(when - self.started_at, 3)
        return times
