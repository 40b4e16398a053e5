"""Scatter-gather lists of guest memory: lists of memoryviews that together form one buffer.

A descriptor chain's readable or writable part is such a list (virtio 1.2 §2.7.4 Message
Framing: a device must not assume how the driver split a request into descriptors), so headers,
payloads and status bytes are cut out of them by byte position, never by descriptor index.
Slicing a memoryview copies nothing, so payloads still go straight between the disk and guest
RAM.
"""

from __future__ import annotations

from collections.abc import Sequence


def total_length(views: Sequence[memoryview]) -> int:
    return sum(len(view) for view in views)


def slice_views(views: Sequence[memoryview], start: int, stop: int | None = None) -> list[memoryview]:
    """The views covering bytes [start, stop) of the concatenation of `views` (no copies)."""
    result: list[memoryview] = []
    position = 0
    for view in views:
        end = position + len(view)
        if stop is not None and position >= stop:
            break
        if end > start:
            low = max(start - position, 0)
            high = len(view) if stop is None else min(stop - position, len(view))
            if high > low:
                result.append(view[low:high])
        position = end
    return result


def gather(views: Sequence[memoryview], length: int) -> bytes:
    """The first `length` bytes of the concatenation (fewer if the views are shorter)."""
    return b"".join(bytes(view) for view in slice_views(views, 0, length))


def scatter(views: Sequence[memoryview], data: bytes) -> int:
    """Copy `data` into the views in order; returns how many bytes fitted."""
    copied = 0
    for view in views:
        if copied == len(data):
            break
        count = min(len(view), len(data) - copied)
        view[:count] = data[copied : copied + count]
        copied += count
    return copied
