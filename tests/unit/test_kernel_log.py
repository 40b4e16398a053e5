"""Kernel trouble reports counted off a Linux console, and console rules for Linux guests only."""

from __future__ import annotations

from hypervisor.debug.console_observer import ConsoleObserver
from hypervisor.debug.kernel_log import KernelLogScanner
from hypervisor.outcome import Outcome, OutcomeKind

CONSOLE = b"""[    0.100000] Linux version 6.1.0
[    1.000000] ------------[ cut here ]------------
[    1.000001] WARNING: CPU: 0 PID: 1 at kernel/foo.c:12 foo_init+0x10/0x20
[    1.000002] Modules linked in:
[    2.000000] BUG: KASAN: slab-out-of-bounds in bar+0x1/0x2
[    2.500000] UBSAN: shift-out-of-bounds in lib/x.c:3:4
[    3.000000] WARNING: possible circular locking dependency detected
[    3.100000] BUG: kernel NULL pointer dereference, address: 0000000000000000
[    3.200000] Oops: 0000 [#1] PREEMPT SMP
[    4.000000] WARNING: CPU: 1 PID: 7 at kernel/foo.c:99 other+0x1/0x2
[    5.000000] BUG: soft lockup - CPU#0 stuck for 22s!
[    6.000000] a line that says nothing: at all
"""


def test_every_report_class_is_counted_with_its_first_line() -> None:
    scanner = KernelLogScanner()
    for index in range(0, len(CONSOLE), 7):  # chunking must not matter
        scanner.feed(CONSOLE[index : index + 7])
    reports = scanner.reports.to_dict()
    assert reports["warning"] == {"count": 2, "first": "WARNING: CPU: 0 PID: 1 at kernel/foo.c:12 foo_init+0x10/0x20"}
    assert reports["kasan"]["count"] == 1 and reports["ubsan"]["count"] == 1
    assert reports["lockdep"]["first"] == "WARNING: possible circular locking dependency detected"
    assert reports["bug"]["first"].startswith("BUG: kernel NULL pointer dereference")
    assert reports["oops"]["count"] == 1 and reports["lockup"]["count"] == 1
    assert scanner.reports.total == 8


def test_a_long_line_without_newline_stays_bounded() -> None:
    scanner = KernelLogScanner()
    for _ in range(1000):
        scanner.feed(b"x" * 1000)
    assert len(scanner._partial) <= 4096 and scanner.reports.total == 0


def test_panic_lines_explain_outcomes_only_for_linux() -> None:
    raw = ConsoleObserver()
    raw.feed(b"Kernel panic - not syncing: fake\n")
    reset = Outcome(OutcomeKind.RESET, "the guest reset the machine")
    assert raw.explain(reset) is reset
    linux = ConsoleObserver(linux_rules=True)
    linux.feed(b"Kernel panic - not syncing: VFS: Unable to mount root fs\n")
    assert linux.explain(reset).kind is OutcomeKind.PANIC
    linux_status = ConsoleObserver(linux_rules=True)
    linux_status.feed(b"pyhv guest: command exited with status 3\n")
    assert linux_status.explain(reset).exit_status == 3
    raw_status = ConsoleObserver()
    raw_status.feed(b"pyhv guest: command exited with status 3\n")
    assert raw_status.explain(reset) is reset
