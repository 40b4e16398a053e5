"""The debug-exit port: one byte written by the guest ends the run with that status.

Two flavours: pyhv's own (status = the byte, 0-255, so a guest can report success as 0) and
QEMU's isa-debug-exit (status = (value << 1) | 1, hw/misc/debugexit.c), for guests written
for QEMU that cannot report 0. The run's end (`on_exit`) is an effect, performed after the
device's bus lock is released (hypervisor.devices.gate).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from hypervisor.devices.gate import GatedDevice

log = logging.getLogger(__name__)

DEFAULT_DEBUG_EXIT_PORT = 0x501
DEBUG_EXIT_PORT_SIZE = 1


class DebugExit(GatedDevice):
    def __init__(self, on_exit: Callable[[int], None], qemu_compatible: bool = False) -> None:
        self.on_exit = on_exit
        self.qemu_compatible = qemu_compatible

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = b"\xff" * len(data)

    def write(self, offset: int, data: bytes) -> None:
        self._access(self._write, data)

    def _write(self, data: bytes) -> None:
        value = data[0]  # only the low byte counts, whatever the access width
        status = ((value << 1) | 1) & 0xFF if self.qemu_compatible else value
        log.debug("guest wrote %#x to debug-exit: status %d", value, status)
        self._post(self.on_exit, status)
