"""An interrupt pyhv handled leaves the exit status pyhv chose, even under `python -m`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import sys
from hypervisor.cli.interrupts import forget_caught_interrupts

try:
    exec("raise KeyboardInterrupt")  # as a SIGTERM landing while a dataclass is being built
except KeyboardInterrupt:
    pass
try:
    sys.exit(7)
finally:
    if sys.argv[1:] == ["forget"]:
        forget_caught_interrupts()
"""


def _run_probe(tmp_path: Path, *arguments: str) -> int:
    package = tmp_path / "interrupt_probe"
    package.mkdir(exist_ok=True)
    (package / "__main__.py").write_text(PROBE)
    root = Path(__file__).resolve().parents[2]
    environment = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{root}"}
    return subprocess.run([sys.executable, "-m", "interrupt_probe", *arguments], env=environment,
                          timeout=60).returncode  # fmt: skip


def test_a_handled_interrupt_keeps_the_chosen_status(tmp_path: Path) -> None:
    if _run_probe(tmp_path) != -2:
        pytest.skip("this CPython does not turn a caught KeyboardInterrupt into SIGINT at exit")
    assert _run_probe(tmp_path, "forget") == 7


def test_an_unhandled_interrupt_still_ends_with_sigint(tmp_path: Path) -> None:
    package = tmp_path / "unhandled_probe"
    package.mkdir()
    (package / "__main__.py").write_text(
        "from hypervisor.cli.interrupts import forget_caught_interrupts\n"
        "try:\n    raise KeyboardInterrupt\nfinally:\n    forget_caught_interrupts()\n")
    root = Path(__file__).resolve().parents[2]
    environment = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{root}"}
    completed = subprocess.run([sys.executable, "-m", "unhandled_probe"], env=environment, capture_output=True,
                               timeout=60)  # fmt: skip
    assert completed.returncode == -2
