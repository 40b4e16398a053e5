"""Text that `pyhv image` prints, in qemu-img's formats (human and `--output=json`).

Pure functions from data to strings, so tests can compare them without running commands.
Human layouts follow QEMU's block/qapi.c (bdrv_image_info_dump, bdrv_snapshot_dump) and
qemu-img.c (dump_human_image_check, dump_map_entry); sizes use util/cutils.c size_to_str.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from hypervisor.block.qcow2.check import CheckResult

SIZE_UNITS = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")


def size_to_str(value: int) -> str:
    """QEMU's size_to_str: three significant digits and a binary unit ("196 KiB", "1 GiB")."""
    _, exponent = math.frexp(value / (1000.0 / 1024.0))
    index = min(int((exponent - 1) / 10), len(SIZE_UNITS) - 1) if value else 0
    index = max(index, 0)
    return f"{value / (1 << (10 * index)):0.3g} {SIZE_UNITS[index]}B"


def to_json(value: Any) -> str:
    """qemu-img prints JSON with four-space indentation."""
    return json.dumps(value, indent=4)


def snapshot_table(snapshots: list[dict[str, Any]]) -> str:
    """`qemu-img snapshot -l` / info's "Snapshot list:" block (block/qapi.c bdrv_snapshot_dump)."""
    lines = ["Snapshot list:", f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"]
    for snap in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap["date-sec"]))
        total_ms = snap["vm-clock-sec"] * 1000 + snap["vm-clock-nsec"] // 1_000_000
        hours, rest = divmod(total_ms, 3_600_000)
        minutes, rest = divmod(rest, 60_000)
        seconds, millis = divmod(rest, 1000)
        clock = f"{hours:02d}:{minutes:02d}:{seconds:02d}.{millis:03d}"
        icount = str(snap["icount"]) if "icount" in snap else ""
        lines.append(
            f"{snap['id']:<10}{snap['name']:<17}{size_to_str(snap['vm-state-size']):>8}"
            f"{date:>20}{clock:>13}{icount:>11}"
        )
    return "\n".join(lines)


def _format_specific_lines(data: dict[str, Any], indent: int) -> list[str]:
    """The "Format specific information:" block: keys with dashes become words (qapi dump)."""
    lines = []
    pad = " " * indent
    for key, value in data.items():
        label = key.replace("-", " ")
        if isinstance(value, list):
            lines.append(f"{pad}{label}:")
            for index, item in enumerate(value):
                if isinstance(item, dict):
                    lines.append(f"{pad}    [{index}]:")
                    lines.extend(_format_specific_lines(item, indent + 8))
                else:
                    lines.append(f"{pad}    [{index}]: {item}")
        elif isinstance(value, bool):
            lines.append(f"{pad}{label}: {'true' if value else 'false'}")
        else:
            lines.append(f"{pad}{label}: {value}")
    return lines


def human_info(info: dict[str, Any]) -> str:
    """`qemu-img info` without --output (block/qapi.c bdrv_image_info_dump)."""
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {size_to_str(info['actual-size'])}",
    ]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full and full != info["backing-filename"]:
            line += f" (actual path: {full})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines.append(snapshot_table(info["snapshots"]))
    specific = info.get("format-specific")
    if specific:
        lines.append("Format specific information:")
        lines.extend(_format_specific_lines(specific["data"], 4))
    return "\n".join(lines)


def human_check(result: CheckResult) -> str:
    """qemu-img.c dump_human_image_check."""
    out: list[str] = []
    if result.leaks_fixed or result.corruptions_fixed:
        out += [
            "The following inconsistencies were found and repaired:",
            "",
            f"    {result.leaks_fixed} leaked clusters",
            f"    {result.corruptions_fixed} corruptions",
            "",
            "Double checking the fixed image now...",
        ]
    if not (result.corruptions or result.leaks or result.check_errors):
        out.append("No errors were found on the image.")
    else:
        if result.corruptions:
            out += [
                "",
                f"{result.corruptions} errors were found on the image.",
                "Data may be corrupted, or further writes to the image may corrupt it.",
            ]
        if result.leaks:
            out += [
                "",
                f"{result.leaks} leaked clusters were found on the image.",
                "This means waste of disk space, but no harm to data.",
            ]
        if result.check_errors:
            out += ["", f"{result.check_errors} internal errors have occurred during the check."]
    if result.total_clusters and result.allocated_clusters:
        allocated = result.allocated_clusters
        out.append(
            f"{allocated}/{result.total_clusters} = "
            f"{allocated * 100.0 / result.total_clusters:0.2f}% allocated, "
            f"{(result.fragmented_clusters * 100.0 / allocated) if allocated else 0:0.2f}% fragmented, "
            f"{(result.compressed_clusters * 100.0 / allocated) if allocated else 0:0.2f}% compressed clusters"
        )
    if result.image_end_offset:
        out.append(f"Image end offset: {result.image_end_offset}")
    return "\n".join(out)


def map_json(entries: list[dict[str, Any]]) -> str:
    """qemu-img map --output=json: one object per line inside a list."""
    body = ",\n".join(
        "{ " + ", ".join(f'"{key}": {json.dumps(value)}' for key, value in entry.items() if key != "filename") + "}"
        for entry in entries
    )
    return f"[{body}]"


def map_human(entries: list[dict[str, Any]]) -> tuple[str, bool]:
    """qemu-img map's table of stored, non-zero ranges. Like qemu-img, it stops at the first
    range it cannot show (compressed data has no host offset): (text, complete)."""
    lines = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    for entry in entries:
        if entry["data"] and "offset" not in entry:
            return "\n".join(lines), False
        if entry["data"] and not entry["zero"]:
            lines.append(
                f"{_hex(entry['start']):<16}{_hex(entry['length']):<16}{_hex(entry['offset']):<16}{entry['filename']}"
            )
    return "\n".join(lines), True


def _hex(value: int) -> str:
    """C's %#x: "0" for zero, "0x1f" otherwise."""
    return f"{value:#x}" if value else "0"
