"""The pvpanic port on real KVM: tests/guests/pvpanic.S writes and reads port 0x505 as a kernel's
pvpanic driver does, through the machine `pyhv run` builds (hypervisor.launch.create_machine),
the CLI with its report, and the copyable pytest example of docs/ci.md."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hypervisor.console import MemoryConsole
from hypervisor.devices.pvpanic import PvPanic
from hypervisor.errors import ConfigError
from hypervisor.launch import RunOptions, create_machine
from hypervisor.machine import RunResult
from hypervisor.outcome import PANIC_SOURCE_PVPANIC, OutcomeKind, panic_source
from tests.guests.build import GUEST_BASE, with_parameters

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
MODE_PANIC, MODE_CRASH_LOADED, MODE_READ, MODE_PANIC_LINE_THEN_RESET = 0, 1, 2, 3
NOT_REACHED = 77  # the debug-exit code the panic guest writes only if its pvpanic write did not end the run


def guest_file(guest_binary, tmp_path: Path, mode: int, exit_code: int = 0) -> Path:
    path = tmp_path / f"pvpanic-{mode}.bin"
    path.write_bytes(with_parameters(guest_binary("pvpanic").read_bytes(), mode=mode, exit_code=exit_code))
    return path


def run(path: Path) -> tuple[RunResult, PvPanic]:
    machine, _ = create_machine(RunOptions(raw=(path, GUEST_BASE), memory_mib=16), MemoryConsole())
    with machine:
        device = machine.pvpanic  # every machine has one (hypervisor/machine.py)
        assert sum(isinstance(entry.device, PvPanic) for entry in machine.pio_bus.ranges()) == 1
        return machine.run(timeout=30), device


def test_a_panicked_write_ends_the_run_as_a_pvpanic_panic(guest_binary, tmp_path) -> None:
    result, _ = run(guest_file(guest_binary, tmp_path, MODE_PANIC, exit_code=NOT_REACHED))
    assert result.outcome.kind is OutcomeKind.PANIC and result.exit_status == 121, result.outcome
    assert panic_source(result.outcome) == PANIC_SOURCE_PVPANIC
    assert "through pvpanic" in result.outcome.detail and "port 0x505" in result.outcome.detail
    exits = result.statistics["exits_by_reason"]
    assert isinstance(exits, dict) and exits.get("IO") == 1  # the pvpanic write, and nothing after it


def test_crash_loaded_is_logged_and_the_guest_goes_on(guest_binary, tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="hypervisor.devices.pvpanic"):
        result, device = run(guest_file(guest_binary, tmp_path, MODE_CRASH_LOADED, exit_code=0))
    assert result.outcome.kind is OutcomeKind.DEBUG_EXIT and result.exit_status == 0, result.outcome
    assert device.crash_loaded_reports == 1
    assert any("PVPANIC_CRASH_LOADED" in record.getMessage() for record in caplog.records)


def test_a_read_returns_the_supported_events(guest_binary, tmp_path) -> None:
    result, _ = run(guest_file(guest_binary, tmp_path, MODE_READ))
    # The guest passes what it read to the debug-exit port: PANICKED | CRASH_LOADED.
    assert result.outcome.kind is OutcomeKind.DEBUG_EXIT and result.exit_status == 0x03, result.outcome


def test_pyhv_run_exits_121_and_reports_the_source(guest_binary, tmp_path) -> None:
    guest = guest_file(guest_binary, tmp_path, MODE_PANIC, exit_code=NOT_REACHED)
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "hypervisor", "run", "--raw", f"{guest}@{GUEST_BASE:#x}",
                           "--console", "none", "--report", str(report), "--timeout", "30"],
                          capture_output=True, text=True, timeout=90)  # fmt: skip
    assert done.returncode == 121, done.stderr
    assert "pyhv: panic: the guest kernel reported a panic through pvpanic" in done.stderr
    assert "(exit status 121)" in done.stderr and "Traceback" not in done.stderr
    data = json.loads(report.read_text())
    assert (data["outcome"], data["outcome_class"], data["exit_status"]) == ("panic", "verdict", 121)
    assert data["outcome_data"]["panic"] == {"source": "pvpanic", "written": 1, "port": 0x505}


def test_the_debug_exit_port_cannot_take_the_pvpanic_port(guest_binary, tmp_path) -> None:
    guest = guest_file(guest_binary, tmp_path, MODE_READ)
    with pytest.raises(ConfigError, match="0x505 is the pvpanic port"):
        create_machine(RunOptions(raw=(guest, GUEST_BASE), memory_mib=16, debug_exit_port=0x505), None)
    done = subprocess.run([sys.executable, "-m", "hypervisor", "run", "--raw", f"{guest}@{GUEST_BASE:#x}",
                           "--console", "none", "--debug-exit-port", "0x505"],
                          capture_output=True, text=True, timeout=90)  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("pyhv: error: --debug-exit-port 0x505 is the pvpanic port")


def docs_example(marker: str) -> str:
    """The python block of docs/ci.md that starts with `marker` (tests/test_doc_examples.py
    compiles every block; this one is also run)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "ci.md").read_text(), re.DOTALL)
    matching = [block for block in blocks if block.startswith(marker)]
    assert len(matching) == 1, f"docs/ci.md has {len(matching)} examples starting {marker!r}"
    return matching[0]


def test_the_ci_docs_pvpanic_example_runs_as_written(tmp_path) -> None:
    (tmp_path / "test_panic_verdicts.py").write_text(textwrap.dedent(docs_example("# test_panic_verdicts.py")))
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "hypervisor.pytest_plugin", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), "-q", str(tmp_path / "test_panic_verdicts.py")],
                          capture_output=True, text=True, timeout=110, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout, done.stdout


def test_a_panic_line_from_a_guest_that_is_not_linux_is_not_a_panic(guest_binary, tmp_path) -> None:
    # The console panic rule is a fallback for Linux guests only (no "Linux version" banner
    # here): this guest's reset is a reset, status 0, whatever its console said before it.
    guest = guest_file(guest_binary, tmp_path, MODE_PANIC_LINE_THEN_RESET)
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "hypervisor", "run", "--raw", f"{guest}@{GUEST_BASE:#x}",
                           "--report", str(report), "--timeout", "30"],
                          capture_output=True, text=True, timeout=90)  # fmt: skip
    assert "Kernel panic - not syncing: not a Linux guest" in done.stdout
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    assert (data["outcome"], data["outcome_class"], data["exit_status"]) == ("reset", "verdict", 0)
