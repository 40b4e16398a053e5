"""Counting the kernel's own reports of trouble on a Linux guest's console: oopses, WARNINGs,
BUGs, KASAN and UBSAN reports, lockdep splats, RCU stalls and soft/hard lockups.

A CI that boots a kernel wants these even when the run "passed": a WARN_ON that fired is a bug.
The patterns are the first lines the kernel prints for each report (lib/bug.c "WARNING: CPU:",
arch/x86/kernel/dumpstack.c "Oops:", "BUG:" from mm/ and kernel/, mm/kasan/report.c
"BUG: KASAN:", lib/ubsan.c "UBSAN:", kernel/locking/lockdep.c "WARNING: possible ..." and
"INFO: possible ...", kernel/rcu/tree_stall.h "rcu_sched detected stalls" / "rcu: INFO:",
kernel/watchdog.c "BUG: soft lockup" / "Watchdog detected hard LOCKUP"). Each class is counted
with its first line kept, so a report says what happened without the whole console.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

# (class, pattern) in the order they are tried: the first that matches a line wins, so the
# specific BUG: KASAN/lockdep lines are not counted again as a plain BUG/WARNING.
REPORT_PATTERNS: tuple[tuple[str, re.Pattern[bytes]], ...] = (
    ("kasan", re.compile(rb"BUG: KASAN: ")),
    ("ubsan", re.compile(rb"UBSAN: ")),
    (
        "lockdep",
        re.compile(
            rb"(WARNING|INFO): (possible (circular|recursive|irq lock inversion)|inconsistent lock"
            rb"|suspicious RCU usage)"
        ),
    ),  # fmt: skip
    ("lockup", re.compile(rb"BUG: soft lockup|Watchdog detected hard LOCKUP")),
    ("rcu_stall", re.compile(rb"rcu: INFO: rcu_\w+ detected stalls|rcu_\w+ detected stalls")),
    ("oops", re.compile(rb"Oops: |general protection fault")),
    ("bug", re.compile(rb"(kernel )?BUG: |BUG at ")),
    ("warning", re.compile(rb"WARNING: CPU: \d+ PID: \d+")),
)
REPORT_CLASSES = tuple(name for name, _ in REPORT_PATTERNS)
LINE_LIMIT = 4096  # a line longer than this is cut: the console is the guest's, not ours


@dataclass
class KernelReports:
    counts: dict[str, int] = field(default_factory=dict)
    first_lines: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {name: {"count": count, "first": self.first_lines[name]} for name, count in self.counts.items()}

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class KernelLogScanner:
    """Fed the console stream in any chunking; counts report first lines (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partial = bytearray()
        self.reports = KernelReports()

    def feed(self, data: bytes) -> None:
        with self._lock:
            self._partial += data
            if b"\n" not in data:
                if len(self._partial) > LINE_LIMIT:
                    self._scan_line(bytes(self._partial[:LINE_LIMIT]))
                    self._partial.clear()
                return
            *lines, rest = bytes(self._partial).split(b"\n")
            self._partial = bytearray(rest[-LINE_LIMIT:])
        for line in lines:
            self._scan_line(line[:LINE_LIMIT])

    def _scan_line(self, line: bytes) -> None:
        if b":" not in line:  # every report line has one; most console lines are skipped here
            return
        for name, pattern in REPORT_PATTERNS:
            match = pattern.search(line)
            if match:
                text = line[match.start() :].decode("utf-8", errors="replace").strip()
                with self._lock:
                    self.reports.counts[name] = self.reports.counts.get(name, 0) + 1
                    self.reports.first_lines.setdefault(name, text)
                return
