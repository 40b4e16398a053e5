"""Fuzzing the qcow2 header parser, the readers and the checker with mutated small images.

Seeds are small valid images made by qemu-img (plain, compressed, zero clusters, 512-byte clusters
with 1-bit refcounts, extended L2, version 2 with a snapshot, persistent bitmap). Hypothesis flips
bits, overwrites bytes and 64-bit words (mostly inside the metadata: header, L1, refcount table and
blocks, L2 tables, snapshot table) and truncates or extends the file.

The invariant: every reader and the checker end with a result or a one-line ImageError; never
another exception, never a hang, never unbounded memory. Each example runs in a forked child with
an address-space limit and an alarm, so a hang or a runaway allocation fails the example instead
of the test run.
"""

from __future__ import annotations

import os
import resource
import signal
import struct
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from hypervisor.block.qcow2 import Qcow2Image
from hypervisor.block.qcow2.check import check_image
from hypervisor.block.qcow2.header import parse_header
from hypervisor.errors import ImageError
from tests.block.qcow2_oracle import HAVE_QEMU, create, needs_qemu, qemu_img, qemu_io

# Bounds of one example: generous for a busy two-core host; a typical example takes ~50 ms.
EXAMPLE_SECONDS = 20
EXAMPLE_EXTRA_ADDRESS_SPACE = 768 << 20
# Examples per run: the module stays near a minute on a busy two-core host; PYHV_FUZZ_EXAMPLES
# raises it for a deeper local run.
IMAGE_EXAMPLES = int(os.environ.get("PYHV_FUZZ_EXAMPLES", "150"))
HEADER_EXAMPLES = 3 * IMAGE_EXAMPLES
# The whole test's bound (pytest-timeout); each example has its own alarm besides.
TEST_TIMEOUT = max(240, IMAGE_EXAMPLES)
READ_LIMIT = 1 << 20  # bytes read from each end of the disk
MAP_LIMIT = 64 << 30  # map_extents only for disks up to this size (the walk is per L2 table)
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
HUGE_TAIL = 1 << 40  # a file length with a 1 TiB hole: costs no disk space

SEEDS = {
    "plain": ("8M", "", ("write -P 1 0 200k", "write -z 1M 64k", "write -c -P 2 2M 64k")),
    "small_clusters": ("2M", "cluster_size=512,refcount_bits=1", ("write -P 3 0 20k", "write -c -P 4 1M 4k")),
    "extended_l2": ("4M", "extended_l2=on,cluster_size=16k", ("write -P 5 0 5k", "write -z 64k 4k")),
    "v2_snapshot": ("4M", "compat=0.10", ("write -P 6 0 100k",)),
    "bitmap": ("4M", "", ("write -P 7 0 64k",)),
}


def be64(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 8], "big") if offset + 8 <= len(data) else 0


def metadata_offsets(data: bytes) -> list[int]:
    """Byte offsets worth hitting: header fields, and the first words of every metadata table."""
    cluster_size = 1 << int.from_bytes(data[20:24], "big")
    l1, reftable, snapshots = be64(data, 40), be64(data, 48), be64(data, 64)
    offsets = list(range(0, 112, 4))
    tables = [l1, reftable, snapshots, be64(data, reftable)]
    l2 = be64(data, l1) & OFFSET_MASK
    if l2:
        tables.append(l2)
    if snapshots:
        tables.append(be64(data, snapshots))  # the snapshot's L1 table
    for table in tables:
        if 0 < table < len(data):
            offsets += [table + 8 * index for index in range(min(16, cluster_size // 8))]
    return [offset for offset in offsets if offset < len(data)]


_SEEDS: dict[str, tuple[bytes, list[int]]] = {}


@pytest.fixture(scope="module", autouse=True)
def seed_images(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Builds the seeds once (a module global, so Hypothesis never prints megabytes of them)."""
    if not HAVE_QEMU:
        pytest.skip("qemu-img/qemu-io (Debian qemu-utils) not installed: no seed images")
    folder = tmp_path_factory.mktemp("seeds")
    out = _SEEDS
    for name, (size, options, commands) in SEEDS.items():
        path = create(folder / f"{name}.qcow2", size, *(options.split(",") if options else ()))
        if name == "bitmap":
            qemu_img("bitmap", "--add", path, "b0")
        qemu_io(path, *commands)
        if name == "v2_snapshot":
            qemu_img("snapshot", "-c", "s1", path)
            qemu_io(path, "write -P 8 0 64k")
        data = path.read_bytes()
        out[name] = (data, metadata_offsets(data))


# -- mutations ----------------------------------------------------------------------------------

INTERESTING_WORDS = [0, 1, 0x200, 1 << 63, 1 << 62, (1 << 64) - 1, 1 << 55, 0x7FFF_FFFF, 1 << 40, 0x10000]

mutation = st.one_of(
    st.tuples(st.just("bit"), st.integers(0, 1 << 30), st.integers(0, 63)),
    st.tuples(st.just("byte"), st.integers(0, 1 << 30), st.integers(0, 255)),
    st.tuples(st.just("word"), st.integers(0, 1 << 30), st.sampled_from(INTERESTING_WORDS)),
    st.tuples(st.just("word"), st.integers(0, 1 << 30), st.integers(0, (1 << 64) - 1)),
)


def apply_mutations(data: bytes, targets: list[int], mutations: list[tuple[str, int, int]], on_metadata: bool) -> bytes:
    image = bytearray(data)
    for kind, where, value in mutations:
        offset = targets[where % len(targets)] if on_metadata else where % len(image)
        if kind == "bit":
            word = be64(bytes(image), offset & ~7)
            struct.pack_into(">Q", image, offset & ~7, word ^ (1 << value))
        elif kind == "byte":
            image[offset] = value
        else:
            offset &= ~7
            if offset + 8 <= len(image):
                struct.pack_into(">Q", image, offset, value)
    return bytes(image)


# -- the bounded run ----------------------------------------------------------------------------


def run_bounded(work: Callable[[], str]) -> str:
    """Run `work` in a forked child under an address-space limit and an alarm; its outcome.

    Outcomes: what `work` returned, "CRASH <traceback>" for any exception it let out, "HANG" if
    the alarm fired, "KILLED <signal>" otherwise.
    """
    pages = int(Path("/proc/self/statm").read_text().split()[0])
    limit = pages * os.sysconf("SC_PAGE_SIZE") + EXAMPLE_EXTRA_ADDRESS_SPACE
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 0
        try:
            os.close(read_end)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(EXAMPLE_SECONDS)
            try:
                outcome = work()
            except BaseException:
                outcome = "CRASH " + traceback.format_exc()
            os.write(write_end, outcome.encode("utf-8", "replace")[:60000])
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "HANG" if os.WTERMSIG(status) == signal.SIGALRM else f"KILLED {os.WTERMSIG(status)}"
    return b"".join(chunks).decode()


def one_line_error(error: ImageError) -> str:
    message = str(error)
    return f"error {message}" if message and "\n" not in message else f"CRASH multi-line error {message!r}"


def exercise(path: Path) -> str:
    """Every reader, the checker and `check -r all` on one image; an outcome per step, joined."""
    outcomes = []
    try:
        result = check_image(str(path))
        outcomes.append(f"check {result.exit_status}")
    except ImageError as error:
        outcomes.append(one_line_error(error))
    try:
        with Qcow2Image.open(str(path), read_only=True, allow_backing=False) as image:
            head = min(image.size, READ_LIMIT)
            image.readinto(0, [memoryview(bytearray(head))])
            image.readinto(image.size - head, [memoryview(bytearray(head))])
            if image.size <= MAP_LIMIT:
                list(image.map_extents())
            list(image.snapshots())
        outcomes.append("read ok")
    except ImageError as error:
        outcomes.append(one_line_error(error))
    try:  # last, since it writes: the repair must end cleanly too, and its result be a result
        repaired = check_image(str(path), repair="all")
        outcomes.append(f"repair {repaired.exit_status}")
    except ImageError as error:
        outcomes.append(one_line_error(error))
    return "; ".join(outcomes)


def assert_clean_outcome(outcome: str, data: bytes, tmp: Path) -> None:
    if "CRASH" in outcome or outcome in ("HANG", "") or outcome.startswith("KILLED"):
        keep = tmp / "failing.qcow2"
        keep.write_bytes(data)
        raise AssertionError(f"{outcome}\n(image kept at {keep})")


# -- the tests ----------------------------------------------------------------------------------


@needs_qemu
@pytest.mark.timeout(TEST_TIMEOUT)
@settings(max_examples=HEADER_EXAMPLES, deadline=None, database=None)
@given(
    seed=st.sampled_from(sorted(SEEDS)),
    mutations=st.lists(mutation, min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 1 << 20)),
)
def test_header_parser_never_crashes(seed: str, mutations: list, cut: int | None) -> None:
    data, targets = _SEEDS[seed]
    header = apply_mutations(data[:65536], [t for t in targets if t < 112], mutations, on_metadata=True)
    if cut is not None:
        header = header[: cut % (len(header) + 1)]
    try:
        parse_header(header, len(data), "fuzz.qcow2")
    except ImageError as error:
        assert "\n" not in str(error) and str(error)


@needs_qemu
@pytest.mark.timeout(TEST_TIMEOUT)
@settings(
    max_examples=IMAGE_EXAMPLES,
    deadline=None,
    database=None,
    # No shrinking: each example is a forked child, and the failing image is kept on disk anyway.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    seed=st.sampled_from(sorted(SEEDS)),
    mutations=st.lists(mutation, min_size=1, max_size=6),
    on_metadata=st.booleans(),
    new_length=st.one_of(st.none(), st.integers(0, 1 << 22), st.just(HUGE_TAIL)),
)
def test_readers_and_checker_end_cleanly_on_mutated_images(
    tmp_path: Path,
    seed: str,
    mutations: list,
    on_metadata: bool,
    new_length: int | None,
) -> None:
    data, targets = _SEEDS[seed]
    mutated = apply_mutations(data, targets, mutations, on_metadata)
    path = tmp_path / "fuzz.qcow2"
    path.write_bytes(mutated)
    if new_length is not None:
        os.truncate(path, new_length)  # cut short, or a sparse tail (1 TiB costs no disk space)
    try:
        outcome = run_bounded(lambda: exercise(path))
        assert_clean_outcome(outcome, mutated, tmp_path)
    finally:
        path.unlink()
