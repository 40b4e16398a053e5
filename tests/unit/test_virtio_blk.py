"""virtio-blk (virtio 1.2 §5.2) end to end: driver mock -> rings -> transport -> raw file in tmp_path."""

from __future__ import annotations

import logging
import os

import pytest

from hypervisor.block.raw import RawFile
from hypervisor.devices.bus import NullInterruptLine
from hypervisor.errors import ConfigError, ImageError
from hypervisor.memory.guest_memory import GuestMemory
from hypervisor.virtio import mmio, spec
from hypervisor.virtio import mmio_registers as regs
from hypervisor.virtio.blk import (
    F_DISCARD,
    F_RO,
    F_WRITE_ZEROES,
    MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEGMENTS,
    VirtioBlock,
)
from hypervisor.virtio.blk_request import (
    REQUEST_HEADER,
    S_IOERR,
    S_OK,
    S_UNSUPP,
    SEGMENT_FLAG_UNMAP,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
)
from tests.virtio_driver import DESCRIPTOR, Allocator, BlockDriver, Buffer, DriverQueue, MmioDriver, segments

MEMORY_SIZE = 4 << 20
DISK_SIZE = 1 << 20
SECTORS = DISK_SIZE // 512
PATTERN = bytes(range(256)) * 2  # one sector


class Machine:
    """A transport with a blk device over a raw file, brought up by the driver mock."""

    def __init__(self, path: str, read_only: bool = False, features: int | None = None, size: int = 64) -> None:
        self.memory = GuestMemory.flat(MEMORY_SIZE)
        self.line = NullInterruptLine()
        self.transport = mmio.MmioTransport(
            VirtioBlock(RawFile(path, read_only=read_only), serial="pyhv-serial-0001"), self.memory, self.line
        )
        self.driver = MmioDriver(self.transport)
        self.allocator = Allocator(0x1000, MEMORY_SIZE)
        assert self.driver.negotiate(features)
        self.queue = DriverQueue(self.memory, self.allocator, size)
        self.driver.setup_queue(0, self.queue)
        self.driver.driver_ok()
        self.blk = BlockDriver(self.memory, self.allocator, self.queue)

    def run(self) -> list[tuple[int, int]]:
        """What the I/O thread does after a notify, run synchronously."""
        self.transport.process_queue(0)
        return self.queue.take_used()

    def needs_reset(self) -> bool:
        return bool(self.driver.status() & spec.STATUS_DEVICE_NEEDS_RESET)

    def close(self) -> None:
        self.transport.close()
        self.memory.close()


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(DISK_SIZE))
    return path


@pytest.fixture
def machine(disk):
    vm = Machine(str(disk))
    yield vm
    vm.close()


def test_config_space(machine):
    config = machine.driver.read_config(0, 60)
    assert int.from_bytes(config[0:8], "little") == SECTORS
    assert int.from_bytes(config[12:16], "little") == 254  # seg_max
    assert int.from_bytes(config[20:24], "little") == 512  # blk_size
    assert int.from_bytes(config[36:40], "little") > 0  # max_discard_sectors
    assert config[56] == 1  # write_zeroes_may_unmap


def test_write_then_read_back(machine, disk):
    data = PATTERN * 8
    write = machine.blk.submit(T_OUT, sector=10, out=data)
    assert machine.run() == [(write.head, 1)]
    assert machine.blk.status_of(write) == S_OK
    assert disk.read_bytes()[10 * 512 : 18 * 512] == data
    read = machine.blk.submit(T_IN, sector=10, in_length=len(data))
    assert machine.run() == [(read.head, len(data) + 1)]
    assert machine.blk.status_of(read) == S_OK
    assert machine.blk.data_of(read) == data


def test_read_with_split_header_and_indirect_table(machine, disk):
    with open(disk, "r+b") as f:
        f.seek(512 * 7)
        f.write(PATTERN)
    read = machine.blk.submit(T_IN, sector=7, in_length=512, split_header=True, indirect=True)
    machine.run()
    assert machine.blk.status_of(read) == S_OK
    assert machine.blk.data_of(read) == PATTERN


def test_many_requests_in_flight_complete_with_one_interrupt(machine, disk):
    requests = [machine.blk.submit(T_OUT, sector=i, out=bytes([i]) * 512) for i in range(20)]
    used = machine.run()
    assert [head for head, _ in used] == [request.head for request in requests]
    assert all(machine.blk.status_of(request) == S_OK for request in requests)
    assert machine.line.pulses == 1
    content = disk.read_bytes()
    assert all(content[i * 512 : (i + 1) * 512] == bytes([i]) * 512 for i in range(20))


def test_flush(machine):
    request = machine.blk.submit(T_FLUSH)
    assert machine.run() == [(request.head, 1)]
    assert machine.blk.status_of(request) == S_OK


@pytest.mark.parametrize("length, expected", [(20, b"pyhv-serial-0001\0\0\0\0"), (8, b"pyhv-ser")])
def test_get_id(machine, length, expected):
    request = machine.blk.submit(T_GET_ID, in_length=length)
    assert machine.run() == [(request.head, length + 1)]
    assert machine.blk.status_of(request) == S_OK
    assert machine.blk.data_of(request) == expected


def test_discard_and_write_zeroes(machine, disk):
    disk.write_bytes(b"\x55" * DISK_SIZE)
    discard = machine.blk.submit(T_DISCARD, out=segments((0, 8, 0)))
    zeroes = machine.blk.submit(T_WRITE_ZEROES, out=segments((16, 8, 0), (32, 8, SEGMENT_FLAG_UNMAP)))
    machine.run()
    assert machine.blk.status_of(discard) == S_OK
    assert machine.blk.status_of(zeroes) == S_OK
    content = disk.read_bytes()
    assert content[16 * 512 : 24 * 512] == bytes(8 * 512)
    assert content[32 * 512 : 40 * 512] == bytes(8 * 512)
    assert content[24 * 512 : 32 * 512] == b"\x55" * 8 * 512  # untouched between the segments
    assert len(content) == DISK_SIZE


@pytest.mark.parametrize(
    "request_type, payload, expected",
    [
        (T_DISCARD, segments((0, 8, SEGMENT_FLAG_UNMAP)), S_UNSUPP),  # §5.2.6.2: unmap on discard
        (T_WRITE_ZEROES, segments((0, 8, 0x4)), S_UNSUPP),  # reserved flag bit
        (T_WRITE_ZEROES, segments((SECTORS - 4, 8, 0)), S_IOERR),  # past the end
        (T_DISCARD, b"\0" * 10, S_UNSUPP),  # not whole segments
        (T_DISCARD, segments(*[(0, 1, 0)] * (MAX_DISCARD_SEGMENTS + 1)), S_UNSUPP),  # > max_discard_seg
        (T_WRITE_ZEROES, segments((0, MAX_DISCARD_SECTORS + 8, 0)), S_IOERR),  # > max_write_zeroes_sectors
    ],
)
def test_bad_discard_and_write_zeroes(machine, disk, request_type, payload, expected):
    disk.write_bytes(b"\x55" * DISK_SIZE)
    request = machine.blk.submit(request_type, out=payload)
    machine.run()
    assert machine.blk.status_of(request) == expected
    assert disk.read_bytes() == b"\x55" * DISK_SIZE


def test_discard_unsupported_when_not_negotiated(disk):
    vm = Machine(str(disk))
    offered = vm.driver.device_features()
    vm.close()
    vm = Machine(str(disk), features=offered & ~(1 << F_DISCARD) & ~(1 << F_WRITE_ZEROES))
    try:
        request = vm.blk.submit(T_DISCARD, out=segments((0, 8, 0)))
        vm.run()
        assert vm.blk.status_of(request) == S_UNSUPP
    finally:
        vm.close()


@pytest.mark.parametrize(
    "request_type, sector, out, in_length, expected",
    [
        (T_IN, SECTORS, b"", 512, S_IOERR),  # starts at the capacity
        (T_IN, SECTORS - 1, b"", 1024, S_IOERR),  # runs past it
        (T_IN, 2**63, b"", 512, S_IOERR),  # absurd sector number
        (T_OUT, SECTORS - 1, b"x" * 1024, 0, S_IOERR),
        (T_IN, 0, b"", 100, S_IOERR),  # §5.2.6.1: not a multiple of 512
        (T_OUT, 0, b"x" * 100, 0, S_IOERR),
        (99, 0, b"", 0, S_UNSUPP),  # unknown request type
        (10, 0, b"", 0, S_UNSUPP),  # GET_LIFETIME: not offered
    ],
    ids=[
        "at-capacity",
        "past-capacity",
        "huge-sector",
        "write-past",
        "odd-read",
        "odd-write",
        "unknown",
        "lifetime",
    ],
)
def test_bad_requests_end_in_error_status(machine, disk, request_type, sector, out, in_length, expected):
    request = machine.blk.submit(request_type, sector=sector, out=out, in_length=in_length)
    used = machine.run()
    assert [head for head, _ in used] == [request.head]
    assert machine.blk.status_of(request) == expected
    assert not machine.needs_reset()
    assert disk.read_bytes() == bytes(DISK_SIZE)


def test_read_only_disk_refuses_writes_and_file_is_unchanged(disk):
    disk.write_bytes(b"\x77" * DISK_SIZE)
    before = os.stat(disk).st_mtime_ns
    vm = Machine(str(disk), read_only=True)
    try:
        assert vm.driver.device_features() & (1 << F_RO)
        write = vm.blk.submit(T_OUT, sector=0, out=PATTERN)
        zeroes = vm.blk.submit(T_WRITE_ZEROES, out=segments((0, 8, 0)))
        discard = vm.blk.submit(T_DISCARD, out=segments((0, 8, 0)))
        read = vm.blk.submit(T_IN, sector=0, in_length=512)
        flush = vm.blk.submit(T_FLUSH)
        vm.run()
        assert [vm.blk.status_of(r) for r in (write, zeroes, discard)] == [S_IOERR] * 3
        assert vm.blk.status_of(read) == S_OK
        assert vm.blk.data_of(read) == b"\x77" * 512
        assert vm.blk.status_of(flush) == S_OK
    finally:
        vm.close()
    assert disk.read_bytes() == b"\x77" * DISK_SIZE
    assert os.stat(disk).st_mtime_ns == before


def test_header_in_writable_descriptor_gets_ioerr(machine):
    # A write-only descriptor where the readable header is required: no header, status IOERR.
    memory, queue = machine.memory, machine.queue
    header, status = machine.allocator.take(16), machine.allocator.take(1)
    queue.write_descriptor(0, header, 16, spec.DESC_F_WRITE | spec.DESC_F_NEXT, 1)
    queue.write_descriptor(1, status, 1, spec.DESC_F_WRITE)
    queue.publish(0)
    assert machine.run() == [(0, 1)]
    assert memory.read_u8(status) == S_IOERR
    assert not machine.needs_reset()


def test_chain_without_status_byte_needs_reset(machine):
    header = machine.allocator.take(16)
    machine.queue.write_descriptor(0, header, 16, 0)
    machine.queue.publish(0)
    assert machine.run() == []
    assert machine.needs_reset()


@pytest.mark.parametrize(
    "descriptors",
    [
        [(0x8000, 16, spec.DESC_F_NEXT, 1), (0x9000, 1, spec.DESC_F_WRITE | spec.DESC_F_NEXT, 0)],  # loop
        [(MEMORY_SIZE - 4, 16, spec.DESC_F_NEXT, 1), (0x9000, 1, spec.DESC_F_WRITE, 0)],  # outside RAM
        [(0x8000, 0xFFFF_FFFF, spec.DESC_F_NEXT, 1), (2**64 - 1, 1, spec.DESC_F_WRITE, 0)],  # overflow
        [
            (0x8000, 16, spec.DESC_F_NEXT, 1),
            (0x9000, 1, spec.DESC_F_WRITE | spec.DESC_F_NEXT, 2),
            (0x8000, 1, 0, 0),
        ],
    ],
    ids=["loop", "outside-ram", "overflow", "readable-after-writable"],
)
def test_malformed_chains_need_reset_never_raise(machine, descriptors):
    for index, descriptor in enumerate(descriptors):
        machine.queue.write_descriptor(index, *descriptor)
    machine.queue.publish(0)
    machine.run()
    assert machine.needs_reset()
    assert machine.driver.read32(regs.INTERRUPT_STATUS_OFFSET) & spec.INTERRUPT_CONFIG_CHANGE
    # A later notify does nothing until the driver resets; then the device works again.
    machine.run()
    machine.driver.write32(regs.STATUS_OFFSET, 0)
    assert machine.driver.status() == 0


def test_chain_longer_than_queue_needs_reset(machine):
    buffers = [(0x8000, 16, spec.DESC_F_NEXT)] * 70 + [(0x9000, 1, spec.DESC_F_WRITE)]
    table = machine.allocator.take(16 * len(buffers))
    for index, (address, length, flags) in enumerate(buffers):
        machine.memory.write(table + 16 * index, DESCRIPTOR.pack(address, length, flags, index + 1))
    machine.queue.write_descriptor(0, table, 16 * len(buffers), spec.DESC_F_INDIRECT)
    machine.queue.publish(0)
    machine.run()
    assert machine.needs_reset()


def test_indirect_inside_indirect_needs_reset(machine):
    inner = machine.allocator.take(16)
    machine.memory.write(inner, DESCRIPTOR.pack(0x9000, 1, spec.DESC_F_WRITE, 0))
    outer = machine.allocator.take(16)
    machine.memory.write(outer, DESCRIPTOR.pack(inner, 16, spec.DESC_F_INDIRECT, 0))
    machine.queue.write_descriptor(0, outer, 16, spec.DESC_F_INDIRECT)
    machine.queue.publish(0)
    machine.run()
    assert machine.needs_reset()


class FailingBackend:
    """A backend whose every I/O fails like a dying disk."""

    size = DISK_SIZE
    read_only = False

    def readinto(self, offset, buffers):
        raise OSError(5, "Input/output error")

    def write(self, offset, buffers):
        raise ImageError("disk.qcow2: image is corrupt")

    def flush(self):
        raise OSError(5, "Input/output error")

    def discard(self, offset, length):
        raise OSError(95, "Operation not supported")

    def write_zeroes(self, offset, length):
        raise OSError(28, "No space left on device")

    def close(self):
        pass


def test_backend_errors_become_ioerr_and_are_logged_once(caplog):
    memory = GuestMemory.flat(MEMORY_SIZE)
    device = VirtioBlock(FailingBackend())
    transport = mmio.MmioTransport(device, memory, NullInterruptLine())
    driver = MmioDriver(transport)
    allocator = Allocator(0x1000, MEMORY_SIZE)
    try:
        assert driver.negotiate()
        queue = DriverQueue(memory, allocator, 16)
        driver.setup_queue(0, queue)
        driver.driver_ok()
        blk = BlockDriver(memory, allocator, queue)
        with caplog.at_level(logging.ERROR, logger="hypervisor.virtio"):
            requests = [
                blk.submit(T_IN, in_length=512),
                blk.submit(T_OUT, out=PATTERN),
                blk.submit(T_FLUSH),
                blk.submit(T_DISCARD, out=segments((0, 8, 0))),
                blk.submit(T_WRITE_ZEROES, out=segments((0, 8, 0))),
            ]
            transport.process_queue(0)
        assert [blk.status_of(r) for r in requests] == [S_IOERR] * 5
        assert device.backend_errors == 5
        assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
        assert not driver.status() & spec.STATUS_DEVICE_NEEDS_RESET
    finally:
        transport.close()
        memory.close()


@pytest.mark.parametrize("serial", ["x" * 21, "caf\u00e9", "tab\there"])
def test_bad_serial_is_a_config_error(disk, serial):
    with RawFile(str(disk)) as backend, pytest.raises(ConfigError, match="serial"):
        VirtioBlock(backend, serial=serial)


def test_event_idx_suppression_through_the_device(machine):
    # With EVENT_IDX negotiated (the default here), the driver moves used_event ahead: no
    # interrupt until the used index passes it.
    first = machine.blk.submit(T_FLUSH)
    machine.run()
    assert machine.line.pulses == 1 and machine.blk.status_of(first) == S_OK
    machine.queue.set_used_event(3)
    machine.blk.submit(T_FLUSH)
    machine.blk.submit(T_FLUSH)
    machine.run()
    assert machine.line.pulses == 1  # used idx 3: event 3 not yet passed
    machine.blk.submit(T_FLUSH)
    machine.run()
    assert machine.line.pulses == 2  # used idx 4 passed used_event 3
    assert machine.queue.avail_event() == machine.queue.avail_idx


def test_requests_in_guest_ram_split_across_regions(disk):
    # Guest RAM in two adjacent regions: a payload that straddles them still reads in one go.
    memory = GuestMemory([(0, 0x100000), (0x100000, 0x100000)])
    transport = mmio.MmioTransport(VirtioBlock(RawFile(str(disk))), memory, NullInterruptLine())
    driver = MmioDriver(transport)
    try:
        disk.write_bytes(PATTERN * (DISK_SIZE // 512))
        assert driver.negotiate()
        allocator = Allocator(0x1000, 0x200000)
        queue = DriverQueue(memory, allocator, 16)
        driver.setup_queue(0, queue)
        driver.driver_ok()
        header, status = allocator.take(16), allocator.take(1)
        memory.write(header, REQUEST_HEADER.pack(T_IN, 0, 0))
        payload = 0x100000 - 512  # 1 KiB that starts 512 bytes below the seam of the regions
        chain = [Buffer(header, 16, False), Buffer(payload, 1024, True), Buffer(status, 1, True)]
        queue.publish(queue.add_chain(chain))
        transport.process_queue(0)
        assert memory.read_u8(status) == S_OK
        assert memory.read(payload, 512) + memory.read(payload + 512, 512) == PATTERN * 2
    finally:
        transport.close()
        memory.close()
