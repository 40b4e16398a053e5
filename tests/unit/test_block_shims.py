"""Write-set recording and fault injection shims (hypervisor/block/shims.py, hypervisor/faults.py)
around a real raw file."""

from __future__ import annotations

import errno
import random

import pytest

from hypervisor.block.raw import RawFile
from hypervisor.block.shims import RangeSet, WriteSetRecorder
from hypervisor.faults import FaultInjector, FaultPlan, FaultRule

SECTOR = 512


@pytest.fixture
def raw(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(range(256)) * (64 * SECTOR // 256))
    backend = RawFile(str(path))
    yield backend
    backend.close()


def test_ranges_merge_when_adjacent_or_overlapping() -> None:
    ranges = RangeSet()
    for start, end in [(10, 20), (30, 40), (20, 25), (5, 11), (39, 45), (100, 101)]:
        ranges.add(start, end)
    assert list(ranges) == [(5, 25), (30, 45), (100, 101)]
    ranges.add(0, 200)
    assert list(ranges) == [(0, 200)] and not ranges.capped


def test_ranges_match_a_bitmap_model() -> None:
    generator = random.Random(9)
    ranges, model = RangeSet(max_ranges=10_000), set()
    for _ in range(500):
        start = generator.randrange(2000)
        end = start + generator.randrange(1, 20)
        ranges.add(start, end)
        model.update(range(start, end))
    covered = {sector for start, end in ranges for sector in range(start, end)}
    assert covered == model and ranges.total() == len(model)
    pairs = list(ranges)
    assert all(a_end < b_start for (_, a_end), (b_start, _) in zip(pairs, pairs[1:], strict=False))


def test_a_capped_set_over_approximates_and_says_so() -> None:
    ranges = RangeSet(max_ranges=4)
    for sector in range(0, 100, 10):
        ranges.add(sector, sector + 1)
    assert len(ranges) == 4 and ranges.capped
    covered = {sector for start, end in ranges for sector in range(start, end)}
    assert set(range(0, 100, 10)) <= covered


def test_the_write_set_of_writes_discards_and_flushes(raw) -> None:
    recorder = WriteSetRecorder(raw)
    recorder.write(3 * SECTOR, [bytes(8 * SECTOR)])
    recorder.flush()
    recorder.write(20 * SECTOR, [memoryview(bytearray(SECTOR)), bytes(SECTOR)])
    recorder.discard(40 * SECTOR, 4 * SECTOR)
    recorder.write_zeroes(50 * SECTOR, 2 * SECTOR)
    data = recorder.to_dict()
    assert data["written"] == [[3, 8], [20, 2]]
    assert data["flushed"] == [[3, 8]]
    assert data["unflushed"] == [[20, 2], [50, 2]]
    assert data["discarded"] == [[40, 4]] and data["zeroed"] == [[50, 2]]
    assert data["writes"] == 2 and data["flushes"] == 1 and data["written_sectors"] == 10
    assert data["flushed_at_end"] is False
    recorder.flush()
    assert recorder.to_dict()["flushed_at_end"] is True
    buffer = bytearray(2 * SECTOR)
    raw.readinto(50 * SECTOR, [memoryview(buffer)])
    assert buffer == bytes(2 * SECTOR)  # the call went through


def test_a_failed_write_is_not_in_the_write_set(raw) -> None:
    recorder = WriteSetRecorder(raw)
    injector = FaultInjector(recorder, "vda", FaultPlan([FaultRule("vda", "write", nth=2)]))
    injector.write(0, [bytes(SECTOR)])
    with pytest.raises(OSError) as raised:
        injector.write(SECTOR, [b"\xff" * SECTOR])
    assert raised.value.errno == errno.EIO and "injected" in str(raised.value)
    injector.write(2 * SECTOR, [bytes(SECTOR)])
    assert recorder.to_dict()["written"] == [[0, 1], [2, 1]]
    buffer = bytearray(SECTOR)
    raw.readinto(SECTOR, [memoryview(buffer)])
    assert buffer == (bytes(range(256)) * 2)  # the failed write changed nothing


def test_short_read_fills_the_prefix_then_fails(raw) -> None:
    injector = FaultInjector(raw, "vda", FaultPlan([FaultRule("vda", "read", action="short", short_bytes=SECTOR)]))
    first, second = bytearray(SECTOR), bytearray(SECTOR)
    with pytest.raises(OSError, match="short read .*: 512 of 1024"):
        injector.readinto(0, [memoryview(first), memoryview(second)])
    assert first == bytes(range(256)) * 2 and second == bytes(SECTOR)


def test_a_dropped_flush_and_a_dropped_write_answer_success(raw) -> None:
    recorder = WriteSetRecorder(raw)
    plan = FaultPlan([FaultRule("vda", "flush", action="drop"), FaultRule("vda", "write", action="drop")])
    injector = FaultInjector(recorder, "vda", plan)
    injector.write(0, [b"\x01" * SECTOR])  # lost
    injector.flush()  # lost
    data = recorder.to_dict()
    assert data["written"] == [] and data["flushes"] == 0
    assert [fault["operation"] for fault in plan.to_dict()["injected"]] == ["write", "flush"]  # type: ignore[index]


def test_slow_waits_and_then_runs(raw) -> None:
    import time

    plan = FaultPlan([FaultRule("vda", "write", action="slow", delay=0.2)])
    injector = FaultInjector(raw, "vda", plan)
    started = time.monotonic()
    injector.write(0, [bytes(SECTOR)])
    assert time.monotonic() - started >= 0.19
    plan.stopping.set()  # the end of the run: a slow request stops waiting
    slow_again = FaultInjector(raw, "vda", FaultPlan([FaultRule("vda", "write", action="slow", delay=2)]))
    slow_again.plan.stopping.set()
    started = time.monotonic()
    slow_again.write(0, [bytes(SECTOR)])
    assert time.monotonic() - started < 1
