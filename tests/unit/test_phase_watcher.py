"""Boot-phase timestamps read off the output stream, in any chunking (hypervisor.debug.phase_watcher)."""

from __future__ import annotations

from hypervisor.debug.phase_watcher import PhaseWatcher

BOOT = b"[0.0] Linux version 6.1 ...\r\n[90.0] Run /init as init process\r\n"
PATTERNS = {"banner": b"Linux version", "init": b"Run /init as init process", "panic": b"Kernel panic"}


def test_phase_watcher_matches_across_byte_chunks() -> None:
    matches: list[str] = []
    clock = iter(range(1000))
    watcher = PhaseWatcher(PATTERNS, on_match=lambda name, when: matches.append(name), clock=lambda: float(next(clock)))
    for byte in BOOT:  # a UART's output often comes a byte at a time
        watcher(bytes((byte,)))
    assert matches == ["banner", "init"]
    assert watcher.seen["banner"] < watcher.seen["init"]
    assert "panic" not in watcher.seen


def test_phase_watcher_reports_each_phase_once_with_its_first_time() -> None:
    matches: list[tuple[str, float]] = []
    times = iter([1.0, 2.0, 3.0])
    watcher = PhaseWatcher({"banner": b"Linux version"}, on_match=lambda name, when: matches.append((name, when)),
                           clock=lambda: next(times))  # fmt: skip
    watcher(b"Linux vers")
    watcher(b"ion 6.1\r\n")
    watcher(b"Linux version again\r\n")  # every pattern seen: the clock is not even read again
    assert matches == [("banner", 2.0)] and watcher.seen == {"banner": 2.0}


def test_empty_patterns_are_never_matched() -> None:
    watcher = PhaseWatcher({"nothing": b"", "banner": b"Linux"})
    watcher(b"Linux")
    assert set(watcher.seen) == {"banner"}
