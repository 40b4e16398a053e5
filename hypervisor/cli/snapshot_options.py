"""`pyhv run --save PATH --save-on PATTERN` and `pyhv run --restore PATH` (docs/snapshots.md)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import click

from hypervisor.debug.phase_watcher import PhaseWatcher
from hypervisor.errors import ConfigError, HypervisorError

if TYPE_CHECKING:
    from hypervisor.console.protocol import Console
    from hypervisor.machine import Machine

log = logging.getLogger(__name__)


def check_save_options(save: Path | None, save_on: str | None, on_request: bool = False) -> None:
    if (save_on is not None or on_request) and save is None:
        raise ConfigError(f"{'--save-on' if save_on is not None else '--save-on-request'} needs --save PATH")
    if save is not None and save_on is None and not on_request:
        raise ConfigError("--save PATH needs a trigger: --save-on 'PATTERN' (the console prints it) or "
                          "--save-on-request (the guest writes port 0x50a)")  # fmt: skip
    if save is not None:
        if save.exists():
            raise ConfigError(f"--save {save} already exists")
        if not save.parent.is_dir():
            raise ConfigError(f"--save {save}: the directory {save.parent} does not exist")
    if save_on is not None and not save_on:
        raise ConfigError("--save-on needs a non-empty pattern")


def arm_save(machine: Machine, save: Path, save_on: str | None, on_request: bool = False,
             stop_after: bool = False) -> None:  # fmt: skip
    """Saves the machine once, the first time the console prints `save_on`; the run goes on.

    The match happens on a vCPU thread, which cannot wait for every vCPU to park, so the save
    itself runs on the main thread (Machine.call_from_main_thread)."""

    def save_now() -> None:
        try:
            machine.save(str(save))
        except HypervisorError as error:
            click.echo(f"pyhv: error: --save {save}: {error}", err=True)
            machine.resume()  # the run goes on unsaved
            return
        click.echo(f"pyhv: saved the machine to {save}", err=True)
        if stop_after:
            from hypervisor.outcome import Outcome, OutcomeKind

            # The vCPUs stay parked: the stop ends them where they were saved.
            machine.request_stop(Outcome(OutcomeKind.SAVED, f"saved to {save}; the run ends there (--save-then stop)"))
        else:
            machine.resume()

    saved = False

    def request() -> None:
        # Stop every vCPU right here (this vCPU parks as soon as it is back in its loop), so the
        # snapshot is taken just after the pattern was printed or the port written, not a
        # main-thread wake-up later. One save per run: the folder must be new.
        nonlocal saved
        if saved:
            return
        saved = True
        machine.pause(wait=False)
        machine.call_from_main_thread(save_now)

    if save_on is not None:
        machine.output_watchers.append(PhaseWatcher({"save": save_on.encode()}, on_match=lambda name, when: request()))
    if on_request:
        from hypervisor.devices.save_request import SAVE_REQUEST_PORT, SAVE_REQUEST_PORT_SIZE, SaveRequestPort

        machine.add_port_device(SaveRequestPort(request), SAVE_REQUEST_PORT, SAVE_REQUEST_PORT_SIZE, "save request")


def restore(path: Path, console: Console | None, disk_overlay: Path | None = None) -> Machine:
    """The saved machine; each disk on a fresh overlay in `disk_overlay` (a folder that need not
    exist yet if its parent does) or in a temporary folder removed at the end of the run."""
    from hypervisor.machine import Machine

    if disk_overlay is not None and not disk_overlay.is_dir():
        if disk_overlay.exists() or not disk_overlay.parent.is_dir():
            raise ConfigError(f"--disk-overlay {disk_overlay} is not a folder (nor can it be made)")
        disk_overlay.mkdir()
    return Machine.restore(str(path), console, disk_overlay=None if disk_overlay is None else str(disk_overlay))
