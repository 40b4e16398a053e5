"""Throwaway disks with the virtio-blk test guest (tests/guests/virtio_blk.c): the guest writes
8 sectors at sector 3, flushes, reads them back. The base never changes, the overlay is a valid
qcow2 image, the write set is what the guest wrote, and runs share one base at once."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest

from hypervisor.pytest_plugin import boot
from tests.guests.build import GUEST_BASE, with_parameters

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]

MODE_FUNCTIONAL = 0
MiB = 1 << 20
needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img (qemu-utils) is not installed")


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def guest(guest_binary, tmp_path):
    path = tmp_path / "virtio_blk.bin"
    path.write_bytes(with_parameters(guest_binary("virtio_blk").read_bytes(), mode=MODE_FUNCTIONAL))
    return path


@pytest.fixture(params=["raw", "qcow2"])
def base(request, tmp_path):
    path = tmp_path / f"base.{request.param}"
    if request.param == "raw":
        path.write_bytes(b"\x33" * MiB)
    else:
        if shutil.which("qemu-img") is None:
            pytest.skip("qemu-img (qemu-utils) is not installed")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M"], check=True)
    return path


def pyhv(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hypervisor", "run", "--console", "none", *arguments],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_snapshot_on_leaves_the_base_unchanged_and_nothing_behind(guest, base, tmp_path) -> None:
    before = sha256(base)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "hypervisor", "run", "--console", "none", "--raw", f"{guest}@{GUEST_BASE:#x}",
         "--disk", f"{base},snapshot=on", "--report", str(report)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "TMPDIR": str(scratch)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sha256(base) == before
    assert os.listdir(scratch) == []  # the temporary overlay and its folder are gone
    vda = json.loads(report.read_text())["disks"]["vda"]
    assert vda["overlay_kind"] == "temporary" and vda["base_format"] == base.suffix[1:]
    write_set = vda["write_set"]
    assert write_set["written"] == [[3, 8]] and write_set["flushed"] == [[3, 8]]
    assert write_set["unflushed"] == [] and write_set["flushed_at_end"] and not write_set["capped"]


def test_the_snapshot_flag_covers_every_writable_disk(guest, base, tmp_path) -> None:
    before = sha256(base)
    result = pyhv("--raw", f"{guest}@{GUEST_BASE:#x}", "--disk", str(base), "--snapshot")
    assert result.returncode == 0, result.stderr
    assert sha256(base) == before


@needs_qemu_img
def test_a_kept_overlay_passes_qemu_img_check_and_holds_the_guests_data(guest, base, tmp_path) -> None:
    before = sha256(base)
    overlay = tmp_path / "run.qcow2"
    result = pyhv("--raw", f"{guest}@{GUEST_BASE:#x}", "--disk", f"{base},overlay={overlay}")
    assert result.returncode == 0, result.stderr
    assert sha256(base) == before
    subprocess.run(["qemu-img", "check", "-q", str(overlay)], check=True)
    flat = tmp_path / "flat.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(overlay), str(flat)], check=True)
    data = flat.read_bytes()
    expected = bytes((i * 7 + (i >> 9) + 0x5A) & 0xFF for i in range(8 * 512))  # pattern_byte() of the guest
    assert data[3 * 512 : 11 * 512] == expected
    base_flat = tmp_path / "base_flat.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(base), str(base_flat)], check=True)
    base_data = base_flat.read_bytes()
    # Outside the write set the overlay reads as the base.
    assert data[: 3 * 512] == base_data[: 3 * 512] and data[11 * 512 :] == base_data[11 * 512 :]
    # A second run continues on the kept overlay.
    again = pyhv("--raw", f"{guest}@{GUEST_BASE:#x}", "--disk", f"{base},overlay={overlay}")
    assert again.returncode == 0, again.stderr


def test_an_existing_file_is_not_taken_as_an_overlay(guest, tmp_path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MiB))
    precious = tmp_path / "precious.img"
    precious.write_bytes(b"keep me")
    result = pyhv("--raw", f"{guest}@{GUEST_BASE:#x}", "--disk", f"{base},overlay={precious}")
    assert result.returncode == 3
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not a qcow2 overlay of" in lines[0], result.stderr
    assert precious.read_bytes() == b"keep me"


def test_parallel_runs_share_one_base(guest, base, tmp_path) -> None:
    before = sha256(base)
    results = {}

    def run(index: int) -> None:
        folder = tmp_path / f"run{index}"
        folder.mkdir()
        results[index] = boot(raw=(guest, GUEST_BASE), memory_mib=16, disks=[f"{base},snapshot=on"],
                              overlay_dir=folder, timeout=60)  # fmt: skip

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    # And a third in another process, meanwhile: each opens the base read-only and shared.
    process = subprocess.Popen([sys.executable, "-m", "hypervisor", "run", "--console", "none", "--raw",
                                f"{guest}@{GUEST_BASE:#x}", "--disk", f"{base},snapshot=on"],
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert sorted(results) == [0, 1]
    for result in results.values():
        assert result.exit_status == 0, result.detail
        assert result.write_sets["vda"]["written"] == [[3, 8]]
    assert sha256(base) == before
    assert all(os.listdir(tmp_path / f"run{index}") == [] for index in range(2))


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "timeout", "SIGTERM-at-once", "SIGINT-at-once"])
def test_the_overlay_goes_when_the_run_is_ended_from_outside(guest_binary, tmp_path, how: str) -> None:
    import signal
    import time

    base = tmp_path / "base.raw"
    base.write_bytes(bytes(4 * MiB))
    looping = tmp_path / "bench.bin"
    # Mode 1: sequential 1 MiB reads, far more than finish before the signal.
    looping.write_bytes(with_parameters(guest_binary("virtio_blk").read_bytes(), mode=1, port=1, count=1 << 40))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    extra = ["--timeout", "2"] if how == "timeout" else []
    command = [sys.executable, "-m", "hypervisor", "run", "--console", "none", "--raw", f"{looping}@{GUEST_BASE:#x}",
               "--disk", f"{base},snapshot=on", *extra]  # fmt: skip
    environment = {**os.environ, "TMPDIR": str(scratch)}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=environment)
    deadline = time.monotonic() + 30
    while not any(scratch.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(scratch.iterdir()), "the run never made its overlay"
    if how != "timeout":
        if not how.endswith("-at-once"):
            time.sleep(0.5)  # the guest is reading through the overlay now
        # "-at-once": while the machine is still being built around the new overlay.
        process.send_signal(getattr(signal, how.split("-")[0]))
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()  # never leave a spinning guest behind a failed test
        process.communicate()
        raise
    assert process.returncode == (124 if how == "timeout" else 130), stderr
    assert os.listdir(scratch) == []
    assert base.read_bytes() == bytes(4 * MiB)


def test_without_a_disk_session_a_throwaway_base_is_never_opened(tmp_path) -> None:
    from hypervisor.disk_spec import parse_disk_spec
    from hypervisor.errors import ConfigError
    from hypervisor.launch import RunOptions, create_machine
    from hypervisor.machine import Machine

    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MiB))
    spec = parse_disk_spec(f"{base},snapshot=on")
    with Machine(16) as machine, pytest.raises(ConfigError, match="asks for an overlay"):
        machine.attach_disks([spec])
    guest = tmp_path / "guest.bin"
    guest.write_bytes(b"\xf4")
    with pytest.raises(ConfigError, match="need the run's DiskSession"):
        create_machine(RunOptions(raw=(guest, GUEST_BASE), disks=[spec]), None)
    assert base.read_bytes() == bytes(MiB)
