"""Reading qcow2 images built by qemu-img/qemu-io: pyhv must read what `qemu-img convert -O raw` reads."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from qcow2_oracle import KIB, MIB, create, needs_qemu, qemu_img, qemu_io, read_all, to_raw

from hypervisor.block.open import open_disk
from hypervisor.block.qcow2 import Qcow2Image
from hypervisor.block.qcow2.compress import zstd_available
from hypervisor.errors import ImageError

pytestmark = needs_qemu


def _cluster_size(tmp: Path, cluster: int) -> Path:
    path = create(tmp / "img.qcow2", 4 * MIB, f"cluster_size={cluster}")
    qemu_io(
        path,
        "write -P 0x11 100 5000",
        f"write -P 0x22 {MIB - 300} 70k",
        "write -z 2M 128k",
        f"write -P 0x33 {3 * MIB} {min(cluster, MIB)}",
    )
    return path


def _v2(tmp: Path) -> Path:
    path = create(tmp / "v2.qcow2", 4 * MIB, "compat=0.10")
    qemu_io(path, "write -P 3 0 200k", "write -P 4 1M 64k")
    return path


def _refcount_bits(tmp: Path, bits: int) -> Path:
    path = create(tmp / "rb.qcow2", 4 * MIB, f"refcount_bits={bits}")
    qemu_io(path, "write -P 5 0 300k", "write -P 6 3M 4k")
    return path


def _zero_clusters(tmp: Path) -> Path:
    base = create(tmp / "base.qcow2", 4 * MIB)
    qemu_io(base, "write -P 0x77 0 4M")
    path = create(tmp / "top.qcow2", 4 * MIB, backing=base)
    qemu_io(path, "write -P 1 0 1M", "write -z 64k 128k", "write -z -u 512k 64k", "discard 768k 64k")
    return path


def _chain_mixed(tmp: Path) -> Path:
    raw = create(tmp / "base.raw", 3 * MIB, fmt="raw")  # shorter than the top: zeros past its end
    qemu_io(raw, "write -P 7 0 3M", fmt="raw")
    mid = create(tmp / "mid.qcow2", 4 * MIB, "cluster_size=4k", backing=raw, backing_fmt="raw")
    qemu_io(mid, "write -P 8 1000 10k", "write -z 2M 8k")
    top = create(tmp / "top.qcow2", 6 * MIB, "cluster_size=128k", backing=Path("mid.qcow2"))
    qemu_io(top, "write -P 9 5000 3k", f"write -P 10 {5 * MIB} 4k", cwd=tmp)
    return top


def _compressed(tmp: Path, kind: str) -> Path:
    src = create(tmp / "src.qcow2", 4 * MIB)
    qemu_io(src, "write -P 1 0 300k", "write -P 2 1M 5000", f"write -P 3 {3 * MIB} 1M")
    path = tmp / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={kind}", src, path)
    qemu_io(path, "write -P 4 64k 4k")  # a normal cluster among compressed ones
    return path


def _snapshots(tmp: Path) -> Path:
    path = create(tmp / "snap.qcow2", 4 * MIB)
    qemu_io(path, "write -P 1 0 256k")
    qemu_img("snapshot", "-c", "first", path)
    qemu_io(path, "write -P 2 64k 64k", "write -z 128k 64k")
    qemu_img("snapshot", "-c", "second", path)
    qemu_io(path, "write -P 3 0 4k")
    return path


def _extended_l2(tmp: Path, with_backing: bool) -> Path:
    backing = None
    if with_backing:
        backing = create(tmp / "base.qcow2", 4 * MIB)
        qemu_io(backing, "write -P 0x55 0 4M")
    path = create(tmp / "ext.qcow2", 4 * MIB, "extended_l2=on", "cluster_size=64k", backing=backing)
    qemu_io(path, "write -P 9 5000 3k", "write -z 200k 8k", "write -P 8 1M 64k", "discard 1M 2k")
    return path


def _preallocated(tmp: Path) -> Path:
    path = create(tmp / "pre.qcow2", 4 * MIB, "preallocation=metadata")
    qemu_io(path, "write -P 1 100k 10k")
    return path


def _straddle_4g(tmp: Path) -> Path:
    path = create(tmp / "big.qcow2", 5 << 30)
    qemu_io(path, f"write -P 6 {(4 << 30) - 70000} 200000")
    return path


def _odd_size(tmp: Path) -> Path:
    path = create(tmp / "odd.qcow2", 1000448)  # not a multiple of the cluster size
    qemu_io(path, "write -P 4 990000 10448")
    return path


def _bitmaps(tmp: Path) -> Path:
    path = create(tmp / "bm.qcow2", 4 * MIB)
    qemu_img("bitmap", "--add", path, "b0")
    qemu_io(path, "write -P 6 4000 200000")
    return path


def _data_file(tmp: Path) -> Path:
    path = create(tmp / "ext.qcow2", 4 * MIB, f"data_file={tmp / 'data.raw'}")
    qemu_io(path, "write -P 6 4000 200000", "write -z 1M 64k")
    return path


def _lazy_refcounts(tmp: Path) -> Path:
    path = create(tmp / "lazy.qcow2", 4 * MIB, "lazy_refcounts=on")
    qemu_io(path, "write -P 6 4000 200000")
    return path


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "cluster-512": lambda t: _cluster_size(t, 512),
    "cluster-4k": lambda t: _cluster_size(t, 4096),
    "cluster-2m": lambda t: _cluster_size(t, 2 * MIB),
    "v2": _v2,
    **{f"refcount-{bits}": (lambda t, b=bits: _refcount_bits(t, b)) for bits in (1, 2, 4, 8, 16, 32, 64)},
    "zero-clusters": _zero_clusters,
    "chain-mixed": _chain_mixed,
    "compressed-zlib": lambda t: _compressed(t, "zlib"),
    "compressed-zstd": lambda t: _compressed(t, "zstd"),
    "snapshots": _snapshots,
    "extended-l2": lambda t: _extended_l2(t, False),
    "extended-l2-backing": lambda t: _extended_l2(t, True),
    "preallocation-metadata": _preallocated,
    "straddle-4g": _straddle_4g,
    "odd-size": _odd_size,
    "bitmaps": _bitmaps,
    "data-file": _data_file,
    "lazy-refcounts": _lazy_refcounts,
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_reads_what_qemu_reads(tmp_path: Path, kind: str) -> None:
    if kind == "compressed-zstd" and not zstd_available():
        pytest.skip("the 'zstandard' Python package is not installed")
    path = BUILDERS[kind](tmp_path)
    big = kind == "straddle-4g"
    expected = to_raw(path, tmp_path / "expected.raw", read=not big)
    with Qcow2Image.open(str(path), read_only=True) as image:
        assert image.size == (tmp_path / "expected.raw").stat().st_size
        if big:  # sparse big image: compare where the data is, and around it
            with open(tmp_path / "expected.raw", "rb") as raw:
                for start in (0, (4 << 30) - MIB, image.size - MIB):
                    buf = bytearray(MIB)
                    image.readinto(start, [memoryview(buf)])
                    raw.seek(start)
                    assert buf == raw.read(MIB)
        else:
            assert read_all(image) == expected


def test_scattered_buffers_and_unaligned_requests(tmp_path: Path) -> None:
    path = _zero_clusters(tmp_path)
    expected = to_raw(path, tmp_path / "expected.raw")
    with Qcow2Image.open(str(path), read_only=True) as image:
        for start, sizes in ((1, [3, 65536, 100]), (65530, [7, 200000]), (4 * MIB - 513, [1, 511, 1])):
            parts = [bytearray(n) for n in sizes]
            image.readinto(start, [memoryview(p) for p in parts])
            assert b"".join(parts) == expected[start : start + sum(sizes)]
        with pytest.raises(ValueError):
            image.readinto(4 * MIB - 1, [memoryview(bytearray(2))])


@pytest.mark.parametrize("which", ["first", "1", "second", "2"])
def test_snapshot_readable_by_name_or_id(tmp_path: Path, which: str) -> None:
    path = _snapshots(tmp_path)
    name = {"1": "first", "2": "second"}.get(which, which)
    expected = to_raw(path, tmp_path / "expected.raw", snapshot=name)
    with Qcow2Image.open(str(path), snapshot=which) as image:
        assert image.read_only
        assert read_all(image) == expected
        assert [s.name for s in image.snapshots()] == ["first", "second"]
    with pytest.raises(ImageError, match="no snapshot"):
        Qcow2Image.open(str(path), snapshot="missing")


def test_backing_not_opened_unless_allowed(tmp_path: Path) -> None:
    path = _chain_mixed(tmp_path)
    with Qcow2Image.open(str(path), read_only=True, allow_backing=False) as image:
        assert image.backing is None
        assert image.backing_filename == "mid.qcow2"
        assert image.backing_format == "qcow2"
        assert image.map_extents()  # metadata still works
        with pytest.raises(ImageError, match="not opened"):
            read_all(image)
    with Qcow2Image.open(str(path), read_only=True) as image:
        assert isinstance(image.backing, Qcow2Image)


def test_backing_loop_detected(tmp_path: Path) -> None:
    a = create(tmp_path / "a.qcow2", MIB)
    create(tmp_path / "b.qcow2", MIB, backing=a)
    with Qcow2Image.open(str(a)) as image:
        with pytest.raises(ImageError, match="loops"):
            image.set_backing("b.qcow2", "qcow2")  # refused before the header is touched
    with Qcow2Image.open(str(a), allow_backing=False) as image:
        image.set_backing("b.qcow2", "qcow2")  # a -> b -> a
    with pytest.raises(ImageError, match="loops"):
        Qcow2Image.open(str(a), read_only=True)


def test_missing_backing_is_one_line_error(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", MIB)
    top = create(tmp_path / "top.qcow2", MIB, backing=base)
    base.unlink()
    with pytest.raises(ImageError, match="backing file .* not found"):
        Qcow2Image.open(str(top), read_only=True)


def test_map_matches_qemu_img_map(tmp_path: Path) -> None:
    path = _chain_mixed(tmp_path)
    qemu_map = json.loads(qemu_img("map", "--output=json", path).stdout)
    with Qcow2Image.open(str(path), read_only=True) as image:
        ours = list(image.map_extents())

    def flags_at(offset: int, entries: list[dict]) -> tuple[bool, bool, int]:
        for e in entries:
            if e["start"] <= offset < e["start"] + e["length"]:
                return e["data"], e["zero"], e["depth"]
        raise AssertionError(offset)

    ours_dicts = [dict(start=e.start, length=e.length, data=e.data, zero=e.zero, depth=e.depth) for e in ours]
    assert sum(e.length for e in ours) == 6 * MIB
    for offset in range(0, 6 * MIB, 4 * KIB):
        assert flags_at(offset, ours_dicts) == flags_at(offset, qemu_map), offset


def test_open_disk_probes_qcow2(tmp_path: Path) -> None:
    path = _v2(tmp_path)
    disk = open_disk(str(path), read_only=True)
    assert isinstance(disk, Qcow2Image)
    disk.close()


def test_dirty_image_readable_read_only(tmp_path: Path) -> None:
    path = _lazy_refcounts(tmp_path)
    expected = to_raw(path, tmp_path / "expected.raw")
    raw = bytearray(path.read_bytes())
    raw[79] |= 1  # incompatible_features bit 0: dirty
    path.write_bytes(bytes(raw))
    with Qcow2Image.open(str(path), read_only=True) as image:
        assert image.dirty
        assert read_all(image) == expected
