#!/usr/bin/env python3
"""pyhv's qcow2 engine against QEMU (qemu-io / qemu-img) on the same files, in one run.

Workloads (issue 5): sequential read of the whole image in 1 MiB requests, 4 KiB random reads
over a fully allocated image, sequential allocating writes of 1 MiB into an empty image, and
convert qcow2 -> raw. Both sides go through the host page cache (qemu-io/qemu-img `-t writeback`,
pyhv's buffered preadv/pwritev), and every write workload ends with a flush (fdatasync) on both
sides. Caches cannot be dropped without root, so the input file is read once beforehand to warm it
equally for both; each workload alternates QEMU and pyhv runs on the same warmed file (`--repeat`, default 3) and
keeps each side's best time, because this host's page cache and disk are noisy.

QEMU times are wall-clock times of the qemu-io/qemu-img process minus the time of the same
process doing nothing (open + close), so neither side pays for process start. pyhv runs in this
process. The last line of output is one JSON object with the ratios pyhv/QEMU (higher is better
for pyhv; targets: seq read >= 1.0, random read >= 0.5, allocating write >= 0.7, convert >= 0.8 for
both the copy and the durable rate).

The convert comparison matches durability: qemu-img's default (`unsafe`, no sync) against
`pyhv image convert -t unsafe`, and `-t writeback` against pyhv's default (see
convert_comparison); both ratios are reported as best and median.

Usage: python3 benchmarks/qcow2_io.py [--size 1G] [--dir /tmp] [--random-reads 20000] [--only-convert]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hypervisor.block.qcow2 import Qcow2Image  # noqa: E402
from hypervisor.block.tools.copying import convert  # noqa: E402
from hypervisor.units import parse_size  # noqa: E402

MIB = 1 << 20
REQUEST = 1 * MIB  # sequential request size (issue 5)
RANDOM_REQUEST = 4096  # random read size (issue 5)
CACHE_MODE = "writeback"  # qemu-io/qemu-img -t: through the page cache, like pyhv's buffered I/O
CACHE_DESCRIPTION = "page cache on both sides (qemu -t writeback, pyhv buffered preadv/pwritev)"


def run_quiet(args: list[str], stdin: str | None = None) -> float:
    """Wall-clock seconds of a command that must succeed."""
    start = time.perf_counter()
    result = subprocess.run(args, input=stdin, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode != 0 or "error" in result.stdout.lower() or "failed" in result.stdout.lower():
        raise SystemExit(f"{' '.join(args[:3])} failed: {result.stdout[-500:]}{result.stderr[-500:]}")
    return elapsed


def qemu_io(path: str, commands: list[str], image_format: str = "qcow2") -> float:
    """Run qemu-io commands read from stdin; returns seconds net of an empty session."""
    base = ["qemu-io", "-f", image_format, "-t", CACHE_MODE, path]
    total = run_quiet(base, "\n".join(commands + ["quit"]) + "\n")
    idle = min(run_quiet(base, "quit\n") for _ in range(3))
    return max(total - idle, 1e-6)


def qemu_img_bench(path: str, size: int) -> float:
    """Seconds qemu-img bench reports for sequential 1 MiB reads over the image, queue depth 1."""
    result = subprocess.run(
        [
            "qemu-img",
            "bench",
            "-f",
            "qcow2",
            "-t",
            CACHE_MODE,
            "-c",
            str(size // REQUEST),
            "-s",
            str(REQUEST),
            "-S",
            str(REQUEST),
            "-d",
            "1",
            path,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Run completed in ([0-9.]+) seconds", result.stdout)
    if result.returncode != 0 or match is None:
        raise SystemExit(f"qemu-img bench failed: {result.stdout}{result.stderr}")
    return max(float(match.group(1)), 1e-6)


def warm(path: str) -> None:
    """Read a file once so both sides start with it in the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(16 * MIB):
            pass


def timed(function: Callable[[], None]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def pyhv_seq_read(path: str, size: int) -> None:
    image = Qcow2Image.open(path, read_only=True, allow_backing=False)
    buffer = memoryview(bytearray(REQUEST))
    try:
        for offset in range(0, size, REQUEST):
            image.readinto(offset, [buffer[: min(REQUEST, size - offset)]])
    finally:
        image.close()


def pyhv_random_read(path: str, offsets: list[int]) -> None:
    image = Qcow2Image.open(path, read_only=True, allow_backing=False)
    buffer = memoryview(bytearray(RANDOM_REQUEST))
    try:
        for offset in offsets:
            image.readinto(offset, [buffer])
    finally:
        image.close()


def pyhv_alloc_write(path: str, size: int) -> None:
    image = Qcow2Image.open(path, read_only=False, allow_backing=False)
    buffer = bytes([0x5A]) * REQUEST
    try:
        for offset in range(0, size, REQUEST):
            image.write(offset, [memoryview(buffer)[: min(REQUEST, size - offset)]])
        image.flush()
    finally:
        image.close()


def report(name: str, size_bytes: int, pyhv_seconds: float, qemu_seconds: float) -> float:
    pyhv_rate = size_bytes / pyhv_seconds / MIB
    qemu_rate = size_bytes / qemu_seconds / MIB
    ratio = pyhv_rate / qemu_rate
    print(f"{name:<34} pyhv {pyhv_rate:9.1f} MiB/s   QEMU {qemu_rate:9.1f} MiB/s   pyhv/QEMU {ratio:5.2f}")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="image size (default 1G; e.g. 64M for a quick run)")
    parser.add_argument("--dir", default=None, help="folder for the scratch images (default: a temp dir)")
    parser.add_argument("--random-reads", type=int, default=20000, help="number of 4 KiB random reads")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random offsets")
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs per workload (best counts)")
    parser.add_argument("--only-convert", action="store_true", help="run the convert comparison alone")
    args = parser.parse_args()
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (install qemu-utils)")
    size = parse_size(args.size)
    if size < REQUEST or size % REQUEST:
        raise SystemExit("--size must be a positive multiple of 1 MiB")
    workdir = tempfile.mkdtemp(prefix="pyhv-bench-", dir=args.dir)
    try:
        results = run_all(workdir, size, args.random_reads, args.seed, max(1, args.repeat), args.only_convert)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(results))


def best_of(repeat: int, qemu_run: Callable[[], float], pyhv_run: Callable[[], float]) -> tuple[float, float]:
    """Alternate the two sides `repeat` times and keep each side's best time: this host's page
    cache and disk are noisy (a run that must reclaim memory can take several times longer)."""
    qemu_times, pyhv_times = [], []
    for _ in range(repeat):
        qemu_times.append(qemu_run())
        pyhv_times.append(pyhv_run())
    return min(pyhv_times), min(qemu_times)


TARGETS = {
    "seq_read_ratio": 1.0,
    "rand_read_ratio": 0.5,
    "alloc_write_ratio": 0.7,
    "convert_copy_ratio": 0.8,
    "convert_durable_ratio": 0.8,
}


def convert_comparison(full: str, workdir: str, size: int, repeat: int) -> dict[str, object]:
    """convert qcow2 -> raw, like with like (issue 12): qemu-img's default cache mode for convert
    is `unsafe` (no fdatasync at all, checked with strace on qemu-img 7.2), so its plain
    `convert` is compared with `pyhv image convert -t unsafe` (the copy rate), and `-t writeback`
    (one fdatasync at the end) with pyhv's default, which syncs the image and its folder before
    the rename (the durable rate). The four runs alternate in each round; best and median kept.
    Each run starts with `sync`, so write-back of an earlier run's pages lands on neither side."""
    qemu_raw, pyhv_raw = os.path.join(workdir, "q.raw"), os.path.join(workdir, "p.raw")
    idle = min(run_quiet(["qemu-img", "info", full]) for _ in range(3))

    def qemu_convert(cache_args: list[str]) -> Callable[[], float]:
        def run() -> float:
            if os.path.exists(qemu_raw):
                os.unlink(qemu_raw)
            os.sync()
            command = ["qemu-img", "convert", *cache_args, "-T", CACHE_MODE, "-O", "raw", full, qemu_raw]
            return max(run_quiet(command) - idle, 1e-6)

        return run

    def pyhv_convert(cache: str) -> Callable[[], float]:
        def run() -> float:
            if os.path.exists(pyhv_raw):
                os.unlink(pyhv_raw)
            os.sync()
            return timed(lambda: convert(full, pyhv_raw, "qcow2", "raw", False, {}, cache=cache))

        return run

    sides = {
        "copy": (qemu_convert([]), pyhv_convert("unsafe")),
        "durable": (qemu_convert(["-t", "writeback"]), pyhv_convert("writeback")),
    }
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in sides}
    for round_index in range(repeat):
        for name, (qemu_run, pyhv_run) in sides.items():
            # Who goes first alternates by round: a run can leave the disk busy for the next.
            if round_index % 2:
                times[name][1].append(pyhv_run())
                times[name][0].append(qemu_run())
            else:
                times[name][0].append(qemu_run())
                times[name][1].append(pyhv_run())
            run_quiet(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", qemu_raw, pyhv_raw])
    results: dict[str, object] = {}
    for name, (qemu_times, pyhv_times) in times.items():
        label = f"convert -> raw, {name}"
        results[f"convert_{name}_ratio"] = report(label + " (best)", size, min(pyhv_times), min(qemu_times))
        results[f"convert_{name}_ratio_median"] = report(
            label + " (median)", size, statistics.median(pyhv_times), statistics.median(qemu_times)
        )
    for path in (qemu_raw, pyhv_raw):
        os.unlink(path)
    return results


def run_all(
    workdir: str, size: int, random_reads: int, seed: int, repeat: int, only_convert: bool = False
) -> dict[str, object]:
    full = os.path.join(workdir, "full.qcow2")
    print(f"# size {size // MIB} MiB, {CACHE_DESCRIPTION}; best of {repeat} alternating runs", flush=True)
    run_quiet(["qemu-img", "create", "-q", "-f", "qcow2", full, str(size)])
    # Fully allocate with non-zero data so no side can skip zero clusters.
    qemu_io(full, [f"write -q -P 0xa5 {offset} {REQUEST}" for offset in range(0, size, REQUEST)])
    os.sync()
    warm(full)
    ratios: dict[str, object] = {"size": size, "cache": CACHE_DESCRIPTION, "repeat": repeat}
    if only_convert:
        ratios.update(convert_comparison(full, workdir, size, repeat))
        return {key: round(value, 3) if isinstance(value, float) else value for key, value in ratios.items()}

    seq_reads = [f"read -q {offset} {REQUEST}" for offset in range(0, size, REQUEST)]
    pyhv_time, qemu_time = best_of(
        repeat, lambda: qemu_io(full, seq_reads), lambda: timed(lambda: pyhv_seq_read(full, size))
    )
    ratios["seq_read_ratio"] = report("sequential read 1 MiB", size, pyhv_time, qemu_time)
    # qemu-io pays per command (parsing, a fresh pattern-filled buffer); qemu-img bench runs the
    # same requests inside one loop, so it shows QEMU's block layer alone. Reported, not targeted.
    bench_time = min(qemu_img_bench(full, size) for _ in range(repeat))
    ratios["seq_read_ratio_vs_qemu_img_bench"] = report("  same, QEMU via qemu-img bench", size, pyhv_time, bench_time)

    rng = random.Random(seed)
    offsets = [rng.randrange(size // RANDOM_REQUEST) * RANDOM_REQUEST for _ in range(random_reads)]
    random_commands = [f"read -q {offset} {RANDOM_REQUEST}" for offset in offsets]
    pyhv_time, qemu_time = best_of(
        repeat, lambda: qemu_io(full, random_commands), lambda: timed(lambda: pyhv_random_read(full, offsets))
    )
    ratios["rand_read_ratio"] = report("random read 4 KiB", random_reads * RANDOM_REQUEST, pyhv_time, qemu_time)

    writes = [f"write -q -P 0x5a {offset} {REQUEST}" for offset in range(0, size, REQUEST)] + ["flush"]
    qemu_target, pyhv_target = os.path.join(workdir, "wq.qcow2"), os.path.join(workdir, "wp.qcow2")

    def fresh(target: str) -> str:
        if os.path.exists(target):
            os.unlink(target)
        run_quiet(["qemu-img", "create", "-q", "-f", "qcow2", target, str(size)])
        return target

    pyhv_time, qemu_time = best_of(
        repeat,
        lambda: qemu_io(fresh(qemu_target), writes),
        lambda: timed(lambda: pyhv_alloc_write(fresh(pyhv_target), size)),
    )
    ratios["alloc_write_ratio"] = report("allocating write 1 MiB", size, pyhv_time, qemu_time)
    run_quiet(["qemu-img", "check", "-q", pyhv_target])
    run_quiet(["qemu-img", "compare", "-q", qemu_target, pyhv_target])
    os.unlink(qemu_target)
    os.unlink(pyhv_target)

    ratios.update(convert_comparison(full, workdir, size, repeat))
    targets = {key: target for key, target in TARGETS.items() if key in ratios}
    missed = [key for key, target in targets.items() if float(ratios[key]) < target]  # type: ignore[arg-type]
    print("# targets met" if not missed else f"# below target: {', '.join(missed)}")
    return {key: round(value, 3) if isinstance(value, float) else value for key, value in ratios.items()}


if __name__ == "__main__":
    main()
