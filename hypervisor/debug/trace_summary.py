"""`pyhv trace summarize FILE`: exit counts and host time by reason, device and register.

The table follows `perf kvm stat report`: samples, samples%, time%, then min/max/avg host time
per exit (here: the time pyhv spent handling the exit after KVM returned, the trace's host_ns).
Aggregates (the C fast path's sink ports and unmapped accesses, the instructions pyhv's emulator
ran) add samples without times, as "io (counted)" and the like.

A trace is untrusted input: lines that are not JSON objects of the format (a truncated last line
after a crash, a hand-edited file) are counted and reported in one line, never a traceback. Exit
and aggregate lines are checked field by field into TraceRecords as they are read, so a line with
a field of the wrong type (a string vCPU, a boolean count) or an impossible value (a negative count,
a NaN time) is one of those bad lines too, and the summary and the plot read only typed fields.
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


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """An exit or aggregate line of a trace, checked when it is read (`trace_record`): the fields
    the summary and the plot use, each of the type the tracer writes."""

    aggregate: bool  # an "aggregate" line (exits only counted), else an "exit" line
    vcpu: int
    kind: str  # "io", "mmio", "shutdown", "emulation", ...
    count: int = 1  # exits the line stands for: an aggregate's counter, 1 for an exit line
    t: float = 0.0  # an exit's seconds since the run started
    host_ns: int = 0  # an exit's host time
    direction: str | None = None  # "in", "out", "read", "write"
    device: str | None = None
    register: str | None = None
    where: int | None = None  # the exit's port or address


@dataclass
class TraceFile:
    records: list[TraceRecord]
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
        elif kind in ("exit", "aggregate") and (checked := trace_record(record)) is not None:
            trace.records.append(checked)
        else:
            trace.bad_lines += 1
    if trace.header is None and not trace.records:
        raise ConfigError(f"{name} is not a pyhv exit trace (no header line; written by `pyhv run --trace`?)")
    return trace


class _BadField(ValueError):
    """A field of a trace line with the wrong type or an impossible value."""


def _count(value: object) -> int:
    # bool is an int to Python, not to JSON; counts, vCPU numbers, ports and times are >= 0.
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise _BadField


def _seconds(value: object) -> float:
    # json.loads accepts NaN and Infinity, which no clock gives.
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    raise _BadField


def _text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise _BadField


def trace_record(record: dict[str, object]) -> TraceRecord | None:
    """The typed record of an "exit" or "aggregate" object, or None when a field the summary or
    the plot reads is missing, of the wrong type or impossible (the line is a bad line then)."""
    kind = record.get("kind")
    if not isinstance(kind, str):
        return None
    try:
        vcpu = _count(record.get("vcpu"))
        device, register = _text(record.get("device")), _text(record.get("register"))
        where = record.get("port", record.get("addr"))
        address = None if where is None else _count(where)
        if record["type"] == "aggregate":
            return TraceRecord(True, vcpu, kind, _count(record.get("count")), device=device, register=register,
                               where=address)  # fmt: skip
        t, host_ns, direction = _seconds(record.get("t", 0)), _count(record.get("host_ns", 0)), _text(record.get("dir"))
    except _BadField:
        return None
    return TraceRecord(False, vcpu, kind, 1, t, host_ns, direction, device, register, address)


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


def group_key(record: TraceRecord, by: str) -> str:
    kind = record.kind
    direction = "(counted)" if record.aggregate else record.direction
    reason = f"{kind} {direction}" if direction else kind
    if by == "reason":
        return reason
    device = record.device or ("-" if kind not in ("io", "mmio") else "unknown")
    if by == "device":
        return device if kind in ("io", "mmio") else kind
    if kind not in ("io", "mmio"):
        return kind
    register = record.register
    if register is None:
        register = f"{record.where:#x}" if record.where is not None else "?"
    return f"{device} {register}"


def summarize(trace: TraceFile, by: str) -> Summary:
    if by not in GROUPINGS:
        raise ConfigError(f"--by {by!r}: use one of {', '.join(GROUPINGS)}")
    rows: dict[str, Row] = {}
    summary = Summary(by)
    for record in trace.records:
        key = group_key(record, by)
        row = rows.setdefault(key, Row(key))
        if record.aggregate:
            row.add(record.count, None)
        else:
            row.add(1, record.host_ns)
            summary.total_ns += record.host_ns
        summary.samples += record.count
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
    exits = sum(1 for record in trace.records if not record.aggregate)
    counted = counted_exits(trace)
    text = f"{exits} traced exits, {counted} only counted (C fast path, pyhv's instruction emulator)"
    if trace.end is not None:
        text += f"; run ended with {trace.end.get('outcome')} after {trace.end.get('wall_seconds')} s"
    else:
        text += "; no end line (the run did not finish writing the trace)"
    return text


def counted_exits(trace: TraceFile) -> int:
    """Exits the trace only counts (its aggregate lines' counts)."""
    return sum(record.count for record in trace.records if record.aggregate)


def bad_lines_notice(trace: TraceFile) -> str | None:
    if not trace.bad_lines:
        return None
    return f"skipped {trace.bad_lines} line(s) that are not trace records (truncated or not from pyhv)"
