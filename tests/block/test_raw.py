"""RawFile and open_disk: zero-copy I/O, sparse discard/zeroes, locking, one-line errors."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from hypervisor.block.backend import BlockBackend
from hypervisor.block.open import open_disk, probe_format
from hypervisor.block.raw import RawFile
from hypervisor.errors import ImageError, ImageLockedError

MIB = 1 << 20


@pytest.fixture
def raw_path(tmp_path):
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(4 * MIB)
    return str(path)


def test_read_write_into_caller_buffers(raw_path):
    disk = RawFile(raw_path)
    assert isinstance(disk, BlockBackend)
    assert disk.size == 4 * MIB
    disk.write(4096, [b"hello ", memoryview(b"world")])
    first, second = bytearray(3), bytearray(8)
    disk.readinto(4096, [memoryview(first), memoryview(second)])
    assert bytes(first + second) == b"hello world"
    disk.flush()
    disk.close()
    with open(raw_path, "rb") as f:
        f.seek(4096)
        assert f.read(11) == b"hello world"


def test_out_of_range_raises_value_error(raw_path):
    with RawFile(raw_path) as disk:
        with pytest.raises(ValueError):
            disk.readinto(4 * MIB - 1, [memoryview(bytearray(2))])
        with pytest.raises(ValueError):
            disk.write(4 * MIB, [b"x"])


def test_discard_and_write_zeroes_read_as_zero(raw_path):
    with RawFile(raw_path) as disk:
        disk.write(0, [b"\xff" * MIB])
        disk.write_zeroes(4096, 8192)
        disk.discard(65536, 65536)
        data = bytearray(MIB)
        disk.readinto(0, [memoryview(data)])
        assert data[:4096] == b"\xff" * 4096
        assert data[4096:12288] == bytes(8192)
        assert data[12288:16384] == b"\xff" * 4096
        # discard leaves contents unspecified; on tmpfs/ext4 the punched hole reads as zeros
        assert data[131072:] == b"\xff" * (MIB - 131072)


def test_read_only_refuses_writes(raw_path):
    with RawFile(raw_path, read_only=True) as disk:
        assert disk.read_only
        with pytest.raises(ImageError, match="read-only"):
            disk.write(0, [b"x"])
        with pytest.raises(ImageError):
            disk.write_zeroes(0, 512)
        with pytest.raises(ImageError):
            disk.discard(0, 512)


def test_second_writer_is_refused_reader_too(raw_path):
    with RawFile(raw_path):
        with pytest.raises(ImageLockedError, match="in use by another process \\(locked for writing\\)"):
            RawFile(raw_path)
        with pytest.raises(ImageLockedError):
            RawFile(raw_path, read_only=True)
    # released on close
    RawFile(raw_path).close()


def test_two_readers_share(raw_path):
    with RawFile(raw_path, read_only=True), RawFile(raw_path, read_only=True):
        with pytest.raises(ImageLockedError):
            RawFile(raw_path)


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io (qemu-utils) not installed")
def test_locks_are_seen_by_qemu(raw_path):
    with RawFile(raw_path):
        result = subprocess.run(["qemu-io", "-f", "raw", "-c", "read 0 512", raw_path], capture_output=True, text=True)
        assert result.returncode != 0
        assert "lock" in (result.stdout + result.stderr)


def test_open_disk_errors(tmp_path, raw_path):
    with pytest.raises(ImageError, match="no such file"):
        open_disk(str(tmp_path / "missing.img"))
    with pytest.raises(ImageError, match="is a directory"):
        open_disk(str(tmp_path))
    with pytest.raises(ImageError, match="unknown image format"):
        open_disk(raw_path, format="vmdk")
    with pytest.raises(ImageError, match="not a qcow2"):
        open_disk(raw_path, format="qcow2")
    if os.geteuid() != 0:
        os.chmod(raw_path, 0)
        with pytest.raises(ImageError, match="permission denied"):
            open_disk(raw_path)


def test_open_disk_probes_raw(raw_path):
    assert probe_format(raw_path) == "raw"
    disk = open_disk(raw_path, read_only=True)
    assert isinstance(disk, RawFile) and disk.read_only
    disk.close()


def test_start_writeback_is_a_harmless_hint(tmp_path) -> None:
    from hypervisor.block.raw import RawFile

    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(1 << 20))
    disk = RawFile(str(path))
    disk.write(4096, [b"x" * 4096])
    disk.start_writeback(0, 1 << 20)  # starts write-back; the data is unchanged
    disk.flush()
    disk.close()
    assert path.read_bytes()[4096:8192] == b"x" * 4096
