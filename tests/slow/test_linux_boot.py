"""Linux boots of the bundled guest (slow: minutes on a kvm_pvm host, seconds elsewhere).

Each test boots through the CLI, as a user would, and checks the console's boot phases, the
outcome, the exit status and the JSON report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hypervisor.guest_images import default_guest

pytestmark = [pytest.mark.slow, pytest.mark.kvm]

ROOT = Path(__file__).resolve().parents[2]
BZIMAGE = ROOT / "guest_images" / "bzImage"
BOOT_TIMEOUT = 900  # seconds the guest may take; PLATFORM.md measured ~145 s to init here


def pyhv_run(*arguments: str, stdin: str = "", timeout: float = BOOT_TIMEOUT + 60) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "hypervisor", "run", "--timeout", str(BOOT_TIMEOUT), *arguments]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def default_guest_or_skip() -> tuple[Path, Path]:
    try:
        return default_guest()
    except Exception as error:
        pytest.skip(f"the bundled guest is not built: {error}")


@pytest.mark.timeout(BOOT_TIMEOUT + 120)
def test_default_guest_runs_a_shell_from_a_pipe(tmp_path: Path) -> None:
    default_guest_or_skip()
    report_path = tmp_path / "report.json"
    result = pyhv_run("--report", str(report_path), stdin="echo hi from the guest shell; exit\n")
    output = result.stdout
    assert result.returncode == 0, result.stderr[-2000:] + output[-3000:]
    for phase in ("Linux version", "Run /init as init process", "pyhv guest: init started"):
        assert phase in output
    assert "hi from the guest shell" in output
    report = json.loads(report_path.read_text())
    assert report["outcome"] == "reset" and report["exit_status"] == 0
    timeline = report["timeline"]
    assert timeline["first_console_byte"] <= timeline["kernel_banner"] < timeline["init_started"]
    assert timeline["init_started"] < timeline["guest_init_greeting"]


@pytest.mark.timeout(BOOT_TIMEOUT + 120)
def test_bzimage_without_a_root_panics_and_says_so(tmp_path: Path) -> None:
    if not BZIMAGE.exists():
        pytest.skip("guest_images/bzImage is not built")
    report_path = tmp_path / "report.json"
    # No initrd and no root disk: the kernel gets through its whole init, then panics at the
    # root mount; pyhv must report a panic (121), not the reset that panic=-1 causes.
    result = pyhv_run("--kernel", str(BZIMAGE), "--console", "file:" + str(tmp_path / "console.log"),
                      "--report", str(report_path))  # fmt: skip
    console = (tmp_path / "console.log").read_text(errors="replace")
    assert result.returncode == 121, result.stderr[-2000:] + console[-3000:]
    assert "Linux version" in console and "VFS: Unable to mount root fs" in console
    report = json.loads(report_path.read_text())
    assert report["outcome"] == "panic"
    assert "Unable to mount root fs" in report["detail"]
    assert report["guest"]["protocol"] == "linux-64"


@pytest.mark.timeout(BOOT_TIMEOUT + 120)
def test_the_guest_commands_exit_status_is_the_runs_with_two_cpus(tmp_path: Path) -> None:
    default_guest_or_skip()
    report_path = tmp_path / "report.json"
    command = 'pyhv.cmd="echo cpus: $(grep -c ^processor /proc/cpuinfo); exit 7"'
    result = pyhv_run("--cpus", "2", "--append", command, "--report", str(report_path))
    assert result.returncode == 7, result.stderr[-2000:] + result.stdout[-3000:]
    assert "smp: Brought up 1 node, 2 CPUs" in result.stdout
    assert "cpus: 2" in result.stdout
    report = json.loads(report_path.read_text())
    assert report["outcome"] == "command-exit" and report["exit_status"] == 7
    assert "command_started" in report["timeline"]
