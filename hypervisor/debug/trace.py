"""Exit traces: JSON lines with device meaning (`pyhv run --trace FILE`) and the older text lines
(`pyhv run --trace-exits FILE`).

The JSON trace is an exit hook (`Machine.add_exit_hook`): one object per exit that reached Python,
with what the device made of it (hypervisor.debug.device_meaning), and at the end of the run one
aggregate object per counter of the exits the C fast path completed itself (sink ports, unmapped
reads and writes), which are counted, never traced one by one. QueueNotify writes that go to an
ioeventfd never leave the kernel and appear nowhere. Format (docs/debugging.md, "Exit traces"):

    {"type": "header", "format": "pyhv-exit-trace", "version": 1, "rip": true, ...}
    {"type": "exit", "t": 0.0123, "vcpu": 0, "kind": "io", "rip": 4131, "port": 1016, "size": 1,
     "dir": "out", "data": "4c", "device": "COM1", "register": "THR", "meaning": "serial THR 'L'",
     "host_ns": 5120}
    {"type": "aggregate", "vcpu": 0, "counter": "pio_sink", "kind": "io", "device": "sink", ...}
    {"type": "end", "outcome": "debug-exit", ...}

Tracing must never stop the guest: a write error (disk full, a closed pipe) ends the trace with
one warning and the run goes on.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, TYPE_CHECKING, TypedDict

from hypervisor.debug.device_meaning import device_meaning
from hypervisor.errors import HypervisorError
from hypervisor.kvm.exits import exit_reason_name
from hypervisor.vcpu.context import ExitContext
from hypervisor.vcpu.events import (
    DebugTrap,
    EmulationFailure,
    EntryFailure,
    ExitEvent,
    InternalError,
    MmioAccess,
    OtherExit,
    PortIo,
    RunError,
    SystemEvent,
)

if TYPE_CHECKING:
    from hypervisor.machine import RunResult
    from hypervisor.vcpu.stats import Counter

log = logging.getLogger(__name__)

# One encoder for every line: json.dumps would build one per call with these separators.
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode
TRACE_FORMAT = "pyhv-exit-trace"
TRACE_VERSION = 1
# The C loop's counters of exits it completed without Python (hypervisor/vcpu/stats.py), with the
# kind, device and register a summary files them under.
C_PATH_COUNTERS: dict[Counter, tuple[str, str, str]] = {
    "pio_sink": ("io", "sink", "write or read"),
    "mmio_sink": ("mmio", "sink", "write or read"),
    "pio_unmapped_reads": ("io", "unmapped port", "read"),
    "pio_unmapped_writes": ("io", "unmapped port", "write"),
    "mmio_unmapped_reads": ("mmio", "unmapped mmio", "read"),
    "mmio_unmapped_writes": ("mmio", "unmapped mmio", "write"),
}


class _ExitRecordKeys(TypedDict):
    type: str  # "exit"
    vcpu: int
    kind: str  # ExitEvent.kind: "io", "mmio", "shutdown", ...


class ExitRecord(_ExitRecordKeys, total=False):
    """One exit as the trace (and a post-mortem's exits.jsonl) writes it; which keys appear depends
    on the exit's kind (docs/debugging.md, "Exit traces"). A TypedDict: a plain dict at run time,
    with the keys' types for mypy."""

    t: float  # seconds since the run started (a post-mortem's history keeps no times)
    rip: int
    port: int  # io
    addr: int  # mmio
    dir: str  # "in" or "out" (io), "read" or "write" (mmio)
    size: int
    count: int  # accesses of a rep ins/outs, when more than one
    data: str | list[str]  # io and mmio: the bytes in hex; internal-error: the data words
    device: str | None
    register: str
    meaning: str
    exception: int
    pc: int
    dr6: int
    dr7: int
    instruction: str
    suberror: int
    event_type: int
    hardware_reason: int
    errno: int
    reason: str
    host_ns: int


def exit_record(event: ExitEvent, t: float, device: object = None, rip: int | None = None) -> ExitRecord:
    """The JSON object of one exit (without serialising it): shared by the trace and post-mortems."""
    record: ExitRecord = {"type": "exit", "t": round(t, 6), "vcpu": event.vcpu, "kind": event.kind}
    if rip is not None:
        record["rip"] = rip
    if isinstance(event, (PortIo, MmioAccess)):
        if isinstance(event, PortIo):
            record["port"] = event.port
            record["dir"] = "out" if event.is_write else "in"
        else:
            record["addr"] = event.address
            record["dir"] = "write" if event.is_write else "read"
        record["size"] = event.size
        if event.count > 1:
            record["count"] = event.count
        record["data"] = event.data.hex()
        record["device"] = event.device
        meaning = device_meaning(event, device)
        if meaning is not None:
            record["register"] = meaning.register
            record["meaning"] = str(meaning)
    elif isinstance(event, DebugTrap):
        record["exception"] = event.exception
        record["pc"] = event.pc
        record["dr6"] = event.dr6
        record["dr7"] = event.dr7
    elif isinstance(event, EmulationFailure):
        record["instruction"] = event.instruction.hex()
        record["rip"] = event.rip
    elif isinstance(event, InternalError):
        record["suberror"] = event.suberror
        record["data"] = [f"{word:#x}" for word in event.data]
    elif isinstance(event, SystemEvent):
        record["event_type"] = event.type
    elif isinstance(event, EntryFailure):
        record["hardware_reason"] = event.hardware_reason
    elif isinstance(event, RunError):
        record["errno"] = event.errno
    elif isinstance(event, OtherExit):
        record["reason"] = exit_reason_name(event.reason)
    record["host_ns"] = event.host_ns
    return record


class JsonTracer:
    """An exit hook writing one JSON line per exit; `finish(result)` adds the C-path aggregates.

    `rip` reads the vCPU's registers at every exit (KVM_GET_REGS, one ioctl): it says where the
    guest was, at a cost docs/debugging.md measures; `--trace-no-rip` turns it off.
    """

    def __init__(self, stream: IO[str], *, rip: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.rip = rip
        self._clock = clock
        self.started = self._clock()
        self.records = 0
        self.failed: str | None = None
        self._lock = threading.Lock()
        self._write({"type": "header", "format": TRACE_FORMAT, "version": TRACE_VERSION, "rip": rip,
                     "started_unix": round(time.time(), 3)})  # fmt: skip

    def __call__(self, event: ExitEvent, context: ExitContext) -> None:
        if self.failed is not None:
            return
        rip = None
        if self.rip and not isinstance(event, EmulationFailure):
            try:
                rip = context.regs()["rip"]
            except HypervisorError:
                rip = None
        record = exit_record(event, self._clock() - self.started, context.device, rip)
        self._write(record)

    def restart_clock(self) -> None:
        """Times from now on (the machine's start), not from when the tracer was made."""
        self.started = self._clock()

    def finish(self, result: RunResult, runners: Sequence[object] = ()) -> None:
        """One aggregate object per non-zero C-path counter and vCPU, the instructions pyhv's
        emulator ran for KVM (exits that reach Python but are no hook event: `runners` are the
        machine's VcpuRunners), then the end object."""
        for index, runner in enumerate(runners):
            emulated = int(getattr(runner, "emulated_instructions", 0) or 0)
            if emulated:
                self._write({"type": "aggregate", "vcpu": index, "counter": "emulated_instructions",
                             "kind": "emulation", "device": "pyhv emulator", "register": "instruction",
                             "count": emulated})  # fmt: skip
        for index, stats in enumerate(result.per_vcpu):
            for counter, (kind, device, register) in C_PATH_COUNTERS.items():
                count = stats[counter]
                if count:
                    self._write({"type": "aggregate", "vcpu": index, "counter": counter, "kind": kind,
                                 "device": device, "register": register, "count": count})  # fmt: skip
        self._write({"type": "end", "outcome": result.outcome.kind.value, "wall_seconds": round(result.wall_seconds, 3),
                     "total_exits": result.statistics["total_exits"],
                     "python_exits": result.statistics["python_exits"], "traced": self.records})  # fmt: skip
        self.flush()

    def flush(self) -> None:
        with self._lock:
            if self.failed is None:
                try:
                    self.stream.flush()
                except (OSError, ValueError) as error:
                    self.stop(error)

    def _write(self, record: Mapping[str, object]) -> None:
        line = _ENCODE(record) + "\n"
        with self._lock:
            if self.failed is not None:
                return
            try:
                self.stream.write(line)
            except (OSError, ValueError) as error:  # ValueError: the stream was closed
                self.stop(error)
                return
            if record["type"] == "exit":
                self.records += 1

    def stop(self, error: Exception) -> None:
        """Ends the trace after a write error, with the one warning."""
        self.failed = getattr(error, "strerror", None) or str(error)
        log.warning("exit trace stopped after %d exits: %s (the guest runs on)", self.records, self.failed)


def describe_exit(event: ExitEvent) -> str:
    """One line for an exit event; a read shows the data the device returned (`--trace-exits`)."""
    text = f"vcpu{event.vcpu} "
    if isinstance(event, PortIo):
        text += f"pio-{'out' if event.is_write else 'in'} port={event.port:#x} size={event.size}"
    elif isinstance(event, MmioAccess):
        text += f"mmio-{'write' if event.is_write else 'read'} addr={event.address:#x} size={event.size}"
    elif isinstance(event, OtherExit):
        return text + f"kvm-exit reason={exit_reason_name(event.reason)}"
    elif isinstance(event, RunError):
        return text + f"error errno={event.errno}"
    elif isinstance(event, DebugTrap):
        return text + f"debug exception={event.exception} pc={event.pc:#x}"
    elif isinstance(event, EmulationFailure):
        return text + f"emulation-failure rip={event.rip:#x} bytes={event.instruction.hex()}"
    else:
        return text + event.kind
    if event.count > 1:
        text += f" count={event.count}"
    return text + f" data={event.data.hex()}"


class ExitTracer:
    """The text trace of `--trace-exits FILE`: `describe_exit` lines (`0.001234 vcpu0 pio-out
    port=0x3f8 size=1 data=48`). Kept for scripts that grep it; `--trace` is the richer format."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.started = time.monotonic()
        self.lines = 0
        self.failed: str | None = None
        self._lock = threading.Lock()

    def __call__(self, event: ExitEvent, context: ExitContext) -> None:
        line = f"{time.monotonic() - self.started:.6f} {describe_exit(event)}\n"
        with self._lock:
            if self.failed is not None:
                return
            try:
                self.stream.write(line)
            except (OSError, ValueError) as error:
                self.failed = getattr(error, "strerror", None) or str(error)
                log.warning("exit trace stopped after %d lines: %s (the guest runs on)", self.lines, self.failed)
                return
            self.lines += 1
