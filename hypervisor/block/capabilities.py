"""What a disk backend may offer beyond BlockBackend (block/backend.py), as small protocols.

The image tools (block/tools/) ask `isinstance(image, AllocationMap)` rather than probing for
attributes: each protocol names one optional capability, its methods are typed, and a backend
gains one by implementing it (qcow2 has an allocation map, a backing chain and a resize; the raw
backend is a host file, whose data and holes the tools read with block/extents.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # a name only: the capabilities sit below every backend, qcow2's too
    from hypervisor.block.qcow2.types import Extent


@runtime_checkable
class AllocationMap(Protocol):
    """The allocation state of the whole disk, in order, as `qemu-img map` reports it."""

    def map_extents(self) -> Iterator[Extent]: ...


@runtime_checkable
class BackingChain(Protocol):
    """An image whose unallocated ranges read from a backing file, maybe with an external data
    file holding its own data (qcow2 §"Header", backing_file_offset and the data-file extension)."""

    @property
    def backing(self) -> object | None: ...

    @property
    def backing_filename(self) -> str | None: ...

    @property
    def data_file_name(self) -> str | None: ...


@runtime_checkable
class Resizable(Protocol):
    """A format that changes its virtual size itself (qcow2 grows its L1 table)."""

    def resize(self, new_size: int) -> None: ...


@runtime_checkable
class HostFile(Protocol):
    """A backend that is one host file, byte for byte (raw): the tools may truncate it, walk its
    holes and start its write-back directly."""

    @property
    def fd(self) -> int: ...

    def start_writeback(self, offset: int, length: int) -> None: ...
