"""The pvpanic device (QEMU docs/specs/pvpanic.rst, ISA interface) as a pure state machine, its
outcome, and how it sits beside the console's panic rule and in the report."""

from __future__ import annotations

import logging

import pytest

from hypervisor.debug.console_observer import ConsoleObserver
from hypervisor.devices.bus import Bus
from hypervisor.devices.pvpanic import (
    PVPANIC_CRASH_LOADED,
    PVPANIC_EVENTS,
    PVPANIC_PANICKED,
    PVPANIC_PORT,
    PVPANIC_PORT_SIZE,
    PvPanic,
)
from hypervisor.devices.state import StatefulDevice
from hypervisor.kvm.exits import ExitReason
from hypervisor.kvm.stats import VcpuStats
from hypervisor.machine import RunResult
from hypervisor.outcome import (
    PANIC_SOURCE_CONSOLE,
    PANIC_SOURCE_PVPANIC,
    Outcome,
    OutcomeClass,
    OutcomeKind,
    panic_outcome,
    panic_source,
)
from hypervisor.report import build_report
from hypervisor.vcpu.stats import RunStatistics, merge_statistics, statistics_dict


def device() -> tuple[PvPanic, list[Outcome]]:
    stops: list[Outcome] = []
    return PvPanic(stops.append), stops


def read(pvpanic: PvPanic, size: int = 1) -> bytes:
    buffer = bytearray(size)
    pvpanic.read(0, memoryview(buffer))
    return bytes(buffer)


def test_the_constants_are_qemus_and_linuxs() -> None:
    # QEMU's default port; Linux include/uapi/misc/pvpanic.h bit numbers.
    assert (PVPANIC_PORT, PVPANIC_PORT_SIZE) == (0x505, 1)
    assert (PVPANIC_PANICKED, PVPANIC_CRASH_LOADED, PVPANIC_EVENTS) == (1, 2, 3)


@pytest.mark.parametrize("size", [1, 2, 4])
def test_a_read_returns_the_supported_events(size: int) -> None:
    pvpanic, stops = device()
    assert read(pvpanic, size) == bytes([PVPANIC_EVENTS]) + bytes(size - 1)
    assert read(pvpanic) == b"\x03"  # reading changes nothing
    assert stops == []


@pytest.mark.parametrize("value", [0x01, 0x03, 0x81, 0xFF])
def test_a_panicked_write_ends_the_run_with_a_pvpanic_panic(value: int) -> None:
    pvpanic, stops = device()
    pvpanic.write(0, bytes([value]))
    assert len(stops) == 1
    outcome = stops[0]
    assert outcome.kind is OutcomeKind.PANIC and outcome.exit_status == 121
    assert outcome.outcome_class is OutcomeClass.VERDICT
    assert "pvpanic" in outcome.detail and "port 0x505" in outcome.detail
    assert panic_source(outcome) == PANIC_SOURCE_PVPANIC
    assert outcome.data == {"panic": {"source": "pvpanic", "written": value, "port": 0x505}}
    assert outcome.describe().startswith("panic: the guest kernel reported a panic through pvpanic")


def test_only_the_low_byte_of_a_wide_write_counts() -> None:
    pvpanic, stops = device()
    pvpanic.write(0, bytes([0x02, 0x01]))  # crash loaded; the 0x01 is another port's byte
    assert stops == [] and pvpanic.crash_loaded_reports == 1


def test_crash_loaded_is_recorded_and_the_run_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    pvpanic, stops = device()
    with caplog.at_level(logging.WARNING, logger="hypervisor.devices.pvpanic"):
        pvpanic.write(0, bytes([PVPANIC_CRASH_LOADED]))
        pvpanic.write(0, bytes([PVPANIC_CRASH_LOADED]))
    assert stops == []
    assert pvpanic.crash_loaded_reports == 2
    assert sum("PVPANIC_CRASH_LOADED" in record.getMessage() for record in caplog.records) == 2


def test_unknown_bits_are_ignored_and_said_once(caplog: pytest.LogCaptureFixture) -> None:
    pvpanic, stops = device()
    with caplog.at_level(logging.WARNING, logger="hypervisor.devices.pvpanic"):
        for _ in range(100):  # a guest writing junk in a loop cannot flood the log
            pvpanic.write(0, bytes([0x04]))
        pvpanic.write(0, b"\x00")
    assert stops == [] and pvpanic.crash_loaded_reports == 0
    assert [record.getMessage() for record in caplog.records] == [
        "the guest wrote pvpanic bits 0x4 that pyhv does not handle; ignored"
    ]


def test_it_has_no_state_to_save() -> None:
    # Configuration only, like the debug-exit port: not a StatefulDevice, nothing in a snapshot.
    pvpanic, _ = device()
    assert not isinstance(pvpanic, StatefulDevice) and not hasattr(pvpanic, "state")


def test_on_a_bus_it_answers_at_0x505_only() -> None:
    pvpanic, stops = device()
    bus = Bus("port I/O", 0x10000)
    bus.insert(pvpanic, PVPANIC_PORT, PVPANIC_PORT_SIZE, "pvpanic")
    assert bus.find(PVPANIC_PORT) is not None and bus.find(PVPANIC_PORT + 1) is None
    assert bus.find(PVPANIC_PORT - 1) is None
    events = bytearray(1)
    assert bus.read(PVPANIC_PORT, memoryview(events)) and events == b"\x03"
    assert not bus.read(PVPANIC_PORT, memoryview(bytearray(2)))  # a one-byte port: a wider access misses
    assert bus.write(PVPANIC_PORT, b"\x01") and len(stops) == 1 and stops[0].kind is OutcomeKind.PANIC


def test_the_console_rule_does_not_override_a_pvpanic_panic() -> None:
    # A Linux kernel prints its panic line and then writes to pvpanic: the machine's word stands.
    observer = ConsoleObserver(linux_rules=True)
    observer.feed(b"Kernel panic - not syncing: VFS: Unable to mount root fs\n")
    pvpanic, stops = device()
    pvpanic.write(0, b"\x01")
    explained = observer.explain(stops[0])
    assert panic_source(explained) == PANIC_SOURCE_PVPANIC and explained.exit_status == 121
    # ... and the console only adds why.
    assert explained.detail == stops[0].detail + ": VFS: Unable to mount root fs"
    assert explained.data["panic"] == {**stops[0].data["panic"], "reason": "VFS: Unable to mount root fs"}
    quiet = ConsoleObserver(linux_rules=True)  # no panic line: the outcome is untouched
    assert quiet.explain(stops[0]) == stops[0] and quiet.explain(stops[0]).detail == stops[0].detail
    raw = ConsoleObserver(linux_rules=False)  # not a Linux console: its text adds nothing
    raw.feed(b"Kernel panic - not syncing: looks like one\n")
    assert raw.explain(stops[0]).detail == stops[0].detail


def test_panic_outcomes_name_a_known_source() -> None:
    assert panic_source(panic_outcome("guest kernel panic", PANIC_SOURCE_CONSOLE)) == "console"
    assert panic_source(Outcome(OutcomeKind.PANIC, "guest kernel panic")) is None  # says nothing
    assert panic_source(Outcome(OutcomeKind.RESET, data={"panic": {"source": "pvpanic"}})) is None
    with pytest.raises(ValueError):
        panic_outcome("?", "the tea leaves")


def statistics() -> RunStatistics:
    exits = [0] * len(VcpuStats.zero().exits_by_reason)
    exits[ExitReason.IO] = 3
    return merge_statistics([statistics_dict(VcpuStats(tuple(exits), total_exits=3, python_exits=3, kicks=1))], 0, 0)


def test_the_report_says_where_the_panic_came_from() -> None:
    pvpanic, stops = device()
    pvpanic.write(0, b"\x01")
    report = build_report(RunResult(stops[0], 0.5, statistics()), None, {})
    assert (report["outcome"], report["outcome_class"], report["exit_status"]) == ("panic", "verdict", 121)
    assert report["outcome_data"] == {"panic": {"source": "pvpanic", "written": 1, "port": 0x505}}
    assert "pvpanic" in str(report["detail"])
