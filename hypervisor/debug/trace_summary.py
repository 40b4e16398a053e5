"""`pyhv trace summarize FILE`: exit counts and host time by reason, device and register.

The table follows `perf kvm stat report`: samples, samples%, time%, then min/max/avg host time
per exit (here: the time pyhv spent handling the exit after KVM returned, the trace's host_ns).
Aggregates (the C fast path's sink ports and unmapped accesses, the instructions pyhv's emulator
ran) add samples without times, as "io (counted)" and the like.

A trace is untrusted input: lines that are not JSON objects of the format (a truncated last line
after a crash, a hand-edited file) are counted and reported in one line, never a traceback.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hypervisor.debug.trace import TRACE_FORMAT, TRACE_VERSION
from hypervisor.errors import ConfigError

GROUPINGS = ("reason", "device", "register")
MAX_LINE_BYTES = 1 << 16  # an exit line is ~300 bytes; a longer "line" is not one of ours


@dataclass
class TraceFile:
    records: list[dict[str, object]]
    bad_lines: int = 0
    header: dict[str, object] | None = None
    end: dict[str, object] | None = None


def _lines(path: Path) -> Iterator[bytes | None]:
    """The file's lines; None for a line too long to be a trace record (it is skipped)."""
    with open(path, "rb") as stream:
        while True:
            line = stream.readline(MAX_LINE_BYTES)
            if not line:
                return
            if len(line) == MAX_LINE_BYTES and not line.endswith(b"\n"):
                while (rest := stream.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    pass
                yield None
                continue
            yield line


def parse_trace(lines: Iterable[bytes | str | None], name: str = "the trace") -> TraceFile:
    trace = TraceFile([])
    for line in lines:
        if line is None:
            trace.bad_lines += 1
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            trace.bad_lines += 1
            continue
        if not isinstance(record, dict) or not isinstance(record.get("type"), str):
            trace.bad_lines += 1
            continue
        kind = record["type"]
        if kind == "header":
            if record.get("format") != TRACE_FORMAT:
                raise ConfigError(f"{name} is not a pyhv exit trace (format {record.get('format')!r})")
            version = record.get("version")
            if not isinstance(version, int) or version > TRACE_VERSION:
                raise ConfigError(f"{name} has trace format version {version!r}; this pyhv reads {TRACE_VERSION}")
            trace.header = record
        elif kind == "end":
            trace.end = record
        elif kind in ("exit", "aggregate") and _valid(record):
            trace.records.append(record)
        else:
            trace.bad_lines += 1
    if trace.header is None and not trace.records:
        raise ConfigError(f"{name} is not a pyhv exit trace (no header line; written by `pyhv run --trace`?)")
    return trace


def _valid(record: dict[str, object]) -> bool:
    if not isinstance(record.get("kind"), str) or not isinstance(record.get("vcpu"), int):
        return False
    if record["type"] == "aggregate":
        count = record.get("count")
        return isinstance(count, int) and count >= 0
    host_ns, t = record.get("host_ns", 0), record.get("t", 0)
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
        return False  # json.loads accepts NaN and Infinity
    return isinstance(host_ns, int) and not isinstance(host_ns, bool) and host_ns >= 0


def read_trace(path: Path) -> TraceFile:
    try:
        if path.exists() and not path.is_dir() and not path.is_file():  # /dev/zero or a FIFO never end
            raise ConfigError(f"trace {path} is not a regular file")
        return parse_trace(_lines(path), str(path))
    except FileNotFoundError:
        raise ConfigError(f"trace {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"trace {path} is a directory, not a file") from None
    except PermissionError:
        raise ConfigError(f"trace {path} is not readable (permission denied)") from None
    except OSError as error:
        raise ConfigError(f"cannot read trace {path}: {error.strerror}") from error


@dataclass
class Row:
    key: str
    samples: int = 0
    timed: int = 0  # samples with a host time (exit lines; aggregates have none)
    total_ns: int = 0
    min_ns: int | None = None
    max_ns: int = 0

    def add(self, count: int, host_ns: int | None) -> None:
        self.samples += count
        if host_ns is None:
            return
        self.timed += 1
        self.total_ns += host_ns
        self.min_ns = host_ns if self.min_ns is None else min(self.min_ns, host_ns)
        self.max_ns = max(self.max_ns, host_ns)


@dataclass
class Summary:
    by: str
    rows: list[Row] = field(default_factory=list)
    samples: int = 0
    total_ns: int = 0


def group_key(record: dict[str, object], by: str) -> str:
    kind = str(record["kind"])
    direction = record.get("dir")
    if record["type"] == "aggregate":
        direction = "(counted)"
    reason = f"{kind} {direction}" if direction else kind
    if by == "reason":
        return reason
    device = str(record.get("device") or ("-" if kind not in ("io", "mmio") else "unknown"))
    if by == "device":
        return device if kind in ("io", "mmio") else kind
    if kind not in ("io", "mmio"):
        return kind
    register = record.get("register")
    if register is None:
        where = record.get("port", record.get("addr"))
        register = f"{where:#x}" if isinstance(where, int) else "?"
    return f"{device} {register}"


def summarize(trace: TraceFile, by: str) -> Summary:
    if by not in GROUPINGS:
        raise ConfigError(f"--by {by!r}: use one of {', '.join(GROUPINGS)}")
    rows: dict[str, Row] = {}
    summary = Summary(by)
    for record in trace.records:
        key = group_key(record, by)
        row = rows.setdefault(key, Row(key))
        if record["type"] == "aggregate":
            count = int(record["count"])  # type: ignore[call-overload]
            row.add(count, None)
        else:
            count = 1
            host_ns = int(record.get("host_ns", 0))  # type: ignore[call-overload]
            row.add(1, host_ns)
            summary.total_ns += host_ns
        summary.samples += count
    summary.rows = sorted(rows.values(), key=lambda row: (-row.samples, row.key))
    return summary


def _us(ns: int | None) -> str:
    return "-" if ns is None else f"{ns / 1000:.2f}"


def format_summary(summary: Summary) -> str:
    width = max([len(summary.by), *(len(row.key) for row in summary.rows)]) + 2
    header = (f"{summary.by:<{width}}{'samples':>10}{'samples%':>10}{'time%':>8}{'min µs':>10}{'max µs':>10}"
              f"{'avg µs':>10}{'total ms':>10}")  # fmt: skip
    lines = [header]
    for row in summary.rows:
        share = 100.0 * row.samples / summary.samples if summary.samples else 0.0
        time_share = 100.0 * row.total_ns / summary.total_ns if summary.total_ns else 0.0
        average = row.total_ns // row.timed if row.timed else None
        total = f"{row.total_ns / 1e6:.3f}" if row.timed else "-"
        lines.append(f"{row.key:<{width}}{row.samples:>10}{share:>9.2f}%{time_share:>7.2f}%{_us(row.min_ns):>10}"
                     f"{_us(row.max_ns if row.timed else None):>10}{_us(average):>10}{total:>10}")  # fmt: skip
    lines.append(f"{'total':<{width}}{summary.samples:>10}{'':>18}{'':>30}{summary.total_ns / 1e6:>10.3f}")
    return "\n".join(lines)


def describe_trace(trace: TraceFile) -> str:
    """One line on what the trace holds: exits, aggregates, outcome and skipped lines."""
    exits = sum(1 for record in trace.records if record["type"] == "exit")
    counted = sum(int(record["count"]) for record in trace.records if record["type"] == "aggregate")  # type: ignore[call-overload]
    text = f"{exits} traced exits, {counted} only counted (C fast path, pyhv's instruction emulator)"
    if trace.end is not None:
        text += f"; run ended with {trace.end.get('outcome')} after {trace.end.get('wall_seconds')} s"
    else:
        text += "; no end line (the run did not finish writing the trace)"
    return text


def bad_lines_notice(trace: TraceFile) -> str | None:
    if not trace.bad_lines:
        return None
    return f"skipped {trace.bad_lines} line(s) that are not trace records (truncated or not from pyhv)"
