"""The engine's refcount block cache (refcount.Refcounts.blocks) is bounded: an image whose
refcount blocks outnumber the cache still reads, writes, snapshots and checks clean. Dirty blocks
are written to their clusters before they are dropped (the first step of the flush order, only
sooner), so the file never holds fewer refcounts than references (qcow2.rst "Host cluster
management": a referenced cluster must not have refcount 0)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from qcow2_oracle import HAVE_QEMU, check_clean

from hypervisor.block.qcow2 import Qcow2Image
from hypervisor.block.qcow2 import refcount as refcount_module
from hypervisor.block.qcow2.check import check_image
from hypervisor.block.qcow2.create import Qcow2CreateOptions, create_qcow2
from hypervisor.block.qcow2.refcount import Refcounts, cache_capacity, decode_block

KIB = 1 << 10
MIB = 1 << 20
# 512-byte clusters with 64-bit refcounts: 64 refcounts (32 KiB of clusters) per refcount block and
# 64 blocks per refcount table cluster, so a few MiB need hundreds of blocks and a grown table.
SMALL_BLOCKS = {"cluster_size": 512, "refcount_bits": 64}


@pytest.fixture
def tiny_cache(monkeypatch: pytest.MonkeyPatch) -> int:
    """Every Refcounts made from now on caches the minimum number of blocks."""
    monkeypatch.setattr(refcount_module, "DEFAULT_CACHE_BYTES", 0)
    return refcount_module.MIN_CACHED_BLOCKS


def _new_image(path: Path, size: int = 8 * MIB, **options: object) -> Path:
    create_qcow2(str(path), Qcow2CreateOptions(size=size, **{**SMALL_BLOCKS, **options}))  # type: ignore[arg-type]
    return path


def _assert_bounded(refs: Refcounts) -> None:
    assert len(refs.blocks) <= refs.cache_capacity
    assert refs.dirty_blocks <= set(refs.blocks)  # a dirty block is never dropped unwritten


def _random_writes(image: Qcow2Image, twin: bytearray, rng: random.Random, count: int) -> None:
    for _ in range(count):
        offset = rng.randrange(0, len(twin) - 1)
        length = rng.randrange(1, min(48 * KIB, len(twin) - offset) + 1)
        data = bytes([rng.randrange(1, 256)]) * length
        image.write(offset, [data])
        twin[offset : offset + length] = data
        _assert_bounded(image.refcounts)
        if rng.random() < 0.1:
            image.flush()


def _read(image: Qcow2Image, length: int) -> bytes:
    buf = bytearray(length)
    image.readinto(0, [memoryview(buf)])
    return bytes(buf)


def test_capacity_follows_the_cluster_size_with_qemus_minimum() -> None:
    assert cache_capacity(64 * KIB) == refcount_module.DEFAULT_CACHE_BYTES // (64 * KIB)
    assert cache_capacity(512) == refcount_module.DEFAULT_CACHE_BYTES // 512
    assert cache_capacity(2 * MIB) == refcount_module.MIN_CACHED_BLOCKS
    assert cache_capacity(512, cache_bytes=0) == refcount_module.MIN_CACHED_BLOCKS


def test_writes_over_many_more_blocks_than_cached_read_back_and_check_clean(tmp_path: Path, tiny_cache: int) -> None:
    path = _new_image(tmp_path / "many-blocks.qcow2")
    twin = bytearray(8 * MIB)
    rng = random.Random(11)
    with Qcow2Image.open(str(path)) as image:
        assert image.refcounts.cache_capacity == tiny_cache
        _random_writes(image, twin, rng, 250)
        assert _read(image, len(twin)) == twin
        _assert_bounded(image.refcounts)
        blocks_in_use = sum(1 for entry in image.refcount_table if entry)
        assert blocks_in_use > 10 * tiny_cache
        assert image.header.refcount_table_clusters > 1  # the table grew and moved, too
    result = check_image(str(path))
    assert (result.corruptions, result.leaks, result.check_errors) == (0, 0, 0)
    with Qcow2Image.open(str(path), read_only=True) as image:
        assert _read(image, len(twin)) == twin
    if HAVE_QEMU:
        check_clean(path)


def test_unflushed_image_never_has_fewer_refcounts_than_references(tmp_path: Path, tiny_cache: int) -> None:
    """Between flushes the file holds early-written (evicted) refcount blocks: at most leaks."""
    path = _new_image(tmp_path / "unflushed.qcow2")
    twin = bytearray(8 * MIB)
    rng = random.Random(5)
    with Qcow2Image.open(str(path)) as image:
        for _ in range(6):
            for _ in range(30):
                offset = rng.randrange(0, len(twin) - 64 * KIB)
                image.write(offset, [b"\x7f" * (32 * KIB)])
                twin[offset : offset + 32 * KIB] = b"\x7f" * (32 * KIB)
            result = check_image(image)  # reads the file as it is now, flush or not
            assert result.corruptions == 0 and result.check_errors == 0
            image.flush()
        assert _read(image, len(twin)) == twin
    assert check_image(str(path)).leaks == 0


def test_a_dirty_block_is_on_disk_once_it_is_dropped(tmp_path: Path, tiny_cache: int) -> None:
    path = _new_image(tmp_path / "evict.qcow2")
    with Qcow2Image.open(str(path)) as image:
        refs = image.refcounts
        for step in range(16):  # about 16 blocks of data clusters, then nothing dirty
            image.write(step * 256 * KIB, [b"\x05" * 32 * KIB])
        image.flush()
        assert not refs.dirty_blocks
        image.write(7 * MIB, [b"\x01" * 512])  # one new data cluster: its refcount block is dirty
        written = {index for index in refs.dirty_blocks}
        assert written
        per_block = refs.entries_per_block
        far = [index for index, entry in enumerate(refs.table) if entry and index not in written]
        for index in far[: tiny_cache + 1]:  # touch more other blocks than the cache holds
            image.get_refcount(index * per_block)
        for index in written:
            assert index not in refs.blocks and index not in refs.dirty_blocks
            stored = decode_block(image.read_cluster_raw(refs.table[index], image.cluster_size), refs.codec.bits)
            for slot in range(per_block):
                assert stored[slot] == image.get_refcount(index * per_block + slot)


def test_snapshots_with_more_blocks_than_cached(tmp_path: Path, tiny_cache: int) -> None:
    """A MetadataTransaction keeps its dirty blocks (they go to copies at the commit), so the
    cache may overflow during it and is bounded again afterwards."""
    path = _new_image(tmp_path / "snapshots.qcow2", size=4 * MIB)
    twin = bytearray(4 * MIB)
    rng = random.Random(7)
    with Qcow2Image.open(str(path)) as image:
        _random_writes(image, twin, rng, 60)
        image.create_snapshot("one")
        first = bytes(twin)
        _random_writes(image, twin, rng, 60)
        image.create_snapshot("two")
        _random_writes(image, twin, rng, 30)
        image.delete_snapshot("two")
        _random_writes(image, twin, rng, 10)
        assert _read(image, len(twin)) == twin
        image.apply_snapshot("one")
        assert _read(image, len(twin)) == first
        _assert_bounded(image.refcounts)  # the commit gave the overflow back
    result = check_image(str(path))
    assert (result.corruptions, result.leaks, result.check_errors) == (0, 0, 0)
    if HAVE_QEMU:
        check_clean(path)


def _zero_refcount_blocks(path: Path, image_path_blocks: list[int]) -> None:
    with path.open("r+b") as file:
        for offset in image_path_blocks:
            file.seek(offset)
            file.write(bytes(512))


def _written_image(path: Path, twin: bytearray, seed: int) -> list[int]:
    """An image with random data; returns the offsets of its refcount blocks."""
    with Qcow2Image.open(str(path)) as image:
        _random_writes(image, twin, random.Random(seed), 120)
        return [entry for entry in image.refcount_table if entry]


def test_open_time_rebuild_of_a_dirty_image_with_a_small_cache(tmp_path: Path, tiny_cache: int) -> None:
    """qcow2.rst "dirty bit": refcounts may be inconsistent, the engine recounts them on a
    read-write open (through the checker, engine.repair_dirty_image)."""
    path = _new_image(tmp_path / "dirty.qcow2", lazy_refcounts=True)
    twin = bytearray(8 * MIB)
    blocks = _written_image(path, twin, 3)
    assert len(blocks) > 10 * tiny_cache
    _zero_refcount_blocks(path, blocks[1:])  # as if the refcounts had never been written
    with path.open("r+b") as file:  # incompatible_features (byte 72) bit 0: dirty
        file.seek(72)
        features = int.from_bytes(file.read(8), "big")
        file.seek(72)
        file.write((features | 1).to_bytes(8, "big"))
    with Qcow2Image.open(str(path)) as image:
        assert not image.dirty
        _assert_bounded(image.refcounts)
        assert _read(image, len(twin)) == twin
        image.write(MIB, [b"\x09" * 64 * KIB])
        twin[MIB : MIB + 64 * KIB] = b"\x09" * 64 * KIB
    result = check_image(str(path))
    assert (result.corruptions, result.leaks, result.check_errors) == (0, 0, 0)
    if HAVE_QEMU:
        check_clean(path)


def test_check_rebuilds_too_low_refcounts_of_an_image_with_many_blocks(tmp_path: Path, tiny_cache: int) -> None:
    """`check -r all` (check.rebuild_refcount_structure), then the engine uses the result."""
    path = _new_image(tmp_path / "low.qcow2")
    twin = bytearray(8 * MIB)
    blocks = _written_image(path, twin, 9)
    _zero_refcount_blocks(path, blocks[len(blocks) // 2 :])
    assert check_image(str(path)).corruptions > 0
    repaired = check_image(str(path), repair="all")
    assert (repaired.corruptions, repaired.leaks) == (0, 0)
    with Qcow2Image.open(str(path)) as image:
        _random_writes(image, twin, random.Random(10), 40)
        assert _read(image, len(twin)) == twin
    result = check_image(str(path))
    assert (result.corruptions, result.leaks, result.check_errors) == (0, 0, 0)
    if HAVE_QEMU:
        check_clean(path)
