"""The one small protocol every disk backend (raw, qcow2) implements for virtio-blk.

Offsets and lengths are in bytes of the virtual disk. Buffers are memoryviews, often straight
into guest memory, so a backend can preadv/pwritev into them without copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class BlockBackend(Protocol):
    @property
    def size(self) -> int:
        """Virtual disk size in bytes."""
        ...

    @property
    def read_only(self) -> bool: ...

    def readinto(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Fill `buffers` in order from `offset`; reads past the end raise ValueError."""
        ...

    def write(self, offset: int, buffers: Sequence[memoryview | bytes]) -> None:
        """Write `buffers` in order at `offset`; ImageError on a read-only disk."""
        ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None:
        """The range's contents become unspecified; backends free what they can."""
        ...

    def write_zeroes(self, offset: int, length: int) -> None:
        """The range reads as zeros afterwards."""
        ...

    def close(self) -> None: ...
