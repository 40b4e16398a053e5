"""A snapshot of the C loop's per-vCPU counters (`struct pyhv_stats`, csrc/vcpu_loop.h).

The C loop bumps the counters on every exit; Python copies them only when it reports (the run
result, `info exits`, the exit budget's quarter-second check), never per exit. The copy is one
read of the struct's bytes: each counter is an aligned 64-bit word that only its vCPU thread
writes, so a copy taken while the vCPU runs has no torn counter, though two counters may be an
exit apart.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from hypervisor.kvm.ffi import ffi, lib

__all__ = ["COUNTER_NAMES", "VcpuStats", "read_stats"]

MAX_EXIT_REASONS: int = lib.PYHV_MAX_EXIT_REASONS
# The scalar counters after exits_by_reason, in struct order.
COUNTER_NAMES = (
    "kvm_run_calls", "total_exits", "python_exits", "pio_sink", "mmio_sink",
    "pio_unmapped_reads", "pio_unmapped_writes", "mmio_unmapped_reads", "mmio_unmapped_writes",
    "first_unmapped_pio", "first_unmapped_mmio", "kicks", "eintr", "eagain",
)  # fmt: skip
_STATS = struct.Struct(f"={MAX_EXIT_REASONS + len(COUNTER_NAMES)}Q")


def _check_layout() -> None:
    """Refuses to import if COUNTER_NAMES is not struct pyhv_stats as the compiler built it."""
    fields = [name for name, _ in ffi.typeof("struct pyhv_stats").fields]
    if fields != ["exits_by_reason", *COUNTER_NAMES] or ffi.sizeof("struct pyhv_stats") != _STATS.size:
        raise ImportError(f"struct pyhv_stats is {fields}, not what hypervisor/kvm/stats.py reads")


_check_layout()


@dataclass(frozen=True, slots=True)
class VcpuStats:
    """The counters of one vCPU (or the sum of several, `VcpuStats.total`)."""

    exits_by_reason: tuple[int, ...]  # indexed by KVM exit reason number (KVM_EXIT_*)
    kvm_run_calls: int = 0
    total_exits: int = 0
    python_exits: int = 0
    pio_sink: int = 0
    mmio_sink: int = 0
    pio_unmapped_reads: int = 0
    pio_unmapped_writes: int = 0
    mmio_unmapped_reads: int = 0
    mmio_unmapped_writes: int = 0
    first_unmapped_pio: int = 0  # port + 1, 0 when none yet (the C encoding)
    first_unmapped_mmio: int = 0  # address + 1, 0 when none yet
    kicks: int = 0
    eintr: int = 0
    eagain: int = 0

    @classmethod
    def zero(cls) -> VcpuStats:
        return cls((0,) * MAX_EXIT_REASONS)

    @classmethod
    def from_bytes(cls, data: bytes) -> VcpuStats:
        values = _STATS.unpack(data)
        return cls(values[:MAX_EXIT_REASONS], *values[MAX_EXIT_REASONS:])

    def to_bytes(self) -> bytes:
        return _STATS.pack(*self.exits_by_reason, *(getattr(self, name) for name in COUNTER_NAMES))

    def exits(self, reason: int) -> int:
        """Exits with KVM exit reason `reason` (0 for a reason past the table)."""
        return self.exits_by_reason[reason] if 0 <= reason < len(self.exits_by_reason) else 0

    @property
    def first_unmapped_port(self) -> int | None:
        return self.first_unmapped_pio - 1 if self.first_unmapped_pio else None

    @property
    def first_unmapped_address(self) -> int | None:
        return self.first_unmapped_mmio - 1 if self.first_unmapped_mmio else None

    @classmethod
    def total(cls, per_vcpu: Iterable[VcpuStats]) -> VcpuStats:
        """The counters summed; the first unmapped port and address are the first vCPU's that
        saw one (as hypervisor.vcpu.stats.merge_statistics reports them)."""
        reasons = [0] * MAX_EXIT_REASONS
        sums = dict.fromkeys(COUNTER_NAMES, 0)
        for stats in per_vcpu:
            for reason, count in enumerate(stats.exits_by_reason):
                reasons[reason] += count
            for name in COUNTER_NAMES:
                value = getattr(stats, name)
                if name.startswith("first_unmapped"):
                    sums[name] = sums[name] or value
                else:
                    sums[name] += value
        return cls(tuple(reasons), **sums)


def read_stats(state: Any) -> VcpuStats:
    """A copy of the `struct pyhv_stats` inside a `struct pyhv_vcpu *` (kvm/vcpu.py's state)."""
    return VcpuStats.from_bytes(bytes(ffi.buffer(ffi.addressof(state, "stats"), _STATS.size)))
