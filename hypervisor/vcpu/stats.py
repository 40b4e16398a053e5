"""Per-vCPU exit statistics from the C loop's counters, as the plain dictionaries a run result
and its JSON report carry (hypervisor.kvm.stats.VcpuStats is the typed snapshot they come from)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from hypervisor.kvm.exits import exit_reason_name
from hypervisor.kvm.stats import VcpuStats

if TYPE_CHECKING:
    from hypervisor.kvm import Vcpu

COUNTERS = (
    "kvm_run_calls", "total_exits", "python_exits", "pio_sink", "mmio_sink",
    "pio_unmapped_reads", "pio_unmapped_writes", "mmio_unmapped_reads", "mmio_unmapped_writes",
    "kicks", "eintr", "eagain",
)  # fmt: skip


def exits_by_reason_name(stats: VcpuStats) -> dict[str, int]:
    """Exits by KVM reason name, the reasons with none left out."""
    return {exit_reason_name(reason): count for reason, count in enumerate(stats.exits_by_reason) if count}


def statistics_dict(stats: VcpuStats) -> dict[str, object]:
    """Counters of one vCPU (or a total): exits by KVM reason name, and what the C fast path did."""
    result: dict[str, object] = {name: getattr(stats, name) for name in COUNTERS}
    result["exits_by_reason"] = exits_by_reason_name(stats)
    result["first_unmapped_port"] = stats.first_unmapped_port
    result["first_unmapped_mmio"] = stats.first_unmapped_address
    return result


def vcpu_statistics(vcpu: Vcpu) -> dict[str, object]:
    """Counters of one vCPU, read now."""
    return statistics_dict(vcpu.read_stats())


def total_stats(vcpus: Iterable[Vcpu]) -> VcpuStats:
    """The counters of every vCPU summed, read now (`info exits`, `monitor exits`)."""
    return VcpuStats.total(vcpu.read_stats() for vcpu in vcpus)


def merge_statistics(per_vcpu: list[dict[str, object]]) -> dict[str, object]:
    """Sums the counters of several vCPUs (the first unmapped addresses come from the first)."""
    total: dict[str, object] = {name: sum(_count(stats.get(name)) for stats in per_vcpu) for name in COUNTERS}
    reasons: dict[str, int] = {}
    for stats in per_vcpu:
        by_reason = stats.get("exits_by_reason")
        if isinstance(by_reason, Mapping):
            for reason, count in by_reason.items():
                reasons[reason] = reasons.get(reason, 0) + _count(count)
        for key in ("first_unmapped_port", "first_unmapped_mmio"):
            if total.get(key) is None:
                total[key] = stats.get(key)
    total["exits_by_reason"] = reasons
    return total


def _count(value: object) -> int:
    # The dictionaries hold ints (statistics_dict); anything else counts as none.
    return value if isinstance(value, int) else 0
