"""Small value types the qcow2 engine hands to its callers (map, snapshot list)."""

from __future__ import annotations

from dataclasses import dataclass

EXTENT_DATA = "data"
EXTENT_ZERO = "zero"
EXTENT_UNALLOCATED = "unallocated"


@dataclass(frozen=True)
class Extent:
    """A run of the virtual disk with one allocation state, as `qemu-img map` reports it.

    kind: "data" (bytes stored in the layer at `depth`), "zero" (reads as zeros, decided by the
    layer at `depth`: a zero cluster, or a hole of a raw backing file) or "unallocated" (not
    present in any layer: reads as zeros; `depth` is the layer where the lookup ended, i.e. the
    bottom of the chain or the layer whose backing file is shorter). `host_offset` is the offset
    in that layer's file (external data file, raw backing file) for uncompressed data and raw
    holes, else None. `depth` 0 is the image itself, 1 its backing file, and so on.
    """

    start: int
    length: int
    kind: str
    host_offset: int | None = None
    compressed: bool = False
    depth: int = 0

    @property
    def present(self) -> bool:
        """qemu-img's "present": some layer of the chain allocates this range."""
        return self.kind != EXTENT_UNALLOCATED

    @property
    def zero(self) -> bool:
        """qemu-img's "zero": the range reads as zeros."""
        return self.kind != EXTENT_DATA

    @property
    def data(self) -> bool:
        """qemu-img's "data": the range's bytes are stored somewhere."""
        return self.kind == EXTENT_DATA


@dataclass(frozen=True)
class SnapshotInfo:
    """One internal snapshot (qcow2.rst "Snapshots"), fields named as `qemu-img snapshot -l` uses."""

    id: str
    name: str
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    icount: int | None
    disk_size: int | None
    l1_table_offset: int
    l1_size: int
