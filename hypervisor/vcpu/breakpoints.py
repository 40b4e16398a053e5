"""Exit breakpoints: stop the machine at "the 3rd write to port 0x3f8" or "an MMIO read in this
window while RAX is 7".

A breakpoint is a predicate over an exit event (kind, port or address range, direction, size,
data, vCPU), an occurrence count, and an optional Python condition and action. The table is
indexed so that the cost of breakpoints that cannot match an exit is a dictionary lookup, not a
call per breakpoint (benchmarks/breakpoints.py measures it): breakpoints on a port are found by
port, breakpoints on an MMIO window by a sorted list of windows, and only breakpoints without an
address are checked on every exit of their kind.
"""

from __future__ import annotations

import bisect
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hypervisor.vcpu.events import EVENT_KINDS, ExitEvent, MmioAccess, PortIo

if TYPE_CHECKING:
    from hypervisor.vcpu.context import ExitContext

# `condition(event, ctx)` filters further; `action(event, ctx)` runs at a hit and returns False
# to let the guest go on without stopping (a logging or data-changing breakpoint).
Condition = Callable[[ExitEvent, "ExitContext"], bool]
Action = Callable[[ExitEvent, "ExitContext"], Any]


@dataclass(eq=False)  # compared and hashed by identity: a table entry, not a value
class Breakpoint:
    """One exit breakpoint. `address` is a port or a physical address, or an inclusive
    (low, high) range; `count=N` matches from the Nth matching exit on (gdb's ignore count + 1)."""

    kind: str | None = None  # "io", "mmio", "hlt", "debug", ... (events.EVENT_KINDS)
    address: int | tuple[int, int] | None = None
    is_write: bool | None = None
    size: int | None = None
    data: int | None = None  # the access's value, little-endian, as the guest wrote or read it
    vcpu: int | None = None
    count: int | None = None
    condition: Condition | None = None
    action: Action | None = None
    enabled: bool = True
    id: int = 0  # given by the table it is added to: 1, 2, ... per machine, as gdb numbers them
    hits: int = 0  # exits that matched every filter (counted before `count` applies)

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in EVENT_KINDS:
            raise ValueError(f"unknown exit kind {self.kind!r} (one of {', '.join(EVENT_KINDS)})")
        if isinstance(self.address, tuple):
            low, high = self.address
            if low > high:
                raise ValueError(f"address range {low:#x}..{high:#x} is empty")
        if self.address is not None and self.kind not in (None, "io", "mmio"):
            raise ValueError(f"an address only applies to io and mmio exits, not {self.kind}")
        if self.count is not None and self.count < 1:
            raise ValueError("count must be at least 1")

    @property
    def bounds(self) -> tuple[int, int] | None:
        if self.address is None:
            return None
        if isinstance(self.address, tuple):
            return self.address
        return (self.address, self.address)

    def matches(self, event: ExitEvent) -> bool:
        """The static filters (everything but the count, the condition and `enabled`)."""
        if self.kind is not None and event.kind != self.kind:
            return False
        if self.vcpu is not None and event.vcpu != self.vcpu:
            return False
        needs_access = self.address is not None or self.is_write is not None or self.size is not None
        if needs_access or self.data is not None:
            if not isinstance(event, (PortIo, MmioAccess)):
                return False
            bounds = self.bounds
            if bounds is not None:
                # An access matches a window it overlaps (a 4-byte read at 0x3fc hits 0x3fe).
                if event.address + event.size * event.count - 1 < bounds[0] or event.address > bounds[1]:
                    return False
            if self.is_write is not None and event.is_write != self.is_write:
                return False
            if self.size is not None and event.size != self.size:
                return False
            if self.data is not None and int.from_bytes(event.data[: event.size], "little") != self.data:
                return False
        return True

    def describe(self) -> str:
        parts = [self.kind or "any"]
        bounds = self.bounds
        if bounds is not None:
            name = "port" if self.kind == "io" else "addr"
            parts.append(f"{name}={bounds[0]:#x}" + (f"..{bounds[1]:#x}" if bounds[1] != bounds[0] else ""))
        if self.is_write is not None:
            parts.append("write" if self.is_write else "read")
        for name in ("size", "data", "vcpu"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value:#x}" if name == "data" else f"{name}={value}")
        if self.count is not None:
            parts.append(f"count>={self.count}")
        if self.condition is not None:
            parts.append("if <python>")
        return " ".join(parts)


NO_BREAKPOINTS: tuple[Breakpoint, ...] = ()


class BreakpointTable:
    """The machine's breakpoints, indexed for the vCPU threads' per-exit check."""

    def __init__(self, on_change: Callable[[bool], None] | None = None) -> None:
        # `on_change(True)` before a breakpoint is added, `on_change(False)` after one goes:
        # the machine turns C-served exits off first (hypervisor.devices.serial fast path), so a
        # new breakpoint sees every exit from its first.
        self._on_change = on_change
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._all: dict[int, Breakpoint] = {}
        # Rebuilt on every change, read without the lock by vCPU threads (replaced, never mutated).
        self.ports: dict[int, tuple[Breakpoint, ...]] = {}
        # Address ranges by the accesses they can match, sorted by start, with the starts apart
        # for bisect: wide port ranges (io, or any kind) and MMIO ranges (mmio, or any kind).
        self._port_windows: tuple[tuple[int, int, Breakpoint], ...] = ()
        self._port_window_starts: tuple[int, ...] = ()
        self._mmio_windows: tuple[tuple[int, int, Breakpoint], ...] = ()
        self._mmio_window_starts: tuple[int, ...] = ()
        self.unaddressed: tuple[Breakpoint, ...] = ()
        self.active = False

    def add(self, breakpoint: Breakpoint) -> Breakpoint:
        if self._on_change is not None:
            self._on_change(True)
        with self._lock:
            if breakpoint.id == 0:
                breakpoint.id = next(self._ids)
            if breakpoint.id in self._all:
                raise ValueError(f"breakpoint {breakpoint.id} exists already")
            self._all[breakpoint.id] = breakpoint
            self._rebuild()
        return breakpoint

    def delete(self, breakpoint_id: int) -> bool:
        with self._lock:
            found = self._all.pop(breakpoint_id, None) is not None
            self._rebuild()
        if self._on_change is not None:
            self._on_change(False)
        return found

    def set_enabled(self, breakpoint_id: int, enabled: bool) -> bool:
        with self._lock:
            breakpoint = self._all.get(breakpoint_id)
            if breakpoint is None:
                return False
            breakpoint.enabled = enabled
            self._rebuild()
        return True

    def clear(self) -> None:
        with self._lock:
            self._all.clear()
            self._rebuild()
        if self._on_change is not None:
            self._on_change(False)

    def __iter__(self):  # type: ignore[no-untyped-def]
        with self._lock:
            return iter(list(self._all.values()))

    def __len__(self) -> int:
        return len(self._all)

    def _rebuild(self) -> None:
        ports: dict[int, list[Breakpoint]] = {}
        port_windows: list[tuple[int, int, Breakpoint]] = []
        mmio_windows: list[tuple[int, int, Breakpoint]] = []
        unaddressed: list[Breakpoint] = []
        for breakpoint in self._all.values():
            if not breakpoint.enabled:
                continue
            bounds = breakpoint.bounds
            if bounds is None:
                unaddressed.append(breakpoint)
                continue
            if breakpoint.kind == "io" and bounds[1] - bounds[0] < 16:
                for port in range(bounds[0], bounds[1] + 1):
                    ports.setdefault(port, []).append(breakpoint)
                continue
            if breakpoint.kind in (None, "io"):
                port_windows.append((bounds[0], bounds[1], breakpoint))
            if breakpoint.kind in (None, "mmio"):
                mmio_windows.append((bounds[0], bounds[1], breakpoint))
        port_windows.sort(key=lambda window: window[0])
        mmio_windows.sort(key=lambda window: window[0])
        self.ports = {port: tuple(found) for port, found in ports.items()}
        self._port_windows = tuple(port_windows)
        self._port_window_starts = tuple(window[0] for window in port_windows)
        self._mmio_windows = tuple(mmio_windows)
        self._mmio_window_starts = tuple(window[0] for window in mmio_windows)
        self.unaddressed = tuple(unaddressed)
        self.active = bool(ports or port_windows or mmio_windows or unaddressed)

    def candidates(self, is_port: bool, address: int, length: int) -> tuple[Breakpoint, ...]:
        """Breakpoints that may match a device access at [address, address + length). Called on
        every access while any breakpoint exists, so the common miss allocates nothing: an
        empty tuple, no list (benchmarks/breakpoints.py)."""
        found: tuple[Breakpoint, ...]
        if is_port:
            if length == 1:
                found = self.ports.get(address, NO_BREAKPOINTS)
            else:
                ports = self.ports
                found = tuple(bp for port in range(address, address + length) for bp in ports.get(port, ()))
            windows, starts = self._port_windows, self._port_window_starts
        else:
            found = NO_BREAKPOINTS
            windows, starts = self._mmio_windows, self._mmio_window_starts
        if windows:
            end = address + length - 1
            # Windows starting at or before the access's last byte, that end at or after its first.
            covering = tuple(bp for _, high, bp in windows[: bisect.bisect_right(starts, end)] if high >= address)
            if covering:
                found += covering
        if self.unaddressed:
            found += self.unaddressed
        return tuple(dict.fromkeys(found)) if len(found) > 1 else found
