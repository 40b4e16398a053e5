"""Running kvm-unit-tests one configuration at a time, under pyhv or QEMU TCG, like run_tests.sh.

Each test runs in its own process (`pyhv run --kernel X.flat --machine qemu-test ...`, or
QEMU's command line from upstream's x86/run with `-accel tcg`), so a test that hangs or crashes
never takes the others with it, and tests can run side by side.

Results follow upstream's scripts/runtime.bash and x86/run: the test writes its status to
isa-debug-exit (0xf4) and the VMM exits with (status << 1) | 1, so 1 is PASS, 77 is SKIP (the
libcflat report_summary() convention), 124 is a timeout and anything else FAIL. Before running,
the same static checks decide SKIP: another arch, the `nodefault` group, an accelerator the
engine is not, a `check` file that does not hold the value, a missing test file.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from hypervisor.conformance.qemu_params import PyhvPlan, plan_for
from hypervisor.conformance.unittests_cfg import TestConfig

log = logging.getLogger(__name__)

ARCH = "x86_64"  # what the shared build is (./configure --arch=x86_64)
STATUS_PASS = 1  # (0 << 1) | 1
STATUS_SKIP = 77  # (38 << 1) | 1: lib/report.c returns 77 >> 1 when every test skipped
STATUS_TIMEOUT = 124
GUARD_SECONDS = 30.0  # beyond a test's own timeout before its process is killed
QEMU_BINARY = "qemu-system-x86_64"
# x86/run: pc-testdev and isa-debug-exit as kvm-unit-tests expect them; pci-testdev is there
# too, so PCI tests find it under QEMU.
QEMU_BASE = ["--no-reboot", "-nodefaults", "-device", "pc-testdev", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4",
             "-display", "none", "-device", "pci-testdev", "-machine", "accel=tcg"]  # fmt: skip
SUMMARY = re.compile(r"^SUMMARY: (.*?)\r?$", re.MULTILINE)
FIRST_FAIL = re.compile(r"^FAIL: (.*?)\r?$", re.MULTILINE)
LAST_SKIP = re.compile(r"^SKIP: (.*?)\r?$", re.MULTILINE)
# How a test dies: an exception with no handler (lib/x86/desc.c) or a failed assert (lib/libcflat.h).
UNHANDLED = re.compile(r"^(Unhandled exception .*?|\S+:\d+: assert failed: .*?)\r?$", re.MULTILINE)
STATUS_ABORT = 127  # (63 << 1) | 1: the test called abort() (scripts/vmm.bash table 3)
PYHV_OUTCOME = re.compile(r"^pyhv: (.*) \(exit status \d+\)$", re.MULTILINE)
PYHV_ERROR = re.compile(r"^pyhv: (?:internal )?error: (.*)$", re.MULTILINE)


class Status(enum.Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"
    TIMEOUT = "TIMEOUT"


class Engine(enum.Enum):
    PYHV = "pyhv"
    QEMU_TCG = "qemu-tcg"


@dataclass
class TestResult:
    __test__ = False  # a data class, not a pytest test class

    name: str
    engine: Engine
    status: Status
    reason: str = ""
    seconds: float = 0.0
    exit_status: int | None = None
    log: Path | None = None
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One line as run_tests.sh prints it: `PASS name (summary)`."""
        return f"{self.status.value} {self.name}" + (f" ({self.reason})" if self.reason else "")


def static_skip(test: TestConfig, directory: Path, engine: Engine, include_nodefault: bool = False) -> str | None:
    """Why upstream's runner would not start `test` here, or None (scripts/runtime.bash)."""
    if "nodefault" in test.groups and not include_nodefault:
        return "test marked as manual run only"
    if test.arch and test.arch != ARCH:
        return f"{test.arch} only"
    if test.accel and test.accel != ("kvm" if engine is Engine.PYHV else "tcg"):
        return f"{test.accel} only, but ACCEL={'kvm' if engine is Engine.PYHV else 'tcg'}"
    if test.disabled_if:
        return f"disabled_if is a shell condition ({test.disabled_if}), which this runner does not evaluate"
    for check in test.check:
        path, _, value = check.partition("=")
        try:
            actual = Path(path).read_text().strip()
        except OSError:
            actual = None
        if actual != value:
            return f"{path} not equal to {value}"
    if not (directory / test.file).is_file():
        return f"Test file '{directory / test.file}' not found"
    return None


def pyhv_command(test: TestConfig, directory: Path, log_path: Path, plan: PyhvPlan) -> list[str]:
    command = [sys.executable, "-m", "hypervisor", "run", "--kernel", str(directory / test.file),
               "--machine", "qemu-test", "--cpus", str(plan.cpus), "--mem", str(plan.memory_mib),
               "--timeout", f"{test.timeout:g}", "--console", f"file:{log_path}"]  # fmt: skip
    for device in plan.devices:
        command += ["--device", device]
    if plan.test_args:
        command += ["--append", plan.test_args]
    return command


def qemu_command(test: TestConfig, directory: Path, qemu: str) -> list[str]:
    import shlex

    from hypervisor.conformance.qemu_params import expand_backticks

    params, _ = expand_backticks(test.params)
    args, _ = expand_backticks(test.test_args)
    command = [qemu, *QEMU_BASE, "-serial", "stdio", "-kernel", str(directory / test.file), "-smp", str(test.smp)]
    command += shlex.split(params)
    if args:
        command += ["-append", args]
    return command


def _excerpt(pattern: re.Pattern[str], text: str, last: bool = False) -> str:
    found = pattern.findall(text)
    if not found:
        return ""
    return str(found[-1] if last else found[0]).strip()


def _line_before_summary(console: str) -> str:
    """The message a test printed last before its summary: why it tested nothing, typically
    ("SVM not available", "WARNING: vmx not supported, add '-cpu host'")."""
    lines = [line.strip() for line in console.splitlines() if line.strip()]
    for index in range(len(lines) - 1, 0, -1):
        if lines[index].startswith("SUMMARY: "):
            return lines[index - 1].removeprefix("WARNING: ")
    return ""


def classify(engine: Engine, exit_status: int | None, console: str, stderr: str, timeout: float) -> tuple[Status, str]:
    """The result of one finished run, and the reason to print with it."""
    summary = _excerpt(SUMMARY, console, last=True)
    if exit_status == STATUS_PASS:
        return Status.PASS, summary
    if exit_status == STATUS_SKIP:
        return Status.SKIP, _excerpt(LAST_SKIP, console, last=True) or _line_before_summary(console) or summary
    if exit_status is None or exit_status == STATUS_TIMEOUT:
        return Status.TIMEOUT, f"no result within {timeout:g} s" + (f"; last: {summary}" if summary else "")
    if engine is Engine.PYHV:
        outcome = _excerpt(PYHV_OUTCOME, stderr, last=True) or _excerpt(PYHV_ERROR, stderr, last=True)
        if outcome.startswith("debug-exit"):
            outcome = ""  # the test's own status: its summary says more
    else:
        outcome = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        if exit_status == 0 and not outcome:
            outcome = "QEMU exited without the test's status (no isa-debug-exit write)"
    failure = _excerpt(FIRST_FAIL, console)
    crash = _excerpt(UNHANDLED, console)
    aborted = "the test called abort()" if exit_status == STATUS_ABORT else ""
    parts = [part for part in (summary, f"first: {failure}" if failure else "", crash, aborted, outcome) if part]
    return Status.FAIL, "; ".join(parts) or f"exit status {exit_status}"


def _run_process(command: Sequence[str], stdout_path: Path | None, limit: float,
                 niceness: int) -> tuple[int | None, str, float]:  # fmt: skip
    """Runs `command` in its own process group; (exit status or None when killed, stderr, s)."""
    if niceness:
        command = ["nice", "-n", str(niceness), *command]
    started = time.monotonic()
    stdout = open(stdout_path, "wb") if stdout_path is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE,
                                   start_new_session=True)  # fmt: skip
        try:
            _, stderr = process.communicate(timeout=limit)
            status: int | None = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            _, stderr = process.communicate()
            status = None
    finally:
        if stdout_path is not None:
            stdout.close()  # type: ignore[union-attr]
    return status, stderr.decode(errors="replace"), time.monotonic() - started


def run_test(test: TestConfig, directory: Path, engine: Engine, workdir: Path, *, niceness: int = 0,
             include_nodefault: bool = False, qemu: str | None = None) -> TestResult:  # fmt: skip
    """Runs one configuration and classifies it; never raises for a failing test."""
    skip = static_skip(test, directory, engine, include_nodefault)
    if skip:
        return TestResult(test.name, engine, Status.SKIP, skip)
    log_dir = workdir / engine.value
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{test.name}.log"
    log_path.unlink(missing_ok=True)
    if engine is Engine.PYHV:
        plan = plan_for(test.params, test.smp, test.test_args)
        if plan.unsupported:
            return TestResult(test.name, engine, Status.SKIP, plan.unsupported, notes=plan.notes)
        command = pyhv_command(test, directory, log_path, plan)
        # pyhv ends the run itself at the timeout (status 124); the guard is for pyhv's own hang.
        status, stderr, seconds = _run_process(command, None, test.timeout + GUARD_SECONDS, niceness)
        notes = plan.notes
    else:
        command = qemu_command(test, directory, qemu or QEMU_BINARY)
        status, stderr, seconds = _run_process(command, log_path, test.timeout, niceness)
        notes = []
    console = log_path.read_text(errors="replace") if log_path.exists() else ""
    if stderr:
        log_path.with_suffix(".stderr").write_text(stderr)  # kept beside the console for a post-mortem
    if engine is Engine.QEMU_TCG and status == 1 and not console.strip() and stderr.strip():
        # scripts/runtime.bash premature_failure(): QEMU refused the options before the test ran.
        return TestResult(test.name, engine, Status.SKIP, stderr.strip().splitlines()[-1], seconds, status, log_path)
    result_status, reason = classify(engine, status, console, stderr, test.timeout)
    log.debug("%s %s: exit %s in %.1f s", engine.value, test.name, status, seconds)
    return TestResult(test.name, engine, result_status, reason, seconds, status, log_path, notes)


def qemu_available(qemu: str | None = None) -> str | None:
    """The QEMU binary's path, or None when it is not installed."""
    return shutil.which(qemu or QEMU_BINARY)


def run_suite(tests: Iterable[TestConfig], directory: Path, engine: Engine, workdir: Path, *, jobs: int = 1,
              niceness: int = 0, include_nodefault: bool = False, qemu: str | None = None,
              on_result: Callable[[TestResult], None] | None = None) -> list[TestResult]:  # fmt: skip
    """Runs `tests`, `jobs` at a time; results in the order of `tests`, each reported as it ends."""
    tests = list(tests)
    results: list[TestResult | None] = [None] * len(tests)

    def one(index: int) -> None:
        result = run_test(tests[index], directory, engine, workdir, niceness=niceness,
                          include_nodefault=include_nodefault, qemu=qemu)  # fmt: skip
        results[index] = result
        if on_result is not None:
            on_result(result)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(one, index) for index in range(len(tests))]:
            future.result()
    return [result for result in results if result is not None]
