"""Crash consistency: record every write and sync pyhv makes to an image, replay power-loss states,
and ask `qemu-img check` about each one. Leaks are allowed, corruption is not.

States checked: the state at every sync (every prefix, unflushed writes dropped); and, except for
snapshot workloads, every in-order prefix of the write sequence (the disk wrote everything so far)
and, per sync epoch, random subsets of the writes since the last sync (the disk reordered or
dropped unflushed writes). Anything synced is always applied.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from qcow2_oracle import KIB, MIB, check_no_corruption, create, needs_qemu, qemu_io

from hypervisor.block.qcow2 import Qcow2Image
from hypervisor.block.qcow2.hostfile import HostFile

pytestmark = needs_qemu

Write = tuple[int, bytes]
MAX_STATES = 250  # per workload, sampled evenly, to keep the file fast


def _record(monkeypatch: pytest.MonkeyPatch, path: str) -> list[Write | None]:
    """Record (offset, bytes) writes and None for syncs made to `path` through HostFile."""
    ops: list[Write | None] = []
    original_pwritev, original_sync = HostFile.pwritev, HostFile.sync

    def pwritev(self: HostFile, offset: int, buffers) -> None:  # type: ignore[no-untyped-def]
        if self.path == path:
            ops.append((offset, b"".join(bytes(b) for b in buffers)))
        original_pwritev(self, offset, buffers)

    def sync(self: HostFile) -> None:
        if self.path == path:
            ops.append(None)
        original_sync(self)

    monkeypatch.setattr(HostFile, "pwritev", pwritev)
    monkeypatch.setattr(HostFile, "sync", sync)
    return ops


def _states(ops: list[Write | None], seed: int, sync_points_only: bool) -> Iterator[list[Write]]:
    rng = random.Random(seed)
    durable: list[Write] = []
    epoch: list[Write] = []
    for op in ops:
        if op is None:
            if not sync_points_only and 1 < len(epoch) <= 8:
                for dropped in range(len(epoch)):  # each single write of the epoch lost
                    yield durable + epoch[:dropped] + epoch[dropped + 1 :]
            durable += epoch
            epoch = []
            yield durable
            continue
        epoch.append(op)
        if sync_points_only:
            continue
        yield durable + epoch
        if len(epoch) > 1:
            keep = sorted(rng.sample(range(len(epoch)), rng.randrange(len(epoch))))
            yield durable + [epoch[i] for i in keep]


def _apply(initial: bytes, writes: list[Write]) -> bytes:
    image = bytearray(initial)
    for offset, data in writes:
        if offset + len(data) > len(image):
            image.extend(bytes(offset + len(data) - len(image)))
        image[offset : offset + len(data)] = data
    return bytes(image)


def _replay(
    tmp_path: Path,
    initial: bytes,
    ops: list[Write | None],
    extra_files: Callable[[Path], None],
    sync_points_only: bool,
) -> int:
    states = list(_states(ops, seed=len(ops), sync_points_only=sync_points_only))
    if len(states) > MAX_STATES:
        step = len(states) / MAX_STATES
        states = [states[int(i * step)] for i in range(MAX_STATES)] + [states[-1]]
    crash_dir = tmp_path / "crash"
    crash_dir.mkdir()
    extra_files(crash_dir)
    target = crash_dir / "img.qcow2"
    for writes in states:
        target.write_bytes(_apply(initial, writes))
        check_no_corruption(target)
    return len(states)


def _run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    image_path: Path,
    workload: Callable[[Qcow2Image], None],
    extra_files: Callable[[Path], None] = lambda d: None,
    sync_points_only: bool = False,
) -> None:
    initial = image_path.read_bytes()
    ops = _record(monkeypatch, str(image_path))
    with Qcow2Image.open(str(image_path)) as image:
        workload(image)
    monkeypatch.undo()
    assert any(op is None for op in ops) and any(op is not None for op in ops)
    assert _replay(tmp_path, initial, ops, extra_files, sync_points_only) > 5
    check_no_corruption(image_path)


def _random_io(image: Qcow2Image, seed: int, ops: int, zeroes: bool = True) -> None:
    rng = random.Random(seed)
    for _ in range(ops):
        offset = rng.randrange(0, image.size - 1)
        length = rng.randrange(1, min(150 * KIB, image.size - offset) + 1)
        choice = rng.random()
        if choice < 0.7 or not zeroes:
            image.write(offset, [bytes([rng.randrange(1, 256)]) * length])
        elif choice < 0.85:
            image.write_zeroes(offset, length)
        else:
            image.discard(offset, length)
        if rng.random() < 0.3:
            image.flush()


def test_allocating_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = create(tmp_path / "img.qcow2", 2 * MIB)
    _run(tmp_path, monkeypatch, path, lambda image: _random_io(image, 1, 25))


def test_overlay_partial_writes_zeroes_discards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = create(tmp_path / "base.qcow2", 2 * MIB)
    qemu_io(base, "write -P 0x33 0 2M")
    path = create(tmp_path / "img.qcow2", 2 * MIB, "cluster_size=16k", backing=Path("base.qcow2"))

    def copy_base(crash_dir: Path) -> None:
        (crash_dir / "base.qcow2").write_bytes(base.read_bytes())

    _run(tmp_path, monkeypatch, path, lambda image: _random_io(image, 2, 25), copy_base)


def test_snapshot_create_delete_apply_and_compressed_overwrites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = create(tmp_path / "src.qcow2", 2 * MIB)
    qemu_io(source, "write -P 0x44 0 1M")
    path = tmp_path / "img.qcow2"
    from qcow2_oracle import qemu_img

    qemu_img("convert", "-c", "-O", "qcow2", source, path)

    def workload(image: Qcow2Image) -> None:
        _random_io(image, 3, 8)
        image.create_snapshot("one")
        _random_io(image, 4, 8)
        image.create_snapshot("two")
        _random_io(image, 5, 8)
        image.delete_snapshot("one")
        image.apply_snapshot("two")
        _random_io(image, 6, 5)

    # Snapshot creation turns COPIED flags off as refcounts go to 2: both live in different
    # sectors, so only the states at sync points (unflushed writes dropped) can be exact.
    _run(tmp_path, monkeypatch, path, workload, sync_points_only=True)


def test_refcount_table_growth_and_l1_growth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = create(tmp_path / "img.qcow2", 8 * MIB, "cluster_size=512")

    def workload(image: Qcow2Image) -> None:
        for i in range(6):
            image.write(i * MIB, [bytes([i + 1]) * 256 * KIB])
            image.flush()
        image.resize(40 * MIB)
        image.write(39 * MIB, [b"\x07" * 64 * KIB])

    _run(tmp_path, monkeypatch, path, workload)


def test_extended_l2_subclusters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = create(tmp_path / "img.qcow2", 2 * MIB, "extended_l2=on")
    _run(tmp_path, monkeypatch, path, lambda image: _random_io(image, 6, 25))
