"""The `GdbTarget` over a pyhv `Machine`: all-stop debugging of every vCPU through KVM.

Built on the run loop's debugging contract (Machine.pause/resume/step_exit/wait_for_stop and
KVM_SET_GUEST_DEBUG, api.rst): gdb's view is always "every vCPU stopped" or "every vCPU runs".
* Software breakpoints are int3 bytes in guest memory (software_breakpoints.py) with
  KVM_GUESTDBG_USE_SW_BP, so the #BP exits to us instead of reaching the guest.
* Hardware breakpoints and watchpoints go in DR0-DR3/DR7 (debug_registers.py) with
  KVM_GUESTDBG_USE_HW_BP.
* A single step sets KVM_GUESTDBG_SINGLESTEP on one vCPU and runs it exit by exit
  (step_exit) until the #DB arrives; device exits on the way are served as usual.
* Continuing from an int3 of ours steps over it first (original byte back, one step, int3
  again); continuing from an instruction breakpoint sets RFLAGS.RF so it does not fire again
  at once (SDM Vol. 3B §17.3.1.1).
Steps and continues run on a worker thread so that the gdb connection stays responsive (and
can deliver Ctrl-C); results come back as StopEvents through `wait_for_stop`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from hypervisor.debug.gdb.debug_registers import DR6_SINGLE_STEP, DebugRegisters
from hypervisor.debug.gdb.monitor import MonitorCommands
from hypervisor.debug.gdb.registers import MSR_KERNEL_GS_BASE, apply_fpu, apply_system, collect, split_writes
from hypervisor.debug.gdb.software_breakpoints import SoftwareBreakpoints
from hypervisor.debug.gdb.target import BreakKind, GdbTargetError, ResumeAction, StopEvent
from hypervisor.errors import GuestMemoryError, HypervisorError
from hypervisor.kvm.loop import GuestDebug
from hypervisor.outcome import Outcome, OutcomeKind
from hypervisor.vcpu.events import DebugTrap

if TYPE_CHECKING:
    from hypervisor.machine import Machine
    from hypervisor.vcpu.control import Stop

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
EFAULT = 14
SIGINT = 2
SIGTRAP = 5
VECTOR_DB = 1
VECTOR_BP = 3
RFLAGS_RF = 1 << 16  # resume flag: suppresses instruction breakpoints for one instruction
PAUSE_TIMEOUT = 5.0
STEP_SLICE = 0.25  # step_exit waits this long at a time, so Ctrl-C can end a long step
STEP_EXITS_LIMIT = 100_000  # device exits one instruction may cause (rep outs) before we give up
# A vCPU that makes no exit for this long while stepped is halted or waits for a SIPI: the step
# ends with a stop instead of hanging gdb (Ctrl-C ends it sooner).
STEP_IDLE_SECONDS = 5.0
START_WAIT_SECONDS = 5.0  # how long a client that connects early waits for the machine to start
WRITE_UNDER_READ_WATCH = "write under a read watchpoint"


class MachineTarget:
    def __init__(self, machine: Machine) -> None:
        assert machine.memory is not None
        self.machine = machine
        self.memory = machine.memory
        self.hardware = DebugRegisters()
        self.software = SoftwareBreakpoints(self.memory.read, self.memory.write)
        self._software_at: dict[int, int] = {}  # linear address gdb gave -> gpa of the int3
        self.monitor_commands = MonitorCommands(machine)
        self._stops: queue.Queue[StopEvent] = queue.Queue()
        self._interrupted = threading.Event()
        self._worker: threading.Thread | None = None
        self._first_attach = True
        self.step_idle_seconds = STEP_IDLE_SECONDS
        self._read_watch_values: dict[tuple[int, int], bytes] = {}
        self._last_vcpu = 0

    # -- attach, detach, kill -------------------------------------------------------------------

    def vcpu_count(self) -> int:
        return len(self.machine.vcpus)

    def attach(self) -> StopEvent:
        finished = self._finished_stop()
        if finished is not None:
            return finished
        self._wait_for_start()
        self._pause()
        signal = SIGTRAP if self._first_attach else SIGINT  # before the first instruction: a trap
        self._first_attach = False
        for stop in self.machine.control.pending_stops():
            log.debug("gdb attach: dropping the stale stop %s", stop.describe())
        return StopEvent(vcpu=0, signal=signal, description="attached")

    def detach(self) -> None:
        self._end_worker()
        if self._finished_stop() is not None:
            return
        self._pause()
        self.remove_all_breakpoints()
        for vcpu in self.machine.vcpus:
            vcpu.set_guest_debug(0)
        self.machine.control.pending_stops()
        self.machine.resume()

    def kill(self) -> None:
        self._end_worker()
        self.machine.request_stop(Outcome(OutcomeKind.INTERRUPTED, "killed from gdb"))

    # -- registers and memory -----------------------------------------------------------------------

    def read_registers(self, vcpu: int) -> dict[str, int]:
        kvm_vcpu = self.machine.vcpus[vcpu]
        try:
            msrs = kvm_vcpu.get_msrs([MSR_KERNEL_GS_BASE])
        except HypervisorError:
            msrs = {}
        return collect(kvm_vcpu.get_regs(), kvm_vcpu.get_sregs(), kvm_vcpu.get_fpu(), msrs)

    def write_registers(self, vcpu: int, values: dict[str, int]) -> None:
        kvm_vcpu = self.machine.vcpus[vcpu]
        gprs, system, fpu, msrs = split_writes(values)
        if gprs:
            kvm_vcpu.set_regs(**gprs)
        if system:
            kvm_vcpu.set_sregs(apply_system(kvm_vcpu.get_sregs(), system))
        if fpu:
            kvm_vcpu.set_fpu_state(apply_fpu(kvm_vcpu.get_fpu(), fpu))
        if msrs:
            kvm_vcpu.set_msrs(msrs)

    def _pieces(self, vcpu: int, address: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(offset, gpa, size) per page of a virtual range, through the vCPU's page tables;
        GdbTargetError at the first page that is not guest RAM."""
        offset = 0
        kvm_vcpu = self.machine.vcpus[vcpu]
        while offset < length:
            linear = (address + offset) & 0xFFFF_FFFF_FFFF_FFFF
            size = min(length - offset, PAGE_SIZE - linear % PAGE_SIZE)
            gpa = kvm_vcpu.translate(linear)
            if gpa is None or not self.memory.contains(gpa, size):
                raise GdbTargetError(f"{linear:#x} is not mapped to guest RAM", EFAULT)
            yield offset, gpa, size
            offset += size

    def read_memory(self, vcpu: int, address: int, length: int) -> bytes:
        data = bytearray()
        try:
            for _, gpa, size in self._pieces(vcpu, address, length):
                data += self.software.shadow(gpa, self.memory.read(gpa, size))
        except GdbTargetError:
            if not data:
                raise
        except GuestMemoryError as error:
            raise GdbTargetError(str(error), EFAULT) from error
        return bytes(data)  # a read that runs into an unmapped page returns what it could read

    def write_memory(self, vcpu: int, address: int, data: bytes) -> None:
        try:
            # Every page is translated before the first byte is written: all or nothing.
            for offset, gpa, size in list(self._pieces(vcpu, address, len(data))):
                self.memory.write(gpa, self.software.write_through(gpa, data[offset : offset + size]))
        except GuestMemoryError as error:
            raise GdbTargetError(str(error), EFAULT) from error

    # -- breakpoints ---------------------------------------------------------------------------------

    def insert_breakpoint(self, kind: BreakKind, address: int, length: int) -> None:
        if kind is BreakKind.SOFTWARE:
            gpa = next(self._pieces(self._last_vcpu, address, 1))[1]
            self.software.insert(gpa)
            self._software_at[address] = gpa
        else:
            self.hardware.insert(kind, address, length)

    def remove_breakpoint(self, kind: BreakKind, address: int, length: int) -> None:
        if kind is BreakKind.SOFTWARE:
            gpa = self._software_at.pop(address, None)
            if gpa is None:
                raise GdbTargetError(f"no software breakpoint at {address:#x}")
            if gpa not in self._software_at.values():
                self.software.remove(gpa)
        else:
            self.hardware.remove(kind, address, length)

    def remove_all_breakpoints(self) -> None:
        self.software.clear()
        self._software_at.clear()
        self.hardware.clear()

    def _apply_guest_debug(self, step_vcpu: int | None = None) -> None:
        control = 0
        if len(self.software):
            control |= GuestDebug.USE_SW_BP
        if self.hardware.in_use:
            control |= GuestDebug.USE_HW_BP
        registers = self.hardware.values()
        for index, vcpu in enumerate(self.machine.vcpus):
            flags = control | (GuestDebug.SINGLESTEP if index == step_vcpu else 0)
            vcpu.set_guest_debug(GuestDebug.ENABLE | flags if flags else 0, registers)

    # -- running -------------------------------------------------------------------------------------

    def resume(self, action: ResumeAction, vcpu: int) -> None:
        self._end_worker()
        self._interrupted.clear()
        self._snapshot_read_watches()
        work = self._step if action is ResumeAction.STEP else self._continue
        self._worker = threading.Thread(target=self._run_worker, args=(work, vcpu), name="gdb-resume", daemon=True)
        self._worker.start()

    def _run_worker(self, work: object, vcpu: int) -> None:
        try:
            stop = work(vcpu)  # type: ignore[operator]
        except Exception as error:  # a KVM failure while stepping: report a stop, keep the guest
            log.exception("gdb: resuming vCPU %d failed", vcpu)
            stop = StopEvent(vcpu=vcpu, signal=SIGTRAP, description=f"resume failed: {error}")
        if stop is not None:
            self._stops.put(stop)

    def _step(self, vcpu: int) -> StopEvent:
        return self._single_step(vcpu) or StopEvent(vcpu=vcpu, signal=SIGTRAP, description="step")

    def _single_step(self, vcpu: int) -> StopEvent | None:
        """One instruction on `vcpu` (over our int3 if it sits on one); None for a plain step."""
        under = self._software_gpa_at_pc(vcpu)
        if under is not None:
            self.software.remove(under)
        try:
            self._apply_guest_debug(step_vcpu=vcpu)
            idle_since = time.monotonic()
            for _ in range(STEP_EXITS_LIMIT):
                event = self.machine.step_exit(vcpu, timeout=STEP_SLICE)
                finished = self._finished_stop()
                if finished is not None:
                    return finished
                if event is None:
                    if self._interrupted.is_set():
                        return StopEvent(vcpu=vcpu, signal=SIGINT, description="step interrupted")
                    if time.monotonic() - idle_since >= self.step_idle_seconds:
                        notice = f"pyhv: vCPU {vcpu} did not finish the instruction in {self.step_idle_seconds:g} s"
                        return StopEvent(vcpu=vcpu, description="step timed out", notice=notice + " (halted?)")
                    continue
                idle_since = time.monotonic()
                met = self.machine.last_step_stop
                if isinstance(event, DebugTrap):
                    stop = self._debug_stop(event)
                    return None if stop.description == "step" else stop
                if met is not None:
                    return StopEvent(vcpu=vcpu, signal=SIGTRAP, description=met.describe())
            return StopEvent(vcpu=vcpu, signal=SIGTRAP, description="step did not end")
        finally:
            if under is not None:
                self.software.insert(under)  # the int3 goes back over the restored byte
            if self._finished_stop() is None:
                self._apply_guest_debug()

    def _continue(self, vcpu: int) -> StopEvent | None:
        for index in range(self.vcpu_count()):
            if self._software_gpa_at_pc(index) is not None:
                stop = self._single_step(index)
                if stop is not None:
                    return stop
        self._apply_guest_debug()
        self._suppress_instruction_breakpoints()
        self.machine.control.pending_stops()  # nothing queued before this resume is news to gdb
        self.machine.resume()
        return None  # the stop comes through machine.wait_for_stop

    def _software_gpa_at_pc(self, vcpu: int) -> int | None:
        if not len(self.software):
            return None
        try:
            gpa = next(self._pieces(vcpu, self._linear_pc(vcpu), 1))[1]
        except GdbTargetError:
            return None
        return gpa if gpa in self.software else None

    def _linear_pc(self, vcpu: int) -> int:
        kvm_vcpu = self.machine.vcpus[vcpu]
        return (kvm_vcpu.get_sregs().cs.base + kvm_vcpu.get_regs()["rip"]) & 0xFFFF_FFFF_FFFF_FFFF

    def _suppress_instruction_breakpoints(self) -> None:
        executes = {slot.address for slot in self.hardware.slots if slot and slot.kind is BreakKind.HARDWARE}
        if not executes:
            return
        for index, vcpu in enumerate(self.machine.vcpus):
            if self._linear_pc(index) in executes:
                vcpu.set_regs(rflags=vcpu.get_regs()["rflags"] | RFLAGS_RF)

    def interrupt(self) -> None:
        self._interrupted.set()
        worker = self._worker
        if worker is not None and worker.is_alive():
            return  # a step in progress sees the flag and reports SIGINT
        self._pause()
        stops = self.machine.control.pending_stops()
        if stops:
            self._stops.put(self._convert(stops[0]))
        else:
            self._stops.put(StopEvent(vcpu=self._last_vcpu, signal=SIGINT, description="interrupted"))

    def wait_for_stop(self, timeout: float) -> StopEvent | None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                stop = self._stops.get_nowait()
            except queue.Empty:
                worker = self._worker
                remaining = deadline - time.monotonic()
                if worker is not None and worker.is_alive():
                    worker.join(max(remaining, 0))
                    if worker.is_alive():
                        return None
                    continue
                machine_stop = self.machine.wait_for_stop(max(remaining, 0))
                if machine_stop is None:
                    return None
                stop = self._convert(machine_stop)
                if stop.description == WRITE_UNDER_READ_WATCH:
                    self._continue(stop.vcpu)  # not a read: run on as if nothing happened
                    continue
            if stop.exit_code is None:
                self._pause()  # all-stop: every vCPU is parked while gdb looks
                self._last_vcpu = stop.vcpu
            return stop

    # -- stops -----------------------------------------------------------------------------------------

    def _convert(self, stop: Stop) -> StopEvent:
        if stop.reason == "finished":
            return self._finished_stop() or StopEvent(exit_code=0)
        vcpu = stop.vcpu if stop.vcpu is not None else 0
        if stop.reason == "debug" and isinstance(stop.event, DebugTrap):
            return self._debug_stop(stop.event)
        return StopEvent(vcpu=vcpu, signal=SIGTRAP, description=stop.describe(), notice=f"pyhv: {stop.describe()}")

    def _snapshot_read_watches(self) -> None:
        """The watched bytes of every read watchpoint, to tell its reads from its writes."""
        self._read_watch_values = {}
        for slot in self.hardware.slots:
            if slot is not None and slot.kind is BreakKind.READ_WATCH:
                key = (slot.request_address, slot.request_length)
                try:
                    self._read_watch_values[key] = self.read_memory(self._last_vcpu, *key)
                except GdbTargetError:
                    continue

    def _was_written(self, stop: StopEvent) -> bool:
        """A read watchpoint hit that changed the value: the access was a write (DR7 has no
        read-only condition, SDM Vol. 3B §17.2.5), so it is not gdb's read watchpoint."""
        for (address, length), before in self._read_watch_values.items():
            if address == stop.watch_address:
                try:
                    after = self.read_memory(stop.vcpu, address, length)
                except GdbTargetError:
                    return False
                self._read_watch_values[(address, length)] = after
                return after != before
        return False

    def _debug_stop(self, trap: DebugTrap) -> StopEvent:
        vcpu = trap.vcpu
        if trap.exception == VECTOR_BP:
            if self._software_gpa_at_pc(vcpu) is not None:
                return StopEvent(vcpu=vcpu, software_breakpoint=True, description="software breakpoint")
            # Some exits report rip after the int3; gdb wants the breakpoint's address.
            regs = self.machine.vcpus[vcpu].get_regs()
            self.machine.vcpus[vcpu].set_regs(rip=regs["rip"] - 1)
            if self._software_gpa_at_pc(vcpu) is not None:
                return StopEvent(vcpu=vcpu, software_breakpoint=True, description="software breakpoint")
            self.machine.vcpus[vcpu].set_regs(rip=regs["rip"])
            return StopEvent(vcpu=vcpu, description="int3 in the guest")
        slot = self.hardware.hit(trap.dr6)
        if slot is not None and slot.kind is BreakKind.HARDWARE:
            return StopEvent(vcpu=vcpu, hardware_breakpoint=True, description="hardware breakpoint")
        if slot is not None:
            stop = StopEvent(vcpu=vcpu, watch=slot.kind, watch_address=slot.request_address, description="watchpoint")
            if slot.kind is BreakKind.READ_WATCH and self._was_written(stop):
                return StopEvent(vcpu=vcpu, description=WRITE_UNDER_READ_WATCH)
            return stop
        if trap.dr6 & DR6_SINGLE_STEP:
            return StopEvent(vcpu=vcpu, description="step")
        return StopEvent(vcpu=vcpu, description=f"debug exception {trap.exception}")

    def _finished_stop(self) -> StopEvent | None:
        outcome = self.machine.control.outcome
        if outcome is None:
            return None
        return StopEvent(exit_code=outcome.exit_status, description=outcome.describe(),
                         notice=f"pyhv: {outcome.describe()}")  # fmt: skip

    def _wait_for_start(self) -> None:
        """The server listens before `machine.start(paused=True)` runs: a gdb that connects in
        between must not pause and resume a machine whose start would then pause it again."""
        deadline = time.monotonic() + START_WAIT_SECONDS
        while len(self.machine.runners) < len(self.machine.vcpus) and time.monotonic() < deadline:
            time.sleep(0.01)

    def _pause(self) -> None:
        if not self.machine.pause(wait=True, timeout=PAUSE_TIMEOUT):
            log.warning("gdb: the vCPUs did not all park within %g s", PAUSE_TIMEOUT)

    def _end_worker(self) -> None:
        worker = self._worker
        if worker is not None and worker.is_alive():
            self._interrupted.set()
            worker.join(PAUSE_TIMEOUT)
        self._worker = None

    # -- monitor ---------------------------------------------------------------------------------------

    def monitor(self, command: str) -> str:
        return self.monitor_commands.run(command)

    def close(self) -> None:
        self.monitor_commands.close()
