"""Per-vCPU exit statistics from the C loop's counters, as plain dictionaries."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypervisor.kvm.exits import exit_reason_name
from hypervisor.kvm.loop import MAX_EXIT_REASONS

if TYPE_CHECKING:
    from hypervisor.kvm import Vcpu

COUNTERS = (
    "kvm_run_calls", "total_exits", "python_exits", "pio_sink", "mmio_sink",
    "pio_unmapped_reads", "pio_unmapped_writes", "mmio_unmapped_reads", "mmio_unmapped_writes",
    "kicks", "eintr", "eagain",
)  # fmt: skip


def vcpu_statistics(vcpu: Vcpu) -> dict[str, object]:
    """Counters of one vCPU: exits by KVM reason name, and what the C fast path did."""
    stats = vcpu.stats
    by_reason = {
        exit_reason_name(reason): int(stats.exits_by_reason[reason])
        for reason in range(MAX_EXIT_REASONS)
        if stats.exits_by_reason[reason]
    }
    result: dict[str, object] = {name: int(getattr(stats, name)) for name in COUNTERS}
    result["exits_by_reason"] = by_reason
    result["first_unmapped_port"] = int(stats.first_unmapped_pio) - 1 if stats.first_unmapped_pio else None
    result["first_unmapped_mmio"] = int(stats.first_unmapped_mmio) - 1 if stats.first_unmapped_mmio else None
    return result


def merge_statistics(per_vcpu: list[dict[str, object]]) -> dict[str, object]:
    """Sums the counters of several vCPUs (the first unmapped addresses come from the first)."""
    total: dict[str, object] = {name: 0 for name in COUNTERS}
    reasons: dict[str, int] = {}
    for stats in per_vcpu:
        for name in COUNTERS:
            total[name] = int(total[name]) + int(stats[name])  # type: ignore[call-overload]
        for reason, count in stats["exits_by_reason"].items():  # type: ignore[attr-defined]
            reasons[reason] = reasons.get(reason, 0) + count
        for key in ("first_unmapped_port", "first_unmapped_mmio"):
            if total.get(key) is None:
                total[key] = stats[key]
    total["exits_by_reason"] = reasons
    return total
