"""virtio-blk throughput: guest-driven reads through pyhv vs the host's own preadv of the file.

The test guest tests/guests/virtio_blk.c (its loop at CPL3, so on kvm_pvm hosts the guest side
runs natively) reads a raw image through virtio-mmio: `--count` sequential 1 MiB reads, then
random 4 KiB reads, `--depth` requests in flight. Each figure is the difference between a run
of `--count` reads and one of a tenth of that, so starting the guest and setting up the device
are not counted; both with virtio-blk's C path (csrc/virtio_blk.c, the default on a raw file and
on a qcow2 image's plainly mapped clusters) and with the Python path alone, on the raw file and
on the same data as a fully allocated qcow2 image. In the same run and interleaved with it, the
host reads the same file with os.preadv in the same sizes into one buffer, as many reads as the
difference.
Targets (issue 12): random 4 KiB >= 0.25 and sequential >= 0.7 of the host's preadv.
Usage: python benchmarks/virtio_blk.py [--count N] [--rounds R]
[--depth D] [--disk-mib M]. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

from _common import emit, median

from hypervisor.block.tools.copying import convert
from hypervisor.console import NullConsole
from hypervisor.disk_spec import DiskSpec
from hypervisor.machine import Machine
from hypervisor.virtio.blk import VirtioBlock
from tests.guests.build import GUEST_BASE, guest_image

MiB = 1024 * 1024
GUEST_MEMORY_MIB = 16  # the guest's buffers: 1 MiB per request in flight from 1 MiB up
MODE_SEQUENTIAL, MODE_RANDOM = 1, 2
SEQUENTIAL_SIZE, RANDOM_SIZE = MiB, 4096
MAX_DEPTH = 5  # MAX_DEPTH of the guest: 3 descriptors per request in a 16-entry queue


def guest_run_seconds(image_path: str, guest: bytes, image_format: str = "raw") -> float:
    """Wall-clock seconds of one run of the guest on the disk attached as `--disk` does."""
    with Machine(GUEST_MEMORY_MIB, console=NullConsole()) as machine:
        machine.attach_disks([DiskSpec(image_path, image_format, read_only=True)])
        machine.load_raw_bytes(guest, GUEST_BASE)
        start = time.perf_counter()
        result = machine.run(timeout=300)
        elapsed = time.perf_counter() - start
    if result.exit_status != 0:
        raise SystemExit(f"guest run failed: {result.outcome}")
    return elapsed


def guest_round(
    image_path: str, long_guest: bytes, short_guest: bytes, c_path: bool, image_format: str = "raw"
) -> float:
    """Seconds the device took for the requests the long run makes beyond the short one: the
    difference of the two runs, so starting the vCPU, probing the device and setting up the
    queue (the same in both) are not counted, and nothing is wrapped around the backend (the C
    path takes only a plain raw file or qcow2 image)."""
    VirtioBlock.use_c_path = c_path
    try:
        long_run = guest_run_seconds(image_path, long_guest, image_format)
        return long_run - guest_run_seconds(image_path, short_guest, image_format)
    finally:
        VirtioBlock.use_c_path = True


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
    short = max(1, args.count // 10)
    requests = args.count - short
    try:
        guests = {
            (mode, count): guest_image("virtio_blk", mode=mode, port=depth, count=count)
            for mode in (MODE_SEQUENTIAL, MODE_RANDOM)
            for count in (args.count, short)
        }
    except (OSError, RuntimeError) as error:
        raise SystemExit(f"cannot build the test guest virtio_blk: {error}") from None

    paths = ("c", "py", "qcow2_c", "qcow2_py")
    keys = [f"{name}_{path}" for name in ("seq", "rand") for path in (*paths, "host")]
    times: dict[str, list[float]] = {key: [] for key in keys}
    with tempfile.TemporaryDirectory() as tmp:
        image_path = os.path.join(tmp, "bench.raw")
        with open(image_path, "wb") as image:
            for _ in range(args.disk_mib):
                image.write(os.urandom(MiB))
        disk = args.disk_mib * MiB
        # The same data as a fully allocated qcow2 (random data: every cluster is stored).
        qcow2_path = os.path.join(tmp, "bench.qcow2")
        convert(image_path, qcow2_path, "raw", "qcow2", False, {})
        sequential_offsets = [(i * SEQUENTIAL_SIZE) % disk for i in range(requests)]
        random_offsets = [random.randrange(disk // RANDOM_SIZE) * RANDOM_SIZE for _ in range(requests)]
        host_round(image_path, SEQUENTIAL_SIZE, sequential_offsets)  # warm the page cache
        for _ in range(args.rounds):
            for name, mode, size, offsets in (("seq", MODE_SEQUENTIAL, SEQUENTIAL_SIZE, sequential_offsets),
                                              ("rand", MODE_RANDOM, RANDOM_SIZE, random_offsets)):  # fmt: skip
                times[f"{name}_host"].append(host_round(image_path, size, offsets))
                for path, c_path, disk_path, image_format in (("c", True, image_path, "raw"),
                                                              ("py", False, image_path, "raw"),
                                                              ("qcow2_c", True, qcow2_path, "qcow2"),
                                                              ("qcow2_py", False, qcow2_path, "qcow2")):  # fmt: skip
                    long_guest, short_guest = guests[mode, args.count], guests[mode, short]
                    seconds = guest_round(disk_path, long_guest, short_guest, c_path, image_format)
                    times[f"{name}_{path}"].append(max(seconds, 1e-9))

    rate = {key: requests / median(values) for key, values in times.items()}  # requests per second
    seq = {key: rate[f"seq_{key}"] * SEQUENTIAL_SIZE / MiB for key in (*paths, "host")}  # MB/s
    print(f"{requests} reads per round beyond a run of {short}, {args.rounds} rounds (medians), {depth} in flight, "
          f"page cache warm")  # fmt: skip
    print(f"sequential 1 MiB: C path {seq['c']:9.1f} MB/s  Python path {seq['py']:9.1f} MB/s  "
          f"host preadv {seq['host']:9.1f} MB/s  ratio {seq['c'] / seq['host']:.3f} (target >= 0.7)")  # fmt: skip
    print(f"random 4 KiB:     C path {rate['rand_c']:9.0f} IOPS  Python path {rate['rand_py']:9.0f} IOPS  "
          f"host preadv {rate['rand_host']:9.0f} IOPS  ratio {rate['rand_c'] / rate['rand_host']:.3f} "
          f"(target >= 0.25)")  # fmt: skip
    for label, path in (("C path", "qcow2_c"), ("Python path", "qcow2_py")):
        print(f"qcow2, fully allocated ({label}): sequential {seq[path]:9.1f} MB/s, ratio "
              f"{seq[path] / seq['host']:.3f}; random {rate[f'rand_{path}']:9.0f} IOPS, ratio "
              f"{rate[f'rand_{path}'] / rate['rand_host']:.3f}")  # fmt: skip
    figures: dict[str, object] = {
        "host_seq_read_mb_s": round(seq["host"], 1),
        "host_rand_read_iops": round(rate["rand_host"]),
        "depth": depth,
        "count": args.count,
        "rounds": args.rounds,
    }
    # The same figures for each format: "" and "qcow2_" prefixes, the Python path's with "_python".
    for prefix, c_key, python_key in (("", "c", "py"), ("qcow2_", "qcow2_c", "qcow2_py")):
        for suffix, key in (("", c_key), ("_python", python_key)):
            figures[f"{prefix}seq_read_mb_s{suffix}"] = round(seq[key], 1)
            figures[f"{prefix}seq_read_ratio{suffix}"] = round(seq[key] / seq["host"], 3)
            figures[f"{prefix}rand_read_iops{suffix}"] = round(rate[f"rand_{key}"])
            figures[f"{prefix}rand_read_ratio{suffix}"] = round(rate[f"rand_{key}"] / rate["rand_host"], 4)
        figures[f"c_over_python_{prefix}rand"] = round(rate[f"rand_{c_key}"] / rate[f"rand_{python_key}"], 2)
    emit(figures)


if __name__ == "__main__":
    main()
