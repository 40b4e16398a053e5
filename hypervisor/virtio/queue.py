"""The device side of a split virtqueue (virtio 1.2 §2.7) over GuestMemory.

Everything here reads memory the guest controls, so every index, address and length is checked
before use and a violation raises VirtqueueError; the transport turns that into
DEVICE_NEEDS_RESET (§2.1.2) instead of letting it reach the vCPU. Chains are bounded by the
queue size, so a looping chain ends in an error rather than a hang.
"""

from __future__ import annotations

import logging
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

from hypervisor.errors import HypervisorError
from hypervisor.kvm.virtio_c import store_then_load_u16
from hypervisor.memory.guest_memory import GuestMemory
from hypervisor.virtio.spec import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    MAX_CHAIN_BYTES,
    MAX_QUEUE_SIZE,
    USED_ELEMENT_SIZE,
    USED_F_NO_NOTIFY,
)

log = logging.getLogger(__name__)

_DESCRIPTOR = struct.Struct("<QIHH")  # §2.7.5 struct virtq_desc; the driver does not change it meanwhile

# Ring fields the driver and device change concurrently are accessed through typed memoryviews:
# one native 16- or 32-bit load or store each. struct.pack_into zero-fills its target before
# writing it byte by byte, and unpack_from reads byte by byte, so a guest spinning on used.idx
# saw it read 0 for a moment (found with the virtio_blk test guest), and avail.idx could be
# read torn. Native order is the rings' little endian (§2.7: "le16") on every KVM host we run.
assert sys.byteorder == "little", "virtqueue fields are little-endian; this host is not"
_U64_LIMIT = 1 << 64

# §2.7 table "Virtqueue Part / Alignment / Size".
DESC_TABLE_ALIGN = 16
AVAIL_RING_ALIGN = 2
USED_RING_ALIGN = 4


class VirtqueueError(HypervisorError):
    """The guest driver broke the split-virtqueue rules; the device needs a reset (§2.1.2)."""


def _is_u16(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0xFFFF


def avail_ring_size(queue_size: int) -> int:
    """flags, idx, ring[queue_size], used_event (§2.7.6)."""
    return 6 + 2 * queue_size


def used_ring_size(queue_size: int) -> int:
    """flags, idx, ring[queue_size] of 8-byte elements, avail_event (§2.7.8)."""
    return 6 + USED_ELEMENT_SIZE * queue_size


class GuestRam:
    """Guest RAM as (start, end, view) triples, made once per queue so that turning a descriptor
    into memoryviews costs a comparison and a slice, not a region search and a new mapping view.
    """

    def __init__(self, memory: GuestMemory) -> None:
        self.regions = [(region.gpa, region.end, region.view(0, region.size)) for region in memory.regions]

    def buffer(self, address: int, length: int) -> list[memoryview]:
        """Views of guest RAM [address, address+length), split where memory regions meet.

        Raises VirtqueueError when any byte of the range is not RAM or it wraps past 2^64.
        """
        if length == 0:
            return []
        end = address + length
        for start, stop, view in self.regions:  # the common case: inside one region
            if start <= address and end <= stop:
                return [view[address - start : end - start]]
        if end > _U64_LIMIT:
            raise VirtqueueError(f"buffer {address:#x}+{length:#x} wraps past the end of the address space")
        views: list[memoryview] = []
        position = address
        for start, stop, view in self.regions:
            if stop <= position:
                continue
            if start > position:
                break
            views.append(view[position - start : min(end, stop) - start])
            position = min(end, stop)
            if position == end:
                return views
        raise VirtqueueError(f"buffer {address:#x}+{length:#x} is not inside guest RAM")

    def release(self) -> None:
        """Drop the views so GuestMemory.close() can unmap the regions."""
        self.regions = []


def guest_buffer(memory: GuestMemory, address: int, length: int) -> list[memoryview]:
    """Views of guest RAM [address, address+length) (see GuestRam.buffer), for one-off use."""
    ram = GuestRam(memory)
    try:
        return ram.buffer(address, length)
    finally:
        ram.release()


def _check_contiguous(memory: GuestMemory, address: int, length: int, what: str) -> None:
    if address + length > _U64_LIMIT or not memory.contains(address, length):
        raise VirtqueueError(f"{what} at {address:#x}+{length:#x} is not inside one region of guest RAM")


def _contiguous(memory: GuestMemory, address: int, length: int, what: str) -> memoryview:
    """A single view for ring structures, which the device indexes as one array."""
    _check_contiguous(memory, address, length, what)
    return memory.view(address, length)


@dataclass
class DescriptorChain:
    """One request from the driver: the head index and its device-readable and -writable parts."""

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)
    readable_length: int = 0
    writable_length: int = 0


class Virtqueue:
    """The device's view of one split virtqueue whose three parts live in guest RAM."""

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        desc_addr: int,
        driver_addr: int,
        device_addr: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
    ) -> None:
        # §2.7: "Queue Size value is always a power of 2", at most 32768.
        if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise VirtqueueError(f"queue size {size} is not a power of 2 between 1 and {MAX_QUEUE_SIZE}")
        for address, alignment, what in (
            (desc_addr, DESC_TABLE_ALIGN, "descriptor table"),
            (driver_addr, AVAIL_RING_ALIGN, "available ring"),
            (device_addr, USED_RING_ALIGN, "used ring"),
        ):
            if address % alignment:
                raise VirtqueueError(f"{what} at {address:#x} is not {alignment}-byte aligned (§2.7)")
        # Every part is checked before any view of guest RAM is taken, so a refused queue pins
        # no memory (GuestMemory.close() refuses while views exist).
        for address, length, what in (
            (desc_addr, DESC_SIZE * size, "descriptor table"),
            (driver_addr, avail_ring_size(size), "available ring"),
            (device_addr, used_ring_size(size), "used ring"),
        ):
            _check_contiguous(memory, address, length, what)
        self.memory = memory
        self.size = size
        # Host addresses of the three parts, each checked above to lie in one region: for C
        # (virtio-blk's fast path, the fenced notification switch).
        self.desc_host = memory.host_address(desc_addr, DESC_SIZE * size)
        self.avail_host = memory.host_address(driver_addr, avail_ring_size(size))
        self.used_host = memory.host_address(device_addr, used_ring_size(size))
        self.event_idx = event_idx
        self.indirect = indirect
        self._ram = GuestRam(memory)
        self._table = _contiguous(memory, desc_addr, DESC_SIZE * size, "descriptor table")
        avail = _contiguous(memory, driver_addr, avail_ring_size(size), "available ring")
        used = _contiguous(memory, device_addr, used_ring_size(size), "used ring")
        # le16 flags, idx, ring[size], used_event (§2.7.6)
        self._avail = avail.cast("H")
        self._used_event_index = 2 + size
        # le16 flags, idx, ..., avail_event; le32 pairs (id, len) from word 1 (§2.7.8)
        self._used16 = used.cast("H")
        self._used32 = used[: 4 + USED_ELEMENT_SIZE * size].cast("I")
        self._avail_event_index = (4 + USED_ELEMENT_SIZE * size) // 2
        self.next_avail = 0  # the avail ring index of the next chain to take (free-running u16)
        self.next_used = 0  # the used ring index we publish next (free-running u16)
        self._signalled_used: int | None = None  # next_used when we last decided to interrupt
        self._used_since_interrupt = 0
        # While the I/O thread polls the ring it asks the driver not to notify (§2.7.7, §2.7.10).
        self._notifications = True

    # ---- state as data (snapshots; hypervisor/devices/state.py) ----

    def ring_state(self) -> dict[str, int | bool | None]:
        """The positions only the device side keeps (§2.7.6, §2.7.8, §2.7.10): everything else
        of the queue lives in guest RAM or in the transport's registers. Take it while no I/O
        thread runs the queue (the transport drains it first)."""
        return {
            "next_avail": self.next_avail,
            "next_used": self.next_used,
            "signalled_used": self._signalled_used,
            "used_since_interrupt": self._used_since_interrupt,
        }

    def release(self) -> None:
        """Drops every view of guest RAM now (a ring that is discarded, e.g. by a refused restore,
        must not keep GuestMemory.close() from unmapping)."""
        self._ram.release()
        for view in (self._avail, self._used16, self._used32, self._table):
            view.release()

    def restore_ring_state(self, state: object) -> None:
        """Sets the positions from `ring_state()`; VirtqueueError if they are not a ring's."""
        if not isinstance(state, dict) or set(state) != {"next_avail", "next_used", "signalled_used",
                                                         "used_since_interrupt"}:  # fmt: skip
            raise VirtqueueError("saved ring positions do not have the fields of this version")
        for key in ("next_avail", "next_used", "used_since_interrupt"):
            if not _is_u16(state[key]):
                raise VirtqueueError(f"saved ring position {key}={state[key]!r} is not a 16-bit index")
        signalled = state["signalled_used"]
        if signalled is not None and not _is_u16(signalled):
            raise VirtqueueError(f"saved ring position signalled_used={signalled!r} is not a 16-bit index")
        self.next_avail = state["next_avail"]
        self.next_used = state["next_used"]
        self._signalled_used = signalled
        self._used_since_interrupt = state["used_since_interrupt"]

    # ---- the available ring (driver -> device) ----

    def _avail_idx(self) -> int:
        return self._avail[1]

    def has_available(self) -> bool:
        """Whether the driver published chains not taken yet (one read of avail.idx)."""
        return self._avail_idx() != self.next_avail

    def iter_available(self) -> Iterator[DescriptorChain]:
        """Take every chain the driver has made available, reading avail.idx once.

        The index is consumed before each chain is walked, so a malformed chain is not seen
        again after the driver resets the queue.
        """
        avail_idx = self._checked_avail_idx()
        while self.next_avail != avail_idx:
            yield self._take_next()

    def take_available(self) -> DescriptorChain | None:
        """The next available chain, or None: one step of iter_available, with its checks."""
        if self._checked_avail_idx() == self.next_avail:
            return None
        return self._take_next()

    def _take_next(self) -> DescriptorChain:
        head = self._avail[2 + self.next_avail % self.size]
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return self.walk_chain(head)

    def _checked_avail_idx(self) -> int:
        avail_idx = self._avail_idx()
        if (avail_idx - self.next_avail) & 0xFFFF > self.size:
            raise VirtqueueError(
                f"available index moved from {self.next_avail} to {avail_idx}: "
                f"more than the queue size {self.size} (§2.7.6)"
            )
        return avail_idx

    def advance(self, next_avail: int, next_used: int, completed: int) -> None:
        """Take the positions from a fast path that completed `completed` chains in ring order
        (each taken from the available ring and added to the used ring, as add_used does)."""
        self.next_avail = next_avail & 0xFFFF
        self.next_used = next_used & 0xFFFF
        self._used_since_interrupt += completed

    def rearm(self) -> bool:
        """Ask the driver for a notification on the next buffer; True if more arrived meanwhile.

        With VIRTIO_F_EVENT_IDX the device publishes avail_event (§2.7.10). A driver may add a
        buffer after our last read of avail.idx but before it sees the new avail_event, so the
        index is read again after publishing it and the caller loops while this returns True.
        """
        if self.event_idx and self._notifications:
            self._used16[self._avail_event_index] = self.next_avail
        return self._avail_idx() != self.next_avail

    def set_notifications(self, enabled: bool) -> bool:
        """Ask the driver to notify on new buffers again, or not to while the device polls the
        ring anyway; True when buffers are available (after turning notifications back on the
        device must look again: the driver may have added one without notifying meanwhile).

        Without VIRTIO_F_EVENT_IDX this is VIRTQ_USED_F_NO_NOTIFY in used.flags (§2.7.7); with
        it, avail_event is left behind while polling and set to the next index when turned back
        on (§2.7.10), as QEMU's virtio_queue_set_notification does. The re-enabling store and
        the load of avail.idx after it are fenced (on x86 the load could pass the store, and the
        driver's fenced check of the flag on its side would then miss this one).
        """
        self._notifications = enabled
        if not enabled:
            if not self.event_idx:
                self._used16[0] = self._used16[0] | USED_F_NO_NOTIFY
            return self.has_available()
        avail_idx_host = self.avail_host + 2  # le16 flags, le16 idx (§2.7.6)
        if self.event_idx:
            avail_event_host = self.used_host + 2 * self._avail_event_index
            avail_idx = store_then_load_u16(avail_event_host, self.next_avail, avail_idx_host)
        else:  # used.flags is the used ring's first le16 (§2.7.8)
            avail_idx = store_then_load_u16(self.used_host, self._used16[0] & ~USED_F_NO_NOTIFY, avail_idx_host)
        return avail_idx != self.next_avail

    # ---- descriptor chains ----

    def walk_chain(self, head: int) -> DescriptorChain:
        """Follow the chain starting at descriptor `head` (§2.7.5), direct and indirect (§2.7.5.3)."""
        if head >= self.size:
            raise VirtqueueError(f"chain head {head} is outside the queue of {self.size} descriptors")
        chain = DescriptorChain(head)
        table, entries = self._table, self.size
        index, steps, in_indirect, buffers, seen_writable = head, 0, False, 0, False
        while True:
            steps += 1
            if steps > entries:
                raise VirtqueueError(f"chain from head {head} has more than {entries} descriptors (a loop?) (§2.7.5.2)")
            address, length, flags, next_index = _DESCRIPTOR.unpack_from(table, DESC_SIZE * index)
            if flags & DESC_F_INDIRECT:
                table, entries = self._indirect_table(head, address, length, flags, in_indirect)
                index, steps, in_indirect = 0, 0, True
                continue
            buffers += 1
            if buffers > self.size:
                raise VirtqueueError(f"chain from head {head} is longer than the queue size {self.size}")
            views = self._ram.buffer(address, length)
            if flags & DESC_F_WRITE:
                seen_writable = True
                chain.writable.extend(views)
                chain.writable_length += length
            else:
                # §2.7.4.2: device-readable descriptors come before device-writable ones.
                if seen_writable:
                    raise VirtqueueError(f"chain from head {head}: readable descriptor after a writable one")
                chain.readable.extend(views)
                chain.readable_length += length
            if chain.readable_length + chain.writable_length > MAX_CHAIN_BYTES:
                raise VirtqueueError(f"chain from head {head} is longer than 2^32 bytes (§2.7.5.2)")
            if not flags & DESC_F_NEXT:
                return chain
            if next_index >= entries:
                raise VirtqueueError(f"chain from head {head} points at descriptor {next_index} of {entries}")
            index = next_index

    def _indirect_table(
        self, head: int, address: int, length: int, flags: int, in_indirect: bool
    ) -> tuple[memoryview, int]:
        """Check a descriptor that points at an indirect table and return (table view, entries)."""
        if not self.indirect:
            raise VirtqueueError(f"chain from head {head}: indirect table without VIRTIO_F_INDIRECT_DESC")
        if in_indirect:
            # §2.7.5.3.1: "The driver MUST NOT set the VIRTQ_DESC_F_INDIRECT flag within an
            # indirect descriptor (ie. only one table per descriptor)."
            raise VirtqueueError(f"chain from head {head} has an indirect table inside an indirect table")
        if flags & DESC_F_NEXT:
            # §2.7.5.3.1: "A driver MUST NOT set both VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT".
            raise VirtqueueError(f"chain from head {head} has an indirect descriptor with NEXT set")
        if length == 0 or length % DESC_SIZE:
            raise VirtqueueError(f"indirect table of {length} bytes is not a whole number of descriptors")
        # No alignment check: §2.7 aligns only the queue's own three parts, and Linux allocates
        # indirect tables with kmalloc, which may give 8-byte alignment.
        return _contiguous(self.memory, address, length, "indirect descriptor table"), length // DESC_SIZE

    # ---- the used ring (device -> driver) ----

    def add_used(self, head: int, written: int) -> None:
        """Return chain `head` to the driver with `written` bytes written into its buffers."""
        word = 1 + 2 * (self.next_used % self.size)
        self._used32[word] = head
        self._used32[word + 1] = written
        self.next_used = (self.next_used + 1) & 0xFFFF
        self._used16[1] = self.next_used  # publishes the element: x86 keeps stores in order
        self._used_since_interrupt += 1

    def needs_interrupt(self) -> bool:
        """Whether the used buffers added since the last call warrant an interrupt.

        Without VIRTIO_F_EVENT_IDX: unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT
        (§2.7.7). With it: only if used_event lies in the range of entries just published
        (§2.7.10, the same test as Linux's vring_need_event()).
        """
        if not self._used_since_interrupt:
            return False
        self._used_since_interrupt = 0
        old, new = self._signalled_used, self.next_used
        self._signalled_used = new
        if not self.event_idx:
            return not self._avail[0] & AVAIL_F_NO_INTERRUPT
        if old is None:
            return True
        used_event = self._avail[self._used_event_index]
        return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
