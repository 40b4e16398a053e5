"""Snapshots of machines with virtio disks, on real KVM, with the virtio_blk test guest: a disk is
frozen at the save (the run goes on in a new overlay), each restore gets a fresh overlay on the
frozen image, two restores at once do not see each other's writes, requests in flight at the save
complete after the restore, and a changed frozen image or a damaged disk record is refused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from hypervisor.boot.layout import virtio_mmio_window
from hypervisor.console import MemoryConsole
from hypervisor.disk_spec import DiskSpec
from hypervisor.errors import ConfigError
from hypervisor.machine import Machine
from hypervisor.virtio import mmio_registers as regs
from hypervisor.virtio.blk import VirtioBlock
from tests.guests.build import GUEST_BASE, with_parameters

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.kvm,
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img (qemu-utils) checks the overlays"),
]

MODE_FUNCTIONAL, MODE_RANDOM, MODE_READ_ONLY = 0, 2, 3
EXIT_CODE = 5
PATTERN_OFFSET, PATTERN_LENGTH = 3 * 512, 8 * 512
BASE_FILL = b"\xee"
DISK_BYTES = 1 << 20
WINDOW = virtio_mmio_window(0)
DRIVER_OK_STATUS = 0xF  # ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK: the guest's last init write


def pattern() -> bytes:
    """pattern_byte() of tests/guests/virtio_blk.c."""
    return bytes((i * 7 + (i >> 9) + 0x5A) & 0xFF for i in range(PATTERN_LENGTH))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def disk_content(image: Path, tmp_path: Path) -> bytes:
    """What a guest sees on `image` (through its backing chain), by qemu-img as the oracle."""
    flat = tmp_path / f"flat-{time.monotonic_ns()}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(flat)], check=True)
    try:
        return flat.read_bytes()
    finally:
        flat.unlink()


def qemu_img_check(image: Path) -> None:
    result = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def guest(guest_binary, mode: int, count: int = 0, depth: int = 1) -> bytes:
    return with_parameters(guest_binary("virtio_blk").read_bytes(), exit_code=EXIT_CODE, mode=mode, port=depth,
                           count=count)  # fmt: skip


def save_at_driver_ok(guest_binary, disk: DiskSpec, target: Path, mode: int = MODE_FUNCTIONAL) -> int:
    """Runs the guest to its DRIVER_OK write (an MMIO exit), saves there, lets it finish; returns
    the original run's exit status."""
    with Machine(16, console=MemoryConsole()) as machine:
        machine.attach_disks([disk])
        machine.load_raw_bytes(guest(guest_binary, mode), GUEST_BASE, "virtio_blk")
        stop_at = machine.break_on("mmio", address=WINDOW.gpa + regs.STATUS_OFFSET, is_write=True,
                                   data=DRIVER_OK_STATUS)  # fmt: skip
        machine.start()
        stop = machine.wait_for_stop(30)
        assert stop is not None and stop.breakpoint is stop_at, stop
        machine.delete_breakpoint(stop_at.id)
        machine.save(str(target))
        machine.resume()
        return machine.wait(60).exit_status


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A 1 MiB qcow2 disk that reads BASE_FILL everywhere."""
    raw = tmp_path / "fill.raw"
    raw.write_bytes(BASE_FILL * DISK_BYTES)
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(image)], check=True)
    raw.unlink()
    return image


@pytest.fixture
def saved(guest_binary, base: Path, tmp_path: Path) -> tuple[Path, Path, str]:
    """(snapshot, frozen image, its sha256): the functional guest saved just before its I/O."""
    snapshot = tmp_path / "snap"
    assert save_at_driver_ok(guest_binary, DiskSpec(str(base)), snapshot) == EXIT_CODE
    return snapshot, base, sha256(base)


def test_the_saved_disk_is_frozen_and_the_run_goes_on_in_an_overlay(saved, tmp_path: Path) -> None:
    snapshot, frozen, frozen_hash = saved
    header = json.loads((snapshot / "header.json").read_text())
    [record] = header["disks"]
    assert record["path"] == str(frozen.resolve()) and record["format"] == "qcow2" and not record["read_only"]
    assert record["virtual_size"] == DISK_BYTES
    # The original run wrote its pattern after the save: into the new overlay, not the frozen image.
    after = frozen.with_name(f"{frozen.name}.snap.vda.qcow2")
    qemu_img_check(after)
    assert disk_content(after, tmp_path)[PATTERN_OFFSET : PATTERN_OFFSET + PATTERN_LENGTH] == pattern()
    assert disk_content(frozen, tmp_path) == BASE_FILL * DISK_BYTES
    assert sha256(frozen) == frozen_hash


def test_two_restores_at_once_each_on_its_own_overlay(saved, tmp_path: Path) -> None:
    snapshot, frozen, frozen_hash = saved
    dirs = [tmp_path / "a", tmp_path / "b"]
    for folder in dirs:
        folder.mkdir()
    first = Machine.restore(str(snapshot), MemoryConsole(), disk_overlay=str(dirs[0]))
    second = Machine.restore(str(snapshot), MemoryConsole(), disk_overlay=str(dirs[1]))
    results: dict[str, int] = {}
    try:
        # The second stops at its first config read (before its write) while the first runs
        # through its whole write, flush and read-back.
        held = second.break_on("mmio", address=WINDOW.gpa + regs.CONFIG_OFFSET, is_write=False)
        second.start()
        stop = second.wait_for_stop(30)
        assert stop is not None and stop.breakpoint is held
        runner = threading.Thread(target=lambda: results.__setitem__("first", first.run(60).exit_status))
        runner.start()
        runner.join(90)
        assert results == {"first": EXIT_CODE}
        # What the first wrote is not on the second's disk, which still shows the frozen content.
        seen = bytearray(PATTERN_LENGTH)
        second.disks[0].transport.device.backend.readinto(PATTERN_OFFSET, [memoryview(seen)])
        assert bytes(seen) == BASE_FILL * PATTERN_LENGTH
        second.delete_breakpoint(held.id)
        second.resume()
        results["second"] = second.wait(60).exit_status
    finally:
        first.close()
        second.close()
    assert results == {"first": EXIT_CODE, "second": EXIT_CODE}
    for folder in dirs:
        overlay = folder / "vda.qcow2"
        qemu_img_check(overlay)
        content = disk_content(overlay, tmp_path)
        assert content[PATTERN_OFFSET : PATTERN_OFFSET + PATTERN_LENGTH] == pattern()
        assert content[:PATTERN_OFFSET] == BASE_FILL * PATTERN_OFFSET  # the rest comes from the frozen image
    assert sha256(frozen) == frozen_hash
    # The overlays are qcow2 files backed by the frozen image, holding only what each run wrote.
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(dirs[0] / "vda.qcow2")],
                                     capture_output=True, text=True, check=True).stdout)  # fmt: skip
    assert info["backing-filename"] == str(frozen.resolve())


def test_a_temporary_overlay_folder_goes_with_the_machine(saved) -> None:
    snapshot, frozen, frozen_hash = saved
    machine = Machine.restore(str(snapshot), MemoryConsole())
    folder = Path(machine.disks[0].spec.path).parent
    try:
        assert folder.is_dir() and machine.run(60).exit_status == EXIT_CODE
    finally:
        machine.close()
    assert not folder.exists()
    assert sha256(frozen) == frozen_hash


def test_requests_in_flight_at_the_save_complete_after_the_restore(guest_binary, tmp_path: Path) -> None:
    """Saved while the guest keeps 4 random reads in flight: the drain finishes what the I/O
    thread took, the ring positions go into the snapshot, and the restored guest gets every one
    of its remaining completions (a lost or repeated one would hang it or fail its checks)."""
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(4 << 20))
    snapshot = tmp_path / "snap"
    with Machine(16, console=MemoryConsole()) as machine:
        machine.attach_disks([DiskSpec(str(disk))])
        machine.load_raw_bytes(guest(guest_binary, MODE_RANDOM, count=200000, depth=4), GUEST_BASE, "virtio_blk")
        machine.start()
        # Saved once the reads are going (counted by virtio-blk's C path on this raw disk), long
        # before the last: at 300 000 requests a second the run lasts well over half a second.
        device = machine.disks[0].transport.device
        assert isinstance(device, VirtioBlock)
        deadline = time.monotonic() + 60
        while device.fast_requests < 100 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert not machine.control.stop_requested, "the guest finished before the save"
        machine.save(str(snapshot))
        assert machine.wait(120).exit_status == EXIT_CODE
    state = json.loads((snapshot / "state.json").read_text())
    ring = state["devices"]["vda"]["fields"]["queues"][0]["ring"]
    assert 0 < ring["next_used"] and ring["next_used"] == ring["next_avail"]  # drained: every taken one done
    with Machine.restore(str(snapshot), MemoryConsole(), disk_overlay=str(tmp_path)) as restored:
        assert restored.run(120).exit_status == EXIT_CODE
    qemu_img_check(tmp_path / "vda.qcow2")


def test_a_read_only_disk_is_frozen_as_it_is(guest_binary, tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\x42" * DISK_BYTES)
    before = sha256(disk)
    snapshot = tmp_path / "snap"
    assert save_at_driver_ok(guest_binary, DiskSpec(str(disk), read_only=True), snapshot, MODE_READ_ONLY) == EXIT_CODE
    assert json.loads((snapshot / "header.json").read_text())["disks"][0]["read_only"] is True
    assert sorted(path.name for path in tmp_path.iterdir()) == ["disk.raw", "snap"]  # no overlay made
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    with Machine.restore(str(snapshot), MemoryConsole(), disk_overlay=str(overlays)) as machine:
        assert machine.run(60).exit_status == EXIT_CODE  # the guest's write is still refused
    assert list(overlays.iterdir()) == [] and sha256(disk) == before


def _tree(*paths: Path) -> dict[str, str]:
    files = {}
    for path in paths:
        for item in sorted([path] if path.is_file() else path.rglob("*")):
            if item.is_file():
                files[str(item)] = f"{item.stat().st_mtime_ns}:{sha256(item)}"
    return files


@pytest.mark.parametrize("damage", ["changed-base", "touched-base", "missing-base", "relative-path", "no-disk-state",
                                    "disk-record-fields", "overlay-exists", "fifo-base", "below-damaged"])  # fmt: skip
def test_changed_bases_and_damaged_disk_records_are_refused(saved, tmp_path: Path, damage: str) -> None:
    snapshot, frozen, _ = saved
    header_path = snapshot / "header.json"
    header = json.loads(header_path.read_text())
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    if damage == "changed-base":
        subprocess.run(["qemu-io", "-c", "write -P 0x11 0 4096", str(frozen)], check=True, capture_output=True)
    elif damage == "touched-base":
        frozen.touch()
    elif damage == "missing-base":
        frozen.rename(tmp_path / "moved.qcow2")
    elif damage == "relative-path":
        header["disks"][0]["path"] = "disk.qcow2"
    elif damage == "no-disk-state":
        state = json.loads((snapshot / "state.json").read_text())
        del state["devices"]["vda"]
        (snapshot / "state.json").write_text(json.dumps(state))
        # keep the header's hash right: only the missing state is wrong
        header["parts"]["state.json"] = {"size": (snapshot / "state.json").stat().st_size,
                                         "sha256": sha256(snapshot / "state.json")}  # fmt: skip
    elif damage == "fifo-base":
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        header["disks"][0]["path"] = str(fifo)
    elif damage == "disk-record-fields":
        del header["disks"][0]["head_sha256"]
    elif damage == "below-damaged":
        header["disks"][0]["below"] = [{"path": "relative.qcow2", "size": 1, "mtime_ns": 1, "inode": 1,
                                        "head_sha256": "00"}]  # fmt: skip
    else:
        (overlays / "vda.qcow2").write_bytes(b"somebody else's")
    header_path.write_text(json.dumps(header))
    before = _tree(snapshot, overlays, *[path for path in tmp_path.glob("*.qcow2")])
    with pytest.raises(ConfigError) as error:
        Machine.restore(str(snapshot), MemoryConsole(), disk_overlay=str(overlays))
    message = str(error.value)
    assert "\n" not in message and (str(snapshot) in message or "vda.qcow2" in message), message
    assert _tree(snapshot, overlays, *[path for path in tmp_path.glob("*.qcow2")]) == before


def test_a_restored_machine_saved_again_chains_its_frozen_images(saved, tmp_path: Path) -> None:
    """Restore (overlays kept), stop before the write, save again: the restore's overlay is the
    second snapshot's frozen image, backed by the first one; restoring it runs the I/O."""
    snapshot, frozen, frozen_hash = saved
    first_overlays, second_overlays = tmp_path / "one", tmp_path / "two"
    first_overlays.mkdir()
    second_overlays.mkdir()
    again = tmp_path / "again"
    with Machine.restore(str(snapshot), MemoryConsole(), disk_overlay=str(first_overlays)) as machine:
        held = machine.break_on("mmio", address=WINDOW.gpa + regs.CONFIG_OFFSET, is_write=False)
        machine.start()
        stop = machine.wait_for_stop(30)
        assert stop is not None and stop.breakpoint is held
        machine.delete_breakpoint(held.id)
        machine.save(str(again))
        machine.resume()
        assert machine.wait(60).exit_status == EXIT_CODE
    [record] = json.loads((again / "header.json").read_text())["disks"]
    assert record["path"] == str((first_overlays / "vda.qcow2").resolve())
    # The first snapshot's frozen image is below the second's, and is recorded with its identity.
    assert [entry["path"] for entry in record["below"]] == [str(frozen.resolve())]
    with Machine.restore(str(again), MemoryConsole(), disk_overlay=str(second_overlays)) as machine:
        assert machine.run(60).exit_status == EXIT_CODE
    qemu_img_check(second_overlays / "vda.qcow2")
    content = disk_content(second_overlays / "vda.qcow2", tmp_path)
    assert content[PATTERN_OFFSET : PATTERN_OFFSET + PATTERN_LENGTH] == pattern()
    assert content[:PATTERN_OFFSET] == BASE_FILL * PATTERN_OFFSET
    assert sha256(frozen) == frozen_hash
    # A change to an image further down the chain is refused too, and nothing is made.
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 4096", str(frozen)], check=True, capture_output=True)
    third_overlays = tmp_path / "three"
    third_overlays.mkdir()
    with pytest.raises(ConfigError, match="backing file .* was changed or replaced"):
        Machine.restore(str(again), MemoryConsole(), disk_overlay=str(third_overlays))
    assert list(third_overlays.iterdir()) == []


def test_a_machine_on_temporary_overlays_cannot_be_saved_again(saved, tmp_path: Path) -> None:
    snapshot, _, _ = saved
    with Machine.restore(str(snapshot), MemoryConsole()) as machine:
        with pytest.raises(ConfigError, match="--disk-overlay DIR") as error:
            machine.save(str(tmp_path / "again"))
        assert "\n" not in str(error.value)
    assert not (tmp_path / "again").exists()


def test_a_disk_in_a_temporary_overlay_folder_is_not_frozen(tmp_path: Path) -> None:
    """`pyhv run --snapshot` and restores without --disk-overlay run on overlays in
    pyhv-overlays-* folders that go at the end of the run: a snapshot must not refer to them."""
    folder = Path(tempfile.mkdtemp(prefix="pyhv-overlays-"))
    try:
        disk = folder / "vda.raw"
        disk.write_bytes(bytes(DISK_BYTES))
        with Machine(16, console=MemoryConsole()) as machine:
            machine.attach_disks([DiskSpec(str(disk), "raw")])
            with pytest.raises(ConfigError, match="temporary overlay") as error:
                machine.save(str(tmp_path / "snap"))
            assert "\n" not in str(error.value)
        assert sorted(path.name for path in folder.iterdir()) == ["vda.raw"] and not (tmp_path / "snap").exists()
    finally:
        shutil.rmtree(folder)


def pyhv(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hypervisor", "run", "--console", "none", *arguments],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip


def test_restore_from_the_cli_with_a_disk_overlay_folder(saved, tmp_path: Path) -> None:
    snapshot, frozen, frozen_hash = saved
    overlays = tmp_path / "new-overlays"  # made by pyhv: its parent exists
    result = pyhv("--restore", str(snapshot), "--disk-overlay", str(overlays), "--timeout", "60")
    assert result.returncode == EXIT_CODE, result.stderr
    qemu_img_check(overlays / "vda.qcow2")
    assert disk_content(overlays / "vda.qcow2", tmp_path)[PATTERN_OFFSET : PATTERN_OFFSET + PATTERN_LENGTH] == pattern()
    # The same folder again: its overlay is there already, refused in one line.
    again = pyhv("--restore", str(snapshot), "--disk-overlay", str(overlays))
    lines = [line for line in again.stderr.splitlines() if line.strip()]
    assert again.returncode == 3 and len(lines) == 1 and "already exists" in lines[0], again.stderr
    frozen.touch()
    changed = pyhv("--restore", str(snapshot))
    lines = [line for line in changed.stderr.splitlines() if line.strip()]
    assert changed.returncode == 3 and len(lines) == 1 and "changed or replaced" in lines[0], changed.stderr
    assert sha256(frozen) == frozen_hash


def test_save_from_the_cli_with_a_disk(guest_binary, tmp_path: Path) -> None:
    """`--save` on a machine with a --disk: the disk is frozen, the run goes on above it."""
    image = tmp_path / "guest.bin"
    image.write_bytes(with_parameters(guest_binary("real_mode").read_bytes(), exit_code=6))
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(DISK_BYTES))
    snapshot = tmp_path / "saved"
    first = pyhv("--raw", f"{image}@0x1000", "--disk", f"{disk},format=raw", "--save", str(snapshot),
                 "--save-on", "hello", "--timeout", "60")  # fmt: skip
    assert first.returncode == 6, first.stderr
    assert json.loads((snapshot / "header.json").read_text())["disks"][0]["format"] == "raw"
    qemu_img_check(tmp_path / "disk.raw.saved.vda.qcow2")
    second = pyhv("--restore", str(snapshot), "--timeout", "60")
    assert second.returncode == 6, second.stderr


def test_disk_overlay_needs_restore(guest_binary, tmp_path: Path) -> None:
    result = pyhv("--raw", f"{guest_binary('real_mode')}@0x1000", "--disk-overlay", str(tmp_path))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 3 and len(lines) == 1 and "--disk-overlay" in lines[0], result.stderr
