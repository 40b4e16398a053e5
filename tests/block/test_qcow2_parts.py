"""The engine's parts on their own: the geometry value, the flush order's dependencies, and the
allocator as the one owner of the metadata cluster set (no qemu needed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

from hypervisor.block.qcow2 import Qcow2Image
from hypervisor.block.qcow2.allocator import Allocator
from hypervisor.block.qcow2.create import Qcow2CreateOptions, create_qcow2
from hypervisor.block.qcow2.flush import DATA, FlushOrder
from hypervisor.block.qcow2.geometry import Geometry
from hypervisor.block.qcow2.hostfile import HostFile
from hypervisor.block.raw import open_image_fd

KIB = 1 << 10
MIB = 1 << 20


def _image(path: Path, cluster_size: int, extended_l2: bool = False) -> Path:
    create_qcow2(str(path), Qcow2CreateOptions(size=8 * MIB, cluster_size=cluster_size, extended_l2=extended_l2))
    return path


def test_geometry_splits_a_guest_offset_as_qcow2_rst_describes(tmp_path: Path) -> None:
    with Qcow2Image.open(str(_image(tmp_path / "g.qcow2", cluster_size=4096))) as image:
        geo = Geometry.from_header(image.header)
    assert (geo.cluster_bits, geo.cluster_size, geo.l2_entries, geo.l2_bits) == (12, 4096, 512, 9)
    assert not geo.extended_l2 and geo.words_per_entry == 1 and geo.v3 and not geo.has_data_file
    offset = (3 * 512 + 7) * 4096 + 123  # L1 entry 3, L2 entry 7, byte 123
    assert geo.split(offset) == (3, 7, 123)
    assert geo.l1_index(offset >> 12) == 3 and geo.l2_word(offset >> 12) == 7
    assert geo.bytes_per_l2 == 2 * MIB
    assert list(geo.cluster_range(4095, 2)) == [0, 1] and list(geo.cluster_range(8192, 0)) == [2]
    assert geo.clusters(0) == 1 and geo.clusters(4097) == 2


def test_extended_l2_geometry_has_two_words_per_entry_and_32_subclusters(tmp_path: Path) -> None:
    with Qcow2Image.open(str(_image(tmp_path / "x.qcow2", cluster_size=64 * KIB, extended_l2=True))) as image:
        geo = Geometry.from_header(image.header)
    assert geo.extended_l2 and geo.words_per_entry == 2 and geo.l2_entries == 4096
    assert 1 << geo.subcluster_bits == 2 * KIB
    assert geo.l2_word(5) == 10


class _RecordingFile:
    """Stands in for the HostFile the flush order syncs."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def sync(self) -> None:
        self.log.append(f"sync {self.name}")


def _order(log: list[str], dirty: set[str], data_file: bool = False) -> FlushOrder:
    image = cast(HostFile, _RecordingFile("image", log))
    data = cast(HostFile, _RecordingFile("data", log)) if data_file else None
    order = FlushOrder(image, lambda: data)

    def step(name: str, syncs: bool = False) -> tuple[Callable[[], bool], Callable[[], None]]:
        def write() -> None:
            log.append(f"write {name}")
            dirty.discard(name)
            if syncs:
                log.append("sync image")

        return (lambda: name in dirty), write

    order.add("refcounts", *step("refcounts", syncs=True), syncs_itself=True)
    order.add("l2", *step("l2"), after=("refcounts", DATA))
    order.add("l1", *step("l1"), after=("refcounts", "l2", DATA))
    order.add("frees", *step("frees"), after=(DATA, "l2", "l1"))
    return order


def test_flush_syncs_between_a_step_and_the_steps_that_depend_on_it() -> None:
    log: list[str] = []
    _order(log, {"refcounts", "l2", "l1", "frees"}).flush()
    # The refcount write back syncs itself, so the L2 tables follow at once; every later step
    # waits for a sync of what it depends on; the flush ends durable.
    assert log == [
        "write refcounts",
        "sync image",
        "write l2",
        "sync image",
        "write l1",
        "sync image",
        "write frees",
        "sync image",
    ]


def test_flush_makes_guest_data_durable_before_the_tables_pointing_at_it() -> None:
    log: list[str] = []
    _order(log, {"l2"}, data_file=True).flush()
    assert log == ["sync image", "sync data", "write l2", "sync image"]
    log.clear()
    _order(log, set(), data_file=True).flush()  # nothing dirty: a flush still syncs the data
    assert log == ["sync image", "sync data"]


def test_a_step_may_only_depend_on_earlier_steps() -> None:
    order = FlushOrder(cast(HostFile, _RecordingFile("image", [])), lambda: None)
    with pytest.raises(ValueError, match="l1"):
        order.add("l2", lambda: False, lambda: None, after=("l1",))
    order.add("l2", lambda: False, lambda: None)
    with pytest.raises(ValueError):
        order.add("l2", lambda: False, lambda: None)  # a name only once


def test_the_allocator_keeps_the_metadata_set(tmp_path: Path) -> None:
    path = _image(tmp_path / "a.qcow2", cluster_size=4096)
    with Qcow2Image.open(str(path), read_only=True) as image:
        header = image.header
        geo = Geometry.from_header(header)
    fd = open_image_fd(str(path), read_only=False)
    hf = HostFile(fd, str(path), read_only=False)
    try:
        moved: list[tuple[int, int]] = []
        allocator = Allocator(
            hf,
            geo,
            header.refcount_order,
            header.refcount_table_offset,
            header.refcount_table_clusters,
            lambda offset, clusters: moved.append((offset, clusters)),
        )
        allocator.set_metadata({0, 1})
        table = allocator.allocate_metadata(2 * 4096 + 1)  # three clusters
        first = table >> 12
        assert {first, first + 1, first + 2} <= allocator.metadata
        assert allocator.refcount(first) == 1
        allocator.set_metadata({0, first + 2})  # a recount after a commit: the last one is a table
        data = allocator.allocate_data(1)
        assert data >> 12 not in allocator.metadata
        packed = allocator.allocate_compressed(100)
        assert allocator.allocate_compressed(100) == packed + 100  # packed into the same cluster
        assert allocator.refcount(packed >> 12) == 2  # one reference per compressed cluster
        allocator.reset_compressed_cursor()
        assert allocator.allocate_compressed(100) >> 12 != packed >> 12
        assert not moved
    finally:
        hf.close()
