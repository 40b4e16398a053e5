"""The C loop's share of a 16550A's transmit side (csrc/vcpu_loop.h `struct pyhv_uart`).

One per machine, shared by every vCPU: while the UART model publishes that a THR write has no
effect but its byte and an LSR read none at all, the vCPU loops append THR bytes to a buffer and
answer LSR reads without leaving C (two port exits per console byte with Linux's polling
console driver). The model stays the one source of register semantics
(hypervisor/devices/serial.py implements `TransmitFastPath` on top of this).
"""

from __future__ import annotations

from typing import Any

from hypervisor.errors import KvmError
from hypervisor.kvm.ffi import ffi, lib

BUFFER_SIZE: int = lib.PYHV_UART_BUFFER_SIZE


class UartTransmitBuffer:
    """The shared C state and the two operations Python performs on it."""

    def __init__(self) -> None:
        self.state: Any = ffi.new("struct pyhv_uart *")
        result = lib.pyhv_uart_init(self.state)
        if result < 0:
            raise KvmError("pthread_mutex_init", -result)
        self._out = ffi.new("uint8_t[]", BUFFER_SIZE)
        self._closed = False

    def take(self) -> bytes:
        """The bytes the loops took since the last take or publish."""
        count = lib.pyhv_uart_take(self.state, self._out)
        return ffi.buffer(self._out, count)[:] if count else b""

    def publish(self, fast: bool, line_status: int) -> bytes:
        """Sets whether the loops may take THR writes and LSR reads, and the LSR they answer;
        returns the bytes taken under the previous setting (drained in the same critical
        section, so none is appended under a stale one)."""
        count = lib.pyhv_uart_publish(self.state, self._out, int(fast), line_status & 0xFF)
        return ffi.buffer(self._out, count)[:] if count else b""

    @property
    def bytes_taken(self) -> int:
        return int(self.state.bytes_taken)

    @property
    def line_status_reads(self) -> int:
        return int(self.state.lsr_reads)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            lib.pyhv_uart_destroy(self.state)
