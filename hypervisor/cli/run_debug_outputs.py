"""`pyhv run`'s debugging outputs: `--trace FILE`, `--post-mortem DIR`, `--kernel-symbols PATH`,
`--exit-history N` (docs/debugging.md, "Exit traces" and "Post-mortems").

Kept apart from run.py so that the run command gains one decorator and a few calls: paths are
checked before the guest runs (one ConfigError line, exit 3), the trace hook goes on the machine,
the post-mortem is collected after the vCPU threads stopped and before the machine closes, and
its text and files come after the outcome line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import click

from hypervisor.errors import ConfigError, HypervisorError

if TYPE_CHECKING:
    from hypervisor.debug.postmortem import PostMortem
    from hypervisor.debug.symbols import SymbolTable
    from hypervisor.debug.trace import JsonTracer
    from hypervisor.launch import LaunchInfo
    from hypervisor.machine import Machine, RunResult

F = TypeVar("F", bound=Callable[..., Any])
MAX_EXIT_HISTORY = 100_000


def debug_output_options(command: F) -> F:
    options = [
        click.option("--trace", "trace_path", type=click.Path(path_type=Path),
                     help="Write every exit that reaches Python to this file as JSON lines, with what the device "
                          "made of it, and the C fast path's counts at the end (pyhv trace summarize|plot)."),
        click.option("--trace-no-rip", is_flag=True,
                     help="Leave RIP out of --trace lines (saves one KVM_GET_REGS per exit)."),
        click.option("--post-mortem", "post_mortem_dir", type=click.Path(path_type=Path),
                     help="When the guest crashes or times out, write report.json, regs.txt, exits.jsonl and "
                          "console.txt into this folder."),
        click.option("--kernel-symbols", type=click.Path(path_type=Path),
                     help="System.map or an ELF vmlinux with symbols: post-mortems show RIP and stack return "
                          "addresses as symbol+offset."),
        click.option("--exit-history", type=click.IntRange(0, MAX_EXIT_HISTORY), default=None,
                     help="Exits kept for the post-mortem (default 32 with --post-mortem or --report, else 0)."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


class DebugOutputs:
    """What `pyhv run` was asked to record, from the parsed options."""

    def __init__(self, options: dict[str, object]) -> None:
        from hypervisor.outcome import POST_MORTEM_EXIT_HISTORY as DEFAULT_EXIT_HISTORY

        self.trace_path: Path | None = options.get("trace_path")  # type: ignore[assignment]
        self.trace_rip = not options.get("trace_no_rip")
        self.post_mortem_dir: Path | None = options.get("post_mortem_dir")  # type: ignore[assignment]
        symbols_path: Path | None = options.get("kernel_symbols")  # type: ignore[assignment]
        history = options.get("exit_history")
        wants_history = self.post_mortem_dir is not None or bool(options.get("report"))
        self.exit_history = int(history) if isinstance(history, int) else (DEFAULT_EXIT_HISTORY if wants_history else 0)
        self.symbols: SymbolTable | None = None
        self.tracer: JsonTracer | None = None
        self._trace_stream: IO[str] | None = None
        self.post_mortem: PostMortem | None = None
        if self.trace_path is not None and options.get("trace_exits") is not None:
            if Path(str(options["trace_exits"])).resolve() == self.trace_path.resolve():
                raise ConfigError("--trace and --trace-exits name the same file")
        if self.post_mortem_dir is not None:
            from hypervisor.debug.postmortem_files import check_post_mortem_dir

            check_post_mortem_dir(self.post_mortem_dir)
        if symbols_path is not None:
            from hypervisor.debug.symbols import load_symbols

            self.symbols = load_symbols(symbols_path)
        if self.trace_path is not None:
            try:
                self._trace_stream = open(self.trace_path, "w", buffering=1 << 16)
            except OSError as error:
                raise ConfigError(f"cannot write the exit trace {self.trace_path}: {error.strerror}") from error

    def attach(self, machine: Machine) -> None:
        if self._trace_stream is not None:
            from hypervisor.debug.trace import JsonTracer

            self.tracer = JsonTracer(self._trace_stream, rip=self.trace_rip)
            machine.add_exit_hook(self.tracer)

    def collect(self, machine: Machine, result: RunResult) -> None:
        """After `wait()` returned, before `close()`: the trace's aggregates and the post-mortem."""
        if self.tracer is not None:
            self.tracer.finish(result, machine.runners)
        from hypervisor.outcome import is_crash

        if is_crash(result.outcome):
            from hypervisor.debug.postmortem import collect

            self.post_mortem = collect(machine, result.outcome, self.symbols)

    def report_section(self) -> dict[str, object] | None:
        return self.post_mortem.to_dict() if self.post_mortem is not None else None

    def finish(self, result: RunResult, info: LaunchInfo, timeline: dict[str, float]) -> None:
        """The stderr post-mortem and the --post-mortem files (after the outcome line)."""
        self.close()
        if self.post_mortem is None:
            return
        from hypervisor.debug.postmortem_files import format_summary, write_post_mortem
        from hypervisor.report import build_report

        click.echo(format_summary(self.post_mortem), err=True)
        if self.post_mortem_dir is not None:
            report = build_report(result, info, timeline, post_mortem=self.report_section())
            try:
                write_post_mortem(self.post_mortem_dir, self.post_mortem, report)
            except HypervisorError as error:
                click.echo(f"pyhv: error: {error}", err=True)
                return
            click.echo(f"pyhv: post-mortem written to {self.post_mortem_dir}", err=True)

    def close(self) -> None:
        if self._trace_stream is None:
            return
        stream, self._trace_stream = self._trace_stream, None
        try:
            stream.close()
        except OSError as error:  # the final flush of a full disk: the tracer's one warning
            if self.tracer is not None and not self.tracer.failed:
                self.tracer.stop(error)
