"""The virtio devices' C helpers (csrc/virtio_blk.h): virtio-blk's read and write requests on a
raw file, and the fenced store-then-load of notification suppression.

Lives with the other wrappers of the compiled module (only this layer imports it). It knows
nothing of virtqueues or block backends: the caller (hypervisor/virtio/blk.py) hands it plain
numbers — host addresses of guest RAM and of a queue's three parts that the Virtqueue has
already validated, a file descriptor, the disk's capacity — and keeps the ring positions, which
it passes in and takes back on every call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from hypervisor.kvm.ffi import ffi, lib

MAX_REGIONS = lib.PYHV_BLK_MAX_REGIONS

class RamRegion(NamedTuple):
    gpa: int
    size: int
    host: int  # where the region is mapped in this process


class FastResult(NamedTuple):
    caught_up: bool  # False: the chain at next_avail is left for the Python path
    next_avail: int
    next_used: int
    completed: int  # requests this call completed


class BlkFastQueue:
    """One virtqueue of one virtio-blk device on a raw file, as the C fast path sees it.

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
        self._queue = queue

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
