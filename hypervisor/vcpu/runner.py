"""The per-vCPU thread body around the C loop: device exits to Python devices, the rest judged.

The loop below is the Python half of the hot path, so it reads the flat C record directly and
keeps per-exit work to a dictionary lookup and one device call (docs/performance.md). Only when
something observes exits (an exit hook, a breakpoint that may match, the exit history, a step)
does it build a typed event (hypervisor.vcpu.events) for the exit, once, after the device served
it; kicks, signals and exhausted budgets are never events.

Parking: whenever the C loop returns because of a kick and a pause is requested, the thread parks
in RunControl.park() outside KVM_RUN, which is the acknowledgement `pause(wait=True)` waits for.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from hypervisor.devices.bus import Bus, Device
from hypervisor.errors import HypervisorError
from hypervisor.kvm.exits import ExitReason, InternalErrorSubtype
from hypervisor.kvm.loop import ExitKind, GuestDebug, exit_buffer, run_function
from hypervisor.outcome import Outcome, OutcomeKind
from hypervisor.vcpu.breakpoints import Breakpoint, BreakpointTable
from hypervisor.vcpu.context import ExitContext
from hypervisor.vcpu.control import RunControl, Stop
from hypervisor.vcpu.dispatch import KvmExitInfo, classify_kvm_exit, dispatch_device_access
from hypervisor.vcpu.events import (
    DebugTrap,
    EmulationFailure,
    EntryFailure,
    ExitEvent,
    Halt,
    InternalError,
    MmioAccess,
    OtherExit,
    PortIo,
    RunError,
    Shutdown,
    SystemEvent,
)

if TYPE_CHECKING:
    from hypervisor.kvm import Vcpu
    from hypervisor.memory import GuestMemory

log = logging.getLogger(__name__)

PIO_IN = ExitKind.PIO_IN
PIO_OUT = ExitKind.PIO_OUT
MMIO_WRITE = ExitKind.MMIO_WRITE
KICKED = ExitKind.KICKED
UART_FLUSH = ExitKind.UART_FLUSH
INTERRUPTED = ExitKind.INTERRUPTED
BUDGET = ExitKind.BUDGET
RUN_ERROR = ExitKind.ERROR
INT3 = 0xCC
VECTOR_BP = 3
EFER_LMA = 1 << 10  # SDM Vol. 3A §2.2.1

# An emulator gets the vCPU and the failing instruction; it returns True when it emulated it.
Emulator = Callable[["Vcpu", bytes], bool]
# A hook sees every real exit that reaches Python, after the device served it: (event, context).
ExitHook = Callable[[ExitEvent, ExitContext], None]


def read_exit_info(vcpu: Vcpu, reason: int) -> KvmExitInfo:
    """Copies what classify_kvm_exit needs out of kvm_run (cold path only)."""
    run = vcpu.run_struct
    if reason == ExitReason.INTERNAL_ERROR:
        count = min(run.internal.ndata, 16)
        return KvmExitInfo(reason, suberror=run.internal.suberror, data=tuple(run.internal.data[0:count]))
    if reason == ExitReason.SYSTEM_EVENT:
        return KvmExitInfo(reason, system_event=run.system_event.type)
    if reason == ExitReason.FAIL_ENTRY:
        return KvmExitInfo(reason, hardware_reason=run.fail_entry.hardware_entry_failure_reason)
    if reason == ExitReason.DEBUG:
        arch = run.debug.arch
        return KvmExitInfo(
            reason, debug={"exception": arch.exception, "pc": arch.pc, "dr6": arch.dr6, "dr7": arch.dr7}
        )
    return KvmExitInfo(reason)


def kvm_exit_event(vcpu_id: int, info: KvmExitInfo) -> ExitEvent:
    """The typed event of a non-device KVM exit."""
    reason = info.reason
    if reason == ExitReason.HLT:
        return Halt(vcpu_id)
    if reason == ExitReason.SHUTDOWN:
        return Shutdown(vcpu_id)
    if reason == ExitReason.SYSTEM_EVENT:
        return SystemEvent(vcpu_id, info.system_event)
    if reason == ExitReason.FAIL_ENTRY:
        return EntryFailure(vcpu_id, info.hardware_reason)
    if reason == ExitReason.DEBUG:
        debug = info.debug
        return DebugTrap(vcpu_id, debug["exception"], debug["pc"], debug["dr6"], debug["dr7"])
    if reason == ExitReason.INTERNAL_ERROR:
        return InternalError(vcpu_id, info.suberror, info.data)
    return OtherExit(vcpu_id, reason)


class VcpuRunner:
    """Runs one vCPU until `control` says stop. `run()` is the thread body; it never raises."""

    def __init__(
        self,
        vcpu: Vcpu,
        pio_bus: Bus,
        mmio_bus: Bus,
        control: RunControl,
        emulator: Emulator | None = None,
        *,
        hooks: list[ExitHook] | None = None,
        breakpoints: BreakpointTable | None = None,
        history: deque[ExitEvent] | None = None,
        memory: GuestMemory | None = None,
        machine: object = None,
        flush_uart: Callable[[], None] | None = None,
    ) -> None:
        self.vcpu = vcpu
        # Sends the bytes the C loop buffered for the UART (a PYHV_EXIT_UART_FLUSH exit).
        self._flush_uart = flush_uart
        self.control = control
        self.emulator = emulator
        self.hooks: list[ExitHook] = hooks if hooks is not None else []
        self.breakpoints = breakpoints if breakpoints is not None else BreakpointTable()
        self.history = history
        self.memory = memory
        self.machine = machine
        self.device_errors = 0
        self.emulated_instructions = 0
        self._pio: dict[int, Device] = {r.device_id: r.device for r in pio_bus.ranges()}
        self._mmio: dict[int, Device] = {r.device_id: r.device for r in mmio_bus.ranges()}
        self._pio_names: dict[int, str] = {r.device_id: r.name for r in pio_bus.ranges()}
        self._mmio_names: dict[int, str] = {r.device_id: r.name for r in mmio_bus.ranges()}
        self._stepping = False

    def run(self) -> None:
        vcpu_id = self.vcpu.id
        self.control.thread_started(vcpu_id)
        try:
            if self._park_if_asked():
                self._loop()
        except HypervisorError as error:
            self.control.request_stop(Outcome(OutcomeKind.HYPERVISOR_ERROR, str(error)))
        except Exception as error:  # a bug of ours must not leave the run hanging
            log.exception("vCPU %d thread failed", vcpu_id)
            self.control.request_stop(Outcome(OutcomeKind.HYPERVISOR_ERROR, f"vCPU thread failed: {error!r}"))
        finally:
            self.vcpu.detach_thread()  # no kick may signal this thread now
            self.control.thread_finished(vcpu_id)

    def _park_if_asked(self) -> bool:
        """Parks while a pause is requested; False when the run is over. Sets up a step."""
        control = self.control
        if control.stop_requested:
            return False
        if self._stepping:  # a step ended without an exit (kicked back)
            self._stepping = False
            control.step_finished(self.vcpu.id, None)
        while control.pause_requested:
            if not control.park(self.vcpu):
                return False
            if control.stepping(self.vcpu.id):
                self._stepping = True
                break
        return not control.stop_requested

    def _loop(self) -> None:
        vcpu = self.vcpu
        control = self.control
        state = vcpu.state
        record = vcpu.exit_record
        run = run_function()
        buffer = exit_buffer
        pio = self._pio
        mmio = self._mmio
        hooks = self.hooks
        table = self.breakpoints
        history = self.history
        while True:
            kind = run(state, record)
            if kind <= MMIO_WRITE:  # one of the four device-access kinds
                is_port = kind <= PIO_OUT
                device = (pio if is_port else mmio)[record.device_id]
                size = record.size
                count = record.count
                data = memoryview(buffer(record.data, size * count))
                # Breakpoints that cannot match this access cost one index lookup here and
                # nothing else: no timing, no event (benchmarks/breakpoints.py).
                candidates = table.candidates(is_port, record.address, size * count) if table.active else ()
                observe = hooks or candidates or history is not None or self._stepping
                started = time.perf_counter_ns() if observe else 0
                try:
                    dispatch_device_access(kind, device, record.offset, size, count, data)
                except Exception:
                    # A device bug, or a guest input a device did not expect: answer and go on.
                    self.device_errors += 1
                    log.exception("device error on %s at %#x", "port" if is_port else "MMIO", record.address)
                if observe and not self._observe_access(kind, is_port, device, data, started, candidates):
                    return
                continue
            if kind == UART_FLUSH:  # the C loop's console buffer took a newline or is full
                if self._flush_uart is not None:
                    self._flush_uart()
                continue
            if kind == KICKED or kind == INTERRUPTED or kind == BUDGET:
                if control.stop_requested:
                    return
                if kind == BUDGET and not control.pause_requested:
                    control.post_stop(Stop("budget", vcpu.id))
                if not self._park_if_asked():
                    return
                continue
            if kind == RUN_ERROR:
                event = RunError(vcpu.id, int(record.error))
                self._notify(event, None, None)
                control.request_stop(
                    Outcome(OutcomeKind.HYPERVISOR_ERROR, f"KVM_RUN failed: {os.strerror(event.errno)}")
                )
                return
            if not self._handle_kvm_exit(int(record.exit_reason)):
                return

    # -- observing exits ---------------------------------------------------------------------

    def _observe_access(
        self, kind: int, is_port: bool, device: Device, data: memoryview, started: int, candidates: Sequence[Breakpoint]
    ) -> bool:
        """Builds the access's event and lets hooks and breakpoints see it; False when the run
        is over."""
        record = self.vcpu.exit_record
        address = int(record.address)
        size = int(record.size)
        count = int(record.count)
        device_id = int(record.device_id)
        names = self._pio_names if is_port else self._mmio_names
        elapsed = time.perf_counter_ns() - started
        event: ExitEvent
        if is_port:
            event = PortIo(self.vcpu.id, address, size, count, kind == PIO_OUT, bytes(data), names.get(device_id),
                           int(record.offset), elapsed)  # fmt: skip
        else:
            event = MmioAccess(self.vcpu.id, address, size, kind == MMIO_WRITE, bytes(data), names.get(device_id),
                               int(record.offset), elapsed)  # fmt: skip
        return self._notify(event, device, data, candidates)

    def _notify(
        self,
        event: ExitEvent,
        device: Device | None,
        data: memoryview | None,
        candidates: Sequence[Breakpoint] | None = None,
    ) -> bool:
        """Hooks, history, breakpoints and a pending step see `event`; parks when one of them
        stops the machine. False when the run is over."""
        if self.history is not None:
            self.history.append(event)
        context = ExitContext(self.vcpu, self.memory, device, data, self.machine)
        for hook in list(self.hooks):
            try:
                hook(event, context)
            except Exception:  # a debugging aid must not kill the vCPU
                log.exception("exit hook %r failed", hook)
        stop: Stop | None = None
        if context.stop_reason is not None:
            stop = Stop("hook", self.vcpu.id, event)
        if candidates is None:
            candidates = self.breakpoints.candidates(False, 0, 0) if self.breakpoints.active else ()
        for breakpoint in candidates:
            if not breakpoint.enabled or not breakpoint.matches(event):
                continue
            if breakpoint.condition is not None and not _safe_call(breakpoint.condition, event, context):
                continue
            breakpoint.hits += 1
            if breakpoint.count is not None and breakpoint.hits < breakpoint.count:
                continue
            if breakpoint.action is not None and _safe_call(breakpoint.action, event, context) is False:
                continue
            if stop is None:
                stop = Stop("breakpoint", self.vcpu.id, event, breakpoint)
        if self._stepping:
            self._stepping = False
            if stop is not None:
                self.control.post_stop(stop)  # first: it answers the step (last_step_stop)
            self.control.step_finished(self.vcpu.id, event)
            return self._park_if_asked()
        if stop is not None:
            self.control.post_stop(stop)
            return self._park_if_asked()
        return not self.control.stop_requested

    # -- non-device exits --------------------------------------------------------------------

    def _handle_kvm_exit(self, reason: int) -> bool:
        """Judges a non-device exit; False when the run is over."""
        vcpu = self.vcpu
        started = time.perf_counter_ns()
        info = read_exit_info(vcpu, reason)
        action = classify_kvm_exit(info)
        if action.emulate is not None:
            return self._handle_emulation(action.emulate.instruction, started)
        event = kvm_exit_event(vcpu.id, info)
        event = event._replace(host_ns=time.perf_counter_ns() - started)
        if action.debug:
            # A debug trap happens only when a debugger enabled guest debugging: stop for it.
            return self._stop_for_debugger(event)
        if not self._notify(event, None, None):
            return False
        if action.stop is not None:
            self.control.request_stop(met_on_vcpu(action.stop, vcpu.id))
            return False
        return True

    def _stop_for_debugger(self, trap: ExitEvent) -> bool:
        """A debug trap stops the machine (it answers a step when one is running) and parks."""
        if self.history is not None:
            self.history.append(trap)
        self.control.post_stop(Stop("debug", self.vcpu.id, trap))
        if self._stepping:
            self._stepping = False
            self.control.step_finished(self.vcpu.id, trap)
        return self._park_if_asked()

    def _handle_emulation(self, insn: bytes, started: int) -> bool:
        vcpu = self.vcpu
        if insn[:1] == bytes([INT3]) and vcpu.guest_debug_control & GuestDebug.USE_SW_BP:
            # On kvm_pvm an int3 at emulated CPL0 comes back as an emulation failure instead of
            # the #BP that KVM_GUESTDBG_USE_SW_BP would report (PLATFORM.md): it is the debugger's
            # software breakpoint, reported as KVM would on hardware virtualization.
            rip = vcpu.get_regs()["rip"]
            return self._stop_for_debugger(DebugTrap(vcpu.id, VECTOR_BP, rip, 0, 0, time.perf_counter_ns() - started))
        if self.emulator is not None and self.emulator(vcpu, insn):
            self.emulated_instructions += 1
            return True
        rip = vcpu.get_regs()["rip"]
        event = EmulationFailure(vcpu.id, insn, rip, time.perf_counter_ns() - started)
        if not self._notify(event, None, None):
            return False
        self.control.request_stop(self._emulation_failure_outcome(insn, rip))
        return False

    def _emulation_failure_outcome(self, insn: bytes, rip: int) -> Outcome:
        """Names the instruction, why pyhv's emulator did not run it, and the host limit it is
        (issue: the bytes alone do not tell a user what stopped the guest)."""
        from hypervisor.kvm import kvm_is_pvm
        from hypervisor.vcpu.emulate import code_bits_from_cs
        from hypervisor.vcpu.insn_names import describe_failure, describe_instruction

        vcpu = self.vcpu
        sregs = vcpu.get_sregs()
        bits = code_bits_from_cs(bool(sregs.efer & EFER_LMA), bool(sregs.cs.l), bool(sregs.cs.db))
        refusal_of = getattr(self.emulator, "refusal", None)
        refusal = refusal_of(vcpu.id) if callable(refusal_of) else None
        detail = describe_failure(insn, rip, code_bits=bits, refusal=refusal, pvm_host=kvm_is_pvm())
        if vcpu.id:
            detail = f"vCPU {vcpu.id}: {detail}"
        data = {"instruction": insn.hex(), "name": describe_instruction(insn, bits), "rip": rip, "vcpu": vcpu.id}
        return Outcome(OutcomeKind.EMULATION_FAILURE, detail, data=data)


def met_on_vcpu(outcome: Outcome, vcpu_id: int) -> Outcome:
    """`outcome` naming the vCPU whose exit ended the run (a triple fault on vCPU 1 of 2 must not
    read as the machine's), as an emulation failure does: "vcpu" in its data (the report's
    outcome_data), and "vCPU N: " before the detail on any vCPU but the boot one."""
    detail = f"vCPU {vcpu_id}: {outcome.detail}" if vcpu_id else outcome.detail
    return dataclasses.replace(outcome, detail=detail, data={**outcome.data, "vcpu": vcpu_id})


def _safe_call(function: Callable[[ExitEvent, ExitContext], object], event: ExitEvent, context: ExitContext) -> object:
    try:
        return function(event, context)
    except Exception:
        log.exception("breakpoint callback %r failed", function)
        return False


__all__ = ["Emulator", "ExitHook", "InternalErrorSubtype", "VcpuRunner", "kvm_exit_event", "read_exit_info"]
