"""virtio-blk throughput: guest-driven reads through pyhv vs the host's own preadv of the file.

The test guest tests/guests/virtio_blk.c (its loop at CPL3, so on kvm_pvm hosts the guest side
runs natively) reads a raw image through virtio-mmio: `--count` sequential 1 MiB reads, then
random 4 KiB reads, `--depth` requests in flight. The device side is timed from the start of
the first backend read to the end of the last one (a timing shim around the backend), so guest
boot and device setup are not counted. In the same run and interleaved with it, the host reads
the same file with os.preadv in the same sizes into one buffer. Target (issue 4): sequential
>= 0.5 of the host's preadv. Usage: python benchmarks/virtio_blk.py [--count N] [--rounds R]
[--depth D] [--disk-mib M]. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from collections.abc import Sequence

from _common import emit, median

from hypervisor.block.backend import BlockBackend
from hypervisor.console import NullConsole
from hypervisor.disk_spec import DiskSpec
from hypervisor.machine import Machine
from tests.guests.build import GUEST_BASE, guest_image

MiB = 1024 * 1024
GUEST_MEMORY_MIB = 16  # the guest's buffers: 1 MiB per request in flight from 1 MiB up
MODE_SEQUENTIAL, MODE_RANDOM = 1, 2
SEQUENTIAL_SIZE, RANDOM_SIZE = MiB, 4096
MAX_DEPTH = 5  # MAX_DEPTH of the guest: 3 descriptors per request in a 16-entry queue


class TimedBackend:
    """A BlockBackend shim that notes when the first read started and the last one ended."""

    def __init__(self, backend: BlockBackend) -> None:
        self.backend = backend
        self.first = self.last = 0.0
        self.reads = 0

    @property
    def size(self) -> int:
        return self.backend.size

    @property
    def read_only(self) -> bool:
        return self.backend.read_only

    def readinto(self, offset: int, buffers: Sequence[memoryview]) -> None:
        if not self.reads:
            self.first = time.perf_counter()
        self.backend.readinto(offset, buffers)
        self.reads += 1
        self.last = time.perf_counter()

    def write(self, offset: int, buffers: Sequence[memoryview | bytes]) -> None:
        self.backend.write(offset, buffers)

    def flush(self) -> None:
        self.backend.flush()

    def discard(self, offset: int, length: int) -> None:
        self.backend.discard(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.backend.write_zeroes(offset, length)

    def close(self) -> None:
        self.backend.close()


def guest_round(image_path: str, guest: bytes, count: int) -> float:
    """Seconds the device spent serving `count` guest reads, first start to last end."""
    with Machine(GUEST_MEMORY_MIB, console=NullConsole()) as machine:
        shims: list[TimedBackend] = []

        def timed(inner: BlockBackend) -> BlockBackend:
            shims.append(TimedBackend(inner))
            return shims[-1]

        machine.attach_disks([DiskSpec(image_path, "raw", read_only=True)], wrap_backend=timed)  # as --disk does
        backend = shims[0]
        machine.load_raw_bytes(guest, GUEST_BASE)
        result = machine.run(timeout=300)
    if result.exit_status != 0 or backend.reads != count:
        raise SystemExit(f"guest run failed: {result.outcome} after {backend.reads} of {count} reads")
    return backend.last - backend.first


def host_round(image_path: str, size: int, offsets: list[int]) -> float:
    """Seconds for the host's own preadv of the same file, same sizes, one buffer."""
    buffer = memoryview(bytearray(size))
    fd = os.open(image_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        start = time.perf_counter()
        for offset in offsets:
            os.preadv(fd, [buffer], offset)
        return time.perf_counter() - start
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="reads per round and pattern")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--depth", type=int, default=4, help=f"requests in flight (1-{MAX_DEPTH})")
    parser.add_argument("--disk-mib", type=int, default=64)
    args = parser.parse_args()
    depth = max(1, min(args.depth, MAX_DEPTH))
    try:
        sequential_guest = guest_image("virtio_blk", mode=MODE_SEQUENTIAL, port=depth, count=args.count)
        random_guest = guest_image("virtio_blk", mode=MODE_RANDOM, port=depth, count=args.count)
    except (OSError, RuntimeError) as error:
        raise SystemExit(f"cannot build the test guest virtio_blk: {error}") from None

    with tempfile.TemporaryDirectory() as tmp:
        image_path = os.path.join(tmp, "bench.raw")
        with open(image_path, "wb") as image:
            for _ in range(args.disk_mib):
                image.write(os.urandom(MiB))
        disk = args.disk_mib * MiB
        sequential_offsets = [(i * SEQUENTIAL_SIZE) % disk for i in range(args.count)]
        random_offsets = [random.randrange(disk // RANDOM_SIZE) * RANDOM_SIZE for _ in range(args.count)]
        host_round(image_path, SEQUENTIAL_SIZE, sequential_offsets)  # warm the page cache
        seq_guest, seq_host, rand_guest, rand_host = [], [], [], []
        for _ in range(args.rounds):
            seq_host.append(host_round(image_path, SEQUENTIAL_SIZE, sequential_offsets))
            seq_guest.append(guest_round(image_path, sequential_guest, args.count))
            rand_host.append(host_round(image_path, RANDOM_SIZE, random_offsets))
            rand_guest.append(guest_round(image_path, random_guest, args.count))

    seq_mb_s = args.count * SEQUENTIAL_SIZE / MiB / median(seq_guest)
    host_seq_mb_s = args.count * SEQUENTIAL_SIZE / MiB / median(seq_host)
    rand_iops = args.count / median(rand_guest)
    host_rand_iops = args.count / median(rand_host)
    print(f"{args.count} reads per round, {args.rounds} rounds (medians), {depth} in flight, page cache warm")
    print(f"sequential 1 MiB: guest {seq_mb_s:9.1f} MB/s   host preadv {host_seq_mb_s:9.1f} MB/s   "
          f"ratio {seq_mb_s / host_seq_mb_s:.3f} (target >= 0.5)")  # fmt: skip
    print(f"random 4 KiB:     guest {rand_iops:9.0f} IOPS   host preadv {host_rand_iops:9.0f} IOPS   "
          f"ratio {rand_iops / host_rand_iops:.3f}")  # fmt: skip
    emit({
        "seq_read_mb_s": round(seq_mb_s, 1),
        "host_seq_read_mb_s": round(host_seq_mb_s, 1),
        "seq_read_ratio": round(seq_mb_s / host_seq_mb_s, 3),
        "rand_read_iops": round(rand_iops),
        "host_rand_read_iops": round(host_rand_iops),
        "rand_read_ratio": round(rand_iops / host_rand_iops, 4),
        "depth": depth,
        "count": args.count,
        "rounds": args.rounds,
    })  # fmt: skip


if __name__ == "__main__":
    main()
