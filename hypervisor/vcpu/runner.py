"""The per-vCPU thread body around the C loop: device exits to Python devices, the rest judged.

The loop below is the Python half of the hot path, so it reads the flat C record directly and
keeps per-exit work to a dictionary lookup and one device call (docs/performance.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from hypervisor.devices.bus import Bus, Device
from hypervisor.errors import HypervisorError
from hypervisor.kvm.ffi import ffi, lib
from hypervisor.outcome import Outcome, OutcomeKind
from hypervisor.vcpu.control import RunControl
from hypervisor.vcpu.dispatch import (
    MMIO_WRITE,
    PIO_OUT,
    KvmExitInfo,
    classify_kvm_exit,
    dispatch_device_access,
)

if TYPE_CHECKING:
    from hypervisor.kvm import Vcpu

log = logging.getLogger(__name__)

KICKED = lib.PYHV_EXIT_KICKED
INTERRUPTED = lib.PYHV_EXIT_INTERRUPTED
BUDGET = lib.PYHV_EXIT_BUDGET
RUN_ERROR = lib.PYHV_EXIT_ERROR

# An emulator gets the vCPU and the failing instruction; it returns True when it emulated it.
Emulator = Callable[["Vcpu", bytes], bool]
# A hook sees every exit that reaches Python: (vcpu, exit record); the debugger's entry point.
ExitHook = Callable[["Vcpu", object], None]


def read_exit_info(vcpu: Vcpu, reason: int) -> KvmExitInfo:
    """Copies what classify_kvm_exit needs out of kvm_run (cold path only)."""
    run = vcpu.run_struct
    if reason == lib.KVM_EXIT_INTERNAL_ERROR:
        count = min(run.internal.ndata, 16)
        return KvmExitInfo(reason, suberror=run.internal.suberror, data=tuple(run.internal.data[0:count]))
    if reason == lib.KVM_EXIT_SYSTEM_EVENT:
        return KvmExitInfo(reason, system_event=run.system_event.type)
    if reason == lib.KVM_EXIT_FAIL_ENTRY:
        return KvmExitInfo(reason, hardware_reason=run.fail_entry.hardware_entry_failure_reason)
    if reason == lib.KVM_EXIT_DEBUG:
        arch = run.debug.arch
        return KvmExitInfo(
            reason, debug={"exception": arch.exception, "pc": arch.pc, "dr6": arch.dr6, "dr7": arch.dr7}
        )
    return KvmExitInfo(reason)


class VcpuRunner:
    """Runs one vCPU until `control` says stop. `run()` is the thread body; it never raises."""

    def __init__(
        self,
        vcpu: Vcpu,
        pio_bus: Bus,
        mmio_bus: Bus,
        control: RunControl,
        emulator: Emulator | None = None,
    ) -> None:
        self.vcpu = vcpu
        self.control = control
        self.emulator = emulator
        self.hooks: list[ExitHook] = []
        self.device_errors = 0
        self.emulated_instructions = 0
        self._pio: dict[int, Device] = {r.device_id: r.device for r in pio_bus.ranges()}
        self._mmio: dict[int, Device] = {r.device_id: r.device for r in mmio_bus.ranges()}

    def run(self) -> None:
        try:
            self._loop()
        except HypervisorError as error:
            self.control.request_stop(Outcome(OutcomeKind.HYPERVISOR_ERROR, str(error)))
        except Exception as error:  # a bug of ours must not leave the run hanging
            log.exception("vCPU %d thread failed", self.vcpu.id)
            self.control.request_stop(Outcome(OutcomeKind.HYPERVISOR_ERROR, f"vCPU thread failed: {error!r}"))
        finally:
            lib.pyhv_vcpu_detach_thread(self.vcpu.state)  # no kick may signal this thread now

    def _loop(self) -> None:
        vcpu = self.vcpu
        control = self.control
        state = vcpu.state
        record = vcpu.exit_record
        run = lib.pyhv_vcpu_run
        buffer = ffi.buffer
        pio = self._pio
        mmio = self._mmio
        hooks = self.hooks
        while True:
            kind = run(state, record)
            if hooks:
                for hook in hooks:
                    hook(vcpu, record)
            if kind <= MMIO_WRITE:  # one of the four device-access kinds
                devices = pio if kind <= PIO_OUT else mmio
                size = record.size
                count = record.count
                try:
                    dispatch_device_access(
                        kind, devices[record.device_id], record.offset, size, count,
                        memoryview(buffer(record.data, size * count)),
                    )  # fmt: skip
                except Exception:
                    # A device bug, or a guest input a device did not expect: answer and go on.
                    self.device_errors += 1
                    log.exception("device error on %s at %#x", "port" if kind <= PIO_OUT else "MMIO", record.address)
                continue
            if kind == KICKED or kind == INTERRUPTED or kind == BUDGET:
                if control.stop_requested:
                    return
                if kind == BUDGET:
                    control.pause()
                if control.paused:
                    control.wait_while_paused()
                    if control.stop_requested:
                        return
                continue
            if kind == RUN_ERROR:
                import os

                control.request_stop(
                    Outcome(OutcomeKind.HYPERVISOR_ERROR, f"KVM_RUN failed: {os.strerror(record.error)}")
                )
                return
            if not self._handle_kvm_exit(record.exit_reason):
                return

    def _handle_kvm_exit(self, reason: int) -> bool:
        """Judges a non-device exit; False when the run is over."""
        action = classify_kvm_exit(read_exit_info(self.vcpu, reason))
        if action.emulate is not None:
            insn = action.emulate.instruction
            if self.emulator is not None and self.emulator(self.vcpu, insn):
                self.emulated_instructions += 1
                return True
            regs = self.vcpu.get_regs()
            self.control.request_stop(
                Outcome(
                    OutcomeKind.EMULATION_FAILURE,
                    f"KVM could not emulate the instruction {insn.hex(' ')} at rip {regs['rip']:#x}",
                    data={"instruction": insn.hex(), "rip": regs["rip"]},
                )
            )
            return False
        if action.stop is not None:
            self.control.request_stop(action.stop)
            return False
        if action.debug:
            # Debug exits only happen when a debugger enabled them: pause for it.
            self.control.pause()
            self.control.wait_while_paused()
            return not self.control.stop_requested
        return True
