"""How a run ends, and the process exit status each ending maps to (docs/exit-status.md).

Guest-chosen statuses (debug-exit) are passed through exactly, so the hypervisor's own outcomes
use values a test guest is unlikely to pick and that follow common conventions (124 is
coreutils timeout's, 130 is 128+SIGINT).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class OutcomeKind(enum.Enum):
    DEBUG_EXIT = "debug-exit"  # the guest wrote its status to the debug-exit port
    COMMAND_EXIT = "command-exit"  # the bundled guest's pyhv.cmd finished with a status, then reset
    POWER_OFF = "power-off"  # ACPI-less power off: KVM_SYSTEM_EVENT_SHUTDOWN, or the guest's halt
    RESET = "reset"  # i8042 reset, KVM_SYSTEM_EVENT_RESET (Linux `reboot` with reboot=k)
    QUIT = "quit"  # the user pressed Ctrl-A x on the console
    HALTED = "halted"  # every vCPU halted with interrupts disabled: nothing can wake the guest
    TRIPLE_FAULT = "triple-fault"  # KVM_EXIT_SHUTDOWN
    PANIC = "panic"  # the guest kernel said "Kernel panic" (or KVM_SYSTEM_EVENT_CRASH)
    EMULATION_FAILURE = "emulation-failure"  # KVM could not emulate an instruction
    INTERNAL_ERROR = "internal-error"  # other KVM internal errors, entry failures, odd exits
    TIMEOUT = "timeout"  # --timeout expired
    INTERRUPTED = "interrupted"  # SIGINT/SIGTERM on the host
    HYPERVISOR_ERROR = "hypervisor-error"  # a host-side failure (ioctl error, I/O error)


# Exit statuses that are not the guest's own (the guest's debug-exit value is used as is).
EXIT_STATUS: dict[OutcomeKind, int] = {
    OutcomeKind.POWER_OFF: 0,
    OutcomeKind.RESET: 0,
    OutcomeKind.QUIT: 0,
    OutcomeKind.HYPERVISOR_ERROR: 1,
    OutcomeKind.HALTED: 119,
    OutcomeKind.TRIPLE_FAULT: 120,
    OutcomeKind.PANIC: 121,
    OutcomeKind.EMULATION_FAILURE: 122,
    OutcomeKind.INTERNAL_ERROR: 123,
    OutcomeKind.TIMEOUT: 124,
    OutcomeKind.INTERRUPTED: 130,
}


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    detail: str = ""
    code: int | None = None  # the debug-exit value for DEBUG_EXIT
    data: dict[str, object] = field(default_factory=dict, compare=False)

    @property
    def exit_status(self) -> int:
        if self.kind in (OutcomeKind.DEBUG_EXIT, OutcomeKind.COMMAND_EXIT):
            return int(self.code or 0)
        return EXIT_STATUS[self.kind]

    def describe(self) -> str:
        text = self.kind.value
        if self.kind in (OutcomeKind.DEBUG_EXIT, OutcomeKind.COMMAND_EXIT):
            text += f" {self.code}"
        if self.detail:
            text += f": {self.detail}"
        return text
