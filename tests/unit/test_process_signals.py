"""The process's signal handling (hypervisor.process_signals): SIGTERM as an interrupt during a run,
worker threads that leave terminal signals to the main thread, clean-up before a fatal signal, and
an interrupt pyhv handled leaving the exit status pyhv chose, even under `python -m`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor.process_signals import TERMINAL_SIGNALS, SignalCleanup, block_terminal_signals, sigterm_raises

PROBE = """
import sys
from hypervisor.process_signals import forget_caught_interrupts

try:
    exec("raise KeyboardInterrupt")  # as a SIGTERM landing while a dataclass is being built
except KeyboardInterrupt:
    pass
try:
    sys.exit(7)
finally:
    if sys.argv[1:] == ["forget"]:
        forget_caught_interrupts()
"""


def _run_probe(tmp_path: Path, *arguments: str) -> int:
    package = tmp_path / "interrupt_probe"
    package.mkdir(exist_ok=True)
    (package / "__main__.py").write_text(PROBE)
    root = Path(__file__).resolve().parents[2]
    environment = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{root}"}
    return subprocess.run([sys.executable, "-m", "interrupt_probe", *arguments], env=environment,
                          timeout=60).returncode  # fmt: skip


def test_a_handled_interrupt_keeps_the_chosen_status(tmp_path: Path) -> None:
    if _run_probe(tmp_path) != -2:
        pytest.skip("this CPython does not turn a caught KeyboardInterrupt into SIGINT at exit")
    assert _run_probe(tmp_path, "forget") == 7


def test_an_unhandled_interrupt_still_ends_with_sigint(tmp_path: Path) -> None:
    package = tmp_path / "unhandled_probe"
    package.mkdir()
    (package / "__main__.py").write_text(
        "from hypervisor.process_signals import forget_caught_interrupts\n"
        "try:\n    raise KeyboardInterrupt\nfinally:\n    forget_caught_interrupts()\n")
    root = Path(__file__).resolve().parents[2]
    environment = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{root}"}
    completed = subprocess.run([sys.executable, "-m", "unhandled_probe"], env=environment, capture_output=True,
                               timeout=60)  # fmt: skip
    assert completed.returncode == -2


@pytest.fixture
def recorded_signals() -> Iterator[list[int]]:
    """SIGTERM and SIGHUP recorded instead of killing pytest, should a handler under test be missing."""
    seen: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: seen.append(signum))
                for signum in (signal.SIGTERM, signal.SIGHUP)}  # fmt: skip
    yield seen
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def _deliver(signum: int) -> None:
    """Sends `signum` to this process and gives the main thread the moment it needs to run the handler."""
    signal.raise_signal(signum)
    for _ in range(10):
        time.sleep(0.01)


def test_sigterm_raises_keyboard_interrupt_then_the_old_handler_is_back(recorded_signals: list[int]) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_raises():
        _deliver(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before
    _deliver(signal.SIGTERM)
    assert recorded_signals == [signal.SIGTERM]  # only the one after the block reached the old handler


def test_sigterm_raises_a_command_s_own_exception(recorded_signals: list[int]) -> None:
    class Terminated(BaseException):
        pass

    with pytest.raises(Terminated), sigterm_raises(Terminated):
        _deliver(signal.SIGTERM)
    assert recorded_signals == []


def test_worker_threads_block_terminal_signals_and_the_main_thread_does_not() -> None:
    masks: list[set[int]] = []

    def worker() -> None:
        block_terminal_signals()
        masks.append(set(signal.pthread_sigmask(signal.SIG_BLOCK, [])))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert TERMINAL_SIGNALS <= masks[0]
    assert not TERMINAL_SIGNALS & set(signal.pthread_sigmask(signal.SIG_BLOCK, []))


def test_signal_cleanup_runs_then_chains_to_the_previous_handler(recorded_signals: list[int]) -> None:
    events: list[str] = []
    cleanup = SignalCleanup(lambda: events.append(f"cleanup, {len(recorded_signals)} seen"), [signal.SIGHUP])
    previous = signal.getsignal(signal.SIGHUP)
    cleanup.install()
    assert signal.getsignal(signal.SIGHUP) is not previous
    _deliver(signal.SIGHUP)
    assert events == ["cleanup, 0 seen"] and recorded_signals == [signal.SIGHUP]
    assert signal.getsignal(signal.SIGHUP) is previous  # one clean-up: the handler is gone after it
    cleanup.uninstall()  # idempotent
    assert signal.getsignal(signal.SIGHUP) is previous


def test_signal_cleanup_of_an_ignored_signal_only_cleans_up() -> None:
    events: list[str] = []
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        cleanup = SignalCleanup(lambda: events.append("cleanup"), [signal.SIGHUP])
        cleanup.install()
        _deliver(signal.SIGHUP)
        assert events == ["cleanup"] and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_signal_cleanup_uninstalled_leaves_the_handlers_as_they_were(recorded_signals: list[int]) -> None:
    events: list[str] = []
    cleanup = SignalCleanup(lambda: events.append("cleanup"), [signal.SIGTERM, signal.SIGHUP])
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    cleanup.install()
    cleanup.uninstall()
    assert {signum: signal.getsignal(signum) for signum in before} == before
    _deliver(signal.SIGTERM)
    assert events == [] and recorded_signals == [signal.SIGTERM]


def test_signal_cleanup_off_the_main_thread_changes_no_handler() -> None:
    before = signal.getsignal(signal.SIGHUP)
    cleanup = SignalCleanup(lambda: None, [signal.SIGHUP])
    thread = threading.Thread(target=cleanup.install)  # signal.signal would raise ValueError there
    thread.start()
    thread.join()
    assert signal.getsignal(signal.SIGHUP) is before


def test_signal_cleanup_then_death_by_the_same_signal(tmp_path: Path) -> None:
    """With the default action before it, the process still dies of the signal (a parent sees why)."""
    probe = (
        "import signal, time\n"
        "from hypervisor.process_signals import SignalCleanup\n"
        "SignalCleanup(lambda: print('cleaned up', flush=True), [signal.SIGTERM]).install()\n"
        "signal.raise_signal(signal.SIGTERM)\n"
        "time.sleep(30)\n"
    )
    root = Path(__file__).resolve().parents[2]
    completed = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(root)},
                               capture_output=True, timeout=60)  # fmt: skip
    assert completed.returncode == -signal.SIGTERM
    assert completed.stdout == b"cleaned up\n"
