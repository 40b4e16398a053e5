"""check.py against the oracle: same numbers as `qemu-img check --output=json` on clean, leaky and
corrupted images; repairs leave images that qemu-img finds clean, with unchanged contents."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from hypervisor.block.qcow2.check import check_image
from hypervisor.errors import ConfigError, ImageError

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img/qemu-io (qemu-utils) not installed",
)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=False)


def make(path: Path, size: str = "64M", options: str = "", *io_commands: str) -> Path:
    create = ["qemu-img", "create", "-q", "-f", "qcow2"] + (["-o", options] if options else [])
    assert run(*create, str(path), size).returncode == 0
    if io_commands:
        args = ["qemu-io"]
        for command in io_commands:
            args += ["-c", command]
        result = run(*args, str(path))
        assert result.returncode == 0 and "error" not in result.stdout.lower(), result.stdout + result.stderr
    return path


def qemu_check(path: Path) -> tuple[int, dict]:
    result = run("qemu-img", "check", "--output=json", str(path))
    return result.returncode, json.loads(result.stdout)


def be64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def refcount_block_offset(path: Path) -> int:
    return be64(path, be64(path, 48))  # header refcount_table_offset -> first table entry


def first_data_offset(path: Path) -> int:
    l1 = be64(path, 40)
    l2 = be64(path, l1) & 0x00FF_FFFF_FFFF_FE00
    return be64(path, l2) & 0x00FF_FFFF_FFFF_FE00


def set_refcount16(path: Path, cluster: int, value: int) -> None:
    poke(path, refcount_block_offset(path) + 2 * cluster, struct.pack(">H", value))


IMAGES = {
    "empty": ("64M", "", ()),
    "data": ("64M", "", ("write -P 1 0 200k", "write -c -P 2 1M 64k", "write -z 2M 64k")),
    "refcount1": ("8M", "cluster_size=4096,refcount_bits=1", ("write -P 1 0 100k",)),
    "refcount64_512": ("8M", "cluster_size=512,refcount_bits=64", ("write -P 1 0 100k", "write -c -P 3 1M 4k")),
    "v2": ("64M", "compat=0.10", ("write -P 1 0 200k",)),
    "extended_l2": (
        "64M",
        "extended_l2=on,cluster_size=32k",
        ("write -P 1 0 5k", "write -z 100k 4k", "write -c -P 1 1M 32k"),
    ),
    "zstd": ("64M", "compression_type=zstd", ("write -c -P 1 0 192k",)),
    "lazy": ("64M", "lazy_refcounts=on", ("write -P 1 0 200k",)),
    "prealloc": ("16M", "preallocation=metadata", ()),
    "odd_size": ("1000k", "cluster_size=4096", ("write -P 7 0 1000k",)),
}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_clean_images_report_what_qemu_img_reports(tmp_path: Path, name: str) -> None:
    size, options, commands = IMAGES[name]
    path = make(tmp_path / f"{name}.qcow2", size, options, *commands)
    status, expected = qemu_check(path)
    result = check_image(str(path))
    assert (result.exit_status, result.to_json()) == (status, expected)
    assert status == 0


def test_snapshots_and_shared_clusters(tmp_path: Path) -> None:
    path = make(tmp_path / "snap.qcow2", "64M", "refcount_bits=4", "write -P 1 0 300k")
    assert run("qemu-img", "snapshot", "-c", "s1", str(path)).returncode == 0
    assert run("qemu-io", "-c", "write -P 2 64k 64k", "-c", "write -c -P 5 4M 64k", str(path)).returncode == 0
    assert run("qemu-img", "snapshot", "-c", "s2", str(path)).returncode == 0
    assert run("qemu-io", "-c", "write -P 3 0 64k", str(path)).returncode == 0
    status, expected = qemu_check(path)
    result = check_image(str(path))
    assert result.to_json() == expected and result.exit_status == status == 0


def test_v2_snapshot_table_without_trailing_padding(tmp_path: Path) -> None:
    path = make(tmp_path / "v2.qcow2", "64M", "compat=0.10", "write -P 1 0 200k")
    assert run("qemu-img", "snapshot", "-c", "s1", str(path)).returncode == 0
    assert check_image(str(path)).to_json() == qemu_check(path)[1]


def test_bitmaps_and_external_data_file_are_counted(tmp_path: Path) -> None:
    bitmap = make(tmp_path / "bm.qcow2")
    assert run("qemu-img", "bitmap", "--add", str(bitmap), "b0").returncode == 0
    assert run("qemu-io", "-c", "write -P 1 0 200k", str(bitmap)).returncode == 0
    assert check_image(str(bitmap)).to_json() == qemu_check(bitmap)[1]
    external = make(tmp_path / "ext.qcow2", "64M", f"data_file={tmp_path / 'ext.raw'}", "write -P 1 0 200k")
    assert check_image(str(external)).to_json() == qemu_check(external)[1]


def leaky_image(tmp_path: Path) -> Path:
    """Two clusters past the last used one get refcounts 1 and 2: leaks, as qemu-img sees them."""
    path = make(tmp_path / "leak.qcow2", "64M", "", "write -P 1 0 200k")
    clusters = path.stat().st_size // 65536
    with open(path, "r+b") as f:
        f.truncate((clusters + 2) * 65536)
    set_refcount16(path, clusters, 1)
    set_refcount16(path, clusters + 1, 2)
    return path


def corrupted_image(tmp_path: Path) -> Path:
    """The first data cluster's refcount is 0: it could be handed out again while in use."""
    path = make(tmp_path / "cor.qcow2", "64M", "", "write -P 1 0 200k")
    set_refcount16(path, first_data_offset(path) // 65536, 0)
    return path


def test_leaks_exit_3_with_qemu_numbers(tmp_path: Path) -> None:
    path = leaky_image(tmp_path)
    status, expected = qemu_check(path)
    result = check_image(str(path))
    assert status == 3 and result.exit_status == 3
    assert result.to_json() == expected
    assert any(line.startswith("Leaked cluster") for line in result.messages)


def test_corruptions_exit_2_with_qemu_numbers(tmp_path: Path) -> None:
    path = corrupted_image(tmp_path)
    status, expected = qemu_check(path)
    result = check_image(str(path))
    assert status == 2 and result.exit_status == 2
    assert result.to_json() == expected
    assert any(line.startswith("ERROR cluster") for line in result.messages)


@pytest.mark.parametrize("mode", ["leaks", "all"])
def test_repairing_leaks_keeps_contents(tmp_path: Path, mode: str) -> None:
    path = leaky_image(tmp_path)
    twin = tmp_path / "twin.qcow2"
    shutil.copy(path, twin)
    result = check_image(str(path), repair=mode)
    assert result.leaks_fixed == 2 and result.exit_status == 0
    assert qemu_check(path)[0] == 0
    assert run("qemu-img", "compare", str(path), str(twin)).returncode == 0


def test_repair_all_rebuilds_refcounts_of_a_corrupted_image(tmp_path: Path) -> None:
    path = corrupted_image(tmp_path)
    twin = tmp_path / "twin.raw"
    assert run("qemu-img", "convert", "-O", "raw", str(path), str(twin)).returncode == 0
    result = check_image(str(path), repair="all")
    assert result.exit_status == 0 and result.corruptions_fixed >= 1
    status, report = qemu_check(path)
    assert status == 0, report
    assert run("qemu-img", "compare", str(path), str(twin)).returncode == 0
    # The image stays writable and consistent afterwards.
    assert run("qemu-io", "-c", "write -P 9 4M 1M", str(path)).returncode == 0
    assert qemu_check(path)[0] == 0


def test_repair_leaks_does_not_hide_corruptions(tmp_path: Path) -> None:
    path = corrupted_image(tmp_path)
    result = check_image(str(path), repair="leaks")
    assert result.exit_status == 2 and result.corruptions


def test_repair_all_clears_the_dirty_bit(tmp_path: Path) -> None:
    path = leaky_image(tmp_path)
    incompatible = be64(path, 72)
    poke(path, 72, struct.pack(">Q", incompatible | 1))  # qcow2.rst: incompatible bit 0, dirty
    assert check_image(str(path)).exit_status == 3
    assert check_image(str(path), repair="all").exit_status == 0
    assert be64(path, 72) & 1 == 0
    assert qemu_check(path)[0] == 0


def test_copied_flag_mismatch_is_a_corruption_fixed_by_repair_all(tmp_path: Path) -> None:
    path = make(tmp_path / "copied.qcow2", "64M", "", "write -P 1 0 64k")
    l1 = be64(path, 40)
    l2 = be64(path, l1) & 0x00FF_FFFF_FFFF_FE00
    poke(path, l2, struct.pack(">Q", be64(path, l2) & ~(1 << 63)))  # clear COPIED on a refcount-1 cluster
    status, expected = qemu_check(path)
    result = check_image(str(path))
    assert status == result.exit_status == 2 and result.to_json() == expected
    assert check_image(str(path), repair="all").exit_status == 0
    assert be64(path, l2) >> 63 == 1
    assert qemu_check(path)[0] == 0


def test_l2_entry_past_the_end_of_the_file_is_a_corruption(tmp_path: Path) -> None:
    path = make(tmp_path / "past.qcow2", "64M", "", "write -P 1 0 64k")
    l1 = be64(path, 40)
    l2 = be64(path, l1) & 0x00FF_FFFF_FFFF_FE00
    poke(path, l2 + 8, struct.pack(">Q", (1 << 63) | (1 << 40)))  # second entry: 1 TiB into the file
    result = check_image(str(path))
    assert result.exit_status == 2
    assert result.corruptions >= 1


def test_unusable_images_raise_image_errors(tmp_path: Path) -> None:
    not_qcow2 = tmp_path / "raw.img"
    not_qcow2.write_bytes(bytes(1 << 16))
    with pytest.raises(ImageError):
        check_image(str(not_qcow2))
    with pytest.raises(ImageError):
        check_image(str(tmp_path / "missing.qcow2"))
    with pytest.raises(ConfigError):
        check_image(str(not_qcow2), repair="everything")


def test_check_accepts_an_image_the_engine_holds_open(tmp_path: Path) -> None:
    from hypervisor.block.qcow2 import Qcow2Image

    path = make(tmp_path / "open.qcow2", "64M", "", "write -P 1 0 200k")
    image = Qcow2Image.open(str(path), read_only=True, allow_backing=False)
    try:
        result = check_image(image)
    finally:
        image.close()
    assert result.exit_status == 0 and result.to_json() == qemu_check(path)[1]


def test_a_crash_before_the_header_switch_leaves_the_old_refcounts_in_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hypervisor.block.qcow2 import check as check_module

    path = corrupted_image(tmp_path)
    before = qemu_check(path)
    real_pwrite = os.pwrite

    def crash_at_header_switch(fd: int, data: bytes, offset: int) -> int:
        if offset == check_module.HEADER_REFCOUNT_TABLE_OFFSET:
            raise OSError(errno.EIO, "simulated power loss")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(check_module.os, "pwrite", crash_at_header_switch)
    with pytest.raises(ImageError):
        check_image(str(path), repair="all")
    monkeypatch.undo()
    # The new table and blocks were written past the old end but nothing points at them yet:
    # the image is exactly as (in)consistent as before, and a second repair succeeds.
    assert qemu_check(path) == before
    assert check_image(str(path), repair="all").exit_status == 0
    assert qemu_check(path)[0] == 0
