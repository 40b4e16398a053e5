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

Repair (`-r leaks` / `-r all`), never after a walk that could not complete (a check error), and
without touching refcounts after one that skipped a table (check_walk's `unwalked_tables`): with
`-r all`, unaligned preallocated zero clusters become plain zero clusters first (QEMU's
fix_l2_entry_by_zero). Leaks are fixed in place by lowering refcounts, which a crash can
only undo, never make worse. Too-low refcounts are fixed by building a complete new refcount table
and blocks after the end of the file, flushing them, and only then switching the header's
refcount_table_offset/clusters with one 12-byte write: a crash before the switch leaves the old
(still self-consistent) structures, after it the new ones; a refcount table entry with reserved
bits, an unaligned, outside or shared refcount block are repaired the same way. COPIED flags are
fixed last.
"""

from __future__ import annotations

import logging
import os
import struct
from array import array
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


# Per-cluster lines kept for stderr: a hostile image can have a billion mismatching clusters, and
# the counts stay exact without printing them all (QEMU prints every one).
MAX_CLUSTER_MESSAGES = 10000


@dataclass
class _Scan:
    """One counting pass: expected references and the problems found on the way."""

    counter: ReferenceCounter
    stored: RefcountReader
    leaks: int
    too_low: int
    corruptions: int
    image_end_offset: int
    check_errors: int  # the walk's, plus one per cluster whose refcount block is unreadable

    @property
    def needs_rebuild(self) -> bool:
        """Too-low refcounts, or a refcount table entry that only a new structure repairs."""
        return bool(self.too_low or self.stored.needs_rebuild or self.counter.shared_refcount_blocks)


def _last_nonzero(values: array[int], limit: int) -> int:
    """Index of the last non-zero value among the first `limit`, or -1 (C-speed via bytes)."""
    data = memoryview(values).cast("B")[: limit * values.itemsize].tobytes().rstrip(b"\0")
    return (len(data) - 1) // values.itemsize if data else -1


def _compared_blocks(image: ImageFile, counter: ReferenceCounter, stored: RefcountReader) -> list[tuple[int, int]]:
    """(refcount block index, clusters of it to compare) wherever either side may be non-zero.

    Like QEMU's compare_refcounts, the clusters compared end at the end of the file or at the
    highest reference, whichever is further; stored refcounts beyond are ignored.
    """
    per_block = counter.counts.per_block
    domain_end = max(-(-image.file_size // image.cluster_size), counter.size)
    indices = set(counter.counts.spans) | set(stored.populated_blocks()) | stored.unreadable
    return [
        (index, min(per_block, domain_end - index * per_block))
        for index in sorted(indices)
        if index * per_block < domain_end
    ]


def _scan(image: ImageFile, messages: list[str], repairing: bool = False) -> _Scan:
    counter = ReferenceCounter(image, messages, repairing)
    counter.count_everything()
    stored = RefcountReader(image, messages)
    per_block = counter.counts.per_block
    leaks = too_low = unreadable = 0
    highest = 0  # QEMU's compare_refcounts starts at cluster 0 too
    printed = 0
    if counter.aborted:
        return _Scan(counter, stored, 0, 0, 0, 0, counter.check_errors)
    for block_index, limit in _compared_blocks(image, counter, stored):
        base = block_index * per_block
        if block_index in stored.unreadable:
            # QEMU's compare_refcounts: every cluster whose refcount cannot be read is a check
            # error, and is neither a leak nor a corruption.
            unreadable += limit
            for slot in range(limit):
                if printed >= MAX_CLUSTER_MESSAGES:
                    break
                messages.append(f"Can't get refcount for cluster {base + slot}: Input/output error")
                printed += 1
            continue
        expected = counter.counts.span(block_index)
        actual = stored.block(block_index)
        last = max(
            _last_nonzero(expected, limit) if expected is not None else -1,
            _last_nonzero(actual, limit) if actual is not None else -1,
        )
        if last < 0:
            continue
        highest = max(highest, base + last)
        if expected is not None and actual is not None and expected[:limit] == actual[:limit]:
            continue
        if expected is None:
            assert actual is not None
            # Nothing points into this block's span: every non-zero refcount is a leak.
            leaks += limit - actual[:limit].count(0)
            for slot in range(last + 1):
                if printed >= MAX_CLUSTER_MESSAGES:
                    break
                if actual[slot]:
                    messages.append(f"Leaked cluster {base + slot} refcount={actual[slot]} reference=0")
                    printed += 1
            continue
        for slot in range(last + 1):
            want = expected[slot]
            have = actual[slot] if actual is not None else 0
            if have == want:
                continue
            if have < want:
                too_low += 1
                kind = "ERROR"
            else:
                leaks += 1
                kind = "Leaked"
            if printed < MAX_CLUSTER_MESSAGES:
                messages.append(f"{kind} cluster {base + slot} refcount={have} reference={want}")
                printed += 1
    if printed >= MAX_CLUSTER_MESSAGES and leaks + too_low + unreadable > printed:
        messages.append(f"... and {leaks + too_low + unreadable - printed} more clusters with a wrong refcount")
    return _Scan(
        counter,
        stored,
        leaks,
        too_low,
        counter.corruptions + stored.corruptions + too_low,
        (highest + 1) * image.cluster_size,
        counter.check_errors + unreadable,
    )


def _copied_flag_errors(image: ImageFile, scan: _Scan, messages: list[str], fix: bool) -> int:
    """Active L1/L2 entries whose COPIED bit disagrees with the stored refcount being 1."""
    errors = 0
    for item, weight in scan.counter.copied_flag_entries():
        if not scan.stored.readable(item.cluster_index):
            continue  # QEMU skips these silently: the refcount is already a check error
        refcount = scan.stored.get(item.cluster_index)
        want = refcount == 1
        if bool(item.entry & fmt.OFLAG_COPIED) == want:
            continue
        if item.is_l1:
            where = f"l1_index={item.l1_index} l1_entry={item.entry:x}"
            line = f"ERROR OFLAG_COPIED L2 cluster: {where} refcount={refcount}"
        else:
            line = f"ERROR OFLAG_COPIED data cluster: l2_entry={item.entry:x} refcount={refcount}"
        if errors < MAX_CLUSTER_MESSAGES:
            messages.append(line)
        errors += weight
        if fix:
            fixed = item.entry | fmt.OFLAG_COPIED if want else item.entry & ~fmt.OFLAG_COPIED
            os.pwrite(image.fd, struct.pack(">Q", fixed), item.file_offset)
    if fix and errors:
        os.fdatasync(image.fd)
    return errors


def _fix_leaks(image: ImageFile, scan: _Scan, messages: list[str]) -> int:
    """Lower leaked refcounts in place, one block write per block (safe at any crash point: it
    only lowers refcounts that nothing references, never below the references)."""
    fixed = 0
    per_block = scan.counter.counts.per_block
    for block_index, limit in _compared_blocks(image, scan.counter, scan.stored):
        actual = scan.stored.block(block_index)
        if actual is None:
            continue
        expected = scan.counter.counts.span(block_index)
        if expected is not None and actual[:limit] == expected[:limit]:
            continue  # the common case, compared in C
        if expected is None and actual[:limit].count(0) == limit:
            continue
        corrected = array(actual.typecode, actual)
        changed = False
        for slot in range(_last_nonzero(actual, limit) + 1):
            want = expected[slot] if expected is not None else 0
            if corrected[slot] > want:
                if fixed < MAX_CLUSTER_MESSAGES:
                    cluster = block_index * per_block + slot
                    messages.append(f"Repairing cluster {cluster} refcount={corrected[slot]} reference={want}")
                corrected[slot] = want
                fixed += 1
                changed = True
        if changed:
            scan.stored.store_block(block_index, corrected)
    os.fdatasync(image.fd)
    return fixed


def _clear_flags(image: ImageFile, flags: int) -> None:
    """Clear dirty/corrupt incompatible bits once the image is consistent (v3 headers only)."""
    if image.version < 3 or not image.incompatible_features & flags:
        return
    image.incompatible_features &= ~flags
    os.pwrite(image.fd, struct.pack(">Q", image.incompatible_features), HEADER_INCOMPATIBLE_FEATURES)
    os.fdatasync(image.fd)


def rebuild_refcount_structure(image: ImageFile, messages: list[str] | None = None) -> None:
    """Replace the refcount table and blocks of an image file with ones computed from every
    reference (`check -r all`; QEMU's qcow2-refcount.c rebuild_refcount_structure).

    `image` is an ImageFile from `read_image_file(fd, path)` whose fd is open read-write. It is
    also how a dirty image is repaired when it is opened read-write (engine.py runs the checker
    with repair="all" before loading its tables, as QEMU's qcow2_open does).
    """
    log_lines: list[str] = messages if messages is not None else []
    image_file = image
    # The walk's lines were printed by the check that decided to rebuild; not again.
    counter = ReferenceCounter(image_file, [])
    # The old table and blocks are not counted: once the header points at the new ones they are free.
    counter.count_everything(include_refcount_structure=False)
    log_lines.append("Rebuilding refcount structure")
    table_offset, table_clusters = write_refcount_structure(image_file, counter)
    os.pwrite(image_file.fd, struct.pack(">QI", table_offset, table_clusters), HEADER_REFCOUNT_TABLE_OFFSET)
    os.fdatasync(image_file.fd)
    image_file.refcount_table_offset = table_offset
    image_file.refcount_table_clusters = table_clusters
    log.info("%s: rebuilt refcount structure at %#x (%d clusters)", image_file.path, table_offset, table_clusters)


def _fix_zero_clusters(image: ImageFile, scan: _Scan, messages: list[str]) -> int:
    """Turn unaligned preallocated zero clusters into plain ones (QEMU's fix_l2_entry_by_zero):
    only zeros were there to read, so nothing is lost; the cluster it named becomes a leak."""
    fixed = 0
    done: set[int] = set()
    for fix in scan.counter.zero_fixes:
        if fix.file_offset in done:
            continue  # a table walked from the active and a snapshot L1: QEMU fixes it once too
        done.add(fix.file_offset)
        os.pwrite(image.fd, fix.replacement(), fix.file_offset)
        fixed += fix.weight
    if fixed:
        os.fdatasync(image.fd)
        log.info("%s: %d unaligned preallocated zero clusters made plain zero clusters", image.path, fixed)
    return fixed


def _refusal(scan: _Scan) -> str | None:
    """Why the refcounts must not be repaired from this scan, if they must not."""
    if scan.counter.check_errors:
        # The walk could not read every table: what it did not see may still be in use.
        return "Not repairing: the check could not complete, the references found are incomplete"
    if scan.counter.unwalked_tables:
        # The clusters an unaligned or cut-short table names look leaked (qemu-img walks such a
        # table and counts them); lowering their refcounts could free data still in use.
        return (
            f"Not repairing refcounts: {scan.counter.unwalked_tables} L1/L2 tables are unaligned or cut short, "
            "what they reference is unknown"
        )
    return None


def _repair(image: ImageFile, scan: _Scan, repair: str, result: CheckResult) -> _Scan:
    """Repair what `repair` allows; returns a fresh scan of the repaired image."""
    messages = result.messages
    corruptions_found = scan.corruptions
    if repair == "all" and scan.counter.zero_fixes:
        result.corruptions_fixed += _fix_zero_clusters(image, scan, messages)
        scan = _scan(image, [])
    refusal = _refusal(scan)
    if refusal is not None:
        messages.append(refusal)
    elif repair == "all" and scan.needs_rebuild:
        before = scan.corruptions
        leaks_found = scan.leaks
        rebuild_refcount_structure(image, messages)
        scan = _scan(image, [])
        result.leaks_fixed = leaks_found
        # As QEMU counts it: the corruptions the new structure made go away.
        result.corruptions_fixed += max(0, before - scan.corruptions)
    elif scan.leaks:
        result.leaks_fixed = _fix_leaks(image, scan, messages)
        scan = _scan(image, [])
    if repair == "all" and refusal is None:
        result.corruptions_fixed += _copied_flag_errors(image, scan, messages, fix=True)
    result.repaired = True
    log.info(
        "%s: repaired %d leaks, %d of %d corruptions",
        image.path,
        result.leaks_fixed,
        result.corruptions_fixed,
        corruptions_found,
    )
    return scan


def _check_open_image(image: ImageFile, repair: str | None) -> CheckResult:
    result = CheckResult(filename=image.path)
    messages = result.messages
    scan = _scan(image, messages, repairing=repair == "all")
    if scan.counter.aborted:
        # QEMU's check stops where it cannot read the snapshot table: only the check error.
        result.check_errors = scan.check_errors
        return result
    copied_messages: list[str] = []
    copied_errors = _copied_flag_errors(image, scan, copied_messages, fix=False)
    problems = scan.leaks or scan.too_low or copied_errors or scan.corruptions or scan.check_errors
    if repair is not None and problems:
        _repair(image, scan, repair, result)
    if result.repaired:  # the result reported is the one of a second check after the repair
        final = _scan(image, messages)
        final_copied = _copied_flag_errors(image, final, messages, fix=False)
    else:
        messages.extend(copied_messages)
        final, final_copied = scan, copied_errors
    result.corruptions = final.corruptions + final_copied
    result.leaks = final.leaks
    result.check_errors = final.check_errors
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


__all__ = ["CheckResult", "check_image", "rebuild_refcount_structure", "REPAIR_MODES"]
