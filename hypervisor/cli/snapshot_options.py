"""`pyhv run --save PATH --save-on PATTERN` and `pyhv run --restore PATH` (docs/snapshots.md)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import click

from hypervisor.console import PhaseWatcher
from hypervisor.errors import ConfigError, HypervisorError

if TYPE_CHECKING:
    from hypervisor.machine import Console, Machine

log = logging.getLogger(__name__)


def check_save_options(save: Path | None, save_on: str | None) -> None:
    if save_on is not None and save is None:
        raise ConfigError("--save-on needs --save PATH")
    if save is not None and save_on is None:
        raise ConfigError("--save PATH needs a trigger: --save-on 'PATTERN' (the console prints it)")
    if save is not None:
        if save.exists():
            raise ConfigError(f"--save {save} already exists")
        if not save.parent.is_dir():
            raise ConfigError(f"--save {save}: the directory {save.parent} does not exist")
    if save_on is not None and not save_on:
        raise ConfigError("--save-on needs a non-empty pattern")


def arm_save(machine: Machine, save: Path, save_on: str) -> None:
    """Saves the machine once, the first time the console prints `save_on`; the run goes on.

    The match happens on a vCPU thread, which cannot wait for every vCPU to park, so the save
    itself runs on the main thread (Machine.call_from_main_thread)."""

    def save_now() -> None:
        try:
            machine.save(str(save))
        except HypervisorError as error:
            click.echo(f"pyhv: error: --save {save}: {error}", err=True)
            return
        finally:
            machine.resume()
        click.echo(f"pyhv: saved the machine to {save}", err=True)

    def on_match(name: str, when: float) -> None:
        # Stop every vCPU right here (this vCPU parks as soon as it is back in its loop), so the
        # snapshot is taken just after the pattern was printed, not a main-thread wake-up later.
        machine.pause(wait=False)
        machine.call_from_main_thread(save_now)

    watcher = PhaseWatcher({"save": save_on.encode()}, on_match=on_match)
    machine.output_watchers.append(watcher)


def restore(path: Path, console: Console | None, disk_overlay: Path | None = None) -> Machine:
    """The saved machine; each disk on a fresh overlay in `disk_overlay` (a folder that need not
    exist yet if its parent does) or in a temporary folder removed at the end of the run."""
    from hypervisor.machine import Machine

    if disk_overlay is not None and not disk_overlay.is_dir():
        if disk_overlay.exists() or not disk_overlay.parent.is_dir():
            raise ConfigError(f"--disk-overlay {disk_overlay} is not a folder (nor can it be made)")
        disk_overlay.mkdir()
    return Machine.restore(str(path), console, disk_overlay=None if disk_overlay is None else str(disk_overlay))
