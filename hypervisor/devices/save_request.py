"""The save-request port: a guest asks its hypervisor to snapshot it by writing any byte here.

pyhv's own port, next to the debug-exit port (0x501): present only when a run was told where to
save (`pyhv run --save PATH --save-on-request`, docs/snapshots.md). A guest that reaches the
point worth saving -- a test harness at its prompt, a fuzzer's forkserver before its first
input -- writes one byte; the vCPUs stop just after that OUT and the machine is saved. Reads
return 0xff, as an unmapped port does. The request (`on_request`) is an effect, performed after
the device's bus lock is released (hypervisor.devices.gate).
"""

from __future__ import annotations

from collections.abc import Callable

from hypervisor.devices.gate import GatedDevice

SAVE_REQUEST_PORT = 0x50A
SAVE_REQUEST_PORT_SIZE = 1


class SaveRequestPort(GatedDevice):
    def __init__(self, on_request: Callable[[], None]) -> None:
        self._on_request = on_request
        self.requests = 0

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = b"\xff" * len(data)

    def write(self, offset: int, data: bytes) -> None:
        self._access(self._write)

    def _write(self) -> None:
        self.requests += 1
        self._post(self._on_request)
