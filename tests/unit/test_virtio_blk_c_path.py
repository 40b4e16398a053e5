"""virtio-blk's C path (csrc/virtio_blk.c) does exactly what the Python path does, or declines.

Every test runs the same rings, in the same guest memory and on the same disk contents, through
a VirtioBlock with the C path and one without it, and compares everything the guest or the disk
can see afterwards: all of guest RAM (used ring, status bytes, read data), the disk file, the
ring positions, and whether the queue ended in a VirtqueueError (the transport's "needs reset").
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hypervisor.block.qcow2 import Qcow2Image
from hypervisor.block.qcow2.create import Qcow2CreateOptions, create_qcow2
from hypervisor.block.raw import RawFile
from hypervisor.memory.guest_memory import GuestMemory
from hypervisor.virtio.blk import VirtioBlock
from hypervisor.virtio.blk_request import REQUEST_HEADER, T_FLUSH, T_GET_ID, T_IN, T_OUT
from hypervisor.virtio.queue import Virtqueue, VirtqueueError
from hypervisor.virtio.spec import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE

MEMORY = 1 << 20
QUEUE_SIZE = 64
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
HEADERS, STATUS = 0x4000, 0x5000  # one 32-byte slot and one 8-byte slot per request
DATA = 0x10000  # 16 KiB of buffer per request
DISK_SECTORS = 128
DESCRIPTOR = struct.Struct("<QIHH")


@dataclass(frozen=True)
class Descriptor:
    address: int
    length: int
    flags: int  # the `next` field is written by write_ring, which links each request in order


def plain_request(slot: int, request_type: int, lengths: list[int]) -> list[Descriptor]:
    """Header, data buffers (device-writable for a read), status byte: a Linux-shaped request."""
    writable = DESC_F_WRITE if request_type != T_OUT else 0
    parts = [(HEADERS + 32 * slot, 16, 0)]
    offset = DATA + 0x4000 * slot
    for length in lengths:
        parts.append((offset, length, writable))
        offset += length
    parts.append((STATUS + 8 * slot, 1, DESC_F_WRITE))
    return [
        Descriptor(address, length, flags | (DESC_F_NEXT if i < len(parts) - 1 else 0))
        for i, (address, length, flags) in enumerate(parts)
    ]


class Rig:
    """Guest RAM, one queue and a virtio-blk on a file, driven like a guest driver would."""

    def __init__(self, disk: Path, c_path: bool, read_only: bool = False, backend: object = None) -> None:
        self.memory = GuestMemory.flat(MEMORY)
        self.queue = Virtqueue(self.memory, QUEUE_SIZE, DESC, AVAIL, USED)
        self.device = VirtioBlock(backend or RawFile(str(disk), read_only=read_only))  # type: ignore[arg-type]
        self.device.use_c_path = c_path
        self.device.activate(0)

    def load(self, image: bytes) -> None:
        self.memory.write(0, image)

    def run(self) -> str:
        try:
            self.device.process_queue(0, self.queue)
        except VirtqueueError:
            return "needs reset"
        return "ok"

    def close(self) -> None:
        self.queue.release()
        self.device.close()
        self.memory.close()


def both_paths(tmp_path: Path, image: bytes, read_only: bool = False) -> int:
    """Run `image` through both paths on copies of one disk; assert identical outcomes."""
    contents = os.urandom(DISK_SECTORS * 512)
    results = []
    for c_path in (True, False):
        disk = tmp_path / f"disk-{c_path}.raw"
        disk.write_bytes(contents)
        rig = Rig(disk, c_path, read_only)
        rig.load(image)
        outcome = rig.run()
        positions = (rig.queue.next_avail, rig.queue.next_used, rig.queue.needs_interrupt())
        results.append((outcome, positions, rig.memory.read(0, MEMORY), disk.read_bytes(), rig.device.fast_requests))
        rig.close()
    with_c, python_only = results
    assert with_c[:4] == python_only[:4]
    assert python_only[4] == 0
    return with_c[4]  # requests the C path completed


def write_ring(requests: list[list[Descriptor]], headers: list[tuple[int, int]], avail_jump: int = 0,
               next_override: dict[int, int] | None = None) -> bytes:  # fmt: skip
    """Guest RAM with `requests` placed in the table (linked in order) and published."""
    ram = bytearray(MEMORY)
    heads, index = [], 0
    for request in requests:
        heads.append(index)
        for position, descriptor in enumerate(request):
            next_index = index + 1 if position < len(request) - 1 else 0
            if next_override and index in next_override:
                next_index = next_override[index]
            DESCRIPTOR.pack_into(ram, DESC + 16 * index, descriptor.address, descriptor.length, descriptor.flags,
                                 next_index)  # fmt: skip
            index += 1
    for slot, (request_type, sector) in enumerate(headers):
        REQUEST_HEADER.pack_into(ram, HEADERS + 32 * slot, request_type, 0, sector)
    for position, head in enumerate(heads):
        struct.pack_into("<H", ram, AVAIL + 4 + 2 * position, head)
    struct.pack_into("<H", ram, AVAIL + 2, (len(heads) + avail_jump) & 0xFFFF)
    ram[DATA : DATA + 0x4000 * max(1, len(requests))] = bytes([0xEE]) * (0x4000 * max(1, len(requests)))
    return bytes(ram)


def reads(count: int, sectors: int = 8) -> tuple[list[list[Descriptor]], list[tuple[int, int]]]:
    requests = [plain_request(slot, T_IN, [512 * sectors]) for slot in range(count)]
    return requests, [(T_IN, (slot * 13) % (DISK_SECTORS - sectors)) for slot in range(count)]


def test_plain_reads_and_writes_are_done_in_c_with_the_same_result(tmp_path: Path) -> None:
    requests = [plain_request(slot, T_IN if slot % 2 else T_OUT, [512, 1024]) for slot in range(6)]
    headers = [(T_IN if slot % 2 else T_OUT, slot * 7) for slot in range(6)]
    image = write_ring(requests, headers)
    both_paths(tmp_path, image)
    disk = tmp_path / "c.raw"
    disk.write_bytes(os.urandom(DISK_SECTORS * 512))
    rig = Rig(disk, c_path=True)
    rig.load(image)
    assert rig.run() == "ok"
    assert rig.device.fast_requests == 6  # every one of them in C
    used = [struct.unpack_from("<II", rig.memory.read(USED + 4 + 8 * i, 8)) for i in range(6)]
    assert used == [(4 * slot, 1 if slot % 2 == 0 else 1537) for slot in range(6)]
    assert rig.memory.read(STATUS, 1) == b"\0"
    rig.close()


def test_a_request_c_declines_runs_in_python_in_ring_order(tmp_path: Path) -> None:
    requests, headers = reads(5)
    requests[2] = plain_request(2, T_GET_ID, [20])  # Python's: GET_ID
    headers[2] = (T_GET_ID, 0)
    requests[3] = plain_request(3, T_IN, [8 * 512])
    headers[3] = (T_IN, DISK_SECTORS)  # past the end: IOERR, decided by Python
    image = write_ring(requests, headers)
    both_paths(tmp_path, image)
    disk = tmp_path / "c.raw"
    disk.write_bytes(bytes(DISK_SECTORS * 512))
    rig = Rig(disk, c_path=True)
    rig.load(image)
    assert rig.run() == "ok"
    assert rig.device.fast_requests == 3
    assert [rig.memory.read(STATUS + 8 * slot, 1)[0] for slot in range(5)] == [0, 0, 0, 1, 0]
    rig.close()


def test_a_ring_index_that_runs_ahead_needs_reset_on_both_paths(tmp_path: Path) -> None:
    requests, headers = reads(2)
    both_paths(tmp_path, write_ring(requests, headers, avail_jump=QUEUE_SIZE))


def test_a_looping_chain_needs_reset_on_both_paths(tmp_path: Path) -> None:
    requests, headers = reads(1)
    both_paths(tmp_path, write_ring(requests, headers, next_override={1: 0}))


def test_writes_to_a_read_only_disk_are_refused_by_python(tmp_path: Path) -> None:
    requests = [plain_request(0, T_OUT, [512])]
    both_paths(tmp_path, write_ring(requests, [(T_OUT, 0)]), read_only=True)


def test_a_file_that_shrank_reads_as_zeros_through_python(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(DISK_SECTORS * 512))
    rig = Rig(disk, c_path=True)
    os.truncate(disk, 512)  # the capacity the guest saw stays; preadv comes back short
    requests, headers = reads(1)
    rig.load(write_ring(requests, headers[:1]))
    assert rig.run() == "ok"
    assert rig.device.fast_requests == 0
    sector = headers[0][1]
    expected = disk.read_bytes()[sector * 512 : sector * 512 + 4096].ljust(4096, b"\0")
    assert rig.memory.read(DATA, 4096) == expected
    assert rig.memory.read(STATUS, 1) == b"\0"
    rig.close()


def test_an_unallocated_qcow2_is_read_by_python(tmp_path: Path) -> None:
    """No cluster is plainly mapped: C declines every read (tests/unit/test_virtio_blk_qcow2_c_path.py
    has the allocated cases)."""
    path = tmp_path / "disk.qcow2"
    create_qcow2(str(path), Qcow2CreateOptions(size=DISK_SECTORS * 512))
    image = Qcow2Image.open(str(path), read_only=False, allow_backing=False)
    rig = Rig(path, c_path=True, backend=image)
    requests, headers = reads(3)
    rig.load(write_ring(requests, headers))
    assert rig.run() == "ok"
    assert rig.device.fast_requests == 0
    assert rig.memory.read(DATA, 4096) == bytes(4096)
    rig.close()


# Random chains: mostly Linux-shaped requests, each possibly bent in one way the C path must
# either do exactly as Python or leave to it.
BENDS = ["none"] * 8 + ["header-length", "status-length", "indirect", "outside-ram", "straddle-ram", "zero-length",
         "mixed-direction", "odd-length", "past-end", "type", "no-status", "loop", "head-outside"]  # fmt: skip


@st.composite
def bent_requests(draw: st.DrawFn) -> tuple[list[list[Descriptor]], list[tuple[int, int]], dict[int, int], int]:
    count = draw(st.integers(1, 4))
    requests, headers, overrides, index = [], [], {}, 0
    for slot in range(count):
        request_type = draw(st.sampled_from([T_IN, T_IN, T_OUT, T_FLUSH, T_GET_ID, 99]))
        lengths = draw(st.lists(st.sampled_from([512, 1024, 4096]), min_size=1, max_size=3))
        sector = draw(st.integers(0, DISK_SECTORS - 1))
        request = plain_request(slot, request_type, lengths)
        bend = draw(st.sampled_from(BENDS))
        data = 1 + draw(st.integers(0, len(lengths) - 1))  # index of one data descriptor
        d = request[data]
        if bend == "header-length":
            request[0] = Descriptor(request[0].address, draw(st.sampled_from([8, 15, 17, 32])), request[0].flags)
        elif bend == "status-length":
            last = request[-1]
            request[-1] = Descriptor(last.address, draw(st.sampled_from([0, 2, 8])), last.flags)
        elif bend == "indirect":
            request[data] = Descriptor(d.address, 32, d.flags | DESC_F_INDIRECT)
        elif bend == "outside-ram":
            request[data] = Descriptor(MEMORY + draw(st.integers(0, 1 << 40)), d.length, d.flags)
        elif bend == "straddle-ram":
            request[data] = Descriptor(MEMORY - 256, d.length, d.flags)
        elif bend == "zero-length":
            request[data] = Descriptor(draw(st.sampled_from([d.address, 1 << 63])), 0, d.flags)
        elif bend == "mixed-direction":
            request[data] = Descriptor(d.address, d.length, d.flags ^ DESC_F_WRITE)
        elif bend == "odd-length":
            request[data] = Descriptor(d.address, d.length - draw(st.integers(1, 511)), d.flags)
        elif bend == "past-end":
            sector = DISK_SECTORS - draw(st.integers(0, 2))
        elif bend == "type":
            request_type = draw(st.integers(0, 0xFFFFFFFF))
        elif bend == "no-status":
            request = request[:-1]
            request[-1] = Descriptor(request[-1].address, request[-1].length, request[-1].flags & ~DESC_F_NEXT)
        elif bend == "loop":
            overrides[index + draw(st.integers(0, len(request) - 2))] = index
        elif bend == "head-outside":
            overrides[index + len(request) - 2] = QUEUE_SIZE + draw(st.integers(0, 100))
        if index + len(request) > QUEUE_SIZE:
            break
        requests.append(request)
        headers.append((request_type, sector))
        index += len(request)
    jump = draw(st.sampled_from([0] * 8 + [QUEUE_SIZE + 1, 0x8000]))
    return requests, headers, overrides, jump


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bent_requests(), read_only=st.booleans())
def test_random_chains_end_the_same_on_both_paths(
    tmp_path_factory: pytest.TempPathFactory,
    case: tuple[list[list[Descriptor]], list[tuple[int, int]], dict[int, int], int],
    read_only: bool,
) -> None:
    requests, headers, overrides, jump = case
    folder = tmp_path_factory.mktemp("blk")
    in_c = both_paths(folder, write_ring(requests, headers, jump, overrides), read_only)
    event(f"C completed {min(in_c, 2)}+ of {min(len(requests), 2)}+ requests")
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
