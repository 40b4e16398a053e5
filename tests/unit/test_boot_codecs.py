"""Every codec Linux may compress a bzImage payload with, built by the host's own tools the way
the kernel's build does (scripts/Makefile.lib: `gzip -n -9`, `bzip2 -9`, `lzma -9`, xz through
scripts/xz_wrap.sh, `lzop -9`, `lz4 -l -9`, `zstd -22 --ultra`, each but gzip followed by
`size_append`), unpacked on the host and compared byte for byte; truncated, corrupted and
oversized payloads end in one-line BootErrors.

The tools come from Debian packages gzip, bzip2, xz-utils (xz and lzma), lzop, lz4 and zstd;
a test whose tool is missing is skipped with the package to install.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from hypervisor.boot.linux import prepare_linux
from hypervisor.boot.payload import CODECS, declared_size, payload_codec, unpack_payload
from hypervisor.errors import BootError
from tests.unit.test_boot_fixtures import ElfSegment, ElfSpec, MiB, make_bzimage, make_elf, new_guest

# Like a kernel: code-like repetitive bytes, some incompressible data, a bss.
_random = random.Random(12)
TEXT = (bytes(range(256)) * 700 + _random.randbytes(150_000) + b"\x90\x48\x89\xe5" * 60_000)[:700_000]
VMLINUX = make_elf(ElfSpec(entry=0x1000000, segments=[
    ElfSegment(0x1000000, TEXT, memory_size=len(TEXT) + 0x10000, vaddr=0xFFFFFFFF81000000)]))  # fmt: skip

# codec: (command, Debian package, Python package needed to unpack it or None)
TOOLS: dict[str, tuple[list[str], str, str | None]] = {
    "gzip": (["gzip", "-n", "-9", "-c"], "gzip", None),
    "bzip2": (["bzip2", "-9", "-c"], "bzip2", None),
    "lzma": (["lzma", "-9", "-c"], "xz-utils", None),
    # scripts/xz_wrap.sh for x86: the x86 BCJ filter, CRC32 (the kernel's XZ decoder has no CRC64)
    "xz": (["xz", "--check=crc32", "--x86", "--lzma2=,dict=32MiB", "-c"], "xz-utils", None),
    "lzo": (["lzop", "-9", "-c"], "lzop", "lzokay"),
    "lz4": (["lz4", "-l", "-9", "-c"], "lz4", "lz4"),
    "zstd": (["zstd", "-22", "--ultra", "-c", "-q"], "zstd", None),
}
# Codecs whose streams carry a checksum of the data: any flipped byte is detected. The LZ4
# legacy frame and the legacy .lzma format have none, so only structural damage is detectable.
CHECKSUMMED = {"gzip", "bzip2", "xz", "lzo", "zstd"}


def size_append(data: bytes, size: int) -> bytes:
    return data + struct.pack("<I", size)


def compress(codec: str, data: bytes) -> bytes:
    """`data` compressed by the host's tool and wrapped as Linux's build wraps it."""
    command, package, module = TOOLS[codec]
    if shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} is not installed (Debian package {package})")
    if module is not None and importlib.util.find_spec(module) is None:
        pytest.skip(f"the Python package {module} is not installed (pip install {module})")
    packed = subprocess.run(command, input=data, capture_output=True, check=True).stdout
    return packed if codec == "gzip" else size_append(packed, len(data))


def test_every_codec_linux_has_is_known():
    assert sorted(codec.name for codec in CODECS) == sorted(TOOLS)


@pytest.mark.parametrize("codec", sorted(TOOLS))
def test_unpacks_what_the_host_tool_packed(codec):
    payload = compress(codec, VMLINUX)
    assert payload_codec(payload) == codec
    assert declared_size(payload) == len(VMLINUX)
    assert unpack_payload(payload, 64 * MiB) == (codec, VMLINUX)


@pytest.mark.parametrize("codec", sorted(TOOLS))
def test_bzimage_boots_its_unpacked_vmlinux(codec):
    image = make_bzimage(payload=compress(codec, VMLINUX))
    with new_guest(64 * MiB) as (guest, memory):
        boot = prepare_linux(memory, guest, image, "console=ttyS0")
        assert boot.source == f"bzImage ({codec} payload unpacked on the host)"
        assert boot.entry.rip == 0x1000000
        assert memory.read(0x1000000, len(TEXT)) == TEXT
        assert memory.read(0x1000000 + len(TEXT), 0x10000) == bytes(0x10000)  # the bss


def one_line_boot_error(action: Callable[[], object]) -> str:
    with pytest.raises(BootError) as caught:
        action()
    message = str(caught.value)
    assert "\n" not in message and message.startswith("the kernel's ")
    return message


@pytest.mark.parametrize("codec", sorted(TOOLS))
@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_payload(codec, keep):
    payload = compress(codec, VMLINUX)
    stream = payload if codec == "gzip" else payload[:-4]
    cut = stream[: int(len(stream) * keep)]
    # Truncated as a file would be (size trailer lost too) and with the trailer kept.
    for damaged in (cut, size_append(cut, len(VMLINUX))):
        message = one_line_boot_error(lambda: unpack_payload(damaged, 64 * MiB))  # noqa: B023
        assert codec in message


@pytest.mark.parametrize("codec", sorted(CHECKSUMMED))
def test_any_flipped_byte_is_detected(codec):
    payload = compress(codec, VMLINUX)
    rng = random.Random(codec)
    end = len(payload) - 8  # not the trailers, which other tests change
    for _ in range(5):
        damaged = bytearray(payload)
        damaged[rng.randrange(len(damaged) // 4, end)] ^= 1 << rng.randrange(8)
        one_line_boot_error(lambda: unpack_payload(bytes(damaged), 64 * MiB))  # noqa: B023


@pytest.mark.parametrize("codec", sorted(TOOLS))
def test_garbage_in_the_stream(codec):
    payload = bytearray(compress(codec, VMLINUX))
    middle = len(payload) // 3
    payload[middle : middle + 64] = b"\xff" * 64
    payload[40:48] = b"\x00\xff" * 4  # also early: headers, first block sizes
    result: object
    try:
        result = unpack_payload(bytes(payload), 64 * MiB)
    except BootError as error:
        assert "\n" not in str(error)
        return
    # Only formats without checksums can decode damage; the size must still be the declared one.
    assert codec not in CHECKSUMMED
    assert isinstance(result, tuple) and len(result[1]) == len(VMLINUX)


@pytest.mark.parametrize("codec", sorted(TOOLS))
def test_declared_size_beyond_guest_ram_is_refused_before_unpacking(codec):
    payload = compress(codec, VMLINUX)
    message = one_line_boot_error(lambda: unpack_payload(payload, len(VMLINUX) - 1))
    assert "more than the guest's" in message


@pytest.mark.parametrize("codec", sorted(TOOLS))
def test_stream_longer_than_its_trailer_says(codec):
    """A decompression bomb: the stream unpacks to more than the size it declares."""
    big = VMLINUX + bytes(4 * MiB)
    payload = compress(codec, big)
    stream = payload if codec == "gzip" else payload[:-4]
    if codec == "gzip":
        stream = stream[:-4]  # gzip's own ISIZE trailer is the declared size: lie in it
    lying = size_append(stream, len(VMLINUX))
    message = one_line_boot_error(lambda: unpack_payload(lying, 64 * MiB))
    assert "corrupt" in message or "truncated" in message


@pytest.mark.parametrize("codec", sorted(TOOLS))
def test_stream_shorter_than_its_trailer_says(codec):
    payload = compress(codec, VMLINUX)
    stream = payload[:-4]
    one_line_boot_error(lambda: unpack_payload(size_append(stream, len(VMLINUX) + 4096), 64 * MiB))


def test_lz4_legacy_frame_of_several_blocks():
    data = VMLINUX + bytes(range(256)) * (36 * 1024)  # more than one 8 MiB legacy block
    payload = compress("lz4", data)
    assert unpack_payload(payload, 64 * MiB) == ("lz4", data)
    blocks = payload[4:]
    (first_block,) = struct.unpack_from("<I", blocks)
    assert 4 + first_block < len(blocks) - 4  # the frame really has a second block


def make_lzop(blocks: list[tuple[int, bytes]], flags: int = 0) -> bytes:
    """A minimal lzop file (lzop 1.04 layout, version 0x1040) with no checksums: each block is
    (dst_len, data), stored when len(data) == dst_len."""
    fields = struct.pack(">HHHBBIIIIB", 0x1040, 0x20A0, 0x0940, 1, 5, flags, 0o100644, 0, 0, 0)
    out = b"\x89LZO\x00\r\n\x1a\n" + fields + struct.pack(">I", zlib.adler32(fields))
    for dst_len, data in blocks:
        out += struct.pack(">II", dst_len, len(data)) + data
    return out + struct.pack(">I", 0)


def test_lzo_crc32_checksums():
    packed = size_append(subprocess.run(["lzop", "-9", "--crc32", "-c"], input=VMLINUX, capture_output=True,
                                        check=True).stdout, len(VMLINUX)) if shutil.which("lzop") else None  # fmt: skip
    if packed is None:
        pytest.skip("lzop is not installed (Debian package lzop)")
    pytest.importorskip("lzokay")
    assert unpack_payload(packed, 64 * MiB) == ("lzo", VMLINUX)
    damaged = bytearray(packed)
    damaged[len(damaged) // 2] ^= 0x10
    one_line_boot_error(lambda: unpack_payload(bytes(damaged), 64 * MiB))


def test_lzo_blocks_without_checksums():
    """Without data checksums a block that unpacks short is still caught (Linux compares lengths)."""
    lzokay = pytest.importorskip("lzokay")
    first, second = TEXT[:300_000], TEXT[300_000:]
    blocks = [(len(first), lzokay.compress(first)), (len(second), second)]  # the second one stored
    payload = size_append(make_lzop(blocks), len(TEXT))
    assert unpack_payload(payload, 64 * MiB) == ("lzo", TEXT)
    short = size_append(make_lzop([(len(first) + 100, lzokay.compress(first))]), len(first) + 100)
    message = one_line_boot_error(lambda: unpack_payload(short, 64 * MiB))
    assert "fewer than" in message
    longer = size_append(make_lzop([(len(first) - 100, lzokay.compress(first))]), len(first) - 100)
    assert "more than" in one_line_boot_error(lambda: unpack_payload(longer, 64 * MiB))


@pytest.mark.parametrize("flags,reason", [(0x800, "filter"), (0x400, "multi-part")])
def test_lzop_features_linux_does_not_have(flags, reason):
    pytest.importorskip("lzokay")
    payload = size_append(make_lzop([(4, b"abcd")], flags), 4)
    assert reason in one_line_boot_error(lambda: unpack_payload(payload, 64 * MiB))


def test_lzop_header_checksum():
    pytest.importorskip("lzokay")
    payload = bytearray(size_append(make_lzop([(4, b"abcd")]), 4))
    payload[20] ^= 1  # inside the mode field
    assert "header checksum" in one_line_boot_error(lambda: unpack_payload(bytes(payload), 64 * MiB))


def test_zstd_frame_declaring_a_huge_content_size():
    """A frame header may state its size; a bomb's stated size is refused before any buffer."""
    zstandard = pytest.importorskip("zstandard")
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(VMLINUX)
    assert zstandard.get_frame_parameters(frame).content_size == len(VMLINUX)
    message = one_line_boot_error(lambda: unpack_payload(size_append(frame, 4096), 64 * MiB))
    assert "declares" in message


def test_missing_optional_library_leaves_the_payload_to_the_guest(monkeypatch, caplog):
    payload = compress("lz4", VMLINUX)
    monkeypatch.setitem(__import__("sys").modules, "lz4.block", None)  # import fails
    monkeypatch.setitem(__import__("sys").modules, "lz4", None)
    assert unpack_payload(payload, 64 * MiB) is None
    assert "pip install lz4" in caplog.text


KERNEL_ENV = "PYHV_DEBIAN_KERNEL"


@pytest.mark.skipif(not os.environ.get(KERNEL_ENV), reason=f"{KERNEL_ENV} does not name a Debian vmlinuz "
                    "(apt-get download linux-image-6.1.0-*-cloud-amd64; dpkg-deb -x; boot/vmlinuz-*)")  # fmt: skip
def test_a_real_debian_kernel_payload():
    image = Path(os.environ[KERNEL_ENV]).read_bytes()
    with new_guest(256 * MiB) as (guest, memory):
        boot = prepare_linux(memory, guest, image, "console=ttyS0")
        assert boot.source.startswith("bzImage (") and boot.source.endswith(" payload unpacked on the host)")
        assert boot.protocol == "linux-64"
        assert memory.read(boot.entry.rip, 1) != b"\0"


@pytest.mark.parametrize("codec", sorted(TOOLS))
def test_random_damage_never_escapes_as_another_error(codec):
    """Bytes changed, inserted, deleted or cut off: a one-line BootError, None (the magic itself
    was hit, so the codec is unknown and the guest decides), or content of the declared size."""
    data = VMLINUX[:100_000]
    payload = compress(codec, data)
    rng = random.Random(f"damage-{codec}")
    for _ in range(150):
        damaged = bytearray(payload)
        position = rng.randrange(len(damaged))
        kind = rng.randrange(4)
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        elif kind == 1:
            del damaged[position:]
        elif kind == 2:
            damaged[position:position] = rng.randbytes(rng.randint(1, 50))
        else:
            del damaged[position : position + rng.randint(1, 50)]
        try:
            result = unpack_payload(bytes(damaged), 8 * MiB)
        except BootError as error:
            assert "\n" not in str(error)
            continue
        if result is not None:
            assert len(result[1]) == declared_size(bytes(damaged)), codec
            assert result[1] == data or codec not in CHECKSUMMED
