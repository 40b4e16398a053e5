"""A trace of the VM exits that reach Python, one line each (`pyhv run --trace-exits FILE`).

Exits the C fast path completes itself (sink ports, unmapped addresses) are only counted, not
traced: the trace shows what the guest asks of pyhv's devices and what stops it. Lines look like
`0.001234 vcpu0 pio-out port=0x3f8 size=1 data=48`.
"""

from __future__ import annotations

import threading
import time
from typing import IO, TYPE_CHECKING, Any

from hypervisor.kvm.exits import exit_reason_name
from hypervisor.kvm.ffi import ffi, lib

if TYPE_CHECKING:
    from hypervisor.kvm import Vcpu

KIND_NAMES = {
    lib.PYHV_EXIT_PIO_IN: "pio-in",
    lib.PYHV_EXIT_PIO_OUT: "pio-out",
    lib.PYHV_EXIT_MMIO_READ: "mmio-read",
    lib.PYHV_EXIT_MMIO_WRITE: "mmio-write",
    lib.PYHV_EXIT_KICKED: "kicked",
    lib.PYHV_EXIT_INTERRUPTED: "interrupted",
    lib.PYHV_EXIT_BUDGET: "budget",
    lib.PYHV_EXIT_KVM: "kvm-exit",
    lib.PYHV_EXIT_ERROR: "error",
}
DEVICE_KINDS = (lib.PYHV_EXIT_PIO_IN, lib.PYHV_EXIT_PIO_OUT, lib.PYHV_EXIT_MMIO_READ, lib.PYHV_EXIT_MMIO_WRITE)
WRITE_KINDS = (lib.PYHV_EXIT_PIO_OUT, lib.PYHV_EXIT_MMIO_WRITE)


def describe_exit(vcpu_id: int, record: Any) -> str:
    """One line for an exit record (`struct pyhv_exit`); reads show no data (not served yet)."""
    kind = int(record.kind)
    text = f"vcpu{vcpu_id} {KIND_NAMES.get(kind, str(kind))}"
    if kind in DEVICE_KINDS:
        where = "port" if kind in (lib.PYHV_EXIT_PIO_IN, lib.PYHV_EXIT_PIO_OUT) else "addr"
        text += f" {where}={int(record.address):#x} size={int(record.size)}"
        if record.count > 1:
            text += f" count={int(record.count)}"
        if kind in WRITE_KINDS:
            text += " data=" + bytes(ffi.buffer(record.data, record.size * record.count)).hex()
    elif kind == lib.PYHV_EXIT_KVM:
        text += f" reason={exit_reason_name(int(record.exit_reason))}"
    elif kind == lib.PYHV_EXIT_ERROR:
        text += f" errno={int(record.error)}"
    return text


class ExitTracer:
    """A runner hook (`VcpuRunner.hooks`) that writes `describe_exit` lines to a stream."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.started = time.monotonic()
        self.lines = 0
        self._lock = threading.Lock()

    def __call__(self, vcpu: Vcpu, record: Any) -> None:
        line = f"{time.monotonic() - self.started:.6f} {describe_exit(vcpu.id, record)}\n"
        with self._lock:
            self.stream.write(line)
            self.lines += 1
