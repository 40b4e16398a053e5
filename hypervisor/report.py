"""The JSON run report (`pyhv run --report FILE`): what ran, how it ended, how long phases took."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from hypervisor import __version__

if TYPE_CHECKING:
    from hypervisor.launch import LaunchInfo
    from hypervisor.machine import RunResult

REPORT_VERSION = 1


def build_report(
    result: RunResult,
    info: LaunchInfo | None,
    timeline: dict[str, float],
    post_mortem: dict[str, object] | None = None,
    disks: dict[str, object] | None = None,
) -> dict[str, object]:
    """The report; `post_mortem` (hypervisor.debug.postmortem.PostMortem.to_dict) after a crash;
    `disks` (hypervisor.disk_overlays.DiskSession.report): the "disks" and "faults" sections."""
    outcome = result.outcome
    stats = result.statistics
    report: dict[str, object] = {
        "report_version": REPORT_VERSION,
        "pyhv_version": __version__,
        "outcome": outcome.kind.value,
        "outcome_class": outcome.outcome_class.value,  # "verdict" (the guest's) or "infrastructure"
        "exit_status": result.exit_status,
        "detail": outcome.detail,
        "wall_seconds": round(result.wall_seconds, 3),
        "timeline": timeline,
        "exits": {
            "total": stats["total_exits"],
            "by_reason": stats["exits_by_reason"],
            "handled_in_c": stats["total_exits"] - stats["python_exits"],
            "handled_in_python": stats["python_exits"],
            "serial_in_c": {"thr_writes": stats["uart_thr_writes_in_c"], "lsr_reads": stats["uart_lsr_reads_in_c"]},
            "unmapped_port_accesses": stats["pio_unmapped_reads"] + stats["pio_unmapped_writes"],
            "unmapped_mmio_accesses": stats["mmio_unmapped_reads"] + stats["mmio_unmapped_writes"],
            "first_unmapped_port": stats["first_unmapped_port"],
            "first_unmapped_mmio": stats["first_unmapped_mmio"],
            "kicks": stats["kicks"],
        },
    }
    if outcome.data:
        # What the outcome's kind carries (docs/exit-status.md): "exit_budget" for an exit storm;
        # "panic" with its "source" ("pvpanic": the machine saw it, not the console) for a panic.
        report["outcome_data"] = dict(outcome.data)
    if info is not None:
        report["guest"] = {
            "kind": info.kind,
            "kernel": info.kernel,
            "cmdline": info.cmdline,
            "protocol": info.protocol,
            "loaded_as": info.source,
        }
        report["host"] = {"kvm_pvm": info.pvm_host}
    if result.kernel_reports is not None:
        # Oopses, WARNINGs, BUGs, KASAN/UBSAN, lockdep... the Linux console printed: {} is none.
        report["kernel_reports"] = result.kernel_reports
    if post_mortem is not None:
        report["post_mortem"] = post_mortem
    if disks is not None:
        # Per disk: image, overlay, and the write set (sectors written, discarded, flushed).
        report.update(disks)
    return report


def write_report(path: str | Path, report: dict[str, object]) -> None:
    """Writes atomically (temp file + rename) so a reader never sees half a report."""
    import tempfile  # only when a report is asked for

    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    descriptor, temporary = tempfile.mkstemp(prefix=".pyhv-report-", dir=directory)
    try:
        with os.fdopen(descriptor, "w") as stream:
            json.dump(report, stream, indent=2, sort_keys=False)
            stream.write("\n")
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise
