"""What the gdb stub needs from whatever it debugs: the `GdbTarget` protocol and its values.

The stub (stub.py) speaks the protocol; a target (machine_target.py for a pyhv Machine, a fake
in the unit tests) does the work. Threads are vCPU indices (gdb thread id = index + 1, because
gdb reserves 0 for "any" and -1 for "all").
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from hypervisor.errors import HypervisorError


class GdbTargetError(HypervisorError):
    """A request the target cannot carry out (unmapped address, no free debug register...).

    `errno` is what the stub puts in its `E NN` reply (gdb shows the packet failed; the
    number is for the log: 14 EFAULT for memory, 28 ENOSPC for a full DR7, 22 EINVAL).
    """

    def __init__(self, message: str, errno: int = 22) -> None:
        super().__init__(message)
        self.errno = errno


class BreakKind(enum.IntEnum):
    """The Z/z packet types (gdb docs, "Packets": Z0-Z4)."""

    SOFTWARE = 0
    HARDWARE = 1
    WRITE_WATCH = 2
    READ_WATCH = 3
    ACCESS_WATCH = 4


class ResumeAction(enum.Enum):
    CONTINUE = "continue"
    STEP = "step"


# The stop-reply keyword for each watchpoint kind (gdb docs, "Stop Reply Packets").
WATCH_KEYWORDS = {BreakKind.WRITE_WATCH: "watch", BreakKind.READ_WATCH: "rwatch", BreakKind.ACCESS_WATCH: "awatch"}


@dataclass(frozen=True)
class StopEvent:
    """Why the target stopped. `exit_code` set: the run ended (W reply); else a signal stop."""

    vcpu: int = 0
    signal: int = 5  # 5 SIGTRAP for breakpoints and steps, 2 SIGINT for a stop by Ctrl-C
    watch: BreakKind | None = None
    watch_address: int = 0
    software_breakpoint: bool = False
    hardware_breakpoint: bool = False
    exit_code: int | None = None
    description: str = ""
    notice: str = ""  # shown on gdb's console before the stop (an `O` packet): exit breakpoints, the outcome


class GdbTarget(Protocol):
    def vcpu_count(self) -> int: ...

    def attach(self) -> StopEvent:
        """gdb connected: stop the guest (all-stop mode) and say where it is."""
        ...

    def read_registers(self, vcpu: int) -> dict[str, int]:
        """Every register value the target has, by the 64-bit names of target_xml."""
        ...

    def write_registers(self, vcpu: int, values: dict[str, int]) -> None: ...

    def read_memory(self, vcpu: int, address: int, length: int) -> bytes:
        """Virtual memory through vCPU `vcpu`'s page tables; GdbTargetError if not mapped."""
        ...

    def write_memory(self, vcpu: int, address: int, data: bytes) -> None: ...

    def insert_breakpoint(self, kind: BreakKind, address: int, length: int) -> None: ...

    def remove_breakpoint(self, kind: BreakKind, address: int, length: int) -> None: ...

    def remove_all_breakpoints(self) -> None: ...

    def resume(self, action: ResumeAction, vcpu: int) -> None:
        """Lets the guest run (CONTINUE: every vCPU; STEP: only `vcpu`, one instruction)."""
        ...

    def interrupt(self) -> None:
        """Asks a running guest to stop; the stop then arrives through `wait_for_stop`."""
        ...

    def wait_for_stop(self, timeout: float) -> StopEvent | None:
        """The next stop after `resume`, or None when none came within `timeout` seconds."""
        ...

    def detach(self) -> None:
        """gdb leaves: breakpoints are gone, the guest runs on without a debugger."""
        ...

    def kill(self) -> None: ...

    def monitor(self, command: str) -> str:
        """Runs a `monitor` command; returns its output text (GdbTargetError for bad ones)."""
        ...
