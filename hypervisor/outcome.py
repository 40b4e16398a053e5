"""How a run ends, and the process exit status each ending maps to (docs/exit-status.md).

Guest-chosen statuses (debug-exit) are passed through exactly, so the hypervisor's own outcomes
use values a test guest is unlikely to pick and that follow common conventions (124 is
coreutils timeout's, 130 is 128+SIGINT).

Every outcome belongs to one of two classes, so a CI never blames a kernel for a broken runner:
a *verdict* is what the guest itself decided or caused (its exit code, a panic, a triple fault,
an exit storm), *infrastructure* is the run's machinery (a timeout, a hypervisor error, an
instruction the host's KVM refuses to emulate, the user or the host stopping the run).
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
    PANIC = "panic"  # pvpanic, the guest kernel's "Kernel panic" line, or KVM_SYSTEM_EVENT_CRASH
    EMULATION_FAILURE = "emulation-failure"  # KVM could not emulate an instruction
    INTERNAL_ERROR = "internal-error"  # other KVM internal errors, entry failures, odd exits
    TIMEOUT = "timeout"  # --timeout expired
    INTERRUPTED = "interrupted"  # SIGINT/SIGTERM on the host
    HYPERVISOR_ERROR = "hypervisor-error"  # a host-side failure (ioctl error, I/O error)
    EXIT_BUDGET = "exit-budget"  # the guest made more VM exits than --max-exits allows
    SAVED = "saved"  # the machine was saved and the user asked the run to end there (--save-then stop)

    @property
    def outcome_class(self) -> OutcomeClass:
        """VERDICT when the guest decided or caused this ending, INFRASTRUCTURE otherwise."""
        return OUTCOME_CLASS[self]


class OutcomeClass(enum.Enum):
    VERDICT = "verdict"  # the guest's own result: trust it as the kernel's pass or fail
    INFRASTRUCTURE = "infrastructure"  # the run's: retry or fix the runner, not the kernel


# Emulation failures are infrastructure: the guest ran a valid instruction that this host's KVM
# (kvm_pvm's emulator above all, shared/PLATFORM.md) cannot run; on hardware virtualization the
# same kernel would go on. A quit is the user's doing, an interrupt the host's.
OUTCOME_CLASS: dict[OutcomeKind, OutcomeClass] = {
    OutcomeKind.DEBUG_EXIT: OutcomeClass.VERDICT,
    OutcomeKind.COMMAND_EXIT: OutcomeClass.VERDICT,
    OutcomeKind.POWER_OFF: OutcomeClass.VERDICT,
    OutcomeKind.RESET: OutcomeClass.VERDICT,
    OutcomeKind.QUIT: OutcomeClass.INFRASTRUCTURE,
    OutcomeKind.HALTED: OutcomeClass.VERDICT,
    OutcomeKind.TRIPLE_FAULT: OutcomeClass.VERDICT,
    OutcomeKind.PANIC: OutcomeClass.VERDICT,
    OutcomeKind.EMULATION_FAILURE: OutcomeClass.INFRASTRUCTURE,
    OutcomeKind.INTERNAL_ERROR: OutcomeClass.INFRASTRUCTURE,
    OutcomeKind.TIMEOUT: OutcomeClass.INFRASTRUCTURE,
    OutcomeKind.INTERRUPTED: OutcomeClass.INFRASTRUCTURE,
    OutcomeKind.HYPERVISOR_ERROR: OutcomeClass.INFRASTRUCTURE,
    OutcomeKind.EXIT_BUDGET: OutcomeClass.VERDICT,  # the guest caused the storm
    OutcomeKind.SAVED: OutcomeClass.INFRASTRUCTURE,  # the user ended it; the guest decided nothing
}


# Exit statuses that are not the guest's own (the guest's debug-exit value is used as is).
EXIT_STATUS: dict[OutcomeKind, int] = {
    OutcomeKind.POWER_OFF: 0,
    OutcomeKind.RESET: 0,
    OutcomeKind.QUIT: 0,
    OutcomeKind.SAVED: 0,
    OutcomeKind.HYPERVISOR_ERROR: 1,
    OutcomeKind.EXIT_BUDGET: 118,
    OutcomeKind.HALTED: 119,
    OutcomeKind.TRIPLE_FAULT: 120,
    OutcomeKind.PANIC: 121,
    OutcomeKind.EMULATION_FAILURE: 122,
    OutcomeKind.INTERNAL_ERROR: 123,
    OutcomeKind.TIMEOUT: 124,
    OutcomeKind.INTERRUPTED: 130,
}


# Where a panic outcome came from, in its data as {"panic": {"source": ..., ...}} (the report's
# "outcome_data"). The machine's own word (pvpanic) needs no console text; the console rule is
# the fallback for kernels without the pvpanic driver, and applies to Linux guests only.
PANIC_SOURCE_PVPANIC = "pvpanic"  # the guest wrote PVPANIC_PANICKED to the pvpanic port
PANIC_SOURCE_CONSOLE = "console"  # a Linux console's "Kernel panic - not syncing" line
PANIC_SOURCE_CRASH_EVENT = "crash-event"  # KVM_EXIT_SYSTEM_EVENT with KVM_SYSTEM_EVENT_CRASH
PANIC_SOURCES = (PANIC_SOURCE_PVPANIC, PANIC_SOURCE_CONSOLE, PANIC_SOURCE_CRASH_EVENT)


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

    @property
    def outcome_class(self) -> OutcomeClass:
        return self.kind.outcome_class

    def describe(self) -> str:
        text = self.kind.value
        if self.kind in (OutcomeKind.DEBUG_EXIT, OutcomeKind.COMMAND_EXIT):
            text += f" {self.code}"
        if self.detail:
            text += f": {self.detail}"
        return text


def panic_outcome(detail: str, source: str, **facts: object) -> Outcome:
    """A PANIC outcome that says where it came from (PANIC_SOURCES), with `facts` beside it."""
    if source not in PANIC_SOURCES:
        raise ValueError(f"unknown panic source {source!r}")
    return Outcome(OutcomeKind.PANIC, detail, data={"panic": {"source": source, **facts}})


def panic_source(outcome: Outcome) -> str | None:
    """PANIC_SOURCE_* for a panic that recorded its source, None otherwise."""
    if outcome.kind is not OutcomeKind.PANIC:
        return None
    panic = outcome.data.get("panic")
    source = panic.get("source") if isinstance(panic, dict) else None
    return source if isinstance(source, str) else None


# The outcomes a post-mortem is written for (hypervisor.debug.postmortem): the guest did not end
# the run itself. Here, so that a run that ended well never loads the post-mortem code.
CRASH_OUTCOMES = frozenset({OutcomeKind.PANIC, OutcomeKind.TRIPLE_FAULT, OutcomeKind.EMULATION_FAILURE,
                            OutcomeKind.INTERNAL_ERROR, OutcomeKind.TIMEOUT, OutcomeKind.HALTED})  # fmt: skip
# The exits a machine keeps for a post-mortem when one is asked for (--post-mortem, --report).
POST_MORTEM_EXIT_HISTORY = 32


def is_crash(outcome: Outcome) -> bool:
    return outcome.kind in CRASH_OUTCOMES
