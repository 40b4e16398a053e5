"""Exit budgets (`--max-exits`): an exit storm ends as its own verdict, with its counts reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hypervisor.ci.exit_budget import ExitBudget
from hypervisor.console import MemoryConsole
from hypervisor.machine import Machine
from hypervisor.outcome import EXIT_STATUS, OutcomeClass, OutcomeKind
from tests.guests.build import GUEST_BASE, MODE_OUT_FOREVER, with_parameters

PYHV = [sys.executable, "-m", "hypervisor"]
STORM_PORT = 0x520  # no device there: the C loop answers and counts each write, at full speed


def storm_guest(guest_binary, tmp_path: Path) -> Path:
    image = tmp_path / "storm.bin"
    image.write_bytes(with_parameters(guest_binary("user_mode").read_bytes(), mode=MODE_OUT_FOREVER, port=STORM_PORT))
    return image


def pyhv_run(*arguments: str) -> subprocess.CompletedProcess[str]:
    command = [*PYHV, "run", "--console", "none", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


# -- no /dev/kvm needed -----------------------------------------------------------------------


def test_every_outcome_has_a_class_and_the_budget_is_the_guests_verdict() -> None:
    assert {kind.outcome_class for kind in OutcomeKind} == set(OutcomeClass)
    assert OutcomeKind.EXIT_BUDGET.outcome_class is OutcomeClass.VERDICT
    assert OutcomeKind.TIMEOUT.outcome_class is OutcomeClass.INFRASTRUCTURE
    assert OutcomeKind.HYPERVISOR_ERROR.outcome_class is OutcomeClass.INFRASTRUCTURE
    assert OutcomeKind.PANIC.outcome_class is OutcomeClass.VERDICT
    assert EXIT_STATUS[OutcomeKind.EXIT_BUDGET] == 118


def test_the_exit_status_table_shows_the_class_of_every_status() -> None:
    # The status table only: the section's later subsections (### Panics...) have tables of their own.
    section = Path("docs/exit-status.md").read_text().split("## `pyhv run`")[1].split("\n#")[0]
    table = [
        line for line in section.splitlines() if line.startswith("| ") and not line.startswith(("| status", "| ---"))
    ]
    assert table and all(line.split(" | ")[1] in ("verdict", "infrastructure") for line in table)
    assert "| 118 | verdict |" in "\n".join(table)


@pytest.mark.parametrize(
    "spec,limits",
    [("5000", {"total": 5000}), ("io=1_000_000,MMIO=7", {"io": 1_000_000, "mmio": 7}), (" hlt = 3 ", {"hlt": 3})],
)
def test_budget_specs(spec: str, limits: dict[str, int]) -> None:
    assert dict(ExitBudget.parse(spec).limits) == limits


def test_the_first_kind_over_its_limit_is_named() -> None:
    budget = ExitBudget.parse("io=10,total=100")
    assert budget.verdict({"io": 10, "total": 100}) is None  # at the limit is still within it
    outcome = budget.verdict({"io": 11, "total": 101})
    assert outcome is not None and outcome.kind is OutcomeKind.EXIT_BUDGET and outcome.exit_status == 118
    assert "11 io exits, more than its budget of 10" in outcome.detail
    assert outcome.data["exit_budget"] == {
        "kind": "io",
        "limit": 10,
        "count": 11,
        "limits": {"io": 10, "total": 100},
        "counts": {"io": 11, "total": 101},
    }


@pytest.mark.parametrize(
    "spec,message",
    [("", "wants N or KIND=N"), ("io=0", "at least 1 exit"), ("io=-5", "not a whole number"),
     ("disk=5", "unknown exit kind 'disk'"), ("io=1,io=2", "io is given twice"), ("lots", "not a whole number"),
     ("io=1e6", "not a whole number")],
)  # fmt: skip
def test_bad_budgets_are_one_line_errors(spec: str, message: str) -> None:
    result = pyhv_run("--raw", "missing.bin@0x1000", "--max-exits", spec)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 3 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert message in lines[0] and lines[0].startswith("pyhv: error: --max-exits")


# -- on KVM -------------------------------------------------------------------------------------


@pytest.mark.kvm
@pytest.mark.timeout(120)
@pytest.mark.parametrize("spec,kind", [("io=20000", "io"), ("30000", "total")])
def test_an_exit_storm_ends_at_its_budget(guest_binary, tmp_path: Path, spec: str, kind: str) -> None:
    report_path = tmp_path / "report.json"
    result = pyhv_run("--raw", f"{storm_guest(guest_binary, tmp_path)}@0x1000", "--max-exits", spec,
                      "--timeout", "60", "--report", str(report_path))  # fmt: skip
    assert result.returncode == 118, result.stderr
    limit = int(spec.split("=")[-1])
    report = json.loads(report_path.read_text())
    assert report["outcome"] == "exit-budget" and report["outcome_class"] == "verdict"
    assert report["exit_status"] == 118
    budget = report["outcome_data"]["exit_budget"]
    assert budget["kind"] == kind and budget["limit"] == limit and budget["count"] > limit
    # The counts the budget saw are the run's own, which go on only until the vCPU stops.
    counted = report["exits"]["by_reason"]["IO"] if kind == "io" else report["exits"]["total"]
    assert counted >= budget["count"]
    assert f"pyhv: exit-budget: the guest made {budget['count']}" in result.stderr


@pytest.mark.kvm
@pytest.mark.timeout(60)
def test_a_guest_within_its_budget_ends_as_usual(guest_binary) -> None:
    result = pyhv_run("--raw", f"{guest_binary('real_mode')}@0x1000", "--max-exits", "io=100000,total=200000",
                      "--timeout", "30")  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.mark.kvm
@pytest.mark.timeout(60)
def test_the_machine_api_takes_a_budget(guest_binary) -> None:
    console = MemoryConsole()
    machine = Machine(16, console=console)
    image = with_parameters(guest_binary("user_mode").read_bytes(), mode=MODE_OUT_FOREVER, port=STORM_PORT)
    machine.load_raw_bytes(image, GUEST_BASE, "storm")
    machine.exit_budget = ExitBudget.parse("io=5000")
    with machine:
        result = machine.run(timeout=30)
    assert result.outcome.kind is OutcomeKind.EXIT_BUDGET and result.exit_status == 118
    assert result.statistics["exits_by_reason"]["IO"] > 5000
    assert console.data() == b"hello from user mode\n"
