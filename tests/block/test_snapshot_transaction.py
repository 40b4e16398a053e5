"""Snapshot operations as one metadata transaction (transaction.py): exact refcounts afterwards,
a refcount table that has to move inside the transaction, and failures that leave the old image."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest
from qcow2_oracle import KIB, MIB, check_clean, create, needs_qemu, qemu_img, qemu_io, to_raw

from hypervisor.block.qcow2 import Qcow2Image
from hypervisor.block.qcow2.clustermap import ClusterMap
from hypervisor.errors import ImageFormatError

pytestmark = needs_qemu


def test_create_delete_apply_leave_no_leaks(tmp_path: Path) -> None:
    path = create(tmp_path / "img.qcow2", 1 * MIB, "cluster_size=4096")
    qemu_io(path, "write -P 0x10 0 300k", "write -c -P 0x11 512k 4k")
    with Qcow2Image.open(str(path)) as image:
        image.create_snapshot("a")
        image.write(100 * KIB, [b"\x20" * 50 * KIB])
        image.create_snapshot("b")
        image.write(0, [b"\x30" * 8 * KIB])
    check_clean(path)
    expected_a = to_raw(path, tmp_path / "a.raw", snapshot="a")
    with Qcow2Image.open(str(path)) as image:
        image.delete_snapshot("b")
        image.apply_snapshot("a")
    check_clean(path)
    assert to_raw(path, tmp_path / "now.raw") == expected_a
    with Qcow2Image.open(str(path)) as image:
        image.delete_snapshot("a")
        image.write(0, [b"\x40" * 4 * KIB])  # in place again: COPIED flags are back
    out = check_clean(path)
    assert "No errors" in out


def test_refcount_table_moves_inside_the_transaction(tmp_path: Path) -> None:
    # 512-byte clusters with 64-bit refcounts: 64 entries per block, a one-cluster table covers
    # 64 blocks = 4096 clusters; 1980 KiB of data nearly fills it, and the snapshot's copies overflow it.
    path = create(tmp_path / "img.qcow2", 4 * MIB, "cluster_size=512", "refcount_bits=64")
    qemu_io(path, "write -P 0x61 0 1980k")
    before = to_raw(path, tmp_path / "before.raw")
    with Qcow2Image.open(str(path), read_only=True) as image:
        table_clusters = image.header.refcount_table_clusters
    with Qcow2Image.open(str(path)) as image:
        image.create_snapshot("s")
        assert image.header.refcount_table_clusters > table_clusters
    check_clean(path)
    assert to_raw(path, tmp_path / "s.raw", snapshot="s") == before
    with Qcow2Image.open(str(path)) as image:
        image.delete_snapshot("s")
    check_clean(path)
    assert to_raw(path, tmp_path / "after.raw") == before


def test_refcount_overflow_refuses_and_keeps_the_image(tmp_path: Path) -> None:
    path = create(tmp_path / "img.qcow2", 1 * MIB, "refcount_bits=1")
    qemu_io(path, "write -P 0x51 0 128k")
    before = path.read_bytes()
    with Qcow2Image.open(str(path)) as image:
        with pytest.raises(ImageFormatError, match="refcount_bits=1"):
            image.create_snapshot("s")
        image.write(256 * KIB, [b"\x52" * 64 * KIB])  # the open image still works
    check_clean(path)
    assert path.read_bytes()[: len(before)][:64] == before[:64]
    assert "s" not in qemu_img("snapshot", "-l", path).stdout


def test_write_error_before_the_switch_leaves_the_old_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = create(tmp_path / "img.qcow2", 1 * MIB, "cluster_size=4096")
    qemu_io(path, "write -P 0x71 0 200k")
    qemu_img("snapshot", "-c", "old", path)
    expected = to_raw(path, tmp_path / "before.raw")
    image = Qcow2Image.open(str(path))
    real_pwritev = os.pwritev
    calls = []

    def failing_pwritev(fd: int, buffers: list[bytes], offset: int) -> int:
        calls.append(offset)
        if len(calls) == 3:  # in the middle of writing the new structures
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwritev(fd, buffers, offset)

    with monkeypatch.context() as patch:
        patch.setattr(os, "pwritev", failing_pwritev)
        with pytest.raises(OSError):
            image.delete_snapshot("old")
    assert [s.name for s in image.snapshots()] == ["old"]
    image.write(400 * KIB, [b"\x72" * 8 * KIB])  # state reloaded from disk: writes still work
    image.delete_snapshot("old")
    image.close()
    check_clean(path)
    assert to_raw(path, tmp_path / "after.raw")[: 200 * KIB] == expected[: 200 * KIB]


def test_error_while_building_forgets_the_allocations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = create(tmp_path / "img.qcow2", 1 * MIB, "cluster_size=512")
    qemu_io(path, "write -P 0x31 0 100k")  # several L2 tables, each copied by the snapshot
    image = Qcow2Image.open(str(path))
    real_walk = ClusterMap.l2_for_walk
    walks = []

    def failing_walk(self: ClusterMap, l1: object, l1_index: int) -> object:
        walks.append(l1_index)
        if len(walks) == 2 * sum(1 for e in image.l1_table if e) - 1:  # counted, and all but one copied
            raise ImageFormatError("simulated bad L2 table")
        return real_walk(self, l1, l1_index)  # type: ignore[arg-type]

    with monkeypatch.context() as patch:
        patch.setattr(ClusterMap, "l2_for_walk", failing_walk)
        with pytest.raises(ImageFormatError, match="simulated"):
            image.create_snapshot("s")
    image.write(200 * KIB, [b"\x32" * 4 * KIB])
    image.close()
    check_clean(path)  # no leaked clusters from the abandoned copies
    assert qemu_img("snapshot", "-l", path).stdout == ""


def test_old_table_with_short_extra_data_is_freed_by_its_stored_size(tmp_path: Path) -> None:
    """A table written with 16 bytes of extra data per entry (QEMU before 5.0) is shorter than
    the one pyhv would build (24): only the clusters it really takes may be freed."""
    path = create(tmp_path / "img.qcow2", 256 * KIB, "cluster_size=512")
    qemu_io(path, "write -P 0x41 0 8k")
    # QEMU keeps names to 255 bytes; with 16 bytes of extra data these two entries take 312 + 200
    # bytes, exactly one 512-byte cluster (with 24 bytes, as QEMU 7.2 and pyhv write, 528).
    names = ["n" * 255, "m" * 143]
    for name in names:
        qemu_img("snapshot", "-c", name, path)
    with open(path, "r+b") as f:
        f.seek(60)
        count, table = struct.unpack(">IQ", f.read(12))
        assert count == 2
        f.seek(table)
        entries = []
        for _ in names:
            fixed = bytearray(f.read(40))
            id_size, name_size = struct.unpack_from(">HH", fixed, 12)
            extra = f.read(24)
            text = f.read(id_size + name_size)
            f.read(-(40 + 24 + id_size + name_size) % 8)
            struct.pack_into(">I", fixed, 36, 16)  # extra_data_size
            entry = bytes(fixed) + extra[:16] + text
            entries.append(entry + bytes(-len(entry) % 8))
        assert sum(len(e) for e in entries) == 512
        f.seek(table)
        f.write(b"".join(entries))
    qemu_img("check", "-r", "leaks", path)  # QEMU's table took two clusters: the second now leaks
    qemu_io(path, "write -P 0x42 64k 512")  # and is reused for data
    check_clean(path)
    with Qcow2Image.open(str(path)) as image:
        image.delete_snapshot(names[0])
    check_clean(path)
    assert to_raw(path, tmp_path / "now.raw")[64 * KIB : 64 * KIB + 512] == b"\x42" * 512
