"""Throwaway disks without a VM: `--disk` parsing, DiskSession overlays, their reuse and removal."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import pytest

from hypervisor.block.open import open_disk
from hypervisor.disk_overlays import DiskSession
from hypervisor.disk_spec import DiskSpec, parse_disk_spec
from hypervisor.errors import ConfigError, ImageLockedError
from hypervisor.faults import FaultRule

MiB = 1 << 20
needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img (qemu-utils) is not installed")


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_disk_spec_snapshot_and_overlay() -> None:
    assert parse_disk_spec("base.qcow2,snapshot=on").snapshot
    spec = parse_disk_spec("base.raw,overlay=run.qcow2,serial=x")
    assert spec.overlay == "run.qcow2" and spec.throwaway and spec.serial == "x"
    assert DiskSpec("a").with_snapshot().snapshot
    assert not DiskSpec("a", read_only=True).with_snapshot().snapshot  # read-only: nothing to keep apart


@pytest.mark.parametrize(
    "text,message",
    [
        ("b,snapshot=maybe", "snapshot must be on or off"),
        ("b,snapshot=on,overlay=o", "exclude each other"),
        ("b,readonly=on,snapshot=on", "read-only disk is never written"),
        ("b,overlay=", "overlay= needs a file name"),
    ],
)
def test_bad_disk_specs(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_disk_spec(text)


def write_through(session: DiskSession, data: bytes) -> None:
    """What a guest's write does: the overlay the machine would open, written and flushed."""
    backend = open_disk(session.specs()[0].path, "qcow2")
    try:
        backend.write(0, [data])
        backend.flush()
    finally:
        backend.close()


@pytest.mark.parametrize("base_format", ["raw", "qcow2"])
def test_a_temporary_overlay_leaves_the_base_alone_and_is_removed(tmp_path, base_format: str) -> None:
    base = tmp_path / f"base.{base_format}"
    if base_format == "raw":
        base.write_bytes(b"\x11" * MiB)
    else:
        if shutil.which("qemu-img") is None:
            pytest.skip("qemu-img (qemu-utils) is not installed")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    before = sha256(base)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with DiskSession([parse_disk_spec(f"{base},snapshot=on")], temporary_dir=scratch) as session:
        overlay = session.specs()[0].path
        assert os.path.dirname(os.path.dirname(overlay)) == str(scratch)
        write_through(session, b"\xee" * 4096)
        # Another run shares the base meanwhile: the overlay holds it open read-only, shared.
        with DiskSession([parse_disk_spec(f"{base},snapshot=on")], temporary_dir=scratch) as second:
            assert second.specs()[0].path != overlay
        running = open_disk(overlay, "qcow2")  # as the machine holds it: the base opened read-only, shared
        try:
            open_disk(str(base), base_format, read_only=True).close()  # another reader is welcome
            with pytest.raises(ImageLockedError):
                open_disk(str(base), base_format, read_only=False).close()  # a writer is refused
        finally:
            running.close()
        assert session.report()["disks"]["vda"]["overlay_kind"] == "temporary"  # type: ignore[index]
    assert sha256(base) == before
    assert os.listdir(scratch) == []  # nothing left behind


def test_the_overlay_goes_on_an_error_too(tmp_path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MiB))
    (tmp_path / "t").mkdir()
    with pytest.raises(RuntimeError):
        with DiskSession([parse_disk_spec(f"{base},snapshot=on")], temporary_dir=tmp_path / "t") as session:
            assert os.path.exists(session.specs()[0].path)
            raise RuntimeError("the run failed")
    assert os.listdir(tmp_path / "t") == []


@needs_qemu_img
def test_a_kept_overlay_passes_qemu_img_check_and_is_used_again(tmp_path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MiB))
    overlay = tmp_path / "kept.qcow2"
    spec = parse_disk_spec(f"{base},overlay={overlay}")
    with DiskSession([spec]) as session:
        write_through(session, b"\x5a" * 4096)
    subprocess.run(["qemu-img", "check", "-q", str(overlay)], check=True)
    info = subprocess.run(["qemu-img", "info", str(overlay)], check=True, capture_output=True, text=True)
    assert str(base) in info.stdout
    with DiskSession([spec]) as again:  # the same overlay continues: its data is still there
        assert again.disks[0].reused
        backend = open_disk(str(overlay), "qcow2", read_only=True)
        buffer = bytearray(4096)
        backend.readinto(0, [memoryview(buffer)])
        backend.close()
        assert buffer == b"\x5a" * 4096
    assert base.read_bytes() == bytes(MiB)


def test_an_existing_file_that_is_not_an_overlay_of_the_base_is_refused(tmp_path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MiB))
    other = tmp_path / "notes.txt"
    other.write_text("precious")
    with pytest.raises(ConfigError, match="not a qcow2 overlay of"):
        DiskSession([parse_disk_spec(f"{base},overlay={other}")]).__enter__()
    assert other.read_text() == "precious"
    with pytest.raises(ConfigError, match="names the base image itself"):
        DiskSession([parse_disk_spec(f"{base},overlay={base}")]).__enter__()


def test_missing_bases_and_unknown_fault_disks(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist|no such file"):
        DiskSession([parse_disk_spec(f"{tmp_path}/missing.raw,snapshot=on")], temporary_dir=tmp_path).__enter__()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ConfigError, match="--fault names vdb, but this run has vda"):
        DiskSession([DiskSpec(str(tmp_path / "x"))], faults=[FaultRule("vdb", "write")])
