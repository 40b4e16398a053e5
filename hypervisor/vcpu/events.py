"""Typed VM exit events: one small immutable value per real exit that reaches Python.

The C loop hands Python a flat, reused `struct pyhv_exit` record; an event is a copy of what that
exit meant, made once per real exit (never for a kick, a signal or an exhausted budget), so it can
be kept, queued or printed after the record has been overwritten (kvm-ioctls' `VcpuExit` is the
model). Events are NamedTuples: immutable, typed and cheap to build on a vCPU thread.

Events are only built when something observes exits (an exit hook, a breakpoint that may match,
the exit history); the hot path without observers never creates one (docs/performance.md).
"""

from __future__ import annotations

from typing import NamedTuple, Union


class PortIo(NamedTuple):
    """An IN/OUT (or string INS/OUTS) access to a device's port range (api.rst KVM_EXIT_IO)."""

    vcpu: int
    port: int
    size: int  # bytes per access: 1, 2 or 4
    # accesses (rep ins/outs); `data` holds size * count bytes. The field shadows tuple.count(),
    # which typeshed declares as a method: no annotation can say "a field replaces it".
    count: int  # type: ignore[assignment]
    is_write: bool
    data: bytes  # written bytes, or for a read the bytes the device returned
    device: str | None  # the bus range's name, e.g. "COM1"
    offset: int  # port minus the range's base
    host_ns: int = 0  # host time spent handling the exit

    @property
    def kind(self) -> str:
        return "io"

    @property
    def address(self) -> int:
        return self.port


class MmioAccess(NamedTuple):
    """A load or store to a device's MMIO range (api.rst KVM_EXIT_MMIO)."""

    vcpu: int
    address: int
    size: int
    is_write: bool
    data: bytes
    device: str | None
    offset: int
    host_ns: int = 0

    @property
    def kind(self) -> str:
        return "mmio"

    @property
    def count(self) -> int:  # type: ignore[override]  # shadows tuple.count() as PortIo's field does
        return 1


class Halt(NamedTuple):
    """KVM_EXIT_HLT: only without an in-kernel LAPIC (pyhv always has one), kept for completeness."""

    vcpu: int
    host_ns: int = 0

    @property
    def kind(self) -> str:
        return "hlt"


class Shutdown(NamedTuple):
    """KVM_EXIT_SHUTDOWN: a triple fault (SDM Vol. 3 §6.15, "Double Fault Exception")."""

    vcpu: int
    host_ns: int = 0

    @property
    def kind(self) -> str:
        return "shutdown"


class DebugTrap(NamedTuple):
    """KVM_EXIT_DEBUG: a single step, a guest-debug breakpoint or a watchpoint (api.rst
    KVM_SET_GUEST_DEBUG); `exception` is 1 (#DB) or 3 (#BP), `dr6` says which condition fired."""

    vcpu: int
    exception: int
    pc: int
    dr6: int
    dr7: int
    host_ns: int = 0

    @property
    def kind(self) -> str:
        return "debug"


class EmulationFailure(NamedTuple):
    """KVM could not emulate an instruction and pyhv's emulator did not either."""

    vcpu: int
    instruction: bytes
    rip: int
    host_ns: int = 0

    @property
    def kind(self) -> str:
        return "emulation-failure"


class InternalError(NamedTuple):
    """KVM_EXIT_INTERNAL_ERROR with a suberror other than an emulation failure."""

    vcpu: int
    suberror: int
    data: tuple[int, ...]
    host_ns: int = 0

    @property
    def kind(self) -> str:
        return "internal-error"


class SystemEvent(NamedTuple):
    """KVM_EXIT_SYSTEM_EVENT: shutdown, reset or crash (api.rst)."""

    vcpu: int
    type: int
    host_ns: int = 0

    @property
    def kind(self) -> str:
        return "system-event"


class EntryFailure(NamedTuple):
    """KVM_EXIT_FAIL_ENTRY: the hardware refused the guest state."""

    vcpu: int
    hardware_reason: int
    host_ns: int = 0

    @property
    def kind(self) -> str:
        return "fail-entry"


class RunError(NamedTuple):
    """KVM_RUN itself failed with `errno`."""

    vcpu: int
    errno: int
    host_ns: int = 0

    @property
    def kind(self) -> str:
        return "run-error"


class OtherExit(NamedTuple):
    """A KVM exit pyhv does not act on (IRQ window, INTR) or does not expect."""

    vcpu: int
    reason: int
    host_ns: int = 0

    @property
    def kind(self) -> str:
        return "other"


ExitEvent = Union[
    PortIo, MmioAccess, Halt, Shutdown, DebugTrap, EmulationFailure, InternalError, SystemEvent, EntryFailure,
    RunError, OtherExit,
]  # fmt: skip
DEVICE_EVENTS = (PortIo, MmioAccess)
EVENT_KINDS = ("io", "mmio", "hlt", "shutdown", "debug", "emulation-failure", "internal-error", "system-event",
               "fail-entry", "run-error", "other")  # fmt: skip


def describe_event(event: ExitEvent) -> str:
    """One line for humans: `vcpu0 io out port=0x3f8 size=1 data=48 (COM1+0)`."""
    if isinstance(event, (PortIo, MmioAccess)):
        direction = ("out" if event.is_write else "in") if isinstance(event, PortIo) else (
            "write" if event.is_write else "read")  # fmt: skip
        where = f"port={event.port:#x}" if isinstance(event, PortIo) else f"addr={event.address:#x}"
        text = f"vcpu{event.vcpu} {event.kind} {direction} {where} size={event.size}"
        if event.count > 1:
            text += f" count={event.count}"
        text += f" data={event.data.hex()}"
        if event.device is not None:
            text += f" ({event.device}+{event.offset:#x})"
        return text
    if isinstance(event, DebugTrap):
        return f"vcpu{event.vcpu} debug exception={event.exception} pc={event.pc:#x} dr6={event.dr6:#x}"
    if isinstance(event, EmulationFailure):
        return f"vcpu{event.vcpu} emulation-failure rip={event.rip:#x} bytes={event.instruction.hex(' ')}"
    fields = ", ".join(f"{name}={value}" for name, value in event._asdict().items() if name not in ("vcpu", "host_ns"))
    return f"vcpu{event.vcpu} {event.kind}" + (f" {fields}" if fields else "")
