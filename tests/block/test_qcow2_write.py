"""Writing qcow2 through pyhv: images stay clean for `qemu-img check` and equal a raw twin."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from qcow2_oracle import (
    KIB,
    MIB,
    check_clean,
    create,
    needs_qemu,
    qemu_img,
    qemu_io,
    random_workload,
    read_all,
    run,
    to_raw,
)
from test_qcow2_read import BUILDERS

from hypervisor.block.qcow2 import Qcow2Image
from hypervisor.block.qcow2.compress import zstd_available
from hypervisor.block.raw import RawFile
from hypervisor.errors import ImageCorruptError, ImageError

pytestmark = needs_qemu

WORKLOAD_KINDS = [
    "cluster-512",
    "cluster-4k",
    "cluster-2m",
    "v2",
    "refcount-1",
    "refcount-4",
    "refcount-64",
    "zero-clusters",
    "chain-mixed",
    "compressed-zlib",
    "compressed-zstd",
    "snapshots",
    "extended-l2",
    "extended-l2-backing",
    "preallocation-metadata",
    "odd-size",
    "bitmaps",
    "data-file",
    "lazy-refcounts",
]


def _twin(tmp_path: Path, path: Path) -> RawFile:
    twin_path = tmp_path / "twin.raw"
    to_raw(path, twin_path, read=False)
    return RawFile(str(twin_path))


@pytest.mark.parametrize("kind", WORKLOAD_KINDS)
def test_random_workload_matches_raw_twin(tmp_path: Path, kind: str) -> None:
    if kind == "compressed-zstd" and not zstd_available():
        pytest.skip("the 'zstandard' Python package is not installed")
    path = BUILDERS[kind](tmp_path)
    twin = _twin(tmp_path, path)
    with Qcow2Image.open(str(path)) as image:
        random_workload(image, twin, seed=hash(kind) & 0xFFFF, ops=120, snapshots=kind == "snapshots")
    twin.close()
    check_clean(path)
    result = qemu_img("compare", path, twin.path, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_snapshots_keep_their_contents_while_the_image_changes(tmp_path: Path) -> None:
    path = create(tmp_path / "s.qcow2", 4 * MIB)
    qemu_io(path, "write -P 1 0 1M")
    twin = _twin(tmp_path, path)
    with Qcow2Image.open(str(path)) as image:
        image.create_snapshot("before")
        random_workload(image, twin, seed=7, ops=60)
        image.create_snapshot("middle")
        random_workload(image, twin, seed=8, ops=60)
        assert [s.name for s in image.snapshots()] == ["before", "middle"]
    twin.close()
    check_clean(path)
    listing = qemu_img("snapshot", "-l", path).stdout
    assert "before" in listing and "middle" in listing
    before = to_raw(path, tmp_path / "before.raw", snapshot="before")
    assert before[: 1 * MIB] == b"\x01" * MIB and before[MIB:] == bytes(3 * MIB)
    assert qemu_img("compare", path, twin.path, check=False).returncode == 0


def test_delete_and_apply_snapshot(tmp_path: Path) -> None:
    path = create(tmp_path / "s.qcow2", 4 * MIB)
    qemu_io(path, "write -P 1 0 512k")
    with Qcow2Image.open(str(path)) as image:
        image.create_snapshot("a")
        image.write(0, [b"\x02" * 128 * KIB])
        image.create_snapshot("b")
        image.write(64 * KIB, [b"\x03" * 256 * KIB])
        image.write_zeroes(1 * MIB, 64 * KIB)
    check_clean(path)
    snap_a = to_raw(path, tmp_path / "a.raw", snapshot="a")
    with Qcow2Image.open(str(path)) as image:
        image.delete_snapshot("b")
        image.apply_snapshot("a")
        assert read_all(image) == snap_a
        image.write(0, [b"\x04" * 4 * KIB])  # writing after a revert must copy, not touch "a"
    check_clean(path)
    assert to_raw(path, tmp_path / "a2.raw", snapshot="a") == snap_a
    assert "b " not in qemu_img("snapshot", "-l", path).stdout
    with Qcow2Image.open(str(path)) as image:
        image.delete_snapshot("1")
        assert image.snapshots() == []
    out = check_clean(path)
    assert "No errors" in out


def test_snapshot_refused_when_refcounts_too_narrow(tmp_path: Path) -> None:
    path = create(tmp_path / "r1.qcow2", 4 * MIB, "refcount_bits=1")
    qemu_io(path, "write -P 1 0 64k")
    before = path.read_bytes()
    with Qcow2Image.open(str(path)) as image:
        with pytest.raises(ImageError, match="refcount_bits=1"):
            image.create_snapshot("x")
    check_clean(path)
    assert path.read_bytes()[:512] == before[:512]


def test_refcount_table_growth_with_small_clusters(tmp_path: Path) -> None:
    path = create(tmp_path / "small.qcow2", 64 * MIB, "cluster_size=512")
    twin = _twin(tmp_path, path)
    before = json.loads(qemu_img("info", "--output=json", path).stdout)
    with Qcow2Image.open(str(path)) as image:
        for i in range(40):
            data = bytes([i + 1]) * 512 * KIB
            image.write(i * 1536 * KIB, [data])
            twin.write(i * 1536 * KIB, [data])
        image.flush()
        assert image.header.refcount_table_clusters > 1
    twin.close()
    check_clean(path)
    assert qemu_img("compare", path, twin.path, check=False).returncode == 0
    assert before["virtual-size"] == 64 * MIB


def test_resize_grow_with_l1_growth_and_shrink(tmp_path: Path) -> None:
    path = create(tmp_path / "r.qcow2", 1 * MIB, "cluster_size=4k")  # 512 entries per L2: 2 MiB per L1 entry
    qemu_io(path, "write -P 1 0 1M")
    with Qcow2Image.open(str(path)) as image:
        old_l1 = len(image.l1_table)
        image.resize(64 * MIB)
        assert len(image.l1_table) > old_l1
        image.write(60 * MIB, [b"\x09" * 8 * KIB])
    check_clean(path)
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    assert info["virtual-size"] == 64 * MIB
    raw = to_raw(path, tmp_path / "r.raw")
    assert raw[:MIB] == b"\x01" * MIB and raw[60 * MIB : 60 * MIB + 8 * KIB] == b"\x09" * 8 * KIB
    with Qcow2Image.open(str(path)) as image:
        image.resize(512 * KIB)
        image.resize(1 * MIB)  # grown back: the dropped part reads as zeros, not old data
        assert read_all(image) == b"\x01" * 512 * KIB + bytes(512 * KIB)
    check_clean(path)


def test_set_backing_is_seen_by_qemu(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", 2 * MIB)
    qemu_io(base, "write -P 7 0 2M")
    other = create(tmp_path / "other.raw", 2 * MIB, fmt="raw")
    top = create(tmp_path / "top.qcow2", 2 * MIB, backing=base)
    with Qcow2Image.open(str(top)) as image:
        image.set_backing("other.raw", "raw")
        assert image.backing_filename == "other.raw"
        assert read_all(image) == bytes(2 * MIB)
    info = json.loads(qemu_img("info", "--output=json", top).stdout)
    assert info["backing-filename"] == "other.raw"
    assert info["backing-filename-format"] == "raw"
    check_clean(top)
    assert other.exists()


def test_write_compressed_clusters(tmp_path: Path) -> None:
    for kind in ("zlib", "zstd") if zstd_available() else ("zlib",):
        path = create(tmp_path / f"{kind}.qcow2", 2 * MIB, f"compression_type={kind}")
        expected = bytearray(2 * MIB)
        with Qcow2Image.open(str(path)) as image:
            for cluster in range(0, 2 * MIB, 64 * KIB):
                data = (bytes([cluster // 65536]) * 100 + b"pyhv") * 150
                data = data[: 64 * KIB].ljust(64 * KIB, b"z")
                image.write_compressed(cluster, data)
                expected[cluster : cluster + 64 * KIB] = data
            assert read_all(image) == expected
        check_clean(path)
        assert to_raw(path, tmp_path / "c.raw") == expected
        info = json.loads(run("qemu-img", "map", "--output=json", path).stdout)
        assert all(e.get("compressed", True) for e in info if e["data"])


def test_dirty_image_is_repaired_on_read_write_open(tmp_path: Path) -> None:
    path = create(tmp_path / "lazy.qcow2", 4 * MIB, "lazy_refcounts=on")
    # "abort" leaves the dirty bit set with lazily (not) updated refcounts
    run("qemu-io", "-f", "qcow2", "-c", "write -P 3 0 256k", "-c", "abort", path, check=False)
    assert struct.unpack_from(">Q", path.read_bytes(), 72)[0] & 1
    expected = to_raw(path, tmp_path / "e.raw")
    with Qcow2Image.open(str(path)) as image:
        assert not image.dirty
        assert read_all(image) == expected
        image.write(MIB, [b"\x05" * 64 * KIB])
    check_clean(path)


def test_dirty_image_the_checker_cannot_repair_is_refused_for_writing(tmp_path: Path) -> None:
    """The open-time repair is the checker's (check -r all); what it cannot fix (here a data
    cluster past the end of the file) leaves the image dirty and refuses the read-write open with
    one line, while a read-only open still works and changes nothing."""
    path = create(tmp_path / "bad.qcow2", 4 * MIB, "lazy_refcounts=on")
    qemu_io(path, "write -P 7 0 64k")
    with Qcow2Image.open(str(path), read_only=True) as image:
        l2_offset = image.l1_table[0] & ((1 << 56) - 1)
    with path.open("r+b") as file:
        file.seek(l2_offset)
        file.write(struct.pack(">Q", (1 << 63) | (1 << 40)))  # COPIED, 1 TiB: past the end
        file.seek(72)  # incompatible_features bit 0: dirty
        features = struct.unpack(">Q", file.read(8))[0]
        file.seek(72)
        file.write(struct.pack(">Q", features | 1))
    before = path.read_bytes()
    with Qcow2Image.open(str(path), read_only=True) as image:
        assert image.dirty
    assert path.read_bytes() == before
    with pytest.raises(ImageCorruptError, match="not closed cleanly and could not be repaired") as error:
        Qcow2Image.open(str(path))
    assert "\n" not in str(error.value)
    assert struct.unpack_from(">Q", path.read_bytes(), 72)[0] & 1  # still dirty


def test_bitmaps_marked_in_use_on_first_write(tmp_path: Path) -> None:
    path = BUILDERS["bitmaps"](tmp_path)
    with Qcow2Image.open(str(path)) as image:
        image.write(0, [b"\x01" * 4 * KIB])
    check_clean(path)
    info = json.loads(qemu_img("info", "--output=json", "-U", path).stdout)
    bitmaps = info["format-specific"]["data"]["bitmaps"]
    assert bitmaps and all("in-use" in b["flags"] for b in bitmaps)


def test_unknown_header_extension_and_bits_preserved(tmp_path: Path) -> None:
    path = create(tmp_path / "x.qcow2", 4 * MIB)
    buf = bytearray(path.read_bytes())
    header_length = struct.unpack_from(">I", buf, 100)[0]
    # insert an unknown extension first, and set an unknown compatible bit
    unknown = struct.pack(">II", 0x0BADCAFE, 5) + b"hello" + bytes(3)
    end = header_length
    while struct.unpack_from(">I", buf, end)[0] != 0:
        end += 8 + (struct.unpack_from(">I", buf, end + 4)[0] + 7) // 8 * 8
    head = buf[:65536]  # the header cluster: the rest of the file keeps its layout
    head[header_length : end + 8] = unknown + head[header_length : end + 8]
    buf[:65536] = head[:65536]
    struct.pack_into(">Q", buf, 80, 1 << 40)
    path.write_bytes(bytes(buf))
    with Qcow2Image.open(str(path)) as image:
        image.write(0, [b"\x01" * 64 * KIB])
        image.create_snapshot("s")  # rewrites the header
        image.set_backing(None, None)
    data = path.read_bytes()
    assert b"hello" in data[:4096] and struct.pack(">I", 0x0BADCAFE) in data[:4096]
    assert struct.unpack_from(">Q", data, 80)[0] == 1 << 40
    assert b"lazy refcounts" in data[:4096]  # QEMU's feature-name table kept
    check_clean(path)


def test_images_written_by_pyhv_open_in_qemu_io(tmp_path: Path) -> None:
    path = create(tmp_path / "p.qcow2", 4 * MIB)
    with Qcow2Image.open(str(path)) as image:
        image.write(12345, [b"\x42" * 100000])
    result = run("qemu-io", "-f", "qcow2", "-c", "read -P 0x42 12345 100000", path)
    assert "read 100000/100000" in result.stdout


def test_second_writer_refused(tmp_path: Path) -> None:
    path = create(tmp_path / "l.qcow2", MIB)
    with Qcow2Image.open(str(path)):
        with pytest.raises(ImageError, match="in use by another process"):
            Qcow2Image.open(str(path))
        result = run("qemu-io", "-f", "qcow2", "-c", "read 0 512", path, check=False)
        assert result.returncode != 0 and "lock" in result.stderr + result.stdout


def test_read_only_refuses_writes(tmp_path: Path) -> None:
    path = create(tmp_path / "ro.qcow2", MIB)
    with Qcow2Image.open(str(path), read_only=True) as image:
        for call in (
            lambda: image.write(0, [b"x"]),
            lambda: image.write_zeroes(0, 512),
            lambda: image.discard(0, 512),
            lambda: image.create_snapshot("s"),
            lambda: image.resize(2 * MIB),
        ):
            with pytest.raises(ImageError, match="read-only"):
                call()


def test_unknown_autoclear_bits_cleared_before_first_write(tmp_path: Path) -> None:
    path = create(tmp_path / "ac.qcow2", MIB)
    buf = bytearray(path.read_bytes())
    struct.pack_into(">Q", buf, 88, 1 << 7)  # an autoclear feature this code does not know
    path.write_bytes(bytes(buf))
    with Qcow2Image.open(str(path)) as image:
        assert struct.unpack_from(">Q", path.read_bytes(), 88)[0] == 1 << 7  # opening alone changes nothing
        image.write(0, [b"\x01" * 512])
        assert struct.unpack_from(">Q", path.read_bytes(), 88)[0] == 0
    check_clean(path)
