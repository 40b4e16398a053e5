"""`pyhv kunit`: boot a kernel built with KUnit, read the KTAP on its console, give one verdict.

The kernel runs its built-in KUnit suites at boot, in kernel mode before init (so on kvm_pvm
hosts too), prints KTAP on the serial console and, with `kunit_shutdown=reboot` (lib/kunit/
executor.c) and pyhv's `reboot=k`, resets the machine, which ends the run. The console is kept
in memory and parsed when the run ends (hypervisor.ci.ktap); the verdict and its exit status
come from hypervisor.ci.kunit_verdict (docs/exit-status.md, "pyhv kunit").
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import click

from hypervisor.errors import ConfigError, HypervisorError
from hypervisor.process_signals import sigterm_raises

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 900.0  # a KUnit kernel reaches its tests after a minute or two on kvm_pvm
# The kernel splits its command line at spaces and strips quotes (Documentation/admin-guide/
# kernel-parameters.rst), so a glob is one word of printable characters without either.
FILTER_GLOB = re.compile(r"^[!#-~]{1,256}$")
FILTER_GLOB_FORBIDDEN = '"'
KUNIT_CMDLINE = "kunit_shutdown=reboot"


def kunit_cmdline(filter_glob: str | None, append: str | None) -> str:
    """The command-line words for a KUnit run: reset when the tests are done, the filter, then the
    user's own words (the kernel takes the last value of a repeated parameter)."""
    words = [KUNIT_CMDLINE]
    if filter_glob is not None:
        if not FILTER_GLOB.match(filter_glob) or FILTER_GLOB_FORBIDDEN in filter_glob:
            raise ConfigError(
                f"--filter {filter_glob!r}: a glob is one word of printable characters without spaces or quotes "
                "(for example 'list*' or 'list*.*add*')"
            )
        words.append(f"kunit.filter_glob={filter_glob}")
    if append:
        words.append(append)
    return " ".join(words)


@click.command()
@click.option(
    "--kernel",
    type=click.Path(path_type=Path),
    help="A kernel built with CONFIG_KUNIT=y (guest_images/build.sh --kunit builds one).",
)
@click.option("--raw", "raw", metavar="FILE@ADDR", help="Instead of --kernel: a flat binary started in real mode.")
@click.option("--initrd", type=click.Path(path_type=Path), help="An initramfs for the kernel (rarely needed).")
@click.option("--append", help="Extra kernel command-line words.")
@click.option(
    "--filter",
    "filter_glob",
    metavar="GLOB",
    help="Run only the suites (SUITE) or tests (SUITE.TEST) matching GLOB: kunit.filter_glob=GLOB.",
)
@click.option("--mem", "memory", metavar="SIZE", help="Guest RAM: 256M, 1G; a bare number is MiB.")
@click.option("--cpus", default=1, show_default=True, type=click.IntRange(1, 255), help="Number of vCPUs.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_TIMEOUT_SECONDS,
    show_default=True,
    help="End the run after this many seconds (exit status 124).",
)
@click.option("--max-exits", "max_exits", metavar="N|KIND=N,...", help="An exit budget, as for pyhv run (118).")
@click.option("--junit", type=click.Path(path_type=Path, dir_okay=False), help="Write JUnit XML here.")
@click.option("--tap", type=click.Path(path_type=Path, dir_okay=False), help="Write the results as KTAP here.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write kunit.py's JSON (its --json layout) here.",
)
@click.option(
    "--report",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write pyhv's JSON run report, with a kunit section, here.",
)
@click.option(
    "--console-log", type=click.Path(path_type=Path, dir_okay=False), help="Write everything the kernel printed here."
)
@click.option("--show-console", is_flag=True, help="Copy the kernel's console to stderr while it runs.")
def kunit(**options: object) -> None:
    """Boot a KUnit kernel and report its test results.

    \b
    Prints a summary like kunit.py's. Exit status: 0 every test passed or was skipped; 100 a
    test failed; 101 a test crashed (no result: panic, oops, reset mid-test); 102 no test plan;
    103 no KTAP on the console; 104 no tests ran; the run's own status when it ended for an
    infrastructure reason first (1 hypervisor error, 122, 123, 124 timeout, 130); 2 usage,
    3 bad input, 4 KVM unavailable. See docs/exit-status.md and docs/ci.md.
    """
    sys.exit(_kunit(options))


def _kunit(options: dict[str, object]) -> int:
    from hypervisor.cli.run import _parse_memory, _parse_raw
    from hypervisor.console import MemoryConsole
    from hypervisor.launch import RunOptions, create_machine

    machine = None
    try:
        if (options["kernel"] is None) == (options["raw"] is None):
            raise ConfigError("pyhv kunit needs --kernel PATH (a kernel built with CONFIG_KUNIT=y) or --raw FILE@ADDR")
        outputs = {name: options[name] for name in ("junit", "tap", "json_path", "report", "console_log")}
        _check_outputs(outputs)  # type: ignore[arg-type]
        exit_budget = None
        if options["max_exits"] is not None:
            from hypervisor.ci.exit_budget import ExitBudget

            exit_budget = ExitBudget.parse(str(options["max_exits"]))
        raw = _parse_raw(options["raw"])  # type: ignore[arg-type]
        append = kunit_cmdline(options["filter_glob"], options["append"]) if raw is None else None  # type: ignore[arg-type]
        if raw is not None and (options["filter_glob"] is not None or options["append"] is not None):
            raise ConfigError("--filter and --append go on a kernel's command line: they need --kernel")
        run_options = RunOptions(
            kernel=options["kernel"],  # type: ignore[arg-type]
            initrd=options["initrd"],  # type: ignore[arg-type]
            append=append,
            raw=raw,
            memory_mib=_parse_memory(options["memory"]),  # type: ignore[arg-type]
            cpus=int(options["cpus"]),  # type: ignore[call-overload]
            timeout=float(options["timeout"]),  # type: ignore[arg-type]
        )
        console = MemoryConsole()
        machine, info = create_machine(run_options, console)
        if options["show_console"]:
            machine.output_watchers.append(_copy_to_stderr)
        machine.exit_budget = exit_budget
        try:
            with sigterm_raises():  # as Ctrl-C: wait() turns it into the outcome "interrupted", 130
                result = machine.run(run_options.timeout)
        finally:
            machine.close()
        return _conclude(result, info, machine.observer.timeline(), console.data(), outputs)  # type: ignore[arg-type]
    except HypervisorError as error:
        if machine is not None:
            machine.close()
        click.echo(f"pyhv: error: {error}", err=True)
        return error.exit_status
    except OSError as error:
        click.echo(f"pyhv: error: {error}", err=True)
        return 1
    except Exception as error:  # a bug of ours: one line for the user, the traceback with -vv
        log.debug("unexpected error", exc_info=True)
        click.echo(f"pyhv: internal error: {error!r} (run with -vv for the traceback)", err=True)
        return 1


def _check_outputs(outputs: dict[str, Path | None]) -> None:
    from hypervisor.output_paths import check_writable_file

    for name, path in outputs.items():
        if path is not None:
            check_writable_file(path, "--" + name.removesuffix("_path").replace("_", "-"))


def _conclude(result: object, info: object, timeline: dict[str, float], console: bytes,
              outputs: dict[str, Path | None]) -> int:  # fmt: skip
    """Parses the console, prints the summary and the verdict, writes the files asked for."""
    from hypervisor.ci import kunit_report
    from hypervisor.ci.ktap import parse_ktap_text
    from hypervisor.ci.kunit_verdict import kunit_verdict
    from hypervisor.machine import RunResult
    from hypervisor.report import build_report

    assert isinstance(result, RunResult)
    ktap = parse_ktap_text(console.decode("utf-8", errors="replace"))
    verdict = kunit_verdict(ktap, result.outcome)
    for line in kunit_report.summary_lines(ktap):
        click.echo(line)
    for error in ktap.errors:
        click.echo(f"[pyhv] {error}")
    summary = {
        "verdict": verdict.name, "exit_status": verdict.exit_status, "detail": verdict.detail,
        "outcome_class": verdict.outcome_class.value, "complete": ktap.complete, "plan": ktap.plan,
        "counts": vars(ktap.counts) | {"tests": ktap.counts.total}, "crash": ktap.crash,
        "run_outcome": result.outcome.kind.value, "errors": ktap.all_errors(),
    }  # fmt: skip
    documents: dict[str, object] = {
        "junit": lambda: kunit_report.junit_xml(ktap),
        "tap": lambda: kunit_report.tap_text(ktap),
        "json_path": lambda: kunit_report.kunit_json(ktap, kernel=getattr(info, "kernel", None), extra=summary),
        "report": lambda: _report_text(build_report(result, info, timeline) | {"kunit": summary}),  # type: ignore[arg-type]
        "console_log": lambda: console.decode("utf-8", errors="replace"),
    }
    status = verdict.exit_status
    for name, path in outputs.items():
        if path is None:
            continue
        try:
            kunit_report.write_text_atomically(path, documents[name]())  # type: ignore[operator]
        except OSError as error:
            click.echo(f"pyhv: error: cannot write {path}: {error.strerror}", err=True)
            status = status or 1  # a CI reads that file: a pass without it is no pass
    click.echo(f"pyhv: kunit {verdict.describe()} (exit status {verdict.exit_status}, {verdict.outcome_class.value})",
               err=True)  # fmt: skip
    return status


def _report_text(report: dict[str, object]) -> str:
    import json

    return json.dumps(report, indent=2) + "\n"


def _copy_to_stderr(data: bytes) -> None:
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()
