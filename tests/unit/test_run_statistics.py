"""The run's statistics (hypervisor.vcpu.stats): typed dictionaries from the C loop's counters, the
per-vCPU ones summed for RunResult.statistics, and the report's "exits" section built from them."""

from __future__ import annotations

import json
from dataclasses import replace

from hypervisor.kvm.exits import ExitReason
from hypervisor.kvm.stats import COUNTER_NAMES, VcpuStats
from hypervisor.machine import RunResult
from hypervisor.outcome import Outcome, OutcomeKind
from hypervisor.report import build_report
from hypervisor.vcpu.stats import COUNTERS, merge_statistics, statistics_dict


def stats_with(reasons: dict[ExitReason, int], **counters: int) -> VcpuStats:
    exits = [0] * len(VcpuStats.zero().exits_by_reason)
    for reason, count in reasons.items():
        exits[reason] = count
    return replace(VcpuStats.zero(), exits_by_reason=tuple(exits), **counters)


def test_counters_are_the_c_loops_without_the_first_unmapped_encoding() -> None:
    assert set(COUNTERS) == set(COUNTER_NAMES) - {"first_unmapped_pio", "first_unmapped_mmio"}
    values = {name: 10 + slot for slot, name in enumerate(COUNTERS)}
    typed = statistics_dict(stats_with({ExitReason.IO: 4, ExitReason.HLT: 1}, **values, first_unmapped_pio=0x81))
    assert list(typed) == [*COUNTERS, "exits_by_reason", "first_unmapped_port", "first_unmapped_mmio"]
    assert all(typed[name] == values[name] for name in COUNTERS)
    assert typed["exits_by_reason"] == {"IO": 4, "HLT": 1}  # reasons with no exit are left out
    assert (typed["first_unmapped_port"], typed["first_unmapped_mmio"]) == (0x80, None)


def test_merge_sums_every_counter_and_adds_com1s() -> None:
    first = statistics_dict(stats_with({ExitReason.MMIO: 2}, total_exits=5, python_exits=2, kicks=1, eagain=3))
    second = statistics_dict(stats_with({ExitReason.IO: 7, ExitReason.MMIO: 1}, total_exits=8, python_exits=8))
    total = merge_statistics([first, second], 40, 6)
    assert (total["total_exits"], total["python_exits"], total["kicks"], total["eagain"]) == (13, 10, 1, 3)
    assert all(total[name] == first[name] + second[name] for name in COUNTERS)
    # The reasons keep the order they first appear in (vCPU 0's, then the others' new ones).
    assert list(total["exits_by_reason"].items()) == [("MMIO", 3), ("IO", 7)]
    assert (total["uart_thr_writes_in_c"], total["uart_lsr_reads_in_c"]) == (40, 6)
    assert first["exits_by_reason"] == {"MMIO": 2}  # the per-vCPU dictionaries are left as they were


def test_merge_keeps_the_first_unmapped_addresses_of_the_first_vcpu_that_saw_one() -> None:
    quiet = statistics_dict(VcpuStats.zero())
    port = statistics_dict(replace(VcpuStats.zero(), first_unmapped_pio=0x1235))
    both = statistics_dict(replace(VcpuStats.zero(), first_unmapped_pio=0x81, first_unmapped_mmio=0xD000_0001))
    total = merge_statistics([quiet, port, both], 0, 0)
    assert (total["first_unmapped_port"], total["first_unmapped_mmio"]) == (0x1234, 0xD000_0000)
    none = merge_statistics([], 0, 0)
    assert none["total_exits"] == 0 and none["exits_by_reason"] == {} and none["first_unmapped_port"] is None


def test_the_reports_exits_section() -> None:
    per_vcpu = [
        statistics_dict(stats_with({ExitReason.IO: 9}, total_exits=20, python_exits=9, pio_unmapped_reads=2,
                                   pio_unmapped_writes=1, mmio_unmapped_writes=4, kicks=2,
                                   first_unmapped_pio=0x1235, first_unmapped_mmio=0xE000_0001)),
        statistics_dict(stats_with({ExitReason.HLT: 1}, total_exits=1, python_exits=1)),
    ]  # fmt: skip
    result = RunResult(Outcome(OutcomeKind.DEBUG_EXIT, code=0), 0.25, merge_statistics(per_vcpu, 11, 3), per_vcpu)
    report = build_report(result, None, {})
    assert json.dumps(report["exits"]) == json.dumps({
        "total": 21, "by_reason": {"IO": 9, "HLT": 1}, "handled_in_c": 11, "handled_in_python": 10,
        "serial_in_c": {"thr_writes": 11, "lsr_reads": 3}, "unmapped_port_accesses": 3,
        "unmapped_mmio_accesses": 4, "first_unmapped_port": 0x1234, "first_unmapped_mmio": 0xE000_0000, "kicks": 2,
    })  # fmt: skip
