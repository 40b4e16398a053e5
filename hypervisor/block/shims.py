"""Backend shims that watch what a guest does to a disk: the write set of a run.

A shim implements the BlockBackend protocol (hypervisor/block/backend.py) around another
backend and passes every call through. `WriteSetRecorder` sits next to the disk (under any fault
shim), so it records only what really reached the image: sectors written (virtio 1.2 §5.2.6
VIRTIO_BLK_T_OUT), discarded (T_DISCARD), zeroed (T_WRITE_ZEROES), and which of the written
sectors a later flush (T_FLUSH) made durable.

Memory is bounded whatever the guest does: ranges are merged when adjacent or overlapping, and
past `max_ranges` the two ranges with the smallest gap between them are joined, so the set grows
to cover sectors that were not written (an over-approximation) and says so with `capped`.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator, Sequence

from hypervisor.block.backend import BlockBackend

SECTOR_SIZE = 512  # virtio 1.2 §5.2.6: a "sector" is always 512 bytes
DEFAULT_MAX_RANGES = 1024


class RangeSet:
    """Sorted, disjoint, non-adjacent half-open integer ranges [start, end), at most `max_ranges`."""

    def __init__(self, max_ranges: int = DEFAULT_MAX_RANGES) -> None:
        if max_ranges < 1:
            raise ValueError("a range set needs room for at least one range")
        self.max_ranges = max_ranges
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.capped = False  # True once ranges were joined across a gap to stay within max_ranges

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        # The first range that ends at or after `start` may touch the new one; every range from
        # there that starts at or before `end` merges into it.
        first = bisect.bisect_left(self._ends, start)
        last = bisect.bisect_right(self._starts, end)
        if first < last:
            start = min(start, self._starts[first])
            end = max(end, self._ends[last - 1])
        self._starts[first:last] = [start]
        self._ends[first:last] = [end]
        if len(self._starts) > self.max_ranges:
            self._join_closest()

    def update(self, other: RangeSet) -> None:
        for start, end in other:
            self.add(start, end)
        self.capped = self.capped or other.capped

    def _join_closest(self) -> None:
        gaps = [self._starts[i + 1] - self._ends[i] for i in range(len(self._starts) - 1)]
        i = gaps.index(min(gaps))
        self._ends[i] = self._ends[i + 1]
        del self._starts[i + 1]
        del self._ends[i + 1]
        self.capped = True

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()
        self.capped = False

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(list(zip(self._starts, self._ends, strict=True)))

    def __len__(self) -> int:
        return len(self._starts)

    def total(self) -> int:
        return sum(end - start for start, end in zip(self._starts, self._ends, strict=True))

    def to_list(self) -> list[list[int]]:
        """[[first sector, sector count], ...] as the report shows them."""
        return [[start, end - start] for start, end in zip(self._starts, self._ends, strict=True)]


def _sector_span(offset: int, length: int) -> tuple[int, int]:
    """The sectors touched by bytes [offset, offset + length) (virtio requests are whole sectors)."""
    return offset // SECTOR_SIZE, -(-(offset + length) // SECTOR_SIZE)


class WriteSetRecorder:
    """A BlockBackend that passes every call to `inner` and records what succeeded."""

    def __init__(self, inner: BlockBackend, max_ranges: int = DEFAULT_MAX_RANGES) -> None:
        self.inner = inner
        self._lock = threading.Lock()  # a device may run requests on more than one thread
        self.written = RangeSet(max_ranges)
        self.discarded = RangeSet(max_ranges)
        self.zeroed = RangeSet(max_ranges)
        self.flushed = RangeSet(max_ranges)  # written, then made durable by a later flush
        self._unflushed = RangeSet(max_ranges)  # written (or zeroed) since the last flush
        self.writes = 0
        self.flushes = 0
        self.writes_after_last_flush = 0

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def read_only(self) -> bool:
        return self.inner.read_only

    def readinto(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self.inner.readinto(offset, buffers)

    def write(self, offset: int, buffers: Sequence[memoryview | bytes]) -> None:
        self.inner.write(offset, buffers)
        length = sum(len(buffer) for buffer in buffers)
        with self._lock:
            self.writes += 1
            self.writes_after_last_flush += 1
            self.written.add(*_sector_span(offset, length))
            self._unflushed.add(*_sector_span(offset, length))

    def flush(self) -> None:
        self.inner.flush()
        with self._lock:
            self.flushes += 1
            self.flushed.update(self._unflushed)
            self._unflushed.clear()
            self.writes_after_last_flush = 0

    def discard(self, offset: int, length: int) -> None:
        self.inner.discard(offset, length)
        with self._lock:
            self.discarded.add(*_sector_span(offset, length))

    def write_zeroes(self, offset: int, length: int) -> None:
        self.inner.write_zeroes(offset, length)
        with self._lock:
            self.writes_after_last_flush += 1
            self.zeroed.add(*_sector_span(offset, length))
            self._unflushed.add(*_sector_span(offset, length))

    def close(self) -> None:
        self.inner.close()

    def to_dict(self) -> dict[str, object]:
        """The report's view: ranges as [first sector, count], totals, and what was left unflushed."""
        with self._lock:
            sets = {"written": self.written, "discarded": self.discarded, "zeroed": self.zeroed,
                    "flushed": self.flushed, "unflushed": self._unflushed}  # fmt: skip
            result: dict[str, object] = {name: ranges.to_list() for name, ranges in sets.items()}
            result.update(
                sector_size=SECTOR_SIZE,
                written_sectors=self.written.total(),
                unflushed_sectors=self._unflushed.total(),
                writes=self.writes,
                flushes=self.flushes,
                # The guest's last data change was followed by a flush (or it changed nothing).
                flushed_at_end=self.writes_after_last_flush == 0,
                capped=any(ranges.capped for ranges in sets.values()),
                max_ranges=self.written.max_ranges,
            )
        return result
