"""pytest plugin: boot a guest from a test and assert on what the hypervisor saw (docs/ci.md).

    def test_disk_survives(pyhv_vm):
        result = pyhv_vm.boot(raw=("guest.bin", 0x1000), disks=["base.qcow2,snapshot=on"], timeout=30)
        assert result.exit_status == 0
        assert result.write_sets["vda"]["written"] == [[3, 8]]
        assert result.flushed_before_poweroff and result.unmapped_accesses == {"port": 0, "mmio": 0}

`pyhv_vm` is a per-test fixture; `boot()` (also usable without pytest) runs one VM in this
process through the same path as `pyhv run` (hypervisor.launch.create_machine with a
hypervisor.disk_overlays.DiskSession) and returns a `BootResult`: the outcome and exit status,
the console text, the JSON report `pyhv run --report` would write, each disk's write set, exit
counts by kind, accesses to addresses with no device, whether every disk was flushed after its
last write, the injected faults, and after a crash the post-mortem `pyhv run` prints.

Parallel-safe by construction: temporary overlays go in the test's own `tmp_path` (unique per
test and per pytest-xdist worker), and nothing is shared between tests but read-only bases.
pytest-timeout: give `boot(timeout=...)` less than the test's timeout, so pyhv ends the run and
still reports; if pytest-timeout fires first, the machine and the overlays are closed on the way
out. When a test that booted fails, the outcome, post-mortem and console tail of each boot go into
its report as a "Captured stdout pyhv" section, which JUnit XML writes into system-out when
`junit_logging` is `system-out` or `all`.

Entry point (pyproject.toml): `[project.entry-points.pytest11]`, `"hypervisor.pytest_plugin" =
"hypervisor.pytest_plugin"`; the entry point's name is the module's, so a conftest that also
lists it in `pytest_plugins` does not register it twice.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hypervisor.disk_spec import DiskSpec, parse_disk_spec
from hypervisor.faults import FaultRule, parse_fault_spec

CONSOLE_TAIL_LINES = 40
_RESULTS = pytest.StashKey[list["BootResult"]]()
_FAILED = pytest.StashKey[bool]()


@dataclass
class BootResult:
    """One finished run, as a test wants to assert on it."""

    outcome: str  # hypervisor.outcome.OutcomeKind value: "debug-exit", "timeout", "panic", ...
    exit_status: int  # what `pyhv run` would exit with (docs/exit-status.md)
    detail: str
    console: str = field(repr=False)
    report: dict[str, Any] = field(repr=False)  # exactly what `pyhv run --report` writes
    write_sets: dict[str, dict[str, Any]] = field(default_factory=dict)  # per disk (hypervisor.block.shims)
    # After a crash (triple fault, emulation failure, panic...): registers, code, last exits, as
    # `pyhv run` prints it (hypervisor.debug.postmortem); the report's "post_mortem" has the data.
    post_mortem: str | None = field(default=None, repr=False)

    @property
    def exits(self) -> dict[str, int]:
        """VM exits by kind (KVM exit reason names), all vCPUs."""
        return dict(self.report["exits"]["by_reason"])

    @property
    def total_exits(self) -> int:
        return int(self.report["exits"]["total"])

    @property
    def unmapped_accesses(self) -> dict[str, int]:
        """Guest accesses to port and MMIO addresses where no device is (reads answered, counted)."""
        exits = self.report["exits"]
        return {"port": int(exits["unmapped_port_accesses"]), "mmio": int(exits["unmapped_mmio_accesses"])}

    @property
    def flushed_before_poweroff(self) -> bool:
        """Every disk's last write (or write-zeroes) was followed by a flush; True with no writes."""
        return all(write_set["flushed_at_end"] for write_set in self.write_sets.values())

    @property
    def faults(self) -> dict[str, Any] | None:
        """The fault rules, how far each got, and the faults injected (None without rules)."""
        return self.report.get("faults")

    def console_tail(self, lines: int = CONSOLE_TAIL_LINES) -> str:
        return "\n".join(self.console.splitlines()[-lines:])


def _disk(spec: str | DiskSpec) -> DiskSpec:
    return spec if isinstance(spec, DiskSpec) else parse_disk_spec(spec)


def _fault(rule: str | FaultRule) -> FaultRule:
    return rule if isinstance(rule, FaultRule) else parse_fault_spec(rule)


def boot(
    *,
    kernel: str | os.PathLike[str] | None = None,
    initrd: str | os.PathLike[str] | None = None,
    append: str | None = None,
    raw: tuple[str | os.PathLike[str], int] | None = None,
    memory_mib: int | None = None,
    cpus: int = 1,
    disks: Sequence[str | DiskSpec] = (),
    snapshot: bool = False,
    faults: Sequence[str | FaultRule] = (),
    timeout: float = 60.0,
    overlay_dir: str | os.PathLike[str] | None = None,
    debug_exit_qemu: bool = False,
) -> BootResult:
    """Run one VM to its outcome (or `timeout` seconds) and return what it did.

    `disks` and `faults` take the CLI's text (`"base.qcow2,snapshot=on"`, `"vda:write:3:eio"`)
    or DiskSpec / FaultRule values; `snapshot` puts every writable disk on a temporary overlay,
    made in `overlay_dir` (the fixture passes the test's tmp_path). Bad options raise the same
    one-line HypervisorError subclasses `pyhv run` reports.
    """
    from hypervisor.console import MemoryConsole
    from hypervisor.debug.postmortem import DEFAULT_EXIT_HISTORY, collect
    from hypervisor.debug.postmortem_files import format_summary
    from hypervisor.disk_overlays import DiskSession
    from hypervisor.launch import RunOptions, create_machine
    from hypervisor.outcome import is_crash
    from hypervisor.report import build_report

    specs = [_disk(spec) for spec in disks]
    rules = [_fault(rule) for rule in faults]
    options = RunOptions(
        kernel=Path(kernel) if kernel is not None else None,
        initrd=Path(initrd) if initrd is not None else None,
        append=append,
        raw=(Path(raw[0]), raw[1]) if raw is not None else None,
        memory_mib=memory_mib,
        cpus=cpus,
        timeout=timeout,
        debug_exit_qemu=debug_exit_qemu,
        disks=specs,
        exit_history=DEFAULT_EXIT_HISTORY,  # the last exits, for a post-mortem
    )
    console = MemoryConsole()
    with DiskSession(specs, snapshot_all=snapshot, faults=rules, temporary_dir=overlay_dir) as session:
        options.disks = session.given
        machine, info = create_machine(options, console, session)
        with machine:
            result = machine.run(timeout)
            # Read before close(): the registers and memory of the stopped vCPUs.
            crash = collect(machine, result.outcome) if is_crash(result.outcome) else None
        post_mortem = crash.to_dict() if crash is not None else None
        report = build_report(result, info, machine.observer.timeline(), post_mortem, session.report())
        write_sets = session.write_sets()
    return BootResult(result.outcome.kind.value, result.exit_status, result.outcome.detail, console.text(), report,
                      write_sets, format_summary(crash) if crash is not None else None)  # fmt: skip


def restore(
    snapshot: str | os.PathLike[str],
    *,
    typed: str | bytes = b"",
    timeout: float = 60.0,
    overlay_dir: str | os.PathLike[str] | None = None,
) -> BootResult:
    """Continue a saved machine (`pyhv run --save`, docs/snapshots.md) to its outcome: `typed`
    is input for its console (a saved shell's next command), each disk runs on a fresh overlay
    in `overlay_dir` on the snapshot's frozen image, and the result is a `BootResult` as for
    `boot()`. Many tests (and pytest-xdist workers) may restore one snapshot at once."""
    from hypervisor.console import MemoryConsole
    from hypervisor.machine import Machine
    from hypervisor.report import build_report

    console = MemoryConsole()
    if typed:
        console.feed(typed.encode() if isinstance(typed, str) else typed)  # held until the machine starts
    machine = Machine.restore(str(snapshot), console, disk_overlay=None if overlay_dir is None else str(overlay_dir))
    with machine:
        result = machine.run(timeout)
    report = build_report(result, None, machine.observer.timeline())
    return BootResult(result.outcome.kind.value, result.exit_status, result.outcome.detail, console.text(), report,
                      {}, None)  # fmt: skip


class PyhvVm:
    """The `pyhv_vm` fixture: `boot()` with overlays in the test's tmp_path, results kept for
    the failure report."""

    def __init__(self, tmp_path: Path, results: list[BootResult]) -> None:
        self.tmp_path = tmp_path
        self.results = results

    def boot(self, **options: Any) -> BootResult:
        if options.get("overlay_dir") is None:
            overlay_dir = self.tmp_path / "pyhv-overlays"
            overlay_dir.mkdir(exist_ok=True)
            options["overlay_dir"] = overlay_dir
        result = boot(**options)
        self.results.append(result)
        return result

    def restore(self, snapshot: str | os.PathLike[str], **options: Any) -> BootResult:
        """`restore()` with the disks' overlays in this test's own folder."""
        if options.get("overlay_dir") is None:
            overlay_dir = self.tmp_path / f"pyhv-restore-{len(self.results)}"
            overlay_dir.mkdir()
            options["overlay_dir"] = overlay_dir
        result = restore(snapshot, **options)
        self.results.append(result)
        return result

    @property
    def last(self) -> BootResult | None:
        return self.results[-1] if self.results else None


@pytest.fixture
def pyhv_vm(request: pytest.FixtureRequest, tmp_path: Path) -> PyhvVm:
    """Boots VMs for this test (see the module docstring); per test, nothing shared."""
    results: list[BootResult] = []
    request.node.stash[_RESULTS] = results
    return PyhvVm(tmp_path, results)


@pytest.fixture
def restored_vm(pyhv_vm: PyhvVm) -> Callable[..., BootResult]:
    """`restored_vm(snapshot, typed=..., timeout=...)`: each test starts from the same saved
    guest with its own disk overlays (the issue's clones for CI)."""
    return pyhv_vm.restore


def _failure_section(results: Sequence[BootResult]) -> str:
    parts = []
    for index, result in enumerate(results, 1):
        parts.append(f"boot {index}: {result.outcome} (exit status {result.exit_status}): {result.detail}")
        if result.faults:
            parts.append(f"injected faults: {result.faults['injected']}")
        if result.post_mortem is not None:
            parts.append(result.post_mortem)
        tail = result.console_tail()
        parts.append(f"console (last {CONSOLE_TAIL_LINES} lines):\n{tail}" if tail else "console: (nothing printed)")
    return "\n".join(parts)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """A failed test that booted gets a "pyhv" section: outcome and console tail of each boot."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    results = item.stash.get(_RESULTS, None)
    if report.failed:
        item.stash[_FAILED] = True
    if not results or not item.stash.get(_FAILED, False):
        return
    # A "Captured stdout" section: pytest prints the failing phase's with the failure, and JUnit
    # XML writes the teardown report's captured output into <system-out> (junit_logging =
    # system-out or all), so the teardown report carries it too.
    if report.failed or report.when == "teardown":
        report.sections.append((f"Captured stdout pyhv ({report.when})", _failure_section(results)))
