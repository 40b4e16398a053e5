"""`pyhv exec -- CMD ...`: run one command in a guest, stream its output, return its status.

Booting: the bundled guest's init runs the command given as `pyhv.cmd64=` (guest_images/init),
prints `pyhv guest: command exited with status N` and resets; the command's output is what the
console shows between init's "running command" line and that status line. Restoring
(`--restore PATH`, a guest saved at its shell prompt): the command is typed at the prompt as
`CMD;echo pyhv:$?`, and its output is what follows the echoed line until the line `pyhv:N`
that echo prints. Either way the status is the command's, 0-255, and anything else that ends the run (a
panic, a timeout) keeps `pyhv run`'s status (docs/exit-status.md).
"""

from __future__ import annotations

import base64
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from hypervisor.console import ConsoleBase
from hypervisor.errors import ConfigError, HypervisorError, KvmUnavailableError
from hypervisor.outcome import Outcome, OutcomeKind

if TYPE_CHECKING:
    from hypervisor.disk_overlays import DiskSession

RUNNING = re.compile(rb"pyhv guest: running command: [^\n]*\n")
COMMAND_STATUS = re.compile(rb"pyhv guest: command exited with status (\d+)")
# What a restored shell is given after the command, and the line it prints: the echoed input
# has `$?`, the output the number, so the one cannot be taken for the other. It is short because
# a restored bundled shell spends about 10 ms of emulated tty and line-editing code per typed
# character on kvm_pvm (docs/snapshots.md); the status line must be a whole line of its own.
RESTORED_STATUS_ECHO = b"echo pyhv:$?"
RESTORED_STATUS = re.compile(rb"(?:^|(?<=\n))pyhv:(\d+)\r?\n")
# Linux boots print their log on the console; `quiet` keeps it to errors, so what the user
# sees is the command's output.
QUIET = "quiet"
PVM_USERSPACE_REFUSAL = (
    "this host's KVM is kvm_pvm: a stock kernel's user space cannot make system calls here, so "
    "pyhv exec runs only the bundled kernel (or one with guest_images/patches) unless "
    "--assume-userspace is given; see docs/booting.md"
)


class CommandOutputConsole(ConsoleBase):
    """Shows only the command's output: what comes after `start` matched and before `end`."""

    def __init__(self, start: re.Pattern[bytes], end: re.Pattern[bytes], emit: Callable[[bytes], None],
                 on_status: Callable[[int], None] | None = None) -> None:  # fmt: skip
        super().__init__()
        self._start, self._end, self._emit_output = start, end, emit
        self._on_status = on_status
        self._pending = bytearray()
        self._streaming = False
        self._done = False
        self.status: int | None = None
        self._input = b""

    def set_on_status(self, on_status: Callable[[int], None]) -> None:
        self._on_status = on_status

    def type_ahead(self, data: bytes) -> None:
        """Input given to the guest when the machine starts (the restored shell's command)."""
        self._input = data

    def start(self, feed: Callable[[bytes], object], on_quit: Callable[[], None]) -> None:
        if self._input:
            feed(self._input)

    def _emit(self, data: bytes) -> None:
        if self._done:
            return
        self._pending += data
        if not self._streaming:
            match = self._start.search(self._pending)
            if match is None:
                del self._pending[: max(0, len(self._pending) - 4096)]
                return
            del self._pending[: match.end()]
            self._streaming = True
        end = self._end.search(self._pending)
        if end is not None:
            self._emit_output(bytes(self._pending[: end.start()]))
            self.status = int(end.group(1))
            self._done = True
            if self._on_status is not None:
                self._on_status(self.status)
            return
        # Hold back what could be the start of the end line; the rest goes out now.
        keep = self._pending.rfind(b"\n")
        if keep > 0:
            self._emit_output(bytes(self._pending[:keep]))
            del self._pending[:keep]


def _write_stdout(data: bytes) -> None:
    sys.stdout.buffer.write(data.replace(b"\r\n", b"\n"))
    sys.stdout.buffer.flush()


@click.command("exec")
@click.option("--kernel", type=click.Path(path_type=Path), help="A kernel whose init runs pyhv.cmd (default: bundled).")
@click.option("--initrd", type=click.Path(path_type=Path), help="initramfs (default with the bundled kernel: its own).")
@click.option("--append", help="Extra kernel command-line words.")
@click.option("--mem", "memory", metavar="SIZE", help="Guest RAM (default 256M).")
@click.option("--cpus", default=1, show_default=True, type=click.IntRange(1, 255))
@click.option("--disk", "disks", multiple=True, metavar="SPEC", help="A virtio-blk disk, as for pyhv run.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="End the run after this many seconds.")
@click.option("--restore", type=click.Path(path_type=Path, file_okay=False),
              help="Run the command in a guest saved at its shell prompt (pyhv run --save) instead of booting.")
@click.option("--assume-userspace", is_flag=True, help="On kvm_pvm hosts, run a user kernel anyway.")
@click.argument("command", nargs=-1, required=True)
def exec_command(**options: object) -> None:
    """Run COMMAND in a guest and return its exit status.

    \b
    Exit status: the command's (0-255); otherwise as pyhv run (121 panic, 124 timeout, ...);
    3 bad input; 4 when this host cannot run the guest's user space (kvm_pvm with a user kernel).
    """
    sys.exit(_exec(options))


def _exec(options: dict[str, object]) -> int:
    from hypervisor.cli.run import _parse_disks, _parse_memory
    from hypervisor.kvm import kvm_is_pvm

    words = [str(word) for word in options["command"]]  # type: ignore[attr-defined]
    command = " ".join(shlex.quote(word) for word in words) if len(words) > 1 else words[0]
    machine = None
    session: DiskSession | None = None
    try:
        if options["restore"] is not None:
            if options["kernel"] or options["initrd"] or options["disks"] or options["append"]:
                raise ConfigError("--restore continues a saved guest: no --kernel, --initrd, --disk or --append")
            from hypervisor.machine import Machine

            # The shell stays: printing the status instead of exiting spares the guest a process
            # exit (a second of emulated kernel code on kvm_pvm); the run is stopped at the line.
            console = CommandOutputConsole(re.compile(re.escape(RESTORED_STATUS_ECHO) + rb"\r?\n"), RESTORED_STATUS,
                                           _write_stdout)  # fmt: skip
            console.type_ahead(f"{command};{RESTORED_STATUS_ECHO.decode()}\n".encode())
            machine = Machine.restore(str(options["restore"]), console)
        else:
            if options["kernel"] is not None and kvm_is_pvm() and not options["assume_userspace"]:
                raise KvmUnavailableError(PVM_USERSPACE_REFUSAL)
            from hypervisor.launch import RunOptions, create_machine

            encoded = base64.b64encode(command.encode()).decode()
            extra = str(options["append"] or "")
            append = " ".join(part for part in (QUIET, f"pyhv.cmd64={encoded}", extra) if part)
            console = CommandOutputConsole(RUNNING, COMMAND_STATUS, _write_stdout)
            run_options = RunOptions(
                kernel=options["kernel"],  # type: ignore[arg-type]
                initrd=options["initrd"],  # type: ignore[arg-type]
                append=append,
                memory_mib=_parse_memory(options["memory"]),  # type: ignore[arg-type]
                cpus=int(options["cpus"]),  # type: ignore[call-overload]
                disks=_parse_disks(options["disks"]),  # type: ignore[arg-type]
            )
            if run_options.disks:
                # Throwaway disks (snapshot=on, overlay=) need the run's DiskSession, as in pyhv run.
                from hypervisor.disk_overlays import DiskSession

                session = DiskSession(run_options.disks).__enter__()
            machine, _ = create_machine(run_options, console, session)
        # The status is known once init prints it: end the run there rather than wait for the
        # guest's reboot (a fork and an exec, seconds of emulated kernel code on kvm_pvm).
        running = machine

        def stop_at_status(status: int) -> None:
            running.request_stop(Outcome(OutcomeKind.COMMAND_EXIT, "the command finished", code=status))

        console.set_on_status(stop_at_status)
        with machine:
            result = machine.run(options["timeout"])  # type: ignore[arg-type]
    except HypervisorError as error:
        if machine is not None:
            machine.close()
        click.echo(f"pyhv: error: {error}", err=True)
        return error.exit_status
    finally:
        if session is not None:
            session.close()  # temporary overlays go, whatever ended the run
    if console.status is not None:
        return console.status
    click.echo(f"pyhv: the command did not finish: {result.outcome.describe()} (exit status {result.exit_status})",
               err=True)  # fmt: skip
    return result.exit_status
