"""Disk fault injection tied to guest progress (`pyhv run --fault`, docs/ci.md "Fault injection").

A rule says which request to spoil and when: "after the console printed PATTERN (and/or after N
VM exits, and/or T seconds into the run), the Kth write to vda fails with an I/O error". Rules
are plain data (`FaultRule`), written in Python or parsed from the CLI grammar:

    DISK:OP:K[+]:ACTION[,delay=S][,bytes=N][,exits=N][,time=S][,after=PATTERN]

DISK is vda, vdb, ...; OP is read, write, flush, discard or zeroes (write-zeroes); K counts the
OP requests to DISK from the moment every trigger holds (1 is the first); `K+` spoils the Kth and
every later one. ACTION is
  eio    the request fails: the device answers VIRTIO_BLK_S_IOERR (virtio 1.2 §5.2.6)
  slow   the request waits `delay` seconds (default 1, at most 2) on the disk's I/O thread, then runs
  short  (read only) the first `bytes` (default half the request, whole sectors) are read, the rest
         is not, and the request fails with S_IOERR: virtio-blk has no partial success status
  drop   (flush or write) the request is not run but answered S_OK: a lost flush or a lost write
`after=` takes the rest of the text, commas and colons included, so it comes last.

The injector is a BlockBackend shim (hypervisor/block/backend.py) above the disk: an injected
error is an OSError(EIO), which hypervisor/virtio/blk_request.py turns into S_IOERR like a real
host I/O error, so the guest always gets a status and never a hang. Every injected fault is
recorded for the report.
"""

from __future__ import annotations

import errno
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hypervisor.block.backend import BlockBackend
from hypervisor.errors import ConfigError

log = logging.getLogger(__name__)

SECTOR_SIZE = 512  # virtio 1.2 §5.2.6
OPERATIONS = ("read", "write", "flush", "discard", "zeroes")
ACTIONS = ("eio", "slow", "short", "drop")
ACTION_OPERATIONS = {"eio": OPERATIONS, "slow": OPERATIONS, "short": ("read",), "drop": ("flush", "write")}
# A slow request holds the disk's I/O thread; stopping that thread waits 5 s at most
# (hypervisor/virtio/worker.py), so one delay stays well below that.
MAX_DELAY_SECONDS = 2.0
MAX_PATTERN_BYTES = 4096
DISK_NAME = re.compile(r"vd[a-z]")
GRAMMAR = "DISK:OP:K[+]:ACTION[,delay=S][,bytes=N][,exits=N][,time=S][,after=PATTERN]"


@dataclass(frozen=True)
class FaultRule:
    """One fault: which request of which disk, what happens to it, and from when it counts."""

    disk: str
    operation: str
    nth: int = 1
    action: str = "eio"
    every_later: bool = False  # the nth and every later matching request, not only the nth
    after: bytes | None = None  # console bytes that must have been printed
    exits: int | None = None  # VM exits that must have happened
    at_seconds: float | None = None  # seconds since the machine was armed
    delay: float = 1.0  # slow
    short_bytes: int | None = None  # short: bytes actually read (None: half, whole sectors)
    text: str = ""  # the spec it was parsed from, for the report

    def __post_init__(self) -> None:
        where = f"--fault {self.text!r}" if self.text else "fault rule"
        if not DISK_NAME.fullmatch(self.disk):
            raise ConfigError(f"{where}: the disk is vda, vdb, ..., not {self.disk!r} ({GRAMMAR})")
        if self.operation not in OPERATIONS:
            raise ConfigError(f"{where}: the operation is one of {', '.join(OPERATIONS)}, not {self.operation!r}")
        if self.action not in ACTIONS:
            raise ConfigError(f"{where}: the action is one of {', '.join(ACTIONS)}, not {self.action!r}")
        if self.operation not in ACTION_OPERATIONS[self.action]:
            allowed = " or ".join(ACTION_OPERATIONS[self.action])
            raise ConfigError(f"{where}: {self.action} applies to {allowed} requests, not {self.operation}")
        if self.nth < 1:
            raise ConfigError(f"{where}: K counts from 1, not {self.nth}")
        if not 0 <= self.delay <= MAX_DELAY_SECONDS:
            raise ConfigError(f"{where}: delay must be between 0 and {MAX_DELAY_SECONDS:g} seconds, not {self.delay:g}")
        if self.short_bytes is not None and (self.short_bytes < 0 or self.short_bytes % SECTOR_SIZE):
            raise ConfigError(f"{where}: bytes= must be a whole number of {SECTOR_SIZE}-byte sectors")
        if self.exits is not None and self.exits < 0:
            raise ConfigError(f"{where}: exits= must not be negative")
        if self.at_seconds is not None and not self.at_seconds >= 0:
            raise ConfigError(f"{where}: time= must be a number of seconds, at least 0")
        if self.after is not None and not 0 < len(self.after) <= MAX_PATTERN_BYTES:
            raise ConfigError(f"{where}: after= needs a pattern of 1 to {MAX_PATTERN_BYTES} bytes")

    def describe(self) -> str:
        if self.text:
            return self.text
        count = f"{self.nth}+" if self.every_later else str(self.nth)
        return f"{self.disk}:{self.operation}:{count}:{self.action}"


def _number(text: str, kind: type[int] | type[float], key: str, spec: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"--fault {spec!r}: {key}= wants a number, not {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"--fault {spec!r}: {key}= wants a finite number, not {text!r}")
    return value


def parse_fault_spec(spec: str) -> FaultRule:
    """One `--fault` value (module docstring grammar) as a FaultRule, or one ConfigError line."""
    head, separator, rest = spec.partition(",")
    parts = head.split(":")
    if len(parts) != 4:
        raise ConfigError(f"--fault {spec!r}: expected {GRAMMAR}")
    disk, operation, count, action = parts
    every_later = count.endswith("+")
    count = count.removesuffix("+")
    if not count.isdigit():
        raise ConfigError(f"--fault {spec!r}: K must be a whole number (1 is the first request), not {count!r}")
    values: dict[str, str] = {}
    while separator and rest:
        if rest.startswith("after="):
            values["after"] = rest[len("after=") :]  # the pattern keeps its commas and colons
            break
        option, separator, rest = rest.partition(",")
        key, equals, value = option.partition("=")
        if not equals or key not in ("delay", "bytes", "exits", "time"):
            raise ConfigError(f"--fault {spec!r}: unknown option {option!r} (delay=, bytes=, exits=, time=, after=)")
        if key in values:
            raise ConfigError(f"--fault {spec!r}: {key}= is given twice")
        values[key] = value
    else:
        if separator:
            raise ConfigError(f"--fault {spec!r}: an option is missing after the last comma")
    short_bytes = values.get("bytes")
    exits = values.get("exits")
    at_seconds = values.get("time")
    return FaultRule(
        disk=disk,
        operation=operation,
        nth=int(count),
        action=action,
        every_later=every_later,
        # surrogateescape: bytes the shell passed that are not UTF-8 are matched as they were typed.
        after=values["after"].encode("utf-8", "surrogateescape") if "after" in values else None,
        exits=int(_number(exits, int, "exits", spec)) if exits is not None else None,
        at_seconds=_number(at_seconds, float, "time", spec) if at_seconds is not None else None,
        delay=_number(values["delay"], float, "delay", spec) if "delay" in values else 1.0,
        short_bytes=int(_number(short_bytes, int, "bytes", spec)) if short_bytes is not None else None,
        text=spec,
    )


@dataclass
class _RuleState:
    rule: FaultRule
    armed_at: float | None = None
    seen: int = 0  # matching requests since armed
    injected: int = 0
    console_seen: bool = False


@dataclass
class InjectedFault:
    rule: str
    disk: str
    operation: str
    action: str
    sector: int
    sectors: int
    at_seconds: float

    def to_dict(self) -> dict[str, object]:
        return {
            "rule": self.rule, "disk": self.disk, "operation": self.operation, "action": self.action,
            "sector": self.sector, "sectors": self.sectors, "at_seconds": round(self.at_seconds, 6),
        }  # fmt: skip


@dataclass
class FaultPlan:
    """Every rule of a run, their progress and the faults injected; shared by the disks' shims.

    `arm` starts the clock and is told how to count exits; `console` is a machine output
    watcher (fed every console chunk) that marks the after= patterns seen, across chunks.
    """

    rules: Sequence[FaultRule]
    max_records: int = 1000  # the report lists this many injected faults, then only counts them
    injected: list[InjectedFault] = field(default_factory=list)
    dropped_records: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._states = [_RuleState(rule) for rule in self.rules]
        self._started = time.monotonic()
        self._exit_count: Callable[[], int] = lambda: 0
        self._tails: dict[int, bytes] = {}
        self.stopping = threading.Event()  # set at the end of the run: slow requests stop waiting

    def arm(self, exit_count: Callable[[], int]) -> None:
        self._started = time.monotonic()
        self._exit_count = exit_count

    def disks(self) -> set[str]:
        return {rule.disk for rule in self.rules}

    def console(self, data: bytes) -> None:
        with self._lock:
            for index, state in enumerate(self._states):
                pattern = state.rule.after
                if pattern is None or state.console_seen:
                    continue
                window = self._tails.get(index, b"") + data
                if pattern in window:
                    state.console_seen = True
                    self._tails.pop(index, None)
                else:
                    self._tails[index] = window[-(len(pattern) - 1) :] if len(pattern) > 1 else b""

    def _triggered(self, state: _RuleState, now: float) -> bool:
        rule = state.rule
        if rule.after is not None and not state.console_seen:
            return False
        if rule.at_seconds is not None and now - self._started < rule.at_seconds:
            return False
        return rule.exits is None or self._exit_count() >= rule.exits

    def decide(self, disk: str, operation: str, sector: int, sectors: int) -> FaultRule | None:
        """The rule that spoils this request, recorded as injected, or None to run it."""
        now = time.monotonic()
        chosen = None
        with self._lock:
            for state in self._states:
                rule = state.rule
                if rule.disk != disk or rule.operation != operation:
                    continue
                if state.armed_at is None:
                    if not self._triggered(state, now):
                        continue
                    state.armed_at = now
                state.seen += 1
                hit = state.seen == rule.nth or (rule.every_later and state.seen > rule.nth)
                if hit and chosen is None:
                    chosen = rule
                    state.injected += 1
                    if len(self.injected) < self.max_records:
                        self.injected.append(InjectedFault(rule.describe(), disk, operation, rule.action, sector,
                                                           sectors, now - self._started))  # fmt: skip
                    else:
                        self.dropped_records += 1
        if chosen is not None:
            log.info("%s: injected %s into %s at sector %d (rule %s)", disk, chosen.action, operation, sector,
                     chosen.describe())  # fmt: skip
        return chosen

    def to_dict(self) -> dict[str, object]:
        with self._lock:
            return {
                "rules": [
                    {
                        "rule": s.rule.describe(),
                        "armed_at_seconds": None if s.armed_at is None else round(s.armed_at - self._started, 6),
                        "matching_requests": s.seen,
                        "injected": s.injected,
                    }
                    for s in self._states
                ],  # fmt: skip
                "injected": [fault.to_dict() for fault in self.injected],
                "injected_not_listed": self.dropped_records,
            }


def _sectors(offset: int, length: int) -> tuple[int, int]:
    return offset // SECTOR_SIZE, -(-length // SECTOR_SIZE)


class FaultInjector:
    """A BlockBackend that asks `plan` before each request to disk `name` and spoils it if told."""

    def __init__(self, inner: BlockBackend, name: str, plan: FaultPlan) -> None:
        self.inner = inner
        self.name = name
        self.plan = plan

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def read_only(self) -> bool:
        return self.inner.read_only

    def _fail(self, rule: FaultRule, operation: str, sector: int) -> OSError:
        return OSError(errno.EIO, f"injected I/O error ({rule.describe()}) on {operation} at sector {sector}")

    def _slow(self, rule: FaultRule) -> None:
        self.plan.stopping.wait(rule.delay)

    def readinto(self, offset: int, buffers: Sequence[memoryview]) -> None:
        length = sum(len(buffer) for buffer in buffers)
        sector, sectors = _sectors(offset, length)
        rule = self.plan.decide(self.name, "read", sector, sectors)
        if rule is None:
            self.inner.readinto(offset, buffers)
            return
        if rule.action == "slow":
            self._slow(rule)
            self.inner.readinto(offset, buffers)
            return
        if rule.action == "short":
            wanted = rule.short_bytes if rule.short_bytes is not None else length // 2 // SECTOR_SIZE * SECTOR_SIZE
            self._read_prefix(offset, buffers, min(wanted, length))
            raise OSError(errno.EIO, f"injected short read ({rule.describe()}): {min(wanted, length)} of {length} "
                                     f"bytes at sector {sector}")  # fmt: skip
        raise self._fail(rule, "read", sector)

    def _read_prefix(self, offset: int, buffers: Sequence[memoryview], count: int) -> None:
        prefix: list[memoryview] = []
        for buffer in buffers:
            if count <= 0:
                break
            prefix.append(buffer[:count])
            count -= len(prefix[-1])
        if prefix:
            self.inner.readinto(offset, prefix)

    def write(self, offset: int, buffers: Sequence[memoryview | bytes]) -> None:
        sector, sectors = _sectors(offset, sum(len(buffer) for buffer in buffers))
        rule = self.plan.decide(self.name, "write", sector, sectors)
        if rule is None or rule.action == "slow":
            if rule is not None:
                self._slow(rule)
            self.inner.write(offset, buffers)
        elif rule.action != "drop":
            raise self._fail(rule, "write", sector)

    def flush(self) -> None:
        rule = self.plan.decide(self.name, "flush", 0, 0)
        if rule is None or rule.action == "slow":
            if rule is not None:
                self._slow(rule)
            self.inner.flush()
        elif rule.action != "drop":
            raise self._fail(rule, "flush", 0)

    def discard(self, offset: int, length: int) -> None:
        self._range_request("discard", offset, length, self.inner.discard)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._range_request("zeroes", offset, length, self.inner.write_zeroes)

    def _range_request(self, operation: str, offset: int, length: int, run: Callable[[int, int], None]) -> None:
        sector, sectors = _sectors(offset, length)
        rule = self.plan.decide(self.name, operation, sector, sectors)
        if rule is not None and rule.action != "slow":
            raise self._fail(rule, operation, sector)
        if rule is not None:
            self._slow(rule)
        run(offset, length)

    def close(self) -> None:
        self.inner.close()
