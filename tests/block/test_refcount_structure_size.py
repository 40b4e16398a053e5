"""refcount.refcount_structure_size: the one rule for how many refcount blocks and refcount table
clusters an image needs (creator, checker rebuild). qcow2.rst "Host cluster
management": every cluster has a refcount, the refcount structure's own clusters included."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypervisor.block.qcow2.refcount import (
    RefcountStructureSize,
    blocks_covering,
    refcount_structure_size,
    refcounts_per_block,
)

WIDTHS = [1, 2, 4, 8, 16, 32, 64]
CLUSTER_SIZES = [512, 1024, 4096, 65536, 1 << 20, 2 << 20]
GEOMETRIES = [(cs, bits) for cs in CLUSTER_SIZES for bits in WIDTHS]


def qemu_metadata_size(clusters: int, cluster_size: int, refcount_bits: int) -> tuple[int, int]:
    """QEMU's qcow2_refcount_metadata_size (qcow2.c, generous_increase off), line for line."""
    per_block = cluster_size * 8 // refcount_bits
    per_table_cluster = cluster_size // 8
    table = blocks = n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last:
            return blocks, table


def covers_itself(size: RefcountStructureSize, first_free: int, cs: int, bits: int, counted: list[int]) -> bool:
    """Does a structure of `size`, from `first_free` on, hold every refcount it has to hold?"""
    per_block = refcounts_per_block(cs, bits)
    needed = set(counted) | set(blocks_covering(first_free, first_free + size.clusters, per_block))
    return len(needed) <= size.blocks and (max(needed) + 1) * 8 <= size.table_clusters * cs


@pytest.mark.parametrize(("cs", "bits"), GEOMETRIES)
def test_one_block_and_one_table_cluster_for_a_small_image(cs: int, bits: int) -> None:
    assert refcount_structure_size(1, cs, bits) == (1, 1)
    assert refcount_structure_size(0, cs, bits) == (1, 1)  # the structure still counts itself


@pytest.mark.parametrize(("cs", "bits"), GEOMETRIES)
def test_the_block_boundary_where_the_structure_tips_itself_over(cs: int, bits: int) -> None:
    """per_block - 2 clusters + 1 block + 1 table cluster fill one block exactly; one cluster
    more needs a second block, whose own cluster the second block then also covers."""
    per_block = refcounts_per_block(cs, bits)
    assert refcount_structure_size(per_block - 2, cs, bits) == (1, 1)
    assert refcount_structure_size(per_block - 1, cs, bits) == (2, 1)
    assert refcount_structure_size(per_block, cs, bits) == (2, 1)


@pytest.mark.parametrize(("cs", "bits"), GEOMETRIES)
def test_the_table_boundary(cs: int, bits: int) -> None:
    """A table cluster has cs / 8 entries: with that many blocks, one more cluster in use needs a
    second table cluster (and one more block)."""
    per_block = refcounts_per_block(cs, bits)
    entries = cs // 8
    last_fitting = entries * per_block - entries - 1
    assert refcount_structure_size(last_fitting, cs, bits) == (entries, 1)
    assert refcount_structure_size(last_fitting + 1, cs, bits) == (entries + 1, 2)


@pytest.mark.parametrize(("cs", "bits"), GEOMETRIES)
def test_dense_images_match_qemu_at_and_around_every_boundary(cs: int, bits: int) -> None:
    per_block = refcounts_per_block(cs, bits)
    entries = cs // 8
    for anchor in (per_block, 2 * per_block, entries * per_block, 3 * entries * per_block, 1 << 40):
        for first_free in range(max(1, anchor - 5), anchor + 5):
            assert refcount_structure_size(first_free, cs, bits) == qemu_metadata_size(first_free, cs, bits)


@given(st.sampled_from(GEOMETRIES), st.integers(1, 1 << 48))
def test_dense_images_match_qemu(geometry: tuple[int, int], first_free: int) -> None:
    cs, bits = geometry
    assert refcount_structure_size(first_free, cs, bits) == qemu_metadata_size(first_free, cs, bits)


def test_sparse_counted_blocks_need_table_entries_up_to_the_highest() -> None:
    """A zero table entry means "no block" (qcow2.rst), so a far-away block costs one block and
    table entries up to its index, not the blocks in between."""
    cs, bits = 512, 16  # 256 refcounts per block, 64 table entries per table cluster
    size = refcount_structure_size(5, cs, bits, [0, 1000])
    assert size == (2, -(-1001 // 64))  # block 0 also covers the structure itself
    far = refcount_structure_size(3000, cs, bits, [0])  # own clusters fall into block 11
    assert far == (2, 1)


@given(
    st.sampled_from([(512, 64), (512, 16), (1024, 1), (4096, 64)]),
    st.integers(0, 5000),
    st.lists(st.integers(0, 300), max_size=20),
)
def test_sparse_result_is_the_smallest_that_covers_itself(
    geometry: tuple[int, int], first_free: int, counted: list[int]
) -> None:
    cs, bits = geometry
    counted = sorted(set(counted))
    size = refcount_structure_size(first_free, cs, bits, counted)
    assert covers_itself(size, first_free, cs, bits, counted)
    # Exactly the blocks needed (callers write every one of them) ...
    per_block = refcounts_per_block(cs, bits)
    own = blocks_covering(first_free, first_free + size.clusters, per_block)
    assert len(set(counted) | set(own)) == size.blocks
    # ... and nothing smaller would do.
    for blocks in range(size.blocks + 1):
        for table in range(1, size.table_clusters + 1):
            if (blocks, table) != size and blocks + table <= size.clusters:
                assert not covers_itself(RefcountStructureSize(blocks, table), first_free, cs, bits, counted)


def test_counted_blocks_none_means_every_block_below_first_free() -> None:
    cs, bits = 512, 8
    per_block = refcounts_per_block(cs, bits)
    first_free = 10 * per_block + 3
    assert refcount_structure_size(first_free, cs, bits) == refcount_structure_size(
        first_free, cs, bits, list(range(11))
    )


def test_blocks_covering() -> None:
    assert blocks_covering(0, 0, 8) == range(0)
    assert blocks_covering(7, 8, 8) == range(0, 1)
    assert blocks_covering(7, 9, 8) == range(0, 2)
    assert blocks_covering(16, 24, 8) == range(2, 3)
