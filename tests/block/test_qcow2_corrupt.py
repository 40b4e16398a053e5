"""Corrupt and unsupported images: one clear error, raised at open or when the bad entry is met,
and the file is left byte-for-byte unchanged."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from qcow2_oracle import KIB, MIB, create, needs_qemu, qemu_io, read_all

from hypervisor.block.open import open_disk
from hypervisor.block.qcow2 import Qcow2Image
from hypervisor.errors import ImageCorruptError, ImageError, ImageFormatError

pytestmark = needs_qemu

Patch = Callable[[bytearray], None]


def _u32(buf: bytearray, offset: int) -> int:
    return struct.unpack_from(">I", buf, offset)[0]


def _u64(buf: bytearray, offset: int) -> int:
    return struct.unpack_from(">Q", buf, offset)[0]


def _set_u32(offset: int, value: int) -> Patch:
    return lambda buf: struct.pack_into(">I", buf, offset, value)


def _set_u64(offset: int, value: int) -> Patch:
    return lambda buf: struct.pack_into(">Q", buf, offset, value)


def _l2_offset(buf: bytearray) -> int:
    l1_offset = _u64(buf, 40)
    return _u64(buf, l1_offset) & 0x00FF_FFFF_FFFF_FE00


def _set_l2_entry(value_of: Callable[[bytearray], int], index: int = 0) -> Patch:
    def patch(buf: bytearray) -> None:
        struct.pack_into(">Q", buf, _l2_offset(buf) + 8 * index, value_of(buf))

    return patch


def _set_l1_entry(value_of: Callable[[bytearray], int]) -> Patch:
    def patch(buf: bytearray) -> None:
        struct.pack_into(">Q", buf, _u64(buf, 40), value_of(buf))

    return patch


def _rename_feature(buf: bytearray) -> None:
    """Make bit 9 a named incompatible feature in the image's own feature-name table."""
    pos = _u32(buf, 100)
    while True:
        ext_type, length = struct.unpack_from(">II", buf, pos)
        if ext_type == 0x6803F857:
            struct.pack_into(">BB46s", buf, pos + 8, 0, 9, b"frobnication")
            break
        pos += 8 + (length + 7) // 8 * 8
    struct.pack_into(">Q", buf, 72, _u64(buf, 72) | 1 << 9)


COPIED = 1 << 63

# name -> (patch, error class, message fragment, raised at open?)
CASES: dict[str, tuple[Patch, type[ImageError], str, bool]] = {
    "bad magic": (lambda b: b.__setitem__(slice(0, 4), b"QFI\x00"), ImageFormatError, "not a qcow2", True),
    "version 4": (_set_u32(4, 4), ImageFormatError, "unsupported qcow2 version", True),
    "cluster_bits 8": (_set_u32(20, 8), ImageFormatError, "cluster_bits", True),
    "cluster_bits 31": (_set_u32(20, 31), ImageFormatError, "cluster_bits", True),
    "unknown incompatible bit": (_set_u64(72, 1 << 17), ImageFormatError, "unknown feature bit 17", True),
    "named incompatible bit": (_rename_feature, ImageFormatError, "frobnication", True),
    "encrypted aes": (_set_u32(32, 1), ImageFormatError, "encrypted", True),
    "encrypted luks": (_set_u32(32, 2), ImageFormatError, "LUKS", True),
    "header_length not multiple of 8": (_set_u32(100, 106), ImageCorruptError, "header_length", True),
    "header_length too small": (_set_u32(100, 96), ImageCorruptError, "header_length", True),
    "refcount_order 7": (_set_u32(96, 7), ImageCorruptError, "refcount_order", True),
    "l1 past eof": (_set_u64(40, 1 << 40), ImageCorruptError, "past the end", True),
    "l1 unaligned": (lambda b: struct.pack_into(">Q", b, 40, _u64(b, 40) + 512), ImageCorruptError, "aligned", True),
    "l1 too small": (_set_u32(36, 0), ImageCorruptError, "L1 table too small", True),
    "refcount table over header": (_set_u64(48, 0), ImageCorruptError, "overlaps the header", True),
    "refcount table past eof": (_set_u64(48, 1 << 40), ImageCorruptError, "past the end", True),
    "refcount table empty": (_set_u32(56, 0), ImageCorruptError, "refcount table", True),
    "l1 overlaps refcount table": (
        lambda b: struct.pack_into(">Q", b, 40, _u64(b, 48)),
        ImageCorruptError,
        "overlaps",
        True,
    ),
    "backing name too long": (
        lambda b: struct.pack_into(">QI", b, 8, 512, 2000),
        ImageCorruptError,
        "backing file name",
        True,
    ),
    "extension past area": (
        lambda b: struct.pack_into(">II", b, _u32(b, 100), 0x12345678, 1 << 20),
        ImageCorruptError,
        "runs past",
        True,
    ),
    "snapshot table past eof": (
        lambda b: (struct.pack_into(">I", b, 60, 1), struct.pack_into(">Q", b, 64, 1 << 40)),
        ImageCorruptError,
        "past the end",
        True,
    ),
    "l2 entry past eof": (_set_l2_entry(lambda b: COPIED | 1 << 40), ImageCorruptError, "past the end", False),
    "l2 entry unaligned": (_set_l2_entry(lambda b: COPIED | 0x50200), ImageCorruptError, "not aligned", False),
    "l2 entry into l1 table": (_set_l2_entry(lambda b: COPIED | _u64(b, 40)), ImageCorruptError, "metadata", False),
    "l2 entry into refcount table": (
        _set_l2_entry(lambda b: COPIED | _u64(b, 48)),
        ImageCorruptError,
        "metadata",
        False,
    ),
    "l2 entry without offset": (_set_l2_entry(lambda b: COPIED), ImageCorruptError, "no offset", False),
    "l2 reserved bits": (_set_l2_entry(lambda b: COPIED | 0x50000 | 1 << 58), ImageCorruptError, "reserved", False),
    "l1 entry past eof": (_set_l1_entry(lambda b: COPIED | 1 << 40), ImageCorruptError, "past the end", False),
    "l1 entry unaligned": (
        _set_l1_entry(lambda b: COPIED | (_l2_offset(b) + 512)),
        ImageCorruptError,
        "not aligned",
        False,
    ),
    "l1 entry into refcount table": (
        _set_l1_entry(lambda b: COPIED | _u64(b, 48)),
        ImageCorruptError,
        "overlaps",
        False,
    ),
    "compressed past eof": (_set_l2_entry(lambda b: 1 << 62 | (1 << 38) - 512), ImageCorruptError, "outside", False),
}


def _make_image(tmp_path: Path) -> Path:
    path = create(tmp_path / "img.qcow2", 4 * MIB)
    qemu_io(path, "write -P 0x5a 0 128k")
    return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_corrupt_image_refused_and_unchanged(tmp_path: Path, name: str) -> None:
    patch, error, fragment, at_open = CASES[name]
    path = _make_image(tmp_path)
    buf = bytearray(path.read_bytes())
    patch(buf)
    path.write_bytes(bytes(buf))
    before = path.read_bytes()
    for read_only in (True, False):
        with pytest.raises(error, match=fragment) as info:
            image = Qcow2Image.open(str(path), read_only=read_only)
            try:
                read_all(image)
                image.write(0, [b"x" * 4 * KIB])
            finally:
                if not at_open or read_only:
                    image.close()
        message = str(info.value)
        assert "\n" not in message and message.startswith(str(path))
        if at_open:
            assert info.traceback[-1].name not in ("readinto", "write")
    assert path.read_bytes() == before


def test_v2_zero_flag_is_corruption(tmp_path: Path) -> None:
    path = create(tmp_path / "v2.qcow2", 4 * MIB, "compat=0.10")
    qemu_io(path, "write -P 1 0 64k")
    buf = bytearray(path.read_bytes())
    struct.pack_into(">Q", buf, _l2_offset(buf) + 8, 1)  # bit 0: zero flag, reserved in v2
    path.write_bytes(bytes(buf))
    with Qcow2Image.open(str(path), read_only=True) as image:
        with pytest.raises(ImageCorruptError, match="version 2"):
            read_all(image)
    assert path.read_bytes() == bytes(buf)


def test_truncated_header(tmp_path: Path) -> None:
    path = _make_image(tmp_path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ImageCorruptError, match="truncated"):
        Qcow2Image.open(str(path))
    with pytest.raises(ImageCorruptError):
        open_disk(str(path))  # probed as qcow2 by its magic
    assert len(path.read_bytes()) == 50


def test_corrupt_bit_allows_reading_only(tmp_path: Path) -> None:
    path = _make_image(tmp_path)
    buf = bytearray(path.read_bytes())
    struct.pack_into(">Q", buf, 72, 2)
    path.write_bytes(bytes(buf))
    with pytest.raises(ImageCorruptError, match="marked corrupt"):
        Qcow2Image.open(str(path))
    with Qcow2Image.open(str(path), read_only=True) as image:
        assert image.corrupt
        assert read_all(image)[:4] == b"\x5a" * 4
    assert path.read_bytes() == bytes(buf)


def test_exit_status_is_documented(tmp_path: Path) -> None:
    path = _make_image(tmp_path)
    path.write_bytes(b"QFI\xfb" + bytes(100))
    with pytest.raises(ImageError) as info:
        Qcow2Image.open(str(path))
    assert info.value.exit_status == ImageError.exit_status
