"""Exit reasons and related enums, with values from <linux/kvm.h> via the compiled module."""

from __future__ import annotations

import enum

from hypervisor.kvm.ffi import lib


class ExitReason(enum.IntEnum):
    """kvm_run.exit_reason (api.rst "The kvm_run structure"): the names are ours, the numbers the
    kernel header's. A class, not the functional API, so that type checkers see the members."""

    UNKNOWN = lib.KVM_EXIT_UNKNOWN
    EXCEPTION = lib.KVM_EXIT_EXCEPTION
    IO = lib.KVM_EXIT_IO
    HYPERCALL = lib.KVM_EXIT_HYPERCALL
    DEBUG = lib.KVM_EXIT_DEBUG
    HLT = lib.KVM_EXIT_HLT
    MMIO = lib.KVM_EXIT_MMIO
    IRQ_WINDOW_OPEN = lib.KVM_EXIT_IRQ_WINDOW_OPEN
    SHUTDOWN = lib.KVM_EXIT_SHUTDOWN
    FAIL_ENTRY = lib.KVM_EXIT_FAIL_ENTRY
    INTR = lib.KVM_EXIT_INTR
    SET_TPR = lib.KVM_EXIT_SET_TPR
    TPR_ACCESS = lib.KVM_EXIT_TPR_ACCESS
    NMI = lib.KVM_EXIT_NMI
    INTERNAL_ERROR = lib.KVM_EXIT_INTERNAL_ERROR
    SYSTEM_EVENT = lib.KVM_EXIT_SYSTEM_EVENT
    IOAPIC_EOI = lib.KVM_EXIT_IOAPIC_EOI
    X86_RDMSR = lib.KVM_EXIT_X86_RDMSR
    X86_WRMSR = lib.KVM_EXIT_X86_WRMSR
    X86_BUS_LOCK = lib.KVM_EXIT_X86_BUS_LOCK
    NOTIFY = lib.KVM_EXIT_NOTIFY


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
