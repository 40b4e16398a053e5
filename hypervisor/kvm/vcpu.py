"""A KVM vCPU file descriptor: registers, MSRs, CPUID, LAPIC, events, debug, and the run loop.

The run loop itself is C (csrc/vcpu_loop.c); this class owns its `struct pyhv_vcpu` (the mmap of
kvm_run, the frozen range tables, the counters) and exposes it to Python.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from hypervisor.errors import KvmError
from hypervisor.kvm.ffi import ffi, ioctl, lib, read_struct, write_struct
from hypervisor.kvm.fpu import fpu_from_xsave, xsave_with_fpu
from hypervisor.kvm.registers import FpuState, LapicState, SystemRegisters
from hypervisor.kvm.stats import VcpuStats, read_stats

if TYPE_CHECKING:
    from hypervisor.kvm.protocols import CpuidLeaf
    from hypervisor.kvm.uart import UartTransmitBuffer
    from hypervisor.kvm.vm import Vm

log = logging.getLogger(__name__)

GPR_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
)  # fmt: skip

MP_STATE_HALTED: int = lib.KVM_MP_STATE_HALTED  # api.rst KVM_GET_MP_STATE
MP_STATE_INIT_RECEIVED: int = lib.KVM_MP_STATE_INIT_RECEIVED  # an AP waiting for its SIPI
MP_STATE_RUNNABLE: int = lib.KVM_MP_STATE_RUNNABLE
_kick_handler_installed = False


class CpuidRecord(NamedTuple):
    """One entry of the vCPU's CPUID (struct kvm_cpuid_entry2), as KVM_GET_CPUID2 gives it."""

    function: int
    # The subleaf (struct kvm_cpuid_entry2's name). It shadows tuple.index(), which typeshed
    # declares as a method: no annotation can say "a field replaces it".
    index: int  # type: ignore[assignment]
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


# KVM_GET_CPUID2 fails with E2BIG below the vCPU's entry count; KVM allows at most 256 entries
# (KVM_MAX_CPUID_ENTRIES in arch/x86/include/asm/kvm_host.h).
MAX_CPUID_ENTRIES = 256
XCR0 = 0  # XCR_XFEATURE_ENABLED_MASK (SDM Vol. 1 §13.3)


@dataclass(frozen=True)
class VcpuEvents:
    """The parts of struct kvm_vcpu_events pyhv reads (api.rst KVM_GET_VCPU_EVENTS)."""

    exception_injected: bool
    exception_pending: bool
    exception_vector: int
    interrupt_injected: bool
    interrupt_vector: int
    nmi_injected: bool
    nmi_pending: bool
    nmi_masked: bool

    @property
    def anything_pending(self) -> bool:
        return (self.exception_injected or self.exception_pending or self.interrupt_injected
                or self.nmi_injected or self.nmi_pending)  # fmt: skip


@dataclass(frozen=True)
class TableRange:
    """One entry of the C loop's range table (see csrc/vcpu_loop.h)."""

    base: int
    size: int
    device_id: int
    sink: bool = False
    fill: int = 0xFF
    uart: bool = False  # the UART whose THR/LSR the loop may serve (attach_uart)


def _install_kick_handler() -> None:
    global _kick_handler_installed
    if not _kick_handler_installed:
        result = lib.pyhv_install_kick_handler()
        if result < 0:
            raise KvmError("sigaction(kick signal)", -result)
        _kick_handler_installed = True


class Vcpu:
    def __init__(self, vm: Vm, fd: int, vcpu_id: int, run_size: int) -> None:
        self.vm = vm
        self.fd = fd
        self.id = vcpu_id
        _install_kick_handler()
        self.state = ffi.new("struct pyhv_vcpu *")
        result = lib.pyhv_vcpu_map_run(self.state, fd, run_size)
        if result < 0:
            raise KvmError("mmap(kvm_run)", -result)
        self.run_struct = self.state.run
        self.exit_record = ffi.new("struct pyhv_exit *")
        self.guest_debug_control = 0  # the KVM_GUESTDBG_* flags last set (the runner reads them)
        self._has_xsave: bool | None = None  # KVM_GET_XSAVE answered; None until first asked
        self._uart: UartTransmitBuffer | None = None

    # -- general purpose registers ---------------------------------------------------------

    def get_regs(self) -> dict[str, int]:
        regs = ffi.new("struct kvm_regs *")
        ioctl(self.fd, "KVM_GET_REGS", regs)
        return {name: getattr(regs, name) for name in GPR_NAMES}

    def set_regs(self, **values: int) -> None:
        """Sets the named registers (rax=..., rip=...), leaving the others as they are."""
        regs = ffi.new("struct kvm_regs *")
        ioctl(self.fd, "KVM_GET_REGS", regs)
        for name, value in values.items():
            if name not in GPR_NAMES:
                raise ValueError(f"unknown register {name!r}")
            setattr(regs, name, value & 0xFFFF_FFFF_FFFF_FFFF)
        ioctl(self.fd, "KVM_SET_REGS", regs)

    # -- system registers ------------------------------------------------------------------

    def get_sregs(self) -> SystemRegisters:
        """The special registers; change a copy (dataclasses.replace) and pass it to set_sregs."""
        return SystemRegisters.from_bytes(read_struct(self.fd, "KVM_GET_SREGS", "struct kvm_sregs"))

    def set_sregs(self, sregs: SystemRegisters) -> None:
        write_struct(self.fd, "KVM_SET_SREGS", "struct kvm_sregs", sregs.to_bytes())

    def get_fpu(self) -> FpuState:
        """The x87/SSE state, read through KVM_GET_XSAVE where the host has it (KVM_GET_FPU
        reads stale registers for a component in its initial state: see hypervisor/kvm/fpu.py)."""
        area = self._xsave_area()
        if area is not None:
            return fpu_from_xsave(area)
        return FpuState.from_bytes(read_struct(self.fd, "KVM_GET_FPU", "struct kvm_fpu"))

    def set_fpu(self, fcw: int = 0x37F, mxcsr: int = 0x1F80) -> None:
        """Resets the x87/SSE state to the values the boot protocol expects (FNINIT, SDM 8.1.10)."""
        fpu = ffi.new("struct kvm_fpu *", {"fcw": fcw, "mxcsr": mxcsr})
        ioctl(self.fd, "KVM_SET_FPU", fpu)

    def set_fpu_state(self, fpu: FpuState) -> None:
        """Writes an FpuState (get_fpu's, changed by the caller) through KVM_SET_XSAVE with the
        x87 and SSE components marked present where the host has XSAVE, so that the guest sees
        the new registers (KVM_SET_FPU's are lost when a component was in its initial state)."""
        area = self._xsave_area()
        if area is None:
            write_struct(self.fd, "KVM_SET_FPU", "struct kvm_fpu", fpu.to_bytes())
            return
        write_struct(self.fd, "KVM_SET_XSAVE", "struct kvm_xsave", xsave_with_fpu(area, fpu))

    def _xsave_area(self) -> bytes | None:
        """KVM_GET_XSAVE's area, or None on a host without KVM_CAP_XSAVE (asked once)."""
        if self._has_xsave is False:
            return None
        try:
            area = read_struct(self.fd, "KVM_GET_XSAVE", "struct kvm_xsave")
        except KvmError as error:
            log.debug("vCPU %d: no KVM_GET_XSAVE (%s): the FPU ioctls are used", self.id, error)
            self._has_xsave = False
            return None
        self._has_xsave = True
        return area

    def get_msrs(self, indices: Sequence[int]) -> dict[int, int]:
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for slot, index in enumerate(indices):
            msrs.entries[slot].index = index
        count = ioctl(self.fd, "KVM_GET_MSRS", msrs)
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(count)}

    def set_msrs(self, values: dict[int, int]) -> None:
        items = list(values.items())
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(items), "entries": len(items)})
        for slot, (index, data) in enumerate(items):
            msrs.entries[slot].index = index
            msrs.entries[slot].data = data
        written = ioctl(self.fd, "KVM_SET_MSRS", msrs)
        if written != len(items):
            failed = items[written][0]
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, f"MSR {failed:#x} was refused")

    def set_cpuid(self, entries: Iterable[CpuidLeaf]) -> None:
        entry_list = list(entries)
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": len(entry_list), "entries": len(entry_list)})
        for slot, entry in enumerate(entry_list):
            target = cpuid.entries[slot]
            for field in ("function", "index", "flags", "eax", "ebx", "ecx", "edx"):
                setattr(target, field, getattr(entry, field))
        ioctl(self.fd, "KVM_SET_CPUID2", cpuid)

    def get_lapic(self) -> LapicState:
        """The in-kernel local APIC's register page (api.rst KVM_GET_LAPIC)."""
        return LapicState(read_struct(self.fd, "KVM_GET_LAPIC", "struct kvm_lapic_state"))

    def set_lapic(self, lapic: LapicState) -> None:
        write_struct(self.fd, "KVM_SET_LAPIC", "struct kvm_lapic_state", lapic.registers)

    def get_mp_state(self) -> int:
        state = ffi.new("struct kvm_mp_state *")
        ioctl(self.fd, "KVM_GET_MP_STATE", state)
        return int(state.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        ioctl(self.fd, "KVM_SET_MP_STATE", ffi.new("struct kvm_mp_state *", {"mp_state": mp_state}))

    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        result = lib.pyhv_vcpu_inject_exception(
            self.state, vector, int(error_code is not None), error_code or 0
        )
        if result < 0:
            raise KvmError("KVM_SET_VCPU_EVENTS", -result)

    def set_guest_debug(self, control: int, debugregs: Sequence[int] = ()) -> None:
        """KVM_SET_GUEST_DEBUG with KVM_GUESTDBG_* flags; debugregs are DR0-DR7."""
        debug = ffi.new("struct kvm_guest_debug *", {"control": control})
        for index, value in enumerate(debugregs[:8]):
            debug.arch.debugreg[index] = value
        ioctl(self.fd, "KVM_SET_GUEST_DEBUG", debug)
        self.guest_debug_control = control

    def get_cpuid(self) -> list[CpuidRecord]:
        """The CPUID this vCPU's guest sees (KVM_GET_CPUID2, api.rst 4.47)."""
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": MAX_CPUID_ENTRIES, "entries": MAX_CPUID_ENTRIES})
        ioctl(self.fd, "KVM_GET_CPUID2", cpuid)
        return [
            CpuidRecord(int(e.function), int(e.index), int(e.flags), int(e.eax), int(e.ebx), int(e.ecx), int(e.edx))
            for e in cpuid.entries[0 : cpuid.nent]
        ]

    def get_xcr0(self) -> int | None:
        """XCR0 (KVM_GET_XCRS), or None where KVM has no XCRs (api.rst: needs KVM_CAP_XCRS)."""
        xcrs = ffi.new("struct kvm_xcrs *")
        try:
            ioctl(self.fd, "KVM_GET_XCRS", xcrs)
        except KvmError:
            return None
        for slot in range(int(xcrs.nr_xcrs)):
            if xcrs.xcrs[slot].xcr == XCR0:
                return int(xcrs.xcrs[slot].value)
        return None

    def inject_interrupt(self, vector: int) -> None:
        """Delivers `vector` as an interrupt at the next entry (api.rst KVM_SET_VCPU_EVENTS,
        `interrupt.injected`, not `soft`: see hypervisor/vcpu/pvm.py for why)."""
        events = ffi.new("struct kvm_vcpu_events *")
        ioctl(self.fd, "KVM_GET_VCPU_EVENTS", events)
        events.interrupt.injected = 1
        events.interrupt.nr = vector
        events.interrupt.soft = 0
        events.flags = 0
        ioctl(self.fd, "KVM_SET_VCPU_EVENTS", events)

    def get_vcpu_events(self) -> VcpuEvents:
        """Pending and injected exceptions, interrupts and NMIs (api.rst KVM_GET_VCPU_EVENTS)."""
        events = ffi.new("struct kvm_vcpu_events *")
        ioctl(self.fd, "KVM_GET_VCPU_EVENTS", events)
        return VcpuEvents(
            exception_injected=bool(events.exception.injected),
            exception_pending=bool(events.exception.pending),
            exception_vector=int(events.exception.nr),
            interrupt_injected=bool(events.interrupt.injected),
            interrupt_vector=int(events.interrupt.nr),
            nmi_injected=bool(events.nmi.injected),
            nmi_pending=bool(events.nmi.pending),
            nmi_masked=bool(events.nmi.masked),
        )

    def get_state_blob(self, ioctl_name: str, struct: str) -> bytes:
        """The raw bytes of a KVM_GET_* state struct (XSAVE, XCRS, DEBUGREGS, VCPU_EVENTS...),
        for saving and restoring a vCPU without interpreting every field."""
        return read_struct(self.fd, ioctl_name, struct)

    def set_state_blob(self, ioctl_name: str, struct: str, data: bytes) -> None:
        write_struct(self.fd, ioctl_name, struct, data)

    def translate(self, linear_address: int) -> int | None:
        """Guest virtual to physical with the vCPU's current page tables; None if unmapped."""
        translation = ffi.new("struct kvm_translation *", {"linear_address": linear_address})
        ioctl(self.fd, "KVM_TRANSLATE", translation)
        return int(translation.physical_address) if translation.valid else None

    # -- the C run loop ----------------------------------------------------------------------

    def set_range_tables(
        self,
        pio: Sequence[TableRange],
        mmio: Sequence[TableRange],
        pio_unmapped_fill: int = 0xFF,
        mmio_unmapped_fill: int = 0x00,
    ) -> None:
        """Freezes the bus layout into the C loop. Call before the vCPU thread runs.

        Unmapped port reads return all-ones (an ISA bus with nothing driving it floats high,
        which is also what Linux's probes expect); unmapped MMIO reads return zeros.
        """
        for table, ranges, fill in (
            (self.state.pio, pio, pio_unmapped_fill),
            (self.state.mmio, mmio, mmio_unmapped_fill),
        ):
            ordered = sorted(ranges, key=lambda r: r.base)
            if len(ordered) > lib.PYHV_MAX_RANGES:
                raise ValueError(f"at most {lib.PYHV_MAX_RANGES} device ranges per bus")
            for slot, entry in enumerate(ordered):
                target = table.ranges[slot]
                target.base = entry.base
                target.size = entry.size
                target.device_id = entry.device_id
                target.action = (lib.PYHV_RANGE_SINK if entry.sink
                                 else lib.PYHV_RANGE_UART if entry.uart else lib.PYHV_RANGE_PYTHON)  # fmt: skip
                target.fill = entry.fill
            table.count = len(ordered)
            table.unmapped_fill = fill

    def attach_uart(self, buffer: UartTransmitBuffer) -> None:
        """Lets this vCPU's loop serve the UART range (TableRange.uart) through `buffer`, which
        must outlive the vCPU's runs. Call before the vCPU thread runs."""
        self.state.uart = buffer.state
        self._uart = buffer  # keeps the C struct alive as long as the vCPU points at it

    def run_once(self) -> Any:
        """Runs until an exit the C loop cannot finish; returns the `struct pyhv_exit *`."""
        lib.pyhv_vcpu_run(self.state, self.exit_record)
        return self.exit_record

    def kick(self) -> None:
        """Makes a running (or the next) KVM_RUN return PYHV_EXIT_KICKED. Thread-safe."""
        result = lib.pyhv_vcpu_kick(self.state)
        if result < 0:
            raise KvmError("pthread_kill(kick)", -result)

    @property
    def exit_budget(self) -> int:
        return int(self.state.exit_budget)

    @exit_budget.setter
    def exit_budget(self, exits: int) -> None:
        self.state.exit_budget = exits

    def read_stats(self) -> VcpuStats:
        """A copy of the C loop's counters (hypervisor.vcpu.stats formats it). For reports and
        periodic checks; safe from any thread while the vCPU runs (kvm/stats.py)."""
        return read_stats(self.state)

    @property
    def run_calls(self) -> int:
        """KVM_RUN returns so far: the one counter read often (the machine's quiet-guest probe
        and the fault injector's exit trigger), so it is read alone, without a full copy."""
        return int(self.state.stats.kvm_run_calls)

    def clear_kick(self) -> None:
        """Forgets a pending kick (only the vCPU's own thread, outside KVM_RUN)."""
        lib.pyhv_vcpu_clear_kick(self.state)

    def detach_thread(self) -> None:
        """The thread that ran this vCPU is leaving: a later kick must not signal it."""
        lib.pyhv_vcpu_detach_thread(self.state)

    def close(self) -> None:
        if self.fd >= 0:
            lib.pyhv_vcpu_unmap_run(self.state)
            os.close(self.fd)
            self.fd = -1
