"""The C run loop's vocabulary for the layers above: exit kinds, range actions, guest-debug flags.

The compiled module is imported only by this package (hypervisor/kvm/); the vCPU runner, the
debugger and the statistics use these names instead of reaching for `lib`. Values come from
csrc/vcpu_loop.h and <linux/kvm.h> through the compiler, never typed by hand.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from hypervisor.kvm.ffi import ffi, lib


class ExitKind(enum.IntEnum):
    """`struct pyhv_exit.kind`: why pyhv_vcpu_run returned (csrc/vcpu_loop.h)."""

    PIO_IN = lib.PYHV_EXIT_PIO_IN
    PIO_OUT = lib.PYHV_EXIT_PIO_OUT
    MMIO_READ = lib.PYHV_EXIT_MMIO_READ
    MMIO_WRITE = lib.PYHV_EXIT_MMIO_WRITE
    KICKED = lib.PYHV_EXIT_KICKED
    INTERRUPTED = lib.PYHV_EXIT_INTERRUPTED
    BUDGET = lib.PYHV_EXIT_BUDGET
    KVM = lib.PYHV_EXIT_KVM
    ERROR = lib.PYHV_EXIT_ERROR
    UART_FLUSH = lib.PYHV_EXIT_UART_FLUSH


DEVICE_EXIT_KINDS = (ExitKind.PIO_IN, ExitKind.PIO_OUT, ExitKind.MMIO_READ, ExitKind.MMIO_WRITE)
READ_EXIT_KINDS = (ExitKind.PIO_IN, ExitKind.MMIO_READ)
MAX_EXIT_REASONS: int = lib.PYHV_MAX_EXIT_REASONS
MAX_RANGES: int = lib.PYHV_MAX_RANGES


class GuestDebug(enum.IntFlag):
    """KVM_SET_GUEST_DEBUG control flags (api.rst 4.59)."""

    ENABLE = lib.KVM_GUESTDBG_ENABLE
    SINGLESTEP = lib.KVM_GUESTDBG_SINGLESTEP
    USE_SW_BP = lib.KVM_GUESTDBG_USE_SW_BP
    USE_HW_BP = lib.KVM_GUESTDBG_USE_HW_BP
    INJECT_DB = lib.KVM_GUESTDBG_INJECT_DB
    INJECT_BP = lib.KVM_GUESTDBG_INJECT_BP


def run_function() -> Callable[[Any, Any], int]:
    """`pyhv_vcpu_run(state, record) -> kind`, bound once by the runner for its hot loop."""
    return lib.pyhv_vcpu_run  # type: ignore[no-any-return]


# `exit_buffer(record.data, n)`: the bytes of the exit's data in kvm_run, without a copy.
exit_buffer: Callable[[Any, int], Any] = ffi.buffer


def bench_raw_loop(state: Any, exits: int) -> int:
    """The exit benchmark's reference: KVM_RUN `exits` times with no dispatch (0 or -errno)."""
    return int(lib.pyhv_bench_raw_loop(state, exits))


def cmpxchg16b(host_address: int, expected: tuple[int, int], desired: tuple[int, int]) -> tuple[bool, tuple[int, int]]:
    """An atomic 16-byte compare-exchange at a host address (guest RAM's mapping), for the
    emulation of LOCK CMPXCHG16B. Returns (swapped, value found in memory)."""
    if host_address % 16:
        raise ValueError("cmpxchg16b needs a 16-byte aligned address")
    slot = ffi.new("uint64_t[2]", [expected[0], expected[1]])
    swapped = bool(lib.pyhv_cmpxchg16b(ffi.cast("uint8_t *", host_address), slot, desired[0], desired[1]))
    return swapped, (int(slot[0]), int(slot[1]))
