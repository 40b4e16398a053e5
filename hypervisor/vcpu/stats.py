"""Per-vCPU exit statistics from the C loop's counters, as the dictionaries a run result and its
JSON report carry (hypervisor.kvm.stats.VcpuStats is the typed snapshot they come from).

They are TypedDicts, not dataclasses: at run time a plain dict (the report and the trace read it
as one, and the tests index it as `result.statistics["kicks"]`), while mypy knows every key's type.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal, TypedDict, get_args

from hypervisor.kvm.exits import exit_reason_name
from hypervisor.kvm.stats import VcpuStats

if TYPE_CHECKING:
    from hypervisor.kvm import Vcpu

# The summed counters, in the order they are listed (`monitor exits` prints them so).
Counter = Literal[
    "kvm_run_calls", "total_exits", "python_exits", "pio_sink", "mmio_sink",
    "pio_unmapped_reads", "pio_unmapped_writes", "mmio_unmapped_reads", "mmio_unmapped_writes",
    "kicks", "eintr", "eagain",
]  # fmt: skip
COUNTERS: tuple[Counter, ...] = get_args(Counter)


class VcpuStatistics(TypedDict):
    """Counters of one vCPU (or a total): what the C fast path did, exits by KVM reason name."""

    kvm_run_calls: int
    total_exits: int
    python_exits: int
    pio_sink: int
    mmio_sink: int
    pio_unmapped_reads: int
    pio_unmapped_writes: int
    mmio_unmapped_reads: int
    mmio_unmapped_writes: int
    kicks: int
    eintr: int
    eagain: int
    exits_by_reason: dict[str, int]  # the reasons with none left out
    first_unmapped_port: int | None
    first_unmapped_mmio: int | None


class RunStatistics(VcpuStatistics):
    """The whole run's counters (RunResult.statistics): every vCPU's, and COM1's accesses the C
    loop served (hypervisor.devices.serial_fast_path), counted among the exits handled in C."""

    uart_thr_writes_in_c: int
    uart_lsr_reads_in_c: int


def exits_by_reason_name(stats: VcpuStats) -> dict[str, int]:
    """Exits by KVM reason name, the reasons with none left out."""
    return {exit_reason_name(reason): count for reason, count in enumerate(stats.exits_by_reason) if count}


def statistics_dict(stats: VcpuStats) -> VcpuStatistics:
    """Counters of one vCPU (or a total): what the C fast path did, exits by KVM reason name."""
    return {
        "kvm_run_calls": stats.kvm_run_calls, "total_exits": stats.total_exits, "python_exits": stats.python_exits,
        "pio_sink": stats.pio_sink, "mmio_sink": stats.mmio_sink,
        "pio_unmapped_reads": stats.pio_unmapped_reads, "pio_unmapped_writes": stats.pio_unmapped_writes,
        "mmio_unmapped_reads": stats.mmio_unmapped_reads, "mmio_unmapped_writes": stats.mmio_unmapped_writes,
        "kicks": stats.kicks, "eintr": stats.eintr, "eagain": stats.eagain,
        "exits_by_reason": exits_by_reason_name(stats),
        "first_unmapped_port": stats.first_unmapped_port,
        "first_unmapped_mmio": stats.first_unmapped_address,
    }  # fmt: skip


def vcpu_statistics(vcpu: Vcpu) -> VcpuStatistics:
    """Counters of one vCPU, read now."""
    return statistics_dict(vcpu.read_stats())


def total_stats(vcpus: Iterable[Vcpu]) -> VcpuStats:
    """The counters of every vCPU summed, read now (`info exits`, `monitor exits`)."""
    return VcpuStats.total(vcpu.read_stats() for vcpu in vcpus)


def merge_statistics(per_vcpu: Iterable[VcpuStatistics], uart_thr_writes: int, uart_lsr_reads: int) -> RunStatistics:
    """Sums the counters of several vCPUs (the first unmapped addresses come from the first vCPU
    that saw one; the reasons keep the order they first appear in) and adds COM1's counts."""
    total: RunStatistics = {
        **statistics_dict(VcpuStats.zero()),
        "uart_thr_writes_in_c": uart_thr_writes,
        "uart_lsr_reads_in_c": uart_lsr_reads,
    }
    reasons = total["exits_by_reason"]
    for stats in per_vcpu:
        for name in COUNTERS:
            total[name] += stats[name]
        for reason, count in stats["exits_by_reason"].items():
            reasons[reason] = reasons.get(reason, 0) + count
        if total["first_unmapped_port"] is None:
            total["first_unmapped_port"] = stats["first_unmapped_port"]
        if total["first_unmapped_mmio"] is None:
            total["first_unmapped_mmio"] = stats["first_unmapped_mmio"]
    return total
