"""The virtio devices' C helpers (csrc/virtio_blk.h): virtio-blk's read and write requests on a
raw file or on the plain clusters of a qcow2 image, and the fenced store-then-load of
notification suppression.

Lives with the other wrappers of the compiled module (only this layer imports it). It knows
nothing of virtqueues or block backends: the caller (hypervisor/virtio/blk.py) hands it plain
numbers — host addresses of guest RAM and of a queue's three parts that the Virtqueue has
already validated, a file descriptor, the disk's capacity — and keeps the ring positions, which
it passes in and takes back on every call. For qcow2 it holds a `BlkClusterMap`, guest cluster
to host offset, that the caller fills from the image and clears on the image's every change.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any, NamedTuple

from hypervisor.kvm.ffi import ffi, lib

MAX_REGIONS = lib.PYHV_BLK_MAX_REGIONS
MAP_WRITABLE = lib.PYHV_BLK_MAP_WRITABLE
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21  # what a qcow2 image may have (qcow2.rst "Header")


class RamRegion(NamedTuple):
    gpa: int
    size: int
    host: int  # where the region is mapped in this process


class FastResult(NamedTuple):
    caught_up: bool  # False: the chain at next_avail is left for the Python path
    next_avail: int
    next_used: int
    completed: int  # requests this call completed


class BlkClusterMap:
    """Guest cluster -> host offset in the image file, in C memory (struct pyhv_blk_map): what the
    C path may do I/O at without asking Python. Filled and cleared by the caller under the image's
    lock, which it also holds around every `BlkFastQueue.process` that uses this map."""

    def __init__(self, cluster_bits: int) -> None:
        if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            raise ValueError(f"cluster_bits {cluster_bits} outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}")
        self._map = ffi.new("struct pyhv_blk_map *")  # zeroed: empty and disabled
        self._map.cluster_bits = cluster_bits

    @property
    def pointer(self) -> Any:
        return self._map

    def clear(self) -> None:
        """Every entry stale at once (a new generation): an O(1) call on every mapping change."""
        self._map.generation += 1

    def set_limits(self, disk_bytes: int, file_bytes: int, enabled: bool) -> None:
        """No I/O at or past `disk_bytes` of the disk nor past `file_bytes` of the file; none at all
        unless `enabled`."""
        self._map.disk_bytes, self._map.file_bytes, self._map.enabled = disk_bytes, file_bytes, int(enabled)

    def fill(self, first: int, hosts: array[int]) -> None:
        """Guest clusters first + i are at host offset hosts[i] (| MAP_WRITABLE), 0: not mapped."""
        if hosts.itemsize != 8:
            raise ValueError("hosts must be an array of 64-bit words")
        if len(hosts):
            lib.pyhv_blk_map_fill(self._map, first, ffi.from_buffer("uint64_t[]", hosts), len(hosts))


class BlkFastQueue:
    """One virtqueue of one virtio-blk device on a raw file (`cluster_map` None: `fd` is the disk)
    or a qcow2 image (`fd` its file, `cluster_map` where the disk's bytes are in it), as the C
    fast path sees it.

    Valid while the memory it names stays mapped: the Virtqueue that supplied the addresses
    holds views of that memory, and the I/O thread that calls `process` is joined before guest
    memory is unmapped (hypervisor/virtio/worker.py).
    """

    def __init__(
        self,
        regions: Sequence[RamRegion],
        queue_size: int,
        desc_host: int,
        avail_host: int,
        used_host: int,
        fd: int,
        read_only: bool,
        capacity_sectors: int,
        cluster_map: BlkClusterMap | None = None,
    ) -> None:
        if not 0 < len(regions) <= MAX_REGIONS:
            raise ValueError(f"{len(regions)} RAM regions (the C path takes 1 to {MAX_REGIONS})")
        queue = ffi.new("struct pyhv_blk_queue *")
        for index, region in enumerate(regions):
            queue.regions[index].gpa = region.gpa
            queue.regions[index].size = region.size
            queue.regions[index].host = region.host
        queue.region_count = len(regions)
        queue.size = queue_size
        queue.desc, queue.avail, queue.used = desc_host, avail_host, used_host
        queue.fd = fd
        queue.read_only = int(read_only)
        queue.capacity_sectors = capacity_sectors
        if cluster_map is not None:
            queue.map = cluster_map.pointer
        self._queue = queue
        self._cluster_map = cluster_map  # kept alive as long as C may read it

    def process(self, next_avail: int, next_used: int) -> FastResult:
        """Complete the requests available now that C can do, in ring order (GIL released)."""
        queue = self._queue
        queue.next_avail, queue.next_used = next_avail, next_used
        before = queue.completed
        status = lib.pyhv_blk_process(queue)
        return FastResult(
            status == lib.PYHV_BLK_CAUGHT_UP,
            queue.next_avail,
            queue.next_used,
            queue.completed - before,
        )


def store_then_load_u16(store_address: int, value: int, load_address: int) -> int:
    """Store the 16-bit `value` at host address `store_address`, then load the 16-bit value at
    `load_address`, with a full memory barrier between the two (virtio 1.2 §2.7.10: a device
    that re-enables notifications must then look at the available index again, and on x86 only
    a barrier keeps that load from passing the store)."""
    return int(lib.pyhv_store16_then_load16(store_address, value, load_address))
