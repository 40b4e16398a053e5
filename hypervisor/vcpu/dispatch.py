"""Exit dispatch as plain functions of (exit, devices), so tests can feed synthetic exits.

`dispatch_device_access` routes one port or MMIO access to its device; `classify_kvm_exit`
turns every other KVM exit into an action for the runner. Neither touches KVM.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from hypervisor.devices.bus import Device
from hypervisor.kvm.exits import ExitReason, InternalErrorSubtype, SystemEventType, exit_reason_name
from hypervisor.kvm.loop import ExitKind
from hypervisor.outcome import Outcome, OutcomeKind

log = logging.getLogger(__name__)

PIO_IN = ExitKind.PIO_IN
PIO_OUT = ExitKind.PIO_OUT
MMIO_READ = ExitKind.MMIO_READ
MMIO_WRITE = ExitKind.MMIO_WRITE
READ_KINDS = (PIO_IN, MMIO_READ)


def dispatch_device_access(
    kind: int, device: Device, offset: int, size: int, count: int, buffer: memoryview
) -> None:
    """Lets `device` serve `count` accesses of `size` bytes (string I/O repeats at one port)."""
    if count == 1:
        if kind in READ_KINDS:
            device.read(offset, buffer)
        else:
            device.write(offset, bytes(buffer))
        return
    for index in range(count):
        element = buffer[index * size : (index + 1) * size]
        if kind in READ_KINDS:
            device.read(offset, element)
        else:
            device.write(offset, bytes(element))


@dataclass(frozen=True)
class EmulationRequest:
    """KVM gave up on an instruction; the runner may emulate it (hypervisor.vcpu.emulate)."""

    instruction: bytes


@dataclass(frozen=True)
class ExitAction:
    """What the runner does after a non-device exit: continue, stop, or try emulation."""

    stop: Outcome | None = None
    emulate: EmulationRequest | None = None
    debug: dict[str, int] = field(default_factory=dict)


CONTINUE = ExitAction()


@dataclass(frozen=True)
class KvmExitInfo:
    """The parts of kvm_run a non-device exit is judged by (filled from the C record)."""

    reason: int
    suberror: int = 0
    data: tuple[int, ...] = ()
    system_event: int = 0
    hardware_reason: int = 0
    debug: Mapping[str, int] = field(default_factory=dict)


def classify_kvm_exit(info: KvmExitInfo) -> ExitAction:
    reason = info.reason
    if reason == ExitReason.HLT:
        # Only seen without an in-kernel LAPIC or when a guest halts with interrupts off.
        return ExitAction(stop=Outcome(OutcomeKind.POWER_OFF, "the guest halted"))
    if reason == ExitReason.SHUTDOWN:
        return ExitAction(stop=Outcome(OutcomeKind.TRIPLE_FAULT, "the guest triple-faulted (KVM_EXIT_SHUTDOWN)"))
    if reason == ExitReason.SYSTEM_EVENT:
        if info.system_event == SystemEventType.RESET:
            return ExitAction(stop=Outcome(OutcomeKind.RESET, "the guest reset the machine"))
        if info.system_event == SystemEventType.CRASH:
            return ExitAction(stop=Outcome(OutcomeKind.PANIC, "the guest reported a crash"))
        return ExitAction(stop=Outcome(OutcomeKind.POWER_OFF, "the guest powered off"))
    if reason == ExitReason.INTERNAL_ERROR:
        if info.suberror == InternalErrorSubtype.EMULATION:
            from hypervisor.vcpu.emulate import failure_instruction_bytes  # cold path: load on use

            insn = failure_instruction_bytes(len(info.data), info.data)
            if insn:
                return ExitAction(emulate=EmulationRequest(insn))
            return ExitAction(
                stop=Outcome(OutcomeKind.EMULATION_FAILURE, "KVM could not emulate an instruction")
            )
        try:
            name = InternalErrorSubtype(info.suberror).name
        except ValueError:
            name = str(info.suberror)
        return ExitAction(stop=Outcome(OutcomeKind.INTERNAL_ERROR, f"KVM internal error, suberror {name}"))
    if reason == ExitReason.FAIL_ENTRY:
        return ExitAction(
            stop=Outcome(
                OutcomeKind.INTERNAL_ERROR,
                f"KVM could not enter the guest (hardware reason {info.hardware_reason:#x})",
            )
        )
    if reason == ExitReason.DEBUG:
        return ExitAction(debug=dict(info.debug))
    if reason in (ExitReason.IRQ_WINDOW_OPEN, ExitReason.INTR):
        return CONTINUE
    return ExitAction(
        stop=Outcome(OutcomeKind.INTERNAL_ERROR, f"unexpected exit {exit_reason_name(reason)} ({reason})")
    )
