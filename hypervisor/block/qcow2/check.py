"""`qemu-img check` for qcow2: recount every cluster reference, compare with the stored refcounts.

The checker reads the file itself (not through Qcow2Image), so it also works on images the engine
refuses to write to. It counts one reference for every host cluster that something points at:
the header cluster, the refcount table and blocks, the active and every snapshot L1 table, each
L2 table once per L1 entry naming it, each data cluster once per L2 entry naming it (a compressed
cluster once for every host cluster its bytes touch), the snapshot table, the bitmap directory,
bitmap tables and bitmap data, and the encryption header (qcow2.rst "Host cluster management").

Then, as QEMU's qcow2-refcount.c does: a stored refcount below the count is a corruption (the
cluster could be reused while in use), above it a leak (wasted space, no harm to data); an L1/L2
entry whose COPIED flag disagrees with "refcount == 1" is a corruption too.

Repair (`-r leaks` / `-r all`): leaks are fixed in place by lowering refcounts, which a crash can
only undo, never make worse. Too-low refcounts are fixed by building a complete new refcount table
and blocks after the end of the file, flushing them, and only then switching the header's
refcount_table_offset/clusters with one 12-byte write: a crash before the switch leaves the old
(still self-consistent) structures, after it the new ones. COPIED flags are fixed last.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from hypervisor.block.qcow2 import format as fmt
from hypervisor.block.qcow2.check_refcounts import RefcountReader, write_refcount_structure
from hypervisor.block.qcow2.check_walk import ImageFile, ReferenceCounter, read_image_file
from hypervisor.errors import ConfigError, ImageError

log = logging.getLogger(__name__)

REPAIR_MODES = ("leaks", "all")

# Header byte offsets (qcow2.rst "Header").
HEADER_REFCOUNT_TABLE_OFFSET = 48  # refcount_table_offset (8) + refcount_table_clusters (4)
HEADER_INCOMPATIBLE_FEATURES = 72


@dataclass
class CheckResult:
    """The numbers `qemu-img check` reports, with its JSON names in `to_json`."""

    filename: str
    format: str = "qcow2"
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    # Lines QEMU prints on stderr ("ERROR cluster 5 refcount=0 reference=1", "Leaked cluster ...").
    messages: list[str] = field(default_factory=list)
    repaired: bool = False

    @property
    def exit_status(self) -> int:
        """qemu-img check: 1 check incomplete, 2 corruptions, 3 only leaks, 0 clean."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json(self) -> dict[str, Any]:
        """qemu-img's ImageCheck object: optional counters appear only when non-zero."""
        data: dict[str, Any] = {}
        optional = (
            ("image-end-offset", self.image_end_offset),
            ("total-clusters", self.total_clusters),
            ("corruptions", self.corruptions),
            ("leaks", self.leaks),
            ("corruptions-fixed", self.corruptions_fixed),
            ("leaks-fixed", self.leaks_fixed),
            ("allocated-clusters", self.allocated_clusters),
            ("fragmented-clusters", self.fragmented_clusters),
            ("compressed-clusters", self.compressed_clusters),
        )
        for key, value in optional:
            if value:
                data[key] = value
        data["check-errors"] = self.check_errors
        data["filename"] = self.filename
        data["format"] = self.format
        return data


@dataclass
class _Scan:
    """One counting pass: expected references and the problems found on the way."""

    counter: ReferenceCounter
    stored: RefcountReader
    leaked: list[int]
    too_low: list[int]
    corruptions: int
    image_end_offset: int


def _scan(image: ImageFile, messages: list[str]) -> _Scan:
    counter = ReferenceCounter(image, messages)
    counter.count_everything()
    stored = RefcountReader(image, messages)
    leaked: list[int] = []
    too_low: list[int] = []
    highest = -1
    file_clusters = -(-image.file_size // image.cluster_size)
    for index in range(max(file_clusters, counter.size)):
        expected = counter.get(index)
        actual = stored.get(index)
        if expected or actual:
            highest = index
        if actual < expected:
            messages.append(f"ERROR cluster {index} refcount={actual} reference={expected}")
            too_low.append(index)
        elif actual > expected:
            messages.append(f"Leaked cluster {index} refcount={actual} reference={expected}")
            leaked.append(index)
    return _Scan(
        counter,
        stored,
        leaked,
        too_low,
        counter.corruptions + stored.corruptions + len(too_low),
        (highest + 1) * image.cluster_size,
    )


def _copied_flag_errors(image: ImageFile, scan: _Scan, messages: list[str], fix: bool) -> int:
    """Active L1/L2 entries whose COPIED bit disagrees with the stored refcount being 1."""
    errors = 0
    for slot, entry, refcount_of in scan.counter.copied_flag_slots():
        refcount = scan.stored.get(refcount_of)
        want = refcount == 1
        if bool(entry & fmt.OFLAG_COPIED) == want:
            continue
        kind = "L2 cluster" if slot.is_l1 else "data cluster"
        messages.append(
            f"ERROR OFLAG_COPIED {kind}: {'l1' if slot.is_l1 else 'l2'}_entry={entry:x} refcount={refcount}"
        )
        errors += 1
        if fix:
            fixed = entry | fmt.OFLAG_COPIED if want else entry & ~fmt.OFLAG_COPIED
            os.pwrite(image.fd, struct.pack(">Q", fixed), slot.file_offset)
    if fix and errors:
        os.fdatasync(image.fd)
    return errors


def _fix_leaks(image: ImageFile, scan: _Scan, messages: list[str]) -> int:
    """Lower leaked refcounts in place (safe at any crash point: it only frees unused clusters)."""
    fixed = 0
    for index in scan.leaked:
        expected = scan.counter.get(index)
        stored = scan.stored.get(index)
        if scan.stored.set(index, expected):
            messages.append(f"Repairing cluster {index} refcount={stored} reference={expected}")
            fixed += 1
    os.fdatasync(image.fd)
    return fixed


def _clear_flags(image: ImageFile, flags: int) -> None:
    """Clear dirty/corrupt incompatible bits once the image is consistent (v3 headers only)."""
    if image.version < 3 or not image.incompatible_features & flags:
        return
    image.incompatible_features &= ~flags
    os.pwrite(image.fd, struct.pack(">Q", image.incompatible_features), HEADER_INCOMPATIBLE_FEATURES)
    os.fdatasync(image.fd)


def rebuild_refcounts(image: ImageFile, messages: list[str] | None = None) -> None:
    """Replace the refcount table and blocks with ones computed from every reference.

    `image` is an ImageFile from `read_image_file(fd, path)` whose fd is open read-write (the
    engine's own dirty-bit repair is hypervisor/block/qcow2/rebuild.py; this one serves `check -r`).
    """
    log_lines: list[str] = messages if messages is not None else []
    image_file = image
    counter = ReferenceCounter(image_file, log_lines)
    # The old table and blocks are not counted: once the header points at the new ones they are free.
    counter.count_everything(include_refcount_structure=False)
    log_lines.append("Rebuilding refcount structure")
    table_offset, table_clusters = write_refcount_structure(image_file, counter)
    os.pwrite(image_file.fd, struct.pack(">QI", table_offset, table_clusters), HEADER_REFCOUNT_TABLE_OFFSET)
    os.fdatasync(image_file.fd)
    image_file.refcount_table_offset = table_offset
    image_file.refcount_table_clusters = table_clusters
    log.info("%s: rebuilt refcount structure at %#x (%d clusters)", image_file.path, table_offset, table_clusters)


def _check_open_image(image: ImageFile, repair: str | None) -> CheckResult:
    result = CheckResult(filename=image.path)
    messages = result.messages
    scan = _scan(image, messages)
    copied_errors = _copied_flag_errors(image, scan, [], fix=False)
    if repair is not None and (scan.leaked or scan.too_low or copied_errors or scan.corruptions):
        leaks_found = len(scan.leaked)
        corruptions_found = scan.corruptions + copied_errors
        if repair == "all" and scan.too_low:
            rebuild_refcounts(image, messages)
            result.leaks_fixed = leaks_found
            result.corruptions_fixed = len(scan.too_low)
        elif scan.leaked:
            result.leaks_fixed = _fix_leaks(image, scan, messages)
        if repair == "all":
            scan = _scan(image, [])
            result.corruptions_fixed += _copied_flag_errors(image, scan, messages, fix=True)
        result.repaired = True
        log.info(
            "%s: repaired %d leaks, %d of %d corruptions",
            image.path,
            result.leaks_fixed,
            result.corruptions_fixed,
            corruptions_found,
        )
    final = _scan(image, messages if result.repaired else [])
    final_copied = _copied_flag_errors(image, final, messages, fix=False)
    result.corruptions = final.corruptions + final_copied
    result.leaks = len(final.leaked)
    result.check_errors = final.counter.check_errors
    result.image_end_offset = final.image_end_offset
    stats = final.counter.stats
    result.total_clusters = stats.total_clusters
    result.allocated_clusters = stats.allocated_clusters
    result.fragmented_clusters = stats.fragmented_clusters
    result.compressed_clusters = stats.compressed_clusters
    if repair is not None and not result.corruptions and not result.check_errors:
        _clear_flags(image, fmt.INCOMPAT_DIRTY | (fmt.INCOMPAT_CORRUPT if repair == "all" else 0))
    return result


def check_image(path_or_image: str | Any, repair: str | None = None) -> CheckResult:
    """Check (and with `repair` "leaks" or "all", repair) a qcow2 image.

    `path_or_image` is a file name, or an open image object with a `path` attribute (e.g. a
    Qcow2Image, which then already holds the image's lock; it must be flushed before and reopened
    after a repair, since its caches do not see the checker's writes). Raises ConfigError for a bad
    repair mode and ImageError subclasses when the image cannot be checked at all.
    """
    if repair is not None and repair not in REPAIR_MODES:
        raise ConfigError(f"invalid repair mode '{repair}' (leaks or all)")
    from hypervisor.block.raw import open_image_fd

    path = path_or_image if isinstance(path_or_image, str) else path_or_image.path
    # An open image object already holds the lock; a second lock from this process would conflict.
    fd = open_image_fd(path, read_only=repair is None, lock=isinstance(path_or_image, str))
    try:
        image = read_image_file(fd, path)
        return _check_open_image(image, repair)
    except OSError as error:
        raise ImageError(f"{path}: I/O error during check: {error.strerror}") from error
    finally:
        os.close(fd)


__all__ = ["CheckResult", "check_image", "rebuild_refcounts", "REPAIR_MODES"]
