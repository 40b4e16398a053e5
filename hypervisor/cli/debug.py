"""`pyhv debug`: boot a guest paused and step through its VM exits at a gdb-like prompt.

The run options are those of `pyhv run` (same names, same checks, the same RunOptions and
create_machine), so a run that misbehaves is debugged by changing one word of its command line.
The guest console goes to stderr (or a file, or nowhere), never to stdout, where the debugger
talks; the debugger reads its commands from the terminal, a `--batch` file, or stdin when that
is not a terminal (scripts and CI). The exit status is the guest's outcome, as with `pyhv run`.
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import click

from hypervisor.console import ConsoleBase, FileConsole, NullConsole
from hypervisor.console.file import write_all
from hypervisor.errors import ConfigError, HypervisorError
from hypervisor.outcome import Outcome, OutcomeKind
from hypervisor.process_signals import sigterm_raises

MAX_SCRIPT_BYTES = 1 << 20  # a command file is typed by hand: a larger one is a wrong path
MAX_LINE_BYTES = 64 * 1024
EXIT_HISTORY = 256  # exits `info exits` can show
SCRIPT_FAILED_STATUS = 3  # a bad command in a script is bad input (docs/exit-status.md)
CONSOLE_HELP = "stderr|file:PATH|none"


class StderrConsole(ConsoleBase):
    """Guest output on stderr, no input: the debugger owns stdin."""

    def _emit(self, data: bytes) -> None:
        try:
            write_all(2, data)
        except OSError:
            pass  # a closed stderr must not stop the guest


class _Terminated(BaseException):
    """SIGTERM: leave the prompt and stop the guest (the outcome is 'interrupted')."""


def _make_console(spec: str) -> ConsoleBase:
    if spec == "stderr":
        return StderrConsole()
    if spec == "none":
        return NullConsole()
    if spec.startswith("file:") and len(spec) > 5:
        return FileConsole(spec[5:])
    if spec == "stdio":
        raise ConfigError("--console stdio: the debugger reads stdin and writes stdout; use stderr, file:PATH or none")
    raise ConfigError(f"--console {spec!r}: use {CONSOLE_HELP.replace('|', ', ')}")


def _stdin_lines() -> Iterator[str]:
    """Commands from a stdin that is not a terminal, line by line as they come (a pipe may be
    fed by another program), each checked to be UTF-8 and of a sane length."""
    number = 0
    while True:
        line = sys.stdin.buffer.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_LINE_BYTES:
            raise ConfigError(f"<stdin>:{number}: a command line longer than {MAX_LINE_BYTES} bytes")
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ConfigError(f"<stdin>:{number}: not UTF-8 text (byte {error.start})") from error


def _read_script(path: Path) -> list[str]:
    try:
        if not path.exists():
            raise ConfigError(f"--batch {path} does not exist")
        if not path.is_file():
            raise ConfigError(f"--batch {path} is not a regular file")
        if path.stat().st_size > MAX_SCRIPT_BYTES:
            raise ConfigError(f"--batch {path} is larger than {MAX_SCRIPT_BYTES // 1024} KiB")
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as error:
        raise ConfigError(f"--batch {path} does not exist") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"--batch {path} is not UTF-8 text (byte {error.start})") from error
    except OSError as error:
        raise ConfigError(f"cannot read --batch {path}: {error.strerror}") from error


@click.command()
@click.option(
    "--kernel",
    type=click.Path(path_type=Path),
    help="Linux bzImage or vmlinux (may be .xz), or a multiboot ELF. Default: the bundled guest.",
)
@click.option("--initrd", type=click.Path(path_type=Path), help="initramfs (may be .xz).")
@click.option("--append", help="Extra kernel command-line words, after pyhv's defaults.")
@click.option(
    "--raw", "raw", metavar="FILE@ADDR", help="A flat binary loaded at ADDR and started in real mode (CS=0, IP=ADDR)."
)
@click.option("--mem", "memory", metavar="SIZE", help="Guest RAM: 256M, 1G; a bare number is MiB.")
@click.option("--cpus", default=1, show_default=True, type=click.IntRange(1, 255), help="Number of vCPUs.")
@click.option(
    "--console",
    "console_spec",
    default="stderr",
    show_default=True,
    metavar=CONSOLE_HELP,
    help="Where the guest's serial console goes (never stdout: the debugger talks there).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="End the session after this many seconds (exit status 124).",
)
@click.option(
    "--disk",
    "disks",
    multiple=True,
    metavar="PATH[,format=raw|qcow2][,readonly=on][,serial=S]",
    help="A virtio-blk disk (repeatable: vda, vdb, ...).",
)
@click.option("--root", help="Boot with this disk as the root file system, e.g. /dev/vda.")
@click.option("--debug-exit-port", default="0x501", show_default=True, help="Port of the debug-exit device.")
@click.option("--debug-exit-qemu", is_flag=True, help="QEMU isa-debug-exit semantics: status = (value << 1) | 1.")
@click.option("--hugepages", is_flag=True, help="Back guest RAM with 2 MiB huge pages (reserved on the host).")
@click.option("--pvh", is_flag=True, help="Enter an ELF vmlinux through its PVH entry point.")
@click.option(
    "--machine",
    "machine_type",
    type=click.Choice(["pc", "qemu-test"]),
    default="pc",
    show_default=True,
    help="qemu-test adds QEMU's isa-debug-exit (0xf4) and pc-testdev.",
)
@click.option(
    "--restore",
    type=click.Path(path_type=Path, file_okay=False),
    help="Debug a machine saved with `pyhv run --save` from where it was saved (docs/snapshots.md).",
)
@click.option(
    "--break",
    "breaks",
    multiple=True,
    metavar="EXPR",
    help="An exit breakpoint set before the guest starts (repeatable), e.g. 'io port=0x3f8 write'.",
)
@click.option(
    "--batch",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Run the debugger commands in this file instead of prompting (one per line, # comments).",
)
def debug(**options: object) -> None:
    """Boot a guest paused before its first instruction and debug its VM exits.

    \b
    Commands: next [N], continue, break EXPR, delete [ID], info exits|regs|sregs|
    devices|breakpoints, x/<n><fmt> ADDR, set reg NAME VALUE, set mem ADDR VALUE,
    set data VALUE, disas [ADDR] [N], trace on|off, vcpu N, help, quit.

    Commands come from the terminal, --batch FILE, or stdin when it is not a terminal. Exit
    status: the guest's outcome, as with `pyhv run` (0 after quit while it still ran); 3 when a
    command of a script failed. See docs/debugging.md.
    """
    sys.exit(_debug(options))


def _debug(options: dict[str, object]) -> int:
    from hypervisor.cli.run import run_options_from
    from hypervisor.debug.break_expr import parse_break_expression
    from hypervisor.debug.repl import ExitDebugger
    from hypervisor.launch import create_machine

    machine = None
    timer: threading.Timer | None = None
    signals = ExitStack()  # SIGTERM's handler while the guest runs, put back in `finally`
    try:
        run_options = run_options_from(options)
        breaks = [str(text) for text in options["breaks"]]  # type: ignore[attr-defined]
        for text in breaks:  # every mistake is found before a VM exists
            try:
                parse_break_expression(text)
            except ConfigError as error:
                raise ConfigError(f"--break {text!r}: {error}") from error
        batch = options["batch"]
        script = _read_script(batch) if isinstance(batch, Path) else None
        console = _make_console(str(options["console_spec"]))
        if options["restore"] is not None:
            if options["kernel"] or options["initrd"] or options["raw"] or options["disks"] or options["append"]:
                raise ConfigError("--restore continues a saved machine: no --kernel, --initrd, --raw, --disk, --append")
            from hypervisor.launch import LaunchInfo
            from hypervisor.machine import Machine

            machine = Machine.restore(str(options["restore"]), console)  # type: ignore[arg-type]
            info = LaunchInfo("restored", str(options["restore"]))
        else:
            machine, info = create_machine(run_options, console)  # type: ignore[arg-type]
        machine.exit_history = deque(maxlen=EXIT_HISTORY)  # read by the vCPU runners made in start()
        interactive = script is None and sys.stdin.isatty()
        debugger = ExitDebugger(machine, sys.stdout, interactive=interactive)
        for text in breaks:
            number = debugger.add_breakpoint(text)
            click.echo(f"breakpoint {number}: {debugger.expressions[number]}")
        # Its own exception, not KeyboardInterrupt: Ctrl-C only pauses the guest or interrupts a
        # command (hypervisor.debug.repl), while SIGTERM must end the session.
        signals.enter_context(sigterm_raises(_Terminated))
        machine.start(paused=True)
        timeout = options["timeout"]
        if timeout is not None:
            timer = _start_timer(machine, float(timeout))  # type: ignore[arg-type]
        where = {"stderr": "on stderr", "none": "discarded"}.get(str(options["console_spec"]),
                                                                  f"in {str(options['console_spec'])[5:]}")  # fmt: skip
        click.echo(f"pyhv debug: {info.kind} guest paused before its first instruction; its console is {where}. "
                   "Type help for the commands.", err=True)  # fmt: skip
        failure = None
        try:
            if script is not None:
                failure = debugger.run_script(script, str(batch))
            elif interactive:
                debugger.run_interactive()
            else:
                failure = debugger.run_script(_stdin_lines(), "<stdin>")
        except _Terminated:
            machine.request_stop(Outcome(OutcomeKind.INTERRUPTED, "terminated on the host"))
        except KeyboardInterrupt:  # Ctrl-C in a script between commands: end the session
            machine.request_stop(Outcome(OutcomeKind.INTERRUPTED, "interrupted on the host"))
        debugger.stop_tracing()
        machine.request_stop(Outcome(OutcomeKind.QUIT, "quit from the debugger"))
        result = machine.wait()
        machine.close()
    except HypervisorError as error:
        if machine is not None:
            machine.close()
        click.echo(f"pyhv: error: {error}", err=True)
        return error.exit_status
    except OSError as error:
        if machine is not None:
            machine.close()
        click.echo(f"pyhv: error: {error}", err=True)
        return 1
    except Exception as error:  # a bug of ours: one line for the user, the traceback with -vv
        import logging

        logging.getLogger(__name__).debug("unexpected error", exc_info=True)
        if machine is not None:
            machine.close()
        click.echo(f"pyhv: internal error: {error!r} (run with -vv for the traceback)", err=True)
        return 1
    finally:
        signals.close()
        if timer is not None:
            timer.cancel()
    click.echo(f"pyhv: {result.outcome.describe()} (exit status {result.exit_status})", err=True)
    if failure is not None:
        click.echo(f"pyhv: error: {failure} (the script stopped there)", err=True)
        return SCRIPT_FAILED_STATUS
    return result.exit_status


def _start_timer(machine: object, seconds: float) -> threading.Timer:
    outcome = Outcome(OutcomeKind.TIMEOUT, f"no outcome within {seconds:g} s")
    timer = threading.Timer(seconds, lambda: machine.request_stop(outcome))  # type: ignore[attr-defined]
    timer.daemon = True
    timer.start()
    return timer
