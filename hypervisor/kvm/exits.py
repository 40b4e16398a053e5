"""Exit reasons and related enums, with values from <linux/kvm.h> via the compiled module."""

from __future__ import annotations

import enum

from hypervisor.kvm.ffi import lib

_EXIT_NAMES = [
    "UNKNOWN", "EXCEPTION", "IO", "HYPERCALL", "DEBUG", "HLT", "MMIO", "IRQ_WINDOW_OPEN",
    "SHUTDOWN", "FAIL_ENTRY", "INTR", "SET_TPR", "TPR_ACCESS", "NMI", "INTERNAL_ERROR",
    "SYSTEM_EVENT", "IOAPIC_EOI", "X86_RDMSR", "X86_WRMSR", "X86_BUS_LOCK", "NOTIFY",
]  # fmt: skip

# KVM_EXIT_* values: the names are ours, the numbers the kernel header's.
ExitReason = enum.IntEnum(  # type: ignore[misc]
    "ExitReason", {name: getattr(lib, f"KVM_EXIT_{name}") for name in _EXIT_NAMES}
)


class SystemEventType(enum.IntEnum):
    """kvm_run.system_event.type (api.rst, KVM_EXIT_SYSTEM_EVENT)."""

    SHUTDOWN = lib.KVM_SYSTEM_EVENT_SHUTDOWN
    RESET = lib.KVM_SYSTEM_EVENT_RESET
    CRASH = lib.KVM_SYSTEM_EVENT_CRASH


class InternalErrorSubtype(enum.IntEnum):
    """kvm_run.internal.suberror (api.rst, KVM_EXIT_INTERNAL_ERROR)."""

    EMULATION = lib.KVM_INTERNAL_ERROR_EMULATION
    SIMUL_EX = lib.KVM_INTERNAL_ERROR_SIMUL_EX
    DELIVERY_EV = lib.KVM_INTERNAL_ERROR_DELIVERY_EV
    UNEXPECTED_EXIT_REASON = lib.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON


def exit_reason_name(value: int) -> str:
    try:
        return ExitReason(value).name
    except ValueError:
        return f"EXIT_{value}"
