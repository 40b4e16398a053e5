"""The bundled Linux guest with virtio-blk root disks made by mke2fs (slow: Linux boots).

The default initramfs mounts `--root /dev/vda` and switch_roots into the disk's /sbin/init when
it has one, otherwise it says why and carries on. The disk's init here is a busybox script that
writes a file, remounts the root read-only (so the file system is clean) and reboots.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hypervisor.guest_images import default_guest

pytestmark = [pytest.mark.slow, pytest.mark.kvm, pytest.mark.timeout(1100)]

ROOT = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 900
DISK_MIB = 16
BUSYBOX = Path("/bin/busybox")
DISK_INIT = """#!/bin/busybox sh
/bin/busybox echo "rootfs init: running from the virtio disk"
/bin/busybox echo "written by the guest" > /written-by-guest
/bin/busybox sync
/bin/busybox mount -o remount,ro /
/bin/busybox echo "rootfs init: done"
/bin/busybox reboot -f
"""


def require(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    try:
        default_guest()
    except Exception as error:
        pytest.skip(f"the bundled guest is not built: {error}")


def make_ext4(path: Path, tmp_path: Path, with_init: bool) -> None:
    tree = tmp_path / "tree"
    (tree / "sbin").mkdir(parents=True)
    (tree / "hello.txt").write_text("hello from the host\n")
    if with_init:
        if not BUSYBOX.exists():
            pytest.skip("busybox-static is not installed (its /bin/busybox runs the disk's init)")
        (tree / "bin").mkdir()
        shutil.copy(BUSYBOX, tree / "bin" / "busybox")
        init = tree / "sbin" / "init"
        init.write_text(DISK_INIT)
        init.chmod(0o755)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(path), f"{DISK_MIB}M"], check=True)


def boot(*arguments: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "hypervisor", "run", "--timeout", str(BOOT_TIMEOUT), "--root", "/dev/vda"]
    command += arguments
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=BOOT_TIMEOUT + 60, cwd=ROOT)


def assert_probed_and_mounted(output: str) -> None:
    sectors = DISK_MIB * 1024 * 1024 // 512
    assert f"[vda] {sectors} 512-byte logical blocks" in output, output[-3000:]
    assert "EXT4-fs (vda): mounted filesystem" in output


def e2fsck_clean(path: Path) -> None:
    result = subprocess.run(["e2fsck", "-fn", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def read_guest_file(image: Path) -> str:
    result = subprocess.run(["debugfs", "-R", "cat /written-by-guest", str(image)], capture_output=True, text=True)
    return result.stdout


def test_raw_root_disk_is_written_by_the_guest(tmp_path: Path) -> None:
    require("mke2fs", "e2fsck", "debugfs")
    image = tmp_path / "rootfs.img"
    make_ext4(image, tmp_path, with_init=True)
    result = boot("--disk", f"{image},format=raw", "--append", "rw")
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-3000:]
    assert_probed_and_mounted(result.stdout)
    assert "switching root to /dev/vda (ext4, rw)" in result.stdout
    assert "rootfs init: done" in result.stdout
    e2fsck_clean(image)
    assert read_guest_file(image).strip() == "written by the guest"


def test_qcow2_root_disk_is_written_by_the_guest(tmp_path: Path) -> None:
    require("mke2fs", "e2fsck", "debugfs", "qemu-img")
    raw = tmp_path / "rootfs.img"
    make_ext4(raw, tmp_path, with_init=True)
    image = tmp_path / "rootfs.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(image)], check=True)
    result = boot("--disk", str(image), "--append", "rw")  # format probed
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-3000:]
    assert_probed_and_mounted(result.stdout)
    assert "rootfs init: done" in result.stdout
    subprocess.run(["qemu-img", "check", str(image)], check=True, capture_output=True)
    back = tmp_path / "back.img"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(back)], check=True)
    e2fsck_clean(back)
    assert read_guest_file(back).strip() == "written by the guest"


def test_read_only_disk_is_mounted_read_only_and_unchanged(tmp_path: Path) -> None:
    require("mke2fs", "e2fsck")
    image = tmp_path / "rootfs.img"
    make_ext4(image, tmp_path, with_init=False)
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    # No init on the disk: the initramfs says so, unmounts it and runs its shell, which reads
    # the host's file from the disk mounted by hand (read-only), then exits.
    script = "mkdir -p /m; mount -o ro /dev/vda /m && cat /m/hello.txt; echo > /m/new || echo write refused; exit\n"
    result = boot("--disk", f"{image},readonly=on", stdin=script)
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-3000:]
    assert_probed_and_mounted(result.stdout)
    assert "no executable /sbin/init /init on it" in result.stdout
    assert "hello from the host" in result.stdout
    assert "write refused" in result.stdout
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
    e2fsck_clean(image)


def test_an_injected_write_error_reaches_ext4_and_the_run_keeps_its_verdict(tmp_path: Path) -> None:
    """docs/ci.md's fault injection on a real file system: the 3rd write request after the mount
    fails; the guest's kernel logs the I/O error, the command sees it, and the run still ends in
    the command's own status with the fault in the report. The base image is never written."""
    require("mke2fs", "e2fsck")
    import json

    image = tmp_path / "data.img"
    make_ext4(image, tmp_path, with_init=False)
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    report = tmp_path / "report.json"
    # Each file is written and synced on its own, so the writes reach the disk one by one.
    script = ("mkdir -p /m && mount /dev/vda /m && for i in 1 2 3 4 5 6; do echo data$i > /m/f$i && sync; done; "
              "echo writes done; exit 0")  # fmt: skip
    command = [sys.executable, "-m", "hypervisor", "run", "--timeout", str(BOOT_TIMEOUT), "--report", str(report),
               "--disk", f"{image},format=raw,snapshot=on", "--append", f'pyhv.cmd="{script}"',
               "--fault", "vda:write:3:eio,after=EXT4-fs (vda): mounted filesystem"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=BOOT_TIMEOUT + 60, cwd=ROOT)
    output = result.stdout
    assert "EXT4-fs (vda): mounted filesystem" in output, result.stderr[-2000:] + output[-3000:]
    assert "I/O error, dev vda" in output, output[-3000:]
    assert "writes done" in output
    assert result.returncode == 0, result.stderr[-2000:] + output[-3000:]  # the command's status, not a timeout
    summary = json.loads(report.read_text())
    faults = summary["faults"]
    assert [(fault["disk"], fault["operation"], fault["action"]) for fault in faults["injected"]] == [
        ("vda", "write", "eio")
    ]
    assert summary["outcome_class"] == "verdict", summary["outcome"]
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
    e2fsck_clean(image)
