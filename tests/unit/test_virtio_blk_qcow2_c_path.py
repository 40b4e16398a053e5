"""virtio-blk's C path on qcow2 (csrc/virtio_blk.c with hypervisor/virtio/blk_plain.py).

C serves a read or write only when every cluster it touches is plainly mapped (and, for a
write, owned alone: COPIED); everything else is declined to Python, which applies the qcow2
rules. Each test drives rings like a guest driver, checks how many requests C completed, and
compares what the guest and the disk see with a raw model, the Python path, or qemu-img.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hypervisor.block.qcow2 import Qcow2Image
from hypervisor.memory.guest_memory import GuestMemory
from hypervisor.virtio.blk import F_DISCARD, F_WRITE_ZEROES, VirtioBlock
from hypervisor.virtio.blk_request import REQUEST_HEADER, SEGMENT, T_DISCARD, T_IN, T_OUT, T_WRITE_ZEROES
from hypervisor.virtio.queue import Virtqueue
from hypervisor.virtio.spec import DESC_F_NEXT, DESC_F_WRITE, feature_bit
from tests.block.qcow2_oracle import create, needs_qemu, qemu_img, qemu_io, to_raw

pytestmark = needs_qemu

MEMORY = 1 << 20
QUEUE_SIZE = 64
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
HEADERS, STATUS = 0x4000, 0x5000  # one 32-byte header slot and one 8-byte status slot per request
DATA = 0x10000  # 64 KiB of buffer per request
SLOT_BYTES = 0x10000
CLUSTER = 4096
DISK = 64 * CLUSTER  # 256 KiB: 64 clusters of 4 KiB
DESCRIPTOR = struct.Struct("<QIHH")
FEATURES = feature_bit(F_DISCARD) | feature_bit(F_WRITE_ZEROES)

# (type, byte offset, byte length, fill byte for a write); discard and write-zeroes carry a segment
Request = tuple[int, int, int, int]


def write_ring(memory: GuestMemory, requests: list[Request]) -> None:
    """Place `requests` in a fresh ring (header, one data buffer, status each) and publish them."""
    ram = bytearray(DATA)
    index = 0
    for slot, (kind, offset, length, fill) in enumerate(requests):
        data = DATA + SLOT_BYTES * slot
        parts = [(HEADERS + 32 * slot, 16, 0)]
        if kind == T_IN:
            parts.append((data, length, DESC_F_WRITE))
            memory.write(data, bytes([0xEE]) * length)
        elif kind == T_OUT:
            parts.append((data, length, 0))
            memory.write(data, bytes([fill]) * length)
        else:  # one discard / write-zeroes segment: sector, sectors, flags
            parts.append((data, SEGMENT.size, 0))
            memory.write(data, SEGMENT.pack(offset // 512, length // 512, 0))
        parts.append((STATUS + 8 * slot, 1, DESC_F_WRITE))
        struct.pack_into("<H", ram, AVAIL + 4 + 2 * slot, index)
        for position, (address, size, flags) in enumerate(parts):
            last = position == len(parts) - 1
            DESCRIPTOR.pack_into(ram, DESC + 16 * index, address, size, flags | (0 if last else DESC_F_NEXT),
                                 0 if last else index + 1)  # fmt: skip
            index += 1
        sector = offset // 512 if kind in (T_IN, T_OUT) else 0
        REQUEST_HEADER.pack_into(ram, HEADERS + 32 * slot, kind, 0, sector)
        ram[STATUS + 8 * slot] = 0xFF
    struct.pack_into("<H", ram, AVAIL + 2, len(requests))
    memory.write(0, bytes(ram))


class Rig:
    """Guest RAM and a virtio-blk on an open qcow2 image; each `run` is a fresh ring."""

    def __init__(self, path: Path, c_path: bool = True, read_only: bool = False) -> None:
        self.memory = GuestMemory.flat(MEMORY)
        self.image = Qcow2Image.open(str(path), read_only=read_only)
        self.device = VirtioBlock(self.image)
        self.device.use_c_path = c_path
        self.device.activate(FEATURES)
        self.queue: Virtqueue | None = None

    def run(self, requests: list[Request]) -> list[tuple[int, bytes]]:
        """(status, data read) of each request, in order."""
        if self.queue is not None:
            self.queue.release()
        write_ring(self.memory, requests)
        self.queue = Virtqueue(self.memory, QUEUE_SIZE, DESC, AVAIL, USED)
        self.device.process_queue(0, self.queue)
        assert self.queue.next_used == len(requests)
        results = []
        for slot, (kind, _, length, _) in enumerate(requests):
            data = self.memory.read(DATA + SLOT_BYTES * slot, length) if kind == T_IN else b""
            results.append((self.memory.read(STATUS + 8 * slot, 1)[0], data))
        return results

    def close(self) -> None:
        if self.queue is not None:
            self.queue.release()
        self.device.close()
        self.memory.close()


def allocated_image(tmp_path: Path, name: str = "disk.qcow2") -> tuple[Path, bytearray]:
    """A fully allocated qcow2 (4 KiB clusters) holding random data, and that data."""
    raw = tmp_path / f"{name}.raw"
    contents = bytearray(os.urandom(DISK))
    raw.write_bytes(contents)
    path = tmp_path / name
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={CLUSTER}", raw, path)
    return path, contents


def reads(offsets: list[int], length: int = CLUSTER) -> list[Request]:
    return [(T_IN, offset, length, 0) for offset in offsets]


def check_clean(path: Path) -> None:
    result = qemu_img("check", path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_reads_and_in_place_writes_of_an_allocated_image_are_done_in_c(tmp_path: Path) -> None:
    path, model = allocated_image(tmp_path)
    rig = Rig(path)
    offsets = [0, 5 * CLUSTER, 3 * CLUSTER + 512, 63 * CLUSTER, 17 * CLUSTER - 1024]
    first = rig.run(reads(offsets[:1]))  # a cold map: Python serves it and the map learns
    assert rig.device.fast_requests == 0
    results = first + rig.run(reads(offsets[1:]))
    assert rig.device.fast_requests == len(offsets) - 1
    assert results == [(0, bytes(model[o : o + CLUSTER])) for o in offsets]
    # In-place writes (COPIED is set: qemu-img wrote every cluster once), some across clusters.
    writes = [(T_OUT, 2 * CLUSTER + 512, 2 * CLUSTER, 0x11), (T_OUT, 40 * CLUSTER, CLUSTER, 0x22),
              (T_OUT, 63 * CLUSTER + 3584, 512, 0x33)]  # fmt: skip
    before = rig.device.fast_requests
    assert [status for status, _ in rig.run(writes)] == [0, 0, 0]
    assert rig.device.fast_requests - before >= 2  # the first may teach the map writable entries
    for _, offset, length, fill in writes:
        model[offset : offset + length] = bytes([fill]) * length
    assert rig.run(reads([2 * CLUSTER], 3 * CLUSTER)) == [(0, bytes(model[2 * CLUSTER : 5 * CLUSTER]))]
    rig.close()
    assert to_raw(path, tmp_path / "out.raw") == bytes(model)
    check_clean(path)


def test_c_and_python_give_the_same_guest_view_and_image(tmp_path: Path) -> None:
    path, _ = allocated_image(tmp_path)
    copy = tmp_path / "copy.qcow2"
    copy.write_bytes(path.read_bytes())
    rounds = [reads([0, CLUSTER * 9 + 512]),
              [(T_OUT, 7 * CLUSTER, 3 * CLUSTER, 0x5A), (T_IN, 6 * CLUSTER, 5 * CLUSTER, 0)],
              [(T_OUT, 7 * CLUSTER + 1536, 1024, 0xA5), (T_IN, 7 * CLUSTER, CLUSTER, 0)]]  # fmt: skip
    c_rig, py_rig = Rig(path, c_path=True), Rig(copy, c_path=False)
    for requests in rounds:
        assert c_rig.run(requests) == py_rig.run(requests)
    assert c_rig.device.fast_requests >= 4 and py_rig.device.fast_requests == 0
    c_rig.close()
    py_rig.close()
    assert qemu_img("compare", "-q", path, copy, check=False).returncode == 0
    check_clean(path)


def test_writes_that_need_metadata_go_to_python(tmp_path: Path) -> None:
    """Unallocated clusters and clusters shared with a snapshot: C declines, Python allocates or
    copies, and the snapshot keeps its data."""
    path = create(tmp_path / "disk.qcow2", DISK, f"cluster_size={CLUSTER}")
    qemu_io(path, f"write -P 0x61 0 {32 * CLUSTER}")  # the first half allocated, the rest not
    rig = Rig(path)
    rig.run(reads([0]))  # learn
    assert rig.run(reads([CLUSTER])) == [(0, b"\x61" * CLUSTER)]
    assert rig.device.fast_requests == 1
    # A write into the unallocated half, and one that crosses from the allocated half into it.
    before = rig.device.fast_requests
    writes = [(T_OUT, 40 * CLUSTER, CLUSTER, 0x62), (T_OUT, 31 * CLUSTER + 2048, CLUSTER, 0x63)]
    assert rig.run(writes) == [(0, b"")] * 2
    assert rig.device.fast_requests == before
    # A snapshot while the map holds the first half writable: every entry loses COPIED.
    rig.image.create_snapshot("before")
    rig.run(reads([2 * CLUSTER]))  # learn again: now read-only entries
    before = rig.device.fast_requests
    assert rig.run([(T_OUT, 2 * CLUSTER, CLUSTER, 0x64)]) == [(0, b"")]
    assert rig.device.fast_requests == before  # copy-on-write is Python's
    assert rig.run(reads([2 * CLUSTER, 31 * CLUSTER], CLUSTER)) == [
        (0, b"\x64" * CLUSTER),
        (0, b"\x61" * 2048 + b"\x63" * 2048),
    ]
    rig.close()
    snapshot = to_raw(path, tmp_path / "snap.raw", snapshot="before")
    assert snapshot[2 * CLUSTER : 3 * CLUSTER] == b"\x61" * CLUSTER
    assert snapshot[40 * CLUSTER : 41 * CLUSTER] == b"\x62" * CLUSTER
    active = to_raw(path, tmp_path / "active.raw")
    assert active[2 * CLUSTER : 3 * CLUSTER] == b"\x64" * CLUSTER
    check_clean(path)


def test_applying_a_snapshot_and_resizing_clear_the_map(tmp_path: Path) -> None:
    path, model = allocated_image(tmp_path)
    rig = Rig(path)
    rig.image.create_snapshot("old")
    rig.run([(T_OUT, 0, 2 * CLUSTER, 0x77)])  # copy-on-write in Python
    rig.run(reads([0]))
    assert rig.run(reads([CLUSTER, 4 * CLUSTER])) == [
        (0, b"\x77" * CLUSTER),
        (0, bytes(model[4 * CLUSTER : 5 * CLUSTER])),
    ]
    fast = rig.device.fast_requests
    assert fast >= 1
    rig.image.apply_snapshot("old")  # the active L1 is replaced: cached offsets are stale
    assert rig.run(reads([CLUSTER])) == [(0, bytes(model[CLUSTER : 2 * CLUSTER]))]
    assert rig.device.fast_requests == fast
    rig.image.delete_snapshot("old")  # COPIED comes back: writes in place again, once learned
    rig.run(reads([0]))
    before = rig.device.fast_requests
    rig.run([(T_OUT, 3 * CLUSTER, CLUSTER, 0x78)])
    assert rig.device.fast_requests == before + 1
    model[3 * CLUSTER : 4 * CLUSTER] = b"\x78" * CLUSTER
    # Shrinking under the device (the guest still sees the old capacity): the tail is no
    # longer the image's, reads there fail in Python and C serves only what is left.
    rig.image.resize(DISK // 2)
    assert rig.run(reads([DISK // 2, 0])) == [(1, b"\xee" * CLUSTER), (0, bytes(model[:CLUSTER]))]
    assert rig.run(reads([DISK // 2 + CLUSTER])) == [(1, b"\xee" * CLUSTER)]
    assert rig.device.fast_requests == before + 2
    rig.close()
    assert to_raw(path, tmp_path / "out.raw") == bytes(model[: DISK // 2])
    check_clean(path)


def test_compressed_zero_and_backing_clusters_are_read_by_python(tmp_path: Path) -> None:
    base_raw = tmp_path / "base.raw"
    base = b"".join(os.urandom(64) * (CLUSTER // 64) for _ in range(DISK // CLUSTER))  # compressible
    base_raw.write_bytes(base)
    compressed = tmp_path / "compressed.qcow2"
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={CLUSTER}", base_raw, compressed)
    rig = Rig(compressed)
    offsets = [0, CLUSTER, 10 * CLUSTER + 512]
    assert rig.run(reads(offsets)) == [(0, base[o : o + CLUSTER]) for o in offsets]
    assert rig.run(reads(offsets)) == [(0, base[o : o + CLUSTER]) for o in offsets]
    assert rig.device.fast_requests == 0  # every cluster is compressed
    rig.close()

    overlay = create(tmp_path / "overlay.qcow2", DISK, f"cluster_size={CLUSTER}", backing=base_raw, backing_fmt="raw")
    qemu_io(overlay, f"write -P 0x71 0 {4 * CLUSTER}", f"write -z {CLUSTER} {CLUSTER}")  # data, then a zero cluster
    rig = Rig(overlay)
    rig.run(reads([0]))
    results = rig.run(reads([2 * CLUSTER, CLUSTER, 8 * CLUSTER, 3 * CLUSTER + 2048]))
    assert results == [(0, b"\x71" * CLUSTER), (0, bytes(CLUSTER)), (0, base[8 * CLUSTER : 9 * CLUSTER]),
                       (0, b"\x71" * 2048 + base[4 * CLUSTER : 4 * CLUSTER + 2048])]  # fmt: skip
    assert rig.device.fast_requests == 1  # only the plain cluster; zero, backing and the crossing one are Python's
    rig.close()


def test_discard_and_write_zeroes_invalidate_the_map(tmp_path: Path) -> None:
    path, model = allocated_image(tmp_path)
    rig = Rig(path)
    rig.run(reads([0]))
    offsets = [4 * CLUSTER, 8 * CLUSTER]
    assert rig.run(reads(offsets)) == [(0, bytes(model[o : o + CLUSTER])) for o in offsets]
    fast = rig.device.fast_requests
    zeroing = [(T_DISCARD, 4 * CLUSTER, CLUSTER, 0), (T_WRITE_ZEROES, 8 * CLUSTER, 2 * CLUSTER, 0)]
    assert rig.run(zeroing) == [(0, b"")] * 2
    assert rig.device.fast_requests == fast
    assert rig.run(reads([4 * CLUSTER, 8 * CLUSTER, 9 * CLUSTER])) == [(0, bytes(CLUSTER))] * 3
    # Writes after the zeroing allocate again (Python) and read back (C, once learned).
    rig.run([(T_OUT, 4 * CLUSTER, CLUSTER, 0x44)])
    rig.run(reads([5 * CLUSTER]))
    before = rig.device.fast_requests
    assert rig.run(reads([4 * CLUSTER])) == [(0, b"\x44" * CLUSTER)]
    assert rig.device.fast_requests == before + 1
    rig.close()
    model[4 * CLUSTER : 5 * CLUSTER] = b"\x44" * CLUSTER
    model[8 * CLUSTER : 10 * CLUSTER] = bytes(2 * CLUSTER)
    assert to_raw(path, tmp_path / "out.raw") == bytes(model)
    check_clean(path)


def test_hostile_ranges_are_declined(tmp_path: Path) -> None:
    """Past the capacity, into an unmapped cluster, past the image's file: Python answers."""
    path = create(tmp_path / "disk.qcow2", DISK, f"cluster_size={CLUSTER}")
    qemu_io(path, f"write -P 0x55 0 {8 * CLUSTER}")
    rig = Rig(path)
    rig.run(reads([0]))
    results = rig.run([(T_IN, DISK - 512, 1024, 0), (T_IN, DISK, 512, 0), (T_IN, 7 * CLUSTER + 512, CLUSTER, 0),
                       (T_IN, CLUSTER, CLUSTER, 0), (T_OUT, 7 * CLUSTER, 2 * CLUSTER, 0x66)])  # fmt: skip
    assert [status for status, _ in results] == [1, 1, 0, 0, 0]  # VIRTIO_BLK_S_IOERR past the end
    assert results[2][1] == b"\x55" * (CLUSTER - 512) + bytes(512)
    assert results[3][1] == b"\x55" * CLUSTER
    assert rig.device.fast_requests == 1  # only the plain read; the write half into cluster 8 allocates
    assert rig.run(reads([7 * CLUSTER], 2 * CLUSTER)) == [(0, b"\x66" * 2 * CLUSTER)]
    # The image file shrinks under the map (another process, not the guest): a short preadv in C
    # declines, Python reads zeros past the end of the file.
    rig.run(reads([0]))
    assert rig.run(reads([8 * CLUSTER])) == [(0, b"\x66" * CLUSTER)]
    before = rig.device.fast_requests
    os.truncate(path, os.path.getsize(path) - CLUSTER)  # cluster 8, allocated last, is gone
    assert rig.run(reads([8 * CLUSTER, 0])) == [(0, bytes(CLUSTER)), (0, b"\x55" * CLUSTER)]
    assert rig.device.fast_requests == before + 1
    rig.image.close()  # closing the image stops C at once (the fd is gone)
    before = rig.device.fast_requests
    assert rig.run(reads([0])) == [(1, b"\xee" * CLUSTER)]
    assert rig.device.fast_requests == before
    rig.close()


def test_read_only_images_take_only_reads(tmp_path: Path) -> None:
    path, model = allocated_image(tmp_path)
    rig = Rig(path, read_only=True)
    rig.run(reads([0]))
    assert rig.run(reads([CLUSTER])) == [(0, bytes(model[CLUSTER : 2 * CLUSTER]))]
    before = rig.device.fast_requests
    assert rig.run([(T_OUT, 0, CLUSTER, 0x11)]) == [(1, b"")]
    assert rig.device.fast_requests == before
    rig.close()
    assert to_raw(path, tmp_path / "out.raw") == bytes(model)


# A random mix of requests (and a snapshot now and then) against a raw model of the disk.
OPS = st.tuples(
    st.sampled_from([T_IN, T_IN, T_IN, T_OUT, T_OUT, T_DISCARD, T_WRITE_ZEROES]),
    st.integers(0, DISK // 512 - 1),
    st.integers(1, 24),
    st.integers(1, 255),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rounds=st.lists(st.lists(OPS, min_size=1, max_size=4), min_size=1, max_size=8),
       snapshot_after=st.integers(0, 10), half_allocated=st.booleans())  # fmt: skip
def test_random_requests_match_a_raw_model(
    tmp_path_factory: pytest.TempPathFactory,
    rounds: list[list[tuple[int, int, int, int]]],
    snapshot_after: int,
    half_allocated: bool,
) -> None:
    folder = tmp_path_factory.mktemp("mix")
    path, model = allocated_image(folder)
    if half_allocated:
        qemu_io(path, f"discard {DISK // 2} {DISK // 4}")
        model[DISK // 2 : 3 * DISK // 4] = bytes(DISK // 4)
    rig = Rig(path)
    for number, ops in enumerate(rounds):
        if number == snapshot_after:
            rig.image.create_snapshot(f"s{number}")
        requests = []
        for kind, sector, sectors, fill in ops:
            sectors = min(sectors, DISK // 512 - sector)
            offset, length = sector * 512, sectors * 512
            requests.append((kind, offset, length, fill))
        results = rig.run(requests)
        for (kind, offset, length, fill), (status, data) in zip(requests, results, strict=True):
            assert status == 0
            if kind == T_IN:
                assert data == bytes(model[offset : offset + length])
            elif kind == T_OUT:
                model[offset : offset + length] = bytes([fill]) * length
            else:
                model[offset : offset + length] = bytes(length)
    event(f"C completed {'some' if rig.device.fast_requests else 'none'}")
    rig.close()
    assert to_raw(path, folder / "out.raw") == bytes(model)
    check_clean(path)
    for file in folder.iterdir():
        file.unlink()
    folder.rmdir()
