"""The disks of one run: throwaway overlays, write sets and fault injection (docs/ci.md).

`DiskSession` is a context manager owned by the run. On entry it gives every disk asked for with
`snapshot=on` (or all writable disks with `--snapshot`) a temporary qcow2 overlay backed by the
disk's image, and every `overlay=FILE` disk its kept overlay; the machine then opens the overlay
instead of the image. The base image is never opened for writing: the overlay's backing chain
opens it read-only with QEMU's shared read lock (qcow2.rst "Backing file"; hypervisor/block/
locking.py), so any number of runs share one base, raw or qcow2, while a writer is refused.

On exit (normal end, error, or the KeyboardInterrupt `pyhv run` turns SIGINT/SIGTERM into) the
temporary overlays and their folder are removed. Only SIGKILL can leave one behind: it lies in a
folder named `pyhv-overlays-*` in the temporary directory.

An existing `overlay=FILE` is used again (the guest continues where the last run left it) only
when it is a qcow2 image whose backing file is this very base; anything else there is refused, so
an overlay option never overwrites a file.

`wrap_backend` (given to Machine.attach_disks) puts a WriteSetRecorder next to each disk and, for
disks named in fault rules, a FaultInjector above it; `report()` gives the report's "disks" and
"faults" sections.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from hypervisor.block.backend import BlockBackend
from hypervisor.block.shims import DEFAULT_MAX_RANGES, WriteSetRecorder
from hypervisor.disk_spec import DiskSpec
from hypervisor.errors import ConfigError, ImageError
from hypervisor.faults import FaultInjector, FaultPlan, FaultRule

if TYPE_CHECKING:
    from hypervisor.boot.layout import MmioWindow
    from hypervisor.machine import Machine

log = logging.getLogger(__name__)

TEMPORARY_PREFIX = "pyhv-overlays-"


def disk_name(index: int) -> str:
    """The name Machine.attach_disks gives the index-th disk (vda, vdb, ...)."""
    return "vd" + chr(ord("a") + index)


@dataclass
class SessionDisk:
    name: str
    given: DiskSpec  # what the user asked for
    opened: DiskSpec  # what the machine opens (the overlay, or the disk itself)
    base_format: str | None = None
    temporary: bool = False
    reused: bool = False
    recorder: WriteSetRecorder | None = None

    def to_dict(self) -> dict[str, object]:
        entry: dict[str, object] = {"path": self.given.path, "read_only": self.given.read_only}
        if self.given.throwaway:
            entry["base_format"] = self.base_format
            entry["overlay"] = None if self.temporary else self.opened.path
            entry["overlay_kind"] = "temporary" if self.temporary else "kept"
            entry["overlay_reused"] = self.reused
        if self.recorder is not None:
            entry["write_set"] = self.recorder.to_dict()
        return entry


def _base_format(spec: DiskSpec) -> str:
    from hypervisor.block.open import probe_format

    if os.path.isdir(spec.path):
        raise ImageError(f"{spec.path}: is a directory, not a disk image")
    detected = probe_format(spec.path)
    if spec.format == "qcow2" and detected != "qcow2":
        raise ImageError(f"{spec.path}: not a qcow2 image (no QFI\\xfb magic)")
    return spec.format or detected


def _virtual_size(path: str, fmt: str) -> int:
    """The base's size, opened read-only and shared (as its overlay will open it)."""
    from hypervisor.block.open import open_disk

    backend = open_disk(path, fmt, read_only=True, allow_backing=True)
    try:
        return backend.size
    finally:
        backend.close()


def _is_overlay_of(overlay: str, base: str) -> bool:
    """Whether the qcow2 file `overlay` names `base` (the same file) as its backing file."""
    from hypervisor.block.open import probe_format
    from hypervisor.block.qcow2 import Qcow2Image

    if probe_format(overlay) != "qcow2":
        return False
    image = Qcow2Image.open(overlay, read_only=True, allow_backing=False)
    try:
        backing = image.backing_filename
    finally:
        image.close()
    if not backing:
        return False
    if not os.path.isabs(backing):  # qcow2.rst: relative to the overlay's folder, as QEMU's path_combine
        backing = os.path.join(os.path.dirname(overlay), backing)
    return os.path.realpath(backing) == os.path.realpath(base)


class DiskSession:
    """Overlays, write sets and faults for the disks of one run; use it as a context manager."""

    def __init__(
        self,
        specs: Sequence[DiskSpec],
        *,
        snapshot_all: bool = False,
        faults: Sequence[FaultRule] = (),
        temporary_dir: str | os.PathLike[str] | None = None,
        max_ranges: int = DEFAULT_MAX_RANGES,
    ) -> None:
        self.given = [spec.with_snapshot() if snapshot_all else spec for spec in specs]
        self.plan = FaultPlan(list(faults))
        names = {disk_name(index) for index in range(len(self.given))}
        unknown = sorted(self.plan.disks() - names)
        if unknown:
            have = ", ".join(sorted(names)) or "no disks"
            raise ConfigError(f"--fault names {', '.join(unknown)}, but this run has {have}")
        self.temporary_dir = temporary_dir
        self.max_ranges = max_ranges
        self.disks: list[SessionDisk] = []
        self._folder: Path | None = None
        self._wrapped = 0
        self._closed = False

    # -- overlays ------------------------------------------------------------------------------

    def __enter__(self) -> DiskSession:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def open(self) -> None:
        """Creates the overlays; the specs to open are then `specs()`."""
        for index, spec in enumerate(self.given):
            self.disks.append(self._prepare(disk_name(index), spec))

    def specs(self) -> list[DiskSpec]:
        return [disk.opened for disk in self.disks]

    def _prepare(self, name: str, spec: DiskSpec) -> SessionDisk:
        if not spec.throwaway:
            return SessionDisk(name, spec, spec)
        fmt = _base_format(spec)
        base = os.path.abspath(spec.path)
        if spec.overlay is None:
            overlay, temporary, reused = str(self._temporary_folder() / f"{name}.qcow2"), True, False
        else:
            overlay, temporary = os.path.abspath(spec.overlay), False
            reused = self._check_kept_overlay(spec.overlay, base)
        if not reused:
            self._create_overlay(overlay, base, fmt, spec)
        log.info("%s: writes go to %s overlay %s over %s (%s, read-only)", name,
                 "a temporary" if temporary else "the kept", overlay, base, fmt)  # fmt: skip
        opened = replace(spec, path=overlay, format="qcow2", snapshot=False, overlay=None)
        return SessionDisk(name, spec, opened, fmt, temporary, reused)

    def _temporary_folder(self) -> Path:
        if self._folder is None:
            try:
                self._folder = Path(tempfile.mkdtemp(prefix=TEMPORARY_PREFIX, dir=self.temporary_dir))
            except OSError as error:
                raise ConfigError(f"cannot create a folder for temporary overlays: {error.strerror}") from error
        return self._folder

    @staticmethod
    def _check_kept_overlay(overlay: str, base: str) -> bool:
        """True: `overlay` exists and is an overlay of `base` (used again). False: it does not exist."""
        if os.path.realpath(overlay) == os.path.realpath(base):
            raise ConfigError(f"--disk {base}: overlay= names the base image itself")
        if not os.path.lexists(overlay):
            return False
        if not os.path.isfile(overlay):
            raise ConfigError(f"--disk overlay={overlay}: exists and is not a regular file")
        if not _is_overlay_of(overlay, base):
            raise ConfigError(f"--disk overlay={overlay}: the file exists and is not a qcow2 overlay of {base}; "
                              "remove it or name a new file")  # fmt: skip
        return True

    @staticmethod
    def _create_overlay(overlay: str, base: str, fmt: str, spec: DiskSpec) -> None:
        from hypervisor.block.qcow2.create import Qcow2CreateOptions, create_qcow2

        size = _virtual_size(base, fmt)
        # The backing name is absolute, so the overlay works from any folder; the base's format
        # is recorded so it is never probed again (qcow2.rst header extension 0xe2792aca).
        create_qcow2(overlay, Qcow2CreateOptions(size=size, backing_file=base, backing_format=fmt))

    # -- shims ---------------------------------------------------------------------------------

    def wrap_backend(self, backend: BlockBackend) -> BlockBackend:
        """For Machine.attach_disks, which calls it once per disk in order."""
        disk = self.disks[self._wrapped]
        self._wrapped += 1
        disk.recorder = WriteSetRecorder(backend, self.max_ranges)
        if disk.name not in self.plan.disks():
            return disk.recorder
        return FaultInjector(disk.recorder, disk.name, self.plan)

    def attach(self, machine: Machine) -> list[MmioWindow]:
        """Attaches the disks to `machine` and arms the fault rules on its console and exits."""
        if not self.disks and self.given:
            self.open()
        windows = machine.attach_disks(self.specs(), wrap_backend=self.wrap_backend)
        if self.plan.rules:
            machine.output_watchers.append(self.plan.console)
            self.plan.arm(machine.exit_count)
        return windows

    def stop(self) -> None:
        """The run is over: slow requests stop waiting (call before closing the machine)."""
        self.plan.stopping.set()

    # -- report and teardown ----------------------------------------------------------------------

    def write_sets(self) -> dict[str, dict[str, object]]:
        return {disk.name: disk.recorder.to_dict() for disk in self.disks if disk.recorder is not None}

    def report(self) -> dict[str, object]:
        """The report's "disks" (per disk: paths, overlay, write set) and "faults" sections."""
        sections: dict[str, object] = {"disks": {disk.name: disk.to_dict() for disk in self.disks}}
        if self.plan.rules:
            sections["faults"] = self.plan.to_dict()
        return sections

    def close(self) -> None:
        """Removes the temporary overlays (their folder); kept overlays stay."""
        if self._closed:
            return
        self._closed = True
        self.stop()
        if self._folder is not None:
            try:
                shutil.rmtree(self._folder)
            except OSError as error:
                # Logged, not raised: teardown must not hide the run's own outcome or error.
                log.error("cannot remove the temporary overlays in %s: %s", self._folder, error.strerror)
            else:
                log.info("removed the temporary overlays in %s", self._folder)
