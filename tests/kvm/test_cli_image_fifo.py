"""Disk images on a FIFO are refused at once with one line (issue 14): `pyhv run --disk FIFO` and
every `pyhv image` command that reads an image. Before the fix, open(2) on the FIFO waited for a
writer forever, so each of these ran into the subprocess timeout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.block.qcow2_oracle import create, needs_qemu

ROOT = Path(__file__).resolve().parents[2]
# Refusing takes well under a second; hanging is what a timeout would show.
TIMEOUT = 60
FIFO_MESSAGE = "is a FIFO, not a regular file or block device"


def run_pyhv(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "hypervisor", *arguments]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd, env=env)


def assert_one_line_error(result: subprocess.CompletedProcess[str], status: int) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert FIFO_MESSAGE in lines[0], lines[0]


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "disk.fifo"
    os.mkfifo(path)
    return path


@needs_qemu
@pytest.mark.parametrize(
    "arguments,status",
    [
        (["info", "{fifo}"], 3),
        (["info", "--backing-chain", "{fifo}"], 3),
        (["check", "{fifo}"], 1),  # check keeps qemu-img's status: 1 = the check could not be done
        (["check", "-f", "qcow2", "{fifo}"], 1),
        (["map", "{fifo}"], 3),
        (["convert", "-O", "raw", "{fifo}", "out.raw"], 3),
        (["convert", "-f", "raw", "-O", "qcow2", "{fifo}", "out.qcow2"], 3),
        (["compare", "{fifo}", "{good}"], 2),  # compare keeps qemu-img's status: 2 = error
        (["snapshot", "-l", "{fifo}"], 3),
        (["resize", "{fifo}", "1M"], 3),
        (["rebase", "-u", "-b", "", "{fifo}"], 3),
        (["commit", "{fifo}"], 3),
        (["create", "-f", "qcow2", "-b", "{fifo}", "-F", "raw", "overlay.qcow2"], 3),
    ],
)
def test_image_commands_refuse_a_fifo(tmp_path: Path, fifo: Path, arguments: list[str], status: int) -> None:
    good = create(tmp_path / "good.qcow2", "1M")
    filled = [argument.format(fifo=fifo, good=good) for argument in arguments]
    assert_one_line_error(run_pyhv("image", *filled, cwd=tmp_path), status)
    assert not (tmp_path / "out.raw").exists() and not (tmp_path / "out.qcow2").exists()


@pytest.mark.kvm
@pytest.mark.parametrize("disk_format", [None, "raw", "qcow2"])
def test_run_refuses_a_disk_on_a_fifo(guest_binary, tmp_path: Path, fifo: Path, disk_format: str | None) -> None:
    guest = guest_binary("real_mode")
    disk = str(fifo) if disk_format is None else f"{fifo},format={disk_format}"
    result = run_pyhv(
        "run", "--console", "none", "--timeout", "30", "--raw", f"{guest}@0x1000", "--disk", disk, cwd=tmp_path
    )
    assert_one_line_error(result, 3)
