"""`pyhv kvm-unit-tests`: run upstream's x86 kvm-unit-tests under pyhv (and QEMU TCG) and print
one PASS/FAIL/SKIP/TIMEOUT line per test, as upstream's run_tests.sh does."""

from __future__ import annotations

import fnmatch
import sys
import tempfile
import threading
from pathlib import Path

import click

from hypervisor.errors import ConfigError, HypervisorError

DEFAULT_DIRECTORY = Path("../shared/kvm-unit-tests/x86")
COLOURS = {"PASS": "green", "FAIL": "red", "SKIP": "yellow", "TIMEOUT": "red"}


@click.command("kvm-unit-tests")
@click.argument("directory", required=False, type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--filter",
    "patterns",
    multiple=True,
    metavar="GLOB",
    help="Run only tests whose name matches (repeatable), e.g. 'vmexit_*'.",
)
@click.option("--junit", type=click.Path(path_type=Path, dir_okay=False), help="Write a JUnit XML report here.")
@click.option("--qemu", "with_qemu", is_flag=True, help="Also run each test under QEMU TCG (qemu-system-x86_64).")
@click.option("--jobs", "-j", default=1, show_default=True, type=click.IntRange(1, 64), help="Tests run at once.")
@click.option(
    "--nice",
    "niceness",
    default=0,
    show_default=True,
    type=click.IntRange(0, 19),
    help="Run the guests at this niceness (shared machines).",
)
@click.option("--all", "include_nodefault", is_flag=True, help="Also run tests in the nodefault group.")
@click.option(
    "--logs",
    type=click.Path(path_type=Path, file_okay=False),
    help="Keep each test's console log in this directory (default: a temporary one).",
)
def kvm_unit_tests(directory: Path | None, patterns: tuple[str, ...], junit: Path | None, with_qemu: bool,
                   jobs: int, niceness: int, include_nodefault: bool, logs: Path | None) -> None:  # fmt: skip
    """Run kvm-unit-tests from DIRECTORY (built x86 *.flat files and unittests.cfg).

    \b
    DIRECTORY defaults to ../shared/kvm-unit-tests/x86. Exit status 0 when no test failed or
    timed out, 1 otherwise, 3 for bad input. See docs/conformance.md.
    """
    sys.exit(_main(directory or DEFAULT_DIRECTORY, patterns, junit, with_qemu, jobs, niceness, include_nodefault,
                   logs))  # fmt: skip


def _main(directory: Path, patterns: tuple[str, ...], junit: Path | None, with_qemu: bool, jobs: int,
          niceness: int, include_nodefault: bool, logs: Path | None) -> int:  # fmt: skip
    from hypervisor.conformance.runner import Engine, Status, TestResult, qemu_available, run_suite
    from hypervisor.conformance.unittests_cfg import read_unittests_cfg

    try:
        if not directory.is_dir():
            raise ConfigError(f"{directory} is not a directory of built kvm-unit-tests")
        tests = read_unittests_cfg(directory / "unittests.cfg")
        if patterns:
            tests = [test for test in tests if any(fnmatch.fnmatchcase(test.name, p) for p in patterns)]
            if not tests:
                raise ConfigError(f"no test in {directory / 'unittests.cfg'} matches {', '.join(patterns)}")
        qemu = qemu_available() if with_qemu else None
        if with_qemu and qemu is None:
            click.echo("pyhv: note: qemu-system-x86_64 is not installed; running under pyhv only", err=True)
        engines = [Engine.PYHV] + ([Engine.QEMU_TCG] if qemu else [])
        lock = threading.Lock()

        def show(result: TestResult) -> None:
            with lock:
                label = click.style(result.status.value, fg=COLOURS[result.status.value])
                prefix = "" if len(engines) == 1 else f"[{result.engine.value}] "
                click.echo(f"{prefix}{label} {result.name}" + (f" ({result.reason})" if result.reason else ""))

        with tempfile.TemporaryDirectory(prefix="pyhv-kut-") as scratch:
            workdir = logs or Path(scratch)
            try:
                workdir.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise ConfigError(f"cannot create the log directory {workdir}: {error.strerror}") from error
            results = {engine: run_suite(tests, directory.resolve(), engine, workdir, jobs=jobs, niceness=niceness,
                                         include_nodefault=include_nodefault, qemu=qemu, on_result=show)
                       for engine in engines}  # fmt: skip
            if junit is not None:
                from hypervisor.conformance.junit import write_junit

                write_junit(junit, [r for engine in engines for r in results[engine]], "kvm-unit-tests")
    except HypervisorError as error:
        click.echo(f"pyhv: error: {error}", err=True)
        return error.exit_status
    failed = False
    for engine in engines:
        counts = {status: sum(r.status is status for r in results[engine]) for status in Status}
        failed |= bool(counts[Status.FAIL] or counts[Status.TIMEOUT])
        click.echo(f"{engine.value}: " + ", ".join(f"{counts[s]} {s.value}" for s in Status), err=True)
    return 1 if failed else 0
