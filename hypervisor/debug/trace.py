"""A trace of the VM exits that reach Python, one line each (`pyhv run --trace-exits FILE`).

Exits the C fast path completes itself (sink ports, unmapped addresses) are only counted, not
traced: the trace shows what the guest asks of pyhv's devices and what stops it. Lines look like
`0.001234 vcpu0 pio-out port=0x3f8 size=1 data=48`.
"""

from __future__ import annotations

import threading
import time
from typing import IO

from hypervisor.kvm.exits import exit_reason_name
from hypervisor.vcpu.context import ExitContext
from hypervisor.vcpu.events import DebugTrap, EmulationFailure, ExitEvent, MmioAccess, OtherExit, PortIo, RunError


def describe_exit(event: ExitEvent) -> str:
    """One line for an exit event; a read shows the data the device returned."""
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
    """An exit hook (`Machine.add_exit_hook`) that writes `describe_exit` lines to a stream."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.started = time.monotonic()
        self.lines = 0
        self._lock = threading.Lock()

    def __call__(self, event: ExitEvent, context: ExitContext) -> None:
        line = f"{time.monotonic() - self.started:.6f} {describe_exit(event)}\n"
        with self._lock:
            self.stream.write(line)
            self.lines += 1
