"""The disks of a snapshot: frozen at the save, a fresh overlay for each restore (docs/snapshots.md).

Save (vCPUs paused, every disk's I/O thread drained): each writable disk is flushed, a new qcow2
overlay backed by the image the guest was writing is created beside that image, the running
device switches to the overlay, and the image underneath becomes the snapshot's *frozen* image:
nothing opens it for writing again (qcow2.rst "Backing file": a backing file is only read). The
header records the frozen image's absolute path, format, virtual size and a cheap identity
(size, mtime_ns, inode and the sha256 of its first MiB), and the same identity for every image
below it in its backing chain (and a qcow2 external data file), so a restore refuses an image
that was changed or replaced meanwhile: every restore reads all of them. A disk given read-only
is already frozen: it is recorded as it is.

Restore: each writable disk gets a fresh qcow2 overlay on its frozen image, in the folder the
user gave (`--disk-overlay DIR`) or in a temporary folder removed when the machine closes; the
frozen image is opened read-only through the overlay's backing chain, so any number of restores
share it at once. A read-only disk is opened read-only again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypervisor.disk_spec import DiskSpec
from hypervisor.errors import ConfigError, HypervisorError

if TYPE_CHECKING:
    from hypervisor.machine import AttachedDisk, Machine
    from hypervisor.virtio.mmio import MmioTransport

log = logging.getLogger(__name__)

TEMPORARY_PREFIX = "pyhv-overlays-"  # the same prefix as hypervisor/disk_overlays.py's folders
HEAD_BYTES = 1 << 20  # the identity hashes this much of the frozen image: cheap, and catches rewrites
FORMATS = ("raw", "qcow2")
RECORD_FIELDS = {"name", "serial", "read_only", "path", "format", "virtual_size", "size", "mtime_ns", "inode",
                 "head_sha256", "below"}  # fmt: skip
BELOW_FIELDS = {"path", "size", "mtime_ns", "inode", "head_sha256"}
QCOW2_MAGIC = b"QFI\xfb"
QCOW2_HEADER_READ = 2 << 20  # the largest cluster (2 MiB) holds the header and the backing name

# Transports whose current image is an overlay in a temporary folder (removed at close): a new
# snapshot cannot refer to it.
_temporary_overlays: weakref.WeakKeyDictionary[MmioTransport, Path] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class FrozenDisk:
    """One disk as the header records it."""

    name: str
    serial: str
    read_only: bool
    path: str  # absolute
    format: str
    virtual_size: int
    size: int
    mtime_ns: int
    inode: int
    head_sha256: str
    # The images under the frozen one, top first: path, size, mtime_ns, inode, head_sha256.
    below: tuple[dict[str, object], ...] = ()

    def to_json(self) -> dict[str, object]:
        record = {key: getattr(self, key) for key in sorted(RECORD_FIELDS)}
        record["below"] = [dict(image) for image in self.below]
        return record


def _identity(path: Path) -> tuple[int, int, int, str]:
    """(size, mtime_ns, inode, sha256 of the first MiB) of the regular file at `path`.

    Opened with O_NONBLOCK and checked with fstat before reading, so a header that names a FIFO
    or a device gets an error instead of a read that waits for ever."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise ConfigError(f"{path} is not a regular file; only image files can be frozen for a snapshot")
        head = hashlib.sha256(os.pread(descriptor, HEAD_BYTES, 0)).hexdigest()
    finally:
        os.close(descriptor)
    return status.st_size, status.st_mtime_ns, status.st_ino, head


def _images_below(image: Path, fmt: str) -> list[Path]:
    """The files a reader of `image` also reads, top first: its backing chain and any qcow2
    external data file (qcow2.rst "Header": backing_file_offset, and the "External data file
    name" extension), resolved as the block layer resolves them."""
    from hypervisor.block.qcow2.backing import MAX_CHAIN_DEPTH, resolve_relative
    from hypervisor.block.qcow2.header import parse_header

    below: list[Path] = []
    seen = {image.resolve()}
    current: Path = image
    current_format: str | None = fmt
    while current_format in ("qcow2", None):  # None: the image names no backing format, so probe it
        descriptor = os.open(current, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            status = os.fstat(descriptor)
            if not stat.S_ISREG(status.st_mode):
                raise ConfigError(f"{current} is not a regular file")
            buffer = os.pread(descriptor, QCOW2_HEADER_READ, 0)
        finally:
            os.close(descriptor)
        if not buffer.startswith(QCOW2_MAGIC):
            break  # a raw image (probed): nothing below it
        header = parse_header(buffer, status.st_size, str(current))
        if header.data_file:
            below.append(Path(resolve_relative(str(current), header.data_file)).resolve())
        if not header.backing_file:
            break
        current = Path(resolve_relative(str(current), header.backing_file)).resolve()
        if current in seen or len(below) >= MAX_CHAIN_DEPTH:
            raise ConfigError(f"{image}: its backing chain loops or is deeper than {MAX_CHAIN_DEPTH}")
        seen.add(current)
        below.append(current)
        current_format = header.backing_format
    return below


def _below_identities(image: Path, fmt: str) -> tuple[dict[str, object], ...]:
    identities = []
    for path in _images_below(image, fmt):
        size, mtime_ns, inode, head = _identity(path)
        identities.append({"path": str(path), "size": size, "mtime_ns": mtime_ns, "inode": inode, "head_sha256": head})
    return tuple(identities)


def _device(disk: AttachedDisk) -> Any:
    return disk.transport.device


def _in_temporary_overlay_folder(image: Path) -> bool:
    """Whether `image` is in a `pyhv-overlays-*` folder of the temporary directory: the folders
    restores without --disk-overlay and `pyhv run --snapshot` / `snapshot=on` (hypervisor/
    disk_overlays.py) remove at the end of their run."""
    parent = image.parent
    return parent.name.startswith(TEMPORARY_PREFIX) and parent.parent == Path(tempfile.gettempdir()).resolve()


def overlay_path_after_save(image: Path, snapshot: Path, name: str) -> Path:
    """Where the running machine goes on writing once `image` is frozen: beside it, named after
    the snapshot, so the user finds the run's later writes next to the disk they gave."""
    return image.with_name(f"{image.name}.{snapshot.name}.{name}.qcow2")


def check_disks_can_freeze(machine: Machine, snapshot: Path) -> None:
    """Everything `freeze_disks` needs, checked before the machine is paused or anything made."""
    for disk in machine.disks:
        if disk.transport in _temporary_overlays:
            raise ConfigError(
                f"{disk.name} runs on an overlay in a temporary folder that is removed at the end of the run; "
                "restore with --disk-overlay DIR to save this machine again"
            )
        image = Path(disk.spec.path).resolve()
        if _in_temporary_overlay_folder(image):
            raise ConfigError(f"{disk.name} runs on {image}, a temporary overlay removed at the end of the run; "
                              "a snapshot cannot refer to it (keep the overlay with --disk-overlay DIR or "
                              "--disk ...,overlay=FILE)")  # fmt: skip
        if not image.is_file():
            raise ConfigError(f"{disk.name}: {image} is not a regular file; only image files can be frozen "
                              "for a snapshot")  # fmt: skip
        if disk.spec.read_only:
            continue
        overlay = overlay_path_after_save(image, snapshot, disk.name)
        if overlay.exists():
            raise ConfigError(f"{disk.name}: {overlay} (the overlay the run would go on in) already exists")
        if not os.access(image.parent, os.W_OK):
            raise ConfigError(f"{disk.name}: cannot create the overlay {overlay}: {image.parent} is not writable")


def freeze_disks(machine: Machine, snapshot: Path) -> list[FrozenDisk]:
    """Freezes every disk (see the module docstring). Call with the vCPUs paused and every
    disk's I/O thread stopped; the devices go on with their new overlays afterwards."""
    return [_freeze(machine, disk, snapshot) for disk in machine.disks]


def _freeze(machine: Machine, disk: AttachedDisk, snapshot: Path) -> FrozenDisk:
    from hypervisor.block.open import open_disk, probe_format
    from hypervisor.block.qcow2.create import Qcow2CreateOptions, create_qcow2

    device = _device(disk)
    image = Path(disk.spec.path).resolve()
    try:
        device.backend.flush()
        fmt = disk.spec.format or probe_format(str(image))
        virtual_size = int(device.backend.size)
        if disk.spec.read_only:
            return _record(disk, image, fmt, virtual_size)
        overlay = overlay_path_after_save(image, snapshot, disk.name)
        create_qcow2(str(overlay), Qcow2CreateOptions(size=virtual_size, backing_file=str(image), backing_format=fmt))
    except (OSError, HypervisorError) as error:
        raise ConfigError(f"{disk.name}: cannot freeze {image}: {error}") from error
    # The writer's lock on the image goes first: the overlay opens it as a reader, which a
    # writer on another file description would refuse (block/locking.py).
    device.backend.close()
    try:
        record = _record(disk, image, fmt, virtual_size)
        machine.swap_disk_backend(device, open_disk(str(overlay), "qcow2", read_only=False, allow_backing=True))
    except BaseException:
        # Keep the machine usable on its old image; the snapshot is abandoned.
        machine.swap_disk_backend(device, open_disk(str(image), fmt, read_only=False, allow_backing=True))
        overlay.unlink(missing_ok=True)
        raise
    disk.spec = DiskSpec(str(overlay), "qcow2", False, disk.spec.serial)
    log.info("%s: %s is frozen for the snapshot; the run goes on in %s", disk.name, image, overlay)
    return record


def _record(disk: AttachedDisk, image: Path, fmt: str, virtual_size: int) -> FrozenDisk:
    size, mtime_ns, inode, head = _identity(image)
    try:
        below = _below_identities(image, fmt)
    except (OSError, HypervisorError) as error:
        raise ConfigError(f"{disk.name}: cannot record the images below {image}: {error}") from error
    return FrozenDisk(disk.name, disk.spec.serial, disk.spec.read_only, str(image), fmt, virtual_size, size, mtime_ns,
                      inode, head, below)  # fmt: skip


def _parse_below(value: object) -> tuple[dict[str, object], ...] | None:
    """A record's `below` list, or None when any entry is damaged."""
    if not isinstance(value, list):
        return None
    entries = []
    for entry in value:
        if not isinstance(entry, dict) or set(entry) != BELOW_FIELDS:
            return None
        if not isinstance(entry["path"], str) or not os.path.isabs(entry["path"]) \
                or not isinstance(entry["head_sha256"], str) \
                or any(not isinstance(entry[key], int) or isinstance(entry[key], bool) or entry[key] < 0
                       for key in ("size", "mtime_ns", "inode")):  # fmt: skip
            return None
        entries.append(dict(entry))
    return tuple(entries)


def parse_records(records: object, folder: Path) -> list[FrozenDisk]:
    """The header's disk records, every value checked; ConfigError (one line) otherwise."""
    if not isinstance(records, list):
        raise ConfigError(f"snapshot {folder}: the header's disks are not a list")
    disks = []
    for index, record in enumerate(records):
        if not isinstance(record, dict) or set(record) != RECORD_FIELDS:
            raise ConfigError(f"snapshot {folder}: disk {index} of the header does not have the fields of this version")
        ints = ("virtual_size", "size", "mtime_ns", "inode")
        strings = ("name", "serial", "path", "format", "head_sha256")
        if any(not isinstance(record[key], int) or isinstance(record[key], bool) or record[key] < 0 for key in ints) \
                or any(not isinstance(record[key], str) for key in strings) \
                or not isinstance(record["read_only"], bool) or record["format"] not in FORMATS \
                or not os.path.isabs(record["path"]) or record["name"] != "vd" + chr(ord("a") + index):  # fmt: skip
            raise ConfigError(f"snapshot {folder}: disk {index} of the header is damaged")
        below = _parse_below(record["below"])
        if below is None:
            raise ConfigError(f"snapshot {folder}: disk {index} of the header is damaged (its images below)")
        disks.append(FrozenDisk(**{**record, "below": below}))
    return disks


def check_frozen(disks: list[FrozenDisk], folder: Path) -> None:
    """Refuses a frozen image, or an image below it, that is missing or not the one the snapshot
    froze."""
    for disk in disks:
        expected: list[tuple[Path, tuple[object, ...], str]] = [
            (Path(disk.path), (disk.size, disk.mtime_ns, disk.inode, disk.head_sha256), "frozen image")
        ]
        for entry in disk.below:
            below = (entry["size"], entry["mtime_ns"], entry["inode"], entry["head_sha256"])
            expected.append((Path(str(entry["path"])), below, "frozen image's backing file"))
        for path, identity, what in expected:
            try:
                found = _identity(path)
            except OSError as error:
                raise ConfigError(f"snapshot {folder}: {disk.name}'s {what} {path} cannot be read "
                                  f"({error.strerror})") from error  # fmt: skip
            except ConfigError as error:
                raise ConfigError(f"snapshot {folder}: {disk.name}'s {what}: {error}") from error
            if found != identity:
                raise ConfigError(f"snapshot {folder}: {disk.name}'s {what} {path} was changed or replaced "
                                  "after the save; the snapshot's disk is lost")  # fmt: skip


def attach_restored_disks(machine: Machine, disks: list[FrozenDisk], overlay_dir: str | None) -> list[Path]:
    """Gives each disk a fresh overlay on its frozen image and attaches them; returns the
    overlays made (the caller removes them if the restore fails later)."""
    if not disks:
        return []
    # Imported only when there is a disk: the qcow2 engine is a tenth of a second of a diskless
    # restore's start-up (`pyhv exec --restore`, benchmarks/snapshot.py).
    from hypervisor.block.qcow2.create import Qcow2CreateOptions, create_qcow2

    writable = [disk for disk in disks if not disk.read_only]
    temporary = overlay_dir is None and bool(writable)
    if overlay_dir is None:
        folder = Path(tempfile.mkdtemp(prefix=TEMPORARY_PREFIX)) if writable else Path()
    else:
        folder = Path(overlay_dir)
        if not folder.is_dir():
            raise ConfigError(f"--disk-overlay {folder} is not a folder")
        for disk in writable:
            if (folder / f"{disk.name}.qcow2").exists():
                raise ConfigError(f"--disk-overlay {folder}: {disk.name}.qcow2 already exists (another restore's "
                                  "overlay?); give an empty folder")  # fmt: skip
    made: list[Path] = []
    specs = []
    try:
        for disk in disks:
            if disk.read_only:
                specs.append(DiskSpec(disk.path, disk.format, True, disk.serial))
                continue
            overlay = folder / f"{disk.name}.qcow2"
            options = Qcow2CreateOptions(size=disk.virtual_size, backing_file=disk.path, backing_format=disk.format)
            create_qcow2(str(overlay), options)
            made.append(overlay)
            specs.append(DiskSpec(str(overlay), "qcow2", False, disk.serial))
        machine.attach_disks(specs)
    except BaseException:
        _remove(made, folder if temporary else None)
        raise
    if temporary:
        remaining = [len(machine.disks)]

        def closed() -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                shutil.rmtree(folder, ignore_errors=True)

        for attached in machine.disks:
            _device(attached).add_close_action(closed)
            if not attached.spec.read_only:
                _temporary_overlays[attached.transport] = folder
    for overlay in made:
        log.info("restored disk overlay %s", overlay)
    return [] if temporary else made


def _remove(overlays: list[Path], folder: Path | None) -> None:
    for overlay in overlays:
        overlay.unlink(missing_ok=True)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
