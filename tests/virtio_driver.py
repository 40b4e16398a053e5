"""A driver-side mock of virtio-mmio and virtio-blk for unit tests.

It does what a guest driver does (virtio 1.2 §3.1.1 initialization, §2.7.13 supplying buffers,
§5.2.6 block requests) by writing GuestMemory and the transport's registers directly, so device
code is tested against real rings in real memory without KVM. It can also write arbitrary
descriptors, for the malformed-chain tests.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypervisor.memory.guest_memory import GuestMemory
from hypervisor.virtio import mmio, spec
from hypervisor.virtio import mmio_registers as regs
from hypervisor.virtio.blk_request import REQUEST_HEADER, SEGMENT
from hypervisor.virtio.queue import avail_ring_size, used_ring_size

DESCRIPTOR = struct.Struct("<QIHH")


class Allocator:
    """A bump allocator of guest physical memory for rings and buffers."""

    def __init__(self, start: int, end: int) -> None:
        self.next = start
        self.end = end

    def take(self, size: int, align: int = 16) -> int:
        address = (self.next + align - 1) & ~(align - 1)
        if address + size > self.end:
            raise MemoryError("test allocator out of guest memory")
        self.next = address + size
        return address


@dataclass(frozen=True)
class Buffer:
    address: int
    length: int
    writable: bool


class DriverQueue:
    """The driver's half of a split virtqueue: it fills descriptors and the available ring."""

    def __init__(self, memory: GuestMemory, allocator: Allocator, size: int) -> None:
        self.memory = memory
        self.size = size
        self.desc = allocator.take(16 * size, 16)
        self.avail = allocator.take(avail_ring_size(size), 2)
        self.used = allocator.take(used_ring_size(size), 4)
        for address, length in (
            (self.desc, 16 * size),
            (self.avail, avail_ring_size(size)),
            (self.used, used_ring_size(size)),
        ):
            memory.write(address, bytes(length))
        self.avail_idx = 0
        self.last_used = 0
        self._next_descriptor = 0

    def write_descriptor(self, index: int, address: int, length: int, flags: int, next_index: int = 0) -> None:
        self.memory.write(self.desc + 16 * index, DESCRIPTOR.pack(address, length, flags, next_index))

    def _take_descriptor(self) -> int:
        index = self._next_descriptor
        self._next_descriptor = (self._next_descriptor + 1) % self.size
        return index

    def add_chain(self, buffers: list[Buffer]) -> int:
        """Write `buffers` as a chain of direct descriptors; returns its head (not yet published)."""
        indices = [self._take_descriptor() for _ in buffers]
        for position, (index, buffer) in enumerate(zip(indices, buffers, strict=True)):
            last = position == len(buffers) - 1
            flags = (0 if last else spec.DESC_F_NEXT) | (spec.DESC_F_WRITE if buffer.writable else 0)
            self.write_descriptor(index, buffer.address, buffer.length, flags, 0 if last else indices[position + 1])
        return indices[0]

    def add_indirect_chain(self, buffers: list[Buffer], allocator: Allocator) -> int:
        """Write `buffers` into an indirect table referenced by one descriptor (§2.7.5.3)."""
        table = allocator.take(16 * len(buffers), 16)
        for position, buffer in enumerate(buffers):
            last = position == len(buffers) - 1
            flags = (0 if last else spec.DESC_F_NEXT) | (spec.DESC_F_WRITE if buffer.writable else 0)
            self.memory.write(
                table + 16 * position,
                DESCRIPTOR.pack(buffer.address, buffer.length, flags, 0 if last else position + 1),
            )
        head = self._take_descriptor()
        self.write_descriptor(head, table, 16 * len(buffers), spec.DESC_F_INDIRECT)
        return head

    def publish(self, head: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)

    def used_idx(self) -> int:
        return self.memory.read_u16(self.used + 2)

    def take_used(self) -> list[tuple[int, int]]:
        """(head, written length) of every used element since the last call."""
        result = []
        while self.last_used != self.used_idx():
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            result.append((self.memory.read_u32(slot), self.memory.read_u32(slot + 4)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return result

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * self.size, value)

    def avail_event(self) -> int:
        return self.memory.read_u16(self.used + 4 + 8 * self.size)

    def set_no_interrupt(self, on: bool) -> None:
        self.memory.write_u16(self.avail, spec.AVAIL_F_NO_INTERRUPT if on else 0)


class MmioDriver:
    """Register-level driver of an MmioTransport (§4.2.3)."""

    def __init__(self, transport: mmio.MmioTransport) -> None:
        self.transport = transport

    def read32(self, offset: int) -> int:
        data = bytearray(4)
        self.transport.read(offset, memoryview(data))
        return int.from_bytes(data, "little")

    def write32(self, offset: int, value: int) -> None:
        self.transport.write(offset, value.to_bytes(4, "little"))

    def read_config(self, offset: int, length: int) -> bytes:
        data = bytearray(length)
        self.transport.read(regs.CONFIG_OFFSET + offset, memoryview(data))
        return bytes(data)

    def device_features(self) -> int:
        features = 0
        for page in (0, 1):
            self.write32(regs.DEVICE_FEATURES_SEL_OFFSET, page)
            features |= self.read32(regs.DEVICE_FEATURES_OFFSET) << (32 * page)
        return features

    def write_driver_features(self, features: int) -> None:
        for page in (0, 1):
            self.write32(regs.DRIVER_FEATURES_SEL_OFFSET, page)
            self.write32(regs.DRIVER_FEATURES_OFFSET, (features >> (32 * page)) & 0xFFFFFFFF)

    def status(self) -> int:
        return self.read32(regs.STATUS_OFFSET)

    def add_status(self, bits: int) -> None:
        self.write32(regs.STATUS_OFFSET, self.status() | bits)

    def negotiate(self, features: int | None = None) -> bool:
        """Reset, ACKNOWLEDGE, DRIVER, accept `features` (default: all offered), FEATURES_OK.
        Returns whether FEATURES_OK stuck."""
        self.write32(regs.STATUS_OFFSET, 0)
        self.add_status(spec.STATUS_ACKNOWLEDGE)
        self.add_status(spec.STATUS_DRIVER)
        self.write_driver_features(self.device_features() if features is None else features)
        self.add_status(spec.STATUS_FEATURES_OK)
        return bool(self.status() & spec.STATUS_FEATURES_OK)

    def setup_queue(self, index: int, queue: DriverQueue) -> None:
        self.write32(regs.QUEUE_SEL_OFFSET, index)
        self.write32(regs.QUEUE_NUM_OFFSET, queue.size)
        for low, address in (
            (regs.QUEUE_DESC_LOW_OFFSET, queue.desc),
            (regs.QUEUE_DRIVER_LOW_OFFSET, queue.avail),
            (regs.QUEUE_DEVICE_LOW_OFFSET, queue.used),
        ):
            self.write32(low, address & 0xFFFFFFFF)
            self.write32(low + 4, address >> 32)
        self.write32(regs.QUEUE_READY_OFFSET, 1)

    def driver_ok(self) -> None:
        self.add_status(spec.STATUS_DRIVER_OK)

    def notify(self, index: int) -> None:
        self.write32(regs.QUEUE_NOTIFY_OFFSET, index)


@dataclass
class PendingRequest:
    head: int
    data: int  # address of the device-writable payload (IN, GET_ID), 0 if none
    data_length: int
    status: int  # address of the status byte


class BlockDriver:
    """Builds virtio-blk requests (§5.2.6) on a DriverQueue."""

    def __init__(self, memory: GuestMemory, allocator: Allocator, queue: DriverQueue) -> None:
        self.memory = memory
        self.allocator = allocator
        self.queue = queue

    def submit(
        self,
        request_type: int,
        sector: int = 0,
        out: bytes = b"",
        in_length: int = 0,
        *,
        split_header: bool = False,
        indirect: bool = False,
    ) -> PendingRequest:
        header = self.allocator.take(REQUEST_HEADER.size)
        self.memory.write(header, REQUEST_HEADER.pack(request_type, 0, sector))
        buffers = (
            [Buffer(header, 8, False), Buffer(header + 8, 8, False)]
            if split_header
            else [Buffer(header, REQUEST_HEADER.size, False)]
        )
        if out:
            payload = self.allocator.take(len(out))
            self.memory.write(payload, out)
            buffers.append(Buffer(payload, len(out), False))
        data = self.allocator.take(in_length) if in_length else 0
        if in_length:
            self.memory.write(data, b"\xee" * in_length)
            buffers.append(Buffer(data, in_length, True))
        status = self.allocator.take(1, 1)
        self.memory.write(status, b"\xff")
        buffers.append(Buffer(status, 1, True))
        head = self.queue.add_indirect_chain(buffers, self.allocator) if indirect else self.queue.add_chain(buffers)
        self.queue.publish(head)
        return PendingRequest(head, data, in_length, status)

    def status_of(self, request: PendingRequest) -> int:
        return self.memory.read_u8(request.status)

    def data_of(self, request: PendingRequest) -> bytes:
        return self.memory.read(request.data, request.data_length)


def segments(*entries: tuple[int, int, int]) -> bytes:
    """The payload of DISCARD / WRITE_ZEROES: (sector, num_sectors, flags) entries (§5.2.6)."""
    return b"".join(SEGMENT.pack(*entry) for entry in entries)
