"""`pyhv run --report`: a bad path is refused before the guest runs; a report that cannot be
written after the run never hides the outcome (issue 14)."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.guests.build import with_parameters

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]


@pytest.fixture
def guest(guest_binary, tmp_path: Path) -> str:
    image = tmp_path / "guest.bin"
    image.write_bytes(with_parameters(guest_binary("real_mode").read_bytes(), exit_code=7))
    return f"{image}@0x1000"


def pyhv_run(*arguments: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "hypervisor", "run", "--console", "none", "--timeout", "30", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=100, cwd=ROOT)


@pytest.mark.parametrize("where", ["missing/report.json", "guest.bin/report.json"])
def test_a_bad_report_path_is_refused_before_the_run(guest: str, tmp_path: Path, where: str) -> None:
    target = tmp_path / where
    result = pyhv_run("--raw", guest, "--report", str(target))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 3, result.stderr
    assert len(lines) == 1 and "--report" in lines[0] and "Traceback" not in result.stderr
    assert "debug-exit" not in result.stderr  # the guest never ran
    assert ".pyhv-report" not in result.stderr


def test_a_directory_as_report_is_a_usage_error(guest: str, tmp_path: Path) -> None:
    result = pyhv_run("--raw", guest, "--report", str(tmp_path))
    assert result.returncode == 2 and "is a directory" in result.stderr and "debug-exit" not in result.stderr


def test_the_report_is_written(guest: str, tmp_path: Path) -> None:
    report = tmp_path / "run.json"
    result = pyhv_run("--raw", guest, "--report", str(report))
    assert result.returncode == 7, result.stderr
    assert json.loads(report.read_text())["exit_status"] == 7
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pyhv-report")] == []


def test_a_report_that_fails_late_keeps_the_outcome(guest: str, tmp_path: Path, monkeypatch, capsys) -> None:
    import hypervisor.report
    from hypervisor.cli import run as run_command

    def disk_full(path, report) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hypervisor.report, "write_report", disk_full)
    with pytest.raises(SystemExit) as status:
        run_command.run.main(["--raw", guest, "--console", "none", "--report", str(tmp_path / "r.json")],
                             standalone_mode=False)  # fmt: skip
    assert status.value.code == 7
    stderr = capsys.readouterr().err
    assert "debug-exit 7 (exit status 7)" in stderr
    assert "cannot write the report" in stderr and "No space left on device" in stderr


def test_pyhv_exec_refuses_a_user_kernel_on_kvm_pvm(guest: str, tmp_path: Path) -> None:
    from hypervisor.kvm import kvm_is_pvm

    if not kvm_is_pvm():
        pytest.skip("only kvm_pvm hosts cannot run a stock kernel's user space")
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not even a kernel")
    result = subprocess.run([sys.executable, "-m", "hypervisor", "exec", "--kernel", str(kernel), "--", "true"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 4 and len(lines) == 1 and "kvm_pvm" in lines[0], result.stderr
