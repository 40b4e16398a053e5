"""Outcomes, exit statuses, and what the console observer concludes from a guest's output."""

import pytest

from hypervisor.debug.console_observer import ConsoleObserver
from hypervisor.outcome import EXIT_STATUS, Outcome, OutcomeKind


@pytest.mark.parametrize("code", [0, 1, 42, 255])
def test_debug_exit_status_is_the_guests_value(code: int) -> None:
    assert Outcome(OutcomeKind.DEBUG_EXIT, code=code).exit_status == code


def test_every_other_outcome_has_a_documented_distinct_status() -> None:
    documented = open("docs/exit-status.md").read()
    failures = {kind: status for kind, status in EXIT_STATUS.items() if status}
    assert len(set(failures.values())) == len(failures)
    for status in failures.values():
        assert f"| {status} |" in documented


def feed_lines(observer: ConsoleObserver, text: str) -> None:
    for index in range(0, len(text), 7):  # in odd chunks, as a UART delivers it
        observer.feed(text[index : index + 7].encode())


def test_a_panic_explains_the_reset_that_follows() -> None:
    observer = ConsoleObserver(linux_rules=True)
    feed_lines(observer, "Linux version 6.1\nKernel panic - not syncing: VFS: Unable to mount root fs\n")
    outcome = observer.explain(Outcome(OutcomeKind.RESET))
    assert outcome.kind is OutcomeKind.PANIC and outcome.exit_status == 121
    assert "Unable to mount root fs" in outcome.detail
    assert observer.explain(Outcome(OutcomeKind.DEBUG_EXIT, code=3)).kind is OutcomeKind.DEBUG_EXIT


@pytest.mark.parametrize("status", [0, 3, 127])
def test_the_guest_commands_status_becomes_the_exit_status(status: int) -> None:
    observer = ConsoleObserver(linux_rules=True)
    feed_lines(observer, f"pyhv guest: running command: false\npyhv guest: command exited with status {status}\n")
    outcome = observer.explain(Outcome(OutcomeKind.RESET))
    assert outcome.kind is OutcomeKind.COMMAND_EXIT and outcome.exit_status == status


def test_a_plain_reset_stays_a_reset() -> None:
    observer = ConsoleObserver(linux_rules=True)
    feed_lines(observer, "pyhv guest: shell exited with status 0\npyhv guest: rebooting\n")
    assert observer.explain(Outcome(OutcomeKind.RESET)).kind is OutcomeKind.RESET
    assert set(observer.timeline()) == {"first_console_byte", "guest_rebooting"}
